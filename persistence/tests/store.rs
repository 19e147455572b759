//! The store against a real sled directory: round trips, group commit, journal replay,
//! and refusing what it cannot read without changing it.

use dispatch_engine::trip::Mover;
use dispatch_engine::{
    DispatchConfig, DriverId, DriverProfile, DriverStatus, Point, Product, QuoteTerms, RiderId,
    RiderProfile, StraightLineEta, Trip, TripCommand, TripId, TripState, Vehicle,
};
use dispatch_persistence::{
    Batch, Store, StoreError, StoredDriver, StoredRider, StoredTrip, Transition, journal_key,
};

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, |_| {}).unwrap()
}

fn driver(i: u32) -> StoredDriver {
    StoredDriver {
        id: DriverId::new(format!("drv_{i}")),
        profile: DriverProfile {
            name: format!("D{i}"),
            vehicle: Vehicle {
                make: "Kia".into(),
                model: "Niro".into(),
                plate: "P".into(),
                color: "red".into(),
                product: Product::Xl,
                seats: 6,
            },
        },
        token_hash: [i as u8; 32],
        status: DriverStatus::Available,
        position: Some(Point::new(45.5, -73.6).unwrap()),
        heading: Some(90.0),
    }
}

fn trip(id: &str) -> Trip {
    let quote = QuoteTerms {
        fare_cents: 1234,
        currency: "USD".into(),
        surge: 1.0,
        distance_m: 3000,
        duration_s: 400,
    };
    Trip::start(
        TripId::new(id),
        RiderId::new("rdr_1"),
        Product::Economy,
        Point::new(45.5, -73.6).unwrap(),
        Point::new(45.52, -73.6).unwrap(),
        quote,
        1_000,
        &DispatchConfig::default(),
    )
    .trip
}

fn accepted(mut t: Trip) -> Trip {
    use dispatch_engine::{Candidate, IndexedDriver};
    let cfg = DispatchConfig::default();
    let eta = StraightLineEta::default();
    let c = Candidate {
        driver: IndexedDriver {
            driver_id: DriverId::new("drv_1"),
            position: Point::new(45.501, -73.6).unwrap(),
            heading: None,
            product: Product::Economy,
            available: true,
        },
        distance_m: 111.0,
    };
    t.apply(TripCommand::Candidates(vec![c]), 1_100, &cfg, &eta)
        .unwrap();
    t.apply(
        TripCommand::Accept {
            driver_id: DriverId::new("drv_1"),
        },
        1_200,
        &cfg,
        &eta,
    )
    .unwrap();
    t
}

fn transition(t: &Trip) -> Transition {
    Transition {
        from: TripState::Dispatching,
        to: t.state(),
        by: Mover::Driver(DriverId::new("drv_1")),
        at_ms: t.updated_at_ms(),
        version: t.version(),
    }
}

#[tokio::test]
async fn what_is_committed_loads_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        let t = trip("trp_1");
        let mut b = Batch::new()
            .rider(StoredRider {
                id: RiderId::new("rdr_1"),
                profile: RiderProfile {
                    name: "R".into(),
                    phone: "555".into(),
                },
                token_hash: [9; 32],
            })
            .trip(
                StoredTrip {
                    trip: t.clone(),
                    driver: None,
                },
                None,
            );
        for i in 0..100 {
            b = b.driver(driver(i));
        }
        s.commit(b).await.unwrap();
        let a = accepted(t);
        s.commit(Batch::new().trip(
            StoredTrip {
                trip: a.clone(),
                driver: None,
            },
            Some(transition(&a)),
        ))
        .await
        .unwrap();
        assert_eq!(s.history(&TripId::new("trp_1")).unwrap().len(), 1);
    }
    let s = open(dir.path());
    let l = s.load().unwrap();
    assert_eq!(l.drivers.len(), 100);
    assert_eq!(
        l.drivers.iter().find(|d| d.id.as_str() == "drv_7").unwrap(),
        &driver(7)
    );
    assert_eq!(l.riders.len(), 1);
    assert_eq!(l.trips.len(), 1);
    assert_eq!(l.trips[0].trip.state(), TripState::DriverAssigned);
    assert_eq!(l.trips[0].trip.version(), 2);
    assert_eq!(l.journal_entries, 1);
}

#[tokio::test]
async fn concurrent_commits_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let flushes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f2 = flushes.clone();
    let s = std::sync::Arc::new(
        Store::open(dir.path(), move |_| {
            f2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.commit(Batch::new().driver(driver(i))).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // All 200 were queued before the first flush could finish: they share a few flushes.
    let n = flushes.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=50).contains(&n), "200 commits took {n} flushes");
    assert_eq!(s.load().unwrap().drivers.len(), 200);
}

#[tokio::test]
async fn a_journal_entry_newer_than_the_snapshot_wins() {
    let dir = tempfile::tempdir().unwrap();
    let t = trip("trp_2");
    let a = accepted(t.clone());
    {
        let s = open(dir.path());
        s.commit(Batch::new().trip(
            StoredTrip {
                trip: t,
                driver: None,
            },
            None,
        ))
        .await
        .unwrap();
    }
    // As if the process died after writing the journal entry but before the snapshot.
    {
        let db = sled::open(dir.path()).unwrap();
        let entry = dispatch_persistence::JournalEntry {
            transition: transition(&a),
            trip: StoredTrip {
                trip: a.clone(),
                driver: None,
            },
        };
        db.open_tree("journal")
            .unwrap()
            .insert(
                journal_key(&a.id, a.version()),
                dispatch_persistence::codec::encode(&entry),
            )
            .unwrap();
        db.flush().unwrap();
    }
    let s = open(dir.path());
    let l = s.load().unwrap();
    assert_eq!(l.trips.len(), 1);
    assert_eq!(
        (l.trips[0].trip.state(), l.trips[0].trip.version()),
        (TripState::DriverAssigned, 2)
    );
    // A read of the one trip sees the same newer state.
    let one = s.trip(&a.id).unwrap().unwrap();
    assert_eq!(
        (one.trip.state(), one.trip.version()),
        (TripState::DriverAssigned, 2)
    );
}

fn poke(dir: &std::path::Path, tree: &str, key: &[u8], value: Vec<u8>) {
    let db = sled::open(dir).unwrap();
    db.open_tree(tree).unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

fn peek(dir: &std::path::Path, tree: &str, key: &[u8]) -> Vec<u8> {
    let db = sled::open(dir).unwrap();
    db.open_tree(tree)
        .unwrap()
        .get(key)
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_damaged_or_future_record_stops_loading_and_is_left_as_it_was() {
    for (name, damage) in [
        (
            "future version",
            Box::new(|b: &mut Vec<u8>| b[1] = 2) as Box<dyn Fn(&mut Vec<u8>)>,
        ),
        (
            "flipped byte",
            Box::new(|b: &mut Vec<u8>| *b.last_mut().unwrap() ^= 0x55),
        ),
        ("truncated", Box::new(|b: &mut Vec<u8>| b.truncate(4))),
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.commit(Batch::new().driver(driver(1)).driver(driver(2)))
                .await
                .unwrap();
        }
        let mut bytes = peek(dir.path(), "drivers", b"drv_2");
        damage(&mut bytes);
        poke(dir.path(), "drivers", b"drv_2", bytes.clone());
        {
            let s = open(dir.path());
            let err = s.load().unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    StoreError::Corrupt {
                        tree: "drivers",
                        ..
                    }
                ),
                "{name}: {msg}"
            );
            assert!(
                msg.contains("drivers/drv_2") && msg.contains(&dir.path().display().to_string()),
                "{name}: {msg}"
            );
        }
        assert_eq!(
            peek(dir.path(), "drivers", b"drv_2"),
            bytes,
            "{name}: the record was changed"
        );
    }
}

#[tokio::test]
async fn a_second_open_of_a_locked_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = Store::open(dir.path(), |_| {})
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
}

#[tokio::test]
async fn a_failed_write_is_refused_and_writes_resume_once_the_fault_clears() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.commit(Batch::new().driver(driver(1))).await.unwrap();

    // Every write fails while the fault lasts (as on a full disk); reads that need the
    // database may answer `Unavailable` while it is being reopened, never stale data.
    s.faults().fail_writes(true);
    for i in 2..5 {
        let e = s.commit(Batch::new().driver(driver(i))).await.unwrap_err();
        assert!(e.to_string().contains("no space left"), "{e}");
    }
    assert!(s.sync().await.is_err(), "a sync during the fault succeeded");

    // The fault clears: the next write lands, on a database reopened from disk.
    s.faults().fail_writes(false);
    s.commit(Batch::new().driver(driver(5))).await.unwrap();
    assert!(s.is_healthy());
    let ids = |l: &dispatch_persistence::Loaded| {
        let mut v: Vec<String> = l.drivers.iter().map(|d| d.id.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&s.load().unwrap()), ["drv_1", "drv_5"]);
    s.close().unwrap();

    // And after a restart: what was acknowledged, and nothing that was refused.
    let s = open(dir.path());
    assert_eq!(ids(&s.load().unwrap()), ["drv_1", "drv_5"]);
}
