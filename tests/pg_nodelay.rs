//! Every Postgres connection vinetl opens has Nagle's algorithm off
//! (TCP_NODELAY), which sqlx 0.9.0 no longer sets: with it on, a statement
//! larger than one TCP segment waits up to 40 ms for the server's delayed
//! ACK (src/store/postgres.rs, BENCHMARKS.md). A test binary of its own:
//! it reads every socket of the process.

mod common;

use std::os::fd::{BorrowedFd, RawFd};

/// TCP_NODELAY of each of this process's sockets connected to `port`.
fn nodelay_to(port: u16) -> Vec<bool> {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else { continue };
        if !std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            continue;
        }
        // SAFETY: borrowed for a peer address and one option; this test
        // opens and closes no descriptor meanwhile.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        if socket.peer_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port) {
            seen.push(socket.tcp_nodelay().unwrap());
        }
    }
    seen
}

#[tokio::test(flavor = "current_thread")]
async fn every_postgres_connection_has_nagle_off() {
    let url = common::pg_url();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    if options.get_socket().is_some() {
        eprintln!("VINETL_TEST_DATABASE_URL is a Unix socket: no TCP to check");
        return;
    }
    let port = options.get_port();
    // What sqlx does alone: if this fails, sqlx sets TCP_NODELAY again and
    // `nodelay_to_port` in src/store/postgres.rs can go.
    let plain = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    sqlx::query("SELECT 1").execute(&plain).await.unwrap();
    assert_eq!(nodelay_to(port), vec![false], "sqlx 0.9.0 leaves Nagle on");
    plain.close().await;
    assert!(nodelay_to(port).is_empty());

    let pool = vinetl::store::postgres::connect(&url, "public", 3).await.unwrap();
    let held = futures_util::future::try_join_all((0..3).map(|_| pool.acquire())).await.unwrap();
    let flags = nodelay_to(port);
    assert_eq!(flags.len(), 3, "{flags:?}");
    assert!(flags.iter().all(|on| *on), "every connection of vinetl's pool has TCP_NODELAY: {flags:?}");
    drop(held);
    pool.close().await;
}
