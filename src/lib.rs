//! vinetl: batch VIN enrichment through the Car Vin API.
//!
//! The source tree follows a job's path:
//!
//! - [`spec`]: what a job is (the TOML spec), checked on load;
//! - [`io::source`]: where its rows come from (files, S3, Postgres);
//! - [`job`]: planning, the queue, the workers and the steps a job takes to
//!   its end, with the checks made before any call;
//! - [`call`]: the Car Vin API client and the shared rate limiter;
//! - [`store`]: the state every process shares (Postgres or SQLite);
//! - [`io::output`]: where results go (Parquet, Postgres tables);
//! - [`cli`]: the commands that drive all of it; [`exit`] what they return.
//!
//! Beside it: [`serve`] (a Car Vin API-compatible server), [`ui`] (the
//! read-only jobs page over the state store), [`local`] (what
//! runs here without the API: the embedded vPIC decoder, `decode --file`,
//! `check`), and the vocabulary every part shares: [`vin`] (the one way a
//! string becomes a VIN), [`api`] (the wire format of client and server) and
//! [`columns`] (the output's columns and rows). [`prometheus`] names every
//! metric and serves them (`--metrics-addr`).

pub mod api;
pub mod calendar;
pub mod call;
pub mod cli;
pub mod columns;
pub mod exit;
pub mod io;
pub mod job;
pub mod local;
pub mod prometheus;
pub mod serve;
pub mod spec;
pub mod store;
pub mod ui;
pub mod vin;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
