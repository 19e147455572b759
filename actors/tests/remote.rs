//! Messages between nodes (issue 16, stage 3): two cluster nodes in this process, linked
//! by `ractor_cluster` over loopback TCP (`dispatch-cluster`'s membership, cookie
//! handshake and all), each with its own system, store and router. What one node sends
//! crosses the link, is decoded by the other's router and answered by its real actors.
//!
//! Every test has node names of its own (process groups are per process) and ports of
//! this helper's range (29500–29999), and the tests run one at a time ([`ONE_PAIR`]):
//! each `NodeServer` numbers its peers from 1, and ractor keeps remote actors' ids per
//! process, so two pairs at once in one process can mistake each other's remote actors
//! (seen: a reply lost when another test's node stopped).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{App, Node, WAIT, eventually, online_driver, rider};
use dispatch_actors::messages::{DriverMsg, NewTrip, SearchFilter, TripLink};
use dispatch_actors::remote::{
    self, CALL_VARIANT, CAST_VARIANT, CellCall, CellCast, DriverCall, DriverCast, Failure,
    MAX_INFLIGHT_PER_PEER, Outgoing, Remote, Reply, RiderCall, RiderCast, Routed, RoutedCall,
    TripCall, TripCast, WireCell,
};
use dispatch_actors::session::Outbound;
use dispatch_actors::views::{OfferView, TripView};
use dispatch_actors::{ApiError, System};
use dispatch_engine::{
    CancelledBy, DriverId, IndexedDriver, Point, Product, QuoteTerms, RiderId, Sender, TripCommand,
    TripId, TripState,
};
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{ActorRef, Message, RpcReplyPort};

/// Held by each test for its whole run: one pair of nodes in the process at a time.
static ONE_PAIR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two linked nodes `a` and `b`, each with a router allowing `max_inflight` per peer,
/// once each sees the other's router over the link.
async fn pair(a: (&str, u16), b: (&str, u16), max_inflight: (usize, usize)) -> (Node, Node) {
    let start = || async {
        let (sys, dir) = common::start_with(|c| c, None).await;
        (sys, dir, None)
    };
    let cookie = "remote-router-cookie-0123456789ab";
    common::pair((a, b), cookie, max_inflight, start).await
}

async fn stop(nodes: impl IntoIterator<Item = Node>) {
    common::stop_nodes(nodes).await
}

fn point(lat: f64, lng: f64) -> Point {
    Point::new(lat, lng).unwrap()
}

fn cell_of(sys: &System, p: Point) -> WireCell {
    WireCell(sys.config().grid.cell_of(p))
}

/// An online driver on `n` at `here`, once its cell's actor runs: that cell.
async fn indexed_driver(n: &Node, here: Point) -> WireCell {
    let _driver = online_driver(&n.sys, here.lat(), here.lng()).await;
    let cell = cell_of(&n.sys, here);
    eventually("the driver is indexed", || {
        n.sys.cell_ref(&cell.0).is_some()
    })
    .await;
    cell
}

async fn call_b(a: &Node, b: &str, msg: RoutedCall) -> Reply {
    remote::call(&a.remote, b, msg, None)
        .await
        .unwrap_or_else(|f| panic!("a call to {b} failed: {f}"))
}

fn offer(trip: &TripId, at: Point) -> OfferView {
    OfferView {
        trip_id: trip.clone(),
        pickup: at,
        dropoff: at,
        product: Product::Economy,
        fare_cents: 1_200,
        currency: "USD".into(),
        pickup_distance_m: 100,
        pickup_eta_s: 60,
        expires_at_ms: u64::MAX / 2,
        trace: None,
        queued_at: None,
    }
}

fn new_trip(rider: &RiderId, at: Point) -> NewTrip {
    NewTrip {
        trip_id: TripId::new(format!("trp_{}", rand::random::<u64>())),
        rider_id: rider.clone(),
        product: Product::Economy,
        pickup: at,
        dropoff: point(at.lat() + 0.02, at.lng()),
        terms: QuoteTerms {
            fare_cents: 1_500,
            currency: "USD".into(),
            surge: 1.0,
            distance_m: 2_000,
            duration_s: 300,
        },
        quote_id: None,
        ticket: None,
        trace: None,
        stages: None,
        quote_fence: None,
    }
}

/// Waits for a trip update of `trip` in `state` on `app`.
async fn trip_in(app: &mut App, trip: &TripId, state: TripState) -> TripView {
    match app
        .next_where(&format!("{trip} {state:?}"), |m| {
            matches!(m, Outbound::TripUpdate { trip: t, .. } if &t.trip_id == trip && t.state == state)
        })
        .await
    {
        Outbound::TripUpdate { trip, .. } => trip,
        _ => unreachable!(),
    }
}

/// Every kind of message that crosses goes from node a1 over the link to node b1's router
/// and reaches b1's real actors: the cell answers queries and counts, the driver reserves
/// an offer and shows it to its app, the supervisor starts a trip that tells its rider,
/// the trip takes an operator's and a rider's cancel. Every kind is timed once it is
/// delivered (casts, on b1) or answered (calls, on a1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_remote_kind_round_trips_through_the_other_nodes_router() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("a1", 29511), ("b1", 29512), (64, 64)).await;
    let here = point(45.5017, -73.5673);
    let (driver, mut dapp) = online_driver(&b.sys, here.lat(), here.lng()).await;
    let (rider1, mut rapp1) = rider(&b.sys).await;
    let (rider2, mut rapp2) = rider(&b.sys).await;
    let cell = cell_of(&b.sys, here);

    // Calls to the cell: the driver is indexed there, and found by a query.
    eventually("the driver is indexed", || {
        b.sys.cell_ref(&cell.0).is_some()
    })
    .await;
    assert_eq!(
        call_b(&a, "b1", RoutedCall::Cell(cell, CellCall::Count)).await,
        Reply::Count(1, 1)
    );
    let query = CellCall::Query {
        pickup: here,
        k: 5,
        max_radius_m: 5_000.0,
        filter: SearchFilter {
            product: Some(Product::Economy),
            available_only: true,
            exclude: Default::default(),
        },
        trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .to_owned()
            .try_into()
            .ok(),
    };
    match call_b(&a, "b1", RoutedCall::Cell(cell, query)).await {
        Reply::Candidates(found, examined) => {
            assert_eq!(examined, 1);
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].driver.driver_id, driver);
        }
        r => panic!("a query answered {r:?}"),
    }

    // Calls to the driver: its record (connected), an offer it holds and shows its app.
    match call_b(
        &a,
        "b1",
        RoutedCall::Driver(driver.clone(), DriverCall::Get),
    )
    .await
    {
        Reply::Driver(d) => {
            assert_eq!(d.id, driver);
            assert!(d.connected, "the driver's session is on b1");
            assert_eq!(d.cell, Some(cell));
        }
        r => panic!("a driver's get answered {r:?}"),
    }
    // The same call made from a local message: `forward` splits off its reply port, and
    // the answer comes back into it (the session stays on b1: none here).
    let (tx, rx) = ractor::concurrency::oneshot();
    let out = Outgoing::driver(driver.clone(), DriverMsg::Get(tx.into())).unwrap();
    remote::forward(&a.remote, "b1", out, None);
    let rec = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    assert_eq!((rec.id, rec.session.is_none()), (driver.clone(), true));
    let offered = TripId::new("trp_offered");
    let reserve = DriverCall::ReserveOffer(offer(&offered, here));
    assert_eq!(
        call_b(&a, "b1", RoutedCall::Driver(driver.clone(), reserve)).await,
        Reply::Reserved(true)
    );
    dapp.next_where(
        "the offer",
        |m| matches!(m, Outbound::Offer(o) if o.trip_id == offered),
    )
    .await;
    // Casts to the driver: the offer ends (its app is told), and the rest arrive.
    let to_driver = |m| Routed::Driver(driver.clone(), m);
    remote::send(
        &a.remote,
        "b1",
        to_driver(DriverCast::OfferEnded {
            trip_id: offered.clone(),
            notify: true,
            answers: None,
        }),
    )
    .unwrap();
    dapp.next_where(
        "offer_expired",
        |m| matches!(m, Outbound::OfferExpired { trip_id } if *trip_id == offered),
    )
    .await;
    let suspend = DriverCall::Suspend(false);
    match call_b(&a, "b1", RoutedCall::Driver(driver.clone(), suspend)).await {
        Reply::Suspended(Ok(d)) => assert_eq!(d.id, driver),
        r => panic!("a reinstatement answered {r:?}"),
    }

    // The supervisor's spawn: the trip starts on b1 and tells its rider there; it offers
    // itself to the driver (the only one near) and stays live while the offer is open.
    let t1 = new_trip(&rider1, here);
    assert_eq!(
        call_b(&a, "b1", RoutedCall::SpawnTrip(t1.clone())).await,
        Reply::Spawned(Ok(()))
    );
    let started = trip_in(&mut rapp1, &t1.trip_id, TripState::Dispatching).await;
    dapp.next_where(
        "t1's offer",
        |m| matches!(m, Outbound::Offer(o) if o.trip_id == t1.trip_id),
    )
    .await;
    match call_b(
        &a,
        "b1",
        RoutedCall::Trip(t1.trip_id.clone(), TripCall::Get),
    )
    .await
    {
        Reply::Trip(rec) => assert_eq!(rec.trip.id, t1.trip_id),
        r => panic!("a trip's get answered {r:?}"),
    }
    match call_b(&a, "b1", RoutedCall::Rider(rider1.clone(), RiderCall::Get)).await {
        Reply::Rider(r) => {
            assert_eq!(r.id, rider1);
            assert!(r.connected);
            assert_eq!(r.trip.map(|t| t.trip_id), Some(t1.trip_id.clone()));
        }
        r => panic!("a rider's get answered {r:?}"),
    }
    // Casts to the trip: a driver's location (not its driver: nothing to tell), then an
    // operator's cancel by call.
    remote::send(
        &a.remote,
        "b1",
        Routed::Trip(
            t1.trip_id.clone(),
            TripCast::DriverLocation {
                driver_id: driver.clone(),
                position: here,
                heading: Some(10.0),
            },
        ),
    )
    .unwrap();
    let cancel = TripCommand::Cancel {
        by: CancelledBy::Admin,
        reason: Some("remote".into()),
    };
    // An operator's cancel, as a cast (the admin routes run where the trip is: REST
    // calls are forwarded to its node, so no remote call carries it).
    let admin = TripCast::Command {
        cmd: cancel,
        from: Sender::Admin,
        ticket: None,
        trace: None,
        fence: None,
    };
    remote::send(&a.remote, "b1", Routed::Trip(t1.trip_id.clone(), admin)).unwrap();
    trip_in(&mut rapp1, &t1.trip_id, TripState::Cancelled).await;

    // A rider's cancel of a second trip, as a cast from the rider.
    let t2 = new_trip(&rider2, here);
    assert_eq!(
        call_b(&a, "b1", RoutedCall::SpawnTrip(t2.clone())).await,
        Reply::Spawned(Ok(()))
    );
    trip_in(&mut rapp2, &t2.trip_id, TripState::Dispatching).await;
    let rider_cancel = TripCast::Command {
        cmd: TripCommand::Cancel {
            by: CancelledBy::Rider,
            reason: None,
        },
        from: Sender::Rider,
        ticket: None,
        trace: None,
        fence: None,
    };
    remote::send(
        &a.remote,
        "b1",
        Routed::Trip(t2.trip_id.clone(), rider_cancel),
    )
    .unwrap();
    trip_in(&mut rapp2, &t2.trip_id, TripState::Cancelled).await;
    let far = point(46.8139, -71.2080);

    // The other casts, to actors for which they mean nothing now: each is delivered.
    let gone = TripId::new("trp_gone");
    let sends = [
        to_driver(DriverCast::Trip {
            view: Box::new(started.clone()),
            link: TripLink::Update,
            answers: None,
        }),
        to_driver(DriverCast::Answer {
            ticket: 999,
            outcome: Err(ApiError::conflict("remote")),
        }),
        to_driver(DriverCast::TripFailed(gone.clone())),
        to_driver(DriverCast::Reindex),
        Routed::Rider(
            rider1.clone(),
            RiderCast::TripStarted {
                view: started.clone(),
                ticket: None,
            },
        ),
        Routed::Rider(
            rider1.clone(),
            RiderCast::TripNotStarted {
                trip_id: gone.clone(),
                ticket: None,
                error: ApiError::unavailable("remote"),
            },
        ),
        Routed::Rider(
            rider1.clone(),
            RiderCast::Trip {
                view: started.clone(),
                receipt: None,
                answers: None,
            },
        ),
        Routed::Rider(
            rider1.clone(),
            RiderCast::DriverLocation {
                trip_id: gone.clone(),
                position: here,
                heading: None,
                pickup_eta_s: Some(30),
            },
        ),
        Routed::Rider(
            rider1.clone(),
            RiderCast::Answer {
                ticket: 999,
                outcome: Ok(()),
            },
        ),
        Routed::Rider(rider1.clone(), RiderCast::TripFailed(gone.clone())),
        // A driver entering a cell of b1 with no actor yet: the router starts it.
        Routed::Cell(
            cell_of(&b.sys, far),
            CellCast::Upsert {
                driver: IndexedDriver {
                    driver_id: DriverId::new("drv_remote"),
                    position: far,
                    heading: None,
                    product: Product::Economy,
                    available: true,
                },
                ping: false,
            },
        ),
    ];
    for m in sends {
        remote::send(&a.remote, "b1", m).unwrap();
    }
    let far_cell = cell_of(&b.sys, far);
    eventually("the upserted driver is in b1's cell", || {
        b.sys.cell_ref(&far_cell.0).is_some()
    })
    .await;
    assert_eq!(
        call_b(&a, "b1", RoutedCall::Cell(far_cell, CellCall::Count)).await,
        Reply::Count(1, 1)
    );
    let remove = Routed::Cell(far_cell, CellCast::Remove(DriverId::new("drv_remote")));
    remote::send(&a.remote, "b1", remove).unwrap();
    let b_metrics = b.remote.metrics().clone();
    eventually("the remove reached b1's cell", || {
        b_metrics.timed("cell_remove") == 1
    })
    .await;
    assert_eq!(
        call_b(&a, "b1", RoutedCall::Cell(far_cell, CellCall::Count)).await,
        Reply::Count(0, 0)
    );

    // Every kind crossed: calls timed where answered (a1), casts where delivered (b1).
    let calls = [
        "cell_query",
        "cell_count",
        "driver_reserve_offer",
        "driver_get",
        "driver_suspend",
        "rider_get",
        "trip_get",
        "spawn_trip",
    ];
    let casts: Vec<&str> = remote::KINDS
        .into_iter()
        .filter(|k| !calls.contains(k) && *k != "unknown")
        .collect();
    assert_eq!(casts.len(), 15);
    eventually("every cast is delivered on b1", || {
        casts.iter().all(|k| b_metrics.timed(k) >= 1)
    })
    .await;
    for k in calls {
        assert!(a.remote.metrics().timed(k) >= 1, "{k} was not answered");
    }
    for k in remote::KINDS {
        for c in remote::CAUSES {
            let n = a.remote.metrics().errors(k, c) + b_metrics.errors(k, c);
            assert_eq!(n, 0, "{k} failed: {c}");
        }
    }
    stop([a, b]).await;
}

/// A call the other node does not answer in time fails `Timeout` on the caller, counted;
/// one to a node that has gone fails (no router, or the link went away), counted too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_a_peer_that_does_not_answer_times_out_and_is_counted() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("a2", 29521), ("b2", 29522), (64, 64)).await;
    let cell = indexed_driver(&b, point(45.5017, -73.5673)).await;
    assert!(b.sys.stall_cell(cell.0, Duration::from_secs(3)));
    let count = || RoutedCall::Cell(cell, CellCall::Count);
    let r = remote::call(&a.remote, "b2", count(), Some(Duration::from_millis(300))).await;
    assert_eq!(r, Err(Failure::Timeout));
    assert_eq!(a.remote.metrics().errors("cell_count", "timeout"), 1);

    // b2 goes away: its router is no longer reachable, and a call says so at once.
    let Node { cluster, sys, .. } = b;
    cluster.stop().await;
    sys.shutdown().await;
    let a_metrics = a.remote.metrics().clone();
    let failed = |f: &Failure| {
        matches!(
            f,
            Failure::NoRoute(_) | Failure::PeerGone | Failure::Timeout
        )
    };
    let r = remote::call(&a.remote, "b2", count(), Some(Duration::from_millis(500))).await;
    assert!(
        r.as_ref().is_err_and(failed),
        "a call to a gone node: {r:?}"
    );
    let counted: u64 = ["no_route", "peer_gone", "timeout"]
        .iter()
        .map(|c| a_metrics.errors("cell_count", c))
        .sum();
    assert_eq!(
        counted, 2,
        "the timeout and the gone node, each counted once"
    );
    stop([a]).await;
}

/// A raw `ractor_cluster` frame of the test's own making, sent to a router over the link:
/// whatever variant and bytes the test chooses.
enum Raw {
    Cast(String, Vec<u8>),
    Call(String, Vec<u8>, RpcReplyPort<Vec<u8>>),
}

impl Message for Raw {
    fn serializable() -> bool {
        true
    }
    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        Ok(match self {
            Raw::Cast(variant, args) => SerializedMessage::Cast {
                variant,
                args,
                metadata: None,
            },
            Raw::Call(variant, args, reply) => SerializedMessage::Call {
                variant,
                args,
                reply,
                metadata: None,
            },
        })
    }
}

/// Frames that do not decode, or of a version this build does not know, are counted on
/// the router and dropped (a call answered `Malformed` / `Version`); the router goes on
/// answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_version_frames_are_counted_and_the_router_goes_on() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("a3", 29531), ("b3", 29532), (64, 64)).await;
    let router: ActorRef<Raw> = remote::router_of(&a.remote, "b3").unwrap().into();
    let m = b.remote.metrics().clone();

    router
        .cast(Raw::Cast(CAST_VARIANT.into(), b"{not json".to_vec()))
        .unwrap();
    router
        .cast(Raw::Cast(
            CAST_VARIANT.into(),
            br#"{"from":"a3","msg":{"Cell":[12,{"Remove":"d"}]}}"#.to_vec(),
        ))
        .unwrap();
    router
        .cast(Raw::Cast("dispatch.remote.cast.v2".into(), b"{}".to_vec()))
        .unwrap();
    eventually("the bad casts are counted", || {
        m.errors("unknown", "malformed") == 2 && m.errors("unknown", "version") == 1
    })
    .await;

    let ask = |variant: &str, args: &[u8]| {
        let (variant, args) = (variant.to_owned(), args.to_vec());
        let router = router.clone();
        async move {
            let bytes = router
                .call(|r| Raw::Call(variant, args, r), Some(WAIT))
                .await
                .unwrap()
                .unwrap();
            serde_json::from_slice::<Result<Reply, Failure>>(&bytes).unwrap()
        }
    };
    let r = ask(CALL_VARIANT, &[0xff, 0x00, 0x17]).await;
    assert!(matches!(r, Err(Failure::Malformed(_))), "{r:?}");
    let r = ask("dispatch.remote.call.v9", b"{}").await;
    assert!(matches!(r, Err(Failure::Version(v)) if v == "dispatch.remote.call.v9"));
    assert_eq!(m.errors("unknown", "malformed"), 3);
    assert_eq!(m.errors("unknown", "version"), 2);

    // A well-formed call after all that is answered.
    let cell = cell_of(&b.sys, point(45.5, -73.6));
    let ok = ask(
        CALL_VARIANT,
        &serde_json::to_vec(&remote::Envelope {
            from: "a3".to_owned(),
            msg: RoutedCall::Cell(cell, CellCall::Count),
        })
        .unwrap(),
    )
    .await;
    assert_eq!(ok, Ok(Reply::Count(0, 0)));
    stop([a, b]).await;
}

/// At most `max_inflight` calls wait per peer: on the caller (a4 allows 1) the next one
/// is refused at once; on the router (b4 allows 1 from each sender) the next one is
/// answered `Inflight` (`PeerInflight` to the caller). Each node counts its own bound in
/// `dispatch_bound_hits_total{bound="remote_inflight"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inflight_bound_refuses_and_counts_on_both_sides() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("a4", 29541), ("b4", 29542), (1, 1)).await;
    let cell = indexed_driver(&b, point(45.5017, -73.5673)).await;
    let count = move || RoutedCall::Cell(cell, CellCall::Count);
    let bound = |n: &Node| {
        n.sys
            .metrics()
            .bounds_hit
            .with_label_values(&["remote_inflight"])
            .get()
    };

    // The caller's side: one call waits on a stalled cell, the next is refused.
    assert!(b.sys.stall_cell(cell.0, Duration::from_secs(2)));
    let first = {
        let remote = a.remote.clone();
        tokio::spawn(async move { remote::call(&remote, "b4", count(), Some(WAIT)).await })
    };
    eventually("the first call is in flight", || {
        remote::in_flight(&a.remote, "b4") == (1, 0)
    })
    .await;
    let r = remote::call(&a.remote, "b4", count(), Some(WAIT)).await;
    assert_eq!(r, Err(Failure::Inflight));
    assert_eq!(a.remote.metrics().errors("cell_count", "inflight"), 1);
    assert_eq!(bound(&a), 1);
    // The first is answered once the cell wakes; the slot is free again.
    assert_eq!(first.await.unwrap(), Ok(Reply::Count(1, 1)));
    assert_eq!(remote::in_flight(&a.remote, "b4"), (0, 0));

    // The router's side: a second caller node's calls to b4, from a4's name, beyond one.
    assert!(b.sys.stall_cell(cell.0, Duration::from_secs(2)));
    let c_metrics = Arc::new(dispatch_actors::Metrics::new());
    let c = Remote::new(
        "a4",
        &c_metrics,
        Duration::from_secs(10),
        MAX_INFLIGHT_PER_PEER,
    );
    let first = {
        let remote = a.remote.clone();
        tokio::spawn(async move { remote::call(&remote, "b4", count(), Some(WAIT)).await })
    };
    eventually("the router serves the first", || {
        remote::in_flight(&b.remote, "a4") == (0, 1)
    })
    .await;
    // `c` is another sender named a4 (b4 itself, reaching its router locally): the router
    // counts per sender name.
    let r = remote::call(&c, "b4", count(), Some(WAIT)).await;
    assert_eq!(r, Err(Failure::PeerInflight));
    assert_eq!(c.metrics().errors("cell_count", "peer_inflight"), 1);
    assert_eq!(b.remote.metrics().errors("cell_count", "inflight"), 1);
    assert_eq!(bound(&b), 1);
    assert_eq!(first.await.unwrap(), Ok(Reply::Count(1, 1)));
    stop([a, b]).await;
}

/// A trip that is not on the node answers as a dead trip does: a driver's command is
/// answered `TripFailed` back on the driver's node (a1's router delivers it to the
/// driver's actor there), an operator's command `unavailable`, a read `not_here`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_not_on_the_node_answers_as_a_dead_trip() {
    let _one = ONE_PAIR.lock().await;
    let (a, b) = pair(("a5", 29551), ("b5", 29552), (64, 64)).await;
    let driver = common::register_driver(&a.sys, "D", common::rand_hash()).await;
    let nowhere = TripId::new("trp_nowhere");
    let accept = TripCast::Command {
        cmd: TripCommand::Accept {
            driver_id: driver.clone(),
        },
        from: Sender::Driver(driver.clone()),
        ticket: Some(1),
        trace: None,
        fence: None,
    };
    remote::send(&a.remote, "b5", Routed::Trip(nowhere.clone(), accept)).unwrap();
    let (am, bm) = (a.remote.metrics().clone(), b.remote.metrics().clone());
    eventually("the driver's node is told the trip failed", || {
        am.timed("driver_trip_failed") == 1
    })
    .await;
    assert_eq!(bm.errors("trip_command", "not_here"), 1);

    let get = RoutedCall::Trip(nowhere, TripCall::Get);
    assert_eq!(
        remote::call(&a.remote, "b5", get, None).await,
        Err(Failure::NotHere)
    );
    assert_eq!(am.errors("trip_get", "not_here"), 1);
    stop([a, b]).await;
}
