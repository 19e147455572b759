//! The handle the transport holds: configuration, the registry, the store, metrics, the
//! clock and the group supervisors, with the operations that are not one actor's
//! business (registration, quotes, searches across cells, position snapshots).

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use dispatch_engine::{
    Candidate, CellId, DispatchConfig, DriverId, DriverProfile, DriverStatus, EtaModel, Grid,
    PaymentTerms, Point, Product, QuoteId, RateCards, RiderId, RiderProfile, RingSearch,
    SearchParams, SearchStats, StraightLineEta, SurgeBook, SurgeConfig, TripId,
};
use dispatch_persistence::{Batch, Store, StoredDriver, StoredRider};
use ractor::concurrency::oneshot;
use ractor::{Actor, ActorCell, ActorRef, RpcReplyPort};

use crate::cell::{CellArgs, CellMsg, SearchFilter};
use crate::clock::Clock;
use crate::driver::DriverArgs;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::payments::{Books, LocalProvider, PaymentProvider, ProviderMode};
use crate::registry::{DriverRecord, Identity, Registry, RiderRecord};
use crate::rider::RiderArgs;
use crate::session::{SessionHandle, SessionInbox};
use crate::supervisor::{Group, Spawn, Supervisor, SupervisorMsg};
use crate::views::{NearbyDriver, Quote, TripView};

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
    /// How often moved drivers' positions are written to the store.
    pub snapshot_interval_ms: u64,
    /// Caps for `GET /v1/drivers/nearby`.
    pub nearby_max_radius_m: f64,
    pub nearby_max_limit: usize,
    /// Commission, cancellation grace and no-show wait.
    pub payments: PaymentTerms,
    /// What the in-process payment provider does at start.
    pub provider_mode: ProviderMode,
    pub surge: SurgeConfig,
    /// How often surge multipliers are recomputed.
    pub surge_update_ms: u64,
    /// Test hook (`DISPATCH_TEST_CRASH_AFTER=capture`): abort the process right after the
    /// provider captured a fare and before the ledger entry is written.
    pub crash_after_capture: bool,
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
            snapshot_interval_ms: 5_000,
            nearby_max_radius_m: 5_000.0,
            nearby_max_limit: 50,
            payments: PaymentTerms::default(),
            provider_mode: ProviderMode::Approve,
            surge: SurgeConfig::default(),
            surge_update_ms: 10_000,
            crash_after_capture: false,
        }
    }
}

pub struct Inner {
    pub config: SystemConfig,
    pub registry: Registry,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// Drivers whose position changed since the last snapshot.
    pub moved: DashMap<DriverId, ()>,
    supervisors: OnceLock<[ActorRef<SupervisorMsg>; 4]>,
    next_session: AtomicU64,
    /// The prices new quotes are made with: `config.rates` until an operator changes
    /// them (`System::set_pricing`).
    rates: std::sync::RwLock<Arc<RateCards>>,
    /// The card processor.
    pub provider: Arc<dyn PaymentProvider>,
    /// The in-process provider, when it is the one in use (its mode can be changed).
    pub local_provider: Option<Arc<LocalProvider>>,
    /// Ledger balances and drivers' earnings (entries are in the store).
    pub books: Mutex<Books>,
    pub surge: Mutex<SurgeBook>,
    /// One operator's refund at a time (a refund's number is the count of earlier ones).
    pub refunds: tokio::sync::Mutex<()>,
}

/// A cheap, cloneable handle to the running system.
#[derive(Clone)]
pub struct System(Arc<Inner>);

impl Deref for System {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// A handle that does not keep the system alive (for background tasks).
#[derive(Clone)]
pub struct WeakSystem(std::sync::Weak<Inner>);

impl WeakSystem {
    pub fn upgrade(&self) -> Option<System> {
        self.0.upgrade().map(System)
    }
}

/// 128 random bits as an id suffix.
pub fn random_suffix() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn unavailable(e: dispatch_persistence::StoreError) -> ApiError {
    tracing::error!(error = %e, "store write failed");
    ApiError::unavailable("the write could not be stored; retry")
}

impl DriverRecord {
    /// The durable part of a driver.
    pub fn stored(&self) -> StoredDriver {
        StoredDriver {
            id: self.id.clone(),
            profile: self.profile.clone(),
            token_hash: self.token_hash,
            status: self.status.clone(),
            position: self.position,
            heading: self.heading,
        }
    }
}

impl System {
    /// Starts the group supervisors over an open store. Nothing is loaded: call
    /// [`System::recover`] before serving clients.
    pub async fn start(
        config: SystemConfig,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
    ) -> Result<System, ApiError> {
        let local = Arc::new(LocalProvider::new(store.clone(), config.provider_mode));
        let sys = System(Arc::new(Inner {
            provider: local.clone(),
            local_provider: Some(local),
            books: Mutex::new(Books::default()),
            surge: Mutex::new(SurgeBook::new(config.surge)),
            refunds: tokio::sync::Mutex::new(()),
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
        let mut sups = Vec::new();
        for group in Group::ALL {
            let (r, _) = Actor::spawn(
                None,
                Supervisor {
                    group,
                    system: sys.clone(),
                },
                (),
            )
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("supervisor: {e}")))?;
            sups.push(r);
        }
        let sups: [ActorRef<SupervisorMsg>; 4] =
            sups.try_into().map_err(|_| ApiError::internal())?;
        let _ = sys.supervisors.set(sups);
        Ok(sys)
    }

    pub fn lock_surge(&self) -> std::sync::MutexGuard<'_, SurgeBook> {
        self.surge.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lock_books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ledger entry is on disk: count it and add it to the live balances.
    pub fn entry_written(&self, e: &dispatch_engine::Entry) {
        self.metrics
            .ledger_entries
            .with_label_values(&[e.key.step.kind()])
            .inc();
        self.lock_books().add(e);
    }

    /// The surge cell of a point: the parent of its matching cell, so that quotes, demand,
    /// supply and the admin cell table agree (H3 is not exactly nested).
    pub fn surge_cell_of(&self, p: Point) -> CellId {
        self.config.surge.surge_cell(self.config.grid.cell_of(p))
    }

    /// A ride was requested at `pickup`: demand for surge.
    pub fn record_request(&self, pickup: Point) {
        let (cell, now) = (self.surge_cell_of(pickup), self.clock.now_ms());
        self.lock_surge().record_request_in(cell, now);
    }

    /// Recomputes surge from the requests in the window and the drivers available now.
    pub fn update_surge(&self) {
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

    /// Puts the operator's stored surge pins and cap back (recovery).
    pub fn restore_surge(&self, sg: &dispatch_persistence::StoredSurge) {
        let mut book = self.lock_surge();
        for (cell, m) in &sg.pins {
            match CellId::try_from(*cell) {
                Ok(c) => {
                    if let Err(e) = book.pin(c, Some(*m)) {
                        tracing::warn!(cell = %c, error = %e, "stored surge pin ignored");
                    }
                }
                Err(_) => tracing::warn!(cell, "stored surge pin for an invalid cell ignored"),
            }
        }
        if let Err(e) = book.set_city_cap(sg.city_cap) {
            tracing::warn!(error = %e, "stored surge cap ignored");
        }
    }

    /// The rate cards new quotes are priced with.
    pub fn rates(&self) -> Arc<RateCards> {
        self.rates.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn replace_rates(&self, rates: RateCards) {
        *self.rates.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rates);
    }

    pub fn downgrade(&self) -> WeakSystem {
        WeakSystem(Arc::downgrade(&self.0))
    }

    fn supervisor(&self, group: Group) -> &ActorRef<SupervisorMsg> {
        let i = Group::ALL
            .iter()
            .position(|g| *g == group)
            .expect("every group has a supervisor");
        &self.supervisors.get().expect("started")[i]
    }

    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.config.actor_call_timeout_ms)
    }

    /// Spawns an actor under its group's supervisor.
    pub async fn spawn(&self, group: Group, spawn: Spawn) -> Result<ActorCell, ApiError> {
        match self
            .supervisor(group)
            .call(
                |r| SupervisorMsg::Spawn(spawn, r),
                Some(self.call_timeout()),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(Ok(cell))) => Ok(cell),
            Ok(ractor::rpc::CallResult::Success(Err(e))) => {
                tracing::error!(group = group.as_str(), error = %e, "spawn failed");
                Err(ApiError::internal())
            }
            _ => Err(ApiError::unavailable("the system is busy or shutting down")),
        }
    }

    /// Spawns many actors of one group in one supervisor message (recovery).
    pub async fn spawn_many(&self, group: Group, spawns: Vec<Spawn>) -> Result<usize, ApiError> {
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
    pub async fn actor_count(&self, group: Group) -> usize {
        match self
            .supervisor(group)
            .call(SupervisorMsg::Count, Some(self.call_timeout()))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(n)) => n,
            _ => 0,
        }
    }

    pub fn new_session(&self) -> (SessionHandle, SessionInbox) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        SessionHandle::new(id, self.config.ws_outbound_queue_max, self.metrics.clone())
    }

    pub fn authenticate(&self, token_hash: &[u8; 32]) -> Option<Identity> {
        self.registry.tokens.get(token_hash).map(|i| i.clone())
    }

    /// Registers a driver; durable before it returns.
    pub async fn register_driver(
        &self,
        profile: DriverProfile,
        token_hash: [u8; 32],
    ) -> Result<DriverId, ApiError> {
        let id = DriverId::with_suffix(&random_suffix());
        let record = DriverRecord {
            id: id.clone(),
            profile,
            token_hash,
            status: DriverStatus::Offline,
            position: None,
            heading: None,
            cell: None,
            offer: None,
            trip: None,
            session: None,
            session_epoch: 0,
        };
        self.store
            .commit(Batch::new().driver(record.stored()))
            .await
            .map_err(unavailable)?;
        self.registry
            .driver_records
            .insert(id.clone(), record.clone());
        self.spawn(
            Group::Driver,
            Spawn::Driver(DriverArgs {
                record,
                restarted: false,
            }),
        )
        .await?;
        self.registry
            .tokens
            .insert(token_hash, Identity::Driver(id.clone()));
        Ok(id)
    }

    /// Registers a rider; durable before it returns.
    pub async fn register_rider(
        &self,
        profile: RiderProfile,
        token_hash: [u8; 32],
    ) -> Result<RiderId, ApiError> {
        let id = RiderId::with_suffix(&random_suffix());
        let stored = StoredRider {
            id: id.clone(),
            profile: profile.clone(),
            token_hash,
        };
        self.store
            .commit(Batch::new().rider(stored))
            .await
            .map_err(unavailable)?;
        let record = RiderRecord {
            id: id.clone(),
            profile,
            token_hash,
            trip: None,
            position: None,
            session: None,
        };
        self.registry
            .rider_records
            .insert(id.clone(), record.clone());
        self.spawn(
            Group::Rider,
            Spawn::Rider(RiderArgs {
                record,
                restarted: false,
            }),
        )
        .await?;
        self.registry
            .tokens
            .insert(token_hash, Identity::Rider(id.clone()));
        Ok(id)
    }

    /// The upfront price of a trip, kept for `quote_ttl_ms` for this rider; durable
    /// before it returns.
    pub async fn quote(
        &self,
        rider_id: RiderId,
        pickup: Point,
        dropoff: Point,
        product: Product,
    ) -> Result<Quote, ApiError> {
        let quote = self.price(rider_id, pickup, dropoff, product);
        self.store
            .commit(Batch::new().quote(quote.clone()))
            .await
            .map_err(unavailable)?;
        self.registry
            .quotes
            .insert(quote.quote_id.clone(), quote.clone());
        Ok(quote)
    }

    /// Prices a trip now, without keeping the quote.
    pub fn price(
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

    /// Drops quotes that expired more than a TTL ago (they answer `quote_expired` until
    /// then), from memory and from the store.
    pub fn sweep_quotes(&self) -> usize {
        let cutoff = self.clock.now_ms().saturating_sub(self.config.quote_ttl_ms);
        let mut gone = Batch::new();
        let mut n = 0;
        self.registry.quotes.retain(|id, q| {
            let keep = q.expires_at_ms > cutoff;
            if !keep {
                gone = std::mem::take(&mut gone).delete_quote(id.clone());
                n += 1;
            }
            keep
        });
        if let Err(e) = self.store.write(gone) {
            tracing::warn!(error = %e, "could not delete expired quotes");
        }
        n
    }

    /// A trip's current view: live trips from memory, finished ones from the store.
    pub async fn trip_view(&self, id: &TripId) -> Result<Option<TripView>, ApiError> {
        if let Some(v) = self.registry.trip_views.get(id) {
            return Ok(Some(v.clone()));
        }
        let store = self.store.clone();
        let id = id.clone();
        let stored = tokio::task::spawn_blocking(move || store.trip(&id))
            .await
            .map_err(|_| ApiError::internal())?
            .map_err(|e| {
                tracing::error!(error = %e, "trip read failed");
                ApiError::internal()
            })?;
        Ok(stored.map(|t| TripView::of(&t.trip, t.driver)))
    }

    /// Remembers that a driver moved; the next snapshot writes its position.
    pub fn driver_moved(&self, id: &DriverId, position: Point, heading: Option<f64>) {
        if let Some(mut r) = self.registry.driver_records.get_mut(id) {
            r.position = Some(position);
            r.heading = heading;
        }
        self.moved.insert(id.clone(), ());
    }

    /// Writes the positions of drivers that moved since the last call (no fsync wait:
    /// positions between snapshots are not durable, by design).
    pub fn snapshot_positions(&self) -> usize {
        let ids: Vec<DriverId> = self.moved.iter().map(|e| e.key().clone()).collect();
        let mut batch = Batch::new();
        for id in &ids {
            self.moved.remove(id);
            if let Some(r) = self.registry.driver_records.get(id) {
                batch = batch.driver(r.stored());
            }
        }
        let n = batch.len();
        if let Err(e) = self.store.write(batch) {
            tracing::warn!(error = %e, "position snapshot failed");
        }
        n
    }

    /// A driver's actor, started on demand: recovery starts actors only for drivers that
    /// are online, and an offline driver's actor starts when its app connects.
    pub async fn driver_actor(&self, id: &DriverId) -> Option<ActorRef<crate::driver::DriverMsg>> {
        if let Some(a) = self.registry.driver(id) {
            return Some(a);
        }
        let record = self.registry.driver_records.get(id).map(|r| r.clone())?;
        self.spawn(
            Group::Driver,
            Spawn::Driver(DriverArgs {
                record,
                restarted: false,
            }),
        )
        .await
        .ok()?;
        self.registry.driver(id)
    }

    /// A rider's actor, started on demand (riders without an active trip have none after
    /// recovery until their app connects).
    pub async fn rider_actor(&self, id: &RiderId) -> Option<ActorRef<crate::rider::RiderMsg>> {
        if let Some(a) = self.registry.rider(id) {
            return Some(a);
        }
        let record = self.registry.rider_records.get(id).map(|r| r.clone())?;
        self.spawn(
            Group::Rider,
            Spawn::Rider(RiderArgs {
                record,
                restarted: false,
            }),
        )
        .await
        .ok()?;
        self.registry.rider(id)
    }

    /// The cell's actor, spawning it when the first driver enters the cell.
    pub async fn cell_actor(&self, cell: CellId) -> Option<ActorRef<CellMsg>> {
        if let Some(a) = self.registry.cell(&cell) {
            return Some(a);
        }
        self.spawn(
            Group::Cell,
            Spawn::Cell(CellArgs {
                cell,
                restarted: false,
            }),
        )
        .await
        .ok()?;
        self.registry.cell(&cell)
    }

    /// Searches the pickup's cell and its rings through the cell actors: each ring's
    /// cells are asked at once, and only cells that hold drivers have an actor to ask.
    pub async fn search(
        &self,
        pickup: Point,
        params: SearchParams,
        filter: SearchFilter,
    ) -> (Vec<Candidate>, SearchStats) {
        let mut s = RingSearch::new(self.config.grid, pickup, params);
        while let Some(ring) = s.next_cells() {
            let mut pending = Vec::new();
            for cell in ring {
                if let Some(actor) = self.registry.cell(&cell) {
                    let (tx, rx) = oneshot();
                    let msg = CellMsg::Query {
                        pickup,
                        k: params.k,
                        max_radius_m: params.max_radius_m,
                        filter: filter.clone(),
                        reply: RpcReplyPort::from(tx),
                    };
                    if actor.cast(msg).is_ok() {
                        pending.push(rx);
                    }
                }
            }
            for rx in pending {
                match tokio::time::timeout(self.call_timeout(), rx).await {
                    Ok(Ok((found, examined))) => s.add(found, examined),
                    _ => self.metrics.bound_hit("cell_query_timeout"),
                }
            }
        }
        let (found, stats) = s.finish();
        let m = &self.metrics;
        m.search_requests.inc();
        m.search_cells.inc_by(u64::from(stats.cells_searched));
        m.search_drivers_examined.inc_by(stats.drivers_examined);
        if stats.hit_ring_cap {
            m.search_ring_cap.inc();
        }
        (found, stats)
    }

    /// Available drivers near a point, without ids.
    pub async fn nearby(
        &self,
        at: Point,
        radius_m: f64,
        limit: usize,
        product: Option<Product>,
    ) -> Vec<NearbyDriver> {
        let params = SearchParams {
            k: limit.min(self.config.nearby_max_limit),
            max_radius_m: radius_m.min(self.config.nearby_max_radius_m),
            max_rings: self.config.search.max_rings,
        };
        let filter = SearchFilter {
            product,
            available_only: true,
            exclude: Arc::default(),
        };
        let (found, _) = self.search(at, params, filter).await;
        found
            .into_iter()
            .map(|c| NearbyDriver {
                position: c.driver.position,
                heading: c.driver.heading,
                product: c.driver.product,
                distance_m: c.distance_m.round() as u64,
            })
            .collect()
    }

    /// Stops every actor (each group's children, then the supervisors), writes the last
    /// positions and waits until everything queued is on disk.
    pub async fn shutdown(&self) {
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
