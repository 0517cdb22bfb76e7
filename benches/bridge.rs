//! The RabbitMQ adapter's throughput and added latency, on the local
//! stack's real RabbitMQ and Kafka: `cargo bench --bench bridge --profile dev`.
//!
//! - **Ingress**: a lapin producer publishes legacy discovery commands
//!   (each carrying its publish time) to a bridge running in this process;
//!   a command's latency is from the AMQP publish to its append on
//!   `<prefix>commands` (the topic is created with `LogAppendTime`, so a
//!   record's timestamp is the broker's append, i.e. the moment Kafka can
//!   acknowledge it). The baseline is the same record produced straight to
//!   Kafka with the same producer settings: the difference is what the
//!   bridge adds.
//! - **Event mirror**: lifecycle events produced to `<prefix>events`, read
//!   by the mirror, published to the `vidpipe.events` exchange with
//!   confirms and received by a RabbitMQ consumer bound to it; latency is
//!   from the Kafka produce to the RabbitMQ delivery.
//!
//! Each is measured twice: a burst (as fast as the producer can go:
//! throughput, with queueing in the latencies) and a paced run at a
//! moderate rate (latency without queueing). Numbers are milliseconds.

#[allow(dead_code)]
#[path = "../tests/helpers.rs"]
mod helpers;
#[path = "../tests/disruptive/legacy.rs"]
mod legacy;

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use vidpipe::config::Config;
use vidpipe::records::{Command, EventKind, LifecycleEvent, Meta, Record, now_ms};
use vidpipe::template::codec::Codec;

use legacy::Names;

/// Microseconds since the Unix epoch.
fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One line of the result table.
struct Row {
    what: String,
    n: usize,
    per_sec: f64,
    p50: f64,
    p99: f64,
}

impl Row {
    fn new(what: &str, mut latencies_ms: Vec<f64>, span: Duration) -> Self {
        latencies_ms.sort_by(f64::total_cmp);
        Self {
            what: what.into(),
            n: latencies_ms.len(),
            per_sec: latencies_ms.len() as f64 / span.as_secs_f64(),
            p50: percentile(&latencies_ms, 0.50),
            p99: percentile(&latencies_ms, 0.99),
        }
    }
}

/// Creates `topic` with broker-side timestamps (the append time).
async fn create_append_time_topic(c: &Config, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .create()
        .expect("Kafka admin client");
    let t = NewTopic::new(topic, 3, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    let res = admin
        .create_topics(&[t], &AdminOptions::new())
        .await
        .expect("create topic (is the stack up? scripts/stack up)");
    for r in res {
        r.expect("topic created");
    }
}

/// A reader of every partition of `topic` from its current end.
fn reader_at_end(c: &Config, topic: &str) -> BaseConsumer {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("group.id", helpers::unique("bench"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("reader");
    let md = reader
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::End)
            .expect("tpl");
    }
    reader.assign(&tpl).expect("assign");
    reader
}

/// Reads `n` records: for each, the option `t` of its command (publish
/// time, µs) and the record's timestamp (append time, ms).
async fn read_appends(c: &Config, reader: BaseConsumer, n: usize) -> Vec<(i64, i64)> {
    let raw = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(300);
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} records",
                out.len()
            );
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
                let ts = m.timestamp().to_millis().unwrap_or(0);
                out.push((m.payload().unwrap_or_default().to_vec(), ts));
            }
        }
        out
    })
    .await
    .expect("reader thread");
    let dec = Codec::new(c.schema_registry_url.as_deref())
        .expect("codec")
        .decoder(Command::SCHEMA)
        .expect("decoder");
    let mut out = Vec::with_capacity(raw.len());
    for (bytes, ts) in raw {
        let cmd: Command = dec.decode(&bytes).await.expect("decode");
        let t: i64 = cmd.options["t"].parse().expect("t");
        out.push((t, ts));
    }
    out
}

/// Publishes `n` discovery commands, `pause` apart (none: as fast as
/// publisher confirms allow, 1,000 outstanding); returns the first
/// publish time.
async fn publish_commands(c: &Config, queue: &str, tag: &str, n: usize, pause: Duration) -> i64 {
    let conn = legacy::connect(c).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let first = now_us();
    let mut pending = Vec::new();
    for i in 0..n {
        let body = serde_json::json!({
            "url": format!("https://media.test/{tag}/{i}.mp4"),
            "requested_by": "bench",
            "options": {"t": now_us().to_string()},
        })
        .to_string();
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() >= 1000 || !pause.is_zero() {
            for c in pending.drain(..) {
                assert!(c.await.expect("confirm").is_ack());
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    for c in pending {
        assert!(c.await.expect("confirm").is_ack());
    }
    let _ = conn.close(200, "bye".into()).await;
    first
}

async fn ingress_run(c: &Config, names: &Names, what: &str, n: usize, pause: Duration) -> Row {
    let reader = reader_at_end(c, &c.topic("commands"));
    let tag = helpers::unique("b");
    let first = publish_commands(c, &names.queues[0], &tag, n, pause).await;
    let got = read_appends(c, reader, n).await;
    let last_append_ms = got.iter().map(|(_, a)| *a).max().unwrap_or(0);
    let latencies: Vec<f64> = got
        .iter()
        .map(|(t, append)| (*append as f64) - (*t as f64) / 1000.0)
        .collect();
    let span = Duration::from_micros(u64::try_from(last_append_ms * 1000 - first).unwrap_or(1));
    Row::new(what, latencies, span)
}

/// The same command records produced straight to Kafka.
async fn direct_run(c: &Config, what: &str, n: usize, pause: Duration) -> Row {
    let topic = c.topic("commands");
    let reader = reader_at_end(c, &topic);
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let enc = codec
        .encoder(&topic, Command::SCHEMA)
        .await
        .expect("encoder");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()
        .expect("producer");
    let first = now_us();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let id = format!("url:direct{i}");
        let cmd = Command {
            meta: Meta::new(id.clone()),
            command_id: format!("direct-{i}"),
            url: Some(format!("https://media.test/direct/{i}.mp4")),
            start_stage: None,
            requested_by: Some("bench".into()),
            options: [("t".to_string(), now_us().to_string())].into(),
            submitted_at: now_ms(),
        };
        let payload = enc.encode(&cmd).expect("encode");
        let p = producer.clone();
        let topic = topic.clone();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&id).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        });
        if pending.len() >= 1000 || !pause.is_zero() {
            while let Some(r) = pending.next().await {
                r.expect("produce");
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("produce");
    }
    let got = read_appends(c, reader, n).await;
    let last = got.iter().map(|(_, a)| *a).max().unwrap_or(0);
    let latencies = got
        .iter()
        .map(|(t, append)| (*append as f64) - (*t as f64) / 1000.0)
        .collect();
    let span = Duration::from_micros(u64::try_from(last * 1000 - first).unwrap_or(1));
    Row::new(what, latencies, span)
}

/// Produces `n` lifecycle events (100 videos), `pause` apart.
async fn produce_events(c: &Config, n: usize, pause: Duration) -> i64 {
    let topic = c.topic("events");
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let enc = codec
        .encoder(&topic, LifecycleEvent::SCHEMA)
        .await
        .expect("encoder");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("linger.ms", "2")
        .create()
        .expect("producer");
    let first = now_us();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let video = format!("url:bench{}", i % 100);
        let e = LifecycleEvent {
            meta: Meta::new(video.clone()),
            stage: "transcribe".into(),
            kind: EventKind::Succeeded,
            attempt: 1,
            // Microseconds here (the bench reads them back); the field is
            // milliseconds for real events.
            at: now_us(),
            duration_ms: Some(1),
            error_class: None,
            error: None,
            input_topic: "bench".into(),
            input_partition: 0,
            input_offset: i as i64,
        };
        let payload = enc.encode(&e).expect("encode");
        let p = producer.clone();
        let topic = topic.clone();
        pending.push(async move {
            p.send(
                FutureRecord::to(&topic).key(&video).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        });
        if pending.len() >= 1000 || !pause.is_zero() {
            while let Some(r) = pending.next().await {
                r.expect("produce");
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("produce");
    }
    first
}

async fn mirror_run(
    c: &Config,
    consumer: &mut lapin::Consumer,
    what: &str,
    n: usize,
    pause: Duration,
) -> Row {
    let receiving = async {
        let mut latencies = Vec::with_capacity(n);
        let mut last = 0;
        while latencies.len() < n {
            let d = tokio::time::timeout(Duration::from_secs(120), consumer.next())
                .await
                .expect("events keep coming")
                .expect("consumer open")
                .expect("delivery");
            let now = now_us();
            let body: serde_json::Value = serde_json::from_slice(&d.data).expect("json");
            let at = body["at"].as_i64().expect("at");
            latencies.push((now - at) as f64 / 1000.0);
            last = now;
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        (latencies, last)
    };
    let (first, (latencies, last)) = tokio::join!(produce_events(c, n, pause), receiving);
    let span = Duration::from_micros(u64::try_from(last - first).unwrap_or(1));
    Row::new(what, latencies, span)
}

async fn bench() -> Vec<Row> {
    let mut c = Config::local_defaults().expect("configuration");
    let names = Names::new("bench_bridge");
    names.apply(&mut c);
    c.topic_partitions = 3;
    create_append_time_topic(&c, &c.topic("commands")).await;
    vidpipe::template::topics::ensure(&c.kafka_brokers, &[c.topic("events")], 3, 1)
        .await
        .expect("events topic");
    let mut publisher = legacy::Publisher::new(&c);
    publisher.declare(&names.queues[0]).await;
    publisher.close().await;
    // Events exchange and a bound queue, before the mirror starts.
    let conn = legacy::connect(&c).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        names.events.as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let q = helpers::unique("bench_events");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue");
    ch.queue_bind(
        q.as_str().into(),
        names.events.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.basic_qos(1000, Default::default()).await.expect("qos");
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let mut bc = c.clone();
    bc.bridge.mirror = true;
    bc.bridge.mirror_start = vidpipe::bridge::MirrorStart::Latest;
    let token = CancellationToken::new();
    let bridge = tokio::spawn(vidpipe::bridge::run(bc.clone(), token.clone()));

    let mut rows = Vec::new();
    // Warm up: connections, schema ids, the mirror's group.
    ingress_run(&c, &names, "warm-up", 200, Duration::ZERO).await;
    mirror_run(&c, &mut consumer, "warm-up", 200, Duration::ZERO).await;
    direct_run(&c, "warm-up", 200, Duration::ZERO).await;

    let burst = 10_000;
    let paced = 2_000;
    let every = Duration::from_millis(2);
    rows.push(
        direct_run(
            &c,
            "baseline: straight to Kafka, burst",
            burst,
            Duration::ZERO,
        )
        .await,
    );
    rows.push(direct_run(&c, "baseline: straight to Kafka, paced", paced, every).await);
    rows.push(
        ingress_run(
            &c,
            &names,
            "ingress (prefetch 64): AMQP publish -> Kafka append, burst",
            burst,
            Duration::ZERO,
        )
        .await,
    );
    rows.push(
        ingress_run(
            &c,
            &names,
            "ingress (prefetch 64): AMQP publish -> Kafka append, paced",
            paced,
            every,
        )
        .await,
    );
    rows.push(
        mirror_run(
            &c,
            &mut consumer,
            "mirror (batch 500): Kafka produce -> AMQP delivery, burst",
            burst,
            Duration::ZERO,
        )
        .await,
    );
    rows.push(
        mirror_run(
            &c,
            &mut consumer,
            "mirror (batch 500): Kafka produce -> AMQP delivery, paced",
            paced,
            every,
        )
        .await,
    );
    token.cancel();
    bridge
        .await
        .expect("bridge task")
        .expect("the bridge stops cleanly");

    // The ingress again with a deeper prefetch (more commands in flight).
    bc.bridge.mirror = false;
    bc.bridge.prefetch = 256;
    let token = CancellationToken::new();
    let bridge = tokio::spawn(vidpipe::bridge::run(bc, token.clone()));
    ingress_run(&c, &names, "warm-up", 200, Duration::ZERO).await;
    rows.push(
        ingress_run(
            &c,
            &names,
            "ingress (prefetch 256): AMQP publish -> Kafka append, burst",
            burst,
            Duration::ZERO,
        )
        .await,
    );
    token.cancel();
    bridge
        .await
        .expect("bridge task")
        .expect("the bridge stops cleanly");
    let _ = conn.close(200, "bye".into()).await;
    names.delete(&c).await;
    rows
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows = runtime.block_on(bench());
    println!("| run | messages | per second | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} |",
            r.what, r.n, r.per_sec, r.p50, r.p99
        );
    }
    let get = |prefix: &str| rows.iter().find(|r| r.what.starts_with(prefix));
    if let (Some(b), Some(i)) = (
        get("baseline: straight to Kafka, paced"),
        get("ingress (prefetch 64): AMQP publish -> Kafka append, paced"),
    ) {
        println!(
            "\nadded by the bridge (paced): p50 {:.1} ms, p99 {:.1} ms",
            i.p50 - b.p50,
            i.p99 - b.p99
        );
    }
}
