//! The per-address limit on registration (the routes that need no token), over real HTTP
//! against the real binary: a burst, then 429 `rate_limited` counted; another address
//! unaffected; `X-Forwarded-For` ignored from an untrusted peer and read from a trusted
//! proxy (the right-most untrusted hop), a malformed one falling back to the peer.
//!
//! The rate is one registration per 1000 s, so no refill can happen during a test however
//! slow the machine: only the burst counts.

use std::net::IpAddr;

use dispatch_tests::{Dispatchd, Endpoint, assert_error_body};
use serde_json::{Value, json};

const SLOW_RATE: [&str; 4] = ["--register-rate-per-s", "0.001", "--register-burst", "3"];
const REFUSED: &str = "dispatch_bound_hits_total{bound=\"register_rate\"}";

/// A rider registration from `e`, with `X-Forwarded-For: xff` if given.
async fn register(e: &Endpoint, xff: Option<&str>) -> (u16, Value, Option<String>) {
    let mut r = e
        .http
        .post(e.url("/v1/riders"))
        .json(&json!({"name": "Riley", "phone": "+1 555 0100"}));
    if let Some(x) = xff {
        r = r.header("x-forwarded-for", x);
    }
    let resp = r.send().await.expect("registration");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, resp.json().await.expect("a JSON body"), retry)
}

/// The same server seen from another loopback address.
fn from(e: &Endpoint, ip: &str) -> Endpoint {
    let http = reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    Endpoint::new(e.addr, http)
}

/// `n` registrations that must all pass, then one that must be refused.
async fn burst_then_refused(e: &Endpoint, xff: Option<&str>, n: usize) {
    for i in 0..n {
        let (st, v, _) = register(e, xff).await;
        assert_eq!(st, 201, "registration {i} of the burst (xff {xff:?}): {v}");
    }
    let (st, v, retry) = register(e, xff).await;
    assert_error_body(st, &v, 429, "rate_limited");
    let retry: u64 = retry.expect("a Retry-After").parse().unwrap();
    assert!(retry >= 1, "{retry}");
}

/// Three registrations from `e`, each claiming another client in `X-Forwarded-For`, then
/// a fourth refused: the header was not believed.
async fn forged_forwarded_for_is_refused(e: &Endpoint) {
    for i in 0..3 {
        let (st, v, _) = register(e, Some(&format!("203.0.113.{i}"))).await;
        assert_eq!(st, 201, "{v}");
    }
    let (st, v, _) = register(e, Some("203.0.113.99")).await;
    assert_error_body(st, &v, 429, "rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_limit_is_refused_and_counted_per_address() {
    let s = Dispatchd::start("ratelimit", &SLOW_RATE).await;
    assert_eq!(s.metric_value(REFUSED).await, 0.0, "created at zero");
    burst_then_refused(&s, None, 3).await;
    assert_eq!(s.metric_value(REFUSED).await, 1.0);
    // Drivers register through the same limit.
    let (st, v) = s
        .post(
            "/v1/drivers",
            None,
            json!({"name": "Dana", "vehicle": {"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": "economy", "seats": 4}}),
        )
        .await;
    assert_error_body(st, &v, 429, "rate_limited");
    assert_eq!(s.metric_value(REFUSED).await, 2.0);
    // Another address has its own burst.
    burst_then_refused(&from(&s, "127.0.0.2"), None, 3).await;
    assert_eq!(s.metric_value(REFUSED).await, 3.0);
    // Routes with a token are not limited.
    let (_, token) = from(&s, "127.0.0.3").rider("Quinn").await;
    for _ in 0..5 {
        let (st, v) = s.get("/v1/trips/trp_nope", Some(&token)).await;
        assert_error_body(st, &v, 404, "not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_ignored_from_an_untrusted_peer() {
    let s = Dispatchd::start("ratelimit-untrusted", &SLOW_RATE).await;
    // Each request claims another client; the peer is what counts.
    forged_forwarded_for_is_refused(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_names_the_client_behind_a_trusted_proxy() {
    let mut flags = SLOW_RATE.to_vec();
    flags.extend(["--trusted-proxy", "127.0.0.1/32"]);
    let s = Dispatchd::start("ratelimit-trusted", &flags).await;
    burst_then_refused(&s, Some("203.0.113.1"), 3).await;
    // Another client behind the same proxy has its own burst; a trusted hop on the
    // right is skipped, and a forged hop on the left is not believed.
    burst_then_refused(&s, Some("198.51.100.7, 203.0.113.2, 127.0.0.1"), 3).await;
    let (st, v, _) = register(&s, Some("203.0.113.2")).await;
    assert_error_body(st, &v, 429, "rate_limited");
    // A malformed header falls back to the proxy's own address, which has its burst.
    burst_then_refused(&s, Some("203.0.113.3, not-an-address"), 3).await;
    let (st, v, _) = register(&s, None).await;
    assert_error_body(st, &v, 429, "rate_limited");
    // An untrusted peer's header is still ignored on the same server.
    forged_forwarded_for_is_refused(&from(&s, "127.0.0.2")).await;
    assert_eq!(s.metric_value(REFUSED).await, 6.0);
}
