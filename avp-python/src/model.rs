//! The model layer: `avp_rs.Model` (load, `think`, `generate`), contexts as
//! messages and back, and the reference's one-liner `avp_rs.generate`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use avp_model::crossmodel::{CrossOptions, SourceLogits};
use avp_model::{Device, GenerateOptions, SamplingOptions};
use avp_wire::{DType, Envelope};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::endpoint::{Sender, dtype_of};
use crate::errors::AvpError;
use crate::message::Message;

fn model_err(e: avp_model::ModelError) -> PyErr {
    AvpError::new_err(e.to_string())
}

/// A decoder (Llama / Qwen2 families) on the CPU, from a known name
/// (`smollm2`, `qwen2.5-coder-0.5b`: fetched and cached on first use), a GGUF
/// file or a Hugging Face directory.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Model(pub(crate) Arc<avp_model::Model>);

fn device(name: &str) -> PyResult<Device> {
    name.parse::<Device>()
        .map_err(|e| PyValueError::new_err(format!("device {name:?}: {e}")))
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (name_or_path, device="cpu"))]
    fn new(py: Python<'_>, name_or_path: &str, device: &str) -> PyResult<Model> {
        let dev = self::device(device)?;
        let m = py
            .detach(|| avp_model::Model::load_on(name_or_path, dev))
            .map_err(model_err)?;
        Ok(Model(Arc::new(m)))
    }

    /// The model's identity (the reference's `ModelIdentity` fields).
    #[getter]
    fn identity<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let id = self.0.identity();
        let d = PyDict::new(py);
        d.set_item("model_family", &id.model_family)?;
        d.set_item("model_id", &id.model_id)?;
        d.set_item("model_hash", &id.model_hash)?;
        d.set_item("hidden_dim", id.hidden_dim)?;
        d.set_item("num_layers", id.num_layers)?;
        d.set_item("num_kv_heads", id.num_kv_heads)?;
        d.set_item("head_dim", id.head_dim)?;
        d.set_item("tokenizer_hash", &id.tokenizer_hash)?;
        Ok(d)
    }

    /// Agent A's step: read `prompt` (after `context`) and think `steps`
    /// latent steps; the KV cache is the result.
    #[pyo3(signature = (prompt, steps=20, context=None))]
    fn think(
        &self,
        py: Python<'_>,
        prompt: &str,
        steps: u32,
        context: Option<&Context>,
    ) -> PyResult<Context> {
        let prior = context.map(|c| c.inner.clone());
        let m = &self.0;
        let ctx = py
            .detach(|| {
                let prior = prior.as_ref().map(|p| lock(p));
                m.think(prompt, steps, prior.as_deref())
            })
            .map_err(model_err)?;
        Ok(Context::new(ctx))
    }

    /// Agent B's step: answer `prompt` after `context` (greedy unless
    /// `temperature` > 0).
    #[pyo3(signature = (prompt, context=None, max_tokens=256, temperature=0.0, top_p=1.0, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        context: Option<&Context>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        seed: u64,
    ) -> PyResult<String> {
        let opts = GenerateOptions {
            max_tokens,
            sampling: SamplingOptions {
                temperature,
                top_p,
                seed,
            },
            ..Default::default()
        };
        let prior = context.map(|c| c.inner.clone());
        let m = &self.0;
        py.detach(|| {
            let prior = prior.as_ref().map(|p| lock(p));
            m.generate(prompt, prior.as_deref(), &opts, |_| {})
                .map(|g| g.text)
        })
        .map_err(model_err)
    }

    /// A context from a received message (a KV cache of this model).
    fn context_from(&self, message: &Message) -> PyResult<Context> {
        let bytes = message.bytes()?;
        avp_model::Context::from_bytes(&bytes, &self.0)
            .map(Context::new)
            .map_err(model_err)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A model's state after `think`: its KV cache and last hidden state.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Context {
    inner: Arc<Mutex<avp_model::Context>>,
}

impl Context {
    fn new(c: avp_model::Context) -> Context {
        Context {
            inner: Arc::new(Mutex::new(c)),
        }
    }
}

#[pymethods]
impl Context {
    /// Positions in the KV cache.
    #[getter]
    fn seq_len(&self) -> usize {
        lock(&self.inner).seq_len()
    }

    /// Latent steps taken.
    #[getter]
    fn num_steps(&self) -> u32 {
        lock(&self.inner).num_steps
    }

    /// The context as a v2 message (KV on the wire as `kv_dtype`).
    #[pyo3(signature = (kv_dtype="float32"))]
    fn to_bytes<'py>(&self, py: Python<'py>, kv_dtype: &str) -> PyResult<Bound<'py, PyBytes>> {
        let d: DType = dtype_of(kv_dtype)?;
        let inner = self.inner.clone();
        let b = py
            .detach(|| lock(&inner).to_bytes_as(Envelope::default(), d))
            .map_err(model_err)?;
        Ok(PyBytes::new(py, &b))
    }

    /// The context in the reference's v1 format (`AVPContext.from_bytes` reads it).
    fn to_v1<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let inner = self.inner.clone();
        let b = py
            .detach(|| lock(&inner).to_v1(Envelope::default()))
            .map_err(model_err)?;
        Ok(PyBytes::new(py, &b))
    }

    /// Send the context's KV cache over `sender` (written straight into the
    /// loaned memory, converted to `kv_dtype` on the way).
    #[pyo3(signature = (sender, kv_dtype="float32"))]
    fn send(&self, py: Python<'_>, sender: &Sender, kv_dtype: &str) -> PyResult<()> {
        let d: DType = dtype_of(kv_dtype)?;
        let inner = self.inner.clone();
        sender.send_with(py, move |tx, envelope| {
            let ctx = lock(&inner);
            let layout = ctx.layout_as(envelope, d).map_err(model_err)?;
            let mut loan = tx.loan(&layout).map_err(crate::errors::transport)?;
            ctx.write_into(loan.writer()).map_err(model_err)?;
            loan.finish()
                .and_then(|r| r.send())
                .map_err(crate::errors::transport)
        })
    }
}

/// Models loaded by `avp_rs.generate`, by name, kept for later calls.
fn cached(py: Python<'_>, name: &str) -> PyResult<Arc<avp_model::Model>> {
    static MODELS: OnceLock<Mutex<HashMap<String, Arc<avp_model::Model>>>> = OnceLock::new();
    let models = MODELS.get_or_init(Mutex::default);
    if let Some(m) = lock(models).get(name) {
        return Ok(m.clone());
    }
    let m = Arc::new(
        py.detach(|| avp_model::Model::load(name))
            .map_err(model_err)?,
    );
    lock(models).insert(name.to_owned(), m.clone());
    Ok(m)
}

/// The reference's one-liner: `model` thinks `steps` latent steps about
/// `prompt` and answers from its own KV cache; with a different
/// `source_model`, the source thinks and its last hidden state is projected
/// into `model` (cross-model), which answers.
#[pyfunction]
#[pyo3(signature = (prompt, model="smollm2", source_model=None, steps=20, max_tokens=256))]
pub(crate) fn generate(
    py: Python<'_>,
    prompt: &str,
    model: &str,
    source_model: Option<&str>,
    steps: u32,
    max_tokens: usize,
) -> PyResult<String> {
    let target = cached(py, model)?;
    let source = match source_model {
        Some(s) if s != model => Some(cached(py, s)?),
        _ => None,
    };
    let opts = GenerateOptions {
        max_tokens,
        ..Default::default()
    };
    py.detach(|| {
        let ctx = match &source {
            None => target.think(prompt, steps, None)?,
            Some(src) => {
                let thought = src.think(prompt, steps, None)?;
                let map = target.projection_map(src.identity(), Some(&src.vocabulary()))?;
                let logits = SourceLogits::from_context(src, &thought, &map.id())?;
                let imported = target.import(&logits, &map, &CrossOptions::default())?;
                match imported.context {
                    Some(c) => c,
                    None => {
                        return Err(avp_model::ModelError::Invalid(format!(
                            "the cross-model quality gate refused the projection: {:?}",
                            imported.quality
                        )));
                    }
                }
            }
        };
        target
            .generate(prompt, Some(&ctx), &opts, |_| {})
            .map(|g| g.text)
    })
    .map_err(model_err)
}
