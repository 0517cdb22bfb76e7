//! The S3 blob store against the stack's S3-compatible server (s3s-fs,
//! which checks SigV4 signatures and implements multipart uploads).
//!
//! These are contract tests: s3s-fs emulates a cloud API, so they show that
//! our client code speaks S3 as that server understands it (signed
//! requests, multipart uploads, keys, errors), not how AWS itself behaves.
//! Every test works under a key prefix of its own in the stack's bucket.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use vidpipe::client;
use vidpipe::config::Config;
use vidpipe::store::blobs::{BlobError, BlobStore, safe_name, sha256_file};
use vidpipe::template::{ErrorClass, StageError};

use crate::helpers::{config, fresh_database_url, missing, unique};
use crate::pipeline::{SCRIPTS, serve, spoken_video};

/// The stack's S3 server, as `scripts/stack up` wrote it to its env file
/// (`VIDPIPE_TEST_S3_*`; the process environment wins).
struct S3Server {
    endpoint: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
}

fn s3_server() -> S3Server {
    let stack = std::env::var_os("VIDPIPE_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".stack"));
    let file = std::fs::read_to_string(stack.join("env")).unwrap_or_default();
    let get = |name: &str| {
        std::env::var(format!("VIDPIPE_TEST_S3_{name}"))
            .ok()
            .or_else(|| {
                file.lines()
                    .find_map(|l| l.strip_prefix(&format!("VIDPIPE_TEST_S3_{name}=")))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| {
                missing(
                    "the S3 test server (s3s-fs)",
                    &stack.join("env").display().to_string(),
                    format!("VIDPIPE_TEST_S3_{name} is not set"),
                )
            })
    };
    S3Server {
        endpoint: get("ENDPOINT"),
        bucket: get("BUCKET"),
        access_key_id: get("ACCESS_KEY_ID"),
        secret_access_key: get("SECRET_ACCESS_KEY"),
    }
}

/// `c` with its blobs under a fresh prefix of the test bucket; the
/// scratch directory must outlive the store.
fn use_s3(c: &mut Config, s3: &S3Server, prefix: &str, scratch: &Path) {
    c.storage = format!("s3://{}/{prefix}", s3.bucket);
    c.s3.endpoint = s3.endpoint.clone();
    c.s3.allow_http = true;
    c.s3.access_key_id = Some(s3.access_key_id.clone().into());
    c.s3.secret_access_key = Some(s3.secret_access_key.clone().into());
    c.s3.part_size = 5 << 20;
    c.s3.scratch_dir = scratch.display().to_string();
}

async fn connect(c: &Config, s3: &S3Server) -> BlobStore {
    BlobStore::connect(c)
        .await
        .unwrap_or_else(|e| missing("the S3 test server (s3s-fs)", &s3.endpoint, e))
}

/// A client of the test bucket of its own, to look behind the store.
fn bucket(s3: &S3Server) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&s3.endpoint)
        .with_allow_http(true)
        .with_bucket_name(&s3.bucket)
        .with_access_key_id(&s3.access_key_id)
        .with_secret_access_key(&s3.secret_access_key)
        .with_region("us-east-1")
        .build()
        .unwrap()
}

/// Every key under `prefix` in the bucket.
async fn keys(s3: &S3Server, prefix: &str) -> BTreeSet<String> {
    let prefix = object_store::path::Path::parse(prefix).unwrap();
    bucket(s3)
        .list(Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

/// Deletes a test's objects, so that the stack's disk does not fill up.
async fn remove(s3: &S3Server, prefix: &str) {
    let client = bucket(s3);
    for key in keys(s3, prefix).await {
        client
            .delete(&object_store::path::Path::parse(&key).unwrap())
            .await
            .unwrap();
    }
}

/// A file of `size` bytes that never repeats (a sha256 chain), so a part
/// out of place or twice would change the hash.
fn write_pattern(path: &Path, size: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = Sha256::digest(b"vidpipe");
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len());
        out.write_all(&block[..n]).unwrap();
        left -= n;
        block = Sha256::digest(block);
    }
    out.flush().unwrap();
}

#[tokio::test]
async fn a_file_larger_than_a_part_streams_up_and_back_with_its_sha256() {
    let s3 = s3_server();
    let scratch = tempfile::tempdir().unwrap();
    let prefix = unique("blobs-multipart");
    let mut c = config();
    use_s3(&mut c, &s3, &prefix, scratch.path());
    let store = connect(&c, &s3).await;

    // 13 MiB with 5 MiB parts: a multipart upload of three parts.
    let work = store.scratch().unwrap();
    let src = work.path().join("download");
    write_pattern(&src, 13 << 20);
    let want = sha256_file(&src).await.unwrap();
    let blob = store
        .put("yt:abc", 1, "media.mp4", &src, None, Some("video/mp4"))
        .await
        .unwrap();
    assert_eq!(blob.sha256, want, "hashed while streaming");
    assert_eq!(blob.size, 13 << 20);
    assert_eq!(
        blob.uri,
        format!("s3://{}/{prefix}/yt%3aabc/g1/media.mp4", s3.bucket),
        "named by video id and generation"
    );
    assert!(!src.exists(), "put moves the file out of scratch");
    let key = object_store::path::Path::parse(format!("{prefix}/yt%3aabc/g1/media.mp4")).unwrap();
    let etag = bucket(&s3)
        .head(&key)
        .await
        .unwrap()
        .e_tag
        .unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with("-3"),
        "S3 names a multipart object's ETag by its part count: {etag}"
    );

    // A tool gets a local file: a streamed copy in scratch, gone when
    // dropped.
    let copy = store.local(&blob.uri).await.unwrap();
    assert!(copy.path().starts_with(scratch.path()), "{copy:?}");
    assert_eq!(copy.file_name().unwrap(), "media.mp4");
    assert_eq!(sha256_file(copy.path()).await.unwrap(), want);
    let copied = copy.path().to_path_buf();
    drop(copy);
    assert!(!copied.exists(), "the local copy is removed after use");

    // Small results go up in one request and read back whole.
    let json = store
        .put_bytes(
            "yt:abc",
            1,
            "transcript.json",
            b"{\"segments\":[]}",
            "application/json",
        )
        .await
        .unwrap();
    assert_eq!(store.read(&json.uri).await.unwrap(), b"{\"segments\":[]}");
    let srt = store.sibling_uri(&json.uri, "transcript.srt").unwrap();
    assert_eq!(
        srt,
        format!("s3://{}/{prefix}/yt%3aabc/g1/transcript.srt", s3.bucket)
    );
    let err = store.read(&srt).await.unwrap_err();
    assert!(matches!(err, BlobError::Missing(_)), "{err}");
    assert_eq!(
        StageError::from(err).class,
        ErrorClass::Permanent,
        "a missing blob stays missing"
    );

    assert_eq!(
        keys(&s3, &prefix).await,
        BTreeSet::from([
            format!("{prefix}/.vidpipe-probe"),
            format!("{prefix}/yt%3aabc/g1/media.mp4"),
            format!("{prefix}/yt%3aabc/g1/transcript.json"),
        ])
    );
    remove(&s3, &prefix).await;
}

#[tokio::test]
async fn a_tool_reads_a_local_copy_of_an_s3_blob() {
    let s3 = s3_server();
    let scratch = tempfile::tempdir().unwrap();
    let prefix = unique("blobs-tool");
    let mut c = config();
    use_s3(&mut c, &s3, &prefix, scratch.path());
    let store = connect(&c, &s3).await;
    let work = store.scratch().unwrap();
    let video = spoken_video(work.path(), "talk.mp4", SCRIPTS[0]);
    let blob = store
        .put("url:talk", 1, "media.mp4", &video, None, Some("video/mp4"))
        .await
        .unwrap();
    let copy = store.local(&blob.uri).await.unwrap();
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(copy.path())
        .output()
        .expect("ffprobe runs (scripts/stack up installs ffmpeg)");
    let secs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("ffprobe: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(secs > 3.0, "ffprobe read the copy: {secs} s");
    remove(&s3, &prefix).await;
}

#[tokio::test]
async fn uris_of_another_store_are_refused_for_good() {
    let s3 = s3_server();
    let scratch = tempfile::tempdir().unwrap();
    let prefix = unique("blobs-foreign");
    let mut c = config();
    use_s3(&mut c, &s3, &prefix, scratch.path());
    let store = connect(&c, &s3).await;
    let dir = tempfile::tempdir().unwrap();
    let local = BlobStore::open(dir.path()).unwrap();
    let ours = store
        .put_bytes("yt:abc", 1, "summary.md", b"# x", "text/markdown")
        .await
        .unwrap();
    let bucket = &s3.bucket;
    for (store, uri) in [
        (&store, "file:///etc/passwd".to_string()),
        (
            &store,
            format!("s3://other-bucket/{prefix}/yt%3aabc/g1/summary.md"),
        ),
        (
            &store,
            format!("s3://{bucket}/someone-else/yt%3aabc/g1/summary.md"),
        ),
        (&store, format!("s3://{bucket}/{prefix}/../someone-else/x")),
        (
            &store,
            format!("s3://{bucket}/{prefix}-2/yt%3aabc/g1/summary.md"),
        ),
        (&local, ours.uri.clone()),
    ] {
        let err = match store.read(&uri).await {
            Ok(_) => panic!("{uri} was read by {store}"),
            Err(e) => e,
        };
        assert!(matches!(err, BlobError::Foreign(_)), "{uri}: {err}");
        let err = StageError::from(err);
        assert_eq!(err.class, ErrorClass::Permanent, "{uri}");
        assert_eq!(err.kind, "blob_uri", "{uri}");
        assert!(store.local(&uri).await.is_err(), "{uri}");
    }
    remove(&s3, &prefix).await;
}

/// Captures what the `tracing` macros log on this thread (a
/// current-thread runtime runs every task of the test here).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn credentials_stay_out_of_debug_output_errors_and_logs() {
    let s3 = s3_server();
    let scratch = tempfile::tempdir().unwrap();
    let prefix = unique("blobs-secret");
    let mut c = config();
    use_s3(&mut c, &s3, &prefix, scratch.path());
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let store = connect(&c, &s3).await;
    let work = store.scratch().unwrap();
    let src = work.path().join("media");
    write_pattern(&src, 6 << 20);
    let blob = store
        .put("yt:abc", 1, "media.mp4", &src, None, None)
        .await
        .unwrap();
    drop(store.local(&blob.uri).await.unwrap());
    // The same key id with another secret: the server checks signatures.
    let mut wrong = c.clone();
    let wrong_secret = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    wrong.s3.secret_access_key = Some(wrong_secret.clone().into());
    let refused = BlobStore::connect(&wrong).await.unwrap_err();
    drop(guard);
    let refused = refused.to_string();
    assert!(
        refused.contains(&format!("s3://{}/{prefix}/.vidpipe-probe", s3.bucket)),
        "the error names the probe object: {refused}"
    );
    assert!(
        refused.contains("403"),
        "the server refused the signature: {refused}"
    );

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.lines().count() > 5,
        "trace logging of the requests produced a log to check"
    );
    for (what, text) in [
        ("Debug of the configuration", format!("{c:?}")),
        ("Debug of the store", format!("{store:?}")),
        ("the refusal", refused),
        ("the trace log", log),
    ] {
        assert!(
            !text.contains(&s3.secret_access_key),
            "the secret key appears in {what}"
        );
        assert!(
            !text.contains(&wrong_secret),
            "the wrong secret key appears in {what}"
        );
    }
    let shown = format!("{store:?}");
    assert!(!shown.contains(&s3.access_key_id), "{shown}");
    remove(&s3, &prefix).await;
}

/// The `vidpipe` binary with the stack's settings and `env`.
fn vidpipe(env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vidpipe"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .stdin(Stdio::null());
    cmd
}

fn output(env: &[(&str, String)], args: &[&str]) -> Output {
    vidpipe(env, args).output().expect("run the vidpipe binary")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_pipeline_keeps_its_files_in_s3_named_by_video_id() {
    let s3 = s3_server();
    let dir = tempfile::tempdir().unwrap();
    spoken_video(dir.path(), "talk.mp4", SCRIPTS[1]);
    let site = serve(dir.path(), "127.0.0.1").await;
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("s3pipe"));
    let (pool, db_url) = fresh_database_url(&c).await;
    c.database_url = db_url;
    let prefix = unique("pipeline");
    let scratch = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = vec![
        ("VIDPIPE_TOPIC_PREFIX", c.topic_prefix.clone()),
        (
            "VIDPIPE_DATABASE_URL",
            c.database_url.expose_secret().to_string(),
        ),
        ("VIDPIPE_STORAGE", format!("s3://{}/{prefix}", s3.bucket)),
        ("VIDPIPE_S3__ENDPOINT", s3.endpoint.clone()),
        ("VIDPIPE_S3__ALLOW_HTTP", "true".into()),
        ("VIDPIPE_S3__ACCESS_KEY_ID", s3.access_key_id.clone()),
        (
            "VIDPIPE_S3__SECRET_ACCESS_KEY",
            s3.secret_access_key.clone(),
        ),
        (
            "VIDPIPE_S3__SCRATCH_DIR",
            scratch.path().display().to_string(),
        ),
        ("VIDPIPE_NET_ALLOW", "127.0.0.1/32".into()),
        ("VIDPIPE_TOPIC_PARTITIONS", "1".into()),
        ("VIDPIPE_RUNNER__COMMIT_INTERVAL_MS", "200".into()),
        ("VIDPIPE_LOG", "debug".into()),
    ];
    let log_path = dir.path().join("run.log");
    let mut run = vidpipe(&env, &["run", "--instance", "s3"]);
    run.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut child = crate::procs::Proc(run.spawn().expect("vidpipe run"));
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    let urls = vec![site.url("media/talk.mp4")];
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        // The child creates the topics; submitting may race it at first.
        match client::submit(&c, &pool, &urls, false, None).await {
            Ok(s) => break s[0].id.clone(),
            Err(e) if Instant::now() < deadline => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "vidpipe run exited: {}",
                    log_tail()
                );
                eprintln!("submit not yet possible: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("submit: {e}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(400);
    let status = loop {
        let all = client::status(&pool, std::slice::from_ref(&id), 1)
            .await
            .unwrap();
        if let Some(v) = all
            .first()
            .filter(|v| v.status == "done" || v.status == "failed")
        {
            break v.clone();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "vidpipe run exited: {}",
            log_tail()
        );
        assert!(
            Instant::now() < deadline,
            "{id} did not finish: {all:#?}\n{}",
            log_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(status.status, "done", "{status:#?}\n{}", log_tail());

    // Every file of the video is in the bucket under its id, none elsewhere.
    let video_dir = format!("{prefix}/{}/g1", safe_name(&id));
    let found = keys(&s3, &prefix).await;
    // (A direct file without an extension in its URL is `media.bin`.)
    assert!(
        found.contains(&format!("{video_dir}/media.bin")),
        "the media is missing from {found:#?}"
    );
    for name in [
        "audio.wav",
        "transcript.txt",
        "transcript.srt",
        "transcript.vtt",
        "transcript.json",
        "summary.md",
        "summary.json",
    ] {
        assert!(
            found.contains(&format!("{video_dir}/{name}")),
            "{name} is missing from {found:#?}"
        );
    }
    for key in &found {
        assert!(
            key.starts_with(&format!("{video_dir}/")) || *key == format!("{prefix}/.vidpipe-probe"),
            "unexpected object {key}"
        );
    }
    // The records point into the bucket, with the objects' sha256.
    let mut s3c = config();
    let reader_scratch = tempfile::tempdir().unwrap();
    use_s3(&mut s3c, &s3, &prefix, reader_scratch.path());
    let store = connect(&s3c, &s3).await;
    let record = client::stage_output(&pool, &id, "transcribe", None)
        .await
        .unwrap()
        .expect("the transcribe run records its output");
    let uri = record["transcript"]["uri"].as_str().unwrap();
    assert_eq!(
        uri,
        format!("s3://{}/{video_dir}/transcript.json", s3.bucket)
    );
    let bytes = store.read(uri).await.unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        record["transcript"]["sha256"].as_str().unwrap()
    );

    // `vidpipe show` reads them from the bucket.
    let shown = output(&env, &["show", &id, "--transcript", "--format", "srt"]);
    let srt = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(srt.contains(" --> "), "an srt transcript: {srt}");
    let heard = srt.to_lowercase();
    assert!(
        ["temperature", "lake", "water"]
            .iter()
            .any(|w| heard.contains(w)),
        "the words of the video: {srt}"
    );
    let shown = output(&env, &["show", &id, "--summary"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert!(shown.stdout.len() > 20, "a summary");

    crate::procs::signal(&child, "TERM");
    let exit = child.wait().unwrap();
    assert!(exit.success(), "vidpipe run exits 0 on SIGTERM, got {exit}");
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "scratch is cleaned up: {left:?}");

    // The secret key shows in no log line and not in `vidpipe config`.
    let printed = output(&env, &["config"]);
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("s3://"), "{printed}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().count() > 20,
        "debug logging produced a log to check"
    );
    for (what, text) in [
        ("vidpipe config", printed.as_ref()),
        ("the run log", log.as_str()),
    ] {
        assert!(
            !text.contains(&s3.secret_access_key),
            "the S3 secret key appears in {what}"
        );
    }
    remove(&s3, &prefix).await;
}
