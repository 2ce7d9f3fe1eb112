//! Interop with the real Python reference (`avp` 0.6.2 from PyPI).
//!
//! The reference runs in a virtual environment that `scripts/test` (and so
//! `.ci/run`) creates at `.venv`; set `AVP_PYTHON` to use another interpreter.
//! Python encodes, Rust decodes; Rust encodes, Python decodes.

use std::path::Path;
use std::process::Command;

mod support;
use support::python;

use avp_wire::v1::{self, Compression, KvHeader, Metadata};
use avp_wire::{DType, Envelope, HiddenStateDesc, KvCacheDesc, KvLayout, Message, Payload};
use serde_json::Value;

fn avp_ref(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/avp_ref.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "avp_ref.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn metadata_json(m: &Metadata) -> Value {
    serde_json::json!({
        "session_id": m.session_id,
        "source_agent_id": m.source_agent_id,
        "target_agent_id": m.target_agent_id,
        "model_id": m.model_id,
        "hidden_dim": m.hidden_dim,
        "num_layers": m.num_layers,
        "payload_type": m.payload_type,
        "dtype": m.dtype,
        "tensor_shape": m.tensor_shape,
        "mode": m.mode,
        "avp_map_id": m.avp_map_id,
        "extra": m.extra,
    })
}

#[test]
fn reference_encoded_messages_decode_identically() {
    let dir = tempfile::tempdir().unwrap();
    avp_ref(&["encode-cases", dir.path().to_str().unwrap()]);
    let manifest: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    assert!(manifest.len() >= 20, "expected the full case list");
    let mut byte_identical = 0;
    for case in &manifest {
        let name = case["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.path().join(format!("{name}.avp"))).unwrap();
        let payload = std::fs::read(dir.path().join(format!("{name}.payload"))).unwrap();
        let d = v1::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            metadata_json(&d.metadata),
            case["metadata"],
            "{name}: metadata"
        );
        assert_eq!(&d.payload[..], &payload[..], "{name}: payload");
        assert_eq!(
            d.metadata.payload_checksum,
            Some(case["crc32"].as_u64().unwrap() as u32),
            "{name}"
        );
        let level = case["level"].as_i64().unwrap() as i32;
        assert_eq!(d.compressed(), level != 0, "{name}: compression flag");
        if level != 0 {
            assert_eq!(d.metadata.compression.as_deref(), Some("zstd"));
        }
        if let Some(kv) = case.get("kv") {
            let p = d.kv().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                p.header.num_layers as u64,
                kv["num_layers"].as_u64().unwrap()
            );
            assert_eq!(
                p.header.num_kv_heads as u64,
                kv["num_kv_heads"].as_u64().unwrap()
            );
            assert_eq!(p.header.head_dim as u64, kv["head_dim"].as_u64().unwrap());
            assert_eq!(p.header.seq_len as u64, kv["seq_len"].as_u64().unwrap());
            assert_eq!(p.header.dtype.code() as u64, kv["dtype"].as_u64().unwrap());
            assert_eq!(p.tensors().concat(), &payload[v1::KV_HEADER_LEN..]);
            // Into the native format and back: same tensors, verified checksums.
            let v2 = v1::to_v2(&d).unwrap();
            let m = Message::parse(&v2).unwrap();
            m.verify().unwrap();
            let view = m.kv().unwrap();
            for l in 0..p.header.num_layers {
                assert_eq!(view.k(l).unwrap(), p.k(l).unwrap());
                assert_eq!(view.v(l).unwrap(), p.v(l).unwrap());
            }
            assert_eq!(m.envelope().model_hash(), "cd".repeat(32));
        } else if d.dtype() != DType::I8 && !payload.is_empty() {
            let m_bytes = v1::to_v2(&d).unwrap();
            let m = Message::parse(&m_bytes).unwrap();
            assert_eq!(m.hidden().unwrap().data(), &payload[..]);
            assert_eq!(m.hidden().unwrap().map_id, d.metadata.avp_map_id);
        }
        // Uncompressed: our encoder reproduces the reference's bytes exactly.
        if level == 0 {
            let ours = v1::encode(&payload, &d.metadata, Compression::None).unwrap();
            if ours == bytes {
                byte_identical += 1;
            } else {
                // Only the order of map entries may differ (it is undefined in protobuf).
                assert!(d.metadata.extra.len() > 1, "{name}: re-encoding differs");
                assert_eq!(v1::decode(&ours).unwrap().metadata, d.metadata);
            }
        }
    }
    assert!(
        byte_identical >= 3,
        "expected byte-identical re-encodings, got {byte_identical}"
    );
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.25 - 3.0).to_le_bytes())
        .collect()
}

#[test]
fn rust_encoded_messages_are_read_by_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    let mut write = |name: &str, bytes: Vec<u8>| {
        let d = v1::decode(&bytes).unwrap();
        let path = dir.path().join(format!("{name}.avp"));
        std::fs::write(&path, &bytes).unwrap();
        expected.push((path, d.metadata.clone(), d.payload.to_vec()));
    };
    for (i, (dtype, level)) in [
        (DType::F32, Compression::None),
        (DType::F16, Compression::Fast),
        (DType::Bf16, Compression::Balanced),
        (DType::F32, Compression::Max),
    ]
    .into_iter()
    .enumerate()
    {
        let meta = Metadata {
            session_id: format!("s{i}"),
            source_agent_id: "rust-a".into(),
            target_agent_id: "py-b".into(),
            model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            hidden_dim: 576,
            num_layers: 30,
            dtype: dtype.code() as i32,
            tensor_shape: vec![1, 576],
            avp_map_id: if i % 2 == 1 {
                "vocab:0123456789abcdef".into()
            } else {
                String::new()
            },
            extra: [
                ("model_hash".to_string(), "ef".repeat(32)),
                ("k".to_string(), "ü".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let payload = f32_bytes(576 * 4 / dtype.size() / 4);
        write(
            &format!("hidden_{i}"),
            v1::encode(&payload, &meta, level).unwrap(),
        );
    }
    // A KV cache: encode_kv straight from per-layer tensors ...
    let header = KvHeader {
        num_layers: 3,
        num_kv_heads: 3,
        head_dim: 64,
        seq_len: 9,
        dtype: DType::F16,
    };
    let tensors: Vec<Vec<u8>> = (0..6)
        .map(|i| vec![i as u8 * 3 + 1; 3 * 9 * 64 * 2])
        .collect();
    let refs: Vec<&[u8]> = tensors.iter().map(|t| &t[..]).collect();
    let meta = Metadata {
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        num_layers: 3,
        ..Default::default()
    };
    for level in [Compression::None, Compression::Fast] {
        write(
            &format!("kv_{}", level.level()),
            v1::encode_kv(&header, &refs, &meta, level).unwrap(),
        );
    }
    // ... and converted from a native v2 message.
    let desc = KvCacheDesc::new(2, 2, 16, 5, DType::Bf16, KvLayout::Hnd);
    let env = Envelope {
        model_id: "m".into(),
        model_hash: "12".repeat(32),
        model_family: "qwen2".into(),
        ..Default::default()
    };
    let tensor = desc.tensor_bytes().unwrap() as usize;
    let data: Vec<Vec<u8>> = (0..4).map(|i| vec![0x40 + i as u8; tensor]).collect();
    let srefs: Vec<&[u8]> = data.iter().map(|t| &t[..]).collect();
    let v2 = avp_wire::encode_to_vec(&env, &Payload::KvCache(desc), &srefs).unwrap();
    write(
        "kv_from_v2",
        v1::from_v2(&Message::parse(&v2).unwrap(), Compression::None).unwrap(),
    );
    let h = HiddenStateDesc {
        rows: 2,
        dim: 8,
        dtype: DType::F32,
        map_id: "vocab_overlap:150".into(),
    };
    let v2 = avp_wire::encode_to_vec(&env, &Payload::HiddenState(h), &[&f32_bytes(16)]).unwrap();
    write(
        "hidden_from_v2",
        v1::from_v2(&Message::parse(&v2).unwrap(), Compression::Fast).unwrap(),
    );
    // A JSON-mode message.
    let meta = Metadata {
        mode: 1,
        model_id: "m".into(),
        ..Default::default()
    };
    write(
        "json_mode",
        v1::encode(b"", &meta, Compression::None).unwrap(),
    );

    // One corrupted copy: the reference must refuse it on our checksum.
    let corrupt = dir.path().join("corrupt.avp");
    let mut bad = std::fs::read(&expected[0].0).unwrap();
    *bad.last_mut().unwrap() ^= 0x01;
    std::fs::write(&corrupt, bad).unwrap();

    let mut args: Vec<String> = vec!["decode".into()];
    args.extend(expected.iter().map(|(p, ..)| p.display().to_string()));
    args.push(corrupt.display().to_string());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = avp_ref(&argv);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), expected.len() + 1);
    for ((path, meta, payload), got) in expected.iter().zip(&lines) {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            got.get("error").is_none(),
            "{name}: reference refused it: {}",
            got["error"]
        );
        assert_eq!(got["metadata"], metadata_json(meta), "{name}: metadata");
        assert_eq!(
            got["payload_len"].as_u64().unwrap(),
            payload.len() as u64,
            "{name}"
        );
        assert_eq!(
            got["payload_crc32"].as_u64().unwrap(),
            crc32fast::hash(payload) as u64,
            "{name}"
        );
        assert_eq!(got["has_checksum"], true, "{name}: checksum written");
        assert_eq!(
            got["checksum"].as_u64().unwrap(),
            crc32fast::hash(payload) as u64,
            "{name}: checksum value"
        );
        if meta.payload_type == 1 {
            let kv = v1::KvPayload::parse(payload).unwrap();
            assert_eq!(
                got["kv"]["num_layers"].as_u64().unwrap(),
                kv.header.num_layers as u64
            );
            assert_eq!(
                got["kv"]["seq_len"].as_u64().unwrap(),
                kv.header.seq_len as u64
            );
        }
    }
    let last = lines.last().unwrap();
    let err = last["error"].as_str().expect("corrupt message refused");
    assert!(err.contains("checksum mismatch"), "{err}");
}
