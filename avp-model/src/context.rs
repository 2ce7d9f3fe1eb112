//! [`Context`]: what one agent hands the next: a KV cache (same model) or the last
//! hidden state, with the hash of the model that made it.
//!
//! Contexts are values: [`crate::Model::think`] and [`crate::Model::generate`] take
//! one by reference and extend a copy (burn tensors are shared, not copied), so a
//! context can be reused after a call, unlike the reference's in-place caches.
//!
//! On the wire a context is an avp-wire v2 message (`KvCache`, or `HiddenState` with
//! one row), with the model hash and family in the envelope and `num_steps` and
//! `prompt_tokens` in its extras; [`Context::to_v1`] writes the Python reference's
//! format.

use avp_wire::{
    DType, Envelope, EnvelopeRef, Header, HiddenStateDesc, Message, MessageLayout, MessageWriter,
    Payload,
};

use crate::error::{ModelError, Result};
use crate::kv::{FillTo, KvCache, KvTarget};
use crate::model::{BoxError, Model};

/// The state one agent hands to the next.
#[derive(Clone)]
pub struct Context {
    /// SHA-256 config hash of the model that made it.
    pub model_hash: String,
    /// The model's family ("llama", "qwen2").
    pub model_family: String,
    /// The attention state: prompt tokens plus latent steps. `None` for a
    /// hidden-state-only context.
    pub kv: Option<KvCache>,
    /// The last final-normed hidden state (`hidden` values), before realignment.
    pub last_hidden: Option<Vec<f32>>,
    /// Latent steps taken, summed over chained `think` calls.
    pub num_steps: u32,
    /// Tokens read into it, summed over chained calls.
    pub prompt_tokens: u32,
}

impl Context {
    /// Cached positions (0 for a hidden-state-only context).
    pub fn seq_len(&self) -> usize {
        self.kv.as_ref().map_or(0, KvCache::len)
    }

    /// This context without its KV cache: the hidden-state-only form.
    pub fn hidden_only(&self) -> Result<Context> {
        if self.last_hidden.is_none() {
            return Err(ModelError::Invalid(
                "the context has no hidden state to keep".into(),
            ));
        }
        Ok(Context {
            kv: None,
            ..self.clone()
        })
    }

    /// The avp-wire payload: the KV cache (f32) when there is one, else one hidden row.
    pub fn payload(&self) -> Result<Payload> {
        self.payload_as(DType::F32)
    }

    /// [`Self::payload`] with the KV cache in wire dtype `kv_dtype` (f32, f16
    /// or bf16: half the bytes, converted as it is written).
    pub fn payload_as(&self, kv_dtype: DType) -> Result<Payload> {
        if kv_dtype == DType::I8 {
            return Err(ModelError::Invalid(
                "int8 KV on the wire is not supported yet (f32, f16, bf16 are)".into(),
            ));
        }
        if let Some(kv) = &self.kv
            && let Some(desc) = kv.desc_as(kv_dtype)
        {
            return Ok(Payload::KvCache(desc));
        }
        match &self.last_hidden {
            Some(h) => Ok(Payload::HiddenState(HiddenStateDesc {
                rows: 1,
                dim: h.len() as u64,
                dtype: DType::F32,
                map_id: String::new(),
            })),
            None => Err(ModelError::Invalid(
                "the context has neither a KV cache nor a hidden state".into(),
            )),
        }
    }

    /// `base` with this context's model hash, family and counters filled in.
    pub fn envelope(&self, base: Envelope) -> Envelope {
        let mut e = base;
        e.model_hash = self.model_hash.clone();
        e.model_family = self.model_family.clone();
        put_counters(&mut e, self.num_steps, self.prompt_tokens);
        e
    }

    /// The message layout for this context under `base` (see [`Self::envelope`]).
    pub fn layout(&self, base: Envelope) -> Result<MessageLayout> {
        self.layout_as(base, DType::F32)
    }

    /// [`Self::layout`] with the KV cache in wire dtype `kv_dtype`;
    /// [`Self::write_into`] then writes it in that dtype.
    pub fn layout_as(&self, base: Envelope, kv_dtype: DType) -> Result<MessageLayout> {
        Ok(MessageLayout::new(
            &self.envelope(base),
            &self.payload_as(kv_dtype)?,
        )?)
    }

    /// Write the sections of a message laid out by [`Self::layout`] or
    /// [`Self::layout_as`], for instance straight into a loaned transport slot.
    pub fn write_into(&self, writer: &mut MessageWriter<'_>) -> Result<()> {
        match (writer.layout().payload(), &self.kv, &self.last_hidden) {
            (Payload::KvCache(_), Some(kv), _) => kv.write_into(writer),
            (Payload::HiddenState(_), _, Some(h)) => write_f32s(writer, 0, h),
            (p, ..) => Err(ModelError::Invalid(format!(
                "this context has no {} to write",
                p.kind_name()
            ))),
        }
    }

    /// This context as an encoded v2 message.
    pub fn to_bytes(&self, base: Envelope) -> Result<Vec<u8>> {
        self.to_bytes_as(base, DType::F32)
    }

    /// [`Self::to_bytes`] with the KV cache in wire dtype `kv_dtype`.
    pub fn to_bytes_as(&self, base: Envelope, kv_dtype: DType) -> Result<Vec<u8>> {
        encode(&self.layout_as(base, kv_dtype)?, |w| self.write_into(w))
    }

    /// This context as a v1 message, the format of the Python reference
    /// (`AVPContext.from_bytes` reads it; the model hash travels in `extra`).
    pub fn to_v1(&self, base: Envelope) -> Result<Vec<u8>> {
        let bytes = self.to_bytes(base)?;
        let msg = Message::parse(&bytes)?;
        Ok(avp_wire::v1::from_v2(
            &msg,
            avp_wire::v1::Compression::None,
        )?)
    }

    /// Read a context for `model` from a message in host memory. A context
    /// made by another model is refused, naming both hashes.
    pub fn from_message(msg: &Message<'_>, model: &Model) -> Result<Context> {
        let env = msg.envelope();
        check_hash(&env, model)?;
        let (kv, last_hidden) = match msg.payload() {
            Payload::KvCache(_) => (Some(model.kv_from_message(msg)?), None),
            Payload::HiddenState(d) => {
                let rows = hidden_rows(&d, model)?;
                let data = msg.hidden()?.data();
                let row = &data[(rows - 1) * d.dim as usize * d.dtype.size()..];
                (None, Some(crate::kv::decode_floats(row, d.dtype)?))
            }
            Payload::Text(_) => return Err(not_a_context()),
        };
        Ok(Self::assemble(&env, model, kv, last_hidden))
    }

    /// Read a context for `model` from a message whose `header` is in host
    /// memory and whose sections are elsewhere (device memory, for a message a
    /// `cuda://` transport delivered): `fill(i, target)` copies section `i`
    /// into `target`. A KV cache goes straight into the model's own tensors
    /// with [`FillTo::Model`] (device to device on a GPU, see
    /// [`Model::kv_from_sections`]), through host buffers with
    /// [`FillTo::Host`]; a hidden state is copied to the host.
    pub fn from_sections(
        header: &Header<'_>,
        model: &Model,
        to: FillTo,
        mut fill: impl FnMut(usize, KvTarget<'_>) -> std::result::Result<(), BoxError>,
    ) -> Result<Context> {
        let env = header.envelope();
        check_hash(&env, model)?;
        let (kv, last_hidden) = match header.payload() {
            Payload::KvCache(d) => (Some(model.kv_from_sections(&d, to, fill)?), None),
            Payload::HiddenState(d) => {
                let rows = hidden_rows(&d, model)?;
                let mut data = vec![0u8; header.section(0)?.len as usize];
                fill(0, KvTarget::Host(&mut data)).map_err(ModelError::Transfer)?;
                let row = &data[(rows - 1) * d.dim as usize * d.dtype.size()..];
                (None, Some(crate::kv::decode_floats(row, d.dtype)?))
            }
            Payload::Text(_) => return Err(not_a_context()),
        };
        Ok(Self::assemble(&env, model, kv, last_hidden))
    }

    fn assemble(
        env: &EnvelopeRef<'_>,
        model: &Model,
        kv: Option<KvCache>,
        last_hidden: Option<Vec<f32>>,
    ) -> Context {
        let (num_steps, prompt_tokens) = counters(env);
        Context {
            model_hash: model.identity().model_hash.clone(),
            model_family: env.model_family().into(),
            kv,
            last_hidden,
            num_steps,
            prompt_tokens,
        }
    }

    /// Read a context for `model` from an encoded message (v2, or v1 as the
    /// Python reference writes it).
    pub fn from_bytes(bytes: &[u8], model: &Model) -> Result<Context> {
        if avp_wire::sniff_version(bytes)? == avp_wire::VERSION_V2 {
            let msg = Message::parse(bytes)?;
            msg.verify()?;
            return Self::from_message(&msg, model);
        }
        let v1 = avp_wire::v1::decode(bytes)?;
        let v2 = avp_wire::v1::to_v2(&v1)?;
        Self::from_message(&Message::parse(&v2)?, model)
    }
}

/// `Err` unless the message was made by `model`.
fn check_hash(env: &EnvelopeRef<'_>, model: &Model) -> Result<()> {
    let own = &model.identity().model_hash;
    if env.model_hash() == own {
        return Ok(());
    }
    Err(ModelError::ForeignContext {
        context_hash: match env.model_hash() {
            "" => "(none given)".into(),
            h => h.into(),
        },
        model_hash: own.clone(),
    })
}

/// The rows of a hidden-state payload that fits `model`.
fn hidden_rows(d: &HiddenStateDesc, model: &Model) -> Result<usize> {
    let dim = model.config().hidden as u64;
    if d.dim != dim || d.rows == 0 {
        return Err(ModelError::Invalid(format!(
            "hidden state of {} x {} does not fit this model (hidden size {dim})",
            d.rows, d.dim
        )));
    }
    Ok(d.rows as usize)
}

fn not_a_context() -> ModelError {
    ModelError::Invalid(
        "a text message is not a context (expected a KV cache or hidden state)".into(),
    )
}

/// A message laid out by `layout`, its sections written by `write`, finished.
pub(crate) fn encode(
    layout: &MessageLayout,
    write: impl FnOnce(&mut MessageWriter<'_>) -> Result<()>,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; layout.total_len()];
    let mut w = layout.writer(&mut buf)?;
    write(&mut w)?;
    w.finish()?;
    Ok(buf)
}

/// Put the `num_steps` and `prompt_tokens` counters into `e`'s extras.
pub(crate) fn put_counters(e: &mut Envelope, num_steps: u32, prompt_tokens: u32) {
    e.extra.insert("num_steps".into(), num_steps.to_string());
    e.extra
        .insert("prompt_tokens".into(), prompt_tokens.to_string());
}

/// The `num_steps` and `prompt_tokens` counters of an envelope (0 when absent).
pub(crate) fn counters(env: &avp_wire::EnvelopeRef<'_>) -> (u32, u32) {
    let get = |k: &str| {
        env.extra_get(k)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    (get("num_steps"), get("prompt_tokens"))
}

/// Write `values` as little-endian f32 straight into section `index`.
pub(crate) fn write_f32s(
    writer: &mut MessageWriter<'_>,
    index: usize,
    values: &[f32],
) -> Result<()> {
    let dst = writer.section_mut(index)?;
    if dst.len() != values.len() * 4 {
        return Err(ModelError::Invalid(format!(
            "section {index} holds {} bytes, {} f32 values given",
            dst.len(),
            values.len()
        )));
    }
    for (d, x) in dst.chunks_exact_mut(4).zip(values) {
        d.copy_from_slice(&x.to_le_bytes());
    }
    Ok(())
}
