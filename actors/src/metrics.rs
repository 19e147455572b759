//! Prometheus metrics of the live system. No label takes one value per driver, rider,
//! trip or cell: labels are groups, kinds, codes and states.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::error::ErrorCode;

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub search_requests: IntCounter,
    pub search_cells: IntCounter,
    pub search_drivers_examined: IntCounter,
    pub search_ring_cap: IntCounter,
    pub request_to_offer: Histogram,
    pub trips_final: IntCounterVec,
    pub trip_transitions: IntCounterVec,
    pub offers: IntCounterVec,
    pub actors_alive: IntGaugeVec,
    pub actor_restarts: IntCounterVec,
    pub rejected: IntCounterVec,
    pub bounds_hit: IntCounterVec,
    pub locations_applied: IntCounter,
    pub invariant_violations: IntCounterVec,
    pub store_flush: Histogram,
    pub store_flush_batches: Histogram,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let latency_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        Self {
            search_requests: reg(
                &r,
                IntCounter::new(
                    "dispatch_search_requests_total",
                    "Candidate and nearby searches run",
                )
                .unwrap(),
            ),
            search_cells: reg(
                &r,
                IntCounter::new(
                    "dispatch_search_cells_total",
                    "H3 cells queried by searches",
                )
                .unwrap(),
            ),
            search_drivers_examined: reg(
                &r,
                IntCounter::new(
                    "dispatch_search_drivers_examined_total",
                    "Indexed drivers looked at by searches",
                )
                .unwrap(),
            ),
            search_ring_cap: reg(
                &r,
                IntCounter::new(
                    "dispatch_search_ring_cap_total",
                    "Searches stopped by the ring cap before finding k",
                )
                .unwrap(),
            ),
            request_to_offer: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_request_to_offer_seconds",
                        "From ride request to the first offer reserved",
                    )
                    .buckets(latency_buckets),
                )
                .unwrap(),
            ),
            trips_final: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("dispatch_trips_finished_total", "Trips by final state"),
                    &["state"],
                )
                .unwrap(),
            ),
            trip_transitions: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_trip_transitions_total",
                        "Trip transitions by target state",
                    ),
                    &["to"],
                )
                .unwrap(),
            ),
            offers: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("dispatch_offers_total", "Offers by outcome"),
                    &["outcome"],
                )
                .unwrap(),
            ),
            actors_alive: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("dispatch_actors_alive", "Live actors by group"),
                    &["group"],
                )
                .unwrap(),
            ),
            actor_restarts: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_actor_restarts_total",
                        "Actors restarted after a failure",
                    ),
                    &["group"],
                )
                .unwrap(),
            ),
            rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_rejected_total",
                        "Client messages answered with an error",
                    ),
                    &["code"],
                )
                .unwrap(),
            ),
            bounds_hit: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_bound_hits_total",
                        "Times a configured limit was reached",
                    ),
                    &["bound"],
                )
                .unwrap(),
            ),
            locations_applied: reg(
                &r,
                IntCounter::new(
                    "dispatch_locations_applied_total",
                    "Driver location pings applied to the cell index",
                )
                .unwrap(),
            ),
            invariant_violations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_invariant_violations_total",
                        "Broken internal invariants (bugs) seen in release builds",
                    ),
                    &["what"],
                )
                .unwrap(),
            ),
            store_flush: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_store_flush_seconds",
                        "Time to write and fsync one group commit",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                    ]),
                )
                .unwrap(),
            ),
            store_flush_batches: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_store_flush_batches",
                        "Batches covered by one group commit",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )
                .unwrap(),
            ),
            registry: r,
        }
    }

    pub fn rejected(&self, code: ErrorCode) {
        self.rejected.with_label_values(&[code.as_str()]).inc();
    }

    pub fn store_flushed(&self, batches: usize, seconds: f64) {
        self.store_flush.observe(seconds);
        self.store_flush_batches.observe(batches as f64);
    }

    pub fn bound_hit(&self, bound: &str) {
        self.bounds_hit.with_label_values(&[bound]).inc();
    }

    /// A broken invariant: loud in debug builds, counted in release.
    pub fn invariant(&self, what: &str, detail: &str) {
        self.invariant_violations.with_label_values(&[what]).inc();
        tracing::error!(what, detail, "invariant violated");
        debug_assert!(false, "invariant violated: {what}: {detail}");
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
