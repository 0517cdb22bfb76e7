//! The guarded HTTP fetcher and yt-dlp against real local HTTP servers
//! written here (a tokio listener and hand-written HTTP/1.1 responses), so
//! each test can misbehave exactly as a hostile server would: lie about
//! lengths, trickle, redirect to private addresses, send HTML.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use vidpipe::media::egress::Egress;
use vidpipe::media::http::{AddressPolicy, FetchError, FetchLimits, Fetcher, Sites};
use vidpipe::media::ytdlp::{Ytdlp, YtdlpError};
use vidpipe::template::{ErrorClass, StageError};

use crate::helpers;

/// The first line of a request and its method.
struct Request {
    method: String,
    path: String,
}

/// A server on `bind` that hands every request to `handler`; returns its
/// address and the number of connections it accepted.
async fn serve<F, Fut>(bind: &str, handler: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(Request, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {bind}: {e}"));
    let addr = listener.local_addr().expect("listener address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let Some(req) = read_request(&mut stream).await else {
                    return;
                };
                handler(req, stream).await;
            });
        }
    });
    (addr, accepted)
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 || head.len() > 64 << 10 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut first = text.lines().next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    Some(Request { method, path })
}

/// Writes a complete response with a correct Content-Length.
async fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

/// Deterministic bytes that do not look like HTML.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn fetcher(allow: &str, limits: FetchLimits) -> Fetcher {
    let policy = AddressPolicy::parse_allow(allow).expect("allow list parses");
    Fetcher::new(policy, limits).expect("the fetcher builds")
}

fn test_limits() -> FetchLimits {
    FetchLimits {
        deadline: Duration::from_secs(20),
        ..FetchLimits::default()
    }
}

/// Names of the files in `dir`.
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("the directory exists")
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[track_caller]
fn expect_kind(err: FetchError, kind: &str, class: ErrorClass) -> StageError {
    let stage = StageError::from(err);
    assert_eq!(stage.kind, kind, "unexpected error: {stage}");
    assert_eq!(stage.class, class, "unexpected class for {stage}");
    stage
}

#[tokio::test]
async fn normal_file_is_streamed_hashed_and_renamed() {
    let body = Arc::new(pattern(300_000));
    let served = Arc::clone(&body);
    let (addr, _) = serve("127.0.0.1:0", move |_req, mut s| {
        let body = Arc::clone(&served);
        async move { respond(&mut s, "200 OK", &[("Content-Type", "audio/mpeg")], &body).await }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let dest = dir.path().join("media.mp3");
    let got = fetcher("127.0.0.1/32", test_limits())
        .fetch_to_file(
            &format!("http://{addr}/a.mp3?sig=abc"),
            &dest,
            &CancellationToken::new(),
        )
        .await
        .expect("the file downloads");
    assert_eq!(got.bytes, body.len() as u64);
    assert_eq!(got.sha256, sha256_hex(&body));
    assert_eq!(got.content_type.as_deref(), Some("audio/mpeg"));
    assert_eq!(got.final_url.path(), "/a.mp3");
    assert_eq!(std::fs::read(&dest).expect("dest exists"), *body);
    assert_eq!(files_in(dir.path()), vec!["media.mp3".to_owned()]);
}

#[tokio::test]
async fn relative_redirect_is_followed_and_credentials_stay_out() {
    let body = pattern(1000);
    let (addr, _) = serve("127.0.0.1:0", move |req, mut s| {
        let body = body.clone();
        async move {
            match req.path.as_str() {
                "/start" => respond(&mut s, "302 Found", &[("Location", "/file.mp3")], b"").await,
                "/file.mp3" => respond(&mut s, "200 OK", &[], &body).await,
                _ => respond(&mut s, "404 Not Found", &[], b"").await,
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher("127.0.0.1/32", test_limits());
    let got = f
        .fetch_to_file(
            &format!("http://user:hunter2@{addr}/start"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect("the redirect is followed");
    assert_eq!(got.final_url.path(), "/file.mp3");
    assert_eq!(got.bytes, 1000);
    assert!(!got.final_url.as_str().contains("hunter2"));

    let err = f
        .fetch_to_file(
            &format!("http://user:hunter2@{addr}/missing?token=hunter3"),
            &dir.path().join("x.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("404");
    let stage = expect_kind(err, "http_404", ErrorClass::Permanent);
    assert!(
        !stage.message.contains("hunter2") && !stage.message.contains("hunter3"),
        "the message leaks credentials: {}",
        stage.message
    );
}

#[tokio::test]
async fn not_found_is_permanent_and_leaves_nothing() {
    let (addr, _) = serve("127.0.0.1:0", |_req, mut s| async move {
        respond(
            &mut s,
            "404 Not Found",
            &[("Content-Type", "text/plain")],
            b"no",
        )
        .await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let err = fetcher("127.0.0.1/32", test_limits())
        .fetch_to_file(
            &format!("http://{addr}/gone.mp3"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("a 404 fails");
    expect_kind(err, "http_404", ErrorClass::Permanent);
    assert!(files_in(dir.path()).is_empty());
}

#[tokio::test]
async fn server_errors_are_retryable() {
    let (addr, _) = serve("127.0.0.1:0", |_req, mut s| async move {
        respond(&mut s, "503 Service Unavailable", &[], b"busy").await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let err = fetcher("127.0.0.1/32", test_limits())
        .fetch_to_file(
            &format!("http://{addr}/a.mp3"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("a 503 fails");
    expect_kind(err, "http_503", ErrorClass::Retryable);
}

#[tokio::test]
async fn html_and_playlists_are_not_media() {
    let (addr, _) = serve("127.0.0.1:0", |req, mut s| async move {
        match req.path.as_str() {
            "/typed" => {
                respond(
                    &mut s,
                    "200 OK",
                    &[("Content-Type", "text/html; charset=utf-8")],
                    b"<p>hi</p>",
                )
                .await
            }
            "/sniffed" => {
                let mut page = b"\r\n  <!DOCTYPE html>\n<html><body>".to_vec();
                page.extend(std::iter::repeat_n(b'x', 5000));
                respond(
                    &mut s,
                    "200 OK",
                    &[("Content-Type", "application/octet-stream")],
                    &page,
                )
                .await
            }
            "/short" => respond(&mut s, "200 OK", &[], b"<HTML>").await,
            _ => {
                respond(
                    &mut s,
                    "200 OK",
                    &[("Content-Type", "audio/mpeg")],
                    b"#EXTM3U\n#EXTINF:10,\nhttp://10.0.0.1/a.mp3\n",
                )
                .await
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher("127.0.0.1/32", test_limits());
    for path in ["/typed", "/sniffed", "/short", "/playlist"] {
        let err = f
            .fetch_to_file(
                &format!("http://{addr}{path}"),
                &dir.path().join("m.mp3"),
                &CancellationToken::new(),
            )
            .await
            .expect_err("not media");
        let stage = expect_kind(err, "not_media", ErrorClass::Permanent);
        assert!(
            stage.message.contains("not a media file"),
            "{path}: {}",
            stage.message
        );
        assert!(files_in(dir.path()).is_empty(), "{path} left a file");
    }
}

/// Writes `total` bytes in 16 KiB chunks with chunked encoding and the
/// given extra headers, stopping when the client goes away.
async fn chunked(s: &mut TcpStream, extra: &str, total: usize) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\n{extra}Transfer-Encoding: chunked\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = pattern(16 << 10);
    let mut sent = 0;
    while sent < total {
        let frame = [
            format!("{:x}\r\n", chunk.len()).into_bytes(),
            chunk.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        if s.write_all(&frame).await.is_err() {
            return;
        }
        sent += chunk.len();
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
}

#[tokio::test]
async fn byte_cap_holds_whatever_the_headers_say() {
    let (addr, _) = serve("127.0.0.1:0", move |req, mut s| async move {
        match req.path.as_str() {
            // A false, small Content-Length beside chunked encoding (which
            // takes precedence): the body is 4 MiB.
            "/lying" => chunked(&mut s, "Content-Length: 100\r\n", 4 << 20).await,
            // No length at all, body delimited by the connection's end.
            "/unsized" => {
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nConnection: close\r\n\r\n",
                    )
                    .await;
                let chunk = pattern(16 << 10);
                for _ in 0..256 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            }
            // An honest length over the cap: refused before the body.
            _ => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n")
                    .await;
                let _ = s.write_all(&pattern(1000)).await;
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher(
        "127.0.0.1/32",
        FetchLimits {
            max_bytes: 64 << 10,
            ..test_limits()
        },
    );
    for path in ["/lying", "/unsized", "/declared"] {
        let started = Instant::now();
        let err = f
            .fetch_to_file(
                &format!("http://{addr}{path}"),
                &dir.path().join("m.mp3"),
                &CancellationToken::new(),
            )
            .await
            .expect_err("over the cap");
        let stage = expect_kind(err, "too_large", ErrorClass::Permanent);
        if path == "/declared" {
            assert!(
                stage.message.contains("Content-Length 10485760"),
                "{}",
                stage.message
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} was not stopped at the cap"
        );
        assert!(files_in(dir.path()).is_empty(), "{path} left a file");
    }
}

/// Sends headers, then `bytes` bytes every `every`, for up to a minute.
async fn trickle(s: &mut TcpStream, bytes: usize, every: Duration) {
    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let chunk = pattern(bytes);
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if s.write_all(&chunk).await.is_err() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

#[tokio::test]
async fn trickling_server_is_too_slow() {
    let (addr, _) = serve("127.0.0.1:0", |_req, mut s| async move {
        // 100 B/s against a minimum of 1 KiB/s.
        trickle(&mut s, 10, Duration::from_millis(100)).await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher(
        "127.0.0.1/32",
        FetchLimits {
            min_bytes_per_sec: 1024,
            rate_window: Duration::from_secs(1),
            ..test_limits()
        },
    );
    let started = Instant::now();
    let err = f
        .fetch_to_file(
            &format!("http://{addr}/slow.mp3"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("too slow");
    expect_kind(err, "too_slow", ErrorClass::Retryable);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(files_in(dir.path()).is_empty());
}

#[tokio::test]
async fn silent_server_times_out_waiting_for_headers() {
    let (addr, _) = serve("127.0.0.1:0", |_req, s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher(
        "127.0.0.1/32",
        FetchLimits {
            rate_window: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            ..test_limits()
        },
    );
    let started = Instant::now();
    let err = f
        .fetch_to_file(
            &format!("http://{addr}/a.mp3"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("no headers");
    expect_kind(err, "timeout", ErrorClass::Retryable);
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn cancellation_stops_the_download_and_removes_the_partial_file() {
    let (addr, _) = serve("127.0.0.1:0", |_req, mut s| async move {
        trickle(&mut s, 64 << 10, Duration::from_millis(50)).await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        trigger.cancel();
    });
    let f = fetcher("127.0.0.1/32", test_limits());
    let started = Instant::now();
    let err = f
        .fetch_to_file(
            &format!("http://{addr}/long.mp3"),
            &dir.path().join("m.mp3"),
            &cancel,
        )
        .await
        .expect_err("cancelled");
    expect_kind(err, "cancelled", ErrorClass::Retryable);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        files_in(dir.path()).is_empty(),
        "left {:?}",
        files_in(dir.path())
    );
}

#[tokio::test]
async fn redirects_to_blocked_addresses_are_refused() {
    // The second server is on 127.0.0.2, outside the allow list: if the
    // guard failed, it would see a connection.
    let (target, target_hits) = serve("127.0.0.2:0", |_req, mut s| async move {
        respond(&mut s, "200 OK", &[], &pattern(100)).await
    })
    .await;
    let (entry, _) = serve("127.0.0.1:0", move |req, mut s| async move {
        let location = match req.path.as_str() {
            "/metadata" => "http://169.254.169.254/latest/meta-data/".to_owned(),
            "/loopback" => format!("http://{target}/x.mp3"),
            "/mapped" => format!("http://[::ffff:127.0.0.2]:{}/x.mp3", target.port()),
            "/ftp" => "ftp://127.0.0.1/x.mp3".to_owned(),
            _ => "/loop".to_owned(),
        };
        respond(&mut s, "302 Found", &[("Location", &location)], b"").await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher(
        "127.0.0.1/32",
        FetchLimits {
            connect_timeout: Duration::from_secs(2),
            ..test_limits()
        },
    );
    for (path, kind) in [
        ("/metadata", "blocked_address"),
        ("/loopback", "blocked_address"),
        ("/mapped", "blocked_address"),
        ("/ftp", "bad_url"),
        ("/loop", "too_many_redirects"),
    ] {
        let started = Instant::now();
        let err = f
            .fetch_to_file(
                &format!("http://{entry}{path}"),
                &dir.path().join("m.mp3"),
                &CancellationToken::new(),
            )
            .await
            .expect_err("refused");
        expect_kind(err, kind, ErrorClass::Permanent);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{path} tried to connect"
        );
    }
    assert_eq!(
        target_hits.load(Ordering::SeqCst),
        0,
        "the blocked server was reached"
    );
    assert!(files_in(dir.path()).is_empty());

    // Without the allow list, the entry server itself is refused.
    let strict = Fetcher::new(AddressPolicy::strict(), test_limits()).expect("fetcher");
    let err = strict
        .fetch_to_file(
            &format!("http://{entry}/metadata"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("refused");
    expect_kind(err, "blocked_address", ErrorClass::Permanent);
}

#[tokio::test]
async fn names_resolving_to_blocked_addresses_are_refused_before_connecting() {
    let (addr, hits) = serve("127.0.0.1:0", |_req, mut s| async move {
        respond(&mut s, "200 OK", &[], &pattern(100)).await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let strict = Fetcher::new(AddressPolicy::strict(), test_limits()).expect("fetcher");
    let err = strict
        .fetch_to_file(
            &format!("http://localhost:{}/a.mp3", addr.port()),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("localhost is blocked");
    let stage = expect_kind(err, "blocked_address", ErrorClass::Permanent);
    assert!(stage.message.contains("localhost"), "{}", stage.message);
    let err = strict
        .get_text(&format!("http://localhost:{}/feed", addr.port()), 1 << 20)
        .await
        .expect_err("localhost is blocked for feeds too");
    expect_kind(err, "blocked_address", ErrorClass::Permanent);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the server was reached");
}

#[tokio::test]
async fn literal_private_addresses_are_refused_without_connecting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let strict = Fetcher::new(AddressPolicy::strict(), test_limits()).expect("fetcher");
    for url in [
        "http://10.0.0.1/a.mp3",
        "https://10.0.0.1/a.mp3",
        "http://[::ffff:10.0.0.1]/a.mp3",
        "http://0x7f.1/a.mp3",
        "http://2130706433/a.mp3",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:80/",
    ] {
        let started = Instant::now();
        let err = strict
            .fetch_to_file(url, &dir.path().join("m.mp3"), &CancellationToken::new())
            .await
            .expect_err("blocked");
        expect_kind(err, "blocked_address", ErrorClass::Permanent);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{url} took {:?}: it tried to connect",
            started.elapsed()
        );
    }
    assert!(files_in(dir.path()).is_empty());

    // The policy itself, for the ranges the issue names.
    for ip in [
        "10.0.0.1",
        "169.254.169.254",
        "fd00:ec2::254",
        "::ffff:192.168.1.1",
        "100.64.1.1",
    ] {
        let ip = ip.parse().expect("address");
        assert!(
            AddressPolicy::strict().check(ip).is_err(),
            "{ip} must be blocked"
        );
    }
    assert!(
        AddressPolicy::strict()
            .check("1.1.1.1".parse().expect("ip"))
            .is_ok()
    );
}

#[tokio::test]
async fn bad_urls_are_refused_and_create_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher("127.0.0.1/32", test_limits());
    for url in [
        "-o/tmp/pwned",
        "--exec=touch /tmp/pwned",
        "http://example.com/a b.mp3",
        "http://example.com/a.mp3\n",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "not a url",
        "",
    ] {
        let err = f
            .fetch_to_file(url, &dir.path().join("m.mp3"), &CancellationToken::new())
            .await
            .expect_err("bad URL");
        expect_kind(err, "bad_url", ErrorClass::Permanent);
    }
    assert!(files_in(dir.path()).is_empty());
}

#[tokio::test]
async fn too_many_requests_carries_retry_after() {
    let (addr, _) = serve("127.0.0.1:0", |req, mut s| async move {
        let retry_after = if req.path == "/date" {
            let when = chrono::Utc::now() + chrono::Duration::seconds(30);
            when.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
        } else {
            "2".to_owned()
        };
        respond(
            &mut s,
            "429 Too Many Requests",
            &[("Retry-After", &retry_after)],
            b"slow down",
        )
        .await
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let f = fetcher("127.0.0.1/32", test_limits());
    let err = f
        .fetch_to_file(
            &format!("http://{addr}/a.mp3"),
            &dir.path().join("m.mp3"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("429");
    let stage = expect_kind(err, "rate_limited", ErrorClass::Retryable);
    assert_eq!(stage.retry_after, Some(Duration::from_secs(2)));

    let err = f
        .get_text(&format!("http://{addr}/date"), 1 << 20)
        .await
        .expect_err("429");
    let stage = expect_kind(err, "rate_limited", ErrorClass::Retryable);
    let after = stage
        .retry_after
        .expect("an HTTP-date Retry-After is honoured");
    assert!(
        after >= Duration::from_secs(27) && after <= Duration::from_secs(31),
        "retry after {after:?}"
    );
}

const FEED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Local feed</title><link>http://example.com/</link>
<description>d</description>
<item><title>Episode 1</title><guid>g1</guid><pubDate>Mon, 01 Jan 2024 10:00:00 GMT</pubDate>
<enclosure url="ENCLOSURE" length="8000" type="audio/mpeg"/></item>
<item><title>Episode 2</title><guid>g2</guid>
<enclosure url="ENCLOSURE?2" length="8000" type="audio/mpeg"/></item>
</channel></rss>
"#;

#[tokio::test]
async fn get_text_reads_a_feed_under_the_same_guards() {
    let (addr, _) = serve("127.0.0.1:0", |req, mut s| async move {
        if req.path == "/old-feed" {
            respond(
                &mut s,
                "301 Moved Permanently",
                &[("Location", "/feed.xml")],
                b"",
            )
            .await
        } else {
            respond(
                &mut s,
                "200 OK",
                &[("Content-Type", "application/rss+xml; charset=utf-8")],
                FEED.as_bytes(),
            )
            .await
        }
    })
    .await;
    let f = fetcher("127.0.0.1/32", test_limits());
    let (text, content_type) = f
        .get_text(&format!("http://{addr}/old-feed"), 1 << 20)
        .await
        .expect("the feed downloads");
    assert_eq!(text, FEED);
    assert_eq!(
        content_type.as_deref(),
        Some("application/rss+xml; charset=utf-8")
    );

    let err = f
        .get_text(&format!("http://{addr}/feed.xml"), 100)
        .await
        .expect_err("over the cap");
    expect_kind(err, "too_large", ErrorClass::Permanent);
    let err = f.get_text("-feed", 100).await.expect_err("bad URL");
    expect_kind(err, "bad_url", ErrorClass::Permanent);
}

#[tokio::test]
async fn sites_limit_concurrency_and_cool_down() {
    let sites = Sites::new(1);
    let first = sites.enter("Media.Example").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sites.enter("media.example"))
            .await
            .is_err(),
        "a second download from the same host must wait"
    );
    // Another host is not held up.
    let other = tokio::time::timeout(Duration::from_millis(200), sites.enter("other.example"))
        .await
        .expect("another host has its own slot");
    drop(first);
    let again = tokio::time::timeout(Duration::from_millis(200), sites.enter("media.example"))
        .await
        .expect("the slot is free again");
    drop(again);
    drop(other);

    sites.cool_down("media.example", Duration::from_millis(600));
    let started = Instant::now();
    let _permit = sites.enter("media.example").await;
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "the cool-down was not honoured ({:?})",
        started.elapsed()
    );
}

// ---- yt-dlp -------------------------------------------------------------

/// A one-second 440 Hz MP3 made by ffmpeg.
fn sine_mp3(dir: &Path) -> PathBuf {
    let out = dir.join("sine.mp3");
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg("sine=frequency=440:duration=1")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("ffmpeg is required for this test and could not start: {e}"));
    assert!(
        status.success(),
        "ffmpeg failed to make a test MP3: {status}"
    );
    out
}

/// Serves `file` at every path except `/missing` (404) and `/stall` (never
/// answers); `/feed.xml` is [`FEED`] with enclosures pointing at the file.
async fn media_server(file: Vec<u8>) -> SocketAddr {
    let file = Arc::new(file);
    let (addr, _) = serve("127.0.0.1:0", move |req, mut s| {
        let file = Arc::clone(&file);
        async move {
            let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            match req.path.as_str() {
                "/missing.mp3" => respond(&mut s, "404 Not Found", &[], b"").await,
                "/stall.mp3" => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                // A live HLS stream: a media playlist without an end.
                "/live.m3u8" => {
                    let playlist = format!(
                        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:7\n\
                         #EXTINF:2.0,\nhttp://127.0.0.1:{port}/seg7.ts\n#EXTINF:2.0,\nhttp://127.0.0.1:{port}/seg8.ts\n"
                    );
                    respond(&mut s, "200 OK", &[("Content-Type", "application/vnd.apple.mpegurl")], playlist.as_bytes())
                        .await
                }
                "/feed.xml" => {
                    let feed = FEED.replace("ENCLOSURE", &format!("http://127.0.0.1:{port}/ep.mp3"));
                    respond(&mut s, "200 OK", &[("Content-Type", "application/rss+xml")], feed.as_bytes())
                        .await
                }
                _ if req.method == "HEAD" => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        file.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                }
                _ => respond(&mut s, "200 OK", &[("Content-Type", "audio/mpeg")], &file).await,
            }
        }
    })
    .await;
    addr
}

fn ytdlp(max_bytes: u64, timeout: Duration) -> Ytdlp {
    let exe = helpers::config().ytdlp;
    let probe = std::process::Command::new(&exe).arg("--version").output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "yt-dlp is required at {exe:?} (the `ytdlp` setting; scripts/stack up installs it): {other:?}"
        ),
    }
    Ytdlp::new(exe, max_bytes, timeout)
}

#[track_caller]
fn expect_ytdlp_kind(err: YtdlpError, kind: &str, class: ErrorClass) {
    let stage = StageError::from(err);
    assert_eq!(stage.kind, kind, "unexpected error: {stage}");
    assert_eq!(stage.class, class, "unexpected class for {stage}");
}

fn media_files(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    files_in(dir)
        .into_iter()
        .filter(|n| n.starts_with("media."))
        .collect()
}

#[tokio::test]
async fn ytdlp_downloads_a_local_file() {
    let work = tempfile::tempdir().expect("temp dir");
    let mp3 = std::fs::read(sine_mp3(work.path())).expect("the MP3 exists");
    let addr = media_server(mp3.clone()).await;
    let dir = work.path().join("download");
    let got = ytdlp(10 << 20, Duration::from_secs(60))
        .download(
            &format!("http://{addr}/sine.mp3"),
            &dir,
            &CancellationToken::new(),
        )
        .await
        .expect("yt-dlp downloads a direct media URL");
    let dir = dir.canonicalize().expect("the directory exists");
    assert_eq!(got.path, dir.join("media.mp3"));
    assert_eq!(got.bytes, mp3.len() as u64);
    assert_eq!(std::fs::read(&got.path).expect("the file exists"), mp3);
    assert_eq!(got.extractor.as_deref(), Some("generic"));
    assert_eq!(got.id.as_deref(), Some("sine"));
    assert_eq!(media_files(&dir), vec!["media.mp3".to_owned()]);
}

#[tokio::test]
async fn ytdlp_failures_are_classified_and_clean_up() {
    let work = tempfile::tempdir().expect("temp dir");
    let mp3 = std::fs::read(sine_mp3(work.path())).expect("the MP3 exists");
    let addr = media_server(mp3).await;
    let dir = work.path().join("download");

    let err = ytdlp(1000, Duration::from_secs(60))
        .download(
            &format!("http://{addr}/sine.mp3"),
            &dir,
            &CancellationToken::new(),
        )
        .await
        .expect_err("over the cap");
    expect_ytdlp_kind(err, "too_large", ErrorClass::Permanent);
    assert!(media_files(&dir).is_empty(), "left {:?}", media_files(&dir));

    let err = ytdlp(10 << 20, Duration::from_secs(60))
        .download(
            &format!("http://{addr}/missing.mp3"),
            &dir,
            &CancellationToken::new(),
        )
        .await
        .expect_err("404");
    expect_ytdlp_kind(err, "http_404", ErrorClass::Permanent);

    let started = Instant::now();
    let err = ytdlp(10 << 20, Duration::from_secs(3))
        .download(
            &format!("http://{addr}/stall.mp3"),
            &dir,
            &CancellationToken::new(),
        )
        .await
        .expect_err("timeout");
    expect_ytdlp_kind(err, "timeout", ErrorClass::Retryable);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );

    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let err = ytdlp(10 << 20, Duration::from_secs(60))
        .download(&format!("http://{addr}/stall.mp3"), &dir, &cancel)
        .await
        .expect_err("cancelled");
    expect_ytdlp_kind(err, "cancelled", ErrorClass::Retryable);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    assert!(media_files(&dir).is_empty());
}

#[tokio::test]
async fn ytdlp_refuses_a_live_stream_with_a_reason() {
    let work = tempfile::tempdir().expect("temp dir");
    let addr = media_server(Vec::new()).await;
    let dir = work.path().join("download");
    let err = ytdlp(10 << 20, Duration::from_secs(60))
        .download(
            &format!("http://{addr}/live.m3u8"),
            &dir,
            &CancellationToken::new(),
        )
        .await
        .expect_err("a live stream");
    assert!(err.to_string().contains("live stream"), "{err}");
    expect_ytdlp_kind(err, "live_stream", ErrorClass::Permanent);
    assert!(media_files(&dir).is_empty(), "left {:?}", media_files(&dir));
}

/// Whether `pid` is gone (or a zombie nobody reaped yet: dead all the same).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn ytdlp_is_stopped_with_every_process_it_started() {
    // An executable in yt-dlp's place that starts a child of its own and
    // waits, as yt-dlp does with the ffmpeg it hands a stream to.
    let work = tempfile::tempdir().expect("temp dir");
    let pid_file = work.path().join("child.pid");
    let exe = work.path().join("yt-dlp");
    crate::helpers::script(
        &exe,
        &format!(
            "#!/bin/sh\nsleep 600 &\necho $! > '{}'\nwait\n",
            pid_file.display()
        ),
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watched = pid_file.clone();
    tokio::spawn(async move {
        // Cancel once the child is running.
        while !watched.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let err = Ytdlp::new(&exe, 10 << 20, Duration::from_secs(60))
        .download("https://example.com/v", &work.path().join("d"), &cancel)
        .await
        .expect_err("cancelled");
    expect_ytdlp_kind(err, "cancelled", ErrorClass::Retryable);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the child's pid")
        .trim()
        .parse()
        .expect("a pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !gone(pid) {
        // Do not leave it behind whatever the outcome.
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        panic!("the child {pid} of the stopped yt-dlp is still running");
    }
}

/// yt-dlp behind the egress proxy, with `allow` exempted from its policy.
async fn guarded_ytdlp(allow: &str) -> Ytdlp {
    let policy = AddressPolicy::parse_allow(allow).expect("allow list");
    let egress = Egress::start(policy, Duration::from_secs(60))
        .await
        .expect("the egress proxy starts");
    ytdlp(10 << 20, Duration::from_secs(60)).with_egress(Arc::new(egress))
}

/// The proxy's secret reaches yt-dlp in its environment, which only its
/// own user can read, and never on its command line, which every local
/// user can (`/proc/PID/cmdline`).
#[tokio::test]
async fn ytdlp_gets_the_proxy_secret_in_its_environment_not_its_arguments() {
    let work = tempfile::tempdir().expect("temp dir");
    let (args, env) = (work.path().join("args"), work.path().join("env"));
    let exe = work.path().join("yt-dlp");
    crate::helpers::script(
        &exe,
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\nenv > '{}'\nexit 1\n",
            args.display(),
            env.display()
        ),
    );
    let egress = Arc::new(
        Egress::start(AddressPolicy::strict(), Duration::from_secs(30))
            .await
            .expect("the egress proxy starts"),
    );
    let secret = url::Url::parse(&egress.proxy_url())
        .unwrap()
        .password()
        .expect("the proxy URL has a secret")
        .to_string();
    assert!(secret.len() >= 32, "{secret}");
    let _ = Ytdlp::new(&exe, 10 << 20, Duration::from_secs(30))
        .with_egress(Arc::clone(&egress))
        .list("https://www.youtube.com/@someone", 5)
        .await
        .expect_err("the stand-in fails");
    let args = std::fs::read_to_string(&args).expect("the arguments were written");
    let env = std::fs::read_to_string(&env).expect("the environment was written");
    assert!(!args.contains(&secret), "{args}");
    assert!(!args.contains("--proxy"), "{args}");
    for name in vidpipe::media::ytdlp::PROXY_VARIABLES {
        assert!(
            env.lines()
                .any(|l| l == format!("{name}={}", egress.proxy_url())),
            "{name} missing: {env}"
        );
    }
    assert!(!env.to_ascii_lowercase().contains("no_proxy"), "{env}");
}

#[tokio::test]
async fn ytdlp_behind_the_egress_proxy_downloads_from_an_allowed_address() {
    let work = tempfile::tempdir().expect("temp dir");
    let mp3 = std::fs::read(sine_mp3(work.path())).expect("the MP3 exists");
    let addr = media_server(mp3.clone()).await;
    let got = guarded_ytdlp("127.0.0.1/32")
        .await
        .download(
            &format!("http://{addr}/sine.mp3"),
            &work.path().join("download"),
            &CancellationToken::new(),
        )
        .await
        .expect("a download through the proxy");
    assert_eq!(std::fs::read(&got.path).expect("the file exists"), mp3);
}

/// A site on 127.0.0.1 whose every page redirects to `target`: the URL
/// of one of its pages.
async fn redirecting_site(target: String) -> String {
    let (site, _) = serve("127.0.0.1:0", move |_, mut s| {
        let target = target.clone();
        async move { respond(&mut s, "302 Found", &[("Location", target.as_str())], b"").await }
    })
    .await;
    format!("http://{site}/video.mp3")
}

#[tokio::test]
async fn ytdlp_led_to_a_private_address_is_stopped_by_the_egress_proxy() {
    // The internal service: loopback 127.0.0.2, not exempted.
    let (internal, hits) = serve("127.0.0.2:0", |_, mut s| async move {
        respond(
            &mut s,
            "200 OK",
            &[("Content-Type", "audio/mpeg")],
            b"internal",
        )
        .await
    })
    .await;
    // The site (exempted, like a public one) redirects there.
    let url = redirecting_site(format!("http://{internal}/secret.mp3")).await;
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("download");
    let err = guarded_ytdlp("127.0.0.1/32")
        .await
        .download(&url, &dir, &CancellationToken::new())
        .await
        .expect_err("the redirect leads to a blocked address");
    expect_ytdlp_kind(err, "blocked_address", ErrorClass::Permanent);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the internal server was reached"
    );
    assert!(media_files(&dir).is_empty());
    // The premise: yt-dlp on its own follows that redirect.
    ytdlp(10 << 20, Duration::from_secs(60))
        .download(&url, &dir, &CancellationToken::new())
        .await
        .expect("without the proxy yt-dlp fetches the internal file");
    assert!(hits.load(Ordering::SeqCst) > 0);
}

/// A redirect to `ftp://` on a blocked address: the proxy variables cover
/// every scheme (`all_proxy`), so nothing connects past the proxy.
#[tokio::test]
async fn ytdlp_led_to_an_ftp_address_connects_nowhere() {
    let listener = TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let internal = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let url = redirecting_site(format!("ftp://{internal}/secret.mp3")).await;
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("download");
    guarded_ytdlp("127.0.0.1/32")
        .await
        .download(&url, &dir, &CancellationToken::new())
        .await
        .expect_err("the redirect leads nowhere it may go");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the ftp address was reached"
    );
    // The premise: yt-dlp on its own follows that redirect.
    let _ = ytdlp(10 << 20, Duration::from_secs(60))
        .download(&url, &dir, &CancellationToken::new())
        .await;
    assert!(
        hits.load(Ordering::SeqCst) > 0,
        "without the proxy yt-dlp connects to the ftp address"
    );
}

/// `head` with the `Proxy-Authorization` of `egress` after its request
/// line (the proxy serves nobody without it).
fn authed(egress: &Egress, head: &str) -> String {
    let url = url::Url::parse(&egress.proxy_url()).expect("the proxy URL parses");
    let credentials = format!("{}:{}", url.username(), url.password().unwrap_or_default());
    let value = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials);
    let (line, rest) = head.split_once("\r\n").expect("a request line");
    format!("{line}\r\nProxy-Authorization: Basic {value}\r\n{rest}")
}

/// Sends `head` to the proxy at `proxy` and returns what it answered
/// before closing (for a tunnel: after `then` was sent through it).
async fn through_proxy(proxy: &str, head: &str, then: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.expect("the proxy listens");
    s.write_all(head.as_bytes()).await.expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The proxy's own answer first: up to the end of its head.
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got.starts_with(b"HTTP/1.1 200 Connection established") {
        s.write_all(then).await.expect("send through the tunnel");
    }
    s.read_to_end(&mut got).await.expect("read to the end");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn the_egress_proxy_tunnels_and_forwards_to_allowed_addresses_only() {
    let (allowed, allowed_hits) = serve("127.0.0.1:0", |req, mut s| async move {
        respond(
            &mut s,
            "200 OK",
            &[],
            format!("reached {}", req.path).as_bytes(),
        )
        .await
    })
    .await;
    let (blocked, hits) = serve("127.0.0.2:0", |_, mut s| async move {
        respond(&mut s, "200 OK", &[], b"internal").await
    })
    .await;
    let egress = Egress::start(
        AddressPolicy::parse_allow("127.0.0.1/32").expect("allow list"),
        Duration::from_secs(30),
    )
    .await
    .expect("the egress proxy starts");
    let proxy = egress.address().to_string();

    let tunnel = through_proxy(
        &proxy,
        &authed(
            &egress,
            &format!("CONNECT {allowed} HTTP/1.1\r\nHost: {allowed}\r\n\r\n"),
        ),
        b"GET /in-tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        tunnel.starts_with("HTTP/1.1 200 Connection established"),
        "{tunnel}"
    );
    assert!(tunnel.ends_with("reached /in-tunnel"), "{tunnel}");

    let forwarded = through_proxy(
        &proxy,
        &authed(&egress, &format!("GET http://{allowed}/plain?q=1 HTTP/1.1\r\nHost: {allowed}\r\nProxy-Connection: keep-alive\r\n\r\n")),
        b"",
    )
    .await;
    assert!(forwarded.ends_with("reached /plain?q=1"), "{forwarded}");

    for head in [
        format!("CONNECT {blocked} HTTP/1.1\r\n\r\n"),
        format!("GET http://{blocked}/x HTTP/1.1\r\nHost: {blocked}\r\n\r\n"),
    ] {
        let refused =
            through_proxy(&proxy, &authed(&egress, &head), b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(
            refused.starts_with("HTTP/1.1 403 Blocked by vidpipe egress policy"),
            "{head:?}: {refused}"
        );
        assert!(refused.contains("loopback"), "{refused}");
    }
    // Without the proxy's secret (none, a wrong one, or two headers): 407,
    // and nothing is reached.
    let before = allowed_hits.load(Ordering::SeqCst);
    let good = authed(&egress, &format!("CONNECT {allowed} HTTP/1.1\r\n\r\n"));
    let auth_line = good.lines().nth(1).unwrap().to_string();
    for head in [
        format!("CONNECT {allowed} HTTP/1.1\r\n\r\n"),
        format!("GET http://{allowed}/x HTTP/1.1\r\nHost: {allowed}\r\n\r\n"),
        format!(
            "CONNECT {allowed} HTTP/1.1\r\nProxy-Authorization: Basic dmlkcGlwZTp3cm9uZw==\r\n\r\n"
        ),
        format!("CONNECT {allowed} HTTP/1.1\r\n{auth_line}\r\n{auth_line}\r\n\r\n"),
    ] {
        let refused = through_proxy(&proxy, &head, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(
            refused.starts_with("HTTP/1.1 407 Proxy Authentication Required"),
            "{head:?}: {refused}"
        );
    }
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        before,
        "reached without the secret"
    );
    // A name is resolved and its answers checked too (nothing exempted).
    let strict_egress = Egress::start(AddressPolicy::strict(), Duration::from_secs(30))
        .await
        .expect("the egress proxy starts");
    let strict = strict_egress.address().to_string();
    let before = allowed_hits.load(Ordering::SeqCst);
    for head in [
        format!("CONNECT localhost:{} HTTP/1.1\r\n\r\n", allowed.port()),
        format!("GET http://localhost:{}/x HTTP/1.1\r\n\r\n", allowed.port()),
    ] {
        let refused = through_proxy(
            &strict,
            &authed(&strict_egress, &head),
            b"GET / HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(
            refused.starts_with("HTTP/1.1 403 Blocked by vidpipe egress policy"),
            "{head:?}: {refused}"
        );
        assert!(refused.contains("loopback"), "{refused}");
    }
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        before,
        "connected anyway"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the blocked server was reached"
    );
}

/// A playlist yt-dlp cannot download natively (SAMPLE-AES) would go to
/// ffmpeg, whose HLS demuxer opens an `httpproxy://` segment itself: a TCP
/// connection to any address, past the egress proxy. yt-dlp gets no ffmpeg,
/// so the run fails and nothing connects.
#[tokio::test]
async fn ytdlp_hands_no_stream_to_an_ffmpeg_that_would_bypass_the_proxy() {
    let (internal, hits) = serve("127.0.0.2:0", |_, mut s| async move {
        respond(&mut s, "200 OK", &[], b"internal").await
    })
    .await;
    let (site, _) = serve("127.0.0.1:0", move |req, mut s| async move {
        let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
        let playlist = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n\
             #EXT-X-KEY:METHOD=SAMPLE-AES,URI=\"http://127.0.0.1:{port}/key\"\n\
             #EXTINF:2.0,\nhttpproxy://{internal}/x.ts\n#EXT-X-ENDLIST\n"
        );
        match req.path.as_str() {
            "/vod.m3u8" => {
                let mpegurl = [("Content-Type", "application/vnd.apple.mpegurl")];
                respond(&mut s, "200 OK", &mpegurl, playlist.as_bytes()).await
            }
            _ => respond(&mut s, "200 OK", &[], b"0123456789abcdef").await,
        }
    })
    .await;
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("download");
    guarded_ytdlp("127.0.0.1/32")
        .await
        .download(
            &format!("http://{site}/vod.m3u8"),
            &dir,
            &CancellationToken::new(),
        )
        .await
        .expect_err("no ffmpeg to hand the stream to");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "something connected to {internal}"
    );
    assert!(media_files(&dir).is_empty());
}

/// One plain-http request per proxy connection: a second one sent on it
/// (for another host, say) never reaches the first request's server.
#[tokio::test]
async fn the_egress_proxy_forwards_one_request_and_its_body_per_connection() {
    // A server that answers with everything it received in 500 ms.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let upstream = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let until = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                respond(&mut s, "200 OK", &[], &got).await;
            });
        }
    });
    let egress = Egress::start(
        AddressPolicy::parse_allow("127.0.0.1/32").expect("allow list"),
        Duration::from_secs(30),
    )
    .await
    .expect("the egress proxy starts");
    let proxy = egress.address().to_string();
    let mut s = TcpStream::connect(&proxy).await.expect("the proxy listens");
    let two = format!(
        "POST http://{upstream}/one HTTP/1.1\r\nHost: {upstream}\r\nContent-Length: 4\r\n\r\nbody\
         GET http://example.com/two HTTP/1.1\r\nHost: example.com\r\n\r\n"
    );
    s.write_all(authed(&egress, &two).as_bytes())
        .await
        .expect("send");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    assert!(got.contains("POST /one HTTP/1.1\r\n"), "{got}");
    assert!(got.contains("Connection: close\r\n\r\nbody"), "{got}");
    assert!(
        !got.contains("two"),
        "a second request was forwarded: {got}"
    );
}

#[tokio::test]
async fn ytdlp_refuses_option_like_urls_without_spawning() {
    // A missing executable: had anything been spawned, the error would be
    // `ytdlp_unavailable`, not `bad_url`.
    let y = Ytdlp::new("/nonexistent/yt-dlp", 1 << 20, Duration::from_secs(5));
    let dir = tempfile::tempdir().expect("temp dir");
    for url in [
        "-o/tmp/pwned",
        "--exec=touch /tmp/pwned",
        "file:///etc/passwd",
        "http://a b/",
    ] {
        let err = y
            .download(url, dir.path(), &CancellationToken::new())
            .await
            .expect_err("refused");
        expect_ytdlp_kind(err, "bad_url", ErrorClass::Permanent);
        let err = y.list(url, 10).await.expect_err("refused");
        expect_ytdlp_kind(err, "bad_url", ErrorClass::Permanent);
    }
    assert!(files_in(dir.path()).is_empty());
    let err = y
        .download(
            "https://example.com/v",
            dir.path(),
            &CancellationToken::new(),
        )
        .await
        .expect_err("no executable");
    expect_ytdlp_kind(err, "ytdlp_unavailable", ErrorClass::Permanent);
}

#[tokio::test]
async fn ytdlp_lists_a_feed() {
    let work = tempfile::tempdir().expect("temp dir");
    let mp3 = std::fs::read(sine_mp3(work.path())).expect("the MP3 exists");
    let addr = media_server(mp3).await;
    let entries = ytdlp(10 << 20, Duration::from_secs(60))
        .list(&format!("http://{addr}/feed.xml"), 10)
        .await
        .expect("yt-dlp lists the feed");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].id, "g1");
    assert_eq!(
        entries[0].url,
        format!("http://127.0.0.1:{}/ep.mp3", addr.port())
    );
    assert_eq!(entries[0].title.as_deref(), Some("Episode 1"));
    assert_eq!(entries[0].timestamp, Some(1_704_103_200));
    assert!(!entries[0].is_playlist);
    assert_eq!(entries[1].id, "g2");
    assert_eq!(entries[1].timestamp, None);

    let one = ytdlp(10 << 20, Duration::from_secs(60))
        .list(&format!("http://{addr}/feed.xml"), 1)
        .await
        .expect("yt-dlp lists the feed");
    assert_eq!(one.len(), 1);
}

#[tokio::test]
async fn an_oversized_listing_is_a_permanent_failure() {
    // A stand-in yt-dlp that prints a listing over the 32 MiB cap: 33 MiB
    // of one JSON document. Asking again would get the same cut document,
    // so it is permanent, and the run is not left waiting on the pipe.
    let work = tempfile::tempdir().expect("temp dir");
    let exe = work.path().join("yt-dlp");
    crate::helpers::script(
        &exe,
        "#!/bin/sh\nprintf '{\"entries\": [], \"pad\": \"'\nhead -c 34603008 /dev/zero | tr '\\0' a\nprintf '\"}'\n",
    );
    let err = Ytdlp::new(&exe, 10 << 20, Duration::from_secs(60))
        .list("https://www.youtube.com/@someone", 10)
        .await
        .expect_err("the listing is over the cap");
    expect_ytdlp_kind(err, "listing_too_large", ErrorClass::Permanent);
}

#[test]
fn youtube_ids() {
    let id = |s: &str| Ytdlp::youtube_id(&url::Url::parse(s).expect("test URL parses"));
    let want = Some("dQw4w9WgXcQ".to_owned());
    for u in [
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
        "https://youtube.com/watch?feature=share&v=dQw4w9WgXcQ&t=42",
        "https://m.youtube.com/watch?v=dQw4w9WgXcQ",
        "https://music.youtube.com/watch?v=dQw4w9WgXcQ&list=x",
        "https://youtu.be/dQw4w9WgXcQ?t=3",
        "https://www.youtube.com/shorts/dQw4w9WgXcQ",
        "https://www.youtube.com/embed/dQw4w9WgXcQ?start=1",
        "https://www.youtube-nocookie.com/embed/dQw4w9WgXcQ",
        "https://www.youtube.com/live/dQw4w9WgXcQ",
        "http://WWW.YOUTUBE.COM/watch?v=dQw4w9WgXcQ",
    ] {
        assert_eq!(id(u), want, "{u}");
    }
    for u in [
        "https://www.youtube.com/watch?v=tooShort",
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ/../x",
        "https://www.youtube.com/@channel",
        "https://www.youtube.com/playlist?list=PL123",
        "https://example.com/watch?v=dQw4w9WgXcQ",
        "https://notyoutube.com/watch?v=dQw4w9WgXcQ",
        "https://youtu.be/",
        "ftp://youtu.be/dQw4w9WgXcQ",
    ] {
        assert_eq!(id(u), None, "{u}");
    }
}

#[test]
fn site_urls() {
    let site = |s: &str| Ytdlp::is_site_url(&url::Url::parse(s).expect("test URL parses"));
    assert!(site("https://www.youtube.com/watch?v=dQw4w9WgXcQ"));
    assert!(site("https://youtu.be/dQw4w9WgXcQ"));
    assert!(site("https://vimeo.com/12345"));
    assert!(site("https://m.youtube.com/@chan"));
    assert!(!site("https://notyoutube.com/x"));
    assert!(!site("https://youtube.com.evil.example/x"));
    assert!(!site("https://example.com/file.mp3"));
    assert!(!site("ftp://youtube.com/x"));
}
