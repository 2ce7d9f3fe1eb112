//! Received messages and zero-copy views of their sections.
//!
//! A [`Message`] holds the transport's receive guard; its sections are read
//! through NumPy arrays and DLPack capsules that point into the transport's
//! memory (no copy). Each such array or capsule counts as an export: while any
//! lives, `release()` refuses (`ViewsAlive`), and a message dropped with
//! exports alive gives its memory back only when the last one goes. Once
//! released, every view raises `MessageReleased` instead of reading.

use std::ffi::{CStr, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use avp_transport::RecvGuard;
use avp_wire::{DType, KvLayout, Payload};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple};

use crate::dlpack;
use crate::errors::{self, MessageReleased, ViewsAlive};

/// The bytes of a message: a transport's receive guard, or a decoded copy.
pub(crate) enum Held {
    Guard(Box<RecvGuard>),
    Bytes(Vec<u8>),
}

impl Held {
    /// Parse (or, for a guard, return) the message.
    fn with<T>(&self, f: impl FnOnce(&avp_wire::Message<'_>) -> PyResult<T>) -> PyResult<T> {
        match self {
            Held::Guard(g) => f(g.message()),
            Held::Bytes(b) => f(&avp_wire::Message::parse(b).map_err(errors::wire)?),
        }
    }
}

/// What a message and all its views share.
pub(crate) struct Inner {
    guard: Mutex<Option<Held>>,
    exports: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn released() -> PyErr {
    MessageReleased::new_err(
        "the message was released: its sections cannot be read any more (copy what you keep before release)",
    )
}

/// Which section a view reads.
#[derive(Clone, Copy, Debug)]
enum Part {
    K(u32),
    V(u32),
    Hidden,
}

/// An export's hold on the message: counted while it lives.
struct Export(Arc<Inner>);

impl Drop for Export {
    fn drop(&mut self) {
        self.0.exports.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// The bytes of `part` and an export holding them, taken under the lock
    /// `release` takes.
    fn export(self: &Arc<Self>, part: Part) -> PyResult<(*const u8, usize, Export)> {
        let g = lock(&self.guard);
        let g = g.as_ref().ok_or_else(released)?;
        let (ptr, len) = g.with(|m| {
            let bytes = match part {
                Part::K(l) => m.kv().and_then(|kv| kv.k(l)),
                Part::V(l) => m.kv().and_then(|kv| kv.v(l)),
                Part::Hidden => m.hidden().map(|h| h.data()),
            }
            .map_err(errors::wire)?;
            Ok((bytes.as_ptr(), bytes.len()))
        })?;
        self.exports.fetch_add(1, Ordering::AcqRel);
        Ok((ptr, len, Export(self.clone())))
    }
}

/// NumPy's name of a dtype, and its buffer-protocol format and DLPack type.
pub(crate) fn dtype_info(d: DType) -> (&'static str, &'static CStr, dlpack::DLDataType) {
    let t = |code, bits| dlpack::DLDataType {
        code,
        bits,
        lanes: 1,
    };
    match d {
        DType::F32 => ("float32", c"f", t(2, 32)),
        DType::F16 => ("float16", c"e", t(2, 16)),
        // PEP 3118 has no bfloat16: its bits as uint16, viewed as
        // ml_dtypes.bfloat16 when that is installed.
        DType::Bf16 => ("bfloat16", c"H", t(4, 16)),
        DType::I8 => ("int8", c"b", t(0, 8)),
    }
}

/// `ml_dtypes.bfloat16`, if installed.
fn bfloat16(py: Python<'_>) -> Option<Bound<'_, PyAny>> {
    static BF16: PyOnceLock<Option<Py<PyAny>>> = PyOnceLock::new();
    BF16.get_or_init(py, || {
        py.import("ml_dtypes")
            .and_then(|m| m.getattr("bfloat16"))
            .ok()
            .map(Bound::unbind)
    })
    .as_ref()
    .map(|t| t.bind(py).clone())
}

/// A received message. A context manager: leaving the block releases it.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Message {
    inner: Arc<Inner>,
    payload: Payload,
    envelope: Py<PyDict>,
    total_len: usize,
    version: u8,
}

impl Message {
    pub(crate) fn new(py: Python<'_>, guard: RecvGuard) -> PyResult<Message> {
        if guard.on_device() {
            return Err(errors::AvpError::new_err(
                "this message's sections are in device memory, which avp_rs does not read yet",
            ));
        }
        Self::from_held(py, Held::Guard(Box::new(guard)), 2)
    }

    /// A message over `held`, which was `version` on the wire.
    pub(crate) fn from_held(py: Python<'_>, held: Held, version: u8) -> PyResult<Message> {
        let (payload, envelope, total_len) = held.with(|m| {
            let e = m.envelope();
            let d = PyDict::new(py);
            d.set_item("model_id", e.model_id())?;
            d.set_item("model_hash", e.model_hash())?;
            d.set_item("model_family", e.model_family())?;
            d.set_item("tokenizer_hash", e.tokenizer_hash())?;
            d.set_item("session_id", e.session_id())?;
            d.set_item("source_agent_id", e.source_agent_id())?;
            d.set_item("target_agent_id", e.target_agent_id())?;
            let extra = PyDict::new(py);
            for (k, v) in e.extra() {
                extra.set_item(k, v)?;
            }
            d.set_item("extra", extra)?;
            Ok((m.payload(), d.unbind(), m.total_len() as usize))
        })?;
        Ok(Message {
            inner: Arc::new(Inner {
                guard: Mutex::new(Some(held)),
                exports: AtomicUsize::new(0),
            }),
            payload,
            envelope,
            total_len,
            version,
        })
    }
}

impl Message {
    pub(crate) fn kind_name(&self) -> &'static str {
        self.payload.kind_name()
    }

    /// A copy of the message's v2 bytes.
    pub(crate) fn bytes(&self) -> PyResult<Vec<u8>> {
        let g = lock(&self.inner.guard);
        let g = g.as_ref().ok_or_else(released)?;
        g.with(|m| Ok(m.as_bytes().to_vec()))
    }

    pub(crate) fn envelope_dict(&self, py: Python<'_>) -> Py<PyDict> {
        self.envelope.clone_ref(py)
    }
}

#[pymethods]
impl Message {
    /// "kv_cache", "hidden_state" or "text".
    #[getter]
    fn kind(&self) -> &'static str {
        self.payload.kind_name()
    }

    /// The envelope: model, session and agent ids, extras.
    #[getter]
    fn envelope(&self, py: Python<'_>) -> Py<PyDict> {
        self.envelope.clone_ref(py)
    }

    /// Bytes of the whole message (in the v2 format).
    #[getter]
    fn nbytes(&self) -> usize {
        self.total_len
    }

    /// The wire format it came in: 2, or 1 (the Python reference's, converted).
    #[getter]
    fn version(&self) -> u8 {
        self.version
    }

    /// The message's v2 bytes (a copy).
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let g = lock(&self.inner.guard);
        let g = g.as_ref().ok_or_else(released)?;
        g.with(|m| Ok(pyo3::types::PyBytes::new(py, m.as_bytes())))
    }

    /// The message in the reference's v1 format (`AVPContext.from_bytes` and
    /// `avp.codec.decode` read it).
    fn to_v1<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let g = lock(&self.inner.guard);
        let g = g.as_ref().ok_or_else(released)?;
        g.with(|m| {
            let v1 =
                avp_wire::v1::from_v2(m, avp_wire::v1::Compression::None).map_err(errors::wire)?;
            Ok(pyo3::types::PyBytes::new(py, &v1))
        })
    }

    /// Arrays and tensors now viewing this message.
    #[getter]
    fn exports(&self) -> usize {
        self.inner.exports.load(Ordering::Acquire)
    }

    /// Whether the message was released.
    #[getter]
    fn released(&self) -> bool {
        lock(&self.inner.guard).is_none()
    }

    /// The KV cache (a `kv_cache` message).
    #[getter]
    fn kv(&self) -> PyResult<KvView> {
        match &self.payload {
            Payload::KvCache(desc) => Ok(KvView {
                inner: self.inner.clone(),
                desc: *desc,
            }),
            other => Err(PyValueError::new_err(format!(
                "this message carries {}, not a KV cache",
                other.kind_name()
            ))),
        }
    }

    /// The hidden states, `[rows, dim]` (a `hidden_state` message).
    #[getter]
    fn hidden(&self) -> PyResult<Section> {
        match &self.payload {
            Payload::HiddenState(h) => Ok(Section {
                inner: self.inner.clone(),
                part: Part::Hidden,
                shape: vec![h.rows as usize, h.dim as usize],
                dtype: h.dtype,
            }),
            other => Err(PyValueError::new_err(format!(
                "this message carries {}, not a hidden state",
                other.kind_name()
            ))),
        }
    }

    /// The text (a `text` message), copied into a `str`.
    #[getter]
    fn text(&self) -> PyResult<String> {
        let g = lock(&self.inner.guard);
        let g = g.as_ref().ok_or_else(released)?;
        g.with(|m| {
            let t = m.text().map_err(errors::wire)?;
            Ok(t.as_str().map_err(errors::wire)?.to_owned())
        })
    }

    /// Check every section's checksum (`WireError` on a mismatch).
    pub(crate) fn verify(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        py.detach(move || {
            let g = lock(&inner.guard);
            let g = g.as_ref().ok_or_else(released)?;
            g.with(|m| m.verify().map_err(errors::wire))
        })
    }

    /// Give the memory back to the transport now. Raises `ViewsAlive` while
    /// arrays or tensors view it (delete them, or copy what you keep).
    fn release(&self) -> PyResult<()> {
        let mut g = lock(&self.inner.guard);
        let n = self.inner.exports.load(Ordering::Acquire);
        if n > 0 {
            return Err(ViewsAlive::new_err(format!(
                "{n} arrays or tensors still view this message: delete them (or copy what you keep) before release"
            )));
        }
        g.take();
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Release on leaving the block; with an exception in flight and views
    /// alive, the memory goes back when the last view goes instead.
    #[pyo3(signature = (exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        match self.release() {
            Err(_) if exc_type.is_some_and(|t| !t.is_none()) => Ok(false),
            r => r.map(|()| false),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<avp_rs.Message {} of {} bytes{}>",
            self.payload.kind_name(),
            self.total_len,
            if self.released() { ", released" } else { "" }
        )
    }
}

/// A received KV cache: `k(layer)` and `v(layer)` are sections.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct KvView {
    inner: Arc<Inner>,
    desc: avp_wire::KvCacheDesc,
}

impl KvView {
    fn section(&self, layer: u32, part: Part) -> PyResult<Section> {
        if !(self.desc.layers.start..self.desc.layers.end).contains(&layer) {
            return Err(PyValueError::new_err(format!(
                "layer {layer} is not in this message (it holds layers {}..{})",
                self.desc.layers.start, self.desc.layers.end
            )));
        }
        let (h, s, d) = (
            self.desc.num_kv_heads as usize,
            self.desc.seq_len as usize,
            self.desc.head_dim as usize,
        );
        let shape = match self.desc.layout {
            KvLayout::Hnd => vec![h, s, d],
            KvLayout::Nhd => vec![s, h, d],
        };
        Ok(Section {
            inner: self.inner.clone(),
            part,
            shape,
            dtype: self.desc.dtype,
        })
    }
}

#[pymethods]
impl KvView {
    /// K of `layer`: `[heads, seq, head_dim]` (HND) or `[seq, heads, head_dim]` (NHD).
    fn k(&self, layer: u32) -> PyResult<Section> {
        self.section(layer, Part::K(layer))
    }

    /// V of `layer`, shaped as `k`.
    fn v(&self, layer: u32) -> PyResult<Section> {
        self.section(layer, Part::V(layer))
    }

    #[getter]
    fn num_layers(&self) -> u32 {
        self.desc.num_layers
    }
    /// The layers this message holds, `(start, end)`.
    #[getter]
    fn layers(&self) -> (u32, u32) {
        (self.desc.layers.start, self.desc.layers.end)
    }
    #[getter]
    fn num_kv_heads(&self) -> u32 {
        self.desc.num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> u32 {
        self.desc.head_dim
    }
    #[getter]
    fn seq_len(&self) -> u64 {
        self.desc.seq_len
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_info(self.desc.dtype).0
    }
    /// "hnd" or "nhd".
    #[getter]
    fn layout(&self) -> &'static str {
        match self.desc.layout {
            KvLayout::Hnd => "hnd",
            KvLayout::Nhd => "nhd",
        }
    }
}

/// One section of a received message: its shape and dtype, and zero-copy,
/// read-only views of its bytes (`numpy()`, `np.asarray(s)`, `__dlpack__`).
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Section {
    inner: Arc<Inner>,
    part: Part,
    shape: Vec<usize>,
    dtype: DType,
}

impl Section {
    fn strides(&self) -> Vec<usize> {
        c_strides(&self.shape)
    }
}

#[pymethods]
impl Section {
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    /// NumPy's name of the element type ("float32", "float16", "bfloat16", "int8").
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_info(self.dtype).0
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }

    /// A read-only NumPy array over the section's bytes in the transport's
    /// memory (no copy). bf16 comes as `ml_dtypes.bfloat16` when that is
    /// installed, else as its bits (`uint16`).
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (ptr, len, export) = self.inner.export(self.part)?;
        let (_, format, _) = dtype_info(self.dtype);
        let item = self.dtype.size();
        let exporter = Exporter {
            _hold: Box::new(export),
            writable: false,
            ptr,
            len,
            itemsize: item as isize,
            format,
            shape: self.shape.iter().map(|&n| n as isize).collect(),
            strides: self
                .strides()
                .iter()
                .map(|&s| (s * item) as isize)
                .collect(),
        };
        exporter.into_array(py, self.dtype)
    }

    #[pyo3(signature = (dtype=None, copy=None))]
    fn __array__<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let arr = self.numpy(py)?;
        let arr = match dtype {
            Some(d) => arr.call_method1("astype", (d,))?,
            None => arr,
        };
        if copy == Some(true) {
            arr.call_method0("copy")
        } else {
            Ok(arr)
        }
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (dlpack::CPU, 0)
    }

    /// A DLPack capsule over the section (read-only, no copy; `copy=True`
    /// exports a private copy instead).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream; // CPU memory: nothing to synchronize.
        if let Some(d) = dl_device
            && d != (dlpack::CPU, 0)
        {
            return Err(PyBufferError::new_err(format!(
                "the section is in CPU memory; device {d:?} was asked for"
            )));
        }
        let versioned = matches!(max_version, Some((major, _)) if major >= 1);
        let (_, _, dtype) = dtype_info(self.dtype);
        let shape: Vec<i64> = self.shape.iter().map(|&n| n as i64).collect();
        let strides: Vec<i64> = self.strides().iter().map(|&n| n as i64).collect();
        let (ptr, len, export) = self.inner.export(self.part)?;
        if copy == Some(true) {
            // SAFETY: `export` keeps the section's `len` bytes at `ptr` alive.
            let owned: Vec<u8> = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
            drop(export);
            let data = owned.as_ptr();
            let ctx = dlpack::Ctx {
                _keep: Box::new(owned),
                shape,
                strides,
            };
            return dlpack::capsule(py, data, dtype, ctx, versioned, dlpack::IS_COPIED);
        }
        let ctx = dlpack::Ctx {
            _keep: Box::new(export),
            shape,
            strides,
        };
        dlpack::capsule(py, ptr, dtype, ctx, versioned, dlpack::READ_ONLY)
    }

    fn __repr__(&self) -> String {
        format!(
            "<avp_rs.Section {:?} {:?} {}>",
            self.part,
            self.shape,
            dtype_info(self.dtype).0
        )
    }
}

/// The buffer behind one NumPy array (private): alive as long as the array,
/// and counted as an export of what it views while it lives.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Exporter {
    pub(crate) _hold: Box<dyn Send + Sync>,
    pub(crate) writable: bool,
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
    pub(crate) itemsize: isize,
    pub(crate) format: &'static CStr,
    pub(crate) shape: Vec<isize>,
    pub(crate) strides: Vec<isize>,
}

// SAFETY: the pointer is into memory the export keeps alive (a received
// message, or a loan that cannot be sent while exports live); Rust never
// touches it here, Python reads (or, for a loan, writes) it through NumPy.
unsafe impl Send for Exporter {}
// SAFETY: as above; the fields are never changed after construction.
unsafe impl Sync for Exporter {}

impl Exporter {
    /// `np.asarray` over this exporter, as `dtype` (bf16 as
    /// `ml_dtypes.bfloat16` when installed).
    pub(crate) fn into_array(self, py: Python<'_>, dtype: DType) -> PyResult<Bound<'_, PyAny>> {
        let np = py.import("numpy")?;
        let arr = np.call_method1("asarray", (Bound::new(py, self)?,))?;
        match (dtype, bfloat16(py)) {
            (DType::Bf16, Some(bf)) => arr.call_method1("view", (bf,)),
            _ => Ok(arr),
        }
    }
}

/// C-order strides (in elements) of `shape`.
pub(crate) fn c_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

#[pymethods]
impl Exporter {
    /// # Safety
    /// Called by Python with a `Py_buffer` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        if flags & ffi::PyBUF_WRITABLE != 0 && !me.writable {
            return Err(PyBufferError::new_err(
                "received sections are read-only (copy to write)",
            ));
        }
        // SAFETY: `view` is a valid Py_buffer to fill; every pointer stored in
        // it points into `me`, which `view.obj` keeps alive, or into the
        // message memory its export keeps alive.
        unsafe {
            (*view).buf = me.ptr as *mut c_void;
            (*view).len = me.len as isize;
            (*view).readonly = c_int::from(!me.writable);
            (*view).itemsize = me.itemsize;
            (*view).format = if flags & ffi::PyBUF_FORMAT != 0 {
                me.format.as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = me.shape.len() as c_int;
            (*view).shape = if flags & ffi::PyBUF_ND != 0 {
                me.shape.as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                me.strides.as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
            (*view).obj = slf.clone().into_any().into_ptr();
        }
        Ok(())
    }

    /// # Safety
    /// Called by Python when a buffer is released.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
