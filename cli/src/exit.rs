//! Exit statuses (listed in `vramctl --help`, see [`crate::cli::EXIT_STATUSES_HELP`])
//! and the message for each error.

use std::ffi::CStr;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use vramd_client::Error;

/// Another error (I/O or protocol).
pub const EXIT_OTHER: u8 = 1;
/// A wrong argument (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// The daemon refused the request (EX_DATAERR).
pub const EXIT_REFUSED: u8 = 65;
/// The daemon is not reachable (EX_UNAVAILABLE).
pub const EXIT_UNREACHABLE: u8 = 69;
/// The wait limit passed (EX_TEMPFAIL).
pub const EXIT_TIMEOUT: u8 = 75;
/// Permission denied on the socket (EX_NOPERM).
pub const EXIT_PERMISSION: u8 = 77;
/// `run --enforce` found no usable NVIDIA MPS server; the command never
/// ran (EX_CONFIG).
pub const EXIT_NO_MPS: u8 = 78;
/// A signal came before the grant (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// What went wrong, as far as the exit status tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No daemon answers, or the connection was lost.
    Unreachable,
    /// The socket (or its directory) may not be opened by this user.
    PermissionDenied,
    /// The daemon said no.
    Refused,
    /// The wait limit passed.
    WaitTimeout,
    /// `run --enforce` found no usable MPS server.
    NoMps,
    /// Anything else.
    Other,
}

impl Failure {
    /// Classifies an SDK error.
    pub fn of(e: &Error) -> Failure {
        match e {
            Error::NotRunning { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                Failure::PermissionDenied
            }
            Error::NotRunning { .. } | Error::Disconnected => Failure::Unreachable,
            Error::Refused(_) | Error::Daemon { .. } => Failure::Refused,
            Error::WaitTimeout(_) => Failure::WaitTimeout,
            _ => Failure::Other,
        }
    }

    /// The exit status.
    pub fn exit_status(self) -> u8 {
        match self {
            Failure::Unreachable => EXIT_UNREACHABLE,
            Failure::PermissionDenied => EXIT_PERMISSION,
            Failure::Refused => EXIT_REFUSED,
            Failure::WaitTimeout => EXIT_TIMEOUT,
            Failure::NoMps => EXIT_NO_MPS,
            Failure::Other => EXIT_OTHER,
        }
    }

    /// The name in `--json` error events.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Unreachable => "unreachable",
            Failure::PermissionDenied => "permission_denied",
            Failure::Refused => "refused",
            Failure::WaitTimeout => "wait_timeout",
            Failure::NoMps => "no_mps",
            Failure::Other => "error",
        }
    }
}

/// The message for `e` (one line): for a permission error, who may open
/// the socket and how to become one of them.
pub fn message(e: &Error, socket: &Path) -> String {
    match Failure::of(e) {
        Failure::PermissionDenied => permission_message(socket),
        _ => e.to_string(),
    }
}

/// "permission denied on PATH (owner root, group vramd, mode 0660): ..."
fn permission_message(socket: &Path) -> String {
    // The socket itself, or the first directory above it that we may not
    // search (stat fails with EACCES below such a directory).
    let mut denied = socket;
    let mut meta = std::fs::metadata(socket);
    while let Err(e) = &meta {
        if e.kind() != io::ErrorKind::PermissionDenied {
            break;
        }
        match denied.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => {
                denied = parent;
                meta = std::fs::metadata(parent);
            }
            None => break,
        }
    }
    let Ok(meta) = meta else {
        return format!(
            "permission denied on {}; ask its administrator for access",
            socket.display()
        );
    };
    let owner = user_name(meta.uid());
    let group = group_name(meta.gid());
    let mode = meta.permissions().mode() & 0o7777;
    let what = if denied == socket {
        format!("the socket {}", socket.display())
    } else {
        format!(
            "the directory {} (above the socket {})",
            denied.display(),
            socket.display()
        )
    };
    format!(
        "permission denied on {what} (owner {owner}, group {group}, mode {mode:04o}): \
         members of group {group} may use it; join it with \
         `sudo usermod -aG {group} $USER`, then log in again"
    )
}

/// The name of user `uid`, or the number.
fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid returns static storage or null; the name is copied
    // out before any other call.
    unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() || (*pw).pw_name.is_null() {
            return uid.to_string();
        }
        CStr::from_ptr((*pw).pw_name).to_string_lossy().into_owned()
    }
}

/// The name of group `gid`, or the number.
fn group_name(gid: u32) -> String {
    // SAFETY: as in user_name, for getgrgid.
    unsafe {
        let gr = libc::getgrgid(gid);
        if gr.is_null() || (*gr).gr_name.is_null() {
            return gid.to_string();
        }
        CStr::from_ptr((*gr).gr_name).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_its_own_status() {
        let all = [
            Failure::Unreachable,
            Failure::PermissionDenied,
            Failure::Refused,
            Failure::WaitTimeout,
            Failure::NoMps,
            Failure::Other,
        ];
        let mut codes: Vec<u8> = all.iter().map(|f| f.exit_status()).collect();
        codes.extend([EXIT_USAGE, EXIT_INTERRUPTED]);
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n, "{codes:?}");
        for code in codes {
            assert!(
                crate::cli::EXIT_STATUSES_HELP.contains(&format!("\n  {code} ")),
                "{code} is not listed in --help"
            );
        }
    }

    #[test]
    fn errors_are_classified() {
        let denied = Error::NotRunning {
            path: "/x".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        };
        let missing = Error::NotRunning {
            path: "/x".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(Failure::of(&denied), Failure::PermissionDenied);
        assert_eq!(Failure::of(&missing), Failure::Unreachable);
        assert_eq!(Failure::of(&Error::Disconnected), Failure::Unreachable);
        assert_eq!(
            Failure::of(&Error::Refused("too big".into())),
            Failure::Refused
        );
        assert_eq!(
            Failure::of(&Error::WaitTimeout("30s".into())),
            Failure::WaitTimeout
        );
        assert_eq!(Failure::of(&Error::Protocol("?".into())), Failure::Other);
    }
}
