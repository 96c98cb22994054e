//! The listening socket: refuses a live daemon's path, removes a stale
//! socket file, binds under a restrictive umask, then sets mode and group;
//! group lookups for the socket's group and the admin group.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::ServerConfig;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another daemon answers on the socket path.
    #[error("another vramd is already listening on {0}; stop it first or use another --socket")]
    AlreadyRunning(PathBuf),
    /// The path exists and is not a socket; we will not remove it.
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// The socket group does not exist.
    #[error("socket group {0:?} does not exist")]
    UnknownGroup(String),
    /// Creating, binding or setting up the socket failed.
    #[error("cannot set up socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Creates the listening socket: refuses a live daemon's path, removes a stale
/// socket file, binds under a restrictive umask, then sets mode and group.
pub fn bind_socket(config: &ServerConfig) -> Result<std::os::unix::net::UnixListener, ServerError> {
    let path = &config.socket_path;
    let sock_err = |source| ServerError::Socket {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::AlreadyRunning(path.clone())),
                Err(_) => {
                    info!(path = %path.display(), "removing stale socket file");
                    std::fs::remove_file(path).map_err(sock_err)?;
                }
            }
        }
        Ok(_) => return Err(ServerError::NotASocket(path.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(sock_err)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(sock_err)?;
        }
    }
    let gid = match &config.socket_group {
        Some(name) => Some(group_id(name).ok_or_else(|| ServerError::UnknownGroup(name.clone()))?),
        None => None,
    };
    // Bind under umask 0177 so the socket never exists with wider permissions
    // than the owner's, then widen it to the configured mode.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(sock_err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(sock_err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(sock_err)?;
    listener.set_nonblocking(true).map_err(sock_err)?;
    Ok(listener)
}

pub(crate) fn group_id(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam returns a pointer to static storage or null; we read
    // one field immediately and keep no reference.
    let grp = unsafe { libc::getgrnam(cname.as_ptr()) };
    if grp.is_null() {
        None
    } else {
        // SAFETY: non-null pointer from getgrnam, read before any other call.
        Some(unsafe { (*grp).gr_gid })
    }
}

/// Whether process `pid` (primary group `gid`) is in group `group`, from
/// its supplementary groups in /proc.
pub(crate) fn in_group(pid: u32, gid: u32, group: u32) -> bool {
    if gid == group {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Groups:"))
                .map(|l| l.split_whitespace().skip(1).any(|g| g.parse() == Ok(group)))
        })
        .unwrap_or(false)
}
/// Raises the soft limit on open files to the hard limit (every client
/// connection is a descriptor). Returns the soft limit before and after.
pub(crate) fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur == lim.rlim_max {
        return Ok((before, before));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads one rlimit struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, lim.rlim_max))
}

/// Removes the socket file; a missing one is fine.
pub(crate) fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove socket file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_membership_counts_the_primary_and_supplementary_groups() {
        assert!(in_group(std::process::id(), 12345, 12345));
        assert!(!in_group(std::process::id(), 12345, 54321));
        assert_eq!(group_id("0"), Some(0));
        assert_eq!(group_id("no-such-group-vramd"), None);
    }
}
