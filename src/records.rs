//! The records that flow between stages, one Rust type per Avro schema in
//! `schemas/`.
//!
//! Every pipeline record starts with [`Meta`]: the video id (also the Kafka
//! key, so all records of a video share a partition and its order), the
//! generation (bumped by a replay, so a downstream consumer can tell a
//! reprocessing from a first run and the database keeps both) and a trace id.
//!
//! Schema evolution policy: the registry's default BACKWARD compatibility.
//! A new field gets a default; a field is removed only if it had one; types
//! and names do not change. Readers resolve the writer's schema to their own,
//! so a consumer built against an older schema keeps reading.

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A record type with an Avro schema, keyed by video id.
pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The Avro schema (JSON) that this type reads and writes.
    const SCHEMA: &'static str;
    /// Video id, generation and trace id.
    fn meta(&self) -> &Meta;
    /// The video's source URL, when this record knows it (recorded in the
    /// video's status row).
    fn url(&self) -> Option<&str> {
        None
    }
}

/// Identity of a record: which video, which generation, which trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Deterministic video id (`yt:<id>`, or a hash of the normalised URL).
    pub video_id: String,
    /// Processing generation; a replay increments it.
    pub generation: i64,
    /// Trace id shared by every record and span of one video's run.
    pub trace_id: String,
}

impl Meta {
    /// A first-generation identity with a new trace id.
    pub fn new(video_id: impl Into<String>) -> Self {
        Self {
            video_id: video_id.into(),
            generation: 1,
            trace_id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// A claim check: where a large payload lives in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// Blob store URI.
    pub uri: String,
    /// Size in bytes.
    pub size: i64,
    /// Hex sha256 of the content.
    pub sha256: String,
    /// MIME type, when known.
    pub content_type: Option<String>,
}

macro_rules! record {
    ($ty:ident, $file:literal) => {
        impl Record for $ty {
            const SCHEMA: &'static str = include_str!(concat!("../schemas/", $file));
            fn meta(&self) -> &Meta {
                &self.meta
            }
        }
    };
    ($ty:ident, $file:literal, url) => {
        impl Record for $ty {
            const SCHEMA: &'static str = include_str!(concat!("../schemas/", $file));
            fn meta(&self) -> &Meta {
                &self.meta
            }
            fn url(&self) -> Option<&str> {
                Some(&self.url)
            }
        }
    };
}

/// A request to process a URL, or to restart a known video at a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Identity; for a URL the video id is the source's id.
    pub meta: Meta,
    /// Idempotency key of the command.
    pub command_id: String,
    /// The URL to discover.
    pub url: Option<String>,
    /// Restart a known video at this stage.
    pub start_stage: Option<String>,
    /// Who asked (from the legacy `requested_by`).
    pub requested_by: Option<String>,
    /// Free-form options.
    pub options: HashMap<String, String>,
    /// When the command was accepted (ms since the epoch).
    pub submitted_at: i64,
}
impl Record for Command {
    const SCHEMA: &'static str = include_str!("../schemas/command.avsc");
    fn meta(&self) -> &Meta {
        &self.meta
    }
    fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }
}

/// One video found by discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoDiscovered {
    /// Identity.
    pub meta: Meta,
    /// The video's URL.
    pub url: String,
    /// Title, as the source gave it (never used as a file name).
    pub title: Option<String>,
    /// Channel, playlist or feed it came from.
    pub source_url: Option<String>,
    /// Publication time (ms since the epoch).
    pub published_at: Option<i64>,
}
record!(VideoDiscovered, "video_discovered.avsc", url);

/// The video's media in the blob store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoDownloaded {
    /// Identity.
    pub meta: Meta,
    /// The video's URL.
    pub url: String,
    /// Title.
    pub title: Option<String>,
    /// The media file.
    pub media: Blob,
}
record!(VideoDownloaded, "video_downloaded.avsc", url);

/// One chunk of extracted audio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioChunk {
    /// The chunk's audio file.
    pub blob: Blob,
    /// Where the chunk starts in the whole audio.
    pub offset_ms: i64,
    /// The chunk's length.
    pub duration_ms: i64,
}

/// 16 kHz mono audio, split into chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioExtracted {
    /// Identity.
    pub meta: Meta,
    /// The whole audio.
    pub audio: Blob,
    /// Its duration.
    pub duration_ms: i64,
    /// Chunks for the ASR backend, in order.
    pub chunks: Vec<AudioChunk>,
}
record!(AudioExtracted, "audio_extracted.avsc");

/// The transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoTranscribed {
    /// Identity.
    pub meta: Meta,
    /// Segments with timestamps, as JSON.
    pub transcript: Blob,
    /// Detected language.
    pub language: Option<String>,
    /// Duration of the transcribed audio.
    pub duration_ms: i64,
    /// Number of segments.
    pub segments: i32,
}
record!(VideoTranscribed, "video_transcribed.avsc");

/// The summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoSummarized {
    /// Identity.
    pub meta: Meta,
    /// Summary, key points and chapters as JSON.
    pub summary: Blob,
    /// The same as markdown.
    pub markdown: Blob,
    /// Which summarizer produced it.
    pub backend: String,
}
record!(VideoSummarized, "video_summarized.avsc");

/// Kind of a lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// A stage started on a record.
    Started,
    /// The stage produced its output.
    Succeeded,
    /// A retryable error; another attempt follows.
    Retried,
    /// The record failed for good (and went to the dead-letter topic).
    Failed,
}

impl EventKind {
    /// Lower-case name, as used in metrics and AMQP routing keys.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Succeeded => "succeeded",
            EventKind::Retried => "retried",
            EventKind::Failed => "failed",
        }
    }
}

/// What happened to one record in one stage, on `vidpipe.events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// Identity of the video.
    pub meta: Meta,
    /// Stage name.
    pub stage: String,
    /// What happened.
    pub kind: EventKind,
    /// Attempt number, from 1.
    pub attempt: i32,
    /// When (ms since the epoch).
    pub at: i64,
    /// Time spent, for succeeded, retried and failed.
    pub duration_ms: Option<i64>,
    /// `retryable` or `permanent`, with the error's kind.
    pub error_class: Option<String>,
    /// The error, for people.
    pub error: Option<String>,
    /// Input record's topic.
    pub input_topic: String,
    /// Input record's partition.
    pub input_partition: i32,
    /// Input record's offset.
    pub input_offset: i64,
}
record!(LifecycleEvent, "lifecycle_event.avsc");

/// A record that could not be decoded or failed for good.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The video, if the record could be decoded.
    pub video_id: Option<String>,
    /// Stage that gave up.
    pub stage: String,
    /// Where the record came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The original key.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub key: Option<Vec<u8>>,
    /// The original value.
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub payload: Option<Vec<u8>>,
    /// `permanent`, `retries_exhausted` or `undecodable`, with the kind.
    pub error_class: String,
    /// The error, for people.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
    /// When (ms since the epoch).
    pub at: i64,
}

/// Schemas of every record type, for registration and single-object lookup.
pub const ALL_SCHEMAS: &[&str] = &[
    Command::SCHEMA,
    VideoDiscovered::SCHEMA,
    VideoDownloaded::SCHEMA,
    AudioExtracted::SCHEMA,
    VideoTranscribed::SCHEMA,
    VideoSummarized::SCHEMA,
    LifecycleEvent::SCHEMA,
    DEAD_LETTER_SCHEMA,
];

/// The dead-letter schema (a dead letter has no [`Meta`]: it may not have
/// been decodable).
pub const DEAD_LETTER_SCHEMA: &str = include_str!("../schemas/dead_letter.avsc");

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
