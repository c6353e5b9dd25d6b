-- vinetl's own state. Applied by `vinetl migrate` (and on start) inside the
-- schema named by VINETL_SCHEMA (default `vinetl`), which the connection puts
-- first on its search_path; nothing here names a schema. apalis keeps its
-- queue tables in its own schema.

-- One row per submitted job.
CREATE TABLE jobs (
    job_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT        NOT NULL,
    -- The job spec as submitted, so a reprocess runs exactly what ran before.
    spec          JSONB       NOT NULL,
    -- Same spec text, same hash: how `submit` finds a job whose planner died.
    spec_hash     TEXT        NOT NULL,
    -- Set in the transaction that creates the batches, so they are made once.
    batches_planned BOOLEAN   NOT NULL DEFAULT false,
    state         TEXT        NOT NULL DEFAULT 'planning'
                  CHECK (state IN ('planning', 'running', 'waiting', 'done', 'failed', 'cancelled')),
    -- Why the job is in its state, in words (`waiting`: quota exhausted, ...).
    state_reason  TEXT,
    -- When a `waiting` job resumes by itself.
    resume_at     TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at   TIMESTAMPTZ,
    -- Call accounting; row counts are derived from job_inputs.
    calls_made    BIGINT      NOT NULL DEFAULT 0,
    calls_retried BIGINT      NOT NULL DEFAULT 0,
    rate_limited  BIGINT      NOT NULL DEFAULT 0,
    recall_calls  BIGINT      NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state_idx ON jobs (state) WHERE state IN ('planning', 'running', 'waiting');

-- One row per input row: where it came from, what it held, what became of it.
-- Exactly one row per input row is the invariant every count is built on.
CREATE TABLE job_inputs (
    job_id      BIGINT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    -- File path, s3:// URI or postgres query label.
    source      TEXT   NOT NULL,
    row_number  BIGINT NOT NULL,
    raw_vin     TEXT   NOT NULL,
    -- The normalised VIN; NULL when the row was rejected.
    vin         TEXT,
    check_digit_valid BOOLEAN,
    -- The input columns the spec carries through to the output, by name.
    carried     JSONB  NOT NULL DEFAULT '{}'::jsonb,
    -- `invalid` (rejected at planning), `duplicate` (an earlier row has the
    -- VIN), `cache_hit` (decoded recently enough) or `call` (the row whose VIN
    -- goes into a batch).
    plan        TEXT   NOT NULL,
    -- `invalid`, `pending`, `decoded` or `failed`: every row ends decoded or
    -- carrying an error.
    status      TEXT   NOT NULL CHECK (status IN ('invalid', 'pending', 'decoded', 'failed')),
    -- Why the row did not decode: a rejection kind (`wrong_length`, ...), the
    -- API's per-VIN code, or `dead_letter`.
    error_code  TEXT,
    error_text  TEXT,
    decoded_at  TIMESTAMPTZ,
    PRIMARY KEY (job_id, source, row_number)
);
CREATE INDEX job_inputs_vin_idx ON job_inputs (job_id, vin);
CREATE INDEX job_inputs_status_idx ON job_inputs (job_id, status);

-- Planning progress per source, so a planner killed halfway resumes at the
-- next unplanned row instead of starting over.
CREATE TABLE job_sources (
    job_id       BIGINT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    source       TEXT   NOT NULL,
    rows_planned BIGINT NOT NULL DEFAULT 0,
    complete     BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, source)
);

-- The unit of work: at most 20 VINs, one batch-decode call. batch_no is
-- assigned deterministically at planning, so enqueueing is idempotent.
CREATE TABLE batches (
    job_id       BIGINT  NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    batch_no     INTEGER NOT NULL,
    vins         TEXT[]  NOT NULL CHECK (cardinality(vins) BETWEEN 1 AND 20),
    state        TEXT    NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'done', 'dead', 'cancelled')),
    -- Failed attempts so far (429s do not count).
    attempts     INTEGER NOT NULL DEFAULT 0,
    -- Bumped at every reschedule; a queue task for an older generation is
    -- stale and does nothing, so a task delivered twice never calls twice.
    generation   INTEGER NOT NULL DEFAULT 0,
    -- The queue holds a task for this generation.
    enqueued     BOOLEAN NOT NULL DEFAULT false,
    -- Next attempt after a retryable failure (exponential backoff with jitter).
    next_run_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error   TEXT,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, batch_no)
);
CREATE INDEX batches_runnable_idx ON batches (next_run_at) WHERE state = 'queued';

-- Latest decode per VIN. It is also the cache: a row younger than the job's
-- TTL costs no API call.
CREATE TABLE vin_cache (
    vin          TEXT PRIMARY KEY,
    decoded_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    make         TEXT,
    model        TEXT,
    model_year   INTEGER,
    -- Per-VIN error the API returned inside a 200 batch; NULL when decoded.
    error_code   TEXT,
    error_text   TEXT,
    -- The API's JSON for this VIN, verbatim.
    raw          JSONB NOT NULL
);
CREATE INDEX vin_cache_decoded_at_idx ON vin_cache (decoded_at);

-- Failures worth keeping: dead-lettered batches, stopped jobs, per-VIN errors.
CREATE TABLE errors (
    error_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id      BIGINT REFERENCES jobs (job_id) ON DELETE CASCADE,
    batch_no    INTEGER,
    vin         TEXT,
    error_code  TEXT NOT NULL,
    error_text  TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX errors_job_idx ON errors (job_id, at);

-- The shared rate limiter, one row per provider account (see limiter.rs):
-- GCRA for rate and burst, a push-back time for 429s, and a daily quota.
-- Every time comes from the database clock, never a worker's.
CREATE TABLE limiter (
    account         TEXT PRIMARY KEY,
    -- Configured requests per second, and calls allowed back to back.
    rate            DOUBLE PRECISION NOT NULL CHECK (rate > 0),
    burst           DOUBLE PRECISION NOT NULL CHECK (burst >= 1),
    -- AIMD factor on the rate: halved by 429s without Retry-After,
    -- recovered a little by every success.
    scale           DOUBLE PRECISION NOT NULL DEFAULT 1 CHECK (scale > 0 AND scale <= 1),
    -- GCRA's theoretical arrival time of the next call.
    tat             TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    -- No grants before this (a 429's Retry-After); only ever moves later.
    blocked_until   TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    daily_quota     BIGINT,
    -- The quota day starts at this offset from UTC midnight.
    quota_reset     INTERVAL NOT NULL DEFAULT '0',
    quota_day_start TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    day_used        BIGINT NOT NULL DEFAULT 0,
    -- Calls in flight at once across every worker (NULL: no cap).
    max_in_flight   INTEGER CHECK (max_in_flight >= 1),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Calls in flight under an account's cap. A worker deletes its row when the
-- call ends; a worker that dies leaves a row that stops counting once its
-- lease expires, so a crash cannot shrink the cap for good.
CREATE TABLE limiter_flights (
    flight_id  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account    TEXT NOT NULL REFERENCES limiter (account) ON DELETE CASCADE,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX limiter_flights_account_idx ON limiter_flights (account, expires_at);

-- Reserves `k` calls for `p_account` in one atomic step (the row lock
-- serialises every worker of every machine; the clock is the database's).
-- Returns how many were granted: all `k` (fewer only when the day's quota
-- has fewer left) or 0, and then how long to wait for all `k` and why:
-- 'rate', 'blocked' (a 429 push-back) or 'quota' (the quota is used up; the
-- wait lasts until it resets). Asking for several calls at once saves round
-- trips; GCRA still admits no more than `burst` calls ahead of schedule.
--
-- Under an in-flight cap, each granted call also gets a flight row (ids
-- returned) held for `lease_secs` at most; reason 'in_flight' means the cap
-- is full.
CREATE FUNCTION limiter_reserve(p_account TEXT, k INTEGER, lease_secs DOUBLE PRECISION DEFAULT 60)
RETURNS TABLE (granted INTEGER, wait_secs DOUBLE PRECISION, reason TEXT, at TIMESTAMPTZ, flights BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    l limiter%ROWTYPE;
    t TIMESTAMPTZ := clock_timestamp();
    em DOUBLE PRECISION;
    day_start TIMESTAMPTZ;
    used BIGINT;
    base TIMESTAMPTZ;
    n BIGINT;
    active BIGINT;
    ids BIGINT[];
BEGIN
    SELECT * INTO l FROM limiter WHERE account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no limiter row for account %', p_account;
    END IF;
    em := 1.0 / (l.rate * l.scale);
    day_start := (date_trunc('day', (t - l.quota_reset) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') + l.quota_reset;
    used := CASE WHEN l.quota_day_start < day_start THEN 0 ELSE l.day_used END;
    IF t < l.blocked_until THEN
        RETURN QUERY SELECT 0, extract(epoch FROM l.blocked_until - t)::float8, 'blocked'::text, t, NULL::bigint[];
        RETURN;
    END IF;
    n := k;
    IF l.daily_quota IS NOT NULL THEN
        n := least(n, l.daily_quota - used);
        IF n < 1 THEN
            UPDATE limiter SET quota_day_start = day_start, day_used = used WHERE account = p_account;
            RETURN QUERY SELECT 0, extract(epoch FROM day_start + interval '1 day' - t)::float8, 'quota'::text, t,
                NULL::bigint[];
            RETURN;
        END IF;
    END IF;
    IF l.max_in_flight IS NOT NULL THEN
        DELETE FROM limiter_flights WHERE account = p_account AND expires_at <= t;
        SELECT count(*) INTO active FROM limiter_flights WHERE account = p_account;
        n := least(n, l.max_in_flight - active);
        IF n < 1 THEN
            -- Calls end in milliseconds to seconds: look again shortly.
            RETURN QUERY SELECT 0, 0.02::float8, 'in_flight'::text, t, NULL::bigint[];
            RETURN;
        END IF;
    END IF;
    -- GCRA: the schedule may run at most `burst` calls ahead of now.
    base := greatest(l.tat, t);
    IF base + make_interval(secs => n * em) > t + make_interval(secs => l.burst * em) THEN
        RETURN QUERY SELECT 0,
            extract(epoch FROM base + make_interval(secs => n * em) - (t + make_interval(secs => l.burst * em)))::float8,
            'rate'::text, t, NULL::bigint[];
        RETURN;
    END IF;
    UPDATE limiter SET tat = base + make_interval(secs => n * em), quota_day_start = day_start,
                       day_used = used + n, updated_at = t
    WHERE account = p_account;
    IF l.max_in_flight IS NOT NULL THEN
        WITH ins AS (
            INSERT INTO limiter_flights (account, expires_at)
            SELECT p_account, t + make_interval(secs => lease_secs) FROM generate_series(1, n)
            RETURNING flight_id)
        SELECT array_agg(flight_id) INTO ids FROM ins;
    END IF;
    RETURN QUERY SELECT n::int, 0::float8, NULL::text, t, ids;
END;
$$;
