//! Dispatch over real sockets: offers go best pickup ETA first, one driver at a time, and
//! move on at a decline, a timeout or the dispatch deadline; with nobody left the trip
//! ends `no_driver_found`.

use std::time::Instant;

use dispatch_tests::{TestServer, accepted, north_of, trip_of};
use dispatch_transport::wire::{ServerMessage, TripState};
use serde_json::json;

const PICKUP: (f64, f64) = (45.5030, -73.5690);
const DROPOFF: (f64, f64) = (45.5200, -73.5800);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decline_moves_the_offer_to_the_next_best_driver() {
    let s = TestServer::start(&[]).await;
    // The far driver comes online first, so arrival order cannot explain who is asked first.
    let far = north_of(PICKUP, 1_500.0);
    let near = north_of(PICKUP, 150.0);
    let (far_id, mut b) = s.online_driver("Far", "economy", far.0, far.1).await;
    let (near_id, mut a) = s.online_driver("Near", "economy", near.0, near.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;

    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let offer_a = a.offer().await;
    assert_eq!(offer_a.trip_id, trip.trip_id);
    assert!(
        (100..=200).contains(&offer_a.pickup_distance_m),
        "{offer_a:?}"
    );

    // A declines: acked, and no `offer_expired` (that is for timeouts and withdrawals).
    let reply = a
        .reply_next(json!({"type": "decline", "trip_id": trip.trip_id}))
        .await;
    assert!(matches!(reply, ServerMessage::Ack { .. }), "{reply:?}");

    let offer_b = b.offer().await;
    assert_eq!(offer_b.trip_id, trip.trip_id);
    assert!(offer_b.pickup_distance_m > offer_a.pickup_distance_m);
    assert!(offer_b.pickup_eta_s > offer_a.pickup_eta_s, "{offer_b:?}");
    assert!(b.pending().is_empty(), "{:?}", b.pending());

    // B accepts: its trip_update comes before the ack.
    let req = b
        .send_req(json!({"type": "accept", "trip_id": trip.trip_id}))
        .await;
    let t = trip_of(b.next().await);
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (TripState::DriverAssigned, 2, Some(far_id.as_str()))
    );
    assert_eq!(b.next().await, ServerMessage::Ack { req });

    // The rider's next update is the assignment to B, version 2: the decline changed no state.
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (TripState::DriverAssigned, 2, Some(far_id.as_str()))
    );
    assert_eq!(t.driver.as_ref().unwrap().name, "Far");
    assert_ne!(t.driver_id.as_deref(), Some(near_id.as_str()));

    // A heard nothing more about the trip, and is free.
    let reply = a.reply_next(json!({"type": "go_offline"})).await;
    assert!(matches!(reply, ServerMessage::Ack { .. }), "{reply:?}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_offer_expires_and_moves_to_the_next_driver() {
    let s = TestServer::start(&["--offer-timeout-ms", "300"]).await;
    let near = north_of(PICKUP, 100.0);
    let far = north_of(PICKUP, 900.0);
    let (_, mut a) = s.online_driver("Near", "economy", near.0, near.1).await;
    let (far_id, mut b) = s.online_driver("Far", "economy", far.0, far.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;

    let asked = Instant::now();
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let offer = a.offer().await;
    assert_eq!(offer.trip_id, trip.trip_id);
    assert!(
        offer.expires_in_ms > 0 && offer.expires_in_ms <= 300,
        "{offer:?}"
    );

    // A says nothing: after the offer timeout it is told the offer expired.
    assert_eq!(a.offer_expired().await, trip.trip_id);
    assert!(
        asked.elapsed().as_millis() >= 300,
        "offer_expired before the offer timeout: {:?}",
        asked.elapsed()
    );
    // Too late now.
    assert_eq!(
        a.err(json!({"type": "accept", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );

    let offer = b.offer().await;
    assert_eq!(offer.trip_id, trip.trip_id);
    accepted(&mut b, &mut r, &trip.trip_id, &far_id, 2).await;
    s.stop().await.unwrap();
}

/// PROTOCOL.md: "with no candidates the trip ends `no_driver_found`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_ignored_offer_ends_the_trip_no_driver_found() {
    // The deadline is beyond the harness's WAIT (10 s): only "no candidate left" can end it.
    let s = TestServer::start(&[
        "--offer-timeout-ms",
        "300",
        "--dispatch-deadline-ms",
        "15000",
    ])
    .await;
    let near = north_of(PICKUP, 100.0);
    let (_, mut a) = s.online_driver("Only", "economy", near.0, near.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(a.offer().await.trip_id, trip.trip_id);
    assert_eq!(a.offer_expired().await, trip.trip_id);
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.driver_id),
        (TripState::NoDriverFound, 2, None)
    );
    s.stop().await.unwrap();
}

/// PROTOCOL.md: "with no candidates the trip ends `no_driver_found`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_no_driver_online_ends_no_driver_found() {
    // The deadline is beyond the harness's WAIT (10 s): only "no candidates" can end it.
    let s = TestServer::start(&["--dispatch-deadline-ms", "15000"]).await;
    let (_, rtoken, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let t = r.trip_update().await;
    assert_eq!(
        (t.trip_id.as_str(), t.state, t.version, t.driver_id),
        (trip.trip_id.as_str(), TripState::NoDriverFound, 2, None)
    );
    let (st, body) = s
        .get(&format!("/v1/trips/{}", trip.trip_id), Some(&rtoken))
        .await;
    assert_eq!(
        (st, body["state"].as_str(), body["version"].as_u64()),
        (200, Some("no_driver_found"), Some(2))
    );
    // The rider is free to ask again (and that trip ends the same way).
    let again = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let t = r.trip_update().await;
    assert_eq!(
        (t.trip_id, t.state, t.version),
        (again.trip_id, TripState::NoDriverFound, 2)
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatch_deadline_withdraws_an_unanswered_offer() {
    let s = TestServer::start(&[
        "--offer-timeout-ms",
        "60000",
        "--dispatch-deadline-ms",
        "700",
        // In batch mode (the default) a window well inside the 700 ms deadline; greedy
        // ignores it.
        "--match-window-ms",
        "200",
    ])
    .await;
    let near = north_of(PICKUP, 100.0);
    let (_, mut d) = s.online_driver("Slow", "economy", near.0, near.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let asked = Instant::now();
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let offer = d.offer().await;
    assert_eq!(offer.trip_id, trip.trip_id);
    assert!(offer.expires_in_ms > 700, "{offer:?}");

    // Nobody answers: at the deadline the trip ends and the offer is withdrawn.
    let t = r.trip_update().await;
    assert!(
        asked.elapsed().as_millis() >= 700,
        "ended before the deadline: {:?}",
        asked.elapsed()
    );
    assert_eq!(
        (t.trip_id.as_str(), t.state, t.version),
        (trip.trip_id.as_str(), TripState::NoDriverFound, 2)
    );
    assert_eq!(d.offer_expired().await, trip.trip_id);
    // The offer is gone: accepting now is a conflict, and the driver is free.
    assert_eq!(
        d.err(json!({"type": "accept", "trip_id": trip.trip_id}))
            .await,
        "conflict"
    );
    d.ok(json!({"type": "go_offline"})).await;
    assert!(d.pending().is_empty(), "{:?}", d.pending());
    s.stop().await.unwrap();
}

/// A driver of another product is never offered the trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_go_only_to_drivers_of_the_requested_product() {
    let s = TestServer::start(&[]).await;
    let near = north_of(PICKUP, 50.0);
    let far = north_of(PICKUP, 1_000.0);
    let (_, mut xl) = s.online_driver("Xl", "xl", near.0, near.1).await;
    let (eco_id, mut eco) = s.online_driver("Eco", "economy", far.0, far.1).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(eco.offer().await.trip_id, trip.trip_id);
    eco.ok(json!({"type": "accept", "trip_id": trip.trip_id}))
        .await;
    assert_eq!(
        r.trip_in(TripState::DriverAssigned)
            .await
            .driver_id
            .as_deref(),
        Some(eco_id.as_str())
    );
    // The xl driver heard nothing; and it was never offered this trip.
    let reply = xl.reply_next(json!({"type": "go_online"})).await;
    assert!(matches!(reply, ServerMessage::Ack { .. }), "{reply:?}");
    assert_eq!(
        xl.err(json!({"type": "accept", "trip_id": trip.trip_id}))
            .await,
        "forbidden"
    );
    s.stop().await.unwrap();
}
