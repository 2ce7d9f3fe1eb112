//! The decoder on an NVIDIA GPU (`--features cuda`): the same answers as on the CPU,
//! and KV caches that cross between a CPU agent and a GPU agent through the wire.
//!
//! Each test runs only where libcuda and a GPU are present and says "skipped"
//! otherwise; CI (no GPU) builds and runs this file to prove the feature compiles and
//! that a missing driver is an error, not a panic.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use avp_model::{Device, GenerateOptions, Model};

const QUESTION: &str = "What is the capital of France?";

/// SmolLM2 on GPU 0, or `None` (with the reason printed) where there is none.
fn gpu_model() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    M.get_or_init(|| match Device::Cuda(0).check() {
        Ok(()) => Some(Model::load_on("smollm2", false, Device::Cuda(0)).expect("load on cuda:0")),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    })
    .as_ref()
}

fn cpu_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load("smollm2", false).expect("load SmolLM2 (fetched through pip)"))
}

fn greedy(model: &Model, context: Option<&avp_model::Context>, prompt: &str) -> String {
    let options = GenerateOptions {
        max_tokens: 16,
        ..GenerateOptions::default()
    };
    model
        .generate(prompt, context, &options, |_| {})
        .expect("generate")
        .text
}

#[test]
fn a_missing_driver_is_an_error_naming_it() {
    if let Err(e) = Device::Cuda(0).check() {
        let msg = e.to_string();
        assert!(msg.contains("libcuda"), "{msg}");
        let err = Model::load_on("smollm2", false, Device::Cuda(0))
            .err()
            .expect("loading onto a missing GPU fails");
        assert!(err.to_string().contains("libcuda"), "{err}");
    }
}

#[test]
fn the_gpu_gives_the_reference_answer() {
    let Some(gpu) = gpu_model() else { return };
    assert_eq!(gpu.decoder().device(), Device::Cuda(0));
    assert_eq!(
        greedy(gpu, None, QUESTION),
        "The capital of France is Paris."
    );
}

/// f32 on both sides; GPU matmuls may accumulate in a different order (or in TF32),
/// which moves logits of magnitude 2–17 by well under 0.05; a wrong kernel moves
/// them by whole units.
#[test]
fn gpu_logits_match_the_cpu() {
    let Some(gpu) = gpu_model() else { return };
    let cpu = cpu_model();
    let ids = cpu.encode("The quick brown fox jumps over the").unwrap();
    let a = cpu
        .decoder()
        .forward(&ids, &mut avp_model::KvCache::default())
        .unwrap();
    let b = gpu
        .decoder()
        .forward(&ids, &mut avp_model::KvCache::default())
        .unwrap();
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 0.05, "largest logit difference {max}");
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0
    };
    assert_eq!(argmax(&a), argmax(&b));
}

/// A CPU agent thinks, its KV cache crosses the wire, a GPU agent continues: the
/// same tokens as continuing on the CPU; and the other way round.
#[test]
fn kv_caches_cross_between_cpu_and_gpu_agents() {
    let Some(gpu) = gpu_model() else { return };
    let cpu = cpu_model();
    let on_cpu = cpu.think(QUESTION, 4, None).unwrap();
    let bytes = on_cpu.to_bytes(avp_wire::Envelope::default()).unwrap();
    let on_gpu =
        avp_model::Context::from_bytes(&bytes, gpu.decoder(), &gpu.identity().model_hash).unwrap();
    let prompt = "Answer in one sentence.";
    assert_eq!(
        greedy(gpu, Some(&on_gpu), prompt),
        greedy(cpu, Some(&on_cpu), prompt)
    );

    let back = gpu.think(QUESTION, 4, None).unwrap();
    let bytes = back.to_bytes(avp_wire::Envelope::default()).unwrap();
    let on_cpu =
        avp_model::Context::from_bytes(&bytes, cpu.decoder(), &cpu.identity().model_hash).unwrap();
    assert_eq!(on_cpu.seq_len(), back.seq_len());
    assert_eq!(
        greedy(cpu, Some(&on_cpu), prompt),
        greedy(gpu, Some(&back), prompt)
    );
}
