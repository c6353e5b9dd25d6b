//! Shared by the integration tests: the real Postgres every machine runs,
//! and a schema of each test's own so tests run in parallel.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The test database; `.ci/run` makes sure it is up.
pub fn pg_url() -> String {
    std::env::var("VINETL_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A schema name no other test (or run) uses.
pub fn unique_schema(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("t_{prefix}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos)
}

/// The `vinetl` binary Cargo built for these tests.
pub fn vinetl() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    cmd.env_remove("DATABASE_URL").env_remove("VINETL_SCHEMA");
    cmd
}
