//! Where the socket lives.
//!
//! Clients and the daemon resolve the socket path the same way:
//! an explicit path (`--socket`), else the `VRAMD_SOCKET` environment variable,
//! else a default that depends on who runs the daemon:
//!
//! - a system daemon (run as root) listens on [`SYSTEM_SOCKET`];
//! - a daemon run by a normal user listens on `$XDG_RUNTIME_DIR/vramd.sock`.
//!
//! A client without an explicit path uses `$XDG_RUNTIME_DIR/vramd.sock` when
//! that file exists (a per-user daemon), and [`SYSTEM_SOCKET`] otherwise.

use std::path::PathBuf;

/// Environment variable that names the socket for clients and the daemon.
pub const SOCKET_ENV: &str = "VRAMD_SOCKET";
/// Socket of a system-wide daemon.
pub const SYSTEM_SOCKET: &str = "/run/vramd/vramd.sock";
/// File name of a per-user daemon's socket inside `$XDG_RUNTIME_DIR`.
pub const USER_SOCKET_NAME: &str = "vramd.sock";

fn from_env() -> Option<PathBuf> {
    std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn user_socket() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|dir| PathBuf::from(dir).join(USER_SOCKET_NAME))
}

/// The socket a client connects to when it was given no explicit path.
pub fn client_socket_path() -> PathBuf {
    if let Some(p) = from_env() {
        return p;
    }
    match user_socket() {
        Some(p) if p.exists() => p,
        _ => PathBuf::from(SYSTEM_SOCKET),
    }
}

/// The socket a daemon run by `uid` listens on when given no explicit path, or
/// `None` when a non-root daemon has no `$XDG_RUNTIME_DIR` to put it in.
pub fn daemon_socket_path(uid: u32) -> Option<PathBuf> {
    if let Some(p) = from_env() {
        return Some(p);
    }
    if uid == 0 {
        Some(PathBuf::from(SYSTEM_SOCKET))
    } else {
        user_socket()
    }
}
