//! A model's architecture, read from GGUF metadata, and its identity for the handshake.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};

/// The architecture facts a decoder needs (Llama and Qwen2 families).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    /// "llama" or "qwen2".
    pub family: String,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Hidden size.
    pub hidden: u32,
    /// Feed-forward (SwiGLU) size.
    pub intermediate: u32,
    /// Decoder layers.
    pub layers: u32,
    /// Attention heads.
    pub heads: u32,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// RoPE base θ.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length.
    pub context_length: u32,
    /// Whether the output projection reuses the token embeddings.
    pub tied_embeddings: bool,
    /// Whether Q, K and V projections have biases (Qwen2).
    pub qkv_bias: bool,
}

impl ModelConfig {
    /// Read the architecture from a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig> {
        let family = g
            .get("general.architecture")?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if family != "llama" && family != "qwen2" {
            return Err(ModelError::Gguf(format!(
                "architecture {family:?} is not supported (llama, qwen2)"
            )));
        }
        let key = |k: &str| format!("{family}.{k}");
        let int = |k: &str| -> Result<u32> {
            let v = g.get(&key(k))?;
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| ModelError::Gguf(format!("{} is not a u32: {v:?}", key(k))))
        };
        let float = |k: &str, default: f32| -> f32 {
            g.metadata
                .get(&key(k))
                .and_then(Value::as_f64)
                .map_or(default, |v| v as f32)
        };
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")?
                .as_array()
                .map_or(0, |a| a.len() as u32),
        };
        let head_dim =
            int("attention.key_length").unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let c = ModelConfig {
            vocab_size,
            hidden,
            intermediate: int("feed_forward_length")?,
            layers: int("block_count")?,
            heads,
            kv_heads: int("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            rope_theta: float("rope.freq_base", 10_000.0),
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
            context_length: int("context_length").unwrap_or(0),
            tied_embeddings: g.tensor("output.weight").is_err(),
            qkv_bias: g.tensor("blk.0.attn_q.bias").is_ok(),
            family,
        };
        c.checked()
    }

    /// `self` if its shapes are consistent (heads divisible by KV heads, even head size).
    pub fn checked(self) -> Result<ModelConfig> {
        let c = self;
        if c.heads == 0
            || c.kv_heads == 0
            || !c.heads.is_multiple_of(c.kv_heads)
            || c.head_dim == 0
            || !c.head_dim.is_multiple_of(2)
            || c.hidden == 0
            || c.vocab_size == 0
        {
            return Err(ModelError::Invalid(format!(
                "inconsistent model shape: hidden {}, vocab {}, {} heads, {} kv heads, head_dim {}",
                c.hidden, c.vocab_size, c.heads, c.kv_heads, c.head_dim
            )));
        }
        Ok(c)
    }

    /// SHA-256 (hex) of the canonical JSON of this config (keys sorted, compact):
    /// equal for the same architecture however the weights were stored.
    pub fn hash(&self) -> String {
        let v = serde_json::to_value(self).expect("plain data");
        // serde_json's default map is sorted by key.
        let canonical = serde_json::to_string(&v).expect("plain data");
        hex(&Sha256::digest(canonical.as_bytes()))
    }

    /// The handshake identity of a model with this config and tokenizer vocabulary.
    pub fn identity(
        &self,
        model_id: &str,
        tokenizer: &tokenizers::Tokenizer,
    ) -> avp_wire::ModelIdentity {
        avp_wire::ModelIdentity {
            model_family: self.family.clone(),
            model_id: model_id.to_owned(),
            model_hash: self.hash(),
            hidden_dim: self.hidden,
            num_layers: self.layers,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            tokenizer_hash: vocab_hash(tokenizer),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (hex) of the vocabulary: the JSON array of `[token, id]` pairs sorted by
/// token (compact, as serde_json writes it).
pub fn vocab_hash(tokenizer: &tokenizers::Tokenizer) -> String {
    let mut pairs: Vec<(String, u32)> = tokenizer.get_vocab(true).into_iter().collect();
    pairs.sort();
    hex(&Sha256::digest(
        serde_json::to_string(&pairs)
            .expect("strings and ids")
            .as_bytes(),
    ))
}
