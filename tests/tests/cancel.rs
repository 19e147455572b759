//! Cancelling: a rider before `in_progress`, a driver before pickup (the trip goes back to
//! `dispatching` for someone else), and the errors around both.

use dispatch_tests::{
    Client, DROPOFF, PICKUP, Ride, TestServer, accepted, north_of, ride_to, trip_of,
};
use dispatch_transport::wire::{CancelledBy, ServerMessage, TripState};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_cancels_while_dispatching_and_the_offer_is_withdrawn() {
    let s = TestServer::start(&[]).await;
    let Ride {
        mut d,
        rider_token: rtoken,
        mut r,
        trip,
        ..
    } = ride_to(&s, TripState::Dispatching).await;

    // The update the cancel causes comes first, then its ack.
    let req = r
        .send_req(json!({"type": "cancel_ride", "trip_id": trip.trip_id, "reason": "found a bus"}))
        .await;
    let t = trip_of(r.next().await);
    assert_eq!(
        (
            t.state,
            t.version,
            t.cancelled_by,
            t.cancel_reason.as_deref()
        ),
        (
            TripState::Cancelled,
            2,
            Some(CancelledBy::Rider),
            Some("found a bus")
        )
    );
    assert_eq!(r.next().await, ServerMessage::Ack { req });

    // The offered driver is told the offer is gone (no trip_update: it was never assigned);
    // taking it now is a conflict, and the driver is free.
    assert_eq!(d.offer_expired().await, trip.trip_id);
    let m = d
        .reply_next(json!({"type": "accept", "trip_id": trip.trip_id}))
        .await;
    assert!(
        matches!(&m, ServerMessage::Error { code, .. } if code == "conflict"),
        "{m:?}"
    );
    let m = d.reply_next(json!({"type": "go_offline"})).await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");

    let (st, v) = s
        .get(&format!("/v1/trips/{}", trip.trip_id), Some(&rtoken))
        .await;
    assert_eq!(
        (st, v["state"].as_str(), v["cancelled_by"].as_str()),
        (200, Some("cancelled"), Some("rider"))
    );
    // Cancelling again: the trip has ended.
    assert_eq!(
        r.err(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );
    // A new session starts with no active trip.
    r.close().await;
    let mut r = Client::rider(&s, &rtoken).await.unwrap();
    match r.welcome().await {
        ServerMessage::Welcome { trip, .. } => assert_eq!(trip, None),
        _ => unreachable!(),
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_cancels_after_assignment_and_the_driver_is_freed() {
    let s = TestServer::start(&[]).await;
    let Ride {
        driver_id: did,
        mut d,
        mut r,
        trip,
        ..
    } = ride_to(&s, TripState::DriverAssigned).await;

    // Without `req`: the update, and no ack.
    r.send(json!({"type": "cancel_ride", "trip_id": trip.trip_id, "reason": "too slow"}))
        .await;
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.cancelled_by),
        (TripState::Cancelled, 3, Some(CancelledBy::Rider))
    );
    let m = r
        .reply_next(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": 1}))
        .await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");

    // The driver gets the last update of the trip, and is free.
    let t = d.trip_update().await;
    assert_eq!(
        (
            t.state,
            t.version,
            t.cancelled_by,
            t.cancel_reason.as_deref(),
            t.driver_id.as_deref()
        ),
        (
            TripState::Cancelled,
            3,
            Some(CancelledBy::Rider),
            Some("too slow"),
            Some(did.as_str())
        )
    );
    let m = d.reply_next(json!({"type": "go_offline"})).await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_can_still_cancel_once_the_driver_has_arrived() {
    let s = TestServer::start(&[]).await;
    let Ride {
        mut d, mut r, trip, ..
    } = ride_to(&s, TripState::DriverArrived).await;
    // A long reason is kept to its first 500 characters.
    r.ok(json!({"type": "cancel_ride", "trip_id": trip.trip_id, "reason": "é".repeat(600)}))
        .await;
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.cancelled_by),
        (TripState::Cancelled, 4, Some(CancelledBy::Rider))
    );
    assert_eq!(t.cancel_reason, Some("é".repeat(500)));
    assert_eq!(d.trip_in(TripState::Cancelled).await.version, 4);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_cannot_cancel_once_the_trip_is_in_progress() {
    let s = TestServer::start(&[]).await;
    let mut ride = ride_to(&s, TripState::Dispatching).await;
    let trip = ride.trip.clone();
    for (cmd, state, v) in [
        ("accept", TripState::DriverAssigned, 2),
        ("arrived", TripState::DriverArrived, 3),
        ("start_trip", TripState::InProgress, 4),
    ] {
        let t = ride.step(cmd).await;
        assert_eq!((t.state, t.version), (state, v));
        // pickup_eta_s: an estimate on the way, 0 on arrival, null once riding.
        match state {
            TripState::DriverAssigned => assert!(t.pickup_eta_s.is_some(), "{t:?}"),
            TripState::DriverArrived => assert_eq!(t.pickup_eta_s, Some(0)),
            _ => assert_eq!(t.pickup_eta_s, None),
        }
    }

    assert_eq!(
        ride.r
            .err(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );
    // Nor can the driver; nothing changed, and the ride completes at version 5.
    assert_eq!(
        ride.d
            .err(json!({"type": "cancel_trip", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );
    let t = ride.step("complete_trip").await;
    assert_eq!((t.state, t.version), (TripState::Completed, 5));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_someone_elses_or_an_unknown_trip_fails() {
    let s = TestServer::start(&[]).await;
    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (_, _, mut owner) = s.connected_rider("Owner").await;
    let (_, _, mut other) = s.connected_rider("Other").await;
    let trip = owner.request_ride(PICKUP, DROPOFF, "economy").await;
    d.offer().await; // the trip waits on this offer

    assert_eq!(
        other
            .err(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
            .await,
        "forbidden"
    );
    assert_eq!(
        other
            .err(json!({"type": "cancel_ride", "trip_id": "trp_does_not_exist"}))
            .await,
        "not_found"
    );
    // A driver who is not on the trip cannot cancel it either.
    assert_eq!(
        d.err(json!({"type": "cancel_trip", "trip_id": trip.trip_id}))
            .await,
        "forbidden"
    );
    // Nothing happened to the trip: the owner cancels it at version 2.
    owner
        .ok(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
        .await;
    assert_eq!(owner.trip_in(TripState::Cancelled).await.version, 2);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_cancel_sends_the_trip_back_to_dispatching_for_another_driver() {
    let s = TestServer::start(&[]).await;
    let near = north_of(PICKUP, 100.0);
    let far = north_of(PICKUP, 1_500.0);
    let (aid, atoken, mut a) = s
        .online_driver_token("Quitter", "economy", near.0, near.1)
        .await;
    let (bid, mut b) = s.online_driver("Keeper", "economy", far.0, far.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(a.offer().await.trip_id, trip.trip_id);
    accepted(&mut a, &mut r, &trip.trip_id, &aid, 2).await;
    assert_eq!(a.trip_update().await.version, 2);

    // A cancels before pickup: its last trip_update, then the ack.
    let req = a
        .send_req(json!({"type": "cancel_trip", "trip_id": trip.trip_id, "reason": "flat tyre"}))
        .await;
    let t = trip_of(a.next().await);
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (TripState::Dispatching, 3, None)
    );
    assert_eq!(a.next().await, ServerMessage::Ack { req });

    // The rider sees the trip dispatching again, without a driver.
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (TripState::Dispatching, 3, None)
    );
    assert_eq!((t.driver, t.pickup_eta_s), (None, None));
    // A driver's cancel is not a cancellation of the trip.
    assert_eq!((t.cancelled_by, t.cancel_reason), (None, None));

    // B, further away, gets the offer: A, nearer and available again, is not asked again.
    assert_eq!(b.offer().await.trip_id, trip.trip_id);
    accepted(&mut b, &mut r, &trip.trip_id, &bid, 4).await;
    let m = a.reply_next(json!({"type": "go_online"})).await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
    // Once off the trip, A can no longer read it or act on it.
    assert_eq!(
        a.err(json!({"type": "arrived", "trip_id": trip.trip_id}))
            .await,
        "forbidden"
    );
    let (st, v) = s
        .get(&format!("/v1/trips/{}", trip.trip_id), Some(&atoken))
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (403, Some("forbidden")));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_sent_back_by_a_driver_gets_a_fresh_dispatch_deadline() {
    let s = TestServer::start(&[
        "--dispatch-deadline-ms",
        "1000",
        "--offer-timeout-ms",
        "60000",
        // In batch mode (the default) a window well inside the 1 s deadline; greedy
        // ignores it.
        "--match-window-ms",
        "200",
    ])
    .await;
    let near = north_of(PICKUP, 100.0);
    let far = north_of(PICKUP, 1_500.0);
    let (_, mut a) = s.online_driver("Quitter", "economy", near.0, near.1).await;
    let (_, mut b) = s.online_driver("Keeper", "economy", far.0, far.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    a.offer().await;
    a.ok(json!({"type": "accept", "trip_id": trip.trip_id}))
        .await;
    assert_eq!(r.trip_update().await.version, 2);

    // Outlast the first deadline (the flag's 1000 ms, at least), then send the trip back:
    // it dispatches again, to B, instead of ending at once...
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let sent_back = std::time::Instant::now();
    a.ok(json!({"type": "cancel_trip", "trip_id": trip.trip_id}))
        .await;
    let t = r.trip_update().await;
    assert_eq!((t.state, t.version), (TripState::Dispatching, 3));
    assert_eq!(b.offer().await.trip_id, trip.trip_id);
    // ...until its new deadline, a full 1000 ms later (B's offer would last a minute).
    let t = r.trip_update().await;
    assert_eq!((t.state, t.version), (TripState::NoDriverFound, 4));
    assert!(
        sent_back.elapsed().as_millis() >= 1000,
        "the new deadline came early: {:?}",
        sent_back.elapsed()
    );
    assert_eq!(b.offer_expired().await, trip.trip_id);
    s.stop().await.unwrap();
}
