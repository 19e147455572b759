//! Hostile input (issue 7), as one table run over real WebSockets against one running
//! server. Every case is sent on the same long-lived driver or rider session (or as a REST
//! registration), and after each one the loop checks that
//!
//! (a) exactly the documented replies arrived: the error code of PROTOCOL.md's table as
//!     docs/api.md applies it, with the `req` echoed when the frame had a readable one,
//!     or the `ack` where the docs accept the input (an ignored unknown field);
//! (b) the session lives on: it still answers a valid message, and nothing else was
//!     owed before that answer (so no case got a second, late reply);
//! (c) nothing else changed: the driver, the rider, the fleet, the trips, the cells and the
//!     stats, as the admin API shows them, are identical before and after the case (so no
//!     trip was created, nobody was registered and no session closed).
//!
//! A failing case is named, and the loop goes on with the next one, so one run reports
//! every failing case.
//!
//! Timestamps: the only timestamp a client sends is `ts` (Unix ms) in a `location`
//! message (driver and rider). It must be present and an unsigned integer; its value is
//! not used (the server orders pings by arrival), so a ping from 1970 or from the year
//! 10,000 is acknowledged like any other and changes nothing but the position it
//! carries (here always the current one). Timestamp-looking fields the protocol does not
//! have (`created_at`, `expires_at`, …) are unknown fields, ignored.
//!
//! Server flags: `--bad-message-limit 500` (the default 50 is tested in errors.rs; here
//! every case's bad frames add up on one session, about a hundred of them, while the
//! bursts at the end are answered `rate_limited` thousands of times, which must not count
//! as bad), `--location-max-per-s 50` (headroom for the few valid pings in the table) and
//! `--ws-messages-max-per-s 1000` (the table's pace stays under it).

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use dispatch_tests::{Client, DRIVER_TRIP_COMMANDS, TestServer, WAIT, assert_error_body};
use dispatch_transport::wire::ServerMessage;
use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ADMIN_TOKEN: &str = "hostile-test-admin-token";
const DRIVER_AT: (f64, f64) = (45.5, -73.56);
const RIDER_AT: (f64, f64) = (45.503, -73.569);
const LOCATION_MAX_PER_S: u64 = 50;
const MESSAGES_MAX_PER_S: u64 = 1000;
const BAD_MESSAGE_LIMIT: u64 = 500;
/// `--max-frame-bytes` and `--ws-hard-max-bytes`, left at their defaults.
const MAX_FRAME: usize = 16 * 1024;
const HARD_MAX: usize = 2 * 1024 * 1024;
const MB: usize = 1 << 20;
/// A trip id of the right shape that no trip has.
const NO_TRIP: &str = "trp_doesnotexist0000";

const BAD: &str = "bad_request";
const UNKNOWN: &str = "unknown_type";
const LOCATION: &str = "invalid_location";
const TOO_LARGE: &str = "too_large";
const NOT_FOUND: &str = "not_found";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The driver's session (online, available, at `DRIVER_AT`).
    Driver,
    /// The rider's session (no trip, at `RIDER_AT`).
    Rider,
    /// A REST registration, no token.
    Rest,
}

enum Input {
    /// Frames sent one after another on the role's session.
    Frames(Vec<Message>),
    /// `n` valid messages `make(i)` sent as fast as the session takes them, all with a
    /// `req` but every tenth.
    Burst { n: u64, make: fn(u64) -> Value },
    /// `POST path` with this raw JSON body.
    Post { path: &'static str, body: String },
}

/// One reply as the test compares it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Reply {
    Ack(u64),
    Error(Option<u64>, String),
    Other(String),
}

enum Expect {
    /// Exactly these replies (in any order: an error found while decoding is sent at
    /// once, an actor's answer when the actor gets to it), then nothing until the next
    /// message is answered.
    Replies(Vec<Reply>),
    /// Every message with a `req` is answered exactly once, `ack` or `rate_limited`;
    /// with `limited`, some must be `rate_limited`, far more than the bad-message limit.
    EachAnswered { limited: bool },
    /// HTTP status and error code.
    Http(u16, &'static str),
}

struct Case {
    name: String,
    role: Role,
    input: Input,
    expect: Expect,
}

fn ack(req: u64) -> Reply {
    Reply::Ack(req)
}

/// An error without `req`: the frame had no readable one.
fn err(code: &str) -> Reply {
    Reply::Error(None, code.to_owned())
}

/// An error echoing `req`.
fn err_req(req: u64, code: &str) -> Reply {
    Reply::Error(Some(req), code.to_owned())
}

fn text(s: impl Into<String>) -> Message {
    Message::Text(s.into().into())
}

fn binary(b: impl Into<Vec<u8>>) -> Message {
    Message::Binary(b.into().into())
}

/// `go_online` with `req`, padded by an unknown field to exactly `len` bytes of `fill`
/// (one or two bytes a character).
fn padded(req: u64, len: usize, fill: char) -> String {
    let head = format!(r#"{{"type":"go_online","req":{req},"pad":""#);
    let room = len - head.len() - 2;
    let mut pad = fill.to_string().repeat(room / fill.len_utf8());
    pad.push_str(&"x".repeat(room - pad.len()));
    let s = format!("{head}{pad}\"}}");
    assert_eq!(s.len(), len);
    s
}

fn nested(open: &str, inner: &str, close: &str, depth: usize) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

fn driver_ping(lat: &str, lng: &str, req: u64) -> String {
    format!(r#"{{"type":"location","req":{req},"lat":{lat},"lng":{lng},"ts":1}}"#)
}

fn rider_request(pickup: &str, req: u64) -> String {
    format!(
        r#"{{"type":"request_ride","req":{req},"pickup":{pickup},"dropoff":{{"lat":45.52,"lng":-73.58}},"product":"economy"}}"#
    )
}

fn driver_body(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = json!({"name": "Dana", "vehicle": {"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": "economy", "seats": 4}});
    edit(&mut v);
    v.to_string()
}

fn rider_body(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = json!({"name": "Riley", "phone": "+1 555 0100"});
    edit(&mut v);
    v.to_string()
}

#[derive(Default)]
struct Table(Vec<Case>);

impl Table {
    fn frames(&mut self, role: Role, name: &str, frames: Vec<Message>, replies: Vec<Reply>) {
        self.0.push(Case {
            name: format!("{role:?}: {name}"),
            role,
            input: Input::Frames(frames),
            expect: Expect::Replies(replies),
        });
    }

    /// One text frame.
    fn one(&mut self, role: Role, name: &str, frame: impl Into<String>, replies: Vec<Reply>) {
        self.frames(role, name, vec![text(frame)], replies);
    }

    fn post(
        &mut self,
        name: &str,
        path: &'static str,
        body: String,
        status: u16,
        code: &'static str,
    ) {
        self.0.push(Case {
            name: format!("POST {path}: {name}"),
            role: Role::Rest,
            input: Input::Post { path, body },
            expect: Expect::Http(status, code),
        });
    }

    fn burst(&mut self, role: Role, name: &str, n: u64, make: fn(u64) -> Value, limited: bool) {
        self.0.push(Case {
            name: format!("{role:?}: {name}"),
            role,
            input: Input::Burst { n, make },
            expect: Expect::EachAnswered { limited },
        });
    }
}

/// The table. `req`s are unique per case and far above the harness's own counter.
fn table() -> Table {
    use Role::{Driver as D, Rider as R};
    let mut t = Table::default();

    // ---- Malformed JSON: no `req` can be read, so the error has none.
    for (name, frame) in [
        ("malformed: a lone brace", "{"),
        (
            "malformed: truncated object",
            r#"{"req":1001,"type":"go_online""#,
        ),
        (
            "malformed: trailing garbage",
            r#"{"req":1002,"type":"go_online"} x"#,
        ),
        (
            "malformed: two objects in one frame",
            r#"{"req":1003,"type":"go_online"}{"req":1004,"type":"go_online"}"#,
        ),
        (
            "malformed: single quotes",
            r#"{'req':1005,'type':'go_online'}"#,
        ),
        (
            "malformed: trailing comma",
            r#"{"req":1006,"type":"go_online",}"#,
        ),
        (
            "malformed: unquoted key",
            r#"{req:1007,"type":"go_online"}"#,
        ),
        (
            "malformed: a lone surrogate escape",
            r#"{"req":1008,"type":"go_online","x":"\ud800"}"#,
        ),
        (
            "malformed: a comment",
            r#"{"req":1009,"type":"go_online"} // hi"#,
        ),
        (
            "malformed: a control character in a string",
            "{\"req\":1010,\"type\":\"go_\u{1}online\"}",
        ),
        // Not an object.
        (
            "not an object: an array",
            r#"[{"req":1011,"type":"go_online"}]"#,
        ),
        ("not an object: a string", r#""go_online""#),
        ("not an object: a number", "42"),
        ("not an object: null", "null"),
        ("not an object: true", "true"),
        // Empty.
        ("empty text frame", ""),
        ("whitespace-only text frame", " \n\t "),
    ] {
        t.one(D, name, frame, vec![err(BAD)]);
    }
    t.one(
        D,
        "malformed: a byte order mark",
        "\u{feff}{\"req\":1012,\"type\":\"go_online\"}",
        vec![err(BAD)],
    );
    t.one(R, "malformed: a lone brace", "{", vec![err(BAD)]);
    t.one(
        R,
        "malformed: truncated request_ride",
        r#"{"req":2001,"type":"request_ride","quote_id":"#,
        vec![err(BAD)],
    );
    t.one(R, "empty text frame", "", vec![err(BAD)]);
    t.one(R, "not an object: an array", "[]", vec![err(BAD)]);

    // ---- Binary frames: text only, whatever they hold.
    t.frames(
        D,
        "empty binary frame",
        vec![binary(Vec::<u8>::new())],
        vec![err(BAD)],
    );
    t.frames(
        D,
        "binary frame holding a valid message",
        vec![binary(br#"{"req":1020,"type":"go_online"}"#.to_vec())],
        vec![err(BAD)],
    );
    t.frames(
        D,
        "binary frame, not UTF-8",
        vec![binary(vec![0xff, 0xfe, 0, 0x80])],
        vec![err(BAD)],
    );
    t.frames(
        R,
        "binary frame holding a valid message",
        vec![binary(
            br#"{"req":2002,"type":"location","lat":45.503,"lng":-73.569,"ts":1}"#.to_vec(),
        )],
        vec![err(BAD)],
    );

    // ---- `req` of the wrong type: unreadable, so the error has no `req`.
    for (name, req) in [
        ("req: a string", r#""1030""#),
        ("req: negative", "-1"),
        ("req: a fraction", "1.5"),
        ("req: a float with an integral value", "1031.0"),
        ("req: an exponent", "1e3"),
        ("req: 2^64, one over u64", "18446744073709551616"),
        ("req: an object", "{}"),
        ("req: an array", "[1032]"),
        ("req: true", "true"),
    ] {
        t.one(
            D,
            name,
            format!(r#"{{"req":{req},"type":"go_online"}}"#),
            vec![err(BAD)],
        );
    }
    t.one(
        R,
        "req: a string",
        r#"{"req":"2003","type":"location","lat":45.503,"lng":-73.569,"ts":1}"#,
        vec![err(BAD)],
    );
    // The largest `req` is readable and echoed.
    t.one(
        D,
        "req: u64::MAX",
        r#"{"req":18446744073709551615,"type":"go_online"}"#,
        vec![ack(u64::MAX)],
    );
    // A null `req` is no `req` (a success is then silent, a failure has no `req`).
    t.one(
        D,
        "req: null, a success",
        r#"{"req":null,"type":"go_online"}"#,
        vec![],
    );
    t.one(
        D,
        "req: null, a failure",
        format!(r#"{{"req":null,"type":"accept","trip_id":"{NO_TRIP}"}}"#),
        vec![err(NOT_FOUND)],
    );

    // ---- `type`: missing or not a string is bad_request; unknown for this role is unknown_type.
    t.one(
        D,
        "missing type",
        r#"{"req":1040}"#,
        vec![err_req(1040, BAD)],
    );
    t.one(
        D,
        "missing type, other fields present",
        format!(r#"{{"req":1041,"trip_id":"{NO_TRIP}"}}"#),
        vec![err_req(1041, BAD)],
    );
    t.one(
        D,
        "type: a number",
        r#"{"req":1042,"type":5}"#,
        vec![err_req(1042, BAD)],
    );
    t.one(
        D,
        "type: null",
        r#"{"req":1043,"type":null}"#,
        vec![err_req(1043, BAD)],
    );
    t.one(
        D,
        "type: an object",
        r#"{"req":1044,"type":{"type":"go_online"}}"#,
        vec![err_req(1044, BAD)],
    );
    t.one(
        D,
        "type: an array",
        r#"{"req":1045,"type":["go_online"]}"#,
        vec![err_req(1045, BAD)],
    );
    t.one(
        D,
        "`Type` in another case",
        r#"{"req":1046,"Type":"go_online"}"#,
        vec![err_req(1046, BAD)],
    );
    for (i, ty) in [
        "fly",
        "",
        "GO_ONLINE",
        "go_online ",
        "go_online\\u0000",
        "request_ride",
        "cancel_ride",
        "welcome",
        "ack",
        "error",
        "offer",
    ]
    .into_iter()
    .enumerate()
    {
        let req = 1050 + i as u64;
        t.one(
            D,
            &format!("unknown type {ty:?}"),
            format!(r#"{{"req":{req},"type":"{ty}"}}"#),
            vec![err_req(req, UNKNOWN)],
        );
    }
    t.one(
        D,
        "unknown type of 10 KB",
        format!(r#"{{"req":1070,"type":"{}"}}"#, "t".repeat(10 * 1024)),
        vec![err_req(1070, UNKNOWN)],
    );
    t.one(
        R,
        "missing type",
        r#"{"req":2010}"#,
        vec![err_req(2010, BAD)],
    );
    t.one(
        R,
        "type: a number",
        r#"{"req":2011,"type":1}"#,
        vec![err_req(2011, BAD)],
    );
    for (i, ty) in ["fly", "go_online", "accept", "complete_trip", "trip_update"]
        .into_iter()
        .enumerate()
    {
        let req = 2020 + i as u64;
        t.one(
            R,
            &format!("unknown type {ty:?}"),
            format!(r#"{{"req":{req},"type":"{ty}","trip_id":"{NO_TRIP}"}}"#),
            vec![err_req(req, UNKNOWN)],
        );
    }

    // ---- Missing fields (the `req` is readable, so it is echoed).
    for (req, name, frame) in [
        (1100, "accept without trip_id", r#"{"type":"accept"}"#),
        (1101, "decline without trip_id", r#"{"type":"decline"}"#),
        (
            1102,
            "cancel_trip without trip_id",
            r#"{"type":"cancel_trip","reason":"x"}"#,
        ),
        (
            1103,
            "location without lat",
            r#"{"type":"location","lng":-73.56,"ts":1}"#,
        ),
        (
            1104,
            "location without lng",
            r#"{"type":"location","lat":45.5,"ts":1}"#,
        ),
        (
            1105,
            "location without ts",
            r#"{"type":"location","lat":45.5,"lng":-73.56}"#,
        ),
        (1106, "location with nothing", r#"{"type":"location"}"#),
    ] {
        let frame = frame.replacen('{', &format!(r#"{{"req":{req},"#), 1);
        t.one(D, name, frame, vec![err_req(req, BAD)]);
    }
    for (req, name, frame) in [
        (
            2100,
            "request_ride with neither a quote nor a route",
            r#"{"type":"request_ride"}"#,
        ),
        (
            2101,
            "request_ride without dropoff",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"product":"economy"}"#,
        ),
        (
            2102,
            "request_ride without product",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"dropoff":{"lat":45.52,"lng":-73.58}}"#,
        ),
        (
            2103,
            "request_ride, pickup without lng",
            r#"{"type":"request_ride","pickup":{"lat":45.5},"dropoff":{"lat":45.52,"lng":-73.58},"product":"economy"}"#,
        ),
        (
            2104,
            "cancel_ride without trip_id",
            r#"{"type":"cancel_ride"}"#,
        ),
        (
            2105,
            "location without ts",
            r#"{"type":"location","lat":45.503,"lng":-73.569}"#,
        ),
        (
            2106,
            "location without lat",
            r#"{"type":"location","lng":-73.569,"ts":1}"#,
        ),
    ] {
        let frame = frame.replacen('{', &format!(r#"{{"req":{req},"#), 1);
        t.one(R, name, frame, vec![err_req(req, BAD)]);
    }

    // ---- Wrong types.
    for (req, name, frame) in [
        (
            1200,
            "accept: trip_id a number",
            r#"{"type":"accept","trip_id":7}"#,
        ),
        (
            1201,
            "accept: trip_id null",
            r#"{"type":"accept","trip_id":null}"#,
        ),
        (
            1202,
            "accept: trip_id an array",
            r#"{"type":"accept","trip_id":["trp_1"]}"#,
        ),
        (
            1203,
            "accept: trip_id an object",
            r#"{"type":"accept","trip_id":{"id":"trp_1"}}"#,
        ),
        (
            1204,
            "accept: trip_id empty",
            r#"{"type":"accept","trip_id":""}"#,
        ),
        (
            1205,
            "cancel_trip: reason a number",
            r#"{"type":"cancel_trip","trip_id":"trp_doesnotexist0000","reason":5}"#,
        ),
        (
            1206,
            "location: lat a string",
            r#"{"type":"location","lat":"45.5","lng":-73.56,"ts":1}"#,
        ),
        (
            1207,
            "location: lat \"NaN\" as a string",
            r#"{"type":"location","lat":"NaN","lng":-73.56,"ts":1}"#,
        ),
        (
            1208,
            "location: lat true",
            r#"{"type":"location","lat":true,"lng":-73.56,"ts":1}"#,
        ),
        (
            1209,
            "location: lng null",
            r#"{"type":"location","lat":45.5,"lng":null,"ts":1}"#,
        ),
        (
            1210,
            "location: lat an object",
            r#"{"type":"location","lat":{"deg":45.5},"lng":-73.56,"ts":1}"#,
        ),
        (
            1211,
            "location: heading a string",
            r#"{"type":"location","lat":45.5,"lng":-73.56,"heading":"north","ts":1}"#,
        ),
        (
            1212,
            "location: speed_mps negative",
            r#"{"type":"location","lat":45.5,"lng":-73.56,"speed_mps":-1,"ts":1}"#,
        ),
        (
            1213,
            "location: speed_mps a string",
            r#"{"type":"location","lat":45.5,"lng":-73.56,"speed_mps":"fast","ts":1}"#,
        ),
    ] {
        let frame = frame.replacen('{', &format!(r#"{{"req":{req},"#), 1);
        t.one(D, name, frame, vec![err_req(req, BAD)]);
    }
    t.one(
        D,
        "accept: trip_id of 10 KB",
        format!(
            r#"{{"req":1220,"type":"accept","trip_id":"trp_{}"}}"#,
            "x".repeat(10 * 1024)
        ),
        vec![err_req(1220, BAD)],
    );
    for (req, name, frame) in [
        (
            2200,
            "request_ride: product unknown",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"dropoff":{"lat":45.52,"lng":-73.58},"product":"boat"}"#,
        ),
        (
            2201,
            "request_ride: product in upper case",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"dropoff":{"lat":45.52,"lng":-73.58},"product":"ECONOMY"}"#,
        ),
        (
            2202,
            "request_ride: product null",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"dropoff":{"lat":45.52,"lng":-73.58},"product":null}"#,
        ),
        (
            2203,
            "request_ride: product a number",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"dropoff":{"lat":45.52,"lng":-73.58},"product":1}"#,
        ),
        (
            2204,
            "request_ride: pickup a string",
            r#"{"type":"request_ride","pickup":"45.5,-73.5","dropoff":{"lat":45.52,"lng":-73.58},"product":"economy"}"#,
        ),
        (
            2205,
            "request_ride: pickup lat a string",
            r#"{"type":"request_ride","pickup":{"lat":"45.5","lng":-73.5},"dropoff":{"lat":45.52,"lng":-73.58},"product":"economy"}"#,
        ),
        // An array is not a coordinate object, even with two numbers in it: read as
        // (lat, lng) it would silently swap a GeoJSON [lng, lat] pair.
        (
            2206,
            "request_ride: pickup an array of two numbers",
            r#"{"type":"request_ride","pickup":[-73.5,45.5],"dropoff":{"lat":45.52,"lng":-73.58},"product":"economy"}"#,
        ),
        (
            2207,
            "request_ride: dropoff an array of two numbers",
            r#"{"type":"request_ride","pickup":{"lat":45.5,"lng":-73.5},"dropoff":[45.52,-73.58],"product":"economy"}"#,
        ),
        (
            2208,
            "request_ride: quote_id a number",
            r#"{"type":"request_ride","quote_id":5}"#,
        ),
        (
            2209,
            "request_ride: quote_id empty",
            r#"{"type":"request_ride","quote_id":""}"#,
        ),
        (
            2210,
            "cancel_ride: trip_id a number",
            r#"{"type":"cancel_ride","trip_id":5}"#,
        ),
        (
            2211,
            "cancel_ride: trip_id empty",
            r#"{"type":"cancel_ride","trip_id":""}"#,
        ),
        (
            2212,
            "location: lat a string",
            r#"{"type":"location","lat":"45.5","lng":-73.569,"ts":1}"#,
        ),
    ] {
        let frame = frame.replacen('{', &format!(r#"{{"req":{req},"#), 1);
        t.one(R, name, frame, vec![err_req(req, BAD)]);
    }
    t.one(
        R,
        "request_ride: quote_id of 10 KB",
        format!(
            r#"{{"req":2220,"type":"request_ride","quote_id":"qte_{}"}}"#,
            "x".repeat(10 * 1024)
        ),
        vec![err_req(2220, BAD)],
    );

    // ---- Coordinates. Finite but out of range: invalid_location, `req` echoed.
    for (i, (lat, lng)) in [
        ("91", "-73.56"),
        ("-90.000001", "-73.56"),
        ("45.5", "180.0000001"),
        ("45.5", "-181"),
        ("1e308", "-73.56"),
        ("-1.7976931348623157e308", "-73.56"),
        ("45.5", "1.7976931348623157e308"),
        // Integers past u64 are read as (finite) floats.
        ("123456789012345678901234567890", "-73.56"),
        ("45.5", "-99999999999999999999999999999999999999"),
    ]
    .into_iter()
    .enumerate()
    {
        let req = 1300 + i as u64;
        t.one(
            D,
            &format!("location at ({lat}, {lng})"),
            driver_ping(lat, lng, req),
            vec![err_req(req, LOCATION)],
        );
    }
    // NaN and infinity cannot be written in JSON: such text is malformed (no `req`).
    for (lat, lng) in [
        ("NaN", "-73.56"),
        ("nan", "-73.56"),
        ("45.5", "Infinity"),
        ("-Infinity", "-73.56"),
        ("inf", "-73.56"),
        ("1e999", "-73.56"),
        ("45.5", "-1e999"),
    ] {
        t.one(
            D,
            &format!("location at ({lat}, {lng})"),
            driver_ping(lat, lng, 1320),
            vec![err(BAD)],
        );
    }
    t.one(
        D,
        "location with heading NaN",
        r#"{"req":1330,"type":"location","lat":45.5,"lng":-73.56,"heading":NaN,"ts":1}"#,
        vec![err(BAD)],
    );
    t.one(
        D,
        "location with speed_mps 1e999",
        r#"{"req":1331,"type":"location","lat":45.5,"lng":-73.56,"speed_mps":1e999,"ts":1}"#,
        vec![err(BAD)],
    );
    for (i, pickup) in [
        r#"{"lat":91,"lng":-73.5}"#,
        r#"{"lat":45.5,"lng":-180.5}"#,
        r#"{"lat":1e308,"lng":-73.5}"#,
        r#"{"lat":45.5,"lng":100000000000000000000000000000}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let req = 2300 + i as u64;
        t.one(
            R,
            &format!("request_ride from {pickup}"),
            rider_request(pickup, req),
            vec![err_req(req, LOCATION)],
        );
    }
    t.one(
        R,
        "request_ride to lat -91",
        r#"{"type":"request_ride","req":2310,"pickup":{"lat":45.5,"lng":-73.5},"dropoff":{"lat":-91,"lng":-73.58},"product":"economy"}"#,
        vec![err_req(2310, LOCATION)],
    );
    for pickup in [
        r#"{"lat":NaN,"lng":-73.5}"#,
        r#"{"lat":45.5,"lng":Infinity}"#,
        r#"{"lat":-Infinity,"lng":-73.5}"#,
        r#"{"lat":1e999,"lng":-73.5}"#,
    ] {
        t.one(
            R,
            &format!("request_ride from {pickup}"),
            rider_request(pickup, 2320),
            vec![err(BAD)],
        );
    }
    t.one(
        R,
        "location at lat 91",
        r#"{"req":2330,"type":"location","lat":91,"lng":-73.569,"ts":1}"#,
        vec![err_req(2330, LOCATION)],
    );
    t.one(
        R,
        "location at lng 1e300",
        r#"{"req":2331,"type":"location","lat":45.503,"lng":1e300,"ts":1}"#,
        vec![err_req(2331, LOCATION)],
    );
    t.one(
        R,
        "location at lat NaN",
        r#"{"req":2332,"type":"location","lat":NaN,"lng":-73.569,"ts":1}"#,
        vec![err(BAD)],
    );
    t.one(
        R,
        "location at lng -1e999",
        r#"{"req":2333,"type":"location","lat":45.503,"lng":-1e999,"ts":1}"#,
        vec![err(BAD)],
    );

    // ---- Timestamps: `ts` far in the past or future is accepted and changes nothing
    // (the position sent is the current one); a `ts` that is not a u64 is bad_request.
    let (dlat, dlng) = DRIVER_AT;
    let (rlat, rlng) = RIDER_AT;
    for (req, name, ts) in [
        (1400, "ts 0 (1970)", "0"),
        (1401, "ts u64::MAX", "18446744073709551615"),
        (1402, "ts in the year 10000", "253402300800000"),
    ] {
        t.one(
            D,
            &format!("location with {name}"),
            format!(r#"{{"req":{req},"type":"location","lat":{dlat},"lng":{dlng},"ts":{ts}}}"#),
            vec![ack(req)],
        );
    }
    t.one(
        D,
        "location with ts in the year 10000, without req",
        format!(r#"{{"type":"location","lat":{dlat},"lng":{dlng},"ts":253402300800000}}"#),
        vec![],
    );
    for (req, ts) in [(2400, "0"), (2401, "18446744073709551615")] {
        t.one(
            R,
            &format!("location with ts {ts}"),
            format!(r#"{{"req":{req},"type":"location","lat":{rlat},"lng":{rlng},"ts":{ts}}}"#),
            vec![ack(req)],
        );
    }
    for (req, name, ts) in [
        (1410, "negative", "-1"),
        (1411, "2^64", "18446744073709551616"),
        (1412, "1e20, a float", "1e20"),
        (1413, "a fraction", "1.5"),
        (1414, "an RFC 3339 string", r#""2026-01-01T00:00:00Z""#),
        (1415, "null", "null"),
        (1416, "1e999", "1e999"),
    ] {
        let reply = if ts == "1e999" {
            err(BAD)
        } else {
            err_req(req, BAD)
        };
        t.one(
            D,
            &format!("location with ts {name}"),
            format!(r#"{{"req":{req},"type":"location","lat":{dlat},"lng":{dlng},"ts":{ts}}}"#),
            vec![reply],
        );
    }
    t.one(
        R,
        "location with ts -1",
        format!(r#"{{"req":2410,"type":"location","lat":{rlat},"lng":{rlng},"ts":-1}}"#),
        vec![err_req(2410, BAD)],
    );
    t.one(
        D,
        "go_online with client timestamps the protocol does not have",
        r#"{"req":1420,"type":"go_online","created_at":"0001-01-01T00:00:00Z","updated_at":"9999-12-31T23:59:59Z","expires_at":"1970-01-01T00:00:00Z","ts":-5}"#,
        vec![ack(1420)],
    );
    t.one(
        R,
        "request_ride of an unknown quote with a client expires_at far ahead",
        r#"{"req":2420,"type":"request_ride","quote_id":"qte_doesnotexist0000","expires_at":"9999-12-31T23:59:59.999Z"}"#,
        vec![err_req(2420, NOT_FOUND)],
    );

    // ---- Large frames: over --max-frame-bytes is too_large, unparsed (no `req`), and
    // the session lives on; 1 MB is under --ws-hard-max-bytes, so it is read and refused.
    t.one(
        D,
        "exactly --max-frame-bytes (a control: accepted)",
        padded(1500, MAX_FRAME, 'x'),
        vec![ack(1500)],
    );
    t.one(
        D,
        "one byte over --max-frame-bytes",
        padded(1501, MAX_FRAME + 1, 'x'),
        vec![err(TOO_LARGE)],
    );
    t.one(
        D,
        "1 MB message with a req",
        padded(1502, MB, 'x'),
        vec![err(TOO_LARGE)],
    );
    t.one(
        D,
        "1 MB message of two-byte characters",
        padded(1503, MB, 'é'),
        vec![err(TOO_LARGE)],
    );
    t.one(
        D,
        "1 MB of garbage",
        "\u{1}".repeat(MB),
        vec![err(TOO_LARGE)],
    );
    t.one(
        D,
        "1 MB unknown type",
        format!(r#"{{"req":1504,"type":"{}"}}"#, "t".repeat(MB)),
        vec![err(TOO_LARGE)],
    );
    // A binary frame is refused as binary, whatever its size (api.md: text frames only).
    t.frames(
        D,
        "1 MB binary frame",
        vec![binary(padded(1505, MB, 'x'))],
        vec![err(BAD)],
    );
    t.one(
        R,
        "1 MB message with a req",
        rider_request(
            &format!(r#"{{"lat":45.5,"lng":-73.5,"pad":"{}"}}"#, "x".repeat(MB)),
            2500,
        ),
        vec![err(TOO_LARGE)],
    );
    t.frames(
        D,
        "three 1 MB messages in a row",
        vec![
            text(padded(1506, MB, 'x')),
            text(padded(1507, MB, 'x')),
            text(padded(1508, MB, 'x')),
        ],
        vec![err(TOO_LARGE), err(TOO_LARGE), err(TOO_LARGE)],
    );

    // ---- Deep nesting. Over the frame limit: too_large, never parsed. Within it:
    // serde_json's recursion limit (128) makes it malformed JSON, not a stack overflow.
    t.one(D, "100,000 `[`", "[".repeat(100_000), vec![err(TOO_LARGE)]);
    t.one(
        D,
        "100,000 `{\"a\":`",
        "{\"a\":".repeat(100_000),
        vec![err(TOO_LARGE)],
    );
    t.one(
        D,
        "16,000 `[` (within the frame limit)",
        "[".repeat(16_000),
        vec![err(BAD)],
    );
    t.one(
        D,
        "8,000-deep balanced arrays",
        nested("[", "", "]", 8_000),
        vec![err(BAD)],
    );
    t.one(
        D,
        "2,500-deep objects",
        nested(r#"{"a":"#, "1", "}", 2_500),
        vec![err(BAD)],
    );
    t.one(
        D,
        "valid message, a field value 7,000 deep",
        format!(
            r#"{{"req":1600,"type":"go_online","pad":{}}}"#,
            nested("[", "1", "]", 7_000)
        ),
        vec![err(BAD)],
    );
    t.one(
        D,
        "a req value 7,000 deep",
        format!(
            r#"{{"type":"go_online","req":{}}}"#,
            nested("[", "1601", "]", 7_000)
        ),
        vec![err(BAD)],
    );
    t.one(
        D,
        "a trip_id 7,000 deep",
        format!(
            r#"{{"req":1602,"type":"accept","trip_id":{}}}"#,
            nested("[", r#""trp_1""#, "]", 7_000)
        ),
        vec![err(BAD)],
    );
    t.one(
        D,
        "a type 7,000 deep",
        format!(
            r#"{{"req":1603,"type":{}}}"#,
            nested("[", r#""go_online""#, "]", 7_000)
        ),
        vec![err(BAD)],
    );
    // Under the recursion limit it is valid JSON: an unknown field is ignored, a field
    // of the wrong shape is bad_request with its `req`.
    t.one(
        D,
        "an unknown field 100 deep (ignored)",
        format!(
            r#"{{"req":1610,"type":"go_online","pad":{}}}"#,
            nested("[", "1", "]", 100)
        ),
        vec![ack(1610)],
    );
    t.one(
        D,
        "a trip_id 100 deep",
        format!(
            r#"{{"req":1611,"type":"accept","trip_id":{}}}"#,
            nested("[", r#""trp_1""#, "]", 100)
        ),
        vec![err_req(1611, BAD)],
    );
    t.one(R, "16,000 `{`", "{".repeat(16_000), vec![err(BAD)]);
    t.one(
        R,
        "request_ride, a pickup 2,000 deep",
        rider_request(&nested(r#"{"lat":"#, "45.5", "}", 2_000), 2600),
        vec![err(BAD)],
    );
    t.one(R, "100,000 `[`", "[".repeat(100_000), vec![err(TOO_LARGE)]);

    // ---- Trips that do not exist.
    for (i, ty) in DRIVER_TRIP_COMMANDS.into_iter().enumerate() {
        let req = 1700 + i as u64;
        t.one(
            D,
            &format!("{ty} of a trip that does not exist"),
            format!(r#"{{"req":{req},"type":"{ty}","trip_id":"{NO_TRIP}"}}"#),
            vec![err_req(req, NOT_FOUND)],
        );
    }
    t.one(
        D,
        "accept of a trip that does not exist, without req",
        format!(r#"{{"type":"accept","trip_id":"{NO_TRIP}"}}"#),
        vec![err(NOT_FOUND)],
    );
    t.one(
        D,
        "accept of a 128-character trip id that does not exist",
        format!(
            r#"{{"req":1710,"type":"accept","trip_id":"trp_{}"}}"#,
            "z".repeat(124)
        ),
        vec![err_req(1710, NOT_FOUND)],
    );
    t.one(
        D,
        "accept of a trip id that is not a trip's",
        r#"{"req":1711,"type":"accept","trip_id":"drv_../../admin"}"#,
        vec![err_req(1711, NOT_FOUND)],
    );
    t.one(
        D,
        "cancel_trip of a trip that does not exist, 10 KB reason",
        format!(
            r#"{{"req":1712,"type":"cancel_trip","trip_id":"{NO_TRIP}","reason":"{}"}}"#,
            "r".repeat(10 * 1024)
        ),
        vec![err_req(1712, NOT_FOUND)],
    );
    t.one(
        D,
        "accept of a trip that does not exist, unknown fields",
        format!(r#"{{"req":1713,"type":"accept","trip_id":"{NO_TRIP}","force":true,"driver_id":"drv_x"}}"#),
        vec![err_req(1713, NOT_FOUND)],
    );
    t.one(
        R,
        "cancel_ride of a trip that does not exist",
        format!(r#"{{"req":2700,"type":"cancel_ride","trip_id":"{NO_TRIP}"}}"#),
        vec![err_req(2700, NOT_FOUND)],
    );
    t.one(
        R,
        "cancel_ride of a trip that does not exist, 10 KB reason",
        format!(
            r#"{{"req":2701,"type":"cancel_ride","trip_id":"{NO_TRIP}","reason":"{}"}}"#,
            "r".repeat(10 * 1024)
        ),
        vec![err_req(2701, NOT_FOUND)],
    );
    t.one(
        R,
        "request_ride of a quote that does not exist",
        r#"{"req":2702,"type":"request_ride","quote_id":"qte_doesnotexist0000"}"#,
        vec![err_req(2702, NOT_FOUND)],
    );

    // ---- Unknown fields are ignored (PROTOCOL.md).
    t.one(
        D,
        "go_online with unknown fields",
        r#"{"req":1800,"type":"go_online","status":"suspended","driver_id":"drv_other","admin":true,"nested":{"a":[1,{"b":null}]}}"#,
        vec![ack(1800)],
    );
    t.one(
        R,
        "location with unknown fields",
        format!(r#"{{"req":2800,"type":"location","lat":{rlat},"lng":{rlng},"ts":1,"rider_id":"rdr_other","trip":{{"state":"completed"}}}}"#),
        vec![ack(2800)],
    );

    // ---- Duplicate `req`s: the server does not track them; each message is answered on
    // its own, with the `req` it carried.
    let go = |req: u64| text(format!(r#"{{"req":{req},"type":"go_online"}}"#));
    t.frames(
        D,
        "the same req twice",
        vec![go(1900), go(1900)],
        vec![ack(1900), ack(1900)],
    );
    t.frames(
        D,
        "the same req on a success and a failure",
        vec![
            go(1901),
            text(format!(
                r#"{{"req":1901,"type":"accept","trip_id":"{NO_TRIP}"}}"#
            )),
        ],
        vec![ack(1901), err_req(1901, NOT_FOUND)],
    );
    t.frames(
        D,
        "the same req on a bad message and a good one",
        vec![
            text(r#"{"req":1902,"type":"fly"}"#),
            go(1902),
            text(r#"{"req":1902}"#),
        ],
        vec![err_req(1902, UNKNOWN), ack(1902), err_req(1902, BAD)],
    );
    t.frames(
        D,
        "a req already answered, reused",
        vec![go(1500)],
        vec![ack(1500)],
    );
    t.frames(
        D,
        "the same req ten times",
        (0..10).map(|_| go(1903)).collect(),
        vec![ack(1903); 10],
    );
    let here = |req: u64| {
        text(format!(
            r#"{{"req":{req},"type":"location","lat":{rlat},"lng":{rlng},"ts":1}}"#
        ))
    };
    t.frames(
        R,
        "the same req twice",
        vec![here(2900), here(2900)],
        vec![ack(2900), ack(2900)],
    );
    t.frames(
        R,
        "the same req on a bad request_ride and a location",
        vec![text(r#"{"req":2901,"type":"request_ride"}"#), here(2901)],
        vec![err_req(2901, BAD), ack(2901)],
    );

    // ---- Registration (REST): empty or 10 KB names and other bad bodies are 400
    // `bad_request` (413 `too_large` over 16 KiB), and nobody is registered.
    let long = "x".repeat(10 * 1024);
    let long_wide = "é".repeat(5 * 1024); // 10 KB, 5,120 characters
    for (name, value) in [
        ("empty name", json!("")),
        ("name of spaces", json!("   ")),
        ("10 KB name", json!(long)),
        ("10 KB name of two-byte characters", json!(long_wide)),
        ("101-character name", json!("n".repeat(101))),
        ("name with a NUL", json!("Da\u{0}na")),
        ("name with a newline", json!("Da\nna")),
        ("name null", Value::Null),
        ("name a number", json!(5)),
        ("name an array", json!(["Dana"])),
    ] {
        t.post(
            name,
            "/v1/drivers",
            driver_body(|v| v["name"] = value.clone()),
            400,
            BAD,
        );
        t.post(
            name,
            "/v1/riders",
            rider_body(|v| v["name"] = value),
            400,
            BAD,
        );
    }
    t.post(
        "no name",
        "/v1/drivers",
        driver_body(|v| drop(v.as_object_mut().unwrap().remove("name"))),
        400,
        BAD,
    );
    t.post(
        "no name",
        "/v1/riders",
        rider_body(|v| drop(v.as_object_mut().unwrap().remove("name"))),
        400,
        BAD,
    );
    for (name, field, value) in [
        ("10 KB vehicle make", "make", json!(long)),
        ("empty vehicle plate", "plate", json!("")),
        ("17-character plate", "plate", json!("P".repeat(17))),
        ("0 seats", "seats", json!(0)),
        ("256 seats", "seats", json!(256)),
        ("-1 seats", "seats", json!(-1)),
        ("product unknown", "product", json!("boat")),
    ] {
        t.post(
            name,
            "/v1/drivers",
            driver_body(|v| v["vehicle"][field] = value),
            400,
            BAD,
        );
    }
    t.post(
        "vehicle an array of its fields",
        "/v1/drivers",
        driver_body(|v| v["vehicle"] = json!(["Toyota", "Prius", "AB 123", "blue", "economy", 4])),
        400,
        BAD,
    );
    for (name, value) in [
        ("empty phone", json!("")),
        ("10 KB phone of digits", json!("5".repeat(10 * 1024))),
        ("phone of letters", json!("call me maybe")),
    ] {
        t.post(
            name,
            "/v1/riders",
            rider_body(|v| v["phone"] = value),
            400,
            BAD,
        );
    }
    for path in ["/v1/drivers", "/v1/riders"] {
        t.post("malformed JSON", path, "{".into(), 400, BAD);
        t.post("empty body", path, String::new(), 400, BAD);
        t.post("an array", path, "[]".into(), 400, BAD);
        t.post(
            "NaN",
            path,
            r#"{"name":NaN,"phone":"+1 555 0100"}"#.into(),
            400,
            BAD,
        );
        t.post(
            "8,000-deep nesting",
            path,
            format!(r#"{{"name":{}}}"#, nested("[", "", "]", 8_000)),
            400,
            BAD,
        );
        t.post(
            "20 KB name (over the body limit)",
            path,
            rider_body(|v| v["name"] = json!("x".repeat(20 * 1024))),
            413,
            TOO_LARGE,
        );
        t.post(
            "1 MB body",
            path,
            rider_body(|v| v["pad"] = json!("x".repeat(MB))),
            413,
            TOO_LARGE,
        );
    }

    // ---- 10,000 valid messages in a burst, read while they are sent. Driver pings are
    // limited to --location-max-per-s; every message to --ws-messages-max-per-s.
    t.burst(
        D,
        "10,000 location pings in a burst",
        10_000,
        |i| json!({"type": "location", "lat": DRIVER_AT.0, "lng": DRIVER_AT.1, "ts": i}),
        true,
    );
    t.burst(
        R,
        "10,000 location messages in a burst",
        10_000,
        |i| json!({"type": "location", "lat": RIDER_AT.0, "lng": RIDER_AT.1, "ts": i}),
        false,
    );
    t
}

fn reply_of(m: ServerMessage) -> Reply {
    match m {
        ServerMessage::Ack { req } => Reply::Ack(req),
        ServerMessage::Error { req, code, message } => {
            assert!(!message.is_empty(), "an error without a message: {code}");
            Reply::Error(req, code)
        }
        m => Reply::Other(format!("{m:?}")),
    }
}

/// The valid message that shows a session still works.
fn valid(role: Role) -> Value {
    match role {
        Role::Driver => json!({"type": "go_online"}),
        Role::Rider => json!({"type": "location", "lat": RIDER_AT.0, "lng": RIDER_AT.1, "ts": 1}),
        Role::Rest => unreachable!(),
    }
}

/// The session answers a valid message, and owed nothing before it. After a burst the
/// session's message rate may still be spent: `rate_limited` is then retried while the
/// bucket refills (a few milliseconds at --ws-messages-max-per-s).
async fn alive(c: &mut Client, role: Role, after_burst: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        match c.reply_next(valid(role)).await {
            ServerMessage::Ack { .. } => return,
            ServerMessage::Error { code, .. }
                if after_burst && code == "rate_limited" && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            m => panic!(
                "the session should answer {} with an ack, got {m:?}",
                valid(role)
            ),
        }
    }
}

/// Sends `n` messages, keeping at most `WINDOW` with a `req` unanswered (so the server's
/// outbound queue of 256 never fills while replies are read in between), and checks
/// that each `req` is answered exactly once.
async fn burst(c: &mut Client, n: u64, make: fn(u64) -> Value, limited_expected: bool) {
    const WINDOW: usize = 128;
    const BASE: u64 = 1_000_000;
    struct Tally {
        owed: HashSet<u64>,
        acks: u64,
        limited: u64,
        limited_without_req: u64,
    }
    async fn take(c: &mut Client, t: &mut Tally) {
        match c.next().await {
            ServerMessage::Ack { req } => {
                assert!(
                    t.owed.remove(&req),
                    "ack of req {req}, not owed (twice, or never sent)"
                );
                t.acks += 1;
            }
            ServerMessage::Error {
                req: Some(req),
                code,
                ..
            } if code == "rate_limited" => {
                assert!(t.owed.remove(&req), "rate_limited for req {req}, not owed");
                t.limited += 1;
            }
            ServerMessage::Error {
                req: None, code, ..
            } if code == "rate_limited" => {
                t.limited_without_req += 1;
            }
            m => panic!("a burst message was answered {m:?}"),
        }
    }
    let mut t = Tally {
        owed: HashSet::new(),
        acks: 0,
        limited: 0,
        limited_without_req: 0,
    };
    let mut without_req = 0;
    let start = Instant::now();
    for i in 0..n {
        let mut v = make(i);
        // Every tenth without `req` (answered only when refused), the last one with.
        if i % 10 == 9 && i + 1 < n {
            without_req += 1;
        } else {
            v["req"] = json!(BASE + i);
            t.owed.insert(BASE + i);
        }
        c.send_raw(Message::Text(v.to_string().into()))
            .await
            .expect("the session takes the burst");
        while t.owed.len() >= WINDOW {
            take(c, &mut t).await;
        }
    }
    while !t.owed.is_empty() {
        take(c, &mut t).await;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "  burst of {n} in {secs:.2} s: {} acks, {} rate_limited, {} rate_limited without req (of {without_req})",
        t.acks, t.limited, t.limited_without_req
    );
    assert_eq!(t.acks + t.limited, n - without_req);
    assert!(t.limited_without_req <= without_req);
    if limited_expected {
        // Far more refusals than the bad-message limit: the session's survival (checked
        // next) shows that `rate_limited` is not a bad message.
        assert!(
            t.limited > BAD_MESSAGE_LIMIT,
            "only {} pings refused",
            t.limited
        );
        // A token bucket of LOCATION_MAX_PER_S a second, as big: never more than that.
        let most = LOCATION_MAX_PER_S as f64 * (1.0 + secs);
        assert!(
            (t.acks as f64) <= most,
            "{} pings accepted in {secs:.2} s",
            t.acks
        );
    } else {
        let most = MESSAGES_MAX_PER_S as f64 * (2.0 + secs);
        assert!(
            (t.acks as f64) <= most,
            "{} messages accepted in {secs:.2} s",
            t.acks
        );
    }
}

async fn run_case(s: &TestServer, d: &mut Client, r: &mut Client, case: &Case) {
    let c = match case.role {
        Role::Driver => d,
        Role::Rider => r,
        Role::Rest => {
            let Input::Post { path, body } = &case.input else {
                unreachable!()
            };
            let Expect::Http(status, code) = case.expect else {
                unreachable!()
            };
            let (st, ctype, text) = s
                .raw(reqwest::Method::POST, path, None, Some(body.clone()))
                .await;
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("not a JSON body ({e}): {text:.200}"));
            assert!(ctype.starts_with("application/json"), "{ctype}");
            assert_error_body(st, &v, status, code);
            let (st, _, _) = s.raw(reqwest::Method::GET, "/readyz", None, None).await;
            assert_eq!(st, 200, "the server should still be ready");
            return;
        }
    };
    match (&case.input, &case.expect) {
        (Input::Frames(frames), Expect::Replies(want)) => {
            for f in frames {
                c.send_raw(f.clone())
                    .await
                    .expect("the session takes the frame");
            }
            let mut got = Vec::new();
            for _ in want {
                got.push(reply_of(c.next().await));
            }
            let (mut got_sorted, mut want_sorted) = (got.clone(), want.clone());
            got_sorted.sort();
            want_sorted.sort();
            assert_eq!(
                got_sorted, want_sorted,
                "replies (in arrival order: {got:?})"
            );
            alive(c, case.role, false).await;
        }
        (Input::Burst { n, make }, Expect::EachAnswered { limited }) => {
            burst(c, *n, *make, *limited).await;
            alive(c, case.role, true).await;
        }
        _ => unreachable!("a case pairs frames with replies, a burst with answers"),
    }
}

/// Everything a case must not change, as the admin API shows it.
async fn snapshot(s: &TestServer, driver_id: &str, rider_id: &str) -> Value {
    let mut out = serde_json::Map::new();
    for (key, path) in [
        ("driver", format!("/admin/drivers/{driver_id}")),
        ("rider", format!("/admin/riders/{rider_id}")),
        ("drivers", "/admin/drivers?limit=1000".to_owned()),
        ("trips", "/admin/trips?limit=1000".to_owned()),
        ("cells", "/admin/cells?limit=1000".to_owned()),
        ("stats", "/admin/stats".to_owned()),
    ] {
        let (st, mut v) = s.get(&path, Some(ADMIN_TOKEN)).await;
        assert_eq!(st, 200, "GET {path}: {v}");
        if key == "stats" {
            let stats = v.as_object_mut().unwrap();
            stats.remove("uptime_s");
            // How much of the last minute the server has seen grows with its uptime, as
            // uptime_s does; what happened in that minute must not change.
            if let Some(last) = stats.get_mut("last_minute").and_then(|l| l.as_object_mut()) {
                last.remove("window_s");
            }
        }
        out.insert(key.to_owned(), v);
    }
    Value::Object(out)
}

/// The parts of two snapshots that differ.
fn changes(before: &Value, after: &Value) -> Option<String> {
    let diffs: Vec<String> = before
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| after.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k}: before {v}, after {}", after[k.as_str()]))
        .collect();
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic".to_owned())
}

/// After a failed case: read everything the session still owes, up to a fresh reply.
async fn resync(c: &mut Client, role: Role) {
    let _ = c.request(valid(role)).await;
    while !c.pending().is_empty() {
        c.next().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_its_documented_error_and_changes_nothing() {
    let started = Instant::now();
    let flags = [
        "--admin-token",
        ADMIN_TOKEN,
        "--bad-message-limit",
        &BAD_MESSAGE_LIMIT.to_string(),
        "--location-max-per-s",
        &LOCATION_MAX_PER_S.to_string(),
        "--ws-messages-max-per-s",
        &MESSAGES_MAX_PER_S.to_string(),
    ]
    .map(String::from);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = TestServer::start(&flags).await;
    let (driver_id, mut d) = s
        .online_driver("Dana", "economy", DRIVER_AT.0, DRIVER_AT.1)
        .await;
    let (rider_id, _, mut r) = s.connected_rider("Riley").await;
    r.ok(valid(Role::Rider)).await;

    let table = table().0;
    let mut failures = Vec::new();
    let mut before = snapshot(&s, &driver_id, &rider_id).await;
    assert_eq!(before["driver"]["status"], "available", "{before}");
    assert_eq!(before["trips"]["trips"], json!([]), "{before}");
    for case in &table {
        let t = Instant::now();
        let failed_before = failures.len();
        let outcome = AssertUnwindSafe(run_case(&s, &mut d, &mut r, case))
            .catch_unwind()
            .await;
        if let Err(p) = outcome {
            failures.push(format!("{}: {}", case.name, panic_text(&*p)));
            if case.role != Role::Rest {
                let c = if case.role == Role::Driver {
                    &mut d
                } else {
                    &mut r
                };
                if let Err(p) = AssertUnwindSafe(resync(c, case.role)).catch_unwind().await {
                    failures.push(format!(
                        "{}: the session is gone: {}",
                        case.name,
                        panic_text(&*p)
                    ));
                    break;
                }
            }
        }
        let after = snapshot(&s, &driver_id, &rider_id).await;
        if let Some(diff) = changes(&before, &after) {
            failures.push(format!("{}: state changed: {diff}", case.name));
        }
        before = after;
        let verdict = if failures.len() > failed_before {
            "FAILED"
        } else {
            "ok"
        };
        eprintln!(
            "  {verdict:>6} {:>5} ms  {}",
            t.elapsed().as_millis(),
            case.name
        );
    }
    eprintln!(
        "{} hostile cases in {:.1} s",
        table.len(),
        started.elapsed().as_secs_f64()
    );

    // Past the table: a message over --ws-hard-max-bytes is not read at all, and the
    // connection is closed with 1009 (api.md), on a session of its own (this one ends);
    // the other sessions are untouched.
    let over_hard_limit = AssertUnwindSafe(async {
        let (_, token) = s.driver("Huge", "economy").await;
        let mut h = Client::driver(&s, &token).await.unwrap();
        h.welcome().await;
        let _ = h.send_raw(text("x".repeat(HARD_MAX + 1))).await;
        assert_eq!(h.closed_with().await, Some(1009), "the close code");
        alive(&mut d, Role::Driver, false).await;
        alive(&mut r, Role::Rider, false).await;
    })
    .catch_unwind()
    .await;
    if let Err(p) = over_hard_limit {
        failures.push(format!(
            "Driver: a message one byte over --ws-hard-max-bytes: {}",
            panic_text(&*p)
        ));
    }
    eprintln!("all done in {:.1} s", started.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{} failures over {} cases:\n{}",
        failures.len(),
        table.len() + 1,
        failures.join("\n")
    );
    s.stop().await.unwrap();
}
