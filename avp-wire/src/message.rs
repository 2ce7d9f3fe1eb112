//! A parsed, validated v2 message that borrows the bytes it was parsed from.

use crate::checksum;
use crate::dtype::{DType, KvLayout};
use crate::envelope::EnvelopeRef;
use crate::error::{Result, WireError};
use crate::header::{
    self, ArchivedRawExtra, ArchivedRawHeader, ArchivedRawPayload, ArchivedRawSection,
    PREAMBLE_LEN, Preamble,
};
use crate::layout::check_alignment;
use crate::payload::{
    HiddenStateDesc, KvCacheDesc, LayerRange, Payload, SectionPlan, SectionRole, TextDesc,
    TextFormat,
};
use crate::view::{HiddenView, KvView, TextView};

/// A validated v2 message borrowing its bytes (a shared-memory slot, a receive
/// buffer, a file mapping).
///
/// [`Message::parse`] checks the preamble, the header checksum, the archived header
/// (bytecheck) and that every section lies where the payload description says, in
/// time independent of the tensor bytes. The tensor bytes themselves are checked
/// only on demand: [`verify_section`](Self::verify_section) or [`verify`](Self::verify).
#[derive(Clone)]
pub struct Message<'a> {
    bytes: &'a [u8],
    head: Header<'a>,
}

/// The validated preamble and header of a v2 message, without its section
/// bytes: what a receiver reads when the sections are somewhere it cannot
/// address (device memory, say). [`Header::parse`] checks everything
/// [`Message::parse`] checks before the tensor bytes, against the length the
/// preamble declares.
///
/// ```
/// # use avp_wire::*;
/// let layout = MessageLayout::new(&Envelope::default(),
///     &Payload::KvCache(KvCacheDesc::new(1, 1, 4, 2, DType::F16, KvLayout::Hnd)))?;
/// let prefix = layout.device_prefix()?; // sections written elsewhere
/// let h = Header::parse(&prefix)?;
/// assert!(h.device_sections());
/// assert_eq!(h.section(1)?.len, 16);
/// assert_eq!(h.total_len(), layout.total_len() as u64);
/// # Ok::<(), WireError>(())
/// ```
#[derive(Clone)]
pub struct Header<'a> {
    raw: &'a ArchivedRawHeader,
    preamble: Preamble,
    /// The payload shape (`map_id` left empty; read it from the archive).
    shape: Payload,
}

/// Where one section of a message lies, from its [`Header`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionInfo {
    /// What the section holds.
    pub role: SectionRole,
    /// Model layer (0 for non-layer sections).
    pub layer: u32,
    /// Offset from the start of the message.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The CRC32 recorded in the header (0 for device sections).
    pub crc32: u32,
}

/// One section of a parsed message.
#[derive(Clone, Copy, Debug)]
pub struct Section<'a> {
    /// What the section holds.
    pub role: SectionRole,
    /// Model layer (0 for non-layer sections).
    pub layer: u32,
    /// Offset from the start of the message.
    pub offset: u64,
    /// The bytes, in place.
    pub bytes: &'a [u8],
    /// The CRC32 recorded in the header.
    pub crc32: u32,
}

impl<'a> Message<'a> {
    /// Parse a buffer that holds exactly one message.
    pub fn parse(bytes: &'a [u8]) -> Result<Message<'a>> {
        let (msg, rest) = Self::parse_prefix(bytes)?;
        if !rest.is_empty() {
            return Err(WireError::TrailingBytes {
                declared: msg.bytes.len() as u64,
                extra: rest.len() as u64,
            });
        }
        Ok(msg)
    }

    /// Parse the message at the start of `bytes`; return it and the bytes after it.
    pub fn parse_prefix(bytes: &'a [u8]) -> Result<(Message<'a>, &'a [u8])> {
        let preamble = Preamble::read(bytes)?;
        if preamble.total_len > bytes.len() as u64 {
            return Err(WireError::Truncated {
                what: "v2 message",
                needed: preamble.total_len,
                available: bytes.len() as u64,
            });
        }
        let (bytes, rest) = bytes.split_at(preamble.total_len as usize);
        Ok((Self::build(preamble, bytes, bytes)?, rest))
    }

    /// Parse a message whose preamble and header are read from `prefix`, a
    /// private copy, while its sections stay in `bytes` (the whole message, in
    /// place): the way to read memory that a peer can still write.
    ///
    /// Every header field (section offsets and lengths, the envelope's strings,
    /// the payload shape) is validated once in `prefix` and read from there
    /// afterwards, so a peer that rewrites the header in `bytes` after it was
    /// copied changes nothing this view reports and cannot make it read out of
    /// bounds; rewritten *section* bytes are the peer's data as usual (check
    /// them with [`verify`](Self::verify)). `prefix` holds at least the
    /// preamble and the header it declares (bytes beyond are ignored), and
    /// `bytes` exactly the message the preamble declares.
    /// [`as_bytes`](Self::as_bytes) returns `bytes`.
    ///
    /// ```
    /// # use avp_wire::*;
    /// let layout = MessageLayout::new(&Envelope::default(),
    ///     &Payload::KvCache(KvCacheDesc::new(1, 1, 4, 2, DType::F16, KvLayout::Hnd)))?;
    /// let bytes = layout.encode_to_vec(&[&[1u8; 16][..], &[2u8; 16][..]])?;
    /// let copy = bytes[..PREAMBLE_LEN + Preamble::read(&bytes)?.header_len as usize].to_vec();
    /// let m = Message::parse_split(&copy, &bytes)?;
    /// assert_eq!(m.kv()?.v(0)?, &[2u8; 16]);
    /// # Ok::<(), WireError>(())
    /// ```
    pub fn parse_split(prefix: &'a [u8], bytes: &'a [u8]) -> Result<Message<'a>> {
        let preamble = Preamble::read(prefix)?;
        if preamble.total_len != bytes.len() as u64 {
            return Err(if preamble.total_len > bytes.len() as u64 {
                WireError::Truncated {
                    what: "v2 message",
                    needed: preamble.total_len,
                    available: bytes.len() as u64,
                }
            } else {
                WireError::TrailingBytes {
                    declared: preamble.total_len,
                    extra: bytes.len() as u64 - preamble.total_len,
                }
            });
        }
        Self::build(preamble, prefix, bytes)
    }

    /// Validate the header that follows the preamble in `prefix` and the
    /// section table against `bytes` (`preamble.total_len` long).
    fn build(preamble: Preamble, prefix: &'a [u8], bytes: &'a [u8]) -> Result<Message<'a>> {
        Ok(Message {
            bytes,
            head: Header::build(preamble, prefix)?,
        })
    }

    /// `Err` when the sections carry no checksums (written on a device).
    fn checksummed(&self) -> Result<()> {
        if self.head.device_sections() {
            return Err(WireError::InvalidField {
                field: "flags",
                reason: "the sections were written in device memory and carry no CRC32s \
                         (FLAG_DEVICE_SECTIONS); nothing to verify them against"
                    .into(),
            });
        }
        Ok(())
    }

    /// The validated preamble and header.
    pub fn header(&self) -> &Header<'a> {
        &self.head
    }

    /// The whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Total length in bytes.
    pub fn total_len(&self) -> u64 {
        self.head.total_len()
    }

    /// Length of the archived header.
    pub fn header_len(&self) -> u32 {
        self.head.header_len()
    }

    /// The declared section alignment.
    pub fn alignment(&self) -> u32 {
        self.head.alignment()
    }

    /// Who sent the message and from which model.
    pub fn envelope(&self) -> EnvelopeRef<'a> {
        self.head.envelope()
    }

    /// An owned description of the payload.
    pub fn payload(&self) -> Payload {
        self.head.payload()
    }

    /// Number of sections.
    pub fn section_count(&self) -> usize {
        self.head.section_count()
    }

    /// Section `index`.
    pub fn section(&self, index: usize) -> Result<Section<'a>> {
        let s = self.head.section(index)?;
        Ok(Section {
            role: s.role,
            layer: s.layer,
            offset: s.offset,
            bytes: &self.bytes[s.offset as usize..(s.offset + s.len) as usize],
            crc32: s.crc32,
        })
    }

    /// All sections, in order.
    pub fn sections(&self) -> impl ExactSizeIterator<Item = Section<'a>> + '_ {
        (0..self.section_count()).map(|i| self.section(i).expect("index in range"))
    }

    /// Check section `index` against its recorded CRC32. A message whose
    /// sections were written on a device has none to check: the error says so.
    pub fn verify_section(&self, index: usize) -> Result<()> {
        self.checksummed()?;
        let s = self.section(index)?;
        check_crc(index, &s, crc32fast::hash(s.bytes))
    }

    /// Check every section against its CRC32 (several threads for large messages)
    /// and that all padding bytes are zero.
    pub fn verify(&self) -> Result<()> {
        self.checksummed()?;
        let sections: Vec<Section<'a>> = self.sections().collect();
        let slices: Vec<&[u8]> = sections.iter().map(|s| s.bytes).collect();
        for (index, (s, crc)) in sections.iter().zip(checksum::crc_many(&slices)).enumerate() {
            check_crc(index, s, crc)?;
        }
        let mut cursor = PREAMBLE_LEN + self.header_len() as usize;
        for s in &sections {
            let gap = &self.bytes[cursor..s.offset as usize];
            if let Some(p) = gap.iter().position(|&b| b != 0) {
                return Err(WireError::InvalidField {
                    field: "padding",
                    reason: format!(
                        "byte {} before {} is 0x{:02x}, expected 0",
                        cursor + p,
                        s.role.describe(s.layer),
                        gap[p]
                    ),
                });
            }
            cursor = s.offset as usize + s.bytes.len();
        }
        Ok(())
    }

    /// The KV cache this message carries.
    pub fn kv(&self) -> Result<KvView<'a>> {
        match &self.head.shape {
            Payload::KvCache(desc) => Ok(KvView {
                desc: *desc,
                msg: self.clone(),
            }),
            other => Err(WireError::WrongPayload {
                expected: "kv_cache",
                found: other.kind_name(),
            }),
        }
    }

    /// The hidden states this message carries.
    pub fn hidden(&self) -> Result<HiddenView<'a>> {
        match (&self.head.shape, &self.head.raw.payload) {
            (Payload::HiddenState(h), ArchivedRawPayload::HiddenState { map_id, .. }) => {
                Ok(HiddenView {
                    rows: h.rows,
                    dim: h.dim,
                    dtype: h.dtype,
                    map_id: map_id.as_str(),
                    msg: self.clone(),
                })
            }
            (other, _) => Err(WireError::WrongPayload {
                expected: "hidden_state",
                found: other.kind_name(),
            }),
        }
    }

    /// The text this message carries.
    pub fn text(&self) -> Result<TextView<'a>> {
        match &self.head.shape {
            Payload::Text(t) => Ok(TextView {
                format: t.format,
                bytes: self.section(0)?.bytes,
            }),
            other => Err(WireError::WrongPayload {
                expected: "text",
                found: other.kind_name(),
            }),
        }
    }
}

impl<'a> Header<'a> {
    /// Parse and validate the preamble and header at the start of `prefix`
    /// (bytes beyond the header are ignored): the checksums of both, the
    /// archived header, and that the sections tile the length the preamble
    /// declares. Nothing past the header is read.
    pub fn parse(prefix: &'a [u8]) -> Result<Header<'a>> {
        Self::build(Preamble::read(prefix)?, prefix)
    }

    fn build(preamble: Preamble, prefix: &'a [u8]) -> Result<Header<'a>> {
        let header_end = PREAMBLE_LEN + preamble.header_len as usize;
        let header_bytes = prefix
            .get(PREAMBLE_LEN..header_end)
            .ok_or(WireError::Truncated {
                what: "v2 header",
                needed: header_end as u64,
                available: prefix.len() as u64,
            })?;
        let actual = crc32fast::hash(header_bytes);
        if actual != preamble.header_crc {
            return Err(WireError::ChecksumMismatch {
                what: "header".into(),
                expected: preamble.header_crc,
                actual,
            });
        }
        let raw = header::access(header_bytes)?;
        check_extra_order(raw.envelope.extra.as_slice())?;
        let shape = shape_of(&raw.payload)?;
        let alignment = raw.alignment.to_native();
        check_alignment(alignment)?;
        let count = shape.section_count();
        if raw.sections.len() != count {
            return Err(WireError::BadSection {
                index: raw.sections.len().min(count),
                reason: format!(
                    "the {} payload implies {count} sections, the header lists {}",
                    shape.kind_name(),
                    raw.sections.len()
                ),
            });
        }
        let plan = shape.plan()?;
        let sections = raw.sections.as_slice();
        let (start, total) = (header_end as u64, preamble.total_len);
        if !sections_in_place(sections, &plan, start, alignment, total) {
            check_sections(sections, &plan, start, alignment, total)?;
        }
        Ok(Header {
            raw,
            preamble,
            shape,
        })
    }

    /// The preamble's flag bits.
    pub fn flags(&self) -> u8 {
        self.preamble.flags
    }

    /// Whether the sections were written in device memory and carry no
    /// checksums ([`FLAG_DEVICE_SECTIONS`](crate::FLAG_DEVICE_SECTIONS)).
    pub fn device_sections(&self) -> bool {
        self.preamble.flags & header::FLAG_DEVICE_SECTIONS != 0
    }

    /// Total length of the message in bytes.
    pub fn total_len(&self) -> u64 {
        self.preamble.total_len
    }

    /// Length of the archived header.
    pub fn header_len(&self) -> u32 {
        self.preamble.header_len
    }

    /// The declared section alignment.
    pub fn alignment(&self) -> u32 {
        self.raw.alignment.to_native()
    }

    /// Who sent the message and from which model.
    pub fn envelope(&self) -> EnvelopeRef<'a> {
        EnvelopeRef {
            raw: &self.raw.envelope,
        }
    }

    /// An owned description of the payload.
    pub fn payload(&self) -> Payload {
        match (&self.shape, &self.raw.payload) {
            (Payload::HiddenState(h), ArchivedRawPayload::HiddenState { map_id, .. }) => {
                Payload::HiddenState(HiddenStateDesc {
                    map_id: map_id.as_str().to_owned(),
                    ..h.clone()
                })
            }
            (shape, _) => shape.clone(),
        }
    }

    /// Number of sections.
    pub fn section_count(&self) -> usize {
        self.raw.sections.len()
    }

    /// The cross-model map id of a hidden-state payload ("" otherwise), in place.
    pub fn map_id(&self) -> &'a str {
        match &self.raw.payload {
            ArchivedRawPayload::HiddenState { map_id, .. } => map_id.as_str(),
            _ => "",
        }
    }

    /// Where section `index` lies.
    pub fn section(&self, index: usize) -> Result<SectionInfo> {
        let sections: &'a [ArchivedRawSection] = self.raw.sections.as_slice();
        let s = sections.get(index).ok_or(WireError::BadSection {
            index,
            reason: format!("no such section; the message has {}", sections.len()),
        })?;
        Ok(SectionInfo {
            role: SectionRole::from_code(s.role).expect("validated by parse"),
            layer: s.layer.to_native(),
            offset: s.offset.to_native(),
            len: s.len.to_native(),
            crc32: s.crc32.to_native(),
        })
    }

    /// All sections, in order.
    pub fn sections(&self) -> impl ExactSizeIterator<Item = SectionInfo> + '_ {
        (0..self.section_count()).map(|i| self.section(i).expect("index in range"))
    }
}

impl std::fmt::Debug for Header<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("flags", &self.flags())
            .field("total_len", &self.total_len())
            .field("envelope", &self.envelope())
            .field("payload", &self.payload())
            .finish()
    }
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("total_len", &self.total_len())
            .field("alignment", &self.alignment())
            .field("envelope", &self.envelope())
            .field("payload", &self.payload())
            .finish()
    }
}

/// Whether every section is the one `plan` expects (role, layer, length) and
/// starts where the one before it ends, rounded up to `alignment`, the first
/// right after the header (`start`) and the last ending at `total`. `false`
/// means "not shown": [`check_sections`] then decides, and explains.
///
/// Built for speed (it runs on every message received): each section's place
/// is checked against the end its predecessor declares rather than a running
/// cursor, so no iteration waits on the one before.
#[inline]
fn sections_in_place(
    sections: &[ArchivedRawSection],
    plan: &SectionPlan,
    start: u64,
    alignment: u32,
    total: u64,
) -> bool {
    let mask = alignment as u64 - 1;
    // No end below can wrap around: each is at most `longest + mask` past the
    // one before. With that, the ends only grow, and the last one being
    // `total` puts every section inside the message.
    let longest = plan.longest();
    let bounded = longest
        .checked_add(mask)
        .and_then(|step| step.checked_mul(sections.len() as u64))
        .and_then(|all| all.checked_add(start))
        .is_some();
    let mut prev_end = start;
    let mut mismatches = 0u32;
    plan.each(sections.len(), |index, role, layer, len| {
        let s = &sections[index];
        let offset = s.offset.to_native();
        let diff = u64::from(s.role ^ role as u8)
            | u64::from(s.layer.to_native() ^ layer)
            | (s.len.to_native() ^ len)
            | (offset ^ (prev_end.wrapping_add(mask) & !mask));
        // Counted rather than OR-ed into one word, which the compiler turns
        // into a chain of dependent ORs through every section.
        mismatches += u32::from(diff != 0);
        prev_end = offset.wrapping_add(len);
    });
    bounded && mismatches == 0 && prev_end == total
}

/// The exact check behind [`sections_in_place`]: a running cursor, every
/// overflow checked, and the first mismatch as an error.
#[cold]
#[inline(never)]
/// The envelope's `extra` keys are strictly increasing (sorted, unique), as
/// every writer puts them: a lookup by key then has one answer.
fn check_extra_order(extra: &[ArchivedRawExtra]) -> Result<()> {
    for (i, pair) in extra.windows(2).enumerate() {
        let (a, b) = (pair[0].key.as_str(), pair[1].key.as_str());
        if a >= b {
            return Err(WireError::InvalidHeader(format!(
                "envelope extra keys must be strictly increasing: key {} ({b:?}) follows {a:?}",
                i + 1
            )));
        }
    }
    Ok(())
}

fn check_sections(
    sections: &[ArchivedRawSection],
    plan: &SectionPlan,
    start: u64,
    alignment: u32,
    total: u64,
) -> Result<()> {
    let mask = alignment as u64 - 1;
    // `cursor <= total`, so the arithmetic below cannot overflow except
    // `offset + len`, which saturates.
    let mut cursor = start;
    for (index, s) in sections.iter().enumerate() {
        let (role, layer, len) = plan.at(index);
        let offset = s.offset.to_native();
        let expected_offset = (cursor + mask) & !mask;
        let end = offset.saturating_add(len);
        if s.role != role as u8
            || s.layer.to_native() != layer
            || s.len.to_native() != len
            || offset != expected_offset
            || end > total
        {
            return Err(section_error(
                index,
                s,
                (role, layer, len),
                expected_offset,
                total,
            ));
        }
        cursor = end;
    }
    if cursor != total {
        return Err(WireError::InvalidField {
            field: "total_len",
            reason: format!("sections end at {cursor}, preamble says {total}"),
        });
    }
    Ok(())
}

/// Explain why section `index` does not match the plan.
fn section_error(
    index: usize,
    s: &ArchivedRawSection,
    (role, layer, len): (SectionRole, u32, u64),
    expected_offset: u64,
    total: u64,
) -> WireError {
    let (offset, found_len) = (s.offset.to_native(), s.len.to_native());
    let reason = if s.role != role as u8 || s.layer.to_native() != layer {
        format!(
            "expected {}, found role {} layer {}",
            role.describe(layer),
            s.role,
            s.layer.to_native()
        )
    } else if found_len != len {
        format!(
            "{} must be {len} bytes, header says {found_len}",
            role.describe(layer)
        )
    } else if offset != expected_offset {
        format!("expected offset {expected_offset}, header says {offset}")
    } else {
        format!("bytes {offset}..{offset}+{len} run past the message end {total}")
    };
    WireError::BadSection { index, reason }
}

fn check_crc(index: usize, s: &Section<'_>, actual: u32) -> Result<()> {
    if actual != s.crc32 {
        return Err(WireError::ChecksumMismatch {
            what: format!("section {index} ({})", s.role.describe(s.layer)),
            expected: s.crc32,
            actual,
        });
    }
    Ok(())
}

fn dtype_of(code: u8) -> Result<DType> {
    DType::from_code(code).ok_or_else(|| WireError::InvalidField {
        field: "dtype",
        reason: format!("expected 0 (f32), 1 (f16), 2 (bf16) or 3 (i8), found {code}"),
    })
}

/// The typed payload shape of an archived header, checked.
fn shape_of(raw: &ArchivedRawPayload) -> Result<Payload> {
    let shape = match raw {
        ArchivedRawPayload::KvCache {
            num_layers,
            num_kv_heads,
            head_dim,
            seq_len,
            dtype,
            layout,
            layer_start,
            layer_end,
        } => Payload::KvCache(KvCacheDesc {
            num_layers: num_layers.to_native(),
            num_kv_heads: num_kv_heads.to_native(),
            head_dim: head_dim.to_native(),
            seq_len: seq_len.to_native(),
            dtype: dtype_of(*dtype)?,
            layout: KvLayout::from_code(*layout).ok_or_else(|| WireError::InvalidField {
                field: "kv layout",
                reason: format!("expected 0 (HND) or 1 (NHD), found {layout}"),
            })?,
            layers: LayerRange::new(layer_start.to_native(), layer_end.to_native()),
        }),
        ArchivedRawPayload::HiddenState {
            rows, dim, dtype, ..
        } => Payload::HiddenState(HiddenStateDesc {
            rows: rows.to_native(),
            dim: dim.to_native(),
            dtype: dtype_of(*dtype)?,
            map_id: String::new(),
        }),
        ArchivedRawPayload::Text { format, len } => Payload::Text(TextDesc {
            format: TextFormat::from_code(*format).ok_or_else(|| WireError::InvalidField {
                field: "text format",
                reason: format!("expected 0 (json) or 1 (plain), found {format}"),
            })?,
            len: len.to_native(),
        }),
    };
    shape.validate()?;
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::{RawEnvelope, RawHeader, RawPayload, RawSection};
    use crate::{Envelope, MessageLayout, encode_to_vec};

    fn kv_message(dtype: DType) -> (Vec<u8>, KvCacheDesc) {
        let desc =
            KvCacheDesc::new(4, 2, 8, 3, dtype, KvLayout::Nhd).with_layers(LayerRange::new(1, 3));
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        let mut buf = vec![0xAAu8; layout.total_len()];
        let mut w = layout.writer(&mut buf).unwrap();
        for (i, s) in w.sections_mut().into_iter().enumerate() {
            s.fill(i as u8);
        }
        w.finish().unwrap();
        (buf, desc)
    }

    #[test]
    fn a_device_prefix_parses_alone_and_its_sections_are_not_verifiable() {
        let desc = KvCacheDesc::new(2, 2, 8, 4, DType::F16, KvLayout::Hnd);
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        let prefix = layout.device_prefix().unwrap();
        let h = Header::parse(&prefix).unwrap();
        assert!(h.device_sections());
        assert_eq!(h.flags(), crate::FLAG_DEVICE_SECTIONS);
        assert_eq!(h.total_len(), layout.total_len() as u64);
        assert_eq!(h.section_count(), 4);
        for (info, span) in h.sections().zip(layout.sections()) {
            assert_eq!(
                (info.offset, info.len, info.crc32),
                (span.offset, span.len, 0)
            );
        }
        // The same prefix over host bytes parses, but nothing can verify it.
        let mut whole = vec![0u8; layout.total_len()];
        whole[..prefix.len()].copy_from_slice(&prefix);
        let m = Message::parse(&whole).unwrap();
        assert!(m.header().device_sections());
        let err = m.verify().unwrap_err().to_string();
        assert!(err.contains("device memory"), "{err}");
        assert!(m.verify_section(0).is_err());
        // A host message's header says so too.
        let (buf, _) = kv_message(DType::F32);
        let hm = Message::parse(&buf).unwrap();
        assert!(!hm.header().device_sections());
        assert_eq!(
            Header::parse(&buf).unwrap().section(0).unwrap().len,
            hm.section(0).unwrap().bytes.len() as u64
        );
        // A header cut short, or a bad bit, is refused.
        assert!(Header::parse(&prefix[..prefix.len() / 2]).is_err());
        let mut bad = prefix.clone();
        bad[3] = 0x02;
        assert!(Header::parse(&bad).is_err());
    }

    #[test]
    fn split_views_read_the_header_from_the_copy_and_sections_in_place() {
        let (mut buf, desc) = kv_message(DType::F16);
        let p = Preamble::read(&buf).unwrap();
        let copy = buf[..PREAMBLE_LEN + p.header_len as usize].to_vec();
        // The peer rewrites the whole header after the copy was taken.
        buf[PREAMBLE_LEN..PREAMBLE_LEN + p.header_len as usize].fill(0xFF);
        let m = Message::parse_split(&copy, &buf).unwrap();
        assert_eq!(m.kv().unwrap().desc(), &desc);
        assert_eq!(m.kv().unwrap().v(2).unwrap()[0], 3, "sections in place");
        assert!(std::ptr::eq(m.as_bytes(), &buf[..]));
        m.verify_section(0).unwrap();
        // The in-place bytes alone no longer parse.
        assert!(Message::parse(&buf).is_err());
        // Lengths that do not match the preamble, and a short copy, are refused.
        assert!(matches!(
            Message::parse_split(&copy, &buf[..buf.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut longer = buf.clone();
        longer.push(0);
        assert!(matches!(
            Message::parse_split(&copy, &longer),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
        assert!(matches!(
            Message::parse_split(&copy[..copy.len() - 1], &buf),
            Err(WireError::Truncated {
                what: "v2 header",
                ..
            })
        ));
    }

    #[test]
    fn views_point_into_the_buffer() {
        let (buf, desc) = kv_message(DType::F32);
        let m = Message::parse(&buf).unwrap();
        let range = buf.as_ptr_range();
        let kv = m.kv().unwrap();
        assert_eq!(kv.desc(), &desc);
        for l in 1..3 {
            for s in [kv.k(l).unwrap(), kv.v(l).unwrap()] {
                assert!(range.contains(&s.as_ptr()) && s.as_ptr_range().end <= range.end);
            }
        }
        assert_eq!(kv.k(1).unwrap()[0], 0);
        assert_eq!(kv.v(2).unwrap()[0], 3);
        assert_eq!(kv.k_as::<f32>(2).unwrap().len(), 2 * 3 * 8);
        assert!(matches!(
            kv.k(0),
            Err(WireError::LayerOutOfRange {
                layer: 0,
                start: 1,
                end: 3
            })
        ));
        assert!(matches!(kv.k(3), Err(WireError::LayerOutOfRange { .. })));
        assert!(matches!(
            kv.k_as::<half::f16>(1),
            Err(WireError::DTypeMismatch { .. })
        ));
        assert!(matches!(
            kv.k_scales(1),
            Err(WireError::DTypeMismatch { .. })
        ));
        assert!(matches!(m.hidden(), Err(WireError::WrongPayload { .. })));
        assert!(matches!(m.text(), Err(WireError::WrongPayload { .. })));
        m.verify().unwrap();
    }

    #[test]
    fn i8_caches_carry_scales() {
        let (buf, _) = kv_message(DType::I8);
        let m = Message::parse(&buf).unwrap();
        assert_eq!(m.section_count(), 8);
        let kv = m.kv().unwrap();
        assert_eq!(kv.k_scales(1).unwrap().len(), 2 * 8);
        assert_eq!(kv.v_scales(2).unwrap().len(), 2 * 8);
        assert_eq!(kv.k_as::<i8>(2).unwrap()[0], 2);
        kv.verify_layer(2).unwrap();
    }

    #[test]
    fn unwritten_sections_and_bad_buffers_are_refused() {
        let desc = KvCacheDesc::new(2, 1, 4, 2, DType::F16, KvLayout::Hnd);
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        let mut small = vec![0u8; layout.total_len() - 1];
        assert!(matches!(
            layout.writer(&mut small),
            Err(WireError::BufferSize { .. })
        ));
        let mut buf = vec![0u8; layout.total_len()];
        let mut w = layout.writer(&mut buf).unwrap();
        w.section_mut(0).unwrap().fill(1);
        w.write_section(1, &[2u8; 16]).unwrap();
        assert!(w.write_section(2, &[0u8; 3]).is_err());
        match w.finish() {
            Err(WireError::SectionNotWritten { index: 2, name }) => assert_eq!(name, "K layer 1"),
            other => panic!("expected SectionNotWritten, got {other:?}"),
        }
    }

    #[test]
    fn hidden_and_text_payloads() {
        let h = HiddenStateDesc {
            rows: 2,
            dim: 3,
            dtype: DType::F32,
            map_id: "vocab:0123".into(),
        };
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let bytes = encode_to_vec(
            &Envelope::default(),
            &Payload::HiddenState(h.clone()),
            &[&data],
        )
        .unwrap();
        let m = Message::parse(&bytes).unwrap();
        let v = m.hidden().unwrap();
        assert_eq!((v.rows, v.dim, v.map_id), (2, 3, "vocab:0123"));
        assert_eq!(v.data_as::<f32>().unwrap()[5], 5.0);
        assert_eq!(m.payload(), Payload::HiddenState(h));

        let text = r#"{"answer": 42}"#;
        let t = TextDesc {
            format: TextFormat::Json,
            len: text.len() as u64,
        };
        let bytes =
            encode_to_vec(&Envelope::default(), &Payload::Text(t), &[text.as_bytes()]).unwrap();
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.text().unwrap().as_str().unwrap(), text);
        let bad = encode_to_vec(
            &Envelope::default(),
            &Payload::Text(TextDesc {
                format: TextFormat::Plain,
                len: 2,
            }),
            &[&[0xff, 0xfe]],
        )
        .unwrap();
        assert!(matches!(
            Message::parse(&bad).unwrap().text().unwrap().as_str(),
            Err(WireError::InvalidUtf8 { valid_up_to: 0 })
        ));
    }

    #[test]
    fn large_payloads_get_page_alignment() {
        let desc = KvCacheDesc::new(2, 2, 64, 4096, DType::F16, KvLayout::Hnd);
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        assert_eq!(layout.alignment(), crate::PAGE_ALIGNMENT);
        assert!(layout.sections().all(|s| s.offset % 4096 == 0));
        let small = KvCacheDesc::new(2, 2, 64, 4, DType::F16, KvLayout::Hnd);
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(small)).unwrap();
        assert_eq!(layout.alignment(), crate::SMALL_ALIGNMENT);
    }

    #[test]
    fn layout_prefix_matches_the_encoded_message() {
        let desc = KvCacheDesc::new(2, 1, 8, 3, DType::F16, KvLayout::Hnd);
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        let data: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8 + 1; 48]).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let full = layout.encode_to_vec(&refs).unwrap();
        let crcs: Vec<u32> = refs.iter().map(|d| crc32fast::hash(d)).collect();
        let prefix = layout.prefix(&crcs).unwrap();
        assert_eq!(&full[..prefix.len()], &prefix[..]);
        assert!(layout.prefix(&crcs[..1]).is_err());
    }

    #[test]
    fn seal_writes_the_bytes_that_finish_parses() {
        let desc = KvCacheDesc::new(2, 1, 8, 4, DType::F16, KvLayout::Hnd);
        let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(desc)).unwrap();
        let write = |buf: &mut Vec<u8>, seal: bool| {
            let mut w = layout.writer(buf).unwrap();
            for (i, s) in w.sections_mut().into_iter().enumerate() {
                s.fill(i as u8 + 1);
            }
            if seal {
                w.seal().map(|_| ()).unwrap();
            } else {
                w.finish().map(|_| ()).unwrap();
            }
        };
        let (mut sealed, mut finished) =
            (vec![0u8; layout.total_len()], vec![1u8; layout.total_len()]);
        write(&mut sealed, true);
        write(&mut finished, false);
        assert_eq!(sealed, finished);
        Message::parse(&sealed).unwrap().verify().unwrap();
    }

    #[test]
    fn prefix_parsing_and_trailing_bytes() {
        let (mut buf, _) = kv_message(DType::F16);
        let n = buf.len();
        buf.extend_from_slice(b"next");
        assert!(matches!(
            Message::parse(&buf),
            Err(WireError::TrailingBytes { extra: 4, .. })
        ));
        let (m, rest) = Message::parse_prefix(&buf).unwrap();
        assert_eq!((m.total_len() as usize, rest), (n, &b"next"[..]));
    }

    #[test]
    fn invalid_shapes_are_refused_at_layout() {
        let zero = KvCacheDesc::new(0, 1, 1, 1, DType::F16, KvLayout::Hnd);
        assert!(MessageLayout::new(&Envelope::default(), &Payload::KvCache(zero)).is_err());
        let huge = KvCacheDesc::new(1, u32::MAX, u32::MAX, u64::MAX, DType::F32, KvLayout::Hnd);
        assert!(matches!(
            MessageLayout::new(&Envelope::default(), &Payload::KvCache(huge)),
            Err(WireError::SizeOverflow(_))
        ));
        let range = KvCacheDesc::new(2, 1, 1, 1, DType::F16, KvLayout::Hnd)
            .with_layers(LayerRange::new(1, 3));
        assert!(MessageLayout::new(&Envelope::default(), &Payload::KvCache(range)).is_err());
        let ok = KvCacheDesc::new(2, 1, 1, 1, DType::F16, KvLayout::Hnd);
        assert!(
            MessageLayout::with_alignment(&Envelope::default(), &Payload::KvCache(ok), 48).is_err()
        );
    }

    /// Where section `index`'s archived record starts in `buf`, and where its
    /// `role`, `layer`, `offset` and `len` fields lie within the record.
    fn section_record(buf: &[u8], index: usize) -> (usize, [usize; 4]) {
        let m = Message::parse(buf).unwrap();
        let s = &m.head.raw.sections.as_slice()[index];
        let at = |p: *const u8| p as usize - s as *const ArchivedRawSection as usize;
        let fields = [
            at(&s.role),
            at((&s.layer as *const _) as *const u8),
            at((&s.offset as *const _) as *const u8),
            at((&s.len as *const _) as *const u8),
        ];
        (
            s as *const ArchivedRawSection as usize - buf.as_ptr() as usize,
            fields,
        )
    }

    /// Re-checksum the header after editing it, so that the edit reaches the
    /// section checks instead of being caught by the CRC.
    fn refresh_header_crc(buf: &mut [u8]) {
        let mut p = Preamble::read(buf).unwrap();
        p.header_crc = crc32fast::hash(&buf[PREAMBLE_LEN..PREAMBLE_LEN + p.header_len as usize]);
        p.write(buf);
    }

    /// The fast check and the exact one, on the header in `buf`.
    fn both_checks(buf: &[u8]) -> (bool, Result<()>) {
        let p = Preamble::read(buf).unwrap();
        let end = PREAMBLE_LEN + p.header_len as usize;
        let h = header::access(&buf[PREAMBLE_LEN..end]).unwrap();
        let plan = shape_of(&h.payload).unwrap().plan().unwrap();
        let (s, a, start) = (h.sections.as_slice(), h.alignment.to_native(), end as u64);
        (
            sections_in_place(s, &plan, start, a, p.total_len),
            check_sections(s, &plan, start, a, p.total_len),
        )
    }

    #[test]
    fn every_misplaced_or_mislabelled_section_is_refused_at_its_index() {
        // i8: data sections, then scale sections, for layers 1..3.
        let (good, _) = kv_message(DType::I8);
        let count = Message::parse(&good).unwrap().section_count();
        assert_eq!(count, 8);
        let (fast, exact) = both_checks(&good);
        assert!(fast && exact.is_ok());
        for index in 0..count {
            let (record, fields) = section_record(&good, index);
            for (field, at) in fields.into_iter().enumerate() {
                let mut buf = good.clone();
                buf[record + at] ^= if field == 2 { 8 } else { 1 };
                refresh_header_crc(&mut buf);
                let (fast, exact) = both_checks(&buf);
                assert!(!fast, "section {index} field {field}");
                assert!(exact.is_err(), "section {index} field {field}");
                match Message::parse(&buf) {
                    Err(WireError::BadSection { index: found, .. }) => {
                        assert_eq!(found, index, "field {field}")
                    }
                    other => panic!("section {index} field {field}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn extra_keys_out_of_order_are_refused() {
        let mut env = Envelope::default();
        env.extra.insert("a".into(), "1".into());
        env.extra.insert("b".into(), "2".into());
        let payload = Payload::Text(crate::TextDesc {
            format: crate::TextFormat::Plain,
            len: 1,
        });
        let mut buf = MessageLayout::new(&env, &payload)
            .unwrap()
            .encode_to_vec(&[b"x"])
            .unwrap();
        Message::parse(&buf).unwrap();
        // Swap the two (inline, one-byte) keys and fix the checksums up.
        let mut p = Preamble::read(&buf).unwrap();
        let header = &mut buf[PREAMBLE_LEN..PREAMBLE_LEN + p.header_len as usize];
        let at = |h: &[u8], key: u8| {
            let mut inline = [0xffu8; 8];
            inline[0] = key;
            h.windows(8).position(|w| w == inline).unwrap()
        };
        let (ia, ib) = (at(header, b'a'), at(header, b'b'));
        header[ia] = b'b';
        header[ib] = b'a';
        p.header_crc = crc32fast::hash(header);
        p.write(&mut buf);
        let err = Message::parse(&buf).unwrap_err().to_string();
        assert!(err.contains("strictly increasing"), "{err}");
        // The same key twice.
        let header = &mut buf[PREAMBLE_LEN..PREAMBLE_LEN + p.header_len as usize];
        header[ib] = b'b';
        p.header_crc = crc32fast::hash(header);
        p.write(&mut buf);
        let err = Message::parse(&buf).unwrap_err().to_string();
        assert!(err.contains("strictly increasing"), "{err}");
    }

    #[test]
    fn section_ends_that_wrap_around_are_refused() {
        // Two sections of 2^63 bytes from byte 64: the second ends at
        // 2^64 + 64, which wraps to 64, the message's declared end.
        let desc = KvCacheDesc::new(1, 1, 1, 1 << 62, DType::F16, KvLayout::Hnd);
        let payload = Payload::KvCache(desc);
        let half = 1u64 << 63;
        let section = |role: SectionRole, offset| RawSection {
            role: role as u8,
            layer: 0,
            offset,
            len: half,
            crc32: 0,
        };
        let raw = RawHeader {
            envelope: RawEnvelope::from_envelope(&Envelope::default()),
            payload: RawPayload::from_payload(&payload),
            alignment: 64,
            sections: vec![
                section(SectionRole::Key, 64),
                section(SectionRole::Value, half + 64),
            ],
        };
        let bytes = header::serialize(&raw).unwrap();
        let h = header::access(&bytes).unwrap();
        let plan = shape_of(&h.payload).unwrap().plan().unwrap();
        let s = h.sections.as_slice();
        assert!(!sections_in_place(s, &plan, 64, 64, 64));
        assert!(check_sections(s, &plan, 64, 64, 64).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any edit of the section table (its checksum fixed up): the fast check
        /// accepts exactly what the exact one accepts, and parsing never panics.
        #[test]
        fn the_fast_section_check_agrees_with_the_exact_one(
            index in 0usize..8,
            byte in 0usize..25,
            xor in 1u8..=255,
            dtype in proptest::sample::select(vec![DType::I8, DType::F16]),
        ) {
            let (mut buf, _) = kv_message(dtype);
            let count = Message::parse(&buf).unwrap().section_count();
            let (record, _) = section_record(&buf, index % count);
            buf[record + byte] ^= xor;
            refresh_header_crc(&mut buf);
            let (fast, exact) = both_checks(&buf);
            proptest::prop_assert_eq!(fast, exact.is_ok());
            if let Ok(m) = Message::parse(&buf) {
                for i in 0..m.section_count() {
                    proptest::prop_assert!(m.section(i).is_ok());
                }
            }
        }
    }
}
