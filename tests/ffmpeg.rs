//! ffprobe and ffmpeg on real files made here with ffmpeg and espeak-ng:
//! speech in a video, files without audio, broken and hostile inputs, and a
//! 25-minute recording cut into chunks at its silences.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use vidpipe::media::ffmpeg::{self, Extracted, FfmpegError, Limits};
use vidpipe::template::{ErrorClass, StageError};

const SPEECH: &str = "Hello, this is vidpipe. It turns videos into transcripts, \
                      one chunk at a time.";

/// Runs a tool to make a test input; a missing tool fails the test by name.
async fn tool(program: &str, args: &[&OsStr]) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("{program} is needed by this test and cannot be started: {e} (apt-get install ffmpeg espeak-ng)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ffprobe -show_format -show_streams` as JSON, run independently of the
/// code under test.
async fn ffprobe_json(path: &Path) -> serde_json::Value {
    let out = tokio::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
        ])
        .arg(path)
        .output()
        .await
        .unwrap_or_else(|e| panic!("ffprobe is needed by this test and cannot be started: {e}"));
    assert!(
        out.status.success(),
        "ffprobe {path:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

fn json_secs(v: &serde_json::Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a duration: {v}"))
}

/// A few seconds of espeak-ng speech as WAV.
async fn speech_wav(dir: &Path) -> PathBuf {
    let wav = dir.join("speech.wav");
    tool(
        "espeak-ng",
        &[OsStr::new("-w"), wav.as_os_str(), OsStr::new(SPEECH)],
    )
    .await;
    wav
}

/// The speech muxed with a black video track into an MP4 (index at the end
/// unless `faststart`).
async fn speech_mp4(dir: &Path, name: &str, faststart: bool) -> (PathBuf, f64) {
    let wav = speech_wav(dir).await;
    let mp4 = dir.join(name);
    let mut args: Vec<&OsStr> = [
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "color=c=black:s=160x120:r=10",
        "-i",
    ]
    .map(OsStr::new)
    .to_vec();
    args.push(wav.as_os_str());
    args.extend(
        [
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c:v",
            "mpeg4",
            "-c:a",
            "aac",
            "-shortest",
        ]
        .map(OsStr::new),
    );
    if faststart {
        args.extend(["-movflags", "+faststart"].map(OsStr::new));
    }
    args.extend([OsStr::new("-y"), mp4.as_os_str()]);
    tool("ffmpeg", &args).await;
    let secs = json_secs(&ffprobe_json(&wav).await["format"]["duration"]);
    (mp4, secs)
}

/// 25 minutes of 440 Hz tone, 33 s on and 4 s off, as FLAC: speech-like
/// stretches with pauses at known places (every 37 s, from 33 s to 37 s).
async fn long_flac(dir: &Path) -> PathBuf {
    let flac = dir.join("long.flac");
    let mut args: Vec<&OsStr> = [
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=16000:duration=1500",
        // eval=frame switches per 1024-sample frame: the edges are off by
        // up to 64 ms, which the assertions allow for.
        "-af",
        "volume=volume='lt(mod(t,37),33)':eval=frame",
        "-ac",
        "1",
        "-c:a",
        "flac",
        "-y",
    ]
    .map(OsStr::new)
    .to_vec();
    args.push(flac.as_os_str());
    tool("ffmpeg", &args).await;
    flac
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

fn stage_error(err: FfmpegError) -> StageError {
    StageError::from(err)
}

#[track_caller]
fn assert_permanent(err: FfmpegError, kind: &str) -> StageError {
    let e = stage_error(err);
    assert_eq!(e.class, ErrorClass::Permanent, "{e:?}");
    assert_eq!(e.kind, kind, "{e:?}");
    e
}

/// Every byte of every file under `dir`.
fn all_output(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.expect("dir entry").path())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read output");
            (p, bytes)
        })
        .collect()
}

#[tokio::test]
async fn speech_in_a_video_becomes_one_16k_mono_chunk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp4, speech_secs) = speech_mp4(dir.path(), "talk.mp4", false).await;
    let limits = Limits::default();

    let probe = ffmpeg::probe(&mp4, &limits).await.expect("probe");
    assert!(probe.has_audio && probe.has_video, "{probe:?}");
    assert!(probe.format_name.contains("mp4"), "{probe:?}");
    let stated = probe.duration.expect("mp4 states a duration").as_secs_f64();
    assert!(
        (stated - speech_secs).abs() < 0.3,
        "{stated} vs {speech_secs}"
    );

    let out = dir.path().join("out");
    let got = ffmpeg::extract(&mp4, &out, &limits, &CancellationToken::new())
        .await
        .expect("extract");

    let info = ffprobe_json(&got.audio).await;
    let stream = &info["streams"][0];
    assert_eq!(info["streams"].as_array().map(Vec::len), Some(1), "{info}");
    assert_eq!(stream["codec_name"], "pcm_s16le", "{info}");
    assert_eq!(stream["sample_rate"], "16000", "{info}");
    assert_eq!(stream["channels"], 1, "{info}");
    let secs = got.duration.as_secs_f64();
    // AAC adds a few tens of ms of priming and padding.
    assert!((secs - speech_secs).abs() < 0.15, "{secs} vs {speech_secs}");
    assert!((json_secs(&info["format"]["duration"]) - secs).abs() < 0.001);

    assert_eq!(
        got.audio_bytes,
        std::fs::metadata(&got.audio).expect("stat").len()
    );
    assert_eq!(
        got.audio_bytes,
        44 + got.duration.as_nanos() as u64 * 32_000 / 1_000_000_000
    );
    assert_eq!(got.audio_sha256, sha256_hex(&got.audio));
    assert_eq!(got.chunks.len(), 1, "{got:?}");
    let chunk = &got.chunks[0];
    assert_eq!(chunk.path, got.audio);
    assert_eq!(chunk.offset, Duration::ZERO);
    assert_eq!(chunk.duration, got.duration);
    assert_eq!(
        (chunk.bytes, chunk.sha256.as_str()),
        (got.audio_bytes, got.audio_sha256.as_str())
    );

    // It is speech, not silence.
    let quiet = ffmpeg::silences(&got.audio, &limits)
        .await
        .expect("silences");
    let silent: f64 = quiet.iter().map(|(a, b)| (*b - *a).as_secs_f64()).sum();
    assert!(
        silent < secs * 0.5,
        "{silent} s of {secs} s silent: {quiet:?}"
    );

    // The same input gives the same bytes.
    let again = ffmpeg::extract(
        &mp4,
        &dir.path().join("again"),
        &limits,
        &CancellationToken::new(),
    )
    .await
    .expect("extract again");
    assert_eq!(again.audio_sha256, got.audio_sha256);
}

/// Writes an executable script at `path` that saves its environment
/// (`env -0`) to `dump` and fails.
fn env_dumper(path: &Path, dump: &Path) {
    crate::helpers::script(
        path,
        &format!("#!/bin/sh\nenv -0 > '{}'\nexit 1\n", dump.display()),
    );
}

/// The names of the variables in an `env -0` dump.
fn dumped_names(dump: &Path) -> Vec<String> {
    std::fs::read(dump)
        .expect("the tool ran and dumped its environment")
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            String::from_utf8_lossy(v.split(|b| *b == b'=').next().unwrap_or_default()).into_owned()
        })
        .collect()
}

/// ffmpeg, ffprobe and yt-dlp parse hostile input: they get PATH, HOME,
/// locale and TLS settings, and none of the rest of vidpipe's environment
/// (the test's own has CARGO_* and VIDPIPE_* variables at least).
#[tokio::test]
async fn tools_get_none_of_vidpipes_environment_but_the_basics() {
    // yt-dlp is also told its output encoding, and sh sets the last three.
    let extra = ["PYTHONIOENCODING", "PWD", "SHLVL", "_"];
    let allowed: Vec<&str> = vidpipe::media::TOOL_ENV
        .iter()
        .chain(&extra)
        .copied()
        .collect();
    assert!(std::env::vars_os().any(|(k, _)| !allowed.iter().any(|a| *a == k)));
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp4, _) = speech_mp4(dir.path(), "talk.mp4", false).await;

    let probe_dump = dir.path().join("ffprobe.env");
    env_dumper(&dir.path().join("ffprobe"), &probe_dump);
    let limits = Limits {
        ffprobe: dir.path().join("ffprobe"),
        ..Limits::default()
    };
    ffmpeg::extract(
        &mp4,
        &dir.path().join("out"),
        &limits,
        &CancellationToken::new(),
    )
    .await
    .expect_err("the stand-in ffprobe fails");

    let ytdlp_dump = dir.path().join("yt-dlp.env");
    env_dumper(&dir.path().join("yt-dlp"), &ytdlp_dump);
    vidpipe::media::ytdlp::Ytdlp::new(dir.path().join("yt-dlp"), 1 << 20, Duration::from_secs(30))
        .download(
            "https://example.com/v",
            &dir.path().join("d"),
            &CancellationToken::new(),
        )
        .await
        .expect_err("the stand-in yt-dlp fails");

    for dump in [probe_dump, ytdlp_dump] {
        let names = dumped_names(&dump);
        assert!(names.iter().any(|n| n == "PATH"), "{dump:?}: {names:?}");
        let leaked: Vec<&String> = names
            .iter()
            .filter(|n| !allowed.contains(&n.as_str()))
            .collect();
        assert!(leaked.is_empty(), "{dump:?} got {leaked:?}");
    }
}

/// `media.ffmpeg` and `media.ffprobe` name the executables started (a
/// static build of one's own, say): paths work, and a wrong one fails with
/// its own name although the default is on PATH.
#[tokio::test]
async fn the_configured_executables_are_the_ones_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp4, _) = speech_mp4(dir.path(), "talk.mp4", false).await;
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    for name in ["ffmpeg", "ffprobe"] {
        let real = which(name);
        std::os::unix::fs::symlink(real, bin.join(format!("my-{name}"))).expect("symlink");
    }
    let limits = Limits {
        ffmpeg: bin.join("my-ffmpeg"),
        ffprobe: bin.join("my-ffprobe"),
        ..Limits::default()
    };
    let out = dir.path().join("out");
    let extract = |limits: Limits| {
        let (mp4, out) = (mp4.clone(), out.clone());
        async move { ffmpeg::extract(&mp4, &out, &limits, &CancellationToken::new()).await }
    };
    let got = extract(limits)
        .await
        .expect("extract with configured paths");
    assert_eq!(got.chunks.len(), 1);

    let missing = bin.join("no-such-ffprobe");
    let limits = Limits {
        ffprobe: missing.clone(),
        ..Limits::default()
    };
    let err = extract(limits).await.expect_err("no such ffprobe");
    assert!(
        matches!(
            err,
            FfmpegError::ToolMissing {
                tool: "ffprobe",
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(message.contains("media.ffprobe"), "{message}");
}

/// The file `name` resolves to on PATH.
fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH: scripts/stack up installs it"))
}

#[tokio::test]
async fn a_video_without_audio_is_no_audio() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mp4 = dir.path().join("silent-film.mp4");
    let mut args: Vec<&OsStr> = [
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "color=c=black:s=160x120:r=10:d=2",
        "-c:v",
        "mpeg4",
        "-y",
    ]
    .map(OsStr::new)
    .to_vec();
    args.push(mp4.as_os_str());
    tool("ffmpeg", &args).await;

    let probe = ffmpeg::probe(&mp4, &Limits::default())
        .await
        .expect("probe");
    assert!(probe.has_video && !probe.has_audio, "{probe:?}");
    let err = ffmpeg::extract(
        &mp4,
        &dir.path().join("out"),
        &Limits::default(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("no audio");
    let e = assert_permanent(err, "no_audio");
    assert_eq!(e.message, "the file has no audio stream");
}

#[tokio::test]
async fn a_truncated_mp4_is_a_permanent_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp4, _) = speech_mp4(dir.path(), "whole.mp4", false).await;
    let bytes = std::fs::read(&mp4).expect("read");
    let half = dir.path().join("half.mp4");
    std::fs::write(&half, &bytes[..bytes.len() / 2]).expect("write");

    // The index (moov) is at the end: nothing can be read.
    let err = ffmpeg::extract(
        &half,
        &dir.path().join("out"),
        &Limits::default(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("truncated");
    let e = assert_permanent(err, "not_media");
    assert!(e.message.contains("moov atom not found"), "{e:?}");

    // With the index first, the first half may decode; anything else must be
    // a permanent error, never a panic or a retry.
    let (fast, speech_secs) = speech_mp4(dir.path(), "fast.mp4", true).await;
    let bytes = std::fs::read(&fast).expect("read");
    let fast_half = dir.path().join("fast-half.mp4");
    std::fs::write(&fast_half, &bytes[..bytes.len() / 2]).expect("write");
    match ffmpeg::extract(
        &fast_half,
        &dir.path().join("out2"),
        &Limits::default(),
        &CancellationToken::new(),
    )
    .await
    {
        Ok(got) => assert!(got.duration.as_secs_f64() < speech_secs, "{got:?}"),
        Err(err) => assert_eq!(stage_error(err).class, ErrorClass::Permanent),
    }
}

#[tokio::test]
async fn html_renamed_to_mp4_is_not_media() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("video.mp4");
    std::fs::write(
        &fake,
        "<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n",
    )
    .expect("write");
    let err = ffmpeg::extract(
        &fake,
        &dir.path().join("out"),
        &Limits::default(),
        &CancellationToken::new(),
    )
    .await
    .expect_err("html");
    let e = assert_permanent(err, "not_media");
    // What ffprobe said, short, without the path.
    assert!(
        e.message.len() > "not a readable media file: ".len() + 5,
        "{e:?}"
    );
    assert!(e.message.len() < 400, "{e:?}");
    assert!(!e.message.contains(&*dir.path().to_string_lossy()), "{e:?}");

    let empty = dir.path().join("empty.mp4");
    std::fs::write(&empty, b"").expect("write");
    let err = ffmpeg::probe(&empty, &Limits::default())
        .await
        .expect_err("empty");
    assert_permanent(err, "not_media");
}

#[tokio::test]
async fn playlists_and_scripts_naming_other_files_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let speech = speech_wav(dir.path()).await;
    // An MPEG-TS segment: the kind of file an HLS playlist may name.
    let segment = dir.path().join("seg.ts");
    let mut args: Vec<&OsStr> = ["-hide_banner", "-nostdin", "-v", "error", "-i"]
        .map(OsStr::new)
        .to_vec();
    args.push(speech.as_os_str());
    args.extend(["-c:a", "aac", "-f", "mpegts", "-y"].map(OsStr::new));
    args.push(segment.as_os_str());
    tool("ffmpeg", &args).await;
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let first_line = passwd.lines().next().expect("a line").to_owned();

    let hls = |segments: &[&str]| {
        let mut text = "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n".to_owned();
        for segment in segments {
            text.push_str(&format!("#EXTINF:10.0,\n{segment}\n"));
        }
        text + "#EXT-X-ENDLIST\n"
    };
    let follows_hls = hls(&["seg.ts"]);
    let follows_concat = "ffconcat version 1.0\nfile speech.wav\n".to_owned();
    let seg_url = format!("file://{}", segment.display());
    let passwd_hls = hls(&["file:///etc/passwd", &seg_url]);
    let passwd_concat = "ffconcat version 1.0\nfile speech.wav\nfile /etc/passwd\n".to_owned();

    // Control: plain ffprobe, without the whitelists, opens these and the
    // files they name, so their refusal below is the whitelists' doing.
    for (name, text, format) in [
        ("control.m3u8", &follows_hls, "hls"),
        ("control-hls.mp4", &follows_hls, "hls"),
        ("control.ffconcat", &follows_concat, "concat"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let control = ffprobe_json(&path).await;
        assert_eq!(
            control["format"]["format_name"], format,
            "{name}: {control}"
        );
    }

    for (name, text) in [
        ("follows.m3u8", &follows_hls),
        ("follows-hls.mp4", &follows_hls),
        ("follows.ffconcat", &follows_concat),
        ("follows-concat.mp3", &follows_concat),
        ("passwd.m3u8", &passwd_hls),
        ("passwd-hls.mp4", &passwd_hls),
        ("passwd.ffconcat", &passwd_concat),
    ] {
        let input = dir.path().join(name);
        std::fs::write(&input, text).expect("write");
        let out = dir.path().join(format!("out-{name}"));
        let err = ffmpeg::extract(&input, &out, &Limits::default(), &CancellationToken::new())
            .await
            .expect_err(name);
        let e = assert_permanent(err, "not_media");
        assert!(
            e.message.contains("format not accepted"),
            "{name}: refused for another reason: {e:?}"
        );
        assert!(
            !e.message.contains(&first_line) && !e.message.contains("root:"),
            "{e:?}"
        );
        for (path, bytes) in all_output(&out) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&first_line), "{path:?} holds /etc/passwd");
        }
    }
}

#[tokio::test]
async fn names_starting_with_a_dash_or_holding_a_colon_are_just_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp4, speech_secs) = speech_mp4(dir.path(), "plain.mp4", false).await;
    for name in ["-y", "-i http:x.mp4", "concat:a.mp4|b.mp4"] {
        let odd = dir.path().join(name);
        std::fs::copy(&mp4, &odd).expect("copy");
        let out = dir.path().join(format!("-out:{}", name.len()));
        let got = ffmpeg::extract(&odd, &out, &Limits::default(), &CancellationToken::new())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            (got.duration.as_secs_f64() - speech_secs).abs() < 0.15,
            "{name}: {got:?}"
        );
        assert_eq!(got.chunks.len(), 1);
        assert!(got.audio.starts_with(&out), "{got:?}");
    }
    // The copies are intact: nothing was written over an input.
    assert_eq!(sha256_hex(&dir.path().join("-y")), sha256_hex(&mp4));
}

#[tokio::test]
async fn twenty_five_minutes_are_cut_at_silences_into_overlapping_chunks() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let flac = long_flac(dir.path()).await;
    let generated = started.elapsed();

    let limits = Limits {
        chunk_target: Duration::from_secs(5 * 60),
        // ~5.2 minutes of 16 kHz WAV.
        chunk_max_bytes: 10_000_000,
        overlap: Duration::from_millis(1500),
        ..Limits::default()
    };
    let t = Instant::now();
    let got = ffmpeg::extract(
        &flac,
        &dir.path().join("out"),
        &limits,
        &CancellationToken::new(),
    )
    .await
    .expect("extract");
    let extracting = t.elapsed();
    eprintln!(
        "25-minute input: generated in {generated:?}, extracted and chunked in {extracting:?}"
    );

    let Extracted {
        audio,
        duration,
        chunks,
        ..
    } = &got;
    assert!(
        (duration.as_secs_f64() - 1500.0).abs() < 0.01,
        "{duration:?}"
    );
    assert!(
        (5..=7).contains(&chunks.len()),
        "{} chunks: {chunks:#?}",
        chunks.len()
    );

    let whole = std::fs::read(audio).expect("read audio");
    assert_eq!(&whole[36..40], b"data", "canonical WAV header");
    let pcm = &whole[44..];
    assert_eq!(chunks[0].offset, Duration::ZERO);
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last.offset + last.duration, *duration, "the end is covered");
    for (i, chunk) in chunks.iter().enumerate() {
        assert!(
            chunk.bytes <= limits.chunk_max_bytes,
            "chunk {i}: {chunk:?}"
        );
        assert!(
            chunk.duration > Duration::from_secs(150),
            "chunk {i} is a stub: {chunk:?}"
        );
        assert_eq!(
            chunk.bytes,
            std::fs::metadata(&chunk.path).expect("stat").len()
        );
        assert_eq!(chunk.sha256, sha256_hex(&chunk.path), "chunk {i}");
        // Sample-exact: the chunk's samples are the whole file's at its offset.
        let bytes = std::fs::read(&chunk.path).expect("read chunk");
        let first = (chunk.offset.as_nanos() / 62_500) as usize * 2;
        let len = (chunk.duration.as_nanos() / 62_500) as usize * 2;
        assert_eq!(bytes.len(), 44 + len, "chunk {i}");
        assert!(
            bytes[44..] == pcm[first..first + len],
            "chunk {i} samples differ from the whole"
        );
    }
    for (i, pair) in chunks.windows(2).enumerate() {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(b.offset > a.offset, "offsets increase: {chunks:#?}");
        let cut = a.offset + a.duration;
        let overlap = cut.as_secs_f64() - b.offset.as_secs_f64();
        assert!((overlap - 1.5).abs() < 0.001, "cut {i}: overlap {overlap}");
        // Tone is off from 33 s to 37 s of every 37.
        let phase = cut.as_secs_f64() % 37.0;
        assert!(
            (33.1..36.9).contains(&phase),
            "cut {i} at {cut:?} is not in a pause"
        );
    }
    // An independent reading of the first chunk.
    let info = ffprobe_json(&chunks[1].path).await;
    let secs = json_secs(&info["format"]["duration"]);
    assert!(
        (secs - chunks[1].duration.as_secs_f64()).abs() < 0.001,
        "{info}"
    );
    assert_eq!(info["streams"][0]["sample_rate"], "16000");

    // silencedetect finds every pause: 40 of them, each about 4 s.
    let quiet = ffmpeg::silences(audio, &limits).await.expect("silences");
    assert_eq!(quiet.len(), 40, "{quiet:?}");
    for (k, &(start, end)) in quiet.iter().enumerate() {
        let expected = 37.0 * k as f64 + 33.0;
        assert!(
            (start.as_secs_f64() - expected).abs() < 0.1,
            "silence {k}: {start:?}"
        );
        assert!(
            ((end - start).as_secs_f64() - 4.0).abs() < 0.1,
            "silence {k}: {end:?}"
        );
    }
    eprintln!("25-minute test took {:?} in all", started.elapsed());
}

#[tokio::test]
async fn media_over_max_duration_is_too_long() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mp4, _) = speech_mp4(dir.path(), "talk.mp4", false).await;
    let limits = Limits {
        max_duration: Duration::from_secs(1),
        ..Limits::default()
    };
    let err = ffmpeg::extract(
        &mp4,
        &dir.path().join("out"),
        &limits,
        &CancellationToken::new(),
    )
    .await
    .expect_err("too long");
    let e = assert_permanent(err, "too_long");
    assert!(e.message.contains("max_duration"), "{e:?}");

    // A byte bound the audio reaches is too long as well.
    let limits = Limits {
        max_output_bytes: 32_000,
        ..Limits::default()
    };
    let err = ffmpeg::extract(
        &mp4,
        &dir.path().join("out2"),
        &limits,
        &CancellationToken::new(),
    )
    .await
    .expect_err("too large");
    let e = assert_permanent(err, "too_long");
    assert!(e.message.contains("max_output_bytes"), "{e:?}");
}

#[tokio::test]
async fn cancellation_and_timeout_stop_the_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flac = long_flac(dir.path()).await;

    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let t = Instant::now();
    let err = ffmpeg::extract(&flac, &dir.path().join("out"), &Limits::default(), &cancel)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, FfmpegError::Cancelled), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(stage_error(err).class, ErrorClass::Retryable);

    let limits = Limits {
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let t = Instant::now();
    let err = ffmpeg::extract(
        &flac,
        &dir.path().join("out2"),
        &limits,
        &CancellationToken::new(),
    )
    .await
    .expect_err("timeout");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let e = stage_error(err);
    assert_eq!(
        (e.class, e.kind.as_str()),
        (ErrorClass::Retryable, "timeout"),
        "{e:?}"
    );
}
