//! Listeners, receivers and senders.

use std::ffi::c_char;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use avp_transport::{
    DeviceLoan, Endpoint, Listener, Loan, Receiver, Sender, Session, TransportKind,
};
use avp_wire::{MessageLayout, Mode, Payload};

use crate::message::{MESSAGES, MessageObj};
use crate::registry::{Table, lock};
use crate::status::{Error, avp_status, ffi};
use crate::types::{
    self, avp_envelope, avp_identity, avp_mode, avp_options, avp_payload, avp_session_info,
    avp_transport_kind,
};

/// A listening endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_listener {
    /// Opaque, generation-checked; 0 is never a live handle.
    pub id: u64,
}

/// The receiving half of a session.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_receiver {
    /// Opaque, generation-checked; 0 is never a live handle.
    pub id: u64,
}

/// The sending half of a session.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_sender {
    /// Opaque, generation-checked; 0 is never a live handle.
    pub id: u64,
}

pub(crate) static LISTENERS: Table<Arc<Listener>> = Table::new(1, "avp_listener");
pub(crate) static RECEIVERS: Table<ReceiverObj> = Table::new(2, "avp_receiver");
static SENDERS: Table<SenderObj> = Table::new(3, "avp_sender");

pub(crate) struct ReceiverObj {
    /// Shared with calls in progress: a receive waits without the object's lock.
    pub rx: Arc<Receiver>,
    /// Messages received and not yet released.
    pub held: Arc<AtomicUsize>,
}

struct SenderObj {
    // Field order is drop order: the loans borrow the layout and the sender.
    loan: Option<Loan<'static>>,
    device_loan: Option<DeviceLoan<'static>>,
    layout: Option<Box<MessageLayout>>,
    tx: Box<Sender>,
    session: Session,
}

impl SenderObj {
    /// `Err(BUSY)` while a loan of either kind is outstanding.
    fn idle(&self) -> Result<(), Error> {
        if self.loan.is_some() || self.device_loan.is_some() {
            return Err(Error::new(
                avp_status::AVP_ERR_BUSY,
                "a loan is already outstanding on this sender",
            ));
        }
        Ok(())
    }
}

fn ms(t: u32) -> Duration {
    Duration::from_millis(t as u64)
}

fn session_info(s: &Session) -> avp_session_info {
    let mut info = avp_session_info {
        session_id: [0; 40],
        mode: match s.mode {
            Mode::Latent => avp_mode::AVP_MODE_LATENT,
            Mode::CrossModel => avp_mode::AVP_MODE_CROSS_MODEL,
            Mode::Json => avp_mode::AVP_MODE_JSON,
        },
        transport: match s.transport {
            TransportKind::Shm => avp_transport_kind::AVP_TRANSPORT_SHM,
            TransportKind::Tcp => avp_transport_kind::AVP_TRANSPORT_TCP,
            TransportKind::Cuda => avp_transport_kind::AVP_TRANSPORT_CUDA,
            TransportKind::Rdma => avp_transport_kind::AVP_TRANSPORT_RDMA,
            TransportKind::Http => avp_transport_kind::AVP_TRANSPORT_HTTP,
        },
        max_message: s.max_message,
        map_id: [0; 64],
        mode_reason: [0; 256],
        transport_reason: [0; 256],
    };
    types::fill(&mut info.session_id, &s.id);
    types::fill(&mut info.map_id, &s.map_id);
    types::fill(
        &mut info.mode_reason,
        &format!("{}: {}", s.path, s.mode_reason),
    );
    types::fill(&mut info.transport_reason, &s.transport_reason);
    info
}

/// Listen at `address` ("shm://NAME", "tcp://HOST:PORT", "cuda://NAME" or
/// "rdma://HOST:PORT"; port 0 picks one).
///
/// `identity` and `options` may be NULL (unknown identity, default options).
/// On success `*out` holds a listener to free with `avp_listener_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_listener_bind(
    address: *const c_char,
    identity: *const avp_identity,
    options: *const avp_options,
    out: *mut avp_listener,
) -> avp_status {
    ffi(|| {
        // SAFETY: pointers are NULL or valid per the header's contract.
        let (addr, id, opts) = unsafe { types::endpoint_args(address, identity, options)? };
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let l = Endpoint::bind(&addr, &id, opts)?;
        let handle = avp_listener {
            id: LISTENERS.insert(Arc::new(l))?,
        };
        // SAFETY: checked non-NULL above.
        unsafe { types::put(out, "out", handle) }
    })
}

/// Copy the address peers connect to (with the real port) into `buf`
/// (`cap` bytes, NUL-terminated). `*needed` (if not NULL) receives the size
/// required including the NUL; AVP_ERR_BUFFER_TOO_SMALL when `cap` is smaller.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_listener_address(
    listener: avp_listener,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> avp_status {
    ffi(|| {
        let l = LISTENERS.get(listener.id)?;
        let a = lock(&l).local_addr();
        // SAFETY: `needed` is NULL or writable; `buf` is checked below.
        unsafe { copy_out(&a, buf, cap, needed) }
    })
}

/// # Safety
/// `buf` is NULL or valid for `cap` bytes; `needed` is NULL or writable.
pub(crate) unsafe fn copy_out(
    s: &str,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> Result<(), Error> {
    if !needed.is_null() {
        // SAFETY: non-NULL and writable per the contract.
        unsafe { needed.write(s.len() + 1) };
    }
    if buf.is_null() {
        return Err(Error::null("buf"));
    }
    if cap < s.len() + 1 {
        return Err(Error::new(
            avp_status::AVP_ERR_BUFFER_TOO_SMALL,
            format!("{} bytes needed, {cap} given", s.len() + 1),
        ));
    }
    // SAFETY: buf has room for len + 1 bytes (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// Wait up to `timeout_ms` for a peer, handshake, and return the receiving half in `*out`.
/// A peer that fails the handshake yields an error; call again to keep serving.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_listener_accept(
    listener: avp_listener,
    timeout_ms: u32,
    out: *mut avp_receiver,
) -> avp_status {
    ffi(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let l = LISTENERS.get(listener.id)?;
        // Accept without the listener's lock, so that freeing it never waits.
        let l = Arc::clone(&lock(&l));
        let rx = l.accept(ms(timeout_ms))?;
        let handle = avp_receiver {
            id: RECEIVERS.insert(ReceiverObj {
                rx: Arc::new(rx),
                held: Arc::default(),
            })?,
        };
        // SAFETY: checked non-NULL above.
        unsafe { types::put(out, "out", handle) }
    })
}

/// Close a listener and remove its socket. Receivers it accepted stay usable.
#[unsafe(no_mangle)]
pub extern "C" fn avp_listener_free(listener: avp_listener) -> avp_status {
    ffi(|| LISTENERS.remove_if(listener.id, |_| Ok(())).map(drop))
}

/// What the receiver's handshake negotiated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_receiver_session(
    receiver: avp_receiver,
    out: *mut avp_session_info,
) -> avp_status {
    ffi(|| {
        let r = RECEIVERS.get(receiver.id)?;
        let info = session_info(lock(&r).rx.session());
        // SAFETY: `put` checks NULL; the caller passes writable memory.
        unsafe { types::put(out, "out", info) }
    })
}

/// The address range of the shared slot pool this receiver maps (shared memory
/// only; AVP_ERR_INVALID_ARGUMENT over TCP). Received section pointers lie inside it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_receiver_pool_range(
    receiver: avp_receiver,
    start: *mut *const u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        if start.is_null() || len.is_null() {
            return Err(Error::null("start and len"));
        }
        let r = RECEIVERS.get(receiver.id)?;
        let range = lock(&r)
            .rx
            .pool_range()
            .ok_or_else(|| Error::arg("not a shared-memory session"))?;
        // SAFETY: both checked non-NULL above.
        unsafe {
            start.write(range.start as *const u8);
            len.write(range.end - range.start);
        }
        Ok(())
    })
}

/// Wait up to `timeout_ms` for the next message. On success `*out` is a message
/// handle whose section pointers point into transport memory (the sender's slot
/// on shared memory); release it with `avp_message_release` to return the slot.
/// Several messages may be held at once, up to the sender's slot count. While it
/// waits, other threads may release this receiver's messages (they never wait
/// for the receive); concurrent receives on one receiver take turns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_receiver_recv(
    receiver: avp_receiver,
    timeout_ms: u32,
    out: *mut crate::message::avp_message,
) -> avp_status {
    ffi(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let r = RECEIVERS.get(receiver.id)?;
        let (rx, held) = {
            let obj = lock(&r);
            (Arc::clone(&obj.rx), Arc::clone(&obj.held))
        };
        let guard = rx.recv(ms(timeout_ms))?;
        held.fetch_add(1, Ordering::Relaxed);
        let id = MESSAGES.insert(MessageObj::Received { guard, held })?;
        // SAFETY: checked non-NULL above.
        unsafe { types::put(out, "out", crate::message::avp_message { id }) }
    })
}

/// Close a receiver. AVP_ERR_BUSY while any of its messages is not released.
#[unsafe(no_mangle)]
pub extern "C" fn avp_receiver_free(receiver: avp_receiver) -> avp_status {
    ffi(|| {
        RECEIVERS
            .remove_if(receiver.id, |r| {
                let held = r.held.load(Ordering::Relaxed);
                if held > 0 {
                    return Err(Error::new(
                        avp_status::AVP_ERR_BUSY,
                        format!("{held} received messages are still held; release them first"),
                    ));
                }
                Ok(())
            })
            .map(drop)
    })
}

/// Connect to a listener at `address`, handshake, and return the sending half in `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_connect(
    address: *const c_char,
    identity: *const avp_identity,
    options: *const avp_options,
    out: *mut avp_sender,
) -> avp_status {
    ffi(|| {
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: pointers are NULL or valid per the header's contract.
        let (addr, id, opts) = unsafe { types::endpoint_args(address, identity, options)? };
        let tx = Endpoint::connect(&addr, &id, opts)?;
        let session = tx.session().clone();
        let handle = avp_sender {
            id: SENDERS.insert(SenderObj {
                loan: None,
                device_loan: None,
                layout: None,
                tx: Box::new(tx),
                session,
            })?,
        };
        // SAFETY: checked non-NULL above.
        unsafe { types::put(out, "out", handle) }
    })
}

/// What the sender's handshake negotiated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_session(
    sender: avp_sender,
    out: *mut avp_session_info,
) -> avp_status {
    ffi(|| {
        let s = SENDERS.get(sender.id)?;
        let info = session_info(&lock(&s).session);
        // SAFETY: `put` checks NULL; the caller passes writable memory.
        unsafe { types::put(out, "out", info) }
    })
}

/// Loan transport memory for one message described by `envelope` (may be NULL)
/// and `payload`. Then fill each section through `avp_sender_loan_section` /
/// `avp_sender_loan_kv_section` and call `avp_sender_loan_send` (or
/// `avp_sender_loan_discard`). One loan per sender at a time (AVP_ERR_BUSY).
/// Waits for a free slot up to the loan timeout (AVP_ERR_TIMEOUT).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan(
    sender: avp_sender,
    envelope: *const avp_envelope,
    payload: *const avp_payload,
) -> avp_status {
    ffi(|| {
        // SAFETY: pointers are NULL or valid per the header's contract.
        unsafe {
            begin_loan(sender, envelope, payload, |obj, tx, layout| {
                obj.loan = Some(tx.loan(layout)?);
                Ok(())
            })
        }
    })
}

/// Start a loan of either kind on `sender` for `envelope` (may be NULL) and
/// `payload`: `start` makes it from the sender and the layout, which it may
/// borrow for as long as the loan is kept in the object.
///
/// # Safety
/// `envelope` and `payload` are NULL or valid per the header's contract.
unsafe fn begin_loan(
    sender: avp_sender,
    envelope: *const avp_envelope,
    payload: *const avp_payload,
    start: impl FnOnce(&mut SenderObj, &'static mut Sender, &'static MessageLayout) -> Result<(), Error>,
) -> Result<(), Error> {
    // SAFETY: per this function's contract.
    let (env, payload) = unsafe {
        (
            types::envelope(envelope.as_ref())?,
            types::payload(types::required(payload, "payload")?)?,
        )
    };
    let s = SENDERS.get(sender.id)?;
    let mut obj = lock(&s);
    obj.idle()?;
    let layout = Box::new(MessageLayout::new(&env, &payload)?);
    let layout_ref: *const MessageLayout = &*layout;
    let tx: *mut Sender = &mut *obj.tx;
    // SAFETY: the loan borrows the boxed sender and layout, which live in the
    // same object and are dropped after it (field order), and the sender is not
    // otherwise used while the loan exists (every other call checks for one).
    let (tx, layout_ref) = unsafe { (&mut *tx, &*layout_ref) };
    obj.layout = Some(layout);
    let started = start(&mut obj, tx, layout_ref);
    if started.is_err() {
        obj.layout = None;
    }
    started
}
fn with_loan<R>(
    sender: avp_sender,
    f: impl FnOnce(&mut Loan<'static>, &MessageLayout) -> Result<R, Error>,
) -> Result<R, Error> {
    let s = SENDERS.get(sender.id)?;
    let mut obj = lock(&s);
    let SenderObj { loan, layout, .. } = &mut *obj;
    match (loan.as_mut(), layout.as_deref()) {
        (Some(l), Some(layout)) => f(l, layout),
        _ => Err(Error::arg(
            "no loan is outstanding on this sender; call avp_sender_loan first",
        )),
    }
}

/// Pointer to and length of section `index` of the outstanding loan, to be written
/// by the caller. Valid until the loan is sent or discarded.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_section(
    sender: avp_sender,
    index: usize,
    ptr: *mut *mut u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        if ptr.is_null() || len.is_null() {
            return Err(Error::null("ptr and len"));
        }
        // SAFETY: put_section writes through the (non-NULL) out-pointers.
        with_loan(sender, |loan, _| unsafe {
            types::put_section(ptr, len, loan.writer().section_mut(index)?)
        })
    })
}

/// Pointer to and length of (`layer`, `part`) of the outstanding KV loan; `part`
/// is an `avp_kv_part` value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_kv_section(
    sender: avp_sender,
    layer: u32,
    part: u32,
    ptr: *mut *mut u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        let index = with_loan(sender, |_, layout| match layout.payload() {
            Payload::KvCache(d) => types::kv_section(d, layer, part),
            _ => Err(Error::arg("the outstanding loan is not a KV cache")),
        })?;
        // SAFETY: same contract as avp_sender_loan_section.
        match unsafe { avp_sender_loan_section(sender, index, ptr, len) } {
            avp_status::AVP_OK => Ok(()),
            s => Err(Error::new(s, last_error())),
        }
    })
}

fn last_error() -> String {
    // SAFETY: avp_last_error_message never returns NULL and is NUL-terminated.
    unsafe { std::ffi::CStr::from_ptr(crate::status::avp_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Finish the loaned message (host loan: checksums; device loan: wait for
/// its copies), write its header, and send it. Every section must have been
/// obtained (and written) first. The loan ends either way.
#[unsafe(no_mangle)]
pub extern "C" fn avp_sender_loan_send(sender: avp_sender) -> avp_status {
    ffi(|| {
        let s = SENDERS.get(sender.id)?;
        let mut obj = lock(&s);
        let r = if let Some(loan) = obj.loan.take() {
            loan.finish()
                .map_err(Error::from)
                .and_then(|ready| ready.send().map_err(Error::from))
        } else if let Some(loan) = obj.device_loan.take() {
            loan.finish()
                .map_err(Error::from)
                .and_then(|ready| ready.send().map_err(Error::from))
        } else {
            return Err(Error::arg("no loan is outstanding on this sender"));
        };
        obj.layout = None;
        r
    })
}

/// Give the loaned memory back without sending.
#[unsafe(no_mangle)]
pub extern "C" fn avp_sender_loan_discard(sender: avp_sender) -> avp_status {
    ffi(|| {
        let s = SENDERS.get(sender.id)?;
        let mut obj = lock(&s);
        if obj.loan.take().is_none() && obj.device_loan.take().is_none() {
            return Err(Error::arg("no loan is outstanding on this sender"));
        }
        obj.layout = None;
        Ok(())
    })
}

/// Loan memory for one message whose sections come from device memory
/// (`options.device` must name the device): a device slot on a `cuda://`
/// session, else host memory the sections are copied into (device to host;
/// a CPU receiver still gets an ordinary message). Then, per section, either
/// write it with your own kernels at `avp_sender_loan_device_section` or copy
/// it with `avp_sender_loan_copy_from_device` / `_from_host`, and call
/// `avp_sender_loan_send`. Synchronise your own stream before sending: the
/// send waits only for the loan's copies.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_device(
    sender: avp_sender,
    envelope: *const avp_envelope,
    payload: *const avp_payload,
) -> avp_status {
    ffi(|| {
        // SAFETY: pointers are NULL or valid per the header's contract.
        unsafe {
            begin_loan(sender, envelope, payload, |obj, tx, layout| {
                obj.device_loan = Some(tx.loan_device(layout)?);
                Ok(())
            })
        }
    })
}

fn with_device_loan<R>(
    sender: avp_sender,
    f: impl FnOnce(&mut DeviceLoan<'static>) -> Result<R, Error>,
) -> Result<R, Error> {
    let s = SENDERS.get(sender.id)?;
    let mut obj = lock(&s);
    match obj.device_loan.as_mut() {
        Some(l) => f(l),
        None => Err(Error::arg(
            "no device loan is outstanding on this sender; call avp_sender_loan_device first",
        )),
    }
}

/// Whether the outstanding device loan's sections are in device memory
/// (`*out` 1: a `cuda://` session) or copied to the host (`*out` 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_on_device(sender: avp_sender, out: *mut u8) -> avp_status {
    ffi(|| {
        let on = with_device_loan(sender, |l| Ok(l.on_device() as u8))?;
        // SAFETY: `put` checks NULL; the caller passes writable memory.
        unsafe { types::put(out, "out", on) }
    })
}

/// The device address (`*addr`) and length of section `index` of the
/// outstanding device loan, for your kernels to write; it counts as written.
/// AVP_ERR_PLACEMENT when the session keeps messages in host memory (copy
/// with `avp_sender_loan_copy_from_device` instead).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_device_section(
    sender: avp_sender,
    index: usize,
    addr: *mut u64,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        let span = with_device_loan(sender, |l| Ok(l.section(index)?))?;
        // SAFETY: the caller passes NULL or writable out-pointers.
        unsafe { types::put_span(addr, len, span) }
    })
}

/// Copy section `index` of the outstanding device loan from `src`, device
/// memory of the section's length on the device of `options.device`. The
/// copy is finished by `avp_sender_loan_send`; keep `src` unchanged until then.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_copy_from_device(
    sender: avp_sender,
    index: usize,
    src: u64,
) -> avp_status {
    ffi(|| {
        if src == 0 {
            return Err(Error::null("src"));
        }
        // SAFETY: the caller passes readable device memory of the section's
        // length, unchanged until the send.
        with_device_loan(sender, |l| Ok(unsafe { l.write_from_device(index, src) }?))
    })
}

/// Copy section `index` of the outstanding device loan from `len` bytes of
/// host memory at `src` (exactly the section's length). Finished on return.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_loan_copy_from_host(
    sender: avp_sender,
    index: usize,
    src: *const u8,
    len: usize,
) -> avp_status {
    ffi(|| {
        if src.is_null() {
            return Err(Error::null("src"));
        }
        // SAFETY: the caller passes `len` readable bytes at `src`.
        let data = unsafe { std::slice::from_raw_parts(src, len) };
        with_device_loan(sender, |l| Ok(l.write_from_host(index, data)?))
    })
}

/// Send an already-encoded v2 message (`len` bytes at `bytes`), copying it once
/// into transport memory (shared memory) or writing it to the socket (TCP).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_send_bytes(
    sender: avp_sender,
    bytes: *const u8,
    len: usize,
) -> avp_status {
    ffi(|| {
        if bytes.is_null() {
            return Err(Error::null("bytes"));
        }
        // SAFETY: the caller guarantees `len` readable bytes at `bytes`.
        let data = unsafe { std::slice::from_raw_parts(bytes, len) };
        let s = SENDERS.get(sender.id)?;
        let mut obj = lock(&s);
        obj.idle()?;
        obj.tx.send_bytes(data)?;
        Ok(())
    })
}

/// Send a message whose single data section is copied from `data` (`len` bytes):
/// hidden states (`payload->kind` AVP_KIND_HIDDEN_STATE, not int8) or text
/// (AVP_KIND_TEXT, e.g. the JSON fallback). `len` must match the payload.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_sender_send_data(
    sender: avp_sender,
    envelope: *const avp_envelope,
    payload: *const avp_payload,
    data: *const u8,
    len: usize,
) -> avp_status {
    ffi(|| {
        if data.is_null() && len > 0 {
            return Err(Error::null("data"));
        }
        // SAFETY: pointers are NULL or valid per the header's contract.
        let (env, payload) = unsafe {
            (
                types::envelope(envelope.as_ref())?,
                types::payload(types::required(payload, "payload")?)?,
            )
        };
        if payload.section_count() != 1 {
            return Err(Error::arg(
                "avp_sender_send_data sends one-section payloads (hidden states other than int8, or text)",
            ));
        }
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: the caller guarantees `len` readable bytes at `data`.
            unsafe { std::slice::from_raw_parts(data, len) }
        };
        if let Payload::Text(_) = payload {
            std::str::from_utf8(bytes)
                .map_err(|e| Error::arg(format!("text is not UTF-8: {e}")))?;
        }
        let layout = MessageLayout::new(&env, &payload)?;
        let s = SENDERS.get(sender.id)?;
        let mut obj = lock(&s);
        obj.idle()?;
        obj.tx.send_sections(&layout, &[bytes])?;
        Ok(())
    })
}

/// Close a sender (discarding any outstanding loan); the receiver sees the session end.
#[unsafe(no_mangle)]
pub extern "C" fn avp_sender_free(sender: avp_sender) -> avp_status {
    ffi(|| SENDERS.remove_if(sender.id, |_| Ok(())).map(drop))
}
