//! The job runner end to end: real Postgres, a real `vinetl serve` over
//! loopback HTTP, and the `vinetl` binary as a user runs it.

mod common;

use std::io::Write;

use common::{cleanup, pool, status, unique_schema, vinetl_async, write_spec};
use serde_json::Value;
use vinetl::serve::faults::Faults;

const KEY: &str = "YOUR_API_KEY";

/// Every input row ends as exactly one output row: decoded, failed or invalid.
fn assert_rows_add_up(s: &Value) {
    let n = |k: &str| s[k].as_i64().unwrap();
    let invalid: i64 = s["invalid"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(n("rows"), n("decoded") + n("failed") + invalid + n("pending"), "{s}");
    assert_eq!(n("pending"), 0, "{s}");
    assert_eq!(n("valid") + invalid, n("rows"), "{s}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_job_with_carried_columns_accounts_for_every_row() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("csv");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("jobs/sample-fleet.csv", dir.path().join("fleet.csv")).unwrap();
    let spec = write_spec(
        dir.path(),
        "kind = \"file\"\npath = \"fleet.csv\"\ncarry = [\"unit_id\", \"depot\"]",
        &server.url(),
        "",
    );
    let out = vinetl_async(&schema, KEY, &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": done"), "{text}");

    let s = status(&schema, 1).await;
    assert_rows_add_up(&s);
    assert_eq!(s["rows"], 291);
    assert_eq!(s["invalid"]["wrong_length"], 6);
    assert_eq!(s["duplicates"], 18);
    // 263 distinct valid VINs in 20-VIN batches: 14 calls, and no more.
    assert_eq!(s["batches"], 14);
    assert_eq!(s["calls_made"], 14);

    let db = pool(&schema).await;
    let (carried, status_, raw): (Value, String, String) = sqlx::query_as(
        "SELECT ji.carried, ji.status, c.raw->>'Make' FROM job_inputs ji JOIN vin_cache c USING (vin)
         WHERE ji.vin = '1HGCM82633A004352' LIMIT 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(status_, "decoded");
    assert_eq!(raw, "HONDA");
    assert!(carried["unit_id"].as_str().unwrap().starts_with('U') && carried["depot"].is_string(), "{carried}");
    let (code, text): (String, String) =
        sqlx::query_as("SELECT error_code, error_text FROM job_inputs WHERE raw_vin = 'JM3KE4BY6G06'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(code, "wrong_length");
    assert!(text.contains("fleet.csv row") && text.contains("12 characters"), "{text}");

    // A second run within the cache TTL makes no call at all.
    let out = vinetl_async(&schema, KEY, &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success());
    let s2 = status(&schema, 2).await;
    assert_eq!(s2["calls_made"], 0);
    assert_eq!(s2["cache_hits"], 263);
    assert_rows_add_up(&s2);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_file_of_one_vin_per_line() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("gzip");
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(dir.path().join("vins.txt.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(&std::fs::read("tests/fixtures/pattern-vins.txt").unwrap()).unwrap();
    gz.finish().unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt.gz\"", &server.url(), "");
    let out = vinetl_async(&schema, KEY, &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    assert_rows_add_up(&s);
    assert_eq!(
        (s["rows"].as_i64(), s["decoded"].as_i64(), s["calls_made"].as_i64()),
        (Some(1000), Some(1000), Some(50))
    );
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_table_source() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("pgsrc");
    let db = pool("public").await;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&db).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {schema}.fleet (id bigint PRIMARY KEY, chassis text, odometer integer, active boolean)"
    )))
    .execute(&db)
    .await
    .unwrap();
    let vins = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let vins: Vec<&str> = vins.lines().take(45).chain(["not-a-vin"]).collect();
    for (i, v) in vins.iter().enumerate() {
        sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {schema}.fleet VALUES ($1, $2, $3, $4)")))
            .bind(i as i64 * 10)
            .bind(v)
            .bind(1000 + i as i32)
            .bind(i % 2 == 0)
            .execute(&db)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let source = format!(
        "kind = \"postgres\"\ntable = \"{schema}.fleet\"\ncolumn = \"chassis\"\nkey = \"id\"\ncarry = [\"odometer\", \"active\"]"
    );
    let spec = write_spec(dir.path(), &source, &server.url(), "");
    let out = vinetl_async(&schema, KEY, &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    assert_rows_add_up(&s);
    assert_eq!((s["rows"].as_i64(), s["decoded"].as_i64(), s["calls_made"].as_i64()), (Some(46), Some(45), Some(3)));
    // Carried columns keep their types.
    let carried: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT carried FROM {schema}.job_inputs WHERE row_number = 2"
    )))
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(carried, serde_json::json!({"odometer": 1001, "active": false}));
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_key_stops_the_job_at_once() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("badkey");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("tests/fixtures/pattern-vins.txt", dir.path().join("vins.txt")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    let out = vinetl_async(&schema, "not-the-key", &["run", spec.to_str().unwrap(), "--concurrency", "2"]).await;
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("failed") && text.contains("401"), "{text}");
    let s = status(&schema, 1).await;
    assert_eq!(s["state"], "failed");
    assert_rows_add_up(&s);
    assert_eq!(s["failed"], 1000, "every row carries the reason");
    // Calls already in flight may land; nothing is retried.
    assert!(s["calls_made"].as_i64().unwrap() <= 2, "{s}");
    assert_eq!(s["calls_retried"], 0);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn flaky_servers_cost_retries_but_no_rows() {
    // About one call in four fails, in every way a server can fail.
    let faults = Faults { fault_500: 0.15, fault_drop: 0.05, fault_malformed: 0.05, ..Faults::default() };
    let (server, _keys) = common::serve(faults).await;
    let schema = unique_schema("flaky");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("tests/fixtures/pattern-vins.txt", dir.path().join("vins.txt")).unwrap();
    // Generous attempts: 12 consecutive failures (0.25^12 per batch) never happen.
    let spec = write_spec(
        dir.path(),
        "kind = \"file\"\npath = \"vins.txt\"",
        &server.url(),
        "max_attempts = 12\ntimeout_secs = 5",
    );
    let out = vinetl_async(&schema, KEY, &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    assert_rows_add_up(&s);
    assert_eq!(s["decoded"], 1000, "{s}");
    assert!(s["calls_retried"].as_i64().unwrap() > 0, "the faults were hit: {s}");
    assert_eq!(s["calls_made"].as_i64().unwrap(), 50 + s["calls_retried"].as_i64().unwrap());
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_account_gets_429s_that_cost_no_attempt_and_no_row() {
    // The key allows 5 requests a second; the spec claims 200.
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("ratelimited");
    let dir = tempfile::tempdir().unwrap();
    let vins = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    std::fs::write(dir.path().join("vins.txt"), vins.lines().take(400).collect::<Vec<_>>().join("\n")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "max_attempts = 1");
    let out = vinetl_async(&schema, "pro-5-per-second", &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&schema, 1).await;
    assert_rows_add_up(&s);
    assert_eq!(s["decoded"], 400);
    assert!(s["rate_limited"].as_i64().unwrap() > 0, "the server pushed back: {s}");
    // With max_attempts = 1 any counted failure would have dead-lettered a batch.
    assert_eq!((s["calls_retried"].as_i64(), s["dead_lettered_batches"].as_i64()), (Some(0), Some(0)));
    assert_eq!(s["calls_made"].as_i64().unwrap(), 20 + s["rate_limited"].as_i64().unwrap());
    cleanup(&schema).await;
}
