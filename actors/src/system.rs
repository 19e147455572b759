//! `System`: the typed facade the transport calls. Registration, quotes, sessions
//! (attach, commands, detach), trip reads, nearby drivers and shutdown; the admin
//! console's reads and writes are in [`admin`](crate::admin), start-up in
//! [`boot`](crate::boot), recovery in [`recovery`](crate::recovery). Actors hold the
//! [`Context`] behind it; the registry's maps are theirs alone.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dispatch_engine::{
    CellId, DriverId, DriverProfile, DriverStatus, Point, Product, RateCards, RiderId,
    RiderProfile, SearchParams, TripId,
};
use dispatch_persistence::{Batch, StoredRider};
use ractor::ActorRef;

use crate::context::{Context, SystemConfig, random_suffix};
use crate::error::ApiError;
use crate::messages::{
    CellMsg, DriverArgs, DriverCommand, DriverMsg, Group, RiderArgs, RiderCommand, RiderMsg,
    SearchFilter, Spawn, TripMsg,
};
use crate::payments::{Books, LocalProvider};
use crate::records::{DriverRecord, Identity, RiderRecord, TripRecord};
use crate::session::{Responder, SessionHandle, SessionInbox};
use crate::tracecontext::Trace;
use crate::views::{NearbyDriver, Quote, TripView};

/// A cheap, cloneable handle to the running system.
#[derive(Clone)]
pub struct System {
    pub(crate) ctx: Context,
}

impl System {
    pub fn config(&self) -> &SystemConfig {
        &self.ctx.config
    }

    /// The metrics every actor records into.
    /// What keeps the store from answering, if anything (`/readyz` says it); never a
    /// password.
    pub fn store_problem(&self) -> Option<String> {
        self.ctx.store.problem()
    }

    /// Copies the store's count of calls that hit their time bound into
    /// `dispatch_bound_hits_total{bound="store_call_timeout"}`, and of group commits tried
    /// again after a deadlock or a serialization failure (PostgreSQL) into
    /// `{bound="store_write_retry"}` (at scrape time).
    pub fn count_store_timeouts(&self) {
        let store = &self.ctx.store;
        for (bound, now) in [
            ("store_call_timeout", store.timeouts()),
            ("store_write_retry", store.write_retries()),
        ] {
            let c = self.ctx.metrics.bounds_hit.with_label_values(&[bound]);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.ctx.metrics
    }

    /// Unix milliseconds, by the system's clock.
    pub fn now_ms(&self) -> u64 {
        self.ctx.clock.now_ms()
    }

    pub fn call_timeout(&self) -> Duration {
        self.ctx.call_timeout()
    }

    /// The rate cards new quotes are priced with.
    pub fn rates(&self) -> Arc<RateCards> {
        self.ctx.rates()
    }

    /// Ledger balances and drivers' earnings.
    pub fn lock_books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.ctx.lock_books()
    }

    pub fn lock_surge(&self) -> std::sync::MutexGuard<'_, dispatch_engine::SurgeBook> {
        self.ctx.lock_surge()
    }

    /// The in-process payment provider, when it is the one in use.
    pub fn local_provider(&self) -> Option<&Arc<LocalProvider>> {
        self.ctx.local_provider.as_ref()
    }

    pub fn new_session(&self) -> (SessionHandle, SessionInbox) {
        let id = self.ctx.next_session.fetch_add(1, Ordering::Relaxed);
        SessionHandle::new(
            id,
            self.ctx.config.ws_outbound_queue_max,
            self.ctx.metrics.clone(),
        )
    }

    pub fn authenticate(&self, token_hash: &[u8; 32]) -> Option<Identity> {
        self.ctx.registry.tokens.get(token_hash).map(|i| i.clone())
    }

    /// Registers a driver; durable before it returns.
    pub async fn register_driver(
        &self,
        profile: DriverProfile,
        token_hash: [u8; 32],
    ) -> Result<DriverId, ApiError> {
        let id = DriverId::with_suffix(&random_suffix());
        self.register_driver_as(id, profile, token_hash).await
    }

    /// Whether `who` names a registered rider or driver (for identities that come from
    /// outside, such as a JWT's claims, rather than from a token this server minted).
    pub fn is_registered(&self, who: &Identity) -> bool {
        match who {
            Identity::Driver(id) => self.ctx.registry.driver_records.contains_key(id),
            Identity::Rider(id) => self.ctx.registry.rider_records.contains_key(id),
        }
    }

    /// Registers a driver under an id chosen by the caller (a JWT's); `conflict` if one
    /// is registered under it already. The caller keeps two registrations of one id from
    /// running at once.
    pub async fn register_driver_as(
        &self,
        id: DriverId,
        profile: DriverProfile,
        token_hash: [u8; 32],
    ) -> Result<DriverId, ApiError> {
        let ctx = &self.ctx;
        if self.is_registered(&Identity::Driver(id.clone())) {
            return Err(ApiError::conflict(
                "a driver is registered under this id already",
            ));
        }
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
        let shard = ctx.shard_of_driver(&id);
        ctx.commit(Batch::in_shard(shard).driver(record.stored()), "write")
            .await?;
        ctx.registry
            .driver_records
            .insert(id.clone(), record.clone());
        let args = DriverArgs {
            record,
            restarted: false,
            recovered: false,
        };
        self.enrol(
            Spawn::Driver(args),
            token_hash,
            Identity::Driver(id.clone()),
        )
        .await?;
        Ok(id)
    }

    /// Registers a rider; durable before it returns.
    pub async fn register_rider(
        &self,
        profile: RiderProfile,
        token_hash: [u8; 32],
    ) -> Result<RiderId, ApiError> {
        let id = RiderId::with_suffix(&random_suffix());
        self.register_rider_as(id, profile, token_hash).await
    }

    /// Registers a rider under an id chosen by the caller; see [`Self::register_driver_as`].
    pub async fn register_rider_as(
        &self,
        id: RiderId,
        profile: RiderProfile,
        token_hash: [u8; 32],
    ) -> Result<RiderId, ApiError> {
        let ctx = &self.ctx;
        if self.is_registered(&Identity::Rider(id.clone())) {
            return Err(ApiError::conflict(
                "a rider is registered under this id already",
            ));
        }
        let stored = StoredRider {
            id: id.clone(),
            profile: profile.clone(),
            token_hash,
        };
        let shard = ctx.shard_of_rider(&id);
        ctx.commit(Batch::in_shard(shard).rider(stored), "write")
            .await?;
        let record = RiderRecord {
            id: id.clone(),
            profile,
            token_hash,
            trip: None,
            position: None,
            session: None,
        };
        ctx.registry
            .rider_records
            .insert(id.clone(), record.clone());
        let args = RiderArgs {
            record,
            restarted: false,
        };
        self.enrol(Spawn::Rider(args), token_hash, Identity::Rider(id.clone()))
            .await?;
        Ok(id)
    }

    /// A registered, durable entity's actor starts; only then does its token work.
    async fn enrol(
        &self,
        spawn: Spawn,
        token_hash: [u8; 32],
        who: Identity,
    ) -> Result<(), ApiError> {
        let group = match who {
            Identity::Driver(_) => Group::Driver,
            Identity::Rider(_) => Group::Rider,
        };
        self.ctx.spawn(group, spawn).await?;
        self.ctx.registry.tokens.insert(token_hash, who);
        Ok(())
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
        self.ctx.check_rider_served(&rider_id)?;
        let shard = self.ctx.shard_of_rider(&rider_id);
        let quote = self.ctx.price(rider_id, pickup, dropoff, product);
        self.ctx
            .commit(Batch::in_shard(shard).quote(quote.clone()), "write")
            .await?;
        self.ctx
            .registry
            .quotes
            .insert(quote.quote_id.clone(), quote.clone());
        Ok(quote)
    }

    /// A trip's current view: live trips from memory, finished ones from the store.
    pub async fn trip_view(&self, id: &TripId) -> Result<Option<TripView>, ApiError> {
        self.ctx.trip_view(id).await
    }

    /// Available drivers near a point, without ids.
    pub async fn nearby(
        &self,
        at: Point,
        radius_m: f64,
        limit: usize,
        product: Option<Product>,
    ) -> Vec<NearbyDriver> {
        let cfg = &self.ctx.config;
        let params = SearchParams {
            k: limit.min(cfg.nearby_max_limit),
            max_radius_m: radius_m.min(cfg.nearby_max_radius_m),
            max_rings: cfg.search.max_rings,
        };
        let filter = SearchFilter {
            product,
            available_only: true,
            exclude: Default::default(),
        };
        let (found, _) = self.ctx.search(at, params, filter, None).await;
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

    /// Attaches a new session to the driver or rider (starting its actor if it has
    /// none); true once `welcome` is queued as the session's first message.
    /// Sharded mode: `false` (counted) while this node does not serve the entity's shard.
    pub async fn attach(&self, who: &Identity, session: SessionHandle) -> bool {
        if self.ctx.check_served(who).is_err() {
            return false;
        }
        let timeout = self.call_timeout();
        match who {
            Identity::Driver(id) => match self.ctx.driver_actor(id).await {
                Some(a) => call(&a, |r| DriverMsg::Attach(session, r), timeout).await,
                None => None,
            },
            Identity::Rider(id) => match self.ctx.rider_actor(id).await {
                Some(a) => call(&a, |r| RiderMsg::Attach(session, r), timeout).await,
                None => None,
            },
        }
        .is_some()
    }

    /// The session ended (its actor ignores it if a newer one took over).
    pub fn detach(&self, who: &Identity, session_id: u64) {
        let reg = &self.ctx.registry;
        match who {
            Identity::Driver(id) => {
                if let Some(a) = reg.driver(id) {
                    let _ = a.cast(DriverMsg::Detach { session_id });
                }
            }
            Identity::Rider(id) => {
                if let Some(a) = reg.rider(id) {
                    let _ = a.cast(RiderMsg::Detach { session_id });
                }
            }
        }
    }

    /// A driver's command, answered through `responder` (a lost one answers `internal`);
    /// `trace`: the session's span for it, if it is a step of a traced ride.
    pub fn driver_command(
        &self,
        id: &DriverId,
        cmd: DriverCommand,
        responder: Responder,
        trace: Trace,
    ) {
        if let Err(e) = self.ctx.check_driver_served(id) {
            return responder.fail(e);
        }
        match self.ctx.registry.driver(id) {
            Some(a) => {
                let _ = a.cast(DriverMsg::Command(cmd, responder, trace));
            }
            None => responder.fail(ApiError::internal()),
        }
    }

    /// A rider's command, answered through `responder`; `trace` as for a driver's.
    pub fn rider_command(
        &self,
        id: &RiderId,
        cmd: RiderCommand,
        responder: Responder,
        trace: Trace,
    ) {
        if let Err(e) = self.ctx.check_rider_served(id) {
            return responder.fail(e);
        }
        match self.ctx.registry.rider(id) {
            Some(a) => {
                let _ = a.cast(RiderMsg::Command(cmd, responder, trace));
            }
            None => responder.fail(ApiError::internal()),
        }
    }

    /// Stops every actor, writes the last positions and flushes the store.
    pub async fn shutdown(&self) {
        self.ctx.shutdown().await
    }

    // -----------------------------------------------------------------------------------
    // For tests of the live system: reads of actors' own state and fault hooks.
    // -----------------------------------------------------------------------------------

    /// Makes a cell actor answer nothing for `d`, as a cell stuck on a slow host would.
    pub fn stall_cell(&self, cell: CellId, d: Duration) -> bool {
        self.ctx
            .registry
            .cell(&cell)
            .is_some_and(|a| a.cast(CellMsg::InjectStall(d)).is_ok())
    }

    /// The cells that have an actor (hold or held drivers).
    pub fn cell_ids(&self) -> Vec<CellId> {
        self.ctx.registry.cells.iter().map(|c| *c.key()).collect()
    }

    /// (available, total) drivers in a cell's index, if it has an actor.
    pub async fn cell_count(&self, cell: CellId) -> Option<(usize, usize)> {
        let a = self.ctx.registry.cell(&cell)?;
        call(&a, CellMsg::Count, self.call_timeout()).await
    }

    /// A live trip as its actor holds it now.
    pub async fn trip_state(&self, id: &TripId) -> Option<TripRecord> {
        let a = self.ctx.registry.trip(id)?;
        call(&a, TripMsg::Get, self.call_timeout()).await
    }

    /// The actor of a driver, rider, trip or cell, to send it messages directly (tests,
    /// tools). `None` while it has none.
    pub fn driver_ref(&self, id: &DriverId) -> Option<ActorRef<DriverMsg>> {
        self.ctx.registry.driver(id)
    }
    pub fn rider_ref(&self, id: &RiderId) -> Option<ActorRef<RiderMsg>> {
        self.ctx.registry.rider(id)
    }
    pub fn trip_ref(&self, id: &TripId) -> Option<ActorRef<TripMsg>> {
        self.ctx.registry.trip(id)
    }
    pub fn cell_ref(&self, id: &CellId) -> Option<ActorRef<CellMsg>> {
        self.ctx.registry.cell(id)
    }

    /// A driver's actor, started if it has none (offline drivers after recovery).
    pub async fn wake_driver(&self, id: &DriverId) -> Option<ActorRef<DriverMsg>> {
        self.ctx.driver_actor(id).await
    }

    /// How many actors a group's supervisor is watching.
    pub async fn actor_count(&self, group: Group) -> usize {
        self.ctx.actor_count(group).await
    }
}

/// One call with a timeout; `None` if it did not answer.
async fn call<M: ractor::Message, T: Send + 'static>(
    a: &ActorRef<M>,
    msg: impl FnOnce(ractor::RpcReplyPort<T>) -> M,
    timeout: Duration,
) -> Option<T> {
    match a.call(msg, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Some(v),
        _ => None,
    }
}
