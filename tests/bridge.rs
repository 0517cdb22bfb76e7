//! The RabbitMQ adapter (`vidpipe bridge`) on real RabbitMQ and Kafka,
//! with no service stopped (the outage tests are in the `disruptive` test
//! binary, which runs on its own): legacy commands in, command records
//! and dead letters out; the event mirror; and a legacy command that ends
//! with a transcribed video, which a legacy restart command then runs
//! again from transcription. Each test has queues, exchanges and topics of
//! its own.

#[path = "disruptive/legacy.rs"]
mod legacy;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vidpipe::bridge::BridgeError;
use vidpipe::config::Config;
use vidpipe::records::{EventKind, LifecycleEvent, Meta, Record, now_ms};
use vidpipe::template::codec::Codec;
use vidpipe::template::topics;

use crate::helpers::{config, missing, unique};
use crate::pipeline::{Pipeline, SCRIPTS, serve, spoken_video};
use legacy::{Expect, Legacy, Names, Publisher};

/// A bridge running in this process until stopped or dropped.
struct Running {
    token: CancellationToken,
    handle: Option<JoinHandle<Result<(), BridgeError>>>,
}

impl Running {
    fn start(c: Config) -> Self {
        let token = CancellationToken::new();
        let handle = tokio::spawn(vidpipe::bridge::run(c, token.clone()));
        Self {
            token,
            handle: Some(handle),
        }
    }

    /// Fails the test if the bridge stopped by itself.
    async fn check(&mut self) {
        if self.handle.as_ref().is_some_and(JoinHandle::is_finished)
            && let Some(h) = self.handle.take()
        {
            panic!("the bridge stopped by itself: {:?}", h.await);
        }
    }

    async fn stop(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.await
                .expect("the bridge task")
                .expect("the bridge stops cleanly");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// A queue bound to the events exchange with `#` (declaring the exchange
/// as the bridge does, so that the binding exists before any event).
async fn bind_events_queue(c: &Config, exchange: &str) -> (lapin::Connection, Channel, String) {
    let conn = legacy::connect(c).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the events exchange");
    let queue = unique("mirrored");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare a queue for events");
    ch.queue_bind(
        queue.as_str().into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind it");
    (conn, ch, queue)
}

/// A mirrored event as received: routing key and JSON body.
#[derive(Debug, Clone)]
struct Mirrored {
    routing_key: String,
    message_id: Option<String>,
    video_id_header: String,
    body: serde_json::Value,
}

/// Consumes mirrored events until `done` says so or `limit` passes.
async fn receive(
    ch: &Channel,
    queue: &str,
    limit: Duration,
    mut done: impl FnMut(&[Mirrored]) -> bool,
) -> Vec<Mirrored> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("test").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the events queue");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !done(&out) {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let Ok(Some(Ok(d))) = next else {
            break;
        };
        let headers = d.properties.headers().clone().unwrap_or_default();
        let video_id_header = match headers.inner().get("video_id") {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            _ => String::new(),
        };
        out.push(Mirrored {
            routing_key: d.routing_key.to_string(),
            message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
            video_id_header,
            body: serde_json::from_slice(&d.data).expect("a mirrored event is JSON"),
        });
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_commands_reach_kafka_once_and_malformed_ones_are_dead_lettered() {
    let started = Instant::now();
    let mut c = config();
    let names = Names::new("bridge_in");
    names.apply(&mut c);
    c.topic_partitions = 3;
    c.bridge.prefetch = 16;
    let mut publisher = Publisher::new(&c);
    // A legacy queue that exists already, with arguments of its own, is
    // used as it is (declaring it again without them would fail).
    {
        let conn = legacy::connect(&c).await;
        let ch = conn.create_channel().await.expect("channel");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(1_000_000));
        ch.queue_declare(
            names.queues[1].as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare a queue with arguments");
        let _ = conn.close(200, "bye".into()).await;
    }
    // The others as the legacy producers declare them.
    for q in [0, 2, 3, 4] {
        publisher.declare(&names.queues[q]).await;
    }
    let sent = legacy::workload("in", 300, 10);
    let malformed = sent
        .iter()
        .filter(|m| matches!(m.expect, Expect::Rejected(_)))
        .count();
    let mut bridge = Running::start(c.clone());
    for m in &sent {
        publisher.publish(&names.queues[m.queue], m).await;
    }
    // A producer's retries: the same messages again, with and without
    // message ids. They are the same commands, and must not be sent twice.
    let again: Vec<&Legacy> = sent
        .iter()
        .filter(|m| matches!(m.expect, Expect::Valid { .. }))
        .take(20)
        .collect();
    for m in &again {
        publisher.publish(&names.queues[m.queue], m).await;
    }
    publisher.close().await;

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        bridge.check().await;
        let mut waiting = 0;
        for q in &names.queues {
            waiting += legacy::depth(&c, q).await;
        }
        // The bridge declares its dead-letter queue as it starts, maybe
        // after the first look.
        let dead = legacy::depth_if_declared(&c, &names.dlq).await.unwrap_or(0) as usize;
        if waiting == 0 && dead >= malformed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge did not consume everything: {waiting} waiting, {dead}/{malformed} dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Stopping lets the commands in hand finish; anything unacknowledged
    // would go back to its queue and show below.
    bridge.stop().await;
    for q in &names.queues {
        assert_eq!(legacy::depth(&c, q).await, 0, "{q} is empty");
    }
    let records = legacy::commands(&c).await;
    let dead = legacy::drain_dead_letters(&c, &names.dlq).await;
    legacy::check_outcome(&sent, &records, &dead, true);
    assert_eq!(
        dead.len(),
        malformed,
        "each malformed message dead-lettered once"
    );
    for d in &dead {
        assert!(
            d.queue.starts_with(names.prefix.trim_end_matches('.')),
            "{d:?}"
        );
        assert!(!d.command_id.is_empty(), "{d:?}");
    }
    names.delete(&c).await;
    eprintln!("took {:?}", started.elapsed());
}

/// Produces `per_video` events for each of `videos`, interleaved; each
/// event's `attempt` is its number within its video.
async fn produce_events(c: &Config, videos: &[String], per_video: i32, from: i32) {
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let enc = codec
        .encoder(&c.topic("events"), LifecycleEvent::SCHEMA)
        .await
        .unwrap_or_else(|e| missing("the schema registry", "schema_registry_url", e));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .create()
        .unwrap_or_else(|e| missing("Kafka", &c.kafka_brokers, e));
    let stages = ["download", "extract-audio", "transcribe", "summarize"];
    for seq in from..from + per_video {
        for v in videos {
            let e = LifecycleEvent {
                meta: Meta {
                    trace_id: format!("trace-{v}"),
                    ..Meta::new(v.clone())
                },
                stage: stages[(seq as usize / 2) % stages.len()].into(),
                kind: if seq % 2 == 0 {
                    EventKind::Started
                } else {
                    EventKind::Succeeded
                },
                attempt: seq,
                at: now_ms(),
                duration_ms: (seq % 2 == 1).then_some(5),
                error_class: None,
                error: None,
                input_topic: "test.in".into(),
                input_partition: 0,
                input_offset: i64::from(seq),
            };
            let payload = enc.encode(&e).expect("encode an event");
            producer
                .send(
                    FutureRecord::to(&c.topic("events"))
                        .key(v.as_str())
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap_or_else(|(e, _)| missing("Kafka", &c.kafka_brokers, e));
        }
    }
}

/// Committed offsets of `group` on `topic`, summed, and the sum of the
/// partitions' ends.
fn group_progress(c: &Config, group: &str, topic: &str) -> (i64, i64) {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("group.id", group)
        .create()
        .expect("probe");
    let md = probe
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    let mut end = 0;
    for p in md.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
        end += probe
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .expect("watermarks")
            .1;
    }
    let committed = probe
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets")
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    (committed, end)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_mirror_publishes_every_event_in_order_per_video() {
    let started = Instant::now();
    let mut c = config();
    let names = Names::new("bridge_mirror");
    names.apply(&mut c);
    c.bridge.ingress = false;
    c.bridge.mirror = true;
    c.bridge.mirror_batch = 16;
    topics::ensure(&c.kafka_brokers, &[c.topic("events")], 3, 1)
        .await
        .unwrap_or_else(|e| missing("Kafka", &c.kafka_brokers, e));
    let (conn, ch, queue) = bind_events_queue(&c, &names.events).await;
    let videos: Vec<String> = (0..12).map(|i| format!("url:mirror{i}")).collect();
    let per_video = 10;
    // Half of the events wait on the topic before the mirror starts; the
    // rest arrive while it runs.
    produce_events(&c, &videos, per_video / 2, 0).await;
    let mut bridge = Running::start(c.clone());
    produce_events(&c, &videos, per_video / 2, per_video / 2).await;
    let total = videos.len() * per_video as usize;
    let got = receive(&ch, &queue, Duration::from_secs(60), |m| m.len() >= total).await;
    bridge.check().await;
    assert_eq!(got.len(), total, "every event mirrored once");
    let ids: BTreeSet<&str> = got.iter().filter_map(|m| m.message_id.as_deref()).collect();
    assert_eq!(
        ids.len(),
        total,
        "message ids are the events' Kafka positions"
    );
    let mut by_video: HashMap<String, Vec<i64>> = HashMap::new();
    for m in &got {
        let b = &m.body;
        let video = b["video_id"].as_str().expect("video_id").to_string();
        assert_eq!(m.video_id_header, video);
        assert_eq!(
            m.routing_key,
            format!(
                "{}.{}",
                b["stage"].as_str().unwrap(),
                b["kind"].as_str().unwrap()
            )
        );
        assert_eq!(b["trace_id"], format!("trace-{video}"));
        by_video
            .entry(video)
            .or_default()
            .push(b["attempt"].as_i64().expect("attempt"));
    }
    for v in &videos {
        let want: Vec<i64> = (0..i64::from(per_video)).collect();
        assert_eq!(by_video[v], want, "{v}'s events in order");
    }
    // Offsets are committed once RabbitMQ confirmed (auto-commit of the
    // stored offsets, every second).
    let group = format!("{}bridge-mirror", c.topic_prefix);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (committed, end) = group_progress(&c, &group, &c.topic("events"));
        if committed == end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror group committed {committed} of {end}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bridge.stop().await;
    let _ = conn.close(200, "bye".into()).await;
    names.delete(&c).await;
    eprintln!("took {:?}", started.elapsed());
}

/// Lifecycle events of one video on the events topic, in order.
async fn kafka_events(c: &Config, video: &str) -> Vec<LifecycleEvent> {
    let raw: Vec<Vec<u8>> = crate::helpers::read_all(c, &c.topic("events"), Duration::from_secs(4))
        .await
        .into_iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect();
    let dec = Codec::new(c.schema_registry_url.as_deref())
        .expect("codec")
        .decoder(LifecycleEvent::SCHEMA)
        .expect("decoder");
    let mut out = Vec::new();
    for bytes in raw {
        let e: LifecycleEvent = dec.decode(&bytes).await.expect("an event decodes");
        if e.meta.video_id == video {
            out.push(e);
        }
    }
    out
}

/// One spoken video through the whole legacy path: discovered from
/// `discovery_queue`, done, its events mirrored, then restarted from
/// `transcription_queue` (see [`restart_from_the_transcription_queue`]).
#[tokio::test(flavor = "multi_thread")]
async fn a_legacy_discovery_command_ends_with_a_done_video_and_its_events_mirrored() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).expect("media dir");
    spoken_video(&media, "legacy.mp4", SCRIPTS[1]);
    let site = serve(&media, "127.0.0.1").await;
    let p = Pipeline::start("bridge_e2e", |c| c.net_allow = "127.0.0.1/32".into()).await;
    let names = Names::new("bridge_e2e");
    let mut c = p.config.clone();
    names.apply(&mut c);
    c.topic_prefix = p.config.topic_prefix.clone();
    c.bridge.mirror = true;
    let (conn, ch, queue) = bind_events_queue(&c, &names.events).await;
    let mut bridge = Running::start(c.clone());

    // The old system's producer, unchanged: JSON on discovery_queue.
    let url = site.url("media/legacy.mp4");
    let message = Legacy {
        n: 0,
        queue: 0,
        body: serde_json::json!({"url": url, "requested_by": "legacy-producer", "options": {}})
            .to_string()
            .into_bytes(),
        message_id: None,
        expect: Expect::Valid {
            start_stage: None,
            url: Some(url.clone()),
            video_id: None,
        },
    };
    let mut publisher = Publisher::new(&c);
    publisher.declare(&names.queues[0]).await;
    publisher.publish(&names.queues[0], &message).await;
    publisher.close().await;
    let id = vidpipe::ids::subject(&vidpipe::ids::normalise(&url).expect("url"), false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while legacy::commands(&c).await.is_empty() {
        bridge.check().await;
        assert!(Instant::now() < deadline, "the command did not reach Kafka");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let finished = p
        .wait(std::slice::from_ref(&id), Duration::from_secs(600))
        .await;
    bridge.check().await;
    let v = &finished[&id];
    assert_eq!(v.status, "done", "{v:#?}");
    let stages: BTreeSet<&str> = v.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        stages,
        BTreeSet::from([
            "discover",
            "download",
            "extract-audio",
            "transcribe",
            "summarize"
        ]),
        "{v:#?}"
    );

    // Every lifecycle event of the video reached the bound queue, in the
    // order Kafka has them.
    let on_kafka = kafka_events(&p.config, &id).await;
    assert!(on_kafka.len() >= 10, "{} events", on_kafka.len());
    let mirrored = receive(&ch, &queue, Duration::from_secs(60), |m| {
        m.iter().filter(|e| e.video_id_header == id).count() >= on_kafka.len()
    })
    .await;
    let mirrored: Vec<(String, String, i64)> = mirrored
        .iter()
        .filter(|m| m.video_id_header == id)
        .map(|m| {
            (
                m.body["stage"].as_str().unwrap_or_default().to_string(),
                m.body["kind"].as_str().unwrap_or_default().to_string(),
                m.body["attempt"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    let expected: Vec<(String, String, i64)> = on_kafka
        .iter()
        .map(|e| {
            (
                e.stage.clone(),
                e.kind.as_str().to_string(),
                i64::from(e.attempt),
            )
        })
        .collect();
    assert_eq!(mirrored, expected, "mirrored events, in Kafka's order");
    let _ = conn.close(200, "bye".into()).await;

    restart_from_the_transcription_queue(&p, &c, &names, bridge, &id).await;
    p.stop().await;
    names.delete(&c).await;
    eprintln!("took {:?}", started.elapsed());
}

/// (stage, generation, status) of every run recorded under `id`.
async fn runs(pool: &sqlx::PgPool, id: &str) -> BTreeSet<(String, i64, String)> {
    sqlx::query_as("SELECT stage, generation, status FROM stage_runs WHERE video_id = $1")
        .bind(id)
        .fetch_all(pool)
        .await
        .expect("stage runs")
        .into_iter()
        .collect()
}

/// Waits until `id` is done or failed at `generation` or later.
async fn wait_generation(
    p: &Pipeline,
    bridge: &mut Running,
    id: &str,
    generation: i64,
) -> vidpipe::client::VideoStatus {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        bridge.check().await;
        let v = vidpipe::client::status(&p.pool, &[id.to_string()], 1)
            .await
            .expect("status")
            .pop()
            .expect("the video has a row");
        if v.generation >= generation && (v.status == "done" || v.status == "failed") {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not finish generation {generation}: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A legacy restart command (`{"video_id"}` on a stage queue) for `id`.
fn restart_message(n: usize, queue: usize, id: &str, message_id: &str) -> Legacy {
    Legacy {
        n,
        queue,
        body: serde_json::json!({ "video_id": id })
            .to_string()
            .into_bytes(),
        message_id: Some(message_id.to_string()),
        expect: Expect::Valid {
            start_stage: Some(legacy::STAGES[queue]),
            url: None,
            video_id: Some(id.to_string()),
        },
    }
}

/// The old system restarts a finished video at transcription: it runs
/// again from transcribe as a new generation, once per command however
/// often the command arrives; a restart of an unknown video fails with a
/// reason naming it.
async fn restart_from_the_transcription_queue(
    p: &Pipeline,
    c: &Config,
    names: &Names,
    mut bridge: Running,
    id: &str,
) {
    let message_id = unique("restart");
    let restart = restart_message(1, 3, id, &message_id);
    let mut publisher = Publisher::new(c);
    publisher.declare(&names.queues[3]).await;
    publisher.declare(&names.queues[4]).await;
    publisher.publish(&names.queues[3], &restart).await;
    let v = wait_generation(p, &mut bridge, id, 2).await;
    assert_eq!((v.status.as_str(), v.generation), ("done", 2), "{v:#?}");
    let first: BTreeSet<(String, i64, String)> = [
        "discover",
        "download",
        "extract-audio",
        "transcribe",
        "summarize",
    ]
    .iter()
    .map(|s| (s.to_string(), 1, "done".to_string()))
    .collect();
    let mut expected = first.clone();
    for (stage, generation) in [("transcribe", 2), ("summarize", 2), ("discover", 0)] {
        expected.insert((stage.to_string(), generation, "done".to_string()));
    }
    // Generation 0 is the restart command's own discover run.
    assert_eq!(
        runs(&p.pool, id).await,
        expected,
        "transcribe and summarize ran again; download and extract-audio did not"
    );
    let row = vidpipe::replay::restart_record(&p.pool, &message_id)
        .await
        .expect("restart row")
        .expect("the command is recorded");
    assert_eq!(
        (row.status.as_str(), row.generation, row.stage.as_str()),
        ("sent", Some(2), "transcribe"),
        "{row:?}"
    );
    let transcript = vidpipe::client::stage_output(&p.pool, id, "transcribe", Some(2))
        .await
        .expect("stage output")
        .expect("generation 2 has a transcript");
    assert_eq!(transcript["meta"]["generation"], 2, "{transcript}");

    // The same command again: once more from RabbitMQ with the same
    // message id (the bridge recognises it), and once as a second copy of
    // its record on Kafka (what two bridge instances racing on a
    // publisher's retry would write), which discovery must recognise.
    publisher.publish(&names.queues[3], &restart).await;
    let record = legacy::commands(c)
        .await
        .into_iter()
        .find(|r| r.command_id == message_id)
        .expect("the restart command is on Kafka");
    assert_eq!(record.start_stage.as_deref(), Some("transcribe"));
    assert_eq!(record.meta.video_id, id);
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let payload = codec
        .encoder(&c.topic("commands"), vidpipe::records::Command::SCHEMA)
        .await
        .unwrap_or_else(|e| missing("the schema registry", "schema_registry_url", e))
        .encode(&record)
        .expect("encode the command");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .create()
        .unwrap_or_else(|e| missing("Kafka", &c.kafka_brokers, e));
    producer
        .send(
            FutureRecord::to(&c.topic("commands"))
                .key(id)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| missing("Kafka", &c.kafka_brokers, e));

    // A restart of a video nobody knows.
    let unknown = format!("url:{}", unique("nosuchvideo"));
    let unknown_id = unique("restart-unknown");
    publisher
        .publish(
            &names.queues[4],
            &restart_message(2, 4, &unknown, &unknown_id),
        )
        .await;
    publisher.close().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let failed = loop {
        bridge.check().await;
        let row = vidpipe::replay::restart_record(&p.pool, &unknown_id)
            .await
            .expect("restart row");
        if let Some(row) = row {
            break row;
        }
        assert!(
            Instant::now() < deadline,
            "the unknown video's restart was not handled"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(failed.status, "failed", "{failed:?}");
    let reason = failed.error.clone().unwrap_or_default();
    assert!(
        reason.contains(&unknown) && reason.contains("unknown video"),
        "{reason}"
    );
    // The command's own run failed with that reason; no video row appeared.
    let run: (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT status, error_class, error FROM stage_runs
         WHERE video_id = $1 AND stage = 'discover' AND generation = 0",
    )
    .bind(&unknown)
    .fetch_one(&p.pool)
    .await
    .expect("the unknown restart's discover run");
    assert_eq!(run.0, "failed", "{run:?}");
    assert_eq!(run.1.as_deref(), Some("permanent:unknown_video"), "{run:?}");
    assert!(run.2.unwrap_or_default().contains(&unknown));
    let video_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM videos WHERE id = $1")
        .bind(&unknown)
        .fetch_one(&p.pool)
        .await
        .expect("count");
    assert_eq!(video_rows, 0, "an unknown video gets no row");

    // Everything handled: the bridge stops after finishing what it holds
    // (anything unacknowledged would go back to its queue), and discovery
    // has committed every command on Kafka.
    bridge.stop().await;
    let group = vidpipe::admin::group(&p.config, "discover");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut waiting = 0;
        for q in &names.queues {
            waiting += legacy::depth(c, q).await;
        }
        let (committed, end) = group_progress(c, &group, &c.topic("commands"));
        if waiting == 0 && committed == end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} messages waiting, discovery committed {committed} of {end}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let copies = legacy::commands(c)
        .await
        .iter()
        .filter(|r| r.command_id == message_id)
        .count();
    assert!(
        copies >= 2,
        "the restart command is on Kafka {copies} times"
    );
    let v = vidpipe::client::status(&p.pool, &[id.to_string()], 1)
        .await
        .expect("status")
        .pop()
        .expect("the video has a row");
    assert_eq!(
        (v.status.as_str(), v.generation),
        ("done", 2),
        "a repeated command starts nothing: {v:#?}"
    );
    assert_eq!(runs(&p.pool, id).await, expected, "no third generation");
}
