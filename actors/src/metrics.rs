//! Prometheus metrics of the live system. No label takes one value per driver, rider,
//! trip or cell: labels are groups, kinds, codes and states.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::error::ErrorCode;
use crate::stages::{COMMIT_PARTS, STAGES, Stage, StageClock};

/// Every `stage` of `dispatch_store_commit_stage_seconds`: per group commit, the wait of
/// its longest-waiting batch before the group began, sled's write, and the fsync.
pub const COMMIT_STAGES: [&str; 3] = ["queue_wait", "write", "fsync"];

/// The actor groups metrics are labelled with: the four ractor groups and the WebSocket
/// sessions (tokio tasks, counted as a group of their own).
pub const GROUPS: [&str; 5] = ["driver", "rider", "trip", "cell", "session"];

/// Outcomes of reading a failed trip actor's trip back from the store: `resumed` (a new
/// actor runs it), `finished` (it had ended), `not_stored` (it never reached the store:
/// its rider is free to ask again), `retried` (the store did not answer; read again later).
pub const TRIP_RELOADS: [&str; 4] = ["resumed", "finished", "not_stored", "retried"];

/// Why sharded mode refused a command (`dispatch_shard_refused_total{cause}`):
/// `not_served`, an app command, attach or quote for a driver or rider whose shard this
/// node does not serve (not recovered yet, or ended), or a trip another node asked this
/// one to start whose pickup's shard it does not serve; `accept_unfenced`, a driver's
/// accept whose shard this node holds no fence for (docs/sharding.md §3); `no_owner`, a
/// ride request whose pickup's shard no node holds now; `quote_unfenced`, a request with a
/// quote for a trip on another node while this node holds no fence of the rider's shard
/// (the quote's delete could not be fenced; docs/sharding.md §5); `start_not_served`, a
/// driver or rider actor started on demand (attach, routed message) for a shard not served
/// here, or stopped again because its shard ended as it started.
pub const SHARD_REFUSALS: &[&str] = &[
    "not_served",
    "accept_unfenced",
    "no_owner",
    "quote_unfenced",
    "start_not_served",
];

/// Index of a group in [`GROUPS`].
fn group_index(group: &str) -> usize {
    GROUPS
        .iter()
        .position(|g| *g == group)
        .expect("a known actor group")
}

/// Closed label sets, pre-initialised so every series exists from the first scrape
/// (a `rate()` over a series that appears late misses its first increments).
const TRIP_STATES: [&str; 7] = [
    "dispatching",
    "driver_assigned",
    "driver_arrived",
    "in_progress",
    "completed",
    "cancelled",
    "no_driver_found",
];
const FINAL_STATES: [&str; 3] = ["completed", "cancelled", "no_driver_found"];
const LIVE_STATES: [&str; 4] = [
    "dispatching",
    "driver_assigned",
    "driver_arrived",
    "in_progress",
];
pub const OFFER_OUTCOMES: [&str; 6] = [
    "sent",
    "refused",
    "accepted",
    "declined",
    "expired",
    "withdrawn",
];
/// Every `outcome` of `dispatch_batch_retries_total`: a window's first solve left a trip
/// without a driver and the window's own fresh search and solve matched it
/// (`same_window`); or a window left a trip without an offer it could hold (nobody free
/// was left for it, or its driver could not take the offer) and the trip's search found
/// free drivers to offer at once (`greedy`), or nobody free, so it waits for a later
/// window (`next_window`: its offer may then wait past one window); a trip that waited
/// so found a driver who freed up since and offers it at once (`waited_greedy`: its slow
/// safety poll found it), or was handed a driver as it freed up (`freed`: the cell that
/// saw the driver become available handed it to the nearest waiting trip).
pub const BATCH_RETRIES: [&str; 5] = [
    "freed",
    "greedy",
    "next_window",
    "same_window",
    "waited_greedy",
];
/// Every `bound` label value `bound_hit` is called with.
pub const BOUNDS: [&str; 38] = [
    "bad_messages",
    "batch_group_cap",
    "batch_leftover",
    "batch_queue",
    "batch_wait",
    "batch_waiting",
    "batch_work_budget",
    "cell_entry_owner_left",
    "cell_query_timeout",
    "cell_spawn_failed",
    "console_feed_items",
    "console_feed_send",
    "console_feeds",
    "end_shard_stop",
    "http_body_bytes",
    "jwks_refresh_rate",
    "location_rate",
    "max_connections",
    "offer_refused_unindexed",
    "otlp_span_queue",
    "register_rate",
    "register_rate_keys",
    "relay_attach_timeout",
    "relay_attaching",
    "relay_in_flight",
    "relay_queue",
    "remote_inflight",
    "store_call_timeout",
    "store_write_failed",
    "store_write_retry",
    "trip_reload_reads",
    "ws_frame_bytes",
    "ws_hard_max_bytes",
    "ws_idle_timeout",
    "ws_in_flight",
    "ws_message_rate",
    "ws_outbound_queue",
    "ws_read_paused",
];
/// Every `what` label value `invariant` is called with.
pub const INVARIANTS: [&str; 3] = ["driver_assign", "rider_two_trips", "suspend_offered"];
pub const DRIVER_STATUSES: [&str; 5] = ["offline", "available", "offered", "on_trip", "suspended"];

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub search_requests: IntCounter,
    pub search_cells: IntCounter,
    pub search_drivers_examined: IntCounter,
    pub search_ring_cap: IntCounter,
    pub search_cross_border: IntCounter,
    pub request_to_offer: Histogram,
    pub trips_final: IntCounterVec,
    pub trip_transitions: IntCounterVec,
    pub offers: IntCounterVec,
    pub actors_alive: IntGaugeVec,
    pub actor_restarts: IntCounterVec,
    /// A failed trip actor read back from the store, by outcome (`TRIP_RELOADS`).
    pub trip_reloads: IntCounterVec,
    /// Sharded mode: work refused because of where a shard is (`SHARD_REFUSALS`).
    pub shard_refused: IntCounterVec,
    /// Not exported: the most reads of failed trips that were ever in flight at once
    /// (at most `SystemConfig::trip_reload_reads_max`), for tests of that cap.
    pub trip_reload_reads_peak: std::sync::atomic::AtomicUsize,
    pub rejected: IntCounterVec,
    pub bounds_hit: IntCounterVec,
    pub locations_applied: IntCounter,
    pub invariant_violations: IntCounterVec,
    pub store_flush: Histogram,
    pub store_flush_batches: Histogram,
    /// A group commit's time by stage ([`COMMIT_STAGES`]).
    pub store_commit_stage: HistogramVec,
    /// Request → offer's time by stage ([`STAGES`]), and its series resolved once.
    pub request_offer_stage: HistogramVec,
    offer_stage_by_index: Vec<Histogram>,
    /// The parts of a request's two awaited commits ([`COMMIT_PARTS`]), by `commit`.
    pub request_offer_commit: HistogramVec,
    pub request_to_accept: Histogram,
    pub pickup_eta: Histogram,
    /// Batched matching: trips per window, a window's solve time, and the pickup ETA of
    /// each pair the window assigned.
    pub batch_size: Histogram,
    pub batch_solve: Histogram,
    pub batch_assigned_eta: Histogram,
    /// Batched matching: the searches of trips a window left without an offer they could
    /// hold, by outcome (see [`BATCH_RETRIES`]).
    pub batch_retries: IntCounterVec,
    /// Batched matching: the trips the window being solved still holds, waiting for their
    /// answer (0 between solves), and those it let go because they stopped waiting.
    pub batch_pending: IntGauge,
    pub batch_gave_up: IntCounter,
    /// Batched matching: the trips waiting for a driver to free up near them, and the
    /// time from a cell seeing a driver become available to the offer it was handed
    /// with reaching that driver.
    pub batch_waiting: IntGauge,
    pub batch_freed_to_offer: Histogram,
    pub actors_started: IntCounterVec,
    pub actors_stopped: IntCounterVec,
    pub actor_panics: IntCounterVec,
    pub actor_messages: IntCounterVec,
    pub actor_handling: HistogramVec,
    /// `actor_handling` per group, resolved once (the hot path skips the label lookup).
    handling_by_group: Vec<Histogram>,
    /// `actor_messages` per group, resolved once per message kind: a label lookup hashes
    /// both labels under a lock, and every location ping paid it twice.
    messages_by_group: Vec<std::sync::RwLock<Vec<(&'static str, IntCounter)>>>,
    pub mailbox_backlog: IntGaugeVec,
    pub drivers: IntGaugeVec,
    pub trips_active: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub quote_surge: Histogram,
    pub surge_cells: IntGauge,
    pub ledger_entries: IntCounterVec,
    pub payment_failures: IntCounterVec,
    pub start_time: IntGauge,
    pub ready: IntGauge,
    /// Client messages handed to actors and not yet answered, over all sessions.
    pub client_in_flight: IntGauge,
    /// A handler slower than this is logged (ms; `--slow-handler-ms`).
    slow_handler_ms: AtomicU64,
}

/// Times one message's handling; counts it, and a panic, when dropped. A panic inside
/// the handler unwinds through this guard, so `std::thread::panicking` sees it.
pub struct Handling<'a> {
    metrics: &'a Metrics,
    group: usize,
    kind: &'static str,
    start: Instant,
}

impl Handling<'_> {
    /// The message's kind, once it is known (a session learns it after decoding).
    pub fn kind(&mut self, kind: &'static str) {
        self.kind = kind;
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        let m = self.metrics;
        let group = GROUPS[self.group];
        let elapsed = self.start.elapsed();
        m.handling_by_group[self.group].observe(elapsed.as_secs_f64());
        m.message_counter(self.group, self.kind).inc();
        if std::thread::panicking() {
            m.actor_panics.with_label_values(&[group]).inc();
        }
        let ms = elapsed.as_millis() as u64;
        if ms >= m.slow_handler_ms.load(Ordering::Relaxed) {
            tracing::warn!(
                group,
                kind = self.kind,
                elapsed_ms = ms,
                "slow actor handler"
            );
        }
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

/// A histogram of request → offer's stages (10 µs to 1 s).
fn stage_histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02,
        0.05, 0.1, 0.25, 1.0,
    ];
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    reg(r, HistogramVec::new(opts, labels).unwrap())
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let latency_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let handling = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "dispatch_actor_handling_seconds",
                    "Time to handle one message, by actor group",
                )
                .buckets(vec![
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                    0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
                &["group"],
            )
            .unwrap(),
        );
        let offer_stage = stage_histogram(
            &r,
            "dispatch_request_offer_stage_seconds",
            "Time of a ride request's first offer spent in each stage, from the session's hand-off to the offer's socket write",
            &["stage"],
        );
        let m = Self {
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
            search_cross_border: reg(
                &r,
                IntCounter::new(
                    "dispatch_search_cross_border_total",
                    "Searches that asked a cell on another node (sharded mode)",
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
            trip_reloads: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_trip_reloads_total",
                        "Reads of a failed trip actor's trip from the store, by outcome (retried: the store did not answer)",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            shard_refused: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_shard_refused_total",
                        "Sharded mode: commands refused unavailable because of where a shard is (not_served: the entity's shard, or a remote trip spawn's pickup shard, is not served by this node; accept_unfenced: a driver's accept whose shard this node holds no fence for; no_owner: a ride request whose pickup shard no node holds; quote_unfenced: a quoted request for a trip on another node while this node holds no fence of the rider's shard; start_not_served: a driver or rider actor not started, or stopped as it started, because its shard is not served here)",
                    ),
                    &["cause"],
                )
                .unwrap(),
            ),
            trip_reload_reads_peak: std::sync::atomic::AtomicUsize::new(0),
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
            store_commit_stage: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "dispatch_store_commit_stage_seconds",
                        "A group commit's time by stage: its longest-waiting batch's queue wait, the write, the fsync",
                    )
                    .buckets(vec![
                        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                        0.1, 0.25, 1.0,
                    ]),
                    &["stage"],
                )
                .unwrap(),
            ),
            offer_stage_by_index: STAGES
                .iter()
                .map(|s| offer_stage.with_label_values(&[s]))
                .collect(),
            request_offer_stage: offer_stage,
            request_offer_commit: stage_histogram(
                &r,
                "dispatch_request_offer_commit_seconds",
                "A ride request's first commit and its offer's commit, by part: queue wait, write, fsync, and the wake until the trip runs again",
                &["commit", "part"],
            ),
            request_to_accept: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_request_to_accept_seconds",
                        "From ride request to a driver's accept",
                    )
                    .buckets(vec![
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
                    ]),
                )
                .unwrap(),
            ),
            pickup_eta: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_pickup_eta_seconds",
                        "Estimated pickup time when a driver is assigned",
                    )
                    .buckets(vec![
                        30.0, 60.0, 120.0, 180.0, 300.0, 420.0, 600.0, 900.0, 1200.0, 1800.0,
                    ]),
                )
                .unwrap(),
            ),
            batch_size: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_batch_size",
                        "Trips assigned together in one batched-matching window",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0]),
                )
                .unwrap(),
            ),
            batch_solve: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_batch_solve_seconds",
                        "Time to solve one batched-matching window's assignment",
                    )
                    .buckets(vec![
                        0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
                    ]),
                )
                .unwrap(),
            ),
            batch_assigned_eta: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_batch_assigned_eta_seconds",
                        "Pickup ETA of each pair a batched-matching window assigned",
                    )
                    .buckets(vec![
                        30.0, 60.0, 120.0, 180.0, 300.0, 420.0, 600.0, 900.0, 1200.0, 1800.0,
                    ]),
                )
                .unwrap(),
            ),
            batch_retries: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_batch_retries_total",
                        "Searches of trips a batched-matching window left without an offer they could hold, by outcome",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            batch_pending: reg(
                &r,
                IntGauge::new(
                    "dispatch_batch_pending",
                    "Trips the batched-matching window being solved still holds, waiting for their answer",
                )
                .unwrap(),
            ),
            batch_gave_up: reg(
                &r,
                IntCounter::new(
                    "dispatch_batch_gave_up_total",
                    "Trips a batched-matching window let go because they stopped waiting for its answer",
                )
                .unwrap(),
            ),
            batch_waiting: reg(
                &r,
                IntGauge::new(
                    "dispatch_batch_waiting",
                    "Trips that waited through a batched-matching window and wait for a driver to free up near them",
                )
                .unwrap(),
            ),
            batch_freed_to_offer: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_batch_freed_to_offer_seconds",
                        "Time from a cell seeing a driver become available to the offer of the waiting trip it was handed to reaching that driver",
                    )
                    .buckets(vec![
                        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                    ]),
                )
                .unwrap(),
            ),
            actors_started: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_actors_started_total",
                        "Actors (and sessions) started, restarts included",
                    ),
                    &["group"],
                )
                .unwrap(),
            ),
            actors_stopped: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_actors_stopped_total",
                        "Actors (and sessions) stopped, failures included",
                    ),
                    &["group"],
                )
                .unwrap(),
            ),
            actor_panics: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_actor_panics_total",
                        "Message handlers that panicked",
                    ),
                    &["group"],
                )
                .unwrap(),
            ),
            actor_messages: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_actor_messages_total",
                        "Messages handled by actor group and message kind",
                    ),
                    &["group", "kind"],
                )
                .unwrap(),
            ),
            actor_handling: handling.clone(),
            handling_by_group: GROUPS
                .iter()
                .map(|g| handling.with_label_values(&[g]))
                .collect(),
            messages_by_group: GROUPS.iter().map(|_| Default::default()).collect(),
            mailbox_backlog: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "dispatch_mailbox_backlog_messages",
                        "Messages queued and not yet handled, where measurable (session: queued for clients)",
                    ),
                    &["group"],
                )
                .unwrap(),
            ),
            drivers: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("dispatch_drivers", "Registered drivers by status"),
                    &["status"],
                )
                .unwrap(),
            ),
            trips_active: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("dispatch_trips_active", "Live trips by state"),
                    &["state"],
                )
                .unwrap(),
            ),
            quote_surge: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_quote_surge",
                        "Surge multiplier applied to each price (quotes and direct requests)",
                    )
                    .buckets(vec![1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0]),
                )
                .unwrap(),
            ),
            surge_cells: reg(
                &r,
                IntGauge::new(
                    "dispatch_surge_cells",
                    "Surge cells whose multiplier is above 1.0",
                )
                .unwrap(),
            ),
            ledger_entries: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_ledger_entries_total",
                        "Ledger entries written, by step",
                    ),
                    &["step"],
                )
                .unwrap(),
            ),
            payment_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "dispatch_payment_failures_total",
                        "Payment provider requests that were declined, failed or timed out",
                    ),
                    &["request", "outcome"],
                )
                .unwrap(),
            ),
            build_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("dispatch_build_info", "The running build; always 1"),
                    &["version"],
                )
                .unwrap(),
            ),
            start_time: reg(
                &r,
                IntGauge::new(
                    "dispatch_start_time_seconds",
                    "When the process started, Unix seconds",
                )
                .unwrap(),
            ),
            ready: reg(
                &r,
                IntGauge::new(
                    "dispatch_ready",
                    "1 once recovery is done and clients are served, else 0",
                )
                .unwrap(),
            ),
            client_in_flight: reg(
                &r,
                IntGauge::new(
                    "dispatch_client_messages_in_flight",
                    "Client messages handed to actors and not yet answered (each session holds at most --ws-in-flight-max)",
                )
                .unwrap(),
            ),
            slow_handler_ms: AtomicU64::new(250),
            registry: r,
        };
        m.init_series();
        m
    }

    /// Creates every series of the closed label sets at zero.
    fn init_series(&self) {
        for g in GROUPS {
            self.actors_alive.with_label_values(&[g]);
            self.actors_started.with_label_values(&[g]);
            self.actors_stopped.with_label_values(&[g]);
            self.actor_restarts.with_label_values(&[g]);
            self.actor_panics.with_label_values(&[g]);
        }
        for s in COMMIT_STAGES {
            self.store_commit_stage.with_label_values(&[s]);
        }
        for c in ["first", "offer"] {
            for p in COMMIT_PARTS {
                self.request_offer_commit.with_label_values(&[c, p]);
            }
        }
        for o in TRIP_RELOADS {
            self.trip_reloads.with_label_values(&[o]);
        }
        for c in SHARD_REFUSALS {
            self.shard_refused.with_label_values(&[c]);
        }
        self.mailbox_backlog.with_label_values(&["session"]);
        for s in FINAL_STATES {
            self.trips_final.with_label_values(&[s]);
        }
        for s in TRIP_STATES {
            self.trip_transitions.with_label_values(&[s]);
        }
        for s in LIVE_STATES {
            self.trips_active.with_label_values(&[s]);
        }
        for o in OFFER_OUTCOMES {
            self.offers.with_label_values(&[o]);
        }
        for o in BATCH_RETRIES {
            self.batch_retries.with_label_values(&[o]);
        }
        for s in DRIVER_STATUSES {
            self.drivers.with_label_values(&[s]);
        }
        for step in ["authorize", "capture", "cancel_fee", "release", "refund"] {
            self.ledger_entries.with_label_values(&[step]);
        }
        for req in ["authorize", "capture", "release", "refund"] {
            for outcome in ["declined", "unavailable", "timeout"] {
                self.payment_failures.with_label_values(&[req, outcome]);
            }
        }
        for b in BOUNDS {
            self.bounds_hit.with_label_values(&[b]);
        }
        for w in INVARIANTS {
            self.invariant_violations.with_label_values(&[w]);
        }
        for c in ErrorCode::ALL {
            self.rejected.with_label_values(&[c.as_str()]);
        }
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.start_time.set(now);
    }

    /// The `actor_messages` counter of a group and kind, from the resolved ones if it is
    /// there (kinds are few: a linear search over a handful of short strings).
    fn message_counter(&self, group: usize, kind: &'static str) -> IntCounter {
        let resolved = &self.messages_by_group[group];
        if let Some((_, c)) = resolved
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(k, _)| *k == kind)
        {
            return c.clone();
        }
        let c = self
            .actor_messages
            .with_label_values(&[GROUPS[group], kind]);
        let mut w = resolved.write().unwrap_or_else(|e| e.into_inner());
        if !w.iter().any(|(k, _)| *k == kind) {
            w.push((kind, c.clone()));
        }
        c
    }

    /// Starts timing one message of `group` (one of [`GROUPS`]).
    pub fn handling(&self, group: &'static str, kind: &'static str) -> Handling<'_> {
        Handling {
            metrics: self,
            group: group_index(group),
            kind,
            start: Instant::now(),
        }
    }

    /// One message's handling, the future `handle` makes, run inside `span`, timed and
    /// counted; the guard ends inside the span, so a slow-handler warning carries the
    /// entity's ids. It takes a closure, not the future: a future moved into an async
    /// block is kept twice over (as the block's capture and as what it awaits), which
    /// doubled the size of every actor's task.
    pub fn handle_in<'a, F: std::future::Future + 'a>(
        &'a self,
        group: &'static str,
        kind: &'static str,
        span: tracing::Span,
        handle: impl FnOnce() -> F + 'a,
    ) -> impl std::future::Future<Output = F::Output> + 'a {
        let handling = self.handling(group, kind);
        tracing::Instrument::instrument(
            async move {
                let _handling = handling;
                handle().await
            },
            span,
        )
    }

    /// Handlers slower than this are logged with their group and message kind.
    pub fn set_slow_handler_ms(&self, ms: u64) {
        self.slow_handler_ms.store(ms, Ordering::Relaxed);
    }

    /// An actor or session of `group` started.
    pub fn started(&self, group: &str) {
        self.actors_started.with_label_values(&[group]).inc();
        self.actors_alive.with_label_values(&[group]).inc();
    }

    /// An actor or session of `group` stopped (for any reason).
    pub fn stopped(&self, group: &str) {
        self.actors_stopped.with_label_values(&[group]).inc();
        self.actors_alive.with_label_values(&[group]).dec();
    }

    pub fn rejected(&self, code: ErrorCode) {
        self.rejected.with_label_values(&[code.as_str()]).inc();
    }

    pub fn store_flushed(&self, f: &dispatch_persistence::FlushStats) {
        self.store_flush.observe(f.flush_seconds);
        self.store_flush_batches.observe(f.batches as f64);
        for (stage, seconds) in
            COMMIT_STAGES
                .iter()
                .zip([f.queue_wait_seconds, f.write_seconds, f.fsync_seconds])
        {
            self.store_commit_stage
                .with_label_values(&[stage])
                .observe(seconds);
        }
    }

    /// One stage of a request's first offer.
    pub fn offer_stage(&self, stage: Stage, elapsed: std::time::Duration) {
        self.offer_stage_by_index[stage as usize].observe(elapsed.as_secs_f64());
    }

    /// A request's first offer is reserved: each of its stages so far is observed, and
    /// its breakdown logged (a warning when slower than `--slow-handler-ms`).
    pub fn offer_reserved(&self, clock: &StageClock, trip_id: &str) {
        for (stage, d) in clock.spent() {
            self.offer_stage(stage, d);
        }
        for (commit, parts) in ["first", "offer"].iter().zip(clock.commits()) {
            for (part, d) in COMMIT_PARTS.iter().zip(parts) {
                self.request_offer_commit
                    .with_label_values(&[commit, part])
                    .observe(d.as_secs_f64());
            }
        }
        let total = clock.total();
        let slow = total.as_millis() as u64 >= self.slow_handler_ms.load(Ordering::Relaxed);
        if !slow && !tracing::enabled!(target: "dispatch_actors::stages", tracing::Level::DEBUG) {
            return;
        }
        let mut stages_us = String::new();
        for (stage, d) in clock.spent() {
            let sep = if stages_us.is_empty() { "" } else { " " };
            stages_us.push_str(&format!(
                "{sep}{}={}",
                STAGES[stage as usize],
                d.as_micros()
            ));
        }
        for (commit, parts) in ["first", "offer"].iter().zip(clock.commits()) {
            for (part, d) in COMMIT_PARTS.iter().zip(parts) {
                stages_us.push_str(&format!(" {commit}_{part}={}", d.as_micros()));
            }
        }
        let total_us = total.as_micros() as u64;
        if slow {
            tracing::warn!(target: "dispatch_actors::stages", trip_id, total_us, stages_us = %stages_us, "slow request to offer");
        } else {
            tracing::debug!(target: "dispatch_actors::stages", trip_id, total_us, stages_us = %stages_us, "request to offer");
        }
    }

    /// Sharded mode: a command refused for where a shard is (one of `SHARD_REFUSALS`).
    pub fn shard_refused(&self, cause: &str) {
        debug_assert!(
            SHARD_REFUSALS.contains(&cause),
            "add {cause} to SHARD_REFUSALS"
        );
        self.shard_refused.with_label_values(&[cause]).inc();
    }

    pub fn bound_hit(&self, bound: &str) {
        debug_assert!(BOUNDS.contains(&bound), "add {bound} to BOUNDS");
        self.bounds_hit.with_label_values(&[bound]).inc();
    }

    /// A broken invariant: loud in debug builds, counted in release.
    pub fn invariant(&self, what: &str, detail: &str) {
        debug_assert!(INVARIANTS.contains(&what), "add {what} to INVARIANTS");
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
