//! Cluster mode's membership (issue 16): the `--cluster-*` flags, starting
//! [`dispatch_cluster::Cluster`] before the store opens, and `GET /admin/cluster`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use dispatch_cluster::{Cluster, ClusterConfig, ClusterTls, Cookie, TlsFiles};
use serde_json::{Value, json};

use super::App;
use super::admin::Admin;

/// The `--cluster-*` flags. Membership starts when `--cluster-listen` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Address of this node's cluster port (ractor_cluster), e.g. `0.0.0.0:7000`. Setting
    /// it turns cluster membership on; it then needs `--node-name` and a cookie.
    #[arg(long, env = "DISPATCH_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// The peers' cluster ports, `host:port`, comma-separated; DNS names are resolved
    /// again on every dial (a StatefulSet's headless names). This node's own address may
    /// be listed (it is skipped).
    #[arg(long, env = "DISPATCH_CLUSTER_PEERS", value_delimiter = ',')]
    pub cluster_peers: Vec<String>,
    /// The shared secret peers authenticate with. Prefer `--cluster-cookie-file`.
    #[arg(long, env = "DISPATCH_CLUSTER_COOKIE", hide_env_values = true)]
    pub cluster_cookie: Option<String>,
    /// A file holding the cookie (a mounted Kubernetes Secret); surrounding whitespace
    /// is ignored.
    #[arg(long, env = "DISPATCH_CLUSTER_COOKIE_FILE")]
    pub cluster_cookie_file: Option<PathBuf>,
    /// How often this node heartbeats every peer.
    #[arg(long, env = "DISPATCH_CLUSTER_HEARTBEAT_MS", default_value_t = 500)]
    pub cluster_heartbeat_ms: u64,
    /// A peer not heard from for this long is dead: its links are dropped and it leaves
    /// the member set (and so the shard map).
    #[arg(
        long,
        env = "DISPATCH_CLUSTER_PEER_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    pub cluster_peer_timeout_ms: u64,
    /// TLS on the cluster links: this node's certificate chain (PEM, its own first). Give
    /// all three of `--cluster-tls-cert`, `--cluster-tls-key` and `--cluster-tls-ca`, or
    /// none (plain TCP). It serves both ends of a link (server and client authentication).
    #[arg(long, env = "DISPATCH_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// TLS: this node's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DISPATCH_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// TLS: the CA certificate(s) (PEM) every peer's certificate must chain to. Mutual: a
    /// peer that dials in without such a certificate is refused too.
    #[arg(long, env = "DISPATCH_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
    /// TLS: the name every peer's certificate must carry. Default: the host part of the
    /// peer address dialled (`--cluster-peers`).
    #[arg(long, env = "DISPATCH_CLUSTER_TLS_SERVER_NAME")]
    pub cluster_tls_server_name: Option<String>,
}

/// The shortest cookie accepted: ractor_cluster's handshake is only as strong as it.
const MIN_COOKIE_CHARS: usize = 16;

impl ClusterArgs {
    /// The membership's configuration, `None` when `--cluster-listen` is not given (then
    /// no other `--cluster-*` flag may be either).
    pub fn validate(self, node_name: Option<&str>) -> Result<Option<ClusterConfig>, String> {
        let tls_given = self.cluster_tls_cert.is_some()
            || self.cluster_tls_key.is_some()
            || self.cluster_tls_ca.is_some()
            || self.cluster_tls_server_name.is_some();
        let Some(listen) = self.cluster_listen else {
            if !self.cluster_peers.is_empty()
                || self.cluster_cookie.is_some()
                || self.cluster_cookie_file.is_some()
                || tls_given
            {
                return Err(
                    "--cluster-peers, --cluster-cookie[-file] and --cluster-tls-* need --cluster-listen".into(),
                );
            }
            return Ok(None);
        };
        let node_name = node_name
            .ok_or("--cluster-listen needs --node-name (or DISPATCH_NODE_NAME)")?
            .to_owned();
        if node_name.is_empty()
            || node_name.len() > dispatch_cluster::MAX_NAME_BYTES
            || !node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "--node-name must be 1 to {} characters of letters, digits, '-', '_' and '.'",
                dispatch_cluster::MAX_NAME_BYTES
            ));
        }
        let cookie = match (self.cluster_cookie, self.cluster_cookie_file) {
            (Some(_), Some(_)) => {
                return Err("give --cluster-cookie or --cluster-cookie-file, not both".into());
            }
            (None, None) => {
                return Err(
                    "--cluster-listen needs --cluster-cookie-file or --cluster-cookie".into(),
                );
            }
            (Some(c), None) => c,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| format!("--cluster-cookie-file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        };
        if cookie.chars().count() < MIN_COOKIE_CHARS {
            // Never the cookie itself.
            return Err(format!(
                "the cluster cookie must be at least {MIN_COOKIE_CHARS} characters"
            ));
        }
        for p in &self.cluster_peers {
            let ok = p
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("--cluster-peers: {p:?} is not host:port"));
            }
        }
        if !(10..=60_000).contains(&self.cluster_heartbeat_ms) {
            return Err("--cluster-heartbeat-ms must be from 10 to 60000".into());
        }
        if self.cluster_peer_timeout_ms < 2 * self.cluster_heartbeat_ms
            || self.cluster_peer_timeout_ms > 600_000
        {
            return Err("--cluster-peer-timeout-ms must be at least twice --cluster-heartbeat-ms, and at most 600000".into());
        }
        let tls = match (
            self.cluster_tls_cert,
            self.cluster_tls_key,
            self.cluster_tls_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(
                ClusterTls::from_files(
                    &TlsFiles { cert, key, ca },
                    self.cluster_tls_server_name.as_deref(),
                )
                .map_err(|e| e.to_string())?,
            ),
            (None, None, None) if self.cluster_tls_server_name.is_none() => None,
            _ => {
                return Err("--cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca go together (and --cluster-tls-server-name needs them): give all three or none".into());
            }
        };
        Ok(Some(ClusterConfig {
            node_name,
            listen,
            peers: self
                .cluster_peers
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect(),
            cookie: Cookie(cookie),
            heartbeat: Duration::from_millis(self.cluster_heartbeat_ms),
            peer_timeout: Duration::from_millis(self.cluster_peer_timeout_ms),
            tls,
        }))
    }
}

/// Starts membership when configured.
pub async fn start(
    config: &super::Config,
    metrics: &dispatch_actors::Metrics,
) -> anyhow::Result<Option<Arc<Cluster>>> {
    match config.membership.clone() {
        None => Ok(None),
        Some(c) => Ok(Some(Arc::new(Cluster::start(c, &metrics.registry).await?))),
    }
}

pub fn routes() -> Router<App> {
    Router::new().route("/admin/cluster", get(status))
}

/// This node, the live members with how long ago each was heard, and how many shards
/// each owns among the shards this node's cells are in.
#[utoipa::path(get, path = "/admin/cluster", tag = "admin", security(("admin" = [])),
    description = "Cluster membership (docs/api.md, \"Cluster membership\"): this node, the live members with how long ago each was last heard, and how many of the shards this node's cells are in each member owns. Without `--cluster-listen`, only `{\"enabled\": false}`.",
    responses((status = 200, description = "Membership as this node sees it", body = super::openapi::ClusterStatus)))]
pub(super) async fn status(_: Admin, State(app): State<App>) -> Json<Value> {
    let Some(cluster) = &app.cluster else {
        return Json(json!({ "enabled": false }));
    };
    let members = cluster.status();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let shards: std::collections::BTreeSet<u64> = app
        .system
        .cell_ids()
        .into_iter()
        .map(dispatch_engine::shard::shard_of)
        .collect();
    let per = dispatch_engine::shard::shards_per_member(shards.iter().copied(), &names);
    Json(json!({
        "enabled": true,
        "node": cluster.node_name(),
        "members": members.iter().map(|m| json!({
            "name": m.name,
            "self": m.is_self,
            "last_heard_ms": m.last_heard_ms,
        })).collect::<Vec<_>>(),
        "shards": {
            "resolution": dispatch_engine::shard::SHARD_RESOLUTION as u8,
            "known": shards.len(),
            "per_member": per,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ClusterArgs {
        ClusterArgs {
            cluster_listen: Some("127.0.0.1:7000".parse().unwrap()),
            cluster_peers: vec!["dispatchd-1.dispatchd:7000".into(), "127.0.0.1:7002".into()],
            cluster_cookie: Some("a-cookie-of-twenty-chars".into()),
            cluster_cookie_file: None,
            cluster_heartbeat_ms: 500,
            cluster_peer_timeout_ms: 2_000,
            cluster_tls_cert: None,
            cluster_tls_key: None,
            cluster_tls_ca: None,
            cluster_tls_server_name: None,
        }
    }

    #[test]
    fn membership_needs_a_name_and_a_cookie_and_never_prints_it() {
        let c = args().validate(Some("n0")).unwrap().unwrap();
        assert_eq!(c.peers.len(), 2);
        assert!(!format!("{c:?}").contains("a-cookie-of-twenty-chars"));
        let err = |a: ClusterArgs, name: Option<&str>| a.validate(name).unwrap_err();
        assert!(err(args(), None).contains("--node-name"));
        assert!(err(args(), Some("n@0")).contains("--node-name"));
        let mut a = args();
        a.cluster_cookie = None;
        assert!(err(a, Some("n0")).contains("cookie"));
        let mut a = args();
        a.cluster_cookie_file = Some("/nonexistent/cookie".into());
        assert!(err(a, Some("n0")).contains("not both"));
        let mut a = args();
        a.cluster_cookie = Some("short".into());
        let e = err(a, Some("n0"));
        assert!(e.contains("at least 16") && !e.contains("short"), "{e}");
        let mut a = args();
        a.cluster_peers = vec!["no-port".into()];
        assert!(err(a, Some("n0")).contains("host:port"));
        let mut a = args();
        a.cluster_peer_timeout_ms = 600;
        assert!(err(a, Some("n0")).contains("twice"));
        let mut a = args();
        a.cluster_listen = None;
        assert!(err(a, Some("n0")).contains("need --cluster-listen"));
        // TLS: all three files or none; a bad file names its flag.
        let mut a = args();
        a.cluster_tls_cert = Some("/nonexistent/cert.pem".into());
        assert!(err(a, Some("n0")).contains("all three or none"));
        let mut a = args();
        a.cluster_tls_server_name = Some("dispatchd".into());
        assert!(err(a, Some("n0")).contains("all three or none"));
        let a = ClusterArgs {
            cluster_tls_cert: Some("/nonexistent/cert.pem".into()),
            cluster_tls_key: Some("/nonexistent/key.pem".into()),
            cluster_tls_ca: Some("/nonexistent/ca.pem".into()),
            ..args()
        };
        let e = err(a, Some("n0"));
        assert!(
            e.contains("--cluster-tls-cert /nonexistent/cert.pem: cannot read"),
            "{e}"
        );
        let a = ClusterArgs {
            cluster_listen: None,
            cluster_peers: vec![],
            cluster_cookie: None,
            cluster_tls_ca: Some("/nonexistent/ca.pem".into()),
            ..args()
        };
        assert!(err(a, None).contains("need --cluster-listen"));
        let off = ClusterArgs {
            cluster_listen: None,
            cluster_peers: vec![],
            cluster_cookie: None,
            ..args()
        };
        assert!(off.validate(None).unwrap().is_none());
        // A cookie file: surrounding whitespace is not part of the cookie.
        let f = std::env::temp_dir().join(format!("dispatch-cookie-test-{}", std::process::id()));
        std::fs::write(&f, "  file-cookie-0123456789\n").unwrap();
        let a = ClusterArgs {
            cluster_cookie: None,
            cluster_cookie_file: Some(f.clone()),
            ..args()
        };
        let read = a.validate(Some("n0"));
        let _ = std::fs::remove_file(&f);
        assert_eq!(read.unwrap().unwrap().cookie.0, "file-cookie-0123456789");
    }
}
