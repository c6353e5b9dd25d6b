-- A random name for this install (this schema, as created). Queue tasks
-- carry it in their idempotency key, beside job, batch and generation.
-- The queue's tables live outside the schema (apalis's own), so a schema
-- dropped and created again numbers its jobs from 1 while the old tasks
-- stay: without this, job 1's tasks were refused as duplicates of the old
-- install's finished ones and the new job waited forever.
CREATE TABLE install (id text NOT NULL);
INSERT INTO install (id) VALUES (gen_random_uuid()::text);
