//! The axum server: REST ([`http`]), WebSocket sessions ([`ws`]), and [`run`], which serves
//! a bound listener until a shutdown future resolves.
//!
//! Shutdown drains in order: stop accepting and mark not-ready, close every session with
//! 1001, stop the actors. It is bounded by `--shutdown-timeout-ms`.

pub mod admin;
pub mod asyncapi;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod console;
pub mod decode;
pub mod failover;
pub mod forward;
pub mod http;
pub mod jwt;
pub mod migrate;
pub mod openapi;
pub mod ratelimit;
pub mod relay;
pub mod render;
pub mod sharded;
pub mod shards;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispatch_actors::{Metrics, System};
use dispatch_persistence::Store;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Args, Config, LogFormat};

/// Transport-level metrics, registered in the same registry as the actors'.
#[derive(Debug, Clone)]
pub struct TransportMetrics {
    pub sessions: IntGaugeVec,
    pub ws_messages: IntCounterVec,
    pub http_requests: IntCounterVec,
}

impl TransportMetrics {
    fn new(m: &Metrics) -> Self {
        let sessions = IntGaugeVec::new(
            Opts::new("dispatch_ws_sessions", "Open WebSocket sessions by role"),
            &["role"],
        )
        .unwrap();
        let ws_messages = IntCounterVec::new(
            Opts::new(
                "dispatch_ws_messages_total",
                "WebSocket messages by role and direction",
            ),
            &["role", "direction"],
        )
        .unwrap();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "dispatch_http_requests_total",
                "REST requests by route and status",
            ),
            &["route", "status"],
        )
        .unwrap();
        m.registry
            .register(Box::new(sessions.clone()))
            .expect("unique");
        m.registry
            .register(Box::new(ws_messages.clone()))
            .expect("unique");
        m.registry
            .register(Box::new(http_requests.clone()))
            .expect("unique");
        // Every series of the closed label sets exists from the first scrape.
        for role in ["driver", "rider"] {
            sessions.with_label_values(&[role]);
            for direction in ["in", "out"] {
                ws_messages.with_label_values(&[role, direction]);
            }
        }
        Self {
            sessions,
            ws_messages,
            http_requests,
        }
    }
}

/// Shared state of every handler.
pub struct AppInner {
    pub config: Config,
    pub system: System,
    pub metrics: Arc<Metrics>,
    pub transport: TransportMetrics,
    pub ready: AtomicBool,
    pub connections: AtomicUsize,
    pub started: Instant,
    /// SHA-256 of the admin token (`--admin-token` or `<data-dir>/admin.token`).
    pub admin_token_hash: [u8; 32],
    /// Flips to true when the server begins to shut down; sessions watch it.
    pub shutdown: watch::Receiver<bool>,
    /// The per-address limit on registration.
    pub register_limit: ratelimit::RegisterLimit,
    /// Own tokens and the identity provider's JWTs (one per process: its metrics are
    /// registered once, and cluster mode's terms share it).
    pub auth: Arc<jwt::Auth>,
    /// The operator's console: its feeds and the last minute's counters.
    pub console: console::Console,
    /// Why sessions are closed when `shutdown` flips (their close frame's reason); unset:
    /// "server shutting down".
    pub stop_reason: std::sync::OnceLock<&'static str>,
    /// In cluster mode, until when this leader term may answer clients.
    pub term: Option<Arc<failover::TermClock>>,
    /// Cluster membership (`--cluster-listen`), for `/admin/cluster`.
    pub cluster: Option<Arc<dispatch_cluster::Cluster>>,
    /// Sharded cluster mode (`--cluster-mode sharded`): which accounts this node serves,
    /// and who serves the others (`sharded::Here::check_here`).
    pub sharded: Option<Arc<sharded::Here>>,
}

pub type App = Arc<AppInner>;

/// Opens the store in `--data-dir` (refusing a directory another process holds),
/// serves `listener` at once with `/readyz` 503 while the state is recovered, then
/// serves clients until `shutdown` resolves, drains, and flushes.
///
/// Returns an error when the store cannot be opened or a stored record cannot be read;
/// nothing on disk is changed then.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    match config.cluster.as_ref().map(|c| c.mode) {
        Some(config::ClusterMode::Leader) => {
            return failover::run(listener, config, shutdown).await;
        }
        Some(config::ClusterMode::Sharded) => {
            return sharded::run(listener, config, shutdown).await;
        }
        None => {}
    }
    let metrics = Arc::new(Metrics::new());
    // Spans dropped at the OTLP export's full queue (none when traces are off).
    crate::telemetry::count_drops_in(metrics.bounds_hit.with_label_values(&["otlp_span_queue"]));
    let (store, admin_token_hash) = open_store(&config, &metrics).await?;
    metrics.set_slow_handler_ms(config.slow_handler_ms);
    // The data directory, or the database without its password.
    let store_name = format!("{} {}", store.kind(), store.dir().display());
    let system = System::start(config.system.clone(), metrics.clone(), Arc::new(store))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let transport = TransportMetrics::new(&metrics);
    let auth = Arc::new(jwt::Auth::new(&config.auth, metrics.clone()));
    let app = new_app(
        &config,
        (&system, &transport, &auth),
        admin_token_hash,
        stop_rx,
        None,
        None,
        None,
    );
    let local = listener.local_addr()?;
    let matching = match config.system.matching {
        dispatch_actors::batch::Matching::Greedy => "greedy".to_owned(),
        dispatch_actors::batch::Matching::Batch { window_ms } => format!("batch {window_ms} ms"),
    };
    tracing::info!(listen = %local, data_dir = %config.data_dir.display(), store = %store_name, matching = %matching, "dispatchd serving; recovering state");

    // Recovery runs while the listener already answers `/healthz` and `/readyz` (503).
    let (recovery, failed_rx) = spawn_recovery(&app, move |ms| {
        tracing::info!(listen = %local, recovery_ms = ms, "dispatchd ready");
    });

    let tasks = Tasks::start(&app);

    let router = http::router(app.clone());
    // The operator routes on their own address, stopping with the rest.
    let admin_server = match config.admin_listen {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--admin-listen): {e}"))?;
            tracing::info!(admin_listen = %l.local_addr()?, "admin and metrics served apart");
            let mut stop = app.shutdown.clone();
            let admin = http::admin_router(app.clone());
            Some(tokio::spawn(async move {
                let _ = axum::serve(l, admin)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
            }))
        }
    };
    let app2 = app.clone();
    let recovery_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let recovery_error2 = recovery_error.clone();
    let graceful = async move {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down: no new sessions, closing open ones"),
            Ok(e) = failed_rx => { *recovery_error2.lock().unwrap() = Some(e); }
        }
        app2.ready.store(false, Ordering::Release);
        app2.metrics.ready.set(0);
        let _ = stop_tx.send(true);
    };
    // The peer address is what the registration limit keys on (see `ratelimit`).
    let serve = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(graceful);
    let timeout = Duration::from_millis(config.shutdown_timeout_ms);
    let served = serve.into_future();
    // The timeout only starts counting once shutdown has begun.
    let mut stop_watch = app.shutdown.clone();
    tokio::pin!(served);
    let result = tokio::select! {
        r = &mut served => r.map_err(anyhow::Error::from),
        _ = async {
            let _ = stop_watch.wait_for(|s| *s).await;
            tokio::time::sleep(timeout).await;
        } => {
            tracing::warn!(timeout_ms = config.shutdown_timeout_ms, "graceful shutdown timed out; closing anyway");
            Ok(())
        }
    };
    recovery.abort();
    tasks.abort();
    if let Some(a) = admin_server {
        a.abort();
    }
    // Actors stop, the last positions are written, and everything queued is flushed.
    system.shutdown().await;
    if let Some(e) = recovery_error.lock().unwrap().take() {
        return Err(anyhow::anyhow!(e));
    }
    tracing::info!("dispatchd stopped");
    result
}

/// Opens the store `--store` names, and reads (or makes) the admin token.
async fn open_store(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<(Store, [u8; 32])> {
    let store = {
        let dir = config.data_dir.clone();
        let m = metrics.clone();
        let on_flush = move |f: dispatch_persistence::FlushStats| m.store_flushed(&f);
        let choice = config.store.clone();
        tokio::task::spawn_blocking(move || match choice {
            config::StoreConfig::Sled => Store::open(&dir, on_flush),
            config::StoreConfig::Postgres(o) => Store::open_postgres(o, on_flush),
        })
        .await??
    };
    let admin_token_hash = {
        let given = config.admin_token.clone();
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || auth::admin_token_hash(given.as_deref(), &dir))
            .await??
    };
    Ok((store, admin_token_hash))
}

/// The handlers' shared state over a started `system` (one per serving term in cluster
/// mode, one per process otherwise); not ready until recovery says so.
fn new_app(
    config: &Config,
    (system, transport, auth): (&System, &TransportMetrics, &Arc<jwt::Auth>),
    admin_token_hash: [u8; 32],
    shutdown: watch::Receiver<bool>,
    term: Option<Arc<failover::TermClock>>,
    cluster: Option<Arc<dispatch_cluster::Cluster>>,
    sharded: Option<Arc<sharded::Here>>,
) -> App {
    Arc::new(AppInner {
        transport: transport.clone(),
        config: config.clone(),
        system: system.clone(),
        auth: auth.clone(),
        metrics: system.metrics().clone(),
        ready: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        started: Instant::now(),
        admin_token_hash,
        shutdown,
        register_limit: ratelimit::RegisterLimit::new(&config.register_limit),
        console: console::Console::new(config.console_tiles_url.clone()),
        stop_reason: std::sync::OnceLock::new(),
        term,
        cluster,
        sharded,
    })
}

/// What both cluster modes start with, shared across their terms and shards: the
/// metrics, membership (`--cluster-listen`, first, so the member set forms while the
/// store opens), the store and the admin token's hash, and the per-process transport
/// series, token resolution, relay series and forward series (in both modes, at zero in
/// leader mode, which forwards nothing: one set of names for every cluster's dashboards).
struct ClusterBase {
    metrics: Arc<Metrics>,
    membership: Option<Arc<dispatch_cluster::Cluster>>,
    store: Arc<Store>,
    admin_token_hash: [u8; 32],
    transport: TransportMetrics,
    auth: Arc<jwt::Auth>,
    relay_metrics: relay::RelayMetrics,
    forward_metrics: forward::ForwardMetrics,
}

impl ClusterBase {
    async fn start(config: &Config) -> anyhow::Result<ClusterBase> {
        let metrics = Arc::new(Metrics::new());
        crate::telemetry::count_drops_in(
            metrics.bounds_hit.with_label_values(&["otlp_span_queue"]),
        );
        let membership = cluster::start(config, &metrics).await?;
        let (store, admin_token_hash) = open_store(config, &metrics).await?;
        metrics.set_slow_handler_ms(config.slow_handler_ms);
        Ok(ClusterBase {
            transport: TransportMetrics::new(&metrics),
            auth: Arc::new(jwt::Auth::new(&config.auth, metrics.clone())),
            relay_metrics: relay::RelayMetrics::new(&metrics),
            forward_metrics: forward::ForwardMetrics::new(&metrics)?,
            metrics,
            membership,
            store: Arc::new(store),
            admin_token_hash,
        })
    }
}

/// Serves `listener` with `router` (the peer address available to handlers) until `stop`
/// turns true; cluster modes run their listeners through this.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the listener failed");
        }
    })
}

/// The listeners of a cluster mode: `listener` with `client`, and `--admin-listen` (when
/// set) with `admin`; they stop when the returned sender sends `true`.
async fn serve_listeners(
    listener: TcpListener,
    config: &Config,
    client: axum::Router,
    admin: impl FnOnce() -> axum::Router,
) -> anyhow::Result<(watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>)> {
    let (stop_tx, stop) = watch::channel(false);
    let mut servers = vec![serve(listener, client, stop.clone())];
    if let Some(addr) = config.admin_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (--admin-listen): {e}"))?;
        tracing::info!(admin_listen = %l.local_addr()?, "admin and metrics served apart");
        servers.push(serve(l, admin(), stop));
    }
    Ok((stop_tx, servers))
}

/// Stops the listeners of [`serve_listeners`]: open requests finish, bounded by
/// `--shutdown-timeout-ms`.
async fn stop_listeners(
    (stop, servers): (watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>),
    config: &Config,
) {
    let _ = stop.send(true);
    let wait = Duration::from_millis(config.shutdown_timeout_ms);
    for s in servers {
        if tokio::time::timeout(wait, s).await.is_err() {
            tracing::warn!(
                timeout_ms = config.shutdown_timeout_ms,
                "graceful shutdown timed out; closing anyway"
            );
        }
    }
}

/// Recovers the state from the store in the background (the listener already answers
/// `/readyz` 503 meanwhile): on success marks the app ready and calls `ready` with the
/// recovery's milliseconds; on failure the receiver gets the error, which stops the node.
/// One node at start, and each leader term in cluster mode.
pub(crate) fn spawn_recovery(
    app: &App,
    ready: impl FnOnce(u64) + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<String>,
) {
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    let app = app.clone();
    let task = tokio::spawn(async move {
        match app.system.recover().await {
            Ok(stats) => {
                app.ready.store(true, Ordering::Release);
                app.metrics.ready.set(1);
                ready(stats.elapsed_ms);
            }
            Err(e) => {
                tracing::error!(error = %e, "recovery failed");
                let _ = failed_tx.send(e.to_string());
            }
        }
    });
    (task, failed_rx)
}

/// The background work of a serving system: its own timers (position snapshots, the
/// quote sweep, surge), the JWKS refresh and the console's sampler.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn start(app: &App) -> Tasks {
        let mut t = vec![
            app.system.spawn_timers(),
            console::spawn_sampler(app.clone()),
        ];
        t.extend(app.auth.spawn_refresh());
        Tasks(t)
    }

    fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
