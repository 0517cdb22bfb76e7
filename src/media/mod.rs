//! Media tools behind small async APIs: the guarded HTTP fetcher for direct
//! files ([`http`]), yt-dlp for sites ([`ytdlp`]) and ffmpeg/ffprobe
//! ([`ffmpeg`]). Every input is hostile: subprocesses get argument lists,
//! never shell strings, and every byte goes to disk as it streams.

pub mod egress;
pub mod ffmpeg;
pub mod http;
pub mod ytdlp;

/// Variables of vidpipe's environment a media tool gets; everything else
/// (database URLs, API keys, cloud credentials, proxy exemptions such as
/// `NO_PROXY`, `FFREPORT`) stays out of processes that parse hostile input.
pub const TOOL_ENV: &[&str] = &[
    "PATH",
    // A tool installed outside the system's library path needs it.
    "LD_LIBRARY_PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Gives `cmd` only the [`TOOL_ENV`] part of vidpipe's environment.
fn tool_env(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    cmd.env_clear();
    for key in TOOL_ENV {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd
}
