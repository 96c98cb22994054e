//! What blocks a waiting request: the device it waits for, what it needs,
//! what is available there and who holds the rest — worked out from a
//! status report, so that `reserve` and `run` can say it while they wait.

use serde_json::{Value, json};
use vramd_client::{DeviceSelector, ReservationId, StatusReport};
use vramd_protocol::format_size;

use crate::ps::Lookup;

/// Most holders a message names; the rest are counted.
const MAX_NAMED: usize = 5;

/// Why request `id` waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The waiting request.
    pub id: ReservationId,
    /// The device it waits for (for `any`, the one with the most room).
    pub device: u32,
    /// What it asks for.
    pub needs_bytes: u64,
    /// What that device has available now.
    pub available_bytes: u64,
    /// Requests ahead of it in the queue.
    pub ahead: u32,
    /// Why the device takes no grants, when it is unhealthy.
    pub unhealthy: Option<String>,
    /// What holds the device's memory, largest first.
    pub held_by: Vec<HeldBy>,
}

/// One holder of memory on the device a request waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBy {
    /// What it is.
    pub kind: HolderKind,
    /// Its process (the reservation's client); 0 where hidden or unknown.
    pub pid: u32,
    /// Its user.
    pub uid: u32,
    /// Its command, where known.
    pub command: Option<String>,
    /// Memory it takes (a reservation: the larger of reserved and used).
    pub bytes: u64,
}

/// What kind of holder a [`HeldBy`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderKind {
    /// A granted reservation, with its label where shown.
    Reservation(ReservationId, Option<String>),
    /// A process no reservation speaks for.
    Unattributed,
    /// Memory released but not yet seen free.
    Released,
}

impl HeldBy {
    /// `flux (pid 1234) 13.00 GiB`, `unattributed python (pid 999) 4.00
    /// GiB`, `released, not yet free 1.00 GiB`.
    fn describe(&self) -> String {
        let who = if self.pid != 0 {
            format!("pid {}", self.pid)
        } else {
            format!("uid {}", self.uid)
        };
        let size = format_size(self.bytes);
        match &self.kind {
            HolderKind::Reservation(id, label) => {
                let name = label
                    .clone()
                    .or_else(|| self.command.clone())
                    .unwrap_or_else(|| format!("reservation {id}"));
                format!("{name} ({who}) {size}")
            }
            HolderKind::Unattributed if self.pid == 0 && self.uid == 0 => {
                format!("unattributed {size}")
            }
            HolderKind::Unattributed => match &self.command {
                Some(c) => format!("unattributed {c} ({who}) {size}"),
                None => format!("unattributed ({who}) {size}"),
            },
            HolderKind::Released => format!("released, not yet free {size}"),
        }
    }

    fn to_json(&self) -> Value {
        let (kind, reservation, label) = match &self.kind {
            HolderKind::Reservation(id, label) => ("reservation", Some(*id), label.clone()),
            HolderKind::Unattributed => ("unattributed", None, None),
            HolderKind::Released => ("released", None, None),
        };
        json!({
            "kind": kind,
            "reservation": reservation,
            "label": label,
            "pid": self.pid,
            "uid": self.uid,
            "command": self.command,
            "bytes": self.bytes,
        })
    }
}

impl Blocked {
    /// Why request `id` waits, from `s`; `None` if it does not wait (any
    /// more) or its device is not listed.
    pub fn of(s: &StatusReport, id: ReservationId, lookup: &dyn Lookup) -> Option<Blocked> {
        let q = s.queue.iter().find(|q| q.id == id)?;
        let device = match &q.device {
            DeviceSelector::Index(i) => s.devices.iter().find(|d| d.index == *i)?,
            DeviceSelector::Uuid(u) => s.devices.iter().find(|d| &d.uuid == u)?,
            DeviceSelector::Any => s
                .devices
                .iter()
                .filter(|d| d.total_bytes.saturating_sub(d.cushion_bytes) >= q.bytes)
                .max_by_key(|d| (d.healthy, d.available_bytes, std::cmp::Reverse(d.index)))?,
        };
        let command = |pid: u32| if pid == 0 { None } else { lookup.command(pid) };
        let mut held_by: Vec<HeldBy> = s
            .reservations
            .iter()
            .filter(|r| r.device == device.index)
            .map(|r| HeldBy {
                kind: HolderKind::Reservation(r.id, r.label.clone()),
                pid: r.pid,
                uid: r.uid,
                command: command(r.pid),
                bytes: r.bytes.max(r.actual_bytes),
            })
            .collect();
        held_by.extend(
            s.processes
                .iter()
                .filter(|p| p.device == device.index && p.reservation.is_none())
                .map(|p| HeldBy {
                    kind: if p.released {
                        HolderKind::Released
                    } else {
                        HolderKind::Unattributed
                    },
                    pid: p.pid,
                    uid: p.uid,
                    command: command(p.pid),
                    bytes: p.bytes,
                }),
        );
        if !device.per_process_usage && device.unattributed_bytes > 0 {
            // Nothing is known per process: the whole card's usage.
            held_by.push(HeldBy {
                kind: HolderKind::Unattributed,
                pid: 0,
                uid: 0,
                command: None,
                bytes: device.unattributed_bytes,
            });
        }
        held_by.sort_by_key(|h| std::cmp::Reverse(h.bytes));
        Some(Blocked {
            id,
            device: device.index,
            needs_bytes: q.bytes,
            available_bytes: device.available_bytes,
            ahead: q.position.saturating_sub(1),
            unhealthy: (!device.healthy).then(|| {
                device
                    .note
                    .clone()
                    .unwrap_or_else(|| "readings fail".into())
            }),
            held_by,
        })
    }

    /// The message for people, e.g. `needs 8.00 GiB on GPU 0, 3.10 GiB
    /// available; held by flux (pid 1234) 13.00 GiB, unattributed python
    /// (pid 999) 4.00 GiB`.
    pub fn message(&self) -> String {
        let mut m = format!(
            "needs {} on GPU {}, {} available",
            format_size(self.needs_bytes),
            self.device,
            format_size(self.available_bytes)
        );
        if let Some(why) = &self.unhealthy {
            m.push_str(&format!(" (unhealthy: {why})"));
        }
        if !self.held_by.is_empty() {
            let named: Vec<String> = self
                .held_by
                .iter()
                .take(MAX_NAMED)
                .map(HeldBy::describe)
                .collect();
            m.push_str("; held by ");
            m.push_str(&named.join(", "));
            let more = self.held_by.len().saturating_sub(MAX_NAMED);
            if more > 0 {
                m.push_str(&format!(" and {more} more"));
            }
        }
        if self.ahead > 0 {
            let s = if self.ahead == 1 { "" } else { "s" };
            m.push_str(&format!("; {} earlier request{s} ahead", self.ahead));
        }
        m
    }

    /// The `blocked` event of `--json`.
    pub fn to_json(&self) -> Value {
        json!({
            "event": "blocked",
            "id": self.id,
            "device": self.device,
            "needs_bytes": self.needs_bytes,
            "available_bytes": self.available_bytes,
            "ahead": self.ahead,
            "unhealthy": self.unhealthy,
            "held_by": self.held_by.iter().map(HeldBy::to_json).collect::<Vec<_>>(),
            "message": self.message(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramd_protocol::{Counters, DeviceStatus, GpuProcess, QueueEntry, ReservationStatus};

    const GIB: u64 = 1 << 30;

    struct Fake;
    impl Lookup for Fake {
        fn user(&self, uid: u32) -> String {
            uid.to_string()
        }
        fn command(&self, pid: u32) -> Option<String> {
            match pid {
                999 => Some("python".into()),
                1234 => Some("vramctl".into()),
                _ => None,
            }
        }
    }

    fn device(index: u32, available_bytes: u64) -> DeviceStatus {
        DeviceStatus {
            index,
            uuid: format!("GPU-{index}"),
            name: "x".into(),
            total_bytes: 24 * GIB,
            used_bytes: 17 * GIB,
            reserved_bytes: 8 * GIB,
            cushion_bytes: 0,
            committed_bytes: 0,
            available_bytes,
            unattributed_bytes: 4 * GIB,
            healthy: true,
            note: None,
            per_process_usage: true,
        }
    }

    fn report(selector: DeviceSelector, position: u32) -> StatusReport {
        StatusReport {
            daemon_version: "0".into(),
            backend: "nvml".into(),
            uptime_ms: 0,
            devices: vec![device(0, 3 * GIB + 100 * (1 << 20)), device(1, GIB)],
            reservations: vec![ReservationStatus {
                id: ReservationId(7),
                device: 0,
                bytes: 8 * GIB,
                label: Some("flux".into()),
                pid: 1234,
                uid: 1000,
                priority: 0,
                age_ms: 0,
                actual_bytes: 13 * GIB,
                over_reserved: true,
                pids: vec![1234],
                idle: false,
            }],
            queue: vec![QueueEntry {
                id: ReservationId(9),
                position,
                bytes: 8 * GIB,
                device: selector,
                priority: 0,
                label: None,
                pid: 1,
                uid: 1000,
                waited_ms: 0,
            }],
            counters: Counters::default(),
            consumers: vec![],
            queue_total: 1,
            reservations_total: 1,
            mps: None,
            enforced: vec![],
            consumer_errors: vec![],
            processes: vec![
                GpuProcess {
                    device: 0,
                    pid: 1234,
                    uid: 1000,
                    bytes: 13 * GIB,
                    reservation: Some(ReservationId(7)),
                    released: false,
                },
                GpuProcess {
                    device: 0,
                    pid: 999,
                    uid: 1001,
                    bytes: 4 * GIB,
                    reservation: None,
                    released: false,
                },
                GpuProcess {
                    device: 1,
                    pid: 5,
                    uid: 1001,
                    bytes: 2 * GIB,
                    reservation: None,
                    released: false,
                },
            ],
        }
    }

    #[test]
    fn the_message_names_the_need_the_room_and_the_holders() {
        let b = Blocked::of(&report(DeviceSelector::Any, 1), ReservationId(9), &Fake).unwrap();
        assert_eq!(b.device, 0, "any: the device with the most room");
        assert_eq!(
            b.message(),
            "needs 8.00 GiB on GPU 0, 3.10 GiB available; held by flux (pid 1234) \
             13.00 GiB, unattributed python (pid 999) 4.00 GiB"
        );
        let v = b.to_json();
        assert_eq!(v["event"], "blocked");
        assert_eq!(v["id"], 9);
        assert_eq!(v["needs_bytes"], 8 * GIB);
        assert_eq!(v["held_by"][0]["reservation"], 7);
        assert_eq!(v["held_by"][0]["label"], "flux");
        assert_eq!(v["held_by"][1]["kind"], "unattributed");
        assert_eq!(v["held_by"][1]["command"], "python");
        assert_eq!(v["message"], b.message());
    }

    #[test]
    fn a_named_device_queue_position_and_hidden_holders_show() {
        let mut s = report(DeviceSelector::Index(1), 3);
        s.processes[2].pid = 0;
        let b = Blocked::of(&s, ReservationId(9), &Fake).unwrap();
        assert_eq!(
            b.message(),
            "needs 8.00 GiB on GPU 1, 1.00 GiB available; held by unattributed \
             (uid 1001) 2.00 GiB; 2 earlier requests ahead"
        );
        // Granted meanwhile: nothing blocks it.
        assert_eq!(Blocked::of(&s, ReservationId(10), &Fake), None);
    }

    #[test]
    fn a_change_of_holders_changes_what_is_reported() {
        let s = report(DeviceSelector::Index(0), 1);
        let before = Blocked::of(&s, ReservationId(9), &Fake).unwrap();
        let mut s2 = s.clone();
        s2.processes[1].bytes = 3 * GIB;
        let after = Blocked::of(&s2, ReservationId(9), &Fake).unwrap();
        assert_ne!(before, after);
        assert!(after.message().contains("python (pid 999) 3.00 GiB"));
        assert_eq!(before, Blocked::of(&s, ReservationId(9), &Fake).unwrap());
    }
}
