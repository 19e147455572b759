//! dispatchd's side: registering drivers over REST, their WebSocket sessions (welcome,
//! `location`, `go_online`), and reading `/metrics`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dispatch_transport::wire::{
    DriverMessage, DriverRegistered, Product, RegisterDriver, RegisterRider, RiderRegistered,
    ServerMessage, Vehicle,
};
use futures_util::SinkExt;
use futures_util::stream::{SplitSink, StreamExt};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::http::Http;

pub type Ws = WebSocketStream<TcpStream>;

/// How long the bench waits for any single reply before calling it a failure.
pub const REPLY_WAIT: Duration = Duration::from_secs(30);

/// What the sessions' readers saw that nobody asked for.
#[derive(Default, Debug)]
pub struct Counters {
    /// `error` frames without `req`, by code (a ping without `req` that fails).
    pub errors_unsolicited: std::sync::Mutex<HashMap<String, u64>>,
    /// Their total, cheap to read.
    pub errors_total: AtomicU64,
    /// Sessions the server closed (or that broke) while the bench held them.
    pub closed: AtomicU64,
    /// Other frames (offers, updates: none are expected).
    pub other: AtomicU64,
}

impl Counters {
    pub fn unsolicited(&self) -> HashMap<String, u64> {
        self.errors_unsolicited.lock().unwrap().clone()
    }
}

/// The reply to a message that carried `req`.
type Reply = (u64, Result<(), String>);

/// One driver's open session.
pub struct Session {
    sink: SplitSink<Ws, Message>,
    /// Set before the bench closes the session itself: the close that follows is expected.
    closing: Arc<AtomicBool>,
    replies: mpsc::UnboundedReceiver<Reply>,
    next_req: u64,
}

#[derive(Serialize)]
struct WithReq<'a> {
    #[serde(flatten)]
    msg: &'a DriverMessage,
    req: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn location(p: (f64, f64)) -> DriverMessage {
    DriverMessage::Location {
        lat: p.0,
        lng: p.1,
        heading: None,
        speed_mps: None,
        ts: now_ms(),
    }
}

impl Session {
    /// Sends `msg` without `req`: no reply unless it fails.
    pub async fn send(&mut self, msg: &DriverMessage) -> Result<()> {
        let text = serde_json::to_string(msg)?;
        self.sink.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Sends `msg` with a fresh `req` and waits for its reply (`ack` or `error`).
    pub async fn request(&mut self, msg: &DriverMessage) -> Result<()> {
        let req = self.next_req;
        self.next_req += 1;
        let text = serde_json::to_string(&WithReq { msg, req })?;
        self.sink.send(Message::Text(text.into())).await?;
        loop {
            let (r, res) = tokio::time::timeout(REPLY_WAIT, self.replies.recv())
                .await
                .map_err(|_| anyhow!("no reply to req {req} within {REPLY_WAIT:?}"))?
                .ok_or_else(|| anyhow!("the session ended while waiting for req {req}"))?;
            if r == req {
                return res.map_err(|code| anyhow!("req {req} was answered {code}"));
            }
        }
    }

    pub async fn close(mut self) {
        self.closing.store(true, Ordering::Relaxed);
        let _ = self.sink.send(Message::Close(None)).await;
        // The reader sees the server's close and ends; the channel closes with it.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.replies.recv().await.is_some() {}
        })
        .await;
    }
}

fn ws_config() -> WebSocketConfig {
    // Thousands of sessions in one process: small buffers, every message written at once.
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Opens a driver session from loopback source address `src`, reads `welcome`, and starts
/// the reader that routes replies and counts everything else.
pub async fn open_session(
    addr: SocketAddr,
    src: IpAddr,
    token: &str,
    counters: Arc<Counters>,
) -> Result<Session> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("binding a source port on {src}"))?;
    let stream = sock
        .connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} from {src}"))?;
    stream.set_nodelay(true)?;
    let mut req = format!("ws://{addr}/v1/ws/driver").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
        .await
        .context("WebSocket upgrade of /v1/ws/driver")?;
    let first = tokio::time::timeout(REPLY_WAIT, ws.next())
        .await
        .map_err(|_| anyhow!("no welcome within {REPLY_WAIT:?}"))?;
    match first {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(&t) {
            Ok(ServerMessage::Welcome { .. }) => {}
            _ => bail!("the first frame was not a welcome: {t}"),
        },
        other => bail!("no welcome: {other:?}"),
    }
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let closing = Arc::new(AtomicBool::new(false));
    let expected = closing.clone();
    tokio::spawn(async move {
        while let Some(frame) = stream.next().await {
            let Ok(frame) = frame else {
                if !expected.load(Ordering::Relaxed) {
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                }
                return;
            };
            match frame {
                Message::Text(t) => match serde_json::from_str::<ServerMessage>(&t) {
                    Ok(ServerMessage::Ack { req }) => {
                        let _ = tx.send((req, Ok(())));
                    }
                    Ok(ServerMessage::Error {
                        req: Some(req),
                        code,
                        ..
                    }) => {
                        let _ = tx.send((req, Err(code)));
                    }
                    Ok(ServerMessage::Error {
                        req: None, code, ..
                    }) => {
                        counters.errors_total.fetch_add(1, Ordering::Relaxed);
                        *counters
                            .errors_unsolicited
                            .lock()
                            .unwrap()
                            .entry(code)
                            .or_default() += 1;
                    }
                    _ => {
                        counters.other.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Message::Close(_) => {
                    if !expected.load(Ordering::Relaxed) {
                        counters.closed.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                _ => {}
            }
        }
    });
    Ok(Session {
        sink,
        closing,
        replies: rx,
        next_req: 1,
    })
}

fn json_of(status: u16, body: &[u8], what: &str) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(body);
    if !(200..300).contains(&status) {
        bail!("{what} answered {status}: {text}");
    }
    serde_json::from_slice(body).with_context(|| format!("{what}: undecodable body {text}"))
}

pub async fn register_rider(http: &mut Http) -> Result<String> {
    let body = serde_json::to_vec(&RegisterRider {
        name: "Bench Rider".into(),
        phone: "+1 555 0100".into(),
    })?;
    let (st, b) = http.post("/v1/riders", None, &body).await?;
    let r: RiderRegistered = serde_json::from_value(json_of(st, b, "POST /v1/riders")?)?;
    Ok(r.token)
}

pub async fn register_driver(http: &mut Http, i: usize) -> Result<String> {
    let body = serde_json::to_vec(&RegisterDriver {
        name: format!("Bench Driver {i}"),
        vehicle: Vehicle {
            make: "Toyota".into(),
            model: "Prius".into(),
            plate: format!("B {i}"),
            color: "blue".into(),
            product: Product::Economy,
            seats: 4,
        },
    })?;
    let (st, b) = http.post("/v1/drivers", None, &body).await?;
    let r: DriverRegistered = serde_json::from_value(json_of(st, b, "POST /v1/drivers")?)?;
    Ok(r.token)
}

/// Source addresses for the sessions, so no single one runs out of loopback ports.
pub fn source(i: usize, n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % n) as u8))
}

/// Registers `positions.len()` drivers, opens a session for each, sends its position and
/// `go_online` (both acknowledged). With `keep`, returns every session, open, indexed by
/// driver; without, closes each once it is online (the driver stays available for
/// `--session-grace-ms`).
pub async fn load_drivers(
    addr: SocketAddr,
    positions: Arc<Vec<(f64, f64)>>,
    concurrency: usize,
    keep: bool,
    sources: usize,
    counters: Arc<Counters>,
) -> Result<Vec<Session>> {
    let n = positions.len();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let slots: Arc<Mutex<Vec<Option<Session>>>> = Arc::new(Mutex::new(
        (0..if keep { n } else { 0 }).map(|_| None).collect(),
    ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(n.max(1)) {
        let (positions, next, done, slots, counters) = (
            positions.clone(),
            next.clone(),
            done.clone(),
            slots.clone(),
            counters.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr.to_string()).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= positions.len() {
                    return Ok::<(), anyhow::Error>(());
                }
                let token = register_driver(&mut http, i)
                    .await
                    .with_context(|| format!("registering driver {i}"))?;
                let mut s = open_session(addr, source(i, sources), &token, counters.clone())
                    .await
                    .with_context(|| format!("opening driver {i}'s session"))?;
                s.request(&location(positions[i]))
                    .await
                    .with_context(|| format!("driver {i}'s first location"))?;
                s.request(&DriverMessage::GoOnline)
                    .await
                    .with_context(|| format!("driver {i}'s go_online"))?;
                if keep {
                    slots.lock().await[i] = Some(s);
                } else {
                    s.close().await;
                }
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d % (positions.len() / 10).max(1) == 0 {
                    eprintln!(
                        "  dispatchd: {d}/{} drivers online ({:.0} s)",
                        positions.len(),
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut slots = slots.lock().await;
    Ok(slots
        .drain(..)
        .map(|s| s.expect("every driver loaded"))
        .collect())
}

/// Every series of `/metrics`, keyed exactly as exposed (`name{label="v"}`).
pub async fn metrics(http: &mut Http) -> Result<HashMap<String, f64>> {
    let (st, body) = http.get("/metrics", None).await?;
    if st != 200 {
        bail!("GET /metrics answered {st}");
    }
    let text = std::str::from_utf8(body)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

pub const APPLIED: &str = "dispatch_locations_applied_total";

pub async fn applied(http: &mut Http) -> Result<f64> {
    metrics(http)
        .await?
        .get(APPLIED)
        .copied()
        .ok_or_else(|| anyhow!("/metrics has no {APPLIED}"))
}
