//! Sessions across nodes (issue 16, item 2, first step): a standby accepts a driver's or
//! rider's WebSocket and relays it to the leader's actors through `ractor_cluster` remote
//! actors (no protocol or proxy of our own).
//!
//! - **Leader**: each term runs a *host* actor in the process group [`HOST_GROUP`], which
//!   `ractor_cluster` shares with every linked node. The host attaches a relayed session
//!   to the leader's real actors (`System::attach`) with a session handle of the leader's
//!   own, and a forwarder task sends what the actors queue there to the standby's
//!   endpoint ([`ToEndpoint::Deliver`], the `Outbound` itself with serde); client frames
//!   from the standby ([`ToHost::Frame`], the text as the app sent it) are decoded again
//!   and handed to the actors with a responder on that handle, as a local session's are.
//! - **Every node**: an *endpoint* actor in the group `dispatch.relay.endpoint.<node>`
//!   takes what hosts send to this node's relayed sessions. A session on a standby:
//!   authenticates as far as a standby can ([`jwt::verify`]: the JWT's signature, or an own
//!   token's hash; the leader resolves it against its registry), asks the host to attach
//!   ([`ToHost::Attach`], answered by [`ToEndpoint::Attached`] within
//!   [`Standby::attach_timeout`]) before the upgrade (so 401/403/503 are HTTP answers as
//!   on the leader), then runs the same session loops as a local session
//!   ([`ws::serve`]): frame size, UTF-8, rate limits and bad messages are checked on the
//!   standby; in-flight messages on the leader, where the responders live.
//! - **Failure**: the leader's forwarder closes a relayed session (1001) when its term
//!   ends, as a local one; a standby closes its relayed sessions (1001) when their
//!   leader leaves the member set (a dead or paused node is dropped by membership's
//!   heartbeats). With no host in [`HOST_GROUP`] the upgrade is 503 `unavailable`. An
//!   `Attached` from a leader whose departure the standby saw after it sent the attach is
//!   refused (503): nothing later would close that session ([`Departures`]).
//! - **Sharded mode** (`--cluster-mode sharded`, `super::sharded`): every node runs a host
//!   for the process in [`host_group`]`(node)`, and a node's front sends an upgrade to the
//!   host of the account's owner (a [`RelayTarget`] extension); the rest is as above, the
//!   "leader" being that owner.
//! - **REST forwarded** (sharded mode, [`super::forward`]): a node casts a REST request
//!   another node serves to that node's host ([`ToHost::Forward`]), which runs it through
//!   its own router and casts the answer to the sender's endpoint
//!   ([`ToEndpoint::Forwarded`]); a settings write is announced to every host
//!   ([`ToHost::SettingsChanged`]).
//! - **Bounds**: a relayed session's queue on the standby is `--ws-outbound-queue-max`
//!   (full: 1008, counted as `relay_queue`); on the leader, what is in flight to the
//!   standby (unacknowledged, [`ToHost::Ack`]) is at most that plus [`ACK_EVERY`] (more:
//!   1008, `relay_in_flight`); a host has at most [`MAX_ATTACHING`] attaches in progress
//!   (more: refused at once, `relay_attaching`); the attach is bounded; every message is at most
//!   membership's `MAX_FRAME_BYTES` (the link refuses more) and a client frame at most
//!   `--max-frame-bytes`; a message that does not decode is dropped and counted
//!   (`dispatch_cluster_relay_errors_total{kind="malformed"}`), never a panic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dispatch_actors::metrics::Handling;
use dispatch_actors::records::Identity;
use dispatch_actors::session::{
    CLOSE_GOING_AWAY, CLOSE_POLICY, Outbound, Responder, SessionHandle,
};
use dispatch_actors::{ApiError, ErrorCode, Metrics};
use dispatch_engine::{DriverId, RiderId};
use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts};
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, Message};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use super::forward;
use super::http::{HttpError, QueryParams};
use super::jwt::{self, Proof};
use super::ws::{self, Command, ConnectionSlot, Env, TokenQuery};
use super::{App, Config, TransportMetrics, auth};
use crate::telemetry::OfferTrace;

/// The process group of the leader's host actor (`--cluster-mode leader`).
pub const HOST_GROUP: &str = "dispatch.relay.host";

/// The process group of `node`'s host actor in sharded mode (`--cluster-mode sharded`):
/// every node hosts the sessions of the accounts whose shards it owns.
pub fn host_group(node: &str) -> String {
    format!("{HOST_GROUP}.{node}")
}

/// The host group a relayed upgrade is sent to, when it is not [`HOST_GROUP`] (the
/// leader's): set as a request extension by sharded mode's front, from the shard map.
#[derive(Debug, Clone)]
pub struct RelayTarget(pub String);

/// The process group of `node`'s endpoint actor.
pub fn endpoint_group(node: &str) -> String {
    format!("dispatch.relay.endpoint.{node}")
}

/// A session's role on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Driver,
    Rider,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Rider => "rider",
        }
    }

    fn identity(self, id: String) -> Identity {
        match self {
            Role::Driver => Identity::Driver(DriverId::new(id)),
            Role::Rider => Identity::Rider(RiderId::new(id)),
        }
    }

    fn of(who: &Identity) -> (Role, String) {
        match who {
            Identity::Driver(id) => (Role::Driver, id.as_str().to_owned()),
            Identity::Rider(id) => (Role::Rider, id.as_str().to_owned()),
        }
    }
}

/// What a standby verified of a bearer token (see [`jwt::Proof`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireProof {
    Jwt {
        role: Role,
        id: String,
    },
    Own {
        hash: [u8; 32],
        /// The entity shard the token names (sharded mode); absent from older builds.
        #[serde(default)]
        shard: Option<u64>,
    },
}

impl From<Proof> for WireProof {
    fn from(p: Proof) -> Self {
        match p {
            Proof::Jwt(who) => {
                let (role, id) = Role::of(&who);
                WireProof::Jwt { role, id }
            }
            Proof::Own { hash, shard } => WireProof::Own { hash, shard },
        }
    }
}

impl From<WireProof> for Proof {
    fn from(p: WireProof) -> Self {
        match p {
            WireProof::Jwt { role, id } => Proof::Jwt(role.identity(id)),
            WireProof::Own { hash, shard } => Proof::Own { hash, shard },
        }
    }
}

/// A standby's messages to the leader's host. `node` is the standby's name, `session`
/// its session's number there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToHost {
    Attach {
        node: String,
        session: u64,
        role: Role,
        proof: WireProof,
        /// The standby acknowledges what it receives ([`ToHost::Ack`]), so the leader
        /// bounds what it has in flight to it. Absent (false) from a build before that:
        /// the leader does not wait for acknowledgements it will never get.
        #[serde(default)]
        acks: bool,
    },
    Frame {
        node: String,
        session: u64,
        text: String,
    },
    Detach {
        node: String,
        session: u64,
    },
    /// The standby has received `delivered` messages of the session so far (sent every
    /// [`ACK_EVERY`] messages).
    Ack {
        node: String,
        session: u64,
        delivered: u64,
    },
    /// Sharded mode: a REST request for an account or a setting this host's node serves
    /// (`super::forward`), answered by [`ToEndpoint::Forwarded`].
    Forward(Box<forward::ForwardRequest>),
    /// Sharded mode: the operator's settings (pricing, surge) changed in the store: read
    /// them again.
    SettingsChanged,
}

/// A standby acknowledges every this many messages it receives for a relayed session; the
/// leader allows `--ws-outbound-queue-max` plus this many in flight to it.
pub const ACK_EVERY: u64 = 8;

/// Attaches a leader's host has in progress at most (each waits at most for an actor's
/// start, the actors' call timeout, and for the standby's endpoint, the peer timeout).
/// More are refused at once (503 `unavailable` on the standby), counted
/// `bound="relay_attaching"`: a reconnection storm after a leader's death costs the new
/// leader at most this many waiting tasks, and the apps retry.
pub const MAX_ATTACHING: usize = 256;

/// The host's messages to a standby's endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToEndpoint {
    /// The answer to `Attach`: the leader's name, and the session's id (driver or rider)
    /// or why it was refused.
    Attached {
        session: u64,
        leader: String,
        result: Result<String, ApiError>,
    },
    Deliver {
        session: u64,
        message: Box<Outbound>,
    },
    Close {
        session: u64,
        code: u16,
    },
    /// The answer to [`ToHost::Forward`] number `id`.
    Forwarded {
        id: u64,
        response: Box<forward::ForwardResponse>,
    },
}

/// A message that crosses nodes: JSON in a `ractor_cluster` cast. One that does not
/// decode arrives as `Malformed` (counted by its actor), never as an error ractor would
/// only log.
#[derive(Debug, Clone, PartialEq)]
pub enum Relay<T> {
    Msg(T),
    Malformed(String),
}

/// The variant name of every relay cast.
const VARIANT: &str = "relay";

impl<T> Message for Relay<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        let Relay::Msg(m) = self else {
            return Err(BoxedDowncastErr);
        };
        let args = serde_json::to_vec(&m).map_err(|_| BoxedDowncastErr)?;
        Ok(SerializedMessage::Cast {
            variant: VARIANT.to_owned(),
            args,
            metadata: None,
        })
    }

    fn deserialize(bytes: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        Ok(match bytes {
            SerializedMessage::Cast { variant, args, .. } if variant == VARIANT => {
                match serde_json::from_slice(&args) {
                    Ok(m) => Relay::Msg(m),
                    Err(e) => Relay::Malformed(e.to_string()),
                }
            }
            SerializedMessage::Cast { variant, .. } => {
                Relay::Malformed(format!("unknown variant {variant:?}"))
            }
            _ => Relay::Malformed("not a cast".to_owned()),
        })
    }
}

/// The relay's series (docs/api.md, "Sessions across nodes"), registered once a process.
#[derive(Debug, Clone)]
pub struct RelayMetrics {
    sessions: IntGaugeVec,
    messages: IntCounterVec,
    errors: IntCounterVec,
    attach: Histogram,
}

/// Every `kind` of `dispatch_cluster_relay_errors_total`.
pub const RELAY_ERRORS: [&str; 6] = [
    "malformed",
    "send_failed",
    "attach_timeout",
    "no_endpoint",
    "unknown_session",
    "leader_lost",
];

impl RelayMetrics {
    pub fn new(m: &Metrics) -> Self {
        let sessions = IntGaugeVec::new(
            Opts::new(
                "dispatch_cluster_relayed_sessions",
                "Sessions relayed across nodes: `relaying` on the standby that holds the socket, `hosting` on the leader whose actors serve it",
            ),
            &["side"],
        )
        .unwrap();
        let messages = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_relay_messages_total",
                "Relay messages sent, by direction (to_leader, to_standby)",
            ),
            &["direction"],
        )
        .unwrap();
        let errors = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_relay_errors_total",
                "Relay failures, by kind",
            ),
            &["kind"],
        )
        .unwrap();
        let attach = Histogram::with_opts(
            HistogramOpts::new(
                "dispatch_cluster_relay_attach_seconds",
                "A standby's attach of a relayed session: from the request to the leader's answer",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .unwrap();
        for side in ["relaying", "hosting"] {
            sessions.with_label_values(&[side]);
        }
        for d in ["to_leader", "to_standby"] {
            messages.with_label_values(&[d]);
        }
        for k in RELAY_ERRORS {
            errors.with_label_values(&[k]);
        }
        let r = &m.registry;
        r.register(Box::new(sessions.clone())).expect("unique");
        r.register(Box::new(messages.clone())).expect("unique");
        r.register(Box::new(errors.clone())).expect("unique");
        r.register(Box::new(attach.clone())).expect("unique");
        Self {
            sessions,
            messages,
            errors,
            attach,
        }
    }

    fn error(&self, kind: &str) {
        debug_assert!(RELAY_ERRORS.contains(&kind), "add {kind} to RELAY_ERRORS");
        self.errors.with_label_values(&[kind]).inc();
    }
}

/// A remote member of `group` (this node's own members are not relays).
fn remote_member(group: &str) -> Option<ActorCell> {
    ractor::pg::get_members(&group.to_owned())
        .into_iter()
        .find(|c| !c.get_id().is_local())
}

/// The remote hosts: the leader's ([`HOST_GROUP`]) and every node's in sharded mode
/// ([`host_group`]).
fn remote_hosts() -> Vec<ActorCell> {
    let sharded = format!("{HOST_GROUP}.");
    ractor::pg::which_groups()
        .into_iter()
        .filter(|g| g == HOST_GROUP || g.starts_with(&sharded))
        .filter_map(|g| remote_member(&g))
        .collect()
}

/// What a relay actor does with each message that decoded.
trait Receive: Send + Sync + 'static {
    type Msg: Serialize + DeserializeOwned + Send + 'static;
    fn receive(self: &Arc<Self>, m: Self::Msg);
    fn metrics(&self) -> &RelayMetrics;
}

/// The one actor type of the relay (the host and the endpoints): a member of its process
/// group, which it leaves as it stops; a `Malformed` message is counted and dropped.
struct RelayActor<R> {
    inner: Arc<R>,
    group: String,
}

impl<R: Receive> RelayActor<R> {
    /// Spawns the actor and joins it to `group`.
    async fn spawn(inner: Arc<R>, group: String) -> anyhow::Result<ActorRef<Relay<R::Msg>>> {
        let (actor, _) = Actor::spawn(
            None,
            RelayActor {
                inner,
                group: group.clone(),
            },
            (),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the relay actor of {group}: {e}"))?;
        ractor::pg::join(group, vec![actor.get_cell()]);
        Ok(actor)
    }
}

impl<R: Receive> Actor for RelayActor<R> {
    type Msg = Relay<R::Msg>;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        ractor::pg::leave(self.group.clone(), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            Relay::Msg(m) => self.inner.receive(m),
            Relay::Malformed(e) => {
                self.inner.metrics().error("malformed");
                tracing::warn!(error = %e, group = %self.group, "a relay message that does not decode: dropped");
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The standby's side.

/// A relayed session on this node.
struct Relaying {
    handle: SessionHandle,
    /// The leader's host it was asked of: acknowledgements go there.
    host: ActorCell,
    /// The leader serving it and when it answered, once it did.
    leader: Option<(String, Instant)>,
    /// Where the attach's answer goes, until it arrives.
    attached: Option<oneshot::Sender<Result<String, ApiError>>>,
    /// [`Departures::seq`] when the attach was sent.
    asked: u64,
    /// Messages received from the leader so far.
    delivered: u64,
}

/// The departures from the member set this node has seen: an `Attached` from a leader
/// whose departure was seen after the attach was sent is refused, since no later change
/// of the members would close its session.
#[derive(Debug, Default)]
struct Departures {
    /// The members at the last change.
    live: Vec<String>,
    /// Departures seen so far (the sequence's last number).
    seq: u64,
    /// The number of each node's latest departure.
    last: HashMap<String, u64>,
}

/// What the endpoint actor and the sessions share.
struct Shared {
    node: String,
    /// Locked before `departures` where both are.
    sessions: Mutex<HashMap<u64, Relaying>>,
    departures: Mutex<Departures>,
    /// Forwarded REST requests waiting for their answer, by number.
    forwards: Mutex<HashMap<u64, oneshot::Sender<forward::ForwardResponse>>>,
    metrics: RelayMetrics,
    actor_metrics: Arc<Metrics>,
    queue_max: usize,
}

impl Shared {
    fn new(
        node: &str,
        metrics: RelayMetrics,
        actor_metrics: Arc<Metrics>,
        queue_max: usize,
    ) -> Self {
        Shared {
            node: node.to_owned(),
            sessions: Mutex::new(HashMap::new()),
            departures: Mutex::new(Departures::default()),
            forwards: Mutex::new(HashMap::new()),
            metrics,
            actor_metrics,
            queue_max,
        }
    }

    /// Registers session `id` as asked of `host`; the receiver gets the leader's answer.
    fn ask(
        &self,
        id: u64,
        host: ActorCell,
        handle: SessionHandle,
    ) -> oneshot::Receiver<Result<String, ApiError>> {
        let (tx, rx) = oneshot::channel();
        let mut sessions = self.sessions.lock();
        let asked = self.departures.lock().seq;
        sessions.insert(
            id,
            Relaying {
                handle,
                host,
                leader: None,
                attached: Some(tx),
                asked,
                delivered: 0,
            },
        );
        rx
    }

    /// The member set changed to `live`: every node that left it gets a departure number,
    /// and the relayed sessions it served are closed (1001).
    fn members_changed(&self, live: Vec<String>) {
        let sessions = self.sessions.lock();
        let mut d = self.departures.lock();
        let left: Vec<String> = d
            .live
            .iter()
            .filter(|n| !live.contains(n))
            .cloned()
            .collect();
        for node in &left {
            d.seq += 1;
            let seq = d.seq;
            d.last.insert(node.clone(), seq);
        }
        d.live = live;
        drop(d);
        for r in sessions.values() {
            if let Some((l, _)) = &r.leader
                && left.contains(l)
            {
                self.leader_lost(&r.handle);
            }
        }
    }

    /// Closes (1001) the relayed sessions whose leader answered at least `grace` ago and
    /// has not been a member since: a leader whose ractor link (and host) was visible
    /// before its heartbeats counted it, and that went away before they did, leaves no
    /// departure to act on.
    fn recheck(&self, grace: Duration) {
        let sessions = self.sessions.lock();
        let d = self.departures.lock();
        for r in sessions.values() {
            if let Some((l, since)) = &r.leader
                && !d.live.contains(l)
                && since.elapsed() >= grace
            {
                self.leader_lost(&r.handle);
            }
        }
    }

    fn leader_lost(&self, handle: &SessionHandle) {
        if !handle.is_closed() {
            self.metrics.error("leader_lost");
            handle.close(CLOSE_GOING_AWAY);
        }
    }
}

/// Everything a standby's relayed sessions need; one per process in cluster mode.
pub struct Standby {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub transport: TransportMetrics,
    /// Flips to true when the process shuts down.
    pub shutdown: watch::Receiver<bool>,
    pub connections: AtomicUsize,
    auth: Arc<jwt::Auth>,
    node: String,
    shared: Arc<Shared>,
    next_session: AtomicU64,
    attach_timeout: Duration,
    endpoint: ActorRef<Relay<ToEndpoint>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Standby {
    /// Spawns this node's endpoint actor and the task that closes relayed sessions whose
    /// leader left the member set.
    pub async fn start(
        config: &Config,
        (metrics, transport, relay): (&Arc<Metrics>, &TransportMetrics, &RelayMetrics),
        auth: Arc<jwt::Auth>,
        cluster: &dispatch_cluster::Cluster,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Standby>> {
        let node = cluster.node_name().to_owned();
        let shared = Arc::new(Shared::new(
            &node,
            relay.clone(),
            metrics.clone(),
            config.system.ws_outbound_queue_max,
        ));
        let endpoint = RelayActor::spawn(shared.clone(), endpoint_group(&node)).await?;
        let peer_timeout = peer_timeout(config);
        let watcher = tokio::spawn(watch_leaders(
            shared.clone(),
            cluster.members(),
            peer_timeout,
        ));
        Ok(Arc::new(Standby {
            config: config.clone(),
            metrics: metrics.clone(),
            transport: transport.clone(),
            shutdown,
            connections: AtomicUsize::new(0),
            auth,
            node,
            shared,
            // Numbers unlikely to repeat across this node's restarts: a leader keys
            // relayed sessions by node name and number.
            next_session: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
                    << 16,
            ),
            attach_timeout: Duration::from_millis(config.system.actor_call_timeout_ms)
                + peer_timeout,
            endpoint,
            watcher,
        }))
    }

    /// How long a standby waits for the leader's answer to an attach: the leader's own
    /// bound on an actor's start, and a peer timeout for the round trip.
    pub fn attach_timeout(&self) -> Duration {
        self.attach_timeout
    }

    /// The routes a standby serves itself: the two WebSocket upgrades.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/ws/driver", get(driver_upgrade))
            .route("/v1/ws/rider", get(rider_upgrade))
            .with_state(self.clone())
    }

    /// Sends a REST request to the host of `group` and waits, at most `timeout`, for its
    /// answer (`super::forward`). The number and this node's name are set here.
    pub(super) async fn forward_to(
        &self,
        group: &str,
        mut request: forward::ForwardRequest,
        timeout: Duration,
    ) -> Result<forward::ForwardResponse, forward::Failure> {
        let Some(host) = remote_member(group) else {
            return Err(forward::Failure::Unreachable);
        };
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        request.node = self.node.clone();
        request.id = id;
        let (tx, rx) = oneshot::channel();
        self.shared.forwards.lock().insert(id, tx);
        // Forgotten however this ends (answered, timed out, or the caller went away).
        struct Pending<'a>(&'a Shared, u64);
        impl Drop for Pending<'_> {
            fn drop(&mut self) {
                self.0.forwards.lock().remove(&self.1);
            }
        }
        let _pending = Pending(&self.shared, id);
        if host
            .send_message(Relay::Msg(ToHost::Forward(Box::new(request))))
            .is_err()
        {
            self.shared.metrics.error("send_failed");
            return Err(forward::Failure::Unreachable);
        }
        self.shared
            .metrics
            .messages
            .with_label_values(&["to_leader"])
            .inc();
        let answer = tokio::time::timeout(timeout, async {
            tokio::select! {
                answer = rx => answer.map_err(|_| forward::Failure::Unreachable),
                () = host_gone(group, host.get_id()) => Err(forward::Failure::Unreachable),
            }
        })
        .await;
        answer.unwrap_or(Err(forward::Failure::Timeout))
    }

    /// Tells every other node's host that the operator's settings changed in the store.
    pub(super) fn settings_changed(&self) {
        for host in remote_hosts() {
            if host
                .send_message(Relay::Msg(ToHost::SettingsChanged))
                .is_ok()
            {
                self.shared
                    .metrics
                    .messages
                    .with_label_values(&["to_leader"])
                    .inc();
            } else {
                self.shared.metrics.error("send_failed");
            }
        }
    }

    pub fn stop(&self) {
        self.watcher.abort();
        ractor::pg::leave(endpoint_group(&self.node), vec![self.endpoint.get_cell()]);
        self.endpoint.stop(None);
    }
}

/// Membership's peer timeout (2 s without membership, which a relay never runs without).
fn peer_timeout(config: &Config) -> Duration {
    config
        .membership
        .as_ref()
        .map_or(Duration::from_secs(2), |m| m.peer_timeout)
}

/// Closes (1001) the relayed sessions whose leader left the member set, and, every half
/// peer timeout, those whose leader has not been a member for two peer timeouts since it
/// answered.
async fn watch_leaders(
    shared: Arc<Shared>,
    mut members: watch::Receiver<Vec<String>>,
    peer_timeout: Duration,
) {
    shared.members_changed(members.borrow_and_update().clone());
    let mut tick = tokio::time::interval(peer_timeout / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = members.changed() => {
                if changed.is_err() {
                    return;
                }
                shared.members_changed(members.borrow_and_update().clone());
            }
            // Two peer timeouts: a live leader is counted a member after its first
            // heartbeat, well within one.
            _ = tick.tick() => shared.recheck(2 * peer_timeout),
        }
    }
}

/// The endpoint: what hosts send to this node's relayed sessions.
impl Receive for Shared {
    type Msg = ToEndpoint;

    fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    fn receive(self: &Arc<Self>, msg: ToEndpoint) {
        let s = self;
        let session = match &msg {
            ToEndpoint::Attached { session, .. }
            | ToEndpoint::Deliver { session, .. }
            | ToEndpoint::Close { session, .. } => *session,
            ToEndpoint::Forwarded { id, .. } => *id,
        };
        if let ToEndpoint::Forwarded { id, response } = msg {
            // Gone: its caller gave up (timed out) and counted it.
            if let Some(tx) = s.forwards.lock().remove(&id) {
                let _ = tx.send(*response);
            }
            return;
        }
        let mut sessions = s.sessions.lock();
        let Some(r) = sessions.get_mut(&session) else {
            drop(sessions);
            if !matches!(msg, ToEndpoint::Close { .. }) {
                // Gone here (its socket closed, or the attach timed out): the leader
                // forgets it too.
                s.metrics.error("unknown_session");
                // Which host sent it is not in the message: the leader's, or in sharded
                // mode any node's (a host ignores a detach of a session it does not hold).
                for host in remote_hosts() {
                    let detach = ToHost::Detach {
                        node: self.node.clone(),
                        session,
                    };
                    let _ = host.send_message(Relay::Msg(detach));
                }
            }
            return;
        };
        match msg {
            ToEndpoint::Attached { leader, result, .. } => {
                let left = s.departures.lock().last.get(&leader).copied();
                let result = match result {
                    // Its departure was processed after the attach was sent: no later
                    // change of the members would close this session.
                    Ok(_) if left.is_some_and(|seq| seq > r.asked) => {
                        s.metrics.error("leader_lost");
                        Err(ApiError::unavailable(
                            "the leader left the cluster while attaching: retry, or connect to another node",
                        ))
                    }
                    result => result,
                };
                r.leader = Some((leader, Instant::now()));
                if let Some(tx) = r.attached.take() {
                    let _ = tx.send(result);
                }
            }
            ToEndpoint::Deliver { message, .. } => {
                r.delivered += 1;
                if r.delivered % ACK_EVERY == 0 {
                    let ack = ToHost::Ack {
                        node: s.node.clone(),
                        session,
                        delivered: r.delivered,
                    };
                    if r.host.send_message(Relay::Msg(ack)).is_ok() {
                        s.metrics.messages.with_label_values(&["to_leader"]).inc();
                    } else {
                        s.metrics.error("send_failed");
                    }
                }
                if r.handle.is_closed() {
                    return;
                }
                if r.handle.queued() >= s.queue_max {
                    // The app stopped reading: as a local session's full queue, 1008.
                    s.actor_metrics.bound_hit("relay_queue");
                    r.handle.close(CLOSE_POLICY);
                } else {
                    r.handle.send(*message);
                }
            }
            ToEndpoint::Close { code, .. } => r.handle.close(code),
            ToEndpoint::Forwarded { .. } => {}
        }
    }
}

pub async fn driver_upgrade(
    State(s): State<Arc<Standby>>,
    target: Option<Extension<RelayTarget>>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<TokenQuery>,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    relay_upgrade(s, group_of(target), &headers, &q, up, Role::Driver).await
}

pub async fn rider_upgrade(
    State(s): State<Arc<Standby>>,
    target: Option<Extension<RelayTarget>>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<TokenQuery>,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    relay_upgrade(s, group_of(target), &headers, &q, up, Role::Rider).await
}

/// The host group an upgrade goes to: the one its [`RelayTarget`] names, else the leader's.
fn group_of(target: Option<Extension<RelayTarget>>) -> String {
    target.map_or_else(|| HOST_GROUP.to_owned(), |Extension(t)| t.0)
}

/// Forgets a relayed session here and on the leader when dropped: after its socket
/// closed, or when the upgrade never happened.
struct Attachment {
    s: Arc<Standby>,
    host: ActorCell,
    id: u64,
    attached: bool,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.s.shared.sessions.lock().remove(&self.id);
        if self.attached {
            self.s
                .shared
                .metrics
                .sessions
                .with_label_values(&["relaying"])
                .dec();
        }
        let detach = ToHost::Detach {
            node: self.s.node.clone(),
            session: self.id,
        };
        let _ = self.host.send_message(Relay::Msg(detach));
    }
}

fn refused(e: ApiError) -> Response {
    HttpError(e).into_response()
}

/// A standby's WebSocket upgrade: the token as far as a standby can check it, then the
/// leader's attach, then the session.
async fn relay_upgrade(
    s: Arc<Standby>,
    group: String,
    headers: &HeaderMap,
    q: &TokenQuery,
    up: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    role: Role,
) -> Response {
    let Some(token) = auth::bearer(headers, q.token.as_deref()) else {
        return refused(ApiError::new(ErrorCode::Unauthorized, "missing token"));
    };
    let proof = match jwt::verify(&s.auth, token).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Proof::Jwt(who) = &proof
        && who.role() != role.as_str()
    {
        return refused(ApiError::forbidden(format!(
            "a {} token cannot open a {} session",
            who.role(),
            role.as_str()
        )));
    }
    let up = match up {
        Ok(up) => up,
        Err(e) => return ws::not_an_upgrade(e),
    };
    let Some(host) = remote_member(&group) else {
        return refused(ApiError::unavailable(if group == HOST_GROUP {
            "this node is a standby and no node holds the lease: retry, or connect to another node"
        } else {
            "the node serving this account cannot be reached now: retry, or connect to another node"
        }));
    };
    let env = Env::Relayed(s.clone());
    let slot = match ConnectionSlot::take(&env) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    let id = s.next_session.fetch_add(1, Ordering::Relaxed);
    let (handle, inbox) = SessionHandle::new(id, s.shared.queue_max, s.metrics.clone());
    let rx = s.shared.ask(id, host.clone(), handle.clone());
    let mut attachment = Attachment {
        s: s.clone(),
        host: host.clone(),
        id,
        attached: false,
    };
    let attach = ToHost::Attach {
        node: s.node.clone(),
        session: id,
        role,
        proof: proof.into(),
        acks: true,
    };
    if host.send_message(Relay::Msg(attach)).is_err() {
        s.shared.metrics.error("send_failed");
        return refused(ApiError::unavailable(
            "the leader cannot be reached: retry, or connect to another node",
        ));
    }
    s.shared
        .metrics
        .messages
        .with_label_values(&["to_leader"])
        .inc();
    let asked = Instant::now();
    let answer = tokio::time::timeout(s.attach_timeout, async {
        tokio::select! {
            answer = rx => answer.ok(),
            () = host_gone(&group, host.get_id()) => {
                s.shared.metrics.error("leader_lost");
                None
            }
        }
    })
    .await;
    s.shared
        .metrics
        .attach
        .observe(asked.elapsed().as_secs_f64());
    let who = match answer {
        Ok(Some(Ok(id))) => role.identity(id),
        Ok(Some(Err(e))) => return refused(e),
        Ok(None) => {
            return refused(ApiError::unavailable(
                "the leader went away: retry, or connect to another node",
            ));
        }
        Err(_) => {
            s.metrics.bound_hit("relay_attach_timeout");
            s.shared.metrics.error("attach_timeout");
            return refused(ApiError::unavailable(
                "the leader did not answer in time: retry, or connect to another node",
            ));
        }
    };
    attachment.attached = true;
    s.shared
        .metrics
        .sessions
        .with_label_values(&["relaying"])
        .inc();
    ws::upgrade_socket(s.config.ws_hard_max_bytes, up, move |socket| async move {
        let _slot = slot;
        let span = ws::session_span(&who);
        relayed(env, socket, (handle, inbox), role, (host, attachment))
            .instrument(span)
            .await;
    })
}

/// Resolves once the host `id` is no longer in [`HOST_GROUP`]: its link closed (the leader
/// died, or membership dropped it) or its term ended, so no answer will come.
async fn host_gone(group: &str, id: ractor::ActorId) {
    while ractor::pg::get_members(&group.to_owned())
        .iter()
        .any(|c| c.get_id() == id)
    {
        tokio::time::sleep(ENDPOINT_POLL).await;
    }
}

/// A relayed session's loops: client frames checked here and sent to the host as text.
async fn relayed(
    env: Env,
    socket: axum::extract::ws::WebSocket,
    (handle, inbox): (SessionHandle, dispatch_actors::session::SessionInbox),
    role: Role,
    (host, attachment): (ActorCell, Attachment),
) {
    let s = attachment.s.clone();
    let (node, id) = (s.node.clone(), attachment.id);
    let forward = {
        let (s, handle) = (s.clone(), handle.clone());
        move |text: &str| {
            let frame = ToHost::Frame {
                node: node.clone(),
                session: id,
                text: text.to_owned(),
            };
            match host.send_message(Relay::Msg(frame)) {
                Ok(()) => s
                    .shared
                    .metrics
                    .messages
                    .with_label_values(&["to_leader"])
                    .inc(),
                Err(_) => {
                    s.shared.metrics.error("send_failed");
                    handle.close(CLOSE_GOING_AWAY);
                }
            }
        }
    };
    let on_text = {
        let (env, handle) = (env.clone(), handle.clone());
        move |text: &str, limits: &mut ws::Limits, handling: &mut Handling<'_>| {
            let driver = role == Role::Driver;
            ws::client_frame(&env, &handle, (text, driver), limits, handling, |_, _| {
                forward(text)
            })
        }
    };
    let label = role.as_str();
    ws::serve(
        env,
        socket,
        (handle, inbox),
        label,
        OfferTrace::new(),
        on_text,
        move || drop(attachment),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// The leader's side.

/// A session this leader serves for a standby.
#[derive(Clone)]
struct Hosted {
    who: Identity,
    handle: SessionHandle,
    /// What the standby acknowledged having received ([`ToHost::Ack`]).
    acked: Arc<AtomicU64>,
}

/// The state of one term's host.
pub struct Hosting {
    app: App,
    node: String,
    sessions: Mutex<HashMap<(String, u64), Hosted>>,
    metrics: RelayMetrics,
    members: watch::Receiver<Vec<String>>,
    /// Attaches in progress, at most [`MAX_ATTACHING`].
    attaching: AttachGate,
    /// Sharded mode: the routers forwarded REST requests run through, and the bound on
    /// how many run at once ([`forward::HOST_IN_FLIGHT`]).
    forwarding: Option<forward::Serving>,
}

/// Caps the attaches a host has in progress.
struct AttachGate(Arc<tokio::sync::Semaphore>);

impl AttachGate {
    fn new(max: usize) -> Self {
        AttachGate(Arc::new(tokio::sync::Semaphore::new(max)))
    }

    /// A place for one more attach, or the refusal to answer at once (counted
    /// `bound="relay_attaching"`).
    fn enter(&self, metrics: &Metrics) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.0.clone().try_acquire_owned().map_err(|_| {
            metrics.bound_hit("relay_attaching");
            ApiError::unavailable(
                "the leader is attaching too many sessions: retry, or connect to another node",
            )
        })
    }
}

/// Spawns a host and joins it to `group`: [`HOST_GROUP`] for a leader's term (stop it
/// when the term ends), [`host_group`] of this node in sharded mode (for the process).
pub async fn spawn_host(
    app: App,
    cluster: &dispatch_cluster::Cluster,
    metrics: RelayMetrics,
    group: String,
) -> anyhow::Result<ActorRef<Relay<ToHost>>> {
    let hosting = Arc::new(Hosting {
        node: cluster.node_name().to_owned(),
        sessions: Mutex::new(HashMap::new()),
        metrics,
        members: cluster.members(),
        attaching: AttachGate::new(MAX_ATTACHING),
        forwarding: app.sharded.is_some().then(|| forward::Serving::new(&app)),
        app,
    });
    RelayActor::spawn(hosting, group).await
}

/// The host of one leader term.
impl Receive for Hosting {
    type Msg = ToHost;

    fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    fn receive(self: &Arc<Self>, msg: ToHost) {
        match msg {
            ToHost::Attach {
                node,
                session,
                role,
                proof,
                acks,
            } => match self.attaching.enter(&self.app.metrics) {
                // Attaching waits for an actor's start: not in the host's own turn.
                Ok(permit) => {
                    let attach = Attach {
                        node,
                        session,
                        role,
                        proof: proof.into(),
                        acks,
                    };
                    tokio::spawn(self.clone().attach(attach, permit));
                }
                Err(e) => {
                    if let Some(endpoint) = remote_member(&endpoint_group(&node)) {
                        let answer = ToEndpoint::Attached {
                            session,
                            leader: self.node.clone(),
                            result: Err(e),
                        };
                        self.tell(&endpoint, answer);
                    } else {
                        self.metrics.error("no_endpoint");
                    }
                }
            },
            ToHost::Frame {
                node,
                session,
                text,
            } => self.frame(node, session, &text),
            ToHost::Detach { node, session } => {
                let gone = self.sessions.lock().remove(&(node, session));
                if let Some(s) = gone {
                    s.handle.close(1000);
                }
            }
            ToHost::Ack {
                node,
                session,
                delivered,
            } => {
                if let Some(h) = self.sessions.lock().get(&(node, session)) {
                    h.acked.fetch_max(delivered, Ordering::AcqRel);
                }
            }
            ToHost::Forward(request) => self.forwarded(*request),
            ToHost::SettingsChanged => {
                if self.forwarding.is_some() {
                    let system = self.app.system.clone();
                    tokio::spawn(async move {
                        if let Err(e) = system.reload_settings().await {
                            tracing::warn!(error = %e, "the operator's settings could not be read again");
                        }
                    });
                }
            }
        }
    }
}

/// A standby's `Attach`, as the host works on it.
struct Attach {
    node: String,
    session: u64,
    role: Role,
    proof: Proof,
    acks: bool,
}

/// How often a host looks for a standby's endpoint that is not visible yet.
const ENDPOINT_POLL: Duration = Duration::from_millis(20);

impl Hosting {
    /// A REST request another node forwarded (sharded mode): run through this node's own
    /// router, in a task of its own, at most [`forward::HOST_IN_FLIGHT`] at once (more:
    /// answered 503 at once); the answer goes to the sender's endpoint.
    fn forwarded(self: &Arc<Self>, request: forward::ForwardRequest) {
        let node = request.node.clone();
        let id = request.id;
        let Some(serving) = &self.forwarding else {
            // Leader mode: nothing forwards to a leader's host.
            self.metrics.error("malformed");
            return;
        };
        let (permit, answer) = match serving.enter() {
            Ok(permit) => (Some(permit), None),
            Err(refusal) => (None, Some(refusal)),
        };
        let host = self.clone();
        tokio::spawn(async move {
            let response = match (permit, answer) {
                (Some(_permit), _) => {
                    let serving = host.forwarding.as_ref().expect("checked above");
                    serving.serve(&host.app, request).await
                }
                (None, Some(refusal)) => refusal,
                (None, None) => return,
            };
            let Some(endpoint) = host.endpoint(&node).await else {
                return;
            };
            let answer = ToEndpoint::Forwarded {
                id,
                response: Box::new(response),
            };
            host.tell(&endpoint, answer);
        });
    }

    fn tell(&self, endpoint: &ActorCell, m: ToEndpoint) -> bool {
        let sent = endpoint.send_message(Relay::Msg(m)).is_ok();
        if sent {
            self.metrics
                .messages
                .with_label_values(&["to_standby"])
                .inc();
        } else {
            self.metrics.error("send_failed");
        }
        sent
    }

    /// Whom `proof` names, if it may open a `role` session on this term now.
    fn admit(&self, role: Role, proof: Proof) -> Result<Identity, ApiError> {
        if !self.app.ready.load(Ordering::Acquire) {
            return Err(ApiError::unavailable(
                "the leader is starting or shutting down",
            ));
        }
        let who = jwt::resolve(&self.app, proof).map_err(|e| e.0)?;
        if who.role() != role.as_str() {
            return Err(ApiError::forbidden(format!(
                "a {} token cannot open a {} session",
                who.role(),
                role.as_str()
            )));
        }
        Ok(who)
    }

    /// The endpoint of `node`, waiting up to a peer timeout for it to become visible: an
    /// `Attach` can arrive before the process group's news of the standby's endpoint
    /// (a link that just formed), and without the endpoint there is nobody to answer.
    async fn endpoint(&self, node: &str) -> Option<ActorCell> {
        let group = endpoint_group(node);
        let until = Instant::now() + peer_timeout(&self.app.config);
        loop {
            if let Some(e) = remote_member(&group) {
                return Some(e);
            }
            if Instant::now() >= until {
                self.metrics.error("no_endpoint");
                return None;
            }
            tokio::time::sleep(ENDPOINT_POLL).await;
        }
    }

    /// Attaches a standby's session and forwards what its actors send until it ends.
    async fn attach(
        self: Arc<Self>,
        Attach {
            node,
            session,
            role,
            proof,
            acks,
        }: Attach,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Some(endpoint) = self.endpoint(&node).await else {
            return;
        };
        let answer = |result| ToEndpoint::Attached {
            session,
            leader: self.node.clone(),
            result,
        };
        let who = match self.admit(role, proof) {
            Ok(who) => who,
            Err(e) => {
                self.tell(&endpoint, answer(Err(e)));
                return;
            }
        };
        let (handle, inbox) = self.app.system.new_session();
        if !Box::pin(self.app.system.attach(&who, handle.clone())).await {
            let e = ApiError::new(ErrorCode::Internal, "could not start the session");
            self.tell(&endpoint, answer(Err(e)));
            return;
        }
        let key = (node, session);
        let acked = Arc::new(AtomicU64::new(0));
        self.sessions.lock().insert(
            key.clone(),
            Hosted {
                who: who.clone(),
                handle: handle.clone(),
                acked: acked.clone(),
            },
        );
        let gauge = self.metrics.sessions.with_label_values(&["hosting"]);
        gauge.inc();
        let answered = self.tell(&endpoint, answer(Ok(Role::of(&who).1)));
        drop(permit);
        if answered {
            let acked = acks.then_some(&*acked);
            let shard = self.app.sharded.as_ref().and_then(|h| h.clock_of(&who));
            self.forward(&key, &handle, (inbox, acked), (&endpoint, shard))
                .await;
        }
        self.sessions.lock().remove(&key);
        gauge.dec();
        self.app.system.detach(&who, handle.id);
        handle.close(1000);
    }

    /// Sends what the actors queue for the session to its standby, until the session
    /// closes (the code is sent on), the term ends (1001), the standby is gone, or more
    /// than `--ws-outbound-queue-max` plus [`ACK_EVERY`] messages are in flight to it
    /// (1008, as a local session's full queue; counted `bound="relay_in_flight"`).
    /// `acked`: what the standby acknowledged, when it acknowledges.
    async fn forward(
        &self,
        (node, session): &(String, u64),
        handle: &SessionHandle,
        (inbox, acked): (dispatch_actors::session::SessionInbox, Option<&AtomicU64>),
        (endpoint, shard): (&ActorCell, Option<Arc<super::shards::ShardSlot>>),
    ) {
        let (mut rx, closed) = inbox.into_parts();
        let in_flight_max = self.app.config.system.ws_outbound_queue_max as u64 + ACK_EVERY;
        let mut sent: u64 = 0;
        let mut shutdown = self.app.shutdown.clone();
        let mut members = self.members.clone();
        let code = loop {
            tokio::select! {
                biased;
                code = closed.closed() => break Some(code),
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break Some(CLOSE_GOING_AWAY),
                changed = members.changed() => {
                    if changed.is_err() || !members.borrow_and_update().contains(node) {
                        break None;
                    }
                }
                m = rx.recv() => {
                    let Some(m) = m else { break Some(1000) };
                    // A leader past its lease's deadline tells nobody anything more; in
                    // sharded mode, nor a node past the deadline of the account's shard.
                    if self.app.term.as_ref().is_some_and(|t| !t.live())
                        || shard.as_ref().is_some_and(|s| !s.clock().live())
                    {
                        break Some(CLOSE_GOING_AWAY);
                    }
                    let unacked = |a: &AtomicU64| sent.saturating_sub(a.load(Ordering::Acquire));
                    if acked.is_some_and(|a| unacked(a) >= in_flight_max) {
                        // The standby stopped taking messages (slow or paused): as a
                        // local session's full queue.
                        self.app.metrics.bound_hit("relay_in_flight");
                        break Some(CLOSE_POLICY);
                    }
                    let deliver = ToEndpoint::Deliver { session: *session, message: m };
                    if !self.tell(endpoint, deliver) {
                        break None;
                    }
                    sent += 1;
                }
            }
        };
        // When the standby left the members or a send failed, still try to close its
        // side (best effort): its own view of the members may still count this leader,
        // and its session must not stay open with nothing behind it.
        self.tell(
            endpoint,
            ToEndpoint::Close {
                session: *session,
                code: code.unwrap_or(CLOSE_GOING_AWAY),
            },
        );
        handle.close(1000);
    }

    /// A client frame from a standby: decoded again and handed to the actors, as a local
    /// session's.
    fn frame(&self, node: String, session: u64, text: &str) {
        let Some(h) = self.sessions.lock().get(&(node.clone(), session)).cloned() else {
            self.metrics.error("unknown_session");
            if let Some(endpoint) = remote_member(&endpoint_group(&node)) {
                let close = ToEndpoint::Close {
                    session,
                    code: CLOSE_GOING_AWAY,
                };
                self.tell(&endpoint, close);
            }
            return;
        };
        let app = &self.app;
        if text.len() > app.config.max_frame_bytes {
            let e = ApiError::new(
                ErrorCode::TooLarge,
                format!("frames are limited to {} bytes", app.config.max_frame_bytes),
            );
            ws::reply_error(&h.handle, None, e);
            return;
        }
        let driver = matches!(h.who, Identity::Driver(_));
        match ws::decode_command(text, driver) {
            Err((req, e)) => ws::reply_error(&h.handle, req, e),
            Ok((req, cmd)) => {
                if let Some(e) = ws::in_flight_refusal(&app.config, &h.handle) {
                    app.metrics.bound_hit("ws_in_flight");
                    let e = ApiError::new(ErrorCode::RateLimited, e);
                    ws::reply_error(&h.handle, req, e);
                    return;
                }
                let r = Responder::new(req, h.handle.clone());
                match (cmd, &h.who) {
                    (Command::Driver(c), Identity::Driver(id)) => {
                        app.system.driver_command(id, c, r, None)
                    }
                    (Command::Rider(c), Identity::Rider(id)) => {
                        app.system.rider_command(id, c, r, None)
                    }
                    // Decoded by the session's own role's decoder.
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_messages_round_trip_and_garbage_is_malformed() {
        let m = Relay::Msg(ToHost::Attach {
            node: "n1".into(),
            session: 7,
            role: Role::Driver,
            proof: WireProof::Own {
                hash: [3; 32],
                shard: Some(3),
            },
            acks: true,
        });
        let wire = m.clone().serialize().unwrap();
        assert_eq!(Relay::<ToHost>::deserialize(wire).unwrap(), m);
        let d = Relay::Msg(ToEndpoint::Deliver {
            session: 1,
            message: Box::new(Outbound::Ack { req: 4 }),
        });
        let wire = d.clone().serialize().unwrap();
        assert_eq!(Relay::<ToEndpoint>::deserialize(wire).unwrap(), d);
        for (variant, args) in [
            (VARIANT, b"{\"Frame\":{\"node\":1}}".to_vec()),
            (VARIANT, vec![0xff, 0x00, 0x7b]),
            (VARIANT, Vec::new()),
            ("other", b"{}".to_vec()),
        ] {
            let m = SerializedMessage::Cast {
                variant: variant.to_owned(),
                args,
                metadata: None,
            };
            assert!(matches!(
                Relay::<ToHost>::deserialize(m),
                Ok(Relay::Malformed(_))
            ));
        }
        assert!(Relay::<ToHost>::Malformed("x".into()).serialize().is_err());
        // An attach from a build that does not acknowledge: no `acks`, read as false.
        let old = br#"{"Attach":{"node":"n1","session":7,"role":"driver","proof":{"Own":{"hash":[3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3]}}}}"#;
        let m = SerializedMessage::Cast {
            variant: VARIANT.to_owned(),
            args: old.to_vec(),
            metadata: None,
        };
        assert!(matches!(
            Relay::<ToHost>::deserialize(m),
            Ok(Relay::Msg(ToHost::Attach { acks: false, .. }))
        ));
    }

    fn live(of: &[&str]) -> Vec<String> {
        of.iter().map(|s| s.to_string()).collect()
    }

    /// Issue 16's review, item 1: an `Attached` that arrives after its leader's departure
    /// was processed is refused, and only that one: a leader not counted a member yet
    /// (its link and host visible before its heartbeats count it) is not.
    #[tokio::test]
    async fn an_attach_answered_after_its_leader_left_is_refused_and_a_fresh_leader_is_not() {
        let metrics = Arc::new(Metrics::default());
        let shared = Arc::new(Shared::new(
            "s1",
            RelayMetrics::new(&metrics),
            metrics.clone(),
            8,
        ));
        // An actor to stand for the leader's host: the answers below never reach it.
        let stand_in = RelayActor::spawn(shared.clone(), "test.relay.host".into())
            .await
            .unwrap();
        let session = |id: u64| {
            let (h, inbox) = SessionHandle::new(id, 8, metrics.clone());
            let rx = shared.ask(id, stand_in.get_cell(), h.clone());
            (h, inbox, rx)
        };
        let attached = |id: u64, leader: &str| {
            shared.receive(ToEndpoint::Attached {
                session: id,
                leader: leader.into(),
                result: Ok(format!("d{id}")),
            })
        };
        let lost = || {
            shared
                .metrics
                .errors
                .with_label_values(&["leader_lost"])
                .get()
        };
        shared.members_changed(live(&["l0", "l1", "s1"]));

        // Asked of l0, which leaves before its answer arrives: refused (503 on the upgrade).
        let (_h1, _i1, rx1) = session(1);
        shared.members_changed(live(&["l1", "s1"]));
        attached(1, "l0");
        let e = rx1.await.unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
        assert_eq!(lost(), 1);
        // As the refused upgrade's `Attachment` does.
        shared.sessions.lock().remove(&1);

        // Asked after l0's departure was seen, answered by l0 (linked again, not counted
        // a member yet): kept. So is one from l2, never a member yet.
        let (h2, _i2, rx2) = session(2);
        attached(2, "l0");
        assert_eq!(rx2.await.unwrap().unwrap(), "d2");
        let (h3, _i3, rx3) = session(3);
        attached(3, "l2");
        assert_eq!(rx3.await.unwrap().unwrap(), "d3");
        let (h4, _i4, rx4) = session(4);
        attached(4, "l1");
        assert_eq!(rx4.await.unwrap().unwrap(), "d4");

        // A departure closes its leader's sessions only (1001): l1 leaves.
        shared.members_changed(live(&["s1"]));
        assert_eq!(h4.closed().await, CLOSE_GOING_AWAY);
        assert!(!h2.is_closed() && !h3.is_closed());
        assert_eq!(lost(), 2);
        // l0 counted a member, then gone: its session closes.
        shared.members_changed(live(&["l0", "s1"]));
        assert!(!h2.is_closed());
        shared.members_changed(live(&["s1"]));
        assert_eq!(h2.closed().await, CLOSE_GOING_AWAY);

        // l2 never became a member: closed by the re-check once the grace has passed.
        shared.recheck(Duration::from_secs(3600));
        assert!(!h3.is_closed());
        shared.recheck(Duration::ZERO);
        assert_eq!(h3.closed().await, CLOSE_GOING_AWAY);
        assert_eq!(lost(), 4);
        stand_in.stop(None);
    }

    /// Item 3: attaches past the cap are refused at once (503 `unavailable` on the
    /// standby) and counted; a finished attach makes room again.
    #[test]
    fn attaches_past_the_cap_are_refused_at_once_and_counted() {
        let metrics = Metrics::default();
        let gate = AttachGate::new(2);
        let hits = || {
            metrics
                .bounds_hit
                .with_label_values(&["relay_attaching"])
                .get()
        };
        let a = gate.enter(&metrics).unwrap();
        let _b = gate.enter(&metrics).unwrap();
        let e = gate.enter(&metrics).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
        assert_eq!(hits(), 1);
        drop(a);
        let _c = gate.enter(&metrics).unwrap();
        assert_eq!(hits(), 1);
    }
}
