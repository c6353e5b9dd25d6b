//! Postgres outputs: a results table (one row per input row of every job,
//! keyed by job, source and row) and a vehicles table (the latest decode per
//! VIN). A job's results are replaced in one transaction (readers see the
//! old rows or the new ones, never half), with batched UNNEST statements.

use futures_util::StreamExt;

use super::OutputError;
use crate::columns::{Kind, OutputRow, VEHICLE_COLUMNS};
use crate::spec::{JobSpec, OutputSpec};
use crate::store::Store;

/// Rows per INSERT statement.
const CHUNK_ROWS: usize = 5000;

fn sql_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "TEXT",
        Kind::Int => "INTEGER",
        Kind::Float => "DOUBLE PRECISION",
    }
}

/// The tables, created if missing. Names were checked by the spec.
fn ddl(schema: &str, results: &str, vehicles: &str) -> Vec<String> {
    let vehicle_cols: String = VEHICLE_COLUMNS.iter().map(|(n, _, k)| format!("    {n} {},\n", sql_type(*k))).collect();
    let recall_cols =
        "    recall_count INTEGER,\n    has_recalls BOOLEAN,\n    recall_campaigns TEXT[],\n    recall_error TEXT,\n";
    vec![
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{results} (
    job_id BIGINT NOT NULL,
    source TEXT NOT NULL,
    source_row BIGINT NOT NULL,
    raw_vin TEXT NOT NULL,
    vin TEXT,
    status TEXT NOT NULL,
    error_code TEXT,
    error_text TEXT,
    decoded_at TIMESTAMPTZ,
    check_digit_valid BOOLEAN,
{vehicle_cols}{recall_cols}    carried JSONB NOT NULL DEFAULT '{{}}',
    written_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, source, source_row))"
        ),
        format!("CREATE INDEX IF NOT EXISTS {results}_vin_idx ON {schema}.{results} (vin)"),
        format!("CREATE INDEX IF NOT EXISTS {results}_status_idx ON {schema}.{results} (job_id, status)"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{vehicles} (
    vin TEXT PRIMARY KEY,
    decoded_at TIMESTAMPTZ NOT NULL,
{vehicle_cols}{recall_cols}    job_id BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ),
        format!("CREATE INDEX IF NOT EXISTS {vehicles}_mmy_idx ON {schema}.{vehicles} (make, model, model_year)"),
        format!("CREATE INDEX IF NOT EXISTS {vehicles}_recalls_idx ON {schema}.{vehicles} (vin) WHERE has_recalls"),
    ]
}

/// `$n::type[]` placeholders and the matching `x.col` list for UNNEST.
fn unnest_parts(first: usize) -> (String, String) {
    let mut args = Vec::new();
    let mut cols = Vec::new();
    for (i, (n, _, k)) in VEHICLE_COLUMNS.iter().enumerate() {
        let t = match k {
            Kind::Text => "text",
            Kind::Int => "int",
            Kind::Float => "float8",
        };
        args.push(format!("${}::{t}[]", first + i));
        cols.push((*n).to_string());
    }
    (args.join(", "), cols.join(", "))
}

fn insert_results_sql(schema: &str, results: &str) -> String {
    let (args, cols) = unnest_parts(11);
    let n = 11 + VEHICLE_COLUMNS.len();
    format!(
        "INSERT INTO {schema}.{results} (job_id, source, source_row, raw_vin, vin, status, error_code, error_text,
             decoded_at, check_digit_valid, {cols}, recall_count, has_recalls, recall_campaigns, recall_error, carried)
         SELECT $1, {select}
         FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::timestamptz[], $10::bool[], {args}, ${a}::int[], ${b}::bool[],
                     ${c}::text[], ${d}::text[], ${e}::jsonb[])
              AS x(source, source_row, raw_vin, vin, status, error_code, error_text, decoded_at, check_digit_valid,
                   {cols}, recall_count, has_recalls, recall_campaigns, recall_error, carried)",
        a = n,
        b = n + 1,
        c = n + 2,
        d = n + 3,
        e = n + 4,
        select = select_list(),
    )
}

/// recall_campaigns travel as comma-joined text (UNNEST cannot take a
/// ragged 2-D array) and are split here.
fn select_list() -> String {
    let cols: Vec<String> = VEHICLE_COLUMNS.iter().map(|(n, _, _)| format!("x.{n}")).collect();
    format!(
        "x.source, x.source_row, x.raw_vin, x.vin, x.status, x.error_code, x.error_text, x.decoded_at,
         x.check_digit_valid, {}, x.recall_count, x.has_recalls, string_to_array(x.recall_campaigns, ','),
         x.recall_error, x.carried",
        cols.join(", ")
    )
}

fn upsert_vehicles_sql(schema: &str, vehicles: &str) -> String {
    let (args, cols) = unnest_parts(3);
    let n = 3 + VEHICLE_COLUMNS.len();
    let set: Vec<String> = VEHICLE_COLUMNS
        .iter()
        .map(|(c, _, _)| *c)
        .chain(["decoded_at", "recall_count", "has_recalls", "recall_campaigns", "recall_error", "job_id"])
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {schema}.{vehicles} (vin, decoded_at, {cols}, recall_count, has_recalls, recall_campaigns,
             recall_error, job_id)
         SELECT x.vin, x.decoded_at, {cols}, x.recall_count, x.recall_count > 0,
                string_to_array(x.recall_campaigns, ','), x.recall_error, ${job}
         FROM UNNEST($1::text[], $2::timestamptz[], {args}, ${a}::int[], ${b}::text[], ${c}::text[])
              AS x(vin, decoded_at, {cols}, recall_count, recall_campaigns, recall_error)
         ON CONFLICT (vin) DO UPDATE SET {set}, updated_at = now()
         WHERE {vehicles}.decoded_at <= EXCLUDED.decoded_at",
        a = n,
        b = n + 1,
        c = n + 2,
        job = n + 3,
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
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(&url)
                .await
                .map_err(|e| {
                    OutputError::write(place, format!("cannot connect to {}: {e}", crate::store::redact(&url)))
                })
        }
    }
}

/// Checks, before any call is paid for, that the output's tables can be
/// created or written: the same DDL in a transaction that is rolled back.
pub async fn probe(state: Option<&sqlx::PgPool>, output: &OutputSpec) -> Result<(), OutputError> {
    let OutputSpec::Postgres { url_env, schema, results_table, vehicles_table } = output else {
        unreachable!("tables::probe takes postgres outputs")
    };
    let place = format!("postgres {schema}.{results_table} and {schema}.{vehicles_table}");
    let pool = connect(state, url_env.as_deref(), &place).await?;
    let fail = |e: sqlx::Error| OutputError::write(&place, e);
    let mut tx = pool.begin().await.map_err(fail)?;
    create_tables(&mut tx, schema, results_table, vehicles_table).await.map_err(fail)?;
    tx.rollback().await.map_err(fail)?;
    Ok(())
}

/// Writes the job's rows; returns rows written and where.
pub async fn write(
    store: &Store,
    job_id: i64,
    spec: &JobSpec,
    output: &OutputSpec,
) -> Result<(u64, String), OutputError> {
    let OutputSpec::Postgres { url_env, schema, results_table, vehicles_table } = output else {
        unreachable!("tables::write takes postgres outputs")
    };
    let place = format!("postgres {schema}.{results_table} and {schema}.{vehicles_table}");
    let fail = |e: sqlx::Error| OutputError::write(&place, e);
    let pool = connect(store.pg_pool(), url_env.as_deref(), &place).await?;
    create_tables(&mut *pool.acquire().await.map_err(fail)?, schema, results_table, vehicles_table)
        .await
        .map_err(fail)?;
    let insert = insert_results_sql(schema, results_table);
    let upsert = upsert_vehicles_sql(schema, vehicles_table);
    let mut tx = pool.begin().await.map_err(fail)?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {schema}.{results_table} WHERE job_id = $1")))
        .bind(job_id)
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
    let mut rows = store.output_rows(job_id, spec.recalls.mode()).chunks(CHUNK_ROWS);
    let mut total = 0u64;
    while let Some(chunk) = rows.next().await {
        let chunk = chunk.into_iter().collect::<Result<Vec<_>, _>>()?;
        insert_chunk(&mut tx, &insert, job_id, &chunk).await.map_err(fail)?;
        upsert_vehicles(&mut tx, &upsert, job_id, &chunk).await.map_err(fail)?;
        total += chunk.len() as u64;
        store.heartbeat(job_id).await?;
    }
    tx.commit().await.map_err(fail)?;
    Ok((total, place))
}

async fn insert_chunk(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &str,
    job_id: i64,
    rows: &[OutputRow],
) -> Result<(), sqlx::Error> {
    let texts = |f: &dyn Fn(&OutputRow) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job_id)
        .bind(texts(&|r| Some(r.source.clone())))
        .bind(rows.iter().map(|r| r.source_row).collect::<Vec<_>>())
        .bind(texts(&|r| Some(r.raw_vin.clone())))
        .bind(texts(&|r| r.vin.clone()))
        .bind(texts(&|r| Some(r.status.clone())))
        .bind(texts(&|r| r.error_code.clone()))
        .bind(texts(&|r| r.error_text.clone()))
        .bind(rows.iter().map(|r| r.decoded_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.check_digit_valid).collect::<Vec<_>>());
    let refs: Vec<&OutputRow> = rows.iter().collect();
    bind_vehicle(q, &refs)
        .bind(rows.iter().map(|r| r.recall_count()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.recall_count().map(|c| c > 0)).collect::<Vec<_>>())
        .bind(texts(&|r| r.recall_campaigns.as_ref().map(|c| c.join(","))))
        .bind(texts(&|r| r.recall_error.clone()))
        .bind(rows.iter().map(|r| serde_json::Value::Object(r.carried.clone())).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds one typed array per vehicle column, in [`VEHICLE_COLUMNS`] order.
fn bind_vehicle<'q>(mut q: PgQuery<'q>, rows: &[&OutputRow]) -> PgQuery<'q> {
    for (i, (_, _, kind)) in VEHICLE_COLUMNS.iter().enumerate() {
        q = match kind {
            Kind::Text => q.bind(rows.iter().map(|r| r.text(i).map(str::to_string)).collect::<Vec<_>>()),
            Kind::Int => q.bind(rows.iter().map(|r| r.int(i)).collect::<Vec<_>>()),
            Kind::Float => q.bind(rows.iter().map(|r| r.float(i)).collect::<Vec<_>>()),
        };
    }
    q
}

/// The chunk's decoded rows, one per VIN (the latest decode), into the
/// vehicles table; an older decode never overwrites a newer one.
async fn upsert_vehicles(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &str,
    job_id: i64,
    rows: &[OutputRow],
) -> Result<(), sqlx::Error> {
    let mut latest: std::collections::BTreeMap<&str, &OutputRow> = std::collections::BTreeMap::new();
    for r in rows.iter().filter(|r| r.status == "decoded" && r.decoded_at.is_some()) {
        let Some(vin) = r.vin.as_deref() else { continue };
        let e = latest.entry(vin).or_insert(r);
        if r.decoded_at > e.decoded_at {
            *e = r;
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let rows: Vec<&OutputRow> = latest.into_values().collect();
    let texts = |f: &dyn Fn(&OutputRow) -> Option<String>| rows.iter().map(|r| f(r)).collect::<Vec<_>>();
    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(texts(&|r| r.vin.clone()))
        .bind(rows.iter().map(|r| r.decoded_at).collect::<Vec<_>>());
    bind_vehicle(q, &rows)
        .bind(rows.iter().map(|r| r.recall_count()).collect::<Vec<_>>())
        .bind(texts(&|r| r.recall_campaigns.as_ref().map(|c| c.join(","))))
        .bind(texts(&|r| r.recall_error.clone()))
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_binds_one_array_per_column() {
        let sql = insert_results_sql("public", "results");
        let binds = 15 + VEHICLE_COLUMNS.len();
        assert!(sql.contains(&format!("${binds}::jsonb[]")), "{sql}");
        assert!(!sql.contains(&format!("${}", binds + 1)));
    }
}
