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
        .options([("search_path", schema)])
        .application_name("vinetl");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(connect_err)
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
