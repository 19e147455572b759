//! Batched matching in the live actors (issue 17): a window hands its leftover trips the
//! remaining free drivers in the same solve, so they neither wait for another window nor
//! race one another for the same drivers (each loser's driver refusing an offer it never
//! saw), and the engine takes the window's ETAs as they are.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dispatch_actors::SystemConfig;
use dispatch_actors::batch::Matching;
use dispatch_actors::messages::DriverCommand;
use dispatch_actors::session::Outbound;
use dispatch_engine::{EtaEstimate, EtaModel, Point, SearchParams, StraightLineEta, TripId};

mod common;

use common::{App, eventually, online_driver, request, rider, start_with};

/// 1 km of latitude, in degrees.
const KM: f64 = 0.009;
const LAT: f64 = 45.5;
const LNG: f64 = -73.57;

/// An ETA model that counts its estimates of pickups at (LAT, LNG) (not the route
/// estimates that price the rides).
#[derive(Debug, Default)]
struct CountingEta(AtomicUsize);

impl EtaModel for CountingEta {
    fn estimate(&self, from: Point, to: Point) -> EtaEstimate {
        if to == Point::new(LAT, LNG).unwrap() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        StraightLineEta::default().estimate(from, to)
    }
}

/// A batched system (2 s windows) whose searches find only the nearest driver, so that
/// every trip at one pickup brings the same single option to the window.
async fn nearest_only(eta: Arc<CountingEta>) -> (dispatch_actors::System, tempfile::TempDir) {
    start_with(
        |c| SystemConfig {
            matching: Matching::Batch { window_ms: 2_000 },
            search: SearchParams { k: 1, ..c.search },
            eta,
            ..c
        },
        None,
    )
    .await
}

/// The trip of the next offer on `app`, and its pickup ETA.
async fn offered(app: &mut App) -> (TripId, u64) {
    match app
        .next_where("offer", |m| matches!(m, Outbound::Offer(_)))
        .await
    {
        Outbound::Offer(o) => (o.trip_id, o.pickup_eta_s),
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_trips_get_the_remaining_free_drivers_in_the_same_window() {
    const N: usize = 4;
    let eta = Arc::new(CountingEta::default());
    let (sys, _dir) = nearest_only(eta.clone()).await;
    // Drivers 0.5, 1, 1.5 and 2 km north of the one pickup all riders ask at.
    let mut drivers = Vec::new();
    for i in 1..=N {
        drivers.push(online_driver(&sys, LAT + i as f64 * 0.5 * KM, LNG).await.1);
    }
    let mut trips = Vec::new();
    let mut riders = Vec::new();
    for _ in 0..N {
        let (id, mut app) = rider(&sys).await;
        trips.push(request(&sys, &id, &mut app, LAT, LNG).await);
        riders.push(app);
    }
    // Each driver is offered one of the trips, each trip once.
    let mut got = Vec::new();
    for d in &mut drivers {
        got.push(offered(d).await);
    }
    let mut offered_trips: Vec<_> = got.iter().map(|(t, _)| t.clone()).collect();
    offered_trips.sort();
    trips.sort();
    assert_eq!(offered_trips, trips, "every trip offered to one driver");
    let m = sys.metrics();
    assert_eq!(
        m.batch_size.get_sample_count(),
        1,
        "all in one window, none in a later one"
    );
    let retries = |o: &str| m.batch_retries.with_label_values(&[o]).get();
    assert_eq!(retries("greedy"), 0, "no trip retried on its own");
    assert_eq!(
        retries("next_window"),
        0,
        "no trip waited for another window"
    );
    let refused = m.offers.with_label_values(&["refused"]).get();
    assert_eq!(refused, 0, "no driver was offered a trip it could not hold");
    assert_eq!(
        retries("same_window"),
        (N - 1) as u64,
        "the window's leftover rounds matched the other trips"
    );
    // Every ETA was estimated once: one per search's candidate (a first search per trip
    // plus a search per trip and leftover round), none again by the engine. The offers
    // carry the window's ETAs: 0.5 km steps at the model's speed, nearest first.
    let searched = N + (N - 1) + (N - 2) + (N - 3);
    assert_eq!(
        eta.0.load(Ordering::Relaxed),
        searched,
        "ETAs estimated twice"
    );
    let etas: Vec<u64> = got.iter().map(|(_, e)| *e).collect();
    assert!(etas.windows(2).all(|w| w[0] < w[1]), "{etas:?}");
    drop(riders);
    sys.shutdown().await;
}

/// A trip its window left with nobody free waits; a driver who frees up afterwards is
/// offered to it at once (it waited through a whole window already), not at the close of
/// another window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_who_frees_up_goes_at_once_to_a_trip_that_waited_a_window() {
    let (sys, _dir) = start_with(
        |c| SystemConfig {
            matching: Matching::Batch { window_ms: 2_000 },
            ..c
        },
        None,
    )
    .await;
    let (driver_id, mut driver) = online_driver(&sys, LAT + 0.5 * KM, LNG).await;
    let mut trips = Vec::new();
    let mut riders = Vec::new();
    for _ in 0..2 {
        let (id, mut app) = rider(&sys).await;
        trips.push(request(&sys, &id, &mut app, LAT, LNG).await);
        riders.push(app);
    }
    // One window gives the one driver to one trip; the other finds nobody free, waits.
    let first = driver.offer().await;
    let m = sys.metrics();
    let retries = |o: &str| m.batch_retries.with_label_values(&[o]).get();
    eventually("the other trip waits", || retries("next_window") == 1).await;
    // The driver declines, and so is free again (the declined trip, finding nobody else,
    // ends): it goes to the waiting trip at once, without another window.
    let decline = DriverCommand::Decline(first.clone());
    driver.drive(&sys.driver_ref(&driver_id).unwrap(), decline);
    let second = driver.offer().await;
    let waited = trips.iter().find(|t| **t != first).unwrap();
    assert_eq!(&second, waited, "the waiting trip got the driver");
    assert_eq!(
        m.batch_size.get_sample_count(),
        1,
        "one window in all: the waiting trip did not wait for another"
    );
    assert_eq!(
        retries("freed"),
        1,
        "handed to the waiting trip as it freed up"
    );
    drop(riders);
    sys.shutdown().await;
}

/// A batched system with `window_ms` windows.
async fn batched(window_ms: u64) -> (dispatch_actors::System, tempfile::TempDir) {
    start_with(
        |c| SystemConfig {
            matching: Matching::Batch { window_ms },
            ..c
        },
        None,
    )
    .await
}

/// Trips a window left with nobody free wait; a driver who frees up is handed to the
/// nearest of them at once, by the cell that saw it free (not found by a poll), and only
/// to that one: the other goes on waiting and is handed the driver when it frees up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_driver_is_handed_to_the_nearest_waiting_trip_only() {
    let (sys, _dir) = batched(3_000).await;
    let (driver_id, mut driver) = online_driver(&sys, LAT + 0.5 * KM, LNG).await;
    // Pickups 0.5, 1.5 and 2.5 km from the one driver.
    let mut trips = Vec::new();
    let mut riders = Vec::new();
    for km in [0.0, 1.0, 2.0] {
        let (id, mut app) = rider(&sys).await;
        trips.push(request(&sys, &id, &mut app, LAT - km * KM, LNG).await);
        riders.push(app);
    }
    let m = sys.metrics();
    let retries = |o: &str| m.batch_retries.with_label_values(&[o]).get();
    // The window gives the driver to the nearest trip; the two others find nobody free.
    let first = driver.offer().await;
    assert_eq!(first, trips[0]);
    eventually("two trips wait", || m.batch_waiting.get() == 2).await;
    let polls = || {
        m.actor_messages
            .with_label_values(&["trip", "search_again"])
            .get()
    };
    let driver_ref = sys.driver_ref(&driver_id).unwrap();
    // Declined (the first trip, finding nobody else, ends): handed to the nearer waiting
    // trip at once, the farther one still waits.
    driver.drive(&driver_ref, DriverCommand::Decline(first));
    assert_eq!(driver.offer().await, trips[1], "the nearest waiting trip");
    assert_eq!(retries("freed"), 1, "handed by the cell");
    assert_eq!(m.batch_waiting.get(), 1, "the other trip still waits");
    // Declined again: the last waiting trip gets it.
    driver.drive(&driver_ref, DriverCommand::Decline(trips[1].clone()));
    assert_eq!(driver.offer().await, trips[2]);
    assert_eq!(retries("freed"), 2);
    assert_eq!(m.batch_waiting.get(), 0);
    let refused = m.offers.with_label_values(&["refused"]).get();
    assert_eq!(refused, 0, "no waiting trip raced another for the driver");
    assert_eq!(retries("waited_greedy"), 0, "no poll found the driver");
    assert_eq!(polls(), 0, "no safety poll was needed");
    assert_eq!(m.batch_size.get_sample_count(), 1, "one window in all");
    drop(riders);
    sys.shutdown().await;
}
