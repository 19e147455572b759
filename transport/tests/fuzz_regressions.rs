//! The `wire_decode` fuzz target's corpus and saved crashes, replayed through the same
//! checks the fuzzer runs (`fuzz/fuzz_targets/common/wire_decode.rs`; fuzz/README.md).
#![cfg(feature = "server")]

#[path = "../../fuzz/fuzz_targets/common/wire_decode.rs"]
mod check;
#[path = "../../fuzz/fuzz_targets/common/replay.rs"]
mod replay;

const TARGET: &str = "wire_decode";

#[test]
fn the_fuzz_corpus_passes_the_wire_decode_checks() {
    let files = replay::inputs(env!("CARGO_MANIFEST_DIR"), "corpus", TARGET);
    assert!(files.len() >= 10, "the corpus went missing: {files:?}");
    replay::replay(&files, check::check);
}

#[test]
fn every_saved_wire_decode_crash_passes() {
    let files = replay::inputs(env!("CARGO_MANIFEST_DIR"), "regressions", TARGET);
    replay::replay(&files, check::check);
}
