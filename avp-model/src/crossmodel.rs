//! A handoff between two different models (the reference's "cross-model" mode),
//! across processes.
//!
//! The projection `e = softmax(h·W_src / T)·E_tgt` needs the source's output weights
//! and the target's input embeddings. Neither side should need the other's weights,
//! so the work is split where it is cheap to cut: the sender computes its
//! next-token logits `h·W_src` with its own weights and sends them ([`SourceLogits`],
//! an avp-wire `HiddenState` message with the session's map id, one row per virtual
//! token, `space = source_logits` in the envelope); the receiver restricts them to
//! the shared tokens of the [`ProjectionMap`], takes the softmax and multiplies by
//! its own embeddings ([`Model::import`]). The map is built once from the sender's
//! vocabulary (exchanged in the handshake) and cached as index pairs.
//!
//! ```no_run
//! use avp_model::crossmodel::{CrossOptions, SourceLogits};
//! use avp_model::project::ProjectionMap;
//! use avp_model::Model;
//! use avp_wire::Envelope;
//!
//! let small = Model::load("smollm2")?;
//! let qwen = Model::load("qwen2.5-coder-0.5b")?;
//! let map = ProjectionMap::build(
//!     &small.identity().model_hash, &small.tokenizer().get_vocab(true),
//!     &qwen.identity().model_hash, &qwen.tokenizer().get_vocab(true))?;
//! // Sender: think, then ship the logits of the last hidden state.
//! let ctx = small.think("Tom has 3 apples and buys 5 more.", 4, None)?;
//! let bytes = SourceLogits::from_context(&small, &ctx, &map.id())?.to_bytes(Envelope::default())?;
//! // Receiver: project into its own embedding space and continue from there.
//! let imported = qwen.import(&SourceLogits::from_bytes(&bytes)?, &map, &CrossOptions::default())?;
//! println!("{}", imported.quality.reason);
//! # Ok::<(), avp_model::ModelError>(())
//! ```

use std::collections::HashMap;

use avp_wire::{DType, Envelope, HiddenStateDesc, Message, MessageLayout, Payload};

use crate::context::{Context, counters, put_counters, write_f32s};
use crate::decoder::to_vec;
use crate::engine::Engine;
use crate::error::{ModelError, Result};
use crate::kv::{Cache, decode_floats};
use crate::model::Model;
use crate::model::{Engines, on_engine};
use crate::project::ProjectionMap;
use crate::quality::{Quality, QualityGate, cosine};

/// The envelope key that says what a `HiddenState` message's rows are.
pub const SPACE_KEY: &str = "space";
/// Its value for source next-token logits.
pub const SOURCE_LOGITS: &str = "source_logits";

/// A sender's next-token logits, one row per virtual token the receiver will see.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceLogits {
    /// Hash of the model that produced them.
    pub model_hash: String,
    /// Its family.
    pub model_family: String,
    /// The session's map id (which map the receiver projects with).
    pub map_id: String,
    /// Rows.
    pub rows: usize,
    /// Values per row: the source vocabulary's size.
    pub vocab: usize,
    /// `rows × vocab` logits, row-major.
    pub logits: Vec<f32>,
    /// Latent steps the source took.
    pub num_steps: u32,
    /// Tokens the source read.
    pub prompt_tokens: u32,
}

impl SourceLogits {
    /// The logits of final-normed hidden states `hidden` (`rows × hidden size`,
    /// row-major) of `model`.
    pub fn from_hidden(model: &Model, hidden: &[f32], map_id: &str) -> Result<SourceLogits> {
        let d = model.config().hidden as usize;
        if hidden.is_empty() || !hidden.len().is_multiple_of(d) {
            return Err(ModelError::Invalid(format!(
                "hidden states of {} values are not whole rows of {d}",
                hidden.len()
            )));
        }
        let rows = hidden.len() / d;
        let logits = on_engine!(model, c => {
            let h = c.decoder.matrix(hidden.to_vec(), rows, d);
            to_vec(h.matmul(c.decoder.output_projection().clone()))
        })?;
        Ok(SourceLogits {
            model_hash: model.identity().model_hash.clone(),
            model_family: model.config().family.clone(),
            map_id: map_id.into(),
            rows,
            vocab: logits.len() / rows,
            logits,
            num_steps: 0,
            prompt_tokens: 0,
        })
    }

    /// The logits of `ctx`'s last hidden state (one virtual token), with its counters.
    pub fn from_context(model: &Model, ctx: &Context, map_id: &str) -> Result<SourceLogits> {
        if ctx.model_hash != model.identity().model_hash {
            return Err(ModelError::ForeignContext {
                context_hash: ctx.model_hash.clone(),
                model_hash: model.identity().model_hash.clone(),
            });
        }
        let h = ctx.last_hidden.as_ref().ok_or_else(|| {
            ModelError::Invalid(
                "a cross-model handoff needs the context's last hidden state".into(),
            )
        })?;
        let mut s = Self::from_hidden(model, h, map_id)?;
        s.num_steps = ctx.num_steps;
        s.prompt_tokens = ctx.prompt_tokens;
        Ok(s)
    }

    /// The avp-wire payload.
    pub fn payload(&self) -> Payload {
        Payload::HiddenState(HiddenStateDesc {
            rows: self.rows as u64,
            dim: self.vocab as u64,
            dtype: DType::F32,
            map_id: self.map_id.clone(),
        })
    }

    /// `base` with the source model, the space and the counters filled in.
    pub fn envelope(&self, base: Envelope) -> Envelope {
        let mut e = base;
        e.model_hash = self.model_hash.clone();
        e.model_family = self.model_family.clone();
        e.extra.insert(SPACE_KEY.into(), SOURCE_LOGITS.into());
        put_counters(&mut e, self.num_steps, self.prompt_tokens);
        e
    }

    /// The message layout under `base`.
    pub fn layout(&self, base: Envelope) -> Result<MessageLayout> {
        Ok(MessageLayout::new(&self.envelope(base), &self.payload())?)
    }

    /// Write the one section of a message laid out by [`Self::layout`].
    pub fn write_into(&self, writer: &mut avp_wire::MessageWriter<'_>) -> Result<()> {
        write_f32s(writer, 0, &self.logits)
    }

    /// An encoded v2 message.
    pub fn to_bytes(&self, base: Envelope) -> Result<Vec<u8>> {
        crate::context::encode(&self.layout(base)?, |w| self.write_into(w))
    }

    /// Whether `msg` carries source logits (a `HiddenState` message in the
    /// `source_logits` space).
    pub fn is_source_logits(msg: &Message<'_>) -> bool {
        matches!(msg.payload(), Payload::HiddenState(_))
            && msg.envelope().extra_get(SPACE_KEY) == Some(SOURCE_LOGITS)
    }

    /// Read source logits from a parsed message.
    pub fn from_message(msg: &Message<'_>) -> Result<SourceLogits> {
        let env = msg.envelope();
        let Payload::HiddenState(d) = msg.payload() else {
            return Err(ModelError::Invalid(format!(
                "expected a hidden-state message of source logits, found {}",
                msg.payload().kind_name()
            )));
        };
        if env.extra_get(SPACE_KEY) != Some(SOURCE_LOGITS) {
            return Err(ModelError::Invalid(format!(
                "hidden-state message is in space {:?}, expected {SOURCE_LOGITS:?}",
                env.extra_get(SPACE_KEY).unwrap_or("(none)")
            )));
        }
        if d.map_id.is_empty() || d.rows == 0 {
            return Err(ModelError::Invalid(format!(
                "source logits need a map id and at least one row, found map {:?} and {} rows",
                d.map_id, d.rows
            )));
        }
        let logits = decode_floats(msg.hidden()?.data(), d.dtype)?;
        if logits.iter().any(|x| x.is_nan()) {
            return Err(ModelError::Invalid("source logits contain NaN".into()));
        }
        let (num_steps, prompt_tokens) = counters(&env);
        Ok(SourceLogits {
            model_hash: env.model_hash().into(),
            model_family: env.model_family().into(),
            map_id: d.map_id.clone(),
            rows: d.rows as usize,
            vocab: d.dim as usize,
            logits,
            num_steps,
            prompt_tokens,
        })
    }

    /// Read source logits from an encoded v2 message (parsed and checksum-verified).
    pub fn from_bytes(bytes: &[u8]) -> Result<SourceLogits> {
        let msg = Message::parse(bytes)?;
        msg.verify()?;
        Self::from_message(&msg)
    }
}

/// How [`Model::import`] projects.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossOptions {
    /// Softmax temperature (> 0; the reference found 0.5–1.0 equivalent).
    pub temperature: f32,
    /// The quality gate.
    pub gate: QualityGate,
}

impl Default for CrossOptions {
    fn default() -> Self {
        CrossOptions {
            temperature: 1.0,
            gate: QualityGate::default(),
        }
    }
}

/// What [`Model::import`] made of source logits.
#[derive(Clone)]
pub struct Imported {
    /// A context of the receiving model holding the projected rows as its first
    /// positions; `None` when the gate is enforced and failed.
    pub context: Option<Context>,
    /// The gate's verdict.
    pub quality: Quality,
    /// The target ids of the tokens the source ranked first, one per row.
    pub top_tokens: Vec<u32>,
}

impl Model {
    /// This model's vocabulary as token strings by id ("" for an id without a
    /// token): what the handshake sends when the peer asks.
    pub fn vocabulary(&self) -> Vec<String> {
        let vocab = self.tokenizer().get_vocab(true);
        let len = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut v = vec![String::new(); len];
        for (t, i) in vocab {
            v[i as usize] = t;
        }
        v
    }

    /// The map from `source`'s model into this one: read from the avp cache, else
    /// built from `source_vocab` (token strings by id, as the handshake brings
    /// them) and cached. Models sharing this model's tokenizer need no vocabulary.
    pub fn projection_map(
        &self,
        source: &avp_wire::ModelIdentity,
        source_vocab: Option<&[String]>,
    ) -> Result<ProjectionMap> {
        let own = self.tokenizer().get_vocab(true);
        let theirs: Option<HashMap<String, u32>> = source_vocab.map(|v| {
            v.iter()
                .enumerate()
                .filter(|(_, t)| !t.is_empty())
                .map(|(i, t)| (t.clone(), i as u32))
                .collect()
        });
        let shared_tokenizer = !source.tokenizer_hash.is_empty()
            && source.tokenizer_hash == self.identity().tokenizer_hash;
        ProjectionMap::obtain(
            &crate::fetch::cache_dir(),
            &source.model_hash,
            theirs.as_ref().or(shared_tokenizer.then_some(&own)),
            &self.identity().model_hash,
            &own,
        )
    }

    /// Receiving half of a cross-model handoff: project `src` through `map` into
    /// this model's input embeddings, judge it with the gate, and run the projected
    /// rows as the first positions of a new context.
    pub fn import(
        &self,
        src: &SourceLogits,
        map: &ProjectionMap,
        options: &CrossOptions,
    ) -> Result<Imported> {
        let own = &self.identity().model_hash;
        if map.target_hash != *own || map.source_hash != src.model_hash {
            return Err(ModelError::Invalid(format!(
                "map {} projects {}… into {}…, but the logits come from {}… and this model is {}…",
                map.id(),
                short(&map.source_hash),
                short(&map.target_hash),
                short(&src.model_hash),
                short(own)
            )));
        }
        if src.rows == 0 || src.logits.len() != src.rows * src.vocab {
            return Err(ModelError::Invalid(format!(
                "{} logits are not {} rows of {}",
                src.logits.len(),
                src.rows,
                src.vocab
            )));
        }
        on_engine!(self, c => self.import_on(c, src, map, options))
    }

    fn import_on<B: Engine>(
        &self,
        core: &crate::model::Core<B>,
        src: &SourceLogits,
        map: &ProjectionMap,
        options: &CrossOptions,
    ) -> Result<Imported> {
        let own = &self.identity().model_hash;
        let decoder = &core.decoder;
        let d = self.config().hidden as usize;
        let v_tgt = self.config().vocab_size as usize;
        let z = decoder.matrix(src.logits.clone(), src.rows, src.vocab);
        let e = map.project_logits(
            z,
            decoder.input_embeddings(),
            options.temperature,
            self.embedding_norm()?,
        )?;
        let projected = to_vec(e.clone())?;
        let top_tokens: Vec<u32> = src
            .logits
            .chunks(src.vocab)
            .map(|row| map.top_token(row, v_tgt, options.temperature).target_id)
            .collect();
        let next = to_vec(decoder.embed(&top_tokens)?)?;
        let cosines: Vec<f32> = projected
            .chunks(d)
            .zip(next.chunks(d))
            .map(|(a, b)| cosine(a, b))
            .collect();
        let quality =
            options
                .gate
                .assess(src.prompt_tokens, Some((&projected, src.rows, d)), &cosines);
        if !quality.recommend_latent {
            tracing::warn!(
                enforced = options.gate.enforce,
                "cross-model transfer below the quality gate: {}",
                quality.reason
            );
        }
        let context = match options.gate.enforce && !quality.recommend_latent {
            true => None,
            false => {
                let mut cache = Cache::default();
                let h = decoder.forward_embeds(e, &mut cache)?;
                Some(Context {
                    model_hash: own.clone(),
                    model_family: self.config().family.clone(),
                    kv: Some(B::wrap(cache)),
                    last_hidden: Some(to_vec(h)?),
                    num_steps: src.num_steps,
                    prompt_tokens: src.rows as u32,
                })
            }
        };
        Ok(Imported {
            context,
            quality,
            top_tokens,
        })
    }
}

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SourceLogits {
        SourceLogits {
            model_hash: "a".repeat(64),
            model_family: "llama".into(),
            map_id: "aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbb".into(),
            rows: 2,
            vocab: 3,
            logits: vec![1.0, -2.0, f32::NEG_INFINITY, 0.5, 30.0, -1e30],
            num_steps: 4,
            prompt_tokens: 17,
        }
    }

    #[test]
    fn logits_round_trip_through_the_wire() {
        let s = sample();
        let bytes = s.to_bytes(Envelope::default()).unwrap();
        let msg = Message::parse(&bytes).unwrap();
        assert!(SourceLogits::is_source_logits(&msg));
        assert_eq!(SourceLogits::from_bytes(&bytes).unwrap(), s);
    }

    #[test]
    fn other_messages_are_refused_with_reasons() {
        // A plain hidden state (no space) is not source logits.
        let mut s = sample();
        let bytes = s.to_bytes(Envelope::default()).unwrap();
        let msg = Message::parse(&bytes).unwrap();
        let layout = MessageLayout::new(&Envelope::default(), &msg.payload()).unwrap();
        let mut plain = vec![0u8; layout.total_len()];
        let mut w = layout.writer(&mut plain).unwrap();
        s.write_into(&mut w).unwrap();
        w.finish().unwrap();
        let err = SourceLogits::from_bytes(&plain).unwrap_err().to_string();
        assert!(err.contains("space"), "{err}");
        // No map id.
        s.map_id.clear();
        let err = SourceLogits::from_bytes(&s.to_bytes(Envelope::default()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("map id"), "{err}");
        // NaN.
        let mut s = sample();
        s.logits[1] = f32::NAN;
        let err = SourceLogits::from_bytes(&s.to_bytes(Envelope::default()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("NaN"), "{err}");
    }
}
