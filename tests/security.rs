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
        // A key file: any file the worker can read would go out as the key.
        ("'{provider,api_key_file}'", r#""/etc/hostname""#, vec!["\"/etc/hostname\"", "VINETL_API_KEY_FILES"]),
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

/// Rotating the runner's key: the job reads its key from a file
/// (`provider.api_key_file`); halfway through, the file gets a new key.
/// The calls after it go with the new key (the server's audit log names
/// the account of each), and the job ends with nothing failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_file_rotated_under_a_running_job_fails_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), common::KEYS_TOML).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let opts = vinetl::serve::ServeOptions {
        bind: "127.0.0.1:0".into(),
        keys: Some(dir.path().join("keys.toml")),
        audit_log: Some(audit.clone()),
        ..Default::default()
    };
    let server = vinetl::serve::spawn(opts).await.unwrap();
    let vins: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(200)
        .map(String::from)
        .collect();
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let key_file = dir.path().join("carvin.key");
    std::fs::write(&key_file, "YOUR_API_KEY\n").unwrap();
    let spec = dir.path().join("rotate.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"rotate\"\n[source]\nkind = \"file\"\npath = \"vins.txt\"\n[provider]\nbase_url = \"{}\"\n\
             api_key_file = \"carvin.key\"\nrequests_per_second = 4\nburst = 1\n",
            server.url()
        ),
    )
    .unwrap();
    let state = format!("sqlite://{}", dir.path().join("state.db").display());
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["run", spec.to_str().unwrap(), "--concurrency", "2"])
        .env("DATABASE_URL", &state)
        .env_remove("CARVIN_API_KEY")
        .kill_on_drop(true)
        .output();
    let rotate = async {
        for _ in 0..200 {
            if common::audit_lines(&audit).len() >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        std::fs::write(&key_file, "pro-counted-key\n").unwrap();
    };
    let (out, ()) = tokio::join!(run, rotate);
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = common::audit_lines(&audit);
    let accounts: Vec<&str> = lines.iter().filter_map(|l| l["account"].as_str()).collect();
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:?}");
    let first_new = accounts.iter().position(|a| *a == "counted").expect("calls after the rotation use the new key");
    assert!(first_new >= 3 && accounts[..first_new].iter().all(|a| *a == "guide"), "{accounts:?}");
    assert!(accounts[first_new..].iter().all(|a| *a == "counted"), "never the old key again: {accounts:?}");
    assert_eq!(accounts.len(), 10, "one call per batch: {accounts:?}");
    server.stop().await.unwrap();
}

/// A key rotated within the file system's time resolution (the file's
/// time did not move): the old key's 401 makes the client read the file
/// again and call once more with the new key. A refused key whose file
/// holds the same key is not retried.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_is_tried_once_more_when_its_file_holds_another() {
    use vinetl::call::client::{ApiClient, Outcome};
    let (server, _keys) = common::serve(Faults::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("carvin.key");
    std::fs::write(&key_file, "revoked-key-0000").unwrap();
    let text = format!(
        "name = \"t\"\n[source]\nkind = \"file\"\npath = \"x\"\n[provider]\nbase_url = \"{}\"\napi_key_file = \"{}\"\nrequests_per_second = 5\n",
        server.url(),
        key_file.display()
    );
    let spec = vinetl::spec::JobSpec::parse("t.toml", &text).unwrap();
    let client = ApiClient::from_spec(&spec.provider).unwrap();
    let vin = vinetl::vin::Vin::parse("1HGCM82633A004352").unwrap();
    let refused = client.batch_decode(std::slice::from_ref(&vin)).await;
    assert!(matches!(refused, Outcome::StopJob(_)), "the same key is not retried: {refused:?}");
    // The rotation lands with the file's old time.
    let was = std::fs::metadata(&key_file).unwrap().modified().unwrap();
    std::fs::write(&key_file, "pro-counted-key").unwrap();
    std::fs::File::options().write(true).open(&key_file).unwrap().set_modified(was).unwrap();
    let before = requests_seen(&server.url(), "pro-counted-key", 100_000).await;
    let got = client.batch_decode(std::slice::from_ref(&vin)).await;
    assert!(matches!(got, Outcome::Done(_)), "{got:?}");
    // The probe before, then the one call with the new key.
    assert_eq!(requests_seen(&server.url(), "pro-counted-key", 100_000).await, before + 2);
    server.stop().await.unwrap();
}

/// `vinetl serve keys add|revoke|list` on a keys file: the file holds
/// hashes only, `list` shows prefixes only, keys of one account share its
/// quota, and a running server takes an added or revoked key at once.
#[tokio::test(flavor = "multi_thread")]
async fn server_keys_are_hashed_shared_per_account_and_revoked_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    let keys = |args: &[&str]| {
        let out = common::vinetl().args(["serve", "keys"]).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let f = file.to_str().unwrap();
    let k1 = keys(&["add", "--file", f, "--name", "nightly", "--per-day", "5"]).trim().to_string();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(k1.starts_with("cva_") && k1.len() == 68, "{k1}");
    assert!(!text.contains(&k1) && text.contains("key_sha256"), "only the hash is stored: {text}");
    let server = vinetl::serve::spawn(vinetl::serve::ServeOptions {
        bind: "127.0.0.1:0".into(),
        keys: Some(file.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let call = async |key: &str| -> u16 {
        reqwest::Client::new()
            .post(format!("{}/api/v1/batch-decode", server.url()))
            .bearer_auth(key)
            .json(&serde_json::json!({"vins": ["1HGCM82633A004352"]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(call(&k1).await, 200);
    // A second key of the account, added while the server runs.
    let k2 = keys(&["add", "--file", f, "--name", "nightly", "--per-day", "5"]).trim().to_string();
    for _ in 0..2 {
        assert_eq!(call(&k2).await, 200);
        assert_eq!(call(&k1).await, 200);
    }
    assert_eq!(call(&k2).await, 429, "five a day for the account, whichever key");
    let listed = keys(&["list", "--file", f]);
    assert!(listed.contains(&k1[..12]) && listed.contains(&k2[..12]), "{listed}");
    assert!(!listed.contains(&k1[12..24]) && !listed.contains(&k2[12..24]), "prefixes only: {listed}");
    let hash = text.split('"').nth(3).unwrap().to_string();
    assert!(!listed.contains(&hash), "not the hash either");
    keys(&["revoke", "--file", f, &k1[..12]]);
    assert_eq!(call(&k1).await, 401, "revoked at once");
    assert_eq!(call(&k2).await, 429, "the other key stays, with the account's usage");
    server.stop().await.unwrap();
}

/// Rotation on both sides under a running job: the server gets a second
/// key for the account, the runner's key file gets it, the server revokes
/// the first; the job ends with nothing failed, one answered call per
/// batch (a call in flight with the old key is refused and made again with
/// the new one).
#[tokio::test(flavor = "multi_thread")]
async fn keys_rotate_on_both_sides_under_a_running_job_with_nothing_failed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    let keys = |args: &[&str]| {
        let out = common::vinetl().args(["serve", "keys"]).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let f = file.to_str().unwrap();
    let old = keys(&["add", "--file", f, "--name", "fleet"]);
    let audit = dir.path().join("audit.jsonl");
    let server = vinetl::serve::spawn(vinetl::serve::ServeOptions {
        bind: "127.0.0.1:0".into(),
        keys: Some(file.clone()),
        audit_log: Some(audit.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let vins: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(200)
        .map(String::from)
        .collect();
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let key_file = dir.path().join("carvin.key");
    std::fs::write(&key_file, &old).unwrap();
    let spec = dir.path().join("rotate.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"rotate\"\n[source]\nkind = \"file\"\npath = \"vins.txt\"\n[provider]\nbase_url = \"{}\"\n\
             api_key_file = \"carvin.key\"\nrequests_per_second = 4\nburst = 1\n",
            server.url()
        ),
    )
    .unwrap();
    let state = format!("sqlite://{}", dir.path().join("state.db").display());
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["run", spec.to_str().unwrap(), "--concurrency", "2"])
        .env("DATABASE_URL", &state)
        .kill_on_drop(true)
        .output();
    let rotate = async {
        while common::audit_lines(&audit).len() < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let new = keys(&["add", "--file", f, "--name", "fleet"]);
        std::fs::write(&key_file, &new).unwrap();
        keys(&["revoke", "--file", f, &old[..12]]);
        common::audit_lines(&audit).len()
    };
    let (out, at_revoke) = tokio::join!(run, rotate);
    let out = out.unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines = common::audit_lines(&audit);
    let answered = lines.iter().filter(|l| l["status"] == 200).count();
    assert_eq!(answered, 10, "one answered call per batch: {lines:?}");
    assert!(lines.len() > at_revoke, "calls went on after the old key was revoked");
    assert!(lines.iter().all(|l| l["status"] == 200 || l["status"] == 401), "{lines:?}");
    server.stop().await.unwrap();
}
