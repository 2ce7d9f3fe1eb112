//! The C ABI of avp. `include/avp.h` is generated from this crate by cbindgen;
//! `include/avp.hpp` is a header-only C++17 layer over it.
//!
//! Every exported function checks its arguments (NULL, sizes, enum values,
//! handles), catches panics, and reports failures as an [`avp_status`] plus a
//! thread-local message.
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
/// (2: device fields in `avp_options` and `avp_message_info`).
#[unsafe(no_mangle)]
pub extern "C" fn avp_abi_version() -> u32 {
    2
}

/// Fill `out` with the default options (then change what you need).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn avp_options_default(out: *mut avp_options) -> avp_status {
    // SAFETY: `put` checks for NULL; the caller passes writable memory.
    status::ffi(|| unsafe { types::put(out, "out", types::default_options()) })
}
