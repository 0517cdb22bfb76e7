//! Crash safety, after Kafka's own transactions system test: a child process
//! runs the copy stage over 5,000 records and is killed with SIGKILL three
//! times at random points after at least 20% progress, then restarted. A
//! read_committed reader then checks what reached the output topic.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use vidpipe::config::{Config, Guarantee};
use vidpipe::records::{Meta, Record};
use vidpipe::template::codec::Codec;
use vidpipe::template::testkit::Item;
use vidpipe::template::topics;

use crate::helpers::{config, fresh_database, unique};

const RECORDS: i64 = 5_000;
const VIDEOS: i64 = 250;
const PARTITIONS: i32 = 3;

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
    path
}

fn spawn_child(c: &Config, db_url: &str, instance: &str) -> Child {
    Command::new(child_binary())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
        .env(
            "VIDPIPE_GUARANTEE",
            match c.guarantee {
                Guarantee::ExactlyOnce => "exactly-once",
                Guarantee::AtLeastOnce => "at-least-once",
            },
        )
        .env("VIDPIPE_DATABASE_URL", db_url)
        .env("VIDPIPE_RUNNER__COMMIT_INTERVAL_MS", "100")
        .env("VIDPIPE_RUNNER__IN_FLIGHT", "64")
        .env("VIDPIPE_RUNNER__SESSION_TIMEOUT_MS", "6000")
        .env("COPY_INSTANCE", instance)
        .env("COPY_DELAY_MS", "2")
        .env("COPY_FINAL", "1")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the copy stage")
}

/// Committed progress of the stage's consumer group (records below the
/// committed offsets, summed over partitions). `consumer` carries the
/// group's id and never joins it.
fn committed(c: &Config, consumer: &BaseConsumer) -> i64 {
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&c.topic("in"), p);
    }
    match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
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

async fn crash_run(guarantee: Guarantee) -> (HashMap<(String, i64), usize>, sqlx::PgPool) {
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("crash"));
    c.guarantee = guarantee;
    let names: Vec<String> = ["in", "out", "events", "dlq"]
        .iter()
        .map(|t| c.topic(t))
        .collect();
    topics::ensure(&c.kafka_brokers, &names, PARTITIONS, 1)
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
    let db_url = url.to_string();

    let codec = Codec::new(c.schema_registry_url.as_deref()).expect("codec");
    let enc = codec
        .encoder(&c.topic("in"), Item::SCHEMA)
        .await
        .expect("encoder");
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let video = format!("video-{}", i % VIDEOS);
            let item = Item {
                meta: Meta::new(video.clone()),
                seq: i / VIDEOS,
                body: "x".repeat(64),
            };
            (video, enc.encode(&item).unwrap())
        })
        .collect();
    let cc = c.clone();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &cc.kafka_brokers)
            .create()
            .unwrap();
        let topic = cc.topic("in");
        for (k, v) in &records {
            let mut rec = BaseRecord::to(&topic).key(k).payload(v);
            while let Err((_, back)) = producer.send(rec) {
                rec = back;
                producer.poll(Duration::from_millis(10));
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    })
    .await
    .unwrap();

    let cc = c.clone();
    tokio::task::spawn_blocking(move || {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cc.kafka_brokers)
            .set("group.id", format!("{}copy", cc.topic_prefix))
            .create()
            .unwrap();
        let instance = unique("child");
        let mut child = spawn_child(&cc, &db_url, &instance);
        let mut rng = rand::rng();
        let mut floor = RECORDS / 5;
        for kill in 0..3 {
            // A random point between the floor and 90%, later each time.
            let target = rng.random_range(floor..=(RECORDS * 9 / 10).max(floor + 1));
            let deadline = Instant::now() + Duration::from_secs(180);
            while committed(&cc, &probe) < target {
                assert!(Instant::now() < deadline, "no progress towards {target}");
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the child exited by itself"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
            eprintln!("kill {} at committed >= {target}", kill + 1);
            floor = target;
            child = spawn_child(&cc, &db_url, &instance);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while committed(&cc, &probe) < RECORDS {
            assert!(
                Instant::now() < deadline,
                "the restarted child did not finish"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let status = child.wait().unwrap();
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
    })
    .await
    .unwrap();

    // Count what a read_committed reader sees.
    let cc = c.clone();
    let dec = codec.decoder(Item::SCHEMA).unwrap();
    let raw = tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cc.kafka_brokers)
            .set("group.id", unique("verify"))
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        reader.subscribe(&[&cc.topic("out")]).unwrap();
        let mut out = Vec::new();
        let mut idle = Instant::now();
        while idle.elapsed() < Duration::from_secs(5) {
            if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
                out.push(m.payload().unwrap_or_default().to_vec());
                idle = Instant::now();
            }
        }
        out
    })
    .await
    .unwrap();
    let mut counts: HashMap<(String, i64), usize> = HashMap::new();
    for bytes in raw {
        let item: Item = dec.decode(&bytes).await.expect("output decodes");
        *counts.entry((item.meta.video_id, item.seq)).or_default() += 1;
    }
    (counts, pool)
}

async fn assert_status_terminal(pool: &sqlx::PgPool) {
    let not_done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM stage_runs WHERE status <> 'done'")
            .fetch_one(pool)
            .await
            .unwrap();
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM stage_runs")
        .fetch_one(pool)
        .await
        .unwrap();
    let videos_done: i64 = sqlx::query_scalar("SELECT count(*) FROM videos WHERE status = 'done'")
        .fetch_one(pool)
        .await
        .unwrap();
    let regressions: i64 = sqlx::query_scalar("SELECT count(*) FROM regressions")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, VIDEOS, "one stage run per video");
    assert_eq!(not_done, 0, "every stage run ends done");
    assert_eq!(videos_done, VIDEOS, "every video ends done");
    assert_eq!(regressions, 0, "no status row moved backwards");
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_once_survives_three_sigkills_without_loss_or_duplicates() {
    let (counts, pool) = crash_run(Guarantee::ExactlyOnce).await;
    assert_eq!(
        counts.len() as i64,
        RECORDS,
        "every input reached the output"
    );
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "duplicates under exactly-once: {:?}",
        &dups[..dups.len().min(5)]
    );
    assert_status_terminal(&pool).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_survives_three_sigkills_without_loss() {
    let (counts, pool) = crash_run(Guarantee::AtLeastOnce).await;
    assert_eq!(
        counts.len() as i64,
        RECORDS,
        "every input reached the output"
    );
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "at-least-once: {duplicates} duplicate outputs over {RECORDS} records after 3 SIGKILLs"
    );
    assert_status_terminal(&pool).await;
}
