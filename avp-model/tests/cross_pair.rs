//! The real cross-model pair: SmolLM2-135M (Llama, vocab 49,152) and
//! Qwen2.5-Coder-0.5B (Qwen2, vocab 151,936) share part of their byte-level BPE
//! vocabularies; a SmolLM2 hidden state projects into Qwen's embedding space.

use avp_model::Model;
use avp_model::crossmodel::{CrossOptions, SourceLogits};
use avp_model::engine::Cpu;
use avp_model::latent::mean_row_norm;
use avp_model::project::{Method, ProjectionMap};

#[test]
fn smollm2_and_qwen_share_a_vocabulary_path_both_ways() {
    let small = Model::load("smollm2").unwrap();
    let qwen = Model::load("qwen2.5-coder-0.5b").unwrap();
    let (sv, qv) = (
        small.tokenizer().get_vocab(true),
        qwen.tokenizer().get_vocab(true),
    );
    let there = ProjectionMap::build(
        &small.identity().model_hash,
        &sv,
        &qwen.identity().model_hash,
        &qv,
    )
    .unwrap();
    let back = ProjectionMap::build(
        &qwen.identity().model_hash,
        &qv,
        &small.identity().model_hash,
        &sv,
    )
    .unwrap();
    assert_eq!(there.method, Method::VocabOverlap);
    let n = there.overlap_count();
    eprintln!("SmolLM2 ∩ Qwen2.5 vocabulary: {n} shared tokens");
    assert_eq!(n, back.overlap_count());
    assert!(n > 20_000, "{n}");

    // "The capital of France is" → SmolLM2's last hidden state → Qwen's space.
    let ctx = small
        .think_tokens(&small.encode("The capital of France is").unwrap(), 0, None)
        .unwrap();
    let h = small
        .decoder::<Cpu>()
        .unwrap()
        .matrix(ctx.last_hidden.clone().unwrap(), 1, 576);
    let target_norm = mean_row_norm(qwen.decoder::<Cpu>().unwrap().input_embeddings()).unwrap();
    let e = there
        .project(
            h,
            small.decoder::<Cpu>().unwrap().output_projection(),
            qwen.decoder::<Cpu>().unwrap().input_embeddings(),
            1.0,
            target_norm,
        )
        .unwrap();
    assert_eq!(e.dims(), [1, 896]);
    let v: Vec<f32> = e.clone().into_data().to_vec().unwrap();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - target_norm).abs() < 1e-3 * target_norm);
    // The projected vector points at Qwen's " Paris" more than at a typical token.
    let paris = qwen.encode(" Paris").unwrap();
    assert_eq!(paris.len(), 1);
    let rows = |ids: &[u32]| -> Vec<Vec<f32>> {
        let t = qwen.decoder::<Cpu>().unwrap().embed(ids).unwrap();
        let flat: Vec<f32> = t.into_data().to_vec().unwrap();
        flat.chunks(896).map(<[f32]>::to_vec).collect()
    };
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |x: &[f32]| x.iter().map(|y| y * y).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    };
    let to_paris = cos(&v, &rows(&paris)[0]);
    let sample: Vec<u32> = there.target_ids.iter().step_by(997).copied().collect();
    let typical: f32 = rows(&sample).iter().map(|r| cos(&v, r)).sum::<f32>() / sample.len() as f32;
    eprintln!("cosine to \" Paris\" {to_paris:.3}, to a typical shared token {typical:.3}");
    assert!(to_paris > typical + 0.1, "{to_paris} vs {typical}");

    // Qwen reads the projected vector as one position and continues after it.
    let mut cache = avp_model::kv::Cache::<Cpu>::default();
    let qwen_decoder = qwen.decoder::<Cpu>().unwrap();
    qwen_decoder.forward_embeds(e, &mut cache).unwrap();
    let logits = qwen_decoder
        .forward(&qwen.encode(" Answer:").unwrap(), &mut cache)
        .unwrap();
    assert_eq!(cache.len(), 1 + 2);
    assert!(logits.iter().all(|x| x.is_finite()));

    // The same through the wire as the agents do it: SmolLM2 sends the logits of
    // two hidden states (two virtual tokens), Qwen imports them.
    let ctx2 = small
        .think_tokens(&small.encode("The capital of Italy is").unwrap(), 0, None)
        .unwrap();
    let mut hidden = ctx.last_hidden.clone().unwrap();
    hidden.extend(ctx2.last_hidden.clone().unwrap());
    let src = SourceLogits::from_hidden(&small, &hidden, &there.id()).unwrap();
    assert_eq!((src.rows, src.vocab), (2, 49_152));
    let bytes = src.to_bytes(avp_wire::Envelope::default()).unwrap();
    let got = SourceLogits::from_bytes(&bytes).unwrap();
    assert_eq!(got, src);
    let imported = qwen.import(&got, &there, &CrossOptions::default()).unwrap();
    let names: Vec<String> = imported
        .top_tokens
        .iter()
        .map(|&t| qwen.decode(&[t]).unwrap())
        .collect();
    eprintln!("top tokens {names:?}, quality {:?}", imported.quality);
    assert_eq!(names, [" Paris", " Rome"]);
    assert!(
        imported.quality.next_token_cosine > 0.5,
        "{:?}",
        imported.quality
    );
    let qctx = imported.context.expect("advisory gate keeps the context");
    assert_eq!(qctx.seq_len(), 2);
    // The projection agrees with the in-process one for the first row.
    let row0 = qwen
        .import(
            &SourceLogits::from_hidden(&small, ctx.last_hidden.as_ref().unwrap(), &there.id())
                .unwrap(),
            &there,
            &CrossOptions::default(),
        )
        .unwrap();
    assert_eq!(row0.top_tokens, vec![imported.top_tokens[0]]);
    // A map for another pair is refused.
    assert!(
        small
            .import(&got, &there, &CrossOptions::default())
            .is_err()
    );

    // And back: Qwen's logits into SmolLM2.
    let qctx = qwen
        .think_tokens(&qwen.encode("The capital of France is").unwrap(), 0, None)
        .unwrap();
    let back_src = SourceLogits::from_context(&qwen, &qctx, &back.id()).unwrap();
    assert_eq!(back_src.vocab, 151_936);
    let home = small
        .import(&back_src, &back, &CrossOptions::default())
        .unwrap();
    assert_eq!(small.decode(&home.top_tokens).unwrap(), " Paris");
    assert_eq!(home.context.unwrap().seq_len(), 1);
}
