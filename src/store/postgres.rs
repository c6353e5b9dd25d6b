//! Postgres connection and migrations for the runner's schema.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{
    ClaimedBatch, DecodedVin, JobCounts, JobHead, Lookup, Next, PlannedRow, RecallRow, Reschedule, StoreError,
    check_schema, redact,
};

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
    let connect_err = |source| StoreError::Connect { url: shown.clone(), error: source };
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
pub async fn open(url: &str, schema: &str, max_connections: u32) -> Result<super::Store, StoreError> {
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
        .map_err(|source| StoreError::Connect { url: shown, error: source })?;
    crate::queue::setup(&plain).await?;
    plain.close().await;
    Ok(super::Store::Pg(PgStore::new(pool)))
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

/// Ends a planning lock (session advisory locks outlive the borrow of a
/// pooled connection, so it is released explicitly).
pub async fn unlock_planning(mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *conn).await?;
    Ok(())
}

/// The runner's state in Postgres: every SQL statement the runner sends
/// about jobs, inputs, batches and the cache lives here.
#[derive(Clone, Debug)]
pub struct PgStore {
    pub pool: PgPool,
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

    /// Batches whose queue task was lost: claimed by a worker that died
    /// mid-call (taken back after the lease), or rescheduled but never pushed.
    pub async fn lost_tasks(&self) -> Result<Vec<(i64, i32, i32)>, StoreError> {
        let mut lost: Vec<(i64, i32, i32)> = sqlx::query_as(
            "UPDATE batches b SET state = 'queued', enqueued = false, generation = generation + 1, updated_at = now()
             FROM jobs j
             WHERE j.job_id = b.job_id AND j.state IN ('running', 'waiting')
               AND b.state = 'running'
               AND b.updated_at < now() - make_interval(secs => 2 * ((j.spec->'provider'->>'timeout_secs')::float8) + 30)
             RETURNING b.job_id, b.batch_no, b.generation",
        )
        .fetch_all(&self.pool)
        .await?;
        let unpushed: Vec<(i64, i32, i32)> = sqlx::query_as(
            "SELECT b.job_id, b.batch_no, b.generation FROM batches b JOIN jobs j USING (job_id)
             WHERE j.state IN ('running', 'waiting') AND b.state = 'queued' AND NOT b.enqueued
               AND b.updated_at < now() - interval '10 seconds'",
        )
        .fetch_all(&self.pool)
        .await?;
        lost.extend(unpushed);
        Ok(lost)
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

    pub async fn cached_count(&self, vins: &[String], cache_ttl_hours: f64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM vin_cache WHERE vin = ANY($1) AND decoded_at > now() - make_interval(secs => $2 * 3600)",
        )
        .bind(vins)
        .bind(cache_ttl_hours)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn total_rows(&self, job_id: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(coalesce(sum(rows_planned), 0) AS BIGINT) FROM job_sources WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?)
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
        let batches = batch_pending(&mut tx, job_id, batch_size).await?;
        sqlx::query("UPDATE jobs SET batches_planned = true, updated_at = now() WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(batches)
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
        let row: Option<(Vec<String>, i32, Option<String>)> = sqlx::query_as(
            "UPDATE batches b SET state = 'running', updated_at = now()
             FROM jobs j
             WHERE b.job_id = $1 AND b.batch_no = $2 AND b.generation = $3 AND j.job_id = b.job_id
               AND j.state IN ('planning', 'running', 'waiting') AND j.batches_planned
               AND (b.state = 'queued' OR (b.state = 'running' AND b.updated_at < now() - make_interval(secs => $4)))
             RETURNING b.vins, b.attempts, b.lookup_key",
        )
        .bind(job_id)
        .bind(batch_no)
        .bind(generation)
        .bind(lease_secs)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(vins, attempts, lookup_key)| ClaimedBatch { vins, attempts, lookup_key }))
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
        batch_done(&mut tx, job_id, batch_no, false).await?;
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
                     recall_calls = recall_calls + (SELECT CASE WHEN kind = 'recall' THEN 1 ELSE 0 END
                                                    FROM batches WHERE job_id = $1 AND batch_no = $3),
                     calls_retried = calls_retried + CASE WHEN $2 THEN 1 ELSE 0 END,
                     rate_limited = rate_limited + CASE WHEN $2 THEN 0 ELSE 1 END, updated_at = now()
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(count_attempt)
            .bind(batch_no)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(generation)
    }

    /// Gives up on a batch: a decode's rows end `failed` with the last error;
    /// a recall lookup is marked failed, so its rows show recalls as unknown.
    /// The error is kept in `errors`.
    pub async fn dead_letter(&self, job_id: i64, batch_no: i32, error: &str, called: bool) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let (vins, lookup_key): (Vec<String>, Option<String>) = sqlx::query_as(
            "UPDATE batches SET state = 'dead', last_error = $3, updated_at = now()
             WHERE job_id = $1 AND batch_no = $2 RETURNING vins, lookup_key",
        )
        .bind(job_id)
        .bind(batch_no)
        .bind(error)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(key) = &lookup_key {
            sqlx::query("UPDATE recall_lookups SET error_text = $2, failed_at = now() WHERE lookup_key = $1")
                .bind(key)
                .bind(error)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE job_inputs SET status = 'failed', error_code = 'dead_letter', error_text = $3
                 WHERE job_id = $1 AND vin = ANY($2) AND status = 'pending'",
            )
            .bind(job_id)
            .bind(&vins)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("INSERT INTO errors (job_id, batch_no, error_code, error_text) VALUES ($1, $2, 'dead_letter', $3)")
            .bind(job_id)
            .bind(batch_no)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        if called {
            sqlx::query(
                "UPDATE jobs SET calls_made = calls_made + 1,
                     recall_calls = recall_calls + CASE WHEN $2 THEN 1 ELSE 0 END WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(lookup_key.is_some())
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
        sqlx::query(
            "UPDATE jobs SET state = 'running', planned_at = now(), updated_at = now()
             WHERE job_id = $1 AND state = 'planning'",
        )
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
        // The job's own row, once: state, call counters, recall figures.
        let Some(job) = sqlx::query(
            "SELECT name, state, state_reason, calls_made, calls_retried, rate_limited,
                    coalesce((spec -> 'recalls' ->> 'enabled')::bool, false), outputs_written,
                    recall_lookups, recall_cache_hits, recall_calls, rows_with_recalls, rows_recalls_unknown,
                    campaigns_found,
                    (SELECT count(*) FROM batches WHERE job_id = $1 AND kind = 'recall' AND state = 'dead'),
                    extract(epoch FROM created_at)::float8, extract(epoch FROM started_at)::float8,
                    extract(epoch FROM planned_at)::float8,
                    extract(epoch FROM write_started_at)::float8, extract(epoch FROM finished_at)::float8
             FROM jobs WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        use sqlx::Row;
        let head = JobHead {
            name: job.try_get(0)?,
            state: job.try_get(1)?,
            state_reason: job.try_get(2)?,
            calls: (job.try_get(3)?, job.try_get(4)?, job.try_get(5)?),
            recalls_on: job.try_get(6)?,
            outputs: job.try_get::<Option<Vec<String>>, _>(7)?.unwrap_or_default(),
            times: [job.try_get(15)?, job.try_get(16)?, job.try_get(17)?, job.try_get(18)?, job.try_get(19)?],
        };
        let recall_row: RecallRow = (
            job.try_get(8)?,
            job.try_get(9)?,
            job.try_get(10)?,
            job.try_get(11)?,
            job.try_get(12)?,
            job.try_get(13)?,
            job.try_get(14)?,
        );
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
             FROM batches WHERE job_id = $1 AND kind = 'decode'",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let rows = (rows, valid, duplicates, cache_hits, decoded, failed, pending);
        let batches = (batches, batches_done, dead, dead_vins);
        Ok(Some(JobCounts::assemble(job_id, head, recall_row, rows, invalid, batches)))
    }
}

/// The query every output reads: one row per input row, in source order,
/// with the cached decode (for decoded rows) and the row's recalls.
static OUTPUT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    // jsonb_to_record reads each cached document once (twenty `->>` would
    // detoast it twenty times).
    let vehicle: Vec<String> =
        crate::output::VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("v.\"{field}\"")).collect();
    let record: Vec<String> =
        crate::output::VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("\"{field}\" text")).collect();
    format!(
        "WITH camps AS (
             SELECT lookup_key, array_agg(campaign_number ORDER BY campaign_number) AS campaigns
             FROM recall_lookup_campaigns GROUP BY lookup_key)
         SELECT ji.source, ji.row_number, ji.raw_vin, ji.vin, ji.status, ji.error_code, ji.error_text,
                ji.decoded_at, ji.check_digit_valid, ji.carried,
                CASE WHEN rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at)
                     THEN coalesce(camps.campaigns, '{{}}') END AS campaigns,
                CASE WHEN $2 = 'off' OR ji.status <> 'decoded' THEN NULL
                     WHEN rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at) THEN NULL
                     WHEN rl.error_text IS NOT NULL THEN 'recall lookup failed: ' || rl.error_text
                     WHEN k.key IS NULL THEN 'no make, model and model year to look recalls up by'
                     ELSE 'recalls were not looked up' END AS recall_error,
                {}
         FROM job_inputs ji
         LEFT JOIN vin_cache c ON c.vin = ji.vin AND ji.status = 'decoded'
         LEFT JOIN LATERAL jsonb_to_record(c.raw) AS v({}) ON true
         LEFT JOIN LATERAL (SELECT CASE WHEN $2 = 'vin' THEN 'vin:' || ji.vin
                                        WHEN $2 = 'model' THEN recall_key(c.make, c.model, c.model_year) END AS key) k
                ON ji.status = 'decoded'
         LEFT JOIN recall_lookups rl ON rl.lookup_key = k.key
         LEFT JOIN camps ON camps.lookup_key = rl.lookup_key
         WHERE ji.job_id = $1
         ORDER BY ji.source, ji.row_number",
        vehicle.join(", "),
        record.join(", ")
    )
});

impl PgStore {
    /// Streams the job's output rows in source order; memory stays flat
    /// whatever the job's size.
    pub fn output_rows(
        &self,
        job_id: i64,
        mode: crate::output::RecallMode,
    ) -> impl futures_util::Stream<Item = Result<crate::output::OutputRow, StoreError>> + Send + '_ {
        use futures_util::StreamExt;
        use sqlx::Row;
        sqlx::query(sqlx::AssertSqlSafe(OUTPUT_SQL.as_str())).bind(job_id).bind(mode.as_str()).fetch(&self.pool).map(
            |row| {
                let row = row?;
                let carried = match row.try_get::<serde_json::Value, _>(9)? {
                    serde_json::Value::Object(m) => m,
                    _ => Default::default(),
                };
                let vehicle = (0..crate::output::VEHICLE_COLUMNS.len())
                    .map(|i| row.try_get::<Option<String>, _>(12 + i))
                    .collect::<Result<_, _>>()?;
                Ok(crate::output::OutputRow {
                    source: row.try_get(0)?,
                    source_row: row.try_get(1)?,
                    raw_vin: row.try_get(2)?,
                    vin: row.try_get(3)?,
                    status: row.try_get(4)?,
                    error_code: row.try_get(5)?,
                    error_text: row.try_get(6)?,
                    decoded_at: row.try_get(7)?,
                    check_digit_valid: row.try_get(8)?,
                    recall_campaigns: row.try_get(10)?,
                    recall_error: row.try_get(11)?,
                    vehicle,
                    carried,
                })
            },
        )
    }

    /// The Parquet type of each carried column, from the values the job holds.
    pub async fn carried_types(
        &self,
        job_id: i64,
        carry: &[String],
    ) -> Result<Vec<(String, crate::output::CarriedType)>, StoreError> {
        let seen: Vec<(String, Vec<String>, bool)> = sqlx::query_as(
            "SELECT e.key, array_agg(DISTINCT jsonb_typeof(e.value)),
                    bool_and(jsonb_typeof(e.value) <> 'number' OR e.value::text ~ '^-?[0-9]{1,18}$')
             FROM job_inputs ji, jsonb_each(ji.carried) e
             WHERE ji.job_id = $1 GROUP BY e.key",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(carry
            .iter()
            .map(|name| {
                let t = seen
                    .iter()
                    .find(|(k, _, _)| k == name)
                    .map(|(_, types, ints)| crate::output::CarriedType::infer(types, *ints))
                    .unwrap_or(crate::output::CarriedType::Text);
                (name.clone(), t)
            })
            .collect())
    }

    /// The job's creation date (UTC): the `dt` partition of its output.
    pub async fn job_date(&self, job_id: i64) -> Result<sqlx::types::chrono::NaiveDate, StoreError> {
        Ok(sqlx::query_scalar("SELECT (created_at AT TIME ZONE 'UTC')::date FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// The output writer is alive: keeps another worker from taking over.
    pub async fn heartbeat(&self, job_id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET updated_at = now() WHERE job_id = $1 AND state = 'writing'")
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl PgStore {
    /// Moves a job on when its last batch has ended: plans its recall
    /// lookups (once), then hands it to an output writer or marks it done.
    /// The job's row lock makes exactly one caller see each step.
    pub async fn advance(&self, job_id: i64, spec: &crate::spec::JobSpec) -> Result<Next, StoreError> {
        // Called after every batch: while others remain (nearly always),
        // say so without taking the job's row lock.
        if self.busy(job_id).await? {
            return Ok(Next::Nothing);
        }
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, bool, bool)> =
            sqlx::query_as("SELECT state, batches_planned, recalls_planned FROM jobs WHERE job_id = $1 FOR UPDATE")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, batches_planned, recalls_planned)) = row else { return Ok(Next::Nothing) };
        if !matches!(state.as_str(), "running" | "waiting") || !batches_planned {
            return Ok(Next::Nothing);
        }
        // Again under the lock: another worker may have ended the last batch meanwhile.
        if busy(&mut *tx, job_id).await? {
            return Ok(Next::Nothing);
        }
        let mode = crate::output::RecallMode::of(&spec.recalls);
        if mode != crate::output::RecallMode::Off && !recalls_planned {
            let planned = plan_recalls(&mut tx, job_id, mode, spec.recalls.ttl_hours()).await?;
            if planned > 0 {
                tx.commit().await?;
                return Ok(Next::Enqueue);
            }
        }
        summarise_recalls(&mut tx, job_id, mode).await?;
        let next = if spec.outputs.is_empty() {
            sqlx::query(
                "UPDATE jobs SET state = 'done', finished_at = now(), updated_at = now(), state_reason = NULL,
                     resume_at = NULL WHERE job_id = $1",
            )
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            Next::Done
        } else {
            sqlx::query(
                "UPDATE jobs SET state = 'writing', write_started_at = now(), updated_at = now(), state_reason = NULL,
                     resume_at = NULL
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            Next::Write
        };
        tx.commit().await?;
        Ok(next)
    }

    /// The spec a job was submitted with, or why it cannot be read.
    pub async fn job_spec(&self, job_id: i64) -> Result<Result<crate::spec::JobSpec, String>, StoreError> {
        let json: serde_json::Value = sqlx::query_scalar("SELECT spec FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NoJob(job_id))?;
        Ok(serde_json::from_value(json).map_err(|e| format!("stored spec of job {job_id} is unreadable: {e}")))
    }

    pub async fn update_spec(&self, job_id: i64, spec: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET spec = $2 WHERE job_id = $1").bind(job_id).bind(spec).execute(&self.pool).await?;
        Ok(())
    }

    /// Puts an ended job into `writing` to write its outputs again from the
    /// stored results. False if it has not ended (or has no calls planned).
    pub async fn begin_rewrite(&self, job_id: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE jobs SET state = 'writing', write_started_at = now(), state_reason = NULL, updated_at = now()
             WHERE job_id = $1 AND state IN ('done', 'failed', 'cancelled') AND batches_planned
               AND NOT EXISTS (SELECT 1 FROM batches WHERE job_id = $1 AND state IN ('queued', 'running'))",
        )
        .bind(job_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn busy(&self, job_id: i64) -> Result<bool, StoreError> {
        busy(&self.pool, job_id).await
    }

    /// Takes over a job left in `writing` by a writer that stopped beating.
    pub async fn orphaned_writes(&self, lease_secs: f64) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE jobs SET updated_at = now()
             WHERE state = 'writing' AND updated_at < now() - make_interval(secs => $1) RETURNING job_id",
        )
        .bind(lease_secs)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The outputs are written: the job is done.
    pub async fn job_outputs(&self, job_id: i64) -> Result<Option<Vec<String>>, StoreError> {
        let row: Option<Option<Vec<String>>> = sqlx::query_scalar("SELECT outputs_written FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Option::unwrap_or_default))
    }

    pub async fn set_outputs(&self, job_id: i64, outputs: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET outputs_written = $2 WHERE job_id = $1")
            .bind(job_id)
            .bind(outputs)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn finish_writing(&self, job_id: i64, outputs: &[String]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET state = 'done', outputs_written = $2, finished_at = now(), updated_at = now(),
                 state_reason = NULL
             WHERE job_id = $1 AND state = 'writing'",
        )
        .bind(job_id)
        .bind(outputs)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writing failed: the job fails with the reason; every call's result
    /// is kept, so `vinetl reprocess` writes again without calling.
    pub async fn fail_writing(&self, job_id: i64, reason: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET state = 'failed', state_reason = $2, finished_at = now(), updated_at = now()
             WHERE job_id = $1 AND state = 'writing'",
        )
        .bind(job_id)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        sqlx::query("INSERT INTO errors (job_id, error_code, error_text) VALUES ($1, 'output_failed', $2)")
            .bind(job_id)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// What a recall lookup asks for.
    pub async fn lookup(&self, key: &str) -> Result<Option<Lookup>, StoreError> {
        type LookupRow = (Option<String>, Option<String>, Option<i32>, Option<String>);
        let row: Option<LookupRow> =
            sqlx::query_as("SELECT make, model, model_year, vin FROM recall_lookups WHERE lookup_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(make, model, model_year, vin)| Lookup { key: key.to_string(), make, model, model_year, vin }))
    }

    /// Stores a recall answer: the campaigns (upserted), the lookup's links
    /// (replaced), the lookup, the batch and the call counts, in one transaction.
    pub async fn complete_recall(
        &self,
        job_id: i64,
        batch_no: i32,
        key: &str,
        recalls: &[crate::api::Recall],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let seen = super::distinct_campaigns(recalls);
        let s = |f: &dyn Fn(&crate::api::Recall) -> String| seen.values().map(|r| f(r)).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO recalls (campaign_number, manufacturer, component, summary, consequence, remedy, notes,
                                  report_received_date, park_it, park_outside, over_the_air_update, updated_at)
             SELECT n, m, c, s, q, r, nullif(o, ''),
                    CASE WHEN d ~ '^\\d{2}/\\d{2}/\\d{4}$' THEN to_date(d, 'DD/MM/YYYY') END, p, po, ota, now()
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::bool[], $10::bool[], $11::bool[]) AS x(n, m, c, s, q, r, o, d, p, po, ota)
             ON CONFLICT (campaign_number) DO UPDATE SET manufacturer = EXCLUDED.manufacturer,
                 component = EXCLUDED.component, summary = EXCLUDED.summary, consequence = EXCLUDED.consequence,
                 remedy = EXCLUDED.remedy, notes = EXCLUDED.notes, report_received_date = EXCLUDED.report_received_date,
                 park_it = EXCLUDED.park_it, park_outside = EXCLUDED.park_outside,
                 over_the_air_update = EXCLUDED.over_the_air_update, updated_at = now()",
        )
        .bind(seen.keys().cloned().collect::<Vec<_>>())
        .bind(s(&|r| r.manufacturer.clone()))
        .bind(s(&|r| r.component.clone()))
        .bind(s(&|r| r.summary.clone()))
        .bind(s(&|r| r.consequence.clone()))
        .bind(s(&|r| r.remedy.clone()))
        .bind(s(&|r| r.notes.clone().unwrap_or_default()))
        .bind(s(&|r| r.report_received_date.clone()))
        .bind(seen.values().map(|r| r.park_it).collect::<Vec<_>>())
        .bind(seen.values().map(|r| r.park_outside).collect::<Vec<_>>())
        .bind(seen.values().map(|r| r.over_the_air_update).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM recall_lookup_campaigns WHERE lookup_key = $1").bind(key).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO recall_lookup_campaigns (lookup_key, campaign_number) SELECT $1, unnest($2::text[])")
            .bind(key)
            .bind(seen.keys().cloned().collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE recall_lookups SET looked_up_at = now(), campaigns = $2, error_text = NULL, failed_at = NULL
             WHERE lookup_key = $1",
        )
        .bind(key)
        .bind(seen.len() as i32)
        .execute(&mut *tx)
        .await?;
        batch_done(&mut tx, job_id, batch_no, true).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Whether any of the job's batches is queued or running.
async fn busy<'e>(db: impl sqlx::PgExecutor<'e>, job_id: i64) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM batches WHERE job_id = $1 AND state IN ('queued', 'running'))")
        .bind(job_id)
        .fetch_one(db)
        .await?)
}

/// Cuts the job's pending VINs, distinct and sorted, into batches of
/// `batch_size`, numbered after any the job already has. Batch membership
/// is a pure function of the VINs, so it never depends on timing.
async fn batch_pending(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: i64,
    batch_size: i32,
) -> Result<i64, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO batches (job_id, batch_no, vins)
         SELECT $1, base.b + ((v.n - 1) / $2)::int, array_agg(v.vin ORDER BY v.vin)
         FROM (SELECT vin, row_number() OVER (ORDER BY vin) AS n
               FROM (SELECT DISTINCT vin FROM job_inputs WHERE job_id = $1 AND status = 'pending') d) v,
              (SELECT coalesce(max(batch_no) + 1, 0) AS b FROM batches WHERE job_id = $1) base
         GROUP BY base.b, (v.n - 1) / $2",
    )
    .bind(job_id)
    .bind(batch_size)
    .execute(&mut **tx)
    .await?
    .rows_affected() as i64)
}

/// The batch is done and its call counted; a completed call also ends a
/// quota wait.
async fn batch_done(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: i64,
    batch_no: i32,
    recall: bool,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE batches SET state = 'done', updated_at = now() WHERE job_id = $1 AND batch_no = $2")
        .bind(job_id)
        .bind(batch_no)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "UPDATE jobs SET calls_made = calls_made + 1, recall_calls = recall_calls + CASE WHEN $2 THEN 1 ELSE 0 END,
             updated_at = now(),
             state_reason = CASE WHEN state = 'waiting' THEN NULL ELSE state_reason END,
             resume_at = CASE WHEN state = 'waiting' THEN NULL ELSE resume_at END,
             state = CASE WHEN state = 'waiting' THEN 'running' ELSE state END
         WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(recall)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates one recall batch per lookup key the job needs and the cache
/// cannot answer. Returns how many were created.
async fn plan_recalls(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: i64,
    mode: crate::output::RecallMode,
    ttl_hours: f64,
) -> Result<i64, StoreError> {
    // Every distinct key among the job's decoded rows; each lookup is
    // registered so the worker knows what to ask.
    let (keys, fresh): (i64, i64) = sqlx::query_as(
        "WITH keys AS (
             SELECT k.key, min(c.make) AS make, min(c.model) AS model, min(c.model_year) AS year, min(ji.vin) AS vin
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin
             CROSS JOIN LATERAL (SELECT CASE WHEN $2 = 'vin' THEN 'vin:' || ji.vin
                                             ELSE recall_key(c.make, c.model, c.model_year) END AS key) k
             WHERE ji.job_id = $1 AND ji.status = 'decoded' AND k.key IS NOT NULL
             GROUP BY k.key),
         registered AS (
             INSERT INTO recall_lookups (lookup_key, make, model, model_year, vin)
             SELECT key, make, model, year, CASE WHEN $2 = 'vin' THEN vin END FROM keys
             ON CONFLICT (lookup_key) DO NOTHING),
         stale AS (
             SELECT keys.key, keys.vin FROM keys LEFT JOIN recall_lookups l ON l.lookup_key = keys.key
             WHERE l.looked_up_at IS NULL OR l.looked_up_at <= now() - make_interval(secs => $3 * 3600)
                OR (l.failed_at IS NOT NULL AND l.failed_at > l.looked_up_at)),
         base AS (SELECT coalesce(max(batch_no) + 1, 0) AS b FROM batches WHERE job_id = $1),
         made AS (
             INSERT INTO batches (job_id, batch_no, kind, vins, lookup_key)
             SELECT $1, base.b + (row_number() OVER (ORDER BY stale.key))::int - 1, 'recall', ARRAY[stale.vin], stale.key
             FROM stale, base
             RETURNING 1)
         SELECT (SELECT count(*) FROM keys), (SELECT count(*) FROM keys) - (SELECT count(*) FROM made)",
    )
    .bind(job_id)
    .bind(mode.as_str())
    .bind(ttl_hours)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE jobs SET recalls_planned = true, recall_lookups = $2, recall_cache_hits = $3, updated_at = now()
         WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(keys)
    .bind(fresh)
    .execute(&mut **tx)
    .await?;
    Ok(keys - fresh)
}

/// Stores the job's recall figures: rows with recalls, rows whose recalls
/// are unknown, distinct campaigns found.
async fn summarise_recalls(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    job_id: i64,
    mode: crate::output::RecallMode,
) -> Result<(), StoreError> {
    if mode == crate::output::RecallMode::Off {
        return Ok(());
    }
    sqlx::query(
        "WITH r AS (
             SELECT rl.lookup_key,
                    rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at) AS known
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin
             CROSS JOIN LATERAL (SELECT CASE WHEN $2 = 'vin' THEN 'vin:' || ji.vin
                                             ELSE recall_key(c.make, c.model, c.model_year) END AS key) k
             LEFT JOIN recall_lookups rl ON rl.lookup_key = k.key
             WHERE ji.job_id = $1 AND ji.status = 'decoded'),
         per AS (SELECT lookup_key, count(*) AS n FROM recall_lookup_campaigns GROUP BY lookup_key)
         UPDATE jobs SET
             rows_with_recalls = (SELECT count(*) FROM r JOIN per USING (lookup_key) WHERE r.known),
             rows_recalls_unknown = (SELECT count(*) FROM r WHERE NOT coalesce(r.known, false)),
             campaigns_found = (SELECT count(DISTINCT lc.campaign_number) FROM recall_lookup_campaigns lc
                                WHERE lc.lookup_key IN (SELECT lookup_key FROM r WHERE r.known))
         WHERE job_id = $1",
    )
    .bind(job_id)
    .bind(mode.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl PgStore {
    /// Puts an ended job back to work: its failed rows (`failed_only`) or
    /// every valid row go back to pending; rows whose VIN has a fresh,
    /// successful decode in the cache take it at no cost; the rest get new
    /// batches. Recall lookups are planned again (the cache answers fresh
    /// ones) and the outputs are rewritten. Returns the new batch count, or
    /// `None` if the job is still running (or does not exist).
    pub async fn reprocess(
        &self,
        job_id: i64,
        failed_only: bool,
        batch_size: i32,
        cache_ttl_hours: f64,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ended: Option<bool> = sqlx::query_scalar(
            "SELECT state IN ('done', 'failed', 'cancelled') FROM jobs WHERE job_id = $1 FOR UPDATE",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        if ended != Some(true) {
            return Ok(None);
        }
        sqlx::query(
            "UPDATE job_inputs SET status = 'pending', error_code = NULL, error_text = NULL, decoded_at = NULL
             WHERE job_id = $1 AND status <> 'invalid' AND (NOT $2 OR status = 'failed')",
        )
        .bind(job_id)
        .bind(failed_only)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_inputs ji SET status = 'decoded', decoded_at = c.decoded_at
             FROM vin_cache c
             WHERE ji.job_id = $1 AND ji.status = 'pending' AND c.vin = ji.vin AND c.error_code IS NULL
               AND c.decoded_at > now() - make_interval(secs => $2 * 3600)",
        )
        .bind(job_id)
        .bind(cache_ttl_hours)
        .execute(&mut *tx)
        .await?;
        let batches = batch_pending(&mut tx, job_id, batch_size).await?;
        sqlx::query(
            "UPDATE jobs SET state = 'running', state_reason = NULL, resume_at = NULL, finished_at = NULL,
                 started_at = now(), planned_at = now(), write_started_at = NULL,
                 recalls_planned = false, outputs_written = NULL, rows_with_recalls = NULL,
                 rows_recalls_unknown = NULL, campaigns_found = NULL, updated_at = now()
             WHERE job_id = $1",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(batches))
    }
}
