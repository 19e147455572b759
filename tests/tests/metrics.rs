//! `/metrics` after a real ride: every business and actor-group family moves as the ride
//! does, every labelled family exists from the start, and no label names an entity.

use dispatch_tests::{Ride, RidePlan, TestServer};
use dispatch_transport::wire::TripState;
use serde_json::json;

/// Every sample of a scrape: (series as exposed, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            (
                k.to_owned(),
                v.parse().unwrap_or_else(|_| panic!("bad value {l}")),
            )
        })
        .collect()
}

fn value(s: &[(String, f64)], series: &str) -> f64 {
    s.iter()
        .find(|(k, _)| k == series)
        .unwrap_or_else(|| panic!("{series} is not exported"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_exported_from_the_start_and_none_is_labelled_per_entity() {
    let s = TestServer::start(&[]).await;
    let m = samples(&s.metrics_text().await);
    for series in [
        "dispatch_ready",
        "dispatch_start_time_seconds",
        "dispatch_trips_finished_total{state=\"no_driver_found\"}",
        "dispatch_trips_active{state=\"dispatching\"}",
        "dispatch_offers_total{outcome=\"expired\"}",
        "dispatch_drivers{status=\"suspended\"}",
        "dispatch_actors_started_total{group=\"session\"}",
        "dispatch_actor_panics_total{group=\"cell\"}",
        "dispatch_actor_handling_seconds_count{group=\"trip\"}",
        "dispatch_mailbox_backlog_messages{group=\"session\"}",
        "dispatch_rejected_total{code=\"quote_expired\"}",
        "dispatch_request_to_accept_seconds_count",
        "dispatch_pickup_eta_seconds_count",
        "dispatch_store_flush_seconds_count",
        "dispatch_bound_hits_total{bound=\"trip_reload_reads\"}",
    ] {
        value(&m, series);
    }
    assert_eq!(value(&m, "dispatch_ready"), 1.0);
    assert!(
        m.iter()
            .any(|(k, v)| k.starts_with("dispatch_build_info{version=") && *v == 1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ride_moves_the_business_actor_and_transport_metrics() {
    let s = TestServer::start(&[]).await;
    // Mia drives Max, from the plan's PICKUP to its DROPOFF.
    let plan = RidePlan {
        driver: "Mia",
        rider: "Max",
        driver_at: (45.5017, -73.5673),
        ..RidePlan::default()
    };
    let Ride {
        driver_id,
        mut d,
        rider_id,
        mut r,
        trip,
        ..
    } = plan.to(&s, TripState::DriverAssigned).await;
    // Mid-ride: one driver on a trip, one live trip, two open sessions.
    let m = samples(&s.metrics_text().await);
    assert_eq!(value(&m, "dispatch_drivers{status=\"on_trip\"}"), 1.0);
    assert_eq!(
        value(&m, "dispatch_trips_active{state=\"driver_assigned\"}"),
        1.0
    );
    assert_eq!(value(&m, "dispatch_actors_alive{group=\"session\"}"), 2.0);
    assert_eq!(value(&m, "dispatch_actors_alive{group=\"trip\"}"), 1.0);
    for step in ["arrived", "start_trip", "complete_trip"] {
        d.ok(json!({"type": step, "trip_id": trip.trip_id})).await;
    }
    r.trip_in(TripState::Completed).await;

    let text = s.metrics_text().await;
    let m = samples(&text);
    let one = |series: &str| assert_eq!(value(&m, series), 1.0, "{series}");
    one("dispatch_request_to_offer_seconds_count");
    one("dispatch_request_to_accept_seconds_count");
    one("dispatch_pickup_eta_seconds_count");
    one("dispatch_offers_total{outcome=\"sent\"}");
    one("dispatch_offers_total{outcome=\"accepted\"}");
    one("dispatch_trips_finished_total{state=\"completed\"}");
    one("dispatch_drivers{status=\"available\"}");
    one("dispatch_actor_messages_total{group=\"session\",kind=\"accept\"}");
    one("dispatch_actor_messages_total{group=\"driver\",kind=\"accept\"}");
    one("dispatch_actor_messages_total{group=\"trip\",kind=\"complete\"}");
    one("dispatch_actor_messages_total{group=\"rider\",kind=\"request_ride\"}");
    one("dispatch_http_requests_total{route=\"/v1/riders\",status=\"201\"}");
    assert_eq!(
        value(&m, "dispatch_trips_active{state=\"driver_assigned\"}"),
        0.0
    );
    for g in ["driver", "rider", "trip", "cell", "session"] {
        let handled = value(
            &m,
            &format!("dispatch_actor_handling_seconds_count{{group=\"{g}\"}}"),
        );
        assert!(handled > 0.0, "{g} handled nothing");
        assert!(
            value(
                &m,
                &format!("dispatch_actors_started_total{{group=\"{g}\"}}")
            ) >= 1.0
        );
    }
    assert_eq!(
        value(&m, "dispatch_actors_stopped_total{group=\"trip\"}"),
        1.0
    );
    assert!(
        value(
            &m,
            "dispatch_ws_messages_total{direction=\"out\",role=\"rider\"}"
        ) >= 5.0
    );
    assert!(
        value(
            &m,
            "dispatch_ws_messages_total{direction=\"in\",role=\"driver\"}"
        ) >= 6.0
    );
    // No label value is an id: one series per driver, rider or trip would grow without
    // bound.
    for id in [&driver_id, &rider_id, &trip.trip_id] {
        assert!(!text.contains(id.as_str()), "{id} appears in /metrics");
    }
    for (k, _) in &m {
        assert!(
            !k.contains("drv_") && !k.contains("rdr_") && !k.contains("trp_"),
            "a label names an entity: {k}"
        );
    }
}

/// Request → offer by stage (issue 14's tail): every stage's series, and the group
/// commit's, exists at zero from the start, and a ride's first offer moves each stage
/// once: from the session's hand-off, through the rider's and the trip's actors, the
/// store and the search, to the driver session's socket write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_to_offer_stages_start_at_zero_and_each_moves_with_a_ride() {
    const STAGES: [&str; 10] = [
        "rider_queue",
        "rider",
        "trip_spawn",
        "first_commit",
        "search",
        "decide",
        "offer_commit",
        "reserve",
        "session_queue",
        "socket_write",
    ];
    let count =
        |stage: &str| format!("dispatch_request_offer_stage_seconds_count{{stage=\"{stage}\"}}");
    let commit =
        |stage: &str| format!("dispatch_store_commit_stage_seconds_count{{stage=\"{stage}\"}}");
    // The trip's two awaited commits, by part.
    const PARTS: [&str; 8] = [
        "commit=\"first\",part=\"queue\"",
        "commit=\"first\",part=\"write\"",
        "commit=\"first\",part=\"fsync\"",
        "commit=\"first\",part=\"wake\"",
        "commit=\"offer\",part=\"queue\"",
        "commit=\"offer\",part=\"write\"",
        "commit=\"offer\",part=\"fsync\"",
        "commit=\"offer\",part=\"wake\"",
    ];
    let parts = PARTS.map(|p| format!("dispatch_request_offer_commit_seconds_count{{{p}}}"));
    let s = TestServer::start(&[]).await;
    let m = samples(&s.metrics_text().await);
    for stage in STAGES {
        assert_eq!(value(&m, &count(stage)), 0.0, "{stage}");
    }
    for stage in ["queue_wait", "write", "fsync"] {
        value(&m, &commit(stage));
    }
    for part in &parts {
        assert_eq!(value(&m, part), 0.0, "{part}");
    }
    let plan = RidePlan {
        driver: "Mia",
        rider: "Max",
        driver_at: (45.5017, -73.5673),
        ..RidePlan::default()
    };
    // The driver accepted: the offer's frame was written before anything after it.
    let _ride = plan.to(&s, TripState::DriverAssigned).await;
    let m = samples(&s.metrics_text().await);
    for stage in STAGES {
        assert_eq!(value(&m, &count(stage)), 1.0, "{stage}");
    }
    for stage in ["queue_wait", "write", "fsync"] {
        assert!(value(&m, &commit(stage)) >= 2.0, "{stage}");
    }
    for part in &parts {
        assert_eq!(value(&m, part), 1.0, "{part}");
    }
    // The trip's stages took time (the store's fsync at least).
    let sum: f64 = STAGES
        .iter()
        .map(|st| {
            value(
                &m,
                &format!("dispatch_request_offer_stage_seconds_sum{{stage=\"{st}\"}}"),
            )
        })
        .sum();
    assert!(sum > 0.0, "stages took {sum} s");
}
