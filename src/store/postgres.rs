//! The Postgres dialect: the production store, for many machines. What
//! differs from SQLite: arrays and `jsonb` bind natively, times are
//! `timestamptz`, planning holds a session advisory lock, the limiter runs
//! as one SQL function (`limiter_reserve`, migration 0016) under the
//! account row's lock, and a few statements take Postgres' own shape.
//! Everything else is the core's (`super::core`), which calls in here;
//! nothing here calls back.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Column, Postgres, Row as _, TypeInfo};

use super::records::{
    CachedDecode, ChunkForm, CopyRow, PlanMemo, PlannedChunk, PlannedRow, StoreError, check_schema, redact,
};
use super::sql::{Arg, Row, Val, bind_args, runners};
use crate::columns::{VEHICLE_COLUMNS, copy_text};

/// The runner's migrations, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long to wait for Postgres before telling the user it is unreachable:
/// long enough for a busy server, short enough to fail fast on a wrong URL.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses a Postgres URL as sqlx does (its `PG*` variables included), with
/// one default of ours: a server on the loopback interface (`localhost`,
/// `127.0.0.0/8`, `::1`) is reached without TLS unless the URL's `sslmode`
/// (or `PGSSLMODE`) asks for it. sqlx's default, like libpq's, is `prefer`:
/// encrypt if the server offers it, without verifying who it is. On
/// loopback the bytes never leave the kernel, so that encryption protects
/// nothing, and it cost every statement and answer their encryption on both
/// sides and every connection a handshake: a cold job of 50,000 VINs took a
/// median 10.51 s plain against 11.02 s (five interleaved pairs, each
/// faster plain), a 5,000-VIN one 2.23 s against 3.13 s (BENCHMARKS.md).
/// Every pool vinetl opens (state, queue, sources, outputs) is configured
/// here.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(match plain_on_loopback(url, &options, std::env::var_os("PGSSLMODE").is_some()) {
        true => options.ssl_mode(sqlx::postgres::PgSslMode::Disable),
        false => options,
    })
}

/// Whether [`connect_options`] turns TLS off: a loopback TCP host, and no
/// `sslmode` chosen in the URL or (`env_sslmode`) the environment.
fn plain_on_loopback(url: &str, options: &PgConnectOptions, env_sslmode: bool) -> bool {
    let chosen = match url::Url::parse(url) {
        Ok(u) => u.query_pairs().any(|(k, _)| k == "sslmode" || k == "ssl-mode"),
        Err(_) => true, // not a URL sqlx reads as one: left as sqlx made it
    };
    let host = options.get_host();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !chosen && !env_sslmode && options.get_socket().is_none() && loopback
}

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

/// `temp_buffers` of every state-store session (see [`connect`]).
const TEMP_BUFFERS: &str = "128MB";

/// Connects with `schema` first on the search path. Fails fast, naming the
/// (redacted) URL, when the server cannot be reached.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let schema = check_schema(schema)?;
    let shown = redact(url);
    let connect_err = |error| StoreError::Connect { url: shown.clone(), error };
    let options = connect_options(url)
        .map_err(connect_err)?
        // `public` stays on the path for the extensions apalis installs there.
        // A session's temporary tables (the output's per-VIN tables) live in
        // its own buffers, 8 MB by default and settable only before its first
        // one: 50,000 VINs' output columns outgrew them, and the 1,000,000
        // rows' probes of that table took 3.1 s instead of 2.4 s (EXPLAIN
        // ANALYZE). The memory is taken only as a session's tables need it.
        .options([("search_path", format!("{schema}, public")), ("temp_buffers", TEMP_BUFFERS.to_string())])
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

runners!(PgExecutor);

/// A row, with times as Unix seconds.
fn row(r: &PgRow) -> Result<Row, StoreError> {
    row_of(r, &kinds(r))
}

/// How a column is read into a [`Val`], by its Postgres type.
#[derive(Clone, Copy)]
enum Kind {
    Int8,
    Int4,
    Int2,
    Float8,
    Float4,
    Bool,
    Json,
    Texts,
    Time,
    Text,
    /// Any other type, read as text if sqlx can (checked per value).
    Other,
}

/// The columns' kinds: read once per statement by a stream of many rows
/// (the output's read), not once per row and column: matching the type
/// names and checking each value's type against them was a fifth of the
/// runner's CPU in a 1,000,000-row Parquet write (perf, BENCHMARKS.md).
fn kinds(r: &PgRow) -> Vec<Kind> {
    r.columns()
        .iter()
        .map(|col| match col.type_info().name() {
            "INT8" => Kind::Int8,
            "INT4" => Kind::Int4,
            "INT2" => Kind::Int2,
            "FLOAT8" => Kind::Float8,
            "FLOAT4" => Kind::Float4,
            "BOOL" => Kind::Bool,
            "JSONB" | "JSON" => Kind::Json,
            "TEXT[]" | "VARCHAR[]" => Kind::Texts,
            "TIMESTAMPTZ" => Kind::Time,
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => Kind::Text,
            _ => Kind::Other,
        })
        .collect()
}

/// A row read by its columns' `kinds` (from [`kinds`] of a row of the
/// same statement). Decoding still checks each value; only the check of
/// the column's type against the Rust type is skipped, as `kinds` chose
/// that type from the column's.
fn row_of(r: &PgRow, kinds: &[Kind]) -> Result<Row, StoreError> {
    let mut vals = Vec::with_capacity(kinds.len());
    for (i, kind) in kinds.iter().enumerate() {
        let v = match kind {
            Kind::Int8 => r.try_get_unchecked::<Option<i64>, _>(i)?.map(Val::Int),
            Kind::Int4 => r.try_get_unchecked::<Option<i32>, _>(i)?.map(|n| Val::Int(n.into())),
            Kind::Int2 => r.try_get_unchecked::<Option<i16>, _>(i)?.map(|n| Val::Int(n.into())),
            Kind::Float8 => r.try_get_unchecked::<Option<f64>, _>(i)?.map(Val::Real),
            Kind::Float4 => r.try_get_unchecked::<Option<f32>, _>(i)?.map(|n| Val::Real(n.into())),
            Kind::Bool => r.try_get_unchecked::<Option<bool>, _>(i)?.map(Val::Bool),
            Kind::Json => r.try_get::<Option<Value>, _>(i)?.map(Val::Json),
            Kind::Texts => r.try_get_unchecked::<Option<Vec<String>>, _>(i)?.map(Val::Texts),
            Kind::Time => r
                .try_get_unchecked::<Option<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>>, _>(i)?
                .map(|t| Val::Real(t.timestamp_micros() as f64 / 1e6)),
            Kind::Text => r.try_get_unchecked::<Option<String>, _>(i)?.map(Val::Text),
            Kind::Other => r.try_get::<Option<String>, _>(i)?.map(Val::Text),
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

/// `rows` as Postgres' planning copies them in ([`insert_chunk`]): each
/// row's COPY text up to its plan, built by the planner one chunk ahead.
pub(super) fn chunk(rows: &[PlannedRow]) -> PlannedChunk {
    let copy = rows
        .iter()
        .map(|r| {
            let mut head = String::with_capacity(64 + 2 * r.raw_vin.len());
            copy_text::field(&mut head, Some(&r.row_number.to_string()));
            copy_text::field(&mut head, Some(&r.raw_vin));
            copy_text::field(&mut head, r.vin.as_deref());
            copy_text::field(&mut head, r.check_digit_valid.map(|v| if v { "t" } else { "f" }));
            copy_text::field(&mut head, Some(&r.carried.to_string()));
            CopyRow {
                row_number: r.row_number,
                head,
                vin: r.vin.clone(),
                error_code: r.error_code,
                error_text: r.error_text.clone(),
            }
        })
        .collect();
    PlannedChunk::new(ChunkForm::Copy(copy), rows)
}

/// What the store knows of each of a chunk's VINs (`$2`) for job `$1`:
/// whether an earlier chunk had it (asked only if `$4`), and its decode if
/// the cache holds one younger than `$3` hours. The cache is probed by key,
/// one VIN at a time (`OFFSET 0` keeps the lateral subquery from being
/// flattened): as a plain join Postgres hashed the whole fresh cache for
/// every chunk (90 of 120 ms a chunk with 50,000 cached VINs, EXPLAIN
/// ANALYZE); `LIMIT 1 OFFSET 0` keeps the earlier-row check a probe too.
const CHUNK_VINS: &str = "SELECT d.vin,
        $4 AND EXISTS (SELECT 1 FROM job_inputs e WHERE e.job_id = $1 AND e.vin = d.vin AND e.plan <> 'duplicate'
                    LIMIT 1 OFFSET 0),
        c.vin IS NOT NULL, c.error_code, c.error_text, c.decoded_at::text
 FROM unnest($2::text[]) AS d(vin)
 LEFT JOIN LATERAL (SELECT vin, error_code, error_text, decoded_at FROM vin_cache
                    WHERE vin = d.vin AND decoded_at > now() - make_interval(secs => $3 * 3600) OFFSET 0) c ON true";

/// A row of [`CHUNK_VINS`].
type ChunkVin = (String, bool, bool, Option<String>, Option<String>, Option<String>);

/// Stores a chunk's rows with their plans (see [`super::Store::insert_rows`])
/// in transaction `t`: one statement looks up the chunk's VINs that `memo`
/// does not hold, this decides each row's plan, and one COPY stores the
/// rows. At 1,000,000 warm rows planning went from 22 s (an `INSERT …
/// SELECT` from `jsonb_to_recordset`, two probes a row) to 10 s
/// (BENCHMARKS.md). Only one planner plans a job (the planning lock), and
/// rows come in source order with the source's progress committed beside
/// them, so rows at or below that progress (`done`) were stored before:
/// they are skipped (COPY has no `ON CONFLICT`).
pub(super) async fn insert_chunk(
    t: &mut sqlx::PgConnection,
    job_id: i64,
    (source, done): (&str, i64),
    rows: &[CopyRow],
    cache_ttl_hours: f64,
    memo: &mut PlanMemo,
) -> Result<(), StoreError> {
    let rows: Vec<&CopyRow> = rows.iter().filter(|r| r.row_number > done).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let mut ask: Vec<&str> = rows.iter().filter_map(|r| r.vin.as_deref()).filter(|v| !memo.holds(v)).collect();
    ask.sort_unstable();
    ask.dedup();
    let asked: Vec<ChunkVin> = if ask.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(CHUNK_VINS)
            .bind(job_id)
            .bind(&ask)
            .bind(cache_ttl_hours)
            .bind(!memo.complete())
            .fetch_all(&mut *t)
            .await?
    };
    // A VIN looked up: whether an earlier chunk had it, and its cached decode.
    let asked: HashMap<&str, (bool, Option<CachedDecode>)> = asked
        .iter()
        .map(|(vin, earlier, cached, code, text, at)| {
            let decode = cached.then(|| CachedDecode {
                error_code: code.as_deref().map(Into::into),
                error_text: text.as_deref().map(Into::into),
                decoded_at: at.as_deref().unwrap_or_default().into(),
            });
            (vin.as_str(), (*earlier, decode))
        })
        .collect();
    let mut lead = String::new();
    copy_text::field(&mut lead, Some(&job_id.to_string()));
    copy_text::field(&mut lead, Some(source));
    let mut in_chunk: HashSet<&str> = HashSet::with_capacity(rows.len());
    let mut buf = String::with_capacity(rows.len() * (lead.len() + 160));
    for r in &rows {
        buf.push_str(&lead);
        buf.push_str(&r.head);
        let Some(vin) = r.vin.as_deref() else {
            for v in [Some("invalid"), Some("invalid"), r.error_code, r.error_text.as_deref(), None] {
                copy_text::field(&mut buf, v);
            }
            end_line(&mut buf);
            continue;
        };
        let first_in_chunk = in_chunk.insert(vin);
        let (duplicate, decode) = match memo.get(vin) {
            Some(decode) => (true, decode.clone()),
            None => {
                let (earlier, decode) = asked.get(vin).cloned().unwrap_or_default();
                memo.learn(vin, &decode);
                (earlier, decode)
            }
        };
        // A VIN past the memo's bound: its later rows in this chunk.
        let duplicate = duplicate || !first_in_chunk;
        let plan = match (duplicate, &decode) {
            (true, _) => "duplicate",
            (false, Some(_)) => "cache_hit",
            (false, None) => "call",
        };
        match &decode {
            Some(d) => {
                let status = if d.error_code.is_none() { "decoded" } else { "failed" };
                for v in
                    [Some(plan), Some(status), d.error_code.as_deref(), d.error_text.as_deref(), Some(&d.decoded_at)]
                {
                    copy_text::field(&mut buf, v);
                }
            }
            None => {
                for v in [Some(plan), Some("pending"), r.error_code, r.error_text.as_deref(), None] {
                    copy_text::field(&mut buf, v);
                }
            }
        }
        end_line(&mut buf);
    }
    let mut copy = t
        .copy_in_raw(
            "COPY job_inputs (job_id, source, row_number, raw_vin, vin, check_digit_valid, carried, plan, status,
                              error_code, error_text, decoded_at) FROM STDIN",
        )
        .await?;
    copy.send(buf.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}

/// Ends a COPY text line: its last column's tab becomes the newline.
fn end_line(buf: &mut String) {
    buf.pop();
    buf.push('\n');
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

/// [`super::core::CLAIM`] with its audit row (`$6`: the provider, `$7`
/// and `$8`: the paths of a decode and a recall lookup) for a batch it
/// marked in a call, and the lookup's request for a recall batch, in one
/// statement. Columns: `CLAIM`'s, whether the lookup is registered, then
/// its make, model, year and VIN.
pub(super) static CLAIM_CALL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH claimed AS ({}),
         audit AS (
             INSERT INTO call_audit (job_id, batch_no, provider, endpoint, vins, lookup)
             SELECT $1, $2, $6, CASE WHEN lookup_key IS NULL THEN $7 ELSE $8 END,
                    CASE WHEN lookup_key IS NULL THEN vins ELSE ARRAY[]::text[] END, lookup_key
             FROM claimed WHERE in_call)
         SELECT c.vins, c.attempts, c.lookup_key, c.in_call, l.lookup_key IS NOT NULL,
                l.make, l.model, l.model_year, l.vin
         FROM claimed c LEFT JOIN recall_lookups l ON l.lookup_key = c.lookup_key",
        super::core::CLAIM
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
pub(super) static CARRIED_TYPES: LazyLock<String> = LazyLock::new(|| {
    // An integer within CARRIED_INT_MAX: no more digits than it has.
    format!(
        "SELECT key, array_agg(t ORDER BY t), bool_and(ints)
     FROM (SELECT e.key, jsonb_typeof(e.value) AS t,
                  bool_and(jsonb_typeof(e.value) <> 'number'
                           OR (e.value::text ~ '^-?[0-9]+$' AND length(ltrim(e.value::text, '-')) <= {digits})) AS ints
           FROM job_inputs ji, jsonb_each(ji.carried) e WHERE ji.job_id = $1 GROUP BY 1, 2) g
     GROUP BY key",
        digits = crate::columns::CARRIED_INT_MAX.to_string().len()
    )
});

/// One reservation through `limiter_reserve` (migration 0016), under the
/// account row's lock and (unless `$4`, Unix seconds, is given) the
/// database's clock.
pub(super) const LIMITER_RESERVE: &str =
    "SELECT granted, wait_secs, reason, extract(epoch FROM at)::float8, coalesce(array_to_json(flights), '[]'::json)
     FROM limiter_reserve($1, CAST($2 AS INTEGER), $3, to_timestamp($4))";

/// The output's first step: each decoded VIN of job `$1` once, its cached
/// document expanded into columns and its recall answer for mode `$2`, in
/// a table that lives for the output's transaction (`ON COMMIT DROP`).
/// Expanding a document per VIN, not per input row, is most of the read's
/// saving on a warm job (150,000 rows of 20,000 VINs: 1.95 s read row by
/// row, 1.14 s with this table; BENCHMARKS.md).
///
/// A table, not a CTE: a materialized CTE (tried 2026-12-05) has no
/// statistics and no index, and on a job planned moments ago the planner
/// estimated one row and nested-looped the job's rows over it, rows × VINs
/// (minutes for 20,000 rows). This table has a primary key and is analyzed
/// before the join: the rows are hash-joined to it or probe its key.
const OUTPUT_VINS_TABLE: &str = "output_vins";

static OUTPUT_VINS_DDL: LazyLock<String> = LazyLock::new(|| {
    let record: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("\"{field}\" text")).collect();
    format!(
        "CREATE TEMP TABLE {OUTPUT_VINS_TABLE} (vin text NOT NULL, campaigns text[], recall_error text, {})
         ON COMMIT DROP",
        record.join(", ")
    )
});

/// A decoded row's recall error when it has no make, model and year to look
/// recalls up by (nor, by VIN, a VIN: one `vinetl forget` blanked).
const NO_RECALL_KEY: &str = "no make, model and model year to look recalls up by";

/// Fills [`OUTPUT_VINS_TABLE`]: every VIN of the job in part `$3` of `$4`
/// ([`vin_part`]), with or without a cache row (then its columns are null,
/// as a row's would be).
///
/// The VINs are read from the rows that are not duplicates: each VIN's
/// first row in the job is one (planning makes it so; `forget` blanks a
/// VIN on all its rows at once), and the partial VIN index holds just
/// those, so a job of 10,000,000 rows over 50,000 VINs reads 50,000 index
/// entries (0.08 s) instead of every row (11.8 s, EXPLAIN ANALYZE). That
/// takes in VINs whose rows failed too: harmless, as only a decoded row
/// is joined to its VIN's columns.
///
/// A whole job's fill names no part: the planner cannot tell that a part
/// of one is every VIN, and with `hashtext`'s default selectivity it
/// expected 277 of a job's 50,000 VINs and probed the cache's key once per
/// VIN (BENCHMARKS.md).
static OUTPUT_VINS_FILL: LazyLock<String> = LazyLock::new(|| output_vins_fill(false));

/// [`OUTPUT_VINS_FILL`] for the VINs of part `$3` of `$4` alone.
static OUTPUT_VINS_FILL_PART: LazyLock<String> = LazyLock::new(|| output_vins_fill(true));

fn output_vins_fill(part: bool) -> String {
    // jsonb_to_record reads each cached document once (twenty `->>` would
    // detoast it twenty times).
    let vehicle: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("v.\"{field}\"")).collect();
    let record: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("\"{field}\" text")).collect();
    format!(
        "INSERT INTO {OUTPUT_VINS_TABLE}
         SELECT d.vin,
                CASE WHEN rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at)
                     THEN coalesce((SELECT array_agg(lc.campaign_number ORDER BY lc.campaign_number)
                                    FROM recall_lookup_campaigns lc WHERE lc.lookup_key = rl.lookup_key), '{{}}')
                END,
                CASE WHEN $2 = 'off' THEN NULL
                     WHEN rl.looked_up_at IS NOT NULL AND (rl.failed_at IS NULL OR rl.failed_at < rl.looked_up_at) THEN NULL
                     WHEN rl.error_text IS NOT NULL THEN 'recall lookup failed: ' || rl.error_text
                     WHEN k.key IS NULL THEN '{NO_RECALL_KEY}'
                     ELSE 'recalls were not looked up' END,
                {}
         FROM (SELECT DISTINCT vin FROM job_inputs
               WHERE job_id = $1 AND vin IS NOT NULL AND plan <> 'duplicate'{part}) d
         LEFT JOIN vin_cache c ON c.vin = d.vin
         LEFT JOIN LATERAL jsonb_to_record(c.raw) AS v({}) ON true
         LEFT JOIN LATERAL (SELECT CASE WHEN $2 = 'vin' THEN 'vin:' || d.vin
                                        WHEN $2 = 'model' THEN recall_key(c.make, c.model, c.model_year) END AS key) k
                ON true
         LEFT JOIN recall_lookups rl ON rl.lookup_key = k.key",
        vehicle.join(", "),
        record.join(", "),
        part = if part { format!(" AND {}", vin_part("vin")) } else { String::new() },
    )
}

/// Whether the VIN in `column` (null counts as empty) falls in part `$3` of
/// `$4`: how [`results_into`] splits a job between sessions. `hashtext` is
/// the server's own string hash, the same in every session.
fn vin_part(column: &str) -> String {
    format!("(hashtext(coalesce({column}, '')) & 2147483647) % $4 = $3")
}

/// Every output row of job `$1` (recall mode `$2`), in source order: the
/// input row, and for a decoded one its VIN's columns from
/// [`OUTPUT_VINS_TABLE`] (a forgotten VIN has none).
static OUTPUT_SQL: LazyLock<String> = LazyLock::new(|| {
    let vehicle: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("o.\"{field}\"")).collect();
    format!(
        "SELECT ji.source, ji.row_number, ji.raw_vin, ji.vin, ji.status, ji.error_code, ji.error_text,
                ji.decoded_at, ji.check_digit_valid, ji.carried, o.campaigns,
                {},
                {}
         FROM job_inputs ji
         LEFT JOIN {OUTPUT_VINS_TABLE} o ON o.vin = ji.vin AND ji.status = 'decoded'
         WHERE ji.job_id = $1
         ORDER BY ji.source, ji.row_number",
        row_recall_error(),
        vehicle.join(", ")
    )
});

/// A row's `recall_error`, with its VIN's row of the per-VIN table as `o`
/// (recall mode `$2`): none for a row not decoded; for a decoded row whose
/// VIN has no row there (`vinetl forget` blanked it), no key to look by.
fn row_recall_error() -> String {
    format!(
        "CASE WHEN ji.status <> 'decoded' THEN NULL WHEN o.vin IS NOT NULL THEN o.recall_error
              WHEN $2 <> 'off' THEN '{NO_RECALL_KEY}' END"
    )
}

/// Begins the output's read on `conn`: one snapshot (`REPEATABLE READ`),
/// its own or, with `import`, one exported by another session's read
/// (`pg_export_snapshot`), so that both see the same rows.
async fn begin_read<'c>(
    conn: &'c mut sqlx::PgConnection,
    import: Option<&str>,
) -> Result<sqlx::Transaction<'c, Postgres>, StoreError> {
    let mut t = sqlx::Connection::begin(conn).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *t).await?;
    if let Some(id) = import {
        // Not a bind parameter: SET takes a literal. The server made the
        // id; it is checked to be the hex digits and dashes it always is.
        if !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(StoreError::Decode(format!("an exported snapshot id {id:?}")));
        }
        sqlx::query(sqlx::AssertSqlSafe(format!("SET TRANSACTION SNAPSHOT '{id}'"))).execute(&mut *t).await?;
    }
    Ok(t)
}

/// Fills [`OUTPUT_VINS_TABLE`] in the read `t` (see [`begin_read`]) for job
/// `job_id`, recall mode `mode` and the VINs of `part` (number, of how
/// many: [`vin_part`]); with `in_order` (the rows are to be read in source
/// order), sorts are off from here on, up to [`OUTPUT_PROBE_VINS`] VINs.
async fn fill_output_vins(
    t: &mut sqlx::PgConnection,
    (job_id, mode): (i64, &'static str),
    (part, parts): (i64, i64),
    in_order: bool,
) -> Result<(), StoreError> {
    // The read sorts and hashes the job's rows (its distinct VINs, the rows
    // in source order): with the default 4 MB they spilled to disk at
    // 150,000 rows (the VIN table's fill took 351 ms, 240 ms in memory).
    sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL work_mem = '{OUTPUT_WORK_MEM}'"))).execute(&mut *t).await?;
    // Statistics lag a job planned moments ago (an estimate of 317 of its
    // 1,000,000 rows): the fill's DISTINCT sorted on disk (1.4 s, against
    // 0.6 s hashed), and the rows in source order were joined, then sorted
    // with every column (335 MB on disk), not read by the primary key and
    // joined to this table's key in that order (Parquet write of 1,000,000
    // rows: 9.2-9.7 s, 7.7-8.1 s without sorts; BENCHMARKS.md). The results
    // table's write keeps them: it pages through this table by key, which
    // a sorted fill lays out in order (at 150,000 rows, one run: fill and
    // pages 0.44 + 0.07 s sorted, 0.56 + 0.12 s hashed).
    if in_order {
        sqlx::query("SET LOCAL enable_sort = off").execute(&mut *t).await?;
    }
    sqlx::query(sqlx::AssertSqlSafe(OUTPUT_VINS_DDL.as_str())).execute(&mut *t).await?;
    let args = [Arg::from(job_id), Arg::from(mode), Arg::from(part), Arg::from(parts)];
    let (fill, args) =
        if parts > 1 { (OUTPUT_VINS_FILL_PART.as_str(), &args[..]) } else { (OUTPUT_VINS_FILL.as_str(), &args[..2]) };
    // Without JIT: estimated right, the fill's cost (its recall subquery is
    // costed per VIN) passes the server's JIT thresholds, and compiling with
    // optimization took 300 ms of a 650 ms fill of 50,000 VINs, most of
    // whose time is in `jsonb_to_record`, which JIT does not speed up.
    sqlx::query("SET LOCAL jit = off").execute(&mut *t).await?;
    let filled = exec(&mut *t, fill, args).await?;
    sqlx::query("RESET jit").execute(&mut *t).await?;
    // Its key built once it is full, by one sort, rather than entry by entry
    // in the fill's hash order: a fill of 50,000 VINs took 130-140 ms so,
    // 185-218 ms keyed as it filled (psql, 2026-12-07).
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE {OUTPUT_VINS_TABLE} ADD PRIMARY KEY (vin)")))
        .execute(&mut *t)
        .await?;
    if filled > OUTPUT_PROBE_VINS && in_order {
        sqlx::query("SET LOCAL enable_sort = on").execute(&mut *t).await?;
    }
    // The key column only: all the join's plan needs.
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {OUTPUT_VINS_TABLE} (vin)"))).execute(&mut *t).await?;
    Ok(())
}

/// Decoded VINs up to which the output's rows probe the per-VIN table's
/// key in source order rather than being sorted (see [`fill_output_vins`]):
/// past it the probes would outgrow memory, and the planner chooses.
const OUTPUT_PROBE_VINS: u64 = 1_000_000;

/// `work_mem` of the output's read: one reader per job being written.
const OUTPUT_WORK_MEM: &str = "64MB";

/// The results write's per-VIN table: each decoded VIN's output columns,
/// typed as the results table types them (`recall_error` last).
const OUTPUT_TYPED_TABLE: &str = "output_typed";

static OUTPUT_TYPED_DDL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "CREATE TEMP TABLE {OUTPUT_TYPED_TABLE} (vin text PRIMARY KEY, {}) ON COMMIT DROP",
        crate::columns::vehicle_and_recall_ddl()
    )
});

/// A page of [`OUTPUT_VINS_TABLE`], by key after `$1`.
static OUTPUT_VINS_PAGE: LazyLock<String> = LazyLock::new(|| {
    let fields: Vec<String> = VEHICLE_COLUMNS.iter().map(|(_, field, _)| format!("\"{field}\"")).collect();
    format!(
        "SELECT vin, campaigns, recall_error, {} FROM {OUTPUT_VINS_TABLE} WHERE vin > $1 ORDER BY vin LIMIT $2",
        fields.join(", ")
    )
});

/// VINs typed and copied per page.
const TYPED_PAGE: i64 = 8192;

/// Every output row of job `$1` (recall mode `$2`) into `into` (`table
/// (columns)`, the results table's columns in this order: job_id, source,
/// source_row, raw_vin, vin, status, error_code, error_text, decoded_at,
/// check_digit_valid, the vehicle columns, recall_count, has_recalls,
/// recall_campaigns, recall_error, carried), in the store's database.
static RESULTS_INSERT: LazyLock<String> = LazyLock::new(|| {
    let vehicle: Vec<String> = VEHICLE_COLUMNS.iter().map(|(name, _, _)| format!("o.{name}")).collect();
    format!(
        "SELECT $1, ji.source, ji.row_number, ji.raw_vin, ji.vin, ji.status, ji.error_code, ji.error_text,
                ji.decoded_at, ji.check_digit_valid, {}, o.recall_count, o.has_recalls, o.recall_campaigns,
                {}, CASE WHEN jsonb_typeof(ji.carried) = 'object' THEN ji.carried ELSE '{{}}' END
         FROM job_inputs ji
         LEFT JOIN {OUTPUT_TYPED_TABLE} o ON o.vin = ji.vin AND ji.status = 'decoded'
         WHERE ji.job_id = $1 AND {part}",
        vehicle.join(", "),
        row_recall_error(),
        part = vin_part("ji.vin"),
    )
});

/// How long [`results_into`] waits for each more connection.
const SHARE_WAIT: Duration = Duration::from_secs(1);

/// Writes every output row of a job into a table of the store's own
/// database (`into`: see [`RESULTS_INSERT`]) without the rows leaving the
/// server: the same snapshot and per-VIN table as [`output_rows`], each
/// VIN's columns typed here once (the outputs' own reading of a value,
/// [`copy_text::vehicle`]) and copied back, then one `INSERT … SELECT`
/// joins the job's rows to them. A warm job of 150,000 rows over 20,000
/// VINs moves 20,000 rows each way instead of 150,000 (BENCHMARKS.md).
///
/// `conn` loads the first share of the VINs ([`vin_part`]); up to
/// `sessions` less one more connections that `pool` has free load the
/// others, each in a read that imports `conn`'s snapshot, so every share
/// sees the same rows. Each commits on its own: `into` must be a table no
/// reader sees until the write succeeds (a load table, attached after), as
/// a failed share leaves the others' rows in it. Returns the rows written.
pub(super) async fn results_into(
    pool: &PgPool,
    conn: &mut sqlx::PgConnection,
    (job_id, mode): (i64, &'static str),
    (into, vehicles_into): (&str, Option<&str>),
    sessions: usize,
) -> Result<u64, StoreError> {
    let mut more = Vec::new();
    while more.len() + 1 < sessions {
        // A pool with none free leaves the write to fewer sessions rather
        // than waiting on the job's other work (`try_acquire` would not
        // open a connection the pool has room for).
        match tokio::time::timeout(SHARE_WAIT, pool.acquire()).await {
            Ok(Ok(c)) => more.push(c),
            _ => break,
        }
    }
    let parts = more.len() as i64 + 1;
    tracing::info!(job = job_id, "loading in {parts} sessions from one snapshot");
    let mut first = begin_read(conn, None).await?;
    let mut reads = Vec::with_capacity(more.len() + 1);
    if !more.is_empty() {
        let id: String = sqlx::query_scalar("SELECT pg_export_snapshot()").fetch_one(&mut *first).await?;
        for c in &mut more {
            reads.push(begin_read(c, Some(&id)).await?);
        }
    }
    reads.insert(0, first);
    let loads =
        reads.iter_mut().zip(0..).map(|(t, part)| load_share(t, (job_id, mode), (part, parts), (into, vehicles_into)));
    let written: u64 = futures_util::future::try_join_all(loads).await?.into_iter().sum();
    for t in reads {
        t.commit().await?;
    }
    Ok(written)
}

/// One share of [`results_into`], in the read `t`: its VINs' columns typed
/// and copied back, then its rows inserted into `into`, and with
/// `vehicles_into`, each of its decoded VINs' latest decode there (see
/// [`VEHICLES_OF_SHARE`]). Returns its rows.
async fn load_share(
    t: &mut sqlx::PgConnection,
    (job_id, mode): (i64, &'static str),
    (part, parts): (i64, i64),
    (into, vehicles_into): (&str, Option<&str>),
) -> Result<u64, StoreError> {
    fill_output_vins(&mut *t, (job_id, mode), (part, parts), false).await?;
    sqlx::query(sqlx::AssertSqlSafe(OUTPUT_TYPED_DDL.as_str())).execute(&mut *t).await?;
    let mut after = String::new();
    loop {
        let page = sqlx::query(sqlx::AssertSqlSafe(OUTPUT_VINS_PAGE.as_str()))
            .bind(&after)
            .bind(TYPED_PAGE)
            .fetch_all(&mut *t)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.try_get(0)?;
        let mut buf = String::with_capacity(page.len() * 256);
        for r in &page {
            let vehicle: Vec<Option<String>> =
                (0..VEHICLE_COLUMNS.len()).map(|i| r.try_get(3 + i)).collect::<Result<_, _>>()?;
            let campaigns: Option<Vec<String>> = r.try_get(1)?;
            copy_text::field(&mut buf, Some(r.try_get(0)?));
            copy_text::vehicle(&mut buf, &vehicle);
            copy_text::recalls(&mut buf, campaigns.as_deref());
            copy_text::field(&mut buf, r.try_get(2)?);
            buf.pop(); // the last column's tab
            buf.push('\n');
        }
        let mut copy = t.copy_in_raw(&format!("COPY {OUTPUT_TYPED_TABLE} FROM STDIN")).await?;
        copy.send(buf.into_bytes()).await?;
        copy.finish().await?;
        if (page.len() as i64) < TYPED_PAGE {
            break;
        }
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {OUTPUT_TYPED_TABLE} (vin)"))).execute(&mut *t).await?;
    // Every row of the share meets its VIN's columns: one hash of the typed
    // table, never an index probe per row, which is what the planner picks
    // when the job's rows have no statistics yet (a job planned moments ago
    // that autovacuum has not analyzed, and planning's own ANALYZE skipped):
    // 5,000,000 rows joined in 17.9 s probed, 7.3 s hashed even then
    // (EXPLAIN ANALYZE, BENCHMARKS.md). The later statement's join, each
    // VIN's latest decode to its columns, is hashed too (`SET LOCAL` holds
    // to the share's commit).
    sqlx::query("SET LOCAL enable_nestloop = off").execute(&mut *t).await?;
    let insert = format!("INSERT INTO {into} {}", RESULTS_INSERT.as_str());
    let args = [Arg::from(job_id), Arg::from(mode), Arg::from(part), Arg::from(parts)];
    let written = bind(sqlx::query(sqlx::AssertSqlSafe(insert)), &args).execute(&mut *t).await?.rows_affected();
    if let Some(vehicles) = vehicles_into {
        // A hash of the share's VINs, never a sort of its rows: with the
        // `vin_part` filter the planner expects a hundredth of them, and
        // sorted 5,000,000 rows on disk (8.9 s against 3.7 s, EXPLAIN
        // ANALYZE, BENCHMARKS.md).
        sqlx::query("SET LOCAL enable_sort = off").execute(&mut *t).await?;
        let sql = format!("INSERT INTO {vehicles} {}", VEHICLES_OF_SHARE.as_str());
        bind(sqlx::query(sqlx::AssertSqlSafe(sql)), &args).execute(&mut *t).await?;
    }
    Ok(written)
}

/// Each decoded VIN of a share (job `$1`, recall mode `$2`, the VINs of
/// [`vin_part`]) with its latest decode time and its columns from
/// [`OUTPUT_TYPED_TABLE`], as a results row (an empty source, row 0) that
/// the vehicles upsert reads: the same values it would pick from the
/// share's loaded rows (a job's rows of one VIN carry that VIN's columns),
/// read in the share's own snapshot instead of in a scan of the whole load
/// table before the swap (7.0 s at 10,000,000 rows, EXPLAIN ANALYZE). Its
/// own scan of the job's rows, after the load: the load's `RETURNING` into
/// a `WITH` kept every row of the share aside first (10,000,000 rows: 8-11 s
/// more per share, against 3.7 s for this, by hand, BENCHMARKS.md).
static VEHICLES_OF_SHARE: LazyLock<String> = LazyLock::new(|| {
    let names: Vec<&str> = VEHICLE_COLUMNS.iter().map(|(name, _, _)| *name).collect();
    let vehicle: Vec<String> = names.iter().map(|name| format!("o.{name}")).collect();
    format!(
        "(job_id, source, source_row, raw_vin, vin, status, decoded_at, {}, recall_count, has_recalls,
          recall_campaigns, recall_error)
         SELECT $1, '', 0, ji.vin, ji.vin, ji.status, ji.decoded_at, {}, o.recall_count, o.has_recalls,
                o.recall_campaigns, {}
         FROM (SELECT vin, max(decoded_at) AS decoded_at, 'decoded' AS status FROM job_inputs
               WHERE job_id = $1 AND {part} AND status = 'decoded' AND vin IS NOT NULL AND decoded_at IS NOT NULL
               GROUP BY vin) ji
         LEFT JOIN {OUTPUT_TYPED_TABLE} o ON o.vin = ji.vin",
        names.join(", "),
        vehicle.join(", "),
        row_recall_error(),
        part = vin_part("vin"),
    )
});

/// Rows sent from the reading task to the stream at once.
const OUTPUT_BATCH: usize = 1024;

/// Streams every output row of a job (recall mode `mode`) from one
/// snapshot: the per-VIN table, then the rows joined to it, in one
/// transaction on one connection. A task holds that transaction and sends
/// the rows on; dropping the stream ends the task, and the transaction
/// rolls back (the table goes with it).
pub(super) fn output_rows(
    pool: &PgPool,
    job_id: i64,
    mode: &'static str,
) -> BoxStream<'static, Result<Row, StoreError>> {
    let pool = pool.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<Row>, StoreError>>(4);
    tokio::spawn(async move {
        let read = async {
            let mut conn = pool.acquire().await?;
            let mut t = begin_read(&mut conn, None).await?;
            fill_output_vins(&mut t, (job_id, mode), (0, 1), true).await?;
            let args = [Arg::from(job_id), Arg::from(mode)];
            let mut rows = bind(sqlx::query(sqlx::AssertSqlSafe(OUTPUT_SQL.as_str())), &args).fetch(&mut *t);
            let mut batch = Vec::with_capacity(OUTPUT_BATCH);
            let mut columns = None;
            while let Some(r) = rows.next().await {
                let r = r?;
                batch.push(row_of(&r, columns.get_or_insert_with(|| kinds(&r)))?);
                if batch.len() == OUTPUT_BATCH && tx.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                    return Ok(()); // the reader is gone
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch)).await;
            }
            Ok::<(), StoreError>(())
        };
        if let Err(e) = read.await {
            let _ = tx.send(Err(e)).await;
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|batch| (batch, rx)) })
        .flat_map(|batch| {
            let rows: Vec<Result<Row, StoreError>> = match batch {
                Ok(rows) => rows.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures_util::stream::iter(rows)
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(url: &str, env_sslmode: bool) -> bool {
        plain_on_loopback(url, &PgConnectOptions::from_str(url).unwrap(), env_sslmode)
    }

    #[test]
    fn loopback_without_a_chosen_sslmode_goes_without_tls() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgres://u:p@localhost/db",
            "postgres://u@LOCALHOST:5433/db?application_name=x",
            "postgres://u@127.0.0.2/db",
            "postgres://u@[::1]:5432/db",
        ] {
            assert!(plain(url, false), "{url}");
            assert!(
                matches!(connect_options(url).unwrap().get_ssl_mode(), sqlx::postgres::PgSslMode::Disable),
                "{url}"
            );
        }
    }

    #[test]
    fn a_chosen_sslmode_or_another_host_keeps_sqlx_s_choice() {
        for url in [
            "postgres://u@127.0.0.1/db?sslmode=require",
            "postgres://u@localhost/db?sslmode=prefer",
            "postgres://u@localhost/db?ssl-mode=verify-full",
            "postgres://u@db.example.com/db",
            "postgres://u@10.0.0.5:5432/db",
            "postgres://u@[2001:db8::1]/db",
        ] {
            assert!(!plain(url, false), "{url}");
        }
        assert!(!plain("postgres://u@127.0.0.1/db", true), "PGSSLMODE chooses too");
        let kept = connect_options("postgres://u@127.0.0.1/db?sslmode=require").unwrap();
        assert!(matches!(kept.get_ssl_mode(), sqlx::postgres::PgSslMode::Require));
    }
}
