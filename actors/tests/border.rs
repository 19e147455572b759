//! Across nodes and borders (issue 16 stage 5, docs/sharding.md §5): two sharded systems
//! in this process, linked by `ractor_cluster` over loopback TCP (`dispatch-cluster`'s
//! membership, as `remote.rs`), each with its router, and a shard map set by hand: a
//! search on A asks the cells of B's shard through B's router, under its one deadline.
//!
//! The rides: a request on A offers B's driver through B's router, and the driver's accept
//! crosses back carrying B's fence of the driver's shard, under which A commits it (real
//! PostgreSQL, one database for both nodes; without `DISPATCH_TEST_DATABASE_URL` these
//! skip saying so, or fail when `CI` is set).
//!
//! Ports of this file's own range (29300–29349, and 31450–31451); one pair at a time ([`ONE_PAIR`], see
//! `remote.rs`). The search tests use sled stores (a search writes nothing).

mod common;

use std::time::{Duration, Instant};

use common::{
    App, Node, WAIT, driver_cmd, eventually, hold, online_driver, pg_system, request, rider,
    stored_state,
};
use dispatch_actors::messages::{CellMsg, DriverCommand, DriverMsg};
use dispatch_actors::placement::{Place, ShardMap};
use dispatch_actors::records::Identity;
use dispatch_actors::remote;
use dispatch_actors::session::Outbound;
use dispatch_actors::views::OfferView;
use dispatch_actors::{ErrorCode, System, SystemConfig};
use dispatch_engine::shard::{ShardId, WHOLE_CITY, entity_shard, shard_of_point};
use dispatch_engine::{CellId, DriverId, DriverStatus, Point, Product, RiderId, TripId, TripState};
use dispatch_persistence::{PgOptions, Store};
use ractor::ActorRef;

const COOKIE: &str = "border-router-cookie-0123456789ab";

static ONE_PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the border search for the test's points starts.
const P1: (f64, f64) = (45.50, -73.57);
/// How long a search waits at most on node A.
const SEARCH_TIMEOUT_MS: u64 = 400;

fn sharded(c: SystemConfig) -> SystemConfig {
    SystemConfig {
        sharded: true,
        search_timeout_ms: SEARCH_TIMEOUT_MS,
        ..c
    }
}

/// Two linked sharded nodes, each serving every entity shard (its sessions attach), on
/// sled stores of their own, or both on the PostgreSQL database `pg`.
async fn pair(a: (&str, u16), b: (&str, u16), pg: Option<&str>) -> (Node, Node) {
    pair_tuned(a, b, pg, sharded).await
}

/// [`pair`] with each node's configuration made by `tune`.
async fn pair_tuned(
    a: (&str, u16),
    b: (&str, u16),
    pg: Option<&str>,
    tune: fn(SystemConfig) -> SystemConfig,
) -> (Node, Node) {
    let start = || async move {
        let (sys, dir, store) = match pg {
            None => {
                let (sys, dir) = common::start_with(tune, None).await;
                (sys, dir, None)
            }
            Some(url) => {
                let (sys, store) = pg_system(url, tune).await;
                (sys, tempfile::tempdir().unwrap(), Some(store))
            }
        };
        for s in 1..=256 {
            sys.set_serving(s, true);
        }
        (sys, dir, store)
    };
    let max = remote::MAX_INFLIGHT_PER_PEER;
    common::pair((a, b), COOKIE, (max, max), start).await
}

async fn stop(nodes: impl IntoIterator<Item = Node>) {
    common::stop_nodes(nodes).await
}

fn point((lat, lng): (f64, f64)) -> Point {
    Point::new(lat, lng).unwrap()
}

fn shard_at(sys: &System, p: Point) -> ShardId {
    shard_of_point(sys.config().grid, p)
}

/// Two points ~60 m apart on either side of the first shard border east of P1 (in 20 m
/// steps): the pickup (A's shard) and the driver's place (B's shard).
fn across_the_border(sys: &System) -> (Point, Point) {
    let at = |i: i32| point((P1.0, P1.1 + f64::from(i) * 0.00026));
    let home = shard_at(sys, at(0));
    let i = (1..1_000)
        .find(|&i| shard_at(sys, at(i)) != home)
        .expect("a shard border within 20 km");
    (at(i - 2), at(i + 1))
}

fn timeouts(sys: &System) -> u64 {
    sys.metrics()
        .bounds_hit
        .with_label_values(&["cell_query_timeout"])
        .get()
}

/// An online driver on B across the border from A's pickup, once B's cell indexes it:
/// the pickup, the driver's place, its cell and its app.
async fn driver_across(a: &Node, b: &Node) -> (Point, Point, CellId, App) {
    let (pickup, beyond) = across_the_border(&a.sys);
    let (_d, app) = online_driver(&b.sys, beyond.lat(), beyond.lng()).await;
    let cell = b.sys.config().grid.cell_of(beyond);
    eventually("the driver is indexed on B", || {
        b.sys.cell_ref(&cell).is_some()
    })
    .await;
    (pickup, beyond, cell, app)
}

/// A's map: the pickup's shard here, the one across the border on B.
fn place(a: &System, b_name: &str, (pickup, beyond): (Point, Point)) -> ShardMap {
    ShardMap::new([
        (shard_at(a, pickup), Place::Local),
        (shard_at(a, beyond), Place::Remote(b_name.into())),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_search_from_a_finds_bs_drivers_in_bs_cells_and_is_counted() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("border-a1", 29301), ("border-b1", 29302), None).await;
    let (pickup, beyond, cell, _app) = driver_across(&a, &b).await;
    assert!(
        a.sys.cell_ref(&cell).is_none(),
        "A runs no actor of B's cell"
    );

    // No shard map: every cell is asked here, and A has no drivers.
    let found = a.sys.nearby(pickup, 5_000.0, 5, None).await;
    assert!(found.is_empty(), "without a placement nothing crosses");
    assert_eq!(a.sys.metrics().search_cross_border.get(), 0);

    a.sys
        .set_placement(Some(place(&a.sys, "border-b1", (pickup, beyond))));
    let found = a.sys.nearby(pickup, 5_000.0, 5, None).await;
    assert_eq!(found.len(), 1, "B's driver, found from A in B's cell");
    assert!(found[0].position.distance_m(beyond) < 1.0);
    assert_eq!(a.sys.metrics().search_cross_border.get(), 1);
    assert_eq!(timeouts(&a.sys), 0);
    stop([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_cell_that_does_not_answer_is_left_out_within_the_deadline_and_counted() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("border-a2", 29303), ("border-b2", 29304), None).await;
    let (pickup, beyond, cell, _app) = driver_across(&a, &b).await;
    a.sys
        .set_placement(Some(place(&a.sys, "border-b2", (pickup, beyond))));

    // B's cell stops answering for longer than A's search waits.
    let stall = Duration::from_millis(3 * SEARCH_TIMEOUT_MS);
    b.sys
        .cell_ref(&cell)
        .unwrap()
        .cast(CellMsg::InjectStall(stall))
        .unwrap();
    let started = Instant::now();
    let found = a.sys.nearby(pickup, 5_000.0, 5, None).await;
    let took = started.elapsed();
    assert!(found.is_empty(), "the stalled cell is left out");
    assert!(
        took < Duration::from_millis(SEARCH_TIMEOUT_MS + 200),
        "the search ends at its deadline, took {took:?}"
    );
    assert_eq!(timeouts(&a.sys), 1, "the late remote cell is counted");
    assert_eq!(a.sys.metrics().search_cross_border.get(), 1);

    // Once it answers again, it is found.
    tokio::time::sleep(stall).await;
    let found = a.sys.nearby(pickup, 5_000.0, 5, None).await;
    assert_eq!(found.len(), 1);
    stop([a, b]).await;
}

/// Each node's map places the pickup's shard on A and the one across the border on B;
/// B's driver online at the pickup: its cell is A's, so A indexes it. The pickup, the
/// place across the border, the driver, its app and its cell.
async fn b_driver_in_a_cell(
    (a, b): (&Node, &Node),
    (a_name, b_name): (&str, &str),
) -> (Point, Point, DriverId, App, CellId) {
    let (pickup, beyond) = across_the_border(&a.sys);
    let (home, there) = (shard_at(&a.sys, pickup), shard_at(&a.sys, beyond));
    a.sys
        .set_placement(Some(place(&a.sys, b_name, (pickup, beyond))));
    b.sys.set_placement(Some(ShardMap::new([
        (home, Place::Remote(a_name.into())),
        (there, Place::Local),
    ])));
    let (d, app) = online_driver(&b.sys, pickup.lat(), pickup.lng()).await;
    let cell = a.sys.config().grid.cell_of(pickup);
    eventually("A's cell indexes B's driver", || {
        a.sys.cell_ref(&cell).is_some()
    })
    .await;
    (pickup, beyond, d, app, cell)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_driver_of_b_is_indexed_in_the_cells_owner_and_moves_across_the_border() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("border-a5", 29309), ("border-b5", 29310), None).await;
    let (pickup, beyond, d, mut app, cell) =
        b_driver_in_a_cell((&a, &b), ("border-a5", "border-b5")).await;
    assert!(b.sys.cell_ref(&cell).is_none());
    assert_eq!(a.sys.nearby(pickup, 5_000.0, 5, None).await.len(), 1);

    // It drives across the border: out of A's cell, into B's, still found from A.
    let to = DriverCommand::Location {
        position: beyond,
        heading: None,
    };
    driver_cmd(&b.sys, &d, &mut app, to).await;
    let far = b.sys.config().grid.cell_of(beyond);
    eventually("B's cell indexes it", || b.sys.cell_ref(&far).is_some()).await;
    // The Remove crosses the link as a cast: A's cell lets it go soon after.
    let (a_cell, until) = (a.sys.cell_ref(&cell).unwrap(), Instant::now() + WAIT);
    while common::ask(&a_cell, CellMsg::Count).await != (0, 0) {
        assert!(Instant::now() < until, "A's cell never let it go");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let found = a.sys.nearby(pickup, 5_000.0, 5, None).await;
    assert_eq!(found.len(), 1);
    assert!(found[0].position.distance_m(beyond) < 1.0);
    stop([a, b]).await;
}

/// B's driver indexed in A's cell leaves it when B ends the driver's shard (handed to
/// another node): the Remove crosses the link, so A's cell does not go on offering a
/// driver whose actor is gone from B (its `ReserveOffer` would find no actor there).
/// Ports 31450–31451 (session 29's range for this fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_driver_whose_shard_ends_on_b_leaves_a_s_cell() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("border-a6", 31450), ("border-b6", 31451), None).await;
    let (pickup, _, d, _app, cell) = b_driver_in_a_cell((&a, &b), ("border-a6", "border-b6")).await;
    let a_cell = a.sys.cell_ref(&cell).unwrap();
    let until = Instant::now() + WAIT;
    while common::ask(&a_cell, CellMsg::Count).await != (1, 1) {
        assert!(Instant::now() < until, "A's cell never indexed it");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let ended = b.sys.end_shard(entity_shard(d.as_str())).await;
    assert_eq!(ended.drivers, 1);
    let until = Instant::now() + WAIT;
    while common::ask(&a_cell, CellMsg::Count).await != (0, 0) {
        assert!(
            Instant::now() < until,
            "A's cell still offers a driver whose shard ended on B"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(a.sys.nearby(pickup, 5_000.0, 5, None).await.is_empty());
    stop([a, b]).await;
}

/// Polls `cell`'s count (available, all) until it is `want`, failing after `within`.
async fn counts(cell: &ActorRef<CellMsg>, want: (usize, usize), within: Duration, what: &str) {
    let until = Instant::now() + within;
    loop {
        let count = common::ask(cell, CellMsg::Count).await;
        if count == want {
            return;
        }
        assert!(Instant::now() < until, "never happened: {what} ({count:?})");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Detaches `app`'s session from B's driver `d` (indexed still, its grace timer armed):
/// its actor.
async fn detached(sys: &System, d: &DriverId, app: &App) -> ActorRef<DriverMsg> {
    sys.detach(&Identity::Driver(d.clone()), app.handle.id);
    let actor = sys.driver_ref(d).unwrap();
    let rec = common::ask(&actor, DriverMsg::Get).await;
    assert!(rec.session.is_none() && rec.status.is_indexed());
    actor
}

/// The session grace period of [`a_driver_started_on_demand_with_no_session_leaves_a_s_cell`].
const GRACE: Duration = Duration::from_millis(1_000);

/// After its node was killed (no `end_shard`: its actor and its app's session are gone,
/// and nobody took it out of A's cell), B's driver is started again on demand by its
/// shard's owner (B here, standing for the node that took the shard over), from its
/// record, with no session: as a routed offer or call for it starts it. It is refused
/// every offer, and it leaves A's cell within the grace period; an on-demand start used
/// to arm no grace timer (only a restarted actor did), so A's cell went on offering a
/// driver with no session for good. Ports 31500–31501 (session 29's range for this fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_driver_started_on_demand_with_no_session_leaves_a_s_cell() {
    let _one = ONE_PAIR.lock().await;
    let tune = |c| SystemConfig {
        session_grace_ms: GRACE.as_millis() as u64,
        ..sharded(c)
    };
    let (a, b) = pair_tuned(("border-a7", 31500), ("border-b7", 31501), None, tune).await;
    let (pickup, _, d, app, cell) = b_driver_in_a_cell((&a, &b), ("border-a7", "border-b7")).await;
    let a_cell = a.sys.cell_ref(&cell).unwrap();
    counts(&a_cell, (1, 1), WAIT, "A's cell indexes it").await;

    // The session goes, then the actor with its grace timer, and no one tells A's cell.
    let first = detached(&b.sys, &d, &app).await;
    first.stop(Some("its node was killed".into()));
    first.wait(Some(WAIT)).await.unwrap();
    eventually("the actor is gone", || b.sys.driver_ref(&d).is_none()).await;
    let count = common::ask(&a_cell, CellMsg::Count).await;
    assert_eq!(count, (1, 1), "the ghost is still in A's cell");

    // Started on demand: indexed again from its record, with no session.
    let started = Instant::now();
    let again = b
        .sys
        .wake_driver(&d)
        .await
        .expect("started from its record");
    let offer = OfferView {
        trip_id: TripId::new("trp_ghost"),
        pickup,
        dropoff: pickup,
        product: Product::Economy,
        fare_cents: 1_000,
        currency: "USD".into(),
        pickup_distance_m: 0,
        pickup_eta_s: 0,
        expires_at_ms: u64::MAX,
        trace: None,
        queued_at: None,
    };
    let held = common::ask(&again, |r| DriverMsg::ReserveOffer(offer, r)).await;
    assert!(!held, "a driver with no session is never offered a trip");

    // Within the grace period (and a margin for the Remove's crossing), A lets it go.
    let within = (GRACE + Duration::from_secs(3)).saturating_sub(started.elapsed());
    let what = "A's cell lets the driver with no session go after its on-demand start";
    counts(&a_cell, (0, 0), within, what).await;
    let rec = common::ask(&again, DriverMsg::Get).await;
    assert_eq!(rec.status, DriverStatus::Offline);
    assert!(a.sys.nearby(pickup, 5_000.0, 5, None).await.is_empty());
    stop([a, b]).await;
}

/// A trip on A finds B's driver in A's cell, but the driver has no session on B (its app
/// was on a node that was killed, and B, its shard's owner now, has its actor from a
/// stale record): B refuses the offer, and A's trip takes the driver out of the cell it
/// found it in, at once and counted, so no other trip is offered it; the driver's own
/// actor could not (it may be indexed elsewhere from a stale stored position), and its
/// grace period (30 s here) is far off. Before, every trip near it offered it again, a
/// waiting trip at every poll. Ports 31502–31503 (session 29's range for this fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_driver_who_refuses_an_offer_for_want_of_a_session_leaves_the_cell_it_was_found_in() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("border-a8", 31502), ("border-b8", 31503), None).await;
    let (pickup, beyond, d, app, cell) =
        b_driver_in_a_cell((&a, &b), ("border-a8", "border-b8")).await;
    let a_cell = a.sys.cell_ref(&cell).unwrap();
    counts(&a_cell, (1, 1), WAIT, "A's cell indexes it").await;
    detached(&b.sys, &d, &app).await;

    // A routes the driver's shard to B, serves the pickup's, and its rider is its own.
    let sd = entity_shard(d.as_str());
    let (r, mut r_app) = loop {
        let (r, app) = rider(&a.sys).await;
        if entity_shard(r.as_str()) != sd {
            break (r, app);
        }
    };
    let (home, there) = (shard_at(&a.sys, pickup), shard_at(&a.sys, beyond));
    a.sys.set_serving(home, true);
    a.sys.set_placement(Some(ShardMap::new([
        (home, Place::Local),
        (there, Place::Remote("border-b8".into())),
        (sd, Place::Remote("border-b8".into())),
    ])));
    request(&a.sys, &r, &mut r_app, pickup.lat(), pickup.lng()).await;
    let what = "A's cell lets a driver go who refused its offer for want of a session";
    counts(&a_cell, (0, 0), Duration::from_secs(3), what).await;
    let counted = a
        .sys
        .metrics()
        .bounds_hit
        .with_label_values(&["offer_refused_unindexed"]);
    assert_eq!(counted.get(), 1);
    let refused = a.sys.metrics().offers.with_label_values(&["refused"]).get();
    assert_eq!(refused, 1, "offered once, refused once");
    assert!(a.sys.nearby(pickup, 5_000.0, 5, None).await.is_empty());
    stop([a, b]).await;
}

/// B is killed with two of its drivers indexed in A's cell (no `end_shard` takes them
/// out). A's map changes: the first driver's shard leaves B (nobody holds it until its
/// lease runs out, then its new owner), the second's stays. A's cell lets the first go
/// at once, counted, and keeps the second; before, it offered the first for good (its
/// new owner may index it elsewhere, from its last stored position). Ports 31504–31505.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drivers_of_a_shard_that_leaves_its_node_leave_the_cells_of_the_others() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("border-a9", 31504), ("border-b9", 31505), None).await;
    let (pickup, beyond, d, _app, cell) =
        b_driver_in_a_cell((&a, &b), ("border-a9", "border-b9")).await;
    let sd = entity_shard(d.as_str());
    let (d2, mut app2) = loop {
        let (d2, app) = online_driver(&b.sys, pickup.lat(), pickup.lng()).await;
        if entity_shard(d2.as_str()) != sd {
            break (d2, app);
        }
    };
    let a_cell = a.sys.cell_ref(&cell).unwrap();
    counts(&a_cell, (2, 2), WAIT, "A's cell indexes both").await;

    let (home, there) = (shard_at(&a.sys, pickup), shard_at(&a.sys, beyond));
    let b_node = || Place::Remote("border-b9".into());
    let with_sd = |p: Place| {
        ShardMap::new([
            (home, Place::Local),
            (there, b_node()),
            (entity_shard(d2.as_str()), b_node()),
            (sd, p),
        ])
    };
    a.sys.set_placement(Some(with_sd(b_node())));
    let forgotten = || {
        (a.sys.metrics().bounds_hit)
            .with_label_values(&["cell_entry_owner_left"])
            .get()
    };
    assert_eq!(forgotten(), 0, "an unchanged map forgets nobody");
    // B is killed: its lease on `sd` runs out, nobody holds it.
    a.sys.set_placement(Some(with_sd(Place::Nobody)));
    let what = "A's cell lets the driver of the shard that left B go";
    counts(&a_cell, (1, 1), Duration::from_secs(3), what).await;
    assert_eq!(forgotten(), 1);
    assert_eq!(a.sys.nearby(pickup, 5_000.0, 5, None).await.len(), 1);
    // The one left is the other shard's driver: it goes when that driver goes offline.
    driver_cmd(&b.sys, &d2, &mut app2, DriverCommand::GoOffline).await;
    counts(
        &a_cell,
        (0, 0),
        WAIT,
        "the other shard's driver was the one kept",
    )
    .await;
    assert_eq!(forgotten(), 1);
    stop([a, b]).await;
}

/// A ride's cast on two PostgreSQL nodes: B's driver `d` online across the border, A's
/// rider `r` (of another entity shard); A holds the pickup's shard, the rider's and the
/// city's, B the driver's cell shard and the driver's; each node's map places the other's.
struct Ride {
    a: Node,
    b: Node,
    d: DriverId,
    d_app: App,
    r: RiderId,
    r_app: App,
    /// Where the rider is picked up.
    pickup: Point,
    /// The driver's shard, and B's epoch of it.
    sd: (ShardId, u64),
}

async fn ride(url: &str, names: (&str, &str), ports: (u16, u16)) -> Ride {
    let (a, b) = pair((names.0, ports.0), (names.1, ports.1), Some(url)).await;
    let (pickup_at, beyond) = across_the_border(&a.sys);
    let (d, d_app) = online_driver(&b.sys, beyond.lat(), beyond.lng()).await;
    let sd = entity_shard(d.as_str());
    let (r, r_app) = loop {
        let (r, app) = rider(&a.sys).await;
        if entity_shard(r.as_str()) != sd {
            break (r, app);
        }
    };
    let (pickup, there) = (shard_at(&a.sys, pickup_at), shard_at(&a.sys, beyond));
    let sr = entity_shard(r.as_str());
    hold(
        a.store.as_ref().unwrap(),
        &[WHOLE_CITY, pickup, sr].into(),
        names.0,
    );
    let epochs = hold(b.store.as_ref().unwrap(), &[there, sd].into(), names.1);
    // A serves the pickup's shard: its owner starts trips there only while it does.
    a.sys.set_serving(pickup, true);
    let remote = |n: &str| Place::Remote(n.into());
    a.sys.set_placement(Some(ShardMap::new([
        (pickup, Place::Local),
        (sr, Place::Local),
        (there, remote(names.1)),
        (sd, remote(names.1)),
    ])));
    b.sys.set_placement(Some(ShardMap::new([
        (there, Place::Local),
        (sd, Place::Local),
        (pickup, remote(names.0)),
        (sr, remote(names.0)),
    ])));
    Ride {
        a,
        b,
        d,
        d_app,
        r,
        r_app,
        pickup: pickup_at,
        sd: (sd, epochs[&sd]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_on_a_offers_bs_driver_and_the_accept_commits_under_bs_fence() {
    let Some(url) = dispatch_persistence::pg::test_database("actors_border_accept") else {
        return;
    };
    let _one = ONE_PAIR.lock().await;
    let mut w = ride(&url, ("border-a3", "border-b3"), (29305, 29306)).await;
    let t = request(&w.a.sys, &w.r, &mut w.r_app, w.pickup.lat(), w.pickup.lng()).await;
    assert_eq!(w.d_app.offer().await, t, "B's driver is offered A's trip");
    driver_cmd(
        &w.b.sys,
        &w.d,
        &mut w.d_app,
        DriverCommand::Accept(t.clone()),
    )
    .await;

    let store = w.a.store.clone().unwrap();
    assert_eq!(
        stored_state(&store, &t),
        (TripState::DriverAssigned, Some(w.d.clone()))
    );
    let refused =
        w.a.sys
            .metrics()
            .shard_refused
            .with_label_values(&["accept_unfenced"])
            .get();
    assert_eq!(refused, 0, "the accept carried B's fence");
    assert!(w.a.sys.metrics().search_cross_border.get() >= 1);
    stop([w.a, w.b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_accept_with_a_stale_fence_is_refused_and_nothing_of_it_is_written() {
    let Some(url) = dispatch_persistence::pg::test_database("actors_border_stale") else {
        return;
    };
    let _one = ONE_PAIR.lock().await;
    let mut w = ride(&url, ("border-a4", "border-b4"), (29307, 29308)).await;
    let t = request(&w.a.sys, &w.r, &mut w.r_app, w.pickup.lat(), w.pickup.lng()).await;
    assert_eq!(w.d_app.offer().await, t);

    // Another node takes the driver's shard: B's fence of it is stale now.
    let (sd, epoch) = w.sd;
    tokio::task::block_in_place(|| {
        let b_store = w.b.store.as_ref().unwrap();
        b_store.release_lease(sd, "border-b4", epoch).unwrap();
        let other = Store::open_postgres(PgOptions::new(&url), |_| {}).unwrap();
        let l = other
            .claim_lease(sd, "border-c4", Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!(l.epoch, epoch + 1);
    });
    let req = w.d_app.drive(
        &w.b.sys.driver_ref(&w.d).unwrap(),
        DriverCommand::Accept(t.clone()),
    );
    match w
        .d_app
        .next_where("the accept's answer", |m| matches!(m, Outbound::Error { req: Some(q), .. } | Outbound::Ack { req: q } if *q == req))
        .await
    {
        Outbound::Error { error, .. } => assert_eq!(error.code, ErrorCode::Unavailable),
        m => panic!("the accept was taken: {m:?}"),
    }
    let store = w.a.store.clone().unwrap();
    assert!(store.fenced_in(sd) >= 1, "refused for the driver's shard");
    assert_eq!(stored_state(&store, &t), (TripState::Dispatching, None));
    let history = tokio::task::block_in_place(|| store.history(&t)).unwrap();
    assert!(
        history.iter().all(|h| h.to != TripState::DriverAssigned),
        "{history:?}"
    );
    stop([w.a, w.b]).await;
}
