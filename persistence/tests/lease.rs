//! Shard leases and fencing (issue 16) against a real PostgreSQL database (a fresh one
//! per test on `DISPATCH_TEST_DATABASE_URL`; without it these skip saying so, or fail
//! when `CI` is set): one holder at a time, epochs that only rise, renewals only by the
//! holder of the live epoch, and a fenced store whose late writes are refused whole.

use std::sync::Arc;
use std::time::Duration;

use dispatch_engine::{DriverId, DriverProfile, DriverStatus, Point, Product, Vehicle};
use dispatch_persistence::{Batch, PgOptions, Store, StoreError, StoredDriver};

fn open(url: &str) -> Store {
    let s = Store::open_postgres(PgOptions::new(url), |_| {}).unwrap();
    s.load().unwrap();
    s
}

fn driver(i: u32, name: &str) -> StoredDriver {
    StoredDriver {
        id: DriverId::new(format!("drv_{i}")),
        profile: DriverProfile {
            name: name.into(),
            vehicle: Vehicle {
                make: "Kia".into(),
                model: "Niro".into(),
                plate: "P".into(),
                color: "red".into(),
                product: Product::Economy,
                seats: 4,
            },
        },
        token_hash: [1; 32],
        status: DriverStatus::Available,
        position: Some(Point::new(45.5, -73.6).unwrap()),
        heading: None,
    }
}

const TTL: Duration = Duration::from_millis(400);

/// Sleeps past `TTL` by the test's clock; the database's clock runs at the same rate.
fn past_ttl() {
    std::thread::sleep(TTL + Duration::from_millis(250));
}

#[test]
fn one_holder_at_a_time_and_every_new_claim_raises_the_epoch() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_one_holder") else {
        return;
    };
    let s = open(&url);
    let a = s.claim_lease(0, "n1", TTL).unwrap().expect("a free lease");
    assert_eq!((a.shard, a.epoch, a.holder.as_str()), (0, 1, "n1"));
    assert!(a.remaining > Duration::ZERO && a.remaining <= TTL);
    // Live: another holder gets nothing; the holder gets its own lease back, same epoch.
    assert_eq!(s.claim_lease(0, "n2", TTL).unwrap(), None);
    assert_eq!(
        s.claim_lease(0, "n1", TTL).unwrap().map(|l| l.epoch),
        Some(1)
    );
    // Shards are independent.
    assert_eq!(
        s.claim_lease(7, "n2", TTL).unwrap().map(|l| l.epoch),
        Some(1)
    );
    // Renewed by its holder only, with its epoch only.
    assert!(s.renew_lease(0, "n1", 1, TTL).unwrap());
    assert!(!s.renew_lease(0, "n2", 1, TTL).unwrap());
    assert!(!s.renew_lease(0, "n1", 2, TTL).unwrap());
    // Expired: the next claimer gets a higher epoch, and the old holder cannot renew.
    past_ttl();
    assert!(
        !s.renew_lease(0, "n1", 1, TTL).unwrap(),
        "an expired lease is not renewed"
    );
    let b = s
        .claim_lease(0, "n2", TTL)
        .unwrap()
        .expect("an expired lease");
    assert_eq!((b.epoch, b.holder.as_str()), (2, "n2"));
    // A release by the old holder changes nothing; by the holder, it frees it at once.
    s.release_lease(0, "n1", 1).unwrap();
    assert_eq!(s.claim_lease(0, "n3", TTL).unwrap(), None);
    s.release_lease(0, "n2", 2).unwrap();
    let c = s
        .claim_lease(0, "n3", TTL)
        .unwrap()
        .expect("a released lease");
    assert_eq!(c.epoch, 3);
    let all = s.leases().unwrap();
    assert_eq!(
        all.iter()
            .map(|l| (l.shard, l.epoch, l.holder.as_str()))
            .collect::<Vec<_>>(),
        vec![(0, 3, "n3"), (7, 1, "n2")]
    );
}

#[test]
fn of_concurrent_claimers_of_a_free_lease_exactly_one_wins() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_concurrent_claims") else {
        return;
    };
    let s = Arc::new(open(&url));
    // A lease long enough that every claim of a round comes within it however slow
    // this machine is; the winner releases it for the next round.
    let ttl = Duration::from_secs(60);
    for round in 0..5u64 {
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (s, barrier) = (s.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    s.claim_lease(0, &format!("n{i}"), ttl).unwrap()
                })
            })
            .collect();
        let won: Vec<_> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(won.len(), 1, "round {round}: winners {won:?}");
        assert_eq!(won[0].epoch, round + 1, "one epoch per claim");
        s.release_lease(0, &won[0].holder, won[0].epoch).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_store_writes_while_it_holds_the_lease_and_nothing_after() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_fenced_writes") else {
        return;
    };
    let old = open(&url);
    let lease = old.claim_lease(0, "n1", TTL).unwrap().unwrap();
    old.fence(0, lease.epoch, "n1").unwrap();
    old.commit(Batch::new().driver(driver(1, "written under the lease")))
        .await
        .expect("a write under a live lease");
    assert_eq!(old.fenced(), 0);

    // The lease runs out (a pause, a cut) and another node claims it.
    past_ttl();
    let new = open(&url);
    let next = new.claim_lease(0, "n2", TTL).unwrap().expect("expired");
    assert_eq!(next.epoch, lease.epoch + 1);
    new.fence(0, next.epoch, "n2").unwrap();

    // The old holder's late commit is refused whole, a waiting one and a queued one.
    let late = old
        .commit(
            Batch::new()
                .driver(driver(1, "a late overwrite"))
                .driver(driver(2, "a late insert")),
        )
        .await;
    assert!(matches!(late, Err(StoreError::Fenced(_))), "{late:?}");
    assert!(late.unwrap_err().to_string().contains("epoch 1"));
    old.write(Batch::new().driver(driver(3, "a late snapshot")))
        .unwrap();
    let after_queue = old.commit(Batch::new()).await; // empty: answers at once
    assert!(after_queue.is_ok());
    // Drain the queued write through a commit that is refused too.
    assert!(matches!(
        old.commit(Batch::new().driver(driver(4, "late"))).await,
        Err(StoreError::Fenced(_))
    ));
    assert!(old.fenced() >= 2, "refusals counted: {}", old.fenced());

    // Nothing of it is in the database; the new holder writes.
    assert_eq!(
        new.driver(&DriverId::new("drv_1"))
            .unwrap()
            .unwrap()
            .profile
            .name,
        "written under the lease"
    );
    for i in [2, 3, 4] {
        assert!(
            new.driver(&DriverId::new(format!("drv_{i}")))
                .unwrap()
                .is_none(),
            "drv_{i}"
        );
    }
    new.commit(Batch::new().driver(driver(2, "by the new holder")))
        .await
        .unwrap();
    // Even renewing would not bring the old epoch back.
    assert!(!old.renew_lease(0, "n1", lease.epoch, TTL).unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_waits_for_a_fenced_commit_in_flight_and_recovery_then_sees_it() {
    // A commit that locked the lease row before the lease ran out lands before the
    // next claim; the claimer's recovery reads it. Many writers race one claim.
    let Some(url) = dispatch_persistence::pg::test_database("lease_claim_waits") else {
        return;
    };
    let old = Arc::new(open(&url));
    let lease = old.claim_lease(0, "n1", TTL).unwrap().unwrap();
    old.fence(0, lease.epoch, "n1").unwrap();
    let writer = {
        let old = old.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10_000u32 {
                match old.commit(Batch::new().driver(driver(i, "racing"))).await {
                    Ok(()) => acked.push(i),
                    Err(StoreError::Fenced(_)) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            acked
        })
    };
    let new = open(&url);
    let claimed = loop {
        if let Some(l) = new.claim_lease(0, "n2", TTL).unwrap() {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(claimed.epoch, lease.epoch + 1);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty(), "some commits landed under the lease");
    // Every acknowledged write is there for the new holder to recover.
    let loaded = new.load().unwrap();
    for i in &acked {
        assert!(
            loaded
                .drivers
                .iter()
                .any(|d| d.id == DriverId::new(format!("drv_{i}"))),
            "acknowledged drv_{i} lost"
        );
    }
    // And nothing after the last acknowledged one.
    let last = *acked.last().unwrap();
    assert!(
        !loaded
            .drivers
            .iter()
            .any(|d| d.id == DriverId::new(format!("drv_{}", last + 1))),
        "a refused write landed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_that_checked_its_lease_lands_before_the_next_claim() {
    // The commit checks its lease, then takes longer than the lease has left. The
    // next claim waits for it (the row is locked FOR SHARE), so the new holder's
    // recovery reads the acknowledged write; without the lock it would recover first
    // and the acknowledged write would land behind its back.
    let Some(url) = dispatch_persistence::pg::test_database("lease_commit_in_flight") else {
        return;
    };
    let old = Arc::new(open(&url));
    let lease = old
        .claim_lease(0, "n1", Duration::from_millis(300))
        .unwrap()
        .unwrap();
    old.fence(0, lease.epoch, "n1").unwrap();
    old.faults()
        .hold_after_fence_check(Duration::from_millis(1500));
    let in_flight = {
        let old = old.clone();
        tokio::spawn(async move {
            old.commit(Batch::new().driver(driver(1, "in flight")))
                .await
        })
    };
    let new = open(&url);
    let claimed = loop {
        if let Some(l) = tokio::task::block_in_place(|| new.claim_lease(0, "n2", TTL)).unwrap() {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(claimed.epoch, lease.epoch + 1);
    let recovered = tokio::task::block_in_place(|| new.load()).unwrap();
    let acked = in_flight.await.unwrap();
    assert!(acked.is_ok(), "the commit checked a live lease: {acked:?}");
    assert!(
        recovered
            .drivers
            .iter()
            .any(|d| d.profile.name == "in flight"),
        "an acknowledged write landed after the next holder recovered"
    );
}

#[test]
fn on_sled_leases_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), |_| {}).unwrap();
    let e = s.claim_lease(0, "n1", TTL).unwrap_err();
    assert!(matches!(e, StoreError::Unsupported(_)));
    assert!(e.to_string().contains("--store postgres"), "{e}");
    assert!(s.fence(0, 1, "n1").is_err());
    assert_eq!(s.fenced(), 0);
}

// ---- Several shards per store (issue 16, stage 1 of docs/sharding.md) ----

use dispatch_engine::shard::{ShardId, shard_of};
use dispatch_persistence::FlushStats;

/// Two real shards (H3 resolution-6 cells, 64-bit ids) of one city, ~20 km apart.
fn two_shards() -> (ShardId, ShardId) {
    let grid = dispatch_engine::Grid::new(8).unwrap();
    let a = shard_of(grid.cell_of(Point::new(52.52, 13.40).unwrap()));
    let b = shard_of(grid.cell_of(Point::new(52.40, 13.15).unwrap()));
    assert_ne!(a, b);
    assert!(a > u64::from(u32::MAX), "a shard id is wider than 32 bits");
    (a, b)
}

/// A store whose group commits are counted: batches per group, in order.
fn open_counted(url: &str) -> (Store, Arc<std::sync::Mutex<Vec<usize>>>) {
    let groups = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = groups.clone();
    let s = Store::open_postgres(PgOptions::new(url), move |f: FlushStats| {
        g.lock().unwrap().push(f.batches)
    })
    .unwrap();
    s.load().unwrap();
    (s, groups)
}

fn stored_name(s: &Store, i: u32) -> Option<String> {
    s.driver(&DriverId::new(format!("drv_{i}")))
        .unwrap()
        .map(|d| d.profile.name)
}

fn fenced(r: Result<(), StoreError>) -> String {
    match r {
        Err(StoreError::Fenced(why)) => why,
        other => panic!("expected a refusal by the fence, got {other:?}"),
    }
}

/// Claims `shard` for `holder` on `s` and fences it; the epoch.
fn hold(s: &Store, shard: ShardId, holder: &str, ttl: Duration) -> u64 {
    let l = s.claim_lease(shard, holder, ttl).unwrap().expect("free");
    s.fence(shard, l.epoch, holder).unwrap();
    l.epoch
}

#[tokio::test(flavor = "multi_thread")]
async fn two_holders_of_two_shards_write_concurrently_each_refused_for_the_others_shard() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_two_shards") else {
        return;
    };
    let (a, b) = two_shards();
    let ttl = Duration::from_secs(60);
    let n1 = Arc::new(open(&url));
    let n2 = Arc::new(open(&url));
    hold(&n1, a, "n1", ttl);
    hold(&n2, b, "n2", ttl);
    // Each writes its own shard, at the same time, through its own group commits.
    let writer = |s: Arc<Store>, shard: ShardId, from: u32| {
        tokio::spawn(async move {
            for i in from..from + 200 {
                s.commit(Batch::in_shard(shard).driver(driver(i, "own shard")))
                    .await
                    .unwrap_or_else(|e| panic!("drv_{i} in its own shard: {e}"));
            }
        })
    };
    let (w1, w2) = (writer(n1.clone(), a, 0), writer(n2.clone(), b, 1000));
    w1.await.unwrap();
    w2.await.unwrap();
    // Each is refused for the other's shard: no fence here for it, and even a fence
    // with the other's epoch names the wrong holder.
    let why = fenced(
        n1.commit(Batch::in_shard(b).driver(driver(5000, "n1 into b")))
            .await,
    );
    assert!(why.contains(&format!("no lease on shard {b}")), "{why}");
    n2.fence(a, 1, "n2").unwrap();
    let why = fenced(
        n2.commit(Batch::in_shard(a).driver(driver(5001, "n2 into a")))
            .await,
    );
    assert!(
        why.contains(&format!("n2 no longer holds shard {a} with epoch 1")),
        "{why}"
    );
    // A batch of the whole city's shard (what `Batch::new` names) is not theirs either.
    fenced(
        n1.commit(Batch::new().driver(driver(5002, "n1 unsharded")))
            .await,
    );
    assert_eq!(
        (n1.fenced_in(b), n1.fenced_in(0), n2.fenced_in(a)),
        (1, 1, 1)
    );
    assert_eq!((n1.fenced(), n2.fenced()), (2, 1));
    let loaded = n1.load().unwrap();
    assert_eq!(loaded.drivers.len(), 400, "every own-shard write, no other");
    for i in [5000, 5001, 5002] {
        assert_eq!(stored_name(&n1, i), None, "drv_{i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_or_superseded_epoch_is_refused_per_shard_and_the_other_shard_still_lands() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_stale_shard") else {
        return;
    };
    let (a, b) = two_shards();
    let (n1, groups) = open_counted(&url);
    let n1 = Arc::new(n1);
    let epoch_a = hold(&n1, a, "n1", TTL);
    hold(&n1, b, "n1", Duration::from_secs(60));
    assert_eq!(n1.fences().iter().map(|f| f.shard).collect::<Vec<_>>(), {
        let mut both = vec![a, b];
        both.sort();
        both
    });
    n1.commit(Batch::in_shard(a).driver(driver(1, "a, live")))
        .await
        .unwrap();

    // Shard a's lease expires (b's does not): a refused, b lands.
    past_ttl();
    let why = fenced(
        n1.commit(Batch::in_shard(a).driver(driver(2, "a, expired")))
            .await,
    );
    assert!(
        why.contains(&format!(
            "n1 no longer holds shard {a} with epoch {epoch_a}"
        )),
        "{why}"
    );
    n1.commit(Batch::in_shard(b).driver(driver(3, "b, live")))
        .await
        .unwrap();

    // Superseded: n2 claims a with a newer epoch. In one group commit of n1, the batch
    // for a is refused and the one for b lands: a group commit checks each shard.
    let n2 = open(&url);
    let epoch_a2 = hold(&n2, a, "n2", Duration::from_secs(60));
    assert_eq!(epoch_a2, epoch_a + 1);
    n1.faults()
        .hold_after_fence_check(Duration::from_millis(600));
    let first = {
        let n1 = n1.clone();
        tokio::spawn(async move {
            n1.commit(Batch::in_shard(b).driver(driver(4, "b, held")))
                .await
        })
    };
    // While that group is held, both of these queue and go together in the next one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (late_a, late_b) = tokio::join!(
        n1.commit(Batch::in_shard(a).driver(driver(5, "a, superseded"))),
        n1.commit(Batch::in_shard(b).driver(driver(6, "b, same group")))
    );
    first.await.unwrap().unwrap();
    n1.faults().hold_after_fence_check(Duration::ZERO);
    fenced(late_a);
    late_b.unwrap();
    assert!(
        groups.lock().unwrap().contains(&2),
        "the two went in one group commit: {:?}",
        groups.lock().unwrap()
    );
    // The new holder of a writes; n1 counted its refusals under a only.
    n2.commit(Batch::in_shard(a).driver(driver(7, "a, by n2")))
        .await
        .unwrap();
    assert_eq!((n1.fenced_in(a), n1.fenced_in(b)), (2, 0));
    let names: Vec<_> = (1..=7).map(|i| stored_name(&n2, i)).collect();
    assert_eq!(
        names,
        [
            Some("a, live"),
            None,
            Some("b, live"),
            Some("b, held"),
            None,
            Some("b, same group"),
            Some("a, by n2")
        ]
        .map(|n| n.map(str::to_owned))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_batch_with_one_stale_shard_writes_nothing() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_mixed_batch") else {
        return;
    };
    let (a, b) = two_shards();
    let n1 = open(&url);
    let epoch_a = hold(&n1, a, "n1", TTL);
    hold(&n1, b, "n1", Duration::from_secs(60));
    // Both held: a batch naming both lands whole.
    n1.commit(
        Batch::in_shard(b)
            .driver(driver(1, "b, mixed"))
            .then_in(a)
            .driver(driver(2, "a, mixed")),
    )
    .await
    .unwrap();
    // a expires and is claimed again: a batch naming a and b writes nothing, whichever
    // way it was put together, and however many of its writes are b's.
    past_ttl();
    let n2 = open(&url);
    hold(&n2, a, "n2", Duration::from_secs(60));
    let built = Batch::in_shard(b)
        .driver(driver(1, "b, overwrite"))
        .driver(driver(3, "b, insert"))
        .then_in(a)
        .driver(driver(4, "a, stale"));
    assert_eq!(built.shards().len(), 2);
    let why = fenced(n1.commit(built).await);
    assert!(
        why.contains(&format!("shard {a} with epoch {epoch_a}")),
        "{why}"
    );
    let appended = Batch::in_shard(b)
        .driver(driver(5, "b, appended"))
        .append(Batch::in_shard(a).driver(driver(6, "a, appended")));
    fenced(n1.commit(appended).await);
    assert_eq!(n1.fenced_in(a), 2);
    assert_eq!(stored_name(&n2, 1).as_deref(), Some("b, mixed"));
    assert_eq!(stored_name(&n2, 2).as_deref(), Some("a, mixed"));
    for i in [3, 4, 5, 6] {
        assert_eq!(stored_name(&n2, i), None, "drv_{i}");
    }
    // b alone still lands; after a handoff of b (unfence), nothing of b does, and the
    // store stays fenced with no fence left.
    n1.commit(Batch::in_shard(b).driver(driver(8, "b alone")))
        .await
        .unwrap();
    assert!(n1.unfence(a).is_some() && n1.unfence(b).is_some());
    assert!(n1.fences().is_empty());
    fenced(
        n1.commit(Batch::in_shard(b).driver(driver(9, "b, handed off")))
            .await,
    );
    assert_eq!(stored_name(&n2, 8).as_deref(), Some("b alone"));
    assert_eq!(stored_name(&n2, 9), None);
}

#[tokio::test]
async fn on_sled_shards_are_not_checked() {
    let (a, _) = two_shards();
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), |_| {}).unwrap();
    s.commit(Batch::in_shard(a).driver(driver(1, "sled, any shard")))
        .await
        .unwrap();
    assert!(s.unfence(a).is_none() && s.fences().is_empty());
    assert_eq!(stored_name(&s, 1).as_deref(), Some("sled, any shard"));
}

/// Two leases of holder "n1", claimed higher shard first (so the heap holds the higher
/// one's row first) and fenced; a raw connection that holds the higher shard's row
/// `FOR UPDATE` in an open transaction; the runtime that drives it.
struct Crossing {
    s: Arc<Store>,
    low: dispatch_persistence::Lease,
    high: dispatch_persistence::Lease,
    rt: tokio::runtime::Runtime,
    raw: tokio_postgres::Client,
}

const LONG: Duration = Duration::from_secs(30);

fn crossing(url: &str) -> Crossing {
    let s = Arc::new(open(url));
    let high = s.claim_lease(9_002, "n1", LONG).unwrap().unwrap();
    let low = s.claim_lease(9_001, "n1", LONG).unwrap().unwrap();
    for l in [&low, &high] {
        s.fence(l.shard, l.epoch, "n1").unwrap();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let raw = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.batch_execute("BEGIN").await.unwrap();
        c.execute(
            "SELECT 1 FROM dispatch_leases WHERE shard = 9002 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
        c
    });
    Crossing {
        s,
        low,
        high,
        rt,
        raw,
    }
}

/// Runs `f` to its end on a runtime of its own (a commit from a thread of the test's).
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A batch naming both shards: its commit's check locks both lease rows `FOR SHARE`.
fn both(c: &Crossing) -> Batch {
    Batch::in_shard(c.low.shard)
        .driver(driver(1, "Low"))
        .then_in(c.high.shard)
        .driver(driver(2, "High"))
}

/// A renewal of two leases and a commit whose check locks the same two: the renewal
/// locks them in shard order, as the check does, so neither can hold a row the other
/// waits for. Here the renewal starts first and waits on the higher row (a third
/// connection holds it), the commit starts second; when the third lets go, both go
/// through, and no commit had to be tried again. Renewing in the heap's order (the
/// higher shard's row first), the renewal took the higher row and waited on the lower,
/// which the commit's check held `FOR SHARE` while it waited on the higher: PostgreSQL
/// ended one of them with "deadlock detected" (40P01); in the run that showed it, the
/// renewal (a node that fails to renew loses its shards).
#[test]
fn a_renewal_and_a_commit_lock_leases_in_one_order_and_never_deadlock() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_lock_order") else {
        return;
    };
    let c = crossing(&url);
    let held = [(c.high.shard, c.high.epoch), (c.low.shard, c.low.epoch)];
    let renewal = {
        let s = c.s.clone();
        std::thread::spawn(move || s.renew_leases("n1", &held, LONG))
    };
    std::thread::sleep(Duration::from_millis(300));
    let commit = {
        let (s, b) = (c.s.clone(), both(&c));
        std::thread::spawn(move || block_on(s.commit(b)))
    };
    std::thread::sleep(Duration::from_millis(300));
    c.rt.block_on(c.raw.batch_execute("COMMIT")).unwrap();
    let renewed = renewal.join().unwrap().expect("the renewal");
    assert_eq!(renewed, vec![c.low.shard, c.high.shard]);
    commit.join().unwrap().expect("the commit");
    assert_eq!(c.s.write_retries(), 0, "no commit was tried again");
    assert!(c.s.driver(&DriverId::new("drv_2")).unwrap().is_some());
}

/// A group commit PostgreSQL ends in a deadlock is tried again (counted), and lands:
/// the commit's check holds the lower lease row `FOR SHARE` and waits on the higher,
/// which a third connection holds and then updates the lower (each waits on the other);
/// the commit, waiting longest, is the one PostgreSQL ends. Its retry waits for the
/// third connection's commit, then writes.
#[test]
fn a_commit_ended_by_a_deadlock_is_tried_again_and_counted() {
    let Some(url) = dispatch_persistence::pg::test_database("lease_deadlock_retry") else {
        return;
    };
    let c = crossing(&url);
    let commit = {
        let (s, b) = (c.s.clone(), both(&c));
        std::thread::spawn(move || block_on(s.commit(b)))
    };
    std::thread::sleep(Duration::from_millis(300));
    c.rt.block_on(async {
        c.raw
            .execute(
                "UPDATE dispatch_leases SET expires_at = expires_at WHERE shard = 9001",
                &[],
            )
            .await
            .unwrap();
        c.raw.batch_execute("COMMIT").await.unwrap();
    });
    commit.join().unwrap().expect("the commit, tried again");
    assert_eq!(c.s.write_retries(), 1);
    assert!(c.s.driver(&DriverId::new("drv_1")).unwrap().is_some());
}
