//! The whole pipeline on real services: every stage in this process (as
//! `vidpipe run` runs them), real Kafka, registry, PostgreSQL, ffmpeg and
//! the ASR server, spoken videos generated here and served over local HTTP.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use rdkafka::{ClientConfig, Message};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use vidpipe::backends::asr::{Transcript, word_error_rate};
use vidpipe::client;
use vidpipe::config::Config;
use vidpipe::records::{LifecycleEvent, Record};
use vidpipe::stages::{self, Services};
use vidpipe::store::catalog::PgCatalog;
use vidpipe::template::codec::Codec;

use crate::helpers::{config, fresh_database_url, read_all, unique};

/// Scripts of the spoken test videos.
pub const SCRIPTS: [&str; 3] = [
    "The river flows past the old mill every morning. Farmers bring their grain to be ground into flour, \
     and the miller counts every sack before noon.",
    "Our team measured the temperature of the lake for twelve weeks. The water was coldest in March and \
     warmest at the end of August, when the algae bloomed.",
    "To repair a flat tire, remove the wheel, find the hole in the tube, and cover it with a patch. \
     Then pump the tire and check that it holds the air.",
];

/// Makes `name` (mp4 with a video track) speaking `text`; returns its path.
pub fn spoken_video(dir: &Path, name: &str, text: &str) -> PathBuf {
    vidpipe::template::testkit::spoken_video(dir, name, text)
        .unwrap_or_else(|e| panic!("{e} (scripts/stack up installs espeak-ng and ffmpeg)"))
}

/// A local web server for media, feeds and misbehaving answers.
#[derive(Clone)]
pub struct Site {
    dir: PathBuf,
    /// Its address.
    pub addr: SocketAddr,
}

impl Site {
    /// A URL on the site.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }
}

async fn file(State(site): State<Site>, UrlPath(name): UrlPath<String>) -> Response {
    let path = site.dir.join(&name);
    if name.contains('/') || name.starts_with('.') || !path.is_file() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let bytes = tokio::fs::read(&path).await.unwrap();
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("mp4") => "video/mp4",
        Some("xml") => "application/rss+xml",
        Some("m3u8") => "application/vnd.apple.mpegurl",
        Some("html") => "text/html",
        _ => "application/octet-stream",
    };
    ([(header::CONTENT_TYPE, kind)], bytes).into_response()
}

/// Serves `dir` on `ip` (a loopback address), plus the hostile routes.
pub async fn serve(dir: &Path, ip: &str) -> Site {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let site = Site {
        dir: dir.to_path_buf(),
        addr: listener.local_addr().unwrap(),
    };
    let app = Router::new()
        .route("/media/{name}", get(file))
        .route(
            "/redirect-metadata.mp4",
            get(|| async {
                (
                    StatusCode::FOUND,
                    [(header::LOCATION, "http://169.254.169.254/latest/meta-data/")],
                )
            }),
        )
        .route(
            "/redirect-loopback.mp4",
            get(|| async {
                (
                    StatusCode::FOUND,
                    [(header::LOCATION, "http://127.0.0.1:8000/v1/models")],
                )
            }),
        )
        .route(
            "/html-page.mp4",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html")],
                    "<!doctype html><html><body>Sign in to continue</body></html>",
                )
            }),
        )
        .route(
            "/endless.mp4",
            get(|| async {
                // No Content-Length: a body far over the cap, streamed.
                let chunk = vec![0u8; 64 * 1024];
                let stream = futures::stream::iter(
                    (0..1024).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
                );
                (
                    [(header::CONTENT_TYPE, "video/mp4")],
                    Body::from_stream(stream),
                )
            }),
        )
        .route(
            "/trickle.mp4",
            get(|| async {
                let stream = futures::stream::unfold(0u32, |n| async move {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    (n < 600).then(|| (Ok::<_, std::io::Error>(vec![0u8; 16]), n + 1))
                });
                (
                    [(header::CONTENT_TYPE, "video/mp4")],
                    Body::from_stream(stream),
                )
            }),
        )
        .with_state(site.clone());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    site
}

/// Runs every stage in this process until dropped.
pub struct Pipeline {
    pub config: Config,
    pub pool: PgPool,
    pub blobs: tempfile::TempDir,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), stages::RunError>>>,
}

impl Pipeline {
    /// A pipeline with its own topics, database and blob store; `tweak`
    /// adjusts the configuration first.
    pub async fn start(prefix: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut c = config();
        c.topic_prefix = format!("{}.", unique(prefix));
        c.topic_partitions = 2;
        c.runner.commit_interval_ms = 200;
        c.runner.backoff_initial_ms = 200;
        c.runner.backoff_max_ms = 2_000;
        c.runner.max_attempts = 3;
        let (pool, url) = fresh_database_url(&c).await;
        c.database_url = url;
        let blobs = tempfile::tempdir().unwrap();
        c.storage = blobs.path().display().to_string();
        tweak(&mut c);
        let services = Services::build(c.clone()).await.expect("services start");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { stages::run(&[], services, "test", shutdown).await }
        });
        Self {
            config: c,
            pool,
            blobs,
            shutdown,
            handle: Some(handle),
        }
    }

    /// Waits until every id is done or failed; returns each one's status.
    pub async fn wait(
        &self,
        ids: &[String],
        limit: Duration,
    ) -> HashMap<String, client::VideoStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let all = client::status(&self.pool, ids, ids.len() as i64)
                .await
                .unwrap();
            let finished = all
                .iter()
                .filter(|v| v.status == "done" || v.status == "failed")
                .count();
            if finished == ids.len() {
                return all.into_iter().map(|v| (v.id.clone(), v)).collect();
            }
            if Instant::now() > deadline {
                panic!("videos did not finish within {limit:?}: {all:#?}");
            }
            if let Some(h) = &self.handle {
                assert!(!h.is_finished(), "the pipeline stopped by itself");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Stops the stages (drain, commit, leave).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().expect("the pipeline stops cleanly");
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Every lifecycle event on the events topic, by video.
async fn events(c: &Config) -> HashMap<String, Vec<LifecycleEvent>> {
    let raw: Vec<Vec<u8>> = read_all(c, &c.topic("events"), Duration::from_secs(4))
        .await
        .into_iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect();
    let dec = Codec::new(c.schema_registry_url.as_deref())
        .unwrap()
        .decoder(LifecycleEvent::SCHEMA)
        .unwrap();
    let mut by_video: HashMap<String, Vec<LifecycleEvent>> = HashMap::new();
    for bytes in raw {
        let e: LifecycleEvent = dec.decode(&bytes).await.expect("events decode");
        by_video.entry(e.meta.video_id.clone()).or_default().push(e);
    }
    by_video
}

/// Checks an SRT or VTT document's structure: cues with increasing
/// `start --> end` times, each followed by text.
fn check_cues(doc: &str, vtt: bool) -> usize {
    let sep = if vtt { '.' } else { ',' };
    let body = if vtt {
        assert!(doc.starts_with("WEBVTT"), "a VTT file starts with WEBVTT");
        &doc[6..]
    } else {
        doc
    };
    let mut last = -1i64;
    let mut cues = 0;
    for block in body.split("\n\n").map(str::trim).filter(|b| !b.is_empty()) {
        let lines: Vec<&str> = block.lines().collect();
        let timing = lines
            .iter()
            .position(|l| l.contains("-->"))
            .unwrap_or_else(|| panic!("cue without timing: {block:?}"));
        let (a, b) = lines[timing].split_once(" --> ").expect("timing arrow");
        let ms = |t: &str| -> i64 {
            let (hms, frac) = t
                .trim()
                .rsplit_once(sep)
                .unwrap_or_else(|| panic!("bad time {t:?}"));
            let p: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
            assert_eq!(p.len(), 3, "HH:MM:SS in {t:?}");
            ((p[0] * 60 + p[1]) * 60 + p[2]) * 1000 + frac.parse::<i64>().unwrap()
        };
        let (start, end) = (ms(a), ms(b));
        assert!(
            start >= last && end >= start,
            "cue times go forward: {block:?}"
        );
        assert!(lines.len() > timing + 1, "a cue has text: {block:?}");
        last = start;
        cues += 1;
    }
    cues
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscribed_feed_of_spoken_videos_ends_in_transcripts_and_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    for (i, text) in SCRIPTS.iter().enumerate() {
        spoken_video(&media, &format!("talk{i}.mp4"), text);
    }
    let site = serve(&media, "127.0.0.1").await;
    let items: String = (0..SCRIPTS.len())
        .map(|i| {
            format!(
                "<item><title>Talk {i}</title><guid>talk-{i}</guid>\
                 <pubDate>Mon, 0{} Nov 2026 10:00:00 GMT</pubDate>\
                 <enclosure url=\"{}\" type=\"video/mp4\" length=\"1\"/></item>",
                i + 1,
                site.url(&format!("media/talk{i}.mp4"))
            )
        })
        .collect();
    std::fs::write(
        media.join("feed.xml"),
        format!("<?xml version=\"1.0\"?><rss version=\"2.0\"><channel><title>Talks</title>{items}</channel></rss>"),
    )
    .unwrap();

    let p = Pipeline::start("e2e", |c| c.net_allow = "127.0.0.1/32".into()).await;
    let feed = vidpipe::ids::normalise(&site.url("media/feed.xml")).unwrap();
    PgCatalog::new(p.pool.clone())
        .add_source(
            &vidpipe::ids::source_id(&feed),
            feed.as_str(),
            Duration::from_secs(3600),
            10,
        )
        .await
        .unwrap();
    // The poller claims the source and discovery finds the three videos.
    let deadline = Instant::now() + Duration::from_secs(120);
    let ids: Vec<String> = loop {
        let ids: Vec<String> = sqlx::query_scalar("SELECT video_id FROM discovered ORDER BY url")
            .fetch_all(&p.pool)
            .await
            .unwrap();
        if ids.len() == SCRIPTS.len() {
            break ids;
        }
        assert!(
            Instant::now() < deadline,
            "the feed was not discovered: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let finished = p.wait(&ids, Duration::from_secs(600)).await;
    let source_runs: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM stage_runs WHERE video_id = $1 AND stage = 'discover'",
    )
    .bind(vidpipe::ids::source_id(&feed))
    .fetch_all(&p.pool)
    .await
    .unwrap();
    assert_eq!(source_runs, ["done"], "one discovery run of the feed");
    let store = vidpipe::store::blobs::BlobStore::open(p.blobs.path()).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let v = &finished[id];
        assert_eq!(v.status, "done", "{id} ended {v:?}");
        // Discovery ran for the source; the video has the other four runs.
        let names: BTreeSet<&str> = v.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            BTreeSet::from(["download", "extract-audio", "transcribe", "summarize"]),
            "stage runs of {id}"
        );
        let record = client::stage_output(&p.pool, id, "transcribe", None)
            .await
            .unwrap()
            .expect("the transcribe run records its output");
        let uri = record["transcript"]["uri"].as_str().unwrap();
        let transcript: Transcript =
            serde_json::from_slice(&store.read(uri).await.unwrap()).unwrap();
        let text: Vec<&str> = transcript
            .segments
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        let wer = word_error_rate(SCRIPTS[i], &text.join(" "));
        eprintln!("{id}: WER {wer:.3}");
        assert!(
            wer <= 0.35,
            "{id}: WER {wer:.3} against its script; heard {text:?}"
        );
        let srt = std::fs::read_to_string(store.sibling(uri, "transcript.srt").unwrap()).unwrap();
        let vtt = std::fs::read_to_string(store.sibling(uri, "transcript.vtt").unwrap()).unwrap();
        assert!(check_cues(&srt, false) >= 1, "srt has cues");
        assert!(check_cues(&vtt, true) >= 1, "vtt has cues");
        let summary = client::stage_output(&p.pool, id, "summarize", None)
            .await
            .unwrap()
            .expect("the summarize run records its output");
        let md = store
            .read(summary["markdown"]["uri"].as_str().unwrap())
            .await
            .unwrap();
        assert!(md.len() > 20, "a summary exists for {id}");
    }
    // The same video again is recognised, not processed again; the feed
    // submitted again yields no new video.
    let again = client::submit(
        &p.config,
        &p.pool,
        &[site.url("media/talk0.mp4")],
        false,
        None,
    )
    .await
    .unwrap();
    assert_eq!(again[0].known.as_deref(), Some("done"), "{again:?}");
    let look = client::submit(&p.config, &p.pool, &[feed.to_string()], true, None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client::source_run(&p.pool, &look[0].id, look[0].generation)
            .await
            .unwrap()
        {
            client::SourceRun::Done(found) => {
                assert!(
                    found.is_empty(),
                    "a second look at the feed found known videos: {found:?}"
                );
                break;
            }
            client::SourceRun::Failed(why) => panic!("the second look failed: {why}"),
            client::SourceRun::Pending => {
                assert!(Instant::now() < deadline, "the second look did not finish");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    let events = events(&p.config).await;
    for id in &ids {
        let seen: BTreeSet<(String, &str)> = events[id]
            .iter()
            .map(|e| (e.stage.clone(), e.kind.as_str()))
            .collect();
        for stage in ["download", "extract-audio", "transcribe", "summarize"] {
            assert!(
                seen.contains(&(stage.to_string(), "started")),
                "{id}: {stage} started"
            );
            assert!(
                seen.contains(&(stage.to_string(), "succeeded")),
                "{id}: {stage} succeeded"
            );
        }
    }
    p.stop().await;
}

/// A pass-through to the real ASR server that first answers 429 (once per
/// request number it is told to), or always 400.
async fn asr_proxy(upstream: String, mode: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let state = (upstream, calls.clone(), reqwest::Client::new());
    let app = Router::new()
        .route(
            "/v1/audio/transcriptions",
            post(
                move |State((upstream, calls, http)): State<(
                    String,
                    Arc<AtomicUsize>,
                    reqwest::Client,
                )>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if mode == "reject" {
                        return (
                            StatusCode::BAD_REQUEST,
                            "{\"error\":{\"message\":\"unsupported audio\"}}",
                        )
                            .into_response();
                    }
                    if n == 0 {
                        return (
                            StatusCode::TOO_MANY_REQUESTS,
                            [(header::RETRY_AFTER, "1")],
                            "slow down",
                        )
                            .into_response();
                    }
                    let resp = http
                        .post(format!("{upstream}/audio/transcriptions"))
                        .header(header::CONTENT_TYPE, headers[header::CONTENT_TYPE].clone())
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
                    (status, resp.bytes().await.unwrap()).into_response()
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asr_server_answering_429_then_200_succeeds_and_400_fails_for_good() {
    let dir = tempfile::tempdir().unwrap();
    spoken_video(dir.path(), "talk.mp4", SCRIPTS[0]);
    let site = serve(dir.path(), "127.0.0.1").await;
    for (mode, expect) in [("throttle", "done"), ("reject", "failed")] {
        let (addr, calls) = asr_proxy(config().asr_url, mode).await;
        let p = Pipeline::start("asr", |c| {
            c.net_allow = "127.0.0.1/32".into();
            c.asr_url = format!("http://{addr}/v1");
        })
        .await;
        let url = site.url(&format!("media/talk.mp4?mode={mode}"));
        let submitted = client::submit(&p.config, &p.pool, &[url], false, None)
            .await
            .unwrap();
        let id = submitted[0].id.clone();
        let v = p
            .wait(std::slice::from_ref(&id), Duration::from_secs(300))
            .await
            .remove(&id)
            .unwrap();
        assert_eq!(v.status, expect, "{mode}: {v:?}");
        let n = calls.load(Ordering::SeqCst);
        if mode == "reject" {
            assert_eq!(v.stage.as_deref(), Some("transcribe"));
            let err = v.error.clone().unwrap_or_default();
            assert!(
                err.contains("asr_rejected") || err.contains("unsupported audio"),
                "{err}"
            );
            assert_eq!(n, 1, "a 400 is not retried");
        } else {
            assert!(n >= 2, "the 429 was retried ({n} calls)");
        }
        p.stop().await;
    }
}

/// The lifecycle of every id, by stage and kind, for hostile inputs: each
/// ends `failed` in the expected stage with an error naming the problem,
/// while a good video submitted with them finishes.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_inputs_fail_with_reasons_while_a_good_video_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    spoken_video(&media, "good.mp4", SCRIPTS[1]);
    // A truncated mp4: the first half of a real one.
    let whole = std::fs::read(media.join("good.mp4")).unwrap();
    std::fs::write(media.join("truncated.mp4"), &whole[..whole.len() / 2]).unwrap();
    // A video without an audio stream.
    let status = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i"])
        .arg("color=c=red:s=160x120:r=10:d=3")
        .args(["-c:v", "mpeg4"])
        .arg(media.join("silent.mp4"))
        .status()
        .unwrap();
    assert!(status.success());
    // An HLS playlist that points at a local file, as a playlist and
    // disguised as an mp4.
    let playlist =
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n";
    std::fs::write(media.join("evil.m3u8"), playlist).unwrap();
    std::fs::write(media.join("evil-playlist.mp4"), playlist).unwrap();
    // Served on 127.0.0.2: the allow list admits exactly that address, so
    // redirects to 127.0.0.1 and to the metadata address stay blocked.
    let site = serve(&media, "127.0.0.2").await;
    let p = Pipeline::start("hostile", |c| {
        c.net_allow = "127.0.0.2/32".into();
        c.media.max_download_bytes = 4 << 20;
        c.media.min_download_rate = 4096;
        c.media.min_rate_window_secs = 2;
        c.runner.max_attempts = 2;
    })
    .await;
    let cases: Vec<(&str, String, &str, &str)> = vec![
        ("404", site.url("media/missing.mp4"), "download", "http_404"),
        ("html", site.url("html-page.mp4"), "download", "not_media"),
        (
            "truncated",
            site.url("media/truncated.mp4"),
            "extract-audio",
            "not_media",
        ),
        (
            "no audio",
            site.url("media/silent.mp4"),
            "extract-audio",
            "no_audio",
        ),
        (
            "over the cap",
            site.url("endless.mp4"),
            "download",
            "too_large",
        ),
        ("trickle", site.url("trickle.mp4"), "download", "too_slow"),
        (
            "metadata redirect",
            site.url("redirect-metadata.mp4"),
            "download",
            "blocked_address",
        ),
        (
            "loopback redirect",
            site.url("redirect-loopback.mp4"),
            "download",
            "blocked_address",
        ),
        (
            "hls playlist",
            site.url("media/evil.m3u8"),
            "download",
            "not_media",
        ),
        // The download guard sniffs the playlist behind the mp4 name; ffmpeg's
        // container whitelist would refuse it next (tests/ffmpeg.rs).
        (
            "disguised playlist",
            site.url("media/evil-playlist.mp4"),
            "download",
            "not_media",
        ),
    ];
    let good = site.url("media/good.mp4");
    let mut urls: Vec<String> = cases.iter().map(|c| c.1.clone()).collect();
    urls.push(good.clone());
    let submitted = client::submit(&p.config, &p.pool, &urls, false, None)
        .await
        .unwrap();
    // A URL starting with '-' never leaves the client...
    let refused = client::submit(
        &p.config,
        &p.pool,
        &["-o/tmp/vidpipe-pwned".into()],
        false,
        None,
    )
    .await;
    assert!(
        matches!(refused, Err(client::ClientError::BadUrl(_))),
        "{refused:?}"
    );
    // ...and a command carrying one anyway (from another producer) fails in
    // discovery without touching the filesystem.
    let sender = client::CommandSender::new(&p.config).await.unwrap();
    sender
        .send("url:dash", 1, "-o/tmp/vidpipe-pwned", None)
        .await
        .unwrap();
    // A record with a hostile title, as a buggy or hostile upstream could
    // write it: the title must name no file.
    let discovered = vidpipe::records::VideoDiscovered {
        meta: vidpipe::records::Meta::new("url:title"),
        url: format!("{good}?title=1"),
        title: Some("../../../tmp/vidpipe-title\0.mp4".into()),
        source_url: None,
        published_at: None,
    };
    let codec = Codec::new(p.config.schema_registry_url.as_deref()).unwrap();
    let topic = p.config.topic("video.discovered");
    let bytes = codec
        .encoder(&topic, vidpipe::records::VideoDiscovered::SCHEMA)
        .await
        .unwrap()
        .encode(&discovered)
        .unwrap();
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &p.config.kafka_brokers)
        .create()
        .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&topic)
                .key("url:title")
                .payload(&bytes),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let mut ids: Vec<String> = submitted.iter().map(|s| s.id.clone()).collect();
    ids.push("url:dash".into());
    ids.push("url:title".into());
    let finished = p.wait(&ids, Duration::from_secs(300)).await;
    for ((name, _, stage, kind), s) in cases.iter().zip(&submitted) {
        let v = &finished[&s.id];
        eprintln!("{name}: {} at {:?}: {:?}", v.status, v.stage, v.error);
        assert_eq!(v.status, "failed", "{name}: {v:?}");
        assert_eq!(v.stage.as_deref(), Some(*stage), "{name}: {v:?}");
        let error = v.error.as_deref().unwrap_or_default();
        assert!(
            error.contains(kind),
            "{name}: the error names {kind}: {error}"
        );
    }
    let dash = &finished["url:dash"];
    assert_eq!(
        (dash.status.as_str(), dash.stage.as_deref()),
        ("failed", Some("discover")),
        "{dash:?}"
    );
    assert!(
        dash.error
            .as_deref()
            .unwrap_or_default()
            .contains("bad_url"),
        "{dash:?}"
    );
    assert!(
        !Path::new("/tmp/vidpipe-pwned").exists(),
        "no file from the '-' URL"
    );
    let good_id = &submitted.last().unwrap().id;
    assert_eq!(
        finished[good_id].status, "done",
        "the good video finishes: {:?}",
        finished[good_id]
    );
    let title = &finished["url:title"];
    assert_eq!(title.status, "done", "{title:?}");
    // Every run's row finished too: the NUL in the title (carried in the
    // output records kept on status rows) did not break a status write.
    assert!(title.stages.iter().all(|s| s.status == "done"), "{title:?}");
    assert!(
        !Path::new("/tmp/vidpipe-title").exists(),
        "the title named no file"
    );

    // /etc/passwd's content appears in no stored file, status row or event.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let marker = passwd.lines().next().unwrap().to_string();
    for entry in walk(p.blobs.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&marker),
            "{} holds /etc/passwd content",
            entry.display()
        );
        // Every file lives under the store's root, named by us.
        assert!(entry.starts_with(p.blobs.path()));
    }
    let errors: Vec<Option<String>> = sqlx::query_scalar("SELECT error FROM stage_runs")
        .fetch_all(&p.pool)
        .await
        .unwrap();
    for e in errors.into_iter().flatten() {
        assert!(
            !e.contains(&marker),
            "a status row holds /etc/passwd content: {e}"
        );
    }
    for (id, evs) in events(&p.config).await {
        for e in evs {
            let text = format!("{:?} {:?}", e.error, e.error_class);
            assert!(
                !text.contains(&marker),
                "an event of {id} holds /etc/passwd content"
            );
        }
    }
    p.stop().await;
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
