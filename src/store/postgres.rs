//! The Postgres dialect: the production store, for many machines. What
//! differs from SQLite: arrays and `jsonb` bind natively, times are
//! `timestamptz`, planning holds a session advisory lock, the limiter runs
//! as one SQL function (`limiter_reserve`, migration 0003) under the
//! account row's lock, and a few statements take Postgres' own shape.
//! Everything else is the core's (`super::core`), which calls in here;
//! nothing here calls back.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Column, Postgres, Row as _, TypeInfo};

use super::records::{StoreError, check_schema, redact};
use super::sql::{Arg, Row, Val, bind_args, runners};
use crate::columns::VEHICLE_COLUMNS;

/// The runner's migrations, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long to wait for Postgres before telling the user it is unreachable:
/// long enough for a busy server, short enough to fail fast on a wrong URL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pool options for every Postgres pool vinetl opens (state, queue setup,
/// sources, output databases): each new connection gets TCP_NODELAY.
pub fn pool_options(options: &PgConnectOptions) -> PgPoolOptions {
    let port = options.get_port();
    let tcp = options.get_socket().is_none();
    PgPoolOptions::new().after_connect(move |_, _| {
        Box::pin(async move {
            if tcp {
                nodelay_to_port(port);
            }
            Ok(())
        })
    })
}

/// Turns Nagle's algorithm off on this process's TCP sockets connected to
/// `port` (the database's).
///
/// Why by hand, and why this way: sqlx 0.9.0 no longer sets TCP_NODELAY on
/// its connections (transact-rs/sqlx#4335; fixed upstream after 0.9.0, the
/// newest release), and it gives no hook on its socket. With Nagle on, a
/// statement whose message spans more than one TCP segment waits for the
/// server's delayed ACK, up to 40 ms: a group of stored answers (about 80
/// VINs of JSON) took 32 ms instead of 2 on loopback, and a cold run was
/// twice as slow (BENCHMARKS.md). libpq and JDBC set the option on every
/// connection; this sets it on sqlx's, found by their peer port. Setting it
/// on any other socket to that port (another pool's) is what we want too.
/// Remove it once sqlx sets the option again.
#[cfg(target_os = "linux")]
fn nodelay_to_port(port: u16) {
    use std::os::fd::{BorrowedFd, RawFd};
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return };
    for entry in fds.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
        if !std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        // SAFETY: the descriptor is only borrowed for two socket options
        // and a peer address, never read, written or closed. If another
        // thread closed it meanwhile (and the number was reused), these
        // calls fail (not a socket) or touch another socket, where the
        // peer-port check, or no harm, follows.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let to_db = socket.peer_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port);
        if to_db && socket.tcp_nodelay().is_ok_and(|on| !on) {
            let _ = socket.set_tcp_nodelay(true);
        }
    }
}

/// Elsewhere the latency stays as sqlx leaves it.
#[cfg(not(target_os = "linux"))]
fn nodelay_to_port(_port: u16) {}

/// Connects with `schema` first on the search path. Fails fast, naming the
/// (redacted) URL, when the server cannot be reached.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let schema = check_schema(schema)?;
    let shown = redact(url);
    let connect_err = |error| StoreError::Connect { url: shown.clone(), error };
    let options = PgConnectOptions::from_str(url)
        .map_err(connect_err)?
        // `public` stays on the path for the extensions apalis installs there.
        .options([("search_path", format!("{schema}, public"))])
        .application_name("vinetl");
    pool_options(&options)
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(connect_err)
}

/// Connects and migrates vinetl's schema (the queue's tables are the
/// application's to set up).
pub async fn open(url: &str, schema: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let pool = connect(url, schema, max_connections).await?;
    migrate(&pool, schema).await?;
    Ok(pool)
}

/// Whether `schema` holds vinetl's tables (read-only commands must not
/// create it).
pub async fn has_state(url: &str, schema: &str) -> Result<bool, StoreError> {
    let pool = connect(url, schema, 1).await?;
    let exists = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'jobs')",
    )
    .bind(schema)
    .fetch_one(&pool)
    .await;
    pool.close().await;
    Ok(exists?)
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

fn bind<'q>(
    q: sqlx::query::Query<'q, Postgres, PgArguments>,
    args: &[Arg],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    bind_args!(q, args, json: Value::clone, texts: Option::<Vec<String>>::clone)
}

runners!(PgExecutor, PgPool);

/// A row, with times as Unix seconds.
fn row(r: &PgRow) -> Result<Row, StoreError> {
    let mut vals = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let v = match col.type_info().name() {
            "INT8" => r.try_get::<Option<i64>, _>(i)?.map(Val::Int),
            "INT4" => r.try_get::<Option<i32>, _>(i)?.map(|n| Val::Int(n.into())),
            "INT2" => r.try_get::<Option<i16>, _>(i)?.map(|n| Val::Int(n.into())),
            "FLOAT8" => r.try_get::<Option<f64>, _>(i)?.map(Val::Real),
            "FLOAT4" => r.try_get::<Option<f32>, _>(i)?.map(|n| Val::Real(n.into())),
            "BOOL" => r.try_get::<Option<bool>, _>(i)?.map(Val::Bool),
            "JSONB" | "JSON" => r.try_get::<Option<Value>, _>(i)?.map(Val::Json),
            "TEXT[]" | "VARCHAR[]" => r.try_get::<Option<Vec<String>>, _>(i)?.map(Val::Texts),
            "TIMESTAMPTZ" => r
                .try_get::<Option<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>>, _>(i)?
                .map(|t| Val::Real(t.timestamp_micros() as f64 / 1e6)),
            _ => r.try_get::<Option<String>, _>(i)?.map(Val::Text),
        };
        vals.push(v.unwrap_or(Val::Null));
    }
    Ok(Row(vals))
}

/// Holds a session-level advisory lock on the job while planning, so two
/// planners never plan one job at once. Returns the connection holding it.
pub(super) async fn lock_planning(
    pool: &PgPool,
    job_id: i64,
) -> Result<Option<sqlx::pool::PoolConnection<Postgres>>, StoreError> {
    let mut conn = pool.acquire().await?;
    // Key space: (hash of this schema's name, job id): installs sharing a
    // database have their own job ids.
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext(current_schema() || ':plan'), $1::int)")
        .bind(job_id as i32)
        .fetch_one(&mut *conn)
        .await?;
    Ok(got.then_some(conn))
}

/// Ends a planning lock (session advisory locks outlive the borrow of a
/// pooled connection, so it is released explicitly).
pub(super) async fn unlock_planning(mut conn: sqlx::pool::PoolConnection<Postgres>) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *conn).await?;
    Ok(())
}

/// Cuts the job's pending VINs, distinct and sorted, into batches of `$2`,
/// numbered after any the job already has.
pub(super) const BATCH_PENDING: &str = "INSERT INTO batches (job_id, batch_no, vins)
     SELECT $1, base.b + ((v.n - 1) / $2)::int, array_agg(v.vin ORDER BY v.vin)
     FROM (SELECT vin, row_number() OVER (ORDER BY vin) AS n
           FROM (SELECT DISTINCT vin FROM job_inputs WHERE job_id = $1 AND status = 'pending') d) v,
          (SELECT coalesce(max(batch_no) + 1, 0) AS b FROM batches WHERE job_id = $1) base
     GROUP BY base.b, (v.n - 1) / $2";

/// The job's recall keys as a lateral subquery of `ji` and `c` (`$2`: the mode).
const KEY: &str = "CROSS JOIN LATERAL (SELECT CASE WHEN $2 = 'vin' THEN 'vin:' || ji.vin
                                                  ELSE recall_key(c.make, c.model, c.model_year) END AS key) k";

/// The call of batch `$2` of job `$1` begins: its mark and its audit row
/// (`$3`..`$6`, as [`super::core::AUDIT_CALL`]) in one statement. One row
/// is inserted if the batch was still running, none otherwise.
pub(super) static BEGIN_CALL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH marked AS ({} RETURNING 1)
         INSERT INTO call_audit (job_id, batch_no, provider, endpoint, vins, lookup)
         SELECT $1, $2, $3, $4, $5, $6 FROM marked",
        super::core::MARK_CALL
    )
});

/// Registers every distinct lookup job `$1` needs (`$2`: the mode) and
/// creates a recall batch for each one the cache (`$3`: its TTL in hours)
/// cannot answer, in one statement: (lookups, batches made).
pub(super) static PLAN_RECALLS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH keys AS (
             SELECT k.key, min(c.make) AS make, min(c.model) AS model, min(c.model_year) AS year, min(ji.vin) AS vin
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin {KEY}
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
             SELECT $1, base.b + (row_number() OVER (ORDER BY stale.key))::int - 1, 'recall', ARRAY[stale.vin],
                    stale.key
             FROM stale, base
             RETURNING 1)
         SELECT (SELECT count(*) FROM keys), (SELECT count(*) FROM made)"
    )
});

/// Stores job `$1`'s recall figures (`$2`: the mode): rows with recalls,
/// rows whose recalls are unknown, distinct campaigns found.
pub(super) static SUMMARISE_RECALLS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS (
             SELECT rl.lookup_key,
                    rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at) AS known
             FROM job_inputs ji JOIN vin_cache c ON c.vin = ji.vin {KEY}
             LEFT JOIN recall_lookups rl ON rl.lookup_key = k.key
             WHERE ji.job_id = $1 AND ji.status = 'decoded'),
         per AS (SELECT lookup_key, count(*) AS n FROM recall_lookup_campaigns GROUP BY lookup_key)
         UPDATE jobs SET
             rows_with_recalls = (SELECT count(*) FROM r JOIN per USING (lookup_key) WHERE r.known),
             rows_recalls_unknown = (SELECT count(*) FROM r WHERE NOT coalesce(r.known, false)),
             campaigns_found = (SELECT count(DISTINCT lc.campaign_number) FROM recall_lookup_campaigns lc
                                WHERE lc.lookup_key IN (SELECT lookup_key FROM r WHERE r.known))
         WHERE job_id = $1"
    )
});

/// Each carried column of job `$1`: its JSON types, and whether its numbers
/// are all integers (at most 18 digits, to fit a BIGINT).
/// Grouped by key and type first: `array_agg(DISTINCT …)` sorted every
/// value (1.1 s against 0.43 s for 150,000 rows of three columns).
pub(super) const CARRIED_TYPES: &str = "SELECT key, array_agg(t ORDER BY t), bool_and(ints)
     FROM (SELECT e.key, jsonb_typeof(e.value) AS t,
                  bool_and(jsonb_typeof(e.value) <> 'number'
                           OR (e.value::text ~ '^-?[0-9]+$' AND length(ltrim(e.value::text, '-')) <= 18)) AS ints
           FROM job_inputs ji, jsonb_each(ji.carried) e WHERE ji.job_id = $1 GROUP BY 1, 2) g
     GROUP BY key";

/// One reservation through `limiter_reserve` (migration 0003), under the
/// account row's lock and (unless `$4`, Unix seconds, is given) the
/// database's clock.
pub(super) const LIMITER_RESERVE: &str =
    "SELECT granted, wait_secs, reason, extract(epoch FROM at)::float8, coalesce(array_to_json(flights), '[]'::json)
     FROM limiter_reserve($1, CAST($2 AS INTEGER), $3, to_timestamp($4))";

/// The query every output reads: one row per input row, in source order,
/// with the cached decode (for decoded rows) and the row's recalls.
///
/// Tried and dropped (2026-12-05): expanding each decoded VIN once in a
/// materialized CTE joined to the rows. On analyzed tables it halved the
/// query (2.0 s against 4.7 s, 150,000 rows of 20,000 VINs), but a CTE has
/// no statistics and no index: on a job planned moments ago the planner
/// estimated one row and nested-looped over it, rows × VINs (minutes for
/// 20,000 rows). Each row reads its cache entry through the primary key.
pub(super) static OUTPUT_SQL: LazyLock<String> = LazyLock::new(|| {
    // jsonb_to_record reads each cached document once (twenty `->>` would
    // detoast it twenty times).
    let vehicle: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("v.\"{field}\"")).collect();
    let record: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("\"{field}\" text")).collect();
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
