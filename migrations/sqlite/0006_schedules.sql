-- The SQLite twin of migrations/postgres/0007: schedules and their runs.
CREATE TABLE schedules (
    name            TEXT PRIMARY KEY,
    spec            TEXT NOT NULL,
    registered_at   REAL NOT NULL,
    updated_at      REAL NOT NULL,
    decided_through REAL NOT NULL
);

CREATE TABLE schedule_runs (
    name          TEXT NOT NULL,
    logical_at    REAL NOT NULL,
    logical_date  TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('due', 'waiting', 'submitted', 'missed', 'failed')),
    how           TEXT NOT NULL,
    job_id        INTEGER,
    reason        TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    claimed_until REAL,
    claimed_by    TEXT,
    next_check_at REAL,
    PRIMARY KEY (name, logical_at)
);
CREATE INDEX schedule_runs_open_idx ON schedule_runs (name) WHERE state IN ('due', 'waiting');

ALTER TABLE jobs ADD COLUMN logical_date TEXT;
