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

/// CPU time (user + system) of this process so far, from /proc (Linux's
/// clock tick is 1/100 s on every platform this runs on).
fn cpu_seconds() -> f64 {
    process_cpu_seconds("self")
}

/// CPU time of process `pid` (or `self`), 0 when unknown.
fn process_cpu_seconds(pid: &str) -> f64 {
    stat_ticks(pid, 2) / 100.0
}

/// CPU time of process `pid` and of its children that ended (PostgreSQL's
/// postmaster reaps its backends: the connections of a mode count there).
fn process_tree_cpu_seconds(pid: &str) -> f64 {
    stat_ticks(pid, 4) / 100.0
}

/// Sum of `fields` CPU fields of /proc/PID/stat from utime on.
fn stat_ticks(pid: &str, fields: usize) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let mut ticks = 0.0;
            for i in 11..11 + fields {
                ticks += f.get(i)?.parse::<f64>().ok()?;
            }
            Some(ticks)
        })
        .unwrap_or(0.0)
}

/// CPU per thread of this process (the loop thread is `vidpipe-copy`), to
/// see which one is busy.
fn print_thread_cpu() {
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let tid = task.file_name().to_string_lossy().to_string();
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let cpu = process_cpu_seconds(&format!("self/task/{tid}"));
        if cpu >= 0.05 {
            eprintln!("thread {tid} {}: CPU {cpu:.2} s", name.trim());
        }
    }
}

/// A process of this machine whose command line contains `pattern`
/// (arguments joined by spaces): the stack's Kafka broker and PostgreSQL
/// server, whose CPU per record is part of what each mode costs.
fn find_process(pattern: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().to_string();
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (pid.chars().all(|c| c.is_ascii_digit()) && cmdline.contains(pattern)).then_some(pid)
    })
}

/// A client that reads `group`'s committed offsets without joining it.
fn probe(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("probe")
}

/// Sum of committed offsets of the probe's group on `topic`.
fn committed(probe: &BaseConsumer, topic: &str) -> u64 {
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
    // Not rdkafka's `flush`: it waits in 100 ms slices, which would add up
    // to 100 ms to this short run and flatter every ratio to the ceiling.
    while producer.in_flight_count() > 0 {
        producer.poll(Duration::from_millis(1));
    }
}

async fn child(mode: &str, prefix: &str, n: u64) {
    let mut c = Config::local_defaults().expect("config");
    c.topic_prefix = prefix.to_string();
    let (input, output) = (c.topic("in"), c.topic("out"));
    let start = Instant::now();
    let cpu_start = cpu_seconds();
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
            // One client for the whole run: creating one per check would
            // take CPU from the runner it measures.
            let probe = probe(&brokers, &group);
            // BENCH_PROGRESS=1 prints the committed count as it grows.
            let progress = std::env::var_os("BENCH_PROGRESS").is_some();
            let mut last_print = Instant::now();
            loop {
                let done = committed(&probe, &input);
                if progress && last_print.elapsed() >= Duration::from_millis(250) {
                    eprintln!("{:>6.2} s: {done} committed", start.elapsed().as_secs_f64());
                    last_print = Instant::now();
                }
                if done >= n {
                    if progress {
                        print_thread_cpu();
                    }
                    break;
                }
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
    let cpu = cpu_seconds() - cpu_start;
    println!("RESULT {mode} {secs:.3} {:.1} {cpu:.2}", peak_rss_mib());
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
    let broker = find_process("kafka.Kafka");
    // The postmaster (`postgres -D ...`), not one of its backends.
    let postgres = find_process("postgres -D ");
    for mode in modes.iter().copied() {
        let prefix = format!("bench_{run_id}.{mode}.");
        prepare(&c, &prefix, n).await;
        let broker_start = broker.as_deref().map(process_cpu_seconds);
        let postgres_start = postgres.as_deref().map(process_tree_cpu_seconds);
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
        let cpu: f64 = parts[4].parse().unwrap();
        let broker_cpu = broker
            .as_deref()
            .zip(broker_start)
            .map(|(pid, start)| process_cpu_seconds(pid) - start);
        // Ended backends count once reaped: give the postmaster a moment.
        std::thread::sleep(Duration::from_millis(300));
        let postgres_cpu = postgres
            .as_deref()
            .zip(postgres_start)
            .map(|(pid, start)| process_tree_cpu_seconds(pid) - start);
        eprintln!(
            "{mode}: {secs:.2} s, CPU {cpu:.2} s, broker CPU {:.2} s, peak RSS {rss:.0} MiB",
            broker_cpu.unwrap_or(f64::NAN)
        );
        let per_record = |s: f64| s * 1e6 / n as f64;
        results.push((
            mode,
            n as f64 / secs,
            rss,
            per_record(cpu),
            broker_cpu.map(per_record),
            postgres_cpu.map(per_record),
        ));
    }
    let ceiling = results[0].1;
    let setting = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    println!(
        "\n{n} records of 1 KiB, {PARTITIONS} partitions, {VIDEOS} videos, in_flight {}, commit every {} ms\n",
        setting("BENCH_IN_FLIGHT", "256"),
        setting("BENCH_COMMIT_MS", "100"),
    );
    println!(
        "| mode | records/s | ratio to ceiling | peak RSS (MiB) | CPU µs/record: process | Kafka | PostgreSQL |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (mode, rate, rss, cpu, broker_cpu, postgres_cpu) in &results {
        let name = match *mode {
            "raw" => "raw rdkafka consume->produce (ceiling)",
            "alo" => "template, at-least-once, no status",
            "alo-status" => "template, at-least-once, status",
            "eos" => "template, exactly-once, no status",
            _ => "template, exactly-once, status",
        };
        let show = |c: &Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.0}"));
        println!(
            "| {name} | {rate:.0} | {:.2} | {rss:.0} | {cpu:.0} | {} | {} |",
            rate / ceiling,
            show(broker_cpu),
            show(postgres_cpu),
        );
    }
}
