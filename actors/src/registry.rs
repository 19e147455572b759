//! Id → actor maps and the last committed snapshot of every entity.
//!
//! Sharded maps (`dashmap`), so a location ping touches one shard of one map, never a
//! global lock. An actor commits its snapshot here *before* it carries out the effects
//! of a change, so the supervisor can restart it from a state no one has been told
//! anything beyond.

use dashmap::DashMap;
use dispatch_engine::{
    CellId, DriverId, DriverStatus, Entry, Point, QuoteId, RiderId, Trip, TripId,
};
use ractor::ActorRef;

use crate::cell::CellMsg;
use crate::driver::DriverMsg;
use crate::rider::RiderMsg;
use crate::session::SessionHandle;
use crate::trip::TripMsg;
use crate::views::{DriverProfile, OfferView, Quote, RiderProfile, TripDriver, TripView};

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Driver(DriverId),
    Rider(RiderId),
}

/// A driver's restartable state.
#[derive(Debug, Clone)]
pub struct DriverRecord {
    pub id: DriverId,
    pub profile: DriverProfile,
    pub token_hash: [u8; 32],
    pub status: DriverStatus,
    pub position: Option<Point>,
    pub heading: Option<f64>,
    pub cell: Option<CellId>,
    pub offer: Option<OfferView>,
    pub trip: Option<TripView>,
    pub session: Option<SessionHandle>,
    /// Rises with every session attach and detach, so a stale grace timer is ignored.
    pub session_epoch: u64,
}

/// A rider's restartable state.
#[derive(Debug, Clone)]
pub struct RiderRecord {
    pub id: RiderId,
    pub profile: RiderProfile,
    pub token_hash: [u8; 32],
    pub trip: Option<TripView>,
    pub position: Option<Point>,
    pub session: Option<SessionHandle>,
}

/// A live trip's state. Its history is in the store's journal.
#[derive(Debug, Clone)]
pub struct TripRecord {
    pub trip: Trip,
    pub driver: Option<TripDriver>,
    /// The trip's ledger entries so far (the payment's state derives from them).
    pub entries: Vec<Entry>,
}

#[derive(Debug, Default)]
pub struct Registry {
    pub drivers: DashMap<DriverId, ActorRef<DriverMsg>>,
    pub riders: DashMap<RiderId, ActorRef<RiderMsg>>,
    /// Live (non-final) trips only.
    pub trips: DashMap<TripId, ActorRef<TripMsg>>,
    pub cells: DashMap<CellId, ActorRef<CellMsg>>,
    pub tokens: DashMap<[u8; 32], Identity>,
    pub driver_records: DashMap<DriverId, DriverRecord>,
    pub rider_records: DashMap<RiderId, RiderRecord>,
    pub trip_records: DashMap<TripId, TripRecord>,
    /// The latest view of every live trip (finished ones are read from the store).
    pub trip_views: DashMap<TripId, TripView>,
    pub quotes: DashMap<QuoteId, Quote>,
}

impl Registry {
    pub fn driver(&self, id: &DriverId) -> Option<ActorRef<DriverMsg>> {
        self.drivers.get(id).map(|r| r.value().clone())
    }
    pub fn rider(&self, id: &RiderId) -> Option<ActorRef<RiderMsg>> {
        self.riders.get(id).map(|r| r.value().clone())
    }
    pub fn trip(&self, id: &TripId) -> Option<ActorRef<TripMsg>> {
        self.trips.get(id).map(|r| r.value().clone())
    }
    pub fn cell(&self, id: &CellId) -> Option<ActorRef<CellMsg>> {
        self.cells.get(id).map(|r| r.value().clone())
    }
}
