//! The runner's own state (jobs, inputs, batches, cache, limiter).
//!
//! Postgres is the production store ([`postgres`]). Everything lives in one
//! schema of the runner's own, so one database can host several installs and
//! every test can take a schema of its own.

pub mod postgres;

/// Where the state lives, from `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Postgres(String),
    Sqlite(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DATABASE_URL must start with postgres:// or sqlite://, got {0:?}")]
    UnknownScheme(String),
    #[error("the SQLite state store is not built yet (issue #8); set DATABASE_URL=postgres://USER@HOST:5432/DB")]
    SqliteNotBuilt,
    #[error(
        "schema name {0:?} is not allowed: use lowercase letters, digits and _, starting with a letter or _ (at most 63)"
    )]
    BadSchema(String),
    #[error("cannot connect to Postgres at {url}: {source}. Is it running, and does DATABASE_URL point at it?")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating schema {schema} failed: {source}")]
    Migrate { schema: String, source: sqlx::migrate::MigrateError },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("queue: {0}")]
    Queue(String),
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<DatabaseUrl, StoreError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(url.to_string()))
        } else if url.starts_with("sqlite:") {
            Ok(DatabaseUrl::Sqlite(url.to_string()))
        } else {
            Err(StoreError::UnknownScheme(redact(url)))
        }
    }
}

/// A schema name is spliced into DDL (identifiers cannot be bound), so it is
/// checked against a strict pattern first.
pub fn check_schema(schema: &str) -> Result<&str, StoreError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok { Ok(schema) } else { Err(StoreError::BadSchema(schema.to_string())) }
}

/// The URL with any password replaced, fit for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((auth, host)) = rest.split_once('@') else { return url.to_string() };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        let err = DatabaseUrl::parse("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn schema_names_are_checked_before_they_reach_sql() {
        assert!(check_schema("vinetl").is_ok());
        assert!(check_schema("t_123").is_ok());
        for bad in ["", "1abc", "a-b", "A", "x; drop table jobs", &"a".repeat(64)] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }
}
