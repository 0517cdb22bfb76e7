//! `vidpipe bridge`: the Kafka side of the RabbitMQ adapter
//! (`crates/vidpipe-amqp`, which knows RabbitMQ and the legacy JSON).
//!
//! - **Ingress.** `KafkaSink` turns each valid legacy command into a
//!   [`Command`] record on `<prefix>commands`, keyed by video id, with an
//!   idempotent producer, and returns only when Kafka acknowledged it; the
//!   adapter acknowledges the RabbitMQ message after that. The command id
//!   (the AMQP message id, or a hash of body and delivery identity) becomes
//!   `Command.command_id` and the header `vidpipe.command_id`.
//! - **Redeliveries.** A message that Kafka took but RabbitMQ never saw
//!   acknowledged (a connection lost in between) comes back. The sink keeps
//!   an index of the command ids on `<prefix>commands` (read from the topic
//!   by every instance, so it covers the other instances' sends too, over
//!   the last `dedupe_window_secs` and at most `dedupe_capacity` ids). A
//!   delivery that may have been sent already (redelivered, retried, or
//!   arriving just after a reconnect) first waits until the index has read
//!   up to the topic's current end, and is acknowledged without a new record
//!   if its id is there. What this cannot catch: two copies of one command
//!   handled by two instances at the same moment (a publisher's retry racing
//!   the original); downstream, discovery's claims by command id (for a
//!   restart command, its row in `restarts`) and the status rows'
//!   idempotency make such a repeat harmless.
//! - **Event mirror** (`bridge.mirror = true`). `KafkaEvents` reads
//!   `<prefix>events` in a consumer group (`read_committed`, so aborted
//!   transactions are never mirrored) and the adapter publishes each event
//!   to the topic exchange `vidpipe.events` with routing key
//!   `<stage>.<kind>`. An event's offset is stored only after RabbitMQ
//!   confirmed it, and only stored offsets are committed; after a failure
//!   the consumer seeks back to the committed offsets.
//!
//! Every failure of Kafka or RabbitMQ is retried with backoff until
//! shutdown; `run` returns an error only for configuration problems.
//!
//! Metrics besides the adapter's (see the `vidpipe_amqp` crate docs):
//! `vidpipe_bridge_kafka_seconds` (a command's produce to Kafka's ack) and
//! `vidpipe_bridge_events_skipped_total` (undecodable events not
//! mirrored). `/metrics` is served on `metrics_listen` when set.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use vidpipe_amqp::{
    Backoff, BackoffSettings, Batch, CommandSink, DeliveryInfo, Endpoint, EventSource, Ingress,
    IngressSettings, LegacyCommand, Mirror, MirrorEvent, MirrorSettings, Outcome, QueueSpec,
    SinkError, SourceError, Stage,
};

use crate::config::Config;
use crate::ids;
use crate::records::{Command, LifecycleEvent, Meta, Record, now_ms};
use crate::template::codec::{Codec, Decoder, Encoder};
use crate::template::produce::{self, AckProducer};
use crate::template::topics;

/// Header carrying a command's id on `<prefix>commands`.
const COMMAND_ID_HEADER: &str = "vidpipe.command_id";
/// Timeout of blocking Kafka calls (metadata, watermarks, commits, seeks).
const KAFKA_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a new mirror group starts reading `<prefix>events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorStart {
    /// Every event still on the topic.
    Earliest,
    /// Only events written after the group first joined.
    Latest,
}

/// Settings of the bridge (`[bridge]` in vidpipe.toml,
/// `VIDPIPE_BRIDGE__<KEY>` in the environment).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Consume the legacy command queues.
    pub ingress: bool,
    /// The discovery queue (`{"url", "requested_by", "options"}`); empty:
    /// not consumed. Likewise the four below (`{"video_id", ...}`).
    pub discovery_queue: String,
    /// Restarts at download.
    pub download_queue: String,
    /// Restarts at extract-audio.
    pub audio_extraction_queue: String,
    /// Restarts at transcribe.
    pub transcription_queue: String,
    /// Restarts at summarize.
    pub summarization_queue: String,
    /// Unacknowledged messages per queue and instance.
    pub prefetch: u16,
    /// Topic exchange that malformed commands are published to (routing
    /// key: the source queue), with headers `x-vidpipe-reason`,
    /// `x-vidpipe-error`, `x-vidpipe-queue`, `x-vidpipe-command-id`.
    pub dead_letter_exchange: String,
    /// Durable queue bound to the dead-letter exchange with `#`.
    pub dead_letter_queue: String,
    /// Larger messages are dead-lettered (`too_large`) unread.
    pub max_message_bytes: usize,
    /// How long a command may wait for Kafka's acknowledgement before the
    /// attempt counts as failed (and is retried; the message stays
    /// unacknowledged meanwhile).
    pub kafka_timeout_ms: u64,
    /// How far back the command-id index reads `<prefix>commands` at start.
    pub dedupe_window_secs: u64,
    /// Most command ids the index keeps (oldest dropped first).
    pub dedupe_capacity: usize,
    /// After a reconnect to RabbitMQ, deliveries in this window are checked
    /// against the index even when not flagged redelivered (publishers'
    /// retries arrive then).
    pub dedupe_recovery_secs: u64,
    /// Mirror `<prefix>events` to RabbitMQ.
    pub mirror: bool,
    /// The topic exchange events are mirrored to.
    pub events_exchange: String,
    /// Consumer group of the mirror; empty: `<prefix>bridge-mirror`.
    pub mirror_group: String,
    /// Where a new mirror group starts.
    pub mirror_start: MirrorStart,
    /// Most events published before waiting for their confirms.
    pub mirror_batch: usize,
    /// First delay before reconnecting; doubled up to `reconnect_max_ms`.
    pub reconnect_initial_ms: u64,
    /// Longest delay between reconnects (and between retries of a command).
    pub reconnect_max_ms: u64,
    /// How long shutdown waits for commands in hand.
    pub shutdown_grace_ms: u64,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            ingress: true,
            discovery_queue: Stage::Discover.legacy_queue().into(),
            download_queue: Stage::Download.legacy_queue().into(),
            audio_extraction_queue: Stage::ExtractAudio.legacy_queue().into(),
            transcription_queue: Stage::Transcribe.legacy_queue().into(),
            summarization_queue: Stage::Summarize.legacy_queue().into(),
            prefetch: 64,
            dead_letter_exchange: "vidpipe.dead-letters".into(),
            dead_letter_queue: "vidpipe.dead-letters".into(),
            max_message_bytes: 1 << 20,
            kafka_timeout_ms: 30_000,
            dedupe_window_secs: 24 * 3600,
            dedupe_capacity: 200_000,
            dedupe_recovery_secs: 30,
            mirror: false,
            events_exchange: "vidpipe.events".into(),
            mirror_group: String::new(),
            mirror_start: MirrorStart::Earliest,
            mirror_batch: 500,
            reconnect_initial_ms: 200,
            reconnect_max_ms: 10_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl BridgeConfig {
    fn validate(&self) -> Result<(), BridgeError> {
        let bad = |key: &str, why: &str| Err(BridgeError::Config(format!("bridge.{key} {why}")));
        if !self.ingress && !self.mirror {
            return bad("ingress", "and bridge.mirror are both off: nothing to do");
        }
        if self.ingress && self.queues().is_empty() {
            return bad("discovery_queue", "and the other queue names are all empty");
        }
        if self.prefetch == 0 {
            return bad("prefetch", "must be at least 1");
        }
        if self.kafka_timeout_ms < 1000 {
            return bad("kafka_timeout_ms", "must be at least 1000");
        }
        if self.dedupe_capacity == 0 {
            return bad("dedupe_capacity", "must be at least 1");
        }
        if self.mirror_batch == 0 {
            return bad("mirror_batch", "must be at least 1");
        }
        if self.reconnect_initial_ms == 0 || self.reconnect_initial_ms > self.reconnect_max_ms {
            return bad(
                "reconnect_initial_ms",
                "must be at least 1 and at most bridge.reconnect_max_ms",
            );
        }
        Ok(())
    }

    fn queues(&self) -> Vec<QueueSpec> {
        [
            (&self.discovery_queue, Stage::Discover),
            (&self.download_queue, Stage::Download),
            (&self.audio_extraction_queue, Stage::ExtractAudio),
            (&self.transcription_queue, Stage::Transcribe),
            (&self.summarization_queue, Stage::Summarize),
        ]
        .into_iter()
        .filter(|(name, _)| !name.trim().is_empty())
        .map(|(name, stage)| QueueSpec {
            name: name.trim().to_string(),
            stage,
        })
        .collect()
    }

    fn backoff(&self) -> BackoffSettings {
        BackoffSettings {
            initial: Duration::from_millis(self.reconnect_initial_ms),
            max: Duration::from_millis(self.reconnect_max_ms),
        }
    }

    fn ingress_settings(&self, instance: &str) -> IngressSettings {
        IngressSettings {
            queues: self.queues(),
            prefetch: self.prefetch,
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            max_message_bytes: self.max_message_bytes,
            reconnect: self.backoff(),
            retry: self.backoff(),
            recovery_window: Duration::from_secs(self.dedupe_recovery_secs),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            connection_name: format!("vidpipe-bridge-{instance}"),
        }
    }

    fn mirror_settings(&self, instance: &str) -> MirrorSettings {
        MirrorSettings {
            exchange: self.events_exchange.clone(),
            batch: self.mirror_batch,
            reconnect: self.backoff(),
            connection_name: format!("vidpipe-mirror-{instance}"),
        }
    }
}

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A setting is unusable (permanent).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The ingress stopped for good (a permanent RabbitMQ refusal).
    #[error("legacy command ingress: {0}")]
    Ingress(#[from] vidpipe_amqp::IngressError),
    /// The event mirror stopped for good.
    #[error("event mirror: {0}")]
    Mirror(#[from] vidpipe_amqp::MirrorError),
    /// Kafka refused or is unreachable (retried until shutdown).
    #[error("Kafka at {brokers}: {message}")]
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// What failed.
        message: String,
    },
    /// The schema registry refused or is unreachable (retried).
    #[error("schema registry: {0}")]
    Registry(String),
    /// A task of the bridge ended abnormally.
    #[error("bridge task: {0}")]
    Task(String),
}

impl BridgeError {
    /// Whether trying again later may work.
    pub fn is_retryable(&self) -> bool {
        match self {
            BridgeError::Kafka { .. } | BridgeError::Registry(_) => true,
            BridgeError::Ingress(e) => e.is_retryable(),
            BridgeError::Mirror(e) => e.is_retryable(),
            BridgeError::Config(_) | BridgeError::Task(_) => false,
        }
    }
}

fn kafka_error(config: &Config, e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Kafka {
        brokers: config.kafka_brokers.clone(),
        message: e.to_string(),
    }
}

/// Runs the bridge until `shutdown`: the ingress and, when configured, the
/// event mirror. Unreachable services are waited for; only a permanent
/// problem ends it early.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BridgeError> {
    let bridge = config.bridge.clone();
    bridge.validate()?;
    let endpoint = Endpoint::parse(config.amqp_url.expose_secret())
        .map_err(|e| BridgeError::Config(format!("amqp_url: {e}")))?;
    // Every setting is checked before anything is contacted.
    let instance = instance_name();
    let ingress_settings = bridge.ingress_settings(&instance);
    if bridge.ingress {
        ingress_settings.validate()?;
    }
    let mirror = if bridge.mirror {
        Some(Mirror::new(
            endpoint.clone(),
            bridge.mirror_settings(&instance),
        )?)
    } else {
        None
    };
    crate::api::metrics::serve_on(&config.metrics_listen)
        .map_err(|e| BridgeError::Config(e.to_string()))?;
    let mut wanted = Vec::new();
    if bridge.ingress {
        wanted.push(config.topic("commands"));
    }
    if bridge.mirror {
        wanted.push(config.topic("events"));
    }
    let ensured = retrying(&shutdown, "creating the bridge's topics", || async {
        topics::ensure(
            &config.kafka_brokers,
            &wanted,
            config.topic_partitions,
            config.topic_replication,
        )
        .await
        .map_err(|e| kafka_error(&config, e))
    })
    .await?;
    if ensured.is_none() {
        return Ok(());
    }
    let codec = Codec::new(config.schema_registry_url.as_deref())
        .map_err(|e| BridgeError::Config(format!("schema_registry_url: {e}")))?;

    // One token for every task: the first to fail for good stops the rest.
    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    if bridge.ingress {
        let Some(sink) = retrying(&shutdown, "starting the Kafka command sink", || {
            KafkaSink::open(&config, &codec)
        })
        .await?
        else {
            return Ok(());
        };
        let sink = Arc::new(sink);
        let index = sink.index.clone();
        let token = stop.clone();
        tasks.spawn(async move {
            index.tail(token).await;
            Ok(())
        });
        let ingress = Ingress::new(endpoint, ingress_settings, sink)?;
        let token = stop.clone();
        tasks.spawn(async move { ingress.run(token).await.map_err(BridgeError::from) });
    }
    if let Some(mirror) = mirror {
        let mut source = KafkaEvents::open(&config, &codec)?;
        let token = stop.clone();
        tasks.spawn(async move {
            let result = mirror.run(&mut source, token).await;
            source.close().await;
            result.map_err(BridgeError::from)
        });
    }
    tracing::info!(
        ingress = bridge.ingress,
        mirror = bridge.mirror,
        prefix = config.topic_prefix,
        "bridge running"
    );
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| Err(BridgeError::Task(e.to_string())));
        if let Err(e) = result {
            tracing::error!(error = %e, "bridge stopping");
            stop.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `<host>-<pid>`: names connections and consumer clients.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "vidpipe".into());
    format!("{host}-{}", std::process::id())
}

/// Calls `f` until it succeeds, a permanent error, or shutdown (`None`);
/// retryable errors are logged and retried with backoff.
async fn retrying<T, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    mut f: F,
) -> Result<Option<T>, BridgeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BridgeError>>,
{
    let mut backoff = Backoff::new(BackoffSettings {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(10),
    });
    loop {
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what} failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Writes commands to `<prefix>commands` and waits for Kafka's
/// acknowledgement.
struct KafkaSink {
    producer: AckProducer,
    encoder: Encoder,
    topic: String,
    timeout: Duration,
    index: Arc<RecentCommands>,
    /// Command ids this instance is sending right now: a second delivery
    /// of one of them waits for the first rather than racing it.
    in_flight: Mutex<HashSet<String>>,
}

impl KafkaSink {
    async fn open(config: &Config, codec: &Arc<Codec>) -> Result<Self, BridgeError> {
        let topic = config.topic("commands");
        let timeout = Duration::from_millis(config.bridge.kafka_timeout_ms);
        let producer = AckProducer::new(
            produce::idempotent(&config.kafka_brokers, timeout)
                .set("client.id", format!("vidpipe-bridge-{}", instance_name()))
                .set("linger.ms", "2"),
        )
        .map_err(|e| BridgeError::Config(format!("Kafka producer: {e}")))?;
        let encoder = codec
            .encoder(&topic, Command::SCHEMA)
            .await
            .map_err(|e| BridgeError::Registry(e.to_string()))?;
        let index = RecentCommands::open(config, &topic).await?;
        Ok(Self {
            producer,
            encoder,
            topic,
            timeout,
            index: Arc::new(index),
            in_flight: Mutex::new(HashSet::new()),
        })
    }

    fn claim(&self, id: &str) -> Option<Claim<'_>> {
        let mut set = lock(&self.in_flight);
        set.insert(id.to_string()).then(|| Claim {
            set: &self.in_flight,
            id: id.to_string(),
        })
    }
}

/// The command record for a legacy command (keyed by its video id).
fn build_record(cmd: &LegacyCommand) -> Result<Command, SinkError> {
    let url = match cmd.url.as_deref() {
        Some(raw) => Some(ids::normalise(raw).map_err(|e| SinkError::Permanent {
            reason: vidpipe_amqp::reason::BAD_URL,
            detail: e.to_string(),
        })?),
        None => None,
    };
    let (video_id, start_stage) = match (cmd.stage, &cmd.video_id, &url) {
        (Stage::Discover, _, Some(url)) => (ids::subject(url, false), None),
        (stage, Some(id), _) if stage != Stage::Discover => {
            (id.clone(), Some(stage.as_str().to_string()))
        }
        _ => {
            return Err(SinkError::Permanent {
                reason: vidpipe_amqp::reason::MISSING_FIELD,
                detail: "neither a URL to discover nor a video to restart".into(),
            });
        }
    };
    // As `vidpipe submit`: a source gets a new generation per look, a
    // video its first. A restart gets 0: discovery's run of the command is
    // recorded apart from the video's real generations (which start at 1),
    // and the restart itself picks the video's next generation.
    let generation = if start_stage.is_some() {
        0
    } else if video_id.starts_with("src:") {
        now_ms()
    } else {
        1
    };
    Ok(Command {
        meta: Meta {
            generation,
            ..Meta::new(video_id)
        },
        command_id: cmd.command_id.clone(),
        url: url.map(|u| u.to_string()),
        start_stage,
        requested_by: cmd.requested_by.clone(),
        options: cmd.options.clone().into_iter().collect(),
        submitted_at: now_ms(),
    })
}

/// Holds a command id in `KafkaSink::in_flight` until dropped.
struct Claim<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind
    // (sets, maps); carrying on is safe.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kafka errors that no retry of the same record can fix.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

impl CommandSink for KafkaSink {
    async fn send(
        &self,
        cmd: &LegacyCommand,
        delivery: &DeliveryInfo,
    ) -> Result<Outcome, SinkError> {
        let record = build_record(cmd)?;
        let payload = self
            .encoder
            .encode(&record)
            .map_err(|e| SinkError::Permanent {
                reason: "unencodable",
                detail: e.to_string(),
            })?;
        let Some(_claim) = self.claim(&cmd.command_id) else {
            return Err(SinkError::Transient(
                "this instance is sending the same command right now".into(),
            ));
        };
        if self.index.contains(&cmd.command_id) {
            return Ok(Outcome::Duplicate);
        }
        if delivery.may_be_sent_already() {
            self.index
                .catch_up(self.timeout)
                .await
                .map_err(SinkError::Transient)?;
            if self.index.contains(&cmd.command_id) {
                tracing::info!(
                    command_id = cmd.command_id,
                    "already on Kafka: not sent again"
                );
                return Ok(Outcome::Duplicate);
            }
        }
        let source = format!("amqp:{}", cmd.queue);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: COMMAND_ID_HEADER,
                value: Some(cmd.command_id.as_str()),
            })
            .insert(Header {
                key: "vidpipe.source",
                value: Some(source.as_str()),
            });
        let key = record.meta.video_id.as_str();
        let t0 = Instant::now();
        let sent = self
            .producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(key)
                    .payload(&payload)
                    .headers(headers),
                self.timeout,
            )
            .await;
        metrics::histogram!("vidpipe_bridge_kafka_seconds").record(t0.elapsed().as_secs_f64());
        match sent {
            Ok(_) => {
                self.index.insert(cmd.command_id.clone());
                tracing::debug!(video_id = key, "command on Kafka");
                Ok(Outcome::Sent)
            }
            Err(e) if refused_for_good(&e) => Err(SinkError::Permanent {
                reason: "kafka_refused",
                detail: e.to_string(),
            }),
            Err(e) => Err(SinkError::Transient(format!("Kafka: {e}"))),
        }
    }
}

/// The ids of recent commands on `<prefix>commands` (from their
/// `vidpipe.command_id` header), read by a consumer of its own that is
/// assigned every partition (no group, no commits).
struct RecentCommands {
    topic: String,
    consumer: Arc<StreamConsumer>,
    partitions: Vec<i32>,
    capacity: usize,
    state: Mutex<IndexState>,
    /// The last high watermarks fetched and when; concurrent catch-ups
    /// share one fetch.
    marks: tokio::sync::Mutex<Option<(Instant, HashMap<i32, i64>)>>,
}

#[derive(Default)]
struct IndexState {
    ids: HashSet<String>,
    order: VecDeque<String>,
    /// Next offset to read, per partition.
    next: HashMap<i32, i64>,
}

impl RecentCommands {
    async fn open(config: &Config, topic: &str) -> Result<Self, BridgeError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set(
                "client.id",
                format!("vidpipe-bridge-index-{}", instance_name()),
            )
            // Required by the client; never joined (assign, no commits).
            .set("group.id", format!("{}bridge-index", config.topic_prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| BridgeError::Config(format!("Kafka consumer: {e}")))?;
        let consumer = Arc::new(consumer);
        let window = Duration::from_secs(config.bridge.dedupe_window_secs);
        let (c, t) = (consumer.clone(), topic.to_string());
        let starts = tokio::task::spawn_blocking(move || start_offsets(&c, &t, window))
            .await
            .map_err(|e| BridgeError::Task(e.to_string()))?
            .map_err(|e| kafka_error(config, e))?;
        let mut assignment = TopicPartitionList::new();
        for (p, offset) in &starts {
            assignment
                .add_partition_offset(topic, *p, Offset::Offset(*offset))
                .map_err(|e| kafka_error(config, e))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| kafka_error(config, e))?;
        Ok(Self {
            topic: topic.to_string(),
            consumer,
            partitions: starts.keys().copied().collect(),
            capacity: config.bridge.dedupe_capacity,
            state: Mutex::new(IndexState {
                next: starts,
                ..IndexState::default()
            }),
            marks: tokio::sync::Mutex::new(None),
        })
    }

    fn contains(&self, id: &str) -> bool {
        lock(&self.state).ids.contains(id)
    }

    fn insert(&self, id: String) {
        let mut st = lock(&self.state);
        if st.ids.insert(id.clone()) {
            st.order.push_back(id);
            while st.order.len() > self.capacity {
                if let Some(old) = st.order.pop_front() {
                    st.ids.remove(&old);
                }
            }
        }
    }

    /// Reads the topic into the index until `stop`.
    async fn tail(&self, stop: CancellationToken) {
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                m = self.consumer.recv() => m,
            };
            match received {
                Ok(m) => {
                    let id = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == COMMAND_ID_HEADER)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .map(str::to_string)
                    });
                    let (p, next) = (m.partition(), m.offset() + 1);
                    if let Some(id) = id {
                        self.insert(id);
                    }
                    lock(&self.state).next.insert(p, next);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "command index: Kafka error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Waits until the index has read every command written before this
    /// call, or fails after `limit` (Kafka unreachable or slow).
    async fn catch_up(&self, limit: Duration) -> Result<(), String> {
        let asked = Instant::now();
        let deadline = tokio::time::Instant::from_std(asked + limit);
        let marks = tokio::time::timeout_at(deadline, self.watermarks(asked))
            .await
            .map_err(|_| "the command index cannot reach Kafka".to_string())??;
        loop {
            if self.reached(&marks) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("the command index did not catch up with Kafka in time".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn reached(&self, marks: &HashMap<i32, i64>) -> bool {
        let positions = self.consumer.position().ok();
        let st = lock(&self.state);
        marks.iter().all(|(p, high)| {
            let read = st.next.get(p).copied().unwrap_or(0);
            let fetched = positions
                .as_ref()
                .and_then(|tpl| tpl.find_partition(&self.topic, *p))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            read.max(fetched) >= *high
        })
    }

    /// High watermarks fetched at or after `not_before`.
    async fn watermarks(&self, not_before: Instant) -> Result<HashMap<i32, i64>, String> {
        let mut cached = self.marks.lock().await;
        if let Some((at, marks)) = cached.as_ref()
            && *at >= not_before
        {
            return Ok(marks.clone());
        }
        let fetched_at = Instant::now();
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let partitions = self.partitions.clone();
        let marks = tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, *p, KAFKA_CALL_TIMEOUT)
                        .map(|(_, high)| (*p, high))
                        .map_err(|e| format!("Kafka: {e}"))
                })
                .collect::<Result<HashMap<_, _>, _>>()
        })
        .await
        .map_err(|e| e.to_string())??;
        *cached = Some((fetched_at, marks.clone()));
        Ok(marks)
    }
}

/// Where the index starts reading each partition: the first offset at or
/// after `now - window`, or the end when nothing is that recent.
fn start_offsets(
    consumer: &StreamConsumer,
    topic: &str,
    window: Duration,
) -> Result<HashMap<i32, i64>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), KAFKA_CALL_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    let since = now_ms() - i64::try_from(window.as_millis()).unwrap_or(i64::MAX / 2);
    let mut query = TopicPartitionList::new();
    for p in &partitions {
        query.add_partition_offset(topic, *p, Offset::Offset(since.max(0)))?;
    }
    let found = consumer.offsets_for_times(query, KAFKA_CALL_TIMEOUT)?;
    let mut starts = HashMap::new();
    for p in partitions {
        let offset = match found.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= 0 => o,
            _ => consumer.fetch_watermarks(topic, p, KAFKA_CALL_TIMEOUT)?.1,
        };
        starts.insert(p, offset);
    }
    Ok(starts)
}

/// Reads lifecycle events for the mirror, in a consumer group.
struct KafkaEvents {
    consumer: Arc<StreamConsumer>,
    decoder: Decoder,
    topic: String,
    start: MirrorStart,
}

impl KafkaEvents {
    fn open(config: &Config, codec: &Arc<Codec>) -> Result<Self, BridgeError> {
        let topic = config.topic("events");
        let group = if config.bridge.mirror_group.trim().is_empty() {
            format!("{}bridge-mirror", config.topic_prefix)
        } else {
            config.bridge.mirror_group.trim().to_string()
        };
        let start = config.bridge.mirror_start;
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set("client.id", format!("vidpipe-mirror-{}", instance_name()))
            .set("group.id", &group)
            // Offsets are stored only after RabbitMQ confirmed, and only
            // stored offsets are (auto-)committed.
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", "1000")
            .set(
                "auto.offset.reset",
                match start {
                    MirrorStart::Earliest => "earliest",
                    MirrorStart::Latest => "latest",
                },
            )
            .set("isolation.level", "read_committed")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create()
            .map_err(|e| BridgeError::Config(format!("Kafka consumer: {e}")))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| kafka_error(config, e))?;
        let decoder = codec
            .decoder(LifecycleEvent::SCHEMA)
            .map_err(|e| BridgeError::Config(e.to_string()))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            decoder,
            topic,
            start,
        })
    }

    /// Commits what was confirmed and leaves the group.
    async fn close(self) {
        let consumer = self.consumer;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            drop(consumer);
        })
        .await;
    }

    /// Waits for the next record; Kafka errors are logged, not returned:
    /// librdkafka reconnects by itself, and RabbitMQ should not churn
    /// because Kafka hiccuped.
    async fn recv(&self) -> OwnedMessage {
        loop {
            match self.consumer.recv().await {
                Ok(m) => return m.detach(),
                Err(e) => {
                    tracing::debug!(error = %e, "event mirror: Kafka error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

impl EventSource for KafkaEvents {
    type Position = HashMap<i32, i64>;

    async fn next_batch(&mut self, max: usize) -> Result<Batch<Self::Position>, SourceError> {
        let mut raw = vec![self.recv().await];
        // Whatever else is ready now (recv is ready at once when librdkafka
        // holds fetched records), up to the bound.
        while raw.len() < max {
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(m)) => raw.push(m.detach()),
                _ => break,
            }
        }
        let mut events = Vec::with_capacity(raw.len());
        let mut position = HashMap::new();
        for m in raw {
            position.insert(m.partition(), m.offset() + 1);
            let Some(payload) = m.payload() else {
                metrics::counter!("vidpipe_bridge_events_skipped_total").increment(1);
                continue;
            };
            match self.decoder.decode::<LifecycleEvent>(payload).await {
                Ok(e) => events.push(mirror_event(&e, &m)),
                Err(e) if e.is_retryable() => return Err(SourceError::Transient(e.to_string())),
                Err(e) => {
                    metrics::counter!("vidpipe_bridge_events_skipped_total").increment(1);
                    tracing::warn!(
                        partition = m.partition(),
                        offset = m.offset(),
                        error = %e,
                        "undecodable lifecycle event not mirrored"
                    );
                }
            }
        }
        Ok(Batch { events, position })
    }

    async fn commit(&mut self, position: Self::Position) -> Result<(), SourceError> {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in position {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(next))
                .map_err(|e| SourceError::Transient(e.to_string()))?;
        }
        // A partition taken away by a rebalance cannot be stored any more;
        // its new owner mirrors from the committed offset (a repeat).
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "event offsets not stored (rebalanced?)");
        }
        Ok(())
    }

    async fn rewind(&mut self) -> Result<(), SourceError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let fallback = match self.start {
            MirrorStart::Earliest => Offset::Beginning,
            MirrorStart::Latest => Offset::End,
        };
        tokio::task::spawn_blocking(move || {
            // Stored (confirmed) offsets first, so that the committed ones
            // are the newest confirmed position.
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            let assigned = consumer.assignment().map_err(|e| e.to_string())?;
            let committed = consumer
                .committed_offsets(assigned, KAFKA_CALL_TIMEOUT)
                .map_err(|e| e.to_string())?;
            for e in committed.elements() {
                let offset = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => fallback,
                };
                consumer
                    .seek(&topic, e.partition(), offset, KAFKA_CALL_TIMEOUT)
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        })
        .await
        .map_err(|e| SourceError::Transient(e.to_string()))?
        .map_err(|e| SourceError::Transient(format!("Kafka: {e}")))
    }
}

/// The RabbitMQ message of a lifecycle event: JSON with the event's fields
/// in lower case, routing key `<stage>.<kind>`, and the event's Kafka
/// position as its message id (the same on a repeat).
fn mirror_event(e: &LifecycleEvent, m: &OwnedMessage) -> MirrorEvent {
    let body = serde_json::json!({
        "video_id": e.meta.video_id,
        "generation": e.meta.generation,
        "trace_id": e.meta.trace_id,
        "stage": e.stage,
        "kind": e.kind.as_str(),
        "attempt": e.attempt,
        "at": e.at,
        "duration_ms": e.duration_ms,
        "error_class": e.error_class,
        "error": e.error,
        "input": {
            "topic": e.input_topic,
            "partition": e.input_partition,
            "offset": e.input_offset,
        },
    });
    MirrorEvent {
        // Dots separate the words of a topic exchange's routing keys.
        routing_key: format!("{}.{}", e.stage.replace('.', "-"), e.kind.as_str()),
        body: body.to_string().into_bytes(),
        message_id: format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
        timestamp_ms: e.at,
        headers: vec![
            ("video_id".into(), e.meta.video_id.clone()),
            ("trace_id".into(), e.meta.trace_id.clone()),
            ("stage".into(), e.stage.clone()),
            ("kind".into(), e.kind.as_str().into()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Figment;
    use figment::providers::{Format, Serialized, Toml};

    #[test]
    fn bridge_settings_parse_strictly_with_defaults() {
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(
            "[bridge]\nprefetch = 8\nmirror = true\nmirror_start = \"latest\"\ndownload_queue = \"\"\n",
        ));
        let config = Config::from_figment(figment).unwrap();
        assert_eq!(config.bridge.prefetch, 8);
        assert!(config.bridge.mirror);
        assert_eq!(config.bridge.mirror_start, MirrorStart::Latest);
        assert_eq!(config.bridge.discovery_queue, "discovery_queue");
        let queues = config.bridge.queues();
        assert_eq!(queues.len(), 4);
        assert!(queues.iter().all(|q| q.stage != Stage::Download));
        let typo = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[bridge]\nprefetc = 8\n"));
        let err = Config::from_figment(typo).unwrap_err().to_string();
        assert!(err.contains("prefetc"), "{err}");
    }

    #[test]
    fn unusable_settings_are_refused_by_name() {
        let mut b = BridgeConfig {
            prefetch: 0,
            ..BridgeConfig::default()
        };
        assert!(b.validate().unwrap_err().to_string().contains("prefetch"));
        b.prefetch = 1;
        b.ingress = false;
        assert!(
            b.validate()
                .unwrap_err()
                .to_string()
                .contains("nothing to do")
        );
        b.mirror = true;
        assert!(b.validate().is_ok());
    }

    #[test]
    fn legacy_commands_become_command_records() {
        let sink_record = build_record;
        let mut cmd = LegacyCommand {
            command_id: "m-1".into(),
            queue: "discovery_queue".into(),
            stage: Stage::Discover,
            url: Some("https://example.com/talk.mp4?utm_source=x".into()),
            video_id: None,
            requested_by: Some("ops".into()),
            options: [("lang".to_string(), "en".to_string())].into(),
        };
        let c = sink_record(&cmd).unwrap();
        assert_eq!(c.command_id, "m-1");
        assert_eq!(c.url.as_deref(), Some("https://example.com/talk.mp4"));
        let url = ids::normalise("https://example.com/talk.mp4").unwrap();
        assert_eq!(c.meta.video_id, ids::subject(&url, false));
        assert_eq!(c.meta.generation, 1);
        assert_eq!(c.start_stage, None);
        assert_eq!(c.options["lang"], "en");
        cmd.stage = Stage::Transcribe;
        cmd.url = None;
        cmd.video_id = Some("yt:abc".into());
        let c = sink_record(&cmd).unwrap();
        assert_eq!(c.meta.video_id, "yt:abc");
        assert_eq!(c.start_stage.as_deref(), Some("transcribe"));
        assert_eq!(c.meta.generation, 0, "a restart's own run is generation 0");
        cmd.stage = Stage::Discover;
        cmd.url = Some("https://[::1".into());
        let err = sink_record(&cmd).unwrap_err();
        assert!(
            matches!(
                err,
                SinkError::Permanent {
                    reason: "bad_url",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
