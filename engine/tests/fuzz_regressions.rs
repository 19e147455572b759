//! The `trip_machine` fuzz target's corpus and saved crashes, replayed through the same
//! checks the fuzzer runs (`fuzz/fuzz_targets/common/trip_machine.rs`; fuzz/README.md).

#[path = "../../fuzz/fuzz_targets/common/trip_machine.rs"]
mod check;
#[path = "../../fuzz/fuzz_targets/common/replay.rs"]
mod replay;

const TARGET: &str = "trip_machine";

#[test]
fn the_fuzz_corpus_passes_the_trip_machine_checks() {
    let files = replay::inputs(env!("CARGO_MANIFEST_DIR"), "corpus", TARGET);
    assert!(files.len() >= 5, "the corpus went missing: {files:?}");
    replay::replay(&files, check::run);
}

#[test]
fn every_saved_trip_machine_crash_passes() {
    let files = replay::inputs(env!("CARGO_MANIFEST_DIR"), "regressions", TARGET);
    replay::replay(&files, check::run);
}
