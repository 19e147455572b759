//! Sharded cluster mode (issue 16, stage 4's wiring; `docs/sharding.md` §4) with 3 real
//! `dispatchd` processes (`--cluster-mode sharded --lease-ttl-ms 2000`) on one fresh
//! PostgreSQL database, real membership links and real WebSockets.
//!
//! - Every shard (`WHOLE_CITY`, the 256 entity shards, the service area's cell shards) is
//!   held by exactly the node the rendezvous map gives it, and each node counts exactly
//!   its own (`dispatch_cluster_shards_held`).
//! - A driver registered and connected on node A and a rider on node B (so their entity
//!   shards are A's and B's; the pickup's cell shard is B's: until trips spawn on the
//!   pickup's owner a trip runs on its rider's node) complete a ride: the offer, the
//!   driver's commands and the trip's updates cross nodes through the routers. An account's
//!   REST call on a node that does not serve it is forwarded to its owner and answered.
//! - kill -9 of A with the driver's second trip live (accepted): A's shards are claimed by
//!   B and C within the lease's TTL and a few seconds; the driver reconnects through a
//!   node that does not own its shard (relayed to the owner) and gets `welcome` with its
//!   trip; the trip moves again (the driver's `arrived`, seen by the rider on B) and
//!   completes. The times from the kill are printed.
//!   A's other driver, whose session was opened on C and relayed to A, is closed 1001 by
//!   C and gets its `welcome` again through C.
//! - SIGTERM of C: it exits 0 and B holds every shard once membership drops C (C's
//!   leases released at its shutdown, not left to expire).
//! - (a second cluster) Issue 16 stage 5's cases: a ride with its rider's account on B, its
//!   pickup's shard C's and its driver's account A's runs on C and completes, counted in the
//!   nodes' metrics; a driver near a border between two nodes' cell shards is offered a
//!   pickup across it (counted `dispatch_search_cross_border_total`), then moves across
//!   and is offered the next pickup from its new shard's owner's cell.

use std::time::Duration;

use dispatch_tests::cluster::{self, all_see_each_other};
use dispatch_tests::served::connect_when_served;
use dispatch_tests::{ClusterFixture, Dispatchd, SHORT_TRIP_FLAGS, SLOW, eventually_within};
use dispatch_transport::server::shards::{entity_shard, shard_at, shard_owner};
use dispatch_transport::wire::{ServerMessage, TripState};
use serde_json::json;
use tokio::time::Instant;

const ADMIN: &str = "adm-sharded-0123456789abcdef0123";
const COOKIE: &str = "sharded-test-cookie-0123456789";
/// Cluster ports of this test's own (the helper's range 31000–31999).
const PORTS: [u16; 3] = [31201, 31202, 31203];
const NAMES: [&str; 3] = ["s1", "s2", "s3"];
const TTL_MS: u64 = 2000;
/// A box around the rides' pickup (a few resolution-6 cell shards).
const AREA: &str = "40.735,-74.000,40.760,-73.970";
const PICKUP: (f64, f64) = (40.7484, -73.9857);
const DROPOFF: (f64, f64) = (40.7520, -73.9800);

fn node(fx: &ClusterFixture, ports: &[u16; 3], i: usize) -> dispatch_tests::DispatchdBuilder {
    fx.sharded_node(NAMES[i], (ports, i), ADMIN, TTL_MS)
        .flags(SHORT_TRIP_FLAGS)
        .flags(&["--service-area", AREA, "--database-timeout-ms", "2000"])
}

/// Every candidate shard of the test's cluster.
fn candidates() -> Vec<u64> {
    cluster::candidate_shards(AREA)
}

/// The owner the rendezvous map gives `shard` among `members`.
fn owner_of(shard: u64, members: &[&str]) -> String {
    shard_owner(shard, members).expect("members").to_owned()
}

/// Whether every candidate shard is held, live, by its owner among `members`.
async fn partitioned(db: &str, members: &[&str]) -> bool {
    cluster::partitioned(db, AREA, members).await
}

async fn answers_healthz(d: &Dispatchd) {
    eventually_within("the node answers /healthz", SLOW, || async {
        let r = d.http.get(d.url("/healthz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// Spawns the 3 nodes on their cluster `ports` and waits until they see each other, every
/// shard is held by its owner and every node is ready.
async fn start_cluster(fx: &ClusterFixture, ports: &[u16; 3]) -> Vec<Dispatchd> {
    let mut nodes: Vec<Dispatchd> = Vec::new();
    for i in 0..3 {
        nodes.push(node(fx, ports, i).spawn());
        answers_healthz(&nodes[i]).await;
    }
    all_see_each_other(&nodes, &NAMES, "the three nodes see each other").await;
    // Every shard held by exactly its owner, and each node serving all of its own.
    eventually_within(
        "every shard held by its owner, every node ready",
        SLOW,
        || async {
            if !partitioned(&fx.db, &NAMES).await {
                return None;
            }
            for d in &nodes {
                if !d.is_ready().await {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sharded_nodes_split_the_city_ride_across_nodes_and_take_over_a_killed_nodes_shards()
{
    let Some(fx) = ClusterFixture::new("sharded_three_nodes", COOKIE) else {
        return;
    };
    let started = Instant::now();
    let mut nodes = start_cluster(&fx, &PORTS).await;
    let all = candidates();
    for (i, d) in nodes.iter().enumerate() {
        let own = all
            .iter()
            .filter(|s| owner_of(**s, &NAMES) == NAMES[i])
            .count();
        assert!(own > 0, "{} owns no shard", NAMES[i]);
        eventually_within("each node counts exactly its shards", SLOW, || async {
            let held = d.metric_value("dispatch_cluster_shards_held").await as usize;
            (held == own).then_some(())
        })
        .await;
    }
    println!(
        "sharded: 3 nodes split {} shards in {:?}",
        all.len(),
        started.elapsed()
    );

    // B owns the pickup's cell shard; A is another node, C the third.
    let b = NAMES
        .iter()
        .position(|n| *n == owner_of(shard_at(PICKUP.0, PICKUP.1).unwrap(), &NAMES))
        .unwrap();
    let a = (b + 1) % 3;
    let c = (b + 2) % 3;
    let (driver_id, driver_token) = nodes[a].driver("Dana", "economy").await;
    let (rider_id, rider_token) = nodes[b].rider("Rui").await;
    assert_eq!(
        owner_of(entity_shard(&driver_id), &NAMES),
        NAMES[a],
        "registered on A: A's shard"
    );
    assert_eq!(
        owner_of(entity_shard(&rider_id), &NAMES),
        NAMES[b],
        "registered on B: B's shard"
    );
    assert!(driver_token.starts_with(&format!("tok_{}.", entity_shard(&driver_id))));

    // An account's REST call where it is not served: forwarded to its owner, and answered
    // as the owner answers it (tests/tests/forward.rs covers every route).
    let (st, v) = nodes[c]
        .post(
            "/v1/quotes",
            Some(&rider_token),
            json!({"pickup": dispatch_tests::point(PICKUP), "dropoff": dispatch_tests::point(DROPOFF), "product": "economy"}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        nodes[c]
            .metric_value(
                "dispatch_cluster_forwarded_total{outcome=\"answered\",route_group=\"account\"}"
            )
            .await,
        1.0
    );

    // The driver on A, the rider on B: a ride across nodes, to its end.
    let mut d = nodes[a].connect("driver", &driver_token).await;
    d.welcome().await;
    d.go_online(PICKUP).await;
    let mut r = nodes[b].connect("rider", &rider_token).await;
    r.welcome().await;
    let first = ride(&mut d, &mut r, PICKUP, TripState::Completed).await;
    println!("sharded: a ride across nodes completed ({first})");

    // A second driver of A's, offline, its session opened on C and relayed to A.
    let (idle_id, idle_token) = nodes[a].driver("Ines", "economy").await;
    assert_eq!(owner_of(entity_shard(&idle_id), &NAMES), NAMES[a]);
    let (mut idle, _) = connect_when_served(&nodes[c], "/v1/ws/driver", &idle_token).await;
    idle.welcome().await;

    // A second ride, left accepted; then kill -9 of A (the driver's node).
    let trip = ride(&mut d, &mut r, PICKUP, TripState::DriverAssigned).await;
    let killed = Instant::now();
    nodes[a].child.kill().expect("kill -9 A");
    let _ = nodes[a].child.wait();
    drop(d);
    let survivors = [NAMES[b], NAMES[c]];
    let mut members = survivors.to_vec();
    members.sort();

    eventually_within("A's shards claimed by B and C", SLOW, || async {
        partitioned(&fx.db, &members).await.then_some(())
    })
    .await;
    let claimed = killed.elapsed();
    println!("sharded: every shard of the killed node claimed {claimed:?} after the kill");
    // The relayed session of A's account was closed 1001 by C ("reconnect"); it reconnects
    // to C and gets its welcome from its new owner.
    assert_eq!(
        idle.closed_with().await,
        Some(1001),
        "the relayed session's close"
    );
    let (mut idle, _) = connect_when_served(&nodes[c], "/v1/ws/driver", &idle_token).await;
    match idle.welcome().await {
        ServerMessage::Welcome {
            driver_id: Some(id),
            ..
        } => assert_eq!(id, idle_id),
        m => panic!("the idle driver's welcome after the takeover: {m:?}"),
    }
    assert!(
        claimed < Duration::from_millis(TTL_MS) + Duration::from_secs(8),
        "the takeover took {claimed:?}"
    );

    // The driver reconnects through the node that does not own its shard (relayed).
    let new_owner = owner_of(entity_shard(&driver_id), &members);
    let via = if new_owner == NAMES[b] { c } else { b };
    let (mut d, refused) = connect_when_served(&nodes[via], "/v1/ws/driver", &driver_token).await;
    match d.welcome().await {
        ServerMessage::Welcome {
            driver_id: Some(id),
            trip: Some(t),
            ..
        } => {
            assert_eq!(id, driver_id);
            assert_eq!(
                (t.trip_id.as_str(), t.state),
                (trip.as_str(), TripState::DriverAssigned)
            );
        }
        m => panic!("the driver's welcome after the takeover: {m:?}"),
    }
    let welcomed = killed.elapsed();
    // The live trip moves again: the driver's arrive, seen by the rider on B.
    d.ok(json!({"type": "arrived", "trip_id": trip})).await;
    let t = r.trip_in(TripState::DriverArrived).await;
    assert_eq!(t.trip_id, trip);
    let moved = killed.elapsed();
    println!(
        "sharded: after the kill, the driver welcomed again via {} (owner {new_owner}, {refused} refusals) at {welcomed:?}, its trip moving again at {moved:?}",
        NAMES[via]
    );
    for (cmd, state) in [
        ("start_trip", TripState::InProgress),
        ("complete_trip", TripState::Completed),
    ] {
        d.ok(json!({"type": cmd, "trip_id": trip})).await;
        assert_eq!(r.trip_in(state).await.trip_id, trip, "after {cmd}");
    }

    // SIGTERM of C: it exits cleanly and its leases are released, so B holds every shard
    // as soon as membership drops C, without waiting for a lease to run out.
    let term = Instant::now();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &nodes[c].child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM failed");
    let status = eventually_within("C exits after SIGTERM", SLOW, || {
        let st = nodes[c].child.try_wait().expect("try_wait");
        async move { st }
    })
    .await;
    assert!(status.success(), "C's exit after SIGTERM: {status}");
    let exited = term.elapsed();
    // Its leases were released as it stopped: none is live under its name once it exited
    // (left to expire, they would outlive it by up to the TTL: C renewed at most 400 ms
    // before the signal).
    let held: Vec<u64> = cluster::live_leases(&fx.db)
        .await
        .expect("read the leases")
        .into_iter()
        .filter(|(_, h)| h == NAMES[c])
        .map(|(s, _)| s)
        .collect();
    assert!(
        held.is_empty(),
        "C exited {exited:?} after SIGTERM with {} live leases of its own: not released",
        held.len()
    );
    eventually_within("B holds every shard after C's SIGTERM", SLOW, || async {
        partitioned(&fx.db, &[NAMES[b]]).await.then_some(())
    })
    .await;
    println!(
        "sharded: C exited {exited:?} after its SIGTERM, its leases released; B held every shard {:?} after it",
        term.elapsed()
    );
    println!("sharded: the whole test took {:?}", started.elapsed());
}

/// Cluster ports of the second test's own.
const RIDE_PORTS: [u16; 3] = [31204, 31205, 31206];

/// Issue 16 stage 5's cases over 3 real sharded nodes: the rider's account on B, the pickup's
/// cell shard C's, the driver's account A's: the trip runs on C and completes, counted
/// (B's `spawn_trip` calls, C's `driver_reserve_offer` calls, C's finished trip). Then a
/// driver in one cell shard is offered a pickup across the border in a shard of another
/// node (counted `dispatch_search_cross_border_total` there), moves across the border and
/// is offered the next pickup, indexed now in its new shard's owner's cell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ride_over_three_nodes_and_a_driver_crossing_a_shard_border_are_offered_and_counted() {
    let Some(fx) = ClusterFixture::new("sharded_ride_three_nodes", COOKIE) else {
        return;
    };
    let started = Instant::now();
    let nodes = start_cluster(&fx, &RIDE_PORTS).await;
    let at = |name: &str| NAMES.iter().position(|n| *n == name).unwrap();

    // C owns the pickup's cell shard, B the rider's account, A the driver's.
    let c = at(&owner_of(indexed_shard(PICKUP), &NAMES));
    let (a, b) = ((c + 1) % 3, (c + 2) % 3);
    let (driver_id, driver_token) = nodes[a].driver("Dana", "economy").await;
    let (rider_id, rider_token) = nodes[b].rider("Rui").await;
    assert_eq!(owner_of(entity_shard(&driver_id), &NAMES), NAMES[a]);
    assert_eq!(owner_of(entity_shard(&rider_id), &NAMES), NAMES[b]);
    let mut d = nodes[a].connect("driver", &driver_token).await;
    d.welcome().await;
    d.go_online(PICKUP).await;
    let mut r = nodes[b].connect("rider", &rider_token).await;
    r.welcome().await;
    ride(&mut d, &mut r, PICKUP, TripState::Completed).await;
    // The trip ran on C: C counts it finished, A and B none.
    eventually_within("C counts the trip completed", SLOW, || async {
        (completed(&nodes[c]).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(completed(&nodes[a]).await, 0.0, "a trip ended on A");
    assert_eq!(completed(&nodes[b]).await, 0.0, "a trip ended on B");
    // Counted as a ride across nodes: B asked C to start it, C offered it to A's driver.
    assert_eq!(remote_calls(&nodes[b], "spawn_trip").await, 1.0);
    assert_eq!(remote_calls(&nodes[c], "driver_reserve_offer").await, 1.0);
    println!(
        "sharded: a ride with its rider on {}, its trip on {}, its driver on {} completed ({:?})",
        NAMES[b],
        NAMES[c],
        NAMES[a],
        started.elapsed()
    );
    d.ok(json!({"type": "go_offline"})).await;

    // A driver near a border: its cell shard X's owner is not the pickup's shard Y's
    // owner, and its own account is the third node's.
    let (here, there) = across_a_border();
    let (sx, sy) = (indexed_shard(here), indexed_shard(there));
    let (ox, oy) = (at(&owner_of(sx, &NAMES)), at(&owner_of(sy, &NAMES)));
    let t = 3 - ox - oy;
    let (mover_id, mover_token) = nodes[t].driver("Mo", "economy").await;
    assert_eq!(owner_of(entity_shard(&mover_id), &NAMES), NAMES[t]);
    let mut m = nodes[t].connect("driver", &mover_token).await;
    m.welcome().await;
    m.go_online(here).await;
    let border_before = cross_border(&nodes[oy]).await;
    let (_, first) = ride_offered(&mut m, &mut r, there, TripState::Completed).await;
    assert!(
        cross_border(&nodes[oy]).await > border_before,
        "the offer across the border was not counted on {}",
        NAMES[oy]
    );
    // It moves across the border: indexed in Y's cell on Y's owner (a `cell_upsert` cast
    // delivered there), and offered the next pickup in its new shard.
    let upserts = remote_calls(&nodes[oy], "cell_upsert").await;
    m.ok(
        json!({"type": "location", "lat": there.0, "lng": there.1, "ts": dispatch_tests::now_ms()}),
    )
    .await;
    eventually_within(
        "the driver indexed in its new shard's owner",
        SLOW,
        || async { (remote_calls(&nodes[oy], "cell_upsert").await > upserts).then_some(()) },
    )
    .await;
    let (_, next) = ride_offered(&mut m, &mut r, there, TripState::Completed).await;
    println!(
        "sharded: a driver in {sx:x} ({}) offered a pickup in {sy:x} ({}) {} m away, then {} m away after crossing ({:?})",
        NAMES[ox],
        NAMES[oy],
        first.pickup_distance_m,
        next.pickup_distance_m,
        started.elapsed()
    );
    assert!(
        next.pickup_distance_m < first.pickup_distance_m,
        "the next offer saw the driver where it was before crossing"
    );
}

/// Trips a node counts completed.
async fn completed(d: &Dispatchd) -> f64 {
    d.metric("dispatch_trips_finished_total{state=\"completed\"}")
        .await
        .unwrap_or(0.0)
}

/// Searches a node counts as having asked a cell on another node.
async fn cross_border(d: &Dispatchd) -> f64 {
    d.metric_value("dispatch_search_cross_border_total").await
}

/// How many remote messages of `kind` a node counts (calls it made, casts it delivered).
async fn remote_calls(d: &Dispatchd, kind: &str) -> f64 {
    d.metric_value(&format!(
        "dispatch_cluster_remote_seconds_count{{kind=\"{kind}\"}}"
    ))
    .await
}

/// The cell shard where a driver at `p` is indexed and a trip picked up at `p` runs: the
/// shard of its index cell (`--h3-resolution`, 7 by default), which near a border need not
/// be [`shard_at`]'s (the resolution-6 cell of the point itself).
fn indexed_shard(p: (f64, f64)) -> u64 {
    let grid = dispatch_engine::Grid::new(7).unwrap();
    dispatch_engine::shard::shard_of(grid.cell_of(dispatch_engine::Point::new(p.0, p.1).unwrap()))
}

/// Two points of the service area 0.003° of longitude (about 250 m) apart, on either side
/// of a border between two cell shards whose owners among `NAMES` differ: (the west one,
/// the east one).
fn across_a_border() -> ((f64, f64), (f64, f64)) {
    let step = 0.0005;
    for i in 0..48 {
        for j in 0..54 {
            let here = (40.736 + f64::from(i) * step, -73.999 + f64::from(j) * step);
            let there = (here.0, here.1 + 0.003);
            let (sx, sy) = (indexed_shard(here), indexed_shard(there));
            if sx != sy && owner_of(sx, &NAMES) != owner_of(sy, &NAMES) {
                return (here, there);
            }
        }
    }
    panic!("no border between two nodes' cell shards in {AREA}")
}

/// The rider requests a ride from `pickup`; the driver is offered it and accepts, then
/// drives it on to `to` (assigned or completed). The trip's id.
async fn ride(
    d: &mut dispatch_tests::Client,
    r: &mut dispatch_tests::Client,
    pickup: (f64, f64),
    to: TripState,
) -> String {
    ride_offered(d, r, pickup, to).await.0
}

/// [`ride`], and the offer the driver was given.
async fn ride_offered(
    d: &mut dispatch_tests::Client,
    r: &mut dispatch_tests::Client,
    pickup: (f64, f64),
    to: TripState,
) -> (String, dispatch_transport::wire::Offer) {
    let trip = r.request_ride(pickup, DROPOFF, "economy").await;
    let offer = d.offer().await;
    assert_eq!(offer.trip_id, trip.trip_id);
    let id = trip.trip_id.clone();
    d.ok(json!({"type": "accept", "trip_id": id})).await;
    r.trip_in(TripState::DriverAssigned).await;
    if to == TripState::DriverAssigned {
        return (id, offer);
    }
    for (cmd, state) in [
        ("arrived", TripState::DriverArrived),
        ("start_trip", TripState::InProgress),
        ("complete_trip", TripState::Completed),
    ] {
        d.ok(json!({"type": cmd, "trip_id": id})).await;
        let t = r.trip_in(state).await;
        assert_eq!(t.trip_id, id, "the rider's update after {cmd}");
    }
    (id, offer)
}
