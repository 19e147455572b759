//! One WebSocket text frame → one typed command, or the typed error PROTOCOL.md names.

use dispatch_actors::messages::DriverCommand;
use dispatch_actors::messages::{RideRequest, RiderCommand};
use dispatch_actors::{ApiError, ErrorCode};
use dispatch_engine::{Point, QuoteId, TripId};
use serde_json::Value;

use super::render::product_in;
use crate::wire::{DriverMessage, LatLng, RiderMessage};

/// A heading in degrees, normalised to [0, 360). `rem_euclid` alone rounds a tiny
/// negative heading (-4e-30) up to 360.0 itself (found by the `wire_decode` fuzz target).
fn compass(h: f64) -> f64 {
    let h = h.rem_euclid(360.0);
    if h >= 360.0 { 0.0 } else { h }
}

/// Longest free-text `reason` kept, in characters.
pub const MAX_REASON_CHARS: usize = 500;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

pub fn point(p: LatLng) -> Result<Point, ApiError> {
    Point::new(p.lat, p.lng).map_err(|e| ApiError::new(ErrorCode::InvalidLocation, e.to_string()))
}

fn reason(r: Option<String>) -> Option<String> {
    r.map(|r| r.chars().take(MAX_REASON_CHARS).collect())
}

fn id_field(s: String, field: &str) -> Result<String, ApiError> {
    if s.is_empty() || s.len() > 128 {
        return Err(bad(format!("`{field}` must be a non-empty id")));
    }
    Ok(s)
}

/// Splits a frame into its `req` (if readable) and its payload, classifying failures:
/// malformed JSON, a non-object, a missing or non-string `type`, or a mistyped `req` is
/// `bad_request`; a `type` this role does not know is `unknown_type`.
fn envelope(text: &str, known: &[&str]) -> Result<(Option<u64>, Value), (Option<u64>, ApiError)> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| (None, bad(format!("malformed JSON: {e}"))))?;
    let Value::Object(obj) = &v else {
        return Err((None, bad("a message must be a JSON object")));
    };
    let req = match obj.get("req") {
        None | Some(Value::Null) => None,
        Some(r) => Some(
            r.as_u64()
                .ok_or((None, bad("`req` must be an unsigned integer")))?,
        ),
    };
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err((req, bad("`type` must be a string"))),
        None => return Err((req, bad("missing `type`"))),
    };
    if !known.contains(&ty) {
        // Named back to the client, but never more than a few words of it: a 16 KiB type
        // would otherwise come back whole with every error.
        let shown: String = ty.chars().take(64).collect();
        let more = if shown.len() < ty.len() { "…" } else { "" };
        return Err((
            req,
            ApiError::new(
                ErrorCode::UnknownType,
                format!("unknown message type `{shown}{more}`"),
            ),
        ));
    }
    Ok((req, v))
}

fn typed<T: serde::de::DeserializeOwned>(
    req: Option<u64>,
    v: Value,
) -> Result<T, (Option<u64>, ApiError)> {
    serde_json::from_value(v).map_err(|e| (req, bad(format!("invalid message: {e}"))))
}

/// A driver's frame. On failure the `req` is returned when it could be read.
pub fn driver(text: &str) -> Result<(Option<u64>, DriverCommand), (Option<u64>, ApiError)> {
    let (req, v) = envelope(text, &DriverMessage::TYPES)?;
    let msg: DriverMessage = typed(req, v)?;
    let tid = |s: String| {
        id_field(s, "trip_id")
            .map(TripId::new)
            .map_err(|e| (req, e))
    };
    let cmd = match msg {
        DriverMessage::GoOnline => DriverCommand::GoOnline,
        DriverMessage::GoOffline => DriverCommand::GoOffline,
        DriverMessage::Location {
            lat,
            lng,
            heading,
            speed_mps,
            ts: _,
        } => {
            let position = point(LatLng { lat, lng }).map_err(|e| (req, e))?;
            if heading.is_some_and(|h| !h.is_finite())
                || speed_mps.is_some_and(|s| !s.is_finite() || s < 0.0)
            {
                return Err((
                    req,
                    bad("`heading` and `speed_mps` must be finite, `speed_mps` not negative"),
                ));
            }
            DriverCommand::Location {
                position,
                heading: heading.map(compass),
            }
        }
        DriverMessage::Accept { trip_id } => DriverCommand::Accept(tid(trip_id)?),
        DriverMessage::Decline { trip_id } => DriverCommand::Decline(tid(trip_id)?),
        DriverMessage::Arrived { trip_id } => DriverCommand::Arrived(tid(trip_id)?),
        DriverMessage::StartTrip { trip_id } => DriverCommand::StartTrip(tid(trip_id)?),
        DriverMessage::CompleteTrip { trip_id } => DriverCommand::CompleteTrip(tid(trip_id)?),
        DriverMessage::CancelTrip { trip_id, reason: r } => DriverCommand::CancelTrip {
            trip_id: tid(trip_id)?,
            reason: reason(r),
        },
    };
    Ok((req, cmd))
}

/// Coordinates are JSON objects. serde would also read a struct from an array, so
/// `[-73.5, 45.5]` (a GeoJSON `[lng, lat]` pair) would silently become lat -73.5, lng
/// 45.5: such a field is `bad_request` instead. `null` stays "absent".
fn coordinate_objects(
    req: Option<u64>,
    v: &Value,
    fields: &[&str],
) -> Result<(), (Option<u64>, ApiError)> {
    for f in fields {
        if let Some(x) = v.get(f)
            && !(x.is_object() || x.is_null())
        {
            return Err((
                req,
                bad(format!("`{f}` must be an object {{\"lat\", \"lng\"}}")),
            ));
        }
    }
    Ok(())
}

/// A rider's frame. On failure the `req` is returned when it could be read.
pub fn rider(text: &str) -> Result<(Option<u64>, RiderCommand), (Option<u64>, ApiError)> {
    let (req, v) = envelope(text, &RiderMessage::TYPES)?;
    if v["type"] == "request_ride" {
        coordinate_objects(req, &v, &["pickup", "dropoff"])?;
    }
    let msg: RiderMessage = typed(req, v)?;
    let cmd = match msg {
        RiderMessage::RequestRide {
            quote_id: Some(q), ..
        } => RiderCommand::RequestRide(RideRequest::Quote(QuoteId::new(
            id_field(q, "quote_id").map_err(|e| (req, e))?,
        ))),
        RiderMessage::RequestRide {
            quote_id: None,
            pickup: Some(p),
            dropoff: Some(d),
            product: Some(pr),
        } => RiderCommand::RequestRide(RideRequest::Direct {
            pickup: point(p).map_err(|e| (req, e))?,
            dropoff: point(d).map_err(|e| (req, e))?,
            product: product_in(pr),
        }),
        RiderMessage::RequestRide { .. } => {
            return Err((
                req,
                bad("request_ride needs `quote_id`, or `pickup`, `dropoff` and `product`"),
            ));
        }
        RiderMessage::CancelRide { trip_id, reason: r } => RiderCommand::CancelRide {
            trip_id: TripId::new(id_field(trip_id, "trip_id").map_err(|e| (req, e))?),
            reason: reason(r),
        },
        RiderMessage::Location { lat, lng, ts: _ } => {
            RiderCommand::Location(point(LatLng { lat, lng }).map_err(|e| (req, e))?)
        }
    };
    Ok((req, cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(
        r: Result<(Option<u64>, DriverCommand), (Option<u64>, ApiError)>,
    ) -> (Option<u64>, &'static str) {
        let (req, e) = r.unwrap_err();
        (req, e.code.as_str())
    }

    #[test]
    fn classifies_bad_frames() {
        assert_eq!(code(driver("{")), (None, "bad_request"));
        assert_eq!(code(driver("[1]")), (None, "bad_request"));
        assert_eq!(code(driver(r#"{"req":1}"#)), (Some(1), "bad_request"));
        assert_eq!(
            code(driver(r#"{"req":"x","type":"go_online"}"#)),
            (None, "bad_request")
        );
        assert_eq!(
            code(driver(r#"{"req":2,"type":"fly"}"#)),
            (Some(2), "unknown_type")
        );
        assert_eq!(
            code(driver(r#"{"req":3,"type":"request_ride"}"#)),
            (Some(3), "unknown_type")
        );
        assert_eq!(
            code(driver(r#"{"req":4,"type":"accept"}"#)),
            (Some(4), "bad_request")
        );
        assert_eq!(
            code(driver(
                r#"{"req":5,"type":"location","lat":91,"lng":0,"ts":1}"#
            )),
            (Some(5), "invalid_location")
        );
        assert_eq!(
            code(driver(
                r#"{"req":6,"type":"location","lat":"x","lng":0,"ts":1}"#
            )),
            (Some(6), "bad_request")
        );
    }

    #[test]
    fn decodes_good_frames_and_ignores_unknown_fields() {
        let (req, c) =
            driver(r#"{"req":9,"type":"accept","trip_id":"trp_1","extra":true}"#).unwrap();
        assert_eq!(
            (req, c),
            (Some(9), DriverCommand::Accept(TripId::new("trp_1")))
        );
        let (_, c) = rider(r#"{"type":"request_ride","pickup":{"lat":1,"lng":2},"dropoff":{"lat":1.1,"lng":2},"product":"xl"}"#).unwrap();
        assert!(matches!(
            c,
            RiderCommand::RequestRide(RideRequest::Direct { .. })
        ));
        let e = rider(r#"{"req":1,"type":"request_ride","pickup":{"lat":1,"lng":2}}"#).unwrap_err();
        assert_eq!(e.1.code, ErrorCode::BadRequest);
    }

    #[test]
    fn an_unknown_type_is_named_back_at_most_64_characters_long() {
        let long = "x".repeat(10_000);
        let (_, e) = driver(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownType);
        assert!(e.message.len() < 120, "{}", e.message);
        let (_, e) = driver(r#"{"type":"fly"}"#).unwrap_err();
        assert_eq!(e.message, "unknown message type `fly`");
    }

    #[test]
    fn coordinates_must_be_objects() {
        for bad in [
            r#"{"req":3,"type":"request_ride","pickup":[-73.5,45.5],"dropoff":{"lat":1,"lng":2},"product":"xl"}"#,
            r#"{"req":3,"type":"request_ride","pickup":{"lat":1,"lng":2},"dropoff":[1,2],"product":"xl"}"#,
            r#"{"req":3,"type":"request_ride","pickup":"1,2","dropoff":{"lat":1,"lng":2},"product":"xl"}"#,
        ] {
            let (req, e) = rider(bad).unwrap_err();
            assert_eq!((req, e.code), (Some(3), ErrorCode::BadRequest), "{bad}");
        }
        // A field of that name on another message is an unknown field, ignored.
        let (_, c) = rider(r#"{"type":"location","lat":1,"lng":2,"ts":1,"pickup":[1,2]}"#).unwrap();
        assert!(matches!(c, RiderCommand::Location(_)));
    }
}
