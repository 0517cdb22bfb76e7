//! The library side of the commands that talk to a running pipeline:
//! submitting URLs (a command record on `vidpipe.commands`), and reading
//! where videos are from the status tables. The CLI and the HTTP API are
//! thin layers over this.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Config;
use crate::ids;
use crate::records::{Command, Meta, Record, now_ms};
use crate::template::codec::Codec;

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
    producer: FutureProducer,
    encoder: crate::template::codec::Encoder,
    topic: String,
    brokers: String,
}

impl CommandSender {
    /// Connects (lazily) to Kafka and registers the command schema.
    pub async fn new(config: &Config) -> Result<Self, ClientError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "15000")
            .create()
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
            .map_err(|(e, _)| ClientError::Kafka {
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
    let mut plans = Vec::with_capacity(urls.len());
    for raw in urls {
        let url = ids::normalise(raw)?;
        let id = ids::subject(&url, feed);
        plans.push((url, id));
    }
    let sender = CommandSender::new(config).await?;
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
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
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

/// One video, as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// Status of the given videos (all, newest first, up to `limit`, when
/// `ids` is empty).
pub async fn status(
    pool: &PgPool,
    ids: &[String],
    limit: i64,
) -> Result<Vec<VideoStatus>, sqlx::Error> {
    let rows: Vec<VideoRow> = if ids.is_empty() {
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
        .bind(ids)
        .fetch_all(pool)
        .await?
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let stages: Vec<StageStatus> = sqlx::query_as(
            "SELECT stage AS name, status, attempt AS attempts, duration_ms, error, generation
             FROM stage_runs WHERE video_id = $1 AND generation = $2
             ORDER BY array_position(ARRAY['discover','download','extract-audio','transcribe','summarize'], stage)",
        )
        .bind(&r.id)
        .bind(r.generation)
        .fetch_all(pool)
        .await?;
        out.push(VideoStatus {
            id: r.id,
            url: r.url,
            status: r.status,
            stage: r.stage,
            generation: r.generation,
            error: r.error,
            stages,
        });
    }
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
/// blobs: e.g. the transcribe run's `VideoTranscribed`.
pub async fn stage_output(
    pool: &PgPool,
    video_id: &str,
    stage: &str,
    generation: Option<i64>,
) -> Result<Option<serde_json::Value>, sqlx::Error> {
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
