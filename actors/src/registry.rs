//! Id → actor maps and the last committed record of every entity: private to the actors
//! (the transport goes through `System`).
//!
//! Sharded maps (`dashmap`), so a location ping touches one shard of one map, never a
//! global lock. An actor commits its record here *before* it carries out the effects
//! of a change, so the supervisor can restart it from a state no one has been told
//! anything beyond.

use dashmap::{DashMap, DashSet};
use dispatch_engine::{CellId, DriverId, QuoteId, RiderId, TripId};
use ractor::ActorRef;

use crate::messages::{CellMsg, DriverMsg, RiderMsg, TripMsg};
use crate::records::{DriverRecord, Identity, RiderRecord, TripRecord};
use crate::views::{Quote, TripView};

#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) drivers: DashMap<DriverId, ActorRef<DriverMsg>>,
    pub(crate) riders: DashMap<RiderId, ActorRef<RiderMsg>>,
    /// Live (non-final) trips only.
    pub(crate) trips: DashMap<TripId, ActorRef<TripMsg>>,
    pub(crate) cells: DashMap<CellId, ActorRef<CellMsg>>,
    pub(crate) tokens: DashMap<[u8; 32], Identity>,
    pub(crate) driver_records: DashMap<DriverId, DriverRecord>,
    pub(crate) rider_records: DashMap<RiderId, RiderRecord>,
    pub(crate) trip_records: DashMap<TripId, TripRecord>,
    /// The latest view of every live trip (finished ones are read from the store).
    pub(crate) trip_views: DashMap<TripId, TripView>,
    pub(crate) quotes: DashMap<QuoteId, Quote>,
    /// Live trips whose actor failed and which the trip supervisor is reading back from
    /// the store (retrying while the store is away): commands to them are answered
    /// `unavailable`, not judged from the store as if they had ended.
    pub(crate) reloading: DashSet<TripId>,
}

impl Registry {
    pub(crate) fn driver(&self, id: &DriverId) -> Option<ActorRef<DriverMsg>> {
        self.drivers.get(id).map(|r| r.value().clone())
    }
    pub(crate) fn rider(&self, id: &RiderId) -> Option<ActorRef<RiderMsg>> {
        self.riders.get(id).map(|r| r.value().clone())
    }
    pub(crate) fn trip(&self, id: &TripId) -> Option<ActorRef<TripMsg>> {
        self.trips.get(id).map(|r| r.value().clone())
    }
    pub(crate) fn cell(&self, id: &CellId) -> Option<ActorRef<CellMsg>> {
        self.cells.get(id).map(|r| r.value().clone())
    }

    /// A trip that finished lives in the store only: its last record and view go, so
    /// reads of it go there. Both ways a trip is known to have finished call it: its own
    /// actor's final transition, and a read back that finds it finished.
    pub(crate) fn forget_finished(&self, id: &TripId) {
        self.trip_records.remove(id);
        self.trip_views.remove(id);
    }
}
