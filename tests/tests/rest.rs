//! The REST side: who may read a trip, the nearby-drivers map (never an id), registration
//! validation, and the operational endpoints.

use dispatch_tests::{RidePlan, TestServer, north_of, now_ms, rfc3339_ms};
use dispatch_transport::wire::TripState;
use reqwest::Method;
use serde_json::{Value, json};

const PICKUP: (f64, f64) = (45.5030, -73.5690);
const DROPOFF: (f64, f64) = (45.5200, -73.5800);

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_is_readable_by_its_rider_and_its_driver_only() {
    let s = TestServer::start(&[]).await;
    let (did, dtoken, mut d) = RidePlan::default().online_driver(&s).await;
    let (_, otoken) = s.driver("Other", "economy").await;
    let (rid, rtoken, mut r) = s.connected_rider("Riley").await;
    let (_, stranger) = s.rider("Stranger").await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    d.offer().await;
    let path = format!("/v1/trips/{}", trip.trip_id);
    // Only offered, the driver is not yet the trip's driver.
    let (st, v) = s.get(&path, Some(&dtoken)).await;
    assert_eq!(
        (st, code(&v)),
        (403, Some("forbidden")),
        "an offered driver"
    );
    d.ok(json!({"type": "accept", "trip_id": trip.trip_id}))
        .await;
    assert_eq!(r.trip_in(TripState::DriverAssigned).await.version, 2);

    for token in [&rtoken, &dtoken] {
        let (st, v) = s.get(&path, Some(token)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["trip_id"], trip.trip_id.as_str());
        assert_eq!(v["state"], "driver_assigned");
        assert_eq!(v["version"], 2);
        assert_eq!(v["rider_id"], rid.as_str());
        assert_eq!(v["driver_id"], did.as_str());
        assert_eq!(v["driver"]["name"], "Dana");
        assert_eq!(v["quote"]["currency"], "USD");
        // RFC 3339 UTC with milliseconds.
        let created = v["created_at"].as_str().unwrap();
        let updated = v["updated_at"].as_str().unwrap();
        for ts in [created, updated] {
            assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
        }
        assert!(rfc3339_ms(created) <= rfc3339_ms(updated));
        assert!(rfc3339_ms(created).abs_diff(now_ms()) < 60_000, "{created}");
        for key in [
            "product",
            "pickup",
            "dropoff",
            "pickup_eta_s",
            "fare_cents",
            "cancelled_by",
            "cancel_reason",
            "created_at",
            "updated_at",
        ] {
            assert!(v.get(key).is_some(), "trip object lacks `{key}`: {v}");
        }
    }
    let readers = [
        (&rtoken, 200),
        (&dtoken, 200),
        (&stranger, 403),
        (&otoken, 403),
    ];
    for (token, want) in readers {
        let (st, v) = s.get(&path, Some(token)).await;
        assert_eq!(st, want, "{v}");
    }
    // The same once the trip is over.
    for cmd in ["arrived", "start_trip", "complete_trip"] {
        d.ok(json!({"type": cmd, "trip_id": trip.trip_id})).await;
    }
    assert_eq!(r.trip_in(TripState::Completed).await.version, 5);
    for (token, want) in readers {
        let (st, v) = s.get(&path, Some(token)).await;
        assert_eq!(st, want, "{v}");
        if want == 200 {
            assert_eq!(
                (v["state"].as_str(), v["version"].as_u64()),
                (Some("completed"), Some(5))
            );
            assert_eq!(v["driver_id"], did.as_str());
        }
    }
    let (st, v) = s.get(&path, Some(&stranger)).await;
    assert_eq!((st, code(&v)), (403, Some("forbidden")), "another rider");
    let (st, v) = s.get(&path, Some(&otoken)).await;
    assert_eq!(
        (st, code(&v)),
        (403, Some("forbidden")),
        "an unrelated driver"
    );
    let (st, v) = s.get("/v1/trips/trp_unknown", Some(&rtoken)).await;
    assert_eq!((st, code(&v)), (404, Some("not_found")));
    let (st, v) = s.get(&path, None).await;
    assert_eq!((st, code(&v)), (401, Some("unauthorized")));
    let (st, v) = s.get(&path, Some("tok_forged")).await;
    assert_eq!((st, code(&v)), (401, Some("unauthorized")));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearby_lists_available_drivers_by_distance_without_ids() {
    let s = TestServer::start(&[]).await;
    let c = (45.5000, -73.5600);
    let mut ids = Vec::new();
    let mut sessions = Vec::new();
    for (name, product, m) in [
        ("E100", "economy", 100.0),
        ("E500", "economy", 500.0),
        ("E1500", "economy", 1_500.0),
        ("X300", "xl", -300.0),
        ("E3000", "economy", 3_000.0), // outside the default 2 km
    ] {
        let at = north_of(c, m);
        let (id, d) = s.online_driver(name, product, at.0, at.1).await;
        ids.push(id);
        sessions.push(d);
    }
    // One with a heading; one that went offline (not shown).
    let at = north_of(c, 100.0);
    sessions[0]
        .ok(json!({"type": "location", "lat": at.0, "lng": at.1, "heading": 90.0, "ts": 9}))
        .await;
    let off = north_of(c, 50.0);
    let (off_id, mut d) = s.online_driver("Off", "economy", off.0, off.1).await;
    d.ok(json!({"type": "go_offline"})).await;
    ids.push(off_id);
    let (_, rtoken) = s.rider("Riley").await;

    let nearby = |q: String| {
        let s = &s;
        let rtoken = rtoken.clone();
        async move {
            let (st, _, body) = s
                .raw(
                    Method::GET,
                    &format!("/v1/drivers/nearby?lat={}&lng={}{q}", c.0, c.1),
                    Some(&rtoken),
                    None,
                )
                .await;
            (st, body)
        }
    };
    let parse = |body: &str| -> Vec<Value> {
        let v: Value = serde_json::from_str(body).unwrap();
        v["drivers"].as_array().expect("drivers").clone()
    };

    let (st, body) = nearby(String::new()).await;
    assert_eq!(st, 200, "{body}");
    // Privacy: no id under any key, and no driver id anywhere in the body.
    fn keys(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    out.push(k.clone());
                    keys(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| keys(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    keys(&serde_json::from_str(&body).unwrap(), &mut all);
    assert!(
        all.iter().all(|k| !k.contains("id")),
        "a key names an id: {all:?}"
    );
    for id in &ids {
        assert!(!body.contains(id.as_str()), "{id} leaked: {body}");
    }
    assert!(!body.contains("drv_"), "{body}");

    let drivers = parse(&body);
    let dist: Vec<u64> = drivers
        .iter()
        .map(|d| d["distance_m"].as_u64().unwrap())
        .collect();
    assert_eq!(dist.len(), 4, "{body}");
    let want = [100u64, 300, 500, 1_500];
    for (got, want) in dist.iter().zip(want) {
        assert!(got.abs_diff(want) <= want / 50, "{dist:?} vs {want:?}");
    }
    assert!(
        dist.windows(2).all(|w| w[0] <= w[1]),
        "not sorted: {dist:?}"
    );
    let products: Vec<&str> = drivers
        .iter()
        .map(|d| d["product"].as_str().unwrap())
        .collect();
    assert_eq!(products, ["economy", "xl", "economy", "economy"]);
    for d in &drivers {
        let mut k: Vec<&str> = d.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        k.sort();
        assert_eq!(k, ["distance_m", "heading", "lat", "lng", "product"], "{d}");
    }
    assert_eq!(drivers[0]["heading"], 90.0);
    assert!(
        drivers[1..].iter().all(|d| d["heading"].is_null()),
        "{body}"
    );
    assert!((drivers[0]["lat"].as_f64().unwrap() - at.0).abs() < 1e-9);
    assert!((drivers[0]["lng"].as_f64().unwrap() - at.1).abs() < 1e-9);

    // radius_m, limit, product.
    let (st, body) = nearby("&radius_m=600".into()).await;
    assert_eq!((st, parse(&body).len()), (200, 3), "{body}");
    let (st, body) = nearby("&radius_m=5000".into()).await;
    assert_eq!((st, parse(&body).len()), (200, 5), "{body}");
    let (st, body) = nearby("&limit=2".into()).await;
    let two = parse(&body);
    assert_eq!((st, two.len()), (200, 2), "{body}");
    assert_eq!(two[..], drivers[..2]);
    let (st, body) = nearby("&product=xl".into()).await;
    let xl = parse(&body);
    assert_eq!((st, xl.len()), (200, 1), "{body}");
    assert_eq!(xl[0]["product"], "xl");
    let (st, body) = nearby("&product=economy&radius_m=5000&limit=3".into()).await;
    let eco = parse(&body);
    assert_eq!((st, eco.len()), (200, 3), "{body}");
    assert!(eco.iter().all(|d| d["product"] == "economy"));

    // Riders only.
    let (_, dtoken) = s.driver("Peeker", "economy").await;
    let q = format!("/v1/drivers/nearby?lat={}&lng={}", c.0, c.1);
    let (st, v) = s.get(&q, Some(&dtoken)).await;
    assert_eq!((st, code(&v)), (403, Some("forbidden")));
    let (st, v) = s.get(&q, None).await;
    assert_eq!((st, code(&v)), (401, Some("unauthorized")));

    // Bad parameters.
    for (q, want) in [
        ("/v1/drivers/nearby?lng=-73.56", "bad_request"),
        ("/v1/drivers/nearby?lat=45.5", "bad_request"),
        ("/v1/drivers/nearby?lat=north&lng=-73.56", "bad_request"),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&radius_m=0",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&radius_m=-5",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&radius_m=1e9",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&radius_m=NaN",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&limit=0",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&limit=-1",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&limit=100000",
            "bad_request",
        ),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.56&product=boat",
            "bad_request",
        ),
        ("/v1/drivers/nearby?lat=95&lng=-73.56", "invalid_location"),
        ("/v1/drivers/nearby?lat=45.5&lng=inf", "invalid_location"),
    ] {
        let (st, v) = s.get(q, Some(&rtoken)).await;
        assert_eq!((st, code(&v)), (400, Some(want)), "{q}: {v}");
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_validated() {
    let s = TestServer::start(&[]).await;
    let vehicle = json!({"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": "economy", "seats": 4});
    for body in [
        json!({"name": "", "phone": "+1 555 0100"}),
        json!({"name": "   ", "phone": "+1 555 0100"}),
        json!({"name": "Riley", "phone": "call me"}),
        json!({"name": "Riley"}),
        json!({"name": 5, "phone": "+1 555 0100"}),
    ] {
        let (st, v) = s.post("/v1/riders", None, body.clone()).await;
        assert_eq!((st, code(&v)), (400, Some("bad_request")), "{body}: {v}");
    }
    let mut no_seats = vehicle.clone();
    no_seats["seats"] = json!(0);
    let mut boat = vehicle.clone();
    boat["product"] = json!("boat");
    for body in [
        json!({"name": "", "vehicle": vehicle}),
        json!({"name": "Dana"}),
        json!({"name": "Dana", "vehicle": no_seats}),
        json!({"name": "Dana", "vehicle": boat}),
    ] {
        let (st, v) = s.post("/v1/drivers", None, body.clone()).await;
        assert_eq!((st, code(&v)), (400, Some("bad_request")), "{body}: {v}");
    }
    for raw in ["{", "", "[]", "null", "{\"name\": \"x\", "] {
        let (st, ctype, body) = s
            .raw(Method::POST, "/v1/riders", None, Some(raw.to_owned()))
            .await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((st, code(&v)), (400, Some("bad_request")), "{raw:?}: {v}");
        assert!(ctype.starts_with("application/json"), "{ctype}");
    }
    // A body of exactly 16 KiB is still read (unknown fields are ignored).
    let head = r#"{"name": "Riley", "phone": "+1 555 0100", "pad": ""#;
    let body = format!("{head}{}\"}}", "x".repeat(16 * 1024 - head.len() - 2));
    assert_eq!(body.len(), 16 * 1024);
    let (st, _, text) = s.raw(Method::POST, "/v1/riders", None, Some(body)).await;
    assert_eq!(st, 201, "{text}");
    // Unknown fields are ignored.
    let (st, v) = s
        .post(
            "/v1/riders",
            None,
            json!({"name": "Riley", "phone": "+1 555 0100", "nickname": "R", "age": 30}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert!(v["rider_id"].as_str().unwrap().starts_with("rdr_"));
    // A valid registration still works, and returns a token once.
    let (st, v) = s
        .post(
            "/v1/drivers",
            None,
            json!({"name": "Dana", "vehicle": vehicle}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert!(v["driver_id"].as_str().unwrap().starts_with("drv_"));
    assert!(!v["token"].as_str().unwrap().is_empty());
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_methods_and_operational_endpoints() {
    let s = TestServer::start(&[]).await;
    // Unknown route: a JSON 404.
    let (st, ctype, body) = s.raw(Method::GET, "/v1/nothing/here", None, None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((st, code(&v)), (404, Some("not_found")), "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    // Wrong method: 405 with bad_request.
    for (m, path) in [
        (Method::GET, "/v1/riders"),
        (Method::DELETE, "/v1/trips/trp_1"),
        (Method::POST, "/healthz"),
    ] {
        let (st, _, body) = s.raw(m.clone(), path, None, None).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((st, code(&v)), (405, Some("bad_request")), "{m} {path}");
    }

    let (st, _, _) = s.raw(Method::GET, "/healthz", None, None).await;
    assert_eq!(st, 200);
    let (st, _, _) = s.raw(Method::GET, "/readyz", None, None).await;
    assert_eq!(st, 200);

    // Some traffic, so the counters have something to show.
    s.rider("Riley").await;
    let (st, ctype, text) = s.raw(Method::GET, "/metrics", None, None).await;
    assert_eq!(st, 200);
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    assert!(text.contains("# TYPE dispatch_"), "{text}");
    let mut series = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("`series value`");
        assert!(name.starts_with("dispatch_"), "{line}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        series += 1;
    }
    assert!(series > 0, "{text}");
    s.stop().await.unwrap();
}
