//! Shared by the actors' integration tests (`mod common;`) and the recovery benchmark
//! (included there with `#[path]`): a system on a store, the profiles a test registers,
//! and a fake app whose session queue the test reads.
// Every file that includes this module uses its own share of it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dispatch_actors::messages::{DriverCommand, DriverMsg, RideRequest, RiderCommand, RiderMsg};
use dispatch_actors::payments::PaymentProvider;
use dispatch_actors::session::{Outbound, Responder, SessionHandle, SessionInbox};
use dispatch_actors::views::{DriverProfile, RiderProfile, Vehicle};
use dispatch_actors::{Metrics, System, SystemConfig};
use dispatch_engine::{DispatchConfig, DriverId, Point, Product, RiderId, TripId, TripState};
use dispatch_persistence::Store;
use ractor::{ActorRef, Message, RpcReplyPort};
use tokio::sync::mpsc;

/// How long a test waits for any one answer.
pub const WAIT: Duration = Duration::from_secs(10);

/// A system with the default configuration on the store in `dir`, and that store (for
/// [`stop`]).
pub async fn start(dir: &Path) -> (System, Arc<Store>) {
    let store = Arc::new(open_store(dir));
    let sys = System::start(
        SystemConfig::default(),
        Arc::new(Metrics::new()),
        store.clone(),
    )
    .await
    .unwrap();
    (sys, store)
}

/// The sled store in `dir`, or with `BENCH_DATABASE_URL` set (the recovery benchmark
/// on PostgreSQL) the PostgreSQL store there.
pub fn open_store(dir: &Path) -> Store {
    match std::env::var("BENCH_DATABASE_URL") {
        Ok(url) => Store::open_postgres(dispatch_persistence::PgOptions::new(url), |_| {}).unwrap(),
        Err(_) => Store::open(dir, |_| {}).unwrap(),
    }
}

/// Shuts `sys` down and waits, polling every `every` for up to `within`, until every
/// actor has let go of `store`, so that the next system can open the directory again.
pub async fn stop(sys: System, store: Arc<Store>, within: Duration, every: Duration) {
    sys.shutdown().await;
    drop(sys);
    eventually_within("the store is let go after shutdown", within, every, || {
        Arc::strong_count(&store) == 1
    })
    .await;
}

/// Polls `f` every `every` until it holds, failing after `within`.
pub async fn eventually_within(
    what: &str,
    within: Duration,
    every: Duration,
    f: impl Fn() -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Polls (with a generous deadline) until `f` holds.
pub async fn eventually(what: &str, f: impl Fn() -> bool) {
    eventually_within(what, WAIT, Duration::from_millis(5), f).await;
}

/// What actor `a` answers to the request `msg` builds (within [`WAIT`]).
pub async fn ask<M: Message, T: Send + 'static>(
    a: &ActorRef<M>,
    msg: impl FnOnce(RpcReplyPort<T>) -> M,
) -> T {
    a.call(msg, Some(WAIT)).await.unwrap().unwrap()
}

pub fn vehicle() -> Vehicle {
    Vehicle {
        make: "Kia".into(),
        model: "Niro".into(),
        plate: "X1".into(),
        color: "red".into(),
        product: Product::Economy,
        seats: 4,
    }
}

/// Registers a driver named `name` with a Kia Niro.
pub async fn register_driver(sys: &System, name: &str, token_hash: [u8; 32]) -> DriverId {
    let profile = DriverProfile {
        name: name.into(),
        vehicle: vehicle(),
    };
    sys.register_driver(profile, token_hash).await.unwrap()
}

/// Registers a rider named `name`.
pub async fn register_rider(sys: &System, name: &str, token_hash: [u8; 32]) -> RiderId {
    let profile = RiderProfile {
        name: name.into(),
        phone: "5550100".into(),
    };
    sys.register_rider(profile, token_hash).await.unwrap()
}

/// A fake app: a real session handle whose outbound queue the test reads.
pub struct App {
    pub handle: SessionHandle,
    pub rx: mpsc::Receiver<Box<Outbound>>,
    pub req: u64,
}

impl App {
    pub fn new(sys: &System) -> App {
        let (handle, inbox): (SessionHandle, SessionInbox) = sys.new_session();
        let (rx, _closed) = inbox.into_parts();
        App { handle, rx, req: 0 }
    }

    /// The next request id, and a responder that answers it on this app's session.
    pub fn responder(&mut self) -> (u64, Responder) {
        self.req += 1;
        (
            self.req,
            Responder::new(Some(self.req), self.handle.clone()),
        )
    }

    /// Attaches this app's session to the driver actor `a`.
    pub async fn attach_driver(&self, a: &ActorRef<DriverMsg>) {
        let h = self.handle.clone();
        a.call(|r| DriverMsg::Attach(h, r), Some(WAIT))
            .await
            .unwrap();
    }

    /// Attaches this app's session to the rider actor `a`.
    pub async fn attach_rider(&self, a: &ActorRef<RiderMsg>) {
        let h = self.handle.clone();
        a.call(|r| RiderMsg::Attach(h, r), Some(WAIT))
            .await
            .unwrap();
    }

    /// Sends `cmd` to the driver actor `a` under the next request id, and returns the id.
    pub fn drive(&mut self, a: &ActorRef<DriverMsg>, cmd: DriverCommand) -> u64 {
        let (req, r) = self.responder();
        a.cast(DriverMsg::Command(cmd, r, None)).unwrap();
        req
    }

    /// Sends `cmd` to the rider actor `a` under the next request id, and returns the id.
    pub fn ride(&mut self, a: &ActorRef<RiderMsg>, cmd: RiderCommand) -> u64 {
        let (req, r) = self.responder();
        a.cast(RiderMsg::Command(cmd, r, None)).unwrap();
        req
    }

    pub async fn next_where(&mut self, what: &str, pred: impl Fn(&Outbound) -> bool) -> Outbound {
        loop {
            let m = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            let m = m.unwrap_or_else(|| panic!("session queue closed waiting for {what}"));
            if pred(&m) {
                return *m;
            }
        }
    }

    /// Waits for the answer to `req`, and checks it is an ack.
    pub async fn acked(&mut self, req: u64) {
        let m = self.next_where("reply", |m| matches!(m, Outbound::Ack { req: r } | Outbound::Error { req: Some(r), .. } if *r == req)).await;
        assert!(
            matches!(m, Outbound::Ack { .. }),
            "req {req} answered {m:?}"
        );
    }

    /// Waits for a trip update in `state`, and returns the trip's version.
    pub async fn trip_in(&mut self, state: TripState) -> u64 {
        match self
            .next_where(
                &format!("{state:?}"),
                |m| matches!(m, Outbound::TripUpdate { trip, .. } if trip.state == state),
            )
            .await
        {
            Outbound::TripUpdate { trip, .. } => trip.version,
            _ => unreachable!(),
        }
    }

    /// Waits for an offer, and returns its trip.
    pub async fn offer(&mut self) -> TripId {
        match self
            .next_where("offer", |m| matches!(m, Outbound::Offer(_)))
            .await
        {
            Outbound::Offer(o) => o.trip_id,
            _ => unreachable!(),
        }
    }
}

/// The tests' configuration: 10 s offers, 60 s dispatch deadlines, a deep session queue.
pub fn test_config() -> SystemConfig {
    SystemConfig {
        dispatch: DispatchConfig {
            offer_timeout_ms: 10_000,
            dispatch_deadline_ms: 60_000,
        },
        ws_outbound_queue_max: 4096,
        ..SystemConfig::default()
    }
}

/// A started system over a store in a fresh temporary directory (kept alive by the
/// returned guard): 10 s offers, 60 s dispatch deadlines, the configuration changed by
/// `tune`, and another payment provider if given.
pub async fn start_with(
    tune: impl FnOnce(SystemConfig) -> SystemConfig,
    provider: Option<Arc<dyn PaymentProvider>>,
) -> (System, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(dispatch_persistence::Store::open(dir.path(), |_| {}).unwrap());
    (
        System::start_with_provider(
            tune(test_config()),
            Arc::new(Metrics::new()),
            store,
            provider,
        )
        .await
        .unwrap(),
        dir,
    )
}

/// A system on the PostgreSQL database at `url` (its store loaded), with
/// [`start_with`]'s configuration changed by `tune`, and its store.
pub async fn pg_system(
    url: &str,
    tune: impl FnOnce(SystemConfig) -> SystemConfig,
) -> (System, Arc<Store>) {
    let store = Store::open_postgres(dispatch_persistence::PgOptions::new(url), |_| {}).unwrap();
    tokio::task::block_in_place(|| store.load()).unwrap();
    let store = Arc::new(store);
    let sys = System::start(tune(test_config()), Arc::new(Metrics::new()), store.clone())
        .await
        .unwrap();
    (sys, store)
}

pub async fn driver_cmd(sys: &System, id: &DriverId, app: &mut App, cmd: DriverCommand) {
    let req = app.drive(&sys.driver_ref(id).unwrap(), cmd);
    app.acked(req).await;
}

/// A connected, online driver at (lat, lng).
pub async fn online_driver(sys: &System, lat: f64, lng: f64) -> (DriverId, App) {
    let id = register_driver(sys, "D", rand_hash()).await;
    let mut app = App::new(sys);
    app.attach_driver(&sys.driver_ref(&id).unwrap()).await;
    app.next_where("welcome", |m| matches!(m, Outbound::DriverWelcome { .. }))
        .await;
    driver_cmd(
        sys,
        &id,
        &mut app,
        DriverCommand::Location {
            position: Point::new(lat, lng).unwrap(),
            heading: None,
        },
    )
    .await;
    driver_cmd(sys, &id, &mut app, DriverCommand::GoOnline).await;
    (id, app)
}

pub async fn rider(sys: &System) -> (RiderId, App) {
    let id = register_rider(sys, "R", rand_hash()).await;
    let mut app = App::new(sys);
    app.attach_rider(&sys.rider_ref(&id).unwrap()).await;
    app.next_where("welcome", |m| matches!(m, Outbound::RiderWelcome { .. }))
        .await;
    (id, app)
}

pub fn rand_hash() -> [u8; 32] {
    rand::random()
}

pub async fn request(sys: &System, id: &RiderId, app: &mut App, lat: f64, lng: f64) -> TripId {
    let ride = RideRequest::Direct {
        pickup: Point::new(lat, lng).unwrap(),
        dropoff: Point::new(lat + 0.02, lng).unwrap(),
        product: Product::Economy,
    };
    let req = app.ride(&sys.rider_ref(id).unwrap(), RiderCommand::RequestRide(ride));
    match app.next_where("request reply", |m| matches!(m, Outbound::TripUpdate { req: Some(r), .. } | Outbound::Error { req: Some(r), .. } if *r == req)).await {
        Outbound::TripUpdate { trip, .. } => trip.trip_id,
        m => panic!("request failed: {m:?}"),
    }
}

/// Claims `shards` for `holder` (60 s) and fences `store` on each: this node holds them
/// (PostgreSQL). Each shard's epoch.
pub fn hold(
    store: &Store,
    shards: &std::collections::BTreeSet<dispatch_engine::shard::ShardId>,
    holder: &str,
) -> std::collections::BTreeMap<dispatch_engine::shard::ShardId, u64> {
    tokio::task::block_in_place(|| {
        shards
            .iter()
            .map(|&s| {
                let lease = store
                    .claim_lease(s, holder, Duration::from_secs(60))
                    .unwrap()
                    .expect("free");
                store.fence(s, lease.epoch, holder).unwrap();
                (s, lease.epoch)
            })
            .collect()
    })
}

/// A membership node `name` on loopback `port`, linking to the one on `peer`.
pub fn cluster_config(
    name: &str,
    port: u16,
    peer: u16,
    cookie: &str,
) -> dispatch_cluster::ClusterConfig {
    dispatch_cluster::ClusterConfig {
        node_name: name.to_owned(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        peers: vec![format!("127.0.0.1:{peer}")],
        cookie: dispatch_cluster::Cookie(cookie.into()),
        heartbeat: Duration::from_millis(100),
        peer_timeout: Duration::from_millis(1_000),
        tls: None,
    }
}

/// One node of a linked pair (`border.rs`, `remote.rs`, `spawn.rs`): its membership, its
/// system, its router's side of the remote messages, the directory of its sled store and
/// its PostgreSQL store, when it has one.
pub struct Node {
    pub cluster: dispatch_cluster::Cluster,
    pub sys: System,
    pub remote: Arc<dispatch_actors::remote::Remote>,
    pub dir: tempfile::TempDir,
    pub store: Option<Arc<Store>>,
}

/// Starts `sys`'s router as node `name` (at most `max_inflight` messages in flight per
/// peer each way) and a membership node on loopback `port` linking to the one on `peer`.
pub async fn join(
    sys: System,
    (dir, store): (tempfile::TempDir, Option<Arc<Store>>),
    (name, port, peer): (&str, u16, u16),
    cookie: &str,
    max_inflight: usize,
) -> Node {
    let (_router, remote) = sys.start_router(name, max_inflight).await.unwrap();
    let cluster = dispatch_cluster::Cluster::start(
        cluster_config(name, port, peer, cookie),
        &prometheus::Registry::new(),
    )
    .await
    .unwrap();
    Node {
        cluster,
        sys,
        remote,
        dir,
        store,
    }
}

/// Two nodes, each a system `start` makes (with its sled directory and PostgreSQL store,
/// if any), joined as `a` and `b` (name, port) with at most `max_inflight` (a's, b's)
/// messages in flight per peer, once each reaches the other's router.
pub async fn pair<F, Fut>(
    (a, b): ((&str, u16), (&str, u16)),
    cookie: &str,
    max_inflight: (usize, usize),
    start: F,
) -> (Node, Node)
where
    F: Fn() -> Fut,
    Fut: Future<Output = (System, tempfile::TempDir, Option<Arc<Store>>)>,
{
    let (sys, dir, store) = start().await;
    let na = join(sys, (dir, store), (a.0, a.1, b.1), cookie, max_inflight.0).await;
    let (sys, dir, store) = start().await;
    let nb = join(sys, (dir, store), (b.0, b.1, a.1), cookie, max_inflight.1).await;
    linked((&na, a.0), (&nb, b.0)).await;
    (na, nb)
}

/// A trip's state and driver as `store` holds them.
pub fn stored_state(store: &Store, t: &TripId) -> (TripState, Option<DriverId>) {
    let t = tokio::task::block_in_place(|| store.trip(t))
        .unwrap()
        .unwrap()
        .trip;
    (t.state(), t.driver_id().cloned())
}

/// Waits until each of two joined nodes reaches the other's router over the link.
pub async fn linked(a: (&Node, &str), b: (&Node, &str)) {
    let reaches = |from: &Node, to: &str| {
        dispatch_actors::remote::router_of(&from.remote, to).is_some_and(|c| !c.get_id().is_local())
    };
    eventually("each node reaches the other's router over the link", || {
        reaches(a.0, b.1) && reaches(b.0, a.1)
    })
    .await;
}

/// Stops each node's membership, then its system.
pub async fn stop_nodes(nodes: impl IntoIterator<Item = Node>) {
    for n in nodes {
        n.cluster.stop().await;
        n.sys.shutdown().await;
    }
}
