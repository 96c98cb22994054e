//! The fake GPU itself (`vramd_tests::fake_gpu`): its state file follows
//! every edit, loses none under concurrency, and tracks its peak. (The fake
//! apps are exercised by the gateway tests.) Every wait is bounded.

use std::path::Path;
use std::sync::Arc;

use fake_nvml::{DeviceFailure, FakeProcess, State};
use serde_json::{Value, json};
use vramd_tests::fake_gpu::FakeGpu;

const GIB: u64 = 1 << 30;
const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const UUID1: &str = "GPU-99999999-1111-2222-3333-444444444444";

/// A state file with a 24 GiB and an 8 GiB device, in its own directory.
fn gpu() -> (tempfile::TempDir, Arc<FakeGpu>) {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(
        &dir.path().join("state.json"),
        &[(UUID0, 24 * GIB), (UUID1, 8 * GIB)],
    );
    (dir, gpu)
}

fn read_state(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn gpu_state_file_follows_edits() {
    let (_dir, gpu) = gpu();
    let path = gpu.path().to_path_buf();
    let s = read_state(&path);
    assert_eq!(s["devices"].as_array().unwrap().len(), 2);
    assert_eq!(s["devices"][0]["uuid"], UUID0);
    assert_eq!(s["devices"][1]["total_bytes"], 8 * GIB);
    assert_eq!(s["devices"][0]["processes"], json!([]));
    assert_eq!((gpu.total(0), gpu.total(1)), (24 * GIB, 8 * GIB));
    assert_eq!(gpu.used(0), 0);

    gpu.set_process(0, 4100, 3 * GIB);
    gpu.set_process(0, 4200, GIB);
    gpu.set_process(0, 4100, 2 * GIB); // updates in place
    let s = read_state(&path);
    assert_eq!(
        s["devices"][0]["processes"],
        json!([{"pid": 4100, "used_bytes": 2 * GIB}, {"pid": 4200, "used_bytes": GIB}])
    );
    assert_eq!(gpu.used(0), 3 * GIB);
    assert_eq!(gpu.process_bytes(0, 4100), 2 * GIB);
    assert_eq!(gpu.used(1), 0);

    gpu.set_process(0, 4200, 0); // removes
    gpu.set_process(0, 9999, 0); // removing what is absent is no change
    assert_eq!(
        read_state(&path)["devices"][0]["processes"],
        json!([{"pid": 4100, "used_bytes": 2 * GIB}])
    );

    // Arbitrary edits; `used` as the fake NVML computes it.
    gpu.edit(0, |d| {
        d.extra_used_bytes = GIB;
        d.processes.push(FakeProcess::unavailable(4300));
        d.mps_processes = vec![FakeProcess::new(4400, GIB)];
    });
    assert_eq!(gpu.used(0), 4 * GIB);
    gpu.edit(1, |d| d.fail = Some(DeviceFailure::GpuLost));
    let s = read_state(&path);
    assert_eq!(s["devices"][1]["fail"], "gpu_lost");
    assert_eq!(s["devices"][0]["extra_used_bytes"], GIB);
    assert_eq!(
        s["devices"][0]["processes"][1],
        json!({"pid": 4300, "used_bytes": null})
    );
    assert_eq!(State::read(&path).unwrap(), gpu.snapshot());

    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["state.json"]);
}

#[test]
fn gpu_peak_used_tracks_every_write() {
    let (_dir, gpu) = gpu();
    assert_eq!(gpu.peak_used(0), 0);
    gpu.set_process(0, 1, 10 * GIB);
    gpu.set_process(0, 2, 8 * GIB);
    gpu.set_process(1, 3, 7 * GIB);
    gpu.set_process(0, 1, 0);
    gpu.set_process(0, 2, GIB);
    assert_eq!(gpu.used(0), GIB);
    assert_eq!(gpu.peak_used(0), 18 * GIB);
    assert_eq!(gpu.peak_used(1), 7 * GIB);
    assert!(gpu.peak_used(0) <= gpu.total(0));
}

#[test]
fn gpu_concurrent_edits_lose_no_update() {
    let (_dir, gpu) = gpu();
    const N: u32 = 150;
    let path = gpu.path().to_path_buf();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader that must never see a half-written file.
    let reader = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && reads < 100_000 {
                let bytes = std::fs::read(&path).expect("the state file always exists");
                serde_json::from_slice::<Value>(&bytes).expect("the state file is always whole");
                reads += 1;
            }
            reads
        })
    };
    let writers: Vec<_> = (0..2u32)
        .map(|t| {
            let gpu = Arc::clone(&gpu);
            std::thread::spawn(move || {
                for i in 0..N {
                    gpu.set_process(0, 10_000 * (t + 1) + i, 1 + u64::from(i));
                    if i % 10 == 0 {
                        gpu.edit(1, |d| d.extra_used_bytes += 1);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);

    let s = read_state(gpu.path());
    let procs = s["devices"][0]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 2 * N as usize, "every process entry survived");
    let per_thread: u64 = (1..=u64::from(N)).sum();
    assert_eq!(gpu.used(0), 2 * per_thread);
    assert_eq!(
        s["devices"][1]["extra_used_bytes"],
        json!(2 * N.div_ceil(10))
    );
    assert_eq!(gpu.peak_used(0), 2 * per_thread);
}
