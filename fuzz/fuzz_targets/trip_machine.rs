//! Arbitrary command sequences through the engine's trip machine and the ledger; the
//! checks live in `common/trip_machine.rs`, shared with `engine/tests/fuzz_regressions.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common/trip_machine.rs"]
mod check;

fuzz_target!(|data: &[u8]| check::run(data));
