//! Scale-up and scale-down under load (issue 16, item 5, "a 4th node joins under load"),
//! on real `dispatchd` processes in cluster mode on one fresh PostgreSQL database (the
//! test skips without one, like `relay.rs`), real WebSockets and the real `loadgen`.
//!
//! 1. Three nodes (n0 leads, n1 and n2 stand by) under `loadgen --spread` over the three
//!    (`--reconnect`, `--ack-log`): its sessions spread over the nodes, the standbys
//!    relaying theirs to the leader.
//! 2. A 4th node, n3, starts with the same peer list as the others (which does not name
//!    it, as a StatefulSet's pods started before it do not): every node lists the four
//!    members; n3 relays new sessions (a driver and a rider of the test's own on n3 ride
//!    a trip to `completed`, and a second `loadgen --spread` over n0 and n3 puts some of
//!    its clients there); the leader does not change (n0 still leads, same epoch, no
//!    takeover anywhere); the join closes no session of the first loadgen (its report
//!    counts no dropped session).
//! 3. Scale-down: SIGTERM of n3. Its relayed sessions close with 1001; the test's driver
//!    reconnects to another node and gets `welcome` with its state, the second loadgen's
//!    clients on n3 reconnect elsewhere (none gives up); the other three list three
//!    members again.
//! 4. Afterwards `bench/ackcheck.py` checks both ack logs against the leader's store:
//!    every acknowledged transition is there, no trip with two drivers, no driver in two
//!    trips.
//!
//! The loadgens' city is far from the test's ride (Québec City; the ride is in Montréal),
//! so the test's rider's request can only be offered to the test's driver.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dispatch_tests::cluster::all_list;
use dispatch_tests::loadgen::{Loadgen, LoadgenArgs};
use dispatch_tests::served::connect_when_served;
use dispatch_tests::{
    ClusterFixture, Dispatchd, Ride, RidePlan, SHORT_TRIP_FLAGS, SLOW, eventually_within,
};
use dispatch_transport::wire::{DriverStatus, ServerMessage, TripState};
use serde_json::Value;

const ADMIN: &str = "adm-scaleup-0123456789abcdef0123";
const COOKIE: &str = "scaleup-test-cookie-0123456789";
/// Cluster ports of this test's own (the helper's range 28000–28999); the HTTP ports are
/// the builder's free ones.
const PORTS: [u16; 4] = [28101, 28102, 28103, 28104];
/// The loadgens' city: Québec City, 230 km from the test's ride in Montréal.
const LOADGEN_CENTER: &str = "--center=46.8139,-71.2080";

/// The peer list every node is started with: the first three nodes' cluster addresses.
/// The 4th node gets the same list (`SCALEUP_BREAK_PEERS=1` gives it none, to see the test
/// fail).
fn peers() -> String {
    PORTS[..3]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn node(fx: &ClusterFixture, i: usize, peers: &str) -> dispatch_tests::DispatchdBuilder {
    // A lease long enough that a loaded CI machine's slow renewal does not end the
    // leader's term mid-run: the test checks that the leader never changes.
    fx.leader_node(&format!("n{i}"), PORTS[i], peers, ADMIN)
        .flags(&["--lease-ttl-ms", "6000", "--lease-renew-ms", "1000"])
        .flags(SHORT_TRIP_FLAGS)
}

/// A loadgen run of the test's: the child, its name, its ack log and `--json` report.
struct Load {
    lg: Loadgen,
    name: &'static str,
    acks: PathBuf,
    report: PathBuf,
}

impl Load {
    /// `loadgen --spread --reconnect --ack-log` over `nodes`, the first of which leads
    /// (REST goes there), for `duration_s` of requests then `drain_s`.
    fn start(
        name: &'static str,
        dir: &Path,
        nodes: &[&Dispatchd],
        (drivers, riders, rate): (u32, u32, f64),
        (duration_s, drain_s): (u64, u64),
    ) -> Load {
        let urls = nodes
            .iter()
            .map(|d| d.ws_url(""))
            .collect::<Vec<_>>()
            .join(",");
        let acks = dir.join(format!("{name}-acks.jsonl"));
        let report = dir.join(format!("{name}-report.json"));
        let lg = LoadgenArgs::new(&[
            "--url",
            &urls,
            "--spread",
            "--drivers",
            &drivers.to_string(),
            "--riders",
            &riders.to_string(),
            "--request-rate",
            &rate.to_string(),
            LOADGEN_CENTER,
            "--radius-km",
            "2",
            "--speed-mps",
            "30",
            "--decision-delay-ms",
            "300-1500",
            "--boarding-ms",
            "2000-6000",
            "--duration",
            &format!("{duration_s}s"),
            "--drain",
            &format!("{drain_s}s"),
        ])
        .recorded(&acks, &report)
        .spawn(
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        );
        Load {
            lg,
            name,
            acks,
            report,
        }
    }

    fn output(&self) -> String {
        format!("{}:\n{}", self.name, self.lg.output())
    }

    /// How many `trip_update`s its clients were told so far.
    fn trip_updates(&self) -> usize {
        std::fs::read_to_string(&self.acks)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"kind\":\"trip_update\""))
            .count()
    }

    /// Waits (up to `within`) for it to end by itself; asserts it passed its own checks;
    /// its `--json` report.
    async fn finish(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(st) = self.lg.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs after {within:?}\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            status.code(),
            Some(0),
            "{} failed a check ({status})\n{}",
            self.name,
            self.output()
        );
        let text = std::fs::read_to_string(&self.report)
            .unwrap_or_else(|e| panic!("{}'s --json report: {e}\n{}", self.name, self.output()));
        serde_json::from_str(&text).expect("loadgen's report is JSON")
    }
}

/// How many sessions `d` relays to the leader.
async fn relayed(d: &Dispatchd) -> f64 {
    d.metric_value("dispatch_cluster_relayed_sessions{side=\"relaying\"}")
        .await
}

/// Which node leads, by `dispatch_cluster_leader`, and the sum of `takeovers_total`.
async fn leadership(nodes: &[&Dispatchd]) -> (Vec<f64>, f64) {
    let mut leaders = Vec::new();
    let mut takeovers = 0.0;
    for d in nodes {
        leaders.push(d.metric_value("dispatch_cluster_leader").await);
        takeovers += d.metric_value("dispatch_cluster_takeovers_total").await;
    }
    (leaders, takeovers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_a_loaded_cluster_serves_and_leaves_with_nothing_lost() {
    let Some(fx) = ClusterFixture::new("scaleup_fourth_node", COOKIE) else {
        return;
    };
    let started = Instant::now();
    let work = tempfile::tempdir().expect("a temporary directory");
    let peers = peers();

    // --- 1. three nodes under load ---------------------------------------------------
    let n0 = node(&fx, 0, &peers).start().await;
    let n1 = node(&fx, 1, &peers).spawn();
    let n2 = node(&fx, 2, &peers).spawn();
    let three = [(&n0, "n0"), (&n1, "n1"), (&n2, "n2")];
    all_list(&three, &["n0", "n1", "n2"], "three members on every node").await;
    let epoch = n0.metric_value("dispatch_cluster_epoch").await;
    let (leaders, takeovers) = leadership(&[&n0, &n1, &n2]).await;
    assert_eq!(leaders, [1.0, 0.0, 0.0], "n0 leads");
    eprintln!(
        "scaleup: 3 nodes up after {:.1} s, n0 leads (epoch {epoch})",
        started.elapsed().as_secs_f64()
    );

    let mut lg1 = Load::start(
        "loadgen1",
        work.path(),
        &[&n0, &n1, &n2],
        (30, 30, 1.5),
        (45, 20),
    );
    eventually_within(
        "loadgen1's trips under way, sessions on both standbys",
        SLOW,
        || async {
            let mut relaying = Vec::new();
            for d in [&n1, &n2] {
                relaying.push(relayed(d).await);
            }
            (lg1.trip_updates() >= 5 && relaying.iter().all(|n| *n > 0.0)).then_some(())
        },
    )
    .await;
    eprintln!(
        "scaleup: under load, relaying n1 {} n2 {}, hosting n0 {}",
        relayed(&n1).await,
        relayed(&n2).await,
        n0.metric_value("dispatch_cluster_relayed_sessions{side=\"hosting\"}")
            .await
    );

    // --- 2. the 4th node joins ---------------------------------------------------------
    let n3_peers = if std::env::var_os("SCALEUP_BREAK_PEERS").is_some() {
        eprintln!("scaleup: SCALEUP_BREAK_PEERS: n3 gets no peers (the test must fail)");
        "127.0.0.1:1".to_owned()
    } else {
        peers.clone()
    };
    let join_at = Instant::now();
    let mut n3 = node(&fx, 3, &n3_peers).spawn();
    let four = [(&n0, "n0"), (&n1, "n1"), (&n2, "n2"), (&n3, "n3")];
    let took = all_list(
        &four,
        &["n0", "n1", "n2", "n3"],
        "four members on every node",
    )
    .await;
    eprintln!(
        "scaleup: n3 is a member on every node {:.1} s after its start",
        took.as_secs_f64()
    );
    let v = n0.get_ok("/admin/cluster", ADMIN).await;
    let listed: Vec<&str> = v["members"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(
        listed,
        ["n0", "n1", "n2", "n3"],
        "the leader's /admin/cluster: {v}"
    );

    // A ride through n3: the test's driver and rider (registered on the leader) both
    // connected to n3, relayed.
    let plan = RidePlan::default();
    let (driver_id, driver_token) = n0.driver(plan.driver, plan.product).await;
    let (rider_id, rider_token) = n0.rider(plan.rider).await;
    let (mut d, refused) = connect_when_served(&n3, "/v1/ws/driver", &driver_token).await;
    eprintln!("scaleup: n3 relayed a driver session after {refused} answers 503");
    match d.welcome().await {
        ServerMessage::Welcome {
            driver_id: Some(id),
            ..
        } => assert_eq!(id, driver_id),
        m => panic!("a driver's welcome: {m:?}"),
    }
    d.go_online(plan.driver_at).await;
    let (mut r, _) = connect_when_served(&n3, "/v1/ws/rider", &rider_token).await;
    r.welcome().await;
    assert_eq!(relayed(&n3).await, 2.0, "n3 relays the test's two sessions");
    let mut ride = Ride::offered(
        &plan,
        (driver_id.clone(), driver_token.clone(), d),
        (rider_id, rider_token, r),
    )
    .await;
    ride.advance(TripState::Completed).await;
    let stored = n0.trip(ride.trip_id(), &ride.rider_token).await;
    assert_eq!(stored.state, TripState::Completed);
    eprintln!(
        "scaleup: a ride through n3 completed {:.1} s after n3 started",
        join_at.elapsed().as_secs_f64()
    );

    // A second loadgen over the leader and n3: some of its sessions on n3.
    let mut lg2 = Load::start(
        "loadgen2",
        work.path(),
        &[&n0, &n3],
        (10, 10, 0.5),
        (12, 15),
    );
    eventually_within("loadgen2's sessions on n3", SLOW, || async {
        let on_n3 = relayed(&n3).await;
        (on_n3 > 2.0 && lg2.trip_updates() >= 1).then_some(())
    })
    .await;
    let on_n3 = relayed(&n3).await;
    eprintln!("scaleup: n3 relays {on_n3} sessions (2 of the test's)");

    // The leader did not change.
    assert_eq!(
        leadership(&[&n0, &n1, &n2, &n3]).await,
        (vec![1.0, 0.0, 0.0, 0.0], takeovers),
        "the join moved the lease"
    );
    assert_eq!(n0.metric_value("dispatch_cluster_epoch").await, epoch);

    // --- 3. scale-down: SIGTERM of n3 --------------------------------------------------
    let stop_at = Instant::now();
    n3.sigterm();
    assert_eq!(
        ride.d.closed_with().await,
        Some(1001),
        "the driver's relayed session"
    );
    assert_eq!(
        ride.r.closed_with().await,
        Some(1001),
        "the rider's relayed session"
    );
    let st = n3.exited_within(SLOW).await;
    assert_eq!(st.code(), Some(0), "n3's SIGTERM exit\n{}", n3.log_text());
    let (mut d, _) = connect_when_served(&n1, "/v1/ws/driver", &driver_token).await;
    match d.welcome().await {
        ServerMessage::Welcome {
            driver_id: Some(id),
            status: Some(status),
            trip,
            ..
        } => {
            assert_eq!(id, driver_id);
            assert_eq!(status, DriverStatus::Available, "online after the ride");
            assert!(trip.is_none(), "{trip:?}");
        }
        m => panic!("a driver's welcome: {m:?}"),
    }
    d.alive().await;
    all_list(&three, &["n0", "n1", "n2"], "three members again").await;
    eprintln!(
        "scaleup: n3 stopped; its driver back on n1 and membership 3 again {:.1} s after SIGTERM",
        stop_at.elapsed().as_secs_f64()
    );

    // --- 4. nothing acknowledged lost ---------------------------------------------------
    let rep2 = lg2.finish(Duration::from_secs(12 + 15 + 60)).await;
    let rep1 = lg1.finish(Duration::from_secs(45 + 20 + 60)).await;
    let (rc1, rc2) = (&rep1["reconnect"], &rep2["reconnect"]);
    eprintln!("scaleup: loadgen1 reconnect {rc1}\nscaleup: loadgen2 reconnect {rc2}");
    assert_eq!(
        rc1["sessions_dropped"].as_u64(),
        Some(0),
        "the join and the leave closed sessions of loadgen1 (on n0..n2): {rc1}\n{}",
        lg1.output()
    );
    assert_eq!(rc2["gave_up"].as_u64(), Some(0), "{rc2}\n{}", lg2.output());
    let on_n3_loadgen = (on_n3 - 2.0) as u64;
    assert!(
        rc2["sessions_dropped"].as_u64().unwrap_or(0) >= on_n3_loadgen
            && rc2["reconnected"].as_u64().unwrap_or(0) >= on_n3_loadgen,
        "loadgen2's {on_n3_loadgen} sessions on n3 should have dropped and reconnected: {rc2}"
    );
    assert_eq!(
        leadership(&[&n0, &n1, &n2]).await,
        (vec![1.0, 0.0, 0.0], takeovers),
        "the leave moved the lease"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/ackcheck.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(n0.url(""))
        .arg(ADMIN)
        .arg(&lg1.acks)
        .arg(&lg2.acks)
        .output()
        .expect("run python3 bench/ackcheck.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("scaleup: {text}");
    assert!(out.status.success(), "ackcheck.py failed:\n{text}");
    eprintln!(
        "scaleup: passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
