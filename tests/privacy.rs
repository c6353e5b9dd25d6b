//! VINs as personal data, on both stores: the runner's audit trail (one
//! row per request that went out, with its VINs, never the key), its
//! retention (`vinetl audit --prune`, `vinetl worker --audit-retention`),
//! and `vinetl forget VIN` over the state store, the Postgres outputs and,
//! after `vinetl write`, the Parquet dataset. A real job against the real
//! server each time.

mod common;

use std::collections::BTreeSet;
use std::process::Output;

use common::{Backend, pg_url};
use serde_json::Value;

type Env = common::StoreEnv;

impl Env {
    fn new(backend: Backend) -> Env {
        Env::create(backend, "privacy")
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
        cmd.args(args)
            .env("DATABASE_URL", &self.url)
            .env("VINETL_SCHEMA", &self.schema)
            .env("CARVIN_API_KEY", "YOUR_API_KEY")
            .env("OUTPUT_DATABASE_URL", pg_url())
            .kill_on_drop(true);
        cmd
    }

    async fn vinetl(&self, args: &[&str]) -> Output {
        self.command(args).output().await.unwrap()
    }

    async fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let out = self.vinetl(args).await;
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Runs `sql` on the state store (times differ: `pg`, else `lite`).
    async fn exec(&self, pg: &str, lite: &str) {
        match self.backend {
            Backend::Pg => {
                let db = common::pool(&self.schema).await;
                sqlx::query(sqlx::AssertSqlSafe(pg.to_string())).execute(&db).await.unwrap();
            }
            Backend::Lite => {
                let db = sqlx::SqlitePool::connect(&self.url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(lite.to_string())).execute(&db).await.unwrap();
            }
        }
    }

    async fn count(&self, sql: &str) -> i64 {
        match self.backend {
            Backend::Pg => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                .fetch_one(&common::pool(&self.schema).await)
                .await
                .unwrap(),
            Backend::Lite => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
                .fetch_one(&sqlx::SqlitePool::connect(&self.url).await.unwrap())
                .await
                .unwrap(),
        }
    }

    /// Every table of the state store (and, on Postgres, the outputs'
    /// schema) whose text holds `needle`, with how many rows.
    async fn tables_holding(&self, needle: &str) -> Vec<(String, i64)> {
        let mut found = Vec::new();
        match self.backend {
            Backend::Pg => {
                let db = common::pool(&self.schema).await;
                let tables: Vec<(String, String)> = sqlx::query_as(
                    "SELECT table_schema::text, table_name::text FROM information_schema.tables
                     WHERE table_schema IN ($1, $2) AND table_type = 'BASE TABLE'",
                )
                .bind(&self.schema)
                .bind(format!("{}_out", self.schema))
                .fetch_all(&db)
                .await
                .unwrap();
                assert!(tables.len() > 10, "{tables:?}");
                for (s, t) in tables {
                    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT count(*) FROM \"{s}\".\"{t}\" x WHERE row_to_json(x)::text LIKE '%' || $1 || '%'"
                    )))
                    .bind(needle)
                    .fetch_one(&db)
                    .await
                    .unwrap();
                    if n > 0 {
                        found.push((format!("{s}.{t}"), n));
                    }
                }
            }
            Backend::Lite => {
                let db = sqlx::SqlitePool::connect(&self.url).await.unwrap();
                let tables: Vec<(String,)> =
                    sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
                        .fetch_all(&db)
                        .await
                        .unwrap();
                assert!(tables.len() > 10, "{tables:?}");
                for (t,) in tables {
                    let cols: Vec<(String,)> =
                        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT name FROM pragma_table_info('{t}')")))
                            .fetch_all(&db)
                            .await
                            .unwrap();
                    let any = cols
                        .iter()
                        .map(|(c,)| format!("CAST(\"{c}\" AS TEXT) LIKE '%' || $1 || '%'"))
                        .collect::<Vec<_>>();
                    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT count(*) FROM \"{t}\" WHERE {}",
                        any.join(" OR ")
                    )))
                    .bind(needle)
                    .fetch_one(&db)
                    .await
                    .unwrap();
                    if n > 0 {
                        found.push((t, n));
                    }
                }
            }
        }
        found
    }
}

/// Every value of every column of a Parquet dataset, as text.
fn parquet_text(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for batch in common::parquet_batches(dir) {
        // Times are not text (and need a time zone database to print).
        for col in
            batch.columns().iter().filter(|c| !matches!(c.data_type(), arrow::datatypes::DataType::Timestamp(..)))
        {
            for i in 0..col.len() {
                text.push_str(&arrow::util::display::array_value_to_string(col, i).unwrap());
                text.push('\n');
            }
        }
    }
    text
}

const BACKDATE_PG: &str = "UPDATE call_audit SET sent_at = now() - interval '400 days' WHERE call_id IN (SELECT call_id FROM call_audit ORDER BY call_id LIMIT 2)";
const BACKDATE_LITE: &str = "UPDATE call_audit SET sent_at = unixepoch() - 400 * 86400 WHERE call_id IN (SELECT call_id FROM call_audit ORDER BY call_id LIMIT 2)";

async fn audit_retention_and_forget(backend: Backend) {
    let (server, _keys) = common::serve(Default::default()).await;
    let env = Env::new(backend);
    let dir = env.dir.path();
    let pattern = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let mut vins: Vec<String> = pattern.lines().take(45).map(String::from).collect();
    let target = vins[3].clone();
    // The target twice: once as given, once as a person might type it.
    vins.push(target.to_lowercase());
    std::fs::write(dir.join("vins.txt"), vins.join("\n")).unwrap();
    let out_dir = dir.join("out");
    let tables = match backend {
        Backend::Pg => format!(
            "[[outputs]]\nkind = \"postgres\"\nurl_env = \"OUTPUT_DATABASE_URL\"\nschema = \"{}_out\"\nresults_table = \"results\"\n",
            env.schema
        ),
        Backend::Lite => String::new(),
    };
    std::fs::write(
        dir.join("job.toml"),
        format!(
            "name = \"privacy\"\n[source]\nkind = \"file\"\npath = \"vins.txt\"\n[provider]\nbase_url = \"{}\"\n\
             requests_per_second = 100\n[recalls]\nenabled = true\n[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n\
             partition = \"none\"\n{tables}",
            server.url(),
            out_dir.display()
        ),
    )
    .unwrap();
    let spec = dir.join("job.toml");
    let ran = env.vinetl(&["run", spec.to_str().unwrap()]).await;
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let status = {
        let out = env.vinetl(&["status", "1", "--json"]).await;
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };

    // One audit row per request that went out, with its VINs and no key.
    let audit = env.json_lines(&["audit"]).await;
    assert_eq!(audit.len() as i64, status["calls_made"].as_i64().unwrap(), "{status}");
    let origin = server.url().trim_end_matches('/').to_string();
    let decodes: Vec<&Value> = audit.iter().filter(|a| a["endpoint"] == "/api/v1/batch-decode").collect();
    let recalls: Vec<&Value> = audit.iter().filter(|a| a["endpoint"] == "/api/v1/recalls").collect();
    assert_eq!(decodes.len(), 3, "45 distinct VINs in 20s: {audit:?}");
    assert!(!recalls.is_empty(), "{audit:?}");
    let sent: BTreeSet<String> = decodes
        .iter()
        .flat_map(|a| a["vins"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()))
        .collect();
    let asked: BTreeSet<String> = vins.iter().map(|v| v.to_uppercase()).collect();
    assert_eq!(sent, asked);
    for a in &audit {
        assert_eq!(a["provider"], origin.as_str(), "{a}");
        assert_eq!(a["job_id"], 1, "{a}");
        assert!(a["sent_at"].as_str().unwrap().ends_with('Z'), "{a}");
        assert!(!a.to_string().contains("YOUR_API_KEY"), "{a}");
    }
    for r in &recalls {
        assert!(r["vins"].as_array().unwrap().is_empty() && r["lookup"].is_string(), "{r}");
    }
    let with_target = env.json_lines(&["audit", "--vin", &target.to_lowercase()]).await;
    assert_eq!(with_target.len(), 1, "{with_target:?}");
    assert!(env.json_lines(&["audit", "--job", "2"]).await.is_empty());
    assert_eq!(env.json_lines(&["audit", "--since", "1h", "--limit", "2"]).await.len(), 2);

    // Forget: the state store and the tables lose the VIN; the Parquet
    // dataset is named as not reached, and `vinetl write` rewrites it.
    assert!(parquet_text(&out_dir).contains(&target), "the VIN is in the Parquet first");
    assert!(!env.tables_holding(&target).await.is_empty());
    // Refused, touching nothing, while a job is planning: its later rows
    // could hold the VIN again.
    let held = env.tables_holding(&target).await;
    env.exec(
        "UPDATE jobs SET state = 'planning' WHERE job_id = 1",
        "UPDATE jobs SET state = 'planning' WHERE job_id = 1",
    )
    .await;
    let refused = env.vinetl(&["forget", &target]).await;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("job 1 is still planning") && said.contains("vinetl cancel 1"), "{said}");
    assert!(!said.contains("  "), "one line, single-spaced: {said}");
    assert_eq!(env.tables_holding(&target).await, held);
    env.exec("UPDATE jobs SET state = 'done' WHERE job_id = 1", "UPDATE jobs SET state = 'done' WHERE job_id = 1")
        .await;
    let forgot = env.vinetl(&["forget", &format!(" {} ", target.to_lowercase()), "--json"]).await;
    assert_eq!(forgot.status.code(), Some(1), "not everything reachable: {}", String::from_utf8_lossy(&forgot.stderr));
    let report: Value = serde_json::from_slice(&forgot.stdout).unwrap();
    assert_eq!(report["vin"], target.as_str());
    assert_eq!(report["store"]["cache"], 1, "{report}");
    assert_eq!(report["store"]["input_rows"], 2, "{report}");
    assert_eq!(report["store"]["audit_calls"], 1, "{report}");
    assert_eq!(report["store"]["jobs"], serde_json::json!([1]), "{report}");
    let not_reached = report["not_reached"].to_string();
    assert!(not_reached.contains(&out_dir.display().to_string()) && not_reached.contains("vinetl write 1"), "{report}");
    assert!(not_reached.contains("vins.txt"), "{report}");
    if backend == Backend::Pg {
        // Two result rows blanked, one vehicles row deleted.
        assert_eq!(report["outputs"][0]["rows"], 3, "{report}");
    }
    assert_eq!(env.tables_holding(&target).await, vec![], "the VIN is still in the store or the tables");
    assert!(env.json_lines(&["audit", "--vin", &target]).await.is_empty());
    let after = env.vinetl(&["status", "1", "--json"]).await;
    let after: Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(after["rows"], status["rows"], "every input row still has its row");
    let rewrote = env.vinetl(&["write", "1"]).await;
    assert!(rewrote.status.success(), "{}", String::from_utf8_lossy(&rewrote.stderr));
    assert!(!parquet_text(&out_dir).contains(&target), "the VIN is still in the Parquet dataset");
    let rows: usize = common::parquet_batches(&out_dir).iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, vins.len(), "the rewritten dataset keeps every row");

    // Retention: `audit --prune` deletes what is older, and only that.
    let total = env.count("SELECT count(*) FROM call_audit").await;
    env.exec(BACKDATE_PG, BACKDATE_LITE).await;
    let pruned = env.vinetl(&["audit", "--prune", "365d"]).await;
    assert!(String::from_utf8_lossy(&pruned.stdout).contains("pruned 2 audited requests"), "{pruned:?}");
    assert_eq!(env.count("SELECT count(*) FROM call_audit").await, total - 2);
    // A worker with --audit-retention prunes at start.
    env.exec(BACKDATE_PG, BACKDATE_LITE).await;
    let mut worker = env.command(&["worker", "--audit-retention", "365d"]).spawn().unwrap();
    let mut left = 0;
    for _ in 0..300 {
        left = env.count("SELECT count(*) FROM call_audit").await;
        if left == total - 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    worker.kill().await.unwrap();
    assert_eq!(left, total - 4, "the worker pruned the two old requests");
    server.stop().await.unwrap();
    if backend == Backend::Pg {
        common::cleanup(&env.schema).await;
        common::cleanup(&format!("{}_out", env.schema)).await;
    }
}

common::both_stores!(audit_retention_and_forget);

/// The server's audit log: a line per request (account label, never the
/// key; endpoint, VIN count, status), and `--audit-retention` deleting the
/// lines older than it at start, keeping the rest and any line it cannot read.
#[tokio::test(flavor = "multi_thread")]
async fn server_audit_log_records_each_request_and_prunes_old_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.toml"), common::KEYS_TOML).unwrap();
    let log = dir.path().join("audit.jsonl");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let old = |days: f64| {
        serde_json::json!({"ts": now - days * 86400.0, "account": "old", "path": "/x", "status": 200}).to_string()
    };
    std::fs::write(&log, format!("{}\n{}\nnot json\n{}\n", old(40.0), old(31.0), old(29.0))).unwrap();
    let server = vinetl::serve::spawn(vinetl::serve::ServeOptions {
        bind: "127.0.0.1:0".into(),
        keys: Some(dir.path().join("keys.toml")),
        audit_log: Some(log.clone()),
        audit_retention: Some(std::time::Duration::from_secs(30 * 86400)),
        ..Default::default()
    })
    .await
    .unwrap();
    let pattern = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let vins: Vec<&str> = pattern.lines().take(7).collect();
    let http = reqwest::Client::new();
    for key in ["YOUR_API_KEY", "wrong-key"] {
        http.post(format!("{}/api/v1/batch-decode", server.url().trim_end_matches('/')))
            .bearer_auth(key)
            .json(&serde_json::json!({ "vins": vins }))
            .send()
            .await
            .unwrap();
    }
    server.stop().await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("YOUR_API_KEY") && !text.contains("wrong-key"), "{text}");
    assert!(text.contains("not json"), "{text}");
    let lines = common::audit_lines(&log);
    let olds: Vec<f64> = lines.iter().filter(|l| l["account"] == "old").map(|l| l["ts"].as_f64().unwrap()).collect();
    assert_eq!(olds.len(), 1, "only the line within 30 days stays: {text}");
    assert!(olds[0] > now - 30.0 * 86400.0);
    let new: Vec<&Value> = lines.iter().filter(|l| l["account"] != "old").collect();
    assert_eq!(new.len(), 2, "{text}");
    assert_eq!(new[0]["account"], "guide");
    assert_eq!(
        (new[0]["path"].as_str(), new[0]["vins"].as_u64(), new[0]["status"].as_u64()),
        (Some("/api/v1/batch-decode"), Some(7), Some(200))
    );
    assert_eq!(new[1]["status"], 401);
    assert_ne!(new[1]["account"], "guide");
}
