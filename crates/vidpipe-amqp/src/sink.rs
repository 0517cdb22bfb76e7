//! Where valid commands go: the [`CommandSink`] trait.
//!
//! vidpipe's sink writes a record to `vidpipe.commands` and returns when
//! Kafka acknowledged it; the ingress acknowledges the RabbitMQ message
//! only after that. Errors are classified: a [`SinkError::Transient`] one
//! (Kafka unreachable, a timeout) is retried with backoff while the message
//! stays unacknowledged; a [`SinkError::Permanent`] one (a command the sink
//! cannot accept) sends the message to the dead-letter exchange with the
//! sink's reason.

use std::future::Future;

use crate::command::LegacyCommand;

/// How this delivery of a command came about, so that a sink can tell
/// whether the command might have been sent already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// RabbitMQ delivered this message before (to this or another
    /// consumer) without an acknowledgement.
    pub redelivered: bool,
    /// The sink's attempt for this delivery, from 1.
    pub attempt: u32,
    /// Consumed shortly after a reconnect, when publishers' retries of
    /// messages they could not get confirmed arrive (as new messages,
    /// not flagged redelivered).
    pub recovering: bool,
}

impl DeliveryInfo {
    /// Whether an earlier delivery or attempt may have reached the sink:
    /// then a sink that can look up command ids should.
    pub fn may_be_sent_already(&self) -> bool {
        self.redelivered || self.attempt > 1 || self.recovering
    }
}

/// What the sink did with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written and acknowledged.
    Sent,
    /// A command with this id had been written already; nothing was sent.
    Duplicate,
}

/// Why the sink did not take a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Trying again later may work (unreachable, timed out, busy).
    #[error("{0}")]
    Transient(String),
    /// This command will never be accepted; it is dead-lettered.
    #[error("{reason}: {detail}")]
    Permanent {
        /// Short machine-readable reason (the dead-letter header).
        reason: &'static str,
        /// For people.
        detail: String,
    },
}

impl SinkError {
    /// Whether the command should be tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Transient(_))
    }
}

/// Takes valid commands; returns when they are durably accepted.
pub trait CommandSink: Send + Sync + 'static {
    /// Sends one command and waits for its acknowledgement.
    fn send(
        &self,
        command: &LegacyCommand,
        delivery: &DeliveryInfo,
    ) -> impl Future<Output = Result<Outcome, SinkError>> + Send;
}
