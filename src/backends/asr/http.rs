//! The HTTP policy both ASR backends share: bounded concurrency, a timeout
//! per request, retries with backoff, Retry-After, and the mapping of
//! answers to [`AsrError`]s. The backends only build requests and parse
//! successful answers.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{AsrError, AsrOptions};

/// Longest Retry-After we sleep through inside one call. A longer one is
/// handed to the runner (as `StageError::retry_after`), which can wait
/// without holding a worker.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(60);

/// Longest server message kept in an error, in characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// One backend's client, limits and retry policy. Clones share the
/// connection pool and the concurrency limit.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) client: reqwest::Client,
    /// Short backend name for logs.
    name: &'static str,
    /// Scheme, host, port and path of the endpoint: safe to log and to put
    /// in error messages (no credentials, no query).
    pub(crate) endpoint: String,
    permits: Arc<Semaphore>,
    timeout: Duration,
    attempts: u32,
    backoff: Duration,
}

/// A 2xx answer's body.
pub(crate) struct Answer {
    pub(crate) body: Vec<u8>,
}

/// How one attempt ended, if not with a usable answer.
enum Failure {
    /// Worth another attempt, after `wait` if the server named one.
    Retry {
        error: AsrError,
        wait: Option<Duration>,
    },
    /// Final.
    Fail(AsrError),
}

impl Policy {
    /// A policy for `endpoint` (already validated, used for messages only).
    pub(crate) fn new(
        name: &'static str,
        endpoint: &url::Url,
        opts: &AsrOptions,
    ) -> Result<Self, AsrError> {
        let client = reqwest::Client::builder()
            // Connecting is quick or not happening; failing fast lets the
            // retry go to a healthy instance behind a load balancer.
            .connect_timeout(opts.timeout.min(Duration::from_secs(10)))
            // A connection per request. A multi-process server (uvicorn or
            // gunicorn workers, like the stack's) keeps a connection with
            // the worker that accepted it, and a worker transcribes one
            // request at a time: on reused connections two requests queued
            // behind one worker while the other sat idle (20 clips at two
            // at a time: 10.8 s against 6.9 s). A fresh connection goes to
            // a worker free to accept it, and so does one through a
            // balancer that spreads connections. Connecting, even with TLS,
            // is small against a transcription; this applies to Google's
            // API too (a TLS handshake per chunk of up to a minute).
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| AsrError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            name,
            endpoint: describe(endpoint),
            permits: Arc::new(Semaphore::new(opts.max_concurrency.max(1))),
            timeout: opts.timeout,
            attempts: opts.attempts.max(1),
            backoff: opts.backoff,
        })
    }

    /// Sends the request that `build` makes (a fresh one per attempt, since
    /// a streamed body is consumed) until it succeeds, fails for good, the
    /// attempts run out, or `cancel` fires. `secret` is removed from any
    /// server message that echoes it.
    pub(crate) async fn send<F, Fut>(
        &self,
        cancel: &CancellationToken,
        secret: Option<&str>,
        mut build: F,
    ) -> Result<Answer, AsrError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<reqwest::RequestBuilder, AsrError>>,
    {
        let mut attempt = 1;
        loop {
            let outcome = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(AsrError::Cancelled),
                outcome = self.attempt(attempt, secret, &mut build) => outcome,
            };
            let (error, wait) = match outcome {
                Ok(answer) => return Ok(answer),
                Err(Failure::Fail(error)) => return Err(error),
                Err(Failure::Retry { error, wait }) => (error, wait),
            };
            if attempt >= self.attempts {
                return Err(error);
            }
            let delay = match wait {
                Some(wait) if wait > MAX_INLINE_WAIT => return Err(error),
                Some(wait) => wait,
                None => jittered(self.backoff, attempt),
            };
            tracing::warn!(
                backend = self.name,
                endpoint = %self.endpoint,
                attempt,
                attempts = self.attempts,
                kind = error.kind(),
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "ASR request failed; retrying"
            );
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(AsrError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
            attempt += 1;
        }
    }

    /// One request: waits for a permit (not counted against the timeout,
    /// since queueing behind our own requests is not the server hanging),
    /// sends, reads the whole answer, classifies it.
    async fn attempt<F, Fut>(
        &self,
        attempt: u32,
        secret: Option<&str>,
        build: &mut F,
    ) -> Result<Answer, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<reqwest::RequestBuilder, AsrError>>,
    {
        let _permit = self.permits.acquire().await.map_err(|_| {
            // Only a closed semaphore fails, and nothing closes ours.
            Failure::Fail(AsrError::Config("the concurrency limit was closed".into()))
        })?;
        let request = build().await.map_err(Failure::Fail)?;
        // reqwest's per-request timeout covers connecting, sending the body
        // and reading the whole answer.
        let result = async {
            let response = request.timeout(self.timeout).send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        let (status, headers, body) = match result {
            Ok(parts) => parts,
            Err(e) => return Err(self.transport_failure(&e, attempt)),
        };
        if status.is_success() {
            return Ok(Answer {
                body: body.to_vec(),
            });
        }
        let message = server_message(&body, secret);
        tracing::debug!(
            backend = self.name,
            status = status.as_u16(),
            attempt,
            "ASR request answered with an error"
        );
        Err(self.status_failure(status, &headers, message, attempt))
    }

    fn status_failure(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        message: String,
        attempts: u32,
    ) -> Failure {
        let endpoint = self.endpoint.clone();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = retry_after(headers);
            return Failure::Retry {
                error: AsrError::RateLimited {
                    endpoint,
                    retry_after,
                    message,
                },
                wait: retry_after,
            };
        }
        // 408 is the server giving up on a slow upload; 5xx are its own
        // failures, except the two that say it can never serve this request.
        let transient = status == StatusCode::REQUEST_TIMEOUT
            || (status.is_server_error()
                && status != StatusCode::NOT_IMPLEMENTED
                && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED);
        if transient {
            Failure::Retry {
                error: AsrError::Server {
                    endpoint,
                    status: status.as_u16(),
                    attempts,
                    message,
                },
                wait: retry_after(headers),
            }
        } else {
            Failure::Fail(AsrError::Rejected {
                endpoint,
                status: status.as_u16(),
                message,
            })
        }
    }

    fn transport_failure(&self, e: &reqwest::Error, attempts: u32) -> Failure {
        let endpoint = self.endpoint.clone();
        if e.is_builder() {
            return Failure::Fail(AsrError::Config(error_chain(e)));
        }
        let error = if e.is_timeout() {
            AsrError::Timeout {
                endpoint,
                timeout: self.timeout,
                attempts,
            }
        } else {
            // Refused, reset, closed mid-answer, DNS: all can pass.
            AsrError::Unavailable {
                endpoint,
                attempts,
                message: error_chain(e),
            }
        };
        Failure::Retry { error, wait: None }
    }
}

/// `scheme://host[:port]/path` of a URL: never its user, password or query.
pub(crate) fn describe(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

/// Parses and checks a base URL given in configuration.
pub(crate) fn parse_base(what: &str, raw: &str) -> Result<url::Url, AsrError> {
    let url = url::Url::parse(raw.trim()).map_err(|e| {
        // The raw value may hold credentials; the parse error does not.
        AsrError::Config(format!("{what} is not a valid URL: {e}"))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(AsrError::Config(format!(
            "{what} must be an http(s) URL with a host, not {}",
            describe(&url)
        )));
    }
    Ok(url)
}

/// Delay before attempt `attempt + 1`: `base * 2^(attempt-1)`, of which a
/// random half, so that clients that failed together do not retry together.
fn jittered(base: Duration, attempt: u32) -> Duration {
    let full = base.saturating_mul(1u32 << (attempt - 1).min(16));
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Retry-After as seconds or as an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    parse_retry_after(value, chrono::Utc::now())
}

fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    // IMF-fixdate ("Wed, 21 Oct 2015 07:28:00 GMT") is RFC 2822 syntax.
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - now;
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// The human part of an error body: the message field of the usual JSON
/// shapes (OpenAI `error.message`, FastAPI `detail`, Google
/// `error.message`), else the text; shortened, with `secret` blanked out.
pub(crate) fn server_message(body: &[u8], secret: Option<&str>) -> String {
    let text = String::from_utf8_lossy(body);
    let extracted = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let candidates = [
                v.pointer("/error/message"),
                v.pointer("/detail/error/message"),
                v.pointer("/detail"),
                v.pointer("/message"),
                v.pointer("/error"),
            ];
            candidates.into_iter().flatten().find_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            })
        })
        .unwrap_or_else(|| text.into_owned());
    let mut message = extracted.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        message = message.replace(secret, "[redacted]");
    }
    if message.is_empty() {
        return "(no message)".into();
    }
    truncate(&message, MAX_MESSAGE_CHARS)
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// A reqwest error and its causes, without the URL, which reqwest puts in
/// its message and which could carry credentials in its user info (our
/// messages name the endpoint separately).
fn error_chain(e: &reqwest::Error) -> String {
    let mut top = e.to_string();
    if let Some(url) = e.url() {
        top = top
            .replace(&format!(" for url ({})", url.as_str()), "")
            .replace(url.as_str(), &describe(url));
    }
    let mut parts = vec![top];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .map(|d| d.with_timezone(&chrono::Utc))
            .expect("valid date");
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("0.5", now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now".
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn server_messages_are_extracted_shortened_and_redacted() {
        let openai =
            br#"{"error":{"message":"Invalid file format.","type":"invalid_request_error"}}"#;
        assert_eq!(server_message(openai, None), "Invalid file format.");
        let fastapi = br#"{"detail":{"error":{"message":"unknown model: x"}}}"#;
        assert_eq!(server_message(fastapi, None), "unknown model: x");
        let google =
            br#"{"error":{"code":400,"message":"bad  key sk-123","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(server_message(google, Some("sk-123")), "bad key [redacted]");
        let long = "x".repeat(1000);
        let m = server_message(long.as_bytes(), None);
        assert_eq!(m.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(server_message(b"", None), "(no message)");
    }

    #[test]
    fn descriptions_drop_credentials_and_queries() {
        let url = url::Url::parse("https://user:pw@api.example.com:8443/v1?key=abc").expect("url");
        assert_eq!(describe(&url), "https://api.example.com:8443/v1");
    }

    #[tokio::test]
    async fn transport_errors_do_not_repeat_the_url() {
        let e = reqwest::Client::new()
            .get("http://user:hunter2@127.0.0.1:1/v1?key=abc")
            .send()
            .await
            .expect_err("nothing listens on port 1");
        let message = error_chain(&e);
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!message.contains("key=abc"), "{message}");
        assert!(message.contains("error sending request"), "{message}");
    }

    #[test]
    fn backoff_doubles_with_jitter_in_the_upper_half() {
        let base = Duration::from_millis(100);
        for attempt in 1..=4 {
            let full = base * (1 << (attempt - 1));
            let d = jittered(base, attempt);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }
}
