-- What discovery has seen, and the sources it polls.
--
-- `discovered` makes a second submission of the same video a no-op: the
-- first command to claim a video id owns it. A claim names its claimant (the
-- command id), so a retry of the same command claims again successfully and
-- is not mistaken for a duplicate. A replay bypasses discovery altogether.
CREATE TABLE discovered (
    video_id      text        PRIMARY KEY,
    url           text        NOT NULL,
    title         text,
    source_url    text,
    claimed_by    text        NOT NULL,
    discovered_at timestamptz NOT NULL DEFAULT now()
);

-- Subscriptions: feeds, channels and playlists polled on a schedule. Each
-- due source is claimed by one instance (FOR UPDATE SKIP LOCKED).
CREATE TABLE sources (
    id             text        PRIMARY KEY,
    url            text        NOT NULL UNIQUE,
    every_secs     bigint      NOT NULL CHECK (every_secs >= 60),
    max_backfill   integer     NOT NULL CHECK (max_backfill >= 0),
    next_poll_at   timestamptz NOT NULL DEFAULT now(),
    last_polled_at timestamptz,
    polls          bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sources_due_idx ON sources (next_poll_at);
