//! Arbitrary frames as the peer of both sides of the handshake (with and
//! without a token and a vocabulary): every outcome is a typed error or a
//! session, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = avp_transport::fuzzing::handshake_listener(data);
    let _ = avp_transport::fuzzing::handshake_client(data);
});
