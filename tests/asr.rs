//! Speech recognition (`vidpipe::backends::asr`).
//!
//! - Against the local stack's ASR server (faster-whisper-server with
//!   Whisper tiny.en): speech generated with espeak-ng is transcribed and
//!   scored by word error rate, alone and cut into two overlapping chunks
//!   that are stitched back together.
//! - Against fake HTTP servers started by the tests: the client's own retry
//!   policy (429 with Retry-After, 5xx, 400, a server that never answers,
//!   cancellation, the concurrency limit). These check our side of the
//!   contract only; how real services behave is not simulated beyond that.
//! - Google Speech-to-Text cannot be reached from here, so its tests are
//!   CONTRACT tests: a fake server checks the request shape and answers with
//!   a representative v1 `speech:recognize` response.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vidpipe::backends::asr::{
    Asr, AsrError, AsrOptions, AudioInput, Backend, ChunkTranscript, GoogleAsr, OpenAiAsr, Segment,
    normalize_words, stitch, transcribe_chunks, word_error_rate,
};
use vidpipe::template::{ErrorClass, StageError};

use crate::helpers;

// ---------------------------------------------------------------------------
// Audio fixtures

/// Runs a tool, failing the test with its name if it is not installed.
fn run(tool: &str, args: &[&str]) {
    let output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| helpers::missing(tool, "PATH", e));
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Speaks `text` with espeak-ng and converts it to 16 kHz mono WAV, the
/// format the extract-audio stage produces.
fn speak(dir: &Path, name: &str, text: &str) -> PathBuf {
    let raw = dir.join(format!("{name}.raw.wav"));
    let out = dir.join(format!("{name}.wav"));
    let raw_s = raw.to_str().expect("UTF-8 temp path");
    // 150 words a minute: espeak's default 175 is hard on Whisper tiny.
    run("espeak-ng", &["-s", "150", "-w", raw_s, text]);
    run(
        "ffmpeg",
        &[
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-i",
            raw_s,
            "-ar",
            "16000",
            "-ac",
            "1",
            out.to_str().expect("UTF-8 temp path"),
        ],
    );
    out
}

/// Cuts `[start_ms, start_ms + length_ms)` out of `src`.
fn cut(src: &Path, dst: &Path, start_ms: i64, length_ms: i64) {
    run(
        "ffmpeg",
        &[
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-i",
            src.to_str().expect("UTF-8 temp path"),
            "-ss",
            &format!("{:.3}", start_ms as f64 / 1000.0),
            "-t",
            &format!("{:.3}", length_ms as f64 / 1000.0),
            "-ar",
            "16000",
            "-ac",
            "1",
            dst.to_str().expect("UTF-8 temp path"),
        ],
    );
}

/// Length of an audio file in milliseconds, by ffprobe.
fn duration_ms(path: &Path) -> i64 {
    let output = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| helpers::missing("ffprobe", "PATH", e));
    let text = String::from_utf8_lossy(&output.stdout);
    let seconds: f64 = text
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("ffprobe duration {text:?}: {e}"));
    (seconds * 1000.0).round() as i64
}

/// A 16 kHz mono 16-bit WAV of silence, for fake servers that do not listen.
fn silent_wav(dir: &Path, name: &str, ms: u32) -> PathBuf {
    let samples = 16 * ms;
    let data_len = samples * 2;
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    // Not quite silence: a ramp makes the bytes recognisable in the upload.
    w.extend((0..data_len).map(|i| (i % 251) as u8));
    let path = dir.join(format!("{name}.wav"));
    std::fs::write(&path, w).expect("write WAV");
    path
}

// ---------------------------------------------------------------------------
// The real ASR server

const SHORT_SCRIPT: &str = "The weather today is calm and sunny. Many people walk along the \
    river and enjoy the quiet morning. A small boat drifts slowly past the old stone bridge.";

const LONG_SCRIPT: &str = "Every morning the baker opens his small shop before the sun rises. \
    He mixes flour, water and salt, and he shapes the dough into long loaves. While the bread \
    bakes, the whole street smells warm and sweet. Children stop at the window on their way to \
    school and watch the golden crusts come out of the oven. Later, the farmers arrive with \
    fresh milk and butter from the hills. The baker trades bread for cheese and eggs, and \
    everyone talks about the weather and the coming harvest. In the evening he cleans the \
    ovens, counts the coins in his wooden box, and walks home along the quiet river under the \
    bright stars.";

/// The stack's ASR server as configured for programs on this machine.
fn stack_asr() -> (OpenAiAsr, String) {
    let config = helpers::config();
    let opts = AsrOptions {
        // Tests run in parallel on a small machine; Whisper gets slow.
        timeout: Duration::from_secs(120),
        max_concurrency: 2,
        attempts: 3,
        backoff: Duration::from_millis(500),
        language: None,
    };
    let asr = OpenAiAsr::new(
        &config.asr_url,
        &config.asr_model,
        config.asr_api_key.clone(),
        opts,
    )
    .expect("asr_url and asr_model are valid");
    (asr, config.asr_url)
}

/// Transcribes with the stack's server; a server that is not there fails
/// the test naming it.
async fn transcribe_real(asr: &OpenAiAsr, url: &str, path: &Path) -> ChunkTranscript {
    match asr.transcribe(path, &CancellationToken::new()).await {
        Ok(t) => t,
        Err(e @ (AsrError::Unavailable { .. } | AsrError::Timeout { .. })) => {
            helpers::missing("the ASR server (faster-whisper-server)", url, e)
        }
        Err(e) => panic!("transcribing {} failed: {e}", path.display()),
    }
}

fn joined(segments: &[Segment]) -> String {
    segments
        .iter()
        .map(|s| s.text.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

fn assert_ordered_within(segments: &[Segment], duration_ms: i64) {
    assert!(!segments.is_empty(), "no segments");
    let mut previous_start = -1;
    for s in segments {
        assert!(
            s.start_ms >= 0 && s.start_ms <= s.end_ms,
            "bad segment {s:?}"
        );
        assert!(
            s.start_ms >= previous_start,
            "start times go back: {segments:#?}"
        );
        assert!(
            s.end_ms <= duration_ms,
            "segment {s:?} ends after the audio ({duration_ms} ms)"
        );
        previous_start = s.start_ms;
    }
}

#[tokio::test]
async fn real_server_transcribes_speech() {
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = speak(dir.path(), "short", SHORT_SCRIPT);
    let clip_ms = duration_ms(&clip);
    let (asr, url) = stack_asr();

    let started = Instant::now();
    let t = transcribe_real(&asr, &url, &clip).await;
    let elapsed = started.elapsed();

    let text = joined(&t.segments);
    let wer = word_error_rate(SHORT_SCRIPT, &text);
    eprintln!(
        "ASR short clip: {clip_ms} ms of audio in {elapsed:?} (real-time factor {:.3}), \
         WER {wer:.3}: {text:?}",
        elapsed.as_secs_f64() * 1000.0 / clip_ms as f64
    );
    assert!(wer <= 0.35, "WER {wer:.3} > 0.35 for {text:?}");
    assert_eq!(t.language.as_deref(), Some("en"));
    assert!(
        (t.duration_ms - clip_ms).abs() <= 100,
        "duration {} ms, the clip is {clip_ms} ms",
        t.duration_ms
    );
    assert_ordered_within(&t.segments, clip_ms);
}

/// Words (normalised) that occur as a three-word sequence more often in
/// `hypothesis` than in `reference`: what a doubled overlap leaves behind.
fn extra_trigrams(reference: &str, hypothesis: &str) -> Vec<String> {
    let count = |text: &str| {
        let words = normalize_words(text);
        let mut counts = std::collections::HashMap::<String, usize>::new();
        for w in words.windows(3) {
            *counts.entry(w.join(" ")).or_default() += 1;
        }
        counts
    };
    let reference = count(reference);
    let mut extra: Vec<String> = count(hypothesis)
        .into_iter()
        .filter(|(gram, n)| *n > reference.get(gram).copied().unwrap_or(0).max(1))
        .map(|(gram, _)| gram)
        .collect();
    extra.sort();
    extra
}

#[tokio::test]
async fn real_server_chunks_stitch_without_duplicates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let full = speak(dir.path(), "long", LONG_SCRIPT);
    let total_ms = duration_ms(&full);
    assert!(
        total_ms > 30_000,
        "the script should last ~40 s, got {total_ms} ms"
    );

    // Two chunks with 2 s of overlap around the middle.
    let overlap_ms = 2000;
    let second_offset = total_ms / 2 - overlap_ms / 2;
    let first_len = second_offset + overlap_ms;
    let first = dir.path().join("chunk-1.wav");
    let second = dir.path().join("chunk-2.wav");
    cut(&full, &first, 0, first_len);
    cut(&full, &second, second_offset, total_ms - second_offset);

    let (asr, url) = stack_asr();
    let started = Instant::now();
    let (a, b) = tokio::join!(
        transcribe_real(&asr, &url, &first),
        transcribe_real(&asr, &url, &second)
    );
    let elapsed = started.elapsed();
    let naive = format!("{} {}", joined(&a.segments), joined(&b.segments));
    let b_first_start = b.segments.first().map(|s| s.start_ms);

    let t = stitch(vec![(0, 0, a), (second_offset, overlap_ms, b)]);
    let text = joined(&t.segments);
    let wer = word_error_rate(LONG_SCRIPT, &text);
    eprintln!(
        "ASR two chunks of {total_ms} ms in {elapsed:?} (real-time factor {:.3}), WER {wer:.3} \
         stitched, {:.3} concatenated\nstitched: {text:?}\nconcatenated: {naive:?}",
        elapsed.as_secs_f64() * 1000.0 / total_ms as f64,
        word_error_rate(LONG_SCRIPT, &naive)
    );

    assert!(wer <= 0.35, "WER {wer:.3} > 0.35 for {text:?}");
    // Without stitching the overlap's words come back twice; if they did
    // not, the check below would prove nothing.
    assert!(
        !extra_trigrams(LONG_SCRIPT, &naive).is_empty(),
        "the 2 s overlap should double words when concatenated: {naive:?}"
    );
    let doubled = extra_trigrams(LONG_SCRIPT, &text);
    assert!(
        doubled.is_empty(),
        "doubled at the border: {doubled:?} in {text:?}"
    );
    assert_eq!(t.language.as_deref(), Some("en"));
    assert_ordered_within(&t.segments, total_ms);
    // The second chunk's segments moved by its offset: something starts in
    // the second half, and its first segment is not at zero any more.
    let b_first_start = b_first_start.expect("the second chunk has segments");
    assert!(
        t.segments
            .iter()
            .any(|s| s.start_ms >= second_offset + b_first_start),
        "no segment shifted past {second_offset} ms: {:#?}",
        t.segments
    );
    assert!(
        t.segments.last().is_some_and(|s| s.end_ms > first_len),
        "the last segment should end in the second chunk: {:#?}",
        t.segments
    );
    assert!(
        (t.duration_ms - total_ms).abs() <= 200,
        "duration {} ms, the recording is {total_ms} ms",
        t.duration_ms
    );
}

// ---------------------------------------------------------------------------
// Fake HTTP servers

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A multipart form field's raw content.
    fn field(&self, name: &str) -> Option<Vec<u8>> {
        let marker = format!("name=\"{name}\"");
        let at = find(&self.body, marker.as_bytes())?;
        let start = at + find(&self.body[at..], b"\r\n\r\n")? + 4;
        let end = start + find(&self.body[start..], b"\r\n--")?;
        Some(self.body[start..end].to_vec())
    }

    fn text_field(&self, name: &str) -> Option<String> {
        self.field(name)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What the fake server does with a request.
enum Reply {
    /// Answers after `delay`.
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    },
    /// Reads the request and never answers.
    Hang,
}

fn answer(status: u16, body: impl Into<String>) -> Reply {
    Reply::Answer {
        status,
        headers: Vec::new(),
        body: body.into(),
        delay: Duration::ZERO,
    }
}

type Handler = dyn Fn(usize, &Seen) -> Reply + Send + Sync;

/// An HTTP/1.1 server on a random local port that hands each request (with
/// its number, from 0) to a handler.
struct FakeServer {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    max_active: Arc<AtomicUsize>,
}

impl FakeServer {
    async fn start(handler: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let max_active = Arc::new(AtomicUsize::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (seen2, max2) = (seen.clone(), max_active.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (seen, active, max_active, handler) =
                    (seen2.clone(), active.clone(), max2.clone(), handler.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    let Some(request) = read_request(&mut reader).await else {
                        return;
                    };
                    let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                    max_active.fetch_max(now, Ordering::SeqCst);
                    let index = {
                        let mut seen = seen.lock().expect("lock");
                        seen.push(request.clone());
                        seen.len() - 1
                    };
                    match handler(index, &request) {
                        Reply::Hang => {
                            // Hold the connection open without a word.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Reply::Answer {
                            status,
                            headers,
                            body,
                            delay,
                        } => {
                            tokio::time::sleep(delay).await;
                            // Done before answering: the client may send
                            // its next request as soon as it has the answer.
                            active.fetch_sub(1, Ordering::SeqCst);
                            let mut head = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                                 content-length: {}\r\nconnection: close\r\n",
                                body.len()
                            );
                            for (name, value) in headers {
                                head.push_str(&format!("{name}: {value}\r\n"));
                            }
                            head.push_str("\r\n");
                            let _ = write.write_all(head.as_bytes()).await;
                            let _ = write.write_all(body.as_bytes()).await;
                            let _ = write.shutdown().await;
                        }
                    }
                });
            }
        });
        Self {
            base,
            seen,
            max_active,
        }
    }

    fn calls(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Reads one request: head, then a body by content-length or chunked.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<Seen> {
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':')?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if let Some(len) = get("content-length") {
        body.resize(len.parse().ok()?, 0);
        reader.read_exact(&mut body).await.ok()?;
    } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).await.ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await.ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(Seen {
        method,
        target,
        headers,
        body,
    })
}

const VERBOSE: &str = r#"{"task":"transcribe","language":"en","duration":1.5,
    "text":" Hello there.","segments":[{"id":0,"start":0.0,"end":1.2,"text":" Hello there."}]}"#;

fn fast_opts() -> AsrOptions {
    AsrOptions {
        timeout: Duration::from_secs(10),
        max_concurrency: 4,
        attempts: 3,
        backoff: Duration::from_millis(50),
        language: None,
    }
}

fn openai(server: &FakeServer, key: Option<&str>, opts: AsrOptions) -> OpenAiAsr {
    OpenAiAsr::new(
        &format!("{}/v1", server.base),
        "whisper-1",
        key.map(Into::into),
        opts,
    )
    .expect("valid settings")
}

/// A multi-process ASR server (the stack's runs one worker process per
/// core, each transcribing one request at a time) keeps a connection with
/// the worker that accepted it for as long as it stays open: requests on
/// a reused connection queue behind that worker while another sits idle.
/// So every request opens a connection of its own, which a worker that is
/// free accepts. This server keeps connections open (HTTP/1.1 keep-alive)
/// and counts them.
#[tokio::test]
async fn every_request_opens_a_connection_of_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}/v1", listener.local_addr().expect("address"));
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut reader = BufReader::new(read);
                while read_request(&mut reader).await.is_some() {
                    r.fetch_add(1, Ordering::SeqCst);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: keep-alive\r\n\r\n",
                        VERBOSE.len()
                    );
                    if write.write_all(head.as_bytes()).await.is_err()
                        || write.write_all(VERBOSE.as_bytes()).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let asr = OpenAiAsr::new(&base, "whisper-1", None, fast_opts()).expect("valid settings");
    for n in 1..=3 {
        asr.transcribe(&wav, &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("request {n}: {e}"));
    }
    assert_eq!(requests.load(Ordering::SeqCst), 3);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "each request on a connection of its own"
    );
}

#[tokio::test]
async fn rate_limit_with_retry_after_then_success() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 1500);
    let server = FakeServer::start(|n, _| match n {
        0 => Reply::Answer {
            status: 429,
            headers: vec![("retry-after", "1".into())],
            body: r#"{"error":{"message":"Rate limit reached"}}"#.into(),
            delay: Duration::ZERO,
        },
        _ => answer(200, VERBOSE),
    })
    .await;
    // A backoff far longer than the test proves Retry-After was used.
    let opts = AsrOptions {
        backoff: Duration::from_secs(60),
        language: Some("English".into()),
        ..fast_opts()
    };
    let asr = openai(&server, None, opts);

    let started = Instant::now();
    let t = asr
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect("succeeds on the second call");
    let elapsed = started.elapsed();

    assert_eq!(server.calls(), 2);
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(10),
        "waited {elapsed:?} for a Retry-After of 1 s"
    );
    assert_eq!(
        t.segments,
        vec![Segment {
            start_ms: 0,
            end_ms: 1200,
            text: "Hello there.".into()
        }]
    );
    assert_eq!(t.language.as_deref(), Some("en"));
    assert_eq!(t.duration_ms, 1500);

    // The request: multipart, both model fields, verbose_json, the audio
    // as uploaded, the language as an ISO code, and no key to send.
    let r = &server.requests()[1];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/v1/audio/transcriptions");
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("multipart/form-data")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.text_field("model").as_deref(), Some("whisper-1"));
    assert_eq!(r.text_field("model_name").as_deref(), Some("whisper-1"));
    assert_eq!(
        r.text_field("response_format").as_deref(),
        Some("verbose_json")
    );
    assert_eq!(
        r.text_field("timestamp_granularities[]").as_deref(),
        Some("segment")
    );
    assert_eq!(r.text_field("language").as_deref(), Some("en"));
    let uploaded = r.field("file").expect("a file part");
    assert_eq!(uploaded, std::fs::read(&wav).expect("read WAV"));
}

#[tokio::test]
async fn client_errors_are_permanent_and_never_echo_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let key = "sk-test-canary-7f3a";
    let server = FakeServer::start(move |_, _| {
        answer(
            400,
            format!(r#"{{"error":{{"message":"Invalid file format (key {key})."}}}}"#),
        )
    })
    .await;
    let asr = openai(&server, Some(key), fast_opts());

    let err = asr
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("400 fails");

    assert_eq!(server.calls(), 1, "a 400 is not retried");
    assert!(
        matches!(err, AsrError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    let stage: StageError = err.clone().into();
    assert_eq!(stage.class, ErrorClass::Permanent);
    assert_eq!(stage.kind, "asr_rejected");
    assert!(
        stage.message.contains("Invalid file format"),
        "{}",
        stage.message
    );
    assert!(!stage.message.contains(key), "{}", stage.message);
    assert!(!format!("{err:?}").contains(key));
    // The key was sent, as a bearer token.
    let r = &server.requests()[0];
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {key}").as_str())
    );
}

#[tokio::test]
async fn a_hanging_server_times_out_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let server = FakeServer::start(|n, _| match n {
        0 => Reply::Hang,
        _ => answer(200, VERBOSE),
    })
    .await;
    let opts = AsrOptions {
        timeout: Duration::from_millis(700),
        ..fast_opts()
    };
    let asr = openai(&server, None, opts);

    let started = Instant::now();
    let t = asr
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect("the second attempt succeeds");

    assert_eq!(server.calls(), 2);
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!(t.segments.len(), 1);
}

#[tokio::test]
async fn a_server_that_always_hangs_is_a_retryable_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let server = FakeServer::start(|_, _| Reply::Hang).await;
    let opts = AsrOptions {
        timeout: Duration::from_millis(300),
        attempts: 2,
        ..fast_opts()
    };
    let err = openai(&server, None, opts)
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("never answers");
    assert_eq!(server.calls(), 2);
    assert!(
        matches!(err, AsrError::Timeout { attempts: 2, .. }),
        "{err:?}"
    );
    let stage: StageError = err.into();
    assert_eq!(stage.class, ErrorClass::Retryable);
    assert_eq!(stage.kind, "asr_timeout");
}

#[tokio::test]
async fn server_errors_are_retried_until_the_attempts_run_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let server = FakeServer::start(|_, _| answer(503, "upstream busy")).await;
    let err = openai(&server, None, fast_opts())
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("503 every time");
    assert_eq!(server.calls(), 3);
    assert!(
        matches!(&err, AsrError::Server { status: 503, attempts: 3, message, .. } if message == "upstream busy"),
        "{err:?}"
    );
    assert_eq!(StageError::from(err).class, ErrorClass::Retryable);
}

#[tokio::test]
async fn a_long_retry_after_is_left_to_the_runner() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let server = FakeServer::start(|_, _| Reply::Answer {
        status: 429,
        headers: vec![("retry-after", "600".into())],
        body: "{}".into(),
        delay: Duration::ZERO,
    })
    .await;
    let started = Instant::now();
    let err = openai(&server, None, fast_opts())
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("rate limited");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.calls(), 1);
    let stage: StageError = err.into();
    assert_eq!(stage.class, ErrorClass::Retryable);
    assert_eq!(stage.kind, "asr_rate_limited");
    assert_eq!(stage.retry_after, Some(Duration::from_secs(600)));
}

#[tokio::test]
async fn an_unreachable_server_is_retryable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").port()
    };
    let asr = OpenAiAsr::new(
        &format!("http://127.0.0.1:{port}/v1"),
        "whisper-1",
        None,
        AsrOptions {
            attempts: 2,
            ..fast_opts()
        },
    )
    .expect("valid");
    let err = asr
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(
        matches!(err, AsrError::Unavailable { attempts: 2, .. }),
        "{err:?}"
    );
    assert_eq!(StageError::from(err).kind, "asr_unavailable");
}

#[tokio::test]
async fn cancellation_ends_a_waiting_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let server = FakeServer::start(|_, _| Reply::Hang).await;
    let asr = openai(&server, None, fast_opts());
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let err = asr.transcribe(&wav, &cancel).await.expect_err("cancelled");
    assert!(matches!(err, AsrError::Cancelled), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn concurrency_is_bounded_per_backend() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 500);
    let server = FakeServer::start(|_, _| Reply::Answer {
        status: 200,
        headers: Vec::new(),
        body: VERBOSE.into(),
        delay: Duration::from_millis(300),
    })
    .await;
    let asr = openai(
        &server,
        None,
        AsrOptions {
            max_concurrency: 2,
            ..fast_opts()
        },
    );
    // Clones share the limit.
    let clone = asr.clone();
    let cancel = CancellationToken::new();
    let results = futures::future::join_all((0..6).map(|i| {
        let asr = if i % 2 == 0 { &asr } else { &clone };
        asr.transcribe(&wav, &cancel)
    }))
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(server.calls(), 6);
    assert_eq!(server.max_active.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn chunks_are_transcribed_and_stitched_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = silent_wav(dir.path(), "part-a", 1000);
    let b = silent_wav(dir.path(), "part-b", 1000);
    // Answers by file name, since the two requests run concurrently; the
    // second chunk's answer arrives first.
    let server = FakeServer::start(|_, r| {
        let name = String::from_utf8_lossy(&r.body).into_owned();
        let (text, delay) = if name.contains("filename=\"part-a.wav\"") {
            ("one two three four", 300)
        } else {
            ("three four five six", 0)
        };
        Reply::Answer {
            status: 200,
            headers: Vec::new(),
            body: format!(
                r#"{{"language":"en","duration":10.0,"text":"{text}",
                    "segments":[{{"start":0.0,"end":10.0,"text":"{text}"}}]}}"#
            ),
            delay: Duration::from_millis(delay),
        }
    })
    .await;
    let backend = Backend::from(openai(&server, None, fast_opts()));
    assert_eq!(backend.name(), "openai");
    let chunks = [
        AudioInput {
            path: &a,
            offset_ms: 0,
            duration_ms: 10_000,
        },
        AudioInput {
            path: &b,
            offset_ms: 5000,
            duration_ms: 10_000,
        },
    ];
    let t = transcribe_chunks(&backend, &chunks, &CancellationToken::new())
        .await
        .expect("both succeed");
    assert_eq!(joined(&t.segments), "one two three four five six");
    assert_eq!(t.duration_ms, 15_000);
    assert_eq!(t.segments.last().map(|s| s.end_ms), Some(15_000));
}

// ---------------------------------------------------------------------------
// Google Speech-to-Text v1: CONTRACT tests against a fake server

/// A representative `speech:recognize` response (the shape Google documents
/// and returns: per-result alternatives with word offsets as "1.500s"
/// strings, resultEndTime, lowercase languageCode).
const GOOGLE_RESPONSE: &str = r#"{
  "results": [
    {
      "alternatives": [
        {
          "transcript": "how old is the Brooklyn Bridge",
          "confidence": 0.98267895,
          "words": [
            {"startTime": "0.100s", "endTime": "0.300s", "word": "how"},
            {"startTime": "0.300s", "endTime": "0.600s", "word": "old"},
            {"startTime": "0.600s", "endTime": "0.800s", "word": "is"},
            {"startTime": "0.800s", "endTime": "0.900s", "word": "the"},
            {"startTime": "0.900s", "endTime": "1.100s", "word": "Brooklyn"},
            {"startTime": "1.100s", "endTime": "1.500s", "word": "Bridge"}
          ]
        }
      ],
      "resultEndTime": "1.600s",
      "languageCode": "en-us"
    },
    {
      "alternatives": [
        {
          "transcript": " it opened in the spring",
          "confidence": 0.91,
          "words": [
            {"startTime": "1.900s", "endTime": "2.100s", "word": "it"},
            {"startTime": "2.100s", "endTime": "2.500s", "word": "opened"},
            {"startTime": "2.500s", "endTime": "2.600s", "word": "in"},
            {"startTime": "2.600s", "endTime": "2.700s", "word": "the"},
            {"startTime": "2.700s", "endTime": "3s", "word": "spring"}
          ]
        }
      ],
      "resultEndTime": "3s",
      "languageCode": "en-us"
    }
  ],
  "totalBilledTime": "3s",
  "requestId": "4715228163541239012"
}"#;

const GOOGLE_KEY: &str = "AIza-test-canary-0123";

fn google(server: &FakeServer, opts: AsrOptions) -> GoogleAsr {
    GoogleAsr::new(&server.base, GOOGLE_KEY.into(), opts).expect("valid settings")
}

/// Contract test: the request we send and how we read Google's answer.
#[tokio::test]
async fn google_contract_request_shape_and_segments() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 3000);
    let server = FakeServer::start(|_, _| answer(200, GOOGLE_RESPONSE)).await;
    let backend = Backend::from(google(&server, fast_opts()));
    assert_eq!(backend.name(), "google");

    let t = backend
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect("transcribed");

    assert_eq!(
        t.segments,
        vec![
            Segment {
                start_ms: 100,
                end_ms: 1500,
                text: "how old is the Brooklyn Bridge".into()
            },
            Segment {
                start_ms: 1900,
                end_ms: 3000,
                text: "it opened in the spring".into()
            },
        ]
    );
    assert_eq!(t.language.as_deref(), Some("en"));
    assert_eq!(t.duration_ms, 3000);

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    // The key travels in a header, never in the URL.
    assert_eq!(r.target, "/v1/speech:recognize");
    assert_eq!(r.header("x-goog-api-key"), Some(GOOGLE_KEY));
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON body");
    let config = &body["config"];
    assert_eq!(config["encoding"], "LINEAR16");
    assert_eq!(config["sampleRateHertz"], 16_000);
    assert_eq!(config["audioChannelCount"], 1);
    assert_eq!(config["languageCode"], "en-US");
    assert_eq!(config["enableWordTimeOffsets"], true);
    let content = body["audio"]["content"].as_str().expect("inline content");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(content)
        .expect("base64");
    assert_eq!(decoded, std::fs::read(&wav).expect("read WAV"));
}

/// Contract test: Google's error answers map like any other service's.
#[tokio::test]
async fn google_contract_rate_limit_retry_and_permanent_400() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "clip", 3000);

    let limited = FakeServer::start(|n, _| match n {
        0 => Reply::Answer {
            status: 429,
            headers: vec![("retry-after", "0".into())],
            body: r#"{"error":{"code":429,"message":"Quota exceeded for quota metric 'Requests'","status":"RESOURCE_EXHAUSTED"}}"#.into(),
            delay: Duration::ZERO,
        },
        _ => answer(200, GOOGLE_RESPONSE),
    })
    .await;
    let t = google(&limited, fast_opts())
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect("second call succeeds");
    assert_eq!(limited.calls(), 2);
    assert_eq!(t.segments.len(), 2);

    let invalid = FakeServer::start(|_, _| {
        answer(
            400,
            format!(
                r#"{{"error":{{"code":400,"message":"API key not valid: {GOOGLE_KEY}. Please pass a valid API key.","status":"INVALID_ARGUMENT"}}}}"#
            ),
        )
    })
    .await;
    let err = google(&invalid, fast_opts())
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("400 fails");
    assert_eq!(invalid.calls(), 1);
    let stage: StageError = err.into();
    assert_eq!(stage.class, ErrorClass::Permanent);
    assert_eq!(stage.kind, "asr_rejected");
    assert!(
        stage.message.contains("API key not valid"),
        "{}",
        stage.message
    );
    assert!(!stage.message.contains(GOOGLE_KEY), "{}", stage.message);
}

/// Contract test: audio the synchronous method would refuse is refused
/// here, without a request.
#[tokio::test]
async fn google_contract_refuses_chunks_over_a_minute() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wav = silent_wav(dir.path(), "long", 61_000);
    let server = FakeServer::start(|_, _| answer(200, GOOGLE_RESPONSE)).await;
    let err = google(&server, fast_opts())
        .transcribe(&wav, &CancellationToken::new())
        .await
        .expect_err("too long");
    assert_eq!(server.calls(), 0);
    assert!(matches!(err, AsrError::Input { .. }), "{err:?}");
    assert_eq!(StageError::from(err).class, ErrorClass::Permanent);
}
