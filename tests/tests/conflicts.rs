//! State rules over the wire: one active trip per rider, no going offline while busy, and
//! accepting only the offer one holds.

use dispatch_tests::{DROPOFF, PICKUP, TestServer, north_of, ride_to};
use dispatch_transport::wire::{ServerMessage, TripState};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_active_request_is_a_conflict() {
    let s = TestServer::start(&[]).await;
    let mut ride = ride_to(&s, TripState::Dispatching).await;
    let trip = ride.trip.clone();

    let direct = json!({"type": "request_ride", "pickup": {"lat": PICKUP.0, "lng": PICKUP.1}, "dropoff": {"lat": DROPOFF.0, "lng": DROPOFF.1}, "product": "economy"});
    assert_eq!(ride.r.err(direct.clone()).await, "conflict");
    let q = s.quote(&ride.rider_token, PICKUP, DROPOFF, "economy").await;
    assert_eq!(
        ride.r
            .err(json!({"type": "request_ride", "quote_id": q["quote_id"]}))
            .await,
        "conflict"
    );

    // The first trip is untouched (it is still at version 1 when cancelled to version 2),
    // and the refused quote is still good afterwards.
    ride.r
        .ok(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
        .await;
    let t = ride.r.trip_in(TripState::Cancelled).await;
    assert_eq!((t.trip_id.as_str(), t.version), (trip.trip_id.as_str(), 2));
    assert_eq!(ride.d.offer_expired().await, trip.trip_id);
    let m = ride
        .r
        .request(json!({"type": "request_ride", "quote_id": q["quote_id"]}))
        .await;
    let ServerMessage::TripUpdate {
        req: Some(_),
        trip: second,
    } = m
    else {
        panic!("{m:?}")
    };
    assert_eq!((second.state, second.version), (TripState::Dispatching, 1));
    assert_ne!(second.trip_id, trip.trip_id);
    assert_eq!(Some(second.quote.fare_cents), q["fare_cents"].as_i64());
    // The new trip reaches the driver (the failed requests left it free).
    assert_eq!(ride.d.offer().await.trip_id, second.trip_id);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_offline_while_offered_or_on_a_trip_is_a_conflict() {
    let s = TestServer::start(&[]).await;
    let mut ride = ride_to(&s, TripState::Dispatching).await;
    let offline = json!({"type": "go_offline"});

    assert_eq!(ride.d.err(offline.clone()).await, "conflict");
    // The refused go_offline changed nothing: the offer can still be taken.
    assert_eq!(ride.step("accept").await.version, 2);
    assert_eq!(ride.d.err(offline.clone()).await, "conflict");
    for (cmd, state, v) in [
        ("arrived", TripState::DriverArrived, 3),
        ("start_trip", TripState::InProgress, 4),
    ] {
        let t = ride.step(cmd).await;
        assert_eq!((t.state, t.version), (state, v));
        assert_eq!(ride.d.err(offline.clone()).await, "conflict");
    }
    let t = ride.step("complete_trip").await;
    assert_eq!((t.state, t.version), (TripState::Completed, 5));
    // Free again: now it may.
    ride.d.ok(offline).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_an_offer_one_does_not_hold_fails() {
    let s = TestServer::start(&[]).await;
    let (a_at, b_at, c_at) = (
        north_of(PICKUP, 100.0),
        north_of(PICKUP, 800.0),
        north_of(PICKUP, 2_000.0),
    );
    let (_, mut a) = s.online_driver("A", "economy", a_at.0, a_at.1).await;
    let (bid, mut b) = s.online_driver("B", "economy", b_at.0, b_at.1).await;
    let (_, mut c) = s.online_driver("C", "economy", c_at.0, c_at.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(a.offer().await.trip_id, trip.trip_id);

    let accept = json!({"type": "accept", "trip_id": trip.trip_id});
    // B was never offered the trip.
    assert_eq!(b.err(accept.clone()).await, "forbidden");
    // No such trip at all.
    assert_eq!(
        a.err(json!({"type": "accept", "trip_id": "trp_nope"}))
            .await,
        "not_found"
    );
    // A passes; the offer moves on to B; A changing its mind is too late.
    a.ok(json!({"type": "decline", "trip_id": trip.trip_id}))
        .await;
    assert_eq!(b.offer().await.trip_id, trip.trip_id);
    assert_eq!(a.err(accept.clone()).await, "conflict");
    b.ok(accept.clone()).await;
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (TripState::DriverAssigned, 2, Some(bid.as_str()))
    );
    // After the assignment: C (never offered) is forbidden, A is still too late, and B's
    // second accept is a conflict; none of it changes the trip.
    assert_eq!(c.err(accept.clone()).await, "forbidden");
    assert_eq!(a.err(accept.clone()).await, "conflict");
    assert_eq!(b.err(accept.clone()).await, "conflict");
    assert_eq!(
        a.err(json!({"type": "decline", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );
    // The trip's own steps: only its driver, only in order, only on a known trip.
    for cmd in ["arrived", "start_trip", "complete_trip", "cancel_trip"] {
        assert_eq!(
            a.err(json!({"type": cmd, "trip_id": trip.trip_id})).await,
            "forbidden",
            "{cmd} by another driver"
        );
        assert_eq!(
            b.err(json!({"type": cmd, "trip_id": "trp_nope"})).await,
            "not_found",
            "{cmd} of an unknown trip"
        );
    }
    for cmd in ["start_trip", "complete_trip"] {
        assert_eq!(
            b.err(json!({"type": cmd, "trip_id": trip.trip_id})).await,
            "conflict",
            "{cmd} before arriving"
        );
    }
    b.ok(json!({"type": "arrived", "trip_id": trip.trip_id}))
        .await;
    let t = r.trip_update().await;
    assert_eq!((t.state, t.version), (TripState::DriverArrived, 3));
    assert_eq!(
        b.err(json!({"type": "arrived", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );
    s.stop().await.unwrap();
}
