//! Encoding into caller-owned buffers, for engines that bring their own transport.

use avp_wire::{MessageLayout, MessageWriter, Payload};

use crate::registry::{Table, lock};
use crate::status::{Error, avp_status, ffi};
use crate::types::{self, avp_envelope, avp_payload};

/// A message being written into a caller-owned buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct avp_writer {
    /// Opaque, generation-checked; 0 is never a live handle.
    pub id: u64,
}

struct WriterObj {
    // Field order is drop order: the writer borrows the layout.
    writer: Option<MessageWriter<'static>>,
    layout: Box<MessageLayout>,
}

static WRITERS: Table<WriterObj> = Table::new(5, "avp_writer");

/// # Safety
/// Pointers are NULL or valid per the header's contract.
unsafe fn layout_of(
    envelope: *const avp_envelope,
    payload: *const avp_payload,
    alignment: u32,
) -> Result<MessageLayout, Error> {
    // SAFETY: per the contract.
    let (env, payload) = unsafe {
        (
            types::envelope(envelope.as_ref())?,
            types::payload(types::required(payload, "payload")?)?,
        )
    };
    Ok(if alignment == 0 {
        MessageLayout::new(&env, &payload)?
    } else {
        MessageLayout::with_alignment(&env, &payload, alignment)?
    })
}

/// The size in bytes of the message `envelope` (may be NULL) and `payload` describe,
/// with sections aligned to `alignment` (0: the library's default; else a power of
/// two from 8 to 65536).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_layout_size(
    envelope: *const avp_envelope,
    payload: *const avp_payload,
    alignment: u32,
    size: *mut usize,
) -> avp_status {
    ffi(|| {
        // SAFETY: per the contract; `put` checks `size`.
        unsafe {
            let l = layout_of(envelope, payload, alignment)?;
            types::put(size, "size", l.total_len())
        }
    })
}

/// Start writing a message into `buf` (exactly the size `avp_layout_size` gave).
/// The buffer must stay valid until `avp_writer_finish` or `avp_writer_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_writer_begin(
    buf: *mut u8,
    len: usize,
    envelope: *const avp_envelope,
    payload: *const avp_payload,
    alignment: u32,
    out: *mut avp_writer,
) -> avp_status {
    ffi(|| {
        if buf.is_null() {
            return Err(Error::null("buf"));
        }
        if out.is_null() {
            return Err(Error::null("out"));
        }
        // SAFETY: per the contract.
        let layout = Box::new(unsafe { layout_of(envelope, payload, alignment)? });
        if len != layout.total_len() {
            return Err(Error::new(
                avp_status::AVP_ERR_BUFFER_TOO_SMALL,
                format!(
                    "the message needs exactly {} bytes, the buffer has {len}",
                    layout.total_len()
                ),
            ));
        }
        let layout_ref: *const MessageLayout = &*layout;
        // SAFETY: the caller keeps `len` writable bytes at `buf` until finish/free;
        // the layout is boxed in the same object and outlives the writer (field order).
        let writer = unsafe { (*layout_ref).writer(std::slice::from_raw_parts_mut(buf, len))? };
        let id = WRITERS.insert(WriterObj {
            writer: Some(writer),
            layout,
        })?;
        // SAFETY: checked non-NULL above.
        unsafe { types::put(out, "out", avp_writer { id }) }
    })
}

/// Pointer to and length of section `index`, to be written by the caller.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_writer_section(
    writer: avp_writer,
    index: usize,
    ptr: *mut *mut u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        let w = WRITERS.get(writer.id)?;
        let mut obj = lock(&w);
        let s = obj
            .writer
            .as_mut()
            .expect("present until finished")
            .section_mut(index)?;
        // SAFETY: put_section checks the out-pointers.
        unsafe { types::put_section(ptr, len, s) }
    })
}

/// Pointer to and length of (`layer`, `part`) of a KV message being written.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_writer_kv_section(
    writer: avp_writer,
    layer: u32,
    part: u32,
    ptr: *mut *mut u8,
    len: *mut usize,
) -> avp_status {
    ffi(|| {
        let w = WRITERS.get(writer.id)?;
        let index = match lock(&w).layout.payload() {
            Payload::KvCache(d) => types::kv_section(d, layer, part)?,
            _ => return Err(Error::arg("not a KV-cache message")),
        };
        // SAFETY: same contract as avp_writer_section.
        match unsafe { avp_writer_section(writer, index, ptr, len) } {
            avp_status::AVP_OK => Ok(()),
            s => Err(Error::new(s, "could not get the section")),
        }
    })
}

/// Checksum the sections and write the header: the buffer now holds a complete
/// message of `*written` bytes. The writer handle is freed either way.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_writer_finish(writer: avp_writer, written: *mut usize) -> avp_status {
    ffi(|| {
        let w = WRITERS.remove_if(writer.id, |_| Ok(()))?;
        let mut obj = lock(&w);
        let n = obj.layout.total_len();
        obj.writer
            .take()
            .expect("present until finished")
            .finish()?;
        if !written.is_null() {
            // SAFETY: non-NULL and writable per the contract.
            unsafe { written.write(n) };
        }
        Ok(())
    })
}

/// Abandon a writer without finishing.
#[unsafe(no_mangle)]
pub extern "C" fn avp_writer_free(writer: avp_writer) -> avp_status {
    ffi(|| WRITERS.remove_if(writer.id, |_| Ok(())).map(drop))
}
