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
//!
//! Writes are batched (group commit): a runner's [`StatusWriter`] queues the
//! writes of its workers and sends whatever has gathered while the previous
//! batch was on its way as one multi-row upsert per kind (`started`,
//! `finished`), arrays passed through `UNNEST`. Every row keeps its own
//! lease check and never-regress guard, and every worker still waits for
//! its own row's outcome (applied, stale or fenced) before going on, so a
//! batch changes how many round trips there are, not what is guaranteed:
//! a run's finished row is durable before its outputs are produced, as
//! with single writes. Rows of one batch are distinct videos, sorted by
//! video id, so that concurrent batches lock rows in the same order and
//! cannot deadlock each other. A batch the database refuses is retried row
//! by row, so that one bad row fails alone.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

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
    fn from_flags(leased: bool, applied: bool) -> Self {
        match (leased, applied) {
            (false, _) => WriteOutcome::Fenced,
            (true, false) => WriteOutcome::Stale,
            (true, true) => WriteOutcome::Applied,
        }
    }
}

/// Status writer for one runner.
#[derive(Debug, Clone)]
pub struct StatusStore {
    pool: PgPool,
}

/// Batches a writer sends at once; each uses up to two connections (its
/// `started` and its `finished` rows).
const BATCHES_IN_FLIGHT: usize = 2;

/// A status write that could not be made (the database refused it or was
/// unreachable); the caller decides whether to try again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("status write: {0}")]
pub struct StatusWriteError(Arc<sqlx::Error>);

impl From<sqlx::Error> for StatusWriteError {
    fn from(e: sqlx::Error) -> Self {
        Self(Arc::new(e))
    }
}

/// One row of a status write.
#[derive(Debug, Clone)]
struct Row {
    fence: Fence,
    video_id: String,
    generation: i64,
    stage: String,
    attempt: i32,
    touch_video: bool,
    kind: RowKind,
}

#[derive(Debug, Clone)]
enum RowKind {
    Started {
        url: Option<String>,
    },
    Finished {
        status: &'static str,
        video_status: &'static str,
        duration_ms: i64,
        error_class: Option<String>,
        error: Option<String>,
        /// JSON text, serialised once (cast to jsonb in the statement).
        output: Option<String>,
    },
}

impl Row {
    fn started(
        fence: &Fence,
        meta: &Meta,
        url: Option<&str>,
        stage: &str,
        attempt: i32,
        touch_video: bool,
    ) -> Self {
        Self {
            fence: fence.clone(),
            video_id: meta.video_id.clone(),
            generation: meta.generation,
            stage: stage.to_string(),
            attempt,
            touch_video,
            kind: RowKind::Started {
                url: url.map(str::to_string),
            },
        }
    }

    fn finished(fence: &Fence, meta: &Meta, stage: &str, attempt: i32, f: &Finish<'_>) -> Self {
        Self {
            fence: fence.clone(),
            video_id: meta.video_id.clone(),
            generation: meta.generation,
            stage: stage.to_string(),
            attempt,
            touch_video: f.touch_video,
            kind: RowKind::Finished {
                status: if f.ok { "done" } else { "failed" },
                video_status: match (f.ok, f.final_stage) {
                    (true, true) => "done",
                    (true, false) => "running",
                    (false, _) => "failed",
                },
                duration_ms: f.duration_ms,
                error_class: f.error_class.map(str::to_string),
                error: f.error.map(str::to_string),
                output: f.output.as_ref().map(serde_json::Value::to_string),
            },
        }
    }

    fn is_started(&self) -> bool {
        matches!(self.kind, RowKind::Started { .. })
    }
}

/// The lease check shared by both statements: which input rows' writers
/// still hold their partition's newest lease.
const LEASED: &str = "leased AS (
   SELECT i.* FROM input i
   WHERE EXISTS (SELECT 1 FROM partition_leases l
                 WHERE l.consumer_group = i.consumer_group AND l.topic = i.topic
                   AND l.partition = i.part AND l.epoch = i.epoch)
 )";

/// Per input row: (position, leased, applied).
const OUTCOMES: &str = "SELECT i.idx, EXISTS (SELECT 1 FROM leased l WHERE l.idx = i.idx),
        EXISTS (SELECT 1 FROM run WHERE run.video_id = i.video_id AND run.stage = i.stage
                AND run.generation = i.generation)
 FROM input i";

fn started_sql() -> String {
    format!(
        "WITH input AS (
           SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::text[],
                                $6::text[], $7::int8[], $8::int4[], $9::bool[], $10::text[])
             WITH ORDINALITY AS t(consumer_group, topic, part, epoch, video_id, stage,
                                  generation, attempt, touch_video, url, idx)
         ), {LEASED}, run AS (
           INSERT INTO stage_runs AS r
             (video_id, stage, generation, attempt, epoch, status, started_at, updated_at)
           SELECT video_id, stage, generation, attempt, epoch, 'running', now(), now()
           FROM leased ORDER BY video_id, stage, generation
           ON CONFLICT (video_id, stage, generation) DO UPDATE
             SET attempt = EXCLUDED.attempt, epoch = EXCLUDED.epoch, status = 'running',
                 started_at = now(), finished_at = NULL, duration_ms = NULL,
                 error_class = NULL, error = NULL, updated_at = now()
             WHERE r.status <> 'done'
               AND (r.epoch, r.attempt) < (EXCLUDED.epoch, EXCLUDED.attempt)
           RETURNING r.video_id, r.stage, r.generation
         ), video AS (
           INSERT INTO videos AS v (id, url, generation, status, stage, updated_at)
           SELECT i.video_id, COALESCE(i.url, ''), i.generation, 'running', i.stage, now()
           FROM input i JOIN run USING (video_id, stage, generation)
           WHERE i.touch_video ORDER BY i.video_id
           ON CONFLICT (id) DO UPDATE
             SET status = 'running', stage = EXCLUDED.stage, generation = EXCLUDED.generation,
                 error = NULL, updated_at = now(),
                 url = CASE WHEN v.url = '' THEN EXCLUDED.url ELSE v.url END
             WHERE v.generation < EXCLUDED.generation
                OR (v.generation = EXCLUDED.generation
                    AND v.status <> 'done' AND (v.status <> 'failed' OR v.stage = EXCLUDED.stage))
           RETURNING 1
         )
         {OUTCOMES}"
    )
}

fn finished_sql() -> String {
    format!(
        "WITH input AS (
           SELECT * FROM unnest($1::text[], $2::text[], $3::int4[], $4::int8[], $5::text[],
                                $6::text[], $7::int8[], $8::int4[], $9::bool[], $10::text[],
                                $11::text[], $12::int8[], $13::text[], $14::text[], $15::text[])
             WITH ORDINALITY AS t(consumer_group, topic, part, epoch, video_id, stage,
                                  generation, attempt, touch_video, status, video_status,
                                  duration_ms, error_class, error, output, idx)
         ), {LEASED}, run AS (
           INSERT INTO stage_runs AS r
             (video_id, stage, generation, attempt, epoch, status, started_at, finished_at,
              duration_ms, error_class, error, output, updated_at)
           SELECT video_id, stage, generation, attempt, epoch, status,
                  now() - duration_ms * interval '1 millisecond', now(), duration_ms,
                  error_class, error, output::jsonb, now()
           FROM leased ORDER BY video_id, stage, generation
           ON CONFLICT (video_id, stage, generation) DO UPDATE
             SET attempt = EXCLUDED.attempt, epoch = EXCLUDED.epoch, status = EXCLUDED.status,
                 started_at = COALESCE(r.started_at, EXCLUDED.started_at),
                 finished_at = now(), duration_ms = EXCLUDED.duration_ms,
                 error_class = EXCLUDED.error_class, error = EXCLUDED.error,
                 output = EXCLUDED.output, updated_at = now()
             WHERE (r.epoch, r.attempt) <= (EXCLUDED.epoch, EXCLUDED.attempt)
               AND NOT (r.status = 'done' AND EXCLUDED.status <> 'done')
           RETURNING r.video_id, r.stage, r.generation
         ), video AS (
           INSERT INTO videos AS v (id, url, generation, status, stage, error, updated_at)
           SELECT i.video_id, '', i.generation, i.video_status, i.stage, i.error, now()
           FROM input i JOIN run USING (video_id, stage, generation)
           WHERE i.touch_video ORDER BY i.video_id
           ON CONFLICT (id) DO UPDATE
             SET status = EXCLUDED.status, stage = EXCLUDED.stage,
                 generation = EXCLUDED.generation, error = EXCLUDED.error, updated_at = now()
             WHERE v.generation < EXCLUDED.generation
                OR (v.generation = EXCLUDED.generation
                    AND v.status <> 'done' AND (v.status <> 'failed' OR v.stage = EXCLUDED.stage))
           RETURNING 1
         )
         {OUTCOMES}"
    )
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

    /// Records that a stage run started (one write, unbatched).
    pub async fn started(
        &self,
        fence: &Fence,
        meta: &Meta,
        url: Option<&str>,
        stage: &str,
        attempt: i32,
        touch_video: bool,
    ) -> Result<WriteOutcome, sqlx::Error> {
        let row = Row::started(fence, meta, url, stage, attempt, touch_video);
        Ok(self.write(std::slice::from_ref(&row)).await?[0])
    }

    /// Records how a stage run ended (one write, unbatched).
    pub async fn finished(
        &self,
        fence: &Fence,
        meta: &Meta,
        stage: &str,
        attempt: i32,
        finish: &Finish<'_>,
    ) -> Result<WriteOutcome, sqlx::Error> {
        let row = Row::finished(fence, meta, stage, attempt, finish);
        Ok(self.write(std::slice::from_ref(&row)).await?[0])
    }

    /// A batching writer for one runner, running on the current Tokio
    /// runtime until every clone of it is dropped. At most `max_batch`
    /// rows go in one statement.
    pub fn writer(&self, max_batch: usize) -> StatusWriter {
        // Each worker has at most one write queued.
        let (tx, rx) = mpsc::channel(max_batch.max(1) * BATCHES_IN_FLIGHT);
        tokio::spawn(batching(self.clone(), rx, max_batch.max(1)));
        StatusWriter { tx }
    }

    /// Writes rows of one kind in one statement; outcomes in row order.
    /// The rows must be distinct videos.
    async fn write(&self, rows: &[Row]) -> Result<Vec<WriteOutcome>, sqlx::Error> {
        let Some(first) = rows.first() else {
            return Ok(Vec::new());
        };
        let started = first.is_started();
        debug_assert!(rows.iter().all(|r| r.is_started() == started));
        let sql = if started {
            started_sql()
        } else {
            finished_sql()
        };
        let text = |f: fn(&Row) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let mut query = sqlx::query_as::<_, (i64, bool, bool)>(&sql)
            .bind(text(|r| &r.fence.group))
            .bind(text(|r| &r.fence.topic))
            .bind(rows.iter().map(|r| r.fence.partition).collect::<Vec<i32>>())
            .bind(rows.iter().map(|r| r.fence.epoch).collect::<Vec<i64>>())
            .bind(text(|r| &r.video_id))
            .bind(text(|r| &r.stage))
            .bind(rows.iter().map(|r| r.generation).collect::<Vec<i64>>())
            .bind(rows.iter().map(|r| r.attempt).collect::<Vec<i32>>())
            .bind(rows.iter().map(|r| r.touch_video).collect::<Vec<bool>>());
        if started {
            let urls: Vec<Option<&str>> = rows
                .iter()
                .map(|r| match &r.kind {
                    RowKind::Started { url } => url.as_deref(),
                    RowKind::Finished { .. } => None,
                })
                .collect();
            query = query.bind(urls);
        } else {
            let mut status = Vec::with_capacity(rows.len());
            let mut video_status = Vec::with_capacity(rows.len());
            let mut duration = Vec::with_capacity(rows.len());
            let mut error_class = Vec::with_capacity(rows.len());
            let mut error = Vec::with_capacity(rows.len());
            let mut output = Vec::with_capacity(rows.len());
            for r in rows {
                if let RowKind::Finished {
                    status: s,
                    video_status: v,
                    duration_ms,
                    error_class: c,
                    error: e,
                    output: o,
                } = &r.kind
                {
                    status.push(*s);
                    video_status.push(*v);
                    duration.push(*duration_ms);
                    error_class.push(c.as_deref());
                    error.push(e.as_deref());
                    output.push(o.as_deref());
                }
            }
            query = query
                .bind(status)
                .bind(video_status)
                .bind(duration)
                .bind(error_class)
                .bind(error)
                .bind(output);
        }
        let found = query.fetch_all(&self.pool).await?;
        let mut outcomes = vec![WriteOutcome::Fenced; rows.len()];
        for (idx, leased, applied) in found {
            if let Some(o) = usize::try_from(idx - 1)
                .ok()
                .and_then(|i| outcomes.get_mut(i))
            {
                *o = WriteOutcome::from_flags(leased, applied);
            }
        }
        Ok(outcomes)
    }
}

/// Queues status writes for the batching task of one runner.
#[derive(Debug, Clone)]
pub struct StatusWriter {
    tx: mpsc::Sender<Queued>,
}

#[derive(Debug)]
struct Queued {
    row: Row,
    reply: oneshot::Sender<Result<WriteOutcome, StatusWriteError>>,
}

impl StatusWriter {
    /// Records that a stage run started; resolves when its batch is
    /// written.
    pub async fn started(
        &self,
        fence: &Fence,
        meta: &Meta,
        url: Option<&str>,
        stage: &str,
        attempt: i32,
        touch_video: bool,
    ) -> Result<WriteOutcome, StatusWriteError> {
        self.queue(Row::started(fence, meta, url, stage, attempt, touch_video))
            .await
    }

    /// Records how a stage run ended; resolves when its batch is written.
    pub async fn finished(
        &self,
        fence: &Fence,
        meta: &Meta,
        stage: &str,
        attempt: i32,
        finish: &Finish<'_>,
    ) -> Result<WriteOutcome, StatusWriteError> {
        self.queue(Row::finished(fence, meta, stage, attempt, finish))
            .await
    }

    async fn queue(&self, row: Row) -> Result<WriteOutcome, StatusWriteError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StatusWriteError::from(sqlx::Error::PoolClosed);
        self.tx
            .send(Queued { row, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Gathers queued writes into batches (distinct videos, at most `max`
/// rows) and sends up to [`BATCHES_IN_FLIGHT`] at once: while those are on
/// their way, the next batch gathers.
async fn batching(store: StatusStore, mut rx: mpsc::Receiver<Queued>, max: usize) {
    let permits = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    // Writes held back because their video was already in a batch being
    // gathered (two rows for one row of `videos` cannot share a statement).
    let mut held: VecDeque<Queued> = VecDeque::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let first = match held.pop_front() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut videos: HashSet<String> = HashSet::from([first.row.video_id.clone()]);
        let mut batch = vec![first];
        let mut again = VecDeque::new();
        while batch.len() < max {
            let next = match held.pop_front() {
                Some(q) => q,
                None => match rx.try_recv() {
                    Ok(q) => q,
                    Err(_) => break,
                },
            };
            if videos.insert(next.row.video_id.clone()) {
                batch.push(next);
            } else {
                again.push_back(next);
            }
        }
        again.extend(held.drain(..));
        held = again;
        let store = store.clone();
        tokio::spawn(async move {
            let (started, finished): (Vec<Queued>, Vec<Queued>) =
                batch.into_iter().partition(|q| q.row.is_started());
            tokio::join!(send(&store, started), send(&store, finished));
            drop(permit);
        });
    }
}

/// Writes one kind of rows and answers every writer.
async fn send(store: &StatusStore, mut batch: Vec<Queued>) {
    if batch.is_empty() {
        return;
    }
    // One lock order for every batch: see the module's comment.
    batch.sort_by(|a, b| a.row.video_id.cmp(&b.row.video_id));
    let (rows, replies): (Vec<Row>, Vec<_>) = batch.into_iter().map(|q| (q.row, q.reply)).unzip();
    match store.write(&rows).await {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(sqlx::Error::Database(e)) if rows.len() > 1 => {
            tracing::debug!(error = %e, rows = rows.len(), "status batch refused; writing its rows one by one");
            for (row, reply) in rows.iter().zip(replies) {
                let result = store
                    .write(std::slice::from_ref(row))
                    .await
                    .map(|o| o[0])
                    .map_err(StatusWriteError::from);
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            let e = StatusWriteError::from(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
