//! The state file: the serde types that mirror its JSON format, the rules that
//! turn a device's entry into NVML memory readings, and loading/writing the
//! file. The format is documented for scenario writers in `README.md`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Environment variable holding the path of the state file. The fake re-reads
/// the file on every NVML call.
pub const STATE_ENV: &str = "FAKE_NVML_STATE";

/// Driver version reported when the state file does not name one.
pub const DEFAULT_DRIVER_VERSION: &str = "999.99";

/// The whole fake machine: what `nvmlInit` does and which devices exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// When set, `nvmlInit_v2` and `nvmlInitWithFlags` fail with this error.
    #[serde(default)]
    pub init_error: Option<InitError>,
    /// What `nvmlSystemGetDriverVersion` reports.
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    /// The devices, in index order (`nvmlDeviceGetHandleByIndex_v2(i)` is
    /// `devices[i]`).
    #[serde(default)]
    pub devices: Vec<FakeDevice>,
}

/// How `nvmlInit` fails (`init_error` in the state file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitError {
    /// `"driver_not_loaded"`: `NVML_ERROR_DRIVER_NOT_LOADED` (9).
    DriverNotLoaded,
    /// `"unknown"`: `NVML_ERROR_UNKNOWN` (999).
    Unknown,
}

/// How every per-device query on one device fails (`fail` in the state file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceFailure {
    /// `"gpu_lost"`: `NVML_ERROR_GPU_IS_LOST` (15), a GPU fallen off the bus.
    GpuLost,
    /// `"unknown"`: `NVML_ERROR_UNKNOWN` (999).
    Unknown,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeDevice {
    /// What `nvmlDeviceGetUUID` reports, e.g. `GPU-11111111-2222-3333-4444-555555555555`.
    pub uuid: String,
    /// What `nvmlDeviceGetName` reports.
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Memory in use that no listed process accounts for (other users,
    /// graphics contexts, driver overhead).
    #[serde(default)]
    pub extra_used_bytes: u64,
    /// What `nvmlDeviceGetComputeRunningProcesses_v3` lists.
    #[serde(default)]
    pub processes: Vec<FakeProcess>,
    /// What `nvmlDeviceGetMPSComputeRunningProcesses_v3` lists.
    #[serde(default)]
    pub mps_processes: Vec<FakeProcess>,
    /// When false, both process queries return `NVML_ERROR_NOT_SUPPORTED`.
    #[serde(default = "default_true")]
    pub processes_supported: bool,
    /// When set, every per-device query on this device fails with this error
    /// (getting its handle still succeeds).
    #[serde(default)]
    pub fail: Option<DeviceFailure>,
}

/// One process holding memory on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeProcess {
    /// Process id.
    pub pid: u32,
    /// Bytes the process holds; `None` (JSON `null`) means the driver cannot
    /// tell, reported as `NVML_VALUE_NOT_AVAILABLE` and not counted in `used`.
    #[serde(default)]
    pub used_bytes: Option<u64>,
}

fn default_driver_version() -> String {
    DEFAULT_DRIVER_VERSION.to_owned()
}

fn default_true() -> bool {
    true
}

impl Default for State {
    /// A working driver (`999.99`) with no devices.
    fn default() -> Self {
        Self {
            init_error: None,
            driver_version: default_driver_version(),
            devices: Vec::new(),
        }
    }
}

impl State {
    /// A working driver with these devices.
    pub fn new(devices: Vec<FakeDevice>) -> Self {
        Self {
            devices,
            ..Self::default()
        }
    }

    /// Appends a device (builder style).
    pub fn with_device(mut self, device: FakeDevice) -> Self {
        self.devices.push(device);
        self
    }

    /// Makes `nvmlInit` fail with `error` (builder style).
    pub fn with_init_error(mut self, error: InitError) -> Self {
        self.init_error = Some(error);
        self
    }

    /// Parses a state file's JSON text.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The state as pretty-printed JSON, in the state-file format.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string
        // keys, no custom Serialize impls.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads and parses a state file; a parse error comes back as
    /// `io::ErrorKind::InvalidData` carrying serde's message.
    pub fn read(path: impl AsRef<Path>) -> io::Result<Self> {
        let bytes = fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes the state to `path` atomically: the JSON goes to a temporary
    /// file in the same directory, which is then renamed over `path`, so a
    /// concurrent reader (the fake, inside a running daemon) sees either the
    /// old state or the new one, never a torn file.
    pub fn write_atomic(&self, path: impl AsRef<Path>) -> io::Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = path.as_ref();
        let file_name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("state path {} has no file name", path.display()),
            )
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(
            ".tmp.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = path.with_file_name(tmp_name);
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let written = fs::write(&tmp, json).and_then(|()| fs::rename(&tmp, path));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }
}

impl FakeDevice {
    /// A healthy device with no memory in use and no processes.
    pub fn new(uuid: impl Into<String>, name: impl Into<String>, total_bytes: u64) -> Self {
        Self {
            uuid: uuid.into(),
            name: name.into(),
            total_bytes,
            extra_used_bytes: 0,
            processes: Vec::new(),
            mps_processes: Vec::new(),
            processes_supported: true,
            fail: None,
        }
    }

    /// Adds a compute process using `used_bytes` (builder style).
    pub fn with_process(mut self, pid: u32, used_bytes: u64) -> Self {
        self.processes.push(FakeProcess::new(pid, used_bytes));
        self
    }

    /// Sets the memory in use outside any listed process (builder style).
    pub fn with_extra_used(mut self, bytes: u64) -> Self {
        self.extra_used_bytes = bytes;
        self
    }

    /// Makes every per-device query fail with `failure` (builder style).
    pub fn failing(mut self, failure: DeviceFailure) -> Self {
        self.fail = Some(failure);
        self
    }

    /// Whole-device `used`: `extra_used_bytes` plus the known `used_bytes` of
    /// every process and MPS process (saturating; unknown usage counts 0).
    pub fn used_bytes(&self) -> u64 {
        self.processes
            .iter()
            .chain(&self.mps_processes)
            .filter_map(|p| p.used_bytes)
            .fold(self.extra_used_bytes, u64::saturating_add)
    }

    /// Whole-device `free`: `total_bytes − used_bytes()`, never below 0.
    pub fn free_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.used_bytes())
    }
}

impl FakeProcess {
    /// A process whose usage is known.
    pub fn new(pid: u32, used_bytes: u64) -> Self {
        Self {
            pid,
            used_bytes: Some(used_bytes),
        }
    }

    /// A process whose usage the driver cannot tell (`"used_bytes": null`).
    pub fn unavailable(pid: u32) -> Self {
        Self {
            pid,
            used_bytes: None,
        }
    }
}

/// Loads the state named by [`STATE_ENV`]; the error is one line saying which
/// path failed and why.
pub(crate) fn load_from_env() -> Result<State, String> {
    let Some(path) = std::env::var_os(STATE_ENV) else {
        return Err(format!(
            "fake-nvml: {STATE_ENV} is not set; point it at a state file (see tests/fake-nvml/README.md)"
        ));
    };
    let path = PathBuf::from(path);
    let bytes = fs::read(&path).map_err(|e| {
        format!(
            "fake-nvml: cannot read state file {} ({STATE_ENV}): {e}",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "fake-nvml: cannot parse state file {} ({STATE_ENV}): {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn minimal_device_gets_defaults() {
        let state = State::from_json(
            r#"{"devices": [{"uuid": "GPU-a", "name": "A", "total_bytes": 100}]}"#,
        )
        .unwrap();
        assert_eq!(state.init_error, None);
        assert_eq!(state.driver_version, "999.99");
        assert_eq!(state, State::new(vec![FakeDevice::new("GPU-a", "A", 100)]));
        let d = &state.devices[0];
        assert_eq!(d.extra_used_bytes, 0);
        assert!(d.processes.is_empty() && d.mps_processes.is_empty());
        assert!(d.processes_supported);
        assert_eq!(d.fail, None);
    }

    #[test]
    fn empty_object_is_a_machine_without_gpus() {
        assert_eq!(State::from_json("{}").unwrap(), State::default());
    }

    #[test]
    fn required_keys_and_typos_are_rejected() {
        for (text, needle) in [
            (r#"{"devices": [{"name": "A", "total_bytes": 1}]}"#, "uuid"),
            (r#"{"devices": [{"uuid": "u", "total_bytes": 1}]}"#, "name"),
            (
                r#"{"devices": [{"uuid": "u", "name": "A"}]}"#,
                "total_bytes",
            ),
            (r#"{"device": []}"#, "device"),
            (
                r#"{"devices": [{"uuid": "u", "name": "A", "total_bytes": 1, "extra_used": 5}]}"#,
                "extra_used",
            ),
            (r#"{"init_error": "driver_missing"}"#, "driver_missing"),
            (
                r#"{"devices": [{"uuid": "u", "name": "A", "total_bytes": 1, "fail": "lost"}]}"#,
                "lost",
            ),
        ] {
            let err = State::from_json(text).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{text}: error {err:?} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn enums_use_the_documented_spellings() {
        let state = State::from_json(
            r#"{"init_error": "driver_not_loaded", "devices": [
                {"uuid": "u", "name": "A", "total_bytes": 1, "fail": "gpu_lost"},
                {"uuid": "v", "name": "B", "total_bytes": 1, "fail": "unknown"}]}"#,
        )
        .unwrap();
        assert_eq!(state.init_error, Some(InitError::DriverNotLoaded));
        assert_eq!(state.devices[0].fail, Some(DeviceFailure::GpuLost));
        assert_eq!(state.devices[1].fail, Some(DeviceFailure::Unknown));
        assert_eq!(
            State::from_json(r#"{"init_error": "unknown"}"#)
                .unwrap()
                .init_error,
            Some(InitError::Unknown)
        );
    }

    #[test]
    fn used_sums_extra_processes_and_mps_skipping_unknown() {
        let mut d = FakeDevice::new("u", "A", 24 * GIB)
            .with_extra_used(GIB)
            .with_process(1, 10 * GIB);
        d.processes.push(FakeProcess::unavailable(2));
        d.mps_processes.push(FakeProcess::new(3, 2 * GIB));
        assert_eq!(d.used_bytes(), 13 * GIB);
        assert_eq!(d.free_bytes(), 11 * GIB);
    }

    #[test]
    fn used_beyond_total_saturates_free_at_zero() {
        let d = FakeDevice::new("u", "A", GIB)
            .with_process(1, u64::MAX)
            .with_process(2, 5);
        assert_eq!(d.used_bytes(), u64::MAX);
        assert_eq!(d.free_bytes(), 0);
    }

    #[test]
    fn null_and_absent_used_bytes_mean_unavailable() {
        let state = State::from_json(
            r#"{"devices": [{"uuid": "u", "name": "A", "total_bytes": 1,
                "processes": [{"pid": 1, "used_bytes": null}, {"pid": 2}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            state.devices[0].processes,
            vec![FakeProcess::unavailable(1), FakeProcess::unavailable(2)]
        );
    }

    #[test]
    fn write_atomic_round_trips_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("fake-nvml-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let mut state = State::new(vec![
            FakeDevice::new("GPU-a", "A", 24 * GIB).with_process(7, GIB),
        ])
        .with_init_error(InitError::Unknown);
        state.devices[0]
            .mps_processes
            .push(FakeProcess::unavailable(8));
        state.write_atomic(&path).unwrap();
        assert_eq!(State::read(&path).unwrap(), state);
        // Overwriting replaces the file.
        let next = State::default();
        next.write_atomic(&path).unwrap();
        assert_eq!(State::read(&path).unwrap(), next);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_reports_parse_errors_as_invalid_data() {
        let dir = std::env::temp_dir().join(format!("fake-nvml-read-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        fs::write(&path, "{not json").unwrap();
        let err = State::read(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Every ```json block in the README is a valid state file, so the
    /// documented examples cannot drift from the parser.
    #[test]
    fn readme_examples_parse() {
        let readme = include_str!("../README.md");
        let mut blocks = 0;
        let mut rest = readme;
        while let Some(start) = rest.find("```json\n") {
            let body = &rest[start + "```json\n".len()..];
            let end = body.find("```").expect("unterminated ```json block");
            State::from_json(&body[..end])
                .unwrap_or_else(|e| panic!("README example does not parse: {e}\n{}", &body[..end]));
            blocks += 1;
            rest = &body[end + 3..];
        }
        assert!(
            blocks >= 3,
            "expected the format and two scenarios, found {blocks} blocks"
        );
    }
}
