//! Prometheus metrics of `vidpipe serve`: a recorder without a listener of
//! its own (the API renders it at `/metrics`), request counts and latencies
//! per route, and the pipeline's videos by status, read at each scrape; and
//! the exporter's own listener for the processes without the API.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

/// Why `metrics_listen` could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("metrics_listen: {0}")]
    Address(#[from] std::net::AddrParseError),
    #[error("cannot serve metrics on {addr}: {message}")]
    Serve {
        addr: std::net::SocketAddr,
        message: String,
    },
}

/// Serves Prometheus metrics at `http://{listen}/metrics` from a listener
/// of the exporter's own, for the processes without the HTTP API
/// (`vidpipe run`, `vidpipe bridge`); nothing when `listen` is empty.
pub fn serve_on(listen: &str) -> Result<(), ListenError> {
    if listen.is_empty() {
        return Ok(());
    }
    let addr: std::net::SocketAddr = listen.parse()?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| ListenError::Serve {
            addr,
            message: e.to_string(),
        })
}

/// Installs the global recorder; returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .map_err(|e| e.to_string())?;
    let handle = builder.install_recorder().map_err(|e| e.to_string())?;
    // Without the exporter's own listener nothing else drains histograms.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Counts each request by method, route (the pattern, never the raw path,
/// so ids do not multiply the series) and status, and times it.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    // A fixed set of labels: a client can send any method token.
    let method: &'static str = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("vidpipe_http_requests_total",
        "method" => method, "route" => route.clone(), "status" => status)
    .increment(1);
    metrics::histogram!("vidpipe_http_request_duration_seconds",
        "method" => method, "route" => route)
    .record(start.elapsed().as_secs_f64());
    response
}

/// Sets `vidpipe_videos{status}` from the status tables; leaves the last
/// values when PostgreSQL does not answer within a second (a scrape must
/// not hang on the database).
pub async fn update_pipeline_gauges(pool: &PgPool) {
    let counts =
        tokio::time::timeout(Duration::from_secs(1), super::queries::video_counts(pool)).await;
    match counts {
        Ok(Ok(c)) => {
            for (status, n) in [
                ("queued", c.queued),
                ("running", c.running),
                ("done", c.done),
                ("failed", c.failed),
            ] {
                metrics::gauge!("vidpipe_videos", "status" => status).set(n as f64);
            }
            metrics::gauge!("vidpipe_api_database_up").set(1.0);
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "metrics: cannot count videos");
            metrics::gauge!("vidpipe_api_database_up").set(0.0);
        }
        Err(_) => metrics::gauge!("vidpipe_api_database_up").set(0.0),
    }
}
