//! Shared by the integration tests: the real Postgres every machine runs,
//! and a schema of each test's own so tests run in parallel.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

/// The test database (scripts/test checks that it answers).
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

/// Keys every server test uses: the guide's literal `YOUR_API_KEY` (pro, so
/// the guide's snippets run verbatim), a free key and a rate-limited pro key.
pub const KEYS_TOML: &str = r#"
[[keys]]
key = "YOUR_API_KEY"
tier = "pro"
name = "guide"

[[keys]]
key = "free-tier-key"
tier = "free"
name = "free"

[[keys]]
key = "pro-counted-key"
tier = "pro"
per_day = 100000
name = "counted"

[[keys]]
key = "pro-5-per-second"
tier = "pro"
per_day = 1000
per_second = 5
name = "slow"
"#;

/// `vinetl serve` in this process on a free loopback port.
pub async fn serve(faults: vinetl::serve::faults::Faults) -> (vinetl::serve::RunningServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, KEYS_TOML).unwrap();
    let opts =
        vinetl::serve::ServeOptions { bind: "127.0.0.1:0".into(), keys: Some(keys), faults, ..Default::default() };
    (vinetl::serve::spawn(opts).await.unwrap(), dir)
}

/// `vinetl serve` as its own process on a free loopback port; killed on drop.
pub struct ServeProcess {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    pub fn start(extra: &[&str]) -> ServeProcess {
        ServeProcess::start_on("127.0.0.1:0", extra)
    }

    /// On a given address (a server restarted on the same port).
    pub fn start_on(bind: &str, extra: &[&str]) -> ServeProcess {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.toml");
        std::fs::write(&keys, KEYS_TOML).unwrap();
        let mut child = vinetl()
            .args(["serve", "--bind", bind, "--keys", keys.to_str().unwrap()])
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().expect("serve prints its address").unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ServeProcess { child, url, _dir: dir }
    }
}

impl ServeProcess {
    /// SIGTERM: requests in flight are answered, then the server exits.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// The server's process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Lines of a server's audit log (`--audit-log`).
pub fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A job spec in `dir` reading `source` (a TOML `[source]` body) and calling
/// `base_url` with the key in `CARVIN_API_KEY`.
pub fn write_spec(dir: &std::path::Path, source: &str, base_url: &str, provider_extra: &str) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    let text = format!(
        "name = \"test\"\n[source]\n{source}\n[provider]\nbase_url = \"{base_url}\"\napi_key_env = \"CARVIN_API_KEY\"\nrequests_per_second = 200\n{provider_extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the `vinetl` binary against `schema` with `key` as the API key,
/// without blocking the test's runtime (the API server may live in it).
pub async fn vinetl_async(schema: &str, key: &str, args: &[&str]) -> std::process::Output {
    vinetl_async_env(schema, key, args, &[]).await
}

/// [`vinetl_async`] with extra environment variables.
pub async fn vinetl_async_env(schema: &str, key: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"));
    cmd.envs(envs.iter().copied());
    cmd.args(args)
        .env("DATABASE_URL", pg_url())
        .env("VINETL_SCHEMA", schema)
        .env("CARVIN_API_KEY", key)
        .env("SOURCE_DATABASE_URL", pg_url())
        .kill_on_drop(true);
    cmd.output().await.unwrap()
}

/// `vinetl status JOB --json`.
pub async fn status(schema: &str, job: i64) -> serde_json::Value {
    let out = vinetl_async(schema, "unused", &["status", &job.to_string(), "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `status JOB --json` until the job's state is `want` (two minutes
/// at most), and returns that status.
pub async fn wait_for_state(schema: &str, job: i64, want: &str) -> serde_json::Value {
    for _ in 0..1200 {
        let s = status(schema, job).await;
        if s["state"] == want {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {job} never reached {want}: {}", status(schema, job).await);
}

/// A pool on the test database with `schema` first on the search path.
pub async fn pool(schema: &str) -> sqlx::PgPool {
    use std::str::FromStr;
    let opts = sqlx::postgres::PgConnectOptions::from_str(&pg_url())
        .unwrap()
        .options([("search_path", format!("{schema}, public"))]);
    sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_with(opts).await.unwrap()
}

/// Drops a test's schema and its queue tasks, on both lanes (an embedded
/// job's tasks were left behind before).
pub async fn cleanup(schema: &str) {
    use vinetl::job::queue::Lane;
    let pool = pool("public").await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).execute(&pool).await.unwrap();
    let _ = sqlx::query("DELETE FROM apalis.jobs WHERE job_type IN ($1, $2)")
        .bind(Lane::Shared.queue(schema))
        .bind(Lane::Embedded.queue(schema))
        .execute(&pool)
        .await;
}

/// A real S3-protocol server (s3s-fs) on a free loopback port; killed on drop.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
    _root: tempfile::TempDir,
}

pub const S3_ACCESS_KEY: &str = "vinetl-test";
pub const S3_SECRET_KEY: &str = "vinetl-test-secret";

impl S3Server {
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3s-fs is not installed: cargo install s3s-fs --version 0.14.1 --features binary --locked (scripts/test does this)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        S3Server { child, endpoint: format!("http://127.0.0.1:{port}"), _root: root }
    }

    /// An SDK client with the server's static credentials.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let creds = aws_sdk_s3::config::Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY, None, None, "test");
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(creds)
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// Environment for a child process: the standard AWS chain reads these.
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `vinetl worker --concurrency 2` process on `schema`, killed on drop.
pub fn spawn_worker(schema: &str, key: &str) -> tokio::process::Child {
    spawn_worker_with(schema, key, 2)
}

/// [`spawn_worker`] with `concurrency` calls in flight.
pub fn spawn_worker_with(schema: &str, key: &str, concurrency: usize) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["worker", "--concurrency", &concurrency.to_string()])
        .env("DATABASE_URL", pg_url())
        .env("VINETL_SCHEMA", schema)
        .env("CARVIN_API_KEY", key)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The API server's own count of requests on a key, from its quota header
/// (the probe itself is subtracted).
pub async fn requests_seen(base: &str, key: &str, per_day: u64) -> u64 {
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/v1/decode"))
        .bearer_auth(key)
        .json(&serde_json::json!({"vin": "1HGCM82633A004352"}))
        .send()
        .await
        .unwrap();
    let remaining: u64 = resp.headers()["x-ratelimit-remaining"].to_str().unwrap().parse().unwrap();
    per_day - remaining - 1
}

/// Checks `status --json` objects against the documented schema
/// (`src/cli/status.schema.json`, which refuses fields it does not list),
/// formats included, with the venv's `jsonschema_rs` (scripts/test puts the
/// venv first on PATH).
pub fn assert_status_schema(jobs: &[serde_json::Value]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("jobs.json");
    std::fs::write(&data, serde_json::to_vec(jobs).unwrap()).unwrap();
    let check = r#"
import json, sys, jsonschema_rs
schema = json.load(open(sys.argv[1]))
v = jsonschema_rs.Draft202012Validator(schema, validate_formats=True)
bad = [f"job {i}: {e.instance_path}: {e.message}" for i, j in enumerate(json.load(open(sys.argv[2]))) for e in v.iter_errors(j)]
print("\n".join(bad))
sys.exit(1 if bad else 0)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", check, concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli/status.schema.json")])
        .arg(&data)
        .output()
        .expect("python3 runs (scripts/test installs jsonschema_rs)");
    assert!(
        out.status.success(),
        "status --json does not match its schema:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, recursively, in path order.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() { dirs.push(p) } else { out.push(p) }
        }
    }
    out.sort();
    out
}

/// The record batches of every Parquet file of a dataset under `dir`,
/// staging (`_temporary/`) left out, as a reader would read it.
pub fn parquet_batches(dir: &std::path::Path) -> Vec<arrow::array::RecordBatch> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet") && !p.to_string_lossy().contains("/_temporary/"))
        .flat_map(|p| {
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&p).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(Result::unwrap)
        })
        .collect()
}

/// Which state store a test that runs on both uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Pg,
    Lite,
}

/// One backend's state for one test: a Postgres schema of its own, or a
/// SQLite file in a directory of its own. Test files add their own methods
/// (`impl StoreEnv` in the test crate).
pub struct StoreEnv {
    pub backend: Backend,
    pub url: String,
    pub schema: String,
    pub dir: tempfile::TempDir,
}

impl StoreEnv {
    /// A fresh state for `backend`, its schema named after `prefix`.
    pub fn create(backend: Backend, prefix: &str) -> StoreEnv {
        let dir = tempfile::tempdir().unwrap();
        let url = match backend {
            Backend::Pg => pg_url(),
            Backend::Lite => format!("sqlite://{}", dir.path().join("state.db").display()),
        };
        StoreEnv { backend, url, schema: unique_schema(prefix), dir }
    }
}

/// `both_stores!(a, b)`: tests `postgres::a`, `sqlite::a`, ... each calling
/// the file's `async fn a(backend: Backend)` (with `Backend` in scope).
/// Not every test file uses it.
#[allow(unused_macros)]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Backend::Pg).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Backend::Lite).await
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both_stores;

/// Waits until a session is blocked by session `pid` (at most 5 s).
pub async fn blocked_by(pool: &sqlx::PgPool, pid: i32, what: &str) {
    for _ in 0..500 {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))")
                .bind(pid)
                .fetch_one(pool)
                .await
                .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{what}: never waited for session {pid}");
}

/// A migrated schema of its own for a test that drives the store directly:
/// a pool on it and the state store opened on it.
pub async fn migrated_store(schema: &str) -> (sqlx::PgPool, vinetl::store::Store) {
    let migrated = vinetl_async_env(schema, "unused", &["migrate"], &[]).await;
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    let db = pool(schema).await;
    let state = vinetl::cli::jobs::State::new(Some(&pg_url()), schema).unwrap();
    (db, state.open(4).await.unwrap())
}

/// A decoded output row of `vin` at `source_row`: every vehicle column `make`
/// but the model, which is `model`.
pub fn decoded_row(
    source_row: i64,
    vin: &str,
    decoded_at: Option<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>>,
    make: &str,
    model: &str,
) -> vinetl::columns::OutputRow {
    let mut vehicle = vec![Some(make.to_string()); vinetl::columns::VEHICLE_COLUMNS.len()];
    vehicle[1] = Some(model.to_string());
    vinetl::columns::OutputRow {
        source: "fleet.csv".into(),
        source_row,
        raw_vin: vin.into(),
        vin: Some(vin.into()),
        status: "decoded".into(),
        error_code: None,
        error_text: None,
        decoded_at,
        check_digit_valid: Some(true),
        vehicle,
        recall_campaigns: None,
        recall_error: None,
        carried: Default::default(),
    }
}

/// Sends SIGTERM to a worker and waits (up to 30 s) for it to exit cleanly;
/// how long that took. A test stops its workers so before dropping its
/// schema: a worker's write between the drop's table locks deadlocks with it.
pub async fn stop_worker(worker: &mut tokio::process::Child) -> std::time::Duration {
    let pid = worker.id().unwrap().to_string();
    let stop = std::time::Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let Ok(exit) = tokio::time::timeout(std::time::Duration::from_secs(30), worker.wait()).await else {
        panic!("a stopped worker did not exit within 30 s");
    };
    let exit = exit.unwrap();
    assert!(exit.success(), "worker exit: {exit:?}");
    stop.elapsed()
}
