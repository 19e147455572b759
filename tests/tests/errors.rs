//! Every error code of PROTOCOL.md's table, reached over the real server, and the rules
//! around replies: `req` correlation, bad messages, limits.
//!
//! `internal` is the one code not reached here: the server sends it only for a bug (a
//! command whose reply was lost because an actor died, an actor missing from the
//! registry, a failed metrics encoding), and nothing a client can send causes one.

use std::time::Duration;

use dispatch_tests::{Client, TestServer, WAIT, assert_error_body, north_of, now_ms, rfc3339_ms};
use dispatch_transport::wire::ServerMessage;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const PICKUP: (f64, f64) = (45.5030, -73.5690);
const DROPOFF: (f64, f64) = (45.5200, -73.5800);

/// The next message, which must be an error: (req, code).
async fn next_error(c: &mut Client) -> (Option<u64>, String) {
    match c.next().await {
        ServerMessage::Error { req, code, message } => {
            assert!(!message.is_empty());
            (req, code)
        }
        m => panic!("expected an error, got {m:?}"),
    }
}

/// Sends `n` malformed frames, each answered `bad_request`.
async fn bad_burst(c: &mut Client, n: usize) {
    for _ in 0..n {
        c.send_raw(Message::Text("{".into())).await.unwrap();
        assert_eq!(next_error(c).await, (None, "bad_request".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_typed_errors_and_the_session_lives_on() {
    let s = TestServer::start(&[]).await;
    let (_, mut d) = s.online_driver("Dana", "economy", 45.5, -73.56).await;

    // Malformed JSON, a non-object, a mistyped `req`, a binary frame: no readable `req`.
    for raw in [
        "{",
        "[1, 2]",
        "\"go_online\"",
        r#"{"req": "x", "type": "go_online"}"#,
    ] {
        d.send_raw(Message::Text(raw.into())).await.unwrap();
        assert_eq!(
            next_error(&mut d).await,
            (None, "bad_request".into()),
            "{raw}"
        );
    }
    d.send_raw(Message::Binary(br#"{"type":"go_online"}"#.to_vec().into()))
        .await
        .unwrap();
    assert_eq!(next_error(&mut d).await, (None, "bad_request".into()));

    // A missing or mistyped field, with the `req` echoed.
    for bad in [
        json!({"type": "accept"}),
        json!({"type": "accept", "trip_id": 7}),
        json!({"type": "location", "lat": "north", "lng": 0.0, "ts": 1}),
        json!({"type": "location", "lat": 45.5, "lng": -73.5}),
        json!({"type": 5}),
        json!({"no_type": true}),
    ] {
        assert_eq!(d.err(bad.clone()).await, "bad_request", "{bad}");
    }

    // Types this role does not know.
    for t in ["fly", "request_ride", "cancel_ride", "welcome"] {
        assert_eq!(d.err(json!({"type": t})).await, "unknown_type", "{t}");
    }

    // Coordinates out of range.
    for (lat, lng) in [(91.0, 0.0), (-90.5, 0.0), (0.0, 180.5), (0.0, -200.0)] {
        assert_eq!(
            d.err(json!({"type": "location", "lat": lat, "lng": lng, "ts": 1}))
                .await,
            "invalid_location"
        );
    }

    // Unknown fields are ignored; the session is fine.
    d.ok(json!({"type": "go_online", "colour": "blue", "nested": {"a": 1}}))
        .await;
    d.alive().await;

    // The rider's side: its own unknown types, and bad coordinates in a request.
    let (_, _, mut r) = s.connected_rider("Riley").await;
    assert_eq!(
        r.err(json!({"type": "accept", "trip_id": "trp_1"})).await,
        "unknown_type"
    );
    assert_eq!(
        r.err(json!({"type": "request_ride", "pickup": {"lat": 91.0, "lng": 0.0}, "dropoff": {"lat": 1.0, "lng": 1.0}, "product": "economy"}))
            .await,
        "invalid_location"
    );
    assert_eq!(
        r.err(json!({"type": "request_ride", "pickup": {"lat": 1.0, "lng": 0.0}, "dropoff": {"lat": 1.0, "lng": 1.0}, "product": "boat"}))
            .await,
        "bad_request"
    );
    assert_eq!(
        r.err(json!({"type": "request_ride", "pickup": {"lat": 1.0, "lng": 0.0}}))
            .await,
        "bad_request"
    );
    assert_eq!(
        r.err(json!({"type": "request_ride", "quote_id": "qte_nope"}))
            .await,
        "not_found"
    );
    let m = r
        .reply_next(json!({"type": "location", "lat": 45.5, "lng": -73.5, "ts": 1}))
        .await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_req_is_answered_only_when_it_fails() {
    let s = TestServer::start(&[]).await;
    let (_, mut d) = s.online_driver("Dana", "economy", 45.5, -73.56).await;

    // Successes without `req`: silence. A failure without `req`: an error without `req`.
    d.send(json!({"type": "location", "lat": 45.5001, "lng": -73.56, "ts": 2}))
        .await;
    d.send(json!({"type": "go_online"})).await;
    d.send(json!({"type": "accept", "trip_id": "trp_nope"}))
        .await;
    assert_eq!(next_error(&mut d).await, (None, "not_found".into()));
    d.send(json!({"type": "accept"})).await;
    assert_eq!(next_error(&mut d).await, (None, "bad_request".into()));
    d.alive().await;

    // With `req`: exactly one reply each, in order, and nothing more.
    let r1 = d
        .send_req(json!({"type": "location", "lat": 45.5002, "lng": -73.56, "ts": 3}))
        .await;
    let r2 = d.send_req(json!({"type": "go_online"})).await;
    let r3 = d
        .send_req(json!({"type": "decline", "trip_id": "trp_nope"}))
        .await;
    assert_eq!(d.next().await, ServerMessage::Ack { req: r1 });
    assert_eq!(d.next().await, ServerMessage::Ack { req: r2 });
    assert_eq!(next_error(&mut d).await, (Some(r3), "not_found".into()));
    d.alive().await;

    // request_ride's one reply is the trip itself: no ack besides.
    let (_, _, mut r) = s.connected_rider("Riley").await;
    let req = r
        .send_req(json!({"type": "request_ride", "pickup": {"lat": PICKUP.0, "lng": PICKUP.1}, "dropoff": {"lat": DROPOFF.0, "lng": DROPOFF.1}, "product": "economy"}))
        .await;
    let m = r.next().await;
    assert!(
        matches!(&m, ServerMessage::TripUpdate { req: Some(q), trip } if *q == req && trip.version == 1),
        "{m:?}"
    );
    d.offer().await; // the trip now waits on this offer: nothing else is due to the rider
    let m = r
        .reply_next(json!({"type": "location", "lat": PICKUP.0, "lng": PICKUP.1, "ts": 1}))
        .await;
    assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
    // Without `req`, a failed request_ride still gets its error.
    r.send(json!({"type": "request_ride", "pickup": {"lat": PICKUP.0, "lng": PICKUP.1}, "dropoff": {"lat": DROPOFF.0, "lng": DROPOFF.1}, "product": "economy"}))
        .await;
    assert_eq!(next_error(&mut r).await, (None, "conflict".into()));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_is_too_large_and_the_session_lives_on() {
    let s = TestServer::start(&[]).await;
    let (_, mut d) = s.online_driver("Dana", "economy", 45.5, -73.56).await;

    // Exactly 16 KiB is still fine (unknown fields are ignored)...
    let frame = |len: usize| {
        let head = r#"{"type":"go_online","req":77,"pad":""#;
        let pad = "x".repeat(len - head.len() - 2);
        format!("{head}{pad}\"}}")
    };
    let ok = frame(16 * 1024);
    assert_eq!(ok.len(), 16 * 1024);
    d.send_raw(Message::Text(ok.into())).await.unwrap();
    assert_eq!(d.next().await, ServerMessage::Ack { req: 77 });
    // ...17 KiB is not.
    d.send_raw(Message::Text(frame(17 * 1024).into()))
        .await
        .unwrap();
    assert_eq!(next_error(&mut d).await, (None, "too_large".into()));
    d.alive().await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_pings_over_the_rate_are_rate_limited() {
    // The default 10 pings a second; few bad messages tolerated, to show that refused
    // pings are not counted as bad.
    let s = TestServer::start(&["--bad-message-limit", "5"]).await;
    let (_, token) = s.driver("Dana", "economy").await;
    let mut d = Client::driver(&s, &token).await.unwrap();
    d.welcome().await;

    // 70 pings at once: the first 10 (the burst) pass, many of the rest are refused. At
    // 10 a second the bucket refills far slower than a socket can carry 70 pings.
    let mut reqs = Vec::new();
    for i in 0..70 {
        let lat = 45.5 + f64::from(i) * 1e-5;
        reqs.push(
            d.send_req(json!({"type": "location", "lat": lat, "lng": -73.56, "ts": i}))
                .await,
        );
    }
    let mut limited = Vec::new();
    for _ in &reqs {
        match d.next().await {
            ServerMessage::Ack { .. } => {}
            ServerMessage::Error {
                req: Some(req),
                code,
                ..
            } if code == "rate_limited" => limited.push(req),
            m => panic!("unexpected reply {m:?}"),
        }
    }
    assert!(!limited.is_empty(), "no ping was rate limited");
    assert!(
        limited.iter().all(|r| !reqs[..10].contains(r)),
        "the burst of 10 must pass: {limited:?}"
    );
    // Refused pings are not bad messages: more than the limit of 5 did not close the session.
    assert!(limited.len() > 5, "only {} pings refused", limited.len());
    d.alive().await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_the_limit_of_bad_messages_closes_the_session_with_1008() {
    let s = TestServer::start(&[]).await; // 50 bad messages per 10 s
    let (_, mut d) = s.online_driver("Dana", "economy", 45.5, -73.56).await;
    for _ in 0..50 {
        d.send_raw(Message::Text("{".into())).await.unwrap();
    }
    for _ in 0..50 {
        assert_eq!(next_error(&mut d).await, (None, "bad_request".into()));
    }
    // 50 bad messages do not close a session...
    d.alive().await;
    // ...the 51st does.
    d.send_raw(Message::Text("{".into())).await.unwrap();
    assert_eq!(d.closed_with().await, Some(1008));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_counted_within_a_sliding_window() {
    let s =
        TestServer::start(&["--bad-message-limit", "5", "--bad-message-window-ms", "300"]).await;
    let (_, mut d) = s.online_driver("Dana", "economy", 45.5, -73.56).await;
    bad_burst(&mut d, 5).await;
    d.alive().await;
    // Once the window has passed (waiting the flag's own 300 ms, at least), the old ones
    // no longer count: 5 more are tolerated, where 10 in one window would close it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bad_burst(&mut d, 5).await;
    d.alive().await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_refused_at_the_upgrade() {
    let s = TestServer::start(&[]).await;
    let (_, dtoken) = s.driver("Dana", "economy").await;
    let (_, rtoken) = s.rider("Riley").await;
    let driver_url = s.ws_url("/v1/ws/driver");
    let rider_url = s.ws_url("/v1/ws/rider");
    let code = |v: &Value| v["error"]["code"].as_str().map(str::to_owned);

    for (url, token) in [
        (driver_url.clone(), None),
        (driver_url.clone(), Some("tok_not_a_real_token")),
        (rider_url.clone(), Some("tok_not_a_real_token")),
        (format!("{rider_url}?token=tok_nope"), None),
    ] {
        let (st, body) = Client::try_connect(&url, token).await.err().unwrap();
        assert_eq!(
            (st, code(&body)),
            (401, Some("unauthorized".into())),
            "{url}"
        );
    }
    let (st, body) = Client::try_connect(&driver_url, Some(&rtoken))
        .await
        .err()
        .unwrap();
    assert_eq!((st, code(&body)), (403, Some("forbidden".into())));
    let (st, body) = Client::try_connect(&rider_url, Some(&dtoken))
        .await
        .err()
        .unwrap();
    assert_eq!((st, code(&body)), (403, Some("forbidden".into())));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotes_expire_and_belong_to_one_rider() {
    let s = TestServer::start(&["--quote-ttl-ms", "50"]).await;
    let near = north_of(PICKUP, 200.0);
    let (_, mut d) = s.online_driver("Dana", "economy", near.0, near.1).await;
    let (_, atoken, mut a) = s.connected_rider("Ann").await;
    let (_, btoken, _b) = s.connected_rider("Bob").await;

    // Someone else's quote is forbidden, whether or not it has expired yet.
    let theirs = s.quote(&btoken, PICKUP, DROPOFF, "economy").await;
    assert_eq!(
        a.err(json!({"type": "request_ride", "quote_id": theirs["quote_id"]}))
            .await,
        "forbidden"
    );

    // An expired quote: wait until its own `expires_at` is a full TTL in the past.
    let q = s.quote(&atoken, PICKUP, DROPOFF, "economy").await;
    let expires = rfc3339_ms(q["expires_at"].as_str().unwrap());
    let wait = (expires + 50).saturating_sub(now_ms());
    assert!(
        wait <= 50 + 1_000,
        "expires_at {expires} is not about 50 ms away"
    );
    tokio::time::sleep(Duration::from_millis(wait)).await;
    assert_eq!(
        a.err(json!({"type": "request_ride", "quote_id": q["quote_id"]}))
            .await,
        "quote_expired"
    );
    // The failed requests started nothing: a trip priced now still works, at version 1.
    let t = a.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(d.offer().await.trip_id, t.trip_id);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_errors_have_their_status_and_code() {
    let s = TestServer::start(&[]).await;
    let (_, rtoken) = s.rider("Riley").await;
    let (_, dtoken) = s.driver("Dana", "economy").await;
    let good = json!({"pickup": {"lat": 45.5, "lng": -73.5}, "dropoff": {"lat": 45.6, "lng": -73.6}, "product": "economy"});
    let check = |(st, v): (u16, Value), want_st: u16, want: &str| {
        assert_error_body(st, &v, want_st, want);
    };

    check(
        s.post("/v1/quotes", Some(&rtoken), json!({"pickup": {"lat": 45.5, "lng": 200.0}, "dropoff": {"lat": 45.6, "lng": -73.6}, "product": "economy"}))
            .await,
        400,
        "invalid_location",
    );
    check(
        s.post(
            "/v1/quotes",
            Some(&rtoken),
            json!({"pickup": {"lat": 45.5, "lng": -73.5}, "product": "economy"}),
        )
        .await,
        400,
        "bad_request",
    );
    check(
        s.post("/v1/quotes", Some(&rtoken), json!({"pickup": {"lat": "x", "lng": -73.5}, "dropoff": {"lat": 45.6, "lng": -73.6}, "product": "boat"}))
            .await,
        400,
        "bad_request",
    );
    check(
        s.post("/v1/quotes", None, good.clone()).await,
        401,
        "unauthorized",
    );
    check(
        s.post("/v1/quotes", Some("tok_not_a_real_token"), good.clone())
            .await,
        401,
        "unauthorized",
    );
    let resp = s
        .http
        .post(s.url("/v1/quotes"))
        .header("authorization", format!("Basic {rtoken}"))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    check(
        s.post("/v1/quotes", Some(&dtoken), good.clone()).await,
        403,
        "forbidden",
    );
    check(
        s.get("/v1/trips/trp_does_not_exist", Some(&rtoken)).await,
        404,
        "not_found",
    );

    // A body over 16 KiB, with and without a Content-Length up front.
    let big = json!({"name": "x".repeat(17 * 1024), "phone": "+1 555 0100"}).to_string();
    let (st, ctype, body) = s
        .raw(reqwest::Method::POST, "/v1/riders", None, Some(big.clone()))
        .await;
    assert!(ctype.starts_with("application/json"), "{ctype}");
    check((st, serde_json::from_str(&body).unwrap()), 413, "too_large");
    // Chunked, so the server only learns the size while reading.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut req = format!(
        "POST /v1/riders HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        s.addr
    )
    .into_bytes();
    for c in big.as_bytes().chunks(1024) {
        req.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        req.extend_from_slice(c);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // The server may answer before it has read everything; a write error then is fine.
    let _ = sock.write_all(&req).await;
    let mut buf = Vec::new();
    let head = read_head(&mut sock, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // PROTOCOL.md: "REST: an HTTP status and `{"error": {"code": "...", "message": "..."}}`",
    // for the refusals of the HTTP layer too (no upgrade, no token, a repeated parameter).
    for (path, token) in [
        ("/v1/ws/driver", Some(&dtoken)),
        ("/v1/ws/rider", None),
        (
            "/v1/drivers/nearby?lat=45.5&lng=-73.5&lat=46",
            Some(&rtoken),
        ),
    ] {
        let (st, ctype, body) = s
            .raw(reqwest::Method::GET, path, token.map(String::as_str), None)
            .await;
        assert!((400..500).contains(&st), "{path}: {st}");
        assert!(
            ctype.starts_with("application/json"),
            "{path}: {ctype} {body:?}"
        );
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(v["error"]["code"].as_str().is_some(), "{path}: {body:?}");
    }
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_past_max_connections_are_unavailable() {
    let s = TestServer::start(&["--max-connections", "1"]).await;
    let (_, atoken) = s.driver("A", "economy").await;
    let (_, btoken) = s.driver("B", "economy").await;
    let mut a = Client::driver(&s, &atoken).await.unwrap();
    a.welcome().await;
    let (st, body) = Client::try_connect(&s.ws_url("/v1/ws/driver"), Some(&btoken))
        .await
        .err()
        .unwrap();
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (503, Some("unavailable"))
    );
    // The slot frees when A leaves.
    a.close().await;
    let mut b = dispatch_tests::eventually("a free connection slot", || async {
        Client::try_connect(&s.ws_url("/v1/ws/driver"), Some(&btoken))
            .await
            .ok()
    })
    .await;
    b.welcome().await;
    s.stop().await.unwrap();
}

/// Reads one HTTP/1.1 response head (through the blank line) from `sock`.
async fn read_head(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                return String::from_utf8(head).unwrap();
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("a response head in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_during_shutdown_is_unavailable() {
    let mut s = TestServer::start(&[]).await;
    let (_, _, mut r) = s.connected_rider("Riley").await;

    // A registration whose body the server is waiting for: `Expect: 100-continue` makes
    // it say so ("100 Continue") once the handler reads the body.
    let body = json!({"name": "Late", "phone": "+1 555 0100"}).to_string();
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/riders HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        s.addr,
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let cont = read_head(&mut sock, &mut buf).await;
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");

    // Shutdown begins: open sessions are closed with 1001 once the server is not ready.
    s.begin_stop();
    assert_eq!(r.closed_with().await, Some(1001));

    // The request finishes, refused as unavailable.
    sock.write_all(body.as_bytes()).await.unwrap();
    let head = read_head(&mut sock, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    while buf.len() < len {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, sock.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "body cut short");
        buf.extend_from_slice(&chunk[..n]);
    }
    let v: Value = serde_json::from_slice(&buf[..len]).unwrap();
    assert_eq!(v["error"]["code"], "unavailable", "{v}");
    s.stop().await.unwrap();
}
