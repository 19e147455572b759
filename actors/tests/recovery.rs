//! Recovery through the actors: stop a system, start another on the same store, and
//! find every driver, rider and live trip as it was; offline drivers wake on demand.

use std::sync::Arc;
use std::time::Duration;

use dispatch_actors::System;
use dispatch_actors::messages::{DriverCommand, DriverMsg};
use dispatch_actors::messages::{RideRequest, RiderCommand};
use dispatch_actors::session::{Outbound, Responder};
use dispatch_engine::{DriverStatus, Point, Product, TripState};
use dispatch_persistence::Store;

mod common;

use common::{App, WAIT, ask, register_driver, register_rider, start};

/// Stops `sys` and waits until the store can be opened again.
async fn stop(sys: System, store: Arc<Store>) {
    common::stop(sys, store, WAIT, Duration::from_millis(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_system_on_the_same_store_resumes_where_the_first_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (sys, store) = start(dir.path()).await;
    let on = register_driver(&sys, "On", [1; 32]).await;
    let off = register_driver(&sys, "Off", [2; 32]).await;
    let rider = register_rider(&sys, "R", [3; 32]).await;

    // The online driver accepts a trip.
    let mut dapp = App::new(&sys);
    let d = sys.driver_ref(&on).unwrap();
    dapp.attach_driver(&d).await;
    let here = Point::new(45.5, -73.57).unwrap();
    d.cast(DriverMsg::Command(
        DriverCommand::Location {
            position: here,
            heading: None,
        },
        Responder::none(),
        None,
    ))
    .unwrap();
    let req = dapp.drive(&d, DriverCommand::GoOnline);
    dapp.acked(req).await;
    let mut rapp = App::new(&sys);
    let r = sys.rider_ref(&rider).unwrap();
    rapp.attach_rider(&r).await;
    let ride = RideRequest::Direct {
        pickup: here,
        dropoff: Point::new(45.52, -73.57).unwrap(),
        product: Product::Economy,
    };
    rapp.ride(&r, RiderCommand::RequestRide(ride));
    let trip_id = dapp.offer().await;
    let req = dapp.drive(&d, DriverCommand::Accept(trip_id.clone()));
    dapp.acked(req).await;
    rapp.trip_in(TripState::DriverAssigned).await;
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
    let rec = ask(&woke, DriverMsg::Get).await;
    assert_eq!(rec.status, DriverStatus::Offline);

    // The trip and the online driver are exactly as they were; tokens work.
    let rec = ask(&sys.driver_ref(&on).unwrap(), DriverMsg::Get).await;
    assert_eq!(rec.status, DriverStatus::OnTrip(trip_id.clone()));
    assert_eq!(
        rec.trip.as_ref().map(|t| (t.state, t.version)),
        Some((TripState::DriverAssigned, 2))
    );
    let view = sys.trip_view(&trip_id).await.unwrap().unwrap();
    assert_eq!((view.state, view.version), (TripState::DriverAssigned, 2));
    assert!(sys.authenticate(&[1; 32]).is_some() && sys.authenticate(&[3; 32]).is_some());
    // The driver reconnects and finishes the ride.
    let mut dapp = App::new(&sys);
    let d = sys.wake_driver(&on).await.unwrap();
    dapp.attach_driver(&d).await;
    match dapp
        .next_where("welcome", |m| matches!(m, Outbound::DriverWelcome { .. }))
        .await
    {
        Outbound::DriverWelcome { status, trip, .. } => {
            assert_eq!(status.as_str(), "on_trip");
            assert_eq!(trip.map(|t| t.trip_id), Some(trip_id.clone()));
        }
        _ => unreachable!(),
    }
    for cmd in [
        DriverCommand::Arrived(trip_id.clone()),
        DriverCommand::StartTrip(trip_id.clone()),
        DriverCommand::CompleteTrip(trip_id.clone()),
    ] {
        let req = dapp.drive(&d, cmd);
        dapp.acked(req).await;
    }
    assert_eq!(
        sys.trip_view(&trip_id).await.unwrap().unwrap().state,
        TripState::Completed
    );
    stop(sys, store).await;
}
