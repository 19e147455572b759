//! The shard controller (issue 16, stage 4 of docs/sharding.md §4) against a real
//! PostgreSQL database (a fresh one per test on `DISPATCH_TEST_DATABASE_URL`; without it
//! these skip saying so, or fail when `CI` is set). Several controllers run in one
//! process, each with its own store (fences are per store) and its own recording host,
//! as nodes would: they share the candidate shards out as the rendezvous map says, take
//! over a stopped node's shards (and only those) after the lease, hand a joining node
//! exactly the shards it wins without waiting for the lease, release a shard whose host
//! cannot load it, and stop serving every shard before its lease ends in the database
//! when renewals fail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatch_engine::shard::{ShardId, owner, shard_map};
use dispatch_persistence::{Batch, Fence, PgOptions, Store, StoreError, StoredSurge};
use dispatch_transport::server::shards::{
    ControllerConfig, Readiness, ShardController, ShardEnd, ShardHost, ShardMetrics, ShardView,
    service_area_shards,
};
use tokio::sync::watch;

const TTL: Duration = Duration::from_millis(2_000);
const RENEW: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Claimed(ShardId, u64),
    Ended {
        shard: ShardId,
        cause: ShardEnd,
        handoff: bool,
        at: Instant,
    },
}

/// A host that records what it is told, and refuses the shards in `refuse`.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    refuse: Mutex<BTreeSet<ShardId>>,
}

impl Recorder {
    fn ended(&self) -> Vec<(ShardId, ShardEnd, bool, Instant)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Ended {
                    shard,
                    cause,
                    handoff,
                    at,
                } => Some((*shard, *cause, *handoff, *at)),
                _ => None,
            })
            .collect()
    }
}

impl ShardHost for Recorder {
    async fn claimed(&self, shard: ShardId, fence: Fence) -> Result<(), String> {
        if self.refuse.lock().unwrap().contains(&shard) {
            return Err(format!("shard {shard} cannot be loaded"));
        }
        self.events
            .lock()
            .unwrap()
            .push(Event::Claimed(shard, fence.epoch));
        Ok(())
    }

    async fn ended(&self, shard: ShardId, cause: ShardEnd, handoff: bool) {
        self.events.lock().unwrap().push(Event::Ended {
            shard,
            cause,
            handoff,
            at: Instant::now(),
        });
    }
}

fn open(url: &str) -> Arc<Store> {
    let s = Store::open_postgres(PgOptions::new(url), |_| {}).unwrap();
    s.load().unwrap();
    Arc::new(s)
}

/// A small service area (Montreal's centre): a handful of cell shards.
fn area() -> Arc<[ShardId]> {
    service_area_shards("45.45,-73.65,45.55,-73.52")
        .unwrap()
        .into()
}

struct Node {
    name: String,
    store: Arc<Store>,
    host: Arc<Recorder>,
    view: Arc<ShardView>,
    metrics: ShardMetrics,
    quit: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(name: &str, url: &str, members: &watch::Receiver<Vec<String>>) -> Node {
    let store = open(url);
    let host = Arc::new(Recorder::default());
    let mut config = ControllerConfig::new(name, TTL, RENEW);
    config.service_area = Some(area());
    start_with(config, store, host, members)
}

fn start_with(
    config: ControllerConfig,
    store: Arc<Store>,
    host: Arc<Recorder>,
    members: &watch::Receiver<Vec<String>>,
) -> Node {
    let metrics = ShardMetrics::new(&prometheus::Registry::new()).unwrap();
    let name = config.node_name.clone();
    let c = ShardController::new(
        config,
        store.clone(),
        host.clone(),
        members.clone(),
        metrics.clone(),
    );
    let view = c.view();
    let (quit, quit_rx) = watch::channel(false);
    let task = tokio::spawn(c.run(quit_rx));
    Node {
        name,
        store,
        host,
        view,
        metrics,
        quit,
        task,
    }
}

fn candidates() -> BTreeSet<ShardId> {
    let mut all: BTreeSet<ShardId> = (0..=256).collect();
    all.extend(area().iter().copied());
    all
}

/// The shards `node` serves (ready) now, with their epochs.
fn ready(node: &Node, shards: &BTreeSet<ShardId>) -> BTreeMap<ShardId, u64> {
    shards
        .iter()
        .filter_map(|s| match node.view.readiness(*s) {
            Readiness::Ready(e) => Some((*s, e)),
            _ => None,
        })
        .collect()
}

/// Waits until `f` holds, at most `bound`; how long it took.
async fn until(bound: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < bound, "not within {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

/// One node, its own only member, once every candidate shard is ready on it.
async fn alone(url: &str) -> (Node, BTreeSet<ShardId>) {
    let (_members_tx, members) = watch::channel(names(&["n1"]));
    let n = start("n1", url, &members);
    let all = candidates();
    until(Duration::from_secs(10), "every shard ready", || {
        ready(&n, &all).len() == all.len()
    })
    .await;
    (n, all)
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Who holds each live lease, by the database.
fn holders(store: &Store) -> BTreeMap<ShardId, (String, u64)> {
    store
        .leases()
        .unwrap()
        .into_iter()
        .filter(|l| !l.remaining.is_zero())
        .map(|l| (l.shard, (l.holder, l.epoch)))
        .collect()
}

async fn write_in(store: &Store, shard: ShardId) -> Result<(), StoreError> {
    store
        .commit(Batch::in_shard(shard).surge(StoredSurge::default()))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_the_shards_a_stopped_ones_go_to_their_runners_up_and_a_joiner_gets_its_own_by_handoff()
 {
    let Some(url) = dispatch_persistence::pg::test_database("shard_controller_three") else {
        return;
    };
    let all = candidates();
    let (members_tx, members) = watch::channel(names(&["n1", "n2", "n3"]));
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| start(n, &url, &members))
        .collect();
    let observer = open(&url);

    // Disjoint, covering every candidate, exactly the rendezvous map.
    let want = shard_map(all.iter().copied(), &names(&["n1", "n2", "n3"]));
    until(
        Duration::from_secs(10),
        "every candidate shard ready",
        || nodes.iter().map(|n| ready(n, &all).len()).sum::<usize>() == all.len(),
    )
    .await;
    let mut seen = BTreeMap::new();
    for n in &nodes {
        for s in ready(n, &all).keys() {
            assert!(
                seen.insert(*s, n.name.clone()).is_none(),
                "{s} ready on two nodes"
            );
        }
    }
    assert_eq!(seen, want, "each node serves what the map gives it");
    let db = holders(&observer);
    for (s, o) in &want {
        assert_eq!(&db[s].0, o, "the database agrees for {s}");
    }
    for n in &nodes {
        let mine = want.values().filter(|o| **o == n.name).count() as i64;
        assert_eq!(n.metrics.held.get(), mine, "{}", n.name);
        assert_eq!(n.metrics.claims.get(), mine as u64, "{}", n.name);
    }
    // A write of n1's in a shard n2 holds is refused by n1's fenced store, and n1's
    // controller counts it (`dispatch_cluster_fenced_commits_total`, as leader mode does).
    assert_eq!(nodes[0].metrics.fenced_commits.get(), 0);
    let theirs = *want.iter().find(|(_, o)| *o == "n2").unwrap().0;
    match write_in(&nodes[0].store, theirs).await {
        Err(StoreError::Fenced(_)) => {}
        other => panic!("n1's write in n2's shard {theirs}: {other:?}"),
    }
    until(
        Duration::from_secs(10),
        "n1 counts its refused commit",
        || nodes[0].metrics.fenced_commits.get() == 1,
    )
    .await;

    // n1 stops (kill -9 / SIGSTOP): no tick, no release, its fences left in its store.
    let n1 = nodes.remove(0);
    let n1_shards = ready(&n1, &all);
    let s1 = *n1_shards.keys().next().unwrap();
    write_in(&n1.store, s1)
        .await
        .expect("n1 writes in its shard while it holds it");
    n1.task.abort();
    // How long n1's leases still run by the database's clock, read after it stopped: no
    // survivor may hold all of them sooner (a bound on n1's last renewal instead would
    // depend on when it happened to renew before the abort).
    let read_at = Instant::now();
    let left = observer
        .leases()
        .unwrap()
        .into_iter()
        .filter(|l| n1_shards.contains_key(&l.shard))
        .map(|l| l.remaining)
        .max()
        .unwrap();
    let before = holders(&observer);
    members_tx.send(names(&["n2", "n3"])).unwrap();
    let took = until(TTL * 4, "n1's shards ready on their runners-up", || {
        n1_shards
            .keys()
            .all(|s| nodes.iter().any(|n| ready(n, &all).contains_key(s)))
    })
    .await;
    assert!(
        read_at.elapsed() + Duration::from_millis(50) >= left,
        "nobody claims before the lease ends ({took:?}; n1's leases had {left:?} left)"
    );
    let survivors = names(&["n2", "n3"]);
    let after = holders(&observer);
    for (s, (holder, epoch)) in &after {
        if let Some(old) = n1_shards.get(s) {
            assert_eq!(
                Some(holder.as_str()),
                owner(*s, &survivors),
                "{s} went to its runner-up"
            );
            assert!(epoch > old, "{s}: a new epoch");
        } else {
            assert_eq!(
                Some(&(holder.clone(), *epoch)),
                before.get(s),
                "{s} did not move"
            );
        }
    }
    assert_eq!(after.len(), all.len());
    // The stopped node's stale epochs write nothing.
    for s in n1_shards.keys().take(5) {
        match write_in(&n1.store, *s).await {
            Err(StoreError::Fenced(_)) => {}
            other => panic!("a stale write in {s}: {other:?}"),
        }
    }
    assert!(
        n1.host.ended().is_empty(),
        "a killed node's host is told nothing"
    );

    // n4 joins: exactly the shards it wins are handed off to it, before any TTL.
    let joined = Instant::now();
    let n4 = start("n4", &url, &members);
    let four = names(&["n2", "n3", "n4"]);
    members_tx.send(four.clone()).unwrap();
    let wins: BTreeSet<ShardId> = all
        .iter()
        .copied()
        .filter(|s| owner(*s, &four) == Some("n4"))
        .collect();
    assert!(!wins.is_empty());
    let took = until(TTL * 3, "n4 serves what it wins", || {
        ready(&n4, &all).keys().copied().collect::<BTreeSet<_>>() == wins
    })
    .await;
    assert!(
        took < TTL,
        "handed off, not waited out: {took:?} (lease {TTL:?})"
    );
    let mut handed = BTreeSet::new();
    for n in &nodes {
        for (s, cause, handoff, at) in n.host.ended() {
            assert_eq!((cause, handoff), (ShardEnd::Handoff, true), "{s}");
            assert!(at > joined);
            assert!(handed.insert(s), "{s} handed off twice");
        }
        let served = ready(n, &all);
        assert!(served.keys().all(|s| !wins.contains(s)));
    }
    assert_eq!(handed, wins, "exactly the shards n4 wins were handed off");
    let out: u64 = nodes
        .iter()
        .map(|n| n.metrics.handoffs.with_label_values(&["out"]).get())
        .sum();
    assert_eq!(out, wins.len() as u64);
    assert_eq!(
        n4.metrics.handoffs.with_label_values(&["in"]).get(),
        wins.len() as u64
    );
    let union: usize = nodes
        .iter()
        .chain([&n4])
        .map(|n| ready(n, &all).len())
        .sum();
    assert_eq!(union, all.len(), "still every shard served once");

    // Shutdown releases every lease at once.
    nodes.push(n4);
    for n in &nodes {
        let _ = n.quit.send(true);
    }
    for mut n in nodes {
        (&mut n.task).await.unwrap();
        assert!(ready(&n, &all).is_empty());
        assert!(n.store.fences().is_empty());
        let ended = n.host.ended();
        assert!(
            ended
                .iter()
                .any(|(_, c, h, _)| *c == ShardEnd::Shutdown && *h)
        );
    }
    let left = holders(&observer);
    assert!(left.is_empty(), "every lease released: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_the_host_cannot_load_is_released_and_counted() {
    let Some(url) = dispatch_persistence::pg::test_database("shard_controller_refused") else {
        return;
    };
    let (_members_tx, members) = watch::channel(names(&["n1"]));
    let host = Arc::new(Recorder::default());
    host.refuse.lock().unwrap().insert(7);
    let config = ControllerConfig::new("n1", TTL, RENEW);
    let n = start_with(config, open(&url), host.clone(), &members);
    let shards: BTreeSet<ShardId> = (0..=256).collect();
    until(Duration::from_secs(10), "the others ready", || {
        ready(&n, &shards).len() == 256
    })
    .await;
    until(Duration::from_secs(5), "the failure counted", || {
        n.metrics.claim_errors.with_label_values(&["host"]).get() >= 1
    })
    .await;
    assert_eq!(n.view.readiness(7), Readiness::NotHeld);
    assert!(!n.store.fences().iter().any(|f| f.shard == 7));
    let observer = open(&url);
    let l = observer
        .leases()
        .unwrap()
        .into_iter()
        .find(|l| l.shard == 7)
        .unwrap();
    assert_eq!(
        (l.holder.as_str(), l.remaining),
        ("n1", Duration::ZERO),
        "released, not left to expire"
    );
    assert_eq!(n.metrics.held.get(), 256);
    assert!(
        !host
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, Event::Ended { .. })),
        "a shard that never started is not ended"
    );
    let _ = n.quit.send(true);
    n.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_the_renewal_leaves_out_ends_as_lost_and_is_claimed_anew() {
    let Some(url) = dispatch_persistence::pg::test_database("shard_controller_lost") else {
        return;
    };
    let (n, _) = alone(&url).await;
    let Readiness::Ready(epoch) = n.view.readiness(5) else {
        panic!("5 not ready");
    };
    // The lease ends under the node (as if its epoch had been claimed away).
    open(&url).release_lease(5, "n1", epoch).unwrap();
    until(TTL, "5 ended as lost", || {
        n.host.ended().iter().any(|e| e.0 == 5)
    })
    .await;
    let ended = n.host.ended();
    assert_eq!(ended.len(), 1, "only the lost shard: {ended:?}");
    assert_eq!((ended[0].1, ended[0].2), (ShardEnd::Lost, false));
    assert_eq!(
        n.metrics
            .ends
            .with_label_values(&[ShardEnd::Lost.as_str()])
            .get(),
        1
    );
    assert!(n.metrics.renewals_failed.get() >= 1);
    until(
        TTL,
        "5 claimed anew",
        || matches!(n.view.readiness(5), Readiness::Ready(e) if e > epoch),
    )
    .await;
    assert!(
        n.store
            .fences()
            .iter()
            .any(|f| f.shard == 5 && f.epoch > epoch),
        "fenced with the new epoch"
    );
    let _ = n.quit.send(true);
    n.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_renewals_fail_every_shard_ends_before_its_lease_ends_in_the_database() {
    let Some(url) = dispatch_persistence::pg::test_database("shard_controller_renewals") else {
        return;
    };
    let (n, all) = alone(&url).await;
    let observer = open(&url);
    // Three times: cut off right after the claims (deadlines from the claim), then after
    // the leases were claimed anew and renewed a few times (deadlines from renewals), and
    // then with the database not answering at all (a renewal still waiting at the
    // deadline counts as failed).
    for round in 1..=3u64 {
        if round > 1 {
            n.store.faults().fail_leases(false);
            n.store.faults().stall_leases(Duration::ZERO);
            until(TTL * 3, "every shard ready again", || {
                ready(&n, &all).len() == all.len()
            })
            .await;
            assert!(n.metrics.renewals_failed.get() >= 1);
            let renewed = n.metrics.renewals_failed.get();
            tokio::time::sleep(RENEW * 4).await;
            assert_eq!(n.metrics.renewals_failed.get(), renewed, "renewing again");
        }
        let before = n.host.ended().len();
        if round == 3 {
            n.store
                .faults()
                .stall_leases(TTL + Duration::from_millis(500));
        } else {
            n.store.faults().fail_leases(true);
        }
        // A renewal already sent when the fault came on lands meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = Instant::now();
        let expiry: BTreeMap<ShardId, Instant> = observer
            .leases()
            .unwrap()
            .into_iter()
            .map(|l| (l.shard, sent + l.remaining))
            .collect();
        until(TTL * 2, "every shard ended", || {
            n.host.ended().len() == before + all.len()
        })
        .await;
        for (s, cause, handoff, at) in n.host.ended().into_iter().skip(before) {
            assert_eq!((cause, handoff), (ShardEnd::Expired, false), "{s}");
            assert!(
                at < expiry[&s],
                "round {round}: {s} ended {:?} after its lease ended in the database",
                at - expiry[&s]
            );
            assert!(n.view.slot(s).is_some_and(|slot| !slot.clock().live()));
        }
        assert!(n.store.fences().is_empty(), "every fence dropped");
        assert!(n.metrics.renewals_failed.get() >= 1);
        assert_eq!(
            n.metrics
                .ends
                .with_label_values(&[ShardEnd::Expired.as_str()])
                .get(),
            round * all.len() as u64
        );
        assert_eq!(n.metrics.held.get(), 0);
    }
    n.store.faults().stall_leases(Duration::ZERO);
    let _ = n.quit.send(true);
    n.task.await.unwrap();
}
