//! Layered, strict configuration.
//!
//! Layers, later ones win:
//! 1. built-in defaults that point at the local stack's standard ports;
//! 2. the env file that `scripts/stack up` writes (`$VIDPIPE_STACK_DIR/env`,
//!    default `.stack/env`), so that a stack which had to pick other ports
//!    is found without any configuration;
//! 3. a TOML file: `$VIDPIPE_CONFIG`, else `vidpipe.toml` if it exists;
//! 4. `VIDPIPE_*` environment variables (nested keys with `__`, e.g.
//!    `VIDPIPE_RUNNER__IN_FLIGHT=64`).
//!
//! Unknown keys are errors in every layer, so a typo is reported instead of
//! silently falling back to a default. Secrets (database and broker URLs with
//! passwords, API keys) are `SecretString`s: their `Debug` output is redacted
//! and they are exposed only where a client is built.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// Environment variables with the `VIDPIPE_` prefix that are not settings.
/// (`TEST_S3_*`: the stack's S3-compatible server, for tests only.)
const NON_SETTING_VARS: &[&str] = &[
    "CONFIG",
    "STACK_DIR",
    "LOG",
    "LOG_FORMAT",
    "TEST_KEEP",
    "TEST_S3_ENDPOINT",
    "TEST_S3_BUCKET",
    "TEST_S3_ACCESS_KEY_ID",
    "TEST_S3_SECRET_ACCESS_KEY",
];

/// A configuration problem, naming the setting and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers could not be merged or deserialised (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parsed but is not acceptable.
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid {
        /// The setting, as written in the TOML file.
        key: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The stack's env file exists but cannot be read.
    #[error("cannot read the stack env file {path}: {source}")]
    StackFile {
        /// Path of the env file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Processing guarantee of the stage runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// Outputs, events and input offsets are committed in one Kafka
    /// transaction; zombies are fenced.
    ExactlyOnce,
    /// Outputs are acknowledged before offsets are committed; a crash can
    /// repeat a record, whose effects are idempotent.
    AtLeastOnce,
}

/// Settings of the processor template's runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// Records processed concurrently per instance and stage.
    pub in_flight: usize,
    /// Per-stage overrides of `in_flight`, e.g. `{ "extract-audio" = 2 }`:
    /// a CPU-bound stage running many ffmpeg processes at once starves the
    /// others (and a local ASR server) on a small machine.
    pub stage_in_flight: BTreeMap<String, usize>,
    /// Records fetched and held per instance (running, waiting behind their
    /// video, or waiting for a free worker); partitions are paused at this
    /// many and resumed at half of it. Much larger than `in_flight`, so that
    /// pausing is rare: every pause drops librdkafka's prefetched records.
    pub max_buffered: usize,
    /// Attempts for a retryable failure before the record goes to the DLQ.
    pub max_attempts: u32,
    /// First retry delay; doubled per attempt, with full jitter.
    pub backoff_initial_ms: u64,
    /// Upper bound of a retry delay.
    pub backoff_max_ms: u64,
    /// How often finished work is committed (offsets, and the transaction in
    /// exactly-once mode). Shorter means fewer repeats after a crash and
    /// less delay between stages (in exactly-once mode the next stage sees
    /// a record once its transaction commits: half an interval per hop on
    /// average); longer means fewer, larger transactions. 100 ms, as Kafka
    /// Streams under exactly-once: a commit costs the broker a few
    /// milliseconds, against records that take seconds to minutes.
    pub commit_interval_ms: u64,
    /// How long shutdown waits for in-flight records before releasing them
    /// (they are then re-run by the next owner of the partition).
    pub shutdown_grace_ms: u64,
    /// Consumer group session timeout: how long a silent instance keeps its
    /// partitions.
    pub session_timeout_ms: u64,
    /// Write per-video and per-stage status rows to PostgreSQL.
    pub status: bool,
    /// A stage run's `running` row is written once the run has lasted this
    /// long (0: as it starts); a run that ends sooner gets its final row
    /// only, which spares fast stages one database write per record. Media
    /// stages run for seconds or minutes: their rows show `running` as
    /// before, this much later.
    pub status_running_after_ms: u64,
    /// Exactly-once: how long the broker lets a transaction stay open
    /// before aborting it. A crashed instance's open transaction blocks
    /// read_committed readers for up to this long, so keep it short; the
    /// runner commits every `commit_interval_ms`, well within it.
    pub transaction_timeout_ms: u64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            in_flight: 32,
            stage_in_flight: BTreeMap::from([("extract-audio".to_string(), 2)]),
            max_buffered: 10_000,
            max_attempts: 5,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            commit_interval_ms: 100,
            shutdown_grace_ms: 30_000,
            session_timeout_ms: 10_000,
            status: true,
            status_running_after_ms: 100,
            transaction_timeout_ms: 30_000,
        }
    }
}

/// Limits and tuning of the media stages (download, extract-audio,
/// transcribe, discover). Every limit is on by default: inputs are hostile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Largest download, in bytes, whatever the server says.
    pub max_download_bytes: u64,
    /// Total time for one download.
    pub download_timeout_secs: u64,
    /// Slowest acceptable transfer, in bytes per second, measured over
    /// `min_rate_window_secs`.
    pub min_download_rate: u64,
    /// Window of the throughput check.
    pub min_rate_window_secs: u64,
    /// Concurrent downloads per site (host).
    pub per_site: usize,
    /// Longest media accepted, in seconds.
    pub max_duration_secs: u64,
    /// Largest audio chunk sent to the ASR backend (OpenAI's limit is 25 MiB).
    pub chunk_max_bytes: u64,
    /// Aimed-for chunk length, in seconds; cuts fall in silences near it.
    pub chunk_secs: u64,
    /// Audio repeated on both sides of a cut, in milliseconds.
    pub chunk_overlap_ms: u64,
    /// Concurrent requests to the ASR backend per instance.
    pub asr_concurrency: usize,
    /// Timeout of one ASR request, in seconds.
    pub asr_timeout_secs: u64,
    /// ASR backend: `openai` (any OpenAI-compatible server) or `google`.
    pub asr_backend: String,
    /// Entries a channel, playlist or feed yields the first time it is seen,
    /// unless its subscription says otherwise (at most 500).
    pub max_backfill: usize,
    /// Nice value of ffmpeg and ffprobe (0-19, 0 = vidpipe's own priority):
    /// decoding yields the CPU to transcription, the pipeline's bottleneck.
    pub tool_niceness: i32,
    /// The ffmpeg executable (a name looked up in `PATH`, or a path).
    pub ffmpeg: String,
    /// The ffprobe executable (a name looked up in `PATH`, or a path).
    pub ffprobe: String,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_download_bytes: 2 << 30,
            download_timeout_secs: 1800,
            min_download_rate: 16 * 1024,
            min_rate_window_secs: 30,
            per_site: 2,
            max_duration_secs: 4 * 3600,
            chunk_max_bytes: 24 << 20,
            chunk_secs: 600,
            chunk_overlap_ms: 1500,
            asr_concurrency: 2,
            asr_timeout_secs: 600,
            asr_backend: "openai".into(),
            max_backfill: 20,
            tool_niceness: 10,
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
        }
    }
}

/// S3-compatible blob storage, used when `storage` is an `s3://bucket/prefix`
/// URL (AWS S3 or any server speaking its API: MinIO, Ceph, R2, ...).
///
/// Credentials: `access_key_id` and `secret_access_key` (with an optional
/// `session_token`) when set; otherwise `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN` from the environment;
/// otherwise the platform's (web identity, container or instance
/// credentials), as AWS SDKs do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Base URL of an S3-compatible server (path-style requests); empty
    /// means AWS S3 in `region`.
    pub endpoint: String,
    /// Region used for signing (and for AWS' endpoint).
    pub region: String,
    /// Allow an `http://` endpoint (a local test server); off by default so
    /// that credentials and media never cross a network in clear text.
    pub allow_http: bool,
    /// Access key id.
    #[serde(serialize_with = "expose_opt")]
    pub access_key_id: Option<SecretString>,
    /// Secret access key.
    #[serde(serialize_with = "expose_opt")]
    pub secret_access_key: Option<SecretString>,
    /// Session token of temporary credentials.
    #[serde(serialize_with = "expose_opt")]
    pub session_token: Option<SecretString>,
    /// Part size of multipart uploads, in bytes (S3 allows 5 MiB to 5 GiB).
    /// Files up to this size are sent in one request; an upload holds at
    /// most three parts in memory.
    pub part_size: u64,
    /// Local working directory of an instance whose blobs live in S3:
    /// downloads, tool inputs (ffmpeg, ASR chunks) and outputs stay here
    /// only until uploaded or used. Empty means the system's temp directory.
    pub scratch_dir: String,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            region: "us-east-1".into(),
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            part_size: 8 << 20,
            scratch_dir: String::new(),
        }
    }
}

/// The whole configuration. Field names are the TOML keys and, upper-cased
/// with the `VIDPIPE_` prefix, the environment variables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub kafka_brokers: String,
    /// Confluent-compatible schema registry; empty means Avro single-object
    /// encoding with the schemas compiled into the binary.
    pub schema_registry_url: Option<String>,
    /// PostgreSQL URL (may hold a password).
    #[serde(serialize_with = "expose")]
    pub database_url: SecretString,
    /// RabbitMQ URL for the adapter (may hold a password).
    #[serde(serialize_with = "expose")]
    pub amqp_url: SecretString,
    /// OpenAI-compatible transcription endpoint (base URL ending in `/v1`).
    pub asr_url: String,
    /// Model name sent to the transcription endpoint.
    pub asr_model: String,
    /// API key for the transcription endpoint.
    #[serde(serialize_with = "expose_opt")]
    pub asr_api_key: Option<SecretString>,
    /// Chat-completions endpoint for summaries; unset means the built-in
    /// extractive summarizer.
    pub llm_url: Option<String>,
    /// Model for the chat-completions endpoint.
    pub llm_model: Option<String>,
    /// API key for the chat-completions endpoint.
    #[serde(serialize_with = "expose_opt")]
    pub llm_api_key: Option<SecretString>,
    /// Bearer token that `vidpipe serve` requires for every request that
    /// changes something (submit, subscriptions, replay). Unset, the API
    /// listens on loopback addresses only.
    #[serde(serialize_with = "expose_opt")]
    pub api_token: Option<SecretString>,
    /// Comma-separated host names `vidpipe serve` answers to besides its
    /// addresses and `localhost` (a request naming another host gets 403,
    /// against DNS rebinding), e.g. `vidpipe.example.com`.
    pub api_hosts: String,
    /// The longest a request to `vidpipe serve` may take (seconds).
    pub api_request_timeout_secs: u64,
    /// Blob store: a directory, or an `s3://bucket/prefix` URL (see `s3`).
    pub storage: String,
    /// The S3-compatible store's endpoint, region and credentials.
    pub s3: S3Config,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Partitions of topics that `vidpipe run` creates.
    pub topic_partitions: i32,
    /// Replication factor of topics that `vidpipe run` creates.
    pub topic_replication: i32,
    /// Processing guarantee.
    pub guarantee: Guarantee,
    /// Comma-separated CIDRs exempt from the download guard (testing only).
    pub net_allow: String,
    /// The yt-dlp executable.
    pub ytdlp: String,
    /// Runner tuning.
    pub runner: RunnerConfig,
    /// Media limits.
    pub media: MediaConfig,
    /// Address for `/metrics` of `vidpipe run` (empty: no listener).
    pub metrics_listen: String,
    /// The RabbitMQ adapter (`vidpipe bridge`).
    pub bridge: crate::bridge::BridgeConfig,
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guess was right.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn expose<S: serde::Serializer>(s: &SecretString, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose_secret())
}

fn expose_opt<S: serde::Serializer>(s: &Option<SecretString>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(s.expose_secret()),
        None => ser.serialize_none(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kafka_brokers: "127.0.0.1:9092".into(),
            schema_registry_url: Some("http://127.0.0.1:8081/apis/ccompat/v7".into()),
            database_url: "postgres://vidpipe:vidpipe@127.0.0.1:5432/vidpipe".into(),
            amqp_url: "amqp://vidpipe:vidpipe@127.0.0.1:5672/%2f".into(),
            asr_url: "http://127.0.0.1:8000/v1".into(),
            asr_model: "whisper-1".into(),
            asr_api_key: None,
            llm_url: None,
            llm_model: None,
            llm_api_key: None,
            api_token: None,
            api_hosts: String::new(),
            api_request_timeout_secs: 60,
            storage: ".stack/blobs".into(),
            s3: S3Config::default(),
            topic_prefix: "vidpipe.".into(),
            topic_partitions: 6,
            topic_replication: 1,
            guarantee: Guarantee::ExactlyOnce,
            net_allow: String::new(),
            ytdlp: "yt-dlp".into(),
            runner: RunnerConfig::default(),
            media: MediaConfig::default(),
            metrics_listen: String::new(),
            bridge: crate::bridge::BridgeConfig::default(),
        }
    }
}

impl Config {
    /// Loads every layer from the process environment and working directory.
    pub fn load() -> Result<Self, ConfigError> {
        let stack_dir = std::env::var_os("VIDPIPE_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".stack"));
        let file = std::env::var_os("VIDPIPE_CONFIG").map(PathBuf::from);
        let mut figment = Self::base_figment(&stack_dir)?;
        match file {
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None => figment = figment.merge(Toml::file("vidpipe.toml")),
        }
        let figment = figment.merge(
            Env::prefixed("VIDPIPE_")
                .ignore(NON_SETTING_VARS)
                .split("__"),
        );
        Self::from_figment(figment)
    }

    /// Defaults plus the stack's env file: what a program on this machine
    /// should use when nothing else is configured. Tests start from here.
    pub fn local_defaults() -> Result<Self, ConfigError> {
        let stack_dir = std::env::var_os("VIDPIPE_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".stack"));
        Self::from_figment(Self::base_figment(&stack_dir)?)
    }

    fn base_figment(stack_dir: &Path) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let env_file = stack_dir.join("env");
        if env_file.exists() {
            let text =
                std::fs::read_to_string(&env_file).map_err(|source| ConfigError::StackFile {
                    path: env_file.clone(),
                    source,
                })?;
            figment = figment.merge(Serialized::defaults(parse_env_file(&text)));
        }
        Ok(figment)
    }

    /// Extracts and validates a configuration from a prepared figment.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if config
            .schema_registry_url
            .as_deref()
            .is_some_and(|u| u.trim().is_empty())
        {
            config.schema_registry_url = None;
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        };
        if self.kafka_brokers.trim().is_empty() {
            return Err(invalid("kafka_brokers", "must name at least one broker"));
        }
        if let Some(token) = &self.api_token {
            let token = token.expose_secret();
            if token.chars().count() < 16
                || token.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "api_token",
                    "must be at least 16 characters, without spaces (e.g. openssl rand -hex 24)",
                ));
            }
        }
        let not_a_name = |h: &str| {
            h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if self.api_hosts.split(',').map(str::trim).any(not_a_name) && !self.api_hosts.is_empty() {
            return Err(invalid(
                "api_hosts",
                "give host names separated by commas, without scheme or port \
                 (e.g. vidpipe.example.com,vidpipe)",
            ));
        }
        if self.api_request_timeout_secs == 0 {
            return Err(invalid("api_request_timeout_secs", "must be at least 1"));
        }
        check_url(
            "database_url",
            self.database_url.expose_secret(),
            &["postgres", "postgresql"],
        )?;
        check_url(
            "amqp_url",
            self.amqp_url.expose_secret(),
            &["amqp", "amqps"],
        )?;
        check_url("asr_url", &self.asr_url, &["http", "https"])?;
        if let Some(url) = &self.schema_registry_url {
            check_url("schema_registry_url", url, &["http", "https"])?;
        }
        if let Some(url) = &self.llm_url {
            check_url("llm_url", url, &["http", "https"])?;
        }
        self.validate_storage()?;
        if self.topic_partitions < 1 {
            return Err(invalid("topic_partitions", "must be at least 1"));
        }
        if self.topic_replication < 1 {
            return Err(invalid("topic_replication", "must be at least 1"));
        }
        if self.runner.in_flight == 0 {
            return Err(invalid("runner.in_flight", "must be at least 1"));
        }
        if !matches!(self.media.asr_backend.as_str(), "openai" | "google") {
            return Err(invalid("media.asr_backend", "must be openai or google"));
        }
        if !(0..=19).contains(&self.media.tool_niceness) {
            return Err(invalid(
                "media.tool_niceness",
                "must be from 0 (normal priority) to 19 (lowest)",
            ));
        }
        for (key, exe) in [
            ("media.ffmpeg", &self.media.ffmpeg),
            ("media.ffprobe", &self.media.ffprobe),
        ] {
            if exe.trim().is_empty() || exe.trim() != exe.as_str() {
                return Err(invalid(
                    key,
                    "must name an executable, without spaces around it",
                ));
            }
        }
        if self.media.asr_concurrency == 0 || self.media.per_site == 0 {
            return Err(invalid(
                "media.asr_concurrency",
                "media.asr_concurrency and media.per_site must be at least 1",
            ));
        }
        if self.media.max_backfill > crate::stages::discover::MAX_BACKFILL {
            return Err(invalid(
                "media.max_backfill",
                &format!(
                    "must be at most {} (the most one poll takes)",
                    crate::stages::discover::MAX_BACKFILL
                ),
            ));
        }
        if self.media.chunk_max_bytes < (1 << 20) {
            return Err(invalid("media.chunk_max_bytes", "must be at least 1 MiB"));
        }
        if !self.metrics_listen.is_empty()
            && self.metrics_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics_listen",
                "must be host:port, e.g. 127.0.0.1:9464",
            ));
        }
        for (stage, n) in &self.runner.stage_in_flight {
            if !crate::stages::STAGES.contains(&stage.as_str()) {
                return Err(invalid(
                    "runner.stage_in_flight",
                    &format!(
                        "unknown stage {stage:?}; the stages are {}",
                        crate::stages::STAGES.join(", ")
                    ),
                ));
            }
            if *n == 0 {
                return Err(invalid(
                    "runner.stage_in_flight",
                    "every limit must be at least 1",
                ));
            }
        }
        if self.runner.max_buffered < self.runner.in_flight {
            return Err(invalid(
                "runner.max_buffered",
                "must be at least runner.in_flight",
            ));
        }
        if self.runner.transaction_timeout_ms < 4 * self.runner.commit_interval_ms {
            return Err(invalid(
                "runner.transaction_timeout_ms",
                "must be at least four commit intervals (runner.commit_interval_ms)",
            ));
        }
        if self.runner.max_attempts == 0 {
            return Err(invalid("runner.max_attempts", "must be at least 1"));
        }
        if self.runner.backoff_initial_ms > self.runner.backoff_max_ms {
            return Err(invalid(
                "runner.backoff_initial_ms",
                "must not exceed runner.backoff_max_ms",
            ));
        }
        Ok(())
    }

    /// `storage` and, for an `s3://` store, the `s3` table.
    fn validate_storage(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        };
        if self.storage.trim().is_empty() {
            return Err(invalid(
                "storage",
                "must be a directory or an s3://bucket/prefix URL",
            ));
        }
        if !crate::store::blobs::is_s3(&self.storage) {
            if self.storage.contains("://") {
                return Err(invalid(
                    "storage",
                    "the only URL scheme supported is s3:// (s3://bucket/prefix); \
                     anything else is a directory path",
                ));
            }
            return Ok(());
        }
        crate::store::blobs::parse_s3_storage(&self.storage)
            .map_err(|reason| invalid("storage", &reason))?;
        let s3 = &self.s3;
        if !s3.endpoint.is_empty() {
            check_url("s3.endpoint", &s3.endpoint, &["http", "https"])?;
            if s3.endpoint.starts_with("http:") && !s3.allow_http {
                return Err(invalid(
                    "s3.endpoint",
                    "is plain http://; set s3.allow_http = true to allow it (local test servers only)",
                ));
            }
        }
        if s3.region.trim().is_empty() {
            return Err(invalid("s3.region", "must not be empty (e.g. us-east-1)"));
        }
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            return Err(invalid(
                "s3.secret_access_key",
                "s3.access_key_id and s3.secret_access_key go together: set both or neither",
            ));
        }
        if s3.session_token.is_some() && s3.access_key_id.is_none() {
            return Err(invalid(
                "s3.session_token",
                "needs s3.access_key_id and s3.secret_access_key",
            ));
        }
        if !((5 << 20)..=(5 << 30)).contains(&s3.part_size) {
            return Err(invalid(
                "s3.part_size",
                "must be between 5 MiB (5242880) and 5 GiB, S3's limits for a part",
            ));
        }
        Ok(())
    }

    /// Full topic name for a suffix such as `video.discovered`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}{}", self.topic_prefix, suffix)
    }
}

/// Checks that a URL parses and has one of the allowed schemes, without ever
/// putting the URL itself (which may hold a password) into the error.
fn check_url(key: &'static str, value: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let url = url::Url::parse(value).map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("not a valid URL ({e})"),
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(ConfigError::Invalid {
            key,
            reason: format!(
                "scheme `{}` is not one of {}",
                url.scheme(),
                schemes.join(", ")
            ),
        });
    }
    Ok(())
}

/// Parses the stack's `KEY=VALUE` lines into setting names, skipping
/// comments and the variables that are not settings.
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| {
            let key = k.trim().strip_prefix("VIDPIPE_")?;
            if NON_SETTING_VARS.contains(&key) {
                return None;
            }
            Some((key.to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults with `toml` over them, extracted and checked.
    fn load(toml: &str) -> Result<Config, ConfigError> {
        Config::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)),
        )
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("kafka_brokerz = \"x:1\""));
        let err = Config::from_figment(figment).unwrap_err().to_string();
        assert!(err.contains("kafka_brokerz"), "{err}");
    }

    #[test]
    fn bad_urls_name_the_key_and_never_echo_the_secret() {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("database_url = \"mysql://u:hunter2@db/x\""));
        let err = Config::from_figment(figment).unwrap_err().to_string();
        assert!(err.contains("database_url"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn stack_env_file_sets_defaults_and_skips_non_settings() {
        let map = parse_env_file(
            "# comment\nVIDPIPE_KAFKA_BROKERS=127.0.0.1:19092\nVIDPIPE_STACK_DIR=/x\nOTHER=1\n",
        );
        assert_eq!(
            map.get("kafka_brokers").map(String::as_str),
            Some("127.0.0.1:19092")
        );
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn empty_registry_url_means_single_object_encoding() {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("schema_registry_url = \"\""));
        assert!(
            Config::from_figment(figment)
                .unwrap()
                .schema_registry_url
                .is_none()
        );
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("asr_api_key = \"sk-canary-123\""));
        let config = Config::from_figment(figment).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("sk-canary-123"));
        assert!(!shown.contains("vidpipe:vidpipe@"));
    }

    #[test]
    fn tool_niceness_is_a_nice_value() {
        assert_eq!(load("").unwrap().media.tool_niceness, 10);
        assert_eq!(
            load("[media]\ntool_niceness = 0\n")
                .unwrap()
                .media
                .tool_niceness,
            0
        );
        for bad in ["-5", "20"] {
            let err = load(&format!("[media]\ntool_niceness = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("media.tool_niceness"), "{err}");
        }
    }

    #[test]
    fn max_backfill_is_bounded_by_what_one_poll_takes() {
        assert_eq!(
            load("[media]\nmax_backfill = 500\n")
                .unwrap()
                .media
                .max_backfill,
            500
        );
        let err = load("[media]\nmax_backfill = 501\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("media.max_backfill"), "{err}");
    }

    #[test]
    fn tool_executables_are_configurable_and_never_empty() {
        let defaults = load("").unwrap().media;
        assert_eq!(
            (defaults.ffmpeg.as_str(), defaults.ffprobe.as_str()),
            ("ffmpeg", "ffprobe")
        );
        let set = load("[media]\nffmpeg = \"/opt/ff/ffmpeg\"\nffprobe = \"/opt/ff/ffprobe\"\n")
            .unwrap()
            .media;
        assert_eq!(
            (set.ffmpeg.as_str(), set.ffprobe.as_str()),
            ("/opt/ff/ffmpeg", "/opt/ff/ffprobe")
        );
        // Blank, or padded (a stray space from a copied path would make
        // the tool "missing" only when the first video arrives).
        for key in ["ffmpeg", "ffprobe"] {
            for value in [" ", "", "/opt/ff/ffmpeg ", " ffmpeg"] {
                let err = load(&format!("[media]\n{key} = \"{value}\"\n"))
                    .expect_err(value)
                    .to_string();
                assert!(err.contains(&format!("media.{key}")), "{value:?}: {err}");
            }
        }
    }

    #[test]
    fn api_hosts_are_names_and_the_request_timeout_is_positive() {
        let c = load("api_hosts = \"vidpipe.example.com, vidpipe\"\n").unwrap();
        assert_eq!(c.api_hosts, "vidpipe.example.com, vidpipe");
        for bad in [
            "api_hosts = \"https://vidpipe.example.com\"",
            "api_hosts = \"vidpipe.example.com:8686\"",
            "api_hosts = \"a,,b\"",
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains("api_hosts"), "{bad}: {err}");
        }
        let err = load("api_request_timeout_secs = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("api_request_timeout_secs"), "{err}");
    }

    #[test]
    fn an_api_token_is_long_and_has_no_spaces() {
        let set = load("api_token = \"0123456789abcdef\"").expect("16 characters");
        assert_eq!(
            set.api_token
                .as_ref()
                .map(|t| t.expose_secret().to_string()),
            Some("0123456789abcdef".into())
        );
        assert!(
            !format!("{set:?}").contains("0123456789abcdef"),
            "Debug hides it"
        );
        for bad in ["short", "0123456789abcdef ", "0123456789 abcdef"] {
            let err = load(&format!("api_token = \"{bad}\""))
                .expect_err(bad)
                .to_string();
            assert!(err.contains("api_token"), "{err}");
            assert!(
                !err.contains(bad.trim()),
                "the error shows the token: {err}"
            );
        }
    }

    #[test]
    fn nested_runner_keys_and_guarantee_parse() {
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(
            "guarantee = \"at-least-once\"\n[runner]\nin_flight = 4\n",
        ));
        let config = Config::from_figment(figment).unwrap();
        assert_eq!(config.guarantee, Guarantee::AtLeastOnce);
        assert_eq!(config.runner.in_flight, 4);
    }

    #[test]
    fn s3_storage_settings_parse_and_are_checked_by_name() {
        let config = load(
            "storage = \"s3://media-bucket/vidpipe/prod\"
[s3]
endpoint = \"http://127.0.0.1:9000\"
allow_http = true
access_key_id = \"AKIDCANARY\"
secret_access_key = \"s3-secret-canary\"
",
        )
        .unwrap();
        assert_eq!(config.s3.part_size, 8 << 20);
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3-secret-canary"), "{shown}");
        assert!(!shown.contains("AKIDCANARY"), "{shown}");
        for (toml, key) in [
            ("storage = \"gs://bucket/x\"", "`storage`"),
            ("storage = \"s3://\"", "`storage`"),
            ("storage = \"s3://Bad_Bucket/x\"", "`storage`"),
            ("storage = \"s3://bucket/a/../b\"", "`storage`"),
            (
                "storage = \"s3://bucket\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"",
                "`s3.endpoint`",
            ),
            (
                "storage = \"s3://bucket\"\n[s3]\nendpoint = \"ftp://x\"",
                "`s3.endpoint`",
            ),
            (
                "storage = \"s3://bucket\"\n[s3]\nsecret_access_key = \"s3-secret-canary\"",
                "`s3.secret_access_key`",
            ),
            (
                "storage = \"s3://bucket\"\n[s3]\npart_size = 1024",
                "`s3.part_size`",
            ),
            ("[s3]\nendpoint_url = \"http://x\"", "endpoint_url"),
        ] {
            let err = load(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
            assert!(!err.contains("s3-secret-canary"), "{err}");
        }
        // A directory stays a directory, whatever the `s3` table says.
        assert!(load("storage = \"/srv/blobs\"\n[s3]\npart_size = 1024").is_ok());
    }

    #[test]
    fn per_stage_limits_parse_and_name_real_stages() {
        let config = load(
            "[runner.stage_in_flight]
transcribe = 3
",
        )
        .unwrap();
        assert_eq!(config.runner.stage_in_flight.get("transcribe"), Some(&3));
        // The default limit of the CPU-bound stage stays unless replaced.
        assert_eq!(config.runner.stage_in_flight.get("extract-audio"), Some(&2));
        let err = load(
            "[runner.stage_in_flight]
transcibe = 3
",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown stage \"transcibe\""),
            "{err}"
        );
        assert!(
            load(
                "[runner.stage_in_flight]
summarize = 0
"
            )
            .is_err()
        );
    }
}
