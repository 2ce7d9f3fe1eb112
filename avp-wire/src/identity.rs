//! What a model is, as far as exchanging its state is concerned.

/// A model's identity, exchanged in the handshake. The JSON form matches the
/// Python reference's `ModelIdentity.to_dict()` (`tokenizer_hash` only when set).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ModelIdentity {
    /// Architecture family (`model_type`), e.g. "llama", "qwen2".
    pub model_family: String,
    /// Model id, e.g. a Hugging Face repo id.
    pub model_id: String,
    /// SHA-256 (hex) of the model's canonical architecture config; "" when unknown.
    pub model_hash: String,
    /// Hidden size.
    pub hidden_dim: u32,
    /// Decoder layers.
    pub num_layers: u32,
    /// Key/value heads per layer.
    pub num_kv_heads: u32,
    /// Elements per attention head.
    pub head_dim: u32,
    /// SHA-256 (hex) of the sorted vocabulary; "" when unknown.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tokenizer_hash: String,
}

impl ModelIdentity {
    /// Whether two identities describe KV caches of the same shape: same family,
    /// hidden size and layer count (all known), and the same KV heads and head size.
    ///
    /// The Python reference compares only the first three, so two models that differ
    /// in KV heads would exchange caches of the wrong shape; this does not.
    pub fn same_structure(&self, other: &ModelIdentity) -> bool {
        !self.model_family.is_empty()
            && self.model_family == other.model_family
            && self.hidden_dim > 0
            && self.hidden_dim == other.hidden_dim
            && self.num_layers > 0
            && self.num_layers == other.num_layers
            && self.num_kv_heads == other.num_kv_heads
            && self.head_dim == other.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_matches_python_to_dict() {
        let id = ModelIdentity {
            model_family: "llama".into(),
            model_id: "m".into(),
            hidden_dim: 576,
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            ..Default::default()
        };
        let j = serde_json::to_value(&id).unwrap();
        assert!(j.get("tokenizer_hash").is_none());
        assert_eq!(j["hidden_dim"], 576);
        let back: ModelIdentity = serde_json::from_str(r#"{"model_family":"qwen2"}"#).unwrap();
        assert_eq!(back.model_family, "qwen2");
        assert_eq!(back.num_layers, 0);
    }

    #[test]
    fn structure_requires_kv_shape() {
        let a = ModelIdentity {
            model_family: "llama".into(),
            hidden_dim: 4096,
            num_layers: 32,
            num_kv_heads: 8,
            head_dim: 128,
            ..Default::default()
        };
        let mut b = a.clone();
        assert!(a.same_structure(&b));
        b.num_kv_heads = 32;
        assert!(!a.same_structure(&b));
    }
}
