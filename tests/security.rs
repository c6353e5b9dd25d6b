//! What a worker trusts: nothing it reads back from the database. A stored
//! spec that was changed after submission (anyone who can write the `jobs`
//! table could) is checked again, and a worker calls only the API hosts and
//! sends only the key variables its own configuration allows.

mod common;

use common::{cleanup, pool, requests_seen, spawn_worker, unique_schema, vinetl_async, wait_for_state, write_spec};
use vinetl::serve::faults::Faults;

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_stored_spec_fails_its_job_without_a_call() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("forged");
    let dir = tempfile::tempdir().unwrap();
    let vins: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(40)
        .map(String::from)
        .collect();
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    // Three jobs (a different timeout each, so three specs), each forged after
    // submission in one way.
    let forgeries = [
        // The key variable: every worker would send DATABASE_URL as its Bearer token.
        ("'{provider,api_key_env}'", r#""DATABASE_URL""#, vec!["\"DATABASE_URL\"", "VINETL_API_KEY_ENVS"]),
        // The host: the key would go to someone else's server.
        ("'{provider,base_url}'", r#""http://collector.invalid:9""#, vec!["collector.invalid:9", "VINETL_API_HOSTS"]),
        // A schema name that would reach DDL.
        (
            "'{outputs}'",
            r#"[{"kind": "postgres", "schema": "x; DROP SCHEMA public CASCADE", "results_table": "r"}]"#,
            vec!["stored spec of job", "postgres schema and table names"],
        ),
    ];
    let db = pool(&schema).await;
    for (i, (path, value, _)) in forgeries.iter().enumerate() {
        let spec = write_spec(
            dir.path(),
            "kind = \"file\"\npath = \"vins.txt\"",
            &server.url(),
            &format!("timeout_secs = {}", 20 + i),
        );
        let out = vinetl_async(&schema, "pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let job = i as i64 + 1;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE jobs SET spec = jsonb_set(spec, {path}, '{value}'::jsonb) WHERE job_id = $1"
        )))
        .bind(job)
        .execute(&db)
        .await
        .unwrap();
    }
    let before = requests_seen(&server.url(), "pro-counted-key", 100_000).await;
    let _worker = spawn_worker(&schema, "pro-counted-key");
    for (i, (_, _, says)) in forgeries.iter().enumerate() {
        let s = wait_for_state(&schema, i as i64 + 1, "failed").await;
        let reason = s["state_reason"].as_str().unwrap_or_default();
        assert!(says.iter().all(|w| reason.contains(w)), "job {}: {reason}", i + 1);
        assert_eq!(s["calls_made"], 0, "{s}");
    }
    // The probe of `requests_seen` is its own request; nothing else came.
    assert_eq!(requests_seen(&server.url(), "pro-counted-key", 100_000).await, before + 1);
    // The schema the forgery named was never created.
    let made: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname LIKE 'x;%')")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(!made);
    cleanup(&schema).await;
}
