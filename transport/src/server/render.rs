//! Domain views → wire types. The only place that knows both.

use chrono::{DateTime, SecondsFormat};
use dispatch_actors::session::Outbound;
use dispatch_actors::views::{self, OfferView, TripView};
use dispatch_engine::{CancelledBy, DriverStatus, Point, Product, TripState};

use crate::wire;

pub fn rfc3339(ms: u64) -> String {
    DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn latlng(p: Point) -> wire::LatLng {
    wire::LatLng {
        lat: p.lat(),
        lng: p.lng(),
    }
}

pub fn product(p: Product) -> wire::Product {
    match p {
        Product::Economy => wire::Product::Economy,
        Product::Xl => wire::Product::Xl,
        Product::Premium => wire::Product::Premium,
    }
}

pub fn product_in(p: wire::Product) -> Product {
    match p {
        wire::Product::Economy => Product::Economy,
        wire::Product::Xl => Product::Xl,
        wire::Product::Premium => Product::Premium,
    }
}

fn state(s: TripState) -> wire::TripState {
    match s {
        TripState::Dispatching => wire::TripState::Dispatching,
        TripState::DriverAssigned => wire::TripState::DriverAssigned,
        TripState::DriverArrived => wire::TripState::DriverArrived,
        TripState::InProgress => wire::TripState::InProgress,
        TripState::Completed => wire::TripState::Completed,
        TripState::Cancelled => wire::TripState::Cancelled,
        TripState::NoDriverFound => wire::TripState::NoDriverFound,
    }
}

fn cancelled_by(c: CancelledBy) -> wire::CancelledBy {
    match c {
        CancelledBy::Rider => wire::CancelledBy::Rider,
        CancelledBy::Driver => wire::CancelledBy::Driver,
        CancelledBy::Admin => wire::CancelledBy::Admin,
        CancelledBy::System => wire::CancelledBy::System,
    }
}

pub fn driver_status(s: &DriverStatus) -> wire::DriverStatus {
    match s {
        DriverStatus::Offline => wire::DriverStatus::Offline,
        DriverStatus::Available => wire::DriverStatus::Available,
        DriverStatus::Offered(_) => wire::DriverStatus::Offered,
        DriverStatus::OnTrip(_) => wire::DriverStatus::OnTrip,
        DriverStatus::Suspended => wire::DriverStatus::Suspended,
    }
}

pub fn vehicle(v: &views::Vehicle) -> wire::Vehicle {
    wire::Vehicle {
        make: v.make.clone(),
        model: v.model.clone(),
        plate: v.plate.clone(),
        color: v.color.clone(),
        product: product(v.product),
        seats: v.seats,
    }
}

pub fn trip(t: &TripView) -> wire::Trip {
    wire::Trip {
        trip_id: t.trip_id.to_string(),
        state: state(t.state),
        version: t.version,
        rider_id: t.rider_id.to_string(),
        driver_id: t.driver_id.as_ref().map(|d| d.to_string()),
        product: product(t.product),
        pickup: latlng(t.pickup),
        dropoff: latlng(t.dropoff),
        quote: wire::TripQuote {
            fare_cents: t.quote_fare_cents,
            currency: t.currency.clone(),
            surge: t.surge,
        },
        driver: t.driver.as_ref().map(|d| wire::TripDriver {
            name: d.name.clone(),
            vehicle: vehicle(&d.vehicle),
            location: d.location.map(latlng),
        }),
        pickup_eta_s: t.pickup_eta_s,
        fare_cents: t.fare_cents,
        cancelled_by: t.cancelled_by.map(cancelled_by),
        cancel_reason: t.cancel_reason.clone(),
        created_at: rfc3339(t.created_at_ms),
        updated_at: rfc3339(t.updated_at_ms),
    }
}

fn offer(o: &OfferView, now_ms: u64) -> wire::Offer {
    wire::Offer {
        trip_id: o.trip_id.to_string(),
        pickup: latlng(o.pickup),
        dropoff: latlng(o.dropoff),
        product: product(o.product),
        fare_cents: o.fare_cents,
        currency: o.currency.clone(),
        pickup_distance_m: o.pickup_distance_m,
        pickup_eta_s: o.pickup_eta_s,
        expires_in_ms: o.expires_at_ms.saturating_sub(now_ms),
    }
}

fn status_from_str(s: &str) -> wire::DriverStatus {
    match s {
        "available" => wire::DriverStatus::Available,
        "offered" => wire::DriverStatus::Offered,
        "on_trip" => wire::DriverStatus::OnTrip,
        "suspended" => wire::DriverStatus::Suspended,
        _ => wire::DriverStatus::Offline,
    }
}

/// One outbound message as its wire type; `now_ms` turns deadlines into `expires_in_ms`.
pub fn outbound(m: Outbound, now_ms: u64) -> wire::ServerMessage {
    use wire::ServerMessage as S;
    match m {
        Outbound::DriverWelcome {
            driver_id,
            status,
            offer: o,
            trip: t,
        } => S::Welcome {
            driver_id: Some(driver_id),
            rider_id: None,
            status: Some(status_from_str(status.as_str())),
            offer: Some(o.as_ref().map(|o| offer(o, now_ms))),
            trip: t.as_ref().map(trip),
        },
        Outbound::RiderWelcome { rider_id, trip: t } => S::Welcome {
            driver_id: None,
            rider_id: Some(rider_id),
            status: None,
            offer: None,
            trip: t.as_ref().map(trip),
        },
        Outbound::Offer(o) => S::Offer(offer(&o, now_ms)),
        Outbound::OfferExpired { trip_id } => S::OfferExpired {
            trip_id: trip_id.to_string(),
        },
        Outbound::TripUpdate { req, trip: t } => S::TripUpdate {
            req,
            trip: trip(&t),
        },
        Outbound::DriverLocation {
            trip_id,
            lat,
            lng,
            heading,
            pickup_eta_s,
        } => S::DriverLocation {
            trip_id: trip_id.to_string(),
            lat,
            lng,
            heading,
            pickup_eta_s,
        },
        Outbound::Receipt(r) => S::Receipt {
            trip_id: r.trip_id.to_string(),
            fare_cents: r.fare_cents,
            currency: r.currency,
            distance_m: r.distance_m,
            duration_s: r.duration_s,
            surge: r.surge,
        },
        Outbound::Ack { req } => S::Ack { req },
        Outbound::Error { req, error } => S::Error {
            req,
            code: error.code.as_str().to_owned(),
            message: error.message,
        },
    }
}
