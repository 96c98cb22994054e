//! The state file: the reservations a restart must not lose.
//!
//! Lifecycle: at start the daemon [`StateFile::load`]s it (a missing file
//! is a first start; a corrupt or foreign one is logged, set aside as
//! `<file>.bad` and the daemon starts empty — never a crash); while it runs
//! the core [`StateFile::save`]s the ledger's snapshot after grants and
//! releases (coalesced: at most one write per [`SAVE_INTERVAL`]) and once
//! more when it stops. A save writes a temporary file (mode 0600) beside it
//! and renames it over the old one, so a reader sees the old state or the
//! new one, never half of one.
//!
//! The file is JSON: `{"format": "vramd-state", "version": 1, "socket":
//! ..., "next_id": ..., "token_key": ..., "reservations": [...]}` (see
//! docs/configuration.md). It holds the secret reclaim tokens derive from,
//! so it is refused unless it is a regular file owned by the daemon's user
//! and writable by no one else.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vramd_ledger::Snapshot;

/// The `format` field of every state file.
pub const FORMAT: &str = "vramd-state";
/// The `version` field this daemon writes and reads.
pub const VERSION: u32 = 1;
/// Shortest time between two saves while the daemon runs: grants and
/// releases in between are saved together.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(20);

/// The file as written.
#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    format: String,
    version: u32,
    /// The socket of the daemon that wrote it.
    socket: String,
    #[serde(flatten)]
    snapshot: Snapshot,
}

/// Where the state is kept, for which socket.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    socket: PathBuf,
}

impl StateFile {
    /// The state file for `socket`: `<socket file name>.state` in `dir`, or
    /// beside the socket.
    pub fn for_socket(socket: &Path, dir: Option<&Path>) -> StateFile {
        let name = socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vramd.sock".into());
        let dir = dir
            .map(Path::to_path_buf)
            .or_else(|| socket.parent().map(Path::to_path_buf))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        StateFile {
            path: dir.join(format!("{name}.state")),
            socket: socket.to_path_buf(),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state: `Ok(None)` if there is none; `Err` says why the
    /// file is unusable (corrupt, foreign, unsafe).
    pub fn load(&self) -> Result<Option<Snapshot>, String> {
        let meta = match std::fs::symlink_metadata(&self.path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read it: {e}")),
        };
        if !meta.file_type().is_file() {
            return Err("it is not a regular file".into());
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(format!(
                "it belongs to uid {}, not to the daemon's user (uid {euid})",
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "its mode {:o} lets others write it",
                meta.mode() & 0o777
            ));
        }
        let text = std::fs::read(&self.path).map_err(|e| format!("cannot read it: {e}"))?;
        let disk: OnDisk =
            serde_json::from_slice(&text).map_err(|e| format!("it is not a state file: {e}"))?;
        if disk.format != FORMAT || disk.version != VERSION {
            return Err(format!(
                "it is {:?} version {}, not {FORMAT:?} version {VERSION}",
                disk.format, disk.version
            ));
        }
        if Path::new(&disk.socket) != self.socket {
            return Err(format!(
                "it belongs to the daemon of socket {}, not {}",
                disk.socket,
                self.socket.display()
            ));
        }
        Ok(Some(disk.snapshot))
    }

    /// Moves an unusable file aside (`<file>.bad`), so that it can be looked
    /// at and is not read again.
    pub fn set_aside(&self) -> Option<PathBuf> {
        let mut bad = self.path.clone().into_os_string();
        bad.push(".bad");
        let bad = PathBuf::from(bad);
        std::fs::rename(&self.path, &bad).ok().map(|()| bad)
    }

    /// Writes `snapshot` atomically (temporary file, mode 0600, renamed
    /// over the old one).
    pub fn save(&self, snapshot: Snapshot) -> std::io::Result<()> {
        let disk = OnDisk {
            format: FORMAT.into(),
            version: VERSION,
            socket: self.socket.to_string_lossy().into_owned(),
            snapshot,
        };
        let bytes = serde_json::to_vec(&disk).map_err(std::io::Error::other)?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            std::fs::rename(&tmp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// A random 128-bit key for reclaim tokens (from /dev/urandom; failing
/// that, from the OS-seeded keys of std's hash maps).
pub fn random_key() -> u128 {
    let mut buf = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .is_ok()
    {
        return u128::from_le_bytes(buf);
    }
    use std::hash::{BuildHasher, Hasher};
    let half = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
        h.finish()
    };
    (u128::from(half()) << 64) | u128::from(half())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            next_id: 7,
            token_key: "00112233445566778899aabbccddeeff".into(),
            reservations: vec![],
        }
    }

    #[test]
    fn saves_with_mode_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let f = StateFile::for_socket(&sock, None);
        assert_eq!(f.path(), dir.path().join("v.sock.state"));
        assert_eq!(f.load(), Ok(None));
        f.save(snapshot()).unwrap();
        let mode = std::fs::metadata(f.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(f.load(), Ok(Some(snapshot())));
    }

    #[test]
    fn an_enforcement_is_saved_and_a_file_from_before_it_existed_loads() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::for_socket(&dir.path().join("v.sock"), None);
        let mut s = snapshot();
        s.reservations.push(vramd_ledger::SavedReservation {
            id: vramd_protocol::ReservationId(3),
            device_uuid: "SIM-0".into(),
            bytes: 1 << 30,
            label: None,
            priority: 0,
            pid: 42,
            uid: 1000,
            gid: 1000,
            admin: false,
            pids: vec![42],
            idle: false,
            age_ms: 5,
            enforced: Some((1 << 30, "mps".into())),
        });
        f.save(s.clone()).unwrap();
        assert_eq!(f.load(), Ok(Some(s.clone())));
        // The same file as an older daemon wrote it: no `enforced` key.
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(f.path()).unwrap()).unwrap();
        v["reservations"][0]
            .as_object_mut()
            .unwrap()
            .remove("enforced")
            .expect("saved with the key");
        std::fs::write(f.path(), serde_json::to_vec(&v).unwrap()).unwrap();
        s.reservations[0].enforced = None;
        assert_eq!(f.load(), Ok(Some(s)));
    }

    #[test]
    fn corrupt_foreign_and_unsafe_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let f = StateFile::for_socket(&sock, None);
        std::fs::write(f.path(), b"{not json").unwrap();
        let e = f.load().unwrap_err();
        assert!(e.contains("not a state file"), "{e}");
        let other = StateFile::for_socket(&dir.path().join("other.sock"), Some(dir.path()));
        other.save(snapshot()).unwrap();
        std::fs::rename(other.path(), f.path()).unwrap();
        let e = f.load().unwrap_err();
        assert!(e.contains("belongs to the daemon of socket"), "{e}");
        std::fs::write(f.path(), br#"{"format":"x","version":1}"#).unwrap();
        assert!(f.load().is_err());
        f.save(snapshot()).unwrap();
        std::fs::set_permissions(
            f.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        let e = f.load().unwrap_err();
        assert!(e.contains("lets others write it"), "{e}");
        assert!(f.set_aside().is_some());
        assert_eq!(f.load(), Ok(None));
    }
}
