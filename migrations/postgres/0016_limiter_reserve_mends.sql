-- The shared limiter's reservation, three mends (the SQLite store's
-- `Bucket::reserve` has the same):
-- * the clock is read after the row's lock, not before it: a reservation
--   that waited behind another decided at a time earlier than the other's;
-- * a clock earlier than the row's quota day (that wait, or a clock step
--   back) counts in the row's day and never moves it back, which reset the
--   day's count and let the day exceed its quota;
-- * a request is cut to the row's burst. The row holds the settings of the
--   process that registered last, so a process that sized its request by
--   a larger burst was refused for as long as it asked.
CREATE OR REPLACE FUNCTION limiter_reserve(p_account TEXT, k INTEGER, lease_secs DOUBLE PRECISION DEFAULT 60,
                                p_now TIMESTAMPTZ DEFAULT NULL)
RETURNS TABLE (granted INTEGER, wait_secs DOUBLE PRECISION, reason TEXT, at TIMESTAMPTZ, flights BIGINT[])
LANGUAGE plpgsql AS $$
DECLARE
    l limiter%ROWTYPE;
    t TIMESTAMPTZ;
    em DOUBLE PRECISION;
    day_start TIMESTAMPTZ;
    today TIMESTAMPTZ;
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
    -- The clock is read once the row is ours: a reservation that waited
    -- for the lock decides at the time it decides.
    t := coalesce(p_now, clock_timestamp());
    -- Never more than the burst, which GCRA would refuse for as long as it
    -- is asked: the row's burst is the last registration's, not
    -- necessarily the one the caller sized its request by.
    k := least(k, greatest(1, least(floor(l.burst), 2147483647))::integer);
    em := 1.0 / (l.rate * l.scale);
    today := (date_trunc('day', (t - l.quota_reset) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') + l.quota_reset;
    used := CASE WHEN l.quota_day_start < today THEN 0 ELSE l.day_used END;
    -- A clock read earlier than the row's day (a step back) counts in the
    -- row's day and never moves it back: the next reservation would take
    -- the day for a new one and reset its count. (The wait for the quota
    -- still runs to the end of today, which a changed reset time may place
    -- before the row's day ends.)
    day_start := greatest(today, l.quota_day_start);
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
            RETURN QUERY SELECT 0, extract(epoch FROM today + interval '1 day' - t)::float8, 'quota'::text, t,
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
