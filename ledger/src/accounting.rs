//! What is committed on a device: the accounting model (see the crate
//! docs) over the latest reading, the reservations and the ghosts.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use vramd_protocol::ReservationId;

use crate::{Ledger, ProcessUsage, Reading, ReadingSource, Reservation, Waiter};

/// A reservation released on a measured device whose memory has not yet been
/// seen free: it keeps counting until a reading taken after its release.
#[derive(Debug, Clone)]
pub(crate) struct Ghost {
    pub device: usize,
    pub pids: Vec<u32>,
    pub bytes: u64,
    pub released_at: Instant,
}

/// The accounting of one device (see the crate docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct Accounting {
    pub committed: u64,
    pub unattributed: u64,
    /// Actual usage of each reservation's group (reservations sharing a
    /// process are one group and show the group's usage).
    pub actual: HashMap<ReservationId, u64>,
    /// Reserved bytes of each reservation's group.
    pub group_bytes: HashMap<ReservationId, u64>,
    /// Every process of the reading and what it counts against, in the
    /// reading's order (empty where per-process usage is unknown).
    pub processes: Vec<ProcessAttribution>,
}

/// One process of a reading and the holder its usage counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessAttribution {
    pub pid: u32,
    pub uid: u32,
    pub bytes: u64,
    pub holder: Holder,
}

/// What a process's usage counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// No reservation speaks for it or an ancestor.
    Unattributed,
    /// A granted reservation.
    Reservation(ReservationId),
    /// A reservation released but not yet seen free.
    Released,
}

impl Ledger {
    /// Memory a new request on device `index` may get now (0 while the
    /// device is unhealthy).
    pub fn available(&self, index: usize) -> u64 {
        let device = &self.devices[index];
        if device.fault.is_some() {
            return 0;
        }
        let committed = match device.source {
            // What each reservation holds counts as used by its process, so
            // the accounting model reduces to Σ reserved, which is kept as
            // reservations come and go: no need to build it.
            ReadingSource::Simulated => self.reserved(index),
            ReadingSource::Measured(_) => self.account(index).committed,
        };
        self.capacity(index).saturating_sub(committed)
    }

    /// The room waiter `w` takes on device `d`: its bytes less what it
    /// adopts — the usage, as last read, of the processes it names (and
    /// their descendants) that counts against nothing. Nothing is adopted on
    /// a simulated device or one without per-process usage.
    pub(crate) fn need(&self, w: &Waiter, d: usize) -> u64 {
        match &w.pids {
            Some(pids) if !pids.is_empty() => w.bytes.saturating_sub(self.adoptable(d, pids)),
            _ => w.bytes,
        }
    }

    /// Unattributed usage on device `d` of processes `pids` (sorted) and
    /// their descendants.
    pub(crate) fn adoptable(&self, d: usize, pids: &[u32]) -> u64 {
        let ReadingSource::Measured(reading) = &self.devices[d].source else {
            return 0;
        };
        let Some(processes) = reading.processes.as_deref() else {
            return 0;
        };
        let named = |pid: &u32| pids.binary_search(pid).is_ok();
        if !processes
            .iter()
            .any(|p| named(&p.pid) || p.ancestors.iter().any(named))
        {
            return 0;
        }
        let acc = self.account(d);
        processes
            .iter()
            .zip(&acc.processes)
            .filter(|(p, a)| {
                a.holder == Holder::Unattributed && (named(&p.pid) || p.ancestors.iter().any(named))
            })
            .map(|(p, _)| p.bytes)
            .fold(0, u64::saturating_add)
            // Never more than the device counts as unattributed (a reading
            // whose total is below the sum of its processes).
            .min(acc.unattributed)
    }

    /// Total memory of device `d` less the cushion.
    pub(crate) fn capacity(&self, d: usize) -> u64 {
        self.devices[d]
            .spec
            .total_bytes
            .saturating_sub(self.config.cushion_bytes)
    }

    /// Σ bytes of the reservations granted on device `d`.
    pub(crate) fn reserved(&self, d: usize) -> u64 {
        self.devices[d].reserved_bytes
    }

    /// The reservations granted on device `d`.
    pub(crate) fn on_device(&self, d: usize) -> impl Iterator<Item = &Reservation> {
        self.devices[d]
            .reservations
            .iter()
            .filter_map(|id| self.reservations.get(id))
    }

    /// The latest reading of device `d`; on a simulated device, what each
    /// reservation holds as used by its process.
    pub(crate) fn reading(&self, d: usize) -> Cow<'_, Reading> {
        match &self.devices[d].source {
            ReadingSource::Measured(r) => Cow::Borrowed(r),
            ReadingSource::Simulated => {
                let mut per_pid: BTreeMap<u32, u64> = BTreeMap::new();
                // One that speaks for no process holds its bytes on no
                // process's behalf: it counts by its reserved bytes alone.
                for r in self.on_device(d) {
                    if let Some(&pid) = r.pids.first() {
                        *per_pid.entry(pid).or_default() += r.bytes;
                    }
                }
                Cow::Owned(Reading {
                    used_bytes: per_pid.values().sum(),
                    processes: Some(
                        per_pid
                            .into_iter()
                            .map(|(pid, bytes)| ProcessUsage::new(pid, bytes))
                            .collect(),
                    ),
                })
            }
        }
    }

    /// The accounting of device `d` (see the crate docs). Released
    /// reservations not yet seen free (ghosts) count like held ones.
    pub(crate) fn account(&self, d: usize) -> Accounting {
        let reading = self.reading(d);
        // Holders: (reservation id if still held, pids, bytes).
        let holders: Vec<(Option<ReservationId>, &[u32], u64)> = self
            .on_device(d)
            .map(|r| (Some(r.id), r.pids.as_slice(), r.bytes))
            .chain(
                self.ghosts
                    .iter()
                    .filter(|g| g.device == d)
                    .map(|g| (None, g.pids.as_slice(), g.bytes)),
            )
            .collect();
        let Some(processes) = reading.processes.as_deref() else {
            let reserved: u64 = holders.iter().map(|h| h.2).sum();
            return Accounting {
                committed: reading.used_bytes.saturating_add(reserved),
                unattributed: reading.used_bytes,
                actual: HashMap::new(),
                group_bytes: holders
                    .iter()
                    .filter_map(|h| h.0.map(|id| (id, h.2)))
                    .collect(),
                processes: Vec::new(),
            };
        };
        // Group holders whose pids overlap (union-find over small sets).
        let mut parent: Vec<usize> = (0..holders.len()).collect();
        fn find(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        let mut owner: HashMap<u32, usize> = HashMap::new();
        for (i, (_, pids, _)) in holders.iter().enumerate() {
            for pid in pids.iter() {
                match owner.get(pid) {
                    Some(&j) => {
                        let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                        parent[a] = b;
                    }
                    None => {
                        owner.insert(*pid, i);
                    }
                }
            }
        }
        let mut group_bytes: HashMap<usize, u64> = HashMap::new();
        for (i, h) in holders.iter().enumerate() {
            let root = find(&mut parent, i);
            *group_bytes.entry(root).or_default() += h.2;
        }
        // A process counts for the holder of its pid or of its nearest
        // ancestor that a holder speaks for.
        let mut group_actual: HashMap<usize, u64> = HashMap::new();
        let mut attributions = Vec::with_capacity(processes.len());
        for p in processes {
            let holder = std::iter::once(&p.pid)
                .chain(p.ancestors.iter())
                .find_map(|pid| owner.get(pid).copied());
            if let Some(i) = holder {
                let root = find(&mut parent, i);
                *group_actual.entry(root).or_default() += p.bytes;
            }
            attributions.push(ProcessAttribution {
                pid: p.pid,
                uid: p.uid,
                bytes: p.bytes,
                holder: match holder.map(|i| holders[i].0) {
                    None => Holder::Unattributed,
                    Some(Some(id)) => Holder::Reservation(id),
                    Some(None) => Holder::Released,
                },
            });
        }
        let attributed: u64 = group_actual.values().sum();
        let unattributed = reading.used_bytes.saturating_sub(attributed);
        let committed = group_bytes
            .iter()
            .map(|(root, &bytes)| bytes.max(group_actual.get(root).copied().unwrap_or(0)))
            .fold(unattributed, u64::saturating_add);
        let mut actual = HashMap::new();
        let mut per_reservation_group_bytes = HashMap::new();
        for (i, h) in holders.iter().enumerate() {
            if let Some(id) = h.0 {
                let root = find(&mut parent, i);
                actual.insert(id, group_actual.get(&root).copied().unwrap_or(0));
                per_reservation_group_bytes.insert(id, group_bytes[&root]);
            }
        }
        Accounting {
            committed,
            unattributed,
            actual,
            group_bytes: per_reservation_group_bytes,
            processes: attributions,
        }
    }
}
