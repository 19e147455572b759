//! A clean restart (SIGTERM, then a start on the same data) loses nothing: every live
//! trip to the byte, offers with a fresh timeout, tokens and quotes.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch_tests::diagram::happy_steps;
use dispatch_tests::{RidePlan, point, trip_of};
use dispatch_transport::wire::{DriverStatus, Offer, ServerMessage, TripState};
use serde_json::json;

use crate::{CENTER, from_center};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_keeps_every_live_trip_offer_token_and_quote() {
    const OFFER_MS: u64 = 30_000;
    let tag = "[clean restart]";
    let flags = [
        "--offer-timeout-ms",
        "30000",
        "--shutdown-timeout-ms",
        "5000",
    ];
    let server = crate::start("clean-restart", &flags).await;
    let pickup = CENTER;
    let dropoff = (CENTER.0 + 0.02, CENTER.1 + 0.02);

    // Four rides, one left in each non-final state. Each driver goes online just before
    // its ride, while the others are busy, so it is the only candidate.
    let states = [
        TripState::InProgress,
        TripState::DriverArrived,
        TripState::DriverAssigned,
        TripState::Dispatching,
    ];
    let mut rides = Vec::new();
    let mut open_before = Vec::new();
    for (i, state) in states.into_iter().enumerate() {
        let ride = RidePlan {
            driver_at: from_center(0.001 * i as f64, 0.0),
            pickup,
            dropoff,
            ..RidePlan::default()
        }
        .to(&server, state)
        .await;
        let offered_at = std::time::Instant::now();
        assert_eq!(
            (ride.trip.state, ride.trip.version),
            (
                state,
                1 + happy_steps(TripState::Dispatching, state).len() as u64
            ),
            "{tag}"
        );
        let id = ride.trip.trip_id;
        rides.push(Ride {
            driver_id: ride.driver_id,
            driver_token: ride.driver_token,
            rider_id: ride.rider_id,
            rider_token: ride.rider_token,
            trip_id: id,
            state,
            offer: ride.offer,
            offered_at,
        });
        // Sessions stay open into the shutdown.
        open_before.push(ride.d);
        open_before.push(ride.r);
    }
    struct Ride {
        driver_id: String,
        driver_token: String,
        rider_id: String,
        rider_token: String,
        trip_id: String,
        state: TripState,
        offer: Offer,
        offered_at: std::time::Instant,
    }
    // A fifth driver, registered but never online; a fifth rider with a quote.
    let (_, spare_token) = server.driver("D spare", "economy").await;
    let (quoter_id, quoter_token) = server.rider("R quote").await;
    let quote = server
        .quote(&quoter_token, pickup, dropoff, "economy")
        .await;
    let quote_id = quote["quote_id"].as_str().expect("a quote id").to_owned();

    let mut before = BTreeMap::new();
    for r in &rides {
        let (st, v) = server
            .get(&format!("/v1/trips/{}", r.trip_id), Some(&r.rider_token))
            .await;
        assert_eq!(st, 200, "{tag} {v}");
        before.insert(r.trip_id.clone(), v);
    }
    // Let the open offer age, so a restored one that was not given a fresh timeout
    // would show it (polling the clock against the server's own offer timeout).
    let offered = &rides[3];
    while offered.offered_at.elapsed() < Duration::from_millis(1_000) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = server.again();
    server.stop_clean().await;
    for mut c in open_before {
        assert_eq!(
            c.closed_with().await,
            Some(1001),
            "{tag} sessions open at SIGTERM are closed with 1001"
        );
    }

    let restarted_at = std::time::Instant::now();
    let server = again.start().await;

    // Each trip as it was, to the byte.
    for r in &rides {
        let (st, v) = server
            .get(&format!("/v1/trips/{}", r.trip_id), Some(&r.rider_token))
            .await;
        assert_eq!(st, 200, "{tag} {v}");
        assert_eq!(
            v, before[&r.trip_id],
            "{tag} trip {} ({:?}) changed across a clean restart",
            r.trip_id, r.state
        );
    }
    // Welcomes: riders see their trips; drivers their trip, or the offer, fresh.
    let mut sessions = Vec::new();
    for r in &rides {
        let mut rc = server.connect("rider", &r.rider_token).await;
        let ServerMessage::Welcome { rider_id, trip, .. } = rc.welcome().await else {
            unreachable!()
        };
        assert_eq!(rider_id.as_deref(), Some(r.rider_id.as_str()));
        assert_eq!(
            trip.map(|t| serde_json::to_value(t).unwrap()),
            Some(before[&r.trip_id].clone()),
            "{tag} rider welcome after a clean restart ({:?})",
            r.state
        );
        let mut dc = server.connect("driver", &r.driver_token).await;
        let ServerMessage::Welcome {
            driver_id,
            status,
            offer,
            trip,
            ..
        } = dc.welcome().await
        else {
            unreachable!()
        };
        let waited = restarted_at.elapsed().as_millis() as u64;
        assert_eq!(driver_id.as_deref(), Some(r.driver_id.as_str()));
        if r.state == TripState::Dispatching {
            assert_eq!(status, Some(DriverStatus::Offered), "{tag}");
            assert!(trip.is_none(), "{tag} {trip:?}");
            let o = offer.flatten().unwrap_or_else(|| {
                panic!("{tag} the offered driver's welcome after a restart has no offer")
            });
            assert_eq!(
                Offer {
                    expires_in_ms: 0,
                    ..o.clone()
                },
                Offer {
                    expires_in_ms: 0,
                    ..r.offer.clone()
                },
                "{tag} the restored offer"
            );
            // A fresh timeout counts from the restart: at least the offer timeout less
            // the time since the new process was spawned. The old one had aged >= 1 s.
            assert!(
                o.expires_in_ms <= OFFER_MS && o.expires_in_ms + 50 >= OFFER_MS - waited,
                "{tag} the restored offer expires in {} ms; a fresh {OFFER_MS} ms timeout from a restart {waited} ms ago would leave more",
                o.expires_in_ms
            );
        } else {
            assert_eq!(status, Some(DriverStatus::OnTrip), "{tag} ({:?})", r.state);
            assert_eq!(offer.flatten(), None, "{tag}");
            assert_eq!(
                trip.map(|t| serde_json::to_value(t).unwrap()),
                Some(before[&r.trip_id].clone()),
                "{tag} driver welcome after a clean restart ({:?})",
                r.state
            );
        }
        sessions.push((rc, dc));
    }
    // Tokens still work over REST too.
    let (st, v) = server
        .post(
            "/v1/quotes",
            Some(&rides[0].rider_token),
            json!({"pickup": point(pickup), "dropoff": point(dropoff), "product": "economy"}),
        )
        .await;
    assert_eq!(
        st, 201,
        "{tag} a quote with a rider token from before the restart: {v}"
    );

    // The quote bought before the restart still buys a ride; the spare driver (never
    // online, so still offline) is its only candidate.
    let mut spare = server.connect("driver", &spare_token).await;
    let ServerMessage::Welcome { status, .. } = spare.welcome().await else {
        unreachable!()
    };
    assert_eq!(status, Some(DriverStatus::Offline), "{tag}");
    spare.go_online(pickup).await;
    let mut quoter = server.connect("rider", &quoter_token).await;
    quoter.welcome().await;
    let qt = trip_of(
        quoter
            .request(json!({"type": "request_ride", "quote_id": quote_id}))
            .await,
    );
    assert_eq!(qt.rider_id, quoter_id);
    assert_eq!(
        (qt.state, qt.quote.fare_cents),
        (
            TripState::Dispatching,
            quote["fare_cents"].as_i64().unwrap()
        ),
        "{tag} a ride bought with a quote from before the restart"
    );
    let o = spare.offer().await;
    assert_eq!(o.trip_id, qt.trip_id);
    for step in happy_steps(TripState::Dispatching, TripState::Completed) {
        spare.ok(json!({"type": step, "trip_id": qt.trip_id})).await;
    }
    let done = quoter.trip_in(TripState::Completed).await;
    assert_eq!(
        done.fare_cents,
        quote["fare_cents"].as_i64(),
        "{tag} the quoted fare"
    );

    // Each restored trip runs to completed.
    for (r, (rc, dc)) in rides.iter().zip(sessions.iter_mut()) {
        for step in happy_steps(r.state, TripState::Completed) {
            dc.ok(json!({"type": step, "trip_id": r.trip_id})).await;
        }
        let done = rc.trip_in(TripState::Completed).await;
        assert_eq!(
            done.version, 5,
            "{tag} trip {} ({:?} at the restart) completed at v{}",
            r.trip_id, r.state, done.version
        );
        let end = server.trip(&r.trip_id, &r.rider_token).await;
        assert_eq!((end.state, end.version), (TripState::Completed, 5), "{tag}");
    }
    server.stop_clean().await;
}
