//! Observed model sizes, kept in a JSON state file across restarts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::Error;

/// Sizes by `<app>/<model>`, in bytes, as last seen in GPU memory.
#[derive(Debug)]
pub struct SizeStore {
    path: PathBuf,
    sizes: Mutex<BTreeMap<String, u64>>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct File {
    /// `<app>/<model>` → bytes in GPU memory when last seen loaded.
    size_vram_bytes: BTreeMap<String, u64>,
}

impl SizeStore {
    /// Reads `path`; a missing file is an empty store, an unreadable one is
    /// logged and replaced on the next observation.
    pub fn load(path: &Path) -> SizeStore {
        let sizes = match std::fs::read(path) {
            Ok(b) => match serde_json::from_slice::<File>(&b) {
                Ok(f) => f.size_vram_bytes,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable size state file");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the size state file");
                BTreeMap::new()
            }
        };
        SizeStore {
            path: path.to_path_buf(),
            sizes: Mutex::new(sizes),
        }
    }

    /// The path it is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last observed size of `key`.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.lock().get(key).copied()
    }

    /// Every known size.
    pub fn all(&self) -> BTreeMap<String, u64> {
        self.lock().clone()
    }

    /// Records an observation; writes the file when it changed.
    pub fn observe(&self, key: &str, size_bytes: u64) -> Result<(), Error> {
        let snapshot = {
            let mut m = self.lock();
            if m.get(key) == Some(&size_bytes) {
                return Ok(());
            }
            m.insert(key.to_string(), size_bytes);
            m.clone()
        };
        self.write(snapshot)
    }

    fn write(&self, sizes: BTreeMap<String, u64>) -> Result<(), Error> {
        let io = |what: &str, source| Error::Io {
            what: format!("{what} {}", self.path.display()),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
        }
        let body = serde_json::to_vec_pretty(&File {
            size_vram_bytes: sizes,
        })
        .map_err(|e| io("encoding", std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, body).map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("replacing", e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_survive_a_reload() {
        let dir = std::env::temp_dir().join(format!("vramd-gw-sizes-{}", std::process::id()));
        let path = dir.join("nested/sizes.json");
        let s = SizeStore::load(&path);
        assert_eq!(s.get("o/m:latest"), None);
        s.observe("o/m:latest", 123).unwrap();
        let again = SizeStore::load(&path);
        assert_eq!(again.get("o/m:latest"), Some(123));
        std::fs::write(&path, b"not json").unwrap();
        assert_eq!(SizeStore::load(&path).get("o/m:latest"), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
