//! A rider's trip spawned on the pickup's owner (issue 16 stage 5, docs/sharding.md §5):
//! two sharded systems in this process on one PostgreSQL database, linked by
//! `ractor_cluster` over loopback TCP, each with its router and a shard map set by hand.
//! The rider is on A (A holds its entity shard); the pickup's cell shard and the driver
//! are B's. A's request is a call to B's router, the trip runs on B and writes in B's
//! shard, its casts to the rider come back through A's router, and the rider's cancel
//! crosses the other way. A quote (A's shard) is deleted by the trip's first write on B
//! under A's fence of the rider's shard, which the spawn carries.
//!
//! Real PostgreSQL: without `DISPATCH_TEST_DATABASE_URL` these skip saying so, or fail
//! when `CI` is set. Ports of this file's own range (29350–29399); one pair at a time
//! ([`ONE_PAIR`], see `remote.rs`).

mod common;

use std::time::{Duration, Instant};

use common::{
    App, Node, WAIT, driver_cmd, hold, online_driver, pg_system, request, rider, stored_state,
};
use dispatch_actors::messages::{DriverCommand, RideRequest, RiderCommand};
use dispatch_actors::placement::{Place, ShardMap};
use dispatch_actors::remote;
use dispatch_actors::session::Outbound;
use dispatch_actors::{ApiError, ErrorCode, System, SystemConfig};
use dispatch_engine::shard::{ShardId, WHOLE_CITY, entity_shard, shard_of_point};
use dispatch_engine::{DriverId, Point, Product, QuoteId, RiderId, TripId, TripState};
use dispatch_persistence::{PgOptions, Store};

const COOKIE: &str = "spawn-router-cookie-0123456789abc";

static ONE_PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The pickup (its cell shard is B's).
const PICKUP: (f64, f64) = (45.50, -73.57);

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

fn point((lat, lng): (f64, f64)) -> Point {
    Point::new(lat, lng).unwrap()
}

/// Two linked sharded nodes on the PostgreSQL database `url`, each serving every entity
/// shard (its sessions attach).
async fn pair(url: &str, a: (&str, u16), b: (&str, u16)) -> (Node, Node) {
    let start = || async {
        let (sys, store) = pg_system(url, |c| SystemConfig { sharded: true, ..c }).await;
        for s in 1..=256 {
            sys.set_serving(s, true);
        }
        (sys, tempfile::tempdir().unwrap(), Some(store))
    };
    let max = remote::MAX_INFLIGHT_PER_PEER;
    common::pair((a, b), COOKIE, (max, max), start).await
}

/// A rider on A, the pickup's shard and a driver there on B.
struct World {
    a: Node,
    b: Node,
    names: (&'static str, &'static str),
    d: DriverId,
    d_app: App,
    r: RiderId,
    r_app: App,
    pickup: Point,
    /// The pickup's cell shard (B's).
    ps: ShardId,
    /// The rider's entity shard (A's), and A's epoch of it.
    sr: (ShardId, u64),
}

impl World {
    fn a_store(&self) -> &Store {
        self.a.store.as_deref().unwrap()
    }

    /// The trips the store holds in the pickup's shard.
    fn trips_in_pickup_shard(&self) -> Vec<TripId> {
        let loaded = tokio::task::block_in_place(|| self.a_store().load_shard(self.ps, 1_000));
        loaded
            .unwrap()
            .trips
            .into_iter()
            .map(|t| t.trip.id)
            .collect()
    }

    /// A's map (`pickup` where it is given) and B's.
    fn place(&self, pickup: Option<Place>) {
        let (a_name, b_name) = self.names;
        let sd = entity_shard(self.d.as_str());
        let mut on_a = vec![
            (WHOLE_CITY, Place::Local),
            (self.sr.0, Place::Local),
            (sd, Place::Remote(b_name.into())),
        ];
        on_a.extend(pickup.map(|p| (self.ps, p)));
        self.a.sys.set_placement(Some(ShardMap::new(on_a)));
        self.b.sys.set_placement(Some(ShardMap::new([
            (self.ps, Place::Local),
            (sd, Place::Local),
            (self.sr.0, Place::Remote(a_name.into())),
            (WHOLE_CITY, Place::Remote(a_name.into())),
        ])));
    }
}

async fn world(url: &str, names: (&str, &str), ports: (u16, u16)) -> World {
    let (a, b) = pair(url, (names.0, ports.0), (names.1, ports.1)).await;
    let pickup = point(PICKUP);
    let ps = shard_of_point(a.sys.config().grid, pickup);
    // B's driver at the pickup: its cell (the pickup's shard) is indexed on B.
    let (d, d_app) = online_driver(&b.sys, pickup.lat(), pickup.lng()).await;
    let sd = entity_shard(d.as_str());
    let (r, r_app) = loop {
        let (r, app) = rider(&a.sys).await;
        if entity_shard(r.as_str()) != sd {
            break (r, app);
        }
    };
    let sr = entity_shard(r.as_str());
    let epochs = hold(a.store.as_ref().unwrap(), &[WHOLE_CITY, sr].into(), names.0);
    hold(b.store.as_ref().unwrap(), &[ps, sd].into(), names.1);
    // B serves the pickup's shard (its cell shard); A does not.
    b.sys.set_serving(ps, true);
    let w = World {
        a,
        b,
        names: (leak(names.0), leak(names.1)),
        d,
        d_app,
        r,
        r_app,
        pickup,
        ps,
        sr: (sr, epochs[&sr]),
    };
    w.place(Some(Place::Remote(w.names.1.into())));
    w
}

/// Sends the rider's request on A; its answer (the trip's first update, or an error).
async fn ask_ride(w: &mut World, ride: RideRequest) -> Outbound {
    let a = w.a.sys.rider_ref(&w.r).unwrap();
    let req = w.r_app.ride(&a, RiderCommand::RequestRide(ride));
    w.r_app
        .next_where("the request's answer", |m| matches!(m, Outbound::TripUpdate { req: Some(q), .. } | Outbound::Error { req: Some(q), .. } if *q == req))
        .await
}

fn refused(m: Outbound) -> ApiError {
    match m {
        Outbound::Error { error, .. } => error,
        m => panic!("the request was taken: {m:?}"),
    }
}

/// The rider cancels `t` on A; waits for the trip's end and the cancel's ack.
async fn cancel(w: &mut World, t: &TripId) {
    let a = w.a.sys.rider_ref(&w.r).unwrap();
    let cmd = RiderCommand::CancelRide {
        trip_id: t.clone(),
        reason: Some("changed plans".into()),
    };
    let req = w.r_app.ride(&a, cmd);
    // The transition comes first, then the cancel's ack (under its ticket).
    w.r_app.trip_in(TripState::Cancelled).await;
    w.r_app.acked(req).await;
}

fn refusals(sys: &System, cause: &str) -> u64 {
    sys.metrics()
        .shard_refused
        .with_label_values(&[cause])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_riders_trip_runs_on_the_pickups_owner_and_the_rider_follows_and_cancels_it() {
    let Some(url) = dispatch_persistence::pg::test_database("actors_spawn_ride") else {
        return;
    };
    let _one = ONE_PAIR.lock().await;
    let mut w = world(&url, ("spawn-a1", "spawn-b1"), (29351, 29352)).await;
    let (pickup, r) = (w.pickup, w.r.clone());
    let t = request(&w.a.sys, &r, &mut w.r_app, pickup.lat(), pickup.lng()).await;

    // The trip's actor is on B, its rows in B's shard; A asked once, through B's router.
    assert!(w.b.sys.trip_ref(&t).is_some(), "the trip runs on B");
    assert!(w.a.sys.trip_ref(&t).is_none(), "and not on A");
    assert_eq!(w.trips_in_pickup_shard(), vec![t.clone()]);
    assert_eq!(w.a.remote.metrics().timed("spawn_trip"), 1);

    // Offered to B's driver; the accept's transition reaches the rider on A.
    assert_eq!(w.d_app.offer().await, t);
    let accept = DriverCommand::Accept(t.clone());
    driver_cmd(&w.b.sys, &w.d, &mut w.d_app, accept).await;
    w.r_app.trip_in(TripState::DriverAssigned).await;
    let a_rider = w.a.sys.rider_ref(&r).unwrap();
    let seen = common::ask(&a_rider, dispatch_actors::messages::RiderMsg::Get).await;
    assert_eq!(seen.trip.map(|v| v.state), Some(TripState::DriverAssigned));

    // The rider's cancel crosses to B; its ack comes back to the rider's session.
    cancel(&mut w, &t).await;
    let store = w.a.store.clone().unwrap();
    assert_eq!(stored_state(&store, &t).0, TripState::Cancelled);
    assert!(w.b.remote.metrics().timed("trip_command") >= 1);

    // The rider is free again: a second trip starts on B too.
    let t2 = request(&w.a.sys, &r, &mut w.r_app, pickup.lat(), pickup.lng()).await;
    assert!(w.b.sys.trip_ref(&t2).is_some());

    // B lets the pickup's shard go (its trip actors stop; the rider is not told): the
    // rider's cancel reaches B's router, which finds no trip, reads its rider from the
    // store and answers at once (live: `unavailable`, retry), well before the ticket
    // would expire.
    w.b.sys.end_shard(w.ps).await;
    assert!(w.b.sys.trip_ref(&t2).is_none());
    let cmd = RiderCommand::CancelRide {
        trip_id: t2.clone(),
        reason: None,
    };
    let started = Instant::now();
    let req = w.r_app.ride(&a_rider, cmd);
    let answer = w
        .r_app
        .next_where("the cancel's answer", |m| matches!(m, Outbound::Error { req: Some(q), .. } | Outbound::Ack { req: q } if *q == req))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(refused(answer).code, ErrorCode::Unavailable);
    common::stop_nodes([w.a, w.b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_pickup_node_refuses_or_is_unreachable_is_unavailable_and_writes_nothing() {
    let Some(url) = dispatch_persistence::pg::test_database("actors_spawn_refused") else {
        return;
    };
    let _one = ONE_PAIR.lock().await;
    let mut w = world(&url, ("spawn-a2", "spawn-b2"), (29353, 29354)).await;
    let direct = RideRequest::Direct {
        pickup: w.pickup,
        dropoff: point((PICKUP.0 + 0.02, PICKUP.1)),
        product: Product::Economy,
    };

    // B does not serve the pickup's shard (yet): it refuses the spawn, counted.
    w.b.sys.set_serving(w.ps, false);
    let e = refused(ask_ride(&mut w, direct.clone()).await);
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert_eq!(refusals(&w.b.sys, "not_served"), 1);

    // The pickup's shard placed on a node no router answers for.
    w.place(Some(Place::Remote("spawn-ghost".into())));
    let e = refused(ask_ride(&mut w, direct.clone()).await);
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    let no_route = w.a.remote.metrics().errors("spawn_trip", "no_route");
    assert_eq!(no_route, 1);

    // No node holds the pickup's shard.
    w.place(None);
    let e = refused(ask_ride(&mut w, direct.clone()).await);
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert_eq!(refusals(&w.a.sys, "no_owner"), 1);

    // A's map names A as the pickup's owner, and A does not serve it (not yet, or no
    // longer: `end_shard` stops serving first, then stops the shard's trips, and a trip
    // started in between would outlive its shard here): none starts on A, counted.
    w.place(Some(Place::Local));
    let e = refused(ask_ride(&mut w, direct.clone()).await);
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert_eq!(refusals(&w.a.sys, "start_not_served"), 1);

    // Nothing was written, and no trip runs on either node.
    assert!(w.trips_in_pickup_shard().is_empty());
    let a_rider = w.a.sys.rider_ref(&w.r).unwrap();
    let seen = common::ask(&a_rider, dispatch_actors::messages::RiderMsg::Get).await;
    assert!(seen.trip.is_none());

    // Once B serves it, the same rider's request starts there.
    w.b.sys.set_serving(w.ps, true);
    w.place(Some(Place::Remote(w.names.1.into())));
    match ask_ride(&mut w, direct).await {
        Outbound::TripUpdate { trip, .. } => {
            assert!(w.b.sys.trip_ref(&trip.trip_id).is_some());
            assert_eq!(w.trips_in_pickup_shard(), vec![trip.trip_id]);
        }
        m => panic!("the request was refused: {m:?}"),
    }
    common::stop_nodes([w.a, w.b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quote_buys_one_remote_trip_and_a_stale_rider_fence_writes_nothing() {
    let Some(url) = dispatch_persistence::pg::test_database("actors_spawn_quote") else {
        return;
    };
    let _one = ONE_PAIR.lock().await;
    let mut w = world(&url, ("spawn-a3", "spawn-b3"), (29355, 29356)).await;
    let dropoff = point((PICKUP.0 + 0.02, PICKUP.1));
    let quote = |w: &World| {
        let (sys, r) = (w.a.sys.clone(), w.r.clone());
        let pickup = w.pickup;
        async move {
            sys.quote(r, pickup, dropoff, Product::Economy)
                .await
                .unwrap()
        }
    };
    let stored_quotes = |w: &World| -> Vec<QuoteId> {
        let loaded = tokio::task::block_in_place(|| w.a_store().load_shard(w.sr.0, 1_000));
        loaded
            .unwrap()
            .quotes
            .into_iter()
            .map(|q| q.quote_id)
            .collect()
    };

    // The quote's trip starts on B at the quote's fare, and the quote is gone from A's
    // shard with the trip's first write.
    let q = quote(&w).await;
    assert_eq!(stored_quotes(&w), vec![q.quote_id.clone()]);
    let t = match ask_ride(&mut w, RideRequest::Quote(q.quote_id.clone())).await {
        Outbound::TripUpdate { trip, .. } => {
            assert_eq!(trip.quote_fare_cents, q.fare_cents);
            trip.trip_id
        }
        m => panic!("the quoted request was refused: {m:?}"),
    };
    assert!(w.b.sys.trip_ref(&t).is_some());
    assert!(stored_quotes(&w).is_empty(), "the quote went with the trip");

    // It bought one trip: asked again (once the first is cancelled), it is not found.
    cancel(&mut w, &t).await;
    let e = refused(ask_ride(&mut w, RideRequest::Quote(q.quote_id.clone())).await);
    assert_eq!(e.code, ErrorCode::NotFound, "{e:?}");
    assert_eq!(w.trips_in_pickup_shard(), vec![t.clone()]);

    // Another node takes the rider's shard: A's fence of it, which the spawn carries, is
    // stale, and B's first write of the trip (with the quote's delete) is refused whole.
    let q2 = quote(&w).await;
    let (sr, epoch) = w.sr;
    tokio::task::block_in_place(|| {
        w.a_store().release_lease(sr, w.names.0, epoch).unwrap();
        let other = Store::open_postgres(PgOptions::new(&url), |_| {}).unwrap();
        let l = other
            .claim_lease(sr, "spawn-c3", Duration::from_secs(60))
            .unwrap()
            .unwrap();
        assert_eq!(l.epoch, epoch + 1);
    });
    let e = refused(ask_ride(&mut w, RideRequest::Quote(q2.quote_id.clone())).await);
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    let b_store = w.b.store.clone().unwrap();
    assert!(b_store.fenced_in(sr) >= 1, "refused for the rider's shard");
    assert_eq!(w.trips_in_pickup_shard(), vec![t], "no second trip written");
    assert_eq!(
        stored_quotes(&w),
        vec![q2.quote_id.clone()],
        "the quote stays"
    );

    // B reads the failed trip back as never stored and tells the rider on A, through
    // A's router: the rider is free to ask again (until then: `conflict`, its one active
    // trip), and the quote is its again (asked with it, B refuses the stale fence again,
    // rather than A answering `not_found`).
    let until = Instant::now() + WAIT;
    let e = loop {
        let e = refused(ask_ride(&mut w, RideRequest::Quote(q2.quote_id.clone())).await);
        if e.code != ErrorCode::Conflict || Instant::now() > until {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert_eq!(w.trips_in_pickup_shard().len(), 1);
    assert_eq!(stored_quotes(&w), vec![q2.quote_id]);
    common::stop_nodes([w.a, w.b]).await;
}
