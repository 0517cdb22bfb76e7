//! yt-dlp as a subprocess: downloads from video sites and lists channels
//! and playlists.
//!
//! yt-dlp is run with an argument list, never through a shell, with
//! `--ignore-config` and `--no-plugin-dirs` (nothing on the machine can
//! change what it does), `--` before the URL (a URL cannot become an
//! option), a bounded run time, cancellation, and a size cap enforced twice:
//! by yt-dlp's `--max-filesize` and by a watchdog that kills it when the
//! files it writes outgrow the cap (a server can lie about the size, or not
//! state it). The output file is named by us (`media.<ext>`); the title is
//! returned as data and never becomes part of a path.
//!
//! yt-dlp connects on its own, following redirects and embeds, so stages
//! use it only for known sites ([`Ytdlp::is_site_url`]) and the guarded
//! fetcher for everything else, and give it an egress proxy
//! ([`Ytdlp::with_egress`], [`super::egress`]) that holds the requests of
//! its HTTP handlers to the same address policy. It gets no ffmpeg and
//! only http(s) and native HLS formats, since ffmpeg and the rtmp/rtsp
//! programs would connect past the proxy. It runs in a process group of
//! its own, killed whole.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::egress::Egress;
use crate::template::StageError;

/// Bytes of stderr (and of stdout's messages) kept for error messages.
const TAIL_BYTES: usize = 4096;

/// Most stdout read from a download (result line and messages).
const DOWNLOAD_STDOUT_CAP: usize = 1 << 20;

/// Most stdout read from a listing (one JSON document).
const LIST_STDOUT_CAP: usize = 32 << 20;

/// The variables that give yt-dlp the egress proxy (see `Ytdlp::run`).
pub const PROXY_VARIABLES: [&str; 6] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];

/// The file name stem of every download.
const STEM: &str = "media";

/// How often the watchdog measures the files being written.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Hosts whose pages need yt-dlp rather than a direct fetch (the domain and
/// its subdomains).
const SITE_DOMAINS: &[&str] = &[
    "youtube.com",
    "youtu.be",
    "youtube-nocookie.com",
    "vimeo.com",
    "dailymotion.com",
    "dai.ly",
    "twitch.tv",
    "soundcloud.com",
    "bandcamp.com",
    "tiktok.com",
    "twitter.com",
    "x.com",
    "facebook.com",
    "fb.watch",
    "instagram.com",
    "bilibili.com",
    "rumble.com",
    "odysee.com",
    "ted.com",
];

/// Why a yt-dlp run failed. Convert with `StageError::from` for a stage.
#[derive(Debug, Clone, thiserror::Error)]
pub enum YtdlpError {
    /// The URL was refused before yt-dlp was started.
    #[error("bad URL: {0}")]
    BadUrl(String),
    /// yt-dlp could not be started.
    #[error("cannot run yt-dlp ({exe}): {detail}")]
    Spawn {
        /// The configured executable.
        exe: String,
        /// The OS error.
        detail: String,
    },
    /// The run took longer than the limit and was killed.
    #[error("yt-dlp did not finish within {0:?} and was stopped")]
    Timeout(Duration),
    /// The cancellation token fired; yt-dlp was killed.
    #[error("cancelled")]
    Cancelled,
    /// The media is larger than the cap.
    #[error("the media is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The cap.
        limit: u64,
    },
    /// yt-dlp reported an error, classified from its output.
    #[error("yt-dlp failed{}: {message}", exit.map(|c| format!(" (exit {c})")).unwrap_or_default())]
    Failed {
        /// Short kind (`rate_limited`, `unavailable`, ...).
        kind: &'static str,
        /// Whether trying again later can help.
        retryable: bool,
        /// yt-dlp's error line(s), shortened.
        message: String,
        /// The exit code, if it exited.
        exit: Option<i32>,
    },
    /// yt-dlp succeeded but its output was not what was asked for.
    #[error("unexpected yt-dlp output: {0}")]
    Output(String),
    /// A listing's JSON was larger than the cap: asking again gets the same.
    #[error("the listing is larger than the limit of {limit} bytes")]
    ListingTooLarge {
        /// The cap.
        limit: usize,
    },
    /// Preparing or cleaning the download directory failed.
    #[error("file system error: {0}")]
    Io(String),
}

impl YtdlpError {
    /// The short machine-readable kind used in [`StageError`]s.
    pub fn kind(&self) -> &'static str {
        match self {
            YtdlpError::BadUrl(_) => "bad_url",
            YtdlpError::Spawn { .. } => "ytdlp_unavailable",
            YtdlpError::Timeout(_) => "timeout",
            YtdlpError::Cancelled => "cancelled",
            YtdlpError::TooLarge { .. } => "too_large",
            YtdlpError::Failed { kind, .. } => kind,
            YtdlpError::Output(_) => "ytdlp_output",
            YtdlpError::ListingTooLarge { .. } => "listing_too_large",
            YtdlpError::Io(_) => "io",
        }
    }

    /// Whether trying again later can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            YtdlpError::Timeout(_)
            | YtdlpError::Cancelled
            | YtdlpError::Output(_)
            | YtdlpError::Io(_) => true,
            YtdlpError::Failed { retryable, .. } => *retryable,
            YtdlpError::BadUrl(_)
            | YtdlpError::Spawn { .. }
            | YtdlpError::TooLarge { .. }
            | YtdlpError::ListingTooLarge { .. } => false,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            YtdlpError::Spawn { .. } => "install yt-dlp or point the `ytdlp` setting at it",
            YtdlpError::TooLarge { .. } => "raise the download size limit if this video is wanted",
            YtdlpError::ListingTooLarge { .. } => {
                "submit the channel's or playlist's videos, or a smaller playlist"
            }
            YtdlpError::Failed { kind, .. } => match *kind {
                "rate_limited" | "bot_check" => {
                    "the site is throttling this machine; downloads from it pause for a while"
                }
                "http_403" => "the site refused the download; updating yt-dlp often helps",
                "blocked_address" => {
                    "yt-dlp was led to a private or reserved address; exempt a range with \
                     net_allow (e.g. 127.0.0.1/32) only for local testing"
                }
                "ytdlp_failed" => "see yt-dlp's message; updating yt-dlp often helps",
                _ => "",
            },
            _ => "",
        }
    }
}

impl From<YtdlpError> for StageError {
    fn from(e: YtdlpError) -> Self {
        let kind = e.kind();
        let hint = e.hint();
        let message = if hint.is_empty() {
            e.to_string()
        } else {
            format!("{e}; {hint}")
        };
        if e.is_retryable() {
            StageError::retryable(kind, message)
        } else {
            StageError::permanent(kind, message)
        }
    }
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct YtdlpDownload {
    /// The file, `<dir>/media.<ext>`.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The title (data only; never used in a path).
    pub title: Option<String>,
    /// The site's id of the video.
    pub id: Option<String>,
    /// yt-dlp's extractor name (`youtube`, `generic`, ...).
    pub extractor: Option<String>,
}

/// One entry of a channel, playlist or feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YtdlpEntry {
    /// The site's id (or, when the site has none, the entry's URL).
    pub id: String,
    /// Where to fetch it.
    pub url: String,
    /// The title, if listed.
    pub title: Option<String>,
    /// Upload or release time, Unix seconds, if listed.
    pub timestamp: Option<i64>,
    /// The entry is itself a playlist or a channel tab (list it in turn).
    pub is_playlist: bool,
}

/// The yt-dlp executable and the limits of each run.
#[derive(Debug, Clone)]
pub struct Ytdlp {
    exe: PathBuf,
    max_bytes: u64,
    timeout: Duration,
    socket_timeout: Duration,
    egress: Option<Arc<Egress>>,
}

/// What a finished run left behind.
struct RunOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    /// Whether stdout went on past `stdout_cap` (what was kept is cut).
    stdout_cut: bool,
    stderr_tail: Vec<u8>,
}

impl Ytdlp {
    /// yt-dlp at `exe` (a path or a name on `PATH`); downloads are capped
    /// at `max_bytes` and every run at `timeout`.
    pub fn new(exe: impl Into<PathBuf>, max_bytes: u64, timeout: Duration) -> Self {
        Self {
            exe: exe.into(),
            max_bytes,
            timeout,
            socket_timeout: Duration::from_secs(30).min(timeout.max(Duration::from_secs(1))),
            egress: None,
        }
    }

    /// Sends every request yt-dlp makes through `egress`, which holds them
    /// to the address policy (see [`super::egress`]).
    pub fn with_egress(mut self, egress: Arc<Egress>) -> Self {
        self.egress = Some(egress);
        self
    }

    /// Sets yt-dlp's per-connection inactivity timeout (default 30 s).
    pub fn with_socket_timeout(mut self, timeout: Duration) -> Self {
        self.socket_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Downloads one video (audio preferred) into `dir` as `media.<ext>`.
    /// Leftover `media.*` files in `dir` are removed first and after a
    /// failure, so `dir` should belong to this download.
    pub async fn download(
        &self,
        url: &str,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Result<YtdlpDownload, YtdlpError> {
        check_url(url)?;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| YtdlpError::Io(format!("cannot create {}: {e}", dir.display())))?;
        // Absolute, so the path given to `-P` can never look like an option.
        let dir = tokio::fs::canonicalize(dir)
            .await
            .map_err(|e| YtdlpError::Io(format!("cannot resolve {}: {e}", dir.display())))?;
        remove_media_files(&dir).await;

        // A random marker: a hostile title echoed in yt-dlp's messages
        // cannot forge the result line.
        let marker = format!("vidpipe-result-{:016x}", rand::rng().random::<u64>());
        let mut args: Vec<OsString> = common_args(self.socket_timeout);
        for a in [
            "--no-playlist",
            // A URL that is only a playlist would otherwise download all.
            "--max-downloads",
            "1",
            "--no-progress",
            "--restrict-filenames",
            "--force-overwrites",
            "--no-mtime",
            "-f",
            // Formats yt-dlp fetches itself, over http(s) through the egress
            // proxy: no rtmp or rtsp (other programs, no proxy).
            "bestaudio[protocol^=http]/bestaudio[protocol=m3u8_native]/\
             best[protocol^=http]/best[protocol=m3u8_native]",
            // A live stream has no end: yt-dlp would hand it to an ffmpeg
            // of its own that neither --max-filesize nor our size watch
            // can stop in time. Refused, with a reason (below).
            "--match-filters",
            "!is_live",
            "--max-filesize",
        ] {
            args.push(a.into());
        }
        args.push(self.max_bytes.to_string().into());
        args.push("-P".into());
        args.push(dir.clone().into_os_string());
        args.push("-o".into());
        args.push(format!("{STEM}.%(ext)s").into());
        // --print implies --quiet and --simulate; both are undone so that
        // the file is downloaded and yt-dlp's messages stay available for
        // error classification.
        args.push("--no-simulate".into());
        args.push("--print".into());
        args.push(format!("after_move:{marker} %(.{{id,title,extractor,filepath}})j").into());
        args.push("--no-quiet".into());
        args.push("--".into());
        args.push(url.into());

        let result = self
            .run(args, Some(cancel), DOWNLOAD_STDOUT_CAP, Some(&dir), url)
            .await
            .and_then(|out| self.downloaded(out, &marker, &dir, url));
        match result {
            Ok(done) => Ok(done),
            Err(e) => {
                remove_media_files(&dir).await;
                Err(e)
            }
        }
    }

    /// Lists up to `limit` entries of a channel, playlist or feed without
    /// downloading anything. A single video lists as itself.
    pub async fn list(&self, url: &str, limit: usize) -> Result<Vec<YtdlpEntry>, YtdlpError> {
        check_url(url)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut args = common_args(self.socket_timeout);
        for a in ["--flat-playlist", "-J", "--playlist-end"] {
            args.push(a.into());
        }
        args.push(limit.to_string().into());
        args.push("--".into());
        args.push(url.into());
        let out = self.run(args, None, LIST_STDOUT_CAP, None, url).await?;
        if !out.status.success() {
            return Err(failure(
                &out,
                url,
                self.egress.as_deref().map(Egress::refusal),
            ));
        }
        if out.stdout_cut {
            // Cut JSON does not parse, and would not parse next time either.
            return Err(YtdlpError::ListingTooLarge {
                limit: LIST_STDOUT_CAP,
            });
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| YtdlpError::Output(format!("the listing is not JSON: {e}")))?;
        let mut entries = Vec::new();
        match doc.get("entries").and_then(|e| e.as_array()) {
            Some(list) => {
                for item in list {
                    if entries.len() >= limit {
                        break;
                    }
                    if let Some(entry) = entry_from(item) {
                        entries.push(entry);
                    }
                }
            }
            None => entries.extend(entry_from(&doc)),
        }
        Ok(entries)
    }

    /// Whether `url` is on a site that needs yt-dlp (YouTube, Vimeo, ...)
    /// rather than a direct fetch.
    pub fn is_site_url(url: &Url) -> bool {
        if !matches!(url.scheme(), "http" | "https") {
            return false;
        }
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        SITE_DOMAINS
            .iter()
            .any(|d| host == *d || host.strip_suffix(d).is_some_and(|rest| rest.ends_with('.')))
    }

    /// The 11-character YouTube video id of a `watch?v=`, `youtu.be/`,
    /// `shorts/`, `embed/`, `live/` or `v/` URL.
    pub fn youtube_id(url: &Url) -> Option<String> {
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
        let host = host.strip_prefix("www.").unwrap_or(&host);
        let mut segments = url.path_segments()?.filter(|s| !s.is_empty());
        let candidate = if host == "youtu.be" {
            segments.next().map(str::to_owned)
        } else if matches!(
            host,
            "youtube.com" | "m.youtube.com" | "music.youtube.com" | "youtube-nocookie.com"
        ) {
            match segments.next() {
                Some("watch") => url
                    .query_pairs()
                    .find(|(k, _)| k == "v")
                    .map(|(_, v)| v.into_owned()),
                Some("shorts" | "embed" | "live" | "v" | "e") => segments.next().map(str::to_owned),
                _ => None,
            }
        } else {
            None
        };
        candidate.filter(|id| {
            id.len() == 11
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    }

    /// Interprets a finished download run.
    fn downloaded(
        &self,
        out: RunOutput,
        marker: &str,
        dir: &Path,
        url: &str,
    ) -> Result<YtdlpDownload, YtdlpError> {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let result_line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(marker).map(str::trim));
        // Exit 101 is "--max-downloads reached": a success when the file is
        // there.
        let exited_ok = out.status.success() || out.status.code() == Some(101);
        let Some(line) = result_line.filter(|_| exited_ok) else {
            if combined_text(&out).contains("does not pass filter (!is_live)") {
                return Err(YtdlpError::Failed {
                    kind: "live_stream",
                    retryable: false,
                    message: "a live stream is not downloaded: submit its recording once the \
                              stream is over"
                        .into(),
                    exit: out.status.code(),
                });
            }
            if combined_text(&out).contains("larger than max-filesize") {
                return Err(YtdlpError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            if !exited_ok {
                return Err(failure(
                    &out,
                    url,
                    self.egress.as_deref().map(Egress::refusal),
                ));
            }
            return Err(YtdlpError::Output(
                "yt-dlp finished without reporting a file (nothing matched the format?)".into(),
            ));
        };
        let info: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| YtdlpError::Output(format!("the result line is not JSON: {e}")))?;
        let text = |k: &str| {
            info.get(k)
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(1000).collect::<String>())
        };
        let reported = text("filepath")
            .ok_or_else(|| YtdlpError::Output("the result has no file path".into()))?;
        let path = PathBuf::from(&reported);
        // Trust no path from the outside: it must be ours, in our directory.
        let name_ok = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{STEM}.")) && !n.ends_with(".part"));
        if !name_ok || path.parent() != Some(dir) {
            return Err(YtdlpError::Output(format!(
                "yt-dlp wrote an unexpected file {:?}",
                path.file_name().unwrap_or_default()
            )));
        }
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| YtdlpError::Output(format!("the downloaded file is missing: {e}")))?;
        if !meta.is_file() {
            return Err(YtdlpError::Output(
                "the download is not a regular file".into(),
            ));
        }
        if meta.len() > self.max_bytes {
            return Err(YtdlpError::TooLarge {
                limit: self.max_bytes,
            });
        }
        Ok(YtdlpDownload {
            path,
            bytes: meta.len(),
            title: text("title"),
            id: text("id"),
            extractor: text("extractor"),
        })
    }

    /// Runs yt-dlp with `args`, bounded by the timeout, `cancel`, and (when
    /// `watch` is a directory) the size of the files it writes there.
    async fn run(
        &self,
        args: Vec<OsString>,
        cancel: Option<&CancellationToken>,
        stdout_cap: usize,
        watch: Option<&Path>,
        url: &str,
    ) -> Result<RunOutput, YtdlpError> {
        let mut command = Command::new(&self.exe);
        super::tool_env(&mut command);
        if let Some(egress) = &self.egress {
            // Every request of yt-dlp through the egress proxy. Python reads
            // the lower-case names first; the upper-case ones are set too so
            // that no other value can be found. `all_proxy` is what --proxy
            // set: without it a scheme with no proxy of its own (ws, wss, or
            // ftp after a redirect) would connect directly; with it, the
            // websocket handler refuses (it takes SOCKS proxies only) and
            // ftp goes to the proxy, which refuses it. Nothing else of the
            // proxy environment (no_proxy) is passed on (`tool_env`).
            let url = egress.proxy_url();
            for name in PROXY_VARIABLES {
                command.env(name, &url);
            }
        }
        let child = command
            .args(&args)
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // yt-dlp starts ffmpeg for segmented and live streams: in a
            // process group of their own they are killed together.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| YtdlpError::Spawn {
                exe: self.exe.display().to_string(),
                detail: e.to_string(),
            })?;
        let mut group = Group(child);
        let child = &mut group.0;
        tracing::debug!(host = host_of(url), "yt-dlp started");
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();

        enum Stop {
            Timeout,
            Cancelled,
            TooLarge,
        }
        let cancelled = async {
            match cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let watchdog = async {
            match watch {
                Some(dir) => watch_size(dir, self.max_bytes).await,
                None => std::future::pending().await,
            }
        };
        let outcome = {
            let finish = async {
                tokio::join!(
                    read_head(stdout, stdout_cap),
                    read_tail(stderr, TAIL_BYTES),
                    child.wait()
                )
            };
            tokio::select! {
                r = finish => Ok(r),
                _ = tokio::time::sleep(self.timeout) => Err(Stop::Timeout),
                _ = cancelled => Err(Stop::Cancelled),
                _ = watchdog => Err(Stop::TooLarge),
            }
        };
        match outcome {
            Ok(((stdout, stdout_cut), stderr_tail, status)) => {
                let status =
                    status.map_err(|e| YtdlpError::Io(format!("waiting for yt-dlp: {e}")))?;
                Ok(RunOutput {
                    status,
                    stdout,
                    stdout_cut,
                    stderr_tail,
                })
            }
            Err(stop) => {
                // Kill the whole group and reap, so no zombie and no
                // writer is left behind.
                group.kill();
                let _ = group.0.wait().await;
                tracing::debug!(host = host_of(url), "yt-dlp stopped");
                Err(match stop {
                    Stop::Timeout => YtdlpError::Timeout(self.timeout),
                    Stop::Cancelled => YtdlpError::Cancelled,
                    Stop::TooLarge => YtdlpError::TooLarge {
                        limit: self.max_bytes,
                    },
                })
            }
        }
    }
}

/// yt-dlp's process group. Killing yt-dlp alone would leave an ffmpeg it
/// started downloading on, re-parented, into a file already unlinked; so
/// the whole group is killed, on every stop and when the run is dropped.
/// Only while yt-dlp is not yet reaped: until then its pid, which is the
/// group's id, cannot have been given to another process.
struct Group(tokio::process::Child);

impl Group {
    fn kill(&mut self) {
        let pid = self.0.id().and_then(|p| i32::try_from(p).ok());
        if let Some(pid) = pid.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options of every run: nothing from the machine's configuration,
/// plugins or cache, and a bounded wait per connection. (The egress proxy
/// is given in the environment: its URL holds a secret.)
fn common_args(socket_timeout: Duration) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--ignore-config".into(),
        "--no-plugin-dirs".into(),
        "--no-cache-dir".into(),
        "--socket-timeout".into(),
        socket_timeout.as_secs().max(1).to_string().into(),
    ];
    // No ffmpeg for yt-dlp: its HLS demuxer connects by itself, past the
    // proxy (a playlist can name an `httpproxy://` segment on any address),
    // and vidpipe extracts audio with its own. yt-dlp takes a missing path
    // as "no ffmpeg" and does not look on PATH then.
    args.push("--ffmpeg-location".into());
    args.push("/dev/null/no-ffmpeg".into());
    args
}

/// Refuses URLs that are not plain http(s), before anything is spawned.
fn check_url(url: &str) -> Result<(), YtdlpError> {
    if url.starts_with('-') {
        return Err(YtdlpError::BadUrl(
            "the URL starts with '-' (it could be read as an option)".into(),
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(YtdlpError::BadUrl(
            "the URL contains whitespace or control characters".into(),
        ));
    }
    let parsed = Url::parse(url).map_err(|e| YtdlpError::BadUrl(format!("cannot parse: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(YtdlpError::BadUrl(
            "only http and https URLs with a host are accepted".into(),
        ));
    }
    Ok(())
}

fn host_of(url: &str) -> String {
    Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Reads up to `cap` bytes and drains the rest, so the child never blocks
/// on a full pipe.
async fn read_head(reader: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut cut = false;
    let Some(mut reader) = reader else {
        return (kept, cut);
    };
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, cut),
            Ok(n) => {
                let room = cap.saturating_sub(kept.len()).min(n);
                cut |= room < n;
                kept.extend_from_slice(&buf[..room]);
            }
        }
    }
}

/// Reads everything and keeps the last `cap` bytes.
async fn read_tail(reader: Option<impl AsyncRead + Unpin>, cap: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut reader) = reader else {
        return kept;
    };
    let mut buf = vec![0u8; 8 << 10];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > cap {
                    kept.drain(..kept.len() - cap);
                }
            }
        }
    }
}

/// Returns once the `media.*` files in `dir` (partial files and fragments
/// included) add up to more than `max_bytes`.
async fn watch_size(dir: &Path, max_bytes: u64) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if media_bytes(dir).await > max_bytes {
            return;
        }
    }
}

async fn media_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return 0;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if is_media_name(&entry.file_name())
            && let Ok(meta) = entry.metadata().await
        {
            total = total.saturating_add(meta.len());
        }
    }
    total
}

fn is_media_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with(&format!("{STEM}.")))
}

/// Removes `media.*` files (finished, partial, fragments) from `dir`.
async fn remove_media_files(dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if is_media_name(&entry.file_name()) {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

/// stderr's tail and stdout's messages, for classification.
fn combined_text(out: &RunOutput) -> String {
    let stdout = &out.stdout[out.stdout.len().saturating_sub(TAIL_BYTES)..];
    format!(
        "{}\n{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(&out.stderr_tail)
    )
}

/// Classifies a failed run from yt-dlp's ERROR lines (or, without any,
/// from the whole tail of its output). A refusal of the egress proxy
/// (`refusal`: its reason phrase, with a token no server can know) is
/// `blocked_address`.
fn failure(out: &RunOutput, url: &str, refusal: Option<&str>) -> YtdlpError {
    let text = combined_text(out);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR:")).collect();
    let basis = if errors.is_empty() {
        text.clone()
    } else {
        errors.join("\n")
    };
    let (kind, retryable) = if refusal.is_some_and(|r| text.contains(r)) {
        ("blocked_address", false)
    } else {
        classify(&basis)
    };
    let shown = errors
        .last()
        .copied()
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output");
    // yt-dlp repeats the URL in its messages; a query may carry tokens.
    let mut message = shown.trim().to_owned();
    if let Ok(parsed) = Url::parse(url) {
        message = message.replace(url, &super::http::redact(&parsed));
    }
    YtdlpError::Failed {
        kind,
        retryable,
        message: message.chars().take(500).collect(),
        exit: out.status.code(),
    }
}

/// (kind, retryable) for yt-dlp's error text.
fn classify(text: &str) -> (&'static str, bool) {
    let t = text.to_lowercase();
    let has = |s: &str| t.contains(s);
    if has("larger than max-filesize") {
        ("too_large", false)
    } else if has("http error 429") || has("too many requests") {
        ("rate_limited", true)
    } else if has("confirm your age")
        || has("age-restricted")
        || has("inappropriate for some users")
    {
        ("age_restricted", false)
    } else if has("not a bot") {
        ("bot_check", true)
    } else if has("private video") {
        ("private_video", false)
    } else if has("members-only") || has("join this channel") {
        ("members_only", false)
    } else if has("live event will begin") || has("premieres in") {
        ("not_yet_available", true)
    } else if has("video unavailable") || has("is unavailable") || has("is not available") {
        ("unavailable", false)
    } else if has("unsupported url") {
        ("unsupported_url", false)
    } else if has("is not a valid url") {
        ("bad_url", false)
    } else if has("requested format is not available") {
        ("no_format", false)
    } else if has("http error 404") {
        ("http_404", false)
    } else if has("http error 410") {
        ("http_410", false)
    } else if has("http error 403") {
        ("http_403", false)
    } else if has("http error 401") {
        ("http_401", false)
    } else if has("http error 5") {
        ("http_5xx", true)
    } else if has("timed out")
        || has("connection refused")
        || has("connection reset")
        || has("name resolution")
        || has("unable to download")
    {
        ("network", true)
    } else {
        ("ytdlp_failed", true)
    }
}

/// One listing entry, or `None` when it has no usable URL.
fn entry_from(item: &serde_json::Value) -> Option<YtdlpEntry> {
    let text = |k: &str| {
        item.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(|s| s.chars().take(2000).collect::<String>())
    };
    let raw_url = text("url")
        .or_else(|| text("webpage_url"))
        .or_else(|| text("original_url"))?;
    // yt-dlp "smuggles" data in the fragment (e.g. a feed item's guid as
    // force_videoid); it is recovered as the id and kept out of the URL.
    let (url, smuggled_id) = unsmuggle(&raw_url);
    let id = text("id").or(smuggled_id).unwrap_or_else(|| url.clone());
    let timestamp = item
        .get("timestamp")
        .and_then(json_i64)
        .or_else(|| item.get("release_timestamp").and_then(json_i64))
        .or_else(|| {
            text("upload_date")
                .and_then(|d| chrono::NaiveDate::parse_from_str(&d, "%Y%m%d").ok())
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc().timestamp())
        });
    let ie_key = text("ie_key").unwrap_or_default();
    let is_playlist = item.get("_type").and_then(|v| v.as_str()) == Some("playlist")
        || ie_key.ends_with("Tab")
        || ie_key.contains("Playlist")
        || ie_key.contains("Channel");
    Some(YtdlpEntry {
        id,
        url,
        title: text("title"),
        timestamp,
        is_playlist,
    })
}

fn json_i64(v: &serde_json::Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

/// Splits yt-dlp's `#__youtubedl_smuggle=<json>` off a URL.
fn unsmuggle(raw: &str) -> (String, Option<String>) {
    let Some((base, fragment)) = raw.split_once("#__youtubedl_smuggle=") else {
        return (raw.to_owned(), None);
    };
    let decoded: String = url::form_urlencoded::parse(format!("s={fragment}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let id = serde_json::from_str::<serde_json::Value>(&decoded)
        .ok()
        .and_then(|v| {
            v.get("force_videoid")
                .and_then(|x| x.as_str())
                .map(str::to_owned)
        });
    (base.to_owned(), id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(
            classify("ERROR: [youtube] x: Sign in to confirm you\u{2019}re not a bot"),
            ("bot_check", true)
        );
        assert_eq!(
            classify("ERROR: unable to download video data: HTTP Error 429: Too Many Requests"),
            ("rate_limited", true)
        );
        assert_eq!(
            classify("ERROR: [youtube] x: Video unavailable"),
            ("unavailable", false)
        );
        assert_eq!(
            classify("ERROR: Unsupported URL: https://a/"),
            ("unsupported_url", false)
        );
        assert_eq!(
            classify("ERROR: [youtube] x: Private video"),
            ("private_video", false)
        );
        assert_eq!(
            classify("ERROR: [generic] a: Unable to download webpage: HTTP Error 404: Not Found"),
            ("http_404", false)
        );
        assert_eq!(classify("ERROR: something new"), ("ytdlp_failed", true));
    }

    #[test]
    fn smuggled_ids() {
        let (url, id) =
            unsmuggle("http://h/out.mp3#__youtubedl_smuggle=%7B%22force_videoid%22%3A+%22g1%22%7D");
        assert_eq!(url, "http://h/out.mp3");
        assert_eq!(id.as_deref(), Some("g1"));
        assert_eq!(unsmuggle("http://h/a"), ("http://h/a".to_owned(), None));
    }
}
