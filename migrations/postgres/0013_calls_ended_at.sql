-- When the job's calls ended: it moved on to writing its outputs, or with
-- none, to done. `vinetl write` restarts writing (write_started_at) and
-- keeps this, so `status` does not count the days a job sat written as
-- time spent calling. Null for a job run before this column: its calls are
-- taken to end when it started writing, as before.
ALTER TABLE jobs ADD COLUMN calls_ended_at TIMESTAMPTZ;
