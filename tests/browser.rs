//! The status page in a real browser, and a third-party analytics consumer
//! of the events topic, on one run of the whole pipeline.
//!
//! `vidpipe run` (all five stages) and `vidpipe serve` run as child
//! processes with their own topics, database and blob store. Headless
//! Chromium (Debian's, driven by playwright-core from
//! `tests/browser/status_page.mjs`) opens the status page before the video
//! is submitted, sees its row appear and turn `done` without a reload, and
//! the counters and the stages table catch up on the same load (done
//! counter 0 then 1, summarize's done count 0 then 1, Kafka's columns
//! filled), then follows the row to the video's timeline (five stages
//! done) and on to the summary. Screenshots go to `<target>/test-output/browser/`. Then
//! `examples/analytics/stage_latency.py` (confluent-kafka with the schema
//! registry's Avro deserializer) reads the run's events topic and must
//! report every stage with sane latency percentiles and no failures.
//!
//! Chromium, Node.js, playwright-core and the analytics venv are installed
//! by `scripts/stack up`; a missing one fails the test and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use vidpipe::client;
use vidpipe::config::Config;

use crate::helpers::{config, free_port, fresh_database_url, unique};
use crate::pipeline::{SCRIPTS, serve, spoken_video};
use crate::procs::Proc;
use crate::replay::vidpipe;

const STAGES: [&str; 5] = [
    "discover",
    "download",
    "extract-audio",
    "transcribe",
    "summarize",
];
const CHROMIUM: &str = "/usr/bin/chromium";
/// How long the video may take through the pipeline (2 shared cores).
const PIPELINE_LIMIT: Duration = Duration::from_secs(600);

/// Where `scripts/stack` keeps what it installs.
fn cache_dir() -> PathBuf {
    match std::env::var_os("VIDPIPE_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/vidpipe"),
    }
}

/// `<target>/test-output/browser`, emptied: `$CARGO_TARGET_DIR`, else the
/// target directory this test binary was built in.
fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // <target>/debug/deps/tests-<hash>
            let exe = std::env::current_exe().expect("current exe");
            exe.ancestors().nth(3).expect("target dir").to_path_buf()
        });
    let dir = target.join("test-output").join("browser");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

/// Fails with what to run when a tool the test needs is not installed.
fn require_tools() -> (PathBuf, PathBuf) {
    const INSTALL: &str = "scripts/stack up installs it (or run the whole suite with scripts/test)";
    assert!(
        Path::new(CHROMIUM).is_file(),
        "Chromium is not installed at {CHROMIUM}: {INSTALL} (Debian package chromium)"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "Node.js is not installed (`node --version`: {node:?}): {INSTALL}"
    );
    let node_dir = cache_dir().join("node/browser");
    assert!(
        node_dir
            .join("node_modules/playwright-core/package.json")
            .is_file(),
        "playwright-core is not installed in {}: {INSTALL}",
        node_dir.display()
    );
    let python = cache_dir().join("venv/analytics/bin/python");
    assert!(
        python.is_file(),
        "the analytics venv (confluent-kafka) is not installed at {}: {INSTALL}",
        python.display()
    );
    (node_dir, python)
}

/// The last lines of a log file, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- {} (last lines)\n{}\n",
        path.display(),
        lines[lines.len().saturating_sub(25)..].join("\n")
    )
}

/// A vidpipe child process with `c`'s topics, database and blobs; its
/// stderr (the log) goes to `log`.
fn spawn_vidpipe(c: &Config, args: &[&str], log: &Path) -> Proc {
    let file = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_vidpipe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
        .env("VIDPIPE_TOPIC_PARTITIONS", c.topic_partitions.to_string())
        .env("VIDPIPE_DATABASE_URL", c.database_url.expose_secret())
        .env("VIDPIPE_STORAGE", &c.storage)
        .env("VIDPIPE_NET_ALLOW", &c.net_allow)
        .env("VIDPIPE_RUNNER__COMMIT_INTERVAL_MS", "200")
        .env("VIDPIPE_LOG", "info")
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .expect("spawn the vidpipe binary");
    Proc(child)
}

/// A loopback port that was free a moment ago.
/// Waits until the status page answers 200.
async fn wait_for_page(base: &str, serve: &mut Proc, log: &Path) {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{base}/")).send().await
            && r.status().is_success()
        {
            return;
        }
        if let Some(status) = serve.try_wait().unwrap() {
            panic!("`vidpipe serve` exited ({status})\n{}", tail(log));
        }
        assert!(
            Instant::now() < deadline,
            "`vidpipe serve` did not answer at {base}/ within 60 s\n{}",
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What `status_page.mjs` reported.
struct Browsed {
    ready: bool,
    statuses: Vec<String>,
    result: Option<Value>,
    stderr: String,
    exit: Option<std::process::ExitStatus>,
}

/// Runs the browser driver; `submit` runs once the page is open (after
/// `ready`). The run and serve children must stay up meanwhile.
async fn browse(
    node_dir: &Path,
    base: &str,
    video_id: &str,
    out: &Path,
    children: &mut [(&str, &mut Proc, &Path)],
    submit: impl AsyncFnOnce(),
) -> Browsed {
    let mut driver = tokio::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/status_page.mjs"))
        .env("VIDPIPE_BASE_URL", base)
        .env("VIDPIPE_VIDEO_ID", video_id)
        .env("VIDPIPE_OUT_DIR", out)
        .env("VIDPIPE_NODE_DIR", node_dir)
        .env("VIDPIPE_CHROMIUM", CHROMIUM)
        .env(
            "VIDPIPE_BROWSER_TIMEOUT_MS",
            PIPELINE_LIMIT.as_millis().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let stderr = driver.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // Bounded: the driver's own messages, not a flood.
            if text.len() < 64 * 1024 {
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    });
    let mut lines = BufReader::new(driver.stdout.take().unwrap()).lines();
    let mut browsed = Browsed {
        ready: false,
        statuses: Vec::new(),
        result: None,
        stderr: String::new(),
        exit: None,
    };
    let mut submit = Some(submit);
    // The page opens in seconds; the pipeline then takes its time; the
    // driver enforces the pipeline's limit itself, this is the backstop.
    let deadline = Instant::now() + PIPELINE_LIMIT + Duration::from_secs(120);
    loop {
        match tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                println!("browser: {}", line.chars().take(300).collect::<String>());
                if line == "ready" {
                    browsed.ready = true;
                    if let Some(submit) = submit.take() {
                        submit().await;
                    }
                } else if let Some(s) = line.strip_prefix("status ") {
                    browsed.statuses.push(s.to_string());
                } else if let Some(json) = line.strip_prefix("result ") {
                    browsed.result = Some(serde_json::from_str(json).expect("the result is JSON"));
                }
            }
            Ok(_) => break,
            Err(_) => {}
        }
        for (name, child, log) in children.iter_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("`vidpipe {name}` exited ({status})\n{}", tail(log));
            }
        }
        assert!(
            Instant::now() < deadline,
            "the browser driver did not finish; statuses seen {:?}",
            browsed.statuses
        );
    }
    browsed.exit = Some(driver.wait().await.expect("node exits"));
    browsed.stderr = stderr.await.unwrap();
    browsed
}

/// Runs the analytics example with `args`: its exit status, stdout and
/// stderr.
fn analytics(
    python: &Path,
    c: &Config,
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/analytics/stage_latency.py"))
        .args(args)
        .env("VIDPIPE_KAFKA_BROKERS", &c.kafka_brokers)
        .env(
            "VIDPIPE_SCHEMA_REGISTRY_URL",
            c.schema_registry_url.as_deref().unwrap_or_default(),
        )
        .env_remove("VIDPIPE_TOPIC_PREFIX")
        .stdin(Stdio::null())
        .output()
        .expect("run the analytics example");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_follows_a_video_live_and_analytics_reads_its_events() {
    let (node_dir, python) = require_tools();
    let started = Instant::now();
    let out = output_dir();
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("browser"));
    c.topic_partitions = 2;
    c.net_allow = "127.0.0.1/32".into();
    let (pool, url) = fresh_database_url(&c).await;
    c.database_url = url;
    let blobs = tempfile::tempdir().unwrap();
    c.storage = blobs.path().display().to_string();

    let media = tempfile::tempdir().unwrap();
    spoken_video(media.path(), "talk.mp4", SCRIPTS[0]);
    let site = serve(media.path(), "127.0.0.1").await;
    let video_url = site.url("media/talk.mp4");
    let id = vidpipe::ids::video_id(&vidpipe::ids::normalise(&video_url).unwrap());

    let (run_log, serve_log) = (out.join("run.log"), out.join("serve.log"));
    let mut run = spawn_vidpipe(&c, &["run", "--instance", "browser"], &run_log);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut serve = spawn_vidpipe(&c, &["serve", "--listen", &addr], &serve_log);
    let base = format!("http://{addr}");
    wait_for_page(&base, &mut serve, &serve_log).await;

    let browsed = browse(
        &node_dir,
        &base,
        &id,
        &out,
        &mut [
            ("run", &mut run, &run_log),
            ("serve", &mut serve, &serve_log),
        ],
        async || {
            let submitted = vidpipe(&c, &["submit", &video_url]).await;
            let stdout = String::from_utf8_lossy(&submitted.stdout);
            assert!(
                submitted.status.success() && stdout.contains(&id),
                "vidpipe submit: {stdout} {}",
                String::from_utf8_lossy(&submitted.stderr)
            );
        },
    )
    .await;
    let logs = format!("{}{}", tail(&run_log), tail(&serve_log));
    assert!(
        browsed.ready,
        "the status page never opened: {}\n{logs}",
        browsed.stderr
    );
    assert!(
        browsed.exit.is_some_and(|s| s.success()),
        "the browser check failed ({:?}): {}\nstatuses seen: {:?}\n{logs}",
        browsed.exit,
        browsed.stderr,
        browsed.statuses
    );
    let result = browsed.result.expect("the driver reports a result");

    // The row came in live and ended done, on the one page load.
    assert_eq!(
        browsed.statuses.last().map(String::as_str),
        Some("done"),
        "{result}"
    );
    assert!(!browsed.statuses.iter().any(|s| s == "failed"), "{result}");
    assert_eq!(result["status_page_loads"], 1, "{result}");
    assert_eq!(result["no_reload"], true, "{result}");
    // The counters and the stages table rose on that same load.
    let (before, after) = (&result["counters_before"], &result["counters_after"]);
    assert_eq!(before["done"], "0", "{result}");
    assert_eq!(before["summarize_done"], "0", "{result}");
    assert_eq!(after["done"], "1", "{result}");
    assert_eq!(after["summarize_done"], "1", "{result}");
    assert_eq!(
        after["summarize_partitions"],
        c.topic_partitions.to_string(),
        "{result}"
    );
    assert!(
        after["summarize_members"]
            .as_str()
            .is_some_and(|m| m.parse::<u32>().is_ok()),
        "{result}"
    );
    assert_eq!(after["kafka_error_hidden"], true, "{result}");
    assert!(
        result["page_errors"].as_array().unwrap().is_empty(),
        "the pages threw: {result}"
    );
    // The link carried the percent-encoded id (the driver checked it), and
    // the timeline shows all five stages done.
    assert!(
        result["video_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{base}/videos/")),
        "{result}"
    );
    for stage in STAGES {
        assert!(
            result["timeline"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["stage"] == stage && t["status"] == "done"),
            "{stage} is not shown done: {result}"
        );
    }
    let summary = result["summary"].as_str().unwrap();
    assert!(
        summary.split_whitespace().count() >= 3,
        "summary: {summary:?}"
    );
    assert_eq!(result["transcript_status"], 200, "{result}");
    for shot in result["screenshots"].as_array().unwrap() {
        let path = Path::new(shot.as_str().unwrap());
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        assert!(bytes > 1000, "{} is missing or empty", path.display());
        println!("screenshot: {}", path.display());
    }
    // What the page showed is what the database says.
    let status = client::status(&pool, std::slice::from_ref(&id), 1)
        .await
        .unwrap();
    assert_eq!(status[0].status, "done", "{status:?}");

    // Analytics: every stage's latencies, once the last stage's events are
    // committed (the status row is written before the Kafka transaction
    // that carries the event commits).
    let deadline = Instant::now() + Duration::from_secs(60);
    let report: Value = loop {
        let (exit, stdout, stderr) =
            analytics(&python, &c, &["--prefix", &c.topic_prefix, "--json"]);
        assert!(exit.success(), "stage_latency.py --json: {stderr}");
        let report: Value = serde_json::from_str(&stdout).expect("the report is JSON");
        let counted = |stage: &str| {
            report["stages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["stage"] == stage && s["count"].as_u64().unwrap_or(0) >= 1)
        };
        if STAGES.iter().all(|s| counted(s)) || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(report["topic"], c.topic("events"), "{report}");
    assert_eq!(report["undecodable"], 0, "{report}");
    let rows = report["stages"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert_eq!(
        names, STAGES,
        "every stage, in pipeline order, and no other: {report}"
    );
    let elapsed = started.elapsed().as_millis() as u64;
    for row in rows {
        // One video, exactly-once: one committed success per stage.
        assert_eq!(row["count"], 1, "{row}");
        let ms = |k: &str| {
            row[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{k} is not a number: {row}"))
        };
        let (p50, p90, p99, max) = (ms("p50_ms"), ms("p90_ms"), ms("p99_ms"), ms("max_ms"));
        assert!(
            p50 <= p90 && p90 <= p99 && p99 <= max,
            "percentiles out of order: {row}"
        );
        // A stage run cannot outlast the test that caused it, and
        // transcription (a call to the ASR server) takes some time.
        assert!(max <= elapsed, "{row} (the test ran {elapsed} ms)");
        if row["stage"] == "transcribe" {
            assert!(p50 > 0, "{row}");
        }
        assert_eq!(
            (row["failed"].as_u64(), row["retried"].as_u64()),
            (Some(0), Some(0)),
            "{row}"
        );
    }
    // The table for people, by topic name.
    let (exit, table, stderr) = analytics(&python, &c, &["--topic", &c.topic("events")]);
    assert!(exit.success(), "{stderr}");
    println!("{table}");
    for stage in STAGES {
        assert!(
            table.lines().filter(|l| l.starts_with(stage)).count() == 2,
            "{stage} has a latency row and a failures row:\n{table}"
        );
    }
    assert!(table.contains("p50") && table.contains("p99"), "{table}");
    // A topic that does not exist is a clear error, exit 2.
    let missing = format!("{}nope", c.topic_prefix);
    let (exit, _, stderr) = analytics(&python, &c, &["--topic", &missing]);
    assert_eq!(exit.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read topic '{missing}'")),
        "{stderr}"
    );
    println!("screenshots and logs: {}", out.display());
    drop((run, serve));
}
