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

/// The three cache rows an earlier vinetl could hold for a batch entry with
/// a string `error`: with no field decoded beside VIN (read then as a
/// vehicle with empty fields), beside a decoded make (a warning), and a
/// clean vehicle. Their `raw` is what that version stored: the vehicle,
/// serialized.
fn old_cache_rows() -> Vec<(&'static str, String)> {
    use vinetl::api::Vehicle;
    let with_error = |vin: &str, make: &str, error: Option<&str>| {
        let mut v = Vehicle { vin: vin.to_string(), make: make.to_string(), ..Vehicle::default() };
        if let Some(e) = error {
            v.other.insert("error".to_string(), e.to_string());
        }
        serde_json::to_string(&v).unwrap()
    };
    vec![
        ("JM3KE4BY6G0600001", with_error("JM3KE4BY6G0600001", "", Some("Invalid VIN"))),
        ("1HGCM82633A004352", with_error("1HGCM82633A004352", "HONDA", Some("1 - Check Digit"))),
        ("5YJSA1DG9DFP14705", with_error("5YJSA1DG9DFP14705", "TESLA", None)),
    ]
}

/// What the upgrade left: each row's error code and text, and its `raw`.
type CacheRow = (String, Option<String>, Option<String>, serde_json::Value);

fn assert_upgraded(mut rows: Vec<CacheRow>) {
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let [honda, tesla, poisoned] = &rows[..] else { panic!("{rows:?}") };
    assert_eq!((poisoned.1.as_deref(), poisoned.2.as_deref()), (Some("API_ERROR"), Some("Invalid VIN")));
    assert_eq!(
        poisoned.3,
        serde_json::json!({"VIN": "JM3KE4BY6G0600001", "error": {"code": "API_ERROR", "message": "Invalid VIN"}})
    );
    let parsed: vinetl::api::BatchEntry = serde_json::from_value(poisoned.3.clone()).unwrap();
    assert!(matches!(parsed, vinetl::api::BatchEntry::Failed { .. }), "reads back as the failure it is");
    for kept in [honda, tesla] {
        assert_eq!((kept.1.as_deref(), kept.2.as_deref()), (None, None), "{kept:?}");
    }
    assert_eq!(honda.3["error"], "1 - Check Digit", "a warning beside a decoded make stays");
}

/// An upgrade converts the cache rows an earlier vinetl stored for a string
/// error as a vehicle (no call is made for them again), and no other.
#[tokio::test]
async fn an_upgrade_turns_string_errors_cached_as_vehicles_into_failures() {
    let named = ["ErrorCode", "ErrorText"];
    for file in ["migrations/postgres/0018_cache_string_errors.sql", "migrations/sqlite/0015_cache_string_errors.sql"] {
        let sql = std::fs::read_to_string(file).unwrap();
        for f in vinetl::api::VEHICLE_FIELDS.iter().chain(&named) {
            assert!(sql.contains(&format!("'{f}'")), "{file} names every decoded field: {f} missing");
        }
    }

    // Postgres: migrated, then set back to before 0018, as an older vinetl left it.
    let schema = unique_schema("upgrade");
    let migrate = |url: &str, schema: Option<&str>| {
        let mut args = vec!["migrate", "--database-url", url];
        args.extend(schema.iter().flat_map(|s| ["--schema", *s]));
        let out = vinetl().args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    migrate(&pg_url(), Some(&schema));
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let in_schema = |sql: &str| sqlx::AssertSqlSafe(sql.replace("S.", &format!("{schema}.")));
    sqlx::query(in_schema("DELETE FROM S._sqlx_migrations WHERE version = 18")).execute(&pool).await.unwrap();
    for (vin, raw) in old_cache_rows() {
        sqlx::query(in_schema("INSERT INTO S.vin_cache (vin, raw) VALUES ($1, $2::jsonb)"))
            .bind(vin)
            .bind(raw)
            .execute(&pool)
            .await
            .unwrap();
    }
    migrate(&pg_url(), Some(&schema));
    let rows: Vec<CacheRow> = sqlx::query_as(in_schema("SELECT vin, error_code, error_text, raw FROM S.vin_cache"))
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_upgraded(rows);
    drop_schema(&schema).await;

    // SQLite: the same, before its 0015.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    migrate(&url, None);
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 15").execute(&db).await.unwrap();
    for (vin, raw) in old_cache_rows() {
        sqlx::query("INSERT INTO vin_cache (vin, decoded_at, raw) VALUES (?1, 0, ?2)")
            .bind(vin)
            .bind(raw)
            .execute(&db)
            .await
            .unwrap();
    }
    db.close().await;
    migrate(&url, None);
    let db = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows: Vec<(String, Option<String>, Option<String>, String)> =
        sqlx::query_as("SELECT vin, error_code, error_text, raw FROM vin_cache").fetch_all(&db).await.unwrap();
    assert_upgraded(rows.into_iter().map(|(v, c, t, r)| (v, c, t, serde_json::from_str(&r).unwrap())).collect());
}
