//! The stage runner: one consumer-group member running one [`Stage`].
//!
//! Two halves:
//! - the *loop*, on a dedicated OS thread, owns the Kafka consumer and
//!   producer. It receives records, keeps per-partition offsets and per-key
//!   queues, dispatches records to workers, produces what workers return,
//!   commits, pauses partitions when too much is in flight, and handles
//!   rebalances. librdkafka's transactional and commit calls block; on their
//!   own thread they never stall the async executor, and the rebalance
//!   callback (which librdkafka calls from inside `poll`) can commit
//!   synchronously before partitions change hands. The periodic
//!   exactly-once commit runs on a short-lived thread of its own, so the
//!   loop keeps feeding workers meanwhile (see `begin_commit`).
//! - *workers*, async tasks on the Tokio runtime, one per running record:
//!   decode, status rows, the stage itself with retries and backoff, encode.
//!   They never touch Kafka: they send their encoded records back to the
//!   loop.
//!
//! Guarantees (see docs/ARCHITECTURE.md for their limits):
//! - exactly-once: the loop's producer is transactional; outputs, lifecycle
//!   events, dead letters and the input offsets (with the commit metadata of
//!   finished records above the lowest unfinished one) are committed in one
//!   transaction per commit interval. An abortable error aborts and rewinds
//!   every partition to its committed offsets; a fatal one (fenced by a
//!   newer instance or generation) also recreates the producer.
//! - at-least-once: outputs are produced idempotently and an offset moves
//!   only after every record it covers was acknowledged by the broker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use rand::Rng;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext, PurgeConfig};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::codec::{Codec, CodecError, Decoder, Encoder};
use super::keyed::KeyedQueue;
use super::offsets::PartitionOffsets;
use super::produce;
use super::status::{Fence, Finish, StatusStore, StatusWriteError, StatusWriter, WriteOutcome};
use super::{Context, ErrorClass, Stage, StageError};
use crate::config::{Config, Guarantee};
use crate::records::{DEAD_LETTER_SCHEMA, DeadLetter, EventKind, LifecycleEvent, Record, now_ms};

/// Timeout of blocking broker calls (commits, transactions, offsets).
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Records taken from the consumer per turn of the loop before results,
/// deliveries and commits are seen to.
const POLL_BATCH: usize = 256;

/// How often librdkafka reports its statistics, and so how often the
/// consumer lag gauge is set.
const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// Longest time the loop goes without polling the consumer.
const MAX_POLL_GAP: Duration = Duration::from_millis(50);

/// Longest sleep of an idle loop: the shutdown signal is noticed within it.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Why a runner could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// A Kafka client could not be created or initialised.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A schema could not be used or registered.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// The loop thread ended abnormally.
    #[error("runner loop: {0}")]
    Loop(String),
}

/// What a runner needs besides the stage.
pub struct RunnerSettings {
    /// The whole configuration (brokers, topic prefix, guarantee, tuning).
    pub config: Config,
    /// Consumer group; by default `<prefix><stage>`.
    pub group: Option<String>,
    /// This instance's stable identity: the suffix of its transactional id
    /// (a restart with the same identity fences its previous incarnation at
    /// once) and the owner recorded on partition leases.
    pub instance: String,
    /// Whether success in this stage finishes the video.
    pub final_stage: bool,
    /// Where status rows go; `None` runs without database status.
    pub status: Option<StatusStore>,
    /// Encoding.
    pub codec: Arc<Codec>,
}

/// A record produced by a worker, in bytes, for the loop to send.
struct Out {
    topic: Arc<str>,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

/// A record handed to a worker.
struct Job {
    partition: i32,
    instance: u64,
    offset: i64,
    key: Vec<u8>,
    payload: Option<Vec<u8>>,
    fence: Option<Fence>,
    cancel: CancellationToken,
}

enum WorkerMsg {
    /// Produce now (a `started` or `retried` event).
    Produce(Out),
    /// The record is finished: produce these, then its offset may move.
    Done {
        partition: i32,
        instance: u64,
        offset: i64,
        key: Vec<u8>,
        outs: Vec<Out>,
        /// The worker lost its authority (lease gone or shut down): the
        /// record stays unfinished and is run again by the partition's owner.
        abandoned: bool,
        /// Abandoned because the partition's lease was taken.
        fenced: bool,
    },
}

/// Identifies a record whose deliveries are awaited (at-least-once).
type Token = Option<(i32, u64, i64)>;

/// Exactly-once: what a worker reported while a commit was under way.
/// librdkafka refuses to produce while a transaction commits, so these wait
/// for the next transaction, in the order they came.
enum Held {
    Produce(Out),
    Done {
        partition: i32,
        instance: u64,
        offset: i64,
        outs: Vec<Out>,
    },
}

/// An exactly-once commit under way on the committer thread.
struct Committing {
    started: Instant,
    result: std::sync::mpsc::Receiver<KafkaResult<()>>,
}

/// Work for the committer thread: one transaction commit.
type CommitJob = Box<dyn FnOnce() + Send>;

/// The thread a runner's exactly-once commits run on, one after another.
/// Started with the first commit and kept: at the default interval a
/// busy stage commits ten times a second, and a thread per commit would
/// be ten thread starts a second for nothing. Ends when the runner drops
/// it (the channel closes).
#[derive(Default)]
struct Committer {
    jobs: Option<std::sync::mpsc::Sender<CommitJob>>,
}

impl Committer {
    /// Hands `job` to the thread, starting it first if there is none or it
    /// died (a commit that panicked: its caller sees the result channel
    /// closed and aborts that transaction). An error means the job was not
    /// run and will not be.
    fn run(&mut self, stage: &str, job: CommitJob) -> std::io::Result<()> {
        let job = match &self.jobs {
            Some(jobs) => match jobs.send(job) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (jobs, queue) = std::sync::mpsc::channel::<CommitJob>();
        std::thread::Builder::new()
            .name(format!("vidpipe-{stage}-commit"))
            .spawn(move || {
                for job in queue {
                    job();
                }
            })?;
        // The receiver lives in the thread just started, which only drops
        // it once every sender is gone: this send cannot fail.
        jobs.send(job)
            .map_err(|_| std::io::Error::other("the commit thread ended at its start"))?;
        self.jobs = Some(jobs);
        Ok(())
    }
}

/// Producer context collecting delivery reports for the loop.
#[derive(Default)]
struct Deliveries {
    reports: Mutex<Vec<(Token, Option<String>)>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Token>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Self::DeliveryOpaque) {
        let err = result.as_ref().err().map(|(e, _)| e.to_string());
        lock(&self.reports).push((*token, err));
    }
}

/// Waits until every produced message is acknowledged, serving delivery
/// reports as they come. rdkafka's own `flush` (also the first step of its
/// `commit_transaction`) polls in 100 ms slices and its `poll` returns only
/// when a slice is over, so any message outstanding at the start cost a
/// whole 100 ms: most of every commit's time in exactly-once mode. A short
/// `poll` would spin instead (see [`produce`]).
fn flush(producer: &BaseProducer<Deliveries>, timeout: Duration) -> KafkaResult<()> {
    let deadline = Instant::now() + timeout;
    if produce::serve_until(producer, deadline, || producer.in_flight_count() == 0) {
        Ok(())
    } else {
        Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
    }
}

/// Commits the open transaction with the input `offsets`: the offsets
/// first, then every outstanding output acknowledged, then the commit.
fn commit_transaction(
    producer: &BaseProducer<Deliveries>,
    offsets: &TopicPartitionList,
    group: &ConsumerGroupMetadata,
) -> KafkaResult<()> {
    producer
        .send_offsets_to_transaction(offsets, group, BROKER_TIMEOUT)
        .and_then(|()| flush(producer, BROKER_TIMEOUT))
        .and_then(|()| producer.commit_transaction(BROKER_TIMEOUT))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the loop down with a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Output records copied into a stage run's status row; beyond this many
/// (a channel listing) only their ids are kept.
const MAX_RECORDS_IN_STATUS: usize = 20;

/// Consumer context: rebalance callbacks run inside `poll`, on the loop
/// thread, and work on the loop's state directly.
struct RebalanceHook {
    state: Arc<Mutex<LoopState>>,
}

impl ClientContext for RebalanceHook {
    /// librdkafka's statistics (every [`STATS_INTERVAL`]), delivered inside
    /// `poll` on the loop thread like the rebalance callbacks: the lag
    /// gauge. The default would log them at info level.
    fn stats(&self, statistics: Statistics) {
        lock(&self.state).report_lag(&statistics);
    }
}

impl ConsumerContext for RebalanceHook {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            lock(&self.state).revoke(consumer, &partitions);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut state = lock(&self.state);
                state
                    .pending_assign
                    .extend(tpl.elements().iter().map(|e| e.partition()));
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

struct Partition {
    /// Distinguishes this ownership from earlier ones of the same partition,
    /// so results of records from before a rewind or revoke are dropped.
    instance: u64,
    fence: Option<Fence>,
    offsets: PartitionOffsets,
    keys: KeyedQueue<Job>,
    /// Cancelled when the partition is revoked or rewound.
    cancel: CancellationToken,
}

type Dispatch = Arc<dyn Fn(Job) + Send + Sync>;

struct LoopState {
    stage: &'static str,
    guarantee: Guarantee,
    group: String,
    input_topic: String,
    instance_id: String,
    producer_config: ClientConfig,
    /// Shared with the thread that commits a transaction (exactly-once).
    producer: Arc<BaseProducer<Deliveries>>,
    /// The exactly-once commit under way, if any (see `begin_commit`).
    committing: Option<Committing>,
    committer: Committer,
    /// Worker reports that arrived while it was under way.
    held: VecDeque<Held>,
    partitions: HashMap<i32, Partition>,
    pending_assign: Vec<i32>,
    dispatch: Dispatch,
    next_instance: u64,
    /// Something to commit since the last commit.
    dirty: bool,
    /// The open transaction hit an error and must be aborted.
    txn_failed: bool,
    /// Exactly-once: when the open transaction got its first record (a
    /// `started` event, say) while no record had finished. It must be
    /// committed within the transaction timeout, but not in a hurry.
    txn_opened: Option<Instant>,
    /// Deliveries awaited per record (at-least-once).
    awaiting: HashMap<(i32, u64, i64), usize>,
    /// Workers dispatched and not yet reported.
    running: usize,
    /// A worker found a partition lease taken (see `reclaim`).
    lease_lost: bool,
    /// Records whose video is free, waiting for a worker (at most
    /// `in_flight_limit` run at once).
    ready: VecDeque<Job>,
    paused: bool,
    in_flight_limit: usize,
    buffer_limit: usize,
    status: Option<StatusStore>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    metrics: LoopMetrics,
}

/// The loop's per-record metrics, resolved once (a lookup by name and
/// labels per record costs more than the rest of the bookkeeping).
struct LoopMetrics {
    records_in: Counter,
    records_out: Counter,
    skipped: Counter,
    in_flight: Gauge,
    commit_seconds: Histogram,
}

impl LoopMetrics {
    fn new(stage: &'static str) -> Self {
        Self {
            records_in: counter!("vidpipe_records_in_total", "stage" => stage),
            records_out: counter!("vidpipe_records_out_total", "stage" => stage),
            skipped: counter!("vidpipe_records_skipped_total", "stage" => stage),
            in_flight: gauge!("vidpipe_in_flight", "stage" => stage),
            commit_seconds: histogram!("vidpipe_commit_seconds", "stage" => stage),
        }
    }
}

/// Runs `stage` until `shutdown` is cancelled, then drains in-flight work
/// (up to the configured grace), commits and leaves the group.
pub async fn run<S: Stage>(
    stage: Arc<S>,
    settings: RunnerSettings,
    shutdown: CancellationToken,
) -> Result<(), RunnerError> {
    let config = &settings.config;
    let input_topic = config.topic(S::INPUT);
    let output_topic: Arc<str> = config.topic(S::OUTPUT).into();
    let events_topic: Arc<str> = config.topic("events").into();
    let dlq_topic: Arc<str> = config.topic("dlq").into();
    let group = settings
        .group
        .clone()
        .unwrap_or_else(|| format!("{}{}", config.topic_prefix, S::NAME));

    let loop_thread: Arc<OnceLock<std::thread::Thread>> = Arc::default();
    let worker = Arc::new(Worker::<S> {
        stage,
        decoder: settings.codec.decoder(S::Input::SCHEMA)?,
        output: settings
            .codec
            .encoder(&output_topic, S::Output::SCHEMA)
            .await?,
        events: settings
            .codec
            .encoder(&events_topic, LifecycleEvent::SCHEMA)
            .await?,
        dlq: settings
            .codec
            .encoder(&dlq_topic, DEAD_LETTER_SCHEMA)
            .await?,
        output_topic,
        events_topic,
        dlq_topic,
        input_topic: input_topic.clone(),
        // Every worker has at most one status write queued: a batch can
        // hold one row per record in flight.
        status: settings
            .status
            .as_ref()
            .map(|s| s.writer(config.runner.in_flight)),
        final_stage: settings.final_stage,
        processing_seconds: histogram!("vidpipe_processing_seconds", "stage" => S::NAME),
        loop_thread: loop_thread.clone(),
        running_row_after: Duration::from_millis(config.runner.status_running_after_ms),
        max_attempts: config.runner.max_attempts,
        backoff_initial: Duration::from_millis(config.runner.backoff_initial_ms),
        backoff_max: Duration::from_millis(config.runner.backoff_max_ms),
    });

    // Bounded: at most `in_flight` workers run, each sends a handful of
    // messages, so senders rarely wait.
    let (tx, rx) = mpsc::channel::<WorkerMsg>(config.runner.in_flight * 4 + 16);
    let runtime = tokio::runtime::Handle::current();
    let dispatch: Dispatch = {
        let runtime = runtime.clone();
        Arc::new(move |job: Job| {
            let worker = worker.clone();
            let tx = tx.clone();
            runtime.spawn(async move { worker.run(job, tx).await });
        })
    };

    let mut consumer_config = ClientConfig::new();
    consumer_config
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", &group)
        .set(
            "client.id",
            format!("vidpipe-{}-{}", S::NAME, settings.instance),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "statistics.interval.ms",
            STATS_INTERVAL.as_millis().to_string(),
        )
        .set(
            "session.timeout.ms",
            config.runner.session_timeout_ms.to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (config.runner.session_timeout_ms / 4).max(500).to_string(),
        );

    let mut producer_config = ClientConfig::new();
    producer_config
        .set("bootstrap.servers", &config.kafka_brokers)
        .set(
            "client.id",
            format!("vidpipe-{}-{}", S::NAME, settings.instance),
        )
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    if config.guarantee == Guarantee::ExactlyOnce {
        producer_config
            .set("transactional.id", format!("{group}-{}", settings.instance))
            // A crashed instance's open transaction blocks read_committed
            // readers until it times out: keep that short.
            .set(
                "transaction.timeout.ms",
                config.runner.transaction_timeout_ms.to_string(),
            );
    }

    let producer: BaseProducer<Deliveries> =
        producer_config.create_with_context(Deliveries::default())?;
    let state = Arc::new(Mutex::new(LoopState {
        stage: S::NAME,
        guarantee: config.guarantee,
        group: group.clone(),
        input_topic: input_topic.clone(),
        instance_id: settings.instance.clone(),
        producer_config,
        producer: Arc::new(producer),
        committing: None,
        committer: Committer::default(),
        held: VecDeque::new(),
        partitions: HashMap::new(),
        pending_assign: Vec::new(),
        dispatch,
        next_instance: 0,
        dirty: false,
        txn_failed: false,
        txn_opened: None,
        awaiting: HashMap::new(),
        running: 0,
        lease_lost: false,
        ready: VecDeque::new(),
        paused: false,
        in_flight_limit: config.runner.in_flight,
        buffer_limit: config.runner.max_buffered,
        status: settings.status.clone(),
        runtime,
        shutdown: shutdown.clone(),
        metrics: LoopMetrics::new(S::NAME),
    }));
    let consumer: BaseConsumer<RebalanceHook> =
        consumer_config.create_with_context(RebalanceHook {
            state: state.clone(),
        })?;

    let commit_interval = Duration::from_millis(config.runner.commit_interval_ms);
    let grace = Duration::from_millis(config.runner.shutdown_grace_ms);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let handle = std::thread::Builder::new()
        .name(format!("vidpipe-{}", S::NAME))
        .spawn(move || {
            let result = event_loop(consumer, state, rx, &input_topic, commit_interval, grace);
            let _ = done_tx.send(result);
        })
        .map_err(|e| RunnerError::Loop(e.to_string()))?;
    let _ = loop_thread.set(handle.thread().clone());
    done_rx
        .await
        .map_err(|_| RunnerError::Loop("the loop thread ended without a result".into()))?
}

fn event_loop(
    mut consumer: BaseConsumer<RebalanceHook>,
    state: Arc<Mutex<LoopState>>,
    mut rx: mpsc::Receiver<WorkerMsg>,
    input_topic: &str,
    commit_interval: Duration,
    grace: Duration,
) -> Result<(), RunnerError> {
    {
        let s = lock(&state);
        if s.guarantee == Guarantee::ExactlyOnce {
            s.producer.init_transactions(BROKER_TIMEOUT)?;
            s.producer.begin_transaction()?;
        }
    }
    // The loop sleeps until something happens (see `LoopState::wait`):
    // records or a rebalance arriving wake it through the consumer queue's
    // callback, finished workers by unparking it themselves. A slow stage's
    // loop (a transcription runs for seconds) then sleeps instead of polling
    // a thousand times a second, which on a small machine preempted the very
    // work it waits for.
    let this = std::thread::current();
    consumer.set_nonempty_callback(move || this.unpark());
    consumer.subscribe(&[input_topic])?;
    let stage = lock(&state).stage;
    info!(stage, topic = input_topic, "runner started");
    let mut last_commit = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    let mut last_poll = Instant::now();

    loop {
        let shutting_down = lock(&state).shutdown.is_cancelled();
        if shutting_down && drain_deadline.is_none() {
            info!(stage, "shutting down: finishing in-flight records");
            drain_deadline = Some(Instant::now() + grace);
            lock(&state).pause_all(&consumer);
        }
        if let Some(deadline) = drain_deadline {
            let running = lock(&state).running;
            if running == 0 || Instant::now() >= deadline {
                let mut s = lock(&state);
                s.drain_messages(&mut rx);
                s.settle_deliveries(&consumer);
                s.commit(&consumer);
                if running > 0 {
                    warn!(
                        stage,
                        running,
                        "grace period over: unfinished records will run again on the next owner"
                    );
                }
                s.release_all();
                break;
            }
        }
        let starved = {
            let s = lock(&state);
            s.ready.len() < s.in_flight_limit
        };
        // Records are taken from the consumer when the workers are about to
        // need them. While enough are queued for them, the loop waits for
        // results instead and librdkafka keeps its prefetched records (it
        // bounds them itself, `queued.max.messages.kbytes`); taking them
        // anyway would fill the buffer until the partitions pause, and every
        // pause drops that prefetch. The consumer is still polled at least
        // every MAX_POLL_GAP, for rebalances and `max.poll.interval.ms`:
        // with a slow stage the buffer then fills and pauses as before.
        let take = starved || last_poll.elapsed() >= MAX_POLL_GAP;
        // Up to a batch of the records librdkafka already holds, then the
        // bookkeeping below once for all of them. The state is locked per
        // record, not across `poll`: a rebalance callback inside `poll`
        // locks it too. No waiting here: the wait is below, and whatever
        // happens wakes it.
        let mut taken = 0;
        for _ in 0..if take { POLL_BATCH } else { 0 } {
            last_poll = Instant::now();
            // `poll` also answers None when it served a rebalance or a
            // statistics event and no record: a second look tells that from
            // an empty queue, which would not wake the loop again for the
            // records still queued.
            let message = match consumer.poll(Duration::ZERO) {
                None => consumer.poll(Duration::ZERO),
                message => message,
            };
            taken += 1;
            let mut s = lock(&state);
            s.take_assignments(&consumer);
            match message {
                Some(Ok(m)) if drain_deadline.is_none() => s.receive(&m),
                // Fetched before the pause took effect: not started, so it is
                // simply left for the next owner (its offset is not committed).
                Some(Ok(_)) => {}
                Some(Err(e)) => warn!(stage, error = %e, "consumer error"),
                None => break,
            }
        }
        let mut s = lock(&state);
        s.settle_commit(&consumer, false);
        s.drain_messages(&mut rx);
        if drain_deadline.is_none() {
            s.reclaim(&consumer);
        }
        // While a commit is under way its thread serves the producer's
        // events (librdkafka's commit flushes).
        if s.committing.is_none() {
            s.producer.poll(Duration::ZERO);
            s.take_deliveries(&consumer);
        }
        if drain_deadline.is_none() {
            s.backpressure(&consumer);
        }
        // At most one commit per interval, but as soon as there is something
        // to commit and the last one is an interval old. A fixed timer made
        // every finished record wait half an interval on average before the
        // next stage could see it (read_committed): with media records
        // nearly every commit is of that kind, and the pipeline's hops add
        // up. Under a steady flow of records this commits every interval,
        // as before.
        if s.commit_due(last_commit.elapsed(), commit_interval) {
            match s.guarantee {
                Guarantee::ExactlyOnce => s.begin_commit(&consumer),
                Guarantee::AtLeastOnce => s.commit(&consumer),
            }
            last_commit = Instant::now();
        }
        // A full batch may have left records in librdkafka's queue, and a
        // queue that stays non-empty does not call back again: go round at
        // once. Otherwise sleep until woken or something falls due.
        if taken < POLL_BATCH {
            let wait = s.wait(
                last_commit.elapsed(),
                commit_interval,
                (!take).then(|| MAX_POLL_GAP.saturating_sub(last_poll.elapsed())),
                drain_deadline.is_some(),
            );
            drop(s);
            if !wait.is_zero() {
                std::thread::park_timeout(wait);
            }
        }
    }
    consumer.unsubscribe();
    info!(stage, "runner stopped");
    Ok(())
}

impl LoopState {
    fn take_assignments<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if self.pending_assign.is_empty() {
            return;
        }
        let partitions = std::mem::take(&mut self.pending_assign);
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&self.input_topic, *p);
        }
        let Some(committed) = self.read_committed(consumer, &tpl) else {
            // Shutting down: the partitions were never started here.
            return;
        };
        for p in partitions.iter().copied() {
            let (position, metadata) = committed
                .find_partition(&self.input_topic, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some((o, e.metadata().to_string())),
                    _ => None,
                })
                .unwrap_or((0, String::new()));
            let fence = self.lease(p);
            self.next_instance += 1;
            debug!(
                stage = self.stage,
                partition = p,
                position,
                "partition assigned"
            );
            self.partitions.insert(
                p,
                Partition {
                    instance: self.next_instance,
                    fence,
                    offsets: PartitionOffsets::from_commit(position, &metadata),
                    keys: KeyedQueue::default(),
                    cancel: self.shutdown.child_token(),
                },
            );
        }
        // librdkafka keeps a partition's pause across a revoke and a new
        // assignment (a lost membership, a rewind): without an explicit
        // resume a partition paused under load and assigned again would
        // never be fetched from. Resume the new partitions, and every other
        // one if the instance was paused; backpressure pauses all again if
        // the buffer is still full.
        if self.shutdown.is_cancelled() {
            // Draining: nothing new starts.
            self.pause_all(consumer);
            return;
        }
        let mut fresh = TopicPartitionList::new();
        for p in &partitions {
            fresh.add_partition(&self.input_topic, *p);
        }
        if let Err(e) = consumer.resume(&fresh) {
            warn!(stage = self.stage, error = %e, "cannot resume assigned partitions");
        }
        if self.paused {
            if let Ok(all) = consumer.assignment()
                && let Err(e) = consumer.resume(&all)
            {
                warn!(stage = self.stage, error = %e, "cannot resume partitions");
            }
            self.paused = false;
        }
        self.backpressure(consumer);
    }

    /// The committed offsets (and their metadata) of newly assigned
    /// partitions, waiting for them as long as it takes.
    ///
    /// Starting without them is not an option: from offset 0 the stage
    /// would re-run every record already committed, and its next commit
    /// would move the group's offset back, so that in exactly-once mode
    /// the outputs appear twice. That happened when the previous owner
    /// stopped in the middle of a transaction (the zombie test): the group
    /// coordinator holds the offsets of a partition with a pending
    /// transactional commit as unstable until that transaction ends, at
    /// the latest when the broker aborts it after `transaction.timeout.ms`,
    /// and librdkafka's read gave up first. The loop waits here (other
    /// partitions wait too; heartbeats go on in librdkafka's threads) and
    /// stops waiting only for shutdown.
    fn read_committed<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tpl: &TopicPartitionList,
    ) -> Option<TopicPartitionList> {
        let mut delay = Duration::from_millis(200);
        loop {
            let problem = match consumer.committed_offsets(tpl.clone(), BROKER_TIMEOUT) {
                Ok(c) => match c.elements().iter().find_map(|e| e.error().err()) {
                    None => return Some(c),
                    Some(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            counter!("vidpipe_offset_read_retries_total", "stage" => self.stage).increment(1);
            warn!(
                stage = self.stage,
                error = %problem,
                "cannot read the committed offsets of assigned partitions (a previous owner's transaction may still be open): retrying"
            );
            if self.shutdown.is_cancelled() {
                return None;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Takes the partition's lease for database writes (fencing zombies).
    fn lease(&self, partition: i32) -> Option<Fence> {
        let status = self.status.as_ref()?;
        let mut delay = Duration::from_millis(200);
        for _ in 0..8 {
            match self.runtime.block_on(status.acquire(
                &self.group,
                &self.input_topic,
                partition,
                &self.instance_id,
            )) {
                Ok(epoch) => {
                    return Some(Fence {
                        group: self.group.clone(),
                        topic: self.input_topic.clone(),
                        partition,
                        epoch,
                    });
                }
                Err(e) => {
                    warn!(stage = self.stage, partition, error = %e, "cannot take partition lease; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Status writes of this partition will be refused (no valid
        // lease) and logged; processing and outputs go on.
        error!(
            stage = self.stage,
            partition, "no partition lease: status rows will not be written"
        );
        Some(Fence {
            group: self.group.clone(),
            topic: self.input_topic.clone(),
            partition,
            epoch: -1,
        })
    }

    fn receive<M: Message>(&mut self, m: &M) {
        let p = m.partition();
        let offset = m.offset();
        let Some(part) = self.partitions.get_mut(&p) else {
            return;
        };
        self.metrics.records_in.increment(1);
        if !part.offsets.receive(offset) {
            self.metrics.skipped.increment(1);
            return;
        }
        // Records without a key have no order to keep: each is its own key.
        let key = m
            .key()
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| format!("@{offset}").into_bytes());
        let job = Job {
            partition: p,
            instance: part.instance,
            offset,
            key: key.clone(),
            payload: m.payload().map(<[u8]>::to_vec),
            fence: part.fence.clone(),
            cancel: part.cancel.child_token(),
        };
        if let Some(job) = part.keys.push(&key, job) {
            self.start(job);
        }
    }

    fn drain_messages(&mut self, rx: &mut mpsc::Receiver<WorkerMsg>) {
        while let Ok(msg) = rx.try_recv() {
            match msg {
                WorkerMsg::Produce(out) if self.committing.is_some() => {
                    self.held.push_back(Held::Produce(out));
                }
                WorkerMsg::Produce(out) => self.produce(out, None),
                WorkerMsg::Done {
                    partition,
                    instance,
                    offset,
                    key,
                    outs,
                    abandoned,
                    fenced,
                } => {
                    self.running -= 1;
                    let Some(part) = self.partitions.get_mut(&partition) else {
                        continue;
                    };
                    if part.instance != instance {
                        continue;
                    }
                    if let Some(next) = part.keys.finish(&key) {
                        self.ready.push_back(next);
                    }
                    if fenced {
                        // Another instance took this partition's lease while
                        // Kafka still gives it to us: a zombie that woke up and
                        // re-leased, or we are the zombie. Re-lease and rewind
                        // (see `reclaim`): the abandoned record must run again
                        // here if we are the owner, or it would hold the
                        // partition's offset forever.
                        self.lease_lost = true;
                    }
                    if abandoned {
                        continue;
                    }
                    match self.guarantee {
                        // Its offset stays unfinished until the outputs are
                        // in a transaction: the commit under way does not
                        // include it.
                        Guarantee::ExactlyOnce if self.committing.is_some() => {
                            self.held.push_back(Held::Done {
                                partition,
                                instance,
                                offset,
                                outs,
                            });
                        }
                        Guarantee::ExactlyOnce => {
                            self.done_exactly_once(partition, instance, offset, outs)
                        }
                        Guarantee::AtLeastOnce if outs.is_empty() => {
                            part.offsets.complete(offset);
                            self.dirty = true;
                        }
                        Guarantee::AtLeastOnce => {
                            self.awaiting
                                .insert((partition, instance, offset), outs.len());
                            for out in outs {
                                self.produce(out, Some((partition, instance, offset)));
                            }
                        }
                    }
                }
            }
        }
        self.fill();
    }

    /// A record finished in exactly-once mode: its outputs go into the open
    /// transaction, and its offset with them at the next commit. A record
    /// of an ownership that has ended since (it was held across a commit)
    /// is dropped whole, outputs included: its next owner runs it.
    fn done_exactly_once(&mut self, partition: i32, instance: u64, offset: i64, outs: Vec<Out>) {
        let Some(part) = self
            .partitions
            .get_mut(&partition)
            .filter(|p| p.instance == instance)
        else {
            return;
        };
        // Marked before the outputs are sent, which changes nothing: no
        // commit comes in between, and a failed send fails the transaction.
        part.offsets.complete(offset);
        for out in outs {
            self.produce(out, None);
        }
        self.dirty = true;
    }

    /// Runs `job` now if a worker is free, else queues it.
    fn start(&mut self, job: Job) {
        self.ready.push_back(job);
        self.fill();
    }

    /// Starts queued records while workers are free. A queued record of a
    /// partition that was revoked or rewound since is dropped: it is not
    /// committed, so its next owner runs it.
    fn fill(&mut self) {
        // While a commit is under way, at most about a worker pool's worth
        // of finished records is held (two entries each: the `started`
        // event and the result): enough to keep the workers busy across
        // the commit, and the next transaction stays small. Unbounded, a
        // fast stage held the whole buffer, whose outputs then made the next
        // commit slow in turn (10,000 records per transaction, partitions
        // paused in between).
        if self.committing.is_some() && self.held.len() >= 2 * self.in_flight_limit {
            return;
        }
        while self.running < self.in_flight_limit {
            let Some(job) = self.ready.pop_front() else {
                break;
            };
            let current = self
                .partitions
                .get(&job.partition)
                .is_some_and(|p| p.instance == job.instance);
            if current {
                self.running += 1;
                (self.dispatch)(job);
            }
        }
    }

    fn produce(&mut self, out: Out, token: Token) {
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (k, v) in &out.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = BaseRecord::with_opaque_to(&out.topic, Box::new(token))
            .key(&out.key)
            .payload(&out.payload)
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.metrics.records_out.increment(1);
                    // Anything produced opens the broker-side transaction and
                    // starts its timeout: commit it on the next interval even
                    // if no record finished (a long record's `started` event
                    // would otherwise hold it open until the broker aborts it
                    // and fences this producer).
                    if self.guarantee == Guarantee::ExactlyOnce && self.txn_opened.is_none() {
                        self.txn_opened = Some(Instant::now());
                    }
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is bounded: wait for deliveries.
                    record = back;
                    let queued = self.producer.in_flight_count();
                    produce::serve_until(
                        &self.producer,
                        Instant::now() + Duration::from_millis(10),
                        || self.producer.in_flight_count() < queued,
                    );
                }
                Err((e, _)) => {
                    error!(stage = self.stage, error = %e, "cannot produce");
                    self.delivery_failed(token);
                    return;
                }
            }
        }
    }

    fn delivery_failed(&mut self, token: Token) {
        match (self.guarantee, token) {
            (Guarantee::ExactlyOnce, _) => self.txn_failed = true,
            (Guarantee::AtLeastOnce, Some((p, instance, _))) => {
                // The record's offset never moves; rewinding the partition
                // re-runs it (and its neighbours, idempotently).
                self.awaiting.retain(|k, _| k.0 != p || k.1 != instance);
                self.pending_rewind(p);
            }
            (Guarantee::AtLeastOnce, None) => {}
        }
    }

    fn pending_rewind(&mut self, p: i32) {
        if let Some(part) = self.partitions.get_mut(&p) {
            part.cancel.cancel();
            // Marking the instance stale makes every in-flight result drop;
            // the actual seek happens in rewind() at the next commit.
            part.instance = 0;
        }
        self.txn_failed = true;
    }

    fn take_deliveries<C: ConsumerContext>(&mut self, _consumer: &BaseConsumer<C>) {
        let reports = std::mem::take(&mut *lock(&self.producer.context().reports));
        for (token, err) in reports {
            if let Some(e) = err {
                error!(stage = self.stage, error = %e, "delivery failed");
                self.delivery_failed(token);
                continue;
            }
            let Some(key) = token else { continue };
            let Some(left) = self.awaiting.get_mut(&key) else {
                continue;
            };
            *left -= 1;
            if *left == 0 {
                self.awaiting.remove(&key);
                if let Some(part) = self.partitions.get_mut(&key.0)
                    && part.instance == key.1
                {
                    part.offsets.complete(key.2);
                    self.dirty = true;
                }
            }
        }
    }

    /// Waits for every outstanding delivery (before a commit that must
    /// include them).
    fn settle_deliveries<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if self.guarantee == Guarantee::AtLeastOnce && !self.awaiting.is_empty() {
            if let Err(e) = flush(&self.producer, BROKER_TIMEOUT) {
                warn!(stage = self.stage, error = %e, "flush before commit failed");
            }
            self.take_deliveries(consumer);
        }
    }

    fn buffered(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.offsets.in_flight())
            .sum()
    }

    fn backpressure<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let buffered = self.buffered();
        self.metrics.in_flight.set(buffered as f64);
        if !self.paused && buffered >= self.buffer_limit {
            self.pause_all(consumer);
        } else if self.paused && buffered <= self.buffer_limit / 2 {
            if let Ok(tpl) = consumer.assignment()
                && let Err(e) = consumer.resume(&tpl)
            {
                warn!(stage = self.stage, error = %e, "cannot resume partitions");
            }
            self.paused = false;
        }
    }

    fn pause_all<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if let Ok(tpl) = consumer.assignment()
            && let Err(e) = consumer.pause(&tpl)
        {
            warn!(stage = self.stage, error = %e, "cannot pause partitions");
        }
        self.paused = true;
    }

    fn commit_list(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (p, part) in &self.partitions {
            if part.instance == 0 {
                continue;
            }
            let (position, metadata) = part.offsets.commit_point();
            let mut elem = tpl.add_partition(&self.input_topic, *p);
            if elem.set_offset(Offset::Offset(position)).is_ok() {
                elem.set_metadata(metadata);
            }
        }
        tpl
    }

    /// How long the loop may sleep when nothing wakes it. Records arriving
    /// and rebalances wake it (the consumer queue's callback), so do workers
    /// finishing (they unpark it). Delivery reports do not (they are served
    /// by polling the producer): while some are awaited, and while draining
    /// for shutdown, it looks every millisecond. Otherwise until the next
    /// commit falls due or the consumer must be polled (`poll_within`), and
    /// at most IDLE_WAIT.
    fn wait(
        &self,
        since_commit: Duration,
        interval: Duration,
        poll_within: Option<Duration>,
        draining: bool,
    ) -> Duration {
        if !self.awaiting.is_empty() || draining {
            return Duration::from_millis(1);
        }
        let mut wait = poll_within.unwrap_or(IDLE_WAIT).min(IDLE_WAIT);
        if self.dirty || self.txn_failed {
            wait = wait.min(interval.saturating_sub(since_commit));
        }
        if let Some(opened) = self.txn_opened {
            let due = interval
                .saturating_sub(since_commit)
                .max(interval.saturating_sub(opened.elapsed()));
            wait = wait.min(due);
        }
        wait
    }

    /// Whether a commit has anything to do now, `since_commit` after the
    /// last one: finished records (offsets to move, outputs to make
    /// visible) once an interval has passed since the last commit; a
    /// transaction holding only `started` events once it is itself an
    /// interval old (committing it at once would make the record's own
    /// result, a moment later, wait a whole interval).
    fn commit_due(&self, since_commit: Duration, interval: Duration) -> bool {
        self.committing.is_none()
            && since_commit >= interval
            && (self.dirty
                || self.txn_failed
                || self.txn_opened.is_some_and(|t| t.elapsed() >= interval))
    }

    /// Exactly-once, periodic: starts committing the open transaction on
    /// the committer thread and returns. The loop goes on taking records and
    /// starting workers; what workers report meanwhile is held (librdkafka
    /// refuses to produce while a transaction commits) and produced into the
    /// next transaction once this one is committed (`settle_commit`). A
    /// commit on the loop held every finished worker, and so the next
    /// records, for a third of the time at a 100 ms interval.
    fn begin_commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if self.committing.is_some() {
            return;
        }
        let Some((offsets, group)) = self.transaction_to_commit(consumer) else {
            return;
        };
        let producer = self.producer.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let wake = std::thread::current();
        let job: CommitJob = Box::new(move || {
            let _ = tx.send(commit_transaction(&producer, &offsets, &group));
            wake.unpark();
        });
        match self.committer.run(self.stage, job) {
            Ok(_) => {
                self.committing = Some(Committing {
                    started: Instant::now(),
                    result: rx,
                });
            }
            Err(e) => {
                // Nothing was sent: the transaction is still open with
                // everything in it, and the offsets are taken again.
                warn!(stage = self.stage, error = %e, "cannot start a commit thread: committing on the loop");
                self.dirty = true;
                self.commit(consumer);
            }
        }
    }

    /// Exactly-once: the offsets and group metadata to commit the open
    /// transaction with, if it needs committing (a failed one is aborted
    /// here instead). From here on the transaction counts as committed
    /// until told otherwise.
    fn transaction_to_commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Option<(TopicPartitionList, ConsumerGroupMetadata)> {
        if self.txn_failed {
            self.abort_and_rewind(consumer, false);
            return None;
        }
        if !self.dirty && self.txn_opened.is_none() {
            return None;
        }
        let group = consumer.group_metadata()?;
        self.dirty = false;
        self.txn_opened = None;
        Some((self.commit_list(), group))
    }

    /// Exactly-once: the transaction committed; the next one begins.
    fn begin_next_transaction<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) -> bool {
        if let Err(e) = self.producer.begin_transaction() {
            error!(stage = self.stage, error = %e, "cannot begin transaction");
            self.abort_and_rewind(consumer, true);
            return false;
        }
        true
    }

    /// Exactly-once: takes the outcome of the commit under way, if any,
    /// waiting for it when `block`. Once committed, the next transaction
    /// begins and the held reports are produced into it, in order. If the
    /// commit failed, the transaction is aborted and every partition rewound
    /// (the held reports are dropped: their records run again). Returns
    /// false if it failed, or is still under way and `block` is false.
    fn settle_commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        block: bool,
    ) -> bool {
        let Some(committing) = &self.committing else {
            return true;
        };
        // A commit thread that ended without an answer (it panicked) leaves
        // the transaction's fate unknown: abort it.
        let gone = || Err(KafkaError::Canceled);
        let result = if block {
            committing.result.recv().unwrap_or_else(|_| gone())
        } else {
            match committing.result.try_recv() {
                Ok(result) => result,
                Err(std::sync::mpsc::TryRecvError::Empty) => return false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => gone(),
            }
        };
        let started = committing.started;
        self.committing = None;
        self.record_commit(started);
        match result {
            Ok(()) => {
                if !self.begin_next_transaction(consumer) {
                    return false;
                }
                for held in std::mem::take(&mut self.held) {
                    match held {
                        Held::Produce(out) => self.produce(out, None),
                        Held::Done {
                            partition,
                            instance,
                            offset,
                            outs,
                        } => self.done_exactly_once(partition, instance, offset, outs),
                    }
                }
                true
            }
            Err(e) => {
                self.commit_failed(consumer, e);
                false
            }
        }
    }

    /// An exactly-once commit failed: abort and rewind, with a new producer
    /// if this one is fenced or broken.
    fn commit_failed<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, e: KafkaError) {
        match e {
            KafkaError::Transaction(e) if e.is_fatal() => {
                warn!(stage = self.stage, error = %e, "producer fenced or failed: recreating it");
                self.abort_and_rewind(consumer, true);
            }
            e => {
                warn!(stage = self.stage, error = %e, "transaction commit failed: aborting and rewinding");
                self.abort_and_rewind(consumer, false);
            }
        }
    }

    /// Commits finished work and waits for the broker: offsets (and, in
    /// exactly-once mode, the transaction holding the outputs).
    fn commit<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let started = Instant::now();
        match self.guarantee {
            Guarantee::ExactlyOnce => {
                if !self.settle_commit(consumer, true) {
                    return;
                }
                let Some((offsets, group)) = self.transaction_to_commit(consumer) else {
                    return;
                };
                match commit_transaction(&self.producer, &offsets, &group) {
                    Ok(()) => {
                        self.begin_next_transaction(consumer);
                    }
                    Err(e) => self.commit_failed(consumer, e),
                }
            }
            Guarantee::AtLeastOnce => {
                if self.txn_failed {
                    self.txn_failed = false;
                    self.rewind(consumer, true);
                    return;
                }
                if !self.dirty {
                    return;
                }
                let tpl = self.commit_list();
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => self.dirty = false,
                    Err(e) => {
                        warn!(stage = self.stage, error = %e, "offset commit failed; will retry")
                    }
                }
            }
        }
        self.record_commit(started);
    }

    /// The commit latency metric, and a debug line.
    fn record_commit(&self, started: Instant) {
        let took = started.elapsed();
        self.metrics.commit_seconds.record(took.as_secs_f64());
        debug!(
            stage = self.stage,
            took_ms = took.as_secs_f64() * 1e3,
            "committed"
        );
    }

    fn abort_and_rewind<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, recreate: bool) {
        // A commit under way ends first (a failed one aborts and rewinds by
        // itself); what it held is aborted below with the next transaction.
        if !self.settle_commit(consumer, true) {
            return;
        }
        counter!("vidpipe_transaction_aborts_total", "stage" => self.stage).increment(1);
        let mut recreate = recreate;
        if !recreate {
            // librdkafka's abort waits for the delivery reports of every
            // outstanding message, and a BaseProducer only delivers them
            // when polled: purge them and serve their reports first, or the
            // abort blocks for its whole timeout and fails.
            self.producer
                .purge(PurgeConfig::default().queue().inflight());
            produce::serve_until(
                &self.producer,
                Instant::now() + Duration::from_secs(10),
                || self.producer.in_flight_count() == 0,
            );
            // Their outputs are aborted with the transaction: forget them.
            lock(&self.producer.context().reports).clear();
        }
        if !recreate && let Err(e) = self.producer.abort_transaction(BROKER_TIMEOUT) {
            warn!(stage = self.stage, error = %e, "abort failed: recreating the producer");
            recreate = true;
        }
        if recreate {
            match self
                .producer_config
                .create_with_context::<_, BaseProducer<Deliveries>>(Deliveries::default())
            {
                Ok(p) => {
                    self.producer = Arc::new(p);
                    if let Err(e) = self.producer.init_transactions(BROKER_TIMEOUT) {
                        error!(stage = self.stage, error = %e, "cannot initialise transactions");
                    }
                }
                Err(e) => error!(stage = self.stage, error = %e, "cannot recreate producer"),
            }
        }
        if let Err(e) = self.producer.begin_transaction() {
            error!(stage = self.stage, error = %e, "cannot begin transaction after abort");
        }
        self.txn_failed = false;
        self.dirty = false;
        self.txn_opened = None;
        self.held.clear();
        self.rewind(consumer, false);
    }

    /// After a worker was fenced: whatever is finished is committed (or, in
    /// exactly-once mode, the open transaction is aborted), then every
    /// partition is rewound to its committed offset with a fresh lease. If
    /// this instance is the zombie, Kafka takes the partitions away at the
    /// next poll; if it is the owner, it re-runs the abandoned records.
    fn reclaim<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if !std::mem::take(&mut self.lease_lost) {
            return;
        }
        counter!("vidpipe_lease_reclaims_total", "stage" => self.stage).increment(1);
        warn!(
            stage = self.stage,
            "a partition lease was taken by another instance: re-leasing and rewinding"
        );
        match self.guarantee {
            Guarantee::ExactlyOnce => self.abort_and_rewind(consumer, false),
            Guarantee::AtLeastOnce => {
                self.settle_deliveries(consumer);
                self.commit(consumer);
                self.rewind(consumer, false);
            }
        }
    }

    /// Forgets in-memory progress and seeks every partition back to its
    /// committed offset: the aborted outputs are produced again.
    fn rewind<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, only_stale: bool) {
        let targets: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, p)| !only_stale || p.instance == 0)
            .map(|(p, _)| *p)
            .collect();
        if targets.is_empty() {
            return;
        }
        for p in &targets {
            if let Some(part) = self.partitions.remove(p) {
                part.cancel.cancel();
            }
        }
        self.awaiting.retain(|k, _| !targets.contains(&k.0));
        self.ready.retain(|j| !targets.contains(&j.partition));
        self.pending_assign.extend(targets.iter().copied());
        // Re-read the committed offsets (and take fresh leases), then seek.
        self.take_assignments(consumer);
        let mut tpl = TopicPartitionList::new();
        for p in &targets {
            let position = self
                .partitions
                .get(p)
                .map(|part| part.offsets.position())
                .unwrap_or(0);
            let _ = tpl.add_partition_offset(&self.input_topic, *p, Offset::Offset(position));
        }
        if let Err(e) = consumer.seek_partitions(tpl, BROKER_TIMEOUT) {
            error!(stage = self.stage, error = %e, "cannot seek after rewind");
        }
        info!(stage = self.stage, partitions = ?targets, "rewound to committed offsets");
    }

    /// Partitions are being taken away: commit what is finished, then
    /// forget them (their unfinished records run on the new owner).
    fn revoke<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>, partitions: &[i32]) {
        self.settle_commit(consumer, true);
        if consumer.assignment_lost() {
            // Our membership is gone: a commit would be refused, and the
            // open transaction would be fenced. Abort it.
            if self.guarantee == Guarantee::ExactlyOnce {
                let _ = self.producer.abort_transaction(BROKER_TIMEOUT);
                let _ = self.producer.begin_transaction();
                self.dirty = false;
                self.txn_opened = None;
                self.txn_failed = false;
            }
        } else {
            self.settle_deliveries(consumer);
            self.commit(consumer);
        }
        for p in partitions {
            if let Some(part) = self.partitions.remove(p) {
                part.cancel.cancel();
                // Its lag is the new owner's to report; a stale value here
                // would count the backlog twice in a sum over instances.
                self.lag_gauge(*p).set(0.0);
            }
        }
        self.awaiting.retain(|k, _| !partitions.contains(&k.0));
        self.ready.retain(|j| !partitions.contains(&j.partition));
        debug!(stage = self.stage, ?partitions, "partitions revoked");
    }

    fn release_all(&mut self) {
        self.ready.clear();
        for part in self.partitions.values() {
            part.cancel.cancel();
        }
        self.partitions.clear();
    }

    fn lag_gauge(&self, partition: i32) -> Gauge {
        gauge!("vidpipe_consumer_lag", "stage" => self.stage, "partition" => partition.to_string())
    }

    /// Sets `vidpipe_consumer_lag` for the owned partitions from
    /// librdkafka's statistics, which carry each partition's last stable
    /// offset as of its latest fetch: no request to the broker. (Asking the
    /// broker for watermarks here, once per partition on the loop thread,
    /// stalled every stage for seconds each time on a busy machine.)
    fn report_lag(&self, stats: &Statistics) {
        let Some(topic) = stats.topics.get(&self.input_topic) else {
            return;
        };
        for (p, part) in &self.partitions {
            let Some(s) = topic.partitions.get(p) else {
                continue;
            };
            // read_committed: the last stable offset is as far as this
            // consumer can read; unknown (negative) before the first fetch.
            let end = s.ls_offset;
            if end < 0 {
                continue;
            }
            // A transaction's commit marker takes an offset after its last
            // record, so a caught-up partition of a transactional topic
            // stands one short of `end`: caught up is nothing unfinished,
            // nothing prefetched, and the fetcher at the end.
            let caught_up =
                part.offsets.in_flight() == 0 && s.fetchq_cnt == 0 && s.next_offset >= end;
            let lag = if caught_up {
                0
            } else {
                (end - part.offsets.position()).max(0)
            };
            self.lag_gauge(*p).set(lag as f64);
        }
    }
}

/// Everything a worker needs, shared by all workers of a runner.
struct Worker<S: Stage> {
    stage: Arc<S>,
    decoder: Decoder,
    output: Encoder,
    events: Encoder,
    dlq: Encoder,
    output_topic: Arc<str>,
    events_topic: Arc<str>,
    dlq_topic: Arc<str>,
    input_topic: String,
    status: Option<StatusWriter>,
    final_stage: bool,
    processing_seconds: Histogram,
    /// How long a run goes before its `running` row is written.
    running_row_after: Duration,
    /// The loop thread, woken when a record is done (it waits for results
    /// rather than records while enough are queued for the workers).
    loop_thread: Arc<OnceLock<std::thread::Thread>>,
    max_attempts: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
}

/// How a record ended, for the worker's bookkeeping.
enum Ending {
    Outputs(Vec<Out>),
    Abandoned,
    /// A status write found the partition's lease taken by another
    /// instance: left to the owner, and this instance checks its own claim.
    Fenced,
}

impl<S: Stage> Worker<S> {
    async fn run(self: Arc<Self>, job: Job, tx: mpsc::Sender<WorkerMsg>) {
        let ending = self.process(&job, &tx).await;
        let (outs, abandoned, fenced) = match ending {
            Ending::Outputs(outs) => (outs, false, false),
            Ending::Abandoned => (Vec::new(), true, false),
            Ending::Fenced => (Vec::new(), true, true),
        };
        // The loop may be gone after shutdown; then there is nothing to do.
        let _ = tx
            .send(WorkerMsg::Done {
                partition: job.partition,
                instance: job.instance,
                offset: job.offset,
                key: job.key,
                outs,
                abandoned,
                fenced,
            })
            .await;
        if let Some(thread) = self.loop_thread.get() {
            thread.unpark();
        }
    }

    fn backoff(&self, attempt: u32, asked: Option<Duration>) -> Duration {
        if let Some(after) = asked {
            return after.min(self.backoff_max);
        }
        // Full jitter: uniformly random up to the exponential bound, so that
        // many records failing together do not retry together.
        let bound = self
            .backoff_initial
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        let ms = rand::rng().random_range(0..=bound.as_millis() as u64);
        Duration::from_millis(ms)
    }

    async fn process(&self, job: &Job, tx: &mpsc::Sender<WorkerMsg>) -> Ending {
        let payload = job.payload.as_deref().unwrap_or_default();
        let mut decode_attempt = 1;
        let input: S::Input = loop {
            match self.decoder.decode(payload).await {
                Ok(v) => break v,
                Err(e) if e.is_retryable() && decode_attempt < self.max_attempts => {
                    warn!(stage = S::NAME, error = %e, "cannot decode yet; retrying");
                    if self.sleep(job, self.backoff(decode_attempt, None)).await {
                        return Ending::Abandoned;
                    }
                    decode_attempt += 1;
                }
                Err(e) => {
                    counter!("vidpipe_failures_total", "stage" => S::NAME, "class" => "undecodable")
                        .increment(1);
                    warn!(stage = S::NAME, partition = job.partition, offset = job.offset, error = %e,
                          "undecodable record sent to the dead-letter topic");
                    return Ending::Outputs(vec![self.dead_letter(
                        job,
                        None,
                        "undecodable",
                        &e.to_string(),
                        decode_attempt,
                    )]);
                }
            }
        };
        let meta = input.meta().clone();
        let span = info_span!("record", stage = S::NAME, video_id = %meta.video_id,
                              generation = meta.generation, trace_id = %meta.trace_id,
                              partition = job.partition, offset = job.offset);
        self.process_decoded(job, input, tx).instrument(span).await
    }

    async fn process_decoded(
        &self,
        job: &Job,
        input: S::Input,
        tx: &mpsc::Sender<WorkerMsg>,
    ) -> Ending {
        let meta = input.meta().clone();
        let is_video = self.stage.is_video(&input);
        let started = Instant::now();
        let mut attempt: u32 = 1;
        loop {
            if job.cancel.is_cancelled() {
                return Ending::Abandoned;
            }
            if attempt == 1 {
                let _ = tx
                    .send(WorkerMsg::Produce(self.event(
                        job,
                        &meta,
                        EventKind::Started,
                        attempt,
                        None,
                        None,
                    )))
                    .await;
            }
            let ctx = Context {
                stage: S::NAME,
                meta: meta.clone(),
                attempt,
                cancel: job.cancel.clone(),
            };
            // The `running` row is written while the stage runs rather than
            // before it, and only once the run has lasted
            // `runner.status_running_after_ms`: a fast stage then costs no
            // extra round trip, and its run gets its final row only. Once
            // under way, the write's outcome is awaited before the result
            // counts: a fenced writer (the partition's lease went to another
            // instance) cancels the stage and leaves the record to the new
            // owner. The final row is fenced the same way.
            let row_attempt = attempt as i32;
            let writing = AtomicBool::new(false);
            let started_row = async {
                let (Some(status), Some(fence)) = (&self.status, &job.fence) else {
                    return None;
                };
                if !self.running_row_after.is_zero() {
                    tokio::time::sleep(self.running_row_after).await;
                }
                writing.store(true, Ordering::Relaxed);
                self.with_db_retries(job, || {
                    status.started(fence, &meta, input.url(), S::NAME, row_attempt, is_video)
                })
                .await
            };
            let t0 = Instant::now();
            let work = self.stage.process(input.clone(), &ctx);
            tokio::pin!(work, started_row);
            let mut row_done = false;
            let mut fenced = false;
            let result = loop {
                tokio::select! {
                    r = &mut work => {
                        self.processing_seconds.record(t0.elapsed().as_secs_f64());
                        break r;
                    }
                    outcome = &mut started_row, if !row_done => {
                        row_done = true;
                        if outcome == Some(WriteOutcome::Fenced) {
                            fenced = true;
                            ctx.cancel.cancel();
                        }
                    }
                }
            };
            // A write under way is waited for (its outcome says whether
            // this instance was fenced); one not begun is dropped.
            if !row_done && writing.load(Ordering::Relaxed) {
                fenced = started_row.await == Some(WriteOutcome::Fenced);
            }
            if fenced {
                counter!("vidpipe_fenced_writes_total", "stage" => S::NAME).increment(1);
                warn!(
                    "partition lease lost (a newer owner fenced this instance): leaving the record to it"
                );
                return Ending::Fenced;
            }
            let result = result.and_then(|outputs| self.encode_outputs(&outputs));
            match result {
                Ok((outs, refs)) => {
                    let took = started.elapsed();
                    let mut outs = outs;
                    outs.push(self.event(
                        job,
                        &meta,
                        EventKind::Succeeded,
                        attempt,
                        Some(took),
                        None,
                    ));
                    if !self
                        .finish(job, is_video, &meta, attempt, true, took, None, Some(refs))
                        .await
                    {
                        return Ending::Fenced;
                    }
                    return Ending::Outputs(outs);
                }
                Err(e)
                    if e.class == ErrorClass::Retryable
                        && attempt < self.max_attempts
                        && !job.cancel.is_cancelled() =>
                {
                    counter!("vidpipe_failures_total", "stage" => S::NAME, "class" => "retryable")
                        .increment(1);
                    warn!(attempt, error = %e, "retryable failure");
                    let _ = tx
                        .send(WorkerMsg::Produce(self.event(
                            job,
                            &meta,
                            EventKind::Retried,
                            attempt,
                            Some(t0.elapsed()),
                            Some(&e),
                        )))
                        .await;
                    if self.sleep(job, self.backoff(attempt, e.retry_after)).await {
                        return Ending::Abandoned;
                    }
                    attempt += 1;
                }
                Err(e) => {
                    if job.cancel.is_cancelled() {
                        return Ending::Abandoned;
                    }
                    let took = started.elapsed();
                    let class = if e.class == ErrorClass::Retryable {
                        format!("retries_exhausted:{}", e.kind)
                    } else {
                        e.class_label()
                    };
                    counter!("vidpipe_failures_total", "stage" => S::NAME, "class" => e.class.as_str())
                        .increment(1);
                    warn!(attempt, error = %e, "record failed for good: dead-lettered");
                    let outs = vec![
                        self.event(job, &meta, EventKind::Failed, attempt, Some(took), Some(&e)),
                        self.dead_letter(
                            job,
                            Some(&meta.video_id),
                            &class,
                            &e.to_string(),
                            attempt,
                        ),
                    ];
                    if !self
                        .finish(
                            job,
                            is_video,
                            &meta,
                            attempt,
                            false,
                            took,
                            Some((&class, &e.to_string())),
                            None,
                        )
                        .await
                    {
                        return Ending::Fenced;
                    }
                    return Ending::Outputs(outs);
                }
            }
        }
    }

    /// Sleeps unless cancelled; returns `true` when cancelled.
    async fn sleep(&self, job: &Job, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = job.cancel.cancelled() => true,
        }
    }

    /// Runs a status write, retrying while the database is unreachable.
    /// `None` when it never succeeded (logged; processing goes on, since
    /// the Kafka outputs are the source of truth and status is idempotent).
    async fn with_db_retries<F, Fut>(&self, job: &Job, write: F) -> Option<WriteOutcome>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<WriteOutcome, StatusWriteError>>,
    {
        let mut delay = Duration::from_millis(100);
        for _ in 0..8 {
            match write().await {
                Ok(outcome) => return Some(outcome),
                Err(e) => {
                    warn!(error = %e, "status write failed; retrying");
                    if self.sleep(job, delay).await {
                        return None;
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        error!("status write failed for good");
        None
    }

    // The run's identity and outcome, passed through as they are: a struct
    // would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        job: &Job,
        is_video: bool,
        meta: &crate::records::Meta,
        attempt: u32,
        ok: bool,
        took: Duration,
        error: Option<(&str, &str)>,
        output: Option<serde_json::Value>,
    ) -> bool {
        let (Some(status), Some(fence)) = (&self.status, &job.fence) else {
            return true;
        };
        // PostgreSQL stores no NUL in text or jsonb, and hostile input (a
        // title, a server's error text) may carry one: the write would fail
        // and the row stay `running` for good.
        let error =
            error.map(|(class, message)| (class.replace('\0', ""), message.replace('\0', "")));
        let mut output = output;
        if let Some(o) = output.as_mut() {
            strip_nul(o);
        }
        let finish = Finish {
            ok,
            duration_ms: took.as_millis() as i64,
            error_class: error.as_ref().map(|e| e.0.as_str()),
            error: error.as_ref().map(|e| e.1.as_str()),
            // A success that hands nothing on under this video's id (a
            // duplicate that discovery skipped) leaves the video's row as it
            // is: the video's state belongs to whichever run carries it.
            touch_video: is_video
                && (!ok
                    || self.final_stage
                    || output.as_ref().is_some_and(|o| {
                        o["videos"]
                            .as_array()
                            .is_some_and(|v| v.iter().any(|id| id.as_str() == Some(&meta.video_id)))
                    })),
            output,
            final_stage: self.final_stage,
        };
        let outcome = self
            .with_db_retries(job, || {
                status.finished(fence, meta, S::NAME, attempt as i32, &finish)
            })
            .await;
        if outcome == Some(WriteOutcome::Fenced) {
            counter!("vidpipe_fenced_writes_total", "stage" => S::NAME).increment(1);
            warn!(
                "partition lease lost (a newer owner fenced this instance) before the result was recorded: leaving the record to it"
            );
            return false;
        }
        true
    }

    fn encode_outputs(
        &self,
        outputs: &[S::Output],
    ) -> Result<(Vec<Out>, serde_json::Value), StageError> {
        let mut outs = Vec::with_capacity(outputs.len() + 1);
        let mut ids = Vec::with_capacity(outputs.len());
        for o in outputs {
            let payload = self
                .output
                .encode(o)
                .map_err(|e| StageError::permanent("encode", e.to_string()))?;
            ids.push(o.meta().video_id.clone());
            outs.push(Out {
                topic: self.output_topic.clone(),
                key: o.meta().video_id.clone().into_bytes(),
                payload,
                headers: vec![("vidpipe.generation", o.meta().generation.to_string())],
            });
        }
        if self.status.is_none() {
            return Ok((outs, serde_json::Value::Null));
        }
        // The status row keeps the output records themselves (small: blob
        // references, not media), so that tools find a run's results without
        // reading Kafka; a source that yields many videos keeps only ids.
        let records: Vec<serde_json::Value> = outputs
            .iter()
            .take(MAX_RECORDS_IN_STATUS)
            .filter_map(|o| serde_json::to_value(o).ok())
            .collect();
        Ok((
            outs,
            serde_json::json!({
                "topic": &*self.output_topic,
                "videos": ids,
                "records": records,
            }),
        ))
    }

    fn event(
        &self,
        job: &Job,
        meta: &crate::records::Meta,
        kind: EventKind,
        attempt: u32,
        took: Option<Duration>,
        error: Option<&StageError>,
    ) -> Out {
        let event = LifecycleEvent {
            meta: meta.clone(),
            stage: S::NAME.to_string(),
            kind,
            attempt: attempt as i32,
            at: now_ms(),
            duration_ms: took.map(|d| d.as_millis() as i64),
            error_class: error.map(StageError::class_label),
            error: error.map(|e| e.message.clone()),
            input_topic: self.input_topic.clone(),
            input_partition: job.partition,
            input_offset: job.offset,
        };
        let payload = self
            .events
            .frame(|out| super::events::write_datum(&event, out));
        Out {
            topic: self.events_topic.clone(),
            key: meta.video_id.clone().into_bytes(),
            payload,
            headers: vec![("vidpipe.event", kind.as_str().to_string())],
        }
    }

    fn dead_letter(
        &self,
        job: &Job,
        video_id: Option<&str>,
        class: &str,
        error: &str,
        attempts: u32,
    ) -> Out {
        counter!("vidpipe_dead_letters_total", "stage" => S::NAME).increment(1);
        let letter = DeadLetter {
            video_id: video_id.map(str::to_string),
            stage: S::NAME.to_string(),
            topic: self.input_topic.clone(),
            partition: job.partition,
            offset: job.offset,
            key: Some(job.key.clone()),
            payload: job.payload.clone(),
            error_class: class.to_string(),
            error: error.to_string(),
            attempts: attempts as i32,
            at: now_ms(),
        };
        let payload = self.dlq.encode(&letter).unwrap_or_else(|e| {
            error!(error = %e, "cannot encode dead letter");
            Vec::new()
        });
        Out {
            topic: self.dlq_topic.clone(),
            key: job.key.clone(),
            payload,
            headers: vec![
                ("vidpipe.stage", S::NAME.to_string()),
                ("vidpipe.attempt", attempts.to_string()),
                ("vidpipe.error.class", class.to_string()),
                ("vidpipe.error.message", truncate(error, 1000)),
                ("vidpipe.source.topic", self.input_topic.clone()),
                ("vidpipe.source.partition", job.partition.to_string()),
                ("vidpipe.source.offset", job.offset.to_string()),
            ],
        }
    }
}

/// Removes NUL characters from every string in a JSON value.
fn strip_nul(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => *s = s.replace('\0', ""),
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nul),
        serde_json::Value::Object(map) => map.values_mut().for_each(strip_nul),
        _ => {}
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Reads a header of a consumed record as text (for tools and tests).
pub fn header<'a, H: Headers>(headers: &'a H, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
