//! Listening, accepting, receiving and sending: `avp_rs.listen`,
//! `avp_rs.connect` and the objects they return. Every blocking wait releases
//! the GIL and wakes every 100 ms to see Ctrl-C.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use avp_transport::{Endpoint, Options, Session, ShmOptions, TcpOptions, TransportError};
use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, MessageLayout, ModelIdentity, Payload};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PySequence};

use crate::errors;
use crate::loan::{Loan, SenderObj, lock};
use crate::message::Message;

/// How long a wait runs with the GIL released before it checks for signals.
const SLICE: Duration = Duration::from_millis(100);

/// Run `op` with the GIL released, in slices of [`SLICE`], until it gives
/// something other than a timeout or `timeout` (None: forever) has passed.
fn wait<T: Send>(
    py: Python<'_>,
    timeout: Option<f64>,
    op: impl Fn(Duration) -> Result<T, TransportError> + Sync,
) -> PyResult<T> {
    let deadline = match timeout {
        Some(t) if !(t >= 0.0 && t.is_finite()) => {
            return Err(PyValueError::new_err(format!(
                "timeout must be a number of seconds >= 0, not {t}"
            )));
        }
        Some(t) => Some(Instant::now() + Duration::from_secs_f64(t)),
        None => None,
    };
    loop {
        let left = deadline.map_or(SLICE, |d| d.saturating_duration_since(Instant::now()));
        match py.detach(|| op(left.min(SLICE))) {
            Err(TransportError::Timeout(..)) if !left.is_zero() => py.check_signals()?,
            Err(TransportError::Timeout(..)) => {
                return Err(errors::Timeout::new_err(format!(
                    "nothing came within {:?}",
                    Duration::from_secs_f64(timeout.unwrap_or(0.0))
                )));
            }
            r => return r.map_err(errors::transport),
        }
    }
}

/// A model identity from a dict of the reference's `ModelIdentity` fields.
fn identity(d: Option<&Bound<'_, PyDict>>) -> PyResult<ModelIdentity> {
    let mut id = ModelIdentity::default();
    let Some(d) = d else { return Ok(id) };
    for (k, v) in d.iter() {
        let k: String = k.extract()?;
        match k.as_str() {
            "model_family" => id.model_family = v.extract()?,
            "model_id" => id.model_id = v.extract()?,
            "model_hash" => id.model_hash = v.extract()?,
            "tokenizer_hash" => id.tokenizer_hash = v.extract()?,
            "hidden_dim" => id.hidden_dim = v.extract()?,
            "num_layers" => id.num_layers = v.extract()?,
            "num_kv_heads" => id.num_kv_heads = v.extract()?,
            "head_dim" => id.head_dim = v.extract()?,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown identity field {other:?} (model_family, model_id, model_hash, \
                     tokenizer_hash, hidden_dim, num_layers, num_kv_heads, head_dim)"
                )));
            }
        }
    }
    Ok(id)
}

fn options(
    agent_id: &str,
    token: Option<String>,
    max_message: Option<u64>,
    shm_upgrade: bool,
) -> Options {
    let mut o = Options::default()
        .agent_id(agent_id)
        .tcp(TcpOptions::default().shm_upgrade(shm_upgrade));
    o.token = token;
    if let Some(m) = max_message {
        o = o.max_message(m);
    }
    o
}

/// A session as a dict: id, mode, transport, why, the peer.
fn session_dict<'py>(py: Python<'py>, s: &Session) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", &s.id)?;
    d.set_item("mode", s.mode.name())?;
    d.set_item("mode_reason", &s.mode_reason)?;
    d.set_item("transport", s.transport.name())?;
    d.set_item("transport_reason", &s.transport_reason)?;
    d.set_item("peer_agent", &s.peer_agent)?;
    d.set_item("max_message", s.max_message)?;
    Ok(d)
}

/// Listen at `address` (`shm://NAME`, `tcp://HOST:PORT`, `http://HOST:PORT`, …).
/// A `tcp://` listener offers peers on the same host shared memory unless
/// `shm_upgrade` is false.
#[pyfunction]
#[pyo3(signature = (address, *, token=None, agent_id="", identity=None, max_message=None, shm_upgrade=true))]
pub(crate) fn listen(
    address: &str,
    token: Option<String>,
    agent_id: &str,
    identity: Option<Bound<'_, PyDict>>,
    max_message: Option<u64>,
    shm_upgrade: bool,
) -> PyResult<Listener> {
    let id = self::identity(identity.as_ref())?;
    let l = Endpoint::bind(
        address,
        &id,
        options(agent_id, token, max_message, shm_upgrade),
    )
    .map_err(errors::transport)?;
    Ok(Listener(l))
}

/// Connect to a listener at `address` and handshake.
///
/// Over shared memory the sender owns a pool of `shm_slots` slots of
/// `shm_slot_size` bytes (default 4 x 16 MiB), reused message after message;
/// a larger message gets a segment of its own, whose fresh pages cost time on
/// first touch: size the slots to the messages you send often.
#[pyfunction]
#[pyo3(signature = (address, *, token=None, agent_id="", identity=None, max_message=None, timeout=10.0, shm_upgrade=true, shm_slots=None, shm_slot_size=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn connect(
    py: Python<'_>,
    address: &str,
    token: Option<String>,
    agent_id: &str,
    identity: Option<Bound<'_, PyDict>>,
    max_message: Option<u64>,
    timeout: f64,
    shm_upgrade: bool,
    shm_slots: Option<usize>,
    shm_slot_size: Option<usize>,
) -> PyResult<Sender> {
    let id = self::identity(identity.as_ref())?;
    let mut shm = ShmOptions::default();
    if let Some(n) = shm_slots {
        shm = shm.slots(n);
    }
    if let Some(b) = shm_slot_size {
        shm = shm.slot_size(b);
    }
    let opts = options(agent_id, token, max_message, shm_upgrade)
        .shm(shm)
        .connect_timeout(Duration::from_secs_f64(timeout.max(0.0)));
    let tx = py
        .detach(|| Endpoint::connect(address, &id, opts))
        .map_err(errors::transport)?;
    Ok(Sender {
        agent_id: agent_id.to_owned(),
        identity: id,
        obj: Arc::new(Mutex::new(SenderObj {
            loan: None,
            layout: None,
            tx: Box::new(tx),
            generation: 0,
        })),
    })
}

/// A bound endpoint; `accept` gives one receiver per connecting agent.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Listener(avp_transport::Listener);

#[pymethods]
impl Listener {
    /// The address peers connect to (with the port chosen for `…:0`).
    #[getter]
    fn address(&self) -> String {
        self.0.local_addr()
    }

    /// Wait for a peer (`timeout` seconds; None: forever) and handshake.
    #[pyo3(signature = (timeout=None))]
    fn accept(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Receiver> {
        let l = &self.0;
        let rx = wait(py, timeout, |t| l.accept(t))?;
        Ok(Receiver(Arc::new(rx)))
    }
}

/// The receiving half of a session; usable from several threads at once.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Receiver(Arc<avp_transport::Receiver>);

#[pymethods]
impl Receiver {
    /// The next message (`timeout` seconds; None: forever). Raises `PeerGone`
    /// when the sender left.
    #[pyo3(signature = (timeout=None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Message> {
        let rx = &self.0;
        let g = wait(py, timeout, |t| rx.recv(t))?;
        Message::new(py, g)
    }

    /// The next message if one is there, else None.
    fn try_recv(&self, py: Python<'_>) -> PyResult<Option<Message>> {
        match self.0.try_recv().map_err(errors::transport)? {
            Some(g) => Ok(Some(Message::new(py, g)?)),
            None => Ok(None),
        }
    }

    /// The session: id, mode, transport and why.
    #[getter]
    fn session<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        session_dict(py, self.0.session())
    }

    /// One line saying what was negotiated and why.
    fn explain(&self) -> String {
        self.0.session().explain()
    }

    /// The address range of memory shared with the sender, if any (to check
    /// that views point into it).
    #[getter]
    fn pool_range(&self) -> Option<(usize, usize)> {
        self.0.pool_range().map(|r| (r.start, r.end))
    }
}

/// The sending half of a session.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Sender {
    agent_id: String,
    identity: ModelIdentity,
    obj: Arc<Mutex<SenderObj>>,
}

impl Sender {
    /// Run `f` with the transport's sender and this sender's envelope, with
    /// the GIL released (refused while a loan is out).
    pub(crate) fn send_with(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut avp_transport::Sender, Envelope) -> PyResult<()> + Send,
    ) -> PyResult<()> {
        let envelope = self.envelope("", None)?;
        let obj = &self.obj;
        py.detach(|| {
            let mut o = lock(obj);
            o.idle()?;
            f(&mut o.tx, envelope)
        })
    }

    /// An envelope from this sender for `target`, with `extra`.
    fn envelope(&self, target: &str, extra: Option<Bound<'_, PyDict>>) -> PyResult<Envelope> {
        let mut e = Envelope {
            model_id: self.identity.model_id.clone(),
            model_hash: self.identity.model_hash.clone(),
            model_family: self.identity.model_family.clone(),
            tokenizer_hash: self.identity.tokenizer_hash.clone(),
            source_agent_id: self.agent_id.clone(),
            target_agent_id: target.to_owned(),
            ..Default::default()
        };
        if let Some(extra) = extra {
            for (k, v) in extra.iter() {
                e.extra.insert(k.extract()?, v.extract()?);
            }
        }
        e.session_id = lock(&self.obj).tx.session().id.clone();
        Ok(e)
    }
}

pub(crate) fn dtype_of(name: &str) -> PyResult<DType> {
    Ok(match name {
        "float32" | "f32" => DType::F32,
        "float16" | "f16" => DType::F16,
        "bfloat16" | "bf16" => DType::Bf16,
        other => {
            return Err(PyTypeError::new_err(format!(
                "dtype {other} is not sent (float32, float16, bfloat16)"
            )));
        }
    })
}

/// A C-contiguous array's bytes, its shape and its avp dtype.
pub(crate) struct Tensor {
    buf: PyBuffer<u8>,
    shape: Vec<usize>,
    dtype: DType,
}

fn tensor(py: Python<'_>, x: &Bound<'_, PyAny>, what: &str) -> PyResult<Tensor> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("ascontiguousarray", (x,))?;
    let name: String = arr.getattr("dtype")?.getattr("name")?.extract()?;
    let dtype = dtype_of(&name).map_err(|e| PyTypeError::new_err(format!("{what}: {e}")))?;
    let shape: Vec<usize> = arr.getattr("shape")?.extract()?;
    let flat = arr
        .call_method1("reshape", (-1,))?
        .call_method1("view", ("uint8",))?;
    let buf = PyBuffer::<u8>::get(&flat)?;
    Ok(Tensor { buf, shape, dtype })
}

/// A Hugging Face style cache (a sequence of `(K, V)` per layer, each
/// `[1, heads, seq, head_dim]` or `[heads, seq, head_dim]`): its description
/// and each tensor's bytes (K, V per layer).
pub(crate) fn kv_cache(
    py: Python<'_>,
    past_key_values: &Bound<'_, PyAny>,
) -> PyResult<(KvCacheDesc, Vec<Tensor>)> {
    let layers = past_key_values
        .cast::<PySequence>()
        .map_err(|_| PyTypeError::new_err("past_key_values must be a sequence of (K, V)"))?;
    let n = layers.len()?;
    if n == 0 {
        return Err(PyValueError::new_err("past_key_values is empty"));
    }
    let mut tensors = Vec::with_capacity(2 * n);
    for l in 0..n {
        let kv = layers.get_item(l)?;
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = kv
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("layer {l}: expected a (K, V) pair")))?;
        tensors.push(tensor(py, &k, &format!("layer {l} K"))?);
        tensors.push(tensor(py, &v, &format!("layer {l} V"))?);
    }
    let first = &tensors[0];
    let shape = match first.shape.as_slice() {
        [1, h, s, d] | [h, s, d] => [*h, *s, *d],
        other => {
            return Err(PyValueError::new_err(format!(
                "K and V must be [1, heads, seq, head_dim] or [heads, seq, head_dim], not {other:?}"
            )));
        }
    };
    for (i, t) in tensors.iter().enumerate() {
        let same = match t.shape.as_slice() {
            [1, h, s, d] | [h, s, d] => [*h, *s, *d] == shape,
            _ => false,
        };
        if !same || t.dtype != first.dtype {
            return Err(PyValueError::new_err(format!(
                "layer {} {}: shape {:?} {:?} differs from layer 0 K's {:?} {:?}",
                i / 2,
                if i % 2 == 0 { "K" } else { "V" },
                t.shape,
                t.dtype,
                first.shape,
                first.dtype
            )));
        }
    }
    let desc = KvCacheDesc::new(
        n as u32,
        shape[0] as u32,
        shape[2] as u32,
        shape[1] as u64,
        first.dtype,
        KvLayout::Hnd,
    );
    Ok((desc, tensors))
}

/// The byte slices of `tensors`.
///
/// # Safety
/// The slices are valid while `tensors` lives (each PyBuffer keeps its array
/// exported); nobody may resize the arrays meanwhile.
pub(crate) unsafe fn slices(tensors: &[Tensor]) -> Vec<&[u8]> {
    tensors
        .iter()
        // SAFETY: per this function's contract: each buffer is a C-contiguous
        // byte view that its PyBuffer keeps exported.
        .map(|t| unsafe {
            std::slice::from_raw_parts(t.buf.buf_ptr() as *const u8, t.buf.len_bytes())
        })
        .collect()
}

#[pymethods]
impl Sender {
    /// Send a Hugging Face style KV cache: a sequence of `(K, V)` per layer,
    /// each `[batch=1, heads, seq, head_dim]` (or `[heads, seq, head_dim]`),
    /// float32, float16 or bfloat16 (NumPy arrays or anything `np.asarray`
    /// takes, such as CPU torch tensors). One copy: into the transport's
    /// memory (shared memory), or none at all (TCP writes from the arrays).
    #[pyo3(signature = (past_key_values, *, target_agent_id="", extra=None))]
    fn send_kv(
        &self,
        py: Python<'_>,
        past_key_values: &Bound<'_, PyAny>,
        target_agent_id: &str,
        extra: Option<Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let (desc, tensors) = kv_cache(py, past_key_values)?;
        let envelope = self.envelope(target_agent_id, extra)?;
        let obj = &self.obj;
        py.detach(|| {
            let mut obj = lock(obj);
            obj.idle()?;
            let layout =
                MessageLayout::new(&envelope, &Payload::KvCache(desc)).map_err(errors::wire)?;
            // SAFETY: `tensors` lives until this closure returns.
            let parts = unsafe { slices(&tensors) };
            obj.tx
                .send_sections(&layout, &parts)
                .map_err(errors::transport)
        })
    }

    /// Loan memory for a KV cache of `num_layers` layers of
    /// `[num_kv_heads, seq_len, head_dim]` and fill it in place
    /// (`loan.k(layer).numpy()[...] = …`), then `loan.send()`: no copy at all.
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, seq_len, dtype="float16", *, target_agent_id="", extra=None))]
    #[allow(clippy::too_many_arguments)]
    fn loan_kv(
        &self,
        py: Python<'_>,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        seq_len: u64,
        dtype: &str,
        target_agent_id: &str,
        extra: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Loan> {
        let desc = KvCacheDesc::new(
            num_layers,
            num_kv_heads,
            head_dim,
            seq_len,
            dtype_of(dtype)?,
            KvLayout::Hnd,
        );
        let envelope = self.envelope(target_agent_id, extra)?;
        let layout =
            MessageLayout::new(&envelope, &Payload::KvCache(desc)).map_err(errors::wire)?;
        let obj = &self.obj;
        let generation = py.detach(|| {
            let mut o = lock(obj);
            o.idle()?;
            o.start(layout).map_err(errors::transport)
        })?;
        Loan::new(self.obj.clone(), generation, desc)
    }

    /// Send an encoded v2 message as it is.
    fn send_bytes(&self, py: Python<'_>, message: &[u8]) -> PyResult<()> {
        let obj = &self.obj;
        py.detach(|| {
            let mut obj = lock(obj);
            obj.idle()?;
            obj.tx.send_bytes(message).map_err(errors::transport)
        })
    }

    /// The session: id, mode, transport and why.
    #[getter]
    fn session<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        session_dict(py, lock(&self.obj).tx.session())
    }

    /// One line saying what was negotiated and why.
    fn explain(&self) -> String {
        lock(&self.obj).tx.session().explain()
    }
}
