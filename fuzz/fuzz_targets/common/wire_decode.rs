//! The checks of the `wire_decode` fuzz target: one WebSocket text frame through
//! `dispatch_transport::server::decode::{driver, rider}`, and what PROTOCOL.md and
//! docs/api.md promise about the outcome.
//!
//! This file is shared: `fuzz/fuzz_targets/wire_decode.rs` runs it under libFuzzer, and
//! `transport/tests/fuzz_regressions.rs` includes it with `#[path]` and replays every input
//! of `fuzz/corpus/wire_decode/` and `fuzz/regressions/wire_decode/` through it.
//!
//! # What is checked, for both roles
//! - Neither decoder panics.
//! - The envelope: malformed JSON, a non-object, a mistyped `req`, a missing or non-string
//!   `type` are `bad_request`; a `type` the role does not know is `unknown_type`; the
//!   error carries the frame's `req` whenever it was readable (and only then).
//! - The outcome of a known type, from an independent reading of the frame with
//!   `serde_json::Value`: a well-typed message is accepted, a mistyped one is
//!   `bad_request`, a coordinate out of range is `invalid_location` (and that code means
//!   one was), an id must be 1 to 128 bytes.
//! - What an accepted command holds: the frame's own values; every point finite with
//!   `lat` in [-90, 90] and `lng` in [-180, 180]; ids as sent, non-empty and at most 128
//!   bytes; a `heading` finite and normalised to [0, 360) (docs/api.md); a `reason` the
//!   sent one cut to at most `MAX_REASON_CHARS` characters.

use dispatch_actors::messages::{DriverCommand, RideRequest, RiderCommand};
use dispatch_actors::{ApiError, ErrorCode};
use dispatch_engine::{Point, Product};
use dispatch_transport::server::decode::{self, MAX_REASON_CHARS};
use dispatch_transport::wire::{DriverMessage, RiderMessage};
use serde_json::{Map, Value};

/// The longest id the decoder takes, in bytes.
const MAX_ID_BYTES: usize = 128;

type Outcome = Result<Option<u64>, (Option<u64>, ErrorCode)>;

/// Checks one fuzz input: a frame when it is UTF-8 (a WebSocket text frame always is).
pub fn check(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_frame(text);
    }
}

fn check_frame(text: &str) {
    let value: Option<Value> = serde_json::from_str(text).ok();
    let obj = value.as_ref().and_then(Value::as_object);

    let driver = decode::driver(text);
    check_decoded(
        "driver",
        text,
        obj,
        &DriverMessage::TYPES,
        &driver,
        check_driver,
    );
    let rider = decode::rider(text);
    check_decoded(
        "rider",
        text,
        obj,
        &RiderMessage::TYPES,
        &rider,
        check_rider,
    );
}

/// What `decode::driver` and `decode::rider` return: the request id with the command, or
/// with the error.
type Decoded<C> = Result<(Option<u64>, C), (Option<u64>, ApiError)>;

/// One role's decoding of the frame: the outcome the envelope rules give, and, when it
/// decoded, the command's fields (by `check_command`).
fn check_decoded<C>(
    role: &str,
    text: &str,
    obj: Option<&Map<String, Value>>,
    known: &[&str],
    decoded: &Decoded<C>,
    check_command: fn(&str, &Map<String, Value>, &C),
) {
    let got = decoded
        .as_ref()
        .map(|(req, _)| *req)
        .map_err(|(req, e)| (*req, e.code));
    check_outcome(role, text, obj, known, got);
    if let (Ok((_, cmd)), Some(obj)) = (decoded, obj) {
        check_command(text, obj, cmd);
    }
}

/// What the envelope rules give, before the message's own fields are read.
fn envelope(obj: Option<&Map<String, Value>>, known: &[&str]) -> Result<Option<u64>, Outcome> {
    let Some(obj) = obj else {
        return Err(Err((None, ErrorCode::BadRequest)));
    };
    let req = match obj.get("req") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) => Some(n),
            None => return Err(Err((None, ErrorCode::BadRequest))),
        },
    };
    match obj.get("type") {
        Some(Value::String(t)) if known.contains(&t.as_str()) => Ok(req),
        Some(Value::String(_)) => Err(Err((req, ErrorCode::UnknownType))),
        _ => Err(Err((req, ErrorCode::BadRequest))),
    }
}

/// What a known message type must come to: `Some(Ok(()))` accepted, `Some(Err(code))`
/// refused with that code, `None` when this reading does not decide.
type Verdict = Option<Result<(), ErrorCode>>;

fn is_number(v: Option<&Value>) -> bool {
    v.is_some_and(Value::is_number)
}

fn is_opt_number(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null | Value::Number(_)))
}

fn is_opt_string(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null | Value::String(_)))
}

fn is_absent(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null))
}

fn in_range(lat: f64, lng: f64) -> bool {
    lat.is_finite()
        && lng.is_finite()
        && (-90.0..=90.0).contains(&lat)
        && (-180.0..=180.0).contains(&lng)
}

/// Whether a value is an object whose `lat` and `lng` are numbers out of range.
fn out_of_range(v: Option<&Value>) -> bool {
    v.and_then(Value::as_object).is_some_and(bad_point)
}

/// Whether an object's `lat` and `lng` are numbers out of range.
fn bad_point(o: &Map<String, Value>) -> bool {
    match (
        o.get("lat").and_then(Value::as_f64),
        o.get("lng").and_then(Value::as_f64),
    ) {
        (Some(lat), Some(lng)) => !in_range(lat, lng),
        _ => false,
    }
}

/// An object whose `lat` and `lng` are numbers.
fn is_latlng(v: Option<&Value>) -> bool {
    v.and_then(Value::as_object)
        .is_some_and(|o| is_number(o.get("lat")) && is_number(o.get("lng")))
}

fn id_verdict(v: Option<&Value>) -> Result<(), ErrorCode> {
    match v {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Ok(()),
        _ => Err(ErrorCode::BadRequest),
    }
}

fn driver_verdict(ty: &str, o: &Map<String, Value>) -> Verdict {
    Some(match ty {
        "go_online" | "go_offline" => Ok(()),
        "accept" | "decline" | "arrived" | "start_trip" | "complete_trip" => {
            id_verdict(o.get("trip_id"))
        }
        "cancel_trip" if is_opt_string(o.get("reason")) => id_verdict(o.get("trip_id")),
        "cancel_trip" => Err(ErrorCode::BadRequest),
        "location" => {
            let typed = is_number(o.get("lat"))
                && is_number(o.get("lng"))
                && o.get("ts").and_then(Value::as_u64).is_some()
                && is_opt_number(o.get("heading"))
                && is_opt_number(o.get("speed_mps"));
            if !typed {
                Err(ErrorCode::BadRequest)
            } else if bad_point(o) {
                Err(ErrorCode::InvalidLocation)
            } else if o
                .get("speed_mps")
                .and_then(Value::as_f64)
                .is_some_and(|s| s < 0.0)
            {
                Err(ErrorCode::BadRequest)
            } else {
                Ok(())
            }
        }
        _ => return None,
    })
}

fn rider_verdict(ty: &str, o: &Map<String, Value>) -> Verdict {
    Some(match ty {
        "cancel_ride" if is_opt_string(o.get("reason")) => id_verdict(o.get("trip_id")),
        "cancel_ride" => Err(ErrorCode::BadRequest),
        "location" => {
            let typed = is_number(o.get("lat"))
                && is_number(o.get("lng"))
                && o.get("ts").and_then(Value::as_u64).is_some();
            if !typed {
                Err(ErrorCode::BadRequest)
            } else if bad_point(o) {
                Err(ErrorCode::InvalidLocation)
            } else {
                Ok(())
            }
        }
        "request_ride" => {
            let (q, p, d, pr) = (
                o.get("quote_id"),
                o.get("pickup"),
                o.get("dropoff"),
                o.get("product"),
            );
            let product_ok = pr
                .and_then(Value::as_str)
                .is_some_and(|s| matches!(s, "economy" | "xl" | "premium"));
            if matches!(q, Some(Value::String(_))) && is_absent(p) && is_absent(d) && is_absent(pr)
            {
                id_verdict(q)
            } else if is_absent(q) && is_latlng(p) && is_latlng(d) && product_ok {
                if out_of_range(p) || out_of_range(d) {
                    Err(ErrorCode::InvalidLocation)
                } else {
                    Ok(())
                }
            } else if is_absent(q)
                && (is_absent(p) || is_latlng(p))
                && (is_absent(d) || is_latlng(d))
                && (is_absent(pr) || product_ok)
            {
                // Well typed, but neither a quote nor a whole direct request.
                Err(ErrorCode::BadRequest)
            } else {
                return None;
            }
        }
        _ => return None,
    })
}

fn check_outcome(
    role: &str,
    text: &str,
    obj: Option<&Map<String, Value>>,
    known: &[&str],
    got: Outcome,
) {
    let req = match envelope(obj, known) {
        Err(want) => {
            assert_eq!(got, want, "{role} envelope of {text:?}");
            return;
        }
        Ok(req) => req,
    };
    let obj = obj.expect("an envelope that passed is an object");
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .expect("a known type");
    let got_req = match got {
        Ok(r) | Err((r, _)) => r,
    };
    assert_eq!(
        got_req, req,
        "{role}: the frame's req is not echoed: {text:?}"
    );
    let code = got.err().map(|(_, c)| c);
    assert!(
        matches!(
            code,
            None | Some(ErrorCode::BadRequest | ErrorCode::InvalidLocation)
        ),
        "{role}: {code:?} for a frame of a known type: {text:?}"
    );
    if code == Some(ErrorCode::InvalidLocation) {
        let has_bad_point = match ty {
            "location" => bad_point(obj),
            "request_ride" => out_of_range(obj.get("pickup")) || out_of_range(obj.get("dropoff")),
            _ => false,
        };
        assert!(
            has_bad_point,
            "{role}: invalid_location without a coordinate out of range: {text:?}"
        );
    }
    let verdict = if role == "driver" {
        driver_verdict(ty, obj)
    } else {
        rider_verdict(ty, obj)
    };
    if let Some(want) = verdict {
        let got = code.map_or(Ok(()), Err);
        assert_eq!(got, want, "{role} {ty}: {text:?}");
    }
}

fn check_point(p: Point, o: Option<&Map<String, Value>>, what: &str, text: &str) {
    let lat = o.and_then(|o| o.get("lat")).and_then(Value::as_f64);
    let lng = o.and_then(|o| o.get("lng")).and_then(Value::as_f64);
    assert!(
        in_range(p.lat(), p.lng()),
        "{what} {p:?} is out of range: {text:?}"
    );
    assert_eq!(
        (Some(p.lat()), Some(p.lng())),
        (lat, lng),
        "{what} is not the frame's: {text:?}"
    );
}

fn check_id(id: &str, v: Option<&Value>, what: &str, text: &str) {
    assert!(
        !id.is_empty() && id.len() <= MAX_ID_BYTES,
        "{what} {id:?} is empty or over {MAX_ID_BYTES} bytes: {text:?}"
    );
    assert_eq!(Some(id), v.and_then(Value::as_str), "{what}: {text:?}");
}

fn check_reason(reason: Option<&str>, v: Option<&Value>, text: &str) {
    match (reason, v) {
        (None, None | Some(Value::Null)) => {}
        (Some(r), Some(Value::String(sent))) => {
            let n = r.chars().count();
            assert!(
                n <= MAX_REASON_CHARS,
                "a reason of {n} chars kept: {text:?}"
            );
            assert!(
                sent.starts_with(r),
                "the reason is not the sent one: {text:?}"
            );
            let want = sent.chars().count().min(MAX_REASON_CHARS);
            assert_eq!(n, want, "the reason was cut to {n} chars: {text:?}");
        }
        (r, v) => panic!("reason {r:?} decoded from {v:?}: {text:?}"),
    }
}

fn check_driver(text: &str, o: &Map<String, Value>, cmd: &DriverCommand) {
    let ty = o.get("type").and_then(Value::as_str);
    let trip_id = |id: &str| check_id(id, o.get("trip_id"), "trip_id", text);
    // A command about one trip and nothing else: its id is the frame's.
    let about_trip = |id: &str, name: &'static str| {
        trip_id(id);
        name
    };
    let want = match cmd {
        DriverCommand::GoOnline => "go_online",
        DriverCommand::GoOffline => "go_offline",
        DriverCommand::Location { position, heading } => {
            check_point(*position, Some(o), "position", text);
            match (heading, o.get("heading")) {
                (None, None | Some(Value::Null)) => {}
                (Some(h), Some(v)) if v.is_number() => {
                    assert!(
                        h.is_finite() && (0.0..360.0).contains(h),
                        "heading {v} decoded as {h:?}, not in [0, 360): {text:?}"
                    );
                }
                (h, v) => panic!("heading {h:?} decoded from {v:?}: {text:?}"),
            }
            if let Some(s) = o.get("speed_mps").and_then(Value::as_f64) {
                assert!(
                    s.is_finite() && s >= 0.0,
                    "accepted speed_mps {s}: {text:?}"
                );
            }
            "location"
        }
        DriverCommand::Accept(id) => about_trip(id.as_str(), "accept"),
        DriverCommand::Decline(id) => about_trip(id.as_str(), "decline"),
        DriverCommand::Arrived(id) => about_trip(id.as_str(), "arrived"),
        DriverCommand::StartTrip(id) => about_trip(id.as_str(), "start_trip"),
        DriverCommand::CompleteTrip(id) => about_trip(id.as_str(), "complete_trip"),
        DriverCommand::CancelTrip {
            trip_id: id,
            reason,
        } => {
            trip_id(id.as_str());
            check_reason(reason.as_deref(), o.get("reason"), text);
            "cancel_trip"
        }
    };
    assert_eq!(ty, Some(want), "a driver {cmd:?} from {text:?}");
}

fn check_rider(text: &str, o: &Map<String, Value>, cmd: &RiderCommand) {
    let ty = o.get("type").and_then(Value::as_str);
    let want = match cmd {
        RiderCommand::RequestRide(RideRequest::Quote(q)) => {
            check_id(q.as_str(), o.get("quote_id"), "quote_id", text);
            "request_ride"
        }
        RiderCommand::RequestRide(RideRequest::Direct {
            pickup,
            dropoff,
            product,
        }) => {
            assert!(
                is_absent(o.get("quote_id")),
                "a direct request from a frame with a quote: {text:?}"
            );
            let point = |k| o.get(k).and_then(Value::as_object);
            check_point(*pickup, point("pickup"), "pickup", text);
            check_point(*dropoff, point("dropoff"), "dropoff", text);
            let sent = o.get("product").and_then(Value::as_str);
            let want = match product {
                Product::Economy => "economy",
                Product::Xl => "xl",
                Product::Premium => "premium",
            };
            assert_eq!(sent, Some(want), "product: {text:?}");
            "request_ride"
        }
        RiderCommand::CancelRide { trip_id, reason } => {
            check_id(trip_id.as_str(), o.get("trip_id"), "trip_id", text);
            check_reason(reason.as_deref(), o.get("reason"), text);
            "cancel_ride"
        }
        RiderCommand::Location(p) => {
            check_point(*p, Some(o), "position", text);
            "location"
        }
    };
    assert_eq!(ty, Some(want), "a rider {cmd:?} from {text:?}");
}
