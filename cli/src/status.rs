//! `vramctl status` without `--json`: the daemon's state as text tables.
//!
//! The tables are drawn by comfy-table without borders: columns are one
//! space apart, have a least width (so that rows line up from one run to the
//! next) and grow when a value is wider; the free-text last column (label,
//! models) stands two spaces off.

use std::fmt::Write;

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ColumnConstraint, Row, Table, TableComponent, Width};
use vramd_client::StatusReport;
use vramd_protocol::format_size;

/// How a column is laid out.
#[derive(Clone, Copy)]
pub(crate) enum Col {
    /// Left-aligned, at least this wide.
    L(&'static str, u16),
    /// Right-aligned, at least this wide.
    R(&'static str, u16),
    /// The free-text last column: left-aligned, two spaces off.
    Text(&'static str),
}

/// The whole status report as `vramctl status` prints it (ends in a newline).
pub fn render(s: &StatusReport) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    render_at(s, now_ms)
}

/// As [`render`], with the wall clock at `now_ms` (Unix milliseconds): the
/// consumers' errors say how long ago they happened.
pub fn render_at(s: &StatusReport, now_ms: u64) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_status(&mut out, s, now_ms);
    out
}

/// Writes the header line, the tables and the counters.
fn write_status(out: &mut String, s: &StatusReport, now_ms: u64) -> std::fmt::Result {
    writeln!(
        out,
        "vramd {} · backend {} · up {}s",
        s.daemon_version,
        s.backend,
        s.uptime_ms / 1000
    )?;
    writeln!(out)?;
    write_devices(out, s)?;
    writeln!(out)?;
    write_reservations(out, s)?;
    writeln!(out)?;
    write_queue(out, s)?;
    if !s.consumers.is_empty() {
        writeln!(out)?;
        write_consumers(out, s, now_ms)?;
    }
    let c = &s.counters;
    writeln!(out)?;
    writeln!(
        out,
        "grants {} · releases {} (on disconnect {}) · timeouts {} · refusals {} · cancels {}",
        c.grants, c.releases, c.disconnect_releases, c.timeouts, c.refusals, c.cancels
    )?;
    writeln!(
        out,
        "evictions: requested {} · completed {} · failed {}",
        c.evictions_requested, c.evictions_completed, c.evictions_failed
    )
}

/// Devices, each followed by its note (why it is unhealthy, or a remark on
/// its readings) on a line of its own.
pub(crate) fn write_devices(out: &mut String, s: &StatusReport) -> std::fmt::Result {
    use Col::*;
    let mut t = table(&[
        L("DEV", 4),
        L("UUID", 14),
        L("NAME", 20),
        R("TOTAL", 11),
        R("USED", 11),
        R("RESERVED", 11),
        R("UNATTRIB.", 11),
        R("AVAILABLE", 11),
    ]);
    for d in &s.devices {
        let mut row = Row::from(vec![
            d.index.to_string(),
            truncate(&d.uuid, 14),
            truncate(&d.name, 20),
            format_size(d.total_bytes),
            format_size(d.used_bytes),
            format_size(d.reserved_bytes),
            format_size(d.unattributed_bytes),
            format_size(d.available_bytes),
        ]);
        // One line per device, so that its note can follow it.
        row.max_height(1);
        t.add_row(row);
    }
    let mut lines = t.lines().map(|l| l.trim_end().to_string());
    if let Some(header) = lines.next() {
        writeln!(out, "{header}")?;
    }
    for (d, line) in s.devices.iter().zip(lines) {
        writeln!(out, "{line}")?;
        if !d.healthy {
            writeln!(
                out,
                "     UNHEALTHY, no new grants: {}",
                d.note.as_deref().unwrap_or("readings fail")
            )?;
        } else if let Some(note) = &d.note {
            writeln!(out, "     note: {note}")?;
        }
    }
    Ok(())
}

/// Granted reservations; `!` marks one whose processes use more than it
/// reserved.
pub(crate) fn write_reservations(out: &mut String, s: &StatusReport) -> std::fmt::Result {
    use Col::*;
    if s.reservations.is_empty() && s.reservations_total == 0 {
        return writeln!(out, "no reservations");
    }
    let mut t = table(&[
        L("ID", 6),
        L("DEV", 4),
        R("BYTES", 11),
        R("ACTUAL", 12),
        R("PID", 8),
        R("UID", 6),
        R("PRIO", 4),
        R("AGE", 9),
        Text("LABEL"),
    ]);
    for r in &s.reservations {
        let flag = if r.over_reserved { " !" } else { "" };
        let idle = if r.idle { " (idle)" } else { "" };
        let enforced = s
            .enforced
            .iter()
            .find(|e| e.id == r.id)
            .map(|e| {
                format!(
                    " (enforced: {} ≤ {})",
                    e.mechanism,
                    format_size(e.limit_bytes)
                )
            })
            .unwrap_or_default();
        let label = r.label.as_deref().unwrap_or("-");
        t.add_row(vec![
            r.id.to_string(),
            r.device.to_string(),
            format_size(r.bytes),
            format!("{}{flag}", format_size(r.actual_bytes)),
            pid(r.pid),
            r.uid.to_string(),
            r.priority.to_string(),
            format!("{}s", r.age_ms / 1000),
            format!("{label}{idle}{enforced}"),
        ]);
    }
    write_table(out, &t)?;
    let more = s
        .reservations_total
        .saturating_sub(s.reservations.len() as u64);
    if more > 0 {
        writeln!(out, "… and {more} more held")?;
    }
    if s.reservations.iter().any(|r| r.over_reserved) {
        writeln!(
            out,
            "! uses more than it reserved (counted at its actual usage)"
        )?;
    }
    Ok(())
}

/// A pid, or `-` where the daemon hides it (another user's, for a client
/// that is not an admin).
fn pid(pid: u32) -> String {
    if pid == 0 {
        "-".to_string()
    } else {
        pid.to_string()
    }
}

/// The head of the wait queue, and how many more wait behind it.
pub(crate) fn write_queue(out: &mut String, s: &StatusReport) -> std::fmt::Result {
    use Col::*;
    if s.queue.is_empty() {
        return writeln!(out, "queue empty");
    }
    let mut t = table(&[
        L("POS", 4),
        L("ID", 6),
        L("DEV", 6),
        R("BYTES", 11),
        R("PID", 8),
        R("PRIO", 4),
        R("WAITED", 9),
        Text("LABEL"),
    ]);
    for q in &s.queue {
        t.add_row(vec![
            q.position.to_string(),
            q.id.to_string(),
            truncate(&q.device.to_string(), 6),
            format_size(q.bytes),
            pid(q.pid),
            q.priority.to_string(),
            format!("{}s", q.waited_ms / 1000),
            q.label.as_deref().unwrap_or("-").to_string(),
        ]);
    }
    write_table(out, &t)?;
    let more = s.queue_total.saturating_sub(s.queue.len() as u64);
    if more > 0 {
        writeln!(out, "… and {more} more waiting")?;
    }
    Ok(())
}

/// The consumers clients (vramd-gateway) reported, then each one's last
/// error with how long ago it happened.
fn write_consumers(out: &mut String, s: &StatusReport, now_ms: u64) -> std::fmt::Result {
    use Col::*;
    let mut t = table(&[
        L("CONSUMER", 12),
        L("KIND", 8),
        L("DEV", 4),
        R("PRIO", 4),
        L("REACHABLE", 10),
        R("HOLDS", 11),
        R("LAST EVICT", 12),
        Text("MODELS"),
    ]);
    for c in &s.consumers {
        let last = c
            .last_eviction_ms
            .map_or_else(|| "never".to_string(), |ms| format!("{}s ago", ms / 1000));
        let detail = match (&c.last_error, c.models.is_empty()) {
            (Some(_), true) => "- (failing: see below)".to_string(),
            (Some(_), false) => format!("{} (failing: see below)", c.models.join(", ")),
            (None, true) => "-".to_string(),
            (None, false) => c.models.join(", "),
        };
        t.add_row(vec![
            truncate(&c.name, 12),
            c.kind.clone(),
            c.device
                .map_or_else(|| "any".to_string(), |d| d.to_string()),
            c.priority.to_string(),
            (if c.reachable { "yes" } else { "NO" }).to_string(),
            format_size(c.resident_bytes),
            last,
            detail,
        ]);
    }
    write_table(out, &t)?;
    for c in s.consumers.iter().filter(|c| c.last_error.is_some()) {
        let message = c.last_error.as_deref().unwrap_or_default();
        // Its time, from the list that carries it (matched by name and
        // message: two clients may report the same name).
        let at = s
            .consumer_errors
            .iter()
            .find(|e| e.name == c.name && e.message == message)
            .and_then(|e| e.at_ms);
        let when = match at {
            Some(at) => format!("{} ago", ago(now_ms.saturating_sub(at))),
            None => "at an unknown time".to_string(),
        };
        writeln!(out, "{} failed {when}: {message}", c.name)?;
    }
    Ok(())
}

/// A short age: `45s`, `12m`, `3h`, `2d`.
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A borderless table with these columns and a header row.
pub(crate) fn table(cols: &[Col]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        // Columns one space apart, none before the first.
        .set_style(TableComponent::VerticalLines, ' ')
        .set_truncation_indicator("…")
        .set_header(cols.iter().map(|c| match *c {
            Col::L(h, _) | Col::R(h, _) | Col::Text(h) => h,
        }));
    for (column, col) in t.column_iter_mut().zip(cols) {
        let (align, width, left_pad) = match *col {
            Col::L(_, w) => (CellAlignment::Left, w, 0),
            Col::R(_, w) => (CellAlignment::Right, w, 0),
            Col::Text(_) => (CellAlignment::Left, 0, 1),
        };
        column.set_padding((left_pad, 0));
        column.set_cell_alignment(align);
        if width > 0 {
            column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(width)));
        }
    }
    t
}

/// Writes `t` line by line, without the spaces that pad the last column.
pub(crate) fn write_table(out: &mut String, t: &Table) -> std::fmt::Result {
    for line in t.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `s`, cut to `n` characters with `…` as the last when longer.
fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(['…']).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vramd_client::{DeviceSelector, ReservationId};
    use vramd_protocol::{ConsumerStatus, Counters, DeviceStatus, QueueEntry, ReservationStatus};

    const GIB: u64 = 1 << 30;

    /// A report with a row of every kind.
    fn sample() -> StatusReport {
        StatusReport {
            daemon_version: "0.1.0".into(),
            backend: "nvml".into(),
            uptime_ms: 61_500,
            devices: vec![
                DeviceStatus {
                    index: 0,
                    uuid: "GPU-0123456789abcdef".into(),
                    name: "NVIDIA GeForce RTX 4090".into(),
                    total_bytes: 24 * GIB,
                    used_bytes: 6 * GIB,
                    reserved_bytes: 12 * GIB,
                    cushion_bytes: 0,
                    committed_bytes: 14 * GIB,
                    available_bytes: 10 * GIB,
                    unattributed_bytes: 2 * GIB,
                    healthy: true,
                    note: None,
                    per_process_usage: true,
                },
                DeviceStatus {
                    index: 1,
                    uuid: "SIM-1".into(),
                    name: "Fake GPU".into(),
                    total_bytes: 512 << 20,
                    used_bytes: 0,
                    reserved_bytes: 0,
                    cushion_bytes: 0,
                    committed_bytes: 0,
                    available_bytes: 0,
                    unattributed_bytes: 0,
                    healthy: false,
                    note: Some("reading failed".into()),
                    per_process_usage: false,
                },
            ],
            reservations: vec![
                ReservationStatus {
                    id: ReservationId(7),
                    device: 0,
                    bytes: 8 * GIB,
                    label: Some("flux".into()),
                    pid: 4242,
                    uid: 1000,
                    priority: 0,
                    age_ms: 93_000,
                    actual_bytes: 9 * GIB,
                    over_reserved: true,
                    pids: vec![4242],
                    idle: false,
                },
                ReservationStatus {
                    id: ReservationId(12),
                    device: 0,
                    bytes: 4 * GIB,
                    label: None,
                    pid: 77,
                    uid: 0,
                    priority: -5,
                    age_ms: 999,
                    actual_bytes: 0,
                    over_reserved: false,
                    pids: vec![77],
                    idle: true,
                },
            ],
            queue: vec![QueueEntry {
                id: ReservationId(13),
                position: 1,
                bytes: 20 * GIB,
                device: DeviceSelector::Uuid("GPU-0123456789abcdef".into()),
                priority: 10,
                label: Some("llm".into()),
                pid: 99,
                uid: 1000,
                waited_ms: 4_200,
            }],
            counters: Counters {
                grants: 9,
                releases: 7,
                disconnect_releases: 1,
                timeouts: 2,
                refusals: 0,
                cancels: 3,
                evictions_requested: 1,
                evictions_completed: 1,
                evictions_failed: 0,
            },
            consumers: vec![ConsumerStatus {
                name: "comfyui".into(),
                kind: "comfyui".into(),
                device: None,
                priority: 0,
                reachable: true,
                resident_bytes: 12 * GIB,
                models: vec!["sdxl".into(), "flux".into()],
                last_eviction_ms: Some(30_000),
                last_error: None,
            }],
            queue_total: 4,
            reservations_total: 2,
            mps: None,
            enforced: vec![],
            consumer_errors: vec![],
            processes: vec![],
        }
    }

    /// The layout `vramctl status` has always had: columns one space apart
    /// at their usual widths, notes under their device, `!` and `(idle)`.
    #[test]
    fn the_tables_keep_their_layout() {
        let expected = concat!(
            "vramd 0.1.0 · backend nvml · up 61s\n",
            "\n",
            "DEV  UUID           NAME                       TOTAL        USED    RESERVED   UNATTRIB.   AVAILABLE\n",
            "0    GPU-012345678… NVIDIA GeForce RTX …   24.00 GiB    6.00 GiB   12.00 GiB    2.00 GiB   10.00 GiB\n",
            "1    SIM-1          Fake GPU              512.00 MiB         0 B         0 B         0 B         0 B\n",
            "     UNHEALTHY, no new grants: reading failed\n",
            "\n",
            "ID     DEV        BYTES       ACTUAL      PID    UID PRIO       AGE  LABEL\n",
            "7      0       8.00 GiB   9.00 GiB !     4242   1000    0       93s  flux\n",
            "12     0       4.00 GiB          0 B       77      0   -5        0s  - (idle)\n",
            "! uses more than it reserved (counted at its actual usage)\n",
            "\n",
            "POS  ID     DEV          BYTES      PID PRIO    WAITED  LABEL\n",
            "1    13     GPU-0…   20.00 GiB       99   10        4s  llm\n",
            "… and 3 more waiting\n",
            "\n",
            "CONSUMER     KIND     DEV  PRIO REACHABLE        HOLDS   LAST EVICT  MODELS\n",
            "comfyui      comfyui  any     0 yes          12.00 GiB      30s ago  sdxl, flux\n",
            "\n",
            "grants 9 · releases 7 (on disconnect 1) · timeouts 2 · refusals 0 · cancels 3\n",
            "evictions: requested 1 · completed 1 · failed 0\n",
        );
        assert_eq!(render(&sample()), expected);
    }

    #[test]
    fn cut_lists_say_how_many_more_and_hidden_pids_show_as_dashes() {
        let mut s = sample();
        s.reservations_total = 60_002;
        s.reservations[1].pid = 0;
        s.queue[0].pid = 0;
        let text = render(&s);
        assert!(text.contains("… and 60000 more held\n"), "{text}");
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap()
                .to_string()
        };
        assert!(line("(idle)").contains("       -      0 "), "{text}");
        assert!(line("llm").contains("       -   10 "), "{text}");
        // Every reservation cut from the list: the table header still says so.
        s.reservations.clear();
        assert!(
            render(&s).contains("… and 60002 more held"),
            "{}",
            render(&s)
        );
    }

    #[test]
    fn a_consumers_last_error_is_shown_with_how_long_ago() {
        let mut s = sample();
        s.consumers[0].last_error = Some("unload: /free answered 500".into());
        s.consumers.push(vramd_protocol::ConsumerStatus {
            name: "tts".into(),
            kind: "http".into(),
            device: Some(0),
            priority: 2,
            reachable: false,
            resident_bytes: 0,
            models: vec![],
            last_eviction_ms: None,
            last_error: Some("health: cannot connect".into()),
        });
        s.consumer_errors = vec![vramd_protocol::ConsumerError {
            name: "comfyui".into(),
            message: "unload: /free answered 500".into(),
            at_ms: Some(1_000_000),
        }];
        let text = render_at(&s, 1_042_500);
        assert!(
            text.contains("comfyui failed 42s ago: unload: /free answered 500\n"),
            "{text}"
        );
        assert!(
            text.contains("tts failed at an unknown time: health: cannot connect\n"),
            "{text}"
        );
        assert!(text.contains("sdxl, flux (failing: see below)"), "{text}");
        assert!(
            text.contains("tts          http     0       2 NO"),
            "{text}"
        );
        assert_eq!(ago(3 * 3_600_000), "3h");
        assert_eq!(ago(5 * 60_000), "5m");
    }

    #[test]
    fn empty_sections_say_so() {
        let mut s = sample();
        s.reservations.clear();
        s.reservations_total = 0;
        s.queue.clear();
        s.queue_total = 0;
        s.consumers.clear();
        let text = render(&s);
        assert!(
            text.contains("\n\nno reservations\n\nqueue empty\n\ngrants 9 "),
            "{text}"
        );
        assert!(!text.contains("CONSUMER"), "{text}");
    }

    #[test]
    fn a_wide_value_widens_its_column_for_every_row() {
        let mut s = sample();
        s.reservations[1].priority = -1_000_000;
        let text = render(&s);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" GiB ")).collect();
        let at = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .and_then(|l| l.find("s  "))
                .unwrap()
        };
        // The AGE column ends at the same place on both rows.
        assert_eq!(at("flux"), at("(idle)"), "{text}");
        assert!(text.contains("-1000000"), "{text}");
    }

    #[test]
    fn truncate_marks_the_cut() {
        assert_eq!(truncate("SIM-0", 14), "SIM-0");
        assert_eq!(truncate("GPU-0123456789abcdef", 14), "GPU-012345678…");
    }
}
