//! The restartable state of each entity, as its actor last committed it to the registry.
//! Plain data: a failed actor is restarted from its record (drivers, riders) or from the
//! store (trips).

use dispatch_engine::{CellId, DriverId, DriverStatus, Entry, Point, RiderId, Trip};
use dispatch_persistence::StoredDriver;

use crate::session::SessionHandle;
use crate::views::{DriverProfile, OfferView, RiderProfile, TripDriver, TripView};

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Driver(DriverId),
    Rider(RiderId),
}

impl Identity {
    /// `driver` or `rider` (a metrics label, a log field).
    pub fn role(&self) -> &'static str {
        match self {
            Identity::Driver(_) => "driver",
            Identity::Rider(_) => "rider",
        }
    }
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
    /// Boxed, as `trip`: most drivers have neither, and the record is kept twice per
    /// driver (the actor's state and the registry), so inline views made it ~880 bytes.
    pub offer: Option<Box<OfferView>>,
    pub trip: Option<Box<TripView>>,
    pub session: Option<SessionHandle>,
    /// Rises with every session attach and detach, so a stale grace timer is ignored.
    pub session_epoch: u64,
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
