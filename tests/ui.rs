//! The jobs page in a real browser: a real `vinetl serve` (with latency),
//! a real Postgres schema, a worker, three jobs (one running, one failed on
//! a refused key, one paused with `vinetl pause`) and `vinetl ui`, loaded
//! by headless Chromium (Debian's package) through playwright-core
//! (tests/ui/check.cjs). scripts/test installs both.
//!
//! Screenshots go to `$CARGO_TARGET_TMPDIR/ui-test/` (the test prints the
//! path); README.md shows one of them, copied to tests/ui/jobs-page.png.

mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use common::{ServeProcess, pg_url, status, unique_schema, vinetl_async, vinetl_async_env};

/// The key the failed job's account sends: the server knows no such key.
const REVOKED_KEY: &str = "revoked-key-0000";

fn node_modules() -> PathBuf {
    let dir = std::env::var_os("VINETL_NODE_MODULES").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("VINETL_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or(home.join(".cache")).join("vinetl")
        });
        cache.join("node").join("node_modules")
    });
    assert!(
        dir.join("playwright-core").is_dir(),
        "playwright-core is not installed under {}: scripts/test installs it (scripts/tools: tools_playwright)",
        dir.display()
    );
    dir
}

fn chromium() -> String {
    let bin = std::env::var("VINETL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
    assert!(std::path::Path::new(&bin).is_file(), "{bin} is missing: apt-get install chromium (scripts/test does it)");
    bin
}

/// A spec named `name` over `vins`, on its own limiter account.
fn spec(dir: &std::path::Path, name: &str, vins: &[&str], base_url: &str, provider: &str) -> String {
    std::fs::write(dir.join(format!("{name}.txt")), vins.join("\n")).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\n[source]\nkind = \"file\"\npath = \"{name}.txt\"\n[provider]\nbase_url = \"{base_url}\"\n\
             account = \"{name}\"\n{provider}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Polls `vinetl status JOB --json` until `ok`, for up to 60 s.
async fn until(schema: &str, job: i64, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..300 {
        let s = status(schema, job).await;
        if ok(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("job {job} never {what}: {}", status(schema, job).await);
}

/// `vinetl ui` as its own process; killed on drop.
struct UiProcess {
    child: std::process::Child,
    url: String,
}

impl UiProcess {
    fn start(schema: &str) -> UiProcess {
        let mut child = common::vinetl()
            .args(["ui", "--bind", "127.0.0.1:0"])
            .env("DATABASE_URL", pg_url())
            .env("VINETL_SCHEMA", schema)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().expect("ui prints its address").unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        std::thread::spawn(move || for _ in lines {});
        UiProcess { child, url }
    }
}

impl Drop for UiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jobs_page_shows_progress_moving_a_failure_and_a_pause() {
    let (modules, browser) = (node_modules(), chromium());
    let server = ServeProcess::start(&["--fault-latency-ms", "100-200"]);
    let schema = unique_schema("ui");
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let vins: Vec<&str> = fixture.lines().collect();
    // Job 1 calls with a key the server refuses: it fails at its first call.
    let failed = spec(
        dir.path(),
        "eu-dealers",
        &vins[..40],
        &server.url,
        "api_key_env = \"UI_REVOKED_KEY\"\nrequests_per_second = 5",
    );
    // Job 2 is paused after a couple of calls; job 3 runs at 1.5 calls a
    // second (40 batches: long enough to be seen moving).
    let paused = spec(dir.path(), "fleet-returns", &vins[800..], &server.url, "requests_per_second = 1");
    let running =
        spec(dir.path(), "insurance-book", &vins[..800], &server.url, "requests_per_second = 1.5\ndaily_quota = 5000");
    for path in [&failed, &paused, &running] {
        let out = vinetl_async(&schema, "pro-counted-key", &["submit", path]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["worker", "--concurrency", "4"])
        .env("DATABASE_URL", pg_url())
        .env("VINETL_SCHEMA", &schema)
        .env("CARVIN_API_KEY", "pro-counted-key")
        .env("UI_REVOKED_KEY", REVOKED_KEY)
        .env("VINETL_API_KEY_ENVS", "CARVIN_API_KEY,UI_REVOKED_KEY")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    until(&schema, 2, "made 2 calls", |s| s["calls_made"].as_i64() >= Some(2)).await;
    let out = vinetl_async_env(&schema, "unused", &["pause", "2"], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    until(&schema, 2, "landed its calls after the pause", |s| s["state"] == "paused" && s["calls"]["in_flight"] == 0)
        .await;
    let f = until(&schema, 1, "failed", |s| s["state"] == "failed").await;
    assert!(f["state_reason"].as_str().unwrap().contains("UNAUTHORIZED"), "{f}");
    let r = until(&schema, 3, "made progress", |s| s["decoded"].as_i64() >= Some(20)).await;
    assert_eq!(r["state"], "running", "job 3 still running when the browser looks: {r}");

    let ui = UiProcess::start(&schema);
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-test");
    let expect = serde_json::json!({"running": 3, "failed": 1, "paused": 2, "failedText": "UNAUTHORIZED"});
    let node = tokio::process::Command::new("node")
        .arg("tests/ui/check.cjs")
        .args([&ui.url, &out_dir.display().to_string(), &expect.to_string()])
        .env("NODE_PATH", &modules)
        .env("VINETL_CHROMIUM", &browser)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), node).await.expect("the browser check ends").unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser check failed:\n{stderr}{stdout}");
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(seen["second"].as_f64() > seen["first"].as_f64(), "{seen}");
    println!("screenshots: {} (progress {}% then {}%)", out_dir.display(), seen["first"], seen["second"]);

    // The JSON mirror agrees with what the page showed.
    let listed: serde_json::Value = reqwest::get(format!("{}/api/jobs", ui.url)).await.unwrap().json().await.unwrap();
    let states: Vec<(i64, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["job_id"].as_i64().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert!(states.contains(&(1, "failed")) && states.contains(&(2, "paused")), "{states:?}");
    let missing = reqwest::get(format!("{}/jobs/99", ui.url)).await.unwrap();
    assert_eq!(missing.status(), 404);
    drop(ui);
    // Job 3 is still calling: the worker stops before its schema is dropped
    // (a write of it between the drop's table locks deadlocks with the drop).
    worker.kill().await.unwrap();
    common::cleanup(&schema).await;
}
