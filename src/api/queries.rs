//! Reads of the status tables that only the API and the status page need:
//! a video's runs of every generation, counts per stage and status,
//! throughput, recent failures and titles. (Submit, status and source
//! polling are `crate::client`'s.)

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::model::{StatusCounts, TimelineRun};
use crate::stages::STAGES;

/// The window that throughput is measured over.
pub const THROUGHPUT_MINUTES: i64 = 10;

/// Every stage run of a video, newest generation first, stages in
/// pipeline order.
pub async fn runs(pool: &PgPool, video_id: &str) -> Result<Vec<TimelineRun>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stage, generation, status, attempt AS attempts, started_at, finished_at,
                duration_ms, error_class, error
         FROM stage_runs WHERE video_id = $1
         ORDER BY generation DESC, array_position($2::text[], stage), stage",
    )
    .bind(video_id)
    .bind(&STAGES[..])
    .fetch_all(pool)
    .await
}

/// Titles that discovery found, by video id.
pub async fn titles(pool: &PgPool, ids: &[String]) -> Result<HashMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT video_id, title FROM discovered WHERE video_id = ANY($1) AND title IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Per stage, the videos by the status of their run at that stage (each
/// video's current generation only).
pub async fn stage_counts(pool: &PgPool) -> Result<HashMap<String, StatusCounts>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT r.stage, r.status, count(*)
         FROM stage_runs r JOIN videos v ON v.id = r.video_id AND v.generation = r.generation
         GROUP BY r.stage, r.status",
    )
    .fetch_all(pool)
    .await?;
    let mut out: HashMap<String, StatusCounts> = HashMap::new();
    for (stage, status, n) in rows {
        out.entry(stage).or_default().add(&status, n);
    }
    Ok(out)
}

/// Per stage, the runs that finished in the last [`THROUGHPUT_MINUTES`].
pub async fn throughput(pool: &PgPool) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT stage, count(*) FROM stage_runs
         WHERE status = 'done' AND finished_at >= now() - make_interval(mins => $1::int)
         GROUP BY stage",
    )
    .bind(THROUGHPUT_MINUTES as i32)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Videos by status (all of them).
pub async fn video_counts(pool: &PgPool) -> Result<StatusCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM videos GROUP BY status")
            .fetch_all(pool)
            .await?;
    let mut out = StatusCounts::default();
    for (status, n) in rows {
        out.add(&status, n);
    }
    Ok(out)
}

/// A failed video, for the status page.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Failure {
    /// Video id.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// Its title, when discovery found one.
    pub title: Option<String>,
    /// The stage it failed in.
    pub stage: Option<String>,
    /// Why.
    pub error: Option<String>,
    /// When.
    pub updated_at: DateTime<Utc>,
}

/// The most recent failures, newest first.
pub async fn failures(pool: &PgPool, limit: i64) -> Result<Vec<Failure>, sqlx::Error> {
    sqlx::query_as(
        "SELECT v.id, v.url, d.title, v.stage, v.error, v.updated_at
         FROM videos v LEFT JOIN discovered d ON d.video_id = v.id
         WHERE v.status = 'failed' ORDER BY v.updated_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}
