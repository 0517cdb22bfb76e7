//! The `vidpipe` command line: glue only. Every command loads the layered
//! configuration, calls into the library, and maps errors to exit codes:
//! 0 success, 1 a video failed, 2 usage or configuration error, 3 a service
//! cannot be reached.

use std::process::ExitCode;

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
    /// Apply the database migrations.
    ///
    /// Example: VIDPIPE_DATABASE_URL=postgres://u:p@db/vidpipe vidpipe migrate
    Migrate,
    /// Print the effective configuration (secrets redacted) and exit.
    ///
    /// Example: VIDPIPE_TOPIC_PREFIX=test. vidpipe config
    Config,
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
            Command::Config => {
                println!("{config:#?}");
                ExitCode::SUCCESS
            }
        }
    })
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
