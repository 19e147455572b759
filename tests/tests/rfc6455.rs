//! The WebSocket layer as RFC 6455 has it, seen by a real client (tokio-tungstenite):
//! a text frame that is not UTF-8 fails the connection with 1007 and counts as a bad
//! message (8.1, 7.4.1); a client's close is answered with a close (5.5.1), so an app
//! that signs off normally sees its own code come back, not 1006.

use dispatch_tests::{Client, TestServer};
use dispatch_transport::wire::{DriverStatus, ServerMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Frames the server counts as bad messages (kind `invalid` of the session group).
const INVALID: &str = "dispatch_actor_messages_total{group=\"session\",kind=\"invalid\"}";

/// A `go_online` with a lone continuation byte, an overlong `/` and 0xff in a string: not UTF-8.
fn not_utf8() -> Vec<u8> {
    let mut b = br#"{"type": "go_online", "x": ""#.to_vec();
    b.extend_from_slice(&[0x80, 0xc0, 0xaf, 0xff]);
    b.extend_from_slice(br#""}"#);
    assert!(std::str::from_utf8(&b).is_err());
    b
}

/// A text frame carrying `bytes` as they are (tungstenite's `Message::Text` holds UTF-8
/// only, so the frame is built by hand).
fn raw_text(bytes: Vec<u8>) -> Message {
    Message::Frame(Frame::message(bytes, OpCode::Data(Data::Text), true))
}

/// A server with one driver, Dana, online.
async fn with_dana() -> (TestServer, Client) {
    let s = TestServer::start(&[]).await;
    let (_, d) = s.online_driver("Dana", "economy", 45.51, -73.56).await;
    (s, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_closes_with_1007_and_counts_as_a_bad_message() {
    let s = TestServer::start(&[]).await;
    let (_, mut bystander) = s.online_driver("Bea", "economy", 45.50, -73.57).await;
    let (_, dtoken, mut d) = s
        .online_driver_token("Dana", "economy", 45.51, -73.56)
        .await;
    let (_, rtoken, mut r) = s.connected_rider("Riley").await;
    s.wait_sessions("driver", 2).await;
    s.wait_sessions("rider", 1).await;
    let before = s.metric(INVALID).await.unwrap_or(0.0);

    for (who, c) in [("driver", &mut d), ("rider", &mut r)] {
        c.send_raw(raw_text(not_utf8())).await.unwrap();
        assert_eq!(c.closed_with().await, Some(1007), "{who}");
        assert!(c.pending().is_empty(), "{who}: {:?}", c.pending());
    }
    s.wait_sessions("driver", 1).await;
    s.wait_sessions("rider", 0).await;
    assert_eq!(s.metric(INVALID).await.unwrap_or(0.0), before + 2.0);

    // Nothing else changed: the other session is served, and the closed driver (in its
    // grace period) and rider come back as they were.
    bystander.alive().await;
    let mut again = Client::driver(&s, &dtoken).await.unwrap();
    match again.welcome().await {
        ServerMessage::Welcome { status, .. } => {
            assert_eq!(status, Some(DriverStatus::Available))
        }
        _ => unreachable!(),
    }
    again.alive().await;
    let mut r = Client::rider(&s, &rtoken).await.unwrap();
    r.welcome().await;
    r.ok(json!({"type": "location", "lat": 45.5, "lng": -73.56, "ts": 0}))
        .await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_whose_reason_is_not_utf8_closes_with_1007() {
    let (s, mut d) = with_dana().await;
    // Code 1000, reason 0xff: a close frame the client library would not build itself.
    let header = FrameHeader {
        opcode: OpCode::Control(Control::Close),
        ..FrameHeader::default()
    };
    let frame = Frame::from_payload(header, Bytes::from_static(&[0x03, 0xe8, 0xff]));
    d.send_raw(Message::Frame(frame)).await.unwrap();
    assert_eq!(d.closed_with().await, Some(1007));
    s.wait_sessions("driver", 0).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_close_is_answered_with_a_close_echoing_its_code() {
    let (s, mut d) = with_dana().await;
    let (_, _, mut r) = s.connected_rider("Riley").await;

    // A normal sign-off (1000) and an app's own code (4000): each comes back, so the
    // app sees a clean close and never 1006 (no close frame).
    for (who, c, code) in [("driver", &mut d, 1000), ("rider", &mut r, 4000)] {
        c.send_raw(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        })))
        .await
        .unwrap();
        assert_eq!(c.closed_with().await, Some(code), "{who}");
    }
    s.wait_sessions("driver", 0).await;
    s.wait_sessions("rider", 0).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_while_the_server_is_sending_is_still_answered() {
    let (s, mut d) = with_dana().await;
    // Replies still on their way when the close arrives: the answer comes after them.
    for _ in 0..20 {
        d.send_req(json!({"type": "go_online"})).await;
    }
    d.send_raw(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    })))
    .await
    .unwrap();
    assert_eq!(d.closed_with().await, Some(1000));
    s.wait_sessions("driver", 0).await;
    s.stop().await.unwrap();
}
