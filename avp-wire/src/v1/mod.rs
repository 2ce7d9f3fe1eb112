//! The v1 format of the Python reference `avp` 0.6.2, byte for byte.
//!
//! ```text
//! 0   2  magic "AV"
//! 2   1  version 0x01
//! 3   1  flags: 0x01 compressed (zstd), 0x02 has map id, 0x04 KV cache
//! 4   4  payload_length  u32 LE = metadata length + stored tensor length
//! 8   4  metadata_length u32 LE
//! 12  M  protobuf avp.Metadata
//! 12+M   tensor bytes (zstd frame if compressed)
//! ```
//!
//! [`decode`] follows the reference's order of checks (length, magic, version,
//! truncation, protobuf, decompression, checksum, enums) and adds the checks the
//! reference skips: metadata inside the payload, no trailing bytes, no reserved
//! flags, flags consistent with the metadata, and a cap on the decompressed size
//! enforced before allocating.
//!
//! ```
//! use avp_wire::v1::{self, Compression, Metadata};
//!
//! let meta = Metadata { model_id: "test-model".into(), hidden_dim: 2, tensor_shape: vec![2], ..Default::default() };
//! let payload: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
//! let bytes = v1::encode(&payload, &meta, Compression::None)?;
//! let msg = v1::decode(&bytes)?;
//! assert_eq!(&msg.payload[..], &payload[..]);
//! assert_eq!(msg.metadata.payload_checksum, Some(crc32fast::hash(&payload)));
//! # Ok::<(), avp_wire::WireError>(())
//! ```

mod kv;
mod metadata;

use std::borrow::Cow;

use prost::Message as _;

pub use kv::{KV_HEADER_LEN, KvHeader, KvPayload};
pub use metadata::{CommunicationMode, DataType, Metadata, PayloadType};

use crate::dtype::DType;
use crate::envelope::Envelope;
use crate::error::{Result, WireError};
use crate::header::MAGIC;
use crate::payload::{HiddenStateDesc, Payload};

/// The v1 version byte.
pub const VERSION_V1: u8 = 1;
/// Length of the fixed v1 header.
pub const HEADER_LEN: usize = 12;
/// Flag: tensor bytes are a zstd frame.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Flag: `avp_map_id` is set.
pub const FLAG_HAS_MAP: u8 = 0x02;
/// Flag: the payload is a KV cache.
pub const FLAG_KV_CACHE: u8 = 0x04;
const KNOWN_FLAGS: u8 = FLAG_COMPRESSED | FLAG_HAS_MAP | FLAG_KV_CACHE;

/// zstd levels of the reference's `CompressionLevel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    /// Stored as is.
    #[default]
    None,
    /// zstd level 1.
    Fast,
    /// zstd level 3.
    Balanced,
    /// zstd level 19.
    Max,
}

impl Compression {
    /// The zstd level (0 for none).
    pub const fn level(self) -> i32 {
        match self {
            Compression::None => 0,
            Compression::Fast => 1,
            Compression::Balanced => 3,
            Compression::Max => 19,
        }
    }

    /// The compression of a reference level number (0, 1, 3, 19).
    pub const fn from_level(level: i32) -> Option<Compression> {
        match level {
            0 => Some(Compression::None),
            1 => Some(Compression::Fast),
            3 => Some(Compression::Balanced),
            19 => Some(Compression::Max),
            _ => None,
        }
    }
}

/// Limits a decoder enforces before allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest decompressed tensor payload accepted.
    pub max_decompressed: u64,
}

impl Default for Limits {
    /// 4 GiB, the largest payload v1 can describe uncompressed.
    fn default() -> Self {
        Limits {
            max_decompressed: u32::MAX as u64,
        }
    }
}

/// The fixed v1 header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Flag bits.
    pub flags: u8,
    /// Metadata length plus stored tensor length.
    pub payload_length: u32,
    /// Metadata length.
    pub metadata_length: u32,
}

/// A decoded v1 message.
#[derive(Clone, Debug)]
pub struct Decoded<'a> {
    /// The fixed header.
    pub header: Header,
    /// The metadata.
    pub metadata: Metadata,
    /// The tensor bytes: borrowed from the input when stored uncompressed, owned when decompressed.
    pub payload: Cow<'a, [u8]>,
}

impl Decoded<'_> {
    /// Whether the tensor bytes were zstd-compressed on the wire.
    pub fn compressed(&self) -> bool {
        self.header.flags & FLAG_COMPRESSED != 0
    }

    /// The payload type.
    pub fn payload_type(&self) -> PayloadType {
        self.metadata.payload_type()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        dtype_of(self.metadata.dtype()).expect("validated by decode")
    }

    /// The inner KV payload of a KV-cache message.
    pub fn kv(&self) -> Result<KvPayload<'_>> {
        if self.payload_type() != PayloadType::KvCache {
            return Err(WireError::WrongPayload {
                expected: "kv_cache",
                found: "hidden_state",
            });
        }
        KvPayload::parse(&self.payload)
    }
}

fn dtype_of(d: DataType) -> Option<DType> {
    DType::from_code(d as i32 as u8)
}

/// Encode a message whose tensor bytes are `payload`, as the reference's `codec.encode` does:
/// the checksum is always written, flags follow the metadata, and `compression` is
/// set to `"zstd"` when compressing.
pub fn encode(payload: &[u8], metadata: &Metadata, compression: Compression) -> Result<Vec<u8>> {
    encode_parts(&[payload], metadata, compression)
}

/// Encode a KV-cache message from the KV header and the tensors in wire order
/// (`K0, V0, K1, V1, ...`), copying each tensor once. Sets `payload_type` to KV
/// cache and `dtype` from the header.
pub fn encode_kv(
    header: &KvHeader,
    tensors: &[&[u8]],
    metadata: &Metadata,
    compression: Compression,
) -> Result<Vec<u8>> {
    let want = 2 * header.num_layers as usize;
    let size = header.tensor_bytes()?;
    if tensors.len() != want || tensors.iter().any(|t| t.len() as u64 != size) {
        return Err(WireError::InvalidField {
            field: "v1 kv tensors",
            reason: format!(
                "expected {want} tensors of {size} bytes, got {} of sizes {:?}",
                tensors.len(),
                tensors.iter().map(|t| t.len()).take(4).collect::<Vec<_>>()
            ),
        });
    }
    let head = header.to_bytes();
    let mut parts: Vec<&[u8]> = Vec::with_capacity(want + 1);
    parts.push(&head);
    parts.extend_from_slice(tensors);
    let mut meta = metadata.clone();
    meta.set_payload_type(PayloadType::KvCache);
    meta.dtype = header.dtype.code() as i32;
    encode_parts(&parts, &meta, compression)
}

/// Encode a message whose tensor bytes are the concatenation of `parts`.
pub fn encode_parts(
    parts: &[&[u8]],
    metadata: &Metadata,
    compression: Compression,
) -> Result<Vec<u8>> {
    let mut meta = metadata.clone();
    let mut h = crc32fast::Hasher::new();
    parts.iter().for_each(|p| h.update(p));
    meta.payload_checksum = Some(h.finalize());
    meta.compression = (compression != Compression::None).then(|| "zstd".to_owned());
    let mut flags = 0;
    if compression != Compression::None {
        flags |= FLAG_COMPRESSED;
    }
    if !meta.avp_map_id.is_empty() {
        flags |= FLAG_HAS_MAP;
    }
    if meta.payload_type == PayloadType::KvCache as i32 {
        flags |= FLAG_KV_CACHE;
    }
    let meta_len = meta.encoded_len();
    let raw_len: usize = parts.iter().map(|p| p.len()).sum();
    let compressed = match compression {
        Compression::None => None,
        c => {
            let joined = parts.concat();
            // The one-shot API writes the frame content size, which the reference's decoder requires.
            Some(
                zstd::bulk::compress(&joined, c.level())
                    .map_err(|e| WireError::Zstd(e.to_string()))?,
            )
        }
    };
    let stored = compressed.as_ref().map_or(raw_len, Vec::len);
    let payload_length =
        u32::try_from(meta_len as u64 + stored as u64).map_err(|_| WireError::LimitExceeded {
            what: "v1 message (lengths are u32)",
            size: meta_len as u64 + stored as u64,
            limit: u32::MAX as u64,
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload_length as usize);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION_V1);
    out.push(flags);
    out.extend_from_slice(&payload_length.to_le_bytes());
    out.extend_from_slice(&(meta_len as u32).to_le_bytes());
    meta.encode(&mut out).expect("Vec grows as needed");
    match &compressed {
        Some(c) => out.extend_from_slice(c),
        None => parts.iter().for_each(|p| out.extend_from_slice(p)),
    }
    Ok(out)
}

/// Decode a v1 message with the default [`Limits`].
pub fn decode(bytes: &[u8]) -> Result<Decoded<'_>> {
    decode_with_limits(bytes, &Limits::default())
}

/// Decode a v1 message, refusing decompressed payloads over `limits`.
pub fn decode_with_limits<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Decoded<'a>> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            what: "v1 header",
            needed: HEADER_LEN as u64,
            available: bytes.len() as u64,
        });
    }
    if bytes[..2] != MAGIC {
        return Err(WireError::InvalidMagic {
            found: u16::from_be_bytes([bytes[0], bytes[1]]),
        });
    }
    if bytes[2] != VERSION_V1 {
        return Err(WireError::UnsupportedVersion {
            found: bytes[2],
            expected: "1",
        });
    }
    let u = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let header = Header {
        flags: bytes[3],
        payload_length: u(4),
        metadata_length: u(8),
    };
    let total = HEADER_LEN as u64 + header.payload_length as u64;
    if (bytes.len() as u64) < total {
        return Err(WireError::Truncated {
            what: "v1 message",
            needed: total,
            available: bytes.len() as u64,
        });
    }
    if bytes.len() as u64 > total {
        return Err(WireError::TrailingBytes {
            declared: total,
            extra: bytes.len() as u64 - total,
        });
    }
    if header.metadata_length > header.payload_length {
        return Err(WireError::InvalidField {
            field: "metadata_length",
            reason: format!(
                "{} exceeds payload_length {}",
                header.metadata_length, header.payload_length
            ),
        });
    }
    if header.flags & !KNOWN_FLAGS != 0 {
        return Err(WireError::UnknownFlags {
            bits: header.flags & !KNOWN_FLAGS,
            known: KNOWN_FLAGS,
        });
    }
    let meta_end = HEADER_LEN + header.metadata_length as usize;
    let metadata = Metadata::decode(&bytes[HEADER_LEN..meta_end])
        .map_err(|e| WireError::Protobuf(e.to_string()))?;
    let stored = &bytes[meta_end..total as usize];
    let payload: Cow<'a, [u8]> = if header.flags & FLAG_COMPRESSED != 0 {
        Cow::Owned(decompress(stored, limits)?)
    } else {
        Cow::Borrowed(stored)
    };
    if let Some(expected) = metadata.payload_checksum {
        let actual = crc32fast::hash(&payload);
        if actual != expected {
            return Err(WireError::ChecksumMismatch {
                what: "v1 payload".into(),
                expected,
                actual,
            });
        }
    }
    let unknown = |field, v: i32, allowed: &str| {
        Err(WireError::InvalidField {
            field,
            reason: format!(
                "unknown value {v} (known: {allowed}); the sender may use a newer AVP version"
            ),
        })
    };
    if DataType::try_from(metadata.dtype).is_err() {
        return unknown("dtype", metadata.dtype, "0 f32, 1 f16, 2 bf16, 3 i8");
    }
    if PayloadType::try_from(metadata.payload_type).is_err() {
        return unknown(
            "payload_type",
            metadata.payload_type,
            "0 hidden_state, 1 kv_cache",
        );
    }
    if CommunicationMode::try_from(metadata.mode).is_err() {
        return unknown("mode", metadata.mode, "0 latent, 1 json");
    }
    let kv_flag = header.flags & FLAG_KV_CACHE != 0;
    if kv_flag != (metadata.payload_type == PayloadType::KvCache as i32) {
        return Err(WireError::InvalidField {
            field: "flags",
            reason: format!(
                "KV_CACHE flag is {} but payload_type is {}",
                if kv_flag { "set" } else { "clear" },
                metadata.payload_type
            ),
        });
    }
    let map_flag = header.flags & FLAG_HAS_MAP != 0;
    if map_flag == metadata.avp_map_id.is_empty() {
        return Err(WireError::InvalidField {
            field: "flags",
            reason: format!(
                "HAS_MAP flag is {} but avp_map_id is {:?}",
                if map_flag { "set" } else { "clear" },
                metadata.avp_map_id
            ),
        });
    }
    Ok(Decoded {
        header,
        metadata,
        payload,
    })
}

fn decompress(frame: &[u8], limits: &Limits) -> Result<Vec<u8>> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(WireError::Zstd(
                "frame does not record its content size (required by the v1 format)".into(),
            ));
        }
        Err(_) => return Err(WireError::Zstd("not a valid zstd frame header".into())),
    };
    if size > limits.max_decompressed {
        return Err(WireError::LimitExceeded {
            what: "decompressed v1 payload",
            size,
            limit: limits.max_decompressed,
        });
    }
    let out =
        zstd::bulk::decompress(frame, size as usize).map_err(|e| WireError::Zstd(e.to_string()))?;
    if out.len() as u64 != size {
        return Err(WireError::Zstd(format!(
            "frame declared {size} bytes, decompressed to {}",
            out.len()
        )));
    }
    Ok(out)
}

/// Convert a v2 message (KV cache or hidden state) into a v1 message the Python
/// reference reads. Envelope fields map to metadata fields; `model_hash`,
/// `model_family` and the extras go to `extra`, as the reference's `AVPContext` expects.
pub fn from_v2(msg: &crate::Message<'_>, compression: Compression) -> Result<Vec<u8>> {
    let env = msg.envelope();
    let mut meta = Metadata {
        session_id: env.session_id().into(),
        source_agent_id: env.source_agent_id().into(),
        target_agent_id: env.target_agent_id().into(),
        model_id: env.model_id().into(),
        extra: env
            .extra()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Default::default()
    };
    for (k, v) in [
        ("model_hash", env.model_hash()),
        ("model_family", env.model_family()),
    ] {
        if !v.is_empty() {
            meta.extra.insert(k.into(), v.into());
        }
    }
    match msg.payload() {
        Payload::KvCache(desc) => {
            let header = KvHeader::from_desc(&desc)?;
            meta.num_layers = desc.num_layers;
            let view = msg.kv()?;
            let mut tensors = Vec::with_capacity(2 * desc.num_layers as usize);
            for l in 0..desc.num_layers {
                tensors.push(view.k(l)?);
                tensors.push(view.v(l)?);
            }
            encode_kv(&header, &tensors, &meta, compression)
        }
        Payload::HiddenState(h) => {
            if h.dtype == DType::I8 {
                return Err(WireError::InvalidField {
                    field: "v1 hidden state",
                    reason: "v1 has no place for i8 scales".into(),
                });
            }
            let dim = u32::try_from(h.dim).map_err(|_| WireError::SizeOverflow("v1 hidden_dim"))?;
            let rows =
                u32::try_from(h.rows).map_err(|_| WireError::SizeOverflow("v1 tensor_shape"))?;
            meta.hidden_dim = dim;
            meta.dtype = h.dtype.code() as i32;
            meta.tensor_shape = vec![rows, dim];
            meta.avp_map_id = h.map_id.clone();
            encode(msg.hidden()?.data(), &meta, compression)
        }
        Payload::Text(_) => Err(WireError::WrongPayload {
            expected: "kv_cache or hidden_state",
            found: "text",
        }),
    }
}

/// Convert a decoded v1 message into a v2 message (KV caches become HND caches of
/// all layers; hidden states take their shape from `tensor_shape`, else one row of
/// `hidden_dim`).
pub fn to_v2(decoded: &Decoded<'_>) -> Result<Vec<u8>> {
    let m = &decoded.metadata;
    let mut envelope = Envelope {
        model_id: m.model_id.clone(),
        session_id: m.session_id.clone(),
        source_agent_id: m.source_agent_id.clone(),
        target_agent_id: m.target_agent_id.clone(),
        extra: m.extra.clone(),
        ..Default::default()
    };
    envelope.model_hash = envelope.extra.remove("model_hash").unwrap_or_default();
    envelope.model_family = envelope.extra.remove("model_family").unwrap_or_default();
    match decoded.payload_type() {
        PayloadType::KvCache => {
            let kv = decoded.kv()?;
            crate::encode_to_vec(
                &envelope,
                &Payload::KvCache(kv.header.to_desc()),
                &kv.tensors(),
            )
        }
        PayloadType::HiddenState => {
            let dtype = decoded.dtype();
            let elems = decoded.payload.len() / dtype.size();
            let dim = match m.tensor_shape.last() {
                Some(&d) if d > 0 => d as u64,
                _ if m.hidden_dim > 0 => m.hidden_dim as u64,
                _ => elems as u64,
            };
            if dim == 0 || !(decoded.payload.len() as u64).is_multiple_of(dim * dtype.size() as u64)
            {
                return Err(WireError::InvalidField {
                    field: "v1 hidden state",
                    reason: format!(
                        "{} payload bytes are not whole rows of {dim} {dtype} values",
                        decoded.payload.len()
                    ),
                });
            }
            let desc = HiddenStateDesc {
                rows: decoded.payload.len() as u64 / (dim * dtype.size() as u64),
                dim,
                dtype,
                map_id: m.avp_map_id.clone(),
            };
            crate::encode_to_vec(&envelope, &Payload::HiddenState(desc), &[&decoded.payload])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    const V1: &str = "415601002a0000001a00000012076167656e742d61220a746573742d6d6f64656c28044a0104cdcccc3dcdcc4c3e9a99993ecdcccc3e";
    const V2: &str = "415601000d0000000500000028024a01020000803f00000040";
    const V1_CRC: &str = "41560100300000002000000012076167656e742d61220a746573742d6d6f64656c28044a010478c4d3a29c0acdcccc3dcdcc4c3e9a99993ecdcccc3e";
    const V2_CRC: &str = "41560100130000000b00000028024a010278f6cafef1020000803f00000040";
    const KV_CRC: &str = "41560104230000000a0000003801400178d696c0c60f0100000001000000020000000100000001003c004000420044";

    fn v1_meta() -> Metadata {
        Metadata {
            source_agent_id: "agent-a".into(),
            model_id: "test-model".into(),
            hidden_dim: 4,
            tensor_shape: vec![4],
            ..Default::default()
        }
    }

    #[test]
    fn spec_vectors_without_checksum_decode() {
        let bytes = hex(V1);
        let m = decode(&bytes).unwrap();
        assert_eq!(m.header.payload_length, 42);
        assert_eq!(m.header.metadata_length, 26);
        assert_eq!(m.metadata, v1_meta());
        assert_eq!(&m.payload[..], &f32s(&[0.1, 0.2, 0.3, 0.4])[..]);
        let bytes = hex(V2);
        let m = decode(&bytes).unwrap();
        assert_eq!(m.metadata.hidden_dim, 2);
        assert_eq!(&m.payload[..], &f32s(&[1.0, 2.0])[..]);
        assert_eq!(m.metadata.payload_checksum, None);
    }

    #[test]
    fn spec_vectors_with_checksum_encode_byte_for_byte() {
        let got = encode(&f32s(&[0.1, 0.2, 0.3, 0.4]), &v1_meta(), Compression::None).unwrap();
        assert_eq!(got, hex(V1_CRC));
        let meta = Metadata {
            hidden_dim: 2,
            tensor_shape: vec![2],
            ..Default::default()
        };
        let got = encode(&f32s(&[1.0, 2.0]), &meta, Compression::None).unwrap();
        assert_eq!(got, hex(V2_CRC));
        assert_eq!(
            decode(&got).unwrap().metadata.payload_checksum,
            Some(0x2e3fa576)
        );
    }

    #[test]
    fn kv_vector_encodes_byte_for_byte() {
        let header = KvHeader {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 2,
            seq_len: 1,
            dtype: DType::F16,
        };
        let f16s = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let (k, v) = (f16s(&[1.0, 2.0]), f16s(&[3.0, 4.0]));
        let got = encode_kv(&header, &[&k, &v], &Metadata::default(), Compression::None).unwrap();
        assert_eq!(got, hex(KV_CRC));
        let d = decode(&got).unwrap();
        let kv = d.kv().unwrap();
        assert_eq!(kv.header, header);
        assert_eq!(kv.k(0).unwrap(), &k[..]);
        assert_eq!(kv.v(0).unwrap(), &v[..]);
        assert!(kv.k(1).is_err());
    }

    #[test]
    fn zstd_levels_round_trip_and_record_content_size() {
        let payload: Vec<u8> = (0..10_000u32)
            .flat_map(|i| (i % 97).to_le_bytes())
            .collect();
        for c in [Compression::Fast, Compression::Balanced, Compression::Max] {
            let bytes = encode(&payload, &v1_meta(), c).unwrap();
            assert_eq!(bytes[3] & FLAG_COMPRESSED, FLAG_COMPRESSED);
            let d = decode(&bytes).unwrap();
            assert!(d.compressed());
            assert_eq!(d.metadata.compression.as_deref(), Some("zstd"));
            assert_eq!(&d.payload[..], &payload[..]);
            let frame = &bytes[HEADER_LEN + d.header.metadata_length as usize..];
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(frame).unwrap(),
                Some(payload.len() as u64)
            );
            let small = Limits {
                max_decompressed: 1000,
            };
            assert!(matches!(
                decode_with_limits(&bytes, &small),
                Err(WireError::LimitExceeded { .. })
            ));
        }
    }

    #[test]
    fn accepts_unpacked_shape_unknown_fields_and_any_order() {
        // Hand-built metadata: field 9 unpacked (two 0x48 entries), an unknown field 99
        // (varint), and hidden_dim written after tensor_shape.
        let meta: Vec<u8> = vec![0x48, 0x02, 0x48, 0x03, 0x98, 0x06, 0x07, 0x28, 0x06];
        let payload = [0u8; 4];
        let mut msg = vec![0x41, 0x56, 0x01, 0x00];
        msg.extend_from_slice(&((meta.len() + payload.len()) as u32).to_le_bytes());
        msg.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        msg.extend_from_slice(&meta);
        msg.extend_from_slice(&payload);
        let d = decode(&msg).unwrap();
        assert_eq!(d.metadata.tensor_shape, vec![2, 3]);
        assert_eq!(d.metadata.hidden_dim, 6);
    }

    #[test]
    fn bad_input_gets_typed_errors() {
        let good = hex(V1_CRC);
        assert!(matches!(
            decode(&[0x41, 0x56, 0x01]),
            Err(WireError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[0u8; 12]),
            Err(WireError::InvalidMagic { found: 0 })
        ));
        let mut v = good.clone();
        v[2] = 0xff;
        assert!(matches!(
            decode(&v),
            Err(WireError::UnsupportedVersion { found: 0xff, .. })
        ));
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut v = good.clone();
        v.push(0);
        assert!(matches!(
            decode(&v),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
        let mut v = good.clone();
        *v.last_mut().unwrap() ^= 1;
        let e = decode(&v).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let mut v = good.clone();
        v[3] = 0x08;
        assert!(matches!(
            decode(&v),
            Err(WireError::UnknownFlags { bits: 0x08, .. })
        ));
        let mut v = good.clone();
        v[3] = FLAG_KV_CACHE;
        assert!(matches!(
            decode(&v),
            Err(WireError::InvalidField { field: "flags", .. })
        ));
        let mut v = good.clone();
        v[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            decode(&v),
            Err(WireError::InvalidField {
                field: "metadata_length",
                ..
            })
        ));
        // Unknown dtype 7 (field 8) in an otherwise valid message.
        let meta = Metadata {
            dtype: 7,
            ..Default::default()
        };
        let bytes = encode(b"", &meta, Compression::None).unwrap();
        assert!(matches!(
            decode(&bytes),
            Err(WireError::InvalidField { field: "dtype", .. })
        ));
        // Corrupt zstd frame.
        let mut z = encode(&[1u8; 100], &Metadata::default(), Compression::Fast).unwrap();
        let n = z.len();
        z[n - 3] ^= 0xff;
        assert!(decode(&z).is_err());
    }

    #[test]
    fn unknown_kv_dtype_byte_is_refused() {
        let mut h = KvHeader {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            seq_len: 1,
            dtype: DType::F32,
        }
        .to_bytes();
        h[16] = 9;
        assert!(matches!(
            KvHeader::from_bytes(&h),
            Err(WireError::InvalidField { .. })
        ));
    }

    #[test]
    fn v2_conversion_round_trips() {
        use crate::{KvCacheDesc, KvLayout, Message};
        let desc = KvCacheDesc::new(3, 2, 4, 5, DType::Bf16, KvLayout::Hnd);
        let tensor = desc.tensor_bytes().unwrap() as usize;
        let data: Vec<Vec<u8>> = (0..6).map(|i| vec![i as u8 + 1; tensor]).collect();
        let refs: Vec<&[u8]> = data.iter().map(|v| &v[..]).collect();
        let env = Envelope {
            model_id: "m".into(),
            model_hash: "h".into(),
            session_id: "s".into(),
            ..Default::default()
        };
        let v2 = crate::encode_to_vec(&env, &Payload::KvCache(desc), &refs).unwrap();
        let v1 = from_v2(&Message::parse(&v2).unwrap(), Compression::Balanced).unwrap();
        let d = decode(&v1).unwrap();
        assert_eq!(
            d.metadata.extra.get("model_hash").map(String::as_str),
            Some("h")
        );
        assert_eq!(d.kv().unwrap().v(2).unwrap(), &data[5][..]);
        let back = to_v2(&d).unwrap();
        assert_eq!(back, v2, "v2 -> v1 -> v2 is the identity");
    }
}
