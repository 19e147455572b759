//! The wire types of PROTOCOL.md, defined once and shared by the server, the tests and
//! `loadgen`. Only serde here: this module compiles without the `server` feature. With the
//! `openapi` feature (part of `server`), each type is also a `utoipa::ToSchema`: the
//! OpenAPI and AsyncAPI documents take their schemas from here. Their examples are real replies of a
//! dispatchd, copied from a run.

use serde::{Deserialize, Deserializer, Serialize};

/// A WGS84 coordinate in decimal degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LatLng {
    pub lat: f64,
    pub lng: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Product {
    Economy,
    Xl,
    Premium,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TripState {
    Dispatching,
    DriverAssigned,
    DriverArrived,
    InProgress,
    Completed,
    Cancelled,
    NoDriverFound,
}

impl TripState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TripState::Completed | TripState::Cancelled | TripState::NoDriverFound
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CancelledBy {
    Rider,
    Driver,
    Admin,
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DriverStatus {
    Offline,
    Available,
    Offered,
    OnTrip,
    Suspended,
}

// ---------------------------------------------------------------------------------------
// REST bodies

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"name": "Ada Lovelace", "phone": "+1 212 555 0100"})))]
pub struct RegisterRider {
    pub name: String,
    pub phone: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Vehicle {
    pub make: String,
    pub model: String,
    pub plate: String,
    pub color: String,
    pub product: Product,
    pub seats: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"name": "Grace Hopper", "vehicle": {"make": "Toyota", "model": "Prius", "plate": "T123456C", "color": "white", "product": "economy", "seats": 4}})))]
pub struct RegisterDriver {
    pub name: String,
    pub vehicle: Vehicle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"rider_id": "rdr_b21a26f689f83f9b7ffbce0a207c5b40", "token": "tok_Xt22B_M3ZT2eA4YSePAAiEXW95UTcAehenD591ZLiT4"})))]
pub struct RiderRegistered {
    pub rider_id: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"driver_id": "drv_e359494fe950863d4033309862099d63", "token": "tok_MeTn4VzQhCEZQbjNezKMR-yzhbDxxdj4z6Ct92GjJQQ"})))]
pub struct DriverRegistered {
    pub driver_id: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"pickup": {"lat": 40.7484, "lng": -73.9857}, "dropoff": {"lat": 40.7614, "lng": -73.9776}, "product": "economy"})))]
pub struct QuoteRequest {
    pub pickup: LatLng,
    pub dropoff: LatLng,
    pub product: Product,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"quote_id": "qte_c0178b6e75bbc6bc8eb38811a2962f35", "product": "economy", "fare_cents": 700, "currency": "USD", "surge": 1.0, "distance_m": 2078, "duration_s": 249, "expires_at": "2026-12-05T17:23:53.136Z"})))]
pub struct QuoteResponse {
    pub quote_id: String,
    pub product: Product,
    pub fare_cents: i64,
    pub currency: String,
    pub surge: f64,
    pub distance_m: u64,
    pub duration_s: u64,
    pub expires_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NearbyDriver {
    pub lat: f64,
    pub lng: f64,
    pub heading: Option<f64>,
    pub product: Product,
    pub distance_m: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NearbyResponse {
    pub drivers: Vec<NearbyDriver>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// A REST error: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"error": {"code": "not_found", "message": "no such trip"}})))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

// ---------------------------------------------------------------------------------------
// The trip object

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TripQuote {
    pub fare_cents: i64,
    pub currency: String,
    pub surge: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TripDriver {
    pub name: String,
    pub vehicle: Vehicle,
    pub location: Option<LatLng>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"trip_id": "trp_39ee0c8492396d979939b8d1a159f1e5", "state": "driver_assigned", "version": 2, "rider_id": "rdr_629114dcd0ea5589a51f1cbd005e5bc1", "driver_id": "drv_1c684bce233fb3ac9359846aca58ad58", "product": "economy", "pickup": {"lat": 40.7484, "lng": -73.9857}, "dropoff": {"lat": 40.7614, "lng": -73.9776}, "quote": {"fare_cents": 700, "currency": "USD", "surge": 1.0}, "driver": {"name": "Grace Hopper", "vehicle": {"make": "Toyota", "model": "Prius", "plate": "T123456C", "color": "white", "product": "economy", "seats": 4}, "location": {"lat": 40.7505, "lng": -73.9934}}, "pickup_eta_s": 108, "fare_cents": null, "cancelled_by": null, "cancel_reason": null, "created_at": "2026-12-05T17:22:03.376Z", "updated_at": "2026-12-05T17:22:03.419Z"})))]
pub struct Trip {
    pub trip_id: String,
    pub state: TripState,
    pub version: u64,
    pub rider_id: String,
    pub driver_id: Option<String>,
    pub product: Product,
    pub pickup: LatLng,
    pub dropoff: LatLng,
    pub quote: TripQuote,
    pub driver: Option<TripDriver>,
    pub pickup_eta_s: Option<u64>,
    pub fare_cents: Option<i64>,
    pub cancelled_by: Option<CancelledBy>,
    pub cancel_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

// ---------------------------------------------------------------------------------------
// WebSocket messages

/// A client message's envelope: the optional `req` every message may carry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Envelope {
    pub req: Option<u64>,
}

/// Driver → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DriverMessage {
    GoOnline,
    GoOffline,
    Location {
        lat: f64,
        lng: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heading: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        speed_mps: Option<f64>,
        ts: u64,
    },
    Accept {
        trip_id: String,
    },
    Decline {
        trip_id: String,
    },
    Arrived {
        trip_id: String,
    },
    StartTrip {
        trip_id: String,
    },
    CompleteTrip {
        trip_id: String,
    },
    CancelTrip {
        trip_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl DriverMessage {
    pub const TYPES: [&'static str; 9] = [
        "go_online",
        "go_offline",
        "location",
        "accept",
        "decline",
        "arrived",
        "start_trip",
        "complete_trip",
        "cancel_trip",
    ];
}

/// Rider → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RiderMessage {
    RequestRide {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quote_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pickup: Option<LatLng>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dropoff: Option<LatLng>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        product: Option<Product>,
    },
    CancelRide {
        trip_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    Location {
        lat: f64,
        lng: f64,
        ts: u64,
    },
}

impl RiderMessage {
    pub const TYPES: [&'static str; 3] = ["request_ride", "cancel_ride", "location"];
}

/// An offer as the driver's app receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({"trip_id": "trp_39ee0c8492396d979939b8d1a159f1e5", "pickup": {"lat": 40.7484, "lng": -73.9857}, "dropoff": {"lat": 40.7614, "lng": -73.9776}, "product": "economy", "fare_cents": 700, "currency": "USD", "pickup_distance_m": 689, "pickup_eta_s": 108, "expires_in_ms": 14999})))]
pub struct Offer {
    pub trip_id: String,
    pub pickup: LatLng,
    pub dropoff: LatLng,
    pub product: Product,
    pub fare_cents: i64,
    pub currency: String,
    pub pickup_distance_m: u64,
    pub pickup_eta_s: u64,
    pub expires_in_ms: u64,
}

/// Server → driver or rider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Sent first on every connection. Drivers get `driver_id`, `status` and `offer`
    /// (null when none); riders get `rider_id`. Both get `trip` (null when none).
    Welcome {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        driver_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rider_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<DriverStatus>,
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "present"
        )]
        #[cfg_attr(feature = "openapi", schema(value_type = Option<Offer>))]
        offer: Option<Option<Offer>>,
        trip: Option<Trip>,
    },
    Offer(Offer),
    OfferExpired {
        trip_id: String,
    },
    TripUpdate {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<u64>,
        trip: Trip,
    },
    DriverLocation {
        trip_id: String,
        lat: f64,
        lng: f64,
        heading: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pickup_eta_s: Option<u64>,
    },
    Receipt {
        trip_id: String,
        fare_cents: i64,
        currency: String,
        distance_m: u64,
        duration_s: u64,
        surge: f64,
    },
    Ack {
        req: u64,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<u64>,
        code: String,
        message: String,
    },
}

/// A field that is present (possibly `null`) deserializes to `Some(..)`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_welcome_always_carries_offer_rider_welcome_never_does() {
        let d = ServerMessage::Welcome {
            driver_id: Some("drv_1".into()),
            rider_id: None,
            status: Some(DriverStatus::Available),
            offer: Some(None),
            trip: None,
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "welcome", "driver_id": "drv_1", "status": "available", "offer": null, "trip": null})
        );
        assert_eq!(serde_json::from_value::<ServerMessage>(v).unwrap(), d);
        let r = ServerMessage::Welcome {
            driver_id: None,
            rider_id: Some("rdr_1".into()),
            status: None,
            offer: None,
            trip: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "welcome", "rider_id": "rdr_1", "trip": null})
        );
        assert_eq!(serde_json::from_value::<ServerMessage>(v).unwrap(), r);
    }

    #[test]
    fn client_messages_use_snake_case_tags() {
        let m: DriverMessage =
            serde_json::from_str(r#"{"type":"start_trip","trip_id":"trp_1","req":3}"#).unwrap();
        assert_eq!(
            m,
            DriverMessage::StartTrip {
                trip_id: "trp_1".into()
            }
        );
        let m: RiderMessage =
            serde_json::from_str(r#"{"type":"request_ride","quote_id":"qte_1"}"#).unwrap();
        assert!(matches!(
            m,
            RiderMessage::RequestRide {
                quote_id: Some(_),
                pickup: None,
                ..
            }
        ));
        assert_eq!(DriverMessage::TYPES.len(), 9);
    }
}
