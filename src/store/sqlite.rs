//! The state store on SQLite: the same operations as [`super::postgres`],
//! for one machine (the demo's default, no services). Times are Unix
//! seconds from SQLite's clock; arrays and objects travel as JSON text, and
//! batched writes go through `json_each` (one statement per chunk, as UNNEST
//! does on Postgres). Write transactions start with `BEGIN IMMEDIATE`, so
//! concurrent writers queue on the lock instead of failing to upgrade.

use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::chrono::{DateTime, NaiveDate, Utc};

use super::{
    ClaimedBatch, DecodedVin, JobCounts, JobHead, Lookup, Next, PlannedRow, RecallRow, Reschedule, StoreError,
};
use crate::limiter::{Bucket, Reservation};
use crate::output::{CarriedType, OutputRow, RecallMode, VEHICLE_COLUMNS};
use crate::spec::JobSpec;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The state store in one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pub pool: SqlitePool,
    /// The queue's own file (apalis-sqlite keeps its own migrations).
    pub queue_pool: SqlitePool,
}

/// `sqlite://PATH` (or `sqlite:PATH`) to a path.
pub fn path_of(url: &str) -> &str {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    rest.split('?').next().unwrap_or(rest)
}

/// The queue file beside the state file: `vinetl.db` → `vinetl-queue.db`.
pub fn queue_path(state: &str) -> String {
    match state.strip_suffix(".db") {
        Some(stem) => format!("{stem}-queue.db"),
        None => format!("{state}-queue"),
    }
}

async fn pool_for(path: &str, max_connections: u32) -> Result<SqlitePool, StoreError> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
        .map_err(|source| StoreError::SqliteOpen { path: path.to_string(), error: source })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(max_connections.max(2))
        .connect_with(options)
        .await
        .map_err(|source| StoreError::SqliteOpen { path: path.to_string(), error: source })
}

/// Opens (creating if needed) the state file and the queue file beside it.
pub async fn open(url: &str, max_connections: u32) -> Result<SqliteStore, StoreError> {
    let path = path_of(url);
    if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Queue(format!("cannot create {}: {e}", dir.display())))?;
    }
    // sqlx takes no lock around SQLite migrations (Postgres has an advisory
    // lock), and switching a new file to WAL needs it alone: processes
    // starting together (two workers) would collide. An exclusive lock on a
    // file beside it makes them take turns while they open and migrate.
    let lock = open_lock(&format!("{path}.lock")).await?;
    let pool = pool_for(path, max_connections).await?;
    let queue_pool = pool_for(&queue_path(path), max_connections).await?;
    let migrated = async {
        MIGRATOR.run(&pool).await.map_err(|source| StoreError::Migrate { schema: path.to_string(), source })?;
        crate::queue::setup_sqlite(&queue_pool).await
    }
    .await;
    drop(lock);
    migrated?;
    Ok(SqliteStore { pool, queue_pool })
}

/// Waits for an exclusive lock on `path` (created if missing); released on drop.
async fn open_lock(path: &str) -> Result<std::fs::File, StoreError> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|e| StoreError::Queue(format!("locking the SQLite file: {e}")))?
    .map_err(|e| StoreError::Queue(format!("cannot lock the SQLite state's .lock file: {e}")))
}

/// SQL with `NOW` standing for SQLite's clock in Unix seconds.
fn q(sql: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql.replace("NOW", "unixepoch('subsec')"))
}

fn to_time(t: Option<f64>) -> Option<DateTime<Utc>> {
    t.and_then(|s| DateTime::from_timestamp_micros((s * 1e6).round() as i64))
}

/// The key a decoded VIN's recalls are looked up under (as in the
/// Postgres `recall_key` function), for table alias `c` of vin_cache.
const RECALL_KEY: &str = "CASE WHEN nullif(trim(c.make), '') IS NULL OR nullif(trim(c.model), '') IS NULL
                                 OR c.model_year IS NULL THEN NULL
                            ELSE 'mmy:' || upper(trim(c.make)) || '|' || upper(trim(c.model)) || '|' || c.model_year END";

/// A job row's recall key (alias `ji` of job_inputs, `c` of vin_cache;
/// `?2` the recall mode), for decoded rows only.
fn key_expr() -> String {
    format!(
        "CASE WHEN ji.status <> 'decoded' THEN NULL WHEN ?2 = 'vin' THEN 'vin:' || ji.vin WHEN ?2 = 'model' THEN {RECALL_KEY} END"
    )
}

impl SqliteStore {
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub async fn resumable_job(&self, spec_hash: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT job_id FROM jobs WHERE spec_hash = ? AND state IN ('planning', 'running', 'waiting')
             ORDER BY job_id DESC LIMIT 1",
        )
        .bind(spec_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn create_job(&self, name: &str, spec: &Value, spec_hash: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("INSERT INTO jobs (name, spec, spec_hash, started_at) VALUES (?, ?, ?, unixepoch('subsec')) RETURNING job_id")
            .bind(name)
            .bind(spec.to_string())
            .bind(spec_hash)
            .fetch_one(&self.pool)
            .await?)
    }

    /// A planning lease on the job: renewed by every chunk the planner
    /// stores, released when planning ends, and free again a minute after a
    /// planner dies, so submitting the spec again resumes the job.
    pub async fn lock_planning(&self, job_id: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(q("UPDATE jobs SET planning_until = NOW + 60
             WHERE job_id = ? AND (planning_until IS NULL OR planning_until < NOW)"))
        .bind(job_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub async fn unlock_planning(&self, job_id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET planning_until = NULL WHERE job_id = ?").bind(job_id).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn rows_planned(&self, job_id: i64, source: &str) -> Result<(i64, bool), StoreError> {
        let row: Option<(i64, bool)> =
            sqlx::query_as("SELECT rows_planned, complete FROM job_sources WHERE job_id = ? AND source = ?")
                .bind(job_id)
                .bind(source)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.unwrap_or((0, false)))
    }

    pub async fn cached_count(&self, vins: &[String], cache_ttl_hours: f64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM vin_cache WHERE vin IN (SELECT value FROM json_each(?1))
             AND decoded_at > unixepoch('subsec') - ?2 * 3600",
        )
        .bind(Value::from(vins.to_vec()).to_string())
        .bind(cache_ttl_hours)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn total_rows(&self, job_id: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(coalesce(sum(rows_planned), 0) AS BIGINT) FROM job_sources WHERE job_id = ?",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn insert_rows(
        &self,
        job_id: i64,
        source: &str,
        rows: &[PlannedRow],
        complete: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !rows.is_empty() {
            let json: Vec<Value> = rows
                .iter()
                .map(|r| {
                    json!({"n": r.row_number, "raw": r.raw_vin, "vin": r.vin, "cdv": r.check_digit_valid,
                           "code": r.error_code, "text": r.error_text, "carried": r.carried})
                })
                .collect();
            sqlx::query(
                "INSERT INTO job_inputs (job_id, source, row_number, raw_vin, vin, check_digit_valid, error_code,
                                         error_text, carried, plan, status)
                 SELECT ?1, ?2, value ->> 'n', value ->> 'raw', value ->> 'vin', value ->> 'cdv', value ->> 'code',
                        value ->> 'text', value -> 'carried',
                        CASE WHEN value ->> 'vin' IS NULL THEN 'invalid' ELSE 'call' END,
                        CASE WHEN value ->> 'vin' IS NULL THEN 'invalid' ELSE 'pending' END
                 FROM json_each(?3) WHERE true
                 ON CONFLICT (job_id, source, row_number) DO NOTHING",
            )
            .bind(job_id)
            .bind(source)
            .bind(Value::Array(json).to_string())
            .execute(&mut *tx)
            .await?;
        }
        let last = rows.last().map(|r| r.row_number).unwrap_or(0);
        sqlx::query(q("UPDATE jobs SET planning_until = NOW + 60 WHERE job_id = ? AND planning_until IS NOT NULL"))
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO job_sources (job_id, source, rows_planned, complete) VALUES (?, ?, ?, ?)
             ON CONFLICT (job_id, source) DO UPDATE
             SET rows_planned = max(rows_planned, excluded.rows_planned), complete = excluded.complete",
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

    pub async fn plan_batches(&self, job_id: i64, batch_size: i32, cache_ttl_hours: f64) -> Result<i64, StoreError> {
        let mut tx = self.write_tx().await?;
        let planned: bool = sqlx::query_scalar("SELECT batches_planned FROM jobs WHERE job_id = ?")
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
        if planned {
            tx.rollback().await?;
            return Ok(0);
        }
        sqlx::query(
            "UPDATE job_inputs SET plan = 'duplicate'
             WHERE job_id = ?1 AND vin IS NOT NULL AND EXISTS (
                 SELECT 1 FROM job_inputs e WHERE e.job_id = job_inputs.job_id AND e.vin = job_inputs.vin
                   AND (e.source, e.row_number) < (job_inputs.source, job_inputs.row_number))",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(q("UPDATE job_inputs SET
                 plan = CASE WHEN job_inputs.plan = 'call' THEN 'cache_hit' ELSE job_inputs.plan END,
                 status = CASE WHEN c.error_code IS NULL THEN 'decoded' ELSE 'failed' END,
                 error_code = c.error_code, error_text = c.error_text, decoded_at = c.decoded_at
             FROM vin_cache c
             WHERE job_inputs.job_id = ?1 AND c.vin = job_inputs.vin AND c.decoded_at > NOW - ?2 * 3600"))
        .bind(job_id)
        .bind(cache_ttl_hours)
        .execute(&mut *tx)
        .await?;
        let batches = batch_pending(&mut tx, job_id, batch_size).await?;
        sqlx::query(q("UPDATE jobs SET batches_planned = 1, updated_at = NOW WHERE job_id = ?"))
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(batches)
    }

    pub async fn unenqueued(&self, job_id: i64) -> Result<Vec<(i32, i32)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT batch_no, generation FROM batches WHERE job_id = ? AND state = 'queued' AND NOT enqueued ORDER BY batch_no",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn mark_enqueued(&self, job_id: i64, batch_generations: &[(i32, i32)]) -> Result<(), StoreError> {
        let pairs: Vec<Value> = batch_generations.iter().map(|(b, g)| json!([b, g])).collect();
        sqlx::query(
            "UPDATE batches SET enqueued = 1
             WHERE job_id = ?1 AND (batch_no, generation) IN (SELECT value ->> 0, value ->> 1 FROM json_each(?2))",
        )
        .bind(job_id)
        .bind(Value::Array(pairs).to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn claim(
        &self,
        job_id: i64,
        batch_no: i32,
        generation: i32,
        lease_secs: f64,
    ) -> Result<Option<ClaimedBatch>, StoreError> {
        let row: Option<(String, i32, Option<String>)> =
            sqlx::query_as(q("UPDATE batches SET state = 'running', updated_at = NOW
             WHERE job_id = ?1 AND batch_no = ?2 AND generation = ?3
               AND (state = 'queued' OR (state = 'running' AND updated_at < NOW - ?4))
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = batches.job_id AND j.batches_planned
                             AND j.state IN ('planning', 'running', 'waiting'))
             RETURNING vins, attempts, lookup_key"))
            .bind(job_id)
            .bind(batch_no)
            .bind(generation)
            .bind(lease_secs)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|(vins, attempts, lookup_key)| ClaimedBatch {
            vins: serde_json::from_str(&vins).unwrap_or_default(),
            attempts,
            lookup_key,
        }))
    }

    pub async fn complete(&self, job_id: i64, batch_no: i32, decoded: &[DecodedVin]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let json: Vec<Value> = decoded
            .iter()
            .map(|d| {
                json!({"vin": d.vin, "make": d.make, "model": d.model, "year": d.model_year,
                       "code": d.error.as_ref().map(|e| &e.0), "text": d.error.as_ref().map(|e| &e.1), "raw": d.raw})
            })
            .collect();
        sqlx::query(q("INSERT INTO vin_cache (vin, decoded_at, make, model, model_year, error_code, error_text, raw)
             SELECT value ->> 'vin', NOW, value ->> 'make', value ->> 'model', value ->> 'year', value ->> 'code',
                    value ->> 'text', value -> 'raw'
             FROM json_each(?1) WHERE true
             ON CONFLICT (vin) DO UPDATE SET decoded_at = excluded.decoded_at, make = excluded.make,
                 model = excluded.model, model_year = excluded.model_year, error_code = excluded.error_code,
                 error_text = excluded.error_text, raw = excluded.raw"))
        .bind(Value::Array(json).to_string())
        .execute(&mut *tx)
        .await?;
        let vins = Value::from(decoded.iter().map(|d| d.vin.clone()).collect::<Vec<_>>()).to_string();
        sqlx::query(
            "UPDATE job_inputs SET status = CASE WHEN c.error_code IS NULL THEN 'decoded' ELSE 'failed' END,
                 error_code = c.error_code, error_text = c.error_text, decoded_at = c.decoded_at
             FROM vin_cache c
             WHERE job_inputs.job_id = ?1 AND job_inputs.status = 'pending' AND c.vin = job_inputs.vin
               AND job_inputs.vin IN (SELECT value FROM json_each(?2))",
        )
        .bind(job_id)
        .bind(vins)
        .execute(&mut *tx)
        .await?;
        self.batch_done(&mut tx, job_id, batch_no, false).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The batch is done and its call counted; a call ends a quota wait.
    async fn batch_done(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        job_id: i64,
        batch_no: i32,
        recall: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(q("UPDATE batches SET state = 'done', updated_at = NOW WHERE job_id = ? AND batch_no = ?"))
            .bind(job_id)
            .bind(batch_no)
            .execute(&mut **tx)
            .await?;
        sqlx::query(q(
            "UPDATE jobs SET calls_made = calls_made + 1, recall_calls = recall_calls + ?2, updated_at = NOW,
                 state_reason = CASE WHEN state = 'waiting' THEN NULL ELSE state_reason END,
                 resume_at = CASE WHEN state = 'waiting' THEN NULL ELSE resume_at END,
                 state = CASE WHEN state = 'waiting' THEN 'running' ELSE state END
             WHERE job_id = ?1",
        ))
        .bind(job_id)
        .bind(i64::from(recall))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    pub async fn set_waiting(&self, job_id: i64, resume_in_secs: f64, reason: &str) -> Result<(), StoreError> {
        sqlx::query(q("UPDATE jobs SET state = 'waiting', state_reason = ?3, resume_at = NOW + ?2, updated_at = NOW
             WHERE job_id = ?1 AND state IN ('running', 'waiting')"))
        .bind(job_id)
        .bind(resume_in_secs)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

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
        let mut tx = self.write_tx().await?;
        let (generation, recall): (i32, bool) = sqlx::query_as(q("UPDATE batches SET state = 'queued', enqueued = 0,
                 generation = generation + 1, attempts = attempts + ?3, next_run_at = NOW + ?4, last_error = ?5,
                 updated_at = NOW
             WHERE job_id = ?1 AND batch_no = ?2 RETURNING generation, kind = 'recall'"))
        .bind(job_id)
        .bind(batch_no)
        .bind(i64::from(count_attempt))
        .bind(delay_secs)
        .bind(error)
        .fetch_one(&mut *tx)
        .await?;
        if called {
            sqlx::query(q("UPDATE jobs SET calls_made = calls_made + 1, recall_calls = recall_calls + ?2,
                     calls_retried = calls_retried + ?3, rate_limited = rate_limited + ?4, updated_at = NOW
                 WHERE job_id = ?1"))
            .bind(job_id)
            .bind(i64::from(recall))
            .bind(i64::from(count_attempt))
            .bind(i64::from(!count_attempt))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(generation)
    }

    pub async fn dead_letter(&self, job_id: i64, batch_no: i32, error: &str, called: bool) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let (vins, lookup_key): (String, Option<String>) = sqlx::query_as(q("UPDATE batches SET state = 'dead',
                 last_error = ?3, updated_at = NOW WHERE job_id = ?1 AND batch_no = ?2 RETURNING vins, lookup_key"))
        .bind(job_id)
        .bind(batch_no)
        .bind(error)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(key) = &lookup_key {
            sqlx::query(q("UPDATE recall_lookups SET error_text = ?2, failed_at = NOW WHERE lookup_key = ?1"))
                .bind(key)
                .bind(error)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE job_inputs SET status = 'failed', error_code = 'dead_letter', error_text = ?3
                 WHERE job_id = ?1 AND status = 'pending' AND vin IN (SELECT value FROM json_each(?2))",
            )
            .bind(job_id)
            .bind(vins)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("INSERT INTO errors (job_id, batch_no, error_code, error_text) VALUES (?, ?, 'dead_letter', ?)")
            .bind(job_id)
            .bind(batch_no)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        if called {
            sqlx::query(
                "UPDATE jobs SET calls_made = calls_made + 1, recall_calls = recall_calls + ?2 WHERE job_id = ?1",
            )
            .bind(job_id)
            .bind(i64::from(lookup_key.is_some()))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn fail_job(&self, job_id: i64, reason: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(q("UPDATE jobs SET state = 'failed', state_reason = ?2, finished_at = NOW, updated_at = NOW
             WHERE job_id = ?1 AND state NOT IN ('done', 'failed', 'cancelled')"))
        .bind(job_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE batches SET state = 'dead', last_error = ?2 WHERE job_id = ?1 AND state IN ('queued', 'running')",
        )
        .bind(job_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_inputs SET status = 'failed', error_code = 'job_failed', error_text = ?2
             WHERE job_id = ?1 AND status = 'pending'",
        )
        .bind(job_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO errors (job_id, error_code, error_text) VALUES (?, 'job_failed', ?)")
            .bind(job_id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn mark_running(&self, job_id: i64) -> Result<(), StoreError> {
        sqlx::query(q(
            "UPDATE jobs SET state = 'running', planned_at = NOW, updated_at = NOW WHERE job_id = ? AND state = 'planning'",
        ))
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn cancel_job(&self, job_id: i64) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let changed = sqlx::query(q("UPDATE jobs SET state = 'cancelled', state_reason = 'cancelled by an operator',
                 finished_at = NOW, updated_at = NOW
             WHERE job_id = ? AND state IN ('planning', 'running', 'waiting')"))
        .bind(job_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(q(
            "UPDATE batches SET state = 'cancelled', updated_at = NOW WHERE job_id = ? AND state = 'queued'",
        ))
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE job_inputs SET status = 'failed', error_code = 'cancelled', error_text = 'the job was cancelled'
             WHERE job_id = ?1 AND status = 'pending'
               AND vin NOT IN (SELECT j.value FROM batches b, json_each(b.vins) j
                               WHERE b.job_id = ?1 AND b.state = 'running')",
        )
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn recent_jobs(&self, limit: i64) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT job_id FROM jobs ORDER BY job_id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn counts(&self, job_id: i64) -> Result<Option<JobCounts>, StoreError> {
        // One read transaction: a consistent snapshot (WAL).
        let mut tx = self.pool.begin().await?;
        // The job's own row, once: state, call counters, recall figures.
        let Some(job) = sqlx::query(
            "SELECT name, state, state_reason, calls_made, calls_retried, rate_limited,
                    coalesce(spec ->> '$.recalls.enabled', 0), outputs_written,
                    recall_lookups, recall_cache_hits, recall_calls, rows_with_recalls, rows_recalls_unknown,
                    campaigns_found,
                    (SELECT count(*) FROM batches WHERE job_id = ?1 AND kind = 'recall' AND state = 'dead'),
                    created_at, started_at, planned_at, write_started_at, finished_at
             FROM jobs WHERE job_id = ?1",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let outputs: Option<String> = job.try_get(7)?;
        let head = JobHead {
            name: job.try_get(0)?,
            state: job.try_get(1)?,
            state_reason: job.try_get(2)?,
            calls: (job.try_get(3)?, job.try_get(4)?, job.try_get(5)?),
            recalls_on: job.try_get(6)?,
            outputs: outputs.and_then(|o| serde_json::from_str(&o).ok()).unwrap_or_default(),
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
                 FROM job_inputs WHERE job_id = ?",
            )
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
        let invalid: Vec<(String, i64)> = sqlx::query_as(
            "SELECT error_code, count(*) FROM job_inputs WHERE job_id = ? AND status = 'invalid' GROUP BY 1 ORDER BY 1",
        )
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        let (batches, batches_done, dead, dead_vins): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'dead'),
                    coalesce(sum(json_array_length(vins)) FILTER (WHERE state = 'dead'), 0)
             FROM batches WHERE job_id = ? AND kind = 'decode'",
        )
        .bind(job_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let rows = (rows, valid, duplicates, cache_hits, decoded, failed, pending);
        let batches = (batches, batches_done, dead, dead_vins);
        Ok(Some(JobCounts::assemble(job_id, head, recall_row, rows, invalid, batches)))
    }

    pub fn output_rows(
        &self,
        job_id: i64,
        mode: RecallMode,
    ) -> futures_util::stream::BoxStream<'_, Result<OutputRow, StoreError>> {
        let vehicle: Vec<String> =
            VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("ji.raw ->> '$.{field}'")).collect();
        let known = "rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at)";
        let sql = format!(
            "SELECT ji.source, ji.row_number, ji.raw_vin, ji.vin, ji.status, ji.error_code, ji.error_text,
                    ji.decoded_at, ji.check_digit_valid, ji.carried,
                    CASE WHEN {known} THEN coalesce((SELECT json_group_array(campaign_number) FROM
                        (SELECT campaign_number FROM recall_lookup_campaigns WHERE lookup_key = rl.lookup_key
                         ORDER BY campaign_number)), '[]') END AS campaigns,
                    CASE WHEN ?2 = 'off' OR ji.status <> 'decoded' THEN NULL
                         WHEN {known} THEN NULL
                         WHEN rl.error_text IS NOT NULL THEN 'recall lookup failed: ' || rl.error_text
                         WHEN ji.key IS NULL THEN 'no make, model and model year to look recalls up by'
                         ELSE 'recalls were not looked up' END AS recall_error,
                    {vehicle}
             FROM (SELECT ji.*, c.raw AS raw, ({key}) AS key
                   FROM job_inputs ji LEFT JOIN vin_cache c ON c.vin = ji.vin AND ji.status = 'decoded'
                   WHERE ji.job_id = ?1) ji
             LEFT JOIN recall_lookups rl ON rl.lookup_key = ji.key
             ORDER BY ji.source, ji.row_number",
            vehicle = vehicle.join(", "),
            key = key_expr(),
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .bind(mode.as_str())
            .fetch(&self.pool)
            .map(|row| {
                let row = row?;
                let carried = match serde_json::from_str::<Value>(&row.try_get::<String, _>(9)?) {
                    Ok(Value::Object(m)) => m,
                    _ => Default::default(),
                };
                let campaigns: Option<String> = row.try_get(10)?;
                let vehicle = (0..VEHICLE_COLUMNS.len())
                    .map(|i| row.try_get::<Option<String>, _>(12 + i))
                    .collect::<Result<_, _>>()?;
                Ok(OutputRow {
                    source: row.try_get(0)?,
                    source_row: row.try_get(1)?,
                    raw_vin: row.try_get(2)?,
                    vin: row.try_get(3)?,
                    status: row.try_get(4)?,
                    error_code: row.try_get(5)?,
                    error_text: row.try_get(6)?,
                    decoded_at: to_time(row.try_get(7)?),
                    check_digit_valid: row.try_get(8)?,
                    recall_campaigns: campaigns.and_then(|c| serde_json::from_str(&c).ok()),
                    recall_error: row.try_get(11)?,
                    vehicle,
                    carried,
                })
            })
            .boxed()
    }

    pub async fn carried_types(&self, job_id: i64, carry: &[String]) -> Result<Vec<(String, CarriedType)>, StoreError> {
        let seen: Vec<(String, String)> = sqlx::query_as(
            "SELECT DISTINCT e.key, e.type FROM job_inputs ji, json_each(ji.carried) e WHERE ji.job_id = ?",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(carry
            .iter()
            .map(|name| {
                let kinds: Vec<&str> = seen.iter().filter(|(k, _)| k == name).map(|(_, t)| t.as_str()).collect();
                let types: Vec<String> = kinds
                    .iter()
                    .map(|t| match *t {
                        "integer" | "real" => "number",
                        "true" | "false" => "boolean",
                        "text" => "string",
                        other => other,
                    })
                    .map(str::to_string)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                (name.clone(), CarriedType::infer(&types, !kinds.contains(&"real")))
            })
            .collect())
    }

    pub async fn job_date(&self, job_id: i64) -> Result<NaiveDate, StoreError> {
        let created: f64 = sqlx::query_scalar("SELECT created_at FROM jobs WHERE job_id = ?")
            .bind(job_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(to_time(Some(created)).unwrap_or_default().date_naive())
    }

    pub async fn heartbeat(&self, job_id: i64) -> Result<(), StoreError> {
        sqlx::query(q("UPDATE jobs SET updated_at = NOW WHERE job_id = ? AND state = 'writing'"))
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn advance(&self, job_id: i64, spec: &JobSpec) -> Result<Next, StoreError> {
        // Called after every batch: while others remain (nearly always),
        // say so without taking the write lock.
        if busy(&self.pool, job_id).await? {
            return Ok(Next::Nothing);
        }
        let mut tx = self.write_tx().await?;
        let row: Option<(String, bool, bool)> =
            sqlx::query_as("SELECT state, batches_planned, recalls_planned FROM jobs WHERE job_id = ?")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, batches_planned, recalls_planned)) = row else { return Ok(Next::Nothing) };
        if !matches!(state.as_str(), "running" | "waiting") || !batches_planned {
            return Ok(Next::Nothing);
        }
        // Again under the lock: another process may have ended the last batch meanwhile.
        if busy(&mut *tx, job_id).await? {
            return Ok(Next::Nothing);
        }
        let mode = RecallMode::of(&spec.recalls);
        if mode != RecallMode::Off && !recalls_planned {
            let planned = plan_recalls(&mut tx, job_id, mode, spec.recalls.ttl_hours()).await?;
            if planned > 0 {
                tx.commit().await?;
                return Ok(Next::Enqueue);
            }
        }
        if mode != RecallMode::Off {
            summarise_recalls(&mut tx, job_id, mode).await?;
        }
        let (next, state) = if spec.outputs.is_empty() { (Next::Done, "done") } else { (Next::Write, "writing") };
        sqlx::query(q("UPDATE jobs SET state = ?2, updated_at = NOW, state_reason = NULL, resume_at = NULL,
                 finished_at = CASE WHEN ?2 = 'done' THEN NOW ELSE finished_at END,
                 write_started_at = CASE WHEN ?2 = 'writing' THEN NOW ELSE write_started_at END
             WHERE job_id = ?1"))
        .bind(job_id)
        .bind(state)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(next)
    }

    pub async fn job_spec(&self, job_id: i64) -> Result<Result<JobSpec, String>, StoreError> {
        let text: String = sqlx::query_scalar("SELECT spec FROM jobs WHERE job_id = ?")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NoJob(job_id))?;
        Ok(serde_json::from_str(&text).map_err(|e| format!("stored spec of job {job_id} is unreadable: {e}")))
    }

    pub async fn update_spec(&self, job_id: i64, spec: &Value) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET spec = ? WHERE job_id = ?")
            .bind(spec.to_string())
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn begin_rewrite(&self, job_id: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(q(
            "UPDATE jobs SET state = 'writing', write_started_at = NOW, state_reason = NULL, updated_at = NOW
             WHERE job_id = ?1 AND state IN ('done', 'failed', 'cancelled') AND batches_planned
               AND NOT EXISTS (SELECT 1 FROM batches WHERE job_id = ?1 AND state IN ('queued', 'running'))",
        ))
        .bind(job_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub async fn orphaned_writes(&self, lease_secs: f64) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(q(
            "UPDATE jobs SET updated_at = NOW WHERE state = 'writing' AND updated_at < NOW - ? RETURNING job_id",
        ))
        .bind(lease_secs)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn job_outputs(&self, job_id: i64) -> Result<Option<Vec<String>>, StoreError> {
        let row: Option<Option<String>> = sqlx::query_scalar("SELECT outputs_written FROM jobs WHERE job_id = ?")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|o| o.and_then(|o| serde_json::from_str(&o).ok()).unwrap_or_default()))
    }

    pub async fn set_outputs(&self, job_id: i64, outputs: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET outputs_written = ? WHERE job_id = ?")
            .bind(Value::from(outputs.to_vec()).to_string())
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn finish_writing(&self, job_id: i64, outputs: &[String]) -> Result<(), StoreError> {
        sqlx::query(q("UPDATE jobs SET state = 'done', outputs_written = ?2, finished_at = NOW, updated_at = NOW,
                 state_reason = NULL WHERE job_id = ?1 AND state = 'writing'"))
        .bind(job_id)
        .bind(Value::from(outputs.to_vec()).to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn fail_writing(&self, job_id: i64, reason: &str) -> Result<(), StoreError> {
        sqlx::query(q("UPDATE jobs SET state = 'failed', state_reason = ?2, finished_at = NOW, updated_at = NOW
             WHERE job_id = ?1 AND state = 'writing'"))
        .bind(job_id)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        sqlx::query("INSERT INTO errors (job_id, error_code, error_text) VALUES (?, 'output_failed', ?)")
            .bind(job_id)
            .bind(reason)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn lookup(&self, key: &str) -> Result<Option<Lookup>, StoreError> {
        type LookupRow = (Option<String>, Option<String>, Option<i32>, Option<String>);
        let row: Option<LookupRow> =
            sqlx::query_as("SELECT make, model, model_year, vin FROM recall_lookups WHERE lookup_key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(make, model, model_year, vin)| Lookup { key: key.to_string(), make, model, model_year, vin }))
    }

    pub async fn complete_recall(
        &self,
        job_id: i64,
        batch_no: i32,
        key: &str,
        recalls: &[crate::api::Recall],
    ) -> Result<(), StoreError> {
        let seen = super::distinct_campaigns(recalls);
        let json: Vec<Value> = seen
            .iter()
            .map(|(n, r)| {
                json!({"n": n, "m": r.manufacturer, "c": r.component, "s": r.summary, "q": r.consequence,
                       "r": r.remedy, "o": r.notes.clone().filter(|o| !o.is_empty()), "d": iso_date(&r.report_received_date),
                       "p": r.park_it, "po": r.park_outside, "ota": r.over_the_air_update})
            })
            .collect();
        let mut tx = self.write_tx().await?;
        sqlx::query(q("INSERT INTO recalls (campaign_number, manufacturer, component, summary, consequence, remedy,
                 notes, report_received_date, park_it, park_outside, over_the_air_update, updated_at)
             SELECT value ->> 'n', value ->> 'm', value ->> 'c', value ->> 's', value ->> 'q', value ->> 'r',
                    value ->> 'o', value ->> 'd', value ->> 'p', value ->> 'po', value ->> 'ota', NOW
             FROM json_each(?1) WHERE true
             ON CONFLICT (campaign_number) DO UPDATE SET manufacturer = excluded.manufacturer,
                 component = excluded.component, summary = excluded.summary, consequence = excluded.consequence,
                 remedy = excluded.remedy, notes = excluded.notes, report_received_date = excluded.report_received_date,
                 park_it = excluded.park_it, park_outside = excluded.park_outside,
                 over_the_air_update = excluded.over_the_air_update, updated_at = excluded.updated_at"))
        .bind(Value::Array(json).to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM recall_lookup_campaigns WHERE lookup_key = ?").bind(key).execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO recall_lookup_campaigns (lookup_key, campaign_number) SELECT ?1, value FROM json_each(?2)",
        )
        .bind(key)
        .bind(Value::from(seen.keys().cloned().collect::<Vec<_>>()).to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query(q(
            "UPDATE recall_lookups SET looked_up_at = NOW, campaigns = ?2, error_text = NULL, failed_at = NULL
             WHERE lookup_key = ?1",
        ))
        .bind(key)
        .bind(seen.len() as i64)
        .execute(&mut *tx)
        .await?;
        self.batch_done(&mut tx, job_id, batch_no, true).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn reprocess(
        &self,
        job_id: i64,
        failed_only: bool,
        batch_size: i32,
        cache_ttl_hours: f64,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.write_tx().await?;
        let ended: Option<bool> =
            sqlx::query_scalar("SELECT state IN ('done', 'failed', 'cancelled') FROM jobs WHERE job_id = ?")
                .bind(job_id)
                .fetch_optional(&mut *tx)
                .await?;
        if ended != Some(true) {
            return Ok(None);
        }
        sqlx::query(
            "UPDATE job_inputs SET status = 'pending', error_code = NULL, error_text = NULL, decoded_at = NULL
             WHERE job_id = ?1 AND status <> 'invalid' AND (NOT ?2 OR status = 'failed')",
        )
        .bind(job_id)
        .bind(failed_only)
        .execute(&mut *tx)
        .await?;
        sqlx::query(q("UPDATE job_inputs SET status = 'decoded', decoded_at = c.decoded_at
             FROM vin_cache c
             WHERE job_inputs.job_id = ?1 AND job_inputs.status = 'pending' AND c.vin = job_inputs.vin
               AND c.error_code IS NULL AND c.decoded_at > NOW - ?2 * 3600"))
        .bind(job_id)
        .bind(cache_ttl_hours)
        .execute(&mut *tx)
        .await?;
        let batches = batch_pending(&mut tx, job_id, batch_size).await?;
        sqlx::query(q("UPDATE jobs SET state = 'running', state_reason = NULL, resume_at = NULL, finished_at = NULL,
                 started_at = NOW, planned_at = NOW, write_started_at = NULL, recalls_planned = 0, outputs_written = NULL, rows_with_recalls = NULL, rows_recalls_unknown = NULL,
                 campaigns_found = NULL, updated_at = NOW
             WHERE job_id = ?"))
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(batches))
    }

    /// Batches whose queue task was lost (see `worker::sweep`): taken over
    /// from a dead worker, or rescheduled but never pushed.
    pub async fn lost_tasks(&self) -> Result<Vec<(i64, i32, i32)>, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut lost: Vec<(i64, i32, i32)> = sqlx::query_as(q("UPDATE batches SET state = 'queued', enqueued = 0,
                 generation = generation + 1, updated_at = NOW
             WHERE state = 'running' AND EXISTS (
                 SELECT 1 FROM jobs j WHERE j.job_id = batches.job_id AND j.state IN ('running', 'waiting')
                   AND batches.updated_at < NOW - (2 * (j.spec ->> '$.provider.timeout_secs') + 30))
             RETURNING job_id, batch_no, generation"))
        .fetch_all(&mut *tx)
        .await?;
        let unpushed: Vec<(i64, i32, i32)> = sqlx::query_as(q("SELECT b.job_id, b.batch_no, b.generation
             FROM batches b JOIN jobs j USING (job_id)
             WHERE j.state IN ('running', 'waiting') AND b.state = 'queued' AND NOT b.enqueued
               AND b.updated_at < NOW - 10"))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        lost.extend(unpushed);
        Ok(lost)
    }
}

/// Whether any of the job's batches is queued or running.
async fn busy<'e>(db: impl sqlx::SqliteExecutor<'e>, job_id: i64) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM batches WHERE job_id = ? AND state IN ('queued', 'running'))")
        .bind(job_id)
        .fetch_one(db)
        .await?)
}

/// Cuts the job's pending VINs, distinct and sorted, into batches of
/// `batch_size`, numbered after any the job already has.
async fn batch_pending(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    job_id: i64,
    batch_size: i32,
) -> Result<i64, StoreError> {
    Ok(sqlx::query(
        "INSERT INTO batches (job_id, batch_no, vins)
         SELECT ?1, base + (n - 1) / ?2, json_group_array(vin)
         FROM (SELECT vin, row_number() OVER (ORDER BY vin) AS n,
                      (SELECT coalesce(max(batch_no) + 1, 0) FROM batches WHERE job_id = ?1) AS base
               FROM (SELECT DISTINCT vin FROM job_inputs WHERE job_id = ?1 AND status = 'pending') ORDER BY vin)
         GROUP BY base + (n - 1) / ?2",
    )
    .bind(job_id)
    .bind(i64::from(batch_size))
    .execute(&mut **tx)
    .await?
    .rows_affected() as i64)
}

/// NHTSA's `DD/MM/YYYY` as `YYYY-MM-DD` (anything else: none).
fn iso_date(d: &str) -> Option<String> {
    let p: Vec<&str> = d.trim().split('/').collect();
    match p.as_slice() {
        [dd, mm, yyyy] if dd.len() == 2 && mm.len() == 2 && yyyy.len() == 4 => Some(format!("{yyyy}-{mm}-{dd}")),
        _ => None,
    }
}

async fn plan_recalls(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    job_id: i64,
    mode: RecallMode,
    ttl_hours: f64,
) -> Result<i64, StoreError> {
    let keys = format!(
        "SELECT key, min(make), min(model), min(year), min(vin) FROM (
             SELECT ({key}) AS key, c.make AS make, c.model AS model, c.model_year AS year, ji.vin AS vin
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin
             WHERE ji.job_id = ?1 AND ji.status = 'decoded')
         WHERE key IS NOT NULL GROUP BY key",
        key = key_expr()
    );
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS recall_keys (key TEXT PRIMARY KEY, make TEXT, model TEXT, year INTEGER, vin TEXT)",
    )
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM temp.recall_keys").execute(&mut **tx).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO temp.recall_keys {keys}")))
        .bind(job_id)
        .bind(mode.as_str())
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO recall_lookups (lookup_key, make, model, model_year, vin)
         SELECT key, make, model, year, CASE WHEN ?1 = 'vin' THEN vin END FROM temp.recall_keys WHERE true
         ON CONFLICT (lookup_key) DO NOTHING",
    )
    .bind(mode.as_str())
    .execute(&mut **tx)
    .await?;
    let made = sqlx::query(q("INSERT INTO batches (job_id, batch_no, kind, vins, lookup_key)
         SELECT ?1, base + row_number() OVER (ORDER BY k.key) - 1, 'recall', json_array(k.vin), k.key
         FROM temp.recall_keys k JOIN recall_lookups l ON l.lookup_key = k.key,
              (SELECT coalesce(max(batch_no) + 1, 0) AS base FROM batches WHERE job_id = ?1)
         WHERE l.looked_up_at IS NULL OR l.looked_up_at <= NOW - ?2 * 3600
            OR (l.failed_at IS NOT NULL AND l.failed_at > l.looked_up_at)"))
    .bind(job_id)
    .bind(ttl_hours)
    .execute(&mut **tx)
    .await?
    .rows_affected() as i64;
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM temp.recall_keys").fetch_one(&mut **tx).await?;
    sqlx::query(q("UPDATE jobs SET recalls_planned = 1, recall_lookups = ?2, recall_cache_hits = ?3, updated_at = NOW
         WHERE job_id = ?1"))
    .bind(job_id)
    .bind(keys)
    .bind(keys - made)
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM temp.recall_keys").execute(&mut **tx).await?;
    Ok(made)
}

async fn summarise_recalls(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    job_id: i64,
    mode: RecallMode,
) -> Result<(), StoreError> {
    let sql = format!(
        "WITH r AS (
             SELECT rl.lookup_key,
                    coalesce(rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at), 0)
                        AS known
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin
             LEFT JOIN recall_lookups rl ON rl.lookup_key = ({key})
             WHERE ji.job_id = ?1 AND ji.status = 'decoded'),
         per AS (SELECT lookup_key, count(*) AS n FROM recall_lookup_campaigns GROUP BY lookup_key)
         UPDATE jobs SET
             rows_with_recalls = (SELECT count(*) FROM r JOIN per USING (lookup_key) WHERE r.known),
             rows_recalls_unknown = (SELECT count(*) FROM r WHERE NOT r.known),
             campaigns_found = (SELECT count(DISTINCT lc.campaign_number) FROM recall_lookup_campaigns lc
                                WHERE lc.lookup_key IN (SELECT lookup_key FROM r WHERE r.known))
         WHERE job_id = ?1",
        key = key_expr()
    );
    sqlx::query(sqlx::AssertSqlSafe(sql)).bind(job_id).bind(mode.as_str()).execute(&mut **tx).await?;
    Ok(())
}

/// The shared limiter's arithmetic (Postgres runs it as `limiter_reserve`),
/// in one `BEGIN IMMEDIATE` transaction with SQLite's clock.
impl SqliteStore {
    pub async fn limiter_register(&self, p: &crate::spec::ProviderSpec) -> Result<(), StoreError> {
        sqlx::query(q("INSERT INTO limiter (account, rate, burst, daily_quota, quota_reset, max_in_flight)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (account) DO UPDATE SET rate = excluded.rate, burst = excluded.burst,
                 daily_quota = excluded.daily_quota, quota_reset = excluded.quota_reset,
                 max_in_flight = excluded.max_in_flight, updated_at = NOW"))
        .bind(p.account())
        .bind(p.requests_per_second)
        .bind(p.burst())
        .bind(p.daily_quota.map(|q| q as i64))
        .bind(f64::from(p.quota_reset_minutes()) * 60.0)
        .bind(p.max_in_flight.map(|n| i64::from(n.max(1))))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One reservation (see [`Bucket::reserve`]) at `now`, or SQLite's
    /// clock: the decision, the time it was made at, and the flight ids.
    pub async fn limiter_reserve(
        &self,
        account: &str,
        k: i64,
        lease_secs: f64,
        now: Option<f64>,
    ) -> Result<(Reservation, f64, Vec<i64>), StoreError> {
        let mut tx = self.write_tx().await?;
        type Row = (f64, f64, f64, f64, f64, Option<i64>, f64, f64, i64, Option<i64>, f64, Option<f64>, f64);
        let (
            rate,
            burst,
            scale,
            tat,
            blocked_until,
            daily_quota,
            quota_reset,
            quota_day_start,
            day_used,
            cap,
            t,
            circuit_since,
            circuit_probe_at,
        ): Row = sqlx::query_as(
            "SELECT rate, burst, scale, tat, blocked_until, daily_quota, quota_reset, quota_day_start, day_used,
                    max_in_flight, coalesce(?2, unixepoch('subsec')), circuit_since, circuit_probe_at
             FROM limiter WHERE account = ?1",
        )
        .bind(account)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let bucket = Bucket {
            rate,
            burst,
            scale,
            tat,
            blocked_until,
            daily_quota,
            quota_reset,
            quota_day_start,
            day_used,
            max_in_flight: cap,
            circuit_since,
            circuit_probe_at,
        };
        let mut in_flight = 0;
        if cap.is_some() {
            sqlx::query("DELETE FROM limiter_flights WHERE account = ? AND expires_at <= ?")
                .bind(account)
                .bind(t)
                .execute(&mut *tx)
                .await?;
            in_flight = sqlx::query_scalar("SELECT count(*) FROM limiter_flights WHERE account = ?")
                .bind(account)
                .fetch_one(&mut *tx)
                .await?;
        }
        let decision = bucket.reserve(t, k, in_flight, lease_secs);
        if let Some(row) = &decision.row {
            sqlx::query(
                "UPDATE limiter SET tat = ?2, quota_day_start = ?3, day_used = ?4, updated_at = ?5, circuit_probe_at = ?6
                 WHERE account = ?1",
            )
            .bind(account)
            .bind(row.tat)
            .bind(row.quota_day_start)
            .bind(row.day_used)
            .bind(t)
            .bind(row.circuit_probe_at)
            .execute(&mut *tx)
            .await?;
        }
        let mut flights = Vec::new();
        if cap.is_some() {
            for _ in 0..decision.granted {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO limiter_flights (account, expires_at) VALUES (?, ?) RETURNING flight_id",
                )
                .bind(account)
                .bind(t + lease_secs)
                .fetch_one(&mut *tx)
                .await?;
                flights.push(id);
            }
        }
        tx.commit().await?;
        Ok((decision, t, flights))
    }

    /// Gives unused reserved calls back to the quota day they were granted in.
    pub async fn limiter_refund(&self, account: &str, n: i64, granted_at: f64) -> Result<(), StoreError> {
        sqlx::query("UPDATE limiter SET day_used = max(0, day_used - ?2) WHERE account = ?1 AND quota_day_start <= ?3")
            .bind(account)
            .bind(n)
            .bind(granted_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn limiter_release(&self, flight: i64) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM limiter_flights WHERE flight_id = ?").bind(flight).execute(&self.pool).await?;
        Ok(())
    }

    /// A 429: everyone waits `retry_after`; without one the rate halves (to
    /// `min_scale` at least) and everyone waits one new interval.
    pub async fn limiter_push_back(
        &self,
        account: &str,
        retry_after: Option<f64>,
        min_scale: f64,
    ) -> Result<(), StoreError> {
        match retry_after {
            Some(secs) => {
                sqlx::query(q("UPDATE limiter SET blocked_until = max(blocked_until, NOW + ?2), updated_at = NOW
                     WHERE account = ?1"))
                .bind(account)
                .bind(secs)
                .execute(&self.pool)
                .await?
            }
            None => {
                sqlx::query(q("UPDATE limiter SET scale = max(?2, scale / 2),
                         blocked_until = max(blocked_until, NOW + 1.0 / (rate * max(?2, scale / 2))), updated_at = NOW
                     WHERE account = ?1"))
                .bind(account)
                .bind(min_scale)
                .execute(&self.pool)
                .await?
            }
        };
        Ok(())
    }

    pub async fn limiter_answered(&self, account: &str, success: bool, step: f64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE limiter SET scale = CASE WHEN ?2 THEN min(1, scale + ?3) ELSE scale END,
                 circuit_since = NULL, circuit_failures = 0, circuit_reason = NULL, server_errors = 0
             WHERE account = ?1 AND ((?2 AND scale < 1) OR circuit_since IS NOT NULL OR server_errors > 0)",
        )
        .bind(account)
        .bind(success)
        .bind(step)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn limiter_server_error(&self, account: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE limiter SET server_errors = server_errors + 1 WHERE account = ? RETURNING server_errors",
        )
        .bind(account)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Opens the circuit (see `SharedLimiter::trip`).
    pub async fn limiter_trip(&self, account: &str, reason: &str, max_gap: i64, refund: i64) -> Result<(), StoreError> {
        sqlx::query(q("UPDATE limiter SET circuit_since = coalesce(circuit_since, NOW),
                 circuit_probe_at = NOW + min(?3, 1 << min(circuit_failures, 10)),
                 circuit_failures = circuit_failures + 1, circuit_reason = ?2, server_errors = 0,
                 day_used = max(0, day_used - ?4)
             WHERE account = ?1"))
        .bind(account)
        .bind(reason)
        .bind(max_gap)
        .bind(refund)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
