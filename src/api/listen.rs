//! The HTTP server's own loop, and the checks that come before any route.
//!
//! `axum::serve` gives hyper no timer, so a client could take forever to
//! send its headers, and it accepts connections without a bound: a few
//! hundred slow clients would hold that many tasks and sockets. Here each
//! connection gets [`HEADER_TIMEOUT`] to send its request head, at most
//! [`MAX_CONNECTIONS`] are served at once (more are closed on accept), and
//! a shutdown stops accepting, gives the requests under way
//! [`SHUTDOWN_GRACE`], then drops what is left.
//!
//! [`check_host`] refuses a `Host` header that names a host this server was
//! not told it is (monitoring routes excepted). A web page on a name its owner controls can re-point the
//! name at 127.0.0.1 (DNS rebinding); the browser then treats this server as
//! that page's own origin and lets its script read the answers. An address
//! (`127.0.0.1:8686`) and `localhost` cannot be re-pointed that way.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::State;

/// How long a connection may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 512;
/// How long requests under way may run on after a shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`, then drains (see the module
/// documentation).
pub async fn run(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: go on after a pause, not in a spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "too many connections: closing a new one"
            );
            continue;
        };
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that goes away mid-request is not our error.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("every request under way finished"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            "requests still under way at the end of the shutdown grace: dropped"
        ),
    }
}

/// Routes for monitoring, served whatever the `Host`: Prometheus and
/// health probes send their target's name, and these hold nothing a
/// rebinding page could want.
const OPERATIONS: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// Answers 403 when the request's `Host` names a host that is neither an
/// address, nor `localhost`, nor one of `api_hosts`; 400 without exactly
/// one readable Host.
pub async fn check_host(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: Request,
    next: Next,
) -> Response {
    if OPERATIONS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let refuse = |status, message: String| {
        (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
    };
    // A request line in absolute form carries the authority in the URI,
    // which then counts; otherwise the one Host header.
    let host = match req.uri().host() {
        Some(h) => h.to_owned(),
        None => {
            let mut hosts = req.headers().get_all(header::HOST).iter();
            match (hosts.next().map(|h| h.to_str()), hosts.next()) {
                (Some(Ok(h)), None) => h.to_owned(),
                _ => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "send exactly one Host header, in ASCII".into(),
                    );
                }
            }
        }
    };
    if !host_allowed(&host, &state.config.api_hosts) {
        let shown: String = host.chars().take(100).collect();
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "this server does not answer to the host {shown:?}: add it to api_hosts \
                 (VIDPIPE_API_HOSTS, comma-separated), or use its address"
            ),
        );
    }
    next.run(req).await
}

/// Whether `authority` (`host` or `host:port`) is an address, `localhost`,
/// or a name in the comma-separated `allowed`.
pub fn host_allowed(authority: &str, allowed: &str) -> bool {
    let host = authority_host(authority);
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host == "localhost" {
        return true;
    }
    allowed
        .split(',')
        .map(|h| h.trim().trim_end_matches('.'))
        .any(|h| !h.is_empty() && h.eq_ignore_ascii_case(&host))
}

/// The host of `host[:port]` or `[v6][:port]`, brackets removed.
fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn addresses_localhost_and_listed_names_are_allowed() {
        for ok in [
            "127.0.0.1:8686",
            "127.0.0.1",
            "[::1]:8686",
            "10.1.2.3:80",
            "localhost:8686",
            "LOCALHOST",
            "vidpipe.internal:443",
            "Vidpipe.Internal.",
        ] {
            assert!(host_allowed(ok, "vidpipe.internal, other"), "{ok}");
        }
        for refused in [
            "evil.example:8686",
            "vidpipe.internal.evil.example",
            "sub.localhost",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(
                !host_allowed(refused, "vidpipe.internal, other"),
                "{refused}"
            );
        }
        assert!(!host_allowed("vidpipe.internal", ""));
    }
}
