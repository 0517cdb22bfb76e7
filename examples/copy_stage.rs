//! Runs the template's copy stage (`vidpipe::template::testkit`) as a
//! process, configured like vidpipe itself (`VIDPIPE_*`), so that tests can
//! kill it (crash safety) and benchmarks can measure it.
//!
//! Extra variables: `COPY_INSTANCE` (stable instance id), `COPY_DELAY_MS`
//! (work per record), `COPY_FINAL` (`1`: success finishes the video).
//! `VIDPIPE_METRICS_LISTEN` serves Prometheus metrics as `vidpipe run` does.
//! SIGTERM or ctrl-c shut it down gracefully.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use vidpipe::config::Config;
use vidpipe::store::db;
use vidpipe::template::codec::Codec;
use vidpipe::template::runner::{RunnerSettings, run};
use vidpipe::template::status::StatusStore;
use vidpipe::template::testkit::CopyStage;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The signal handler first: a SIGTERM that arrives while the process
    // starts up must still mean "shut down gracefully".
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signal.cancel();
    });
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIDPIPE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load()?;
    // Metrics as `vidpipe run` serves them, for tests that read them.
    vidpipe::api::metrics::serve_on(&config.metrics_listen)?;
    let status = if config.runner.status {
        Some(StatusStore::new(
            db::connect(&config.database_url, 8).await?,
        ))
    } else {
        None
    };
    let delay = std::env::var("COPY_DELAY_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let settings = RunnerSettings {
        codec: Codec::new(config.schema_registry_url.as_deref())?,
        instance: std::env::var("COPY_INSTANCE").unwrap_or_else(|_| "copy".into()),
        final_stage: std::env::var("COPY_FINAL").as_deref() == Ok("1"),
        group: None,
        status,
        config,
    };
    let stage = Arc::new(CopyStage {
        delay: Duration::from_millis(delay),
    });
    run(stage, settings, shutdown).await?;
    Ok(())
}
