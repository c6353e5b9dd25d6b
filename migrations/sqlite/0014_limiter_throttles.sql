-- 429s without Retry-After: see the Postgres migration 0017. `scaled_at`
-- in Unix seconds, as the other times.
ALTER TABLE limiter ADD COLUMN scaled_at REAL;
ALTER TABLE limiter ADD COLUMN throttles INTEGER NOT NULL DEFAULT 0;
-- The circuit's last trip: calls in flight together that all fail to reach
-- the API (or all 5xx) are one outage seen several times, and add one
-- failure to the probe's back-off, not one each.
ALTER TABLE limiter ADD COLUMN circuit_tripped_at REAL;
