//! The state database goes away mid-job, and comes back: workers wait and
//! reconnect, make no call whose result they could not store, and the job
//! ends complete. Each test runs its own Postgres cluster (initdb and pg_ctl
//! from the machine's PostgreSQL, on a free port), never the shared server.
//! Every figure a test measures is printed as a `RELIABILITY` line, which
//! RELIABILITY.md quotes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ServeProcess, write_spec};

/// A throwaway Postgres cluster of the test's own.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn init() -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries (/usr/lib/postgresql/N/bin)")
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .find(|b| b.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/N/bin");
        let dir = tempfile::tempdir().unwrap();
        // initdb refuses root: as root, the cluster belongs to `postgres`.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let c = Cluster { dir, bin, port };
        c.pg("initdb", &["-D", &c.data(), "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions"]);
        c.start();
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// A PostgreSQL tool, run as `postgres` when this is root.
    fn tool(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        }
    }

    fn pg(&self, tool: &str, args: &[&str]) {
        let out = self.tool(tool).args(args).output().unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let opts =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.pg("pg_ctl", &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"]);
    }

    /// A fast shutdown: every connection is cut, as when the database fails over.
    fn stop(&self) {
        self.pg("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.tool("pg_ctl").args(["-D", &self.data(), "-m", "immediate", "stop"]).output();
    }
}

/// `vinetl ARGS` against the cluster.
async fn vinetl(db: &Cluster, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("CARVIN_API_KEY", "pro-counted-key")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// The job's counts, or `None` while the database is away.
async fn status(db: &Cluster) -> Option<serde_json::Value> {
    let out = vinetl(db, &["status", "1", "--json"]).await;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

async fn wait_for(
    db: &Cluster,
    what: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(s) = status(db).await
            && ok(&s)
        {
            return s;
        }
        assert!(start.elapsed() < limit, "job 1 never {what} within {limit:?}: {:?}", status(db).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker process whose stderr is kept in a file.
fn worker(db: &Cluster, log: &Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["worker", "--concurrency", "2"])
        .env("DATABASE_URL", db.url())
        .env("CARVIN_API_KEY", "pro-counted-key")
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Rows in a local Parquet dataset, and whether `_SUCCESS` is there.
fn dataset_rows(dir: &Path) -> (usize, bool) {
    let rows = common::parquet_batches(dir).iter().map(|b| b.num_rows()).sum();
    (rows, common::files_under(dir).iter().any(|f| f.file_name().is_some_and(|n| n == "_SUCCESS")))
}

/// A job over `vins` at `rate` calls/s, with a Parquet output.
fn job(dir: &Path, server: &str, vins: &[String], rate: u32) -> PathBuf {
    std::fs::write(dir.join("vins.txt"), vins.join("\n")).unwrap();
    let spec = write_spec(dir, "kind = \"file\"\npath = \"vins.txt\"", server, "");
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("requests_per_second = 200", &format!("requests_per_second = {rate}"));
    let out = dir.join("out");
    std::fs::write(&spec, format!("{text}[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n", out.display())).unwrap();
    spec
}

fn pattern_vins(n: usize) -> Vec<String> {
    std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap().lines().take(n).map(str::to_string).collect()
}

/// Postgres stops mid-job for 20 s (every connection cut), then starts
/// again. The worker process stays up, logs that it waits, reconnects, and
/// the job ends with every row decoded once in the output. Calls whose
/// answer came back while the database was away are counted, and the
/// job's count of calls equals the server's.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_stopped_mid_job_for_20_s_loses_no_row_and_counts_every_call() {
    let db = Cluster::init();
    let server = ServeProcess::start(&["--fault-latency-ms", "100-200"]);
    let dir = tempfile::tempdir().unwrap();
    let spec = job(dir.path(), &server.url, &pattern_vins(600), 10);
    let out = vinetl(&db, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = dir.path().join("worker.log");
    let mut w = worker(&db, &log);
    wait_for(&db, "made 5 calls", Duration::from_secs(60), |s| s["calls_made"].as_i64() >= Some(5)).await;
    let seen_before = common::requests_seen(&server.url, "pro-counted-key", 100_000).await;
    db.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    // While the database was away, at most the calls then in flight went out.
    let seen_during = common::requests_seen(&server.url, "pro-counted-key", 100_000).await - 1 - seen_before;
    assert!(w.try_wait().unwrap().is_none(), "the worker process stays up through the outage");
    db.start();
    let s = wait_for(&db, "finished", Duration::from_secs(240), |s| s["state"] == "done").await;
    let recovered = down.elapsed().as_secs_f64() - 20.0;
    assert!(w.try_wait().unwrap().is_none(), "the worker is still up");
    // Two probes of the server's count were decode calls of their own.
    let seen = common::requests_seen(&server.url, "pro-counted-key", 100_000).await - 2;
    assert_eq!((s["decoded"].as_i64(), s["failed"].as_i64()), (Some(600), Some(0)), "{s}");
    assert_eq!(s["calls_made"].as_u64(), Some(seen), "every call that reached the API is counted: {s}");
    assert_eq!(s["calls"]["answered"], 30, "one stored answer per batch: {s}");
    let lost = s["calls"]["answer_lost"].as_i64().unwrap();
    assert!(seen_during <= 2, "no call starts while the database is away ({seen_during} did)");
    let (rows, success) = dataset_rows(&dir.path().join("out"));
    assert_eq!((rows, success), (600, true), "one output row per input row");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("restarting"), "the worker says it waits for the database:\n{log}");
    println!(
        "RELIABILITY postgres-mid-job: down 20 s; rows lost 0, duplicated 0; calls {seen} for 30 batches, \
         {lost} answers lost (wasted), {seen_during} calls went out while it was down; done {recovered:.1} s after it came back"
    );
    let _ = w.kill().await;
}

/// Postgres restarts while a job's output is being written. The writer
/// fails, the job stays `writing`, and once the writer's lease has run out
/// a worker writes the output again from the stored results: no call is
/// made again, and the dataset has every row once, `_SUCCESS` last.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_during_the_output_write_rewrites_it_with_no_call() {
    let db = Cluster::init();
    let server = ServeProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // 120,000 rows over 40 VINs: a write long enough to catch, two calls.
    let vins = pattern_vins(40);
    let rows: Vec<String> = (0..120_000).map(|i| vins[i % vins.len()].clone()).collect();
    let spec = job(dir.path(), &server.url, &rows, 100);
    let out = vinetl(&db, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = dir.path().join("worker.log");
    let mut w = worker(&db, &log);
    wait_for(&db, "started writing", Duration::from_secs(120), |s| s["state"] == "writing").await;
    db.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    db.start();
    let s = wait_for(&db, "finished", Duration::from_secs(300), |s| s["state"] == "done").await;
    let recovered = down.elapsed().as_secs_f64() - 5.0;
    assert!(w.try_wait().unwrap().is_none(), "the worker stays up");
    let seen = common::requests_seen(&server.url, "pro-counted-key", 100_000).await;
    assert_eq!((s["decoded"].as_i64(), s["calls_made"].as_u64()), (Some(120_000), Some(seen)), "{s}");
    assert_eq!(seen, 2, "40 VINs, two calls, none made again for the rewrite");
    let (written, success) = dataset_rows(&dir.path().join("out"));
    assert_eq!((written, success), (120_000, true), "every row once, committed");
    println!(
        "RELIABILITY postgres-during-write: down 5 s mid-write; rows lost 0, duplicated 0; calls wasted 0; \
         done {recovered:.1} s after it came back (the writer's lease is {} s)",
        vinetl::job::advance::WRITE_LEASE_SECS
    );
    let _ = w.kill().await;
}
