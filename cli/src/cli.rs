//! The command line: subcommands, flags and how they become a [`Request`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vramd_client::{DeviceSelector, Request};
use vramd_protocol::{parse_duration, parse_size};

/// Look at and use the vramd GPU memory arbiter.
#[derive(Debug, Parser)]
#[command(name = "vramctl", version, about)]
pub struct Cli {
    /// Socket of the daemon [default: $VRAMD_SOCKET, else
    /// $XDG_RUNTIME_DIR/vramd.sock if it exists, else /run/vramd/vramd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Show devices, reservations, the wait queue and counters.
    Status {
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Reserve memory and hold it until Ctrl-C or SIGTERM.
    Reserve {
        /// How much, e.g. 8GiB, 512MiB, 8GB.
        #[arg(value_parser = parse_size, value_name = "SIZE")]
        size: u64,
        /// Hold it idle: when a waiter needs the room and the daemon asks,
        /// print the request and release (exit 0).
        #[arg(long)]
        evictable: bool,
        #[command(flatten)]
        opts: ReserveOpts,
    },
    /// Run a command inside a reservation; release when it ends.
    Run {
        /// How much, e.g. 8GiB.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        vram: u64,
        #[command(flatten)]
        opts: ReserveOpts,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
}

/// The options `reserve` and `run` share.
#[derive(Debug, Args)]
pub struct ReserveOpts {
    /// Device: any, an index (0), or a UUID (GPU-…).
    #[arg(long, default_value = "any")]
    device: DeviceSelector,
    /// Priority: higher is granted first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Label shown in status.
    #[arg(long)]
    label: Option<String>,
    /// Longest wait, e.g. 30s, 2m; by default wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

impl ReserveOpts {
    /// The request for `bytes` with these options.
    pub fn request(&self, bytes: u64) -> Request {
        let mut r = Request::new(bytes)
            .device(self.device.clone())
            .priority(self.priority);
        if let Some(l) = &self.label {
            r = r.label(l.clone());
        }
        if let Some(t) = self.timeout {
            r = r.timeout(t);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
