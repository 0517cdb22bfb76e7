//! RabbitMQ connections and retry timing.
//!
//! An [`Endpoint`] holds the parsed broker URL. Its password never leaves
//! it: [`Endpoint::describe`] and every error show scheme, host, port and
//! vhost only. Connections get a heartbeat and a connect timeout unless the
//! URL sets its own, so that a broker that vanished without closing the
//! socket is noticed in seconds rather than minutes.

use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use rand::Rng;

/// Heartbeat interval when the URL does not set one (seconds).
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Connect timeout when the URL does not set one (milliseconds).
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Why a broker URL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid AMQP URL: {0}")]
pub struct EndpointError(String);

/// A RabbitMQ broker to connect to.
#[derive(Clone)]
pub struct Endpoint {
    uri: AMQPUri,
    described: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // AMQPUri's own Debug prints the password.
        f.debug_tuple("Endpoint").field(&self.described).finish()
    }
}

impl Endpoint {
    /// Parses `amqp://user:password@host:port/vhost` (or `amqps://`). The
    /// error never repeats the URL.
    pub fn parse(url: &str) -> Result<Self, EndpointError> {
        let parsed =
            url::Url::parse(url).map_err(|e| EndpointError(format!("not a valid URL ({e})")))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") {
            return Err(EndpointError(format!(
                "scheme `{}` is not amqp or amqps",
                parsed.scheme()
            )));
        }
        let mut uri: AMQPUri = url
            .parse()
            .map_err(|_| EndpointError("not a valid AMQP URL".into()))?;
        // amq-protocol-uri takes the host from `Url::domain`, which is None
        // for IP addresses, and then falls back to "localhost": an
        // amqp://10.1.2.3/ URL would silently connect to this machine.
        if let Some(host) = parsed.host_str() {
            uri.authority.host = host.trim_start_matches('[').trim_end_matches(']').into();
        }
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(DEFAULT_CONNECT_TIMEOUT_MS);
        }
        let described = format!(
            "{}://{}:{}{}",
            uri.scheme,
            parsed.host_str().unwrap_or("localhost"),
            uri.authority.port,
            parsed.path()
        );
        Ok(Self { uri, described })
    }

    /// Scheme, host, port and vhost: safe for logs.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// Opens a connection named `name` (shown in RabbitMQ's tools).
    pub async fn connect(&self, name: &str) -> Result<Connection, lapin::Error> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        Connection::connect_uri(self.uri.clone(), props).await
    }
}

/// Bounds of an exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffSettings {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

/// Exponential backoff with "equal jitter": each delay is between half and
/// all of the current step, so that instances that lost the same broker at
/// the same moment do not come back in lockstep, yet none retries at once.
#[derive(Debug, Clone)]
pub struct Backoff {
    settings: BackoffSettings,
    step: Duration,
}

impl Backoff {
    /// A backoff at its first step.
    pub fn new(settings: BackoffSettings) -> Self {
        Self {
            settings,
            step: settings.initial,
        }
    }

    /// The next delay; doubles the step up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step.min(self.settings.max);
        self.step = (self.step * 2).min(self.settings.max);
        let half = step / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(jitter_ms)
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.step = self.settings.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_and_errors_never_show_the_password() {
        let e = Endpoint::parse("amqp://vidpipe:hunter2@10.1.2.3:5673/prod").unwrap();
        assert_eq!(e.describe(), "amqp://10.1.2.3:5673/prod");
        assert!(!format!("{e:?}").contains("hunter2"));
        // The IP address is kept (amq-protocol-uri alone would say localhost).
        assert_eq!(e.uri.authority.host, "10.1.2.3");
        assert_eq!(e.uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        for bad in [
            "http://u:hunter2@h/",
            "amqp://u:hunter2@h:notaport/",
            "hunter2",
        ] {
            let err = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
        }
        let local = Endpoint::parse("amqp://u:p@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(local.describe(), "amqp://127.0.0.1:5672/%2f");
    }

    #[test]
    fn backoff_grows_to_its_bound_and_resets() {
        let mut b = Backoff::new(BackoffSettings {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(800),
        });
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[5] >= Duration::from_millis(400) && delays[5] <= Duration::from_millis(800));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
