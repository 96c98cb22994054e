//! GPU backends: which devices exist and how much memory is in use on them.
//!
//! - **nvml** (default): real NVIDIA GPUs through libnvidia-ml, loaded at run
//!   time ([`nvml`]). Readings are taken on a dedicated thread ([`Poller`]),
//!   never on the async executor: a few times a second, and at once when the
//!   core asks (after every release), so a freed card is granted without
//!   waiting for the next tick.
//! - **simulated** (`--simulate 24GiB`): declared devices on which what each
//!   reservation holds counts as used by its process; no readings at all.
//!
//! A reading failure marks the device unhealthy in the ledger (no new grants
//! on it) until a reading succeeds again; the daemon never panics on it.

pub mod nvml;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vramd_ledger::{DeviceSpec, Reading, ReadingSource};

/// Reads devices' memory. Implementations block; they run on the poller thread.
pub trait GpuReader: Send {
    /// Reads device `index` (position in [`Backend::devices`]).
    fn read(&mut self, index: usize) -> Result<Reading, String>;
}

/// Devices, where their readings come from, and the reader if there is one.
pub struct Backend {
    /// Name shown in status (`simulated`, `nvml`).
    pub name: &'static str,
    /// The devices, in index order.
    pub devices: Vec<DeviceSpec>,
    /// Where readings come from.
    pub source: ReadingSource,
    /// The reader of a measuring backend; `None` for simulated devices.
    pub reader: Option<Box<dyn GpuReader>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
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
            reader: None,
        }
    }
}

/// Readings of every device, taken together.
#[derive(Debug)]
pub struct Readings {
    /// When the reading started (a reading reflects the device at or after it).
    pub taken_at: Instant,
    /// One result per device, in index order.
    pub results: Vec<Result<Reading, String>>,
}

/// Handle to the poller thread: ask it for a fresh reading.
#[derive(Debug, Clone)]
pub struct Poller {
    refresh: mpsc::Sender<()>,
}

impl Poller {
    /// Starts the poller thread: it reads every device each `interval`, and at
    /// once after [`Poller::refresh`], and hands the readings to `deliver`.
    /// The thread ends when `deliver` returns false.
    pub fn start(
        mut reader: Box<dyn GpuReader>,
        devices: usize,
        interval: Duration,
        deliver: impl Fn(Readings) -> bool + Send + 'static,
    ) -> std::io::Result<Poller> {
        let (tx, rx) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("vramd-poller".into())
            .spawn(move || {
                loop {
                    if !deliver(read_all(&mut *reader, devices)) {
                        return;
                    }
                    match rx.recv_timeout(interval) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Several refresh requests while we read: one reading serves them all.
                            while rx.try_recv().is_ok() {}
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Poller { refresh: tx })
    }

    /// Asks for a reading now (e.g. after a release).
    pub fn refresh(&self) {
        let _ = self.refresh.send(());
    }
}

/// Reads every device once (blocking), with process ancestry.
pub fn read_all(reader: &mut dyn GpuReader, devices: usize) -> Readings {
    let taken_at = Instant::now();
    let results = (0..devices)
        .map(|i| read_with_ancestry(reader, i))
        .collect();
    Readings { taken_at, results }
}

/// Reads a device and fills in each process's ancestors and user id from
/// /proc (uid 0 where the process cannot be read).
fn read_with_ancestry(reader: &mut dyn GpuReader, index: usize) -> Result<Reading, String> {
    let mut reading = reader.read(index)?;
    if let Some(procs) = reading.processes.as_mut() {
        for p in procs.iter_mut() {
            if p.ancestors.is_empty() {
                p.ancestors = ancestors(p.pid);
            }
            if p.uid == 0 {
                p.uid = owner_uid(p.pid).unwrap_or(0);
            }
        }
    }
    Ok(reading)
}

/// Parent, grandparent, … of `pid` (nearest first), from /proc; empty if the
/// process is gone or /proc cannot be read.
pub fn ancestors(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut current = pid;
    for _ in 0..64 {
        match parent_of(current) {
            Some(ppid) if ppid > 0 && !out.contains(&ppid) => {
                out.push(ppid);
                if ppid == 1 {
                    break;
                }
                current = ppid;
            }
            _ => break,
        }
    }
    out
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Real user id of process `pid`, from /proc; `None` if it does not exist.
pub fn owner_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestry_of_this_process_reaches_init_or_a_root() {
        let me = std::process::id();
        let chain = ancestors(me);
        assert!(!chain.is_empty(), "our parent is known");
        assert_eq!(chain[0], std::os::unix::process::parent_id());
        assert!(ancestors(u32::MAX - 1).is_empty(), "no such process");
    }

    #[test]
    fn owner_of_this_process_is_us() {
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert_eq!(owner_uid(std::process::id()), Some(uid));
        assert_eq!(owner_uid(u32::MAX - 1), None);
    }
}
