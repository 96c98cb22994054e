//! The NVML backend end to end, against the fake libnvidia-ml in
//! tests/fake-nvml driven by a state file that each test edits while the
//! daemon runs (format: tests/fake-nvml/README.md).

use std::sync::Arc;
use std::time::Duration;

use fake_nvml::{DeviceFailure, FakeDevice, FakeProcess, InitError, State};
use vramd_client::{DeviceSelector, Error, GIB, Progress, Request, StatusReport};
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::{Daemon, WAIT, bin, fake_nvml_lib, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const UUID1: &str = "GPU-99999999-1111-2222-3333-444444444444";

/// A fake machine: the state file and a daemon reading it.
struct Fake {
    gpu: Arc<FakeGpu>,
    daemon: Daemon,
}

impl Fake {
    /// One 24 GiB device, no processes; plus `extra` 8 GiB devices.
    fn start(extra_devices: usize) -> Fake {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut devices = vec![(UUID0, 24 * GIB)];
        devices.extend(std::iter::repeat_n((UUID1, 8 * GIB), extra_devices));
        let gpu = FakeGpu::create(&dir.join("state.json"), &devices);
        let lib = fake_nvml_lib();
        let daemon = Daemon::start_env(
            &[
                "--nvml-lib",
                lib.to_str().unwrap(),
                "--poll-interval",
                "50ms",
            ],
            &[(fake_nvml::STATE_ENV, gpu.path())],
        );
        Fake { gpu, daemon }
    }

    /// Edits device `i` of the state and writes it atomically.
    fn edit(&self, i: usize, f: impl FnOnce(&mut FakeDevice)) {
        self.gpu.edit(i, f);
    }

    /// Lists exactly these (pid, used_bytes) processes on device `i`.
    fn set_processes(&self, i: usize, list: &[(u32, u64)]) {
        self.edit(i, |d| {
            d.processes = list
                .iter()
                .map(|&(pid, bytes)| FakeProcess::new(pid, bytes))
                .collect();
        });
    }

    fn status(&self) -> StatusReport {
        self.daemon.client().status().unwrap()
    }

    /// Waits until the daemon's status satisfies `f`.
    fn wait_status(&self, what: &str, f: impl Fn(&StatusReport) -> bool) -> StatusReport {
        self.daemon.wait_status(what, f)
    }
}

fn me() -> u32 {
    std::process::id()
}

#[test]
fn starts_on_the_fake_card_and_describes_it() {
    let f = Fake::start(1);
    let s = f.status();
    assert_eq!(s.backend, "nvml");
    assert_eq!(s.devices.len(), 2);
    assert_eq!(s.devices[0].uuid, UUID0);
    assert_eq!(s.devices[0].name, "Fake GPU");
    assert_eq!(s.devices[0].total_bytes, 24 * GIB);
    assert!(s.devices[0].healthy && s.devices[0].per_process_usage);
    // Real UUIDs go into CUDA_VISIBLE_DEVICES.
    let out = f
        .daemon
        .vramctl()
        .args([
            "run",
            "--vram",
            "1GiB",
            "--device",
            "1",
            "--",
            "sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), UUID1);
}

#[test]
fn an_app_that_never_asks_is_seen() {
    let f = Fake::start(0);
    // Someone else's process allocates 10 GiB without a reservation.
    f.set_processes(0, &[(4_000_000, 10 * GIB)]);
    let s = f.wait_status("the outside usage", |s| s.devices[0].used_bytes == 10 * GIB);
    assert_eq!(s.devices[0].unattributed_bytes, 10 * GIB);
    assert_eq!(s.devices[0].available_bytes, 14 * GIB);
    let c = f.daemon.client();
    let e = c
        .reserve(Request::new(15 * GIB).timeout(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    let r = c.reserve(Request::new(14 * GIB)).unwrap();
    assert_eq!(r.device_uuid(), UUID0);
}

#[test]
fn a_reservation_counts_once_and_overuse_is_counted_and_flagged() {
    let f = Fake::start(0);
    let c = f.daemon.client();
    let _r = c.reserve(Request::new(4 * GIB).label("tts")).unwrap();
    // Its process loads 3 GiB: still 4 committed, not 7.
    f.set_processes(0, &[(me(), 3 * GIB)]);
    let s = f.wait_status("3 GiB in use", |s| s.devices[0].used_bytes == 3 * GIB);
    assert_eq!(s.devices[0].available_bytes, 20 * GIB);
    assert_eq!(s.reservations[0].actual_bytes, 3 * GIB);
    assert!(!s.reservations[0].over_reserved);
    // It grows to 6 GiB: counted at 6 and flagged.
    f.set_processes(0, &[(me(), 6 * GIB)]);
    let s = f.wait_status("6 GiB in use", |s| s.devices[0].used_bytes == 6 * GIB);
    assert_eq!(s.devices[0].available_bytes, 18 * GIB);
    assert_eq!(s.reservations[0].actual_bytes, 6 * GIB);
    assert!(s.reservations[0].over_reserved);
    let out = f.daemon.vramctl().arg("status").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("6.00 GiB !"), "{table}");
}

#[test]
fn memory_still_in_use_after_a_release_blocks_until_it_is_read_free() {
    let f = Fake::start(0);
    let mut holder = f.daemon.hold("20GiB");
    let hpid = holder.id();
    f.set_processes(0, &[(hpid, 20 * GIB)]);
    f.wait_status("the holder's usage", |s| {
        s.devices[0].used_bytes == 20 * GIB
    });
    let c = f.daemon.client();
    let mut p = c.submit(Request::new(10 * GIB)).unwrap();
    assert!(matches!(
        p.next(Some(WAIT)).unwrap(),
        Some(Progress::Queued { .. })
    ));
    // SIGKILL: the reservation goes, but the driver still shows its memory.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(hpid as i32, libc::SIGKILL) };
    let _ = holder.wait();
    f.wait_status("the release", |s| s.reservations.is_empty());
    assert!(
        p.next(Some(Duration::from_millis(400))).unwrap().is_none(),
        "granted while memory was still in use"
    );
    // The driver frees it: granted within a poll.
    f.set_processes(0, &[]);
    match p.next(Some(WAIT)).unwrap() {
        Some(Progress::Granted(r)) => assert_eq!(r.bytes(), 10 * GIB),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failing_device_is_unhealthy_keeps_its_reservations_and_recovers() {
    let f = Fake::start(1);
    let c = f.daemon.client();
    let kept = c
        .reserve(Request::new(2 * GIB).device(DeviceSelector::Index(0)))
        .unwrap();
    f.edit(0, |d| d.fail = Some(DeviceFailure::GpuLost));
    let s = f.wait_status("device 0 unhealthy", |s| !s.devices[0].healthy);
    assert!(
        s.devices[0].note.as_deref().unwrap_or("").contains("NVML"),
        "{:?}",
        s.devices[0].note
    );
    assert_eq!(s.reservations.len(), 1, "reservations are kept");
    assert!(s.devices[1].healthy);
    let e = c
        .reserve(Request::new(GIB).device(DeviceSelector::Index(0)))
        .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Daemon {
                kind: vramd_client::ErrorKind::Unavailable,
                ..
            }
        ),
        "{e}"
    );
    // "any" goes to the healthy device.
    assert_eq!(c.reserve(Request::new(GIB)).unwrap().device_index(), 1);
    f.daemon.client().ping().unwrap();
    f.edit(0, |d| d.fail = None);
    f.wait_status("device 0 recovered", |s| s.devices[0].healthy);
    assert_eq!(
        c.reserve(Request::new(GIB).device(DeviceSelector::Index(0)))
            .unwrap()
            .device_index(),
        0
    );
    assert!(f.daemon.log().contains("device readings recovered"));
    drop(kept);
}

#[test]
fn without_per_process_usage_it_falls_back_to_used_plus_reserved() {
    let f = Fake::start(0);
    let c = f.daemon.client();
    let _r = c.reserve(Request::new(4 * GIB)).unwrap();
    f.edit(0, |d| {
        d.processes_supported = false;
        d.extra_used_bytes = 4 * GIB;
    });
    let s = f.wait_status("the fallback", |s| !s.devices[0].per_process_usage);
    // used 4 + reserved 4, even if that 4 GiB is the reservation's own.
    assert_eq!(s.devices[0].available_bytes, 16 * GIB);
    assert!(s.devices[0].note.as_deref().unwrap().contains("cautious"));
    // One process with an unknown usage also means "unavailable".
    f.edit(0, |d| {
        d.processes_supported = true;
        d.extra_used_bytes = 0;
        d.processes = vec![FakeProcess::unavailable(me())];
    });
    let s = f.wait_status("unknown usage", |s| {
        !s.devices[0].per_process_usage && s.devices[0].used_bytes == 0
    });
    assert_eq!(s.devices[0].available_bytes, 20 * GIB);
}

#[test]
fn vramctl_run_attributes_the_command_and_its_descendants() {
    let f = Fake::start(0);
    let mut run = f
        .daemon
        .vramctl()
        .args(["run", "--vram", "2GiB", "--", "sh", "-c", "sleep 30 & wait"])
        .spawn()
        .unwrap();
    let s = f.wait_status("the reservation", |s| {
        s.reservations.len() == 1 && s.reservations[0].pids.len() == 2
    });
    let sh = s.reservations[0].pids[1];
    // The shell's child (sleep) is a descendant: find it in /proc.
    let mut grandchild = 0;
    assert!(wait_until(WAIT, || {
        let children =
            std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap_or_default();
        grandchild = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        grandchild != 0
    }));
    f.set_processes(0, &[(grandchild, 3 * GIB)]);
    let s = f.wait_status("usage attributed", |s| s.devices[0].used_bytes == 3 * GIB);
    assert_eq!(s.reservations[0].actual_bytes, 3 * GIB);
    assert!(s.reservations[0].over_reserved);
    assert_eq!(s.devices[0].unattributed_bytes, 0);
    // SAFETY: as above.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    let _ = run.wait();
}

#[test]
fn attaching_pids_is_checked() {
    let f = Fake::start(0);
    let c = f.daemon.client();
    let r = c.reserve(Request::new(GIB)).unwrap();
    let e = r.attach_pids(&[u32::MAX - 7]).unwrap_err();
    assert!(
        matches!(&e, Error::Daemon { kind: vramd_client::ErrorKind::PermissionDenied, message } if message.contains("no process")),
        "{e}"
    );
    let own_child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    let pids = r.attach_pids(&[own_child.id()]).unwrap();
    assert_eq!(pids, vec![me(), own_child.id()]);
    let mut own_child = own_child;
    let _ = own_child.kill();
    let _ = own_child.wait();
}

#[test]
fn a_missing_library_is_named_with_the_way_out() {
    let out = std::process::Command::new(bin("vramd"))
        .args([
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
            "--socket",
            "/nonexistent/v.sock",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/libnvidia-ml.so.1") && err.contains("--simulate"),
        "{err}"
    );
}

#[test]
fn init_failure_of_the_driver_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    State::default()
        .with_init_error(InitError::DriverNotLoaded)
        .write_atomic(&state)
        .unwrap();
    let out = std::process::Command::new(bin("vramd"))
        .env(fake_nvml::STATE_ENV, &state)
        .args(["--nvml-lib", fake_nvml_lib().to_str().unwrap(), "--socket"])
        .arg(dir.path().join("v.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("driver") && err.contains("--simulate"),
        "{err}"
    );
}

/// Against the real NVML: run on a machine with an NVIDIA GPU and driver:
/// `cargo test -p vramd-tests --test nvml -- --ignored real_nvml`.
#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn real_nvml_lists_devices_and_grants() {
    let d = Daemon::start_raw(&["--poll-interval", "100ms"]);
    let c = d.client();
    let s = c.status().unwrap();
    assert_eq!(s.backend, "nvml");
    assert!(!s.devices.is_empty());
    for dev in &s.devices {
        assert!(dev.total_bytes > 0 && dev.healthy, "{dev:?}");
        assert!(
            dev.uuid.starts_with("GPU-") || dev.uuid.starts_with("MIG-"),
            "{dev:?}"
        );
    }
    let r = c
        .reserve(Request::new(256 << 20).timeout(Duration::from_secs(5)))
        .unwrap();
    eprintln!(
        "granted {} bytes on {} ({}); status: {:#?}",
        r.bytes(),
        r.device_index(),
        r.device_uuid(),
        c.status().unwrap().devices
    );
}
