//! vinetl: batch VIN enrichment through the Car Vin API.
//!
//! The library holds every subcommand; the `vinetl` binary only parses
//! arguments. Start at [`vin::Vin`] (the one way a string becomes a VIN),
//! [`api`] (the wire format shared by client and server) and [`cli`] (what
//! each command does).

pub mod api;
pub mod check;
pub mod cli;
pub mod client;
pub mod decoder;
pub mod distinct;
pub mod exit;
pub mod finish;
pub mod limiter;
pub mod offline;
pub mod output;
pub mod planner;
pub mod preflight;
pub mod queue;
pub mod runner;
pub mod s3;
pub mod serve;
pub mod source;
pub mod spec;
pub mod store;
pub mod vin;
pub mod worker;

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
