//! `vramctl`: look at and use vramd from the shell.
//!
//! - `vramctl status [--json]`: devices, reservations, queue, counters;
//! - `vramctl reserve 8GiB`: hold a reservation until Ctrl-C or SIGTERM;
//! - `vramctl run --vram 8GiB -- CMD ARGS...`: run a command inside a
//!   reservation, with `CUDA_VISIBLE_DEVICES` pointing at the granted device.
//!
//! It speaks to the daemon through the blocking `vramd-client` SDK only: no
//! async runtime, no HTTP client, no NVML.

mod cli;
mod hold;
mod signals;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vramd_client::{Client, Error};
use vramd_protocol::paths;

use crate::cli::{Cli, Cmd};

/// Exit status when the wait limit passed (EX_TEMPFAIL).
const EXIT_TIMEOUT: u8 = 75;
/// Exit status when the daemon is not reachable or refuses (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket.clone().unwrap_or_else(paths::client_socket_path);
    match run(cli, socket) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vramctl: {e}");
            ExitCode::from(match e {
                Error::WaitTimeout(_) => EXIT_TIMEOUT,
                Error::NotRunning { .. } | Error::Disconnected | Error::Refused(_) => {
                    EXIT_UNAVAILABLE
                }
                _ => 1,
            })
        }
    }
}

/// Carries out one command against the daemon at `socket`.
fn run(cli: Cli, socket: PathBuf) -> Result<ExitCode, Error> {
    match cli.command {
        Cmd::Status { json } => {
            let status = Client::connect(&socket)?.status()?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reserve {
            size,
            evictable,
            opts,
        } => hold::reserve(&socket, opts.request(size), evictable),
        Cmd::Run {
            vram,
            opts,
            command,
        } => hold::run(&socket, opts.request(vram), &command),
    }
}
