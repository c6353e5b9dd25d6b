//! Postgres connection and migrations for the runner's schema.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{StoreError, check_schema, redact};

/// The runner's migrations, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long to wait for Postgres before telling the user it is unreachable:
/// long enough for a busy server, short enough to fail fast on a wrong URL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects with `schema` first on the search path. Fails fast, naming the
/// (redacted) URL, when the server cannot be reached.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let schema = check_schema(schema)?;
    let shown = redact(url);
    let connect_err = |source| StoreError::Connect { url: shown.clone(), source };
    let options = PgConnectOptions::from_str(url)
        .map_err(connect_err)?
        // `public` stays on the path for the extensions apalis installs there.
        .options([("search_path", format!("{schema}, public"))])
        .application_name("vinetl");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(connect_err)
}

/// Opens the state store: connects, migrates vinetl's schema and creates
/// the queue's tables. Every command that touches state starts here.
pub async fn open(url: &str, schema: &str, max_connections: u32) -> Result<PgStore, StoreError> {
    let pool = connect(url, schema, max_connections).await?;
    migrate(&pool, schema).await?;
    // apalis's migrations install extensions: run them on a connection with
    // the default search path, so the extensions land in `public` where
    // every vinetl schema finds them.
    let shown = redact(url);
    let plain = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|source| StoreError::Connect { url: shown, source })?;
    crate::queue::setup(&plain).await?;
    plain.close().await;
    Ok(PgStore::new(pool))
}

/// Creates the schema if needed and applies pending migrations. Safe to run
/// from many processes at once: sqlx serialises migrations with an advisory
/// lock, and a concurrent CREATE SCHEMA is tolerated.
pub async fn migrate(pool: &PgPool, schema: &str) -> Result<(), StoreError> {
    let schema = check_schema(schema)?;
    if let Err(e) =
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))).execute(pool).await
    {
        // Two processes racing on IF NOT EXISTS: one of them gets 23505/42P06.
        let raced = e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "23505" || c == "42P06");
        if !raced {
            return Err(e.into());
        }
    }
    MIGRATOR.run(pool).await.map_err(|source| StoreError::Migrate { schema: schema.to_string(), source })
}

/// The runner's state in Postgres: every SQL statement the runner sends
/// about jobs, inputs, batches and the cache lives here.
#[derive(Clone, Debug)]
pub struct PgStore {
    pub pool: PgPool,
}

/// One input row as the planner stores it.
#[derive(Debug, Clone)]
pub struct PlannedRow {
    pub source: String,
    pub row_number: i64,
    pub raw_vin: String,
    pub vin: Option<String>,
    pub check_digit_valid: Option<bool>,
    pub error_code: Option<&'static str>,
    pub error_text: Option<String>,
    pub carried: serde_json::Value,
}

/// A batch claimed by a worker.
#[derive(Debug, Clone)]
pub struct ClaimedBatch {
    pub vins: Vec<String>,
    pub attempts: i32,
}

/// Why a batch goes back on the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reschedule {
    /// The call failed in a retryable way: one attempt used.
    Failed,
    /// The call got a 429: no attempt used.
    RateLimited,
    /// No call was made (the limiter said wait).
    NotCalled,
}

/// One decoded VIN to store.
#[derive(Debug, Clone)]
pub struct DecodedVin {
    pub vin: String,
    pub make: Option<String>,
    pub model: Option<String>,
    pub model_year: Option<i32>,
    /// A per-VIN error inside a 200 answer.
    pub error: Option<(String, String)>,
    pub raw: serde_json::Value,
}

/// The counts `status` shows.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct JobCounts {
    pub job_id: i64,
    pub name: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub rows: i64,
    pub valid: i64,
    pub invalid: std::collections::BTreeMap<String, i64>,
    pub duplicates: i64,
    pub cache_hits: i64,
    pub decoded: i64,
    pub failed: i64,
    pub pending: i64,
    pub batches: i64,
    pub batches_done: i64,
    pub dead_lettered_batches: i64,
    pub dead_lettered_vins: i64,
    pub calls_made: i64,
    pub calls_retried: i64,
    pub rate_limited: i64,
}

impl PgStore {
    pub fn new(pool: PgPool) -> PgStore {
        PgStore { pool }
    }

    /// An unfinished job with this spec (its planner died, or it is still
    /// running), to resume instead of starting a second copy that would pay
    /// for the same calls again.
    pub async fn resumable_job(&self, spec_hash: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT job_id FROM jobs WHERE spec_hash = $1 AND state IN ('planning', 'running', 'waiting')
             ORDER BY job_id DESC LIMIT 1",
        )
        .bind(spec_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn create_job(&self, name: &str, spec: &serde_json::Value, spec_hash: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("INSERT INTO jobs (name, spec, spec_hash) VALUES ($1, $2, $3) RETURNING job_id")
            .bind(name)
            .bind(spec)
            .bind(spec_hash)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Holds a session-level advisory lock on the job while planning, so two
    /// planners never plan one job at once. Returns the connection holding it.
    pub async fn lock_planning(
        &self,
        job_id: i64,
    ) -> Result<Option<sqlx::pool::PoolConnection<sqlx::Postgres>>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        // Key space: (hash of this schema's name, job id): installs sharing a
        // database have their own job ids.
        let got: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext(current_schema() || ':plan'), $1::int)")
                .bind(job_id as i32)
                .fetch_one(&mut *conn)
                .await?;
        Ok(got.then_some(conn))
    }

    /// Rows of `source` already stored for the job (planning resumes after them).
    pub async fn rows_planned(&self, job_id: i64, source: &str) -> Result<(i64, bool), StoreError> {
        let row: Option<(i64, bool)> =
            sqlx::query_as("SELECT rows_planned, complete FROM job_sources WHERE job_id = $1 AND source = $2")
                .bind(job_id)
                .bind(source)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.unwrap_or((0, false)))
    }

    /// Stores a chunk of input rows and the source's progress in one
    /// transaction, with one UNNEST insert. Re-inserting rows after a crash
    /// is a no-op.
    pub async fn insert_rows(
        &self,
        job_id: i64,
        source: &str,
        rows: &[PlannedRow],
        complete: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if !rows.is_empty() {
            let col = |f: &dyn Fn(&PlannedRow) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
            sqlx::query(
                "INSERT INTO job_inputs (job_id, source, row_number, raw_vin, vin, check_digit_valid, error_code, error_text,
                                         carried, plan, status)
                 SELECT $1, $2, r.n, r.raw, r.vin, r.cdv, r.code, r.text, r.carried,
                        CASE WHEN r.vin IS NULL THEN 'invalid' ELSE 'call' END,
                        CASE WHEN r.vin IS NULL THEN 'invalid' ELSE 'pending' END
                 FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::bool[], $7::text[], $8::text[], $9::jsonb[])
                      AS r(n, raw, vin, cdv, code, text, carried)
                 ON CONFLICT (job_id, source, row_number) DO NOTHING",
            )
            .bind(job_id)
            .bind(source)
            .bind(rows.iter().map(|r| r.row_number).collect::<Vec<_>>())
            .bind(col(&|r| Some(r.raw_vin.clone())))
            .bind(col(&|r| r.vin.clone()))
            .bind(rows.iter().map(|r| r.check_digit_valid).collect::<Vec<_>>())
            .bind(col(&|r| r.error_code.map(str::to_string)))
            .bind(col(&|r| r.error_text.clone()))
            .bind(rows.iter().map(|r| r.carried.clone()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        let last = rows.last().map(|r| r.row_number).unwrap_or(0);
        sqlx::query(
            "INSERT INTO job_sources (job_id, source, rows_planned, complete) VALUES ($1, $2, $3, $4)
             ON CONFLICT (job_id, source) DO UPDATE
             SET rows_planned = GREATEST(job_sources.rows_planned, EXCLUDED.rows_planned), complete = EXCLUDED.complete",
        )
        .bind(job_id)
        .bind(source)
        .bind(last)
        .bind(complete)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Decides every valid row's plan (first occurrence, duplicate, cache
    /// hit) and creates the batches, all in one transaction, once per job.
    /// Batch membership is a pure function of the job's VINs (sorted, then
    /// cut every `batch_size`), so it never depends on timing.
    pub async fn plan_batches(&self, job_id: i64, batch_size: i32, cache_ttl_hours: f64) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let planned: bool = sqlx::query_scalar("SELECT batches_planned FROM jobs WHERE job_id = $1 FOR UPDATE")
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
        if planned {
            tx.rollback().await?;
            return Ok(0);
        }
        // The first row of each VIN (by source, row) is the one that calls;
        // later rows of the same VIN are duplicates and share its result.
        sqlx::query(
            "UPDATE job_inputs ji SET plan = 'duplicate'
             WHERE ji.job_id = $1 AND ji.vin IS NOT NULL AND EXISTS (
                 SELECT 1 FROM job_inputs e WHERE e.job_id = ji.job_id AND e.vin = ji.vin
                   AND (e.source, e.row_number) < (ji.source, ji.row_number))",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        // Fresh cache entries cost no call: those VINs are decoded already.
        sqlx::query(
            "UPDATE job_inputs ji SET
                 plan = CASE WHEN ji.plan = 'call' THEN 'cache_hit' ELSE ji.plan END,
                 status = CASE WHEN c.error_code IS NULL THEN 'decoded' ELSE 'failed' END,
                 error_code = c.error_code, error_text = c.error_text, decoded_at = c.decoded_at
             FROM vin_cache c
             WHERE ji.job_id = $1 AND c.vin = ji.vin
               AND c.decoded_at > now() - make_interval(secs => $2 * 3600)",
        )
        .bind(job_id)
        .bind(cache_ttl_hours)
        .execute(&mut *tx)
        .await?;
        let batches = sqlx::query(
            "INSERT INTO batches (job_id, batch_no, vins)
             SELECT $1, (n - 1) / $2, array_agg(vin ORDER BY vin)
             FROM (SELECT vin, row_number() OVER (ORDER BY vin) AS n
                   FROM job_inputs WHERE job_id = $1 AND plan = 'call') v
             GROUP BY (n - 1) / $2",
        )
        .bind(job_id)
        .bind(batch_size)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE jobs SET batches_planned = true, updated_at = now() WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(batches as i64)
    }

    /// Batches whose current generation has no queue task yet.
    pub async fn unenqueued(&self, job_id: i64) -> Result<Vec<(i32, i32)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT batch_no, generation FROM batches WHERE job_id = $1 AND state = 'queued' AND NOT enqueued ORDER BY batch_no",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn mark_enqueued(&self, job_id: i64, batch_generations: &[(i32, i32)]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches b SET enqueued = true FROM UNNEST($2::int[], $3::int[]) AS x(no, generation)
             WHERE b.job_id = $1 AND b.batch_no = x.no AND b.generation = x.generation",
        )
        .bind(job_id)
        .bind(batch_generations.iter().map(|b| b.0).collect::<Vec<_>>())
        .bind(batch_generations.iter().map(|b| b.1).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Takes a batch for one call. Only the task of the batch's current
    /// generation may, and only when the batch is queued, or running but
    /// abandoned for longer than `lease_secs` (its worker died mid-call).
    pub async fn claim(
        &self,
        job_id: i64,
        batch_no: i32,
        generation: i32,
        lease_secs: f64,
    ) -> Result<Option<ClaimedBatch>, StoreError> {
        let row: Option<(Vec<String>, i32)> = sqlx::query_as(
            "UPDATE batches b SET state = 'running', updated_at = now()
             FROM jobs j
             WHERE b.job_id = $1 AND b.batch_no = $2 AND b.generation = $3 AND j.job_id = b.job_id
               AND j.state IN ('planning', 'running', 'waiting') AND j.batches_planned
               AND (b.state = 'queued' OR (b.state = 'running' AND b.updated_at < now() - make_interval(secs => $4)))
             RETURNING b.vins, b.attempts",
        )
        .bind(job_id)
        .bind(batch_no)
        .bind(generation)
        .bind(lease_secs)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(vins, attempts)| ClaimedBatch { vins, attempts }))
    }

    /// Stores a 200 answer: the cache (latest decode per VIN), every input row
    /// of those VINs in this job (duplicates included), the batch and the call
    /// count, in one transaction with batched statements.
    pub async fn complete(&self, job_id: i64, batch_no: i32, decoded: &[DecodedVin]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let s = |f: &dyn Fn(&DecodedVin) -> Option<String>| decoded.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO vin_cache (vin, decoded_at, make, model, model_year, error_code, error_text, raw)
             SELECT vin, now(), make, model, year, code, text, raw
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[], $7::jsonb[])
                  AS x(vin, make, model, year, code, text, raw)
             ON CONFLICT (vin) DO UPDATE SET decoded_at = now(), make = EXCLUDED.make, model = EXCLUDED.model,
                 model_year = EXCLUDED.model_year, error_code = EXCLUDED.error_code,
                 error_text = EXCLUDED.error_text, raw = EXCLUDED.raw",
        )
        .bind(s(&|d| Some(d.vin.clone())))
        .bind(s(&|d| d.make.clone()))
        .bind(s(&|d| d.model.clone()))
        .bind(decoded.iter().map(|d| d.model_year).collect::<Vec<_>>())
        .bind(s(&|d| d.error.as_ref().map(|e| e.0.clone())))
        .bind(s(&|d| d.error.as_ref().map(|e| e.1.clone())))
        .bind(decoded.iter().map(|d| d.raw.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_inputs ji SET status = CASE WHEN c.error_code IS NULL THEN 'decoded' ELSE 'failed' END,
                 error_code = c.error_code, error_text = c.error_text, decoded_at = c.decoded_at
             FROM vin_cache c
             WHERE ji.job_id = $1 AND ji.vin = ANY($2) AND c.vin = ji.vin AND ji.status = 'pending'",
        )
        .bind(job_id)
        .bind(s(&|d| Some(d.vin.clone())))
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE batches SET state = 'done', updated_at = now() WHERE job_id = $1 AND batch_no = $2")
            .bind(job_id)
            .bind(batch_no)
            .execute(&mut *tx)
            .await?;
        // A completed call also ends a quota wait.
        sqlx::query(
            "UPDATE jobs SET calls_made = calls_made + 1, updated_at = now(),
                 state_reason = CASE WHEN state = 'waiting' THEN NULL ELSE state_reason END,
                 resume_at = CASE WHEN state = 'waiting' THEN NULL ELSE resume_at END,
                 state = CASE WHEN state = 'waiting' THEN 'running' ELSE state END
             WHERE job_id = $1",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The quota is used up: the job waits, saying until when, in words.
    pub async fn set_waiting(&self, job_id: i64, resume_in_secs: f64, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET state = 'waiting', state_reason = $3,
                 resume_at = now() + make_interval(secs => $2), updated_at = now()
             WHERE job_id = $1 AND state IN ('running', 'waiting')",
        )
        .bind(job_id)
        .bind(resume_in_secs)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Schedules the batch again: bumps the generation (so a duplicate task
    /// of the old one is stale) and counts what happened. Returns the new
    /// generation.
    pub async fn reschedule(
        &self,
        job_id: i64,
        batch_no: i32,
        delay_secs: f64,
        kind: Reschedule,
        error: &str,
    ) -> Result<i32, StoreError> {
        let count_attempt = kind == Reschedule::Failed;
        let called = kind != Reschedule::NotCalled;
        let mut tx = self.pool.begin().await?;
        let generation: i32 = sqlx::query_scalar(
            "UPDATE batches SET state = 'queued', enqueued = false, generation = generation + 1,
                 attempts = attempts + CASE WHEN $3 THEN 1 ELSE 0 END,
                 next_run_at = now() + make_interval(secs => $4), last_error = $5, updated_at = now()
             WHERE job_id = $1 AND batch_no = $2 RETURNING generation",
        )
        .bind(job_id)
        .bind(batch_no)
        .bind(count_attempt)
        .bind(delay_secs)
        .bind(error)
        .fetch_one(&mut *tx)
        .await?;
        if called {
            sqlx::query(
                "UPDATE jobs SET calls_made = calls_made + 1,
                     calls_retried = calls_retried + CASE WHEN $2 THEN 1 ELSE 0 END,
                     rate_limited = rate_limited + CASE WHEN $2 THEN 0 ELSE 1 END, updated_at = now()
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(count_attempt)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(generation)
    }

    /// When the batch's next attempt may run (Unix seconds, database clock).
    pub async fn next_run_at(&self, job_id: i64, batch_no: i32) -> Result<f64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT extract(epoch FROM next_run_at)::float8 FROM batches WHERE job_id = $1 AND batch_no = $2",
        )
        .bind(job_id)
        .bind(batch_no)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Gives up on a batch: its rows end `failed` with the last error, and the
    /// error is kept in `errors`.
    pub async fn dead_letter(&self, job_id: i64, batch_no: i32, error: &str, called: bool) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let vins: Vec<String> = sqlx::query_scalar(
            "UPDATE batches SET state = 'dead', last_error = $3, updated_at = now()
             WHERE job_id = $1 AND batch_no = $2 RETURNING unnest(vins)",
        )
        .bind(job_id)
        .bind(batch_no)
        .bind(error)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_inputs SET status = 'failed', error_code = 'dead_letter', error_text = $3
             WHERE job_id = $1 AND vin = ANY($2) AND status = 'pending'",
        )
        .bind(job_id)
        .bind(&vins)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO errors (job_id, batch_no, error_code, error_text) VALUES ($1, $2, 'dead_letter', $3)")
            .bind(job_id)
            .bind(batch_no)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        if called {
            sqlx::query("UPDATE jobs SET calls_made = calls_made + 1 WHERE job_id = $1")
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stops a job for good (a rejected key): no batch of it runs again, and
    /// its pending rows end `failed` with the reason.
    pub async fn fail_job(&self, job_id: i64, reason: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET state = 'failed', state_reason = $2, finished_at = now(), updated_at = now()
             WHERE job_id = $1 AND state NOT IN ('done', 'failed', 'cancelled')",
        )
        .bind(job_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE batches SET state = 'dead', last_error = $2 WHERE job_id = $1 AND state IN ('queued', 'running')",
        )
        .bind(job_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE job_inputs SET status = 'failed', error_code = 'job_failed', error_text = $2 WHERE job_id = $1 AND status = 'pending'")
            .bind(job_id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO errors (job_id, error_code, error_text) VALUES ($1, 'job_failed', $2)")
            .bind(job_id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Planning is over: workers may finish the job from now on.
    pub async fn mark_running(&self, job_id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET state = 'running', updated_at = now() WHERE job_id = $1 AND state = 'planning'")
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Cancels an unfinished job: queued batches are dropped (calls already in
    /// flight finish and are stored), and rows still pending end `failed`
    /// with the reason. Returns false if the job had already ended.
    pub async fn cancel_job(&self, job_id: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', state_reason = 'cancelled by an operator', finished_at = now(),
                 updated_at = now()
             WHERE job_id = $1 AND state IN ('planning', 'running', 'waiting')",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE batches SET state = 'cancelled', updated_at = now() WHERE job_id = $1 AND state = 'queued'",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_inputs SET status = 'failed', error_code = 'cancelled', error_text = 'the job was cancelled'
             WHERE job_id = $1 AND status = 'pending'
               AND vin NOT IN (SELECT unnest(vins) FROM batches WHERE job_id = $1 AND state = 'running')",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Marks the job done once no batch is left to run.
    pub async fn finish_if_complete(&self, job_id: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'done', finished_at = now(), updated_at = now(), state_reason = NULL
             WHERE job_id = $1 AND state IN ('running', 'waiting') AND batches_planned
               AND NOT EXISTS (SELECT 1 FROM batches WHERE job_id = $1 AND state IN ('queued', 'running'))",
        )
        .bind(job_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done > 0)
    }

    pub async fn job_state(&self, job_id: i64) -> Result<Option<(String, Option<String>)>, StoreError> {
        Ok(sqlx::query_as("SELECT state, state_reason FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn recent_jobs(&self, limit: i64) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT job_id FROM jobs ORDER BY job_id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Every count `status` shows, from one snapshot.
    pub async fn counts(&self, job_id: i64) -> Result<Option<JobCounts>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
        let Some((name, state, state_reason, calls_made, calls_retried, rate_limited)) =
            sqlx::query_as::<_, (String, String, Option<String>, i64, i64, i64)>(
                "SELECT name, state, state_reason, calls_made, calls_retried, rate_limited FROM jobs WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let (rows, valid, duplicates, cache_hits, decoded, failed, pending): (i64, i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT count(*), count(vin), count(*) FILTER (WHERE plan = 'duplicate'),
                    count(*) FILTER (WHERE plan = 'cache_hit'), count(*) FILTER (WHERE status = 'decoded'),
                    count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'pending')
             FROM job_inputs WHERE job_id = $1",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
        let invalid: Vec<(String, i64)> = sqlx::query_as(
            "SELECT error_code, count(*) FROM job_inputs WHERE job_id = $1 AND status = 'invalid' GROUP BY 1 ORDER BY 1",
        )
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        let (batches, batches_done, dead, dead_vins): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'dead'),
                    coalesce(sum(cardinality(vins)) FILTER (WHERE state = 'dead'), 0)::bigint
             FROM batches WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(JobCounts {
            job_id,
            name,
            state,
            state_reason,
            rows,
            valid,
            invalid: invalid.into_iter().collect(),
            duplicates,
            cache_hits,
            decoded,
            failed,
            pending,
            batches,
            batches_done,
            dead_lettered_batches: dead,
            dead_lettered_vins: dead_vins,
            calls_made,
            calls_retried,
            rate_limited,
        }))
    }
}
