-- The process writing a job's outputs: see the Postgres migration 0019.
ALTER TABLE jobs ADD COLUMN writer TEXT;
