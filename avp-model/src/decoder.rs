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

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Int, TensorData};

use crate::device::{BurnDevice, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::weights::{GgufWeights, Weights};

struct Layer {
    attn_norm: Tensor<1>,
    // Projections as [in, out], so `x.matmul(w)`.
    wq: Tensor<2>,
    wk: Tensor<2>,
    wv: Tensor<2>,
    /// Q, K, V biases (Qwen2), `[1, out]`.
    bias: Option<[Tensor<2>; 3]>,
    wo: Tensor<2>,
    ffn_norm: Tensor<1>,
    w_gate: Tensor<2>,
    w_up: Tensor<2>,
    w_down: Tensor<2>,
}

/// A loaded model.
pub struct Decoder {
    config: ModelConfig,
    embed: Tensor<2>,
    output: Tensor<2>,
    norm: Tensor<1>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    device: BurnDevice,
    /// Where the tensors live.
    kind: Device,
}

/// The attention state of a sequence: per layer K and V, `[1, kv_heads, seq, head_dim]`.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor<4>, Tensor<4>)>,
}

impl KvCache {
    /// This cache with every tensor on `device` (a copy only where it lives elsewhere),
    /// so a context made by a model on one device continues on another.
    pub(crate) fn to_device(&self, device: &BurnDevice) -> KvCache {
        let on = |t: &Tensor<4>| placed(t.clone(), device);
        KvCache {
            layers: self.layers.iter().map(|(k, v)| (on(k), on(v))).collect(),
        }
    }

    /// The cache's shape as avp-wire describes it: f32, HND, every layer.
    pub fn desc(&self) -> Option<avp_wire::KvCacheDesc> {
        let (k, _) = self.layers.first()?;
        let [_, kv_heads, seq, head_dim] = k.dims();
        Some(avp_wire::KvCacheDesc::new(
            self.layers.len() as u32,
            kv_heads as u32,
            head_dim as u32,
            seq as u64,
            avp_wire::DType::F32,
            avp_wire::KvLayout::Hnd,
        ))
    }

    /// Write every layer's K and V into the sections of a message laid out for
    /// [`Self::desc`] (copied once, checksummed in the same pass).
    pub fn write_into(&self, writer: &mut avp_wire::MessageWriter<'_>) -> Result<()> {
        for (l, (k, v)) in self.layers.iter().enumerate() {
            for (i, t) in [(2 * l, k), (2 * l + 1, v)] {
                let data = t.clone().into_data();
                writer.write_section(i, data.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Rebuild a cache from a received KV message (f32, f16 or bf16; HND or NHD;
    /// every layer) for `decoder`.
    pub fn from_message(msg: &avp_wire::Message<'_>, decoder: &Decoder) -> Result<KvCache> {
        let kv = msg.kv()?;
        let d = *kv.desc();
        let c = &decoder.config;
        if d.layers.start != 0
            || d.num_layers != c.layers
            || d.num_kv_heads != c.kv_heads
            || d.head_dim != c.head_dim
        {
            return Err(ModelError::Invalid(format!(
                "KV cache of {} layers x {} heads x {} does not fit this model ({} x {} x {})",
                d.num_layers, d.num_kv_heads, d.head_dim, c.layers, c.kv_heads, c.head_dim
            )));
        }
        let (h, s, hd) = (
            d.num_kv_heads as usize,
            d.seq_len as usize,
            d.head_dim as usize,
        );
        let tensor = |bytes: &[u8]| -> Result<Tensor<4>> {
            let values = decode_floats(bytes, d.dtype)?;
            Ok(match d.layout {
                avp_wire::KvLayout::Hnd => {
                    Tensor::from_data(TensorData::new(values, [1, h, s, hd]), &decoder.device)
                }
                avp_wire::KvLayout::Nhd => {
                    Tensor::<4>::from_data(TensorData::new(values, [1, s, h, hd]), &decoder.device)
                        .swap_dims(1, 2)
                }
            })
        };
        let layers = (0..d.num_layers)
            .map(|l| Ok((tensor(kv.k(l)?)?, tensor(kv.v(l)?)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }

    /// Keep only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        for (k, v) in &mut self.layers {
            let [b, h, s, d] = k.dims();
            if len < s {
                *k = k.clone().slice([0..b, 0..h, 0..len, 0..d]);
                *v = v.clone().slice([0..b, 0..h, 0..len, 0..d]);
            }
        }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Little-endian f32, f16 or bf16 values as f32.
pub(crate) fn decode_floats(bytes: &[u8], dtype: avp_wire::DType) -> Result<Vec<f32>> {
    Ok(match dtype {
        avp_wire::DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        avp_wire::DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        avp_wire::DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        avp_wire::DType::I8 => {
            return Err(ModelError::Invalid(
                "int8 tensors are not supported yet (f32, f16, bf16 are)".into(),
            ));
        }
    })
}

/// The values of a tensor, row-major.
pub(crate) fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Tensor(format!("{e:?}")))
}

/// `t` on `device`: itself when it is there already (burn-flex's `to_device` copies
/// even onto the device a tensor is on), else moved.
fn placed<const D: usize>(t: Tensor<D>, device: &BurnDevice) -> Tensor<D> {
    match t.device() == *device {
        true => t,
        false => t.to_device(device),
    }
}

fn matrix(v: Vec<f32>, rows: usize, cols: usize, device: &BurnDevice) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

/// `t` (on the CPU) transposed and laid out contiguously (burn-flex's tiled copy),
/// then placed on `device` in one upload: a transposed view would be re-strided by
/// every matmul (decode measured ~25% slower that way).
fn transposed(t: Tensor<2>, device: &BurnDevice) -> Tensor<2> {
    Tensor::from_data(t.transpose().into_data(), device)
}

impl Decoder {
    /// Load a model from a GGUF file onto `device`.
    pub fn load(g: &GgufFile, device: Device) -> Result<Decoder> {
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
    ) -> Result<Decoder> {
        let device = kind.burn()?;
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
        let cpu = Device::Cpu.burn()?;
        let weight = |name: &str, out: usize, inp: usize| -> Result<Tensor<2>> {
            let t = matrix(load(name, &[out, inp])?, out, inp, &cpu);
            Ok(transposed(t, &device))
        };
        let vector = |name: &str, n: usize| -> Result<Tensor<1>> {
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
        let embed = matrix(
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
        let embed = placed(embed, &device);
        let layers = (0..config.layers)
            .map(|l| {
                let n = |s: &str| format!("blk.{l}.{s}.weight");
                let b = |s: &str, n: usize| -> Result<Tensor<2>> {
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

    fn rms_norm(&self, x: Tensor<2>, w: &Tensor<1>) -> Tensor<2> {
        let mean_sq = x.clone().powf_scalar(2.0).mean_dim(1);
        x * (mean_sq + self.config.rms_eps as f64).sqrt().recip() * w.clone().unsqueeze_dim::<2>(0)
    }

    /// cos and sin for positions `start..start + seq`, shaped to broadcast over the
    /// heads of a token-major `[1, seq, heads, head_dim]` tensor.
    fn rope_tables(&self, start: usize, seq: usize) -> (Tensor<4>, Tensor<4>) {
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
    fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
        let [b, h, s, hd] = x.dims();
        let first = x.clone().slice([0..b, 0..h, 0..s, 0..hd / 2]);
        let second = x.clone().slice([0..b, 0..h, 0..s, hd / 2..hd]);
        let rotated = Tensor::cat(vec![second.neg(), first], 3);
        x * cos.clone() + rotated * sin.clone()
    }

    /// The input embedding rows of `ids`, `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor<2>> {
        if ids.is_empty() {
            return Err(ModelError::Invalid("at least one token is needed".into()));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let idx = Tensor::<1, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                [ids.len()],
            ),
            &self.device,
        );
        Ok(self.embed.clone().select(0, idx))
    }

    /// The input embedding matrix, `[vocab, hidden]`.
    pub fn input_embeddings(&self) -> &Tensor<2> {
        &self.embed
    }

    /// The output projection, `[hidden, vocab]` (the transposed input embeddings
    /// when they are tied).
    pub fn output_projection(&self) -> &Tensor<2> {
        &self.output
    }

    /// The device tensors live on.
    pub fn device(&self) -> Device {
        self.kind
    }

    /// A `[rows, cols]` matrix of row-major `values` on this decoder's device (for
    /// callers that build hidden states by hand).
    pub fn matrix(&self, values: Vec<f32>, rows: usize, cols: usize) -> Tensor<2> {
        matrix(values, rows, cols, &self.device)
    }

    /// burn's handle for [`Decoder::device`].
    pub(crate) fn burn_device(&self) -> &BurnDevice {
        &self.device
    }

    /// Run `ids` after the positions already in `cache` (which grows by `ids.len()`),
    /// and return the logits of the last position.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let h = self.forward_embeds(self.embed(ids)?, cache)?;
        self.logits(&h)
    }

    /// Logits (`vocab` values) of a final-normed hidden state `[1, hidden]`.
    pub fn logits(&self, hidden: &Tensor<2>) -> Result<Vec<f32>> {
        to_vec(hidden.clone().matmul(self.output.clone()))
    }

    /// Run embedding rows `x` (`[seq, hidden]`) after the positions in `cache` (which
    /// grows by `seq`) and return the last position's final-normed hidden state,
    /// `[1, hidden]` (what Hugging Face reports as the last layer's hidden state).
    pub fn forward_embeds(&self, x: Tensor<2>, cache: &mut KvCache) -> Result<Tensor<2>> {
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
            Tensor::<2, Bool>::tril_mask([seq, total], start as i64, &self.device)
                .unsqueeze_dim::<3>(0)
                .unsqueeze_dim::<4>(0)
                .expand([1, h, seq, total])
        });
        for (l, layer) in self.layers.iter().enumerate() {
            let xn = self.rms_norm(x.clone(), &layer.attn_norm);
            let tokens_of = |t: Tensor<2>, n: usize| t.reshape([1, seq, n, hd]);
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
            let group = |t: Tensor<4>| {
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
        cache: &mut KvCache,
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
        cache: &mut KvCache,
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
