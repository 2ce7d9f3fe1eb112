//! The C ABI of avp. `include/avp.h` is generated from this crate by cbindgen;
//! `include/avp.hpp` is a header-only C++17 layer over it.
//!
//! Every exported function checks its arguments (NULL, sizes, enum values,
//! handles), catches panics, and reports failures as an [`avp_status`] plus a
//! thread-local message.
//!
//! A sender in C (`examples/c/sender.c`, which `tests/ffi.rs` compiles and runs
//! against `examples/c/receiver.c`), shortened:
//!
//! ```c
//! struct avp_sender tx;
//! enum avp_status s = avp_sender_connect("shm://demo", NULL, NULL, &tx);
//! if (s != AVP_OK) fprintf(stderr, "%s\n", avp_last_error_message());
//! struct avp_payload p = {0};                  /* SmolLM2's cache shape, 128 positions */
//! p.kind = AVP_KIND_KV_CACHE;
//! p.kv.num_layers = 30; p.kv.num_kv_heads = 3; p.kv.head_dim = 64; p.kv.seq_len = 128;
//! p.kv.dtype = AVP_DTYPE_F16; p.kv.layout = AVP_LAYOUT_HND;
//! avp_sender_loan(tx, NULL, &p);               /* a slot of the shared pool */
//! for (uint32_t layer = 0; layer < 30; layer++)
//!   for (uint32_t part = AVP_KV_K; part <= AVP_KV_V; part++) {
//!     uint8_t *dst; size_t len;
//!     avp_sender_loan_kv_section(tx, layer, part, &dst, &len);
//!     /* the engine writes this layer's K or V at dst */
//!   }
//! avp_sender_loan_send(tx);                    /* published in place, no copy */
//! avp_sender_free(tx);
//! ```
#![allow(non_camel_case_types)]
// Exported functions check every pointer they are given before use, and their
// safety contract is stated in the generated header.
#![allow(clippy::missing_safety_doc)]

mod endpoint;
mod message;
mod registry;
mod status;
mod types;
mod writer;

#[cfg(test)]
mod waits;

pub use endpoint::*;
pub use message::*;
pub use status::*;
pub use types::*;
pub use writer::*;

use std::ffi::c_char;

/// The library version, e.g. "0.1.0". Never NULL; static.
#[unsafe(no_mangle)]
pub extern "C" fn avp_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version: incremented on any incompatible change of this header
/// (2: device fields in `avp_options` and `avp_message_info`; 3: RDMA
/// fields in `avp_options`).
#[unsafe(no_mangle)]
pub extern "C" fn avp_abi_version() -> u32 {
    3
}

/// Fill `out` with the default options (then change what you need).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_options_default(out: *mut avp_options) -> avp_status {
    // SAFETY: `put` checks for NULL; the caller passes writable memory.
    status::ffi(|| unsafe { types::put(out, "out", types::default_options()) })
}
