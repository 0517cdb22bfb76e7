//! vidpipe: a Kafka-native pipeline that turns videos into transcripts and
//! summaries.
//!
//! Module map:
//! - [`config`]: layered, strict settings (defaults, the local stack's env
//!   file, `vidpipe.toml`, `VIDPIPE_*` variables).
//! - [`store`]: PostgreSQL (status, leases) and the blob store.
//! - [`records`]: the Avro record types that flow between stages.
//! - [`template`]: the processor template: the [`template::Stage`] trait and
//!   the runner that owns Kafka, offsets, retries, status and events.
//!
//! - [`media`]: guarded HTTP fetch, yt-dlp and ffmpeg.
//! - [`backends`]: speech recognition and summarization services.
//!
//! See `docs/ARCHITECTURE.md` for the whole picture.

pub mod backends;
pub mod config;
pub mod media;
pub mod records;
pub mod store;
pub mod template;
