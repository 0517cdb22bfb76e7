//! The processor template against the real Kafka, schema registry and
//! PostgreSQL: ordering with parallelism, retries, dead letters and status.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};
use tokio_util::sync::CancellationToken;
use vidpipe::config::{Config, Guarantee};
use vidpipe::records::{DEAD_LETTER_SCHEMA, DeadLetter, Meta, Record};
use vidpipe::template::codec::Codec;
use vidpipe::template::runner::{RunnerSettings, header, run};
use vidpipe::template::status::StatusStore;
use vidpipe::template::testkit::Item;
use vidpipe::template::{Context, Stage, StageError, topics};

use crate::helpers::{config, fresh_database, unique};

/// Records what it sees; sleeps, fails or succeeds as the body says.
#[derive(Default)]
struct Probe {
    seen: Mutex<Vec<(String, i64)>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    max_sleep_ms: u64,
}

impl Stage for Probe {
    type Input = Item;
    type Output = Item;
    const NAME: &'static str = "probe";
    const INPUT: &'static str = "in";
    const OUTPUT: &'static str = "out";

    async fn process(&self, input: Item, ctx: &Context) -> Result<Vec<Item>, StageError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let sleep = match input.body.strip_prefix("slow:") {
            Some(ms) => ms.parse().unwrap_or(0),
            None => rand::rng().random_range(0..=self.max_sleep_ms),
        };
        tokio::time::sleep(Duration::from_millis(sleep)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        match input.body.as_str() {
            "poison" => return Err(StageError::permanent("poison", "this record is bad")),
            "flaky" if ctx.attempt < 3 => {
                return Err(StageError::retryable("flaky", "try again"));
            }
            _ => {}
        }
        self.seen
            .lock()
            .unwrap()
            .push((input.meta.video_id.clone(), input.seq));
        Ok(vec![input])
    }
}

/// A configuration whose topics are all new (random prefix).
fn test_config(guarantee: Guarantee) -> Config {
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("t"));
    c.guarantee = guarantee;
    c.topic_partitions = 1;
    c.runner.in_flight = 32;
    c.runner.max_attempts = 4;
    c.runner.backoff_initial_ms = 10;
    c.runner.backoff_max_ms = 50;
    c.runner.commit_interval_ms = 200;
    c.runner.session_timeout_ms = 6000;
    c
}

async fn prepare_topics(c: &Config) {
    let names: Vec<String> = ["in", "out", "events", "dlq"]
        .iter()
        .map(|t| c.topic(t))
        .collect();
    topics::ensure(&c.kafka_brokers, &names, c.topic_partitions, 1)
        .await
        .expect("create topics");
}

/// Produces raw values (already encoded) to the input topic.
fn produce_raw(c: &Config, records: Vec<(String, Vec<u8>)>) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let topic = c.topic("in");
    for (key, value) in &records {
        let mut rec = BaseRecord::to(&topic).key(key).payload(value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

async fn encode_items(c: &Config, codec: &Arc<Codec>, items: &[Item]) -> Vec<(String, Vec<u8>)> {
    let enc = codec
        .encoder(&c.topic("in"), Item::SCHEMA)
        .await
        .expect("encoder");
    items
        .iter()
        .map(|i| (i.meta.video_id.clone(), enc.encode(i).expect("encode")))
        .collect()
}

/// Reads a topic (read_committed) until `want` records or the deadline.
fn read_topic(
    c: &Config,
    suffix: &str,
    want: usize,
    deadline: Duration,
) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[&c.topic(suffix)]).expect("subscribe");
    let mut out = Vec::new();
    let end = Instant::now() + deadline;
    while out.len() < want && Instant::now() < end {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.detach());
        }
    }
    out
}

/// `per_video` records for each of `videos` videos into the input topic,
/// interleaved as they would be in a partition (every video's first
/// record, then every second one...). Returns how many.
async fn produce_interleaved(
    c: &Config,
    codec: &Arc<Codec>,
    videos: usize,
    per_video: i64,
) -> usize {
    let mut items = Vec::new();
    for seq in 0..per_video {
        for v in 0..videos {
            items.push(item(&format!("video-{v}"), seq, "ok"));
        }
    }
    let raw = encode_items(c, codec, &items).await;
    let cc = c.clone();
    tokio::task::spawn_blocking(move || produce_raw(&cc, raw))
        .await
        .unwrap();
    items.len()
}

fn item(video: &str, seq: i64, body: &str) -> Item {
    Item {
        meta: Meta::new(video),
        seq,
        body: body.into(),
    }
}

struct Running {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), vidpipe::template::runner::RunnerError>>,
}

impl Running {
    async fn stop(self) {
        self.token.cancel();
        self.handle
            .await
            .expect("runner task")
            .expect("runner stops cleanly");
    }
}

fn start(
    stage: Arc<Probe>,
    c: &Config,
    codec: Arc<Codec>,
    status: Option<StatusStore>,
    final_stage: bool,
) -> Running {
    let token = CancellationToken::new();
    let settings = RunnerSettings {
        config: c.clone(),
        group: None,
        instance: unique("i"),
        final_stage,
        status,
        codec,
    };
    let handle = tokio::spawn(run(stage, settings, token.clone()));
    Running { token, handle }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_of_one_video_run_in_order_while_videos_run_in_parallel() {
    let c = test_config(Guarantee::ExactlyOnce);
    prepare_topics(&c).await;
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    produce_interleaved(&c, &codec, 200, 5).await;

    let probe = Arc::new(Probe {
        max_sleep_ms: 20,
        ..Default::default()
    });
    let started = Instant::now();
    let runner = start(probe.clone(), &c, codec.clone(), None, true);
    let cc = c.clone();
    let out =
        tokio::task::spawn_blocking(move || read_topic(&cc, "out", 1000, Duration::from_secs(120)))
            .await
            .unwrap();
    let wall = started.elapsed();
    runner.stop().await;

    assert_eq!(out.len(), 1000, "every record produces one output");
    let seen = probe.seen.lock().unwrap().clone();
    let mut per_video: HashMap<String, Vec<i64>> = HashMap::new();
    for (v, seq) in seen {
        per_video.entry(v).or_default().push(seq);
    }
    assert_eq!(per_video.len(), 200);
    for (v, seqs) in &per_video {
        assert_eq!(
            seqs,
            &vec![0, 1, 2, 3, 4],
            "records of {v} ran out of order"
        );
    }
    let peak = probe.peak.load(Ordering::SeqCst);
    assert!(
        peak > 1 && peak <= 32,
        "peak concurrency {peak} must be within 2..=32"
    );
    // Sequential would take about 1000 x 10 ms on average.
    eprintln!(
        "1000 records, mean sleep 10 ms: wall {:.2}s (sequential ~10s), peak concurrency {peak}",
        wall.as_secs_f64()
    );
}

/// Exactly-once: records that finish while a transaction commit is under
/// way have their outputs held and produced into the next transaction.
/// With a stage that takes no time, several records of one video finish
/// within one commit: their outputs must still come out in input order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_held_across_a_commit_keep_each_videos_order() {
    let c = test_config(Guarantee::ExactlyOnce);
    prepare_topics(&c).await;
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let (videos, per_video) = (50, 40);
    let want = produce_interleaved(&c, &codec, videos, per_video).await;

    let probe = Arc::new(Probe::default());
    let runner = start(probe.clone(), &c, codec.clone(), None, true);
    let cc = c.clone();
    let out =
        tokio::task::spawn_blocking(move || read_topic(&cc, "out", want, Duration::from_secs(120)))
            .await
            .unwrap();
    runner.stop().await;

    assert_eq!(out.len(), want, "every record produces one output");
    let dec = codec.decoder(Item::SCHEMA).expect("decoder");
    let mut seqs: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &out {
        let item: Item = dec
            .decode(m.payload().unwrap_or_default())
            .await
            .expect("output decodes");
        seqs.entry(item.meta.video_id).or_default().push(item.seq);
    }
    assert_eq!(seqs.len(), videos);
    let in_order: Vec<i64> = (0..per_video).collect();
    for (v, s) in &seqs {
        assert_eq!(s, &in_order, "outputs of {v} are out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_records_are_dead_lettered_while_the_partition_flows() {
    let c = test_config(Guarantee::ExactlyOnce);
    prepare_topics(&c).await;
    let (pool, _) = fresh_database(&c).await;
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let items = vec![
        item("v-ok-1", 0, "ok"),
        item("v-poison", 0, "poison"),
        item("v-flaky", 0, "flaky"),
        item("v-ok-2", 0, "ok"),
    ];
    let mut raw = encode_items(&c, &codec, &items).await;
    // Not Avro at all, between good records.
    raw.insert(2, ("v-garbage".into(), b"definitely not avro".to_vec()));
    let cc = c.clone();
    tokio::task::spawn_blocking(move || produce_raw(&cc, raw))
        .await
        .unwrap();

    let probe = Arc::new(Probe::default());
    let runner = start(
        probe.clone(),
        &c,
        codec.clone(),
        Some(StatusStore::new(pool.clone())),
        true,
    );
    let cc = c.clone();
    let (out, dlq) = tokio::task::spawn_blocking(move || {
        (
            read_topic(&cc, "out", 3, Duration::from_secs(60)),
            read_topic(&cc, "dlq", 2, Duration::from_secs(60)),
        )
    })
    .await
    .unwrap();
    // Anything more would be a duplicate: give it a moment to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    runner.stop().await;

    let mut outputs: Vec<String> = out
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned())
        .collect();
    outputs.sort();
    assert_eq!(
        outputs,
        vec!["v-flaky", "v-ok-1", "v-ok-2"],
        "one output each, flaky after retries"
    );

    let dec = codec.decoder(DEAD_LETTER_SCHEMA).expect("decoder");
    let mut letters = Vec::new();
    for m in &dlq {
        let letter: DeadLetter = dec
            .decode(m.payload().unwrap_or_default())
            .await
            .expect("dead letter decodes");
        let headers = m.headers().expect("dead letters carry headers");
        assert_eq!(header(headers, "vidpipe.stage"), Some("probe"));
        assert!(header(headers, "vidpipe.attempt").is_some());
        assert!(header(headers, "vidpipe.error.message").is_some_and(|s| !s.is_empty()));
        letters.push((
            String::from_utf8_lossy(&letter.key.clone().unwrap_or_default()).into_owned(),
            header(headers, "vidpipe.error.class")
                .unwrap_or_default()
                .to_string(),
            letter,
        ));
    }
    letters.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].0, "v-garbage");
    assert_eq!(letters[0].1, "undecodable");
    assert_eq!(
        letters[0].2.payload.as_deref(),
        Some(&b"definitely not avro"[..])
    );
    assert_eq!(letters[1].0, "v-poison");
    assert_eq!(letters[1].1, "permanent:poison");
    assert_eq!(
        letters[1].2.attempts, 1,
        "permanent failures are not retried"
    );

    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT video_id, status, attempt FROM stage_runs ORDER BY video_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let rows: HashMap<String, (String, i32)> =
        rows.into_iter().map(|(v, s, a)| (v, (s, a))).collect();
    assert_eq!(rows["v-flaky"], ("done".to_string(), 3));
    assert_eq!(rows["v-poison"], ("failed".to_string(), 1));
    assert_eq!(rows["v-ok-1"].0, "done");
    let (status, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error FROM videos WHERE id = 'v-poison'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.unwrap_or_default().contains("this record is bad"));

    // Lifecycle: the flaky record was started once, retried twice, succeeded once.
    let events = {
        let cc = c.clone();
        tokio::task::spawn_blocking(move || read_topic(&cc, "events", 100, Duration::from_secs(5)))
            .await
            .unwrap()
    };
    let flaky: Vec<String> = events
        .iter()
        .filter(|m| m.key() == Some(b"v-flaky"))
        .filter_map(|m| {
            m.headers()
                .and_then(|h| header(h, "vidpipe.event"))
                .map(str::to_string)
        })
        .collect();
    assert_eq!(flaky, vec!["started", "retried", "retried", "succeeded"]);
}

/// A record that runs longer than the transaction timeout: its `started`
/// event opens the broker-side transaction at once, so the runner must keep
/// committing while it runs, or the broker aborts the transaction and
/// fences the producer (which then re-runs the record forever). The broker
/// looks for expired transactions every 10 s
/// (`transaction.abort.timed.out.transaction.cleanup.interval.ms`), hence
/// records of 14-15 s against a 2 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_longer_than_the_transaction_timeout_finish_exactly_once() {
    let mut c = test_config(Guarantee::ExactlyOnce);
    c.runner.transaction_timeout_ms = 2_000;
    prepare_topics(&c).await;
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let items = vec![
        item("slow-a", 0, "slow:14000"),
        item("slow-b", 0, "slow:15000"),
    ];
    let raw = encode_items(&c, &codec, &items).await;
    produce_raw(&c, raw);
    let running = start(Arc::new(Probe::default()), &c, codec, None, true);
    let out = tokio::task::block_in_place(|| read_topic(&c, "out", 2, Duration::from_secs(40)));
    // Anything more would be a duplicate from a fenced, re-run transaction.
    let extra = tokio::task::block_in_place(|| read_topic(&c, "out", 3, Duration::from_secs(4)));
    running.stop().await;
    assert_eq!(out.len(), 2, "every record's output arrived");
    assert_eq!(extra.len(), 2, "and none twice");
}

/// One batch of status writes from partitions whose leases differ: each row
/// gets its own outcome (applied, or fenced for the partition whose lease
/// moved on), and a finished run never goes back to running.
#[tokio::test(flavor = "multi_thread")]
async fn a_status_batch_fences_and_guards_each_row_on_its_own() {
    use vidpipe::template::status::{Fence, Finish, WriteOutcome};
    let c = config();
    let (pool, _) = fresh_database(&c).await;
    let store = StatusStore::new(pool.clone());
    let fence = |partition, epoch| Fence {
        group: "g".into(),
        topic: "t".into(),
        partition,
        epoch,
    };
    assert_eq!(store.acquire("g", "t", 0, "a").await.unwrap(), 1);
    assert_eq!(store.acquire("g", "t", 1, "a").await.unwrap(), 1);
    // Partition 1 moves on: writes with its first lease are a zombie's.
    assert_eq!(store.acquire("g", "t", 1, "b").await.unwrap(), 2);
    let writer = store.writer(16);
    let done = Finish {
        ok: true,
        duration_ms: 5,
        error_class: None,
        error: None,
        output: Some(serde_json::json!({"videos": []})),
        final_stage: true,
        touch_video: true,
    };
    let metas: Vec<Meta> = ["v-c", "v-a", "v-b"].into_iter().map(Meta::new).collect();
    let (current, stale) = (fence(0, 1), fence(1, 1));
    let (c_, a_, b_) = tokio::join!(
        writer.finished(&current, &metas[0], "copy", 1, &done),
        writer.finished(&current, &metas[1], "copy", 1, &done),
        writer.finished(&stale, &metas[2], "copy", 1, &done),
    );
    assert_eq!(
        (c_.unwrap(), a_.unwrap(), b_.unwrap()),
        (
            WriteOutcome::Applied,
            WriteOutcome::Applied,
            WriteOutcome::Fenced
        )
    );
    // A late `running` row of the same attempt cannot undo `done`.
    let late = writer
        .started(&current, &metas[1], None, "copy", 1, true)
        .await
        .unwrap();
    assert_eq!(late, WriteOutcome::Stale);
    let rows: Vec<(String, String, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT video_id, status, started_at FROM stage_runs ORDER BY video_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let summary: Vec<(&str, &str, bool)> = rows
        .iter()
        .map(|(v, s, started)| (v.as_str(), s.as_str(), started.is_some()))
        .collect();
    assert_eq!(summary, vec![("v-a", "done", true), ("v-c", "done", true)]);
    let videos: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM videos ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        videos,
        vec![("v-a".into(), "done".into()), ("v-c".into(), "done".into())]
    );
}
