//! `CellActor`: the drivers of one H3 cell (`CellDrivers`). Location pings upsert into it;
//! searches query it. It never waits on another actor.

use dispatch_engine::shard::entity_shard;
use dispatch_engine::{Candidate, CellDrivers, CellId};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::context::Context;
use crate::messages::{CellArgs, CellMsg, DriverMsg};

pub struct CellActor {
    pub ctx: Context,
}

pub struct CellState {
    cell: CellId,
    drivers: CellDrivers,
}

impl Actor for CellActor {
    type Msg = CellMsg;
    type State = CellState;
    type Arguments = CellArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<CellMsg>,
        args: CellArgs,
    ) -> Result<CellState, ActorProcessingErr> {
        Ok(CellState {
            cell: args.cell,
            drivers: CellDrivers::for_cell(args.cell),
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<CellMsg>,
        state: &mut CellState,
    ) -> Result<(), ActorProcessingErr> {
        // A restarted cell starts empty: ask the drivers last seen in it to index themselves
        // again from their live positions. Cell failures are rare; the scan is acceptable.
        let reg = &self.ctx.registry;
        let mut asked = 0;
        for rec in reg.driver_records.iter() {
            if rec.cell == Some(state.cell)
                && let Some(d) = reg.driver(&rec.id)
            {
                let _ = d.cast(DriverMsg::Reindex);
                asked += 1;
            }
        }
        if asked > 0 {
            tracing::info!(cell = %state.cell, drivers = asked, "cell started; drivers last indexed in it re-index themselves");
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<CellMsg>,
        msg: CellMsg,
        state: &mut CellState,
    ) -> Result<(), ActorProcessingErr> {
        let _handling = self.ctx.metrics.handling("cell", msg.kind());
        self.handle_msg(_myself, msg, state).await
    }
}

impl CellActor {
    /// One message: what `Actor::handle` does, timed and counted by the caller.
    async fn handle_msg(
        &self,
        _myself: ActorRef<CellMsg>,
        msg: CellMsg,
        state: &mut CellState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CellMsg::Upsert { driver, ping } => {
                // A driver that becomes available here (freed from an offer or a trip,
                // online, or driven into this cell) goes to a trip waiting near it.
                let freed = driver.available
                    && !self.ctx.waiting.is_empty()
                    && !state
                        .drivers
                        .get(&driver.driver_id)
                        .is_some_and(|d| d.available);
                if freed {
                    self.ctx.driver_freed(&driver);
                }
                state.drivers.upsert(driver);
                if ping {
                    self.ctx.metrics.locations_applied.inc();
                }
            }
            CellMsg::Remove(id) => {
                state.drivers.remove(&id);
            }
            CellMsg::Forget(shards) => {
                let gone: Vec<_> = (state.drivers.iter())
                    .filter(|d| shards.contains(&entity_shard(d.driver_id.as_str())))
                    .map(|d| d.driver_id.clone())
                    .collect();
                for id in &gone {
                    state.drivers.remove(id);
                    self.ctx.metrics.bound_hit("cell_entry_owner_left");
                }
                if !gone.is_empty() {
                    tracing::info!(cell = %state.cell, drivers = gone.len(), "drivers of shards that left their node taken out of the cell");
                }
            }
            CellMsg::Query {
                pickup,
                k,
                max_radius_m,
                mut filter,
                trace,
                reply,
            } => {
                let _span = crate::traced_span!(trace, "cell.query", cell = %state.cell).entered();
                let (found, examined) = state.drivers.nearest(pickup, k, max_radius_m, &mut filter);
                let found = found
                    .into_iter()
                    .map(|(driver, distance_m)| Candidate { driver, distance_m })
                    .collect();
                let _ = reply.send((found, examined));
            }
            CellMsg::Count(reply) => {
                let available = state.drivers.iter().filter(|d| d.available).count();
                let _ = reply.send((available, state.drivers.len()));
            }
            CellMsg::InjectPanic => panic!("injected fault in cell {}", state.cell),
            // A test's stuck cell: it answers nothing meanwhile (a handler that sleeps is
            // exactly what must never happen, which is the point of the hook).
            CellMsg::InjectStall(d) => tokio::time::sleep(d).await,
        }
        Ok(())
    }
}
