//! Standby takeover (issue 16, first slice): three `dispatchd` nodes (`--node-name n1..n3
//! --lease-ttl-ms 2000`) on one PostgreSQL of the test's own ([`PgServer`]), the first
//! of them the leader.
//!
//! - Exactly one node is ready; the others' `/readyz` (503) name it and its epoch.
//! - kill -9 of the leader under load (the crash round's rides over WebSockets): a
//!   standby is ready within [`SLOW`] (the takeover time is measured and printed), the
//!   other names it, the apps reconnect to it and get `welcome` with their state, and the
//!   crash round's checks all hold there (every acknowledged transition in the store, no
//!   driver in two trips, no trip in two states, every trip finished, the books
//!   balanced). Its SIGTERM hands the lease over (released: the next takes over at once).
//! - SIGSTOP of the leader under load, past its lease; riders of its own send ride
//!   requests into it while it is stopped. A standby takes over; then SIGCONT: the old
//!   leader tells no client anything more (no trip version, no acknowledgement), writes
//!   no trip (the `trips` table has the rows it had at the takeover), counts what it
//!   tried in `dispatch_cluster_fenced_commits_total`, and is a standby again, naming the
//!   new leader. The crash round's checks then hold on the new leader. The one frame a
//!   session may still get is the one its writer had checked against the term's clock
//!   just before the freeze and writes as the process resumes (no check inside the
//!   process can stop that); the node logs it with the time since its check, which must
//!   be at least half the pause, and at most one per session.
//! - The paused node, left the only standby, leads again when that leader stops (SIGTERM:
//!   the lease released): a second term in the same process, in which a ride completes.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch_tests::{
    Dispatchd, DispatchdBuilder, PgServer, SHORT_TRIP_FLAGS, SLOW, point, ride_to,
};
use dispatch_transport::server::ws::LATE_FRAME;
use dispatch_transport::wire::TripState;
use serde_json::json;
use tokio::time::Instant;

use crate::app::Session;
use crate::round::{Round, round_seeds};
use crate::{CENTER, from_center};

const TTL_MS: &str = "2000";

fn node(pg: &PgServer, name: &str) -> DispatchdBuilder {
    Dispatchd::builder(&format!("failover-{name}"))
        .flags(SHORT_TRIP_FLAGS)
        .flags(&[
            "--node-name",
            name,
            // Leader mode, said: sharded is the default.
            "--cluster-mode",
            "leader",
            "--lease-ttl-ms",
            TTL_MS,
            // Renewals more often than the default third: on a loaded 2-core CI machine
            // a renewal can take a second, and the deadline allows 1.4 s without one.
            "--lease-renew-ms",
            "400",
            "--database-timeout-ms",
            "2000",
        ])
        .env("DISPATCH_STORE", "postgres")
        .env("DISPATCH_DATABASE_URL", &pg.url())
}

/// `/readyz`: its status and body, or `None` when the node does not answer (in time).
async fn readyz(d: &Dispatchd) -> Option<(u16, String)> {
    let ask = async {
        let r = d.http.get(d.url("/readyz")).send().await.ok()?;
        let st = r.status().as_u16();
        Some((st, r.text().await.ok()?))
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

/// Waits until `d` is a standby whose `/readyz` names `leader` as the lease's holder;
/// the epoch it names.
async fn standby_naming(d: &Dispatchd, name: &str, leader: &str, tag: &str) -> u64 {
    let deadline = Instant::now() + SLOW;
    let want = format!("standby: {leader} holds the lease, epoch ");
    loop {
        let seen = readyz(d).await;
        if let Some((503, body)) = &seen
            && let Some(at) = body.find(&want)
        {
            let digits: String = body[at + want.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return digits.parse().expect("an epoch");
        }
        assert!(
            Instant::now() < deadline,
            "{tag} {name}'s /readyz does not name {leader} as the leader within {SLOW:?}: {seen:?}\n--- log ---\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the standbys until one is ready; its index, and how long after `since`.
async fn first_ready(
    standbys: &[(String, Dispatchd)],
    since: Instant,
    tag: &str,
) -> (usize, Duration) {
    let deadline = since + SLOW;
    loop {
        for (i, (_, d)) in standbys.iter().enumerate() {
            if readyz(d).await.is_some_and(|(st, _)| st == 200) {
                return (i, since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{tag} no standby took over within {SLOW:?}\n--- logs ---\n{}",
            standbys
                .iter()
                .map(|(n, d)| format!("{n}:\n{}", d.log_text()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signal(d: &Dispatchd, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &d.child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Rows of `table` in the shared database.
async fn rows(pg: &PgServer, table: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the test's PostgreSQL");
    let conn = tokio::spawn(conn);
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count rows")
        .get(0);
    drop(client);
    let _ = conn.await;
    n
}

/// Every (trip, version) any client has been told of (with the session told first), and
/// how many acknowledgements.
fn told(r: &Round) -> (BTreeMap<(String, u64), String>, usize) {
    let l = r.ledger.lock().unwrap();
    let versions = l
        .trips
        .iter()
        .flat_map(|(id, s)| {
            s.at.iter()
                .map(move |(v, (_, _, who))| ((id.clone(), *v), who.clone()))
        })
        .collect();
    (versions, l.acks.len())
}

/// The frames `log` says were checked against the term's clock and written after its
/// deadline ([`LATE_FRAME`]): per session ("driver <id>", "rider <id>", as the apps name
/// theirs), how long after its check each was written.
fn late_frames(log: &str) -> BTreeMap<String, Vec<Duration>> {
    let mut out: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(LATE_FRAME)) {
        let field = |key: &str| {
            let at = line.find(key)? + key.len();
            let v: String = line[at..]
                .chars()
                .take_while(|c| !matches!(c, ' ' | '}' | ':'))
                .collect();
            Some(v)
        };
        let who = match (field("driver_id="), field("rider_id=")) {
            (Some(d), _) => format!("driver {d}"),
            (None, Some(r)) => format!("rider {r}"),
            (None, None) => "a session the log does not name".to_owned(),
        };
        let ms = field("after_check_ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.entry(who).or_default().push(Duration::from_millis(ms));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_then_a_paused_leader() {
    let test = "a_standby_takes_over_a_killed_then_a_paused_leader";
    let Some(pg) = PgServer::start(test) else {
        return;
    };
    let seed = round_seeds()[0];
    let tag = format!("[failover, CRASH_SEED={seed}]");

    // n1 starts first and leads; n2 and n3 stand by, naming it.
    let n1 = node(&pg, "n1").start().await;
    let mut standbys: Vec<(String, Dispatchd)> = ["n2", "n3"]
        .into_iter()
        .map(|n| (n.to_owned(), node(&pg, n).spawn()))
        .collect();
    let mut epoch = 0;
    for (name, d) in &standbys {
        epoch = standby_naming(d, name, "n1", &tag).await;
    }
    assert_eq!(readyz(&n1).await.map(|r| r.0), Some(200), "{tag} n1 leads");

    // kill -9 of the leader under load.
    let started = std::time::Instant::now();
    let mut r = Round::on(n1, format!("{tag} [kill -9]"), seed).await;
    let (apps, registrar) = r.load().await;
    let at_kill = r.kill_under_load(apps, registrar, 60).await;
    let (i, took) = first_ready(&standbys, at_kill.at, &tag).await;
    let (leader, d) = standbys.remove(i);
    let other = &standbys[0];
    let next_epoch = standby_naming(&other.1, &other.0, &leader, &tag).await;
    assert!(
        next_epoch > epoch,
        "{tag} the epoch went from {epoch} to {next_epoch}"
    );
    eprintln!(
        "{tag} kill -9 of n1: {leader} ready {} ms after the kill (lease {TTL_MS} ms), epoch {epoch} -> {next_epoch}",
        took.as_millis()
    );
    let killed = std::mem::replace(&mut r.server, d);
    drop(killed);
    // The apps reconnect to the new leader; every check of a crash round there. It ends
    // with a SIGTERM of the leader, which hands the lease over.
    r.check_after(at_kill, started).await;
    let handed = Instant::now();
    let (_, took) = first_ready(&standbys, handed, &tag).await;
    let (leader, d) = standbys.remove(0);
    eprintln!(
        "{tag} SIGTERM of the leader: {leader} ready {} ms after it exited (the lease was released)",
        took.as_millis()
    );

    // Three nodes again: n1 comes back, and the node that was stopped too.
    let mut standbys: Vec<(String, Dispatchd)> = ["n1", if leader == "n2" { "n3" } else { "n2" }]
        .into_iter()
        .map(|n| (n.to_owned(), node(&pg, n).spawn()))
        .collect();
    for (name, s) in &standbys {
        epoch = standby_naming(s, name, &leader, &tag).await;
    }

    // SIGSTOP of the leader under load, past its lease.
    let started = std::time::Instant::now();
    let mut r = Round::on(d, format!("{tag} [SIGSTOP {leader}]"), seed ^ 1).await;
    // Riders of its own, to send requests into it while it is stopped.
    let mut probes = Vec::new();
    for i in 0..4 {
        let (id, token) = r.server.rider(&format!("Probe {i}")).await;
        let (s, _) = Session::open(&r.server, "rider", &id, &token, &r.ledger)
            .await
            .unwrap_or_else(|e| panic!("{tag} {e}"));
        probes.push(s);
    }
    let (apps, registrar) = r.load().await;
    r.wait_for_load(40).await;
    // What the paused node answers once it wakes (`unavailable`) is expected, not an
    // anomaly; what must not happen is checked below.
    r.ledger.lock().unwrap().store_outage = true;
    let paused = Instant::now();
    signal(&r.server, "-STOP");
    for (i, p) in probes.iter_mut().enumerate() {
        let pickup = from_center(0.001 * i as f64, 0.001);
        let sent = p
            .send_req(
                json!({"type": "request_ride", "pickup": point(pickup), "dropoff": point(CENTER), "product": "economy"}),
                "request_ride",
                None,
            )
            .await;
        assert!(sent, "{tag} a probe's request into the stopped leader");
    }
    let (i, took) = first_ready(&standbys, paused, &tag).await;
    let (new_leader, d) = standbys.remove(i);
    eprintln!(
        "{tag} SIGSTOP of {leader}: {new_leader} ready {} ms after the stop",
        took.as_millis()
    );
    let (versions, acks) = told(&r);
    let trips = rows(&pg, "trips").await;
    let frozen = paused.elapsed();
    signal(&r.server, "-CONT");
    // It wakes past its deadline: a standby again, naming the new leader.
    let woke = standby_naming(&r.server, &leader, &new_leader, &tag).await;
    assert!(
        woke > epoch,
        "{tag} the epoch after the pause: {woke}, before {epoch}"
    );
    // Its sessions are closed; the probes' requests were never answered.
    for mut p in probes {
        while let Ok(Some(m)) = tokio::time::timeout(SLOW, p.recv()).await {
            p.note(&m);
        }
    }
    let at_pause = r.apps_ended(apps, registrar, paused).await;
    // What clients were told from then on ("after its lease ended": the standby that is
    // ready claimed the lease only once it had expired by the database's clock), by
    // session: each new trip version (for the session told it first) and each
    // acknowledgement. Everything it wrote before the pause had reached the apps by then
    // (they read all the time, and the pause lasted over a second); a frame noted late
    // for any other reason fails below, with no late write logged for it.
    let mut late: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (versions_after, _) = told(&r);
    for ((id, v), who) in &versions_after {
        if !versions.contains_key(&(id.clone(), *v)) {
            late.entry(who.clone())
                .or_default()
                .push(format!("trip {id} v{v}"));
        }
    }
    for a in &r.ledger.lock().unwrap().acks[acks..] {
        late.entry(a.who.clone())
            .or_default()
            .push(format!("ack of {} of trip {}", a.cmd, a.trip_id));
    }
    // The one thing no check in the node can prevent: a frame whose session writer
    // checked the term's clock before the process was frozen, and wrote it (to the
    // socket) as it resumed. At most one per session, written at least half the pause
    // after its check (the node logs each frame it writes past the deadline, with that
    // time). Any other frame was checked after the deadline, or not at all.
    let log = r.server.log_text();
    let written_late = late_frames(&log);
    let unexcused: Vec<_> = late
        .iter()
        .filter(|(who, frames)| {
            let checked_before_the_pause = written_late
                .get(*who)
                .map_or(0, |w| w.iter().filter(|d| **d >= frozen / 2).count());
            frames.len() > checked_before_the_pause.min(1)
        })
        .collect();
    assert!(
        unexcused.is_empty(),
        "{tag} after its lease ended, {leader} told clients {unexcused:?} (frozen {} ms; \
         frames it wrote past its deadline, by session and time since their check: {written_late:?})\n--- log ---\n{log}",
        frozen.as_millis()
    );
    if !late.is_empty() {
        eprintln!(
            "{tag} {leader} was frozen between the check and the write of {late:?}: written as it resumed ({written_late:?} after the check)"
        );
    }
    let trips_after = rows(&pg, "trips").await;
    assert_eq!(
        trips_after,
        trips,
        "{tag} {leader} wrote trips after its lease ended\n--- log ---\n{}",
        r.server.log_text()
    );
    let fenced = r
        .server
        .metric("dispatch_cluster_fenced_commits_total")
        .await
        .unwrap_or(0.0);
    let ended: f64 = {
        let mut n = 0.0;
        for cause in ["expired", "lost", "fenced"] {
            n += r
                .server
                .metric(&format!(
                    "dispatch_cluster_terms_ended_total{{cause=\"{cause}\"}}"
                ))
                .await
                .unwrap_or(0.0);
        }
        n
    };
    // Once by the pause; a loaded machine may have ended an earlier term of its too.
    assert!(
        ended >= 1.0,
        "{tag} {leader}'s term did not end by its lease"
    );
    eprintln!(
        "{tag} {leader} woke as a standby; {fenced} of its commits were refused by the fence; the trips table kept its {trips} rows"
    );
    r.ledger.lock().unwrap().store_outage = false;
    let paused_node = std::mem::replace(&mut r.server, d);
    // The paused node is left the only standby, so that it leads once more when the new
    // leader stops: a second term in the same process.
    for (_, s) in standbys {
        s.stop_clean().await;
    }
    r.check_after(at_pause, started).await;
    let handed = Instant::now();
    let solo = vec![(leader.clone(), paused_node)];
    let (_, took) = first_ready(&solo, handed, &tag).await;
    eprintln!(
        "{tag} {leader} leads again, {} ms after the SIGTERM of {new_leader}: a second term in one process",
        took.as_millis()
    );
    let (_, again) = solo.into_iter().next().expect("the node");
    let ride = tokio::time::timeout(SLOW, ride_to(&again, TripState::Completed))
        .await
        .unwrap_or_else(|_| panic!("{tag} no ride completed in the second term within {SLOW:?}"));
    assert_eq!(ride.trip.state, TripState::Completed);
    drop(ride);
    again.stop_clean().await;
    drop(pg);
}
