//! Cluster mode, first slice (issue 16): standby takeover, fenced by a lease.
//!
//! The whole city is one shard ([`SHARD`]). Every node (`--node-name`) opens the same
//! PostgreSQL store; the one holding shard 0's lease serves, the others stand by. One
//! listener per node serves both roles through a front router that sends each request to
//! what the node is now:
//!
//! - **Standby.** `/healthz` 200; `/readyz` 503 naming the lease's holder and epoch
//!   ("standby: n2 holds the lease, epoch 7"); `/metrics` the node's own metrics; every
//!   other route (client REST, WebSocket upgrades, `/admin/`) 503 `unavailable`, "this
//!   node is a standby; …". Every `--lease-renew-ms` it tries to claim the lease.
//! - **Leader term.** On a claim: [`Store::fence`] with the new epoch (from then on every
//!   commit is checked against the lease inside its transaction, by the database's
//!   clock), a fresh [`System`], the usual recovery from the store, and then serving as a
//!   single node does. The lease is renewed every `--lease-renew-ms`. The term's local
//!   deadline is the instant the last successful renewal (or the claim) was *sent*, plus
//!   the lease's time left, minus [`safety_margin`]: the database started counting no
//!   earlier than that instant, so the node stops serving before the database lets
//!   anyone else claim. At the deadline without a renewal, when a renewal answers that
//!   the lease is lost, or when the store refuses a commit as fenced, the term ends at
//!   once: the front turns standby (no new requests reach the term), sessions are closed
//!   (1001, "this node lost its lease; reconnect"), the system is shut down, and the node
//!   stands by again, in the same process.
//! - **Shutdown** (SIGTERM): the term ends, and the lease is released so that a standby
//!   claims it at its next try instead of waiting for it to expire.
//!
//! Fencing is what makes a paused leader harmless (its late commits are refused whole);
//! the deadline is what keeps it from answering clients from memory once it lost the
//! lease. Node names must be unique: a node claiming under the name of a live holder gets
//! that holder's lease back.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use dispatch_actors::{ApiError, Metrics, System};
use dispatch_persistence::{Lease, Store};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

use super::config::ClusterConfig;
use super::http::{self, HttpError};
use super::shards::blocking;
pub use super::shards::{TermClock, safety_margin};
use super::{Config, Tasks, TransportMetrics, new_app};

/// The one shard of this slice: the whole city.
pub const SHARD: dispatch_persistence::ShardId = dispatch_persistence::WHOLE_CITY;

/// Why a leader term ended (the `cause` label of `dispatch_cluster_terms_ended_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// The local deadline passed without a successful renewal.
    Expired,
    /// A renewal answered that the lease is no longer this node's.
    Lost,
    /// The store refused a commit: the lease ended under it.
    Fenced,
    /// Recovery or the system's start failed (the lease is released).
    Failed,
    /// SIGTERM: a clean handoff (the lease is released).
    Shutdown,
}

impl TermEnd {
    pub const ALL: [TermEnd; 5] = [
        TermEnd::Expired,
        TermEnd::Lost,
        TermEnd::Fenced,
        TermEnd::Failed,
        TermEnd::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TermEnd::Expired => "expired",
            TermEnd::Lost => "lost",
            TermEnd::Fenced => "fenced",
            TermEnd::Failed => "failed",
            TermEnd::Shutdown => "shutdown",
        }
    }
}

/// The close reason of a session whose node lost its lease.
pub const LEASE_LOST: &str = "this node lost its lease; reconnect to another node";

/// Cluster metrics, registered beside the actors' (documented in docs/api.md).
#[derive(Clone)]
struct ClusterMetrics {
    leader: IntGauge,
    epoch: IntGauge,
    takeovers: IntCounter,
    renewals_failed: IntCounter,
    terms_ended: IntCounterVec,
    fenced_commits: IntCounter,
}

impl ClusterMetrics {
    fn new(m: &Metrics) -> Self {
        let leader = IntGauge::new(
            "dispatch_cluster_leader",
            "1 while this node holds the lease and serves, 0 while it stands by",
        )
        .unwrap();
        let epoch = IntGauge::new(
            "dispatch_cluster_epoch",
            "The lease epoch (fencing token) of this node's current or last term; 0 before its first",
        )
        .unwrap();
        let takeovers = IntCounter::new(
            "dispatch_cluster_takeovers_total",
            "Leader terms this node began (lease claims)",
        )
        .unwrap();
        let renewals_failed = IntCounter::new(
            "dispatch_cluster_lease_renewals_failed_total",
            "Lease renewals that failed: an error, no answer before the deadline, or the lease lost",
        )
        .unwrap();
        let terms_ended = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_terms_ended_total",
                "Leader terms that ended, by cause",
            ),
            &["cause"],
        )
        .unwrap();
        let fenced_commits = IntCounter::new(
            "dispatch_cluster_fenced_commits_total",
            "Commits the store refused because this node's lease had ended (nothing of them written)",
        )
        .unwrap();
        for c in TermEnd::ALL {
            terms_ended.with_label_values(&[c.as_str()]);
        }
        let r = &m.registry;
        r.register(Box::new(leader.clone())).expect("unique");
        r.register(Box::new(epoch.clone())).expect("unique");
        r.register(Box::new(takeovers.clone())).expect("unique");
        r.register(Box::new(renewals_failed.clone()))
            .expect("unique");
        r.register(Box::new(terms_ended.clone())).expect("unique");
        r.register(Box::new(fenced_commits.clone()))
            .expect("unique");
        Self {
            leader,
            epoch,
            takeovers,
            renewals_failed,
            terms_ended,
            fenced_commits,
        }
    }

    /// Brings the fenced-commit counter up to the store's count.
    fn count_fenced(&self, store: &Store) {
        let now = store.fenced();
        let had = self.fenced_commits.get();
        if now > had {
            self.fenced_commits.inc_by(now - had);
        }
    }
}

/// What the node is now, for the front router.
#[derive(Clone)]
enum Role {
    /// Standing by; the text says who holds the lease ("n2 holds the lease, epoch 7").
    Standby(Arc<str>),
    /// Serving a term: the term's routers (the admin one with `--admin-listen`), while
    /// its clock is live.
    Leader {
        client: Router,
        admin: Option<Router>,
        clock: Arc<TermClock>,
    },
}

struct Front {
    role: RwLock<Role>,
    /// A standby's own WebSocket routes: sessions relayed to the leader (`relay`).
    relay: Option<Router>,
    /// `--admin-listen` is set: the client listener serves neither `/metrics` nor
    /// `/admin/`, on a standby as on a leader.
    admin_apart: bool,
    metrics: Arc<Metrics>,
    cluster: ClusterMetrics,
    store: Arc<Store>,
}

impl Front {
    fn set(&self, role: Role) {
        *self.role.write().unwrap_or_else(|e| e.into_inner()) = role;
    }

    fn standby(&self, why: impl Into<Arc<str>>) {
        self.set(Role::Standby(why.into()));
    }

    /// One request on the client listener (`admin: false`) or `--admin-listen`.
    async fn serve(self: Arc<Self>, req: Request, admin: bool) -> Response {
        let role = self.role.read().unwrap_or_else(|e| e.into_inner()).clone();
        let router = match role {
            Role::Leader { clock, .. } if !clock.live() => {
                return self.standby_answer(req.uri().path(), "this node's lease ended");
            }
            Role::Leader {
                client, admin: a, ..
            } => {
                if admin {
                    a.unwrap_or(client)
                } else {
                    client
                }
            }
            Role::Standby(_)
                if !admin
                    && self.admin_apart
                    && (req.uri().path() == "/metrics"
                        || req.uri().path().starts_with("/admin")) =>
            {
                return HttpError(ApiError::new(
                    dispatch_actors::ErrorCode::NotFound,
                    "no such route",
                ))
                .into_response();
            }
            // With membership, a standby relays the apps' sessions to the leader.
            Role::Standby(why) => match (&self.relay, admin, req.uri().path()) {
                (Some(relay), false, "/v1/ws/driver" | "/v1/ws/rider") => relay.clone(),
                _ => return self.standby_answer(req.uri().path(), &why),
            },
        };
        match router.oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    fn standby_answer(&self, path: &str, why: &str) -> Response {
        match path {
            "/healthz" => "ok".into_response(),
            "/readyz" => {
                HttpError(ApiError::unavailable(format!("standby: {why}"))).into_response()
            }
            "/metrics" => {
                self.cluster.count_fenced(&self.store);
                http::exposition(&self.metrics.registry)
            }
            _ => HttpError(ApiError::unavailable(format!(
                "this node is a standby; {why}: connect to the node that holds it"
            )))
            .into_response(),
        }
    }
}

fn front_router(front: &Arc<Front>, admin: bool) -> Router {
    let front = front.clone();
    Router::new().fallback(move |req: Request| front.clone().serve(req, admin))
}

/// Everything a node's terms share.
struct Node {
    config: Config,
    cluster: ClusterConfig,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    transport: TransportMetrics,
    /// Token resolution: one per process (its metrics are registered once).
    auth: Arc<super::jwt::Auth>,
    admin_token_hash: [u8; 32],
    front: Arc<Front>,
    /// Flips to true on SIGTERM/SIGINT.
    quit: watch::Receiver<bool>,
    /// Membership over ractor_cluster (`--cluster-listen`), across terms.
    membership: Option<Arc<dispatch_cluster::Cluster>>,
    /// Sessions relayed across nodes: the series, across terms.
    relay_metrics: super::relay::RelayMetrics,
}

/// `run` in cluster mode: serves `listener` (and `--admin-listen`) through the front
/// router, standing by and serving terms in turn until `shutdown` resolves.
pub(super) async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster = config.cluster.clone().expect("cluster mode");
    // Membership lives across terms, standing by included.
    let super::ClusterBase {
        metrics,
        membership,
        store,
        admin_token_hash,
        transport,
        auth,
        relay_metrics,
        ..
    } = super::ClusterBase::start(&config).await?;
    let cm = ClusterMetrics::new(&metrics);
    let (quit_tx, quit) = watch::channel(false);
    let standby = match &membership {
        Some(m) => Some(
            super::relay::Standby::start(
                &config,
                (&metrics, &transport, &relay_metrics),
                auth.clone(),
                m,
                quit.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let front = Arc::new(Front {
        role: RwLock::new(Role::Standby("no lease read yet".into())),
        relay: standby.as_ref().map(|s| s.router()),
        admin_apart: config.admin_listen.is_some(),
        metrics: metrics.clone(),
        cluster: cm.clone(),
        store: store.clone(),
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = quit_tx.send(true);
    });
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, node = %cluster.node_name, store = %format!("{} {}", store.kind(), store.dir().display()),
        lease_ttl_ms = cluster.lease_ttl.as_millis() as u64, lease_renew_ms = cluster.lease_renew.as_millis() as u64,
        "dispatchd serving in cluster mode; standing by");
    let servers = super::serve_listeners(listener, &config, front_router(&front, false), || {
        front_router(&front, true)
    })
    .await?;
    let node = Node {
        transport,
        auth,
        relay_metrics,
        config,
        cluster,
        store,
        metrics,
        admin_token_hash,
        front,
        quit,
        membership,
    };
    let mut result = Ok(());
    while let Some((lease, sent)) = node.stand_by(&cm).await {
        match node.term(&cm, lease, sent).await {
            Ok(TermEnd::Shutdown) => break,
            Ok(_) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Open requests finish (bounded); every session of the last term is closed already.
    super::stop_listeners(servers, &node.config).await;
    cm.count_fenced(&node.store);
    if let Some(s) = &standby {
        s.stop();
    }
    if let Some(m) = &node.membership {
        m.stop().await;
    }
    tracing::info!("dispatchd stopped");
    result
}

impl Node {
    fn quitting(&self) -> bool {
        *self.quit.borrow()
    }

    /// Stands by until this node claims the lease (the lease, and the instant the claim
    /// was sent), or until shutdown (`None`).
    async fn stand_by(&self, cm: &ClusterMetrics) -> Option<(Lease, Instant)> {
        cm.leader.set(0);
        self.metrics.ready.set(0);
        let name = self.cluster.node_name.clone();
        let ttl = self.cluster.lease_ttl;
        let mut tick = tokio::time::interval(self.cluster.lease_renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quit = self.quit.clone();
        loop {
            tokio::select! {
                _ = quit.wait_for(|q| *q) => return None,
                _ = tick.tick() => {}
            }
            cm.count_fenced(&self.store);
            let sent = Instant::now();
            let n = name.clone();
            match blocking(&self.store, move |s| s.claim_lease(SHARD, &n, ttl)).await {
                // Its own lease back (a term that ended at its deadline, inside the
                // margin): too little left to serve; it expires and is claimed afresh.
                Ok(Some(lease)) if lease.remaining <= safety_margin(ttl) => {
                    self.front.standby(format!(
                        "this node's lease (epoch {}) is ending; claiming it again after",
                        lease.epoch
                    ));
                }
                Ok(Some(lease)) if !self.quitting() => return Some((lease, sent)),
                Ok(Some(lease)) => {
                    // Claimed just as shutdown began: hand it back at once.
                    let n = name.clone();
                    let _ = blocking(&self.store, move |s| {
                        s.release_lease(SHARD, &n, lease.epoch)
                    })
                    .await;
                    return None;
                }
                Ok(None) => {
                    let why = match blocking(&self.store, |s| s.leases()).await {
                        Ok(all) => match all.into_iter().find(|l| l.shard == SHARD) {
                            Some(l) if !l.remaining.is_zero() => {
                                format!("{} holds the lease, epoch {}", l.holder, l.epoch)
                            }
                            Some(l) => format!(
                                "no node holds the lease (epoch {} of {} ended)",
                                l.epoch, l.holder
                            ),
                            None => "no node holds the lease".to_owned(),
                        },
                        Err(e) => format!("the lease cannot be read: {e}"),
                    };
                    self.front.standby(why);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim the lease");
                    self.front
                        .standby(format!("the lease cannot be claimed: {e}"));
                }
            }
        }
    }

    /// One leader term under `lease` (claimed at `sent`), until it ends; then the node is
    /// a standby again. `Err` only when this node cannot serve at all.
    async fn term(
        &self,
        cm: &ClusterMetrics,
        lease: Lease,
        sent: Instant,
    ) -> anyhow::Result<TermEnd> {
        let name = self.cluster.node_name.clone();
        let epoch = lease.epoch;
        let started = std::time::Instant::now();
        {
            let n = name.clone();
            blocking(&self.store, move |s| s.fence(SHARD, epoch, &n)).await?;
        }
        let fenced_before = self.store.fenced();
        cm.takeovers.inc();
        cm.epoch.set(epoch as i64);
        cm.leader.set(1);
        tracing::info!(node = %name, epoch, "claimed the lease: recovering the state and taking over");
        let margin = safety_margin(self.cluster.lease_ttl);
        let deadline = sent + lease.remaining.saturating_sub(margin);
        let clock = Arc::new(TermClock::new(deadline));
        let keeper = tokio::spawn(keep(
            self.store.clone(),
            name.clone(),
            epoch,
            self.cluster.clone(),
            clock.clone(),
            deadline,
            cm.clone(),
        ));
        let system = match System::start(
            self.config.system.clone(),
            self.metrics.clone(),
            self.store.clone(),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                keeper.abort();
                self.end(cm, epoch, TermEnd::Failed).await;
                return Err(anyhow::anyhow!("{e}"));
            }
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let app = new_app(
            &self.config,
            (&system, &self.transport, &self.auth),
            self.admin_token_hash,
            stop_rx,
            Some(clock.clone()),
            self.membership.clone(),
            None,
        );
        // The host of sessions relayed from standbys, for this term.
        let host = match &self.membership {
            Some(m) => {
                match super::relay::spawn_host(
                    app.clone(),
                    m,
                    self.relay_metrics.clone(),
                    super::relay::HOST_GROUP.to_owned(),
                )
                .await
                {
                    Ok(h) => Some(h),
                    Err(e) => {
                        tracing::warn!(error = %e, "no relayed sessions this term");
                        None
                    }
                }
            }
            None => None,
        };
        self.front.set(Role::Leader {
            clock,
            client: http::router(app.clone()),
            admin: self
                .config
                .admin_listen
                .map(|_| http::admin_router(app.clone())),
        });
        let (recovery, failed_rx) = {
            let name = name.clone();
            super::spawn_recovery(&app, move |ms| {
                tracing::info!(node = %name, epoch, recovery_ms = ms,
                    takeover_ms = started.elapsed().as_millis() as u64, "leader ready");
            })
        };
        let tasks = Tasks::start(&app);
        let mut quit = self.quit.clone();
        let store = self.store.clone();
        let fenced = async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            loop {
                every.tick().await;
                if store.fenced() > fenced_before {
                    return;
                }
            }
        };
        let mut failure = None;
        let cause = tokio::select! {
            c = keeper => c.unwrap_or(TermEnd::Expired),
            _ = quit.wait_for(|q| *q) => TermEnd::Shutdown,
            Ok(e) = failed_rx => {
                failure = Some(e);
                TermEnd::Failed
            }
            _ = fenced => TermEnd::Fenced,
        };
        // At once: no new request reaches the term, and its sessions are closed.
        self.front.standby(match cause {
            TermEnd::Shutdown => "this node is shutting down",
            _ => "this node's term ended; no node holds the lease yet",
        });
        app.ready.store(false, Ordering::Release);
        self.metrics.ready.set(0);
        let _ = app.stop_reason.set(match cause {
            TermEnd::Shutdown => "server shutting down",
            _ => LEASE_LOST,
        });
        let _ = stop_tx.send(true);
        tracing::warn!(node = %name, epoch, cause = cause.as_str(), term_s = started.elapsed().as_secs_f64(), "the leader term ended: standing by");
        recovery.abort();
        tasks.abort();
        if let Some(h) = host {
            // Out of the host group at once: standbys stop sending attaches here.
            ractor::pg::leave(super::relay::HOST_GROUP.to_owned(), vec![h.get_cell()]);
            h.stop(None);
        }
        drop(app);
        let wait = Duration::from_millis(self.config.shutdown_timeout_ms);
        if tokio::time::timeout(wait, system.shutdown()).await.is_err() {
            tracing::warn!(
                timeout_ms = self.config.shutdown_timeout_ms,
                "the term's actors did not stop in time"
            );
        }
        self.end(cm, epoch, cause).await;
        // A record recovery cannot read stops this node, as it stops a single one.
        match failure {
            Some(e) => Err(anyhow::anyhow!(e)),
            None => Ok(cause),
        }
    }

    /// A term's end, counted; on a clean end the lease is handed back.
    async fn end(&self, cm: &ClusterMetrics, epoch: u64, cause: TermEnd) {
        if matches!(cause, TermEnd::Shutdown | TermEnd::Failed) {
            let n = self.cluster.node_name.clone();
            match blocking(&self.store, move |s| s.release_lease(SHARD, &n, epoch)).await {
                Ok(()) => tracing::info!(epoch, "lease released"),
                Err(e) => {
                    tracing::warn!(error = %e, epoch, "the lease could not be released; it expires by itself")
                }
            }
        }
        cm.terms_ended.with_label_values(&[cause.as_str()]).inc();
        cm.leader.set(0);
        cm.count_fenced(&self.store);
    }
}

/// Renews the lease every `--lease-renew-ms` until the term must end: at `deadline`
/// without a renewal (`Expired`), or when a renewal says it is lost (`Lost`). A renewal
/// that fails is retried at the next interval, as long as the deadline allows.
async fn keep(
    store: Arc<Store>,
    name: String,
    epoch: u64,
    cluster: ClusterConfig,
    clock: Arc<TermClock>,
    mut deadline: Instant,
    cm: ClusterMetrics,
) -> TermEnd {
    let margin = safety_margin(cluster.lease_ttl);
    let mut next = Instant::now() + cluster.lease_renew;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return TermEnd::Expired,
            _ = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        next = sent + cluster.lease_renew;
        let (n, ttl) = (name.clone(), cluster.lease_ttl);
        let renewal = blocking(&store, move |s| s.renew_lease(SHARD, &n, epoch, ttl));
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                // No answer in time: whatever it says later no longer matters.
                cm.renewals_failed.inc();
                return TermEnd::Expired;
            }
            r = renewal => match r {
                Ok(true) => {
                    deadline = sent + ttl.saturating_sub(margin);
                    clock.extend(deadline);
                }
                Ok(false) => {
                    cm.renewals_failed.inc();
                    return TermEnd::Lost;
                }
                Err(e) => {
                    cm.renewals_failed.inc();
                    tracing::warn!(error = %e, epoch, "a lease renewal failed; retrying until the deadline");
                }
            }
        }
    }
}
