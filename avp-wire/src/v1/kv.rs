//! The v1 inner KV payload: a 17-byte header, then `[K_l0][V_l0][K_l1][V_l1]...`,
//! each tensor `[heads, seq, head_dim]` row-major little-endian.

use crate::dtype::{DType, KvLayout};
use crate::error::{Result, WireError};
use crate::payload::KvCacheDesc;

/// Length of the inner KV header (`struct "<IIIIB"`).
pub const KV_HEADER_LEN: usize = 17;

/// The inner KV header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvHeader {
    /// Layers.
    pub num_layers: u32,
    /// KV heads per layer.
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Cached positions.
    pub seq_len: u32,
    /// f32, f16 or bf16 (v1 KV caches have no i8).
    pub dtype: DType,
}

impl KvHeader {
    /// The header of a v2 KV description, if v1 can carry it (all layers, HND, not
    /// i8, at most `u32::MAX` positions).
    pub fn from_desc(d: &KvCacheDesc) -> Result<KvHeader> {
        let bad = |reason: String| {
            Err(WireError::InvalidField {
                field: "v1 kv cache",
                reason,
            })
        };
        if d.layers.start != 0 || d.layers.end != d.num_layers {
            return bad(format!(
                "v1 carries whole caches; this one holds layers {}..{} of {}",
                d.layers.start, d.layers.end, d.num_layers
            ));
        }
        if d.layout != KvLayout::Hnd {
            return bad("v1 carries the HND layout only; transpose NHD first".into());
        }
        if d.dtype == DType::I8 {
            return bad("v1 KV caches carry f32, f16 or bf16, not i8".into());
        }
        let Ok(seq_len) = u32::try_from(d.seq_len) else {
            return bad(format!("seq_len {} exceeds u32", d.seq_len));
        };
        Ok(KvHeader {
            num_layers: d.num_layers,
            num_kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            seq_len,
            dtype: d.dtype,
        })
    }

    /// The equivalent v2 description (HND, all layers).
    pub fn to_desc(&self) -> KvCacheDesc {
        KvCacheDesc::new(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.seq_len as u64,
            self.dtype,
            KvLayout::Hnd,
        )
    }

    /// The 17 header bytes.
    pub fn to_bytes(&self) -> [u8; KV_HEADER_LEN] {
        let mut b = [0u8; KV_HEADER_LEN];
        b[0..4].copy_from_slice(&self.num_layers.to_le_bytes());
        b[4..8].copy_from_slice(&self.num_kv_heads.to_le_bytes());
        b[8..12].copy_from_slice(&self.head_dim.to_le_bytes());
        b[12..16].copy_from_slice(&self.seq_len.to_le_bytes());
        b[16] = self.dtype.code();
        b
    }

    /// Parse the 17 header bytes. Unlike the reference, an unknown dtype byte is an
    /// error rather than silently read as f16.
    pub fn from_bytes(b: &[u8]) -> Result<KvHeader> {
        if b.len() < KV_HEADER_LEN {
            return Err(WireError::Truncated {
                what: "v1 KV header",
                needed: KV_HEADER_LEN as u64,
                available: b.len() as u64,
            });
        }
        let u = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let dtype = match DType::from_code(b[16]) {
            Some(d @ (DType::F32 | DType::F16 | DType::Bf16)) => d,
            _ => {
                return Err(WireError::InvalidField {
                    field: "v1 KV dtype byte",
                    reason: format!("expected 0 (f32), 1 (f16) or 2 (bf16), found {}", b[16]),
                });
            }
        };
        Ok(KvHeader {
            num_layers: u(0),
            num_kv_heads: u(4),
            head_dim: u(8),
            seq_len: u(12),
            dtype,
        })
    }

    /// Bytes of one layer's K (or V).
    pub fn tensor_bytes(&self) -> Result<u64> {
        self.to_desc().tensor_bytes()
    }

    /// Bytes of the whole inner payload, header included.
    pub fn payload_len(&self) -> Result<u64> {
        self.tensor_bytes()?
            .checked_mul(2 * self.num_layers as u64)
            .and_then(|n| n.checked_add(KV_HEADER_LEN as u64))
            .ok_or(WireError::SizeOverflow("v1 KV payload"))
    }
}

/// A parsed inner KV payload borrowing its bytes.
#[derive(Clone, Copy, Debug)]
pub struct KvPayload<'a> {
    /// The header.
    pub header: KvHeader,
    data: &'a [u8],
    tensor: usize,
}

impl<'a> KvPayload<'a> {
    /// Parse an inner KV payload; its length must match the header exactly.
    pub fn parse(bytes: &'a [u8]) -> Result<KvPayload<'a>> {
        let header = KvHeader::from_bytes(bytes)?;
        let need = header.payload_len()?;
        if (bytes.len() as u64) < need {
            return Err(WireError::Truncated {
                what: "v1 KV payload",
                needed: need,
                available: bytes.len() as u64,
            });
        }
        if bytes.len() as u64 > need {
            return Err(WireError::TrailingBytes {
                declared: need,
                extra: bytes.len() as u64 - need,
            });
        }
        Ok(KvPayload {
            header,
            data: &bytes[KV_HEADER_LEN..],
            tensor: header.tensor_bytes()? as usize,
        })
    }

    fn slice(&self, layer: u32, which: usize) -> Result<&'a [u8]> {
        if layer >= self.header.num_layers {
            return Err(WireError::LayerOutOfRange {
                layer,
                start: 0,
                end: self.header.num_layers,
            });
        }
        let start = (layer as usize * 2 + which) * self.tensor;
        Ok(&self.data[start..start + self.tensor])
    }

    /// `layer`'s K bytes.
    pub fn k(&self, layer: u32) -> Result<&'a [u8]> {
        self.slice(layer, 0)
    }

    /// `layer`'s V bytes.
    pub fn v(&self, layer: u32) -> Result<&'a [u8]> {
        self.slice(layer, 1)
    }

    /// Every tensor in wire order (`K0, V0, K1, V1, ...`), e.g. to copy into a v2 message.
    pub fn tensors(&self) -> Vec<&'a [u8]> {
        if self.tensor == 0 {
            return vec![&self.data[..0]; 2 * self.header.num_layers as usize];
        }
        self.data.chunks(self.tensor).collect()
    }
}
