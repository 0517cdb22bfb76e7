//! What discovery knows: which videos were already claimed (so a second
//! submission is recognised) and the subscribed sources it polls. Stages see
//! this through the [`Catalog`] trait; [`PgCatalog`] keeps it in PostgreSQL.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;

use crate::template::StageError;

/// A subscribed source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Source {
    /// `src:…`, derived from the URL.
    pub id: String,
    /// Feed, channel or playlist URL.
    pub url: String,
    /// Poll interval.
    pub every_secs: i64,
    /// How many of the newest entries the first poll takes.
    pub max_backfill: i32,
    /// Polls so far.
    pub polls: i64,
}

/// Discovery's memory, as the discover stage sees it.
pub trait Catalog: Send + Sync + 'static {
    /// Claims `video_id` for `claimant` (a command id). True when the video
    /// is new, or was claimed by the same claimant before (a retry of the
    /// same command); false when another command already brought it.
    fn claim(
        &self,
        video_id: &str,
        url: &str,
        title: Option<&str>,
        source_url: Option<&str>,
        claimant: &str,
    ) -> impl Future<Output = Result<bool, StageError>> + Send;

    /// The subscription of `source_id`, if any: its first poll is limited
    /// to the newest `max_backfill` entries.
    fn source(
        &self,
        source_id: &str,
    ) -> impl Future<Output = Result<Option<Source>, StageError>> + Send;
}

/// The catalog in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgCatalog {
    pool: PgPool,
}

fn db_error(e: sqlx::Error) -> StageError {
    StageError::retryable("database", format!("catalog query failed: {e}"))
}

impl PgCatalog {
    /// A catalog on a migrated database.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Adds (or updates) a subscription; returns it.
    pub async fn add_source(
        &self,
        id: &str,
        url: &str,
        every: Duration,
        max_backfill: i32,
    ) -> Result<Source, sqlx::Error> {
        sqlx::query_as(
            "INSERT INTO sources (id, url, every_secs, max_backfill) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET every_secs = EXCLUDED.every_secs,
               max_backfill = EXCLUDED.max_backfill, next_poll_at = now()
             RETURNING id, url, every_secs, max_backfill, polls",
        )
        .bind(id)
        .bind(url)
        .bind(every.as_secs() as i64)
        .bind(max_backfill)
        .fetch_one(&self.pool)
        .await
    }

    /// Every subscription.
    pub async fn sources(&self) -> Result<Vec<Source>, sqlx::Error> {
        sqlx::query_as("SELECT id, url, every_secs, max_backfill, polls FROM sources ORDER BY url")
            .fetch_all(&self.pool)
            .await
    }

    /// Removes a subscription by id or URL; true if one was removed. A
    /// URL is matched as `sources add` stored it (normalised: any spelling
    /// of it that gives the same source id).
    pub async fn remove_source(&self, id_or_url: &str) -> Result<bool, sqlx::Error> {
        let by_url = crate::ids::normalise(id_or_url)
            .ok()
            .map(|u| crate::ids::source_id(&u));
        let n = sqlx::query("DELETE FROM sources WHERE id = $1 OR url = $1 OR id = $2")
            .bind(id_or_url)
            .bind(by_url)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// Claims up to `limit` due sources for one poll each: their next poll
    /// moves one interval ahead in the same transaction, so with several
    /// instances each due source is taken by exactly one (rows locked by
    /// another instance are skipped, not waited for).
    pub async fn claim_due(&self, limit: i64) -> Result<Vec<Source>, sqlx::Error> {
        sqlx::query_as(
            "WITH due AS (
               SELECT id FROM sources WHERE next_poll_at <= now()
               ORDER BY next_poll_at LIMIT $1 FOR UPDATE SKIP LOCKED
             )
             UPDATE sources s SET next_poll_at = now() + make_interval(secs => s.every_secs),
               last_polled_at = now(), polls = s.polls + 1
             FROM due WHERE s.id = due.id
             RETURNING s.id, s.url, s.every_secs, s.max_backfill, s.polls",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }
}

impl Catalog for PgCatalog {
    async fn claim(
        &self,
        video_id: &str,
        url: &str,
        title: Option<&str>,
        source_url: Option<&str>,
        claimant: &str,
    ) -> Result<bool, StageError> {
        let owner: String = sqlx::query_scalar(
            "INSERT INTO discovered (video_id, url, title, source_url, claimed_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (video_id) DO UPDATE SET video_id = EXCLUDED.video_id
             RETURNING claimed_by",
        )
        .bind(video_id)
        .bind(url)
        .bind(title)
        .bind(source_url)
        .bind(claimant)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(owner == claimant)
    }

    async fn source(&self, source_id: &str) -> Result<Option<Source>, StageError> {
        sqlx::query_as("SELECT id, url, every_secs, max_backfill, polls FROM sources WHERE id = $1")
            .bind(source_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)
    }
}
