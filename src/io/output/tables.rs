//! Postgres outputs: a results table (one row per input row of every job)
//! and a vehicles table (the latest decode per VIN).
//!
//! The results table is partitioned by job. A job's rows are loaded with
//! COPY into a fresh table that has no index yet, indexed once loaded, then
//! swapped in as the job's partition (the old one detached and dropped) in
//! one short transaction, with the vehicles upsert: readers see a job's old
//! rows or its new ones, never half, and no job's rewrite deletes a row.
//! A results table created before partitioning (a plain table) keeps
//! working: the job's rows are COPYed into a temporary table and replace
//! the old ones in one transaction.
//!
//! With `vin_hash = "beside"`, both tables get a `vin_hmac` column (added
//! to existing tables when missing): the results table's is filled from
//! each row's `vin`, the vehicles table's with each upsert.
//!
//! Why text COPY, not binary: every column has a plain text form Postgres
//! parses fast (measured in BENCHMARKS.md), and binary would mean encoding
//! `jsonb`, arrays and timestamps by hand.

use std::fmt::Write as _;

use super::OutputError;
use super::vin_hash::{Keyed, VinHasher};
use crate::columns::copy_text::{self, escape, field};
use crate::columns::{
    OutputRow, RECALL_COLUMNS, RecallMode, VEHICLE_COLUMNS, VIN_HMAC, VinHash, vehicle_and_recall_ddl,
};
use crate::spec::OutputSpec;
use crate::store::Store;

/// Bytes of COPY data per message to the server.
const COPY_CHUNK: usize = 1 << 20;

/// The results table's columns that a write fills, in COPY order
/// (`vin_hmac` after `vin` with `hashed`).
fn result_columns(hashed: bool) -> String {
    let vehicle = VEHICLE_COLUMNS.iter().map(|(n, _, _)| *n);
    let columns: Vec<&str> = vehicle.chain(RECALL_COLUMNS.iter().map(|c| c.0)).collect();
    let vin_hmac = if hashed { format!(", {VIN_HMAC}") } else { String::new() };
    format!(
        "job_id, source, source_row, raw_vin, vin{vin_hmac}, status, error_code, error_text, decoded_at, \
         check_digit_valid, {}, carried",
        columns.join(", ")
    )
}

/// The tables, created if missing. Names were checked by the spec.
///
/// `vin` is compared and sorted byte by byte (`COLLATE "C"`): a VIN is
/// an ASCII code, and a locale's collation compares text by `strcoll` and
/// sorts it without abbreviated keys (Postgres 15): the `vin` index of a
/// 10,000,000-row load built in 7.2 s against 13.9 s under `C.UTF-8`
/// (BENCHMARKS.md). `ORDER BY vin` is then ASCII order, which a locale that
/// sorts letters its own way (Danish `AA`, Lithuanian `Y`) does not follow.
/// Equality with a column of the database's default collation works as
/// before; one with an explicit collation needs a `COLLATE` to compare.
/// Tables made by an earlier vinetl keep their collation.
fn ddl(schema: &str, results: &str, vehicles: &str) -> Vec<String> {
    let columns = vehicle_and_recall_ddl();
    vec![
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{results} (
    job_id BIGINT NOT NULL,
    source TEXT NOT NULL,
    source_row BIGINT NOT NULL,
    raw_vin TEXT NOT NULL,
    vin TEXT COLLATE \"C\",
    status TEXT NOT NULL,
    error_code TEXT,
    error_text TEXT,
    decoded_at TIMESTAMPTZ,
    check_digit_valid BOOLEAN,
    {columns},
    carried JSONB NOT NULL DEFAULT '{{}}',
    written_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, source, source_row)) PARTITION BY LIST (job_id)"
        ),
        format!("CREATE INDEX IF NOT EXISTS {results}_vin_idx ON {schema}.{results} (vin)"),
        format!("CREATE INDEX IF NOT EXISTS {results}_status_idx ON {schema}.{results} (job_id, status)"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{vehicles} (
    vin TEXT COLLATE \"C\" PRIMARY KEY,
    decoded_at TIMESTAMPTZ NOT NULL,
    {columns},
    job_id BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ),
        format!("CREATE INDEX IF NOT EXISTS {vehicles}_mmy_idx ON {schema}.{vehicles} (make, model, model_year)"),
        format!("CREATE INDEX IF NOT EXISTS {vehicles}_recalls_idx ON {schema}.{vehicles} (vin) WHERE has_recalls"),
    ]
}

/// `vin_hmac` for both tables, where missing (tables made without
/// `vin_hash`, or by an earlier vinetl). Only a missing column is altered:
/// an `ALTER TABLE` locks out the table's readers, even when it does nothing.
async fn add_vin_hmac(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    results: &str,
    vehicles: &str,
) -> Result<(), sqlx::Error> {
    for table in [results, vehicles] {
        let has: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                            WHERE table_schema = $1 AND table_name = $2 AND column_name = $3)",
        )
        .bind(schema)
        .bind(table)
        .bind(VIN_HMAC)
        .fetch_one(&mut *conn)
        .await?;
        if !has {
            let alter = format!("ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS {VIN_HMAC} TEXT");
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(alter)).execute(&mut *conn).await {
                // Two writers racing on IF NOT EXISTS.
                if e.as_database_error().and_then(|d| d.code()).is_none_or(|c| c != "42701") {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Loads of at least this many rows pick each VIN's row for the vehicles
/// upsert by the load table's `vin` index, smaller ones by a sort (see
/// [`upsert_vehicles_sql`]).
const PICK_BY_INDEX_ROWS: u64 = 500_000;

/// The latest decode of each VIN in `from` (loaded results of job `$1`)
/// into the vehicles table; an older decode never overwrites a newer one.
/// With `hashed`, `vin_hmac` too (else a row's `vin_hmac` is left as it is).
/// Rows go in in VIN byte order, so two writers lock shared vehicles in
/// one order, whatever the collation of the results tables they load from.
///
/// One row per VIN is picked one of two ways, with the same result up to
/// rows tied on `decoded_at` (a job's rows of one VIN carry that VIN's one
/// decode, so they are alike; EXPLAIN ANALYZE of both on one load,
/// BENCHMARKS.md):
/// - `DISTINCT ON (vin)` sorts every row, all columns: best for a smaller
///   load (150,000 rows of 20,000 VINs: 0.31 s against 0.48 s), but at
///   10,000,000 rows an external sort of 2 GB (15.9 s);
/// - `by_index`: a hash aggregate finds each VIN's latest decode time and
///   the `vin` index gives one row of it, a probe per VIN (1,000,000 rows
///   of 50,000 VINs: 1.2 s against 1.8 s; 10,000,000: 3.3–4.1 s). `from`
///   must then have that index, and statistics.
fn upsert_vehicles_sql(schema: &str, vehicles: &str, from: &str, hashed: bool, by_index: bool) -> String {
    let mut cols: Vec<&str> = VEHICLE_COLUMNS.iter().map(|(n, _, _)| *n).collect();
    if hashed {
        cols.insert(0, VIN_HMAC);
    }
    let set: Vec<String> = cols
        .iter()
        .copied()
        .chain(["decoded_at", "recall_count", "has_recalls", "recall_campaigns", "recall_error", "job_id"])
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let picked: Vec<String> = cols.iter().map(|c| format!("l.{c}")).collect();
    let decoded = "status = 'decoded' AND vin IS NOT NULL AND decoded_at IS NOT NULL";
    let rows = if by_index {
        format!(
            "(SELECT vin, max(decoded_at) AS at FROM {from} WHERE {decoded} GROUP BY vin) latest
             CROSS JOIN LATERAL (SELECT * FROM {from} r
                                 WHERE r.vin = latest.vin AND r.decoded_at = latest.at AND r.status = 'decoded'
                                 LIMIT 1) l"
        )
    } else {
        // Only the columns upserted: the sort carries every one it reads.
        format!(
            "(SELECT DISTINCT ON (vin) vin, decoded_at, {}, recall_count, recall_campaigns, recall_error
              FROM {from} WHERE {decoded} ORDER BY vin, decoded_at DESC) l",
            cols.join(", ")
        )
    };
    format!(
        "INSERT INTO {schema}.{vehicles} (vin, decoded_at, {cols}, recall_count, has_recalls, recall_campaigns,
             recall_error, job_id)
         SELECT l.vin, l.decoded_at, {picked}, l.recall_count, l.recall_count > 0, l.recall_campaigns,
                l.recall_error, $1
         FROM {rows}
         ORDER BY l.vin COLLATE \"C\"
         ON CONFLICT (vin) DO UPDATE SET {set}, updated_at = now()
         WHERE {vehicles}.decoded_at <= EXCLUDED.decoded_at",
        cols = cols.join(", "),
        picked = picked.join(", "),
        set = set.join(", "),
    )
}

async fn create_tables(
    conn: &mut sqlx::PgConnection,
    schema: &str,
    results: &str,
    vehicles: &str,
) -> Result<(), sqlx::Error> {
    for stmt in ddl(schema, results, vehicles) {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(stmt)).execute(&mut *conn).await {
            // Two writers racing on IF NOT EXISTS: one gets a unique violation.
            let raced = e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "23505" || c == "42P07");
            if !raced {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The output's database: `url_env`'s, or the state store's.
async fn connect(
    state: Option<&sqlx::PgPool>,
    url_env: Option<&str>,
    place: &str,
) -> Result<sqlx::PgPool, OutputError> {
    match url_env {
        None => state.cloned().ok_or_else(|| {
            OutputError::write(
                place,
                "the state store is SQLite: set outputs.url_env to a variable holding a Postgres URL",
            )
        }),
        Some(var) => {
            let url = std::env::var(var)
                .map_err(|_| OutputError::write(place, format!("the variable {var} (outputs.url_env) is not set")))?;
            let cannot =
                |e| OutputError::write(place, format!("cannot connect to {}: {e}", crate::store::redact(&url)));
            let options = crate::store::postgres::connect_options(&url).map_err(cannot)?;
            crate::store::postgres::pool_options(&options)
                .max_connections(2)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect_with(options)
                .await
                .map_err(cannot)
        }
    }
}

/// Checks, before any call is paid for, that the output's tables can be
/// created or written: the same DDL in a transaction that is rolled back.
pub async fn probe(state: Option<&sqlx::PgPool>, output: &OutputSpec) -> Result<(), OutputError> {
    let OutputSpec::Postgres { url_env, schema, results_table, vehicles_table, .. } = output else {
        unreachable!("tables::probe takes postgres outputs")
    };
    let place = format!("postgres {schema}.{results_table} and {schema}.{vehicles_table}");
    let pool = connect(state, url_env.as_deref(), &place).await?;
    let fail = |e: sqlx::Error| OutputError::write(&place, e);
    let mut tx = pool.begin().await.map_err(fail)?;
    create_tables(&mut tx, schema, results_table, vehicles_table).await.map_err(fail)?;
    if output.vin_hash().is_some() {
        add_vin_hmac(&mut tx, schema, results_table, vehicles_table).await.map_err(fail)?;
    }
    tx.rollback().await.map_err(fail)?;
    Ok(())
}

/// The comment that marks a load table of `results` for job `job_id`: how
/// a later write finds (and drops) one a killed writer left behind.
fn load_mark(schema: &str, results: &str, job_id: i64) -> String {
    format!("vinetl load of {schema}.{results} for job {job_id}")
}

/// Writes the job's rows; returns rows written and where.
pub async fn write(
    store: &Store,
    output: &OutputSpec,
    job_id: i64,
    rows: super::RowsRx,
) -> Result<(u64, String), OutputError> {
    let hasher = VinHasher::for_output(output, &super::vin_hash::described(output))?;
    write_hashed(store, output, job_id, hasher, Feed::Rows(rows)).await
}

/// Where a write's rows come from.
pub enum Feed {
    /// Streamed by the state store, shared with the job's other outputs.
    Rows(super::RowsRx),
    /// Read and written by the state store's database itself, in the
    /// job's recall mode: only for a table in that database (see
    /// [`on_server`]), with no `vin_hash`.
    OnServer(RecallMode),
}

/// Whether a job with these outputs writes its table on the server: its
/// only output is a Postgres table in the state store's own database (no
/// `url_env`) without `vin_hash` (the key stays in this process). Then no
/// row is read into this process and sent back: `Store::results_into`
/// fills the load table. With more outputs, all of them take the one
/// stream of rows, so they are written from one snapshot and a failed one
/// stops the rest.
pub fn on_server(store: &Store, outputs: &[OutputSpec], hashers: &[Option<VinHasher>]) -> bool {
    matches!((outputs, hashers), ([output], [hasher]) if loads_on_server(output, hasher.as_ref()))
        && store.pg_pool().is_some()
}

/// Whether the server can load this output: a Postgres table in the state
/// store's database (no `url_env`) with no `vin_hash`.
fn loads_on_server(output: &OutputSpec, hasher: Option<&VinHasher>) -> bool {
    matches!(output, OutputSpec::Postgres { url_env: None, .. }) && hasher.is_none()
}

/// [`write`] with the output's `vin_hash` key already read (`hasher`, from
/// [`VinHasher::for_output`]).
pub async fn write_hashed(
    store: &Store,
    output: &OutputSpec,
    job_id: i64,
    hasher: Option<VinHasher>,
    rows: Feed,
) -> Result<(u64, String), OutputError> {
    let OutputSpec::Postgres { url_env, schema, results_table: results, vehicles_table: vehicles, .. } = output else {
        unreachable!("tables::write takes postgres outputs")
    };
    let place = format!("postgres {schema}.{results} and {schema}.{vehicles}");
    // Checked by the spec; a VIN-free copy cannot be a table keyed by VIN.
    if hasher.as_ref().map(VinHasher::mode) != output.vin_hash()
        || hasher.as_ref().is_some_and(|h| h.mode() == VinHash::Instead)
    {
        return Err(OutputError::write(
            &place,
            "vin_hash: only \"beside\" is written to Postgres; nothing was written",
        ));
    }
    if matches!(rows, Feed::OnServer(_)) && !loads_on_server(output, hasher.as_ref()) {
        return Err(OutputError::write(
            &place,
            "only a table in the state database without vin_hash loads on the server",
        ));
    }
    let fail = |e: sqlx::Error| OutputError::write(&place, e);
    let pool = connect(store.pg_pool(), url_env.as_deref(), &place).await?;
    // A connection of this write's own, closed when the write ends or is
    // dropped (never back in a pool): it holds the job's load lock.
    let mut conn = pool.acquire().await.map_err(fail)?.detach();
    hold_load_lock(&mut conn, &load_mark(schema, results, job_id), job_id).await.map_err(fail)?;
    create_tables(&mut conn, schema, results, vehicles).await.map_err(fail)?;
    if hasher.is_some() {
        add_vin_hmac(&mut conn, schema, results, vehicles).await.map_err(fail)?;
    }
    let partitioned: bool = sqlx::query_scalar(
        "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(schema)
    .bind(results)
    .fetch_one(&mut conn)
    .await
    .map_err(fail)?;
    let target = Target { store, job_id, schema, results, vehicles, hasher: hasher.as_ref() };
    let total = if partitioned {
        write_partition(&mut conn, rows, &target).await
    } else {
        write_plain(&mut conn, rows, &target).await
    }
    .map_err(|e| match e {
        Failed::Sql(e) => fail(e),
        Failed::Rows(e) => e,
    })?;
    // Frees the load lock now rather than when the server notices.
    let _ = sqlx::Connection::close(conn).await;
    Ok((total, place))
}

/// Takes the session lock on the job's load of these tables (`mark`,
/// [`load_mark`]), waiting while another session holds it. Two writers of
/// one job (one whose lease ran out while it was stalled, and the one that
/// took the job over) never load at once: the later would drop the
/// earlier's load table as a leftover, or its freshly attached partition.
/// The lock lives with the connection, so a writer that dies frees it.
async fn hold_load_lock(conn: &mut sqlx::PgConnection, mark: &str, job_id: i64) -> Result<(), sqlx::Error> {
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(mark)
        .fetch_one(&mut *conn)
        .await?;
    if !taken {
        tracing::warn!(
            job = job_id,
            "another writer is loading this job's rows into these tables; waiting for it to end"
        );
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))").bind(mark).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Why a write stopped: the output's database, or reading the job's rows.
enum Failed {
    Sql(sqlx::Error),
    Rows(OutputError),
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Failed {
        Failed::Sql(e)
    }
}

impl From<OutputError> for Failed {
    fn from(e: OutputError) -> Failed {
        Failed::Rows(e)
    }
}

/// Whose rows go where, and the output's VIN hash.
struct Target<'a> {
    store: &'a Store,
    job_id: i64,
    schema: &'a str,
    results: &'a str,
    vehicles: &'a str,
    hasher: Option<&'a VinHasher>,
}

async fn run(conn: &mut sqlx::PgConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(conn).await.map(drop)
}

/// Whether a database error is the state store's passing trouble, not the
/// output's: no answer from the server, or SQLSTATE classes 08 (connection),
/// 40 (serialization, deadlock), 53 (insufficient resources), 57
/// (operator intervention: a shutdown, a restart) and 58 (system, I/O).
fn retry_later(e: &sqlx::Error) -> bool {
    match e.as_database_error().and_then(|d| d.code()) {
        Some(code) => ["08", "40", "53", "57", "58"].iter().any(|class| code.starts_with(class)),
        None => true,
    }
}

/// A fresh table like `results`, marked with [`load_mark`] (a killed
/// writer's are dropped first), holding the job's rows; returns its name
/// (unqualified) and the rows loaded.
async fn load_partition(conn: &mut sqlx::PgConnection, rows: Feed, t: &Target<'_>) -> Result<Loaded, Failed> {
    let Target { job_id, schema, results, .. } = *t;
    let mark = load_mark(schema, results, job_id);
    let orphans: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relkind = 'r' AND obj_description(c.oid, 'pg_class') = $2
           AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)",
    )
    .bind(schema)
    .bind(&mark)
    .fetch_all(&mut *conn)
    .await?;
    for t in orphans {
        run(conn, format!("DROP TABLE IF EXISTS {schema}.\"{t}\"")).await?;
    }
    // A name of its own per write (the one it replaces is still attached).
    let stem: String = results.chars().take(24).collect();
    let load = format!("{stem}_j{job_id}_{}", chrono_millis());
    // The CHECK lets ATTACH skip scanning the rows for the partition
    // bound; made with the table, each row is checked as it goes in, not
    // in a scan of its own afterwards (1.3 s at 10,000,000 rows).
    run(
        conn,
        format!(
            "CREATE TABLE {schema}.{load} (LIKE {schema}.{results} INCLUDING DEFAULTS,
                 CONSTRAINT {load}_job CHECK (job_id = {job_id}))"
        ),
    )
    .await?;
    let comment = |table: &str| format!("COMMENT ON TABLE {schema}.{table} IS '{}'", mark.replace('\'', "''"));
    run(conn, comment(&load)).await?;
    // Loaded on the server, each VIN's latest decode is kept aside by the
    // share that loads its rows, for the vehicles upsert
    // (`Store::results_into`).
    let latest = if matches!(rows, Feed::OnServer(_)) {
        let latest = format!("{load}_v");
        run(conn, format!("CREATE TABLE {schema}.{latest} (LIKE {schema}.{results} INCLUDING DEFAULTS)")).await?;
        run(conn, comment(&latest)).await?;
        Some(format!("{schema}.{latest}"))
    } else {
        None
    };
    let total = fill(conn, rows, t, (&format!("{schema}.{load}"), latest.as_deref()), LOAD_SESSIONS).await?;
    Ok(Loaded { load, latest, total })
}

/// A filled load table (unqualified), the table of its VINs' latest
/// decodes (qualified) where the load made one, and the rows loaded.
struct Loaded {
    load: String,
    latest: Option<String>,
    total: u64,
}

/// Sessions that load a job's partition on the server at once, each the
/// rows of its share of the job's VINs (`Store::results_into`). One
/// `INSERT … SELECT` keeps one server core busy: two sessions loaded
/// 10,000,000 rows in 31–38 s against 50–55 s for one (BENCHMARKS.md). More
/// would only pay on a server with the cores and the disk for them, and
/// would take more of the state store's pool.
const LOAD_SESSIONS: usize = 2;

/// Fills `table` (like the results table) with the job's rows: streamed
/// rows with one COPY, or on the server, in up to `sessions` transactions
/// (`table` must then be visible to other sessions: not a temporary
/// table, unless `sessions` is 1), and with `latest`, each decoded VIN's
/// latest decode into that table too. On the server, an error in the data or the table (a results
/// table altered by hand, a missing privilege) is the output's and fails
/// the write, as it would in a COPY; a lost connection, a server shutting
/// down or out of resources is the store's, and the write is tried again
/// later ([`retry_later`]).
async fn fill(
    conn: &mut sqlx::PgConnection,
    rows: Feed,
    t: &Target<'_>,
    (table, latest): (&str, Option<&str>),
    sessions: usize,
) -> Result<u64, Failed> {
    let Target { store, job_id, hasher, .. } = *t;
    match rows {
        Feed::Rows(rows) => copy_rows(conn, rows, job_id, hasher, table).await,
        Feed::OnServer(mode) => {
            tracing::info!(job = job_id, "loading {table} on the server: the rows stay in the database");
            let into = format!("{table} ({})", result_columns(false));
            match store.results_into(conn, (job_id, mode), (&into, latest), sessions).await {
                Ok(Some(n)) => Ok(n),
                Ok(None) => Err(Failed::Rows(OutputError::write(table, "the state store is not Postgres"))),
                Err(crate::store::StoreError::Sql(e)) if !retry_later(&e) => Err(Failed::Sql(e)),
                Err(e) => Err(Failed::Rows(OutputError::Store(e))),
            }
        }
    }
}

/// Loads into a fresh table, indexes it, and swaps it in as the job's
/// partition.
async fn write_partition(conn: &mut sqlx::PgConnection, rows: Feed, t: &Target<'_>) -> Result<u64, Failed> {
    let Target { job_id, schema, results, .. } = *t;
    let Loaded { load, latest, total } = load_partition(conn, rows, t).await?;
    // Indexed once loaded (cheaper than index upkeep per row). ANALYZE
    // reads only the columns the keys, the indexes and the vehicles upsert
    // use (0.23 s against 0.84–1.2 s for all 40 at 150,000 rows);
    // autovacuum analyzes the rest once the partition is attached.
    for stmt in [
        format!("ALTER TABLE {schema}.{load} ADD PRIMARY KEY (job_id, source, source_row)"),
        format!("CREATE INDEX ON {schema}.{load} (vin)"),
        format!("CREATE INDEX ON {schema}.{load} (job_id, status)"),
        format!("ANALYZE {schema}.{load} (job_id, source, source_row, vin, status, decoded_at)"),
    ] {
        run(conn, stmt).await?;
    }
    let old: Option<String> = sqlx::query_scalar(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
         WHERE n.nspname = $1 AND p.relname = $2 AND pg_get_expr(c.relpartbound, c.oid) = $3",
    )
    .bind(schema)
    .bind(results)
    .bind(format!("FOR VALUES IN ('{job_id}')"))
    .fetch_optional(&mut *conn)
    .await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // The vehicles first (seconds at 10,000,000 rows; readers of the
    // vehicles table are not blocked by it), the swap last: detaching
    // locks the results table against its readers until the commit, so
    // they wait for the swap alone. No deadlock between two writers: one
    // that holds the results table's lock has done its upsert.
    match &latest {
        Some(latest) => {
            upsert_vehicles(&mut tx, t, latest, false).await?;
            run(&mut tx, format!("DROP TABLE {latest}")).await?;
        }
        None => upsert_vehicles(&mut tx, t, &format!("{schema}.{load}"), total >= PICK_BY_INDEX_ROWS).await?,
    }
    if let Some(old) = old {
        run(&mut tx, format!("ALTER TABLE {schema}.{results} DETACH PARTITION {schema}.\"{old}\"")).await?;
        run(&mut tx, format!("DROP TABLE {schema}.\"{old}\"")).await?;
    }
    run(&mut tx, format!("ALTER TABLE {schema}.{results} ATTACH PARTITION {schema}.{load} FOR VALUES IN ({job_id})"))
        .await?;
    tx.commit().await?;
    Ok(total)
}

/// The vehicles upsert from `from`, the job's loaded rows (`by_index`: see
/// [`upsert_vehicles_sql`]).
async fn upsert_vehicles(
    tx: &mut sqlx::PgConnection,
    t: &Target<'_>,
    from: &str,
    by_index: bool,
) -> Result<(), sqlx::Error> {
    let sql = upsert_vehicles_sql(t.schema, t.vehicles, from, t.hasher.is_some(), by_index);
    sqlx::query(sqlx::AssertSqlSafe(sql)).bind(t.job_id).execute(tx).await.map(drop)
}

/// A results table made before partitioning: the rows are loaded into a
/// temporary table, then replace the job's old ones in one transaction
/// (which drops it). The temporary table lives with the connection, not a
/// transaction, so the server can fill it in a transaction of its own; a
/// failed write's is dropped by the connection's next write, or with it.
async fn write_plain(conn: &mut sqlx::PgConnection, rows: Feed, t: &Target<'_>) -> Result<u64, Failed> {
    let Target { job_id, schema, results, .. } = *t;
    run(conn, "DROP TABLE IF EXISTS pg_temp.vinetl_load".into()).await?;
    run(conn, format!("CREATE TEMP TABLE vinetl_load (LIKE {schema}.{results} INCLUDING DEFAULTS)")).await?;
    // One session: the temporary table is this connection's alone.
    let total = fill(conn, rows, t, ("pg_temp.vinetl_load", None), 1).await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {schema}.{results} WHERE job_id = $1")))
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
    run(&mut tx, format!("INSERT INTO {schema}.{results} SELECT * FROM pg_temp.vinetl_load")).await?;
    upsert_vehicles(&mut tx, t, "pg_temp.vinetl_load", false).await?;
    run(&mut tx, "DROP TABLE pg_temp.vinetl_load".into()).await?;
    tx.commit().await?;
    Ok(total)
}

/// Milliseconds since the epoch, for a load table's name.
fn chrono_millis() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// Streams the job's rows into `table` with one COPY; returns the count.
async fn copy_rows(
    conn: &mut sqlx::PgConnection,
    mut rows: super::RowsRx,
    job_id: i64,
    hasher: Option<&VinHasher>,
    table: &str,
) -> Result<u64, Failed> {
    let columns = result_columns(hasher.is_some());
    let mut copy = conn.copy_in_raw(&format!("COPY {table} ({columns}) FROM STDIN")).await?;
    let mut buf = String::with_capacity(COPY_CHUNK + 4096);
    let mut total = 0u64;
    loop {
        let chunk = match super::next_chunk(&mut rows).await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = copy.abort(&e).await;
                return Err(Failed::Rows(OutputError::write(table, e)));
            }
        };
        let keyed = hasher.map(VinHasher::keyed);
        for row in chunk.iter() {
            copy_line(&mut buf, job_id, keyed.as_ref(), row);
            total += 1;
            if buf.len() >= COPY_CHUNK {
                copy.send(std::mem::take(&mut buf).into_bytes()).await?;
                buf.reserve(COPY_CHUNK + 4096);
            }
        }
    }
    if !buf.is_empty() {
        copy.send(buf.into_bytes()).await?;
    }
    copy.finish().await?;
    Ok(total)
}

/// One row in COPY's text format, in [`result_columns`] order (`vin_hmac`
/// with `keyed`).
fn copy_line(buf: &mut String, job_id: i64, keyed: Option<&Keyed>, r: &OutputRow) {
    let _ = write!(buf, "{job_id}\t");
    field(buf, Some(&r.source));
    let _ = write!(buf, "{}\t", r.source_row);
    field(buf, Some(&r.raw_vin));
    field(buf, r.vin.as_deref());
    if let Some(keyed) = keyed {
        field(buf, keyed.vin(r.vin.as_deref()).as_deref());
    }
    field(buf, Some(&r.status));
    field(buf, r.error_code.as_deref());
    field(buf, r.error_text.as_deref());
    field(buf, r.decoded_at.map(|t| t.to_rfc3339()).as_deref());
    field(buf, r.check_digit_valid.map(|b| if b { "t" } else { "f" }));
    copy_text::vehicle(buf, &r.vehicle);
    copy_text::recalls(buf, r.recall_campaigns.as_deref());
    field(buf, r.recall_error.as_deref());
    // The last column ends the line.
    escape(buf, &serde_json::to_string(&r.carried).unwrap_or_else(|_| "{}".into()));
    buf.push('\n');
}

/// `vinetl forget VIN` in one Postgres output: the results rows of the VIN
/// are blanked as the state store's input rows are (the row stays, so each
/// job keeps its row count; its VIN, raw text, hash, vehicle columns and
/// carried columns go), and its vehicles row is deleted. Tables never
/// created are nothing to do. Returns the rows changed in both tables.
pub async fn forget(state: Option<&sqlx::PgPool>, output: &OutputSpec, vin: &str) -> Result<u64, OutputError> {
    let OutputSpec::Postgres { url_env, schema, results_table: results, vehicles_table: vehicles, .. } = output else {
        unreachable!("tables::forget takes postgres outputs")
    };
    let place = format!("postgres {schema}.{results} and {schema}.{vehicles}");
    let fail = |e: sqlx::Error| OutputError::write(&place, e);
    let pool = connect(state, url_env.as_deref(), &place).await?;
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name IN ($2, $3)",
    )
    .bind(schema)
    .bind(results)
    .bind(vehicles)
    .fetch_all(&pool)
    .await
    .map_err(fail)?;
    let has = |t: &str, c: &str| columns.iter().any(|(tt, cc)| tt == t && cc == c);
    let mut changed = 0;
    let mut tx = pool.begin().await.map_err(fail)?;
    if has(results, "vin") {
        let mut set = vec![
            "raw_vin = $2".to_string(),
            "vin = NULL".into(),
            "carried = '{}'".into(),
            "error_code = 'forgotten'".into(),
            "error_text = 'the VIN was removed by vinetl forget'".into(),
        ];
        let blanked =
            VEHICLE_COLUMNS.iter().map(|(n, _, _)| *n).chain(["recall_count", "has_recalls", "recall_campaigns"]);
        set.extend(blanked.chain([VIN_HMAC]).filter(|c| has(results, c)).map(|c| format!("{c} = NULL")));
        let sql =
            format!("UPDATE {schema}.{results} SET {} WHERE vin = $1 OR upper(trim(raw_vin)) = $1", set.join(", "));
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(vin)
            .bind(crate::store::FORGOTTEN)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        changed += done.rows_affected();
    }
    if has(vehicles, "vin") {
        let sql = format!("DELETE FROM {schema}.{vehicles} WHERE vin = $1");
        changed +=
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(vin).execute(&mut *tx).await.map_err(fail)?.rows_affected();
    }
    tx.commit().await.map_err(fail)?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of picking each VIN's row for the vehicles upsert give the
    /// same vehicles table, holding each VIN's latest decode (and a later
    /// job's older decode changes nothing), on a load with the cases that
    /// matter: a VIN decoded at three times (and failed at the latest),
    /// rows not decoded or with no decode time, a hashed VIN column. The one
    /// unit test that needs Postgres (as `scripts/test` provides), in a
    /// schema of its own; left behind only if it fails.
    #[tokio::test]
    async fn both_ways_of_picking_a_vins_row_upsert_the_latest_decode() {
        use sqlx::Executor as _;
        let url = std::env::var("VINETL_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let schema = format!("t_pick_{}_{nanos}", std::process::id());
        conn.execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).await.unwrap();
        for (vehicles, by_index) in [("by_sort", false), ("by_index", true)] {
            create_tables(&mut conn, &schema, "results", vehicles).await.unwrap();
            add_vin_hmac(&mut conn, &schema, "results", vehicles).await.unwrap();
            for (job, rows) in [
                (
                    1i64,
                    "(1, 1, 'A', 'decoded', 2, 'Old'), (1, 8, 'A', 'failed', 3, 'Failed'), (1, 2, 'A', 'decoded', 3, 'New'), (1, 3, 'A', 'decoded', 1, 'Oldest'),
                     (1, 4, 'B', 'decoded', NULL, 'Untimed'), (1, 5, 'C', 'failed', 3, 'Failed'),
                     (1, 6, 'D', 'decoded', 2, 'Kept'), (1, 7, NULL, 'invalid', NULL, NULL)",
                ),
                (2, "(2, 1, 'A', 'decoded', 1, 'Older'), (2, 2, 'D', 'decoded', 4, 'Newer')"),
            ] {
                let load = format!("{schema}.load_{vehicles}_{job}");
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "CREATE TABLE {load} (LIKE {schema}.results INCLUDING DEFAULTS);
                     INSERT INTO {load} (job_id, source, source_row, raw_vin, vin, vin_hmac, status, decoded_at, model)
                     SELECT job, 'f', n, coalesce(vin, '?'), vin, 'h-' || vin, status,
                            timestamptz '2026-11-01' + day * interval '1 day', model
                     FROM (VALUES {rows}) v (job, n, vin, status, day, model);
                     CREATE INDEX ON {load} (vin);
                     ANALYZE {load}"
                )))
                .await
                .unwrap();
                let sql = upsert_vehicles_sql(&schema, vehicles, &load, true, by_index);
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(job).execute(&mut conn).await.unwrap();
            }
            let got: Vec<(String, String, String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT vin, vin_hmac, model, job_id FROM {schema}.{vehicles} ORDER BY vin"
            )))
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let want = [("A", "h-A", "New", 1), ("D", "h-D", "Newer", 2)];
            let want: Vec<(String, String, String, i64)> =
                want.iter().map(|(v, h, m, j)| (v.to_string(), h.to_string(), m.to_string(), *j)).collect();
            assert_eq!(got, want, "{vehicles}");
        }
        // Every column alike, both ways.
        let cols = "vin, vin_hmac, decoded_at, make, model, recall_count, has_recalls, recall_campaigns, \
                    recall_error, job_id";
        for (a, b) in [("by_sort", "by_index"), ("by_index", "by_sort")] {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM (SELECT {cols} FROM {schema}.{a} EXCEPT ALL SELECT {cols} FROM {schema}.{b}) d"
            )))
            .fetch_one(&mut conn)
            .await
            .unwrap();
            assert_eq!(n, 0, "{n} rows of {a} are not in {b}");
        }
        conn.execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).await.unwrap();
    }
}
