//! Status rows in PostgreSQL: one per video, one per (video, stage,
//! generation), written by the runner only.
//!
//! Writes are idempotent and never regress. Each one carries:
//! - the generation: a replay's newer generation gets its own stage rows and
//!   moves the video row forward; an older generation cannot touch them;
//! - the lease epoch of the partition the input came from: the runner takes
//!   a lease (epoch + 1) on every partition it is assigned, and a write is
//!   applied only while its writer still holds the newest lease. A zombie
//!   (an instance paused past its session timeout whose partitions went
//!   elsewhere) therefore cannot overwrite what the new owner wrote;
//! - the attempt: within one lease, a later attempt supersedes an earlier.
//!
//! A finished (`done`) run never goes back to `running` or `failed`.

use sqlx::PgPool;

use crate::records::Meta;

/// Where a write's authority comes from: a lease on an input partition.
#[derive(Debug, Clone)]
pub struct Fence {
    /// Consumer group.
    pub group: String,
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Lease epoch held by the writer.
    pub epoch: i64,
}

/// How a stage run ended.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    /// `done` or `failed`.
    pub ok: bool,
    /// Wall time of the run.
    pub duration_ms: i64,
    /// Error class label, for failures.
    pub error_class: Option<&'a str>,
    /// Error message, for failures.
    pub error: Option<&'a str>,
    /// What the run produced (blob references), as JSON.
    pub output: Option<serde_json::Value>,
    /// Whether this stage is the pipeline's last: its success finishes the
    /// video.
    pub final_stage: bool,
    /// Whether the video's own row follows this run (see the runner).
    pub touch_video: bool,
}

/// What became of a status write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The row was written.
    Applied,
    /// The writer holds the lease, but the row already holds newer state
    /// (a finished run, a later attempt or generation): nothing changed.
    Stale,
    /// The writer no longer holds the partition's lease: it is a zombie.
    Fenced,
}

impl WriteOutcome {
    fn from_counts((leased, applied): (i32, i32)) -> Self {
        match (leased, applied) {
            (0, _) => WriteOutcome::Fenced,
            (_, 0) => WriteOutcome::Stale,
            _ => WriteOutcome::Applied,
        }
    }
}

/// Status writer for one runner.
#[derive(Debug, Clone)]
pub struct StatusStore {
    pool: PgPool,
}

impl StatusStore {
    /// A store on a migrated database.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for tests and tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Takes the leases of newly assigned partitions; returns each epoch.
    pub async fn acquire(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        owner: &str,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO partition_leases (consumer_group, topic, partition, epoch, owner)
             VALUES ($1, $2, $3, 1, $4)
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE
               SET epoch = partition_leases.epoch + 1, owner = EXCLUDED.owner, acquired_at = now()
             RETURNING epoch",
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(owner)
        .fetch_one(&self.pool)
        .await
    }

    /// Records that a stage run started.
    pub async fn started(
        &self,
        fence: &Fence,
        meta: &Meta,
        url: Option<&str>,
        stage: &str,
        attempt: i32,
        touch_video: bool,
    ) -> Result<WriteOutcome, sqlx::Error> {
        let row: (i32, i32) = sqlx::query_as(
            "WITH lease AS (
               SELECT 1 FROM partition_leases
               WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4
             ), run AS (
               INSERT INTO stage_runs AS r
                 (video_id, stage, generation, attempt, epoch, status, started_at, updated_at)
               SELECT $5, $6, $7, $8, $4, 'running', now(), now() FROM lease
               ON CONFLICT (video_id, stage, generation) DO UPDATE
                 SET attempt = EXCLUDED.attempt, epoch = EXCLUDED.epoch, status = 'running',
                     started_at = now(), finished_at = NULL, duration_ms = NULL,
                     error_class = NULL, error = NULL, updated_at = now()
                 WHERE r.status <> 'done' AND (r.epoch, r.attempt) < (EXCLUDED.epoch, EXCLUDED.attempt)
               RETURNING 1
             ), video AS (
               INSERT INTO videos AS v (id, url, generation, status, stage, updated_at)
               SELECT $5, COALESCE($9, ''), $7, 'running', $6, now() FROM run WHERE $10
               ON CONFLICT (id) DO UPDATE
                 SET status = 'running', stage = EXCLUDED.stage, generation = EXCLUDED.generation,
                     error = NULL, updated_at = now(),
                     url = CASE WHEN v.url = '' THEN EXCLUDED.url ELSE v.url END
                 WHERE v.generation < EXCLUDED.generation
                    OR (v.generation = EXCLUDED.generation
                        AND v.status <> 'done' AND (v.status <> 'failed' OR v.stage = EXCLUDED.stage))
               RETURNING 1
             )
             SELECT (SELECT count(*) FROM lease)::int, (SELECT count(*) FROM run)::int",
        )
        .bind(&fence.group)
        .bind(&fence.topic)
        .bind(fence.partition)
        .bind(fence.epoch)
        .bind(&meta.video_id)
        .bind(stage)
        .bind(meta.generation)
        .bind(attempt)
        .bind(url)
        .bind(touch_video)
        .fetch_one(&self.pool)
        .await?;
        Ok(WriteOutcome::from_counts(row))
    }

    /// Records how a stage run ended.
    pub async fn finished(
        &self,
        fence: &Fence,
        meta: &Meta,
        stage: &str,
        attempt: i32,
        finish: &Finish<'_>,
    ) -> Result<WriteOutcome, sqlx::Error> {
        let status = if finish.ok { "done" } else { "failed" };
        let video_status = match (finish.ok, finish.final_stage) {
            (true, true) => "done",
            (true, false) => "running",
            (false, _) => "failed",
        };
        let row: (i32, i32) = sqlx::query_as(
            "WITH lease AS (
               SELECT 1 FROM partition_leases
               WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4
             ), run AS (
               INSERT INTO stage_runs AS r
                 (video_id, stage, generation, attempt, epoch, status, finished_at, duration_ms,
                  error_class, error, output, updated_at)
               SELECT $5, $6, $7, $8, $4, $9, now(), $10, $11, $12, $13, now() FROM lease
               ON CONFLICT (video_id, stage, generation) DO UPDATE
                 SET attempt = EXCLUDED.attempt, epoch = EXCLUDED.epoch, status = EXCLUDED.status,
                     finished_at = now(), duration_ms = EXCLUDED.duration_ms,
                     error_class = EXCLUDED.error_class, error = EXCLUDED.error,
                     output = EXCLUDED.output, updated_at = now()
                 WHERE (r.epoch, r.attempt) <= (EXCLUDED.epoch, EXCLUDED.attempt)
                   AND NOT (r.status = 'done' AND EXCLUDED.status <> 'done')
               RETURNING 1
             ), video AS (
               INSERT INTO videos AS v (id, url, generation, status, stage, error, updated_at)
               SELECT $5, '', $7, $14, $6, $12, now() FROM run WHERE $15
               ON CONFLICT (id) DO UPDATE
                 SET status = EXCLUDED.status, stage = EXCLUDED.stage,
                     generation = EXCLUDED.generation, error = EXCLUDED.error, updated_at = now()
                 WHERE v.generation < EXCLUDED.generation
                    OR (v.generation = EXCLUDED.generation
                        AND v.status <> 'done' AND (v.status <> 'failed' OR v.stage = EXCLUDED.stage))
               RETURNING 1
             )
             SELECT (SELECT count(*) FROM lease)::int, (SELECT count(*) FROM run)::int",
        )
        .bind(&fence.group)
        .bind(&fence.topic)
        .bind(fence.partition)
        .bind(fence.epoch)
        .bind(&meta.video_id)
        .bind(stage)
        .bind(meta.generation)
        .bind(attempt)
        .bind(status)
        .bind(finish.duration_ms)
        .bind(finish.error_class)
        .bind(finish.error)
        .bind(&finish.output)
        .bind(video_status)
        .bind(finish.touch_video)
        .fetch_one(&self.pool)
        .await?;
        Ok(WriteOutcome::from_counts(row))
    }
}
