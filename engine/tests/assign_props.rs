//! The batched assignment against brute force on random small instances: it matches as
//! many requests as any valid matching can, at the least total pickup time among those,
//! never gives a driver two requests, never uses a pair over the cap, and only uses a
//! request's own options at their ETA.

use std::collections::BTreeSet;

use dispatch_engine::{BatchParams, assign};
use proptest::prelude::*;

/// The best (matched, -cost) over every injective partial assignment.
fn brute(options: &[Vec<(u8, u64)>], cap: u64) -> (usize, u64) {
    fn go(r: usize, options: &[Vec<(u8, u64)>], cap: u64, used: &mut BTreeSet<u8>) -> (usize, u64) {
        if r == options.len() {
            return (0, 0);
        }
        // Leave request r out.
        let mut best = go(r + 1, options, cap, used);
        for &(d, c) in &options[r] {
            if c > cap || used.contains(&d) {
                continue;
            }
            used.insert(d);
            let (n, cost) = go(r + 1, options, cap, used);
            used.remove(&d);
            let cand = (n + 1, cost + c);
            if cand.0 > best.0 || (cand.0 == best.0 && cand.1 < best.1) {
                best = cand;
            }
        }
        best
    }
    go(0, options, cap, &mut BTreeSet::new())
}

fn instance() -> impl Strategy<Value = Vec<Vec<(u8, u64)>>> {
    // Up to 6 requests, drivers named 0..7, each request with up to 5 distinct options.
    prop::collection::vec(
        prop::collection::btree_map(0u8..7, 0u64..1_200, 0..5)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>()),
        0..7,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn assignment_is_the_brute_force_optimum(options in instance(), cap in 0u64..1_200) {
        let params = BatchParams { max_cost_s: cap, ..BatchParams::default() };
        let out = assign(&options, &params);
        prop_assert_eq!(out.assigned.len(), options.len());
        let mut used = BTreeSet::new();
        for (r, a) in out.assigned.iter().enumerate() {
            if let Some((d, c)) = a {
                prop_assert!(used.insert(*d), "driver {} given twice", d);
                prop_assert!(*c <= cap);
                prop_assert!(options[r].contains(&(*d, *c)), "not an option of request {}", r);
            }
        }
        prop_assert_eq!(out.totals(), brute(&options, cap));
        prop_assert_eq!(out.stats.greedy_fallback, 0);
    }
}
