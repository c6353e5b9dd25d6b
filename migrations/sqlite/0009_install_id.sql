-- A random name for this install (this state file, as created). Queue
-- tasks carry it in their idempotency key, beside job, batch and
-- generation. The queue lives in a file of its own, so a state file
-- deleted and created again numbers its jobs from 1 while the old tasks
-- stay: without this, job 1's tasks were skipped as duplicates of the old
-- install's finished ones and the new job waited forever.
CREATE TABLE install (id TEXT NOT NULL);
INSERT INTO install (id) VALUES (lower(hex(randomblob(16))));
