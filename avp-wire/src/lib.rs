//! The avp wire format.
//!
//! Two formats share the magic bytes `"AV"` and differ in the version byte:
//!
//! - **v2** (native, version `0x02`): a 32-byte [`Preamble`], an rkyv-archived
//!   header validated with bytecheck, then raw tensor sections at aligned offsets,
//!   each with its own CRC32. [`Message::parse`] validates everything but the tensor
//!   bytes in constant time and hands out borrowed slices; checksums are verified on
//!   demand, per section. [`MessageLayout`] plans a message before it is written so
//!   the sender fills tensors straight into their final place.
//! - **v1** (version `0x01`): the format of the Python reference `avp` 0.6.2,
//!   byte for byte ([`v1`]).
//!
//! [`ModelIdentity`] and [`Resolver`] decide, from two models' identities, whether
//! agents can exchange KV caches (latent), need a cross-model projection, or must
//! fall back to JSON text.
//!
//! # Writing a KV cache in place and reading it back
//!
//! ```
//! use avp_wire::{DType, Envelope, KvCacheDesc, KvLayout, Message, MessageLayout, Payload};
//!
//! # fn main() -> Result<(), avp_wire::WireError> {
//! let kv = KvCacheDesc::new(2, 4, 64, 16, DType::F16, KvLayout::Hnd);
//! let envelope = Envelope { model_id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(), ..Default::default() };
//! let layout = MessageLayout::new(&envelope, &Payload::KvCache(kv))?;
//!
//! // Memory the sender owns: a shared-memory slot, a pinned buffer, or a Vec.
//! let mut buf = vec![0u8; layout.total_len()];
//! let mut writer = layout.writer(&mut buf)?;
//! for (i, section) in writer.sections_mut().into_iter().enumerate() {
//!     section.fill(i as u8); // the engine writes K(l) and V(l) here
//! }
//! writer.finish()?;
//!
//! // The receiver parses without touching tensor bytes, then verifies per layer.
//! let msg = Message::parse(&buf)?;
//! let view = msg.kv()?;
//! view.verify_layer(1)?;
//! assert_eq!(view.v(1)?[0], 3);
//! assert_eq!(view.k_as::<half::f16>(0)?.len(), 4 * 16 * 64);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod checksum;
mod dtype;
mod envelope;
mod error;
mod header;
mod identity;
mod layout;
mod message;
mod payload;
mod resolver;
mod streaming;
pub mod v1;
mod view;

pub use dtype::{DType, Element, KvLayout};
pub use envelope::{Envelope, EnvelopeRef};
pub use error::{Result, WireError};
pub use header::{
    FLAG_DEVICE_SECTIONS, KNOWN_FLAGS, MAGIC, MAX_HEADER_LEN, PREAMBLE_LEN, Preamble, VERSION_V2,
};
pub use identity::ModelIdentity;
pub use layout::{
    MAX_ALIGNMENT, MIN_ALIGNMENT, MessageLayout, MessageWriter, PAGE_ALIGN_FROM, PAGE_ALIGNMENT,
    SMALL_ALIGNMENT, SectionSpan, encode_to_vec,
};
pub use message::{Header, Message, Section, SectionInfo};
pub use payload::{
    HiddenStateDesc, KvCacheDesc, LayerRange, Payload, SectionRole, TextDesc, TextFormat,
};
pub use resolver::{
    MIN_VOCAB_OVERLAP, MapLookup, Mode, Resolution, ResolutionPath, Resolver, map_id,
};
pub use view::{HiddenView, KvView, TextView};

/// The wire version of a message, read from its first three bytes.
///
/// Returns the version byte after checking the magic; use it to pick
/// [`Message::parse`] (2) or [`v1::decode`] (1).
pub fn sniff_version(bytes: &[u8]) -> Result<u8> {
    if bytes.len() < 3 {
        return Err(WireError::Truncated {
            what: "magic and version",
            needed: 3,
            available: bytes.len() as u64,
        });
    }
    if bytes[..2] != MAGIC {
        return Err(WireError::InvalidMagic {
            found: u16::from_be_bytes([bytes[0], bytes[1]]),
        });
    }
    match bytes[2] {
        v @ (1 | 2) => Ok(v),
        found => Err(WireError::UnsupportedVersion {
            found,
            expected: "1 or 2",
        }),
    }
}
