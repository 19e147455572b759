//! Cluster membership over `ractor_cluster` (issue 16): this node's `NodeServer`, links to
//! the configured peers (re-dialled with backoff, since `ractor_cluster` never reconnects),
//! a heartbeat actor in a ractor process group, and the live member set published on a
//! [`tokio::sync::watch`] for the shard map and the lease controller.
//!
//! - **Authentication**: `ractor_cluster`'s cookie handshake (a challenge–response over the
//!   shared secret, both ways). A peer that fails it is refused and counted
//!   (`dispatch_cluster_auth_refusals_total`).
//! - **Start-up**: membership subscribes to the `NodeServer`'s events right after spawning it,
//!   then adopts the sessions already authenticated; a session whose opening it missed is
//!   tracked when its authentication is reported (issue 16: nodes started at once).
//! - **Failure detection**: `ractor_cluster` keeps a silent peer's session open forever. Every
//!   node casts a heartbeat to every remote member of [`HEARTBEAT_GROUP`] each
//!   `heartbeat` interval; a peer not heard from within `peer_timeout` is declared dead, its
//!   sessions are stopped (so a paused node is dropped like a dead one), and it is dialled
//!   again like any missing peer. A session that has not authenticated within
//!   `peer_timeout` is stopped too (a paused peer accepts TCP but never answers).
//! - **TLS** (optional, [`ClusterConfig::tls`]): mutual TLS 1.3 under the cookie handshake
//!   ([`tls`]). This node accepts its links itself ([`accept_tls`]): every handshake in a
//!   task of its own, within `peer_timeout`, at most [`MAX_PENDING_SESSIONS`] at once, a
//!   failure counted by reason (`dispatch_cluster_tls_refusals_total`); only a finished
//!   handshake reaches the `NodeServer`. (`ractor_cluster`'s own TLS listener awaits each
//!   handshake inline, without a timeout, so one idle connection would stop it accepting,
//!   and its failures are only logged.) Its own listener then runs, unused and TLS too, on
//!   an ephemeral loopback port.
//! - **Bounds**: inbound frames at most [`MAX_FRAME_BYTES`]; every dial (DNS and TCP) and
//!   every call to the `NodeServer` within `peer_timeout`; dial backoff up to
//!   [`MAX_BACKOFF`]; heartbeat names at most [`MAX_NAME_BYTES`].

mod heartbeat;
mod metrics;
mod tls;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{ActorId, ActorRef, ActorRuntime};
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{
    IncomingEncryptionMode, NetworkStream, NodeEventSubscription, NodeServer, NodeServerMessage,
    NodeSessionMessage,
};
use tokio::sync::watch;

pub use heartbeat::{HEARTBEAT_GROUP, HeartbeatMsg, MAX_NAME_BYTES};
pub use metrics::ClusterMetrics;
pub use tls::{ClusterTls, TlsError, TlsFiles};

/// The largest inbound cluster frame; a peer sending a larger one is disconnected. The
/// heartbeats and `ractor_cluster`'s own control messages are far smaller.
pub const MAX_FRAME_BYTES: u64 = 256 * 1024;
/// Links open but not yet authenticated, at most; more are closed at once (counted).
pub const MAX_PENDING_SESSIONS: usize = 32;
/// The longest wait between two dials of a missing peer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// The shared cluster secret. Never printed.
#[derive(Clone)]
pub struct Cookie(pub String);

impl std::fmt::Debug for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What membership needs, validated by the caller.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster (a StatefulSet pod's name).
    pub node_name: String,
    /// Where the `NodeServer` listens.
    pub listen: SocketAddr,
    /// The peers to dial, `host:port`; a DNS name is resolved again on every dial.
    pub peers: Vec<String>,
    pub cookie: Cookie,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
    /// Mutual TLS on every link (`--cluster-tls-*`); `None`: plain TCP.
    pub tls: Option<ClusterTls>,
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the cluster node server on {addr} (--cluster-listen): {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("cannot start the heartbeat actor: {0}")]
    Heartbeat(String),
}

/// One member as `/admin/v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    /// This node itself.
    pub is_self: bool,
    /// Milliseconds since its last heartbeat arrived (`None` for this node).
    pub last_heard_ms: Option<u64>,
}

/// A session as the node server reported it.
#[derive(Debug)]
struct Session {
    actor: ActorRef<NodeSessionMessage>,
    opened: Instant,
    is_server: bool,
    node_id: u64,
    peer_addr: String,
    /// The peer's name once it authenticated.
    name: Option<String>,
}

impl Session {
    /// `ses`, opened now, not yet authenticated.
    fn opened(ses: &NodeServerSessionInformation) -> Session {
        Session {
            actor: ses.actor.clone(),
            opened: Instant::now(),
            is_server: ses.is_server,
            node_id: ses.node_id,
            peer_addr: ses.peer_addr.clone(),
            name: None,
        }
    }
}

/// State shared by the heartbeat actor, the node-server subscription and the dialer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) node_name: String,
    pub(crate) peer_timeout: Duration,
    pub(crate) metrics: ClusterMetrics,
    inner: Mutex<Inner>,
    members_tx: watch::Sender<Vec<String>>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<ActorId, Session>,
    /// Live peers (not this node) and when each was last heard.
    live: HashMap<String, Instant>,
    /// Addresses (dialled, or advertised by the peer) → the peer name seen there.
    known: HashMap<String, String>,
}

impl Shared {
    /// Sorted live members, this node included.
    fn members(inner: &Inner, me: &str) -> Vec<String> {
        let mut set: BTreeSet<String> = inner.live.keys().cloned().collect();
        set.insert(me.to_owned());
        set.into_iter().collect()
    }

    fn publish(&self, inner: &Inner) {
        let members = Self::members(inner, &self.node_name);
        self.metrics.members.set(members.len() as i64);
        self.members_tx.send_if_modified(|m| {
            if *m == members {
                false
            } else {
                *m = members;
                true
            }
        });
    }

    /// The node ids of the authenticated sessions with `name`.
    pub(crate) fn node_ids_of(&self, name: &str) -> Vec<u64> {
        let inner = self.inner.lock();
        inner
            .sessions
            .values()
            .filter(|s| s.name.as_deref() == Some(name))
            .map(|s| s.node_id)
            .collect()
    }

    /// A heartbeat from `name` arrived over the session of `node_id`. Only a name an
    /// authenticated session carries counts, so a peer cannot keep another alive.
    pub(crate) fn heard(&self, name: &str) -> bool {
        let mut inner = self.inner.lock();
        if !inner
            .sessions
            .values()
            .any(|s| s.name.as_deref() == Some(name))
        {
            return false;
        }
        let was_live = inner.live.insert(name.to_owned(), Instant::now()).is_some();
        if !was_live {
            tracing::info!(peer = name, "cluster peer up");
            self.metrics.peer_up.with_label_values(&[name]).set(1);
            self.publish(&inner);
        }
        true
    }

    /// Declares peers not heard within the timeout dead and stops their sessions, and
    /// stops sessions that have not authenticated within it.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let dead: Vec<String> = inner
            .live
            .iter()
            .filter(|(_, heard)| now.duration_since(**heard) > self.peer_timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &dead {
            inner.live.remove(name);
            self.metrics.peers_dead.inc();
            self.metrics.peer_up.with_label_values(&[name]).set(0);
            tracing::warn!(peer = %name, timeout_ms = self.peer_timeout.as_millis() as u64, "cluster peer not heard from: declared dead, its sessions dropped");
        }
        for s in inner.sessions.values() {
            let stale = match &s.name {
                Some(n) => dead.contains(n),
                None => now.duration_since(s.opened) > self.peer_timeout,
            };
            if stale {
                if s.name.is_none() {
                    self.metrics.handshake_timeouts.inc();
                }
                s.actor.stop(Some("peer_timeout".into()));
            }
        }
        if !dead.is_empty() {
            self.publish(&inner);
        }
    }

    fn last_heard(&self) -> Vec<MemberStatus> {
        let now = Instant::now();
        let inner = self.inner.lock();
        let mut out: Vec<MemberStatus> = inner
            .live
            .iter()
            .map(|(n, t)| MemberStatus {
                name: n.clone(),
                is_self: false,
                last_heard_ms: Some(now.duration_since(*t).as_millis() as u64),
            })
            .collect();
        out.push(MemberStatus {
            name: self.node_name.clone(),
            is_self: true,
            last_heard_ms: None,
        });
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The live peer name already seen at one of `addrs`, if any.
    fn live_at(&self, addrs: &[String]) -> Option<String> {
        let inner = self.inner.lock();
        addrs
            .iter()
            .filter_map(|a| inner.known.get(a))
            .find(|n| inner.live.contains_key(*n))
            .cloned()
    }
}

/// The host part of the name this node gives its peers (ractor_cluster's
/// `<name>@<host>` and `connection_string` `<host>:<port>`): the listen address's IP, or,
/// when that is unspecified (`0.0.0.0`, `::`, as a pod listens), the node's own name.
/// ractor_cluster ends a session whose peer's `connection_string` equals this node's as a
/// link to itself, so pods all listening on `0.0.0.0:7070` each dropped every peer
/// ("self_connection") and membership never formed; node names are unique (required).
fn advertised_host(config: &ClusterConfig) -> String {
    let ip = config.listen.ip();
    if ip.is_unspecified() {
        config.node_name.clone()
    } else {
        ip.to_string()
    }
}

/// A peer's member name from ractor_cluster's `<name>@<hostname>`.
fn node_name_of(full: &str) -> &str {
    full.split('@').next().unwrap_or(full)
}

/// Node-server events, kept in [`Shared`].
struct Events(Arc<Shared>);

impl Events {
    /// Tracks an authenticated session the subscription never reported (see
    /// [`Cluster::start_with`]): as if it had seen it open and authenticate. Skipped when
    /// it is tracked already, or when its actor has stopped (its disconnect may have been
    /// reported before this runs, and would then never remove it).
    fn adopt(&self, ses: NodeServerSessionInformation) {
        {
            let inner = self.0.inner.lock();
            if inner.sessions.contains_key(&ses.actor.get_id())
                || ses.actor.get_status() != ractor::ActorStatus::Running
            {
                return;
            }
        }
        tracing::info!(addr = %ses.peer_addr, incoming = ses.is_server, "cluster session adopted: it authenticated before membership subscribed");
        self.node_session_opened(ses.clone());
        self.node_session_authenticated(ses);
    }
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        let mut inner = self.0.inner.lock();
        let pending = inner.sessions.values().filter(|s| s.name.is_none()).count();
        if pending >= MAX_PENDING_SESSIONS {
            // Links not yet authenticated are capped: a flood of idle connections to the
            // cluster port costs at most this many sessions until the handshake timeout.
            self.0.metrics.pending_refused.inc();
            ses.actor.stop(Some("too_many_pending".into()));
            return;
        }
        inner
            .sessions
            .insert(ses.actor.get_id(), Session::opened(&ses));
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        let Some(mut peer) = ses.peer_name.clone() else {
            return;
        };
        // ractor_cluster names a node `<name>@<hostname>`; members are known by `<name>`
        // (`--node-name` has no '@').
        peer.name = node_name_of(&peer.name).to_owned();
        let mut inner = self.0.inner.lock();
        // A session opened before membership subscribed (its `node_session_opened` never
        // came) and authenticated after [`Cluster::start_with`] listed the node server's
        // sessions (then still unauthenticated, so not adopted) is tracked from here, or
        // its peer would never be counted: its heartbeats not believed, and, when this
        // node's name sorts first, this node's own dials of the peer losing ractor_cluster's
        // duplicate-link election for good. Issue 16: 3 nodes started at once.
        let id = ses.actor.get_id();
        if !inner.sessions.contains_key(&id)
            && ses.actor.get_status() == ractor::ActorStatus::Running
        {
            tracing::info!(addr = %ses.peer_addr, incoming = ses.is_server, "cluster session adopted: it opened before membership subscribed");
            inner.sessions.insert(id, Session::opened(&ses));
        }
        if let Some(s) = inner.sessions.get_mut(&id) {
            s.name = Some(peer.name.clone());
            if !s.is_server {
                let addr = s.peer_addr.clone();
                inner.known.insert(addr, peer.name.clone());
            }
        }
        inner
            .known
            .insert(peer.connection_string.clone(), peer.name.clone());
        tracing::info!(peer = %peer.name, addr = %ses.peer_addr, incoming = ses.is_server, "cluster session authenticated");
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let mut inner = self.0.inner.lock();
        let Some(gone) = inner.sessions.remove(&ses.actor.get_id()) else {
            return;
        };
        match gone.name {
            None => {
                // An incoming session that never authenticated: a wrong cookie, or not a
                // cluster peer at all — unless it lost the election between two
                // simultaneous links of a peer that is linked anyway.
                let claimed = ses
                    .peer_name
                    .as_ref()
                    .map(|p| node_name_of(&p.name).to_owned());
                let linked = claimed.as_ref().is_some_and(|n| {
                    inner.live.contains_key(n)
                        || inner.sessions.values().any(|s| s.name.as_ref() == Some(n))
                });
                if gone.is_server && !linked {
                    self.0.metrics.auth_refusals.inc();
                    tracing::warn!(addr = %gone.peer_addr, claimed_name = ?claimed, "cluster peer refused: it did not complete the cookie handshake");
                }
            }
            Some(name) => {
                let other = inner
                    .sessions
                    .values()
                    .any(|s| s.name.as_ref() == Some(&name));
                if !other && inner.live.remove(&name).is_some() {
                    tracing::warn!(peer = %name, "cluster peer's session closed: peer down");
                    self.0.metrics.peer_up.with_label_values(&[&name]).set(0);
                    self.0.publish(&inner);
                }
            }
        }
    }
}

/// A running membership: stop it with [`Cluster::stop`].
pub struct Cluster {
    shared: Arc<Shared>,
    members: watch::Receiver<Vec<String>>,
    server: ActorRef<NodeServerMessage>,
    heartbeat: ActorRef<HeartbeatMsg>,
    dialer: tokio::task::JoinHandle<()>,
    /// With TLS, the task accepting the links ([`accept_tls`]).
    acceptor: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.shared.node_name)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts the node server on `config.listen`, the heartbeat actor and the dialer;
    /// metrics go to `registry`.
    pub async fn start(
        config: ClusterConfig,
        registry: &prometheus::Registry,
    ) -> Result<Cluster, ClusterError> {
        Self::start_with(
            config,
            registry,
            |_| std::future::ready(()),
            std::future::ready(()),
        )
        .await
    }

    /// [`Cluster::start`], awaiting `listening` once the node server has started (and its
    /// listener accepts) and before anything else: the test of issue 16 holds this open so
    /// that a peer's link authenticates there. `unsubscribed` is awaited right after the node
    /// server is spawned, before membership subscribes to its events: the test of issue 16's
    /// simultaneous start holds it until a peer's link is open.
    async fn start_with<F: std::future::Future<Output = ()>>(
        config: ClusterConfig,
        registry: &prometheus::Registry,
        unsubscribed: impl FnOnce(&ActorRef<NodeServerMessage>) -> F,
        listening: impl std::future::Future<Output = ()>,
    ) -> Result<Cluster, ClusterError> {
        let metrics = ClusterMetrics::new(registry);
        let (members_tx, members) = watch::channel(vec![config.node_name.clone()]);
        metrics.members.set(1);
        let shared = Arc::new(Shared {
            node_name: config.node_name.clone(),
            peer_timeout: config.peer_timeout,
            metrics,
            inner: Mutex::new(Inner::default()),
            members_tx,
        });
        let listen_err = |reason: String| ClusterError::Listen {
            addr: config.listen,
            reason,
        };
        // Bind once ourselves first: ractor_cluster's listener panics inside its actor on a
        // taken port, which would only show as a spawn error without the reason. With TLS
        // this listener is kept: this node accepts its links itself.
        let own =
            std::net::TcpListener::bind(config.listen).map_err(|e| listen_err(e.to_string()))?;
        let (own, port, listen_ip, encryption) = match &config.tls {
            None => {
                drop(own);
                (None, config.listen.port(), config.listen.ip(), None)
            }
            Some(tls) => (
                Some(own),
                0,
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                Some(IncomingEncryptionMode::Tls(tls.acceptor().clone())),
            ),
        };
        let server = NodeServer::new(
            port,
            config.cookie.0.clone(),
            config.node_name.clone(),
            advertised_host(&config),
            encryption,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(listen_ip)
        .with_max_inbound_frame_size(MAX_FRAME_BYTES);
        // Subscribed before the node server starts (issue 16): its listener starts inside its
        // `pre_start` and may accept and authenticate a link at once, and a session whose
        // events membership missed is never tracked (its peer never counted, never dropped).
        // Cast before `pre_start` runs, the subscription is first in the server's queue,
        // ahead of every link's events.
        let (server, started) =
            ActorRuntime::spawn_instant(None, server, ()).map_err(|e| listen_err(e.to_string()))?;
        unsubscribed(&server).await;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "dispatch-membership".into(),
                subscription: Box::new(Events(shared.clone())),
            })
            .map_err(|e| listen_err(e.to_string()))?;
        match started.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(listen_err(e.to_string())),
            Err(e) => return Err(listen_err(e.to_string())),
        }
        // The subscription is cast right after the server is spawned, but the server's
        // `pre_start` (which starts its listener) runs on another thread meanwhile: on a
        // busy machine a peer's link can open and authenticate before the subscription is
        // queued, and its events are then never seen (the peer was never counted: CI saw
        // it once, "timed out waiting for 3 nodes list each other"). The server answers in
        // order, so its sessions now include every one the subscription missed: adopt
        // those. Bounded by the cluster's call timeout; failing it only logs.
        match ractor::call_t!(
            server,
            NodeServerMessage::GetSessions,
            u64::try_from(config.peer_timeout.as_millis()).unwrap_or(u64::MAX)
        ) {
            Ok(sessions) => {
                let events = Events(shared.clone());
                for ses in sessions.into_values() {
                    events.adopt(ses);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: could not list the node server's sessions at start")
            }
        }
        listening.await;
        // After the subscription: every link this node accepts is a session it tracks.
        let acceptor = match (&config.tls, own) {
            (Some(tls), Some(own)) => {
                // The name peers see (`connection_string`) carries the public port, not the
                // ephemeral one its own listener reported (that message is already queued).
                server
                    .cast(NodeServerMessage::PortChanged {
                        port: config.listen.port(),
                    })
                    .map_err(|e| listen_err(e.to_string()))?;
                own.set_nonblocking(true)
                    .map_err(|e| listen_err(e.to_string()))?;
                let own = tokio::net::TcpListener::from_std(own)
                    .map_err(|e| listen_err(e.to_string()))?;
                Some(tokio::spawn(accept_tls(
                    own,
                    tls.clone(),
                    shared.clone(),
                    server.clone(),
                )))
            }
            _ => None,
        };
        let heartbeat = heartbeat::spawn(shared.clone(), config.heartbeat)
            .await
            .map_err(ClusterError::Heartbeat)?;
        let dialer = tokio::spawn(dial_peers(config.clone(), shared.clone(), server.clone()));
        tracing::info!(node = %config.node_name, listen = %config.listen, peers = ?config.peers, "cluster membership started");
        Ok(Cluster {
            shared,
            members,
            server,
            heartbeat,
            dialer,
            acceptor,
        })
    }

    /// The live members, this node included, sorted; changes are published.
    pub fn members(&self) -> watch::Receiver<Vec<String>> {
        self.members.clone()
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.node_name
    }

    /// Every live member with how long ago it was last heard.
    pub fn status(&self) -> Vec<MemberStatus> {
        self.shared.last_heard()
    }

    /// Stops dialling, the heartbeats and the node server (closing every link).
    pub async fn stop(&self) {
        self.dialer.abort();
        if let Some(a) = &self.acceptor {
            a.abort();
        }
        let wait = Some(self.shared.peer_timeout);
        let _ = self.heartbeat.stop_and_wait(None, wait).await;
        let _ = self.server.stop_and_wait(None, wait).await;
    }
}

/// One configured peer address and when to dial it next.
struct Slot {
    addr: String,
    backoff: Duration,
    next: Instant,
}

/// Dials every configured peer that is not a live member, with exponential backoff per
/// peer, forever. A peer that resolves to this node's own address is skipped.
async fn dial_peers(
    config: ClusterConfig,
    shared: Arc<Shared>,
    server: ActorRef<NodeServerMessage>,
) {
    let mut slots: Vec<Slot> = config
        .peers
        .iter()
        .map(|a| Slot {
            addr: a.clone(),
            backoff: MIN_BACKOFF,
            next: Instant::now(),
        })
        .collect();
    let bound = config.peer_timeout;
    let mut tick = tokio::time::interval(config.heartbeat.min(Duration::from_millis(250)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for slot in &mut slots {
            let now = Instant::now();
            if now < slot.next {
                continue;
            }
            // Resolved again on every attempt: a StatefulSet pod's address changes.
            let resolved: Vec<SocketAddr> = match tokio::time::timeout(
                bound,
                tokio::net::lookup_host(slot.addr.as_str()),
            )
            .await
            {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(_)) | Err(_) => Vec::new(),
            };
            let mut keys = vec![slot.addr.clone()];
            keys.extend(resolved.iter().map(|a| a.to_string()));
            if resolved.contains(&config.listen) {
                // Ourselves (a StatefulSet lists every pod, this one too).
                slot.next = now + Duration::from_secs(3600);
                continue;
            }
            if shared.live_at(&keys).is_some() {
                slot.backoff = MIN_BACKOFF;
                slot.next = now + config.heartbeat;
                continue;
            }
            shared.metrics.connect_attempts.inc();
            // Each resolved address in turn (`localhost` may give `::1` before 127.0.0.1).
            let mut dialled = Err("cannot resolve".to_owned());
            for a in &resolved {
                dialled = dial(&config, &shared, &server, &slot.addr, *a).await;
                if dialled.is_ok() {
                    break;
                }
            }
            match dialled {
                Ok(()) => {
                    // Give the handshake and the first heartbeat time before dialling again.
                    slot.next = now + bound + slot.backoff;
                    slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    shared.metrics.connect_failures.inc();
                    tracing::debug!(peer = %slot.addr, error = %e, "cluster dial failed");
                    slot.next = now + slot.backoff;
                    slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// One dial of `peer` at `addr`, within `peer_timeout`: plain, or TLS (a failed handshake
/// counted as an outgoing TLS refusal).
async fn dial(
    config: &ClusterConfig,
    shared: &Shared,
    server: &ActorRef<NodeServerMessage>,
    peer: &str,
    addr: SocketAddr,
) -> Result<(), String> {
    use ractor_cluster::ClientConnectErr;
    let bound = config.peer_timeout;
    let connected = match &config.tls {
        None => tokio::time::timeout(bound, ractor_cluster::client_connect(server, addr)).await,
        Some(tls) => {
            let Some(name) = tls.server_name_for(peer) else {
                return Err(format!("{peer}: its host is not a TLS server name"));
            };
            let connect = ractor_cluster::client_connect_enc(server, addr, tls.connector(), name);
            match tokio::time::timeout(bound, connect).await {
                Ok(Err(ClientConnectErr::Encryption(e))) => {
                    let reason = tls::refusal_reason(&e);
                    shared
                        .metrics
                        .tls_refusals
                        .with_label_values(&["outgoing", reason])
                        .inc();
                    tracing::warn!(peer, %addr, reason, error = %e, "cluster peer refused: TLS handshake failed");
                    return Err(e.to_string());
                }
                other => other,
            }
        }
    };
    match connected {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Accepts the cluster links with TLS (see the module doc): each handshake in a task of its
/// own, bounded in time and number; a finished one is handed to the `NodeServer` as an
/// incoming session (the cookie handshake follows), a failed one is closed and counted.
async fn accept_tls(
    listener: tokio::net::TcpListener,
    tls: ClusterTls,
    shared: Arc<Shared>,
    server: ActorRef<NodeServerMessage>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_SESSIONS));
    // Dropped (aborting every handshake in flight) when this task is aborted.
    let mut handshakes = tokio::task::JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        let (stream, peer_addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "cluster listener: accept failed");
                tokio::time::sleep(MIN_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.pending_refused.inc();
            continue;
        };
        let (acceptor, shared, server) = (tls.acceptor().clone(), shared.clone(), server.clone());
        handshakes.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let Ok(local_addr) = stream.local_addr() else {
                return;
            };
            let refused = |reason: &'static str, error: String| {
                shared
                    .metrics
                    .tls_refusals
                    .with_label_values(&["incoming", reason])
                    .inc();
                tracing::warn!(addr = %peer_addr, reason, %error, "cluster peer refused: TLS handshake failed");
            };
            match tokio::time::timeout(shared.peer_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    // Fails only while the node server stops: the link is dropped with it.
                    let _ = server.cast(NodeServerMessage::ConnectionOpened {
                        stream: Box::new(NetworkStream::TlsServer {
                            peer_addr,
                            local_addr,
                            stream,
                        }),
                        is_server: true,
                    });
                }
                Ok(Err(e)) => refused(tls::refusal_reason(&e), e.to_string()),
                Err(_) => refused("timeout", "no handshake within --cluster-peer-timeout-ms".into()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, port: u16, peer: u16) -> ClusterConfig {
        ClusterConfig {
            node_name: name.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            peers: vec![format!("127.0.0.1:{peer}")],
            cookie: Cookie("membership-race-cookie-0123456789".into()),
            heartbeat: Duration::from_millis(100),
            peer_timeout: Duration::from_millis(1_000),
            tls: None,
        }
    }

    /// Waits until `f` holds, polling, at most `within`; whether it held.
    async fn wait_for(within: Duration, f: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// Issue 16: a peer's link that authenticates between the node server's start and
    /// membership's subscription to its events must still be tracked, or that peer is never
    /// counted (its heartbeats are not believed) and, when this node's name sorts first, its
    /// own dials of the peer lose ractor_cluster's duplicate-link election for good. As in
    /// the failed run (n1 accepted n2's link before its membership started): `n2` runs
    /// first and dials `n1`, and `n1` holds the window open until that link authenticated
    /// (where `n1`'s node server can accept before the subscription).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_made_before_membership_subscribes_is_counted() {
        // Ports of this helper's range (29000–29499).
        let (p1, p2) = (29101, 29102);
        let n2 = Cluster::start(config("n2", p2, p1), &prometheus::Registry::new())
            .await
            .unwrap();
        let n2_shared = n2.shared.clone();
        let (linked_tx, linked) = tokio::sync::oneshot::channel();
        let window = async move {
            let linked = wait_for(Duration::from_secs(15), || {
                !n2_shared.node_ids_of("n1").is_empty()
            })
            .await;
            let _ = linked_tx.send(linked);
        };
        let n1 = Cluster::start_with(
            config("n1", p1, p2),
            &prometheus::Registry::new(),
            |_| std::future::ready(()),
            window,
        )
        .await
        .unwrap();
        // Else this test would not test the window at all.
        assert!(
            linked.await.unwrap(),
            "n2's link to n1 did not authenticate while n1's start was held"
        );
        let want = vec!["n1".to_owned(), "n2".to_owned()];
        let (m1, m2) = (n1.members(), n2.members());
        // Generous: on loopback they list each other within a few heartbeats; broken, never.
        let both = wait_for(Duration::from_secs(30), || {
            *m1.borrow() == want && *m2.borrow() == want
        })
        .await;
        let (seen1, seen2) = (m1.borrow().clone(), m2.borrow().clone());
        n1.stop().await;
        n2.stop().await;
        assert!(
            both,
            "n1 lists {seen1:?}, n2 lists {seen2:?}; both should list n1 and n2"
        );
    }

    /// Reports the first session the node server opens, then holds the server that long
    /// (a busy node server): membership subscribes and lists the sessions meanwhile, before
    /// that session can authenticate (its handshake needs the server's answers).
    struct Probe(Mutex<Option<tokio::sync::oneshot::Sender<()>>>);

    impl NodeEventSubscription for Probe {
        fn node_session_opened(&self, _: NodeServerSessionInformation) {
            if let Some(tx) = self.0.lock().take() {
                let _ = tx.send(());
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
        fn node_session_disconnected(&self, _: NodeServerSessionInformation) {}
    }

    /// Issue 16 (3 nodes started at once): a peer's link that opens before membership
    /// subscribes to the node server's events and authenticates only after its start listed
    /// the authenticated sessions must still be tracked, or that peer is never counted. `n2`
    /// runs and dials `n1`; `n1` subscribes only once `n2` has that link open (as when a
    /// peer dials the instant this node's listener starts), so its opening is never
    /// reported and its handshake is still under way when `n1` lists its sessions (a busy node
    /// server: [`Probe`]).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_opened_before_membership_subscribes_is_counted() {
        let rounds: usize = std::env::var("DISPATCH_RACE_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        let mut failed = Vec::new();
        for round in 0..rounds {
            let [p1, p2] = free_ports::<2>();
            let n2 = Cluster::start(config("n2", p2, p1), &prometheus::Registry::new())
                .await
                .unwrap();
            let (opened_tx, opened) = tokio::sync::oneshot::channel();
            let probe = Probe(Mutex::new(Some(opened_tx)));
            let n1 = Cluster::start_with(
                config("n1", p1, p2),
                &prometheus::Registry::new(),
                |server| {
                    // First in the server's queue, as membership's subscription would be.
                    server
                        .cast(NodeServerMessage::SubscribeToEvents {
                            id: "test-probe".into(),
                            subscription: Box::new(probe),
                        })
                        .unwrap();
                    async move {
                        tokio::time::timeout(Duration::from_secs(15), opened)
                            .await
                            .expect("n2 never opened a link to n1")
                            .unwrap();
                    }
                },
                std::future::ready(()),
            )
            .await
            .unwrap();
            let want = vec!["n1".to_owned(), "n2".to_owned()];
            let (m1, m2) = (n1.members(), n2.members());
            let both = wait_for(Duration::from_secs(10), || {
                *m1.borrow() == want && *m2.borrow() == want
            })
            .await;
            if !both {
                let (seen1, seen2) = (m1.borrow().clone(), m2.borrow().clone());
                eprintln!("round {round}: n1 lists {seen1:?}, n2 lists {seen2:?}");
                failed.push(round);
            }
            n1.stop().await;
            n2.stop().await;
        }
        assert!(
            failed.is_empty(),
            "{} of {rounds} rounds: n1 and n2 did not list each other within 10 s (rounds {failed:?})",
            failed.len()
        );
    }

    /// Free loopback ports (bound, then released).
    fn free_ports<const N: usize>() -> [u16; N] {
        let held: Vec<std::net::TcpListener> = (0..N)
            .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap())
            .collect();
        std::array::from_fn(|i| held[i].local_addr().unwrap().port())
    }
}
