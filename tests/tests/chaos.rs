//! The chaos test (issue 7): `loadgen` against the real `dispatchd` binary, and the
//! server killed with SIGKILL and restarted twice during the run; afterwards every
//! acknowledged trip transition is still there, no trip is in two states, and the
//! ledger balances.
//!
//! - `dispatchd` runs as a child on a fixed port (below the ephemeral range, so no
//!   client socket can take it while the server is down) and a temporary `--data-dir`;
//!   it is restarted on the same port and data directory, and each start waits for
//!   `/readyz`.
//! - `loadgen` runs as a child with `--reconnect` (its drivers and riders reconnect with
//!   their tokens and resume from the `welcome`) and `--ack-log`, a JSON line for every
//!   `trip_update`, every `ack` of a command that moves a trip, and every `welcome`.
//! - The kills are driven by the ack log, not by the clock: the first once trips have
//!   completed and others are in flight; the second once trips have completed since the
//!   first restart, every client has reconnected, and trips are in flight again.
//! - Then, through the admin API: every trip appears once in `GET /admin/trips`; its
//!   history (`GET /admin/trips/{id}`) is one legal path of the trip state machine,
//!   version by version, ending in the stored state; every transition in the ack log is
//!   in that history (the state at its version, an acked command's state by its sender);
//!   trips still live are cancelled by the admin, and the ledger balances with nothing
//!   held, every finished trip settled, every completed trip captured once.
//! - So that it cannot pass vacuously: enough trips completed, some of them across a
//!   kill; every client reconnected after each kill; trips completed after the last
//!   restart; and loadgen's report agrees (no client gave up).
//!
//! `CHAOS_SEED=<n>` fixes loadgen's city (the timing is the machine's). Every wait polls
//! with a generous deadline; every child is killed by a guard if the test fails.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use dispatch_tests::diagram::{self, can_move, has_driver};
use dispatch_tests::loadgen::{Loadgen, LoadgenArgs};
use dispatch_tests::{
    Dispatchd, SHORT_TRIP_FLAGS, assert_books_settled, assert_clean_log, assert_payments_settled,
    now_ms, rfc3339_ms,
};
use dispatch_transport::wire::TripState;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

const ADMIN: &str = "chaos-admin-token-0123456789abcdef";

const DRIVERS: usize = 30;
const RIDERS: usize = 24;
/// Loadgen's request window and drain: long enough for two kills with trips completing
/// around them on a slow machine; the drain ends early once every trip has ended.
const DURATION_S: u64 = 40;
const DRAIN_S: u64 = 20;

// ---------------------------------------------------------------------------------------
// The binaries

/// A port below the ephemeral range (`ip_local_port_range`), free now: while the server
/// is down, no outgoing client socket can be given it (nor connect to itself on it).
fn spare_port() -> u16 {
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32_768);
    let (lo, hi) = (
        low.saturating_sub(12_000).max(1_024),
        low.saturating_sub(1_000),
    );
    let mut x = now_ms() as u32 ^ std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let p = (lo + x % (hi - lo)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in {lo}..{hi}");
}

// ---------------------------------------------------------------------------------------
// The ack log

/// One line of loadgen's `--ack-log`.
#[derive(Debug, Clone, Deserialize)]
struct Line {
    at_ms: u64,
    role: String,
    id: String,
    kind: String,
    trip_id: Option<String>,
    state: Option<TripState>,
    version: Option<u64>,
    cmd: Option<String>,
    #[serde(default)]
    reconnect: bool,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{} {} {} at {}: trip {:?} state {:?} v{:?} cmd {:?}]",
            self.kind,
            self.role,
            self.id,
            self.at_ms,
            self.trip_id,
            self.state,
            self.version,
            self.cmd
        )
    }
}

/// Reads the ack log; with `complete`, every line must parse (loadgen has exited),
/// otherwise a line being written may be skipped.
fn read_acks(path: &Path, complete: bool) -> Vec<Line> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Line>(l) {
            Ok(x) => out.push(x),
            Err(e) => assert!(!complete, "an ack log line that does not parse ({e}): {l}"),
        }
    }
    if complete {
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "the ack log ends with an incomplete line"
        );
    }
    out
}

/// What the ack log shows so far: completions (with when), and trips in flight (the
/// latest update of a trip has a driver on it).
struct Progress {
    completed_at: Vec<u64>,
    /// When each trip's request was answered (its v1 `dispatching`).
    created_at: Vec<u64>,
    in_flight: usize,
}

fn progress(acks: &[Line]) -> Progress {
    let mut latest: HashMap<&str, (u64, TripState)> = HashMap::new();
    let mut completed: HashMap<&str, u64> = HashMap::new();
    let mut created: HashMap<&str, u64> = HashMap::new();
    for l in acks.iter().filter(|l| l.kind == "trip_update") {
        let (Some(t), Some(s), Some(v)) = (&l.trip_id, l.state, l.version) else {
            continue;
        };
        let e = latest.entry(t).or_insert((v, s));
        if v >= e.0 {
            *e = (v, s);
        }
        if s == TripState::Completed {
            completed.entry(t).or_insert(l.at_ms);
        }
        if v == 1 {
            created.entry(t).or_insert(l.at_ms);
        }
    }
    Progress {
        completed_at: completed.into_values().collect(),
        created_at: created.into_values().collect(),
        in_flight: latest.values().filter(|(_, s)| has_driver(*s)).count(),
    }
}

/// Polls the ack log until `ready` says so; fails after `within`, or if a child died.
async fn wait_for_load(
    what: &str,
    acks: &Path,
    server: &mut Dispatchd,
    loadgen: &mut Loadgen,
    within: Duration,
    ready: impl Fn(&[Line]) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let lines = read_acks(acks, false);
        if ready(&lines) {
            return;
        }
        assert!(
            server.running(),
            "dispatchd died under load (waiting for {what})\n--- log ---\n{}",
            server.log_text()
        );
        if let Some(st) = loadgen.child.try_wait().expect("try_wait") {
            panic!(
                "loadgen ended ({st}) while waiting for {what}\n{}",
                loadgen.output()
            );
        }
        let p = progress(&lines);
        assert!(
            Instant::now() < deadline,
            "the load stalled: no {what} within {within:?} ({} ack lines, {} completed, {} in flight)\n{}",
            lines.len(),
            p.completed_at.len(),
            p.in_flight,
            loadgen.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The trip as the admin history shows it

/// The state an acknowledged command moved its trip to.
fn state_after(cmd: &str) -> TripState {
    diagram::state_after(cmd)
        .unwrap_or_else(|| panic!("an ack log line for a command that moves no trip: {cmd}"))
}

/// One entry of `GET /admin/trips/{id}`'s history.
#[derive(Debug, Clone, Deserialize)]
struct Transition {
    from: Option<TripState>,
    to: TripState,
    by: String,
    driver_id: Option<String>,
    at: String,
    version: u64,
}

struct Stored {
    trip: Value,
    history: Vec<Transition>,
    payments: Vec<Value>,
}

impl Stored {
    fn state(&self) -> TripState {
        serde_json::from_value(self.trip["state"].clone()).expect("trip.state")
    }

    /// The entry that made version `v`.
    fn at_version(&self, v: u64) -> Option<&Transition> {
        self.history.iter().find(|t| t.version == v)
    }

    fn steps(&self) -> Vec<&str> {
        self.payments
            .iter()
            .filter_map(|e| e["step"].as_str())
            .collect()
    }
}

/// The history is one legal path: v1 the request, then one version per transition,
/// each from the state before it, final states only at the end, ending where the trip
/// is stored.
fn check_history(id: &str, s: &Stored) {
    let h = &s.history;
    let show = || format!("trip {id}: {}\nhistory {h:#?}", s.trip);
    assert!(!h.is_empty(), "no history: {}", show());
    assert_eq!(
        (h[0].from, h[0].to, h[0].version, h[0].by.as_str()),
        (None, TripState::Dispatching, 1, "rider"),
        "the first entry is not the request: {}",
        show()
    );
    for (i, w) in h.windows(2).enumerate() {
        let (a, b) = (&w[0], &w[1]);
        assert_eq!(
            b.version,
            i as u64 + 2,
            "versions not consecutive: {}",
            show()
        );
        assert_eq!(
            b.from,
            Some(a.to),
            "an entry does not start where the previous ended: {}",
            show()
        );
        assert!(
            can_move(a.to, b.to),
            "illegal transition {} → {}: {}",
            diagram::name(a.to),
            diagram::name(b.to),
            show()
        );
        assert!(
            rfc3339_ms(&a.at) <= rfc3339_ms(&b.at),
            "time runs back: {}",
            show()
        );
    }
    let last = h.last().unwrap();
    assert_eq!(
        (s.state(), s.trip["version"].as_u64()),
        (last.to, Some(last.version)),
        "the stored trip is not where its history ends: {}",
        show()
    );
}

/// Every line of the ack log about trip `id` is in its stored history: an update's (or a
/// welcome's) state at its version, an acknowledged command's state by its sender; and
/// the stored trip is the last acknowledged state or, along the history, a successor of
/// it (the same, if that state was final). Returns how many lines it checked.
fn check_acks(id: &str, s: &Stored, lines: &[&Line]) -> usize {
    let show = |l: &Line| {
        format!(
            "{l}\ntrip {id} is stored as {}\nhistory {:#?}\nits ack log lines: {:#?}",
            s.trip, s.history, lines
        )
    };
    let mut latest: Option<(u64, TripState)> = None;
    for l in lines {
        match l.kind.as_str() {
            "trip_update" | "welcome" => {
                let (Some(v), Some(st)) = (l.version, l.state) else {
                    panic!("a line without version or state: {l}");
                };
                let e = s.at_version(v);
                assert!(
                    e.is_some_and(|e| e.to == st),
                    "acknowledged v{v} {} is not in the history: {}",
                    diagram::name(st),
                    show(l)
                );
                if latest.is_none_or(|(lv, _)| v > lv) {
                    latest = Some((v, st));
                }
            }
            "ack" => {
                let cmd = l.cmd.as_deref().expect("an ack line names its command");
                let to = state_after(cmd);
                let found = s.history.iter().any(|e| {
                    e.to == to
                        && e.by == l.role
                        && (l.role != "driver" || e.driver_id.as_deref() == Some(&l.id))
                });
                assert!(
                    found,
                    "acknowledged {cmd} ({} {}) has no {} by it in the history: {}",
                    l.role,
                    l.id,
                    diagram::name(to),
                    show(l)
                );
            }
            other => panic!("an ack log line of unknown kind {other}: {l}"),
        }
    }
    if let Some((v, st)) = latest {
        let now_v = s.trip["version"].as_u64().unwrap_or(0);
        assert!(
            now_v >= v,
            "trip {id}: a client saw v{v} {st:?}, the server has v{now_v} {:?}",
            s.state()
        );
        if st.is_final() {
            assert_eq!(
                (now_v, s.state()),
                (v, st),
                "trip {id} was {st:?} for a client and changed since"
            );
        }
    }
    lines.len()
}

// ---------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_through_two_kill_9s_loses_no_acknowledged_transition() {
    let started = std::time::Instant::now();
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| now_ms() % 1_000_000);
    eprintln!("chaos: loadgen --seed {seed} (replay the city with CHAOS_SEED={seed})");
    let work = tempfile::tempdir().expect("a temporary directory");
    let acks = work.path().join("acks.jsonl");
    let report_path = work.path().join("report.json");
    let port = spare_port();
    let mut server = Dispatchd::builder("chaos")
        .port(port)
        .flags(SHORT_TRIP_FLAGS)
        .flags(&["--admin-token", ADMIN])
        .start()
        .await;
    let mut logs = Vec::new();

    let (out, err) = (
        work.path().join("loadgen.out"),
        work.path().join("loadgen.err"),
    );
    let url = format!("ws://127.0.0.1:{port}");
    let args = LoadgenArgs::new(&[
        "--url",
        &url,
        "--drivers",
        &DRIVERS.to_string(),
        "--riders",
        &RIDERS.to_string(),
        "--request-rate",
        "1.2",
        "--duration",
        &format!("{DURATION_S}s"),
        "--drain",
        &format!("{DRAIN_S}s"),
        "--time-scale",
        "60",
        "--radius-km",
        "4",
        "--ping-interval-ms",
        "1000",
        "--decision-delay-ms",
        "300-1500",
        "--cancel-prob",
        "0.1",
        "--cancel-delay-ms",
        "500-6000",
        "--seed",
        &seed.to_string(),
    ])
    .recorded(&acks, &report_path);
    let lg_started = std::time::Instant::now();
    let mut loadgen = args.spawn(out, err);

    // Kill 1: trips have completed, and others are in flight.
    wait_for_load(
        "3 completed trips with 2 in flight",
        &acks,
        &mut server,
        &mut loadgen,
        Duration::from_secs(60),
        |l| {
            let p = progress(l);
            p.completed_at.len() >= 3 && p.in_flight >= 2
        },
    )
    .await;
    let kill1 = now_ms();
    server.kill9();
    logs.push(server.log_text());
    let mut server = server.restart().await;
    let restart1 = now_ms();
    eprintln!(
        "chaos: killed {:.1} s into the loadgen run, ready again {} ms later",
        lg_started.elapsed().as_secs_f64(),
        restart1 - kill1
    );

    // Kill 2: every client is back, trips completed since, and others are in flight.
    let clients: BTreeSet<String> = read_acks(&acks, false)
        .into_iter()
        .filter(|l| l.kind == "welcome" && !l.reconnect)
        .map(|l| l.id)
        .collect();
    assert_eq!(
        clients.len(),
        DRIVERS + RIDERS,
        "not every client had its first welcome before the first kill\n{}",
        loadgen.output()
    );
    let back_after = |l: &[Line], t: u64| -> usize {
        l.iter()
            .filter(|x| x.kind == "welcome" && x.reconnect && x.at_ms > t)
            .map(|x| x.id.as_str())
            .collect::<BTreeSet<_>>()
            .len()
    };
    wait_for_load(
        "every client back, 6 trips requested and 4 completed since the restart, 2 in flight",
        &acks,
        &mut server,
        &mut loadgen,
        Duration::from_secs(60),
        |l| {
            let p = progress(l);
            back_after(l, kill1) == DRIVERS + RIDERS
                && p.completed_at.iter().filter(|&&t| t > restart1).count() >= 4
                && p.created_at.iter().filter(|&&t| t > restart1).count() >= 6
                && p.in_flight >= 2
        },
    )
    .await;
    let kill2 = now_ms();
    server.kill9();
    logs.push(server.log_text());
    let server = server.restart().await;
    let restart2 = now_ms();
    eprintln!(
        "chaos: killed again {:.1} s into the loadgen run, ready again {} ms later",
        lg_started.elapsed().as_secs_f64(),
        restart2 - kill2
    );

    // loadgen ends by itself (request window, then the drain).
    let deadline = Instant::now() + Duration::from_secs(DURATION_S + DRAIN_S + 60);
    let mut server = server;
    let status = loop {
        if let Some(st) = loadgen.child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            server.running(),
            "dispatchd died after the second restart\n--- log ---\n{}",
            server.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "loadgen still runs after {:?}\n{}",
            Duration::from_secs(DURATION_S + DRAIN_S + 60),
            loadgen.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let run_s = lg_started.elapsed().as_secs_f64();
    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&report_path)
            .unwrap_or_else(|e| panic!("loadgen's --json report: {e}\n{}", loadgen.output())),
    )
    .expect("loadgen's report is JSON");
    assert_eq!(
        status.code(),
        Some(0),
        "loadgen failed a check ({status})\n{}",
        loadgen.output()
    );
    let acks = read_acks(&acks, true);

    // Loadgen: every client came back after each kill, and none gave up.
    let rc = &report["reconnect"];
    let clients_n = (DRIVERS + RIDERS) as u64;
    assert_eq!(
        rc["gave_up"],
        json!(0),
        "clients gave up reconnecting\n{}",
        loadgen.output()
    );
    assert!(
        rc["reconnected"].as_u64().unwrap_or(0) >= 2 * clients_n
            && rc["sessions_dropped"].as_u64().unwrap_or(0) >= 2 * clients_n,
        "every client should have dropped and reconnected twice: {rc}\n{}",
        loadgen.output()
    );
    let back1 = acks
        .iter()
        .filter(|x| x.kind == "welcome" && x.reconnect && x.at_ms > kill1 && x.at_ms < kill2)
        .map(|x| x.id.clone())
        .collect::<BTreeSet<_>>();
    let back2 = acks
        .iter()
        .filter(|x| x.kind == "welcome" && x.reconnect && x.at_ms > kill2)
        .map(|x| x.id.clone())
        .collect::<BTreeSet<_>>();
    assert_eq!(back1, clients, "clients not back between the kills");
    assert_eq!(back2, clients, "clients not back after the second kill");
    let unexpected = report["errors"]["unexpected"].as_u64().unwrap_or(0);
    let anomalies = report["anomalies"].as_object().map_or(0, |a| a.len());

    // Every trip, once.
    let mut listed: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/trips?limit=1000&cursor={c}"),
            None => "/admin/trips?limit=1000".to_owned(),
        };
        let page = server.get_ok(&path, ADMIN).await;
        for t in page["trips"].as_array().expect("trips") {
            listed.push(t["trip_id"].as_str().expect("trip_id").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "a trip is listed twice by GET /admin/trips"
    );
    let by_trip: BTreeMap<&str, Vec<&Line>> = acks
        .iter()
        .filter_map(|l| l.trip_id.as_deref().map(|t| (t, l)))
        .fold(BTreeMap::new(), |mut m, (t, l)| {
            m.entry(t).or_default().push(l);
            m
        });
    for t in by_trip.keys() {
        assert!(
            unique.contains(&t.to_string()),
            "trip {t} was acknowledged to a client but is not in GET /admin/trips: {:#?}",
            by_trip[t]
        );
    }

    // Every trip's history is one legal path ending where the trip is stored.
    let mut stored: BTreeMap<String, Stored> = BTreeMap::new();
    for id in &listed {
        let v = server.get_ok(&format!("/admin/trips/{id}"), ADMIN).await;
        let s = Stored {
            history: serde_json::from_value(v["history"].clone())
                .unwrap_or_else(|e| panic!("trip {id}: history: {e}: {v}")),
            payments: v["payments"].as_array().cloned().unwrap_or_default(),
            trip: v["trip"].clone(),
        };
        check_history(id, &s);
        stored.insert(id.clone(), s);
    }

    // Every acknowledged transition is in its trip's history.
    let checked: usize = by_trip
        .iter()
        .map(|(id, lines)| check_acks(id, &stored[*id], lines))
        .sum();

    // No driver on two live trips, no rider with two.
    let mut drivers_live: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut riders_live: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, s) in &stored {
        if s.state().is_final() {
            continue;
        }
        riders_live
            .entry(s.trip["rider_id"].as_str().unwrap_or("?"))
            .or_default()
            .push(id);
        if has_driver(s.state()) {
            drivers_live
                .entry(s.trip["driver_id"].as_str().expect("a driver"))
                .or_default()
                .push(id);
        }
    }
    for (who, trips) in drivers_live.iter().chain(riders_live.iter()) {
        assert_eq!(trips.len(), 1, "{who} is on several live trips: {trips:?}");
    }

    // The crashes were exercised: trips completed, some across a kill, some after the
    // last restart.
    let completed: Vec<(&String, u64, u64)> = stored
        .iter()
        .filter(|(_, s)| s.state() == TripState::Completed)
        .map(|(id, s)| {
            (
                id,
                rfc3339_ms(&s.history[0].at),
                rfc3339_ms(&s.history.last().unwrap().at),
            )
        })
        .collect();
    let across = |k: u64| {
        completed
            .iter()
            .filter(|(_, a, b)| *a < k && *b > k)
            .count()
    };
    let (across1, across2) = (across(kill1), across(kill2));
    let after_last = completed.iter().filter(|(_, _, b)| *b > restart2).count();
    let summary = format!(
        "{} trips ({} completed: {across1} across the first kill, {across2} across the second, {after_last} after the last restart); \
         {} ack log lines, {checked} acknowledged transitions checked; loadgen: {} reconnects, {} sessions dropped, {} requests unknown, {} trips adopted, {} unexpected errors, {} anomalies",
        stored.len(),
        completed.len(),
        acks.len(),
        rc["reconnected"],
        rc["sessions_dropped"],
        rc["requests_unknown"],
        rc["trips_adopted"],
        unexpected,
        anomalies,
    );
    assert!(
        completed.len() >= 10 && across1 + across2 >= 2 && after_last >= 1,
        "the run did not exercise the crashes enough: {summary}\n{}",
        loadgen.output()
    );

    // Money: finish what is still live (an admin's cancel releases its hold), then the
    // books balance with nothing held, every finished trip is settled, and every
    // completed trip was captured exactly once.
    let mut cancelled_live = 0;
    for (id, s) in &stored {
        if !s.state().is_final() {
            let (status, v) = server
                .post(
                    &format!("/admin/trips/{id}/cancel"),
                    Some(ADMIN),
                    json!({"reason": "chaos test: the run is over"}),
                )
                .await;
            if status == 409 {
                // It ended by itself meanwhile (its dispatch deadline).
                let now = server.get_ok(&format!("/admin/trips/{id}"), ADMIN).await;
                assert!(
                    serde_json::from_value::<TripState>(now["trip"]["state"].clone())
                        .is_ok_and(TripState::is_final),
                    "admin cancel of {id}: 409 {v}, and it is {}",
                    now["trip"]
                );
            } else {
                assert_eq!(
                    (status, &v["state"]),
                    (200, &json!("cancelled")),
                    "admin cancel of {id}: {v}"
                );
                cancelled_live += 1;
            }
        }
    }
    let books = server.get_ok("/admin/ledger", ADMIN).await;
    assert_books_settled(&books, "once every trip has ended");
    for id in &listed {
        let v = server.get_ok(&format!("/admin/trips/{id}"), ADMIN).await;
        let s = Stored {
            history: Vec::new(),
            payments: v["payments"].as_array().cloned().unwrap_or_default(),
            trip: v["trip"].clone(),
        };
        assert_payments_settled(
            &s.steps(),
            s.state() == TripState::Completed,
            &format!("trip {id} ({:?})", s.state()),
        );
    }

    logs.push(server.log_text());
    for (i, log) in logs.iter().enumerate() {
        assert_clean_log(&format!("dispatchd #{i}"), log);
    }
    eprintln!(
        "{}",
        std::fs::read_to_string(&loadgen.out).unwrap_or_default()
    );
    eprintln!(
        "chaos: {summary}; {cancelled_live} live trips cancelled at the end; books {}; loadgen ran {:.1} s, the test {:.1} s",
        books["accounts"],
        run_s,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// The checks themselves catch what they are for

/// A state by its wire name.
fn state(name: &str) -> TripState {
    serde_json::from_value(json!(name)).expect("a state's wire name")
}

fn fake(history: &[(u64, &str)], lines: &[(&str, u64, &str)]) -> (Stored, Vec<Line>) {
    let h: Vec<Transition> = history
        .iter()
        .enumerate()
        .map(|(i, &(v, to))| Transition {
            from: (i > 0).then(|| state(history[i - 1].1)),
            to: state(to),
            by: if v == 1 { "rider" } else { "driver" }.to_owned(),
            driver_id: (v > 1).then(|| "drv_1".to_owned()),
            at: format!("2026-01-01T00:00:0{v}.000Z"),
            version: v,
        })
        .collect();
    let (v, st) = *history.last().unwrap();
    let s = Stored {
        trip: json!({"trip_id": "trp_1", "state": st, "version": v}),
        history: h,
        payments: Vec::new(),
    };
    let l = lines
        .iter()
        .map(|&(kind, v, st)| Line {
            at_ms: 0,
            role: "driver".into(),
            id: "drv_1".into(),
            kind: kind.into(),
            trip_id: Some("trp_1".into()),
            state: (kind != "ack").then(|| state(st)),
            version: (kind != "ack").then_some(v),
            cmd: (kind == "ack").then(|| st.to_owned()),
            reconnect: false,
        })
        .collect();
    (s, l)
}

#[test]
fn the_checks_pass_a_sound_trip() {
    let (s, l) = fake(
        &[
            (1, "dispatching"),
            (2, "driver_assigned"),
            (3, "driver_arrived"),
        ],
        &[("trip_update", 2, "driver_assigned"), ("ack", 0, "accept")],
    );
    check_history("trp_1", &s);
    assert_eq!(check_acks("trp_1", &s, &l.iter().collect::<Vec<_>>()), 2);
}

#[test]
#[should_panic(expected = "is not in the history")]
fn the_checks_catch_a_lost_acknowledged_transition() {
    let (s, l) = fake(
        &[(1, "dispatching"), (2, "driver_assigned")],
        &[("trip_update", 3, "driver_arrived")],
    );
    check_acks("trp_1", &s, &l.iter().collect::<Vec<_>>());
}

#[test]
#[should_panic(expected = "has no driver_arrived by it")]
fn the_checks_catch_a_lost_acknowledged_command() {
    let (s, l) = fake(
        &[(1, "dispatching"), (2, "driver_assigned")],
        &[("ack", 0, "arrived")],
    );
    check_acks("trp_1", &s, &l.iter().collect::<Vec<_>>());
}

#[test]
#[should_panic(expected = "illegal transition")]
fn the_checks_catch_a_trip_in_two_states() {
    let (s, _) = fake(
        &[(1, "dispatching"), (2, "driver_assigned"), (3, "completed")],
        &[],
    );
    check_history("trp_1", &s);
}

#[test]
#[should_panic(expected = "changed since")]
fn the_checks_catch_a_final_state_that_moved() {
    let (mut s, l) = fake(
        &[(1, "dispatching"), (2, "cancelled")],
        &[("trip_update", 2, "cancelled")],
    );
    s.trip["version"] = json!(3);
    s.trip["state"] = json!("completed");
    check_acks("trp_1", &s, &l.iter().collect::<Vec<_>>());
}
