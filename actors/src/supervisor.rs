//! One supervisor per actor group. It spawns the group's actors, so it always knows
//! which entity a child is, and restarts a child that failed from the entity's last
//! committed snapshot. One actor's failure touches no other actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dispatch_engine::shard::ShardId;
use dispatch_engine::{DriverId, RiderId, TripId, TripState};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::Semaphore;

use crate::cell::CellActor;
use crate::context::Context;
use crate::driver::DriverActor;
use crate::messages::{
    CellArgs, DriverArgs, DriverMsg, Entity, Group, RiderArgs, RiderMsg, Spawn, SupervisorMsg,
    TripArgs, TripLink,
};
use crate::records::TripRecord;
use crate::rider::RiderActor;
use crate::trip::TripActor;

pub struct Supervisor {
    pub group: Group,
    pub ctx: Context,
}

pub struct SupervisorState {
    children: HashMap<ActorId, Entity>,
    reload_reads: Arc<ReloadReads>,
}

/// The reads of failed trips in flight: permits for at most
/// `SystemConfig::trip_reload_reads_max` at once, and how many hold one.
struct ReloadReads {
    permits: Semaphore,
    reading: AtomicUsize,
}

impl ReloadReads {
    fn new(max: usize) -> Self {
        ReloadReads {
            permits: Semaphore::new(max.max(1)),
            reading: AtomicUsize::new(0),
        }
    }
}

impl Supervisor {
    /// Starts one child and records it in the registry. With `instant`, it does not wait
    /// for the child's `pre_start` (messages queue until it runs); recovery uses that
    /// to start 100,000 actors quickly. None of our actors' `pre_start` can fail.
    async fn start_child(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        spawn: Spawn,
        instant: bool,
    ) -> Result<(Entity, ActorCell), String> {
        let sup = myself.get_cell();
        let sys = self.ctx.clone();
        let reg = &self.ctx.registry;
        match spawn {
            Spawn::Driver(args) => {
                let id = args.record.id.clone();
                if let Some(existing) = reg.driver(&id) {
                    // Two sessions asked for the same dormant driver at once.
                    return Ok((Entity::Driver(id), existing.get_cell()));
                }
                let r = spawn_child(DriverActor { ctx: sys }, args, sup, instant).await?;
                reg.drivers.insert(id.clone(), r.clone());
                Ok((Entity::Driver(id), r.get_cell()))
            }
            Spawn::Rider(args) => {
                let id = args.record.id.clone();
                if let Some(existing) = reg.rider(&id) {
                    return Ok((Entity::Rider(id), existing.get_cell()));
                }
                let r = spawn_child(RiderActor { ctx: sys }, args, sup, instant).await?;
                reg.riders.insert(id.clone(), r.clone());
                Ok((Entity::Rider(id), r.get_cell()))
            }
            Spawn::Trip(args) => {
                let (id, rider) = match &args {
                    TripArgs::New(n) => (n.trip_id.clone(), n.rider_id.clone()),
                    TripArgs::Resume { record, .. } => {
                        (record.trip.id.clone(), record.trip.rider_id.clone())
                    }
                };
                let r = spawn_child(TripActor { ctx: sys }, args, sup, instant).await?;
                reg.trips.insert(id.clone(), r.clone());
                Ok((Entity::Trip(id, rider), r.get_cell()))
            }
            Spawn::Cell(args) => {
                let id = args.cell;
                if let Some(existing) = reg.cell(&id) {
                    // Two drivers entered a new cell at once: the first spawn won.
                    return Ok((Entity::Cell(id), existing.get_cell()));
                }
                let r = spawn_child(CellActor { ctx: sys }, args, sup, instant).await?;
                reg.cells.insert(id, r.clone());
                Ok((Entity::Cell(id), r.get_cell()))
            }
        }
    }

    /// The shard of what `spawn` starts (`WHOLE_CITY` with sharded off); `None` for a
    /// cell, which is soft state that belongs to no shard.
    fn shard_of(&self, spawn: &Spawn) -> Option<ShardId> {
        let ctx = &self.ctx;
        match spawn {
            Spawn::Driver(a) => Some(ctx.shard_of_driver(&a.record.id)),
            Spawn::Rider(a) => Some(ctx.shard_of_rider(&a.record.id)),
            Spawn::Trip(TripArgs::Resume { record, .. }) => Some(ctx.shard_of_trip(&record.trip)),
            Spawn::Trip(TripArgs::New(n)) => Some(ctx.shard_of_pickup(n.pickup)),
            Spawn::Cell(_) => None,
        }
    }

    /// Restarts a failed actor from `spawn`, unless its shard is no longer served here
    /// (sharded mode): a shard that `System::end_shard` ended, or is ending, is run by its
    /// next owner. `end_shard` stops serving the shard before it looks for the shard's
    /// actors, and this checks again once the actor is in the registry: either
    /// `end_shard` finds (and stops) the restarted actor, or it is stopped here.
    async fn restart(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        spawn: Spawn,
    ) -> Result<bool, String> {
        let shard = self.shard_of(&spawn);
        let served = || shard.is_none_or(|s| self.ctx.serves(s));
        if !served() {
            tracing::info!(
                group = self.group.as_str(),
                shard,
                "not restarting a failed actor of a shard no longer served here"
            );
            return Ok(false);
        }
        let (entity, cell) = self.start_child(myself, spawn, false).await?;
        if state.children.insert(cell.get_id(), entity).is_none() {
            self.ctx.metrics.started(self.group.as_str());
        }
        if !served() {
            cell.stop(Some("shard ended".into()));
            return Ok(false);
        }
        Ok(true)
    }

    /// An on-demand start (`SupervisorMsg::SpawnServed`: an attach, a routed message or
    /// call found no actor). Sharded mode: none starts for a shard not served here; and
    /// as `System::end_shard` stops serving a shard *before* it looks for the shard's
    /// actors in the registry, a new actor is checked again once it is there: either
    /// `end_shard` finds (and stops) it, or it is stopped here (its driver taken out of
    /// the cell it may have indexed itself in), so no actor outlives its shard here.
    /// Both are counted (`dispatch_shard_refused_total{cause="start_not_served"}`).
    async fn start_served(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        spawn: Spawn,
    ) -> Result<Option<ActorCell>, String> {
        let ctx = &self.ctx;
        let shard = self.shard_of(&spawn);
        let served = || shard.is_none_or(|s| ctx.serves(s));
        if !served() {
            ctx.metrics.shard_refused("start_not_served");
            return Ok(None);
        }
        // What this start would add (an actor already running is someone else's), and
        // the cell a driver that starts indexed puts itself in.
        let (before, indexed) = match &spawn {
            Spawn::Driver(a) => (
                ctx.registry.driver(&a.record.id).map(|r| r.get_id()),
                (a.record.status.is_indexed())
                    .then(|| a.record.position.map(|p| (a.record.id.clone(), p)))
                    .flatten(),
            ),
            Spawn::Rider(a) => (ctx.registry.rider(&a.record.id).map(|r| r.get_id()), None),
            _ => (None, None),
        };
        let (entity, cell) = self.start_child(myself, spawn, false).await?;
        if state.children.insert(cell.get_id(), entity).is_none() {
            ctx.metrics.started(self.group.as_str());
        }
        if before == Some(cell.get_id()) || served() {
            return Ok(Some(cell));
        }
        ctx.metrics.shard_refused("start_not_served");
        tracing::info!(
            group = self.group.as_str(),
            shard,
            "an actor started as its shard ended here; stopped"
        );
        cell.stop(Some("shard not served".into()));
        if let Some((driver, at)) = indexed {
            let (reg, wait) = (ctx.downgrade(), ctx.call_timeout());
            let home = ctx.config.grid.cell_of(at);
            tokio::spawn(async move {
                let _ = cell.wait(Some(wait)).await;
                if let Some(ctx) = reg.upgrade() {
                    ctx.unindex_driver(&driver, home);
                }
            });
        }
        Ok(None)
    }

    /// The spawn that brings a failed entity back from its last snapshot.
    fn restart_spec(&self, entity: &Entity) -> Option<Spawn> {
        let reg = &self.ctx.registry;
        match entity {
            Entity::Driver(id) => reg.driver_records.get(id).map(|r| {
                Spawn::Driver(DriverArgs {
                    record: r.clone(),
                    restarted: true,
                    recovered: false,
                })
            }),
            Entity::Rider(id) => reg.rider_records.get(id).map(|r| {
                Spawn::Rider(RiderArgs {
                    record: r.clone(),
                    restarted: true,
                })
            }),
            Entity::Trip(..) => None, // read back from the store: see `trip_failed`
            Entity::Cell(cell) => Some(Spawn::Cell(CellArgs {
                cell: *cell,
                restarted: true,
            })),
        }
    }

    /// A trip restarts from its last *durable* state: what the store holds is exactly
    /// what anyone can have been told. Its actor is gone, and with it the commands in its
    /// mailbox: the rider and the drivers the trip names are told, so those commands are
    /// answered `unavailable` now rather than `internal` when their tickets expire. Until
    /// the trip is read back, commands to it are answered `unavailable` (the registry's
    /// `reloading`), not judged from the store as if it had ended.
    fn trip_failed(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        reads: &Arc<ReloadReads>,
        id: &TripId,
        rider: &RiderId,
    ) {
        let reg = &self.ctx.registry;
        reg.reloading.insert(id.clone());
        // The rider and drivers may be on other nodes (sharded mode, stage 5): told
        // through their routers, as the trip itself tells them.
        self.ctx.tell_rider(rider, RiderMsg::TripFailed(id.clone()));
        let named: Vec<DriverId> = reg
            .trip_records
            .get(id)
            .map(|rec| {
                let t = &rec.trip;
                t.driver_id()
                    .into_iter()
                    .chain(t.offer().map(|o| &o.driver_id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for d in named {
            self.ctx.tell_driver(&d, DriverMsg::TripFailed(id.clone()));
        }
        self.reload(myself, reads, id.clone(), rider.clone(), 0);
    }

    /// Reads a failed trip back from the store off the supervisor's own loop (a read is
    /// bounded by the store's call timeout, but a supervisor waiting on it would hold up
    /// every other child's failure); the answer comes back as `Reloaded`. At most
    /// `reads`' permits are reading at once; the others wait their turn, in order.
    fn reload(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        reads: &Arc<ReloadReads>,
        trip: TripId,
        rider: RiderId,
        attempt: u32,
    ) {
        let store = self.ctx.store.clone();
        let metrics = self.ctx.metrics.clone();
        let reads = reads.clone();
        let hold = self.ctx.config.test_hold_trip_reloads.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let permit = match reads.permits.try_acquire() {
                Ok(p) => Some(p),
                Err(_) => {
                    metrics.bound_hit("trip_reload_reads");
                    // Never closed; were it, the read goes ahead rather than the trip
                    // being dropped.
                    reads.permits.acquire().await.ok()
                }
            };
            let reading = reads.reading.fetch_add(1, Ordering::SeqCst) + 1;
            metrics
                .trip_reload_reads_peak
                .fetch_max(reading, Ordering::SeqCst);
            if let Some(hold) = hold {
                let _ = hold.acquire().await;
            }
            let key = trip.clone();
            let read = tokio::task::spawn_blocking(move || {
                let Some(t) = store.trip(&key)? else {
                    return Ok(None);
                };
                let entries = store.ledger_of(&key)?;
                Ok::<_, dispatch_persistence::StoreError>(Some(TripRecord {
                    trip: t.trip,
                    driver: t.driver,
                    entries,
                }))
            })
            .await;
            reads.reading.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
            let read = match read {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("the read did not finish: {e}")),
            };
            let _ = me.cast(SupervisorMsg::Reloaded {
                trip,
                rider,
                attempt,
                read,
            });
        });
    }

    /// What a failed trip's read found. A trip that was never stored cannot restart: its
    /// rider is told, so it is free to ask again. A read the store did not answer (it is
    /// away) is tried again with backoff, for as long as it takes: the trip is live in
    /// the store, and dropping it would leave its rider and driver stuck until a restart.
    async fn reloaded(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        (trip, rider, attempt): (TripId, RiderId, u32),
        read: Result<Option<TripRecord>, String>,
    ) {
        let reg = &self.ctx.registry;
        // Sharded mode: `System::end_shard` forgot this trip while it was read back (its
        // shard ended here): its next owner runs it; no retry, no restart.
        if self.ctx.config.sharded && !reg.reloading.contains(&trip) {
            return;
        }
        let outcome = match read {
            Ok(Some(record)) if !record.trip.state().is_final() => {
                let spawn = Spawn::Trip(TripArgs::Resume {
                    record,
                    restarted: true,
                });
                match self.restart(myself, state, spawn).await {
                    Ok(true) => {}
                    // Its shard is not served here (any more): its owner runs it.
                    Ok(false) => {
                        reg.reloading.remove(&trip);
                        return;
                    }
                    Err(e) => tracing::error!(trip_id = %trip, error = %e, "restart failed"),
                }
                "resumed"
            }
            // It had finished (a write reported failed had landed): nothing left to run,
            // but its rider and driver may not know, and would stay bound to it.
            Ok(Some(record)) => {
                let t = &record.trip;
                let view = crate::views::TripView::of(t, record.driver.clone());
                let receipt = (t.state() == TripState::Completed).then(|| crate::trip::receipt(t));
                let msg = RiderMsg::Trip {
                    view: view.clone(),
                    receipt,
                    answers: None,
                };
                self.ctx.tell_rider(&rider, msg);
                if let Some(d) = t.driver_id() {
                    let msg = DriverMsg::Trip {
                        view: Box::new(view),
                        link: TripLink::Released,
                        answers: None,
                    };
                    self.ctx.tell_driver(d, msg);
                }
                reg.forget_finished(&trip);
                "finished"
            }
            Ok(None) => {
                let msg = RiderMsg::TripNotStarted {
                    trip_id: trip.clone(),
                    ticket: None,
                    error: crate::error::ApiError::internal(),
                };
                self.ctx.tell_rider(&rider, msg);
                "not_stored"
            }
            Err(e) => {
                if attempt % 10 == 0 {
                    tracing::warn!(trip_id = %trip, attempt, error = %e, "cannot reload trip yet; retrying");
                }
                let after = reload_backoff(attempt);
                let next = attempt.saturating_add(1);
                myself.send_after(after, move || SupervisorMsg::Reload {
                    trip,
                    rider,
                    attempt: next,
                });
                self.ctx
                    .metrics
                    .trip_reloads
                    .with_label_values(&["retried"])
                    .inc();
                return;
            }
        };
        // After the rider's `TripNotStarted` was sent: a request it retries meanwhile is
        // answered `unavailable`, not "already has an active trip".
        reg.reloading.remove(&trip);
        self.ctx
            .metrics
            .trip_reloads
            .with_label_values(&[outcome])
            .inc();
    }

    fn forget(&self, entity: &Entity, who: ActorId) {
        let reg = &self.ctx.registry;
        // Remove the registry entry only if it still points at this (dead) actor.
        match entity {
            Entity::Driver(id) => {
                reg.drivers.remove_if(id, |_, r| r.get_id() == who);
            }
            Entity::Rider(id) => {
                reg.riders.remove_if(id, |_, r| r.get_id() == who);
            }
            Entity::Trip(id, _) => {
                reg.trips.remove_if(id, |_, r| r.get_id() == who);
            }
            Entity::Cell(id) => {
                reg.cells.remove_if(id, |_, r| r.get_id() == who);
            }
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            children: HashMap::new(),
            reload_reads: Arc::new(ReloadReads::new(self.ctx.config.trip_reload_reads_max)),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(spawn, reply) => {
                let res = self.start_child(&myself, spawn, false).await;
                if let Ok((entity, cell)) = &res
                    && state
                        .children
                        .insert(cell.get_id(), entity.clone())
                        .is_none()
                {
                    self.ctx.metrics.started(self.group.as_str());
                }
                let _ = reply.send(res.map(|(_, c)| c));
            }
            SupervisorMsg::SpawnServed(spawn, reply) => {
                let res = self.start_served(&myself, state, spawn).await;
                let _ = reply.send(res);
            }
            SupervisorMsg::SpawnMany(spawns, reply) => {
                let mut started = 0;
                for spawn in spawns {
                    match self.start_child(&myself, spawn, true).await {
                        Ok((entity, cell)) => {
                            if state.children.insert(cell.get_id(), entity).is_none() {
                                self.ctx.metrics.started(self.group.as_str());
                                started += 1;
                            }
                        }
                        Err(e) => {
                            tracing::error!(group = self.group.as_str(), error = %e, "spawn failed")
                        }
                    }
                }
                let _ = reply.send(started);
            }
            SupervisorMsg::Count(reply) => {
                let _ = reply.send(state.children.len());
            }
            SupervisorMsg::Reload {
                trip,
                rider,
                attempt,
            } => self.reload(&myself, &state.reload_reads, trip, rider, attempt),
            SupervisorMsg::Reloaded {
                trip,
                rider,
                attempt,
                read,
            } => {
                self.reloaded(&myself, state, (trip, rider, attempt), read)
                    .await
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let group = self.group.as_str();
        match evt {
            SupervisionEvent::ActorTerminated(who, _, _) => {
                if let Some(entity) = state.children.remove(&who.get_id()) {
                    self.ctx.metrics.stopped(group);
                    self.forget(&entity, who.get_id());
                }
            }
            SupervisionEvent::ActorFailed(who, err) => {
                let Some(entity) = state.children.remove(&who.get_id()) else {
                    return Ok(());
                };
                self.ctx.metrics.stopped(group);
                self.forget(&entity, who.get_id());
                tracing::error!(group, entity = ?entity, error = %err, "actor failed; restarting from its last snapshot");
                self.ctx
                    .metrics
                    .actor_restarts
                    .with_label_values(&[group])
                    .inc();
                let spec = match &entity {
                    Entity::Trip(id, rider) => {
                        self.trip_failed(&myself, &state.reload_reads, id, rider);
                        None
                    }
                    other => self.restart_spec(other),
                };
                if let Some(spec) = spec
                    && let Err(e) = self.restart(&myself, state, spec).await
                {
                    tracing::error!(group, entity = ?entity, error = %e, "restart failed")
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// 100 ms, doubling, at most 5 s between reads of a trip the store did not answer, less
/// a random part of up to half of that, so that trips that failed together do not read
/// again in lockstep.
fn reload_backoff(attempt: u32) -> std::time::Duration {
    let full = (100u64 << attempt.min(6)).min(5_000);
    std::time::Duration::from_millis(full - rand::random_range(0..=full / 2))
}

async fn spawn_child<A: Actor>(
    actor: A,
    args: A::Arguments,
    supervisor: ActorCell,
    instant: bool,
) -> Result<ActorRef<A::Msg>, String> {
    if instant {
        ractor::ActorRuntime::<A>::spawn_linked_instant(None, actor, args, supervisor)
            .map(|(r, _)| r)
            .map_err(|e| e.to_string())
    } else {
        Actor::spawn_linked(None, actor, args, supervisor)
            .await
            .map(|(r, _)| r)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::reload_backoff;
    use std::collections::HashSet;
    use std::time::Duration;

    /// Every wait is within half of the doubling step and the step itself, at most 5 s,
    /// and trips that fail together do not all wait the same (100 draws of a 2.5 s range
    /// all equal would be a broken jitter, not bad luck).
    #[test]
    fn reload_backoff_doubles_to_5_s_less_a_random_part_of_up_to_half() {
        for (attempt, full) in [(0, 100), (1, 200), (3, 800), (6, 5_000), (40, 5_000)] {
            let waits: Vec<Duration> = (0..100).map(|_| reload_backoff(attempt)).collect();
            for w in &waits {
                let ms = w.as_millis() as u64;
                assert!(
                    (full / 2..=full).contains(&ms),
                    "attempt {attempt}: {ms} ms"
                );
            }
            let distinct: HashSet<_> = waits.iter().collect();
            assert!(
                distinct.len() > 1,
                "attempt {attempt}: every wait {waits:?}"
            );
        }
    }
}
