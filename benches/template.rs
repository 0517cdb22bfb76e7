//! The processor template's overhead, as ratios to a raw rdkafka loop on the
//! same broker in the same run (never a timed test).
//!
//! `cargo bench --bench template --profile dev` (see benches/README.md for
//! why the dev profile). Produces N 1 KiB records once, then runs each mode
//! in a child process of this binary (so that each has its own peak RSS):
//! a raw consume->produce loop (the ceiling), and the template with the copy
//! stage in at-least-once and exactly-once mode, database status off and
//! on. Prints a markdown table for BENCHMARKS.md.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use vidpipe::config::{Config, Guarantee};
use vidpipe::records::{Meta, Record};
use vidpipe::template::codec::Codec;
use vidpipe::template::runner::{RunnerSettings, run};
use vidpipe::template::status::StatusStore;
use vidpipe::template::testkit::{CopyStage, Item};
use vidpipe::template::topics;

const PARTITIONS: i32 = 6;
const VIDEOS: u64 = 5_000;

fn records() -> u64 {
    std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Sum of committed offsets of `group` on `topic`.
fn committed(brokers: &str, group: &str, topic: &str) -> u64 {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("probe");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    probe
        .committed_offsets(tpl, Duration::from_secs(10))
        .map(|t| {
            t.elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => o as u64,
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The ceiling: consume, produce the same bytes, commit, as plainly as
/// rdkafka allows (idempotent producer, async commits every 500 ms).
fn raw_loop(c: &Config, input: &str, output: &str, n: u64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("group.id", format!("raw-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    consumer.subscribe(&[input]).expect("subscribe");
    let mut seen = 0;
    while seen < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let mut rec = BaseRecord::to(output)
                .payload(m.payload().unwrap_or_default())
                .key(m.key().unwrap_or_default());
            while let Err((_, back)) = producer.send(rec) {
                rec = back;
                producer.poll(Duration::from_millis(1));
            }
            seen += 1;
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

async fn child(mode: &str, prefix: &str, n: u64) {
    let mut c = Config::local_defaults().expect("config");
    c.topic_prefix = prefix.to_string();
    let (input, output) = (c.topic("in"), c.topic("out"));
    let start = Instant::now();
    if mode == "raw" {
        let cc = c.clone();
        tokio::task::spawn_blocking(move || raw_loop(&cc, &input, &output, n))
            .await
            .unwrap();
    } else {
        let (guarantee, status) = match mode {
            "alo" => (Guarantee::AtLeastOnce, false),
            "alo-status" => (Guarantee::AtLeastOnce, true),
            "eos" => (Guarantee::ExactlyOnce, false),
            _ => (Guarantee::ExactlyOnce, true),
        };
        c.guarantee = guarantee;
        let env = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        c.runner.in_flight = env("BENCH_IN_FLIGHT", 256) as usize;
        c.runner.max_buffered =
            env("BENCH_MAX_BUFFERED", 10_000).max(c.runner.in_flight as u64) as usize;
        c.runner.commit_interval_ms = env("BENCH_COMMIT_MS", 100);
        let status = if status {
            let url = std::env::var("BENCH_DATABASE_URL").expect("BENCH_DATABASE_URL");
            let pool = vidpipe::store::db::connect(&url.into(), 16)
                .await
                .expect("database");
            Some(StatusStore::new(pool))
        } else {
            None
        };
        let group = format!("{prefix}copy");
        let settings = RunnerSettings {
            codec: Codec::new(c.schema_registry_url.as_deref()).expect("codec"),
            instance: format!("bench-{mode}"),
            final_stage: true,
            group: Some(group.clone()),
            status,
            config: c.clone(),
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let brokers = c.kafka_brokers.clone();
        let watcher = tokio::task::spawn_blocking(move || {
            while committed(&brokers, &group, &input) < n {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.cancel();
        });
        let stage = Arc::new(CopyStage {
            delay: Duration::ZERO,
        });
        run(stage, settings, shutdown).await.expect("runner");
        watcher.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("RESULT {mode} {secs:.3} {:.1}", peak_rss_mib());
}

/// Creates a mode's topics and fills its input with `n` 1 KiB records.
async fn prepare(c: &Config, prefix: &str, n: u64) {
    let mut c = c.clone();
    c.topic_prefix = prefix.to_string();
    let names: Vec<String> = ["in", "out", "events", "dlq"]
        .iter()
        .map(|t| c.topic(t))
        .collect();
    topics::ensure(&c.kafka_brokers, &names, PARTITIONS, 1)
        .await
        .expect("topics (is the stack up? scripts/stack up)");
    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let enc = codec
        .encoder(&c.topic("in"), Item::SCHEMA)
        .await
        .expect("encoder");
    let topic = c.topic("in");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    // 1 KiB on the wire: the encoded record, body included.
    for i in 0..n {
        let video = format!("video-{}", i % VIDEOS);
        let item = Item {
            meta: Meta::new(video.clone()),
            seq: (i / VIDEOS) as i64,
            body: "x".repeat(960),
        };
        let bytes = enc.encode(&item).expect("encode");
        let mut rec = BaseRecord::to(&topic).key(&video).payload(&bytes);
        while let Err((_, back)) = producer.send(rec) {
            rec = back;
            producer.poll(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        // VIDPIPE_LOG=debug shows the runner's timeline (stderr).
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("VIDPIPE_LOG")
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_writer(std::io::stderr)
            .init();
        child(&args[i + 1], &args[i + 2], records()).await;
        return;
    }
    let n = records();
    let c = Config::local_defaults().expect("config");
    // A fresh database for the status modes.
    let admin = vidpipe::store::db::connect(&c.database_url, 1)
        .await
        .expect("PostgreSQL (scripts/stack up)");
    let db = format!("bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .expect("create database");
    let mut url = url::Url::parse(c.database_url.expose_secret()).unwrap();
    url.set_path(&db);
    let pool = vidpipe::store::db::connect(&url.to_string().into(), 2)
        .await
        .unwrap();
    vidpipe::store::db::migrate(&pool).await.unwrap();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    // BENCH_MODES=alo,eos runs a subset (the ceiling always runs).
    let only = std::env::var("BENCH_MODES").unwrap_or_default();
    let modes: Vec<&str> = ["raw", "alo", "alo-status", "eos", "eos-status"]
        .into_iter()
        .filter(|m| *m == "raw" || only.is_empty() || only.split(',').any(|o| o == *m))
        .collect();
    let mut results = Vec::new();
    for mode in modes.iter().copied() {
        let prefix = format!("bench_{run_id}.{mode}.");
        prepare(&c, &prefix, n).await;
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args(["--child", mode, &prefix])
            .env("BENCH_RECORDS", n.to_string())
            .env("BENCH_DATABASE_URL", url.as_str())
            .output()
            .expect("run a mode");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if std::env::var_os("VIDPIPE_LOG").is_some() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let line = stdout
            .lines()
            .find(|l| l.starts_with("RESULT"))
            .unwrap_or_else(|| panic!("{mode} failed: {}", String::from_utf8_lossy(&out.stderr)));
        let parts: Vec<&str> = line.split_whitespace().collect();
        let secs: f64 = parts[2].parse().unwrap();
        let rss: f64 = parts[3].parse().unwrap();
        eprintln!("{mode}: {secs:.2} s, peak RSS {rss:.0} MiB");
        results.push((mode, n as f64 / secs, rss));
    }
    let ceiling = results[0].1;
    println!("\n{n} records of 1 KiB, {PARTITIONS} partitions, {VIDEOS} videos, in_flight 256\n");
    println!("| mode | records/s | ratio to ceiling | peak RSS (MiB) |");
    println!("| --- | ---: | ---: | ---: |");
    for (mode, rate, rss) in &results {
        let name = match *mode {
            "raw" => "raw rdkafka consume->produce (ceiling)",
            "alo" => "template, at-least-once, no status",
            "alo-status" => "template, at-least-once, status",
            "eos" => "template, exactly-once, no status",
            _ => "template, exactly-once, status",
        };
        println!("| {name} | {rate:.0} | {:.2} | {rss:.0} |", rate / ceiling);
    }
}
