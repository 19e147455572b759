//! Sessions: reconnecting resumes from `welcome`, a second session takes over (4001), and a
//! dropped driver keeps its status for the grace period only.

use std::time::Instant;

use dispatch_tests::{
    Client, DROPOFF, PICKUP, Ride, RidePlan, TestServer, accepted, eventually, north_of, ride_to,
};
use dispatch_transport::wire::{DriverStatus, ServerMessage, Trip, TripState};
use serde_json::json;

/// A driver's `welcome`: (status, offer, trip).
fn driver_welcome(
    m: ServerMessage,
) -> (
    DriverStatus,
    Option<dispatch_transport::wire::Offer>,
    Option<Trip>,
) {
    match m {
        ServerMessage::Welcome {
            driver_id: Some(_),
            rider_id: None,
            status: Some(status),
            offer: Some(offer),
            trip,
        } => (status, offer, trip),
        m => panic!("not a driver welcome (with `status` and `offer`): {m:?}"),
    }
}

fn rider_welcome(m: ServerMessage) -> (String, Option<Trip>) {
    match m {
        ServerMessage::Welcome {
            rider_id: Some(id),
            driver_id: None,
            trip,
            ..
        } => (id, trip),
        m => panic!("not a rider welcome: {m:?}"),
    }
}

/// How many drivers `GET /v1/drivers/nearby` shows around `at`.
async fn nearby_count(s: &TestServer, rider_token: &str, at: (f64, f64)) -> usize {
    let (st, v) = s
        .get(
            &format!("/v1/drivers/nearby?lat={}&lng={}", at.0, at.1),
            Some(rider_token),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    v["drivers"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_on_a_trip_reconnects_and_finishes_the_ride() {
    let s = TestServer::start(&["--session-grace-ms", "5000"]).await;
    let Ride {
        driver_id: did,
        driver_token: dtoken,
        d,
        mut r,
        trip,
        ..
    } = ride_to(&s, TripState::DriverArrived).await;

    // The app drops and comes back: welcome holds everything needed to resume.
    d.close().await;
    let mut d = Client::driver(&s, &dtoken).await.unwrap();
    let (status, offer, t) = driver_welcome(d.welcome().await);
    assert_eq!(status, DriverStatus::OnTrip);
    assert_eq!(offer, None);
    let t = t.expect("welcome carries the trip");
    assert_eq!(
        (
            t.trip_id.as_str(),
            t.state,
            t.version,
            t.driver_id.as_deref()
        ),
        (
            trip.trip_id.as_str(),
            TripState::DriverArrived,
            3,
            Some(did.as_str())
        )
    );

    // The ride resumes and completes; the rider saw nothing of the drop.
    d.ok(json!({"type": "start_trip", "trip_id": trip.trip_id}))
        .await;
    let t = r.trip_update().await;
    assert_eq!((t.state, t.version), (TripState::InProgress, 4));
    d.ok(json!({"type": "complete_trip", "trip_id": trip.trip_id}))
        .await;
    let t = r.trip_update().await;
    assert_eq!((t.state, t.version), (TripState::Completed, 5));
    let t = d.trip_in(TripState::Completed).await;
    assert_eq!(t.version, 5);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_reconnects_and_resumes_the_active_trip() {
    let s = TestServer::start(&[]).await;
    let Ride {
        driver_id: did,
        mut d,
        rider_id: rid,
        rider_token: rtoken,
        r,
        trip,
        ..
    } = ride_to(&s, TripState::Dispatching).await;

    r.close().await;
    let mut r = Client::rider(&s, &rtoken).await.unwrap();
    let (id, t) = rider_welcome(r.welcome().await);
    assert_eq!(id, rid);
    let t = t.expect("welcome carries the active trip");
    assert_eq!(
        (t.trip_id.as_str(), t.state, t.version),
        (trip.trip_id.as_str(), TripState::Dispatching, 1)
    );

    // Updates now reach the new session.
    accepted(&mut d, &mut r, &trip.trip_id, &did, 2).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offered_driver_reconnects_and_sees_the_offer_in_welcome() {
    let s = TestServer::start(&["--offer-timeout-ms", "30000"]).await;
    let Ride {
        driver_id: did,
        driver_token: dtoken,
        d,
        mut r,
        trip,
        offer: first,
        ..
    } = ride_to(&s, TripState::Dispatching).await;

    d.close().await;
    let mut d = Client::driver(&s, &dtoken).await.unwrap();
    let (status, offer, t) = driver_welcome(d.welcome().await);
    assert_eq!((status, t), (DriverStatus::Offered, None));
    let offer = offer.expect("welcome carries the open offer");
    assert_eq!(offer.trip_id, trip.trip_id);
    assert_eq!(offer.fare_cents, first.fare_cents);
    assert!(
        offer.expires_in_ms > 0 && offer.expires_in_ms <= first.expires_in_ms,
        "{offer:?} vs {first:?}"
    );

    accepted(&mut d, &mut r, &trip.trip_id, &did, 2).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_driver_session_takes_over_and_the_first_is_closed_with_4001() {
    let s = TestServer::start(&[]).await;
    let plan = RidePlan::default();
    let (did, dtoken, mut d1) = plan.online_driver(&s).await;

    let mut d2 = Client::driver(&s, &dtoken).await.unwrap();
    let (status, offer, trip) = driver_welcome(d2.welcome().await);
    assert_eq!((status, offer, trip), (DriverStatus::Available, None, None));
    assert_eq!(d1.closed_with().await, Some(4001));

    // The new session works, and it is the one offers go to.
    d2.go_online(plan.driver_at).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(d2.offer().await.trip_id, trip.trip_id);
    accepted(&mut d2, &mut r, &trip.trip_id, &did, 2).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rider_session_takes_over_and_the_first_is_closed_with_4001() {
    let s = TestServer::start(&[]).await;
    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (rid, rtoken, mut r1) = s.connected_rider("Riley").await;
    let trip = r1.request_ride(PICKUP, DROPOFF, "economy").await;
    d.offer().await;

    // The second session is a browser's: the token comes as `?token=`.
    let url = format!("{}?token={rtoken}", s.ws_url("/v1/ws/rider"));
    let mut r2 = Client::connect(&url, None).await.unwrap();
    let (id, t) = rider_welcome(r2.welcome().await);
    assert_eq!(id, rid);
    assert_eq!(t.map(|t| t.trip_id), Some(trip.trip_id.clone()));
    assert_eq!(r1.closed_with().await, Some(4001));

    // The new session gets the updates and can act on the trip.
    d.ok(json!({"type": "accept", "trip_id": trip.trip_id}))
        .await;
    assert_eq!(r2.trip_update().await.version, 2);
    let req = r2
        .send_req(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
        .await;
    let t = r2.trip_update().await;
    assert_eq!((t.state, t.version), (TripState::Cancelled, 3));
    assert_eq!(r2.next().await, ServerMessage::Ack { req });
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_driver_keeps_its_status_but_is_not_offered_trips() {
    let s = TestServer::start(&[]).await; // the default grace period, 30 s, covers the test
    let near = north_of(PICKUP, 100.0);
    let far = north_of(PICKUP, 1_200.0);
    let (_, atoken, a) = s
        .online_driver_token("Gone", "economy", near.0, near.1)
        .await;
    let (bid, mut b) = s.online_driver("Here", "economy", far.0, far.1).await;
    let (_, rtoken, mut r) = s.connected_rider("Riley").await;

    a.close().await;
    s.wait_sessions("driver", 1).await; // A's session is over and detached
    // Within the grace period A keeps its status (still shown as available)...
    assert_eq!(nearby_count(&s, &rtoken, PICKUP).await, 2);
    // ...but an app that is not connected is not offered trips: B, further away, is.
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(b.offer().await.trip_id, trip.trip_id);
    accepted(&mut b, &mut r, &trip.trip_id, &bid, 2).await;

    // A comes back within the grace period: still available, never offered anything.
    let mut a = Client::driver(&s, &atoken).await.unwrap();
    let (status, offer, t) = driver_welcome(a.welcome().await);
    assert_eq!((status, offer, t), (DriverStatus::Available, None, None));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_available_driver_goes_offline_after_the_grace_period() {
    let s = TestServer::start(&["--session-grace-ms", "300"]).await;
    let near = north_of(PICKUP, 100.0);
    let (_, atoken, a) = s
        .online_driver_token("Gone", "economy", near.0, near.1)
        .await;
    let (_, rtoken, _r) = s.connected_rider("Riley").await;
    assert_eq!(nearby_count(&s, &rtoken, PICKUP).await, 1);

    let dropped = Instant::now();
    a.close().await;
    eventually("the dropped driver to leave the map", || async {
        (nearby_count(&s, &rtoken, PICKUP).await == 0).then_some(())
    })
    .await;
    assert!(
        dropped.elapsed().as_millis() >= 300,
        "offline before the grace period ended: {:?}",
        dropped.elapsed()
    );

    let mut a = Client::driver(&s, &atoken).await.unwrap();
    let (status, offer, t) = driver_welcome(a.welcome().await);
    assert_eq!((status, offer, t), (DriverStatus::Offline, None, None));
    // It can simply go online again.
    a.ok(json!({"type": "go_online"})).await;
    assert_eq!(nearby_count(&s, &rtoken, PICKUP).await, 1);
    s.stop().await.unwrap();
}

/// Waits until a reference driver, dropped after `on_trip`'s session was detached, has
/// gone offline: the grace period of `on_trip` is then over too.
async fn outlast_the_grace_period(s: &TestServer, rtoken: &str, reference: Client, at: (f64, f64)) {
    s.wait_sessions("driver", 1).await;
    reference.close().await;
    s.wait_sessions("driver", 0).await;
    eventually("the reference driver to go offline", || async {
        (nearby_count(s, rtoken, at).await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_survives_the_drivers_grace_period() {
    let s = TestServer::start(&["--session-grace-ms", "300"]).await;
    let near = north_of(PICKUP, 100.0);
    let Ride {
        driver_id: did,
        driver_token: dtoken,
        d,
        rider_token: rtoken,
        mut r,
        trip,
        ..
    } = RidePlan::default()
        .driver_north(100.0)
        .to(&s, TripState::DriverAssigned)
        .await;
    // An available reference driver, far from the pickup (outside the nearby radius of it).
    let away = north_of(PICKUP, 20_000.0);
    let (_, reference) = s.online_driver("Ref", "economy", away.0, away.1).await;

    d.close().await;
    outlast_the_grace_period(&s, &rtoken, reference, away).await;

    // The rider heard nothing; the driver is still on the trip and finishes it.
    let m = r
        .reply_next(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": 1}))
        .await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
    let mut d = Client::driver(&s, &dtoken).await.unwrap();
    let (status, _, t) = driver_welcome(d.welcome().await);
    assert_eq!(status, DriverStatus::OnTrip);
    let t = t.expect("still on the trip");
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (TripState::DriverAssigned, 2, Some(did.as_str()))
    );
    for (cmd, state, v) in [
        ("arrived", TripState::DriverArrived, 3),
        ("start_trip", TripState::InProgress, 4),
        ("complete_trip", TripState::Completed, 5),
    ] {
        d.ok(json!({"type": cmd, "trip_id": trip.trip_id})).await;
        let t = r.trip_update().await;
        assert_eq!((t.state, t.version), (state, v));
    }
    // Connected again, the driver stays available after the trip.
    let (st, v) = s
        .get(
            &format!("/v1/drivers/nearby?lat={}&lng={}", near.0, near.1),
            Some(&rtoken),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["drivers"].as_array().unwrap().len(), 1, "{v}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_freed_after_its_grace_period_goes_offline() {
    let s = TestServer::start(&["--session-grace-ms", "300"]).await;
    let Ride {
        driver_token: dtoken,
        d,
        rider_token: rtoken,
        mut r,
        trip,
        ..
    } = RidePlan::default()
        .driver_north(100.0)
        .to(&s, TripState::DriverAssigned)
        .await;
    let away = north_of(PICKUP, 20_000.0);
    let (_, reference) = s.online_driver("Ref", "economy", away.0, away.1).await;

    d.close().await;
    outlast_the_grace_period(&s, &rtoken, reference, away).await;
    // The rider cancels: the driver, still away, is freed and then goes offline.
    r.ok(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
        .await;
    let mut d = Client::driver(&s, &dtoken).await.unwrap();
    let (status, offer, t) = driver_welcome(d.welcome().await);
    assert_eq!((status, offer, t), (DriverStatus::Offline, None, None));
    s.stop().await.unwrap();
}

/// The server pings every `--ws-ping-interval-ms`: a client that reads (and so answers
/// pings) stays connected while it says nothing; one that stopped answering is
/// disconnected after three intervals, counted as `ws_idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_client_stays_and_a_silent_one_is_dropped_after_three_pings() {
    let s = TestServer::start(&["--ws-ping-interval-ms", "100"]).await;
    let (_, _, mut silent) = s.connected_rider("Silent").await;
    let (_, _, mut quiet) = s.connected_rider("Quiet").await;
    // `quiet` reads for 1.5 s (10+ intervals) and answers every ping; `silent` reads
    // nothing meanwhile, so its pings go unanswered.
    let stayed =
        tokio::time::timeout(std::time::Duration::from_millis(1_500), quiet.closed_with()).await;
    assert!(
        stayed.is_err(),
        "a reading client was disconnected: {stayed:?}"
    );
    s.wait_sessions("rider", 1).await;
    // Its socket ends: a 1001 close frame, or a reset when its queued pongs hit the
    // closed connection first.
    let end = silent.closed_with().await;
    assert!(matches!(end, Some(1001) | None), "{end:?}");
    assert!(
        s.metric("dispatch_bound_hits_total{bound=\"ws_idle_timeout\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    // The quiet one is still served.
    quiet
        .ok(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": 1}))
        .await;
    s.stop().await.unwrap();
}
