//! Whether an NVIDIA MPS server is usable, from its pipe directory: the
//! check `vramctl run --enforce` makes before it runs a command and the
//! daemon makes each time it reports the server in status.
//!
//! The MPS control daemon (`nvidia-cuda-mps-control -d`) makes `control` in
//! its pipe directory: a Unix socket on current drivers (checked on an H100
//! with a CUDA 13 driver), a named pipe on older ones. The socket file stays
//! behind after `quit`, while `nvidia-cuda-mps-control.pid` beside it goes, so
//! a socket counts only with that pid file naming a live process.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// The control endpoint the control daemon makes in its pipe directory.
pub const CONTROL: &str = "control";
/// The control daemon's pid file in its pipe directory.
pub const PID_FILE: &str = "nvidia-cuda-mps-control.pid";

/// What is wrong with the MPS server whose pipe directory is `pipe_dir`;
/// `None` when it is usable. A few `stat`s and one small read, no
/// connection to the server.
pub fn control_problem(pipe_dir: &Path) -> Option<String> {
    match std::fs::metadata(pipe_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Some(format!("{} is not a directory", pipe_dir.display())),
        Err(e) => return Some(format!("{}: {e}", pipe_dir.display())),
    }
    let control = pipe_dir.join(CONTROL);
    let kind = match std::fs::metadata(&control) {
        Ok(m) => m.file_type(),
        Err(e) => return Some(format!("no control pipe {}: {e}", control.display())),
    };
    if kind.is_fifo() {
        return None;
    }
    if !kind.is_socket() {
        return Some(format!(
            "{} is neither a named pipe nor a socket",
            control.display()
        ));
    }
    let pid = std::fs::read_to_string(pipe_dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match pid {
        Some(pid) if Path::new("/proc").join(pid.to_string()).exists() => None,
        _ => Some(format!(
            "{} is left by a control daemon that stopped (no live pid in {PID_FILE})",
            control.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn a_fifo_control_pipe_is_usable_and_a_missing_one_is_not() {
        let dir = tempdir("fifo");
        assert!(control_problem(&dir.join("missing")).is_some());
        assert!(control_problem(&dir).unwrap().contains("no control pipe"));
        std::fs::write(dir.join(CONTROL), b"").unwrap();
        assert!(control_problem(&dir).unwrap().contains("neither"));
        std::fs::remove_file(dir.join(CONTROL)).unwrap();
        mkfifo(&dir.join(CONTROL));
        assert_eq!(control_problem(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_control_socket_counts_only_with_a_live_pid_file() {
        let dir = tempdir("socket");
        let _listener = UnixListener::bind(dir.join(CONTROL)).unwrap();
        // As after `quit`: the socket stays, the pid file is gone.
        assert!(control_problem(&dir).unwrap().contains("stopped"));
        std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(control_problem(&dir), None);
        // A pid file naming a process that is gone.
        std::fs::write(dir.join(PID_FILE), "4294967\n").unwrap();
        assert!(control_problem(&dir).unwrap().contains("stopped"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir(what: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vramd-protocol-mps-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
