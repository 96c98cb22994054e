//! The exported NVML C ABI: the `nvml*` functions that `nvml-wrapper` (or any
//! NVML client) resolves with `dlsym`, with the signatures and struct layouts
//! of `nvml.h` as bound by `nvml-wrapper-sys` 0.10.
//!
//! Every function re-reads the state file (see [`crate::State`]) so tests can
//! change the machine under a running daemon. Checks happen in NVML's order:
//! initialized? arguments non-null? state file readable? handle valid? device
//! failing? Only then is the query answered. No function unwinds into its
//! caller: each body runs under `catch_unwind`, and a panic becomes
//! `NVML_ERROR_UNKNOWN`.

// The exported names are NVML's, which are not snake case.
#![allow(non_snake_case)]

use std::ffi::{CStr, c_char, c_uint};
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::state::{self, DeviceFailure, FakeDevice, FakeProcess, InitError, State};

/// `nvmlReturn_t`: a status code.
pub type NvmlReturn = c_uint;

/// The call succeeded.
pub const NVML_SUCCESS: NvmlReturn = 0;
/// `nvmlInit` has not been called (or every init was matched by a shutdown).
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
/// A null pointer, an invalid device handle or an index past the last device.
pub const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
/// The device cannot answer this query (`processes_supported: false`).
pub const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
/// The caller's buffer is too small; for process lists the needed count is
/// written back.
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
/// `init_error: "driver_not_loaded"`.
pub const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
/// `fail: "gpu_lost"`.
pub const NVML_ERROR_GPU_IS_LOST: NvmlReturn = 15;
/// A versioned struct (`nvmlMemory_v2_t`) came with the wrong `version`.
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
/// `init_error`/`fail: "unknown"`, an unreadable state file, or a caught panic.
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// `NVML_VALUE_NOT_AVAILABLE` as a process's `usedGpuMemory`.
pub const NVML_VALUE_NOT_AVAILABLE: u64 = u64::MAX;
/// GPU/compute instance id of a process outside any MIG instance.
pub const NO_INSTANCE_ID: c_uint = 0xFFFF_FFFF;

/// `struct nvmlDevice_st`: opaque; never dereferenced.
#[repr(C)]
pub struct NvmlDeviceSt {
    _opaque: [u8; 0],
}

/// `nvmlDevice_t`: a device handle. The fake's handles are not real pointers:
/// they encode the device index as `HANDLE_BASE + index`.
pub type NvmlDevice = *mut NvmlDeviceSt;

/// `nvmlMemory_t` (v1): whole-device memory in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlMemory {
    /// Total memory.
    pub total: u64,
    /// Unallocated memory.
    pub free: u64,
    /// Allocated memory.
    pub used: u64,
}

/// `nvmlMemory_v2_t`: whole-device memory in bytes, with reserved memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlMemoryV2 {
    /// Must be [`NVML_MEMORY_V2`], set by the caller.
    pub version: c_uint,
    /// Total memory.
    pub total: u64,
    /// Memory reserved by the driver; always 0 in the fake.
    pub reserved: u64,
    /// Unallocated memory.
    pub free: u64,
    /// Allocated memory.
    pub used: u64,
}

/// `nvmlMemory_v2`: `NVML_STRUCT_VERSION(Memory, 2)`, the size of the struct
/// with the version number in the top byte.
pub const NVML_MEMORY_V2: c_uint = (size_of::<NvmlMemoryV2>() as c_uint) | (2 << 24);

/// `nvmlProcessInfo_t` (`nvmlProcessInfo_v2_t`), one entry of a process list.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmlProcessInfo {
    /// Process id.
    pub pid: c_uint,
    /// Bytes used, or [`NVML_VALUE_NOT_AVAILABLE`].
    pub used_gpu_memory: u64,
    /// MIG GPU instance; always [`NO_INSTANCE_ID`].
    pub gpu_instance_id: c_uint,
    /// MIG compute instance; always [`NO_INSTANCE_ID`].
    pub compute_instance_id: c_uint,
}

// The layouts nvml.h (and nvml-wrapper-sys) expect on 64-bit Linux.
const _: () = assert!(size_of::<NvmlMemory>() == 24);
const _: () = assert!(size_of::<NvmlMemoryV2>() == 40);
const _: () = assert!(NVML_MEMORY_V2 == 0x0200_0028);
const _: () = assert!(size_of::<NvmlProcessInfo>() == 24);
const _: () = assert!(std::mem::offset_of!(NvmlProcessInfo, used_gpu_memory) == 8);
const _: () = assert!(std::mem::offset_of!(NvmlProcessInfo, compute_instance_id) == 20);

/// First fake handle value; device `i` is `HANDLE_BASE + i`. Far from 0 so a
/// zeroed or small garbage handle is rejected.
const HANDLE_BASE: usize = 0xFA4E_0000;

/// Outstanding `nvmlInit` calls not yet matched by `nvmlShutdown`.
static INIT_COUNT: AtomicU32 = AtomicU32::new(0);

/// The last state-file problem printed to stderr, so a persisting problem is
/// reported once rather than on every call.
static LAST_PROBLEM: Mutex<Option<String>> = Mutex::new(None);

type Outcome = Result<(), NvmlReturn>;

/// Runs an export's body, turning `Err(code)` and panics into return codes.
fn ffi(body: impl FnOnce() -> Outcome) -> NvmlReturn {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => NVML_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

fn require_init() -> Outcome {
    if INIT_COUNT.load(Ordering::Acquire) == 0 {
        return Err(NVML_ERROR_UNINITIALIZED);
    }
    Ok(())
}

fn require(ok: bool) -> Outcome {
    if ok {
        Ok(())
    } else {
        Err(NVML_ERROR_INVALID_ARGUMENT)
    }
}

/// Records the current state-file problem (`None` when the file was read
/// fine) and prints a new one to stderr. Returns whether a line was printed.
fn report(problem: Option<String>) -> bool {
    let mut last = LAST_PROBLEM.lock().unwrap_or_else(PoisonError::into_inner);
    let print = problem.is_some() && *last != problem;
    if let (true, Some(line)) = (print, &problem) {
        // Never panic on a closed stderr (eprintln! would).
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    *last = problem;
    print
}

/// Reads the state file; an unreadable one is `NVML_ERROR_UNKNOWN`.
fn load() -> Result<State, NvmlReturn> {
    match state::load_from_env() {
        Ok(state) => {
            report(None);
            Ok(state)
        }
        Err(problem) => {
            report(Some(problem));
            Err(NVML_ERROR_UNKNOWN)
        }
    }
}

fn handle_for(index: usize) -> NvmlDevice {
    ptr::without_provenance_mut(HANDLE_BASE.wrapping_add(index))
}

fn device_of(state: &State, handle: NvmlDevice) -> Option<&FakeDevice> {
    let index = handle.addr().checked_sub(HANDLE_BASE)?;
    state.devices.get(index)
}

/// The common prologue of per-device queries, then `query` on the device.
fn device_query(
    device: NvmlDevice,
    args_non_null: bool,
    query: impl FnOnce(&FakeDevice) -> Outcome,
) -> NvmlReturn {
    ffi(|| {
        require_init()?;
        require(!device.is_null() && args_non_null)?;
        let state = load()?;
        let dev = device_of(&state, device).ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
        match dev.fail {
            Some(DeviceFailure::GpuLost) => return Err(NVML_ERROR_GPU_IS_LOST),
            Some(DeviceFailure::Unknown) => return Err(NVML_ERROR_UNKNOWN),
            None => {}
        }
        query(dev)
    })
}

/// Copies `text` and a terminating NUL into `buf`.
///
/// # Safety
/// `buf` is non-null and valid for writes of `length` bytes.
unsafe fn write_c_string(text: &str, buf: *mut c_char, length: c_uint) -> Outcome {
    let bytes = text.as_bytes();
    if bytes.len() >= length as usize {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: bytes.len() + 1 <= length, and the caller vouches for `length`
    // writable bytes at `buf`; a &str never overlaps a caller's buffer.
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    Ok(())
}

/// The two process-list queries: the per-device prologue, then
/// `NVML_ERROR_NOT_SUPPORTED` unless the device has `processes_supported`,
/// then the list `pick` chooses, written by [`write_processes`].
///
/// # Safety
/// `info_count` is null or valid for reads and writes; `infos` is null or
/// valid for writes of `*info_count` entries.
unsafe fn process_query(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
    pick: fn(&FakeDevice) -> &Vec<FakeProcess>,
) -> NvmlReturn {
    device_query(device, !info_count.is_null(), |dev| {
        if !dev.processes_supported {
            return Err(NVML_ERROR_NOT_SUPPORTED);
        }
        // SAFETY: `info_count` non-null; the caller vouches for both.
        unsafe { write_processes(pick(dev), info_count, infos) }
    })
}

/// Answers a process-list query with NVML's size protocol: `*info_count` is
/// the capacity of `infos` on entry and the number of entries on return; a
/// capacity of 0 with a null `infos` asks for the count
/// (`NVML_ERROR_INSUFFICIENT_SIZE` with the count, or success when empty).
///
/// # Safety
/// `info_count` is non-null and valid for reads and writes; `infos` is null or
/// valid for writes of `*info_count` entries.
unsafe fn write_processes(
    list: &[FakeProcess],
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> Outcome {
    // SAFETY: the caller vouches for `info_count`.
    let capacity = unsafe { info_count.read() };
    require(!infos.is_null() || capacity == 0)?;
    let needed = c_uint::try_from(list.len()).map_err(|_| NVML_ERROR_UNKNOWN)?;
    if needed > capacity {
        // SAFETY: as above.
        unsafe { info_count.write(needed) };
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (i, process) in list.iter().enumerate() {
        let entry = NvmlProcessInfo {
            pid: process.pid,
            used_gpu_memory: process.used_bytes.unwrap_or(NVML_VALUE_NOT_AVAILABLE),
            gpu_instance_id: NO_INSTANCE_ID,
            compute_instance_id: NO_INSTANCE_ID,
        };
        // SAFETY: i < needed <= capacity entries at `infos`, which is non-null
        // whenever the list is non-empty (capacity >= needed > 0). `write`
        // because the caller's buffer may be uninitialized.
        unsafe { infos.add(i).write(entry) };
    }
    // SAFETY: as above.
    unsafe { info_count.write(needed) };
    Ok(())
}

fn init() -> Outcome {
    let state = load()?;
    match state.init_error {
        Some(InitError::DriverNotLoaded) => Err(NVML_ERROR_DRIVER_NOT_LOADED),
        Some(InitError::Unknown) => Err(NVML_ERROR_UNKNOWN),
        None => {
            // Saturate rather than wrap after 2^32 unmatched inits.
            let _ =
                INIT_COUNT.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_add(1));
            Ok(())
        }
    }
}

/// `nvmlInit_v2`: reads the state file and fails with its `init_error`, or
/// counts one more initialization.
///
/// # Safety
/// None; `unsafe` only to match the other exports.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> NvmlReturn {
    ffi(init)
}

/// `nvmlInitWithFlags`: as [`nvmlInit_v2`]; the flags are ignored.
///
/// # Safety
/// None; `unsafe` only to match the other exports.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    ffi(init)
}

/// `nvmlShutdown`: undoes one successful init; `NVML_ERROR_UNINITIALIZED`
/// when there is none left to undo.
///
/// # Safety
/// None; `unsafe` only to match the other exports.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> NvmlReturn {
    ffi(|| {
        INIT_COUNT
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .map(drop)
            .map_err(|_| NVML_ERROR_UNINITIALIZED)
    })
}

fn error_string(result: NvmlReturn) -> &'static CStr {
    match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        NVML_ERROR_GPU_IS_LOST => c"GPU is lost",
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        NVML_ERROR_UNKNOWN => c"Unknown Error",
        _ => c"Unrecognized error code (fake-nvml)",
    }
}

/// `nvmlErrorString`: a static, NUL-terminated description of `result`;
/// never null, needs no init.
///
/// # Safety
/// None; the returned string lives as long as the library stays loaded.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    error_string(result).as_ptr()
}

/// `nvmlSystemGetDriverVersion`: the state's `driver_version`.
///
/// # Safety
/// `version` is null or valid for writes of `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    ffi(|| {
        require_init()?;
        require(!version.is_null())?;
        let state = load()?;
        // SAFETY: non-null, and the caller vouches for `length` bytes.
        unsafe { write_c_string(&state.driver_version, version, length) }
    })
}

/// `nvmlDeviceGetCount_v2`: the number of devices in the state file.
///
/// # Safety
/// `device_count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> NvmlReturn {
    ffi(|| {
        require_init()?;
        require(!device_count.is_null())?;
        let state = load()?;
        let count = c_uint::try_from(state.devices.len()).map_err(|_| NVML_ERROR_UNKNOWN)?;
        // SAFETY: non-null, and the caller vouches for it.
        unsafe { device_count.write(count) };
        Ok(())
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`: a handle for device `index`, also for a
/// failing device; `NVML_ERROR_INVALID_ARGUMENT` past the last device.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut NvmlDevice,
) -> NvmlReturn {
    ffi(|| {
        require_init()?;
        require(!device.is_null())?;
        let state = load()?;
        let index = usize::try_from(index).map_err(|_| NVML_ERROR_INVALID_ARGUMENT)?;
        require(index < state.devices.len())?;
        // SAFETY: non-null, and the caller vouches for it.
        unsafe { device.write(handle_for(index)) };
        Ok(())
    })
}

/// `nvmlDeviceGetUUID`: the device's `uuid`.
///
/// # Safety
/// `uuid` is null or valid for writes of `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: NvmlDevice,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    device_query(device, !uuid.is_null(), |dev| {
        // SAFETY: non-null, and the caller vouches for `length` bytes.
        unsafe { write_c_string(&dev.uuid, uuid, length) }
    })
}

/// `nvmlDeviceGetName`: the device's `name`.
///
/// # Safety
/// `name` is null or valid for writes of `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: NvmlDevice,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    device_query(device, !name.is_null(), |dev| {
        // SAFETY: non-null, and the caller vouches for `length` bytes.
        unsafe { write_c_string(&dev.name, name, length) }
    })
}

/// `nvmlDeviceGetMemoryInfo` (v1): total, free and used bytes.
///
/// # Safety
/// `memory` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: NvmlDevice,
    memory: *mut NvmlMemory,
) -> NvmlReturn {
    device_query(device, !memory.is_null(), |dev| {
        let info = NvmlMemory {
            total: dev.total_bytes,
            free: dev.free_bytes(),
            used: dev.used_bytes(),
        };
        // SAFETY: non-null, and the caller vouches for it.
        unsafe { memory.write(info) };
        Ok(())
    })
}

/// `nvmlDeviceGetMemoryInfo_v2`: total, reserved (0), free and used bytes;
/// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH` unless `memory.version` is
/// [`NVML_MEMORY_V2`].
///
/// # Safety
/// `memory` is null or valid for reads of its `version` and for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: NvmlDevice,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    device_query(device, !memory.is_null(), |dev| {
        // SAFETY: non-null; only the field the caller must have set is read.
        let version = unsafe { (&raw const (*memory).version).read() };
        if version != NVML_MEMORY_V2 {
            return Err(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let info = NvmlMemoryV2 {
            version,
            total: dev.total_bytes,
            reserved: 0,
            free: dev.free_bytes(),
            used: dev.used_bytes(),
        };
        // SAFETY: non-null, and the caller vouches for it.
        unsafe { memory.write(info) };
        Ok(())
    })
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`: the device's `processes`, with
/// NVML's count protocol (see the crate README).
///
/// # Safety
/// `info_count` is null or valid for reads and writes; `infos` is null or
/// valid for writes of `*info_count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    // SAFETY: the caller vouches for both pointers.
    unsafe { process_query(device, info_count, infos, |d| &d.processes) }
}

/// `nvmlDeviceGetMPSComputeRunningProcesses_v3`: the device's
/// `mps_processes`, as [`nvmlDeviceGetComputeRunningProcesses_v3`].
///
/// # Safety
/// `info_count` is null or valid for reads and writes; `infos` is null or
/// valid for writes of `*info_count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMPSComputeRunningProcesses_v3(
    device: NvmlDevice,
    info_count: *mut c_uint,
    infos: *mut NvmlProcessInfo,
) -> NvmlReturn {
    // SAFETY: the caller vouches for both pointers.
    unsafe { process_query(device, info_count, infos, |d| &d.mps_processes) }
}

#[cfg(test)]
mod tests {
    //! Calls the exports directly, covering what nvml-wrapper never exercises
    //! (null pointers, short buffers, bad handles, refcounting). The state
    //! path is process-wide, so every test holds `Scenario`'s lock.

    use super::*;
    use std::path::PathBuf;
    use std::sync::{MutexGuard, OnceLock};

    const GIB: u64 = 1 << 30;

    static LOCK: Mutex<()> = Mutex::new(());

    fn state_path() -> &'static PathBuf {
        static PATH: OnceLock<PathBuf> = OnceLock::new();
        PATH.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("fake-nvml-ffi-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("state.json");
            // SAFETY: set once, before any export reads it, while LOCK is
            // held; no other thread reads the environment in this binary.
            unsafe { std::env::set_var(state::STATE_ENV, &path) };
            path
        })
    }

    /// Holds the lock; writes the state; resets the init count on drop so a
    /// failed test does not leak an initialization into the next.
    struct Scenario {
        _lock: MutexGuard<'static, ()>,
    }

    impl Scenario {
        fn new(state: &State) -> Self {
            let lock = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
            std::fs::create_dir_all(state_path().parent().unwrap()).unwrap();
            state.write_atomic(state_path()).unwrap();
            INIT_COUNT.store(0, Ordering::SeqCst);
            Self { _lock: lock }
        }

        fn set(&self, state: &State) {
            state.write_atomic(state_path()).unwrap();
        }
    }

    impl Drop for Scenario {
        fn drop(&mut self) {
            INIT_COUNT.store(0, Ordering::SeqCst);
            let dir = state_path().parent().unwrap();
            let _ = std::fs::remove_file(state_path());
            let _ = std::fs::remove_dir(dir);
        }
    }

    fn two_devices() -> State {
        let mut a = FakeDevice::new("GPU-aaaa", "Fake A", 24 * GIB)
            .with_extra_used(GIB)
            .with_process(100, 2 * GIB)
            .with_process(101, 3 * GIB);
        a.processes.push(FakeProcess::unavailable(102));
        a.mps_processes.push(FakeProcess::new(200, 4 * GIB));
        State::new(vec![a, FakeDevice::new("GPU-bbbb", "Fake B", 12 * GIB)])
    }

    fn init() {
        assert_eq!(unsafe { nvmlInit_v2() }, NVML_SUCCESS);
    }

    fn handle(index: c_uint) -> NvmlDevice {
        let mut dev = ptr::null_mut();
        assert_eq!(
            unsafe { nvmlDeviceGetHandleByIndex_v2(index, &mut dev) },
            NVML_SUCCESS
        );
        assert!(!dev.is_null());
        dev
    }

    fn uuid_of(dev: NvmlDevice) -> Result<String, NvmlReturn> {
        let mut buf = [0 as c_char; 96];
        match unsafe { nvmlDeviceGetUUID(dev, buf.as_mut_ptr(), 96) } {
            NVML_SUCCESS => Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_str()
                .unwrap()
                .to_owned()),
            code => Err(code),
        }
    }

    fn memory_v2(dev: NvmlDevice) -> Result<NvmlMemoryV2, NvmlReturn> {
        let mut mem = NvmlMemoryV2 {
            version: NVML_MEMORY_V2,
            ..Default::default()
        };
        match unsafe { nvmlDeviceGetMemoryInfo_v2(dev, &mut mem) } {
            NVML_SUCCESS => Ok(mem),
            code => Err(code),
        }
    }

    type ProcessQuery =
        unsafe extern "C" fn(NvmlDevice, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;
    const COMPUTE: ProcessQuery = nvmlDeviceGetComputeRunningProcesses_v3;
    const MPS: ProcessQuery = nvmlDeviceGetMPSComputeRunningProcesses_v3;

    #[test]
    fn everything_but_init_needs_init() {
        let _s = Scenario::new(&two_devices());
        let mut n = 0;
        let mut dev = ptr::null_mut();
        let mut buf = [0 as c_char; 96];
        assert_eq!(
            unsafe { nvmlDeviceGetCount_v2(&mut n) },
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(
            unsafe { nvmlDeviceGetHandleByIndex_v2(0, &mut dev) },
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(
            unsafe { nvmlSystemGetDriverVersion(buf.as_mut_ptr(), 96) },
            NVML_ERROR_UNINITIALIZED
        );
        let fake = handle_for(0);
        assert_eq!(uuid_of(fake), Err(NVML_ERROR_UNINITIALIZED));
        assert_eq!(memory_v2(fake), Err(NVML_ERROR_UNINITIALIZED));
        assert_eq!(
            unsafe { COMPUTE(fake, &mut n, ptr::null_mut()) },
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(unsafe { nvmlShutdown() }, NVML_ERROR_UNINITIALIZED);
    }

    #[test]
    fn init_and_shutdown_are_counted() {
        let _s = Scenario::new(&two_devices());
        init();
        assert_eq!(unsafe { nvmlInitWithFlags(0) }, NVML_SUCCESS);
        let mut n = 0;
        assert_eq!(unsafe { nvmlShutdown() }, NVML_SUCCESS);
        assert_eq!(unsafe { nvmlDeviceGetCount_v2(&mut n) }, NVML_SUCCESS);
        assert_eq!(n, 2);
        assert_eq!(unsafe { nvmlShutdown() }, NVML_SUCCESS);
        assert_eq!(
            unsafe { nvmlDeviceGetCount_v2(&mut n) },
            NVML_ERROR_UNINITIALIZED
        );
        assert_eq!(unsafe { nvmlShutdown() }, NVML_ERROR_UNINITIALIZED);
    }

    #[test]
    fn init_errors_come_from_the_state() {
        let s = Scenario::new(&two_devices().with_init_error(InitError::DriverNotLoaded));
        assert_eq!(unsafe { nvmlInit_v2() }, NVML_ERROR_DRIVER_NOT_LOADED);
        assert_eq!(
            unsafe { nvmlInitWithFlags(0) },
            NVML_ERROR_DRIVER_NOT_LOADED
        );
        s.set(&two_devices().with_init_error(InitError::Unknown));
        assert_eq!(unsafe { nvmlInit_v2() }, NVML_ERROR_UNKNOWN);
        // A failed init does not count.
        assert_eq!(unsafe { nvmlShutdown() }, NVML_ERROR_UNINITIALIZED);
    }

    #[test]
    fn null_pointers_are_invalid_arguments() {
        let _s = Scenario::new(&two_devices());
        init();
        let dev = handle(0);
        let null_char = ptr::null_mut::<c_char>();
        assert_eq!(
            unsafe { nvmlDeviceGetCount_v2(ptr::null_mut()) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { nvmlDeviceGetHandleByIndex_v2(0, ptr::null_mut()) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { nvmlSystemGetDriverVersion(null_char, 80) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { nvmlDeviceGetUUID(dev, null_char, 96) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { nvmlDeviceGetName(dev, null_char, 96) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { nvmlDeviceGetMemoryInfo(dev, ptr::null_mut()) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { nvmlDeviceGetMemoryInfo_v2(dev, ptr::null_mut()) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        for query in [COMPUTE, MPS] {
            assert_eq!(
                unsafe { query(dev, ptr::null_mut(), ptr::null_mut()) },
                NVML_ERROR_INVALID_ARGUMENT
            );
            // A null buffer is only allowed with a capacity of 0.
            let mut n = 5;
            assert_eq!(
                unsafe { query(dev, &mut n, ptr::null_mut()) },
                NVML_ERROR_INVALID_ARGUMENT
            );
        }
    }

    #[test]
    fn bad_handles_are_invalid_arguments() {
        let _s = Scenario::new(&two_devices());
        init();
        let mut dev = ptr::null_mut();
        assert_eq!(
            unsafe { nvmlDeviceGetHandleByIndex_v2(2, &mut dev) },
            NVML_ERROR_INVALID_ARGUMENT
        );
        assert!(dev.is_null());
        for bad in [
            ptr::null_mut(),
            handle_for(2),
            ptr::without_provenance_mut(0x10),
        ] {
            assert_eq!(uuid_of(bad), Err(NVML_ERROR_INVALID_ARGUMENT));
            assert_eq!(memory_v2(bad), Err(NVML_ERROR_INVALID_ARGUMENT));
        }
        assert_eq!(uuid_of(handle(1)).as_deref(), Ok("GPU-bbbb"));
    }

    #[test]
    fn strings_need_room_for_the_nul() {
        let _s = Scenario::new(&two_devices());
        init();
        let dev = handle(0);
        let mut buf = [0x7f as c_char; 16];
        // "GPU-aaaa" is 8 bytes: 8 is too short, 9 fits exactly.
        assert_eq!(
            unsafe { nvmlDeviceGetUUID(dev, buf.as_mut_ptr(), 8) },
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(
            unsafe { nvmlDeviceGetUUID(dev, buf.as_mut_ptr(), 9) },
            NVML_SUCCESS
        );
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }, c"GPU-aaaa");
        assert_eq!(buf[9], 0x7f, "wrote past the terminator");
        assert_eq!(
            unsafe { nvmlDeviceGetName(dev, buf.as_mut_ptr(), 6) },
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(
            unsafe { nvmlDeviceGetName(dev, buf.as_mut_ptr(), 16) },
            NVML_SUCCESS
        );
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }, c"Fake A");
        assert_eq!(
            unsafe { nvmlSystemGetDriverVersion(buf.as_mut_ptr(), 6) },
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(
            unsafe { nvmlSystemGetDriverVersion(buf.as_mut_ptr(), 7) },
            NVML_SUCCESS
        );
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }, c"999.99");
    }

    #[test]
    fn memory_v1_and_v2_agree() {
        let _s = Scenario::new(&two_devices());
        init();
        let dev = handle(0);
        // used = 1 extra + 2 + 3 + (unavailable: 0) + 4 MPS = 10 GiB.
        let v2 = memory_v2(dev).unwrap();
        assert_eq!(
            v2,
            NvmlMemoryV2 {
                version: NVML_MEMORY_V2,
                total: 24 * GIB,
                reserved: 0,
                free: 14 * GIB,
                used: 10 * GIB,
            }
        );
        let mut v1 = NvmlMemory::default();
        assert_eq!(
            unsafe { nvmlDeviceGetMemoryInfo(dev, &mut v1) },
            NVML_SUCCESS
        );
        assert_eq!(
            v1,
            NvmlMemory {
                total: 24 * GIB,
                free: 14 * GIB,
                used: 10 * GIB
            }
        );
        let mut wrong = NvmlMemoryV2 {
            version: 1 << 24 | 40,
            ..Default::default()
        };
        assert_eq!(
            unsafe { nvmlDeviceGetMemoryInfo_v2(dev, &mut wrong) },
            NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        );
    }

    #[test]
    fn process_lists_follow_the_count_protocol() {
        let _s = Scenario::new(&two_devices());
        init();
        let dev = handle(0);
        // Count query: capacity 0, null buffer.
        let mut n = 0;
        assert_eq!(
            unsafe { COMPUTE(dev, &mut n, ptr::null_mut()) },
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(n, 3);
        // Too small a buffer: the needed count comes back.
        let mut buf = [NvmlProcessInfo::default(); 5];
        n = 2;
        assert_eq!(
            unsafe { COMPUTE(dev, &mut n, buf.as_mut_ptr()) },
            NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(n, 3);
        // Room to spare: three entries, the rest untouched.
        n = 5;
        assert_eq!(
            unsafe { COMPUTE(dev, &mut n, buf.as_mut_ptr()) },
            NVML_SUCCESS
        );
        assert_eq!(n, 3);
        let entry = |pid, used_gpu_memory| NvmlProcessInfo {
            pid,
            used_gpu_memory,
            gpu_instance_id: NO_INSTANCE_ID,
            compute_instance_id: NO_INSTANCE_ID,
        };
        assert_eq!(
            buf[..3],
            [
                entry(100, 2 * GIB),
                entry(101, 3 * GIB),
                entry(102, NVML_VALUE_NOT_AVAILABLE)
            ]
        );
        assert_eq!(buf[3], NvmlProcessInfo::default());
        // MPS is its own list.
        n = 5;
        assert_eq!(unsafe { MPS(dev, &mut n, buf.as_mut_ptr()) }, NVML_SUCCESS);
        assert_eq!(n, 1);
        assert_eq!(buf[0], entry(200, 4 * GIB));
        // An idle device answers the count query with success and 0.
        let idle = handle(1);
        for query in [COMPUTE, MPS] {
            n = 0;
            assert_eq!(
                unsafe { query(idle, &mut n, ptr::null_mut()) },
                NVML_SUCCESS
            );
            assert_eq!(n, 0);
        }
    }

    #[test]
    fn failing_devices_fail_every_query_but_get_handle() {
        let mut state = two_devices();
        state.devices[0].fail = Some(DeviceFailure::GpuLost);
        state.devices[1].fail = Some(DeviceFailure::Unknown);
        let _s = Scenario::new(&state);
        init();
        for (index, code) in [(0, NVML_ERROR_GPU_IS_LOST), (1, NVML_ERROR_UNKNOWN)] {
            let dev = handle(index);
            let mut buf = [0 as c_char; 96];
            let mut v1 = NvmlMemory::default();
            let mut n = 0;
            assert_eq!(uuid_of(dev), Err(code));
            assert_eq!(
                unsafe { nvmlDeviceGetName(dev, buf.as_mut_ptr(), 96) },
                code
            );
            assert_eq!(memory_v2(dev), Err(code));
            assert_eq!(unsafe { nvmlDeviceGetMemoryInfo(dev, &mut v1) }, code);
            assert_eq!(unsafe { COMPUTE(dev, &mut n, ptr::null_mut()) }, code);
            assert_eq!(unsafe { MPS(dev, &mut n, ptr::null_mut()) }, code);
        }
    }

    #[test]
    fn unsupported_process_queries() {
        let mut state = two_devices();
        state.devices[0].processes_supported = false;
        let _s = Scenario::new(&state);
        init();
        let dev = handle(0);
        let mut n = 0;
        assert_eq!(
            unsafe { COMPUTE(dev, &mut n, ptr::null_mut()) },
            NVML_ERROR_NOT_SUPPORTED
        );
        assert_eq!(
            unsafe { MPS(dev, &mut n, ptr::null_mut()) },
            NVML_ERROR_NOT_SUPPORTED
        );
        assert_eq!(memory_v2(dev).unwrap().used, 10 * GIB);
    }

    #[test]
    fn unreadable_state_is_unknown_and_reported_once() {
        let s = Scenario::new(&two_devices());
        init();
        let dev = handle(0);
        std::fs::write(state_path(), "{ broken").unwrap();
        let mut n = 0;
        assert_eq!(unsafe { nvmlDeviceGetCount_v2(&mut n) }, NVML_ERROR_UNKNOWN);
        let line = LAST_PROBLEM.lock().unwrap().clone().unwrap();
        assert!(
            line.contains(&state_path().display().to_string()) && line.contains("line 1"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        // The same problem again is not printed again.
        assert!(!report(Some(line.clone())));
        assert_eq!(memory_v2(dev), Err(NVML_ERROR_UNKNOWN));
        std::fs::remove_file(state_path()).unwrap();
        assert_eq!(uuid_of(dev), Err(NVML_ERROR_UNKNOWN));
        assert_eq!(unsafe { nvmlInit_v2() }, NVML_ERROR_UNKNOWN);
        // A good read clears it, so the next breakage is printed.
        s.set(&two_devices());
        assert_eq!(uuid_of(dev).as_deref(), Ok("GPU-aaaa"));
        assert_eq!(*LAST_PROBLEM.lock().unwrap(), None);
        assert!(report(Some(line)));
        report(None);
    }

    #[test]
    fn error_strings_are_never_null() {
        for code in [0, 1, 2, 3, 7, 9, 15, 25, 999, 12345] {
            let text = unsafe { nvmlErrorString(code) };
            assert!(!text.is_null());
            assert!(!unsafe { CStr::from_ptr(text) }.is_empty());
        }
        assert_eq!(error_string(NVML_ERROR_GPU_IS_LOST), c"GPU is lost");
    }
}
