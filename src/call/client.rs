//! The runner's Car Vin API client, and the one place every call's outcome is
//! classified: use it, stop the job, hand it to the limiter, retry later, or
//! give up. The wire types are [`crate::api`]'s, shared with `vinetl serve`.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{DATE, HeaderMap, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use crate::api::{self, BatchDecodeRequest, BatchEntry, DataResponse, ErrorResponse, RecallsRequest, RecallsResponse};
use crate::columns::escaped;
use crate::spec::ProviderSpec;
use crate::vin::Vin;

/// What to do after a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T> {
    /// 200 with a complete answer.
    Done(T),
    /// 401/403: the key is wrong or revoked. Stop the whole job now; a retry
    /// would only burn quota.
    StopJob(String),
    /// 429: over the provider's limit. The limiter pushes every worker back;
    /// the call is retried without using up an attempt.
    RateLimited { retry_after: Option<Duration> },
    /// The API could not be reached at all (connection refused, DNS or TLS
    /// failure): the account's circuit opens; no attempt is used and the
    /// call does not count against the quota.
    Unreachable(String),
    /// A 5xx or a 408: retried with backoff, counting an attempt; a run of
    /// them across the account opens the circuit.
    ServerError(String),
    /// Sent, and no answer within the timeout: handled as a 5xx, counted
    /// apart (the request may well have used quota).
    TimedOut(String),
    /// Malformed or incomplete JSON, a body cut short: retry with
    /// exponential backoff, counting an attempt.
    Retry(String),
    /// Any other answer (a 400 for a request we built, a 404 for a wrong base
    /// URL): retrying cannot help, so the batch is dead-lettered at once.
    GiveUp(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the API key variable {0} is not set (provider.api_key_env names it; the key itself never goes in a spec)")]
    MissingKey(String),
    #[error("the API key file {0} cannot be read: {1} (provider.api_key_file names it)")]
    KeyFile(String, String),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// A client for one provider account.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: Key,
}

/// Where the key comes from: a variable (read once: a process's
/// environment does not change), or a file (read again when it changes).
///
/// Keys are held as [`SecretString`]: no `Debug` or `Display` prints them,
/// and their memory is zeroed when dropped. A key is exposed only where
/// the header is set (reqwest marks it sensitive) and where a re-read key
/// is compared with the refused one.
#[derive(Clone)]
enum Key {
    Fixed(std::sync::Arc<SecretString>),
    File(std::sync::Arc<KeyFile>),
}

impl Key {
    fn current(&self) -> std::sync::Arc<SecretString> {
        match self {
            Key::Fixed(k) => std::sync::Arc::clone(k),
            Key::File(f) => f.current(),
        }
    }
}

/// A key file (a Docker or Kubernetes secret) and the key last read from
/// it. Reading is a stat per call and a read when the file's time moved:
/// a few microseconds against a call's tens of milliseconds, so done
/// inline rather than by a watcher thread.
struct KeyFile {
    path: std::path::PathBuf,
    last: std::sync::Mutex<(Option<std::time::SystemTime>, std::sync::Arc<SecretString>)>,
}

impl KeyFile {
    fn open(path: &std::path::Path) -> Result<KeyFile, ClientError> {
        let key = read_key(path).map_err(|e| ClientError::KeyFile(path.display().to_string(), e.to_string()))?;
        Ok(KeyFile { path: path.to_path_buf(), last: std::sync::Mutex::new((modified(path), key)) })
    }

    /// The key, read again if the file changed since it was last read. A
    /// file caught mid-write (empty) keeps the key read before.
    fn current(&self) -> std::sync::Arc<SecretString> {
        let now = modified(&self.path);
        let mut last = self.last.lock().expect("key file lock");
        if now != last.0
            && let Ok(key) = read_key(&self.path)
        {
            tracing::info!(file = %self.path.display(), "the API key file changed; using the new key");
            *last = (now, key);
        }
        std::sync::Arc::clone(&last.1)
    }

    /// After the key `sent` was refused: reads the file whatever its time
    /// says, and returns its key if it is another (rotated within the
    /// file system's time resolution).
    fn reread(&self, sent: &SecretString) -> Option<std::sync::Arc<SecretString>> {
        let key = read_key(&self.path).ok()?;
        let mut last = self.last.lock().expect("key file lock");
        *last = (modified(&self.path), std::sync::Arc::clone(&key));
        (key.expose_secret() != sent.expose_secret()).then_some(key)
    }
}

fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_key(path: &std::path::Path) -> std::io::Result<std::sync::Arc<SecretString>> {
    let text = SecretString::from(std::fs::read_to_string(path)?);
    let key = text.expose_secret().trim();
    if key.is_empty() {
        return Err(std::io::Error::other("the file is empty"));
    }
    Ok(std::sync::Arc::new(SecretString::from(key)))
}

/// What came back from one request, before classifying.
type Answer = (StatusCode, HeaderMap, Result<bytes::Bytes, String>);

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("ApiClient").field("base", &self.base).finish_non_exhaustive()
    }
}

impl ApiClient {
    /// Reads the key from the variable the spec names.
    pub fn from_spec(spec: &ProviderSpec) -> Result<ApiClient, ClientError> {
        if spec.embedded {
            return ApiClient::new(&spec.base_url, crate::api::EMBEDDED_KEY, Duration::from_secs(spec.timeout_secs));
        }
        if let Some(file) = &spec.api_key_file {
            let mut client = ApiClient::new(&spec.base_url, "", Duration::from_secs(spec.timeout_secs))?;
            client.key = Key::File(std::sync::Arc::new(KeyFile::open(std::path::Path::new(file))?));
            return Ok(client);
        }
        let key = std::env::var(&spec.api_key_env)
            .ok()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| ClientError::MissingKey(spec.api_key_env.clone()))?;
        ApiClient::new(&spec.base_url, &key, Duration::from_secs(spec.timeout_secs))
    }

    pub fn new(base_url: &str, key: &str, timeout: Duration) -> Result<ApiClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            // Fail fast on an unreachable host instead of waiting the full timeout.
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("vinetl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(ApiClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            key: Key::Fixed(std::sync::Arc::new(SecretString::from(key.trim()))),
        })
    }

    /// The API's origin (scheme, host, port), as the audit trail records it:
    /// no path, no user-info.
    pub fn origin(&self) -> String {
        match url::Url::parse(&self.base) {
            Ok(u) => u.origin().ascii_serialization(),
            Err(_) => "(an address that does not parse)".to_string(),
        }
    }

    /// One batch-decode call for at most 20 VINs.
    pub async fn batch_decode(&self, vins: &[Vin]) -> Outcome<Vec<BatchEntry>> {
        let body = BatchDecodeRequest { vins: vins.iter().map(Vin::to_string).collect() };
        let outcome: Outcome<DataResponse<Vec<BatchEntry>>> = self.post(api::BATCH_DECODE_PATH, &body).await;
        match outcome {
            Outcome::Done(resp) => check_batch(vins, resp.data),
            other => other.map_done(|r| r.data),
        }
    }

    /// One recall lookup.
    pub async fn recalls(&self, req: &RecallsRequest) -> Outcome<RecallsResponse> {
        self.post(api::RECALLS_PATH, req).await
    }

    /// One call. A key from a file that is refused (401/403) is tried once
    /// more if the file now holds another: the key was rotated between
    /// this call's read and the server's revocation of the old one.
    async fn post<B: serde::Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Outcome<T> {
        let key = self.key.current();
        let (status, headers, answer) = match self.send(path, body, &key).await {
            Ok(a) => a,
            Err(o) => return o,
        };
        if matches!(status.as_u16(), 401 | 403)
            && let Key::File(file) = &self.key
            && let Some(new) = file.reread(&key)
        {
            tracing::info!(file = %file.path.display(), "the API key was refused and its file holds another: calling once more with it");
            return match self.send(path, body, &new).await {
                Ok((status, headers, answer)) => classify(status, &headers, answer),
                Err(o) => o,
            };
        }
        classify(status, &headers, answer)
    }

    async fn send<B: serde::Serialize, T>(
        &self,
        path: &str,
        body: &B,
        key: &SecretString,
    ) -> Result<Answer, Outcome<T>> {
        let request = self.http.post(format!("{}{path}", self.base)).bearer_auth(key.expose_secret());
        let sent = request.json(body).send().await;
        let resp = sent.map_err(|e| transport_outcome(&e))?;
        let (status, headers) = (resp.status(), resp.headers().clone());
        let body = match read_capped(resp, MAX_ANSWER_BYTES).await {
            Err(Read::Transport(e)) if e.is_timeout() => return Err(Outcome::TimedOut(describe_transport(&e))),
            Err(Read::Transport(e)) => Err(describe_transport(&e)),
            Err(Read::TooLarge) => Err(format!("malformed answer: larger than {} KiB", MAX_ANSWER_BYTES / 1024)),
            Ok(body) => Ok(body),
        };
        Ok((status, headers, body))
    }
}

/// The largest answer read. A 20-VIN batch decode is about 60 KiB and a
/// recall list a few KiB; anything near this is broken or hostile, and is
/// not held in memory whole.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

enum Read {
    Transport(reqwest::Error),
    TooLarge,
}

/// The body, read chunk by chunk and refused as soon as it passes `cap`
/// (a declared Content-Length over it is refused before reading).
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<bytes::Bytes, Read> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(Read::TooLarge);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(Read::Transport)? {
        if body.len() + chunk.len() > cap {
            return Err(Read::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A request that got no HTTP answer: unreachable, or a timeout.
fn transport_outcome<T>(e: &reqwest::Error) -> Outcome<T> {
    let text = describe_transport(e);
    if e.is_connect() {
        Outcome::Unreachable(text)
    } else if e.is_timeout() {
        Outcome::TimedOut(text)
    } else {
        Outcome::Retry(text)
    }
}

impl<T> Outcome<T> {
    pub fn map_done<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Done(t) => Outcome::Done(f(t)),
            Outcome::StopJob(m) => Outcome::StopJob(m),
            Outcome::RateLimited { retry_after } => Outcome::RateLimited { retry_after },
            Outcome::Unreachable(m) => Outcome::Unreachable(m),
            Outcome::ServerError(m) => Outcome::ServerError(m),
            Outcome::TimedOut(m) => Outcome::TimedOut(m),
            Outcome::Retry(m) => Outcome::Retry(m),
            Outcome::GiveUp(m) => Outcome::GiveUp(m),
        }
    }
}

fn describe_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "response cut short"
    } else {
        "request failed"
    };
    // reqwest's Display never includes headers, so the key cannot leak here.
    format!("{kind}: {e}")
}

/// The classification table. Pure, so it is tested as a table. The API's
/// own words reach messages and logs escaped ([`escaped`]): they are input.
pub fn classify<T: DeserializeOwned>(
    status: StatusCode,
    headers: &HeaderMap,
    body: Result<bytes::Bytes, String>,
) -> Outcome<T> {
    let body = match body {
        Ok(b) => b,
        Err(e) => return Outcome::Retry(e),
    };
    let message = || {
        serde_json::from_slice::<ErrorResponse>(&body)
            .map(|e| format!("{} {}: {}", status.as_u16(), escaped(&e.error.code, 40), escaped(&e.error.message, 200)))
            .unwrap_or_else(|_| {
                format!("{status}: {}", escaped(&String::from_utf8_lossy(&body[..body.len().min(200)]), 200))
            })
    };
    match status {
        StatusCode::OK => match serde_json::from_slice::<T>(&body) {
            Ok(t) => Outcome::Done(t),
            Err(e) => Outcome::Retry(format!("malformed JSON in a 200: {e}")),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Outcome::StopJob(message()),
        StatusCode::TOO_MANY_REQUESTS => Outcome::RateLimited { retry_after: retry_after(headers) },
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => Outcome::ServerError(message()),
        _ => Outcome::GiveUp(message()),
    }
}

/// A 200 must answer every VIN asked, in order; anything less is treated as
/// a broken response and retried.
fn check_batch(asked: &[Vin], got: Vec<BatchEntry>) -> Outcome<Vec<BatchEntry>> {
    if got.len() != asked.len() {
        return Outcome::Retry(format!("incomplete answer: {} entries for {} VINs", got.len(), asked.len()));
    }
    for (vin, entry) in asked.iter().zip(&got) {
        let answered = match entry {
            BatchEntry::Decoded(v) => &v.vin,
            BatchEntry::Failed { vin, .. } => vin,
        };
        if !answered.eq_ignore_ascii_case(vin.as_str()) {
            return Outcome::Retry(format!("answer out of order: expected {vin}, got {answered}"));
        }
    }
    Outcome::Done(got)
}

/// The longest push-back one 429 may set: a quota day. A 429 holds back
/// every worker of the account, and only a later one moves it; a larger
/// value (a server's bug, or a date in another century) would stop the
/// account for as long, until someone edited the row by hand.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// `Retry-After` as seconds or an HTTP date (RFC 9110 10.2.3), at most
/// [`MAX_RETRY_AFTER`]. A date is read against the answer's own `Date`
/// (the server's clock, RFC 9110 10.2.2) when it has one, so a worker
/// whose clock runs ahead of the server's still waits as long as asked.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let now = headers
        .get(DATE)
        .and_then(|d| httpdate::parse_http_date(d.to_str().ok()?.trim()).ok())
        .unwrap_or_else(std::time::SystemTime::now);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

/// Exponential backoff with jitter for retry `attempt` (1-based): 1 s, 2 s,
/// 4 s, … capped at 5 minutes, each drawn uniformly from its upper half so
/// that workers that failed together do not retry together.
pub fn backoff(attempt: u32) -> Duration {
    let cap = 300.0;
    let full = (2f64.powi(attempt.saturating_sub(1).min(20) as i32)).min(cap);
    Duration::from_secs_f64(full * (0.5 + fastrand::f64() * 0.5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    type Entries = DataResponse<Vec<BatchEntry>>;

    fn run(status: u16, headers: &[(&str, &str)], body: Result<&str, &str>) -> Outcome<Entries> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        classify(
            StatusCode::from_u16(status).unwrap(),
            &h,
            body.map(|b| bytes::Bytes::from(b.to_string())).map_err(String::from),
        )
    }

    fn kind<T>(o: &Outcome<T>) -> &'static str {
        match o {
            Outcome::Done(_) => "done",
            Outcome::StopJob(_) => "stop",
            Outcome::RateLimited { .. } => "429",
            Outcome::Unreachable(_) => "unreachable",
            Outcome::ServerError(_) => "5xx",
            Outcome::TimedOut(_) => "timed out",
            Outcome::Retry(_) => "retry",
            Outcome::GiveUp(_) => "give up",
        }
    }

    #[test]
    fn every_outcome_is_classified_in_one_table() {
        let ok = r#"{"success": true, "data": [{"VIN": "1HGCM82633A004352", "Make": "HONDA"}]}"#;
        let err = r#"{"success": false, "error": {"code": "X", "message": "m"}}"#;
        // (status, headers, body or transport error, expected outcome)
        type Row<'a> = (u16, &'a [(&'a str, &'a str)], Result<&'a str, &'a str>, &'a str);
        let table: &[Row] = &[
            (200, &[], Ok(ok), "done"),
            (200, &[], Ok(r#"{"success": true, "data": [{"VIN": "#), "retry"), // malformed
            (200, &[], Ok("<html>"), "retry"),
            (200, &[], Err("response cut short"), "retry"), // dropped mid-body
            (401, &[], Ok(err), "stop"),
            (403, &[], Ok(err), "stop"),
            (429, &[("retry-after", "3")], Ok(err), "429"),
            (429, &[], Ok(err), "429"),
            (500, &[], Ok(err), "5xx"),
            (502, &[], Ok("bad gateway"), "5xx"),
            (503, &[], Ok(""), "5xx"),
            (408, &[], Ok(""), "5xx"),
            (400, &[], Ok(err), "give up"),
            (404, &[], Ok(err), "give up"),
            (413, &[], Ok(err), "give up"),
        ];
        for (status, headers, body, want) in table {
            let got = run(*status, headers, *body);
            assert_eq!(kind(&got), *want, "{status} {body:?}: {got:?}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_unreachable_not_a_retry() {
        // A port nothing listens on: bind one, then close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = ApiClient::new(&format!("http://127.0.0.1:{port}"), "k", Duration::from_secs(2)).unwrap();
        let vin = Vin::parse("1HGCM82633A004352").unwrap();
        let got = client.batch_decode(&[vin]).await;
        assert_eq!(kind(&got), "unreachable", "{got:?}");
    }

    /// A server on a loopback port that answers every connection with a
    /// 200 of `size` bytes of JSON-ish filler, announced (`Content-Length`)
    /// or streamed (chunked, no length).
    async fn huge_answer(size: usize, announced: bool) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    let head = if announced {
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n")
                    } else {
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".into()
                    };
                    let _ = sock.write_all(head.as_bytes()).await;
                    let chunk = vec![b' '; 64 * 1024];
                    let mut sent = 0;
                    while sent < size {
                        let n = chunk.len().min(size - sent);
                        let ok = if announced {
                            sock.write_all(&chunk[..n]).await
                        } else {
                            sock.write_all(format!("{n:x}\r\n").as_bytes())
                                .await
                                .and(sock.write_all(&chunk[..n]).await)
                                .and(sock.write_all(b"\r\n").await)
                        };
                        if ok.is_err() {
                            return;
                        }
                        sent += n;
                    }
                    if !announced {
                        let _ = sock.write_all(b"0\r\n\r\n").await;
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_answer_over_the_cap_is_malformed_and_never_read_whole() {
        let vin = Vin::parse("1HGCM82633A004352").unwrap();
        for announced in [true, false] {
            let base = huge_answer(8 * MAX_ANSWER_BYTES, announced).await;
            let client = ApiClient::new(&base, "k", Duration::from_secs(10)).unwrap();
            match client.batch_decode(std::slice::from_ref(&vin)).await {
                Outcome::Retry(why) => assert!(why.contains("larger than 1024 KiB"), "{why}"),
                other => panic!("announced {announced}: {other:?}"),
            }
        }
        // Under the cap, the same filler is read and found malformed JSON.
        let base = huge_answer(MAX_ANSWER_BYTES / 2, false).await;
        let client = ApiClient::new(&base, "k", Duration::from_secs(10)).unwrap();
        match client.batch_decode(&[vin]).await {
            Outcome::Retry(why) => assert!(why.contains("malformed JSON"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_messages_carry_the_apis_code_and_text() {
        let got =
            run(401, &[], Ok(r#"{"success": false, "error": {"code": "UNAUTHORIZED", "message": "invalid API key"}}"#));
        assert_eq!(got, Outcome::StopJob("401 UNAUTHORIZED: invalid API key".into()));
        // The API's words are input: escaped, never replayed to a terminal or a log.
        let got = run(
            403,
            &[],
            Ok(r#"{"success": false, "error": {"code": "X\u001b[2J", "message": "no\u001b]0;t\u0007"}}"#),
        );
        assert_eq!(got, Outcome::StopJob(r"403 X\u{1b}[2J: no\u{1b}]0;t\u{7}".into()));
        let got: Outcome<serde_json::Value> =
            classify(StatusCode::BAD_GATEWAY, &HeaderMap::new(), Ok("\u{1b}[31m".into()));
        assert!(matches!(&got, Outcome::ServerError(m) if m.ends_with(r"\u{1b}[31m")), "{got:?}");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(110) && d <= Duration::from_secs(120), "{d:?}");
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), Some(Duration::ZERO), "a date in the past means now");
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
        // A date is read against the server's clock where the answer has
        // one: here the worker's clock runs an hour ahead of it.
        let server_now = std::time::SystemTime::now() - Duration::from_secs(3_600);
        h.insert(DATE, HeaderValue::from_str(&httpdate::fmt_http_date(server_now)).unwrap());
        let at = server_now + Duration::from_secs(30);
        h.insert(RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(30)));
        // At most a quota day, however it is said.
        for huge in ["1000000000", "18446744073709551615", "Fri, 31 Dec 9999 23:59:59 GMT"] {
            h.insert(RETRY_AFTER, HeaderValue::from_static(huge));
            assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER), "{huge}");
        }
    }

    #[test]
    fn a_short_or_reordered_batch_answer_is_retried() {
        let vins: Vec<Vin> =
            ["1HGCM82633A004352", "5YJSA1DG9DFP14705"].iter().map(|v| Vin::parse(v).unwrap()).collect();
        let entry = |v: &str| BatchEntry::Decoded(Box::new(api::Vehicle { vin: v.into(), ..Default::default() }));
        assert!(matches!(check_batch(&vins, vec![entry("1HGCM82633A004352")]), Outcome::Retry(_)));
        assert!(matches!(
            check_batch(&vins, vec![entry("5YJSA1DG9DFP14705"), entry("1HGCM82633A004352")]),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            check_batch(&vins, vec![entry("1HGCM82633A004352"), entry("5YJSA1DG9DFP14705")]),
            Outcome::Done(_)
        ));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for attempt in 1..=12 {
            let full = 2f64.powi(attempt as i32 - 1).min(300.0);
            let d = backoff(attempt).as_secs_f64();
            assert!(d >= full * 0.5 && d <= full, "attempt {attempt}: {d}");
        }
        assert!(backoff(100).as_secs_f64() <= 300.0);
    }
}
