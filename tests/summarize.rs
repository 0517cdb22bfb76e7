//! The summarization backends.
//!
//! - Extractive: a made-up transcript with two clearly different topics
//!   (cooking pasta, then repairing a bicycle), edge cases, and the time
//!   it takes on a 25-minute talk.
//! - Chat completions: a CONTRACT test. OpenAI and Ollama cannot be reached
//!   from this machine (no internet, no model), so a local HTTP server
//!   written here plays the server: it records every request and answers
//!   with chat-completions JSON shaped like the real servers' answers. It
//!   checks what we send (model, messages, Authorization only with a key,
//!   the token budget, map then reduce) and what we do with the answers
//!   (timestamps back to milliseconds, retries, error classes, no key in
//!   errors). It does not check what a real model writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vidpipe::backends::summarize::{
    ChatOptions, ChatSummarizer, ExtractiveOptions, NO_SPEECH, SummarizeError, Summary, TimedText,
    extractive, format_timestamp, parse_timestamp,
};
use vidpipe::template::{ErrorClass, StageError};

const PASTA: [&str; 20] = [
    "Today we are cooking a simple pasta dinner in the kitchen.",
    "First, fill a large pot with water and bring the water to a rolling boil.",
    "Salt the boiling water generously, it should taste like the sea.",
    "While the water heats, chop two cloves of garlic and a small onion.",
    "Warm olive oil in a pan and cook the garlic and onion until soft.",
    "Add crushed tomatoes to the pan and let the tomato sauce simmer.",
    "Season the sauce with basil, oregano and a pinch of sugar.",
    "Now drop the spaghetti into the boiling salted water.",
    "Stir the pasta so the spaghetti does not stick together in the pot.",
    "Cook the pasta for about nine minutes, until it is al dente.",
    "Taste a strand of spaghetti to check that the pasta is cooked.",
    "Save a cup of the starchy pasta water before you drain the pot.",
    "Drain the spaghetti in a colander over the sink.",
    "Toss the drained pasta into the pan with the tomato sauce.",
    "Add a splash of pasta water so the sauce clings to the spaghetti.",
    "Grate fresh parmesan cheese over the pasta and sauce.",
    "Tear a few basil leaves and scatter them over the plates of pasta.",
    "A drizzle of olive oil finishes the tomato sauce nicely.",
    "Serve the spaghetti hot with extra parmesan cheese on the table.",
    "That is all it takes to cook a great pasta dinner at home.",
];

const BICYCLE: [&str; 20] = [
    "Now let us switch to repairing a bicycle with a flat tire.",
    "Flip the bicycle upside down so it rests on the saddle and handlebars.",
    "Open the brake and loosen the axle nuts to remove the wheel.",
    "Use two tire levers to pry the tire bead off the wheel rim.",
    "Pull the punctured inner tube out of the tire.",
    "Pump some air into the tube and listen for the hiss of the puncture.",
    "Check the inside of the tire for glass or a thorn that caused the flat.",
    "Patch the hole in the tube or fit a brand new inner tube.",
    "Push the tube valve through the hole in the rim first.",
    "Tuck the tube inside the tire and work the bead back onto the rim with your thumbs.",
    "Inflate the tire slowly and make sure the bead sits evenly on the rim.",
    "Pump the tire to the pressure printed on the sidewall.",
    "Put the wheel back into the bicycle frame and tighten the axle nuts.",
    "Close the brake and spin the wheel to check that it runs true.",
    "While the bicycle is upside down, look at the chain as well.",
    "Wipe the dirty chain with a rag and apply a drop of chain oil to each link.",
    "Shift through the gears to spread the oil along the chain.",
    "Squeeze the brake levers to check the brake pads grip the rim.",
    "Turn the bicycle over and take it for a short test ride.",
    "Your bicycle is repaired and the tire is ready for the road.",
];

/// One segment per sentence, `ms_each` long each, times on whole seconds.
fn timed(sentences: &[&str], ms_each: i64) -> Vec<TimedText> {
    sentences
        .iter()
        .enumerate()
        .map(|(i, s)| TimedText {
            start_ms: i as i64 * ms_each,
            end_ms: (i as i64 + 1) * ms_each,
            text: s.to_string(),
        })
        .collect()
}

fn two_topics() -> Vec<TimedText> {
    let all: Vec<&str> = PASTA.iter().chain(BICYCLE.iter()).copied().collect();
    timed(&all, 5_000)
}

#[test]
fn extractive_finds_the_topic_change() {
    let segments = two_topics();
    let opts = ExtractiveOptions {
        summary_sentences: 3,
        key_points: 5,
        min_chapter_ms: 30_000,
        max_chapters: 6,
    };
    let s = extractive(&segments, &opts);
    assert_eq!(s.backend, "extractive");

    // Chapters: at least two, one boundary within a few sentences of the
    // switch at sentence 20 (100 s), contiguous, each >= min_chapter_ms.
    assert!(s.chapters.len() >= 2, "{:#?}", s.chapters);
    assert!(s.chapters.len() <= opts.max_chapters);
    let boundaries: Vec<i64> = s.chapters.iter().skip(1).map(|c| c.start_ms).collect();
    assert!(
        boundaries.iter().any(|&b| (b - 100_000).abs() <= 3 * 5_000),
        "no boundary near 01:40: {boundaries:?}"
    );
    assert_eq!(s.chapters[0].start_ms, 0);
    assert_eq!(s.chapters.last().map(|c| c.end_ms), Some(200_000));
    for pair in s.chapters.windows(2) {
        assert_eq!(pair[0].end_ms, pair[1].start_ms);
    }
    for c in &s.chapters {
        assert!(c.end_ms - c.start_ms >= opts.min_chapter_ms, "{c:?}");
        let words = c.title.split(", ").count();
        assert!((2..=4).contains(&words), "title {:?}", c.title);
        assert!(
            c.title
                .split(", ")
                .all(|w| w.starts_with(char::is_uppercase)),
            "title {:?}",
            c.title
        );
        assert!(segments.iter().any(|seg| seg.text == c.summary), "{c:?}");
    }
    // Titles name the topics: a pasta word before the switch, a bicycle
    // word after it.
    let title_at = |ms: i64| {
        s.chapters
            .iter()
            .find(|c| c.start_ms <= ms && ms < c.end_ms)
            .map(|c| c.title.to_lowercase())
            .unwrap_or_default()
    };
    let cooking = [
        "pasta",
        "spaghetti",
        "sauce",
        "water",
        "tomato",
        "garlic",
        "basil",
        "cheese",
    ];
    let repair = [
        "bicycle", "tire", "tube", "rim", "wheel", "chain", "brake", "bead",
    ];
    let first = title_at(10_000);
    let last = title_at(190_000);
    assert!(
        cooking.iter().any(|w| first.contains(w)),
        "first title {first:?}"
    );
    assert!(
        repair.iter().any(|w| last.contains(w)),
        "last title {last:?}"
    );
    assert!(
        !repair.iter().any(|w| first.contains(w)),
        "first title {first:?}"
    );
    assert!(
        !cooking.iter().any(|w| last.contains(w)),
        "last title {last:?}"
    );

    // The summary is made of transcript sentences, three of them, and
    // covers both topics.
    let picked: Vec<&str> = PASTA
        .iter()
        .chain(BICYCLE.iter())
        .copied()
        .filter(|t| s.summary.contains(t))
        .collect();
    assert_eq!(picked.len(), 3, "summary {:?}", s.summary);
    assert_eq!(
        picked.iter().map(|p| p.len()).sum::<usize>() + 2,
        s.summary.len(),
        "the summary holds nothing but transcript sentences: {:?}",
        s.summary
    );
    assert!(
        PASTA.iter().any(|t| s.summary.contains(t))
            && BICYCLE.iter().any(|t| s.summary.contains(t))
    );

    // Key points: distinct transcript sentences, not in the summary, with
    // their own segment's start time, in time order.
    assert_eq!(s.key_points.len(), 5);
    for k in &s.key_points {
        let seg = segments
            .iter()
            .find(|seg| seg.text == k.text)
            .unwrap_or_else(|| panic!("key point {k:?} is not a transcript sentence"));
        assert_eq!(k.start_ms, seg.start_ms);
        assert!(!s.summary.contains(&k.text));
    }
    assert!(
        s.key_points
            .windows(2)
            .all(|w| w[0].start_ms < w[1].start_ms)
    );

    // Markdown and JSON.
    let md = s.to_markdown(Some("Pasta and bicycles"));
    for heading in [
        "# Pasta and bicycles\n",
        "## Summary\n",
        "## Key points\n",
        "## Chapters\n",
    ] {
        assert!(md.contains(heading), "{heading:?} missing from\n{md}");
    }
    for k in &s.key_points {
        assert!(
            md.contains(&format!("- [{}] {}", format_timestamp(k.start_ms), k.text)),
            "{md}"
        );
    }
    for c in &s.chapters {
        assert!(
            md.contains(&format!(
                "### [{}] {}",
                format_timestamp(c.start_ms),
                c.title
            )),
            "{md}"
        );
    }
    assert!(md.contains("[01:"), "{md}");
    let back: Summary = serde_json::from_str(&s.to_json()).expect("JSON parses");
    assert_eq!(back, s);
    let v: Value = serde_json::from_str(&s.to_json()).expect("JSON parses");
    assert!(v["chapters"][0]["start_ms"].is_i64() && v["key_points"][0]["text"].is_string());
}

#[test]
fn extractive_edge_cases() {
    let opts = ExtractiveOptions::default();
    let none = extractive(&[], &opts);
    assert_eq!(none.summary, NO_SPEECH);
    assert!(none.summary.to_lowercase().contains("no speech"));
    let silence = extractive(&timed(&["", "[Music]", "  "], 3_000), &opts);
    assert_eq!(silence.summary, NO_SPEECH);
    assert!(silence.chapters.is_empty() && silence.key_points.is_empty());

    let one = extractive(&timed(&["The bridge opens at noon."], 2_000), &opts);
    assert_eq!(one.summary, "The bridge opens at noon.");
    assert_eq!(one.chapters.len(), 1);
    assert_eq!(
        (one.chapters[0].start_ms, one.chapters[0].end_ms),
        (0, 2_000)
    );

    // Without punctuation, a segment split mid-sentence, out of order.
    let mut segs = vec![
        TimedText {
            start_ms: 6_000,
            end_ms: 9_000,
            text: "and the lighthouse keeper".into(),
        },
        TimedText {
            start_ms: 0,
            end_ms: 6_000,
            text: "the storm reached the coast at night".into(),
        },
        TimedText {
            start_ms: 9_000,
            end_ms: 12_000,
            text: "kept the lamp burning until dawn".into(),
        },
    ];
    let s = extractive(&segs, &opts);
    assert!(
        s.summary.starts_with("the storm reached"),
        "{:?}",
        s.summary
    );
    segs.truncate(0);
    assert_eq!(extractive(&segs, &opts).summary, NO_SPEECH);
}

/// Sentences drawn from six topics in turns, about 4,000 words in 25
/// minutes: the cost of a real talk.
fn long_talk() -> Vec<TimedText> {
    const TOPICS: [[&str; 8]; 6] = [
        [
            "garden", "soil", "compost", "seeds", "watering", "tomatoes", "roots", "mulch",
        ],
        [
            "telescope",
            "planets",
            "orbit",
            "stars",
            "galaxy",
            "lens",
            "moon",
            "comet",
        ],
        [
            "budget",
            "savings",
            "interest",
            "loan",
            "inflation",
            "taxes",
            "pension",
            "stocks",
        ],
        [
            "guitar",
            "chords",
            "melody",
            "rhythm",
            "strings",
            "tempo",
            "scales",
            "amplifier",
        ],
        [
            "database",
            "query",
            "index",
            "schema",
            "transaction",
            "replica",
            "cache",
            "backup",
        ],
        [
            "marathon",
            "training",
            "stamina",
            "stretching",
            "sprint",
            "shoes",
            "pace",
            "hydration",
        ],
    ];
    const FRAMES: [&str; 6] = [
        "When we look at the {a} we should remember that the {b} matters more than most people expect",
        "A common mistake with the {a} is to ignore the {b} until it is far too late to fix",
        "My advice is to check the {a} every week and to keep notes about the {b}",
        "The {a} and the {b} work together, so change one of them slowly and watch the other",
        "Experts disagree about the {a}, but everyone agrees that a good {b} pays off",
        "If you only remember one thing about the {a}, remember how it shapes the {b}",
    ];
    let mut out = Vec::new();
    let mut t = 0i64;
    let mut words = 0usize;
    let mut i = 0usize;
    while words < 4_000 {
        let topic = &TOPICS[(i / 40) % TOPICS.len()];
        let frame = FRAMES[(i * 7) % FRAMES.len()];
        let text = frame
            .replace("{a}", topic[(i * 3) % 8])
            .replace("{b}", topic[(i * 5 + 1) % 8])
            + ".";
        let n = text.split(' ').count();
        let ms = n as i64 * 375; // 160 words a minute
        out.push(TimedText {
            start_ms: t,
            end_ms: t + ms,
            text,
        });
        t += ms;
        words += n;
        i += 1;
    }
    out
}

#[test]
fn extractive_on_a_long_talk() {
    let segs = long_talk();
    let words: usize = segs.iter().map(|s| s.text.split(' ').count()).sum();
    let end = segs.last().map(|s| s.end_ms).unwrap_or(0);
    assert!(
        words >= 4_000 && end >= 24 * 60_000,
        "{words} words, {end} ms"
    );
    let opts = ExtractiveOptions::default();
    let started = Instant::now();
    let s = extractive(&segs, &opts);
    let took = started.elapsed();
    eprintln!(
        "extractive: {words} words, {} segments in {took:?}",
        segs.len()
    );
    // Generous: the unoptimised test build took about 0.1 s here; an
    // O(n^3) step would take far longer.
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(s.key_points.len(), opts.key_points);
    assert!(
        s.chapters.len() >= 4 && s.chapters.len() <= opts.max_chapters,
        "{:#?}",
        s.chapters
    );
    for c in &s.chapters {
        assert!(c.end_ms - c.start_ms >= opts.min_chapter_ms, "{c:?}");
    }
    assert_eq!(extractive(&segs, &opts), s, "deterministic");
}

// ---------------------------------------------------------------------------
// Chat completions: the contract, against a local stand-in server.

/// A request as the stand-in server saw it.
#[derive(Debug, Clone)]
struct Seen {
    /// Header names lowercased.
    headers: HashMap<String, String>,
    body: Value,
}

impl Seen {
    fn user(&self) -> &str {
        self.body["messages"][1]["content"].as_str().unwrap_or("")
    }
    fn is_reduce(&self) -> bool {
        self.user().contains("partial summaries")
    }
    fn content_bytes(&self) -> usize {
        self.body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| m["content"].as_str().map_or(0, str::len))
                    .sum()
            })
            .unwrap_or(0)
    }
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
    /// A chat-completions answer whose message content is `content`.
    fn completion(content: &str) -> Self {
        Self::json(
            200,
            json!({
                "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000,
                "model": "test-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}
            }),
        )
    }
}

type Handler = Arc<dyn Fn(usize, &Seen) -> Reply + Send + Sync>;

/// The stand-in server: its base URL (ending in /v1) and what it saw.
struct Server {
    base_url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Most requests it was answering at once.
    peak: Arc<AtomicUsize>,
}

impl Server {
    async fn start(handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let peak: Arc<AtomicUsize> = Arc::default();
        let in_flight: Arc<AtomicUsize> = Arc::default();
        let most = peak.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (handler, log) = (handler.clone(), log.clone());
                let (in_flight, most) = (in_flight.clone(), most.clone());
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else {
                        return;
                    };
                    let n = {
                        let mut log = log.lock().expect("lock");
                        log.push(request.clone());
                        log.len() - 1
                    };
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let reply = handler(n, &request);
                    tokio::time::sleep(reply.delay).await;
                    let mut head = format!(
                        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                        reply.status,
                        reply.body.len()
                    );
                    for (k, v) in &reply.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(reply.body.as_bytes()).await;
                    let _ = socket.shutdown().await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            base_url: format!("http://{addr}/v1"),
            seen,
            peak,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Reads one HTTP/1.1 request with a content-length body; checks the path.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?;
    assert_eq!(request_line, "POST /v1/chat/completions HTTP/1.1");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers.get("content-length")?.parse().ok()?;
    while buf.len() < header_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[header_end..header_end + length]).ok()?;
    Some(Seen { headers, body })
}

/// Answers like a model that follows the prompt: a map answer names the
/// first timestamp of its chunk; a reduce answer (in a code fence, as
/// models often do) keeps one chapter per part, plus a key point at a
/// time past the end of the video.
fn model(_: usize, seen: &Seen) -> Reply {
    let user = seen.user();
    if seen.is_reduce() {
        let chapters: Vec<Value> = user
            .lines()
            .filter_map(|l| l.strip_prefix("- ["))
            .filter_map(|l| l.split_once("] Chapter at "))
            .map(|(t, _)| json!({"time": t, "title": format!("Chapter at {t}"), "summary": "merged"}))
            .collect();
        let answer = json!({
            "language": "en",
            "summary": "Combined summary.",
            "key_points": [{"text": "the end", "time": "99:59"}, {"text": "the start", "time": "00:00"}],
            "chapters": chapters,
        });
        return Reply::completion(&format!("```json\n{answer:#}\n```"));
    }
    let transcript = user.split("Transcript:\n").nth(1).unwrap_or("");
    let first = transcript
        .lines()
        .next()
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split_once(']'))
        .map(|(t, _)| t.to_string())
        .unwrap_or_default();
    Reply::completion(
        &json!({
            "language": "en",
            "summary": format!("Part from {first}."),
            "key_points": [{"text": format!("Point at {first}"), "time": first}],
            "chapters": [{"time": first, "title": format!("Chapter at {first}"), "summary": "a part"}],
        })
        .to_string(),
    )
}

fn options(max_input_tokens: usize) -> ChatOptions {
    ChatOptions {
        timeout: Duration::from_secs(10),
        max_input_tokens,
        attempts: 3,
        max_concurrency: 2,
    }
}

const KEY: &str = "sk-test-5ecret-do-not-leak";

fn key() -> Option<SecretString> {
    Some(SecretString::from(KEY))
}

#[tokio::test]
async fn chat_map_reduce_contract() {
    // Slow answers, so that concurrent map calls overlap at the server.
    let server = Server::start(Arc::new(|n, seen: &Seen| Reply {
        delay: Duration::from_millis(150),
        ..model(n, seen)
    }))
    .await;
    let budget = 450;
    let chat = ChatSummarizer::new(&server.base_url, "test-model", key(), options(budget))
        .expect("summarizer");
    let segments = two_topics();
    let s = chat
        .summarize(&segments, &CancellationToken::new())
        .await
        .expect("summary");
    let seen = server.seen();

    let maps: Vec<&Seen> = seen.iter().filter(|r| !r.is_reduce()).collect();
    let reduces = seen.len() - maps.len();
    assert!(maps.len() >= 3, "{} map calls", maps.len());
    assert_eq!(reduces, 1, "one reduce call");
    assert_eq!(
        server.peak.load(Ordering::SeqCst),
        2,
        "map calls run concurrently, at most max_concurrency at once"
    );
    for r in &seen {
        assert_eq!(r.body["model"], "test-model");
        assert_eq!(r.body["messages"][0]["role"], "system");
        assert_eq!(r.body["messages"][1]["role"], "user");
        assert_eq!(r.body["response_format"], json!({"type": "json_object"}));
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some(format!("Bearer {KEY}").as_str())
        );
        assert!(
            r.content_bytes() <= budget * 4,
            "{} bytes over a {budget}-token budget",
            r.content_bytes()
        );
    }
    // Every sentence goes to exactly one map call, with its timestamp.
    for seg in &segments {
        let line = format!("[{}] {}", format_timestamp(seg.start_ms), seg.text);
        let n = maps.iter().filter(|r| r.user().contains(&line)).count();
        assert_eq!(n, 1, "{line:?} sent {n} times");
    }
    // The reduce call carries each map answer.
    let reduce = seen.iter().find(|r| r.is_reduce()).expect("a reduce call");
    for m in &maps {
        let first = m
            .user()
            .split("Transcript:\n[")
            .nth(1)
            .and_then(|l| l.split_once(']'))
            .map(|p| p.0);
        let first = first.expect("map prompt has timestamped lines");
        assert!(
            reduce.user().contains(&format!("Part from {first}.")),
            "{}",
            reduce.user()
        );
    }

    // Times come back as milliseconds, on the chunk starts, clamped.
    let mut starts: Vec<i64> = maps
        .iter()
        .filter_map(|r| {
            r.user()
                .split("Transcript:\n[")
                .nth(1)?
                .split_once(']')
                .map(|p| p.0.to_string())
        })
        .filter_map(|t| parse_timestamp(&t))
        .collect();
    starts.sort_unstable();
    let chapter_starts: Vec<i64> = s.chapters.iter().map(|c| c.start_ms).collect();
    assert_eq!(chapter_starts, starts);
    assert_eq!(s.chapters[0].start_ms, 0);
    assert_eq!(s.chapters.last().map(|c| c.end_ms), Some(200_000));
    for pair in s.chapters.windows(2) {
        assert_eq!(pair[0].end_ms, pair[1].start_ms);
    }
    assert_eq!(s.summary, "Combined summary.");
    let points: Vec<(&str, i64)> = s
        .key_points
        .iter()
        .map(|k| (k.text.as_str(), k.start_ms))
        .collect();
    assert_eq!(points, [("the start", 0), ("the end", 200_000)]);
    assert_eq!(s.language.as_deref(), Some("en"));
    assert_eq!(s.backend, "chat:test-model");
    assert!(s.to_markdown(None).contains("### [00:00] Chapter at 00:00"));
}

#[tokio::test]
async fn chat_without_key_sends_no_authorization() {
    let server = Server::start(Arc::new(model)).await;
    let chat = ChatSummarizer::new(&server.base_url, "llama3.2", None, options(100_000))
        .expect("summarizer");
    let s = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect("summary");
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "one chunk, no reduce");
    assert!(!seen[0].headers.contains_key("authorization"));
    assert_eq!(s.summary, "Part from 00:00.");
    assert_eq!(s.key_points[0].start_ms, 0);
    assert_eq!(s.chapters.len(), 1);
    assert_eq!((s.chapters[0].start_ms, s.chapters[0].end_ms), (0, 200_000));

    // No words: no request at all.
    let none = chat
        .summarize(&timed(&["", " "], 1_000), &CancellationToken::new())
        .await
        .expect("summary");
    assert_eq!(none.summary, NO_SPEECH);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn chat_retries_429_then_succeeds() {
    let server = Server::start(Arc::new(|n, seen: &Seen| {
        if n == 0 {
            let mut r = Reply::json(
                429,
                json!({"error": {"message": "Rate limit reached", "type": "requests"}}),
            );
            r.headers.push(("retry-after", "1".into()));
            r
        } else {
            model(n, seen)
        }
    }))
    .await;
    let chat = ChatSummarizer::new(&server.base_url, "test-model", key(), options(100_000))
        .expect("summarizer");
    let started = Instant::now();
    let s = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect("summary after a 429");
    assert_eq!(server.seen().len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After honoured"
    );
    assert_eq!(s.summary, "Part from 00:00.");
}

#[tokio::test]
async fn chat_long_retry_after_goes_back_to_the_runner() {
    let server = Server::start(Arc::new(|_, _: &Seen| {
        let mut r = Reply::json(429, json!({"error": {"message": "quota"}}));
        r.headers.push(("retry-after", "120".into()));
        r
    }))
    .await;
    let chat = ChatSummarizer::new(&server.base_url, "test-model", key(), options(100_000))
        .expect("summarizer");
    let err = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect_err("rate limited");
    assert_eq!(server.seen().len(), 1, "not waited out inline");
    let e = StageError::from(err);
    assert_eq!(
        (e.class, e.kind.as_str()),
        (ErrorClass::Retryable, "llm_rate_limited")
    );
    assert_eq!(e.retry_after, Some(Duration::from_secs(120)));
}

#[tokio::test]
async fn chat_retries_5xx() {
    let server = Server::start(Arc::new(|n, seen: &Seen| {
        if n < 2 {
            Reply::json(503, json!({"error": "overloaded"}))
        } else {
            model(n, seen)
        }
    }))
    .await;
    let chat = ChatSummarizer::new(&server.base_url, "test-model", None, options(100_000))
        .expect("summarizer");
    chat.summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect("summary after two 503s");
    assert_eq!(server.seen().len(), 3);

    // All attempts fail: retryable.
    let server = Server::start(Arc::new(|_, _: &Seen| Reply::json(502, json!({})))).await;
    let chat = ChatSummarizer::new(
        &server.base_url,
        "test-model",
        None,
        ChatOptions {
            attempts: 2,
            ..options(100_000)
        },
    )
    .expect("summarizer");
    let err = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect_err("502s");
    assert_eq!(server.seen().len(), 2);
    let e = StageError::from(err);
    assert_eq!(
        (e.class, e.kind.as_str()),
        (ErrorClass::Retryable, "llm_unavailable")
    );
}

#[tokio::test]
async fn chat_400_is_permanent_and_hides_the_key() {
    // The server quotes the header back, as some do in their errors.
    let server = Server::start(Arc::new(|_, seen: &Seen| {
        let auth = seen
            .headers
            .get("authorization")
            .cloned()
            .unwrap_or_default();
        Reply::json(
            400,
            json!({"error": {"message": format!("model 'nope' not found (sent {auth})")}}),
        )
    }))
    .await;
    let chat =
        ChatSummarizer::new(&server.base_url, "nope", key(), options(100_000)).expect("summarizer");
    let err = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect_err("rejected");
    assert_eq!(server.seen().len(), 1, "not retried");
    assert!(
        matches!(err, SummarizeError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    let debug = format!("{err:?}");
    let e = StageError::from(err);
    assert_eq!(
        (e.class, e.kind.as_str()),
        (ErrorClass::Permanent, "llm_rejected")
    );
    assert!(e.message.contains("not found"), "{}", e.message);
    assert!(e.message.contains("[redacted]"), "{}", e.message);
    for text in [
        e.message.as_str(),
        debug.as_str(),
        &e.to_string(),
        &format!("{chat:?}"),
    ] {
        assert!(!text.contains(KEY), "key leaked: {text}");
        assert!(!text.contains("5ecret"), "key leaked: {text}");
    }
}

#[tokio::test]
async fn chat_bad_output_is_retried_then_retryable() {
    let server = Server::start(Arc::new(|_, _: &Seen| {
        Reply::completion("Sure! Here is a summary: the video is about pasta.")
    }))
    .await;
    let chat = ChatSummarizer::new(
        &server.base_url,
        "test-model",
        None,
        ChatOptions {
            attempts: 2,
            ..options(100_000)
        },
    )
    .expect("summarizer");
    let err = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect_err("bad output");
    assert_eq!(server.seen().len(), 2);
    let e = StageError::from(err);
    assert_eq!(
        (e.class, e.kind.as_str()),
        (ErrorClass::Retryable, "llm_bad_output")
    );
}

#[tokio::test]
async fn chat_without_json_mode_support() {
    // A server that refuses response_format, as some older ones do.
    let server = Server::start(Arc::new(|n, seen: &Seen| {
        if seen.body.get("response_format").is_some() {
            Reply::json(
                400,
                json!({"error": {"message": "unknown field: response_format"}}),
            )
        } else {
            model(n, seen)
        }
    }))
    .await;
    let chat = ChatSummarizer::new(&server.base_url, "test-model", None, options(100_000))
        .expect("summarizer");
    let cancel = CancellationToken::new();
    chat.summarize(&two_topics(), &cancel)
        .await
        .expect("summary without JSON mode");
    chat.summarize(&two_topics(), &cancel).await.expect("again");
    let seen = server.seen();
    assert_eq!(
        seen.len(),
        3,
        "asked once with response_format, then never again"
    );
    assert!(seen[0].body.get("response_format").is_some());
    assert!(
        seen[1..]
            .iter()
            .all(|r| r.body.get("response_format").is_none())
    );
}

#[tokio::test]
async fn chat_cancel_and_unreachable() {
    let server = Server::start(Arc::new(|n, seen: &Seen| Reply {
        delay: Duration::from_secs(30),
        ..model(n, seen)
    }))
    .await;
    let chat = ChatSummarizer::new(&server.base_url, "test-model", None, options(100_000))
        .expect("summarizer");
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let err = chat
        .summarize(&two_topics(), &cancel)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, SummarizeError::Cancelled), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(StageError::from(err).class, ErrorClass::Retryable);

    // Nothing listens on the port of a listener that was dropped.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let chat = ChatSummarizer::new(
        &format!("http://127.0.0.1:{port}/v1"),
        "test-model",
        key(),
        ChatOptions {
            attempts: 1,
            ..options(100_000)
        },
    )
    .expect("summarizer");
    let err = chat
        .summarize(&two_topics(), &CancellationToken::new())
        .await
        .expect_err("unreachable");
    let e = StageError::from(err);
    assert_eq!(
        (e.class, e.kind.as_str()),
        (ErrorClass::Retryable, "llm_unavailable")
    );
    assert!(!e.message.contains(KEY));

    // Settings that cannot work are refused up front.
    for (url, model, tokens) in [
        ("not a url", "m", 100_000),
        ("ftp://x/v1", "m", 100_000),
        ("http://x/v1", " ", 100_000),
        ("http://x/v1", "m", 50),
    ] {
        let r = ChatSummarizer::new(url, model, None, options(tokens));
        assert!(
            matches!(r, Err(SummarizeError::Config(_))),
            "{url} {model:?} {tokens}: {r:?}"
        );
    }
}
