-- Whether the job's current run may replace a dataset partition that a
-- later job has written since (`vinetl write --force`, `vinetl reprocess
-- --force`). Set by each rewrite and reprocess, and kept on the job, so
-- the worker that writes the outputs (another process, after a detached
-- reprocess or a writer's death) does what the operator asked.
ALTER TABLE jobs ADD COLUMN replace_newer BOOLEAN NOT NULL DEFAULT false;
