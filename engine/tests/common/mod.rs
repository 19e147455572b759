//! Shared by the engine's property tests (`mod common;`): how they run, and how they
//! check that their generators reach what they claim to test.
// Every file that includes this module uses its own share of it.
#![allow(dead_code)]

use std::collections::BTreeMap;

use proptest::test_runner::{Config, FileFailurePersistence};

/// `cases` cases per property.
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        // Integration tests have no lib.rs beside them; keep regressions next to the file.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    }
}

/// Fails unless each of `wanted` was counted in `seen` at least `at_least` times.
pub fn assert_reached(seen: &BTreeMap<&str, u32>, wanted: &[&str], at_least: u32) {
    for what in wanted {
        assert!(
            seen.get(what).copied().unwrap_or(0) >= at_least,
            "{what} reached too rarely: {seen:?}"
        );
    }
}
