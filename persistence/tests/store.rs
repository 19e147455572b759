//! The store's conformance suite: the same test bodies against a real sled directory
//! and a real PostgreSQL database (a fresh one per test, on the server
//! `DISPATCH_TEST_DATABASE_URL` names; without it the PostgreSQL half skips saying so,
//! or fails when `CI` is set): round trips, group commit, journal replay, and refusing
//! what it cannot read without changing it.

use dispatch_engine::trip::Mover;
use dispatch_engine::{
    DispatchConfig, DriverId, DriverProfile, DriverStatus, Point, Product, RiderId, RiderProfile,
    StraightLineEta, Trip, TripCommand, TripId, TripState, Vehicle,
};
mod common;
use common::{trip, with_client};
use dispatch_persistence::{
    Batch, Store, StoreError, StoredDriver, StoredRider, StoredTrip, Transition, journal_key,
};

/// Where one run of a test keeps its store.
enum Place {
    Sled(tempfile::TempDir),
    Pg(String),
}

/// A sled directory, and a PostgreSQL database when one is available.
fn places(test: &str) -> Vec<Place> {
    let mut v = vec![Place::Sled(tempfile::tempdir().unwrap())];
    if let Some(url) = dispatch_persistence::pg::test_database(test) {
        v.push(Place::Pg(url));
    }
    v
}

impl Place {
    fn name(&self) -> &'static str {
        match self {
            Place::Sled(_) => "sled",
            Place::Pg(_) => "postgres",
        }
    }

    fn open_with(
        &self,
        on_flush: impl Fn(dispatch_persistence::FlushStats) + Send + 'static,
    ) -> Store {
        match self {
            Place::Sled(d) => Store::open(d.path(), on_flush).unwrap(),
            Place::Pg(url) => {
                Store::open_postgres(dispatch_persistence::PgOptions::new(url), on_flush).unwrap()
            }
        }
    }

    fn open(&self) -> Store {
        self.open_with(|_| {})
    }

    /// Where errors say the store is.
    fn location(&self) -> String {
        match self {
            Place::Sled(d) => d.path().display().to_string(),
            Place::Pg(url) => dispatch_persistence::redact(url),
        }
    }

    /// Writes raw bytes under `key`, behind the store's back (the store is closed).
    fn poke(&self, tree: &str, key: &[u8], value: Vec<u8>) {
        match self {
            Place::Sled(d) => {
                let db = sled::open(d.path()).unwrap();
                db.open_tree(tree).unwrap().insert(key, value).unwrap();
                db.flush().unwrap();
            }
            Place::Pg(url) => {
                let sql = format!(
                    "INSERT INTO {tree} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
                );
                sql_rows(url, &sql, key.to_vec(), Some(value));
            }
        }
    }

    fn peek(&self, tree: &str, key: &[u8]) -> Vec<u8> {
        match self {
            Place::Sled(d) => {
                let db = sled::open(d.path()).unwrap();
                db.open_tree(tree)
                    .unwrap()
                    .get(key)
                    .unwrap()
                    .unwrap()
                    .to_vec()
            }
            Place::Pg(url) => {
                let sql = format!("SELECT v FROM {tree} WHERE k = $1");
                sql_rows(url, &sql, key.to_vec(), None).remove(0)
            }
        }
    }
}

/// Runs `f` on a connection of its own to `url`, on a thread and runtime of its own.
/// Runs one statement with a key (and a value) on its own connection; the first
/// column of what it returns.
pub fn sql_rows(url: &str, sql: &str, key: Vec<u8>, value: Option<Vec<u8>>) -> Vec<Vec<u8>> {
    let sql = sql.to_owned();
    with_client(url, move |c| async move {
        let rows = match &value {
            Some(v) => c.query(&sql, &[&key, v]).await.unwrap(),
            None => c.query(&sql, &[&key]).await.unwrap(),
        };
        rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect()
    })
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

/// Commits a trip's snapshot alone (no journal entry).
async fn commit_snapshot(s: &Store, trip: Trip) {
    s.commit(Batch::new().trip(StoredTrip { trip, driver: None }, None))
        .await
        .unwrap();
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
    for place in places("what_is_committed_loads_back_after_reopening") {
        what_is_committed_loads_back(&place).await;
    }
}

async fn what_is_committed_loads_back(place: &Place) {
    {
        let s = place.open();
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
    let s = place.open();
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
    for place in places("concurrent_commits_share_flushes") {
        commits_share_flushes(&place).await;
    }
}

async fn commits_share_flushes(place: &Place) {
    let flushes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let f2 = flushes.clone();
    let s = std::sync::Arc::new(place.open_with(move |_| {
        f2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    // The first write also creates the PostgreSQL schema: keep it out of the count.
    s.load().unwrap();
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
    assert!(
        (1..=50).contains(&n),
        "{}: 200 commits took {n} flushes",
        place.name()
    );
    assert_eq!(s.load().unwrap().drivers.len(), 200);
}

#[tokio::test]
async fn a_journal_entry_newer_than_the_snapshot_wins() {
    for place in places("a_journal_entry_newer_than_the_snapshot_wins") {
        newer_journal_wins(&place).await;
    }
}

async fn newer_journal_wins(place: &Place) {
    let t = trip("trp_2");
    let a = accepted(t.clone());
    {
        let s = place.open();
        commit_snapshot(&s, t).await;
    }
    // As if the process died after writing the journal entry but before the snapshot.
    let entry = dispatch_persistence::JournalEntry {
        transition: transition(&a),
        trip: StoredTrip {
            trip: a.clone(),
            driver: None,
        },
    };
    place.poke(
        "journal",
        &journal_key(&a.id, a.version()),
        dispatch_persistence::codec::encode(&entry),
    );
    let s = place.open();
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
        for place in places("a_damaged_or_future_record_stops_loading_and_is_left_as_it_was") {
            let name = format!("{name} ({})", place.name());
            {
                let s = place.open();
                s.commit(Batch::new().driver(driver(1)).driver(driver(2)))
                    .await
                    .unwrap();
            }
            let mut bytes = place.peek("drivers", b"drv_2");
            damage(&mut bytes);
            place.poke("drivers", b"drv_2", bytes.clone());
            {
                let s = place.open();
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
                    msg.contains("drivers/drv_2") && msg.contains(&place.location()),
                    "{name}: {msg}"
                );
            }
            assert_eq!(
                place.peek("drivers", b"drv_2"),
                bytes,
                "{name}: the record was changed"
            );
        }
    }
}

#[tokio::test]
async fn a_second_open_of_a_locked_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path(), |_| {}).unwrap();
    let err = Store::open(dir.path(), |_| {})
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
}

#[tokio::test]
async fn a_failed_write_is_refused_and_writes_resume_once_the_fault_clears() {
    for place in places("a_failed_write_is_refused_and_writes_resume_once_the_fault_clears") {
        failed_write_resumes(&place).await;
    }
}

async fn failed_write_resumes(place: &Place) {
    let s = place.open();
    s.commit(Batch::new().driver(driver(1))).await.unwrap();

    // Every write fails while the fault lasts (as on a full disk); reads that need the
    // database may answer `Unavailable` while it is being reopened, never stale data.
    s.faults().fail_writes(true);
    for i in 2..5 {
        let e = s.commit(Batch::new().driver(driver(i))).await.unwrap_err();
        assert!(e.to_string().contains("injected fault"), "{e}");
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
    let s = place.open();
    assert_eq!(ids(&s.load().unwrap()), ["drv_1", "drv_5"]);
}

// PostgreSQL only: what sled has no counterpart for.

fn pg_place(test: &str) -> Option<String> {
    dispatch_persistence::pg::test_database(test)
}

fn pg_open(url: &str) -> Store {
    Store::open_postgres(dispatch_persistence::PgOptions::new(url), |_| {}).unwrap()
}

#[tokio::test]
async fn postgres_a_newer_schema_is_refused_clearly_and_left_alone() {
    let Some(url) = pg_place("postgres_a_newer_schema_is_refused_clearly_and_left_alone") else {
        return;
    };
    pg_open(&url).load().unwrap();
    sql_rows(
        &url,
        "INSERT INTO dispatch_schema_migrations (version, name) VALUES (999, convert_from($1, 'UTF8')) RETURNING '\\x00'::bytea",
        b"from the future".to_vec(),
        None,
    );
    let err = pg_open(&url).load().unwrap_err();
    assert!(
        matches!(err, StoreError::FutureSchema { found: 999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this build"), "{err}");
}

#[tokio::test]
async fn postgres_migrations_wait_for_the_advisory_lock() {
    let Some(url) = pg_place("postgres_migrations_wait_for_the_advisory_lock") else {
        return;
    };
    // Another node is migrating: it holds the lock on a session of its own.
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (held, is_held) = std::sync::mpsc::channel::<()>();
    let holder = {
        let url = url.clone();
        std::thread::spawn(move || {
            with_client(&url, move |c| async move {
                c.execute(
                    "SELECT pg_advisory_lock($1)",
                    &[&dispatch_persistence::pg::MIGRATION_LOCK],
                )
                .await
                .unwrap();
                held.send(()).unwrap();
                let _ = tokio::task::spawn_blocking(move || hold.recv()).await;
            })
        })
    };
    is_held.recv().unwrap();
    let mut o = dispatch_persistence::PgOptions::new(&url);
    o.call_timeout = std::time::Duration::from_millis(500);
    o.start_timeout = std::time::Duration::from_millis(200);
    let s = Store::open_postgres(o, |_| {}).unwrap();
    let err = s.load().unwrap_err();
    assert!(err.to_string().contains("no answer within"), "{err}");
    assert_eq!(s.timeouts(), 1, "the timeout was not counted");
    // The other node is done: this one migrates.
    release.send(()).unwrap();
    holder.join().unwrap();
    drop(s);
    pg_open(&url).load().unwrap();
}

#[tokio::test]
async fn postgres_nodes_starting_at_once_migrate_once() {
    let Some(url) = pg_place("postgres_nodes_starting_at_once_migrate_once") else {
        return;
    };
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || pg_open(&url).load().map(|_| ()))
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    let applied = sql_rows(
        &url,
        "SELECT convert_to(count(*)::text, 'UTF8') FROM dispatch_schema_migrations WHERE $1::bytea IS NOT NULL",
        vec![],
        None,
    );
    // Each migration once.
    let expected = dispatch_persistence::pg::MIGRATIONS.len().to_string();
    assert_eq!(applied, [expected.into_bytes()]);
}

#[tokio::test]
async fn postgres_a_commit_whose_reply_is_lost_is_retried_without_doubling() {
    let Some(url) = pg_place("postgres_a_commit_whose_reply_is_lost_is_retried_without_doubling")
    else {
        return;
    };
    let s = pg_open(&url);
    s.load().unwrap();
    let t = trip("trp_9");
    s.commit(Batch::new().trip(
        StoredTrip {
            trip: t.clone(),
            driver: None,
        },
        None,
    ))
    .await
    .unwrap();
    let a = accepted(t.clone());
    let step = || {
        Batch::new().trip(
            StoredTrip {
                trip: a.clone(),
                driver: None,
            },
            Some(transition(&a)),
        )
    };
    // The transaction commits but the answer is lost: the writer cannot know.
    s.faults().lose_commit_replies(1);
    let e = s.commit(step()).await.unwrap_err();
    assert!(e.to_string().contains("outcome is unknown"), "{e}");
    // The caller retries the same transition: applied once, not twice, not lost.
    s.commit(step()).await.unwrap();
    assert_eq!(s.history(&a.id).unwrap().len(), 1);
    // And an older state arriving late never overwrites the newer one.
    commit_snapshot(&s, t).await;
    let now = s.trip(&a.id).unwrap().unwrap();
    assert_eq!(now.trip.version(), a.version());
    // The row itself, not only what recovery makes of it (it also reads the journal).
    let row = sql_rows(
        &url,
        "SELECT v FROM trips WHERE k = $1",
        a.id.as_str().as_bytes().to_vec(),
        None,
    );
    let stored: StoredTrip = dispatch_persistence::codec::decode(&row[0]).unwrap();
    assert_eq!(
        stored.trip.version(),
        a.version(),
        "an older snapshot replaced a newer one"
    );
    let l = pg_open(&url).load().unwrap();
    assert_eq!((l.trips.len(), l.journal_entries), (1, 1));
    assert_eq!(l.trips[0].trip.version(), a.version());
}

#[tokio::test]
async fn postgres_down_at_start_is_retried_then_refused_without_the_password() {
    // A port nothing listens on (within this project's range): connection refused.
    let url = "postgres://dispatch:s3cret-pw@127.0.0.1:55449/nothing";
    let mut o = dispatch_persistence::PgOptions::new(url);
    o.start_timeout = std::time::Duration::from_millis(900);
    o.call_timeout = std::time::Duration::from_millis(500);
    let s = Store::open_postgres(o.clone(), |_| {}).unwrap();
    assert!(s.problem().is_some());
    let started = std::time::Instant::now();
    let err = s.load().unwrap_err();
    let shown = format!(
        "{err} {err:?} {:?} {} {o:?}",
        s.problem(),
        s.dir().display()
    );
    assert!(!shown.contains("s3cret"), "the password leaked: {shown}");
    assert!(shown.contains("127.0.0.1:55449"), "{shown}");
    // Bounded: it gave up after its start timeout, not before trying again.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let e = s.commit(Batch::new().driver(driver(1))).await.unwrap_err();
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

#[tokio::test]
async fn migrate_copies_sled_to_postgres_and_back_verified() {
    let Some(url) = pg_place("migrate_copies_sled_to_postgres_and_back_verified") else {
        return;
    };
    let from = tempfile::tempdir().unwrap();
    let back = tempfile::tempdir().unwrap();
    {
        let s = Store::open(from.path(), |_| {}).unwrap();
        let t = accepted(trip("trp_5"));
        let mut b = Batch::new().trip(
            StoredTrip {
                trip: t.clone(),
                driver: None,
            },
            Some(transition(&t)),
        );
        for i in 0..50 {
            b = b.driver(driver(i));
        }
        s.commit(b).await.unwrap();
    }
    let sled_store = Store::open(from.path(), |_| {}).unwrap();
    let pg = pg_open(&url);
    let there = sled_store.copy_into(&pg).unwrap();
    let count = |r: &[dispatch_persistence::TreeCopy], tree: &str| {
        r.iter().find(|c| c.tree == tree).unwrap().records
    };
    assert_eq!(
        (count(&there, "drivers"), count(&there, "journal")),
        (50, 1)
    );
    let l = pg.load().unwrap();
    assert_eq!((l.drivers.len(), l.trips.len()), (50, 1));
    let again = Store::open(back.path(), |_| {}).unwrap();
    let home = pg.copy_into(&again).unwrap();
    assert_eq!(there, home);
    // Into a store that already holds other records, the check fails.
    let err = sled_store.copy_into(&pg_open(&url)).map(|_| ());
    assert!(
        err.is_ok(),
        "a second identical copy is the same data: {err:?}"
    );
    pg.commit(Batch::new().driver(driver(77))).await.unwrap();
    let err = sled_store.copy_into(&pg).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}
