//! The `vidpipe` command line: glue only. Every command loads the layered
//! configuration, calls into the library, and maps errors to exit codes:
//! 0 success, 1 a video failed, 2 usage or configuration error, 3 a service
//! cannot be reached.

use std::process::ExitCode;

mod cli;

use clap::{Parser, Subcommand};
use vidpipe::config::Config;
use vidpipe::store::db;

#[derive(Parser)]
#[command(
    name = "vidpipe",
    version,
    about = "Turn videos into transcripts and summaries, on Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run stage processors (all five by default) until SIGTERM or ctrl-c.
    ///
    /// Creates missing topics first. Each stage drains its in-flight work
    /// (up to runner.shutdown_grace_ms), commits and leaves its group.
    ///
    /// Example: vidpipe run transcribe --instance gpu-1
    Run {
        /// Stages to run: discover, download, extract-audio, transcribe,
        /// summarize.
        stages: Vec<String>,
        /// This process's stable identity (transactional id suffix, lease
        /// owner). Give each process its own; reuse it on restart, so that
        /// the new process fences the old one at once. Default: host-pid.
        #[arg(long, env = "VIDPIPE_INSTANCE")]
        instance: Option<String>,
    },
    /// Enqueue videos or sources; prints one id per URL.
    ///
    /// A video already known is not processed again (`vidpipe replay`
    /// reprocesses). Feeds, channels and playlists are sources: their new
    /// videos are enqueued. Exit codes: 0 done (or enqueued without --wait),
    /// 1 a video failed, 2 a bad URL, 3 a service is unreachable.
    ///
    /// Example: vidpipe submit https://example.com/talk.mp4 --wait
    Submit {
        /// Video, feed, channel or playlist URLs.
        #[arg(required = true)]
        urls: Vec<String>,
        /// Wait until every video is done or failed, showing progress.
        #[arg(long)]
        wait: bool,
        /// Treat the URLs as feeds (sources) even if they do not look like one.
        #[arg(long)]
        feed: bool,
        /// Give up waiting after this many seconds (exit 1).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Recorded on the command, for auditing.
        #[arg(long)]
        requested_by: Option<String>,
    },
    /// Status per video and stage, newest first.
    ///
    /// Example: vidpipe status --json url:0123abcd
    Status {
        /// Video ids (default: the most recent videos).
        ids: Vec<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// How many videos without ids.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Print a video's transcript or summary.
    ///
    /// Example: vidpipe show yt:dQw4w9WgXcQ --transcript --format srt
    Show {
        /// Video id.
        id: String,
        /// The transcript (formats txt, srt, vtt, json).
        #[arg(long, conflicts_with = "summary", required_unless_present = "summary")]
        transcript: bool,
        /// The summary (formats md, json).
        #[arg(long)]
        summary: bool,
        /// Output format; default txt for transcripts, md for summaries.
        #[arg(long)]
        format: Option<String>,
        /// A generation other than the latest.
        #[arg(long)]
        generation: Option<i64>,
    },
    /// Reprocess videos from a stage, as a new generation.
    ///
    /// Re-feeds each chosen video into STAGE's input topic as generation
    /// (current + 1): that stage and every later one run again, `status`
    /// shows the new generation, and the earlier generations' results stay
    /// readable (`vidpipe show ID --transcript --generation N`). The record
    /// re-fed is the video's latest on the input topic within
    /// --since/--until, or, where the topic no longer holds it, the one the
    /// previous stage's status row kept. Exit codes: 0 replayed (or nothing
    /// matched the range), 1 an unknown video or one with no input record,
    /// 2 usage, 3 a service is unreachable.
    ///
    /// Example: vidpipe replay --stage transcribe --video url:0123abcd --dry-run
    Replay {
        /// The stage to re-feed: download, extract-audio, transcribe or
        /// summarize (discover: --dry-run only, for now).
        #[arg(long)]
        stage: String,
        /// A video to replay; repeat for more. Without it, every video
        /// whose input falls in the --since/--until range.
        #[arg(long = "video", value_name = "ID")]
        videos: Vec<String>,
        /// Input records from this time on: RFC 3339, a UTC date
        /// (2026-11-02), date and time (2026-11-02 10:00), or an age (2h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Input records before this time (same forms as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// List what would be replayed (id, from and to generation, source)
        /// and send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Each stage's input topic, partitions, consumer group members and lag.
    ///
    /// A stage scales by partitions and instances: every `vidpipe run
    /// STAGE` process joins the stage's group and gets a share of the
    /// partitions; `topics scale` adds partitions. Exit codes: 0, 2 usage,
    /// 3 Kafka is unreachable.
    ///
    /// Example: vidpipe topics --json
    Topics {
        #[command(subcommand)]
        action: Option<TopicsAction>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Subscriptions (feeds, channels, playlists) that discovery polls.
    ///
    /// Example: vidpipe sources add https://example.com/podcast.xml --every 1h
    Sources {
        #[command(subcommand)]
        action: SourcesAction,
    },
    /// The RabbitMQ adapter: legacy command queues in, lifecycle events out.
    ///
    /// Consumes the old system's command queues and turns each valid
    /// command into a record on vidpipe.commands (acknowledged to RabbitMQ
    /// only after Kafka acknowledged it); malformed ones go to the
    /// dead-letter exchange with the reason. Optionally mirrors
    /// vidpipe.events to the RabbitMQ topic exchange `vidpipe.events`. Run
    /// as many instances as you like.
    ///
    /// Example: VIDPIPE_AMQP_URL=amqp://u:p@rabbit:5672/%2f vidpipe bridge
    Bridge,
    /// Apply the database migrations.
    ///
    /// Example: VIDPIPE_DATABASE_URL=postgres://u:p@db/vidpipe vidpipe migrate
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    ///
    /// Example: VIDPIPE_TOPIC_PREFIX=test. vidpipe config
    Config,
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Add partitions to a stage's input topic, so that more instances of
    /// the stage share its work.
    ///
    /// Kafka cannot remove partitions: a smaller count is refused (exit 2).
    /// New partitions change which partition a video id maps to, so scale
    /// between bursts. Running processes notice within librdkafka's
    /// metadata refresh (5 minutes by default); restarting them is faster.
    ///
    /// Example: vidpipe topics scale transcribe --partitions 12
    Scale {
        /// The stage: discover, download, extract-audio, transcribe,
        /// summarize.
        stage: String,
        /// The partition count wanted (at least the current one).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        partitions: u32,
    },
}

#[derive(Subcommand)]
enum SourcesAction {
    /// Subscribe to a source; its first poll is due at once.
    ///
    /// Example: vidpipe sources add https://example.com/feed.xml --every 30m --backfill 5
    Add {
        /// Feed, channel or playlist URL.
        url: String,
        /// Poll interval: a number with s, m, h or d (at least 1m).
        #[arg(long, default_value = "1h")]
        every: String,
        /// Entries the first poll takes (newest first).
        #[arg(long, default_value_t = 20)]
        backfill: i32,
    },
    /// List subscriptions.
    ///
    /// Example: vidpipe sources list
    List,
    /// Unsubscribe, by id or URL.
    ///
    /// Example: vidpipe sources remove https://example.com/feed.xml
    Remove {
        /// Source id (`src:…`) or URL.
        source: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Migrate => match migrate(&config).await {
                Ok(()) => {
                    println!(
                        "migrations applied to {}",
                        db::describe(&config.database_url)
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(3)
                }
            },
            Command::Run { stages, instance } => run(config, stages, instance).await,
            Command::Bridge => {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signal.cancel();
                });
                match vidpipe::bridge::run(config, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(3)
                    }
                }
            }
            Command::Submit {
                urls,
                wait,
                feed,
                timeout,
                requested_by,
            } => cli::submit(&config, &urls, wait, feed, timeout, requested_by.as_deref()).await,
            Command::Sources { action } => match action {
                SourcesAction::Add {
                    url,
                    every,
                    backfill,
                } => cli::sources_add(&config, &url, &every, backfill).await,
                SourcesAction::List => cli::sources_list(&config).await,
                SourcesAction::Remove { source } => cli::sources_remove(&config, &source).await,
            },
            Command::Replay {
                stage,
                videos,
                since,
                until,
                dry_run,
                json,
            } => {
                cli::replay(
                    &config,
                    &stage,
                    videos,
                    since.as_deref(),
                    until.as_deref(),
                    dry_run,
                    json,
                )
                .await
            }
            Command::Topics { action, json } => match action {
                None => cli::topics(&config, json).await,
                Some(TopicsAction::Scale { stage, partitions }) => {
                    cli::topics_scale(&config, &stage, partitions as usize).await
                }
            },
            Command::Status { ids, json, limit } => cli::status(&config, &ids, json, limit).await,
            Command::Show {
                id,
                transcript,
                format,
                generation,
                ..
            } => cli::show(&config, &id, transcript, format.as_deref(), generation).await,
            Command::Config => {
                println!("{config:#?}");
                ExitCode::SUCCESS
            }
        }
    })
}

async fn run(config: Config, stages: Vec<String>, instance: Option<String>) -> ExitCode {
    use vidpipe::stages::{self, RunError};
    if let Some(bad) = stages
        .iter()
        .find(|s| !stages::STAGES.contains(&s.as_str()))
    {
        eprintln!("error: {}", RunError::UnknownStage(bad.clone()));
        return ExitCode::from(2);
    }
    if !config.metrics_listen.is_empty() {
        let addr: std::net::SocketAddr = match config.metrics_listen.parse() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: metrics_listen: {e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
        {
            eprintln!("error: cannot serve metrics on {addr}: {e}");
            return ExitCode::from(3);
        }
    }
    let instance = instance.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "vidpipe".into());
        format!("{host}-{}", std::process::id())
    });
    let services = match stages::Services::build(config).await {
        Ok(s) => s,
        Err(e @ RunError::Config(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(3);
        }
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight work");
        signal.cancel();
    });
    match stages::run(&stages, services, &instance, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}

/// SIGTERM (from a supervisor) or ctrl-c.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let pool = db::connect(&config.database_url, 1).await?;
    db::migrate(&pool).await?;
    Ok(())
}

/// Logs go to stderr; `VIDPIPE_LOG` sets the filter (default `info`) and
/// `VIDPIPE_LOG_FORMAT=json` switches to JSON lines for log shippers.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VIDPIPE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("VIDPIPE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
