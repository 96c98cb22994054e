//! Turning the results into a verdict and a table: the targets of the
//! benchmark issue checked against the figures, and the markdown written to
//! stdout and `--markdown FILE`.
//!
//! Everything here reads the results JSON only, so a saved run can be
//! re-rendered (`vramd-bench report FILE`).

use std::fmt::Write as _;

use serde_json::{Value, json};

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_f64()
}

fn fmt_us(us: Option<f64>) -> String {
    match us {
        None => "–".into(),
        Some(x) if x >= 1e6 => format!("{:.2} s", x / 1e6),
        Some(x) if x >= 1e3 => format!("{:.2} ms", x / 1e3),
        Some(x) => format!("{x:.1} µs"),
    }
}

fn fmt_x(x: Option<f64>) -> String {
    x.map_or("–".into(), |x| format!("{x:.2}×"))
}

fn fmt_num(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(x) if x.is_infinite() => "∞".into(),
        Some(x) if x >= 100.0 => {
            let s = format!("{:.0}", x);
            // Thousands separators for readability.
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        Some(x) => format!("{x:.2}"),
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

fn target(id: &str, goal: &str, measured: String, met: Option<bool>) -> Value {
    json!({ "id": id, "target": goal, "measured": measured, "met": met })
}

const BASELINES: [&str; 3] = ["global lock", "FIFO", "FIFO + backfill"];

/// Checks the targets against `r` (the results so far).
pub fn targets(r: &Value) -> Value {
    let mut out = Vec::new();
    let rtt = &r["rtt_rust"]["pair"];
    let p50x = f(rtt, &["p50_x_floor"]);
    out.push(target(
        "rtt_p50",
        "grant+release p50 ≤ 3× the raw ping-pong floor",
        format!("{} = {}", fmt_us(f(rtt, &["p50_us"])), fmt_x(p50x)),
        p50x.map(|x| x <= 3.0),
    ));
    let p99x = f(rtt, &["p99_x_floor"]);
    out.push(target(
        "rtt_p99",
        "grant+release p99 ≤ 10× the floor",
        format!("{} = {}", fmt_us(f(rtt, &["p99_us"])), fmt_x(p99x)),
        p99x.map(|x| x <= 10.0),
    ));
    let tp64 = r["throughput"]["runs"].as_array().and_then(|runs| {
        runs.iter()
            .find(|x| x["clients"].as_u64() == Some(64))
            .and_then(|x| x["pairs_per_s"].as_f64())
    });
    out.push(target(
        "throughput_64",
        "≥ 50,000 grant+release pairs/s with 64 clients",
        format!("{} pairs/s", fmt_num(tp64)),
        tp64.map(|x| x >= 50_000.0),
    ));
    let k99 = f(&r["kill_to_grant"], &["latency", "p99_us"]);
    out.push(target(
        "kill_to_grant_p99",
        "kill-to-grant p99 ≤ 1 ms",
        fmt_us(k99),
        k99.map(|x| x <= 1000.0),
    ));
    let s = &r["scale"];
    let conns = s["connections_opened"].as_u64();
    let rss = f(s, &["rss_connections_mib"]);
    out.push(target(
        "connections_rss",
        "10,000 connections with daemon RSS ≤ 64 MiB",
        format!(
            "{} MiB with {} connections",
            fmt_num(rss),
            fmt_num(conns.map(|c| c as f64))
        ),
        match (conns, rss) {
            (Some(c), Some(m)) if c >= 10_000 => Some(m <= 64.0),
            (Some(_), Some(m)) if m > 64.0 => Some(false),
            _ => None,
        },
    ));
    let reached = s["queued_reached"].as_u64();
    let ratio = f(s, &["empty_over_backlog"]).or_else(|| {
        s["empty_over_backlog"]
            .is_null()
            .then_some(f64::INFINITY)
            .filter(|_| reached.is_some())
    });
    out.push(target(
        "backlog_throughput",
        "throughput with 100,000 queued within 2× of an empty queue",
        format!(
            "{} slower with {} queued{}",
            fmt_x(ratio),
            fmt_num(reached.map(|c| c as f64)),
            if reached.is_some_and(|q| q < 100_000) {
                " (the queue could not be built to 100,000 within the time budget)"
            } else {
                ""
            }
        ),
        match (reached, ratio) {
            (Some(q), Some(x)) if q >= 100_000 => Some(x <= 2.0),
            // Already over 2× with a smaller backlog: a deeper one is no better.
            (Some(_), Some(x)) if x > 2.0 => Some(false),
            _ => None,
        },
    ));
    let cpu = f(&r["footprint"], &["cpu_percent_of_one_core"]);
    out.push(target(
        "idle_cpu",
        "idle daemon CPU ≤ 0.5% of one core",
        format!(
            "{}% over {} s",
            cpu.map_or("–".into(), |c| format!("{c:.3}")),
            fmt_num(f(&r["footprint"], &["window_seconds"]))
        ),
        cpu.map(|c| c <= 0.5),
    ));
    let g = &r["gateway"];
    let added = f(g, &["small", "added", "p50_us"]);
    let added_chunk = f(g, &["first_chunk", "added", "p50_us"]);
    out.push(target(
        "gateway_added_p50",
        "the gateway adds ≤ 0.5 ms at p50 (small request and first chunk of a stream)",
        format!(
            "small request {}, first chunk {}",
            fmt_us(added),
            fmt_us(added_chunk)
        ),
        added
            .zip(added_chunk)
            .map(|(a, c)| a <= 500.0 && c <= 500.0),
    ));
    // Scheduling.
    let traces = r["scheduling"]["traces"].as_object();
    let mut overcommits = 0u64;
    let mut seen = false;
    if let Some(traces) = traces {
        for t in traces.values() {
            if let Some(p) = t["policies"].as_object() {
                for v in p.values() {
                    if let Some(o) = v["overcommits"].as_u64() {
                        seen = true;
                        overcommits += o;
                    }
                }
            }
        }
    }
    out.push(target(
        "sim_overcommits",
        "simulator: 0 overcommits for every policy",
        format!("{overcommits} overcommits"),
        seen.then_some(overcommits == 0),
    ));
    let home = traces.and_then(|t| t.get("homelab"));
    let mk = home.and_then(|h| f(h, &["policies", "vramd", "makespan_over_lower_bound"]));
    out.push(target(
        "homelab_makespan",
        "vramd makespan ≤ 1.15× the lower bound on the home-lab trace",
        fmt_x(mk),
        mk.map(|x| x <= 1.15),
    ));
    let (measured, met) = match home {
        Some(h) => top_priority_p99(h),
        None => ("–".into(), None),
    };
    out.push(target(
        "homelab_top_priority_p99",
        "vramd p99 wait for the highest priority below every baseline's (home lab)",
        measured,
        met,
    ));
    Value::Array(out)
}

/// p99 wait of the highest priority under vramd and the baselines.
fn top_priority_p99(trace: &Value) -> (String, Option<bool>) {
    let Some(top) = trace["highest_priority"].as_i64() else {
        return ("–".into(), None);
    };
    let key = top.to_string();
    let p99 = |policy: &str| {
        f(
            &trace["policies"][policy]["wait_by_priority"][&key],
            &["p99_s"],
        )
    };
    let Some(v) = p99("vramd") else {
        return ("–".into(), None);
    };
    let mut parts = vec![format!("vramd {v:.2} s")];
    let mut met = Some(true);
    for b in BASELINES {
        match p99(b) {
            Some(x) => {
                parts.push(format!("{b} {x:.2} s"));
                if v >= x {
                    met = Some(false);
                }
            }
            None => met = None,
        }
    }
    (format!("priority {top}: {}", parts.join(", ")), met)
}

/// The whole report as markdown.
pub fn markdown(r: &Value) -> String {
    let mut md = String::new();
    let m = &r["meta"];
    let _ = writeln!(md, "## vramd benchmark results\n");
    let _ = writeln!(
        md,
        "Mode: **{}**. Machine: {} CPUs ({}), {} GiB RAM, kernel {}{}. Daemon: `{}` ({}), log level {}. Commit {}.\n",
        m["mode"].as_str().unwrap_or("?"),
        m["machine"]["cpus"],
        m["machine"]["cpu_model"].as_str().unwrap_or("?"),
        m["machine"]["memory_gib"],
        m["machine"]["kernel"].as_str().unwrap_or("?"),
        if m["machine"]["virtualized"].as_bool() == Some(true) {
            ", virtual machine"
        } else {
            ""
        },
        m["vramd"].as_str().unwrap_or("?"),
        m["profile"].as_str().unwrap_or("?"),
        m["daemon_log_level"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
    );

    if let Some(b) = m["machine_busy_pct_before"].as_f64().filter(|&b| b >= 10.0) {
        let _ = writeln!(
            md,
            "**Warning:** {b:.0}% of the machine's CPUs were busy with other work when the run started; the figures are noisy.\n"
        );
    }
    match m["steal_pct_during_run"].as_f64() {
        Some(s) if s >= 5.0 => {
            let _ = writeln!(
                md,
                "**Warning:** the hypervisor gave {s:.0}% of this VM's CPU time to other guests during the run (steal); latencies and their tails are inflated.\n"
            );
        }
        Some(s) => {
            let _ = writeln!(
                md,
                "CPU time stolen by the hypervisor during the run: {s:.1}%.\n"
            );
        }
        None => {}
    }
    let _ = writeln!(md, "### Targets\n");
    let _ = writeln!(md, "| Target | Measured | Verdict |\n|---|---|---|");
    if let Some(ts) = r["targets"].as_array() {
        for t in ts {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                t["target"].as_str().unwrap_or(""),
                t["measured"].as_str().unwrap_or(""),
                verdict(t["met"].as_bool())
            );
        }
    }

    let _ = writeln!(md, "\n### Latency (one client, idle daemon)\n");
    let _ = writeln!(
        md,
        "| Path | samples | p50 | p99 | p99.9 | p50 ÷ floor | p99 ÷ floor | p99.9 ÷ floor |\n|---|---|---|---|---|---|---|---|"
    );
    let floor = &r["floor"]["round_trip"];
    let row = |md: &mut String, name: &str, s: &Value| {
        if s.is_null() {
            return;
        }
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_num(f(s, &["count"])),
            fmt_us(f(s, &["p50_us"])),
            fmt_us(f(s, &["p99_us"])),
            fmt_us(f(s, &["p999_us"])),
            fmt_x(f(s, &["p50_x_floor"])),
            fmt_x(f(s, &["p99_x_floor"])),
            fmt_x(f(s, &["p999_x_floor"])),
        );
    };
    row(
        &mut md,
        &format!(
            "floor: raw Unix-socket ping-pong, {}-byte frame, 2 processes",
            r["floor"]["frame_bytes"]
        ),
        floor,
    );
    row(
        &mut md,
        "Rust SDK grant+release (`reserve` + `release`)",
        &r["rtt_rust"]["pair"],
    );
    row(&mut md, "… grant only", &r["rtt_rust"]["grant"]);
    row(&mut md, "… release only", &r["rtt_rust"]["release"]);
    row(
        &mut md,
        "Rust SDK `ping` (no ledger)",
        &r["rtt_rust"]["ping"],
    );
    if r["rtt_rust"]["raw_pair"].is_object() {
        row(
            &mut md,
            "grant+release without the SDK (frames on a blocking socket)",
            &r["rtt_rust"]["raw_pair"],
        );
    }
    let py = &r["rtt_python"];
    if py["skipped"].as_bool() == Some(true) {
        let _ = writeln!(
            md,
            "| Python SDK grant+release | skipped: {} | | | | | | |",
            py["reason"].as_str().unwrap_or("")
        );
    } else if let Some(e) = py["error"].as_str() {
        let _ = writeln!(md, "| Python SDK grant+release | error: {e} | | | | | | |");
    } else {
        row(&mut md, "Python SDK grant+release", &py["pair"]);
    }

    let _ = writeln!(md, "\n### Throughput (grant+release pairs, 16 MiB each)\n");
    let _ = writeln!(
        md,
        "| Clients | pairs/s | pair p50 | pair p99 | daemon CPU (% of a core) | daemon CPU per pair | client CPU per pair |\n|---|---|---|---|---|---|---|"
    );
    if let Some(runs) = r["throughput"]["runs"].as_array() {
        for x in runs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {}% | {} | {} |",
                x["clients"],
                fmt_num(x["pairs_per_s"].as_f64()),
                fmt_us(f(x, &["latency", "p50_us"])),
                fmt_us(f(x, &["latency", "p99_us"])),
                fmt_num(x["daemon_cpu_pct"].as_f64()),
                fmt_us(x["daemon_cpu_us_per_pair"].as_f64()),
                fmt_us(x["client_cpu_us_per_pair"].as_f64()),
            );
        }
    }

    let k = &r["kill_to_grant"];
    if !k.is_null() {
        let _ = writeln!(md, "\n### Kill-to-grant\n");
        let _ = writeln!(
            md,
            "| Trials | p50 | p99 | max | failures |\n|---|---|---|---|---|"
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            k["latency"]["count"],
            fmt_us(f(k, &["latency", "p50_us"])),
            fmt_us(f(k, &["latency", "p99_us"])),
            fmt_us(f(k, &["latency", "max_us"])),
            k["failures"].as_array().map_or(0, Vec::len),
        );
    }

    let g = &r["gateway"];
    if g["small"].is_object() {
        let _ = writeln!(
            md,
            "\n### Gateway (vramd-gateway in front of an Ollama-like upstream)\n"
        );
        let _ = writeln!(
            md,
            "| Request | samples | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 | added p99 |\n|---|---|---|---|---|---|---|---|"
        );
        for (key, name) in [
            ("small", "small `/api/generate`, `stream: false`"),
            ("first_chunk", "first chunk of a streamed `/api/generate`"),
        ] {
            let x = &g[key];
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_num(f(x, &["gateway", "count"])),
                fmt_us(f(x, &["direct", "p50_us"])),
                fmt_us(f(x, &["direct", "p99_us"])),
                fmt_us(f(x, &["gateway", "p50_us"])),
                fmt_us(f(x, &["gateway", "p99_us"])),
                fmt_us(f(x, &["added", "p50_us"])),
                fmt_us(f(x, &["added", "p99_us"])),
            );
        }
        let t = &g["throughput"];
        let _ = writeln!(
            md,
            "\n{} clients, small requests on keep-alive connections: {} req/s direct, {} req/s through the gateway (gateway CPU {}% of a core).",
            t["clients"],
            fmt_num(t["direct_requests_per_s"].as_f64()),
            fmt_num(t["gateway_requests_per_s"].as_f64()),
            fmt_num(t["gateway_cpu_pct"].as_f64()),
        );
    }

    let s = &r["scale"];
    if !s.is_null() && s.get("error").is_none() {
        let _ = writeln!(md, "\n### Scale\n");
        let _ = writeln!(md, "| Figure | Value |\n|---|---|");
        let kv = |md: &mut String, k: &str, v: String| {
            let _ = writeln!(md, "| {k} | {v} |");
        };
        kv(
            &mut md,
            "connections opened",
            format!(
                "{} of {} in {} s",
                fmt_num(f(s, &["connections_opened"])),
                fmt_num(f(s, &["connections_target"])),
                fmt_num(f(s, &["open_seconds"]))
            ),
        );
        kv(
            &mut md,
            "daemon RSS: idle / with the connections",
            format!(
                "{} MiB / {} MiB ({} KiB per connection)",
                fmt_num(f(s, &["rss_idle_mib"])),
                fmt_num(f(s, &["rss_connections_mib"])),
                fmt_num(f(s, &["rss_per_connection_kib"]))
            ),
        );
        kv(
            &mut md,
            "requests queued",
            format!(
                "{} of {} in {} s (budget {} s)",
                fmt_num(f(s, &["queued_reached"])),
                fmt_num(f(s, &["queued_target"])),
                fmt_num(f(s, &["queue_build_seconds"])),
                s["queue_build_budget_seconds"]
            ),
        );
        if let Some(points) = s["enqueue_cost_by_depth"].as_array() {
            let pts: Vec<String> = points
                .iter()
                .map(|p| {
                    format!(
                        "{} → {}",
                        fmt_num(f(p, &["depth"])),
                        fmt_us(f(p, &["us_per_request"]))
                    )
                })
                .collect();
            kv(&mut md, "cost per queued request by depth", pts.join(", "));
        }
        kv(
            &mut md,
            "daemon RSS with the backlog",
            format!("{} MiB", fmt_num(f(s, &["rss_backlog_mib"]))),
        );
        kv(
            &mut md,
            &format!(
                "throughput, {} clients: empty queue / with backlog",
                s["throughput_clients"]
            ),
            format!(
                "{} / {} pairs/s ({} slower)",
                fmt_num(f(s, &["throughput_empty", "pairs_per_s"])),
                fmt_num(f(s, &["throughput_backlog", "pairs_per_s"])),
                fmt_x(f(s, &["empty_over_backlog"]))
            ),
        );
        kv(
            &mut md,
            "pair p50 with backlog",
            fmt_us(f(s, &["throughput_backlog", "latency", "p50_us"])),
        );
        let st = &s["status_with_backlog"];
        kv(
            &mut md,
            "`status` with the backlog",
            if st["ok"].as_bool() == Some(true) {
                format!("answered in {} ms", fmt_num(st["ms"].as_f64()))
            } else {
                format!(
                    "**failed** after {} ms: {}",
                    fmt_num(st["ms"].as_f64()),
                    st["error"].as_str().unwrap_or("")
                )
            },
        );
    }

    let fp = &r["footprint"];
    if !fp.is_null() && fp.get("error").is_none() {
        let _ = writeln!(md, "\n### Idle footprint\n");
        let _ = writeln!(
            md,
            "| RSS | threads | window | CPU | context switches |\n|---|---|---|---|---|"
        );
        let _ = writeln!(
            md,
            "| {} MiB | {} | {} s | {} s = {}% of one core | {} ({}/s) |",
            fmt_num(f(fp, &["rss_mib"])),
            fp["threads"],
            fmt_num(f(fp, &["window_seconds"])),
            fp["cpu_seconds"],
            fp["cpu_percent_of_one_core"],
            fp["context_switches"],
            fp["context_switches_per_s"],
        );
    }

    if let Some(traces) = r["scheduling"]["traces"].as_object() {
        let _ = writeln!(md, "\n### Scheduling simulator");
        for (name, t) in traces {
            if let Some(e) = t["error"].as_str() {
                let _ = writeln!(md, "\n**{name}**: error: {e}");
                continue;
            }
            // Highest priority first (JSON keys sort as text: "10" < "5").
            let mut prios: Vec<String> = t["policies"]["vramd"]["wait_by_priority"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            prios.sort_by_key(|p| std::cmp::Reverse(p.parse::<i64>().unwrap_or(i64::MIN)));
            let _ = writeln!(
                md,
                "\n**{name}** ({} jobs; lower bound on the makespan {} s). {}\n",
                t["jobs"],
                fmt_num(f(t, &["lower_bound_s"])),
                t["description"].as_str().unwrap_or("")
            );
            let mut head = String::from("| Policy | makespan | ÷ bound | memory util. (bound) |");
            let mut sep = String::from("|---|---|---|---|");
            for p in &prios {
                let _ = write!(head, " wait p{p}: mean / p99 |");
                sep.push_str("---|");
            }
            head.push_str(" longest wait | evictions | overcommits |");
            sep.push_str("---|---|---|");
            let _ = writeln!(md, "{head}\n{sep}");
            if let Some(policies) = t["policies"].as_object() {
                // vramd first, then the baselines, then anything else.
                let mut names: Vec<&String> = policies.keys().collect();
                names.sort_by_key(|n| {
                    std::iter::once("vramd")
                        .chain(BASELINES)
                        .position(|x| x == n.as_str())
                        .unwrap_or(usize::MAX)
                });
                for pname in names {
                    let p = &policies[pname];
                    let mut line = format!(
                        "| {pname} | {} s | {} | {}% ({}%) |",
                        fmt_num(f(p, &["makespan_s"])),
                        fmt_x(f(p, &["makespan_over_lower_bound"])),
                        fmt_num(f(p, &["memory_utilization_pct"])),
                        fmt_num(f(p, &["memory_utilization_bound_pct"])),
                    );
                    for prio in &prios {
                        let w = &p["wait_by_priority"][prio];
                        let _ = write!(
                            line,
                            " {} / {} s |",
                            fmt_num(f(w, &["mean_s"])),
                            fmt_num(f(w, &["p99_s"]))
                        );
                    }
                    let lw = &p["longest_wait"];
                    let _ = write!(
                        line,
                        " {} s ({}, p{}) | {} | {} |",
                        fmt_num(f(lw, &["s"])),
                        lw["label"].as_str().unwrap_or("–"),
                        lw["priority"],
                        p["evictions"],
                        p["overcommits"],
                    );
                    let _ = writeln!(md, "{line}");
                }
            }
        }
    }
    if let Some(errors) = r["errors"].as_object() {
        if !errors.is_empty() {
            let _ = writeln!(md, "\n### Errors\n");
            for (k, v) in errors {
                let _ = writeln!(md, "- {k}: {}", v.as_str().unwrap_or(""));
            }
        }
    }
    md
}
