//! The second family: Qwen2.5-Coder-0.5B-Instruct (Qwen2: Q/K/V biases, untied
//! embeddings, so latent steps use ridge realignment). Reference ids come from an
//! independent numpy decoder over a Hugging Face conversion of the same file
//! (../shared tools `gguf2hf.py` + `npgen.py`, run once; values committed here).

use avp_model::engine::Cpu;
use std::sync::OnceLock;

use avp_model::{GenerateOptions, LatentMap, Model};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load("qwen2.5-coder-0.5b").expect("fetch and load Qwen2.5-Coder-0.5B"))
}

#[test]
fn config_and_chat_prompt_match_the_reference() {
    let m = model();
    let c = m.config();
    assert_eq!(c.family, "qwen2");
    assert_eq!((c.layers, c.hidden, c.heads, c.kv_heads), (24, 896, 14, 2));
    assert_eq!(c.vocab_size, 151_936);
    assert!(c.qkv_bias && !c.tied_embeddings);
    let ids = m
        .encode(&m.render("What is the capital of France?").unwrap())
        .unwrap();
    assert_eq!(ids.len(), 36);
    assert_eq!(
        &ids[..12],
        &[
            151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817
        ]
    );
}

#[test]
fn greedy_answer_matches_the_numpy_reference() {
    let m = model();
    let opts = GenerateOptions {
        max_tokens: 12,
        ..Default::default()
    };
    let g = m
        .generate("What is the capital of France?", None, &opts, |_| {})
        .unwrap();
    assert_eq!(g.tokens, [785, 6722, 315, 9625, 374, 12095, 13]);
    assert_eq!(g.text, "The capital of France is Paris.");
}

#[test]
fn latent_steps_use_a_cached_realignment() {
    let m = model();
    let map = m.latent_map::<Cpu>().unwrap();
    let LatentMap::Realign { target_norm, .. } = map else {
        panic!("untied embeddings need realignment")
    };
    assert!(*target_norm > 0.0);
    let cache =
        avp_model::latent::cache_path(&avp_model::fetch::cache_dir(), &m.identity().model_hash);
    assert!(cache.is_file(), "{} written", cache.display());
    // Read back from the cache, the map is the same.
    let again = LatentMap::for_decoder(m.decoder::<Cpu>().unwrap(), Some(&cache)).unwrap();
    let h = m.decoder::<Cpu>().unwrap().matrix(vec![0.01; 896], 1, 896);
    let a: Vec<f32> = map
        .apply(m.decoder::<Cpu>().unwrap(), h.clone())
        .into_data()
        .to_vec()
        .unwrap();
    let b: Vec<f32> = again
        .apply(m.decoder::<Cpu>().unwrap(), h)
        .into_data()
        .to_vec()
        .unwrap();
    assert_eq!(a, b);
    let ctx = m.think("def add(a, b):", 3, None).unwrap();
    assert_eq!(ctx.num_steps, 3, "no NaN stop");
    let opts = GenerateOptions {
        max_tokens: 4,
        ..Default::default()
    };
    let g = m
        .generate("Complete the function.", Some(&ctx), &opts, |_| {})
        .unwrap();
    assert_eq!(g.reused, ctx.seq_len());
    assert!(!g.tokens.is_empty());
}
