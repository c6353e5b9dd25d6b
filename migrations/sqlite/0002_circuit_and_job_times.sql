-- The circuit breaker (see the Postgres migration 0003); times are Unix seconds.
ALTER TABLE limiter ADD COLUMN circuit_since REAL;
ALTER TABLE limiter ADD COLUMN circuit_probe_at REAL NOT NULL DEFAULT 0;
ALTER TABLE limiter ADD COLUMN circuit_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE limiter ADD COLUMN circuit_reason TEXT;
ALTER TABLE limiter ADD COLUMN server_errors INTEGER NOT NULL DEFAULT 0;

-- When the job's current run started and each phase ended (see the
-- Postgres migration 0003). SQLite cannot add a column with a clock
-- default: inserts set started_at.
ALTER TABLE jobs ADD COLUMN started_at REAL;
UPDATE jobs SET started_at = created_at;
ALTER TABLE jobs ADD COLUMN planned_at REAL;
ALTER TABLE jobs ADD COLUMN write_started_at REAL;
