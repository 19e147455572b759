//! A body over `--max-frame-bytes` gets its 413 even while the client is still sending it:
//! the server reads the rest and throws it away (up to 4 MiB, for at most 2 s) before it
//! answers, instead of closing a connection with unread bytes, which makes the kernel
//! reset it and the client lose the reply. Without that, the loop of full-speed 1 MiB
//! posts below failed within its first 20 requests (broken pipe or incomplete message)
//! in each of three runs.

use std::time::Duration;

use dispatch_tests::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `POST /v1/drivers` announcing `len` bytes (or chunked, announcing nothing), the
/// first part at once and the rest after a pause, and returns what came back.
async fn post_slowly(s: &TestServer, len: usize, chunked: bool) -> String {
    let addr = s.url("").trim_start_matches("http://").to_owned();
    let mut c = tokio::net::TcpStream::connect(addr.trim_end_matches('/'))
        .await
        .expect("connect");
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {len}")
    };
    let head = format!(
        "POST /v1/drivers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let part = |n: usize| {
        let body = vec![b'x'; n];
        if chunked {
            [format!("{n:x}\r\n").into_bytes(), body, b"\r\n".to_vec()].concat()
        } else {
            body
        }
    };
    let first = len / 4;
    c.write_all(&part(first)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = c.write_all(&part(len - first)).await;
    if chunked {
        let _ = c.write_all(b"0\r\n\r\n").await;
    }
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if reply.windows(4).any(|w| w == b"\r\n\r\n") && reply.ends_with(b"}}") {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("a reply within 10 s");
    assert!(read.is_ok() || !reply.is_empty(), "{read:?}: nothing read");
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_sent_slowly_still_gets_its_413() {
    let s = TestServer::start(&[]).await;
    for chunked in [false, true] {
        let reply = post_slowly(&s, 1 << 20, chunked).await;
        assert!(
            reply.starts_with("HTTP/1.1 413"),
            "chunked {chunked}: {reply:?}"
        );
        assert!(
            reply.contains("\"too_large\""),
            "chunked {chunked}: {reply}"
        );
    }
    // And at full speed, as an HTTP client sends it: every one of many gets its 413.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(1 << 20));
    let http = reqwest::Client::new();
    for i in 0..40 {
        let r = http
            .post(s.url("/v1/drivers"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert_eq!(r.status().as_u16(), 413, "request {i}");
    }
    // The server is fine afterwards.
    let (st, _) = s.get("/healthz", None).await;
    assert_eq!(st, 200);
    s.stop().await.unwrap();
}
