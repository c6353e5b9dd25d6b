//! Fault injection for `vinetl serve`, off by default. The runner's
//! reliability tests turn these on to prove retries, backoff and the shared
//! limiter work against real HTTP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;

use super::ApiFailure;
use crate::api::code;

/// Shares are probabilities from 0 to 1, drawn independently per request.
#[derive(Debug, Clone, Default, Args)]
pub struct Faults {
    /// Share of requests answered with a 500.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_500: f64,
    /// Share of requests answered with a 429 (a storm when high).
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_429: f64,
    /// Retry-After seconds sent with injected 429s; 0 sends no Retry-After.
    #[arg(long, default_value_t = 1)]
    pub fault_429_retry_after: u64,
    /// Share of requests whose connection is dropped halfway through the body.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_drop: f64,
    /// Share of requests answered 200 with malformed (truncated) JSON.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_malformed: f64,
    /// Added latency per request, in milliseconds: `50`, or a range `20-200`.
    #[arg(long, value_parser = latency)]
    pub fault_latency_ms: Option<(u64, u64)>,
    /// Share of requests that get `--fault-latency-ms` (default: all).
    #[arg(long, value_parser = share)]
    pub fault_latency_share: Option<f64>,
    /// Share of requests answered 200 with an HTML page (a proxy's or a
    /// captive portal's) instead of JSON.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_html: f64,
    /// Share of batch-decode answers missing their last VIN.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_missing: f64,
    /// Share of batch-decode answers with their VINs in reverse order.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    pub fault_reorder: f64,
    /// After this many requests carrying a key, every key is refused (401,
    /// "revoked"), as when an account is closed mid-job.
    #[arg(long)]
    pub fault_revoke_after: Option<u64>,
    /// Delay after a request was handled (and its quota counted), before
    /// its answer leaves, in milliseconds: `300` or `200-400`. A client that
    /// dies or gives up meanwhile has still used quota.
    #[arg(long, value_parser = latency)]
    pub fault_answer_delay_ms: Option<(u64, u64)>,
    /// Only requests whose path starts with this get faults (e.g.
    /// `/api/v1/recalls`); all requests without it.
    #[arg(long)]
    pub fault_path: Option<String>,
}

impl Faults {
    pub fn any(&self) -> bool {
        self.fault_500 > 0.0
            || self.fault_429 > 0.0
            || self.fault_drop > 0.0
            || self.fault_malformed > 0.0
            || self.fault_latency_ms.is_some()
            || self.fault_answer_delay_ms.is_some()
            || self.fault_html > 0.0
            || self.fault_missing > 0.0
            || self.fault_reorder > 0.0
            || self.fault_revoke_after.is_some()
    }
}

/// The faults and what they count as requests go by.
#[derive(Debug)]
pub struct Injector {
    faults: Faults,
    /// Requests with a key seen so far, for `--fault-revoke-after`.
    keyed: AtomicU64,
}

impl Injector {
    pub fn new(faults: Faults) -> Injector {
        Injector { faults, keyed: AtomicU64::new(0) }
    }
}

fn share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not a share between 0 and 1")) }
}

fn latency(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?} is not milliseconds (`50`) or a range (`20-200`)");
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
        None => {
            let v = s.trim().parse().map_err(|_| bad())?;
            (v, v)
        }
    };
    if lo <= hi { Ok((lo, hi)) } else { Err(bad()) }
}

/// Middleware: applies the configured faults before (and around) the handler.
/// Injected failures happen before quota accounting, so they cost no quota.
pub async fn inject(State(injector): State<std::sync::Arc<Injector>>, req: Request, next: Next) -> Response {
    let faults = &injector.faults;
    if faults.fault_path.as_deref().is_some_and(|p| !req.uri().path().starts_with(p)) {
        return next.run(req).await;
    }
    // The latency first: a refusal takes its time too.
    if let Some((lo, hi)) = faults.fault_latency_ms
        && fastrand::f64() < faults.fault_latency_share.unwrap_or(1.0)
    {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(lo..=hi))).await;
    }
    if let Some(after) = faults.fault_revoke_after
        && req.headers().contains_key(header::AUTHORIZATION)
        && injector.keyed.fetch_add(1, Ordering::Relaxed) >= after
    {
        return ApiFailure::new(StatusCode::UNAUTHORIZED, code::UNAUTHORIZED, "this API key has been revoked")
            .into_response();
    }
    if fastrand::f64() < faults.fault_500 {
        return ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL_ERROR, "injected fault")
            .into_response();
    }
    if fastrand::f64() < faults.fault_429 {
        let mut resp =
            ApiFailure::new(StatusCode::TOO_MANY_REQUESTS, code::RATE_LIMITED, "injected 429 storm").into_response();
        if faults.fault_429_retry_after > 0 {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(faults.fault_429_retry_after));
        }
        return resp;
    }
    if fastrand::f64() < faults.fault_malformed {
        let mut resp = (StatusCode::OK, r#"{"success": true, "data": [{"VIN": "#).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return resp;
    }
    if fastrand::f64() < faults.fault_html {
        let page = "<!DOCTYPE html><html><head><title>Gateway</title></head><body><h1>Please wait</h1></body></html>";
        let mut resp = (StatusCode::OK, page).into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        return resp;
    }
    let batch = req.uri().path() == crate::api::BATCH_DECODE_PATH;
    let mut resp = next.run(req).await;
    if batch && resp.status() == StatusCode::OK {
        if fastrand::f64() < faults.fault_missing {
            resp = rewrite_entries(resp, |entries| {
                entries.pop();
            })
            .await;
        }
        if fastrand::f64() < faults.fault_reorder {
            resp = rewrite_entries(resp, |entries| entries.reverse()).await;
        }
    }
    if let Some((lo, hi)) = faults.fault_answer_delay_ms {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(lo..=hi))).await;
    }
    if fastrand::f64() < faults.fault_drop {
        return truncate(resp).await;
    }
    resp
}

/// A batch answer with its `data` entries changed by `change`.
async fn rewrite_entries(resp: Response, change: impl FnOnce(&mut Vec<serde_json::Value>)) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if let Some(entries) = json.get_mut("data").and_then(serde_json::Value::as_array_mut) {
        change(entries);
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(serde_json::to_vec(&json).unwrap_or_default()))
}

/// Sends the headers and half the body, then fails the stream so the
/// connection is cut mid-response.
async fn truncate(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let half = bytes.slice(..bytes.len() / 2);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    use futures_util::StreamExt;
    // The pause lets the headers and the first half reach the client before
    // the cut, as when a server dies mid-write.
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) }).chain(
        futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected connection drop"))
        }),
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_shares_and_latency_ranges() {
        assert_eq!(share("0.25"), Ok(0.25));
        assert!(share("1.5").is_err());
        assert_eq!(latency("50"), Ok((50, 50)));
        assert_eq!(latency("20-200"), Ok((20, 200)));
        assert!(latency("200-20").is_err());
        assert!(!Faults::default().any());
    }
}
