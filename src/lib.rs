//! vidpipe: a Kafka-native pipeline that turns videos into transcripts and
//! summaries.
//!
//! Module map:
//! - [`admin`]: `vidpipe topics`: partitions, group members and lag; scaling.
//! - [`api`]: `vidpipe serve`: the HTTP API, OpenAPI document, metrics and
//!   status pages.
//! - [`bridge`]: `vidpipe bridge`, the Kafka side of the RabbitMQ adapter.
//! - [`client`]: submit and status, for the CLI and the API.
//! - [`config`]: layered, strict settings (defaults, the local stack's env
//!   file, `vidpipe.toml`, `VIDPIPE_*` variables).
//! - [`store`]: PostgreSQL (status, leases) and the blob store.
//! - [`ids`]: deterministic video and source ids.
//! - [`records`]: the Avro record types that flow between stages.
//! - [`template`]: the processor template: the [`template::Stage`] trait and
//!   the runner that owns Kafka, offsets, retries, status and events.
//! - [`stages`]: the five stages and their registry.
//! - [`media`]: guarded HTTP fetch, yt-dlp and ffmpeg.
//! - [`backends`]: speech recognition and summarization services.
//! - [`replay`]: `vidpipe replay`: re-feed videos to a stage, new generation.
//!
//! See `docs/ARCHITECTURE.md` for the whole picture.

pub mod admin;
pub mod api;
pub mod backends;
pub mod bridge;
pub mod client;
pub mod config;
pub mod ids;
pub mod media;
pub mod records;
pub mod replay;
pub mod stages;
pub mod store;
pub mod template;
