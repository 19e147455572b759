//! The `wire_decode` fuzz target's corpus and saved crashes, replayed through the same
//! checks the fuzzer runs (`fuzz/fuzz_targets/common/wire_decode.rs`; fuzz/README.md).
#![cfg(feature = "server")]

#[path = "../../fuzz/fuzz_targets/common/wire_decode.rs"]
mod check;
#[path = "../../fuzz/fuzz_targets/common/replay.rs"]
mod replay;

replay::tests! {
    target = "wire_decode",
    check = check::check,
    corpus_at_least = 10,
    corpus = the_fuzz_corpus_passes_the_wire_decode_checks,
    regressions = every_saved_wire_decode_crash_passes,
}
