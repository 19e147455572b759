//! A durable trip transition: `Store::commit` of one trip snapshot and its journal entry
//! (`Batch::new().trip(stored, Some(transition))`), awaited until the group commit's
//! flush (fsync) has returned.
//!
//! - `transition/commit_sequential`: one commit at a time; every transition pays a flush.
//! - `transition/commit_64_concurrent`: 64 writers (as 64 trip actors would), each sending
//!   its next commit as soon as the previous one is durable; the writer thread folds what
//!   arrived during one flush into the next, so a flush covers many transitions.
//!
//! The snapshot is a trip just accepted (`driver_assigned`, with its driver). Transitions
//! cycle over 10,000 trip ids, so the store stays a realistic size and each commit writes
//! keys that were written before (as later transitions of a live trip do, for `trips`).
//! The sled directory is a temporary directory under `$TMPDIR` (or `BENCH_DIR` if set):
//! the numbers are those of that file system's fsync.
//!
//! With `BENCH_DATABASE_URL=postgres://…` (an empty database) the same runs go to the
//! PostgreSQL store instead: a flush is then one transaction's commit.
//!
//! Throughput is transitions per second. Run with
//! `cargo bench -p dispatch-persistence --bench transition` (or `bench/stores.sh`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dispatch_engine::trip::Mover;
use dispatch_engine::{
    Candidate, DispatchConfig, DriverId, IndexedDriver, Point, Product, RiderId, StraightLineEta,
    Trip, TripCommand, TripDriver, TripEffect, TripId, TripState,
};
use dispatch_persistence::{Batch, Store, StoredTrip, Transition};

#[path = "../../engine/benches/common/fixtures.rs"]
mod fixtures;

const TRIPS: usize = 10_000;
const WRITERS: usize = 64;

/// A trip right after its driver accepted, and the transition that got it there.
fn accepted_trip() -> (StoredTrip, Transition) {
    let cfg = DispatchConfig::default();
    let eta = StraightLineEta::default();
    let pickup = Point::new(45.53, -73.62).unwrap();
    let quote = fixtures::quote();
    let mut trip = Trip::start(
        TripId::new("trp_0000000000000000"),
        RiderId::new("rdr_0000000000000000"),
        Product::Economy,
        pickup,
        Point::new(45.55, -73.60).unwrap(),
        quote,
        1_000,
        &cfg,
    )
    .trip;
    let driver_id = DriverId::new("drv_0000000000000000");
    let candidate = Candidate {
        driver: IndexedDriver {
            driver_id: driver_id.clone(),
            position: Point::new(45.535, -73.62).unwrap(),
            heading: Some(180.0),
            product: Product::Economy,
            available: true,
        },
        distance_m: 556.0,
    };
    let fx = trip
        .apply(TripCommand::Candidates(vec![candidate]), 1_500, &cfg, &eta)
        .unwrap();
    assert!(matches!(fx[0], TripEffect::SendOffer(_)));
    trip.apply(
        TripCommand::Accept {
            driver_id: driver_id.clone(),
        },
        4_000,
        &cfg,
        &eta,
    )
    .unwrap();
    assert_eq!(trip.state(), TripState::DriverAssigned);
    let transition = Transition {
        from: TripState::Dispatching,
        to: TripState::DriverAssigned,
        by: Mover::Driver(driver_id),
        at_ms: trip.updated_at_ms(),
        version: trip.version(),
    };
    let stored = StoredTrip {
        trip,
        driver: Some(TripDriver {
            name: "Alex".into(),
            vehicle: fixtures::vehicle(),
            location: Some(Point::new(45.535, -73.62).unwrap()),
        }),
    };
    (stored, transition)
}

/// The snapshots to cycle over: the same trip under `TRIPS` ids.
fn snapshots() -> (Vec<StoredTrip>, Transition) {
    let (base, transition) = accepted_trip();
    let trips = (0..TRIPS)
        .map(|i| {
            let mut t = base.clone();
            t.trip.id = TripId::new(format!("trp_{i:016}"));
            t
        })
        .collect();
    (trips, transition)
}

fn batch(trips: &[StoredTrip], transition: &Transition, i: usize) -> Batch {
    Batch::new().trip(trips[i % TRIPS].clone(), Some(transition.clone()))
}

fn bench_transition(c: &mut Criterion) {
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .unwrap();
    let flushes = Arc::new(AtomicU64::new(0));
    let batches = Arc::new(AtomicU64::new(0));
    let store = {
        let (f, b) = (flushes.clone(), batches.clone());
        let on_flush = move |s: dispatch_persistence::FlushStats| {
            f.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(s.batches as u64, Ordering::Relaxed);
        };
        Arc::new(
            match std::env::var("BENCH_DATABASE_URL") {
                Ok(url) => {
                    Store::open_postgres(dispatch_persistence::PgOptions::new(url), on_flush)
                }
                Err(_) => Store::open(dir.path(), on_flush),
            }
            .unwrap(),
        )
    };
    let (trips, transition) = snapshots();
    let trips = Arc::new(trips);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Every id written once, so the benchmarks overwrite rather than grow the trees.
    rt.block_on(async {
        for chunk in (0..TRIPS).collect::<Vec<_>>().chunks(500) {
            let mut b = Batch::new();
            for &i in chunk {
                b = b.trip(trips[i].clone(), Some(transition.clone()));
            }
            store.commit(b).await.unwrap();
        }
    });

    let report = |name: &str, f0: u64, b0: u64| {
        let (f, b) = (
            flushes.load(Ordering::Relaxed) - f0,
            batches.load(Ordering::Relaxed) - b0,
        );
        eprintln!(
            "{name}: {f} flushes, {:.1} commits per flush",
            b as f64 / f.max(1) as f64
        );
    };

    let mut group = c.benchmark_group("transition");

    group.throughput(Throughput::Elements(1));
    let (f0, b0) = (
        flushes.load(Ordering::Relaxed),
        batches.load(Ordering::Relaxed),
    );
    let mut next = 0usize;
    group.bench_function("commit_sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    store
                        .commit(batch(&trips, &transition, next))
                        .await
                        .unwrap();
                    next += 1;
                }
                start.elapsed()
            })
        })
    });
    report("commit_sequential", f0, b0);

    // One iteration is one transition from each of the 64 writers.
    group.throughput(Throughput::Elements(WRITERS as u64));
    let (f0, b0) = (
        flushes.load(Ordering::Relaxed),
        batches.load(Ordering::Relaxed),
    );
    group.bench_function(format!("commit_{WRITERS}_concurrent"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for w in 0..WRITERS {
                    let (store, trips, transition) =
                        (store.clone(), trips.clone(), transition.clone());
                    tasks.spawn(async move {
                        for k in 0..iters as usize {
                            let i = k * WRITERS + w;
                            store.commit(batch(&trips, &transition, i)).await.unwrap();
                        }
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.unwrap();
                }
                start.elapsed()
            })
        })
    });
    report(&format!("commit_{WRITERS}_concurrent"), f0, b0);
    group.finish();

    drop(rt);
    match Arc::try_unwrap(store) {
        Ok(s) => s.close().unwrap(),
        Err(_) => panic!("the store is still shared"),
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = bench_transition
}
criterion_main!(benches);
