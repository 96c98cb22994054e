//! The status report: devices and their accounting, reservations, the
//! queue, the consumers clients reported, and counters, with other users' details hidden from
//! clients that are not admins.

use std::time::Instant;

use std::cmp::Reverse;

use vramd_protocol::{
    DeviceStatus, Enforcement, GpuProcess, QueueEntry, ReservationStatus, StatusReport,
};

use crate::accounting::{Accounting, Holder};
use crate::{Ledger, Peer, ReadingSource, millis};

/// Most queue entries a status lists (the answer must fit in one frame);
/// `queue_total` counts them all.
pub const STATUS_QUEUE_LIMIT: usize = 1000;
/// Most reservations a status lists (the first by id);
/// `reservations_total` counts them all.
pub const STATUS_RESERVATION_LIMIT: usize = 1000;
/// Most GPU processes a status lists (per device, the largest first).
pub const STATUS_PROCESS_LIMIT: usize = 1000;

/// Hides the details of other users' reservations and requests from a
/// client that is not an admin: their labels, the processes they speak for,
/// the client's own `pid` and the pids of their GPU processes (shown as 0).
/// Their uid, size, device and priority stay: they explain why a request
/// waits.
pub fn redact(status: &mut StatusReport, uid: u32) {
    for p in status.processes.iter_mut().filter(|p| p.uid != uid) {
        p.pid = 0;
    }
    for r in status.reservations.iter_mut().filter(|r| r.uid != uid) {
        r.label = None;
        r.pid = 0;
        r.pids.clear();
    }
    for q in status.queue.iter_mut().filter(|q| q.uid != uid) {
        q.label = None;
        q.pid = 0;
    }
}

impl Ledger {
    /// The status report as `peer` may see it at `now`.
    pub fn status(&self, peer: Peer, now: Instant) -> StatusReport {
        let mut status = StatusReport {
            daemon_version: self.identity.daemon_version.clone(),
            backend: self.identity.backend.clone(),
            uptime_ms: millis(now.saturating_duration_since(self.epoch)),
            devices: self.device_status(),
            reservations: self.reservation_status_first(now, STATUS_RESERVATION_LIMIT),
            reservations_total: self.reservations.len() as u64,
            queue: self.queue_status(now, STATUS_QUEUE_LIMIT),
            queue_total: self.queue.len() as u64,
            counters: self.counters.clone(),
            consumers: self.reported.status(now),
            consumer_errors: self.reported.errors(),
            mps: None,
            processes: self.process_status(STATUS_PROCESS_LIMIT),
            enforced: self
                .reservations
                .values()
                .filter_map(|r| {
                    r.enforced
                        .as_ref()
                        .map(|(limit_bytes, mechanism)| Enforcement {
                            id: r.id,
                            limit_bytes: *limit_bytes,
                            mechanism: mechanism.clone(),
                        })
                })
                .take(STATUS_RESERVATION_LIMIT)
                .collect(),
        };
        if !peer.admin {
            redact(&mut status, peer.uid);
        }
        status
    }

    /// Per-device state for status.
    pub fn device_status(&self) -> Vec<DeviceStatus> {
        (0..self.devices.len())
            .map(|d| {
                let dev = &self.devices[d];
                let spec = &dev.spec;
                let reading = self.reading(d);
                let acc = self.account(d);
                let per_process_usage = reading.processes.is_some();
                let note = match (&dev.fault, per_process_usage) {
                    (Some(f), _) => Some(f.clone()),
                    (None, false) => Some(
                        "per-process usage is unavailable: counting used + reserved (cautious)"
                            .to_string(),
                    ),
                    (None, true) => None,
                };
                DeviceStatus {
                    index: spec.index,
                    uuid: spec.uuid.clone(),
                    name: spec.name.clone(),
                    total_bytes: spec.total_bytes,
                    used_bytes: reading.used_bytes,
                    reserved_bytes: self.reserved(d),
                    cushion_bytes: self.config.cushion_bytes.min(spec.total_bytes),
                    committed_bytes: acc.committed,
                    available_bytes: if dev.fault.is_some() {
                        0
                    } else {
                        self.capacity(d).saturating_sub(acc.committed)
                    },
                    unattributed_bytes: acc.unattributed,
                    healthy: dev.fault.is_none(),
                    note,
                    per_process_usage,
                }
            })
            .collect()
    }

    /// Every process using GPU memory and what it counts against, by device
    /// then largest first, at most `limit`. On a simulated device each
    /// reservation is one process: its client's pid, holding what it
    /// reserved.
    pub fn process_status(&self, limit: usize) -> Vec<GpuProcess> {
        let mut out = Vec::new();
        for d in 0..self.devices.len() {
            let device = self.devices[d].spec.index;
            match &self.devices[d].source {
                ReadingSource::Simulated => {
                    out.extend(self.on_device(d).map(|r| GpuProcess {
                        device,
                        pid: r.peer.pid,
                        uid: r.peer.uid,
                        bytes: r.bytes,
                        reservation: Some(r.id),
                        released: false,
                    }));
                }
                ReadingSource::Measured(_) => {
                    out.extend(self.account(d).processes.into_iter().map(|p| GpuProcess {
                        device,
                        pid: p.pid,
                        uid: p.uid,
                        bytes: p.bytes,
                        reservation: match p.holder {
                            Holder::Reservation(id) => Some(id),
                            Holder::Unattributed | Holder::Released => None,
                        },
                        released: p.holder == Holder::Released,
                    }));
                }
            }
        }
        out.sort_by_key(|p| (p.device, Reverse(p.bytes), p.pid));
        out.truncate(limit);
        out
    }

    /// Granted reservations, by id.
    pub fn reservation_status(&self, now: Instant) -> Vec<ReservationStatus> {
        self.reservation_status_first(now, usize::MAX)
    }

    /// The first `limit` granted reservations, by id.
    pub fn reservation_status_first(&self, now: Instant, limit: usize) -> Vec<ReservationStatus> {
        let accounts: Vec<Accounting> = (0..self.devices.len()).map(|d| self.account(d)).collect();
        self.reservations
            .values()
            .take(limit)
            .map(|r| {
                let acc = &accounts[r.device];
                let actual = acc.actual.get(&r.id).copied().unwrap_or(0);
                let group_bytes = acc.group_bytes.get(&r.id).copied().unwrap_or(r.bytes);
                (r, actual, actual > group_bytes)
            })
            .map(|(r, actual_bytes, over_reserved)| ReservationStatus {
                id: r.id,
                device: self.devices[r.device].spec.index,
                bytes: r.bytes,
                label: r.label.clone(),
                pid: r.peer.pid,
                uid: r.peer.uid,
                priority: r.priority,
                age_ms: millis(now.saturating_duration_since(r.granted_at)),
                actual_bytes,
                over_reserved,
                pids: r.pids.clone(),
                idle: r.idle,
            })
            .collect()
    }

    /// The first `limit` waiting requests, in the order they would be granted.
    pub fn queue_status(&self, now: Instant, limit: usize) -> Vec<QueueEntry> {
        self.queue
            .iter()
            .take(limit)
            .enumerate()
            .map(|(pos, (_, w))| QueueEntry {
                id: w.id,
                position: pos as u32 + 1,
                bytes: w.bytes,
                device: w.selector.clone(),
                priority: w.priority,
                label: w.label.clone(),
                pid: w.peer.pid,
                uid: w.peer.uid,
                waited_ms: millis(now.saturating_duration_since(w.arrived)),
            })
            .collect()
    }
}
