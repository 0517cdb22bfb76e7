//! `vidpipe replay`: reprocess videos from a stage with a new generation.
//!
//! A replay re-feeds the chosen videos into one stage's input topic. Each
//! re-fed record is the video's latest input record for that stage with
//! its generation moved to the video's current generation + 1, so that:
//! - the stage and every later one run again and record the new
//!   generation's status rows (the template refuses nothing: a newer
//!   generation is new rows) and blobs (`<video>/g<generation>/`); the
//!   earlier generations' rows and files stay, readable by generation;
//! - a downstream consumer tells a replay from a first run by
//!   `meta.generation > 1` (and the `vidpipe.generation` header every stage
//!   writes); the re-fed record itself also carries the headers
//!   `vidpipe.replay.from-generation` and `vidpipe.replay.source`. Headers
//!   rather than a new Avro field keep every schema as it is.
//!
//! Where the input record comes from:
//! - the stage's input topic (topics are durable): the records between
//!   `--since` and `--until`, found by timestamp (`offsets_for_times`), read
//!   with `read_committed`, the latest per video kept;
//! - else the database, for records the topic no longer holds (retention):
//!   the previous stage's status row keeps the record it produced, which is
//!   this stage's input;
//! - for discover, whose input is a command: a new command for the video's
//!   URL (see [`DISCOVER_REPLAYABLE`]).
//!
//! Before a record is sent, the video's row moves to `queued` at the new
//! generation, so `vidpipe status` shows the replay at once; if Kafka then
//! refuses the record, the row is put back. Records are produced by an
//! idempotent producer with the pipeline's codec.
//!
//! [`Restarts`] is the same replay for one video at a time, on behalf of a
//! restart command (a legacy `{"video_id"}` message on a stage queue, which
//! the bridge turns into a [`Command`] with `start_stage`): discovery hands
//! such a command to it through the [`Restarter`] trait. It differs from
//! `vidpipe replay` in three ways. The input record is taken from the
//! database first (the previous stage's status row) and the topic is read
//! only when that has none, so a command does not scan a whole topic. Each
//! command id is recorded in `restarts` in the transaction that moves the
//! video to its new generation, so a repeated command is a no-op and one
//! interrupted after that point sends its record again under the same
//! generation rather than taking another. And the re-fed record keeps the
//! command's trace id and carries it as `vidpipe.command_id`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, QuietEof};
use crate::config::Config;
use crate::records::{
    AudioExtracted, Command, Meta, Record, VideoDiscovered, VideoDownloaded, VideoTranscribed,
    now_ms,
};
use crate::stages::STAGES;
use crate::stages::discover::{RestartRequest, Restarted, Restarter};
use crate::template::StageError;
use crate::template::codec::{Codec, CodecError, Decoder, Encoder};
use crate::template::produce::{self, AckProducer};

/// Whether a replay from discover is allowed: discover hands a video
/// command's generation on to the video it finds (a source's videos start
/// at 1), so the later stages run as the new generation. The replayed
/// command reuses the original claiming command's id, so discovery's
/// duplicate check lets it through.
const DISCOVER_REPLAYABLE: bool = true;

/// How long the topic may stay silent before reading it gives up.
const READ_IDLE: Duration = Duration::from_secs(30);
/// How long one metadata or offset request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a replay could not be planned or sent.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A stage name that does not exist.
    #[error("unknown stage {0:?}; the stages are: {list}", list = STAGES.join(", "))]
    UnknownStage(String),
    /// The request itself is wrong (no selection, a bad time).
    #[error("{0}")]
    Usage(String),
    /// What was asked cannot be done (yet), whatever the data.
    #[error("{0}")]
    Unsupported(String),
    /// Video ids that no video has.
    #[error("unknown video id(s): {} (see `vidpipe status`)", .0.join(", "))]
    UnknownVideos(Vec<String>),
    /// Chosen videos with no input record anywhere, with the reason.
    #[error("cannot replay: {}", .0.iter().map(|(id, why)| format!("{id}: {why}")).collect::<Vec<_>>().join("; "))]
    NotReplayable(Vec<(String, String)>),
    /// The stage's input topic does not exist.
    #[error("topic {0} does not exist; `vidpipe run` creates the pipeline's topics")]
    MissingTopic(String),
    /// Kafka is unreachable or refused.
    #[error("Kafka at {brokers}: {message}")]
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// What failed.
        message: String,
    },
    /// The schema registry is unreachable or refused.
    #[error("schema registry: {0}")]
    Registry(String),
    /// PostgreSQL is unreachable or refused.
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    /// Another handler of the same restart command got there first.
    #[error("{0}")]
    InProgress(String),
    /// The time range holds more videos than one request may replay.
    #[error(
        "the time range holds more than {0} videos, the most one request replays: narrow it \
         (since, until), or replay with `vidpipe replay`, which has no such bound"
    )]
    TooMany(usize),
}

impl ReplayError {
    /// Whether the same request can never succeed as it is (as opposed to
    /// a service that is unreachable now).
    pub fn is_permanent(&self) -> bool {
        match self {
            ReplayError::UnknownStage(_)
            | ReplayError::Usage(_)
            | ReplayError::Unsupported(_)
            | ReplayError::UnknownVideos(_)
            | ReplayError::NotReplayable(_)
            | ReplayError::TooMany(_)
            | ReplayError::MissingTopic(_) => true,
            ReplayError::Kafka { .. }
            | ReplayError::Registry(_)
            | ReplayError::Database(_)
            | ReplayError::InProgress(_) => false,
        }
    }

    /// A short machine-readable kind, for a stage error's class.
    fn kind(&self) -> &'static str {
        match self {
            ReplayError::UnknownStage(_) => "unknown_stage",
            ReplayError::Usage(_) | ReplayError::Unsupported(_) => "bad_restart",
            ReplayError::UnknownVideos(_) => "unknown_video",
            ReplayError::NotReplayable(_) => "no_input",
            ReplayError::TooMany(_) => "too_many",
            ReplayError::MissingTopic(_) => "missing_topic",
            ReplayError::Kafka { .. } => "kafka",
            ReplayError::Registry(_) => "schema_registry",
            ReplayError::Database(_) => "database",
            ReplayError::InProgress(_) => "in_progress",
        }
    }
}

fn kafka(config: &Config, e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Kafka {
        brokers: config.kafka_brokers.clone(),
        message: e.to_string(),
    }
}

fn codec_error(e: CodecError) -> ReplayError {
    ReplayError::Registry(e.to_string())
}

/// Which videos to replay, from which stage.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// The stage to re-feed.
    pub stage: String,
    /// These videos (all with input in the time range when empty).
    pub videos: Vec<String>,
    /// Input records from this time on.
    pub since: Option<DateTime<Utc>>,
    /// Input records before this time.
    pub until: Option<DateTime<Utc>>,
    /// The most videos a time range may hold: more is refused before
    /// anything is decoded or sent (none: no bound, as on the command line).
    pub max_videos: Option<usize>,
}

/// Where a replayed record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The stage's input topic.
    Topic,
    /// The previous stage's status row (or, for discover, the video's URL).
    Database,
}

impl Source {
    /// `topic` or `database`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Topic => "topic",
            Source::Database => "database",
        }
    }
}

/// A stage's input record, whichever its type.
#[derive(Debug, Clone)]
enum Input {
    Command(Command),
    Discovered(VideoDiscovered),
    Downloaded(VideoDownloaded),
    Audio(AudioExtracted),
    Transcribed(VideoTranscribed),
}

impl Input {
    fn meta_mut(&mut self) -> &mut Meta {
        match self {
            Input::Command(r) => &mut r.meta,
            Input::Discovered(r) => &mut r.meta,
            Input::Downloaded(r) => &mut r.meta,
            Input::Audio(r) => &mut r.meta,
            Input::Transcribed(r) => &mut r.meta,
        }
    }

    fn meta(&self) -> &Meta {
        match self {
            Input::Command(r) => r.meta(),
            Input::Discovered(r) => r.meta(),
            Input::Downloaded(r) => r.meta(),
            Input::Audio(r) => r.meta(),
            Input::Transcribed(r) => r.meta(),
        }
    }

    fn encode(&self, encoder: &Encoder) -> Result<Vec<u8>, CodecError> {
        match self {
            Input::Command(r) => encoder.encode(r),
            Input::Discovered(r) => encoder.encode(r),
            Input::Downloaded(r) => encoder.encode(r),
            Input::Audio(r) => encoder.encode(r),
            Input::Transcribed(r) => encoder.encode(r),
        }
    }
}

/// The stages that can be re-fed, with what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Discover,
    Download,
    ExtractAudio,
    Transcribe,
    Summarize,
}

impl Kind {
    fn parse(stage: &str) -> Result<Self, ReplayError> {
        Ok(match stage {
            "discover" => Kind::Discover,
            "download" => Kind::Download,
            "extract-audio" => Kind::ExtractAudio,
            "transcribe" => Kind::Transcribe,
            "summarize" => Kind::Summarize,
            other => return Err(ReplayError::UnknownStage(other.to_string())),
        })
    }

    /// The Avro schema of the stage's input.
    fn schema(self) -> &'static str {
        match self {
            Kind::Discover => Command::SCHEMA,
            Kind::Download => VideoDiscovered::SCHEMA,
            Kind::ExtractAudio => VideoDownloaded::SCHEMA,
            Kind::Transcribe => AudioExtracted::SCHEMA,
            Kind::Summarize => VideoTranscribed::SCHEMA,
        }
    }

    /// The stage whose output this stage reads.
    fn previous(self) -> Option<&'static str> {
        match self {
            Kind::Discover => None,
            Kind::Download => Some("discover"),
            Kind::ExtractAudio => Some("download"),
            Kind::Transcribe => Some("extract-audio"),
            Kind::Summarize => Some("transcribe"),
        }
    }

    async fn decode(self, decoder: &Decoder, bytes: &[u8]) -> Result<Input, CodecError> {
        Ok(match self {
            Kind::Discover => Input::Command(decoder.decode(bytes).await?),
            Kind::Download => Input::Discovered(decoder.decode(bytes).await?),
            Kind::ExtractAudio => Input::Downloaded(decoder.decode(bytes).await?),
            Kind::Transcribe => Input::Audio(decoder.decode(bytes).await?),
            Kind::Summarize => Input::Transcribed(decoder.decode(bytes).await?),
        })
    }

    /// A record kept on a status row (its JSON form).
    fn read_stored(self, value: serde_json::Value) -> Result<Input, serde_json::Error> {
        Ok(match self {
            Kind::Discover => Input::Command(serde_json::from_value(value)?),
            Kind::Download => Input::Discovered(serde_json::from_value(value)?),
            Kind::ExtractAudio => Input::Downloaded(serde_json::from_value(value)?),
            Kind::Transcribe => Input::Audio(serde_json::from_value(value)?),
            Kind::Summarize => Input::Transcribed(serde_json::from_value(value)?),
        })
    }
}

/// One video a replay re-feeds.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// Video id.
    pub video_id: String,
    /// Its current generation.
    pub from_generation: i64,
    /// The generation it is replayed as (for a dry run, the one it would
    /// get; a concurrent replay of the same video may take it first).
    pub to_generation: i64,
    /// Where the input record came from.
    pub source: Source,
    #[serde(skip)]
    record: Input,
}

/// What a replay would send.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The stage re-fed.
    pub stage: String,
    /// Its input topic.
    pub topic: String,
    /// The videos, in id order.
    pub items: Vec<Planned>,
}

/// One video that was replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Video id.
    pub video_id: String,
    /// The generation it had.
    pub from_generation: i64,
    /// The generation it now runs as. Named as in a dry run's plan and in
    /// the API's answer, so `--json` output has one shape.
    #[serde(rename = "to_generation")]
    pub generation: i64,
    /// Where the input record came from.
    pub source: Source,
}

/// Parses a `--since`/`--until` time: RFC 3339 (`2026-11-02T10:00:00Z`),
/// a UTC date (`2026-11-02`) or date and time (`2026-11-02 10:00`), or an
/// age (`90s`, `30m`, `2h`, `7d`: that long before `now`).
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ReplayError> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    let age = s
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .and_then(|i| {
            let (n, unit) = s.split_at(i);
            let n: i64 = n.parse().ok()?;
            let secs = match unit {
                "s" => n,
                "m" => n.checked_mul(60)?,
                "h" => n.checked_mul(3600)?,
                "d" => n.checked_mul(86_400)?,
                _ => return None,
            };
            now.checked_sub_signed(chrono::TimeDelta::try_seconds(secs)?)
        });
    age.ok_or_else(|| {
        ReplayError::Usage(format!(
            "cannot read the time {s:?}: give RFC 3339 (2026-11-02T10:00:00Z), a UTC date \
             (2026-11-02), a date and time (2026-11-02 10:00), or an age (30m, 2h, 7d)"
        ))
    })
}

/// A video's row, as a replay needs it.
#[derive(Debug, sqlx::FromRow)]
struct VideoRow {
    id: String,
    url: String,
    /// The highest generation of the video's row and its stage runs.
    generation: i64,
}

/// The latest input record of one video on the topic.
struct Raw {
    payload: Vec<u8>,
    timestamp: i64,
    partition: i32,
    offset: i64,
}

/// A reader of `topic` and its partitions; fails when the topic does not
/// exist. Blocking.
fn open_topic(
    config: &Config,
    topic: &str,
) -> Result<(BaseConsumer<QuietEof>, Vec<i32>), ReplayError> {
    let consumer: BaseConsumer<QuietEof> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        // Never joins or commits: the group id only satisfies the client.
        .set("group.id", format!("{}replay-reader", config.topic_prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(QuietEof)
        .map_err(|e| kafka(config, e))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| kafka(config, e))?;
    let missing = || ReplayError::MissingTopic(topic.to_string());
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(missing)?;
    match t.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Err(missing()),
        Some(code) => return Err(kafka(config, format!("metadata of {topic}: {code}"))),
    }
    let partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    Ok((consumer, partitions))
}

/// Whose records [`read_latest`] keeps.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// Only these videos'.
    Named(&'a HashSet<String>),
    /// Every key's, failing with [`ReplayError::TooMany`] past `max` keys.
    Any { max: Option<usize> },
}

/// Reads `topic` between `since` and `until` (ms since the epoch) with
/// read_committed and keeps the latest record of each key (of those `keys`
/// names). Blocking.
fn read_latest(
    config: &Config,
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    partitions: &[i32],
    since: Option<i64>,
    until: Option<i64>,
    keys: Keys<'_>,
) -> Result<HashMap<String, Raw>, ReplayError> {
    // The range of each partition: [first offset at `since`, first offset
    // at `until`), both found by record timestamp.
    let at = |ms: i64| -> Result<HashMap<i32, Option<i64>>, ReplayError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition_offset(topic, *p, Offset::Offset(ms))
                .map_err(|e| kafka(config, e))?;
        }
        let found = consumer
            .offsets_for_times(tpl, TIMEOUT)
            .map_err(|e| kafka(config, e))?;
        Ok(partitions
            .iter()
            .map(|p| {
                let offset = found
                    .find_partition(topic, *p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        // No record at or after the time: the range ends
                        // at the partition's end.
                        _ => None,
                    });
                (*p, offset)
            })
            .collect())
    };
    let starts = since.map(at).transpose()?;
    let ends = until.map(at).transpose()?;
    let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, TIMEOUT)
            .map_err(|e| kafka(config, e))?;
        let start = match &starts {
            Some(s) => s.get(p).copied().flatten().unwrap_or(high),
            None => low,
        }
        .max(low);
        let end = match &ends {
            Some(e) => e.get(p).copied().flatten().unwrap_or(high),
            None => high,
        }
        .min(high);
        if start < end {
            ranges.insert(*p, (start, end));
        }
    }
    let mut latest: HashMap<String, Raw> = HashMap::new();
    if ranges.is_empty() {
        return Ok(latest);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, (start, _)) in &ranges {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*start))
            .map_err(|e| kafka(config, e))?;
    }
    consumer.assign(&tpl).map_err(|e| kafka(config, e))?;
    let mut open: HashSet<i32> = ranges.keys().copied().collect();
    let mut heard = Instant::now();
    while !open.is_empty() {
        if heard.elapsed() > READ_IDLE {
            return Err(kafka(
                config,
                format!("reading {topic}: nothing arrived for {READ_IDLE:?}"),
            ));
        }
        let Some(next) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        heard = Instant::now();
        let message = match next {
            Ok(m) => m,
            // The end of what is committed (a partition's end, or the last
            // stable offset under an open transaction).
            Err(KafkaError::PartitionEOF(p)) => {
                open.remove(&p);
                continue;
            }
            Err(e) => return Err(kafka(config, format!("reading {topic}: {e}"))),
        };
        let p = message.partition();
        let Some((_, end)) = ranges.get(&p) else {
            continue;
        };
        if message.offset() >= *end {
            open.remove(&p);
            continue;
        }
        if message.offset() + 1 >= *end {
            open.remove(&p);
        }
        let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            continue;
        };
        let max_keys = match keys {
            Keys::Named(named) if !named.contains(key) => continue,
            Keys::Named(_) => None,
            Keys::Any { max } => max,
        };
        let timestamp = message.timestamp().to_millis().unwrap_or(0);
        // Within a partition the later offset is the later record; across
        // partitions (a topic that gained partitions moves keys), the
        // later timestamp.
        let newer = latest.get(key).is_none_or(|old| {
            if old.partition == p {
                message.offset() > old.offset
            } else {
                timestamp >= old.timestamp
            }
        });
        if newer {
            // Stop reading once there are too many: the range is refused
            // and what was read is not kept in memory.
            if let Some(max) = max_keys
                && latest.len() >= max
                && !latest.contains_key(key)
            {
                return Err(ReplayError::TooMany(max));
            }
            latest.insert(
                key.to_string(),
                Raw {
                    payload: message.payload().unwrap_or_default().to_vec(),
                    timestamp,
                    partition: p,
                    offset: message.offset(),
                },
            );
        }
    }
    Ok(latest)
}

/// The videos with these ids (all of them must exist), with their highest
/// generation.
async fn videos_by_id(pool: &PgPool, ids: &[String]) -> Result<Vec<VideoRow>, ReplayError> {
    let rows: Vec<VideoRow> = sqlx::query_as(
        "SELECT v.id, v.url,
                GREATEST(v.generation, COALESCE(max(r.generation), 0)) AS generation
         FROM videos v LEFT JOIN stage_runs r ON r.video_id = v.id
         WHERE v.id = ANY($1)
         GROUP BY v.id, v.url, v.generation
         ORDER BY v.id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Videos whose input for `kind` was produced in the time range according
/// to the database (for records the topic no longer holds).
async fn db_candidates(
    pool: &PgPool,
    kind: Kind,
    since: i64,
    until: Option<i64>,
    limit: Option<usize>,
) -> Result<Vec<String>, ReplayError> {
    // LIMIT NULL is no limit.
    let limit = limit.map(|n| n as i64);
    let since = DateTime::from_timestamp_millis(since).unwrap_or_default();
    let until = until.and_then(DateTime::from_timestamp_millis);
    let ids: Vec<String> = match kind.previous() {
        None => {
            sqlx::query_scalar(
                "SELECT id FROM videos WHERE created_at >= $1 AND ($2::timestamptz IS NULL OR created_at < $2)
                 LIMIT $3",
            )
            .bind(since)
            .bind(until)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        Some(previous) => {
            // A video found in a feed was discovered under the feed's run:
            // its discovery time is in the catalog. Generation 0 is a
            // restart command's own discover run, which hands nothing on.
            sqlx::query_scalar(
                "SELECT r.video_id FROM stage_runs r JOIN videos v ON v.id = r.video_id
                 WHERE r.stage = $1 AND r.status = 'done' AND r.generation > 0
                   AND r.finished_at >= $2 AND ($3::timestamptz IS NULL OR r.finished_at < $3)
                 UNION
                 SELECT d.video_id FROM discovered d JOIN videos v ON v.id = d.video_id
                 WHERE $1 = 'discover'
                   AND d.discovered_at >= $2 AND ($3::timestamptz IS NULL OR d.discovered_at < $3)
                 LIMIT $4",
            )
            .bind(previous)
            .bind(since)
            .bind(until)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    Ok(ids)
}

/// The input record of `kind` for one video, from the database.
async fn from_database(
    pool: &PgPool,
    kind: Kind,
    video: &VideoRow,
) -> Result<Result<Input, String>, ReplayError> {
    let catalog: Option<(String, Option<String>, Option<String>, String)> = sqlx::query_as(
        "SELECT url, title, source_url, claimed_by FROM discovered WHERE video_id = $1",
    )
    .bind(&video.id)
    .fetch_optional(pool)
    .await?;
    let Some(previous) = kind.previous() else {
        // Discover: a new command for the video's URL. It reuses the id of
        // the command that first claimed the video, so that discovery's
        // dedupe takes it for a retry of that command, not a duplicate.
        let (url, claimant) = match catalog {
            Some((url, _, _, claimed_by)) => (url, claimed_by),
            None => (video.url.clone(), uuid::Uuid::new_v4().to_string()),
        };
        if url.is_empty() {
            return Ok(Err("the video has no URL on record".into()));
        }
        return Ok(Ok(Input::Command(Command {
            meta: Meta::new(&video.id),
            command_id: claimant,
            url: Some(url),
            start_stage: Some("discover".into()),
            requested_by: Some("vidpipe replay".into()),
            options: HashMap::new(),
            submitted_at: now_ms(),
        })));
    };
    let stored: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT output->'records'->0 FROM stage_runs
         WHERE video_id = $1 AND stage = $2 AND status = 'done'
           AND jsonb_typeof(output->'records'->0) = 'object'
         ORDER BY generation DESC LIMIT 1",
    )
    .bind(&video.id)
    .bind(previous)
    .fetch_optional(pool)
    .await?;
    if let Some(value) = stored {
        return Ok(kind
            .read_stored(value)
            .map_err(|e| format!("the {previous} run's stored record does not parse: {e}")));
    }
    // A video found in a feed: its discovery ran under the feed's id, and
    // the catalog keeps what it found.
    if let (Kind::Download, Some((url, title, source_url, _))) = (kind, catalog) {
        return Ok(Ok(Input::Discovered(VideoDiscovered {
            meta: Meta::new(&video.id),
            url,
            title,
            source_url,
            published_at: None,
        })));
    }
    Ok(Err(format!(
        "no input record: none on the topic in the range, and no finished {previous} run"
    )))
}

/// Works out what a replay sends, reading the topic and the database but
/// changing nothing.
pub async fn plan(config: &Config, pool: &PgPool, sel: &Selection) -> Result<Plan, ReplayError> {
    let kind = Kind::parse(&sel.stage)?;
    let topic = admin::input_topic(config, &sel.stage)
        .map_err(|_| ReplayError::UnknownStage(sel.stage.clone()))?;
    if sel.videos.is_empty() && sel.since.is_none() {
        return Err(ReplayError::Usage(
            "choose what to replay: --video ID (repeatable), or a time range with --since \
             (and --until), e.g. --since 2h"
                .into(),
        ));
    }
    if let (Some(since), Some(until)) = (sel.since, sel.until)
        && since >= until
    {
        return Err(ReplayError::Usage(format!(
            "--since ({since}) must be before --until ({until})"
        )));
    }
    let since = sel.since.map(|t| t.timestamp_millis());
    let until = sel.until.map(|t| t.timestamp_millis());

    // Named videos must all exist.
    let named: HashSet<String> = sel.videos.iter().cloned().collect();
    if !named.is_empty() {
        let ids: Vec<String> = named.iter().cloned().collect();
        let rows = videos_by_id(pool, &ids).await?;
        let mut unknown: Vec<String> = named
            .iter()
            .filter(|id| !rows.iter().any(|r| &r.id == *id))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ReplayError::UnknownVideos(unknown));
        }
    }

    // The topic's records in the range (discover's input is rebuilt, never
    // read: a command names a URL, which the database keeps).
    let on_topic: HashMap<String, Raw> = {
        let config = config.clone();
        let topic = topic.clone();
        let named = named.clone();
        let max = sel.max_videos;
        let read_topic = kind != Kind::Discover;
        let brokers = config.kafka_brokers.clone();
        tokio::task::spawn_blocking(move || {
            let (consumer, partitions) = open_topic(&config, &topic)?;
            if read_topic {
                read_latest(
                    &config,
                    &consumer,
                    &topic,
                    &partitions,
                    since,
                    until,
                    if named.is_empty() {
                        Keys::Any { max }
                    } else {
                        Keys::Named(&named)
                    },
                )
            } else {
                Ok(HashMap::new())
            }
        })
        .await
        .map_err(|e| ReplayError::Kafka {
            brokers,
            message: format!("the reading task did not finish: {e}"),
        })??
    };

    // The chosen videos: those named, or every video with input in range
    // on the topic or, for expired records, in the database.
    let mut chosen: HashSet<String> = named.clone();
    if named.is_empty() {
        chosen.extend(on_topic.keys().cloned());
        if let Some(since) = since {
            // One more than the bound is enough to know it is passed.
            let limit = sel.max_videos.map(|m| m + 1);
            chosen.extend(db_candidates(pool, kind, since, until, limit).await?);
        }
        if let Some(max) = sel.max_videos
            && chosen.len() > max
        {
            return Err(ReplayError::TooMany(max));
        }
    }
    let ids: Vec<String> = chosen.into_iter().collect();
    // Keys on the topic without a video row (a feed's commands) are not
    // videos: they drop out here.
    let rows = videos_by_id(pool, &ids).await?;

    let codec = Codec::new(config.schema_registry_url.as_deref()).map_err(codec_error)?;
    let decoder = codec.decoder(kind.schema()).map_err(codec_error)?;
    let mut items = Vec::with_capacity(rows.len());
    let mut unreplayable = Vec::new();
    for video in rows {
        let mut found = None;
        if let Some(raw) = on_topic.get(&video.id) {
            match kind.decode(&decoder, &raw.payload).await {
                Ok(record) => found = Some((record, Source::Topic)),
                Err(e) if e.is_retryable() => return Err(codec_error(e)),
                Err(e) => tracing::warn!(
                    video_id = video.id, partition = raw.partition, offset = raw.offset,
                    error = %e, "the latest input record does not decode; trying the database"
                ),
            }
        }
        if found.is_none() {
            match from_database(pool, kind, &video).await? {
                Ok(record) => found = Some((record, Source::Database)),
                Err(why) => {
                    unreplayable.push((video.id.clone(), why));
                    continue;
                }
            }
        }
        if let Some((mut record, source)) = found {
            // A replay is a new run: its own generation and trace.
            let meta = record.meta_mut();
            meta.video_id = video.id.clone();
            meta.generation = video.generation + 1;
            meta.trace_id = uuid::Uuid::new_v4().simple().to_string();
            items.push(Planned {
                video_id: video.id,
                from_generation: video.generation,
                to_generation: video.generation + 1,
                source,
                record,
            });
        }
    }
    // A named video that cannot be replayed fails the whole request (before
    // anything is sent); in a range, such a video is only reported.
    if !unreplayable.is_empty() {
        if !named.is_empty() {
            unreplayable.sort();
            return Err(ReplayError::NotReplayable(unreplayable));
        }
        for (id, why) in &unreplayable {
            tracing::warn!(video_id = id, reason = why, "skipped: cannot replay");
        }
    }
    items.sort_by(|a, b| a.video_id.cmp(&b.video_id));
    Ok(Plan {
        stage: sel.stage.clone(),
        topic,
        items,
    })
}

/// A video's row moved to the next generation, and what it held before
/// (to put back if the record cannot be sent).
#[derive(sqlx::FromRow)]
struct Bumped {
    generation: i64,
    old_generation: i64,
    old_status: String,
    old_stage: Option<String>,
    old_error: Option<String>,
}

/// Atomically moves a video's row to `queued` at `stage`, at the
/// generation after everything the video has (another replay may have
/// taken the planned one); `None` when there is no such video.
async fn bump<'e>(
    db: impl sqlx::PgExecutor<'e>,
    video_id: &str,
    stage: &str,
) -> Result<Option<Bumped>, sqlx::Error> {
    sqlx::query_as(
        "WITH old AS (
           SELECT id, generation, status, stage, error FROM videos WHERE id = $1 FOR UPDATE
         ), top AS (
           SELECT COALESCE(max(generation), 0) AS g FROM stage_runs WHERE video_id = $1
         )
         UPDATE videos v
           SET generation = GREATEST(old.generation, top.g) + 1, status = 'queued',
               stage = $2, error = NULL, updated_at = now()
         FROM old, top WHERE v.id = old.id
         RETURNING v.generation, old.generation AS old_generation, old.status AS old_status,
                   old.stage AS old_stage, old.error AS old_error",
    )
    .bind(video_id)
    .bind(stage)
    .fetch_optional(db)
    .await
}

/// Puts a video's row back after its record could not be sent, unless a
/// stage has moved it on meanwhile.
async fn restore(pool: &PgPool, video_id: &str, bumped: &Bumped) {
    let restored = sqlx::query(
        "UPDATE videos SET generation = $2, status = $3, stage = $4, error = $5,
           updated_at = now()
         WHERE id = $1 AND generation = $6 AND status = 'queued'",
    )
    .bind(video_id)
    .bind(bumped.old_generation)
    .bind(&bumped.old_status)
    .bind(&bumped.old_stage)
    .bind(&bumped.old_error)
    .bind(bumped.generation)
    .execute(pool)
    .await;
    if let Err(db) = restored {
        tracing::error!(video_id, error = %db,
                        "cannot put the video's row back after a failed replay");
    }
}

/// What a re-fed record says about itself in its headers, besides its
/// generation.
struct Provenance<'a> {
    from_generation: i64,
    source: Source,
    /// The restart command it carries out, if any.
    command_id: Option<&'a str>,
}

/// Produces re-fed records: one idempotent producer, and one encoder per
/// input topic (its schema registered on first use).
struct Feeder {
    config: Config,
    producer: AckProducer,
    codec: Arc<Codec>,
    encoders: tokio::sync::Mutex<HashMap<String, Encoder>>,
}

impl Feeder {
    fn new(config: &Config, codec: Arc<Codec>) -> Result<Self, ReplayError> {
        let producer = AckProducer::new(&produce::idempotent(
            &config.kafka_brokers,
            Duration::from_secs(15),
        ))
        .map_err(|e| kafka(config, e))?;
        Ok(Self {
            config: config.clone(),
            producer,
            codec,
            encoders: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    async fn encoder(&self, topic: &str, kind: Kind) -> Result<Encoder, ReplayError> {
        let mut encoders = self.encoders.lock().await;
        if let Some(e) = encoders.get(topic) {
            return Ok(e.clone());
        }
        let e = self
            .codec
            .encoder(topic, kind.schema())
            .await
            .map_err(codec_error)?;
        encoders.insert(topic.to_string(), e.clone());
        Ok(e)
    }

    /// Sends `record` to `topic`, keyed by its video id, and waits for
    /// Kafka's acknowledgement.
    async fn feed(
        &self,
        topic: &str,
        kind: Kind,
        record: &Input,
        provenance: &Provenance<'_>,
    ) -> Result<(), ReplayError> {
        let encoder = self.encoder(topic, kind).await?;
        let video_id = &record.meta().video_id;
        let payload = record.encode(&encoder).map_err(|e| {
            if e.is_retryable() {
                codec_error(e)
            } else {
                ReplayError::NotReplayable(vec![(
                    video_id.clone(),
                    format!("its input record does not encode: {e}"),
                )])
            }
        })?;
        let generation = record.meta().generation.to_string();
        let from_generation = provenance.from_generation.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "vidpipe.generation",
                value: Some(&generation),
            })
            .insert(Header {
                key: "vidpipe.replay.from-generation",
                value: Some(&from_generation),
            })
            .insert(Header {
                key: "vidpipe.replay.source",
                value: Some(provenance.source.as_str()),
            });
        if let Some(id) = provenance.command_id {
            headers = headers.insert(Header {
                key: "vidpipe.command_id",
                value: Some(id),
            });
        }
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(video_id)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(15),
            )
            .await
            .map(|_| ())
            .map_err(|e| kafka(&self.config, e))
    }
}

/// Sends a plan: per video, moves its row to `queued` at the next
/// generation and produces its record; stops at the first failure, with
/// that video's row put back. When `stop` fires, the video under way is
/// finished and the rest are left as they are (`Sent::left`): a video is
/// never left queued without its record on the way.
pub async fn send(
    config: &Config,
    pool: &PgPool,
    plan: Plan,
    stop: &CancellationToken,
) -> Result<Sent, ReplayError> {
    if plan.stage == "discover" && !DISCOVER_REPLAYABLE {
        return Err(ReplayError::Unsupported(
            "a replay from discover is not available yet: discovery hands every video on as \
             generation 1, so the later stages would overwrite the first run's results; \
             replay from download instead (it starts from the same URL)"
                .into(),
        ));
    }
    let kind = Kind::parse(&plan.stage)?;
    let codec = Codec::new(config.schema_registry_url.as_deref()).map_err(codec_error)?;
    let feeder = Feeder::new(config, codec)?;
    // The schema is registered before any row moves: a registry that
    // refuses it fails the replay with nothing changed.
    feeder.encoder(&plan.topic, kind).await?;
    let mut done = Vec::with_capacity(plan.items.len());
    let total = plan.items.len();
    for item in plan.items {
        if stop.is_cancelled() {
            break;
        }
        let mut record = item.record;
        let Some(bumped) = bump(pool, &item.video_id, &plan.stage).await? else {
            return Err(ReplayError::UnknownVideos(vec![item.video_id]));
        };
        let generation = bumped.generation;
        record.meta_mut().generation = generation;
        // What the video had, whatever the plan saw.
        let from_generation = generation - 1;
        let provenance = Provenance {
            from_generation,
            source: item.source,
            command_id: None,
        };
        if let Err(e) = feeder.feed(&plan.topic, kind, &record, &provenance).await {
            // Nothing was sent for this video.
            restore(pool, &item.video_id, &bumped).await;
            return Err(e);
        }
        done.push(Replayed {
            video_id: item.video_id,
            from_generation,
            generation,
            source: item.source,
        });
    }
    Ok(Sent {
        left: total - done.len(),
        replayed: done,
    })
}

/// What [`send`] did.
#[derive(Debug)]
pub struct Sent {
    /// The videos replayed, in the plan's order.
    pub replayed: Vec<Replayed>,
    /// The videos of the plan not touched because `stop` fired.
    pub left: usize,
}

/// The input record of one video for a restart: from the database (the
/// previous stage's status row) when it has one, else as `vidpipe replay`
/// finds it (the topic first).
async fn plan_restart(
    config: &Config,
    pool: &PgPool,
    kind: Kind,
    stage: &str,
    video_id: &str,
) -> Result<Planned, ReplayError> {
    let Some(video) = videos_by_id(pool, &[video_id.to_string()])
        .await?
        .into_iter()
        .next()
    else {
        return Err(ReplayError::UnknownVideos(vec![video_id.to_string()]));
    };
    let mut record = match from_database(pool, kind, &video).await? {
        Ok(record) => record,
        Err(_) => {
            let selection = Selection {
                stage: stage.to_string(),
                videos: vec![video_id.to_string()],
                ..Selection::default()
            };
            return plan(config, pool, &selection)
                .await?
                .items
                .into_iter()
                .next()
                .ok_or_else(|| {
                    ReplayError::NotReplayable(vec![(video.id, "no input record".into())])
                });
        }
    };
    record.meta_mut().video_id = video.id.clone();
    Ok(Planned {
        video_id: video.id,
        from_generation: video.generation,
        to_generation: video.generation + 1,
        source: Source::Database,
        record,
    })
}

/// A restart command's row in `restarts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RestartRecord {
    /// The command's id.
    pub command_id: String,
    /// The video it restarts.
    pub video_id: String,
    /// The stage it restarts at.
    pub stage: String,
    /// `pending` (the video moved to its new generation, the record not yet
    /// acknowledged by Kafka), `sent` or `failed`.
    pub status: String,
    /// The generation the command moved the video to.
    pub generation: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The row of restart command `command_id`, once discovery has handled it.
pub async fn restart_record(
    pool: &PgPool,
    command_id: &str,
) -> Result<Option<RestartRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT command_id, video_id, stage, status, generation, error FROM restarts
         WHERE command_id = $1",
    )
    .bind(db_text(command_id))
    .fetch_optional(pool)
    .await
}

/// PostgreSQL text holds no NUL; command ids and video ids come from
/// outside.
fn db_text(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// What became of one restart command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RestartOutcome {
    /// The video runs again from the stage as a new generation.
    Sent(Replayed),
    /// The command had been carried out before: nothing changed.
    Repeat {
        /// Video id.
        video_id: String,
        /// The generation that command moved the video to.
        generation: i64,
    },
}

/// Carries out restart commands for discovery: the replay of one video
/// from a stage, once per command id (see the module docs).
pub struct Restarts {
    config: Config,
    pool: PgPool,
    feeder: Feeder,
}

impl Restarts {
    /// Restarts on a migrated database; contacts nothing yet.
    pub fn new(config: &Config, pool: PgPool, codec: Arc<Codec>) -> Result<Self, ReplayError> {
        Ok(Self {
            config: config.clone(),
            pool,
            feeder: Feeder::new(config, codec)?,
        })
    }

    /// Runs `video_id` again from `stage` as a new generation, unless the
    /// command `command_id` did so before. A permanent failure (an unknown
    /// video, no input record for the stage) is recorded as the command's
    /// row before it is returned.
    pub async fn handle(
        &self,
        command_id: &str,
        video_id: &str,
        stage: &str,
        trace_id: &str,
    ) -> Result<RestartOutcome, ReplayError> {
        let result = self.carry_out(command_id, video_id, stage, trace_id).await;
        if let Err(e) = &result
            && e.is_permanent()
        {
            sqlx::query(
                "INSERT INTO restarts (command_id, video_id, stage, status, error)
                 VALUES ($1, $2, $3, 'failed', $4)
                 ON CONFLICT (command_id) DO UPDATE
                   SET status = 'failed', error = EXCLUDED.error, updated_at = now()
                 WHERE restarts.status <> 'sent'",
            )
            .bind(db_text(command_id))
            .bind(db_text(video_id))
            .bind(db_text(stage))
            .bind(db_text(&e.to_string()))
            .execute(&self.pool)
            .await?;
        }
        result
    }

    async fn carry_out(
        &self,
        command_id: &str,
        video_id: &str,
        stage: &str,
        trace_id: &str,
    ) -> Result<RestartOutcome, ReplayError> {
        let kind = Kind::parse(stage)?;
        if kind == Kind::Discover {
            return Err(ReplayError::Unsupported(
                "a restart starts at download, extract-audio, transcribe or summarize; \
                 to discover a URL again, send a discovery command"
                    .into(),
            ));
        }
        // No video id holds a control character (ids are `yt:…` or
        // `url:<hash>`), and PostgreSQL would refuse a NUL in a query.
        if video_id.is_empty() || video_id.chars().any(char::is_control) {
            return Err(ReplayError::UnknownVideos(vec![
                video_id.escape_debug().to_string(),
            ]));
        }
        let topic = admin::input_topic(&self.config, stage)
            .map_err(|_| ReplayError::UnknownStage(stage.to_string()))?;
        let command_key = db_text(command_id);
        // A second look finds a concurrent handler of the same command
        // that committed first.
        for _ in 0..2 {
            match restart_record(&self.pool, command_id).await? {
                Some(r) if r.status == "sent" => {
                    return Ok(RestartOutcome::Repeat {
                        video_id: r.video_id,
                        generation: r.generation.unwrap_or_default(),
                    });
                }
                Some(RestartRecord {
                    status,
                    generation: Some(generation),
                    ..
                }) if status == "pending" => {
                    // Interrupted after the video moved on: Kafka may or
                    // may not have the record, and sending it again under
                    // the same generation is harmless (stages are
                    // idempotent per generation).
                    tracing::info!(
                        command_id,
                        video_id,
                        generation,
                        "restart command seen before: sending its record again"
                    );
                    let item =
                        plan_restart(&self.config, &self.pool, kind, stage, video_id).await?;
                    return self
                        .feed(item, &topic, kind, generation, command_id, trace_id)
                        .await;
                }
                _ => {}
            }
            let item = plan_restart(&self.config, &self.pool, kind, stage, video_id).await?;
            let mut tx = self.pool.begin().await?;
            let claimed = sqlx::query(
                "INSERT INTO restarts (command_id, video_id, stage, status)
                 VALUES ($1, $2, $3, 'pending')
                 ON CONFLICT (command_id) DO UPDATE
                   SET video_id = EXCLUDED.video_id, stage = EXCLUDED.stage, status = 'pending',
                       generation = NULL, error = NULL, updated_at = now()
                 WHERE restarts.status = 'failed'",
            )
            .bind(&command_key)
            .bind(video_id)
            .bind(stage)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !claimed {
                tx.rollback().await?;
                continue;
            }
            let Some(bumped) = bump(&mut *tx, video_id, stage).await? else {
                tx.rollback().await?;
                return Err(ReplayError::UnknownVideos(vec![video_id.to_string()]));
            };
            sqlx::query(
                "UPDATE restarts SET generation = $2, updated_at = now() WHERE command_id = $1",
            )
            .bind(&command_key)
            .bind(bumped.generation)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            // From here on the command is `pending` at this generation: if
            // Kafka does not take the record, the row stays so, and the
            // runner's retry (or the command's next delivery) sends it
            // again under the same generation.
            return self
                .feed(item, &topic, kind, bumped.generation, command_id, trace_id)
                .await;
        }
        Err(ReplayError::InProgress(format!(
            "restart command {command_id:?} is being handled elsewhere"
        )))
    }

    /// Sends a restart's record as `generation` and marks the command sent.
    async fn feed(
        &self,
        item: Planned,
        topic: &str,
        kind: Kind,
        generation: i64,
        command_id: &str,
        trace_id: &str,
    ) -> Result<RestartOutcome, ReplayError> {
        let mut record = item.record;
        let meta = record.meta_mut();
        meta.generation = generation;
        // The restart follows the command's trace.
        if !trace_id.is_empty() {
            meta.trace_id = trace_id.to_string();
        }
        let provenance = Provenance {
            from_generation: generation - 1,
            source: item.source,
            command_id: Some(command_id),
        };
        self.feeder.feed(topic, kind, &record, &provenance).await?;
        sqlx::query(
            "UPDATE restarts SET status = 'sent', updated_at = now()
             WHERE command_id = $1 AND status = 'pending'",
        )
        .bind(db_text(command_id))
        .execute(&self.pool)
        .await?;
        Ok(RestartOutcome::Sent(Replayed {
            video_id: item.video_id,
            from_generation: generation - 1,
            generation,
            source: item.source,
        }))
    }
}

impl Restarter for Restarts {
    fn restart<'a>(
        &'a self,
        request: &'a RestartRequest,
    ) -> BoxFuture<'a, Result<Restarted, StageError>> {
        Box::pin(async move {
            let r = request;
            match self
                .handle(&r.command_id, &r.video_id, &r.stage, &r.trace_id)
                .await
            {
                Ok(RestartOutcome::Sent(done)) => Ok(Restarted::Started {
                    from_generation: done.from_generation,
                    generation: done.generation,
                }),
                Ok(RestartOutcome::Repeat { generation, .. }) => {
                    Ok(Restarted::Repeat { generation })
                }
                Err(e) => {
                    let message = format!("restart of {:?} at {}: {e}", r.video_id, r.stage);
                    Err(if e.is_permanent() {
                        StageError::permanent(e.kind(), message)
                    } else {
                        StageError::retryable(e.kind(), message)
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_prints_as_its_dry_run_does() {
        let done = serde_json::to_value(Replayed {
            video_id: "url:1".into(),
            from_generation: 1,
            generation: 2,
            source: Source::Topic,
        })
        .unwrap();
        assert_eq!(
            done,
            serde_json::json!({"video_id": "url:1", "from_generation": 1, "to_generation": 2, "source": "topic"})
        );
    }

    #[test]
    fn times_parse_in_every_documented_form() {
        let now = DateTime::parse_from_rfc3339("2026-11-02T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s: &str| parse_time(s, now).unwrap().to_rfc3339();
        assert_eq!(at("2026-11-01T10:30:00+01:00"), "2026-11-01T09:30:00+00:00");
        assert_eq!(at("2026-11-01"), "2026-11-01T00:00:00+00:00");
        assert_eq!(at("2026-11-01 10:30"), "2026-11-01T10:30:00+00:00");
        assert_eq!(at("2026-11-01T10:30:05"), "2026-11-01T10:30:05+00:00");
        assert_eq!(at("90s"), "2026-11-02T11:58:30+00:00");
        assert_eq!(at("2h"), "2026-11-02T10:00:00+00:00");
        assert_eq!(at("7d"), "2026-10-26T12:00:00+00:00");
        for bad in ["", "h", "2w", "yesterday", "99999999999999999999d", "-5m"] {
            assert!(
                matches!(parse_time(bad, now), Err(ReplayError::Usage(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_stage_has_an_input_schema_and_a_topic() {
        for s in STAGES {
            let kind = Kind::parse(s).unwrap();
            apache_avro::Schema::parse_str(kind.schema()).unwrap();
            assert!(admin::input_suffix(s).is_some());
        }
        assert!(matches!(
            Kind::parse("transcode"),
            Err(ReplayError::UnknownStage(_))
        ));
    }

    #[test]
    fn only_unreachable_services_are_worth_retrying() {
        let permanent = [
            ReplayError::UnknownStage("x".into()),
            ReplayError::UnknownVideos(vec!["url:x".into()]),
            ReplayError::NotReplayable(vec![("url:x".into(), "no input record".into())]),
            ReplayError::MissingTopic("t".into()),
            ReplayError::Unsupported("no".into()),
        ];
        for e in &permanent {
            assert!(e.is_permanent(), "{e}");
        }
        assert_eq!(permanent[1].kind(), "unknown_video");
        assert!(permanent[1].to_string().contains("url:x"));
        let transient = [
            ReplayError::Kafka {
                brokers: "b".into(),
                message: "down".into(),
            },
            ReplayError::Registry("down".into()),
            ReplayError::Database(sqlx::Error::PoolTimedOut),
            ReplayError::InProgress("elsewhere".into()),
        ];
        for e in &transient {
            assert!(!e.is_permanent(), "{e}");
        }
    }

    #[test]
    fn stored_records_read_back_as_the_stage_input() {
        let audio = AudioExtracted {
            meta: Meta::new("url:x"),
            audio: crate::records::Blob {
                uri: "file:///b/url%3ax/g1/audio.wav".into(),
                size: 1,
                sha256: "00".into(),
                content_type: None,
            },
            duration_ms: 1000,
            chunks: vec![],
        };
        let json = serde_json::to_value(&audio).unwrap();
        match Kind::Transcribe.read_stored(json).unwrap() {
            Input::Audio(back) => assert_eq!(back, audio),
            other => panic!("{other:?}"),
        }
        assert!(
            Kind::Summarize
                .read_stored(serde_json::json!({"meta": 1}))
                .is_err()
        );
    }
}
