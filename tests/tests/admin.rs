//! The admin console (docs/api.md, "Admin console (`/admin/`)"), route by route: the
//! happy path with its content checked, who may call (401 without a token or with an
//! unknown one, 403 for a rider's or a driver's), unknown ids (404) and bad input (400);
//! and what the routes do behind the reply: a suspended driver is out of dispatch until
//! unsuspended, an admin may cancel a trip in progress, a pricing change prices new
//! quotes only, and suspensions, pricing and the generated admin token survive restarts.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use dispatch_tests::{
    Client, DROPOFF, Dispatchd, PICKUP, RidePlan, Scene, TestServer, eventually, north_of, now_ms,
    rfc3339_ms, trip_of,
};
use dispatch_transport::wire::{CancelledBy, DriverStatus, ServerMessage, Trip, TripState};
use reqwest::Method;
use serde_json::{Value, json};

/// The admin token of every in-process server here (32 characters).
const ADMIN: &str = "adm-0123456789abcdef0123456789ab";

/// Far enough from `PICKUP` (about 15 km) to be in another cell and out of any search.
const FAR: (f64, f64) = (45.6300, -73.5690);

/// A server with the admin token and `extra` flags.
async fn server(extra: &[&str]) -> TestServer {
    TestServer::start(&flags(extra)).await
}

fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut f = vec!["--admin-token", ADMIN];
    f.extend_from_slice(extra);
    f
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

/// An admin GET that must answer 200; returns the body.
async fn aget(s: &TestServer, path: &str) -> Value {
    let (st, v) = s.get(path, Some(ADMIN)).await;
    assert_eq!(st, 200, "GET {path}: {v}");
    v
}

async fn apost(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    s.post(path, Some(ADMIN), body).await
}

/// An admin request that must be refused with `status` and `code`; returns the body.
async fn refused(
    s: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
    status: u16,
    want: &str,
) -> Value {
    let (st, v) = s.request(method.clone(), path, Some(ADMIN), body).await;
    assert_eq!((st, code(&v)), (status, Some(want)), "{method} {path}: {v}");
    assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");
    v
}

/// `route?query` is 400 `bad_request` for each query.
async fn bad_queries(s: &TestServer, route: &str, queries: &[&str]) {
    for q in queries {
        refused(
            s,
            Method::GET,
            &format!("{route}?{q}"),
            None,
            400,
            "bad_request",
        )
        .await;
    }
}

/// A cursor the server made for `route`, changed by the client, was not made by the
/// server: 400.
async fn a_changed_cursor_is_refused(s: &TestServer, route: &str) {
    let v = aget(s, &format!("{route}?limit=1")).await;
    let cursor = v["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("{route}: {v}"));
    for forged in [format!("{cursor}x"), format!("x{cursor}")] {
        let path = format!("{route}?cursor={}", enc(&forged));
        refused(s, Method::GET, &path, None, 400, "bad_request").await;
    }
}

async fn driver_status(s: &TestServer, id: &str) -> String {
    aget(s, &format!("/admin/drivers/{id}")).await["status"]
        .as_str()
        .expect("a status")
        .to_owned()
}

/// Percent-encodes a query value (a cursor is opaque: it may hold anything).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Every item of a paged admin list at `path` (which may carry filters), read `limit` at
/// a time by following `next_cursor`: (items, pages read).
async fn all_pages(s: &TestServer, path: &str, key: &str, limit: usize) -> (Vec<Value>, usize) {
    pages_from(s, path, key, limit, None).await
}

/// Like [`all_pages`], from the page that `cursor` names (the first one without).
async fn pages_from(
    s: &TestServer,
    path: &str,
    key: &str,
    limit: usize,
    mut cursor: Option<String>,
) -> (Vec<Value>, usize) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut items = Vec::new();
    for pages in 1..=1000 {
        let url = match &cursor {
            None => format!("{path}{sep}limit={limit}"),
            Some(c) => format!("{path}{sep}limit={limit}&cursor={}", enc(c)),
        };
        let v = aget(s, &url).await;
        let page = v[key].as_array().unwrap_or_else(|| panic!("{url}: {v}"));
        assert!(page.len() <= limit, "{url}: more than {limit} items: {v}");
        items.extend(page.iter().cloned());
        assert!(v.get("next_cursor").is_some(), "{url}: no next_cursor: {v}");
        match &v["next_cursor"] {
            Value::Null => return (items, pages),
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("{url}: next_cursor is {other}"),
        }
    }
    panic!("{path}: more than 1000 pages");
}

/// The ids (`key` of each item) of a list, in list order.
fn ids(items: &[Value], key: &str) -> Vec<String> {
    items
        .iter()
        .map(|i| {
            i[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} of {i}"))
                .to_owned()
        })
        .collect()
}

/// One admin list page (no paging): the ids of its items, and asserts it is the last page.
async fn list_ids(s: &TestServer, path: &str, key: &str, id: &str) -> Vec<String> {
    let v = aget(s, path).await;
    assert!(
        v.get("next_cursor").is_some_and(Value::is_null),
        "{path}: {v}"
    );
    ids(
        v[key].as_array().unwrap_or_else(|| panic!("{path}: {v}")),
        id,
    )
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Great-circle distance in metres.
fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dla = la2 - la1;
    let dlo = (b.1 - a.1).to_radians();
    let h = (dla / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlo / 2.0).sin().powi(2);
    2.0 * 6_371_008.8 * h.sqrt().asin()
}

fn latlng(v: &Value) -> (f64, f64) {
    (
        v["lat"].as_f64().unwrap_or_else(|| panic!("lat of {v}")),
        v["lng"].as_f64().unwrap_or_else(|| panic!("lng of {v}")),
    )
}

fn h3_index(cell: &str) -> u64 {
    u64::from_str_radix(cell, 16).unwrap_or_else(|_| panic!("not an H3 index: {cell}"))
}

fn h3_resolution(cell: &str) -> u8 {
    ((h3_index(cell) >> 52) & 0xF) as u8
}

/// The H3 parent of `cell` at resolution `res` (the digits below `res` set to 7).
fn h3_parent(cell: &str, res: u8) -> String {
    let mut i = h3_index(cell);
    assert!(res <= h3_resolution(cell));
    i = (i & !(0xF << 52)) | (u64::from(res) << 52);
    for d in res + 1..=15 {
        i |= 0x7 << ((15 - u64::from(d)) * 3);
    }
    format!("{i:x}")
}

/// Where Dana waits in a [`Scene`] ([`RidePlan::default`]'s driver): 200 m north of
/// `PICKUP`.
const DANA: (f64, f64) = (PICKUP.0 + 200.0 / 111_195.0, PICKUP.1);

/// A server with the admin token and `extra` flags, Dana (economy) online at [`DANA`] and
/// Riley connected.
async fn scene(extra: &[&str]) -> Scene {
    RidePlan::default().scene(server(extra).await).await
}

/// The rider asks for an economy ride from `PICKUP` to `DROPOFF`, and it is offered to
/// the driver; the new trip.
async fn offered(d: &mut Client, r: &mut Client) -> Trip {
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(d.offer().await.trip_id, t.trip_id);
    t
}

/// The driver takes the offer of `trip_id`; the rider sees `driver_assigned`.
async fn assign(d: &mut Client, r: &mut Client, trip_id: &str) {
    assert_eq!(d.offer().await.trip_id, trip_id);
    d.ok(json!({"type": "accept", "trip_id": trip_id})).await;
    r.trip_in(TripState::DriverAssigned).await;
}

/// The assigned driver moves the trip on through `steps` (`arrived`, `start_trip`,
/// `complete_trip`); the rider sees each.
async fn advance(d: &mut Client, r: &mut Client, trip_id: &str, steps: &[&str]) -> Trip {
    let mut last = None;
    for step in steps {
        d.ok(json!({"type": step, "trip_id": trip_id})).await;
        let want = match *step {
            "arrived" => TripState::DriverArrived,
            "start_trip" => TripState::InProgress,
            "complete_trip" => TripState::Completed,
            s => panic!("no such step {s}"),
        };
        last = Some(r.trip_in(want).await);
    }
    last.expect("at least one step")
}

const RIDE: [&str; 3] = ["arrived", "start_trip", "complete_trip"];

async fn nearby_count(s: &TestServer, rider_token: &str, at: (f64, f64)) -> usize {
    let path = format!("/v1/drivers/nearby?lat={}&lng={}", at.0, at.1);
    let (st, v) = s.get(&path, Some(rider_token)).await;
    assert_eq!(st, 200, "{v}");
    v["drivers"].as_array().expect("drivers").len()
}

// ---------------------------------------------------------------------------------------
// Who may call

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_wants_the_admin_token_and_a_refusal_changes_nothing() {
    let s = server(&[]).await;
    let (_, dtoken, mut d) = RidePlan::default().online_driver(&s).await;
    let (idle, _) = s.driver("Idle", "xl").await;
    let (rid, rtoken, mut r) = s.connected_rider("Riley").await;
    let trip = offered(&mut d, &mut r).await;
    let pricing = aget(&s, "/admin/pricing").await;
    let mut changed = pricing.clone();
    changed["products"]["economy"]["minimum_cents"] = json!(9999);

    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/admin/stats".into(), None),
        (Method::GET, "/admin/drivers".into(), None),
        (Method::GET, "/admin/drivers?status=available".into(), None),
        (Method::GET, format!("/admin/drivers/{idle}"), None),
        (
            Method::POST,
            format!("/admin/drivers/{idle}/suspend"),
            Some(json!({"reason": "test"})),
        ),
        (
            Method::POST,
            format!("/admin/drivers/{idle}/unsuspend"),
            None,
        ),
        (Method::GET, format!("/admin/riders/{rid}"), None),
        (Method::GET, "/admin/trips".into(), None),
        (Method::GET, format!("/admin/trips/{}", trip.trip_id), None),
        (
            Method::POST,
            format!("/admin/trips/{}/cancel", trip.trip_id),
            Some(json!({"reason": "test"})),
        ),
        (Method::GET, "/admin/cells?active=true".into(), None),
        (Method::GET, "/admin/pricing".into(), None),
        (Method::PUT, "/admin/pricing".into(), Some(changed)),
        (Method::GET, "/admin/actors".into(), None),
    ];
    // Unknown tokens, some of them close to the admin token: a prefix, an extension, one
    // character changed, another case.
    let unknown = [
        "tok_forged".to_owned(),
        ADMIN[..16].to_owned(),
        format!("{ADMIN}x"),
        format!("{}c", &ADMIN[..ADMIN.len() - 1]),
        ADMIN.to_uppercase(),
    ];
    for (m, path, body) in &routes {
        let (st, v) = s.request(m.clone(), path, None, body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (401, Some("unauthorized")),
            "{m} {path} without a token: {v}"
        );
        assert!(v["error"]["message"].is_string(), "{v}");
        for t in &unknown {
            let (st, v) = s.request(m.clone(), path, Some(t), body.clone()).await;
            assert_eq!(
                (st, code(&v)),
                (401, Some("unauthorized")),
                "{m} {path} with the unknown token {t:?}: {v}"
            );
        }
        for (who, t) in [("rider", &rtoken), ("driver", &dtoken)] {
            let (st, v) = s.request(m.clone(), path, Some(t), body.clone()).await;
            assert_eq!(
                (st, code(&v)),
                (403, Some("forbidden")),
                "{m} {path} with a {who}'s token: {v}"
            );
            assert!(v["error"]["message"].is_string(), "{v}");
        }
    }

    // Nothing a refused call asked for happened.
    assert_eq!(driver_status(&s, &idle).await, "offline");
    assert_eq!(aget(&s, "/admin/pricing").await, pricing);
    let t = aget(&s, &format!("/admin/trips/{}", trip.trip_id)).await;
    assert_eq!(
        (t["trip"]["state"].as_str(), t["trip"]["version"].as_u64()),
        (Some("dispatching"), Some(1)),
        "{t}"
    );
    // The rider was told nothing in between (the reply to this comes next).
    let m = r
        .reply_next(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": now_ms()}))
        .await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");

    // With the admin token every reading route answers.
    for (m, path, _) in routes.iter().filter(|(m, ..)| *m == Method::GET) {
        let (st, v) = s.request(m.clone(), path, Some(ADMIN), None).await;
        assert_eq!(st, 200, "{m} {path}: {v}");
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_routes_and_methods() {
    let s = server(&[]).await;
    let (did, _) = s.driver("Dana", "economy").await;
    let (rid, _) = s.rider("Riley").await;
    let reason = Some(json!({"reason": "test"}));
    let table: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/admin/drivers/drv_unknown".into(), None),
        (
            Method::POST,
            "/admin/drivers/drv_unknown/suspend".into(),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/admin/drivers/drv_unknown/unsuspend".into(),
            None,
        ),
        (Method::GET, "/admin/riders/rdr_unknown".into(), None),
        (Method::GET, "/admin/trips/trp_unknown".into(), None),
        (
            Method::POST,
            "/admin/trips/trp_unknown/cancel".into(),
            reason.clone(),
        ),
        // Ids of the other kind.
        (Method::GET, format!("/admin/drivers/{rid}"), None),
        (Method::GET, format!("/admin/riders/{did}"), None),
        (Method::GET, format!("/admin/trips/{did}"), None),
        (Method::POST, format!("/admin/trips/{rid}/cancel"), reason),
        // Unknown routes.
        (Method::GET, "/admin/nothing-here".into(), None),
        (Method::GET, "/admin/".into(), None),
    ];
    for (m, path, body) in table {
        refused(&s, m, &path, body, 404, "not_found").await;
    }
    // Known routes, wrong method: 405 with code bad_request.
    for (m, path) in [
        (Method::DELETE, "/admin/pricing".to_owned()),
        (Method::POST, "/admin/pricing".to_owned()),
        (Method::POST, "/admin/stats".to_owned()),
        (Method::GET, format!("/admin/drivers/{did}/suspend")),
        (Method::PUT, format!("/admin/drivers/{did}")),
    ] {
        refused(&s, m, &path, None, 405, "bad_request").await;
    }
    assert_eq!(driver_status(&s, &did).await, "offline");
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Stats and actors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_drivers_trips_offers_sessions_and_actors() {
    let s = server(&[]).await;
    let v = aget(&s, "/admin/stats").await;
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["ready"], true, "{v}");
    assert!(
        v["uptime_s"]
            .as_f64()
            .is_some_and(|u| (0.0..600.0).contains(&u)),
        "{v}"
    );
    assert_eq!(v["open_offers"], 0, "{v}");

    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (_, _far) = s.online_driver("Far", "economy", FAR.0, FAR.1).await;
    let (d3, _) = s.driver("Never", "premium").await;
    let (_, _, mut r1) = s.connected_rider("Riley").await;
    let (_, _, mut r2) = s.connected_rider("Robin").await;
    // One ride to its end, one cancelled, one waiting on an offer.
    let t1 = r1.request_ride(PICKUP, DROPOFF, "economy").await;
    assign(&mut d, &mut r1, &t1.trip_id).await;
    advance(&mut d, &mut r1, &t1.trip_id, &RIDE).await;
    let t2 = offered(&mut d, &mut r2).await;
    r2.ok(json!({"type": "cancel_ride", "trip_id": t2.trip_id}))
        .await;
    assert_eq!(d.offer_expired().await, t2.trip_id);
    offered(&mut d, &mut r2).await;

    let v = aget(&s, "/admin/stats").await;
    let count = |group: &str, key: &str| -> u64 {
        let g = &v[group];
        assert!(g.is_object(), "{group} of {v}");
        match g.get(key) {
            None => 0,
            Some(n) => n.as_u64().unwrap_or_else(|| panic!("{group}.{key} of {v}")),
        }
    };
    assert_eq!(count("drivers", "available"), 1, "{v}");
    assert_eq!(count("drivers", "offered"), 1, "{v}");
    assert_eq!(count("drivers", "offline"), 1, "{v}");
    assert_eq!(count("drivers", "on_trip"), 0, "{v}");
    assert_eq!(count("drivers", "suspended"), 0, "{v}");
    assert_eq!(count("trips", "dispatching"), 1, "{v}");
    for live in ["driver_assigned", "driver_arrived", "in_progress"] {
        assert_eq!(count("trips", live), 0, "{live}: {v}");
    }
    assert_eq!(count("trips_finished_since_start", "completed"), 1, "{v}");
    assert_eq!(count("trips_finished_since_start", "cancelled"), 1, "{v}");
    assert_eq!(
        count("trips_finished_since_start", "no_driver_found"),
        0,
        "{v}"
    );
    assert_eq!(v["open_offers"], 1, "{v}");
    assert_eq!(count("sessions", "driver"), 2, "{v}");
    assert_eq!(count("sessions", "rider"), 2, "{v}");
    assert!(count("actors", "driver") >= 2, "{v}");
    assert!(count("actors", "rider") >= 2, "{v}");
    assert!(count("actors", "trip") >= 1, "{v}");
    assert!(count("actors", "cell") >= 2, "{v}");
    assert_eq!(count("actors", "session"), 4, "{v}");

    // Suspending shows in the counts at once (durable before the reply).
    let (st, _) = apost(&s, &format!("/admin/drivers/{d3}/suspend"), json!({})).await;
    assert_eq!(st, 200);
    let v = aget(&s, "/admin/stats").await;
    assert_eq!(v["drivers"]["suspended"], 1, "{v}");
    assert_eq!(v["drivers"]["offline"].as_u64().unwrap_or(0), 0, "{v}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_report_every_group_after_a_ride() {
    let Scene {
        s, mut d, mut r, ..
    } = scene(&[]).await;
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assign(&mut d, &mut r, &t.trip_id).await;
    advance(&mut d, &mut r, &t.trip_id, &RIDE).await;

    let v = aget(&s, "/admin/actors").await;
    let groups = v["groups"].as_array().unwrap_or_else(|| panic!("{v}"));
    let names: BTreeSet<&str> = groups.iter().filter_map(|g| g["group"].as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["cell", "driver", "rider", "session", "trip"]),
        "{v}"
    );
    assert_eq!(groups.len(), 5, "{v}");
    let group = |v: &Value, name: &str| -> Value {
        v["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no group {name}: {v}"))
    };
    for g in groups {
        for k in [
            "alive", "started", "stopped", "restarts", "panics", "messages",
        ] {
            assert!(g[k].as_u64().is_some(), "{k} of {g}");
        }
        for k in ["handling_mean_ms", "handling_p99_ms"] {
            let ms = g[k].as_f64().unwrap_or_else(|| panic!("{k} of {g}"));
            assert!(ms.is_finite() && ms >= 0.0, "{k} of {g}");
        }
        assert!(g["alive"].as_u64() <= g["started"].as_u64(), "{g}");
        assert_eq!(
            (g["restarts"].as_u64(), g["panics"].as_u64()),
            (Some(0), Some(0)),
            "{g}"
        );
        if g["messages"].as_u64() > Some(0) {
            assert!(g["handling_p99_ms"].as_f64() > Some(0.0), "{g}");
        }
    }
    let session = group(&v, "session");
    assert_eq!(session["alive"], 2, "{session}");
    assert!(session["started"].as_u64() >= Some(2), "{session}");
    // The driver sent location, go_online, accept and three steps; the rider one request.
    assert!(session["messages"].as_u64() >= Some(7), "{session}");
    for name in ["driver", "rider", "trip", "cell"] {
        let g = group(&v, name);
        assert!(g["started"].as_u64() >= Some(1), "{g}");
        assert!(g["messages"].as_u64() >= Some(1), "{g}");
    }
    for name in ["driver", "rider", "cell"] {
        assert!(group(&v, name)["alive"].as_u64() >= Some(1), "{v}");
    }
    // Stats and actors agree on what is alive (nothing moves now).
    let stats = aget(&s, "/admin/stats").await;
    for name in ["driver", "rider", "trip", "cell", "session"] {
        assert_eq!(
            stats["actors"][name],
            group(&v, name)["alive"],
            "{name}: {stats} vs {v}"
        );
    }

    // A closed session is counted as stopped.
    let before = session["stopped"].as_u64().unwrap();
    r.close().await;
    eventually("the rider's session to stop", || async {
        let g = group(&aget(&s, "/admin/actors").await, "session");
        (g["alive"] == 1 && g["stopped"].as_u64() > Some(before)).then_some(())
    })
    .await;
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Drivers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_list_filters_by_status_product_and_cell() {
    let s = server(&[]).await;
    let at = north_of(PICKUP, 200.0);
    let (e1, mut e1c) = s.online_driver("Eve", "economy", at.0, at.1).await;
    let (x1, _x1c) = s.online_driver("Xavier", "xl", at.0, at.1).await;
    let (p1, _p1c) = s.online_driver("Pat", "premium", FAR.0, FAR.1).await;
    let (e2, _) = s.driver("Elle", "economy").await;
    e1c.ok(json!({"type": "location", "lat": at.0, "lng": at.1, "heading": 90.0, "ts": now_ms()}))
        .await;
    let all = sorted(vec![e1.clone(), x1.clone(), p1.clone(), e2.clone()]);

    let v = aget(&s, "/admin/drivers").await;
    let list = v["drivers"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        ids(list, "driver_id"),
        all,
        "every driver, in id order: {v}"
    );
    assert!(v["next_cursor"].is_null(), "{v}");
    let by_id = |id: &str| list.iter().find(|d| d["driver_id"] == id).unwrap().clone();
    let e = by_id(&e1);
    assert_eq!(e["name"], "Eve", "{e}");
    assert_eq!(
        e["vehicle"],
        json!({"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": "economy", "seats": 4}),
        "{e}"
    );
    assert_eq!(
        (e["status"].as_str(), e["connected"].as_bool()),
        (Some("available"), Some(true)),
        "{e}"
    );
    assert!(distance_m(latlng(&e["location"]), at) < 1.0, "{e}");
    assert_eq!(e["heading"].as_f64(), Some(90.0), "{e}");
    assert!(e["trip_id"].is_null(), "{e}");
    let cell = e["cell"]
        .as_str()
        .unwrap_or_else(|| panic!("{e}"))
        .to_owned();
    assert_eq!(
        h3_resolution(&cell),
        7,
        "the matching (default) resolution: {cell}"
    );
    let x = by_id(&x1);
    assert_eq!(
        x["cell"].as_str(),
        Some(cell.as_str()),
        "same place, same cell: {x}"
    );
    assert!(x["heading"].is_null(), "never sent: {x}");
    let p = by_id(&p1);
    assert_ne!(p["cell"].as_str(), Some(cell.as_str()), "{p}");
    let idle = by_id(&e2);
    assert_eq!(
        (
            idle["status"].as_str(),
            idle["connected"].as_bool(),
            idle["location"].is_null(),
            idle["cell"].is_null(),
            idle["trip_id"].is_null()
        ),
        (Some("offline"), Some(false), true, true, true),
        "{idle}"
    );
    assert_eq!(idle["vehicle"]["product"], "economy");

    let cases: Vec<(String, Vec<&String>)> = vec![
        ("status=available".into(), vec![&e1, &x1, &p1]),
        ("status=offline".into(), vec![&e2]),
        ("status=suspended".into(), vec![]),
        ("status=on_trip".into(), vec![]),
        ("product=xl".into(), vec![&x1]),
        ("product=economy".into(), vec![&e1, &e2]),
        ("status=available&product=economy".into(), vec![&e1]),
        ("status=offline&product=premium".into(), vec![]),
        (format!("cell={cell}"), vec![&e1, &x1]),
        (format!("cell={}", h3_parent(&cell, 5)), vec![&e1, &x1]),
        (format!("cell={}", h3_parent(&cell, 0)), vec![&e1, &x1, &p1]),
        (format!("cell={cell}&product=xl"), vec![&x1]),
        (format!("cell={cell}&status=offline"), vec![]),
    ];
    for (q, want) in cases {
        let got = list_ids(&s, &format!("/admin/drivers?{q}"), "drivers", "driver_id").await;
        let want = sorted(want.into_iter().cloned().collect());
        assert_eq!(got, want, "?{q}");
    }

    bad_queries(
        &s,
        "/admin/drivers",
        &[
            "status=flying",
            "status=",
            "status=AVAILABLE",
            "product=bike",
            "product=",
            "cell=nothere",
            "cell=0",
            "cell=zzzzzzzzzzzzzzz",
            "status=available&status=offline",
        ],
    )
    .await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_list_pages_in_id_order() {
    let s = server(&[]).await;
    let mut all = Vec::new();
    for i in 0..5 {
        all.push(s.driver(&format!("Driver {i}"), "economy").await.0);
    }
    let all = sorted(all);
    assert_eq!(
        list_ids(&s, "/admin/drivers", "drivers", "driver_id").await,
        all
    );
    assert_eq!(
        list_ids(&s, "/admin/drivers?limit=1000", "drivers", "driver_id").await,
        all
    );
    let (items, pages) = all_pages(&s, "/admin/drivers", "drivers", 2).await;
    assert_eq!((ids(&items, "driver_id"), pages), (all.clone(), 3));
    let (items, _) = all_pages(&s, "/admin/drivers", "drivers", 1).await;
    assert_eq!(ids(&items, "driver_id"), all);
    let (items, _) = all_pages(&s, "/admin/drivers?status=offline", "drivers", 4).await;
    assert_eq!(ids(&items, "driver_id"), all);

    // A list stays stable while paged: a driver registered between two pages does not
    // make any other appear twice or go missing.
    let first = aget(&s, "/admin/drivers?limit=2").await;
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_owned();
    let (late, _) = s.driver("Late", "xl").await;
    let mut seen = ids(first["drivers"].as_array().unwrap(), "driver_id");
    let (rest, _) = pages_from(&s, "/admin/drivers", "drivers", 2, Some(cursor.clone())).await;
    seen.extend(ids(&rest, "driver_id"));
    seen.retain(|id| *id != late);
    assert_eq!(seen, all);

    bad_queries(
        &s,
        "/admin/drivers",
        &[
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=ten",
            "limit=",
            "limit=1&limit=2",
            "cursor=not-a-cursor",
            "cursor=",
            "cursor=%00%01",
        ],
    )
    .await;
    a_changed_cursor_is_refused(&s, "/admin/drivers").await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_driver_shows_its_status_trip_and_position() {
    let s = server(&[]).await;
    let near = north_of(PICKUP, 300.0);
    let (did, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let v = aget(&s, &format!("/admin/drivers/{did}")).await;
    assert_eq!(v["driver_id"], did.as_str(), "{v}");
    assert_eq!(v["name"], "Dana", "{v}");
    assert_eq!(v["vehicle"]["plate"], "AB 123", "{v}");
    assert_eq!(
        (v["status"].as_str(), v["connected"].as_bool()),
        (Some("available"), Some(true)),
        "{v}"
    );
    assert!(distance_m(latlng(&v["location"]), near) < 1.0, "{v}");
    assert_eq!(h3_resolution(v["cell"].as_str().unwrap()), 7, "{v}");
    assert!(v["trip_id"].is_null() && v["heading"].is_null(), "{v}");
    // The same object as in the list.
    let list = aget(&s, "/admin/drivers").await;
    assert_eq!(list["drivers"][0], v);

    let (_, _, mut r) = s.connected_rider("Riley").await;
    let t = offered(&mut d, &mut r).await;
    let v = aget(&s, &format!("/admin/drivers/{did}")).await;
    assert_eq!(
        (v["status"].as_str(), v["trip_id"].as_str()),
        (Some("offered"), Some(t.trip_id.as_str())),
        "{v}"
    );
    d.ok(json!({"type": "accept", "trip_id": t.trip_id})).await;
    let v = aget(&s, &format!("/admin/drivers/{did}")).await;
    assert_eq!(
        (v["status"].as_str(), v["trip_id"].as_str()),
        (Some("on_trip"), Some(t.trip_id.as_str())),
        "{v}"
    );
    let moved = north_of(PICKUP, 50.0);
    d.ok(json!({"type": "location", "lat": moved.0, "lng": moved.1, "heading": 180.0, "ts": now_ms()}))
        .await;
    eventually("the new position", || async {
        let v = aget(&s, &format!("/admin/drivers/{did}")).await;
        (distance_m(latlng(&v["location"]), moved) < 1.0 && v["heading"].as_f64() == Some(180.0))
            .then_some(())
    })
    .await;
    advance(&mut d, &mut r, &t.trip_id, &RIDE).await;
    let v = aget(&s, &format!("/admin/drivers/{did}")).await;
    assert_eq!(
        (v["status"].as_str(), v["trip_id"].is_null()),
        (Some("available"), true),
        "{v}"
    );
    d.close().await;
    eventually("the driver to show disconnected", || async {
        let v = aget(&s, &format!("/admin/drivers/{did}")).await;
        (v["connected"] == false).then_some(())
    })
    .await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_driver_is_out_of_dispatch_until_unsuspended() {
    let Scene {
        s,
        did,
        mut d,
        rtoken,
        mut r,
        ..
    } = scene(&[
        // Longer than batched matching's default window (2 s): the last request's first
        // offer waits up to a window, and a deadline no longer than it would end the trip
        // first (dispatchd now refuses that combination at start).
        "--dispatch-deadline-ms",
        "5000",
    ])
    .await;
    let near = DANA;
    assert_eq!(nearby_count(&s, &rtoken, PICKUP).await, 1);

    // A mistyped reason is refused and suspends nobody.
    let path = format!("/admin/drivers/{did}/suspend");
    refused(
        &s,
        Method::POST,
        &path,
        Some(json!({"reason": 5})),
        400,
        "bad_request",
    )
    .await;
    assert_eq!(driver_status(&s, &did).await, "available");

    let (st, v) = apost(&s, &path, json!({"reason": "documents expired"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["driver_id"].as_str(), v["status"].as_str()),
        (Some(did.as_str()), Some("suspended")),
        "{v}"
    );
    assert!(v["trip_id"].is_null(), "{v}");
    // The open session is told with a new welcome.
    match d
        .next_where("a welcome", |m| matches!(m, ServerMessage::Welcome { .. }))
        .await
    {
        ServerMessage::Welcome {
            driver_id,
            status,
            offer,
            trip,
            ..
        } => {
            assert_eq!(driver_id.as_deref(), Some(did.as_str()));
            assert_eq!(status, Some(DriverStatus::Suspended));
            assert_eq!(offer, Some(None));
            assert_eq!(trip, None);
        }
        _ => unreachable!(),
    }
    assert_eq!(driver_status(&s, &did).await, "suspended");
    assert_eq!(
        list_ids(
            &s,
            "/admin/drivers?status=suspended",
            "drivers",
            "driver_id"
        )
        .await,
        vec![did.clone()]
    );
    assert_eq!(
        nearby_count(&s, &rtoken, PICKUP).await,
        0,
        "a suspended driver is not on the map"
    );
    // Idempotent.
    let (st, v) = s.request(Method::POST, &path, Some(ADMIN), None).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("suspended")), "{v}");

    // A ride requested next to it finds nobody, and it is offered nothing.
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let ended = r.trip_in(TripState::NoDriverFound).await;
    assert_eq!(ended.trip_id, t.trip_id);
    let m = d.reply_next(json!({"type": "go_online"})).await;
    assert!(
        matches!(&m, ServerMessage::Error { code, .. } if code == "forbidden"),
        "go_online while suspended: {m:?}"
    );
    assert_eq!(driver_status(&s, &did).await, "suspended");

    // Unsuspended: offline, told so, and back in business once online.
    let (st, v) = s
        .request(
            Method::POST,
            &format!("/admin/drivers/{did}/unsuspend"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("offline")), "{v}");
    match d
        .next_where("a welcome", |m| matches!(m, ServerMessage::Welcome { .. }))
        .await
    {
        ServerMessage::Welcome { status, .. } => assert_eq!(status, Some(DriverStatus::Offline)),
        _ => unreachable!(),
    }
    d.ok(json!({"type": "location", "lat": near.0, "lng": near.1, "ts": now_ms()}))
        .await;
    d.ok(json!({"type": "go_online"})).await;
    assert_eq!(driver_status(&s, &did).await, "available");
    assert_eq!(nearby_count(&s, &rtoken, PICKUP).await, 1);
    offered(&mut d, &mut r).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_with_an_offer_or_a_trip_cannot_be_suspended() {
    let Scene {
        s,
        did,
        mut d,
        mut r,
        ..
    } = scene(&[]).await;
    let t = offered(&mut d, &mut r).await;
    let suspend = format!("/admin/drivers/{did}/suspend");
    let unsuspend = format!("/admin/drivers/{did}/unsuspend");

    refused(&s, Method::POST, &suspend, Some(json!({})), 409, "conflict").await;
    assert_eq!(driver_status(&s, &did).await, "offered");
    // Unsuspending a driver that is not suspended changes nothing.
    let (st, v) = s.request(Method::POST, &unsuspend, Some(ADMIN), None).await;
    assert_eq!(
        (st, v["status"].as_str(), v["trip_id"].as_str()),
        (200, Some("offered"), Some(t.trip_id.as_str())),
        "{v}"
    );

    d.ok(json!({"type": "accept", "trip_id": t.trip_id})).await;
    r.trip_in(TripState::DriverAssigned).await;
    refused(&s, Method::POST, &suspend, None, 409, "conflict").await;
    advance(&mut d, &mut r, &t.trip_id, &["arrived", "start_trip"]).await;
    refused(
        &s,
        Method::POST,
        &suspend,
        Some(json!({"reason": "x"})),
        409,
        "conflict",
    )
    .await;
    assert_eq!(driver_status(&s, &did).await, "on_trip");
    // The trip went on untouched, and the driver was sent no welcome.
    let done = advance(&mut d, &mut r, &t.trip_id, &["complete_trip"]).await;
    assert_eq!(done.version, 5);
    assert!(
        !d.pending()
            .iter()
            .any(|m| matches!(m, ServerMessage::Welcome { .. })),
        "{:?}",
        d.pending()
    );
    // Free again, it can be suspended.
    let (st, v) = apost(&s, &suspend, json!({})).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("suspended")), "{v}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_and_pricing_survive_a_restart() {
    let s = server(&[]).await;
    let (did, dtoken) = s.driver("Dana", "economy").await;
    let (other, otoken) = s.driver("Olga", "economy").await;
    let (_, rtoken) = s.rider("Riley").await;
    let (st, v) = apost(
        &s,
        &format!("/admin/drivers/{did}/suspend"),
        json!({"reason": "r"}),
    )
    .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("suspended")), "{v}");
    let (st, _) = apost(&s, &format!("/admin/drivers/{other}/suspend"), json!({})).await;
    assert_eq!(st, 200);
    let (st, v) = s
        .request(
            Method::POST,
            &format!("/admin/drivers/{other}/unsuspend"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("offline")), "{v}");
    let mut pricing = aget(&s, "/admin/pricing").await;
    pricing["products"]["economy"]["minimum_cents"] = json!(4321);
    pricing["products"]["premium"]["per_km_cents"] = json!(777);
    let (st, v) = s.put("/admin/pricing", Some(ADMIN), pricing.clone()).await;
    assert_eq!(st, 200, "{v}");

    let s = s.restart(&flags(&[])).await;
    assert_eq!(driver_status(&s, &did).await, "suspended");
    assert_eq!(driver_status(&s, &other).await, "offline");
    assert_eq!(aget(&s, "/admin/pricing").await, pricing);
    let q = s
        .quote(&rtoken, PICKUP, north_of(PICKUP, 100.0), "economy")
        .await;
    assert_eq!(q["fare_cents"], 4321, "{q}");
    let mut d = Client::driver(&s, &dtoken).await.unwrap();
    match d.welcome().await {
        ServerMessage::Welcome { status, .. } => assert_eq!(status, Some(DriverStatus::Suspended)),
        _ => unreachable!(),
    }
    assert_eq!(d.err(json!({"type": "go_online"})).await, "forbidden");
    let mut o = Client::driver(&s, &otoken).await.unwrap();
    o.welcome().await;
    o.ok(json!({"type": "go_online"})).await;
    let v = aget(&s, "/admin/stats").await;
    assert_eq!(v["drivers"]["suspended"], 1, "{v}");

    // Unsuspending is as durable.
    let (st, _) = s
        .request(
            Method::POST,
            &format!("/admin/drivers/{did}/unsuspend"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(st, 200);
    d.close().await;
    o.close().await;
    let s = s.restart(&flags(&[])).await;
    assert_eq!(driver_status(&s, &did).await, "offline");
    let mut d = Client::driver(&s, &dtoken).await.unwrap();
    d.welcome().await;
    d.ok(json!({"type": "go_online"})).await;
    assert_eq!(driver_status(&s, &did).await, "available");
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Riders

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rider_shows_its_connection_position_and_trip() {
    let s = server(&[]).await;
    let (rid, rtoken) = s.rider("  Riley  ").await;
    let path = format!("/admin/riders/{rid}");
    let v = aget(&s, &path).await;
    assert_eq!(
        v,
        json!({"rider_id": rid, "name": "Riley", "phone": "+1 555 0100", "connected": false, "location": null, "trip": null})
    );
    let mut r = Client::rider(&s, &rtoken).await.unwrap();
    r.welcome().await;
    r.ok(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": now_ms()}))
        .await;
    let v = aget(&s, &path).await;
    assert_eq!(v["connected"], true, "{v}");
    assert!(v["trip"].is_null(), "{v}");
    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let t = offered(&mut d, &mut r).await;
    let v = aget(&s, &path).await;
    assert_eq!(v["trip"]["trip_id"], t.trip_id.as_str(), "{v}");
    assert_eq!(v["trip"]["state"], "dispatching", "{v}");
    assert_eq!(v["trip"]["rider_id"], rid.as_str(), "{v}");
    r.close().await;
    eventually("the rider to show disconnected", || async {
        (aget(&s, &path).await["connected"] == false).then_some(())
    })
    .await;

    // A ping is acknowledged and recorded (docs/api.md, "Riders and quotes"), so the
    // console shows where a rider is, with or without a trip.
    let (other, _, mut o) = s.connected_rider("Robin").await;
    let at = north_of(PICKUP, 400.0);
    o.ok(json!({"type": "location", "lat": at.0, "lng": at.1, "ts": now_ms()}))
        .await;
    let path = format!("/admin/riders/{other}");
    eventually("the rider's position", || async {
        let v = aget(&s, &path).await;
        (v["location"].is_object() && distance_m(latlng(&v["location"]), at) < 1.0).then_some(())
    })
    .await;
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Trips

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trip_list_filters_by_state_rider_and_driver_and_pages() {
    let s = server(&[]).await;
    let near = north_of(PICKUP, 200.0);
    let (d1, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (r1, r1token, mut rc1) = s.connected_rider("Riley").await;
    let (r2, r2token, mut rc2) = s.connected_rider("Robin").await;
    let (r3, r3token, mut rc3) = s.connected_rider("Rory").await;
    // t1 completed, t2 cancelled by its rider, t3 no driver found, t4 dispatching.
    let t1 = rc1.request_ride(PICKUP, DROPOFF, "economy").await.trip_id;
    assign(&mut d, &mut rc1, &t1).await;
    advance(&mut d, &mut rc1, &t1, &RIDE).await;
    let t2 = rc2.request_ride(PICKUP, DROPOFF, "economy").await.trip_id;
    assert_eq!(d.offer().await.trip_id, t2);
    rc2.ok(json!({"type": "cancel_ride", "trip_id": t2})).await;
    assert_eq!(d.offer_expired().await, t2);
    let t3 = rc3.request_ride(PICKUP, DROPOFF, "premium").await.trip_id;
    rc3.trip_in(TripState::NoDriverFound).await;
    let t4 = rc1.request_ride(PICKUP, DROPOFF, "economy").await.trip_id;
    assert_eq!(d.offer().await.trip_id, t4);

    let all = sorted(vec![t1.clone(), t2.clone(), t3.clone(), t4.clone()]);
    let v = aget(&s, "/admin/trips").await;
    let list = v["trips"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(ids(list, "trip_id"), all, "{v}");
    assert!(v["next_cursor"].is_null(), "{v}");
    // Each is the trip object of PROTOCOL.md, as its rider reads it.
    for (t, token) in [
        (&t1, &r1token),
        (&t2, &r2token),
        (&t3, &r3token),
        (&t4, &r1token),
    ] {
        let item = list.iter().find(|i| i["trip_id"] == t.as_str()).unwrap();
        let (st, own) = s.get(&format!("/v1/trips/{t}"), Some(token)).await;
        assert_eq!(st, 200, "{own}");
        assert_eq!(item, &own);
    }
    let one = list.iter().find(|i| i["trip_id"] == t1.as_str()).unwrap();
    assert_eq!(
        (
            one["state"].as_str(),
            one["version"].as_u64(),
            one["driver_id"].as_str(),
            one["rider_id"].as_str()
        ),
        (
            Some("completed"),
            Some(5),
            Some(d1.as_str()),
            Some(r1.as_str())
        ),
        "{one}"
    );
    assert_eq!(one["fare_cents"], one["quote"]["fare_cents"], "{one}");

    let cases: Vec<(String, Vec<&String>)> = vec![
        ("state=completed".into(), vec![&t1]),
        ("state=cancelled".into(), vec![&t2]),
        ("state=no_driver_found".into(), vec![&t3]),
        ("state=dispatching".into(), vec![&t4]),
        ("state=in_progress".into(), vec![]),
        ("state=driver_assigned".into(), vec![]),
        (format!("rider_id={r1}"), vec![&t1, &t4]),
        (format!("rider_id={r2}"), vec![&t2]),
        (format!("rider_id={r3}"), vec![&t3]),
        (format!("driver_id={d1}"), vec![&t1]),
        (format!("state=dispatching&rider_id={r1}"), vec![&t4]),
        (format!("state=completed&rider_id={r2}"), vec![]),
        (
            format!("state=completed&driver_id={d1}&rider_id={r1}"),
            vec![&t1],
        ),
    ];
    for (q, want) in cases {
        let got = list_ids(&s, &format!("/admin/trips?{q}"), "trips", "trip_id").await;
        assert_eq!(got, sorted(want.into_iter().cloned().collect()), "?{q}");
    }

    let (items, pages) = all_pages(&s, "/admin/trips", "trips", 1).await;
    assert_eq!(ids(&items, "trip_id"), all);
    assert!(pages >= 4, "{pages}");
    let (items, pages) = all_pages(&s, "/admin/trips", "trips", 3).await;
    assert_eq!((ids(&items, "trip_id"), pages), (all.clone(), 2));
    let (items, _) = all_pages(&s, &format!("/admin/trips?rider_id={r1}"), "trips", 1).await;
    assert_eq!(ids(&items, "trip_id"), sorted(vec![t1.clone(), t4.clone()]));

    bad_queries(
        &s,
        "/admin/trips",
        &[
            "state=flying",
            "state=",
            "state=Completed",
            "state=completed&state=cancelled",
            "limit=0",
            "limit=1001",
            "limit=x",
            "cursor=not-a-cursor",
            "cursor=",
        ],
    )
    .await;
    assert_eq!(
        aget(&s, "/admin/trips?limit=1000").await["trips"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    a_changed_cursor_is_refused(&s, "/admin/trips").await;
    s.stop().await.unwrap();
}

/// One history entry: (from, to, by, driver_id, version).
type Transition = (Value, String, String, Value, u64);

/// The transitions of `history` as (from, to, by, driver_id, version), after checking
/// that each entry is complete, versions rise by one and times do not go back.
fn transitions(v: &Value) -> Vec<Transition> {
    let history = v["history"].as_array().unwrap_or_else(|| panic!("{v}"));
    let created = rfc3339_ms(v["trip"]["created_at"].as_str().unwrap());
    let updated = rfc3339_ms(v["trip"]["updated_at"].as_str().unwrap());
    let mut out = Vec::new();
    let mut last_at = created;
    for h in history {
        for k in ["from", "to", "by", "driver_id", "at", "version"] {
            assert!(h.get(k).is_some(), "history entry without `{k}`: {h}");
        }
        let at = rfc3339_ms(h["at"].as_str().unwrap_or_else(|| panic!("{h}")));
        assert!(at >= last_at && at <= updated, "{v}");
        last_at = at;
        out.push((
            h["from"].clone(),
            h["to"].as_str().unwrap().to_owned(),
            h["by"].as_str().unwrap().to_owned(),
            h["driver_id"].clone(),
            h["version"].as_u64().unwrap(),
        ));
    }
    for w in out.windows(2) {
        assert_eq!(w[1].4, w[0].4 + 1, "versions rise by one: {v}");
        assert_eq!(
            w[1].0,
            json!(w[0].1),
            "each starts where the last ended: {v}"
        );
    }
    let now = (
        v["trip"]["state"].as_str().unwrap(),
        v["trip"]["version"].as_u64().unwrap(),
    );
    let last = out
        .last()
        .unwrap_or_else(|| panic!("an empty history: {v}"));
    assert_eq!(
        (last.1.as_str(), last.4),
        now,
        "the history ends where the trip is: {v}"
    );
    out
}

/// `history` after its first entry, which must be the request itself (`from` null, to
/// `dispatching`, by the rider, version 1).
fn after_request(mut t: Vec<Transition>) -> Vec<Transition> {
    assert!(!t.is_empty(), "the history starts with the request");
    let first = t.remove(0);
    assert_eq!(
        first,
        (
            Value::Null,
            "dispatching".into(),
            "rider".into(),
            Value::Null,
            1
        ),
        "the first entry is the request"
    );
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_has_the_history_of_a_full_ride() {
    let Scene {
        s,
        did,
        mut d,
        rtoken,
        mut r,
        ..
    } = scene(&[]).await;
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let path = format!("/admin/trips/{}", t.trip_id);
    let v = aget(&s, &path).await;
    assert_eq!(v["trip"]["state"], "dispatching");
    assert!(after_request(transitions(&v)).is_empty(), "{v}");

    assign(&mut d, &mut r, &t.trip_id).await;
    let done = advance(&mut d, &mut r, &t.trip_id, &RIDE).await;
    let v = aget(&s, &path).await;
    let (st, own) = s
        .get(&format!("/v1/trips/{}", t.trip_id), Some(&rtoken))
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["trip"], own, "the trip object of PROTOCOL.md");
    assert_eq!(v["trip"]["version"], done.version);
    let dj = json!(did);
    let want: Vec<Transition> = [
        ("dispatching", "driver_assigned", 2),
        ("driver_assigned", "driver_arrived", 3),
        ("driver_arrived", "in_progress", 4),
        ("in_progress", "completed", 5),
    ]
    .into_iter()
    .map(|(f, to, ver)| {
        (
            json!(f),
            to.to_owned(),
            "driver".to_owned(),
            dj.clone(),
            ver,
        )
    })
    .collect();
    assert_eq!(after_request(transitions(&v)), want, "{v}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_names_who_moved_the_trip() {
    let s = server(&["--offer-timeout-ms", "1000"]).await;
    let near = north_of(PICKUP, 200.0);
    let (d1, mut a) = s.online_driver("Ann", "economy", near.0, near.1).await;
    let farther = north_of(PICKUP, 900.0);
    let (_, mut b) = s
        .online_driver("Ben", "economy", farther.0, farther.1)
        .await;
    let (_, _, mut r) = s.connected_rider("Riley").await;

    // Ann takes it and gives it back; Ben lets the offer run out; nobody is left.
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assign(&mut a, &mut r, &t.trip_id).await;
    a.ok(json!({"type": "cancel_trip", "trip_id": t.trip_id, "reason": "flat tyre"}))
        .await;
    assert_eq!(b.offer().await.trip_id, t.trip_id);
    assert_eq!(b.offer_expired().await, t.trip_id);
    let ended = r.trip_in(TripState::NoDriverFound).await;
    let v = aget(&s, &format!("/admin/trips/{}", t.trip_id)).await;
    assert_eq!(v["trip"]["version"], ended.version);
    let got: Vec<_> = after_request(transitions(&v))
        .into_iter()
        .map(|(f, to, by, driver, _)| (f, to, by, driver))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                json!("dispatching"),
                "driver_assigned".into(),
                "driver".into(),
                json!(d1)
            ),
            (
                json!("driver_assigned"),
                "dispatching".into(),
                "driver".into(),
                json!(d1)
            ),
            (
                json!("dispatching"),
                "no_driver_found".into(),
                "system".into(),
                Value::Null
            ),
        ],
        "{v}"
    );

    // A rider's cancel.
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    r.ok(json!({"type": "cancel_ride", "trip_id": t.trip_id}))
        .await;
    let v = aget(&s, &format!("/admin/trips/{}", t.trip_id)).await;
    let got = after_request(transitions(&v));
    assert_eq!(
        got.last()
            .map(|l| (l.1.as_str(), l.2.as_str(), l.3.is_null())),
        Some(("cancelled", "rider", true)),
        "{v}"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cancels_a_trip_in_progress() {
    let Scene {
        s,
        did,
        mut d,
        rid,
        rtoken,
        mut r,
        ..
    } = scene(&[]).await;
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assign(&mut d, &mut r, &t.trip_id).await;
    advance(&mut d, &mut r, &t.trip_id, &["arrived", "start_trip"]).await;
    let path = format!("/admin/trips/{}/cancel", t.trip_id);

    // A reason is required, 1 to 500 characters.
    let long = "x".repeat(501);
    for body in [
        None,
        Some(json!({})),
        Some(json!({"reason": ""})),
        Some(json!({"reason": null})),
        Some(json!({"reason": 7})),
        Some(json!({"reason": long})),
    ] {
        let v = refused(&s, Method::POST, &path, body.clone(), 400, "bad_request").await;
        assert!(!v.to_string().contains(&long), "{body:?}");
    }
    let v = aget(&s, &format!("/admin/trips/{}", t.trip_id)).await;
    assert_eq!(
        (v["trip"]["state"].as_str(), v["trip"]["version"].as_u64()),
        (Some("in_progress"), Some(4)),
        "{v}"
    );

    let reason = "y".repeat(500);
    let (st, v) = apost(&s, &path, json!({"reason": reason})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (
            v["trip_id"].as_str(),
            v["state"].as_str(),
            v["version"].as_u64(),
            v["cancelled_by"].as_str(),
            v["cancel_reason"].as_str()
        ),
        (
            Some(t.trip_id.as_str()),
            Some("cancelled"),
            Some(5),
            Some("admin"),
            Some(reason.as_str())
        ),
        "{v}"
    );
    assert_eq!(
        (v["rider_id"].as_str(), v["driver_id"].as_str()),
        (Some(rid.as_str()), Some(did.as_str())),
        "{v}"
    );
    assert!(
        v["fare_cents"].is_null(),
        "a cancelled trip has no fare: {v}"
    );
    // Both sessions are told.
    for (who, c) in [("rider", &mut r), ("driver", &mut d)] {
        let u = c.trip_in(TripState::Cancelled).await;
        assert_eq!(
            (
                u.trip_id.as_str(),
                u.version,
                u.cancelled_by,
                u.cancel_reason.as_deref()
            ),
            (
                t.trip_id.as_str(),
                5,
                Some(CancelledBy::Admin),
                Some(reason.as_str())
            ),
            "{who}"
        );
    }
    // The same to every reader.
    let (st, own) = s
        .get(&format!("/v1/trips/{}", t.trip_id), Some(&rtoken))
        .await;
    assert_eq!((st, &own), (200, &v));
    let h = aget(&s, &format!("/admin/trips/{}", t.trip_id)).await;
    assert_eq!(h["trip"], v);
    let last = transitions(&h).pop().unwrap();
    assert_eq!(
        (last.0, last.1.as_str(), last.2.as_str(), last.3, last.4),
        (json!("in_progress"), "cancelled", "admin", Value::Null, 5),
        "{h}"
    );
    // Once is enough.
    refused(
        &s,
        Method::POST,
        &path,
        Some(json!({"reason": "again"})),
        409,
        "conflict",
    )
    .await;
    // Both are free: the driver for offers, the rider for another ride.
    eventually("the driver to be free", || async {
        let v = aget(&s, &format!("/admin/drivers/{did}")).await;
        (v["status"] == "available" && v["trip_id"].is_null()).then_some(())
    })
    .await;
    let t2 = offered(&mut d, &mut r).await;
    let rider = aget(&s, &format!("/admin/riders/{rid}")).await;
    assert_eq!(rider["trip"]["trip_id"], t2.trip_id.as_str(), "{rider}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cancels_while_dispatching_and_cannot_cancel_a_finished_trip() {
    let Scene {
        s,
        did,
        mut d,
        mut r,
        ..
    } = scene(&[]).await;
    let t = offered(&mut d, &mut r).await;
    let (st, v) = apost(
        &s,
        &format!("/admin/trips/{}/cancel", t.trip_id),
        json!({"reason": "test ride"}),
    )
    .await;
    assert_eq!(
        (
            st,
            v["state"].as_str(),
            v["version"].as_u64(),
            v["cancelled_by"].as_str()
        ),
        (200, Some("cancelled"), Some(2), Some("admin")),
        "{v}"
    );
    let u = r.trip_in(TripState::Cancelled).await;
    assert_eq!((u.version, u.cancelled_by), (2, Some(CancelledBy::Admin)));
    // The offered driver was never assigned: its offer is withdrawn.
    assert_eq!(d.offer_expired().await, t.trip_id);
    assert_eq!(
        d.err(json!({"type": "accept", "trip_id": t.trip_id})).await,
        "conflict"
    );
    assert_eq!(driver_status(&s, &did).await, "available");

    // A completed trip is final.
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assign(&mut d, &mut r, &t.trip_id).await;
    advance(&mut d, &mut r, &t.trip_id, &RIDE).await;
    refused(
        &s,
        Method::POST,
        &format!("/admin/trips/{}/cancel", t.trip_id),
        Some(json!({"reason": "late"})),
        409,
        "conflict",
    )
    .await;
    let v = aget(&s, &format!("/admin/trips/{}", t.trip_id)).await;
    assert_eq!(
        (
            v["trip"]["state"].as_str(),
            v["trip"]["cancelled_by"].is_null()
        ),
        (Some("completed"), true),
        "{v}"
    );
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Cells

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_count_drivers_and_open_requests() {
    let s = server(&[]).await;
    let near = north_of(PICKUP, 200.0);
    let (d1, _d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (d2, mut far) = s.online_driver("Far", "economy", FAR.0, FAR.1).await;
    far.ok(json!({"type": "go_offline"})).await;
    let c1 = aget(&s, &format!("/admin/drivers/{d1}")).await["cell"]
        .as_str()
        .unwrap()
        .to_owned();
    let c2 = aget(&s, &format!("/admin/drivers/{d2}")).await["cell"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(c1, c2);

    let v = aget(&s, "/admin/cells?active=true").await;
    assert!(v["next_cursor"].is_null(), "{v}");
    let cells = v["cells"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(cells.len(), 1, "only the cell with a driver: {v}");
    let c = &cells[0];
    assert_eq!(c["cell"], c1.as_str(), "{c}");
    assert_eq!(c["resolution"], 7, "{c}");
    assert_eq!(
        (
            c["available_drivers"].as_u64(),
            c["busy_drivers"].as_u64(),
            c["open_requests"].as_u64(),
            c["surge"].as_f64()
        ),
        (Some(1), Some(0), Some(0), Some(1.0)),
        "{c}"
    );
    // A resolution-7 cell's edge is about 1.2 km.
    let center = latlng(&c["center"]);
    assert!(distance_m(center, near) < 1_500.0, "{c}");

    // Every cell that held a driver, in H3 index order, the inactive one included.
    let all = aget(&s, "/admin/cells").await;
    let listed = ids(all["cells"].as_array().unwrap(), "cell");
    assert!(listed.contains(&c1) && listed.contains(&c2), "{all}");
    let order: Vec<u64> = listed.iter().map(|c| h3_index(c)).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{all}");
    let inactive = all["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cell"] == c2.as_str())
        .unwrap();
    assert_eq!(
        (
            inactive["available_drivers"].as_u64(),
            inactive["busy_drivers"].as_u64()
        ),
        (Some(0), Some(0)),
        "{inactive}"
    );
    let (items, _) = all_pages(&s, "/admin/cells", "cells", 1).await;
    assert_eq!(ids(&items, "cell"), listed);
    assert!(
        !list_ids(&s, "/admin/cells?active=false", "cells", "cell")
            .await
            .is_empty()
    );

    // A request: the driver is busy and the pickup's cell has an open request.
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let v = eventually("the open request to show", || async {
        let v = aget(&s, "/admin/cells?active=true").await;
        let sum = |k: &str| -> u64 {
            v["cells"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c[k].as_u64())
                .sum()
        };
        (sum("open_requests") == 1 && sum("busy_drivers") == 1 && sum("available_drivers") == 0)
            .then_some(v)
    })
    .await;
    let cells = v["cells"].as_array().unwrap();
    let busy = cells.iter().find(|c| c["busy_drivers"] == 1).unwrap();
    assert_eq!(busy["cell"], c1.as_str(), "{v}");
    let open = cells.iter().find(|c| c["open_requests"] == 1).unwrap();
    assert!(distance_m(latlng(&open["center"]), PICKUP) < 1_500.0, "{v}");
    assert!(cells.iter().all(|c| c["cell"] != c2.as_str()), "{v}");
    // Cancelled, it is open no more.
    r.ok(json!({"type": "cancel_ride", "trip_id": t.trip_id}))
        .await;
    eventually("the request to close", || async {
        let v = aget(&s, "/admin/cells?active=true").await;
        let cells = v["cells"].as_array().unwrap().clone();
        let ok = cells.len() == 1
            && cells[0]["open_requests"] == 0
            && cells[0]["available_drivers"] == 1;
        ok.then_some(())
    })
    .await;

    bad_queries(
        &s,
        "/admin/cells",
        &[
            "active=yes",
            "active=1",
            "active=",
            "active=TRUE",
            "limit=0",
            "limit=1001",
            "cursor=garbage",
            "active=true&active=false",
        ],
    )
    .await;
    a_changed_cursor_is_refused(&s, "/admin/cells").await;
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Pricing

/// `base` changed by `f`.
fn with(base: &Value, f: impl FnOnce(&mut Value)) -> Value {
    let mut v = base.clone();
    f(&mut v);
    v
}

/// The fare for `distance_m` and `duration_s` by the `product` rates of `pricing`.
fn fare(pricing: &Value, product: &str, distance_m: f64, duration_s: f64) -> i64 {
    let r = &pricing["products"][product];
    let c = |k: &str| r[k].as_i64().unwrap_or_else(|| panic!("{k} of {r}")) as f64;
    let raw = c("base_cents")
        + distance_m / 1000.0 * c("per_km_cents")
        + duration_s / 60.0 * c("per_minute_cents");
    (raw.round() as i64).max(c("minimum_cents") as i64) + c("booking_fee_cents") as i64
}

fn assert_priced(pricing: &Value, q: &Value) {
    let want = fare(
        pricing,
        q["product"].as_str().unwrap(),
        q["distance_m"].as_f64().unwrap(),
        q["duration_s"].as_f64().unwrap(),
    );
    let got = q["fare_cents"].as_i64().unwrap();
    // The quote's distance and duration are rounded: allow a few cents.
    assert!(
        (got - want).abs() <= 3,
        "quote {q} is not priced by {pricing} (want ~{want})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pricing_change_prices_new_quotes_and_old_quotes_keep_their_price() {
    let s = server(&[]).await;
    let (_, rtoken, mut r) = s.connected_rider("Riley").await;
    let pricing = aget(&s, "/admin/pricing").await;
    assert_eq!(pricing["currency"], "USD", "{pricing}");
    let products = pricing["products"]
        .as_object()
        .unwrap_or_else(|| panic!("{pricing}"));
    assert_eq!(
        products.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["economy", "premium", "xl"]),
        "{pricing}"
    );
    for (p, rate) in products {
        for k in [
            "base_cents",
            "per_km_cents",
            "per_minute_cents",
            "minimum_cents",
            "booking_fee_cents",
            "cancellation_fee_cents",
        ] {
            assert!(
                rate[k].as_i64().is_some_and(|n| n >= 0),
                "{p}.{k}: {pricing}"
            );
        }
    }
    // Quotes are priced by these rates.
    let short = north_of(PICKUP, 100.0);
    let old_short = s.quote(&rtoken, PICKUP, short, "economy").await;
    assert_eq!(
        old_short["fare_cents"], pricing["products"]["economy"]["minimum_cents"],
        "{old_short}"
    );
    for product in ["economy", "xl", "premium"] {
        assert_priced(&pricing, &s.quote(&rtoken, PICKUP, DROPOFF, product).await);
    }

    let mut new = pricing.clone();
    new["products"]["economy"]["minimum_cents"] = json!(5000);
    new["products"]["xl"] = json!({"base_cents": 1000, "per_km_cents": 500, "per_minute_cents": 0, "minimum_cents": 0, "booking_fee_cents": 0, "cancellation_fee_cents": 0});
    let (st, v) = s.put("/admin/pricing", Some(ADMIN), new.clone()).await;
    assert_eq!((st, &v), (200, &new));
    assert_eq!(aget(&s, "/admin/pricing").await, new);

    let q = s.quote(&rtoken, PICKUP, short, "economy").await;
    assert_eq!(q["fare_cents"], 5000, "exactly the new minimum: {q}");
    for product in ["economy", "xl", "premium"] {
        assert_priced(&new, &s.quote(&rtoken, PICKUP, DROPOFF, product).await);
    }
    // A ride priced at the request is priced the new way too (with no driver online it
    // ends at once).
    let t = r.request_ride(PICKUP, short, "economy").await;
    assert_eq!(t.quote.fare_cents, 5000, "{t:?}");
    r.trip_in(TripState::NoDriverFound).await;

    // The quote made before keeps its price, to the end of the ride.
    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let m = r
        .request(json!({"type": "request_ride", "quote_id": old_short["quote_id"]}))
        .await;
    let t = trip_of(m);
    assert_eq!(json!(t.quote.fare_cents), old_short["fare_cents"], "{t:?}");
    assign(&mut d, &mut r, &t.trip_id).await;
    let done = advance(&mut d, &mut r, &t.trip_id, &RIDE).await;
    assert_eq!(json!(done.fare_cents), old_short["fare_cents"], "{done:?}");
    match r
        .next_where("receipt", |m| matches!(m, ServerMessage::Receipt { .. }))
        .await
    {
        ServerMessage::Receipt { fare_cents, .. } => {
            assert_eq!(json!(fare_cents), old_short["fare_cents"])
        }
        _ => unreachable!(),
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pricing_change_changes_nothing() {
    let s = server(&[]).await;
    let (_, rtoken) = s.rider("Riley").await;
    let before = aget(&s, "/admin/pricing").await;
    let quote_before = s.quote(&rtoken, PICKUP, DROPOFF, "economy").await["fare_cents"].clone();

    let zero_rates = json!({"base_cents": 0, "per_km_cents": 0, "per_minute_cents": 0, "minimum_cents": 500, "booking_fee_cents": 0, "cancellation_fee_cents": 0});
    // (what, body, a word the message must hold: the field).
    let cases: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "negative",
            with(&before, |v| {
                v["products"]["economy"]["base_cents"] = json!(-1)
            }),
            Some("base_cents"),
        ),
        (
            "per km over 100,000",
            with(&before, |v| {
                v["products"]["economy"]["per_km_cents"] = json!(100_001)
            }),
            Some("per_km_cents"),
        ),
        (
            "minimum over 1,000,000",
            with(&before, |v| {
                v["products"]["premium"]["minimum_cents"] = json!(1_000_001)
            }),
            Some("minimum_cents"),
        ),
        (
            "absurd",
            with(&before, |v| {
                v["products"]["xl"]["per_minute_cents"] = json!(1_000_000_000_000_i64)
            }),
            Some("per_minute_cents"),
        ),
        (
            "absurdly negative",
            with(&before, |v| {
                v["products"]["xl"]["base_cents"] = json!(i64::MIN)
            }),
            Some("base_cents"),
        ),
        (
            "beyond i64",
            with(&before, |v| {
                v["products"]["xl"]["base_cents"] = json!(u64::MAX)
            }),
            Some("base_cents"),
        ),
        (
            "fractional",
            with(&before, |v| {
                v["products"]["economy"]["base_cents"] = json!(2.5)
            }),
            Some("base_cents"),
        ),
        (
            "a string",
            with(&before, |v| {
                v["products"]["economy"]["base_cents"] = json!("250")
            }),
            Some("base_cents"),
        ),
        (
            "null",
            with(&before, |v| {
                v["products"]["economy"]["per_km_cents"] = Value::Null
            }),
            Some("per_km_cents"),
        ),
        (
            "a missing product",
            with(&before, |v| {
                v["products"].as_object_mut().unwrap().remove("premium");
            }),
            Some("premium"),
        ),
        (
            "a null product",
            with(&before, |v| v["products"]["xl"] = Value::Null),
            Some("xl"),
        ),
        (
            "a missing field",
            with(&before, |v| {
                v["products"]["xl"]
                    .as_object_mut()
                    .unwrap()
                    .remove("minimum_cents");
            }),
            Some("minimum_cents"),
        ),
        (
            "all-zero rates",
            with(&before, |v| v["products"]["economy"] = zero_rates.clone()),
            Some("economy"),
        ),
        (
            "another currency",
            with(&before, |v| v["currency"] = json!("EUR")),
            Some("currency"),
        ),
        (
            "a lower-case currency",
            with(&before, |v| v["currency"] = json!("usd")),
            Some("currency"),
        ),
        (
            "no currency",
            with(&before, |v| {
                v.as_object_mut().unwrap().remove("currency");
            }),
            Some("currency"),
        ),
        (
            "no products",
            with(&before, |v| {
                v.as_object_mut().unwrap().remove("products");
            }),
            Some("products"),
        ),
        (
            "products a list",
            with(&before, |v| v["products"] = json!([])),
            Some("products"),
        ),
        ("not an object", json!([1, 2, 3]), None),
        ("empty object", json!({}), None),
    ];
    // Every case is tried before failing, so one run shows every disagreement.
    let mut wrong = Vec::new();
    for (what, body, field) in &cases {
        let (st, v) = s
            .request(
                Method::PUT,
                "/admin/pricing",
                Some(ADMIN),
                Some(body.clone()),
            )
            .await;
        let msg = v["error"]["message"].as_str().unwrap_or("");
        if (st, code(&v)) != (400, Some("bad_request")) {
            wrong.push(format!("{what}: answered {st} {v}"));
        } else if let Some(f) = field
            && !msg.contains(f)
        {
            wrong.push(format!("{what}: the message does not name `{f}`: {msg}"));
        }
        if aget(&s, "/admin/pricing").await != before {
            wrong.push(format!("{what}: changed the pricing"));
            let (st, _) = s.put("/admin/pricing", Some(ADMIN), before.clone()).await;
            assert_eq!(st, 200);
        }
    }
    // Not JSON at all, or no body.
    for body in ["{", "", "null"] {
        let (st, _, text) = s
            .raw(
                Method::PUT,
                "/admin/pricing",
                Some(ADMIN),
                Some(body.to_owned()),
            )
            .await;
        assert_eq!(st, 400, "{body:?}: {text}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("a JSON error body: {text}"));
        assert_eq!(code(&v), Some("bad_request"), "{text}");
    }
    assert_eq!(aget(&s, "/admin/pricing").await, before);
    let q = s.quote(&rtoken, PICKUP, DROPOFF, "economy").await;
    assert_eq!(q["fare_cents"], quote_before, "{q}");

    // The limits themselves are accepted, and so are two zero rates of three.
    let edge = with(&before, |v| {
        v["products"]["economy"] = json!({"base_cents": 100_000, "per_km_cents": 100_000, "per_minute_cents": 100_000, "minimum_cents": 1_000_000, "booking_fee_cents": 100_000, "cancellation_fee_cents": 100_000});
        v["products"]["xl"] = json!({"base_cents": 0, "per_km_cents": 0, "per_minute_cents": 1, "minimum_cents": 0, "booking_fee_cents": 0, "cancellation_fee_cents": 0});
    });
    let (st, v) = s.put("/admin/pricing", Some(ADMIN), edge.clone()).await;
    assert_eq!((st, &v), (200, &edge));
    let (st, v) = s.put("/admin/pricing", Some(ADMIN), before.clone()).await;
    assert_eq!((st, &v), (200, &before));
    let q = s.quote(&rtoken, PICKUP, DROPOFF, "economy").await;
    assert_eq!(q["fare_cents"], quote_before, "{q}");
    assert!(wrong.is_empty(), "refused PUTs:\n{}", wrong.join("\n"));
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// The generated admin token, against the real binary

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_one_is_generated_kept_private_reused_and_never_logged() {
    // The harness removes DISPATCH_ADMIN_TOKEN from the child's environment.
    let d = Dispatchd::start("generated-token", &[]).await;
    let file = d.data_dir().join("admin.token");
    assert!(file.exists(), "{} was not written", file.display());
    assert_eq!(mode(&file), 0o600, "admin.token must be private");
    let text = std::fs::read_to_string(&file).unwrap();
    let token = text.trim().to_owned();
    // 256 random bits, base64url: at least 43 characters (a prefix may name the kind).
    assert!(
        token.len() >= 43
            && token
                .trim_end_matches('=')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "not 256 bits of base64url: {token:?}"
    );
    let (st, v) = d.get("/admin/stats", Some(&token)).await;
    assert_eq!((st, v["ready"].as_bool()), (200, Some(true)), "{v}");
    let (_, rider) = d.rider("Riley").await;
    let (st, _) = d.get("/admin/stats", Some(&rider)).await;
    assert_eq!(st, 403);
    let (st, _) = d.get("/admin/stats", Some("x".repeat(43).as_str())).await;
    assert_eq!(st, 401);
    let again = d.again();
    let log = d.stop().await;
    assert!(
        log.contains("admin.token"),
        "the log names the file:\n{log}"
    );
    assert!(
        !log.contains(&token),
        "the log shows the admin token:\n{log}"
    );

    // The next start reads it back.
    let d = again.start().await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text,
        "the file was rewritten"
    );
    assert_eq!(mode(&file), 0o600);
    let (st, v) = d.get("/admin/pricing", Some(&token)).await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = d.get("/admin/stats", Some(&rider)).await;
    assert_eq!(st, 403, "the rider's token survived too");
    let log = d.stop().await;
    assert!(
        !log.contains(&token),
        "the log shows the admin token:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_file_that_is_shared_or_empty_stops_startup() {
    for (what, content, perm) in [
        (
            "readable by the group",
            "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2U",
            0o640,
        ),
        (
            "readable by all",
            "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2U",
            0o604,
        ),
        ("empty", "", 0o600),
    ] {
        let data = tempfile::tempdir().unwrap();
        let file = data.path().join("admin.token");
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(perm)).unwrap();
        let mut d = Dispatchd::builder(&format!("token-{perm:o}"))
            .data_dir(data.path())
            .spawn();
        let st = d.exited_within(dispatch_tests::SLOW).await;
        let log = d.log_text();
        assert!(!st.success(), "{what}: dispatchd started anyway:\n{log}");
        assert!(
            log.contains("admin.token"),
            "{what}: the error should name the file:\n{log}"
        );
        if !content.is_empty() {
            assert!(
                !log.contains(content),
                "{what}: the log shows the token:\n{log}"
            );
        }
        // Left as it was.
        assert_eq!(std::fs::read_to_string(&file).unwrap(), content, "{what}");
        assert_eq!(mode(&file), perm, "{what}");
    }
}
