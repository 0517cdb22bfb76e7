//! The API's request and response bodies, with their OpenAPI schemas.
//!
//! A video's status is the library's own `client::VideoStatus` (it derives
//! its OpenAPI schema, so the API and `vidpipe status --json` cannot
//! differ). The other library types (`admin::StageTopic`, …) carry no
//! OpenAPI derive; these mirror them field for field and are what the
//! handlers serialise, so the document describes exactly what is sent. The
//! `From` impls destructure the library types exhaustively: a field added
//! there breaks the build here until the API decides what to do with it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{admin, client, replay, store};

/// An error: what went wrong, naming the input or the service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// URLs to enqueue.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"urls": ["https://example.com/talks/opening.mp4"], "requested_by": "docs"}))]
pub struct SubmitRequest {
    /// Video, feed, channel or playlist URLs (http or https).
    #[schema(min_items = 1, max_items = 100)]
    pub urls: Vec<String>,
    /// Treat the URLs as feeds (sources) even if they do not look like one.
    #[serde(default)]
    pub feed: bool,
    /// Recorded on the command, for auditing.
    #[serde(default)]
    #[schema(max_length = 200)]
    pub requested_by: Option<String>,
}

/// What became of one submitted URL.
#[derive(Debug, Clone, Serialize, ToSchema)]
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
    /// current status (`POST /api/v1/replay` reprocesses).
    pub known: Option<String>,
}

impl From<client::Submitted> for Submitted {
    fn from(s: client::Submitted) -> Self {
        let client::Submitted {
            url,
            id,
            is_source,
            generation,
            known,
        } = s;
        Self {
            url,
            id,
            is_source,
            generation,
            known,
        }
    }
}

/// A video and its stage runs, exactly the library's type that `vidpipe
/// status --json` prints (it derives its own OpenAPI schema).
pub use crate::client::{StageStatus, VideoStatus as Video};

/// `?limit=` of the video list.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// How many videos, newest first (default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// One stage run, of any generation.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct TimelineRun {
    /// Stage name.
    pub stage: String,
    /// Generation of the run.
    pub generation: i64,
    /// `queued`, `running`, `done` or `failed`.
    pub status: String,
    /// Attempts so far.
    pub attempts: i32,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the run finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// How long the run took (when finished).
    pub duration_ms: Option<i64>,
    /// The failure's class (`permanent:<kind>`, `retries_exhausted:<kind>`).
    pub error_class: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A video and every stage run of every generation, newest generation
/// first, stages in pipeline order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Timeline {
    /// The video as it is now.
    pub video: Video,
    /// Its title, when discovery found one.
    pub title: Option<String>,
    /// Every stage run.
    pub runs: Vec<TimelineRun>,
}

/// Transcript file formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TranscriptFormat {
    /// Plain text, one segment a line.
    #[default]
    Txt,
    /// SubRip subtitles.
    Srt,
    /// WebVTT subtitles.
    Vtt,
    /// Segments with times, as JSON.
    Json,
}

impl TranscriptFormat {
    /// The file extension in the blob store.
    pub fn ext(self) -> &'static str {
        match self {
            Self::Txt => "txt",
            Self::Srt => "srt",
            Self::Vtt => "vtt",
            Self::Json => "json",
        }
    }

    /// The Content-Type it is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Txt => "text/plain; charset=utf-8",
            Self::Srt => "application/x-subrip; charset=utf-8",
            Self::Vtt => "text/vtt; charset=utf-8",
            Self::Json => "application/json",
        }
    }
}

/// Summary file formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SummaryFormat {
    /// Markdown.
    #[default]
    Md,
    /// Summary, key points and chapters as JSON.
    Json,
}

impl SummaryFormat {
    /// The file extension in the blob store.
    pub fn ext(self) -> &'static str {
        match self {
            Self::Md => "md",
            Self::Json => "json",
        }
    }

    /// The Content-Type it is served with.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Md => "text/markdown; charset=utf-8",
            Self::Json => "application/json",
        }
    }
}

/// `?format=&generation=` of a transcript.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TranscriptQuery {
    /// File format (default txt).
    #[param(inline)]
    pub format: Option<TranscriptFormat>,
    /// A generation other than the latest finished one.
    #[param(minimum = 1, maximum = 9007199254740991_i64)]
    pub generation: Option<i64>,
}

/// `?format=&generation=` of a summary.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SummaryQuery {
    /// File format (default md).
    #[param(inline)]
    pub format: Option<SummaryFormat>,
    /// A generation other than the latest finished one.
    #[param(minimum = 1, maximum = 9007199254740991_i64)]
    pub generation: Option<i64>,
}

/// A subscribed source.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Source {
    /// `src:…`, derived from the URL.
    pub id: String,
    /// Feed, channel or playlist URL.
    pub url: String,
    /// Poll interval in seconds.
    pub every_secs: i64,
    /// How many of the newest entries the first poll takes.
    pub max_backfill: i32,
    /// Polls so far.
    pub polls: i64,
}

impl From<store::catalog::Source> for Source {
    fn from(s: store::catalog::Source) -> Self {
        let store::catalog::Source {
            id,
            url,
            every_secs,
            max_backfill,
            polls,
        } = s;
        Self {
            id,
            url,
            every_secs,
            max_backfill,
            polls,
        }
    }
}

/// A subscription to add (or update: same URL, new settings).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"url": "https://example.com/podcast.xml", "every_secs": 3600, "backfill": 5}))]
pub struct SourceRequest {
    /// Feed, channel or playlist URL (http or https).
    pub url: String,
    /// Poll interval in seconds (default 3600).
    #[serde(default)]
    #[schema(minimum = 60, maximum = 31536000)]
    pub every_secs: Option<i64>,
    /// Entries the first poll takes, newest first (default: the server's
    /// `media.max_backfill`, 20 unless configured).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 500)]
    pub backfill: Option<i32>,
}

/// The stages, for a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StageName {
    /// Discover.
    Discover,
    /// Download.
    Download,
    /// Extract audio.
    ExtractAudio,
    /// Transcribe.
    Transcribe,
    /// Summarize.
    Summarize,
}

impl StageName {
    /// The stage's name in the pipeline.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Discover => "discover",
            Self::Download => "download",
            Self::ExtractAudio => "extract-audio",
            Self::Transcribe => "transcribe",
            Self::Summarize => "summarize",
        }
    }
}

/// What to replay: these videos, or every video whose input to `stage`
/// falls in the `since`/`until` range.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"stage": "transcribe", "since": "2h", "dry_run": true}))]
pub struct ReplayRequest {
    /// The stage to re-feed.
    pub stage: StageName,
    /// These videos (every video with input in the time range when empty).
    #[serde(default)]
    #[schema(max_items = 1000)]
    pub videos: Vec<String>,
    /// Input records from this time on: RFC 3339, a UTC date
    /// (2026-11-02), date and time (2026-11-02 10:00), or an age (2h, 7d).
    #[serde(default)]
    pub since: Option<String>,
    /// Input records before this time (same forms as `since`).
    #[serde(default)]
    pub until: Option<String>,
    /// Only list what would be replayed; send nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Where a replayed record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplaySource {
    /// The stage's input topic.
    Topic,
    /// The previous stage's status row (or, for discover, the video's URL).
    Database,
}

impl From<replay::Source> for ReplaySource {
    fn from(s: replay::Source) -> Self {
        match s {
            replay::Source::Topic => Self::Topic,
            replay::Source::Database => Self::Database,
        }
    }
}

/// One video of a replay.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplayItem {
    /// Video id.
    pub video_id: String,
    /// The generation it had.
    pub from_generation: i64,
    /// The generation it runs (or, for a dry run, would run) as.
    pub to_generation: i64,
    /// Where its input record came from.
    pub source: ReplaySource,
}

/// A replay's plan, and whether it was sent.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplayResponse {
    /// The stage re-fed.
    pub stage: String,
    /// Its input topic.
    pub topic: String,
    /// True when nothing was sent.
    pub dry_run: bool,
    /// The videos, in id order: those replayed (or, in a dry run, that
    /// would be).
    pub videos: Vec<ReplayItem>,
    /// Videos of the selection left as they were because the server began
    /// to shut down while sending (0 otherwise): replay them again.
    pub not_sent: usize,
}

/// One member of a stage's consumer group.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Member {
    /// The client id: `vidpipe-<stage>-<instance>` for a `vidpipe run`.
    pub client_id: String,
    /// Where it connects from.
    pub host: String,
    /// The group's member id.
    pub member_id: String,
    /// Partitions of the input topic assigned to it.
    pub partitions: Vec<i32>,
}

/// How far a stage's group is behind on one partition.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PartitionLag {
    /// Partition.
    pub partition: i32,
    /// The group's committed offset (none before its first commit).
    pub committed: Option<i64>,
    /// The partition's high watermark.
    pub high: i64,
    /// Records not yet committed.
    pub lag: i64,
}

/// Videos by the status of their run at one stage (current generations).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct StatusCounts {
    /// Waiting to start.
    pub queued: i64,
    /// Running (or waiting to retry).
    pub running: i64,
    /// Finished.
    pub done: i64,
    /// Failed for good.
    pub failed: i64,
}

impl StatusCounts {
    /// Adds `n` to the count of `status` (unknown statuses are ignored).
    pub fn add(&mut self, status: &str, n: i64) {
        match status {
            "queued" => self.queued += n,
            "running" => self.running += n,
            "done" => self.done += n,
            "failed" => self.failed += n,
            _ => {}
        }
    }
}

/// A stage: its input topic, consumer group and lag (from Kafka), and its
/// runs and throughput (from the status tables).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StageInfo {
    /// Stage name.
    pub stage: String,
    /// Its input topic.
    pub topic: String,
    /// Its consumer group.
    pub group: String,
    /// Partition count; none when the topic does not exist.
    pub partitions: Option<i64>,
    /// The group's state (`Stable`, `PreparingRebalance`, `Empty`, `Dead`).
    pub group_state: String,
    /// The group's members.
    pub members: Vec<Member>,
    /// Records not yet committed, over all partitions.
    pub lag: i64,
    /// Per partition.
    pub partition_lag: Vec<PartitionLag>,
    /// Videos by the status of their run at this stage.
    pub videos: StatusCounts,
    /// Runs of this stage that finished in the last 10 minutes.
    pub done_last_10m: i64,
    /// The same, per minute.
    pub done_per_minute: f64,
}

impl StageInfo {
    /// Kafka's view of a stage, with the status tables' numbers.
    pub fn new(t: admin::StageTopic, videos: StatusCounts, done_last_10m: i64) -> Self {
        let admin::StageTopic {
            stage,
            topic,
            group,
            partitions,
            group_state,
            members,
            lag,
            partition_lag,
        } = t;
        Self {
            stage,
            topic,
            group,
            partitions: partitions.map(|n| n as i64),
            group_state,
            members: members
                .into_iter()
                .map(|m| {
                    let admin::Member {
                        client_id,
                        host,
                        member_id,
                        partitions,
                    } = m;
                    Member {
                        client_id,
                        host,
                        member_id,
                        partitions,
                    }
                })
                .collect(),
            lag,
            partition_lag: partition_lag
                .into_iter()
                .map(|p| {
                    let admin::PartitionLag {
                        partition,
                        committed,
                        high,
                        lag,
                    } = p;
                    PartitionLag {
                        partition,
                        committed,
                        high,
                        lag,
                    }
                })
                .collect(),
            videos,
            done_last_10m,
            done_per_minute: done_last_10m as f64 / 10.0,
        }
    }
}

/// One stage on the status page: its runs (status tables) and, when Kafka
/// has answered, its input topic's partitions, lag and group members.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StageOverview {
    /// Stage name.
    pub stage: String,
    /// Videos by the status of their run at this stage.
    pub videos: StatusCounts,
    /// Runs of this stage that finished in the last 10 minutes.
    pub done_last_10m: i64,
    /// The same, per minute.
    pub done_per_minute: f64,
    /// Partition count; none when Kafka has not answered or the topic does
    /// not exist.
    pub partitions: Option<i64>,
    /// Records not yet committed; none when Kafka has not answered.
    pub lag: Option<i64>,
    /// Members of the consumer group; none when Kafka has not answered.
    pub members: Option<i64>,
}

impl StageOverview {
    /// A stage's row: the status tables' numbers, and Kafka's view when
    /// there is one.
    pub fn new(
        stage: &str,
        videos: StatusCounts,
        done_last_10m: i64,
        topic: Option<&admin::StageTopic>,
    ) -> Self {
        Self {
            stage: stage.to_string(),
            videos,
            done_last_10m,
            done_per_minute: done_last_10m as f64 / 10.0,
            partitions: topic.and_then(|t| t.partitions).map(|n| n as i64),
            lag: topic.map(|t| t.lag),
            members: topic.map(|t| t.members.len() as i64),
        }
    }
}

/// The status page's numbers, which it polls to stay current: videos by
/// status, and each stage in pipeline order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Overview {
    /// Every video by its status.
    pub videos: StatusCounts,
    /// The stages in pipeline order.
    pub stages: Vec<StageOverview>,
    /// Why Kafka's numbers (partitions, lag, members) are missing; null
    /// when they are there.
    pub kafka_error: Option<String>,
}

/// One service's answer to the readiness probe.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServiceCheck {
    /// `kafka`, `postgresql` or `schema-registry`.
    pub service: String,
    /// Whether it answered.
    pub ok: bool,
    /// Where it is and, when it did not answer, why.
    pub detail: String,
}

/// Readiness: every service the API needs, and the first that failed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    /// The services that do not answer, by name (absent when ready).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Each service's answer.
    pub services: Vec<ServiceCheck>,
}

/// Liveness.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_match_the_registry() {
        use crate::stages::STAGES;
        let ours = [
            StageName::Discover,
            StageName::Download,
            StageName::ExtractAudio,
            StageName::Transcribe,
            StageName::Summarize,
        ];
        assert_eq!(ours.map(StageName::as_str), STAGES);
        for s in ours {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }
}
