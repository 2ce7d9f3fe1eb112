//! Typed views of a parsed message's payload: every accessor returns bytes in place.

use crate::dtype::{DType, Element};
use crate::error::{Result, WireError};
use crate::message::Message;
use crate::payload::{KvCacheDesc, TextFormat};

fn typed<T: Element>(dtype: DType, bytes: &[u8]) -> Result<&[T]> {
    if T::DTYPE != dtype {
        return Err(WireError::DTypeMismatch {
            expected: T::DTYPE,
            found: dtype,
        });
    }
    bytemuck::try_cast_slice(bytes).map_err(|_| WireError::Misaligned {
        address: bytes.as_ptr() as usize,
        align: std::mem::align_of::<T>(),
    })
}

fn scales(bytes: &[u8]) -> Result<&[f32]> {
    typed::<f32>(DType::F32, bytes)
}

/// A KV cache inside a parsed message; every accessor returns bytes in place.
#[derive(Clone, Debug)]
pub struct KvView<'a> {
    pub(crate) desc: KvCacheDesc,
    pub(crate) msg: Message<'a>,
}

impl<'a> KvView<'a> {
    /// The cache's shape.
    pub fn desc(&self) -> &KvCacheDesc {
        &self.desc
    }

    fn index(&self, layer: u32, scale: bool) -> Result<usize> {
        let r = self.desc.layers;
        if !r.contains(layer) {
            return Err(WireError::LayerOutOfRange {
                layer,
                start: r.start,
                end: r.end,
            });
        }
        let base = (layer - r.start) as usize * 2;
        if scale {
            if self.desc.dtype != DType::I8 {
                return Err(WireError::DTypeMismatch {
                    expected: DType::I8,
                    found: self.desc.dtype,
                });
            }
            Ok(r.len() as usize * 2 + base)
        } else {
            Ok(base)
        }
    }

    /// Index of the K section of `layer` in the message's section table (V is the next one).
    pub fn k_section_index(&self, layer: u32) -> Result<usize> {
        self.index(layer, false)
    }

    /// Raw bytes of `layer`'s K tensor (in the desc's layout).
    pub fn k(&self, layer: u32) -> Result<&'a [u8]> {
        Ok(self.msg.section(self.index(layer, false)?)?.bytes)
    }

    /// Raw bytes of `layer`'s V tensor.
    pub fn v(&self, layer: u32) -> Result<&'a [u8]> {
        Ok(self.msg.section(self.index(layer, false)? + 1)?.bytes)
    }

    /// `layer`'s K as typed elements (`f32`, `half::f16`, `half::bf16`, `i8`).
    pub fn k_as<T: Element>(&self, layer: u32) -> Result<&'a [T]> {
        typed(self.desc.dtype, self.k(layer)?)
    }

    /// `layer`'s V as typed elements.
    pub fn v_as<T: Element>(&self, layer: u32) -> Result<&'a [T]> {
        typed(self.desc.dtype, self.v(layer)?)
    }

    /// Per-channel scales of an i8 K tensor (`num_kv_heads * head_dim` values).
    pub fn k_scales(&self, layer: u32) -> Result<&'a [f32]> {
        scales(self.msg.section(self.index(layer, true)?)?.bytes)
    }

    /// Per-channel scales of an i8 V tensor.
    pub fn v_scales(&self, layer: u32) -> Result<&'a [f32]> {
        scales(self.msg.section(self.index(layer, true)? + 1)?.bytes)
    }

    /// Verify the K and V sections (and scales) of one layer only.
    pub fn verify_layer(&self, layer: u32) -> Result<()> {
        let i = self.index(layer, false)?;
        self.msg.verify_section(i)?;
        self.msg.verify_section(i + 1)?;
        if self.desc.dtype == DType::I8 {
            let j = self.index(layer, true)?;
            self.msg.verify_section(j)?;
            self.msg.verify_section(j + 1)?;
        }
        Ok(())
    }
}

/// Hidden states inside a parsed message.
#[derive(Clone, Debug)]
pub struct HiddenView<'a> {
    /// Rows (positions).
    pub rows: u64,
    /// Elements per row.
    pub dim: u64,
    /// Element type.
    pub dtype: DType,
    /// Cross-model map id ("" for same-model).
    pub map_id: &'a str,
    pub(crate) msg: Message<'a>,
}

impl<'a> HiddenView<'a> {
    /// The raw bytes, row-major `[rows, dim]`.
    pub fn data(&self) -> &'a [u8] {
        self.msg.section(0).expect("hidden section").bytes
    }

    /// Typed elements.
    pub fn data_as<T: Element>(&self) -> Result<&'a [T]> {
        typed(self.dtype, self.data())
    }

    /// Per-column scales of i8 hidden states.
    pub fn scales(&self) -> Result<&'a [f32]> {
        if self.dtype != DType::I8 {
            return Err(WireError::DTypeMismatch {
                expected: DType::I8,
                found: self.dtype,
            });
        }
        scales(self.msg.section(1)?.bytes)
    }
}

/// Text inside a parsed message.
#[derive(Clone, Copy, Debug)]
pub struct TextView<'a> {
    /// How to read it.
    pub format: TextFormat,
    /// The raw bytes.
    pub bytes: &'a [u8],
}

impl<'a> TextView<'a> {
    /// The text, checked to be UTF-8.
    pub fn as_str(&self) -> Result<&'a str> {
        std::str::from_utf8(self.bytes).map_err(|e| WireError::InvalidUtf8 {
            valid_up_to: e.valid_up_to(),
        })
    }
}
