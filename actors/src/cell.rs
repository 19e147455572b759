//! `CellActor`: the drivers of one H3 cell in an R-tree. Location pings upsert into it;
//! searches query it. It never waits on another actor.

use std::sync::Arc;

use dispatch_engine::{Candidate, CellDrivers, CellId, DriverId, IndexedDriver, Point, Product};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::driver::DriverMsg;
use crate::system::System;

/// Which drivers a query wants.
#[derive(Debug, Clone, Default)]
pub struct SearchFilter {
    pub product: Option<Product>,
    pub available_only: bool,
    pub exclude: Arc<Vec<DriverId>>,
}

impl SearchFilter {
    pub fn matches(&self, d: &IndexedDriver) -> bool {
        (!self.available_only || d.available)
            && self.product.is_none_or(|p| p == d.product)
            && !self.exclude.contains(&d.driver_id)
    }
}

pub struct CellArgs {
    pub cell: CellId,
    pub restarted: bool,
}

pub enum CellMsg {
    /// Insert or move a driver; `ping` says it came from a location update.
    Upsert {
        driver: IndexedDriver,
        ping: bool,
    },
    Remove(DriverId),
    Query {
        pickup: Point,
        k: usize,
        max_radius_m: f64,
        filter: SearchFilter,
        reply: RpcReplyPort<(Vec<Candidate>, usize)>,
    },
    /// (available, total) drivers in the cell.
    Count(RpcReplyPort<(usize, usize)>),
    /// Test hook: fail inside a handler, as a bug would.
    InjectPanic,
}

impl CellMsg {
    /// The message's kind, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            CellMsg::Upsert { ping: true, .. } => "location",
            CellMsg::Upsert { ping: false, .. } => "upsert",
            CellMsg::Remove(_) => "remove",
            CellMsg::Query { .. } => "query",
            CellMsg::Count(_) => "count",
            CellMsg::InjectPanic => "inject_panic",
        }
    }
}

pub struct CellActor {
    pub system: System,
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
            drivers: CellDrivers::new(),
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<CellMsg>,
        state: &mut CellState,
    ) -> Result<(), ActorProcessingErr> {
        // A restarted cell starts empty: ask the drivers last seen in it to index themselves
        // again from their live positions. Cell failures are rare; the scan is acceptable.
        let reg = &self.system.registry;
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
        let _handling = self.system.metrics.handling("cell", msg.kind());
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
                state.drivers.upsert(driver);
                if ping {
                    self.system.metrics.locations_applied.inc();
                }
            }
            CellMsg::Remove(id) => {
                state.drivers.remove(&id);
            }
            CellMsg::Query {
                pickup,
                k,
                max_radius_m,
                filter,
                reply,
            } => {
                let (found, examined) = state
                    .drivers
                    .nearest(pickup, k, max_radius_m, |d| filter.matches(d));
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
        }
        Ok(())
    }
}
