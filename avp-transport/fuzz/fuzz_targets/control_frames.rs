//! Arbitrary bytes as a TCP peer's control stream: length prefixes and JSON
//! frames of every kind. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = avp_transport::fuzzing::decode_frames(data);
});
