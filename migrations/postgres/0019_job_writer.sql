-- The process writing a job's outputs: a token it sets when it takes the
-- write (src/store/core.rs, `take_write` and `orphaned_write`) and shows on
-- every heartbeat and at the end. A writer whose lease ran out and whose
-- job another took over finds its token gone at its next beat and stops,
-- and cannot end the job in place of the one writing it now.
ALTER TABLE jobs ADD COLUMN writer TEXT;
