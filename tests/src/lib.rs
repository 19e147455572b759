//! `dispatch-tests`: a harness for end-to-end tests over real sockets. [`TestServer`]
//! runs the real server (`dispatch_transport::server::run`) on an ephemeral port, or the
//! real `dispatchd` binary as a child process; [`Client`] is a real WebSocket client
//! (tokio-tungstenite) that speaks PROTOCOL.md's wire types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use dispatch_transport::server::{self, Args};
use dispatch_transport::wire::{self, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something the server should do promptly. Generous: the
/// timing under test always comes from the server's own flags, never from this.
pub const WAIT: Duration = Duration::from_secs(10);

/// The server, in-process, on `127.0.0.1:0`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl TestServer {
    /// Starts a server with `dispatchd`'s defaults plus `flags` (e.g. `--offer-timeout-ms 300`).
    pub async fn start(flags: &[&str]) -> TestServer {
        let mut argv = vec!["dispatchd", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(flags);
        let config = Args::parse_from(argv)
            .build_and_validate()
            .expect("valid test flags");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = rx.await;
        }));
        let s = TestServer {
            addr,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task: Some(task),
        };
        s.wait_ready().await;
        s
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server not ready in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Stops the server as SIGTERM would and waits for it to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("shutdown timed out")??,
            None => Ok(()),
        }
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut r = self.http.post(self.url(path)).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut r = self.http.get(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers a driver of `product`; returns (driver_id, token).
    pub async fn driver(&self, name: &str, product: &str) -> (String, String) {
        let (s, v) = self
            .post(
                "/v1/drivers",
                None,
                json!({"name": name, "vehicle": {"make": "Toyota", "model": "Prius", "plate": "AB 123", "color": "blue", "product": product, "seats": 4}}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["driver_id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    /// Registers a rider; returns (rider_id, token).
    pub async fn rider(&self, name: &str) -> (String, String) {
        let (s, v) = self
            .post(
                "/v1/riders",
                None,
                json!({"name": name, "phone": "+1 555 0100"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["rider_id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    /// A connected driver session, `welcome` already read, online at `(lat, lng)`.
    pub async fn online_driver(
        &self,
        name: &str,
        product: &str,
        lat: f64,
        lng: f64,
    ) -> (String, Client) {
        let (id, token) = self.driver(name, product).await;
        let mut c = Client::driver(self, &token).await.expect("driver connects");
        c.welcome().await;
        c.ok(json!({"type": "location", "lat": lat, "lng": lng, "ts": 0}))
            .await;
        c.ok(json!({"type": "go_online"})).await;
        (id, c)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real WebSocket client with `req` correlation.
pub struct Client {
    ws: Ws,
    next_req: u64,
    /// Messages read while waiting for something else, in arrival order.
    pending: std::collections::VecDeque<ServerMessage>,
    pub closed: Option<Option<u16>>,
}

impl Client {
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Client, tungstenite::Error> {
        let mut req = url.into_client_request()?;
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Client {
            ws,
            next_req: 1,
            pending: Default::default(),
            closed: None,
        })
    }

    pub async fn driver(s: &TestServer, token: &str) -> Result<Client, tungstenite::Error> {
        Client::connect(&s.ws_url("/v1/ws/driver"), Some(token)).await
    }

    pub async fn rider(s: &TestServer, token: &str) -> Result<Client, tungstenite::Error> {
        Client::connect(&s.ws_url("/v1/ws/rider"), Some(token)).await
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<()> {
        self.ws.send(m).await.map_err(Into::into)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    /// Reads the next server message from the socket (not the pending buffer).
    async fn read(&mut self) -> Result<ServerMessage> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .map_err(|_| anyhow!("no message within {WAIT:?}; pending: {:?}", self.pending))?;
            match m {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t)
                        .with_context(|| format!("undecodable server message {t}"));
                }
                Some(Ok(Message::Close(f))) => {
                    self.closed = Some(f.map(|f| u16::from(f.code)));
                    bail!("closed: {:?}", self.closed);
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("socket error: {e}"),
                None => {
                    self.closed.get_or_insert(None);
                    bail!("socket ended");
                }
            }
        }
    }

    /// The next message, buffered ones first.
    pub async fn next(&mut self) -> ServerMessage {
        if let Some(m) = self.pending.pop_front() {
            return m;
        }
        self.read().await.expect("a server message")
    }

    /// The first message (buffered or new) that `pred` accepts; others stay buffered.
    pub async fn next_where(
        &mut self,
        what: &str,
        pred: impl Fn(&ServerMessage) -> bool,
    ) -> ServerMessage {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let m = self
                .read()
                .await
                .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
            if pred(&m) {
                return m;
            }
            self.pending.push_back(m);
        }
    }

    /// Sends `v` with a fresh `req` and returns the reply carrying it.
    pub async fn request(&mut self, mut v: Value) -> ServerMessage {
        let req = self.next_req;
        self.next_req += 1;
        v["req"] = json!(req);
        self.send(v).await;
        self.next_where(&format!("reply to req {req}"), |m| match m {
            ServerMessage::Ack { req: r } => *r == req,
            ServerMessage::Error { req: Some(r), .. } => *r == req,
            ServerMessage::TripUpdate { req: Some(r), .. } => *r == req,
            _ => false,
        })
        .await
    }

    /// Sends `v` with a `req` and asserts it was acknowledged.
    pub async fn ok(&mut self, v: Value) {
        let m = self.request(v.clone()).await;
        assert!(
            matches!(m, ServerMessage::Ack { .. }),
            "{v} was answered {m:?}"
        );
    }

    /// Sends `v` with a `req` and returns the error code it was answered with.
    pub async fn err(&mut self, v: Value) -> String {
        match self.request(v.clone()).await {
            ServerMessage::Error { code, .. } => code,
            m => panic!("{v} should have failed, got {m:?}"),
        }
    }

    pub async fn welcome(&mut self) -> ServerMessage {
        let m = self.next().await;
        assert!(
            matches!(m, ServerMessage::Welcome { .. }),
            "first message must be welcome, got {m:?}"
        );
        m
    }

    pub async fn offer(&mut self) -> wire::Offer {
        match self
            .next_where("offer", |m| matches!(m, ServerMessage::Offer(_)))
            .await
        {
            ServerMessage::Offer(o) => o,
            _ => unreachable!(),
        }
    }

    /// The next `trip_update` (without a `req`) in state `state`.
    pub async fn trip_in(&mut self, state: wire::TripState) -> wire::Trip {
        match self
            .next_where(
                &format!("trip_update {state:?}"),
                |m| matches!(m, ServerMessage::TripUpdate { trip, .. } if trip.state == state),
            )
            .await
        {
            ServerMessage::TripUpdate { trip, .. } => trip,
            _ => unreachable!(),
        }
    }

    /// Waits for the server to close the connection; returns its close code.
    pub async fn closed_with(&mut self) -> Option<u16> {
        if let Some(c) = self.closed {
            return c;
        }
        loop {
            match self.read().await {
                Ok(m) => self.pending.push_back(m),
                Err(_) => return self.closed.unwrap_or(None),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The close code tungstenite reports for "replaced".
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// The `dispatchd` binary cargo built next to the test executable.
pub fn dispatchd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/deps");
    dir.join("dispatchd")
}
