-- 429s without Retry-After (src/call/limiter.rs, `push_back`), and the circuit:
-- `scaled_at`: when the rate was last halved; a 429 to a call granted
-- before then was in flight when the rate was cut, and does not cut it
-- again (one cut per window, as TCP's congestion control).
-- `throttles`: such cuts in a row with no success between them; each
-- doubles the push-back (1, 2, 4 … seconds, capped), so an API that ends a
-- day's quota with bare 429s is asked less and less often, not every few
-- seconds. A success sets it back to 0.
ALTER TABLE limiter ADD COLUMN scaled_at TIMESTAMPTZ;
ALTER TABLE limiter ADD COLUMN throttles INTEGER NOT NULL DEFAULT 0;
-- The circuit's last trip: calls in flight together that all fail to reach
-- the API (or all 5xx) are one outage seen several times, and add one
-- failure to the probe's back-off, not one each.
ALTER TABLE limiter ADD COLUMN circuit_tripped_at TIMESTAMPTZ;
