//! Helpers for tests of cluster membership (issue 16) over real `dispatchd` processes:
//! a node in cluster mode on a shared PostgreSQL database, and the member set a node counts
//! live, read from its `/metrics` (standbys serve no `/admin/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dispatch_transport::server::shards::{service_area_shards, shard_owner};

use crate::{Dispatchd, DispatchdBuilder, SLOW, eventually_within};

/// What a cluster test needs first: a fresh database on the test PostgreSQL, a temporary
/// directory, and `cookie` written to a file in it. `None` (the test returns) without a
/// PostgreSQL, and under `DISPATCH_TEST_STORE=postgres`: every node runs on PostgreSQL
/// anyway, so not twice in CI.
pub fn cluster_setup(test: &str, cookie: &str) -> Option<(String, tempfile::TempDir, PathBuf)> {
    if crate::test_store_is_postgres() {
        eprintln!("{test}: skipped under DISPATCH_TEST_STORE=postgres (it always runs on it)");
        return None;
    }
    let db = dispatch_persistence::pg::test_database(test)?;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cookie");
    std::fs::write(&file, format!("{cookie}\n")).unwrap();
    Some((db, dir, file))
}

/// A node named `name` in cluster mode `mode` (`--cluster-mode`: `"leader"` or
/// `"sharded"`, said even for the default) on the database `db`: its cluster port on
/// loopback, the peers' ports (`localhost:<port>`: a DNS name, resolved on every dial, as a
/// StatefulSet's peers are), the cookie in `cookie_file`, the given heartbeat and peer
/// timeout, then `extra` flags.
#[allow(clippy::too_many_arguments)]
pub fn cluster_node(
    name: &str,
    mode: &str,
    port: u16,
    peer_ports: &[u16],
    cookie_file: &Path,
    db: &str,
    (heartbeat_ms, peer_timeout_ms): (u64, u64),
    extra: &[String],
) -> DispatchdBuilder {
    let peers: Vec<String> = peer_ports
        .iter()
        .map(|p| format!("localhost:{p}"))
        .collect();
    let mut flags = vec![
        "--node-name".to_owned(),
        name.to_owned(),
        "--cluster-mode".to_owned(),
        mode.to_owned(),
        "--cluster-listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--cluster-peers".to_owned(),
        peers.join(","),
        "--cluster-cookie-file".to_owned(),
        cookie_file.display().to_string(),
        "--cluster-heartbeat-ms".to_owned(),
        heartbeat_ms.to_string(),
        "--cluster-peer-timeout-ms".to_owned(),
        peer_timeout_ms.to_string(),
    ];
    flags.extend_from_slice(extra);
    // `sled_only`: the builder sets no database of its own; the env below sets ours.
    Dispatchd::builder(name)
        .sled_only()
        .env("DISPATCH_STORE", "postgres")
        .env("DISPATCH_DATABASE_URL", db)
        .flags(&flags)
}

/// The member names `d` counts live: itself and every peer whose
/// `dispatch_cluster_peer_up` is 1 (empty while it does not answer yet).
pub async fn members(d: &Dispatchd, me: &str) -> Vec<String> {
    let Ok(r) = d.http.get(d.url("/metrics")).send().await else {
        return Vec::new();
    };
    let Ok(text) = r.text().await else {
        return Vec::new();
    };
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("dispatch_cluster_peer_up{peer=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            (value.trim() == "1").then(|| name.to_owned())
        })
        .collect();
    out.push(me.to_owned());
    out.sort();
    out
}

/// Every candidate shard of a sharded cluster whose `--service-area` is `area`: the whole
/// city (0), the 256 entity shards, and the area's cell shards.
pub fn candidate_shards(area: &str) -> Vec<u64> {
    let mut all: Vec<u64> = (0..=256).collect();
    all.extend(service_area_shards(area).expect("a valid service area"));
    all
}

/// The live shard leases in the database `db` (`dispatch_leases`): shard → holder.
pub async fn live_leases(db: &str) -> Result<BTreeMap<u64, String>, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT shard, holder FROM dispatch_leases WHERE expires_at > now()",
            &[],
        )
        .await;
    conn.abort();
    Ok(rows?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, String>(1)))
        .collect())
}

/// Whether every candidate shard of the cluster on `area` ([`candidate_shards`]) has a
/// live lease in `db` held by the owner the rendezvous map gives it among `members`
/// (false while the leases cannot be read: a predicate to poll).
pub async fn partitioned(db: &str, area: &str, members: &[&str]) -> bool {
    let Ok(leases) = live_leases(db).await else {
        return false;
    };
    candidate_shards(area).iter().all(|s| {
        leases
            .get(s)
            .is_some_and(|h| shard_owner(*s, members).is_some_and(|o| o == h))
    })
}

pub fn names(of: &[&str]) -> Vec<String> {
    of.iter().map(|s| s.to_string()).collect()
}

/// Waits until every node in `nodes` lists exactly `want`; returns how long it took.
pub async fn all_list(nodes: &[(&Dispatchd, &str)], want: &[&str], what: &str) -> Duration {
    let start = Instant::now();
    let want = names(want);
    eventually_within(what, SLOW, || async {
        for (d, me) in nodes {
            if members(d, me).await != want {
                return None;
            }
        }
        Some(())
    })
    .await;
    start.elapsed()
}

/// Waits until each of `nodes` (named `names`, in order) lists all of them as members.
pub async fn all_see_each_other(nodes: &[Dispatchd], names: &[&str], what: &str) -> Duration {
    let pairs: Vec<(&Dispatchd, &str)> = nodes.iter().zip(names.iter().copied()).collect();
    all_list(&pairs, names, what).await
}

/// Opens `count` idle TCP connections to `d`'s cluster port `port` that never start a
/// handshake, and waits until `d` counts one closed past its cap of links waiting for a
/// handshake (`dispatch_cluster_pending_refused_total`). Returns the connections: they stay
/// open until the caller drops them.
pub async fn idle_flood(d: &Dispatchd, port: u16, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    eventually_within(
        "idle links past the cap closed and counted",
        SLOW,
        || async {
            (d.metric_value("dispatch_cluster_pending_refused_total")
                .await
                > 0.0)
                .then_some(())
        },
    )
    .await;
    idle
}
