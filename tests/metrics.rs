//! `--metrics-addr`: a `vinetl worker` and a `vinetl serve`, each a process
//! of its own, serve Prometheus metrics over real HTTP; read with a
//! Prometheus text parser, they agree with the job's own `status --json`
//! counts and with the server's own count of requests.

mod common;

use std::time::Duration;

use common::{ServeProcess, cleanup, unique_schema, vinetl_async, write_spec};
use prometheus_parse::{Scrape, Value};

/// Pro, 100,000 requests a day, labelled `counted` in the keys file.
const KEY: &str = "pro-counted-key";
const KEY_LABEL: &str = "counted";
const KEY_PER_DAY: u64 = 100_000;

/// A loopback address nothing listens on, the way the tests pick ports.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// `GET http://addr/metrics`, parsed.
async fn scrape(addr: &str) -> (Scrape, String) {
    let url = format!("http://{addr}/metrics");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let resp = client.get(&url).send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    assert_eq!(resp.status(), 200, "{url}");
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = resp.text().await.unwrap();
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    (parsed, text)
}

/// The sum of the samples of `name` carrying `labels` (0 when there is
/// none: a counter nothing has incremented is not rendered).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
        .sum()
}

fn has(s: &Scrape, name: &str) -> bool {
    s.samples.iter().any(|x| x.metric == name)
}

fn int(v: &serde_json::Value) -> f64 {
    v.as_i64().unwrap_or_else(|| panic!("not an integer: {v}")) as f64
}

/// The sample fleet (291 rows: 10 invalid, 18 duplicates) through a server
/// that answers some calls with 500s and 429s: every outcome the worker
/// counts is the one the job stored and the server answered.
#[tokio::test(flavor = "multi_thread")]
async fn worker_and_server_metrics_agree_with_the_job_and_the_server() {
    let serve_metrics = free_addr();
    let server = ServeProcess::start(&[
        "--metrics-addr",
        &serve_metrics,
        "--fault-500",
        "0.15",
        "--fault-429",
        "0.15",
        "--fault-429-retry-after",
        "1",
        // Only the runner's calls: the quota probe below gets a clean answer.
        "--fault-path",
        "/api/v1/batch-decode",
    ]);
    let schema = unique_schema("metrics");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy("jobs/sample-fleet.csv", dir.path().join("fleet.csv")).unwrap();
    let spec = write_spec(dir.path(), "kind = \"file\"\npath = \"fleet.csv\"", &server.url, "");
    let outputs = format!("\n[[outputs]]\nkind = \"parquet\"\npath = \"{}/ds\"\n", dir.path().display());
    std::fs::write(&spec, std::fs::read_to_string(&spec).unwrap() + &outputs).unwrap();

    let out = vinetl_async(&schema, KEY, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let worker_metrics = free_addr();
    let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_vinetl"))
        .args(["worker", "--concurrency", "2", "--metrics-addr", &worker_metrics])
        .env("DATABASE_URL", common::pg_url())
        .env("VINETL_SCHEMA", &schema)
        .env("CARVIN_API_KEY", KEY)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let job1 = common::wait_for_state(&schema, 1, "done").await;
    // The same rows again: every VIN is a cache hit, so the job ends at
    // planning, with no call.
    let out = vinetl_async(&schema, KEY, &["submit", spec.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job2 = common::wait_for_state(&schema, 2, "done").await;

    let (w, _) = scrape(&worker_metrics).await;
    drop(worker);

    // Calls by outcome: the worker's counters are the job's stored counts.
    let calls = &job1["calls"];
    assert_eq!((int(&calls["answer_lost"]), int(&calls["in_flight"])), (0.0, 0.0), "{job1}");
    assert!(int(&calls["answered"]) > 0.0, "{job1}");
    let mut all_outcomes = 0.0;
    for outcome in ["answered", "rate_limited", "server_error", "timed_out", "other_error"] {
        let counted = value(&w, "vinetl_calls_total", &[("kind", "decode"), ("outcome", outcome)]);
        assert_eq!(counted, int(&calls[outcome]), "{outcome}: {job1}");
        all_outcomes += counted;
    }
    assert_eq!(all_outcomes, int(&job1["calls_made"]), "{job1}");
    assert_eq!(value(&w, "vinetl_calls_total", &[("kind", "recall")]), 0.0, "recalls are off");
    assert_eq!(value(&w, "vinetl_call_retries_total", &[("kind", "decode")]), int(&job1["calls_retried"]));
    // Each call waited on the limiter once.
    assert_eq!(value(&w, "vinetl_limiter_wait_seconds_count", &[]), int(&job1["calls_made"]));
    assert!(has(&w, "vinetl_limiter_wait_seconds"), "the wait is a histogram with buckets");
    // VINs decoded: the distinct valid VINs the job sent, one answer each.
    assert_eq!(int(&job1["failed"]), 0.0, "{job1}");
    let sent = int(&job1["valid"]) - int(&job1["duplicates"]) - int(&job1["cache_hits"]);
    assert_eq!(value(&w, "vinetl_vins_decoded_total", &[]), sent);
    // The worker wrote job 1's outputs (job 2's were written by its submit).
    assert_eq!(job1["outputs"].as_array().unwrap().len(), 1, "{job1}");
    assert_eq!(value(&w, "vinetl_output_write_seconds_count", &[("result", "ok")]), 1.0);
    assert_eq!(value(&w, "vinetl_output_write_seconds_count", &[("result", "error")]), 0.0);

    // Job gauges, read from the store at the scrape: the same counts status shows.
    for s in [&job1, &job2] {
        let job = s["job_id"].to_string();
        let job = job.as_str();
        let invalid: f64 = s["invalid"].as_object().unwrap().values().map(int).sum();
        for (status_, n) in [
            ("decoded", int(&s["decoded"])),
            ("failed", int(&s["failed"])),
            ("pending", int(&s["pending"])),
            ("invalid", invalid),
        ] {
            assert_eq!(value(&w, "vinetl_job_rows", &[("job", job), ("status", status_)]), n, "{status_}: {s}");
        }
        let open = int(&s["batches"]) - int(&s["batches_done"]) - int(&s["dead_lettered_batches"]);
        assert_eq!(value(&w, "vinetl_job_queued_batches", &[("job", job)]), open, "{s}");
        let ratio = int(&s["cache_hits"]) / (int(&s["valid"]) - int(&s["duplicates"]));
        assert_eq!(value(&w, "vinetl_job_cache_hit_ratio", &[("job", job)]), ratio, "{s}");
    }
    assert_eq!(value(&w, "vinetl_job_cache_hit_ratio", &[("job", "2")]), 1.0, "{job2}");

    // The server's metrics: what it answered is what the worker counted,
    // and its quota gauge is its own count (the probe below adds one).
    let seen = common::requests_seen(&server.url, KEY, KEY_PER_DAY).await;
    let (v, text) = scrape(&serve_metrics).await;
    let batch = "/api/v1/batch-decode";
    let answered = value(&w, "vinetl_calls_total", &[("outcome", "answered")]);
    assert_eq!(value(&v, "vinetl_serve_requests_total", &[("endpoint", batch), ("status", "200")]), answered);
    let limited = value(&w, "vinetl_calls_total", &[("outcome", "rate_limited")]);
    assert_eq!(value(&v, "vinetl_serve_requests_total", &[("endpoint", batch), ("status", "429")]), limited);
    let errors = value(&w, "vinetl_calls_total", &[("outcome", "server_error")]);
    assert_eq!(value(&v, "vinetl_serve_requests_total", &[("endpoint", batch), ("status", "500")]), errors);
    assert_eq!(value(&v, "vinetl_serve_quota_used", &[("account", KEY_LABEL)]), (seen + 1) as f64);
    assert_eq!(value(&v, "vinetl_serve_quota_used", &[("account", "guide")]), 0.0);
    assert!(has(&v, "vinetl_serve_quota_used"));
    assert!(!text.contains(KEY), "a key never appears in the metrics:\n{text}");

    server.stop();
    cleanup(&schema).await;
}

/// A taken `--metrics-addr` fails the command at once (exit 2, before any
/// work), naming the address.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_metrics_address_fails_the_command_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let schema = unique_schema("metricsaddr");
    for args in
        [vec!["worker", "--metrics-addr", &addr], vec!["serve", "--bind", "127.0.0.1:0", "--metrics-addr", &addr]]
    {
        let out = vinetl_async(&schema, KEY, &args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("--metrics-addr {addr}: cannot listen there")), "{args:?}: {stderr}");
    }
    cleanup(&schema).await;
}
