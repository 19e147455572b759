//! Recovery through the actors: stop a system, start another on the same store, and
//! find every driver, rider and live trip as it was; offline drivers wake on demand.

use std::sync::Arc;
use std::time::Duration;

use dispatch_actors::messages::{DriverCommand, DriverMsg};
use dispatch_actors::messages::{RideRequest, RiderCommand, RiderMsg};
use dispatch_actors::session::{Outbound, Responder};
use dispatch_actors::views::{DriverProfile, RiderProfile, Vehicle};
use dispatch_actors::{Metrics, System, SystemConfig};
use dispatch_engine::{DriverStatus, Point, Product, TripState};
use dispatch_persistence::Store;

const WAIT: Duration = Duration::from_secs(10);

async fn start(dir: &std::path::Path) -> (System, Arc<Store>) {
    let store = Arc::new(Store::open(dir, |_| {}).unwrap());
    let sys = System::start(
        SystemConfig::default(),
        Arc::new(Metrics::new()),
        store.clone(),
    )
    .await
    .unwrap();
    (sys, store)
}

async fn stop(sys: System, store: Arc<Store>) {
    sys.shutdown().await;
    drop(sys);
    let deadline = tokio::time::Instant::now() + WAIT;
    while Arc::strong_count(&store) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store is still held after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
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

async fn until(
    rx: &mut tokio::sync::mpsc::Receiver<Outbound>,
    what: &str,
    f: impl Fn(&Outbound) -> bool,
) -> Outbound {
    loop {
        let m = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("waiting for {what}"))
            .unwrap();
        if f(&m) {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_system_on_the_same_store_resumes_where_the_first_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (sys, store) = start(dir.path()).await;
    let on = sys
        .register_driver(
            DriverProfile {
                name: "On".into(),
                vehicle: vehicle(),
            },
            [1; 32],
        )
        .await
        .unwrap();
    let off = sys
        .register_driver(
            DriverProfile {
                name: "Off".into(),
                vehicle: vehicle(),
            },
            [2; 32],
        )
        .await
        .unwrap();
    let rider = sys
        .register_rider(
            RiderProfile {
                name: "R".into(),
                phone: "5550100".into(),
            },
            [3; 32],
        )
        .await
        .unwrap();

    // The online driver accepts a trip.
    let (h, inbox) = sys.new_session();
    let (mut rx, _) = inbox.into_parts();
    let d = sys.driver_ref(&on).unwrap();
    let h2 = h.clone();
    d.call(|r| DriverMsg::Attach(h2, r), Some(WAIT))
        .await
        .unwrap();
    let here = Point::new(45.5, -73.57).unwrap();
    d.cast(DriverMsg::Command(
        DriverCommand::Location {
            position: here,
            heading: None,
        },
        Responder::none(),
    ))
    .unwrap();
    d.cast(DriverMsg::Command(
        DriverCommand::GoOnline,
        Responder::new(Some(1), h.clone()),
    ))
    .unwrap();
    until(&mut rx, "ack", |m| matches!(m, Outbound::Ack { req: 1 })).await;
    let (rh, rinbox) = sys.new_session();
    let (mut rrx, _) = rinbox.into_parts();
    let r = sys.rider_ref(&rider).unwrap();
    let rh2 = rh.clone();
    r.call(|p| RiderMsg::Attach(rh2, p), Some(WAIT))
        .await
        .unwrap();
    let ride = RideRequest::Direct {
        pickup: here,
        dropoff: Point::new(45.52, -73.57).unwrap(),
        product: Product::Economy,
    };
    r.cast(RiderMsg::Command(
        RiderCommand::RequestRide(ride),
        Responder::new(Some(1), rh.clone()),
    ))
    .unwrap();
    let trip_id = match until(&mut rx, "offer", |m| matches!(m, Outbound::Offer(_))).await {
        Outbound::Offer(o) => o.trip_id,
        _ => unreachable!(),
    };
    d.cast(DriverMsg::Command(
        DriverCommand::Accept(trip_id.clone()),
        Responder::new(Some(2), h.clone()),
    ))
    .unwrap();
    until(&mut rx, "accept ack", |m| {
        matches!(m, Outbound::Ack { req: 2 })
    })
    .await;
    until(&mut rrx, "assigned", |m| matches!(m, Outbound::TripUpdate { trip, .. } if trip.state == TripState::DriverAssigned)).await;
    stop(sys, store).await;

    let (sys, store) = start(dir.path()).await;
    let stats = sys.recover().await.unwrap();
    assert_eq!(
        (stats.drivers, stats.riders, stats.live_trips),
        (2, 1, 1),
        "{stats:?}"
    );
    // Only the online driver and the rider with a trip have actors; the offline driver
    // wakes when its app connects.
    assert_eq!(
        (stats.driver_actors, stats.rider_actors),
        (1, 1),
        "{stats:?}"
    );
    assert!(sys.driver_ref(&off).is_none());
    let woke = sys
        .wake_driver(&off)
        .await
        .expect("the offline driver wakes on demand");
    let rec = woke
        .call(DriverMsg::Get, Some(WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, DriverStatus::Offline);

    // The trip and the online driver are exactly as they were; tokens work.
    let rec = sys
        .driver_ref(&on)
        .unwrap()
        .call(DriverMsg::Get, Some(WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, DriverStatus::OnTrip(trip_id.clone()));
    assert_eq!(
        rec.trip.as_ref().map(|t| (t.state, t.version)),
        Some((TripState::DriverAssigned, 2))
    );
    let view = sys.trip_view(&trip_id).await.unwrap().unwrap();
    assert_eq!((view.state, view.version), (TripState::DriverAssigned, 2));
    assert!(sys.authenticate(&[1; 32]).is_some() && sys.authenticate(&[3; 32]).is_some());
    // The driver reconnects and finishes the ride.
    let (h, inbox) = sys.new_session();
    let (mut rx, _) = inbox.into_parts();
    let d = sys.wake_driver(&on).await.unwrap();
    let h2 = h.clone();
    d.call(|r| DriverMsg::Attach(h2, r), Some(WAIT))
        .await
        .unwrap();
    match until(&mut rx, "welcome", |m| {
        matches!(m, Outbound::DriverWelcome { .. })
    })
    .await
    {
        Outbound::DriverWelcome { status, trip, .. } => {
            assert_eq!(status.as_str(), "on_trip");
            assert_eq!(trip.map(|t| t.trip_id), Some(trip_id.clone()));
        }
        _ => unreachable!(),
    }
    for (req, cmd) in [
        (1, DriverCommand::Arrived(trip_id.clone())),
        (2, DriverCommand::StartTrip(trip_id.clone())),
        (3, DriverCommand::CompleteTrip(trip_id.clone())),
    ] {
        d.cast(DriverMsg::Command(
            cmd,
            Responder::new(Some(req), h.clone()),
        ))
        .unwrap();
        let m = until(&mut rx, "reply", |m| matches!(m, Outbound::Ack { req: r } | Outbound::Error { req: Some(r), .. } if *r == req)).await;
        assert!(matches!(m, Outbound::Ack { .. }), "{m:?}");
    }
    assert_eq!(
        sys.trip_view(&trip_id).await.unwrap().unwrap().state,
        TripState::Completed
    );
    stop(sys, store).await;
}
