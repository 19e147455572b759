//! Limits that protect everyone else from one client: the per-session message rate, a
//! client that stops reading, and CORS for the console's origin.

use std::time::Duration;

use dispatch_tests::{TestServer, WAIT, eventually, north_of};
use dispatch_transport::wire::{ServerMessage, TripState};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const PICKUP: (f64, f64) = (45.5030, -73.5690);
const DROPOFF: (f64, f64) = (45.5200, -73.5800);

/// A whole ride between a fresh driver and rider: each step answered and seen by both.
async fn ride(s: &TestServer, tag: &str) {
    let near = north_of(PICKUP, 150.0);
    let (_, mut d) = s
        .online_driver(&format!("Driver {tag}"), "economy", near.0, near.1)
        .await;
    let (_, _, mut r) = s.connected_rider(&format!("Rider {tag}")).await;
    let t = r.request_ride(PICKUP, DROPOFF, "economy").await;
    assert_eq!(d.offer().await.trip_id, t.trip_id);
    for (cmd, to) in [
        ("accept", TripState::DriverAssigned),
        ("arrived", TripState::DriverArrived),
        ("start_trip", TripState::InProgress),
        ("complete_trip", TripState::Completed),
    ] {
        d.ok(json!({"type": cmd, "trip_id": t.trip_id})).await;
        r.trip_in(to).await;
    }
}

#[tokio::test]
async fn messages_over_the_session_rate_are_rate_limited_and_the_session_lives_on() {
    // 5 a second, bursts of 10. Of 40 sent at once: the burst is served, the next are
    // refused until a burst's worth has been, and the rest are read no faster than the
    // rate and served. Every one is answered once.
    let s = TestServer::start(&["--ws-messages-max-per-s", "5"]).await;
    let (_, _, mut r) = s.connected_rider("Rita").await;
    let n = 40u64;
    let started = std::time::Instant::now();
    for req in 1..=n {
        r.send(json!({"type": "location", "req": req, "lat": 45.5, "lng": -73.56, "ts": 0}))
            .await;
    }
    let (mut acks, mut limited) = (0, 0);
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < n as usize {
        match r.next().await {
            ServerMessage::Ack { req } => {
                acks += 1;
                assert!(answered.insert(req), "req {req} answered twice");
            }
            ServerMessage::Error {
                req: Some(req),
                code,
                ..
            } => {
                assert_eq!(code, "rate_limited");
                limited += 1;
                assert!(answered.insert(req), "req {req} answered twice");
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(limited >= 10, "{acks} acks, {limited} limited");
    assert!(acks >= 10, "{acks} acks, {limited} limited");
    // Never more served than the burst plus the rate over the time taken.
    assert!(
        acks as f64 <= 10.0 + 5.0 * elapsed + 1.0,
        "{acks} served in {elapsed:.2} s at 5 a second"
    );
    let paused = s
        .metric("dispatch_bound_hits_total{bound=\"ws_read_paused\"}")
        .await
        .unwrap_or(0.0);
    assert!(paused >= 1.0, "the session was never read more slowly");
    // Not bad messages: the session is open, and within the rate it is served again.
    // (Polled for at most WAIT: the bucket refills at 5 a second.)
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let req = r
            .send_req(json!({"type": "location", "lat": 45.5, "lng": -73.56, "ts": 0}))
            .await;
        match r.next().await {
            ServerMessage::Ack { req: got } if got == req => break,
            ServerMessage::Error { code, .. } if code == "rate_limited" => {}
            m => panic!("unexpected {m:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "still rate limited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = s
        .metric("dispatch_bound_hits_total{bound=\"ws_message_rate\"}")
        .await;
    assert!(hits.unwrap_or(0.0) >= limited as f64, "{hits:?}");
    s.stop().await.unwrap();
}

/// A rider session on a socket with a small receive buffer, so that a client that does
/// not read fills the server's side quickly.
async fn small_window_rider(
    s: &TestServer,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(s.addr).await.expect("connect");
    let mut req = s.ws_url("/v1/ws/rider").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("upgrade");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_others_ride_on() {
    let queue = 16;
    let s = TestServer::start(&[
        "--ws-outbound-queue-max",
        &queue.to_string(),
        "--ws-messages-max-per-s",
        "100000",
    ])
    .await;
    let (_, token) = s.rider("Stuck").await;
    let ws = small_window_rider(&s, &token).await;
    let (mut tx, mut rx) = ws.split();

    // It sends and never reads: every message is answered, and the answers pile up
    // until the socket is full and then its queue. Its sends stop being taken once the
    // server stops reading it.
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        for req in 1..=1_000_000u64 {
            // Paced, so that the server's writer keeps up with its queue until the socket
            // is full: then the queue fills because the client does not read.
            if req % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let m = json!({"type": "location", "req": req, "lat": 45.5, "lng": -73.56, "ts": 0});
            match tokio::time::timeout(
                Duration::from_secs(2),
                tx.send(Message::Text(m.to_string().into())),
            )
            .await
            {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        (sent, tx)
    });
    eventually("the stuck session is closed for its full queue", || async {
        let hits = s
            .metric("dispatch_bound_hits_total{bound=\"ws_outbound_queue\"}")
            .await
            .unwrap_or(0.0);
        (hits >= 1.0).then_some(())
    })
    .await;
    s.wait_sessions("rider", 0).await;
    let (sent, _tx) = tokio::time::timeout(WAIT, sender)
        .await
        .expect("the stuck client's sends end")
        .unwrap();
    assert!(sent > queue, "only {sent} messages sent");

    // Everyone else is served as usual meanwhile, with nothing held for the stuck one.
    ride(&s, "A").await;
    let backlog = s
        .metric("dispatch_mailbox_backlog_messages{group=\"session\"}")
        .await
        .unwrap_or(0.0);
    assert!(backlog <= 2.0 * queue as f64, "backlog {backlog}");

    // What the stuck client finds when it reads at last: the answers that fitted in the
    // buffers, then the end of the session (the 1008 close, if there was room for it).
    let mut read = 0u64;
    let end = loop {
        match tokio::time::timeout(WAIT, rx.next()).await {
            Err(_) => panic!("the stuck session is still open after {read} messages"),
            Ok(Some(Ok(Message::Text(_)))) => read += 1,
            Ok(Some(Ok(Message::Close(f)))) => break format!("close {:?}", f.map(|f| f.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => break format!("error {e}"),
            Ok(None) => break "end of stream".to_owned(),
        }
    };
    eprintln!("the stuck client sent {sent}, read {read}, then {end}");
    assert!(read < sent, "read {read} of {sent}: nothing was dropped");
    assert!(
        end.contains("1008") || end.contains("Policy") || !end.starts_with("close"),
        "ended with {end}"
    );
    s.stop().await.unwrap();
}

async fn preflight(s: &TestServer, path: &str, origin: &str) -> reqwest::Response {
    s.http
        .request(reqwest::Method::OPTIONS, s.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

fn allowed(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn cors_is_same_origin_only_unless_an_origin_is_configured() {
    // Default: no CORS headers for anyone, so a browser keeps to same-origin.
    let s = TestServer::start(&["--admin-token", "adm-cors-0123456789abcdef"]).await;
    let r = preflight(&s, "/admin/stats", "https://console.example.com").await;
    assert_eq!(allowed(&r), None);
    let r = s
        .http
        .get(s.url("/admin/stats"))
        .header("origin", "https://console.example.com")
        .bearer_auth("adm-cors-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!((r.status().as_u16(), allowed(&r)), (200, None));
    s.stop().await.unwrap();

    // Configured: that origin, and only it, may call with a bearer token.
    let console = "https://console.example.com";
    let s = TestServer::start(&[
        "--admin-token",
        "adm-cors-0123456789abcdef",
        "--cors-origin",
        console,
    ])
    .await;
    let r = preflight(&s, "/admin/trips/x/cancel", console).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(allowed(&r).as_deref(), Some(console));
    let h = |k: &str| {
        r.headers()
            .get(k)
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .unwrap_or_default()
    };
    assert!(h("access-control-allow-methods").contains("post"), "{r:?}");
    assert!(
        h("access-control-allow-headers").contains("authorization"),
        "{r:?}"
    );
    assert_eq!(h("access-control-allow-credentials"), "");
    for other in [
        "https://evil.example.com",
        "http://console.example.com",
        "https://console.example.com:8443",
        "null",
    ] {
        let r = preflight(&s, "/admin/stats", other).await;
        assert_eq!(allowed(&r), None, "{other} was allowed");
    }
    let r = s
        .http
        .get(s.url("/admin/stats"))
        .header("origin", console)
        .bearer_auth("adm-cors-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), allowed(&r).as_deref()),
        (200, Some(console))
    );
    // CORS lets a browser read an answer; it authorizes nothing: no token is still 401.
    let r = s
        .http
        .get(s.url("/admin/stats"))
        .header("origin", console)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_holds_at_most_its_in_flight_bound_in_actors() {
    // One message at a time may wait in actors: a burst of commands that each need the
    // store (an accept for a trip that does not exist) outruns its answers. The burst's
    // 300 answers are queued faster than a busy machine writes them, so the outbound
    // queue is made big enough for them all: this test is about the in-flight bound, not
    // about a client that stops reading (`a_client_that_stops_reading_is_disconnected…`).
    let s = TestServer::start(&[
        "--ws-in-flight-max",
        "1",
        "--ws-messages-max-per-s",
        "100000",
        "--ws-outbound-queue-max",
        "1024",
    ])
    .await;
    let near = north_of(PICKUP, 150.0);
    let (_, mut d) = s.online_driver("Dee", "economy", near.0, near.1).await;
    let n = 300u64;
    let first = d
        .send_req(json!({"type": "accept", "trip_id": "trp_none"}))
        .await;
    for _ in 1..n {
        d.send_req(json!({"type": "accept", "trip_id": "trp_none"}))
            .await;
    }
    let (mut not_found, mut shed) = (0, 0);
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < n as usize {
        match d.next().await {
            ServerMessage::Error {
                req: Some(req),
                code,
                message,
            } => {
                assert!((first..first + n).contains(&req), "req {req}");
                assert!(answered.insert(req), "req {req} answered twice");
                match code.as_str() {
                    "not_found" => not_found += 1,
                    "rate_limited" if message.contains("awaiting an answer") => shed += 1,
                    _ => panic!("{code}: {message}"),
                }
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    eprintln!("{not_found} served, {shed} shed while one was in flight");
    assert!(
        not_found >= 1 && shed >= 1,
        "{not_found} served, {shed} shed"
    );
    let hits = s
        .metric("dispatch_bound_hits_total{bound=\"ws_in_flight\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(hits, shed as f64);
    // Every answer given, nothing is held any more.
    assert_eq!(
        s.metric("dispatch_client_messages_in_flight").await,
        Some(0.0)
    );
    s.stop().await.unwrap();
}
