//! Legacy command ingress: the old system's queues in, a [`CommandSink`]
//! out.
//!
//! One RabbitMQ session (a connection) at a time per [`Ingress`]; any
//! number of instances compete for the same queues. A session:
//!
//! 1. declares what is missing: the dead-letter exchange (topic, durable),
//!    the dead-letter queue bound to it with `#`, and the legacy queues
//!    (durable). An existing queue is used as it is: it is only looked up
//!    (a passive declare), because declaring it again with other arguments
//!    would fail, and no arguments are added to queues we create, because
//!    the legacy producers declare them too, without arguments;
//! 2. consumes every queue on its own channel with a bounded prefetch, so
//!    that at most `prefetch` messages per queue are in hand;
//! 3. handles each delivery in its own task: a valid command goes to the
//!    sink and the message is acknowledged only after the sink's
//!    acknowledgement; a transient sink failure is retried with backoff
//!    while the message stays unacknowledged (so nothing is acknowledged
//!    while Kafka is unreachable); a malformed message, or one the sink
//!    refuses for good, is published to the dead-letter exchange with the
//!    reason in headers, and acknowledged once that publish is confirmed.
//!    Nothing is ever requeued by us, so nothing loops forever.
//!
//! When the connection or a channel fails, the session ends; unacknowledged
//! messages return to their queues (RabbitMQ does that when the connection
//! goes), and a new session starts after a backoff. A redelivered message
//! keeps its command id, and is flagged so that the sink can look it up.
//!
//! Two copies of one command can be in hand at once on two instances: a
//! redelivery, or a publisher's retry next to the original, right after a
//! broker restart. Before the sink sees a delivery that may have been sent
//! already, the instance therefore claims its command id across instances:
//! it declares an exclusive queue `vidpipe.bridge.claim.<hash of the id>`,
//! which RabbitMQ grants to one connection at a time and deletes when that
//! connection goes. The other copy waits until the claim is released and
//! then finds the command sent. (The bridge's user needs the configure
//! permission on `vidpipe.bridge.claim.*`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ErrorKind, ExchangeKind};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::{Backoff, BackoffSettings, Endpoint};
use crate::command::{DeliveryIdentity, LegacyCommand, Stage, command_id};
use crate::sink::{CommandSink, DeliveryInfo, Outcome, SinkError};

/// Prefix of the exclusive queues that claim a command id.
const CLAIM_PREFIX: &str = "vidpipe.bridge.claim.";
/// At most one warning per this long about commands not taken: during an
/// outage every message in hand fails every few seconds.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets one warning through per [`WARN_EVERY`] and counts the others.
#[derive(Default)]
struct Throttle {
    last: std::sync::Mutex<Option<Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// `Some(n)` when a warning may be logged now (`n` were suppressed
    /// since the last one).
    fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Dead-letter headers.
const H_REASON: &str = "x-vidpipe-reason";
const H_ERROR: &str = "x-vidpipe-error";
const H_QUEUE: &str = "x-vidpipe-queue";
const H_COMMAND_ID: &str = "x-vidpipe-command-id";
const H_REDELIVERED: &str = "x-vidpipe-redelivered";
/// Longest `x-vidpipe-error` header.
const MAX_ERROR_CHARS: usize = 1000;

/// A queue to consume and the stage its commands start at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Stage of its commands (unless a message names another).
    pub stage: Stage,
}

impl QueueSpec {
    /// The old system's queue for `stage`.
    pub fn legacy(stage: Stage) -> Self {
        Self {
            name: stage.legacy_queue().into(),
            stage,
        }
    }
}

/// How the ingress runs.
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// Queues to consume.
    pub queues: Vec<QueueSpec>,
    /// Unacknowledged messages per queue and instance.
    pub prefetch: u16,
    /// Exchange that malformed messages are published to (topic; the
    /// routing key is the source queue).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange with `#`.
    pub dead_letter_queue: String,
    /// Larger messages are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Delays between RabbitMQ sessions.
    pub reconnect: BackoffSettings,
    /// Delays between a transient sink failure and the next attempt.
    pub retry: BackoffSettings,
    /// After a reconnect, deliveries within this window are flagged
    /// [`DeliveryInfo::recovering`].
    pub recovery_window: Duration,
    /// How long shutdown waits for commands in hand.
    pub shutdown_grace: Duration,
    /// Connection name shown by RabbitMQ; also the consumer tag prefix.
    pub connection_name: String,
}

impl IngressSettings {
    /// The old system's five queues with default settings.
    pub fn legacy() -> Self {
        Self {
            queues: Stage::ALL.iter().map(|s| QueueSpec::legacy(*s)).collect(),
            prefetch: 64,
            dead_letter_exchange: "vidpipe.dead-letters".into(),
            dead_letter_queue: "vidpipe.dead-letters".into(),
            max_message_bytes: 1 << 20,
            reconnect: BackoffSettings::default(),
            retry: BackoffSettings {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(10),
            },
            recovery_window: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            connection_name: format!("vidpipe-bridge-{}", std::process::id()),
        }
    }

    /// Checks the settings without connecting anywhere.
    pub fn validate(&self) -> Result<(), IngressError> {
        let bad = |m: String| Err(IngressError::Config(m));
        if self.queues.is_empty() {
            return bad("no queue to consume".into());
        }
        if self.prefetch == 0 {
            return bad("prefetch must be at least 1".into());
        }
        if self.max_message_bytes == 0 {
            return bad("max_message_bytes must be at least 1".into());
        }
        let mut names: Vec<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
        names.extend([
            self.dead_letter_exchange.as_str(),
            self.dead_letter_queue.as_str(),
        ]);
        for name in &names {
            if name.is_empty() || name.len() > 200 || name.starts_with("amq.") {
                return bad(format!(
                    "{name:?} is not a usable queue or exchange name (1 to 200 bytes, not amq.*)"
                ));
            }
        }
        let mut queues: Vec<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
        queues.push(self.dead_letter_queue.as_str());
        queues.sort_unstable();
        if queues.windows(2).any(|w| w[0] == w[1]) {
            return bad("queue names must be distinct (including the dead-letter queue)".into());
        }
        if self.connection_name.is_empty() || self.connection_name.len() > 200 {
            return bad("connection_name must be 1 to 200 bytes".into());
        }
        Ok(())
    }
}

/// Why the ingress stopped or a session ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngressError {
    /// The settings are unusable (permanent).
    #[error("invalid ingress settings: {0}")]
    Config(String),
    /// RabbitMQ refused to declare an exchange or queue as configured, e.g.
    /// an exchange of that name exists with another type (permanent: an
    /// operator must resolve it).
    #[error("RabbitMQ refused to declare {object}: {message}")]
    Topology {
        /// Which exchange or queue.
        object: String,
        /// The broker's answer.
        message: String,
    },
    /// The connection or a channel failed (retryable).
    #[error("RabbitMQ: {0}")]
    Amqp(String),
    /// A dead letter could not be published (retryable: a new session
    /// declares the dead-letter exchange again).
    #[error("dead-lettering failed: {0}")]
    DeadLetter(String),
}

impl IngressError {
    /// Whether a new session may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, IngressError::Amqp(_) | IngressError::DeadLetter(_))
    }
}

fn amqp(e: lapin::Error) -> IngressError {
    IngressError::Amqp(e.to_string())
}

fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// A declare failed: permanent if the broker said no to this object,
/// retryable if the connection failed meanwhile.
fn topology(object: String, e: lapin::Error) -> IngressError {
    match soft_error(&e) {
        Some(
            AMQPSoftError::PRECONDITIONFAILED
            | AMQPSoftError::ACCESSREFUSED
            | AMQPSoftError::RESOURCELOCKED,
        ) => IngressError::Topology {
            object,
            message: e.to_string(),
        },
        _ => amqp(e),
    }
}

fn short(s: &str) -> Result<ShortString, IngressError> {
    ShortString::try_new(s).map_err(|e| IngressError::Config(e.to_string()))
}

/// Consumes the legacy queues into a sink until shut down.
pub struct Ingress<S> {
    endpoint: Endpoint,
    settings: Arc<IngressSettings>,
    sink: Arc<S>,
    throttle: Arc<Throttle>,
}

impl<S: CommandSink> Ingress<S> {
    /// An ingress for `endpoint`; fails if the settings are unusable.
    pub fn new(
        endpoint: Endpoint,
        settings: IngressSettings,
        sink: Arc<S>,
    ) -> Result<Self, IngressError> {
        settings.validate()?;
        Ok(Self {
            endpoint,
            settings: Arc::new(settings),
            sink,
            throttle: Arc::default(),
        })
    }

    /// Runs sessions until `shutdown`; reconnects with backoff after every
    /// retryable failure. Returns an error only for a permanent one.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), IngressError> {
        let mut backoff = Backoff::new(self.settings.reconnect);
        let mut first = true;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let recovering = !first;
            first = false;
            match self.session(&shutdown, recovering, &mut backoff).await {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => {
                    metrics::counter!("vidpipe_bridge_reconnects_total", "role" => "ingress")
                        .increment(1);
                    let wait = backoff.next_delay();
                    tracing::warn!(
                        error = %e,
                        broker = self.endpoint.describe(),
                        retry_in_ms = wait.as_millis() as u64,
                        "RabbitMQ session of the ingress ended; reconnecting"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn session(
        &self,
        shutdown: &CancellationToken,
        recovering: bool,
        backoff: &mut Backoff,
    ) -> Result<(), IngressError> {
        let conn = Arc::new(
            self.endpoint
                .connect(&self.settings.connection_name)
                .await
                .map_err(amqp)?,
        );
        let result = self.consume(&conn, shutdown, recovering, backoff).await;
        if conn.status().connected() {
            // Closing hands every unacknowledged delivery back to its queue
            // now, rather than when the broker notices a dead socket.
            let closing = conn.close(200, "vidpipe bridge: session ends".into());
            let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
        }
        result
    }

    async fn consume(
        &self,
        conn: &Arc<Connection>,
        shutdown: &CancellationToken,
        recovering: bool,
        backoff: &mut Backoff,
    ) -> Result<(), IngressError> {
        let s = &self.settings;
        declare_topology(conn, s).await?;
        let dl_channel = conn.create_channel().await.map_err(amqp)?;
        dl_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp)?;
        let dead = Arc::new(DeadLetters {
            channel: dl_channel,
            exchange: short(&s.dead_letter_exchange)?,
        });
        let mut consumers = Vec::with_capacity(s.queues.len());
        let mut streams = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let channel = conn.create_channel().await.map_err(amqp)?;
            channel
                .basic_qos(s.prefetch, BasicQosOptions::default())
                .await
                .map_err(amqp)?;
            let tag = short(&format!("{}-{i}", s.connection_name))?;
            let consumer = channel
                .basic_consume(
                    short(&q.name)?,
                    tag.clone(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp)?;
            streams.push(consumer.map(move |d| (i, d)));
            consumers.push((channel, tag));
        }
        backoff.reset();
        let started = Instant::now();
        tracing::info!(
            broker = self.endpoint.describe(),
            queues = ?s.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
            prefetch = s.prefetch,
            recovering,
            "consuming the legacy command queues"
        );
        // `broken`: a task found the session unusable (its dead-letter
        // channel failed). `abandon`: tasks stop retrying; their messages go
        // back to the queues when the connection closes.
        let broken = CancellationToken::new();
        let abandon = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut deliveries = futures::stream::select_all(streams);
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                _ = broken.cancelled() => {
                    break Err(IngressError::DeadLetter(
                        "the dead-letter channel failed".into(),
                    ));
                }
                next = deliveries.next() => match next {
                    Some((i, Ok(delivery))) => {
                        let job = Job {
                            sink: self.sink.clone(),
                            dead: dead.clone(),
                            claims: conn.clone(),
                            queue: s.queues[i].clone(),
                            max_bytes: s.max_message_bytes,
                            retry: s.retry,
                            recovering: recovering && started.elapsed() < s.recovery_window,
                            abandon: abandon.clone(),
                            broken: broken.clone(),
                            throttle: self.throttle.clone(),
                        };
                        tasks.spawn(handle(job, delivery));
                    }
                    Some((_, Err(e))) => break Err(amqp(e)),
                    None => {
                        break Err(IngressError::Amqp(
                            "the broker cancelled a consumer (queue deleted?)".into(),
                        ));
                    }
                },
            }
        };
        abandon.cancel();
        if result.is_ok() {
            // Shutdown: take no more deliveries, let the commands in hand
            // finish (the sink calls in flight; retries were abandoned).
            for (channel, tag) in &consumers {
                let _ = channel
                    .basic_cancel(tag.clone(), BasicCancelOptions::default())
                    .await;
            }
            tasks.close();
            if tokio::time::timeout(s.shutdown_grace, tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "shutdown grace over with commands in hand; RabbitMQ redelivers them"
                );
            }
        }
        result
    }
}

/// Declares the dead-letter exchange and queue, and the legacy queues that
/// are missing.
async fn declare_topology(conn: &Connection, s: &IngressSettings) -> Result<(), IngressError> {
    let channel = conn.create_channel().await.map_err(amqp)?;
    channel
        .exchange_declare(
            short(&s.dead_letter_exchange)?,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(format!("exchange {:?}", s.dead_letter_exchange), e))?;
    ensure_queue(conn, &s.dead_letter_queue).await?;
    channel
        .queue_bind(
            short(&s.dead_letter_queue)?,
            short(&s.dead_letter_exchange)?,
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(format!("binding of {:?}", s.dead_letter_queue), e))?;
    for q in &s.queues {
        ensure_queue(conn, &q.name).await?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Uses an existing queue as it is; declares a durable one if missing.
async fn ensure_queue(conn: &Connection, name: &str) -> Result<(), IngressError> {
    let channel = conn.create_channel().await.map_err(amqp)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(short(name)?, passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "found".into()).await;
            return Ok(());
        }
        // The broker closed that channel with 404: the queue is missing.
        Err(e) if soft_error(&e) == Some(AMQPSoftError::NOTFOUND) => {}
        Err(e) => return Err(amqp(e)),
    }
    let channel = conn.create_channel().await.map_err(amqp)?;
    channel
        .queue_declare(
            short(name)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology(format!("queue {name:?}"), e))?;
    tracing::info!(queue = name, "declared a missing queue");
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// The channel (with publisher confirms) that dead letters go through.
struct DeadLetters {
    channel: Channel,
    exchange: ShortString,
}

impl DeadLetters {
    /// Publishes the message with the reason headers added; returns once
    /// the broker confirmed it.
    async fn publish(
        &self,
        delivery: &Delivery,
        queue: &str,
        command_id: &str,
        reason: &str,
        detail: &str,
    ) -> Result<(), String> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(s.into());
        let detail: String = detail.chars().take(MAX_ERROR_CHARS).collect();
        headers.insert(H_REASON.into(), text(reason));
        headers.insert(H_ERROR.into(), text(&detail));
        headers.insert(H_QUEUE.into(), text(queue));
        headers.insert(H_COMMAND_ID.into(), text(command_id));
        headers.insert(
            H_REDELIVERED.into(),
            AMQPValue::Boolean(delivery.redelivered),
        );
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let routing_key = ShortString::try_new(queue).map_err(|e| e.to_string())?;
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions::default(),
                &delivery.data,
                properties,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            Confirmation::Ack(_) => Ok(()),
            Confirmation::Nack(_) => Err("the broker refused the dead letter (nack)".into()),
            Confirmation::NotRequested => Err("publisher confirms are off".into()),
        }
    }
}

/// What a delivery's task needs.
struct Job<S> {
    sink: Arc<S>,
    dead: Arc<DeadLetters>,
    /// The session's connection, for claims.
    claims: Arc<Connection>,
    queue: QueueSpec,
    max_bytes: usize,
    retry: BackoffSettings,
    recovering: bool,
    abandon: CancellationToken,
    broken: CancellationToken,
    throttle: Arc<Throttle>,
}

async fn handle<S: CommandSink>(job: Job<S>, delivery: Delivery) {
    metrics::counter!("vidpipe_bridge_messages_in_total", "queue" => job.queue.name.clone())
        .increment(1);
    let props = &delivery.properties;
    let identity = DeliveryIdentity {
        message_id: props.message_id().as_ref().map(ShortString::as_str),
        queue: &job.queue.name,
        exchange: delivery.exchange.as_str(),
        routing_key: delivery.routing_key.as_str(),
        correlation_id: props.correlation_id().as_ref().map(ShortString::as_str),
        app_id: props.app_id().as_ref().map(ShortString::as_str),
        user_id: props.user_id().as_ref().map(ShortString::as_str),
        kind: props.kind().as_ref().map(ShortString::as_str),
        timestamp: *props.timestamp(),
    };
    let id = command_id(&identity, &delivery.data);
    let span = tracing::info_span!(
        "legacy_command",
        queue = %job.queue.name,
        command_id = %id,
        redelivered = delivery.redelivered,
    );
    process(job, delivery, id).instrument(span).await;
}

async fn process<S: CommandSink>(job: Job<S>, delivery: Delivery, id: String) {
    let received = Instant::now();
    let command = match LegacyCommand::parse(
        &job.queue.name,
        job.queue.stage,
        &delivery.data,
        job.max_bytes,
        id.clone(),
    ) {
        Ok(c) => c,
        Err(m) => return reject(&job, &delivery, &id, m.reason, &m.detail).await,
    };
    let mut claim = None;
    let rejected = send(&job, &delivery, &command, &mut claim, received).await;
    if let Some(claim) = claim {
        claim.release().await;
    }
    if let Some((reason, detail)) = rejected {
        reject(&job, &delivery, &id, reason, &detail).await;
    }
}

/// Sends a command until the sink takes it (then acknowledges the
/// delivery), refuses it for good (returns the reason for the dead
/// letter), or this delivery is given up (abandoned, channel gone).
async fn send<S: CommandSink>(
    job: &Job<S>,
    delivery: &Delivery,
    command: &LegacyCommand,
    claim: &mut Option<Claim>,
    received: Instant,
) -> Option<(&'static str, String)> {
    let mut retry = Backoff::new(job.retry);
    let mut attempt = 1;
    loop {
        let info = DeliveryInfo {
            redelivered: delivery.redelivered,
            attempt,
            recovering: job.recovering,
        };
        let failure = if info.may_be_sent_already() && claim.is_none() {
            match Claim::take(&job.claims, &command.command_id).await {
                Ok(Some(c)) => {
                    *claim = Some(c);
                    None
                }
                Ok(None) => Some("another instance holds this command right now".to_string()),
                Err(e) => Some(format!("cannot claim the command: {e}")),
            }
        } else {
            None
        };
        let failure = match failure {
            Some(f) => f,
            None => {
                let t0 = Instant::now();
                match job.sink.send(command, &info).await {
                    Ok(outcome) => {
                        metrics::histogram!("vidpipe_bridge_sink_seconds")
                            .record(t0.elapsed().as_secs_f64());
                        if ack(delivery).await {
                            let outcome = match outcome {
                                Outcome::Sent => "sent",
                                Outcome::Duplicate => "duplicate",
                            };
                            metrics::counter!(
                                "vidpipe_bridge_acked_total",
                                "queue" => job.queue.name.clone(),
                                "outcome" => outcome,
                            )
                            .increment(1);
                            metrics::histogram!("vidpipe_bridge_command_seconds")
                                .record(received.elapsed().as_secs_f64());
                            tracing::debug!(stage = %command.stage, outcome, "command accepted");
                        }
                        return None;
                    }
                    Err(SinkError::Permanent { reason, detail }) => return Some((reason, detail)),
                    Err(SinkError::Transient(message)) => message,
                }
            }
        };
        metrics::counter!(
            "vidpipe_bridge_sink_retries_total",
            "queue" => job.queue.name.clone(),
        )
        .increment(1);
        if !delivery.acker.usable() {
            tracing::debug!("channel gone: RabbitMQ redelivers the message");
            return None;
        }
        let wait = retry.next_delay();
        match job.throttle.allow() {
            Some(suppressed) => tracing::warn!(
                error = %failure,
                attempt,
                retry_in_ms = wait.as_millis() as u64,
                similar_since_last = suppressed,
                "command not taken yet; the message stays unacknowledged"
            ),
            None => tracing::debug!(
                error = %failure,
                attempt,
                retry_in_ms = wait.as_millis() as u64,
                "command not taken yet; the message stays unacknowledged"
            ),
        }
        tokio::select! {
            _ = job.abandon.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        attempt += 1;
    }
}

/// A command id claimed across instances: an exclusive queue on this
/// instance's connection (RabbitMQ refuses it to every other connection
/// while it exists, and deletes it when the connection goes).
struct Claim {
    channel: Channel,
    queue: ShortString,
}

impl Claim {
    /// The claim, or `None` while another connection holds it.
    async fn take(conn: &Connection, command_id: &str) -> Result<Option<Claim>, lapin::Error> {
        let digest = hex::encode(sha2::Sha256::digest(command_id.as_bytes()));
        let queue: ShortString = format!("{CLAIM_PREFIX}{}", &digest[..32]).into();
        // Its own channel: a refusal closes the channel it came on.
        let channel = conn.create_channel().await?;
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.clone(), exclusive, FieldTable::default())
            .await
        {
            Ok(_) => Ok(Some(Claim { channel, queue })),
            Err(e) if soft_error(&e) == Some(AMQPSoftError::RESOURCELOCKED) => Ok(None),
            Err(e) => {
                let _ = channel.close(200, "claim failed".into()).await;
                Err(e)
            }
        }
    }

    async fn release(self) {
        let _ = self
            .channel
            .queue_delete(self.queue, QueueDeleteOptions::default())
            .await;
        let _ = self.channel.close(200, "released".into()).await;
    }
}

/// Dead-letters a message with its reason, then acknowledges it. If the
/// dead letter cannot be published, the message stays unacknowledged and
/// the session is rebuilt.
async fn reject<S>(
    job: &Job<S>,
    delivery: &Delivery,
    id: &str,
    reason: &'static str,
    detail: &str,
) {
    let t0 = Instant::now();
    match job
        .dead
        .publish(delivery, &job.queue.name, id, reason, detail)
        .await
    {
        Ok(()) => {
            metrics::histogram!("vidpipe_bridge_dead_letter_seconds")
                .record(t0.elapsed().as_secs_f64());
            if ack(delivery).await {
                metrics::counter!(
                    "vidpipe_bridge_rejected_total",
                    "queue" => job.queue.name.clone(),
                    "reason" => reason,
                )
                .increment(1);
                tracing::info!(reason, detail, "malformed command dead-lettered");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, reason, "cannot dead-letter; the message stays unacknowledged");
            job.broken.cancel();
        }
    }
}

/// Acknowledges a delivery; false if its channel is gone (RabbitMQ then
/// redelivers it).
async fn ack(delivery: &Delivery) -> bool {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::debug!("not acknowledged: the channel is gone; RabbitMQ redelivers");
            false
        }
        Err(e) => {
            tracing::debug!(error = %e, "not acknowledged; RabbitMQ redelivers");
            false
        }
    }
}
