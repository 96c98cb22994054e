//! `vramd`: the GPU memory arbiter daemon. Parses its arguments, sets up
//! logging and runs [`vramd::start::run`].

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;
use vramd::start::{Args, run};

fn main() -> ExitCode {
    let args = Args::parse_with_defaults();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vramd: {e}");
            ExitCode::from(2)
        }
    }
}
