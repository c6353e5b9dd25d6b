//! `vinetl migrate` against the real Postgres, each test in its own schema.

mod common;

use common::{pg_url, unique_schema, vinetl};

async fn tables(schema: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    sqlx::query_scalar("SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1")
        .bind(schema)
        .fetch_all(&pool)
        .await
        .unwrap()
}

async fn drop_schema(schema: &str) {
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).execute(&pool).await.unwrap();
}

#[tokio::test]
async fn migrate_creates_the_runner_tables_in_its_own_schema_idempotently() {
    let schema = unique_schema("migrate");
    for _ in 0..2 {
        let out = vinetl().args(["migrate", "--database-url", &pg_url(), "--schema", &schema]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let got = tables(&schema).await;
    for t in ["_sqlx_migrations", "batches", "errors", "job_inputs", "job_sources", "jobs", "limiter", "vin_cache"] {
        assert!(got.iter().any(|g| g == t), "{t} missing from {got:?}");
    }
    drop_schema(&schema).await;
}

#[tokio::test]
async fn concurrent_migrations_from_many_processes_all_succeed() {
    // Six processes started together on a schema that does not exist yet:
    // they race on CREATE SCHEMA and on sqlx's migration lock.
    let schema = unique_schema("race");
    let children: Vec<_> = (0..6)
        .map(|_| {
            vinetl()
                .args(["migrate", "--database-url", &pg_url(), "--schema", &schema])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(tables(&schema).await.iter().any(|t| t == "jobs"));
    drop_schema(&schema).await;
}

#[test]
fn an_unreachable_database_fails_fast_naming_it_without_the_password() {
    let out = vinetl().args(["migrate", "--database-url", "postgres://u:hunter2@127.0.0.1:1/db"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:1") && err.contains("is Postgres running there"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn without_a_database_url_state_goes_to_a_sqlite_file_here() {
    let dir = tempfile::tempdir().unwrap();
    let out = vinetl().arg("migrate").current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SQLite file vinetl.db"));
    assert!(dir.path().join("vinetl.db").is_file() && dir.path().join("vinetl-queue.db").is_file());
    // Twice is fine.
    assert!(vinetl().arg("migrate").current_dir(dir.path()).output().unwrap().status.success());
}

#[test]
fn a_bad_schema_name_is_refused_before_any_sql() {
    let out = vinetl().args(["migrate", "--database-url", &pg_url(), "--schema", "x; drop"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not allowed"));
}

#[test]
fn processes_opening_a_new_sqlite_file_together_all_succeed() {
    // Two workers started at once: sqlx does not lock SQLite migrations.
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let children: Vec<_> = (0..4)
            .map(|_| {
                vinetl()
                    .args(["migrate", "--database-url", &url])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
