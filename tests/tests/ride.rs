//! A whole ride over real WebSockets, with every message both apps see.

use dispatch_tests::{Client, TestServer};
use dispatch_transport::wire::{ServerMessage, TripState};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_ride_from_quote_to_receipt() {
    let s = TestServer::start(&[]).await;
    let (driver_id, mut d) = s.online_driver("Dana", "economy", 45.5017, -73.5673).await;
    let (rider_id, rtoken) = s.rider("Riley").await;

    let (st, q) = s
        .post(
            "/v1/quotes",
            Some(&rtoken),
            json!({"pickup": {"lat": 45.5030, "lng": -73.5690}, "dropoff": {"lat": 45.5200, "lng": -73.5800}, "product": "economy"}),
        )
        .await;
    assert_eq!(st, 201, "{q}");
    let fare = q["fare_cents"].as_i64().unwrap();
    assert!(fare >= 700, "{q}");

    let mut r = Client::rider(&s, &rtoken).await.unwrap();
    r.welcome().await;
    let reply = r
        .request(json!({"type": "request_ride", "quote_id": q["quote_id"]}))
        .await;
    let ServerMessage::TripUpdate { req: Some(_), trip } = reply else {
        panic!("request_ride reply: {reply:?}")
    };
    assert_eq!(trip.state, TripState::Dispatching);
    assert_eq!(trip.version, 1);
    assert_eq!(trip.rider_id, rider_id);
    assert_eq!(trip.quote.fare_cents, fare);
    let trip_id = trip.trip_id.clone();

    let offer = d.offer().await;
    assert_eq!(offer.trip_id, trip_id);
    assert_eq!(offer.fare_cents, fare);
    assert!(offer.expires_in_ms > 0 && offer.expires_in_ms <= 15_000);
    assert!(offer.pickup_distance_m < 1_000, "{offer:?}");

    d.ok(json!({"type": "accept", "trip_id": trip_id})).await;
    let t = r.trip_in(TripState::DriverAssigned).await;
    assert_eq!(t.version, 2);
    assert_eq!(t.driver_id.as_deref(), Some(driver_id.as_str()));
    assert_eq!(t.driver.as_ref().unwrap().name, "Dana");
    assert!(t.pickup_eta_s.is_some());
    let t = d.trip_in(TripState::DriverAssigned).await;
    assert_eq!(t.version, 2);

    // The rider follows the driver.
    d.send(json!({"type": "location", "lat": 45.5025, "lng": -73.5680, "heading": 90.0, "ts": 1}))
        .await;
    let loc = r
        .next_where("driver_location", |m| {
            matches!(m, ServerMessage::DriverLocation { .. })
        })
        .await;
    let ServerMessage::DriverLocation {
        trip_id: lt, lat, ..
    } = loc
    else {
        unreachable!()
    };
    assert_eq!((lt.as_str(), lat), (trip_id.as_str(), 45.5025));

    d.ok(json!({"type": "arrived", "trip_id": trip_id})).await;
    assert_eq!(r.trip_in(TripState::DriverArrived).await.version, 3);
    d.ok(json!({"type": "start_trip", "trip_id": trip_id}))
        .await;
    assert_eq!(r.trip_in(TripState::InProgress).await.version, 4);
    d.ok(json!({"type": "complete_trip", "trip_id": trip_id}))
        .await;
    let done = r.trip_in(TripState::Completed).await;
    assert_eq!((done.version, done.fare_cents), (5, Some(fare)));
    let receipt = r
        .next_where("receipt", |m| matches!(m, ServerMessage::Receipt { .. }))
        .await;
    let ServerMessage::Receipt {
        fare_cents,
        currency,
        ..
    } = receipt
    else {
        unreachable!()
    };
    assert_eq!((fare_cents, currency.as_str()), (fare, "USD"));
    let dt = d.trip_in(TripState::Completed).await;
    assert_eq!(dt.fare_cents, Some(fare));

    // Both can read the finished trip; the rider may ride again.
    let (st, body) = s.get(&format!("/v1/trips/{trip_id}"), Some(&rtoken)).await;
    assert_eq!((st, body["state"].as_str()), (200, Some("completed")));
    let again = r
        .request(json!({"type": "request_ride", "pickup": {"lat": 45.5, "lng": -73.56}, "dropoff": {"lat": 45.51, "lng": -73.57}, "product": "economy"}))
        .await;
    assert!(
        matches!(again, ServerMessage::TripUpdate { .. }),
        "{again:?}"
    );
    s.stop().await.unwrap();
}
