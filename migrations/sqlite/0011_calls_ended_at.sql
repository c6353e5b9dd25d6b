-- When the job's calls ended (see the Postgres migration 0013): kept when
-- `vinetl write` restarts writing. Unix seconds, as the other times.
ALTER TABLE jobs ADD COLUMN calls_ended_at REAL;
