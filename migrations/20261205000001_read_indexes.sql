-- Indexes for the read paths of the API, the status pages and `vidpipe
-- status`, which poll every few seconds while the tables grow with every
-- video:
-- the newest videos first, whatever their status (`videos_status_idx`
-- leads with the status);
CREATE INDEX videos_updated_idx ON videos (updated_at DESC);
-- the overview's runs finished per stage in the last minutes.
CREATE INDEX stage_runs_finished_idx ON stage_runs (status, finished_at);
