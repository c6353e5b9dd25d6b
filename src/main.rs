use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // corgi-rs reads its tables from MAPS_DIR or $HOME/.corgi-rs-cache only;
    // point it at the copy this binary finds (a packaged binary carries its
    // own). Set before any thread starts, the only time set_var is sound.
    if let Some(dir) = vinetl::local::decoder::tables_dir() {
        // SAFETY: no other thread exists yet; the runtime is built below.
        unsafe { std::env::set_var("MAPS_DIR", dir) };
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime").block_on(run())
}

async fn run() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VINETL_LOG").unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match vinetl::cli::Cli::parse().run().await {
        Ok(code) => code,
        Err(e) => vinetl::exit::fail(&e),
    }
}
