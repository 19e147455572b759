//! Faults injected into one actor mid-ride: the supervisor restarts it from its last
//! committed snapshot, the ride completes, other rides and sessions are untouched, and
//! the restart is counted. Also: a request among 10,000 online drivers touches only the
//! searched rings.

use std::sync::Arc;
use std::time::Duration;

use dispatch_actors::messages::CellMsg;
use dispatch_actors::messages::TripMsg;
use dispatch_actors::messages::{DriverCommand, DriverMsg};
use dispatch_actors::messages::{RideRequest, RiderCommand, RiderMsg};
use dispatch_actors::payments::{PayFuture, PaymentProvider};
use dispatch_actors::session::Outbound;
use dispatch_actors::{System, SystemConfig};
use dispatch_engine::{DriverId, Point, Product, RiderId, TripId, TripState};

use ractor::{ActorRef, Message};

mod common;

use common::{
    App, WAIT, ask, driver_cmd, eventually, online_driver, rand_hash, register_driver, request,
    rider, start_with,
};

/// A started system over a store in a fresh temporary directory (kept alive by the
/// returned guard).
async fn start() -> (System, tempfile::TempDir) {
    start_with(|c| c, None).await
}

fn restarts(sys: &System, group: &str) -> u64 {
    sys.metrics()
        .actor_restarts
        .with_label_values(&[group])
        .get()
}

/// Makes the actor `find` returns panic, and waits until its supervisor has restarted
/// it: another actor in its place, and the restart counted for `group`.
async fn crash<M: Message>(
    sys: &System,
    group: &str,
    find: impl Fn() -> Option<ActorRef<M>>,
    panic: M,
) {
    let before = find().unwrap().get_id();
    find().unwrap().cast(panic).unwrap();
    eventually(&format!("{group} restarted"), || {
        restarts(sys, group) == 1 && find().is_some_and(|a| a.get_id() != before)
    })
    .await;
}

fn panics(sys: &System, group: &str) -> u64 {
    sys.metrics().actor_panics.with_label_values(&[group]).get()
}

/// A driver and a rider, each with its app, and the rider's trip.
struct Ride {
    driver: DriverId,
    dapp: App,
    rider: RiderId,
    rapp: App,
    trip: TripId,
}

impl Ride {
    /// An online driver at `at`, and a rider whose trip from `pickup` is offered to it.
    async fn offered(sys: &System, at: (f64, f64), pickup: (f64, f64)) -> Ride {
        let (driver, mut dapp) = online_driver(sys, at.0, at.1).await;
        let (rider, mut rapp) = rider(sys).await;
        let trip = request(sys, &rider, &mut rapp, pickup.0, pickup.1).await;
        assert_eq!(dapp.offer().await, trip);
        Ride {
            driver,
            dapp,
            rider,
            rapp,
            trip,
        }
    }

    /// As [`Ride::offered`], and accepted.
    async fn accepted(sys: &System, at: (f64, f64), pickup: (f64, f64)) -> Ride {
        let mut ride = Ride::offered(sys, at, pickup).await;
        ride.accept(sys).await;
        ride
    }

    /// The driver accepts, and the rider sees its trip assigned (version 2).
    async fn accept(&mut self, sys: &System) {
        self.driver_cmd(sys, DriverCommand::Accept(self.trip.clone()))
            .await;
        assert_eq!(self.rapp.trip_in(TripState::DriverAssigned).await, 2);
    }

    async fn driver_cmd(&mut self, sys: &System, cmd: DriverCommand) {
        driver_cmd(sys, &self.driver, &mut self.dapp, cmd).await;
    }

    /// Drives the accepted trip to `completed` and checks the rider saw each step.
    async fn finish(&mut self, sys: &System) {
        let t = self.trip.clone();
        self.driver_cmd(sys, DriverCommand::Arrived(t.clone()))
            .await;
        assert_eq!(self.rapp.trip_in(TripState::DriverArrived).await, 3);
        self.driver_cmd(sys, DriverCommand::StartTrip(t.clone()))
            .await;
        assert_eq!(self.rapp.trip_in(TripState::InProgress).await, 4);
        self.driver_cmd(sys, DriverCommand::CompleteTrip(t)).await;
        assert_eq!(self.rapp.trip_in(TripState::Completed).await, 5);
        self.rapp
            .next_where("receipt", |m| matches!(m, Outbound::Receipt(_)))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_actor_that_panics_mid_ride_is_restarted_and_the_ride_completes() {
    let (sys, _dir) = start().await;
    let mut one = Ride::accepted(&sys, (45.50, -73.57), (45.501, -73.571)).await;
    // Far away: the other ride.
    let mut other = Ride::accepted(&sys, (45.60, -73.70), (45.601, -73.701)).await;
    let (t1, t2) = (one.trip.clone(), other.trip.clone());
    let other_trip_actor = sys.trip_ref(&t2).unwrap().get_id();

    crash(&sys, "trip", || sys.trip_ref(&t1), TripMsg::InjectPanic).await;

    // The restarted trip resumes exactly where it was.
    let rec = ask(&sys.trip_ref(&t1).unwrap(), TripMsg::Get).await;
    assert_eq!(
        (rec.trip.state(), rec.trip.version()),
        (TripState::DriverAssigned, 2)
    );
    one.finish(&sys).await;

    // The other ride never noticed.
    assert_eq!(sys.trip_ref(&t2).unwrap().get_id(), other_trip_actor);
    other.finish(&sys).await;
    assert_eq!(restarts(&sys, "trip"), 1);
    assert_eq!(
        restarts(&sys, "driver") + restarts(&sys, "rider") + restarts(&sys, "cell"),
        0
    );
    // The panic was counted where it happened, and every group's message counters moved.
    assert_eq!(panics(&sys, "trip"), 1);
    assert_eq!(
        panics(&sys, "driver") + panics(&sys, "rider") + panics(&sys, "cell"),
        0
    );
    let stats = sys.actor_stats();
    for g in ["driver", "rider", "trip", "cell"] {
        let s = stats.iter().find(|s| s.group == g).unwrap();
        assert!(s.messages > 0 && s.started > 0, "{g}: {s:?}");
        assert!(
            s.handling_p99_ms >= 0.0 && s.handling_mean_ms > 0.0,
            "{g}: {s:?}"
        );
    }
    let trip = stats.iter().find(|s| s.group == "trip").unwrap();
    assert_eq!((trip.restarts, trip.panics), (1, 1));
    sys.shutdown().await;
}

fn reloads(sys: &System, outcome: &str) -> u64 {
    sys.metrics()
        .trip_reloads
        .with_label_values(&[outcome])
        .get()
}

/// The code of the answer to `req` (`None` for an ack or a trip_update).
async fn answer_code(app: &mut App, req: u64) -> Option<dispatch_actors::error::ErrorCode> {
    let m = app
        .next_where("reply", |m| matches!(m, Outbound::Ack { req: r } | Outbound::Error { req: Some(r), .. } | Outbound::TripUpdate { req: Some(r), .. } if *r == req))
        .await;
    match m {
        Outbound::Error { error, .. } => Some(error.code),
        _ => None,
    }
}

/// The store goes away mid-ride (writes and reads fail, as with PostgreSQL lost): the
/// trip's write fails, its actor fails, and the read that would restart it fails too.
/// The trip must come back once the store does, without a restart of the system, and
/// commands meanwhile are answered `unavailable` (retry), never lost or judged from the
/// store as if the trip had ended. (Before: the failed read dropped the trip for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_that_fails_while_the_store_is_away_comes_back_when_it_returns() {
    use dispatch_actors::error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let (sys, store) = common::start(dir.path()).await;
    let mut ride = Ride::accepted(&sys, (45.50, -73.57), (45.501, -73.571)).await;
    let t = ride.trip.clone();
    let driver = sys.driver_ref(&ride.driver).unwrap();

    store.faults().fail_writes(true);
    store.faults().fail_reads(true);
    // Two commands back to back: the first fails the trip's write (answered `unavailable`
    // by the trip), the second is in its mailbox or finds it gone: `unavailable` too, at
    // once, not `internal` after its ticket expires (later than this app waits).
    let first = ride.dapp.drive(&driver, DriverCommand::Arrived(t.clone()));
    let second = ride.dapp.drive(&driver, DriverCommand::Arrived(t.clone()));
    assert_eq!(
        answer_code(&mut ride.dapp, first).await,
        Some(ErrorCode::Unavailable)
    );
    assert_eq!(
        answer_code(&mut ride.dapp, second).await,
        Some(ErrorCode::Unavailable)
    );
    eventually("the trip's reload retried while the store is away", || {
        restarts(&sys, "trip") == 1 && sys.trip_ref(&t).is_none() && reloads(&sys, "retried") >= 2
    })
    .await;
    // While it is being read back, a command is `unavailable`, and so is the rider's new
    // request (whether the trip is still its own is not known yet).
    let again = ride.dapp.drive(&driver, DriverCommand::Arrived(t.clone()));
    assert_eq!(
        answer_code(&mut ride.dapp, again).await,
        Some(ErrorCode::Unavailable)
    );
    let rider = sys.rider_ref(&ride.rider).unwrap();
    let ask_again = ride.rapp.ride(
        &rider,
        RiderCommand::RequestRide(RideRequest::Direct {
            pickup: Point::new(45.501, -73.571).unwrap(),
            dropoff: Point::new(45.52, -73.571).unwrap(),
            product: Product::Economy,
        }),
    );
    assert_eq!(
        answer_code(&mut ride.rapp, ask_again).await,
        Some(ErrorCode::Unavailable)
    );

    // The store is back: the trip is read back (within the 5 s backoff) and resumes
    // where its last durable state left it.
    store.faults().fail_reads(false);
    store.faults().fail_writes(false);
    common::eventually_within(
        "the trip resumed",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || sys.trip_ref(&t).is_some(),
    )
    .await;
    assert_eq!(reloads(&sys, "resumed"), 1);
    let rec = ask(&sys.trip_ref(&t).unwrap(), TripMsg::Get).await;
    assert_eq!(
        (rec.trip.state(), rec.trip.version()),
        (TripState::DriverAssigned, 2)
    );
    ride.finish(&sys).await;
    sys.shutdown().await;
}

/// A ride request whose first write lands but is answered as failed (a `COMMIT` whose
/// connection was lost before its reply): the rider is told `unavailable`, the trip is
/// read back and resumed (the app gets its update), and the rider's retry is refused
/// `conflict` instead of creating a second live trip beside it. (Before: the rider was
/// freed at once, and the retry stored a second live trip for the same rider.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_write_landed_but_was_answered_failed_is_resumed_not_duplicated() {
    use dispatch_actors::error::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let (sys, store) = common::start(dir.path()).await;
    // A driver nearby keeps the trip live (an offer) while the test looks.
    let (_driver, _dapp) = online_driver(&sys, 45.50, -73.57).await;
    let (rider_id, mut app) = rider(&sys).await;
    let ask = || {
        RiderCommand::RequestRide(RideRequest::Direct {
            pickup: Point::new(45.501, -73.571).unwrap(),
            dropoff: Point::new(45.52, -73.571).unwrap(),
            product: Product::Economy,
        })
    };
    let r = sys.rider_ref(&rider_id).unwrap();
    store.faults().lose_commit_replies(1);
    let first = app.ride(&r, ask());
    assert_eq!(
        answer_code(&mut app, first).await,
        Some(ErrorCode::Unavailable)
    );
    let resumed = match app
        .next_where("the resumed trip's update", |m| {
            matches!(m, Outbound::TripUpdate { req: None, .. })
        })
        .await
    {
        Outbound::TripUpdate { trip, .. } => trip,
        _ => unreachable!(),
    };
    assert_eq!(
        (resumed.state, resumed.version),
        (TripState::Dispatching, 1)
    );
    assert_eq!(reloads(&sys, "resumed"), 1);
    let again = app.ride(&r, ask());
    assert_eq!(
        answer_code(&mut app, again).await,
        Some(ErrorCode::Conflict)
    );
    let mut live = Vec::new();
    store
        .scan_trips(None, 10_000, |t| {
            if t.trip.rider_id == rider_id && !t.trip.state().is_final() {
                live.push(t.trip.id.clone());
            }
            true
        })
        .unwrap();
    assert_eq!(
        live,
        vec![resumed.trip_id.clone()],
        "the rider's live trips in the store"
    );
    sys.shutdown().await;
}

/// A store outage fails many trips at once (every write fails, and so does every read
/// that would restart them): their reads back are retried while the store is away, but
/// never more than the cap of them are in flight at once, the others wait their turn
/// (counted), and once the store answers every trip resumes, none dropped. The reads in
/// flight are held by the test's hook and counted, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_trips_failing_while_the_store_is_away_are_read_back_at_most_the_cap_at_once() {
    use dispatch_actors::error::ErrorCode;
    use std::sync::atomic::Ordering;
    const TRIPS: usize = 12;
    const CAP: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(common::open_store(dir.path()));
    let hold = Arc::new(tokio::sync::Semaphore::new(0));
    let cfg = SystemConfig {
        trip_reload_reads_max: CAP,
        test_hold_trip_reloads: Some(hold.clone()),
        ..SystemConfig::default()
    };
    let metrics = Arc::new(dispatch_actors::Metrics::new());
    let sys = System::start(cfg, metrics, store.clone()).await.unwrap();
    let waits = || {
        sys.metrics()
            .bounds_hit
            .with_label_values(&["trip_reload_reads"])
            .get()
    };
    let peak = || sys.metrics().trip_reload_reads_peak.load(Ordering::SeqCst);
    // One at a time, each at the same place: the only free driver is the newest one.
    let mut rides = Vec::new();
    for _ in 0..TRIPS {
        rides.push(Ride::accepted(&sys, (45.50, -73.57), (45.501, -73.571)).await);
    }

    store.faults().fail_writes(true);
    store.faults().fail_reads(true);
    for ride in &mut rides {
        let driver = sys.driver_ref(&ride.driver).unwrap();
        let req = ride
            .dapp
            .drive(&driver, DriverCommand::Arrived(ride.trip.clone()));
        assert_eq!(
            answer_code(&mut ride.dapp, req).await,
            Some(ErrorCode::Unavailable)
        );
    }
    // Every trip failed and wants its read; the cap's worth are reading (held), the
    // others wait at the cap.
    eventually("every failed trip's read waiting or in flight", || {
        restarts(&sys, "trip") == TRIPS as u64 && waits() == (TRIPS - CAP) as u64
    })
    .await;
    assert_eq!(peak(), CAP, "reads in flight at once");
    assert!(rides.iter().all(|r| sys.trip_ref(&r.trip).is_none()));

    // Reads go ahead (and fail: the store is still away), and are retried.
    hold.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    eventually(
        "every failed trip's read retried while the store is away",
        || reloads(&sys, "retried") >= 2 * TRIPS as u64,
    )
    .await;
    store.faults().fail_reads(false);
    store.faults().fail_writes(false);
    common::eventually_within(
        "every trip resumed",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || reloads(&sys, "resumed") == TRIPS as u64,
    )
    .await;
    for ride in &rides {
        let rec = ask(&sys.trip_ref(&ride.trip).unwrap(), TripMsg::Get).await;
        assert_eq!(
            (rec.trip.state(), rec.trip.version()),
            (TripState::DriverAssigned, 2)
        );
    }
    assert_eq!(peak(), CAP, "reads in flight at once, retries included");
    // A resumed ride still completes.
    rides[0].finish(&sys).await;
    sys.shutdown().await;
}

/// A rider's cancel lands but is answered as failed (a `COMMIT` whose reply was lost):
/// the trip actor fails, and its read back finds the trip finished (cancelled). Nothing
/// of it is left in memory, as after a trip that finished on its own: its view is the
/// store's, not the last one its actor had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_read_back_finished_is_forgotten_like_one_that_finished_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (sys, store) = common::start(dir.path()).await;
    let mut ride = Ride::offered(&sys, (45.50, -73.57), (45.501, -73.571)).await;
    let t = ride.trip.clone();
    // Every write queued so far is done: the next group commit is the cancel's.
    store.sync().await.unwrap();
    store.faults().lose_commit_replies(1);
    let rider = sys.rider_ref(&ride.rider).unwrap();
    let _ = ride.rapp.ride(
        &rider,
        RiderCommand::CancelRide {
            trip_id: t.clone(),
            reason: None,
        },
    );
    eventually("the trip read back finished", || {
        reloads(&sys, "finished") == 1
    })
    .await;
    assert!(sys.trip_ref(&t).is_none());
    let view = sys.trip_view(&t).await.unwrap().unwrap();
    assert_eq!(view.state, TripState::Cancelled);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_actor_that_panics_keeps_its_status_session_and_trip() {
    let (sys, _dir) = start().await;
    let mut ride = Ride::accepted(&sys, (45.50, -73.57), (45.501, -73.571)).await;
    let (did, t) = (ride.driver.clone(), ride.trip.clone());

    crash(
        &sys,
        "driver",
        || sys.driver_ref(&did),
        DriverMsg::InjectPanic,
    )
    .await;
    assert_eq!(restarts(&sys, "driver"), 1);

    // Same session, same trip: the ride goes on through the restarted actor.
    let rec = ask(&sys.driver_ref(&did).unwrap(), DriverMsg::Get).await;
    assert_eq!(rec.status, dispatch_engine::DriverStatus::OnTrip(t.clone()));
    assert!(rec.session.is_some());
    ride.finish(&sys).await;
    // And it is available for the next one.
    let t2 = request(&sys, &ride.rider, &mut ride.rapp, 45.501, -73.571).await;
    assert_eq!(ride.dapp.offer().await, t2);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_actor_that_panics_while_dispatching_still_gets_its_trip() {
    let (sys, _dir) = start().await;
    let mut ride = Ride::offered(&sys, (45.50, -73.57), (45.501, -73.571)).await;
    let rid = ride.rider.clone();

    sys.rider_ref(&rid)
        .unwrap()
        .cast(RiderMsg::InjectPanic)
        .unwrap();
    eventually("rider restarted", || {
        restarts(&sys, "rider") == 1 && sys.rider_ref(&rid).is_some()
    })
    .await;

    ride.accept(&sys).await;
    // Still one active trip: a second request is refused.
    let second = RideRequest::Direct {
        pickup: Point::new(45.5, -73.57).unwrap(),
        dropoff: Point::new(45.51, -73.57).unwrap(),
        product: Product::Economy,
    };
    let req = ride.rapp.ride(
        &sys.rider_ref(&rid).unwrap(),
        RiderCommand::RequestRide(second),
    );
    let m = ride.rapp.next_where("reply", |m| matches!(m, Outbound::Error { req: Some(x), .. } | Outbound::TripUpdate { req: Some(x), .. } if *x == req)).await;
    assert!(
        matches!(m, Outbound::Error { ref error, .. } if error.code == dispatch_actors::ErrorCode::Conflict),
        "{m:?}"
    );
    ride.finish(&sys).await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_actor_that_panics_is_rebuilt_from_its_drivers() {
    let (sys, _dir) = start().await;
    let (_did, mut dapp) = online_driver(&sys, 45.50, -73.57).await;
    let cell = sys
        .config()
        .grid
        .cell_of(Point::new(45.50, -73.57).unwrap());
    crash(&sys, "cell", || sys.cell_ref(&cell), CellMsg::InjectPanic).await;
    assert_eq!(restarts(&sys, "cell"), 1);
    let c = sys.cell_ref(&cell).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (avail, _) = ask(&c, CellMsg::Count).await;
        if avail == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the driver never re-indexed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Dispatch finds the driver in the rebuilt cell.
    let (rid, mut rapp) = rider(&sys).await;
    let t = request(&sys, &rid, &mut rapp, 45.501, -73.571).await;
    assert_eq!(dapp.offer().await, t);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_among_10000_drivers_touches_only_the_searched_rings() {
    let (sys, _dir) = start().await;
    // 10,000 drivers on a 100 × 100 grid over ~18 × 18 km around (45.53, -73.62), one
    // session each, all online.
    let mut apps = Vec::new();
    for i in 0..100 {
        for j in 0..100 {
            let lat = 45.45 + 0.0016 * f64::from(i);
            let lng = -73.735 + 0.0023 * f64::from(j);
            let id = register_driver(&sys, "D", rand_hash()).await;
            let mut app = App::new(&sys);
            let a = sys.driver_ref(&id).unwrap();
            app.attach_driver(&a).await;
            app.drive(
                &a,
                DriverCommand::Location {
                    position: Point::new(lat, lng).unwrap(),
                    heading: None,
                },
            );
            app.drive(&a, DriverCommand::GoOnline);
            apps.push((id, app));
        }
    }
    let m = sys.metrics();
    // Every driver's go_online went through (the last ack of each queue)...
    for (_, app) in apps.iter_mut() {
        app.acked(2).await;
    }
    // ...and every one of them is indexed, available, in exactly one cell.
    let cells = sys.cell_ids();
    let mut indexed = 0;
    for c in &cells {
        let (available, total) = sys.cell_count(*c).await.unwrap();
        assert_eq!(available, total);
        indexed += total;
    }
    assert_eq!(indexed, 10_000);
    let cells_with_drivers = cells.len() as u64;
    let (cells0, examined0) = (m.search_cells.get(), m.search_drivers_examined.get());

    let (rid, mut rapp) = rider(&sys).await;
    let t = request(&sys, &rid, &mut rapp, 45.53, -73.62).await;
    eventually("an offer was reserved", || {
        m.offers.with_label_values(&["sent"]).get() == 1
    })
    .await;
    let cells = m.search_cells.get() - cells0;
    let examined = m.search_drivers_examined.get() - examined0;
    println!(
        "request among 10,000 drivers: searched {cells} of {cells_with_drivers} cells, examined {examined} drivers"
    );
    // The nearest ten are within the pickup's cell and its first ring: a handful of the
    // city's cells, each scanned whole (a cell holds ~130 of these drivers), so a few
    // hundred drivers examined of 10,000.
    assert!(
        (1..=19).contains(&cells),
        "searched {cells} of {cells_with_drivers} cells"
    );
    assert!(
        cells_with_drivers > 50,
        "the city spans {cells_with_drivers} cells"
    );
    assert!(
        examined < 10_000 * cells / cells_with_drivers * 3,
        "examined {examined} drivers in {cells} cells: more than the cells hold on average"
    );
    assert!(examined < 2_000, "examined {examined} of 10,000 drivers");
    let offered: Vec<_> = apps
        .iter_mut()
        .filter_map(|(id, a)| {
            std::iter::from_fn(|| a.rx.try_recv().ok())
                .any(|m| matches!(&*m, Outbound::Offer(o) if o.trip_id == t))
                .then(|| id.clone())
        })
        .collect();
    assert_eq!(offered.len(), 1, "exactly one driver holds the offer");
    sys.shutdown().await;
}

/// A search whose ring holds a cell that never answers finishes within one search
/// deadline, with what the other cells answered, and counts the late cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_with_a_stuck_cell_finishes_within_one_deadline() {
    let (sys, _dir) = start_with(
        |c| SystemConfig {
            search_timeout_ms: 300,
            ..c
        },
        None,
    )
    .await;
    let here = Point::new(45.50, -73.57).unwrap();
    let grid = sys.config().grid;
    // A driver in the pickup's cell, and one in the next cell north (ring 1).
    let mut there = here;
    while grid.cell_of(there) == grid.cell_of(here) {
        there = Point::new(there.lat() + 0.0005, there.lng()).unwrap();
    }
    let (_d1, _a1) = online_driver(&sys, here.lat(), here.lng()).await;
    let (_d2, _a2) = online_driver(&sys, there.lat(), there.lng()).await;
    assert_eq!(sys.nearby(here, 5_000.0, 10, None).await.len(), 2);
    let late = || {
        sys.metrics()
            .bounds_hit
            .with_label_values(&["cell_query_timeout"])
            .get()
    };
    assert_eq!(late(), 0);
    assert!(sys.stall_cell(grid.cell_of(there), Duration::from_secs(30)));
    let t = std::time::Instant::now();
    let found = sys.nearby(here, 5_000.0, 10, None).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1_500),
        "a stuck cell held the search {took:?} (deadline 300 ms)"
    );
    assert!(
        took >= Duration::from_millis(250),
        "did not wait for the cell: {took:?}"
    );
    assert_eq!(found.len(), 1, "the answering cell's driver is used");
    assert_eq!(found[0].position, here);
    assert_eq!(late(), 1);
}

/// A card processor that never answers.
struct Hung;

impl PaymentProvider for Hung {
    fn authorize(&self, _: String, _: i64) -> PayFuture<'_> {
        Box::pin(std::future::pending())
    }
    fn capture(&self, _: String, _: i64) -> PayFuture<'_> {
        Box::pin(std::future::pending())
    }
    fn release(&self, _: String) -> PayFuture<'_> {
        Box::pin(std::future::pending())
    }
    fn refund(&self, _: String, _: i64) -> PayFuture<'_> {
        Box::pin(std::future::pending())
    }
}

/// A provider that hangs on the hold at acceptance: the accept is refused `unavailable`
/// after `payment_timeout_ms`, nothing changes (the offer stays open), and the timeout
/// is counted as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_payment_provider_times_out_and_changes_nothing() {
    let (sys, _dir) = start_with(
        |c| SystemConfig {
            payment_timeout_ms: 200,
            ..c
        },
        Some(Arc::new(Hung)),
    )
    .await;
    let Ride {
        driver: did,
        mut dapp,
        trip: t,
        ..
    } = Ride::offered(&sys, (45.50, -73.57), (45.50, -73.57)).await;
    let started = std::time::Instant::now();
    let req = dapp.drive(
        &sys.driver_ref(&did).unwrap(),
        DriverCommand::Accept(t.clone()),
    );
    let m = dapp
        .next_where("accept reply", |m| matches!(m, Outbound::Ack { req: x } | Outbound::Error { req: Some(x), .. } if *x == req))
        .await;
    let took = started.elapsed();
    match m {
        Outbound::Error { error, .. } => {
            assert_eq!(
                error.code,
                dispatch_actors::ErrorCode::Unavailable,
                "{error:?}"
            )
        }
        m => panic!("accepted with a hung provider: {m:?}"),
    }
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let rec = sys.trip_state(&t).await.unwrap();
    assert_eq!(rec.trip.state(), TripState::Dispatching);
    assert_eq!(rec.trip.offer().map(|o| o.driver_id.clone()), Some(did));
    assert!(rec.entries.is_empty(), "no money moved: {:?}", rec.entries);
    let timeouts = sys
        .metrics()
        .payment_failures
        .with_label_values(&["authorize", "timeout"])
        .get();
    assert_eq!(timeouts, 1);
}
