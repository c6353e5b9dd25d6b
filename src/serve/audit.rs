//! The server's request log: one JSON line per API request (`--audit-log`),
//! saying when, which account (its label, never the key), which endpoint,
//! how many VINs, the status and how long it took. It is the audit trail the
//! guide asks for, and what the benchmarks count requests and 429s from, as
//! the server saw them.
//!
//! Lines go through a bounded channel to one writer task, so a slow disk
//! slows requests down (back-pressure) rather than losing lines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Server;

/// How many VINs a request carried; handlers put it on their response.
#[derive(Debug, Clone, Copy)]
pub struct VinCount(pub usize);

/// One line of the log.
#[derive(Debug, Serialize)]
struct Line {
    /// Unix seconds, to the microsecond.
    ts: f64,
    account: String,
    method: String,
    path: String,
    status: u16,
    vins: usize,
    ms: f64,
}

/// The open log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Line>,
}

impl AuditLog {
    /// Opens `path` for appending and starts its writer; the task ends (and
    /// flushes) when the last handle is dropped. With `keep`, lines older
    /// than that are deleted at start and then every hour.
    pub async fn open(
        path: PathBuf,
        keep: Option<Duration>,
    ) -> std::io::Result<(AuditLog, tokio::task::JoinHandle<()>)> {
        if let Some(keep) = keep {
            prune(&path, keep).await?;
        }
        let mut out = append(&path).await?;
        // A few thousand lines of slack: bursts never wait on the disk.
        let (tx, mut rx) = mpsc::channel::<Line>(4096);
        let task = tokio::spawn(async move {
            let mut pruned = Instant::now();
            while let Some(first) = rx.recv().await {
                let mut buf = Vec::with_capacity(256);
                let mut next = Some(first);
                // Write what has queued up, then flush once.
                while let Some(line) = next {
                    serde_json::to_writer(&mut buf, &line).expect("a log line serialises");
                    buf.push(b'\n');
                    next = rx.try_recv().ok();
                }
                if out.write_all(&buf).await.is_err() || out.flush().await.is_err() {
                    tracing::error!(path = %path.display(), "cannot write the audit log");
                }
                // This task is the file's only writer, so it prunes in turn.
                if let Some(keep) = keep.filter(|_| pruned.elapsed() >= PRUNE_EVERY) {
                    pruned = Instant::now();
                    match prune(&path, keep).await {
                        Ok(()) => match append(&path).await {
                            Ok(file) => out = file,
                            Err(e) => {
                                tracing::error!(path = %path.display(), error = %e, "cannot reopen the audit log")
                            }
                        },
                        Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot prune the audit log"),
                    }
                }
            }
            let _ = out.flush().await;
        });
        Ok((AuditLog { tx }, task))
    }
}

/// How often a running server prunes its log (when a line is written).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

async fn append(path: &Path) -> std::io::Result<tokio::io::BufWriter<tokio::fs::File>> {
    let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
    Ok(tokio::io::BufWriter::new(file))
}

/// Rewrites the log without its lines older than `keep` (a line that does
/// not parse stays: it is not this function's to judge), through a
/// temporary file renamed over it, so a crash leaves the old log or the
/// new one.
async fn prune(path: &Path, keep: Duration) -> std::io::Result<()> {
    let Ok(file) = tokio::fs::File::open(path).await else { return Ok(()) };
    let cutoff = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() - keep.as_secs_f64();
    let tmp = path.with_extension("pruning");
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(&tmp).await?);
    let mut lines = tokio::io::BufReader::new(file).lines();
    let (mut kept, mut dropped) = (0u64, 0u64);
    while let Some(line) = lines.next_line().await? {
        let ts = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["ts"].as_f64());
        if ts.is_some_and(|ts| ts < cutoff) {
            dropped += 1;
            continue;
        }
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
        kept += 1;
    }
    out.flush().await?;
    tokio::fs::rename(&tmp, path).await?;
    tracing::info!(path = %path.display(), kept, dropped, "audit log pruned");
    Ok(())
}

/// Middleware: logs every request it wraps once the answer is ready.
pub async fn record(
    State((server, log)): State<(Arc<Server>, AuditLog)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
    let account = server.account_label(req.headers(), peer);
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let line = Line {
        ts: (ts * 1e6).round() / 1e6,
        account,
        method,
        path,
        status: resp.status().as_u16(),
        vins: resp.extensions().get::<VinCount>().map_or(0, |n| n.0),
        ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
    };
    let _ = log.tx.send(line).await;
    resp
}
