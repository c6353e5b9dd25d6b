//! Prometheus metrics: what `--metrics-addr` serves on `worker`, `run` and
//! `serve` (`GET /metrics`, the text exposition format).
//!
//! The recorder is the `metrics` crate's, rendered by its Prometheus
//! exporter; it is process-global, so [`install`] sets it up once. Every
//! metric is named here and recorded through the functions below, so names,
//! labels and units live in one place (the README's table lists them).
//!
//! Counters and histograms are counted where things happen (the worker's
//! calls, the server's requests) and cost no I/O. Gauges that describe
//! stored state (a job's rows, queue, cache hits; a key's quota) are
//! refreshed just before each scrape renders them (a [`Refresh`]), so the hot
//! path makes no extra database round trip, and a gauge is never staler than
//! the scrape.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use futures_util::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::{CallEnd, Store, StoreError};

/// Calls that reached the API, by `kind` (decode, recall) and `outcome`.
pub const CALLS: &str = "vinetl_calls_total";
/// Calls that could not reach the API at all (not counted as calls).
pub const UNREACHABLE: &str = "vinetl_calls_unreachable_total";
/// Failed calls scheduled again, using an attempt (429s use none).
pub const RETRIES: &str = "vinetl_call_retries_total";
/// Time a worker waited on the shared limiter before each call.
pub const LIMITER_WAIT: &str = "vinetl_limiter_wait_seconds";
/// VINs decoded by batch-decode answers.
pub const VINS_DECODED: &str = "vinetl_vins_decoded_total";
/// Time writing a job's outputs took.
pub const OUTPUT_WRITE: &str = "vinetl_output_write_seconds";
/// A job's input rows by status.
pub const JOB_ROWS: &str = "vinetl_job_rows";
/// A job's decode batches not settled yet: its queue depth.
pub const JOB_QUEUED_BATCHES: &str = "vinetl_job_queued_batches";
/// A job's cache hits over its distinct valid VINs.
pub const JOB_CACHE_HIT_RATIO: &str = "vinetl_job_cache_hit_ratio";
/// `vinetl serve`: requests by endpoint and status.
pub const SERVE_REQUESTS: &str = "vinetl_serve_requests_total";
/// `vinetl serve`: quota used today per key label.
pub const SERVE_QUOTA_USED: &str = "vinetl_serve_quota_used";

/// Jobs reported besides the ones that have not ended: the latest few, so a
/// job that just ended shows its final counts; older ones drop out, which
/// keeps the `job` label's cardinality bounded.
pub const RECENT_JOBS: i64 = 5;

/// A gauge series nobody has refreshed for this long (a job that dropped out
/// of the reported set) is no longer rendered. Live gauges are refreshed at
/// every scrape, so only dropped ones ever get this old.
const STALE_GAUGE: Duration = Duration::from_secs(60);

/// Histogram buckets, in seconds. The limiter's: most waits are a slot's
/// interval (milliseconds at tens of calls a second); the longest a worker
/// sleeps through is 30 s (`limiter::MAX_INLINE_WAIT`).
const LIMITER_WAIT_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Writing outputs: a small job's Parquet file takes well under a second, a
/// 10-million-row warehouse load many minutes.
const OUTPUT_WRITE_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// What a call was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Decode,
    Recall,
}

impl CallKind {
    fn label(self) -> &'static str {
        match self {
            CallKind::Decode => "decode",
            CallKind::Recall => "recall",
        }
    }
}

/// The `outcome` label: the names `status --json` gives the same counts.
fn outcome_label(end: CallEnd) -> &'static str {
    match end {
        CallEnd::Answered => "answered",
        CallEnd::RateLimited => "rate_limited",
        CallEnd::ServerError => "server_error",
        CallEnd::TimedOut => "timed_out",
        CallEnd::OtherError => "other_error",
    }
}

/// A call that reached the API ended so.
pub fn call(kind: CallKind, end: CallEnd) {
    metrics::counter!(CALLS, "kind" => kind.label(), "outcome" => outcome_label(end)).increment(1);
}

/// A call could not reach the API (connection refused, DNS, TLS).
pub fn unreachable(kind: CallKind) {
    metrics::counter!(UNREACHABLE, "kind" => kind.label()).increment(1);
}

/// A failed call goes back on the queue, using an attempt.
pub fn retry(kind: CallKind) {
    metrics::counter!(RETRIES, "kind" => kind.label()).increment(1);
}

/// A worker waited `waited` on `account`'s shared limiter.
pub fn limiter_wait(account: &str, waited: Duration) {
    metrics::histogram!(LIMITER_WAIT, "account" => account.to_string()).record(waited.as_secs_f64());
}

/// A batch-decode answer decoded `n` VINs.
pub fn vins_decoded(n: usize) {
    metrics::counter!(VINS_DECODED).increment(n as u64);
}

/// A job's outputs were written (or failed to be) in `took`.
pub fn output_written(ok: bool, took: Duration) {
    metrics::histogram!(OUTPUT_WRITE, "result" => if ok { "ok" } else { "error" }).record(took.as_secs_f64());
}

/// `vinetl serve` answered a request on `endpoint` with `status`.
pub fn serve_request(endpoint: &'static str, status: u16) {
    metrics::counter!(SERVE_REQUESTS, "endpoint" => endpoint, "status" => status.to_string()).increment(1);
}

/// `vinetl serve`: the key labelled `account` has used `used` requests today.
pub fn quota_used(account: &str, used: u64) {
    metrics::gauge!(SERVE_QUOTA_USED, "account" => account.to_string()).set(used as f64);
}

/// Sets the job gauges from the store: every job that has not ended and the
/// [`RECENT_JOBS`] latest, one `status` snapshot each.
pub async fn refresh_jobs(store: &Store) -> Result<(), StoreError> {
    let mut ids = store.unended_jobs().await?;
    ids.extend(store.recent_jobs(RECENT_JOBS).await?);
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let Some(c) = store.counts(id).await? else { continue };
        let job = id.to_string();
        let invalid: i64 = c.invalid.values().sum();
        for (status, n) in [("decoded", c.decoded), ("failed", c.failed), ("pending", c.pending), ("invalid", invalid)]
        {
            metrics::gauge!(JOB_ROWS, "job" => job.clone(), "status" => status).set(n as f64);
        }
        let open = (c.batches - c.batches_done - c.dead_lettered_batches).max(0);
        metrics::gauge!(JOB_QUEUED_BATCHES, "job" => job.clone()).set(open as f64);
        // Over distinct valid VINs: each is a cache hit or needs a call.
        let distinct = c.valid - c.duplicates;
        if distinct > 0 {
            metrics::gauge!(JOB_CACHE_HIT_RATIO, "job" => job).set(c.cache_hits as f64 / distinct as f64);
        }
    }
    Ok(())
}

/// Brings gauges up to date just before a scrape renders them.
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The job gauges' [`Refresh`] for a runner process (`worker`, `run`). A
/// store error is logged and the scrape goes on with the counters.
pub fn job_refresh(store: Store) -> Refresh {
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move {
            if let Err(e) = refresh_jobs(&store).await {
                tracing::warn!(error = %e, "metrics: cannot read the jobs' counts");
            }
        })
    })
}

/// Installs the process's recorder (once; later calls return the same
/// handle). Until it is installed every metric above is a no-op.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(LIMITER_WAIT.into()), LIMITER_WAIT_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(OUTPUT_WRITE.into()), OUTPUT_WRITE_BUCKETS))
                .expect("bucket lists are not empty")
                .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(STALE_GAUGE));
            let handle = builder.install_recorder().expect("vinetl installs no other metrics recorder");
            describe();
            handle
        })
        .clone()
}

/// Help text and units, rendered as `# HELP` lines.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        CALLS,
        "Calls that reached the Car Vin API, by kind (decode, recall) and outcome (answered, rate_limited, server_error, timed_out, other_error)."
    );
    describe_counter!(
        UNREACHABLE,
        "Calls that could not reach the API (connection refused, DNS, TLS); not counted in vinetl_calls_total."
    );
    describe_counter!(RETRIES, "Failed calls scheduled again, using one of the batch's attempts (a 429 uses none).");
    describe_histogram!(
        LIMITER_WAIT,
        Unit::Seconds,
        "Time a worker waited on the account's shared limiter before a call."
    );
    describe_counter!(VINS_DECODED, "VINs decoded by batch-decode answers; its rate is the VINs decoded per second.");
    describe_histogram!(OUTPUT_WRITE, Unit::Seconds, "Time writing a job's outputs took, by result (ok, error).");
    describe_gauge!(
        JOB_ROWS,
        "A job's input rows by status (decoded, failed, pending, invalid), refreshed from the state store at each scrape."
    );
    describe_gauge!(
        JOB_QUEUED_BATCHES,
        "A job's decode batches not settled yet (queued, waiting to be retried, or in a call): its queue depth."
    );
    describe_gauge!(JOB_CACHE_HIT_RATIO, "A job's cache hits over its distinct valid VINs (0 to 1).");
    describe_counter!(SERVE_REQUESTS, "vinetl serve: requests by endpoint (path, or other) and HTTP status.");
    describe_gauge!(
        SERVE_QUOTA_USED,
        "vinetl serve: requests counted against each key's daily quota today, by key label (never the key)."
    );
}

/// `--metrics-addr` failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics-addr {addr}: cannot listen there: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// The metrics endpoint's socket, bound before anything else starts so a
/// taken or wrong address fails the command at once.
#[derive(Debug)]
pub struct Listener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl Listener {
    pub async fn bind(addr: &str) -> Result<Listener, MetricsError> {
        let bind_error = |source| MetricsError::Bind { addr: addr.to_string(), source };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(Listener { listener, addr })
    }

    /// Binds `addr` if given.
    pub async fn bind_if(addr: Option<&str>) -> Result<Option<Listener>, MetricsError> {
        match addr {
            Some(a) => Ok(Some(Listener::bind(a).await?)),
            None => Ok(None),
        }
    }

    /// The scrape URL, e.g. `http://127.0.0.1:9464/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// Installs the recorder and serves `GET /metrics` for as long as the
    /// process runs, calling `refresh` before each render.
    pub fn serve(self, refresh: Option<Refresh>) {
        let handle = install();
        // The exporter leaves histogram upkeep to us: without scrapes,
        // samples would pile up between renders.
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state((handle, refresh));
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(self.listener, app).await {
                tracing::error!(%addr, error = %e, "the metrics endpoint stopped");
            }
        });
    }
}

async fn scrape(State((handle, refresh)): State<(PrometheusHandle, Option<Refresh>)>) -> impl IntoResponse {
    if let Some(refresh) = refresh {
        refresh().await;
    }
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
}
