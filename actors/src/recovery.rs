//! Recovery: the live system rebuilt from the store before any client is served.
//!
//! Trips are the authority on who is offered what and who drives whom (they are durable
//! before anyone is told); each driver's stored status is reconciled against them. An
//! open offer gets a fresh timeout; a trip whose dispatch deadline passed while the
//! process was down ends `no_driver_found` as soon as its actor starts.
//!
//! [`System::recover`] rebuilds everything; in sharded mode (docs/sharding.md §4)
//! [`System::recover_shard`] rebuilds one shard (a cell shard's trips, an entity shard's
//! drivers and riders reconciled against the live trips naming them or of them, wherever
//! those are)
//! and [`System::end_shard`] stops one. Both recoveries share one path (`System::restore`).

use std::collections::HashMap;
use std::time::Instant;

use dispatch_engine::shard::{ShardId, WHOLE_CITY, is_entity_shard};
use dispatch_engine::{
    AfterPayment, DriverId, DriverStatus, RiderId, TripCommand, TripId, TripState,
};
use dispatch_persistence::{Batch, Loaded, StoreError, StoredTrip};

use crate::admin::cards;
use crate::context::Context;
use crate::messages::{CellMsg, DriverArgs, DriverMsg, Group, RiderArgs, Spawn, TripArgs};
use crate::records::{DriverRecord, Identity, RiderRecord, TripRecord};
use crate::session::{CLOSE_GOING_AWAY, SHARD_MOVED};
use crate::system::System;
use crate::views::{OfferView, TripView};

/// What recovery restored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    pub drivers: usize,
    pub riders: usize,
    /// Actors started: online drivers and riders with an active trip. The others start
    /// when their app connects.
    pub driver_actors: usize,
    pub rider_actors: usize,
    pub live_trips: usize,
    pub finished_trips: usize,
    pub quotes: usize,
    pub journal_entries: usize,
    /// Drivers whose stored status disagreed with the trips (set right from the trips).
    pub reconciled_drivers: usize,
    /// Trips whose dispatch deadline passed while the server was down (ended
    /// `no_driver_found` during recovery).
    pub expired_trips: usize,
    /// Reading and checking the store.
    pub load_ms: u64,
    /// Starting the actors, per group.
    pub riders_ms: u64,
    pub drivers_ms: u64,
    pub trips_ms: u64,
    pub elapsed_ms: u64,
}

impl System {
    /// Loads the store and starts an actor for every driver, rider and live trip.
    /// Call once, before serving clients.
    pub async fn recover(&self) -> Result<RecoveryStats, StoreError> {
        let started = Instant::now();
        let store = self.ctx.store.clone();
        let loaded = tokio::task::spawn_blocking(move || store.load())
            .await
            .expect("the load task does not panic")?;
        let load_ms = started.elapsed().as_millis() as u64;
        self.restore_settings().await?;
        self.restore(loaded, Vec::new(), started, load_ms).await
    }

    /// Sharded mode: loads one shard (`Store::load_shard`, at most `limit` records) and
    /// starts what [`System::recover`] would for it: a cell shard's live trips (an open
    /// offer gets a fresh timeout, an expired dispatch deadline ends `no_driver_found`);
    /// an entity shard's drivers and riders, their status reconciled against the live
    /// trips naming the drivers (`Store::live_trips_of`, any shard), the live trips of
    /// the riders (`Store::live_trips_of_riders`, any shard: a rider gets its active
    /// trip, whose actor is not started here) and the trips live on this node;
    /// `WHOLE_CITY`'s pricing and surge settings. Then the shard is served here
    /// ([`System::set_serving`]). PostgreSQL only (sled: `StoreError::Unsupported`).
    pub async fn recover_shard(
        &self,
        shard: ShardId,
        limit: usize,
    ) -> Result<RecoveryStats, StoreError> {
        let started = Instant::now();
        let store = self.ctx.store.clone();
        let (loaded, elsewhere) = tokio::task::spawn_blocking(move || {
            let loaded = store.load_shard(shard, limit)?;
            let drivers: Vec<DriverId> = loaded.drivers.iter().map(|d| d.id.clone()).collect();
            let mut elsewhere = if is_entity_shard(shard) && !drivers.is_empty() {
                store.live_trips_of(&drivers, limit)?
            } else {
                Vec::new()
            };
            let riders: Vec<RiderId> = loaded.riders.iter().map(|r| r.id.clone()).collect();
            if is_entity_shard(shard) && !riders.is_empty() {
                // A trip found both ways is kept once (`restore` keys them by id).
                elsewhere.extend(store.live_trips_of_riders(&riders, limit)?);
            }
            Ok::<_, StoreError>((loaded, elsewhere))
        })
        .await
        .expect("the shard load task does not panic")?;
        let load_ms = started.elapsed().as_millis() as u64;
        if shard == WHOLE_CITY {
            self.restore_settings().await?;
        }
        let stats = self.restore(loaded, elsewhere, started, load_ms).await?;
        self.set_serving(shard, true);
        Ok(stats)
    }

    /// Sharded mode: reads the operator's stored pricing and surge settings again, on a
    /// node that does not hold `WHOLE_CITY` (its owner wrote them; its quotes price with
    /// them from now on).
    pub async fn reload_settings(&self) -> Result<(), StoreError> {
        self.restore_settings().await
    }

    /// The operator's stored pricing and surge settings (`WHOLE_CITY`'s).
    async fn restore_settings(&self) -> Result<(), StoreError> {
        let ctx = &self.ctx;
        let store = ctx.store.clone();
        if let Some(p) = tokio::task::spawn_blocking(move || store.pricing())
            .await
            .expect("the pricing read does not panic")?
        {
            ctx.replace_rates(cards(&ctx.config.rates.currency, &p));
        }
        let store = ctx.store.clone();
        if let Some(sg) = tokio::task::spawn_blocking(move || store.surge())
            .await
            .expect("the surge read does not panic")?
        {
            self.restore_surge(&sg);
        }
        Ok(())
    }

    /// Starts the actors of what was loaded: its live trips (expired ones ended first),
    /// its drivers and riders reconciled against those trips, `elsewhere` (live trips of
    /// other shards naming its drivers or of its riders, not started here) and the trips
    /// live here.
    async fn restore(
        &self,
        loaded: Loaded,
        elsewhere: Vec<StoredTrip>,
        started: Instant,
        load_ms: u64,
    ) -> Result<RecoveryStats, StoreError> {
        let ctx = &self.ctx;
        // The books: balances and earnings from every entry; live trips keep their own.
        let mut entries_by_trip: HashMap<TripId, Vec<dispatch_engine::Entry>> = HashMap::new();
        {
            let mut books = ctx.lock_books();
            for e in loaded.ledger {
                books.add(&e);
                entries_by_trip
                    .entry(e.key.trip_id.clone())
                    .or_default()
                    .push(e);
            }
        }
        let now = ctx.clock.now_ms();
        let cfg = ctx.config.dispatch;
        let reg = &ctx.registry;
        let mut stats = RecoveryStats {
            journal_entries: loaded.journal_entries,
            load_ms,
            ..Default::default()
        };

        let mut live: HashMap<TripId, StoredTrip> = HashMap::new();
        let mut expired = Batch::new();
        let mut expired_entries = Vec::new();
        for mut t in loaded.trips {
            if t.trip.state() == TripState::Dispatching && now >= t.trip.deadline_ms() {
                // Its dispatch deadline passed while the server was down: it ends now,
                // durably, before anyone can be offered it again, and a hold kept from
                // an earlier assignment goes back (the provider is asked, best effort).
                let entries = entries_by_trip
                    .get(&t.trip.id)
                    .map_or(&[][..], Vec::as_slice);
                let decided = ctx.with_rules(t.trip.product, |rules| {
                    t.trip
                        .decide(TripCommand::DeadlineReached, entries, now, rules)
                });
                if let Ok(d) = decided {
                    let paid = ctx.pay(&d.payment).await;
                    if d.payment.after(&paid) == AfterPayment::Commit {
                        let entry = d.payment.entry().cloned();
                        t.trip = d.trip;
                        expired = expired.then_in(ctx.shard_of_trip(&t.trip)).decided(
                            t.clone(),
                            d.journal,
                            entry.clone(),
                        );
                        // The trip is final now: only the books need its entry.
                        expired_entries.extend(entry);
                        stats.expired_trips += 1;
                    }
                }
            }
            if t.trip.state().is_final() {
                stats.finished_trips += 1;
                continue;
            }
            // The driver could not see the offer while the server was down.
            t.trip.refresh_offer(now, &cfg);
            live.insert(t.trip.id.clone(), t);
        }
        ctx.store.commit(expired).await?;
        for e in &expired_entries {
            ctx.entry_written(e);
        }
        // Trips that name this part's drivers and riders but are not started here: those
        // of other shards (an entity shard's recovery), then, newer than the store's copy,
        // those live on this node.
        let mut others: HashMap<TripId, StoredTrip> = HashMap::new();
        for mut t in elsewhere {
            if !t.trip.state().is_final() {
                // As for this node's own trips: the driver could not see the offer while
                // its node was down, and the trip's owner gives it a fresh timeout when it
                // resumes the trip. Without this the driver's `welcome` showed the stored
                // deadline, already past after a takeover (`expires_in_ms: 0`).
                t.trip.refresh_offer(now, &cfg);
                others.insert(t.trip.id.clone(), t);
            }
        }
        if !loaded.riders.is_empty() || !loaded.drivers.is_empty() {
            for r in ctx.registry.trip_records.iter() {
                let t = StoredTrip {
                    trip: r.trip.clone(),
                    driver: r.driver.clone(),
                };
                others.insert(r.key().clone(), t);
            }
        }
        others.retain(|id, _| !live.contains_key(id));
        let mut on_trip: HashMap<DriverId, TripId> = HashMap::new();
        let mut offered: HashMap<DriverId, TripId> = HashMap::new();
        let mut active: HashMap<RiderId, TripId> = HashMap::new();
        for t in live.values().chain(others.values()) {
            let id = t.trip.id.clone();
            if let Some(d) = t.trip.driver_id() {
                on_trip.insert(d.clone(), id.clone());
            }
            if let Some(o) = t.trip.offer() {
                offered.insert(o.driver_id.clone(), id.clone());
            }
            if let Some(other) = active.insert(t.trip.rider_id.clone(), id.clone()) {
                ctx.metrics.invariant(
                    "rider_two_trips",
                    &format!("{} has {other} and {id}", t.trip.rider_id),
                );
            }
        }
        let known = |id: &TripId| live.get(id).or_else(|| others.get(id));
        let view = |id: &TripId| known(id).map(|t| TripView::of(&t.trip, t.driver.clone()));

        for q in loaded.quotes {
            reg.quotes.insert(q.quote_id.clone(), q);
            stats.quotes += 1;
        }

        let mut spawns = Vec::new();
        for r in loaded.riders {
            let record = RiderRecord {
                trip: active.get(&r.id).and_then(&view),
                id: r.id,
                profile: r.profile,
                token_hash: r.token_hash,
                position: None,
                session: None,
            };
            reg.tokens
                .insert(record.token_hash, Identity::Rider(record.id.clone()));
            stats.riders += 1;
            let busy = record.trip.is_some();
            reg.rider_records.insert(record.id.clone(), record.clone());
            if busy {
                spawns.push(Spawn::Rider(RiderArgs {
                    record,
                    restarted: false,
                }));
            }
        }
        (stats.rider_actors, stats.riders_ms) = spawn_timed(ctx, Group::Rider, spawns).await;

        let mut spawns = Vec::new();
        let mut recovered = Vec::new();
        for d in loaded.drivers {
            let status = if let Some(t) = on_trip.get(&d.id) {
                DriverStatus::OnTrip(t.clone())
            } else if let Some(t) = offered.get(&d.id) {
                DriverStatus::Offered(t.clone())
            } else {
                match &d.status {
                    DriverStatus::Offered(_) | DriverStatus::OnTrip(_) => DriverStatus::Available,
                    s => s.clone(),
                }
            };
            if status != d.status {
                stats.reconciled_drivers += 1;
            }
            let offer = match &status {
                DriverStatus::Offered(t) => {
                    known(t).and_then(|t| t.trip.offer().map(|o| OfferView::of(&t.trip, o)))
                }
                _ => None,
            };
            let trip = match &status {
                DriverStatus::OnTrip(t) => view(t),
                _ => None,
            };
            let record = DriverRecord {
                id: d.id,
                profile: d.profile,
                token_hash: d.token_hash,
                status,
                position: d.position,
                heading: d.heading,
                cell: None,
                offer: offer.map(Box::new),
                trip: trip.map(Box::new),
                session: None,
                session_epoch: 0,
            };
            reg.tokens
                .insert(record.token_hash, Identity::Driver(record.id.clone()));
            stats.drivers += 1;
            let online = record.status.is_indexed();
            reg.driver_records.insert(record.id.clone(), record.clone());
            // An offline driver needs no actor until its app connects.
            if online {
                recovered.push(record.id.clone());
                spawns.push(Spawn::Driver(DriverArgs {
                    record,
                    restarted: false,
                    recovered: true,
                }));
            }
        }
        (stats.driver_actors, stats.drivers_ms) = spawn_timed(ctx, Group::Driver, spawns).await;

        let mut spawns = Vec::new();
        for (id, t) in live {
            let v = TripView::of(&t.trip, t.driver.clone());
            reg.trip_views.insert(id.clone(), v);
            let record = TripRecord {
                trip: t.trip,
                driver: t.driver,
                entries: entries_by_trip.remove(&id).unwrap_or_default(),
            };
            reg.trip_records.insert(id, record.clone());
            spawns.push(Spawn::Trip(TripArgs::Resume {
                record,
                restarted: true,
            }));
        }
        (stats.live_trips, stats.trips_ms) = spawn_timed(ctx, Group::Trip, spawns).await;

        // Every recovered driver is disconnected: one sweep after the grace period sends
        // those still away offline (each ignores it if it reconnected meanwhile).
        let weak = ctx.downgrade();
        let grace = std::time::Duration::from_millis(ctx.config.session_grace_ms);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(sys) = weak.upgrade() else { return };
            let away: Vec<_> = recovered
                .into_iter()
                .filter(|id| {
                    sys.registry.driver_records.get(id).is_some_and(|r| {
                        r.session.is_none() && r.session_epoch == 0 && r.status.is_indexed()
                    })
                })
                .collect();
            for id in away {
                if let Some(d) = sys.registry.driver(&id) {
                    let _ = d.cast(DriverMsg::GraceExpired { epoch: 0 });
                }
            }
        });
        stats.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            load_ms = stats.load_ms,
            drivers_ms = stats.drivers_ms,
            dir = %ctx.store.dir().display(),
            drivers = stats.drivers,
            riders = stats.riders,
            driver_actors = stats.driver_actors,
            rider_actors = stats.rider_actors,
            live_trips = stats.live_trips,
            finished_trips = stats.finished_trips,
            quotes = stats.quotes,
            journal_entries = stats.journal_entries,
            reconciled_drivers = stats.reconciled_drivers,
            expired_trips = stats.expired_trips,
            elapsed_ms = stats.elapsed_ms,
            "recovery complete"
        );
        Ok(stats)
    }
}

/// Starts a group's recovered actors in one supervisor message: how many, in how many ms.
async fn spawn_timed(ctx: &Context, group: Group, spawns: Vec<Spawn>) -> (usize, u64) {
    let t = Instant::now();
    let n = ctx.spawn_many(group, spawns).await.unwrap_or(0);
    (n, t.elapsed().as_millis() as u64)
}

impl System {
    /// Puts the operator's stored surge pins and cap back.
    fn restore_surge(&self, sg: &dispatch_persistence::StoredSurge) {
        let mut book = self.ctx.lock_surge();
        for (cell, m) in &sg.pins {
            match dispatch_engine::CellId::try_from(*cell) {
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
}

/// What [`System::end_shard`] stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndStats {
    pub trips: usize,
    pub drivers: usize,
    pub riders: usize,
    /// Sessions closed (1001, [`SHARD_MOVED`](crate::session::SHARD_MOVED)).
    pub sessions: usize,
}

impl System {
    /// Sharded mode: whether this node serves `shard` now (always, with sharded off).
    pub fn serves(&self, shard: ShardId) -> bool {
        self.ctx.serves(shard)
    }

    /// Sharded mode: where each shard's actors live now (stage 5), replacing the map
    /// before (`None`: every entity local). With a router started, searches, offers and
    /// a trip's messages to entities of a remote shard go through its node's router.
    /// The drivers of an entity shard that leaves another node (`Remote(n)` before, not
    /// now) are taken out of this node's cells, counted per entry in
    /// `dispatch_bound_hits_total{bound="cell_entry_owner_left"}`: a killed node's
    /// drivers (no `end_shard` took them out) are not offered for good; a driver that
    /// runs on elsewhere is indexed again by its next ping.
    pub fn set_placement(&self, map: Option<crate::placement::ShardMap>) {
        let left = match self.ctx.placement.current() {
            Some(before) if self.ctx.config.sharded => before.left_their_node(map.as_ref()),
            _ => Default::default(),
        };
        self.ctx.placement.set(map);
        if !left.is_empty() {
            let left = std::sync::Arc::new(left);
            for cell in self.ctx.registry.cells.iter() {
                let _ = cell.cast(CellMsg::Forget(left.clone()));
            }
        }
    }

    /// Sharded mode: marks `shard` served here or not. While it is not, an app command,
    /// attach or quote for a driver or rider of it is refused `unavailable` (retry) and
    /// counted in `dispatch_shard_refused_total{cause="not_served"}`.
    /// [`System::recover_shard`] sets it; [`System::end_shard`] clears it first.
    pub fn set_serving(&self, shard: ShardId, on: bool) {
        if on {
            self.ctx.serving.insert(shard);
        } else {
            self.ctx.serving.remove(&shard);
        }
    }

    /// Sharded mode: stops serving `shard` (its lease lost, or handed off). Its trips'
    /// actors stop (a cell shard), or its drivers' and riders' (an entity shard), each
    /// with its session closed 1001 "reconnect" and its driver out of the cell index;
    /// they leave the registry, so the shard's next owner is the only one running them.
    /// Nothing is written but the stopped drivers' last positions (every trip transition
    /// is durable already). Cell actors stay: they are soft state, refilled by pings,
    /// and index the drivers of every shard this node holds, not the cell shard's.
    pub async fn end_shard(&self, shard: ShardId) -> EndStats {
        self.set_serving(shard, false);
        let ctx = &self.ctx;
        let reg = &ctx.registry;
        let mut stats = EndStats::default();
        let trips: Vec<TripId> = reg
            .trip_records
            .iter()
            .filter(|r| ctx.shard_of_trip(&r.trip) == shard)
            .map(|r| r.key().clone())
            .collect();
        let drivers: Vec<DriverId> = reg
            .driver_records
            .iter()
            .filter(|r| ctx.shard_of_driver(&r.id) == shard)
            .map(|r| r.id.clone())
            .collect();
        let riders: Vec<RiderId> = reg
            .rider_records
            .iter()
            .filter(|r| ctx.shard_of_rider(&r.id) == shard)
            .map(|r| r.id.clone())
            .collect();

        // Their sessions close first (1001, "reconnect"), so that a command one of them
        // still holds, in its mailbox or awaiting a trip's answer, is answered
        // `unavailable` (retry, on the shard's next owner) as it is dropped with the
        // stopped actor, not `internal` (see `Responder`'s drop).
        let sessions = (drivers.iter())
            .filter_map(|d| reg.driver_records.get(d).and_then(|r| r.session.clone()))
            .chain(
                (riders.iter())
                    .filter_map(|r| reg.rider_records.get(r).and_then(|r| r.session.clone())),
            );
        for session in sessions {
            session.close_because(CLOSE_GOING_AWAY, SHARD_MOVED);
            stats.sessions += 1;
        }
        // Who waits on the trips (their riders and drivers, here or on other nodes): told
        // once the trips stopped, below.
        let waiting: Vec<(TripId, RiderId, Vec<DriverId>)> = (trips.iter())
            .filter_map(|id| {
                let t = &reg.trip_records.get(id)?.trip;
                let drivers = (t.driver_id().into_iter())
                    .chain(t.offer().map(|o| &o.driver_id))
                    .cloned()
                    .collect();
                Some((id.clone(), t.rider_id.clone(), drivers))
            })
            .collect();

        // Stop them all, then wait, so no handler still running puts a record back after
        // it is removed below. One bound for the whole shard (the call timeout), however
        // many actors it has; hitting it is counted (`end_shard_stop`).
        let cells: Vec<ractor::ActorCell> = (trips.iter().filter_map(|t| reg.trip(t)))
            .map(|a| a.get_cell())
            .chain(
                drivers
                    .iter()
                    .filter_map(|d| reg.driver(d))
                    .map(|a| a.get_cell()),
            )
            .chain(
                riders
                    .iter()
                    .filter_map(|r| reg.rider(r))
                    .map(|a| a.get_cell()),
            )
            .collect();
        for cell in &cells {
            cell.stop(Some("shard ended".into()));
        }
        let deadline = tokio::time::Instant::now() + ctx.call_timeout();
        let mut late = 0usize;
        for cell in cells {
            if tokio::time::timeout_at(deadline, cell.wait(None))
                .await
                .is_err()
            {
                late += 1;
            }
        }
        if late > 0 {
            ctx.metrics.bound_hit("end_shard_stop");
            tracing::warn!(shard, late, "actors of an ended shard did not stop in time");
        }
        // A command a stopped trip held (in its mailbox) is answered by no one: its
        // senders' actors answer it `unavailable` (retry) now, not at its ticket's timeout.
        for (trip, rider, drivers) in waiting {
            for d in &drivers {
                ctx.tell_driver(d, DriverMsg::TripFailed(trip.clone()));
            }
            ctx.tell_rider(&rider, crate::messages::RiderMsg::TripFailed(trip));
        }

        for id in &trips {
            reg.trips.remove(id);
            reg.forget_finished(id);
            reg.reloading.remove(id);
            stats.trips += 1;
        }
        // The drivers' last positions, under the shard's fence (held while it ends).
        let mut positions = Batch::in_shard(shard);
        for id in &drivers {
            reg.drivers.remove(id);
            ctx.moved.remove(id);
            if let Some((_, r)) = reg.driver_records.remove(id) {
                // Its cell may be on another node (the driver's place is not its shard's).
                if let Some(cell) = r.cell {
                    ctx.unindex_driver(id, cell);
                }
                reg.tokens.remove(&r.token_hash);
                positions = positions.driver(r.stored());
            }
            stats.drivers += 1;
        }
        for id in &riders {
            reg.riders.remove(id);
            if let Some((_, r)) = reg.rider_records.remove(id) {
                reg.tokens.remove(&r.token_hash);
            }
            stats.riders += 1;
        }
        if !riders.is_empty() {
            let gone: std::collections::HashSet<&RiderId> = riders.iter().collect();
            reg.quotes.retain(|_, q| !gone.contains(&q.rider_id));
        }
        if let Err(e) = ctx.store.write(positions) {
            tracing::warn!(shard, error = %e, "last positions of an ended shard not written");
        }
        tracing::info!(
            shard,
            trips = stats.trips,
            drivers = stats.drivers,
            riders = stats.riders,
            sessions = stats.sessions,
            "shard ended"
        );
        stats
    }
}
