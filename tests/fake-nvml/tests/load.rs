//! Loads the built `libfake_nvml.so` through nvml-wrapper 0.13 — the crate
//! vramd's NVML backend uses — and checks that what it reports follows the
//! state file. `FAKE_NVML_STATE` is process-wide, so every test holds `LOCK`
//! and they all share one state path, set once before the first init.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use fake_nvml::{CDYLIB_FILE_NAME, DeviceFailure, FakeDevice, FakeProcess, InitError, State};
use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

const GIB: u64 = 1 << 30;
const UUID_A: &str = "GPU-11111111-2222-3333-4444-555555555555";
const UUID_B: &str = "GPU-66666666-7777-8888-9999-000000000000";

static LOCK: Mutex<()> = Mutex::new(());

/// The cdylib this test build made: `target/<profile>/deps/libfake_nvml.so`
/// (or the uplifted copy beside `deps/`).
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    fake_nvml::find_cdylib_near(&exe).unwrap_or_else(|| {
        panic!(
            "the fake NVML library ({CDYLIB_FILE_NAME}) is not next to {}; \
             `cargo test -p fake-nvml` should have built it",
            exe.display()
        )
    })
}

fn state_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fake-nvml-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create state dir");
        let path = dir.join("state.json");
        // SAFETY: set once, under LOCK, before any NVML call; nothing else in
        // this process reads the environment concurrently.
        unsafe { std::env::set_var(fake_nvml::STATE_ENV, &path) };
        path
    })
}

/// Holds the lock for one test and writes its states; cleans up on drop.
struct Scenario {
    _lock: MutexGuard<'static, ()>,
}

impl Scenario {
    fn new(state: &State) -> Self {
        let lock = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        std::fs::create_dir_all(state_path().parent().unwrap()).expect("create state dir");
        let scenario = Self { _lock: lock };
        scenario.set(state);
        scenario
    }

    fn set(&self, state: &State) {
        state.write_atomic(state_path()).expect("write state file");
    }

    fn init(&self) -> Result<Nvml, NvmlError> {
        let lib = cdylib();
        Nvml::builder().lib_path(lib.as_os_str()).init()
    }
}

impl Drop for Scenario {
    /// Removes the state file and its directory; the next test recreates them.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(state_path());
        let _ = std::fs::remove_dir(state_path().parent().unwrap());
    }
}

fn two_gpus() -> State {
    let mut a = FakeDevice::new(UUID_A, "Fake GPU 24GB", 24 * GIB)
        .with_extra_used(GIB)
        .with_process(1234, 10 * GIB)
        .with_process(1235, 2 * GIB);
    a.processes.push(FakeProcess::unavailable(1236));
    a.mps_processes.push(FakeProcess::new(4321, 3 * GIB));
    State::new(vec![a, FakeDevice::new(UUID_B, "Fake GPU 12GB", 12 * GIB)])
}

fn pids_and_usage(list: &[ProcessInfo]) -> Vec<(u32, UsedGpuMemory)> {
    list.iter()
        .map(|p| (p.pid, p.used_gpu_memory.clone()))
        .collect()
}

#[test]
fn reports_devices_memory_and_processes() {
    let s = Scenario::new(&two_gpus());
    let nvml = s.init().expect("init");
    assert_eq!(nvml.sys_driver_version().unwrap(), "999.99");
    assert_eq!(nvml.device_count().unwrap(), 2);

    let a = nvml.device_by_index(0).unwrap();
    assert_eq!(a.uuid().unwrap(), UUID_A);
    assert_eq!(a.name().unwrap(), "Fake GPU 24GB");
    let mem = a.memory_info().unwrap();
    // used = 1 extra + 10 + 2 + (1236 unavailable: 0) + 3 MPS = 16 GiB.
    assert_eq!(
        (mem.total, mem.used, mem.free, mem.reserved),
        (24 * GIB, 16 * GIB, 8 * GIB, 0)
    );

    let procs = a.running_compute_processes().unwrap();
    assert_eq!(
        pids_and_usage(&procs),
        vec![
            (1234, UsedGpuMemory::Used(10 * GIB)),
            (1235, UsedGpuMemory::Used(2 * GIB)),
            (1236, UsedGpuMemory::Unavailable),
        ]
    );
    assert!(
        procs
            .iter()
            .all(|p| p.gpu_instance_id.is_none() && p.compute_instance_id.is_none()),
        "{procs:?}"
    );
    assert_eq!(a.running_compute_processes_count().unwrap(), 3);
    assert_eq!(
        pids_and_usage(&a.mps_running_compute_processes().unwrap()),
        vec![(4321, UsedGpuMemory::Used(3 * GIB))]
    );

    let b = nvml.device_by_index(1).unwrap();
    assert_eq!(b.uuid().unwrap(), UUID_B);
    assert_eq!(b.name().unwrap(), "Fake GPU 12GB");
    let mem = b.memory_info().unwrap();
    assert_eq!((mem.total, mem.used, mem.free), (12 * GIB, 0, 12 * GIB));
    assert!(b.running_compute_processes().unwrap().is_empty());
    assert!(b.mps_running_compute_processes().unwrap().is_empty());

    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));
    // A function the fake does not export is an error, not a crash.
    assert!(matches!(a.brand(), Err(NvmlError::FailedToLoadSymbol(_))));
    nvml.shutdown().expect("shutdown");
}

#[test]
fn sees_state_file_edits_on_the_next_call() {
    let s = Scenario::new(&two_gpus());
    let nvml = s.init().expect("init");
    let a = nvml.device_by_index(0).unwrap();
    assert_eq!(a.memory_info().unwrap().used, 16 * GIB);

    // Process 1234 exits, 5678 loads 6 GiB, the card reports a new total.
    let mut next = two_gpus();
    next.devices[0].total_bytes = 20 * GIB;
    next.devices[0].processes.remove(0);
    next.devices[0]
        .processes
        .push(FakeProcess::new(5678, 6 * GIB));
    s.set(&next);

    let mem = a.memory_info().unwrap();
    assert_eq!(
        (mem.total, mem.used, mem.free),
        (20 * GIB, 12 * GIB, 8 * GIB)
    );
    assert_eq!(
        pids_and_usage(&a.running_compute_processes().unwrap()),
        vec![
            (1235, UsedGpuMemory::Used(2 * GIB)),
            (1236, UsedGpuMemory::Unavailable),
            (5678, UsedGpuMemory::Used(6 * GIB)),
        ]
    );

    // Usage beyond the total: free saturates at 0.
    next.devices[0].extra_used_bytes = 30 * GIB;
    s.set(&next);
    let mem = a.memory_info().unwrap();
    assert_eq!((mem.used, mem.free), (41 * GIB, 0));

    // A device disappears: count drops, its old handle becomes invalid.
    s.set(&State::new(vec![FakeDevice::new(
        UUID_B,
        "Fake GPU 12GB",
        12 * GIB,
    )]));
    assert_eq!(nvml.device_count().unwrap(), 1);
    assert_eq!(
        a.uuid().unwrap(),
        UUID_B,
        "handle 0 now names the only device"
    );
    s.set(&State::default());
    assert_eq!(nvml.device_count().unwrap(), 0);
    assert!(matches!(a.uuid(), Err(NvmlError::InvalidArg)));

    // An unreadable state file makes calls fail with Unknown, until fixed.
    std::fs::write(state_path(), "{ not json").unwrap();
    assert!(matches!(nvml.device_count(), Err(NvmlError::Unknown)));
    std::fs::remove_file(state_path()).unwrap();
    assert!(matches!(nvml.device_count(), Err(NvmlError::Unknown)));
    s.set(&two_gpus());
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert_eq!(a.memory_info().unwrap().used, 16 * GIB);
}

#[test]
fn failing_devices_and_unsupported_process_queries() {
    let mut state = two_gpus();
    state.devices[0].fail = Some(DeviceFailure::GpuLost);
    let s = Scenario::new(&state);
    let nvml = s.init().expect("init");
    assert_eq!(nvml.device_count().unwrap(), 2);
    let a = nvml
        .device_by_index(0)
        .expect("the handle of a lost GPU is still available");
    assert!(matches!(a.memory_info(), Err(NvmlError::GpuLost)));
    assert!(matches!(a.uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(a.name(), Err(NvmlError::GpuLost)));
    assert!(matches!(
        a.running_compute_processes(),
        Err(NvmlError::GpuLost)
    ));
    assert!(matches!(
        a.mps_running_compute_processes(),
        Err(NvmlError::GpuLost)
    ));
    // The other device is unaffected.
    let b = nvml.device_by_index(1).unwrap();
    assert_eq!(b.memory_info().unwrap().total, 12 * GIB);

    state.devices[0].fail = Some(DeviceFailure::Unknown);
    s.set(&state);
    assert!(matches!(a.memory_info(), Err(NvmlError::Unknown)));
    assert!(matches!(
        a.running_compute_processes(),
        Err(NvmlError::Unknown)
    ));

    state.devices[0].fail = None;
    state.devices[0].processes_supported = false;
    s.set(&state);
    assert!(matches!(
        a.running_compute_processes(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        a.running_compute_processes_count(),
        Err(NvmlError::NotSupported)
    ));
    assert!(matches!(
        a.mps_running_compute_processes(),
        Err(NvmlError::NotSupported)
    ));
    // Memory is still reported, processes still counted in `used`.
    assert_eq!(a.memory_info().unwrap().used, 16 * GIB);
}

#[test]
fn init_fails_as_the_state_says() {
    let s = Scenario::new(&two_gpus().with_init_error(InitError::DriverNotLoaded));
    assert!(matches!(s.init(), Err(NvmlError::DriverNotLoaded)));
    let lib = cdylib();
    let with_flags = Nvml::builder()
        .lib_path(lib.as_os_str())
        .flags(nvml_wrapper::bitmasks::InitFlags::NO_GPUS)
        .init();
    assert!(matches!(with_flags, Err(NvmlError::DriverNotLoaded)));

    s.set(&two_gpus().with_init_error(InitError::Unknown));
    assert!(matches!(s.init(), Err(NvmlError::Unknown)));

    std::fs::write(state_path(), r#"{"devices": [{"uuid": "GPU-x"}]}"#).unwrap();
    assert!(matches!(s.init(), Err(NvmlError::Unknown)));
    std::fs::remove_file(state_path()).unwrap();
    assert!(matches!(s.init(), Err(NvmlError::Unknown)));

    s.set(&two_gpus());
    let nvml = s.init().expect("init once the state allows it");
    assert_eq!(nvml.device_count().unwrap(), 2);
    let flagged = Nvml::builder()
        .lib_path(lib.as_os_str())
        .flags(nvml_wrapper::bitmasks::InitFlags::NO_GPUS)
        .init()
        .expect("nvmlInitWithFlags");
    assert_eq!(flagged.device_count().unwrap(), 2);
}
