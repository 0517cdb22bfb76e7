//! The five stages and the one registry where they are added.
//!
//! Each stage file holds business logic only; [`Services`] builds the
//! backends, media tools and stores they use from the configuration, and
//! [`run`] starts the processor template for each named stage. Adding a
//! stage means a file here and a line in [`STAGES`] and [`run`].

pub mod discover;
pub mod download;
pub mod extract_audio;
pub mod summarize;
pub mod transcribe;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backends::asr::{AsrOptions, Backend, GoogleAsr, OpenAiAsr};
use crate::backends::summarize::{ChatOptions, ChatSummarizer, ExtractiveOptions};
use crate::config::Config;
use crate::media::egress::Egress;
use crate::media::ffmpeg::Limits;
use crate::media::http::{AddressPolicy, FetchLimits, Fetcher, Sites};
use crate::media::ytdlp::Ytdlp;
use crate::replay::Restarts;
use crate::store::blobs::BlobStore;
use crate::store::catalog::PgCatalog;
use crate::template::codec::Codec;
use crate::template::runner::{self, RunnerError, RunnerSettings};
use crate::template::status::StatusStore;
use crate::template::{Stage, topics};

/// Every stage, in pipeline order: the names `vidpipe run` accepts.
pub const STAGES: [&str; 5] = [
    "discover",
    "download",
    "extract-audio",
    "transcribe",
    "summarize",
];

/// Why the stages could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A stage name that does not exist.
    #[error("unknown stage {0:?}; the stages are: {list}", list = STAGES.join(", "))]
    UnknownStage(String),
    /// A setting that cannot build a service.
    #[error("configuration: {0}")]
    Config(String),
    /// The database is unreachable.
    #[error("PostgreSQL at {0}: {1}")]
    Database(String, crate::store::db::DbError),
    /// Kafka or the registry failed.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// Topics could not be created.
    #[error(transparent)]
    Topics(#[from] topics::TopicError),
}

/// What the stages use, built once per process from the configuration.
pub struct Services {
    /// The configuration it was built from.
    pub config: Config,
    /// Media, audio, transcripts, summaries.
    pub blobs: BlobStore,
    /// Discovery's memory.
    pub catalog: PgCatalog,
    /// Status rows (unless `runner.status` is off).
    pub status: Option<StatusStore>,
    /// Guarded HTTP for direct files and feeds.
    pub fetcher: Fetcher,
    /// Per-site slots and cooldowns, shared by all downloads.
    pub sites: Arc<Sites>,
    /// yt-dlp for sites.
    pub ytdlp: Ytdlp,
    /// Encoding, shared by every stage.
    pub codec: Arc<Codec>,
    /// Restart commands' replays, for discovery.
    pub restarter: Arc<dyn discover::Restarter>,
}

impl Services {
    /// Connects to the database and builds every tool. Fails with a message
    /// naming the setting or service at fault.
    pub async fn build(config: Config) -> Result<Self, RunError> {
        let cfg = |e: &dyn std::fmt::Display| RunError::Config(e.to_string());
        let pool = crate::store::db::connect(&config.database_url, 16)
            .await
            .map_err(|e| RunError::Database(crate::store::db::describe(&config.database_url), e))?;
        let m = &config.media;
        let policy = AddressPolicy::parse_allow(&config.net_allow).map_err(|e| cfg(&e))?;
        let download_timeout = Duration::from_secs(m.download_timeout_secs);
        // yt-dlp's own requests are held to the same policy as ours.
        let egress = Egress::start(policy.clone(), download_timeout)
            .await
            .map_err(|e| RunError::Config(format!("cannot start yt-dlp's egress proxy: {e}")))?;
        let fetcher = Fetcher::new(
            policy,
            FetchLimits {
                max_bytes: m.max_download_bytes,
                deadline: download_timeout,
                min_bytes_per_sec: m.min_download_rate,
                rate_window: Duration::from_secs(m.min_rate_window_secs.max(1)),
                ..FetchLimits::default()
            },
        )
        .map_err(|e| cfg(&e))?;
        let codec = Codec::new(config.schema_registry_url.as_deref()).map_err(|e| cfg(&e))?;
        let restarter =
            Arc::new(Restarts::new(&config, pool.clone(), codec.clone()).map_err(|e| cfg(&e))?);
        Ok(Self {
            blobs: BlobStore::connect(&config).await.map_err(|e| cfg(&e))?,
            catalog: PgCatalog::new(pool.clone()),
            status: config.runner.status.then(|| StatusStore::new(pool)),
            fetcher,
            sites: Arc::new(Sites::new(m.per_site)),
            ytdlp: Ytdlp::new(&config.ytdlp, m.max_download_bytes, download_timeout)
                .with_egress(Arc::new(egress)),
            codec,
            restarter,
            config,
        })
    }

    fn ffmpeg_limits(&self) -> Limits {
        let m = &self.config.media;
        // Google's synchronous recognize takes at most a minute of audio.
        let chunk_secs = if m.asr_backend == "google" {
            m.chunk_secs.min(55)
        } else {
            m.chunk_secs
        };
        Limits {
            max_duration: Duration::from_secs(m.max_duration_secs),
            chunk_max_bytes: m.chunk_max_bytes,
            chunk_target: Duration::from_secs(chunk_secs),
            overlap: Duration::from_millis(m.chunk_overlap_ms),
            niceness: m.tool_niceness,
            ffmpeg: m.ffmpeg.clone().into(),
            ffprobe: m.ffprobe.clone().into(),
            ..Limits::default()
        }
    }

    fn asr(&self) -> Result<Backend, RunError> {
        let c = &self.config;
        let opts = AsrOptions {
            timeout: Duration::from_secs(c.media.asr_timeout_secs),
            max_concurrency: c.media.asr_concurrency,
            ..AsrOptions::default()
        };
        let err = |e: crate::backends::asr::AsrError| RunError::Config(format!("asr: {e}"));
        Ok(match c.media.asr_backend.as_str() {
            "google" => {
                let key = c.asr_api_key.clone().ok_or_else(|| {
                    RunError::Config("asr_api_key is required for the google backend".into())
                })?;
                GoogleAsr::new(&c.asr_url, key, opts).map_err(err)?.into()
            }
            _ => OpenAiAsr::new(&c.asr_url, &c.asr_model, c.asr_api_key.clone(), opts)
                .map_err(err)?
                .into(),
        })
    }

    fn summarizer(&self) -> Result<summarize::Summarizer, RunError> {
        let c = &self.config;
        Ok(match &c.llm_url {
            None => summarize::Summarizer::Extractive(ExtractiveOptions::default()),
            Some(url) => {
                let model = c.llm_model.as_deref().ok_or_else(|| {
                    RunError::Config("llm_model is required when llm_url is set".into())
                })?;
                summarize::Summarizer::Chat(
                    ChatSummarizer::new(url, model, c.llm_api_key.clone(), ChatOptions::default())
                        .map_err(|e| RunError::Config(format!("llm: {e}")))?,
                )
            }
        })
    }
}

/// Every topic the pipeline uses (prefixed).
pub fn all_topics(config: &Config) -> Vec<String> {
    [
        "commands",
        "video.discovered",
        "video.downloaded",
        "video.audio-extracted",
        "video.transcribed",
        "video.summarized",
        "events",
        "dlq",
    ]
    .iter()
    .map(|t| config.topic(t))
    .collect()
}

type Running = tokio::task::JoinSet<(String, Result<(), RunnerError>)>;

fn start<S: Stage>(
    set: &mut Running,
    stage: S,
    services: &Services,
    instance: &str,
    shutdown: &CancellationToken,
) {
    let mut config = services.config.clone();
    if let Some(n) = config.runner.stage_in_flight.get(S::NAME).copied() {
        config.runner.in_flight = n;
        config.runner.max_buffered = config.runner.max_buffered.max(n);
    }
    let settings = RunnerSettings {
        config,
        group: None,
        instance: instance.to_string(),
        final_stage: S::NAME == "summarize",
        status: services.status.clone(),
        codec: services.codec.clone(),
    };
    let shutdown = shutdown.clone();
    set.spawn(async move {
        let result = runner::run(Arc::new(stage), settings, shutdown).await;
        (S::NAME.to_string(), result)
    });
}

/// Creates missing topics, then runs the named stages (all when empty)
/// until `shutdown`, each draining its in-flight work before returning.
pub async fn run(
    names: &[String],
    services: Services,
    instance: &str,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let names: Vec<&str> = if names.is_empty() {
        STAGES.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    if let Some(bad) = names.iter().find(|n| !STAGES.contains(n)) {
        return Err(RunError::UnknownStage(bad.to_string()));
    }
    let c = &services.config;
    topics::ensure(
        &c.kafka_brokers,
        &all_topics(c),
        c.topic_partitions,
        c.topic_replication,
    )
    .await?;
    let s = &services;
    if names.contains(&"discover") {
        // Subscriptions are polled where discovery runs; with several such
        // instances each due source is still polled once (see the catalog).
        tokio::spawn(crate::client::poll_sources(
            c.clone(),
            s.catalog.clone(),
            Duration::from_secs(5),
            shutdown.clone(),
        ));
    }
    let mut set = Running::new();
    for name in &names {
        match *name {
            "discover" => {
                let stage = discover::Discover {
                    fetcher: s.fetcher.clone(),
                    ytdlp: s.ytdlp.clone(),
                    catalog: s.catalog.clone(),
                    max_backfill: c.media.max_backfill,
                    restarter: s.restarter.clone(),
                };
                start(&mut set, stage, s, instance, &shutdown)
            }
            "download" => {
                let stage = download::Download {
                    fetcher: s.fetcher.clone(),
                    ytdlp: s.ytdlp.clone(),
                    sites: s.sites.clone(),
                    blobs: s.blobs.clone(),
                };
                start(&mut set, stage, s, instance, &shutdown)
            }
            "extract-audio" => {
                let stage = extract_audio::ExtractAudio {
                    blobs: s.blobs.clone(),
                    limits: s.ffmpeg_limits(),
                };
                start(&mut set, stage, s, instance, &shutdown)
            }
            "transcribe" => {
                let stage = transcribe::Transcribe {
                    blobs: s.blobs.clone(),
                    asr: s.asr()?,
                };
                start(&mut set, stage, s, instance, &shutdown)
            }
            _ => {
                let stage = summarize::Summarize {
                    blobs: s.blobs.clone(),
                    summarizer: s.summarizer()?,
                };
                start(&mut set, stage, s, instance, &shutdown)
            }
        }
    }
    // One stage failing (Kafka unreachable at start) stops the others: a
    // half-running pipeline is worse than a clear exit.
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let (name, result) = match joined {
            Ok(r) => r,
            Err(e) => (
                "?".to_string(),
                Err(RunnerError::Loop(format!("a stage panicked: {e}"))),
            ),
        };
        if let Err(e) = result {
            tracing::error!(stage = name, error = %e, "stage stopped");
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
