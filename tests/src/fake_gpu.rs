//! A shared editor of the fake NVML state file (format:
//! tests/fake-nvml/README.md).
//!
//! A test, and the fake HTTP apps of [`crate::fake_http`] running on threads of
//! the same test process, all change the machine under a running daemon. Each
//! of them goes through one [`FakeGpu`]: it keeps the state in memory behind a
//! mutex and rewrites the whole file atomically (temporary file in the same
//! directory, then rename) while holding that mutex, so no writer ever loses
//! another's update and the fake libnvidia-ml never reads a half-written file.
//! Every write also records each device's `used` bytes, so a test can assert
//! afterwards that memory in use never went past a device's total.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};

/// The fake NVML state file, edited under a lock. Share it as `Arc<FakeGpu>`.
pub struct FakeGpu {
    path: PathBuf,
    inner: Mutex<Inner>,
}

/// What the lock guards: the state as last written, and the history.
struct Inner {
    state: Value,
    /// Largest `used` ever written, per device index.
    peak: Vec<u64>,
    /// Numbers the temporary files, so two writes never share one.
    writes: u64,
}

impl FakeGpu {
    /// Creates the state file at `path` with these devices (uuid,
    /// total_bytes), each named "Fake GPU" and with no processes, and returns
    /// it shared. The directory must exist. Panics if the file cannot be
    /// written.
    pub fn create(path: &Path, devices: &[(&str, u64)]) -> Arc<FakeGpu> {
        let devices: Vec<Value> = devices
            .iter()
            .map(|&(uuid, total)| {
                json!({
                    "uuid": uuid,
                    "name": "Fake GPU",
                    "total_bytes": total,
                    "extra_used_bytes": 0,
                    "processes": [],
                })
            })
            .collect();
        let gpu = FakeGpu {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                state: json!({ "devices": devices }),
                peak: Vec::new(),
                writes: 0,
            }),
        };
        gpu.write(&mut gpu.lock());
        Arc::new(gpu)
    }

    /// The state file's path (what `FAKE_NVML_STATE` should name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets process `pid`'s usage on device `device` to `bytes`, adding the
    /// process if it is not listed; `bytes == 0` removes it instead. Written
    /// atomically under the lock. Panics if there is no such device.
    pub fn set_process(&self, device: usize, pid: u32, bytes: u64) {
        self.edit(device, |d| {
            if !d["processes"].is_array() {
                d["processes"] = json!([]);
            }
            let list = d["processes"].as_array_mut().expect("processes array");
            let at = list
                .iter()
                .position(|p| p["pid"].as_u64() == Some(pid.into()));
            match (at, bytes) {
                (Some(i), 0) => {
                    list.remove(i);
                }
                (Some(i), b) => list[i]["used_bytes"] = json!(b),
                (None, 0) => {}
                (None, b) => list.push(json!({ "pid": pid, "used_bytes": b })),
            }
        });
    }

    /// Applies `f` to device `device`'s JSON object (for instance
    /// `d["fail"] = json!("gpu_lost")`) and writes the state atomically, all
    /// under the lock. Panics if there is no such device.
    pub fn edit(&self, device: usize, f: impl FnOnce(&mut Value)) {
        let mut inner = self.lock();
        let d = device_mut(&mut inner.state, device);
        f(d);
        self.write(&mut inner);
    }

    /// The bytes process `pid` holds on device `device` (0 when it is not
    /// listed or its `used_bytes` is null).
    pub fn process_bytes(&self, device: usize, pid: u32) -> u64 {
        let inner = self.lock();
        let d = device_ref(&inner.state, device);
        d["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["pid"].as_u64() == Some(pid.into()))
            .filter_map(|p| p["used_bytes"].as_u64())
            .fold(0, u64::saturating_add)
    }

    /// Used bytes of device `device` as the fake NVML computes them:
    /// `extra_used_bytes` plus every non-null `used_bytes` in `processes` and
    /// `mps_processes`, saturating. Panics if there is no such device.
    pub fn used(&self, device: usize) -> u64 {
        used_of(device_ref(&self.lock().state, device))
    }

    /// The largest [`FakeGpu::used`] ever written for device `device` (every
    /// write records it), so a test can assert it never exceeded the total.
    pub fn peak_used(&self, device: usize) -> u64 {
        let inner = self.lock();
        device_ref(&inner.state, device);
        inner.peak.get(device).copied().unwrap_or(0)
    }

    /// Device `device`'s `total_bytes`. Panics if there is no such device.
    pub fn total(&self, device: usize) -> u64 {
        device_ref(&self.lock().state, device)["total_bytes"]
            .as_u64()
            .unwrap_or(0)
    }

    /// A copy of the whole state as last written.
    pub fn snapshot(&self) -> Value {
        self.lock().state.clone()
    }

    /// Takes the lock; a test thread that panicked while holding it leaves
    /// the state consistent (every write is whole), so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the peaks and replaces the file atomically. The caller holds
    /// the lock (it passes the guarded state).
    fn write(&self, inner: &mut Inner) {
        let devices = inner.state["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if inner.peak.len() < devices.len() {
            inner.peak.resize(devices.len(), 0);
        }
        for (i, d) in devices.iter().enumerate() {
            inner.peak[i] = inner.peak[i].max(used_of(d));
        }
        inner.writes += 1;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state.json".into());
        let tmp = self.path.with_file_name(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            inner.writes
        ));
        let bytes = serde_json::to_vec_pretty(&inner.state).expect("serialize the fake state");
        std::fs::write(&tmp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &self.path).unwrap_or_else(|e| {
            let _ = std::fs::remove_file(&tmp);
            panic!("rename {} over {}: {e}", tmp.display(), self.path.display())
        });
    }
}

fn device_ref(state: &Value, device: usize) -> &Value {
    state["devices"]
        .get(device)
        .unwrap_or_else(|| panic!("the fake GPU state has no device {device}"))
}

fn device_mut(state: &mut Value, device: usize) -> &mut Value {
    state["devices"]
        .get_mut(device)
        .unwrap_or_else(|| panic!("the fake GPU state has no device {device}"))
}

/// `used` of one device object, as tests/fake-nvml computes it.
fn used_of(d: &Value) -> u64 {
    let listed = ["processes", "mps_processes"]
        .iter()
        .filter_map(|k| d[*k].as_array())
        .flatten()
        .filter_map(|p| p["used_bytes"].as_u64());
    std::iter::once(d["extra_used_bytes"].as_u64().unwrap_or(0))
        .chain(listed)
        .fold(0, u64::saturating_add)
}
