//! How `vinetl serve` takes connections: a capped number at once, each with
//! a deadline for its request head (hyper's `header_read_timeout`) and for
//! its body (tower-http's `RequestBodyDeadlineLayer`, set in the router), so
//! that slow or idle clients cannot hold sockets, tasks or file descriptors.
//!
//! `axum::serve` has no connection cap and sets no header timeout, so this is
//! its accept loop again (as axum's `serve-with-hyper` example does it), on
//! hyper's HTTP/1 server (the runner's client speaks HTTP/1 only) and
//! hyper-util's graceful shutdown.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::Args;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::ApiFailure;
use crate::api::{ApiError, ErrorResponse, code};

/// The connection limits of `vinetl serve`, as flags.
#[derive(Debug, Clone, Copy, Args)]
pub struct ConnLimits {
    /// Connections served at once. Beyond it a few more are answered 503
    /// (JSON, `Retry-After: 1`) and the rest closed at once. The default
    /// stays well under the usual 1024 open-files limit.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request head (and may sit
    /// idle between requests) before it is closed. A real client sends its
    /// head in milliseconds; 10 s allows for slow links.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a request body may take to arrive in full before the request
    /// is answered 408. Bodies are at most 64 KiB.
    #[arg(long, default_value_t = 10)]
    pub body_timeout_secs: u64,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits { max_connections: 512, header_timeout_secs: 10, body_timeout_secs: 10 }
    }
}

impl ConnLimits {
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs.max(1))
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs.max(1))
    }
}

/// Connections over the cap that still get a 503 rather than a bare close,
/// each for at most [`OVERFLOW_DEADLINE`]: a small fixed pool, so answering
/// the overflow cannot itself exhaust file descriptors.
const OVERFLOW_ANSWERS: usize = 64;
const OVERFLOW_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `app` on `listener` until `stop` resolves, then stops accepting and
/// waits for the connections in flight to finish their requests.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    stop: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let served = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_ANSWERS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Unvectored writes, so that `JsonRefusals` sees each automatic error
    // answer whole in one write.
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout()).writev(false);
    let mut busy_http = http.clone();
    busy_http.header_read_timeout(OVERFLOW_DEADLINE).keep_alive(false);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors (EMFILE) or a connection reset
                    // before it was accepted: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(JsonRefusals::new(stream));
        if let Ok(permit) = Arc::clone(&served).try_acquire_owned() {
            let app = app.clone();
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
            let conn = graceful.watch(http.serve_connection(io, svc));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                drop(permit);
            });
        } else if let Ok(permit) = Arc::clone(&overflow).try_acquire_owned() {
            tracing::debug!(%peer, "over --max-connections: 503");
            let conn = busy_http.serve_connection(io, hyper::service::service_fn(busy));
            tokio::spawn(async move {
                let _ = tokio::time::timeout(OVERFLOW_DEADLINE, conn).await;
                drop(permit);
            });
        } else {
            tracing::debug!(%peer, "over --max-connections and the 503 pool: closed");
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn busy(_: Request<Incoming>) -> Result<Response, Infallible> {
    let mut resp =
        ApiFailure::new(StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED, "too many connections; retry in a second")
            .into_response();
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Ok(resp)
}

/// The socket as hyper sees it, except that hyper's automatic answers to
/// requests it cannot parse (an empty `400`, `414` or `431`: a malformed
/// `Content-Length`, a bad request line, headers too large) go out as the
/// API's JSON error instead.
///
/// Hand-written because hyper has no hook for these answers (they are built
/// in `proto::h1::role::Server::on_error`); the handlers' own error answers
/// always carry a JSON body, so a bodiless one of these statuses can only be
/// hyper's.
pub(super) struct JsonRefusals<S> {
    inner: S,
    /// The JSON answer being written in place of hyper's, how much of it
    /// is out, and the length of hyper's buffer it replaces.
    swap: Option<(Vec<u8>, usize, usize)>,
}

impl<S> JsonRefusals<S> {
    pub(super) fn new(inner: S) -> Self {
        JsonRefusals { inner, swap: None }
    }
}

/// The JSON answer replacing hyper's automatic one in `head`, if it is one.
fn refusal_for(head: &[u8]) -> Option<Vec<u8>> {
    let status = head.strip_prefix(b"HTTP/1.1 ").or_else(|| head.strip_prefix(b"HTTP/1.0 "))?.get(..3)?;
    let (line, message) = match status {
        b"400" => (
            "400 Bad Request",
            "malformed HTTP request: the request line or a header (such as Content-Length) is invalid",
        ),
        b"414" => ("414 URI Too Long", "the request URI is too long"),
        b"431" => ("431 Request Header Fields Too Large", "the request headers are too large"),
        _ => return None,
    };
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let lower = head[..end + 2].to_ascii_lowercase();
    if !lower.windows(19).any(|w| w == b"\r\ncontent-length: 0") || head.len() != end + 4 {
        return None;
    }
    let body = serde_json::to_vec(&ErrorResponse {
        success: false,
        error: ApiError { code: code::INVALID_REQUEST.into(), message: message.into() },
    })
    .expect("an error body serialises");
    let mut out = format!(
        "HTTP/1.1 {line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonRefusals<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRefusals<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.swap.is_none()
            && let Some(json) = refusal_for(buf)
        {
            this.swap = Some((json, 0, buf.len()));
        }
        if let Some((json, sent, replaces)) = &mut this.swap {
            while *sent < json.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &json[*sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
            }
            let replaces = *replaces;
            this.swap = None;
            return Poll::Ready(Ok(replaces));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_parse_error_answers_are_rewritten() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2026 00:00:00 GMT\r\n\r\n";
        let json = String::from_utf8(refusal_for(hyper_400).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"), "{json}");
        let body: ErrorResponse = serde_json::from_str(json.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body.error.code, code::INVALID_REQUEST);
        assert!(refusal_for(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n").is_some());
        // The API's own answers carry a body, and are left alone.
        assert!(refusal_for(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 57\r\n\r\n{\"success\":false}").is_none());
        assert!(refusal_for(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
