//! The NVIDIA MPS server that `vramctl run --enforce` caps commands through.
//!
//! With `vramd --mps` the daemon owns one: after it bound its socket it
//! starts the MPS control daemon (`nvidia-cuda-mps-control -d`) with its pipe
//! and log directories beside the socket (`<socket dir>/mps/pipe`,
//! `<socket dir>/mps/log`), and stops it (`quit` on the control program's
//! stdin, same environment) when it stops — [`MpsGuard`] does that on every
//! way out. A control pipe already there at start (a control daemon left by
//! an earlier vramd that died) is adopted and stopped the same way. With
//! `vramd --mps-pipe-dir DIR` the administrator runs it; the daemon only
//! reports it. Either way [`MpsWatch::status`] says, each time the status
//! is asked, whether its control pipe is live
//! ([`vramd_protocol::mps::control_problem`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vramd_protocol::MpsStatus;

/// The MPS control program, looked up on `PATH`.
pub const CONTROL_PROGRAM: &str = "nvidia-cuda-mps-control";
/// How long a started control daemon has to create its control pipe.
const START_WAIT: Duration = Duration::from_secs(5);

/// Why the MPS server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    /// A directory could not be created.
    #[error("--mps: cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The control program could not be run.
    #[error(
        "--mps: cannot run {CONTROL_PROGRAM}: {source} (it comes with the NVIDIA driver; \
         install it or start vramd without --mps)"
    )]
    Spawn {
        /// The OS error.
        source: std::io::Error,
    },
    /// The control program failed or made no control pipe.
    #[error("--mps: {0}")]
    Failed(String),
}

/// What the status says about the MPS server (cheap to clone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsWatch {
    /// Its pipe directory.
    pub pipe_dir: PathBuf,
    /// Its log directory, when known.
    pub log_dir: Option<PathBuf>,
    /// Who runs it (shown while healthy).
    pub runner: &'static str,
}

impl MpsWatch {
    /// One the administrator runs with pipe directory `pipe_dir`.
    pub fn external(pipe_dir: PathBuf) -> MpsWatch {
        MpsWatch {
            pipe_dir,
            log_dir: None,
            runner: "run by the administrator (--mps-pipe-dir)",
        }
    }

    /// Its status now: healthy iff the control pipe exists.
    pub fn status(&self) -> MpsStatus {
        let problem = control_pipe_problem(&self.pipe_dir);
        MpsStatus {
            pipe_dir: self.pipe_dir.display().to_string(),
            log_dir: self.log_dir.as_ref().map(|d| d.display().to_string()),
            healthy: problem.is_none(),
            note: Some(problem.unwrap_or_else(|| self.runner.to_string())),
        }
    }
}

/// What is wrong with the MPS server in `pipe_dir`, if anything (its
/// control pipe or socket is missing, or left by a stopped control daemon).
pub fn control_pipe_problem(pipe_dir: &Path) -> Option<String> {
    vramd_protocol::mps::control_problem(pipe_dir)
}

/// The MPS control daemon vramd started (or adopted); stopped when dropped.
#[derive(Debug)]
pub struct MpsGuard {
    watch: MpsWatch,
}

impl MpsGuard {
    /// Starts the control daemon with its directories under `runtime_dir`
    /// (`mps/pipe`, `mps/log`) and waits until its control pipe exists.
    pub fn start(runtime_dir: &Path) -> Result<MpsGuard, MpsError> {
        let pipe_dir = runtime_dir.join("mps").join("pipe");
        let log_dir = runtime_dir.join("mps").join("log");
        for dir in [&pipe_dir, &log_dir] {
            std::fs::create_dir_all(dir).map_err(|source| MpsError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut watch = MpsWatch {
            pipe_dir,
            log_dir: Some(log_dir),
            runner: "started by vramd (--mps)",
        };
        if control_pipe_problem(&watch.pipe_dir).is_none() {
            watch.runner = "adopted by vramd (--mps): it was running at start";
            tracing::warn!(pipe_dir = %watch.pipe_dir.display(),
                "an MPS control daemon was already running there; adopting it, it stops with vramd");
            return Ok(MpsGuard { watch });
        }
        let status = control_command(&watch)
            .arg("-d")
            .stdin(Stdio::null())
            .status()
            .map_err(|source| MpsError::Spawn { source })?;
        // From here on, every way out stops what may have started.
        let guard = MpsGuard { watch };
        if !status.success() {
            return Err(MpsError::Failed(format!(
                "{CONTROL_PROGRAM} -d failed ({status}); see its log in {}",
                guard.log_dir_display()
            )));
        }
        let deadline = Instant::now() + START_WAIT;
        while let Some(problem) = control_pipe_problem(&guard.watch.pipe_dir) {
            if Instant::now() >= deadline {
                return Err(MpsError::Failed(format!(
                    "{CONTROL_PROGRAM} -d started but made no control pipe within {}s ({problem}); \
                     see its log in {}",
                    START_WAIT.as_secs(),
                    guard.log_dir_display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(pipe_dir = %guard.watch.pipe_dir.display(),
            log_dir = %guard.log_dir_display(), "MPS control daemon started");
        Ok(guard)
    }

    /// What the status reports about it.
    pub fn watch(&self) -> MpsWatch {
        self.watch.clone()
    }

    fn log_dir_display(&self) -> String {
        self.watch
            .log_dir
            .as_ref()
            .map_or_else(String::new, |d| d.display().to_string())
    }
}

impl Drop for MpsGuard {
    fn drop(&mut self) {
        let stopped = control_command(&self.watch)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(b"quit\n")?;
                }
                child.wait()
            });
        match stopped {
            Ok(status) if status.success() => {
                tracing::info!(pipe_dir = %self.watch.pipe_dir.display(), "MPS control daemon stopped")
            }
            Ok(status) => {
                tracing::warn!(pipe_dir = %self.watch.pipe_dir.display(), %status, "MPS control daemon: quit failed")
            }
            Err(e) => {
                tracing::warn!(pipe_dir = %self.watch.pipe_dir.display(), error = %e, "MPS control daemon: cannot ask it to quit")
            }
        }
    }
}

/// The control program with the server's directories in its environment.
fn control_command(watch: &MpsWatch) -> Command {
    let mut cmd = Command::new(CONTROL_PROGRAM);
    cmd.env("CUDA_MPS_PIPE_DIRECTORY", &watch.pipe_dir);
    if let Some(log) = &watch.log_dir {
        cmd.env("CUDA_MPS_LOG_DIRECTORY", log);
    }
    cmd
}
