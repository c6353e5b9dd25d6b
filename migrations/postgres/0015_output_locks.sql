-- One writer at a time commits into an output place (a dataset partition):
-- two jobs writing one partition at once (a run and a rewrite of an older
-- job, say) would otherwise each retire the other's files and move in their
-- own, leaving a `_SUCCESS` over files of both. A lease, not a session
-- lock, so that SQLite has it too and a writer that died frees it in time.
CREATE TABLE output_locks (
    place  TEXT PRIMARY KEY,
    -- A random name for one holding, so a writer releases only its own.
    holder TEXT NOT NULL,
    job_id BIGINT NOT NULL,
    until  TIMESTAMPTZ NOT NULL
);
