//! `vramd-gateway --config FILE`: see docs/gateway.md.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// An HTTP gateway that reserves GPU memory through vramd before an app
/// (Ollama, an OpenAI-compatible server) loads a model.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The configuration file (TOML; see docs/gateway.md).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter;
    /// `RUST_LOG` overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .context("invalid --log-level")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let settings = vramd_gateway::Settings::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(vramd_gateway::run(settings))?;
    Ok(())
}
