//! Tokens from the operator's identity provider, against the real binary: keys the test
//! makes with the `openssl` command (RSA 2048 and EC P-256), a JWKS served on loopback by
//! a small axum server in the test, and JWTs signed with `jsonwebtoken` (`support/idp.rs`).
//!
//! Covered: a whole ride over real WebSockets with JWTs only (RS256 rider, ES256 driver,
//! `--auth-own-tokens false`); every bad token 401 exactly like an unknown one, counted
//! by reason; unknown kids refreshing the key set at most at the set rate; rotation (a
//! new kid accepted through the unknown-kid refresh, a removed key refused after the
//! scheduled refresh); an unreachable identity provider (503 for JWTs, own tokens fine);
//! minted tokens refused once `--auth-own-tokens false`.

use std::sync::atomic::Ordering;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dispatch_tests::{Client, Dispatchd, Endpoint, assert_error_body, eventually, now_ms};
use dispatch_tests::{DROPOFF, PICKUP, Ride};
use dispatch_transport::wire::TripState;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

#[path = "support/idp.rs"]
mod idp;
use idp::*;

/// A request that needs a token: 404 for a known caller (no such trip), else the error.
async fn probe(s: &Endpoint, token: &str) -> (u16, Value) {
    s.get("/v1/trips/trp_nope", Some(token)).await
}

async fn register_rider(s: &Endpoint, jwt: &str) -> (u16, Value) {
    s.post(
        "/v1/riders",
        Some(jwt),
        json!({"name": "Riley", "phone": "+1 555 0100"}),
    )
    .await
}

async fn register_driver(s: &Endpoint, jwt: &str) -> (u16, Value) {
    s.post(
        "/v1/drivers",
        Some(jwt),
        json!({"name": "Dana", "vehicle": {"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": "economy", "seats": 4}}),
    )
    .await
}

fn rejected(reason: &str) -> String {
    format!("dispatch_auth_rejected_total{{reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ride_completes_with_identity_provider_tokens_only() {
    let (rsa, ec) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"));
    let idp = Idp::serve(&[&rsa, &ec]).await;
    let s = Dispatchd::start("jwt-ride", &idp.flags(&["--auth-own-tokens", "false"])).await;
    let rider = rsa.sign(&claims("rider", "riley-1"));
    let driver = ec.sign(&claims("driver", "dana-1"));

    // Valid, but not registered yet.
    let (st, v) = probe(&s, &rider).await;
    assert_error_body(st, &v, 403, "forbidden");
    // No minted tokens: registering without the identity provider's token is refused.
    let (st, v) = s
        .post(
            "/v1/riders",
            None,
            json!({"name": "X", "phone": "+1 555 0100"}),
        )
        .await;
    assert_error_body(st, &v, 401, "unauthorized");
    // A rider's token registers no driver.
    let (st, v) = register_driver(&s, &rider).await;
    assert_error_body(st, &v, 403, "forbidden");

    let (st, v) = register_rider(&s, &rider).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v, json!({"rider_id": "rdr_riley-1"}), "no token is minted");
    let (st, v) = register_rider(&s, &rider).await;
    assert_error_body(st, &v, 409, "conflict");
    let (st, v) = register_driver(&s, &driver).await;
    assert_eq!((st, &v), (201, &json!({"driver_id": "drv_dana-1"})));

    // A driver's token opens no rider session.
    let (st, v) = Client::try_connect(&s.ws_url("/v1/ws/rider"), Some(&driver))
        .await
        .err()
        .expect("refused");
    assert_error_body(st, &v, 403, "forbidden");

    let mut d = s.connect("driver", &driver).await;
    d.welcome().await;
    d.go_online(dispatch_tests::north_of(PICKUP, 200.0)).await;
    let mut r = s.connect("rider", &rider).await;
    r.welcome().await;
    let trip = r.request_ride(PICKUP, DROPOFF, "economy").await;
    let offer = d.offer().await;
    assert_eq!(offer.trip_id, trip.trip_id);
    let mut ride = Ride {
        driver_id: "drv_dana-1".into(),
        driver_token: driver.clone(),
        d,
        rider_id: "rdr_riley-1".into(),
        rider_token: rider.clone(),
        r,
        trip,
        offer,
    };
    ride.advance(TripState::Completed).await;
    let t = s.trip(ride.trip_id(), &rider).await;
    assert_eq!(t.state, TripState::Completed);
    assert_eq!(t.rider_id, "rdr_riley-1");
    assert_eq!(t.driver_id.as_deref(), Some("drv_dana-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_like_an_unknown_one_and_counted() {
    let (rsa, ec) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"));
    let other = Signer::rsa("rsa-1"); // same kid, another key
    let idp = Idp::serve(&[&rsa, &ec]).await;
    let s = Dispatchd::start("jwt-bad", &idp.flags(&[])).await;
    let good = rsa.sign(&claims("rider", "riley-2"));
    assert_eq!(register_rider(&s, &good).await.0, 201);
    assert_eq!(probe(&s, &good).await.0, 404, "the good token works");
    let (st, unknown) = probe(&s, "tok_not-a-token").await;
    assert_error_body(st, &unknown, 401, "unauthorized");

    let now = now_ms() / 1000;
    let with = |patch: Value| {
        let mut c = claims("rider", "riley-2");
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let unsigned = |alg: &str| {
        let head =
            URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT", "kid": "rsa-1"}).to_string());
        let body = URL_SAFE_NO_PAD.encode(claims("rider", "riley-2").to_string());
        format!("{head}.{body}.")
    };
    let hs256 = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &h,
            &claims("rider", "riley-2"),
            &EncodingKey::from_secret(&rsa.public_pem),
        )
        .unwrap()
    };
    let es256_on_rsa_kid = {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&h, &claims("rider", "riley-2"), &ec.key).unwrap()
    };
    let unknown_kid = other.sign_as("nobody", &claims("rider", "riley-2"));
    let cases: Vec<(&str, String)> = vec![
        ("expired", rsa.sign(&with(json!({"exp": now - 3600})))),
        ("not_yet_valid", rsa.sign(&with(json!({"nbf": now + 3600})))),
        ("bad_signature", other.sign(&claims("rider", "riley-2"))),
        (
            "wrong_issuer",
            rsa.sign(&with(json!({"iss": "https://evil.example"}))),
        ),
        (
            "wrong_audience",
            rsa.sign(&with(json!({"aud": "someone-else"}))),
        ),
        ("wrong_algorithm", unsigned("none")),
        ("wrong_algorithm", hs256),
        ("wrong_algorithm", es256_on_rsa_kid),
        ("unknown_kid", unknown_kid),
        ("claims", rsa.sign(&with(json!({"role": "admin"})))),
        ("claims", rsa.sign(&with(json!({"sub": "a/../b"})))),
        ("malformed", "a.b.c".to_owned()),
    ];
    for (reason, token) in cases {
        let before = s.metric_value(&rejected(reason)).await;
        let (st, v) = probe(&s, &token).await;
        assert_eq!(
            (st, &v),
            (401, &unknown),
            "{reason}: the same answer as an unknown token"
        );
        let (st, v) = Client::try_connect(&s.ws_url("/v1/ws/rider"), Some(&token))
            .await
            .err()
            .expect("refused");
        assert_eq!((st, &v), (401, &unknown), "{reason}: the upgrade too");
        assert_eq!(
            s.metric_value(&rejected(reason)).await,
            before + 2.0,
            "{reason} counted"
        );
    }
    assert_eq!(probe(&s, &good).await.0, 404, "the good token still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kids_refresh_the_key_set_at_most_at_the_set_rate() {
    let rsa = Signer::rsa("rsa-1");
    let idp = Idp::serve(&[&rsa]).await;
    let s = Dispatchd::start(
        "jwt-flood",
        &idp.flags(&[
            "--auth-jwt-unknown-kid-refresh-ms",
            "3600000",
            "--auth-jwt-refresh-ms",
            "3600000",
        ]),
    )
    .await;
    let good = rsa.sign(&claims("rider", "riley-3"));
    // The first fetch (at start) is done once the good token registers.
    assert_eq!(register_rider(&s, &good).await.0, 201);
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1);
    let forger = Signer::rsa("x");
    for i in 0..20 {
        let t = forger.sign_as(&format!("kid-{i}"), &claims("rider", "riley-3"));
        let (st, v) = probe(&s, &t).await;
        assert_error_body(st, &v, 401, "unauthorized");
    }
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        1,
        "no fetch for the flood"
    );
    let bound = "dispatch_bound_hits_total{bound=\"jwks_refresh_rate\"}";
    assert_eq!(s.metric_value(bound).await, 20.0);
    assert_eq!(s.metric_value(&rejected("unknown_kid")).await, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_is_fetched_on_its_kid_and_a_removed_one_dropped_on_schedule() {
    let (old, new) = (Signer::rsa("old"), Signer::rsa("new"));
    let old_token = old.sign(&claims("rider", "riley-4"));
    let new_token = new.sign(&claims("rider", "riley-4"));

    // The schedule is an hour away: only the unknown kid can fetch the new key.
    let idp = Idp::serve(&[&old]).await;
    let s = Dispatchd::start(
        "jwt-rotate-kid",
        &idp.flags(&[
            "--auth-jwt-refresh-ms",
            "3600000",
            "--auth-jwt-unknown-kid-refresh-ms",
            "0",
        ]),
    )
    .await;
    assert_eq!(register_rider(&s, &old_token).await.0, 201);
    idp.publish(&[&old, &new]);
    assert_eq!(
        probe(&s, &new_token).await.0,
        404,
        "the new kid is fetched and accepted"
    );
    let fetched = "dispatch_jwks_fetches_total{result=\"ok\",trigger=\"unknown_kid\"}";
    assert_eq!(s.metric_value(fetched).await, 1.0);
    assert_eq!(
        probe(&s, &old_token).await.0,
        404,
        "the old key is still published"
    );
    drop(s);

    // Unknown kids never fetch here: only the schedule can drop the old key.
    let idp = Idp::serve(&[&old, &new]).await;
    let s = Dispatchd::start(
        "jwt-rotate-schedule",
        &idp.flags(&[
            "--auth-jwt-refresh-ms",
            "300",
            "--auth-jwt-unknown-kid-refresh-ms",
            "3600000",
        ]),
    )
    .await;
    assert_eq!(register_rider(&s, &old_token).await.0, 201);
    assert_eq!(probe(&s, &new_token).await.0, 404);
    idp.publish(&[&new]);
    eventually("the old key dropped by a scheduled refresh", || async {
        (probe(&s, &old_token).await.0 == 401).then_some(())
    })
    .await;
    assert_eq!(probe(&s, &new_token).await.0, 404, "the new key stays");
    assert!(s.metric_value(&rejected("unknown_kid")).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_identity_provider_fails_jwts_only() {
    let rsa = Signer::rsa("rsa-1");
    // Nothing listens here: keys were never loaded.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks", closed.local_addr().unwrap());
    drop(closed);
    let flags = [
        "--auth-jwt-jwks-url",
        &url,
        "--auth-jwt-issuer",
        ISSUER,
        "--auth-jwt-audience",
        AUDIENCE,
        "--auth-jwt-fetch-timeout-ms",
        "500",
    ];
    let s = Dispatchd::start("jwt-down", &flags).await;
    let jwt = rsa.sign(&claims("rider", "riley-5"));
    let (st, v) = register_rider(&s, &jwt).await;
    assert_error_body(st, &v, 503, "unavailable");
    let (st, v) = probe(&s, &jwt).await;
    assert_error_body(st, &v, 503, "unavailable");
    assert!(s.metric_value(&rejected("keys_unavailable")).await >= 2.0);
    let (_, own) = s.rider("Own").await;
    assert_eq!(probe(&s, &own).await.0, 404, "own tokens unaffected");
    drop(s);

    // Keys loaded, then the identity provider fails: the keys held keep working, and an
    // unknown kid cannot be resolved (503, not 401).
    let idp = Idp::serve(&[&rsa]).await;
    let s = Dispatchd::start(
        "jwt-down-later",
        &idp.flags(&["--auth-jwt-unknown-kid-refresh-ms", "0"]),
    )
    .await;
    assert_eq!(register_rider(&s, &jwt).await.0, 201);
    idp.mode.store(FAIL, Ordering::SeqCst);
    let stranger = Signer::rsa("rsa-2").sign(&claims("rider", "riley-5"));
    let (st, v) = probe(&s, &stranger).await;
    assert_error_body(st, &v, 503, "unavailable");
    assert_eq!(
        probe(&s, &jwt).await.0,
        404,
        "the cached key still verifies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_tokens_are_refused_once_turned_off_and_jwt_riders_survive_a_restart() {
    let rsa = Signer::rsa("rsa-1");
    let idp = Idp::serve(&[&rsa]).await;
    let s = Dispatchd::start("jwt-own", &idp.flags(&[])).await;
    let (_, own) = s.rider("Own").await;
    assert_eq!(probe(&s, &own).await.0, 404, "own tokens work beside JWTs");
    let jwt = rsa.sign(&claims("rider", "riley-6"));
    assert_eq!(register_rider(&s, &jwt).await.0, 201);
    let again = s.again().flags(&["--auth-own-tokens", "false"]);
    s.stop().await;
    let s = again.start().await;
    let (st, v) = probe(&s, &own).await;
    let (_, unknown) = probe(&s, "tok_not-a-token").await;
    assert_eq!((st, &v), (401, &unknown), "a minted token is now unknown");
    assert_eq!(s.metric_value(&rejected("own_tokens_off")).await, 2.0);
    assert_eq!(probe(&s, &jwt).await.0, 404, "the JWT rider was recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_set_that_hangs_or_is_too_large_is_cut_off() {
    let rsa = Signer::rsa("rsa-1");
    let jwt = rsa.sign(&claims("rider", "riley-7"));
    for (mode, name) in [(HANG, "jwt-hang"), (HUGE, "jwt-huge")] {
        let idp = Idp::serve(&[&rsa]).await;
        idp.mode.store(mode, Ordering::SeqCst);
        let s = Dispatchd::start(
            name,
            &idp.flags(&[
                "--auth-jwt-fetch-timeout-ms",
                "300",
                "--auth-jwt-unknown-kid-refresh-ms",
                "0",
            ]),
        )
        .await;
        // Answered (within the client's own timeout), and 503: the keys never loaded.
        let (st, v) = register_rider(&s, &jwt).await;
        assert_error_body(st, &v, 503, "unavailable");
        // The fetch at start or the one the token asked for: either is cut off and counted.
        eventually(&format!("{name}: a failed fetch counted"), || async {
            let mut failed = 0.0;
            for trigger in ["schedule", "unknown_kid"] {
                let series = format!(
                    "dispatch_jwks_fetches_total{{result=\"error\",trigger=\"{trigger}\"}}"
                );
                failed += s.metric_value(&series).await;
            }
            (failed >= 1.0).then_some(())
        })
        .await;
        // Served properly again, the same token gets in.
        idp.mode.store(SERVE, Ordering::SeqCst);
        let (st, v) = register_rider(&s, &jwt).await;
        assert_eq!(st, 201, "{name}: {v}");
    }
}
