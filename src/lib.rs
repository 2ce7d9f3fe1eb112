//! avp — the Agent Vector Protocol in Rust.
//!
//! Moves the state of an LLM (KV caches, hidden states) between agents, processes
//! and machines with no extra copies, so that agent B picks up where agent A left
//! off instead of re-reading A's text. This facade re-exports the workspace crates:
//!
//! - [`wire`] — the wire format (native v2, and the Python reference's v1);
//! - [`transport`] — shared-memory, TCP, CUDA IPC and RDMA transports;
//! - [`model`] — the burn-backed decoder that produces and consumes the state.

pub use avp_model as model;
pub use avp_transport as transport;
pub use avp_wire as wire;

pub mod eval;
pub mod pipeline;
