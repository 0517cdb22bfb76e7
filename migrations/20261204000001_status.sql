-- Status of every video and of every stage run.
--
-- Rows are written by the processor template only, idempotently, and never
-- regress: each write names the (generation, attempt) it belongs to, and the
-- WHERE clauses of the template's upserts refuse a write from an older
-- generation or attempt, or one that would move a finished run back to
-- running. The lease table fences zombie instances: a write carries the
-- partition lease epoch its writer holds, and is refused once a newer owner
-- has taken the partition.

CREATE TABLE videos (
    id          text        PRIMARY KEY,
    url         text        NOT NULL DEFAULT '',
    title       text,
    generation  bigint      NOT NULL DEFAULT 0,
    status      text        NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    stage       text,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX videos_status_idx ON videos (status, updated_at);

CREATE TABLE stage_runs (
    video_id     text        NOT NULL,
    stage        text        NOT NULL,
    generation   bigint      NOT NULL,
    attempt      integer     NOT NULL,
    epoch        bigint      NOT NULL DEFAULT 0,
    status       text        NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_ms  bigint,
    error_class  text,
    error        text,
    output       jsonb,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (video_id, stage, generation)
);

CREATE TABLE partition_leases (
    consumer_group text    NOT NULL,
    topic          text    NOT NULL,
    partition      integer NOT NULL,
    epoch          bigint  NOT NULL,
    owner          text    NOT NULL,
    acquired_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
