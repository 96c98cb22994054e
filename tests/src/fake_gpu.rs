//! A shared editor of the fake NVML state file: the [`fake_nvml::State`]
//! types (tests/fake-nvml, which defines the format) behind a lock.
//!
//! A test, and the fake apps (e.g. [`crate::fake_comfyui`]) running on threads of
//! the same test process, all change the machine under a running daemon. Each
//! of them goes through one [`FakeGpu`]: it keeps the state in memory behind a
//! mutex and rewrites the whole file with [`State::write_atomic`] while holding
//! that mutex, so no writer ever loses another's update and the fake
//! libnvidia-ml never reads a half-written file. Every write also records each
//! device's used bytes, so a test can assert afterwards that memory in use
//! never went past a device's total.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fake_nvml::{FakeDevice, FakeProcess, State};

use vramd_client::util::lock;

/// The fake NVML state file, edited under a lock. Share it as `Arc<FakeGpu>`.
pub struct FakeGpu {
    path: PathBuf,
    inner: Mutex<Inner>,
}

/// What the lock guards: the state as last written, and the history.
struct Inner {
    state: State,
    /// Largest used bytes ever written, per device index.
    peak_bytes: Vec<u64>,
}

impl FakeGpu {
    /// Creates the state file at `path` with these devices (uuid,
    /// total_bytes), each named "Fake GPU" and with no processes, and returns
    /// it shared. The directory must exist. Panics if the file cannot be
    /// written.
    pub fn create(path: &Path, devices: &[(&str, u64)]) -> Arc<FakeGpu> {
        let devices = devices
            .iter()
            .map(|&(uuid, total_bytes)| FakeDevice::new(uuid, "Fake GPU", total_bytes))
            .collect();
        let gpu = FakeGpu {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                state: State::new(devices),
                peak_bytes: Vec::new(),
            }),
        };
        gpu.write(&mut lock(&gpu.inner));
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
            let at = d.processes.iter().position(|p| p.pid == pid);
            match (at, bytes) {
                (Some(i), 0) => {
                    d.processes.remove(i);
                }
                (Some(i), b) => d.processes[i].used_bytes = Some(b),
                (None, 0) => {}
                (None, b) => d.processes.push(FakeProcess::new(pid, b)),
            }
        });
    }

    /// Applies `f` to device `device` (for instance
    /// `d.fail = Some(DeviceFailure::GpuLost)`) and writes the state
    /// atomically, all under the lock. Panics if there is no such device.
    pub fn edit(&self, device: usize, f: impl FnOnce(&mut FakeDevice)) {
        let mut inner = lock(&self.inner);
        f(device_mut(&mut inner.state, device));
        self.write(&mut inner);
    }

    /// The bytes process `pid` holds on device `device` (0 when it is not
    /// listed or its `used_bytes` is null).
    pub fn process_bytes(&self, device: usize, pid: u32) -> u64 {
        device_ref(&lock(&self.inner).state, device)
            .processes
            .iter()
            .filter(|p| p.pid == pid)
            .filter_map(|p| p.used_bytes)
            .fold(0, u64::saturating_add)
    }

    /// Used bytes of device `device` as the fake NVML computes them
    /// ([`FakeDevice::used_bytes`]). Panics if there is no such device.
    pub fn used(&self, device: usize) -> u64 {
        device_ref(&lock(&self.inner).state, device).used_bytes()
    }

    /// The largest [`FakeGpu::used`] ever written for device `device` (every
    /// write records it), so a test can assert it never exceeded the total.
    pub fn peak_used(&self, device: usize) -> u64 {
        let inner = lock(&self.inner);
        device_ref(&inner.state, device);
        inner.peak_bytes.get(device).copied().unwrap_or(0)
    }

    /// Device `device`'s `total_bytes`. Panics if there is no such device.
    pub fn total(&self, device: usize) -> u64 {
        device_ref(&lock(&self.inner).state, device).total_bytes
    }

    /// A copy of the whole state as last written.
    pub fn snapshot(&self) -> State {
        lock(&self.inner).state.clone()
    }

    /// Records the peaks and replaces the file atomically. The caller holds
    /// the lock (it passes the guarded state).
    fn write(&self, inner: &mut Inner) {
        let devices = &inner.state.devices;
        if inner.peak_bytes.len() < devices.len() {
            inner.peak_bytes.resize(devices.len(), 0);
        }
        for (peak, d) in inner.peak_bytes.iter_mut().zip(devices) {
            *peak = (*peak).max(d.used_bytes());
        }
        inner
            .state
            .write_atomic(&self.path)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.path.display()));
    }
}

fn device_ref(state: &State, device: usize) -> &FakeDevice {
    state
        .devices
        .get(device)
        .unwrap_or_else(|| panic!("the fake GPU state has no device {device}"))
}

fn device_mut(state: &mut State, device: usize) -> &mut FakeDevice {
    state
        .devices
        .get_mut(device)
        .unwrap_or_else(|| panic!("the fake GPU state has no device {device}"))
}
