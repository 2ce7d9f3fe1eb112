//! The three modes negotiated end to end, across processes (`avp demo` spawns the
//! two agents): the same model hands over its KV cache (tests/demo.rs); SmolLM2 →
//! Qwen2.5-Coder (different families and tokenizers) negotiates a cross-model
//! projection; SmolLM2 → a model with a synthetic vocabulary (fewer than 100 shared
//! tokens) falls back to JSON text, with the reason reported.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

mod common;

fn demo(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["demo", "--json", "--source-model", "smollm2"];
    all.extend_from_slice(args);
    common::avp_json(&all)
}

/// Words of the synthetic vocabulary: 40 plain English words (SmolLM2 has most of
/// them as tokens) and 400 made-up ones it cannot have.
fn synthetic_words() -> Vec<String> {
    let common = "the a of to and in is it you that he was for on are as with his they at be this have from or one had by word but not what all were we when your can said there use an each which she do how their if will up other about out many then them these so some her would make like him into time has look two more write go see number no way could people my than first water been call who oil its now find long down day did get come made may part";
    let mut w: Vec<String> = common.split(' ').take(40).map(str::to_owned).collect();
    w.extend((0..400).map(|i| format!("⟪syn{i}⟫")));
    w
}

/// A tiny random Llama in a Hugging Face directory, with a word-level tokenizer
/// over [`synthetic_words`].
fn write_synthetic_model(dir: &Path) {
    let mut vocab = BTreeMap::new();
    vocab.insert("[UNK]".to_owned(), 0u32);
    vocab.insert("</s>".to_owned(), 1);
    for (i, w) in synthetic_words().into_iter().enumerate() {
        vocab.insert(w, i as u32 + 2);
    }
    let n_vocab = vocab.len();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tokenizer_config = json!({
        "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m.content }} {% endfor %}"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    let (hidden, inter, layers, heads, kv_heads) = (64usize, 128usize, 2usize, 4usize, 2usize);
    let config = json!({
        "model_type": "llama", "vocab_size": n_vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 1
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // Deterministic small weights.
    let mut seed = 0x2545_f491_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    };
    let hd = hidden / heads;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, ones: bool| {
        let n: usize = shape.iter().product();
        let data: Vec<u8> = (0..n)
            .flat_map(|_| if ones { 1.0f32 } else { next() }.to_le_bytes())
            .collect();
        tensors.push((name, shape, data));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![n_vocab, hidden],
        false,
    );
    add("model.norm.weight".into(), vec![hidden], true);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![hidden], true);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            true,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, hidden],
            false,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_heads * hd, hidden],
            false,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_heads * hd, hidden],
            false,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * hd],
            false,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            false,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            false,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            false,
        );
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                .unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn no_projection_path_falls_back_to_json_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_model(dir.path());
    let model = dir.path().to_str().unwrap();
    let rows = demo(&["--model", model, "--steps", "2", "--max-tokens", "8"]);
    let latent = &rows[0];
    assert_eq!(latent["mode"], "latent");
    // The handshake found no latent path and said why, with the overlap count.
    assert_eq!(latent["negotiated_mode"], "json", "{latent}");
    assert_eq!(latent["mode_path"], "json_fallback");
    let reason = latent["mode_reason"].as_str().unwrap();
    let shared: usize = reason
        .split("share only ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the reason names the overlap: {reason}"));
    assert!(shared > 0 && shared < 100, "{reason}");
    // The researcher wrote text and sent it as the JSON fallback message; the
    // solver read it into its prompt.
    assert_eq!(latent["sent"], "json");
    assert_eq!(latent["payload"], "json");
    assert_eq!(latent["a_latent_steps"], 0);
    assert_eq!(latent["a_generated_tokens"], 8);
    assert_eq!(latent["b_reused_positions"], 0);
    assert!(latent["bytes_moved"].as_u64().unwrap() > 0);
    assert!(
        latent["b_prefilled_tokens"].as_u64() > rows[2]["b_prefilled_tokens"].as_u64(),
        "the solver re-reads the analysis"
    );
    assert!(latent["quality"].is_null());
}

#[test]
fn smollm2_to_qwen_negotiates_a_cross_model_projection() {
    let rows = demo(&[
        "--model",
        "qwen2.5-coder-0.5b",
        "--steps",
        "3",
        "--max-tokens",
        "6",
    ]);
    let latent = &rows[0];
    assert_eq!(latent["negotiated_mode"], "cross_model", "{latent}");
    let path = latent["mode_path"].as_str().unwrap();
    assert!(
        path == "vocab_overlap" || path == "avp_map_file",
        "a fresh cache counts the overlap, a warm one finds the map: {path}"
    );
    assert_eq!(latent["sent"], "source_logits");
    assert_eq!(latent["payload"], "source_logits");
    // One row of SmolLM2's 49,152 logits in f32, plus the header.
    let bytes = latent["bytes_moved"].as_u64().unwrap();
    assert!((49_152 * 4..49_152 * 4 + 4096).contains(&bytes), "{bytes}");
    assert_eq!(latent["a_latent_steps"], 3);
    // Qwen continues after the one projected position.
    assert_eq!(latent["b_reused_positions"], 1);
    assert_eq!(latent["b_generated_tokens"], 6);
    let q = &latent["quality"];
    assert_eq!(q["prompt_tokens"], latent["a_prompt_tokens"]);
    let cos = q["next_token_cosine"].as_f64().unwrap();
    assert!(cos > 0.3 && cos <= 1.0, "{q}");
    assert!(latent["source_top_token"].is_string());
    // Text mode between different models sends plain text.
    assert_eq!(rows[1]["payload"], "text");
    assert_eq!(rows[1]["negotiated_mode"], "cross_model");
}
