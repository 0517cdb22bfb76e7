//! Secrets stay secret: `vidpipe run` (a child process, debug logging) with
//! a canary ASR API key and a database role whose password is a canary
//! processes a good and a failing video; neither canary appears in any log
//! line, lifecycle event, dead letter, status row or `vidpipe config`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use secrecy::ExposeSecret;
use vidpipe::client;

use crate::helpers::{config, fresh_database, unique};
use crate::pipeline::{SCRIPTS, serve, spoken_video};

#[tokio::test(flavor = "multi_thread")]
async fn canary_secrets_appear_in_no_log_event_or_dead_letter() {
    let key_canary = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let pw_canary = format!("pw-canary-{}", uuid::Uuid::new_v4().simple());
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("secrets"));
    let (admin, db) = fresh_database(&c).await;
    // A role of its own whose password is the canary.
    let role = unique("canary");
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{pw_canary}';
         GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
         GRANT ALL ON SCHEMA public TO {role};"
    ))
    .execute(&admin)
    .await
    .expect("create the canary role");
    let mut url = url::Url::parse(c.database_url.expose_secret()).unwrap();
    url.set_path(&db);
    url.set_username(&role).unwrap();
    url.set_password(Some(&pw_canary)).unwrap();
    c.database_url = url.to_string().into();
    let blobs = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    spoken_video(dir.path(), "good.mp4", SCRIPTS[2]);
    let site = serve(dir.path(), "127.0.0.1").await;

    let env = |cmd: &mut Command| {
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
            .env("VIDPIPE_DATABASE_URL", c.database_url.expose_secret())
            .env("VIDPIPE_ASR_API_KEY", &key_canary)
            .env("VIDPIPE_STORAGE", blobs.path())
            .env("VIDPIPE_NET_ALLOW", "127.0.0.1/32")
            .env("VIDPIPE_TOPIC_PARTITIONS", "1")
            .env("VIDPIPE_RUNNER__MAX_ATTEMPTS", "2")
            .env("VIDPIPE_RUNNER__BACKOFF_INITIAL_MS", "100")
            .env("VIDPIPE_RUNNER__BACKOFF_MAX_MS", "500")
            .env("VIDPIPE_LOG", "debug");
    };
    let exe = env!("CARGO_BIN_EXE_vidpipe");
    let mut config_cmd = Command::new(exe);
    config_cmd.arg("config");
    env(&mut config_cmd);
    let printed = config_cmd.output().expect("vidpipe config");
    let log_path = dir.path().join("run.log");
    let mut run = Command::new(exe);
    run.args(["run", "--instance", "secrets"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("run.out")).unwrap())
        .stderr(std::fs::File::create(&log_path).unwrap());
    env(&mut run);
    let mut child = crate::procs::Proc(run.spawn().expect("vidpipe run"));

    let urls = vec![site.url("media/good.mp4"), site.url("media/missing.mp4")];
    let deadline = Instant::now() + Duration::from_secs(60);
    let submitted = loop {
        // The child creates the topics; submitting may race it at first.
        match client::submit(&c, &admin, &urls, false, None).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("submit not yet possible: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("submit: {e}"),
        }
    };
    let ids: Vec<String> = submitted.iter().map(|s| s.id.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    let finished = loop {
        let all = client::status(&admin, &ids, 2).await.unwrap();
        if all.len() == 2
            && all
                .iter()
                .all(|v| v.status == "done" || v.status == "failed")
        {
            break all;
        }
        assert!(child.try_wait().unwrap().is_none(), "vidpipe run exited");
        assert!(Instant::now() < deadline, "videos did not finish: {all:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let statuses: Vec<&str> = finished.iter().map(|v| v.status.as_str()).collect();
    assert!(
        statuses.contains(&"done") && statuses.contains(&"failed"),
        "{finished:#?}"
    );
    crate::procs::signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "vidpipe run exits 0 on SIGTERM, got {status}"
    );

    let mut haystacks: Vec<(String, String)> = vec![
        (
            "vidpipe config".into(),
            String::from_utf8_lossy(&printed.stdout).into_owned(),
        ),
        (
            "run log".into(),
            std::fs::read_to_string(&log_path).unwrap(),
        ),
        (
            "run stdout".into(),
            std::fs::read_to_string(dir.path().join("run.out")).unwrap(),
        ),
    ];
    assert!(
        haystacks[1].1.lines().count() > 20,
        "debug logging produced a log to check"
    );
    let rows: Vec<String> = sqlx::query_scalar("SELECT row_to_json(r)::text FROM stage_runs r")
        .fetch_all(&admin)
        .await
        .unwrap();
    haystacks.push(("status rows".into(), rows.join("\n")));
    for topic in ["events", "dlq", "commands"] {
        let cc = c.clone();
        let raw = tokio::task::spawn_blocking(move || {
            let reader: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &cc.kafka_brokers)
                .set("group.id", unique("canary"))
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            reader.subscribe(&[&cc.topic(topic)]).unwrap();
            let mut out = Vec::new();
            let mut idle = Instant::now();
            while idle.elapsed() < Duration::from_secs(3) {
                if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
                    let mut text =
                        String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                    if let Some(h) = m.headers() {
                        use rdkafka::message::Headers;
                        for h in h.iter() {
                            text.push_str(&String::from_utf8_lossy(h.value.unwrap_or_default()));
                        }
                    }
                    out.push(text);
                    idle = Instant::now();
                }
            }
            out
        })
        .await
        .unwrap();
        assert!(
            !raw.is_empty() || topic == "dlq",
            "{topic} has records to check"
        );
        haystacks.push((topic.into(), raw.join("\n")));
    }
    for (what, text) in &haystacks {
        assert!(!text.contains(&key_canary), "the API key appears in {what}");
        assert!(
            !text.contains(&pw_canary),
            "the database password appears in {what}"
        );
    }
}
