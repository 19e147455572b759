//! Sessions: reconnecting resumes from `welcome`, a second session takes over (4001), and a
//! dropped driver keeps its status for the grace period only.

use std::time::Instant;

use dispatch_tests::{
    Client, DROPOFF, PICKUP, Ride, RidePlan, TestServer, accepted, eventually, north_of, ride_to,
};
use dispatch_transport::wire::{DriverStatus, Offer, ServerMessage, Trip, TripState};
use serde_json::json;

/// A driver's `welcome`: (status, offer, trip).
fn driver_welcome(m: ServerMessage) -> (DriverStatus, Option<Offer>, Option<Trip>) {
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

/// The driver's app comes back with `token`: the new session, and its `welcome`'s
/// (status, offer, trip).
async fn driver_back(
    s: &TestServer,
    token: &str,
) -> (Client, (DriverStatus, Option<Offer>, Option<Trip>)) {
    let mut d = Client::driver(s, token).await.unwrap();
    let welcome = driver_welcome(d.welcome().await);
    (d, welcome)
}

/// The driver's app comes back with `token` to a `welcome` with `status`, and no offer
/// and no trip.
async fn driver_back_to(s: &TestServer, token: &str, status: DriverStatus) {
    let (_, welcome) = driver_back(s, token).await;
    assert_eq!(welcome, (status, None, None));
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
    let (mut d, (status, offer, t)) = driver_back(&s, &dtoken).await;
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
    let mut ride = ride_to(&s, TripState::Dispatching).await;

    ride.r.close().await;
    let mut r = Client::rider(&s, &ride.rider_token).await.unwrap();
    let (id, t) = rider_welcome(r.welcome().await);
    assert_eq!(id, ride.rider_id);
    let t = t.expect("welcome carries the active trip");
    assert_eq!(
        (t.trip_id.as_str(), t.state, t.version),
        (ride.trip.trip_id.as_str(), TripState::Dispatching, 1)
    );

    // Updates now reach the new session.
    accepted(&mut ride.d, &mut r, &ride.trip.trip_id, &ride.driver_id, 2).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offered_driver_reconnects_and_sees_the_offer_in_welcome() {
    let s = TestServer::start(&["--offer-timeout-ms", "30000"]).await;
    let mut ride = ride_to(&s, TripState::Dispatching).await;

    ride.d.close().await;
    let (mut d, (status, offer, t)) = driver_back(&s, &ride.driver_token).await;
    assert_eq!((status, t), (DriverStatus::Offered, None));
    let offer = offer.expect("welcome carries the open offer");
    let first = &ride.offer;
    assert_eq!(offer.trip_id, ride.trip.trip_id);
    assert_eq!(offer.fare_cents, first.fare_cents);
    assert!(
        offer.expires_in_ms > 0 && offer.expires_in_ms <= first.expires_in_ms,
        "{offer:?} vs {first:?}"
    );

    accepted(&mut d, &mut ride.r, &ride.trip.trip_id, &ride.driver_id, 2).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_driver_session_takes_over_and_the_first_is_closed_with_4001() {
    let s = TestServer::start(&[]).await;
    let plan = RidePlan::default();
    let (did, dtoken, mut d1) = plan.online_driver(&s).await;

    let (mut d2, (status, offer, trip)) = driver_back(&s, &dtoken).await;
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
    let mut ride = ride_to(&s, TripState::Dispatching).await;

    // The second session is a browser's: the token comes as `?token=`.
    let url = format!("{}?token={}", s.ws_url("/v1/ws/rider"), ride.rider_token);
    let mut r2 = Client::connect(&url, None).await.unwrap();
    let (id, t) = rider_welcome(r2.welcome().await);
    assert_eq!(id, ride.rider_id);
    assert_eq!(t.map(|t| t.trip_id), Some(ride.trip.trip_id.clone()));
    assert_eq!(ride.r.closed_with().await, Some(4001));

    // The new session gets the updates and can act on the trip.
    ride.d
        .ok(json!({"type": "accept", "trip_id": ride.trip.trip_id}))
        .await;
    assert_eq!(r2.trip_update().await.version, 2);
    let req = r2
        .send_req(json!({"type": "cancel_ride", "trip_id": ride.trip.trip_id}))
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
    driver_back_to(&s, &atoken, DriverStatus::Available).await;
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

    let (mut a, (status, offer, t)) = driver_back(&s, &atoken).await;
    assert_eq!((status, offer, t), (DriverStatus::Offline, None, None));
    // It can simply go online again.
    a.ok(json!({"type": "go_online"})).await;
    assert_eq!(nearby_count(&s, &rtoken, PICKUP).await, 1);
    s.stop().await.unwrap();
}

/// A ride assigned to a driver 100 m north of the pickup, whose app then drops; returns
/// once the grace period of that drop is over: (driver_id, driver_token, rider_token,
/// the rider's session, the trip).
///
/// The grace period is seen to end by a reference driver, available far from the pickup
/// (outside the nearby radius of it) and dropped after the first's session was detached:
/// once the reference has gone offline, the first's grace period is over too.
async fn assigned_then_dropped_past_the_grace_period(
    s: &TestServer,
) -> (String, String, String, Client, Trip) {
    let Ride {
        driver_id,
        driver_token,
        d,
        rider_token,
        r,
        trip,
        ..
    } = RidePlan::default()
        .driver_north(100.0)
        .to(s, TripState::DriverAssigned)
        .await;
    let away = north_of(PICKUP, 20_000.0);
    let (_, reference) = s.online_driver("Ref", "economy", away.0, away.1).await;

    d.close().await;
    s.wait_sessions("driver", 1).await;
    reference.close().await;
    s.wait_sessions("driver", 0).await;
    eventually("the reference driver to go offline", || async {
        (nearby_count(s, &rider_token, away).await == 0).then_some(())
    })
    .await;
    (driver_id, driver_token, rider_token, r, trip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_survives_the_drivers_grace_period() {
    let s = TestServer::start(&["--session-grace-ms", "300"]).await;
    let (did, dtoken, rtoken, mut r, trip) = assigned_then_dropped_past_the_grace_period(&s).await;

    // The rider heard nothing; the driver is still on the trip and finishes it.
    let m = r
        .reply_next(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": 1}))
        .await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
    let (mut d, (status, _, t)) = driver_back(&s, &dtoken).await;
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
    let near = north_of(PICKUP, 100.0);
    assert_eq!(nearby_count(&s, &rtoken, near).await, 1);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_freed_after_its_grace_period_goes_offline() {
    let s = TestServer::start(&["--session-grace-ms", "300"]).await;
    let (_, dtoken, _, mut r, trip) = assigned_then_dropped_past_the_grace_period(&s).await;
    // The rider cancels: the driver, still away, is freed and then goes offline.
    r.ok(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
        .await;
    driver_back_to(&s, &dtoken, DriverStatus::Offline).await;
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
