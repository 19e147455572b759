//! The replay of a real city day (issue 17): a one-hour slice of the Manhattan trips,
//! greedy and batched, with the world's invariants checked as it runs (no driver offered
//! or given two trips, no trip two drivers), run twice with one seed: the outcomes must be
//! identical (all but the solver's measured wall time), and a different seed must differ.

use std::path::PathBuf;

use clap::Parser;
use dispatch_loadgen::replay::{self, ReplayArgs};

fn args(seed: u64) -> ReplayArgs {
    let trips =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/nyc_taxi_2011-02-01_manhattan.csv");
    // 18h, the evening peak (~2,200 requests), with a fleet small enough that drivers are
    // contended: batches form, requests wait for windows, some reach the deadline.
    ReplayArgs::parse_from([
        "replay",
        "--trips",
        trips.to_str().expect("a UTF-8 path"),
        "--from-hour",
        "18",
        "--hours",
        "1",
        "--drivers",
        "350",
        "--matching",
        "greedy,batch",
        "--match-window-ms",
        "2000",
        "--seed",
        &seed.to_string(),
        "--check-invariants",
    ])
}

#[test]
fn one_hour_slice_is_deterministic_for_a_seed() {
    let a = replay::run(&args(7)).expect("replay runs");
    let b = replay::run(&args(7)).expect("replay runs");
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.reproducible(), y.reproducible(), "mode {}", x.mode);
    }
    let (greedy, batch) = (&a[0], &a[1]);
    assert_eq!(greedy.mode, "greedy");
    assert_eq!(batch.mode, "batch 2 s");
    for o in &a {
        eprint!("{}", replay::text(o));
        assert!(o.day.requests > 2_000, "the 18h slice holds ~2,200 trips");
        assert_eq!(
            o.day.requests, greedy.day.requests,
            "same trips in both modes"
        );
        // Contended: most are served, some reach the dispatch deadline.
        assert!(o.day.served * 10 > o.day.requests * 7, "{:?}", o.day);
        assert!(o.day.served < o.day.requests, "{:?}", o.day);
        assert_eq!(o.pickup_hist.iter().sum::<u64>() as usize, o.day.pickup_s.n);
    }
    // Batch mode really batched: windows ran, some with more than one request.
    assert!(batch.solve.windows > 0 && batch.solve.largest_batch > 1);
    assert_eq!(greedy.solve.windows, 0);
    // A first offer waits at most the window (the solve takes no simulated time) in batch
    // mode; greedy offers at once.
    assert_eq!(greedy.day.to_first_offer_s.max, 0.0);
    assert!(
        batch.day.to_first_offer_s.max <= 2.0,
        "{:?}",
        batch.day.to_first_offer_s
    );
    assert!(batch.day.to_first_offer_s.mean > 0.0);
    let c = replay::run(&args(8)).expect("replay runs");
    assert_ne!(a[0].reproducible(), c[0].reproducible(), "the seed matters");
}
