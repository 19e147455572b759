//! Arbitrary bytes as a WebSocket text frame through the driver and rider decoders; the
//! checks live in `common/wire_decode.rs`, shared with `transport/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common/wire_decode.rs"]
mod check;

fuzz_target!(|data: &[u8]| check::check(data));
