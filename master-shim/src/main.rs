//! `cellmaster`: the thin master of a celld cell, and its admin CLI (see
//! `cellmaster::cli::USAGE`).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(celld_trust::DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        // Colours for a person at a terminal, plain text for log files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match cellmaster::cli::run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellmaster: {}", e.message);
            ExitCode::from(e.exit as u8)
        }
    }
}
