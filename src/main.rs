use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vinetl::cli::LogFormat;

/// mimalloc, not glibc's allocator: an output streams rows allocated on one
/// thread and freed on another, and glibc's arenas then spend the write in
/// `malloc_consolidate` and arena-lock waits (a third of the warm job's CPU
/// under `perf`; the figures are in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let cli = vinetl::cli::Cli::parse();
    let filter =
        EnvFilter::try_from_env("VINETL_LOG").unwrap_or_else(|_| EnvFilter::new("warn,vinetl=info,sqlx::query=error"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => {
            // https://no-color.org: set and not empty means no colour.
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            logs.with_ansi(std::io::stderr().is_terminal() && !no_color).init();
        }
    }
    match cli.run().await {
        Ok(code) => code,
        Err(e) => vinetl::exit::fail(&e),
    }
}
