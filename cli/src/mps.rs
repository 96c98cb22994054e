//! `vramctl run --enforce`: the NVIDIA MPS server a command runs under, and
//! the environment that caps its device memory at the reservation.
//!
//! An MPS control daemon (`nvidia-cuda-mps-control -d`) creates the named
//! pipe `control` in its pipe directory (`CUDA_MPS_PIPE_DIRECTORY`); a server
//! is usable when that directory holds a FIFO named `control`. A client
//! started with `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="0=4096M"` and the same
//! pipe directory gets CUDA out-of-memory errors past 4096 MiB on its device
//! 0 — the first (and, under `run`, only) device in its
//! `CUDA_VISIBLE_DEVICES`. The limit is read when the command starts: a
//! reservation that grows later cannot raise it.

use std::path::{Path, PathBuf};

/// The MPS server a command is enforced through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsServer {
    /// Its pipe directory (`CUDA_MPS_PIPE_DIRECTORY`).
    pub pipe_dir: PathBuf,
    /// Its log directory (`CUDA_MPS_LOG_DIRECTORY`), when known.
    pub log_dir: Option<PathBuf>,
}

/// Why a command cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// No MPS server was named, and vramd reports none.
    NoneGiven,
    /// The pipe directory has no control pipe (`why` says what is there).
    NoControlPipe {
        /// The pipe directory.
        pipe_dir: PathBuf,
        /// What was found instead.
        why: String,
    },
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::NoneGiven => write!(
                f,
                "--enforce needs an NVIDIA MPS server and vramd reports none: start vramd \
                 with --mps, or give --mps-pipe-dir DIR (or VRAMD_MPS_PIPE_DIRECTORY) naming \
                 the pipe directory of a running nvidia-cuda-mps-control -d; the command was \
                 not run"
            ),
            Unusable::NoControlPipe { pipe_dir, why } => write!(
                f,
                "--enforce: no MPS server at {}: {why} (is nvidia-cuda-mps-control -d \
                 running with CUDA_MPS_PIPE_DIRECTORY={}?); the command was not run",
                pipe_dir.display(),
                pipe_dir.display()
            ),
        }
    }
}

impl MpsServer {
    /// Checks that the server's control pipe is there and live.
    pub fn check(&self) -> Result<(), Unusable> {
        check_pipe_dir(&self.pipe_dir)
    }

    /// The environment that runs a command under this server with its
    /// memory on device ordinal 0 capped at `bytes` (in MiB, rounded down).
    pub fn env(&self, bytes: u64) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", pinned_limit(0, bytes)),
            (
                "CUDA_MPS_PIPE_DIRECTORY",
                self.pipe_dir.display().to_string(),
            ),
        ];
        if let Some(log) = &self.log_dir {
            env.push(("CUDA_MPS_LOG_DIRECTORY", log.display().to_string()));
        }
        env
    }
}

/// Whether `pipe_dir` holds a live MPS control pipe (see
/// [`vramd_protocol::mps::control_problem`]).
pub fn check_pipe_dir(pipe_dir: &Path) -> Result<(), Unusable> {
    match vramd_protocol::mps::control_problem(pipe_dir) {
        None => Ok(()),
        Some(why) => Err(Unusable::NoControlPipe {
            pipe_dir: pipe_dir.to_path_buf(),
            why,
        }),
    }
}

/// `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` for `bytes` on device `ordinal`:
/// `"0=8192M"` (MiB, rounded down so the cap never exceeds the reservation).
pub fn pinned_limit(ordinal: u32, bytes: u64) -> String {
    format!("{ordinal}={}M", limit_bytes(bytes) / (1024 * 1024))
}

/// The limit a command gets for a reservation of `bytes`: whole MiB,
/// rounded down.
pub fn limit_bytes(bytes: u64) -> u64 {
    bytes / (1024 * 1024) * (1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramd_protocol::mps::CONTROL as CONTROL_PIPE;

    #[test]
    fn the_limit_is_in_mib_rounded_down() {
        assert_eq!(pinned_limit(0, 8 << 30), "0=8192M");
        assert_eq!(pinned_limit(0, (4 << 30) + (1 << 20) - 1), "0=4096M");
        assert_eq!(pinned_limit(1, 1 << 20), "1=1M");
    }

    #[test]
    fn a_pipe_dir_needs_a_control_fifo() {
        let dir = std::env::temp_dir().join(format!("vramctl-mps-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = MpsServer {
            pipe_dir: dir.clone(),
            log_dir: None,
        };
        assert!(matches!(
            server.check(),
            Err(Unusable::NoControlPipe { .. })
        ));
        // A regular file is not the control pipe.
        std::fs::write(dir.join(CONTROL_PIPE), b"").unwrap();
        assert!(matches!(
            server.check(),
            Err(Unusable::NoControlPipe { .. })
        ));
        std::fs::remove_file(dir.join(CONTROL_PIPE)).unwrap();
        let c =
            std::ffi::CString::new(dir.join(CONTROL_PIPE).as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(server.check(), Ok(()));
        let missing = MpsServer {
            pipe_dir: dir.join("nope"),
            log_dir: None,
        };
        assert!(missing.check().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_environment_names_the_server_and_the_cap() {
        let s = MpsServer {
            pipe_dir: "/run/mps/pipe".into(),
            log_dir: Some("/run/mps/log".into()),
        };
        let env = s.env(8 << 30);
        assert!(env.contains(&("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "0=8192M".into())));
        assert!(env.contains(&("CUDA_MPS_PIPE_DIRECTORY", "/run/mps/pipe".into())));
        assert!(env.contains(&("CUDA_MPS_LOG_DIRECTORY", "/run/mps/log".into())));
    }
}
