-- The circuit breaker, an injectable clock for the limiter, and job phase times.

-- A circuit breaker per account, in the shared limiter: connection refused,
-- DNS or TLS failures, or a run of 5xx answers (or timeouts) open it; while
-- it is open no worker calls, except one probe at a time with growing
-- back-off; any HTTP answer that is not a 5xx closes it (see limiter.rs).
ALTER TABLE limiter ADD COLUMN circuit_since TIMESTAMPTZ;
ALTER TABLE limiter ADD COLUMN circuit_probe_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity';
ALTER TABLE limiter ADD COLUMN circuit_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE limiter ADD COLUMN circuit_reason TEXT;
-- 5xx answers (and timeouts) in a row, across every worker of the account.
ALTER TABLE limiter ADD COLUMN server_errors INTEGER NOT NULL DEFAULT 0;

-- The limiter's clock can be passed in, so the property tests drive the
-- function that runs in production with synthetic times (production passes
-- nothing: the database clock). Otherwise 0001's arithmetic, plus the circuit.
DROP FUNCTION limiter_reserve(TEXT, INTEGER, DOUBLE PRECISION);
CREATE FUNCTION limiter_reserve(p_account TEXT, k INTEGER, lease_secs DOUBLE PRECISION DEFAULT 60,
                                p_now TIMESTAMPTZ DEFAULT NULL)
RETURNS TABLE (granted INTEGER, wait_secs DOUBLE PRECISION, reason TEXT, at TIMESTAMPTZ, flights BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    l limiter%ROWTYPE;
    t TIMESTAMPTZ := coalesce(p_now, clock_timestamp());
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
    -- The API is unreachable: nobody calls until the next probe is due, and
    -- then one caller alone makes it (its grant moves the next probe on).
    IF l.circuit_since IS NOT NULL THEN
        IF t < l.circuit_probe_at THEN
            RETURN QUERY SELECT 0, extract(epoch FROM l.circuit_probe_at - t)::float8, 'circuit'::text, t,
                NULL::bigint[];
            RETURN;
        END IF;
        k := 1;
    END IF;
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
                       day_used = used + n, updated_at = t,
                       circuit_probe_at = CASE WHEN l.circuit_since IS NULL THEN l.circuit_probe_at
                                               ELSE t + make_interval(secs => lease_secs) END
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

-- When the job's current run started (its submission, or its latest
-- reprocess) and when each phase ended, for `status` and the benchmarks:
-- planning (every row stored and batched), and the start of writing the
-- outputs (`finished_at` already marks the end).
ALTER TABLE jobs ADD COLUMN started_at TIMESTAMPTZ;
UPDATE jobs SET started_at = created_at;
ALTER TABLE jobs ALTER COLUMN started_at SET DEFAULT now();
ALTER TABLE jobs ALTER COLUMN started_at SET NOT NULL;
ALTER TABLE jobs ADD COLUMN planned_at TIMESTAMPTZ;
ALTER TABLE jobs ADD COLUMN write_started_at TIMESTAMPTZ;
