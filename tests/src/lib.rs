//! `dispatch-tests`: a harness for end-to-end tests over real sockets. [`TestServer`]
//! runs the real server (`dispatch_transport::server::run`) on an ephemeral port, or the
//! real `dispatchd` binary as a child process; [`Client`] is a real WebSocket client
//! (tokio-tungstenite) that speaks PROTOCOL.md's wire types.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
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
    /// This server's own `--data-dir`, removed when the server is dropped.
    pub data_dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with `dispatchd`'s defaults plus `flags` (e.g. `--offer-timeout-ms 300`).
    pub async fn start(flags: &[&str]) -> TestServer {
        let data_dir = tempfile::tempdir().expect("a temporary data directory");
        let dir = data_dir
            .path()
            .to_str()
            .expect("utf-8 temp path")
            .to_owned();
        let mut argv = vec!["dispatchd", "--listen", "127.0.0.1:0", "--data-dir", &dir];
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
            data_dir,
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

impl TestServer {
    /// Begins a graceful shutdown, as SIGTERM would, without waiting for it; [`stop`]
    /// still waits for the end afterwards.
    ///
    /// [`stop`]: TestServer::stop
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Like [`TestServer::online_driver`], also returning the token (to reconnect).
    pub async fn online_driver_token(
        &self,
        name: &str,
        product: &str,
        lat: f64,
        lng: f64,
    ) -> (String, String, Client) {
        let (id, token) = self.driver(name, product).await;
        let mut c = Client::driver(self, &token).await.expect("driver connects");
        c.welcome().await;
        c.ok(json!({"type": "location", "lat": lat, "lng": lng, "ts": 0}))
            .await;
        c.ok(json!({"type": "go_online"})).await;
        (id, token, c)
    }

    /// A rider, registered and connected, `welcome` already read: (rider_id, token, session).
    pub async fn connected_rider(&self, name: &str) -> (String, String, Client) {
        let (id, token) = self.rider(name).await;
        let mut c = Client::rider(self, &token).await.expect("rider connects");
        c.welcome().await;
        (id, token, c)
    }

    /// A quote for `rider_token`; asserts 201 and returns the body.
    pub async fn quote(
        &self,
        rider_token: &str,
        pickup: (f64, f64),
        dropoff: (f64, f64),
        product: &str,
    ) -> Value {
        let (st, q) = self
            .post(
                "/v1/quotes",
                Some(rider_token),
                json!({"pickup": {"lat": pickup.0, "lng": pickup.1}, "dropoff": {"lat": dropoff.0, "lng": dropoff.1}, "product": product}),
            )
            .await;
        assert_eq!(st, 201, "{q}");
        q
    }

    /// Any request: (status, content-type, raw body).
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> (u16, String, String) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (status, ctype, resp.text().await.expect("body"))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let (st, _, body) = self.raw(reqwest::Method::GET, "/metrics", None, None).await;
        assert_eq!(st, 200, "{body}");
        body
    }

    /// The value of one series, written exactly as exposed (`name{label="v"}`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics_text().await;
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse().ok())?
        })
    }

    /// Waits until the server holds exactly `n` open sessions of `role` (driver, rider):
    /// a closed session has then been detached from its actor.
    pub async fn wait_sessions(&self, role: &str, n: u64) {
        let series = format!("dispatch_ws_sessions{{role=\"{role}\"}}");
        eventually(&format!("{n} {role} sessions"), || async {
            (self.metric(&series).await.unwrap_or(0.0) == n as f64).then_some(())
        })
        .await
    }
}

/// Polls `f` until it yields a value, for at most [`WAIT`]: for waiting on something the
/// server does on its own schedule (a timer set by a flag), never for a tuned delay.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The point `m` metres north of `(lat, lng)` (positive) or south (negative).
pub fn north_of((lat, lng): (f64, f64), m: f64) -> (f64, f64) {
    (lat + m / 111_195.0, lng)
}

/// Unix milliseconds of an RFC 3339 UTC timestamp as the server writes it
/// (`2026-01-02T03:04:05.678Z`).
pub fn rfc3339_ms(s: &str) -> u64 {
    let msg = format!("not an RFC 3339 UTC timestamp: {s}");
    let s = s.strip_suffix('Z').expect(&msg);
    let (date, time) = s.split_once('T').expect(&msg);
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    let ms: i64 = format!("{frac:0<3}")[..3].parse().unwrap();
    // Days from civil (Howard Hinnant).
    let (y, m, day) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (((days * 24 + t[0]) * 60 + t[1]) * 60 + t[2]) as u64 * 1000 + ms as u64
}

/// Unix milliseconds now, by the wall clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The trip a `trip_update` carries; panics on anything else.
pub fn trip_of(m: ServerMessage) -> wire::Trip {
    match m {
        ServerMessage::TripUpdate { trip, .. } => trip,
        m => panic!("expected a trip_update, got {m:?}"),
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

impl Client {
    /// Tries to open a session; a refused upgrade gives its HTTP status and JSON body.
    pub async fn try_connect(url: &str, token: Option<&str>) -> Result<Client, (u16, Value)> {
        match Client::connect(url, token).await {
            Ok(c) => Ok(c),
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((status, body))
            }
            Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
        }
    }

    /// Messages read while waiting for something else and not yet consumed.
    pub fn pending(&self) -> &std::collections::VecDeque<ServerMessage> {
        &self.pending
    }

    /// Sends `v` with a fresh `req` and returns that `req`; the reply is left to the caller.
    pub async fn send_req(&mut self, mut v: Value) -> u64 {
        let req = self.next_req;
        self.next_req += 1;
        v["req"] = json!(req);
        self.send(v).await;
        req
    }

    /// Sends `v` with a `req` and asserts that nothing else is buffered or arrives before
    /// its reply (which is returned). Replies keep the order of the session's messages, so
    /// this proves that no earlier message is still owed to the client.
    pub async fn reply_next(&mut self, v: Value) -> ServerMessage {
        assert!(
            self.pending.is_empty(),
            "unexpected messages before {v}: {:?}",
            self.pending
        );
        let req = self.send_req(v.clone()).await;
        let m = self.read().await.expect("a reply");
        let r = match &m {
            ServerMessage::Ack { req } | ServerMessage::TripUpdate { req: Some(req), .. } => {
                Some(*req)
            }
            ServerMessage::Error { req, .. } => *req,
            _ => None,
        };
        assert_eq!(r, Some(req), "{v}: expected its reply next, got {m:?}");
        m
    }

    /// The next `trip_update` without a `req`, whatever its state.
    pub async fn trip_update(&mut self) -> wire::Trip {
        trip_of(
            self.next_where("trip_update", |m| {
                matches!(m, ServerMessage::TripUpdate { req: None, .. })
            })
            .await,
        )
    }

    /// The next `offer_expired`; returns its `trip_id`.
    pub async fn offer_expired(&mut self) -> String {
        match self
            .next_where("offer_expired", |m| {
                matches!(m, ServerMessage::OfferExpired { .. })
            })
            .await
        {
            ServerMessage::OfferExpired { trip_id } => trip_id,
            _ => unreachable!(),
        }
    }

    /// `request_ride` priced now; asserts the reply is the new trip in `dispatching` v1.
    pub async fn request_ride(
        &mut self,
        pickup: (f64, f64),
        dropoff: (f64, f64),
        product: &str,
    ) -> wire::Trip {
        let m = self
            .request(json!({"type": "request_ride", "pickup": {"lat": pickup.0, "lng": pickup.1}, "dropoff": {"lat": dropoff.0, "lng": dropoff.1}, "product": product}))
            .await;
        let trip = match m {
            ServerMessage::TripUpdate { req: Some(_), trip } => trip,
            m => panic!("request_ride was answered {m:?}"),
        };
        assert_eq!(
            (trip.state, trip.version),
            (wire::TripState::Dispatching, 1),
            "{trip:?}"
        );
        trip
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

/// The `dispatchd` binary. Under cargo it is (re)built first, so it is never older than
/// the code under test (a no-op when it is fresh); run bare, it must already exist.
pub fn built_dispatchd() -> PathBuf {
    built_bin("dispatch-transport", "dispatchd")
}

/// The workspace binary `bin` of `package`, next to the test executable. Under cargo it
/// is (re)built once per test process first (a no-op when it is fresh); run bare, it must
/// already exist.
pub fn built_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let path = dispatchd_bin().with_file_name(bin);
    let build = format!("cargo build -p {package} --bin {bin}");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(&build)
        && let Ok(cargo) = std::env::var("CARGO")
    {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", bin]);
        if path.parent().and_then(|p| p.file_name()) == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(workspace)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "`{build}` failed");
        built.push(build.clone());
    }
    assert!(
        path.exists(),
        "{} does not exist: build it with `{build}` (`cargo test --workspace` builds it too)",
        path.display()
    );
    path
}

impl TestServer {
    /// Starts a server on an existing `--data-dir`, as [`TestServer::start`] does with a
    /// fresh one: a restart, which recovers what an earlier server stored there.
    pub async fn start_in(data_dir: tempfile::TempDir, flags: &[&str]) -> TestServer {
        let dir = data_dir.path().to_str().expect("utf-8 path").to_owned();
        let argv = ["dispatchd", "--listen", "127.0.0.1:0", "--data-dir", &dir];
        let config = Args::parse_from(argv.iter().chain(flags))
            .build_and_validate()
            .expect("valid test flags");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (stop, rx) = oneshot::channel::<()>();
        let s = TestServer {
            addr: listener.local_addr().unwrap(),
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(tokio::spawn(server::run(listener, config, async move {
                let _ = rx.await;
            }))),
            data_dir,
        };
        s.wait_ready().await;
        s
    }

    /// Stops this server gracefully and starts a new one with `flags` on the same data
    /// directory.
    pub async fn restart(mut self, flags: &[&str]) -> TestServer {
        let placeholder = tempfile::tempdir().expect("a temporary directory");
        let dir = std::mem::replace(&mut self.data_dir, placeholder);
        self.stop().await.expect("a clean stop before the restart");
        TestServer::start_in(dir, flags).await
    }

    /// Any method, with an optional JSON body: (status, JSON body or null).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PUT, path, token, Some(body))
            .await
    }
}

/// The UTC calendar date (`2026-01-02`) of Unix milliseconds `ms`.
pub fn utc_date(ms: u64) -> String {
    // Civil from days (Howard Hinnant), the inverse of the one in [`rfc3339_ms`].
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The real `dispatchd` binary as a child process on a given `--data-dir`, with its own
/// environment (for test hooks such as `DISPATCH_TEST_CRASH_AFTER`). Its output goes to a
/// log file; dropping it kills the process if it still runs.
pub struct Dispatchd {
    pub child: std::process::Child,
    pub listen: String,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

impl Drop for Dispatchd {
    fn drop(&mut self) {
        reap(&mut self.child);
    }
}

/// Kills a child that is still running and waits for it: for the `Drop` guards that keep
/// a failed test from leaving a server behind.
pub fn reap(child: &mut std::process::Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Dispatchd {
    /// Starts `dispatchd --listen <a free port> --data-dir <data> <flags>` with `env` set
    /// and no other `DISPATCH_TEST_*` hook, its output in `<logs>/<name>.log`, and waits
    /// until `/readyz` is 200 (retrying on another port if the one chosen was taken).
    pub async fn start(
        name: &str,
        data: &std::path::Path,
        logs: &std::path::Path,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Dispatchd {
        let bin = built_dispatchd();
        for attempt in 0.. {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let log = logs.join(format!("{name}-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("create the log file");
            let mut cmd = Command::new(&bin);
            cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
                .arg(data)
                .args(flags)
                .env_remove("DISPATCH_TEST_CRASH_AFTER")
                .envs(env.iter().copied())
                .stdin(std::process::Stdio::null())
                .stderr(out.try_clone().expect("clone the log handle"))
                .stdout(out);
            let mut s = Dispatchd {
                child: cmd.spawn().expect("spawn dispatchd"),
                listen: format!("127.0.0.1:{port}"),
                log,
                http: reqwest::Client::builder()
                    .timeout(WAIT)
                    .build()
                    .expect("an HTTP client"),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(r) = s.http.get(s.url("/readyz")).send().await
                    && r.status() == 200
                {
                    return s;
                }
                if let Some(st) = s.child.try_wait().expect("try_wait") {
                    let log = s.log_text();
                    assert!(
                        attempt < 3 && log.contains("cannot listen"),
                        "{name}: dispatchd exited ({st}) before it was ready\n--- log ---\n{log}"
                    );
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{name}: dispatchd not ready in 30 s\n--- log ---\n{}",
                    s.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.listen)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Any request with an optional JSON body: (status, JSON body or null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self.http.request(method.clone(), self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Waits for the process to end by itself (not killed by the test); its exit status.
    pub async fn exited_within(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "dispatchd still runs after {within:?}\n--- log ---\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
