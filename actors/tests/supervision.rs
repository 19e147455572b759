//! Faults injected into one actor mid-ride: the supervisor restarts it from its last
//! committed snapshot, the ride completes, other rides and sessions are untouched, and
//! the restart is counted. Also: a request among 10,000 online drivers touches only the
//! searched rings.

use std::sync::Arc;
use std::time::Duration;

use dispatch_actors::cell::CellMsg;
use dispatch_actors::driver::{DriverCommand, DriverMsg};
use dispatch_actors::rider::{RideRequest, RiderMsg};
use dispatch_actors::session::{Outbound, Responder, SessionHandle, SessionInbox};
use dispatch_actors::trip::TripMsg;
use dispatch_actors::views::{DriverProfile, RiderProfile, Vehicle};
use dispatch_actors::{Metrics, System, SystemConfig};
use dispatch_engine::{DispatchConfig, DriverId, Point, Product, RiderId, TripId, TripState};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// A started system over a store in a fresh temporary directory (kept alive by the
/// returned guard).
async fn start() -> (System, tempfile::TempDir) {
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
        System::start(cfg, Arc::new(Metrics::new()), store)
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
    sys.registry
        .driver(id)
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
    sys.registry
        .driver(&id)
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
    sys.registry
        .rider(&id)
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
    sys.registry
        .rider(id)
        .unwrap()
        .cast(RiderMsg::RequestRide(ride, r))
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
    sys.metrics.actor_restarts.with_label_values(&[group]).get()
}

fn panics(sys: &System, group: &str) -> u64 {
    sys.metrics.actor_panics.with_label_values(&[group]).get()
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
    let other_trip_actor = sys.registry.trip(&t2).unwrap().get_id();

    let before = sys.registry.trip(&t1).unwrap().get_id();
    sys.registry
        .trip(&t1)
        .unwrap()
        .cast(TripMsg::InjectPanic)
        .unwrap();
    eventually("trip restarted", || {
        restarts(&sys, "trip") == 1 && sys.registry.trip(&t1).is_some_and(|a| a.get_id() != before)
    })
    .await;

    // The restarted trip resumes exactly where it was.
    let rec = sys
        .registry
        .trip(&t1)
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
    assert_eq!(sys.registry.trip(&t2).unwrap().get_id(), other_trip_actor);
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

    let before = sys.registry.driver(&did).unwrap().get_id();
    sys.registry
        .driver(&did)
        .unwrap()
        .cast(DriverMsg::InjectPanic)
        .unwrap();
    eventually("driver restarted", || {
        sys.registry
            .driver(&did)
            .is_some_and(|a| a.get_id() != before)
    })
    .await;
    assert_eq!(restarts(&sys, "driver"), 1);

    // Same session, same trip: the ride goes on through the restarted actor.
    let rec = sys
        .registry
        .driver(&did)
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

    sys.registry
        .rider(&rid)
        .unwrap()
        .cast(RiderMsg::InjectPanic)
        .unwrap();
    eventually("rider restarted", || {
        restarts(&sys, "rider") == 1 && sys.registry.rider(&rid).is_some()
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
    sys.registry
        .rider(&rid)
        .unwrap()
        .cast(RiderMsg::RequestRide(ride, r))
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
    let cell = sys.config.grid.cell_of(Point::new(45.50, -73.57).unwrap());
    let before = sys.registry.cell(&cell).unwrap().get_id();
    sys.registry
        .cell(&cell)
        .unwrap()
        .cast(CellMsg::InjectPanic)
        .unwrap();
    eventually("cell restarted", || {
        sys.registry
            .cell(&cell)
            .is_some_and(|a| a.get_id() != before)
    })
    .await;
    assert_eq!(restarts(&sys, "cell"), 1);
    let c = sys.registry.cell(&cell).unwrap();
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
            let a = sys.registry.driver(&id).unwrap();
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
    let m = &sys.metrics;
    // Every driver's go_online went through (the last ack of each queue)...
    for (_, app) in apps.iter_mut() {
        app.acked(2).await;
    }
    // ...and every one of them is indexed, available, in exactly one cell.
    let cells: Vec<_> = sys
        .registry
        .cells
        .iter()
        .map(|c| c.value().clone())
        .collect();
    let mut indexed = 0;
    for c in cells {
        let (available, total) = c.call(CellMsg::Count, Some(WAIT)).await.unwrap().unwrap();
        assert_eq!(available, total);
        indexed += total;
    }
    assert_eq!(indexed, 10_000);
    let cells_with_drivers = sys.registry.cells.len() as u64;
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
