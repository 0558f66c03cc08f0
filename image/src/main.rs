//! The `cellimg` binary: parses the command line and runs the build.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source_date_epoch = std::env::var("SOURCE_DATE_EPOCH").ok();
    match cellimg::cli::run(&args, source_date_epoch.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cellimg: {err:#}");
            ExitCode::FAILURE
        }
    }
}
