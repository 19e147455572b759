//! One supervisor per actor group. It spawns the group's actors, so it always knows
//! which entity a child is, and restarts a child that failed from the entity's last
//! committed snapshot. One actor's failure touches no other actor.

use std::collections::HashMap;

use dispatch_engine::TripId;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::cell::CellActor;
use crate::context::Context;
use crate::driver::DriverActor;
use crate::messages::{
    CellArgs, DriverArgs, Entity, Group, RiderArgs, RiderMsg, Spawn, SupervisorMsg, TripArgs,
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

    /// The spawn that brings a failed entity back from its last snapshot.
    fn restart_spec(&self, entity: &Entity) -> Option<Spawn> {
        let reg = &self.ctx.registry;
        match entity {
            Entity::Driver(id) => reg.driver_records.get(id).map(|r| {
                Spawn::Driver(DriverArgs {
                    record: r.clone(),
                    restarted: true,
                })
            }),
            Entity::Rider(id) => reg.rider_records.get(id).map(|r| {
                Spawn::Rider(RiderArgs {
                    record: r.clone(),
                    restarted: true,
                })
            }),
            Entity::Trip(..) => None, // restarted from the store: see `restart_trip`
            Entity::Cell(cell) => Some(Spawn::Cell(CellArgs {
                cell: *cell,
                restarted: true,
            })),
        }
    }

    /// A trip restarts from its last *durable* state: what the store holds is exactly
    /// what anyone can have been told.
    /// A trip that failed before it was ever stored cannot restart: its rider is told, so
    /// it is free to ask again.
    async fn restart_trip(&self, id: &TripId, rider: &dispatch_engine::RiderId) -> Option<Spawn> {
        let store = self.ctx.store.clone();
        let key = id.clone();
        let read = tokio::task::spawn_blocking(move || {
            Ok::<_, dispatch_persistence::StoreError>((store.trip(&key)?, store.ledger_of(&key)?))
        });
        let (stored, entries) = match read.await {
            Ok(Ok((Some(t), entries))) => (t, entries),
            Ok(Ok((None, _))) => {
                if let Some(r) = self.ctx.registry.rider(rider) {
                    let _ = r.cast(RiderMsg::TripNotStarted {
                        trip_id: id.clone(),
                        ticket: None,
                        error: crate::error::ApiError::internal(),
                    });
                }
                return None;
            }
            Ok(Err(e)) => {
                tracing::error!(trip_id = %id, error = %e, "cannot reload trip");
                return None;
            }
            Err(_) => return None,
        };
        if stored.trip.state().is_final() {
            return None; // it had finished; nothing left to run
        }
        let record = TripRecord {
            trip: stored.trip,
            driver: stored.driver,
            entries,
        };
        Some(Spawn::Trip(TripArgs::Resume {
            record,
            restarted: true,
        }))
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
                    Entity::Trip(id, rider) => self.restart_trip(id, rider).await,
                    other => self.restart_spec(other),
                };
                if let Some(spec) = spec {
                    match self.start_child(&myself, spec, false).await {
                        Ok((entity, cell)) => {
                            if state.children.insert(cell.get_id(), entity).is_none() {
                                self.ctx.metrics.started(group);
                            }
                        }
                        Err(e) => {
                            tracing::error!(group, entity = ?entity, error = %e, "restart failed")
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
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
