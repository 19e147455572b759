//! Pricing, surge and payments (docs/api.md, "Pricing, surge and payments"), end to end
//! over real sockets: what a completed ride charges and how it is split, what each kind
//! of cancel costs, refunds, a processor that declines or fails, surge from demand with
//! the operator's pins and city cap, price locks, and a crash between the processor's
//! capture and the ledger entry (against the real binary, killed by its own test hook).
//!
//! Every wait on the server's own schedule polls (`eventually`) or waits for a moment the
//! server named (an `updated_at`, an `expires_at`) plus a wide margin; the timing under
//! test always comes from the server's flags.

use std::time::Duration;

use dispatch_tests::{
    Client, DROPOFF, Dispatchd, Endpoint, PICKUP, RidePlan, Scene, TestServer, eventually,
    north_of, now_ms, rfc3339_ms, trip_of, utc_date,
};
use dispatch_transport::wire::{CancelledBy, DriverStatus, ServerMessage, Trip, TripState};
use reqwest::Method;
use serde_json::{Value, json};

/// The admin token of every server here.
const ADMIN: &str = "adm-payments-0123456789abcdef0123";

/// About 14 km north of `PICKUP`: another surge cell, and out of any search from it.
const FAR: (f64, f64) = (45.6300, -73.5690);

/// The default commission, 25%.
const BPS: i64 = 2500;

fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut f = vec!["--admin-token", ADMIN];
    f.extend_from_slice(extra);
    f
}

async fn server(extra: &[&str]) -> TestServer {
    TestServer::start(&flags(extra)).await
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

/// An admin request: (status, body).
async fn admin(s: &Endpoint, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    s.request(method, path, Some(ADMIN), body).await
}

/// An admin GET that must answer 200.
async fn aget(s: &Endpoint, path: &str) -> Value {
    let (st, v) = s.get(path, Some(ADMIN)).await;
    assert_eq!(st, 200, "GET {path}: {v}");
    v
}

/// An admin PUT that must answer 200.
async fn aput(s: &Endpoint, path: &str, body: Value) -> Value {
    let (st, v) = s.put(path, Some(ADMIN), body.clone()).await;
    assert_eq!(st, 200, "PUT {path} {body}: {v}");
    v
}

/// The platform's commission on `fare` at `bps`, rounded half up.
fn commission(fare: i64, bps: i64) -> i64 {
    (fare * bps + 5_000) / 10_000
}

// ---------------------------------------------------------------------------------------
// The ledger as the admin console shows it

/// `GET /admin/ledger`, which must be balanced.
async fn balanced_ledger(s: &Endpoint) -> Value {
    let v = aget(s, "/admin/ledger").await;
    assert_eq!(
        (
            v["balanced"].as_bool(),
            v["total_cents"].as_i64(),
            v["currency"].as_str()
        ),
        (Some(true), Some(0), Some("USD")),
        "the ledger must balance: {v}"
    );
    v
}

/// The ledger's accounts by kind: (platform, clearing, authorizations, riders,
/// rider_holds, drivers).
async fn books(s: &Endpoint) -> (i64, i64, i64, i64, i64, i64) {
    let v = balanced_ledger(s).await;
    let a = |k: &str| {
        v["accounts"][k]
            .as_i64()
            .unwrap_or_else(|| panic!("accounts.{k} of {v}"))
    };
    (
        a("platform"),
        a("clearing"),
        a("authorizations"),
        a("riders"),
        a("rider_holds"),
        a("drivers"),
    )
}

/// The number of ledger entries.
async fn entry_count(s: &Endpoint) -> u64 {
    let v = balanced_ledger(s).await;
    v["entries"].as_u64().unwrap_or_else(|| panic!("{v}"))
}

/// `GET /admin/ledger?account=…`: the balance.
async fn balance(s: &Endpoint, account: &str) -> i64 {
    let v = aget(s, &format!("/admin/ledger?account={account}")).await;
    assert_eq!(
        (v["account"].as_str(), v["currency"].as_str()),
        (Some(account), Some("USD")),
        "{v}"
    );
    v["balance_cents"]
        .as_i64()
        .unwrap_or_else(|| panic!("{account}: {v}"))
}

/// The trip's payment entries (`GET /admin/trips/{id}` `payments`).
async fn payments(s: &Endpoint, trip_id: &str) -> Vec<Value> {
    let v = aget(s, &format!("/admin/trips/{trip_id}")).await;
    let p = v["payments"]
        .as_array()
        .unwrap_or_else(|| panic!("no payments in {v}"))
        .clone();
    for e in &p {
        assert_eq!(e["currency"], "USD", "{e}");
        rfc3339_ms(e["at"].as_str().unwrap_or_else(|| panic!("at of {e}")));
    }
    p
}

fn steps(p: &[Value]) -> Vec<&str> {
    p.iter()
        .map(|e| e["step"].as_str().unwrap_or_else(|| panic!("step of {e}")))
        .collect()
}

/// What `entry` moved into `account` (negative: out of it); asserts the entry sums to 0.
fn net(entry: &Value, account: &str) -> i64 {
    let postings = entry["postings"]
        .as_array()
        .unwrap_or_else(|| panic!("postings of {entry}"));
    let amount = |p: &Value| {
        p["amount_cents"]
            .as_i64()
            .unwrap_or_else(|| panic!("{entry}"))
    };
    assert_eq!(
        postings.iter().map(amount).sum::<i64>(),
        0,
        "an entry must sum to zero: {entry}"
    );
    postings
        .iter()
        .filter(|p| p["account"] == account)
        .map(amount)
        .sum()
}

/// `GET /v1/drivers/me/earnings` as `token`: (today's trips, today's cents, total trips,
/// total cents), with the date checked to be today (UTC).
async fn earnings(s: &Endpoint, driver_id: &str, token: &str) -> (u64, i64, u64, i64) {
    let before = utc_date(now_ms());
    let (st, v) = s.get("/v1/drivers/me/earnings", Some(token)).await;
    let after = utc_date(now_ms());
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["driver_id"].as_str(), v["currency"].as_str()),
        (Some(driver_id), Some("USD")),
        "{v}"
    );
    let date = v["today"]["date"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(date == before || date == after, "today is {before}: {v}");
    let n = |p: &str, k: &str| v[p][k].as_i64().unwrap_or_else(|| panic!("{p}.{k} of {v}"));
    (
        n("today", "trips") as u64,
        n("today", "earnings_cents"),
        n("total", "trips") as u64,
        n("total", "earnings_cents"),
    )
}

// ---------------------------------------------------------------------------------------
// Rides

/// A server with one economy driver online 200 m north of `PICKUP` (Dana, of
/// [`RidePlan::default`]) and a connected rider.
async fn ride_scene(extra: &[&str]) -> Scene {
    RidePlan::default().scene(server(extra).await).await
}

/// The scene's rider's, rider's hold and driver's accounts.
fn accounts_of(x: &Scene) -> (String, String, String) {
    (
        format!("rider:{}", x.rid),
        format!("rider_hold:{}", x.rid),
        format!("driver:{}", x.did),
    )
}

/// What a settling entry (a capture or a fee) of the scene's trip moved into the rider's,
/// the rider's hold, `authorizations`, the driver's, `platform` and `clearing`.
fn settled(x: &Scene, entry: &Value) -> [i64; 6] {
    let (rider, hold, driver) = accounts_of(x);
    [
        &rider,
        &hold,
        "authorizations",
        &driver,
        "platform",
        "clearing",
    ]
    .map(|a| net(entry, a))
}

/// `request_ride` with a quote; the new trip.
async fn request_quoted(r: &mut Client, quote_id: &str) -> Trip {
    let t = trip_of(
        r.request(json!({"type": "request_ride", "quote_id": quote_id}))
            .await,
    );
    assert_eq!((t.state, t.version), (TripState::Dispatching, 1), "{t:?}");
    t
}

/// The driver's command `cmd` on `trip_id` (`accept`, `arrived`, `start_trip`,
/// `complete_trip`) is acknowledged; both apps see the trip's new state: (the rider's
/// update, the driver's).
async fn by_driver(d: &mut Client, r: &mut Client, trip_id: &str, cmd: &str) -> (Trip, Trip) {
    let to = match cmd {
        "accept" => TripState::DriverAssigned,
        "arrived" => TripState::DriverArrived,
        "start_trip" => TripState::InProgress,
        "complete_trip" => TripState::Completed,
        other => panic!("not a driver's step: {other}"),
    };
    if cmd == "accept" {
        assert_eq!(d.offer().await.trip_id, trip_id);
    }
    d.ok(json!({"type": cmd, "trip_id": trip_id})).await;
    (r.trip_in(to).await, d.trip_in(to).await)
}

/// The rider's and the driver's apps both get the trip's `cancelled` update, by `by` and
/// showing `fare` (the fee a late cancel charged, or nothing).
async fn both_see_cancelled(x: &mut Scene, by: Option<CancelledBy>, fare: Option<i64>) {
    for (who, c) in [("rider", &mut x.r), ("driver", &mut x.d)] {
        let u = c.trip_in(TripState::Cancelled).await;
        assert_eq!((u.cancelled_by, u.fare_cents), (by, fare), "{who}: {u:?}");
    }
}

/// The next `receipt`: (trip_id, fare_cents, currency, surge).
async fn receipt(r: &mut Client) -> (String, i64, String, f64) {
    match r
        .next_where("receipt", |m| matches!(m, ServerMessage::Receipt { .. }))
        .await
    {
        ServerMessage::Receipt {
            trip_id,
            fare_cents,
            currency,
            surge,
            ..
        } => (trip_id, fare_cents, currency, surge),
        _ => unreachable!(),
    }
}

/// A quoted economy ride from `PICKUP` to `DROPOFF`, taken by the scene's driver and
/// driven to `completed`: (the quoted fare, the rider's last update, the driver's last
/// update).
async fn completed_ride(x: &mut Scene) -> (i64, Trip, Trip) {
    let q = x.s.quote(&x.rtoken, PICKUP, DROPOFF, "economy").await;
    let fare = q["fare_cents"].as_i64().expect("a fare");
    let t = request_quoted(&mut x.r, q["quote_id"].as_str().unwrap()).await;
    assert_eq!(t.quote.fare_cents, fare, "{t:?}");
    for cmd in ["accept", "arrived", "start_trip"] {
        by_driver(&mut x.d, &mut x.r, &t.trip_id, cmd).await;
    }
    let (rt, dt) = by_driver(&mut x.d, &mut x.r, &t.trip_id, "complete_trip").await;
    let (id, cents, currency, surge) = receipt(&mut x.r).await;
    assert_eq!(
        (id.as_str(), cents, currency.as_str(), surge),
        (
            t.trip_id.as_str(),
            fare,
            "USD",
            q["surge"].as_f64().unwrap()
        ),
        "the receipt is the quoted fare"
    );
    (fare, rt, dt)
}

/// The rate cards with economy replaced by a card that charges `base` cents (plus
/// `booking` cents, never surged) whatever the route, so fares are exact.
async fn flat_economy(s: &Endpoint, base: i64, booking: i64) -> Value {
    let mut p = aget(s, "/admin/pricing").await;
    p["products"]["economy"] = json!({"base_cents": base, "per_km_cents": 0,
        "per_minute_cents": 0, "minimum_cents": 0, "booking_fee_cents": booking,
        "cancellation_fee_cents": 500});
    aput(s, "/admin/pricing", p).await
}

/// Rides are paid as before (nothing a test did broke the processor): the next
/// assignment takes a hold. Stops the server.
async fn payments_still_work(mut x: Scene) {
    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    by_driver(&mut x.d, &mut x.r, &t.trip_id, "accept").await;
    assert_eq!(steps(&payments(&x.s, &t.trip_id).await), ["authorize"]);
    x.s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 1. A completed ride

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_ride_charges_the_quote_and_splits_it_between_driver_and_platform() {
    let mut x = ride_scene(&[]).await;
    let (fare, rt, dt) = completed_ride(&mut x).await;
    let (c, share) = (commission(fare, BPS), fare - commission(fare, BPS));
    // Both apps' last update carries the captured fare.
    assert_eq!((rt.fare_cents, dt.fare_cents), (Some(fare), Some(fare)));
    let (st, v) =
        x.s.get(&format!("/v1/trips/{}", rt.trip_id), Some(&x.rtoken))
            .await;
    assert_eq!((st, v["fare_cents"].as_i64()), (200, Some(fare)), "{v}");

    // The trip's entries: the hold at assignment, the capture and split at completion.
    let p = payments(&x.s, &rt.trip_id).await;
    assert_eq!(steps(&p), ["authorize", "capture"], "{p:?}");
    let (rider, hold, driver) = accounts_of(&x);
    assert_eq!(
        (net(&p[0], &hold), net(&p[0], "authorizations")),
        (-fare, fare),
        "authorize: {}",
        p[0]
    );
    assert_eq!(
        settled(&x, &p[1]),
        [-fare, fare, -fare, share, c, 0],
        "capture: {}",
        p[1]
    );

    // The books: balanced, the hold gone, the fare split.
    assert_eq!(books(&x.s).await, (c, 0, 0, -fare, 0, share));
    assert_eq!(entry_count(&x.s).await, 2);
    for (account, want) in [
        (driver.as_str(), share),
        (rider.as_str(), -fare),
        (hold.as_str(), 0),
        ("platform", c),
        ("clearing", 0),
        ("authorizations", 0),
    ] {
        assert_eq!(balance(&x.s, account).await, want, "{account}");
    }

    // The driver's earnings: one trip, the fare less commission, today and in total.
    assert_eq!(
        earnings(&x.s, &x.did, &x.dtoken).await,
        (1, share, 1, share)
    );
    let (st, v) = x.s.get("/v1/drivers/me/earnings", Some(&x.rtoken)).await;
    assert_eq!((st, code(&v)), (403, Some("forbidden")), "{v}");
    let (st, v) = x.s.get("/v1/drivers/me/earnings", None).await;
    assert_eq!((st, code(&v)), (401, Some("unauthorized")), "{v}");
    let (st, v) =
        x.s.get("/v1/drivers/me/earnings", Some("not-a-token-of-anyone"))
            .await;
    assert_eq!((st, code(&v)), (401, Some("unauthorized")), "{v}");
    x.s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commission_rounds_half_up_and_the_flag_changes_the_split() {
    // Fares whose commission falls on half a cent: 25% of 1002 is 250.5, 10% of 1005 is
    // 100.5; both round up.
    for (extra, fare, c) in [
        (&[][..], 1002, 251),
        (&["--commission-bps", "1000"][..], 1005, 101),
    ] {
        let mut x = ride_scene(extra).await;
        flat_economy(&x.s, fare, 0).await;
        let (quoted, rt, _) = completed_ride(&mut x).await;
        assert_eq!(quoted, fare, "{extra:?}: the flat card's fare");
        let p = payments(&x.s, &rt.trip_id).await;
        assert_eq!(steps(&p), ["authorize", "capture"], "{extra:?}");
        let driver = format!("driver:{}", x.did);
        assert_eq!(
            (net(&p[1], &driver), net(&p[1], "platform")),
            (fare - c, c),
            "{extra:?}: {}",
            p[1]
        );
        assert_eq!(
            books(&x.s).await,
            (c, 0, 0, -fare, 0, fare - c),
            "{extra:?}"
        );
        assert_eq!(balance(&x.s, &driver).await, fare - c, "{extra:?}");
        assert_eq!(
            earnings(&x.s, &x.did, &x.dtoken).await,
            (1, fare - c, 1, fare - c),
            "{extra:?}"
        );
        x.s.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// 2. Cancels

/// Asserts that `trip_id` ended with its hold released and nothing charged.
async fn released(s: &Endpoint, trip_id: &str, rider_id: &str, fare: i64) {
    let p = payments(s, trip_id).await;
    assert_eq!(steps(&p), ["authorize", "release"], "{p:?}");
    let hold = format!("rider_hold:{rider_id}");
    assert_eq!(
        (net(&p[1], &hold), net(&p[1], "authorizations")),
        (fare, -fare),
        "release: {}",
        p[1]
    );
    assert_eq!(balance(s, &format!("rider:{rider_id}")).await, 0);
    assert_eq!(balance(s, &hold).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_riders_cancel_within_the_grace_period_costs_nothing() {
    let mut x = ride_scene(&["--cancel-grace-ms", "600000", "--no-show-wait-ms", "600000"]).await;
    // Once right after the assignment, once right after the driver arrived.
    for (n, steps) in [(1u64, &["accept"][..]), (2, &["accept", "arrived"][..])] {
        let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
        for cmd in steps {
            by_driver(&mut x.d, &mut x.r, &t.trip_id, cmd).await;
        }
        x.r.ok(json!({"type": "cancel_ride", "trip_id": t.trip_id, "reason": "changed my mind"}))
            .await;
        both_see_cancelled(&mut x, Some(CancelledBy::Rider), None).await;
        released(&x.s, &t.trip_id, &x.rid, t.quote.fare_cents).await;
        assert_eq!(books(&x.s).await, (0, 0, 0, 0, 0, 0));
        assert_eq!(entry_count(&x.s).await, 2 * n);
    }
    assert_eq!(earnings(&x.s, &x.did, &x.dtoken).await, (0, 0, 0, 0));
    x.s.stop().await.unwrap();
}

/// A rider's cancel past `--cancel-grace-ms` after the assignment, or (`arrive`) past
/// `--no-show-wait-ms` after the driver arrived: the fee of the rate card at the time of
/// the cancel is charged and paid in full to the driver. The flag under test is 300 ms,
/// the other 10 minutes.
async fn a_late_cancel_pays_the_fee(arrive: bool) {
    let (grace, no_show) = match arrive {
        false => ("300", "600000"),
        true => ("600000", "300"),
    };
    let mut x = ride_scene(&["--cancel-grace-ms", grace, "--no-show-wait-ms", no_show]).await;
    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    let fare = t.quote.fare_cents;
    let (mut u, _) = by_driver(&mut x.d, &mut x.r, &t.trip_id, "accept").await;
    if arrive {
        u = by_driver(&mut x.d, &mut x.r, &t.trip_id, "arrived").await.0;
    }
    // The fee is the product's on the rate card when the rider cancels: change it now.
    let mut pricing = aget(&x.s, "/admin/pricing").await;
    pricing["products"]["economy"]["cancellation_fee_cents"] = json!(777);
    aput(&x.s, "/admin/pricing", pricing).await;
    let fee = 777;

    // Past the moment the flag names, by a wide margin.
    let late = rfc3339_ms(&u.updated_at) + 300 + 300;
    while now_ms() < late {
        tokio::time::sleep(Duration::from_millis(late - now_ms())).await;
    }
    x.r.ok(json!({"type": "cancel_ride", "trip_id": t.trip_id, "reason": "too late"}))
        .await;
    both_see_cancelled(&mut x, Some(CancelledBy::Rider), Some(fee)).await;
    let (st, v) =
        x.s.get(&format!("/v1/trips/{}", t.trip_id), Some(&x.rtoken))
            .await;
    assert_eq!((st, v["fare_cents"].as_i64()), (200, Some(fee)), "{v}");

    // The hold is released and the fee charged, all of it to the driver.
    let p = payments(&x.s, &t.trip_id).await;
    assert_eq!(p.len(), 2, "a hold and one settlement: {p:?}");
    assert_eq!(steps(&p)[0], "authorize");
    let (rider, _, driver) = accounts_of(&x);
    assert_eq!(
        settled(&x, &p[1]),
        [-fee, fare, -fare, fee, 0, 0],
        "the fee: {}",
        p[1]
    );
    assert_eq!(books(&x.s).await, (0, 0, 0, -fee, 0, fee));
    assert_eq!(balance(&x.s, &driver).await, fee);
    assert_eq!(balance(&x.s, &rider).await, -fee);
    // Earnings count completed trips, and cancellation fees as money earned.
    assert_eq!(earnings(&x.s, &x.did, &x.dtoken).await, (0, fee, 0, fee));
    x.s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_riders_cancel_after_the_grace_period_pays_the_driver_the_fee() {
    a_late_cancel_pays_the_fee(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_riders_no_show_after_the_wait_pays_the_driver_the_fee() {
    a_late_cancel_pays_the_fee(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cancel_of_a_trip_in_progress_releases_the_hold() {
    let mut x = ride_scene(&[]).await;
    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    for cmd in ["accept", "arrived", "start_trip"] {
        by_driver(&mut x.d, &mut x.r, &t.trip_id, cmd).await;
    }
    assert_eq!(
        books(&x.s).await,
        (0, 0, t.quote.fare_cents, 0, -t.quote.fare_cents, 0),
        "the fare is held while the trip runs"
    );
    let (st, v) = admin(
        &x.s,
        Method::POST,
        &format!("/admin/trips/{}/cancel", t.trip_id),
        Some(json!({"reason": "vehicle breakdown"})),
    )
    .await;
    assert_eq!(
        (st, v["state"].as_str(), v["fare_cents"].is_null()),
        (200, Some("cancelled"), true),
        "{v}"
    );
    both_see_cancelled(&mut x, Some(CancelledBy::Admin), None).await;
    released(&x.s, &t.trip_id, &x.rid, t.quote.fare_cents).await;
    assert_eq!(books(&x.s).await, (0, 0, 0, 0, 0, 0));
    assert_eq!(earnings(&x.s, &x.did, &x.dtoken).await, (0, 0, 0, 0));
    x.s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drivers_cancel_keeps_the_hold_and_no_driver_found_releases_it() {
    let mut x = ride_scene(&[]).await;
    let further = north_of(PICKUP, 800.0);
    let (bid, btoken, mut b) =
        x.s.online_driver_token("Bo", "economy", further.0, further.1)
            .await;
    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    let fare = t.quote.fare_cents;
    // The nearer driver takes it, then gives it back: the hold stays for the next one.
    by_driver(&mut x.d, &mut x.r, &t.trip_id, "accept").await;
    x.d.ok(json!({"type": "cancel_trip", "trip_id": t.trip_id, "reason": "flat tyre"}))
        .await;
    x.r.trip_in(TripState::Dispatching).await;
    assert_eq!(steps(&payments(&x.s, &t.trip_id).await), ["authorize"]);
    assert_eq!(books(&x.s).await, (0, 0, fare, 0, -fare, 0));
    // The next driver's assignment takes no second hold.
    by_driver(&mut b, &mut x.r, &t.trip_id, "accept").await;
    assert_eq!(steps(&payments(&x.s, &t.trip_id).await), ["authorize"]);
    for cmd in ["arrived", "start_trip", "complete_trip"] {
        by_driver(&mut b, &mut x.r, &t.trip_id, cmd).await;
    }
    assert_eq!(
        steps(&payments(&x.s, &t.trip_id).await),
        ["authorize", "capture"]
    );
    let c = commission(fare, BPS);
    assert_eq!(books(&x.s).await, (c, 0, 0, -fare, 0, fare - c));
    assert_eq!(
        earnings(&x.s, &bid, &btoken).await,
        (1, fare - c, 1, fare - c)
    );
    assert_eq!(earnings(&x.s, &x.did, &x.dtoken).await, (0, 0, 0, 0));

    // Alone far away: a driver's cancel leaves no candidate, the trip ends
    // `no_driver_found` and the hold is released.
    let (_, mut far) = x.s.online_driver("Cy", "economy", FAR.0, FAR.1).await;
    let (rid2, _, mut r2) = x.s.connected_rider("Robin").await;
    let t2 = r2.request_ride(FAR, north_of(FAR, 2000.0), "economy").await;
    by_driver(&mut far, &mut r2, &t2.trip_id, "accept").await;
    far.ok(json!({"type": "cancel_trip", "trip_id": t2.trip_id}))
        .await;
    let end = r2.trip_in(TripState::NoDriverFound).await;
    assert_eq!(end.fare_cents, None, "{end:?}");
    released(&x.s, &t2.trip_id, &rid2, t2.quote.fare_cents).await;
    assert_eq!(books(&x.s).await, (c, 0, 0, -fare, 0, fare - c));
    x.s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 3. Refunds

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_are_borne_by_the_platform_up_to_what_was_charged() {
    let mut x = ride_scene(&[]).await;
    let (fare, rt, _) = completed_ride(&mut x).await;
    let c = commission(fare, BPS);
    let path = format!("/admin/trips/{}/refund", rt.trip_id);
    let rider = format!("rider:{}", x.rid);
    let refund = |body: Value| admin(&x.s, Method::POST, &path, Some(body));

    // Bad bodies change nothing.
    for body in [
        json!({}),
        json!({"reason": "late"}),
        json!({"amount_cents": 100}),
        json!({"amount_cents": "100", "reason": "late"}),
        json!({"amount_cents": 1.5, "reason": "late"}),
        json!({"amount_cents": -100, "reason": "late"}),
        json!({"amount_cents": null, "reason": "late"}),
        json!({"amount_cents": 100, "reason": 7}),
    ] {
        let (st, v) = refund(body.clone()).await;
        assert_eq!((st, code(&v)), (400, Some("bad_request")), "{body}: {v}");
    }
    let (st, _, body) =
        x.s.raw(
            Method::POST,
            &path,
            Some(ADMIN),
            Some("{\"amount_cents\": 1".into()),
        )
        .await;
    assert_eq!(st, 400, "malformed JSON: {body}");
    assert_eq!(books(&x.s).await, (c, 0, 0, -fare, 0, fare - c));

    // A first refund: the platform pays it back to the rider.
    let first = 300.min(fare - 1);
    let (st, v) = refund(json!({"amount_cents": first, "reason": "late pickup"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["trip_id"].as_str(), Some(rt.trip_id.as_str()), "{v}");
    assert_eq!(
        (net(&v["refund"], &rider), net(&v["refund"], "platform")),
        (first, -first),
        "{v}"
    );
    assert_eq!(v["refund"]["step"], "refund:1", "refunds are numbered: {v}");
    let listed = v["payments"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(listed.len(), 3, "{v}");
    assert_eq!(listed[2], v["refund"], "{v}");
    assert_eq!(*listed, payments(&x.s, &rt.trip_id).await);
    assert_eq!(
        books(&x.s).await,
        (c - first, 0, 0, -fare + first, 0, fare - c)
    );
    assert_eq!(balance(&x.s, &rider).await, -fare + first);

    // More than is left: refused, and nothing changes.
    let rest = fare - first;
    let (st, v) = refund(json!({"amount_cents": rest + 1, "reason": "all of it"})).await;
    assert_eq!((st, code(&v)), (409, Some("conflict")), "{v}");
    assert_eq!(payments(&x.s, &rt.trip_id).await.len(), 3);
    // The rest: the rider has paid nothing in the end; the driver keeps its share.
    let (st, v) = refund(json!({"amount_cents": rest, "reason": "the rest"})).await;
    assert_eq!((st, &v["refund"]["step"]), (200, &json!("refund:2")), "{v}");
    assert_eq!(
        (net(&v["refund"], &rider), net(&v["refund"], "platform")),
        (rest, -rest),
        "{v}"
    );
    assert_eq!(books(&x.s).await, (c - fare, 0, 0, 0, 0, fare - c));
    assert_eq!(balance(&x.s, &format!("driver:{}", x.did)).await, fare - c);
    assert_eq!(
        earnings(&x.s, &x.did, &x.dtoken).await,
        (1, fare - c, 1, fare - c)
    );
    let (st, v) = refund(json!({"amount_cents": 1, "reason": "once more"})).await;
    assert_eq!((st, code(&v)), (409, Some("conflict")), "{v}");

    // A live trip cannot be refunded; nor can one that charged nothing.
    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    let live = format!("/admin/trips/{}/refund", t.trip_id);
    let body = json!({"amount_cents": 1, "reason": "goodwill"});
    let (st, v) = admin(&x.s, Method::POST, &live, Some(body.clone())).await;
    assert_eq!((st, code(&v)), (409, Some("conflict")), "dispatching: {v}");
    by_driver(&mut x.d, &mut x.r, &t.trip_id, "accept").await;
    let (st, v) = admin(&x.s, Method::POST, &live, Some(body.clone())).await;
    assert_eq!((st, code(&v)), (409, Some("conflict")), "assigned: {v}");
    x.r.ok(json!({"type": "cancel_ride", "trip_id": t.trip_id}))
        .await;
    x.r.trip_in(TripState::Cancelled).await;
    let (st, v) = admin(&x.s, Method::POST, &live, Some(body.clone())).await;
    assert_eq!((st, code(&v)), (409, Some("conflict")), "free cancel: {v}");
    // Unknown trips.
    for id in ["trp_00000000000000000000000000000000", "trp_nope"] {
        let path = format!("/admin/trips/{id}/refund");
        let (st, v) = admin(&x.s, Method::POST, &path, Some(body.clone())).await;
        assert_eq!((st, code(&v)), (404, Some("not_found")), "{id}: {v}");
    }
    assert_eq!(books(&x.s).await, (c - fare, 0, 0, 0, 0, fare - c));
    x.s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payment_and_surge_routes_want_the_admin_token() {
    let mut x = ride_scene(&[]).await;
    let (_, rt, _) = completed_ride(&mut x).await;
    let refund = format!("/admin/trips/{}/refund", rt.trip_id);
    let surge = aget(&x.s, "/admin/surge").await;
    let cell = aget(&x.s, &format!("/admin/drivers/{}", x.did)).await["cell"]
        .as_str()
        .expect("the driver's cell")
        .to_owned();
    let pin = format!("/admin/surge/cells/{cell}");
    let routes: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/admin/ledger", None),
        (Method::GET, "/admin/ledger?account=platform", None),
        (Method::GET, "/admin/surge", None),
        (Method::PUT, "/admin/surge", Some(json!({"city_cap": 1.5}))),
        (Method::PUT, &pin, Some(json!({"multiplier": 2.0}))),
        (
            Method::PUT,
            "/admin/payments/provider",
            Some(json!({"mode": "decline"})),
        ),
        (
            Method::POST,
            &refund,
            Some(json!({"amount_cents": 1, "reason": "x"})),
        ),
    ];
    for (method, path, body) in routes {
        for (token, status, want) in [
            (None, 401, "unauthorized"),
            (Some("not-a-token-of-anyone"), 401, "unauthorized"),
            (Some(x.rtoken.as_str()), 403, "forbidden"),
            (Some(x.dtoken.as_str()), 403, "forbidden"),
        ] {
            let (st, v) = x.s.request(method.clone(), path, token, body.clone()).await;
            assert_eq!((st, code(&v)), (status, Some(want)), "{method} {path}: {v}");
        }
    }
    // Nothing was changed by the refusals.
    assert_eq!(aget(&x.s, "/admin/surge").await, surge);
    assert_eq!(payments(&x.s, &rt.trip_id).await.len(), 2);
    payments_still_work(x).await;
}

/// A body must be the object its route names: one without the route's field (a typo
/// such as `multipler`), or an array in place of the object, is 400 `bad_request`
/// (PROTOCOL.md: "missing or mistyped field"), never read as `null` (which unpins or
/// lifts the cap) or field by field in order, and it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_its_field_or_not_an_object_is_refused() {
    let mut x = ride_scene(&[]).await;
    let (_, rt, _) = completed_ride(&mut x).await;
    let refund = format!("/admin/trips/{}/refund", rt.trip_id);
    let cell = aget(&x.s, &format!("/admin/drivers/{}", x.did)).await["cell"]
        .as_str()
        .expect("the driver's cell")
        .to_owned();
    let pin = format!("/admin/surge/cells/{cell}");
    let set_surge = || async {
        aput(&x.s, &pin, json!({"multiplier": 2.0})).await;
        aput(&x.s, "/admin/surge", json!({"city_cap": 2.5})).await
    };
    let surge = set_surge().await;
    let ledger = balanced_ledger(&x.s).await;
    // Every case is checked (and what it changed put back), then all misses are listed.
    let mut misses = Vec::new();
    for (method, path, body) in [
        (Method::PUT, pin.as_str(), json!({})),
        (Method::PUT, &pin, json!({"multipler": 1.0})),
        (Method::PUT, &pin, json!([null])),
        (Method::PUT, "/admin/surge", json!({})),
        (Method::PUT, "/admin/surge", json!({"citycap": 2.0})),
        (Method::PUT, "/admin/surge", json!([null])),
        (Method::PUT, "/admin/payments/provider", json!(["decline"])),
        (Method::POST, &refund, json!([100, "late"])),
    ] {
        let (st, v) = admin(&x.s, method.clone(), path, Some(body.clone())).await;
        if (st, code(&v)) != (400, Some("bad_request")) {
            misses.push(format!("{method} {path} {body} was answered {st} {v}"));
        }
        if aget(&x.s, "/admin/surge").await != surge {
            misses.push(format!("{method} {path} {body} changed the surge controls"));
            set_surge().await;
        }
        if balanced_ledger(&x.s).await != ledger {
            misses.push(format!("{method} {path} {body} moved money"));
        }
    }
    provider(&x.s, "approve").await;
    assert!(misses.is_empty(), "{}", misses.join("\n"));
    payments_still_work(x).await;
}

// ---------------------------------------------------------------------------------------
// 4. A processor that declines or fails

async fn provider(s: &Endpoint, mode: &str) {
    let v = aput(s, "/admin/payments/provider", json!({"mode": mode})).await;
    assert_eq!(v["mode"].as_str(), Some(mode), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_authorization_cancels_the_trip_and_moves_no_money() {
    let mut x = ride_scene(&[]).await;
    for body in [
        json!({"mode": "maybe"}),
        json!({"mode": 1}),
        json!({"mode": null}),
        json!({}),
    ] {
        let (st, v) =
            x.s.put("/admin/payments/provider", Some(ADMIN), body.clone())
                .await;
        assert_eq!((st, code(&v)), (400, Some("bad_request")), "{body}: {v}");
    }
    provider(&x.s, "decline").await;

    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(x.d.offer().await.trip_id, t.trip_id);
    assert_eq!(
        x.d.err(json!({"type": "accept", "trip_id": t.trip_id}))
            .await,
        "conflict"
    );
    // The offer is withdrawn first: `offer_expired` came before the refusal.
    let withdrawn =
        x.d.pending()
            .iter()
            .any(|m| matches!(m, ServerMessage::OfferExpired { trip_id } if *trip_id == t.trip_id));
    assert!(
        withdrawn,
        "offer_expired before the conflict: {:?}",
        x.d.pending()
    );
    let u = x.r.trip_in(TripState::Cancelled).await;
    assert_eq!(
        (u.cancelled_by, u.driver_id.as_deref(), u.fare_cents),
        (Some(CancelledBy::System), None, None),
        "{u:?}"
    );
    let why = u.cancel_reason.clone().unwrap_or_default();
    assert!(
        why.to_lowercase().contains("payment"),
        "the reason names the payment: {u:?}"
    );
    let v = aget(&x.s, &format!("/admin/trips/{}", t.trip_id)).await;
    let last = v["history"].as_array().and_then(|h| h.last()).cloned();
    assert_eq!(
        last.map(|l| (l["from"].clone(), l["to"].clone(), l["by"].clone())),
        Some((json!("dispatching"), json!("cancelled"), json!("system"))),
        "{v}"
    );
    assert_eq!(v["payments"], json!([]), "no money moved: {v}");
    assert_eq!(entry_count(&x.s).await, 0);
    assert_eq!(books(&x.s).await, (0, 0, 0, 0, 0, 0));
    // The driver is free again, and approving again makes rides work.
    eventually("the driver to be available", || async {
        let v = aget(&x.s, &format!("/admin/drivers/{}", x.did)).await;
        (v["status"] == "available").then_some(())
    })
    .await;
    provider(&x.s, "approve").await;
    payments_still_work(x).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_leaves_the_trip_as_it_was_until_it_recovers() {
    let mut x = ride_scene(&["--payments-provider-mode", "fail"]).await;
    let t = x.r.request_ride(PICKUP, DROPOFF, "economy").await;
    let fare = t.quote.fare_cents;
    assert_eq!(x.d.offer().await.trip_id, t.trip_id);
    assert_eq!(
        x.d.err(json!({"type": "accept", "trip_id": t.trip_id}))
            .await,
        "unavailable"
    );
    // Nothing happened: the trip still dispatches, the offer is still the driver's.
    let v = aget(&x.s, &format!("/admin/trips/{}", t.trip_id)).await;
    assert_eq!(
        (v["trip"]["state"].as_str(), &v["payments"]),
        (Some("dispatching"), &json!([])),
        "{v}"
    );
    let v = aget(&x.s, &format!("/admin/drivers/{}", x.did)).await;
    assert_eq!(
        (v["status"].as_str(), v["trip_id"].as_str()),
        (Some("offered"), Some(t.trip_id.as_str())),
        "{v}"
    );
    // The processor is back: the same offer can be taken.
    provider(&x.s, "approve").await;
    x.d.ok(json!({"type": "accept", "trip_id": t.trip_id}))
        .await;
    x.r.trip_in(TripState::DriverAssigned).await;
    assert_eq!(steps(&payments(&x.s, &t.trip_id).await), ["authorize"]);
    for cmd in ["arrived", "start_trip"] {
        by_driver(&mut x.d, &mut x.r, &t.trip_id, cmd).await;
    }

    // It fails again at the capture: the trip stays in progress.
    provider(&x.s, "fail").await;
    let complete = json!({"type": "complete_trip", "trip_id": t.trip_id});
    assert_eq!(x.d.err(complete.clone()).await, "unavailable");
    let v = aget(&x.s, &format!("/admin/trips/{}", t.trip_id)).await;
    assert_eq!(v["trip"]["state"].as_str(), Some("in_progress"), "{v}");
    assert_eq!(steps(&payments(&x.s, &t.trip_id).await), ["authorize"]);
    assert_eq!(books(&x.s).await, (0, 0, fare, 0, -fare, 0));
    // Back again: the retry completes, with exactly one capture.
    provider(&x.s, "approve").await;
    let (rt, dt) = by_driver(&mut x.d, &mut x.r, &t.trip_id, "complete_trip").await;
    assert_eq!((rt.fare_cents, dt.fare_cents), (Some(fare), Some(fare)));
    assert_eq!(receipt(&mut x.r).await.1, fare);
    assert_eq!(
        steps(&payments(&x.s, &t.trip_id).await),
        ["authorize", "capture"]
    );
    let c = commission(fare, BPS);
    assert_eq!(books(&x.s).await, (c, 0, 0, -fare, 0, fare - c));
    x.s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Surge and quotes

/// The parent of the H3 cell `cell` (hex) at resolution `res`.
fn h3_parent(cell: &str, res: u64) -> String {
    let mut h = u64::from_str_radix(cell, 16).unwrap_or_else(|_| panic!("not H3: {cell}"));
    assert!((h >> 52) & 0xf >= res, "{cell} is coarser than {res}");
    h = (h & !(0xf << 52)) | (res << 52);
    for r in res + 1..=15 {
        h |= 0b111 << ((15 - r) * 3);
    }
    format!("{h:x}")
}

/// The `GET /admin/surge` row of `cell`.
fn surge_row<'a>(v: &'a Value, cell: &str) -> Option<&'a Value> {
    v["cells"].as_array()?.iter().find(|c| c["cell"] == cell)
}

/// A quote on the route of every surge check; asserts its surge and that its fare is
/// the flat economy card's (1000 × surge + 150, the booking fee never surged).
async fn quote_at(s: &Endpoint, token: &str, surge: f64) -> Value {
    let q = s.quote(token, PICKUP, DROPOFF, "economy").await;
    let fare = (1000.0 * surge).round() as i64 + 150;
    assert_eq!(
        (q["surge"].as_f64(), q["fare_cents"].as_i64()),
        (Some(surge), Some(fare)),
        "{q}"
    );
    q
}

/// `GET /admin/cells`: the surge shown for matching cell `cell`.
async fn cell_surge(s: &Endpoint, cell: &str) -> f64 {
    let v = aget(s, "/admin/cells?limit=1000").await;
    let row = v["cells"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["cell"] == cell))
        .unwrap_or_else(|| panic!("{cell} is not listed: {v}"));
    row["surge"].as_f64().unwrap_or_else(|| panic!("{row}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_raises_surge_and_pins_and_the_city_cap_override_it_across_restarts() {
    let s = server(&["--surge-update-ms", "100"]).await;
    flat_economy(&s, 1000, 150).await;
    let (_, rtoken, mut r) = s.connected_rider("Riley").await;
    let before = quote_at(&s, &rtoken, 1.0).await;
    let v = aget(&s, "/admin/surge").await;
    assert_eq!(
        [
            &v["resolution"],
            &v["window_ms"],
            &v["step"],
            &v["cap"],
            &v["city_cap"],
            &v["pins"]
        ],
        [
            &json!(6),
            &json!(300_000),
            &json!(0.1),
            &json!(3.0),
            &Value::Null,
            &json!([])
        ],
        "{v}"
    );

    // One xl driver at the pickup (its matching cell is then listed); economy riders
    // find nobody, and every request still counts as demand.
    let (xid, x) = s.online_driver("Xena", "xl", PICKUP.0, PICKUP.1).await;
    for _ in 0..6 {
        r.request_ride(PICKUP, DROPOFF, "economy").await;
        r.trip_in(TripState::NoDriverFound).await;
    }
    // Demand 6 over supply 1 asks for 3.5, above the cap: surge climbs to 3.0.
    let cell = eventually("surge to climb to the cap", || async {
        let v = aget(&s, "/admin/surge").await;
        let rows = v["cells"].as_array()?;
        let row = rows.iter().find(|c| c["demand"].as_u64() >= Some(6))?;
        (row["multiplier"] == json!(3.0)).then(|| row["cell"].as_str().unwrap().to_owned())
    })
    .await;
    let raised = quote_at(&s, &rtoken, 3.0).await;
    assert!(raised["fare_cents"].as_i64() > before["fare_cents"].as_i64());
    // The matching cell of the pickup shows its surge cell's multiplier.
    let matching = aget(&s, &format!("/admin/drivers/{xid}")).await["cell"]
        .as_str()
        .expect("a cell")
        .to_owned();
    assert_eq!(
        h3_parent(&matching, 6),
        cell,
        "the surge cell of {matching}"
    );
    assert_eq!(cell_surge(&s, &matching).await, 3.0);

    // Multipliers outside [1, cap], cells that are not H3 or coarser than the surge
    // resolution: 400, and nothing changes.
    let coarser = h3_parent(&cell, 5);
    for (path, body) in [
        (
            format!("/admin/surge/cells/{cell}"),
            json!({"multiplier": 0.5}),
        ),
        (
            format!("/admin/surge/cells/{cell}"),
            json!({"multiplier": 0.99}),
        ),
        (
            format!("/admin/surge/cells/{cell}"),
            json!({"multiplier": 3.5}),
        ),
        (
            format!("/admin/surge/cells/{cell}"),
            json!({"multiplier": "2"}),
        ),
        (
            format!("/admin/surge/cells/{coarser}"),
            json!({"multiplier": 2.0}),
        ),
        (
            "/admin/surge/cells/nothex".to_owned(),
            json!({"multiplier": 2.0}),
        ),
        ("/admin/surge".to_owned(), json!({"city_cap": 0.5})),
        ("/admin/surge".to_owned(), json!({"city_cap": 3.5})),
        ("/admin/surge".to_owned(), json!({"city_cap": "1.5"})),
    ] {
        let (st, v) = s.put(&path, Some(ADMIN), body.clone()).await;
        assert_eq!(
            (st, code(&v)),
            (400, Some("bad_request")),
            "{path} {body}: {v}"
        );
    }
    let v = aget(&s, "/admin/surge").await;
    assert_eq!(
        (&v["pins"], &v["city_cap"]),
        (&json!([]), &Value::Null),
        "{v}"
    );

    // A price locked now is kept, whatever the operator does next.
    let locked = quote_at(&s, &rtoken, 3.0).await;

    // A pin: rounded to a step, and set through a finer cell it pins its surge cell.
    let v = aput(
        &s,
        &format!("/admin/surge/cells/{cell}"),
        json!({"multiplier": 2.04}),
    )
    .await;
    assert_eq!(v["pins"], json!([{"cell": cell, "multiplier": 2.0}]), "{v}");
    let v = aput(
        &s,
        &format!("/admin/surge/cells/{matching}"),
        json!({"multiplier": 2.0}),
    )
    .await;
    assert_eq!(v["pins"], json!([{"cell": cell, "multiplier": 2.0}]), "{v}");
    let row = surge_row(&v, &cell).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (&row["pinned"], &row["multiplier"]),
        (&json!(2.0), &json!(2.0)),
        "{v}"
    );
    quote_at(&s, &rtoken, 2.0).await;
    assert_eq!(cell_surge(&s, &matching).await, 2.0);
    // The city cap caps every cell, pins included, rounded down to a step (never
    // exceeded).
    let v = aput(&s, "/admin/surge", json!({"city_cap": 1.59})).await;
    let row = surge_row(&v, &cell).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(row["multiplier"], json!(1.5), "a cap of 1.59: {v}");
    quote_at(&s, &rtoken, 1.5).await;
    let v = aput(&s, "/admin/surge", json!({"city_cap": 1.5})).await;
    assert_eq!(v["city_cap"], json!(1.5), "{v}");
    let row = surge_row(&v, &cell).unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        (&row["pinned"], &row["multiplier"]),
        (&json!(2.0), &json!(1.5)),
        "{v}"
    );
    quote_at(&s, &rtoken, 1.5).await;
    assert_eq!(cell_surge(&s, &matching).await, 1.5);

    // The locked quote charges its own price.
    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let fare = locked["fare_cents"].as_i64().unwrap();
    let t = request_quoted(&mut r, locked["quote_id"].as_str().unwrap()).await;
    assert_eq!((t.quote.fare_cents, t.quote.surge), (fare, 3.0), "{t:?}");
    for cmd in ["accept", "arrived", "start_trip", "complete_trip"] {
        by_driver(&mut d, &mut r, &t.trip_id, cmd).await;
    }
    let (_, cents, _, surge) = receipt(&mut r).await;
    assert_eq!((cents, surge), (fare, 3.0));
    let p = payments(&s, &t.trip_id).await;
    assert_eq!(steps(&p), ["authorize", "capture"]);
    assert_eq!(net(&p[1], &format!("rider:{}", t.rider_id)), -fare);
    d.close().await;
    r.close().await;
    // (An open session would keep the in-process server's store, and its lock, alive.)
    x.close().await;

    // Pins and the cap survive a restart.
    let s = s.restart(&flags(&["--surge-update-ms", "100"])).await;
    let v = aget(&s, "/admin/surge").await;
    assert_eq!(
        (&v["pins"], &v["city_cap"]),
        (&json!([{"cell": cell, "multiplier": 2.0}]), &json!(1.5)),
        "{v}"
    );
    quote_at(&s, &rtoken, 1.5).await;
    let v = aput(&s, "/admin/surge", json!({"city_cap": null})).await;
    assert_eq!(v["city_cap"], Value::Null, "{v}");
    quote_at(&s, &rtoken, 2.0).await;
    let v = aput(
        &s,
        &format!("/admin/surge/cells/{cell}"),
        json!({"multiplier": null}),
    )
    .await;
    assert_eq!(v["pins"], json!([]), "{v}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_riders_quote_is_forbidden_and_an_expired_one_is_refused() {
    let s = server(&["--quote-ttl-ms", "200"]).await;
    let (_, atoken, mut a) = s.connected_rider("Avery").await;
    let (_, _, mut b) = s.connected_rider("Blake").await;
    let q = s.quote(&atoken, PICKUP, DROPOFF, "economy").await;
    let use_it = json!({"type": "request_ride", "quote_id": q["quote_id"]});
    assert_eq!(b.err(use_it.clone()).await, "forbidden");
    // Past `expires_at` (the flag's 200 ms), by a wide margin but well before the sweep.
    let expired = rfc3339_ms(q["expires_at"].as_str().expect("expires_at")) + 100;
    while now_ms() < expired {
        tokio::time::sleep(Duration::from_millis(expired - now_ms())).await;
    }
    assert_eq!(a.err(use_it).await, "quote_expired");
    s.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// 6. A crash between the processor's capture and the ledger entry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_capture_and_its_ledger_entry_captures_once() {
    let s = Dispatchd::builder("crash-after-capture")
        .flags(&flags(&[]))
        .env("DISPATCH_TEST_CRASH_AFTER", "capture")
        .start()
        .await;
    let (did, dtoken) = s.driver("Dana", "economy").await;
    let (rid, rtoken) = s.rider("Riley").await;
    let mut d = s.connect("driver", &dtoken).await;
    d.welcome().await;
    d.go_online(north_of(PICKUP, 200.0)).await;
    let mut r = s.connect("rider", &rtoken).await;
    r.welcome().await;
    let q = s.quote(&rtoken, PICKUP, DROPOFF, "economy").await;
    let fare = q["fare_cents"].as_i64().unwrap();
    let t = request_quoted(&mut r, q["quote_id"].as_str().unwrap()).await;
    for cmd in ["accept", "arrived", "start_trip"] {
        by_driver(&mut d, &mut r, &t.trip_id, cmd).await;
    }

    // The process dies after the capture: the connection drops, and no reply comes.
    let req = d
        .send_req(json!({"type": "complete_trip", "trip_id": t.trip_id}))
        .await;
    d.closed_with().await;
    let mut s = s;
    let st = s.exited_within(Duration::from_secs(30)).await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(6),
        "dispatchd must abort (SIGABRT) after the capture: {st}\n--- log ---\n{}",
        s.log_text()
    );
    let told = d.pending().iter().any(|m| match m {
        ServerMessage::Ack { req: r } | ServerMessage::Error { req: Some(r), .. } => *r == req,
        ServerMessage::TripUpdate { trip, .. } => trip.state == TripState::Completed,
        _ => false,
    });
    assert!(
        !told,
        "nothing about the completion was sent: {:?}",
        d.pending()
    );
    r.closed_with().await;
    assert!(
        !r.pending()
            .iter()
            .any(|m| matches!(m, ServerMessage::Receipt { .. })),
        "{:?}",
        r.pending()
    );
    let again = s.again().without_env("DISPATCH_TEST_CRASH_AFTER");
    drop(s);

    // Restarted without the hook: the trip is still in progress, and the retry completes
    // it with the capture the processor already made.
    let s = again.start().await;
    let mut d = s.connect("driver", &dtoken).await;
    match d.welcome().await {
        ServerMessage::Welcome {
            status,
            trip: Some(w),
            ..
        } => assert_eq!(
            (status, w.trip_id.as_str(), w.state),
            (
                Some(DriverStatus::OnTrip),
                t.trip_id.as_str(),
                TripState::InProgress
            )
        ),
        m => panic!("the driver's welcome shows no trip: {m:?}"),
    }
    let mut r = s.connect("rider", &rtoken).await;
    r.welcome().await;
    let (rt, dt) = by_driver(&mut d, &mut r, &t.trip_id, "complete_trip").await;
    assert_eq!((rt.fare_cents, dt.fare_cents), (Some(fare), Some(fare)));
    assert_eq!(receipt(&mut r).await.1, fare);

    let v = aget(&s, &format!("/admin/trips/{}", t.trip_id)).await;
    let p = v["payments"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        steps(p),
        ["authorize", "capture"],
        "exactly one capture: {v}"
    );
    let c = commission(fare, BPS);
    let l = aget(&s, "/admin/ledger").await;
    assert_eq!(
        (&l["balanced"], &l["total_cents"], &l["accounts"]),
        (
            &json!(true),
            &json!(0),
            &json!({"platform": c, "clearing": 0, "authorizations": 0, "riders": -fare,
                "rider_holds": 0, "drivers": fare - c})
        ),
        "{l}"
    );
    let e = s.get_ok("/v1/drivers/me/earnings", &dtoken).await;
    assert_eq!(
        (&e["driver_id"], &e["total"]),
        (
            &json!(did),
            &json!({"trips": 1, "earnings_cents": fare - c})
        ),
        "{e}"
    );
    assert_eq!(
        aget(&s, &format!("/admin/ledger?account=rider:{rid}")).await["balance_cents"],
        json!(-fare)
    );
}
