//! Messages: received ones (in transport memory) and parsed ones (in caller memory).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use avp_transport::RecvGuard;
use avp_wire::{Header, Message, Payload};

use crate::registry::{Table, lock};
use crate::status::{Error, avp_status, ffi};
use crate::types::{self, avp_kind, avp_message_info, avp_text_format};

/// A received or parsed message.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_message {
    /// Opaque, generation-checked; 0 is never a live handle.
    pub id: u64,
}

pub(crate) static MESSAGES: Table<MessageObj> = Table::new(4, "avp_message");

pub(crate) enum MessageObj {
    /// A received message; its guard gives the memory back when dropped, on
    /// whatever thread releases it, without waiting for its receiver.
    Received {
        guard: RecvGuard,
        /// The receiver's count of held messages.
        held: Arc<AtomicUsize>,
    },
    Parsed(Message<'static>),
}

impl MessageObj {
    /// The message, if its sections are host memory.
    fn message(&self) -> Result<&Message<'_>, Error> {
        match self {
            MessageObj::Received { guard, .. } if guard.on_device() => Err(Error::new(
                avp_status::AVP_ERR_PLACEMENT,
                "the message's sections are in device memory: use avp_message_device_section \
                 or avp_message_copy_section_to_host",
            )),
            MessageObj::Received { guard, .. } => Ok(guard.message()),
            MessageObj::Parsed(m) => Ok(m),
        }
    }

    /// The validated header, wherever the sections are.
    fn header(&self) -> &Header<'_> {
        match self {
            MessageObj::Received { guard, .. } => guard.header(),
            MessageObj::Parsed(m) => m.header(),
        }
    }

    fn guard(&self) -> Option<&RecvGuard> {
        match self {
            MessageObj::Received { guard, .. } => Some(guard),
            MessageObj::Parsed(_) => None,
        }
    }
}

impl Drop for MessageObj {
    fn drop(&mut self) {
        if let MessageObj::Received { held, .. } = self {
            held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn with<R>(m: avp_message, f: impl FnOnce(&Message<'_>) -> Result<R, Error>) -> Result<R, Error> {
    let obj = MESSAGES.get(m.id)?;
    let obj = lock(&obj);
    f(obj.message()?)
}

/// `f` of the message's header and, for a received one, its guard.
fn with_header<R>(
    m: avp_message,
    f: impl FnOnce(&Header<'_>, Option<&RecvGuard>) -> Result<R, Error>,
) -> Result<R, Error> {
    let obj = MESSAGES.get(m.id)?;
    let obj = lock(&obj);
    f(obj.header(), obj.guard())
}

/// Parse (validate) the v2 message in the caller's buffer without copying it.
/// The buffer must stay valid and unchanged until `avp_message_release`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_parse(
    bytes: *const u8,
    len: usize,
    out: *mut avp_message,
) -> avp_status {
    ffi(|| {
        if bytes.is_null() {
            return Err(Error::null("bytes"));
        }
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: the caller keeps `len` bytes at `bytes` alive and unchanged until release.
        let data: &'static [u8] = unsafe { std::slice::from_raw_parts(bytes, len) };
        let msg = Message::parse(data)?;
        let id = MESSAGES.insert(MessageObj::Parsed(msg))?;
        // SAFETY: checked non-NULL above.
        unsafe { types::put(out, "out", avp_message { id }) }
    })
}

/// Summarize a message: kind, sizes and shape.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_get_info(
    message: avp_message,
    out: *mut avp_message_info,
) -> avp_status {
    ffi(|| {
        let info = with_header(message, |m, guard| {
            let mut info = avp_message_info {
                kind: avp_kind::AVP_KIND_KV_CACHE,
                total_len: m.total_len(),
                alignment: m.alignment(),
                section_count: m.section_count(),
                kv: types::kv_desc_out(&avp_wire::KvCacheDesc::new(
                    0,
                    0,
                    0,
                    0,
                    avp_wire::DType::F32,
                    avp_wire::KvLayout::Hnd,
                )),
                hidden_rows: 0,
                hidden_dim: 0,
                hidden_dtype: types::avp_dtype::AVP_DTYPE_F32,
                text_format: avp_text_format::AVP_TEXT_JSON,
                text_len: 0,
                on_device: guard.is_some_and(RecvGuard::on_device) as u8,
            };
            match m.payload() {
                Payload::KvCache(d) => info.kv = types::kv_desc_out(&d),
                Payload::HiddenState(h) => {
                    info.kind = avp_kind::AVP_KIND_HIDDEN_STATE;
                    info.hidden_rows = h.rows;
                    info.hidden_dim = h.dim;
                    info.hidden_dtype = types::dtype_out(h.dtype);
                }
                Payload::Text(t) => {
                    info.kind = avp_kind::AVP_KIND_TEXT;
                    info.text_format = match t.format {
                        avp_wire::TextFormat::Json => avp_text_format::AVP_TEXT_JSON,
                        avp_wire::TextFormat::Plain => avp_text_format::AVP_TEXT_PLAIN,
                    };
                    info.text_len = t.len;
                }
            }
            Ok(info)
        })?;
        // SAFETY: `put` checks NULL; the caller passes writable memory.
        unsafe { types::put(out, "out", info) }
    })
}

/// # Safety
/// `ptr` and `len` are NULL or writable.
unsafe fn out_slice(ptr: *mut *const u8, len: *mut usize, s: &[u8]) -> Result<(), Error> {
    if ptr.is_null() || len.is_null() {
        return Err(Error::null("ptr and len"));
    }
    // SAFETY: both checked non-NULL.
    unsafe {
        ptr.write(s.as_ptr());
        len.write(s.len());
    }
    Ok(())
}

/// The whole message (preamble to last section).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_bytes(
    message: avp_message,
    ptr: *mut *const u8,
    len: *mut usize,
) -> avp_status {
    // SAFETY: out_slice checks the out-pointers.
    ffi(|| with(message, |m| unsafe { out_slice(ptr, len, m.as_bytes()) }))
}

/// Section `index` in place (read-only; valid until the message is released).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_section(
    message: avp_message,
    index: usize,
    ptr: *mut *const u8,
    len: *mut usize,
) -> avp_status {
    // SAFETY: out_slice checks the out-pointers.
    ffi(|| {
        with(message, |m| unsafe {
            out_slice(ptr, len, m.section(index)?.bytes)
        })
    })
}

/// (`layer`, `part`) of a KV message in place; `part` is an `avp_kv_part` value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_kv_section(
    message: avp_message,
    layer: u32,
    part: u32,
    ptr: *mut *const u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        with(message, |m| {
            let Payload::KvCache(d) = m.payload() else {
                return Err(Error::arg("not a KV-cache message"));
            };
            let i = types::kv_section(&d, layer, part)?;
            // SAFETY: out_slice checks the out-pointers.
            unsafe { out_slice(ptr, len, m.section(i)?.bytes) }
        })
    })
}

/// The data of a hidden-state or text message (section 0) in place.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_data(
    message: avp_message,
    ptr: *mut *const u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        with(message, |m| {
            if let Payload::KvCache(_) = m.payload() {
                return Err(Error::arg(
                    "KV-cache messages have per-layer sections; use avp_message_kv_section",
                ));
            }
            if let Ok(t) = m.text() {
                t.as_str().map_err(Error::from)?;
            }
            // SAFETY: out_slice checks the out-pointers.
            unsafe { out_slice(ptr, len, m.section(0)?.bytes) }
        })
    })
}

/// An envelope string (`field` is an `avp_envelope_field` value) in place: `*ptr`
/// points at `*len` UTF-8 bytes, not NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_envelope(
    message: avp_message,
    field: u32,
    ptr: *mut *const u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        with_header(message, |m, _| {
            let e = m.envelope();
            let s: &str = match field {
                0 => e.model_id(),
                1 => e.model_hash(),
                2 => e.model_family(),
                3 => e.tokenizer_hash(),
                4 => e.session_id(),
                5 => e.source_agent_id(),
                6 => e.target_agent_id(),
                7 => m.map_id(),
                f => {
                    return Err(Error::arg(format!(
                        "field {f} is not an avp_envelope_field"
                    )));
                }
            };
            // SAFETY: out_slice checks the out-pointers.
            unsafe { out_slice(ptr, len, s.as_bytes()) }
        })
    })
}

/// Verify every section's CRC32 (and zero padding). AVP_ERR_WIRE on a mismatch.
#[unsafe(no_mangle)]
pub extern "C" fn avp_message_verify(message: avp_message) -> avp_status {
    ffi(|| with(message, |m| m.verify().map_err(Error::from)))
}

/// Verify one layer's sections of a KV message.
#[unsafe(no_mangle)]
pub extern "C" fn avp_message_verify_layer(message: avp_message, layer: u32) -> avp_status {
    ffi(|| {
        with(message, |m| {
            m.kv()?.verify_layer(layer).map_err(Error::from)
        })
    })
}

/// Release a message: a received one returns its slot to the sender. The handle
/// and every pointer obtained from it become invalid.
#[unsafe(no_mangle)]
pub extern "C" fn avp_message_release(message: avp_message) -> avp_status {
    ffi(|| MESSAGES.remove_if(message.id, |_| Ok(())).map(drop))
}

/// The guard of a received message, or why there is none.
fn received(guard: Option<&RecvGuard>) -> Result<&RecvGuard, Error> {
    guard.ok_or_else(|| {
        Error::new(
            avp_status::AVP_ERR_PLACEMENT,
            "a parsed message is in host memory: use avp_message_section",
        )
    })
}

/// Where section `index` of a received device message is: `*addr` a device
/// address (a CUDA device pointer; a host address with AVP_DEVICE_EMULATED)
/// of `*len` bytes, readable by the caller's kernels or copies until the
/// message is released. The sender synchronised its writes before sending.
/// Releasing hands the slot back to the sender at once: synchronise the work
/// that reads it before `avp_message_release`. AVP_ERR_PLACEMENT for a host
/// message.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_device_section(
    message: avp_message,
    index: usize,
    addr: *mut u64,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        let span = with_header(message, |_, g| Ok(received(g)?.device_section(index)?))?;
        // SAFETY: the caller passes NULL or writable out-pointers.
        unsafe { types::put_span(addr, len, span) }
    })
}

/// Copy section `index` into `dst` (`len` bytes of host memory, exactly the
/// section's length): device to host for a device message, a plain copy
/// otherwise. Finished when this returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_copy_section_to_host(
    message: avp_message,
    index: usize,
    dst: *mut u8,
    len: usize,
) -> avp_status {
    ffi(|| {
        if dst.is_null() {
            return Err(Error::null("dst"));
        }
        // SAFETY: the caller passes `len` writable bytes at `dst`.
        let out = unsafe { std::slice::from_raw_parts_mut(dst, len) };
        let obj = MESSAGES.get(message.id)?;
        let obj = lock(&obj);
        match obj.guard() {
            Some(g) => Ok(g.copy_section_to_host(index, out)?),
            None => {
                let s = obj.message()?.section(index)?;
                if s.bytes.len() != len {
                    return Err(avp_wire::WireError::BadSection {
                        index,
                        reason: format!(
                            "section is {} bytes, the destination {len}",
                            s.bytes.len()
                        ),
                    }
                    .into());
                }
                out.copy_from_slice(s.bytes);
                Ok(())
            }
        }
    })
}

/// Copy section `index` of a received message to `dst`, device memory of the
/// section's length on the session's device: device to device for a device
/// message, host to device otherwise. Finished when this returns.
/// AVP_ERR_PLACEMENT when the session has no device.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_message_copy_section_to_device(
    message: avp_message,
    index: usize,
    dst: u64,
) -> avp_status {
    ffi(|| {
        if dst == 0 {
            return Err(Error::null("dst"));
        }
        with_header(message, |_, g| {
            // SAFETY: the caller passes writable device memory of the
            // section's length at `dst`.
            Ok(unsafe { received(g)?.copy_section_to_device(index, dst) }?)
        })
    })
}
