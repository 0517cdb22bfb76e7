//! The event mirror: lifecycle events from an [`EventSource`] (vidpipe's
//! reads `vidpipe.events`) to a RabbitMQ topic exchange, for consumers
//! still on RabbitMQ.
//!
//! Each event is published with routing key `<stage>.<kind>` (for example
//! `transcribe.succeeded`), persistent, on one channel with publisher
//! confirms. The mirror works in batches: it takes what the source has
//! ready (up to a bound), publishes it in the source's order, waits for
//! every confirm, and only then tells the source to commit. If anything
//! fails (a nack, the connection), the source rewinds to its last commit
//! and the batch is published again on a new connection: at-least-once,
//! and since one channel keeps publish order and every redelivery starts
//! over from the first unconfirmed event, each video's events stay in
//! order (a repeat of a run of events may precede the rest).

use std::future::Future;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, ExchangeKind};
use tokio_util::sync::CancellationToken;

use crate::amqp::{Backoff, BackoffSettings, Endpoint};

/// One event, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorEvent {
    /// `<stage>.<kind>`.
    pub routing_key: String,
    /// The message body (JSON).
    pub body: Vec<u8>,
    /// A stable id (the same on a repeat), for consumers that dedupe.
    pub message_id: String,
    /// When the event happened (ms since the epoch).
    pub timestamp_ms: i64,
    /// Extra headers (e.g. the video id).
    pub headers: Vec<(String, String)>,
}

/// Events and the source position just after them.
#[derive(Debug)]
pub struct Batch<P> {
    /// In the order they must be published; may be empty when everything
    /// read was skipped (the position still moves).
    pub events: Vec<MirrorEvent>,
    /// Commit this once every event is confirmed.
    pub position: P,
}

/// Why a source failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Retry later (broker or registry unreachable).
    #[error("{0}")]
    Transient(String),
    /// The mirror cannot go on.
    #[error("{0}")]
    Permanent(String),
}

/// Where events come from.
pub trait EventSource: Send {
    /// A position to commit.
    type Position: Send;

    /// Waits for at least one event (or skipped record), then returns what
    /// is ready, at most `max`. Must be cancel-safe: nothing taken and not
    /// returned may be committed.
    fn next_batch(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Batch<Self::Position>, SourceError>> + Send;

    /// Everything up to `position` was confirmed by RabbitMQ.
    fn commit(
        &mut self,
        position: Self::Position,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Go back to the last committed position: what was read since is read
    /// again.
    fn rewind(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// How the mirror runs.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// The topic exchange (declared durable if missing).
    pub exchange: String,
    /// Most events per batch.
    pub batch: usize,
    /// Delays between RabbitMQ sessions.
    pub reconnect: BackoffSettings,
    /// Connection name shown by RabbitMQ.
    pub connection_name: String,
}

impl MirrorSettings {
    /// Exchange `vidpipe.events`, batches of 500.
    pub fn new() -> Self {
        Self {
            exchange: "vidpipe.events".into(),
            batch: 500,
            reconnect: BackoffSettings::default(),
            connection_name: format!("vidpipe-mirror-{}", std::process::id()),
        }
    }
}

impl Default for MirrorSettings {
    fn default() -> Self {
        Self::new()
    }
}

/// Why the mirror stopped or a session ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MirrorError {
    /// Unusable settings (permanent).
    #[error("invalid mirror settings: {0}")]
    Config(String),
    /// RabbitMQ refused the exchange as configured (permanent).
    #[error("RabbitMQ refused to declare exchange {exchange:?}: {message}")]
    Exchange {
        /// The exchange.
        exchange: String,
        /// The broker's answer.
        message: String,
    },
    /// The connection failed or a publish was refused (retryable).
    #[error("RabbitMQ: {0}")]
    Amqp(String),
    /// The source failed.
    #[error("event source: {0}")]
    Source(SourceError),
}

impl MirrorError {
    /// Whether a new session may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            MirrorError::Amqp(_) | MirrorError::Source(SourceError::Transient(_)) => true,
            MirrorError::Config(_)
            | MirrorError::Exchange { .. }
            | MirrorError::Source(SourceError::Permanent(_)) => false,
        }
    }
}

fn amqp(e: lapin::Error) -> MirrorError {
    MirrorError::Amqp(e.to_string())
}

/// Mirrors an event source to a RabbitMQ topic exchange.
pub struct Mirror {
    endpoint: Endpoint,
    settings: MirrorSettings,
    exchange: ShortString,
}

impl Mirror {
    /// A mirror to `endpoint`; fails if the settings are unusable.
    pub fn new(endpoint: Endpoint, settings: MirrorSettings) -> Result<Self, MirrorError> {
        if settings.batch == 0 {
            return Err(MirrorError::Config("batch must be at least 1".into()));
        }
        if settings.exchange.is_empty()
            || settings.exchange.len() > 200
            || settings.exchange.starts_with("amq.")
        {
            return Err(MirrorError::Config(format!(
                "{:?} is not a usable exchange name",
                settings.exchange
            )));
        }
        let exchange = ShortString::try_new(settings.exchange.as_str())
            .map_err(|e| MirrorError::Config(e.to_string()))?;
        Ok(Self {
            endpoint,
            settings,
            exchange,
        })
    }

    /// Runs until `shutdown`; after a retryable failure the source rewinds
    /// and a new session starts after a backoff.
    pub async fn run<S: EventSource>(
        &self,
        source: &mut S,
        shutdown: CancellationToken,
    ) -> Result<(), MirrorError> {
        let mut backoff = Backoff::new(self.settings.reconnect);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let err = match self.session(source, &shutdown, &mut backoff).await {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => e,
            };
            metrics::counter!("vidpipe_bridge_reconnects_total", "role" => "mirror").increment(1);
            let wait = backoff.next_delay();
            tracing::warn!(
                error = %err,
                broker = self.endpoint.describe(),
                retry_in_ms = wait.as_millis() as u64,
                "event mirror session ended; rewinding and reconnecting"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            // Whatever was read and not committed is read again, in order.
            if let Err(e) = source.rewind().await {
                if let SourceError::Permanent(_) = e {
                    return Err(MirrorError::Source(e));
                }
                tracing::warn!(error = %e, "cannot rewind the event source yet");
            }
        }
    }

    async fn session<S: EventSource>(
        &self,
        source: &mut S,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), MirrorError> {
        let conn = self
            .endpoint
            .connect(&self.settings.connection_name)
            .await
            .map_err(amqp)?;
        let result = self.publish_loop(&conn, source, shutdown, backoff).await;
        if conn.status().connected() {
            let closing = conn.close(200, "vidpipe mirror: session ends".into());
            let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
        }
        result
    }

    async fn publish_loop<S: EventSource>(
        &self,
        conn: &lapin::Connection,
        source: &mut S,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), MirrorError> {
        let channel = conn.create_channel().await.map_err(amqp)?;
        channel
            .exchange_declare(
                self.exchange.clone(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| match e.kind() {
                lapin::ErrorKind::ProtocolError(_) => MirrorError::Exchange {
                    exchange: self.settings.exchange.clone(),
                    message: e.to_string(),
                },
                _ => amqp(e),
            })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        backoff.reset();
        tracing::info!(
            broker = self.endpoint.describe(),
            exchange = self.settings.exchange,
            "mirroring lifecycle events"
        );
        loop {
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                b = source.next_batch(self.settings.batch) => b.map_err(MirrorError::Source)?,
            };
            let t0 = Instant::now();
            let mut confirms = Vec::with_capacity(batch.events.len());
            for event in &batch.events {
                let routing_key = ShortString::try_new(event.routing_key.as_str())
                    .map_err(|e| MirrorError::Amqp(format!("routing key: {e}")))?;
                let confirm = channel
                    .basic_publish(
                        self.exchange.clone(),
                        routing_key,
                        BasicPublishOptions::default(),
                        &event.body,
                        properties(event),
                    )
                    .await
                    .map_err(amqp)?;
                confirms.push(confirm);
            }
            for confirm in confirms {
                match confirm.await.map_err(amqp)? {
                    Confirmation::Ack(_) => {}
                    Confirmation::Nack(_) => {
                        return Err(MirrorError::Amqp(
                            "the broker refused an event (nack)".into(),
                        ));
                    }
                    Confirmation::NotRequested => {
                        return Err(MirrorError::Amqp("publisher confirms are off".into()));
                    }
                }
            }
            let n = batch.events.len();
            if n > 0 {
                metrics::histogram!("vidpipe_bridge_mirror_confirm_seconds")
                    .record(t0.elapsed().as_secs_f64());
                metrics::histogram!("vidpipe_bridge_mirror_batch_size").record(n as f64);
                metrics::counter!("vidpipe_bridge_events_mirrored_total").increment(n as u64);
            }
            source
                .commit(batch.position)
                .await
                .map_err(MirrorError::Source)?;
            tracing::debug!(events = n, "batch mirrored and committed");
        }
    }
}

fn properties(event: &MirrorEvent) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &event.headers {
        if let Ok(key) = ShortString::try_new(k.as_str()) {
            headers.insert(key, AMQPValue::LongString(v.as_str().into()));
        }
    }
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_app_id("vidpipe".into())
        .with_type("vidpipe.lifecycle-event".into())
        .with_timestamp(u64::try_from(event.timestamp_ms / 1000).unwrap_or(0))
        .with_headers(headers);
    if let Ok(id) = ShortString::try_new(event.message_id.as_str()) {
        props = props.with_message_id(id);
    }
    props
}
