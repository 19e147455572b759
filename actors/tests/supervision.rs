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
use dispatch_actors::session::{Outbound, Responder, SessionHandle, SessionInbox};
use dispatch_actors::views::{DriverProfile, RiderProfile, Vehicle};
use dispatch_actors::{Metrics, System, SystemConfig};
use dispatch_engine::{DispatchConfig, DriverId, Point, Product, RiderId, TripId, TripState};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A started system over a store in a fresh temporary directory (kept alive by the
/// returned guard).
async fn start() -> (System, tempfile::TempDir) {
    start_with(|c| c, None).await
}

/// As [`start`], with the configuration changed by `tune` and another payment provider.
async fn start_with(
    tune: impl FnOnce(SystemConfig) -> SystemConfig,
    provider: Option<Arc<dyn PaymentProvider>>,
) -> (System, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(dispatch_persistence::Store::open(dir.path(), |_| {}).unwrap());
    let cfg = SystemConfig {
        dispatch: DispatchConfig {
            offer_timeout_ms: 10_000,
            dispatch_deadline_ms: 60_000,
        },
        ws_outbound_queue_max: 4096,
        ..SystemConfig::default()
    };
    (
        System::start_with_provider(tune(cfg), Arc::new(Metrics::new()), store, provider)
            .await
            .unwrap(),
        dir,
    )
}

/// A fake app: a real session handle whose outbound queue the test reads.
struct App {
    handle: SessionHandle,
    rx: mpsc::Receiver<Outbound>,
    req: u64,
}

impl App {
    fn new(sys: &System) -> App {
        let (handle, inbox): (SessionHandle, SessionInbox) = sys.new_session();
        let (rx, _closed) = inbox.into_parts();
        App { handle, rx, req: 0 }
    }

    fn responder(&mut self) -> (u64, Responder) {
        self.req += 1;
        (
            self.req,
            Responder::new(Some(self.req), self.handle.clone()),
        )
    }

    async fn next_where(&mut self, what: &str, pred: impl Fn(&Outbound) -> bool) -> Outbound {
        loop {
            let m = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            let m = m.unwrap_or_else(|| panic!("session queue closed waiting for {what}"));
            if pred(&m) {
                return m;
            }
        }
    }

    async fn acked(&mut self, req: u64) {
        let m = self.next_where("reply", |m| matches!(m, Outbound::Ack { req: r } | Outbound::Error { req: Some(r), .. } if *r == req)).await;
        assert!(
            matches!(m, Outbound::Ack { .. }),
            "req {req} answered {m:?}"
        );
    }

    async fn trip_in(&mut self, state: TripState) -> u64 {
        match self
            .next_where(
                &format!("{state:?}"),
                |m| matches!(m, Outbound::TripUpdate { trip, .. } if trip.state == state),
            )
            .await
        {
            Outbound::TripUpdate { trip, .. } => trip.version,
            _ => unreachable!(),
        }
    }

    async fn offer(&mut self) -> TripId {
        match self
            .next_where("offer", |m| matches!(m, Outbound::Offer(_)))
            .await
        {
            Outbound::Offer(o) => o.trip_id,
            _ => unreachable!(),
        }
    }
}

fn vehicle() -> Vehicle {
    Vehicle {
        make: "Kia".into(),
        model: "Niro".into(),
        plate: "X1".into(),
        color: "red".into(),
        product: Product::Economy,
        seats: 4,
    }
}

async fn driver_cmd(sys: &System, id: &DriverId, app: &mut App, cmd: DriverCommand) {
    let (req, r) = app.responder();
    sys.driver_ref(id)
        .unwrap()
        .cast(DriverMsg::Command(cmd, r))
        .unwrap();
    app.acked(req).await;
}

/// A connected, online driver at (lat, lng).
async fn online_driver(sys: &System, lat: f64, lng: f64) -> (DriverId, App) {
    let id = sys
        .register_driver(
            DriverProfile {
                name: "D".into(),
                vehicle: vehicle(),
            },
            rand_hash(),
        )
        .await
        .unwrap();
    let mut app = App::new(sys);
    let h = app.handle.clone();
    sys.driver_ref(&id)
        .unwrap()
        .call(|r| DriverMsg::Attach(h, r), Some(WAIT))
        .await
        .unwrap();
    app.next_where("welcome", |m| matches!(m, Outbound::DriverWelcome { .. }))
        .await;
    driver_cmd(
        sys,
        &id,
        &mut app,
        DriverCommand::Location {
            position: Point::new(lat, lng).unwrap(),
            heading: None,
        },
    )
    .await;
    driver_cmd(sys, &id, &mut app, DriverCommand::GoOnline).await;
    (id, app)
}

async fn rider(sys: &System) -> (RiderId, App) {
    let id = sys
        .register_rider(
            RiderProfile {
                name: "R".into(),
                phone: "5550100".into(),
            },
            rand_hash(),
        )
        .await
        .unwrap();
    let mut app = App::new(sys);
    let h = app.handle.clone();
    sys.rider_ref(&id)
        .unwrap()
        .call(|r| RiderMsg::Attach(h, r), Some(WAIT))
        .await
        .unwrap();
    app.next_where("welcome", |m| matches!(m, Outbound::RiderWelcome { .. }))
        .await;
    (id, app)
}

fn rand_hash() -> [u8; 32] {
    rand::random()
}

async fn request(sys: &System, id: &RiderId, app: &mut App, lat: f64, lng: f64) -> TripId {
    let (req, r) = app.responder();
    let ride = RideRequest::Direct {
        pickup: Point::new(lat, lng).unwrap(),
        dropoff: Point::new(lat + 0.02, lng).unwrap(),
        product: Product::Economy,
    };
    sys.rider_ref(id)
        .unwrap()
        .cast(RiderMsg::Command(RiderCommand::RequestRide(ride), r))
        .unwrap();
    match app.next_where("request reply", |m| matches!(m, Outbound::TripUpdate { req: Some(r), .. } | Outbound::Error { req: Some(r), .. } if *r == req)).await {
        Outbound::TripUpdate { trip, .. } => trip.trip_id,
        m => panic!("request failed: {m:?}"),
    }
}

/// Polls (with a generous deadline) until `f` holds.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn restarts(sys: &System, group: &str) -> u64 {
    sys.metrics()
        .actor_restarts
        .with_label_values(&[group])
        .get()
}

fn panics(sys: &System, group: &str) -> u64 {
    sys.metrics().actor_panics.with_label_values(&[group]).get()
}

/// Drives an accepted trip to `completed` and checks both apps saw each step.
async fn finish_ride(
    sys: &System,
    t: &TripId,
    did: &DriverId,
    d: &mut App,
    r: &mut App,
    from_version: u64,
) {
    driver_cmd(sys, did, d, DriverCommand::Arrived(t.clone())).await;
    assert_eq!(r.trip_in(TripState::DriverArrived).await, from_version + 1);
    driver_cmd(sys, did, d, DriverCommand::StartTrip(t.clone())).await;
    assert_eq!(r.trip_in(TripState::InProgress).await, from_version + 2);
    driver_cmd(sys, did, d, DriverCommand::CompleteTrip(t.clone())).await;
    assert_eq!(r.trip_in(TripState::Completed).await, from_version + 3);
    r.next_where("receipt", |m| matches!(m, Outbound::Receipt(_)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_actor_that_panics_mid_ride_is_restarted_and_the_ride_completes() {
    let (sys, _dir) = start().await;
    let (d1, mut dapp1) = online_driver(&sys, 45.50, -73.57).await;
    let (d2, mut dapp2) = online_driver(&sys, 45.60, -73.70).await; // far away: the other ride
    let (r1, mut rapp1) = rider(&sys).await;
    let (r2, mut rapp2) = rider(&sys).await;

    let t1 = request(&sys, &r1, &mut rapp1, 45.501, -73.571).await;
    assert_eq!(dapp1.offer().await, t1);
    driver_cmd(&sys, &d1, &mut dapp1, DriverCommand::Accept(t1.clone())).await;
    assert_eq!(rapp1.trip_in(TripState::DriverAssigned).await, 2);

    let t2 = request(&sys, &r2, &mut rapp2, 45.601, -73.701).await;
    assert_eq!(dapp2.offer().await, t2);
    driver_cmd(&sys, &d2, &mut dapp2, DriverCommand::Accept(t2.clone())).await;
    let other_trip_actor = sys.trip_ref(&t2).unwrap().get_id();

    let before = sys.trip_ref(&t1).unwrap().get_id();
    sys.trip_ref(&t1)
        .unwrap()
        .cast(TripMsg::InjectPanic)
        .unwrap();
    eventually("trip restarted", || {
        restarts(&sys, "trip") == 1 && sys.trip_ref(&t1).is_some_and(|a| a.get_id() != before)
    })
    .await;

    // The restarted trip resumes exactly where it was.
    let rec = sys
        .trip_ref(&t1)
        .unwrap()
        .call(TripMsg::Get, Some(WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (rec.trip.state(), rec.trip.version()),
        (TripState::DriverAssigned, 2)
    );
    finish_ride(&sys, &t1, &d1, &mut dapp1, &mut rapp1, 2).await;

    // The other ride never noticed.
    assert_eq!(sys.trip_ref(&t2).unwrap().get_id(), other_trip_actor);
    finish_ride(&sys, &t2, &d2, &mut dapp2, &mut rapp2, 2).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_actor_that_panics_keeps_its_status_session_and_trip() {
    let (sys, _dir) = start().await;
    let (did, mut dapp) = online_driver(&sys, 45.50, -73.57).await;
    let (rid, mut rapp) = rider(&sys).await;
    let t = request(&sys, &rid, &mut rapp, 45.501, -73.571).await;
    assert_eq!(dapp.offer().await, t);
    driver_cmd(&sys, &did, &mut dapp, DriverCommand::Accept(t.clone())).await;
    assert_eq!(rapp.trip_in(TripState::DriverAssigned).await, 2);

    let before = sys.driver_ref(&did).unwrap().get_id();
    sys.driver_ref(&did)
        .unwrap()
        .cast(DriverMsg::InjectPanic)
        .unwrap();
    eventually("driver restarted", || {
        sys.driver_ref(&did).is_some_and(|a| a.get_id() != before)
    })
    .await;
    assert_eq!(restarts(&sys, "driver"), 1);

    // Same session, same trip: the ride goes on through the restarted actor.
    let rec = sys
        .driver_ref(&did)
        .unwrap()
        .call(DriverMsg::Get, Some(WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, dispatch_engine::DriverStatus::OnTrip(t.clone()));
    assert!(rec.session.is_some());
    finish_ride(&sys, &t, &did, &mut dapp, &mut rapp, 2).await;
    // And it is available for the next one.
    let t2 = request(&sys, &rid, &mut rapp, 45.501, -73.571).await;
    assert_eq!(dapp.offer().await, t2);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_actor_that_panics_while_dispatching_still_gets_its_trip() {
    let (sys, _dir) = start().await;
    let (did, mut dapp) = online_driver(&sys, 45.50, -73.57).await;
    let (rid, mut rapp) = rider(&sys).await;
    let t = request(&sys, &rid, &mut rapp, 45.501, -73.571).await;
    assert_eq!(dapp.offer().await, t);

    sys.rider_ref(&rid)
        .unwrap()
        .cast(RiderMsg::InjectPanic)
        .unwrap();
    eventually("rider restarted", || {
        restarts(&sys, "rider") == 1 && sys.rider_ref(&rid).is_some()
    })
    .await;

    driver_cmd(&sys, &did, &mut dapp, DriverCommand::Accept(t.clone())).await;
    assert_eq!(rapp.trip_in(TripState::DriverAssigned).await, 2);
    // Still one active trip: a second request is refused.
    let (req, r) = rapp.responder();
    let ride = RideRequest::Direct {
        pickup: Point::new(45.5, -73.57).unwrap(),
        dropoff: Point::new(45.51, -73.57).unwrap(),
        product: Product::Economy,
    };
    sys.rider_ref(&rid)
        .unwrap()
        .cast(RiderMsg::Command(RiderCommand::RequestRide(ride), r))
        .unwrap();
    let m = rapp.next_where("reply", |m| matches!(m, Outbound::Error { req: Some(x), .. } | Outbound::TripUpdate { req: Some(x), .. } if *x == req)).await;
    assert!(
        matches!(m, Outbound::Error { ref error, .. } if error.code == dispatch_actors::ErrorCode::Conflict),
        "{m:?}"
    );
    finish_ride(&sys, &t, &did, &mut dapp, &mut rapp, 2).await;
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
    let before = sys.cell_ref(&cell).unwrap().get_id();
    sys.cell_ref(&cell)
        .unwrap()
        .cast(CellMsg::InjectPanic)
        .unwrap();
    eventually("cell restarted", || {
        sys.cell_ref(&cell).is_some_and(|a| a.get_id() != before)
    })
    .await;
    assert_eq!(restarts(&sys, "cell"), 1);
    let c = sys.cell_ref(&cell).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (avail, _) = c.call(CellMsg::Count, Some(WAIT)).await.unwrap().unwrap();
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
            let id = sys
                .register_driver(
                    DriverProfile {
                        name: "D".into(),
                        vehicle: vehicle(),
                    },
                    rand_hash(),
                )
                .await
                .unwrap();
            let mut app = App::new(&sys);
            let a = sys.driver_ref(&id).unwrap();
            let h = app.handle.clone();
            a.call(|r| DriverMsg::Attach(h, r), Some(WAIT))
                .await
                .unwrap();
            let (_, r1) = app.responder();
            a.cast(DriverMsg::Command(
                DriverCommand::Location {
                    position: Point::new(lat, lng).unwrap(),
                    heading: None,
                },
                r1,
            ))
            .unwrap();
            let (_, r2) = app.responder();
            a.cast(DriverMsg::Command(DriverCommand::GoOnline, r2))
                .unwrap();
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
    // city's cells, and at most k + 1 drivers per cell examined (the one past the k-th
    // is looked at to rule out a tie).
    assert!(
        (1..=19).contains(&cells),
        "searched {cells} of {cells_with_drivers} cells"
    );
    assert!(
        cells_with_drivers > 50,
        "the city spans {cells_with_drivers} cells"
    );
    assert!(
        examined <= 11 * cells,
        "examined {examined} drivers in {cells} cells"
    );
    assert!(examined < 500, "examined {examined} of 10,000 drivers");
    let offered: Vec<_> = apps
        .iter_mut()
        .filter_map(|(id, a)| {
            std::iter::from_fn(|| a.rx.try_recv().ok())
                .any(|m| matches!(&m, Outbound::Offer(o) if o.trip_id == t))
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
    let (did, mut dapp) = online_driver(&sys, 45.50, -73.57).await;
    let (rid, mut rapp) = rider(&sys).await;
    let t = request(&sys, &rid, &mut rapp, 45.50, -73.57).await;
    dapp.next_where("offer", |m| matches!(m, Outbound::Offer(_)))
        .await;
    let (req, r) = dapp.responder();
    let started = std::time::Instant::now();
    sys.driver_ref(&did)
        .unwrap()
        .cast(DriverMsg::Command(DriverCommand::Accept(t.clone()), r))
        .unwrap();
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
