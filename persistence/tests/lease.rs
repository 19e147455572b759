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
