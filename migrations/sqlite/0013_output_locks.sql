-- One writer at a time commits into an output place (see the Postgres
-- migration 0015). `until` in Unix seconds, as the other times.
CREATE TABLE output_locks (
    place  TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    until  REAL NOT NULL
);
