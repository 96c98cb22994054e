//! `vramctl`: look at and use vramd from the shell.
//!
//! - `vramctl status [--json]`: devices, reservations, queue, counters;
//! - `vramctl ps [--json]`: every process using GPU memory and what it
//!   counts against;
//! - `vramctl top [--interval 1s] [--once]`: a live view, refreshed in place
//!   on a terminal;
//! - `vramctl reserve 8GiB [--json]`: hold a reservation until Ctrl-C or SIGTERM;
//! - `vramctl run --vram 8GiB [--json] [--enforce] -- CMD ARGS...`: run a
//!   command inside a reservation, with `CUDA_VISIBLE_DEVICES` pointing at the
//!   granted device (and with `--enforce`, capped there through NVIDIA MPS);
//! - `vramctl completions SHELL`, `vramctl man [--dir DIR]`: shell
//!   completions and man pages.
//!
//! It speaks to the daemon through the blocking `vramd-client` SDK only: no
//! async runtime, no HTTP client, no NVML. Every failure has its own exit
//! status ([`exit`], listed in `vramctl --help`).

mod blocked;
mod cli;
mod exit;
mod hold;
mod mps;
mod ps;
mod signals;
mod status;
mod top;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use vramd_client::{Client, Error};
use vramd_protocol::paths;

use crate::cli::{Cli, Cmd};
use crate::exit::{EXIT_USAGE, Failure};
use crate::hold::Report;
use crate::mps::{MpsServer, Unusable};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    let socket = cli.socket.clone().unwrap_or_else(paths::client_socket_path);
    let report = Report {
        json: match &cli.command {
            Cmd::Reserve { opts, .. } | Cmd::Run { opts, .. } => opts.json,
            _ => false,
        },
    };
    match run(cli, &socket, report) {
        Ok(code) => code,
        Err(e) => {
            let failure = Failure::of(&e);
            let message = exit::message(&e, &socket);
            let status = failure.exit_status();
            report.error(failure, &message, status);
            eprintln!("vramctl: {message}");
            ExitCode::from(status)
        }
    }
}

/// Carries out one command against the daemon at `socket`.
fn run(cli: Cli, socket: &Path, report: Report) -> Result<ExitCode, Error> {
    match cli.command {
        Cmd::Status { json } => {
            let status = Client::connect(socket)?.status()?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| Error::Protocol(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{}", status::render(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ps { json } => {
            let status = Client::connect(socket)?.status()?;
            let rows = ps::rows(&status, &ps::Local);
            if json {
                println!("{}", ps::to_json(&rows));
            } else {
                print!("{}", ps::render(&status, &rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Top { interval, once } => top::run(socket, interval, once),
        Cmd::Reserve {
            size,
            evictable,
            opts,
        } => hold::reserve(
            socket,
            opts.request(size),
            evictable,
            opts.reconnect_for,
            report,
        ),
        Cmd::Run {
            vram,
            opts,
            enforce,
            on_daemon_loss,
            command,
        } => {
            // Checked before reserving: an unusable server refuses at once.
            let mps = if enforce.enforce {
                let server = match &enforce.mps_pipe_dir {
                    Some(dir) => MpsServer {
                        pipe_dir: dir.clone(),
                        log_dir: enforce.mps_log_dir.clone(),
                    },
                    None => match Client::connect(socket)?.status()?.mps {
                        Some(m) => MpsServer {
                            pipe_dir: m.pipe_dir.into(),
                            log_dir: m.log_dir.map(Into::into),
                        },
                        None => {
                            return Ok(hold::refuse_unenforced(&Unusable::NoneGiven, report));
                        }
                    },
                };
                if let Err(why) = server.check() {
                    return Ok(hold::refuse_unenforced(&why, report));
                }
                Some(server)
            } else {
                None
            };
            let loss = hold::Loss {
                reconnect_for: opts.reconnect_for,
                on_loss: on_daemon_loss,
            };
            hold::run(
                socket,
                opts.request(vram),
                mps.as_ref(),
                &command,
                loss,
                report,
            )
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "vramctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => man(dir.as_deref()),
    }
}

/// `vramctl man`: prints vramctl.1, or writes every page into `dir`.
fn man(dir: Option<&Path>) -> Result<ExitCode, Error> {
    let cmd = Cli::command();
    match dir {
        None => {
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd, dir)?;
            let mut written: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("vramctl") && n.ends_with(".1"))
                })
                .collect();
            written.sort();
            for page in written {
                println!("{}", page.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
