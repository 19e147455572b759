//! Plain-data views of the live state, handed to the transport to render and to new
//! sessions in `welcome`. No JSON here: the transport owns the wire format.

use serde::{Deserialize, Serialize};

use dispatch_engine::{CancelledBy, DriverId, Point, Product, RiderId, Trip, TripId, TripState};
pub use dispatch_engine::{DriverProfile, RiderProfile, TripDriver, Vehicle};

/// The trip object of PROTOCOL.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TripView {
    pub trip_id: TripId,
    pub state: TripState,
    pub version: u64,
    pub rider_id: RiderId,
    pub driver_id: Option<DriverId>,
    pub product: Product,
    pub pickup: Point,
    pub dropoff: Point,
    pub quote_fare_cents: i64,
    pub currency: String,
    pub surge: f64,
    pub driver: Option<TripDriver>,
    pub pickup_eta_s: Option<u64>,
    pub fare_cents: Option<i64>,
    pub cancelled_by: Option<CancelledBy>,
    pub cancel_reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl TripView {
    pub fn of(trip: &Trip, driver: Option<TripDriver>) -> Self {
        Self {
            trip_id: trip.id.clone(),
            state: trip.state(),
            version: trip.version(),
            rider_id: trip.rider_id.clone(),
            driver_id: trip.driver_id().cloned(),
            product: trip.product,
            pickup: trip.pickup,
            dropoff: trip.dropoff,
            quote_fare_cents: trip.quote.fare_cents,
            currency: trip.quote.currency.clone(),
            surge: trip.quote.surge,
            driver: if trip.driver_id().is_some() {
                driver
            } else {
                None
            },
            pickup_eta_s: trip.pickup_eta_s(),
            fare_cents: trip.fare_cents(),
            cancelled_by: trip.cancelled_by(),
            cancel_reason: trip.cancel_reason().map(str::to_owned),
            created_at_ms: trip.created_at_ms,
            updated_at_ms: trip.updated_at_ms(),
        }
    }
}

/// An offer as the driver sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferView {
    pub trip_id: TripId,
    pub pickup: Point,
    pub dropoff: Point,
    pub product: Product,
    pub fare_cents: i64,
    pub currency: String,
    pub pickup_distance_m: u64,
    pub pickup_eta_s: u64,
    pub expires_at_ms: u64,
    /// The span that made the offer, when the ride is traced: the driver's actor and the
    /// session that writes the offer open theirs as its children (never on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: crate::tracecontext::Trace,
    /// A request's first offer: when it was handed on towards the driver's session, whose
    /// writer times its queue and its write from here (never on the wire).
    #[serde(skip)]
    pub queued_at: Option<std::time::Instant>,
}

impl OfferView {
    pub fn of(trip: &Trip, offer: &dispatch_engine::Offer) -> Self {
        Self {
            trip_id: trip.id.clone(),
            pickup: trip.pickup,
            dropoff: trip.dropoff,
            product: trip.product,
            fare_cents: trip.quote.fare_cents,
            currency: trip.quote.currency.clone(),
            pickup_distance_m: offer.pickup_distance_m,
            pickup_eta_s: offer.pickup_eta_s,
            expires_at_ms: offer.expires_at_ms,
            trace: None,
            queued_at: None,
        }
    }
}

/// The end-of-trip summary sent to the rider after `completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub trip_id: TripId,
    pub fare_cents: i64,
    pub currency: String,
    pub distance_m: u64,
    pub duration_s: u64,
    pub surge: f64,
}

/// An available driver as `GET /v1/drivers/nearby` shows it: no id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearbyDriver {
    pub position: Point,
    pub heading: Option<f64>,
    pub product: Product,
    pub distance_m: u64,
}

/// An upfront quote, live and stored alike (the store's shape serves both).
pub use dispatch_persistence::StoredQuote as Quote;
