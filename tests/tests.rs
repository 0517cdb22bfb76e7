//! vidpipe's integration tests: one binary, against the real services that
//! `scripts/stack up` starts (Kafka, the schema registry, PostgreSQL,
//! RabbitMQ, ffmpeg, espeak-ng and the ASR server).
//!
//! A service that is not there is a failure that names the service and the
//! command that starts it; nothing is skipped. Every test makes its own
//! topics, consumer groups and databases with random names, so tests run in
//! parallel and leave each other alone.

mod api;
mod asr;
mod blobs;
mod bridge;
mod browser;
mod catalog;
mod cli;
mod compose;
mod crash;
mod fetch;
mod ffmpeg;
mod helpers;
mod lag;
mod long;
mod membership;
mod pipeline;
mod procs;
mod produce;
mod replay;
mod scale;
mod secrets;
mod smoke;
mod summarize;
mod template;
