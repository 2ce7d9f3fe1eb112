//! Messages: received ones (in transport memory) and parsed ones (in caller memory).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use avp_transport::RecvGuard;
use avp_wire::{Message, Payload};

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
    fn message(&self) -> &Message<'_> {
        match self {
            MessageObj::Received { guard, .. } => guard.message(),
            MessageObj::Parsed(m) => m,
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
    f(obj.message())
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
        let info = with(message, |m| {
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
        with(message, |m| {
            let e = m.envelope();
            let s: &str = match field {
                0 => e.model_id(),
                1 => e.model_hash(),
                2 => e.model_family(),
                3 => e.tokenizer_hash(),
                4 => e.session_id(),
                5 => e.source_agent_id(),
                6 => e.target_agent_id(),
                7 => m.hidden().map(|h| h.map_id).unwrap_or(""),
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
