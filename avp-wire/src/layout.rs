//! Planning a message before writing it: sizes and offsets first, bytes second.
//!
//! [`MessageLayout`] computes the header and every section offset from the
//! description alone, so a sender can obtain memory of exactly
//! [`MessageLayout::total_len`] bytes (a shared-memory slot, a pinned buffer, a
//! `Vec`) and have its tensors written straight into their final place through a
//! [`MessageWriter`]. No intermediate buffer is involved.

use crate::checksum;
use crate::envelope::Envelope;
use crate::error::{Result, WireError};
use crate::header::{self, PREAMBLE_LEN, Preamble, RawEnvelope, RawHeader, RawPayload, RawSection};
use crate::message::Message;
use crate::payload::{Payload, SectionRole};

/// Smallest section alignment a message may declare.
pub const MIN_ALIGNMENT: u32 = 8;
/// Largest section alignment a message may declare.
pub const MAX_ALIGNMENT: u32 = 1 << 16;
/// Section alignment used for small messages.
pub const SMALL_ALIGNMENT: u32 = 64;
/// Section alignment used for messages whose tensors total at least [`PAGE_ALIGN_FROM`] bytes.
///
/// Measured here (`avp bench wire`): glibc's memcpy of large blocks drops from
/// ~15 GB/s to 3.6–5 GB/s when source and destination differ by 16–256 bytes
/// modulo 4096, so sections of large messages start on page boundaries and copies
/// to or from page-aligned tensor memory stay on the fast path.
pub const PAGE_ALIGNMENT: u32 = 4096;
/// Payload size from which the default alignment is [`PAGE_ALIGNMENT`].
pub const PAGE_ALIGN_FROM: u64 = 1 << 20;

/// Round `offset` up to a multiple of `align` (a power of two).
pub(crate) fn align_up(offset: u64, align: u32) -> Option<u64> {
    let mask = align as u64 - 1;
    offset.checked_add(mask).map(|v| v & !mask)
}

/// Check an alignment value.
pub(crate) fn check_alignment(alignment: u32) -> Result<()> {
    if !alignment.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&alignment) {
        return Err(WireError::InvalidField {
            field: "alignment",
            reason: format!(
                "expected a power of two in {MIN_ALIGNMENT}..={MAX_ALIGNMENT}, found {alignment}"
            ),
        });
    }
    Ok(())
}

/// Where one section lives in the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionSpan {
    /// What the section holds.
    pub role: SectionRole,
    /// Model layer (0 for non-layer sections).
    pub layer: u32,
    /// Offset from the start of the message.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The complete plan of one message: header bytes, section offsets and total length.
#[derive(Clone, Debug)]
pub struct MessageLayout {
    raw: RawHeader,
    payload: Payload,
    header_len: u32,
    total_len: u64,
}

impl MessageLayout {
    /// Plan a message with the default alignment ([`SMALL_ALIGNMENT`], or
    /// [`PAGE_ALIGNMENT`] once tensors reach [`PAGE_ALIGN_FROM`] bytes).
    pub fn new(envelope: &Envelope, payload: &Payload) -> Result<Self> {
        payload.validate()?;
        let mut bytes = 0u64;
        for i in 0..payload.section_count() {
            bytes = bytes.saturating_add(payload.section_spec(i)?.2);
        }
        let alignment = if bytes >= PAGE_ALIGN_FROM {
            PAGE_ALIGNMENT
        } else {
            SMALL_ALIGNMENT
        };
        Self::with_alignment(envelope, payload, alignment)
    }

    /// Plan a message whose sections start at multiples of `alignment` (a power of
    /// two from 8 to 65536; 4096 gives page- and DMA-aligned sections).
    pub fn with_alignment(envelope: &Envelope, payload: &Payload, alignment: u32) -> Result<Self> {
        check_alignment(alignment)?;
        payload.validate()?;
        let count = payload.section_count();
        let mut raw = RawHeader {
            envelope: RawEnvelope::from_envelope(envelope),
            payload: RawPayload::from_payload(payload),
            alignment,
            sections: Vec::with_capacity(count),
        };
        for i in 0..count {
            let (role, layer, len) = payload.section_spec(i)?;
            raw.sections.push(RawSection {
                role: role as u8,
                layer,
                offset: 0,
                len,
                crc32: 0,
            });
        }
        // Offsets do not change the archive's size (fixed-width fields), so one
        // serialization tells the header length.
        let header_len = header::serialize(&raw)?.len();
        let header_len = u32::try_from(header_len)
            .ok()
            .filter(|&l| l <= header::MAX_HEADER_LEN)
            .ok_or(WireError::LimitExceeded {
                what: "v2 header",
                size: header_len as u64,
                limit: header::MAX_HEADER_LEN as u64,
            })?;
        let mut cursor = PREAMBLE_LEN as u64 + header_len as u64;
        for s in &mut raw.sections {
            s.offset =
                align_up(cursor, alignment).ok_or(WireError::SizeOverflow("section offset"))?;
            cursor = s
                .offset
                .checked_add(s.len)
                .ok_or(WireError::SizeOverflow("message length"))?;
        }
        usize::try_from(cursor)
            .map_err(|_| WireError::SizeOverflow("message length for this platform"))?;
        Ok(MessageLayout {
            raw,
            payload: payload.clone(),
            header_len,
            total_len: cursor,
        })
    }

    /// Bytes the whole message takes.
    pub fn total_len(&self) -> usize {
        self.total_len as usize
    }

    /// Bytes of the archived header.
    pub fn header_len(&self) -> usize {
        self.header_len as usize
    }

    /// The section alignment.
    pub fn alignment(&self) -> u32 {
        self.raw.alignment
    }

    /// The payload description.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// Number of sections.
    pub fn section_count(&self) -> usize {
        self.raw.sections.len()
    }

    /// Where section `index` lives. Panics if `index >= section_count()`.
    pub fn section(&self, index: usize) -> SectionSpan {
        let s = &self.raw.sections[index];
        SectionSpan {
            role: SectionRole::from_code(s.role).expect("layout roles are valid"),
            layer: s.layer,
            offset: s.offset,
            len: s.len,
        }
    }

    /// All sections, in order.
    pub fn sections(&self) -> impl ExactSizeIterator<Item = SectionSpan> + '_ {
        (0..self.section_count()).map(|i| self.section(i))
    }

    /// Index of the section with this role and layer.
    pub fn find(&self, role: SectionRole, layer: u32) -> Option<usize> {
        self.raw
            .sections
            .iter()
            .position(|s| s.role == role as u8 && s.layer == layer)
    }

    /// Start writing into `buf`, which must be exactly [`Self::total_len`] bytes.
    pub fn writer<'b>(&'b self, buf: &'b mut [u8]) -> Result<MessageWriter<'b>> {
        if buf.len() as u64 != self.total_len {
            return Err(WireError::BufferSize {
                expected: self.total_len,
                found: buf.len() as u64,
            });
        }
        let n = self.section_count();
        Ok(MessageWriter {
            layout: self,
            buf,
            crcs: vec![None; n],
            written: vec![false; n],
            max_threads: 0,
        })
    }

    /// The bytes before section 0 — preamble, header and zero padding — for
    /// sections whose CRC32s are `crcs`. Lets a sender write the sections from its
    /// own buffers (vectored I/O) without assembling the message.
    pub fn prefix(&self, crcs: &[u32]) -> Result<Vec<u8>> {
        self.prefix_with(crcs, 0)
    }

    /// The prefix of a message whose sections are written in device memory:
    /// [`FLAG_DEVICE_SECTIONS`](crate::FLAG_DEVICE_SECTIONS) set and every
    /// section CRC32 0 (nothing on the host can checksum them).
    pub fn device_prefix(&self) -> Result<Vec<u8>> {
        self.prefix_with(&vec![0; self.section_count()], header::FLAG_DEVICE_SECTIONS)
    }

    fn prefix_with(&self, crcs: &[u32], flags: u8) -> Result<Vec<u8>> {
        if crcs.len() != self.section_count() {
            return Err(WireError::BadSection {
                index: crcs.len().min(self.section_count()),
                reason: format!(
                    "{} CRCs given for {} sections",
                    crcs.len(),
                    self.section_count()
                ),
            });
        }
        let mut raw = self.raw.clone();
        for (s, &c) in raw.sections.iter_mut().zip(crcs) {
            s.crc32 = c;
        }
        let header = header::serialize(&raw)?;
        let end = raw.sections.first().map_or(self.total_len, |s| s.offset) as usize;
        let mut out = vec![0u8; end];
        out[PREAMBLE_LEN..PREAMBLE_LEN + header.len()].copy_from_slice(&header);
        Preamble {
            flags,
            header_len: self.header_len,
            total_len: self.total_len,
            header_crc: crc32fast::hash(&header),
        }
        .write(&mut out);
        Ok(out)
    }

    /// Encode a whole message into a new `Vec`, copying `sections[i]` into section `i`.
    pub fn encode_to_vec(&self, sections: &[&[u8]]) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.total_len()];
        let mut w = self.writer(&mut buf)?;
        w.write_sections(sections)?;
        w.finish()?;
        Ok(buf)
    }
}

/// Encode a message into a new `Vec` with the default layout.
///
/// `sections` are the section contents in the order of [`Payload::section_spec`]
/// (for a KV cache: `K(l), V(l)` per layer).
pub fn encode_to_vec(
    envelope: &Envelope,
    payload: &Payload,
    sections: &[&[u8]],
) -> Result<Vec<u8>> {
    MessageLayout::new(envelope, payload)?.encode_to_vec(sections)
}

/// Writes one message into caller-owned memory, section by section.
///
/// Every section must be written (through [`section_mut`](Self::section_mut),
/// [`write_section`](Self::write_section), [`write_sections`](Self::write_sections)
/// or [`sections_mut`](Self::sections_mut)) before [`finish`](Self::finish), which
/// computes the checksums still missing and writes the header.
pub struct MessageWriter<'b> {
    layout: &'b MessageLayout,
    buf: &'b mut [u8],
    crcs: Vec<Option<u32>>,
    written: Vec<bool>,
    max_threads: usize,
}

impl<'b> MessageWriter<'b> {
    /// Cap the threads this writer's copies and checksums use (0, the default: the
    /// process-wide [`checksum::set_max_threads`] setting). A transport sets it to
    /// leave a core to a receiver waiting on the same host.
    pub fn set_max_threads(&mut self, n: usize) {
        self.max_threads = n;
    }

    /// The layout being written.
    pub fn layout(&self) -> &MessageLayout {
        self.layout
    }

    fn range(&self, index: usize) -> Result<std::ops::Range<usize>> {
        let s = self
            .layout
            .raw
            .sections
            .get(index)
            .ok_or(WireError::BadSection {
                index,
                reason: format!(
                    "no such section; the message has {}",
                    self.layout.section_count()
                ),
            })?;
        Ok(s.offset as usize..(s.offset + s.len) as usize)
    }

    /// The bytes of section `index`, to be filled in place.
    pub fn section_mut(&mut self, index: usize) -> Result<&mut [u8]> {
        let r = self.range(index)?;
        self.written[index] = true;
        self.crcs[index] = None;
        Ok(&mut self.buf[r])
    }

    /// Copy `src` into section `index`, computing its checksum in the same pass.
    pub fn write_section(&mut self, index: usize, src: &[u8]) -> Result<()> {
        let r = self.range(index)?;
        if src.len() != r.len() {
            return Err(WireError::BadSection {
                index,
                reason: format!("section is {} bytes, {} given", r.len(), src.len()),
            });
        }
        self.crcs[index] = Some(checksum::copy_with_crc(&mut self.buf[r], src));
        self.written[index] = true;
        Ok(())
    }

    /// Copy every section at once (`srcs.len()` must equal the section count), on
    /// several threads for large messages.
    pub fn write_sections(&mut self, srcs: &[&[u8]]) -> Result<()> {
        let n = self.layout.section_count();
        if srcs.len() != n {
            return Err(WireError::BadSection {
                index: srcs.len().min(n),
                reason: format!("the message has {n} sections, {} given", srcs.len()),
            });
        }
        for (i, s) in srcs.iter().enumerate() {
            let len = self.layout.raw.sections[i].len;
            if s.len() as u64 != len {
                return Err(WireError::BadSection {
                    index: i,
                    reason: format!("section is {len} bytes, {} given", s.len()),
                });
            }
        }
        let cap = self.max_threads;
        let dsts = self.split_mut();
        let crcs = checksum::copy_many_with_crc_capped(dsts, srcs, cap);
        for (i, c) in crcs.into_iter().enumerate() {
            self.crcs[i] = Some(c);
            self.written[i] = true;
        }
        Ok(())
    }

    /// Mutable views of every section at once (disjoint), e.g. to fill them from
    /// several threads. Marks every section written.
    pub fn sections_mut(&mut self) -> Vec<&mut [u8]> {
        self.written.iter_mut().for_each(|w| *w = true);
        self.crcs.iter_mut().for_each(|c| *c = None);
        self.split_mut()
    }

    fn split_mut(&mut self) -> Vec<&mut [u8]> {
        let mut out = Vec::with_capacity(self.layout.section_count());
        let mut rest: &mut [u8] = self.buf;
        let mut base = 0u64;
        for s in &self.layout.raw.sections {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((s.offset - base) as usize);
            let (sec, tail) = tail.split_at_mut(s.len as usize);
            out.push(sec);
            rest = tail;
            base = s.offset + s.len;
        }
        out
    }

    /// Checksum the sections not yet checksummed, write the header and the
    /// preamble, zero the padding, and return the finished message.
    pub fn finish(self) -> Result<Message<'b>> {
        Message::parse(self.seal()?)
    }

    /// [`finish`](Self::finish) without parsing the result: the bytes of the
    /// complete message. For a sender that wants to act as soon as the bytes
    /// are in place (a shared-memory transport announces them to the receiver)
    /// and check them afterwards.
    pub fn seal(self) -> Result<&'b [u8]> {
        if let Some(i) = self.written.iter().position(|w| !w) {
            let s = self.layout.section(i);
            return Err(WireError::SectionNotWritten {
                index: i,
                name: s.role.describe(s.layer),
            });
        }
        let layout = self.layout;
        let buf: &'b mut [u8] = self.buf;
        let pending: Vec<usize> = (0..self.crcs.len())
            .filter(|&i| self.crcs[i].is_none())
            .collect();
        let mut crcs = self.crcs;
        if !pending.is_empty() {
            let slices: Vec<&[u8]> = pending
                .iter()
                .map(|&i| {
                    let s = &layout.raw.sections[i];
                    &buf[s.offset as usize..(s.offset + s.len) as usize]
                })
                .collect();
            for (&i, c) in pending
                .iter()
                .zip(checksum::crc_many_capped(&slices, self.max_threads))
            {
                crcs[i] = Some(c);
            }
        }
        let mut raw = layout.raw.clone();
        for (s, c) in raw.sections.iter_mut().zip(&crcs) {
            s.crc32 = c.expect("every section checksummed");
        }
        let header_bytes = header::serialize(&raw)?;
        assert_eq!(
            header_bytes.len(),
            layout.header_len(),
            "header size is fixed by the layout"
        );
        let header_end = PREAMBLE_LEN + header_bytes.len();
        buf[PREAMBLE_LEN..header_end].copy_from_slice(&header_bytes);
        // Zero every gap (header padding and inter-section padding): the bytes are defined.
        let mut cursor = header_end;
        for s in &raw.sections {
            buf[cursor..s.offset as usize].fill(0);
            cursor = (s.offset + s.len) as usize;
        }
        Preamble {
            flags: 0,
            header_len: layout.header_len,
            total_len: layout.total_len,
            header_crc: crc32fast::hash(&header_bytes),
        }
        .write(buf);
        Ok(buf)
    }
}
