//! Replay on real services: videos transcribed by the in-process pipeline
//! are replayed from transcribe (through the `vidpipe` binary, and through
//! the library), from the topic and, once its records are deleted, from the
//! database. The replayed video runs transcribe and summarize again as
//! generation 2, both generations stay readable, a downstream reader sees
//! the new generation, and nothing else is reprocessed. A dry run sends
//! nothing.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::Duration;

use rdkafka::admin::AdminOptions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use vidpipe::client;
use vidpipe::config::Config;
use vidpipe::records::{Record, VideoTranscribed};
use vidpipe::replay::{self, Selection, Source};
use vidpipe::template::codec::Codec;
use vidpipe::template::runner::header;

use crate::helpers::{kafka_admin, unique};
use crate::pipeline::{Pipeline, SCRIPTS, serve, spoken_video};

/// Runs the `vidpipe` binary against `c`'s topics, database and blobs.
pub async fn vidpipe(c: &Config, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_vidpipe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
        .env("VIDPIPE_DATABASE_URL", c.database_url.expose_secret())
        .env("VIDPIPE_STORAGE", &c.storage)
        .env("VIDPIPE_LOG", "warn")
        .args(args)
        .output()
        .await
        .expect("run the vidpipe binary")
}

/// The exit code, stdout and stderr of a run, for assertions.
fn outcome(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The sum of a topic's high watermarks: grows with every record written.
fn written(c: &Config, topic: &str) -> i64 {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .create()
        .unwrap();
    (0..c.topic_partitions)
        .map(|p| {
            probe
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

/// Every record of `topic` as a read_committed reader sees it: key,
/// payload and headers.
fn read_all(c: &Config, topic: &str) -> Vec<(String, Vec<u8>, HashMap<String, String>)> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka_brokers)
        .set("group.id", unique("replay_check"))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..c.topic_partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    reader.assign(&tpl).unwrap();
    let mut open = c.topic_partitions;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while open > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} did not end"
        );
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        [
                            "vidpipe.generation",
                            "vidpipe.replay.from-generation",
                            "vidpipe.replay.source",
                        ]
                        .iter()
                        .filter_map(|k| header(h, k).map(|v| (k.to_string(), v.to_string())))
                        .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    m.payload().unwrap_or_default().to_vec(),
                    headers,
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => open -= 1,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// (stage, generation, status) of every run of a video.
async fn runs(pool: &sqlx::PgPool, id: &str) -> BTreeSet<(String, i64, String)> {
    sqlx::query_as("SELECT stage, generation, status FROM stage_runs WHERE video_id = $1")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn run(stage: &str, generation: i64) -> (String, i64, String) {
    (stage.to_string(), generation, "done".to_string())
}

/// A first run's stage rows: discover (a submitted video's command runs
/// under its id) through summarize, all generation 1.
fn first_run() -> BTreeSet<(String, i64, String)> {
    [
        "discover",
        "download",
        "extract-audio",
        "transcribe",
        "summarize",
    ]
    .iter()
    .map(|s| run(s, 1))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transcribed_video_replayed_from_transcribe_runs_again_as_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    for (i, text) in SCRIPTS.iter().take(2).enumerate() {
        spoken_video(dir.path(), &format!("talk{i}.mp4"), text);
    }
    let site = serve(dir.path(), "127.0.0.1").await;
    let p = Pipeline::start("replay", |c| c.net_allow = "127.0.0.1/32".into()).await;
    let c = p.config.clone();
    let urls: Vec<String> = (0..2)
        .map(|i| site.url(&format!("media/talk{i}.mp4")))
        .collect();
    let submitted = client::submit(&c, &p.pool, &urls, false, None)
        .await
        .unwrap();
    let (a, b) = (submitted[0].id.clone(), submitted[1].id.clone());
    let first = p
        .wait(&[a.clone(), b.clone()], Duration::from_secs(600))
        .await;
    for id in [&a, &b] {
        assert_eq!(first[id].status, "done", "{:?}", first[id]);
        assert_eq!(runs(&p.pool, id).await, first_run(), "{id}");
    }
    let audio_topic = c.topic("video.audio-extracted");
    let before = written(&c, &audio_topic);

    // Usage and lookup failures, with their exit codes.
    for (args, code, says) in [
        (
            vec!["replay", "--stage", "transcribe"],
            2,
            "choose what to replay",
        ),
        (
            vec!["replay", "--stage", "transcode", "--video", &a],
            2,
            "unknown stage",
        ),
        (
            vec!["replay", "--stage", "transcribe", "--since", "last tuesday"],
            2,
            "cannot read the time",
        ),
        (
            vec!["replay", "--stage", "transcribe", "--video", "url:nope"],
            1,
            "unknown video",
        ),
    ] {
        let (status, _, stderr) = outcome(&vidpipe(&c, &args).await);
        assert_eq!(status, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }

    // Discovery can be replayed too: its dry run plans a new command.
    let (status, stdout, stderr) = outcome(
        &vidpipe(
            &c,
            &["replay", "--stage", "discover", "--video", &a, "--dry-run"],
        )
        .await,
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stdout.contains(a.as_str()),
        "the discover dry run lists {a}: {stdout}"
    );

    // A dry run lists the video, its generations and the source, and sends
    // nothing.
    let (status, stdout, stderr) = outcome(
        &vidpipe(
            &c,
            &[
                "replay",
                "--stage",
                "transcribe",
                "--video",
                &a,
                "--dry-run",
            ],
        )
        .await,
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        !stderr.contains("ERROR"),
        "a clean run logs no error: {stderr}"
    );
    let line: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with(a.as_str()))
        .unwrap_or_else(|| panic!("the dry run lists {a}: {stdout}"))
        .split_whitespace()
        .collect();
    assert_eq!(line, [a.as_str(), "1", "2", "topic"], "{stdout}");
    assert!(stdout.contains("nothing sent"), "{stdout}");
    // The discover dry run builds a command from the URL in the database.
    let (status, stdout, stderr) = outcome(
        &vidpipe(
            &c,
            &["replay", "--stage", "discover", "--video", &b, "--dry-run"],
        )
        .await,
    );
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [b.as_str(), "1", "2", "database"]),
        "{stdout}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        written(&c, &audio_topic),
        before,
        "a dry run wrote to the topic"
    );
    assert_eq!(
        written(&c, &c.topic("commands")),
        2,
        "a dry run wrote a command"
    );
    let still = client::status(&p.pool, &[a.clone(), b.clone()], 2)
        .await
        .unwrap();
    assert!(
        still
            .iter()
            .all(|v| v.generation == 1 && v.status == "done"),
        "{still:?}"
    );

    // The replay: the row moves to generation 2 before anything runs.
    let replay_started = chrono::Utc::now();
    let (status, stdout, stderr) =
        outcome(&vidpipe(&c, &["replay", "--stage", "transcribe", "--video", &a]).await);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        !stderr.contains("ERROR"),
        "a clean run logs no error: {stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [a.as_str(), "1", "2", "topic"]),
        "{stdout}"
    );
    let queued = &client::status(&p.pool, std::slice::from_ref(&a), 1)
        .await
        .unwrap()[0];
    assert_eq!(queued.generation, 2, "{queued:?}");
    let done = p
        .wait(std::slice::from_ref(&a), Duration::from_secs(300))
        .await;
    let v = &done[&a];
    assert_eq!((v.status.as_str(), v.generation), ("done", 2), "{v:?}");
    let names: Vec<&str> = v.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["transcribe", "summarize"],
        "generation 2 runs: {v:?}"
    );
    // Only transcribe and summarize ran again; the other video is untouched.
    let mut expected = first_run();
    expected.insert(run("transcribe", 2));
    expected.insert(run("summarize", 2));
    assert_eq!(runs(&p.pool, &a).await, expected);
    assert_eq!(runs(&p.pool, &b).await, first_run());
    let other = &client::status(&p.pool, std::slice::from_ref(&b), 1)
        .await
        .unwrap()[0];
    assert_eq!((other.generation, other.status.as_str()), (1, "done"));

    // Both generations' transcripts and summaries are readable, from
    // their own directories; without --generation, the latest.
    let mut shown = HashMap::new();
    for generation in ["1", "2"] {
        for what in ["--transcript", "--summary"] {
            let (status, stdout, stderr) =
                outcome(&vidpipe(&c, &["show", &a, what, "--generation", generation]).await);
            assert_eq!(status, Some(0), "show {what} g{generation}: {stderr}");
            assert!(stdout.len() > 20, "show {what} g{generation}: {stdout:?}");
            shown.insert((what, generation), stdout);
        }
        let record =
            client::stage_output(&p.pool, &a, "transcribe", Some(generation.parse().unwrap()))
                .await
                .unwrap()
                .expect("each generation's transcribe run keeps its output");
        let uri = record["transcript"]["uri"].as_str().unwrap();
        assert!(uri.contains(&format!("/g{generation}/")), "{uri}");
    }
    let (_, latest, _) = outcome(&vidpipe(&c, &["show", &a, "--transcript"]).await);
    assert_eq!(latest, shown[&("--transcript", "2")]);
    let words = |s: &str| s.to_lowercase().contains("river");
    assert!(words(&shown[&("--transcript", "1")]) && words(&shown[&("--transcript", "2")]));

    // A downstream reader of the transcripts sees a first run and a
    // replay, told apart by generation (field and header); the re-fed
    // record says it is a replay.
    let codec = Codec::new(c.schema_registry_url.as_deref()).unwrap();
    let decoder = codec.decoder(VideoTranscribed::SCHEMA).unwrap();
    let mut generations = Vec::new();
    for (key, payload, headers) in read_all(&c, &c.topic("video.transcribed")) {
        if key != a {
            continue;
        }
        let t: VideoTranscribed = decoder.decode(&payload).await.unwrap();
        assert_eq!(
            headers.get("vidpipe.generation"),
            Some(&t.meta.generation.to_string())
        );
        generations.push(t.meta.generation);
    }
    generations.sort();
    assert_eq!(generations, [1, 2]);
    let refed: Vec<_> = read_all(&c, &audio_topic)
        .into_iter()
        .filter(|(key, _, h)| key == &a && h.contains_key("vidpipe.replay.source"))
        .collect();
    assert_eq!(refed.len(), 1, "one re-fed record");
    assert_eq!(refed[0].2["vidpipe.replay.from-generation"], "1");
    assert_eq!(refed[0].2["vidpipe.replay.source"], "topic");
    assert_eq!(refed[0].2["vidpipe.generation"], "2");

    // A time range finds the input records by timestamp: since the replay
    // began, only the re-fed record of the first video is there.
    let ranged = replay::plan(
        &c,
        &p.pool,
        &Selection {
            stage: "transcribe".into(),
            since: Some(replay_started),
            ..Selection::default()
        },
    )
    .await
    .unwrap();
    let found: Vec<(&str, i64, i64, Source)> = ranged
        .items
        .iter()
        .map(|i| {
            (
                i.video_id.as_str(),
                i.from_generation,
                i.to_generation,
                i.source,
            )
        })
        .collect();
    assert_eq!(found, [(a.as_str(), 2, 3, Source::Topic)]);

    // A bound on the range (the API's) refuses a range holding more videos
    // before anything is sent; both videos fit a bound of two.
    let all_day = |max_videos| Selection {
        stage: "transcribe".into(),
        since: Some(replay_started - chrono::Duration::days(1)),
        max_videos,
        ..Selection::default()
    };
    let err = replay::plan(&c, &p.pool, &all_day(Some(1)))
        .await
        .expect_err("two videos are over a bound of one");
    assert!(matches!(err, replay::ReplayError::TooMany(1)), "{err:?}");
    let both = replay::plan(&c, &p.pool, &all_day(Some(2)))
        .await
        .expect("two videos fit a bound of two");
    assert_eq!(both.items.len(), 2);
    // A replay stopped before it starts touches no video.
    let stopped = CancellationToken::new();
    stopped.cancel();
    let sent = replay::send(&c, &p.pool, both, &stopped).await.unwrap();
    assert!(sent.replayed.is_empty(), "{sent:?}");
    assert_eq!(sent.left, 2);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM videos WHERE status = 'queued'")
        .fetch_one(&p.pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);

    // With the topic's records gone (retention), the input comes from the
    // status row extract-audio kept.
    let mut gone = TopicPartitionList::new();
    for partition in 0..c.topic_partitions {
        gone.add_partition_offset(&audio_topic, partition, Offset::End)
            .unwrap();
    }
    kafka_admin(&c)
        .delete_records(&gone, &AdminOptions::new())
        .await
        .expect("delete the audio records");
    let plan = replay::plan(
        &c,
        &p.pool,
        &Selection {
            stage: "transcribe".into(),
            videos: vec![b.clone()],
            ..Selection::default()
        },
    )
    .await
    .unwrap();
    let replayed = replay::send(&c, &p.pool, plan, &CancellationToken::new())
        .await
        .unwrap()
        .replayed;
    assert_eq!(
        replayed,
        [replay::Replayed {
            video_id: b.clone(),
            from_generation: 1,
            generation: 2,
            source: Source::Database,
        }]
    );
    let done = p
        .wait(std::slice::from_ref(&b), Duration::from_secs(300))
        .await;
    assert_eq!(
        (done[&b].status.as_str(), done[&b].generation),
        ("done", 2),
        "{:?}",
        done[&b]
    );
    let mut expected = first_run();
    expected.insert(run("transcribe", 2));
    expected.insert(run("summarize", 2));
    assert_eq!(runs(&p.pool, &b).await, expected);
    let (status, transcript, stderr) =
        outcome(&vidpipe(&c, &["show", &b, "--transcript", "--generation", "2"]).await);
    assert_eq!(status, Some(0), "{stderr}");
    assert!(transcript.to_lowercase().contains("lake"), "{transcript}");
    p.stop().await;
}
