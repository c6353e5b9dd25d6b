-- The (job_id, status) index goes, as on Postgres (its migration 0009 says
-- what it cost there). Every statement that settles rows (a stored answer,
-- a dead letter) names its VINs and so takes (job_id, vin); with this
-- index there a planner may read all of the job's pending rows instead.
-- The statements that read a job's rows by status (counts, batch cutting,
-- fail, cancel) run once per job and read its rows by job_id either way.
-- And every input row costs one index insertion less.
DROP INDEX IF EXISTS job_inputs_status_idx;
