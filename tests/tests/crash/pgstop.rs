//! PostgreSQL stopped and started under load (issue 15): a crash round whose server runs
//! on a PostgreSQL of the test's own ([`PgServer`]), which is crashed
//! (`pg_ctl stop -m immediate`) while rides are in flight and started again on the same
//! data a few seconds later.
//!
//! - While it is down: writes answer `unavailable` (a registration, a ride request over
//!   the WebSocket), no client is told of a trip version or gets a trip command
//!   acknowledged, what is in memory is still read (a live trip, `nearby`), and `/readyz`
//!   stays 200 (docs/api.md: once ready, only writes are refused), while
//!   `dispatch_bound_hits_total{bound="store_write_failed"}` counts the refused trip
//!   writes.
//! - Once it is back, without a restart of `dispatchd`: a registration succeeds and a new
//!   ride is driven to `completed`, within [`SLOW`] each, and the load's apps (which
//!   retry what was refused `unavailable`) go on: 30 more trip_updates.
//! - Then the crash round's own end: `kill -9` of `dispatchd` under load, a restart on the
//!   same database, every transition any client saw (every `trip_update`, every `ack`)
//!   there, every trip finished, and the books balanced with every completed trip
//!   captured once.
//!
//! `CRASH_SEED=<n>` replays the apps' choices (the timing is the machine's).

use std::time::Duration;

use dispatch_tests::{
    DROPOFF, Dispatchd, PICKUP, PgServer, SHORT_TRIP_FLAGS, SLOW, eventually_within, point, ride_to,
};
use dispatch_transport::wire::TripState;
use serde_json::json;

use crate::CENTER;
use crate::round::{Round, round_seeds};

/// How long the database stays down (the fault's length, not a bound on anything).
const OUTAGE: Duration = Duration::from_secs(3);

const WRITE_FAILED: &str = "dispatch_bound_hits_total{bound=\"store_write_failed\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load_loses_no_acknowledged_transition() {
    let test = "postgres_stopped_and_started_under_load_loses_no_acknowledged_transition";
    let Some(mut pg) = PgServer::start(test) else {
        return;
    };
    let started = std::time::Instant::now();
    let seed = round_seeds()[0];
    let tag = format!("[PostgreSQL stopped under load, CRASH_SEED={seed}]");
    eprintln!("{tag} PostgreSQL at {}", pg.url());
    let server = Dispatchd::builder("pg-stopped")
        .flags(SHORT_TRIP_FLAGS)
        .flags(&["--database-timeout-ms", "2000"])
        .env("DISPATCH_STORE", "postgres")
        .env("DISPATCH_DATABASE_URL", &pg.url());
    let mut r = Round::register(server, tag.clone(), seed).await;
    assert!(
        r.server.log_text().contains("postgres postgres://"),
        "{tag} dispatchd did not start on PostgreSQL\n--- log ---\n{}",
        r.server.log_text()
    );
    // A rider far from the load (PICKUP is in another city), to probe with.
    let (_, probe_token, mut probe) = r.server.connected_rider("Probe").await;
    let (apps, registrar) = r.load().await;
    r.wait_for_load(60).await;
    let failed_before = r.server.metric(WRITE_FAILED).await.unwrap_or(0.0);

    // The database crashes mid-load.
    r.ledger.lock().unwrap().store_outage = true;
    let down_at = std::time::Instant::now();
    tokio::task::block_in_place(|| pg.crash());
    let (st, v) = r
        .server
        .post(
            "/v1/riders",
            None,
            json!({"name": "While down", "phone": "+15550100"}),
        )
        .await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (503, &json!("unavailable")),
        "{tag} a registration while PostgreSQL is down: {v}"
    );
    let code = probe
        .err(json!({"type": "request_ride", "pickup": point(PICKUP), "dropoff": point(DROPOFF), "product": "economy"}))
        .await;
    assert_eq!(code, "unavailable", "{tag} a ride request while down");
    eprintln!(
        "{tag} refusals seen {:.1} s after the crash",
        down_at.elapsed().as_secs_f64()
    );
    // What clients knew once the outage was plain. A trip_update of a commit made just
    // before the crash may still be on its way: a moment for it to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (known, acks) = {
        let l = r.ledger.lock().unwrap();
        (versions_seen(&l), l.acks.len())
    };
    // Reads of what is in memory go on, and the server stays ready.
    let live = {
        let l = r.ledger.lock().unwrap();
        l.trips
            .iter()
            .filter(|(_, s)| !s.latest().1.is_final())
            .find_map(|(id, seen)| {
                let token = r.riders.iter().find(|(rid, _)| *rid == seen.rider_id)?;
                Some((id.clone(), token.1.clone()))
            })
    };
    if let Some((id, token)) = &live {
        let (st, v) = r.server.get(&format!("/v1/trips/{id}"), Some(token)).await;
        assert_eq!(
            st, 200,
            "{tag} a live trip read from memory while down: {v}"
        );
    }
    let (st, v) = r
        .server
        .get(
            &format!("/v1/drivers/nearby?lat={}&lng={}", CENTER.0, CENTER.1),
            Some(&probe_token),
        )
        .await;
    assert_eq!(st, 200, "{tag} nearby while down: {v}");
    let ready = r.server.http.get(r.server.url("/readyz")).send().await;
    assert_eq!(
        ready.map(|r| r.status().as_u16()).ok(),
        Some(200),
        "{tag} /readyz while PostgreSQL is down (only writes are refused)"
    );
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    {
        let l = r.ledger.lock().unwrap();
        let told: Vec<_> = versions_seen(&l).difference(&known).cloned().collect();
        assert!(
            told.is_empty() && l.acks.len() == acks,
            "{tag} while PostgreSQL was down, clients were told of trip versions {told:?} and {} trip commands were acknowledged\n--- log ---\n{}",
            l.acks.len() - acks,
            r.server.log_text()
        );
    }
    let failed_during = r.server.metric(WRITE_FAILED).await.unwrap_or(0.0);
    let restart_at = std::time::Instant::now();
    tokio::task::block_in_place(|| pg.restart());
    eprintln!(
        "{tag} PostgreSQL down for {:.1} s (its start took {:.1} s); {} refusals to the load's apps, {} trip writes counted failed",
        down_at.elapsed().as_secs_f64(),
        restart_at.elapsed().as_secs_f64(),
        r.ledger.lock().unwrap().refused,
        failed_during - failed_before
    );

    // Back, and dispatchd was not restarted: writes resume by themselves.
    let server = &r.server;
    eventually_within("a registration succeeds again", SLOW, || async move {
        let (st, _) = server
            .post(
                "/v1/riders",
                None,
                json!({"name": "After", "phone": "+15550100"}),
            )
            .await;
        (st == 201).then_some(())
    })
    .await;
    let ride = tokio::time::timeout(SLOW, ride_to(&r.server, TripState::Completed))
        .await
        .unwrap_or_else(|_| {
            panic!("{tag} no new ride completed within {SLOW:?} of PostgreSQL's return")
        });
    assert_eq!(ride.trip.state, TripState::Completed);
    drop(ride);
    drop(probe);

    // The apps retried what was refused: the load goes on. Then the crash round's end:
    // kill -9 under load, and every check.
    let resumed_at = r.ledger.lock().unwrap().updates;
    let at_kill = r.kill_under_load(apps, registrar, resumed_at + 30).await;
    r.restart_and_check(at_kill, started).await;
    drop(pg);
}

/// Every (trip, version) any client has been told of.
fn versions_seen(l: &crate::ledger::Ledger) -> std::collections::BTreeSet<(String, u64)> {
    l.trips
        .iter()
        .flat_map(|(id, s)| s.at.keys().map(move |v| (id.clone(), *v)))
        .collect()
}
