//! Output and exit codes of the client commands (`submit`, `status`,
//! `show`, `sources`, `replay`, `topics`): formatting only; the work is in
//! `vidpipe::client`, `vidpipe::replay` and `vidpipe::admin`.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use vidpipe::admin::{self, AdminError};
use vidpipe::client::{self, ClientError, SourceRun};
use vidpipe::config::Config;
use vidpipe::replay::{self, ReplayError, Selection};
use vidpipe::store::blobs::BlobStore;
use vidpipe::store::db;

const UNREACHABLE: u8 = 3;

async fn pool(config: &Config) -> Result<PgPool, ExitCode> {
    db::connect(&config.database_url, 2).await.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(UNREACHABLE)
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
            Some(status) => println!(
                "{}\talready known ({status}); `vidpipe replay --video {}` reprocesses it",
                s.id, s.id
            ),
            None if s.is_source => println!("{}\tsource submitted: {}", s.id, s.url),
            None => println!("{}\tsubmitted: {}", s.id, s.url),
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
                    println!("{}\tdiscovered {} new video(s)", s.id, found.len());
                    videos.extend(found);
                    break;
                }
                Ok(SourceRun::Failed(why)) => {
                    println!("{}\tfailed\tdiscover\t{why}", s.id);
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

/// Prints a line whenever a video changes stage or status; returns once all
/// are done or failed.
async fn wait_for(pool: &PgPool, ids: &[String], deadline: Instant) -> ExitCode {
    let mut last: HashMap<String, (String, Option<String>)> = HashMap::new();
    loop {
        let videos = match client::status(pool, ids, ids.len() as i64).await {
            Ok(v) => v,
            Err(e) => return client_error(e.into()),
        };
        let mut finished = 0;
        let mut failed = 0;
        for v in &videos {
            let now = (v.status.clone(), v.stage.clone());
            if last.get(&v.id) != Some(&now) {
                let stage = v.stage.as_deref().unwrap_or("-");
                match &v.error {
                    Some(err) if v.status == "failed" => {
                        println!("{}\t{}\t{stage}\t{err}", v.id, v.status)
                    }
                    _ => println!("{}\t{}\t{stage}", v.id, v.status),
                }
                let _ = std::io::stdout().flush();
                last.insert(v.id.clone(), now);
            }
            match v.status.as_str() {
                "done" => finished += 1,
                "failed" => {
                    finished += 1;
                    failed += 1;
                }
                _ => {}
            }
        }
        if finished == ids.len() {
            return if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        if Instant::now() > deadline {
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
        match serde_json::to_string_pretty(&videos) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!(
            "{:<28} {:<8} {:<14} {:>4}  URL / ERROR",
            "ID", "STATUS", "STAGE", "GEN"
        );
        for v in &videos {
            let detail = v.error.as_deref().unwrap_or(&v.url);
            println!(
                "{:<28} {:<8} {:<14} {:>4}  {}",
                v.id,
                v.status,
                v.stage.as_deref().unwrap_or("-"),
                v.generation,
                detail
            );
        }
    }
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !videos.iter().any(|v| &v.id == *id))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "error: unknown video id(s): {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `vidpipe show`.
pub async fn show(
    config: &Config,
    id: &str,
    transcript: bool,
    format: Option<&str>,
    generation: Option<i64>,
) -> ExitCode {
    let (stage, blob_field, default, formats): (&str, &str, &str, &[&str]) = if transcript {
        (
            "transcribe",
            "transcript",
            "txt",
            &["txt", "srt", "vtt", "json"],
        )
    } else {
        ("summarize", "summary", "md", &["md", "json"])
    };
    let format = format.unwrap_or(default);
    if !formats.contains(&format) {
        eprintln!(
            "error: format {format:?} is not one of {}",
            formats.join(", ")
        );
        return ExitCode::from(2);
    }
    let pool = match pool(config).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    let record = match client::stage_output(&pool, id, stage, generation).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            eprintln!("error: {id} has no finished {stage} run (see `vidpipe status {id}`)");
            return ExitCode::FAILURE;
        }
        Err(e) => return client_error(e.into()),
    };
    let Some(uri) = record[blob_field]["uri"].as_str() else {
        eprintln!("error: the {stage} run of {id} names no {blob_field} file");
        return ExitCode::FAILURE;
    };
    let store = match BlobStore::open(&config.storage) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let name = if transcript {
        format!("transcript.{format}")
    } else {
        format!("summary.{format}")
    };
    let path = match store.sibling(uri, &name) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let _ = std::io::stdout().write_all(&bytes);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", path.display());
            ExitCode::FAILURE
        }
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
pub async fn sources_add(config: &Config, url: &str, every: &str, backfill: i32) -> ExitCode {
    let Some(interval) = parse_every(every).filter(|d| d.as_secs() >= 60) else {
        eprintln!(
            "error: --every {every:?}: give a number with s, m, h or d, at least 1m (e.g. 30m)"
        );
        return ExitCode::from(2);
    };
    if backfill < 0 {
        eprintln!("error: --backfill must not be negative");
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
            println!("{}\t{}\tevery {}s", s.id, s.url, s.every_secs);
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
                println!(
                    "{}\t{}\tevery {}s\tpolls {}",
                    s.id, s.url, s.every_secs, s.polls
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
            println!("{s}");
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
        ReplayError::UnknownStage(_) | ReplayError::Usage(_) | ReplayError::Unsupported(_) => {
            ExitCode::from(2)
        }
        ReplayError::UnknownVideos(_)
        | ReplayError::NotReplayable(_)
        | ReplayError::MissingTopic(_) => ExitCode::FAILURE,
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
        println!("{:<28} {:>4} {:>4}  SOURCE", "ID", "FROM", "TO");
        for p in &plan.items {
            println!(
                "{:<28} {:>4} {:>4}  {}",
                p.video_id,
                p.from_generation,
                p.to_generation,
                p.source.as_str()
            );
        }
        println!(
            "dry run: nothing sent; {} video(s) would be replayed from {} (topic {})",
            plan.items.len(),
            plan.stage,
            plan.topic
        );
        return ExitCode::SUCCESS;
    }
    let (stage, topic) = (plan.stage.clone(), plan.topic.clone());
    let replayed = match replay::send(config, &pool, plan).await {
        Ok(r) => r,
        Err(e) => return replay_error(e),
    };
    if json {
        return match print_json(&replayed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        };
    }
    println!("{:<28} {:>4} {:>4}  SOURCE", "ID", "FROM", "TO");
    for r in &replayed {
        println!(
            "{:<28} {:>4} {:>4}  {}",
            r.video_id,
            r.from_generation,
            r.generation,
            r.source.as_str()
        );
    }
    if replayed.is_empty() {
        println!("nothing to replay from {stage}: no video has input in that range");
    } else {
        let ids: Vec<&str> = replayed.iter().map(|r| r.video_id.as_str()).collect();
        println!(
            "replayed {} video(s) from {stage} (sent to {topic}); follow with `vidpipe status {}`",
            replayed.len(),
            ids.join(" ")
        );
    }
    ExitCode::SUCCESS
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
    println!(
        "{:<14} {:<40} {:>10} {:>8}  GROUP",
        "STAGE", "INPUT TOPIC", "PARTITIONS", "LAG"
    );
    for s in &stages {
        let partitions = s
            .partitions
            .map_or_else(|| "missing".to_string(), |n| n.to_string());
        println!(
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
            println!(
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
            println!(
                "{} already has {} partitions: nothing changed",
                s.topic, s.to
            );
            ExitCode::SUCCESS
        }
        Ok(s) => {
            println!(
                "{}: {} -> {} partitions; start more `vidpipe run {stage} --instance NAME` \
                 processes to share them",
                s.topic, s.from, s.to
            );
            ExitCode::SUCCESS
        }
        Err(e) => admin_error(e),
    }
}
