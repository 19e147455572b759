//! The `trip_machine` fuzz target's corpus and saved crashes, replayed through the same
//! checks the fuzzer runs (`fuzz/fuzz_targets/common/trip_machine.rs`; fuzz/README.md).

#[path = "../../fuzz/fuzz_targets/common/trip_machine.rs"]
mod check;
#[path = "../../fuzz/fuzz_targets/common/replay.rs"]
mod replay;

replay::tests! {
    target = "trip_machine",
    check = check::run,
    corpus_at_least = 5,
    corpus = the_fuzz_corpus_passes_the_trip_machine_checks,
    regressions = every_saved_trip_machine_crash_passes,
}
