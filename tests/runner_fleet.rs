//! Many processes on one job: workers splitting the queue, and a planner
//! killed halfway and resumed.

mod common;

use std::time::Duration;

use common::{cleanup, pg_url, pool, requests_seen, status, unique_schema, vinetl_async, write_spec};
use vinetl::serve::faults::Faults;
use vinetl::vin::Vin;

#[tokio::test(flavor = "multi_thread")]
async fn two_worker_processes_split_a_job_and_never_call_a_batch_twice() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("twoworkers");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("tests/fixtures/pattern-vins.txt", dir.path().join("vins.txt")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    // 25 calls a second: the 50 calls take about two seconds, long enough
    // for both workers to be up and share them.
    let text = std::fs::read_to_string(&spec).unwrap().replace("requests_per_second = 200", "requests_per_second = 25");
    std::fs::write(&spec, text).unwrap();
    let out = vinetl_async(&schema, "pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut a = common::spawn_worker(&schema, "pro-counted-key");
    let mut b = common::spawn_worker(&schema, "pro-counted-key");
    let s = common::wait_for_state(&schema, 1, "done").await;
    // SIGTERM drains and exits cleanly.
    for w in [&mut a, &mut b] {
        common::stop_worker(w).await;
    }
    assert_eq!(s["decoded"], 1000);
    assert_eq!(s["batches"], 50);
    assert_eq!(s["calls_made"], 50);
    // The server saw exactly one call per batch.
    assert_eq!(requests_seen(&server.url(), "pro-counted-key", 100_000).await, 50);
    // Both workers took tasks.
    let db = pool(&schema).await;
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT lock_by) FROM apalis.jobs WHERE job_type = $1")
        .bind(vinetl::job::queue::queue_name(&schema))
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(workers, 2, "both workers processed batches");
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planner_killed_halfway_is_resumed_and_enqueues_nothing_twice() {
    let schema = unique_schema("killed");
    let dir = tempfile::tempdir().unwrap();
    // 60,000 distinct VINs: enough that planning takes a while.
    let pattern = std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap();
    let mut text = String::new();
    for i in 0..60_000usize {
        let base = &pattern.lines().nth(i % 1000).unwrap()[..11];
        let raw = format!("{base}{:06}", i);
        let vin = Vin::parse(&raw).unwrap();
        let mut fixed = raw.into_bytes();
        fixed[8] = vin.expected_check_digit() as u8;
        text.push_str(std::str::from_utf8(&fixed).unwrap());
        text.push('\n');
    }
    std::fs::write(dir.path().join("vins.txt"), text).unwrap();
    // An API that answers the preflight; planning calls nothing.
    let (server, _keys) = common::serve(Faults::default()).await;
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");

    let mut planner = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["submit", spec.to_str().unwrap()])
        .env("DATABASE_URL", pg_url())
        .env("VINETL_SCHEMA", &schema)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Kill it once some, but not all, rows are stored.
    let db = pool("public").await;
    let table = format!("{schema}.job_sources");
    let mut killed_at = 0i64;
    for _ in 0..600 {
        let planned: Option<i64> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT max(rows_planned) FROM {table}")))
                .fetch_optional(&db)
                .await
                .ok()
                .flatten()
                .flatten();
        if let Some(n) = planned.filter(|&n| n > 0) {
            planner.kill().await.unwrap();
            killed_at = n;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(killed_at > 0 && killed_at < 60_000, "killed after {killed_at} rows");

    let out = vinetl_async(&schema, "k", &["submit", spec.to_str().unwrap()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("job 1 resumed"), "{text}");
    let s = status(&schema, 1).await;
    assert_eq!(s["rows"], 60_000);
    assert_eq!(s["batches"], 3_000);
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
        .bind(vinetl::job::queue::queue_name(&schema))
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(tasks, 3_000, "one queue task per batch");
    // Submitting the same spec while the job is unfinished changes nothing.
    let out = vinetl_async(&schema, "k", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("job 1 resumed"));
    let jobs: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {schema}.jobs")))
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
    let tasks_after: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE job_type = $1")
        .bind(vinetl::job::queue::queue_name(&schema))
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(tasks_after, 3_000);
    cleanup(&schema).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_runs_no_more_batches_and_every_row_says_so() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("cancel");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("tests/fixtures/pattern-vins.txt", dir.path().join("vins.txt")).unwrap();
    // At the cancel, one of the worker's two places has a batch claimed
    // and waiting for the limiter, up to two seconds, and that call must
    // not go out.
    let key = "pro-counted-key";
    submit_slowly(&schema, dir.path(), &server.url(), key).await;
    let mut worker = common::spawn_worker(&schema, key);
    // The server's own count; every probe is one request more.
    let mut probes = 0;
    let mut seen = async || {
        probes += 1;
        requests_seen(&server.url(), key, 100_000).await - (probes - 1)
    };
    wait_for_calls(&schema, 2).await;
    let out = vinetl_async(&schema, key, &["cancel", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let at_cancel = seen().await;
    assert!((2..50).contains(&at_cancel), "cancelled mid-job, after {at_cancel} calls");
    // A call takes milliseconds and the next may start two seconds after
    // the last: none is in flight at the cancel, and the batch waiting for
    // the limiter makes no call once it is granted (the claim after the
    // limiter refuses a cancelled job's batch). Before such a check, it
    // went out after the cancel.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = seen().await;
    assert_eq!(settled, at_cancel, "{} calls after the cancel", settled - at_cancel);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(seen().await, settled, "the worker makes no more calls");
    assert!(worker.try_wait().unwrap().is_none(), "the worker stays up for other jobs");

    let s = status(&schema, 1).await;
    assert_eq!(s["state"], "cancelled", "{s}");
    assert_eq!(s["calls_made"].as_u64(), Some(settled), "every call made is counted");
    // Every row is accounted for: decoded by a call that was made, or failed as cancelled.
    assert_eq!(s["pending"], 0, "{s}");
    assert_eq!(s["decoded"].as_u64(), Some(20 * settled), "{s}");
    assert_eq!(s["failed"].as_u64(), Some(1000 - 20 * settled), "{s}");
    let db = pool(&schema).await;
    let cancelled: i64 = sqlx::query_scalar("SELECT count(*) FROM job_inputs WHERE error_code = 'cancelled'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(cancelled as u64, 1000 - 20 * settled);
    let out = vinetl_async(&schema, key, &["cancel", "1"]).await;
    assert!(!out.status.success(), "cancelling twice says the job has ended");
    common::stop_worker(&mut worker).await;
    cleanup(&schema).await;
}

/// A call out when its job is cancelled, which the API then refuses (a key
/// revoked meanwhile): the refusal cannot fail the ended job, so the worker
/// ends the batch as the cancel ended the others, its rows failed
/// `cancelled` within seconds. Left running, they would stay pending until the
/// sweep took the batch over after its lease (90 s here), or forever before
/// the sweep ended a cancelled job's batches.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_refused_after_its_job_was_cancelled_ends_its_batch_at_once() {
    let faults = Faults {
        fault_path: Some(vinetl::api::BATCH_DECODE_PATH.into()),
        fault_latency_ms: Some((8000, 8000)),
        fault_revoke_after: Some(0),
        ..Faults::default()
    };
    let (server, _keys) = common::serve(faults).await;
    let schema = unique_schema("cancelrefused");
    let dir = tempfile::tempdir().unwrap();
    let vins: Vec<&str> = include_str!("fixtures/pattern-vins.txt").lines().take(40).collect();
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    let key = "pro-counted-key";
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    let out = vinetl_async(&schema, key, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut worker = common::spawn_worker(&schema, key);
    let db = pool(&schema).await;
    // Both batches' calls are out (the server holds each for 8 s).
    let mut out_now = 0i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        out_now = sqlx::query_scalar("SELECT count(*) FROM batches WHERE job_id = 1 AND in_call")
            .fetch_one(&db)
            .await
            .unwrap();
        if out_now == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(out_now, 2, "both calls out");
    let out = vinetl_async(&schema, key, &["cancel", "1"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&schema, 1).await["pending"], 40, "the cancel leaves the rows of calls out to their calls");
    // The refusals come 8 s after the calls; the sweep could take the
    // batches over only after their 90 s lease.
    let mut s = status(&schema, 1).await;
    for _ in 0..200 {
        if s["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(&schema, 1).await;
    }
    assert_eq!((s["state"].as_str(), s["pending"].as_i64()), (Some("cancelled"), Some(0)), "{s}");
    assert_eq!(s["failed"], 40, "{s}");
    assert_eq!(s["calls_made"], 2, "both calls counted: {s}");
    let ended: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, last_error FROM batches WHERE job_id = 1 ORDER BY batch_no")
            .fetch_all(&db)
            .await
            .unwrap();
    for (state, error) in &ended {
        assert_eq!(state, "cancelled");
        assert!(error.as_deref().is_some_and(|e| e.contains("revoked")), "{error:?}");
    }
    let cancelled: i64 = sqlx::query_scalar("SELECT count(*) FROM job_inputs WHERE error_code = 'cancelled'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(cancelled, 40);
    assert!(worker.try_wait().unwrap().is_none(), "the worker stays up");
    // Stopped and waited for before the schema is dropped: a sweep of a
    // worker still running could deadlock with the drop.
    common::stop_worker(&mut worker).await;
    cleanup(&schema).await;
}

/// A worker told to stop while its calls are in flight, and while more of
/// its tasks wait for a place in flight, finishes them and exits; another
/// worker then ends the job, and the server saw one call per batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_with_calls_in_flight_exits_and_loses_nothing() {
    let faults = Faults { fault_latency_ms: Some((150, 150)), ..Faults::default() };
    let (server, _keys) = common::serve(faults).await;
    let schema = unique_schema("stopbusy");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("tests/fixtures/pattern-vins.txt", dir.path().join("vins.txt")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"vins.txt\"", &server.url(), "");
    let text =
        std::fs::read_to_string(&spec).unwrap().replace("requests_per_second = 200", "requests_per_second = 1000");
    std::fs::write(&spec, text).unwrap();
    let out = vinetl_async(&schema, "pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // 50 batches at 8 in flight and 150 ms a call: about a second of calls,
    // with every task slot of the worker (four per call) taken.
    let mut busy = common::spawn_worker_with(&schema, "pro-counted-key", 8);
    let seen = wait_for_calls(&schema, 8).await;
    assert!(seen["calls_made"].as_i64().unwrap_or(0) < 50, "the job ended before the stop: {seen}");
    // The requests the server has seen just before the stop (this probe is
    // one more).
    let before_stop = requests_seen(&server.url(), "pro-counted-key", 100_000).await;
    // A worker with calls in flight once never exited (see `stop_worker`).
    let exited = common::stop_worker(&mut busy).await;
    let stopped = status(&schema, 1).await;
    assert_eq!(stopped["calls"]["in_flight"], 0, "every call in flight was stored: {stopped}");
    assert_eq!(stopped["calls"]["answer_lost"], 0, "{stopped}");
    // Only calls already in flight went out after the probe: the tasks
    // waiting for a place (three per place) gave their batches back. The
    // server counts a request after its injected 150 ms, so up to 8 calls in
    // flight at the probe are counted after it, and up to 8 more may start
    // in the few milliseconds between the probe and the stop. Without the
    // give-back, 27 and 30 calls went out after the probe (seen).
    let after_stop = requests_seen(&server.url(), "pro-counted-key", 100_000).await - before_stop - 1;
    assert!(after_stop <= 16, "{after_stop} calls after SIGTERM at --concurrency 8: {stopped}");

    let restarted = std::time::Instant::now();
    let mut rest = common::spawn_worker(&schema, "pro-counted-key");
    let s = common::wait_for_state(&schema, 1, "done").await;
    let recovered = restarted.elapsed();
    common::stop_worker(&mut rest).await;
    assert_eq!(s["decoded"], 1000, "{s}");
    assert_eq!(s["calls_made"], 50, "{s}");
    // 50 calls, each batch once, and the two probes above.
    assert_eq!(requests_seen(&server.url(), "pro-counted-key", 100_000).await, 52);
    println!(
        "RELIABILITY worker-stopped: SIGTERM at --concurrency 8 after {} of 50 calls; exited in {:.1} s; \
         {after_stop} calls counted by the server after its last probe before the stop; rows lost 0, duplicated 0; \
         calls 50 for 50 batches; another worker ended the job in {:.1} s",
        seen["calls_made"],
        exited.as_secs_f64(),
        recovered.as_secs_f64()
    );
    cleanup(&schema).await;
}

/// A worker told to stop while a batch it claimed waits for the limiter
/// gives that batch back uncalled: the limiter's wait ends with the stop,
/// the worker exits at once, and another worker makes that call.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_stopped_while_a_call_waits_for_the_limiter_makes_no_more_calls() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("stoplimiter");
    let dir = tempfile::tempdir().unwrap();
    let vins: Vec<String> = std::fs::read_to_string("tests/fixtures/pattern-vins.txt")
        .unwrap()
        .lines()
        .take(60)
        .map(str::to_string)
        .collect();
    std::fs::write(dir.path().join("vins.txt"), vins.join("\n")).unwrap();
    // Once the first call is made, the worker's other place holds a
    // batch waiting for the limiter for about two seconds.
    let key = "pro-counted-key";
    submit_slowly(&schema, dir.path(), &server.url(), key).await;

    let mut worker = common::spawn_worker(&schema, key);
    let first = wait_for_calls(&schema, 1).await;
    assert_eq!(first["calls_made"], 1, "{first}");
    let before_stop = requests_seen(&server.url(), key, 100_000).await;
    let exited = common::stop_worker(&mut worker).await;
    // Past the time the limiter would have granted the waiting call.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(exited)).await;
    let after_stop = requests_seen(&server.url(), key, 100_000).await - before_stop - 1;
    let stopped = status(&schema, 1).await;
    assert_eq!(after_stop, 0, "calls after SIGTERM (exited in {exited:?}): {stopped}");
    assert_eq!(stopped["calls_made"], 1, "{stopped}");
    assert_eq!(stopped["calls"]["in_flight"], 0, "{stopped}");
    let db = pool(&schema).await;
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE state = 'running'").fetch_one(&db).await.unwrap();
    assert_eq!(running, 0, "no batch was left claimed");

    let restarted = std::time::Instant::now();
    let mut rest = common::spawn_worker(&schema, key);
    let s = common::wait_for_state(&schema, 1, "done").await;
    let recovered = restarted.elapsed();
    common::stop_worker(&mut rest).await;
    assert_eq!((s["decoded"].as_i64(), s["calls_made"].as_i64()), (Some(60), Some(3)), "{s}");
    // Three calls, each batch once, and the two probes above.
    assert_eq!(requests_seen(&server.url(), key, 100_000).await, 5);
    println!(
        "RELIABILITY worker-stopped-in-limiter: SIGTERM at 0.5 calls/s after 1 of 3 calls, its next batches \
         waiting for the limiter; exited in {:.1} s; {after_stop} calls after the stop; rows lost 0, duplicated 0; \
         calls 3 for 3 batches; another worker ended the job in {:.1} s",
        exited.as_secs_f64(),
        recovered.as_secs_f64()
    );
    cleanup(&schema).await;
}

/// A worker that has run one job of an account takes the next job's
/// limits, and the one after's when they are the first's again: each job's
/// spec writes the account's row when a worker first works it (a worker
/// used to keep the first spec's row until it restarted, so an operator's
/// lower rate never took effect).
#[tokio::test(flavor = "multi_thread")]
async fn a_running_worker_takes_a_resubmitted_specs_limits() {
    let (server, _keys) = common::serve(Faults::default()).await;
    let schema = unique_schema("relimit");
    let dir = tempfile::tempdir().unwrap();
    let vins: Vec<String> =
        std::fs::read_to_string("tests/fixtures/pattern-vins.txt").unwrap().lines().map(str::to_string).collect();
    let mut worker = None;
    let limits = [(200.0, 10.0, None), (50.0, 3.0, Some(1000)), (200.0, 10.0, None)];
    for (job, (rate, burst, quota)) in limits.into_iter().enumerate() {
        // New VINs each time: a job answered from the cache makes no call.
        let file = format!("vins{job}.txt");
        std::fs::write(dir.path().join(&file), vins[job * 40..(job + 1) * 40].join("\n")).unwrap();
        let extra = format!("burst = {burst}\n{}", quota.map(|q| format!("daily_quota = {q}")).unwrap_or_default());
        let spec = write_spec(dir.path(), &format!("kind = \"file\"\npath = \"{file}\""), &server.url(), &extra);
        let text = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(&spec, text.replace("requests_per_second = 200", &format!("requests_per_second = {rate}")))
            .unwrap();
        let out = vinetl_async(&schema, "pro-counted-key", &["submit", spec.to_str().unwrap()]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        worker.get_or_insert_with(|| common::spawn_worker(&schema, "pro-counted-key"));
        let s = common::wait_for_state(&schema, job as i64 + 1, "done").await;
        assert_eq!(s["calls_made"], 2, "{s}");
        let db = pool(&schema).await;
        let row: (f64, f64, Option<i64>) =
            sqlx::query_as("SELECT rate, burst, daily_quota FROM limiter").fetch_one(&db).await.unwrap();
        assert_eq!(row, (rate, burst, quota), "job {}: the row holds its spec", job + 1);
        db.close().await;
    }
    common::stop_worker(worker.as_mut().unwrap()).await;
    cleanup(&schema).await;
}

/// Submits the job of `dir`'s `vins.txt` against `server` at one call every
/// two seconds with no burst: a worker's second place waits for the
/// limiter for up to two seconds after each call.
async fn submit_slowly(schema: &str, dir: &std::path::Path, server: &str, key: &str) {
    let spec = write_spec(dir, "kind = \"file\"\npath = \"vins.txt\"", server, "burst = 1");
    let text =
        std::fs::read_to_string(&spec).unwrap().replace("requests_per_second = 200", "requests_per_second = 0.5");
    std::fs::write(&spec, text).unwrap();
    let out = vinetl_async(schema, key, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Job 1's status once it has made at least `n` calls (polled every 20 ms,
/// for up to about 12 s; the caller asserts on what it got).
async fn wait_for_calls(schema: &str, n: i64) -> serde_json::Value {
    let mut seen = status(schema, 1).await;
    for _ in 0..600 {
        if seen["calls_made"].as_i64().unwrap_or(0) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = status(schema, 1).await;
    }
    seen
}
