-- Whether the job's current run may replace a dataset partition that a
-- later job has written since (see the Postgres migration 0014).
ALTER TABLE jobs ADD COLUMN replace_newer INTEGER NOT NULL DEFAULT 0;
