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

/// The secret grep: a whole job (Postgres state reached through a URL with
/// a password, an API key, debug logs, metrics, invalid rows, a refused
/// call, Parquet and Postgres outputs) and then everything it produced is
/// searched for the key and the password: the worker's and the submitter's
/// output, `status`, `failures`, the metrics page, every row of every
/// table in the job's schema and the queue's, and the Parquet files.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_anything_a_job_produces() {
    const KEY: &str = "sk-grep-7Hq2Lw9Zt4";
    const PASSWORD: &str = "pw-grep-Xy81Kd";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.toml"),
        format!("[[keys]]\nkey = \"{KEY}\"\ntier = \"pro\"\nname = \"grep\"\n"),
    )
    .unwrap();
    let server = vinetl::serve::spawn(vinetl::serve::ServeOptions {
        bind: "127.0.0.1:0".into(),
        keys: Some(dir.path().join("keys.toml")),
        // Some calls fail, so error paths (retries, error text) are searched too.
        faults: Faults { fault_500: 0.2, ..Faults::default() },
        ..Default::default()
    })
    .await
    .unwrap();
    let schema = unique_schema("grep");
    // Trust auth ignores the password; every process is still handed it.
    let url = common::pg_url().replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    assert!(url.contains(PASSWORD), "{url}");
    let mut vins: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(60)
        .map(String::from)
        .collect();
    vins.extend(["NOT-A-VIN".to_string(), "1HGCM82633A00435Q".to_string()]);
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let out_dir = dir.path().join("out");
    let spec = dir.path().join("grep.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"grep\"\nmax_failed_share = 1.0\n[source]\nkind = \"file\"\npath = \"vins.txt\"\n[provider]\nbase_url = \"{}\"\n\
             requests_per_second = 50\nmax_attempts = 2\n[recalls]\nenabled = true\n[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n\
             [[outputs]]\nkind = \"postgres\"\nschema = \"{schema}\"\nresults_table = \"grep_results\"\n",
            server.url(),
            out_dir.display()
        ),
    )
    .unwrap();
    let envs = |cmd: &mut tokio::process::Command| {
        cmd.env("DATABASE_URL", &url)
            .env("VINETL_SCHEMA", &schema)
            .env("CARVIN_API_KEY", KEY)
            .env("VINETL_LOG", "debug")
            .env("RUST_BACKTRACE", "1")
            .kill_on_drop(true);
    };
    let mut submit = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    envs(submit.args(["submit", spec.to_str().unwrap()]));
    let submitted = submit.output().await.unwrap();
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // Debug logs are many: to a file, so a full pipe never stalls the worker.
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    envs(worker.args(["worker", "--metrics-addr", &metrics_addr]).stdout(log.try_clone().unwrap()).stderr(log));
    let mut worker = worker.spawn().unwrap();
    let status = common::wait_for_state(&schema, 1, "done").await;
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics")).await.unwrap().text().await.unwrap();
    let _ = std::process::Command::new("kill").args(["-TERM", &worker.id().unwrap().to_string()]).status();
    worker.wait().await.unwrap();
    let worker_log = std::fs::read(&log_path).unwrap();
    assert!(metrics.contains("vinetl_"), "{metrics}");
    let mut produced = vec![
        ("submit output".to_string(), [submitted.stdout, submitted.stderr].concat()),
        ("worker output".to_string(), worker_log.clone()),
        ("status".to_string(), status.to_string().into_bytes()),
        ("metrics".to_string(), metrics.into_bytes()),
    ];
    let mut failures = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    envs(failures.args(["failures", "1", "--json"]));
    produced.push(("failures".into(), failures.output().await.unwrap().stdout));
    assert!(String::from_utf8_lossy(&worker_log).contains("DEBUG"), "debug logs were on");
    for file in common::files_under(&out_dir) {
        produced.push((file.display().to_string(), std::fs::read(&file).unwrap()));
    }
    let db = common::pool(&schema).await;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN ($1, 'apalis')",
    )
    .bind(&schema)
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(tables.len() > 8, "{tables:?}");
    for (s, t) in tables {
        let rows: Vec<(String,)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT row_to_json(x)::text FROM \"{s}\".\"{t}\" x")))
                .fetch_all(&db)
                .await
                .unwrap();
        produced.push((format!("table {s}.{t}"), rows.into_iter().map(|r| r.0).collect::<String>().into_bytes()));
    }
    for (what, bytes) in &produced {
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.contains(KEY), "the API key is in {what}");
        assert!(!text.contains(PASSWORD), "the database password is in {what}");
    }
    assert!(produced.len() > 15, "searched {} places", produced.len());
    server.stop().await.unwrap();
    common::cleanup(&schema).await;
}
