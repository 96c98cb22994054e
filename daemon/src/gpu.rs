//! GPU backends: where the daemon learns which devices exist and how much
//! memory is in use on them.
//!
//! Only the simulated backend exists so far: devices declared on the command
//! line (`--simulate 24GiB`), on which what each reservation holds counts as
//! used by its process. The NVML backend (real cards, per-process usage) plugs
//! in through [`ReadingSource::Measured`] readings.

use crate::ledger::{DeviceSpec, ReadingSource};

/// Devices and where their readings come from.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Name shown in status (`simulated`, `nvml`).
    pub name: &'static str,
    /// The devices, in index order.
    pub devices: Vec<DeviceSpec>,
    /// Where readings come from.
    pub source: ReadingSource,
}

impl Backend {
    /// Simulated devices with these total sizes, indexed from 0, with UUIDs
    /// `SIM-0`, `SIM-1`, ….
    pub fn simulated(totals_bytes: &[u64]) -> Self {
        Self {
            name: "simulated",
            devices: totals_bytes
                .iter()
                .enumerate()
                .map(|(i, &total_bytes)| DeviceSpec {
                    index: i as u32,
                    uuid: format!("SIM-{i}"),
                    name: "Simulated GPU".to_string(),
                    total_bytes,
                })
                .collect(),
            source: ReadingSource::Simulated,
        }
    }
}
