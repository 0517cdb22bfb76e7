//! vidpipe's RabbitMQ adapter.
//!
//! Producers of the old system publish JSON commands to one RabbitMQ queue
//! per service. This crate consumes those queues and hands each valid
//! command to a [`CommandSink`] (vidpipe's implementation writes a record to
//! `vidpipe.commands`), and mirrors lifecycle events from an
//! [`EventSource`] to a RabbitMQ topic exchange. It knows RabbitMQ and the
//! legacy JSON, not Kafka: vidpipe implements the two traits (see
//! `src/bridge.rs` there), which keeps the core pipeline free of lapin and
//! this crate free of rdkafka.
//!
//! Module map:
//! - [`command`]: the legacy commands, their validation and their ids.
//! - [`sink`]: the [`CommandSink`] trait and its error classes.
//! - [`ingress`]: consuming the legacy queues (ack after the sink, dead
//!   letters with a reason, reconnects).
//! - [`mirror`]: the [`EventSource`] trait and the event mirror (publisher
//!   confirms before the source's position moves).
//! - [`amqp`]: connections (credentials never shown) and backoff.
//!
//! Guarantees, in short: a RabbitMQ message is acknowledged only after the
//! sink acknowledged its command (or, for a malformed one, after the dead
//! letter was confirmed); nothing is acknowledged while the sink fails;
//! every failure of RabbitMQ or of the sink is retried with backoff, and
//! unacknowledged messages go back to their queue when a connection drops.
//!
//! Metrics (the `metrics` crate; vidpipe exports them as Prometheus):
//! - `vidpipe_bridge_messages_in_total{queue}`: deliveries received;
//! - `vidpipe_bridge_acked_total{queue,outcome}`: acknowledged after the sink
//!   took the command (`sent`) or found it sent already (`duplicate`);
//! - `vidpipe_bridge_rejected_total{queue,reason}`: dead-lettered;
//! - `vidpipe_bridge_sink_retries_total{queue}`: transient sink failures;
//! - `vidpipe_bridge_sink_seconds`: the sink's round trip (Kafka ack);
//! - `vidpipe_bridge_command_seconds`: delivery to acknowledgement;
//! - `vidpipe_bridge_dead_letter_seconds`: dead-letter publish to confirm;
//! - `vidpipe_bridge_reconnects_total{role}`: RabbitMQ sessions lost;
//! - `vidpipe_bridge_events_mirrored_total`,
//!   `vidpipe_bridge_mirror_confirm_seconds` (a batch's publish to its last
//!   confirm), `vidpipe_bridge_mirror_batch_size`.

pub mod amqp;
pub mod command;
pub mod ingress;
pub mod mirror;
pub mod sink;

pub use amqp::{Backoff, BackoffSettings, Endpoint, EndpointError};
pub use command::{DeliveryIdentity, LegacyCommand, Malformed, Stage, command_id, reason};
pub use ingress::{Ingress, IngressError, IngressSettings, QueueSpec};
pub use mirror::{
    Batch, EventSource, Mirror, MirrorError, MirrorEvent, MirrorSettings, SourceError,
};
pub use sink::{CommandSink, DeliveryInfo, Outcome, SinkError};
