//! The fake ComfyUI (tests/src/fake_comfyui.rs) follows the real server:
//! one prompt worker, `/free` only sets flags it acts on after the running
//! prompt. Every wait is bounded.

use std::time::Duration;

use serde_json::{Value, json};
use vramd_client::GIB;
use vramd_tests::fake_comfyui::FakeComfyUi;
use vramd_tests::fake_gpu::FakeGpu;
use vramd_tests::gateway_rig::http;
use vramd_tests::{WAIT, wait_until};

const UUID0: &str = "GPU-00000000-1111-2222-3333-444444444444";
const FLUX: &str = "flux1-dev.safetensors";

fn prompt(ckpt: &str, seed: u64) -> Value {
    json!({
        "client_id": "test",
        "prompt": {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "3": {"class_type": "KSampler", "inputs": {"seed": seed, "model": ["4", 0]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
        }
    })
}

#[test]
fn the_fake_comfyui_acts_on_free_only_between_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = FakeGpu::create(&dir.path().join("s.json"), &[(UUID0, 24 * GIB)]);
    let c = FakeComfyUi::start(
        gpu.clone(),
        0,
        4_000_001,
        &[(FLUX, 13 * GIB)],
        Duration::from_millis(600),
    );
    let r = http(c.addr(), "POST", "/prompt", Some(&prompt(FLUX, 1)), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["number"], 0);
    assert!(v["prompt_id"].as_str().unwrap().len() == 36, "{v}");
    assert_eq!(v["node_errors"], json!({}));
    assert!(wait_until(WAIT, || c.queue().0), "the prompt never ran");
    let r = http(c.addr(), "POST", "/prompt", Some(&prompt(FLUX, 2)), &[]);
    assert_eq!(r.json()["number"], 1);
    let q = http(c.addr(), "GET", "/queue", None, &[]).json();
    assert_eq!(q["queue_running"].as_array().unwrap().len(), 1);
    assert_eq!(q["queue_pending"].as_array().unwrap().len(), 1);
    assert_eq!(q["queue_running"][0][1], v["prompt_id"]);
    assert_eq!(gpu.process_bytes(0, 4_000_001), 13 * GIB);
    // /free with a prompt pending: the worker frees after the running one,
    // then the pending one loads the model again.
    let r = http(
        c.addr(),
        "POST",
        "/free",
        Some(&json!({"unload_models": true, "free_memory": true})),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(gpu.process_bytes(0, 4_000_001), 13 * GIB, "only flags set");
    assert!(
        wait_until(WAIT, || c.executed().len() == 2 && !c.queue().0),
        "the prompts never ended"
    );
    assert_eq!(c.loads(), 2, "the queued prompt reloaded the model");
    assert_eq!(gpu.process_bytes(0, 4_000_001), 13 * GIB);
    let h = http(
        c.addr(),
        "GET",
        &format!("/history/{}", v["prompt_id"].as_str().unwrap()),
        None,
        &[],
    )
    .json();
    assert_eq!(
        h[v["prompt_id"].as_str().unwrap()]["status"]["status_str"],
        "success"
    );
    // Idle: /free acts at once.
    http(
        c.addr(),
        "POST",
        "/api/free",
        Some(&json!({"unload_models": true})),
        &[],
    );
    assert!(
        wait_until(WAIT, || gpu.process_bytes(0, 4_000_001) == 0),
        "an idle /free never freed"
    );
    let s = http(c.addr(), "GET", "/system_stats", None, &[]).json();
    assert_eq!(s["devices"][0]["vram_total"], 24 * GIB);
    assert_eq!(s["devices"][0]["torch_vram_total"], 0);
    // An unknown checkpoint fails validation.
    let r = http(
        c.addr(),
        "POST",
        "/prompt",
        Some(&prompt("nope.safetensors", 3)),
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["type"],
        "prompt_outputs_failed_validation"
    );
    assert_eq!(c.ooms(), 0);
}
