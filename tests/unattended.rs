//! Unattended runs tell the truth: exit codes, outages, stuck jobs, checks
//! before any call is paid for, one error style. Each test is one of the
//! cases a nightly job meets with nobody watching.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{ServeProcess, audit_lines, cleanup, pg_url, status, unique_schema, vinetl, vinetl_async, write_spec};

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The first `n` pattern VINs as a one-VIN-per-line file in `dir`.
fn vins_file(dir: &Path, n: usize) {
    let vins = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    std::fs::write(dir.join("vins.txt"), vins.lines().take(n).collect::<Vec<_>>().join("\n")).unwrap();
}

fn set_rate(spec: &Path, rate: &str) {
    let text = std::fs::read_to_string(spec).unwrap().replace("requests_per_second = 200", rate);
    std::fs::write(spec, text).unwrap();
}

async fn wait_for(schema: &str, job: i64, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    for _ in 0..1800 {
        let s = status(schema, job).await;
        if ok(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {job} never {what}: {}", status(schema, job).await);
}

/// Case 1: the API goes away for a minute mid-job. The job waits, saying
/// why, instead of dead-lettering the night; when the server is back it
/// completes with no failed row, and the server (its audit log, across both
/// lives) answered exactly one call per batch: refused probes never reach
/// it, and no batch used an attempt while the circuit was open.
#[tokio::test(flavor = "multi_thread")]
async fn a_minute_long_outage_makes_the_job_wait_then_complete_with_one_call_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let log_arg = log.to_str().unwrap().to_string();
    let server = ServeProcess::start(&["--audit-log", &log_arg]);
    let port = server.port();
    let schema = unique_schema("outage");
    vins_file(dir.path(), 1000);
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url, "burst = 1");
    set_rate(&spec, "requests_per_second = 5");
    let key = "pro-counted-key";
    let out = vinetl_async(&schema, key, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out).1);
    let worker = common::spawn_worker(&schema, key);
    wait_for(&schema, 1, "made 10 calls", |s| s["calls_made"].as_i64() >= Some(10)).await;

    let down = std::time::Instant::now();
    server.stop();
    let waiting = wait_for(&schema, 1, "waited", |s| s["state"] == "waiting").await;
    let reason = waiting["state_reason"].as_str().unwrap();
    assert!(reason.contains("API unreachable since") && reason.contains("next probe at"), "{reason}");
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(down.elapsed())).await;
    let during = status(&schema, 1).await;
    assert_eq!(during["failed"], 0, "an outage fails no row: {during}");
    assert_eq!(during["dead_lettered_batches"], 0);

    let back = ServeProcess::start_on(&format!("127.0.0.1:{port}"), &["--audit-log", &log_arg]);
    let up = std::time::Instant::now();
    let s = wait_for(&schema, 1, "finished", |s| s["state"] == "done").await;
    let finished_after = up.elapsed().as_secs_f64();
    drop(worker);
    assert_eq!((s["decoded"].as_i64(), s["failed"].as_i64()), (Some(1000), Some(0)), "{s}");
    assert_eq!(s["calls_made"], 50, "refused connections are not calls: {s}");
    let answered: Vec<_> = audit_lines(&log)
        .into_iter()
        .filter(|l| l["path"] == "/api/v1/batch-decode" && l["account"] == "counted")
        .collect();
    assert_eq!(answered.len(), 50, "the server answered one call per batch, across the outage");
    assert!(answered.iter().all(|l| l["status"] == 200));
    let db = common::pool(&schema).await;
    let attempts: i32 =
        sqlx::query_scalar("SELECT coalesce(max(attempts), 0) FROM batches").fetch_one(&db).await.unwrap();
    assert!(attempts <= 1, "no batch spent its attempts on the outage: {attempts}");
    println!(
        "RELIABILITY api-outage: the API down 60 s mid-job (1,000 VINs, 5 calls/s); rows lost 0, duplicated 0; \
         calls 50 for 50 batches (wasted 0); attempts used by the outage 0; done {finished_after:.1} s after it came back"
    );
    drop(back);
    cleanup(&schema).await;
}

/// Case 1, for good: an API that stays down past `give_up_after` fails the
/// job with the reason and exit code 3, without a call made or counted.
#[tokio::test(flavor = "multi_thread")]
async fn an_api_down_past_give_up_after_fails_the_job_with_exit_3() {
    let server = ServeProcess::start(&[]);
    let url = server.url.clone();
    let schema = unique_schema("giveup");
    let dir = tempfile::tempdir().unwrap();
    vins_file(dir.path(), 100);
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &url, "give_up_after = \"4s\"");
    // Up at submit (the preflight), then gone.
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out).1);
    server.stop();
    // Its freed port may be bound at once by another test's server, which
    // would answer: point the stored job at the discard port (never bound
    // here), so "gone" stays gone.
    let db = common::pool(&schema).await;
    sqlx::query("UPDATE jobs SET spec = jsonb_set(spec, '{provider,base_url}', '\"http://127.0.0.1:9\"')")
        .execute(&db)
        .await
        .unwrap();
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["reprocess", "1"]).await;
    // The job has not ended: reprocess refuses (exit 2) and names what to do.
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let worker = common::spawn_worker(&schema, "YOUR_API_KEY");
    let s = wait_for(&schema, 1, "failed", |s| s["state"] == "failed").await;
    drop(worker);
    let reason = s["state_reason"].as_str().unwrap();
    assert!(reason.contains("unreachable since") && reason.contains("give_up_after"), "{reason}");
    assert_eq!((s["calls_made"].as_i64(), s["failed"].as_i64(), s["pending"].as_i64()), (Some(0), Some(100), Some(0)));
    cleanup(&schema).await;
}

/// Exit codes a scheduler can act on: 0 done, 4 done with failed rows over
/// `max_failed_share`, 3 a failed job, 2 usage and configuration.
#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_say_what_happened_and_the_first_line_says_it_too() {
    let server = ServeProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    vins_file(dir.path(), 40);
    let source = "kind = \"file\"\npath = \"vins.txt\"";
    let run = |spec: &Path, schema: &str| {
        vinetl()
            .args(["run", spec.to_str().unwrap()])
            .env("DATABASE_URL", pg_url())
            .env("VINETL_SCHEMA", schema)
            .env("CARVIN_API_KEY", "YOUR_API_KEY")
            .output()
            .unwrap()
    };
    // 0: every row decoded.
    let schema = unique_schema("exit0");
    let out = run(&write_spec(dir.path(), source, &server.url, ""), &schema);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("job 1 (test): done\n"), "{stdout}");
    cleanup(&schema).await;

    // 4: the host answers, but every batch is refused (a wrong path: 404),
    // so every row fails; 0 again when the spec allows that many.
    let wrong = format!("{}/wrong-prefix", server.url);
    for (allowed, code) in [("", 4), ("max_failed_share = 1.0\n", 0)] {
        let schema = unique_schema("exit4");
        let spec = write_spec(dir.path(), source, &wrong, "");
        std::fs::write(&spec, format!("{allowed}{}", std::fs::read_to_string(&spec).unwrap())).unwrap();
        let out = run(&spec, &schema);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(code), "{stdout}{stderr}");
        if code == 4 {
            let first = stdout.lines().next().unwrap();
            assert!(first.contains("done, but 40 of 40 rows failed") && first.contains("max_failed_share"), "{first}");
            assert!(stderr.contains(first), "the verdict is on stderr too: {stderr}");
        }
        cleanup(&schema).await;
    }

    // 3: the job failed (its input breaks while planning: a truncated gzip).
    let schema = unique_schema("exit3");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for _ in 0..20_000 {
        std::io::Write::write_all(&mut gz, b"1HGCM82633A004352\n").unwrap();
    }
    let bytes = gz.finish().unwrap();
    std::fs::write(dir.path().join("cut.txt.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&write_spec(dir.path(), "kind = \"file\"\npath = \"cut.txt.gz\"", &server.url, ""), &schema);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stderr.contains("job 1 failed while planning") && stderr.contains("cut.txt.gz"), "{stderr}");
    cleanup(&schema).await;

    // 2: configuration, before anything runs: an API key variable that is not set.
    let schema = unique_schema("exit2");
    let out = vinetl()
        .args(["run", write_spec(dir.path(), source, &server.url, "").to_str().unwrap()])
        .env("DATABASE_URL", pg_url())
        .env("VINETL_SCHEMA", &schema)
        .env_remove("CARVIN_API_KEY")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("vinetl: error: provider.api_key_env: the variable CARVIN_API_KEY is not set"),
        "{stderr}"
    );
    let jobs: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {schema}.jobs")))
        .fetch_one(&common::pool("public").await)
        .await
        .unwrap();
    assert_eq!(jobs, 0, "nothing was planned");
    cleanup(&schema).await;
}

/// Case 3: a plan that fails fails the job, with the file in the reason;
/// `reprocess` says what to do instead; the fixed spec submitted again
/// starts a new job that completes.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_plan_fails_the_job_and_the_fixed_input_runs_as_a_new_job() {
    let server = ServeProcess::start(&[]);
    let schema = unique_schema("planfail");
    let dir = tempfile::tempdir().unwrap();
    // Valid UTF-8 up to row 3, then a Latin-1 byte.
    std::fs::write(
        dir.path().join("fleet.csv"),
        b"vin,city\n1HGCM82633A004352,Leeds\n5YJSA1DG9DFP14705,Bonn\nJTDBT923291344240,K\xf6ln\n",
    )
    .unwrap();
    let source = "kind = \"file\"\npath = \"fleet.csv\"\ncarry = [\"city\"]";
    let spec = write_spec(dir.path(), source, &server.url, "");
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["submit", spec.to_str().unwrap()]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("fleet.csv row 3") && stderr.contains("latin1"), "{stderr}");
    let s = status(&schema, 1).await;
    assert_eq!(s["state"], "failed", "not stuck in planning: {s}");
    assert!(s["state_reason"].as_str().unwrap().contains("fleet.csv row 3"), "{s}");
    assert_eq!(s["calls_made"], 0);
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["reprocess", "1"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("failed while planning") && stderr.contains("submit the spec again"), "{stderr}");

    // The fix: say what the file is.
    std::fs::write(
        &spec,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("carry = [\"city\"]", "carry = [\"city\"]\nencoding = \"latin1\""),
    )
    .unwrap();
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.starts_with("job 2 submitted"), "{:?}", text(&out));
    let worker = common::spawn_worker(&schema, "YOUR_API_KEY");
    let s = wait_for(&schema, 2, "finished", |s| s["state"] == "done").await;
    drop(worker);
    assert_eq!(s["decoded"], 3);
    let db = common::pool(&schema).await;
    let city: String =
        sqlx::query_scalar("SELECT carried->>'city' FROM job_inputs WHERE job_id = 2 AND row_number = 3")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(city, "Köln", "Latin-1 read as Latin-1");
    cleanup(&schema).await;
}

/// Cases 3 and 4: problems a check can see before any call is paid for are
/// refused at submit (exit 2), naming the setting, with no job created and
/// no call made: a missing file, a glob matching nothing, a CSV without its
/// VIN column, an output under a regular file, an API nobody answers.
#[tokio::test(flavor = "multi_thread")]
async fn preflight_refuses_what_would_fail_later_before_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let server = ServeProcess::start(&["--audit-log", log.to_str().unwrap()]);
    let schema = unique_schema("preflight");
    std::fs::write(dir.path().join("fleet.csv"), "unit,chassis\nU1,1HGCM82633A004352\n").unwrap();
    std::fs::write(dir.path().join("a-file"), "not a directory").unwrap();
    vins_file(dir.path(), 20);
    let nothing = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    let out_under_file = format!("[[outputs]]\nkind = \"parquet\"\npath = \"{}/a-file/out\"", dir.path().display());
    let cases: &[(&str, &str, &str, &str)] = &[
        ("kind = \"file\"\npath = \"missing.txt\"", "", "source", "missing.txt"),
        ("kind = \"file\"\npath = \"nothing-*.csv\"", "", "source", "matches no files"),
        ("kind = \"file\"\npath = \"fleet.csv\"", "", "source", "no column \"vin\""),
        ("kind = \"file\"\npath = \"vins.txt\"", &out_under_file, "outputs[0]", "a-file/out"),
    ];
    for (source, outputs, setting, names) in cases {
        let spec = write_spec(dir.path(), source, &server.url, "");
        std::fs::write(&spec, format!("{}{outputs}\n", std::fs::read_to_string(&spec).unwrap())).unwrap();
        for cmd in [&["submit"][..], &["check"][..]] {
            let mut args: Vec<&str> = cmd.to_vec();
            args.push(spec.to_str().unwrap());
            let out = vinetl_async(&schema, "YOUR_API_KEY", &args).await;
            let (_, stderr) = text(&out);
            assert_eq!(out.status.code(), Some(2), "{cmd:?} {source}: {stderr}");
            assert!(stderr.starts_with(&format!("vinetl: error: {setting}: ")) && stderr.contains(names), "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        }
    }
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &nothing, "");
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["submit", spec.to_str().unwrap()]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("provider.base_url: nothing answers at"), "{stderr}");
    let jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&common::pool(&schema).await).await.unwrap();
    assert_eq!(jobs, 0, "no job was created");
    assert!(audit_lines(&log).iter().all(|l| l["path"] == "/api/v1/openapi.json"), "no call was made");
    cleanup(&schema).await;
}

/// `vinetl check SPEC --dry-run`: the plan, with cache hits, and nothing stored.
#[tokio::test(flavor = "multi_thread")]
async fn check_dry_run_prints_the_plan_and_stores_nothing() {
    let server = ServeProcess::start(&[]);
    let schema = unique_schema("dryrun");
    let dir = tempfile::tempdir().unwrap();
    vins_file(dir.path(), 100);
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url, "daily_quota = 2");
    let nightly = dir.path().join("nightly.toml");
    std::fs::rename(&spec, &nightly).unwrap();
    // Half the VINs decoded yesterday: a run of the first 50.
    std::fs::write(
        dir.path().join("half.txt"),
        std::fs::read_to_string(dir.path().join("vins.txt")).unwrap().lines().take(50).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let warm = write_spec(dir.path(), "kind = \"file\"\npath = \"half.txt\"", &server.url, "");
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["run", warm.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["check", nightly.to_str().unwrap(), "--dry-run", "--json"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = &c["plan"];
    assert_eq!(
        (plan["rows"].as_u64(), plan["distinct"].as_u64(), plan["cache_hits"].as_u64()),
        (Some(100), Some(100), Some(50)),
        "{c}"
    );
    assert_eq!(plan["calls"], 3, "50 uncached VINs in 20-VIN batches");
    assert_eq!(plan["quota_days"], 1.5);
    assert_eq!(common::status(&schema, 1).await["state"], "done");
    let jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&common::pool(&schema).await).await.unwrap();
    assert_eq!(jobs, 1, "the dry run made no job");
    cleanup(&schema).await;
}

/// A spec over 20 VINs in `dir`, against `url`, with one Parquet output,
/// `dir/out`: the spec's path and the output's.
fn parquet_spec(dir: &Path, url: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    vins_file(dir, 20);
    let out_dir = dir.join("out");
    let spec = write_spec(dir, "kind = \"file\"\npath = \"vins.txt\"", url, "");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, format!("{text}[[outputs]]\nkind = \"parquet\"\npath = \"{}\"\n", out_dir.display()))
        .unwrap();
    (spec, out_dir)
}

/// Case 5: two runs of one spec on one day. The second replaces the
/// partition and the first job's status says its output was superseded; a
/// rewrite of the first refuses to overwrite the second's without --force;
/// so does a reprocess, and its --force reaches the write at its end.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_on_the_same_day_supersedes_the_first_and_an_old_rewrite_needs_force() {
    let server = ServeProcess::start(&[]);
    let schema = unique_schema("supersede");
    let dir = tempfile::tempdir().unwrap();
    let (spec, out_dir) = parquet_spec(dir.path(), &server.url);
    for _ in 0..2 {
        let out = vinetl_async(&schema, "YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
        assert!(out.status.success(), "{:?}", text(&out));
    }
    let first = status(&schema, 1).await;
    let outputs = first["outputs"].as_array().unwrap();
    assert!(outputs[0].as_str().unwrap().ends_with("(superseded by job 2)"), "{first}");
    let second = status(&schema, 2).await;
    assert!(!second["outputs"][0].as_str().unwrap().contains("superseded"), "{second}");
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["write", "1"]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(status(&schema, 1).await["state"], "done", "a refused rewrite changes nothing");
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["write", "1", "--force"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let manifest_path = std::fs::read_dir(&out_dir).unwrap().next().unwrap().unwrap().path().join("_manifest.json");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["job_id"], 1);
    assert!(status(&schema, 2).await["outputs"][0].as_str().unwrap().ends_with("(superseded by job 1)"));
    // A third run takes the partition; a reprocess of the first refuses,
    // and its --force reaches the write at its end (the worker that writes
    // reads it from the job).
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["reprocess", "1"]).await;
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["reprocess", "1", "--force"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["job_id"], 1);
    assert!(status(&schema, 3).await["outputs"][0].as_str().unwrap().ends_with("(superseded by job 1)"));
    cleanup(&schema).await;
}

/// Case 5b: a write commits into its partition only while it holds the
/// partition's commit lock: with the lock held by another writer, `vinetl
/// write` stages its files, says it waits, leaves the partition as it was,
/// and commits once the lock is released; a writer whose staged files
/// went meanwhile commits nothing; a write clears its job's leftovers only
/// under the lock.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_commits_only_under_its_partitions_lock() {
    let server = ServeProcess::start(&[]);
    let schema = unique_schema("commitlock");
    let dir = tempfile::tempdir().unwrap();
    let (spec, out_dir) = parquet_spec(dir.path(), &server.url);
    let out = vinetl_async(&schema, "YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let place = status(&schema, 1).await["outputs"][0].as_str().unwrap().to_string();
    let partition = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir() && !p.ends_with("_temporary"))
        .unwrap();
    let written_at = || {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(partition.join("_manifest.json")).unwrap()).unwrap();
        m["written_at"].as_str().unwrap().to_string()
    };
    let before = written_at();
    let pool = common::pool(&schema).await;
    let (mut child, waiting) = write_waiting(&schema, &pool, &place).await;
    assert!(waiting, "the write says it waits for the lock");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(written_at(), before, "nothing committed while another writer holds the lock");
    assert!(partition.join("_SUCCESS").is_file(), "the partition's output stays whole and marked");
    sqlx::query("DELETE FROM output_locks").execute(&pool).await.unwrap();
    let status_code = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    assert!(status_code.success());
    assert_ne!(written_at(), before, "committed once the lock was released");
    let locks: i64 = sqlx::query_scalar("SELECT count(*) FROM output_locks").fetch_one(&pool).await.unwrap();
    assert_eq!(locks, 0, "the writer released its lock");
    // A writer whose staged files are gone when it gets the lock (a worker
    // that took the job's write over, after its lease, removed them and
    // committed) commits nothing, and leaves the job to that writer.
    let before = written_at();
    let (mut child, waiting) = write_waiting(&schema, &pool, &place).await;
    assert!(waiting, "the write says it waits for the lock");
    for staged in std::fs::read_dir(out_dir.join("_temporary")).unwrap() {
        std::fs::remove_dir_all(staged.unwrap().path()).unwrap();
    }
    sqlx::query("DELETE FROM output_locks").execute(&pool).await.unwrap();
    let status_code = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    assert!(!status_code.success());
    let s = status(&schema, 1).await;
    assert_eq!(s["state"], "writing", "not failed under the writer that took it over: {s}");
    assert_eq!(written_at(), before, "nothing committed");
    assert!(partition.join("_SUCCESS").is_file(), "the partition's output stays whole and marked");
    // The job's leftovers of an earlier attempt (what a writer that stalled
    // may be committing) are removed only under the lock.
    sqlx::query("UPDATE jobs SET state = 'done'").execute(&pool).await.unwrap();
    let leftover = out_dir.join("_temporary").join("job-1-00000000deadbeef");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("part-00000.parquet"), b"staged").unwrap();
    let (mut child, waiting) = write_waiting(&schema, &pool, &place).await;
    assert!(waiting, "the write says it waits for the lock");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(leftover.join("part-00000.parquet").is_file(), "left alone while another writer holds the lock");
    sqlx::query("DELETE FROM output_locks").execute(&pool).await.unwrap();
    let status_code = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    assert!(status_code.success());
    assert!(!leftover.exists(), "removed once the lock was released");
    assert_ne!(written_at(), before, "committed");
    cleanup(&schema).await;
}

/// `vinetl write 1`, started while another writer holds `place`'s commit
/// lock, once it says it waits for it (false: it ended, or a minute went
/// by, without saying so).
async fn write_waiting(schema: &str, pool: &sqlx::PgPool, place: &str) -> (tokio::process::Child, bool) {
    use tokio::io::AsyncBufReadExt;
    sqlx::query(
        "INSERT INTO output_locks (place, holder, job_id, until) VALUES ($1, 'another', 99, now() + interval '1 hour')",
    )
    .bind(place)
    .execute(pool)
    .await
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["write", "1"])
        .env("DATABASE_URL", pg_url())
        .env("VINETL_SCHEMA", schema)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let waiting = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("another writer is committing into this partition; waiting") {
                return true;
            }
        }
        false
    })
    .await;
    // The rest of its log is read (and dropped), so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, waiting == Ok(true))
}

/// Case 6: an input with no rows warns (and `min_rows` makes it an error).
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_input_warns_and_min_rows_makes_it_an_error() {
    let server = ServeProcess::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.csv"), "vin,unit\n").unwrap();
    for (extra, code) in [("", 0), ("min_rows = 1", 3)] {
        let schema = unique_schema("empty");
        let spec = write_spec(dir.path(), &format!("kind = \"file\"\npath = \"empty.csv\"\n{extra}"), &server.url, "");
        let out = vinetl_async(&schema, "YOUR_API_KEY", &["run", spec.to_str().unwrap()]).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(code), "{stdout}{stderr}");
        if code == 0 {
            assert!(stdout.contains("warning") && stdout.contains("no rows"), "{stdout}");
        } else {
            assert!(stderr.contains("fewer than source.min_rows = 1"), "{stderr}");
        }
        cleanup(&schema).await;
    }
}

/// Case 7: read-only commands never create state.
#[test]
fn read_only_commands_create_no_state() {
    let dir = tempfile::tempdir().unwrap();
    let out = vinetl().arg("status").current_dir(dir.path()).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("vinetl: error: no vinetl state at SQLite file vinetl.db"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no file was created");
    let nowhere = dir.path().join("no/such/dir/x.db");
    for args in [&["status"][..], &["cancel", "1"], &["write", "1"]] {
        let out =
            vinetl().args(args).args(["--database-url", &format!("sqlite://{}", nowhere.display())]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!dir.path().join("no").exists(), "{args:?} created a directory");
    }
    let schema = unique_schema("nostate");
    let out = vinetl().args(["status", "--database-url", &pg_url(), "--schema", &schema]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains(&format!("(schema {schema})")), "{:?}", text(&out));
}

/// Case 8: one error style, no repeated causes, no raw database text.
#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_in_one_style() {
    let schema = unique_schema("errstyle");
    let out = vinetl_async(&schema, "k", &["migrate"]).await;
    assert!(out.status.success());
    for args in [&["write", "999"][..], &["cancel", "999"], &["status", "999"], &["reprocess", "999"]] {
        let out = vinetl_async(&schema, "k", args).await;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim(), "vinetl: error: no job 999: `vinetl status` lists the jobs", "{args:?}");
    }
    let url = pg_url().rsplit_once('/').unwrap().0.to_string() + "/no_such_database";
    let out = vinetl().args(["status", "--database-url", &url]).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr.matches("does not exist").count(), 1, "said once: {stderr}");
    assert!(!stderr.contains("Is it running") && !stderr.contains("at line"), "{stderr}");
    assert!(stderr.contains("create it, or fix the database name"), "{stderr}");
    let out = vinetl().args(["status", "--database-url", "postgres://u:pw@127.0.0.1:1/db"]).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(stderr.matches("nothing answered").count(), 1, "{stderr}");
    assert!(!stderr.contains("pw@"), "{stderr}");
    cleanup(&schema).await;
}

/// Case 2: an interrupted embedded demo resumes its job on the next `vinetl
/// run` (the in-process API's address is not part of the job's identity),
/// and a `vinetl worker` meanwhile never calls the dead in-process port.
#[test]
fn an_interrupted_embedded_run_resumes_and_no_worker_calls_its_dead_port() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("jobs")).unwrap();
    for f in ["demo.toml", "sample-fleet.csv"] {
        std::fs::copy(Path::new("jobs").join(f), dir.path().join("jobs").join(f)).unwrap();
    }
    let status = || -> serde_json::Value {
        let out = vinetl().args(["status", "1", "--json"]).current_dir(dir.path()).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let mut first = vinetl().args(["run", "jobs/demo.toml"]).current_dir(dir.path()).spawn().unwrap();
    for _ in 0..600 {
        if status()["calls_made"].as_i64() >= Some(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let interrupted = status();
    assert_ne!(interrupted["state"], "done", "interrupted mid-job: {interrupted}");

    let mut worker = vinetl().args(["worker"]).current_dir(dir.path()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    worker.kill().unwrap();
    worker.wait().unwrap();
    let after = status();
    assert_eq!(after["calls_made"], interrupted["calls_made"], "the worker made no call for the embedded job");
    assert_eq!(after["failed"], 0, "and failed nothing: {after}");

    let again = vinetl().args(["run", "jobs/demo.toml"]).current_dir(dir.path()).output().unwrap();
    let (stdout, stderr) = text(&again);
    assert!(again.status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with("job 1 (demo): done"), "the same job resumed: {stdout}");
    let list = vinetl().args(["status", "--json"]).current_dir(dir.path()).output().unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
}

/// A call whose answer never came back still used quota. Workers are
/// killed mid-call (SIGKILL, while the server holds answers it has already
/// counted) four times; each time the dead worker's lease is run out, so
/// another takes its batches over. At the end `calls_made` holds every call
/// the server counted, the lost answers are counted apart, and every row is
/// decoded once.
///
/// A call is marked just before its request leaves; a worker killed in the
/// instant between the mark and the server reading the request leaves a
/// mark the server never counted. So `calls_made` may exceed the server's
/// count, by at most the lost answers, and never falls short of it (which
/// is what an account pays for). Usually the two are equal.
#[tokio::test(flavor = "multi_thread")]
async fn calls_made_covers_the_servers_count_after_workers_are_killed_mid_call() {
    let server = ServeProcess::start(&["--fault-answer-delay-ms", "300-600"]);
    let schema = unique_schema("lostcalls");
    let dir = tempfile::tempdir().unwrap();
    vins_file(dir.path(), 400);
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url, "");
    let out = vinetl_async(&schema, "pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out).1);
    let db = common::pool(&schema).await;
    let mut kills = 0;
    while kills < 4 {
        let mut worker = common::spawn_worker(&schema, "pro-counted-key");
        let s = wait_for(&schema, 1, "had a call in flight", |s| {
            s["calls"]["in_flight"].as_i64() >= Some(1) || s["state"] == "done"
        })
        .await;
        if s["state"] == "done" {
            break;
        }
        worker.kill().await.unwrap();
        kills += 1;
        // The dead worker's lease (2 × timeout + 30 s) runs out now.
        sqlx::query("UPDATE batches SET updated_at = now() - interval '1 hour' WHERE state = 'running'")
            .execute(&db)
            .await
            .unwrap();
    }
    assert_eq!(kills, 4, "the job outran the kills");
    let _worker = common::spawn_worker(&schema, "pro-counted-key");
    let s = wait_for(&schema, 1, "finished", |s| s["state"] == "done").await;
    let seen = common::requests_seen(&server.url, "pro-counted-key", 100_000).await;
    let made = s["calls_made"].as_u64().unwrap();
    let lost = s["calls"]["answer_lost"].as_i64().unwrap();
    assert!(
        made >= seen && made - seen <= lost as u64,
        "calls made {made} against the server's {seen}: never fewer, more by at most the {lost} lost: {s}"
    );
    // A kill lands a status poll after a call was seen in flight: by then
    // that answer may have been stored, so a kill loses 0 to 2 answers.
    assert!((1..=8).contains(&lost), "the kills lost answers, and they are counted: {s}");
    assert_eq!(s["calls"]["answered"].as_i64(), Some(20), "one stored answer per batch: {s}");
    assert_eq!(s["calls"]["in_flight"], 0, "{s}");
    assert_eq!((s["decoded"].as_i64(), s["failed"].as_i64()), (Some(400), Some(0)), "{s}");
    println!(
        "RELIABILITY worker-kill: {kills} SIGKILLs of a worker mid-call (400 VINs); rows lost 0, duplicated 0; \
         the server counted {seen} calls for 20 batches, calls made {made}; {lost} answers lost (wasted), counted"
    );
    cleanup(&schema).await;
}
