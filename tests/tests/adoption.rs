//! Reserving for other processes (`reserve_for`): the client's own process
//! left out, usage already on the card adopted without waiting, and
//! `resize` — on the fake libnvidia-ml (tests/fake-nvml).

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use vramd_client::{Error, ErrorKind, GIB, Request};
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::{Daemon, fake_nvml_lib};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";

fn start(total: u64) -> (Arc<FakeGpu>, Daemon) {
    let dir = tempfile::tempdir().unwrap().keep();
    let gpu = FakeGpu::create(&dir.join("state.json"), &[(UUID0, total)]);
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
    (gpu, daemon)
}

/// A stand-in for a model runner: a real process of this user.
struct Runner(Child);

impl Runner {
    fn spawn() -> Runner {
        Runner(Command::new("sleep").arg("60").spawn().unwrap())
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_model_already_loaded_is_adopted_at_once_and_the_client_is_left_out() {
    let (gpu, d) = start(24 * GIB);
    let me = std::process::id();
    let runner = Runner::spawn();
    // A full card: the runner's model (20 GiB) was loaded before anyone
    // reserved, the client itself uses 1 GiB, an outsider 3 GiB.
    gpu.set_process(0, runner.pid(), 20 * GIB);
    gpu.set_process(0, me, GIB);
    gpu.set_process(0, 4_000_000, 3 * GIB);
    d.wait_status("the full card", |s| s.devices[0].used_bytes == 24 * GIB);
    let c = d.client();
    // Nothing new fits now...
    let e = c
        .reserve(Request::new(GIB).timeout(Duration::ZERO))
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "{e}");
    // ...but the loaded model becomes a reservation at once.
    let r = c
        .reserve(
            Request::new(20 * GIB)
                .label("llama")
                .for_pids([runner.pid()])
                .timeout(Duration::ZERO),
        )
        .unwrap();
    let s = c.status().unwrap();
    let held = &s.reservations[0];
    assert_eq!(held.pids, vec![runner.pid()], "the client is left out");
    assert_eq!(held.actual_bytes, 20 * GIB);
    assert!(!held.over_reserved);
    // The client's own 1 GiB and the outsider's 3 stay unattributed, once.
    assert_eq!(s.devices[0].unattributed_bytes, 4 * GIB);
    assert_eq!(s.devices[0].committed_bytes, 24 * GIB);
    let mine = s.processes.iter().find(|p| p.pid == me).unwrap();
    assert_eq!(mine.reservation, None);
    let theirs = s.processes.iter().find(|p| p.pid == runner.pid()).unwrap();
    assert_eq!(theirs.reservation, Some(r.id()));
    // Growth beyond what the runner uses needs room: none now.
    let e = c
        .reserve(
            Request::new(GIB)
                .for_pids([runner.pid()])
                .timeout(Duration::ZERO),
        )
        .unwrap_err();
    assert!(matches!(e, Error::WaitTimeout(_)), "adopted twice: {e}");
    // Another user's or a missing process is refused.
    let e = c
        .reserve(Request::new(GIB).for_pids([u32::MAX - 7]))
        .unwrap_err();
    assert!(
        matches!(&e, Error::Daemon { kind: ErrorKind::PermissionDenied, message } if message.contains("no process")),
        "{e}"
    );
}

#[test]
fn a_reservation_for_no_process_counts_its_bytes_until_pids_are_attached() {
    let (gpu, d) = start(24 * GIB);
    let c = d.client();
    let r = c.reserve(Request::new(4 * GIB).for_pids([])).unwrap();
    let s = c.status().unwrap();
    assert!(s.reservations[0].pids.is_empty());
    assert_eq!(s.devices[0].available_bytes, 20 * GIB);
    let runner = Runner::spawn();
    assert_eq!(r.attach_pids(&[runner.pid()]).unwrap(), vec![runner.pid()]);
    gpu.set_process(0, runner.pid(), 3 * GIB);
    let s = d.wait_status("the runner's usage", |s| {
        s.reservations[0].actual_bytes == 3 * GIB
    });
    assert_eq!(s.devices[0].unattributed_bytes, 0);
    assert_eq!(s.devices[0].available_bytes, 20 * GIB);
}

#[test]
fn a_model_larger_than_reserved_grows_its_reservation_into_its_own_usage() {
    let (gpu, d) = start(24 * GIB);
    let c = d.client();
    let runner = Runner::spawn();
    let r = c
        .reserve(Request::new(4 * GIB).for_pids([runner.pid()]))
        .unwrap();
    // It loads 6 GiB, and an outsider takes the rest of the card.
    gpu.set_process(0, runner.pid(), 6 * GIB);
    gpu.set_process(0, 4_000_000, 18 * GIB);
    d.wait_status("the card full", |s| {
        s.devices[0].used_bytes == 24 * GIB && s.reservations[0].over_reserved
    });
    r.resize(6 * GIB).unwrap();
    assert_eq!(r.bytes(), 6 * GIB);
    let s = c.status().unwrap();
    assert_eq!(s.reservations[0].bytes, 6 * GIB);
    assert!(!s.reservations[0].over_reserved);
    // Beyond its usage, with no room: refused as "not now", size kept.
    let e = r.resize(7 * GIB).unwrap_err();
    assert!(
        matches!(&e, Error::WaitTimeout(m) if m.contains("cannot grow")),
        "{e}"
    );
    assert_eq!(r.bytes(), 6 * GIB);
    assert_eq!(c.status().unwrap().reservations[0].bytes, 6 * GIB);
    // The outsider leaves: it grows into the free room; shrinking works.
    gpu.set_process(0, 4_000_000, 0);
    d.wait_status("the outsider gone", |s| s.devices[0].used_bytes == 6 * GIB);
    r.resize(10 * GIB).unwrap();
    r.resize(5 * GIB).unwrap();
    assert_eq!(c.status().unwrap().reservations[0].bytes, 5 * GIB);
    let e = r.resize(0).unwrap_err();
    assert!(matches!(e, Error::Refused(_)), "{e}");
}
