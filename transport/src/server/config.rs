//! `dispatchd`'s one configuration: flags, each with an environment variable, validated
//! once at start into a [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use dispatch_actors::SystemConfig;
use dispatch_actors::payments::ProviderMode;
use dispatch_engine::{
    DispatchConfig, Grid, PaymentTerms, Product, RateCard, RateCards, SearchParams,
    StraightLineEta, SurgeConfig,
};

/// The largest `--max-frame-bytes` with cluster links: half a link frame less 1 KiB.
const RELAYED_FRAME_MAX: u64 = dispatch_cluster::MAX_FRAME_BYTES / 2 - 1024;

/// How trips get their drivers (issue 17; the README's study says when to choose which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MatchingMode {
    /// Each request offers its nearest available drivers in turn, at once.
    Greedy,
    /// The requests of each `--match-window-ms` window are assigned together, for the
    /// least total pickup time.
    Batch,
}

/// How the nodes of a cluster share the city (`--cluster-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterMode {
    /// One leader serves the whole city under one lease; the others stand by and relay
    /// sessions to it (`failover`).
    Leader,
    /// Every node serves the shards it owns (`docs/sharding.md`, `sharded`): its own
    /// leases, actors and sessions; the others' through their routers and hosts.
    Sharded,
}

/// Where durable state lives (`--store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// sled, embedded, in `--data-dir` (the default: nothing else to run).
    Sled,
    /// PostgreSQL at `--database-url`.
    Postgres,
}

/// A database URL as given: it may hold a password, so it never prints.
#[derive(Clone)]
pub struct DatabaseUrl(pub String);

impl std::str::FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&dispatch_persistence::redact(&self.0))
    }
}

/// The validated store choice.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sled,
    Postgres(dispatch_persistence::PgOptions),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The real-time ride-hailing dispatch engine.
#[derive(Debug, Clone, Parser)]
#[command(name = "dispatchd", version, about)]
pub struct Args {
    /// Address to listen on for REST and WebSocket clients.
    #[arg(long, env = "DISPATCH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A separate address for `/admin/` and `/metrics` (plus `/healthz`, `/readyz`), so
    /// that only the cluster network reaches them; the client address then serves
    /// neither. Unset: everything on `--listen`.
    #[arg(long, env = "DISPATCH_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Directory for the engine's state.
    #[arg(long, env = "DISPATCH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Where durable state lives: `sled` in `--data-dir`, or `postgres` at
    /// `--database-url` (`--data-dir` then holds only `admin.token`).
    #[arg(long, env = "DISPATCH_STORE", value_enum, default_value_t = StoreKind::Sled)]
    pub store: StoreKind,
    /// PostgreSQL URL for `--store postgres`, e.g. `postgres://user:pw@host:5432/db`
    /// (or `key=value` form). Its password never appears in logs or `/admin/`.
    #[arg(long, env = "DISPATCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,
    /// Bound on one PostgreSQL call, client-side (connecting, waiting for a pooled
    /// connection, a query, a commit); the server's `statement_timeout` is the same.
    #[arg(long, env = "DISPATCH_DATABASE_TIMEOUT_MS", default_value_t = 5_000)]
    pub database_timeout_ms: u64,
    /// PostgreSQL connections at most.
    #[arg(long, env = "DISPATCH_DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: usize,
    /// How long start-up waits for PostgreSQL (retrying with backoff, `/readyz` 503
    /// saying why) before it gives up.
    #[arg(long, env = "DISPATCH_DATABASE_WAIT_MS", default_value_t = 60_000)]
    pub database_wait_ms: u64,
    /// Bearer token for the admin routes.
    #[arg(long, env = "DISPATCH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long one driver has to answer an offer.
    #[arg(long, env = "DISPATCH_OFFER_TIMEOUT_MS", default_value_t = 15_000)]
    pub offer_timeout_ms: u64,
    /// How long a trip may stay in `dispatching` before it ends `no_driver_found`.
    #[arg(long, env = "DISPATCH_DISPATCH_DEADLINE_MS", default_value_t = 120_000)]
    pub dispatch_deadline_ms: u64,
    /// How long a driver whose session dropped keeps its status.
    #[arg(long, env = "DISPATCH_SESSION_GRACE_MS", default_value_t = 30_000)]
    pub session_grace_ms: u64,
    /// H3 resolution of the driver index (0-15).
    #[arg(long, env = "DISPATCH_H3_RESOLUTION", default_value_t = 7)]
    pub h3_resolution: u8,
    #[arg(long, env = "DISPATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Largest request body or WebSocket frame answered normally; larger gets `too_large`.
    #[arg(long, env = "DISPATCH_MAX_FRAME_BYTES", default_value_t = 16 * 1024)]
    pub max_frame_bytes: usize,
    /// Largest WebSocket message read at all; a larger one closes the connection (1009).
    #[arg(long, env = "DISPATCH_WS_HARD_MAX_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub ws_hard_max_bytes: usize,
    /// Location pings accepted per second per session (a burst of this many is allowed).
    #[arg(long, env = "DISPATCH_LOCATION_MAX_PER_S", default_value_t = 10)]
    pub location_max_per_s: u32,
    /// Messages of any type accepted per second per session (a burst of twice this is
    /// allowed); more are answered `rate_limited` and not acted on.
    #[arg(long, env = "DISPATCH_WS_MESSAGES_MAX_PER_S", default_value_t = 50)]
    pub ws_messages_max_per_s: u32,
    /// A session's messages that actors may hold unanswered at once; more are answered
    /// `rate_limited` and not passed on, so one client cannot fill actors' mailboxes.
    #[arg(long, env = "DISPATCH_WS_IN_FLIGHT_MAX", default_value_t = 32)]
    pub ws_in_flight_max: usize,
    /// Bad messages tolerated per window before the session is closed with 1008.
    #[arg(long, env = "DISPATCH_BAD_MESSAGE_LIMIT", default_value_t = 50)]
    pub bad_message_limit: usize,
    #[arg(long, env = "DISPATCH_BAD_MESSAGE_WINDOW_MS", default_value_t = 10_000)]
    pub bad_message_window_ms: u64,
    /// Messages queued for one session before it is considered stuck and closed (1008).
    #[arg(long, env = "DISPATCH_WS_OUTBOUND_QUEUE_MAX", default_value_t = 256)]
    pub ws_outbound_queue_max: usize,
    /// How often the server pings each WebSocket client (keeps proxies and NATs from
    /// dropping a quiet session). A client not heard from (any frame, pongs included) for
    /// three intervals is disconnected. 0 turns pings off.
    #[arg(long, env = "DISPATCH_WS_PING_INTERVAL_MS", default_value_t = 25_000)]
    pub ws_ping_interval_ms: u64,
    /// Open WebSocket sessions at most; upgrades past it get 503.
    #[arg(long, env = "DISPATCH_MAX_CONNECTIONS", default_value_t = 19_000)]
    pub max_connections: usize,
    /// A browser origin (`https://console.example.com`) allowed to call the REST and
    /// admin routes cross-origin; repeat the flag or separate with commas. Unset: no CORS
    /// headers at all, so browsers allow only same-origin calls.
    #[arg(
        long = "cors-origin",
        env = "DISPATCH_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// A map tile URL template of the operator's own (`https://tiles.example.com/{z}/{x}/{y}.png`)
    /// for the console at `/admin/console`. Unset: the map is drawn without tiles (H3
    /// cells, a scale, a graticule), so it works on an air-gapped cluster.
    #[arg(long, env = "DISPATCH_CONSOLE_TILES_URL")]
    pub console_tiles_url: Option<String>,
    /// Candidates ranked per dispatch search.
    #[arg(long, env = "DISPATCH_SEARCH_K", default_value_t = 10)]
    pub search_k: usize,
    /// Drivers further than this from the pickup are never offered the trip.
    #[arg(long, env = "DISPATCH_SEARCH_MAX_RADIUS_M", default_value_t = 5_000.0)]
    pub search_max_radius_m: f64,
    /// Rings of H3 cells around the pickup cell searched at most.
    #[arg(long, env = "DISPATCH_SEARCH_MAX_RINGS", default_value_t = 8)]
    pub search_max_rings: u32,
    /// `batch` (the default, the README's study: "Which mode to run"): requests of one
    /// window are assigned together (each trip's first offer then waits up to the
    /// window). `greedy`: nearest driver at once.
    #[arg(long, env = "DISPATCH_MATCHING", value_enum, default_value_t = MatchingMode::Batch)]
    pub matching: MatchingMode,
    /// The batch window (`--matching batch`), 1–60000 ms.
    #[arg(long, env = "DISPATCH_MATCH_WINDOW_MS", default_value_t = 2_000)]
    pub match_window_ms: u64,
    /// The most requests in one assignment problem (`--matching batch`); a larger group
    /// of nearby requests is solved in slices of this many (counted).
    #[arg(long, env = "DISPATCH_MATCH_MAX_BATCH", default_value_t = 64)]
    pub match_max_batch: usize,
    /// How long one search may wait for the cell actors it asks, all rings together; a
    /// cell that has not answered by then is left out (and counted).
    #[arg(long, env = "DISPATCH_SEARCH_TIMEOUT_MS", default_value_t = 2_000)]
    pub search_timeout_ms: u64,
    /// How long one request to the payment provider may take before it counts as
    /// unavailable (the command is refused `unavailable`, and a retry is safe).
    #[arg(long, env = "DISPATCH_PAYMENT_TIMEOUT_MS", default_value_t = 5_000)]
    pub payment_timeout_ms: u64,
    /// How long an upfront quote stays valid.
    #[arg(long, env = "DISPATCH_QUOTE_TTL_MS", default_value_t = 120_000)]
    pub quote_ttl_ms: u64,
    /// Road distance over straight-line distance, for ETAs and fares.
    #[arg(long, env = "DISPATCH_ETA_DETOUR_FACTOR", default_value_t = 1.3)]
    pub eta_detour_factor: f64,
    /// Average city driving speed, for ETAs and fares.
    #[arg(long, env = "DISPATCH_ETA_SPEED_MPS", default_value_t = 8.33)]
    pub eta_speed_mps: f64,
    /// ISO 4217 currency of every fare.
    #[arg(long, env = "DISPATCH_CURRENCY", default_value = "USD")]
    pub currency: String,
    /// How often moved drivers' positions are written to disk (positions between
    /// snapshots are not durable).
    #[arg(long, env = "DISPATCH_SNAPSHOT_INTERVAL_MS", default_value_t = 5_000)]
    pub snapshot_interval_ms: u64,
    /// A JSON file of rate cards, in the shape of `GET /admin/pricing`. Used when no
    /// operator has set pricing through `PUT /admin/pricing` (that, once set, is kept).
    #[arg(long, env = "DISPATCH_PRICING_FILE")]
    pub pricing_file: Option<PathBuf>,
    /// The platform's commission on a fare, in basis points (2500 = 25%).
    #[arg(long, env = "DISPATCH_COMMISSION_BPS", default_value_t = 2500)]
    pub commission_bps: u32,
    /// A rider's cancel this long after a driver was assigned costs the cancellation fee.
    #[arg(long, env = "DISPATCH_CANCEL_GRACE_MS", default_value_t = 120_000)]
    pub cancel_grace_ms: u64,
    /// So does one this long after the driver arrived at the pickup.
    #[arg(long, env = "DISPATCH_NO_SHOW_WAIT_MS", default_value_t = 300_000)]
    pub no_show_wait_ms: u64,
    /// What the in-process payment provider does: approve, decline (authorizations) or
    /// fail (every request). It stands in for a card processor.
    #[arg(
        long,
        env = "DISPATCH_PAYMENTS_PROVIDER_MODE",
        default_value = "approve"
    )]
    pub payments_provider_mode: String,
    /// H3 resolution of surge cells (coarser than --h3-resolution).
    #[arg(long, env = "DISPATCH_SURGE_RESOLUTION", default_value_t = 6)]
    pub surge_resolution: u8,
    /// Requests in this window count as a surge cell's demand.
    #[arg(long, env = "DISPATCH_SURGE_WINDOW_MS", default_value_t = 300_000)]
    pub surge_window_ms: u64,
    /// The highest surge multiplier.
    #[arg(long, env = "DISPATCH_SURGE_CAP", default_value_t = 3.0)]
    pub surge_cap: f64,
    /// Surge multipliers move in steps of this size.
    #[arg(long, env = "DISPATCH_SURGE_STEP", default_value_t = 0.1)]
    pub surge_step: f64,
    /// How often surge multipliers are recomputed.
    #[arg(long, env = "DISPATCH_SURGE_UPDATE_MS", default_value_t = 10_000)]
    pub surge_update_ms: u64,
    /// An actor message or client frame handled slower than this is logged as a warning
    /// naming the actor group and the message kind.
    #[arg(long, env = "DISPATCH_SLOW_HANDLER_MS", default_value_t = 250)]
    pub slow_handler_ms: u64,
    /// Time allowed for a graceful shutdown before the process exits anyway.
    #[arg(long, env = "DISPATCH_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
    /// This node's name in a cluster (issue 16): unique, stable across restarts (a
    /// StatefulSet pod's name). Given, cluster mode is on: nodes that share one
    /// PostgreSQL store (`--store postgres`) share the city as `--cluster-mode` says
    /// (by default each serves the shards it owns). Unset: one node, as always, whatever
    /// `--cluster-mode` would say.
    #[arg(long, env = "DISPATCH_NODE_NAME")]
    node_name: Option<String>,
    /// How long a lease lasts without renewal (cluster mode): a dead or paused leader's
    /// work is served again by a standby about this long after its last renewal.
    #[arg(long, env = "DISPATCH_LEASE_TTL_MS", default_value_t = 5_000)]
    pub lease_ttl_ms: u64,
    /// How often the leader renews its lease and a standby tries to claim it (cluster
    /// mode). Default: a third of `--lease-ttl-ms`; it must be under half of it.
    #[arg(long, env = "DISPATCH_LEASE_RENEW_MS")]
    pub lease_renew_ms: Option<u64>,
    /// The city's service area (cluster mode), `lat1,lng1,lat2,lng2`: two opposite
    /// corners of a box. Its H3 resolution-6 cells are the cell shards whose leases the
    /// nodes share out (`docs/sharding.md` §4); at most 20,000 of them. Unset: the cell
    /// shards trips are stored in.
    #[arg(long, env = "DISPATCH_SERVICE_AREA")]
    pub service_area: Option<String>,
    /// How the nodes share the city (cluster mode, with `--node-name`): `sharded` (the
    /// default: each node serves the shards it owns, `docs/sharding.md`) or `leader` (one
    /// node serves it all, the others stand by and take over).
    #[arg(long, env = "DISPATCH_CLUSTER_MODE", value_enum)]
    pub cluster_mode: Option<ClusterMode>,
    /// Traces over OTLP: `--otlp-*` (see `crate::telemetry`).
    #[command(flatten)]
    pub traces: crate::telemetry::TraceArgs,
    #[command(flatten)]
    pub register_limit: super::ratelimit::RateLimitArgs,
    #[command(flatten)]
    pub auth: super::jwt::JwtArgs,
    /// Cluster membership: `--cluster-*` (see `super::cluster`).
    #[command(flatten)]
    pub cluster: super::cluster::ClusterArgs,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub ws_ping_interval_ms: u64,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    pub admin_token: Option<String>,
    pub log_format: LogFormat,
    pub max_frame_bytes: usize,
    pub ws_hard_max_bytes: usize,
    pub location_max_per_s: u32,
    pub ws_messages_max_per_s: u32,
    pub ws_in_flight_max: usize,
    pub bad_message_limit: usize,
    pub bad_message_window_ms: u64,
    pub max_connections: usize,
    /// `--cors-origin`, each checked to be a bare `scheme://host[:port]`.
    pub cors_origins: Vec<String>,
    /// `--console-tiles-url`, checked by `console::check_tiles_url`.
    pub console_tiles_url: Option<String>,
    pub shutdown_timeout_ms: u64,
    pub slow_handler_ms: u64,
    pub system: SystemConfig,
    pub traces: crate::telemetry::TraceConfig,
    /// `--register-rate-per-s`, `--register-burst`, `--trusted-proxy`.
    pub register_limit: super::ratelimit::RateLimitConfig,
    /// `--auth-own-tokens` and the `--auth-jwt-*` flags.
    pub auth: super::jwt::AuthConfig,
    /// `--node-name` and the lease durations: cluster mode (standby takeover), if set.
    pub cluster: Option<ClusterConfig>,
    /// `--node-name`.
    pub node_name: Option<String>,
    /// Membership, when `--cluster-listen` is given (the cookie redacted in `Debug`).
    pub membership: Option<dispatch_cluster::ClusterConfig>,
}

/// Cluster mode's settings (`--node-name`, `--lease-ttl-ms`, `--lease-renew-ms`,
/// `--service-area`); see [`super::failover`] and [`super::shards`].
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_name: String,
    pub lease_ttl: std::time::Duration,
    pub lease_renew: std::time::Duration,
    /// The cell shards of `--service-area`, in order; `None` when it is not set.
    pub service_area: Option<std::sync::Arc<[dispatch_engine::shard::ShardId]>>,
    /// `--cluster-mode`.
    pub mode: ClusterMode,
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_owned()) }
}

impl Args {
    /// Checks every value once, so a bad flag fails at start with a clear message.
    pub fn build_and_validate(self) -> Result<Config, String> {
        let grid = Grid::new(self.h3_resolution).map_err(|e| format!("--h3-resolution: {e}"))?;
        check(
            self.offer_timeout_ms > 0,
            "--offer-timeout-ms must be positive",
        )?;
        check(
            self.dispatch_deadline_ms > 0,
            "--dispatch-deadline-ms must be positive",
        )?;
        check(
            self.max_frame_bytes >= 256,
            "--max-frame-bytes must be at least 256",
        )?;
        check(
            self.ws_hard_max_bytes >= self.max_frame_bytes,
            "--ws-hard-max-bytes must be at least --max-frame-bytes",
        )?;
        // A relayed client frame crosses a cluster link re-escaped in JSON (up to twice
        // its length, plus the envelope), and the link closes on a frame over its limit,
        // taking every relayed session of that standby with it.
        check(
            self.cluster.cluster_listen.is_none()
                || (self.max_frame_bytes as u64) <= RELAYED_FRAME_MAX,
            "--max-frame-bytes must be at most 130048 with --cluster-listen (a relayed frame must fit a cluster link's 256 KiB frame)",
        )?;
        check(
            self.location_max_per_s > 0,
            "--location-max-per-s must be positive",
        )?;
        check(
            self.ws_messages_max_per_s > 0,
            "--ws-messages-max-per-s must be positive",
        )?;
        check(
            self.ws_in_flight_max > 0,
            "--ws-in-flight-max must be positive",
        )?;
        for o in &self.cors_origins {
            cors_origin(o)?;
        }
        if let Some(u) = &self.console_tiles_url {
            super::console::check_tiles_url(u)?;
        }
        check(
            self.bad_message_window_ms > 0,
            "--bad-message-window-ms must be positive",
        )?;
        check(
            self.ws_outbound_queue_max >= 8,
            "--ws-outbound-queue-max must be at least 8",
        )?;
        check(
            self.max_connections > 0,
            "--max-connections must be positive",
        )?;
        check(
            (1..=100).contains(&self.search_k),
            "--search-k must be in 1..=100",
        )?;
        check(
            self.search_max_radius_m.is_finite()
                && self.search_max_radius_m > 0.0
                && self.search_max_radius_m <= 50_000.0,
            "--search-max-radius-m must be in (0, 50000]",
        )?;
        check(
            (1..=30).contains(&self.search_max_rings),
            "--search-max-rings must be in 1..=30",
        )?;
        check(
            (1..=60_000).contains(&self.match_window_ms),
            "--match-window-ms must be in 1..=60000",
        )?;
        // A trip's first offer waits up to the window, and its dispatch deadline counts
        // from entering `dispatching`: a window as long as the deadline ends every trip
        // `no_driver_found` before its first window closes. The offer timeout is not
        // compared: it bounds how long one driver holds an offer, which the window does
        // not shorten or lengthen (docs/api.md, "Batched matching").
        check(
            self.matching != MatchingMode::Batch
                || self.match_window_ms < self.dispatch_deadline_ms,
            &format!(
                "--match-window-ms ({}) must be shorter than --dispatch-deadline-ms ({}) with --matching batch: a trip's first offer waits up to the window, and the deadline would end it first",
                self.match_window_ms, self.dispatch_deadline_ms
            ),
        )?;
        check(
            (1..=1_024).contains(&self.match_max_batch),
            "--match-max-batch must be in 1..=1024",
        )?;
        check(self.quote_ttl_ms > 0, "--quote-ttl-ms must be positive")?;
        check(
            (10..=60_000).contains(&self.search_timeout_ms),
            "--search-timeout-ms must be from 10 to 60000",
        )?;
        check(
            (10..=600_000).contains(&self.payment_timeout_ms),
            "--payment-timeout-ms must be from 10 to 600000",
        )?;
        check(
            self.snapshot_interval_ms >= 100,
            "--snapshot-interval-ms must be at least 100",
        )?;
        check(
            self.eta_detour_factor.is_finite() && (1.0..=5.0).contains(&self.eta_detour_factor),
            "--eta-detour-factor must be in [1, 5]",
        )?;
        check(
            self.eta_speed_mps.is_finite() && self.eta_speed_mps > 0.5 && self.eta_speed_mps < 60.0,
            "--eta-speed-mps must be in (0.5, 60)",
        )?;
        check(
            self.currency.len() == 3 && self.currency.chars().all(|c| c.is_ascii_uppercase()),
            "--currency must be a three-letter ISO 4217 code such as USD",
        )?;
        if let Some(t) = &self.admin_token {
            check(
                t.len() >= 16,
                "--admin-token must be at least 16 characters",
            )?;
        }
        let rates = match &self.pricing_file {
            None => RateCards {
                currency: self.currency.clone(),
                ..RateCards::default()
            },
            Some(path) => pricing_file(path, &self.currency)?,
        };
        let surge = SurgeConfig {
            resolution: self.surge_resolution,
            window_ms: self.surge_window_ms,
            step: self.surge_step,
            cap: self.surge_cap,
            ..SurgeConfig::default()
        };
        surge.validate().map_err(|e| format!("--surge-*: {e}"))?;
        check(
            self.surge_resolution <= self.h3_resolution,
            "--surge-resolution must not be finer than --h3-resolution",
        )?;
        check(
            self.surge_update_ms >= 100,
            "--surge-update-ms must be at least 100",
        )?;
        check(
            self.commission_bps <= 10_000,
            "--commission-bps must be from 0 to 10000",
        )?;
        let provider_mode: ProviderMode = self
            .payments_provider_mode
            .parse()
            .map_err(|_| "--payments-provider-mode must be approve, decline or fail".to_owned())?;
        let system = SystemConfig {
            grid,
            search: SearchParams {
                k: self.search_k,
                max_radius_m: self.search_max_radius_m,
                max_rings: self.search_max_rings,
            },
            dispatch: DispatchConfig {
                offer_timeout_ms: self.offer_timeout_ms,
                dispatch_deadline_ms: self.dispatch_deadline_ms,
            },
            rates,
            eta: Arc::new(StraightLineEta {
                detour_factor: self.eta_detour_factor,
                speed_mps: self.eta_speed_mps,
            }),
            session_grace_ms: self.session_grace_ms,
            quote_ttl_ms: self.quote_ttl_ms,
            ws_outbound_queue_max: self.ws_outbound_queue_max,
            snapshot_interval_ms: self.snapshot_interval_ms,
            search_timeout_ms: self.search_timeout_ms,
            payment_timeout_ms: self.payment_timeout_ms,
            payments: PaymentTerms {
                commission_bps: self.commission_bps,
                cancel_grace_ms: self.cancel_grace_ms,
                no_show_wait_ms: self.no_show_wait_ms,
            },
            provider_mode,
            surge,
            surge_update_ms: self.surge_update_ms,
            // A test hook, deliberately not a flag: see `SystemConfig::crash_after_capture`.
            crash_after_capture: std::env::var("DISPATCH_TEST_CRASH_AFTER").as_deref()
                == Ok("capture"),
            matching: match self.matching {
                MatchingMode::Greedy => dispatch_actors::batch::Matching::Greedy,
                MatchingMode::Batch => dispatch_actors::batch::Matching::Batch {
                    window_ms: self.match_window_ms,
                },
            },
            batch: dispatch_engine::BatchParams {
                max_group: self.match_max_batch,
                ..dispatch_engine::BatchParams::default()
            },
            ..SystemConfig::default()
        };
        if let Some(a) = self.admin_listen {
            check(
                a != self.listen || a.port() == 0,
                "--admin-listen must differ from --listen",
            )?;
        }
        let register_limit = self.register_limit.validate()?;
        let auth = self.auth.validate()?;
        let store = match (self.store, self.database_url) {
            (StoreKind::Sled, None) => StoreConfig::Sled,
            (StoreKind::Sled, Some(_)) => {
                return Err("--database-url is only for --store postgres".to_owned());
            }
            (StoreKind::Postgres, None) => {
                return Err(
                    "--store postgres needs --database-url (or DISPATCH_DATABASE_URL)".to_owned(),
                );
            }
            (StoreKind::Postgres, Some(url)) => {
                if !dispatch_persistence::pg::url_is_valid(&url.0) {
                    return Err(format!(
                        "--database-url is not a PostgreSQL URL (given: {})",
                        dispatch_persistence::redact(&url.0)
                    ));
                }
                check(
                    self.database_timeout_ms >= 100,
                    "--database-timeout-ms must be at least 100",
                )?;
                check(
                    (1..=1000).contains(&self.database_pool_size),
                    "--database-pool-size must be 1 to 1000",
                )?;
                let mut o = dispatch_persistence::PgOptions::new(url.0);
                o.call_timeout = std::time::Duration::from_millis(self.database_timeout_ms);
                o.statement_timeout = o.call_timeout;
                o.pool_size = self.database_pool_size;
                o.start_timeout = std::time::Duration::from_millis(self.database_wait_ms);
                StoreConfig::Postgres(o)
            }
        };
        let membership = self.cluster.validate(self.node_name.as_deref())?;
        let cluster = cluster_config(
            self.node_name.clone(),
            self.lease_ttl_ms,
            self.lease_renew_ms,
            &store,
        )?;
        let cluster = match (cluster, &self.service_area) {
            (Some(mut c), Some(area)) => {
                c.service_area = Some(super::shards::service_area_shards_at(area, grid)?.into());
                Some(c)
            }
            (None, Some(_)) => {
                return Err("--service-area needs --node-name (cluster mode)".to_owned());
            }
            (c, None) => c,
        };
        let cluster = match (cluster, self.cluster_mode) {
            (Some(mut c), Some(mode)) => {
                c.mode = mode;
                Some(c)
            }
            (None, Some(_)) => {
                return Err("--cluster-mode needs --node-name (cluster mode)".to_owned());
            }
            (c, None) => c,
        };
        Ok(Config {
            node_name: self.node_name,
            membership,
            cluster,
            store,
            register_limit,
            auth,
            listen: self.listen,
            admin_listen: self.admin_listen,
            ws_ping_interval_ms: self.ws_ping_interval_ms,
            data_dir: self.data_dir,
            admin_token: self.admin_token,
            log_format: self.log_format,
            max_frame_bytes: self.max_frame_bytes,
            ws_hard_max_bytes: self.ws_hard_max_bytes,
            location_max_per_s: self.location_max_per_s,
            ws_messages_max_per_s: self.ws_messages_max_per_s,
            ws_in_flight_max: self.ws_in_flight_max,
            bad_message_limit: self.bad_message_limit,
            bad_message_window_ms: self.bad_message_window_ms,
            max_connections: self.max_connections,
            cors_origins: self.cors_origins,
            console_tiles_url: self.console_tiles_url,
            shutdown_timeout_ms: self.shutdown_timeout_ms,
            slow_handler_ms: self.slow_handler_ms,
            system,
            traces: self.traces.validate()?,
        })
    }
}

/// Cluster mode from `--node-name` and the lease flags: only on PostgreSQL (the lease
/// lives there), a node name of 1 to 63 letters, digits, `-`, `_` or `.`, and a renewal
/// interval under half the lease, so one lost renewal never ends a term.
fn cluster_config(
    node_name: Option<String>,
    ttl_ms: u64,
    renew_ms: Option<u64>,
    store: &StoreConfig,
) -> Result<Option<ClusterConfig>, String> {
    let Some(name) = node_name else {
        return Ok(None);
    };
    check(
        matches!(store, StoreConfig::Postgres(_)),
        "--node-name (cluster mode) needs --store postgres: the nodes share their state and their lease through PostgreSQL",
    )?;
    check(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
        "--node-name must be 1 to 63 letters, digits, '-', '_' or '.'",
    )?;
    check(
        (500..=600_000).contains(&ttl_ms),
        "--lease-ttl-ms must be from 500 to 600000",
    )?;
    let renew_ms = renew_ms.unwrap_or(ttl_ms / 3);
    check(
        renew_ms >= 50 && renew_ms * 2 < ttl_ms,
        "--lease-renew-ms must be at least 50 and under half of --lease-ttl-ms",
    )?;
    Ok(Some(ClusterConfig {
        node_name: name,
        lease_ttl: std::time::Duration::from_millis(ttl_ms),
        lease_renew: std::time::Duration::from_millis(renew_ms),
        service_area: None,
        // The default mode; `--cluster-mode` overrides it in `build_and_validate`.
        mode: ClusterMode::Sharded,
    }))
}

/// A `--cors-origin` is what a browser sends in `Origin`: `http` or `https`, a host, an
/// optional port, and nothing else (no path, no trailing slash, no wildcard).
fn cors_origin(o: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "--cors-origin {o:?} must be scheme://host[:port], such as https://console.example.com"
        )
    };
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let (host, port) = match rest.strip_prefix('[') {
        // An IPv6 literal: `[::1]` or `[::1]:8081`.
        Some(v6) => {
            let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
            let ok = addr.parse::<std::net::Ipv6Addr>().is_ok();
            match after {
                "" if ok => ("v6", None),
                p if ok && p.starts_with(':') => ("v6", Some(&p[1..])),
                _ => return Err(bad()),
            }
        }
        None => match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    check(host_ok && port_ok, &bad())?;
    axum::http::HeaderValue::from_str(o).map_err(|_| bad())?;
    Ok(())
}

/// Rate cards from a JSON file shaped like `GET /admin/pricing`, checked as `PUT` is.
fn pricing_file(path: &std::path::Path, currency: &str) -> Result<RateCards, String> {
    let at = |e: String| format!("--pricing-file {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
    let file: PricingFile = serde_json::from_str(&text).map_err(|e| at(e.to_string()))?;
    if file.currency != currency {
        return Err(at(format!(
            "currency {} is not --currency {currency}",
            file.currency
        )));
    }
    let p = file.products;
    for (product, card) in [
        (Product::Economy, &p.economy),
        (Product::Xl, &p.xl),
        (Product::Premium, &p.premium),
    ] {
        card.check(product)
            .map_err(|e| at(super::admin::rate_card_message(&e)))?;
    }
    Ok(RateCards {
        currency: currency.to_owned(),
        economy: p.economy,
        xl: p.xl,
        premium: p.premium,
    })
}

#[derive(serde::Deserialize)]
struct PricingFile {
    currency: String,
    products: PricingProducts,
}

#[derive(serde::Deserialize)]
struct PricingProducts {
    economy: RateCard,
    xl: RateCard,
    premium: RateCard,
}

impl Config {
    /// The defaults, as `dispatchd` with no flags would run (for tests and embedding).
    pub fn defaults() -> Config {
        Args::parse_from(["dispatchd"])
            .build_and_validate()
            .expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pricing_file_sets_the_rate_cards_and_a_bad_one_is_named() {
        let dir = std::env::temp_dir().join(format!("dispatch-pricing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pricing.json");
        let card = |base: i64| {
            format!(
                r#"{{"base_cents": {base}, "per_km_cents": 100, "per_minute_cents": 20, "minimum_cents": 600, "booking_fee_cents": 150, "cancellation_fee_cents": 400}}"#
            )
        };
        let body = |currency: &str, base: i64| {
            format!(
                r#"{{"currency": "{currency}", "products": {{"economy": {}, "xl": {}, "premium": {}}}}}"#,
                card(base),
                card(base),
                card(base)
            )
        };
        let parse = |extra: &[&str]| {
            let mut argv = vec!["dispatchd", "--pricing-file", path.to_str().unwrap()];
            argv.extend_from_slice(extra);
            Args::parse_from(argv).build_and_validate()
        };
        std::fs::write(&path, body("USD", 300)).unwrap();
        let c = parse(&[]).unwrap();
        assert_eq!(c.system.rates.economy.base_cents, 300);
        assert_eq!(c.system.rates.xl.booking_fee_cents, 150);
        // Another currency than --currency, a negative rate, a missing field: refused,
        // naming the file.
        let e = parse(&["--currency", "EUR"]).unwrap_err();
        assert!(e.contains("--pricing-file") && e.contains("EUR"), "{e}");
        std::fs::write(&path, body("USD", -1)).unwrap();
        let e = parse(&[]).unwrap_err();
        assert!(e.contains("products.economy.base_cents"), "{e}");
        std::fs::write(&path, r#"{"currency": "USD", "products": {}}"#).unwrap();
        assert!(parse(&[]).unwrap_err().contains("--pricing-file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.system.dispatch.offer_timeout_ms, 15_000);
        let e = Args::parse_from(["dispatchd", "--h3-resolution", "16"])
            .build_and_validate()
            .unwrap_err();
        assert!(e.contains("--h3-resolution"), "{e}");
        let e = Args::parse_from(["dispatchd", "--currency", "dollars"])
            .build_and_validate()
            .unwrap_err();
        assert!(e.contains("--currency"), "{e}");
    }

    #[test]
    fn matching_flags_are_checked_and_reach_the_system() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["dispatchd"];
            argv.extend_from_slice(extra);
            Args::parse_from(argv).build_and_validate()
        };
        use dispatch_actors::batch::Matching;
        assert_eq!(
            Config::defaults().system.matching,
            Matching::Batch { window_ms: 2_000 }
        );
        let c = parse(&["--matching", "batch", "--match-window-ms", "500"]).unwrap();
        assert_eq!(c.system.matching, Matching::Batch { window_ms: 500 });
        let greedy = parse(&["--matching", "greedy"]).unwrap();
        assert_eq!(greedy.system.matching, Matching::Greedy);
        assert!(c.system.ticket_timeout() > greedy.system.ticket_timeout());
        // The window must be shorter than the dispatch deadline, in batch mode only.
        for bad in [
            &["--dispatch-deadline-ms", "2000"][..],
            &["--dispatch-deadline-ms", "1500"],
            &[
                "--matching",
                "batch",
                "--match-window-ms",
                "5000",
                "--dispatch-deadline-ms",
                "5000",
            ],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains("--match-window-ms") && e.contains("--dispatch-deadline-ms"),
                "{e}"
            );
        }
        parse(&["--dispatch-deadline-ms", "2001"]).unwrap();
        parse(&["--matching", "greedy", "--dispatch-deadline-ms", "2000"]).unwrap();
        parse(&["--match-window-ms", "500", "--dispatch-deadline-ms", "2000"]).unwrap();
        // The offer timeout is not compared with the window.
        parse(&["--offer-timeout-ms", "500"]).unwrap();
        for bad in [["--match-window-ms", "0"], ["--match-window-ms", "60001"]] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains("--match-window-ms"), "{e}");
        }
        let e = parse(&["--match-max-batch", "0"]).unwrap_err();
        assert!(e.contains("--match-max-batch"), "{e}");
        assert!(Args::try_parse_from(["dispatchd", "--matching", "auction"]).is_err());
    }

    #[test]
    fn cluster_mode_needs_postgres_and_sane_lease_durations() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["dispatchd"];
            argv.extend_from_slice(extra);
            Args::parse_from(argv).build_and_validate()
        };
        assert!(Config::defaults().cluster.is_none());
        let e = parse(&["--node-name", "n1"]).unwrap_err();
        assert!(
            e.contains("--node-name") && e.contains("--store postgres"),
            "{e}"
        );
        let pg = [
            "--store",
            "postgres",
            "--database-url",
            "postgres://u@localhost/db",
        ];
        let with = |extra: &[&str]| {
            let mut a = pg.to_vec();
            a.extend_from_slice(extra);
            parse(&a)
        };
        assert!(with(&[]).unwrap().cluster.is_none());
        let c = with(&["--node-name", "n1"]).unwrap().cluster.unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.lease_ttl.as_millis(), 5_000);
        assert_eq!(c.lease_renew.as_millis(), 1_666);
        assert!(c.service_area.is_none());
        assert_eq!(c.mode, ClusterMode::Sharded, "sharded is the default");
        let c = with(&["--node-name", "n1", "--cluster-mode", "leader"]);
        assert_eq!(c.unwrap().cluster.unwrap().mode, ClusterMode::Leader);
        let c = with(&["--node-name", "n1", "--cluster-mode", "sharded"]);
        assert_eq!(c.unwrap().cluster.unwrap().mode, ClusterMode::Sharded);
        for mode in ["sharded", "leader"] {
            let e = with(&["--cluster-mode", mode]).unwrap_err();
            assert!(e.contains("--cluster-mode needs --node-name"), "{e}");
        }
        assert!(Args::try_parse_from(["dispatchd", "--cluster-mode", "ring"]).is_err());
        let c = with(&[
            "--node-name",
            "n1",
            "--service-area",
            "45.4,-73.7,45.6,-73.5",
        ])
        .unwrap()
        .cluster
        .unwrap();
        let area = c.service_area.unwrap();
        assert!(area.len() > 5 && area.len() < 100, "{}", area.len());
        // The node's own index resolution decides which shards the area's points map to.
        let fine = with(&[
            "--node-name",
            "n1",
            "--h3-resolution",
            "9",
            "--service-area",
            "45.4,-73.7,45.6,-73.5",
        ])
        .unwrap()
        .cluster
        .unwrap()
        .service_area
        .unwrap();
        let want = super::super::shards::service_area_shards_at(
            "45.4,-73.7,45.6,-73.5",
            Grid::new(9).unwrap(),
        )
        .unwrap();
        assert_eq!(&fine[..], &want[..]);
        let c = with(&[
            "--node-name",
            "n1",
            "--lease-ttl-ms",
            "2000",
            "--lease-renew-ms",
            "500",
        ])
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(
            (c.lease_ttl.as_millis(), c.lease_renew.as_millis()),
            (2_000, 500)
        );
        for (bad, named) in [
            (
                &["--node-name", "n1", "--lease-renew-ms", "2500"][..],
                "--lease-renew-ms",
            ),
            (
                &["--node-name", "n1", "--lease-ttl-ms", "100"],
                "--lease-ttl-ms",
            ),
            (&["--node-name", "n 1"], "--node-name"),
            (&["--node-name", ""], "--node-name"),
            (&["--service-area", "45.4,-73.7,45.6,-73.5"], "--node-name"),
            (
                &["--node-name", "n1", "--service-area", "45.4,-73.7,45.6"],
                "--service-area",
            ),
            (
                &["--node-name", "n1", "--service-area", "0,0,60,60"],
                "--service-area",
            ),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
        // A relayed frame must fit a cluster link's frame.
        let linked = |max: &str| {
            with(&[
                "--node-name",
                "n1",
                "--cluster-listen",
                "127.0.0.1:7000",
                "--cluster-cookie",
                "a-cookie-of-twenty-chars",
                "--max-frame-bytes",
                max,
                "--ws-hard-max-bytes",
                "1000000",
            ])
        };
        assert!(linked("130048").is_ok(), "{:?}", linked("130048").err());
        let e = linked("130049").unwrap_err();
        assert!(e.contains("--max-frame-bytes"), "{e}");
        assert!(
            with(&[
                "--max-frame-bytes",
                "200000",
                "--ws-hard-max-bytes",
                "1000000"
            ])
            .is_ok()
        );
    }

    #[test]
    fn cors_origins_must_be_bare_origins() {
        let parse =
            |v: &str| Args::parse_from(["dispatchd", "--cors-origin", v]).build_and_validate();
        let c = parse("https://console.example.com,http://localhost:3000").unwrap();
        assert_eq!(
            c.cors_origins,
            ["https://console.example.com", "http://localhost:3000"]
        );
        assert!(parse("http://[::1]:8081").is_ok());
        for bad in [
            "*",
            "console.example.com",
            "https://console.example.com/",
            "https://console.example.com/admin",
            "ftp://example.com",
            "https://",
            "https://example.com:0",
            "https://example.com:99999",
            "https://exa mple.com",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("--cors-origin"), "{bad}: {e}");
        }
        assert!(Config::defaults().cors_origins.is_empty());
    }
}
