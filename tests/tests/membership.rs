//! Cluster membership (issue 16) across 3 real `dispatchd` processes on loopback: each
//! counts the others up in `/metrics` (`dispatch_cluster_peer_up`, served by standbys
//! too) and the leader lists them in `GET /admin/cluster`; a `kill -9`ed node is dropped and comes back
//! when restarted; a SIGSTOPped node (its links stay open: only the heartbeat timeout can
//! notice) is dropped and comes back on SIGCONT; a 4th node with the wrong cookie is
//! refused, counted, and never listed; garbage bytes on a cluster port change nothing.
//!
//! The nodes are in cluster mode on one fresh PostgreSQL database (`--node-name` needs
//! it): the first to start leads, the others stand by; membership runs the same in both
//! roles and across terms.

use std::time::Duration;

use dispatch_tests::cluster::{all_list, cluster_node, cluster_setup, idle_flood, members, names};
use dispatch_tests::{Dispatchd, SLOW, eventually_within};
use tokio::io::AsyncWriteExt;

const ADMIN: &str = "adm-members-0123456789abcdef01234";
const COOKIE: &str = "members-test-cookie-0123456789";
/// Cluster ports of this test's own (the helper's range 25000–25999).
const PORTS: [u16; 4] = [25101, 25102, 25103, 25104];
const HEARTBEAT_MS: u64 = 200;
const PEER_TIMEOUT_MS: u64 = 1_000;

fn node(i: usize, cookie_file: &std::path::Path, db: &str) -> dispatch_tests::DispatchdBuilder {
    cluster_node(
        &format!("n{i}"),
        "leader",
        PORTS[i],
        &PORTS[..3],
        cookie_file,
        db,
        (HEARTBEAT_MS, PEER_TIMEOUT_MS),
        &["--admin-token".to_owned(), ADMIN.to_owned()],
    )
}

/// The member names the leader lists in `GET /admin/cluster`.
async fn listed(d: &Dispatchd) -> Vec<String> {
    let (st, v) = d.get("/admin/cluster", Some(ADMIN)).await;
    assert_eq!(st, 200, "{v}");
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_drop_the_dead_and_the_paused_and_refuse_a_wrong_cookie() {
    let Some((db, dir, cookie_file)) = cluster_setup("membership_three_nodes", COOKIE) else {
        return;
    };

    // n0 starts first and leads; the others stand by (never ready: spawned, not started).
    let n0 = node(0, &cookie_file, &db).start().await;
    let n1 = node(1, &cookie_file, &db).spawn();
    let mut n2 = node(2, &cookie_file, &db).spawn();
    let t = all_list(
        &[(&n0, "n0"), (&n1, "n1"), (&n2, "n2")],
        &["n0", "n1", "n2"],
        "3 nodes list each other",
    )
    .await;
    eprintln!("3 nodes formed a cluster in {} ms", t.as_millis());
    assert_eq!(listed(&n0).await, names(&["n0", "n1", "n2"]));
    assert_eq!(n0.metric_value("dispatch_cluster_members").await, 3.0);
    let (_, v) = n0.get("/admin/cluster", Some(ADMIN)).await;
    assert_eq!(v["node"], "n0");
    assert_eq!(v["shards"]["resolution"], 6);
    for m in v["members"].as_array().unwrap() {
        if m["self"] == false {
            let age = m["last_heard_ms"].as_u64().unwrap();
            assert!(age <= PEER_TIMEOUT_MS, "{v}");
        }
    }
    assert!(
        n0.metric_value("dispatch_cluster_heartbeats_total{direction=\"received\"}")
            .await
            > 0.0
    );
    assert!(
        n0.metric_value("dispatch_cluster_remote_latency_seconds_count")
            .await
            > 0.0
    );

    // kill -9: the links close, the others drop it.
    n2.kill9();
    let t = all_list(
        &[(&n0, "n0"), (&n1, "n1")],
        &["n0", "n1"],
        "the killed node dropped",
    )
    .await;
    eprintln!(
        "kill -9: n2 dropped after {} ms (peer timeout {PEER_TIMEOUT_MS} ms)",
        t.as_millis()
    );
    let n2 = n2.again().spawn();
    let t = all_list(
        &[(&n0, "n0"), (&n1, "n1"), (&n2, "n2")],
        &["n0", "n1", "n2"],
        "the restarted node is back",
    )
    .await;
    eprintln!("restart: n2 back after {} ms", t.as_millis());

    // SIGSTOP: its sockets stay open; only the missing heartbeats tell.
    let dead_before = n0.metric_value("dispatch_cluster_peers_dead_total").await;
    n2.signal("-STOP");
    let t = all_list(
        &[(&n0, "n0"), (&n1, "n1")],
        &["n0", "n1"],
        "the paused node dropped",
    )
    .await;
    eprintln!(
        "SIGSTOP: n2 dropped after {} ms (peer timeout {PEER_TIMEOUT_MS} ms)",
        t.as_millis()
    );
    assert!(
        n0.metric_value("dispatch_cluster_peers_dead_total").await > dead_before,
        "the paused node was dropped by the heartbeat timeout"
    );
    n2.signal("-CONT");
    let t = all_list(
        &[(&n0, "n0"), (&n1, "n1"), (&n2, "n2")],
        &["n0", "n1", "n2"],
        "the resumed node is back",
    )
    .await;
    eprintln!("SIGCONT: n2 back after {} ms", t.as_millis());

    // A 4th node with the wrong cookie dials all three: refused, counted, never listed.
    let refused_before = n0
        .metric_value("dispatch_cluster_auth_refusals_total")
        .await;
    eprintln!(
        "before the 4th node: n0 counted {refused_before} refusals, {} dials, {} failed dials",
        n0.metric_value("dispatch_cluster_connect_attempts_total")
            .await,
        n0.metric_value("dispatch_cluster_connect_failures_total")
            .await
    );
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-cookie-0123456789abcdef").unwrap();
    let n3 = node(3, &wrong, &db).spawn();
    eventually_within("the wrong cookie refused and counted", SLOW, || async {
        (n0.metric_value("dispatch_cluster_auth_refusals_total")
            .await
            > refused_before)
            .then_some(())
    })
    .await;
    eprintln!(
        "the 4th node with the wrong cookie: n0 counted {} refusals",
        n0.metric_value("dispatch_cluster_auth_refusals_total")
            .await
    );
    // Several heartbeat timeouts more: it is still not a member anywhere.
    tokio::time::sleep(Duration::from_millis(3 * PEER_TIMEOUT_MS)).await;
    for (d, me) in [(&n0, "n0"), (&n1, "n1"), (&n2, "n2")] {
        assert_eq!(members(d, me).await, names(&["n0", "n1", "n2"]));
    }
    assert_eq!(listed(&n0).await, names(&["n0", "n1", "n2"]));
    assert_eq!(members(&n3, "n3").await, names(&["n3"]));
    assert_eq!(n3.metric_value("dispatch_cluster_members").await, 1.0);

    // Garbage on a cluster port: a huge length prefix, random bytes, a truncated frame.
    let mut junk = vec![
        vec![0xff; 64],
        u64::MAX.to_be_bytes().to_vec(),
        vec![0, 0, 0, 0, 0, 0, 0, 5, 1, 2],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    junk.push(
        (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect(),
    );
    for bytes in &junk {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", PORTS[0]))
            .await
            .unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
    }
    // A flood of idle connections: at most 32 wait for a handshake, the rest are closed.
    let idle = idle_flood(&n0, PORTS[0], 48).await;
    drop(idle);
    tokio::time::sleep(Duration::from_millis(2 * PEER_TIMEOUT_MS)).await;
    let mut n0 = n0;
    assert!(n0.running(), "garbage on the cluster port ended the node");
    all_list(
        &[(&n0, "n0"), (&n1, "n1"), (&n2, "n2")],
        &["n0", "n1", "n2"],
        "the cluster unchanged by garbage",
    )
    .await;
    drop(n3);
}
