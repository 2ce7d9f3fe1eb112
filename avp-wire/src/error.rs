//! The one error type of this crate.

use crate::dtype::DType;

/// Everything that can go wrong while laying out, encoding, parsing or verifying a message.
///
/// Every variant says what was expected and what was found, so a message can be
/// logged or shown to a user as it is. Decoders return these for any input bytes;
/// they never panic.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than the format needs at this point.
    #[error("message truncated: {what} needs {needed} bytes, only {available} present")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes required.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// More bytes than the message declares.
    #[error(
        "{extra} trailing bytes after a message of {declared} bytes (use parse_prefix for concatenated messages)"
    )]
    TrailingBytes {
        /// Declared message length.
        declared: u64,
        /// Bytes after it.
        extra: u64,
    },
    /// The first two bytes are not "AV".
    #[error("invalid magic bytes: expected 0x4156 (\"AV\"), found 0x{found:04x}")]
    InvalidMagic {
        /// The two bytes found, big-endian as they appear on the wire.
        found: u16,
    },
    /// A version byte this decoder does not speak.
    #[error("unsupported wire version {found}: this decoder reads {expected}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// What the decoder reads (e.g. "2" or "1 or 2").
        expected: &'static str,
    },
    /// Flag bits that this version does not define are set.
    #[error("unknown flag bits 0x{bits:02x} set (known bits: 0x{known:02x})")]
    UnknownFlags {
        /// The unknown bits.
        bits: u8,
        /// The bits this decoder understands.
        known: u8,
    },
    /// A reserved field is not zero.
    #[error("reserved field {field} must be zero, found {found}")]
    ReservedNotZero {
        /// Which field.
        field: &'static str,
        /// Its value.
        found: u64,
    },
    /// A checksum did not match the bytes it covers.
    #[error("checksum mismatch in {what}: header says 0x{expected:08x}, bytes give 0x{actual:08x}")]
    ChecksumMismatch {
        /// What the checksum covers ("preamble", "header", "section 3 (K layer 1)", "v1 payload").
        what: String,
        /// The recorded checksum.
        expected: u32,
        /// The checksum of the bytes present.
        actual: u32,
    },
    /// The rkyv header failed bytecheck validation.
    #[error("invalid v2 header: {0}")]
    InvalidHeader(String),
    /// A field holds a value the format does not allow.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The section table disagrees with what the payload description implies.
    #[error("section {index}: {reason}")]
    BadSection {
        /// Index in the section table.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A size computation overflowed (shapes too large for u64 or usize).
    #[error("size overflow computing {0}")]
    SizeOverflow(&'static str),
    /// A message or a decompressed payload is larger than the configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    LimitExceeded {
        /// What was measured.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit in force.
        limit: u64,
    },
    /// The caller asked for a layer the message does not carry.
    #[error("layer {layer} is not in this message (it carries layers {start}..{end})")]
    LayerOutOfRange {
        /// Requested layer.
        layer: u32,
        /// First layer carried.
        start: u32,
        /// One past the last layer carried.
        end: u32,
    },
    /// A typed view was requested with the wrong element type.
    #[error("dtype mismatch: the message holds {found}, the caller asked for {expected}")]
    DTypeMismatch {
        /// What the caller asked for.
        expected: DType,
        /// What the message holds.
        found: DType,
    },
    /// A typed view was requested on bytes not aligned for the element type.
    #[error(
        "section at address 0x{address:x} is not aligned to {align} bytes for a typed view; copy it out instead"
    )]
    Misaligned {
        /// The address of the section.
        address: usize,
        /// The alignment needed.
        align: usize,
    },
    /// A payload of the wrong kind for the operation (e.g. asking a hidden-state message for its KV cache).
    #[error("wrong payload kind: expected {expected}, found {found}")]
    WrongPayload {
        /// Kind needed.
        expected: &'static str,
        /// Kind present.
        found: &'static str,
    },
    /// The caller's buffer is not the size the layout needs.
    #[error("buffer of {found} bytes given, the layout needs {expected}")]
    BufferSize {
        /// Size required.
        expected: u64,
        /// Size given.
        found: u64,
    },
    /// A section was never written before `finish`.
    #[error("section {index} ({name}) was never written; write every section before finishing")]
    SectionNotWritten {
        /// Index in the section table.
        index: usize,
        /// Its role and layer, e.g. "K layer 3".
        name: String,
    },
    /// The v1 protobuf metadata could not be decoded.
    #[error("invalid v1 metadata protobuf: {0}")]
    Protobuf(String),
    /// zstd failed to compress or decompress.
    #[error("zstd: {0}")]
    Zstd(String),
    /// Text that should be UTF-8 is not.
    #[error("text section is not valid UTF-8 at byte {valid_up_to}")]
    InvalidUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = WireError> = std::result::Result<T, E>;
