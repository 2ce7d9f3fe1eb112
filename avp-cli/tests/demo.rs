//! `avp demo` as a newcomer runs it: two agent processes, a latent handoff, a text
//! chain and a single agent, on the real default model.

use serde_json::Value;

mod common;

fn demo(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["demo", "--json", "--steps", "3", "--max-tokens", "6"];
    all.extend_from_slice(args);
    common::avp_json(&all)
}

fn check(rows: &[Value], transport: &str) {
    let modes: Vec<&str> = rows.iter().map(|r| r["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["latent", "text", "direct"]);
    let (latent, text, direct) = (&rows[0], &rows[1], &rows[2]);
    // Latent: B reuses A's prompt and latent steps from the KV cache it received.
    assert_eq!(latent["payload"], "kv_cache");
    assert_eq!(latent["negotiated_mode"], "latent");
    assert_eq!(latent["a_latent_steps"], 3);
    assert_eq!(latent["a_generated_tokens"], 0);
    assert_eq!(
        latent["b_reused_positions"].as_u64().unwrap(),
        latent["a_prompt_tokens"].as_u64().unwrap() + 3
    );
    // 30 layers x K,V x 3 heads x 64 x f32 per position, plus the header.
    let per_position = 30 * 2 * 3 * 64 * 4;
    let positions = latent["b_reused_positions"].as_u64().unwrap();
    assert!(latent["bytes_moved"].as_u64().unwrap() >= positions * per_position);
    // Text: A wrote tokens and B re-read them.
    assert_eq!(text["payload"], "text");
    assert_eq!(text["a_generated_tokens"], 6);
    assert_eq!(text["b_reused_positions"], 0);
    assert!(
        text["b_prefilled_tokens"].as_u64() > latent["b_prefilled_tokens"].as_u64(),
        "the text chain re-reads A's analysis"
    );
    assert_eq!(direct["payload"], "none");
    for r in rows {
        assert_eq!(r["b_generated_tokens"], 6, "{r}");
        assert!(!r["answer"].as_str().unwrap().is_empty(), "{r}");
        assert!(r["end_to_end_ms"].as_f64().unwrap() > 0.0);
    }
    for r in &rows[..2] {
        assert_eq!(r["transport"], transport, "{r}");
        assert!(!r["transport_reason"].as_str().unwrap().is_empty());
    }
}

#[test]
fn demo_over_shared_memory() {
    check(&demo(&[]), "shm");
}

#[test]
fn demo_over_tcp() {
    check(&demo(&["--transport", "tcp"]), "tcp");
}

/// `cuda://` between the two agents with the device emulated in host memory
/// (chosen explicitly: CI has no GPU). The KV cache goes through the device
/// slots and the protocol of the GPU path; a CPU model's K and V cross into
/// the "device" and back, and every one of those bytes is counted. The answer
/// is the one shared memory gives.
#[test]
fn demo_over_the_cuda_transport_on_the_emulated_device() {
    let rows = demo(&["--transport", "cuda", "--transport-device", "emulated"]);
    check(&rows, "cuda");
    let latent = &rows[0];
    assert_eq!(latent["kv_on_device"], true, "{latent}");
    assert!(
        latent["session"].as_str().unwrap().contains("emulate"),
        "the emulation is reported: {latent}"
    );
    let positions = latent["b_reused_positions"].as_u64().unwrap();
    let kv_bytes = positions * 30 * 2 * 3 * 64 * 4;
    assert_eq!(latent["host_device_bytes"], 2 * kv_bytes, "{latent}");
    assert_eq!(latent["device_to_device_bytes"], 0, "{latent}");
    // The text chain's message has no KV: it stays in host memory.
    assert_eq!(rows[1]["kv_on_device"], false);
    let shm = demo(&[]);
    assert_eq!(latent["answer"], shm[0]["answer"]);
    assert_eq!(latent["b_reused_positions"], shm[0]["b_reused_positions"]);
}

#[test]
fn a_cuda_transport_for_a_cpu_model_needs_a_device() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(["demo", "--transport", "cuda"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--transport-device"), "{err}");
}
