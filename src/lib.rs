//! avp — the Agent Vector Protocol in Rust.
//!
//! Moves the state of an LLM (KV caches, hidden states) between agents, processes
//! and machines with no extra copies, so that agent B picks up where agent A left
//! off instead of re-reading A's text. This facade re-exports the workspace crates:
//!
//! - [`wire`] — the wire format (native v2, and the Python reference's v1);
//! - [`transport`] — sessions, the handshake, and the shared-memory, TCP and
//!   CUDA IPC (`cuda` feature) transports;
//! - [`model`] — the burn-backed decoder that produces and consumes the state.
//!
//! A KV cache, laid out as a message and read back in place:
//!
//! ```
//! use avp::wire::{DType, Envelope, KvCacheDesc, KvLayout, Message, MessageLayout, Payload};
//!
//! let kv = KvCacheDesc::new(2, 1, 4, 3, DType::F32, KvLayout::Hnd);
//! let layout = MessageLayout::new(&Envelope::default(), &Payload::KvCache(kv))?;
//! let mut buf = vec![0u8; layout.total_len()]; // or a loaned transport slot
//! let mut w = layout.writer(&mut buf)?;
//! for (i, section) in w.sections_mut().into_iter().enumerate() {
//!     section.fill(i as u8); // an engine writes K and V of each layer here
//! }
//! w.finish()?;
//! let msg = Message::parse(&buf)?;
//! msg.verify()?;
//! assert_eq!(msg.kv()?.k(1)?[0], 2);
//! # Ok::<(), avp::wire::WireError>(())
//! ```
//!
//! The end-to-end handoff between two agents is `examples/handoff.rs`.

pub use avp_model as model;
pub use avp_transport as transport;
pub use avp_wire as wire;
