-- The SQLite twin of migrations/postgres/0008: the runner's audit trail.
CREATE TABLE call_audit (
    call_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    sent_at   REAL    NOT NULL DEFAULT (unixepoch('subsec')),
    job_id    INTEGER NOT NULL,
    batch_no  INTEGER NOT NULL,
    provider  TEXT    NOT NULL,
    endpoint  TEXT    NOT NULL,
    -- A JSON array of VINs.
    vins      TEXT    NOT NULL,
    lookup    TEXT
);
CREATE INDEX call_audit_sent_idx ON call_audit (sent_at);
CREATE INDEX call_audit_job_idx ON call_audit (job_id);
