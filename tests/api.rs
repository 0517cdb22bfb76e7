//! `vidpipe serve` on real services, run as people run it: the binary as a
//! child process on a free port, with the topics, database and blob store
//! of a pipeline that processes a spoken video end to end.
//!
//! Every route answers for that video (JSON, result files, pages, errors,
//! readiness, metrics), a replay through the API shows up as a second
//! generation, hostile text stays escaped on the pages, schemathesis finds
//! nothing wrong with the API against its own OpenAPI document, and
//! `/readyz` names PostgreSQL when the server's database does not answer.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use vidpipe::config::Config;

use crate::helpers::config;
use crate::pipeline::{Pipeline, SCRIPTS, serve, spoken_video};
use crate::replay::vidpipe;

/// A `vidpipe serve` child process, killed when dropped.
struct Server {
    _child: tokio::process::Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `vidpipe serve --listen 127.0.0.1:0` with `c`'s topics and
    /// blobs and the given database; waits for the address it prints.
    async fn start(c: &Config, database_url: &str) -> Self {
        Self::start_with(c, database_url, &[]).await
    }

    /// [`start`](Self::start) with more environment variables.
    async fn start_with(c: &Config, database_url: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serve.log");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vidpipe"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
            .env("VIDPIPE_DATABASE_URL", database_url)
            .env("VIDPIPE_STORAGE", &c.storage)
            .env("VIDPIPE_LOG", "info")
            .envs(env.iter().copied())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn vidpipe serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("vidpipe serve printed no address within 60 s"))
            .unwrap();
        let Some(base) = first
            .as_deref()
            .and_then(|l| l.strip_prefix("vidpipe serve: listening on "))
            .map(str::to_string)
        else {
            panic!(
                "vidpipe serve did not start: {first:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        // Keep reading, so that a later line never meets a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            _child: child,
            base,
            log,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The end of the server's log, for failure messages.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Status, content type and body of a response.
struct Answer {
    status: StatusCode,
    content_type: String,
    csp: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `error` of a JSON error body.
    fn error(&self) -> String {
        assert!(
            self.content_type.starts_with("application/json"),
            "an error must be JSON: {} {}",
            self.content_type,
            self.body
        );
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", self.body))
            .to_string()
    }
}

async fn answer(r: reqwest::RequestBuilder) -> Answer {
    let r = r.send().await.expect("the server answers");
    let header = |name| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(CONTENT_TYPE).unwrap_or_default();
    let csp = header(reqwest::header::CONTENT_SECURITY_POLICY);
    Answer {
        status: r.status(),
        content_type,
        csp,
        body: r.text().await.unwrap(),
    }
}

struct Client {
    http: reqwest::Client,
    server: Server,
}

impl Client {
    async fn get(&self, path: &str) -> Answer {
        answer(self.http.get(self.server.url(path))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        answer(self.http.post(self.server.url(path)).json(body)).await
    }

    async fn post_raw(&self, path: &str, body: &str) -> Answer {
        answer(
            self.http
                .post(self.server.url(path))
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string()),
        )
        .await
    }

    async fn delete(&self, path: &str) -> Answer {
        answer(self.http.delete(self.server.url(path))).await
    }

    /// Asserts the status, with the body and the server's log otherwise.
    #[track_caller]
    fn expect(&self, a: &Answer, status: StatusCode, what: &str) {
        assert_eq!(
            a.status,
            status,
            "{what}: {}\n--- vidpipe serve log:\n{}",
            a.body,
            self.server.log()
        );
    }

    /// Polls the video until `done` holds (or fails the test).
    async fn wait_video(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let a = self.get(&format!("/api/v1/videos/{}", enc(id))).await;
            if a.status == StatusCode::OK && done(&a.json()) {
                return a.json();
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not get there within {limit:?}: {}",
                a.body
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A video id as a path segment (`encodeURIComponent`).
fn enc(id: &str) -> String {
    vidpipe::api::page::encode_id(id)
}

/// The schemathesis of `scripts/stack up` (its own venv in the cache).
fn schemathesis() -> PathBuf {
    let cache = std::env::var_os("VIDPIPE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/vidpipe")
        });
    let bin = cache.join("venv/schemathesis/bin/schemathesis");
    assert!(
        bin.is_file(),
        "schemathesis is not installed at {}: scripts/stack up installs it \
         (scripts/stack.d/schemathesis-requirements.txt)",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_answers_for_a_processed_video_and_schemathesis_finds_nothing() {
    let media = tempfile::tempdir().unwrap();
    spoken_video(media.path(), "talk.mp4", SCRIPTS[0]);
    let site = serve(media.path(), "127.0.0.1").await;
    let mut p = Pipeline::start("api", |c| c.net_allow = "127.0.0.1/32".into()).await;
    let c = p.config.clone();
    let server = Server::start(&c, c.database_url.expose_secret()).await;
    let api = Client {
        http: reqwest::Client::new(),
        server,
    };

    // Liveness and readiness.
    let a = api.get("/healthz").await;
    api.expect(&a, StatusCode::OK, "healthz");
    let a = api.get("/readyz").await;
    api.expect(&a, StatusCode::OK, "readyz");
    assert_eq!(a.json()["status"], "ready", "{}", a.body);
    let services: BTreeSet<String> = a.json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        services,
        ["kafka", "postgresql", "schema-registry"]
            .map(String::from)
            .into()
    );

    // Bad submissions are 400s that name the problem; nothing is sent.
    for (body, says) in [
        (json!({"urls": []}), "at least one URL"),
        (
            json!({"urls": ["ftp://example.com/a.mp4"]}),
            "only http and https",
        ),
        (json!({"urls": ["not a url"]}), "bad URL"),
        (
            json!({"urls": ["https://example.com/a.mp4"], "feed": "yes"}),
            "feed",
        ),
        (
            json!({"urls": ["https://example.com/a.mp4"], "colour": 1}),
            "colour",
        ),
        (json!({"feed": true}), "urls"),
    ] {
        let a = api.post("/api/v1/videos", &body).await;
        api.expect(&a, StatusCode::BAD_REQUEST, &body.to_string());
        assert!(a.error().contains(says), "{body}: {}", a.body);
    }
    let a = api.post_raw("/api/v1/videos", "{\"urls\": [").await;
    api.expect(&a, StatusCode::BAD_REQUEST, "broken JSON");
    assert!(a.error().contains("request body"), "{}", a.body);

    // Submit through the API and wait for the pipeline.
    let url = site.url("media/talk.mp4");
    let a = api
        .post(
            "/api/v1/videos",
            &json!({"urls": [url], "requested_by": "tests/api.rs"}),
        )
        .await;
    api.expect(&a, StatusCode::ACCEPTED, "submit");
    let submitted = a.json();
    assert_eq!(submitted[0]["url"], url.as_str(), "{submitted}");
    assert_eq!(submitted[0]["is_source"], false);
    assert!(submitted[0]["known"].is_null());
    let id = submitted[0]["id"].as_str().unwrap().to_string();
    let done = api
        .wait_video(&id, Duration::from_secs(600), |v| {
            v["status"] == "done" || v["status"] == "failed"
        })
        .await;
    assert_eq!(done["status"], "done", "{done}");
    // A second submission of the same video says it is known.
    let a = api.post("/api/v1/videos", &json!({"urls": [url]})).await;
    api.expect(&a, StatusCode::ACCEPTED, "submit again");
    assert_eq!(a.json()[0]["known"], "done", "{}", a.body);

    // The list and one video: the shape of `vidpipe status --json`.
    let a = api.get("/api/v1/videos?limit=10").await;
    api.expect(&a, StatusCode::OK, "list");
    let listed = a.json();
    let ours = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} is not listed: {listed}"))
        .clone();
    let cli = vidpipe(&c, &["status", "--json", &id]).await;
    assert!(cli.status.success(), "{cli:?}");
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(ours, cli[0], "the API and `vidpipe status --json` differ");
    let stages: Vec<&str> = ours["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            for key in ["name", "status", "attempts", "duration_ms", "error"] {
                assert!(s.get(key).is_some(), "{key} missing: {s}");
            }
            assert_eq!(s["status"], "done", "{s}");
            s["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(stages, vidpipe::stages::STAGES);
    let a = api.get(&format!("/api/v1/videos/{}", enc(&id))).await;
    api.expect(&a, StatusCode::OK, "one video");
    assert_eq!(a.json(), ours);
    for (path, status, says) in [
        (
            "/api/v1/videos/url%3Anope",
            StatusCode::NOT_FOUND,
            "unknown video",
        ),
        (
            "/api/v1/videos/url%3Anope/timeline",
            StatusCode::NOT_FOUND,
            "unknown video",
        ),
        (
            "/api/v1/videos/url%3Anope/transcript",
            StatusCode::NOT_FOUND,
            "unknown video",
        ),
        // PostgreSQL text cannot hold a NUL: such an id is unknown, not a
        // failed query.
        (
            "/api/v1/videos/url%3A%00x",
            StatusCode::NOT_FOUND,
            "unknown video",
        ),
        (
            "/api/v1/videos/url%3A%00x/summary",
            StatusCode::NOT_FOUND,
            "unknown video",
        ),
        ("/api/v1/videos?limit=0", StatusCode::BAD_REQUEST, "limit"),
        (
            "/api/v1/videos?limit=lots",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        ("/api/v1/nothing", StatusCode::NOT_FOUND, "no such endpoint"),
    ] {
        let a = api.get(path).await;
        api.expect(&a, status, path);
        assert!(a.error().contains(says), "{path}: {}", a.body);
    }

    // The timeline: every stage of generation 1, with times.
    let a = api
        .get(&format!("/api/v1/videos/{}/timeline", enc(&id)))
        .await;
    api.expect(&a, StatusCode::OK, "timeline");
    let timeline = a.json();
    assert_eq!(timeline["video"], ours);
    let runs = timeline["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 5, "{timeline}");
    for r in runs {
        assert_eq!(r["generation"], 1, "{r}");
        assert_eq!(r["status"], "done", "{r}");
        assert!(r["attempts"].as_i64().unwrap() >= 1, "{r}");
        assert!(
            r["started_at"].is_string() && r["finished_at"].is_string(),
            "{r}"
        );
        assert!(r["duration_ms"].is_i64(), "{r}");
    }

    // The results, in every format, with their content types.
    let base = format!("/api/v1/videos/{}", enc(&id));
    for (query, kind) in [
        ("", "text/plain"),
        ("?format=txt", "text/plain"),
        ("?format=srt", "application/x-subrip"),
        ("?format=vtt", "text/vtt"),
        ("?format=json&generation=1", "application/json"),
    ] {
        let a = api.get(&format!("{base}/transcript{query}")).await;
        api.expect(&a, StatusCode::OK, query);
        assert!(
            a.content_type.starts_with(kind),
            "{query}: {}",
            a.content_type
        );
        assert!(
            a.body.to_lowercase().contains("river"),
            "{query}: {}",
            a.body
        );
    }
    let a = api.get(&format!("{base}/transcript?format=srt")).await;
    assert!(a.body.contains(" --> "), "{}", a.body);
    let a = api.get(&format!("{base}/transcript?format=vtt")).await;
    assert!(a.body.starts_with("WEBVTT"), "{}", a.body);
    let a = api.get(&format!("{base}/transcript?format=json")).await;
    assert!(!a.json()["segments"].as_array().unwrap().is_empty());
    let a = api.get(&format!("{base}/summary")).await;
    api.expect(&a, StatusCode::OK, "summary");
    assert!(
        a.content_type.starts_with("text/markdown"),
        "{}",
        a.content_type
    );
    assert!(a.body.contains("## Summary"), "{}", a.body);
    let a = api.get(&format!("{base}/summary?format=json")).await;
    api.expect(&a, StatusCode::OK, "summary json");
    assert!(a.json()["summary"].is_string(), "{}", a.body);
    for (query, status, says) in [
        ("/transcript?format=docx", StatusCode::BAD_REQUEST, "format"),
        ("/summary?format=srt", StatusCode::BAD_REQUEST, "format"),
        (
            "/transcript?generation=0",
            StatusCode::BAD_REQUEST,
            "generation",
        ),
        (
            "/summary?generation=x",
            StatusCode::BAD_REQUEST,
            "generation",
        ),
        (
            "/transcript?generation=7",
            StatusCode::NOT_FOUND,
            "generation 7",
        ),
    ] {
        let a = api.get(&format!("{base}{query}")).await;
        api.expect(&a, status, query);
        assert!(a.error().contains(says), "{query}: {}", a.body);
    }

    // A result file gone from the blob store: 500, naming the file but not
    // where the server keeps it.
    let record = vidpipe::client::stage_output(&p.pool, &id, "transcribe", None)
        .await
        .unwrap()
        .expect("the transcription's output record");
    let txt = record["transcript"]["uri"].as_str().unwrap();
    let vtt = std::path::PathBuf::from(txt.strip_prefix("file://").unwrap())
        .with_file_name("transcript.vtt");
    let kept = std::fs::read(&vtt).unwrap();
    std::fs::remove_file(&vtt).unwrap();
    let a = api.get(&format!("{base}/transcript?format=vtt")).await;
    api.expect(&a, StatusCode::INTERNAL_SERVER_ERROR, "a missing file");
    assert!(a.error().contains("transcript.vtt"), "{}", a.body);
    let dir = vtt.parent().unwrap().display().to_string();
    assert!(!a.body.contains(&dir), "{}", a.body);
    assert!(!a.body.contains(&c.storage), "{}", a.body);
    // Back in place for what follows (schemathesis reads every format).
    std::fs::write(&vtt, kept).unwrap();

    // The library calls the CLI makes answer the same for such ids.
    let nul = "url:\0x".to_string();
    assert!(
        vidpipe::client::status(&p.pool, std::slice::from_ref(&nul), 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        vidpipe::client::stage_output(&p.pool, &nul, "summarize", None)
            .await
            .unwrap()
            .is_none()
    );
    let store = vidpipe::store::blobs::BlobStore::from_config(&c).unwrap();
    let read = |id: String, generation| {
        let (pool, store) = (&p.pool, &store);
        async move {
            vidpipe::client::read_result(
                pool,
                store,
                &id,
                vidpipe::client::ResultKind::Summary,
                "md",
                generation,
            )
            .await
        }
    };
    assert!(
        matches!(
            read(nul.clone(), None).await,
            Err(vidpipe::client::ResultError::UnknownVideo(_))
        ),
        "a NUL id is unknown"
    );
    assert!(matches!(
        read(id.clone(), Some(7)).await,
        Err(vidpipe::client::ResultError::NotFinished { .. })
    ));
    let md = read(id.clone(), None).await.unwrap();
    assert_eq!(md.generation, 1);
    assert!(
        String::from_utf8_lossy(&md.bytes).contains("## Summary"),
        "{md:?}"
    );

    // Sources: add, list, remove; bad ones are 400s.
    let feed = site.url("media/feed.xml");
    let a = api
        .post(
            "/api/v1/sources",
            &json!({"url": feed, "every_secs": 7200, "backfill": 3}),
        )
        .await;
    api.expect(&a, StatusCode::CREATED, "add source");
    let source = a.json();
    assert_eq!(source["every_secs"], 7200);
    assert_eq!(source["max_backfill"], 3);
    let source_id = source["id"].as_str().unwrap().to_string();
    assert!(source_id.starts_with("src:"), "{source}");
    let a = api.get("/api/v1/sources").await;
    api.expect(&a, StatusCode::OK, "sources");
    assert_eq!(a.json(), json!([source]));
    for (body, says) in [
        (json!({"url": feed, "every_secs": 10}), "every_secs"),
        (json!({"url": feed, "backfill": -1}), "backfill"),
        (json!({"url": feed, "backfill": 501}), "backfill"),
        (json!({"url": "javascript:alert(1)"}), "url"),
        (json!({"every_secs": 60}), "url"),
    ] {
        let a = api.post("/api/v1/sources", &body).await;
        api.expect(&a, StatusCode::BAD_REQUEST, &body.to_string());
        assert!(a.error().contains(says), "{body}: {}", a.body);
    }
    let a = api
        .delete(&format!("/api/v1/sources/{}", enc(&source_id)))
        .await;
    api.expect(&a, StatusCode::NO_CONTENT, "remove source");
    let a = api
        .delete(&format!("/api/v1/sources/{}", enc(&source_id)))
        .await;
    api.expect(&a, StatusCode::NOT_FOUND, "remove again");
    assert!(a.error().contains("no subscription"), "{}", a.body);

    // Stages: Kafka's view and the status tables' counts. Kafka's view may
    // be up to 5 s old (and the groups' members take a moment to show), so
    // poll until every group has members and the commands topic its record.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stages = loop {
        let a = api.get("/api/v1/stages").await;
        api.expect(&a, StatusCode::OK, "stages");
        let stages = a.json();
        let settled = stages.as_array().unwrap().iter().all(|s| {
            !s["members"].as_array().unwrap().is_empty()
                && s["partition_lag"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["high"].as_i64() > Some(0))
        });
        if settled {
            break stages;
        }
        assert!(
            Instant::now() < deadline,
            "the stages did not settle: {stages}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let stages = stages.as_array().unwrap();
    assert_eq!(stages.len(), 5);
    for (s, name) in stages.iter().zip(vidpipe::stages::STAGES) {
        assert_eq!(s["stage"], name, "{s}");
        assert!(
            s["topic"].as_str().unwrap().starts_with(&c.topic_prefix),
            "{s}"
        );
        assert_eq!(s["partitions"], c.topic_partitions, "{s}");
        assert!(!s["members"].as_array().unwrap().is_empty(), "{s}");
        assert!(s["lag"].is_i64(), "{s}");
        assert_eq!(s["videos"]["done"], 1, "{s}");
        assert!(s["done_last_10m"].as_i64().unwrap() >= 1, "{s}");
        assert!(s["done_per_minute"].as_f64().unwrap() > 0.0, "{s}");
    }

    // The overview the status page polls: the same numbers, and Kafka's
    // (its view was just read for /api/v1/stages).
    let a = api.get("/api/v1/overview").await;
    api.expect(&a, StatusCode::OK, "overview");
    let overview = a.json();
    assert_eq!(overview["videos"]["done"], 1, "{overview}");
    assert!(overview["kafka_error"].is_null(), "{overview}");
    let rows = overview["stages"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(names, vidpipe::stages::STAGES, "{overview}");
    for (row, full) in rows.iter().zip(stages) {
        assert_eq!(row["videos"], full["videos"], "{row}");
        assert_eq!(row["partitions"], c.topic_partitions, "{row}");
        assert!(row["members"].as_i64().unwrap() >= 1, "{row}");
        assert!(row["lag"].is_i64(), "{row}");
        assert!(row["done_per_minute"].as_f64().unwrap() > 0.0, "{row}");
    }

    // Replay: bad requests, a dry run, then a real one from summarize.
    for (body, status, says) in [
        (
            json!({"stage": "transcode", "videos": [id]}),
            StatusCode::BAD_REQUEST,
            "stage",
        ),
        (
            json!({"stage": "summarize"}),
            StatusCode::BAD_REQUEST,
            "choose what to replay",
        ),
        (
            json!({"stage": "summarize", "since": "last tuesday"}),
            StatusCode::BAD_REQUEST,
            "since",
        ),
        (
            json!({"stage": "summarize", "videos": ["url:nope"]}),
            StatusCode::NOT_FOUND,
            "url:nope",
        ),
    ] {
        let a = api.post("/api/v1/replay", &body).await;
        api.expect(&a, status, &body.to_string());
        assert!(a.error().contains(says), "{body}: {}", a.body);
    }
    let a = api
        .post(
            "/api/v1/replay",
            &json!({"stage": "summarize", "videos": [id], "dry_run": true}),
        )
        .await;
    api.expect(&a, StatusCode::OK, "dry run");
    let plan = a.json();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["topic"], c.topic("video.transcribed"));
    assert_eq!(
        plan["videos"],
        json!([{"video_id": id, "from_generation": 1, "to_generation": 2, "source": "topic"}])
    );
    let a = api
        .post(
            "/api/v1/replay",
            &json!({"stage": "summarize", "videos": [id]}),
        )
        .await;
    api.expect(&a, StatusCode::ACCEPTED, "replay");
    assert_eq!(a.json()["videos"][0]["to_generation"], 2, "{}", a.body);
    let again = api
        .wait_video(&id, Duration::from_secs(300), |v| {
            v["generation"] == 2 && (v["status"] == "done" || v["status"] == "failed")
        })
        .await;
    assert_eq!(again["status"], "done", "{again}");
    let a = api
        .get(&format!("/api/v1/videos/{}/timeline", enc(&id)))
        .await;
    let runs: Vec<(i64, String)> = a.json()["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["generation"].as_i64().unwrap(),
                r["stage"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(runs[0], (2, "summarize".to_string()), "{runs:?}");
    assert_eq!(runs.len(), 6, "{runs:?}");
    for generation in [1, 2] {
        let a = api
            .get(&format!(
                "{base}/summary?format=json&generation={generation}"
            ))
            .await;
        api.expect(
            &a,
            StatusCode::OK,
            &format!("summary of generation {generation}"),
        );
    }

    // Pages, with the contract the browser tests rely on.
    let a = api.get("/").await;
    api.expect(&a, StatusCode::OK, "index");
    assert!(
        a.content_type.starts_with("text/html"),
        "{}",
        a.content_type
    );
    assert!(
        a.csp
            .as_deref()
            .is_some_and(|p| p.contains("script-src 'self'")),
        "{:?}",
        a.csp
    );
    let row = format!("<tr data-video-id=\"{id}\" data-status=\"done\">");
    assert!(a.body.contains(&row), "no {row} in {}", a.body);
    let link = format!("<a class=\"video-link\" href=\"/videos/{}\">", enc(&id));
    assert!(a.body.contains(&link), "no {link} in {}", a.body);
    assert!(a.body.contains("/assets/vidpipe.js"), "{}", a.body);
    // The counters and stage cells the script updates in place.
    let done_total = "<div class=\"total\" data-status=\"done\"><span class=\"n\">1</span>";
    assert!(a.body.contains(done_total), "no {done_total} in {}", a.body);
    let summarize = &a.body[a.body.find("<tr data-stage=\"summarize\">").unwrap()..];
    let summarize = &summarize[..summarize.find("</tr>").unwrap()];
    for cell in ["<td class=\"done\">1</td>", "<td class=\"partitions\">"] {
        assert!(summarize.contains(cell), "no {cell} in {summarize}");
    }
    assert!(a.body.contains("id=\"kafka-error\""), "{}", a.body);
    let a = api.get(&format!("/videos/{}", enc(&id))).await;
    api.expect(&a, StatusCode::OK, "video page");
    for needle in [
        "data-stage=\"summarize\" data-status=\"done\" data-generation=\"2\"".to_string(),
        "data-stage=\"transcribe\" data-status=\"done\" data-generation=\"1\"".to_string(),
        format!(
            "<a id=\"summary-link\" href=\"/videos/{}/summary\">",
            enc(&id)
        ),
        format!(
            "<a id=\"transcript-link\" href=\"/videos/{}/transcript\">",
            enc(&id)
        ),
    ] {
        assert!(a.body.contains(&needle), "no {needle} in {}", a.body);
    }
    // The current generation's run comes first.
    let first = a.body.find("data-stage=\"summarize\"").unwrap();
    assert!(
        a.body[first..]
            .starts_with("data-stage=\"summarize\" data-status=\"done\" data-generation=\"2\""),
        "{}",
        a.body
    );
    let a = api.get(&format!("/videos/{}/summary", enc(&id))).await;
    api.expect(&a, StatusCode::OK, "summary page");
    assert!(a.body.contains("id=\"summary\""), "{}", a.body);
    let a = api.get(&format!("/videos/{}/transcript", enc(&id))).await;
    api.expect(&a, StatusCode::OK, "transcript page");
    assert!(a.body.contains("id=\"transcript\""), "{}", a.body);
    assert!(a.body.contains("class=\"ts\">00:00</span>"), "{}", a.body);
    assert!(a.body.to_lowercase().contains("river"), "{}", a.body);
    for path in [
        "/videos/url%3Anope",
        "/videos/url%3Anope/summary",
        "/nowhere",
    ] {
        let a = api.get(path).await;
        api.expect(&a, StatusCode::NOT_FOUND, path);
        assert!(
            a.content_type.starts_with("text/html"),
            "{path}: {}",
            a.content_type
        );
    }
    for (path, kind) in [
        ("/assets/vidpipe.js", "text/javascript"),
        ("/assets/vidpipe.css", "text/css"),
    ] {
        let a = api.get(path).await;
        api.expect(&a, StatusCode::OK, path);
        assert!(
            a.content_type.starts_with(kind),
            "{path}: {}",
            a.content_type
        );
    }

    // Hostile text from input stays text on every page.
    let evil_id = "url:<script>alert(1)</script>";
    sqlx::query(
        "INSERT INTO videos (id, url, generation, status, stage, error)
         VALUES ($1, 'javascript:alert(2)', 1, 'failed', 'download', $2)",
    )
    .bind(evil_id)
    .bind("\"><img src=x onerror=alert(3)>")
    .execute(&p.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO discovered (video_id, url, title, claimed_by) VALUES ($1, 'x', $2, 'test')",
    )
    .bind(evil_id)
    .bind("<b onmouseover=alert(4)>title</b>")
    .execute(&p.pool)
    .await
    .unwrap();
    for path in ["/".to_string(), format!("/videos/{}", enc(evil_id))] {
        let a = api.get(&path).await;
        api.expect(&a, StatusCode::OK, &path);
        for raw in [
            "<script>alert",
            "<img src=x",
            "<b onmouseover",
            "href=\"javascript:",
        ] {
            assert!(!a.body.contains(raw), "{path} contains {raw}: {}", a.body);
        }
        assert!(
            a.body.contains("alert(1)"),
            "{path}: the id is shown, escaped"
        );
    }
    let a = api.get("/").await;
    let evil_row = format!("<a class=\"video-link\" href=\"/videos/{}\">", enc(evil_id));
    assert!(a.body.contains(&evil_row), "{}", a.body);

    // The document, the metrics.
    let a = api.get("/openapi.json").await;
    api.expect(&a, StatusCode::OK, "openapi");
    let doc = a.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for path in [
        "/api/v1/videos",
        "/api/v1/videos/{id}",
        "/api/v1/videos/{id}/timeline",
        "/api/v1/videos/{id}/transcript",
        "/api/v1/videos/{id}/summary",
        "/api/v1/sources",
        "/api/v1/sources/{id}",
        "/api/v1/replay",
        "/api/v1/stages",
        "/api/v1/overview",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains(path), "{path} is not documented: {paths:?}");
    }
    let a = api.get("/metrics").await;
    api.expect(&a, StatusCode::OK, "metrics");
    assert!(
        a.content_type.starts_with("text/plain"),
        "{}",
        a.content_type
    );
    assert!(
        a.body.contains("vidpipe_http_requests_total{method=\"GET\",route=\"/api/v1/videos/{id}\",status=\"200\"}"),
        "{}",
        a.body
    );
    assert!(
        a.body.contains("vidpipe_videos{status=\"done\"} 1"),
        "{}",
        a.body
    );

    // Schemathesis against the document, with the pipeline stopped (the
    // replays and submissions it sends then only queue work) and its blob
    // store kept. Every check;
    // the one exception: requests that are valid by the schema but whose
    // URLs or times do not parse are answered 400, which is right, so
    // `positive_data_acceptance` also accepts 400 on the three operations
    // that take them. The id path parameter is the processed video's, so
    // the result routes are exercised with real files.
    let _blobs = std::mem::replace(&mut p.blobs, tempfile::tempdir().unwrap());
    p.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("schemathesis.toml");
    std::fs::write(
        &settings,
        format!(
            r#"
[[operations]]
include-path-regex = "^/api/v1/videos/\\{{id\\}}"
parameters = {{ "path.id" = "{id}" }}

[[operations]]
include-path = ["/api/v1/videos", "/api/v1/sources", "/api/v1/replay"]
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 404, 409, 422]
"#
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(schemathesis())
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(&settings)
        .args(["run", &api.server.url("/openapi.json")])
        .args(["--url", &api.server.base])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "40",
            "--seed",
            "20261205",
        ])
        .args(["--request-timeout", "60", "--workers", "2"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems ({}):\n{report}\n{}\n--- vidpipe serve log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        api.server.log()
    );
    assert!(report.contains("API Operations"), "{report}");
    println!("{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_names_postgresql_when_the_database_does_not_answer() {
    let mut c = config();
    c.topic_prefix = format!("{}.", crate::helpers::unique("api_ready"));
    let blobs = tempfile::tempdir().unwrap();
    c.storage = blobs.path().display().to_string();
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server::start(
        &c,
        &format!("postgres://vidpipe:vidpipe@127.0.0.1:{closed}/vidpipe"),
    )
    .await;
    let api = Client {
        http: reqwest::Client::new(),
        server,
    };
    let a = api.get("/healthz").await;
    api.expect(&a, StatusCode::OK, "healthz while the database is away");
    let a = api.get("/readyz").await;
    api.expect(&a, StatusCode::SERVICE_UNAVAILABLE, "readyz");
    let ready = a.json();
    let error = ready["error"].as_str().unwrap();
    assert!(error.contains("PostgreSQL"), "{ready}");
    assert!(error.contains(&format!("127.0.0.1:{closed}")), "{ready}");
    assert!(!error.contains("Kafka"), "Kafka answers: {ready}");
    assert!(
        !error.contains("vidpipe:vidpipe@"),
        "no credentials: {ready}"
    );
    let by_name = |name: &str| {
        ready["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == name)
            .unwrap_or_else(|| panic!("no {name}: {ready}"))["ok"]
            .clone()
    };
    assert_eq!(by_name("postgresql"), false);
    assert_eq!(by_name("kafka"), true);
    assert_eq!(by_name("schema-registry"), true);
    // Requests that need the database say so.
    let a = api.get("/api/v1/videos").await;
    api.expect(
        &a,
        StatusCode::SERVICE_UNAVAILABLE,
        "videos without a database",
    );
    assert!(a.error().contains("PostgreSQL"), "{}", a.body);
    let a = api.get("/").await;
    api.expect(
        &a,
        StatusCode::SERVICE_UNAVAILABLE,
        "index without a database",
    );
    assert!(a.body.contains("PostgreSQL"), "{}", a.body);
}

/// A database that refuses our credentials is the operator's matter: 503
/// naming PostgreSQL (was a 500), and the password nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_refuses_the_password_is_a_503() {
    let c = config();
    let mut url = url::Url::parse(c.database_url.expose_secret()).unwrap();
    url.set_password(Some("not-the-password")).unwrap();
    let server = Server::start(&c, url.as_str()).await;
    let api = Client {
        http: reqwest::Client::new(),
        server,
    };
    let a = api.get("/api/v1/videos").await;
    api.expect(
        &a,
        StatusCode::SERVICE_UNAVAILABLE,
        "videos with a wrong password",
    );
    assert!(a.error().contains("PostgreSQL"), "{}", a.body);
    assert!(!a.body.contains("not-the-password"), "{}", a.body);
}

/// With `api_token` set, whatever changes something needs the token;
/// reading does not (the status pages only read).
#[tokio::test(flavor = "multi_thread")]
async fn changes_need_the_api_token_and_reads_do_not() {
    let c = config();
    let (_, database_url) = crate::helpers::fresh_database_url(&c).await;
    let token = "tok-0123456789abcdef";
    let server = Server::start_with(
        &c,
        database_url.expose_secret(),
        &[("VIDPIPE_API_TOKEN", token)],
    )
    .await;
    let api = Client {
        http: reqwest::Client::new(),
        server,
    };
    let a = api.get("/api/v1/sources").await;
    api.expect(&a, StatusCode::OK, "reading without a token");
    let body = json!({"url": "https://example.com/feed.xml", "every_secs": 3600});
    for auth in [None, Some("Bearer tok-0123456789abcdeX"), Some(token)] {
        let mut req = api.http.post(api.server.url("/api/v1/sources")).json(&body);
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        let a = answer(req).await;
        api.expect(&a, StatusCode::UNAUTHORIZED, &format!("{auth:?}"));
        assert!(a.body.contains("Authorization: Bearer"), "{}", a.body);
    }
    let a = answer(
        api.http
            .post(api.server.url("/api/v1/sources"))
            .header("Authorization", format!("Bearer {token}"))
            .json(&body),
    )
    .await;
    api.expect(&a, StatusCode::CREATED, "adding with the token");
    let id = a.json()["id"].as_str().unwrap().to_string();
    let a = api.delete(&format!("/api/v1/sources/{}", enc(&id))).await;
    api.expect(&a, StatusCode::UNAUTHORIZED, "removing without the token");
}

/// Without a token the API listens on loopback addresses only.
#[tokio::test]
async fn serve_refuses_a_public_address_without_a_token() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vidpipe"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("VIDPIPE_API_TOKEN")
        .args(["serve", "--listen", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run vidpipe serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("api_token"), "{stderr}");
    assert!(stderr.contains("0.0.0.0:0"), "{stderr}");
}

/// One raw HTTP/1.1 GET with `host` as its Host header: the status code
/// and the body.
async fn get_with_host(base: &str, path: &str, host: &str) -> (u16, String) {
    raw_request(
        base,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends `head` as it is and reads the answer to its end.
async fn raw_request(base: &str, head: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("an answer within 30 s")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A page on a name its owner controls, re-pointed at 127.0.0.1 (DNS
/// rebinding), sends that name as Host: it is refused; addresses,
/// `localhost` and the names in api_hosts are served.
#[tokio::test(flavor = "multi_thread")]
async fn requests_naming_an_unknown_host_are_refused() {
    let c = config();
    let (_, database_url) = crate::helpers::fresh_database_url(&c).await;
    let server = Server::start_with(
        &c,
        database_url.expose_secret(),
        &[("VIDPIPE_API_HOSTS", "vidpipe.test")],
    )
    .await;
    let port = server.base.rsplit(':').next().unwrap().to_string();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("vidpipe.test:{port}"),
        "[::1]".to_string(),
    ] {
        let (status, body) = get_with_host(&server.base, "/api/v1/sources", &host).await;
        assert_eq!(status, 200, "{host}: {body}\n{}", server.log());
    }
    for host in [
        format!("rebound.example:{port}"),
        "vidpipe.test.example".into(),
    ] {
        for path in ["/api/v1/sources", "/", "/openapi.json"] {
            let (status, body) = get_with_host(&server.base, path, &host).await;
            assert_eq!(status, 403, "{host} {path}: {body}");
            assert!(body.contains("api_hosts"), "{body}");
        }
        // Monitoring answers whatever name a scraper or probe uses.
        let (status, body) = get_with_host(&server.base, "/healthz", &host).await;
        assert_eq!(status, 200, "{host} /healthz: {body}");
    }
    // No Host, or two: 400.
    for head in [
        "GET /api/v1/sources HTTP/1.0\r\n\r\n".to_string(),
        format!(
            "GET /api/v1/sources HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: rebound.example\r\nConnection: close\r\n\r\n"
        ),
    ] {
        let (status, body) = raw_request(&server.base, &head).await;
        assert_eq!(status, 400, "{head:?}: {body}");
        assert!(body.contains("Host"), "{body}");
    }
}

/// A client that never finishes its request head is cut off, and so is one
/// that keeps a connection idle; a request that outlives
/// api_request_timeout_secs is answered 503 naming the setting.
#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_and_slow_requests_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A schema registry that accepts connections and never answers: the
    // readiness probe waits for it (3 s), longer than the 1 s allowed.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let c = config();
    let (_, database_url) = crate::helpers::fresh_database_url(&c).await;
    let server = Server::start_with(
        &c,
        database_url.expose_secret(),
        &[
            ("VIDPIPE_API_REQUEST_TIMEOUT_SECS", "1"),
            ("VIDPIPE_SCHEMA_REGISTRY_URL", &registry),
        ],
    )
    .await;
    let started = std::time::Instant::now();
    let (status, body) = get_with_host(&server.base, "/readyz", "127.0.0.1").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("api_request_timeout_secs"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let addr = server.base.trim_start_matches("http://").to_string();
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for (what, s) in [("half a request head", &mut half), ("nothing", &mut idle)] {
        let mut buf = [0u8; 1024];
        // Closed (read ends, or is reset) well within a minute; before the
        // header timeout, the connection stayed open for ever.
        let ended = tokio::time::timeout(Duration::from_secs(40), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a connection that sent {what} is still open");
    }
}
