-- vinetl's state on SQLite: the same tables as on Postgres (see
-- migrations/postgres), for one machine. Times are Unix seconds (REAL);
-- arrays and objects are JSON text. The queue lives in a file of its own
-- (apalis-sqlite keeps its own migrations).

CREATE TABLE jobs (
    job_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    spec            TEXT    NOT NULL,
    spec_hash       TEXT    NOT NULL,
    batches_planned INTEGER NOT NULL DEFAULT 0,
    state           TEXT    NOT NULL DEFAULT 'planning'
                    CHECK (state IN ('planning', 'running', 'waiting', 'writing', 'done', 'failed', 'cancelled')),
    state_reason    TEXT,
    resume_at       REAL,
    created_at      REAL    NOT NULL DEFAULT (unixepoch('subsec')),
    updated_at      REAL    NOT NULL DEFAULT (unixepoch('subsec')),
    finished_at     REAL,
    calls_made      INTEGER NOT NULL DEFAULT 0,
    calls_retried   INTEGER NOT NULL DEFAULT 0,
    rate_limited    INTEGER NOT NULL DEFAULT 0,
    recall_calls    INTEGER NOT NULL DEFAULT 0,
    recalls_planned INTEGER NOT NULL DEFAULT 0,
    recall_lookups  INTEGER NOT NULL DEFAULT 0,
    recall_cache_hits INTEGER NOT NULL DEFAULT 0,
    outputs_written TEXT,
    rows_with_recalls INTEGER,
    rows_recalls_unknown INTEGER,
    campaigns_found INTEGER,
    -- Planning lease: one planner per job at a time.
    planning_until  REAL
);
CREATE INDEX jobs_state_idx ON jobs (state);
CREATE INDEX jobs_spec_hash_idx ON jobs (spec_hash);

CREATE TABLE job_inputs (
    job_id      INTEGER NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    source      TEXT    NOT NULL,
    row_number  INTEGER NOT NULL,
    raw_vin     TEXT    NOT NULL,
    vin         TEXT,
    check_digit_valid INTEGER,
    carried     TEXT    NOT NULL DEFAULT '{}',
    plan        TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('invalid', 'pending', 'decoded', 'failed')),
    error_code  TEXT,
    error_text  TEXT,
    decoded_at  REAL,
    PRIMARY KEY (job_id, source, row_number)
);
CREATE INDEX job_inputs_vin_idx ON job_inputs (job_id, vin);
CREATE INDEX job_inputs_status_idx ON job_inputs (job_id, status);

CREATE TABLE job_sources (
    job_id       INTEGER NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    source       TEXT    NOT NULL,
    rows_planned INTEGER NOT NULL DEFAULT 0,
    complete     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, source)
);

CREATE TABLE batches (
    job_id      INTEGER NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    batch_no    INTEGER NOT NULL,
    -- JSON array of 1 to 20 VINs.
    vins        TEXT    NOT NULL,
    kind        TEXT    NOT NULL DEFAULT 'decode' CHECK (kind IN ('decode', 'recall')),
    lookup_key  TEXT,
    state       TEXT    NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'dead', 'cancelled')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    generation  INTEGER NOT NULL DEFAULT 0,
    enqueued    INTEGER NOT NULL DEFAULT 0,
    next_run_at REAL    NOT NULL DEFAULT (unixepoch('subsec')),
    last_error  TEXT,
    updated_at  REAL    NOT NULL DEFAULT (unixepoch('subsec')),
    PRIMARY KEY (job_id, batch_no)
);
CREATE INDEX batches_state_idx ON batches (job_id, state);

CREATE TABLE vin_cache (
    vin        TEXT PRIMARY KEY,
    decoded_at REAL NOT NULL,
    make       TEXT,
    model      TEXT,
    model_year INTEGER,
    error_code TEXT,
    error_text TEXT,
    raw        TEXT NOT NULL
);

CREATE TABLE errors (
    error_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER REFERENCES jobs (job_id) ON DELETE CASCADE,
    batch_no   INTEGER,
    vin        TEXT,
    error_code TEXT NOT NULL,
    error_text TEXT NOT NULL,
    at         REAL NOT NULL DEFAULT (unixepoch('subsec'))
);

CREATE TABLE limiter (
    account         TEXT PRIMARY KEY,
    rate            REAL NOT NULL CHECK (rate > 0),
    burst           REAL NOT NULL CHECK (burst >= 1),
    scale           REAL NOT NULL DEFAULT 1,
    tat             REAL NOT NULL DEFAULT 0,
    blocked_until   REAL NOT NULL DEFAULT 0,
    daily_quota     INTEGER,
    -- Seconds after UTC midnight at which the quota day starts.
    quota_reset     REAL NOT NULL DEFAULT 0,
    quota_day_start REAL NOT NULL DEFAULT 0,
    day_used        INTEGER NOT NULL DEFAULT 0,
    max_in_flight   INTEGER,
    updated_at      REAL NOT NULL DEFAULT (unixepoch('subsec'))
);

CREATE TABLE limiter_flights (
    flight_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    account    TEXT NOT NULL REFERENCES limiter (account) ON DELETE CASCADE,
    expires_at REAL NOT NULL
);

CREATE TABLE recall_lookups (
    lookup_key   TEXT PRIMARY KEY,
    make         TEXT,
    model        TEXT,
    model_year   INTEGER,
    vin          TEXT,
    looked_up_at REAL,
    campaigns    INTEGER,
    error_text   TEXT,
    failed_at    REAL
);

CREATE TABLE recalls (
    campaign_number      TEXT PRIMARY KEY,
    manufacturer         TEXT NOT NULL,
    component            TEXT NOT NULL,
    summary              TEXT NOT NULL,
    consequence          TEXT NOT NULL,
    remedy               TEXT NOT NULL,
    notes                TEXT,
    -- YYYY-MM-DD.
    report_received_date TEXT,
    park_it              INTEGER NOT NULL,
    park_outside         INTEGER NOT NULL,
    over_the_air_update  INTEGER,
    updated_at           REAL NOT NULL DEFAULT (unixepoch('subsec'))
);

CREATE TABLE recall_lookup_campaigns (
    lookup_key      TEXT NOT NULL REFERENCES recall_lookups (lookup_key) ON DELETE CASCADE,
    campaign_number TEXT NOT NULL REFERENCES recalls (campaign_number),
    PRIMARY KEY (lookup_key, campaign_number)
);

CREATE VIEW vehicle_recalls AS
SELECT c.vin, l.lookup_key, lc.campaign_number
FROM vin_cache c
JOIN recall_lookups l
  ON l.lookup_key = coalesce(
         (SELECT v.lookup_key FROM recall_lookups v WHERE v.lookup_key = 'vin:' || c.vin AND v.looked_up_at IS NOT NULL),
         CASE WHEN nullif(trim(c.make), '') IS NULL OR nullif(trim(c.model), '') IS NULL OR c.model_year IS NULL THEN NULL
              ELSE 'mmy:' || upper(trim(c.make)) || '|' || upper(trim(c.model)) || '|' || c.model_year END)
JOIN recall_lookup_campaigns lc ON lc.lookup_key = l.lookup_key;
