//! The NVML backend: real NVIDIA GPUs through libnvidia-ml (nvml-wrapper),
//! loaded at run time from `libnvidia-ml.so.1` or `--nvml-lib PATH`.
//!
//! Per device it reads total and used memory, and the compute processes
//! (and MPS compute processes) with their usage. Where NVML cannot tell a
//! process's usage (not supported, or reported as unavailable), the reading
//! has no per-process usage and the ledger falls back to the cautious
//! `used + Σ reserved`.

use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::{Backend, GpuReader};
use vramd_ledger::{DeviceSpec, ProcessUsage, Reading, ReadingSource};

/// The library loaded when no `--nvml-lib` is given.
pub const DEFAULT_LIB: &str = "libnvidia-ml.so.1";

/// Why the NVML backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum NvmlStartError {
    /// The library could not be loaded.
    #[error(
        "cannot load {lib} ({detail}): no NVIDIA driver library was found. Install the NVIDIA driver, \
         point --nvml-lib at libnvidia-ml.so.1, or run with --simulate 24GiB to arbitrate a simulated device"
    )]
    NotFound {
        /// The library path or name tried.
        lib: String,
        /// The loader's message.
        detail: String,
    },
    /// The library loaded but NVML failed.
    #[error("NVML failed ({0}); run with --simulate 24GiB to use a simulated device instead")]
    Nvml(String),
    /// No GPU was found.
    #[error("NVML found no GPU; run with --simulate 24GiB to use a simulated device instead")]
    NoDevices,
}

struct NvmlReader {
    nvml: Nvml,
}

/// Opens NVML from `lib` (default [`DEFAULT_LIB`]) and describes its devices.
pub fn open(lib: Option<&Path>) -> Result<Backend, NvmlStartError> {
    let lib_name = lib.map_or_else(|| DEFAULT_LIB.to_string(), |p| p.display().to_string());
    let mut builder = Nvml::builder();
    if let Some(p) = lib {
        builder.lib_path(p.as_os_str());
    }
    let nvml = builder.init().map_err(|e| match e {
        NvmlError::LibloadingError(detail) => NvmlStartError::NotFound {
            lib: lib_name.clone(),
            detail: detail.to_string(),
        },
        NvmlError::DriverNotLoaded => NvmlStartError::NotFound {
            lib: lib_name.clone(),
            detail: "the NVIDIA kernel driver is not loaded".into(),
        },
        other => NvmlStartError::Nvml(other.to_string()),
    })?;
    let count = nvml
        .device_count()
        .map_err(|e| NvmlStartError::Nvml(e.to_string()))?;
    if count == 0 {
        return Err(NvmlStartError::NoDevices);
    }
    let mut devices = Vec::with_capacity(count as usize);
    for index in 0..count {
        let d = nvml
            .device_by_index(index)
            .map_err(|e| NvmlStartError::Nvml(format!("device {index}: {e}")))?;
        let uuid = d
            .uuid()
            .map_err(|e| NvmlStartError::Nvml(format!("device {index} uuid: {e}")))?;
        let name = d.name().unwrap_or_else(|_| "NVIDIA GPU".to_string());
        let total_bytes = d
            .memory_info()
            .map_err(|e| NvmlStartError::Nvml(format!("device {index} memory: {e}")))?
            .total;
        devices.push(DeviceSpec {
            index,
            uuid,
            name,
            total_bytes,
        });
    }
    Ok(Backend {
        name: "nvml",
        devices,
        // Replaced by the first readings before the daemon serves anyone
        // (see `gpu::read_all`).
        source: ReadingSource::Measured(Reading::default()),
        reader: Some(Box::new(NvmlReader { nvml })),
    })
}

/// One entry per process. Under MPS a client process is listed both among
/// the compute processes and among the MPS compute processes, with the same
/// usage (seen on an H100, driver 580): summed, its reservation showed twice
/// what it held and was flagged over-reserved. An entry listed twice counts
/// once, at the larger of its figures.
fn once_per_pid(list: Vec<ProcessUsage>) -> Vec<ProcessUsage> {
    let mut out: Vec<ProcessUsage> = Vec::with_capacity(list.len());
    for p in list {
        match out.iter_mut().find(|q| q.pid == p.pid) {
            Some(q) => q.bytes = q.bytes.max(p.bytes),
            None => out.push(p),
        }
    }
    out
}

impl GpuReader for NvmlReader {
    fn read(&mut self, index: usize) -> Result<Reading, String> {
        let d = self
            .nvml
            .device_by_index(index as u32)
            .map_err(|e| format!("NVML: {e}"))?;
        let mem = d
            .memory_info()
            .map_err(|e| format!("NVML memory info: {e}"))?;
        let processes = match d.running_compute_processes() {
            Ok(list) => {
                let mut all = list;
                match d.mps_running_compute_processes() {
                    Ok(mps) => all.extend(mps),
                    // MPS is often absent or unsupported: nothing to add.
                    Err(NvmlError::NotSupported | NvmlError::FunctionNotFound) => {}
                    Err(e) => return Err(format!("NVML MPS processes: {e}")),
                }
                all.into_iter()
                    .map(|p| match p.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => Some(ProcessUsage::new(p.pid, bytes)),
                        // One unknown usage makes attribution unsound: fall back.
                        UsedGpuMemory::Unavailable => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(once_per_pid)
            }
            Err(NvmlError::NotSupported | NvmlError::FunctionNotFound) => None,
            Err(e) => return Err(format!("NVML processes: {e}")),
        };
        Ok(Reading {
            used_bytes: mem.used,
            processes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_listed_twice_counts_once() {
        let list = vec![
            ProcessUsage::new(1018, 2564 << 20),
            ProcessUsage::new(1039, 66 << 20),
            ProcessUsage::new(1018, 2564 << 20),
        ];
        let merged = once_per_pid(list);
        assert_eq!(
            merged
                .iter()
                .map(|p| (p.pid, p.bytes >> 20))
                .collect::<Vec<_>>(),
            vec![(1018, 2564), (1039, 66)]
        );
        let uneven = once_per_pid(vec![ProcessUsage::new(7, 1), ProcessUsage::new(7, 5)]);
        assert_eq!((uneven.len(), uneven[0].bytes), (1, 5));
    }
}
