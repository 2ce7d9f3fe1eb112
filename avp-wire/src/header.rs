//! The v2 preamble and the rkyv-archived header schema.
//!
//! The schema types are crate-private: callers see typed descriptions
//! ([`crate::Payload`], [`crate::Envelope`]) and the parsed [`crate::Message`].

use crate::envelope::Envelope;
use crate::error::{Result, WireError};
use crate::payload::Payload;

/// The two magic bytes that open every avp message, v1 and v2 alike.
pub const MAGIC: [u8; 2] = *b"AV";
/// The version byte of the native format.
pub const VERSION_V2: u8 = 2;
/// Length of the fixed v2 preamble.
pub const PREAMBLE_LEN: usize = 32;
/// Preamble flag: the sections were written in device (GPU) memory and never
/// crossed to the host, so their CRC32 fields are 0 and are not checked. Only
/// the preamble and header (host memory) are checksummed. Set by a sender that
/// fills sections on a device (the `cuda` transport); a host message never has it.
pub const FLAG_DEVICE_SECTIONS: u8 = 0x01;
/// Flag bits defined by v2 (a decoder refuses unknown bits).
pub const KNOWN_FLAGS: u8 = FLAG_DEVICE_SECTIONS;
/// Largest header a decoder accepts (a header is a few hundred bytes; this bounds work on hostile input).
pub const MAX_HEADER_LEN: u32 = 1 << 20;

/// The fixed 32-byte preamble of a v2 message.
///
/// ```text
/// 0   2  magic "AV"
/// 2   1  version = 2
/// 3   1  flags: 0x01 sections on a device, not checksummed; other bits 0
/// 4   4  header_len   u32 LE, length of the rkyv header that starts at byte 32
/// 8   8  total_len    u64 LE, length of the whole message
/// 16  4  header_crc   u32 LE, CRC32 of the header bytes
/// 20  4  preamble_crc u32 LE, CRC32 of bytes 0..20
/// 24  8  reserved, zero
/// ```
///
/// A stream receiver reads these 32 bytes, learns `total_len` (protected by its own
/// checksum), checks it against its limit, and only then allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// Flag bits.
    pub flags: u8,
    /// Header length.
    pub header_len: u32,
    /// Whole message length.
    pub total_len: u64,
    /// CRC32 of the header.
    pub header_crc: u32,
}

impl Preamble {
    /// Parse and check a preamble from the first 32 bytes of `bytes`.
    pub fn read(bytes: &[u8]) -> Result<Preamble> {
        if bytes.len() < 2 {
            return Err(WireError::Truncated {
                what: "magic",
                needed: 2,
                available: bytes.len() as u64,
            });
        }
        if bytes[..2] != MAGIC {
            return Err(WireError::InvalidMagic {
                found: u16::from_be_bytes([bytes[0], bytes[1]]),
            });
        }
        if bytes.len() < 3 {
            return Err(WireError::Truncated {
                what: "version byte",
                needed: 3,
                available: bytes.len() as u64,
            });
        }
        if bytes[2] != VERSION_V2 {
            return Err(WireError::UnsupportedVersion {
                found: bytes[2],
                expected: "2",
            });
        }
        if bytes.len() < PREAMBLE_LEN {
            return Err(WireError::Truncated {
                what: "v2 preamble",
                needed: PREAMBLE_LEN as u64,
                available: bytes.len() as u64,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let recorded = u32_at(20);
        let actual = crc32fast::hash(&bytes[..20]);
        if recorded != actual {
            return Err(WireError::ChecksumMismatch {
                what: "preamble".into(),
                expected: recorded,
                actual,
            });
        }
        let flags = bytes[3];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::UnknownFlags {
                bits: flags & !KNOWN_FLAGS,
                known: KNOWN_FLAGS,
            });
        }
        let reserved = u64_at(24);
        if reserved != 0 {
            return Err(WireError::ReservedNotZero {
                field: "preamble bytes 24..32",
                found: reserved,
            });
        }
        let p = Preamble {
            flags,
            header_len: u32_at(4),
            total_len: u64_at(8),
            header_crc: u32_at(16),
        };
        if p.header_len > MAX_HEADER_LEN {
            return Err(WireError::LimitExceeded {
                what: "v2 header",
                size: p.header_len as u64,
                limit: MAX_HEADER_LEN as u64,
            });
        }
        let header_end = PREAMBLE_LEN as u64 + p.header_len as u64;
        if p.total_len < header_end {
            return Err(WireError::InvalidField {
                field: "total_len",
                reason: format!(
                    "{} is shorter than preamble plus header ({header_end})",
                    p.total_len
                ),
            });
        }
        Ok(p)
    }

    /// Write the preamble (computing its own checksum) into the first 32 bytes of `out`.
    pub fn write(&self, out: &mut [u8]) {
        let out = &mut out[..PREAMBLE_LEN];
        out[..2].copy_from_slice(&MAGIC);
        out[2] = VERSION_V2;
        out[3] = self.flags;
        out[4..8].copy_from_slice(&self.header_len.to_le_bytes());
        out[8..16].copy_from_slice(&self.total_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.header_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out[24..32].fill(0);
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct RawHeader {
    pub envelope: RawEnvelope,
    pub payload: RawPayload,
    pub alignment: u32,
    pub sections: Vec<RawSection>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct RawEnvelope {
    pub model_id: String,
    pub model_hash: String,
    pub model_family: String,
    pub tokenizer_hash: String,
    pub session_id: String,
    pub source_agent_id: String,
    pub target_agent_id: String,
    pub extra: Vec<RawExtra>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct RawExtra {
    pub key: String,
    pub value: String,
}

/// Enum-like fields (dtype, layout, format) are stored as bytes so that a bad value
/// gets a typed error from [`crate::Message::parse`] rather than an opaque bytecheck one.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub(crate) enum RawPayload {
    KvCache {
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        seq_len: u64,
        dtype: u8,
        layout: u8,
        layer_start: u32,
        layer_end: u32,
    },
    HiddenState {
        rows: u64,
        dim: u64,
        dtype: u8,
        map_id: String,
    },
    Text {
        format: u8,
        len: u64,
    },
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq)]
pub(crate) struct RawSection {
    pub role: u8,
    pub layer: u32,
    pub offset: u64,
    pub len: u64,
    pub crc32: u32,
}

impl RawEnvelope {
    pub fn from_envelope(e: &Envelope) -> Self {
        RawEnvelope {
            model_id: e.model_id.clone(),
            model_hash: e.model_hash.clone(),
            model_family: e.model_family.clone(),
            tokenizer_hash: e.tokenizer_hash.clone(),
            session_id: e.session_id.clone(),
            source_agent_id: e.source_agent_id.clone(),
            target_agent_id: e.target_agent_id.clone(),
            extra: e
                .extra
                .iter()
                .map(|(k, v)| RawExtra {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
    }
}

impl RawPayload {
    pub fn from_payload(p: &Payload) -> Self {
        match p {
            Payload::KvCache(kv) => RawPayload::KvCache {
                num_layers: kv.num_layers,
                num_kv_heads: kv.num_kv_heads,
                head_dim: kv.head_dim,
                seq_len: kv.seq_len,
                dtype: kv.dtype.code(),
                layout: kv.layout.code(),
                layer_start: kv.layers.start,
                layer_end: kv.layers.end,
            },
            Payload::HiddenState(h) => RawPayload::HiddenState {
                rows: h.rows,
                dim: h.dim,
                dtype: h.dtype.code(),
                map_id: h.map_id.clone(),
            },
            Payload::Text(t) => RawPayload::Text {
                format: t.format as u8,
                len: t.len,
            },
        }
    }
}

/// Serialize a header to bytes.
pub(crate) fn serialize(header: &RawHeader) -> Result<rkyv::util::AlignedVec> {
    rkyv::to_bytes::<rkyv::rancor::Error>(header)
        .map_err(|e| WireError::InvalidHeader(format!("serialization failed: {e}")))
}

/// Validate and access an archived header.
pub(crate) fn access(bytes: &[u8]) -> Result<&ArchivedRawHeader> {
    rkyv::access::<ArchivedRawHeader, rkyv::rancor::Error>(bytes)
        .map_err(|e| WireError::InvalidHeader(e.to_string()))
}
