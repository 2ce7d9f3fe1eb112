//! Encoding, decoding and inspecting messages as bytes: v2, and v1 (the Python
//! reference's format: `AVPContext.to_bytes()` output reads here, and `to_v1`
//! writes what its `AVPContext.from_bytes()` reads).

use avp_wire::v1::{self, Compression};
use avp_wire::{Envelope, MessageLayout, Payload};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::endpoint::{kv_cache, slices};
use crate::errors;
use crate::message::{Held, Message};

/// A message from bytes (v2, or v1 converted to v2), held in a private copy.
#[pyfunction]
pub(crate) fn decode(py: Python<'_>, data: &[u8]) -> PyResult<Message> {
    let version = avp_wire::sniff_version(data).map_err(errors::wire)?;
    let bytes = match version {
        v1::VERSION_V1 => py.detach(|| {
            let d = v1::decode(data).map_err(errors::wire)?;
            v1::to_v2(&d).map_err(errors::wire)
        })?,
        avp_wire::VERSION_V2 => {
            avp_wire::Message::parse(data).map_err(errors::wire)?;
            data.to_vec()
        }
        v => {
            return Err(errors::WireError_::new_err(format!(
                "wire format version {v} is not read here (v1 and v2 are)"
            )));
        }
    };
    Message::from_held(py, Held::Bytes(bytes), version)
}

/// Encode a Hugging Face style KV cache (a sequence of `(K, V)` per layer) as
/// a v2 message, or as v1 (`version=1`) for the Python reference.
#[pyfunction]
#[pyo3(signature = (past_key_values, *, version=2, model_id="", model_hash="", model_family="", session_id="", source_agent_id="", target_agent_id="", extra=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_kv<'py>(
    py: Python<'py>,
    past_key_values: &Bound<'py, PyAny>,
    version: u8,
    model_id: &str,
    model_hash: &str,
    model_family: &str,
    session_id: &str,
    source_agent_id: &str,
    target_agent_id: &str,
    extra: Option<Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyBytes>> {
    if version != 1 && version != 2 {
        return Err(PyValueError::new_err(format!(
            "version must be 1 or 2, not {version}"
        )));
    }
    let (desc, tensors) = kv_cache(py, past_key_values)?;
    let mut envelope = Envelope {
        model_id: model_id.into(),
        model_hash: model_hash.into(),
        model_family: model_family.into(),
        session_id: session_id.into(),
        source_agent_id: source_agent_id.into(),
        target_agent_id: target_agent_id.into(),
        ..Default::default()
    };
    if let Some(extra) = extra {
        for (k, v) in extra.iter() {
            envelope.extra.insert(k.extract()?, v.extract()?);
        }
    }
    let bytes = py.detach(|| {
        // SAFETY: `tensors` lives until this closure returns.
        let parts = unsafe { slices(&tensors) };
        let v2 = MessageLayout::new(&envelope, &Payload::KvCache(desc))
            .and_then(|l| l.encode_to_vec(&parts))
            .map_err(errors::wire)?;
        if version == 2 {
            return Ok(v2);
        }
        let m = avp_wire::Message::parse(&v2).map_err(errors::wire)?;
        v1::from_v2(&m, Compression::None).map_err(errors::wire)
    })?;
    Ok(PyBytes::new(py, &bytes))
}

/// A summary of a message's bytes: version, payload, sizes, and whether its
/// checksums hold (`problem` says what is wrong, if anything).
#[pyfunction]
pub(crate) fn inspect<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("nbytes", data.len())?;
    let version = match avp_wire::sniff_version(data) {
        Ok(v) => v,
        Err(e) => {
            d.set_item("problem", e.to_string())?;
            return Ok(d);
        }
    };
    d.set_item("version", version)?;
    let msg = match decode(py, data) {
        Ok(m) => m,
        Err(e) => {
            d.set_item("problem", e.value(py).to_string())?;
            return Ok(d);
        }
    };
    d.set_item("kind", msg.kind_name())?;
    d.set_item("envelope", msg.envelope_dict(py))?;
    let problem = match msg.verify(py) {
        Ok(()) => None,
        Err(e) => Some(e.value(py).to_string()),
    };
    d.set_item("checksums_ok", problem.is_none())?;
    d.set_item("problem", problem)?;
    Ok(d)
}
