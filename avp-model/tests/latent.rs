//! think() and generate(context) on the real default model (SmolLM2-135M-Instruct).

use avp_model::engine::Cpu;
use std::sync::OnceLock;

use avp_model::latent::{mean_row_norm, realign_matrix};
use avp_model::{Context, GenerateOptions, Model, ModelError};
use avp_wire::{DType, Envelope, Message, Payload};

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load("smollm2").expect("load SmolLM2 (fetched through pip)"))
}

const TASK: &str = "Tom has 3 apples. He buys 5 more apples.";
const QUESTION: &str = "How many apples does Tom have now?";

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        ..Default::default()
    }
}

#[test]
fn generate_after_think_zero_steps_equals_one_pass_over_both_prompts() {
    let m = model();
    let a = m.encode(&m.render(TASK).unwrap()).unwrap();
    let b = m.encode(&m.render(QUESTION).unwrap()).unwrap();
    let ctx = m.think_tokens(&a, 0, None).unwrap();
    assert_eq!(ctx.seq_len(), a.len());
    assert_eq!(ctx.num_steps, 0);
    let handed = m
        .generate_tokens(&b, Some(&ctx), &greedy(12), |_| {})
        .unwrap();
    let joined: Vec<u32> = a.iter().chain(&b).copied().collect();
    let one_pass = m
        .generate_tokens(&joined, None, &greedy(12), |_| {})
        .unwrap();
    assert_eq!(handed.tokens, one_pass.tokens, "token for token");
    assert_eq!(handed.reused, a.len());
    assert_eq!(handed.prefilled, b.len());
    assert!(!handed.tokens.is_empty());
}

#[test]
fn latent_steps_extend_the_cache_and_chain() {
    let m = model();
    let first = m.think(TASK, 3, None).unwrap();
    let prompt = m.encode(&m.render(TASK).unwrap()).unwrap().len();
    assert_eq!(first.num_steps, 3);
    assert_eq!(first.seq_len(), prompt + 3);
    assert_eq!(first.prompt_tokens as usize, prompt);
    let second = m.think("Think again.", 2, Some(&first)).unwrap();
    assert_eq!(second.num_steps, 5);
    assert!(second.seq_len() > first.seq_len() + 2);
    // The first context is a value: the second call extended a copy.
    assert_eq!(first.seq_len(), prompt + 3);
    // Latent steps change what B sees.
    let zero = m.think(TASK, 0, None).unwrap();
    let h0 = zero.last_hidden.as_ref().unwrap();
    let h3 = first.last_hidden.as_ref().unwrap();
    assert_eq!(h3.len(), 576);
    assert_ne!(h0, h3);
}

#[test]
fn the_soft_embedding_points_at_the_likely_next_token() {
    // The reason for the soft embedding: it lies near the input embedding of the
    // token the model would say next (the raw hidden state does not).
    let m = model();
    let ctx = m.think("What is the capital of France?", 0, None).unwrap();
    let h = ctx.last_hidden.unwrap();
    let dec = m.decoder::<Cpu>().unwrap();
    let ht = dec.matrix(h.clone(), 1, 576);
    let logits = dec.logits(&ht).unwrap();
    let top = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    let e = m.latent_map::<Cpu>().unwrap().apply(dec, ht);
    let e: Vec<f32> = e.into_data().to_vec().unwrap();
    let row: Vec<f32> = dec
        .embed(&[top as u32])
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    };
    let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
    let target = m.latent_map::<Cpu>().unwrap().target_norm();
    assert!((norm - target).abs() < 1e-3 * target, "{norm} vs {target}");
    let soft = cos(&e, &row);
    let raw = cos(&h, &row);
    assert!(soft > 0.5 && soft > raw, "soft {soft}, raw {raw}");
}

#[test]
fn realignment_of_tied_embeddings_is_the_identity() {
    // SmolLM2 ties its embeddings, so E_out = E_in and W must come out ≈ I: the full
    // 576 x 576 solve on real weights.
    let dec = model().decoder::<Cpu>().unwrap();
    let w = realign_matrix(dec.output_projection(), dec.input_embeddings()).unwrap();
    let worst = (0..576)
        .flat_map(|r| (0..576).map(move |c| (r, c)))
        .map(|(r, c)| (w[r * 576 + c] - f32::from(r == c)).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-2, "max |W - I| = {worst}");
    assert!(mean_row_norm(dec.input_embeddings()).unwrap() > 0.0);
}

#[test]
fn a_context_survives_the_wire_and_generates_the_same() {
    let m = model();
    let ctx = m.think(TASK, 4, None).unwrap();
    let bytes = ctx.to_bytes(Envelope::default()).unwrap();
    let msg = Message::parse(&bytes).unwrap();
    assert!(matches!(msg.payload(), Payload::KvCache(_)));
    assert_eq!(msg.envelope().model_hash(), m.identity().model_hash);
    assert_eq!(msg.envelope().extra_get("num_steps"), Some("4"));
    let back = Context::from_bytes(&bytes, m).unwrap();
    assert_eq!(back.seq_len(), ctx.seq_len());
    assert_eq!(back.num_steps, 4);
    let here = m
        .generate(QUESTION, Some(&ctx), &greedy(10), |_| {})
        .unwrap();
    let there = m
        .generate(QUESTION, Some(&back), &greedy(10), |_| {})
        .unwrap();
    assert_eq!(here.tokens, there.tokens);
}

#[test]
fn a_context_in_f16_or_bf16_is_half_the_bytes_and_generates_the_same() {
    let m = model();
    let ctx = m.think(TASK, 4, None).unwrap();
    let full = ctx.to_bytes(Envelope::default()).unwrap();
    let here = m
        .generate(QUESTION, Some(&ctx), &greedy(16), |_| {})
        .unwrap();
    for dtype in [DType::F16, DType::Bf16] {
        let bytes = ctx.to_bytes_as(Envelope::default(), dtype).unwrap();
        let msg = Message::parse(&bytes).unwrap();
        msg.verify().unwrap();
        let Payload::KvCache(desc) = msg.payload() else {
            panic!("a KV message")
        };
        assert_eq!(desc.dtype, dtype);
        // Half the section bytes (the header is about the same size).
        let section_bytes = |m: &Message<'_>| m.sections().map(|s| s.bytes.len()).sum::<usize>();
        let f32_msg = Message::parse(&full).unwrap();
        assert_eq!(
            2 * section_bytes(&msg),
            section_bytes(&f32_msg),
            "{dtype:?}"
        );
        let back = Context::from_bytes(&bytes, m).unwrap();
        let there = m
            .generate(QUESTION, Some(&back), &greedy(16), |_| {})
            .unwrap();
        assert_eq!(here.tokens, there.tokens, "{dtype:?}");
    }
    let e = ctx.to_bytes_as(Envelope::default(), DType::I8).unwrap_err();
    assert!(e.to_string().contains("int8"), "{e}");
}

#[test]
fn a_hidden_state_context_is_injected_as_one_position() {
    let m = model();
    let ctx = m.think(TASK, 2, None).unwrap().hidden_only().unwrap();
    let bytes = ctx.to_bytes(Envelope::default()).unwrap();
    let msg = Message::parse(&bytes).unwrap();
    let Payload::HiddenState(d) = msg.payload() else {
        panic!("expected a hidden-state message")
    };
    assert_eq!((d.rows, d.dim), (1, 576));
    let back = Context::from_bytes(&bytes, m).unwrap();
    assert!(back.kv.is_none());
    let q = m.encode(&m.render(QUESTION).unwrap()).unwrap();
    let a = m
        .generate_tokens(&q, Some(&ctx), &greedy(8), |_| {})
        .unwrap();
    let b = m
        .generate_tokens(&q, Some(&back), &greedy(8), |_| {})
        .unwrap();
    assert_eq!(a.prefilled, q.len() + 1, "one injected prefix position");
    assert_eq!(a.reused, 0);
    assert_eq!(a.tokens, b.tokens);
    assert!(!a.tokens.is_empty());
}

#[test]
fn a_context_from_another_model_is_refused_naming_both_hashes() {
    let m = model();
    let mut ctx = m.think(TASK, 0, None).unwrap();
    ctx.model_hash = "ab".repeat(32);
    let err = m
        .generate(QUESTION, Some(&ctx), &greedy(4), |_| {})
        .unwrap_err();
    assert!(matches!(err, ModelError::ForeignContext { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&"ab".repeat(32)) && text.contains(&m.identity().model_hash));
    let bytes = ctx.to_bytes(Envelope::default()).unwrap();
    let err = Context::from_bytes(&bytes, m).err().unwrap();
    assert!(matches!(err, ModelError::ForeignContext { .. }), "{err}");
}

#[test]
fn the_v1_export_carries_the_cache_for_the_python_reference() {
    let m = model();
    let ctx = m.think(TASK, 1, None).unwrap();
    let v1 = ctx.to_v1(Envelope::default()).unwrap();
    let decoded = avp_wire::v1::decode(&v1).unwrap();
    assert_eq!(
        decoded.metadata.extra.get("model_hash"),
        Some(&m.identity().model_hash)
    );
    assert_eq!(
        decoded.metadata.extra.get("num_steps").map(String::as_str),
        Some("1")
    );
    let kv = decoded.kv().unwrap();
    assert_eq!(kv.header.num_layers, 30);
    assert_eq!(kv.header.seq_len as usize, ctx.seq_len());
    // And back: v1 bytes read as a context give the same continuation.
    let back = Context::from_bytes(&v1, m).unwrap();
    let here = m
        .generate(QUESTION, Some(&ctx), &greedy(6), |_| {})
        .unwrap();
    let there = m
        .generate(QUESTION, Some(&back), &greedy(6), |_| {})
        .unwrap();
    assert_eq!(here.tokens, there.tokens);
}

#[test]
fn stop_strings_end_generation_and_are_not_returned() {
    let m = model();
    let full = m
        .generate("What is the capital of France?", None, &greedy(12), |_| {})
        .unwrap();
    assert_eq!(full.text, "The capital of France is Paris.");
    let mut streamed = String::new();
    let opts = GenerateOptions {
        stop: vec![" of France".into()],
        ..greedy(12)
    };
    let cut = m
        .generate("What is the capital of France?", None, &opts, |t| {
            streamed.push_str(t)
        })
        .unwrap();
    assert_eq!(cut.text, "The capital");
    assert_eq!(streamed, "The capital");
    assert_eq!(cut.stop, avp_model::StopReason::StopString);
    assert_eq!(full.stop, avp_model::StopReason::EndOfTurn);
}
