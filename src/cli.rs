//! Output and exit codes of the client commands (`submit`, `status`,
//! `show`, `sources`, `replay`, `topics`): formatting only; the work is in
//! `vidpipe::client`, `vidpipe::replay` and `vidpipe::admin`.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use comfy_table::{CellAlignment, Table, presets};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sqlx::PgPool;
use vidpipe::admin::{self, AdminError};
use vidpipe::client::{self, ClientError, ResultError, ResultKind, SourceRun, VideoStatus};
use vidpipe::config::Config;
use vidpipe::replay::{self, ReplayError, Selection};
use vidpipe::stages::STAGES;
use vidpipe::store::blobs::{BlobError, BlobStore};
use vidpipe::store::db;

const UNREACHABLE: u8 = 3;

/// `println!` for command output. When the reader has gone away (`vidpipe
/// status | head`), the program ends quietly with 0, as ripgrep does,
/// rather than panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))
    };
}

fn emit(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        quit_on_write_error(&e);
    }
}

/// Ends the program on a failed write to stdout: quietly when the reader
/// is gone, else with the reason (a full disk) and exit 1.
fn quit_on_write_error(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: cannot write the output: {e}");
    std::process::exit(1);
}

async fn pool(config: &Config) -> Result<PgPool, ExitCode> {
    db::connect(&config.database_url, 2).await.map_err(|e| {
        eprintln!("error: {e}");
        if e.is_configuration() {
            ExitCode::from(2)
        } else {
            ExitCode::from(UNREACHABLE)
        }
    })
}

fn client_error(e: ClientError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ClientError::BadUrl(_) => ExitCode::from(2),
        _ => ExitCode::from(UNREACHABLE),
    }
}

/// `vidpipe submit`.
pub async fn submit(
    config: &Config,
    urls: &[String],
    wait: bool,
    feed: bool,
    timeout: u64,
    requested_by: Option<&str>,
) -> ExitCode {
    // A bad URL is a usage error whether or not the services are up: say
    // so before connecting to anything.
    for url in urls {
        if let Err(e) = vidpipe::ids::normalise(url) {
            return client_error(ClientError::BadUrl(e));
        }
    }
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let submitted = match client::submit(config, &pool, urls, feed, requested_by).await {
        Ok(s) => s,
        Err(e) => return client_error(e),
    };
    for s in &submitted {
        match &s.known {
            Some(status) => out!(
                "{}\talready known ({status}); `vidpipe replay --video {}` reprocesses it",
                s.id,
                s.id
            ),
            None if s.is_source => out!("{}\tsource submitted: {}", s.id, s.url),
            None => out!("{}\tsubmitted: {}", s.id, s.url),
        }
    }
    if !wait {
        return ExitCode::SUCCESS;
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    // Sources first resolve to the videos they yield.
    let mut videos: Vec<String> = Vec::new();
    for s in &submitted {
        if !s.is_source {
            videos.push(s.id.clone());
            continue;
        }
        loop {
            match client::source_run(&pool, &s.id, s.generation).await {
                Ok(SourceRun::Done(found)) => {
                    out!("{}\tdiscovered {} new video(s)", s.id, found.len());
                    videos.extend(found);
                    break;
                }
                Ok(SourceRun::Failed(why)) => {
                    out!("{}\tfailed\tdiscover\t{why}", s.id);
                    return ExitCode::FAILURE;
                }
                Ok(SourceRun::Pending) => {}
                Err(e) => return client_error(e.into()),
            }
            if Instant::now() > deadline {
                eprintln!("error: timed out waiting for {}", s.id);
                return ExitCode::FAILURE;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    wait_for(&pool, &videos, deadline).await
}

/// Watches `ids` until all are done or failed: live lines on a terminal,
/// else one line per stage transition. Exit 0 when all are done, 1 when any
/// failed (each named with its stage and reason on stderr) or the deadline
/// passed, 3 when PostgreSQL goes away.
async fn wait_for(pool: &PgPool, ids: &[String], deadline: Instant) -> ExitCode {
    // A URL given twice, or a video a source yields again, is one video.
    let mut seen = HashSet::new();
    let ids: Vec<String> = ids
        .iter()
        .filter(|id| seen.insert(id.as_str()))
        .cloned()
        .collect();
    let mut watch = if std::io::stdout().is_terminal() {
        Watch::live(&ids)
    } else {
        Watch::Plain(HashMap::new())
    };
    loop {
        let videos = match client::status(pool, &ids, ids.len() as i64).await {
            Ok(v) => v,
            Err(e) => {
                watch.stop();
                return client_error(e.into());
            }
        };
        watch.update(&ids, &videos);
        let failed: Vec<&VideoStatus> = videos.iter().filter(|v| v.status == "failed").collect();
        let finished = videos.iter().filter(|v| v.status == "done").count() + failed.len();
        if finished == ids.len() {
            watch.stop();
            for v in &failed {
                eprintln!(
                    "error: {} failed in {}: {}",
                    v.id,
                    v.stage.as_deref().unwrap_or("an unknown stage"),
                    v.error
                        .as_deref()
                        .map_or_else(|| "no reason recorded".into(), one_line)
                );
            }
            return if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        if Instant::now() > deadline {
            watch.stop();
            eprintln!(
                "error: timed out with {} of {} videos finished",
                finished,
                ids.len()
            );
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What a video is doing, for noticing when that changes: its status, its
/// current stage, and that stage run's status and attempt.
type Phase = (String, Option<String>, Option<String>, i32);

fn phase(v: &VideoStatus) -> Phase {
    let run = v.stages.last();
    (
        v.status.clone(),
        run.map(|r| r.name.clone()).or_else(|| v.stage.clone()),
        run.map(|r| r.status.clone()),
        run.map_or(0, |r| r.attempts),
    )
}

/// How `submit --wait` shows progress.
enum Watch {
    /// Not a terminal (a pipe, a log file): a line whenever a video's
    /// status or stage changes, last state by video id.
    Plain(HashMap<String, (String, Option<String>)>),
    /// A terminal: one live line per video.
    Live {
        /// One spinner per video, drawn together (a `MultiProgress`).
        bars: HashMap<String, ProgressBar>,
        /// When each video entered its current phase, for "running 12s".
        since: HashMap<String, (Phase, Instant)>,
        /// The longest id, so that the stage columns line up.
        width: usize,
    },
}

impl Watch {
    fn live(ids: &[String]) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template("{spinner} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let width = ids.iter().map(|id| id.chars().count()).max().unwrap_or(0);
        let bars = ids
            .iter()
            .map(|id| {
                let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                bar.set_message(progress_line(&queued(id), width, Duration::ZERO));
                bar.enable_steady_tick(Duration::from_millis(120));
                (id.clone(), bar)
            })
            .collect();
        Watch::Live {
            bars,
            since: HashMap::new(),
            width,
        }
    }

    fn update(&mut self, ids: &[String], videos: &[VideoStatus]) {
        match self {
            Watch::Plain(last) => {
                for v in videos {
                    let now = (v.status.clone(), v.stage.clone());
                    if last.get(&v.id) != Some(&now) {
                        out!("{}", plain_line(v));
                        last.insert(v.id.clone(), now);
                    }
                }
                let _ = std::io::stdout().flush();
            }
            Watch::Live {
                bars, since, width, ..
            } => {
                for id in ids {
                    let Some(bar) = bars.get(id).filter(|b| !b.is_finished()) else {
                        continue;
                    };
                    let waiting;
                    let v = match videos.iter().find(|v| &v.id == id) {
                        Some(v) => v,
                        None => {
                            waiting = queued(id);
                            &waiting
                        }
                    };
                    let now = phase(v);
                    let entered = match since.get(id) {
                        Some((p, at)) if *p == now => *at,
                        _ => {
                            let at = Instant::now();
                            since.insert(id.clone(), (now, at));
                            at
                        }
                    };
                    let line = progress_line(v, *width, entered.elapsed());
                    match v.status.as_str() {
                        "done" => finish(bar, "✔", line),
                        "failed" => finish(bar, "✘", line),
                        _ => bar.set_message(line),
                    }
                }
            }
        }
    }

    /// Stops drawing, leaving every line on the screen as it was last drawn.
    fn stop(&self) {
        if let Watch::Live { bars, .. } = self {
            for bar in bars.values().filter(|b| !b.is_finished()) {
                bar.abandon();
            }
        }
    }
}

/// Freezes a video's line with a mark in place of the spinner.
fn finish(bar: &ProgressBar, mark: &str, line: String) {
    if let Ok(style) = ProgressStyle::with_template(&format!("{mark} {{wide_msg}}")) {
        bar.set_style(style);
    }
    bar.finish_with_message(line);
}

/// A video without a status row yet: nothing has picked it up.
fn queued(id: &str) -> VideoStatus {
    VideoStatus {
        id: id.to_string(),
        url: String::new(),
        status: "queued".into(),
        stage: None,
        generation: 0,
        error: None,
        stages: Vec::new(),
    }
}

/// The line printed when not on a terminal:
/// `ID<TAB>STATUS<TAB>STAGE[<TAB>ERROR]`.
fn plain_line(v: &VideoStatus) -> String {
    let stage = v.stage.as_deref().unwrap_or("-");
    match &v.error {
        Some(err) if v.status == "failed" => {
            format!("{}\t{}\t{stage}\t{}", v.id, v.status, one_line(err))
        }
        _ => format!("{}\t{}\t{stage}", v.id, v.status),
    }
}

/// Longest reason shown on a live line: a line wider than the terminal
/// wraps and spoils the redraw. The whole reason is printed when the wait
/// ends.
const LIVE_REASON_CHARS: usize = 100;

/// One video's live line, e.g. `yt:abc  [4/5] transcribe running 12s`;
/// `elapsed` is how long the video has been in its current phase.
fn progress_line(v: &VideoStatus, id_width: usize, elapsed: Duration) -> String {
    let run = v.stages.last();
    let stage = run.map(|r| r.name.as_str()).or(v.stage.as_deref());
    let position = stage
        .and_then(|s| STAGES.iter().position(|x| *x == s))
        .map_or(0, |i| i + 1);
    let head = format!("{:<id_width$}  [{position}/{}]", v.id, STAGES.len());
    match (v.status.as_str(), stage, run) {
        ("done", _, _) => {
            let ms = v.stages.iter().filter_map(|r| r.duration_ms).sum();
            format!("{head} done in {}", human(millis(ms)))
        }
        ("failed", stage, _) => {
            let why = v
                .error
                .as_deref()
                .or(run.and_then(|r| r.error.as_deref()))
                .map_or_else(|| "no reason recorded".into(), one_line);
            let why: String = if why.chars().count() > LIVE_REASON_CHARS {
                why.chars()
                    .take(LIVE_REASON_CHARS - 1)
                    .chain(['…'])
                    .collect()
            } else {
                why
            };
            format!("{head} {} failed: {why}", stage.unwrap_or("-"))
        }
        (_, None, _) => format!("{head} queued {}", human(elapsed)),
        (_, Some(stage), Some(r)) if r.status == "done" => {
            let took = human(millis(r.duration_ms.unwrap_or(0)));
            match STAGES.get(position) {
                Some(next) => format!("{head} {stage} done in {took}, {next} next"),
                None => format!("{head} {stage} done in {took}"),
            }
        }
        (_, Some(stage), run) => {
            let status = run.map_or("queued", |r| r.status.as_str());
            let attempt = match run.map_or(0, |r| r.attempts) {
                n if n > 1 => format!(" (attempt {n})"),
                _ => String::new(),
            };
            format!("{head} {stage} {status} {}{attempt}", human(elapsed))
        }
    }
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// `850ms`, `4.2s`, `12s`, `3m05s`, `1h02m`.
fn human(d: Duration) -> String {
    match d.as_secs() {
        0 if d.subsec_millis() > 0 => format!("{}ms", d.subsec_millis()),
        s @ 0..10 => format!("{s}.{}s", d.subsec_millis() / 100),
        s @ 10..60 => format!("{s}s"),
        s @ 60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// A reason on one line: control characters (a tool's stderr has
/// newlines) become spaces, and runs of spaces one.
fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control() || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `vidpipe status`.
pub async fn status(config: &Config, ids: &[String], json: bool, limit: i64) -> ExitCode {
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let videos = match client::status(&pool, ids, limit).await {
        Ok(v) => v,
        Err(e) => return client_error(e.into()),
    };
    if json {
        if let Err(code) = print_json(&videos) {
            return code;
        }
    } else {
        out!("{}", status_table(&videos));
    }
    let missing: Vec<&str> = ids
        .iter()
        .filter(|id| !videos.iter().any(|v| &v.id == *id))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        eprintln!("error: unknown video id(s): {}", missing.join(", "));
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The `status` table: a row per video, aligned columns without borders
/// (so that `awk`, `grep` and `column` work on it). TIME is the processing
/// time of the current generation's finished stage runs.
fn status_table(videos: &[VideoStatus]) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(["ID", "STATUS", "STAGE", "GEN", "TIME", "URL / ERROR"]);
    for v in videos {
        let time = if v.stages.iter().any(|r| r.duration_ms.is_some()) {
            human(millis(v.stages.iter().filter_map(|r| r.duration_ms).sum()))
        } else {
            "-".into()
        };
        let detail = match &v.error {
            Some(e) if v.status == "failed" => one_line(e),
            _ => one_line(&v.url),
        };
        table.add_row([
            one_line(&v.id),
            v.status.clone(),
            v.stage.clone().unwrap_or_else(|| "-".into()),
            v.generation.to_string(),
            time,
            detail,
        ]);
    }
    for i in [3, 4] {
        if let Some(c) = table.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    if let Some(c) = table.column_mut(0) {
        c.set_padding((0, 1));
    }
    table.trim_fmt()
}

/// `vidpipe show`.
pub async fn show(
    config: &Config,
    id: &str,
    transcript: bool,
    format: Option<&str>,
    generation: Option<i64>,
) -> ExitCode {
    let kind = if transcript {
        ResultKind::Transcript
    } else {
        ResultKind::Summary
    };
    let format = format.unwrap_or(kind.formats()[0]);
    // Usage errors first: they need no service.
    if let Err(e) = kind.check(format, generation) {
        return result_error(e);
    }
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let store = match BlobStore::from_config(config) {
        Ok(s) => s,
        Err(e) => {
            // Settings that cannot make a store: configuration, not a
            // service that is down.
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match client::read_result(&pool, &store, id, kind, format, generation).await {
        Ok(file) => {
            let mut stdout = std::io::stdout().lock();
            if let Err(e) = stdout.write_all(&file.bytes).and_then(|()| stdout.flush()) {
                quit_on_write_error(&e);
            }
            ExitCode::SUCCESS
        }
        Err(e) => result_error(e),
    }
}

/// Exit codes of `show`: 2 usage, 1 nothing to show, 3 a service that
/// does not answer.
fn result_error(e: ResultError) -> ExitCode {
    match e {
        ResultError::BadFormat { .. } | ResultError::BadGeneration(_) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        ResultError::NotFinished { ref video_id, .. } => {
            eprintln!("error: {e} (see `vidpipe status {video_id}`)");
            ExitCode::FAILURE
        }
        ResultError::UnknownVideo(_) | ResultError::NoFile { .. } => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        // The object store did not answer: a service problem.
        ResultError::Blob { ref source, .. } if matches!(**source, BlobError::Store { .. }) => {
            eprintln!("error: {e}");
            ExitCode::from(UNREACHABLE)
        }
        ResultError::Blob { .. } => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        ResultError::Database(e) => client_error(e.into()),
    }
}

/// Parses `90s`, `30m`, `1h`, `2d`.
fn parse_every(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// `vidpipe sources add`.
pub async fn sources_add(
    config: &Config,
    url: &str,
    every: &str,
    backfill: Option<i32>,
) -> ExitCode {
    let Some(interval) = parse_every(every).filter(|d| d.as_secs() >= 60) else {
        eprintln!(
            "error: --every {every:?}: give a number with s, m, h or d, at least 1m (e.g. 30m)"
        );
        return ExitCode::from(2);
    };
    let max = vidpipe::stages::discover::MAX_BACKFILL as i32;
    let backfill = backfill.unwrap_or(config.media.max_backfill as i32);
    if !(0..=max).contains(&backfill) {
        eprintln!("error: --backfill {backfill}: give 0 to {max}");
        return ExitCode::from(2);
    }
    let url = match vidpipe::ids::normalise(url) {
        Ok(u) => u,
        Err(e) => return client_error(e.into()),
    };
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let catalog = vidpipe::store::catalog::PgCatalog::new(pool);
    match catalog
        .add_source(
            &vidpipe::ids::source_id(&url),
            url.as_str(),
            interval,
            backfill,
        )
        .await
    {
        Ok(s) => {
            out!("{}\t{}\tevery {}s", s.id, s.url, s.every_secs);
            ExitCode::SUCCESS
        }
        Err(e) => client_error(e.into()),
    }
}

/// `vidpipe sources list`.
pub async fn sources_list(config: &Config) -> ExitCode {
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    match vidpipe::store::catalog::PgCatalog::new(pool)
        .sources()
        .await
    {
        Ok(list) => {
            for s in list {
                out!(
                    "{}\t{}\tevery {}s\tpolls {}",
                    s.id,
                    s.url,
                    s.every_secs,
                    s.polls
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => client_error(e.into()),
    }
}

/// `vidpipe sources remove`.
pub async fn sources_remove(config: &Config, source: &str) -> ExitCode {
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    match vidpipe::store::catalog::PgCatalog::new(pool)
        .remove_source(source)
        .await
    {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: no subscription {source:?} (see `vidpipe sources list`)");
            ExitCode::FAILURE
        }
        Err(e) => client_error(e.into()),
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), ExitCode> {
    match serde_json::to_string_pretty(value) {
        Ok(s) => {
            out!("{s}");
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn replay_error(e: ReplayError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ReplayError::UnknownStage(_)
        | ReplayError::Usage(_)
        | ReplayError::Unsupported(_)
        | ReplayError::TooMany(_) => ExitCode::from(2),
        ReplayError::UnknownVideos(_)
        | ReplayError::NotReplayable(_)
        | ReplayError::MissingTopic(_)
        | ReplayError::InProgress(_) => ExitCode::FAILURE,
        ReplayError::Kafka { .. } | ReplayError::Registry(_) | ReplayError::Database(_) => {
            ExitCode::from(UNREACHABLE)
        }
    }
}

/// `vidpipe replay`.
pub async fn replay(
    config: &Config,
    stage: &str,
    videos: Vec<String>,
    since: Option<&str>,
    until: Option<&str>,
    dry_run: bool,
    json: bool,
) -> ExitCode {
    let now = chrono::Utc::now();
    let parse = |t: Option<&str>| t.map(|t| replay::parse_time(t, now)).transpose();
    let selection = match (parse(since), parse(until)) {
        (Ok(since), Ok(until)) => Selection {
            stage: stage.to_string(),
            videos,
            since,
            until,
            max_videos: None,
        },
        (Err(e), _) | (_, Err(e)) => return replay_error(e),
    };
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let plan = match replay::plan(config, &pool, &selection).await {
        Ok(p) => p,
        Err(e) => return replay_error(e),
    };
    if dry_run {
        if json {
            return match print_json(&plan.items) {
                Ok(()) => ExitCode::SUCCESS,
                Err(code) => code,
            };
        }
        out!("{:<28} {:>4} {:>4}  SOURCE", "ID", "FROM", "TO");
        for p in &plan.items {
            out!(
                "{:<28} {:>4} {:>4}  {}",
                p.video_id,
                p.from_generation,
                p.to_generation,
                p.source.as_str()
            );
        }
        out!(
            "dry run: nothing sent; {} video(s) would be replayed from {} (topic {})",
            plan.items.len(),
            plan.stage,
            plan.topic
        );
        return ExitCode::SUCCESS;
    }
    let (stage, topic) = (plan.stage.clone(), plan.topic.clone());
    // Ctrl-C (or SIGTERM) stops between videos, never between a video's
    // move to `queued` and the send of its record. The handlers are
    // installed here, before sending begins, not when a task first runs:
    // a signal in between would kill the command with the default action.
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        let stop = stop.clone();
        tokio::spawn(async move {
            // A handler that could not be installed never fires.
            async fn fired(s: Option<&mut tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = fired(term.as_mut()) => {}
                _ = fired(int.as_mut()) => {}
            }
            eprintln!("stopping after the video under way");
            stop.cancel();
        })
    };
    let sent = replay::send(config, &pool, plan, &stop).await;
    watcher.abort();
    let (replayed, left) = match sent {
        Ok(s) => (s.replayed, s.left),
        Err(e) => return replay_error(e),
    };
    // Interrupted: what was replayed is reported, and the exit says so.
    let done = if left > 0 {
        eprintln!("interrupted: {left} video(s) of the selection were not replayed");
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    };
    if json {
        return match print_json(&replayed) {
            Ok(()) => done,
            Err(code) => code,
        };
    }
    out!("{:<28} {:>4} {:>4}  SOURCE", "ID", "FROM", "TO");
    for r in &replayed {
        out!(
            "{:<28} {:>4} {:>4}  {}",
            r.video_id,
            r.from_generation,
            r.generation,
            r.source.as_str()
        );
    }
    if replayed.is_empty() {
        out!("nothing to replay from {stage}: no video has input in that range");
    } else {
        let ids: Vec<&str> = replayed.iter().map(|r| r.video_id.as_str()).collect();
        out!(
            "replayed {} video(s) from {stage} (sent to {topic}); follow with `vidpipe status {}`",
            replayed.len(),
            ids.join(" ")
        );
    }
    done
}

fn admin_error(e: AdminError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        AdminError::UnknownStage(_) | AdminError::Shrink { .. } => ExitCode::from(2),
        AdminError::MissingTopic(_) | AdminError::Refused { .. } => ExitCode::FAILURE,
        AdminError::Kafka { .. } => ExitCode::from(UNREACHABLE),
    }
}

/// `vidpipe topics`.
pub async fn topics(config: &Config, json: bool) -> ExitCode {
    let stages = match admin::describe(config).await {
        Ok(s) => s,
        Err(e) => return admin_error(e),
    };
    if json {
        return match print_json(&stages) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        };
    }
    out!(
        "{:<14} {:<40} {:>10} {:>8}  GROUP",
        "STAGE",
        "INPUT TOPIC",
        "PARTITIONS",
        "LAG"
    );
    for s in &stages {
        let partitions = s
            .partitions
            .map_or_else(|| "missing".to_string(), |n| n.to_string());
        out!(
            "{:<14} {:<40} {:>10} {:>8}  {} ({}, {} member(s))",
            s.stage,
            s.topic,
            partitions,
            s.lag,
            s.group,
            s.group_state,
            s.members.len()
        );
        for m in &s.members {
            let parts: Vec<String> = m.partitions.iter().map(i32::to_string).collect();
            out!(
                "    {} on {}: partitions {}",
                m.client_id,
                m.host,
                if parts.is_empty() {
                    "none".to_string()
                } else {
                    parts.join(", ")
                }
            );
        }
    }
    ExitCode::SUCCESS
}

/// `vidpipe topics scale`.
pub async fn topics_scale(config: &Config, stage: &str, partitions: usize) -> ExitCode {
    match admin::scale(config, stage, partitions).await {
        Ok(s) if s.from == s.to => {
            out!(
                "{} already has {} partitions: nothing changed",
                s.topic,
                s.to
            );
            ExitCode::SUCCESS
        }
        Ok(s) => {
            out!(
                "{}: {} -> {} partitions; start more `vidpipe run {stage} --instance NAME` \
                 processes to share them",
                s.topic,
                s.from,
                s.to
            );
            ExitCode::SUCCESS
        }
        Err(e) => admin_error(e),
    }
}

#[cfg(test)]
mod tests {
    //! The progress lines and the status table, from status values as
    //! `vidpipe::client::status` returns them.

    use super::*;
    use vidpipe::client::StageStatus;

    fn run(name: &str, status: &str, attempts: i32, ms: Option<i64>) -> StageStatus {
        StageStatus {
            name: name.into(),
            status: status.into(),
            attempts,
            duration_ms: ms,
            error: None,
            generation: 1,
        }
    }

    fn video(id: &str, status: &str, stages: Vec<StageStatus>) -> VideoStatus {
        VideoStatus {
            id: id.into(),
            url: format!("https://example.com/{id}.mp4"),
            status: status.into(),
            stage: stages.last().map(|s| s.name.clone()),
            generation: 1,
            error: None,
            stages,
        }
    }

    fn first(n: usize) -> Vec<StageStatus> {
        STAGES[..n]
            .iter()
            .map(|s| run(s, "done", 1, Some(1500)))
            .collect()
    }

    #[test]
    fn a_running_stage_shows_its_position_and_time_in_it() {
        let mut stages = first(3);
        stages.push(run("transcribe", "running", 1, None));
        let v = video("yt:abc", "running", stages);
        assert_eq!(
            progress_line(&v, 8, Duration::from_secs(12)),
            "yt:abc    [4/5] transcribe running 12s"
        );
    }

    #[test]
    fn a_retried_stage_shows_its_attempt() {
        let mut stages = first(1);
        stages.push(run("download", "running", 3, None));
        let v = video("url:1", "running", stages);
        assert_eq!(
            progress_line(&v, 5, Duration::from_millis(4200)),
            "url:1  [2/5] download running 4.2s (attempt 3)"
        );
    }

    #[test]
    fn a_finished_stage_names_the_next() {
        let v = video("url:1", "running", first(2));
        assert_eq!(
            progress_line(&v, 5, Duration::from_secs(1)),
            "url:1  [2/5] download done in 1.5s, extract-audio next"
        );
    }

    #[test]
    fn a_video_nothing_picked_up_yet_is_queued() {
        assert_eq!(
            progress_line(&queued("url:2"), 5, Duration::from_secs(75)),
            "url:2  [0/5] queued 1m15s"
        );
    }

    #[test]
    fn a_done_video_shows_its_total_processing_time() {
        let v = video("yt:abc", "done", first(5));
        assert_eq!(
            progress_line(&v, 6, Duration::ZERO),
            "yt:abc  [5/5] done in 7.5s"
        );
    }

    #[test]
    fn a_failed_video_names_its_stage_and_reason_on_one_short_line() {
        let mut stages = first(2);
        let mut failed = run("extract-audio", "failed", 1, Some(80));
        failed.error = Some("no_audio: the file\nhas no audio stream".into());
        stages.push(failed);
        let mut v = video("url:3", "failed", stages);
        v.error = Some("no_audio: the file\nhas no audio stream".into());
        assert_eq!(
            progress_line(&v, 5, Duration::ZERO),
            "url:3  [3/5] extract-audio failed: no_audio: the file has no audio stream"
        );
        v.error = Some("x".repeat(500));
        let line = progress_line(&v, 5, Duration::ZERO);
        assert!(line.ends_with("x…"), "{line}");
        assert!(line.chars().count() < 150, "{line}");
        assert_eq!(
            plain_line(&v).split('\t').take(3).collect::<Vec<_>>(),
            ["url:3", "failed", "extract-audio"]
        );
    }

    #[test]
    fn plain_lines_are_tab_separated_without_a_reason_unless_failed() {
        let v = video("url:4", "running", first(2));
        assert_eq!(plain_line(&v), "url:4\trunning\tdownload");
        assert_eq!(plain_line(&queued("url:5")), "url:5\tqueued\t-");
    }

    #[test]
    fn durations_read_naturally() {
        let cases = [
            (Duration::ZERO, "0.0s"),
            (Duration::from_millis(850), "850ms"),
            (Duration::from_millis(4250), "4.2s"),
            (Duration::from_secs(59), "59s"),
            (Duration::from_secs(185), "3m05s"),
            (Duration::from_secs(3720), "1h02m"),
        ];
        for (d, text) in cases {
            assert_eq!(human(d), text, "{d:?}");
        }
    }

    #[test]
    fn the_status_table_aligns_its_columns() {
        let mut failed = video("url:0123456789abcdef", "failed", first(2));
        failed.error = Some("http_404: not found\non the server".into());
        let videos = vec![
            video("yt:a", "done", first(5)),
            failed,
            video("url:q", "queued", Vec::new()),
        ];
        let table = status_table(&videos);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("ID "), "{table}");
        let column = |name: &str| lines[0].find(name).expect(name);
        let (status, stage, detail) = (column("STATUS"), column("STAGE"), column("URL / ERROR"));
        for (line, v) in lines[1..].iter().zip(&videos) {
            assert!(line.starts_with(&v.id), "{table}");
            assert_eq!(&line[status..status + v.status.len()], v.status, "{table}");
            let s = v.stage.as_deref().unwrap_or("-");
            assert_eq!(&line[stage..stage + s.len()], s, "{table}");
            assert!(!line.ends_with(' '), "{table}");
        }
        assert!(lines[1][detail..].starts_with("https://example.com/yt:a.mp4"));
        assert_eq!(&lines[2][detail..], "http_404: not found on the server");
        assert!(lines[1].contains(" 7.5s "), "{table}");
    }
}
