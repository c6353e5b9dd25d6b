//! `vinetl serve` under abuse, as a new user would try it: slow and idle
//! sockets past the connection cap, bodies announced and never sent, bodies
//! trickling in, malformed requests, key guessing, a keys file with a key
//! twice. Each case runs against its own `vinetl serve` process on loopback,
//! driven with raw TCP sockets, and prints one `RELIABILITY serve-abuse` line
//! with the statuses seen and the server's RSS before, during and after.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{KEYS_TOML, ServeProcess, vinetl};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Limits the server runs with here: low, so that each case is over in
/// seconds (the defaults are 512 connections and 10 s).
const MAX_CONNECTIONS: usize = 256;
const HEADER_TIMEOUT_SECS: u64 = 2;
const BODY_TIMEOUT_SECS: u64 = 2;
/// More sockets than the cap.
const SOCKETS: usize = 300;
/// Generous: proves a timeout fired at all, not how precisely.
const CLOSE_BOUND: Duration = Duration::from_secs(HEADER_TIMEOUT_SECS + 10);

fn start() -> ServeProcess {
    ServeProcess::start(&[
        "--max-connections",
        &MAX_CONNECTIONS.to_string(),
        "--header-timeout-secs",
        &HEADER_TIMEOUT_SECS.to_string(),
        "--body-timeout-secs",
        &BODY_TIMEOUT_SECS.to_string(),
    ])
}

/// VmRSS of a process, in MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb / 1024.0
}

/// What came back on one socket.
#[derive(Debug, Clone)]
enum Seen {
    /// An HTTP answer: status, `error.code` of its JSON body (empty if the
    /// body is not the API's JSON error), the body.
    Answer(u16, String, String),
    /// Closed by the server without an answer, after this long.
    Closed(Duration),
    /// Still open when the test stopped looking.
    Open,
}

impl Seen {
    fn label(&self) -> String {
        match self {
            Seen::Answer(status, _, _) if *status < 300 => status.to_string(),
            Seen::Answer(status, code, _) if code.is_empty() => format!("{status} (not JSON)"),
            Seen::Answer(status, code, _) => format!("{status} {code}"),
            Seen::Closed(_) => "closed without answer".into(),
            Seen::Open => "still open".into(),
        }
    }
}

/// Reads one HTTP answer (or the close) from `sock`, for at most `bound`.
async fn read_answer(sock: &mut TcpStream, started: Instant, bound: Duration) -> Seen {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = started + bound;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut chunk)).await {
            Err(_) => return Seen::Open,
            Ok(Ok(0)) | Ok(Err(_)) if buf.is_empty() => return Seen::Closed(started.elapsed()),
            Ok(Ok(0)) | Ok(Err(_)) => return parse_answer(&buf).unwrap_or(Seen::Closed(started.elapsed())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(seen) = parse_answer(&buf) {
            return seen;
        }
    }
}

/// A complete answer in `buf` (head and `content-length` bytes of body).
fn parse_answer(buf: &[u8]) -> Option<Seen> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap_or(0));
    let body = buf.get(end + 4..end + 4 + len)?;
    let body = String::from_utf8_lossy(body).into_owned();
    let code = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    Some(Seen::Answer(status, code, body))
}

/// Sends `request` whole and reads the answer.
async fn request(port: u16, request: &[u8]) -> Seen {
    let started = Instant::now();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    if sock.write_all(request).await.is_err() {
        return read_answer(&mut sock, started, CLOSE_BOUND).await;
    }
    read_answer(&mut sock, started, CLOSE_BOUND).await
}

fn post(path: &str, key: Option<&str>, body: &str) -> Vec<u8> {
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A normal batch decode with a good key.
async fn normal(port: u16) -> Seen {
    request(port, &post("/api/v1/batch-decode", Some("pro-counted-key"), r#"{"vins":["1HGCM82633A004352"]}"#)).await
}

/// `count` sockets that each send `head` one byte every `gap` (never
/// finishing when `head` is an unfinished request head; an empty `head`
/// sends nothing at all), watched until the server answers or closes them.
async fn trickle(port: u16, count: usize, head: &'static [u8], gap: Duration) -> Vec<tokio::task::JoinHandle<Seen>> {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let (mut rd, mut wr) = sock.into_split();
            let writer = async move {
                for b in head.iter() {
                    if wr.write_all(std::slice::from_ref(b)).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(gap).await;
                }
                // Hold the socket open until the reader is done.
                std::future::pending::<()>().await;
            };
            let reader = async {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let left = (started + CLOSE_BOUND).saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, rd.read(&mut chunk)).await {
                        Err(_) => return Seen::Open,
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            return parse_answer(&buf).unwrap_or(Seen::Closed(started.elapsed()));
                        }
                        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(seen) = parse_answer(&buf) {
                        return seen;
                    }
                }
            };
            tokio::select! {
                seen = reader => seen,
                () = writer => unreachable!(),
            }
        }));
    }
    tasks
}

/// Statuses seen, counted: `{"closed without answer": 256, "503 OVERLOADED": 44}`.
fn tally(seen: &[Seen]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for s in seen {
        *t.entry(s.label()).or_insert(0) += 1;
    }
    t
}

fn show(t: &BTreeMap<String, usize>) -> String {
    t.iter().map(|(k, v)| format!("{v}× {k}")).collect::<Vec<_>>().join(", ")
}

/// What a case reports: what it saw, and the server's RSS during it.
struct Report {
    summary: String,
    during_mb: f64,
}

#[derive(Clone, Copy, Debug)]
enum Case {
    /// Slow request heads, one byte every 0.5 s, past the cap: each is
    /// closed at the header timeout, and a normal request meanwhile is
    /// refused 503 (JSON) at once rather than hanging; once they are gone a
    /// normal request is served.
    SlowHeads,
    /// Connections that send nothing, past the cap: closed at the header
    /// timeout.
    IdleSockets,
    /// 20 requests announcing a 100 MB body and sending none: 413 at once.
    HugeContentLength,
    /// A 60,000-byte body (under the limit) sent 1,000 bytes every 0.2 s:
    /// 408 at the body deadline, not 12 s later.
    SlowBody,
    /// `Content-Length: abc`: a JSON 400, not hyper's empty one.
    MalformedContentLength,
    /// A year past any integer, and a body of the wrong JSON type: 400s
    /// whose messages name no Rust type.
    InternalNames,
    /// 200 wrong keys from one address: a few 401s, then 429s with
    /// Retry-After; a right key from that address is held back too.
    KeyGuessing,
}

async fn run_case(case: Case, server: &ServeProcess) -> Report {
    let port = server.port();
    let pid = server.pid();
    match case {
        Case::SlowHeads | Case::IdleSockets => {
            const HEAD: &[u8] = b"POST /api/v1/batch-decode HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
            let head: &'static [u8] = if matches!(case, Case::SlowHeads) { HEAD } else { b"" };
            let tasks = trickle(port, SOCKETS, head, Duration::from_millis(500)).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let during_mb = rss_mb(pid);
            let meanwhile = normal(port).await;
            let mut seen = Vec::new();
            for t in tasks {
                seen.push(t.await.unwrap());
            }
            let t = tally(&seen);
            let slowest = seen.iter().filter_map(|s| if let Seen::Closed(d) = s { Some(*d) } else { None }).max();
            assert!(!t.contains_key("still open"), "{case:?}: sockets left open: {t:?}");
            assert!(
                t.keys().all(|k| k == "closed without answer" || k == "503 OVERLOADED"),
                "{case:?}: unexpected answers {t:?}"
            );
            assert!(
                matches!(&meanwhile, Seen::Answer(503, code, _) if code == "OVERLOADED"),
                "over the cap a normal request gets a JSON 503: {meanwhile:?}"
            );
            let after = normal(port).await;
            assert!(matches!(after, Seen::Answer(200, _, _)), "served again once they are gone: {after:?}");
            Report {
                summary: format!(
                    "{SOCKETS} sockets against a cap of {MAX_CONNECTIONS}: {} (last closed after {:.1} s, header timeout {HEADER_TIMEOUT_SECS} s); a normal request meanwhile {}, afterwards {}",
                    show(&t),
                    slowest.unwrap_or_default().as_secs_f64(),
                    meanwhile.label(),
                    after.label()
                ),
                during_mb,
            }
        }
        Case::HugeContentLength => {
            let mut socks = Vec::new();
            let started = Instant::now();
            for _ in 0..20 {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let head = "POST /api/v1/batch-decode HTTP/1.1\r\nhost: x\r\nauthorization: Bearer pro-counted-key\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n";
                s.write_all(head.as_bytes()).await.unwrap();
                socks.push(s);
            }
            let during_mb = rss_mb(pid);
            let mut seen = Vec::new();
            for mut s in socks {
                seen.push(read_answer(&mut s, started, CLOSE_BOUND).await);
            }
            let t = tally(&seen);
            assert_eq!(t.get("413 PAYLOAD_TOO_LARGE"), Some(&20), "{t:?}");
            let took = started.elapsed();
            assert!(took < Duration::from_secs(BODY_TIMEOUT_SECS), "refused before any body wait: {took:?}");
            Report { summary: format!("20 requests: {} in {:.2} s", show(&t), took.as_secs_f64()), during_mb }
        }
        Case::SlowBody => {
            let body = format!(r#"{{"vins":["1HGCM82633A004352"],"pad":"{}"}}"#, "x".repeat(60_000 - 40));
            let mut tasks = Vec::new();
            let started = Instant::now();
            for _ in 0..5 {
                let body = body.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                    let head = format!(
                        "POST /api/v1/batch-decode HTTP/1.1\r\nhost: x\r\nauthorization: Bearer pro-counted-key\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    s.write_all(head.as_bytes()).await.unwrap();
                    let (mut rd, mut wr) = s.into_split();
                    let writer = async move {
                        for piece in body.as_bytes().chunks(1000) {
                            if wr.write_all(piece).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        std::future::pending::<()>().await;
                    };
                    let reader = async {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            match tokio::time::timeout(CLOSE_BOUND, rd.read(&mut chunk)).await {
                                Err(_) => return Seen::Open,
                                Ok(Ok(0)) | Ok(Err(_)) => return parse_answer(&buf).unwrap_or(Seen::Closed(started.elapsed())),
                                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                            }
                            if let Some(seen) = parse_answer(&buf) {
                                return seen;
                            }
                        }
                    };
                    tokio::select! { seen = reader => (seen, started.elapsed()), () = writer => unreachable!() }
                }));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let during_mb = rss_mb(pid);
            let mut seen = Vec::new();
            let mut slowest = Duration::ZERO;
            for t in tasks {
                let (s, took) = t.await.unwrap();
                slowest = slowest.max(took);
                seen.push(s);
            }
            let t = tally(&seen);
            assert_eq!(t.get("408 REQUEST_TIMEOUT"), Some(&5), "{t:?}");
            // Sent whole, the body would take 12 s.
            assert!(slowest < Duration::from_secs(BODY_TIMEOUT_SECS + 5), "{slowest:?}");
            Report {
                summary: format!(
                    "5 bodies of 60,000 bytes at 5 KB/s: {} after at most {:.1} s (body deadline {BODY_TIMEOUT_SECS} s; whole they take 12 s)",
                    show(&t),
                    slowest.as_secs_f64()
                ),
                during_mb,
            }
        }
        Case::MalformedContentLength => {
            let mut seen = Vec::new();
            for cl in ["abc", "-5", "1,2", "99999999999999999999999"] {
                let req = format!("POST /api/v1/decode HTTP/1.1\r\nhost: x\r\ncontent-length: {cl}\r\n\r\n{{}}");
                seen.push(request(port, req.as_bytes()).await);
            }
            let during_mb = rss_mb(pid);
            let t = tally(&seen);
            assert_eq!(t.get("400 INVALID_REQUEST"), Some(&4), "{t:?}: {seen:?}");
            Report { summary: format!("Content-Length abc, -5, \"1,2\", 10^23: {}", show(&t)), during_mb }
        }
        Case::InternalNames => {
            let bodies = [
                ("/api/v1/recalls", r#"{"make":"HONDA","model":"Accord","year":1e400}"#),
                ("/api/v1/recalls", r#"{"make":"HONDA","model":"Accord","year":99999999999999999999999}"#),
                ("/api/v1/recalls", r#"{"make":"HONDA","model":"Accord","year":{"y":1}}"#),
                ("/api/v1/decode", r#""1HGCM82633A004352""#),
                ("/api/v1/batch-decode", r#"{"vins":"1HGCM82633A004352"}"#),
                ("/api/v1/batch-decode", r#"7"#),
            ];
            let mut seen = Vec::new();
            for (path, body) in bodies {
                let s = request(port, &post(path, Some("pro-counted-key"), body)).await;
                if let Seen::Answer(_, _, text) = &s {
                    for internal in
                        ["YearValue", "DecodeRequest", "BatchDecodeRequest", "RecallsRequest", "untagged", "struct "]
                    {
                        assert!(!text.contains(internal), "{path} {body}: {text} names {internal}");
                    }
                }
                seen.push(s);
            }
            let during_mb = rss_mb(pid);
            let t = tally(&seen);
            assert_eq!(t.values().sum::<usize>(), 6);
            assert!(t.keys().all(|k| k == "400 INVALID_REQUEST" || k == "400 INVALID_JSON"), "{t:?}");
            let sample = match &seen[1] {
                Seen::Answer(_, _, body) => {
                    serde_json::from_str::<serde_json::Value>(body).unwrap()["error"]["message"].clone()
                }
                other => panic!("{other:?}"),
            };
            Report {
                summary: format!("6 bodies of the wrong shape: {}; a huge year says {sample}", show(&t)),
                during_mb,
            }
        }
        Case::KeyGuessing => {
            let started = Instant::now();
            let mut seen = Vec::new();
            for i in 0..200 {
                let s = request(
                    port,
                    &post("/api/v1/batch-decode", Some(&format!("guess-{i:06}")), r#"{"vins":["1HGCM82633A004352"]}"#),
                )
                .await;
                seen.push(s);
            }
            let took = started.elapsed();
            let during_mb = rss_mb(pid);
            let right = normal(port).await;
            let t = tally(&seen);
            // Ten wrong keys are free; then one every 2 s (a slow machine may
            // earn one or two more while the 200 go by).
            let refused = t.get("401 UNAUTHORIZED").copied().unwrap_or(0);
            let earned = (took.as_secs_f64() / 2.0).ceil() as usize;
            assert!((10..=10 + earned).contains(&refused), "{t:?} in {took:?}");
            assert_eq!(t.get("429 RATE_LIMITED").copied().unwrap_or(0), 200 - refused, "{t:?}");
            assert!(matches!(&right, Seen::Answer(429, _, _)), "the address is held back, right key or not: {right:?}");
            Report {
                summary: format!(
                    "200 wrong keys in {:.2} s: {}; the right key from that address then {}",
                    took.as_secs_f64(),
                    show(&t),
                    right.label()
                ),
                during_mb,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_abuse_with_json_and_bounded_resources() {
    let table = [
        ("slow-heads", Case::SlowHeads),
        ("idle-sockets", Case::IdleSockets),
        ("huge-content-length", Case::HugeContentLength),
        ("slow-body", Case::SlowBody),
        ("malformed-content-length", Case::MalformedContentLength),
        ("internal-names", Case::InternalNames),
        ("key-guessing", Case::KeyGuessing),
    ];
    for (name, case) in table {
        let server = start();
        // One normal request first, so that "before" includes a warm decoder.
        assert!(matches!(normal(server.port()).await, Seen::Answer(200, _, _)));
        let before = rss_mb(server.pid());
        let report = run_case(case, &server).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = rss_mb(server.pid());
        println!(
            "RELIABILITY serve-abuse {name}: {}; RSS before {before:.1} MB, during {:.1} MB, after {after:.1} MB",
            report.summary, report.during_mb
        );
        assert!(after < before + 64.0, "{name}: RSS grew from {before:.1} to {after:.1} MB");
        server.stop();
    }
}

/// A keys file that lists one key twice is refused before the server
/// listens, naming both entries.
#[test]
fn a_keys_file_with_a_duplicate_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!("{KEYS_TOML}\n[[keys]]\nkey = \"free-tier-key\"\ntier = \"pro\"\nname = \"again\"\n"),
    )
    .unwrap();
    let out = vinetl().args(["serve", "--bind", "127.0.0.1:0", "--keys", keys.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("key #5") && stderr.contains("key #2") && stderr.contains("unique"), "{stderr}");
    println!(
        "RELIABILITY serve-abuse duplicate-keys: refused at start, exit {:?}: {}",
        out.status.code(),
        stderr.trim()
    );
}
