//! Speech recognition: turns audio chunks into timestamped text.
//!
//! Two backends sit behind one trait, [`Asr`], and one enum that
//! configuration can pick at run time, [`Backend`]:
//! - [`OpenAiAsr`]: any OpenAI-compatible `/audio/transcriptions` endpoint
//!   (OpenAI itself, or the local stack's faster-whisper-server);
//! - [`GoogleAsr`]: Google Cloud Speech-to-Text v1 `speech:recognize`.
//!
//! Both share one HTTP policy ([`http`]): a timeout per request, retries with
//! backoff on 429 (honouring Retry-After), 5xx, timeouts and refused
//! connections, a permanent `asr_rejected` error on other 4xx, and a
//! semaphore that bounds the requests in flight per backend.
//!
//! A long recording is transcribed as overlapping chunks; [`stitch`] puts
//! the chunk transcripts back together (shifts timestamps, removes the words
//! the overlap produced twice, collapses Whisper's repetition loops, and
//! votes on the language). [`formats`] renders a [`Transcript`] as text,
//! SRT, WebVTT or JSON, and [`word_error_rate`] measures quality.
//!
//! Nothing here knows about Kafka, offsets or the database.

mod audio;
pub mod formats;
pub mod google;
mod http;
pub mod openai;
pub mod stitch;
mod wer;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::template::StageError;

pub use google::GoogleAsr;
pub use openai::OpenAiAsr;
pub use stitch::stitch;
pub use wer::{normalize_words, word_error_rate};

/// A stretch of recognised speech. Times are milliseconds from the start of
/// the chunk (in a [`ChunkTranscript`]) or of the recording (in a
/// [`Transcript`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Start in milliseconds.
    pub start_ms: i64,
    /// End in milliseconds (never before `start_ms`).
    pub end_ms: i64,
    /// The words, trimmed.
    pub text: String,
}

/// What a backend returns for one audio chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkTranscript {
    /// Detected (or requested) language as a lowercase ISO 639-1 code where
    /// known (`en`), else what the service said.
    pub language: Option<String>,
    /// Segments in time order, relative to the chunk's start.
    pub segments: Vec<Segment>,
    /// Length of the chunk's audio in milliseconds (0 if the service did not
    /// say and the file could not tell).
    pub duration_ms: i64,
}

/// The transcript of a whole recording, stitched from its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    /// The language that most of the audio (by duration) was detected as.
    pub language: Option<String>,
    /// Segments in time order, relative to the recording's start.
    pub segments: Vec<Segment>,
    /// Length of the recording in milliseconds.
    pub duration_ms: i64,
}

/// One chunk of a longer recording: where its file is and which stretch of
/// the recording it holds. Consecutive chunks may overlap; [`transcribe_chunks`]
/// derives each overlap from these offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioInput<'a> {
    /// The chunk's audio file (16 kHz mono WAV or FLAC).
    pub path: &'a Path,
    /// Where the chunk starts in the recording, in milliseconds.
    pub offset_ms: i64,
    /// The chunk's length in milliseconds.
    pub duration_ms: i64,
}

/// Per-backend request policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsrOptions {
    /// Limit for one HTTP request, from connecting to the last byte of the
    /// answer. A server that never answers (the local one once left 2 of 5
    /// concurrent requests hanging) costs this much, then a retry.
    pub timeout: Duration,
    /// Requests in flight at once through this backend (at least 1).
    pub max_concurrency: usize,
    /// Attempts per chunk, the first included (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubled for each later one, with
    /// jitter. A server's Retry-After replaces it.
    pub backoff: Duration,
    /// Language of the audio (`en`, or `en-US` for Google); `None` lets the
    /// service detect it (Google, which needs one, then assumes `en-US`).
    pub language: Option<String>,
}

impl Default for AsrOptions {
    fn default() -> Self {
        Self {
            // A 60 s chunk takes seconds on a CPU-only Whisper and far less
            // on hosted services; two minutes leaves room for queueing.
            timeout: Duration::from_secs(120),
            max_concurrency: 4,
            attempts: 3,
            backoff: Duration::from_secs(1),
            language: None,
        }
    }
}

/// Why a transcription failed. Every variant knows whether retrying can
/// help ([`AsrError::is_retryable`]) and converts into a [`StageError`].
/// Messages never hold an API key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AsrError {
    /// The backend's settings are unusable (a malformed URL).
    #[error("ASR configuration: {0}")]
    Config(String),
    /// The chunk cannot be read or is in a format the backend cannot take.
    #[error("ASR input {path}: {message}")]
    Input {
        /// The chunk's path.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The service refused the request for good (a 4xx other than 408/429).
    #[error("{endpoint} rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// Where the request went (scheme, host, port and path only).
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// The service's message, shortened.
        message: String,
    },
    /// The service asked us to slow down (429) and the attempts ran out, or
    /// its Retry-After is longer than a request should wait inline.
    #[error("{endpoint} is rate limiting (HTTP 429): {message}")]
    RateLimited {
        /// Where the request went.
        endpoint: String,
        /// The service's Retry-After, for the runner to honour.
        retry_after: Option<Duration>,
        /// The service's message, shortened.
        message: String,
    },
    /// The service failed (5xx, 408) on every attempt.
    #[error("{endpoint} failed (HTTP {status}) after {attempts} attempt(s): {message}")]
    Server {
        /// Where the request went.
        endpoint: String,
        /// HTTP status of the last attempt.
        status: u16,
        /// Attempts made.
        attempts: u32,
        /// The service's message, shortened.
        message: String,
    },
    /// No complete answer within the timeout, on every attempt.
    #[error("{endpoint} did not answer within {timeout:?} ({attempts} attempt(s))")]
    Timeout {
        /// Where the request went.
        endpoint: String,
        /// The per-request limit.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
    },
    /// The service could not be reached (refused, reset, DNS), on every
    /// attempt.
    #[error("{endpoint} is unreachable after {attempts} attempt(s): {message}")]
    Unavailable {
        /// Where the request went.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The transport error.
        message: String,
    },
    /// A 2xx answer that is not the expected JSON: a wrong URL or an
    /// incompatible server, which retrying does not fix.
    #[error("{endpoint} answered with something unexpected: {message}")]
    BadResponse {
        /// Where the request went.
        endpoint: String,
        /// What did not parse.
        message: String,
    },
    /// The caller cancelled (shutdown or rebalance); the work runs again on
    /// the next owner.
    #[error("transcription cancelled")]
    Cancelled,
}

impl AsrError {
    /// Short machine-readable kind, as in `StageError::kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            AsrError::Config(_) => "asr_config",
            AsrError::Input { .. } => "asr_input",
            AsrError::Rejected { .. } => "asr_rejected",
            AsrError::RateLimited { .. } => "asr_rate_limited",
            AsrError::Server { .. } => "asr_server_error",
            AsrError::Timeout { .. } => "asr_timeout",
            AsrError::Unavailable { .. } => "asr_unavailable",
            AsrError::BadResponse { .. } => "asr_bad_response",
            AsrError::Cancelled => "cancelled",
        }
    }

    /// Whether the same request can succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AsrError::RateLimited { .. }
                | AsrError::Server { .. }
                | AsrError::Timeout { .. }
                | AsrError::Unavailable { .. }
                | AsrError::Cancelled
        )
    }

    /// The wait a server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AsrError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl From<AsrError> for StageError {
    fn from(e: AsrError) -> Self {
        let kind = e.kind();
        let message = e.to_string();
        let retry_after = e.retry_after();
        let err = if e.is_retryable() {
            StageError::retryable(kind, message)
        } else {
            StageError::permanent(kind, message)
        };
        match retry_after {
            Some(d) => err.with_retry_after(d),
            None => err,
        }
    }
}

/// A speech-recognition service.
///
/// Generic code takes `impl Asr`; configuration that picks a service at run
/// time holds a [`Backend`], which implements this trait too.
pub trait Asr: Send + Sync {
    /// Short name for logs and metrics (`openai`, `google`).
    fn name(&self) -> &str;

    /// Transcribes one chunk (16 kHz mono WAV or FLAC). Timestamps are
    /// relative to the chunk's start. Retries inside, as configured in
    /// [`AsrOptions`]; returns [`AsrError::Cancelled`] soon after `cancel`
    /// fires.
    fn transcribe<'a>(
        &'a self,
        chunk: &'a Path,
        cancel: &'a CancellationToken,
    ) -> impl Future<Output = Result<ChunkTranscript, AsrError>> + Send + 'a;
}

/// The backend chosen by configuration.
#[derive(Debug, Clone)]
pub enum Backend {
    /// OpenAI-compatible `/audio/transcriptions`.
    OpenAi(OpenAiAsr),
    /// Google Speech-to-Text v1.
    Google(GoogleAsr),
}

impl Asr for Backend {
    fn name(&self) -> &str {
        match self {
            Backend::OpenAi(b) => b.name(),
            Backend::Google(b) => b.name(),
        }
    }

    async fn transcribe<'a>(
        &'a self,
        chunk: &'a Path,
        cancel: &'a CancellationToken,
    ) -> Result<ChunkTranscript, AsrError> {
        match self {
            Backend::OpenAi(b) => b.transcribe(chunk, cancel).await,
            Backend::Google(b) => b.transcribe(chunk, cancel).await,
        }
    }
}

impl From<OpenAiAsr> for Backend {
    fn from(b: OpenAiAsr) -> Self {
        Backend::OpenAi(b)
    }
}

impl From<GoogleAsr> for Backend {
    fn from(b: GoogleAsr) -> Self {
        Backend::Google(b)
    }
}

/// Transcribes the chunks of one recording concurrently (as many at once as
/// the backend's `max_concurrency` allows) and stitches them. Chunks must be
/// in time order; the overlap of each with its predecessor is derived from
/// their offsets and durations. The first failure cancels the rest.
pub async fn transcribe_chunks<A: Asr>(
    asr: &A,
    chunks: &[AudioInput<'_>],
    cancel: &CancellationToken,
) -> Result<Transcript, AsrError> {
    let results = futures::future::try_join_all(
        chunks
            .iter()
            .map(|chunk| asr.transcribe(chunk.path, cancel)),
    )
    .await?;
    let mut stitched = Vec::with_capacity(chunks.len());
    let mut previous_end: Option<i64> = None;
    for (chunk, mut transcript) in chunks.iter().zip(results) {
        let overlap = previous_end.map_or(0, |end| (end - chunk.offset_ms).max(0));
        // The caller knows the chunk's length from probing; a service that
        // did not report one should not make the recording look shorter.
        if transcript.duration_ms <= 0 {
            transcript.duration_ms = chunk.duration_ms;
        }
        previous_end = Some(chunk.offset_ms + chunk.duration_ms);
        stitched.push((chunk.offset_ms, overlap, transcript));
    }
    Ok(stitch(stitched))
}

/// Normalises a language as services report it (`english`, `en`, `en-US`,
/// `en-us`) to a lowercase ISO 639-1 code where one is known; other values
/// are returned lowercased.
pub fn normalize_language(raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    if lower.is_empty() {
        return None;
    }
    // A BCP-47 tag: the primary subtag is the language.
    let primary = lower.split(['-', '_']).next().unwrap_or(&lower);
    if (2..=3).contains(&primary.len()) && primary.chars().all(|c| c.is_ascii_alphabetic()) {
        return Some(primary.to_owned());
    }
    // Whisper's own name for the language, as OpenAI's verbose_json gives it.
    let code = LANGUAGE_NAMES
        .iter()
        .find(|(name, _)| *name == lower)
        .map(|(_, code)| *code);
    Some(code.map_or(lower, str::to_owned))
}

/// Whisper's language names (from its tokenizer) with their ISO 639-1 codes:
/// the common ones; rarer names pass through unchanged.
const LANGUAGE_NAMES: &[(&str, &str)] = &[
    ("english", "en"),
    ("chinese", "zh"),
    ("german", "de"),
    ("spanish", "es"),
    ("russian", "ru"),
    ("korean", "ko"),
    ("french", "fr"),
    ("japanese", "ja"),
    ("portuguese", "pt"),
    ("turkish", "tr"),
    ("polish", "pl"),
    ("catalan", "ca"),
    ("dutch", "nl"),
    ("arabic", "ar"),
    ("swedish", "sv"),
    ("italian", "it"),
    ("indonesian", "id"),
    ("hindi", "hi"),
    ("finnish", "fi"),
    ("vietnamese", "vi"),
    ("hebrew", "he"),
    ("ukrainian", "uk"),
    ("greek", "el"),
    ("malay", "ms"),
    ("czech", "cs"),
    ("romanian", "ro"),
    ("danish", "da"),
    ("hungarian", "hu"),
    ("tamil", "ta"),
    ("norwegian", "no"),
    ("thai", "th"),
    ("urdu", "ur"),
    ("croatian", "hr"),
    ("bulgarian", "bg"),
    ("lithuanian", "lt"),
    ("latin", "la"),
    ("welsh", "cy"),
    ("slovak", "sk"),
    ("persian", "fa"),
    ("latvian", "lv"),
    ("bengali", "bn"),
    ("serbian", "sr"),
    ("slovenian", "sl"),
    ("estonian", "et"),
    ("icelandic", "is"),
    ("irish", "ga"),
    ("basque", "eu"),
    ("galician", "gl"),
    ("afrikaans", "af"),
    ("swahili", "sw"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::ErrorClass;

    #[test]
    fn languages_normalise_to_iso_codes() {
        assert_eq!(normalize_language("english").as_deref(), Some("en"));
        assert_eq!(normalize_language("English ").as_deref(), Some("en"));
        assert_eq!(normalize_language("en").as_deref(), Some("en"));
        assert_eq!(normalize_language("en-US").as_deref(), Some("en"));
        assert_eq!(normalize_language("de-de").as_deref(), Some("de"));
        assert_eq!(
            normalize_language("klingonese").as_deref(),
            Some("klingonese")
        );
        assert_eq!(normalize_language("  "), None);
    }

    #[test]
    fn errors_map_to_stage_errors_with_class_and_retry_after() {
        let e: StageError = AsrError::RateLimited {
            endpoint: "http://h/v1/audio/transcriptions".into(),
            retry_after: Some(Duration::from_secs(7)),
            message: "slow down".into(),
        }
        .into();
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.kind, "asr_rate_limited");
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));

        let e: StageError = AsrError::Rejected {
            endpoint: "http://h/v1/audio/transcriptions".into(),
            status: 400,
            message: "bad file".into(),
        }
        .into();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.kind, "asr_rejected");
        assert!(e.message.contains("bad file"), "{}", e.message);
        assert_eq!(e.retry_after, None);
    }
}
