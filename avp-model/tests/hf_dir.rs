//! Loading a Hugging Face directory: the default model written out as one (BF16
//! safetensors in Hugging Face names and row order, config.json, tokenizer.json,
//! tokenizer_config.json) loads as the same model and gives the same answer.

use std::collections::HashMap;

use avp_model::weights::{GgufWeights, Weights, hf_name};
use avp_model::{GenerateOptions, GgufFile, Model, ModelConfig, fetch};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn write_hf_dir(g: &GgufFile, dir: &std::path::Path) -> ModelConfig {
    let config = ModelConfig::from_gguf(g).unwrap();
    let weights = GgufWeights {
        file: g,
        config: &config,
    };
    let mut data: HashMap<String, (Vec<u8>, Vec<usize>)> = HashMap::new();
    for t in &g.tensors {
        let loaded = weights.load(&t.name).unwrap();
        let bytes = loaded
            .values
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        data.insert(hf_name(&t.name).unwrap(), (bytes, loaded.shape));
    }
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, (b, s))| {
            (
                k.clone(),
                TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden,
        "intermediate_size": config.intermediate,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_eps,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tied_embeddings,
        "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let tok = avp_model::tokenizer::from_gguf(g).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let tcfg = serde_json::json!({
        "chat_template": g.get("tokenizer.chat_template").unwrap().as_str().unwrap(),
        "eos_token": "<|im_end|>",
    });
    std::fs::write(dir.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
    config
}

#[test]
fn a_hugging_face_directory_loads_as_the_same_model() {
    let path = fetch::fetch(&fetch::SMOLLM2).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_hf_dir(&g, dir.path());
    let from_gguf = Model::from_gguf(&g, "smollm2", avp_model::Device::Cpu).unwrap();
    drop(g);
    let from_dir = Model::load(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(from_dir.config(), &config);
    assert_eq!(
        from_dir.identity().model_hash,
        from_gguf.identity().model_hash,
        "the architecture hash does not depend on the file format"
    );
    assert_eq!(
        from_dir.identity().tokenizer_hash,
        from_gguf.identity().tokenizer_hash
    );
    let q = "What is the capital of France?";
    assert_eq!(
        from_dir.encode(&from_dir.render(q).unwrap()).unwrap().len(),
        37
    );
    let opts = GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    };
    let a = from_dir.generate(q, None, &opts, |_| {}).unwrap();
    let b = from_gguf.generate(q, None, &opts, |_| {}).unwrap();
    assert_eq!(a.text, "The capital of France is Paris.");
    assert_eq!(a.tokens, b.tokens);
    // A context from one loads in the other: same model, same hash.
    let ctx = from_gguf.think("Paris is", 0, None).unwrap();
    let bytes = ctx.to_bytes(Default::default()).unwrap();
    avp_model::Context::from_bytes(&bytes, &from_dir).unwrap();
}

#[test]
fn a_directory_without_weights_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    let err = Model::load(dir.path().to_str().unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
}
