-- Restart-at-stage commands (`{"video_id"}` on a legacy stage queue, a
-- Command with `start_stage`) that discovery has handled, one row per
-- command id.
--
-- A command is delivered at least once (a redelivery from RabbitMQ that the
-- bridge could not recognise, a record that Kafka hands to discovery again
-- after a crash), but must move its video to a new generation only once.
-- The row is written in the same transaction that moves the video to its
-- new generation (`pending`, with that generation), and becomes `sent` once
-- Kafka acknowledged the re-fed record: a repeat of a `sent` command is a
-- no-op, and a repeat of a `pending` one sends the record again under the
-- same generation instead of taking another. A command that cannot be
-- carried out (an unknown video, no input record for the stage) is
-- `failed` with the reason; a later delivery of it is tried again.
CREATE TABLE restarts (
    command_id  text        PRIMARY KEY,
    video_id    text        NOT NULL,
    stage       text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    generation  bigint,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX restarts_video_idx ON restarts (video_id, created_at);
