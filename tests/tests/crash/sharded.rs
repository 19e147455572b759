//! kill -9 of a sharded node under load (issue 16 item 5, `docs/sharding.md` §7): three
//! `dispatchd --cluster-mode sharded --lease-ttl-ms 2000` nodes on one fresh PostgreSQL
//! database, the crash round's apps ([`Round`]) over WebSockets.
//!
//! - Everyone is registered on K, the owner of the rides' pickup cell shard (so the
//!   accounts' entity shards and every trip are K's); each app connects to the nodes in
//!   turn (2 of 3 relayed to K). Under load, with trips live on K, kill -9 of K.
//! - Timed in the store: right after the kill the test reads, on its own connection,
//!   every trip live on a shard K held and its version (`trips.ver`), then every
//!   [`POLL`] until each version rose. That instant minus the kill is the trip's time to
//!   move again; every one must be within [`MOVED_WITHIN`] (max and median printed,
//!   moonshot 3 s, with each trip's move from the state clients last saw).
//! - What moves them in that window: from the kill on, every driver's app does what a
//!   phone does: it reconnects through the survivors in turn (every [`POLL`] while its
//!   account is not served yet; one of the two relays to the account's new owner),
//!   sends at once what its welcome calls for (the next step of its trip, or accepts
//!   its offer: a recovered offer gets a fresh window), goes back online, and drives
//!   everything after to its end with no think time (`Mode::Finish`). So no app delay
//!   is in the time; the only timer a trip could wait on is the offer timeout (3 s, from
//!   its recovery) of an offer its driver never accepts, which these apps always do. A
//!   dispatching trip whose search finds nobody ends `no_driver_found` at once: a move.
//! - Every shard K held is claimed by a survivor (the time printed).
//! - Then, after every trip moved or the bound passed, the drivers' apps stop (the
//!   replies to what they sent are read and recorded) and the crash round's checks run
//!   ([`Round::check_after`]): the apps reconnect and get `welcome` with their state,
//!   every acknowledged transition (before the kill and after it) is in the store, no
//!   driver in two trips, no trip with two drivers, every trip finished, the books
//!   balanced. REST is answered only by an account's owner (not forwarded yet), and the
//!   checks read every trip and account over REST: so the survivor that does not own the
//!   pickup's cell shard is stopped (SIGTERM, its leases released) first, and the checks
//!   run on the other, which then holds every shard. That second handover comes after
//!   the timing, so it is not in it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatch_tests::cluster::partitioned;
use dispatch_tests::{
    ClusterFixture, Dispatchd, Endpoint, SHORT_TRIP_FLAGS, SLOW, assert_clean_log,
    eventually_within,
};
use dispatch_transport::server::shards::{shard_at, shard_owner};
use dispatch_transport::wire::ServerMessage;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::{
    Mode, Planned, Session, driver_on_offer, driver_on_trip, driver_react, run_app_until,
};
use crate::ledger::Ledger;
use crate::round::{Round, round_seeds};
use crate::{CENTER, from_center, location};

const ADMIN: &str = "adm-crash-sharded-0123456789abcdef";
const COOKIE: &str = "crash-sharded-cookie-0123456789";
/// Cluster ports of this test's own.
const PORTS: [u16; 3] = [31261, 31262, 31263];
const NAMES: [&str; 3] = ["k1", "k2", "k3"];
const TTL_MS: u64 = 2000;
/// A box around the rides (the apps stay within a few hundred metres of [`CENTER`]).
const AREA: &str = "40.735,-74.000,40.760,-73.970";
/// Issue 16 item 5: each live trip of the killed node moves again (its version in the
/// store rises) within this of the kill.
const MOVED_WITHIN: Duration = Duration::from_secs(10);
/// How often the store is read for the trips' versions, and a driver's app tries again
/// while its account is not served (so a time to move is at most this late, plus a query).
const POLL: Duration = Duration::from_millis(100);

fn owner_of(shard: u64, members: &[&str]) -> String {
    shard_owner(shard, members).expect("members").to_owned()
}

/// The test's own connection to the nodes' database.
async fn connect(db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}

/// A trip as the store has it: its version, and the driver it names (assigned, else
/// offered: `trips.driver`).
type Stored = (i64, Option<String>);

/// The trips live (`trips.live`) on a shard whose lease names `holder` (a killed node's
/// leases keep its name until claimed), as stored; and how many live trips are on other
/// shards.
async fn live_on(db: &tokio_postgres::Client, holder: &str) -> (BTreeMap<String, Stored>, i64) {
    let rows = db
        .query(
            "SELECT t.k, t.ver, l.holder = $1, t.driver FROM trips t \
             LEFT JOIN dispatch_leases l ON l.shard = t.shard WHERE t.live",
            &[&holder],
        )
        .await
        .expect("read the live trips");
    let mut on = BTreeMap::new();
    let mut elsewhere = 0;
    for r in rows {
        if r.get::<_, Option<bool>>(2) == Some(true) {
            let id = String::from_utf8(r.get(0)).expect("a trip id");
            on.insert(id, (r.get(1), r.get(3)));
        } else {
            elsewhere += 1;
        }
    }
    (on, elsewhere)
}

/// Reads the versions of the trips in `live` every [`POLL`] until each rose above its
/// version there, or [`MOVED_WITHIN`] passed since `killed`: when each was first seen
/// risen (the instant the read returned), from `killed`.
async fn watch_moves(
    db: tokio_postgres::Client,
    live: BTreeMap<String, Stored>,
    killed: Instant,
) -> BTreeMap<String, Duration> {
    let keys: Vec<Vec<u8>> = live.keys().map(|k| k.as_bytes().to_vec()).collect();
    let mut moved = BTreeMap::new();
    while moved.len() < live.len() && killed.elapsed() < MOVED_WITHIN {
        let rows = db
            .query("SELECT k, ver FROM trips WHERE k = ANY($1)", &[&keys])
            .await
            .expect("read the trips' versions");
        let at = killed.elapsed();
        for r in rows {
            let id = String::from_utf8(r.get(0)).expect("a trip id");
            if r.get::<_, i64>(1) > live[&id].0 {
                moved.entry(id).or_insert(at);
            }
        }
        tokio::time::sleep(POLL).await;
    }
    moved
}

/// A driver's app from the kill on (see the module's doc): it reconnects through `via` in
/// turn, every [`POLL`] while refused, does at once what its welcome calls for, goes back
/// online at `home` and drives everything it is given to its end, reconnecting if its
/// session ends, until `stop` is true; then it closes its session once the replies to
/// what it sent are in. What each of its sessions' welcome showed, with when it came.
async fn drive_from_the_kill(
    (id, token): (String, String),
    via: Vec<Endpoint>,
    home: (f64, f64),
    ledger: Arc<Mutex<Ledger>>,
    mut stop: watch::Receiver<bool>,
    killed: Instant,
) -> Vec<String> {
    let mut welcomes = Vec::new();
    for node in via.iter().cycle() {
        if *stop.borrow() {
            break;
        }
        let Ok((s, w)) = Session::open(node, "driver", &id, &token, &ledger).await else {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                () = tokio::time::sleep(POLL) => {}
            }
            continue;
        };
        let ServerMessage::Welcome { offer, trip, .. } = w else {
            unreachable!("Session::open returns a welcome")
        };
        welcomes.push(format!(
            "welcome via {} at {} ms: trip {:?}, offer {:?}",
            node.addr,
            killed.elapsed().as_millis(),
            trip.as_ref().map(|t| (&t.trip_id, t.version, t.state)),
            offer.as_ref().map(|o| o.as_ref().map(|o| &o.trip_id)),
        ));
        let mut plan = Vec::new();
        if let Some(t) = &trip {
            driver_on_trip(&mut Mode::Finish, t, &mut plan);
        }
        if let Some(o) = offer.flatten() {
            driver_on_offer(&mut Mode::Finish, &o, &mut plan);
        }
        let now = Instant::now();
        plan.push(Planned {
            at: now,
            msg: location(home),
            cmd: "location",
            trip: None,
            with_req: false,
        });
        plan.push(Planned {
            at: now,
            msg: json!({"type": "go_online"}),
            cmd: "go_online",
            trip: None,
            with_req: true,
        });
        let mut until = stop.clone();
        let stopped = run_app_until(s, Mode::Finish, plan, driver_react, async move {
            let _ = until.wait_for(|s| *s).await;
        })
        .await;
        if let Some(mut s) = stopped {
            s.ws.close(None).await.ok();
            break;
        }
    }
    welcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_sharded_node_under_load_loses_no_acknowledged_transition() {
    let Some(fx) = ClusterFixture::new("crash_sharded_kill9", COOKIE) else {
        return;
    };
    let seed = round_seeds()[0];
    let tag = format!("[sharded kill -9, CRASH_SEED={seed}]");
    let started = std::time::Instant::now();
    let mut nodes: Vec<Option<Dispatchd>> = (0..3)
        .map(|i| {
            Some(
                fx.sharded_node(NAMES[i], (&PORTS, i), ADMIN, TTL_MS)
                    .flags(SHORT_TRIP_FLAGS)
                    .flags(&["--service-area", AREA, "--database-timeout-ms", "2000"])
                    .spawn(),
            )
        })
        .collect();
    eventually_within(
        "every shard held by its owner, every node ready",
        SLOW,
        || async {
            if !partitioned(&fx.db, AREA, &NAMES).await {
                return None;
            }
            for d in nodes.iter().flatten() {
                if !d.is_ready().await {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    // K owns the pickups' cell shard: every trip runs there.
    let pickups = shard_at(CENTER.0, CENTER.1).expect("the centre's cell shard");
    let k = NAMES
        .iter()
        .position(|n| *n == owner_of(pickups, &NAMES))
        .expect("an owner");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != k).collect();
    let mut members: Vec<&str> = survivors.iter().map(|i| NAMES[*i]).collect();
    members.sort();
    // After the takeover, the checks run on the survivor that owns the pickups' shard.
    let keep = NAMES
        .iter()
        .position(|n| *n == owner_of(pickups, &members))
        .expect("a new owner");
    let other = survivors.iter().copied().find(|i| *i != keep).expect("two");

    let endpoint = |i: usize| (**nodes[i].as_ref().expect("running")).clone();
    let via: Vec<Endpoint> = [k, survivors[0], survivors[1]].map(endpoint).to_vec();
    let after_kill: Vec<Endpoint> = survivors.iter().map(|i| endpoint(*i)).collect();
    let victim = nodes[k].take().expect("K");
    let mut r = Round::on(victim, format!("{tag} [kill -9 {}]", NAMES[k]), seed).await;
    r.via = via;
    let db = connect(&fx.db).await;
    let (apps, registrar) = r.load().await;
    r.wait_for_load(60).await;

    // From the kill until the window below ends, `unavailable` ("retry") is an answer to
    // expect, not an anomaly: the apps send the command again 200 ms later (a command to
    // a trip whose shard is not claimed yet, or whose actor is still being read back, is
    // answered so while the driver's own shard is already served).
    r.ledger.lock().unwrap().store_outage = true;
    let killed = Instant::now();
    r.server.kill9();
    // The trips live on K at the kill, as the store has them (nothing writes K's shards
    // until a survivor claims them, at least the lease's TTL less a renewal away).
    let (live, elsewhere) = live_on(&db, NAMES[k]).await;
    let read_in = killed.elapsed();
    assert!(
        !live.is_empty(),
        "{tag} no trip was live on {} at the kill",
        NAMES[k]
    );
    let watch = tokio::spawn(watch_moves(db, live.clone(), killed));
    // Every driver's app comes back at once, through the survivors.
    let (stop, stopping) = watch::channel(false);
    let drivers: Vec<_> = r
        .drivers
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut via = after_kill.clone();
            via.rotate_left(i % after_kill.len());
            let home = from_center(0.0002 * (i as f64 - 6.0), 0.0);
            tokio::spawn(drive_from_the_kill(
                d.clone(),
                via,
                home,
                r.ledger.clone(),
                stopping.clone(),
                killed,
            ))
        })
        .collect();
    assert_clean_log(&r.tag, &r.server.log_text());
    let at_kill = r.apps_ended(apps, registrar, killed).await;

    eventually_within("every shard of the killed node claimed", SLOW, || async {
        partitioned(&fx.db, AREA, &members).await.then_some(())
    })
    .await;
    let claimed = killed.elapsed();
    let moved = watch.await.expect("the watcher");
    let timed = killed.elapsed();
    stop.send(true).expect("the drivers' apps listen");
    let mut welcomes = BTreeMap::new();
    for (d, (id, _)) in drivers.into_iter().zip(&r.drivers) {
        let w = tokio::time::timeout(SLOW, d)
            .await
            .unwrap_or_else(|_| panic!("{tag} a driver's app did not stop"))
            .unwrap_or_else(|e| panic!("{tag} a driver's app failed: {e}"));
        welcomes.insert(id.clone(), w);
    }
    let sessions: usize = welcomes.values().map(Vec::len).sum();
    let refused = {
        let mut l = r.ledger.lock().unwrap();
        l.store_outage = false;
        l.refused
    };

    // Each trip's move, from the state clients last saw to the next one they were told; a
    // dispatching trip with no open offer in the store at the kill is "searching": its
    // next offer waits for a match window (`--match-window-ms`, 2 s in the default batch
    // mode) after its recovery, the one timer in these moves.
    let moves: BTreeMap<&String, String> = {
        let l = r.ledger.lock().unwrap();
        live.iter()
            .map(|(id, (v, driver))| {
                let seen = l.trips.get(id);
                let at = |v: u64| {
                    seen.and_then(|s| s.at.get(&v))
                        .map(|x| format!("{:?}", x.0))
                };
                let next = seen
                    .and_then(|s| s.at.range(*v as u64 + 1..).next())
                    .map(|(_, x)| format!("{:?}", x.0));
                let from = at(*v as u64).unwrap_or_else(|| format!("v{v}"));
                let from = match (from.as_str(), driver) {
                    ("Dispatching", None) => "Dispatching (searching)".to_owned(),
                    ("Dispatching", Some(_)) => "Dispatching (offered)".to_owned(),
                    _ => from,
                };
                let text = format!("{from}->{}", next.unwrap_or_else(|| "?".to_owned()));
                (id, text)
            })
            .collect()
    };
    let mut by_move: BTreeMap<&str, (usize, Duration)> = BTreeMap::new();
    for (id, how) in &moves {
        let e = by_move.entry(how.as_str()).or_default();
        e.0 += 1;
        e.1 = e.1.max(moved.get(*id).copied().unwrap_or(MOVED_WITHIN));
    }
    let mut times: Vec<Duration> = moved.values().copied().collect();
    times.sort();
    let (median, max) = (
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default(),
    );
    // A late trip, with what its driver's app was told (for the failure's message).
    let late: Vec<_> = {
        let l = r.ledger.lock().unwrap();
        live.iter()
            .filter(|(id, _)| moved.get(*id).is_none_or(|t| *t > MOVED_WITHIN))
            .map(|(id, (_, driver))| {
                let told = driver.as_ref().and_then(|d| welcomes.get(d));
                (id, &moves[id], driver, told, &l.anomalies)
            })
            .map(|x| format!("{x:?}"))
            .collect()
    };
    eprintln!(
        "{tag} {} killed with {} trips live on its shards in the store (read {} ms after the kill; {elsewhere} live elsewhere); \
         its shards claimed by {members:?} {} ms after the kill; the drivers' apps opened {sessions} sessions \
         and were answered `unavailable` (retried) {refused} times until {} ms",
        NAMES[k],
        live.len(),
        read_in.as_millis(),
        claimed.as_millis(),
        timed.as_millis(),
    );
    eprintln!(
        "{tag} the {} trips live at the kill moved again in the store after: median {} ms, max {} ms \
         (bound {} ms, moonshot 3000 ms; read every {} ms); by move (count, max ms): {:?}",
        live.len(),
        median.as_millis(),
        max.as_millis(),
        MOVED_WITHIN.as_millis(),
        POLL.as_millis(),
        by_move
            .iter()
            .map(|(m, (n, t))| (*m, *n, t.as_millis()))
            .collect::<Vec<_>>()
    );
    assert!(
        late.is_empty(),
        "{tag} trips live at the kill whose stored version did not rise within {MOVED_WITHIN:?}: {late:?}"
    );

    // The other survivor hands its shards to the kept one (see the module's doc).
    let stopped = nodes[other].take().expect("the other survivor");
    let log = stopped.stop().await;
    assert_clean_log(&format!("{tag} {}", NAMES[other]), &log);
    let kept = nodes[keep].take().expect("the kept survivor");
    eventually_within(
        "the kept survivor holds and serves every shard",
        SLOW,
        || async {
            (partitioned(&fx.db, AREA, &[NAMES[keep]]).await && kept.is_ready().await).then_some(())
        },
    )
    .await;
    eprintln!(
        "{tag} {} stopped and {} holding and serving every shard at {} ms",
        NAMES[other],
        NAMES[keep],
        killed.elapsed().as_millis()
    );

    // The crash round's checks on the kept survivor (its admin token where they read it).
    std::fs::create_dir_all(kept.data_dir()).expect("the data directory");
    std::fs::write(kept.data_dir().join("admin.token"), ADMIN).expect("admin.token");
    let _killed = std::mem::replace(&mut r.server, kept);
    r.via.clear();
    r.check_after(at_kill, started).await;
    drop(fx);
}
