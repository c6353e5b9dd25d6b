//! `vinetl serve`: a Car Vin API-compatible server on embedded NHTSA vPIC
//! data, faithful to the integration guide. It backs development, the tests
//! and the demo; the runner talks to it over real HTTP.
//!
//! It shares the wire format ([`crate::api`]) and the decoder
//! ([`crate::local::decoder`]) with the runner and nothing else: it never
//! reads the runner's state, so it behaves as the real API would.

pub mod audit;
pub mod faults;
pub mod keys;
mod listen;
mod openapi;
pub mod recalls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyDeadlineLayer;

use crate::api::{
    self, ApiError, DataResponse, DecodeRequest, EMBEDDED_KEY, ErrorResponse, MAX_BATCH, RecallsRequest,
    RecallsResponse, Vehicle, code,
};
use crate::local::decoder::Decoder;
use crate::vin::Vin;
use faults::Faults;
use keys::{Accounts, Caller, Limited, Quota};
use recalls::RecallIndex;

pub use listen::ConnLimits;

/// Request bodies are tiny (20 VINs are under 500 bytes); 64 KiB leaves room
/// for whitespace and still refuses abuse early.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How `vinetl serve` is configured.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub bind: String,
    pub keys: Option<PathBuf>,
    pub recalls: Option<PathBuf>,
    pub faults: Faults,
    /// Append a JSON line per API request here.
    pub audit_log: Option<PathBuf>,
    /// Delete audit lines older than this, at start and hourly.
    pub audit_retention: Option<std::time::Duration>,
    /// Connection cap and read deadlines.
    pub limits: ConnLimits,
}

/// A configuration problem found before the server starts.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    #[error(transparent)]
    Recalls(#[from] recalls::RecallsError),
    #[error(transparent)]
    Decoder(#[from] crate::local::decoder::DecoderUnavailable),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot open the audit log {path}: {source}")]
    AuditLog { path: String, source: std::io::Error },
}

/// Everything the handlers share.
pub struct Server {
    decoder: Decoder,
    accounts: Accounts,
    recalls: RecallIndex,
}

impl Server {
    /// Loads the decoder, keys and recall data, failing fast on any of them.
    pub fn load(opts: &ServeOptions) -> Result<Server, ServeError> {
        let accounts = match &opts.keys {
            Some(path) => Accounts::load(path)?,
            None => Accounts::new(Vec::new()),
        };
        let recalls = match &opts.recalls {
            Some(path) => RecallIndex::load(path)?,
            None => RecallIndex::sample(),
        };
        Ok(Server { decoder: Decoder::new()?, accounts, recalls })
    }

    pub fn router(self: Arc<Self>, faults: Faults, audit: Option<audit::AuditLog>, limits: ConnLimits) -> Router {
        let state = self;
        let mut api = Router::new()
            .route(api::DECODE_PATH, post(decode))
            .route(api::BATCH_DECODE_PATH, post(batch_decode))
            .route(api::RECALLS_PATH, post(recalls));
        if faults.any() {
            api = api
                .layer(axum::middleware::from_fn_with_state(Arc::new(faults::Injector::new(faults)), faults::inject));
        }
        // Outside the faults: an injected failure is what the caller got, so it is logged.
        if let Some(log) = audit {
            api = api.layer(axum::middleware::from_fn_with_state((Arc::clone(&state), log), audit::record));
        }
        api.route(api::OPENAPI_PATH, get(openapi))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .layer(axum::middleware::from_fn(refuse_declared_oversize))
            // A total deadline, not an idle one: a body trickling in a byte a
            // second never idles, yet must not hold the connection.
            .layer(RequestBodyDeadlineLayer::new(limits.body_timeout()))
            .layer(CatchPanicLayer::custom(|_| {
                ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL_ERROR, "internal server error")
                    .into_response()
            }))
            // Outermost: every answer is counted as the caller got it.
            .layer(axum::middleware::from_fn(count_request))
            .with_state(state)
    }

    /// Sets the quota gauges from live usage, by key label.
    fn report_quotas(&self) {
        for (label, used) in self.accounts.used_today(unix_now()) {
            crate::prometheus::quota_used(&label, used);
        }
    }
}

/// Middleware: counts the request by endpoint and status. Paths that name
/// no endpoint count as `other`, so a scanner cannot grow the label set.
async fn count_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let endpoint = match req.uri().path() {
        api::DECODE_PATH => api::DECODE_PATH,
        api::BATCH_DECODE_PATH => api::BATCH_DECODE_PATH,
        api::RECALLS_PATH => api::RECALLS_PATH,
        api::OPENAPI_PATH => api::OPENAPI_PATH,
        _ => "other",
    };
    let resp = next.run(req).await;
    crate::prometheus::serve_request(endpoint, resp.status().as_u16());
    resp
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

/// A running server: its address, and a handle that stops it.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// API keys loaded.
    pub keys: usize,
    /// Recall records loaded.
    pub recalls: usize,
    pub max_connections: usize,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The audit log's writer, which flushes once the server has stopped.
    audit: Option<tokio::task::JoinHandle<()>>,
    state: Arc<Server>,
}

impl RunningServer {
    /// The base URL clients use, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = self.task.await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Some(audit) = self.audit.take() {
            let _ = audit.await;
        }
        served
    }

    /// The quota gauges' refresh, for the metrics endpoint.
    fn quota_refresh(&self) -> crate::prometheus::Refresh {
        let state = Arc::clone(&self.state);
        Arc::new(move || {
            state.report_quotas();
            Box::pin(std::future::ready(()))
        })
    }
}

/// Starts the embedded server for a job: one key, limited like the job's
/// account (`per_second` and `per_day`), on a free loopback port.
pub async fn spawn_embedded(per_second: f64, per_day: Option<u64>) -> Result<RunningServer, ServeError> {
    let dir = std::env::temp_dir().join(format!("vinetl-embedded-{}-{:08x}", std::process::id(), fastrand::u32(..)));
    let keys = dir.join("keys.toml");
    let mut text =
        format!("[[keys]]\nkey = \"{EMBEDDED_KEY}\"\ntier = \"pro\"\nname = \"embedded\"\nper_second = {per_second}\n");
    if let Some(d) = per_day {
        text.push_str(&format!("per_day = {d}\n"));
    }
    let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&keys, text));
    if let Err(e) = written {
        return Err(ServeError::Keys(crate::serve::keys::KeysError::Read {
            path: keys.display().to_string(),
            source: e,
        }));
    }
    let opts = ServeOptions { bind: "127.0.0.1:0".into(), keys: Some(keys), ..ServeOptions::default() };
    let server = spawn(opts).await;
    let _ = std::fs::remove_dir_all(&dir);
    server
}

pub async fn spawn(opts: ServeOptions) -> Result<RunningServer, ServeError> {
    let server = tokio::task::spawn_blocking({
        let opts = opts.clone();
        move || Server::load(&opts)
    })
    .await
    .expect("loading the server does not panic")?;
    let listener = tokio::net::TcpListener::bind(&opts.bind)
        .await
        .map_err(|source| ServeError::Bind { addr: opts.bind.clone(), source })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: opts.bind.clone(), source })?;
    let (keys, recalls) = (server.accounts.key_count(), server.recalls.len());
    let (audit, audit_task) = match &opts.audit_log {
        Some(path) => {
            let (log, task) = audit::AuditLog::open(path.clone(), opts.audit_retention)
                .await
                .map_err(|source| ServeError::AuditLog { path: path.display().to_string(), source })?;
            (Some(log), Some(task))
        }
        None => (None, None),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = Arc::new(server);
    let app = Arc::clone(&state).router(opts.faults.clone(), audit, opts.limits);
    let task = tokio::spawn(listen::serve(listener, app, opts.limits, async move {
        let _ = rx.await;
    }));
    let max_connections = opts.limits.max_connections;
    Ok(RunningServer { addr, keys, recalls, max_connections, shutdown: Some(tx), task, audit: audit_task, state })
}

/// `vinetl serve`: runs until SIGINT or SIGTERM; with `metrics_addr`, also
/// serves Prometheus metrics there.
pub async fn run(opts: ServeOptions, metrics_addr: Option<&str>) -> anyhow::Result<()> {
    // Bound first: a taken address fails before the server loads anything.
    let metrics = crate::prometheus::Listener::bind_if(metrics_addr).await?;
    let server = spawn(opts).await?;
    eprintln!(
        "vinetl serve: listening on {} (API keys: {}{}; recall records: {}; at most {} connections)",
        server.url(),
        server.keys,
        if server.keys == 0 { ", so anonymous single decodes only" } else { "" },
        server.recalls,
        server.max_connections,
    );
    if let Some(metrics) = metrics {
        eprintln!("vinetl serve: metrics on {}", metrics.url());
        metrics.serve(Some(server.quota_refresh()));
    }
    crate::shutdown_signal().await;
    eprintln!("vinetl serve: shutting down");
    server.stop().await?;
    Ok(())
}

/// An error answer: `{"success": false, "error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiFailure {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiFailure {
        ApiFailure { status, code, message: message.into(), headers: Vec::new() }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiFailure {
        ApiFailure::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn unauthorized(message: impl Into<String>) -> ApiFailure {
        let mut f = ApiFailure::new(StatusCode::UNAUTHORIZED, code::UNAUTHORIZED, message);
        f.headers.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        f
    }

    fn rate_limited(limited: Limited) -> ApiFailure {
        let what = if limited.per_second { "per-second rate limit" } else { "daily quota" };
        let mut f = ApiFailure::new(
            StatusCode::TOO_MANY_REQUESTS,
            code::RATE_LIMITED,
            format!("{what} exceeded; retry after {} s", limited.retry_after_secs),
        );
        f.headers.push((header::RETRY_AFTER, HeaderValue::from(limited.retry_after_secs)));
        if limited.quota.limit != u64::MAX {
            f.headers.extend(quota_headers(&limited.quota));
        }
        f
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = ErrorResponse { success: false, error: ApiError { code: self.code.into(), message: self.message } };
        let mut resp = (self.status, Json(body)).into_response();
        resp.headers_mut().extend(self.headers);
        resp
    }
}

fn quota_headers(q: &Quota) -> Vec<(HeaderName, HeaderValue)> {
    vec![
        (HeaderName::from_static("x-ratelimit-limit"), HeaderValue::from(q.limit)),
        (HeaderName::from_static("x-ratelimit-remaining"), HeaderValue::from(q.remaining)),
        (HeaderName::from_static("x-ratelimit-reset"), HeaderValue::from(q.reset)),
    ]
}

/// Marks a response with the VINs it answered, for the audit log.
fn with_vins(mut resp: Response, n: usize) -> Response {
    resp.extensions_mut().insert(audit::VinCount(n));
    resp
}

/// A success answer with the caller's quota in headers (none when unlimited).
fn ok<T: serde::Serialize>(body: T, quota: Quota) -> Response {
    let mut resp = Json(body).into_response();
    if quota.limit != u64::MAX {
        resp.headers_mut().extend(quota_headers(&quota));
    }
    resp
}

type Shared = State<Arc<Server>>;
type Peer = ConnectInfo<SocketAddr>;

impl Server {
    fn caller(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<Caller, ApiFailure> {
        let auth = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        if auth.is_none() {
            return Ok(Caller::Anonymous(peer.ip()));
        }
        // An address that has sent too many wrong keys has every key refused
        // for a while, right ones included: otherwise a guess that lands
        // would still tell itself apart.
        if let Err(wait) = self.accounts.guesses.check(peer.ip(), unix_now()) {
            let mut f = ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                code::RATE_LIMITED,
                format!("too many invalid API keys from this address; retry after {wait} s"),
            );
            f.headers.push((header::RETRY_AFTER, HeaderValue::from(wait)));
            return Err(f);
        }
        self.accounts.authenticate(auth, peer.ip()).map_err(|bad| {
            self.accounts.guesses.wrong(peer.ip(), unix_now());
            ApiFailure::unauthorized(bad.0)
        })
    }

    /// Who is calling, for the audit log: an account's label, never its key.
    fn account_label(&self, headers: &HeaderMap, peer: SocketAddr) -> String {
        // Not `caller`: the log must not count a wrong key a second time.
        let auth = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
        match self.accounts.authenticate(auth, peer.ip()) {
            Ok(caller) => self.accounts.name(caller),
            Err(_) => "(invalid key)".to_string(),
        }
    }

    fn keyed_caller(&self, headers: &HeaderMap, peer: SocketAddr, what: &str) -> Result<Caller, ApiFailure> {
        match self.caller(headers, peer)? {
            Caller::Anonymous(_) => Err(ApiFailure::unauthorized(format!(
                "{what} requires an API key: send Authorization: Bearer YOUR_API_KEY (anonymous access is single decode only)"
            ))),
            keyed => Ok(keyed),
        }
    }

    fn admit(&self, caller: Caller) -> Result<Quota, ApiFailure> {
        self.accounts.admit(caller, unix_now()).map_err(|limited| {
            tracing::debug!(caller = %self.accounts.name(caller), per_second = limited.per_second, "429");
            ApiFailure::rate_limited(limited)
        })
    }
}

fn too_large() -> ApiFailure {
    ApiFailure::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        code::PAYLOAD_TOO_LARGE,
        format!("request body is over {MAX_BODY_BYTES} bytes"),
    )
}

/// Middleware: a body announced over the limit is refused at once, before
/// anyone waits for it to arrive.
async fn refuse_declared_oversize(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large().into_response();
    }
    next.run(req).await
}

/// Reads a JSON body: 413 when too large, 408 when it does not arrive in
/// time, 400 with the reason otherwise.
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiFailure> {
    let bytes = body.map_err(|rejection| {
        let timed_out = std::iter::successors(Some(&rejection as &dyn std::error::Error), |e| e.source())
            .any(|e| e.is::<tower_http::timeout::TimeoutError>());
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else if timed_out {
            ApiFailure::new(
                StatusCode::REQUEST_TIMEOUT,
                code::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )
        } else {
            ApiFailure::bad_request(code::INVALID_REQUEST, "the request body could not be read")
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiFailure::bad_request(code::INVALID_REQUEST, public_message(&e)),
        _ => ApiFailure::bad_request(code::INVALID_JSON, format!("body is not valid JSON: {e}")),
    })
}

/// serde's text for a body of the wrong shape, without the Rust type names
/// it mentions (`expected struct DecodeRequest`, `untagged enum YearValue`).
fn public_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut words = text.split(' ').peekable();
    while let Some(w) = words.next() {
        match w {
            "struct" | "enum" => {
                // The type's name follows; serde's wording stays readable.
                words.next();
                out.push_str(if w == "struct" { "a JSON object" } else { "one of the accepted forms" });
            }
            "untagged" if words.peek() == Some(&"enum") => {
                words.next();
                words.next();
                out.push_str("any accepted form");
            }
            _ => out.push_str(w),
        }
        out.push(' ');
    }
    out.trim_end().to_string()
}

fn invalid_vin(raw: &str, e: crate::vin::VinError) -> ApiError {
    ApiError { code: code::INVALID_VIN.into(), message: format!("invalid VIN {raw:?}: {e}") }
}

/// A vehicle as served: vPIC's variables, and `Year`, the same value as
/// `ModelYear`. The guide's own example reads `vehicle.data.Year`; vPIC
/// has no variable of that name, so it is added here, on the wire only.
#[derive(serde::Serialize)]
struct Served<'a> {
    #[serde(flatten)]
    vehicle: &'a Vehicle,
    #[serde(rename = "Year")]
    year: &'a str,
}

impl Served<'_> {
    fn of(vehicle: &Vehicle) -> Served<'_> {
        Served { vehicle, year: &vehicle.model_year }
    }
}

/// One batch entry as served, in request order.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ServedEntry<'a> {
    /// The entry as sent (a string, or any other JSON value) and why it
    /// was not decoded.
    Failed {
        #[serde(rename = "VIN")]
        vin: &'a serde_json::Value,
        error: ApiError,
    },
    Decoded(Served<'a>),
}

/// `POST /api/v1/batch-decode` as the server reads it: any JSON values, so
/// that one entry that is not a string (`null`, a number) gets its own
/// error and the rest decode, as the guide promises for invalid VINs.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    vins: Vec<serde_json::Value>,
}

async fn decode_blocking(server: &Arc<Server>, vins: Vec<Vin>) -> Result<Vec<Vehicle>, ApiFailure> {
    let s = Arc::clone(server);
    tokio::task::spawn_blocking(move || vins.iter().map(|v| s.decoder.decode(v)).collect())
        .await
        .map_err(|_| ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL_ERROR, "decoder failed"))
}

async fn decode(
    State(s): Shared,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let caller = s.caller(&headers, peer)?;
    let req: DecodeRequest = parse_body(body)?;
    let vin = Vin::parse_exact(&req.vin).map_err(|e| {
        let err = invalid_vin(&req.vin, e);
        ApiFailure::bad_request(code::INVALID_VIN, err.message)
    })?;
    let quota = s.admit(caller)?;
    let vehicle = decode_blocking(&s, vec![vin]).await?.remove(0);
    Ok(with_vins(ok(DataResponse { success: true, data: Served::of(&vehicle) }, quota), 1))
}

async fn batch_decode(
    State(s): Shared,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let caller = s.keyed_caller(&headers, peer, "batch decoding")?;
    let req: BatchRequest = parse_body(body)?;
    match req.vins.len() {
        0 => return Err(ApiFailure::bad_request(code::INVALID_REQUEST, "vins must hold 1 to 20 VINs, got none")),
        n if n > MAX_BATCH => {
            return Err(ApiFailure::bad_request(
                code::BATCH_TOO_LARGE,
                format!("at most {MAX_BATCH} VINs per request, got {n}; split larger lists into chunks"),
            ));
        }
        _ => {}
    }
    let quota = s.admit(caller)?;
    // Each VIN stands alone: an invalid one gets its error, the rest decode.
    let parsed: Vec<Result<Vin, ApiError>> = req
        .vins
        .iter()
        .enumerate()
        .map(|(i, raw)| match raw.as_str() {
            Some(text) => Vin::parse_exact(text).map_err(|e| invalid_vin(text, e)),
            None => Err(ApiError {
                code: code::INVALID_VIN.into(),
                message: format!("entry {} of vins is {raw}, not a string", i + 1),
            }),
        })
        .collect();
    let valid: Vec<Vin> = parsed.iter().filter_map(|p| p.as_ref().ok().copied()).collect();
    let decoded = decode_blocking(&s, valid).await?;
    let mut vehicles = decoded.iter();
    let data: Vec<ServedEntry> = parsed
        .into_iter()
        .zip(&req.vins)
        .map(|(p, raw)| match p {
            Ok(_) => ServedEntry::Decoded(Served::of(vehicles.next().expect("one decode per valid VIN"))),
            Err(error) => ServedEntry::Failed { vin: raw, error },
        })
        .collect();
    tracing::debug!(caller = %s.accounts.name(caller), vins = data.len(), "batch-decode");
    let n = data.len();
    Ok(with_vins(ok(DataResponse { success: true, data }, quota), n))
}

async fn recalls(
    State(s): Shared,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let caller = s.keyed_caller(&headers, peer, "recall lookup")?;
    let req: RecallsRequest = parse_body(body)?;
    let by_vehicle = req.make.is_some() || req.model.is_some() || req.year.is_some();
    let target = match (&req.vin, by_vehicle) {
        (Some(raw), false) => {
            // As decode reads it: the guide's pattern, nothing trimmed.
            let vin = Vin::parse_exact(raw)
                .map_err(|e| ApiFailure::bad_request(code::INVALID_VIN, invalid_vin(raw, e).message))?;
            Target::Vin(vin)
        }
        (None, true) => {
            let (Some(make), Some(model), Some(year)) = (&req.make, &req.model, &req.year) else {
                return Err(ApiFailure::bad_request(code::INVALID_REQUEST, "make, model and year are all required"));
            };
            let year = year.year().ok_or_else(|| {
                ApiFailure::bad_request(code::INVALID_REQUEST, "year must be a four-digit model year")
            })?;
            Target::Vehicle(make.clone(), model.clone(), year)
        }
        _ => {
            return Err(ApiFailure::bad_request(
                code::INVALID_REQUEST,
                "send either {\"vin\"} or {\"make\", \"model\", \"year\"}",
            ));
        }
    };
    let quota = s.admit(caller)?;
    let (make, model, year) = match target {
        Target::Vehicle(make, model, year) => (make, model, year),
        // A VIN is decoded to make, model and year first.
        Target::Vin(vin) => {
            let v = decode_blocking(&s, vec![vin]).await?.remove(0);
            (v.make, v.model, v.model_year.parse().unwrap_or(0))
        }
    };
    let found =
        if make.is_empty() || model.is_empty() { Vec::new() } else { s.recalls.lookup(&make, &model, year).to_vec() };
    Ok(ok(RecallsResponse { success: true, recalls: found }, quota))
}

enum Target {
    Vin(Vin),
    Vehicle(String, String, u16),
}

async fn openapi() -> Response {
    Json(openapi::document()).into_response()
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(StatusCode::NOT_FOUND, code::NOT_FOUND, "no such endpoint; see /api/v1/openapi.json")
}

async fn method_not_allowed() -> ApiFailure {
    ApiFailure::new(StatusCode::METHOD_NOT_ALLOWED, code::METHOD_NOT_ALLOWED, "use POST with a JSON body")
}
