//! A 25-minute spoken file through `vidpipe run` (a child process): chunked
//! at silences, transcribed chunk by chunk, stitched with timestamps that
//! stay right across chunk borders, while the process's peak resident
//! memory stays bounded (media streams to disk, never into memory).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use vidpipe::backends::asr::Transcript;
use vidpipe::client;

use crate::helpers::{config, fresh_database_url, unique};
use crate::pipeline::{SCRIPTS, serve};

const SAMPLE_RATE: usize = 16_000;
const NUMBERS: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

fn words(n: usize) -> String {
    match n {
        0..=19 => NUMBERS[n].to_string(),
        20..=99 if n.is_multiple_of(10) => TENS[n / 10].to_string(),
        20..=99 => format!("{} {}", TENS[n / 10], NUMBERS[n % 10]),
        _ => format!("one hundred {}", words(n - 100)),
    }
}

/// 16 kHz mono s16le samples of `text`, spoken by espeak-ng.
fn speak(dir: &std::path::Path, text: &str) -> Vec<u8> {
    let wav = dir.join("s.wav");
    let raw = dir.join("s.raw");
    let ok = Command::new("espeak-ng")
        .args(["-s", "170", "-w"])
        .arg(&wav)
        .arg(text)
        .status()
        .expect("espeak-ng");
    assert!(ok.success());
    let ok = Command::new("ffmpeg")
        .args(["-loglevel", "error", "-nostdin", "-y", "-i"])
        .arg(&wav)
        .args(["-f", "s16le", "-ac", "1", "-ar", "16000"])
        .arg(&raw)
        .status()
        .expect("ffmpeg");
    assert!(ok.success());
    std::fs::read(&raw).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_25_minute_file_is_chunked_and_timed_right_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    // Numbered sections with a pause after each, until 25 minutes; each
    // section's start time is known to the sample.
    let mut pcm: Vec<u8> = Vec::new();
    let mut starts: Vec<(usize, f64)> = Vec::new();
    let target = 25 * 60 * SAMPLE_RATE * 2;
    let mut n = 1;
    while pcm.len() < target {
        starts.push((n, pcm.len() as f64 / (SAMPLE_RATE * 2) as f64));
        let text = format!("Section {}. {}", words(n), SCRIPTS[n % SCRIPTS.len()]);
        pcm.extend(speak(dir.path(), &text));
        pcm.extend(std::iter::repeat_n(0u8, SAMPLE_RATE * 2 * 6 / 10));
        n += 1;
    }
    let total_secs = pcm.len() as f64 / (SAMPLE_RATE * 2) as f64;
    let raw = dir.path().join("all.raw");
    std::fs::write(&raw, &pcm).unwrap();
    drop(pcm);
    let ok = Command::new("ffmpeg")
        .args([
            "-loglevel",
            "error",
            "-nostdin",
            "-y",
            "-f",
            "s16le",
            "-ar",
            "16000",
            "-ac",
            "1",
            "-i",
        ])
        .arg(&raw)
        .args(["-c:a", "aac", "-b:a", "48k"])
        .arg(media.join("long.m4a"))
        .status()
        .unwrap();
    assert!(ok.success());
    eprintln!(
        "generated {total_secs:.0} s of speech in {} sections",
        starts.len()
    );

    let site = serve(&media, "127.0.0.1").await;
    let mut c = config();
    c.topic_prefix = format!("{}.", unique("long"));
    let (pool, db_url) = fresh_database_url(&c).await;
    let blobs = tempfile::tempdir().unwrap();
    let mut run = Command::new(env!("CARGO_BIN_EXE_vidpipe"));
    run.args(["run", "--instance", "long"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("VIDPIPE_TOPIC_PREFIX", &c.topic_prefix)
        .env("VIDPIPE_DATABASE_URL", db_url.expose_secret())
        .env("VIDPIPE_STORAGE", blobs.path())
        .env("VIDPIPE_NET_ALLOW", "127.0.0.1/32")
        .env("VIDPIPE_TOPIC_PARTITIONS", "1")
        .env("VIDPIPE_MEDIA__CHUNK_SECS", "300")
        .env("VIDPIPE_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("run.log")).unwrap());
    let mut child = crate::procs::Proc(run.spawn().expect("vidpipe run"));
    let url = site.url("media/long.m4a");
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        match client::submit(&c, &pool, std::slice::from_ref(&url), false, None).await {
            Ok(s) => break s[0].id.clone(),
            Err(e) => {
                assert!(Instant::now() < deadline, "submit: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(1200);
    let mut peak_kib = 0u64;
    let v = loop {
        // Peak resident memory of the pipeline process so far (VmHWM).
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        let v = client::status(&pool, std::slice::from_ref(&id), 1)
            .await
            .unwrap();
        if let Some(v) = v
            .into_iter()
            .find(|v| v.status == "done" || v.status == "failed")
        {
            break v;
        }
        assert!(child.try_wait().unwrap().is_none(), "vidpipe run exited");
        assert!(Instant::now() < deadline, "the long file did not finish");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let took = started.elapsed();
    assert_eq!(
        v.status,
        "done",
        "{v:#?}\n{}",
        std::fs::read_to_string(dir.path().join("run.log")).unwrap()
    );
    let extracted = client::stage_output(&pool, &id, "extract-audio", None)
        .await
        .unwrap()
        .unwrap();
    let chunks = extracted["chunks"].as_array().unwrap().len();
    let record = client::stage_output(&pool, &id, "transcribe", None)
        .await
        .unwrap()
        .unwrap();
    let store = vidpipe::store::blobs::BlobStore::open(blobs.path()).unwrap();
    let t: Transcript = serde_json::from_slice(
        &store
            .read(record["transcript"]["uri"].as_str().unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    eprintln!(
        "25-minute file: {chunks} chunks, {} segments, {:.0} s to process ({:.3} of real time), peak RSS of vidpipe run {:.1} MiB",
        t.segments.len(),
        took.as_secs_f64(),
        took.as_secs_f64() / total_secs,
        peak_kib as f64 / 1024.0
    );
    assert!(
        chunks >= 5,
        "25 minutes at 5-minute chunks makes at least 5 chunks, got {chunks}"
    );
    assert!(
        t.segments
            .windows(2)
            .all(|w| w[0].start_ms <= w[1].start_ms),
        "segments in time order"
    );
    let last_end = t.segments.last().unwrap().end_ms as f64 / 1000.0;
    assert!(
        (last_end - total_secs).abs() < 30.0,
        "the transcript ends near {total_secs:.0} s, not {last_end:.0} s"
    );
    // Each section's number is heard where that section starts, also in
    // chunks after the first: timestamps survive the stitching.
    let mut found = 0;
    let mut late = Vec::new();
    for (n, at) in &starts {
        let spoken = [format!("section {}", words(*n)), format!("section {n}")];
        let hit = t.segments.iter().find(|s| {
            let text = s.text.to_lowercase().replace(['-', ',', '.'], " ");
            // Word-bounded: "section 1" must not match "section 10".
            let text = format!(
                " {} ",
                text.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            spoken.iter().any(|w| text.contains(&format!(" {w} ")))
        });
        if let Some(s) = hit {
            found += 1;
            // Whisper's segments run up to ~30 s and may start in the
            // section before: the section's start must fall inside the
            // segment that holds its number (with 2 s of slack).
            let (start, end) = (s.start_ms as f64 / 1000.0, s.end_ms as f64 / 1000.0);
            if *at < start - 2.0 || *at > end + 2.0 {
                late.push((*n, *at, s.start_ms, s.end_ms));
            }
        }
    }
    eprintln!("section markers heard: {found} of {}", starts.len());
    assert!(
        found * 10 >= starts.len() * 7,
        "at least 70% of section markers heard ({found} of {})",
        starts.len()
    );
    // The sections around each chunk border (the last before it and the
    // first two after it) must all be placed right: that is where stitching
    // could shift or drop time. Elsewhere tiny.en's own timestamp drift
    // within a chunk is tolerated up to 5% of sections, and reported.
    let borders: Vec<f64> = extracted["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|c| c["offset_ms"].as_f64().unwrap() / 1000.0)
        .collect();
    let near_border = |at: f64| {
        borders.iter().any(|b| {
            let i = starts.partition_point(|(_, s)| *s < *b);
            (i.saturating_sub(1)..(i + 2).min(starts.len()))
                .any(|k| (starts[k].1 - at).abs() < 0.01)
        })
    };
    eprintln!(
        "misplaced sections (n, expected s, segment ms): {late:?}; chunk borders at {borders:?} s"
    );
    let at_borders: Vec<_> = late.iter().filter(|l| near_border(l.1)).collect();
    assert!(
        at_borders.is_empty(),
        "sections next to a chunk border transcribed at the wrong time: {at_borders:?}"
    );
    assert!(
        late.len() * 20 <= found,
        "more than 5% of sections misplaced: {late:?}"
    );
    assert!(
        peak_kib < 400 * 1024,
        "peak RSS {peak_kib} KiB: media must stream, not sit in memory"
    );
    crate::procs::signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
}
