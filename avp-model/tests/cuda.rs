//! The decoder on an NVIDIA GPU (`--features cuda`): the same answers as on the CPU,
//! and KV caches that cross between a CPU agent and a GPU agent through the wire.
//!
//! Each test runs only where `Device::Cuda(0).check()` passes (driver and NVRTC
//! libraries, a started driver, a GPU 0) and prints "skipped: <why>" otherwise; CI
//! (no GPU) builds and runs this file to prove the feature compiles and that a
//! missing GPU is an error, not a panic. On a GPU machine, set `AVP_REQUIRE_GPU=1`
//! so that a skip fails instead.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use avp_model::{Device, GenerateOptions, Model};

const QUESTION: &str = "What is the capital of France?";

/// SmolLM2 on GPU 0, or `None` (with the reason printed) where there is none.
fn gpu_model() -> Option<&'static Model> {
    static M: OnceLock<Option<Model>> = OnceLock::new();
    M.get_or_init(|| match Device::Cuda(0).check() {
        Ok(()) => Some(Model::load_on("smollm2", Device::Cuda(0)).expect("load on cuda:0")),
        Err(e) if std::env::var_os("AVP_REQUIRE_GPU").is_some() => {
            panic!("AVP_REQUIRE_GPU is set but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    })
    .as_ref()
}

fn cpu_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| Model::load("smollm2").expect("load SmolLM2 (fetched through pip)"))
}

fn greedy(model: &Model, context: Option<&avp_model::Context>, prompt: &str) -> String {
    greedy_tokens(model, context, prompt, 16).text
}

fn greedy_tokens(
    model: &Model,
    context: Option<&avp_model::Context>,
    prompt: &str,
    max_tokens: usize,
) -> avp_model::Generation {
    let options = GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    };
    model
        .generate(prompt, context, &options, |_| {})
        .expect("generate")
}

#[test]
fn a_missing_driver_is_an_error_naming_it() {
    if let Err(e) = Device::Cuda(0).check() {
        let msg = e.to_string();
        assert!(msg.starts_with("cuda:0 cannot be used: "), "{msg}");
        let err = Model::load_on("smollm2", Device::Cuda(0))
            .err()
            .expect("loading onto an unusable GPU fails");
        assert_eq!(err.to_string(), msg);
    }
}

#[test]
fn the_gpu_gives_the_reference_answer() {
    let Some(gpu) = gpu_model() else { return };
    assert_eq!(
        greedy(gpu, None, QUESTION),
        "The capital of France is Paris."
    );
}

/// f32 on both sides, but GPU matmuls may run in TF32 (10-bit mantissa) on recent
/// GPUs and accumulate in another order, which over 30 layers can move logits by a
/// few hundredths of their range; a wrong kernel, mask or layout moves them by whole
/// units and reorders the top tokens. So: within 2% of the CPU logits' range, and
/// the same top five tokens.
#[test]
fn gpu_logits_match_the_cpu() {
    let Some(gpu) = gpu_model() else { return };
    let cpu = cpu_model();
    let ids = cpu.encode("The quick brown fox jumps over the").unwrap();
    let a = cpu
        .forward(&ids, &mut avp_model::KvCache::default())
        .unwrap();
    let b = gpu
        .forward(&ids, &mut avp_model::KvCache::default())
        .unwrap();
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let (lo, hi) = a
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    eprintln!("largest logit difference {max} over a range of {}", hi - lo);
    assert!(max < 0.02 * (hi - lo), "largest logit difference {max}");
    let top5 = |v: &[f32]| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|&x, &y| v[y].total_cmp(&v[x]));
        i.truncate(5);
        i
    };
    assert_eq!(top5(&a), top5(&b));
}

/// A CPU agent thinks, its KV cache crosses the wire, a GPU agent continues: the
/// same first tokens as continuing on the CPU; the other way round; and a context
/// handed over in process (no wire) moves to the receiving model's device.
/// (Four tokens: a longer greedy run may part at a near-tie under TF32.)
#[test]
fn kv_caches_cross_between_cpu_and_gpu_agents() {
    let Some(gpu) = gpu_model() else { return };
    let cpu = cpu_model();
    let prompt = "Answer in one sentence.";
    let first = |m: &Model, c: &avp_model::Context| greedy_tokens(m, Some(c), prompt, 4).tokens;

    let on_cpu = cpu.think(QUESTION, 4, None).unwrap();
    let bytes = on_cpu.to_bytes(avp_wire::Envelope::default()).unwrap();
    let on_gpu = avp_model::Context::from_bytes(&bytes, gpu).unwrap();
    assert_eq!(first(gpu, &on_gpu), first(cpu, &on_cpu));
    assert_eq!(first(gpu, &on_cpu), first(cpu, &on_cpu), "in process");

    let back = gpu.think(QUESTION, 4, None).unwrap();
    let bytes = back.to_bytes(avp_wire::Envelope::default()).unwrap();
    let on_cpu = avp_model::Context::from_bytes(&bytes, cpu).unwrap();
    assert_eq!(on_cpu.seq_len(), back.seq_len());
    assert_eq!(first(cpu, &on_cpu), first(gpu, &back));
    assert_eq!(first(cpu, &back), first(gpu, &back), "in process");
}

/// A GPU model's KV cache is reachable where it lives: every section is device
/// memory, and a cache rebuilt from those sections device to device (what a
/// `cuda://` transport does between processes) continues exactly as the
/// original; so does one rebuilt through host buffers. The cache is cut to an
/// odd length (SmolLM2: 768 bytes per position, not a multiple of the
/// allocator's 512-byte rounding).
#[test]
fn a_gpu_cache_moves_device_to_device() {
    use avp_model::{FillTo, KvTarget};
    let Some(gpu) = gpu_model() else { return };
    let mut ctx = gpu.think(QUESTION, 4, None).unwrap();
    let kv = ctx.kv.as_mut().unwrap();
    let odd = kv.len() - 1 + kv.len() % 2;
    kv.truncate(odd);
    let kv = ctx.kv.as_ref().unwrap();
    assert_eq!(kv.len() % 2, 1);
    assert!(kv.on_gpu());
    assert_eq!(kv.device(), Some(Device::Cuda(0)));
    let sections = kv.sections().unwrap();
    let desc = kv.desc().unwrap();
    assert_eq!(sections.len(), 2 * desc.num_layers as usize);
    assert!(
        sections
            .iter()
            .all(|s| s.device().is_some() && s.host().is_none())
    );
    let cu = cudarc::driver::CudaContext::new(0).unwrap();
    cu.bind_to_thread().unwrap();
    let prompt = "Answer in one sentence.";
    let want = greedy_tokens(gpu, Some(&ctx), prompt, 8).tokens;
    for to in [FillTo::Model, FillTo::Host] {
        let rebuilt = gpu
            .kv_from_sections(&desc, to, |i, target| {
                let (src, len) = sections[i].device().unwrap();
                match target {
                    KvTarget::Device { addr, len: n } if n == len && to == FillTo::Model => {
                        // SAFETY: both ranges are `len` bytes of live device memory on GPU 0.
                        unsafe { cudarc::driver::result::memcpy_dtod_sync(addr, src, len) }
                            .map_err(|e| format!("{e:?}").into())
                    }
                    KvTarget::Host(buf) if buf.len() == len && to == FillTo::Host => {
                        // SAFETY: `src` is `len` bytes of live device memory on GPU 0.
                        unsafe { cudarc::driver::result::memcpy_dtoh_sync(buf, src) }
                            .map_err(|e| format!("{e:?}").into())
                    }
                    other => Err(format!("{to:?}: unexpected target {other:?}").into()),
                }
            })
            .unwrap();
        assert!(rebuilt.on_gpu());
        assert_eq!(rebuilt.len(), kv.len());
        let moved = avp_model::Context {
            kv: Some(rebuilt),
            ..ctx.clone()
        };
        assert_eq!(
            greedy_tokens(gpu, Some(&moved), prompt, 8).tokens,
            want,
            "{to:?}"
        );
    }
}
