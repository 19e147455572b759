//! Dispatch deadlines that pass while the server is down: recovery ends the trip by the
//! deadline that passed (not a fresh one), and never offers it again.

use std::time::Duration;

use dispatch_tests::{Dispatchd, Endpoint, WAIT, now_ms, rfc3339_ms};
use dispatch_transport::wire::{DriverStatus, ServerMessage, Trip, TripState};
use serde_json::json;
use tokio::time::Instant;

use crate::CENTER;

/// The trip, polled until `done` accepts its state or [`WAIT`] has passed.
async fn ended(server: &Endpoint, id: &str, token: &str, done: fn(TripState) -> bool) -> Trip {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = server.trip(id, token).await;
        if done(t.state) || Instant::now() >= deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server whose dispatch deadline is `deadline_ms`, and whose offers outlive it (a
/// minute): only the deadline can end a trip. In batch mode (the default) its window is
/// 200 ms, well inside the deadline, so the first offer comes (and the test's kill
/// follows) before the deadline; greedy ignores the window.
async fn with_deadline(name: &str, deadline_ms: u64) -> Dispatchd {
    let deadline = deadline_ms.to_string();
    let flags = [
        "--dispatch-deadline-ms",
        &deadline,
        "--offer-timeout-ms",
        "60000",
        "--match-window-ms",
        "200",
    ];
    crate::start(name, &flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_deadline_that_passed_while_down_ends_the_trip() {
    const DEADLINE_MS: u64 = 3_000;
    let tag = "[deadline while down]";
    let mut server = with_deadline("deadline-while-down", DEADLINE_MS).await;
    let (driver_id, driver_token, mut d) = server
        .online_driver_token("Silent", "economy", CENTER.0, CENTER.1)
        .await;
    let (_, rider_token, mut r) = server.connected_rider("Waiting").await;
    let trip = r
        .request_ride(CENTER, (CENTER.0 + 0.02, CENTER.1), "economy")
        .await;
    let offer = d.offer().await;
    assert_eq!(offer.trip_id, trip.trip_id);
    server.kill9();
    let due = rfc3339_ms(&trip.created_at) + DEADLINE_MS;
    assert!(
        now_ms() < due,
        "{tag} precondition: the kill came after the deadline had already passed"
    );
    // Down until the deadline has passed (by the clock the server also reads).
    while now_ms() <= due + 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop((d, r));
    let spawned_ms = now_ms();
    let server = server.restart().await;

    let end = ended(&server, &trip.trip_id, &rider_token, TripState::is_final).await;
    assert_eq!(
        (end.state, end.version, end.cancelled_by),
        (TripState::NoDriverFound, 2, None),
        "{tag} a trip whose dispatch deadline passed while the server was down"
    );
    // Ended by the deadline that passed, not by a fresh one counted from the restart.
    let ended = rfc3339_ms(&end.updated_at);
    assert!(
        ended < spawned_ms + DEADLINE_MS,
        "{tag} the trip ended {} ms after the new process was spawned: a fresh {DEADLINE_MS} ms deadline, not the one that passed while down",
        ended.saturating_sub(spawned_ms)
    );
    // The rider sees it: in its welcome (if the end was already delivered) or right after.
    let mut r = server.connect("rider", &rider_token).await;
    let ServerMessage::Welcome { trip: wt, .. } = r.welcome().await else {
        unreachable!()
    };
    if let Some(wt) = wt {
        assert_eq!(
            (wt.trip_id.as_str(), wt.state),
            (trip.trip_id.as_str(), TripState::Dispatching),
            "{tag} rider welcome"
        );
        let t = r.trip_in(TripState::NoDriverFound).await;
        assert_eq!((t.trip_id, t.version), (trip.trip_id.clone(), 2), "{tag}");
    }
    // The silent driver's offer went with it.
    let mut d = server.connect("driver", &driver_token).await;
    let ServerMessage::Welcome {
        driver_id: wd,
        status,
        offer,
        trip: dt,
        ..
    } = d.welcome().await
    else {
        unreachable!()
    };
    assert_eq!(wd.as_deref(), Some(driver_id.as_str()));
    assert_eq!(
        (status, offer.flatten(), dt),
        (Some(DriverStatus::Available), None, None),
        "{tag} the driver's welcome after its offered trip ended"
    );
    server.stop_clean().await;
}

/// The same situation as `a_dispatch_deadline_that_passed_while_down_ends_the_trip`, with
/// the silent driver back as soon as the server is ready (as a fleet of apps would be).
/// The trip is over (its deadline passed while the server was down), so the driver's
/// welcome must not offer it, and an `accept` must not take it. Before 64e3233 recovery
/// marked the server ready before the restored trip actors had run their overdue
/// deadline, so for the first milliseconds the welcome still carried the dead trip's
/// offer and an `accept` could even assign it (3 of some 40 restarts on a busy 2-core
/// machine). Tries up to 40 restarts and fails at the first stale offer or assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_whose_deadline_passed_while_down_is_not_offered_after_the_restart() {
    const DEADLINE_MS: u64 = 1_000;
    let tag = "[offer of a trip whose deadline passed while down]";
    let mut server = with_deadline("deadline-not-offered", DEADLINE_MS).await;
    let (_, driver_token) = server.driver("Silent", "economy").await;
    let (_, rider_token) = server.rider("Waiting").await;
    let mut outcomes = Vec::new();
    for attempt in 0..40 {
        let mut d = server.connect("driver", &driver_token).await;
        d.welcome().await;
        d.go_online(CENTER).await;
        let mut r = server.connect("rider", &rider_token).await;
        r.welcome().await;
        let trip = r
            .request_ride(CENTER, (CENTER.0 + 0.02, CENTER.1), "economy")
            .await;
        assert_eq!(d.offer().await.trip_id, trip.trip_id, "{tag}");
        server.kill9();
        drop((d, r));
        let due = rfc3339_ms(&trip.created_at) + DEADLINE_MS;
        while now_ms() <= due + 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        server = server.restart().await;
        let mut d = server.connect("driver", &driver_token).await;
        let ServerMessage::Welcome { offer, .. } = d.welcome().await else {
            unreachable!()
        };
        let offered = offer.flatten();
        let answer = match &offered {
            None => None,
            Some(o) => Some(
                d.request(json!({"type": "accept", "trip_id": o.trip_id}))
                    .await,
            ),
        };
        let end = ended(&server, &trip.trip_id, &rider_token, |s| {
            s != TripState::Dispatching
        })
        .await;
        outcomes.push((offered.is_some(), answer.clone(), end.state));
        assert!(
            offered.is_none() && end.state == TripState::NoDriverFound,
            "{tag} restart {attempt}: the trip's dispatch deadline passed while the server was down, yet right after the restart the driver's welcome offers it: {offered:?}; accepting it was answered {answer:?}; the trip ended {:?} (outcomes so far, (offered, accept answer, end): {outcomes:#?})",
            end.state
        );
    }
    server.stop_clean().await;
}
