use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("VINETL_LOG").unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match vinetl::cli::Cli::parse().run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vinetl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
