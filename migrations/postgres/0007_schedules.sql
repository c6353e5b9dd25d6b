-- Schedules: specs with a `schedule` (cron), registered by `vinetl submit`
-- and run by `vinetl scheduler`, one row per spec name.
CREATE TABLE schedules (
    name            TEXT PRIMARY KEY,
    -- The spec as registered, its `{date}` templates unfilled.
    spec            JSONB NOT NULL,
    registered_at   TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    -- Every fire time up to here is decided: a run was made, or recorded
    -- as missed. A scheduler decides under this row's lock.
    decided_through TIMESTAMPTZ NOT NULL
);

-- One row per schedule and logical time. The primary key is what makes a
-- logical date run once, however many schedulers race: the second insert
-- of a key does nothing.
CREATE TABLE schedule_runs (
    name          TEXT NOT NULL,
    logical_at    TIMESTAMPTZ NOT NULL,
    logical_date  TEXT NOT NULL,
    -- due: to start; waiting: for its dated input; submitted: its job is
    -- made (job_id); missed: passed while no scheduler ran and the catch-up
    -- policy left it; failed: its input never came (job_id holds the failed
    -- job) or its spec could not be filled.
    state         TEXT NOT NULL CHECK (state IN ('due', 'waiting', 'submitted', 'missed', 'failed')),
    -- schedule, catch-up, backfill or rerun.
    how           TEXT NOT NULL,
    job_id        BIGINT,
    reason        TEXT,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    -- A scheduler starting this run holds it until then.
    claimed_until TIMESTAMPTZ,
    -- Which claim holds it: only that scheduler may link a job or settle it.
    claimed_by    TEXT,
    -- A waiting run looks for its input again then.
    next_check_at TIMESTAMPTZ,
    PRIMARY KEY (name, logical_at)
);
CREATE INDEX schedule_runs_open_idx ON schedule_runs (name) WHERE state IN ('due', 'waiting');

-- A scheduled run's logical date (YYYY-MM-DD): its `dt=` partition.
ALTER TABLE jobs ADD COLUMN logical_date TEXT;
