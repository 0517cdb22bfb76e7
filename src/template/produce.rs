//! Serving a librdkafka producer without burning a core.
//!
//! rust-rdkafka's `BaseProducer::poll(d)` serves events until `d` is over,
//! and each wait inside it is the time left rounded *down* to whole
//! milliseconds: once less than a millisecond is left it polls with a zero
//! timeout, in a loop, until the deadline. So every `poll` ends in a busy
//! spin of up to 1 ms: `poll(1 ms)` spins for all of it, and the polling
//! thread of its `FutureProducer` (100 ms slices) keeps ~1% of a core busy
//! per producer while idle (measured with `/proc/<tid>/schedstat`: 9.3 ms of
//! CPU per second for each of the two in an idle `vidpipe run`). The same
//! rounding was librdkafka#4684 inside librdkafka itself.
//!
//! Two ways around it, for the two kinds of callers:
//! - [`serve_until`], for a thread that waits for its own messages to be
//!   acknowledged (the stage runner's commit): it serves what is ready
//!   without waiting and sleeps between looks, so a wait of a few
//!   milliseconds costs a few dozen wake-ups instead of the whole wait.
//! - [`AckProducer`], for async callers that send a record and await its
//!   acknowledgement (submit, the RabbitMQ bridge, replay): a producer with
//!   a polling thread of its own whose slices are a whole number of
//!   milliseconds plus a microsecond, so the rounded-down wait already ends
//!   past the deadline and an idle producer sleeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message, ToBytes};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::oneshot;

/// Pause between two looks at the queue in [`serve_until`]: short against a
/// broker's acknowledgement (about a millisecond on a local broker), long
/// against a wake-up (a few microseconds of CPU).
const SERVE_STEP: Duration = Duration::from_micros(100);

/// Serves `producer`'s events (delivery reports reach its context) until
/// `done()` holds or `deadline` passes; returns whether `done()` held.
pub fn serve_until<C: ProducerContext>(
    producer: &BaseProducer<C>,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
) -> bool {
    loop {
        // A zero timeout serves one queued event and returns at once.
        let before = producer.in_flight_count();
        producer.poll(Duration::ZERO);
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        // A served delivery report lowers the count: more may be queued
        // behind it (one per partition), so look again before sleeping.
        if producer.in_flight_count() < before {
            continue;
        }
        std::thread::sleep(SERVE_STEP.min(deadline - now));
    }
}

/// One slice of [`AckProducer`]'s polling thread. The extra microsecond
/// makes the first, rounded-down wait 100 ms, which ends (timer slack
/// included) after the slice's deadline rather than just before it; so an
/// idle producer polls ten times a second and almost never spins (only if
/// the thread is preempted for over a microsecond at the slice's start).
/// A slice that served an event may still spin for under a millisecond
/// at its end: at most the old idle cost, and only while records flow.
const POLL_SLICE: Duration = Duration::from_micros(100_001);

/// Where a record ended up: its partition and offset.
pub type Acked = (i32, i64);

/// Producer context handing each delivery report to the task awaiting it.
struct Waiters;

impl ClientContext for Waiters {}

impl ProducerContext for Waiters {
    type DeliveryOpaque = Box<oneshot::Sender<KafkaResult<Acked>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiter: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        // The sender gave up waiting (its future was dropped): nothing to do.
        let _ = waiter.send(outcome);
    }
}

/// Settings of an idempotent producer for `brokers` whose records fail
/// after `message_timeout` without an acknowledgement.
pub fn idempotent(brokers: &str, message_timeout: Duration) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set(
            "message.timeout.ms",
            message_timeout.as_millis().to_string(),
        );
    config
}

/// A producer whose `send` resolves when the broker acknowledged the
/// record: rdkafka's `FutureProducer` without its idle spin (see the module
/// documentation).
pub struct AckProducer {
    producer: Arc<BaseProducer<Waiters>>,
    stop: Arc<AtomicBool>,
}

impl AckProducer {
    /// Creates the producer and starts its polling thread.
    pub fn new(config: &ClientConfig) -> KafkaResult<Self> {
        let producer = Arc::new(config.create_with_context::<_, BaseProducer<Waiters>>(Waiters)?);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let producer = Arc::clone(&producer);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kafka-acks".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        producer.poll(POLL_SLICE);
                    }
                })
                .map_err(|e| KafkaError::ClientCreation(format!("polling thread: {e}")))?;
        }
        Ok(Self { producer, stop })
    }

    /// Sends `record`, waiting up to `queue_timeout` for room in the local
    /// queue, and resolves with its partition and offset once the broker
    /// acknowledged it (or with why it was not).
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> KafkaResult<Acked>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (tx, rx) = oneshot::channel();
        let mut base = BaseRecord::with_opaque_to(record.topic, Box::new(tx));
        base.partition = record.partition;
        base.payload = record.payload;
        base.key = record.key;
        base.timestamp = record.timestamp;
        base.headers = record.headers;
        let give_up = Instant::now() + queue_timeout;
        loop {
            match self.producer.send(base) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < give_up =>
                {
                    // The polling thread drains the queue as acknowledgements
                    // come back.
                    base = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
        // librdkafka reports every record it accepted, at the latest when
        // `message.timeout.ms` is over; a dropped sender means the producer
        // itself went away.
        rx.await.unwrap_or(Err(KafkaError::Canceled))
    }
}

impl Drop for AckProducer {
    fn drop(&mut self) {
        // The thread ends within one slice and drops the last share of
        // the client there, so rdkafka's purge, flush (at most 500 ms) and
        // destroy run on it. It is not joined: a drop on an async worker
        // must not block it for up to 100 ms.
        self.stop.store(true, Ordering::Relaxed);
    }
}
