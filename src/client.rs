//! The library side of the commands that talk to a running pipeline:
//! submitting URLs (a command record on `vidpipe.commands`), reading where
//! videos are from the status tables, and reading their results (a
//! transcript or summary file, by format and generation). The CLI and the
//! HTTP API are thin layers over this.
//!
//! Ids given to these functions come from people and are not trusted: one
//! that PostgreSQL cannot even hold (a NUL character) names no video, as
//! any other unknown id, rather than failing the query.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Config;
use crate::ids;
use crate::records::{Command, Meta, Record, now_ms};
use crate::store::blobs::{BlobError, BlobStore};
use crate::template::codec::Codec;
use crate::template::produce::{self, AckProducer};

/// Whether `id` could name a row at all: PostgreSQL text holds no NUL, and
/// a query that binds one fails (SQLSTATE 22021) instead of finding
/// nothing. Such an id is simply unknown.
pub fn storable(id: &str) -> bool {
    !id.contains('\0')
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A URL that cannot be submitted.
    #[error(transparent)]
    BadUrl(#[from] ids::BadUrl),
    /// Kafka refused or is unreachable.
    #[error("Kafka at {brokers}: {message}")]
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// What failed.
        message: String,
    },
    /// The schema registry refused or is unreachable.
    #[error("schema registry: {0}")]
    Registry(String),
    /// PostgreSQL refused or is unreachable.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
}

/// What became of one submitted URL.
#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    /// The URL as normalised.
    pub url: String,
    /// The video id, or the source id (`src:…`) of a feed or channel.
    pub id: String,
    /// A feed, channel or playlist rather than one video.
    pub is_source: bool,
    /// The generation its stage runs are recorded under.
    pub generation: i64,
    /// Set when the video was known already and nothing was sent: its
    /// current status.
    pub known: Option<String>,
}

/// A producer of command records on `vidpipe.commands`.
pub struct CommandSender {
    producer: AckProducer,
    encoder: crate::template::codec::Encoder,
    topic: String,
    brokers: String,
}

impl CommandSender {
    /// Connects (lazily) to Kafka and registers the command schema.
    pub async fn new(config: &Config) -> Result<Self, ClientError> {
        let producer = AckProducer::new(&produce::idempotent(
            &config.kafka_brokers,
            Duration::from_secs(15),
        ))
        .map_err(|e| kafka(config, e))?;
        let codec = Codec::new(config.schema_registry_url.as_deref())
            .map_err(|e| ClientError::Registry(e.to_string()))?;
        let topic = config.topic("commands");
        let encoder = codec
            .encoder(&topic, Command::SCHEMA)
            .await
            .map_err(|e| ClientError::Registry(e.to_string()))?;
        Ok(Self {
            producer,
            encoder,
            topic,
            brokers: config.kafka_brokers.clone(),
        })
    }

    /// Sends a discovery command for `url` under `id`; waits for Kafka's
    /// acknowledgement.
    pub async fn send(
        &self,
        id: &str,
        generation: i64,
        url: &str,
        requested_by: Option<&str>,
    ) -> Result<(), ClientError> {
        let command = Command {
            meta: Meta {
                generation,
                ..Meta::new(id)
            },
            command_id: uuid::Uuid::new_v4().to_string(),
            url: Some(url.to_string()),
            start_stage: None,
            requested_by: requested_by.map(str::to_string),
            options: HashMap::new(),
            submitted_at: now_ms(),
        };
        let payload = self
            .encoder
            .encode(&command)
            .map_err(|e| ClientError::Registry(e.to_string()))?;
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(id).payload(&payload),
                Duration::from_secs(15),
            )
            .await
            .map_err(|e| ClientError::Kafka {
                brokers: self.brokers.clone(),
                message: e.to_string(),
            })?;
        Ok(())
    }
}

/// Sends a command per URL (after validating them all). A video already
/// known is not sent again: `vidpipe replay` reprocesses. Sources are
/// always sent (a new look at the feed); their generation is the
/// submission time, so each look has its own stage run.
pub async fn submit(
    config: &Config,
    pool: &PgPool,
    urls: &[String],
    feed: bool,
    requested_by: Option<&str>,
) -> Result<Vec<Submitted>, ClientError> {
    // Bad URLs are refused before anything is contacted.
    let plans = plan(urls, feed)?;
    let sender = CommandSender::new(config).await?;
    submit_with(&sender, pool, plans, requested_by).await
}

/// What [`submit_with`] sends: each URL normalised, with the id it gets
/// (a video's, or a source's when `feed` says so or the URL is one). The
/// first bad URL fails the whole request.
pub fn plan(urls: &[String], feed: bool) -> Result<Vec<(url::Url, String)>, ClientError> {
    urls.iter()
        .map(|raw| {
            let url = ids::normalise(raw)?;
            let id = ids::subject(&url, feed);
            Ok((url, id))
        })
        .collect()
}

/// [`submit`] of a [`plan`] through a sender the caller keeps (the API
/// keeps one for all its requests: a producer and a schema lookup per
/// request would be waste).
pub async fn submit_with(
    sender: &CommandSender,
    pool: &PgPool,
    plans: Vec<(url::Url, String)>,
    requested_by: Option<&str>,
) -> Result<Vec<Submitted>, ClientError> {
    let mut out = Vec::with_capacity(plans.len());
    for (url, id) in plans {
        let is_source = id.starts_with("src:");
        let generation = if is_source { now_ms() } else { 1 };
        if !is_source {
            let known: Option<String> =
                sqlx::query_scalar("SELECT status FROM videos WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(pool)
                    .await?;
            if let Some(status) = known.filter(|s| s != "queued") {
                out.push(Submitted {
                    url: url.to_string(),
                    id,
                    is_source,
                    generation,
                    known: Some(status),
                });
                continue;
            }
            sqlx::query(
                "INSERT INTO videos (id, url, generation, status) VALUES ($1, $2, 1, 'queued')
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(&id)
            .bind(url.as_str())
            .execute(pool)
            .await?;
        }
        sender
            .send(&id, generation, url.as_str(), requested_by)
            .await?;
        out.push(Submitted {
            url: url.to_string(),
            id,
            is_source,
            generation,
            known: None,
        });
    }
    Ok(out)
}

/// Polls subscribed sources until `shutdown`: every `tick`, claims the
/// due ones (each by exactly one instance) and sends a discovery command
/// for each. Errors are logged and retried on the next tick.
pub async fn poll_sources(
    config: Config,
    catalog: crate::store::catalog::PgCatalog,
    tick: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut sender: Option<CommandSender> = None;
    loop {
        if sender.is_none() {
            match CommandSender::new(&config).await {
                Ok(s) => sender = Some(s),
                Err(e) => tracing::warn!(error = %e, "source poller cannot reach Kafka yet"),
            }
        }
        if let Some(tx) = &sender {
            match catalog.claim_due(16).await {
                Ok(due) => {
                    for source in due {
                        let result = tx
                            .send(&source.id, now_ms(), &source.url, Some("vidpipe sources"))
                            .await;
                        match result {
                            Ok(()) => tracing::info!(source = source.id, "source polled"),
                            Err(e) => {
                                tracing::warn!(source = source.id, error = %e, "cannot poll source")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim due sources"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

fn kafka(config: &Config, e: impl std::fmt::Display) -> ClientError {
    ClientError::Kafka {
        brokers: config.kafka_brokers.clone(),
        message: e.to_string(),
    }
}

/// One stage run, as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StageStatus {
    /// Stage name.
    pub name: String,
    /// `running`, `done`, `failed`.
    pub status: String,
    /// Attempts so far.
    pub attempts: i32,
    /// How long the run took (when finished).
    pub duration_ms: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Generation of the run.
    pub generation: i64,
}

/// One video, as `status --json` prints it (and the HTTP API sends it: the
/// OpenAPI schema is derived from this very type, named `Video` there).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Video)]
pub struct VideoStatus {
    /// Video id.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// `queued`, `running`, `done`, `failed`.
    pub status: String,
    /// The stage it is at (or failed in).
    pub stage: Option<String>,
    /// Current generation.
    pub generation: i64,
    /// Why it failed.
    pub error: Option<String>,
    /// Its stage runs of the current generation, in pipeline order.
    pub stages: Vec<StageStatus>,
}

#[derive(sqlx::FromRow)]
struct VideoRow {
    id: String,
    url: String,
    status: String,
    stage: Option<String>,
    generation: i64,
    error: Option<String>,
}

/// A stage run and whose it is.
#[derive(sqlx::FromRow)]
struct RunRow {
    video_id: String,
    #[sqlx(flatten)]
    run: StageStatus,
}

/// Status of the given videos (all, newest first, up to `limit`, when
/// `ids` is empty).
pub async fn status(
    pool: &PgPool,
    ids: &[String],
    limit: i64,
) -> Result<Vec<VideoStatus>, sqlx::Error> {
    let wanted: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| storable(id))
        .collect();
    if wanted.is_empty() && !ids.is_empty() {
        // Only ids that cannot exist: none of them is known (and an empty
        // list must not turn into "every video").
        return Ok(Vec::new());
    }
    let rows: Vec<VideoRow> = if wanted.is_empty() {
        sqlx::query_as(
            "SELECT id, url, status, stage, generation, error FROM videos
             ORDER BY updated_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await?
    } else {
        sqlx::query_as(
            "SELECT id, url, status, stage, generation, error FROM videos WHERE id = ANY($1)",
        )
        .bind(&wanted)
        .fetch_all(pool)
        .await?
    };
    // Every listed video's runs of its current generation, in one query.
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let generations: Vec<i64> = rows.iter().map(|r| r.generation).collect();
    let runs: Vec<RunRow> = sqlx::query_as(
        "SELECT r.video_id, r.stage AS name, r.status, r.attempt AS attempts, r.duration_ms,
                r.error, r.generation
         FROM stage_runs r
         JOIN unnest($1::text[], $2::bigint[]) AS w(id, generation)
           ON r.video_id = w.id AND r.generation = w.generation
         ORDER BY array_position(ARRAY['discover','download','extract-audio','transcribe','summarize'], r.stage)",
    )
    .bind(&ids)
    .bind(&generations)
    .fetch_all(pool)
    .await?;
    let mut by_video: HashMap<String, Vec<StageStatus>> = HashMap::new();
    for run in runs {
        by_video.entry(run.video_id).or_default().push(run.run);
    }
    let out = rows
        .into_iter()
        .map(|r| VideoStatus {
            stages: by_video.remove(&r.id).unwrap_or_default(),
            id: r.id,
            url: r.url,
            status: r.status,
            stage: r.stage,
            generation: r.generation,
            error: r.error,
        })
        .collect();
    Ok(out)
}

/// How a source's look ended: the videos it handed on, or why it failed.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceRun {
    /// Discovery has not finished with it.
    Pending,
    /// Discovery found these (new) videos.
    Done(Vec<String>),
    /// Discovery failed.
    Failed(String),
}

/// Where discovery is with one submission of a source.
pub async fn source_run(
    pool: &PgPool,
    id: &str,
    generation: i64,
) -> Result<SourceRun, sqlx::Error> {
    let row: Option<(String, Option<String>, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT status, error, output FROM stage_runs
         WHERE video_id = $1 AND stage = 'discover' AND generation = $2",
    )
    .bind(id)
    .bind(generation)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((status, _, Some(output))) if status == "done" => SourceRun::Done(
            output["videos"]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Some((status, error, _)) if status == "failed" => {
            SourceRun::Failed(error.unwrap_or_else(|| "discovery failed".into()))
        }
        _ => SourceRun::Pending,
    })
}

/// The record a stage run produced (from its status row), for finding its
/// blobs: e.g. the transcribe run's `VideoTranscribed`. None when the
/// video has no finished run of `stage` (of `generation`), or is unknown.
pub async fn stage_output(
    pool: &PgPool,
    video_id: &str,
    stage: &str,
    generation: Option<i64>,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
    if !storable(video_id) || !storable(stage) {
        return Ok(None);
    }
    let output: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT output FROM stage_runs WHERE video_id = $1 AND stage = $2 AND status = 'done'
           AND ($3::bigint IS NULL OR generation = $3)
         ORDER BY generation DESC LIMIT 1",
    )
    .bind(video_id)
    .bind(stage)
    .bind(generation)
    .fetch_optional(pool)
    .await?
    .flatten();
    Ok(output.and_then(|o| o["records"].get(0).cloned()))
}

/// Which result of a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKind {
    /// The transcribe stage's `transcript.{txt,srt,vtt,json}`.
    Transcript,
    /// The summarize stage's `summary.{md,json}`.
    Summary,
}

impl ResultKind {
    /// The stage that writes it.
    pub fn stage(self) -> &'static str {
        match self {
            Self::Transcript => "transcribe",
            Self::Summary => "summarize",
        }
    }

    /// The files' base name, and the field of the stage's output record
    /// that names one of them.
    pub fn name(self) -> &'static str {
        match self {
            Self::Transcript => "transcript",
            Self::Summary => "summary",
        }
    }

    /// The formats it comes in (file extensions), the default first.
    pub fn formats(self) -> &'static [&'static str] {
        match self {
            Self::Transcript => &["txt", "srt", "vtt", "json"],
            Self::Summary => &["md", "json"],
        }
    }

    /// Refuses a format it does not come in, or a generation below 1:
    /// what [`read_result`] checks before asking any service, for callers
    /// that want to say so before connecting.
    pub fn check(self, format: &str, generation: Option<i64>) -> Result<(), ResultError> {
        if !self.formats().contains(&format) {
            return Err(ResultError::BadFormat {
                kind: self,
                format: format.to_string(),
            });
        }
        match generation {
            Some(g) if g < 1 => Err(ResultError::BadGeneration(g)),
            _ => Ok(()),
        }
    }
}

/// A result file's content and the generation it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultFile {
    /// The file's bytes (at most [`crate::store::blobs::READ_LIMIT`]).
    pub bytes: Vec<u8>,
    /// The generation of the run that wrote it.
    pub generation: i64,
}

/// Why a result file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    /// A format the result does not come in.
    #[error("format {format:?} is not one of {}", kind.formats().join(", "))]
    BadFormat {
        /// The result asked for.
        kind: ResultKind,
        /// The format asked for.
        format: String,
    },
    /// Generations start at 1.
    #[error("generation: give 1 or more, not {0}")]
    BadGeneration(i64),
    /// No such video.
    #[error("unknown video id {0:?}")]
    UnknownVideo(String),
    /// The video has no finished run of the stage (of that generation).
    #[error(
        "{video_id} has no finished {stage} run {}",
        match generation { Some(g) => format!("in generation {g}"), None => "yet".to_string() }
    )]
    NotFinished {
        /// The video.
        video_id: String,
        /// The stage that writes the result.
        stage: &'static str,
        /// The generation asked for.
        generation: Option<i64>,
    },
    /// The finished run's output record names no file: a fault of the
    /// stage that wrote it.
    #[error("the {stage} run of {video_id} names no {name} file")]
    NoFile {
        /// The video.
        video_id: String,
        /// The stage.
        stage: &'static str,
        /// `transcript` or `summary`.
        name: &'static str,
    },
    /// The blob store failed (`BlobError::Store`: it did not answer), or
    /// the file is missing or not this store's.
    #[error("cannot read {file} of {video_id}: {source}")]
    Blob {
        /// The video.
        video_id: String,
        /// `transcript.srt`, `summary.md`, …
        file: String,
        /// Why (boxed: an object store error is large, and this one is
        /// rare).
        source: Box<BlobError>,
    },
    /// PostgreSQL refused or is unreachable.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
}

/// `<kind>.<format>` of a video's latest finished run of the result's stage
/// (or of `generation`): the run's output record names one of the files,
/// and the other formats lie next to it.
pub async fn read_result(
    pool: &PgPool,
    blobs: &BlobStore,
    video_id: &str,
    kind: ResultKind,
    format: &str,
    generation: Option<i64>,
) -> Result<ResultFile, ResultError> {
    kind.check(format, generation)?;
    let stage = kind.stage();
    let Some(record) = stage_output(pool, video_id, stage, generation).await? else {
        return Err(if video_exists(pool, video_id).await? {
            ResultError::NotFinished {
                video_id: video_id.to_string(),
                stage,
                generation,
            }
        } else {
            ResultError::UnknownVideo(video_id.to_string())
        });
    };
    let Some(uri) = record[kind.name()]["uri"].as_str() else {
        return Err(ResultError::NoFile {
            video_id: video_id.to_string(),
            stage,
            name: kind.name(),
        });
    };
    let file = format!("{}.{format}", kind.name());
    let bytes = match blobs.sibling_uri(uri, &file) {
        // Bounded: the store reads at most `blobs::READ_LIMIT` bytes.
        Ok(sibling) => blobs.read(&sibling).await,
        Err(e) => Err(e),
    }
    .map_err(|source| ResultError::Blob {
        video_id: video_id.to_string(),
        file,
        source: Box::new(source),
    })?;
    Ok(ResultFile {
        bytes,
        generation: record["meta"]["generation"]
            .as_i64()
            .or(generation)
            .unwrap_or(1),
    })
}

/// Whether a video has a row (an id that cannot be stored has none).
pub async fn video_exists(pool: &PgPool, id: &str) -> Result<bool, sqlx::Error> {
    if !storable(id) {
        return Ok(false);
    }
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM videos WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(found.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_a_nul_are_not_storable() {
        assert!(storable("url:0123abcd"));
        assert!(storable(""));
        assert!(!storable("url:\0x"));
    }

    #[test]
    fn result_errors_name_the_problem() {
        let bad = ResultError::BadFormat {
            kind: ResultKind::Summary,
            format: "srt".into(),
        };
        assert_eq!(bad.to_string(), "format \"srt\" is not one of md, json");
        let pending = ResultError::NotFinished {
            video_id: "url:a".into(),
            stage: ResultKind::Transcript.stage(),
            generation: None,
        };
        assert_eq!(
            pending.to_string(),
            "url:a has no finished transcribe run yet"
        );
        let old = ResultError::NotFinished {
            video_id: "url:a".into(),
            stage: "summarize",
            generation: Some(2),
        };
        assert_eq!(
            old.to_string(),
            "url:a has no finished summarize run in generation 2"
        );
        for kind in [ResultKind::Transcript, ResultKind::Summary] {
            assert!(kind.check("json", Some(1)).is_ok(), "{kind:?}");
            assert!(kind.check("json", None).is_ok(), "{kind:?}");
            assert!(matches!(
                kind.check("json", Some(0)),
                Err(ResultError::BadGeneration(0))
            ));
            // A format is part of a file name: nothing else gets through.
            assert!(matches!(
                kind.check("../media.mp4", None),
                Err(ResultError::BadFormat { .. })
            ));
        }
        assert!(ResultKind::Transcript.check("srt", None).is_ok());
        assert!(ResultKind::Summary.check("srt", None).is_err());
    }
}
