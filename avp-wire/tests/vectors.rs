//! The committed v2 test vectors under `spec/vectors/` are reproduced byte for byte.
//!
//! Regenerate (after a deliberate format change, with a version bump) with
//! `AVP_BLESS=1 cargo test -p avp-wire --test vectors`.

use std::path::PathBuf;

use avp_wire::{
    DType, Envelope, HiddenStateDesc, KvCacheDesc, KvLayout, LayerRange, Message, MessageLayout,
    Payload, TextDesc, TextFormat,
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors")
}

/// Section `i`, byte `j` holds `(i * 16 + j) % 251`.
fn fill(layout: &MessageLayout) -> Vec<u8> {
    let sections: Vec<Vec<u8>> = layout
        .sections()
        .enumerate()
        .map(|(i, s)| {
            (0..s.len)
                .map(|j| ((i as u64 * 16 + j) % 251) as u8)
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = sections.iter().map(|v| &v[..]).collect();
    layout.encode_to_vec(&refs).unwrap()
}

fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    let env = Envelope {
        model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        model_hash: "a".repeat(64),
        model_family: "llama".into(),
        tokenizer_hash: "b".repeat(64),
        session_id: "0123456789abcdef0123456789abcdef".into(),
        source_agent_id: "researcher".into(),
        target_agent_id: "solver".into(),
        extra: [("num_steps".to_string(), "4".to_string())].into(),
    };
    let kv = KvCacheDesc::new(2, 3, 4, 5, DType::F16, KvLayout::Hnd);
    let kv_i8 =
        KvCacheDesc::new(4, 1, 8, 2, DType::I8, KvLayout::Nhd).with_layers(LayerRange::new(1, 3));
    let hidden = HiddenStateDesc {
        rows: 1,
        dim: 8,
        dtype: DType::Bf16,
        map_id: "vocab:0123456789abcdef".into(),
    };
    let text = r#"{"role":"researcher","content":"x = 6 * 7"}"#;
    let mut out = vec![
        (
            "kv_f16_hnd.avp",
            fill(&MessageLayout::new(&env, &Payload::KvCache(kv)).unwrap()),
        ),
        (
            "kv_i8_nhd_layers_1_3_page_aligned.avp",
            fill(
                &MessageLayout::with_alignment(
                    &Envelope::default(),
                    &Payload::KvCache(kv_i8),
                    4096,
                )
                .unwrap(),
            ),
        ),
        (
            "hidden_bf16_map.avp",
            fill(&MessageLayout::new(&env, &Payload::HiddenState(hidden)).unwrap()),
        ),
    ];
    let t = TextDesc {
        format: TextFormat::Json,
        len: text.len() as u64,
    };
    out.push((
        "text_json.avp",
        avp_wire::encode_to_vec(&env, &Payload::Text(t), &[text.as_bytes()]).unwrap(),
    ));
    out
}

#[test]
fn committed_vectors_match() {
    let bless = std::env::var_os("AVP_BLESS").is_some();
    for (name, bytes) in vectors() {
        let path = dir().join(name);
        if bless {
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            committed, bytes,
            "{name} differs from what this encoder writes"
        );
        let m = Message::parse(&committed).unwrap();
        m.verify().unwrap();
    }
}
