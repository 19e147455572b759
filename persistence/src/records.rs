//! What is stored, per tree. Built from the engine's types; the actors convert to and
//! from their live state.

use dispatch_engine::{
    DriverId, DriverProfile, DriverStatus, Point, Product, QuoteId, RateCard, RiderId,
    RiderProfile, Trip, TripDriver,
};
use serde::{Deserialize, Serialize};

/// `drivers/<driver id>`: profile, token hash, last status and position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDriver {
    pub id: DriverId,
    pub profile: DriverProfile,
    pub token_hash: [u8; 32],
    pub status: DriverStatus,
    pub position: Option<Point>,
    pub heading: Option<f64>,
}

/// `riders/<rider id>`: profile and token hash. A rider's active trip is the trip that
/// names it, so it is not stored twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRider {
    pub id: RiderId,
    pub profile: RiderProfile,
    pub token_hash: [u8; 32],
}

/// `trips/<trip id>`: the latest state of a trip, including its open offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredTrip {
    pub trip: Trip,
    pub driver: Option<TripDriver>,
}

/// `meta/pricing`: the rate cards an operator set at run time (`PUT /admin/pricing`).
/// The currency is not stored: it is the server's `--currency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPricing {
    pub economy: RateCard,
    pub xl: RateCard,
    pub premium: RateCard,
}

/// `meta/surge`: an operator's surge pins (H3 index → multiplier) and city-wide cap.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StoredSurge {
    pub pins: Vec<(u64, f64)>,
    pub city_cap: Option<f64>,
}

/// `provider/<idempotency key>`: what the in-process payment provider did for one
/// request (it stands in for a card processor, whose records outlive our crashes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRecord {
    pub key: String,
    pub amount_cents: i64,
    pub approved: bool,
    pub at_ms: u64,
}

/// One transition of a trip: the engine decides it (`Decision::journal`); stored as is.
pub use dispatch_engine::Transition;

/// `journal/<trip id>\0<version BE>`: a transition and the whole trip right after it,
/// so replaying the journal alone rebuilds every trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub transition: Transition,
    pub trip: StoredTrip,
}

/// `quotes/<quote id>`: an upfront price, until it is used or expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredQuote {
    pub quote_id: QuoteId,
    pub rider_id: RiderId,
    pub product: Product,
    pub pickup: Point,
    pub dropoff: Point,
    pub fare_cents: i64,
    pub currency: String,
    pub surge: f64,
    pub distance_m: u64,
    pub duration_s: u64,
    pub expires_at_ms: u64,
}
