//! A harness for tests that run the copy stage (`examples/copy_stage.rs`)
//! as child processes and then kill, stop or restart them: topics and a
//! database of their own, a trigger that records any status row moving
//! backwards, the input records, the group's committed progress, and what
//! a read_committed reader finds on the output topic.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use vidpipe::config::{Config, Guarantee};
use vidpipe::records::{Meta, Record};
use vidpipe::template::codec::Codec;
use vidpipe::template::testkit::Item;
use vidpipe::template::topics;

use crate::helpers::{config, fresh_database, read_all, unique};

/// One scenario's world: its topics, database and input.
pub struct Harness {
    pub c: Config,
    pub pool: sqlx::PgPool,
    pub db_url: String,
    pub codec: std::sync::Arc<Codec>,
    pub partitions: i32,
    pub records: i64,
    pub videos: i64,
}

fn child_binary() -> std::path::PathBuf {
    // cargo test builds examples next to the test binary's deps directory.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("examples").join("copy_stage");
    assert!(
        path.exists(),
        "{} is missing: cargo test builds it",
        path.display()
    );
    // `cargo test --test tests` builds the test binary but not the
    // examples: after a change to the runner, the children would run the
    // old code and the tests would say nothing about the new one.
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(newer) = newest_source(&root.join("src"))
        .into_iter()
        .chain(newest_source(&root.join("examples")))
        .find(|(modified, _)| *modified > built)
    {
        panic!(
            "{} is older than {}: run `cargo build --examples` (or the whole `cargo test`) first",
            path.display(),
            newer.1.display()
        );
    }
    path
}

/// The most recently modified `.rs` file under `dir`.
fn newest_source(dir: &std::path::Path) -> Option<(std::time::SystemTime, std::path::PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, std::path::PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let found = if path.is_dir() {
            newest_source(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        } else {
            None
        };
        if let Some(f) = found
            && newest.as_ref().is_none_or(|n| f.0 > n.0)
        {
            newest = Some(f);
        }
    }
    newest
}

/// A child process that is killed when dropped, so that a failing test
/// leaves no stage running behind it.
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends `signal` (`TERM`, `STOP`, `CONT`) to a child.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {} failed", child.id());
}

impl Harness {
    /// Topics `in`, `out`, `events`, `dlq` with `partitions` each, a fresh
    /// database with the regression trigger, and `records` input records
    /// spread over `videos` keys (each video's records numbered by `seq`).
    pub async fn new(
        prefix: &str,
        guarantee: Guarantee,
        partitions: i32,
        records: i64,
        videos: i64,
    ) -> Self {
        let mut c = config();
        c.topic_prefix = format!("{}.", unique(prefix));
        c.guarantee = guarantee;
        let names: Vec<String> = ["in", "out", "events", "dlq"]
            .iter()
            .map(|t| c.topic(t))
            .collect();
        topics::ensure(&c.kafka_brokers, &names, partitions, 1)
            .await
            .expect("topics");
        let (pool, db) = fresh_database(&c).await;
        // Any update that moves a row backwards is recorded, to prove none does.
        sqlx::raw_sql(
            "CREATE TABLE regressions (tbl text, id text, old_status text, new_status text);
             CREATE FUNCTION no_regress() RETURNS trigger AS $$
             BEGIN
               IF (OLD.status IN ('done') AND NEW.status <> 'done') OR NEW.generation < OLD.generation THEN
                 INSERT INTO regressions VALUES (TG_TABLE_NAME, OLD::text, OLD.status, NEW.status);
               END IF;
               RETURN NEW;
             END $$ LANGUAGE plpgsql;
             CREATE TRIGGER runs_no_regress BEFORE UPDATE ON stage_runs FOR EACH ROW EXECUTE FUNCTION no_regress();
             CREATE TRIGGER videos_no_regress BEFORE UPDATE ON videos FOR EACH ROW EXECUTE FUNCTION no_regress();",
        )
        .execute(&pool)
        .await
        .expect("regression trigger");
        let mut url = url::Url::parse(c.database_url.expose_secret()).unwrap();
        url.set_path(&db);
        let h = Self {
            db_url: url.to_string(),
            codec: Codec::new(c.schema_registry_url.as_deref()).expect("codec"),
            c,
            pool,
            partitions,
            records,
            videos,
        };
        h.produce_input_in(0).await;
        h
    }

    /// Produces the input records (`records` over `videos` keys), in
    /// `transactions` transactions of about equal size, or without any
    /// when 0 (a transactional input topic has a commit marker after each
    /// transaction's records on every partition it wrote to).
    pub async fn produce_input_in(&self, transactions: usize) {
        let enc = self
            .codec
            .encoder(&self.c.topic("in"), Item::SCHEMA)
            .await
            .expect("encoder");
        let videos = self.videos;
        let records: Vec<(String, Vec<u8>)> = (0..self.records)
            .map(|i| {
                let video = format!("video-{}", i % videos);
                let item = Item {
                    meta: Meta::new(video.clone()),
                    seq: i / videos,
                    body: "x".repeat(64),
                };
                (video, enc.encode(&item).unwrap())
            })
            .collect();
        let c = self.c.clone();
        tokio::task::spawn_blocking(move || {
            let mut config = ClientConfig::new();
            config.set("bootstrap.servers", &c.kafka_brokers);
            if transactions > 0 {
                config.set("transactional.id", unique("input"));
            }
            let producer: BaseProducer = config.create().unwrap();
            let per_transaction = records.len().div_ceil(transactions.max(1)).max(1);
            if transactions > 0 {
                producer
                    .init_transactions(Duration::from_secs(30))
                    .expect("init_transactions");
            }
            let topic = c.topic("in");
            for chunk in records.chunks(per_transaction) {
                if transactions > 0 {
                    producer.begin_transaction().expect("begin_transaction");
                }
                for (k, v) in chunk {
                    let mut rec = BaseRecord::to(&topic).key(k).payload(v);
                    while let Err((_, back)) = producer.send(rec) {
                        rec = back;
                        producer.poll(Duration::from_millis(10));
                    }
                }
                if transactions > 0 {
                    producer
                        .commit_transaction(Duration::from_secs(30))
                        .expect("commit_transaction");
                }
            }
            producer.flush(Duration::from_secs(30)).unwrap();
        })
        .await
        .unwrap();
    }

    /// Starts a copy-stage process. `env` adds or overrides variables; its
    /// stderr goes to `log` when given.
    pub fn spawn(
        &self,
        instance: &str,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Proc {
        let mut cmd = Command::new(child_binary());
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("VIDPIPE_TOPIC_PREFIX", &self.c.topic_prefix)
            .env(
                "VIDPIPE_GUARANTEE",
                match self.c.guarantee {
                    Guarantee::ExactlyOnce => "exactly-once",
                    Guarantee::AtLeastOnce => "at-least-once",
                },
            )
            .env("VIDPIPE_DATABASE_URL", &self.db_url)
            .env("VIDPIPE_RUNNER__COMMIT_INTERVAL_MS", "100")
            .env("VIDPIPE_RUNNER__IN_FLIGHT", "64")
            .env("VIDPIPE_RUNNER__SESSION_TIMEOUT_MS", "6000")
            .env("COPY_INSTANCE", instance)
            .env("COPY_DELAY_MS", "2")
            .env("COPY_FINAL", "1")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(path) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("log file");
            cmd.stderr(file);
        }
        Proc(cmd.spawn().expect("spawn the copy stage"))
    }

    /// A client that reads the stage group's committed offsets without
    /// joining the group.
    pub fn probe(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.c.kafka_brokers)
            .set("group.id", format!("{}copy", self.c.topic_prefix))
            .create()
            .unwrap()
    }

    /// Committed progress of the stage's consumer group: records below the
    /// committed offsets, summed over partitions.
    pub fn committed(&self, probe: &BaseConsumer) -> i64 {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.c.topic("in"), p);
        }
        match probe.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                })
                .sum(),
            Err(_) => 0,
        }
    }

    /// Blocks until the committed progress reaches `target`, failing if a
    /// child exits or nothing gets there within `limit`.
    pub fn wait_committed(
        &self,
        probe: &BaseConsumer,
        target: i64,
        children: &mut [&mut Proc],
        limit: Duration,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.committed(probe);
            if now >= target {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "committed progress {now} did not reach {target} within {limit:?}"
            );
            for child in children.iter_mut() {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "a child exited by itself"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What a read_committed reader finds on the output topic: how many
    /// times each (video, seq) appears.
    pub async fn output_counts(&self) -> HashMap<(String, i64), usize> {
        let raw: Vec<Vec<u8>> = read_all(&self.c, &self.c.topic("out"), Duration::from_secs(5))
            .await
            .into_iter()
            .map(|m| m.payload().unwrap_or_default().to_vec())
            .collect();
        let dec = self.codec.decoder(Item::SCHEMA).unwrap();
        let mut counts: HashMap<(String, i64), usize> = HashMap::new();
        for bytes in raw {
            let item: Item = dec.decode(&bytes).await.expect("output decodes");
            *counts.entry((item.meta.video_id, item.seq)).or_default() += 1;
        }
        counts
    }

    /// Every input exactly once on the output.
    pub async fn assert_exactly_once(&self) {
        let counts = self.output_counts().await;
        assert_eq!(
            counts.len() as i64,
            self.records,
            "every input reached the output"
        );
        let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            dups.is_empty(),
            "duplicates under exactly-once: {:?}",
            &dups[..dups.len().min(5)]
        );
    }

    /// One stage run per video, all done, every video done, none regressed.
    pub async fn assert_status_terminal(&self) {
        let one = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.pool)
                .await
                .unwrap()
        };
        let runs = one("SELECT count(*) FROM stage_runs").await;
        let not_done = one("SELECT count(*) FROM stage_runs WHERE status <> 'done'").await;
        let videos_done = one("SELECT count(*) FROM videos WHERE status = 'done'").await;
        let regressions = one("SELECT count(*) FROM regressions").await;
        assert_eq!(runs, self.videos, "one stage run per video");
        assert_eq!(not_done, 0, "every stage run ends done");
        assert_eq!(videos_done, self.videos, "every video ends done");
        assert_eq!(regressions, 0, "no status row moved backwards");
    }
}
