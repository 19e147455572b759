//! `dispatch-tests`: a harness for end-to-end tests over real sockets.
//!
//! - [`Endpoint`]: a running server's address and an HTTP client, with the REST and
//!   session helpers every test uses (register, quote, connect, metrics, ...).
//! - [`TestServer`]: the real server (`dispatch_transport::server::run`) in-process on an
//!   ephemeral port; it derefs to its [`Endpoint`].
//! - [`Dispatchd`]: the real `dispatchd` binary as a child process, built by
//!   [`Dispatchd::builder`] (flags, env, data directory, logs kept on failure, kill -9,
//!   restart on the same data); it derefs to its [`Endpoint`] too.
//! - [`Client`]: a real WebSocket client (tokio-tungstenite) that speaks PROTOCOL.md's
//!   wire types.
//! - [`PgServer`]: a throwaway PostgreSQL server of a test's own, to stop and start.
//! - [`ride_to`] / [`RidePlan`]: a driver and a rider with a trip brought to any state of
//!   the happy path; [`diagram`]: the trip state machine over the wire types.

use std::future::Future;
use std::net::SocketAddr;
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

pub mod cluster;
pub mod diagram;
mod dispatchd;
pub mod loadgen;
mod pg;
mod ride;
pub mod served;

pub use dispatchd::{
    ClusterFixture, Dispatchd, DispatchdBuilder, MATCHING_ENV, SHORT_TRIP_FLAGS, assert_clean_log,
    built_bin, built_dispatchd, dispatchd_bin, reap, test_store_is_postgres,
};
pub use pg::PgServer;
pub use ride::{DROPOFF, PICKUP, Ride, RidePlan, Scene, ride_to};

/// How long a test waits for something the server should do promptly. Generous: the
/// timing under test always comes from the server's own flags, never from this.
pub const WAIT: Duration = Duration::from_secs(10);

/// A deadline for what takes a moment on a loaded machine (a child's start-up, recovery,
/// a process exiting): generous, and never the thing under test.
pub const SLOW: Duration = Duration::from_secs(30);

/// A running server, in-process or a child: its address and an HTTP client, with the
/// helpers tests use against it. [`TestServer`] and [`Dispatchd`] deref to it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, http: reqwest::Client) -> Endpoint {
        Endpoint { addr, http }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Waits (up to [`WAIT`]) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        eventually("the server to be ready", || async {
            self.is_ready().await.then_some(())
        })
        .await
    }

    /// Whether `/readyz` answers 200 now (a server that does not answer is not ready).
    pub async fn is_ready(&self) -> bool {
        match self.http.get(self.url("/readyz")).send().await {
            Ok(r) => r.status() == 200,
            Err(_) => false,
        }
    }

    /// Any method, with an optional JSON body: (status, JSON body or null), or the
    /// transport error (a server that died).
    pub async fn try_request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut r = self.http.request(method, self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// Any method, with an optional JSON body: (status, JSON body or null).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.try_request(method.clone(), path, token, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, token, None).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PUT, path, token, Some(body))
            .await
    }

    /// `GET path` as `token`; asserts 200 and returns the body.
    pub async fn get_ok(&self, path: &str, token: &str) -> Value {
        let (st, v) = self.get(path, Some(token)).await;
        assert_eq!(st, 200, "GET {path}: {v}");
        v
    }

    /// `GET /v1/trips/{id}` as `token`; asserts 200.
    pub async fn trip(&self, id: &str, token: &str) -> wire::Trip {
        let v = self.get_ok(&format!("/v1/trips/{id}"), token).await;
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("trip {id}: {e}: {v}"))
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

    /// A session of `role` (`driver`, `rider`) with `token`; `welcome` not yet read.
    pub async fn connect(&self, role: &str, token: &str) -> Client {
        Client::connect(&self.ws_url(&format!("/v1/ws/{role}")), Some(token))
            .await
            .unwrap_or_else(|e| panic!("a {role} session with a valid token: {e}"))
    }

    /// A connected driver session, `welcome` already read, online at `(lat, lng)`.
    pub async fn online_driver(
        &self,
        name: &str,
        product: &str,
        lat: f64,
        lng: f64,
    ) -> (String, Client) {
        let (id, _, c) = self.online_driver_token(name, product, lat, lng).await;
        (id, c)
    }

    /// Like [`Endpoint::online_driver`], also returning the token (to reconnect).
    pub async fn online_driver_token(
        &self,
        name: &str,
        product: &str,
        lat: f64,
        lng: f64,
    ) -> (String, String, Client) {
        let (id, token) = self.driver(name, product).await;
        let mut c = self.connect("driver", &token).await;
        c.welcome().await;
        c.go_online((lat, lng)).await;
        (id, token, c)
    }

    /// A rider, registered and connected, `welcome` already read: (rider_id, token, session).
    pub async fn connected_rider(&self, name: &str) -> (String, String, Client) {
        let (id, token) = self.rider(name).await;
        let mut c = self.connect("rider", &token).await;
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
                json!({"pickup": point(pickup), "dropoff": point(dropoff), "product": product}),
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

    /// [`Endpoint::metric`] of a series that must be there.
    pub async fn metric_value(&self, series: &str) -> f64 {
        self.metric(series)
            .await
            .unwrap_or_else(|| panic!("no series {series}"))
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

/// Every trip command a driver has (PROTOCOL.md, "Driver → server"): the transport's own
/// list of driver message types, but for the first three (`go_online`, `go_offline`,
/// `location`), which name no trip.
pub const DRIVER_TRIP_COMMANDS: [&str; 6] = {
    let [_go_online, _go_offline, _location, trip @ ..] = wire::DriverMessage::TYPES;
    trip
};

/// PROTOCOL.md's REST error: asserts `(status, error.code)` is `(want_status, want_code)`
/// and that `error.message` says something.
pub fn assert_error_body(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (want_status, Some(want_code)),
        "{v}"
    );
    assert!(
        !v["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
}

/// The driver `d` accepts its offer of `trip_id` (acknowledged), and the rider's next
/// `trip_update` is that trip `driver_assigned` to `driver_id` at `version`; returns it.
pub async fn accepted(
    d: &mut Client,
    r: &mut Client,
    trip_id: &str,
    driver_id: &str,
    version: u64,
) -> wire::Trip {
    d.ok(json!({"type": "accept", "trip_id": trip_id})).await;
    let t = r.trip_update().await;
    assert_eq!(
        (t.state, t.version, t.driver_id.as_deref()),
        (wire::TripState::DriverAssigned, version, Some(driver_id)),
        "{t:?}"
    );
    t
}

/// After a store fault and a `kill -9`: the trip `trip_id` completed with every step of
/// the happy path in its history, every rider in `acknowledged` is there, and the books
/// balance (read through `/admin/` with `admin`).
pub async fn assert_nothing_acknowledged_lost(
    s: &Endpoint,
    admin: &str,
    trip_id: &str,
    acknowledged: &[String],
) {
    let v = s.get_ok(&format!("/admin/trips/{trip_id}"), admin).await;
    assert_eq!(v["trip"]["state"], "completed", "{v}");
    let states: Vec<&str> = v["history"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|h| h["to"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        states,
        [
            "dispatching",
            "driver_assigned",
            "driver_arrived",
            "in_progress",
            "completed"
        ],
        "{v}"
    );
    for id in acknowledged {
        s.get_ok(&format!("/admin/riders/{id}"), admin).await;
    }
    let l = s.get_ok("/admin/ledger", admin).await;
    assert_eq!(l["balanced"], json!(true), "{l}");
}

/// Asserts that the books (`GET /admin/ledger`'s body) have settled: balanced, nothing in
/// total, and nothing left in clearing, authorizations or rider holds; `when` is for the
/// message.
pub fn assert_books_settled(books: &Value, when: &str) {
    let a = &books["accounts"];
    assert_eq!(
        (
            &books["balanced"],
            &books["total_cents"],
            &a["clearing"],
            &a["authorizations"],
            &a["rider_holds"],
        ),
        (&json!(true), &json!(0), &json!(0), &json!(0), &json!(0)),
        "the books {when}: {books}"
    );
}

/// Asserts that one ended trip's payment steps (`GET /admin/trips/{id}`'s, in order)
/// settled: at most one `authorize`, settled once (a `capture`, `cancel_fee` or
/// `release`), and captured exactly once if the trip `completed`, never otherwise. `trip`
/// names it in the messages.
pub fn assert_payments_settled(steps: &[&str], completed: bool, trip: &str) {
    let n = |step: &str| steps.iter().filter(|s| **s == step).count();
    let settled = n("capture") + n("cancel_fee") + n("release");
    assert!(
        n("authorize") <= 1 && settled == n("authorize"),
        "{trip}: payment steps {steps:?}"
    );
    if completed {
        assert_eq!(
            (n("authorize"), n("capture")),
            (1, 1),
            "completed {trip}: payment steps {steps:?}"
        );
    } else {
        assert_eq!(n("capture"), 0, "{trip} captured: {steps:?}");
    }
}

/// `{"lat": .., "lng": ..}`, as the wire and REST bodies write a point.
pub fn point((lat, lng): (f64, f64)) -> Value {
    json!({"lat": lat, "lng": lng})
}

/// The server, in-process, on `127.0.0.1:0`. Derefs to its [`Endpoint`].
pub struct TestServer {
    endpoint: Endpoint,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
    /// This server's own `--data-dir`, removed when the server is dropped.
    pub data_dir: tempfile::TempDir,
}

impl std::ops::Deref for TestServer {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl TestServer {
    /// Starts a server with `dispatchd`'s defaults plus `flags` (e.g. `--offer-timeout-ms 300`).
    pub async fn start(flags: &[&str]) -> TestServer {
        let data_dir = tempfile::tempdir().expect("a temporary data directory");
        TestServer::start_in(data_dir, flags).await
    }

    /// Starts a server on an existing `--data-dir`, as [`TestServer::start`] does with a
    /// fresh one: a restart, which recovers what an earlier server stored there.
    pub async fn start_in(data_dir: tempfile::TempDir, flags: &[&str]) -> TestServer {
        let dir = data_dir.path().to_str().expect("utf-8 path").to_owned();
        // Tests register many riders and drivers from one address: no registration limit.
        let argv = ["dispatchd", "--listen", "127.0.0.1:0", "--data-dir", &dir];
        let unlimited = dispatch_transport::server::ratelimit::UNLIMITED;
        // DISPATCH_TEST_STORE=postgres: a fresh database, named in the data directory so
        // that a restart on it finds the same one.
        let mut store: Vec<String> = Vec::new();
        if dispatchd::test_store_is_postgres() {
            let file = data_dir.path().join("test-database-url");
            let url = std::fs::read_to_string(&file).unwrap_or_else(|_| {
                let url = dispatch_persistence::pg::test_database("in-process")
                    .expect("DISPATCH_TEST_STORE=postgres needs DISPATCH_TEST_DATABASE_URL");
                std::fs::write(&file, &url).expect("note the test database");
                url
            });
            store = ["--store", "postgres", "--database-url", &url]
                .map(String::from)
                .to_vec();
        }
        let store: Vec<&str> = store.iter().map(String::as_str).collect();
        let config = Args::parse_from(argv.iter().chain(&unlimited).chain(&store).chain(flags))
            .build_and_validate()
            .expect("valid test flags");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (stop, rx) = oneshot::channel::<()>();
        let s = TestServer {
            endpoint: Endpoint::new(listener.local_addr().unwrap(), reqwest::Client::new()),
            stop: Some(stop),
            task: Some(tokio::spawn(server::run(listener, config, async move {
                let _ = rx.await;
            }))),
            data_dir,
        };
        s.wait_ready().await;
        s
    }

    /// Stops the server as SIGTERM would and waits for it to finish.
    pub async fn stop(mut self) -> Result<()> {
        self.begin_stop();
        match self.task.take() {
            Some(t) => tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("shutdown timed out")??,
            None => Ok(()),
        }
    }

    /// Begins a graceful shutdown, as SIGTERM would, without waiting for it; [`stop`]
    /// still waits for the end afterwards.
    ///
    /// [`stop`]: TestServer::stop
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops this server gracefully and starts a new one with `flags` on the same data
    /// directory.
    pub async fn restart(mut self, flags: &[&str]) -> TestServer {
        let placeholder = tempfile::tempdir().expect("a temporary directory");
        let dir = std::mem::replace(&mut self.data_dir, placeholder);
        self.stop().await.expect("a clean stop before the restart");
        TestServer::start_in(dir, flags).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_stop();
    }
}

/// Polls `f` until it yields a value, for at most [`WAIT`]: for waiting on something the
/// server does on its own schedule (a timer set by a flag), never for a tuned delay.
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, WAIT, f).await
}

/// [`eventually`] with another deadline.
pub async fn eventually_within<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
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

    pub async fn driver(s: &Endpoint, token: &str) -> Result<Client, tungstenite::Error> {
        Client::connect(&s.ws_url("/v1/ws/driver"), Some(token)).await
    }

    pub async fn rider(s: &Endpoint, token: &str) -> Result<Client, tungstenite::Error> {
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

    /// Asserts the session is still served, with nothing owed before: a `go_online` is
    /// acknowledged, and its ack is the next message.
    pub async fn alive(&mut self) {
        let m = self.reply_next(json!({"type": "go_online"})).await;
        assert!(matches!(m, ServerMessage::Ack { .. }), "{m:?}");
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

impl Client {
    /// A location ping at `at` (acknowledged), then `go_online` (acknowledged).
    pub async fn go_online(&mut self, at: (f64, f64)) {
        self.ok(json!({"type": "location", "lat": at.0, "lng": at.1, "ts": now_ms()}))
            .await;
        self.ok(json!({"type": "go_online"})).await;
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

/// Runs the `openssl` command in `dir` (the test's keys and certificates; Debian's package
/// `openssl`, which .ci/auth.sh installs) and returns its standard output; fails the test
/// with openssl's message if it fails.
pub fn openssl(args: &[&str], dir: &std::path::Path) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[cfg(test)]
mod tests {
    use dispatch_transport::wire::DriverMessage;

    #[test]
    fn the_driver_trip_commands_are_the_types_that_name_a_trip() {
        assert_eq!(
            DriverMessage::TYPES[..3],
            ["go_online", "go_offline", "location"]
        );
        assert_eq!(DriverMessage::TYPES[3..], super::DRIVER_TRIP_COMMANDS);
    }
}
