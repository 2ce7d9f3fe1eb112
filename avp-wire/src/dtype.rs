//! Element types and KV layouts.

use std::fmt;

/// Element type of a tensor section. The numeric codes match the v1 `DataType` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum DType {
    /// IEEE 754 binary32.
    F32 = 0,
    /// IEEE 754 binary16.
    F16 = 1,
    /// bfloat16 (the top half of a binary32).
    Bf16 = 2,
    /// Signed 8-bit integers with per-channel f32 scales in their own section.
    I8 = 3,
}

impl DType {
    /// All element types, in code order.
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::Bf16, DType::I8];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::I8 => 1,
        }
    }

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The element type of a wire code, if it is one.
    pub const fn from_code(code: u8) -> Option<DType> {
        match code {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::Bf16),
            3 => Some(DType::I8),
            _ => None,
        }
    }

    /// Lower-case name, as used in JSON and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I8 => "i8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Order of the three axes of one layer's K or V tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[repr(u8)]
pub enum KvLayout {
    /// `[heads, seq, head_dim]`, row-major: the Hugging Face layout (batch squeezed).
    Hnd = 0,
    /// `[seq, heads, head_dim]`, row-major: the vLLM / flash-attention layout.
    Nhd = 1,
}

impl KvLayout {
    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The layout of a wire code, if it is one.
    pub const fn from_code(code: u8) -> Option<KvLayout> {
        match code {
            0 => Some(KvLayout::Hnd),
            1 => Some(KvLayout::Nhd),
            _ => None,
        }
    }

    /// Upper-case name ("HND" or "NHD").
    pub const fn name(self) -> &'static str {
        match self {
            KvLayout::Hnd => "HND",
            KvLayout::Nhd => "NHD",
        }
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rust element types that can view a section in place.
pub trait Element: bytemuck::Pod {
    /// The wire element type this Rust type reads.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::Bf16;
}
impl Element for i8 {
    const DTYPE: DType = DType::I8;
}
