//! `vramctl top`: a live view of the devices, the processes on them, the
//! reservations, the queue and recent events, refreshed every `--interval`
//! until SIGINT or SIGTERM (or printed once with `--once`).
//!
//! On a terminal each frame is drawn in place on the alternate screen with
//! plain ANSI codes (home, clear to end of line, clear below), cut to the
//! terminal's size, and the screen and cursor are restored on exit. Anywhere
//! else each frame is printed as plain text, one after another, separated
//! by a blank line. The events are the changes seen between two refreshes
//! (grants, releases, new waiters, counters, device health): the daemon
//! keeps no event log.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vramd_client::{Client, Error, StatusReport};
use vramd_protocol::format_size;

use crate::ps::{self, Local};
use crate::signals::SignalWatch;
use crate::status;

/// How many recent events a frame shows.
pub const EVENTS_SHOWN: usize = 8;

/// Enter the alternate screen and hide the cursor.
const ENTER: &str = "\x1b[?1049h\x1b[?25l";
/// Show the cursor and leave the alternate screen.
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";

/// The recent events: changes seen between successive status reports.
#[derive(Debug, Default)]
pub struct Events {
    prev: Option<StatusReport>,
    recent: VecDeque<String>,
}

impl Events {
    /// Notes what changed since the last report seen (nothing the first
    /// time).
    pub fn observe(&mut self, s: &StatusReport) {
        if let Some(prev) = &self.prev {
            let up = s.uptime_ms / 1000;
            for e in changes(prev, s) {
                self.recent.push_back(format!("up {up}s  {e}"));
            }
            while self.recent.len() > EVENTS_SHOWN {
                self.recent.pop_front();
            }
        }
        self.prev = Some(s.clone());
    }

    /// The recent events, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &str> {
        self.recent.iter().map(String::as_str)
    }
}

/// What changed from `a` to `b`, for people.
pub fn changes(a: &StatusReport, b: &StatusReport) -> Vec<String> {
    let mut out = Vec::new();
    let held_a: BTreeMap<_, _> = a.reservations.iter().map(|r| (r.id, r)).collect();
    let held_b: BTreeMap<_, _> = b.reservations.iter().map(|r| (r.id, r)).collect();
    let who = |label: &Option<String>, pid: u32| match (label, pid) {
        (Some(l), _) => format!(" ({l})"),
        (None, 0) => String::new(),
        (None, pid) => format!(" (pid {pid})"),
    };
    for (id, r) in &held_b {
        if !held_a.contains_key(id) {
            out.push(format!(
                "granted {id}: {} on GPU {}{}",
                format_size(r.bytes),
                r.device,
                who(&r.label, r.pid)
            ));
        }
    }
    // A cut list says nothing about what is missing from it.
    let complete = |s: &StatusReport| s.reservations.len() as u64 == s.reservations_total;
    if complete(a) && complete(b) {
        for (id, r) in &held_a {
            if !held_b.contains_key(id) {
                out.push(format!(
                    "released {id}: {} on GPU {}{}",
                    format_size(r.bytes),
                    r.device,
                    who(&r.label, r.pid)
                ));
            }
        }
    }
    for q in &b.queue {
        if !a.queue.iter().any(|p| p.id == q.id) && !held_b.contains_key(&q.id) {
            out.push(format!(
                "request {} waits: {} on {}{}",
                q.id,
                format_size(q.bytes),
                q.device,
                who(&q.label, q.pid)
            ));
        }
    }
    let (ca, cb) = (&a.counters, &b.counters);
    for (name, before, after) in [
        ("timed out", ca.timeouts, cb.timeouts),
        ("refused", ca.refusals, cb.refusals),
        ("cancelled", ca.cancels, cb.cancels),
        (
            "eviction requested",
            ca.evictions_requested,
            cb.evictions_requested,
        ),
        (
            "eviction completed",
            ca.evictions_completed,
            cb.evictions_completed,
        ),
        ("eviction failed", ca.evictions_failed, cb.evictions_failed),
    ] {
        if after > before {
            out.push(format!("{name}: {}", after - before));
        }
    }
    for d in &b.devices {
        let was = a.devices.iter().find(|x| x.index == d.index);
        match (was.map(|x| x.healthy), d.healthy) {
            (Some(true), false) => out.push(format!(
                "GPU {} unhealthy: {}",
                d.index,
                d.note.as_deref().unwrap_or("readings fail")
            )),
            (Some(false), true) => out.push(format!("GPU {} healthy again", d.index)),
            _ => {}
        }
    }
    out
}

/// One frame: header, devices, processes, reservations, queue, recent
/// events (ends in a newline).
pub fn frame(s: &StatusReport, rows: &[ps::PsRow], events: &Events) -> String {
    let mut out = String::new();
    let c = &s.counters;
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "vramd {} · backend {} · up {}s · grants {} · releases {} · waiting {}",
        s.daemon_version,
        s.backend,
        s.uptime_ms / 1000,
        c.grants,
        c.releases,
        s.queue_total
    );
    out.push('\n');
    let _ = status::write_devices(&mut out, s);
    out.push('\n');
    out.push_str(&ps::render(s, rows));
    out.push('\n');
    let _ = status::write_reservations(&mut out, s);
    out.push('\n');
    let _ = status::write_queue(&mut out, s);
    out.push('\n');
    out.push_str("recent events:\n");
    let mut any = false;
    for e in events.recent() {
        let _ = writeln!(out, "  {e}");
        any = true;
    }
    if !any {
        out.push_str("  none seen yet\n");
    }
    out
}

/// `text` drawn in place on a `rows`×`cols` terminal: from the top-left
/// corner, each line cut to `cols` characters and cleared to its end, at
/// most `rows` lines, then everything below cleared.
pub fn draw(text: &str, rows: usize, cols: usize) -> String {
    let mut out = String::from("\x1b[H");
    let lines: Vec<&str> = text.lines().take(rows.max(1)).collect();
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        out.extend(line.chars().take(cols.max(1)));
        out.push_str("\x1b[K");
        // No newline after the last row: it would scroll the screen.
        if i + 1 < n {
            out.push_str("\r\n");
        }
    }
    out.push_str("\x1b[J");
    out
}

/// The terminal's (rows, columns), if stdout is one that says.
fn terminal_size() -> Option<(usize, usize)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ writes it on success.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row as usize, ws.ws_col as usize))
}

/// `vramctl top`: refreshes every `interval` until SIGINT or SIGTERM, or
/// prints one frame with `once`.
pub fn run(socket: &Path, interval: Duration, once: bool) -> Result<ExitCode, Error> {
    let signals = SignalWatch::start()?;
    let client = Client::connect(socket)?;
    let live = !once && std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout().lock();
    if live && stdout.write_all(ENTER.as_bytes()).is_err() {
        return Ok(ExitCode::SUCCESS);
    }
    let result = refresh(&client, &signals, interval, once, live, &mut stdout);
    if live {
        let _ = stdout.write_all(LEAVE.as_bytes());
        let _ = stdout.flush();
    }
    result
}

/// The refresh loop of [`run`]; a closed stdout (e.g. `| head`) ends it.
fn refresh(
    client: &Client,
    signals: &SignalWatch,
    interval: Duration,
    once: bool,
    live: bool,
    stdout: &mut impl Write,
) -> Result<ExitCode, Error> {
    let mut events = Events::default();
    let mut first = true;
    loop {
        let s = client.status()?;
        events.observe(&s);
        let text = frame(&s, &ps::rows(&s, &Local), &events);
        let written = if live {
            let (rows, cols) = terminal_size().unwrap_or((24, 80));
            stdout.write_all(draw(&text, rows, cols).as_bytes())
        } else {
            let sep = if first { "" } else { "\n" };
            stdout.write_all(format!("{sep}{text}").as_bytes())
        };
        if written.and_then(|()| stdout.flush()).is_err() {
            return Ok(ExitCode::SUCCESS);
        }
        first = false;
        if once {
            return Ok(ExitCode::SUCCESS);
        }
        let until = Instant::now() + interval;
        while Instant::now() < until {
            if signals.received().is_some() {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_millis(20).min(interval));
        }
        if signals.received().is_some() {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramd_client::{DeviceSelector, ReservationId};
    use vramd_protocol::{Counters, DeviceStatus, QueueEntry, ReservationStatus};

    const GIB: u64 = 1 << 30;

    fn base() -> StatusReport {
        StatusReport {
            daemon_version: "0.1.0".into(),
            backend: "simulated".into(),
            uptime_ms: 5_000,
            devices: vec![DeviceStatus {
                index: 0,
                uuid: "SIM-0".into(),
                name: "sim".into(),
                total_bytes: 24 * GIB,
                used_bytes: 0,
                reserved_bytes: 0,
                cushion_bytes: 0,
                committed_bytes: 0,
                available_bytes: 24 * GIB,
                unattributed_bytes: 0,
                healthy: true,
                note: None,
                per_process_usage: true,
            }],
            reservations: vec![],
            queue: vec![],
            counters: Counters::default(),
            consumers: vec![],
            queue_total: 0,
            reservations_total: 0,
            mps: None,
            enforced: vec![],
            consumer_errors: vec![],
            processes: vec![],
        }
    }

    fn held(id: u64, label: Option<&str>) -> ReservationStatus {
        ReservationStatus {
            id: ReservationId(id),
            device: 0,
            bytes: 8 * GIB,
            label: label.map(str::to_string),
            pid: 42,
            uid: 0,
            priority: 0,
            age_ms: 0,
            actual_bytes: 0,
            over_reserved: false,
            pids: vec![42],
            idle: false,
        }
    }

    #[test]
    fn events_are_the_changes_between_refreshes() {
        let a = base();
        let mut b = base();
        b.uptime_ms = 7_000;
        b.reservations = vec![held(7, Some("flux"))];
        b.reservations_total = 1;
        b.queue = vec![QueueEntry {
            id: ReservationId(8),
            position: 1,
            bytes: 20 * GIB,
            device: DeviceSelector::Any,
            priority: 0,
            label: None,
            pid: 43,
            uid: 0,
            waited_ms: 0,
        }];
        b.counters.timeouts = 2;
        b.devices[0].healthy = false;
        b.devices[0].note = Some("GPU lost".into());
        assert_eq!(
            changes(&a, &b),
            vec![
                "granted 7: 8.00 GiB on GPU 0 (flux)",
                "request 8 waits: 20.00 GiB on any (pid 43)",
                "timed out: 2",
                "GPU 0 unhealthy: GPU lost",
            ]
        );
        let mut c = b.clone();
        c.reservations.clear();
        c.reservations_total = 0;
        c.devices[0].healthy = true;
        assert_eq!(
            changes(&b, &c),
            vec![
                "released 7: 8.00 GiB on GPU 0 (flux)",
                "GPU 0 healthy again"
            ]
        );
        // A cut list: a missing reservation may still be held.
        let mut cut = b.clone();
        cut.reservations.clear();
        assert!(changes(&b, &cut).is_empty());

        let mut events = Events::default();
        events.observe(&a);
        assert_eq!(events.recent().count(), 0, "nothing before a change");
        events.observe(&b);
        let recent: Vec<&str> = events.recent().collect();
        assert_eq!(recent[0], "up 7s  granted 7: 8.00 GiB on GPU 0 (flux)");
        for i in 0..20 {
            let mut n = b.clone();
            n.counters.timeouts = 3 + i;
            events.observe(&n);
        }
        assert_eq!(events.recent().count(), EVENTS_SHOWN);
        assert!(events.recent().last().unwrap().contains("timed out: 1"));
    }

    #[test]
    fn a_frame_has_every_section() {
        let mut s = base();
        s.reservations = vec![held(7, Some("flux"))];
        s.reservations_total = 1;
        let events = Events::default();
        let text = frame(&s, &[], &events);
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} in:\n{text}"))
        };
        assert!(text.starts_with("vramd 0.1.0 · backend simulated · up 5s"));
        let order = [
            at("DEV  UUID"),
            at("no processes use GPU memory"),
            at("flux"),
            at("queue empty"),
            at("recent events:\n  none seen yet\n"),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn drawing_in_place_homes_clears_and_cuts_to_the_terminal() {
        let text = "abcdef\nsecond\nthird\n";
        assert_eq!(
            draw(text, 2, 4),
            "\x1b[Habcd\x1b[K\r\nseco\x1b[K\x1b[J",
            "two rows of four columns"
        );
        assert_eq!(
            draw("x\n", 10, 80),
            "\x1b[Hx\x1b[K\x1b[J",
            "a short frame clears what an older, longer one left"
        );
    }
}
