//! Where a decoder's weights come from: a GGUF file or a Hugging Face directory,
//! behind one small interface that speaks GGUF tensor names and returns f32 data in
//! Hugging Face order (`[out, in]` row-major for matrices).

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// A tensor as f32 values and its shape (`[rows, cols]` or `[n]`).
pub struct Loaded {
    /// Row-major values.
    pub values: Vec<f32>,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
}

/// A store of named weights, addressed by GGUF tensor names (`blk.3.attn_q.weight`).
pub trait Weights {
    /// The tensor `name` in Hugging Face order.
    fn load(&self, name: &str) -> Result<Loaded>;
    /// Whether the store has `name`.
    fn has(&self, name: &str) -> bool;
}

/// Undo llama.cpp's Q/K row permutation: within each head, GGUF row `2i + j`
/// (pair `i`, half `j`) is Hugging Face row `j * head_dim/2 + i`.
pub(crate) fn unpermute(v: Vec<f32>, heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for r in 0..head_dim {
            let src = (h * head_dim + 2 * (r % half) + r / half) * cols;
            let dst = (h * head_dim + r) * cols;
            out[dst..dst + cols].copy_from_slice(&v[src..src + cols]);
        }
    }
    out
}

/// A GGUF file with the config it was read with (for the Llama Q/K un-permutation).
pub struct GgufWeights<'a> {
    /// The file.
    pub file: &'a GgufFile,
    /// Its architecture.
    pub config: &'a ModelConfig,
}

impl Weights for GgufWeights<'_> {
    fn load(&self, name: &str) -> Result<Loaded> {
        let info = self.file.tensor(name)?;
        // ggml lists dimensions innermost first.
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let mut values = self.file.dequantize(name)?;
        // llama.cpp permutes Q and K rows of Llama exports for its interleaved RoPE
        // (weights and biases alike); Qwen2 exports are stored as they are.
        if self.config.family == "llama" {
            let heads = if name.contains(".attn_q.") {
                Some(self.config.heads as usize)
            } else if name.contains(".attn_k.") {
                Some(self.config.kv_heads as usize)
            } else {
                None
            };
            if let Some(h) = heads {
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                values = unpermute(values, h, self.config.head_dim as usize, cols);
            }
        }
        Ok(Loaded { values, shape })
    }

    fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_ok()
    }
}

/// A GGUF tensor name in Hugging Face naming (`model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf: &str) -> Result<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output.weight" => Some("lm_head.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Ok(s.into());
    }
    let unknown = || ModelError::Invalid(format!("no Hugging Face name for tensor {gguf:?}"));
    let rest = gguf.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let (part, kind) = rest.rsplit_once('.').ok_or_else(unknown)?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return Err(unknown()),
    };
    Ok(format!("model.layers.{layer}.{hf}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_restores_hugging_face_row_order() {
        // One head of dim 4, one column: GGUF rows [r0, r2, r1, r3] hold HF rows 0..4.
        let gguf = vec![0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute(gguf, 1, 4, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.12.attn_q.bias").unwrap(),
            "model.layers.12.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").unwrap(),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.0.bogus.weight").is_err());
    }
}
