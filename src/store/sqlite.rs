//! The SQLite dialect: one machine, one file, no service (the demo's
//! default). What differs from Postgres: arrays and JSON travel as JSON
//! text, times are Unix seconds from SQLite's clock, writes take the
//! database's lock up front (`BEGIN IMMEDIATE`, after the process's own
//! turn: `super::core::Store::write`), planning holds a lease on
//! the job's row, the limiter's arithmetic runs in Rust ([`super::bucket`])
//! inside one write transaction, and a few statements take SQLite's shape.
//! Everything else is the core's (`super::core`), which calls in here;
//! nothing here calls back.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row as _, Sqlite, TypeInfo, ValueRef};

use super::bucket::Bucket;
use super::records::StoreError;
use super::sql::{Arg, Row, Val, args, bind_args, runners};
use crate::columns::{RecallMode, VEHICLE_COLUMNS};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

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

/// Opens (creating if needed) the state file and the queue file beside it,
/// and migrates the state. Returns the two pools and an exclusive lock on
/// the state: hold it while the queue's own tables are set up.
pub async fn open(url: &str, max_connections: u32) -> Result<(SqlitePool, SqlitePool, std::fs::File), StoreError> {
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
    MIGRATOR.run(&pool).await.map_err(|source| StoreError::Migrate { schema: path.to_string(), source })?;
    Ok((pool, queue_pool, lock))
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

fn bind<'q>(
    q: sqlx::query::Query<'q, Sqlite, SqliteArguments>,
    args: &[Arg],
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments> {
    bind_args!(q, args, json: Value::to_string, texts: |t: &Option<Vec<String>>| t.as_ref().map(|t| Value::from(t.clone()).to_string()))
}

runners!(SqliteExecutor);

/// Streams a query's rows (the output's: memory stays flat whatever the
/// job's size).
pub(super) fn stream<'a>(
    pool: &'a SqlitePool,
    sql: &'static str,
    args: &[Arg],
) -> BoxStream<'a, Result<Row, StoreError>> {
    bind(sqlx::query(sqlx::AssertSqlSafe(sql)), args).fetch(pool).map(|r| row(&r?)).boxed()
}

/// A row, by each value's own type (SQLite types values, not columns).
fn row(r: &SqliteRow) -> Result<Row, StoreError> {
    let mut vals = Vec::with_capacity(r.len());
    for i in 0..r.len() {
        let raw = r.try_get_raw(i)?;
        let v = if raw.is_null() {
            Val::Null
        } else {
            match raw.type_info().name() {
                "INTEGER" | "BOOLEAN" => Val::Int(r.try_get(i)?),
                "REAL" => Val::Real(r.try_get(i)?),
                _ => Val::Text(r.try_get(i)?),
            }
        };
        vals.push(v);
    }
    Ok(Row(vals))
}

/// Cuts the job's pending VINs, distinct and sorted, into batches of `$2`,
/// numbered after any the job already has.
pub(super) const BATCH_PENDING: &str = "INSERT INTO batches (job_id, batch_no, vins)
     SELECT $1, base + (n - 1) / $2, json_group_array(vin)
     FROM (SELECT vin, row_number() OVER (ORDER BY vin) AS n,
                  (SELECT coalesce(max(batch_no) + 1, 0) FROM batches WHERE job_id = $1) AS base
           FROM (SELECT DISTINCT vin FROM job_inputs WHERE job_id = $1 AND status = 'pending') ORDER BY vin)
     GROUP BY base + (n - 1) / $2";

/// The key a decoded VIN's recalls are looked up under (as in the
/// Postgres `recall_key` function), for table alias `c` of vin_cache.
const RECALL_KEY: &str = "CASE WHEN nullif(trim(c.make), '') IS NULL OR nullif(trim(c.model), '') IS NULL
                                 OR c.model_year IS NULL THEN NULL
                            ELSE 'mmy:' || upper(trim(c.make)) || '|' || upper(trim(c.model)) || '|' || c.model_year END";

/// A job row's recall key (alias `ji` of job_inputs, `c` of vin_cache;
/// `$2` the recall mode), for decoded rows only.
fn key_expr() -> String {
    format!(
        "CASE WHEN ji.status <> 'decoded' THEN NULL WHEN $2 = 'vin' THEN 'vin:' || ji.vin WHEN $2 = 'model' THEN {RECALL_KEY} END"
    )
}

/// Job `$1`'s distinct recall keys (`$2`: the mode) into `temp.recall_keys`.
static RECALL_KEYS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO temp.recall_keys
         SELECT key, min(make), min(model), min(year), min(vin) FROM (
             SELECT ({key}) AS key, c.make AS make, c.model AS model, c.model_year AS year, ji.vin AS vin
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin
             WHERE ji.job_id = $1 AND ji.status = 'decoded')
         WHERE key IS NOT NULL GROUP BY key",
        key = key_expr()
    )
});

/// Registers every distinct lookup the job needs and creates a recall
/// batch for each one the cache cannot answer (through a temporary table:
/// SQLite has no data-modifying CTEs). Returns (lookups, batches made).
pub(super) async fn plan_recalls(
    tx: &mut SqliteConnection,
    job_id: i64,
    mode: RecallMode,
    ttl_hours: f64,
) -> Result<(i64, i64), StoreError> {
    exec(
        &mut *tx,
        "CREATE TEMP TABLE IF NOT EXISTS recall_keys (key TEXT PRIMARY KEY, make TEXT, model TEXT, year INTEGER, vin TEXT)",
        &[],
    )
    .await?;
    exec(&mut *tx, RECALL_KEYS.as_str(), args![job_id, mode.as_str()]).await?;
    exec(
        &mut *tx,
        "INSERT INTO recall_lookups (lookup_key, make, model, model_year, vin)
         SELECT key, make, model, year, CASE WHEN $1 = 'vin' THEN vin END FROM temp.recall_keys WHERE true
         ON CONFLICT (lookup_key) DO NOTHING",
        args![mode.as_str()],
    )
    .await?;
    let made = exec(
        &mut *tx,
        "INSERT INTO batches (job_id, batch_no, kind, vins, lookup_key)
         SELECT $1, base + row_number() OVER (ORDER BY k.key) - 1, 'recall', json_array(k.vin), k.key
         FROM temp.recall_keys k JOIN recall_lookups l ON l.lookup_key = k.key,
              (SELECT coalesce(max(batch_no) + 1, 0) AS base FROM batches WHERE job_id = $1)
         WHERE l.looked_up_at IS NULL OR l.looked_up_at <= unixepoch('subsec') - $2 * 3600
            OR (l.failed_at IS NOT NULL AND l.failed_at > l.looked_up_at)",
        args![job_id, ttl_hours],
    )
    .await?;
    let keys = rows(&mut *tx, "SELECT count(*) FROM temp.recall_keys", &[]).await?[0].int(0)?;
    // The table lives as long as the pooled connection: leave it empty.
    exec(&mut *tx, "DELETE FROM temp.recall_keys", &[]).await?;
    Ok((keys, made as i64))
}

/// Stores job `$1`'s recall figures (`$2`: the mode): rows with recalls,
/// rows whose recalls are unknown, distinct campaigns found.
pub(super) static SUMMARISE_RECALLS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS (
             SELECT rl.lookup_key,
                    coalesce(rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at), 0)
                        AS known
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin
             LEFT JOIN recall_lookups rl ON rl.lookup_key = ({key})
             WHERE ji.job_id = $1 AND ji.status = 'decoded'),
         per AS (SELECT lookup_key, count(*) AS n FROM recall_lookup_campaigns GROUP BY lookup_key)
         UPDATE jobs SET
             rows_with_recalls = (SELECT count(*) FROM r JOIN per USING (lookup_key) WHERE r.known),
             rows_recalls_unknown = (SELECT count(*) FROM r WHERE NOT r.known),
             campaigns_found = (SELECT count(DISTINCT lc.campaign_number) FROM recall_lookup_campaigns lc
                                WHERE lc.lookup_key IN (SELECT lookup_key FROM r WHERE r.known))
         WHERE job_id = $1",
        key = key_expr()
    )
});

/// Each carried column of job `$1`: its JSON types (in Postgres' names),
/// and whether its numbers are all integers.
pub(super) static CARRIED_TYPES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT e.key,
        json_group_array(DISTINCT CASE e.type WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number'
                                   WHEN 'true' THEN 'boolean' WHEN 'false' THEN 'boolean'
                                   WHEN 'text' THEN 'string' ELSE e.type END),
        -- An integer within CARRIED_INT_MAX (one past 64 bits is held as a
        -- real).
        min(CASE e.type WHEN 'real' THEN 0
                        WHEN 'integer' THEN typeof(e.atom) = 'integer' AND e.atom BETWEEN -{max} AND {max}
                        ELSE 1 END)
     FROM job_inputs ji, json_each(ji.carried) e WHERE ji.job_id = $1 GROUP BY e.key",
        max = crate::columns::CARRIED_INT_MAX
    )
});

/// The query every output reads: one row per input row, in source order,
/// with the cached decode (for decoded rows) and the row's recalls.
pub(super) static OUTPUT_SQL: LazyLock<String> = LazyLock::new(|| {
    let vehicle: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("ji.raw ->> '$.{field}'")).collect();
    let known = "rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at)";
    format!(
        "SELECT ji.source, ji.row_number, ji.raw_vin, ji.vin, ji.status, ji.error_code, ji.error_text,
                ji.decoded_at, ji.check_digit_valid, ji.carried,
                CASE WHEN {known} THEN coalesce((SELECT json_group_array(campaign_number) FROM
                    (SELECT campaign_number FROM recall_lookup_campaigns WHERE lookup_key = rl.lookup_key
                     ORDER BY campaign_number)), '[]') END AS campaigns,
                CASE WHEN $2 = 'off' OR ji.status <> 'decoded' THEN NULL
                     WHEN {known} THEN NULL
                     WHEN rl.error_text IS NOT NULL THEN 'recall lookup failed: ' || rl.error_text
                     WHEN ji.key IS NULL THEN 'no make, model and model year to look recalls up by'
                     ELSE 'recalls were not looked up' END AS recall_error,
                {vehicle}
         FROM (SELECT ji.*, c.raw AS raw, ({key}) AS key
               FROM job_inputs ji LEFT JOIN vin_cache c ON c.vin = ji.vin AND ji.status = 'decoded'
               WHERE ji.job_id = $1) ji
         LEFT JOIN recall_lookups rl ON rl.lookup_key = ji.key
         ORDER BY ji.source, ji.row_number",
        vehicle = vehicle.join(", "),
        key = key_expr(),
    )
});

/// One reservation ([`Bucket::reserve`]) at `now`, or SQLite's clock, in
/// one write transaction: the decision, the time it was made at, and the
/// flight ids under an in-flight cap.
pub(super) async fn limiter_reserve(
    tx: &mut sqlx::SqliteConnection,
    account: &str,
    k: i64,
    lease_secs: f64,
    now: Option<f64>,
) -> Result<(i64, f64, Option<String>, f64, Vec<i64>), StoreError> {
    let r = rows(
        &mut *tx,
        "SELECT rate, burst, scale, tat, blocked_until, daily_quota, quota_reset, quota_day_start, day_used,
                max_in_flight, coalesce($2, unixepoch('subsec')), circuit_since, circuit_probe_at
         FROM limiter WHERE account = $1",
        args![account, now],
    )
    .await?
    .pop()
    .ok_or(StoreError::Sql(sqlx::Error::RowNotFound))?;
    let bucket = Bucket {
        rate: r.opt_real(0)?.unwrap_or(1.0),
        burst: r.opt_real(1)?.unwrap_or(1.0),
        scale: r.opt_real(2)?.unwrap_or(1.0),
        tat: r.opt_real(3)?.unwrap_or(0.0),
        blocked_until: r.opt_real(4)?.unwrap_or(0.0),
        daily_quota: r.opt_int(5)?,
        quota_reset: r.opt_real(6)?.unwrap_or(0.0),
        quota_day_start: r.opt_real(7)?.unwrap_or(0.0),
        day_used: r.int(8)?,
        max_in_flight: r.opt_int(9)?,
        circuit_since: r.opt_real(11)?,
        circuit_probe_at: r.opt_real(12)?.unwrap_or(0.0),
    };
    let t = r.opt_real(10)?.unwrap_or(0.0);
    let mut in_flight = 0;
    if bucket.max_in_flight.is_some() {
        exec(&mut *tx, "DELETE FROM limiter_flights WHERE account = $1 AND expires_at <= $2", args![account, t])
            .await?;
        let n = rows(&mut *tx, "SELECT count(*) FROM limiter_flights WHERE account = $1", args![account]).await?;
        in_flight = n[0].int(0)?;
    }
    let d = bucket.reserve(t, k, in_flight, lease_secs);
    if let Some(row) = &d.row {
        exec(
            &mut *tx,
            "UPDATE limiter SET tat = $2, quota_day_start = $3, day_used = $4, updated_at = $5, circuit_probe_at = $6
             WHERE account = $1",
            args![account, row.tat, row.quota_day_start, row.day_used, t, row.circuit_probe_at],
        )
        .await?;
    }
    let mut flights = Vec::new();
    if bucket.max_in_flight.is_some() {
        for _ in 0..d.granted {
            let id = rows(
                &mut *tx,
                "INSERT INTO limiter_flights (account, expires_at) VALUES ($1, $2) RETURNING flight_id",
                args![account, t + lease_secs],
            )
            .await?;
            flights.push(id[0].int(0)?);
        }
    }
    Ok((d.granted, d.wait, d.reason.map(str::to_string), t, flights))
}
