//! Tests that stop or restart shared services (RabbitMQ, Kafka) under
//! running bridges. They are a test binary of their own because an outage
//! would break the main binary's tests running in parallel; cargo runs
//! test binaries one after another, and within this one a global lock runs
//! the tests one at a time. Every stopped service is started again when
//! the test ends, whether it passed or not.
//!
//! The bridges are real `vidpipe bridge` processes (two competing
//! instances); the legacy producer is lapin used directly.

#[allow(dead_code)]
#[path = "../helpers.rs"]
mod helpers;
mod legacy;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vidpipe::config::Config;
use vidpipe::template::topics;

use helpers::{config, metric_series, missing};
use legacy::{Expect, Legacy, Names, Publisher};

/// One outage test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STACK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stack");

/// Runs `scripts/stack ARGS` and fails the test if it fails.
fn stack(args: &[&str]) {
    let status = Command::new(STACK)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/stack: {e}"));
    assert!(
        status.success(),
        "scripts/stack {} failed: {status}",
        args.join(" ")
    );
}

/// A stopped service, started again when this is dropped (also when the
/// test fails).
struct Outage {
    name: &'static str,
    up: bool,
}

impl Outage {
    async fn begin(name: &'static str) -> Self {
        // Armed before stopping: a failed stop may have stopped it anyway.
        let outage = Self { name, up: false };
        tokio::task::spawn_blocking(move || stack(&["stop", name]))
            .await
            .expect("scripts/stack stop");
        outage
    }

    async fn end(&mut self) {
        let name = self.name;
        tokio::task::spawn_blocking(move || stack(&["start", name]))
            .await
            .expect("scripts/stack start");
        self.up = true;
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.up {
            let status = Command::new(STACK).args(["start", self.name]).status();
            eprintln!("restarted {} after a failure: {status:?}", self.name);
        }
    }
}

/// A `vidpipe bridge` process, killed when dropped; its log is printed
/// when the test fails.
struct Bridge {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Bridge {
    fn spawn(names: &Names, instance: &str, dir: &Path, extra: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let log = dir.join(format!("bridge-{instance}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vidpipe"));
        cmd.arg("bridge")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(names.env())
            .env("VIDPIPE_METRICS_LISTEN", &metrics)
            .env("VIDPIPE_LOG", "info,vidpipe_amqp=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn vidpipe bridge");
        Self {
            child,
            log,
            metrics,
        }
    }

    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "a bridge exited by itself ({status}):\n{}",
                tail(&self.log, 40)
            );
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "a bridge did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sum of a counter over all its labels, from `/metrics`.
    async fn counter(&self, name: &str) -> f64 {
        self.counter_with(name, "").await
    }

    /// Sum of a counter over the series whose labels contain `label`.
    async fn counter_with(&self, name: &str, label: &str) -> f64 {
        metric_series(&self.metrics, name)
            .await
            .iter()
            .filter(|(labels, _)| labels.contains(label))
            .map(|(_, v)| v)
            .sum()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), tail(&self.log, 60));
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Publishes `sent` in a task, counting progress; `pause` between messages.
fn publish_all(
    c: &Config,
    names: &Names,
    sent: Arc<Vec<Legacy>>,
    pause: Duration,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<usize>) {
    let progress = Arc::new(AtomicUsize::new(0));
    let (c, names, p) = (c.clone(), names.clone(), progress.clone());
    let handle = tokio::spawn(async move {
        let mut publisher = Publisher::new(&c);
        for m in sent.iter() {
            publisher.publish(&names.queues[m.queue], m).await;
            p.fetch_add(1, Ordering::SeqCst);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        let republished = publisher.republished;
        publisher.close().await;
        republished
    });
    (progress, handle)
}

async fn wait_for(progress: &AtomicUsize, n: usize, bridges: &mut [&mut Bridge]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.load(Ordering::SeqCst) < n {
        for b in bridges.iter_mut() {
            b.assert_alive();
        }
        assert!(Instant::now() < deadline, "the publisher is stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every valid command is on Kafka, every malformed message
/// is in the dead-letter queue and the legacy queues are empty. (Ready
/// counts alone are not enough: messages in a bridge's hand are not
/// counted as ready.)
async fn wait_drained(c: &Config, names: &Names, sent: &[Legacy], bridges: &mut [&mut Bridge]) {
    let valid: HashSet<usize> = sent
        .iter()
        .filter(|m| matches!(m.expect, Expect::Valid { .. }))
        .map(|m| m.n)
        .collect();
    let malformed = sent.len() - valid.len();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        for b in bridges.iter_mut() {
            b.assert_alive();
        }
        let mut waiting = 0;
        for q in &names.queues {
            waiting += legacy::depth(c, q).await;
        }
        // Declared by the bridges as they start, maybe after the first look.
        let dead = legacy::depth_if_declared(c, &names.dlq).await.unwrap_or(0) as usize;
        let on_kafka: HashSet<usize> = legacy::commands(c)
            .await
            .iter()
            .filter_map(|r| r.options.get("n")?.parse().ok())
            .collect();
        if waiting == 0 && dead >= malformed && on_kafka.len() >= valid.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {waiting} waiting, {}/{} on Kafka, {dead}/{malformed} dead-lettered",
            on_kafka.len(),
            valid.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Stops the bridges (they finish what they hold) and checks the result.
async fn finish(
    c: &Config,
    names: &Names,
    sent: &[Legacy],
    bridges: Vec<&mut Bridge>,
) -> (usize, usize) {
    for b in bridges {
        let status = b.stop();
        assert!(status.success(), "a bridge did not exit cleanly: {status}");
    }
    for q in &names.queues {
        assert_eq!(legacy::depth(c, q).await, 0, "{q} is empty");
    }
    let records = legacy::commands(c).await;
    let dead = legacy::drain_dead_letters(c, &names.dlq).await;
    let repeats = legacy::check_outcome(sent, &records, &dead, true);
    (repeats, dead.len())
}

fn count_malformed(sent: &[Legacy]) -> usize {
    sent.iter()
        .filter(|m| matches!(m.expect, Expect::Rejected(_)))
        .count()
}

async fn setup(tag: &str) -> (Config, Names, tempfile::TempDir) {
    let mut c = config();
    let names = Names::new(tag);
    names.apply(&mut c);
    topics::ensure(&c.kafka_brokers, &[c.topic("commands")], 3, 1)
        .await
        .unwrap_or_else(|e| missing("Kafka", &c.kafka_brokers, e));
    let mut publisher = Publisher::new(&c);
    for q in &names.queues {
        publisher.declare(q).await;
    }
    publisher.close().await;
    (c, names, tempfile::tempdir().expect("tempdir"))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_bridges_lose_nothing_across_a_rabbitmq_restart() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (c, names, dir) = setup("rmq_restart").await;
    let mut a = Bridge::spawn(
        &names,
        "a",
        dir.path(),
        &[("VIDPIPE_BRIDGE__PREFETCH", "32")],
    );
    let mut b = Bridge::spawn(
        &names,
        "b",
        dir.path(),
        &[("VIDPIPE_BRIDGE__PREFETCH", "32")],
    );
    // 2,000 commands, 5% malformed in seven different ways.
    let sent = Arc::new(legacy::workload("rr", 2000, 20));
    let malformed = count_malformed(&sent);
    assert_eq!(malformed, 100);
    let (progress, publisher) = publish_all(&c, &names, sent.clone(), Duration::from_millis(2));
    // In the middle, RabbitMQ restarts under the bridges and the producer.
    wait_for(&progress, 1000, &mut [&mut a, &mut b]).await;
    let mut outage = Outage::begin("rabbitmq").await;
    eprintln!(
        "RabbitMQ stopped after {} messages",
        progress.load(Ordering::SeqCst)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    outage.end().await;
    eprintln!("RabbitMQ back after {:?}", started.elapsed());
    let republished = publisher.await.expect("publisher task");
    wait_drained(&c, &names, &sent, &mut [&mut a, &mut b]).await;
    let acked_a = a.counter("vidpipe_bridge_acked_total").await;
    let acked_b = b.counter("vidpipe_bridge_acked_total").await;
    let duplicates = a
        .counter_with("vidpipe_bridge_acked_total", "outcome=\"duplicate\"")
        .await
        + b.counter_with("vidpipe_bridge_acked_total", "outcome=\"duplicate\"")
            .await;
    eprintln!(
        "acknowledged: {acked_a} by a, {acked_b} by b, of which {duplicates} found on Kafka already; \
         {republished} republished by the producer"
    );
    assert!(
        acked_a > 0.0 && acked_b > 0.0,
        "both instances took commands"
    );
    let (repeats, dead) = finish(&c, &names, &sent, vec![&mut a, &mut b]).await;
    assert_eq!(repeats, 0);
    eprintln!("{dead} dead letters; took {:?}", started.elapsed());
    names.delete(&c).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_outage_stops_acks_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let (c, names, dir) = setup("kafka_outage").await;
    let mut a = Bridge::spawn(&names, "a", dir.path(), &[]);
    let mut b = Bridge::spawn(&names, "b", dir.path(), &[]);
    let sent = Arc::new(legacy::workload("ko", 1000, 25));
    // A steady stream over the whole outage.
    let (progress, publisher) = publish_all(&c, &names, sent.clone(), Duration::from_millis(30));
    wait_for(&progress, 250, &mut [&mut a, &mut b]).await;
    let mut outage = Outage::begin("kafka").await;
    let stopped = Instant::now();
    eprintln!(
        "Kafka stopped after {} messages",
        progress.load(Ordering::SeqCst)
    );
    // Commands in flight when Kafka went may still finish; after that,
    // nothing is acknowledged until Kafka is back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let acked = |a: f64, b: f64| a + b;
    let before = acked(
        a.counter("vidpipe_bridge_acked_total").await,
        b.counter("vidpipe_bridge_acked_total").await,
    );
    let rejected_before = a.counter("vidpipe_bridge_rejected_total").await
        + b.counter("vidpipe_bridge_rejected_total").await;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(stopped.elapsed())).await;
    let during = acked(
        a.counter("vidpipe_bridge_acked_total").await,
        b.counter("vidpipe_bridge_acked_total").await,
    );
    let rejected_during = a.counter("vidpipe_bridge_rejected_total").await
        + b.counter("vidpipe_bridge_rejected_total").await;
    let mut waiting = 0;
    for q in &names.queues {
        waiting += legacy::depth(&c, q).await;
    }
    eprintln!(
        "Kafka down {:?}: acknowledged {before} then {during}; {waiting} waiting; dead letters {rejected_before} then {rejected_during}",
        stopped.elapsed()
    );
    assert_eq!(before, during, "nothing acknowledged while Kafka is down");
    // Published during the outage and neither acknowledged nor
    // dead-lettered: held by RabbitMQ, either ready in the queues or
    // delivered to a bridge and unacknowledged (prefetch can hold all of
    // them, so the queues alone may show none).
    let published = progress.load(Ordering::SeqCst) as f64;
    let held = published - during - rejected_during;
    eprintln!("{published} published, {held} held unacknowledged ({waiting} ready in the queues)");
    assert!(
        held > 0.0,
        "messages published during the outage are held, not acknowledged"
    );
    a.assert_alive();
    b.assert_alive();
    outage.end().await;
    eprintln!("Kafka back after {:?} down", stopped.elapsed());
    publisher.await.expect("publisher task");
    wait_drained(&c, &names, &sent, &mut [&mut a, &mut b]).await;
    let total = a.counter("vidpipe_bridge_acked_total").await
        + b.counter("vidpipe_bridge_acked_total").await;
    assert!(total > during, "acknowledgements resumed");
    let (repeats, _) = finish(&c, &names, &sent, vec![&mut a, &mut b]).await;
    assert_eq!(repeats, 0);
    eprintln!("took {:?}", started.elapsed());
    names.delete(&c).await;
}
