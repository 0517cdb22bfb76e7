//! Media tools behind small async APIs: the guarded HTTP fetcher for direct
//! files ([`http`]), yt-dlp for sites ([`ytdlp`]) and ffmpeg/ffprobe
//! ([`ffmpeg`]). Every input is hostile: subprocesses get argument lists,
//! never shell strings, and every byte goes to disk as it streams.

pub mod egress;
pub mod ffmpeg;
pub mod http;
pub mod ytdlp;
