//! The axum server: REST ([`http`]), WebSocket sessions ([`ws`]), and [`run`], which serves
//! a bound listener until a shutdown future resolves.
//!
//! Shutdown drains in order: stop accepting and mark not-ready, close every session with
//! 1001, stop the actors. It is bounded by `--shutdown-timeout-ms`.

pub mod auth;
pub mod config;
pub mod decode;
pub mod http;
pub mod render;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispatch_actors::{Metrics, System};
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Args, Config, LogFormat};

/// Transport-level metrics, registered in the same registry as the actors'.
#[derive(Debug)]
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
    /// Flips to true when the server begins to shut down; sessions watch it.
    pub shutdown: watch::Receiver<bool>,
}

pub type App = Arc<AppInner>;

/// Serves `listener` with `config` until `shutdown` resolves, then drains and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let system = System::start(config.system.clone(), metrics.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let app: App = Arc::new(AppInner {
        transport: TransportMetrics::new(&metrics),
        config: config.clone(),
        system: system.clone(),
        metrics,
        ready: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        started: Instant::now(),
        shutdown: stop_rx,
    });

    // Expired quotes are swept so the quote table stays bounded by rate × TTL.
    let sweeper = {
        let system = system.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            loop {
                every.tick().await;
                system.sweep_quotes();
            }
        })
    };

    // Nothing to recover yet: ready as soon as the actors are up.
    app.ready.store(true, Ordering::Release);
    tracing::info!(listen = %listener.local_addr()?, "dispatchd ready");

    let router = http::router(app.clone());
    let app2 = app.clone();
    let graceful = async move {
        shutdown.await;
        tracing::info!("shutting down: no new sessions, closing open ones");
        app2.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
    };
    let serve = axum::serve(listener, router).with_graceful_shutdown(graceful);
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
    sweeper.abort();
    system.shutdown().await;
    tracing::info!("dispatchd stopped");
    result
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
