//! `vramctl ps`: every process using GPU memory, with its user, command,
//! device, bytes and the reservation it counts against.
//!
//! The daemon says which pids use what (`StatusReport::processes`); the
//! user names and commands are looked up here, on the same machine, through
//! a [`Lookup`] so that the rendering can be tested without /proc.

use std::ffi::CStr;
use std::fmt::Write;

use serde_json::{Value, json};
use vramd_client::{ReservationId, StatusReport};
use vramd_protocol::format_size;

use crate::status::{Col, table, write_table};

/// Where user names and commands come from.
pub trait Lookup {
    /// The name of user `uid`, or its number where it has none.
    fn user(&self, uid: u32) -> String;
    /// The command of process `pid`, if it still runs.
    fn command(&self, pid: u32) -> Option<String>;
}

/// This machine: the user database (getpwuid_r) and /proc.
pub struct Local;

impl Lookup for Local {
    fn user(&self, uid: u32) -> String {
        user_name(uid).unwrap_or_else(|| uid.to_string())
    }

    fn command(&self, pid: u32) -> Option<String> {
        command_of(pid)
    }
}

/// The login name of `uid` from the user database, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: passwd is plain data; getpwuid_r writes into it and into
        // buf (of the length given) and sets result to &pwd or null.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points at a NUL-terminated string in buf.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

/// The command of `pid`: its name from /proc/PID/comm, else the first word
/// of its command line; `None` if it is gone.
pub fn command_of(pid: u32) -> Option<String> {
    if pid == 0 {
        return None;
    }
    if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        let comm = comm.trim_end_matches('\n');
        if !comm.is_empty() {
            return Some(comm.to_string());
        }
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|&b| b == 0).next()?;
    let path = String::from_utf8_lossy(first);
    let base = path.rsplit('/').next().unwrap_or(&path);
    (!base.is_empty()).then(|| base.to_string())
}

/// One process as `vramctl ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsRow {
    /// Device index.
    pub device: u32,
    /// Process id; 0 where the daemon hides it (another user's).
    pub pid: u32,
    /// Its real user id.
    pub uid: u32,
    /// The user's name, or the uid where it has none.
    pub user: String,
    /// Its command, if known.
    pub command: Option<String>,
    /// Memory it uses on the device.
    pub bytes: u64,
    /// The reservation it counts against.
    pub reservation: Option<ReservationId>,
    /// That reservation's label, where shown.
    pub label: Option<String>,
    /// It counts against memory released but not yet seen free.
    pub released: bool,
}

impl PsRow {
    /// What it counts against, for people: `7 (flux)`, `7`, `released (not
    /// yet free)` or `unattributed`.
    pub fn counts_against(&self) -> String {
        match (self.reservation, &self.label) {
            (Some(id), Some(label)) => format!("{id} ({label})"),
            (Some(id), None) => id.to_string(),
            (None, _) if self.released => "released (not yet free)".to_string(),
            (None, _) => "unattributed".to_string(),
        }
    }

    /// Its command, or `-` where unknown.
    pub fn command_or_dash(&self) -> &str {
        self.command.as_deref().unwrap_or("-")
    }
}

/// The processes of `s`, with names looked up through `lookup`.
pub fn rows(s: &StatusReport, lookup: &dyn Lookup) -> Vec<PsRow> {
    s.processes
        .iter()
        .map(|p| {
            let label = p.reservation.and_then(|id| {
                s.reservations
                    .iter()
                    .find(|r| r.id == id)
                    .and_then(|r| r.label.clone())
            });
            PsRow {
                device: p.device,
                pid: p.pid,
                uid: p.uid,
                user: lookup.user(p.uid),
                command: if p.pid == 0 {
                    None
                } else {
                    lookup.command(p.pid)
                },
                bytes: p.bytes,
                reservation: p.reservation,
                label,
                released: p.released,
            }
        })
        .collect()
}

/// `vramctl ps` as text: a table, then a note for each device whose
/// per-process usage is unknown (ends in a newline).
pub fn render(s: &StatusReport, rows: &[PsRow]) -> String {
    use Col::*;
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no processes use GPU memory\n");
    } else {
        let mut t = table(&[
            R("PID", 8),
            L("USER", 10),
            L("COMMAND", 16),
            L("DEV", 4),
            R("BYTES", 11),
            Text("COUNTS AGAINST"),
        ]);
        for r in rows {
            t.add_row(vec![
                if r.pid == 0 {
                    "-".to_string()
                } else {
                    r.pid.to_string()
                },
                r.user.clone(),
                r.command_or_dash().to_string(),
                r.device.to_string(),
                format_size(r.bytes),
                r.counts_against(),
            ]);
        }
        // Writing to a String cannot fail.
        let _ = write_table(&mut out, &t);
    }
    for d in s.devices.iter().filter(|d| !d.per_process_usage) {
        let _ = writeln!(
            out,
            "device {}: per-process usage is unknown ({} used in all)",
            d.index,
            format_size(d.used_bytes)
        );
    }
    out
}

/// `vramctl ps --json`: `{"processes": [...]}`, one object per process.
pub fn to_json(rows: &[PsRow]) -> Value {
    json!({
        "processes": rows
            .iter()
            .map(|r| json!({
                "device": r.device,
                "pid": r.pid,
                "uid": r.uid,
                "user": r.user,
                "command": r.command,
                "bytes": r.bytes,
                "reservation": r.reservation,
                "label": r.label,
                "released": r.released,
            }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramd_protocol::{Counters, GpuProcess, ReservationStatus};

    const GIB: u64 = 1 << 30;

    struct Fake;
    impl Lookup for Fake {
        fn user(&self, uid: u32) -> String {
            match uid {
                1000 => "alice".into(),
                other => other.to_string(),
            }
        }
        fn command(&self, pid: u32) -> Option<String> {
            (pid == 1234).then(|| "python".to_string())
        }
    }

    fn report() -> StatusReport {
        let proc_ = |pid, uid, bytes, reservation: Option<u64>, released| GpuProcess {
            device: 0,
            pid,
            uid,
            bytes,
            reservation: reservation.map(ReservationId),
            released,
        };
        StatusReport {
            daemon_version: "0".into(),
            backend: "nvml".into(),
            uptime_ms: 0,
            devices: vec![],
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
            queue: vec![],
            counters: Counters::default(),
            consumers: vec![],
            queue_total: 0,
            reservations_total: 1,
            mps: None,
            enforced: vec![],
            consumer_errors: vec![],
            processes: vec![
                proc_(1234, 1000, 13 * GIB, Some(7), false),
                proc_(0, 1001, 4 * GIB, None, false),
                proc_(555, 1000, GIB, None, true),
            ],
        }
    }

    #[test]
    fn ps_names_users_commands_and_what_each_process_counts_against() {
        let s = report();
        let rows = rows(&s, &Fake);
        let text = render(&s, &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("     PID USER"), "{text}");
        for (line, want) in lines[1..].iter().zip([
            ["1234", "alice", "python", "0", "13.00 GiB", "7 (flux)"],
            ["-", "1001", "-", "0", "4.00 GiB", "unattributed"],
            [
                "555",
                "alice",
                "-",
                "0",
                "1.00 GiB",
                "released (not yet free)",
            ],
        ]) {
            let mut rest = *line;
            for cell in want {
                let at = rest
                    .find(cell)
                    .unwrap_or_else(|| panic!("{cell:?} in {line:?}"));
                rest = &rest[at + cell.len()..];
            }
        }
    }

    #[test]
    fn ps_json_has_every_field() {
        let s = report();
        let v = to_json(&rows(&s, &Fake));
        let first = &v["processes"][0];
        assert_eq!(first["pid"], 1234);
        assert_eq!(first["user"], "alice");
        assert_eq!(first["command"], "python");
        assert_eq!(first["bytes"], 13 * GIB);
        assert_eq!(first["reservation"], 7);
        assert_eq!(first["label"], "flux");
        assert_eq!(v["processes"][1]["reservation"], Value::Null);
        assert_eq!(v["processes"][2]["released"], true);
    }

    #[test]
    fn nothing_on_the_card_says_so() {
        let mut s = report();
        s.processes.clear();
        assert_eq!(render(&s, &[]), "no processes use GPU memory\n");
    }

    #[test]
    fn this_process_and_root_are_found_on_this_machine() {
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(Local.user(u32::MAX - 7), (u32::MAX - 7).to_string());
        let me = command_of(std::process::id()).expect("our own command");
        assert!(!me.is_empty());
        assert_eq!(command_of(u32::MAX - 1), None);
    }
}
