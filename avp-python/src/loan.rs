//! Loans: memory for one message borrowed from the transport (a shared-memory
//! slot, or a buffer), whose sections Python fills in place through writable
//! NumPy arrays or DLPack tensors, then sends. `send()` refuses while any
//! array still views the loan; views of a loan that was sent or abandoned
//! raise `MessageReleased`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use avp_wire::{DType, KvCacheDesc, MessageLayout, SectionRole};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::dlpack;
use crate::errors::{self, MessageReleased, ViewsAlive};
use crate::message::{Exporter, c_strides, dtype_info};

/// A sender and the loan it may have out. Field order is drop order: the loan
/// borrows the boxed layout and sender.
pub(crate) struct SenderObj {
    pub(crate) loan: Option<avp_transport::Loan<'static>>,
    pub(crate) layout: Option<Box<MessageLayout>>,
    pub(crate) tx: Box<avp_transport::Sender>,
    /// Incremented per loan: views of an earlier loan never touch a later one.
    pub(crate) generation: u64,
}

impl SenderObj {
    /// `Err` while a loan is out.
    pub(crate) fn idle(&self) -> PyResult<()> {
        match self.loan {
            Some(_) => Err(errors::AvpError::new_err(
                "a loan is outstanding on this sender: send() or abandon() it first",
            )),
            None => Ok(()),
        }
    }

    /// Loan memory for `layout`.
    pub(crate) fn start(
        &mut self,
        layout: MessageLayout,
    ) -> Result<u64, avp_transport::TransportError> {
        let layout = Box::new(layout);
        let layout_ref: *const MessageLayout = &*layout;
        let tx: *mut avp_transport::Sender = &mut *self.tx;
        // SAFETY: the loan borrows the boxed sender and layout, which live in
        // this object and are dropped after it (field order); the sender is not
        // used otherwise while the loan exists (every other use checks `idle`).
        let loan = unsafe { (*tx).loan(&*layout_ref)? };
        self.layout = Some(layout);
        self.loan = Some(loan);
        self.generation += 1;
        Ok(self.generation)
    }

    /// Give the loan back unsent.
    pub(crate) fn abandon(&mut self) {
        self.loan = None;
        self.layout = None;
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a loan and its views share.
struct LoanState {
    obj: Arc<Mutex<SenderObj>>,
    generation: u64,
    exports: AtomicUsize,
}

/// An export's hold on a loan: counted while it lives.
struct Hold(Arc<LoanState>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.exports.fetch_sub(1, Ordering::AcqRel);
    }
}

fn gone() -> PyErr {
    MessageReleased::new_err(
        "the loan was sent or abandoned: its sections cannot be written any more",
    )
}

impl LoanState {
    /// The writable bytes of section `index` and an export holding them.
    fn export(self: &Arc<Self>, index: usize) -> PyResult<(*mut u8, usize, Hold)> {
        let mut obj = lock(&self.obj);
        if obj.generation != self.generation {
            return Err(gone());
        }
        let loan = obj.loan.as_mut().ok_or_else(gone)?;
        let s = loan.writer().section_mut(index).map_err(errors::wire)?;
        self.exports.fetch_add(1, Ordering::AcqRel);
        Ok((s.as_mut_ptr(), s.len(), Hold(self.clone())))
    }
}

/// Memory for one KV cache, filled in place: `loan.kv.k(layer)` and
/// `loan.kv.v(layer)` give writable arrays; `send()` checksums and sends.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct Loan {
    state: Arc<LoanState>,
    desc: KvCacheDesc,
    sections: Vec<(SectionRole, u32, usize)>,
}

impl Loan {
    pub(crate) fn new(
        obj: Arc<Mutex<SenderObj>>,
        generation: u64,
        desc: KvCacheDesc,
    ) -> PyResult<Loan> {
        let sections = {
            let o = lock(&obj);
            let layout = o.layout.as_ref().ok_or_else(gone)?;
            (0..layout.section_count())
                .map(|i| {
                    let s = layout.section(i);
                    (s.role, s.layer, i)
                })
                .collect()
        };
        Ok(Loan {
            state: Arc::new(LoanState {
                obj,
                generation,
                exports: AtomicUsize::new(0),
            }),
            desc,
            sections,
        })
    }

    fn section(&self, role: SectionRole, layer: u32) -> PyResult<LoanSection> {
        let index = self
            .sections
            .iter()
            .find(|(r, l, _)| *r == role && *l == layer)
            .map(|s| s.2)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "layer {layer} is not in this loan (it holds layers {}..{})",
                    self.desc.layers.start, self.desc.layers.end
                ))
            })?;
        let (h, s, d) = (
            self.desc.num_kv_heads as usize,
            self.desc.seq_len as usize,
            self.desc.head_dim as usize,
        );
        Ok(LoanSection {
            state: self.state.clone(),
            index,
            shape: vec![h, s, d],
            dtype: self.desc.dtype,
        })
    }
}

#[pymethods]
impl Loan {
    /// K of `layer`, writable, `[heads, seq, head_dim]`.
    fn k(&self, layer: u32) -> PyResult<LoanSection> {
        self.section(SectionRole::Key, layer)
    }

    /// V of `layer`, writable, `[heads, seq, head_dim]`.
    fn v(&self, layer: u32) -> PyResult<LoanSection> {
        self.section(SectionRole::Value, layer)
    }

    /// Arrays and tensors now viewing this loan.
    #[getter]
    fn exports(&self) -> usize {
        self.state.exports.load(Ordering::Acquire)
    }

    /// Checksum, seal and send. Raises `ViewsAlive` while arrays view the loan
    /// (delete them first: after sending, the memory is the receiver's).
    fn send(&self, py: Python<'_>) -> PyResult<()> {
        let state = self.state.clone();
        py.detach(move || {
            let mut obj = lock(&state.obj);
            if obj.generation != state.generation || obj.loan.is_none() {
                return Err(gone());
            }
            let n = state.exports.load(Ordering::Acquire);
            if n > 0 {
                return Err(ViewsAlive::new_err(format!(
                    "{n} arrays or tensors still view this loan: delete them before send()"
                )));
            }
            let loan = obj.loan.take().expect("checked above");
            let sent = loan.finish().and_then(|r| r.send());
            obj.layout = None;
            sent.map_err(errors::transport)
        })
    }

    /// Give the memory back unsent (also what leaving a `with` block without
    /// `send()` does).
    fn abandon(&self) -> PyResult<()> {
        let mut obj = lock(&self.state.obj);
        if obj.generation == self.state.generation && obj.loan.is_some() {
            let n = self.state.exports.load(Ordering::Acquire);
            if n > 0 {
                return Err(ViewsAlive::new_err(format!(
                    "{n} arrays or tensors still view this loan: delete them before abandon()"
                )));
            }
            obj.abandon();
        }
        Ok(())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (_exc_type=None, _exc=None, _tb=None))]
    fn __exit__(
        &self,
        _exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        self.abandon().map(|()| false)
    }
}

/// One writable section of a loan.
#[pyclass(frozen, module = "avp_rs")]
pub(crate) struct LoanSection {
    state: Arc<LoanState>,
    index: usize,
    shape: Vec<usize>,
    dtype: DType,
}

#[pymethods]
impl LoanSection {
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.shape)
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_info(self.dtype).0
    }

    /// A writable NumPy array over the section in the loaned memory.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (ptr, len, hold) = self.state.export(self.index)?;
        let item = self.dtype.size();
        Exporter {
            _hold: Box::new(hold),
            writable: true,
            ptr,
            len,
            itemsize: item as isize,
            format: dtype_info(self.dtype).1,
            shape: self.shape.iter().map(|&n| n as isize).collect(),
            strides: c_strides(&self.shape)
                .iter()
                .map(|&s| (s * item) as isize)
                .collect(),
        }
        .into_array(py, self.dtype)
    }

    #[pyo3(signature = (dtype=None, copy=None))]
    fn __array__<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let arr = self.numpy(py)?;
        match (dtype, copy) {
            (Some(d), _) => arr.call_method1("astype", (d,)),
            (None, Some(true)) => arr.call_method0("copy"),
            _ => Ok(arr),
        }
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (dlpack::CPU, 0)
    }

    /// A writable DLPack capsule over the section (no copy).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<Bound<'_, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = stream;
        if dl_device.is_some_and(|d| d != (dlpack::CPU, 0)) || copy == Some(true) {
            return Err(PyBufferError::new_err(
                "a loan's section is exported in place, on the CPU (no copy, no other device)",
            ));
        }
        let (ptr, _, hold) = self.state.export(self.index)?;
        let ctx = dlpack::Ctx {
            _keep: Box::new(hold),
            shape: self.shape.iter().map(|&n| n as i64).collect(),
            strides: c_strides(&self.shape).iter().map(|&n| n as i64).collect(),
        };
        let versioned = matches!(max_version, Some((m, _)) if m >= 1);
        dlpack::capsule(py, ptr, dtype_info(self.dtype).2, ctx, versioned, 0)
    }
}
