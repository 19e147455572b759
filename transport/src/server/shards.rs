//! The shard controller (issue 16, stage 4 of `docs/sharding.md` §4): one per node, one
//! lease clock per shard instead of [`super::failover`]'s one term over the whole city.
//!
//! Every `--lease-renew-ms` ([`ShardController::tick`]):
//! - **desired**: of the candidate shards (the 256 entity shards, `WHOLE_CITY`, and the
//!   cell shards of `--service-area`, or until it is set the cell shards trips are stored
//!   in, [`Store::trip_shards`]), those [`owner`] gives this node among the live members;
//! - **renew** every held shard in one statement ([`Store::renew_leases`]); a shard
//!   missing from the answer ends at once (`lost`), and so does a shard whose local
//!   deadline (the instant its last successful renewal or its claim was *sent*, plus the
//!   lease's time left, minus [`safety_margin`]) passes first (`expired`): the controller
//!   wakes for the earliest deadline, not only at its ticks, and a renewal that has not
//!   answered by then counts as failed;
//! - **claim** the desired shards not held, at most [`ControllerConfig::max_claims`] a
//!   tick, in one statement ([`Store::claim_leases`]); each claimed shard is fenced
//!   ([`Store::fence`]) and handed to the [`ShardHost`] (`claimed`, on a task of its own
//!   so a slow load never holds back the renewals); it is ready once that returns `Ok`;
//!   on `Err` its lease is released and the failure counted, and it is not claimed again
//!   for a lease's length;
//! - **hand off** a held shard no longer desired (a new member wins it): `ended(..,
//!   handoff = true)` while the fence still holds (the host may persist what it has), then
//!   [`Store::unfence`] and [`Store::release_lease`], so the new owner claims it at its
//!   next tick instead of after the TTL.
//!
//! A shard that is lost (`lost`, `expired`, `fenced`) is unfenced first (its late writes
//! are refused without asking the database) and then ended with `handoff = false`.
//! Shutdown ([`ShardController::shutdown`]) ends every shard as a handoff (`shutdown`) and
//! releases every lease.
//!
//! Readers ([`ShardView`]) see, per shard, [`Readiness`] and its [`TermClock`]: atomics
//! only for the entity shards and `WHOLE_CITY` (a fixed table), a `parking_lot` read lock
//! to find a cell shard's slot (taken for writing only when the candidate set grows), and
//! atomics again on the slot a reader keeps. The desired shard map (shard → owner) is
//! there too, for routing. Every blocking store call runs in `spawn_blocking` under a
//! timeout that never reaches past the earliest held deadline, and what fell due is
//! ended right after it. A shard is not claimed again while its last host task runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dispatch_engine::shard::{ENTITY_SHARDS, ShardId, owner};
use dispatch_engine::{Grid, Point};
use dispatch_persistence::{Fence, Lease, Store, StoreError};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How long before the lease's end by its own clock a node stops serving a shard: a
/// tenth of the lease, at least 50 ms. It covers a timer that fires late and the moment it
/// takes to stop answering, and any difference in rate between this node's clock and the
/// database's (NTP keeps that under 500 ppm: 1 ms in 2 s). Writes do not depend on it:
/// the fence refuses them by the database's clock.
pub fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(50))
}

/// Until when a lease may be served: the local deadline, moved on by each renewal. The
/// session writers and the front check it before each message and request, so a node
/// that wakes from a pause past its deadline tells nobody anything, even before its
/// controller has run to end the term or the shard. One frame per session escapes it: a
/// frame whose check passed just before the process was frozen goes to the socket as it
/// resumes (nothing runs in between to check again); the writer logs it
/// (`ws::LATE_FRAME`) and closes the session.
#[derive(Debug)]
pub struct TermClock {
    base: std::time::Instant,
    until_us: AtomicU64,
}

impl TermClock {
    pub(crate) fn new(until: Instant) -> Self {
        let c = Self::stopped();
        c.extend(until);
        c
    }

    /// A clock that is not live until [`TermClock::extend`]ed.
    pub(crate) fn stopped() -> Self {
        TermClock {
            base: std::time::Instant::now(),
            until_us: AtomicU64::new(0),
        }
    }

    pub(crate) fn extend(&self, until: Instant) {
        let us = until
            .into_std()
            .saturating_duration_since(self.base)
            .as_micros();
        // Never 0 once extended: 0 is "stopped".
        let us = u64::try_from(us).unwrap_or(u64::MAX).max(1);
        self.until_us.store(us, Ordering::Release);
    }

    /// Not live from now on.
    pub(crate) fn stop(&self) {
        self.until_us.store(0, Ordering::Release);
    }

    /// Whether the term's deadline is still ahead.
    pub fn live(&self) -> bool {
        let until = self.until_us.load(Ordering::Acquire);
        (self.base.elapsed().as_micros() as u64) < until
    }
}

/// Runs a blocking store call off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .unwrap_or_else(|e| {
            Err(StoreError::Write {
                at: "dispatch_leases".to_owned(),
                reason: format!("the lease call failed: {e}"),
            })
        })
}

/// [`blocking`] that gives up waiting after `bound` (the call itself runs on, and its
/// answer is dropped).
async fn bounded<T: Send + 'static>(
    store: &Arc<Store>,
    bound: Duration,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::time::timeout(bound, blocking(store, f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", bound.as_millis())),
    }
}

/// Why a shard ended (the `cause` label of `dispatch_cluster_shard_ends_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShardEnd {
    /// Its local deadline passed without a successful renewal.
    Expired,
    /// A renewal answered without it: expired or claimed again by the database's clock.
    Lost,
    /// The store refused a commit naming it: the lease ended under it.
    Fenced,
    /// A new member wins it: handed off, the lease released.
    Handoff,
    /// This node is stopping: the lease released.
    Shutdown,
}

impl ShardEnd {
    pub const ALL: [ShardEnd; 5] = [
        ShardEnd::Expired,
        ShardEnd::Lost,
        ShardEnd::Fenced,
        ShardEnd::Handoff,
        ShardEnd::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShardEnd::Expired => "expired",
            ShardEnd::Lost => "lost",
            ShardEnd::Fenced => "fenced",
            ShardEnd::Handoff => "handoff",
            ShardEnd::Shutdown => "shutdown",
        }
    }

    /// Whether the lease is still this node's when the host is told (and is released
    /// after): a handoff or a shutdown. The host may still write under the shard's fence.
    pub fn is_clean(self) -> bool {
        matches!(self, ShardEnd::Handoff | ShardEnd::Shutdown)
    }
}

/// What a node does with the shards its controller claims and ends: load and start their
/// actors, stop them. Called from the controller's tasks; one shard's calls never
/// overlap (`ended` comes after `claimed` has returned `Ok`).
pub trait ShardHost: Send + Sync + 'static {
    /// `shard` is this node's under `fence` (already set on the store): load and start
    /// its actors. The shard is marked ready only after `Ok`; on `Err` nothing of it may
    /// be left running (the controller releases its lease and counts the failure).
    fn claimed(
        &self,
        shard: ShardId,
        fence: Fence,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Stop serving `shard`. `handoff`: the lease is still this node's and the fence
    /// still holds (a handoff or a shutdown; it is released right after this returns);
    /// otherwise the lease is lost and the fence already dropped.
    fn ended(
        &self,
        shard: ShardId,
        cause: ShardEnd,
        handoff: bool,
    ) -> impl Future<Output = ()> + Send;
}

/// A host that serves nothing: it accepts every shard. For a node that only holds leases.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHost;

impl ShardHost for NoHost {
    async fn claimed(&self, _: ShardId, _: Fence) -> Result<(), String> {
        Ok(())
    }
    async fn ended(&self, _: ShardId, _: ShardEnd, _: bool) {}
}

/// A shard's state as readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// This node does not hold it.
    NotHeld,
    /// Its lease is this node's, its host is loading it: refuse with `unavailable`.
    Claiming,
    /// Served here under this epoch.
    Ready(u64),
}

const NOT_HELD: u64 = 0;
const CLAIMING: u64 = u64::MAX;

/// One shard's slot in the [`ShardView`]: its readiness and its lease clock, both atomics.
#[derive(Debug)]
pub struct ShardSlot {
    /// 0: not held; `u64::MAX`: claiming; else ready at that epoch (epochs start at 1).
    state: AtomicU64,
    clock: TermClock,
}

impl ShardSlot {
    fn new() -> Self {
        ShardSlot {
            state: AtomicU64::new(NOT_HELD),
            clock: TermClock::stopped(),
        }
    }

    pub fn readiness(&self) -> Readiness {
        match self.state.load(Ordering::Acquire) {
            NOT_HELD => Readiness::NotHeld,
            CLAIMING => Readiness::Claiming,
            e => Readiness::Ready(e),
        }
    }

    /// The shard's lease clock: live while this node may serve it.
    pub fn clock(&self) -> &TermClock {
        &self.clock
    }

    /// Ready here and its deadline ahead: what a session writer checks before each message.
    pub fn serving(&self) -> bool {
        matches!(self.readiness(), Readiness::Ready(_)) && self.clock.live()
    }

    fn set(&self, r: Readiness) {
        let v = match r {
            Readiness::NotHeld => NOT_HELD,
            Readiness::Claiming => CLAIMING,
            Readiness::Ready(e) => e.clamp(1, CLAIMING - 1),
        };
        self.state.store(v, Ordering::Release);
    }
}

/// The readiness of every candidate shard on this node, and the shard map, for readers.
pub struct ShardView {
    /// `WHOLE_CITY` (0) and the entity shards (1–256), by index: no lock at all.
    fixed: Box<[Arc<ShardSlot>]>,
    /// The cell shards, replaced whole when the candidate set grows.
    cells: parking_lot::RwLock<Arc<HashMap<ShardId, Arc<ShardSlot>>>>,
    /// shard → owner among the live members, as of the last tick.
    map: parking_lot::RwLock<Arc<BTreeMap<ShardId, String>>>,
    /// The same map, sent again each time it changes ([`ShardView::watch_map`]).
    changes: watch::Sender<Arc<BTreeMap<ShardId, String>>>,
}

impl ShardView {
    fn new() -> Self {
        ShardView {
            fixed: (0..=ENTITY_SHARDS)
                .map(|_| Arc::new(ShardSlot::new()))
                .collect(),
            cells: parking_lot::RwLock::new(Arc::new(HashMap::new())),
            map: parking_lot::RwLock::new(Arc::new(BTreeMap::new())),
            changes: watch::channel(Arc::new(BTreeMap::new())).0,
        }
    }

    /// `shard`'s slot, if it is a candidate shard (keep it: its checks are atomics).
    pub fn slot(&self, shard: ShardId) -> Option<Arc<ShardSlot>> {
        match usize::try_from(shard).ok().and_then(|i| self.fixed.get(i)) {
            Some(s) => Some(s.clone()),
            None => self.cells.read().get(&shard).cloned(),
        }
    }

    /// `shard`'s readiness here (`NotHeld` for a shard that is no candidate).
    pub fn readiness(&self, shard: ShardId) -> Readiness {
        self.slot(shard)
            .map_or(Readiness::NotHeld, |s| s.readiness())
    }

    /// shard → owner among the live members as of the last tick (desired, not yet held).
    pub fn map(&self) -> Arc<BTreeMap<ShardId, String>> {
        self.map.read().clone()
    }

    /// The shard map, marked changed each time a tick finds it different (for the
    /// placement of the node's actors).
    pub fn watch_map(&self) -> watch::Receiver<Arc<BTreeMap<ShardId, String>>> {
        self.changes.subscribe()
    }

    /// Replaces the map, telling the watchers when it differs from the last.
    fn set_map(&self, map: BTreeMap<ShardId, String>) {
        let map = Arc::new(map);
        *self.map.write() = map.clone();
        self.changes.send_if_modified(|last| {
            if **last == *map {
                false
            } else {
                *last = map;
                true
            }
        });
    }

    /// The owner of `shard` in [`ShardView::map`].
    pub fn owner(&self, shard: ShardId) -> Option<String> {
        self.map.read().get(&shard).cloned()
    }

    /// Adds slots for cell shards not seen before.
    fn add_cells(&self, shards: &BTreeSet<ShardId>) {
        let new: Vec<ShardId> = {
            let cells = self.cells.read();
            shards
                .iter()
                .copied()
                .filter(|s| *s > ENTITY_SHARDS && !cells.contains_key(s))
                .collect()
        };
        if new.is_empty() {
            return;
        }
        let mut w = self.cells.write();
        let mut next = HashMap::clone(&w);
        for s in new {
            next.entry(s).or_insert_with(|| Arc::new(ShardSlot::new()));
        }
        *w = Arc::new(next);
    }
}

/// The shard of an account id and the rendezvous owner of a shard among members (for
/// tools and tests that place accounts and trips on chosen nodes).
pub use dispatch_engine::shard::{entity_shard, owner as shard_owner};

/// The index resolution of a node started without `--h3-resolution` (7).
pub const DEFAULT_INDEX_RESOLUTION: u8 = 7;

/// The cell shard of a point on a node of the default index resolution
/// ([`DEFAULT_INDEX_RESOLUTION`]): the shard of its index cell, where a driver there is
/// indexed and a trip picked up there is stored and served (`docs/sharding.md` §1,
/// [`dispatch_engine::shard::shard_of_point`]). Near a shard border this need not be the
/// resolution-6 cell of the point itself. `None` off the globe.
pub fn shard_at(lat: f64, lng: f64) -> Option<ShardId> {
    let p = Point::new(lat, lng).ok()?;
    let grid = Grid::new(DEFAULT_INDEX_RESOLUTION).ok()?;
    Some(dispatch_engine::shard::shard_of_point(grid, p))
}

/// The most cell shards a service area or the store may name.
pub const MAX_CELL_SHARDS: usize = 20_000;

/// A resolution-6 cell's average area (km²), for refusing a huge box before sampling it.
const SHARD_KM2: f64 = 36.13;

/// [`service_area_shards_at`] for a node of the default index resolution.
pub fn service_area_shards(text: &str) -> Result<Vec<ShardId>, String> {
    let grid = Grid::new(DEFAULT_INDEX_RESOLUTION).map_err(|e| e.to_string())?;
    service_area_shards_at(text, grid)
}

/// The cell shards of the box of two opposite corners, for `--service-area
/// lat1,lng1,lat2,lng2` on a node whose index is `grid`: every shard a point of the box
/// maps to ([`dispatch_engine::shard::shards_in_box`]: the parents of the index cells
/// covering it, which near a border reach into a neighbouring resolution-6 cell). Refused:
/// a corner off the globe, a box of no area, one across the antimeridian, and one of more
/// than [`MAX_CELL_SHARDS`] shards.
pub fn service_area_shards_at(text: &str, grid: Grid) -> Result<Vec<ShardId>, String> {
    let bad = |why: &str| format!("--service-area {text:?}: {why}");
    let v: Vec<f64> = text
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad("must be four numbers, lat1,lng1,lat2,lng2"))?;
    let [a_lat, a_lng, b_lat, b_lng] = v[..] else {
        return Err(bad("must be four numbers, lat1,lng1,lat2,lng2"));
    };
    let (s, n) = (a_lat.min(b_lat), a_lat.max(b_lat));
    let (w, e) = (a_lng.min(b_lng), a_lng.max(b_lng));
    for (lat, lng) in [(s, w), (n, e)] {
        Point::new(lat, lng).map_err(|e| bad(&e.to_string()))?;
    }
    if n - s <= 0.0 || e - w <= 0.0 {
        return Err(bad("the box has no area"));
    }
    if e - w > 180.0 {
        return Err(bad(
            "the box spans more than 180° of longitude (a box across the antimeridian is not supported)",
        ));
    }
    let km_lat = (n - s) * 111.2;
    let mid = ((s + n) / 2.0).to_radians().cos().max(0.01);
    let km_lng = (e - w) * 111.2 * mid;
    let estimate = km_lat * km_lng / SHARD_KM2;
    let too_many = || {
        bad(&format!(
            "more than {MAX_CELL_SHARDS} shards of ~36 km² (resolution 6); name a smaller area"
        ))
    };
    if estimate > (MAX_CELL_SHARDS as f64) * 1.2 {
        return Err(too_many());
    }
    let found = dispatch_engine::shard::shards_in_box(grid, (s, w), (n, e));
    if found.len() > MAX_CELL_SHARDS {
        return Err(too_many());
    }
    Ok(found.into_iter().collect())
}

/// The controller's settings (from `ClusterConfig` in dispatchd).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This node's name: the lease holder.
    pub node_name: String,
    pub lease_ttl: Duration,
    pub lease_renew: Duration,
    /// The cell shards of `--service-area`; `None`: the cell shards trips are stored in.
    pub service_area: Option<Arc<[ShardId]>>,
    /// At most this many shards claimed in one tick (the rest at the next; counted).
    pub max_claims: usize,
    /// The store's leases are read for `dispatch_cluster_shards_unowned` (and, without a
    /// service area, the stored cell shards) every this many ticks.
    pub survey_every: u32,
}

impl ControllerConfig {
    pub fn new(node_name: impl Into<String>, lease_ttl: Duration, lease_renew: Duration) -> Self {
        ControllerConfig {
            node_name: node_name.into(),
            lease_ttl,
            lease_renew,
            service_area: None,
            max_claims: 512,
            survey_every: 5,
        }
    }
}

/// The controller's metrics (documented in docs/api.md).
#[derive(Clone)]
pub struct ShardMetrics {
    pub held: IntGauge,
    pub unowned: IntGauge,
    pub claims: IntCounter,
    pub handoffs: IntCounterVec,
    pub ends: IntCounterVec,
    pub renewals_failed: IntCounter,
    pub claim_errors: IntCounterVec,
    pub claims_deferred: IntCounter,
    /// `dispatch_cluster_fenced_commits_total`, leader mode's family (`failover`) in
    /// sharded mode: the store's refusals, brought up to `Store::fenced` every tick.
    pub fenced_commits: IntCounter,
}

impl ShardMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let held = IntGauge::new(
            "dispatch_cluster_shards_held",
            "Shards whose lease this node holds (claiming or ready)",
        )?;
        let unowned = IntGauge::new(
            "dispatch_cluster_shards_unowned",
            "Candidate shards with no live lease in the store, as of this node's last read of the leases",
        )?;
        let claims = IntCounter::new(
            "dispatch_cluster_shard_claims_total",
            "Shard leases this node claimed (takeovers and handoffs in)",
        )?;
        let handoffs = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_shard_handoffs_total",
                "Shards handed off to a member that now wins them (out), or claimed from a live member that held them (in)",
            ),
            &["direction"],
        )?;
        let ends = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_shard_ends_total",
                "Shards this node stopped serving, by cause",
            ),
            &["cause"],
        )?;
        let renewals_failed = IntCounter::new(
            "dispatch_cluster_shard_renewals_failed_total",
            "Renewals of this node's shard leases (one statement for all) that failed or did not answer before the earliest deadline",
        )?;
        let claim_errors = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_shard_claim_errors_total",
                "Shard claims that failed: the claim statement (store), or loading the shard (host; its lease released)",
            ),
            &["cause"],
        )?;
        let claims_deferred = IntCounter::new(
            "dispatch_cluster_shard_claims_deferred_total",
            "Desired shards left to a later tick by the bound on claims per tick",
        )?;
        // The same family as leader mode's (`failover::ClusterMetrics`): the dashboards'
        // and alerts' fenced-commit panels read it in either mode.
        let fenced_commits = IntCounter::new(
            "dispatch_cluster_fenced_commits_total",
            "Commits the store refused because this node's lease had ended (nothing of them written)",
        )?;
        for d in ["in", "out"] {
            handoffs.with_label_values(&[d]);
        }
        for c in ShardEnd::ALL {
            ends.with_label_values(&[c.as_str()]);
        }
        for c in ["store", "host"] {
            claim_errors.with_label_values(&[c]);
        }
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(unowned.clone()))?;
        registry.register(Box::new(claims.clone()))?;
        registry.register(Box::new(handoffs.clone()))?;
        registry.register(Box::new(ends.clone()))?;
        registry.register(Box::new(renewals_failed.clone()))?;
        registry.register(Box::new(claim_errors.clone()))?;
        registry.register(Box::new(claims_deferred.clone()))?;
        registry.register(Box::new(fenced_commits.clone()))?;
        Ok(ShardMetrics {
            held,
            unowned,
            claims,
            handoffs,
            ends,
            renewals_failed,
            claim_errors,
            claims_deferred,
            fenced_commits,
        })
    }
}

/// A shard whose lease this node holds.
struct Held {
    epoch: u64,
    deadline: Instant,
    slot: Arc<ShardSlot>,
    /// `store.fenced_in(shard)` when it was claimed: a rise means a commit was refused.
    fenced_at_claim: u64,
    /// Being ended as a handoff: still renewed until the host is done and it is released.
    ending: bool,
    /// Tells the shard's task to end it (taken when sent).
    stop: Option<oneshot::Sender<ShardEnd>>,
}

/// What a shard's task reports back.
enum Report {
    /// The host's `claimed` answered.
    Claimed {
        shard: ShardId,
        epoch: u64,
        result: Result<(), String>,
    },
    /// The host's `ended` returned after a clean end: unfence and release now.
    Ended {
        shard: ShardId,
        epoch: u64,
        cause: ShardEnd,
    },
    /// The shard's task is over (after any of the above, or without them).
    Finished { shard: ShardId },
}

/// One node's shard controller. Drive it with [`ShardController::run`], or call
/// [`ShardController::tick`] yourself.
pub struct ShardController<H: ShardHost> {
    config: ControllerConfig,
    store: Arc<Store>,
    host: Arc<H>,
    members: watch::Receiver<Vec<String>>,
    metrics: ShardMetrics,
    view: Arc<ShardView>,
    held: BTreeMap<ShardId, Held>,
    /// Cell shards found in the store (no service area), as of the last survey.
    stored_cells: BTreeSet<ShardId>,
    /// Shards whose host refused them: not claimed again before this instant.
    backoff: HashMap<ShardId, Instant>,
    /// Shards whose task (the host's `claimed`, then `ended`) has not finished: not
    /// claimed again until it has, so one shard's host calls never overlap.
    busy: BTreeSet<ShardId>,
    /// The last read of the leases: shard → holder, for the live ones.
    last_holders: HashMap<ShardId, String>,
    ticks: u64,
    reports_tx: mpsc::UnboundedSender<Report>,
    reports: mpsc::UnboundedReceiver<Report>,
}

impl<H: ShardHost> ShardController<H> {
    /// A controller for `config.node_name` over `store` (its own store: fences are per
    /// store), following `members` (the live members, this node included, as
    /// `Cluster::members()` gives them).
    pub fn new(
        config: ControllerConfig,
        store: Arc<Store>,
        host: Arc<H>,
        members: watch::Receiver<Vec<String>>,
        metrics: ShardMetrics,
    ) -> Self {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let view = Arc::new(ShardView::new());
        if let Some(area) = &config.service_area {
            view.add_cells(&area.iter().copied().collect());
        }
        ShardController {
            config,
            store,
            host,
            members,
            metrics,
            view,
            held: BTreeMap::new(),
            stored_cells: BTreeSet::new(),
            backoff: HashMap::new(),
            busy: BTreeSet::new(),
            last_holders: HashMap::new(),
            ticks: 0,
            reports_tx,
            reports,
        }
    }

    /// The readiness view and shard map, for the node's readers.
    pub fn view(&self) -> Arc<ShardView> {
        self.view.clone()
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.metrics
    }

    /// The shards this node holds a lease of now, with their epochs.
    pub fn held(&self) -> BTreeMap<ShardId, u64> {
        self.held.iter().map(|(s, h)| (*s, h.epoch)).collect()
    }

    /// Every candidate shard: `WHOLE_CITY`, the entity shards and the cell shards.
    pub fn candidates(&self) -> BTreeSet<ShardId> {
        let mut all: BTreeSet<ShardId> = (0..=ENTITY_SHARDS).collect();
        match &self.config.service_area {
            Some(area) => all.extend(area.iter().copied()),
            None => all.extend(self.stored_cells.iter().copied()),
        }
        all
    }

    /// Ticks every `--lease-renew-ms` (and at each shard's deadline) until `quit` turns
    /// true, then [`ShardController::shutdown`].
    pub async fn run(mut self, mut quit: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.lease_renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let earliest = self.earliest_deadline();
            tokio::select! {
                _ = async { quit.wait_for(|q| *q).await.is_ok() } => break,
                _ = tick.tick() => self.tick().await,
                Some(r) = self.reports.recv() => self.report(r).await,
                _ = sleep_until_opt(earliest) => self.end_expired(),
            }
        }
        self.shutdown().await;
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.held.values().map(|h| h.deadline).min()
    }

    /// How long a store call may take: at most `max`, and never past the earliest held
    /// deadline, so a database that does not answer never keeps the controller from
    /// ending a shard on time (it ends what is due right after, [`Self::end_expired`]).
    fn bound(&self, max: Duration) -> Duration {
        match self.earliest_deadline() {
            Some(d) => max.min(d.saturating_duration_since(Instant::now())),
            None => max,
        }
    }

    /// One round: handle what the shards' tasks reported, survey, renew, end, claim.
    pub async fn tick(&mut self) {
        self.ticks += 1;
        while let Ok(r) = self.reports.try_recv() {
            self.report(r).await;
        }
        let me = self.config.node_name.clone();
        // A node is always one of its members: a list that misses it (membership not
        // formed yet, or a glitch) must not make it hand off everything it holds.
        let mut members: Vec<String> = self.members.borrow().clone();
        if !members.contains(&me) {
            members.push(me.clone());
        }
        if self.ticks == 1
            || self
                .ticks
                .is_multiple_of(u64::from(self.config.survey_every.max(1)))
        {
            self.survey().await;
        }
        let candidates = self.candidates();
        let map: BTreeMap<ShardId, String> = candidates
            .iter()
            .filter_map(|s| owner(*s, &members).map(|o| (*s, o.to_owned())))
            .collect();
        let desired: BTreeSet<ShardId> = map
            .iter()
            .filter(|(_, o)| **o == me)
            .map(|(s, _)| *s)
            .collect();
        self.view.set_map(map);
        self.renew().await;
        self.check_fenced();
        // Handoffs: held, no longer desired.
        let leaving: Vec<ShardId> = self
            .held
            .iter()
            .filter(|(s, h)| !desired.contains(s) && !h.ending)
            .map(|(s, _)| *s)
            .collect();
        for s in leaving {
            self.end_clean(s, ShardEnd::Handoff);
        }
        // Claims: desired, not held, not backing off.
        let now = Instant::now();
        self.backoff.retain(|_, until| *until > now);
        let want: Vec<ShardId> = desired
            .iter()
            .copied()
            .filter(|s| {
                !self.held.contains_key(s)
                    && !self.backoff.contains_key(s)
                    && !self.busy.contains(s)
            })
            .collect();
        if !want.is_empty() {
            self.claim(want, &members).await;
        }
        self.end_expired();
        self.metrics.held.set(self.held.len() as i64);
    }

    /// Reads the leases (for `unowned` and for telling handoffs in from takeovers) and,
    /// without a service area, the cell shards trips are stored in.
    async fn survey(&mut self) {
        let bound = self.bound(self.config.lease_ttl);
        if self.config.service_area.is_none() {
            match bounded(&self.store, self.bound(bound), |s| {
                s.trip_shards(ENTITY_SHARDS, MAX_CELL_SHARDS)
            })
            .await
            {
                Ok(found) => {
                    self.stored_cells = found.into_iter().collect();
                    self.view.add_cells(&self.stored_cells);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the cell shards trips are in; keeping the last set")
                }
            }
        }
        match bounded(&self.store, self.bound(bound), |s| s.leases()).await {
            Ok(leases) => {
                let live: HashMap<ShardId, String> = leases
                    .into_iter()
                    .filter(|l| !l.remaining.is_zero())
                    .map(|l| (l.shard, l.holder))
                    .collect();
                let unowned = self
                    .candidates()
                    .iter()
                    .filter(|s| !live.contains_key(s))
                    .count();
                self.metrics.unowned.set(unowned as i64);
                self.last_holders = live;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the shard leases"),
        }
    }

    /// Renews every held shard in one statement; ends the ones it leaves out, and the
    /// ones whose deadline passes before it answers.
    async fn renew(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let pairs: Vec<(ShardId, u64)> = self.held.iter().map(|(s, h)| (*s, h.epoch)).collect();
        let Some(earliest) = self.earliest_deadline() else {
            return;
        };
        let sent = Instant::now();
        let (name, ttl) = (self.config.node_name.clone(), self.config.lease_ttl);
        let wait = earliest.saturating_duration_since(sent);
        let asked = pairs.clone();
        let answer = bounded(&self.store, wait, move |s| {
            s.renew_leases(&name, &asked, ttl)
        })
        .await;
        match answer {
            Ok(renewed) => {
                let renewed: BTreeSet<ShardId> = renewed.into_iter().collect();
                let deadline = sent + ttl.saturating_sub(safety_margin(ttl));
                let mut lost = Vec::new();
                for (s, _) in &pairs {
                    match self.held.get_mut(s) {
                        Some(h) if renewed.contains(s) => {
                            h.deadline = deadline;
                            // A shard being handed off stays renewed, not served.
                            if !h.ending {
                                h.slot.clock.extend(deadline);
                            }
                        }
                        Some(_) => lost.push(*s),
                        None => {}
                    }
                }
                if !lost.is_empty() {
                    self.metrics.renewals_failed.inc();
                    tracing::warn!(shards = ?lost, "shard leases lost at renewal");
                }
                for s in lost {
                    self.end_lost(s, ShardEnd::Lost);
                }
            }
            Err(e) => {
                self.metrics.renewals_failed.inc();
                tracing::warn!(error = %e, shards = pairs.len(), "the shard lease renewal failed; retrying until each deadline");
            }
        }
        self.end_expired();
    }

    /// Ends every held shard whose local deadline has passed.
    fn end_expired(&mut self) {
        let now = Instant::now();
        let due: Vec<ShardId> = self
            .held
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for s in due {
            self.end_lost(s, ShardEnd::Expired);
        }
    }

    /// Ends every held shard the store refused a commit for since its claim.
    fn check_fenced(&mut self) {
        let (now, had) = (self.store.fenced(), self.metrics.fenced_commits.get());
        if now > had {
            self.metrics.fenced_commits.inc_by(now - had);
        }
        let refused: Vec<ShardId> = self
            .held
            .iter()
            .filter(|(s, h)| self.store.fenced_in(**s) > h.fenced_at_claim)
            .map(|(s, _)| *s)
            .collect();
        for s in refused {
            self.end_lost(s, ShardEnd::Fenced);
        }
    }

    /// A shard lost: not served from now on, unfenced, then its host told.
    fn end_lost(&mut self, shard: ShardId, cause: ShardEnd) {
        let Some(mut h) = self.held.remove(&shard) else {
            return;
        };
        h.slot.clock.stop();
        h.slot.set(Readiness::NotHeld);
        self.store.unfence(shard);
        self.metrics.ends.with_label_values(&[cause.as_str()]).inc();
        self.metrics.held.set(self.held.len() as i64);
        tracing::warn!(
            shard,
            epoch = h.epoch,
            cause = cause.as_str(),
            "a shard ended"
        );
        if let Some(stop) = h.stop.take() {
            let _ = stop.send(cause);
        }
    }

    /// A clean end (handoff, shutdown): not served from now on; the host is told while
    /// the fence still holds, and the lease is released when it is done
    /// ([`Report::Ended`]). Renewed meanwhile.
    fn end_clean(&mut self, shard: ShardId, cause: ShardEnd) {
        let Some(h) = self.held.get_mut(&shard) else {
            return;
        };
        h.ending = true;
        h.slot.set(Readiness::NotHeld);
        h.slot.clock.stop();
        if let Some(stop) = h.stop.take() {
            let _ = stop.send(cause);
        }
    }

    /// Claims `want` (desired, not held) in one statement, at most `max_claims`.
    async fn claim(&mut self, mut want: Vec<ShardId>, members: &[String]) {
        if want.len() > self.config.max_claims {
            self.metrics
                .claims_deferred
                .inc_by((want.len() - self.config.max_claims) as u64);
            want.truncate(self.config.max_claims);
        }
        let sent = Instant::now();
        let (name, ttl) = (self.config.node_name.clone(), self.config.lease_ttl);
        let margin = safety_margin(ttl);
        let asked = want.clone();
        let bound = self.bound(ttl.saturating_sub(margin));
        let got: Vec<Lease> = match bounded(&self.store, bound, move |s| {
            s.claim_leases(&name, &asked, ttl)
        })
        .await
        {
            Ok(g) => g,
            Err(e) => {
                self.metrics
                    .claim_errors
                    .with_label_values(&["store"])
                    .inc();
                tracing::warn!(error = %e, shards = want.len(), "cannot claim shard leases");
                return;
            }
        };
        for lease in got {
            let s = lease.shard;
            // Its own lease back with too little left to serve: it expires and is
            // claimed afresh.
            if lease.remaining <= margin || self.held.contains_key(&s) {
                continue;
            }
            let deadline = sent + lease.remaining.saturating_sub(margin);
            if deadline <= Instant::now() {
                continue;
            }
            let Some(slot) = self.view.slot(s) else {
                continue;
            };
            if let Err(e) = self.store.fence(s, lease.epoch, &self.config.node_name) {
                self.metrics
                    .claim_errors
                    .with_label_values(&["store"])
                    .inc();
                tracing::warn!(error = %e, shard = s, "cannot fence a claimed shard");
                continue;
            }
            slot.set(Readiness::Claiming);
            slot.clock.extend(deadline);
            self.metrics.claims.inc();
            // Handed in: the last read saw it live under a member that is still one.
            if self
                .last_holders
                .get(&s)
                .is_some_and(|h| *h != self.config.node_name && members.contains(h))
            {
                self.metrics.handoffs.with_label_values(&["in"]).inc();
            }
            let (stop_tx, stop_rx) = oneshot::channel();
            self.held.insert(
                s,
                Held {
                    epoch: lease.epoch,
                    deadline,
                    slot,
                    fenced_at_claim: self.store.fenced_in(s),
                    ending: false,
                    stop: Some(stop_tx),
                },
            );
            self.busy.insert(s);
            tracing::info!(shard = s, epoch = lease.epoch, "claimed a shard");
            let fence = Fence {
                shard: s,
                epoch: lease.epoch,
                holder: self.config.node_name.clone(),
            };
            tokio::spawn(shard_task(
                self.host.clone(),
                fence,
                stop_rx,
                self.reports_tx.clone(),
            ));
        }
        self.metrics.held.set(self.held.len() as i64);
    }

    /// What a shard's task reported; then ends what fell due meanwhile.
    async fn report(&mut self, r: Report) {
        self.handle(r).await;
        self.end_expired();
    }

    async fn handle(&mut self, r: Report) {
        match r {
            Report::Finished { shard } => {
                self.busy.remove(&shard);
            }
            Report::Claimed {
                shard,
                epoch,
                result,
            } => {
                let Some(h) = self.held.get_mut(&shard).filter(|h| h.epoch == epoch) else {
                    return;
                };
                match result {
                    Ok(()) if !h.ending => {
                        h.slot.set(Readiness::Ready(epoch));
                        tracing::info!(shard, epoch, "shard ready");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(shard, epoch, error = %e, "the host could not load a claimed shard; releasing it");
                        self.metrics.claim_errors.with_label_values(&["host"]).inc();
                        let h = self.held.remove(&shard).expect("held");
                        h.slot.clock.stop();
                        h.slot.set(Readiness::NotHeld);
                        self.store.unfence(shard);
                        self.release(shard, epoch).await;
                        self.backoff
                            .insert(shard, Instant::now() + self.config.lease_ttl);
                        self.metrics.held.set(self.held.len() as i64);
                    }
                }
            }
            Report::Ended {
                shard,
                epoch,
                cause,
            } => {
                if self.held.get(&shard).is_none_or(|h| h.epoch != epoch) {
                    return;
                }
                self.held.remove(&shard);
                self.store.unfence(shard);
                self.release(shard, epoch).await;
                if cause == ShardEnd::Handoff {
                    self.metrics.handoffs.with_label_values(&["out"]).inc();
                }
                self.metrics.ends.with_label_values(&[cause.as_str()]).inc();
                self.metrics.held.set(self.held.len() as i64);
                tracing::info!(shard, epoch, cause = cause.as_str(), "shard handed back");
            }
        }
    }

    async fn release(&self, shard: ShardId, epoch: u64) {
        let name = self.config.node_name.clone();
        if let Err(e) = bounded(&self.store, self.bound(self.config.lease_ttl), move |s| {
            s.release_lease(shard, &name, epoch)
        })
        .await
        {
            tracing::warn!(shard, epoch, error = %e, "a shard lease could not be released; it expires by itself");
        }
    }

    /// Ends every shard (cause `shutdown`, the host told while each fence holds) and
    /// releases every lease. Bounded by the lease's TTL: a host slower than that loses
    /// its leases by expiry instead.
    pub async fn shutdown(&mut self) {
        let shards: Vec<ShardId> = self.held.keys().copied().collect();
        for s in shards {
            if !self.held[&s].ending {
                self.end_clean(s, ShardEnd::Shutdown);
            }
        }
        let until = Instant::now() + self.config.lease_ttl;
        while !self.held.is_empty() {
            match tokio::time::timeout_at(until, self.reports.recv()).await {
                Ok(Some(r)) => self.report(r).await,
                _ => break,
            }
        }
        for (s, h) in std::mem::take(&mut self.held) {
            self.store.unfence(s);
            self.release(s, h.epoch).await;
            self.metrics
                .ends
                .with_label_values(&[ShardEnd::Shutdown.as_str()])
                .inc();
        }
        self.metrics.held.set(0);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One shard's life on this node: the host's `claimed`, then (when it succeeded) waiting
/// for the end and the host's `ended`. A dropped stop sender (the controller gone, as
/// after kill -9) ends the task without telling the host.
async fn shard_task<H: ShardHost>(
    host: Arc<H>,
    fence: Fence,
    stop: oneshot::Receiver<ShardEnd>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let (shard, epoch) = (fence.shard, fence.epoch);
    /// Reports the task's end however it ends (a panic in the host included).
    struct Finish(ShardId, mpsc::UnboundedSender<Report>);
    impl Drop for Finish {
        fn drop(&mut self) {
            let _ = self.1.send(Report::Finished { shard: self.0 });
        }
    }
    let _finish = Finish(shard, reports.clone());
    let result = host.claimed(shard, fence).await;
    let ok = result.is_ok();
    let _ = reports.send(Report::Claimed {
        shard,
        epoch,
        result,
    });
    if !ok {
        return;
    }
    let Ok(cause) = stop.await else {
        return;
    };
    host.ended(shard, cause, cause.is_clean()).await;
    if cause.is_clean() {
        let _ = reports.send(Report::Ended {
            shard,
            epoch,
            cause,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatch_engine::shard::WHOLE_CITY;

    #[test]
    fn the_margin_is_a_tenth_of_the_lease_and_at_least_50_ms() {
        assert_eq!(
            safety_margin(Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(
            safety_margin(Duration::from_millis(500)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn a_service_area_is_covered_by_its_shards_and_bad_ones_are_refused() {
        let shards = service_area_shards("45.45,-73.70,45.60,-73.50").unwrap();
        // ~16.7 km × ~15.6 km: ~260 km², 7 or so shards of 36 km², more with the rim.
        assert!((6..40).contains(&shards.len()), "{}", shards.len());
        let fine = service_area_shards_at("45.45,-73.70,45.60,-73.50", Grid::new(9).unwrap());
        let grid = Grid::new(9).unwrap();
        for (lat, lng) in [(45.45, -73.70), (45.60, -73.50), (45.52, -73.61)] {
            assert!(
                shards.contains(&shard_at(lat, lng).unwrap()),
                "({lat}, {lng})"
            );
            let p = Point::new(lat, lng).unwrap();
            let s = dispatch_engine::shard::shard_of_point(grid, p);
            assert!(fine.as_ref().unwrap().contains(&s), "({lat}, {lng})");
        }
        assert!(shards.iter().all(|s| *s > ENTITY_SHARDS));
        assert_eq!(
            service_area_shards("45.60,-73.50,45.45,-73.70").unwrap(),
            shards,
            "either pair of opposite corners"
        );
        for bad in [
            "",
            "1,2,3",
            "1,2,3,4,5",
            "a,b,c,d",
            "95,0,96,1",
            "45,-73,45,-72",
            "0,-179,1,179",
            "-60,-170,60,170",
            "NaN,1,2,3",
        ] {
            let e = service_area_shards(bad).unwrap_err();
            assert!(e.starts_with("--service-area"), "{bad}: {e}");
        }
    }

    /// `shard_at` is where a dispatchd of the default `--h3-resolution` puts a trip picked
    /// up at the point (its actors' `shard_of_pickup`), also where that is not the point's
    /// own resolution-6 cell; and a service area of ~100 m around such a point names it.
    #[test]
    fn shard_at_is_the_shard_the_actors_use_near_a_border_too() {
        let (g6, g7) = (Grid::new(6).unwrap(), Grid::new(7).unwrap());
        let (lat, lng) = (0..5_000)
            .map(|i| (45.50, -73.60 + f64::from(i) * 0.00026))
            .find(|(lat, lng)| {
                let p = Point::new(*lat, *lng).unwrap();
                dispatch_engine::shard::shard_of(g6.cell_of(p))
                    != dispatch_engine::shard::shard_of_point(g7, p)
            })
            .expect("a point near a border");
        let p = Point::new(lat, lng).unwrap();
        let actors = dispatch_engine::shard::shard_of_point(g7, p);
        assert_eq!(shard_at(lat, lng), Some(actors));
        let area = format!(
            "{},{},{},{}",
            lat - 0.0005,
            lng - 0.0005,
            lat + 0.0005,
            lng + 0.0005
        );
        let shards = service_area_shards(&area).unwrap();
        assert!(shards.contains(&actors), "{shards:?} lacks {actors}");
    }

    #[test]
    fn a_slot_reads_not_held_claiming_and_ready() {
        let s = ShardSlot::new();
        assert_eq!(s.readiness(), Readiness::NotHeld);
        assert!(!s.serving());
        s.set(Readiness::Claiming);
        s.clock.extend(Instant::now() + Duration::from_secs(5));
        assert_eq!(s.readiness(), Readiness::Claiming);
        assert!(!s.serving(), "not before it is ready");
        s.set(Readiness::Ready(7));
        assert_eq!(s.readiness(), Readiness::Ready(7));
        assert!(s.serving());
        s.clock.stop();
        assert!(!s.serving(), "not past its clock");
        let view = ShardView::new();
        assert!(view.slot(WHOLE_CITY).is_some() && view.slot(ENTITY_SHARDS).is_some());
        let cell = 0x0862_8d55_ffff_ffff;
        assert!(view.slot(cell).is_none());
        view.add_cells(&[cell].into_iter().collect());
        assert_eq!(view.readiness(cell), Readiness::NotHeld);
    }
}
