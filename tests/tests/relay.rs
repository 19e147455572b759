//! Sessions across nodes (issue 16, item 2, first step) with 2 real `dispatchd` processes
//! in cluster mode on one fresh PostgreSQL database and real WebSockets: a driver connected
//! to the standby and a rider connected to the leader complete a ride (offer, accept,
//! arrive, start, complete), each seeing every transition, the driver's through
//! `ractor_cluster` remote actors. Then `kill -9` of the leader: the driver's relayed
//! session closes with 1001, and it reconnects to the surviving node (leader once it
//! claims the lease) and gets `welcome` with its state.
//!
//! A second test holds the leader's side of a relayed session to its bound: a driver on a
//! standby that is paused (SIGSTOP) while a rider on the leader requests and cancels rides
//! (an offer and a withdrawal for the driver each) is closed by the leader (1008) once
//! more messages are in flight to the standby than it allows, long before membership
//! would drop the standby.

use std::time::Instant;

use dispatch_tests::cluster::cluster_node;
use dispatch_tests::{Client, ClusterFixture, Dispatchd, Ride, RidePlan, SLOW, eventually_within};
use dispatch_transport::wire::{DriverStatus, ServerMessage, Trip, TripState};
use serde_json::json;

const ADMIN: &str = "adm-relay-0123456789abcdef012345";
const COOKIE: &str = "relay-test-cookie-0123456789";
/// Cluster ports of this test's own (the helper's range 31000–31999).
const PORTS: [u16; 2] = [31101, 31102];
/// The second test's.
const BOUND_PORTS: [u16; 2] = [31103, 31104];

fn node(fx: &ClusterFixture, i: usize) -> dispatch_tests::DispatchdBuilder {
    let peers = ClusterFixture::peers(&PORTS);
    // A lease long enough that a loaded CI machine's slow renewal does not end the
    // leader's term mid-ride (the takeover after kill -9 waits this long).
    fx.leader_node(&format!("n{i}"), PORTS[i], &peers, ADMIN)
        .flags(&["--lease-ttl-ms", "6000", "--lease-renew-ms", "1000"])
}

/// A driver session on `d`, retried while `d` answers 503 (membership and the leader's
/// host group still reaching it, or no leader yet); the 503s seen.
async fn connect_when_served(d: &Dispatchd, token: &str) -> (Client, u32) {
    dispatch_tests::served::connect_when_served(d, "/v1/ws/driver", token).await
}

/// Waits until the standby `d` answers `/healthz`.
async fn answers_healthz(d: &Dispatchd) {
    eventually_within("the standby answers /healthz", SLOW, || async {
        let r = d.http.get(d.url("/healthz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// A driver's `welcome`: its id, status and trip.
async fn driver_welcome(d: &mut Client) -> (String, DriverStatus, Option<Trip>) {
    match d.welcome().await {
        ServerMessage::Welcome {
            driver_id: Some(id),
            status: Some(status),
            trip,
            ..
        } => (id, status, trip),
        m => panic!("a driver's welcome: {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_on_a_standby_rides_with_a_rider_on_the_leader_and_reconnects_after_its_death() {
    let Some(fx) = ClusterFixture::new("relay_two_nodes", COOKIE) else {
        return;
    };

    // n0 starts first and leads; n1 stands by.
    let mut n0 = node(&fx, 0).start().await;
    let n1 = node(&fx, 1).spawn();
    answers_healthz(&n1).await;

    // Registered on the leader (a standby answers REST 503).
    let plan = RidePlan::default();
    n0.wait_ready().await;
    let (driver_id, driver_token) = n0.driver(plan.driver, plan.product).await;
    let (mut d, refused) = connect_when_served(&n1, &driver_token).await;
    eprintln!(
        "the standby relayed a driver session after {refused} answers 503 while the cluster formed"
    );
    let (id, status, _) = driver_welcome(&mut d).await;
    assert_eq!((id, status), (driver_id.clone(), DriverStatus::Offline));
    d.go_online(plan.driver_at).await;
    assert_eq!(
        n1.metric_value("dispatch_cluster_relayed_sessions{side=\"relaying\"}")
            .await,
        1.0
    );
    assert_eq!(
        n0.metric_value("dispatch_cluster_relayed_sessions{side=\"hosting\"}")
            .await,
        1.0
    );

    // The rider on the leader; the ride through both.
    let rider = n0.connected_rider(plan.rider).await;
    let mut ride = Ride::offered(&plan, (driver_id.clone(), driver_token.clone(), d), rider).await;
    assert!(ride.offer.expires_in_ms > 0, "{:?}", ride.offer);
    ride.advance(TripState::Completed).await;
    eprintln!(
        "ride completed across nodes: {} relay messages to the leader, {} to the standby",
        n1.metric_value("dispatch_cluster_relay_messages_total{direction=\"to_leader\"}")
            .await,
        n0.metric_value("dispatch_cluster_relay_messages_total{direction=\"to_standby\"}")
            .await
    );
    let trip = n0.trip(ride.trip_id(), &ride.rider_token).await;
    assert_eq!(trip.state, TripState::Completed);

    // The leader dies: the relayed session closes with 1001 (going away) ...
    n0.kill9();
    let code = ride.d.closed_with().await;
    assert_eq!(code, Some(1001), "the relayed session's close");
    // No leader until n1 claims the lease (its TTL after n0's last renewal): the standby
    // answers the upgrade 503 `unavailable`.
    let tried = Client::try_connect(&n1.ws_url("/v1/ws/driver"), Some(&driver_token)).await;
    if n1.metric_value("dispatch_cluster_leader").await == 0.0 {
        let Err((st, v)) = tried else {
            panic!("a standby without a leader accepted a session")
        };
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (503, Some("unavailable")),
            "{v}"
        );
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("no node holds the lease"), "{v}");
    } else {
        eprintln!("n1 led already when asked: the no-leader answer was not checked");
    }
    // ... and the driver, reconnecting to the surviving node once it leads (a node still
    // recovering answers a token it has not loaded yet 401, as a restarting single node
    // does), gets its state.
    eventually_within("n1 takes over", SLOW, || async {
        let r = n1.http.get(n1.url("/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let (mut d, refused) = connect_when_served(&n1, &driver_token).await;
    eprintln!("reconnected to n1, the new leader, after {refused} answers 503");
    let (id, status, trip) = driver_welcome(&mut d).await;
    assert_eq!(id, driver_id);
    assert_eq!(status, DriverStatus::Available, "online after the ride");
    assert!(trip.is_none(), "{trip:?}");
    d.alive().await;
    assert_eq!(n1.metric_value("dispatch_cluster_leader").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_standby_s_session_is_closed_by_the_leader_past_what_it_may_have_in_flight() {
    let Some(fx) = ClusterFixture::new("relay_in_flight", COOKIE) else {
        return;
    };
    // A peer timeout far past the test: membership does not drop the paused standby, so
    // only the leader's bound on what is in flight to it can close the session. The
    // smallest outbound queue (8): at most 8 + 8 messages in flight.
    let node = |i: usize| {
        let extra: Vec<String> = [
            "--admin-token",
            ADMIN,
            "--lease-ttl-ms",
            "6000",
            "--lease-renew-ms",
            "1000",
            "--ws-outbound-queue-max",
            "8",
        ]
        .map(str::to_owned)
        .to_vec();
        let name = format!("b{i}");
        cluster_node(
            &name,
            "leader",
            BOUND_PORTS[i],
            &BOUND_PORTS,
            &fx.cookie_file,
            &fx.db,
            (200, 120_000),
            &extra,
        )
    };
    let b0 = node(0).start().await;
    let b1 = node(1).spawn();
    answers_healthz(&b1).await;
    b0.wait_ready().await;
    // Each counts the other a member first (relayed sessions work before that, through
    // ractor's groups): the check after the pause is then that membership kept the paused
    // standby, so the close came from the bound.
    eventually_within("b0 and b1 count each other", SLOW, || async {
        let both = b0.metric_value("dispatch_cluster_members").await == 2.0
            && b1.metric_value("dispatch_cluster_members").await == 2.0;
        both.then_some(())
    })
    .await;
    let plan = RidePlan::default();
    let (driver_id, driver_token) = b0.driver(plan.driver, plan.product).await;
    let (mut d, _) = connect_when_served(&b1, &driver_token).await;
    driver_welcome(&mut d).await;
    d.go_online(plan.driver_at).await;
    let (_, _, mut r) = b0.connected_rider(plan.rider).await;
    let cancel = |trip: &Trip| json!({"type": "cancel_ride", "trip_id": trip.trip_id});
    // Through the relay while the standby runs: the driver is offered the ride.
    let trip = r
        .request_ride(plan.pickup, plan.dropoff, plan.product)
        .await;
    assert_eq!(d.offer().await.trip_id, trip.trip_id);
    r.ok(cancel(&trip)).await;
    let hosting = "dispatch_cluster_relayed_sessions{side=\"hosting\"}";
    assert_eq!(b0.metric_value(hosting).await, 1.0);

    // The standby pauses; rides are requested and cancelled (an offer and its withdrawal
    // for the driver each) until the leader gives the driver's session up.
    b1.signal("-STOP");
    let bound = "dispatch_bound_hits_total{bound=\"relay_in_flight\"}";
    let deadline = Instant::now() + SLOW;
    let mut rides = 0u32;
    loop {
        let trip = r
            .request_ride(plan.pickup, plan.dropoff, plan.product)
            .await;
        r.ok(cancel(&trip)).await;
        rides += 1;
        if b0.metric_value(hosting).await == 0.0 && b0.metric_value(bound).await == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader still hosts the paused standby's session after {rides} rides"
        );
    }
    eprintln!("the leader closed the paused standby's session after {rides} rides");
    assert_eq!(b0.metric_value("dispatch_cluster_members").await, 2.0);

    // Awake, the standby passes the leader's close on: 1008, as a local slow client's.
    b1.signal("-CONT");
    assert_eq!(
        d.closed_with().await,
        Some(1008),
        "the relayed session's close"
    );
    // The driver reconnects through the standby, still online and free.
    let (mut d, _) = connect_when_served(&b1, &driver_token).await;
    let (id, status, trip) = driver_welcome(&mut d).await;
    assert_eq!((id, status), (driver_id, DriverStatus::Available));
    assert!(trip.is_none(), "{trip:?}");
}
