-- The runner's audit trail: one row per API request, written in the
-- transaction that marks the batch `in_call`, so a request that went out is
-- recorded even if its answer never came back. Which VINs went to which
-- provider, and when; never the key. `vinetl audit` reads it, `vinetl audit
-- --prune` (or a worker's `--audit-retention`) deletes old rows, and
-- `vinetl forget VIN` takes a VIN out of it.
CREATE TABLE call_audit (
    call_id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sent_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    job_id    BIGINT  NOT NULL,
    batch_no  INTEGER NOT NULL,
    -- The API's origin (scheme, host, port) and the request's path.
    provider  TEXT    NOT NULL,
    endpoint  TEXT    NOT NULL,
    -- The VINs the request carried (none for a recall lookup, which sends
    -- make, model and year), and the lookup's key.
    vins      TEXT[]  NOT NULL,
    lookup    TEXT
);
CREATE INDEX call_audit_sent_idx ON call_audit (sent_at);
CREATE INDEX call_audit_job_idx ON call_audit (job_id);
