//! ffprobe and ffmpeg behind a few async calls: [`probe`] says what a file
//! is, [`extract`] turns its first audio stream into one 16 kHz mono file and
//! splits long audio at silences ([`silences`], [`plan_chunks`]) into chunks
//! an ASR server accepts in one upload.
//!
//! Every input is hostile, so every run of either tool:
//! - gets an argument list, never a shell string, and the input as
//!   `file:<absolute path>`, so a name starting with `-` is never an option
//!   and a name containing `:` is never a protocol;
//! - allows only the `file` and `pipe` protocols and only real media
//!   containers ([`FORMAT_WHITELIST`]): no HLS, DASH or concat demuxer, which
//!   would open further files or URLs named inside the input;
//! - runs with a deadline and the caller's cancellation, is killed when
//!   either fires (and on drop), and has its stderr read line by line with
//!   only a short tail kept;
//! - is bounded in what it writes (`-t`, `-fs`).
//!
//! The output is 16-bit PCM WAV, not FLAC. Its fixed rate (32,000 bytes a
//! second) makes chunk sizes exact before they are written, lets chunks be
//! cut here by byte offsets (sample-accurate, no second ffmpeg run per
//! chunk), and every ASR server reads it. FLAC would halve the bytes, which
//! matters little for files that live minutes in a scratch directory: 24 MiB
//! of WAV still hold about 13 minutes, more than the 10-minute chunk target.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::template::StageError;

/// Sample rate of the extracted audio, what Whisper-style models expect.
pub const SAMPLE_RATE: u32 = 16_000;

/// Bytes per second of the extracted audio (16-bit mono at 16 kHz).
pub const BYTES_PER_SEC: u64 = SAMPLE_RATE as u64 * 2;

/// Demuxers ffmpeg and ffprobe may pick: containers that carry their media
/// inside themselves. Playlists and scripts (hls, dash, concat, ffconcat,
/// image sequences, lavfi, tty...) are left out on purpose: they open other
/// files or URLs named in the input.
pub const FORMAT_WHITELIST: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,mp3,ogg,wav,w64,flac,aac,\
                                    ac3,eac3,avi,flv,asf,mpegts,mpeg,aiff,caf,amr";

const PROTOCOL_WHITELIST: &str = "file,pipe";

/// `silencedetect` settings: -35 dB sits under quiet speech and over room
/// noise; 0.4 s is a pause between sentences rather than between words.
const SILENCE_FILTER: &str = "silencedetect=noise=-35dB:d=0.4";

/// Name of the whole audio file in the output directory.
const AUDIO_FILE: &str = "audio.wav";

/// Bytes kept for a chunk's container header when sizing chunks; a WAV
/// header is 44 bytes, the rest is margin for rounding to whole samples.
const CHUNK_HEADER_ALLOWANCE: u64 = 1024;

/// The shortest chunk [`plan_chunks`] makes, whatever the limits say, so it
/// always makes progress.
const MIN_SPAN: Duration = Duration::from_secs(1);

/// ffprobe's JSON is a few KiB; more means a hostile file with thousands of
/// streams.
const MAX_STDOUT: usize = 1 << 20;
/// Longest stderr line kept (the rest of a line is dropped).
const MAX_LINE: usize = 1024;
/// stderr lines kept for error messages.
const TAIL_LINES: usize = 12;
/// Silences beyond this many are ignored (4 h of 0.4 s pauses is ~36,000).
const MAX_SILENCES: usize = 200_000;
/// Below this ffmpeg itself warns "misdetection possible" (half of the
/// score a matching file extension gives).
const MIN_PROBE_SCORE: u32 = 25;

/// Bounds for one extraction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longer media is refused (`too_long`).
    pub max_duration: Duration,
    /// ffmpeg stops writing the whole audio file at this size (`-fs`);
    /// reaching it is `too_long`. At most 4 GiB (a WAV header's limit).
    pub max_output_bytes: u64,
    /// Wall-clock bound of one call of [`extract`], [`probe`] or
    /// [`silences`], all tool runs included.
    pub timeout: Duration,
    /// A chunk file is never larger (header included).
    pub chunk_max_bytes: u64,
    /// Chunks are cut near this length.
    pub chunk_target: Duration,
    /// Each chunk after the first starts this long before the previous cut,
    /// so a word spoken across the cut is in both.
    pub overlap: Duration,
    /// The nice value ffmpeg and ffprobe run at (0 to 19; 0 leaves them at
    /// vidpipe's own priority). Decoding competes for the CPU with the
    /// transcription it feeds, which is the bottleneck of the pipeline,
    /// and with a local ASR server on the same cores it is the
    /// transcription that should win: extraction only has to stay ahead of
    /// it (see BENCHMARKS.md, the pipeline).
    pub niceness: i32,
    /// The ffmpeg executable: a name looked up in `PATH`, or a path (a
    /// build of one's own, e.g. a static one, which starts several times
    /// faster than a distribution's: see BENCHMARKS.md).
    pub ffmpeg: PathBuf,
    /// The ffprobe executable, likewise.
    pub ffprobe: PathBuf,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Long podcasts and lectures, not day-long streams.
            max_duration: Duration::from_secs(4 * 3600),
            // 4 h of 16 kHz WAV is 461 MB; the rest is headroom.
            max_output_bytes: 512 << 20,
            // Decoding 4 h of audio takes a few minutes on a busy machine.
            timeout: Duration::from_secs(30 * 60),
            // OpenAI's transcription API takes at most 25 MiB per file.
            chunk_max_bytes: 24 << 20,
            chunk_target: Duration::from_secs(10 * 60),
            overlap: Duration::from_millis(1500),
            niceness: 10,
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
        }
    }
}

impl Limits {
    /// Refuses limits under which no chunk could be made or written.
    fn validate(&self) -> Result<(), FfmpegError> {
        let bad = |what: String| Err(FfmpegError::InvalidLimits(what));
        if self.max_duration.is_zero() || self.timeout.is_zero() {
            return bad("max_duration and timeout must be positive".into());
        }
        if !(0..=19).contains(&self.niceness) {
            return bad(format!(
                "niceness is {}, outside 0 (normal priority) to 19 (lowest)",
                self.niceness
            ));
        }
        if self.max_output_bytes > u64::from(u32::MAX) {
            return bad(format!(
                "max_output_bytes is {}, over the 4 GiB a WAV file can hold",
                self.max_output_bytes
            ));
        }
        let min_chunk = CHUNK_HEADER_ALLOWANCE + BYTES_PER_SEC * MIN_SPAN.as_secs();
        if self.chunk_max_bytes < min_chunk {
            return bad(format!(
                "chunk_max_bytes is {}, less than {min_chunk} (one second of audio)",
                self.chunk_max_bytes
            ));
        }
        if self.chunk_target < MIN_SPAN {
            return bad("chunk_target must be at least one second".into());
        }
        Ok(())
    }
}

/// What ffprobe says about a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The container's duration, if it states one.
    pub duration: Option<Duration>,
    /// ffprobe's demuxer name, such as `mov,mp4,m4a,3gp,3g2,mj2`.
    pub format_name: String,
    /// At least one audio stream.
    pub has_audio: bool,
    /// At least one video stream that is not just cover art.
    pub has_video: bool,
}

/// One piece of the audio, to be transcribed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// A 16 kHz mono WAV file (the whole audio file when there is one chunk).
    pub path: PathBuf,
    /// Where the chunk starts in the whole audio, exact to the sample.
    pub offset: Duration,
    /// Its length, exact to the sample.
    pub duration: Duration,
    /// Size of the file.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
}

/// The result of [`extract`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// The whole audio, 16 kHz mono 16-bit WAV.
    pub audio: PathBuf,
    /// Size of that file.
    pub audio_bytes: u64,
    /// Hex SHA-256 of that file.
    pub audio_sha256: String,
    /// Its duration, exact to the sample.
    pub duration: Duration,
    /// The pieces to transcribe, in order, overlapping by `Limits::overlap`.
    pub chunks: Vec<Chunk>,
}

/// Why probing or extracting failed.
#[derive(Debug, thiserror::Error)]
pub enum FfmpegError {
    /// ffprobe found no audio stream.
    #[error("the file has no audio stream")]
    NoAudio,
    /// The audio stream decoded to nothing.
    #[error("the file's audio stream holds no decodable audio")]
    EmptyAudio,
    /// Longer than `Limits::max_duration`.
    #[error(
        "the media lasts at least {}, over the limit of {} (max_duration)",
        Hms(*duration),
        Hms(*max)
    )]
    TooLong {
        /// What ffprobe or the decoded audio said.
        duration: Duration,
        /// The limit.
        max: Duration,
    },
    /// The audio file reached `Limits::max_output_bytes`.
    #[error("the audio reached the limit of {max} bytes (max_output_bytes) before its end")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// Not a file ffprobe can read as an accepted media container.
    #[error("not a readable media file: {0}")]
    NotMedia(String),
    /// A tool exited with an error after the input was accepted.
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        /// `ffmpeg` or `ffprobe`.
        tool: &'static str,
        /// The exit status.
        status: String,
        /// Killed by a signal or out of disk/memory: may pass on a retry.
        transient: bool,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// A tool produced output this module cannot use.
    #[error("unexpected output of {tool}: {message}")]
    BadOutput {
        /// `ffmpeg` or `ffprobe`.
        tool: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The call ran past `Limits::timeout`.
    #[error("{tool} did not finish within {} (timeout)", Hms(*after))]
    Timeout {
        /// The tool running when time ran out.
        tool: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The caller cancelled the call.
    #[error("cancelled")]
    Cancelled,
    /// ffmpeg or ffprobe cannot be started.
    #[error("{tool} cannot be started from {} (is it installed and on PATH, or is media.{tool} right?): {source}", exe.display())]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// What was started: the configured name or path.
        exe: PathBuf,
        /// Why spawning failed.
        #[source]
        source: io::Error,
    },
    /// The limits cannot work.
    #[error("invalid ffmpeg limits: {0}")]
    InvalidLimits(String),
    /// Reading or writing local files failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl FfmpegError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| FfmpegError::Io { context, source }
    }

    /// The kind a stage reports (`no_audio`, `too_long`, `not_media`...).
    pub fn kind(&self) -> &'static str {
        match self {
            FfmpegError::NoAudio | FfmpegError::EmptyAudio => "no_audio",
            FfmpegError::TooLong { .. } | FfmpegError::TooLarge { .. } => "too_long",
            FfmpegError::NotMedia(_) => "not_media",
            FfmpegError::Failed { .. } | FfmpegError::BadOutput { .. } => "ffmpeg_failed",
            FfmpegError::Timeout { .. } => "timeout",
            FfmpegError::Cancelled => "cancelled",
            FfmpegError::ToolMissing { .. } => "ffmpeg_missing",
            FfmpegError::InvalidLimits(_) => "invalid_limits",
            FfmpegError::Io { .. } => "io",
        }
    }

    /// Whether the same call may succeed later on the same input.
    pub fn is_retryable(&self) -> bool {
        match self {
            // The input decides these: the same bytes fail the same way.
            FfmpegError::NoAudio
            | FfmpegError::EmptyAudio
            | FfmpegError::TooLong { .. }
            | FfmpegError::TooLarge { .. }
            | FfmpegError::NotMedia(_)
            | FfmpegError::BadOutput { .. }
            | FfmpegError::InvalidLimits(_) => false,
            FfmpegError::Failed { transient, .. } => *transient,
            // A busy machine, a shutdown, a missing tool being installed, a
            // full disk: none of them is the input's fault.
            FfmpegError::Timeout { .. }
            | FfmpegError::Cancelled
            | FfmpegError::ToolMissing { .. }
            | FfmpegError::Io { .. } => true,
        }
    }
}

impl From<FfmpegError> for StageError {
    fn from(err: FfmpegError) -> Self {
        let kind = err.kind();
        let message = err.to_string();
        if err.is_retryable() {
            StageError::retryable(kind, message)
        } else {
            StageError::permanent(kind, message)
        }
    }
}

/// Durations as people read them: `4h00m00s`, `12m03s`, `2.5s`.
struct Hms(Duration);

impl fmt::Display for Hms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h{m:02}m{s:02}s")
        } else if m > 0 {
            write!(f, "{m}m{s:02}s")
        } else {
            write!(f, "{:.1}s", self.0.as_secs_f64())
        }
    }
}

/// Asks ffprobe what `input` is. Fails with `not_media` when ffprobe cannot
/// read it as one of the accepted containers.
pub async fn probe(input: &Path, limits: &Limits) -> Result<Probe, FfmpegError> {
    let deadline = Bounds::of(limits);
    probe_within(input, &deadline, &CancellationToken::new()).await
}

/// Extracts the first audio stream of `input` into `out_dir` as 16 kHz mono
/// WAV (`audio.wav`). Audio that [`plan_chunks`] keeps whole is its own only
/// chunk; longer audio is cut at silences into `chunk-NNN.wav` files.
///
/// ffprobe runs first: no audio stream is `no_audio`, a stated duration
/// over `max_duration` is `too_long`, anything it cannot read is
/// `not_media`. `out_dir` is created if missing and is the caller's scratch
/// space: files of those names in it are overwritten. `Limits::timeout`
/// bounds the whole call.
pub async fn extract(
    input: &Path,
    out_dir: &Path,
    limits: &Limits,
    cancel: &CancellationToken,
) -> Result<Extracted, FfmpegError> {
    limits.validate()?;
    let deadline = Bounds::of(limits);

    let probe = probe_within(input, &deadline, cancel).await?;
    if !probe.has_audio {
        return Err(FfmpegError::NoAudio);
    }
    if let Some(duration) = probe.duration
        && duration > limits.max_duration
    {
        return Err(FfmpegError::TooLong {
            duration,
            max: limits.max_duration,
        });
    }

    tokio::fs::create_dir_all(out_dir)
        .await
        .map_err(FfmpegError::io(format!("creating {}", out_dir.display())))?;
    let out_dir = std::path::absolute(out_dir)
        .map_err(FfmpegError::io(format!("resolving {}", out_dir.display())))?;
    let audio = out_dir.join(AUDIO_FILE);

    let mut args = common_args();
    args.extend(os(["-nostdin", "-nostats"]));
    args.extend(input_arg(input).await?);
    args.extend(os([
        // The first audio stream, whatever ffmpeg would rank "best".
        "-map",
        "0:a:0",
        "-vn",
        "-sn",
        "-dn",
        "-ac",
        "1",
        "-ar",
        "16000",
        "-c:a",
        "pcm_s16le",
        // No metadata and no encoder tag: the same input gives the same bytes
        // (and sha256) on every run, and the header is just fmt + data.
        "-map_metadata",
        "-1",
        "-fflags",
        "+bitexact",
        "-flags:a",
        "+bitexact",
    ]));
    // One second more than allowed, so media longer than the limit is seen
    // as such even when the container states no duration.
    args.push("-t".into());
    args.push(secs_arg(limits.max_duration + Duration::from_secs(1)));
    args.push("-fs".into());
    args.push(limits.max_output_bytes.to_string().into());
    args.extend(os(["-f", "wav", "-y"]));
    args.push(file_arg(&audio));

    let run = run_tool("ffmpeg", &args, &deadline, cancel, |_| {}).await?;
    if !run.status.success() {
        return Err(failed("ffmpeg", run.status, &run.tail, input));
    }

    let (layout, audio_bytes) = {
        let audio = audio.clone();
        blocking(move || {
            let mut file = std::fs::File::open(&audio)
                .map_err(FfmpegError::io(format!("opening {}", audio.display())))?;
            let len = file
                .metadata()
                .map_err(FfmpegError::io(format!("reading {}", audio.display())))?
                .len();
            Ok((wav_layout(&mut file, len)?, len))
        })
        .await?
    };
    if audio_bytes >= limits.max_output_bytes {
        return Err(FfmpegError::TooLarge {
            max: limits.max_output_bytes,
        });
    }
    let duration = samples_to_duration(layout.samples());
    if duration > limits.max_duration {
        return Err(FfmpegError::TooLong {
            duration,
            max: limits.max_duration,
        });
    }
    if layout.samples() == 0 {
        return Err(FfmpegError::EmptyAudio);
    }
    if let Some(stated) = probe.duration
        && duration < stated / 2
    {
        // Truncated or damaged input: keep what decodes, but say so.
        tracing::warn!(
            stated_secs = stated.as_secs_f64(),
            decoded_secs = duration.as_secs_f64(),
            "decoded audio is much shorter than the container states"
        );
    }

    // Silence detection is a full decode pass; short audio skips it.
    let mut plan = plan_chunks(duration, &[], BYTES_PER_SEC, limits);
    if plan.len() > 1 {
        let quiet = silences_within(&audio, limits, &deadline, cancel).await?;
        plan = plan_chunks(duration, &quiet, BYTES_PER_SEC, limits);
    }
    let spans: Vec<(u64, u64)> = plan
        .iter()
        .map(|&(start, len)| {
            let first = duration_to_samples(start).min(layout.samples());
            let end = duration_to_samples(start + len).min(layout.samples());
            (first, end.saturating_sub(first))
        })
        .filter(|&(_, n)| n > 0)
        .collect();
    tracing::debug!(
        secs = duration.as_secs_f64(),
        chunks = spans.len(),
        "audio extracted"
    );

    let cancel = cancel.clone();
    blocking(move || {
        write_chunks(
            audio,
            audio_bytes,
            layout,
            duration,
            out_dir,
            spans,
            &cancel,
        )
    })
    .await
}

/// Finds silences in `audio` with ffmpeg's `silencedetect`, as
/// `(start, end)` pairs in order.
pub async fn silences(
    audio: &Path,
    limits: &Limits,
) -> Result<Vec<(Duration, Duration)>, FfmpegError> {
    let deadline = Bounds::of(limits);
    silences_within(audio, limits, &deadline, &CancellationToken::new()).await
}

/// Plans chunks of audio lasting `duration`: `(start, length)` pairs that
/// cover it in order.
///
/// No chunk is longer than `chunk_max_bytes` holds at `bytes_per_sec` (0:
/// no byte bound), less a small header allowance. Audio that fits and lasts
/// less than one and a half `chunk_target` is one chunk. Longer audio is cut
/// into pieces near
/// `chunk_target`, spread evenly over what is left, each cut at the middle
/// of the silence closest to its ideal place (within half a piece), or at
/// the ideal place when no silence is that near. Each chunk after the first
/// starts `overlap` before the previous cut, so a word spoken across a cut is
/// in both chunks.
///
/// Nonsense limits are clamped so the plan always ends: the target is at
/// least one second and at most the byte bound, the overlap at most a
/// quarter of the target.
pub fn plan_chunks(
    duration: Duration,
    silences: &[(Duration, Duration)],
    bytes_per_sec: u64,
    limits: &Limits,
) -> Vec<(Duration, Duration)> {
    let hard = max_span(limits.chunk_max_bytes, bytes_per_sec).max(MIN_SPAN);
    let target = limits.chunk_target.max(MIN_SPAN).min(hard);
    let overlap = limits.overlap.min(target / 4);

    let mut plan = Vec::new();
    // Where the previous chunk's own part ends (the next one re-reads the
    // overlap before it).
    let mut cut = Duration::ZERO;
    loop {
        let begin = cut.saturating_sub(overlap);
        let rest = duration - cut;
        // Rounded, not ceiled: 1.2 targets left make one chunk, not two.
        let by_target = (rest + target / 2).as_nanos() / target.as_nanos();
        if by_target <= 1 && duration - begin <= hard {
            plan.push((begin, duration - begin));
            return plan;
        }
        // New material one chunk can take, aimed a tenth under the bound so
        // that moving a cut to a nearby silence does not overflow it.
        let room = hard - (cut - begin);
        let aim = room - room / 10;
        let pieces = by_target
            .max(rest.as_nanos().div_ceil(aim.as_nanos()))
            .max(2);
        let piece = nanos(rest.as_nanos() / pieces);
        // Cuts within half a piece of the ideal keep chunks near the target
        // and never leave a sliver; the first cut also leaves room for the
        // second chunk's overlap.
        let lo = (cut + piece / 2).max(overlap);
        let hi = (cut + piece + piece / 2).min(begin.saturating_add(hard));
        let ideal = (cut + piece).min(hi);
        let next = silences
            .iter()
            .map(|&(start, end)| start + end.saturating_sub(start) / 2)
            .filter(|mid| (lo..=hi).contains(mid))
            .min_by_key(|&mid| mid.abs_diff(ideal))
            .unwrap_or(ideal);
        plan.push((begin, next - begin));
        cut = next;
    }
}

/// The longest chunk `max_bytes` holds at `bytes_per_sec`.
fn max_span(max_bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::MAX;
    }
    let payload = u128::from(max_bytes.saturating_sub(CHUNK_HEADER_ALLOWANCE));
    nanos(payload * 1_000_000_000 / u128::from(bytes_per_sec))
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// Rounds to the nearest sample.
fn duration_to_samples(d: Duration) -> u64 {
    let rate = u128::from(SAMPLE_RATE);
    u64::try_from((d.as_nanos() * rate + 500_000_000) / 1_000_000_000).unwrap_or(u64::MAX)
}

fn samples_to_duration(samples: u64) -> Duration {
    // 62,500 ns a sample at 16 kHz: exact.
    Duration::from_nanos(samples.saturating_mul(1_000_000_000 / u64::from(SAMPLE_RATE)))
}

/// The ffprobe half of [`probe`] and [`extract`].
async fn probe_within(
    input: &Path,
    deadline: &Bounds,
    cancel: &CancellationToken,
) -> Result<Probe, FfmpegError> {
    let mut args = common_args();
    args.extend(os([
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
    ]));
    args.extend(input_arg(input).await?);
    let run = run_tool("ffprobe", &args, deadline, cancel, |_| {}).await?;
    if run.status.code().is_none() {
        return Err(failed("ffprobe", run.status, &run.tail, input));
    }
    if !run.status.success() {
        // ffprobe refuses what it cannot open or parse: the input's fault.
        return Err(FfmpegError::NotMedia(summarize(&run.tail, input)));
    }
    if run.stdout_overflow {
        return Err(FfmpegError::NotMedia(
            "ffprobe's description of the file is implausibly large".into(),
        ));
    }
    parse_probe(&run.stdout)
}

fn parse_probe(json: &[u8]) -> Result<Probe, FfmpegError> {
    #[derive(Deserialize)]
    struct Out {
        #[serde(default)]
        streams: Vec<Stream>,
        format: Option<Format>,
    }
    #[derive(Deserialize)]
    struct Stream {
        codec_type: Option<String>,
        duration: Option<String>,
        #[serde(default)]
        disposition: Disposition,
    }
    #[derive(Deserialize, Default)]
    struct Disposition {
        #[serde(default)]
        attached_pic: i64,
    }
    #[derive(Deserialize)]
    struct Format {
        format_name: Option<String>,
        duration: Option<String>,
        probe_score: Option<u32>,
    }

    let out: Out = serde_json::from_slice(json).map_err(|e| FfmpegError::BadOutput {
        tool: "ffprobe",
        message: format!("unreadable JSON: {e}"),
    })?;
    let Some(format) = out.format else {
        return Err(FfmpegError::NotMedia("ffprobe found no container".into()));
    };
    let format_name = format.format_name.unwrap_or_default();
    if let Some(score) = format.probe_score
        && score < MIN_PROBE_SCORE
    {
        return Err(FfmpegError::NotMedia(format!(
            "ffprobe only guessed the format ({format_name}, score {score} of 100)"
        )));
    }
    let seconds = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
    };
    let duration = seconds(&format.duration).or_else(|| {
        out.streams
            .iter()
            .filter_map(|s| seconds(&s.duration))
            .max()
    });
    let has = |kind: &str| {
        out.streams
            .iter()
            .any(|s| s.codec_type.as_deref() == Some(kind) && s.disposition.attached_pic == 0)
    };
    Ok(Probe {
        duration,
        format_name,
        has_audio: has("audio"),
        has_video: has("video"),
    })
}

/// The `silencedetect` pass of [`silences`] and [`extract`].
async fn silences_within(
    audio: &Path,
    limits: &Limits,
    deadline: &Bounds,
    cancel: &CancellationToken,
) -> Result<Vec<(Duration, Duration)>, FfmpegError> {
    let mut args = common_args();
    // silencedetect reports at the info level.
    args.extend(os(["-nostdin", "-nostats", "-loglevel", "info"]));
    args.extend(input_arg(audio).await?);
    args.extend(os(["-map", "0:a:0", "-af", SILENCE_FILTER, "-t"]));
    args.push(secs_arg(limits.max_duration + Duration::from_secs(1)));
    args.extend(os(["-f", "null", "-"]));

    let mut parser = SilenceParser::default();
    let run = run_tool("ffmpeg", &args, deadline, cancel, |line| parser.line(line)).await?;
    if !run.status.success() {
        return Err(failed("ffmpeg", run.status, &run.tail, audio));
    }
    Ok(parser.found)
}

/// Collects `silencedetect` lines:
/// `[silencedetect @ 0x...] silence_start: 12.3` then
/// `[silencedetect @ 0x...] silence_end: 13.1 | silence_duration: 0.8`.
/// Only lines of the filter count, so a metadata tag of the input that
/// reads like one cannot forge a cut. A silence running to the end of the
/// input gets its `silence_end` from ffmpeg too; a start without an end is
/// dropped.
#[derive(Default)]
struct SilenceParser {
    start: Option<Duration>,
    found: Vec<(Duration, Duration)>,
}

impl SilenceParser {
    fn line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("[silencedetect @ ") else {
            return;
        };
        let Some((_, event)) = rest.split_once("] ") else {
            return;
        };
        // ffmpeg prints slightly negative starts at the very beginning.
        let secs = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .and_then(|v| Duration::try_from_secs_f64(v.max(0.0)).ok())
        };
        if let Some(v) = event.strip_prefix("silence_start:") {
            self.start = secs(v);
        } else if let Some(v) = event.strip_prefix("silence_end:") {
            let end = secs(v.split('|').next().unwrap_or_default());
            if let (Some(start), Some(end)) = (self.start.take(), end)
                && start <= end
                && self.found.len() < MAX_SILENCES
            {
                self.found.push((start, end));
            }
        }
    }
}

/// Where the PCM samples of a WAV file are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WavLayout {
    data_offset: u64,
    data_len: u64,
}

impl WavLayout {
    fn samples(&self) -> u64 {
        self.data_len / 2
    }
}

/// Reads the header of a WAV file ffmpeg wrote and checks it is what was
/// asked for (PCM, mono, 16 kHz, 16 bits).
fn wav_layout(file: &mut (impl Read + Seek), file_len: u64) -> Result<WavLayout, FfmpegError> {
    let bad = |message: &str| FfmpegError::BadOutput {
        tool: "ffmpeg",
        message: format!("audio file: {message}"),
    };
    let read_err = |e: io::Error| FfmpegError::Io {
        context: "reading the audio file's header".into(),
        source: e,
    };
    let mut head = [0u8; 12];
    file.read_exact(&mut head)
        .map_err(|_| bad("shorter than a WAV header"))?;
    if &head[0..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return Err(bad("not RIFF/WAVE"));
    }
    let mut pos = 12u64;
    let mut format_ok = false;
    // ffmpeg writes fmt and data first; a few chunks are plenty.
    for _ in 0..16 {
        let mut chunk = [0u8; 8];
        file.seek(SeekFrom::Start(pos)).map_err(read_err)?;
        file.read_exact(&mut chunk)
            .map_err(|_| bad("no data chunk"))?;
        let size = u64::from(u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]));
        let body = pos + 8;
        match &chunk[0..4] {
            b"fmt " => {
                let mut fmt = [0u8; 16];
                file.read_exact(&mut fmt)
                    .map_err(|_| bad("short fmt chunk"))?;
                let tag = u16::from_le_bytes([fmt[0], fmt[1]]);
                let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
                let rate = u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]);
                let bits = u16::from_le_bytes([fmt[14], fmt[15]]);
                // 0xFFFE is WAVE_FORMAT_EXTENSIBLE, still PCM here.
                if !matches!(tag, 1 | 0xFFFE) || channels != 1 || rate != SAMPLE_RATE || bits != 16
                {
                    return Err(bad(&format!(
                        "format {tag:#x}, {channels} channels, {rate} Hz, {bits} bits"
                    )));
                }
                format_ok = true;
            }
            b"data" => {
                if !format_ok {
                    return Err(bad("data before fmt"));
                }
                // A header ffmpeg could not finish (size 0 or 0xFFFFFFFF)
                // still has the samples up to the end of the file.
                let available = file_len.saturating_sub(body);
                let data_len = if size == 0 || size == u64::from(u32::MAX) {
                    available
                } else {
                    size.min(available)
                };
                return Ok(WavLayout {
                    data_offset: body,
                    data_len: data_len & !1,
                });
            }
            _ => {}
        }
        pos = body + size + (size & 1);
    }
    Err(bad("no data chunk"))
}

/// A canonical 44-byte header for `samples` of 16 kHz mono 16-bit PCM.
fn wav_header(samples: u64) -> Result<[u8; 44], FfmpegError> {
    let data = u32::try_from(samples * 2)
        .ok()
        .filter(|d| *d <= u32::MAX - 36)
        .ok_or_else(|| FfmpegError::InvalidLimits("a chunk over 4 GiB".into()))?;
    let mut h = [0u8; 44];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(data + 36).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
    h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
    h[28..32].copy_from_slice(&(BYTES_PER_SEC as u32).to_le_bytes());
    h[32..34].copy_from_slice(&2u16.to_le_bytes()); // block align
    h[34..36].copy_from_slice(&16u16.to_le_bytes()); // bits
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data.to_le_bytes());
    Ok(h)
}

/// Hashes the whole audio file and writes the chunk files (blocking).
/// One span means one chunk: the whole file itself.
fn write_chunks(
    audio: PathBuf,
    audio_bytes: u64,
    layout: WavLayout,
    duration: Duration,
    out_dir: PathBuf,
    spans: Vec<(u64, u64)>,
    cancel: &CancellationToken,
) -> Result<Extracted, FfmpegError> {
    let io_err = |what: &str, path: &Path| FfmpegError::io(format!("{what} {}", path.display()));
    let mut source = std::fs::File::open(&audio).map_err(io_err("opening", &audio))?;
    let audio_sha256 = {
        let mut hasher = Sha256::new();
        copy_range(
            &mut source,
            0,
            audio_bytes,
            &mut hasher,
            &mut io::sink(),
            cancel,
        )
        .map_err(io_err("hashing", &audio))?;
        hex::encode(hasher.finalize())
    };
    let chunks = if spans.len() <= 1 {
        vec![Chunk {
            path: audio.clone(),
            offset: Duration::ZERO,
            duration,
            bytes: audio_bytes,
            sha256: audio_sha256.clone(),
        }]
    } else {
        let mut chunks = Vec::with_capacity(spans.len());
        for (i, &(first, samples)) in spans.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(FfmpegError::Cancelled);
            }
            let path = out_dir.join(format!("chunk-{i:03}.wav"));
            let header = wav_header(samples)?;
            let mut hasher = Sha256::new();
            hasher.update(header);
            let file = std::fs::File::create(&path).map_err(io_err("creating", &path))?;
            let mut out = io::BufWriter::with_capacity(1 << 16, file);
            out.write_all(&header).map_err(io_err("writing", &path))?;
            let start = layout.data_offset + first * 2;
            copy_range(
                &mut source,
                start,
                samples * 2,
                &mut hasher,
                &mut out,
                cancel,
            )
            .map_err(io_err("writing", &path))?;
            out.flush().map_err(io_err("writing", &path))?;
            chunks.push(Chunk {
                path,
                offset: samples_to_duration(first),
                duration: samples_to_duration(samples),
                bytes: header.len() as u64 + samples * 2,
                sha256: hex::encode(hasher.finalize()),
            });
        }
        chunks
    };
    Ok(Extracted {
        audio,
        audio_bytes,
        audio_sha256,
        duration,
        chunks,
    })
}

/// Copies `len` bytes from `start` of `source` to `out`, hashing them.
fn copy_range(
    source: &mut std::fs::File,
    start: u64,
    len: u64,
    hasher: &mut Sha256,
    out: &mut impl Write,
    cancel: &CancellationToken,
) -> io::Result<()> {
    source.seek(SeekFrom::Start(start))?;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        if cancel.is_cancelled() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
        }
        let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        let n = source.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Runs file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FfmpegError> + Send + 'static,
) -> Result<T, FfmpegError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FfmpegError::Io {
            context: "file work on the blocking pool".into(),
            source: io::Error::other(e.to_string()),
        })?
        .map_err(|e| match e {
            // copy_range reports cancellation as an interrupted write.
            FfmpegError::Io { source, .. } if source.kind() == io::ErrorKind::Interrupted => {
                FfmpegError::Cancelled
            }
            e => e,
        })
}

/// The options every run starts with; the whitelists are input options, so
/// they come before `-i`.
fn common_args() -> Vec<OsString> {
    os([
        "-hide_banner",
        "-loglevel",
        "error",
        "-protocol_whitelist",
        PROTOCOL_WHITELIST,
        "-format_whitelist",
        FORMAT_WHITELIST,
    ])
}

fn os<const N: usize>(args: [&str; N]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// `-i file:<absolute path>` for an existing regular file.
async fn input_arg(input: &Path) -> Result<[OsString; 2], FfmpegError> {
    let meta = tokio::fs::metadata(input)
        .await
        .map_err(FfmpegError::io(format!("reading {}", input.display())))?;
    if !meta.is_file() {
        return Err(FfmpegError::NotMedia("not a regular file".into()));
    }
    let abs = std::path::absolute(input)
        .map_err(FfmpegError::io(format!("resolving {}", input.display())))?;
    Ok(["-i".into(), file_arg(&abs)])
}

fn file_arg(path: &Path) -> OsString {
    let mut arg = OsString::from("file:");
    arg.push(path.as_os_str());
    arg
}

fn secs_arg(d: Duration) -> OsString {
    format!("{}.{:06}", d.as_secs(), d.subsec_micros()).into()
}

/// The bounds of one public call: its overall deadline, and the CPU
/// priority of the tools it runs.
struct Bounds {
    at: Instant,
    budget: Duration,
    niceness: i32,
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
}

impl Bounds {
    fn of(limits: &Limits) -> Self {
        Self {
            at: Instant::now() + limits.timeout,
            budget: limits.timeout,
            niceness: limits.niceness,
            ffmpeg: limits.ffmpeg.clone(),
            ffprobe: limits.ffprobe.clone(),
        }
    }

    /// The executable configured for `tool`.
    fn exe(&self, tool: &str) -> &Path {
        if tool == "ffprobe" {
            &self.ffprobe
        } else {
            &self.ffmpeg
        }
    }
}

/// Makes the tool that `cmd` starts yield the CPU to everything else
/// (transcription first), at nice `niceness` (or ours, if that is lower);
/// 0 leaves it alone.
///
/// A nice value alone is not enough on Linux: with autogroup scheduling
/// (`kernel.sched_autogroup_enabled`, on by default in Debian and Ubuntu)
/// the kernel first shares the CPU fairly between sessions and only then
/// applies nice within each. The ASR server, Kafka and vidpipe are
/// separate sessions, so ffmpeg at nice 10 in vidpipe's session still got
/// vidpipe's full share: measured on 2 cores, 20 extractions next to two
/// transcribing workers took 0.8-1.0 cores of the two while the workers
/// got 0.4 each. So the tool starts a session of its own (a new
/// autogroup) and sets that autogroup's nice as well as its own. Under systemd with the cpu controller, services are ranked by
/// their cgroups instead: give vidpipe a lower `CPUWeight=`.
///
/// Without CAP_SYS_ADMIN the kernel accepts at most ten autogroup changes
/// a second machine-wide. A tool in a session of its own at autogroup
/// nice 0 would get as much CPU as the whole ASR server, so when the
/// change is refused the child fails to start with that error, and
/// [`start_tool`] starts it again in vidpipe's session at plain nice.
///
/// A tool in a session of its own does not get a terminal's Ctrl-C or a
/// signal sent to vidpipe's process group: vidpipe kills its tools itself
/// when it stops or a call is cancelled, and one left behind by a killed
/// vidpipe ends with its input, which is a local file bounded by `-t`.
fn yield_cpu(cmd: &mut Command, niceness: i32) {
    if niceness == 0 {
        return;
    }
    let nice = tool_nice(niceness);
    // Formatted here: the child must not allocate.
    let text = nice.to_string().into_bytes();
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed. It makes plain system
    // calls (setsid, open, write, close, setpriority) through rustix on
    // data prepared above, allocates nothing (an `io::Error` from an errno
    // is not allocated) and takes no lock.
    unsafe {
        cmd.pre_exec(move || low_priority_session(nice, &text).map_err(std::io::Error::from));
    }
}

/// The nice value for a tool: `niceness`, or ours if that is higher (a
/// vidpipe started with `nice` keeps its tools at least as nice).
fn tool_nice(niceness: i32) -> i32 {
    niceness.max(rustix::process::getpriority_process(None).unwrap_or(0))
}

/// In the child before exec: see [`yield_cpu`]. Fails only when the tool
/// got a session of its own and its autogroup nice could not be set.
fn low_priority_session(nice: i32, text: &[u8]) -> rustix::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    // Only a process group leader cannot, which a fresh child is not; if
    // it could not, the autogroup below would be vidpipe's own.
    if rustix::process::setsid().is_ok() {
        match rustix::fs::open(
            c"/proc/self/autogroup",
            OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                rustix::io::write(&fd, text)?;
            }
            // No autogroups in this kernel: sessions do not matter then.
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e),
        }
    }
    let _ = rustix::process::setpriority_process(None, nice);
    Ok(())
}

/// Lowers a started tool's CPU priority to [`tool_nice`]`(niceness)`, from
/// vidpipe after the start (the fallback of [`yield_cpu`], which needs no
/// hook in the child). Failing is harmless (the tool keeps our priority),
/// so it is only logged.
fn lower_priority(tool: &'static str, child: &tokio::process::Child, niceness: i32) {
    if niceness == 0 {
        return;
    }
    let Some(pid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::setpriority_process(Some(pid), tool_nice(niceness)) {
        tracing::debug!(tool, error = %e, "cannot lower the tool's priority");
    }
}

/// Starts `tool` with `args`, at low priority in a session of its own
/// (see [`yield_cpu`]), or, if that start fails, in vidpipe's session at
/// plain nice; a tool that cannot be started at all fails the second
/// attempt with the same error.
fn start_tool(
    tool: &'static str,
    exe: &Path,
    args: &[OsString],
    niceness: i32,
) -> io::Result<tokio::process::Child> {
    let start = |own_session: bool| {
        let mut cmd = Command::new(exe);
        if own_session {
            yield_cpu(&mut cmd, niceness);
        }
        // Also keeps FFREPORT out, which would make ffmpeg write an
        // unbounded log file of its own.
        super::tool_env(&mut cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
    };
    match start(niceness > 0) {
        Ok(child) => Ok(child),
        Err(e) if niceness > 0 => {
            tracing::debug!(tool, error = %e, "starting in a session of its own failed; starting at plain nice");
            let child = start(false)?;
            lower_priority(tool, &child, niceness);
            Ok(child)
        }
        Err(e) => Err(e),
    }
}

/// What a finished tool run left behind.
struct Run {
    status: ExitStatus,
    stdout: Vec<u8>,
    stdout_overflow: bool,
    tail: Vec<String>,
}

/// Runs `tool` with `args` until it exits, the deadline passes or `cancel`
/// fires (then it is killed and reaped). stdout is kept up to
/// [`MAX_STDOUT`]; each stderr line goes to `on_line` and only the last
/// [`TAIL_LINES`] are kept.
async fn run_tool(
    tool: &'static str,
    args: &[OsString],
    deadline: &Bounds,
    cancel: &CancellationToken,
    mut on_line: impl FnMut(&str),
) -> Result<Run, FfmpegError> {
    if cancel.is_cancelled() {
        return Err(FfmpegError::Cancelled);
    }
    tracing::debug!(tool, ?args, "running");
    let exe = deadline.exe(tool);
    let mut child =
        start_tool(tool, exe, args, deadline.niceness).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => FfmpegError::ToolMissing {
                tool,
                exe: exe.to_path_buf(),
                source,
            },
            _ => FfmpegError::Io {
                context: format!("starting {tool}"),
                source,
            },
        })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(FfmpegError::Io {
            context: format!("{tool}'s pipes"),
            source: io::Error::other("not captured"),
        });
    };

    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let work = async {
        let (out, err) = tokio::join!(
            read_bounded(stdout, MAX_STDOUT),
            read_lines(stderr, |line| {
                on_line(line);
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_owned());
            })
        );
        let status = child.wait().await;
        (out, err, status)
    };
    enum Outcome<T> {
        Done(T),
        TimedOut,
        Cancelled,
    }
    let outcome = tokio::select! {
        done = work => Outcome::Done(done),
        () = tokio::time::sleep_until(deadline.at) => Outcome::TimedOut,
        () = cancel.cancelled() => Outcome::Cancelled,
    };
    let ((stdout, stdout_overflow), status) = match outcome {
        Outcome::Done((out, err, status)) => {
            let ctx = |what: &str| FfmpegError::io(format!("{what} of {tool}"));
            err.map_err(ctx("reading stderr"))?;
            (
                out.map_err(ctx("reading stdout"))?,
                status.map_err(ctx("waiting for the end"))?,
            )
        }
        stopped => {
            // Kill and reap now rather than leave it to the drop.
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(match stopped {
                Outcome::TimedOut => FfmpegError::Timeout {
                    tool,
                    after: deadline.budget,
                },
                _ => FfmpegError::Cancelled,
            });
        }
    };
    Ok(Run {
        status,
        stdout,
        stdout_overflow,
        tail: tail.into(),
    })
}

/// Reads all of `r`, keeping at most `max` bytes (the rest is drained so the
/// child never blocks on a full pipe).
async fn read_bounded(mut r: impl AsyncRead + Unpin, max: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut overflow = false;
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((kept, overflow));
        }
        let room = max - kept.len();
        kept.extend_from_slice(&buf[..n.min(room)]);
        overflow |= n > room;
    }
}

/// Splits `r` into lines at `\n` or `\r`, each cut to [`MAX_LINE`] bytes.
async fn read_lines(
    mut r: impl AsyncRead + Unpin,
    mut on_line: impl FnMut(&str),
) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    let mut line = Vec::with_capacity(256);
    let mut flush = |line: &mut Vec<u8>| {
        if !line.is_empty() {
            on_line(&String::from_utf8_lossy(line));
            line.clear();
        }
    };
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            flush(&mut line);
            return Ok(());
        }
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                flush(&mut line);
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
}

/// A tool's failure after the input was accepted.
fn failed(tool: &'static str, status: ExitStatus, tail: &[String], input: &Path) -> FfmpegError {
    let stderr = summarize(tail, input);
    // A kill (OOM, an operator) or a full disk is the machine's state, not
    // the input's.
    let transient = status.code().is_none()
        || stderr.contains("No space left on device")
        || stderr.contains("Cannot allocate memory");
    FfmpegError::Failed {
        tool,
        status: status.to_string(),
        transient,
        stderr,
    }
}

/// A short account of a tool's last stderr lines for an error message:
/// the input's path and ffmpeg's `[demuxer @ 0x...]` prefixes are cut, the
/// whitelist echoed by a refusal is not repeated.
fn summarize(tail: &[String], input: &Path) -> String {
    const MAX: usize = 300;
    let path = input.display().to_string();
    let abs = std::path::absolute(input)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.clone());
    let mut parts: Vec<String> = Vec::new();
    for line in tail {
        let mut line = line.trim();
        for prefix in [
            format!("file:{abs}: "),
            format!("{abs}: "),
            format!("{path}: "),
        ] {
            if let Some(rest) = line.strip_prefix(&prefix) {
                line = rest;
            }
        }
        let mut text = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
            Some((who, what)) => {
                let who = who.split(" @ ").next().unwrap_or(who);
                format!("{who}: {what}")
            }
            None => line.to_owned(),
        };
        if let Some(at) = text.find("Format not on whitelist") {
            text.truncate(at);
            text.push_str("format not accepted (not a media container)");
        }
        if !text.is_empty() && !parts.contains(&text) {
            parts.push(text);
        }
    }
    let mut out = if parts.is_empty() {
        "no reason given".to_owned()
    } else {
        parts.join("; ")
    };
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn limits(target: u64, max_bytes: u64, overlap_ms: u64) -> Limits {
        Limits {
            chunk_target: Duration::from_secs(target),
            chunk_max_bytes: max_bytes,
            overlap: Duration::from_millis(overlap_ms),
            ..Limits::default()
        }
    }

    /// The invariants every plan keeps.
    fn check(plan: &[(Duration, Duration)], duration: Duration, limits: &Limits, bps: u64) {
        let hard = max_span(limits.chunk_max_bytes, bps).max(MIN_SPAN);
        let overlap = limits
            .overlap
            .min(limits.chunk_target.max(MIN_SPAN).min(hard) / 4);
        assert!(!plan.is_empty());
        assert_eq!(plan[0].0, Duration::ZERO, "starts at 0: {plan:?}");
        let (last_start, last_len) = plan[plan.len() - 1];
        assert_eq!(last_start + last_len, duration, "covers the end: {plan:?}");
        for &(_, len) in plan {
            assert!(len <= hard, "{len:?} over {hard:?}: {plan:?}");
            assert!(len > Duration::ZERO || duration.is_zero(), "{plan:?}");
        }
        for w in plan.windows(2) {
            let prev_end = w[0].0 + w[0].1;
            assert_eq!(w[1].0 + overlap, prev_end, "overlap: {plan:?}");
            assert!(w[1].0 > w[0].0, "progress: {plan:?}");
        }
    }

    #[test]
    fn short_audio_is_one_chunk() {
        let l = limits(600, 24 << 20, 1500);
        assert_eq!(
            plan_chunks(s(599.0), &[], BYTES_PER_SEC, &l),
            vec![(Duration::ZERO, s(599.0))]
        );
        assert_eq!(
            plan_chunks(Duration::ZERO, &[], BYTES_PER_SEC, &l),
            vec![(Duration::ZERO, Duration::ZERO)]
        );
    }

    #[test]
    fn cuts_at_the_silence_nearest_the_even_split() {
        let l = limits(600, 24 << 20, 1500);
        // 25 minutes: three pieces of ~500 s. Silences near 480 and 505 and
        // far off at 100; near 1000 only one.
        let quiet = [
            (s(100.0), s(101.0)),
            (s(480.0), s(481.0)),
            (s(505.0), s(506.0)),
            (s(1003.0), s(1004.0)),
        ];
        let plan = plan_chunks(s(1500.0), &quiet, BYTES_PER_SEC, &l);
        check(&plan, s(1500.0), &l, BYTES_PER_SEC);
        let cuts: Vec<_> = plan.windows(2).map(|w| w[0].0 + w[0].1).collect();
        assert_eq!(cuts, vec![s(505.5), s(1003.5)], "{plan:?}");
        assert_eq!(plan[1].0, s(504.0));
    }

    #[test]
    fn a_little_over_the_target_stays_one_chunk_if_it_fits() {
        let l = limits(600, 24 << 20, 1500);
        assert_eq!(
            plan_chunks(s(700.0), &[], BYTES_PER_SEC, &l),
            vec![(Duration::ZERO, s(700.0))]
        );
        // 13.5 minutes are near the target too, but do not fit in 24 MiB of
        // WAV (~13.1 minutes).
        let plan = plan_chunks(s(810.0), &[], BYTES_PER_SEC, &l);
        check(&plan, s(810.0), &l, BYTES_PER_SEC);
        assert_eq!(plan.len(), 2, "{plan:?}");
    }

    #[test]
    fn chunks_stay_near_the_target_when_the_bound_is_tight() {
        // Target 300 s, bound ~312 s, a pause every 37 s: snapping cuts to
        // pauses must not push the tail over the bound into two stubs.
        let l = limits(300, 10_000_000, 1500);
        let quiet: Vec<_> = (0..40)
            .map(|k| (s(37.0 * k as f64 + 33.0), s(37.0 * k as f64 + 37.0)))
            .collect();
        let plan = plan_chunks(s(1500.0), &quiet, BYTES_PER_SEC, &l);
        check(&plan, s(1500.0), &l, BYTES_PER_SEC);
        assert!((5..=6).contains(&plan.len()), "{plan:?}");
        for &(_, len) in &plan {
            assert!(len >= s(200.0), "{plan:?}");
        }
        for w in plan.windows(2) {
            let cut = (w[0].0 + w[0].1).as_secs_f64();
            assert!((cut % 37.0 - 35.0).abs() < 0.01, "{plan:?}");
        }
    }

    #[test]
    fn without_silences_cuts_evenly() {
        let l = limits(300, 24 << 20, 1000);
        let plan = plan_chunks(s(1500.0), &[], BYTES_PER_SEC, &l);
        check(&plan, s(1500.0), &l, BYTES_PER_SEC);
        assert_eq!(plan.len(), 5, "{plan:?}");
        assert_eq!(plan[1], (s(299.0), s(301.0)));
    }

    #[test]
    fn far_silences_are_ignored() {
        let l = limits(300, 24 << 20, 1000);
        // Only silences a few seconds in: a cut there would leave a stub.
        let quiet = [(s(3.0), s(4.0)), (s(10.0), s(12.0))];
        let plan = plan_chunks(s(900.0), &quiet, BYTES_PER_SEC, &l);
        check(&plan, s(900.0), &l, BYTES_PER_SEC);
        assert_eq!(plan[0], (Duration::ZERO, s(300.0)));
    }

    #[test]
    fn the_byte_bound_wins_over_the_target() {
        // 4 MiB of 16 kHz WAV is ~131 s, under the 600 s target.
        let l = limits(600, 4 << 20, 1500);
        let plan = plan_chunks(s(1000.0), &[(s(130.5), s(131.0))], BYTES_PER_SEC, &l);
        check(&plan, s(1000.0), &l, BYTES_PER_SEC);
        assert!(plan.len() >= 8, "{plan:?}");
        for &(_, len) in &plan {
            let bytes = len.as_secs_f64() * BYTES_PER_SEC as f64 + 44.0;
            assert!(bytes < (4 << 20) as f64, "{len:?}");
        }
    }

    #[test]
    fn a_silence_past_the_byte_bound_is_not_taken() {
        // Bound 100 s (the 200 s target is clamped to it): four pieces of 75 s.
        // The silence at 105 s is within half a piece of the first ideal cut
        // but would make the first chunk longer than the bound.
        let l = limits(200, 100 * BYTES_PER_SEC + CHUNK_HEADER_ALLOWANCE, 1000);
        let plan = plan_chunks(s(300.0), &[(s(104.0), s(106.0))], BYTES_PER_SEC, &l);
        check(&plan, s(300.0), &l, BYTES_PER_SEC);
        assert_eq!(plan[0], (Duration::ZERO, s(75.0)), "{plan:?}");
    }

    #[test]
    fn when_target_equals_the_bound_the_tail_is_not_a_stub() {
        // target == hard: the last piece plus overlap would not fit.
        let hard_bytes = 60 * BYTES_PER_SEC + CHUNK_HEADER_ALLOWANCE;
        let l = limits(60, hard_bytes, 1500);
        let plan = plan_chunks(s(119.5), &[], BYTES_PER_SEC, &l);
        check(&plan, s(119.5), &l, BYTES_PER_SEC);
        assert!(plan.iter().all(|&(_, len)| len >= s(20.0)), "{plan:?}");
    }

    #[test]
    fn nonsense_limits_still_end() {
        let l = Limits {
            chunk_target: Duration::ZERO,
            chunk_max_bytes: 0,
            overlap: Duration::from_secs(3600),
            ..Limits::default()
        };
        let plan = plan_chunks(s(10.0), &[], BYTES_PER_SEC, &l);
        check(&plan, s(10.0), &l, BYTES_PER_SEC);
        assert!(plan.len() >= 10);
        // No byte bound at all.
        let l = limits(60, 0, 1000);
        let plan = plan_chunks(s(600.0), &[], 0, &l);
        check(&plan, s(600.0), &l, 0);
        assert_eq!(plan.len(), 10);
    }

    #[test]
    fn invariants_hold_over_many_shapes() {
        for target in [30u64, 61, 300, 600] {
            for max_mib in [1u64, 3, 24] {
                let l = limits(target, max_mib << 20, 1500);
                for tenths in (0..40_000).step_by(997) {
                    let d = Duration::from_millis(tenths * 100);
                    // A silence every 47 s.
                    let quiet: Vec<_> = (1..)
                        .map(|k| (s(47.0 * k as f64), s(47.0 * k as f64 + 0.8)))
                        .take_while(|&(a, _)| a < d)
                        .collect();
                    let plan = plan_chunks(d, &quiet, BYTES_PER_SEC, &l);
                    check(&plan, d, &l, BYTES_PER_SEC);
                }
            }
        }
    }

    #[test]
    fn samples_round_trip_exactly() {
        assert_eq!(duration_to_samples(s(1.0)), 16_000);
        assert_eq!(duration_to_samples(Duration::from_nanos(31_249)), 0);
        assert_eq!(duration_to_samples(Duration::from_nanos(31_250)), 1);
        assert_eq!(
            samples_to_duration(16_001),
            Duration::from_nanos(1_000_062_500)
        );
        for n in [0u64, 1, 15_999, 24_000_000] {
            assert_eq!(duration_to_samples(samples_to_duration(n)), n);
        }
    }

    #[test]
    fn parses_silencedetect_lines_only() {
        let mut p = SilenceParser::default();
        for line in [
            "[silencedetect @ 0x55d27ef23780] silence_start: -0.00125",
            "[silencedetect @ 0x55d27ef23780] silence_end: 1.5 | silence_duration: 1.5",
            "    title           : silence_start: 3",
            "[silencedetect @ 0x1] silence_start: 10.25",
            "[silencedetect @ 0x1] silence_end: 11 | silence_duration: 0.75",
            "[silencedetect @ 0x1] silence_start: nan",
            "[silencedetect @ 0x1] silence_end: 12 | silence_duration: 1",
            "[silencedetect @ 0x1] silence_start: 20",
        ] {
            p.line(line);
        }
        assert_eq!(p.found, vec![(Duration::ZERO, s(1.5)), (s(10.25), s(11.0))]);
    }

    #[test]
    fn reads_wav_headers_and_writes_them_back() {
        let mut bytes = wav_header(10).expect("header").to_vec();
        bytes.extend_from_slice(&[0u8; 20]);
        let len = bytes.len() as u64;
        let layout = wav_layout(&mut io::Cursor::new(&bytes), len).expect("layout");
        assert_eq!(
            layout,
            WavLayout {
                data_offset: 44,
                data_len: 20
            }
        );
        // A LIST chunk before the data and a size ffmpeg left unset.
        let mut odd = bytes[..36].to_vec();
        odd.extend_from_slice(b"LIST\x03\x00\x00\x00abc\x00");
        odd.extend_from_slice(b"data\xff\xff\xff\xff");
        odd.extend_from_slice(&[0u8; 7]);
        let len = odd.len() as u64;
        let layout = wav_layout(&mut io::Cursor::new(&odd), len).expect("layout");
        assert_eq!(
            layout,
            WavLayout {
                data_offset: 56,
                data_len: 6
            }
        );
        // Stereo is refused.
        let mut stereo = bytes.clone();
        stereo[22] = 2;
        assert!(matches!(
            wav_layout(&mut io::Cursor::new(&stereo), len),
            Err(FfmpegError::BadOutput { .. })
        ));
    }

    #[test]
    fn probe_json_is_read_leniently_and_low_scores_refused() {
        let json = br#"{"streams":[{"codec_type":"video","disposition":{"attached_pic":1}},
            {"codec_type":"audio","duration":"12.5"}],
            "format":{"format_name":"mp3","probe_score":51}}"#;
        let p = parse_probe(json).expect("probe");
        assert_eq!(
            p,
            Probe {
                duration: Some(s(12.5)),
                format_name: "mp3".into(),
                has_audio: true,
                has_video: false,
            }
        );
        let low = br#"{"streams":[{"codec_type":"audio"}],"format":{"format_name":"mp3","probe_score":1}}"#;
        assert!(matches!(parse_probe(low), Err(FfmpegError::NotMedia(_))));
    }

    #[test]
    fn errors_map_to_stage_errors() {
        use crate::template::ErrorClass;
        let e: StageError = FfmpegError::NoAudio.into();
        assert_eq!(
            (e.class, e.kind.as_str()),
            (ErrorClass::Permanent, "no_audio")
        );
        assert_eq!(e.message, "the file has no audio stream");
        let e: StageError = FfmpegError::Timeout {
            tool: "ffmpeg",
            after: s(90.0),
        }
        .into();
        assert_eq!(
            (e.class, e.kind.as_str()),
            (ErrorClass::Retryable, "timeout")
        );
        let e: StageError = FfmpegError::TooLong {
            duration: s(5.0 * 3600.0),
            max: s(4.0 * 3600.0),
        }
        .into();
        assert_eq!(
            (e.class, e.kind.as_str()),
            (ErrorClass::Permanent, "too_long")
        );
        assert!(e.message.contains("5h00m00s"), "{}", e.message);
    }

    #[test]
    fn summaries_are_short_and_pathless() {
        let input = Path::new("/tmp/x/-evil.mp4");
        let tail = vec![
            "[hls @ 0x55e3402ec2c0] Format not on whitelist 'mov,mp4,m4a'".to_owned(),
            "file:/tmp/x/-evil.mp4: Invalid argument".to_owned(),
        ];
        assert_eq!(
            summarize(&tail, input),
            "hls: format not accepted (not a media container); Invalid argument"
        );
    }

    #[tokio::test]
    async fn tools_run_at_the_configured_niceness_in_a_session_of_their_own() {
        // Fields of /proc/PID/stat counted after the parenthesised command
        // name: 3 is the session, 16 the nice value.
        let stat_of = |pid: u32, field: usize| -> i64 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .expect("the child's /proc entry");
            let rest = stat.rsplit_once(')').unwrap().1;
            rest.split_whitespace().nth(field).unwrap().parse().unwrap()
        };
        let sleep = |niceness: i32| {
            start_tool("sleep", Path::new("sleep"), &["5".into()], niceness).expect("sleep(1)")
        };
        let ours = rustix::process::getpriority_process(None).unwrap() as i64;
        let own_session = stat_of(std::process::id(), 3);
        // Only without CAP_SYS_ADMIN can the kernel refuse the autogroup
        // change (ten a second, machine-wide), and then the tool starts
        // again in our session.
        let privileged = rustix::process::geteuid().is_root();

        let child = sleep(10);
        let pid = child.id().unwrap();
        assert_eq!(stat_of(pid, 16), ours.max(10));
        let session = stat_of(pid, 3);
        if privileged || session != own_session {
            assert_eq!(session, pid as i64, "a session of its own");
            // Where the kernel has autogroups, the tool's is at its nice.
            if let Ok(group) = std::fs::read_to_string(format!("/proc/{pid}/autogroup")) {
                assert!(
                    group
                        .trim_end()
                        .ends_with(&format!("nice {}", ours.max(10))),
                    "autogroup: {group}"
                );
            }
        }

        // The fallback: our session, the nice value set from here.
        let child = Command::new("sleep")
            .arg("5")
            .kill_on_drop(true)
            .spawn()
            .expect("sleep(1)");
        lower_priority("sleep", &child, 10);
        let pid = child.id().unwrap();
        assert_eq!(stat_of(pid, 16), ours.max(10));
        assert_eq!(stat_of(pid, 3), own_session);

        let child = sleep(0);
        let pid = child.id().unwrap();
        assert_eq!(stat_of(pid, 16), ours, "0 leaves the priority alone");
        assert_eq!(stat_of(pid, 3), own_session, "and the session");
    }
}
