//! [`Model`]: a loaded decoder with its tokenizer and chat template, and the two
//! operations agents use: [`Model::think`] (prefill plus latent steps, producing a
//! [`Context`]) and [`Model::generate`] (continue from a context and answer).
//!
//! ```no_run
//! use avp_model::{GenerateOptions, Model};
//!
//! let model = Model::load("smollm2")?;
//! // Agent A reads the task and thinks 10 latent steps.
//! let ctx = model.think("Tom has 3 apples and buys 5 more.", 10, None)?;
//! // Agent B (same model, maybe another process) answers from A's KV cache.
//! let answer = model.generate("How many apples does Tom have?", Some(&ctx), &GenerateOptions::default(), |_| {})?;
//! println!("{}", answer.text);
//! # Ok::<(), avp_model::ModelError>(())
//! ```

use std::any::Any;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use tokenizers::Tokenizer;

use crate::device::Device;
#[cfg(feature = "cuda")]
use crate::engine::Gpu;
use crate::engine::{Cpu, Engine};
use crate::kv::{Cache, FillTo, KvCache, KvTarget};

use crate::chat::{ChatMessage, render};
use crate::config::ModelConfig;
use crate::context::Context;
use crate::decoder::{Decoder, to_vec};
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::hf::HfDir;
use crate::latent::LatentMap;
use crate::sampling::{Sampler, SamplingOptions};

/// End-of-turn tokens that stop generation when the vocabulary has them.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
];

/// How [`Model::generate`] runs.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Temperature, top-p and seed (temperature 0 is greedy).
    pub sampling: SamplingOptions,
    /// Stop when the text contains one of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Feed the prompt as it is instead of through the chat template.
    pub raw: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingOptions::default(),
            stop: Vec::new(),
            raw: false,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-turn token.
    EndOfTurn,
    /// A stop string.
    StopString,
    /// `max_tokens` reached.
    Length,
}

/// The result of [`Model::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The answer (special tokens and a matched stop string removed).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Tokens this call prefilled (the prompt, plus one for an injected hidden state).
    pub prefilled: usize,
    /// Positions that came from the context's KV cache instead.
    pub reused: usize,
    /// From the call to the first generated token (prefill included).
    pub time_to_first_token: Duration,
    /// From the call to the end.
    pub elapsed: Duration,
    /// Why it ended.
    pub stop: StopReason,
}

/// A loaded model, ready to think and generate.
pub struct Model {
    name: String,
    pub(crate) engine: Engines,
    config: ModelConfig,
    device: Device,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    stop_ids: Vec<u32>,
    identity: avp_wire::ModelIdentity,
    embed_norm: OnceLock<f32>,
}

/// The decoder on the engine the model's device needs.
pub(crate) enum Engines {
    Cpu(Box<Core<Cpu>>),
    #[cfg(feature = "cuda")]
    Gpu(Box<Core<Gpu>>),
}

/// A decoder and what is derived from its weights.
pub(crate) struct Core<B: Engine> {
    pub(crate) decoder: Decoder<B>,
    latent: OnceLock<LatentMap<B>>,
}

impl<B: Engine> Core<B> {
    fn new(decoder: Decoder<B>) -> Box<Core<B>> {
        Box::new(Core {
            decoder,
            latent: OnceLock::new(),
        })
    }

    /// The hidden → input-embedding map, computed (or read from the on-disk
    /// cache under `model_hash`) on first use.
    pub(crate) fn latent_map(&self, model_hash: &str) -> Result<&LatentMap<B>> {
        if let Some(m) = self.latent.get() {
            return Ok(m);
        }
        let cache = crate::latent::cache_path(&crate::fetch::cache_dir(), model_hash);
        let m = LatentMap::for_decoder(&self.decoder, Some(&cache))?;
        Ok(self.latent.get_or_init(|| m))
    }
}

/// `$body` with `$core` bound to the model's `&Core<B>`, for its engine `B`.
macro_rules! on_engine {
    ($model:expr, $core:ident => $body:expr) => {
        match &$model.engine {
            Engines::Cpu($core) => $body,
            #[cfg(feature = "cuda")]
            Engines::Gpu($core) => $body,
        }
    };
}
pub(crate) use on_engine;

impl Model {
    /// Load a model by name (`smollm2`, `qwen2.5-coder-0.5b`: fetched and cached on
    /// first use), or from the path of a GGUF file or a Hugging Face directory, onto
    /// the CPU.
    pub fn load(name_or_path: &str) -> Result<Model> {
        Self::load_on(name_or_path, Device::Cpu)
    }

    /// [`Model::load`] onto `device` (`Device::Cuda` needs the `cuda` feature).
    /// A model fetched on first use is fetched quietly: to show progress, fetch
    /// it first with [`crate::fetch::fetch_with`].
    pub fn load_on(name_or_path: &str, device: Device) -> Result<Model> {
        device.check()?;
        let path = Path::new(name_or_path);
        if path.is_dir() {
            return Self::from_hf_dir(path, device);
        }
        if path.is_file() {
            let name = path
                .file_stem()
                .map_or(name_or_path.into(), |s| s.to_string_lossy().into_owned());
            return Self::from_gguf(&GgufFile::open(path)?, &name, device);
        }
        let spec = crate::fetch::spec(name_or_path)?;
        let file = crate::fetch::fetch(spec)?;
        Self::from_gguf(&GgufFile::open(&file)?, spec.name, device)
    }

    /// Build from an opened GGUF file; `name` is the model id in its identity.
    pub fn from_gguf(g: &GgufFile, name: &str, device: Device) -> Result<Model> {
        let config = ModelConfig::from_gguf(g)?;
        let weights = crate::weights::GgufWeights {
            file: g,
            config: &config,
        };
        let engine = engine(config.clone(), &weights, device)?;
        let tokenizer = crate::tokenizer::from_gguf(g)?;
        let chat_template = g
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let eos = g
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        Ok(Self::assemble(
            name,
            (engine, config, device),
            tokenizer,
            chat_template,
            eos,
        ))
    }

    /// Load a Hugging Face directory (config.json, safetensors, tokenizer.json).
    pub fn from_hf_dir(path: &Path, device: Device) -> Result<Model> {
        let dir = HfDir::open(path)?;
        let config = dir.config()?;
        let engine = engine(config.clone(), &dir, device)?;
        let tokenizer = dir.tokenizer()?;
        let eos = dir
            .eos_token()
            .and_then(|t| tokenizer.token_to_id(&t))
            .or_else(|| dir.config_json["eos_token_id"].as_u64().map(|v| v as u32));
        let name = path
            .file_name()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        Ok(Self::assemble(
            &name,
            (engine, config, device),
            tokenizer,
            dir.chat_template(),
            eos,
        ))
    }

    fn assemble(
        name: &str,
        (engine, config, device): (Engines, ModelConfig, Device),
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        eos: Option<u32>,
    ) -> Model {
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        stop_ids.extend(END_TOKENS.iter().filter_map(|t| tokenizer.token_to_id(t)));
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let identity = config.identity(name, &tokenizer);
        Model {
            name: name.into(),
            engine,
            config,
            device,
            tokenizer,
            chat_template,
            stop_ids,
            identity,
            embed_norm: OnceLock::new(),
        }
    }

    /// The model's name (its id in the handshake).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The handshake identity (config hash, tokenizer hash, shapes).
    pub fn identity(&self) -> &avp_wire::ModelIdentity {
        &self.identity
    }

    /// The decoder, when the model runs on engine `B` (`None` on another):
    /// `model.decoder::<Cpu>()` for a model on the CPU.
    pub fn decoder<B: Engine>(&self) -> Option<&Decoder<B>> {
        self.core::<B>().map(|c| &c.decoder)
    }

    pub(crate) fn core<B: Engine>(&self) -> Option<&Core<B>> {
        on_engine!(self, c => (&**c as &dyn Any).downcast_ref::<Core<B>>())
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokens that end a turn.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// `prompt` as a user turn through the chat template, the assistant's turn
    /// opened (or as it is when the model has no template).
    pub fn render(&self, prompt: &str) -> Result<String> {
        match &self.chat_template {
            Some(t) => render(t, &[ChatMessage::user(prompt)], true),
            None => Ok(prompt.to_owned()),
        }
    }

    /// Token ids of `text` (special tokens in it are matched whole; no BOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Invalid(format!("tokenizing: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Invalid(format!("detokenizing: {e}")))
    }

    /// The hidden → input-embedding map of the model on engine `B` (computed,
    /// or read from the on-disk cache, on first use).
    pub fn latent_map<B: Engine>(&self) -> Result<&LatentMap<B>> {
        self.core::<B>()
            .ok_or_else(|| self.not_on::<B>())?
            .latent_map(&self.identity.model_hash)
    }

    fn not_on<B: Engine>(&self) -> ModelError {
        ModelError::Device(format!(
            "the model runs on {}, not on the {} engine",
            self.device,
            std::any::type_name::<B>()
        ))
    }

    /// The mean L2 norm of the input embedding rows (what projected and realigned
    /// vectors are rescaled to), computed once.
    pub fn embedding_norm(&self) -> Result<f32> {
        if let Some(n) = self.embed_norm.get() {
            return Ok(*n);
        }
        let n = on_engine!(self, c => crate::latent::mean_row_norm(c.decoder.input_embeddings()))?;
        Ok(*self.embed_norm.get_or_init(|| n))
    }

    /// Run `ids` after the positions already in `cache` (which grows by
    /// `ids.len()`, and moves to this model's device first if it is elsewhere),
    /// and return the logits of the last position.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        on_engine!(self, c => {
            let mut on = cache.on(c.decoder.burn_device());
            let logits = c.decoder.forward(ids, &mut on);
            *cache = Engine::wrap(on);
            logits
        })
    }

    /// A KV cache for a message described by `desc` whose sections `fill`
    /// writes. With [`FillTo::Model`] the targets are this model's fresh
    /// tensors where they live: `KvTarget::Device` on a GPU (in place: a
    /// transport on the same GPU copies device to device), `KvTarget::Host` on
    /// the CPU or for a dtype or layout the model converts (f16, bf16, NHD).
    /// With [`FillTo::Host`] they are always host buffers, which the model then
    /// uploads (for a transport that cannot reach the model's device).
    /// Section `i` is K of layer `i / 2` for even `i`, V for odd.
    pub fn kv_from_sections(
        &self,
        desc: &avp_wire::KvCacheDesc,
        to: FillTo,
        mut fill: impl FnMut(usize, KvTarget<'_>) -> std::result::Result<(), BoxError>,
    ) -> Result<KvCache> {
        let mut fill = |i: usize, t: KvTarget<'_>| fill(i, t).map_err(ModelError::Transfer);
        on_engine!(self, c => c.decoder.cache_from_fill(desc, to, &mut fill).map(Engine::wrap))
    }

    /// A KV cache read from a host message's sections (any dtype and layout).
    pub(crate) fn kv_from_message(&self, msg: &avp_wire::Message<'_>) -> Result<KvCache> {
        on_engine!(self, c => c.decoder.read_cache(msg).map(Engine::wrap))
    }

    /// Check `ctx` was made by this model.
    fn check(&self, ctx: &Context) -> Result<()> {
        if ctx.model_hash != self.identity.model_hash {
            return Err(ModelError::ForeignContext {
                context_hash: ctx.model_hash.clone(),
                model_hash: self.identity.model_hash.clone(),
            });
        }
        Ok(())
    }

    /// The cache to continue from: a copy of the context's, or, for a
    /// hidden-state-only context, a fresh cache holding the realigned hidden state as
    /// one prefix position. Returns the cache and the positions prefilled here.
    fn start_cache<B: Engine>(
        &self,
        core: &Core<B>,
        ctx: Option<&Context>,
    ) -> Result<(Cache<B>, usize)> {
        let Some(ctx) = ctx else {
            return Ok((Cache::default(), 0));
        };
        self.check(ctx)?;
        let decoder = &core.decoder;
        if let Some(kv) = &ctx.kv {
            // A context from this model on another device (same model hash) moves here.
            return Ok((kv.on(decoder.burn_device()), 0));
        }
        let h = ctx.last_hidden.as_ref().ok_or_else(|| {
            ModelError::Invalid("the context has neither a KV cache nor a hidden state".into())
        })?;
        let d = self.config().hidden as usize;
        if h.len() != d {
            return Err(ModelError::Invalid(format!(
                "hidden state of {} values, this model's hidden size is {d}",
                h.len()
            )));
        }
        let h = decoder.matrix(h.clone(), 1, d);
        let e = core
            .latent_map(&self.identity.model_hash)?
            .apply(decoder, h);
        let mut cache = Cache::default();
        decoder.forward_embeds(e, &mut cache)?;
        Ok((cache, 1))
    }

    /// Agent A's step: `prompt` (chat-templated) after `context`, then `steps`
    /// latent steps, each feeding the last hidden state back (through
    /// [`Self::latent_map`]) as the next input embedding. A non-finite hidden state
    /// stops the loop with a warning; the context keeps the steps before it.
    pub fn think(&self, prompt: &str, steps: u32, context: Option<&Context>) -> Result<Context> {
        let ids = self.encode(&self.render(prompt)?)?;
        self.think_tokens(&ids, steps, context)
    }

    /// [`Self::think`] on token ids.
    pub fn think_tokens(
        &self,
        ids: &[u32],
        steps: u32,
        context: Option<&Context>,
    ) -> Result<Context> {
        on_engine!(self, c => self.think_on(c, ids, steps, context))
    }

    fn think_on<B: Engine>(
        &self,
        core: &Core<B>,
        ids: &[u32],
        steps: u32,
        context: Option<&Context>,
    ) -> Result<Context> {
        let decoder = &core.decoder;
        let (mut cache, injected) = self.start_cache(core, context)?;
        let mut h = decoder.forward_embeds(decoder.embed(ids)?, &mut cache)?;
        let mut last = finite(&h)?
            .ok_or_else(|| ModelError::Invalid("the prompt's hidden state is not finite".into()))?;
        let mut done = 0;
        for step in 0..steps {
            let e = core
                .latent_map(&self.identity.model_hash)?
                .apply(decoder, h);
            let before = cache.len();
            h = decoder.forward_embeds(e, &mut cache)?;
            match finite(&h)? {
                Some(v) => last = v,
                None => {
                    tracing::warn!(step, "latent step produced NaN/Inf; stopping here");
                    cache.truncate(before);
                    break;
                }
            }
            done += 1;
        }
        let prior = context.map_or((0, 0), |c| (c.num_steps, c.prompt_tokens));
        Ok(Context {
            model_hash: self.identity.model_hash.clone(),
            model_family: self.config().family.clone(),
            kv: Some(B::wrap(cache)),
            last_hidden: Some(last),
            num_steps: prior.0 + done,
            prompt_tokens: prior.1 + (ids.len() + injected) as u32,
        })
    }

    /// Agent B's step: `prompt` (chat-templated unless `options.raw`) after
    /// `context`, then an answer, streamed through `on_text` as it grows.
    pub fn generate(
        &self,
        prompt: &str,
        context: Option<&Context>,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let text = match options.raw {
            true => prompt.to_owned(),
            false => self.render(prompt)?,
        };
        let ids = self.encode(&text)?;
        self.generate_tokens(&ids, context, options, on_text)
    }

    /// [`Self::generate`] on token ids.
    pub fn generate_tokens(
        &self,
        ids: &[u32],
        context: Option<&Context>,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        on_engine!(self, c => self.generate_on(c, ids, context, options, on_text))
    }

    fn generate_on<B: Engine>(
        &self,
        core: &Core<B>,
        ids: &[u32],
        context: Option<&Context>,
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let decoder = &core.decoder;
        let started = Instant::now();
        let (mut cache, injected) = self.start_cache(core, context)?;
        let reused = cache.len() - injected;
        let mut sampler = Sampler::new(options.sampling);
        let mut out = Vec::new();
        let mut shown = 0;
        let mut ttft = None;
        let mut stop = StopReason::Length;
        let mut answer = String::new();
        let mut logits = decoder.forward(ids, &mut cache)?;
        while out.len() < options.max_tokens {
            let next = sampler.pick(&logits);
            ttft.get_or_insert_with(|| started.elapsed());
            if self.stop_ids.contains(&next) {
                stop = StopReason::EndOfTurn;
                break;
            }
            out.push(next);
            answer = self.decode(&out)?;
            if let Some(at) = options
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| answer.find(s.as_str()))
                .min()
            {
                answer.truncate(at);
                stop = StopReason::StopString;
                break;
            }
            // Hold back a tail that may still become a stop string or a whole character.
            let safe = safe_len(&answer, &options.stop);
            if safe > shown {
                on_text(&answer[shown..safe]);
                shown = safe;
            }
            if out.len() == options.max_tokens {
                break;
            }
            logits = decoder.forward(&[next], &mut cache)?;
        }
        if answer.len() > shown && answer.is_char_boundary(shown) {
            on_text(&answer[shown..]);
        }
        Ok(Generation {
            text: answer.trim().to_owned(),
            tokens: out,
            prefilled: ids.len() + injected,
            reused,
            time_to_first_token: ttft.unwrap_or_else(|| started.elapsed()),
            elapsed: started.elapsed(),
            stop,
        })
    }
}

/// The error a transport's copy returns into [`Model::kv_from_sections`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The decoder for `config` from `weights` on the engine `device` needs.
fn engine(
    config: ModelConfig,
    weights: &dyn crate::weights::Weights,
    device: Device,
) -> Result<Engines> {
    match device {
        Device::Cpu => Ok(Engines::Cpu(Core::new(Decoder::from_weights(
            config, weights, device,
        )?))),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => Ok(Engines::Gpu(Core::new(Decoder::from_weights(
            config, weights, device,
        )?))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => device.check().map(|()| unreachable!("check refuses cuda")),
    }
}

/// `h`'s values if all are finite.
fn finite<B: Backend>(h: &Tensor<B, 2>) -> Result<Option<Vec<f32>>> {
    let v = to_vec(h.clone())?;
    Ok(v.iter().all(|x| x.is_finite()).then_some(v))
}

/// How much of `text` can be shown: not a trailing replacement character (a
/// character still being assembled from byte tokens), nor a tail that starts a
/// stop string.
fn safe_len(text: &str, stops: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for s in stops.iter().filter(|s| !s.is_empty()) {
        // Longest proper prefix first.
        if let Some(i) = s
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i > 0)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|&i| text[..end].ends_with(&s[..i]))
        {
            end -= i;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_len_holds_back_partial_stop_strings_and_characters() {
        let stops = vec!["\nUser:".to_owned()];
        assert_eq!(safe_len("The answer\nUs", &stops), "The answer".len());
        assert_eq!(safe_len("The answer", &stops), "The answer".len());
        assert_eq!(safe_len("caf\u{FFFD}", &[]), 3);
        assert_eq!(safe_len("xaba", &["abab".to_owned()]), 1);
    }
}
