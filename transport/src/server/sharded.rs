//! Sharded cluster mode (`--cluster-mode sharded`; issue 16, stage 4 of
//! `docs/sharding.md`): every node serves the shards it owns, instead of one leader
//! serving the whole city ([`super::failover`]).
//!
//! A node starts membership (`--cluster-listen`), opens the PostgreSQL store and builds
//! **one** [`System`] for the life of the process, with `SystemConfig::sharded` on, and
//! its router (`System::start_router`: the actors' messages to other nodes' actors).
//! A [`ShardController`] holds this node's shard leases; its [`ShardHost`] is that
//! system ([`SystemHost`]): a claimed shard is recovered (`System::recover_shard`, under
//! the fence the controller set), an ended one stopped (`System::end_shard`: its actors
//! stop, its sessions are closed 1001 "reconnect"). The actors' placement
//! (`System::set_placement`) follows the controller's shard map each time it changes:
//! this node's shards `Local`, another live member's `Remote(node)`, the rest `Nobody`.
//!
//! One listener per node, through a front (`Front`):
//! - **WebSocket upgrades** (`/v1/ws/driver`, `/v1/ws/rider`) from any app: the session is
//!   served by the owner of its account's entity shard (a JWT's id, or the shard an own
//!   token names: `tok_<shard>.…`, [`super::auth::new_token_in`]): here when that is this
//!   node, else relayed to that node's host (`relay::host_group`), as a standby relays to
//!   a leader in leader mode.
//! - **REST**: served here when this node serves what the request needs; else forwarded
//!   through `ractor_cluster` to the node that does ([`super::forward`]: an account's
//!   routes to its entity shard's owner, the operator's settings to `WHOLE_CITY`'s, one
//!   entity's or trip's admin routes to its shard's), whose answer is the client's. A
//!   node asked for an account it does not serve answers `unavailable` naming the owner
//!   ([`Here::check_here`]; what a forwarded request whose shard moved meanwhile gets).
//!   Registrations draw an id in a shard this node serves.
//! - **`/readyz`**: 200 once every shard the map gives this node is served here; 503
//!   naming how many are not yet. **`/metrics`**, **`/healthz`**: always.
//!
//! SIGTERM: the controller ends every shard as a handoff (sessions closed, leases
//! released, so the other nodes claim at their next tick once membership drops this
//! node), then the system stops.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use dispatch_actors::placement::{Place, ShardMap};
use dispatch_actors::{ApiError, Metrics, System};
use dispatch_engine::shard::ShardId;
use dispatch_persistence::Fence;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

use super::forward::{self, Forwarder};
use super::http::{self, HttpError, QueryParams};
use super::jwt::{self, Proof};
use super::relay::{self, RelayTarget};
use dispatch_actors::records::Identity;

use super::shards::{
    ControllerConfig, ShardController, ShardEnd, ShardHost, ShardMetrics, ShardSlot, ShardView,
};
use super::ws::TokenQuery;
use super::{Config, Tasks, auth, new_app};

/// The most records one shard's recovery loads (`Store::load_shard`'s bound): a shard
/// past it is refused (`TooLarge`), released and counted, never loaded in part.
pub const SHARD_LOAD_MAX: usize = 500_000;

/// Shards recovered at once at most: each recovery holds a database connection for its
/// reads, and the lease renewals share the pool (and a small machine's cores) with them,
/// so a node taking over many shards must leave room for renewing the ones it has.
pub const RECOVERIES_AT_ONCE: usize = 4;

/// The [`ShardHost`] of a node: its one long-lived [`System`].
pub struct SystemHost {
    system: System,
    /// At most [`RECOVERIES_AT_ONCE`] recoveries run; the others wait (as `Claiming`).
    recovering: tokio::sync::Semaphore,
}

impl ShardHost for SystemHost {
    async fn claimed(&self, shard: ShardId, fence: Fence) -> Result<(), String> {
        // The controller fenced the store for `shard` before calling: every write of the
        // recovery and after is checked against this epoch.
        let _turn = self
            .recovering
            .acquire()
            .await
            .map_err(|_| "the node is stopping".to_owned())?;
        match self.system.recover_shard(shard, SHARD_LOAD_MAX).await {
            Ok(stats) => {
                tracing::info!(
                    shard,
                    epoch = fence.epoch,
                    drivers = stats.drivers,
                    riders = stats.riders,
                    live_trips = stats.live_trips,
                    recovery_ms = stats.elapsed_ms,
                    "shard recovered: serving it"
                );
                Ok(())
            }
            Err(e) => {
                // Nothing of it may be left running: stop what was started.
                self.system.end_shard(shard).await;
                Err(e.to_string())
            }
        }
    }

    async fn ended(&self, shard: ShardId, cause: ShardEnd, handoff: bool) {
        // `end_shard` stops serving first (`set_serving(false)`), then stops the actors
        // and closes their sessions; on a handoff the fence still holds for the last
        // positions it writes, and the controller releases the lease after this returns.
        let stats = self.system.end_shard(shard).await;
        tracing::info!(
            shard,
            cause = cause.as_str(),
            handoff,
            sessions = stats.sessions,
            "shard ended here"
        );
    }
}

/// What the handlers need to know of sharded mode: this node's name and the shard map.
pub struct Here {
    node: String,
    view: Arc<ShardView>,
}

impl Here {
    /// `Ok` when the account `proof` names is served here now; else `unavailable` naming
    /// the node that owns its shard (or that this node is still loading it). A token
    /// minted before sharded mode names no shard: it is resolved here if this node knows
    /// it, and otherwise refused `unavailable` unless this node serves every entity shard
    /// (then it is unknown: 401).
    pub fn check_here(&self, app: &super::App, proof: &Proof) -> Result<(), HttpError> {
        let shard = match proof.shard() {
            Some(s) => s,
            None => {
                let Proof::Own { hash, .. } = proof else {
                    return Ok(());
                };
                let everything =
                    (1..=dispatch_engine::shard::ENTITY_SHARDS).all(|s| self.serving(app, s));
                if everything || app.system.authenticate(hash).is_some() {
                    return Ok(());
                }
                return Err(HttpError(ApiError::unavailable(
                    "a token minted before sharded mode is known only to the node serving its account: retry on another node",
                )));
            }
        };
        if self.serving(app, shard) {
            return Ok(());
        }
        Err(HttpError(self.elsewhere(shard)))
    }

    /// `Ok` when `shard` is served here now; else `unavailable` naming its owner (a
    /// forwarded request whose shard moved meanwhile: never forwarded again).
    pub fn check_shard(&self, app: &super::App, shard: ShardId) -> Result<(), HttpError> {
        if self.serving(app, shard) {
            return Ok(());
        }
        Err(HttpError(self.elsewhere(shard)))
    }

    /// Whether `shard` is served here now: the System serves it *and* its lease clock's
    /// deadline is ahead. The System stops serving a shard only when the controller ends
    /// it, which a node woken from a pause past its leases does a tick later; until then
    /// the clock alone says the lease may be someone else's (as a session checks it).
    pub fn serving(&self, app: &super::App, shard: ShardId) -> bool {
        app.system.serves(shard) && self.view.slot(shard).is_some_and(|s| s.serving())
    }

    /// Why an account of `shard` is not served here.
    fn elsewhere(&self, shard: ShardId) -> ApiError {
        match self.view.owner(shard) {
            Some(o) if o != self.node => ApiError::unavailable(format!(
                "this account (shard {shard}) is served by node {o}: connect to it, or retry"
            )),
            Some(_) => ApiError::unavailable(format!(
                "this node is loading this account's shard {shard}: retry"
            )),
            None => ApiError::unavailable(format!(
                "no node serves this account's shard {shard} now: retry"
            )),
        }
    }

    /// The slot of `who`'s entity shard, whose lease clock a session of `who` checks
    /// before each message (a node past that shard's deadline tells the app nothing more).
    pub fn clock_of(&self, who: &Identity) -> Option<Arc<ShardSlot>> {
        self.view
            .slot(dispatch_engine::shard::entity_shard(jwt::identity_id(who)))
    }

    /// The shards the map gives this node that it does not serve yet (`None` before the
    /// controller's first tick: no map yet).
    pub fn not_ready(&self) -> Option<Vec<ShardId>> {
        let map = self.view.map();
        if map.is_empty() {
            return None;
        }
        Some(
            map.iter()
                .filter(|(_, o)| **o == self.node)
                .map(|(s, _)| *s)
                .filter(|s| !self.view.slot(*s).is_some_and(|slot| slot.serving()))
                .collect(),
        )
    }
}

/// The actors' placement for a shard map: this node's shards local, another member's on
/// its node (a shard the map does not name: nobody's).
pub fn placement(map: &BTreeMap<ShardId, String>, me: &str) -> ShardMap {
    ShardMap::new(map.iter().map(|(s, owner)| {
        let place = if owner == me {
            Place::Local
        } else {
            Place::Remote(owner.as_str().into())
        };
        (*s, place)
    }))
}

/// Feeds the system's placement from the controller's shard map each time it changes,
/// and keeps `dispatch_ready` (1: every desired shard served) current.
async fn follow_map(
    system: System,
    here: Arc<Here>,
    metrics: Arc<Metrics>,
    mut changes: watch::Receiver<Arc<BTreeMap<ShardId, String>>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let map = changes.borrow_and_update().clone();
                system.set_placement(Some(placement(&map, &here.node)));
                // The operator's settings are `WHOLE_CITY`'s owner's to write: a node
                // that does not hold it reads them from the store as the map changes
                // (and when told they changed, `forward.rs`), so its quotes price with
                // them.
                if !system.serves(dispatch_engine::shard::WHOLE_CITY) {
                    let system = system.clone();
                    tokio::spawn(async move {
                        if let Err(e) = system.reload_settings().await {
                            tracing::warn!(error = %e, "the operator's settings could not be read");
                        }
                    });
                }
                tracing::info!(
                    shards = map.len(),
                    here = map.values().filter(|o| **o == here.node).count(),
                    "the shard map changed"
                );
            }
            _ = tick.tick() => {}
        }
        let ready = here.not_ready().is_some_and(|n| n.is_empty());
        metrics.ready.set(i64::from(ready));
    }
}

/// The node's one listener (and `--admin-listen`): sessions to their account's owner,
/// REST requests another node serves forwarded to it, the rest to this node's routers.
struct Front {
    here: Arc<Here>,
    app: super::App,
    client: Router,
    admin: Option<Router>,
    /// The relay's upgrade routes (with membership): sessions of accounts served elsewhere.
    relay: Option<Router>,
    /// REST requests of shards served elsewhere (with membership; `forward.rs`).
    forward: Option<Forwarder>,
}

impl Front {
    async fn serve(self: Arc<Self>, req: Request, admin: bool) -> Response {
        let path = req.uri().path();
        if path == "/readyz" {
            return self.readyz();
        }
        let router = match (admin, &self.admin) {
            (true, Some(a)) => a.clone(),
            (false, _) if matches!(path, "/v1/ws/driver" | "/v1/ws/rider") => {
                return self.upgrade(req).await;
            }
            _ => self.client.clone(),
        };
        // The operator routes are on this listener: the admin one, or the only one.
        let operator_routes = admin || self.admin.is_none();
        // Without membership this node is the only one: nothing to forward.
        let target = match &self.forward {
            Some(_) => {
                let (method, path, headers) = (req.method(), req.uri().path(), req.headers());
                forward::route(&self.app, (method, path, headers), operator_routes).await
            }
            None => None,
        };
        let settings_write = target.is_some_and(|t| t.group == "settings")
            && req.method() != axum::http::Method::GET;
        let response = match (&self.forward, target) {
            (Some(fwd), Some(t)) if !self.here.serving(&self.app, t.shard) => {
                match self.here.view.owner(t.shard) {
                    Some(o) if o != self.here.node => {
                        // The registration limit is per client address, known only here:
                        // counted here, once (the owner's skips a forwarded request).
                        match ratelimit_first(&self.app, t, &req) {
                            Some(refused) => refused,
                            None => fwd.forward(&o, t, admin, req).await,
                        }
                    }
                    // Nobody's, or this node's and loading: answered here (503).
                    _ => run_local(router, req).await,
                }
            }
            _ => run_local(router, req).await,
        };
        if settings_write && response.status().is_success() {
            // Every other node prices with them from now on (and this one, if the
            // write was forwarded).
            if let Some(fwd) = &self.forward {
                fwd.settings_changed();
            }
            if !self
                .here
                .serving(&self.app, dispatch_engine::shard::WHOLE_CITY)
                && let Err(e) = self.app.system.reload_settings().await
            {
                tracing::warn!(error = %e, "the operator's settings could not be read again");
            }
        }
        response
    }

    fn readyz(&self) -> Response {
        if !self.app.ready.load(Ordering::Acquire) {
            return HttpError(ApiError::unavailable("not ready: starting or stopping"))
                .into_response();
        }
        match self.here.not_ready() {
            Some(left) if left.is_empty() => "ready".into_response(),
            Some(left) => HttpError(ApiError::unavailable(format!(
                "not ready: {} of this node's shards are not served yet (first: {:?})",
                left.len(),
                &left[..left.len().min(5)]
            )))
            .into_response(),
            None => HttpError(ApiError::unavailable(
                "not ready: the shard map is not known yet",
            ))
            .into_response(),
        }
    }

    /// A session: served here when its account's shard is this node's (or when its
    /// token says nothing of a shard), else relayed to the owner's host.
    async fn upgrade(&self, req: Request) -> Response {
        let (mut parts, body) = req.into_parts();
        let token = match QueryParams::<TokenQuery>::from_request_parts(&mut parts, &()).await {
            Ok(QueryParams(q)) => q.token,
            Err(e) => return e.into_response(),
        };
        let owner = match auth::bearer(&parts.headers, token.as_deref()) {
            // The local handler answers a missing or bad token as it always does.
            None => None,
            Some(token) => match jwt::verify(&self.app.auth, token).await {
                Ok(proof) => proof.shard().and_then(|s| self.here.view.owner(s)),
                Err(e) => return e.into_response(),
            },
        };
        let mut req = Request::from_parts(parts, body);
        let router = match owner {
            Some(o) if o != self.here.node => match &self.relay {
                Some(relay) => {
                    req.extensions_mut()
                        .insert(RelayTarget(relay::host_group(&o)));
                    relay.clone()
                }
                None => {
                    return HttpError(ApiError::unavailable(format!(
                        "this account is served by node {o}: connect to it"
                    )))
                    .into_response();
                }
            },
            _ => self.client.clone(),
        };
        match router.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// A registration about to be forwarded, counted against its client's address here:
/// `Some(429)` when over the limit (`ratelimit::refusal`).
fn ratelimit_first(app: &super::App, t: forward::Target, req: &Request) -> Option<Response> {
    if t.group != "registration" {
        return None;
    }
    super::ratelimit::refusal(app, req)
}

async fn run_local(router: Router, req: Request) -> Response {
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn front_router(front: &Arc<Front>, admin: bool) -> Router {
    let front = front.clone();
    Router::new().fallback(move |req: Request| front.clone().serve(req, admin))
}

/// Waits, at most a peer timeout, until every `--cluster-peers` node is a member: a node
/// that claimed shards alone would hand most of them off a moment later (recovered for
/// nothing), and nodes starting together would each claim the whole city first.
async fn settle(config: &Config, mut members: watch::Receiver<Vec<String>>) {
    let Some(m) = &config.membership else {
        return;
    };
    let mut peers = m.peers.clone();
    peers.sort();
    peers.dedup();
    // The peer list may or may not name this node itself (by its listen address).
    let me = m.listen.to_string();
    let want = peers.len() + usize::from(!peers.contains(&me));
    let settled = members.wait_for(|now| now.len() >= want);
    if tokio::time::timeout(m.peer_timeout, settled).await.is_err() {
        tracing::info!(
            members = ?*members.borrow(),
            peers = want,
            "not every peer is a member yet; claiming shards with the members there are"
        );
    }
}

/// `run` in sharded cluster mode: serves `listener` (and `--admin-listen`) until
/// `shutdown` resolves.
pub(super) async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster = config.cluster.clone().expect("cluster mode");
    let me = cluster.node_name.clone();
    let super::ClusterBase {
        metrics,
        membership,
        store,
        admin_token_hash,
        transport,
        auth,
        relay_metrics,
        forward_metrics,
    } = super::ClusterBase::start(&config).await?;
    let mut system_config = config.system.clone();
    system_config.sharded = true;
    let system = System::start(system_config, metrics.clone(), store.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    system
        .start_router(&me, dispatch_actors::remote::MAX_INFLIGHT_PER_PEER)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Without `--cluster-listen` this node is its only member: it owns every shard.
    let (_alone, members) = watch::channel(vec![me.clone()]);
    let members = membership.as_ref().map_or(members, |m| m.members());
    settle(&config, members.clone()).await;
    let mut cc = ControllerConfig::new(&me, cluster.lease_ttl, cluster.lease_renew);
    cc.service_area = cluster.service_area.clone();
    let controller = ShardController::new(
        cc,
        store.clone(),
        Arc::new(SystemHost {
            system: system.clone(),
            recovering: tokio::sync::Semaphore::new(RECOVERIES_AT_ONCE),
        }),
        members,
        ShardMetrics::new(&metrics.registry)?,
    );
    let view = controller.view();
    let here = Arc::new(Here {
        node: me.clone(),
        view: view.clone(),
    });
    let follow = tokio::spawn(follow_map(
        system.clone(),
        here.clone(),
        metrics.clone(),
        view.watch_map(),
        cluster.lease_renew,
    ));
    let (quit_tx, quit) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = new_app(
        &config,
        (&system, &transport, &auth),
        admin_token_hash,
        stop_rx,
        None,
        membership.clone(),
        Some(here.clone()),
    );
    // The app answers at once; what it serves is decided per account (`Here`).
    app.ready.store(true, Ordering::Release);
    let (standby, host) = match &membership {
        Some(m) => {
            let standby = relay::Standby::start(
                &config,
                (&metrics, &transport, &relay_metrics),
                auth.clone(),
                m,
                quit.clone(),
            )
            .await?;
            let group = relay::host_group(&me);
            let host = relay::spawn_host(app.clone(), m, relay_metrics.clone(), group).await?;
            (Some(standby), Some(host))
        }
        None => (None, None),
    };
    let front = Arc::new(Front {
        here,
        app: app.clone(),
        client: http::router(app.clone()),
        admin: config.admin_listen.map(|_| http::admin_router(app.clone())),
        relay: standby.as_ref().map(|s| s.router()),
        forward: standby
            .as_ref()
            .map(|s| Forwarder::new(s.clone(), forward_metrics)),
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = quit_tx.send(true);
    });
    tracing::info!(listen = %listener.local_addr()?, node = %me,
        store = %format!("{} {}", store.kind(), store.dir().display()),
        lease_ttl_ms = cluster.lease_ttl.as_millis() as u64, lease_renew_ms = cluster.lease_renew.as_millis() as u64,
        "dispatchd serving in sharded cluster mode");
    let servers = super::serve_listeners(listener, &config, front_router(&front, false), || {
        front_router(&front, true)
    })
    .await?;
    let tasks = Tasks::start(&app);
    // Until SIGTERM; then every shard ends as a handoff (sessions closed 1001, leases
    // released).
    controller.run(quit).await;
    app.ready.store(false, Ordering::Release);
    metrics.ready.set(0);
    let _ = app.stop_reason.set("server shutting down");
    let _ = stop_tx.send(true);
    follow.abort();
    tasks.abort();
    if let Some(h) = &host {
        h.stop(None);
    }
    super::stop_listeners(servers, &config).await;
    if let Some(s) = &standby {
        s.stop();
    }
    drop(front);
    drop(app);
    let wait = Duration::from_millis(config.shutdown_timeout_ms);
    if tokio::time::timeout(wait, system.shutdown()).await.is_err() {
        tracing::warn!(
            timeout_ms = config.shutdown_timeout_ms,
            "the actors did not stop in time"
        );
    }
    if let Some(m) = &membership {
        m.stop().await;
    }
    tracing::info!("dispatchd stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placement_is_local_for_this_nodes_shards_remote_for_others_and_nobody_else() {
        let map: BTreeMap<ShardId, String> = [
            (1, "n1".to_owned()),
            (2, "n2".to_owned()),
            (0, "n1".to_owned()),
        ]
        .into_iter()
        .collect();
        let p = placement(&map, "n1");
        assert_eq!(p.place(1), Place::Local);
        assert_eq!(p.place(0), Place::Local);
        assert_eq!(p.place(2), Place::Remote("n2".into()));
        assert_eq!(p.place(3), Place::Nobody);
    }
}
