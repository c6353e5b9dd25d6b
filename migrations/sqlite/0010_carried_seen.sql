-- The JSON types each carried column has held in a source's stored rows,
-- and whether its numbers were all integers (see the Postgres migration
-- 0011): the output reads its Parquet types from here. NULL for a source
-- planned before this column: the output scans its rows as before.
ALTER TABLE job_sources ADD COLUMN carried_seen TEXT;
