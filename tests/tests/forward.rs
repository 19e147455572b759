//! REST calls forwarded to the node that serves them (`--cluster-mode sharded`; issue 16,
//! `transport/src/server/forward.rs`) with 3 real `dispatchd` processes on one fresh
//! PostgreSQL database and real membership links.
//!
//! - Every account route called on a node that does not serve the account answers exactly
//!   what its owner answers: a quote (all but its id and expiry), a trip read (rider and
//!   driver), nearby drivers, a driver's earnings after a completed ride; a read asked
//!   again is answered the same.
//! - The operator's admin views of one trip and one driver are the same on every node
//!   (forwarded to the trip's pickup shard's owner, the driver's entity shard's owner).
//! - A pricing write on a node that does not hold `WHOLE_CITY` takes effect: read back on
//!   another node, and applied in a quote priced by a node that does not hold it either.
//! - A body over the forward bound is 413 `too_large`, counted
//!   `dispatch_cluster_forwarded_total{route_group="account",outcome="too_large"}`.
//! - A request whose owner was just killed -9 is 503 `unavailable` within a few seconds
//!   (the owner's host leaves its group as its link closes; no waiting out the timeout).
//! - A registration under a JWT (rider and driver) on a node that does not own the JWT
//!   id's shard is 201, registered by the owner (asked again: 409 there and on the owner,
//!   as the owner answers twice); the account then works through any node (a quote, the
//!   driver's earnings). The registration limit counts it on the node asked, once: past
//!   the burst, 429 there (`bound="register_rate"`), not forwarded; the owner neither
//!   counted the forwarded ones nor refused them.

use std::time::Duration;

#[path = "support/idp.rs"]
mod idp;

use dispatch_tests::cluster::all_see_each_other;
use dispatch_tests::{ClusterFixture, Dispatchd, SHORT_TRIP_FLAGS, SLOW, eventually_within};
use dispatch_transport::server::shards::{entity_shard, shard_owner};
use dispatch_transport::wire::TripState;
use serde_json::{Value, json};
use tokio::time::Instant;

const ADMIN: &str = "adm-forward-0123456789abcdef01234";
const COOKIE: &str = "forward-test-cookie-0123456789";
/// Cluster ports of this test's own (the `fwd` helper's range 31300–31349).
const PORTS: [u16; 3] = [31300, 31301, 31302];
const NAMES: [&str; 3] = ["f1", "f2", "f3"];
const TTL_MS: u64 = 2000;
const AREA: &str = "40.735,-74.000,40.760,-73.970";
const PICKUP: (f64, f64) = (40.7484, -73.9857);
const DROPOFF: (f64, f64) = (40.7520, -73.9800);

fn owner_of(shard: u64) -> usize {
    owner_in(shard, &NAMES)
}

fn owner_in(shard: u64, names: &[&str]) -> usize {
    let o = shard_owner(shard, names).expect("members");
    names.iter().position(|n| *n == o).unwrap()
}

/// Registers accounts on `on` until one's entity shard is owned by `want`.
async fn rider_of(on: &Dispatchd, want: usize) -> (String, String) {
    loop {
        let (id, token) = on.rider("Rui").await;
        if owner_of(entity_shard(&id)) == want {
            return (id, token);
        }
    }
}

async fn start(fx: &ClusterFixture) -> Vec<Dispatchd> {
    start_with(fx, (&PORTS, &NAMES), &[]).await
}

async fn start_with(
    fx: &ClusterFixture,
    (ports, names): (&[u16; 3], &[&str; 3]),
    flags: &[&str],
) -> Vec<Dispatchd> {
    let mut nodes: Vec<Dispatchd> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let d = fx
            .sharded_node(name, (ports, i), ADMIN, TTL_MS)
            .flags(SHORT_TRIP_FLAGS)
            .flags(&["--service-area", AREA, "--database-timeout-ms", "2000"])
            .flags(flags)
            .spawn();
        nodes.push(d);
    }
    all_see_each_other(&nodes, names, "the three nodes see each other").await;
    eventually_within("every node ready", SLOW, || async {
        for d in &nodes {
            if !d.is_ready().await {
                return None;
            }
        }
        Some(())
    })
    .await;
    nodes
}

/// A quote without what differs between two quotes of the same ride.
fn priced(mut q: Value) -> Value {
    let o = q.as_object_mut().expect("a quote");
    assert!(o.remove("quote_id").is_some(), "{q:?}");
    o.remove("expires_at");
    q
}

async fn forwarded(d: &Dispatchd, group: &str, outcome: &str) -> f64 {
    d.metric_value(&format!(
        "dispatch_cluster_forwarded_total{{outcome=\"{outcome}\",route_group=\"{group}\"}}"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_calls_on_a_node_that_does_not_serve_them_are_answered_by_their_owner() {
    let Some(fx) = ClusterFixture::new("forward_three_nodes", COOKIE) else {
        return;
    };
    let nodes = start(&fx).await;
    // A serves the pickup's cell shard (the trips run there) and the driver's account (so
    // its books count the ride); B serves the rider's account and does not hold
    // WHOLE_CITY (Z's: the settings); C is the third node.
    let z = owner_of(0);
    let a = owner_of(shard_at_trip());
    let b = (0..3).find(|i| *i != z && *i != a).unwrap_or((a + 1) % 3);
    let c = 3 - a - b;
    let (rider_id, rider) = rider_of(&nodes[b], b).await;
    let (driver_id, driver) = nodes[a].driver("Dana", "economy").await;
    assert_eq!(owner_of(entity_shard(&driver_id)), a);
    let others = |own: usize| (0..3).filter(move |i| *i != own);
    let quote = json!({"pickup": dispatch_tests::point(PICKUP), "dropoff": dispatch_tests::point(DROPOFF), "product": "economy"});

    // A quote: the same price wherever it is asked.
    let here = priced(nodes[b].quote(&rider, PICKUP, DROPOFF, "economy").await);
    for i in others(b) {
        let (st, q) = nodes[i]
            .post("/v1/quotes", Some(&rider), quote.clone())
            .await;
        assert_eq!(st, 201, "the quote on {}: {q}", NAMES[i]);
        assert_eq!(priced(q), here, "the quote on {}", NAMES[i]);
    }
    assert!(forwarded(&nodes[c], "account", "answered").await >= 1.0);

    // A ride to its end: the driver on A, the rider on B.
    let mut d = nodes[a].connect("driver", &driver).await;
    d.welcome().await;
    d.go_online(PICKUP).await;
    let mut r = nodes[b].connect("rider", &rider).await;
    r.welcome().await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let id = trip.trip_id.clone();
    assert_eq!(d.offer().await.trip_id, id);
    d.ok(json!({"type": "accept", "trip_id": id})).await;
    r.trip_in(TripState::DriverAssigned).await;
    for (cmd, state) in [
        ("arrived", TripState::DriverArrived),
        ("start_trip", TripState::InProgress),
        ("complete_trip", TripState::Completed),
    ] {
        d.ok(json!({"type": cmd, "trip_id": id})).await;
        r.trip_in(state).await;
    }
    // The completed trip's books are written when its payment settles: wait for the
    // driver's owner to count it.
    let earnings = eventually_within("the driver's owner counts the ride", SLOW, || async {
        let v = nodes[a].get_ok("/v1/drivers/me/earnings", &driver).await;
        (v["total"]["trips"] == 1).then_some(v)
    })
    .await;

    // Every account route, on every node, answers what the owner answers (twice).
    let trip_path = format!("/v1/trips/{id}");
    let nearby = format!(
        "/v1/drivers/nearby?lat={}&lng={}&radius_m=3000",
        DROPOFF.0, DROPOFF.1
    );
    let owner_trip = nodes[b].get_ok(&trip_path, &rider).await;
    assert_eq!(owner_trip["state"], "completed", "{owner_trip}");
    let owner_trip_driver = nodes[a].get_ok(&trip_path, &driver).await;
    let owner_nearby = nodes[b].get_ok(&nearby, &rider).await;
    assert_eq!(
        owner_nearby["drivers"].as_array().map(Vec::len),
        Some(1),
        "{owner_nearby}"
    );
    for i in 0..3 {
        for _ in 0..2 {
            assert_eq!(
                nodes[i].get_ok(&trip_path, &rider).await,
                owner_trip,
                "trip, rider, on {}",
                NAMES[i]
            );
            assert_eq!(
                nodes[i].get_ok(&trip_path, &driver).await,
                owner_trip_driver,
                "trip, driver, on {}",
                NAMES[i]
            );
            assert_eq!(
                nodes[i].get_ok(&nearby, &rider).await,
                owner_nearby,
                "nearby on {}",
                NAMES[i]
            );
            assert_eq!(
                nodes[i].get_ok("/v1/drivers/me/earnings", &driver).await,
                earnings,
                "earnings on {}",
                NAMES[i]
            );
        }
    }
    // A refusal is the owner's too: a driver's token on a rider's route.
    let (st, v) = nodes[c]
        .post("/v1/quotes", Some(&driver), quote.clone())
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );

    // The operator's views of one trip and one driver: the same on every node.
    let admin_trip = nodes[a].get_ok(&format!("/admin/trips/{id}"), ADMIN).await;
    assert_eq!(admin_trip["trip"]["state"], "completed", "{admin_trip}");
    let admin_driver = nodes[a]
        .get_ok(&format!("/admin/drivers/{driver_id}"), ADMIN)
        .await;
    for i in 0..3 {
        assert_eq!(
            nodes[i].get_ok(&format!("/admin/trips/{id}"), ADMIN).await,
            admin_trip,
            "the admin trip on {}",
            NAMES[i]
        );
        assert_eq!(
            nodes[i]
                .get_ok(&format!("/admin/drivers/{driver_id}"), ADMIN)
                .await,
            admin_driver,
            "the admin driver on {}",
            NAMES[i]
        );
    }
    let (st, v) = nodes[b]
        .get(&format!("/admin/riders/{rider_id}"), Some(ADMIN))
        .await;
    assert_eq!(st, 200, "{v}");

    // Pricing written on B (not WHOLE_CITY's owner): read back on the other nodes, and
    // applied in the quotes B prices (B does not hold WHOLE_CITY), asked of B and of C.
    let mut pricing = nodes[z].get_ok("/admin/pricing", ADMIN).await;
    let base = pricing["products"]["economy"]["base_cents"]
        .as_i64()
        .unwrap();
    pricing["products"]["economy"]["base_cents"] = json!(base + 1000);
    let (st, v) = nodes[b]
        .put("/admin/pricing", Some(ADMIN), pricing.clone())
        .await;
    assert_eq!(st, 200, "{v}");
    for i in others(b) {
        assert_eq!(
            nodes[i].get_ok("/admin/pricing", ADMIN).await,
            pricing,
            "on {}",
            NAMES[i]
        );
    }
    let before = here["fare_cents"].as_i64().unwrap();
    for i in [b, c] {
        let (st, q) = nodes[i]
            .post("/v1/quotes", Some(&rider), quote.clone())
            .await;
        assert_eq!(st, 201, "{q}");
        assert!(
            q["fare_cents"].as_i64().unwrap() > before,
            "the new base fare is not in the quote asked of {}: {q} (before: {before})",
            NAMES[i]
        );
    }

    // A body over the forward bound: 413 too_large on the node asked, counted.
    let big = json!({"pickup": dispatch_tests::point(PICKUP), "pad": "x".repeat(70 * 1024)});
    let (st, v) = nodes[c].post("/v1/quotes", Some(&rider), big).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{v}"
    );
    assert_eq!(forwarded(&nodes[c], "account", "too_large").await, 1.0);

    // kill -9 of the rider's owner: a quote asked of C right after is 503 unavailable,
    // soon (not after the forward's timeout of the call timeout and a peer timeout).
    drop((d, r));
    let mut nodes = nodes;
    nodes[b].child.kill().expect("kill -9 B");
    let _ = nodes[b].child.wait();
    let asked = Instant::now();
    let (st, v) = nodes[c]
        .post("/v1/quotes", Some(&rider), quote.clone())
        .await;
    let took = asked.elapsed();
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{v}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    println!("forward: a quote whose owner was just killed answered 503 in {took:?}: {v}");
}

/// The shard of the test's trips: their pickup's cell shard (at the index resolution).
fn shard_at_trip() -> u64 {
    let grid = dispatch_engine::Grid::new(7).unwrap();
    dispatch_engine::shard::shard_of(
        grid.cell_of(dispatch_engine::Point::new(PICKUP.0, PICKUP.1).unwrap()),
    )
}

/// Cluster ports of the JWT registration test (the `jwtreg` helper's range 31550–31559).
const JWT_PORTS: [u16; 3] = [31550, 31551, 31552];
const JWT_NAMES: [&str; 3] = ["g1", "g2", "g3"];
/// The registration burst of each node in the JWT registration test (and a rate so low
/// that none comes back during it).
const BURST: usize = 3;

/// A JWT subject of `role` whose id's entity shard `want` owns (`n`: a distinct start).
fn subject_owned_by(role: &str, want: usize, n: usize) -> String {
    let prefix = match role {
        "rider" => dispatch_engine::RiderId::PREFIX,
        _ => dispatch_engine::DriverId::PREFIX,
    };
    (n * 1000..)
        .map(|i| format!("{role}-{i}"))
        .find(|sub| owner_in(entity_shard(&format!("{prefix}{sub}")), &JWT_NAMES) == want)
        .expect("a subject")
}

fn rider_body() -> Value {
    json!({"name": "Riley", "phone": "+1 555 0100"})
}

fn driver_body() -> Value {
    json!({"name": "Dana", "vehicle": {"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": "economy", "seats": 4}})
}

async fn register_rate_hits(d: &Dispatchd) -> f64 {
    d.metric_value("dispatch_bound_hits_total{bound=\"register_rate\"}")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_registration_on_a_node_that_does_not_own_its_shard_is_forwarded_to_the_owner() {
    let Some(fx) = ClusterFixture::new("forward_jwt_registration", COOKIE) else {
        return;
    };
    let rsa = idp::Signer::rsa("rsa-1");
    let provider = idp::Idp::serve(&[&rsa]).await;
    let burst = BURST.to_string();
    let limit = [
        "--register-rate-per-s",
        "0.001",
        "--register-burst",
        burst.as_str(),
    ];
    let flags: Vec<&str> = provider.flags(&limit);
    let nodes = start_with(&fx, (&JWT_PORTS, &JWT_NAMES), &flags).await;
    // X is asked, O owns the accounts' shards, T is the third node.
    let (x, o) = (0, 1);
    let t = 2;
    let rider_sub = subject_owned_by("rider", o, 1);
    let driver_sub = subject_owned_by("driver", o, 2);
    let rider = rsa.sign(&idp::claims("rider", &rider_sub));
    let driver = rsa.sign(&idp::claims("driver", &driver_sub));

    // Registered on X, which does not own their shard: 201, by the owner.
    let (st, v) = nodes[x]
        .post("/v1/riders", Some(&rider), rider_body())
        .await;
    assert_eq!(st, 201, "the JWT rider registered on {}: {v}", JWT_NAMES[x]);
    let rider_id = format!("{}{rider_sub}", dispatch_engine::RiderId::PREFIX);
    assert_eq!(v["rider_id"], rider_id.as_str(), "{v}");
    let (st, v) = nodes[x]
        .post("/v1/drivers", Some(&driver), driver_body())
        .await;
    assert_eq!(
        st, 201,
        "the JWT driver registered on {}: {v}",
        JWT_NAMES[x]
    );
    assert!(forwarded(&nodes[x], "registration", "answered").await >= 2.0);
    // Asked again: what the owner answers to a second registration (409), there and here.
    for i in [x, o] {
        let (st, v) = nodes[i]
            .post("/v1/riders", Some(&rider), rider_body())
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (409, Some("conflict")),
            "the rider again on {}: {v}",
            JWT_NAMES[i]
        );
    }
    // The accounts work through any node.
    let quote = json!({"pickup": dispatch_tests::point(PICKUP), "dropoff": dispatch_tests::point(DROPOFF), "product": "economy"});
    for i in 0..3 {
        let (st, q) = nodes[i]
            .post("/v1/quotes", Some(&rider), quote.clone())
            .await;
        assert_eq!(st, 201, "the JWT rider's quote on {}: {q}", JWT_NAMES[i]);
        let (st, v) = nodes[i].get("/v1/drivers/me/earnings", Some(&driver)).await;
        assert_eq!(
            st, 200,
            "the JWT driver's earnings on {}: {v}",
            JWT_NAMES[i]
        );
    }

    // The limit, on X: its 3 registrations so far (2 forwarded, the 409) are the burst;
    // the next one from this address is 429 there and never reaches the owner.
    let answered = forwarded(&nodes[x], "registration", "answered").await;
    let late = rsa.sign(&idp::claims("rider", &subject_owned_by("rider", o, 3)));
    let (st, v) = nodes[x].post("/v1/riders", Some(&late), rider_body()).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "past the burst on {}: {v}",
        JWT_NAMES[x]
    );
    assert_eq!(register_rate_hits(&nodes[x]).await, 1.0);
    assert_eq!(
        forwarded(&nodes[x], "registration", "answered").await,
        answered,
        "a refused registration is not forwarded"
    );
    // The owner counted only the one registration asked of it (the 409): the forwarded
    // ones were X's to count. Its burst has BURST - 1 left for this address.
    assert_eq!(register_rate_hits(&nodes[o]).await, 0.0);
    for n in 1..BURST {
        let (st, v) = nodes[o].post("/v1/riders", None, rider_body()).await;
        assert_eq!(st, 201, "own registration {n} on the owner: {v}");
    }
    let (st, v) = nodes[o].post("/v1/riders", None, rider_body()).await;
    assert_eq!(st, 429, "the owner's own burst is spent: {v}");
    // T, asked nothing to register yet, forwards one of its own for this address.
    let (st, v) = nodes[t].post("/v1/riders", Some(&late), rider_body()).await;
    assert_eq!(
        st, 201,
        "the late rider registered on {}: {v}",
        JWT_NAMES[t]
    );
}
