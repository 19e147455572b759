//! What every actor holds: configuration, the registry, the store, the payment provider,
//! the books, surge, metrics and the clock, with the operations actors share (spawning
//! under a supervisor, searching across cell actors, asking the payment provider, pricing).
//! The transport never sees it: it goes through the [`System`](crate::system::System)
//! facade.

use std::ops::Deref;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use dispatch_engine::shard::{ShardId, WHOLE_CITY, entity_shard, shard_of, shard_of_point};
use dispatch_engine::{
    Candidate, CellId, DispatchConfig, DriverId, DriverStatus, EtaModel, Grid, PaymentTerms, Point,
    Product, ProviderAnswer, QuoteId, RateCards, RiderId, RingSearch, SearchParams, SearchStats,
    StraightLineEta, SurgeBook, SurgeConfig, TripId, TripRules,
};
use dispatch_persistence::{Batch, Fence, Store, StoredTrip};
use ractor::concurrency::oneshot;
use ractor::{ActorCell, ActorRef, RpcReplyPort};

use crate::clock::Clock;
use crate::error::ApiError;
use crate::messages::{
    CellArgs, CellMsg, DriverArgs, DriverMsg, Group, RiderArgs, RiderMsg, SearchFilter, Spawn,
    SupervisorMsg,
};
use crate::metrics::Metrics;
use crate::payments::{Books, LocalProvider, PayFuture, PaymentError, PaymentProvider};
use crate::registry::Registry;
use crate::tracecontext::Trace;
use crate::views::{Quote, TripView};

/// An actor being started: a boxed future, so that what awaits it stays small.
type Starting<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Option<ActorCell>, ApiError>> + Send + 'a>>;

/// The most reads of failed trips from the store in flight at once, by default (the
/// supervisor reads them back; it lives here so that `context` imports no actor). A store
/// outage fails every trip that writes meanwhile, and each is read back, again and again
/// until the store answers: without a cap, thousands of reads (and as many blocking
/// threads, each held up to the store's call timeout) against a database that is down.
/// Reads past it wait their turn (counted in
/// `dispatch_bound_hits_total{bound="trip_reload_reads"}`); a trip is never dropped for
/// it. Eight keep the reads of a large outage draining at the store's pace without
/// hogging its connections.
pub const TRIP_RELOAD_READS_MAX: usize = 8;

/// Everything the live system is configured with. Units are in the names.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    pub grid: Grid,
    pub search: SearchParams,
    pub dispatch: DispatchConfig,
    pub rates: RateCards,
    pub eta: Arc<dyn EtaModel>,
    /// How long a driver whose session dropped keeps its status.
    pub session_grace_ms: u64,
    /// How long an upfront quote can be used.
    pub quote_ttl_ms: u64,
    /// The most often a rider is sent its driver's position.
    pub driver_location_interval_ms: u64,
    /// Capacity of each session's outbound queue, in messages.
    pub ws_outbound_queue_max: usize,
    /// How long one actor waits for another's answer.
    pub actor_call_timeout_ms: u64,
    /// How long one search waits for all the cell actors it asks, whatever the rings.
    pub search_timeout_ms: u64,
    /// How long one request to the payment provider may take.
    pub payment_timeout_ms: u64,
    /// How often moved drivers' positions are written to the store.
    pub snapshot_interval_ms: u64,
    /// How often quotes that expired more than a TTL ago are deleted.
    pub quote_sweep_interval_ms: u64,
    /// Caps for `GET /v1/drivers/nearby`.
    pub nearby_max_radius_m: f64,
    pub nearby_max_limit: usize,
    /// Commission, cancellation grace and no-show wait.
    pub payments: PaymentTerms,
    /// What the in-process payment provider does at start.
    pub provider_mode: crate::payments::ProviderMode,
    pub surge: SurgeConfig,
    /// How often surge multipliers are recomputed.
    pub surge_update_ms: u64,
    /// Test hook (`DISPATCH_TEST_CRASH_AFTER=capture`): abort the process right after the
    /// provider captured a fare and before the ledger entry is written.
    pub crash_after_capture: bool,
    /// Greedy, or batched with a window (`--matching`, `--match-window-ms`). `dispatchd`'s
    /// default is batched, 2 s windows (issue 17); [`SystemConfig::default`] keeps greedy,
    /// so that the actors' tests and benchmarks that build a system directly see offers at
    /// once (those of batched matching say so: `tests/batch.rs`).
    pub matching: crate::batch::Matching,
    /// The bounds of one window's assignment (batched matching).
    pub batch: dispatch_engine::BatchParams,
    /// The most reads of failed trips from the store in flight at once
    /// ([`TRIP_RELOAD_READS_MAX`]); not a flag.
    pub trip_reload_reads_max: usize,
    /// Test hook, not a flag: while set, a read of a failed trip that holds one of the
    /// permits above waits for a permit of this too (added by the test), so a test can
    /// hold reads in flight and count them.
    pub test_hold_trip_reloads: Option<Arc<tokio::sync::Semaphore>>,
    /// Sharded mode (issue 16 stage 4, docs/sharding.md §1/§4), off by default; not a flag
    /// yet. Off: every write names `WHOLE_CITY`, as a single node and today's single
    /// leader do. On: every write names its owner's shard (see [`Context::shard_of_trip`]
    /// and the others), a driver's accept requires the fence this node holds for the
    /// driver's shard, and commands for an entity whose shard this node does not serve
    /// are refused `unavailable`.
    pub sharded: bool,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            grid: Grid::new(7).expect("7 is a valid resolution"),
            search: SearchParams::default(),
            dispatch: DispatchConfig::default(),
            rates: RateCards::default(),
            eta: Arc::new(StraightLineEta::default()),
            session_grace_ms: 30_000,
            quote_ttl_ms: 120_000,
            driver_location_interval_ms: 1_000,
            ws_outbound_queue_max: 256,
            actor_call_timeout_ms: 5_000,
            search_timeout_ms: 2_000,
            payment_timeout_ms: 5_000,
            snapshot_interval_ms: 5_000,
            quote_sweep_interval_ms: 30_000,
            nearby_max_radius_m: 5_000.0,
            nearby_max_limit: 50,
            payments: PaymentTerms::default(),
            provider_mode: crate::payments::ProviderMode::Approve,
            surge: SurgeConfig::default(),
            surge_update_ms: 10_000,
            crash_after_capture: false,
            matching: crate::batch::Matching::Greedy,
            batch: dispatch_engine::BatchParams::default(),
            trip_reload_reads_max: TRIP_RELOAD_READS_MAX,
            test_hold_trip_reloads: None,
            sharded: false,
        }
    }
}

impl SystemConfig {
    /// How long a driver or rider actor keeps a command's responder for a trip's answer
    /// (a trip may be waiting on a search, an offer reservation and the provider).
    pub fn ticket_timeout(&self) -> Duration {
        Duration::from_millis(
            self.search_timeout_ms + 2 * self.actor_call_timeout_ms + self.payment_timeout_ms,
        ) + self.matching_wait()
    }

    /// The longest a trip's search waits for its batch window (zero when greedy).
    pub fn matching_wait(&self) -> Duration {
        match self.matching {
            crate::batch::Matching::Greedy => Duration::ZERO,
            crate::batch::Matching::Batch { window_ms } => {
                Duration::from_millis(window_ms) + crate::batch::SOLVE_BOUND
            }
        }
    }
}

pub struct Inner {
    pub(crate) config: SystemConfig,
    pub(crate) registry: Registry,
    pub(crate) store: Arc<Store>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) clock: Clock,
    /// Drivers whose position changed since the last snapshot.
    pub(crate) moved: DashMap<DriverId, ()>,
    pub(crate) supervisors: OnceLock<[ActorRef<SupervisorMsg>; 4]>,
    pub(crate) next_session: AtomicU64,
    /// The prices new quotes are made with: `config.rates` until an operator changes them.
    rates: std::sync::RwLock<Arc<RateCards>>,
    /// The card processor.
    pub(crate) provider: Arc<dyn PaymentProvider>,
    /// The in-process provider, when it is the one in use (its mode can be changed).
    pub(crate) local_provider: Option<Arc<LocalProvider>>,
    /// Ledger balances and drivers' earnings (entries are in the store).
    pub(crate) books: Mutex<Books>,
    /// Batched matching's window task, started by the first trip that needs it.
    batcher: OnceLock<crate::batch::Batcher>,
    /// Batched matching: the trips that wait for a driver to free up near them.
    pub(crate) waiting: crate::waiting::WaitingTrips,
    pub(crate) surge: Mutex<SurgeBook>,
    /// One operator's refund at a time (a refund's number is the count of earlier ones).
    pub(crate) refunds: tokio::sync::Mutex<()>,
    /// Sharded mode: the shards this node serves now (recovered and not ended).
    pub(crate) serving: dashmap::DashSet<ShardId>,
    /// Sharded mode: which node each shard lives on, and the link to them (stage 5).
    pub(crate) placement: crate::placement::Placement,
}

/// A cheap, cloneable handle to the shared state of the live system.
#[derive(Clone)]
pub struct Context(Arc<Inner>);

impl Deref for Context {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// A handle that does not keep the system alive (for background tasks).
#[derive(Clone)]
pub struct WeakContext(std::sync::Weak<Inner>);

impl WeakContext {
    pub fn upgrade(&self) -> Option<Context> {
        self.0.upgrade().map(Context)
    }
}

/// Where a new trip starts ([`Context::trip_home`]).
pub(crate) enum TripHome<'a> {
    /// On this node, under its trip supervisor (single node, and every trip before stage 5).
    Here,
    /// On this node, which the placement names as the pickup's shard's (stage 5): started
    /// only while the shard is served here, for `System::end_shard` may be ending it.
    Owned,
    /// On this node of the cluster, asked through its router.
    There(Arc<str>, &'a Arc<dyn crate::placement::Link>),
    /// No node holds the pickup's shard now.
    Nobody,
}

/// How much longer than a search's deadline its remote cell calls may wait.
const REMOTE_MARGIN: Duration = Duration::from_millis(250);

/// 128 random bits as an id suffix.
pub fn random_suffix() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Context {
    /// The shared state over an open store, with `provider` as the card processor (the
    /// in-process one when `None`). Supervisors are attached by `boot`.
    pub(crate) fn new(
        config: SystemConfig,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
        provider: Option<Arc<dyn PaymentProvider>>,
    ) -> Context {
        let local = Arc::new(LocalProvider::new(store.clone(), config.provider_mode));
        let (provider, local_provider): (Arc<dyn PaymentProvider>, _) = match provider {
            Some(p) => (p, None),
            None => (local.clone(), Some(local)),
        };
        let sharded = config.sharded;
        let ctx = Context(Arc::new(Inner {
            provider,
            local_provider,
            books: Mutex::new(Books::default()),
            batcher: OnceLock::new(),
            waiting: Default::default(),
            surge: Mutex::new(SurgeBook::new(config.surge)),
            refunds: tokio::sync::Mutex::new(()),
            serving: Default::default(),
            placement: Default::default(),
            registry: Registry::default(),
            store,
            metrics,
            clock: Clock::new(),
            moved: DashMap::new(),
            supervisors: OnceLock::new(),
            next_session: AtomicU64::new(1),
            rates: std::sync::RwLock::new(Arc::new(config.rates.clone())),
            config,
        }));
        if sharded && let Some(local) = &ctx.local_provider {
            let weak = ctx.downgrade();
            local.shard_records_by(Arc::new(move |key| {
                weak.upgrade()
                    .map_or(WHOLE_CITY, |c| c.shard_of_provider_key(key))
            }));
        }
        ctx
    }

    /// The shard of an in-process provider record (`<trip id>:<step>`): its trip's, from
    /// the live trip here or else the stored trip (blocking; a finished trip's refund).
    /// A key naming no trip known anywhere stays `WHOLE_CITY`'s.
    fn shard_of_provider_key(&self, key: &str) -> ShardId {
        let id = TripId::new(key.split(':').next().unwrap_or(key));
        if let Some(r) = self.registry.trip_records.get(&id) {
            return self.shard_of_trip(&r.trip);
        }
        match self.store.trip(&id) {
            Ok(Some(t)) => self.shard_of_trip(&t.trip),
            _ => WHOLE_CITY,
        }
    }

    /// The batcher (batched matching), started on first use on the current runtime.
    pub(crate) fn batcher(&self, window_ms: u64) -> &crate::batch::Batcher {
        self.batcher.get_or_init(|| {
            // Weak: the batcher's task must not keep the context alive.
            let weak = self.downgrade();
            let free: crate::batch::Free = {
                let weak = weak.clone();
                Arc::new(move |d| weak.upgrade().is_none_or(|c| c.driver_free(d)))
            };
            let lookup: crate::batch::Lookup = Arc::new(move |q: crate::batch::Query| {
                let weak = weak.clone();
                Box::pin(async move {
                    let Some(ctx) = weak.upgrade() else {
                        return Vec::new();
                    };
                    let filter = SearchFilter {
                        product: Some(q.product),
                        available_only: true,
                        exclude: q.exclude,
                    };
                    let params = ctx.config.search;
                    let (found, _) = ctx.search(q.pickup, params, filter, q.trace).await;
                    crate::batch::options(ctx.config.eta.as_ref(), q.pickup, q.product, found)
                })
            });
            let (params, metrics) = (self.config.batch, self.metrics.clone());
            crate::batch::Batcher::start(window_ms, params, metrics, free, lookup)
        })
    }

    /// A cell saw `driver` become available (batched matching): the nearest trip that
    /// waits for a driver near it is handed the driver, at once (see [`crate::waiting`]).
    pub(crate) fn driver_freed(&self, driver: &dispatch_engine::IndexedDriver) {
        if self.waiting.is_empty() {
            return;
        }
        let radius = self.config.search.max_radius_m;
        let eta = self.config.eta.as_ref();
        let handed = self
            .waiting
            .hand(driver, radius, eta, |t| self.registry.trip(t).is_some());
        self.metrics.batch_waiting.set(self.waiting.len() as i64);
        let Some(h) = handed else {
            return;
        };
        let driver_id = h.candidate.driver.driver_id.clone();
        let sent = match self.registry.trip(&h.trip_id) {
            Some(trip) => trip.cast(crate::messages::TripMsg::DriverFreed(h)).is_ok(),
            None => false,
        };
        if !sent {
            // The trip stopped since: the driver is free for the next one.
            self.waiting.settled(&driver_id);
            self.driver_freed(driver);
        }
    }

    /// Whether a driver is free to be offered a trip now, by its actor's last committed
    /// record (the cell index, which searches read, follows it a little later).
    /// A driver of a shard on another node (sharded mode with a placement) has no record
    /// here: the index's word is taken, and its actor's `ReserveOffer` stays the final
    /// check (a refusal leaves it out of that trip's searches, as for a local one).
    pub(crate) fn driver_free(&self, d: &dispatch_engine::DriverId) -> bool {
        if self.remote_of(self.shard_of_driver(d)).is_some() {
            return true;
        }
        self.registry.driver_records.get(d).is_some_and(|r| {
            r.status == dispatch_engine::DriverStatus::Available && r.session.is_some()
        })
    }

    // -----------------------------------------------------------------------------------
    // Which shard a write names (docs/sharding.md §1): decided here only, never at a call
    // site. With `sharded` off every one is `WHOLE_CITY`, exactly as before stage 4.
    // -----------------------------------------------------------------------------------

    /// The shard of a trip picked up at `pickup` (its trip, journal, ledger and provider
    /// records): `shard_of` its pickup's cell.
    pub(crate) fn shard_of_pickup(&self, pickup: Point) -> ShardId {
        if !self.config.sharded {
            return WHOLE_CITY;
        }
        shard_of_point(self.config.grid, pickup)
    }

    /// The shard of a trip's writes.
    pub(crate) fn shard_of_trip(&self, t: &dispatch_engine::Trip) -> ShardId {
        self.shard_of_pickup(t.pickup)
    }

    /// The shard of a driver's record: `entity_shard(id)`.
    pub(crate) fn shard_of_driver(&self, id: &DriverId) -> ShardId {
        if !self.config.sharded {
            return WHOLE_CITY;
        }
        entity_shard(id.as_str())
    }

    /// The shard of a rider's record and quotes: `entity_shard(id)`.
    pub(crate) fn shard_of_rider(&self, id: &RiderId) -> ShardId {
        if !self.config.sharded {
            return WHOLE_CITY;
        }
        entity_shard(id.as_str())
    }

    /// What a trip's commit of an accept by `driver` requires (docs/sharding.md §3): off,
    /// nothing; on, the fence this node holds for the driver's shard, or `Err` when it
    /// holds none (the driver's actor lives elsewhere: stage 5 has the command carry the
    /// fence; until then the accept is refused, never written unfenced).
    ///
    /// `carried`: the fence a driver's command from another node carried (stage 5): the
    /// sending node's of the driver's shard, required as it is (a stale one: the store
    /// refuses the commit); a carried fence of another shard is ignored.
    pub(crate) fn accept_fence(
        &self,
        driver: &DriverId,
        carried: Option<&Fence>,
    ) -> Result<Option<Fence>, ()> {
        if !self.config.sharded {
            return Ok(None);
        }
        let shard = self.shard_of_driver(driver);
        if let Some(f) = carried.filter(|f| f.shard == shard) {
            return Ok(Some(f.clone()));
        }
        match self.own_fence(shard) {
            Some(f) => Ok(Some(f)),
            None => {
                self.metrics.shard_refused("accept_unfenced");
                Err(())
            }
        }
    }

    /// The node `shard` lives on when that is another node (sharded mode with a
    /// placement set and a router started); `None`: local, as before stage 5.
    pub(crate) fn remote_of(
        &self,
        shard: ShardId,
    ) -> Option<(Arc<str>, &Arc<dyn crate::placement::Link>)> {
        if !self.config.sharded {
            return None;
        }
        self.placement.remote(shard)
    }

    /// The node of `cell`'s shard when that is another node (as [`Context::remote_of`]).
    pub(crate) fn remote_of_cell(
        &self,
        cell: CellId,
    ) -> Option<(Arc<str>, &Arc<dyn crate::placement::Link>)> {
        self.remote_of(shard_of(cell))
    }

    /// Takes driver `id` out of `cell`'s index: through its node's router when the cell's
    /// shard is on another node (stage 5), else in the cell here (none running: nothing
    /// to take out). Every path that ends a driver's place in a cell goes through here, so
    /// no cell on another node keeps offering a driver whose actor is gone.
    pub(crate) fn unindex_driver(&self, id: &DriverId, cell: CellId) {
        let remove = CellMsg::Remove(id.clone());
        if let Some((node, link)) = self.remote_of_cell(cell) {
            link.cell(&node, cell, remove, None);
        } else if let Some(a) = self.registry.cell(&cell) {
            let _ = a.cast(remove);
        }
    }

    /// Where a new trip picked up at `pickup` starts (docs/sharding.md §5): here, unless
    /// sharded mode with a placement set and a router started places the pickup's shard
    /// on another node, or on none.
    pub(crate) fn trip_home(&self, pickup: Point) -> TripHome<'_> {
        if !self.config.sharded {
            return TripHome::Here;
        }
        match self.placement.place(self.shard_of_pickup(pickup)) {
            None => TripHome::Here,
            Some((crate::placement::Place::Local, _)) => TripHome::Owned,
            Some((crate::placement::Place::Remote(node), link)) => TripHome::There(node, link),
            Some((crate::placement::Place::Nobody, _)) => TripHome::Nobody,
        }
    }

    /// This node's fence of `shard`, if it holds one.
    pub(crate) fn own_fence(&self, shard: ShardId) -> Option<Fence> {
        self.store.fences().into_iter().find(|f| f.shard == shard)
    }

    /// Casts `m` to driver `id`: through its node's router when its shard is on another
    /// node (stage 5), else to its actor here (none running: dropped, as before).
    pub(crate) fn tell_driver(&self, id: &DriverId, m: DriverMsg) {
        if let Some((node, link)) = self.remote_of(self.shard_of_driver(id)) {
            link.driver(&node, id.clone(), m);
        } else if let Some(a) = self.registry.driver(id) {
            let _ = a.cast(m);
        }
    }

    /// Casts `m` to rider `id`, as [`Context::tell_driver`].
    pub(crate) fn tell_rider(&self, id: &RiderId, m: RiderMsg) {
        if let Some((node, link)) = self.remote_of(self.shard_of_rider(id)) {
            link.rider(&node, id.clone(), m);
        } else if let Some(a) = self.registry.rider(id) {
            let _ = a.cast(m);
        }
    }

    /// Whether this node serves `shard` now: always with `sharded` off; on, once it was
    /// recovered here and until it ends (`System::set_serving`).
    pub(crate) fn serves(&self, shard: ShardId) -> bool {
        !self.config.sharded || self.serving.contains(&shard)
    }

    /// `Ok` when this node serves the shard of `who`; otherwise counted
    /// (`dispatch_shard_refused_total{cause="not_served"}`) and `unavailable` (retry: the
    /// shard is being recovered here, or its sessions should reconnect to its owner).
    pub(crate) fn check_served(&self, who: &crate::records::Identity) -> Result<(), ApiError> {
        match who {
            crate::records::Identity::Driver(id) => self.check_driver_served(id),
            crate::records::Identity::Rider(id) => self.check_rider_served(id),
        }
    }

    /// [`Context::check_served`] for a driver (no copy of its id: every command asks).
    pub(crate) fn check_driver_served(&self, id: &DriverId) -> Result<(), ApiError> {
        self.check_shard_served(self.shard_of_driver(id))
    }

    /// [`Context::check_served`] for a rider.
    pub(crate) fn check_rider_served(&self, id: &RiderId) -> Result<(), ApiError> {
        self.check_shard_served(self.shard_of_rider(id))
    }

    fn check_shard_served(&self, shard: ShardId) -> Result<(), ApiError> {
        if self.serves(shard) {
            return Ok(());
        }
        self.metrics.shard_refused("not_served");
        Err(ApiError::unavailable(
            "this node does not serve this account now; retry",
        ))
    }

    pub fn downgrade(&self) -> WeakContext {
        WeakContext(Arc::downgrade(&self.0))
    }

    pub(crate) fn lock_surge(&self) -> std::sync::MutexGuard<'_, SurgeBook> {
        self.surge.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ledger entry is on disk: count it and add it to the live balances.
    pub(crate) fn entry_written(&self, e: &dispatch_engine::Entry) {
        self.metrics
            .ledger_entries
            .with_label_values(&[e.key.step.kind()])
            .inc();
        self.lock_books().add(e);
    }

    /// The surge cell of a point: the parent of its matching cell, so that quotes, demand,
    /// supply and the admin cell table agree (H3 is not exactly nested).
    pub(crate) fn surge_cell_of(&self, p: Point) -> CellId {
        self.config.surge.surge_cell(self.config.grid.cell_of(p))
    }

    /// A ride was requested at `pickup`: demand for surge.
    pub(crate) fn record_request(&self, pickup: Point) {
        let (cell, now) = (self.surge_cell_of(pickup), self.clock.now_ms());
        self.lock_surge().record_request_in(cell, now);
    }

    /// Recomputes surge from the requests in the window and the drivers available now.
    pub(crate) fn update_surge(&self) {
        let mut supply: std::collections::HashMap<CellId, u32> = std::collections::HashMap::new();
        let now = self.clock.now_ms();
        for d in self.registry.driver_records.iter() {
            if d.status == DriverStatus::Available
                && let Some(p) = d.position
            {
                *supply.entry(self.surge_cell_of(p)).or_default() += 1;
            }
        }
        let mut book = self.lock_surge();
        book.update(now, supply);
        let surging = book.cells().iter().filter(|c| c.multiplier > 1.0).count();
        self.metrics.surge_cells.set(surging as i64);
    }

    /// The rate cards new quotes are priced with.
    pub(crate) fn rates(&self) -> Arc<RateCards> {
        self.rates.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn replace_rates(&self, rates: RateCards) {
        *self.rates.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rates);
    }

    /// The rules a trip of `product` is decided under now.
    pub(crate) fn trip_rules(&self, product: Product) -> (DispatchConfig, PaymentTerms, i64) {
        let fee = self.rates().card(product).cancellation_fee_cents;
        (self.config.dispatch, self.config.payments, fee)
    }

    /// Runs `f` with the rules a trip of `product` is decided under now.
    pub(crate) fn with_rules<T>(&self, product: Product, f: impl FnOnce(&TripRules<'_>) -> T) -> T {
        let (dispatch, payments, fee) = self.trip_rules(product);
        f(&TripRules {
            dispatch: &dispatch,
            eta: self.config.eta.as_ref(),
            payments: &payments,
            cancellation_fee_cents: fee,
        })
    }

    fn supervisor(&self, group: Group) -> &ActorRef<SupervisorMsg> {
        let i = Group::ALL
            .iter()
            .position(|g| *g == group)
            .expect("every group has a supervisor");
        &self.supervisors.get().expect("started")[i]
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.actor_call_timeout_ms)
    }

    /// Spawns an actor under its group's supervisor.
    pub(crate) async fn spawn(&self, group: Group, spawn: Spawn) -> Result<ActorCell, ApiError> {
        self.ask_supervisor(group, |r| SupervisorMsg::Spawn(spawn, r))
            .await
    }

    /// Spawns an actor on demand (`SupervisorMsg::SpawnServed`): `Ok(None)` when its
    /// shard is not served here (sharded mode), so none runs.
    pub(crate) async fn spawn_served(
        &self,
        group: Group,
        spawn: Spawn,
    ) -> Result<Option<ActorCell>, ApiError> {
        self.ask_supervisor(group, |r| SupervisorMsg::SpawnServed(spawn, r))
            .await
    }

    /// One spawn through a group's supervisor, bounded by the call timeout.
    async fn ask_supervisor<T: Send + 'static>(
        &self,
        group: Group,
        msg: impl FnOnce(ractor::RpcReplyPort<Result<T, String>>) -> SupervisorMsg,
    ) -> Result<T, ApiError> {
        match self
            .supervisor(group)
            .call(msg, Some(self.call_timeout()))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Ok(v))) => Ok(v),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => {
                tracing::error!(group = group.as_str(), error = %e, "spawn failed");
                Err(ApiError::internal())
            }
            _ => Err(ApiError::unavailable("the system is busy or shutting down")),
        }
    }

    /// Spawns many actors of one group in one supervisor message (recovery).
    pub(crate) async fn spawn_many(
        &self,
        group: Group,
        spawns: Vec<Spawn>,
    ) -> Result<usize, ApiError> {
        let timeout = Some(Duration::from_secs(600));
        match self
            .supervisor(group)
            .call(|r| SupervisorMsg::SpawnMany(spawns, r), timeout)
            .await
        {
            Ok(ractor::rpc::CallResult::Success(n)) => Ok(n),
            _ => Err(ApiError::unavailable("the system is busy or shutting down")),
        }
    }

    /// How many actors a group's supervisor is watching.
    pub(crate) async fn actor_count(&self, group: Group) -> usize {
        match self
            .supervisor(group)
            .call(SupervisorMsg::Count, Some(self.call_timeout()))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(n)) => n,
            _ => 0,
        }
    }

    /// Prices a trip now, without keeping the quote.
    pub(crate) fn price(
        &self,
        rider_id: RiderId,
        pickup: Point,
        dropoff: Point,
        product: Product,
    ) -> Quote {
        let now = self.clock.now_ms();
        let route = self.config.eta.estimate(pickup, dropoff);
        let cell = self.surge_cell_of(pickup);
        let surge = self.lock_surge().multiplier(cell);
        self.metrics.quote_surge.observe(surge);
        let fare = self.rates().quote(product, route, surge);
        Quote {
            quote_id: QuoteId::with_suffix(&random_suffix()),
            rider_id,
            product,
            pickup,
            dropoff,
            fare_cents: fare.fare_cents,
            currency: fare.currency,
            surge: fare.surge,
            distance_m: fare.distance_m,
            duration_s: fare.duration_s,
            expires_at_ms: now + self.config.quote_ttl_ms,
        }
    }

    /// Commits `batch` (durable when it returns); a failure is logged and answered
    /// `unavailable` ("the `what` could not be stored; retry").
    pub(crate) async fn commit(&self, batch: Batch, what: &'static str) -> Result<(), ApiError> {
        self.store.commit(batch).await.map_err(|e| {
            tracing::error!(error = %e, "{what} not stored");
            ApiError::unavailable(format!("the {what} could not be stored; retry"))
        })
    }

    /// A read of the store, off the async workers; a failure is logged as `what` and
    /// answered `internal`.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Store) -> Result<T, dispatch_persistence::StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(|e| {
                tracing::error!(error = %e, "{what} read failed");
                use dispatch_persistence::StoreError as E;
                match e {
                    // The database is out of reach for now (PostgreSQL lost, sled being
                    // reopened): a retry can succeed.
                    E::Postgres { .. } | E::Unavailable { .. } | E::Closed => {
                        ApiError::unavailable(format!("the {what} could not be read; retry"))
                    }
                    _ => ApiError::internal(),
                }
            })
    }

    /// A trip as the store holds it (finished trips live there only). A trip being
    /// reloaded after its actor failed is not judged from the store: `unavailable`.
    pub(crate) async fn stored_trip(&self, id: &TripId) -> Result<Option<StoredTrip>, ApiError> {
        if self.registry.reloading.contains(id) {
            return Err(crate::error::trip_reloading());
        }
        let id = id.clone();
        self.read("trip", move |s| s.trip(&id)).await
    }

    /// A trip's current view: live trips from memory, finished ones from the store.
    pub(crate) async fn trip_view(&self, id: &TripId) -> Result<Option<TripView>, ApiError> {
        if let Some(v) = self.registry.trip_views.get(id) {
            return Ok(Some(v.clone()));
        }
        Ok(self
            .stored_trip(id)
            .await?
            .map(|t| TripView::of(&t.trip, t.driver)))
    }

    /// Remembers that a driver moved; the next snapshot writes its position.
    pub(crate) fn driver_moved(&self, id: &DriverId, position: Point, heading: Option<f64>) {
        if let Some(mut r) = self.registry.driver_records.get_mut(id) {
            r.position = Some(position);
            r.heading = heading;
        }
        // Most pings come from a driver already marked since the last snapshot.
        if !self.moved.contains_key(id) {
            self.moved.insert(id.clone(), ());
        }
    }

    /// Writes the positions of drivers that moved since the last call (no fsync wait:
    /// positions between snapshots are not durable, by design).
    pub(crate) fn snapshot_positions(&self) -> usize {
        let ids: Vec<DriverId> = self.moved.iter().map(|e| e.key().clone()).collect();
        let mut batch = Batch::new();
        for id in &ids {
            self.moved.remove(id);
            if let Some(r) = self.registry.driver_records.get(id) {
                batch = batch.then_in(self.shard_of_driver(id)).driver(r.stored());
            }
        }
        let n = batch.len();
        if let Err(e) = self.store.write(batch) {
            tracing::warn!(error = %e, "position snapshot failed");
        }
        n
    }

    /// Drops quotes that expired more than a TTL ago (they answer `quote_expired` until
    /// then), from memory and from the store.
    pub(crate) fn sweep_quotes(&self) -> usize {
        let cutoff = self.clock.now_ms().saturating_sub(self.config.quote_ttl_ms);
        let mut gone = Batch::new();
        let mut n = 0;
        self.registry.quotes.retain(|id, q| {
            let keep = q.expires_at_ms > cutoff;
            if !keep {
                gone = std::mem::take(&mut gone)
                    .then_in(self.shard_of_rider(&q.rider_id))
                    .delete_quote(id.clone());
                n += 1;
            }
            keep
        });
        if let Err(e) = self.store.write(gone) {
            tracing::warn!(error = %e, "could not delete expired quotes");
        }
        n
    }

    /// An entity's actor: the one `get` finds, or one started under its group's
    /// supervisor from `start` (nothing to start: `None`).
    async fn on_demand<M: ractor::Message>(
        &self,
        group: Group,
        get: impl Fn() -> Option<ActorRef<M>>,
        start: impl FnOnce() -> Option<Spawn>,
    ) -> Option<ActorRef<M>> {
        if let Some(a) = get() {
            return Some(a);
        }
        // Boxed: starting an actor is a ~5 KiB future, and an unboxed one would make every
        // future that may await this one (a ping's re-index, every driver actor's handler,
        // a session's attach) that large, for as long as its task lives: per driver and
        // per session, even though the actor is started once. Boxed by a plain function,
        // so that the start arguments (~900 bytes) are not kept in this future either.
        let starting = self.spawn_boxed(group, start)?;
        starting.await.ok()??;
        get()
    }

    fn spawn_boxed(
        &self,
        group: Group,
        start: impl FnOnce() -> Option<Spawn>,
    ) -> Option<Starting<'_>> {
        Some(Box::pin(self.spawn_served(group, start()?)))
    }

    /// A driver's actor, started on demand: recovery starts actors only for drivers that
    /// are online, and an offline driver's actor starts when its app connects.
    pub(crate) async fn driver_actor(&self, id: &DriverId) -> Option<ActorRef<DriverMsg>> {
        let start = || {
            let record = self.registry.driver_records.get(id)?.clone();
            Some(Spawn::Driver(DriverArgs {
                record,
                restarted: false,
                recovered: false,
            }))
        };
        self.on_demand(Group::Driver, || self.registry.driver(id), start)
            .await
    }

    /// A rider's actor, started on demand (riders without an active trip have none after
    /// recovery until their app connects).
    pub(crate) async fn rider_actor(&self, id: &RiderId) -> Option<ActorRef<RiderMsg>> {
        let start = || {
            let record = self.registry.rider_records.get(id)?.clone();
            Some(Spawn::Rider(RiderArgs {
                record,
                restarted: false,
            }))
        };
        self.on_demand(Group::Rider, || self.registry.rider(id), start)
            .await
    }

    /// The cell's actor, spawning it when the first driver enters the cell.
    pub(crate) async fn cell_actor(&self, cell: CellId) -> Option<ActorRef<CellMsg>> {
        let start = || {
            Some(Spawn::Cell(CellArgs {
                cell,
                restarted: false,
            }))
        };
        self.on_demand(Group::Cell, || self.registry.cell(&cell), start)
            .await
    }

    /// Searches the pickup's cell and its rings through the cell actors: each ring's
    /// cells are asked at once, and only cells that hold drivers have an actor to ask.
    /// The whole search has one deadline (`search_timeout_ms`): a cell that has not
    /// answered by then is counted (`cell_query_timeout`) and left out, and no further
    /// ring is asked, so a stuck cell costs a search at most one deadline.
    pub(crate) async fn search(
        &self,
        pickup: Point,
        params: SearchParams,
        filter: SearchFilter,
        trace: Trace,
    ) -> (Vec<Candidate>, SearchStats) {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.search_timeout_ms);
        let mut s = RingSearch::new(self.config.grid, pickup, params);
        let mut late = false;
        let mut crossed = false;
        while !late && let Some(ring) = s.next_cells() {
            let mut pending = Vec::new();
            for cell in ring {
                // Cells no closer than the k-th candidate so far (or beyond the radius)
                // are not asked: none of their drivers could be chosen.
                let (remote, local) = match self.remote_of_cell(cell) {
                    Some(r) => (Some(r), None),
                    None => (None, self.registry.cell(&cell)),
                };
                if (remote.is_none() && local.is_none()) || !s.worth_querying(cell) {
                    continue;
                }
                let (tx, rx) = oneshot();
                let msg = CellMsg::Query {
                    pickup,
                    k: params.k,
                    // The k-th found in the rings before bounds this one's cells.
                    max_radius_m: s.query_radius_m(),
                    filter: filter.clone(),
                    trace,
                    reply: RpcReplyPort::from(tx),
                };
                // A cell of a shard on another node (docs/sharding.md §5) is asked through
                // that node's router, under the same deadline; its filter crosses as
                // `IndexedDriver` fields and the exclude list only.
                let sent = match (remote, local) {
                    (Some((node, link)), _) => {
                        crossed = true;
                        // A little past the deadline: the search's own wait ends first
                        // and counts the cell as late (`cell_query_timeout`).
                        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                        link.cell(&node, cell, msg, Some(left + REMOTE_MARGIN))
                    }
                    (None, Some(actor)) => actor.cast(msg).is_ok(),
                    (None, None) => false,
                };
                if sent {
                    pending.push(rx);
                }
            }
            for rx in pending {
                match tokio::time::timeout_at(deadline, rx).await {
                    Ok(Ok((found, examined))) => s.add(found, examined),
                    Ok(Err(_)) => {} // the cell stopped (it restarts empty)
                    Err(_) => {
                        late = true;
                        self.metrics.bound_hit("cell_query_timeout");
                    }
                }
            }
        }
        let (found, stats) = s.finish();
        let m = &self.metrics;
        m.search_requests.inc();
        if crossed {
            m.search_cross_border.inc();
        }
        m.search_cells.inc_by(u64::from(stats.cells_searched));
        m.search_drivers_examined.inc_by(stats.drivers_examined);
        if stats.hit_ring_cap {
            m.search_ring_cap.inc();
        }
        (found, stats)
    }

    /// One request to the payment provider, bounded by `payment_timeout_ms` and counted
    /// when it does not go through. A provider that does not answer in time is
    /// [`PaymentError::TimedOut`].
    pub(crate) async fn ask_provider(
        &self,
        request: &'static str,
        call: PayFuture<'_>,
    ) -> Result<(), PaymentError> {
        let after_ms = self.config.payment_timeout_ms;
        let r = match tokio::time::timeout(Duration::from_millis(after_ms), call).await {
            Ok(r) => r,
            Err(_) => Err(PaymentError::TimedOut { request, after_ms }),
        };
        if let Err(e) = &r {
            self.metrics
                .payment_failures
                .with_label_values(&[request, e.outcome()])
                .inc();
        }
        r
    }

    /// The provider request of a payment plan, as the engine's answer.
    pub(crate) async fn pay(&self, plan: &dispatch_engine::PaymentPlan) -> ProviderAnswer {
        let Some((request, key, amount)) = plan.request() else {
            return ProviderAnswer::Approved;
        };
        let p = &self.provider;
        let call = match plan {
            dispatch_engine::PaymentPlan::Authorize { .. } => p.authorize(key, amount),
            dispatch_engine::PaymentPlan::Release { .. } => p.release(key),
            _ => p.capture(key, amount),
        };
        match self.ask_provider(request, call).await {
            Ok(()) => ProviderAnswer::Approved,
            Err(PaymentError::Declined(why)) => ProviderAnswer::Declined(why),
            Err(e) => ProviderAnswer::Unavailable(e.to_string()),
        }
    }

    /// Stops every actor (each group's children, then the supervisors), writes the last
    /// positions and waits until everything queued is on disk.
    pub(crate) async fn shutdown(&self) {
        if let Some(sups) = self.supervisors.get() {
            let wait = Some(self.call_timeout());
            for s in sups {
                s.stop_children_and_wait(Some("shutdown".into()), wait)
                    .await;
            }
            for s in sups {
                let _ = s.stop_and_wait(Some("shutdown".into()), wait).await;
            }
        }
        self.snapshot_positions();
        if let Err(e) = self.store.sync().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}
