//! Postgres input: a table and column, or a SELECT. Rows stream from one
//! query (sqlx reads them as the consumer asks, so memory stays bounded), in
//! a stable order so row numbers mean the same thing on every read.

use futures_util::StreamExt;
use serde_json::Value;
use sqlx::PgPool;

use super::{InputRow, SourceError};

/// What to read.
#[derive(Debug, Clone)]
pub enum PgInput {
    /// `table` ordered by `key`; VINs in `column`.
    Table { table: String, column: String, key: String },
    /// Any SELECT with a `vin` column (order it for stable row numbers).
    Query { sql: String },
}

impl PgInput {
    /// The name rows are recorded under, e.g. `postgres:public.fleet`.
    pub fn label(&self) -> String {
        match self {
            PgInput::Table { table, .. } => format!("postgres:{table}"),
            PgInput::Query { .. } => "postgres:query".to_string(),
        }
    }

    fn sql(&self) -> Result<(String, String), SourceError> {
        match self {
            PgInput::Table { table, column, key } => {
                let t = quote_path(table).ok_or_else(|| bad_name(self, table))?;
                let k = quote_ident(key).ok_or_else(|| bad_name(self, key))?;
                Ok((format!("SELECT to_jsonb(src) FROM (SELECT * FROM {t} ORDER BY {k}) AS src"), column.clone()))
            }
            PgInput::Query { sql } => {
                Ok((format!("SELECT to_jsonb(src) FROM ({}) AS src", sql.trim().trim_end_matches(';')), "vin".into()))
            }
        }
    }
}

fn bad_name(input: &PgInput, name: &str) -> SourceError {
    SourceError::BadIdentifier { path: input.label(), name: name.to_string() }
}

/// `name` as a quoted identifier (letters, digits, `_`, `$` only).
fn quote_ident(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '$')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    ok.then(|| format!("\"{name}\""))
}

/// `schema.table` or `table`, each part quoted.
fn quote_path(name: &str) -> Option<String> {
    name.split('.').map(quote_ident).collect::<Option<Vec<_>>>().filter(|p| p.len() <= 2).map(|p| p.join("."))
}

/// Streams the input's rows to `emit` in chunks of `chunk_rows` (awaiting
/// each, so a slow consumer slows the read and memory stays flat); stops at
/// the first error (naming the source) or when `emit` returns false.
pub async fn read(
    pool: &PgPool,
    input: &PgInput,
    carry: &[String],
    chunk_rows: usize,
    mut emit: impl AsyncFnMut(Vec<InputRow>) -> bool,
) -> Result<u64, SourceError> {
    let label = input.label();
    let (sql, vin_column) = input.sql()?;
    let mut stream = sqlx::query_scalar::<_, Value>(sqlx::AssertSqlSafe(sql)).fetch(pool);
    let mut row = 0u64;
    let mut chunk = Vec::with_capacity(chunk_rows);
    while let Some(next) = stream.next().await {
        let obj = next.map_err(|e| SourceError::Query { path: label.clone(), row: row + 1, message: e.to_string() })?;
        let Value::Object(map) = obj else { continue };
        if row == 0 {
            has_columns(&label, &map, &vin_column, carry)?;
        }
        row += 1;
        let get = |name: &str| map.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
        let vin = match get(&vin_column) {
            Some(Value::String(s)) => s,
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let carried = carry.iter().map(|c| get(c).unwrap_or(Value::Null)).collect();
        chunk.push(InputRow { row, vin, carried, problem: None });
        if chunk.len() >= chunk_rows && !emit(std::mem::take(&mut chunk)).await {
            return Ok(row);
        }
    }
    if !chunk.is_empty() {
        emit(chunk).await;
    }
    Ok(row)
}

/// Runs the input's query for its first row: the table, the query's
/// syntax, the permission and the VIN and carried columns are checked
/// before anything is planned.
pub async fn probe(pool: &PgPool, input: &PgInput, carry: &[String]) -> Result<(), SourceError> {
    let label = input.label();
    let (sql, vin_column) = input.sql()?;
    let first: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("{sql} LIMIT 1")))
        .fetch_optional(pool)
        .await
        .map_err(|e| SourceError::Query { path: label.clone(), row: 1, message: db_message(&e) })?;
    match first {
        Some(Value::Object(map)) => has_columns(&label, &map, &vin_column, carry),
        _ => Ok(()),
    }
}

/// The first row has the VIN column and every carried one.
fn has_columns(
    label: &str,
    map: &serde_json::Map<String, Value>,
    vin_column: &str,
    carry: &[String],
) -> Result<(), SourceError> {
    for name in std::iter::once(vin_column).chain(carry.iter().map(String::as_str)) {
        if !map.keys().any(|k| k.eq_ignore_ascii_case(name)) {
            return Err(SourceError::missing_column(label, name, map.keys().map(String::as_str)));
        }
    }
    Ok(())
}

/// The database's own words for a failed query (without sqlx's prefix).
fn db_message(e: &sqlx::Error) -> String {
    e.as_database_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_or_refused() {
        assert_eq!(quote_path("public.fleet").as_deref(), Some("\"public\".\"fleet\""));
        assert_eq!(quote_ident("vin").as_deref(), Some("\"vin\""));
        for bad in ["", "a b", "x\"; drop table y; --", "a.b.c", "1abc"] {
            assert!(quote_path(bad).is_none(), "{bad}");
        }
    }
}
