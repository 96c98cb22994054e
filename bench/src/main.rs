//! `vramd-bench`: the benchmark harness and scheduling simulator of vramd.
//!
//! One run measures what a user of the arbiter would notice — the cost of a
//! grant+release against a raw socket ping-pong, throughput under
//! concurrency, how fast a killed holder's memory reaches a waiter, behaviour
//! with ten thousand connections and a deep queue, the idle footprint — and
//! replays job traces through the daemon's own ledger against the designs it
//! replaces. Results go to `--json FILE` (one key per figure) and a markdown
//! table (stdout and `--markdown FILE`). `--smoke` runs everything tiny.
//!
//! The harness starts its own daemons (`vramd --simulate …` on private
//! sockets) and kills them when done, also on panic; see docs/benchmarks.md
//! for the method.

mod footprint;
mod gateway;
mod kill;
mod latency;
mod procs;
mod report;
mod scale;
mod sim;
mod stats;
mod throughput;
mod wire;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};
use vramd_client::{DeviceSelector, GIB};

use crate::procs::Daemon;
use crate::scale::ScaleConfig;
use crate::sim::trace::{self, Trace};

/// Benchmarks vramd and simulates its scheduling against baselines.
#[derive(Debug, Parser)]
#[command(name = "vramd-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the markdown report to this file (it is always printed).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// Run every measurement tiny, only to prove that it runs.
    #[arg(long)]
    smoke: bool,
    /// Run only these sections (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// The daemon binary [default: `vramd` beside this binary, built first
    /// with cargo in the same profile].
    #[arg(long, value_name = "PATH")]
    vramd: Option<PathBuf>,
    /// The gateway binary [default: `vramd-gateway` beside this binary,
    /// built first with cargo in the same profile].
    #[arg(long, value_name = "PATH")]
    gateway: Option<PathBuf>,
    /// Do not run `cargo build` of the daemon and the gateway before starting.
    #[arg(long)]
    no_build: bool,
    /// Python interpreter for the Python SDK figure [default: .venv/bin/python
    /// at the workspace root].
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Log level of the daemons started (their logs go to files).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    daemon_log_level: String,
    /// Longest time spent building the scale backlog, in seconds.
    #[arg(long, value_name = "SECONDS")]
    scale_budget: Option<u64>,
    /// Requests to queue in the scale measurement.
    #[arg(long, value_name = "N")]
    scale_queued: Option<usize>,
    /// Seed of the random trace.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Offered load of the random trace (memory-time of its jobs over the
    /// device's memory).
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    /// More traces (JSON files) to simulate.
    #[arg(long, value_name = "FILE")]
    trace: Vec<PathBuf>,
    /// Before starting, wait up to this many seconds for the machine to be
    /// quiet (under 10% of its CPUs busy for a second): other work on the
    /// machine skews every figure.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    wait_quiet: u64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print a generated trace as JSON.
    Trace {
        /// Which generator.
        #[arg(value_enum)]
        kind: TraceKind,
        /// Its seed [default: the shipped home-lab seed, or 1].
        #[arg(long)]
        seed: Option<u64>,
        /// Jobs (random traces).
        #[arg(long, default_value_t = 3000)]
        jobs: usize,
        /// Offered load (random traces).
        #[arg(long, default_value_t = 0.5)]
        load: f64,
    },
    /// Score candidate scheduling policies against the baselines on the
    /// home-lab trace and random traces (docs/benchmarks.md, "Priorities
    /// under load").
    Sweep {
        /// Random traces per load.
        #[arg(long, default_value_t = 10)]
        seeds: u64,
        /// Jobs per random trace.
        #[arg(long, default_value_t = 3000)]
        jobs: usize,
        /// Offered loads (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "0.5,0.7,0.9")]
        loads: Vec<f64>,
        /// Score this candidate instead of the built-in list (repeat; e.g.
        /// `aging=30s,guard=2m`).
        #[arg(long, value_name = "SPEC", value_parser = sim::sweep::parse_candidate)]
        candidate: Vec<sim::sweep::Candidate>,
        /// Write the results as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Print the markdown report of a saved results file.
    Report {
        /// The JSON written by `--json`.
        file: PathBuf,
    },
    /// (internal) Echo frames for the ping-pong floor.
    #[command(name = "__echo", hide = true)]
    Echo { socket: PathBuf, len: usize },
    /// (internal) Hold the device until killed.
    #[command(name = "__holder", hide = true)]
    Holder { socket: PathBuf, bytes: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TraceKind {
    Homelab,
    Random,
}

/// The sections of a run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Floor,
    Rtt,
    Throughput,
    Kill,
    Python,
    Scale,
    Footprint,
    Gateway,
    Sim,
}

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Plan {
    floor_warmup: usize,
    floor_iters: usize,
    rtt_warmup: usize,
    rtt_iters: usize,
    rtt_budget: Duration,
    blocks: usize,
    tp_clients: Vec<usize>,
    tp_window: Duration,
    kill_trials: usize,
    kill_budget: Duration,
    py_warmup: usize,
    py_iters: usize,
    py_budget: Duration,
    scale: ScaleConfig,
    idle_window: Duration,
    random_jobs: usize,
    gateway: gateway::GatewayPlan,
}

impl Plan {
    fn new(cli: &Cli) -> Plan {
        let mut p = if cli.smoke {
            Plan {
                floor_warmup: 200,
                floor_iters: 2_000,
                rtt_warmup: 100,
                rtt_iters: 1_000,
                rtt_budget: Duration::from_secs(5),
                blocks: 4,
                tp_clients: vec![1, 8, 64, 512],
                tp_window: Duration::from_millis(500),
                kill_trials: 10,
                kill_budget: Duration::from_secs(10),
                py_warmup: 20,
                py_iters: 200,
                py_budget: Duration::from_secs(5),
                scale: ScaleConfig {
                    connections: 200,
                    queued: 2_000,
                    batch: 200,
                    build_budget: Duration::from_secs(10),
                    clients: 8,
                    window: Duration::from_millis(300),
                },
                idle_window: Duration::from_secs(2),
                random_jobs: 300,
                gateway: gateway::GatewayPlan {
                    warmup: 20,
                    iters: 100,
                    blocks: 2,
                    clients: 64,
                    window: Duration::from_millis(300),
                    budget: Duration::from_secs(20),
                },
            }
        } else {
            Plan {
                floor_warmup: 2_000,
                floor_iters: 100_000,
                rtt_warmup: 2_000,
                rtt_iters: 100_000,
                rtt_budget: Duration::from_secs(60),
                blocks: 20,
                tp_clients: vec![1, 8, 64, 512],
                tp_window: Duration::from_secs(3),
                kill_trials: 300,
                kill_budget: Duration::from_secs(60),
                py_warmup: 500,
                py_iters: 20_000,
                py_budget: Duration::from_secs(30),
                scale: ScaleConfig {
                    connections: 10_000,
                    queued: 100_000,
                    batch: 1_000,
                    build_budget: Duration::from_secs(90),
                    clients: 8,
                    window: Duration::from_secs(5),
                },
                idle_window: Duration::from_secs(30),
                random_jobs: 3_000,
                gateway: gateway::GatewayPlan {
                    warmup: 200,
                    iters: 5_000,
                    blocks: 10,
                    clients: 64,
                    window: Duration::from_secs(3),
                    budget: Duration::from_secs(60),
                },
            }
        };
        if let Some(s) = cli.scale_budget {
            p.scale.build_budget = Duration::from_secs(s);
        }
        if let Some(q) = cli.scale_queued {
            p.scale.queued = q;
        }
        p
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Finds (and unless told otherwise, first builds) the daemon binary.
fn vramd_binary(cli: &Cli, exe: &Path) -> Result<(PathBuf, String), String> {
    sibling_binary(cli, exe, cli.vramd.as_deref(), "vramd", "vramd")
}

/// Finds `bin` of `package` beside this binary (in the same profile),
/// building it first with cargo unless `--no-build`; `given` wins.
fn sibling_binary(
    cli: &Cli,
    exe: &Path,
    given: Option<&Path>,
    package: &str,
    bin: &str,
) -> Result<(PathBuf, String), String> {
    let dir = exe.parent().ok_or("no directory for this binary")?;
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    if let Some(p) = given {
        return Ok((p.to_path_buf(), profile));
    }
    if !cli.no_build {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
        if profile == "release" {
            cmd.arg("--release");
        }
        eprintln!("== building: cargo build -p {package} --bin {bin} ({profile})");
        match cmd.current_dir(workspace_root()).status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("warning: cargo build of {bin} failed ({s}); using what is there"),
            Err(e) => eprintln!("warning: cannot run cargo ({e}); using what is there"),
        }
    }
    let path = dir.join(bin);
    if path.exists() {
        Ok((path, profile))
    } else {
        Err(format!(
            "no {bin} binary at {}; build it (cargo build -p {package})",
            path.display()
        ))
    }
}

fn read_first(path: &str, prefix: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
    })
}

fn machine() -> Value {
    let mem_kib: f64 = read_first("/proc/meminfo", "MemTotal:")
        .and_then(|v| v.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0);
    let flags = read_first("/proc/cpuinfo", "flags").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": read_first("/proc/cpuinfo", "model name"),
        "memory_gib": (mem_kib / 1024.0 / 1024.0).round(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "virtualized": flags.split_whitespace().any(|f| f == "hypervisor"),
        "open_files_limit": procs::raise_nofile_limit(),
    })
}

fn git_commit() -> Option<String> {
    let root = workspace_root();
    let out = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()?;
    let mut commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if commit.is_empty() {
        return None;
    }
    let dirty = Command::new("git")
        .args([
            "status",
            "--porcelain",
            "--",
            "daemon",
            "protocol",
            "sdk-rust",
        ])
        .current_dir(&root)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        commit.push_str(" (daemon sources modified)");
    }
    Some(commit)
}

/// Results of the run so far, and the sections that failed.
struct Run {
    results: Map<String, Value>,
    errors: Map<String, Value>,
    only: Vec<Section>,
}

impl Run {
    fn wants(&self, s: Section) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }

    fn record(&mut self, key: &str, started: Instant, r: Result<Value, String>) {
        let secs = started.elapsed().as_secs_f64();
        match r {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("section_seconds".into(), json!(stats::round2(secs)));
                }
                eprintln!("   done in {secs:.1} s");
                self.results.insert(key.into(), v);
            }
            Err(e) => {
                eprintln!("   FAILED after {secs:.1} s: {e}");
                self.errors.insert(key.into(), json!(e));
                self.results.insert(key.into(), json!({ "error": e }));
            }
        }
    }

    fn floor_ns(&self) -> u64 {
        self.results
            .get("floor")
            .and_then(|f| f["round_trip"]["p50_us"].as_f64())
            .map_or(0, |us| (us * 1e3) as u64)
    }
}

fn start_daemon(bin: &Path, args: &[&str], level: &str) -> Result<Daemon, String> {
    Daemon::start(bin, args, level).map_err(|e| e.to_string())
}

fn run_all(cli: &Cli) -> ExitCode {
    let plan = Plan::new(cli);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vramd-bench: cannot find this binary: {e}");
            return ExitCode::from(2);
        }
    };
    let machine = machine();
    let needs_daemon = cli.only.is_empty()
        || cli
            .only
            .iter()
            .any(|s| !matches!(s, Section::Floor | Section::Sim));
    let (bin, profile) = if needs_daemon {
        match vramd_binary(cli, &exe) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("vramd-bench: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        (PathBuf::from("vramd"), "-".to_string())
    };
    let level = cli.daemon_log_level.as_str();
    let quiet_deadline = Instant::now() + Duration::from_secs(cli.wait_quiet);
    let mut busy = procs::machine_busy_pct(Duration::from_secs(1));
    while busy.is_some_and(|b| b >= 10.0) && Instant::now() < quiet_deadline {
        eprintln!(
            "== waiting for a quiet machine: {:.0}% of the CPUs busy",
            busy.unwrap_or(0.0)
        );
        busy = procs::machine_busy_pct(Duration::from_secs(1));
    }
    if let Some(b) = busy.filter(|&b| b >= 10.0) {
        eprintln!(
            "warning: {b:.0}% of the CPUs were busy before the run; the figures will be noisy"
        );
    }
    let mut run = Run {
        results: Map::new(),
        errors: Map::new(),
        only: cli.only.clone(),
    };
    let t_all = Instant::now();
    let ticks_before = procs::cpu_ticks();
    run.results.insert(
        "meta".into(),
        json!({
            "mode": if cli.smoke { "smoke" } else { "full" },
            "machine": machine,
            "vramd": bin.display().to_string(),
            "profile": profile,
            "daemon_log_level": level,
            "machine_busy_pct_before": busy.map(stats::round2),
            "commit": git_commit(),
            "started_unix_s": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }),
    );

    let floor_json = |f: &latency::Floor, interleaved: bool| {
        json!({
            "frame_bytes": f.frame_bytes,
            "round_trip": f.round_trip.to_json(),
            "cost_per_round_trip": f.cost,
            "interleaved_with_rtt": interleaved,
        })
    };
    if run.wants(Section::Rtt) {
        eprintln!(
            "== floor + rtt_rust: {} raw Unix-socket round trips and {} grant+release pairs \
             through the Rust SDK (a quarter as many pings, and pairs without the SDK), \
             alternating in {} blocks",
            plan.rtt_iters, plan.rtt_iters, plan.blocks
        );
        let t = Instant::now();
        let r = start_daemon(&bin, &["--simulate", "24GiB"], level).and_then(|d| {
            latency::floor_and_sdk(
                &exe,
                d.socket(),
                d.pid(),
                plan.rtt_warmup,
                plan.rtt_iters,
                plan.blocks,
                plan.rtt_budget,
            )
            .map_err(|e| format!("{e}; daemon log:\n{}", d.log_tail()))
        });
        match r {
            Ok((floor, s)) => {
                let floor_ns = floor.round_trip.p50_ns;
                run.record("floor", t, Ok(floor_json(&floor, true)));
                let v = json!({
                    "pair": s.pair.to_json_with_ratio(floor_ns),
                    "grant": s.grant.to_json_with_ratio(floor_ns),
                    "release": s.release.to_json_with_ratio(floor_ns),
                    "ping": s.ping.to_json_with_ratio(floor_ns),
                    "raw_pair": s.raw_pair.to_json_with_ratio(floor_ns),
                    "cost_per_pair": s.cost,
                    "floor_p50_us": stats::us(floor_ns),
                });
                run.record("rtt_rust", t, Ok(v));
            }
            Err(e) => {
                run.record("floor", t, Err(e.clone()));
                run.record("rtt_rust", t, Err(e));
            }
        }
    } else if run.wants(Section::Floor) {
        eprintln!("== floor: {} raw Unix-socket round trips", plan.floor_iters);
        let t = Instant::now();
        let r = latency::floor(&exe, plan.floor_warmup, plan.floor_iters)
            .map(|f| floor_json(&f, false))
            .map_err(|e| e.to_string());
        run.record("floor", t, r);
    }
    let floor_ns = run.floor_ns();

    if run.wants(Section::Throughput) {
        eprintln!(
            "== throughput: clients {:?}, {:?} each",
            plan.tp_clients, plan.tp_window
        );
        let t = Instant::now();
        let r = start_daemon(&bin, &["--simulate", "24GiB"], level).and_then(|d| {
            let mut runs = Vec::new();
            for &n in &plan.tp_clients {
                let x = throughput::run(
                    d.socket(),
                    d.pid(),
                    n,
                    plan.tp_window,
                    throughput::PAIR_BYTES,
                    DeviceSelector::Any,
                )
                .map_err(|e| format!("{n} clients: {e}"))?;
                eprintln!("   {n:>4} clients: {:>9.0} pairs/s", x.pairs_per_s());
                if !x.errors.is_empty() {
                    return Err(format!("{n} clients: {}", x.errors[0]));
                }
                runs.push(x.to_json());
            }
            let rss = d.sample().map(|s| s.hwm_bytes).unwrap_or(0);
            Ok(json!({
                "pair_bytes": throughput::PAIR_BYTES,
                "runs": runs,
                "daemon_peak_rss_mib": stats::round2(rss as f64 / 1048576.0),
            }))
        });
        run.record("throughput", t, r);
    }

    if run.wants(Section::Kill) {
        eprintln!("== kill_to_grant: {} trials", plan.kill_trials);
        let t = Instant::now();
        let r = start_daemon(&bin, &["--simulate", "24GiB"], level).and_then(|d| {
            let k = kill::run(
                &exe,
                d.socket(),
                plan.kill_trials,
                24 * GIB,
                plan.kill_budget,
            )
            .map_err(|e| e.to_string())?;
            if k.latency.count == 0 {
                return Err(format!("no trial completed: {:?}", k.failures));
            }
            Ok(json!({
                "trials": k.trials,
                "latency": k.latency.to_json_with_ratio(floor_ns),
                "failures": k.failures,
            }))
        });
        run.record("kill_to_grant", t, r);
    }

    if run.wants(Section::Python) {
        let python = cli
            .python
            .clone()
            .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
        eprintln!("== rtt_python: {}", python.display());
        let t = Instant::now();
        let r = start_daemon(&bin, &["--simulate", "24GiB"], level).and_then(|d| {
            let v = latency::python_round_trip(
                &python,
                d.socket(),
                plan.py_warmup,
                plan.py_iters,
                plan.py_budget,
                floor_ns,
            );
            match v.get("error").and_then(Value::as_str) {
                Some(e) => Err(e.to_string()),
                None => Ok(v),
            }
        });
        if let Ok(v) = &r {
            if let Some(reason) = v["reason"].as_str() {
                eprintln!("   skipped: {reason}");
            }
        }
        run.record("rtt_python", t, r);
    }

    if run.wants(Section::Scale) {
        eprintln!(
            "== scale: {} connections, {} queued (budget {:?})",
            plan.scale.connections, plan.scale.queued, plan.scale.build_budget
        );
        let t = Instant::now();
        let r = scale::run(&bin, level, &plan.scale);
        run.record("scale", t, r);
    }

    if run.wants(Section::Gateway) {
        eprintln!(
            "== gateway: {} small and {} streamed requests direct and through vramd-gateway, \
             then {} clients",
            plan.gateway.iters, plan.gateway.iters, plan.gateway.clients
        );
        let t = Instant::now();
        let r = sibling_binary(
            cli,
            &exe,
            cli.gateway.as_deref(),
            "vramd-gateway",
            "vramd-gateway",
        )
        .and_then(|(gw, _)| {
            start_daemon(&bin, &["--simulate", "24GiB"], level).and_then(|d| {
                gateway::run(&gw, d.socket(), &plan.gateway)
                    .map_err(|e| format!("{e}; daemon log:\n{}", d.log_tail()))
            })
        });
        if let Ok(v) = &r {
            eprintln!(
                "   added p50: small {} µs, first chunk {} µs; {} clients: {} req/s direct, {} through the gateway",
                v["small"]["added"]["p50_us"],
                v["first_chunk"]["added"]["p50_us"],
                v["throughput"]["clients"],
                v["throughput"]["direct_requests_per_s"],
                v["throughput"]["gateway_requests_per_s"]
            );
        }
        run.record("gateway", t, r);
    }

    // The idle window overlaps the simulator, which does not touch the
    // daemon (see footprint.rs).
    let idle = if run.wants(Section::Footprint) {
        eprintln!(
            "== footprint: idle daemon for {:?} (overlapping the simulator)",
            plan.idle_window
        );
        Some((
            Instant::now(),
            footprint::IdleProbe::start(&bin, level).map_err(|e| e.to_string()),
        ))
    } else {
        None
    };

    if run.wants(Section::Sim) {
        eprintln!("== scheduling: simulator");
        let t = Instant::now();
        let r = scheduling(cli, &plan);
        run.record("scheduling", t, r);
    }

    if let Some((t, probe)) = idle {
        let r = probe.and_then(|p| p.finish(plan.idle_window).map_err(|e| e.to_string()));
        run.record("footprint", t, r);
    }

    let targets = report::targets(&Value::Object(run.results.clone()));
    run.results.insert("targets".into(), targets);
    run.results.insert(
        "total_seconds".into(),
        json!(stats::round2(t_all.elapsed().as_secs_f64())),
    );
    run.results["meta"]["machine_busy_pct_after"] =
        json!(procs::machine_busy_pct(Duration::from_millis(500)).map(stats::round2));
    run.results["meta"]["steal_pct_during_run"] = json!(
        ticks_before
            .zip(procs::cpu_ticks())
            .and_then(|(a, b)| procs::steal_pct(a, b))
            .map(stats::round2)
    );
    let failed = !run.errors.is_empty();
    run.results
        .insert("errors".into(), Value::Object(run.errors.clone()));
    let results = Value::Object(run.results);
    let md = report::markdown(&results);
    println!("{md}");
    let mut ok = !failed;
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&results).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("vramd-bench: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    if let Some(path) = &cli.markdown {
        if let Err(e) = std::fs::write(path, &md) {
            eprintln!("vramd-bench: cannot write {}: {e}", path.display());
            ok = false;
        }
    }
    eprintln!(
        "== finished in {:.1} s{}",
        t_all.elapsed().as_secs_f64(),
        if failed { " with failed sections" } else { "" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The shipped home-lab trace.
fn homelab_trace() -> Result<Trace, String> {
    serde_json::from_str(include_str!("../traces/homelab.json"))
        .map_err(|e| format!("bench/traces/homelab.json: {e}"))
}

fn scheduling(cli: &Cli, plan: &Plan) -> Result<Value, String> {
    let mut traces = vec![
        homelab_trace()?,
        trace::random(cli.seed, plan.random_jobs, cli.load),
    ];
    for path in &cli.trace {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        traces.push(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let mut out = Map::new();
    for t in &traces {
        let started = Instant::now();
        let v = sim::run_trace(t);
        eprintln!(
            "   {}: {} jobs in {:.2} s",
            t.name,
            t.jobs.len(),
            started.elapsed().as_secs_f64()
        );
        out.insert(t.name.clone(), v);
    }
    let problems: Vec<String> = out
        .iter()
        .flat_map(|(name, t)| {
            let mut p = Vec::new();
            if let Some(e) = t["error"].as_str() {
                p.push(format!("{name}: {e}"));
            }
            if let Some(pol) = t["policies"].as_object() {
                for (pn, v) in pol {
                    if let Some(errs) = v["errors"].as_array().filter(|e| !e.is_empty()) {
                        p.push(format!("{name}/{pn}: {}", errs[0]));
                    }
                }
            }
            p
        })
        .collect();
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(json!({ "traces": out }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        None => run_all(&cli),
        Some(Cmd::Trace {
            kind,
            seed,
            jobs,
            load,
        }) => {
            let t = match kind {
                TraceKind::Homelab => trace::homelab(seed.unwrap_or(trace::HOMELAB_SEED)),
                TraceKind::Random => trace::random(seed.unwrap_or(1), *jobs, *load),
            };
            match serde_json::to_string_pretty(&t) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vramd-bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Cmd::Sweep {
            seeds,
            jobs,
            loads,
            candidate,
            json,
        }) => {
            let candidates = if candidate.is_empty() {
                sim::sweep::candidates()
            } else {
                candidate.clone()
            };
            let (v, md) = sim::sweep::sweep(&candidates, loads, *seeds, *jobs);
            println!("{md}");
            if let Some(path) = json {
                let text = serde_json::to_string_pretty(&v).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("vramd-bench: {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Some(Cmd::Report { file }) => {
            match std::fs::read_to_string(file)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str::<Value>(&s).map_err(|e| e.to_string()))
            {
                Ok(v) => {
                    println!("{}", report::markdown(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vramd-bench: {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Some(Cmd::Echo { socket, len }) => match latency::echo_child(socket, *len) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vramd-bench __echo: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Cmd::Holder { socket, bytes }) => match kill::holder_child(socket, *bytes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vramd-bench __holder: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
