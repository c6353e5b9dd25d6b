-- Each run of a job is kept: the submission is run 1, each `vinetl
-- reprocess` starts the next. When a run ends and another starts, the
-- ended run's outcome is copied here, so `status` shows the job's history
-- while the job row holds the current run.
ALTER TABLE jobs ADD COLUMN run_no INTEGER NOT NULL DEFAULT 1;
-- How the current run was started: `submit`, or `reprocess` with its
-- options (`--failed-only`, `--vins FILE (N VINs)`, `--refresh`).
ALTER TABLE jobs ADD COLUMN run_how TEXT NOT NULL DEFAULT 'submit';

CREATE TABLE job_runs (
    job_id      BIGINT NOT NULL,
    run_no      INTEGER NOT NULL,
    how         TEXT NOT NULL,
    state       TEXT NOT NULL,
    started_at  TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    -- The counts `status` showed when the run ended (calls are the job's
    -- totals up to then).
    summary     JSONB NOT NULL,
    PRIMARY KEY (job_id, run_no)
);
