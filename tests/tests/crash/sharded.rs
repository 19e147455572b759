//! kill -9 of a sharded node under load (issue 16 item 5, `docs/sharding.md` §7): three
//! `dispatchd --cluster-mode sharded --lease-ttl-ms 2000` nodes on one fresh PostgreSQL
//! database, the crash round's apps ([`Round`]) over WebSockets.
//!
//! - Everyone is registered on K, the owner of the rides' pickup cell shard (so the
//!   accounts' entity shards and every trip are K's); each app connects to the nodes in
//!   turn (2 of 3 relayed to K). Under load, with trips live on K, kill -9 of K.
//! - Every app notices; every shard K held is claimed by a survivor (the time printed).
//! - Every trip live at the kill moves again (a new version any client is told of) within
//!   [`MOVED_WITHIN`] of the kill: the max and the median are printed (moonshot: 3 s).
//! - Then the crash round's checks ([`Round::check_after`]): the apps reconnect and get
//!   `welcome` with their state, every acknowledged transition is in the store, no driver
//!   in two trips, no trip with two drivers, every trip finished, the books balanced.
//!   REST is answered only by an account's owner (not forwarded yet), and the checks read
//!   every trip and account over REST: so the survivor that does not own the pickup's
//!   cell shard is stopped (SIGTERM, its leases released) right after the takeover, and
//!   the checks run on the other, which then holds every shard. Each driver reconnects
//!   to it at once and sends the next step its welcome calls for (the rest is driven
//!   by the round's apps after its checks read everything back), so the time to move
//!   again includes that handover.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch_tests::{
    ClusterFixture, Dispatchd, Endpoint, SHORT_TRIP_FLAGS, SLOW, eventually_within,
};
use dispatch_transport::server::shards::{service_area_shards, shard_at, shard_owner};
use dispatch_transport::wire::ServerMessage;

use crate::CENTER;
use crate::app::{Mode, Session, driver_on_offer, driver_on_trip};
use crate::round::{Round, round_seeds};

const ADMIN: &str = "adm-crash-sharded-0123456789abcdef";
const COOKIE: &str = "crash-sharded-cookie-0123456789";
/// Cluster ports of this test's own.
const PORTS: [u16; 3] = [31261, 31262, 31263];
const NAMES: [&str; 3] = ["k1", "k2", "k3"];
const TTL_MS: u64 = 2000;
/// A box around the rides (the apps stay within a few hundred metres of [`CENTER`]).
const AREA: &str = "40.735,-74.000,40.760,-73.970";
/// Issue 16 item 5: each live trip of the killed node moves again within this of the kill.
const MOVED_WITHIN: Duration = Duration::from_secs(10);

fn owner_of(shard: u64, members: &[&str]) -> String {
    shard_owner(shard, members).expect("members").to_owned()
}

/// Whether every candidate shard has a live lease held by its owner among `members`.
async fn partitioned(db: &str, members: &[&str]) -> bool {
    let Ok((client, conn)) = tokio_postgres::connect(db, tokio_postgres::NoTls).await else {
        return false;
    };
    let conn = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT shard, holder FROM dispatch_leases WHERE expires_at > now()",
            &[],
        )
        .await;
    conn.abort();
    let Ok(rows) = rows else { return false };
    let leases: BTreeMap<u64, String> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, String>(1)))
        .collect();
    let mut all: Vec<u64> = (0..=256).collect();
    all.extend(service_area_shards(AREA).expect("the area"));
    all.iter()
        .all(|s| leases.get(s).is_some_and(|h| *h == owner_of(*s, members)))
}

/// Each driver reconnects (its welcome is the crash round's to check later, so the
/// session is closed again) and sends what its welcome calls for: the next step of its
/// trip, or the acceptance of its offer. How many commands were sent.
async fn resume(r: &Round) -> usize {
    let mut sent = 0;
    for (id, token) in &r.drivers {
        let (mut s, w) = Session::open(&r.server, "driver", id, token, &r.ledger)
            .await
            .unwrap_or_else(|e| panic!("{} reconnecting after the takeover: {e}", r.tag));
        let ServerMessage::Welcome { offer, trip, .. } = w else {
            unreachable!("Session::open returns a welcome")
        };
        let mut plan = Vec::new();
        if let Some(t) = &trip {
            driver_on_trip(&mut Mode::Finish, t, &mut plan);
        }
        if let Some(o) = offer.flatten() {
            driver_on_offer(&mut Mode::Finish, &o, &mut plan);
        }
        for p in plan {
            s.call(p.msg, p.cmd, p.trip)
                .await
                .unwrap_or_else(|e| panic!("{} after the takeover: {e}", r.tag));
            sent += 1;
        }
        s.ws.close(None).await.ok();
    }
    sent
}

// Not run by `cargo test --workspace` or `.ci/run` yet: run it by hand with
// `cargo test -p dispatch-tests --test crash -- --ignored sharded`. Its 10 s bound is timed
// in the ledger (what clients were told), so it includes this test's own second handover
// and the round's REST reads (above): the slowest trips move at ~8.4 s, and on a loaded
// 2-core machine it failed at 14.3 s (1 of 7 runs beside a CI run) and 10.3 s (1 of 2
// runs alone, a CI run beside it). To go back into CI it must time the trips in the
// store (the journal), not in the clients' ledger.
#[ignore = "timed through the clients' ledger, too close to its 10 s bound under load: run by hand"]
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
            if !partitioned(&fx.db, &NAMES).await {
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

    let via: Vec<Endpoint> = [k, survivors[0], survivors[1]]
        .iter()
        .map(|i| (**nodes[*i].as_ref().expect("running")).clone())
        .collect();
    let victim = nodes[k].take().expect("K");
    let mut r = Round::on(victim, format!("{tag} [kill -9 {}]", NAMES[k]), seed).await;
    r.via = via;
    let (apps, registrar) = r.load().await;
    let at_kill = r.kill_under_load(apps, registrar, 60).await;
    let killed = at_kill.at;

    // The trips live at the kill, at the version clients last saw.
    let live: BTreeMap<String, u64> = {
        let l = r.ledger.lock().unwrap();
        l.trips
            .iter()
            .filter(|(_, s)| !s.latest().1.is_final())
            .map(|(id, s)| (id.clone(), s.latest().0))
            .collect()
    };
    assert!(!live.is_empty(), "{tag} no trip was live at the kill");
    // When each moves again, watched in the ledger while the checks run.
    let watch = {
        let ledger = r.ledger.clone();
        let live = live.clone();
        tokio::spawn(async move {
            let mut moved: BTreeMap<String, Duration> = BTreeMap::new();
            while moved.len() < live.len() && killed.elapsed() < SLOW * 2 {
                {
                    let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, v) in &live {
                        if !moved.contains_key(id)
                            && l.trips.get(id).is_some_and(|s| s.latest().0 > *v)
                        {
                            moved.insert(id.clone(), killed.elapsed());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            moved
        })
    };

    eventually_within("every shard of the killed node claimed", SLOW, || async {
        partitioned(&fx.db, &members).await.then_some(())
    })
    .await;
    let claimed = killed.elapsed();
    // The other survivor hands its shards to the kept one (see the module's doc).
    let stopped = nodes[other].take().expect("the other survivor");
    let log = stopped.stop().await;
    dispatch_tests::assert_clean_log(&format!("{tag} {}", NAMES[other]), &log);
    let kept = nodes[keep].take().expect("the kept survivor");
    eventually_within(
        "the kept survivor holds and serves every shard",
        SLOW,
        || async {
            (partitioned(&fx.db, &[NAMES[keep]]).await && kept.is_ready().await).then_some(())
        },
    )
    .await;
    let handed = killed.elapsed();
    eprintln!(
        "{tag} {} killed with {} trips live on it; its shards claimed by {members:?} {} ms after the kill; \
         {} stopped and {} holding and serving every shard at {} ms",
        NAMES[k],
        live.len(),
        claimed.as_millis(),
        NAMES[other],
        NAMES[keep],
        handed.as_millis()
    );

    // The crash round's checks on the kept survivor (its admin token where they read it).
    std::fs::create_dir_all(kept.data_dir()).expect("the data directory");
    std::fs::write(kept.data_dir().join("admin.token"), ADMIN).expect("admin.token");
    let _killed = std::mem::replace(&mut r.server, kept);
    r.via.clear();
    // The drivers come back at once and do their next step (the round's checks below
    // drive the rest only after reading every trip and account back).
    let resumed = resume(&r).await;
    r.check_after(at_kill, started).await;

    let moved = watch.await.expect("the watcher");
    let mut times: Vec<Duration> = moved.values().copied().collect();
    times.sort();
    let late: Vec<_> = live
        .keys()
        .filter(|id| moved.get(*id).is_none_or(|t| *t > MOVED_WITHIN))
        .map(|id| (id, moved.get(id)))
        .collect();
    let (median, max) = (
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default(),
    );
    eprintln!("{tag} at once after the takeover, the drivers sent {resumed} commands");
    eprintln!(
        "{tag} the {} trips live at the kill moved again after: median {} ms, max {} ms (bound {} ms, moonshot 3000 ms)",
        live.len(),
        median.as_millis(),
        max.as_millis(),
        MOVED_WITHIN.as_millis()
    );
    assert!(
        late.is_empty(),
        "{tag} trips live at the kill that did not move again within {MOVED_WITHIN:?}: {late:?}"
    );
    drop(fx);
}
