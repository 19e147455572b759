//! The authorization audit (issue 7), one test per rule, over real WebSockets and HTTP:
//!
//! 1. a driver cannot accept, decline, arrive at, start, complete or cancel a trip that
//!    was not offered or assigned to them, at any state of the trip;
//! 2. a rider cannot read, cancel or request on another rider's trip or quote;
//! 3. a driver's token does not open rider routes, nor a rider's driver routes;
//! 4. rider and driver tokens cannot reach any `/admin/` route (403, nothing changes), and
//!    no token or an unknown one is 401;
//! 5. a suspended driver gets no offers and cannot go online;
//! 6. ids that belong to someone else answer 403 or 404 without saying more.
//!
//! Every refusal is checked for its documented code (PROTOCOL.md's error table and
//! docs/api.md), for a body that holds nothing but `error.code` and `error.message`, and
//! for a message that names nothing of the other party's (ids, names, places, fare); and
//! the other party's trip is compared before and after, as its rider reads it and as the
//! admin console does.

use std::collections::BTreeSet;
use std::path::Path;

use dispatch_tests::{Client, DRIVER_TRIP_COMMANDS, TestServer, north_of, now_ms};
use dispatch_transport::wire::{DriverStatus, ServerMessage, Trip, TripState};
use reqwest::Method;
use serde_json::{Value, json};

/// The admin token of every server here.
const ADMIN: &str = "adm-authz-0123456789abcdef0123456";

const PICKUP: (f64, f64) = (45.5030, -73.5690);
const DROPOFF: (f64, f64) = (45.5200, -73.5800);
/// About 15 km north of `PICKUP`: out of every search made there.
const FAR: (f64, f64) = (45.6380, -73.5690);

/// Trip ids no trip has: one shaped as the server makes them, one not.
const UNKNOWN_TRIPS: [&str; 2] = ["trp_00000000000000000000000000000000", "trp_nope"];

/// Long enough that no offer times out while a test looks at it: a timeout would move
/// the trip on by itself.
const STEADY: [&str; 4] = ["--admin-token", ADMIN, "--offer-timeout-ms", "60000"];

fn command(kind: &str, trip_id: &str) -> Value {
    if kind == "cancel_trip" {
        json!({"type": kind, "trip_id": trip_id, "reason": "not mine"})
    } else {
        json!({"type": kind, "trip_id": trip_id})
    }
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

/// A refusal's REST body holds `{"error": {"code", "message"}}` and nothing else; its
/// message.
fn bare_error(v: &Value, ctx: &str) -> String {
    let top: Vec<&String> = v
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        top,
        ["error"],
        "{ctx}: the body says more than an error: {v}"
    );
    let inner: BTreeSet<&str> = v["error"]
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        inner,
        BTreeSet::from(["code", "message"]),
        "{ctx}: the error says more than its code and message: {v}"
    );
    v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{ctx}: no message: {v}"))
        .to_owned()
}

/// `text` names none of `secrets`.
fn reveals_nothing(text: &str, secrets: &[String], ctx: &str) {
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{ctx}: {text:?} gives away {s:?}"
        );
    }
}

/// What a refusal may not give away about a trip: its ids, its rider's and driver's names
/// and phone, its places and its fare.
fn trip_secrets(t: &Trip, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        t.trip_id.clone(),
        t.rider_id.clone(),
        format!("{}", t.pickup.lat),
        format!("{}", t.pickup.lng),
        format!("{}", t.dropoff.lat),
        format!("{}", t.dropoff.lng),
        format!("{}", t.quote.fare_cents),
        "555 0100".to_owned(),
    ];
    v.extend(t.driver_id.iter().cloned());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Sends `v` with a `req`; it must be refused: (code, message).
async fn refusal(c: &mut Client, v: Value) -> (String, String) {
    match c.request(v.clone()).await {
        ServerMessage::Error { code, message, .. } => (code, message),
        m => panic!("{v} should have been refused, got {m:?}"),
    }
}

/// Whether `m` tells anything about `trip_id`.
fn about(m: &ServerMessage, trip_id: &str) -> bool {
    match m {
        ServerMessage::Offer(o) => o.trip_id == trip_id,
        ServerMessage::OfferExpired { trip_id: t } => t == trip_id,
        ServerMessage::TripUpdate { trip, .. } => trip.trip_id == trip_id,
        ServerMessage::Receipt { trip_id: t, .. } => t == trip_id,
        _ => false,
    }
}

/// A round trip through the driver's actor (a command on an unknown trip, which changes
/// nothing), then: nothing about `trip_id` is waiting for it.
async fn driver_told_nothing(c: &mut Client, who: &str, trip_id: &str) {
    let (code, _) = refusal(c, command("accept", UNKNOWN_TRIPS[0])).await;
    assert_eq!(code, "not_found", "{who}");
    let told: Vec<&ServerMessage> = c.pending().iter().filter(|m| about(m, trip_id)).collect();
    assert!(told.is_empty(), "{who} was told about {trip_id}: {told:?}");
}

/// A round trip through the rider's actor, then: nothing about `trip_id` is waiting.
async fn rider_told_nothing(c: &mut Client, who: &str, trip_id: &str) {
    c.ok(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": now_ms()}))
        .await;
    let told: Vec<&ServerMessage> = c.pending().iter().filter(|m| about(m, trip_id)).collect();
    assert!(told.is_empty(), "{who} was told about {trip_id}: {told:?}");
}

/// The trip as its rider reads it and as the admin console does (trip, history,
/// payments).
async fn views(s: &TestServer, rider_token: &str, trip_id: &str) -> (Value, Value) {
    let (st, rider) = s
        .get(&format!("/v1/trips/{trip_id}"), Some(rider_token))
        .await;
    assert_eq!(st, 200, "the rider reads its trip: {rider}");
    let (st, admin) = s.get(&format!("/admin/trips/{trip_id}"), Some(ADMIN)).await;
    assert_eq!(st, 200, "the admin reads the trip: {admin}");
    (rider, admin)
}

/// `POST /admin/drivers/{id}/{action}` (`suspend`, `unsuspend`) with the admin token:
/// asserts 200 and the driver's `status` after it.
async fn admin_sets_driver(s: &TestServer, id: &str, action: &str, body: Value, status: &str) {
    let (st, v) = s
        .post(&format!("/admin/drivers/{id}/{action}"), Some(ADMIN), body)
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some(status)), "{v}");
}

async fn driver_json(s: &TestServer, id: &str) -> Value {
    let (st, v) = s.get(&format!("/admin/drivers/{id}"), Some(ADMIN)).await;
    assert_eq!(st, 200, "{v}");
    v
}

/// (status, trip_id) of a driver, as the admin console shows it.
async fn driver_state(s: &TestServer, id: &str) -> (String, Option<String>) {
    let v = driver_json(s, id).await;
    (
        v["status"].as_str().expect("a status").to_owned(),
        v["trip_id"].as_str().map(str::to_owned),
    )
}

/// `request_ride` with a quote; the new trip.
async fn request_with_quote(r: &mut Client, quote_id: &Value) -> Trip {
    match r
        .request(json!({"type": "request_ride", "quote_id": quote_id}))
        .await
    {
        ServerMessage::TripUpdate { req: Some(_), trip } => {
            assert_eq!((trip.state, trip.version), (TripState::Dispatching, 1));
            trip
        }
        m => panic!("request_ride with {quote_id} was answered {m:?}"),
    }
}

/// The assigned driver takes the trip one step on; the driver and the rider see it.
async fn step(d: &mut Client, r: &mut Client, trip_id: &str, cmd: &str, to: TripState) -> Trip {
    d.ok(json!({"type": cmd, "trip_id": trip_id})).await;
    assert_eq!(d.trip_in(to).await.trip_id, trip_id);
    let t = r.trip_in(to).await;
    assert_eq!(t.trip_id, trip_id);
    t
}

/// The rider's receipt for `trip_id` (after `completed`).
async fn receipt(r: &mut Client, trip_id: &str) {
    match r
        .next_where("a receipt", |m| matches!(m, ServerMessage::Receipt { .. }))
        .await
    {
        ServerMessage::Receipt { trip_id: t, .. } => assert_eq!(t, trip_id),
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Drivers

/// Driver B (online, nearby, never offered) and driver X (offered first, declined) try
/// every driver trip command on a trip offered to A, then assigned to A, arrived, in
/// progress. docs/api.md: `accept`/`decline` are `forbidden` when the trip was never
/// offered to the driver and `conflict` when its offer went to another driver;
/// `arrived`, `start_trip`, `complete_trip`, `cancel_trip` are `forbidden` when the driver
/// is not the trip's. Nothing changes, nobody is told anything, and A finishes the ride.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_cannot_move_a_trip_not_offered_or_assigned_to_them() {
    let s = TestServer::start(&STEADY).await;
    let (x_at, a_at, b_at) = (
        north_of(PICKUP, 100.0),
        north_of(PICKUP, 400.0),
        north_of(PICKUP, 900.0),
    );
    let (xid, xtoken, mut x) = s
        .online_driver_token("Xavier", "economy", x_at.0, x_at.1)
        .await;
    let (aid, atoken, mut a) = s
        .online_driver_token("Ana", "economy", a_at.0, a_at.1)
        .await;
    let (bid, btoken, mut b) = s
        .online_driver_token("Bruno", "economy", b_at.0, b_at.1)
        .await;
    let (_, rtoken, mut r) = s.connected_rider("Riley Rider").await;
    let q = s.quote(&rtoken, PICKUP, DROPOFF, "economy").await;
    let trip = request_with_quote(&mut r, &q["quote_id"]).await;
    let tid = trip.trip_id.clone();

    // The nearest, X, is offered first and passes; the offer moves on to A.
    assert_eq!(x.offer().await.trip_id, tid);
    x.ok(command("decline", &tid)).await;
    assert_eq!(a.offer().await.trip_id, tid);

    let secrets = trip_secrets(
        &trip,
        &[&aid, "Ana", "Riley Rider", q["quote_id"].as_str().unwrap()],
    );
    let stages = [
        ("offered to A", None),
        (
            "driver_assigned",
            Some(("accept", TripState::DriverAssigned)),
        ),
        (
            "driver_arrived",
            Some(("arrived", TripState::DriverArrived)),
        ),
        ("in_progress", Some(("start_trip", TripState::InProgress))),
    ];
    for (stage, by_a) in stages {
        if let Some((cmd, to)) = by_a {
            if cmd == "accept" {
                a.ok(command("accept", &tid)).await;
                assert_eq!(r.trip_in(to).await.driver_id.as_deref(), Some(aid.as_str()));
                a.trip_in(to).await;
            } else {
                step(&mut a, &mut r, &tid, cmd, to).await;
            }
        }
        let before = views(&s, &rtoken, &tid).await;
        let a_before = driver_state(&s, &aid).await;

        for kind in DRIVER_TRIP_COMMANDS {
            let (c, m) = refusal(&mut b, command(kind, &tid)).await;
            assert_eq!(c, "forbidden", "{stage}: {kind} by B, never offered: {m}");
            reveals_nothing(&m, &secrets, &format!("{stage}: {kind} by B"));

            let want = if matches!(kind, "accept" | "decline") {
                "conflict" // its offer went to another driver
            } else {
                "forbidden" // it is not the trip's driver
            };
            let (c, m) = refusal(&mut x, command(kind, &tid)).await;
            assert_eq!(c, want, "{stage}: {kind} by X, who declined: {m}");
            reveals_nothing(&m, &secrets, &format!("{stage}: {kind} by X"));
        }
        // Neither may read the trip; A may once it is A's (only offered, it may not).
        let path = format!("/v1/trips/{tid}");
        for (who, token) in [("B", &btoken), ("X", &xtoken)] {
            let (st, v) = s.get(&path, Some(token)).await;
            assert_eq!(
                (st, code(&v)),
                (403, Some("forbidden")),
                "{stage}: {who} reads the trip: {v}"
            );
            let m = bare_error(&v, &format!("{stage}: {who} reads the trip"));
            reveals_nothing(&m, &secrets, &format!("{stage}: {who} reads the trip"));
        }
        let (st, v) = s.get(&path, Some(&atoken)).await;
        let want = if by_a.is_none() { 403 } else { 200 };
        assert_eq!(st, want, "{stage}: A reads the trip: {v}");

        // Nothing changed, and nobody was told anything.
        assert_eq!(
            views(&s, &rtoken, &tid).await,
            before,
            "{stage}: the trip changed"
        );
        assert_eq!(driver_state(&s, &aid).await, a_before, "{stage}: A changed");
        for (who, id) in [("B", &bid), ("X", &xid)] {
            assert_eq!(
                driver_state(&s, id).await,
                ("available".to_owned(), None),
                "{stage}: {who} changed"
            );
        }
        driver_told_nothing(&mut b, "B", &tid).await;
        driver_told_nothing(&mut x, "X", &tid).await;
        driver_told_nothing(&mut a, "A", &tid).await;
        rider_told_nothing(&mut r, "the rider", &tid).await;
    }

    // A finishes the ride as if nothing had happened.
    let done = step(&mut a, &mut r, &tid, "complete_trip", TripState::Completed).await;
    assert_eq!(
        (done.version, done.driver_id.as_deref(), done.fare_cents),
        (5, Some(aid.as_str()), q["fare_cents"].as_i64()),
        "{done:?}"
    );
    let (_, admin) = views(&s, &rtoken, &tid).await;
    let history = admin["history"].as_array().expect("a history");
    let movers: Vec<(&str, Option<&str>)> = history
        .iter()
        .map(|h| (h["by"].as_str().unwrap(), h["driver_id"].as_str()))
        .collect();
    let a_moved = ("driver", Some(aid.as_str()));
    assert_eq!(
        movers,
        [("rider", None), a_moved, a_moved, a_moved, a_moved],
        "only the rider and A moved the trip: {admin}"
    );
    // A earned the fare; B and X earned nothing.
    for (token, trips) in [(&atoken, 1), (&btoken, 0), (&xtoken, 0)] {
        let (st, e) = s.get("/v1/drivers/me/earnings", Some(token)).await;
        assert_eq!(
            (st, e["total"]["trips"].as_u64()),
            (200, Some(trips)),
            "{e}"
        );
    }
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. Riders

/// Rider B reads (`GET /v1/trips/{id}`, the one client route that takes an id), cancels
/// (`cancel_ride`) and requests with the quotes of rider A's trip, at every state of it:
/// 403/`forbidden` (an unused quote of A's too; A's used quote is gone: `not_found`),
/// saying nothing about A's trip. A's trip is unchanged at each state, the driver
/// finishes it, and A's other quote still buys A a ride afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_cannot_read_cancel_or_request_on_another_riders_trip_or_quote() {
    let s = TestServer::start(&STEADY).await;
    let near = north_of(PICKUP, 200.0);
    let (did, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (aid, atoken, mut a) = s.connected_rider("Alice Liddell").await;
    let (bob, btoken, mut b) = s.connected_rider("Bob").await;
    let q_used = s.quote(&atoken, PICKUP, DROPOFF, "economy").await;
    let later = north_of(DROPOFF, 1_000.0);
    let q_kept = s.quote(&atoken, PICKUP, later, "economy").await;
    let trip = request_with_quote(&mut a, &q_used["quote_id"]).await;
    let tid = trip.trip_id.clone();
    assert_eq!(d.offer().await.trip_id, tid);

    let path = format!("/v1/trips/{tid}");
    let extra = [
        aid.as_str(),
        did.as_str(),
        "Alice",
        "Liddell",
        "Dana",
        q_used["quote_id"].as_str().unwrap(),
        q_kept["quote_id"].as_str().unwrap(),
    ];
    let stages = [
        ("dispatching", None),
        (
            "driver_assigned",
            Some(("accept", TripState::DriverAssigned)),
        ),
        (
            "driver_arrived",
            Some(("arrived", TripState::DriverArrived)),
        ),
        ("in_progress", Some(("start_trip", TripState::InProgress))),
        ("completed", Some(("complete_trip", TripState::Completed))),
    ];
    for (stage, by_driver) in stages {
        let now = match by_driver {
            None => trip.clone(),
            Some(("accept", to)) => {
                d.ok(command("accept", &tid)).await;
                a.trip_in(to).await
            }
            Some((cmd, to)) => {
                let t = step(&mut d, &mut a, &tid, cmd, to).await;
                if to == TripState::Completed {
                    receipt(&mut a, &tid).await;
                }
                t
            }
        };
        let secrets = trip_secrets(&now, &extra);
        let before = views(&s, &atoken, &tid).await;

        let (st, v) = s.get(&path, Some(&btoken)).await;
        assert_eq!(
            (st, code(&v)),
            (403, Some("forbidden")),
            "{stage}: B reads A's trip: {v}"
        );
        let m = bare_error(&v, &format!("{stage}: B reads A's trip"));
        reveals_nothing(&m, &secrets, &format!("{stage}: B reads A's trip"));

        let (c, m) = refusal(
            &mut b,
            json!({"type": "cancel_ride", "trip_id": tid, "reason": "mine now"}),
        )
        .await;
        assert_eq!(c, "forbidden", "{stage}: B cancels A's trip: {m}");
        reveals_nothing(&m, &secrets, &format!("{stage}: B cancels A's trip"));

        let (c, m) = refusal(
            &mut b,
            json!({"type": "request_ride", "quote_id": q_kept["quote_id"]}),
        )
        .await;
        assert_eq!(c, "forbidden", "{stage}: B requests with A's quote: {m}");
        reveals_nothing(&m, &secrets, &format!("{stage}: B uses A's quote"));
        let (c, m) = refusal(
            &mut b,
            json!({"type": "request_ride", "quote_id": q_used["quote_id"]}),
        )
        .await;
        assert_eq!(
            c, "not_found",
            "{stage}: B requests with A's used quote: {m}"
        );
        reveals_nothing(&m, &secrets, &format!("{stage}: B uses A's used quote"));

        // Nothing changed: A's trip, B's lack of one; and neither was told anything.
        assert_eq!(
            views(&s, &atoken, &tid).await,
            before,
            "{stage}: A's trip changed"
        );
        let (st, bv) = s.get(&format!("/admin/riders/{bob}"), Some(ADMIN)).await;
        assert_eq!((st, &bv["trip"]), (200, &Value::Null), "{stage}: {bv}");
        let (st, list) = s
            .get(&format!("/admin/trips?rider_id={bob}"), Some(ADMIN))
            .await;
        assert_eq!(st, 200, "{list}");
        assert_eq!(list["trips"], json!([]), "{stage}: B got a trip: {list}");
        rider_told_nothing(&mut a, "A", &tid).await;
        rider_told_nothing(&mut b, "B", &tid).await;
    }

    // The quote B tried to use still buys A's next ride.
    let next = request_with_quote(&mut a, &q_kept["quote_id"]).await;
    assert_eq!(Some(next.quote.fare_cents), q_kept["fare_cents"].as_i64());
    assert_eq!(d.offer().await.trip_id, next.trip_id);
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 3. Roles

/// A driver's token on the rider routes (`POST /v1/quotes`, `GET /v1/drivers/nearby`,
/// the `/v1/ws/rider` upgrade) and a rider's on the driver routes
/// (`GET /v1/drivers/me/earnings`, the `/v1/ws/driver` upgrade) are 403, by header and by
/// `?token=`; no session opens. Every one of them answers the right role, and 401
/// without a token or with an unknown one. Inside a session, the other role's message
/// types are `unknown_type` and do nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_and_rider_tokens_stay_on_their_own_routes() {
    let s = TestServer::start(&["--admin-token", ADMIN]).await;
    let (did, dtoken) = s.driver("Dana", "economy").await;
    let (_, rtoken) = s.rider("Riley").await;
    let quote_body = json!({"pickup": {"lat": PICKUP.0, "lng": PICKUP.1}, "dropoff": {"lat": DROPOFF.0, "lng": DROPOFF.1}, "product": "economy"});
    let nearby = format!("/v1/drivers/nearby?lat={}&lng={}", PICKUP.0, PICKUP.1);
    // (method, path, body, the role it is for, its success status)
    let routes: [(Method, &str, Option<Value>, &str, u16); 3] = [
        (Method::POST, "/v1/quotes", Some(quote_body), "rider", 201),
        (Method::GET, &nearby, None, "rider", 200),
        (Method::GET, "/v1/drivers/me/earnings", None, "driver", 200),
    ];
    for (m, path, body, role, ok) in &routes {
        let (right, wrong) = if *role == "rider" {
            (&rtoken, &dtoken)
        } else {
            (&dtoken, &rtoken)
        };
        let (st, v) = s.request(m.clone(), path, Some(wrong), body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (403, Some("forbidden")),
            "{m} {path} with the other role's token: {v}"
        );
        bare_error(&v, &format!("{m} {path}"));
        for (what, t) in [("no token", None), ("an unknown token", Some("tok_forged"))] {
            let (st, v) = s.request(m.clone(), path, t, body.clone()).await;
            assert_eq!(
                (st, code(&v)),
                (401, Some("unauthorized")),
                "{m} {path} with {what}: {v}"
            );
            bare_error(&v, &format!("{m} {path}"));
        }
        let (st, v) = s.request(m.clone(), path, Some(right), body.clone()).await;
        assert_eq!(st, *ok, "{m} {path} with a {role}'s token: {v}");
    }
    // GET /v1/trips/{id} is for both roles; without a valid token it is 401.
    for t in [None, Some("tok_forged")] {
        let (st, v) = s.get(&format!("/v1/trips/{}", UNKNOWN_TRIPS[0]), t).await;
        assert_eq!((st, code(&v)), (401, Some("unauthorized")), "{v}");
    }

    // The upgrades: the other role's token is 403, in the header or the query.
    let driver_ws = s.ws_url("/v1/ws/driver");
    let rider_ws = s.ws_url("/v1/ws/rider");
    for (url, wrong) in [(&driver_ws, &rtoken), (&rider_ws, &dtoken)] {
        for (how, u, header) in [
            ("header", url.clone(), Some(wrong.as_str())),
            ("query", format!("{url}?token={wrong}"), None),
        ] {
            let Err((st, v)) = Client::try_connect(&u, header).await else {
                panic!("{url} opened with the other role's token in the {how}");
            };
            assert_eq!((st, code(&v)), (403, Some("forbidden")), "{url} {how}: {v}");
            bare_error(&v, &format!("{url} {how}"));
        }
    }
    s.wait_sessions("driver", 0).await;
    s.wait_sessions("rider", 0).await;

    // In the right sessions, the other role's messages are unknown and do nothing.
    let mut d = Client::driver(&s, &dtoken)
        .await
        .expect("the driver connects");
    d.welcome().await;
    let mut r = Client::rider(&s, &rtoken)
        .await
        .expect("the rider connects");
    r.welcome().await;
    let ride = json!({"type": "request_ride", "pickup": {"lat": PICKUP.0, "lng": PICKUP.1}, "dropoff": {"lat": DROPOFF.0, "lng": DROPOFF.1}, "product": "economy"});
    for v in [
        ride.clone(),
        json!({"type": "cancel_ride", "trip_id": UNKNOWN_TRIPS[0]}),
    ] {
        let (c, m) = refusal(&mut d, v.clone()).await;
        assert_eq!(c, "unknown_type", "a driver sends {v}: {m}");
    }
    for kind in ["go_online", "go_offline"] {
        let (c, m) = refusal(&mut r, json!({"type": kind})).await;
        assert_eq!(c, "unknown_type", "a rider sends {kind}: {m}");
    }
    for kind in DRIVER_TRIP_COMMANDS {
        let (c, m) = refusal(&mut r, command(kind, UNKNOWN_TRIPS[0])).await;
        assert_eq!(c, "unknown_type", "a rider sends {kind}: {m}");
    }
    assert_eq!(driver_state(&s, &did).await, ("offline".to_owned(), None));
    let (st, v) = s.get("/admin/trips", Some(ADMIN)).await;
    assert_eq!((st, &v["trips"]), (200, &json!([])), "{v}");
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. The admin console

/// The routes `transport/src/server/admin.rs` serves: (method, path template).
fn admin_routes_in_source() -> BTreeSet<(String, String)> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../transport/src/server/admin.rs");
    let src = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let start = src.find("pub fn routes()").expect("admin::routes()");
    let body = &src[start..];
    let body = &body[..body.find("\n}\n").expect("the end of admin::routes()")];
    let mut out = BTreeSet::new();
    for chunk in body.split(".route(").skip(1) {
        let open = chunk.find('"').expect("a route path");
        let rest = &chunk[open + 1..];
        let close = rest.find('"').expect("a route path");
        let (path, handlers) = (&rest[..close], &rest[close + 1..]);
        for m in ["get", "post", "put", "patch", "delete"] {
            let pat = format!("{m}(");
            let mut from = 0;
            while let Some(i) = handlers[from..].find(&pat) {
                let at = from + i;
                let prev = handlers[..at].chars().next_back();
                if prev.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                    out.insert((m.to_uppercase(), path.to_owned()));
                }
                from = at + pat.len();
            }
        }
    }
    assert!(
        out.len() > 10,
        "admin routes not found in {}",
        file.display()
    );
    out
}

/// Every `/admin/` route (checked against the router's source), with a concrete path
/// and a body that the admin token would have succeeded with, called with each rider's
/// and driver's token involved (the owners of the trips named included): 403 with a bare
/// body; without a token or with unknown ones (one character off the admin token, a
/// `Basic` scheme, the admin token in `?token=`): 401. Nothing changed: drivers, trips,
/// payments, the ledger, pricing, surge and the payment provider read the same, and the
/// riders were told nothing. Then the admin token succeeds on every row, proving each
/// refusal was about the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rider_and_driver_tokens_cannot_reach_any_admin_route() {
    let s = TestServer::start(&STEADY).await;
    let near = north_of(PICKUP, 200.0);
    // T1: a finished ride (refundable) of R1 with D1.
    let (d1, d1token, mut d1c) = s
        .online_driver_token("Dana", "economy", near.0, near.1)
        .await;
    let (r1, r1token, mut r1c) = s.connected_rider("Riley").await;
    let t1 = r1c.request_ride(PICKUP, DROPOFF, "economy").await.trip_id;
    assert_eq!(d1c.offer().await.trip_id, t1);
    d1c.ok(command("accept", &t1)).await;
    r1c.trip_in(TripState::DriverAssigned).await;
    for (cmd, to) in [
        ("arrived", TripState::DriverArrived),
        ("start_trip", TripState::InProgress),
        ("complete_trip", TripState::Completed),
    ] {
        step(&mut d1c, &mut r1c, &t1, cmd, to).await;
    }
    receipt(&mut r1c, &t1).await;
    // T2: a live ride (cancellable) of R2 with D2.
    let (d2, d2token, mut d2c) = s.online_driver_token("Drew", "xl", near.0, near.1).await;
    let (_, r2token, mut r2c) = s.connected_rider("Robin").await;
    let t2 = r2c.request_ride(PICKUP, DROPOFF, "xl").await.trip_id;
    assert_eq!(d2c.offer().await.trip_id, t2);
    d2c.ok(command("accept", &t2)).await;
    r2c.trip_in(TripState::DriverAssigned).await;
    d2c.trip_in(TripState::DriverAssigned).await;
    // D4: suspended (unsuspendable).
    let (d4, _) = s.driver("Dale", "premium").await;
    admin_sets_driver(&s, &d4, "suspend", json!({}), "suspended").await;

    let cell = driver_json(&s, &d1).await["cell"]
        .as_str()
        .expect("D1's cell")
        .to_owned();
    let (_, pricing) = s.get("/admin/pricing", Some(ADMIN)).await;
    let mut changed = pricing.clone();
    changed["products"]["economy"]["minimum_cents"] = json!(9999);

    // (method, route template, concrete path, body)
    let rows: Vec<(Method, &str, String, Option<Value>)> = vec![
        (Method::GET, "/admin/stats", "/admin/stats".into(), None),
        (Method::GET, "/admin/drivers", "/admin/drivers".into(), None),
        (
            Method::GET,
            "/admin/drivers",
            "/admin/drivers?status=available".into(),
            None,
        ),
        (
            Method::GET,
            "/admin/drivers/{id}",
            format!("/admin/drivers/{d1}"),
            None,
        ),
        (
            Method::POST,
            "/admin/drivers/{id}/suspend",
            format!("/admin/drivers/{d1}/suspend"),
            Some(json!({"reason": "audit"})),
        ),
        (
            Method::POST,
            "/admin/drivers/{id}/unsuspend",
            format!("/admin/drivers/{d4}/unsuspend"),
            None,
        ),
        (
            Method::GET,
            "/admin/riders/{id}",
            format!("/admin/riders/{r1}"),
            None,
        ),
        (Method::GET, "/admin/trips", "/admin/trips".into(), None),
        (
            Method::GET,
            "/admin/trips",
            format!("/admin/trips?rider_id={r1}&driver_id={d1}"),
            None,
        ),
        (
            Method::GET,
            "/admin/trips/{id}",
            format!("/admin/trips/{t1}"),
            None,
        ),
        (
            Method::POST,
            "/admin/trips/{id}/cancel",
            format!("/admin/trips/{t2}/cancel"),
            Some(json!({"reason": "audit"})),
        ),
        (
            Method::GET,
            "/admin/cells",
            "/admin/cells?active=true".into(),
            None,
        ),
        (Method::GET, "/admin/pricing", "/admin/pricing".into(), None),
        (
            Method::PUT,
            "/admin/pricing",
            "/admin/pricing".into(),
            Some(changed.clone()),
        ),
        (Method::GET, "/admin/actors", "/admin/actors".into(), None),
        (Method::GET, "/admin/ledger", "/admin/ledger".into(), None),
        (
            Method::GET,
            "/admin/ledger",
            format!("/admin/ledger?account=rider:{r1}"),
            None,
        ),
        (
            Method::POST,
            "/admin/trips/{id}/refund",
            format!("/admin/trips/{t1}/refund"),
            Some(json!({"amount_cents": 1, "reason": "audit"})),
        ),
        (Method::GET, "/admin/surge", "/admin/surge".into(), None),
        (
            Method::PUT,
            "/admin/surge",
            "/admin/surge".into(),
            Some(json!({"city_cap": 1.5})),
        ),
        (
            Method::PUT,
            "/admin/surge/cells/{cell}",
            format!("/admin/surge/cells/{cell}"),
            Some(json!({"multiplier": 1.5})),
        ),
        (
            Method::GET,
            "/admin/payments/provider",
            "/admin/payments/provider".into(),
            None,
        ),
        (
            Method::PUT,
            "/admin/payments/provider",
            "/admin/payments/provider".into(),
            Some(json!({"mode": "fail"})),
        ),
        (
            Method::GET,
            "/admin/openapi.json",
            "/admin/openapi.json".into(),
            None,
        ),
    ];
    let covered: BTreeSet<(String, String)> = rows
        .iter()
        .map(|(m, t, ..)| (m.to_string(), t.to_string()))
        .collect();
    let served = admin_routes_in_source();
    assert_eq!(
        covered,
        served,
        "the table must cover exactly the admin routes; missing: {:?}, extra: {:?}",
        served.difference(&covered).collect::<Vec<_>>(),
        covered.difference(&served).collect::<Vec<_>>()
    );

    // What a refused call could have changed.
    async fn state(s: &TestServer, ids: &[&str], trips: &[&str]) -> Vec<Value> {
        let mut out = Vec::new();
        for id in ids {
            out.push(driver_json(s, id).await);
        }
        for t in trips {
            let (_, v) = s.get(&format!("/admin/trips/{t}"), Some(ADMIN)).await;
            out.push(v);
        }
        for path in [
            "/admin/pricing",
            "/admin/ledger",
            "/admin/payments/provider",
        ] {
            let (st, v) = s.get(path, Some(ADMIN)).await;
            assert_eq!(st, 200, "{path}: {v}");
            out.push(v);
        }
        // The surge cells' figures move by themselves; the operator's settings do not.
        let (_, v) = s.get("/admin/surge", Some(ADMIN)).await;
        out.push(json!({"city_cap": v["city_cap"], "pins": v["pins"]}));
        out
    }
    let drivers = [d1.as_str(), d2.as_str(), d4.as_str()];
    let trips = [t1.as_str(), t2.as_str()];
    let before = state(&s, &drivers, &trips).await;

    let tokens = [
        ("the rider of T1", &r1token),
        ("the rider of T2", &r2token),
        ("the driver of T1", &d1token),
        ("the driver of T2", &d2token),
    ];
    let near_admin = format!("{}X", &ADMIN[..ADMIN.len() - 1]);
    for (m, _, path, body) in &rows {
        for (who, t) in tokens {
            let (st, v) = s.request(m.clone(), path, Some(t), body.clone()).await;
            assert_eq!(
                (st, code(&v)),
                (403, Some("forbidden")),
                "{m} {path} with {who}'s token: {v}"
            );
            let msg = bare_error(&v, &format!("{m} {path}"));
            reveals_nothing(
                &msg,
                &[
                    d1.clone(),
                    d2.clone(),
                    d4.clone(),
                    r1.clone(),
                    t1.clone(),
                    t2.clone(),
                ],
                &format!("{m} {path}"),
            );
        }
        let sep = if path.contains('?') { '&' } else { '?' };
        let no_token: [(&str, String, Option<String>); 6] = [
            ("no token", path.clone(), None),
            (
                "an unknown token",
                path.clone(),
                Some("Bearer tok_forged".into()),
            ),
            (
                "a near miss",
                path.clone(),
                Some(format!("Bearer {near_admin}")),
            ),
            ("an empty bearer", path.clone(), Some("Bearer ".into())),
            (
                "the Basic scheme",
                path.clone(),
                Some(format!("Basic {ADMIN}")),
            ),
            ("?token=", format!("{path}{sep}token={ADMIN}"), None),
        ];
        for (what, p, auth) in no_token {
            let mut req = s.http.request(m.clone(), s.url(&p));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.expect("request");
            let st = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(
                (st, code(&v)),
                (401, Some("unauthorized")),
                "{m} {p} with {what}: {v}"
            );
            bare_error(&v, &format!("{m} {p} with {what}"));
        }
    }

    // Nothing changed, and the riders were told nothing.
    assert_eq!(state(&s, &drivers, &trips).await, before);
    rider_told_nothing(&mut r1c, "R1", &t1).await;
    rider_told_nothing(&mut r2c, "R2", &t2).await;
    driver_told_nothing(&mut d2c, "D2", &t2).await;

    // The admin token gets through on every row: each refusal was about the token.
    for (m, _, path, body) in &rows {
        let (st, v) = s.request(m.clone(), path, Some(ADMIN), body.clone()).await;
        assert_eq!(st, 200, "{m} {path} with the admin token: {v}");
    }
    assert_eq!(r2c.trip_in(TripState::Cancelled).await.trip_id, t2);
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Suspension

/// S, online and the nearest driver, is suspended (`POST /admin/drivers/{id}/suspend`):
/// its session is told (`welcome`, `suspended`); a location ping does not put it back on
/// the map; `go_online` is `forbidden`. A ride requested next to it is offered to O
/// (farther), and once O declines, it ends `no_driver_found`: S was never offered it,
/// and S cannot accept it either. Unsuspended and online again, S is the first offered:
/// the suspension, not the scene, kept the offers away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_driver_gets_no_offers_and_cannot_go_online() {
    let s = TestServer::start(&STEADY).await;
    let (s_at, o_at) = (north_of(PICKUP, 100.0), north_of(PICKUP, 1_500.0));
    let (sid, mut sc) = s.online_driver("Sam", "economy", s_at.0, s_at.1).await;
    let (oid, mut oc) = s.online_driver("Olga", "economy", o_at.0, o_at.1).await;
    let (_, rtoken, mut r) = s.connected_rider("Riley").await;

    admin_sets_driver(&s, &sid, "suspend", json!({"reason": "audit"}), "suspended").await;
    match sc
        .next_where("a welcome", |m| matches!(m, ServerMessage::Welcome { .. }))
        .await
    {
        ServerMessage::Welcome { status, .. } => {
            assert_eq!(status, Some(DriverStatus::Suspended))
        }
        _ => unreachable!(),
    }
    // Still connected and moving, yet not available and not on the map.
    sc.ok(json!({"type": "location", "lat": s_at.0, "lng": s_at.1, "ts": now_ms()}))
        .await;
    let (c, m) = refusal(&mut sc, json!({"type": "go_online"})).await;
    assert_eq!(c, "forbidden", "go_online while suspended: {m}");
    assert_eq!(driver_state(&s, &sid).await, ("suspended".to_owned(), None));
    let (st, v) = s
        .get(
            &format!("/v1/drivers/nearby?lat={}&lng={}", PICKUP.0, PICKUP.1),
            Some(&rtoken),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let seen: Vec<f64> = v["drivers"]
        .as_array()
        .expect("drivers")
        .iter()
        .map(|d| d["distance_m"].as_f64().unwrap())
        .collect();
    assert!(
        seen.len() == 1 && seen[0] > 1_000.0,
        "only O is on the map: {v}"
    );

    // The ride goes to O; when O passes, nobody is left.
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let tid = trip.trip_id.clone();
    assert_eq!(oc.offer().await.trip_id, tid);
    assert_eq!(
        driver_state(&s, &oid).await,
        ("offered".to_owned(), Some(tid.clone()))
    );
    let (c, m) = refusal(&mut sc, command("accept", &tid)).await;
    assert_eq!(c, "forbidden", "a suspended driver accepts: {m}");
    oc.ok(command("decline", &tid)).await;
    let ended = r.trip_in(TripState::NoDriverFound).await;
    assert_eq!(ended.trip_id, tid);
    driver_told_nothing(&mut sc, "S", &tid).await;
    assert_eq!(driver_state(&s, &sid).await, ("suspended".to_owned(), None));
    let (_, admin) = s.get(&format!("/admin/trips/{tid}"), Some(ADMIN)).await;
    assert!(
        !admin.to_string().contains(sid.as_str()),
        "S appears in the trip's record: {admin}"
    );

    // Control: unsuspended and online, S is the first to be offered the next ride.
    admin_sets_driver(&s, &sid, "unsuspend", json!({}), "offline").await;
    sc.ok(json!({"type": "go_online"})).await;
    let again = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(sc.offer().await.trip_id, again.trip_id);
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 6. Someone else's ids

/// Ids that belong to someone else, and ids that belong to nobody. PROTOCOL.md's error
/// table gives the two their own codes: `forbidden` (403) for "another rider's trip",
/// `not_found` (404) for "no such trip" (docs/api.md likewise for `cancel_ride`, quotes
/// and driver commands), so a client may tell them apart; what it must not learn is
/// anything more. So, for rider B and driver E against rider A's trips in three states
/// (live, completed, cancelled) and against unknown ids:
/// - every foreign id answers the same status, code and message, whatever the trip's
///   state, and every unknown id the same as every other unknown id; no message echoes an
///   id or names anything of A's;
/// - A's used quote reads exactly as an unknown quote;
/// - on the admin routes, where a client token never gets past authorization, B's own id,
///   A's id and an unknown id are indistinguishable: the same 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_of_someone_else_answer_403_or_404_without_saying_more() {
    let s = TestServer::start(&STEADY).await;
    let near = north_of(PICKUP, 200.0);
    let (did, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (eve, etoken, mut e) = s.online_driver_token("Eve", "economy", FAR.0, FAR.1).await;
    let (aid, atoken, mut a) = s.connected_rider("Alice Liddell").await;
    let (bob, btoken, mut b) = s.connected_rider("Bob").await;

    // A's completed trip, cancelled trip and live (assigned) trip.
    let q_done = s.quote(&atoken, PICKUP, DROPOFF, "economy").await;
    let done = request_with_quote(&mut a, &q_done["quote_id"]).await;
    assert_eq!(d.offer().await.trip_id, done.trip_id);
    d.ok(command("accept", &done.trip_id)).await;
    a.trip_in(TripState::DriverAssigned).await;
    d.trip_in(TripState::DriverAssigned).await;
    for (cmd, to) in [
        ("arrived", TripState::DriverArrived),
        ("start_trip", TripState::InProgress),
        ("complete_trip", TripState::Completed),
    ] {
        step(&mut d, &mut a, &done.trip_id, cmd, to).await;
    }
    let cancelled = a.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(d.offer().await.trip_id, cancelled.trip_id);
    a.ok(json!({"type": "cancel_ride", "trip_id": cancelled.trip_id}))
        .await;
    a.trip_in(TripState::Cancelled).await;
    assert_eq!(d.offer_expired().await, cancelled.trip_id);
    let live = a.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(d.offer().await.trip_id, live.trip_id);
    d.ok(command("accept", &live.trip_id)).await;
    let live = a.trip_in(TripState::DriverAssigned).await;
    d.trip_in(TripState::DriverAssigned).await;
    let q_kept = s.quote(&atoken, PICKUP, DROPOFF, "economy").await;

    let foreign = [
        ("live", live.trip_id.as_str()),
        ("completed", done.trip_id.as_str()),
        ("cancelled", cancelled.trip_id.as_str()),
    ];
    let mut secrets = trip_secrets(
        &live,
        &[
            &aid,
            &did,
            "Alice",
            "Liddell",
            "Dana",
            q_done["quote_id"].as_str().unwrap(),
            q_kept["quote_id"].as_str().unwrap(),
        ],
    );
    secrets.extend(foreign.iter().map(|(_, t)| t.to_string()));
    secrets.extend(UNKNOWN_TRIPS.iter().map(|t| t.to_string()));
    secrets.push("nope".into());
    let before: Vec<(Value, Value)> = {
        let mut v = Vec::new();
        for (_, t) in foreign {
            v.push(views(&s, &atoken, t).await);
        }
        v
    };

    /// All `answers` are one and the same; that one.
    fn same<T: PartialEq + std::fmt::Debug + Clone>(answers: &[(String, T)], what: &str) -> T {
        let first = &answers[0].1;
        for (which, a) in answers {
            assert_eq!(
                a, first,
                "{what}: {which} answers differently from {}",
                answers[0].0
            );
        }
        first.clone()
    }

    // REST: GET /v1/trips/{id}, for a rider and for a driver.
    for (who, token) in [("rider B", &btoken), ("driver E", &etoken)] {
        let mut theirs = Vec::new();
        for (state, t) in foreign {
            let (st, v) = s.get(&format!("/v1/trips/{t}"), Some(token)).await;
            let m = bare_error(&v, &format!("{who} reads A's {state} trip"));
            reveals_nothing(&m, &secrets, &format!("{who} reads A's {state} trip"));
            theirs.push((format!("A's {state} trip"), (st, v)));
        }
        let (st, v) = same(&theirs, &format!("{who} reads A's trips"));
        assert_eq!((st, code(&v)), (403, Some("forbidden")), "{who}: {v}");
        let mut nobodys = Vec::new();
        for t in UNKNOWN_TRIPS {
            let (st, v) = s.get(&format!("/v1/trips/{t}"), Some(token)).await;
            let m = bare_error(&v, &format!("{who} reads {t}"));
            reveals_nothing(&m, &secrets, &format!("{who} reads {t}"));
            nobodys.push((t.to_owned(), (st, v)));
        }
        let (st, v) = same(&nobodys, &format!("{who} reads unknown trips"));
        assert_eq!((st, code(&v)), (404, Some("not_found")), "{who}: {v}");
    }

    // WebSocket: rider B cancels A's trips and unknown ones, and uses A's quotes.
    let mut theirs = Vec::new();
    for (state, t) in foreign {
        let answer = refusal(&mut b, json!({"type": "cancel_ride", "trip_id": t})).await;
        reveals_nothing(&answer.1, &secrets, &format!("B cancels A's {state} trip"));
        theirs.push((format!("A's {state} trip"), answer));
    }
    let (c, _) = same(&theirs, "B cancels A's trips");
    assert_eq!(c, "forbidden");
    let mut nobodys = Vec::new();
    for t in UNKNOWN_TRIPS {
        let answer = refusal(&mut b, json!({"type": "cancel_ride", "trip_id": t})).await;
        reveals_nothing(&answer.1, &secrets, &format!("B cancels {t}"));
        nobodys.push((t.to_owned(), answer));
    }
    let (c, _) = same(&nobodys, "B cancels unknown trips");
    assert_eq!(c, "not_found");
    let mut quotes = Vec::new();
    for (which, q) in [
        ("A's used quote", q_done["quote_id"].clone()),
        (
            "an unknown quote",
            json!("qte_00000000000000000000000000000000"),
        ),
        ("a malformed quote id", json!("qte_nope")),
    ] {
        let answer = refusal(&mut b, json!({"type": "request_ride", "quote_id": q})).await;
        reveals_nothing(&answer.1, &secrets, &format!("B requests with {which}"));
        quotes.push((which.to_owned(), answer));
    }
    let (c, _) = same(
        &quotes,
        "B requests with quotes that are gone or never were",
    );
    assert_eq!(c, "not_found");
    let (c, m) = refusal(
        &mut b,
        json!({"type": "request_ride", "quote_id": q_kept["quote_id"]}),
    )
    .await;
    assert_eq!(c, "forbidden", "B requests with A's live quote: {m}");
    reveals_nothing(&m, &secrets, "B requests with A's live quote");

    // Admin routes with a client's token: own, someone else's and unknown ids alike.
    for (who, token, own_rider, own_driver) in [
        ("rider B", &btoken, bob.as_str(), None),
        ("driver E", &etoken, aid.as_str(), Some(eve.as_str())),
    ] {
        let mut answers = Vec::new();
        let paths = [
            (Method::GET, format!("/admin/trips/{}", live.trip_id), None),
            (
                Method::GET,
                format!("/admin/trips/{}", UNKNOWN_TRIPS[0]),
                None,
            ),
            (Method::GET, format!("/admin/riders/{own_rider}"), None),
            (Method::GET, format!("/admin/riders/{aid}"), None),
            (Method::GET, "/admin/riders/rdr_nope".to_owned(), None),
            (Method::GET, format!("/admin/drivers/{did}"), None),
            (
                Method::GET,
                format!("/admin/drivers/{}", own_driver.unwrap_or("drv_nope")),
                None,
            ),
            (
                Method::POST,
                format!("/admin/trips/{}/cancel", live.trip_id),
                Some(json!({"reason": "x"})),
            ),
            (
                Method::POST,
                format!("/admin/trips/{}/cancel", UNKNOWN_TRIPS[0]),
                Some(json!({"reason": "x"})),
            ),
            (
                Method::POST,
                format!("/admin/trips/{}/refund", done.trip_id),
                Some(json!({"amount_cents": 1, "reason": "x"})),
            ),
            (
                Method::POST,
                format!("/admin/trips/{}/refund", UNKNOWN_TRIPS[1]),
                Some(json!({"amount_cents": 1, "reason": "x"})),
            ),
        ];
        for (m, p, body) in paths {
            let (st, v) = s.request(m.clone(), &p, Some(token), body).await;
            let msg = bare_error(&v, &format!("{who}: {m} {p}"));
            reveals_nothing(&msg, &secrets, &format!("{who}: {m} {p}"));
            answers.push((format!("{m} {p}"), (st, v)));
        }
        let (st, v) = same(&answers, &format!("{who} on admin routes"));
        assert_eq!((st, code(&v)), (403, Some("forbidden")), "{who}: {v}");
    }

    // Driver E's trip commands: per command, A's trip answers alike in every state.
    for kind in DRIVER_TRIP_COMMANDS {
        let mut nobodys = Vec::new();
        for t in UNKNOWN_TRIPS {
            let answer = refusal(&mut e, command(kind, t)).await;
            reveals_nothing(&answer.1, &secrets, &format!("E: {kind} {t}"));
            nobodys.push((t.to_owned(), answer));
        }
        let (c, _) = same(&nobodys, &format!("E: {kind} on unknown trips"));
        assert_eq!(c, "not_found", "E: {kind} on unknown trips");
    }
    let mut failures = Vec::new();
    for kind in DRIVER_TRIP_COMMANDS {
        let mut theirs = Vec::new();
        for (state, t) in foreign {
            let answer = refusal(&mut e, command(kind, t)).await;
            reveals_nothing(
                &answer.1,
                &secrets,
                &format!("E: {kind} on A's {state} trip"),
            );
            theirs.push((state, answer));
        }
        // docs/api.md: never offered the trip, not its driver: `forbidden`, whatever
        // state the trip is in.
        for (state, (c, m)) in &theirs {
            if c != "forbidden" {
                failures.push(format!(
                    "{kind} on A's {state} trip by a driver never offered it: {c} ({m}), \
                     where the live trip answers {:?}",
                    theirs[0].1
                ));
            }
        }
    }

    // Nothing of A's changed, and A and its driver were told nothing.
    for ((_, t), was) in foreign.iter().zip(&before) {
        assert_eq!(&views(&s, &atoken, t).await, was, "A's trip {t} changed");
    }
    rider_told_nothing(&mut a, "A", &live.trip_id).await;
    driver_told_nothing(&mut d, "A's driver", &live.trip_id).await;
    assert!(
        failures.is_empty(),
        "a stranger driver learns the state of a trip that is not theirs:\n{}",
        failures.join("\n")
    );
    s.stop().await.unwrap();
}
