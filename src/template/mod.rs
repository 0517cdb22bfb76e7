//! The processor template: everything a stage does not have to know.
//!
//! A stage implements [`Stage`]: one async method from an input record to its
//! output records, or a [`StageError`] that says whether trying again can
//! help. The [`runner`] does the rest: consumer-group membership and
//! rebalances, decoding and encoding ([`codec`]), per-video ordering with
//! parallelism across videos ([`keyed`]), offsets committed up to the lowest
//! unfinished record with the finished ones above it remembered
//! ([`offsets`]), exactly-once or at-least-once outputs, retries with backoff,
//! the dead-letter topic, status rows in PostgreSQL ([`status`]), lifecycle
//! events, metrics and tracing, and topic creation ([`topics`]).
//!
//! Nothing in a stage touches Kafka, SQL or offsets.

pub mod codec;
pub mod events;
pub mod keyed;
pub mod offsets;
pub mod produce;
pub mod runner;
pub mod status;
pub mod testkit;
pub mod topics;

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::records::{Meta, Record};

/// Whether an error can go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient (a timeout, a 429, a 5xx): retried with backoff.
    Retryable,
    /// The input itself is bad (a 404, no audio stream): failed at once.
    Permanent,
}

impl ErrorClass {
    /// `retryable` or `permanent`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// A stage's failure: its class, a short machine-readable kind (`no_audio`,
/// `http_404`) and a message a person can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct StageError {
    /// Retry or not.
    pub class: ErrorClass,
    /// Short identifier for metrics and dashboards.
    pub kind: String,
    /// What went wrong and, where possible, what to do.
    pub message: String,
    /// A server's Retry-After, honoured instead of the computed backoff.
    pub retry_after: Option<Duration>,
}

impl StageError {
    /// A transient failure.
    pub fn retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Retryable,
            kind: kind.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            kind: kind.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// Sets the delay a server asked for before the next attempt.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// `retryable:<kind>` or `permanent:<kind>`.
    pub fn class_label(&self) -> String {
        format!("{}:{}", self.class.as_str(), self.kind)
    }
}

/// What a stage may know about the record it processes.
#[derive(Debug, Clone)]
pub struct Context {
    /// The stage's name.
    pub stage: &'static str,
    /// The input record's identity.
    pub meta: Meta,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Cancelled when the process shuts down or the partition is taken
    /// away: a long stage should stop and return a retryable error.
    pub cancel: CancellationToken,
}

/// One stage of the pipeline: business logic only.
pub trait Stage: Send + Sync + 'static {
    /// The record read from the input topic.
    type Input: Record;
    /// The record(s) written to the output topic.
    type Output: Record;
    /// Name in status rows, events, metrics and the consumer group.
    const NAME: &'static str;
    /// Input topic, without the configured prefix.
    const INPUT: &'static str;
    /// Output topic, without the configured prefix.
    const OUTPUT: &'static str;

    /// Maps one input record to its outputs (usually one; discovery may
    /// find many videos in one source, or none).
    fn process(
        &self,
        input: Self::Input,
        ctx: &Context,
    ) -> impl Future<Output = Result<Vec<Self::Output>, StageError>> + Send;

    /// Optional hook: whether this input is a video, whose row in `videos`
    /// the template keeps (its stage runs are recorded either way).
    /// Discovery says no for a source (a feed, a channel): the videos it
    /// finds get rows of their own.
    fn is_video(&self, _input: &Self::Input) -> bool {
        true
    }
}

/// Runs CPU-heavy work on the blocking pool, so that it does not stall the
/// async executor that drives every other record.
pub async fn cpu<F, R>(f: F) -> Result<R, StageError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StageError::retryable("cpu_task", format!("CPU task did not finish: {e}")))
}
