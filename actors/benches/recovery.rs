//! Recovery benchmark: how long `dispatchd` takes from opening its data directory to
//! ready, with 100,000 drivers, 10,000 riders and 10,000 non-final trips on disk.
//!
//! Run with `cargo bench -p dispatch-actors --bench recovery` (release build). Prints
//! each run, the median, and the size of the data directory. Sizes can be changed with
//! `RECOVERY_DRIVERS`, `RECOVERY_TRIPS` and `RECOVERY_RUNS`. With
//! `BENCH_DATABASE_URL=postgres://…` (an empty database) the state is written to and
//! recovered from the PostgreSQL store instead (`bench/stores.sh` runs both).

use std::time::{Duration, Instant};

use dispatch_engine::trip::Mover;
use dispatch_engine::{
    Candidate, DispatchConfig, DriverId, DriverProfile, DriverStatus, IndexedDriver, Point,
    Product, QuoteTerms, RiderId, RiderProfile, StraightLineEta, Trip, TripCommand, TripId,
    TripState,
};
use dispatch_persistence::{Batch, StoredDriver, StoredRider, StoredTrip, Transition};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../engine/benches/common/fixtures.rs"]
mod fixtures;

/// The journal entry of the transition that brought `trip` to its current state.
fn transition(trip: &Trip, by: Option<&DriverId>) -> Transition {
    let from = match trip.state() {
        TripState::DriverAssigned => TripState::Dispatching,
        TripState::DriverArrived => TripState::DriverAssigned,
        TripState::InProgress => TripState::DriverArrived,
        s => s,
    };
    Transition {
        from,
        to: trip.state(),
        by: by.map_or(Mover::Rider, |d| Mover::Driver(d.clone())),
        at_ms: trip.updated_at_ms(),
        version: trip.version(),
    }
}

// The allocator `dispatchd` itself uses: recovery allocates ~110,000 actors' state.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn position(i: usize) -> Point {
    // A ~18 × 18 km city around (45.53, -73.62), drivers on a jittered grid.
    let side = 317;
    let (r, c) = ((i / side) as f64, (i % side) as f64);
    Point::new(45.45 + r * 0.000_51, -73.735 + c * 0.000_73).unwrap()
}

/// A token hash unique to `i` (among those filled with `fill`).
fn token_hash(fill: u8, i: usize) -> [u8; 32] {
    let mut h = [fill; 32];
    h[..8].copy_from_slice(&(i as u64).to_be_bytes());
    h
}

/// Driver `i`'s record, `status` at `position`.
fn driver(i: usize, status: DriverStatus, position: Point, heading: Option<f64>) -> StoredDriver {
    StoredDriver {
        id: DriverId::new(format!("drv_{i:08}")),
        profile: DriverProfile {
            name: format!("Driver {i}"),
            vehicle: fixtures::vehicle(),
        },
        token_hash: token_hash(0, i),
        status,
        position: Some(position),
        heading,
    }
}

/// The trip's snapshot (with no driver details).
fn snapshot(trip: &Trip) -> StoredTrip {
    StoredTrip {
        trip: trip.clone(),
        driver: None,
    }
}

async fn populate(dir: &std::path::Path, drivers: usize, trips: usize) {
    let store = common::open_store(dir);
    // Deadlines far enough ahead that every run finds the same live trips.
    let cfg = DispatchConfig {
        offer_timeout_ms: 3_600_000,
        dispatch_deadline_ms: 3_600_000,
    };
    let eta = StraightLineEta::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut batch = Batch::new();
    for i in 0..drivers {
        // Drivers below `trips` are written again below with their trip; a third of
        // the rest are offline.
        let status = if i < trips || i % 3 == 0 {
            DriverStatus::Offline
        } else {
            DriverStatus::Available
        };
        batch = batch.driver(driver(i, status, position(i), Some((i % 360) as f64)));
        if batch.len() >= 5_000 {
            store.commit(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    for i in 0..trips {
        let rider = RiderId::new(format!("rdr_{i:08}"));
        batch = batch.rider(StoredRider {
            id: rider.clone(),
            profile: RiderProfile {
                name: format!("Rider {i}"),
                phone: "5550100".into(),
            },
            token_hash: token_hash(1, i),
        });
        let pickup = position(i);
        let quote = QuoteTerms {
            fare_cents: 1500,
            ..fixtures::quote()
        };
        let mut trip = Trip::start(
            TripId::new(format!("trp_{i:08}")),
            rider,
            Product::Economy,
            pickup,
            Point::new(pickup.lat() + 0.02, pickup.lng()).unwrap(),
            quote,
            now,
            &cfg,
        )
        .trip;
        batch = batch.trip(snapshot(&trip), Some(transition(&trip, None)));
        let driver_id = DriverId::new(format!("drv_{i:08}"));
        let candidate = Candidate {
            driver: IndexedDriver {
                driver_id: driver_id.clone(),
                position: pickup,
                heading: None,
                product: Product::Economy,
                available: true,
            },
            distance_m: 0.0,
        };
        trip.apply(
            TripCommand::Candidates(vec![candidate]),
            now + 10,
            &cfg,
            &eta,
        )
        .unwrap();
        // A third each: an open offer, assigned, in progress.
        let mut status = DriverStatus::Offered(trip.id.clone());
        if i % 3 != 0 {
            trip.apply(
                TripCommand::Accept {
                    driver_id: driver_id.clone(),
                },
                now + 20,
                &cfg,
                &eta,
            )
            .unwrap();
            batch = batch.trip(snapshot(&trip), Some(transition(&trip, Some(&driver_id))));
            status = DriverStatus::OnTrip(trip.id.clone());
        }
        if i % 3 == 2 {
            for cmd in [
                TripCommand::Arrived {
                    driver_id: driver_id.clone(),
                },
                TripCommand::Start {
                    driver_id: driver_id.clone(),
                },
            ] {
                trip.apply(cmd, now + 30, &cfg, &eta).unwrap();
                batch = batch.trip(snapshot(&trip), Some(transition(&trip, Some(&driver_id))));
            }
        }
        assert_ne!(trip.state(), TripState::Completed);
        batch = batch.trip(snapshot(&trip), None);
        batch = batch.driver(driver(i, status, pickup, None));
        if batch.len() >= 5_000 {
            store.commit(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    store.commit(batch).await.unwrap();
    store.close().unwrap();
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}

fn main() {
    let drivers = env("RECOVERY_DRIVERS", 100_000);
    let trips = env("RECOVERY_TRIPS", 10_000).min(drivers);
    let runs = env("RECOVERY_RUNS", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    rt.block_on(populate(dir.path(), drivers, trips));
    println!(
        "populated {drivers} drivers, {trips} riders, {trips} live trips in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    println!(
        "data directory: {:.1} MiB",
        dir_size(dir.path()) as f64 / (1024.0 * 1024.0)
    );

    let mut times = Vec::new();
    for run in 1..=runs {
        let (ms, stats) = rt.block_on(async {
            let started = Instant::now();
            if std::env::var("RECOVERY_PHASES").is_ok() {
                let s = common::open_store(dir.path());
                let t = Instant::now();
                let l = s.load().unwrap();
                println!(
                    "  load alone: {} ms ({} drivers)",
                    t.elapsed().as_millis(),
                    l.drivers.len()
                );
            }
            let started = if std::env::var("RECOVERY_PHASES").is_ok() {
                Instant::now()
            } else {
                started
            };
            let (sys, store) = common::start(dir.path()).await;
            let stats = sys.recover().await.unwrap();
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            // The next run opens the directory again: wait until every actor let go.
            common::stop(
                sys,
                store,
                Duration::from_secs(120),
                Duration::from_millis(10),
            )
            .await;
            (ms, stats)
        });
        assert_eq!(
            (stats.drivers, stats.live_trips, stats.riders),
            (drivers, trips, trips)
        );
        println!("run {run}: ready in {ms:.0} ms ({stats:?})");
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "recovery of {drivers} drivers and {trips} live trips: median {:.0} ms over {runs} runs (min {:.0}, max {:.0}); data directory {:.1} MiB",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        dir_size(dir.path()) as f64 / (1024.0 * 1024.0)
    );
}
