//! Summarization backends: a transcript in, a [`Summary`] out (a paragraph,
//! timestamped key points and chapters).
//!
//! Two backends share the output type:
//! - [`extractive`]: the offline default. Pure CPU and deterministic: it
//!   picks the transcript's most central sentences and finds chapters at
//!   topic shifts ([`extractive()`]). Call it through `template::cpu`.
//! - [`chat`]: any OpenAI-compatible chat-completions server (OpenAI,
//!   Ollama, vLLM), map-reduce over chunks that fit a token budget
//!   ([`ChatSummarizer`]).
//!
//! The input is [`TimedText`], the stage converts the ASR segments to it, so
//! this module does not depend on the ASR backend.

pub mod chat;
pub mod extractive;
mod text;

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::template::StageError;

pub use chat::{ChatOptions, ChatSummarizer};
pub use extractive::{ExtractiveOptions, extractive};

/// One piece of a transcript with its time span, in milliseconds from the
/// start of the media.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedText {
    /// Where the text starts.
    pub start_ms: i64,
    /// Where it ends.
    pub end_ms: i64,
    /// What was said.
    pub text: String,
}

/// The result of either backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// One paragraph.
    pub summary: String,
    /// The main points, in the order they occur.
    pub key_points: Vec<KeyPoint>,
    /// Consecutive chapters covering the transcript.
    pub chapters: Vec<Chapter>,
    /// ISO 639-1 code when the backend knows it. The extractive backend
    /// leaves it empty: the ASR stage already detected the language, and the
    /// caller can copy it here.
    pub language: Option<String>,
    /// Which backend wrote it: `extractive` or `chat:<model>`.
    pub backend: String,
}

/// A main point and where it is said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPoint {
    /// The point.
    pub text: String,
    /// Where it starts in the media.
    pub start_ms: i64,
}

/// A section of the media about one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chapter {
    /// Start of the chapter.
    pub start_ms: i64,
    /// End of the chapter (the next chapter's start, or the transcript's end).
    pub end_ms: i64,
    /// A few words.
    pub title: String,
    /// A sentence or two.
    pub summary: String,
}

/// The summary text of a transcript in which nothing was said.
pub const NO_SPEECH: &str = "No speech was found in the transcript.";

impl Summary {
    /// The summary of a transcript without words: no key points, no chapters.
    pub fn no_speech(backend: impl Into<String>) -> Self {
        Self {
            summary: NO_SPEECH.to_string(),
            key_points: Vec::new(),
            chapters: Vec::new(),
            language: None,
            backend: backend.into(),
        }
    }

    /// Markdown for people: a title, the summary, the key points and the
    /// chapters, each with a `[mm:ss]` time (`[h:mm:ss]` past an hour).
    pub fn to_markdown(&self, title: Option<&str>) -> String {
        let mut out = String::new();
        // `write!` to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(out, "# {}\n", one_line(title.unwrap_or("Summary")));
        let _ = writeln!(out, "## Summary\n\n{}\n", self.summary.trim());
        if !self.key_points.is_empty() {
            let _ = writeln!(out, "## Key points\n");
            for point in &self.key_points {
                let _ = writeln!(
                    out,
                    "- [{}] {}",
                    format_timestamp(point.start_ms),
                    one_line(&point.text)
                );
            }
            out.push('\n');
        }
        if !self.chapters.is_empty() {
            let _ = writeln!(out, "## Chapters\n");
            for chapter in &self.chapters {
                let _ = writeln!(
                    out,
                    "### [{}] {}\n",
                    format_timestamp(chapter.start_ms),
                    one_line(&chapter.title)
                );
                if !chapter.summary.trim().is_empty() {
                    let _ = writeln!(out, "{}\n", chapter.summary.trim());
                }
            }
        }
        while out.ends_with("\n\n") {
            out.pop();
        }
        out
    }

    /// The summary as a JSON object with the field names of this struct.
    pub fn to_json(&self) -> String {
        // Strings, integers and vectors of them always serialise; the
        // fallback only keeps this path free of panics.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Collapses whitespace so that a title or a point stays on its Markdown line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `mm:ss` below an hour, `h:mm:ss` from an hour on; negative times read
/// as zero.
pub fn format_timestamp(ms: i64) -> String {
    let total = ms.max(0) / 1000;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

/// Parses `mm:ss`, `h:mm:ss`, `[mm:ss]` or plain seconds (fractions
/// allowed) into milliseconds. Minutes past 59 are accepted (`75:10`).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s
        .trim()
        .trim_start_matches(['[', '(', '<'])
        .trim_end_matches([']', ')', '>'])
        .trim();
    if s.is_empty() {
        return None;
    }
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() > 3 {
        return None;
    }
    let mut seconds = 0.0_f64;
    let last = parts.len() - 1;
    for (i, part) in parts.iter().enumerate() {
        let part = part.trim();
        // Only the last field may have a fraction; the others are whole.
        let value: f64 = if i == last {
            part.parse().ok()?
        } else {
            f64::from(part.parse::<u32>().ok()?)
        };
        if !value.is_finite() || value < 0.0 {
            return None;
        }
        seconds = seconds * 60.0 + value;
    }
    // Bounded to a few days so that the cast cannot overflow.
    (seconds < 1.0e7).then(|| (seconds * 1000.0).round() as i64)
}

/// Why a summary could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SummarizeError {
    /// Bad settings (a URL that does not parse, a budget too small for the
    /// prompt). Retrying cannot help.
    #[error("summarizer configuration: {0}")]
    Config(String),
    /// HTTP 429: the server asked to slow down.
    #[error("the language model is rate limited: {message}")]
    RateLimited {
        /// What the server said.
        message: String,
        /// The server's Retry-After, when it sent one.
        retry_after: Option<Duration>,
    },
    /// A 5xx, a timeout or a connection failure.
    #[error("the language model is unavailable: {message}")]
    Unavailable {
        /// What went wrong.
        message: String,
    },
    /// Any other 4xx: the request itself is refused (bad model name, bad
    /// key, a prompt the server will not take).
    #[error("the language model rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// What the server said, with any secret removed.
        message: String,
    },
    /// The answer was not the JSON object asked for, after every attempt.
    #[error("the language model did not return a usable summary: {message}")]
    BadOutput {
        /// What was wrong with it.
        message: String,
    },
    /// The cancellation token fired.
    #[error("summarization was cancelled")]
    Cancelled,
}

impl From<SummarizeError> for StageError {
    fn from(err: SummarizeError) -> Self {
        let message = err.to_string();
        match err {
            SummarizeError::Config(_) => StageError::permanent("summarize_config", message),
            SummarizeError::RateLimited { retry_after, .. } => {
                let e = StageError::retryable("llm_rate_limited", message);
                match retry_after {
                    Some(after) => e.with_retry_after(after),
                    None => e,
                }
            }
            SummarizeError::Unavailable { .. } => StageError::retryable("llm_unavailable", message),
            SummarizeError::Rejected { .. } => StageError::permanent("llm_rejected", message),
            SummarizeError::BadOutput { .. } => StageError::retryable("llm_bad_output", message),
            SummarizeError::Cancelled => StageError::retryable("cancelled", message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(format_timestamp(0), "00:00");
        assert_eq!(format_timestamp(-5), "00:00");
        assert_eq!(format_timestamp(65_999), "01:05");
        assert_eq!(format_timestamp(3_725_000), "1:02:05");
        assert_eq!(parse_timestamp("01:05"), Some(65_000));
        assert_eq!(parse_timestamp("[1:02:05]"), Some(3_725_000));
        assert_eq!(parse_timestamp("75:10"), Some(4_510_000));
        assert_eq!(parse_timestamp("12.5"), Some(12_500));
        assert_eq!(parse_timestamp("00:07.25"), Some(7_250));
        assert_eq!(parse_timestamp("soon"), None);
        assert_eq!(parse_timestamp("1:-2"), None);
        assert_eq!(parse_timestamp(""), None);
        assert_eq!(parse_timestamp("1:2:3:4"), None);
    }

    #[test]
    fn errors_map_to_stage_classes() {
        use crate::template::ErrorClass;
        let e: StageError = SummarizeError::RateLimited {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(3)),
        }
        .into();
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        let e: StageError = SummarizeError::Rejected {
            status: 404,
            message: "no such model".into(),
        }
        .into();
        assert_eq!(
            (e.class, e.kind.as_str()),
            (ErrorClass::Permanent, "llm_rejected")
        );
        let e: StageError = SummarizeError::BadOutput {
            message: "not JSON".into(),
        }
        .into();
        assert_eq!(
            (e.class, e.kind.as_str()),
            (ErrorClass::Retryable, "llm_bad_output")
        );
    }

    #[test]
    fn markdown_without_sections() {
        let md = Summary::no_speech("extractive").to_markdown(None);
        assert!(md.starts_with("# Summary\n\n## Summary\n\n"), "{md}");
        assert!(md.contains(NO_SPEECH));
        assert!(!md.contains("## Chapters"));
    }
}
