-- The SQLite twin of migrations/postgres/0006: each run of a job is kept.
ALTER TABLE jobs ADD COLUMN run_no INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN run_how TEXT NOT NULL DEFAULT 'submit';

CREATE TABLE job_runs (
    job_id      INTEGER NOT NULL,
    run_no      INTEGER NOT NULL,
    how         TEXT NOT NULL,
    state       TEXT NOT NULL,
    started_at  REAL,
    finished_at REAL,
    summary     TEXT NOT NULL,
    PRIMARY KEY (job_id, run_no)
);
