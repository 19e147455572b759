//! Storage by shard (issue 16, stage 2 of docs/sharding.md) against a real PostgreSQL
//! database (a fresh one per test on `DISPATCH_TEST_DATABASE_URL`; without it these skip
//! saying so, or fail when `CI` is set): each write lands under its shard and one shard
//! reads back alone, a driver shard finds the live trips naming its drivers and a rider
//! shard those of its riders, a node renews all its leases at once, and a driver's accept on a trip's shard is fenced on
//! the driver's shard too.

use std::collections::BTreeSet;
use std::time::Duration;

use dispatch_engine::{
    CancelledBy, Candidate, DispatchConfig, DriverId, DriverProfile, DriverStatus, IndexedDriver,
    Point, Product, QuoteId, RiderId, RiderProfile, StraightLineEta, Trip, TripCommand, TripId,
    Vehicle,
};
mod common;
use common::{trip, with_client as sql};
use dispatch_persistence::{
    Batch, Fence, Loaded, PgOptions, Store, StoreError, StoredDriver, StoredQuote, StoredRider,
    StoredTrip, WHOLE_CITY, codec,
};

fn open(url: &str) -> Store {
    let s = Store::open_postgres(PgOptions::new(url), |_| {}).unwrap();
    s.load().unwrap();
    s
}

fn here() -> Point {
    Point::new(45.5, -73.6).unwrap()
}

fn a_driver(id: &str) -> StoredDriver {
    StoredDriver {
        id: DriverId::new(id),
        profile: DriverProfile {
            name: id.to_uppercase(),
            vehicle: Vehicle {
                make: "Toyota".into(),
                model: "Prius".into(),
                plate: "S2".into(),
                color: "blue".into(),
                product: Product::Economy,
                seats: 4,
            },
        },
        token_hash: [2; 32],
        status: DriverStatus::Available,
        position: Some(here()),
        heading: None,
    }
}

fn a_rider(id: &str) -> StoredRider {
    StoredRider {
        id: RiderId::new(id),
        profile: RiderProfile {
            name: id.to_uppercase(),
            phone: "514".into(),
        },
        token_hash: [3; 32],
    }
}

fn a_quote(id: &str) -> StoredQuote {
    StoredQuote {
        quote_id: QuoteId::new(id),
        rider_id: RiderId::new("rdr_q"),
        product: Product::Economy,
        pickup: here(),
        dropoff: here(),
        fare_cents: 900,
        currency: "CAD".into(),
        surge: 1.0,
        distance_m: 1000,
        duration_s: 120,
        expires_at_ms: 9_999_999,
    }
}

fn apply(t: &mut Trip, cmd: TripCommand, at: u64) {
    t.apply(
        cmd,
        at,
        &DispatchConfig::default(),
        &StraightLineEta::default(),
    )
    .unwrap();
}

/// `id`, with an open offer to `driver`.
fn offered(id: &str, driver: &str) -> Trip {
    let mut t = trip(id);
    let c = Candidate {
        driver: IndexedDriver {
            driver_id: DriverId::new(driver),
            position: here(),
            heading: None,
            product: Product::Economy,
            available: true,
        },
        distance_m: 50.0,
    };
    apply(&mut t, TripCommand::Candidates(vec![c]), 1_100);
    assert_eq!(t.offer().map(|o| o.driver_id.as_str()), Some(driver));
    t
}

/// `id`, accepted by `driver`, then cancelled by its rider.
fn cancelled(id: &str, driver: &str) -> Trip {
    let mut t = accepted(id, driver);
    let cancel = TripCommand::Cancel {
        by: CancelledBy::Rider,
        reason: None,
    };
    apply(&mut t, cancel, 1_300);
    assert!(t.state().is_final());
    t
}

/// `id`, accepted by `driver`.
fn accepted(id: &str, driver: &str) -> Trip {
    let mut t = offered(id, driver);
    let driver_id = DriverId::new(driver);
    apply(&mut t, TripCommand::Accept { driver_id }, 1_200);
    t
}

fn stored(trip: Trip) -> StoredTrip {
    StoredTrip { trip, driver: None }
}

/// `trip`, requested by `rider` instead.
fn of(rider: &str, mut trip: Trip) -> Trip {
    trip.rider_id = RiderId::new(rider);
    trip
}

fn ids<T>(v: &[T], id: impl Fn(&T) -> String) -> BTreeSet<String> {
    v.iter().map(id).collect()
}

/// The ids of a shard's drivers, riders, quotes and trips.
fn contents(l: &Loaded) -> [BTreeSet<String>; 4] {
    [
        ids(&l.drivers, |d| d.id.to_string()),
        ids(&l.riders, |r| r.id.to_string()),
        ids(&l.quotes, |q| q.quote_id.to_string()),
        ids(&l.trips, |t| t.trip.id.to_string()),
    ]
}

fn set<const N: usize>(v: [&str; N]) -> BTreeSet<String> {
    v.into_iter().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn load_shard_returns_exactly_its_shards_records_in_pages_and_refuses_past_its_bound() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_load_shard") else {
        return;
    };
    let s = open(&url);
    let (a, b) = (7u64, 0x0863_2a10_7fff_ffff_u64);
    // More drivers in `a` than one page holds, so its read takes three pages.
    let many = dispatch_persistence::store::SHARD_PAGE * 2 + 5;
    let mut in_a = Batch::in_shard(a);
    for i in 0..many {
        in_a = in_a.driver(a_driver(&format!("drv_a{i:05}")));
    }
    let in_a = in_a
        .rider(a_rider("rdr_a"))
        .quote(a_quote("qte_a"))
        .trip(stored(trip("trp_a")), None);
    let in_b = Batch::in_shard(b)
        .driver(a_driver("drv_b"))
        .rider(a_rider("rdr_b"))
        .quote(a_quote("qte_b"))
        .trip(stored(trip("trp_b")), None);
    s.commit(in_a.append(in_b)).await.unwrap();
    s.commit(Batch::new().driver(a_driver("drv_city")))
        .await
        .unwrap();
    // A trip moves on under its shard: its journal entry lands there too, and the
    // shard reads it at its newest state.
    let acc = accepted("trp_a", "drv_a00000");
    let step = dispatch_persistence::Transition {
        from: dispatch_engine::TripState::Dispatching,
        to: acc.state(),
        by: dispatch_engine::trip::Mover::Driver(DriverId::new("drv_a00000")),
        at_ms: acc.updated_at_ms(),
        version: acc.version(),
    };
    s.commit(Batch::in_shard(a).trip(stored(acc.clone()), Some(step)))
        .await
        .unwrap();

    let la = tokio::task::block_in_place(|| s.load_shard(a, 100_000)).unwrap();
    let want: BTreeSet<String> = (0..many).map(|i| format!("drv_a{i:05}")).collect();
    assert_eq!(
        contents(&la),
        [want, set(["rdr_a"]), set(["qte_a"]), set(["trp_a"])]
    );
    assert_eq!(la.drivers.len(), many, "no driver read twice across pages");
    assert_eq!(la.trips[0].trip, acc, "the trip at its newest state");
    assert_eq!(la.journal_entries, 1);
    let lb = tokio::task::block_in_place(|| s.load_shard(b, usize::MAX)).unwrap();
    assert_eq!(
        contents(&lb),
        [
            set(["drv_b"]),
            set(["rdr_b"]),
            set(["qte_b"]),
            set(["trp_b"])
        ]
    );
    let city = tokio::task::block_in_place(|| s.load_shard(WHOLE_CITY, 100_000)).unwrap();
    assert_eq!(
        contents(&city),
        [set(["drv_city"]), set([]), set([]), set([])]
    );
    assert!(
        tokio::task::block_in_place(|| s.load_shard(12345, 10))
            .unwrap()
            .drivers
            .is_empty()
    );

    // The bound: every record of the shard, journal entries included.
    let total = many + 1 + 1 + 1 + 1;
    tokio::task::block_in_place(|| s.load_shard(a, total)).expect("exactly at the bound");
    match tokio::task::block_in_place(|| s.load_shard(a, total - 1)) {
        Err(StoreError::TooLarge { what, limit }) => {
            assert_eq!((what.as_str(), limit), ("shard 7", total - 1));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(s.reads_too_large(), 1, "the bound's hit is counted");
}

#[test]
fn on_sled_reads_by_shard_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), |_| {}).unwrap();
    assert!(matches!(
        s.load_shard(0, 10),
        Err(StoreError::Unsupported(_))
    ));
    assert!(matches!(
        s.live_trips_of(&[DriverId::new("drv_1")], 10),
        Err(StoreError::Unsupported(_))
    ));
    assert!(matches!(
        s.live_trips_of_riders(&[RiderId::new("rdr_1")], 10),
        Err(StoreError::Unsupported(_))
    ));
    assert!(matches!(
        s.renew_leases("n1", &[(0, 1)], Duration::from_secs(1)),
        Err(StoreError::Unsupported(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_trips_naming_a_set_of_drivers_are_found_whatever_their_shard() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_live_trips") else {
        return;
    };
    let s = open(&url);
    let done = cancelled("trp_done", "drv_3");
    s.commit(
        Batch::in_shard(5)
            .trip(stored(offered("trp_offer", "drv_1")), None)
            .then_in(6)
            .trip(stored(accepted("trp_ride", "drv_2")), None)
            .trip(stored(done), None)
            .trip(stored(accepted("trp_other", "drv_4")), None)
            .trip(stored(trip("trp_nobody")), None),
    )
    .await
    .unwrap();
    let asked = ["drv_1", "drv_2", "drv_3"].map(DriverId::new);
    let live = tokio::task::block_in_place(|| s.live_trips_of(&asked, 100)).unwrap();
    assert_eq!(
        ids(&live, |t| t.trip.id.to_string()),
        ["trp_offer".to_owned(), "trp_ride".to_owned()].into(),
        "an open offer and an accepted ride; not the final one, nor another driver's"
    );
    // The offer is accepted: still found, now as the trip's driver.
    s.commit(Batch::in_shard(5).trip(stored(accepted("trp_offer", "drv_1")), None))
        .await
        .unwrap();
    let live = tokio::task::block_in_place(|| s.live_trips_of(&asked[..1], 100)).unwrap();
    assert_eq!(
        ids(&live, |t| t.trip.id.to_string()),
        ["trp_offer".to_owned()].into()
    );
    // Bounded, in rows (one driver named by two live trips) and in drivers asked.
    s.commit(Batch::in_shard(8).trip(stored(offered("trp_more", "drv_2")), None))
        .await
        .unwrap();
    assert!(matches!(
        tokio::task::block_in_place(|| s.live_trips_of(&asked[1..2], 1)),
        Err(StoreError::TooLarge { limit: 1, .. })
    ));
    assert!(matches!(
        tokio::task::block_in_place(|| s.live_trips_of(&asked, 2)),
        Err(StoreError::TooLarge { limit: 2, .. })
    ));
    assert_eq!(s.reads_too_large(), 2, "both bounds' hits are counted");
    assert!(
        tokio::task::block_in_place(|| s.live_trips_of(&[], 1))
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_trips_of_a_set_of_riders_are_found_whatever_their_shard() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_live_trips_riders") else {
        return;
    };
    let s = open(&url);
    s.commit(
        Batch::in_shard(5)
            .trip(stored(of("rdr_a", trip("trp_asked"))), None)
            .then_in(6)
            .trip(stored(of("rdr_b", accepted("trp_ride", "drv_1"))), None)
            .trip(stored(of("rdr_c", cancelled("trp_done", "drv_2"))), None)
            .trip(stored(of("rdr_x", offered("trp_other", "drv_3"))), None)
            .then_in(7)
            // Written before migration 5 (their rider not known), before migration 4
            // (nothing known): made so below.
            .trip(stored(of("rdr_c", trip("trp_old"))), None)
            .trip(stored(of("rdr_x", trip("trp_old_other"))), None)
            .trip(stored(of("rdr_d", trip("trp_older"))), None)
            .trip(stored(of("rdr_y", trip("trp_older_other"))), None)
            .trip(
                stored(of("rdr_d", cancelled("trp_older_done", "drv_4"))),
                None,
            ),
    )
    .await
    .unwrap();
    let riders = sql(&url, |c| async move {
        c.batch_execute(
            "UPDATE trips SET rider = NULL WHERE k IN ('trp_old'::bytea, 'trp_old_other'::bytea); \
             UPDATE trips SET rider = NULL, driver = NULL, live = NULL \
             WHERE convert_from(k, 'UTF8') LIKE 'trp_older%'",
        )
        .await
        .unwrap();
        c.query(
            "SELECT convert_from(k, 'UTF8'), rider FROM trips ORDER BY k",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
        .collect::<Vec<_>>()
    });
    assert!(
        riders.contains(&("trp_ride".to_owned(), Some("rdr_b".to_owned()))),
        "every trip write names its rider: {riders:?}"
    );
    assert_eq!(riders.iter().filter(|r| r.1.is_none()).count(), 5);

    let asked = ["rdr_a", "rdr_b", "rdr_c", "rdr_d"].map(RiderId::new);
    let live = tokio::task::block_in_place(|| s.live_trips_of_riders(&asked, 100)).unwrap();
    assert_eq!(
        ids(&live, |t| t.trip.id.to_string()),
        set(["trp_asked", "trp_ride", "trp_old", "trp_older"]),
        "dispatching and accepted trips in two shards, and the rows from before decoded; \
         not the final ones, nor other riders'"
    );
    // The ride is finished: no longer found.
    let mut ride = of("rdr_b", accepted("trp_ride", "drv_1"));
    let cancel = TripCommand::Cancel {
        by: CancelledBy::Rider,
        reason: None,
    };
    apply(&mut ride, cancel, 1_300);
    s.commit(Batch::in_shard(6).trip(stored(ride), None))
        .await
        .unwrap();
    // Not even read: only the five rows not known yet are, within a bound of five.
    let live = tokio::task::block_in_place(|| s.live_trips_of_riders(&asked[1..2], 5)).unwrap();
    assert!(live.is_empty(), "{live:?}");
    // Bounded, in rows (rdr_a's live trip and the rows not known yet: six) and in riders
    // asked.
    assert!(matches!(
        tokio::task::block_in_place(|| s.live_trips_of_riders(&asked[..1], 5)),
        Err(StoreError::TooLarge { limit: 5, .. })
    ));
    assert_eq!(
        tokio::task::block_in_place(|| s.live_trips_of_riders(&asked[..1], 6))
            .unwrap()
            .len(),
        1
    );
    let many: Vec<RiderId> = (0..7).map(|i| RiderId::new(format!("rdr_n{i}"))).collect();
    assert!(matches!(
        tokio::task::block_in_place(|| s.live_trips_of_riders(&many, 5)),
        Err(StoreError::TooLarge { limit: 5, .. })
    ));
    assert_eq!(s.reads_too_large(), 2, "both bounds' hits are counted");
    assert!(
        tokio::task::block_in_place(|| s.live_trips_of_riders(&[], 10))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn renew_leases_renews_every_held_shard_at_once_and_leaves_out_the_lost() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_renew_leases") else {
        return;
    };
    let s = open(&url);
    let short = Duration::from_millis(400);
    let claim = |shard, holder| s.claim_lease(shard, holder, short).unwrap().unwrap().epoch;
    let e6 = claim(6, "n1");
    std::thread::sleep(short + Duration::from_millis(250));
    let (e1, e2, e3, e4) = (
        claim(1, "n1"),
        claim(2, "n1"),
        claim(3, "n1"),
        claim(4, "n2"),
    );
    s.release_lease(3, "n1", e3).unwrap();
    let e5 = claim(5, "n1");
    let renewed = s
        .renew_leases(
            "n1",
            &[
                (2, e2),
                (1, e1),
                (3, e3),
                (4, e4),
                (2, e2 + 1),
                (5, e5 + 1),
                (6, e6),
                (99, 1),
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(
        renewed,
        vec![1, 2],
        "held ones only: not a released or expired lease, another holder's, a wrong epoch, or none"
    );
    std::thread::sleep(short + Duration::from_millis(250));
    assert_eq!(
        s.claim_lease(1, "n3", short).unwrap(),
        None,
        "1 was renewed"
    );
    assert_eq!(
        s.claim_lease(2, "n3", short).unwrap(),
        None,
        "2 was renewed"
    );
    assert!(
        s.claim_lease(4, "n3", short).unwrap().is_some(),
        "4 was not"
    );
    assert!(s.renew_leases("n1", &[], short).unwrap().is_empty());
}

/// The sessions of this test's database that are inside a transaction, waiting on
/// their client: a commit held after its fence check (`Faults::hold_after_fence_check`).
fn held_commits(url: &str) -> i64 {
    sql(url, |c| async move {
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'idle in transaction'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_of_a_driver_shard_waits_for_an_accept_fenced_on_it_and_then_reads_it() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_accept_waits") else {
        return;
    };
    let (trip_shard, driver_shard) = (7u64, 42u64);
    // Node A owns the trip's shard; node B the driver's, with a lease that expires
    // while A's accept is in flight; node C claims the driver's shard next.
    let na = std::sync::Arc::new(open(&url));
    let ta = na
        .claim_lease(trip_shard, "na", Duration::from_secs(60))
        .unwrap()
        .unwrap();
    na.fence(trip_shard, ta.epoch, "na").unwrap();
    let nb = open(&url);
    let ttl = Duration::from_secs(2);
    let db = nb.claim_lease(driver_shard, "nb", ttl).unwrap().unwrap();
    na.commit(Batch::in_shard(trip_shard).trip(stored(offered("trp_1", "drv_1")), None))
        .await
        .unwrap();
    // The accept checks B's lease, then is held (past that lease's expiry) before it
    // commits.
    na.faults()
        .hold_after_fence_check(ttl + Duration::from_millis(1500));
    let accept = Batch::in_shard(trip_shard)
        .trip(stored(accepted("trp_1", "drv_1")), None)
        .requires(Fence {
            shard: driver_shard,
            epoch: db.epoch,
            holder: "nb".into(),
        });
    let in_flight = {
        let na = na.clone();
        tokio::spawn(async move { na.commit(accept).await })
    };
    while held_commits(&url) == 0 {
        assert!(!in_flight.is_finished(), "{:?}", in_flight.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nc = open(&url);
    let claimed = loop {
        if let Some(l) =
            tokio::task::block_in_place(|| nc.claim_lease(driver_shard, "nc", ttl)).unwrap()
        {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(claimed.epoch, db.epoch + 1);
    // The database's view (the client may hear of the commit a moment later).
    assert_eq!(
        held_commits(&url),
        0,
        "the claim got the driver's shard while an accept fenced on it was in flight"
    );
    let seen =
        tokio::task::block_in_place(|| nc.live_trips_of(&[DriverId::new("drv_1")], 10)).unwrap();
    in_flight
        .await
        .unwrap()
        .expect("the accept checked a live lease of the driver's shard (was this machine too slow to check it within 2 s?)");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].trip.driver_id().map(|d| d.as_str()),
        Some("drv_1"),
        "the new owner of the driver's shard reads the accept"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_foreign_fence_refuses_the_accept_and_nothing_of_it_is_written() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_stale_foreign") else {
        return;
    };
    let (trip_shard, driver_shard) = (7u64, 42u64);
    let long = Duration::from_secs(60);
    let s = open(&url);
    let old = s.claim_lease(driver_shard, "nb", long).unwrap().unwrap();
    s.release_lease(driver_shard, "nb", old.epoch).unwrap();
    let new = s.claim_lease(driver_shard, "nc", long).unwrap().unwrap();
    let offer = offered("trp_1", "drv_1");
    let accept = |holder: &str, epoch| {
        Batch::in_shard(trip_shard)
            .trip(stored(accepted("trp_1", "drv_1")), None)
            .requires(Fence {
                shard: driver_shard,
                epoch,
                holder: holder.into(),
            })
    };
    let refused = |r: Result<(), StoreError>| match r {
        Err(StoreError::Fenced(why)) => assert!(why.contains("shard 42"), "{why}"),
        other => panic!("expected Fenced, got {other:?}"),
    };
    let unchanged = |s: &Store| {
        assert_eq!(
            s.trip(&TripId::new("trp_1")).unwrap().map(|t| t.trip),
            Some(offer.clone()),
            "nothing of a refused accept was written"
        );
    };
    // Unfenced (one node) or fenced on the trip's shard: a required lease is checked.
    s.commit(Batch::in_shard(trip_shard).trip(stored(offer.clone()), None))
        .await
        .unwrap();
    refused(s.commit(accept("nb", old.epoch)).await);
    unchanged(&s);
    let na = open(&url);
    let ta = na.claim_lease(trip_shard, "na", long).unwrap().unwrap();
    na.fence(trip_shard, ta.epoch, "na").unwrap();
    refused(na.commit(accept("nb", old.epoch)).await);
    refused(na.commit(accept("nc", old.epoch)).await);
    unchanged(&na);
    assert_eq!(
        (na.fenced_in(driver_shard), na.fenced_in(trip_shard)),
        (2, 0)
    );
    // The live epoch's holder vouches: it lands.
    na.commit(accept("nc", new.epoch)).await.unwrap();
    assert_eq!(
        na.trip(&TripId::new("trp_1"))
            .unwrap()
            .and_then(|t| t.trip.driver_id().cloned()),
        Some(DriverId::new("drv_1"))
    );
}

/// Brings the empty database of `c` to schema `version` as that schema's dispatchd left
/// it: its migrations applied and recorded.
async fn at_schema(c: &tokio_postgres::Client, version: usize) {
    c.batch_execute(
        "CREATE TABLE dispatch_schema_migrations (version integer PRIMARY KEY, \
         name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    for (version, name, ddl) in &dispatch_persistence::pg::MIGRATIONS[..version] {
        c.batch_execute(ddl).await.unwrap();
        c.execute(
            "INSERT INTO dispatch_schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .unwrap();
    }
}

/// Stage 5's quote (docs/sharding.md §3): a trip's first write on the pickup's owner also
/// deletes the rider's quote in the rider's shard, which another node holds. Without that
/// node's fence, or with a stale one, nothing of it is written; under its live fence the
/// batch writes in that shard too, though this node holds no fence of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_writes_in_a_shard_whose_foreign_fence_it_requires_and_a_stale_one_writes_nothing()
{
    let Some(url) = dispatch_persistence::pg::test_database("shards_vouched_write") else {
        return;
    };
    let (trip_shard, rider_shard) = (7u64, 99u64);
    let long = Duration::from_secs(60);
    // Node R holds the rider's shard and wrote the quote; node B the pickup's shard.
    let nr = open(&url);
    let old = nr.claim_lease(rider_shard, "nr", long).unwrap().unwrap();
    nr.fence(rider_shard, old.epoch, "nr").unwrap();
    nr.commit(Batch::in_shard(rider_shard).quote(a_quote("qte_1")))
        .await
        .unwrap();
    let nb = open(&url);
    let tb = nb.claim_lease(trip_shard, "nb", long).unwrap().unwrap();
    nb.fence(trip_shard, tb.epoch, "nb").unwrap();
    let first = |required: Option<Fence>| {
        let b = Batch::in_shard(trip_shard)
            .trip(stored(offered("trp_1", "drv_1")), None)
            .then_in(rider_shard)
            .delete_quote(QuoteId::new("qte_1"));
        match required {
            Some(f) => b.requires(f),
            None => b,
        }
    };
    let fence = |holder: &str, epoch| Fence {
        shard: rider_shard,
        epoch,
        holder: holder.into(),
    };
    let unchanged = |s: &Store| {
        assert!(s.trip(&TripId::new("trp_1")).unwrap().is_none());
        let quotes = s.load_shard(rider_shard, 10).unwrap().quotes;
        assert_eq!(quotes.len(), 1, "the quote stays");
    };
    let fenced = |r: Result<(), StoreError>| match r {
        Err(StoreError::Fenced(why)) => assert!(why.contains("shard 99"), "{why}"),
        other => panic!("expected Fenced, got {other:?}"),
    };
    // No fence of the rider's shard: B's own check refuses it.
    fenced(nb.commit(first(None)).await);
    unchanged(&nb);
    // Another node takes the rider's shard: R's fence is stale.
    nr.release_lease(rider_shard, "nr", old.epoch).unwrap();
    let new = nb.claim_lease(rider_shard, "nr2", long).unwrap().unwrap();
    fenced(nb.commit(first(Some(fence("nr", old.epoch)))).await);
    unchanged(&nb);
    // The live holder's fence vouches: the trip and the quote's delete land together.
    nb.commit(first(Some(fence("nr2", new.epoch))))
        .await
        .unwrap();
    assert!(nb.trip(&TripId::new("trp_1")).unwrap().is_some());
    assert!(nb.load_shard(rider_shard, 10).unwrap().quotes.is_empty());
    assert_eq!(nb.fenced_in(rider_shard), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_4_applies_to_a_database_at_schema_3_with_rows_in_it() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_migration_4") else {
        return;
    };
    // A database as schema 3 left it, with rows written then.
    let live = accepted("trp_live", "drv_1");
    let done = cancelled("trp_done", "drv_2");
    let rows: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "drivers",
            b"drv_1".to_vec(),
            codec::encode(&a_driver("drv_1")),
        ),
        (
            "riders",
            b"rdr_1".to_vec(),
            codec::encode(&a_rider("rdr_1")),
        ),
        (
            "trips",
            b"trp_live".to_vec(),
            codec::encode(&stored(live.clone())),
        ),
        ("trips", b"trp_done".to_vec(), codec::encode(&stored(done))),
        (
            "quotes",
            b"qte_1".to_vec(),
            codec::encode(&a_quote("qte_1")),
        ),
    ];
    let columns = sql(&url, move |c| async move {
        at_schema(&c, 3).await;
        for (table, k, v) in &rows {
            c.execute(
                &format!("INSERT INTO {table} (k, v) VALUES ($1, $2)"),
                &[k, v],
            )
            .await
            .unwrap();
        }
        c.query(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'shard'",
            &[],
        )
        .await
        .unwrap()[0]
            .get::<_, i64>(0)
    });
    assert_eq!(columns, 1, "schema 3: only dispatch_leases has a shard");

    let s = open(&url);
    let all = tokio::task::block_in_place(|| s.load()).unwrap();
    assert_eq!(
        (
            all.drivers.len(),
            all.riders.len(),
            all.trips.len(),
            all.quotes.len()
        ),
        (1, 1, 2, 1)
    );
    let (version, shards, unknown) = sql(&url, |c| async move {
        let v: i32 = c
            .query_one("SELECT max(version) FROM dispatch_schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        let mut shards = Vec::new();
        for t in ["drivers", "riders", "trips", "quotes"] {
            for r in c
                .query(&format!("SELECT shard FROM {t}"), &[])
                .await
                .unwrap()
            {
                shards.push(r.get::<_, i64>(0));
            }
        }
        let unknown: i64 = c
            .query_one(
                "SELECT count(*) FROM trips WHERE live IS NULL AND driver IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (v, shards, unknown)
    });
    assert_eq!(version, dispatch_persistence::pg::schema_version());
    assert_eq!(shards, vec![0; 5], "existing rows are the whole city's");
    assert_eq!(
        unknown, 2,
        "what SQL cannot read of old trips is not made up"
    );
    let city = tokio::task::block_in_place(|| s.load_shard(WHOLE_CITY, 100)).unwrap();
    assert_eq!((city.drivers.len(), city.trips.len()), (1, 2));
    // An old live trip is found by its driver (decoded), an old final one is not.
    let found =
        tokio::task::block_in_place(|| s.live_trips_of(&["drv_1", "drv_2"].map(DriverId::new), 10))
            .unwrap();
    assert_eq!(
        ids(&found, |t| t.trip.id.to_string()),
        ["trp_live".to_owned()].into()
    );
    // Its next write fills the columns in.
    let mut arrived = live;
    apply(
        &mut arrived,
        TripCommand::Arrived {
            driver_id: DriverId::new("drv_1"),
        },
        1_400,
    );
    s.commit(Batch::new().trip(stored(arrived), None))
        .await
        .unwrap();
    let filled = sql(&url, |c| async move {
        let r = c
            .query_one(
                "SELECT driver, live FROM trips WHERE k = 'trp_live'::bytea",
                &[],
            )
            .await
            .unwrap();
        (r.get::<_, Option<String>>(0), r.get::<_, Option<bool>>(1))
    });
    assert_eq!(filled, (Some("drv_1".to_owned()), Some(true)));
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_5_applies_to_a_database_at_schema_4_with_rows_in_it() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_migration_5") else {
        return;
    };
    // A database as schema 4 left it, with trips written then: `driver` and `live`
    // known, no rider column.
    let live = of("rdr_1", accepted("trp_live", "drv_1"));
    // (k, v, driver, live)
    type Row = (Vec<u8>, Vec<u8>, Option<String>, bool);
    let rows: Vec<Row> = vec![
        (
            b"trp_live".to_vec(),
            codec::encode(&stored(live.clone())),
            Some("drv_1".into()),
            true,
        ),
        (
            b"trp_done".to_vec(),
            codec::encode(&stored(of("rdr_1", cancelled("trp_done", "drv_2")))),
            Some("drv_2".into()),
            false,
        ),
        (
            b"trp_other".to_vec(),
            codec::encode(&stored(of("rdr_2", trip("trp_other")))),
            None,
            true,
        ),
    ];
    let riders = sql(&url, move |c| async move {
        at_schema(&c, 4).await;
        for (k, v, driver, live) in &rows {
            c.execute(
                "INSERT INTO trips (k, v, shard, driver, live) VALUES ($1, $2, 9, $3, $4)",
                &[k, v, driver, live],
            )
            .await
            .unwrap();
        }
        c.query_one(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_name = 'trips' AND column_name = 'rider'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    });
    assert_eq!(riders, 0, "schema 4: trips have no rider column");

    let s = open(&url);
    assert_eq!(
        tokio::task::block_in_place(|| s.load())
            .unwrap()
            .trips
            .len(),
        3
    );
    let (version, unknown, index) = sql(&url, |c| async move {
        let v: i32 = c
            .query_one("SELECT max(version) FROM dispatch_schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
        let unknown: i64 = c
            .query_one("SELECT count(*) FROM trips WHERE rider IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        let index: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'trips_live_rider'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (v, unknown, index)
    });
    assert_eq!(version, 5);
    assert_eq!(
        unknown, 3,
        "what SQL cannot read of old trips is not made up"
    );
    assert_eq!(index, 1);
    // The old live trip is found by its rider (decoded); the old final one and another
    // rider's are not; the drivers' query is as before.
    let found = tokio::task::block_in_place(|| {
        s.live_trips_of_riders(&[RiderId::new("rdr_1"), RiderId::new("rdr_3")], 10)
    })
    .unwrap();
    assert_eq!(ids(&found, |t| t.trip.id.to_string()), set(["trp_live"]));
    let found =
        tokio::task::block_in_place(|| s.live_trips_of(&["drv_1", "drv_2"].map(DriverId::new), 10))
            .unwrap();
    assert_eq!(ids(&found, |t| t.trip.id.to_string()), set(["trp_live"]));
    // Its next write fills the rider in.
    let mut arrived = live;
    apply(
        &mut arrived,
        TripCommand::Arrived {
            driver_id: DriverId::new("drv_1"),
        },
        1_400,
    );
    s.commit(Batch::in_shard(9).trip(stored(arrived), None))
        .await
        .unwrap();
    let filled = sql(&url, |c| async move {
        c.query_one("SELECT rider FROM trips WHERE k = 'trp_live'::bytea", &[])
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
    });
    assert_eq!(filled.as_deref(), Some("rdr_1"));
}

#[test]
fn claim_leases_claims_the_free_and_expired_keeps_its_own_and_leaves_out_the_others() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_claim_leases") else {
        return;
    };
    let s = open(&url);
    let short = Duration::from_millis(300);
    let long = Duration::from_secs(60);
    // 1: n2's, live. 2: n2's, expired. 3: n1's own, live. 4: never claimed.
    s.claim_lease(1, "n2", long).unwrap().unwrap();
    let e2 = s.claim_lease(2, "n2", short).unwrap().unwrap().epoch;
    let e3 = s.claim_lease(3, "n1", long).unwrap().unwrap().epoch;
    std::thread::sleep(short + Duration::from_millis(200));
    let got = s.claim_leases("n1", &[4, 3, 2, 1, 4], long).unwrap();
    let got: Vec<(u64, u64, &str)> = got
        .iter()
        .map(|l| {
            assert!(l.remaining > Duration::from_secs(50), "{l:?}");
            (l.shard, l.epoch, l.holder.as_str())
        })
        .collect();
    assert_eq!(
        got,
        vec![(2, e2 + 1, "n1"), (3, e3, "n1"), (4, 1, "n1")],
        "the expired one with a new epoch, its own as it was, the new one; not n2's live one, no duplicate"
    );
    assert!(s.claim_leases("n1", &[], long).unwrap().is_empty());
    // Of two holders claiming the same free shards at once, each shard goes to one.
    let shards: Vec<u64> = (100..400).collect();
    let (a, b) = std::thread::scope(|t| {
        let a = t.spawn(|| s.claim_leases("na", &shards, long).unwrap());
        let b = t.spawn(|| s.claim_leases("nb", &shards, long).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let a: BTreeSet<u64> = a.iter().map(|l| l.shard).collect();
    let b: BTreeSet<u64> = b.iter().map(|l| l.shard).collect();
    assert!(a.is_disjoint(&b));
    assert_eq!(a.len() + b.len(), shards.len());

    // One statement against one call per shard, for 300 free shards (docs/sharding.md §4).
    let many: Vec<u64> = (1_000..1_300).collect();
    let t0 = std::time::Instant::now();
    assert_eq!(s.claim_leases("n1", &many, long).unwrap().len(), many.len());
    let batched = t0.elapsed();
    let t0 = std::time::Instant::now();
    for shard in 2_000..2_300 {
        s.claim_lease(shard, "n1", long).unwrap().unwrap();
    }
    let one_by_one = t0.elapsed();
    eprintln!("claiming 300 shards: one statement {batched:?}, one by one {one_by_one:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trip_shards_lists_the_cell_shards_trips_are_in_and_refuses_past_its_bound() {
    let Some(url) = dispatch_persistence::pg::test_database("shards_trip_shards") else {
        return;
    };
    let s = open(&url);
    let (a, b) = (0x0862_8d55_ffff_ffff_u64, 0x0863_2a10_7fff_ffff_u64);
    s.commit(
        Batch::in_shard(a)
            .trip(stored(trip("trp_a1")), None)
            .trip(stored(trip("trp_a2")), None)
            .then_in(b)
            .trip(stored(trip("trp_b")), None)
            .then_in(7)
            .trip(stored(trip("trp_7")), None)
            .then_in(12345)
            .driver(a_driver("drv_c")),
    )
    .await
    .unwrap();
    s.commit(Batch::new().trip(stored(trip("trp_city")), None))
        .await
        .unwrap();
    let found = tokio::task::block_in_place(|| s.trip_shards(256, 10)).unwrap();
    assert_eq!(found, vec![a, b], "the cell shards with trips, once each");
    assert_eq!(
        tokio::task::block_in_place(|| s.trip_shards(0, 10)).unwrap(),
        vec![7, a, b]
    );
    tokio::task::block_in_place(|| s.trip_shards(256, 2)).expect("exactly at the bound");
    // The bound plus one (what the query asks for) does not overflow.
    assert_eq!(
        tokio::task::block_in_place(|| s.trip_shards(256, i64::MAX as usize)).unwrap(),
        vec![a, b]
    );
    match tokio::task::block_in_place(|| s.trip_shards(256, 1)) {
        Err(StoreError::TooLarge { limit: 1, .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(s.reads_too_large(), 1);
}
