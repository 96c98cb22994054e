//! Processes the harness starts and watches: the daemon under test, helper
//! processes (the ping-pong echo, the holder that gets SIGKILLed, the Python
//! client), and what `/proc` says about them.
//!
//! Lifecycle rules: every child is started with `PR_SET_PDEATHSIG = SIGKILL`
//! (so it dies with the harness even if the harness is killed), from the main
//! thread (the signal follows the thread that forked), and is killed and
//! reaped when its guard drops — also while a panic unwinds. Every wait here
//! has a deadline.

use std::io;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub use vramd_harness::{ChildGuard, TempDir, die_with_parent, private_tempdir};

/// How long the daemon under test may take to accept connections.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Spawns `cmd` guarded, with [`die_with_parent`].
pub fn spawn(cmd: &mut Command) -> io::Result<ChildGuard> {
    ChildGuard::spawn(die_with_parent(cmd))
}

/// A `vramd` started on a private socket; killed when dropped. The shared
/// harness's [`vramd_harness::Daemon`] (also the end-to-end tests'), started
/// with the benchmark's options.
#[derive(Debug)]
pub struct Daemon {
    inner: vramd_harness::Daemon,
}

impl Daemon {
    /// Starts `bin` with `args` plus `--log-level log_level` (`RUST_LOG`
    /// removed; its log goes to a file in its directory) and
    /// [`die_with_parent`], and waits up to 10 s until it accepts
    /// connections.
    pub fn start(bin: &Path, args: &[&str], log_level: &str) -> io::Result<Daemon> {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--log-level")
            .arg(log_level)
            .env_remove("RUST_LOG");
        die_with_parent(&mut cmd);
        vramd_harness::Daemon::start(cmd, DAEMON_START_TIMEOUT)
            .map(|inner| Daemon { inner })
            .map_err(io::Error::other)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        self.inner.socket()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        self.inner.log_tail(20)
    }

    /// What `/proc` says about it now.
    pub fn sample(&self) -> io::Result<ProcSample> {
        ProcSample::read(self.pid())
    }
}

/// Resource use of a process at one moment (from `/proc/<pid>`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// Resident set size.
    pub rss_bytes: u64,
    /// Peak resident set size.
    pub hwm_bytes: u64,
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Context switches of all its threads (voluntary and not): each is a
    /// wake-up or a preemption.
    pub ctx_switches: u64,
    /// Number of threads.
    pub threads: u64,
}

impl ProcSample {
    /// Reads `/proc/<pid>/{status,stat}` and its threads' switch counts.
    pub fn read(pid: u32) -> io::Result<ProcSample> {
        let at = Instant::now();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let rss_bytes = field("VmRSS:") * 1024;
        let hwm_bytes = field("VmHWM:") * 1024;
        let threads = field("Threads:");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 (1-based), i.e. 12 and 13 after it.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let f: Vec<&str> = after.split_whitespace().collect();
        let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let cpu_ticks = tick(11) + tick(12);
        let mut ctx_switches = 0;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
                    for l in s.lines() {
                        if let Some(rest) = l
                            .strip_prefix("voluntary_ctxt_switches:")
                            .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                        {
                            ctx_switches += rest.trim().parse::<u64>().unwrap_or(0);
                        }
                    }
                }
            }
        }
        Ok(ProcSample {
            at,
            rss_bytes,
            hwm_bytes,
            cpu_ticks,
            ctx_switches,
            threads,
        })
    }
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Sends SIGKILL to `pid`.
pub fn sigkill(pid: u32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Raises the soft open-files limit to the hard limit; returns the new soft
/// limit.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit to fill and then read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                r = want;
            }
        }
    }
    r.rlim_cur
}

/// The machine's CPU time so far, from `/proc/stat`'s first line, in ticks:
/// (all of it, stolen by the hypervisor). Compare two readings with
/// [`steal_pct`].
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((v.iter().take(8).sum(), v.get(7).copied().unwrap_or(0)))
}

/// Share of the CPUs' time between two [`cpu_ticks`] readings that the
/// hypervisor gave to other guests, in percent: on a virtual machine, the
/// noise no guest-side measurement sees.
pub fn steal_pct(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.0.checked_sub(before.0).filter(|&t| t > 0)?;
    Some(100.0 * after.1.saturating_sub(before.1) as f64 / total as f64)
}

/// Share of all CPUs busy over `window`, in percent, from `/proc/stat`
/// (every process on the machine, this one included).
pub fn machine_busy_pct(window: Duration) -> Option<f64> {
    fn read() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((total, idle))
    }
    let (t0, i0) = read()?;
    std::thread::sleep(window);
    let (t1, i1) = read()?;
    let dt = t1.saturating_sub(t0);
    if dt == 0 {
        return None;
    }
    Some(100.0 * (1.0 - i1.saturating_sub(i0) as f64 / dt as f64))
}
