//! Scaling a stage by partitions, as an operator does it: `vidpipe topics
//! scale transcribe --partitions 4` grows the transcribe stage's input
//! topic (and refuses to shrink it), then two `vidpipe run transcribe`
//! processes share the stage while a third process runs the other stages.
//! Both transcribe processes get work, and every video is transcribed once.

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use vidpipe::admin;
use vidpipe::client;
use vidpipe::config::Config;
use vidpipe::records::{EventKind, LifecycleEvent, Record};
use vidpipe::template::codec::Codec;
use vidpipe::template::topics;

use crate::helpers::{config, fresh_database_url, unique};
use crate::pipeline::{SCRIPTS, serve, spoken_video};
use crate::procs::Proc;
use crate::replay::vidpipe;

const PARTITIONS: usize = 4;

/// CRC-32 (IEEE), which librdkafka's default partitioner
/// (`consistent_random`) hashes keys with: the partition of a video id is
/// `crc32(id) % partitions`.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A `vidpipe run` child process with `c`'s topics, database and blobs;
/// its log goes to `log`.
fn spawn(c: &Config, args: &[&str], log: &std::path::Path) -> Proc {
    let file = std::fs::File::create(log).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vidpipe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
        .env("VIDPIPE_DATABASE_URL", c.database_url.expose_secret())
        .env("VIDPIPE_STORAGE", &c.storage)
        .env("VIDPIPE_NET_ALLOW", &c.net_allow)
        .env("VIDPIPE_TOPIC_PARTITIONS", "1")
        .env("VIDPIPE_RUNNER__COMMIT_INTERVAL_MS", "200")
        .env("VIDPIPE_RUNNER__SESSION_TIMEOUT_MS", "6000")
        .env("VIDPIPE_LOG", "info")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn vidpipe run");
    Proc(child)
}

/// The last lines of each child's log, for failure messages.
fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for name in ["rest", "a", "b"] {
        let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- {name}.log (tail)\n"));
        for l in &lines[lines.len().saturating_sub(15)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Every transcribe `succeeded` event (read_committed): per video, the
/// input partitions it succeeded on.
async fn transcribed(c: &Config) -> HashMap<String, Vec<i32>> {
    let cc = c.clone();
    let raw = tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cc.kafka_brokers)
            .set("group.id", unique("scale_events"))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let topic = cc.topic("events");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .unwrap();
        reader.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "reading the events did not end");
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(m.payload().unwrap_or_default().to_vec()),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => panic!("reading events: {e}"),
                None => {}
            }
        }
        out
    })
    .await
    .unwrap();
    let decoder = Codec::new(c.schema_registry_url.as_deref())
        .unwrap()
        .decoder(LifecycleEvent::SCHEMA)
        .unwrap();
    let mut by_video: HashMap<String, Vec<i32>> = HashMap::new();
    for bytes in raw {
        let e: LifecycleEvent = decoder.decode(&bytes).await.unwrap();
        if e.stage == "transcribe" && e.kind == EventKind::Succeeded {
            by_video
                .entry(e.meta.video_id)
                .or_default()
                .push(e.input_partition);
        }
    }
    by_video
}

#[tokio::test(flavor = "multi_thread")]
async fn two_transcribe_processes_share_a_scaled_stage_and_every_video_finishes_once() {
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("scale"));
    c.net_allow = "127.0.0.1/32".into();
    let (pool, url) = fresh_database_url(&c).await;
    c.database_url = url;
    let blobs = tempfile::tempdir().unwrap();
    c.storage = blobs.path().display().to_string();
    // Every topic starts with one partition, as a small deployment would.
    topics::ensure(
        &c.kafka_brokers,
        &vidpipe::stages::all_topics(&c),
        1,
        c.topic_replication,
    )
    .await
    .expect("topics");

    // Scale transcribe to 4; shrinking is refused; the same count is a no-op.
    let four = PARTITIONS.to_string();
    let out = vidpipe(
        &c,
        &["topics", "scale", "transcribe", "--partitions", &four],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 -> 4 partitions"), "{stdout}");
    let out = vidpipe(&c, &["topics", "scale", "transcribe", "--partitions", "2"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("has 4 partitions") && stderr.contains("cannot remove partitions"),
        "{stderr}"
    );
    let out = vidpipe(
        &c,
        &["topics", "scale", "transcribe", "--partitions", &four],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already has 4"));
    let out = vidpipe(&c, &["topics", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("topics --json");
    let partitions: HashMap<String, u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["partitions"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(partitions["transcribe"], PARTITIONS as u64, "{listed}");
    assert_eq!(partitions["download"], 1, "{listed}");

    // The other stages in one process, transcribe in two.
    let logdir = tempfile::tempdir().unwrap();
    let mut rest = spawn(
        &c,
        &[
            "run",
            "discover",
            "download",
            "extract-audio",
            "summarize",
            "--instance",
            "rest",
        ],
        &logdir.path().join("rest.log"),
    );
    let mut a = spawn(
        &c,
        &["run", "transcribe", "--instance", "a"],
        &logdir.path().join("a.log"),
    );
    let mut b = spawn(
        &c,
        &["run", "transcribe", "--instance", "b"],
        &logdir.path().join("b.log"),
    );

    // Wait until the group is settled: two members, two partitions each,
    // and the partitions' leases held by a and b.
    let deadline = Instant::now() + Duration::from_secs(90);
    let group = loop {
        let stages = admin::describe(&c).await.expect("topics");
        let t = stages
            .into_iter()
            .find(|s| s.stage == "transcribe")
            .unwrap();
        let shares: Vec<usize> = t.members.iter().map(|m| m.partitions.len()).collect();
        let owners: BTreeSet<String> = sqlx::query_scalar(
            "SELECT owner FROM partition_leases WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&t.group)
        .bind(&t.topic)
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        if t.group_state == "Stable"
            && shares == [2, 2]
            && owners == BTreeSet::from(["a".to_string(), "b".to_string()])
        {
            let clients: BTreeSet<&str> = t.members.iter().map(|m| m.client_id.as_str()).collect();
            assert_eq!(
                clients,
                BTreeSet::from(["vidpipe-transcribe-a", "vidpipe-transcribe-b"])
            );
            break t;
        }
        for child in [&mut rest, &mut a, &mut b] {
            assert!(
                child.try_wait().unwrap().is_none(),
                "a process exited:\n{}",
                logs(logdir.path())
            );
        }
        assert!(
            Instant::now() < deadline,
            "the transcribe group did not settle: {t:?} leases {owners:?}\n{}",
            logs(logdir.path())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // One video per partition of the transcribe topic, so that each
    // process's share has work whichever partitions it holds.
    let media = tempfile::tempdir().unwrap();
    spoken_video(media.path(), "talk.mp4", SCRIPTS[2]);
    let site = serve(media.path(), "127.0.0.1").await;
    let mut urls: Vec<Option<String>> = vec![None; PARTITIONS];
    for n in 0.. {
        let url = site.url(&format!("media/talk.mp4?take={n}"));
        let id = vidpipe::ids::video_id(&vidpipe::ids::normalise(&url).unwrap());
        let slot = (crc32(id.as_bytes()) % PARTITIONS as u32) as usize;
        urls[slot].get_or_insert(url);
        if urls.iter().all(Option::is_some) {
            break;
        }
    }
    let urls: Vec<String> = urls.into_iter().flatten().collect();
    let ids: Vec<String> = client::submit(&c, &pool, &urls, false, None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let all = client::status(&pool, &ids, ids.len() as i64).await.unwrap();
        if all.len() == ids.len() && all.iter().all(|v| v.status == "done") {
            break;
        }
        assert!(
            !all.iter().any(|v| v.status == "failed"),
            "{all:#?}\n{}",
            logs(logdir.path())
        );
        for child in [&mut rest, &mut a, &mut b] {
            assert!(
                child.try_wait().unwrap().is_none(),
                "a process exited:\n{}",
                logs(logdir.path())
            );
        }
        assert!(
            Instant::now() < deadline,
            "videos did not finish: {all:#?}\n{}",
            logs(logdir.path())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every video was transcribed once: one run, done, and one committed
    // success, on the partition its id maps to.
    let runs: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT video_id, status, generation, epoch FROM stage_runs WHERE stage = 'transcribe'
         ORDER BY video_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        runs.len(),
        ids.len(),
        "one transcribe run per video: {runs:?}"
    );
    assert!(runs.iter().all(|r| r.1 == "done" && r.2 == 1), "{runs:?}");
    let events = transcribed(&c).await;
    assert_eq!(events.len(), ids.len(), "{events:?}");
    let mut worked: BTreeSet<String> = BTreeSet::new();
    for (id, _, _, epoch) in &runs {
        let partitions = &events[id];
        assert_eq!(partitions.len(), 1, "{id} succeeded once: {events:?}");
        // The run was recorded under the partition's current lease, so
        // the lease's owner is the process that did it.
        let (owner, lease_epoch): (String, i64) = sqlx::query_as(
            "SELECT owner, epoch FROM partition_leases
             WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&group.group)
        .bind(&group.topic)
        .bind(partitions[0])
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            *epoch, lease_epoch,
            "{id}: recorded under the current lease"
        );
        worked.insert(owner);
    }
    let used: BTreeSet<i32> = events.values().flatten().copied().collect();
    assert_eq!(
        used.len(),
        PARTITIONS,
        "the videos spread over every partition: {events:?}"
    );
    assert_eq!(
        worked,
        BTreeSet::from(["a".to_string(), "b".to_string()]),
        "both transcribe processes received work"
    );
    // The group still has both members, and once they commit, no lag:
    // the transaction markers behind the last records do not count.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let after = admin::describe(&c).await.unwrap();
        let t = after.iter().find(|s| s.stage == "transcribe").unwrap();
        assert_eq!(t.members.len(), 2, "{t:?}");
        assert_eq!(t.partitions, Some(PARTITIONS));
        if t.lag == 0 {
            assert!(
                t.partition_lag
                    .iter()
                    .all(|l| l.committed.is_some_and(|c| c <= l.high)),
                "{t:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "lag stays: {t:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop((rest, a, b));
}
