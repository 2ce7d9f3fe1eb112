//! A Hugging Face model directory: `config.json`, `*.safetensors` (F32, F16 or BF16;
//! one file or shards), `tokenizer.json` and `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{Loaded, Weights, hf_name};

/// An opened Hugging Face directory: its config, tokenizer files and mapped weights.
pub struct HfDir {
    /// The directory.
    pub path: PathBuf,
    /// `config.json`.
    pub config_json: Value,
    /// `tokenizer_config.json` (an empty object when absent).
    pub tokenizer_config: Value,
    shards: Vec<Mmap>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::HfDir(msg.into())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))
}

impl HfDir {
    /// Whether `path` looks like a Hugging Face model directory.
    pub fn is_model_dir(path: &Path) -> bool {
        path.join("config.json").is_file()
    }

    /// Open `path`, mapping every `*.safetensors` file.
    pub fn open(path: &Path) -> Result<HfDir> {
        let config_json = read_json(&path.join("config.json"))?;
        let tokenizer_config = match path.join("tokenizer_config.json") {
            p if p.is_file() => read_json(&p)?,
            _ => Value::Object(Default::default()),
        };
        let io = |p: &Path, source| ModelError::Io {
            path: p.display().to_string(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad(format!("no *.safetensors in {}", path.display())));
        }
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for f in &files {
            let file = std::fs::File::open(f).map_err(|e| io(f, e))?;
            // SAFETY: the mapping is read-only and model files are not modified
            // while loaded (the same contract as every mmap-based model loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io(f, e))?;
            let st =
                SafeTensors::deserialize(&map).map_err(|e| bad(format!("{}: {e}", f.display())))?;
            for name in st.names() {
                index.insert(name.to_owned(), shards.len());
            }
            shards.push(map);
        }
        Ok(HfDir {
            path: path.to_owned(),
            config_json,
            tokenizer_config,
            shards,
            index,
        })
    }

    /// The architecture from `config.json`.
    pub fn config(&self) -> Result<ModelConfig> {
        let c = &self.config_json;
        let family = c["model_type"].as_str().unwrap_or_default().to_owned();
        if family != "llama" && family != "qwen2" {
            return Err(bad(format!(
                "model_type {family:?} is not supported (llama, qwen2)"
            )));
        }
        let int = |k: &str| -> Result<u32> {
            c[k].as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(format!("config.json: {k} is missing or not a u32")))
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let tied = c["tie_word_embeddings"]
            .as_bool()
            .unwrap_or(!self.index.contains_key("lm_head.weight"));
        ModelConfig {
            vocab_size: int("vocab_size")?,
            hidden,
            intermediate: int("intermediate_size")?,
            layers: int("num_hidden_layers")?,
            heads,
            kv_heads: int("num_key_value_heads").unwrap_or(heads),
            head_dim: int("head_dim").unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            rope_theta: c["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
            rms_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
            context_length: int("max_position_embeddings").unwrap_or(0),
            tied_embeddings: tied,
            qkv_bias: self
                .index
                .contains_key("model.layers.0.self_attn.q_proj.bias"),
            family,
        }
        .checked()
    }

    /// `tokenizer.json` as a tokenizer.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let p = self.path.join("tokenizer.json");
        tokenizers::Tokenizer::from_file(&p).map_err(|e| bad(format!("{}: {e}", p.display())))
    }

    /// The chat template of `tokenizer_config.json`, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.tokenizer_config["chat_template"]
            .as_str()
            .map(str::to_owned)
    }

    /// The end-of-sequence token string of `tokenizer_config.json`, if any.
    pub fn eos_token(&self) -> Option<String> {
        match &self.tokenizer_config["eos_token"] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        }
    }
}

impl Weights for HfDir {
    fn load(&self, name: &str) -> Result<Loaded> {
        let hf = hf_name(name)?;
        let &shard = self
            .index
            .get(&hf)
            .ok_or_else(|| ModelError::Missing(hf.clone()))?;
        let st = SafeTensors::deserialize(&self.shards[shard]).map_err(|e| bad(e.to_string()))?;
        let t = st.tensor(&hf).map_err(|e| bad(format!("{hf}: {e}")))?;
        let dtype = match t.dtype() {
            Dtype::F32 => avp_wire::DType::F32,
            Dtype::F16 => avp_wire::DType::F16,
            Dtype::BF16 => avp_wire::DType::Bf16,
            other => {
                return Err(bad(format!(
                    "{hf}: dtype {other:?} is not supported (F32, F16, BF16)"
                )));
            }
        };
        let values = crate::kv::decode_floats(t.data(), dtype)?;
        Ok(Loaded {
            values,
            shape: t.shape().to_vec(),
        })
    }

    fn has(&self, name: &str) -> bool {
        hf_name(name).is_ok_and(|n| self.index.contains_key(&n))
    }
}
