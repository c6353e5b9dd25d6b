-- Recall lookups (one per make/model/year, or per VIN) and output writing.

-- A job whose calls are all done writes its outputs in state `writing`
-- before it is `done`; `updated_at` is the writer's heartbeat, so a writer
-- that died is replaced.
ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('planning', 'running', 'waiting', 'writing', 'done', 'failed', 'cancelled'));
-- Set in the transaction that creates the job's recall lookups, once decoding is over.
ALTER TABLE jobs ADD COLUMN recalls_planned BOOLEAN NOT NULL DEFAULT false;
-- Recall lookups the job needed, and how many of them the cache answered.
ALTER TABLE jobs ADD COLUMN recall_lookups BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN recall_cache_hits BIGINT NOT NULL DEFAULT 0;
-- Where the outputs went, once written (one line per output).
ALTER TABLE jobs ADD COLUMN outputs_written TEXT[];
DROP INDEX jobs_state_idx;
CREATE INDEX jobs_state_idx ON jobs (state) WHERE state IN ('planning', 'running', 'waiting', 'writing');

-- A batch is a batch-decode call of up to 20 VINs, or one recall lookup
-- (`vins` then holds one VIN of the vehicles it covers).
ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'decode' CHECK (kind IN ('decode', 'recall'));
ALTER TABLE batches ADD COLUMN lookup_key TEXT;
ALTER TABLE batches ADD CONSTRAINT batches_lookup_check CHECK ((kind = 'recall') = (lookup_key IS NOT NULL));

-- One row per recall lookup ever made: by make/model/year (`mmy:MAKE|MODEL|YEAR`,
-- upper case) or by VIN (`vin:VIN`). It is also the recall cache.
CREATE TABLE recall_lookups (
    lookup_key   TEXT PRIMARY KEY,
    make         TEXT,
    model        TEXT,
    model_year   INTEGER,
    vin          TEXT,
    -- Last successful lookup; NULL if it never succeeded.
    looked_up_at TIMESTAMPTZ,
    campaigns    INTEGER,
    -- The last lookup failed for good (dead-lettered): recalls are unknown.
    error_text   TEXT,
    failed_at    TIMESTAMPTZ
);
CREATE INDEX recall_lookups_looked_up_at_idx ON recall_lookups (looked_up_at);

-- Every campaign seen, refreshed by every lookup that returns it.
CREATE TABLE recalls (
    campaign_number      TEXT PRIMARY KEY,
    manufacturer         TEXT NOT NULL,
    component            TEXT NOT NULL,
    summary              TEXT NOT NULL,
    consequence          TEXT NOT NULL,
    remedy               TEXT NOT NULL,
    notes                TEXT,
    -- NHTSA's ReportReceivedDate (DD/MM/YYYY on the wire).
    report_received_date DATE,
    park_it              BOOLEAN NOT NULL,
    park_outside         BOOLEAN NOT NULL,
    over_the_air_update  BOOLEAN,
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Which campaigns a lookup returned: the link between vehicles (by
-- make/model/year or VIN) and campaigns. Replaced by every fresh lookup.
CREATE TABLE recall_lookup_campaigns (
    lookup_key      TEXT NOT NULL REFERENCES recall_lookups (lookup_key) ON DELETE CASCADE,
    campaign_number TEXT NOT NULL REFERENCES recalls (campaign_number),
    PRIMARY KEY (lookup_key, campaign_number)
);
CREATE INDEX recall_lookup_campaigns_campaign_idx ON recall_lookup_campaigns (campaign_number);

-- The key a decoded VIN's recalls are looked up under, by make/model/year.
CREATE FUNCTION recall_key(p_make TEXT, p_model TEXT, p_year INTEGER) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN nullif(trim(p_make), '') IS NULL OR nullif(trim(p_model), '') IS NULL OR p_year IS NULL
                THEN NULL
                ELSE 'mmy:' || upper(trim(p_make)) || '|' || upper(trim(p_model)) || '|' || p_year END
$$;

-- Every cached VIN with the campaigns of its make/model/year or, where a
-- by-VIN lookup exists, of the VIN.
CREATE VIEW vehicle_recalls AS
SELECT c.vin, l.lookup_key, lc.campaign_number
FROM vin_cache c
JOIN recall_lookups l
  ON l.lookup_key = coalesce(
         (SELECT v.lookup_key FROM recall_lookups v WHERE v.lookup_key = 'vin:' || c.vin AND v.looked_up_at IS NOT NULL),
         recall_key(c.make, c.model, c.model_year))
JOIN recall_lookup_campaigns lc ON lc.lookup_key = l.lookup_key;

-- Recall figures of a finished job, computed once when its calls are done.
ALTER TABLE jobs ADD COLUMN rows_with_recalls BIGINT;
ALTER TABLE jobs ADD COLUMN rows_recalls_unknown BIGINT;
ALTER TABLE jobs ADD COLUMN campaigns_found BIGINT;
