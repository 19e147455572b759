//! Values the benchmarks of several crates build their data from: the engine's
//! (`common::fixtures`), and `persistence` and `actors`, which include this file with
//! `#[path]`. Each benchmark uses its own share.
#![allow(dead_code)]

use dispatch_engine::{Product, QuoteTerms, Vehicle};

/// A 4 km, 10 minute Economy ride's upfront fare: $14.50, no surge.
pub fn quote() -> QuoteTerms {
    QuoteTerms {
        fare_cents: 1_450,
        currency: "USD".into(),
        surge: 1.0,
        distance_m: 4_000,
        duration_s: 600,
    }
}

/// An Economy car.
pub fn vehicle() -> Vehicle {
    Vehicle {
        make: "Toyota".into(),
        model: "Prius".into(),
        plate: "AB 123".into(),
        color: "blue".into(),
        product: Product::Economy,
        seats: 4,
    }
}
