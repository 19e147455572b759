//! Server bugs the crash tests ran into, each pinned by a test of its own.

use dispatch_tests::Client;
use dispatch_transport::wire::{ServerMessage, TripState};
use serde_json::json;

use crate::CENTER;

/// The reply carrying `req`.
async fn reply_to(c: &mut Client, req: u64) -> ServerMessage {
    c.next_where(&format!("reply to req {req}"), |m| match m {
        ServerMessage::Ack { req: r } | ServerMessage::Error { req: Some(r), .. } => *r == req,
        _ => false,
    })
    .await
}

/// docs/api.md: `cancel_trip` is `forbidden` when the driver is not the trip's driver and
/// `conflict` in the wrong state; a trip's driver stays its driver when the trip ends (it
/// may still GET it). The rider's `cancel_ride` and the driver's `cancel_trip` race, 30
/// times: whichever wins, the loser is never told `forbidden`. (Until 2b4dfaf a cancel
/// that reached the trip actor while it drained after the rider's cancel was answered
/// `forbidden`, one a moment later `conflict`; the crash test ran into it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_trip_racing_the_riders_cancel_is_never_forbidden() {
    let tag = "[cancel_trip racing cancel_ride]";
    let server = crate::start("cancel-race", &[]).await;
    let (_, _, mut d) = server
        .online_driver_token("Racer", "economy", CENTER.0, CENTER.1)
        .await;
    let (_, _, mut r) = server.connected_rider("Changed mind").await;
    let mut seen = Vec::new();
    for _ in 0..30 {
        let trip = r
            .request_ride(CENTER, (CENTER.0 + 0.02, CENTER.1), "economy")
            .await;
        let o = d.offer().await;
        assert_eq!(o.trip_id, trip.trip_id);
        d.ok(json!({"type": "accept", "trip_id": trip.trip_id}))
            .await;
        r.trip_in(TripState::DriverAssigned).await;
        let rc = r
            .send_req(json!({"type": "cancel_ride", "trip_id": trip.trip_id}))
            .await;
        let dc = d
            .send_req(json!({"type": "cancel_trip", "trip_id": trip.trip_id}))
            .await;
        let rider_says = reply_to(&mut r, rc).await;
        let driver_says = reply_to(&mut d, dc).await;
        let code = |m: &ServerMessage| match m {
            ServerMessage::Ack { .. } => "ack".to_owned(),
            ServerMessage::Error { code, .. } => code.clone(),
            m => panic!("{tag} {m:?}"),
        };
        let outcome = (code(&rider_says), code(&driver_says));
        // The ride is over either way: cancelled by the rider, or (the driver's cancel
        // first) no other driver.
        r.next_where("the end of the ride", |m| {
            matches!(m, ServerMessage::TripUpdate { trip: t, .. }
                if t.trip_id == trip.trip_id && t.state.is_final())
        })
        .await;
        seen.push(outcome.clone());
        assert_ne!(
            outcome.1, "forbidden",
            "{tag} the trip's own driver was told forbidden (docs/api.md: conflict in the wrong state); outcomes so far {seen:?}"
        );
    }
    eprintln!("{tag} outcomes {seen:?}");
    server.stop_clean().await;
}
