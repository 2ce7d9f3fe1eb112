//! The decoder: a Llama / Qwen2 transformer on burn (on a [`Device`]), with a KV
//! cache laid out as avp moves it (`[kv_heads, seq, head_dim]` per layer, HND).
//!
//! RMSNorm, rotary position embeddings (rotate-half, the config's θ), grouped-query
//! attention, Q/K/V biases (Qwen2), SwiGLU MLP, tied or untied output embeddings.
//! Weights are dequantized to f32 at load, in Hugging Face order (see
//! [`crate::weights`]), so cached K matches what a Hugging Face model would hold.
//!
//! Inputs are either token ids ([`Decoder::forward`]) or embedding rows
//! ([`Decoder::forward_embeds`], the latent path); both return the last position's
//! final-normed hidden state, from which [`Decoder::logits`] projects.

use std::any::Any;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::device::Device;
use crate::engine::{Cpu, Engine};
use crate::kv::Cache;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::weights::{GgufWeights, Weights};

struct Layer<B: Backend> {
    attn_norm: Tensor<B, 1>,
    // Projections as [in, out], so `x.matmul(w)`.
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    /// Q, K, V biases (Qwen2), `[1, out]`.
    bias: Option<[Tensor<B, 2>; 3]>,
    wo: Tensor<B, 2>,
    ffn_norm: Tensor<B, 1>,
    w_gate: Tensor<B, 2>,
    w_up: Tensor<B, 2>,
    w_down: Tensor<B, 2>,
}

/// A loaded model on engine `B`.
pub struct Decoder<B: Engine> {
    config: ModelConfig,
    embed: Tensor<B, 2>,
    output: Tensor<B, 2>,
    norm: Tensor<B, 1>,
    layers: Vec<Layer<B>>,
    inv_freq: Vec<f32>,
    device: B::Device,
    /// Where the tensors live.
    kind: Device,
}

/// The values of a tensor, row-major.
pub(crate) fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Tensor(format!("{e:?}")))
}

pub(crate) fn matrix<B: Backend>(
    v: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

/// `t` (read on the CPU) on `device`: itself for a CPU model, else uploaded.
fn upload<B: Engine>(t: Tensor<Cpu, 2>, device: &B::Device) -> Tensor<B, 2> {
    let any: Box<dyn Any> = Box::new(t);
    match any.downcast::<Tensor<B, 2>>() {
        Ok(same) => *same,
        Err(any) => {
            let t = any
                .downcast::<Tensor<Cpu, 2>>()
                .expect("built above as a CPU tensor");
            Tensor::from_data(t.into_data(), device)
        }
    }
}

/// `t` (on the CPU) transposed and laid out contiguously (burn-flex's tiled copy),
/// then placed on `device` in one upload: a transposed view would be re-strided by
/// every matmul (decode measured ~25% slower that way).
fn transposed<B: Backend>(t: Tensor<Cpu, 2>, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(t.transpose().into_data(), device)
}

impl<B: Engine> Decoder<B> {
    /// Load a model from a GGUF file onto `device`.
    pub fn load(g: &GgufFile, device: Device) -> Result<Decoder<B>> {
        let config = ModelConfig::from_gguf(g)?;
        Self::from_weights(
            config.clone(),
            &GgufWeights {
                file: g,
                config: &config,
            },
            device,
        )
    }

    /// Build a decoder for `config` from `weights` (GGUF names, Hugging Face order)
    /// with its tensors on `device`.
    pub fn from_weights(
        config: ModelConfig,
        weights: &dyn Weights,
        kind: Device,
    ) -> Result<Decoder<B>> {
        let device = B::burn_device(kind)?;
        let (hidden, vocab) = (config.hidden as usize, config.vocab_size as usize);
        let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = weights.load(name)?;
            if t.shape != shape {
                return Err(ModelError::Invalid(format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    t.shape
                )));
            }
            Ok(t.values)
        };
        // Stored [out, in]; kept as [in, out].
        // Matrices are read onto the CPU, transposed there, and uploaded once.
        let cpu = Cpu::burn_device(Device::Cpu)?;
        let weight = |name: &str, out: usize, inp: usize| -> Result<Tensor<B, 2>> {
            let t = matrix::<Cpu>(load(name, &[out, inp])?, out, inp, &cpu);
            Ok(transposed(t, &device))
        };
        let vector = |name: &str, n: usize| -> Result<Tensor<B, 1>> {
            Ok(Tensor::from_data(
                TensorData::new(load(name, &[n])?, [n]),
                &device,
            ))
        };
        let (q_out, kv_out) = (
            (config.heads * config.head_dim) as usize,
            (config.kv_heads * config.head_dim) as usize,
        );
        let ffn = config.intermediate as usize;
        let embed = matrix::<Cpu>(
            load("token_embd.weight", &[vocab, hidden])?,
            vocab,
            hidden,
            &cpu,
        );
        let output = if config.tied_embeddings {
            transposed(embed.clone(), &device)
        } else {
            weight("output.weight", vocab, hidden)?
        };
        let embed = upload::<B>(embed, &device);
        let layers = (0..config.layers)
            .map(|l| {
                let n = |s: &str| format!("blk.{l}.{s}.weight");
                let b = |s: &str, n: usize| -> Result<Tensor<B, 2>> {
                    Ok(vector(&format!("blk.{l}.{s}.bias"), n)?.unsqueeze_dim::<2>(0))
                };
                Ok(Layer {
                    attn_norm: vector(&n("attn_norm"), hidden)?,
                    wq: weight(&n("attn_q"), q_out, hidden)?,
                    wk: weight(&n("attn_k"), kv_out, hidden)?,
                    wv: weight(&n("attn_v"), kv_out, hidden)?,
                    bias: match config.qkv_bias {
                        true => Some([
                            b("attn_q", q_out)?,
                            b("attn_k", kv_out)?,
                            b("attn_v", kv_out)?,
                        ]),
                        false => None,
                    },
                    wo: weight(&n("attn_output"), hidden, q_out)?,
                    ffn_norm: vector(&n("ffn_norm"), hidden)?,
                    w_gate: weight(&n("ffn_gate"), ffn, hidden)?,
                    w_up: weight(&n("ffn_up"), ffn, hidden)?,
                    w_down: weight(&n("ffn_down"), hidden, ffn)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_dim = config.head_dim as usize;
        let inv_freq = (0..head_dim / 2)
            .map(|i| config.rope_theta.powf(-(2.0 * i as f32) / head_dim as f32))
            .collect();
        Ok(Decoder {
            norm: vector("output_norm.weight", hidden)?,
            embed,
            output,
            layers,
            inv_freq,
            config,
            device,
            kind,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn rms_norm(&self, x: Tensor<B, 2>, w: &Tensor<B, 1>) -> Tensor<B, 2> {
        let mean_sq = x.clone().powf_scalar(2.0).mean_dim(1);
        x * (mean_sq + self.config.rms_eps as f64).sqrt().recip() * w.clone().unsqueeze_dim::<2>(0)
    }

    /// cos and sin for positions `start..start + seq`, shaped to broadcast over the
    /// heads of a token-major `[1, seq, heads, head_dim]` tensor.
    fn rope_tables(&self, start: usize, seq: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let hd = self.config.head_dim as usize;
        let (mut cos, mut sin) = (Vec::with_capacity(seq * hd), Vec::with_capacity(seq * hd));
        for p in start..start + seq {
            for i in 0..hd {
                let a = p as f32 * self.inv_freq[i % (hd / 2)];
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        // `[1, seq, 1, head_dim]`: broadcast over the heads of `[1, seq, heads, hd]`.
        let t = |v| {
            matrix(v, seq, hd, &self.device)
                .unsqueeze_dim::<3>(1)
                .unsqueeze_dim::<4>(0)
        };
        (t(cos), t(sin))
    }

    /// Rotate-half RoPE on token-major `[1, seq, heads, head_dim]` (contiguous, as the
    /// projections produce it: rotating before the heads are swapped to the front
    /// keeps these element-wise ops off strided views, which burn-flex 0.21 copies
    /// element by element).
    fn rope(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, s, hd] = x.dims();
        let first = x.clone().slice([0..b, 0..h, 0..s, 0..hd / 2]);
        let second = x.clone().slice([0..b, 0..h, 0..s, hd / 2..hd]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos.clone() + rotated * sin.clone()
    }

    /// The input embedding rows of `ids`, `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor<B, 2>> {
        if ids.is_empty() {
            return Err(ModelError::Invalid("at least one token is needed".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [ids.len()],
            ),
            &self.device,
        );
        Ok(self.embed.clone().select(0, idx))
    }

    /// The input embedding matrix, `[vocab, hidden]`.
    pub fn input_embeddings(&self) -> &Tensor<B, 2> {
        &self.embed
    }

    /// The output projection, `[hidden, vocab]` (the transposed input embeddings
    /// when they are tied).
    pub fn output_projection(&self) -> &Tensor<B, 2> {
        &self.output
    }

    /// The device tensors live on.
    pub fn device(&self) -> Device {
        self.kind
    }

    /// A `[rows, cols]` matrix of row-major `values` on this decoder's device (for
    /// callers that build hidden states by hand).
    pub fn matrix(&self, values: Vec<f32>, rows: usize, cols: usize) -> Tensor<B, 2> {
        matrix(values, rows, cols, &self.device)
    }

    /// A KV cache for this decoder whose sections `fill` writes (see
    /// [`crate::Model::kv_from_sections`]).
    pub(crate) fn cache_from_fill(
        &self,
        desc: &avp_wire::KvCacheDesc,
        to: crate::kv::FillTo,
        fill: &mut dyn FnMut(usize, crate::kv::KvTarget<'_>) -> Result<()>,
    ) -> Result<Cache<B>> {
        Cache::from_fill(desc, &self.config, &self.device, to, fill)
    }

    /// A KV cache for this decoder read from a message in host memory (f32,
    /// f16 or bf16; HND or NHD; every layer).
    pub fn read_cache(&self, msg: &avp_wire::Message<'_>) -> Result<Cache<B>> {
        let kv = msg.kv()?;
        let section = |i: usize| -> Result<&[u8]> {
            Ok(match i % 2 {
                0 => kv.k(i as u32 / 2)?,
                _ => kv.v(i as u32 / 2)?,
            })
        };
        Cache::from_host(kv.desc(), &self.config, &self.device, section)
    }

    /// burn's handle for [`Decoder::device`].
    pub fn burn_device(&self) -> &B::Device {
        &self.device
    }

    /// Run `ids` after the positions already in `cache` (which grows by `ids.len()`),
    /// and return the logits of the last position.
    pub fn forward(&self, ids: &[u32], cache: &mut Cache<B>) -> Result<Vec<f32>> {
        let h = self.forward_embeds(self.embed(ids)?, cache)?;
        self.logits(&h)
    }

    /// Logits (`vocab` values) of a final-normed hidden state `[1, hidden]`.
    pub fn logits(&self, hidden: &Tensor<B, 2>) -> Result<Vec<f32>> {
        to_vec(hidden.clone().matmul(self.output.clone()))
    }

    /// Run embedding rows `x` (`[seq, hidden]`) after the positions in `cache` (which
    /// grows by `seq`) and return the last position's final-normed hidden state,
    /// `[1, hidden]` (what Hugging Face reports as the last layer's hidden state).
    pub fn forward_embeds(&self, x: Tensor<B, 2>, cache: &mut Cache<B>) -> Result<Tensor<B, 2>> {
        let [seq, width] = x.dims();
        if seq == 0 || width != self.config.hidden as usize {
            return Err(ModelError::Invalid(format!(
                "input embeddings are [{seq}, {width}], expected [n >= 1, {}]",
                self.config.hidden
            )));
        }
        let mut x = x;
        let start = cache.len();
        let total = start + seq;
        let (h, kvh, hd) = (
            self.config.heads as usize,
            self.config.kv_heads as usize,
            self.config.head_dim as usize,
        );
        let (cos, sin) = self.rope_tables(start, seq);
        // Position i may attend to positions <= start + i.
        let mask = (seq > 1).then(|| {
            Tensor::<B, 2, Bool>::tril_mask([seq, total], start as i64, &self.device)
                .unsqueeze_dim::<3>(0)
                .unsqueeze_dim::<4>(0)
                .expand([1, h, seq, total])
        });
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = self.rms_norm(x.clone(), &layer.attn_norm);
            let tokens_of = |t: Tensor<B, 2>, n: usize| t.reshape([1, seq, n, hd]);
            let (mut q, mut k, mut v) = (
                xn.clone().matmul(layer.wq.clone()),
                xn.clone().matmul(layer.wk.clone()),
                xn.matmul(layer.wv.clone()),
            );
            if let Some([bq, bk, bv]) = &layer.bias {
                q = q + bq.clone();
                k = k + bk.clone();
                v = v + bv.clone();
            }
            // Heads to the front only now: [1, heads, seq, hd].
            let q = Self::rope(tokens_of(q, h), &cos, &sin).swap_dims(1, 2);
            let k = Self::rope(tokens_of(k, kvh), &cos, &sin).swap_dims(1, 2);
            let v = tokens_of(v, kvh).swap_dims(1, 2);
            let (k, v) = match cache.layers.get(l) {
                Some((pk, pv)) => (
                    Tensor::cat(vec![pk.clone(), k], 2),
                    Tensor::cat(vec![pv.clone(), v], 2),
                ),
                None => (k, v),
            };
            if l < cache.layers.len() {
                cache.layers[l] = (k.clone(), v.clone());
            } else {
                cache.layers.push((k.clone(), v.clone()));
            }
            // Grouped-query attention: each KV head serves heads / kv_heads query heads.
            let group = |t: Tensor<B, 4>| {
                t.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, h / kvh)
                    .reshape([1, h, total, hd])
            };
            let mut scores = q.matmul(group(k).swap_dims(2, 3)) / (hd as f64).sqrt();
            if let Some(m) = &mask {
                scores = scores.mask_fill(m.clone(), f32::NEG_INFINITY);
            }
            let attended = softmax(scores, 3)
                .matmul(group(v))
                .swap_dims(1, 2)
                .reshape([seq, h * hd]);
            x = x + attended.matmul(layer.wo.clone());
            let xn = self.rms_norm(x.clone(), &layer.ffn_norm);
            let mlp = silu(xn.clone().matmul(layer.w_gate.clone())) * xn.matmul(layer.w_up.clone());
            x = x + mlp.matmul(layer.w_down.clone());
        }
        let last = x.slice([seq - 1..seq, 0..self.config.hidden as usize]);
        Ok(self.rms_norm(last, &self.norm))
    }

    /// Greedy decoding: feed `prompt` after `cache`, then up to `max_new` tokens,
    /// stopping before `eos`. Returns the new tokens.
    pub fn greedy(
        &self,
        prompt: &[u32],
        cache: &mut Cache<B>,
        max_new: usize,
        eos: u32,
    ) -> Result<Vec<u32>> {
        let mut sampler = crate::sampling::Sampler::new(Default::default());
        self.generate(prompt, cache, max_new, &[eos], &mut sampler, |_| true)
    }

    /// Feed `prompt` after `cache`, then pick up to `max_new` tokens with `sampler`,
    /// stopping before any of the `stop` tokens or when `on_token` returns false.
    /// Returns the new tokens.
    pub fn generate(
        &self,
        prompt: &[u32],
        cache: &mut Cache<B>,
        max_new: usize,
        stop: &[u32],
        sampler: &mut crate::sampling::Sampler,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        let mut logits = self.forward(prompt, cache)?;
        let mut out = Vec::new();
        while out.len() < max_new {
            let next = sampler.pick(&logits);
            if stop.contains(&next) {
                break;
            }
            out.push(next);
            if !on_token(next) || out.len() == max_new {
                break;
            }
            logits = self.forward(&[next], cache)?;
        }
        Ok(out)
    }
}
