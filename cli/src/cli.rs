//! The command line: subcommands, flags and how they become a [`Request`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vramd_client::{DeviceSelector, Request};
use vramd_protocol::{parse_duration, parse_size};

/// The exit statuses, as `--help` lists them.
pub const EXIT_STATUSES_HELP: &str = "\
Exit statuses:
  0    success (run: the command's own status; 126/127: it could not be started)
  1    another error (I/O or protocol error talking to vramd)
  64   usage error: a wrong argument, e.g. a size without a unit
  65   request refused by vramd: it can never fit, zero bytes, a per-user limit
  69   vramd unreachable: not running at the socket path, or the connection was lost;
       reserve (and run --on-daemon-loss kill): the daemon went away and the
       reservation could not be reclaimed (--reconnect-for passed, or refused)
  75   the wait limit (--timeout) passed before the grant; run's command never ran
  77   permission denied on the socket: ask to be added to its group
  78   run --enforce: no usable NVIDIA MPS server; the command never ran
  130  interrupted (SIGINT/SIGTERM) while waiting; the request was withdrawn";

/// Look at and use the vramd GPU memory arbiter.
#[derive(Debug, Parser)]
#[command(name = "vramctl", version, about, after_help = EXIT_STATUSES_HELP)]
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
    /// Show every process using GPU memory: pid, user, command, device,
    /// bytes, and the reservation it counts against (or unattributed).
    Ps {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of devices, processes, reservations, the queue and
    /// recent events, refreshed in place on a terminal (plain text once per
    /// refresh elsewhere) until Ctrl-C.
    Top {
        /// Time between refreshes, e.g. 1s, 500ms.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
    },
    /// Reserve memory and hold it until Ctrl-C or SIGTERM.
    Reserve {
        /// How much, with a unit: 8GiB (or 8Gi), 512MiB, 8GB, 4096B.
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
        /// How much, with a unit: 8GiB (or 8Gi), 512MiB, 8GB, 4096B.
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        vram: u64,
        #[command(flatten)]
        opts: ReserveOpts,
        #[command(flatten)]
        enforce: EnforceOpts,
        /// If the reservation is lost while the command runs (the daemon
        /// went away and did not give it back within --reconnect-for):
        /// `warn` says so on stderr and lets the command run on, exiting
        /// with its status; `kill` also sends the command SIGTERM and exits
        /// 69.
        #[arg(long, value_name = "WHAT", default_value = "warn")]
        on_daemon_loss: OnDaemonLoss,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print a shell completion script, e.g.
    /// `vramctl completions bash > /etc/bash_completion.d/vramctl`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (vramctl.1), or write vramctl.1 and one page per
    /// subcommand (vramctl-reserve.1, ...) into a directory.
    Man {
        /// Write the pages into this directory instead of printing vramctl.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// What `run` does when its reservation is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnDaemonLoss {
    /// Say so on stderr (and as a `lost` JSON event); the command runs on.
    Warn,
    /// Say so, and send the command SIGTERM; vramctl exits 69.
    Kill,
}

/// A refresh interval: a duration of at least 50 ms.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(50) {
        return Err(format!("{s} is too short: at least 50ms"));
    }
    Ok(d)
}

/// `run`'s hard limit through NVIDIA MPS.
#[derive(Debug, Args)]
pub struct EnforceOpts {
    /// Cap the command's device memory at the reservation through NVIDIA
    /// MPS (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT): its allocations past the
    /// reserved size fail with CUDA out-of-memory. Refuses (exit 78) before
    /// reserving when no MPS server is usable; never runs the command
    /// unenforced.
    #[arg(long)]
    pub enforce: bool,
    /// With --enforce: the pipe directory of the MPS server to enforce
    /// through (where `nvidia-cuda-mps-control -d` made its `control` pipe)
    /// [default: the one vramd reports in status (vramd --mps)].
    #[arg(long, env = "VRAMD_MPS_PIPE_DIRECTORY", value_name = "DIR")]
    pub mps_pipe_dir: Option<PathBuf>,
    /// With --enforce: the MPS server's log directory, passed on as
    /// CUDA_MPS_LOG_DIRECTORY.
    #[arg(long, env = "VRAMD_MPS_LOG_DIRECTORY", value_name = "DIR")]
    pub mps_log_dir: Option<PathBuf>,
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
    /// Print events as JSON, one object per line on stdout (queued, blocked,
    /// granted, evicted, released, lost, exited, error) instead of messages.
    #[arg(long)]
    pub json: bool,
    /// When the connection to the daemon is lost (it stopped or
    /// restarted), how long to try to reach it again and reclaim the
    /// reservation before it counts as lost.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub reconnect_for: Duration,
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
