-- Honest call accounting: every request that reached the API is counted by
-- how it ended, and a call whose answer never came back (its worker died
-- mid-call) is counted too, since it used quota all the same.
--
-- `in_call` is set just before a batch's request goes out and cleared by
-- the statement that stores its outcome. A batch still `in_call` when its
-- next call begins lost the previous answer (`calls_lost`); one `in_call`
-- that is no longer running lost it too (status counts both).
ALTER TABLE batches ADD COLUMN in_call BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE batches ADD COLUMN calls_lost INTEGER NOT NULL DEFAULT 0;

-- Outcomes, apart from `calls_made` (every call whose outcome was stored)
-- and `rate_limited` (429s, since 0001). The rest of `calls_made` is other
-- errors: a refused key, a 4xx, a malformed or cut-short answer.
ALTER TABLE jobs ADD COLUMN calls_answered BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN calls_server_error BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN calls_timed_out BIGINT NOT NULL DEFAULT 0;
-- Jobs before this migration answered every call they counted but 429s
-- and retries (their 5xx and timeouts were not told apart).
UPDATE jobs SET calls_answered = greatest(0, calls_made - rate_limited - calls_retried);

-- `vinetl pause`: no batch of a job paused since then is claimed. The job
-- keeps its state (planning, running, waiting) under the pause, which
-- `status` shows as `paused`; `vinetl resume` clears it.
ALTER TABLE jobs ADD COLUMN paused_at TIMESTAMPTZ;
