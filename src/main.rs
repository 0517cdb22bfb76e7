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
    about = "Turn videos into transcripts and summaries, on Kafka",
    after_help = concat!(
        "Examples:\n",
        "  vidpipe run                                         # every stage, until ctrl-c\n",
        "  vidpipe submit https://example.com/talk.mp4 --wait  # in another terminal\n",
        "  vidpipe status\n",
        "  vidpipe show url:0123abcd --summary\n",
        "\n",
        "Exit codes:\n",
        "  0  success\n",
        "  1  a video failed (its stage and reason are printed), or what was asked for is not there,\n",
        "     or a migration failed\n",
        "  2  usage or configuration error: a bad argument, URL or setting\n",
        "  3  a service cannot be reached; the message names it (Kafka, the schema registry,\n",
        "     PostgreSQL, RabbitMQ)\n",
        "  130  replay stopped by Ctrl-C or SIGTERM between videos\n",
        "\n",
        "Configuration: vidpipe.toml (or the file in VIDPIPE_CONFIG) and VIDPIPE_* environment\n",
        "variables, which win; `vidpipe config` prints it. `vidpipe help COMMAND` for more.",
    )
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe run                              # all five stages in this process\n",
        "  vidpipe run transcribe --instance gpu-1  # one stage; a stable id per process\n",
        "  VIDPIPE_RUNNER__IN_FLIGHT=64 vidpipe run download extract-audio",
    ))]
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
    /// videos are enqueued. With --wait, a terminal shows a live line per
    /// video (`url:0123abcd  [4/5] transcribe running 12s`); otherwise a line
    /// is printed per stage change: ID, status, stage and, when failed, the
    /// reason, separated by tabs. Exit codes: 0 done (or enqueued without
    /// --wait), 1 a video failed (its stage and reason are printed) or
    /// --timeout passed, 2 a bad URL, 3 a service is unreachable (named).
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe submit https://example.com/talk.mp4 --wait  # live progress; 0 when done\n",
        "  vidpipe submit https://youtu.be/dQw4w9WgXcQ https://example.com/b.mp4\n",
        "  vidpipe submit https://example.com/podcast.xml --feed --wait --timeout 600",
    ))]
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
    /// The table has a row per video: its status (queued, running, done,
    /// failed), the stage it is at or failed in, its generation, the
    /// processing time so far, and its URL or the reason it failed. --json
    /// prints an array of {id, url, status, stage, generation, error,
    /// stages: [{name, status, attempts, duration_ms, error, generation}]}.
    /// Exit codes: 0, 1 an id is unknown, 3 PostgreSQL is unreachable.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe status  # the 50 most recent videos\n",
        "  vidpipe status url:0123abcd yt:dQw4w9WgXcQ\n",
        "  vidpipe status --json --limit 10",
    ))]
    Status {
        /// Video ids (default: the most recent videos).
        ids: Vec<String>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// How many videos without ids.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
    },
    /// Print a video's transcript or summary.
    ///
    /// Exit codes: 0, 1 the video has no finished transcribe or summarize
    /// run (yet), 2 a format that result does not come in, 3 PostgreSQL or
    /// the blob store is unreachable.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe show yt:dQw4w9WgXcQ --transcript --format srt\n",
        "  vidpipe show yt:dQw4w9WgXcQ --summary  # markdown\n",
        "  vidpipe show url:0123abcd --transcript --format json --generation 1",
    ))]
    Show {
        /// Video id.
        id: String,
        /// The transcript (formats txt, srt, vtt, json).
        #[arg(long, conflicts_with = "summary", required_unless_present = "summary")]
        transcript: bool,
        /// The summary (formats md, json).
        #[arg(long)]
        summary: bool,
        /// Output format: txt, srt, vtt or json for transcripts (default
        /// txt); md or json for summaries (default md).
        #[arg(long, value_parser = ["txt", "srt", "vtt", "json", "md"])]
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
    /// 2 usage, 3 a service is unreachable, 130 stopped by Ctrl-C or SIGTERM between
    /// videos.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe replay --stage transcribe --since 7d  # e.g. after a better ASR model\n",
        "  vidpipe replay --stage transcribe --video url:0123abcd --dry-run",
    ))]
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe topics\n",
        "  vidpipe topics --json",
    ))]
    Topics {
        #[command(subcommand)]
        action: Option<TopicsAction>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Subscriptions (feeds, channels, playlists) that discovery polls.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe sources add https://example.com/podcast.xml --every 1h\n",
        "  vidpipe sources list",
    ))]
    Sources {
        #[command(subcommand)]
        action: SourcesAction,
    },
    /// Serve the HTTP API and the status pages until SIGTERM or ctrl-c.
    ///
    /// JSON under /api/v1 (described by /openapi.json), Prometheus metrics
    /// at /metrics, /healthz and /readyz (Kafka, PostgreSQL and the schema
    /// registry answer), and status pages for people at /. Starts even when
    /// a service is down: /readyz names it. Prints the address it listens
    /// on. Exit codes: 0 stopped, 2 usage, 3 the address cannot be had.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe serve                          # http://127.0.0.1:8686/\n",
        "  VIDPIPE_API_TOKEN=$(openssl rand -hex 24) vidpipe serve --listen 0.0.0.0:8686\n",
        "                                         # other hosts: changes need the token\n",
        "  curl -s localhost:8686/api/v1/videos   # the latest videos, as JSON",
    ))]
    Serve {
        /// Address and port to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8686")]
        listen: String,
    },
    /// The RabbitMQ adapter: legacy command queues in, lifecycle events out.
    ///
    /// Consumes the old system's command queues and turns each valid
    /// command into a record on vidpipe.commands (acknowledged to RabbitMQ
    /// only after Kafka acknowledged it); malformed ones go to the
    /// dead-letter exchange with the reason. Optionally mirrors
    /// vidpipe.events to the RabbitMQ topic exchange `vidpipe.events`. Run
    /// as many instances as you like.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe bridge\n",
        "  VIDPIPE_AMQP_URL=amqp://u:p@rabbit:5672/%2f vidpipe bridge",
    ))]
    Bridge,
    /// Apply the database migrations. Exit codes: 0, 1 a migration failed
    /// (e.g. one already applied was changed since), 3 PostgreSQL is
    /// unreachable.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe migrate\n",
        "  VIDPIPE_DATABASE_URL=postgres://u:p@db/vidpipe vidpipe migrate",
    ))]
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe config\n",
        "  VIDPIPE_TOPIC_PREFIX=test. vidpipe config",
    ))]
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe topics scale transcribe --partitions 12",
    ))]
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
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe sources add https://example.com/feed.xml --every 30m --backfill 5",
    ))]
    Add {
        /// Feed, channel or playlist URL.
        url: String,
        /// Poll interval: a number with s, m, h or d (at least 1m).
        #[arg(long, default_value = "1h")]
        every: String,
        /// Entries the first poll takes, newest first, at most 500 [default:
        /// media.max_backfill]
        #[arg(long)]
        backfill: Option<i32>,
    },
    /// List subscriptions.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe sources list",
    ))]
    List,
    /// Unsubscribe, by id or URL.
    #[command(after_help = concat!(
        "Examples:\n",
        "  vidpipe sources remove https://example.com/feed.xml\n",
        "  vidpipe sources remove src:0123abcd",
    ))]
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
            Command::Migrate => {
                match migrate(&config).await {
                    Ok(()) => {
                        println!(
                            "migrations applied to {}",
                            db::describe(&config.database_url)
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        // 2 when the login or the database is wrong; 3 when
                        // PostgreSQL cannot be reached (try again later); 1
                        // when a migration itself failed (someone must look).
                        match e {
                            _ if e.is_configuration() => ExitCode::from(2),
                            db::DbError::Connect { .. } => ExitCode::from(3),
                            db::DbError::Migrate(sqlx::migrate::MigrateError::Execute(
                                ref source,
                            )) if db::is_unavailable(source) => ExitCode::from(3),
                            db::DbError::Migrate(_) => ExitCode::FAILURE,
                        }
                    }
                }
            }
            Command::Run { stages, instance } => run(config, stages, instance).await,
            Command::Serve { listen } => {
                let shutdown = tokio_util::sync::CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signal.cancel();
                });
                match vidpipe::api::serve(config, &listen, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(e.exit_code())
                    }
                }
            }
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
    match vidpipe::api::metrics::serve_on(&config.metrics_listen) {
        Ok(()) => {}
        Err(e @ vidpipe::api::metrics::ListenError::Address(_)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
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
        // A refused login or a missing database: settings, not an outage.
        Err(ref e @ RunError::Database(_, ref source)) if source.is_configuration() => {
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

async fn migrate(config: &Config) -> Result<(), db::DbError> {
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

#[cfg(test)]
mod tests {
    //! The help text: every command has examples, and every example is a
    //! command line that parses.

    use clap::{CommandFactory, Parser};

    use super::Cli;

    #[test]
    fn the_command_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command below `cmd` (clap's own `help` left out), with its
    /// path of names.
    fn commands(
        cmd: &clap::Command,
        path: Vec<String>,
        out: &mut Vec<(Vec<String>, clap::Command)>,
    ) {
        for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
            let mut p = path.clone();
            p.push(sub.get_name().to_string());
            commands(sub, p.clone(), out);
            out.push((p, sub.clone()));
        }
    }

    /// The example command lines of a help text: lines that run `vidpipe`,
    /// maybe after `Example:` and environment assignments, without the
    /// trailing `# comment`.
    fn examples(help: &str) -> Vec<Vec<String>> {
        help.lines()
            .map(|l| l.trim().trim_start_matches("Example:").trim())
            .map(|l| l.split("  #").next().unwrap_or(l))
            .filter_map(|l| {
                let words: Vec<String> = l
                    .split_whitespace()
                    .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                    .map(str::to_string)
                    .collect();
                (words.first().map(String::as_str) == Some("vidpipe") && words.len() > 1)
                    .then_some(words)
            })
            .collect()
    }

    #[test]
    fn every_command_has_examples_that_parse() {
        let mut root = Cli::command();
        root.build();
        let mut all = Vec::new();
        commands(&root, Vec::new(), &mut all);
        assert!(all.len() >= 15, "{} commands", all.len());
        for (path, mut cmd) in all {
            let help = cmd.render_long_help().to_string();
            let mine: Vec<Vec<String>> = examples(&help)
                .into_iter()
                .filter(|words| words[1..].starts_with(&path))
                .collect();
            assert!(
                !mine.is_empty(),
                "vidpipe {} --help shows no example:\n{help}",
                path.join(" ")
            );
            for words in mine {
                if let Err(e) = Cli::try_parse_from(&words) {
                    panic!("the example `{}` does not parse: {e}", words.join(" "));
                }
            }
        }
    }

    #[test]
    fn the_top_level_help_documents_the_exit_codes_and_examples() {
        let help = Cli::command().render_long_help().to_string();
        for code in [
            "0  success",
            "1  a video failed",
            "2  usage",
            "3  a service cannot be reached",
        ] {
            assert!(help.contains(code), "{code:?} missing from:\n{help}");
        }
        let examples = examples(&help);
        assert!(examples.len() >= 3, "{help}");
        for words in examples {
            assert!(Cli::try_parse_from(&words).is_ok(), "{words:?}");
        }
    }
}
