//! The `avp` command line as a user runs it: exit codes, text and JSON output.

use std::path::Path;
use std::process::{Command, Output};

fn avp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(args)
        .output()
        .expect("run avp")
}

/// Each line of a command's stdout as JSON.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn vector(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../spec/vectors")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn inspect_v2_text_and_json() {
    let out = avp(&["inspect", &vector("kv_f16_hnd.avp")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("avp v2 message"), "{text}");
    assert!(
        text.contains("kv_cache") && text.contains("researcher"),
        "{text}"
    );
    assert!(text.contains("checksum:  ok (4 sections)"), "{text}");

    let out = avp(&[
        "inspect",
        "--json",
        &vector("kv_i8_nhd_layers_1_3_page_aligned.avp"),
    ]);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["version"], 2);
    assert_eq!(j["kind"], "kv_cache");
    assert_eq!(j["payload"]["dtype"], "i8");
    assert_eq!(j["payload"]["layout"], "NHD");
    assert_eq!(j["payload"]["layers"]["start"], 1);
    assert_eq!(j["sections"], 8);
    assert_eq!(j["alignment"], 4096);
}

/// A v1 (Python reference) KV message of 2 layers x 1 head x 4 x 3 positions,
/// f16, zstd-compressed, from the model `model_id`.
fn v1_kv_message(model_id: &str, tensors: &[&[u8]]) -> Vec<u8> {
    let header = avp_wire::v1::KvHeader {
        num_layers: 2,
        num_kv_heads: 1,
        head_dim: 4,
        seq_len: 3,
        dtype: avp_wire::DType::F16,
    };
    let meta = avp_wire::v1::Metadata {
        model_id: model_id.into(),
        ..Default::default()
    };
    avp_wire::v1::encode_kv(&header, tensors, &meta, avp_wire::v1::Compression::Fast).unwrap()
}

#[test]
fn inspect_v1_message() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = v1_kv_message("m", &[&[7u8; 24][..]; 4]);
    let path = dir.path().join("m.avp");
    std::fs::write(&path, bytes).unwrap();
    let out = avp(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["version"], 1);
    assert_eq!(j["compressed"], true);
    assert_eq!(j["payload"]["num_layers"], 2);
    assert!(j["checksum"].as_str().unwrap().starts_with("ok"));
}

#[test]
fn inspect_refuses_malformed_files_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(vector("kv_f16_hnd.avp")).unwrap();
    let mut corrupt_section = good.clone();
    *corrupt_section.last_mut().unwrap() ^= 0x10;
    let mut corrupt_header = good.clone();
    corrupt_header[40] ^= 0x01;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "section.avp",
            corrupt_section,
            "checksum mismatch in section 3",
        ),
        ("header.avp", corrupt_header, "checksum mismatch in header"),
        ("truncated.avp", good[..100].to_vec(), "truncated"),
        ("garbage.avp", b"garbage bytes".to_vec(), "invalid magic"),
        (
            "v9.avp",
            vec![0x41, 0x56, 9, 0, 0, 0],
            "unsupported wire version 9",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = avp(&["inspect", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let out = avp(&["inspect", "/nonexistent/file.avp"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bench_wire_prints_json_lines() {
    let out = avp(&["bench", "wire", "--json", "--sizes", "1MiB", "--reps", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["bench"], "wire");
    assert_eq!(j["size_bytes"], 1 << 20);
    for k in ["parse_ns", "verify_gbps", "encode_gbps", "memcpy_gbps"] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}");
    }
    let bad = avp(&["bench", "wire", "--sizes", "1000"]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn bench_transport_prints_json_lines() {
    let out = avp(&[
        "bench",
        "transport",
        "--json",
        "--sizes",
        "4KiB",
        "--transports",
        "shm,tcp,raw_tcp,raw_shm",
        "--reps",
        "4",
        "--gap-us",
        "200",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = json_lines(&out);
    for t in ["shm", "tcp", "raw_tcp", "raw_shm"] {
        let r = rows
            .iter()
            .find(|r| r["bench"] == "transport" && r["transport"] == t)
            .unwrap_or_else(|| panic!("a {t} row in {rows:?}"));
        assert_eq!(r["size_bytes"], 4096, "{r}");
        assert_eq!(r["reps"], 4, "{r}");
        assert_eq!(r["gap_us"], 200, "{r}");
        assert!(r["p50_us"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
    }
    let ratio = rows
        .iter()
        .find(|r| r["bench"] == "transport_ratio")
        .expect("a tcp / raw_tcp ratio");
    assert!(ratio["tcp_over_raw_tcp"].as_f64().unwrap() > 0.0);
    assert!(ratio["shm_over_raw_shm_p50"].as_f64().unwrap() > 0.0);
    let floor = rows.iter().find(|r| r["transport"] == "raw_shm").unwrap();
    assert_eq!(floor["spin"], true, "the floor always spins: {floor}");
    let bad = avp(&["bench", "transport", "--transports", "carrier-pigeon"]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn bench_transport_measures_rdma_on_the_emulated_device_and_says_so() {
    let args = [
        "bench",
        "transport",
        "--json",
        "--sizes",
        "4KiB,1MiB",
        "--transport",
        "rdma",
        "--rdma-device",
        "emulated",
        "--reps",
        "4",
    ];
    let out = avp(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["transport"], "rdma", "{r}");
        assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        let device = r["device"].as_str().unwrap_or_default();
        assert!(
            device.contains("emulated"),
            "rows on the emulator say so: {r}"
        );
    }
    // Without a device the session would be TCP: the bench refuses to call that rdma.
    let out = avp(&args[..args.len() - 4]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RDMA not used"), "{err}");
}

#[test]
fn bench_kv_reports_half_the_bytes_for_f16_and_bf16() {
    let args = [
        "bench",
        "kv",
        "--json",
        "--prompts",
        "1",
        "--tokens",
        "4",
        "--steps",
        "1",
    ];
    let out = avp(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = json_lines(&out);
    let dtypes: Vec<&str> = rows.iter().map(|r| r["dtype"].as_str().unwrap()).collect();
    assert_eq!(dtypes, ["f16", "bf16"]);
    for r in &rows {
        assert_eq!(r["bytes_over_f32"], 0.5, "{r}");
        let agreement = r["greedy_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&agreement), "{r}");
        assert!(r["next_token_kl_mean"].as_f64().unwrap() >= 0.0, "{r}");
    }
}

#[test]
fn generate_answers_with_the_default_model() {
    let out = avp(&[
        "generate",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
    let sampled = avp(&[
        "generate",
        "--prompt",
        "Name a colour.",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    let again = avp(&[
        "generate",
        "--prompt",
        "Name a colour.",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]);
    assert!(sampled.status.success());
    assert_eq!(sampled.stdout, again.stdout, "same seed, same text");
}

/// `--device` (or `AVP_DEVICE`): a GPU that this build or machine cannot use is a
/// clear error before any model loads; a name that is no device is a usage error.
#[test]
fn a_device_that_cannot_run_here_is_refused_with_the_reason() {
    match avp_model::Device::Cuda(0).check() {
        Ok(()) => eprintln!("GPU 0 is usable here: only the usage error is checked"),
        Err(e) => {
            let out = avp(&["generate", "--device", "cuda", "--prompt", "hi"]);
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&e.to_string()), "{err}");
            if !cfg!(feature = "cuda") {
                assert!(err.contains("--features cuda"), "{err}");
            }
        }
    }

    let out = Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(["think", "--prompt", "hi", "--out", "unused.avp"])
        .env("AVP_DEVICE", "tpu")
        .output()
        .expect("run avp");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn think_writes_a_context_that_generate_continues_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ctx.avp");
    let task = "Tom has 3 apples. He buys 5 more apples.";
    let question = "How many apples does Tom have now?";
    let out = avp(&[
        "think",
        "--prompt",
        task,
        "--steps",
        "4",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 latent steps"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let inspect = avp(&["inspect", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("kv_cache"));
    let b = avp(&[
        "generate",
        "--context",
        file.to_str().unwrap(),
        "--prompt",
        question,
        "--max-tokens",
        "12",
    ]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));

    // The same handoff in one process.
    let m = avp_model::Model::load("smollm2").unwrap();
    let ctx = m.think(task, 4, None).unwrap();
    let opts = avp_model::GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    };
    let here = m.generate(question, Some(&ctx), &opts, |_| {}).unwrap();
    assert_eq!(String::from_utf8_lossy(&b.stdout).trim(), here.text);

    // A context that claims another model is refused, naming both hashes.
    let mut foreign = ctx.clone();
    foreign.model_hash = "cd".repeat(32);
    let bad = dir.path().join("foreign.avp");
    std::fs::write(&bad, foreign.to_bytes(Default::default()).unwrap()).unwrap();
    let refused = avp(&[
        "generate",
        "--context",
        bad.to_str().unwrap(),
        "--prompt",
        question,
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&"cd".repeat(32)) && err.contains(&m.identity().model_hash),
        "{err}"
    );
}

/// `avp send` sends any file `avp inspect` reads: a v1 file of the Python
/// reference is converted to v2 (said on stderr) with its tensors intact.
#[test]
fn send_converts_v1_files_and_says_so() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 24]).collect();
    let refs: Vec<&[u8]> = tensors.iter().map(|t| &t[..]).collect();
    let v1 = v1_kv_message("reference-model", &refs);
    let path = dir.path().join("v1.avp");
    std::fs::write(&path, v1).unwrap();
    let out_dir = dir.path().join("out");
    let name = format!("shm://cli-v1-{}", std::process::id());
    let mut recv = Command::new(env!("CARGO_BIN_EXE_avp"))
        .args(["recv", &name, "--once", "--timeout", "30"])
        .arg(format!("--out={}", out_dir.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(recv.stderr.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let listen = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let send = avp(&["send", &listen, "--timeout", "30", path.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&send.stderr);
    assert!(send.status.success(), "{said}");
    assert!(
        said.contains("a v1 message") && said.contains("converted to v2"),
        "{said}"
    );
    assert!(recv.wait().unwrap().success());
    let got = std::fs::read(out_dir.join("msg-000001.avp")).unwrap();
    let m = avp_wire::Message::parse(&got).unwrap();
    m.verify().unwrap();
    assert_eq!(m.envelope().model_id(), "reference-model");
    let kv = m.kv().unwrap();
    for layer in 0..2 {
        assert_eq!(kv.k(layer).unwrap(), &tensors[2 * layer as usize][..]);
        assert_eq!(kv.v(layer).unwrap(), &tensors[2 * layer as usize + 1][..]);
    }
}
