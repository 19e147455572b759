//! The handle the transport holds: configuration, the registry, metrics, the clock and
//! the group supervisors, with the operations that are not one actor's business
//! (registration, quotes, searches across cells).

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dispatch_engine::{
    Candidate, CellId, DispatchConfig, DriverId, DriverStatus, EtaModel, Grid, Point, Product,
    QuoteId, RateCards, RiderId, RingSearch, SearchParams, SearchStats, StraightLineEta, TripId,
};
use ractor::concurrency::oneshot;
use ractor::{Actor, ActorCell, ActorRef, RpcReplyPort};

use crate::cell::{CellArgs, CellMsg, SearchFilter};
use crate::clock::Clock;
use crate::driver::DriverArgs;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::{DriverRecord, Identity, Registry, RiderRecord};
use crate::rider::RiderArgs;
use crate::session::{SessionHandle, SessionInbox};
use crate::supervisor::{Group, Spawn, Supervisor, SupervisorMsg};
use crate::views::{DriverProfile, NearbyDriver, Quote, RiderProfile, TripView};

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
    /// Caps for `GET /v1/drivers/nearby`.
    pub nearby_max_radius_m: f64,
    pub nearby_max_limit: usize,
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
            nearby_max_radius_m: 5_000.0,
            nearby_max_limit: 50,
        }
    }
}

pub struct Inner {
    pub config: SystemConfig,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    supervisors: OnceLock<[ActorRef<SupervisorMsg>; 4]>,
    next_session: AtomicU64,
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

/// 128 random bits as an id suffix.
pub fn random_suffix() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl System {
    /// Starts the group supervisors. Actors are spawned under them as entities appear.
    pub async fn start(config: SystemConfig, metrics: Arc<Metrics>) -> Result<System, ApiError> {
        let sys = System(Arc::new(Inner {
            config,
            registry: Registry::default(),
            metrics,
            clock: Clock::new(),
            supervisors: OnceLock::new(),
            next_session: AtomicU64::new(1),
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
            .map_err(|e| ApiError::new(crate::ErrorCode::Internal, format!("supervisor: {e}")))?;
            sups.push(r);
        }
        let sups: [ActorRef<SupervisorMsg>; 4] =
            sups.try_into().map_err(|_| ApiError::internal())?;
        let _ = sys.supervisors.set(sups);
        Ok(sys)
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

    pub async fn register_rider(
        &self,
        profile: RiderProfile,
        token_hash: [u8; 32],
    ) -> Result<RiderId, ApiError> {
        let id = RiderId::with_suffix(&random_suffix());
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

    /// The upfront price of a trip, remembered for `quote_ttl_ms` for this rider.
    pub fn quote(
        &self,
        rider_id: RiderId,
        pickup: Point,
        dropoff: Point,
        product: Product,
    ) -> Quote {
        let now = self.clock.now_ms();
        let route = self.config.eta.estimate(pickup, dropoff);
        let fare = self.config.rates.quote(product, route, 1.0);
        let quote = Quote {
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
        };
        self.registry
            .quotes
            .insert(quote.quote_id.clone(), quote.clone());
        quote
    }

    /// Drops quotes that expired more than a TTL ago (they answer `quote_expired` until then).
    pub fn sweep_quotes(&self) -> usize {
        let cutoff = self.clock.now_ms().saturating_sub(self.config.quote_ttl_ms);
        let before = self.registry.quotes.len();
        self.registry.quotes.retain(|_, q| q.expires_at_ms > cutoff);
        before - self.registry.quotes.len()
    }

    pub fn trip_view(&self, id: &TripId) -> Option<TripView> {
        self.registry.trip_views.get(id).map(|v| v.clone())
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

    /// Stops every actor: each group's children, then the supervisors. Riders and
    /// drivers go before trips, and cells last, so nothing is left waiting on them.
    pub async fn shutdown(&self) {
        let Some(sups) = self.supervisors.get() else {
            return;
        };
        let wait = Some(self.call_timeout());
        for s in sups {
            s.stop_children_and_wait(Some("shutdown".into()), wait)
                .await;
        }
        for s in sups {
            let _ = s.stop_and_wait(Some("shutdown".into()), wait).await;
        }
    }
}
