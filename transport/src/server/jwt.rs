//! Who a bearer token names: this server's own tokens (a SHA-256 lookup, unless
//! `--auth-own-tokens false`), and signed JWTs from the operator's identity provider when
//! `--auth-jwt-jwks-url` is set.
//!
//! A JWT is accepted when its header's `alg` is one of `--auth-jwt-algorithms` (never
//! `none` nor an HMAC one: there is no shared secret), its `kid` names a key of the JWKS
//! whose type fits that algorithm, its signature verifies, `iss` and `aud` are the
//! configured ones, `exp` is present and not past and `nbf` (if any) not ahead (leeway
//! [`LEEWAY_S`]), and the role and id claims are well formed. Every refusal is the same
//! 401 `unauthorized` "unknown token" as an unknown own token, counted in
//! `dispatch_auth_rejected_total{reason}`.
//!
//! The key set is fetched at start and every `--auth-jwt-refresh-ms`, and on a token with
//! a `kid` not in it, at most once per `--auth-jwt-unknown-kid-refresh-ms` (a refresh
//! refused for that is counted as `dispatch_bound_hits_total{bound="jwks_refresh_rate"}`).
//! A fetch is bounded by `--auth-jwt-fetch-timeout-ms` and [`MAX_JWKS_BYTES`]; a request
//! never waits on one longer than the timeout. A failed fetch keeps the keys held. When
//! the answer depends on keys that cannot be had (none ever loaded, or an unknown `kid`
//! while the identity provider is unreachable) a JWT is answered 503 `unavailable`;
//! own tokens are unaffected.
//!
//! Identity: the role claim (`rider` or `driver`) and the id claim (`[A-Za-z0-9_-]`, at
//! most [`MAX_ID_CLAIM`] characters) name `rdr_<id>` or `drv_<id>` (a value that already
//! has the prefix is taken as is). That rider or driver must be registered: with the JWT
//! as bearer, `POST /v1/riders` or `/v1/drivers` stores the profile under that id and
//! mints no token.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dispatch_actors::records::Identity;
use dispatch_actors::{ApiError, ErrorCode, Metrics};
use dispatch_engine::{DriverId, RiderId};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use prometheus::{IntCounterVec, IntGauge, Opts};

use super::http::HttpError;
use super::{App, auth};

/// Largest key set read; a larger answer is a failed fetch.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Keys of a key set kept at most (the rest are ignored).
pub const MAX_KEYS: usize = 64;
/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_S: u64 = 30;
/// Longest id claim.
pub const MAX_ID_CLAIM: usize = 64;

/// Why a token was refused: the `reason` label of `dispatch_auth_rejected_total`.
pub const REASONS: [&str; 12] = [
    "unknown_token",
    "own_tokens_off",
    "malformed",
    "wrong_algorithm",
    "unknown_kid",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "claims",
    "keys_unavailable",
];

/// The flags (flattened into `dispatchd`'s own).
#[derive(Debug, Clone, clap::Args)]
pub struct JwtArgs {
    /// Whether the tokens this server mints at registration are accepted. `false` (with
    /// `--auth-jwt-jwks-url`) leaves the identity provider's JWTs the only way in.
    #[arg(long, env = "DISPATCH_AUTH_OWN_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    pub auth_own_tokens: bool,
    /// The identity provider's JSON Web Key Set (http or https). Set: signed JWTs are
    /// accepted as bearer tokens; `--auth-jwt-issuer` and `--auth-jwt-audience` are then
    /// required.
    #[arg(long, env = "DISPATCH_AUTH_JWT_JWKS_URL")]
    pub auth_jwt_jwks_url: Option<String>,
    /// The `iss` a JWT must carry.
    #[arg(long, env = "DISPATCH_AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,
    /// An `aud` a JWT must carry (this service's name at the identity provider).
    #[arg(long, env = "DISPATCH_AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
    /// The claim whose value, `rider` or `driver`, is the caller's role.
    #[arg(long, env = "DISPATCH_AUTH_JWT_ROLE_CLAIM", default_value = "role")]
    pub auth_jwt_role_claim: String,
    /// The claim whose value names the rider or driver (`rdr_<value>`, `drv_<value>`).
    #[arg(long, env = "DISPATCH_AUTH_JWT_ID_CLAIM", default_value = "sub")]
    pub auth_jwt_id_claim: String,
    /// Signature algorithms accepted (RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384); comma-separated.
    #[arg(
        long,
        env = "DISPATCH_AUTH_JWT_ALGORITHMS",
        value_delimiter = ',',
        default_value = "RS256,ES256"
    )]
    pub auth_jwt_algorithms: Vec<String>,
    /// How often the key set is fetched again.
    #[arg(long, env = "DISPATCH_AUTH_JWT_REFRESH_MS", default_value_t = 300_000)]
    pub auth_jwt_refresh_ms: u64,
    /// A token with an unknown `kid` fetches the key set again at most this often.
    #[arg(
        long,
        env = "DISPATCH_AUTH_JWT_UNKNOWN_KID_REFRESH_MS",
        default_value_t = 10_000
    )]
    pub auth_jwt_unknown_kid_refresh_ms: u64,
    /// One key set fetch (connect, answer, body) takes at most this long; a request waits
    /// on one at most this long.
    #[arg(
        long,
        env = "DISPATCH_AUTH_JWT_FETCH_TIMEOUT_MS",
        default_value_t = 2_000
    )]
    pub auth_jwt_fetch_timeout_ms: u64,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub own_tokens: bool,
    pub jwt: Option<JwtConfig>,
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    pub role_claim: String,
    pub id_claim: String,
    pub algorithms: Vec<Algorithm>,
    pub refresh: Duration,
    pub unknown_kid_refresh: Duration,
    pub fetch_timeout: Duration,
}

const ALGORITHMS: [(&str, Algorithm); 8] = [
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
];

impl JwtArgs {
    pub fn validate(self) -> Result<AuthConfig, String> {
        let Some(url) = self.auth_jwt_jwks_url else {
            if !self.auth_own_tokens {
                return Err(
                    "--auth-own-tokens false needs --auth-jwt-jwks-url: nobody could sign in"
                        .to_owned(),
                );
            }
            return Ok(AuthConfig {
                own_tokens: true,
                jwt: None,
            });
        };
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || reqwest::Url::parse(&url).is_err()
        {
            return Err(format!(
                "--auth-jwt-jwks-url {url:?} must be an http:// or https:// URL"
            ));
        }
        let required = |v: Option<String>, flag: &str| {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| format!("--auth-jwt-jwks-url needs {flag}"))
        };
        let issuer = required(self.auth_jwt_issuer, "--auth-jwt-issuer")?;
        let audience = required(self.auth_jwt_audience, "--auth-jwt-audience")?;
        let mut algorithms = Vec::new();
        for name in &self.auth_jwt_algorithms {
            let alg = ALGORITHMS
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
                .map(|(_, a)| *a)
                .ok_or_else(|| {
                    format!(
                        "--auth-jwt-algorithms: {name:?} is not one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384"
                    )
                })?;
            algorithms.push(alg);
        }
        if algorithms.is_empty() {
            return Err("--auth-jwt-algorithms must name at least one".to_owned());
        }
        for (v, flag) in [
            (self.auth_jwt_refresh_ms, "--auth-jwt-refresh-ms"),
            (
                self.auth_jwt_fetch_timeout_ms,
                "--auth-jwt-fetch-timeout-ms",
            ),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be positive"));
            }
        }
        if self.auth_jwt_role_claim.is_empty() || self.auth_jwt_id_claim.is_empty() {
            return Err("--auth-jwt-role-claim and --auth-jwt-id-claim must be named".to_owned());
        }
        Ok(AuthConfig {
            own_tokens: self.auth_own_tokens,
            jwt: Some(JwtConfig {
                jwks_url: url,
                issuer,
                audience,
                role_claim: self.auth_jwt_role_claim,
                id_claim: self.auth_jwt_id_claim,
                algorithms,
                refresh: Duration::from_millis(self.auth_jwt_refresh_ms),
                unknown_kid_refresh: Duration::from_millis(self.auth_jwt_unknown_kid_refresh_ms),
                fetch_timeout: Duration::from_millis(self.auth_jwt_fetch_timeout_ms),
            }),
        })
    }
}

/// Token resolution, shared by every handler.
pub struct Auth {
    own_tokens: bool,
    jwks: Option<Arc<Jwks>>,
    rejected: IntCounterVec,
    /// JWT ids being registered right now, so that two registrations of one id do not
    /// both write.
    registering: Mutex<HashSet<Identity>>,
}

/// A refusal: 401 for the reason, or 503 when keys could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Reason(&'static str),
    Unavailable,
}

impl Auth {
    pub fn new(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Self {
        let rejected = IntCounterVec::new(
            Opts::new(
                "dispatch_auth_rejected_total",
                "Bearer tokens refused (401, or 503 keys_unavailable), by reason",
            ),
            &["reason"],
        )
        .unwrap();
        metrics
            .registry
            .register(Box::new(rejected.clone()))
            .expect("unique");
        for r in REASONS {
            rejected.with_label_values(&[r]);
        }
        let jwks = cfg
            .jwt
            .as_ref()
            .map(|c| Arc::new(Jwks::new(c.clone(), &metrics)));
        Self {
            own_tokens: cfg.own_tokens,
            jwks,
            rejected,
            registering: Mutex::new(HashSet::new()),
        }
    }

    /// Fetches the key set now and then every `--auth-jwt-refresh-ms` (none without
    /// `--auth-jwt-jwks-url`). The caller aborts the task at shutdown.
    pub fn spawn_refresh(&self) -> Option<tokio::task::JoinHandle<()>> {
        let jwks = self.jwks.clone()?;
        Some(tokio::spawn(async move {
            loop {
                jwks.refresh(Trigger::Schedule, None).await;
                tokio::time::sleep(jwks.cfg.refresh).await;
            }
        }))
    }

    fn refuse(&self, r: Refusal) -> HttpError {
        match r {
            Refusal::Reason(reason) => {
                self.rejected.with_label_values(&[reason]).inc();
                HttpError(ApiError::new(ErrorCode::Unauthorized, "unknown token"))
            }
            Refusal::Unavailable => {
                self.rejected.with_label_values(&["keys_unavailable"]).inc();
                HttpError(ApiError::unavailable(
                    "the identity provider's keys cannot be fetched; retry later",
                ))
            }
        }
    }

    /// A JWT's identity (not checked to be registered), when JWTs are on and `token` is
    /// shaped as one; `None` for anything else.
    async fn jwt(&self, token: &str) -> Option<Result<Identity, HttpError>> {
        let jwks = self.jwks.as_ref()?;
        if token.split('.').count() != 3 {
            return None;
        }
        Some(jwks.verify(token).await.map_err(|r| self.refuse(r)))
    }
}

/// The caller a bearer token names: a registered rider or driver, else 401 (403 for a
/// valid JWT whose rider or driver is not registered yet; 503 when JWT keys cannot be
/// had).
pub async fn identify(app: &App, token: &str) -> Result<Identity, HttpError> {
    resolve(app, verify(&app.auth, token).await?)
}

/// What a bearer token proves before the registry is asked: a JWT's verified identity,
/// or the hash of an own token. A standby verifies a token this far and its leader
/// resolves the rest ([`resolve`]): only the leader holds the registry.
/// `Own`'s `shard`: the entity shard the token names (`tok_<shard>.…`, minted in sharded
/// mode), for routing; `None` for a token minted before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    Jwt(Identity),
    Own {
        hash: [u8; 32],
        shard: Option<dispatch_engine::shard::ShardId>,
    },
}

impl Proof {
    /// The entity shard of the account this proof names, as far as it tells without the
    /// registry: a JWT's identity's, an own token's from its text.
    pub fn shard(&self) -> Option<dispatch_engine::shard::ShardId> {
        match self {
            Proof::Jwt(who) => Some(dispatch_engine::shard::entity_shard(identity_id(who))),
            Proof::Own { shard, .. } => *shard,
        }
    }
}

/// The id of a driver or rider, as text.
pub fn identity_id(who: &Identity) -> &str {
    match who {
        Identity::Driver(id) => id.as_str(),
        Identity::Rider(id) => id.as_str(),
    }
}

/// The part of [`identify`] that needs no registry (401/503 as it documents).
pub async fn verify(a: &Auth, token: &str) -> Result<Proof, HttpError> {
    if let Some(verified) = a.jwt(token).await {
        return Ok(Proof::Jwt(verified?));
    }
    if !a.own_tokens {
        return Err(a.refuse(Refusal::Reason("own_tokens_off")));
    }
    Ok(Proof::Own {
        hash: auth::hash(token),
        shard: auth::token_shard(token),
    })
}

/// The registered rider or driver a [`Proof`] names (403 for an unregistered JWT
/// identity, 401 for an unknown own token); 503 while the node is not ready, since the
/// registry is not loaded yet and a 401 would tell an app to drop a valid token (a new
/// leader recovering after a takeover, a node starting).
pub fn resolve(app: &App, proof: Proof) -> Result<Identity, HttpError> {
    super::http::ready(app)?;
    if let Some(sharded) = &app.sharded {
        sharded.check_here(app, &proof)?;
    }
    match proof {
        Proof::Jwt(who) if app.system.is_registered(&who) => Ok(who),
        Proof::Jwt(who) => Err(HttpError(ApiError::forbidden(format!(
            "no {} is registered under this token's identity: register first, with this token as bearer",
            who.role()
        )))),
        Proof::Own { hash, .. } => app
            .system
            .authenticate(&hash)
            .ok_or_else(|| app.auth.refuse(Refusal::Reason("unknown_token"))),
    }
}

/// Who a registration is for.
pub enum Registrant {
    /// A new rider or driver with a token minted for it (today's registration).
    Own,
    /// The JWT's identity: the profile is stored under its id and no token is minted.
    /// Holds the id against a second registration of it until dropped.
    Jwt(Identity, RegisteringGuard),
}

pub struct RegisteringGuard(App, Identity);

impl Drop for RegisteringGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.0.auth.registering.lock() {
            set.remove(&self.1);
        }
    }
}

/// What a registration for `role` (`rider` or `driver`) is, from its headers: with a JWT
/// as bearer, that identity's (its role must be `role`: 403 otherwise; 409 if already
/// registered); without one, a minted token's, unless own tokens are off (401).
pub async fn registrant(
    app: &App,
    headers: &HeaderMap,
    role: &'static str,
) -> Result<Registrant, HttpError> {
    let a = &app.auth;
    let jwt = match auth::bearer(headers, None) {
        Some(token) => a.jwt(token).await,
        None => None,
    };
    let Some(verified) = jwt else {
        if a.own_tokens {
            return Ok(Registrant::Own);
        }
        return Err(a.refuse(Refusal::Reason("own_tokens_off")));
    };
    let who = verified?;
    if who.role() != role {
        return Err(HttpError(ApiError::forbidden(format!(
            "a {} token cannot register a {role}",
            who.role()
        ))));
    }
    let conflict = || {
        HttpError(ApiError::conflict(format!(
            "a {role} is registered under this token's identity already"
        )))
    };
    // Sharded mode: a JWT's id is its own, so only its shard's owner can register it.
    if let Some(sharded) = &app.sharded {
        sharded.check_here(app, &Proof::Jwt(who.clone()))?;
    }
    if app.system.is_registered(&who) {
        return Err(conflict());
    }
    let mut set = a
        .registering
        .lock()
        .map_err(|_| HttpError(ApiError::internal()))?;
    if !set.insert(who.clone()) {
        return Err(conflict());
    }
    drop(set);
    Ok(Registrant::Jwt(
        who.clone(),
        RegisteringGuard(app.clone(), who),
    ))
}

/// The answer to a registration under a JWT: 201 with the id alone (no token is
/// minted: the JWT is the bearer token).
pub fn registered(field: &str, id: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::CREATED,
        axum::Json(serde_json::json!({ field: id })),
    )
        .into_response()
}

/// One verification key and the algorithms it may verify.
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    algorithms: &'static [Algorithm],
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    Schedule,
    UnknownKid,
}

/// The cached key set.
struct Jwks {
    cfg: JwtConfig,
    http: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, Key>>>,
    /// Held by the one fetch under way; holds the time the last one started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    loaded: AtomicBool,
    /// Whether the last fetch succeeded.
    healthy: AtomicBool,
    fetches: IntCounterVec,
    key_count: IntGauge,
    metrics: Arc<Metrics>,
}

impl Jwks {
    fn new(cfg: JwtConfig, metrics: &Arc<Metrics>) -> Self {
        let fetches = IntCounterVec::new(
            Opts::new(
                "dispatch_jwks_fetches_total",
                "Fetches of the identity provider's key set, by trigger and result",
            ),
            &["trigger", "result"],
        )
        .unwrap();
        let key_count = IntGauge::new(
            "dispatch_jwks_keys",
            "Keys of the identity provider's key set held",
        )
        .unwrap();
        metrics
            .registry
            .register(Box::new(fetches.clone()))
            .expect("unique");
        metrics
            .registry
            .register(Box::new(key_count.clone()))
            .expect("unique");
        for t in ["schedule", "unknown_kid"] {
            for r in ["ok", "error"] {
                fetches.with_label_values(&[t, r]);
            }
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.fetch_timeout)
            .connect_timeout(cfg.fetch_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .expect("an HTTP client");
        Self {
            cfg,
            http,
            keys: RwLock::new(Arc::new(HashMap::new())),
            fetching: tokio::sync::Mutex::new(None),
            loaded: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            fetches,
            key_count,
            metrics: metrics.clone(),
        }
    }

    fn key(&self, kid: &str) -> Option<Key> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// Fetches the key set once. For an unknown `kid`: not if that kid arrived meanwhile,
    /// nor sooner than `--auth-jwt-unknown-kid-refresh-ms` after the last fetch (counted).
    async fn refresh(&self, trigger: Trigger, kid: Option<&str>) {
        let mut last = self.fetching.lock().await;
        if let Trigger::UnknownKid = trigger {
            if kid.is_some_and(|k| self.key(k).is_some()) {
                return;
            }
            if last.is_some_and(|at| at.elapsed() < self.cfg.unknown_kid_refresh) {
                self.metrics.bound_hit("jwks_refresh_rate");
                return;
            }
        }
        *last = Some(Instant::now());
        let label = match trigger {
            Trigger::Schedule => "schedule",
            Trigger::UnknownKid => "unknown_kid",
        };
        match tokio::time::timeout(self.cfg.fetch_timeout, self.fetch()).await {
            Ok(Ok(keys)) => {
                self.key_count.set(keys.len() as i64);
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                self.loaded.store(true, Ordering::Release);
                self.healthy.store(true, Ordering::Release);
                self.fetches.with_label_values(&[label, "ok"]).inc();
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e,
                    _ => "timed out".to_owned(),
                };
                self.healthy.store(false, Ordering::Release);
                self.fetches.with_label_values(&[label, "error"]).inc();
                tracing::warn!(url = %self.cfg.jwks_url, %error, "key set fetch failed; the keys held are kept");
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, String> {
        let mut resp = self
            .http
            .get(&self.cfg.jwks_url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body)
    }

    /// A JWT's identity, or why not.
    async fn verify(&self, token: &str) -> Result<Identity, Refusal> {
        use Refusal::Reason;
        let alg = header_alg(token).ok_or(Reason("malformed"))?;
        let alg = ALGORITHMS
            .iter()
            .find(|(n, _)| *n == alg)
            .map(|(_, a)| *a)
            .filter(|a| self.cfg.algorithms.contains(a))
            .ok_or(Reason("wrong_algorithm"))?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Reason("malformed"))?;
        let kid = header.kid.ok_or(Reason("unknown_kid"))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                // Bounded: a request waits for the fetch (or the one under way) no longer
                // than the fetch timeout.
                let _ = tokio::time::timeout(
                    self.cfg.fetch_timeout,
                    self.refresh(Trigger::UnknownKid, Some(&kid)),
                )
                .await;
                match self.key(&kid) {
                    Some(k) => k,
                    None if !self.loaded.load(Ordering::Acquire)
                        || !self.healthy.load(Ordering::Acquire) =>
                    {
                        return Err(Refusal::Unavailable);
                    }
                    None => return Err(Reason("unknown_kid")),
                }
            }
        };
        if !key.algorithms.contains(&alg) {
            return Err(Reason("wrong_algorithm"));
        }
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_S;
        v.validate_nbf = true;
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key.key, &v)
                .map_err(|e| {
                    Reason(match e.kind() {
                        ErrorKind::InvalidSignature => "bad_signature",
                        ErrorKind::ExpiredSignature => "expired",
                        ErrorKind::ImmatureSignature => "not_yet_valid",
                        ErrorKind::InvalidIssuer => "wrong_issuer",
                        ErrorKind::InvalidAudience => "wrong_audience",
                        ErrorKind::InvalidAlgorithm => "wrong_algorithm",
                        ErrorKind::MissingRequiredClaim(_) => "claims",
                        _ => "malformed",
                    })
                })?;
        identity(&data.claims, &self.cfg).ok_or(Reason("claims"))
    }
}

/// The `alg` of a token's header, read without trusting anything else in it (so that
/// `none` and unknown names are told apart from a broken token).
fn header_alg(token: &str) -> Option<String> {
    let head = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(head).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_owned)
}

/// The rider or driver the claims name.
fn identity(
    claims: &serde_json::Map<String, serde_json::Value>,
    cfg: &JwtConfig,
) -> Option<Identity> {
    let role = claims.get(&cfg.role_claim)?.as_str()?;
    let id = claims.get(&cfg.id_claim)?.as_str()?;
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_CLAIM
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return None;
    }
    let prefix = match role {
        "rider" => RiderId::PREFIX,
        "driver" => DriverId::PREFIX,
        _ => return None,
    };
    let name = id.strip_prefix(prefix).unwrap_or(id);
    // Ids this server mints for its own tokens are 32 lowercase hex digits after the
    // prefix, and they are visible to the other party of a trip. A JWT may never name
    // one: an identity provider whose claim a user can influence would otherwise let
    // that user become a rider or driver who registered with an own token.
    if name.is_empty()
        || (name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return None;
    }
    let id = format!("{prefix}{name}");
    match role {
        "rider" => Some(Identity::Rider(RiderId::new(id))),
        _ => Some(Identity::Driver(DriverId::new(id))),
    }
}

/// The usable signing keys of a JWKS document: RSA and EC (P-256, P-384) keys with a
/// `kid`, not marked for encryption, at most [`MAX_KEYS`]. A document with none is an
/// error (the keys held are kept rather than emptied by a broken answer).
fn parse_key_set(body: &[u8]) -> Result<HashMap<String, Key>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a key set: {e}"))?;
    const RSA: &[Algorithm] = &[
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ];
    let mut keys = HashMap::new();
    // The body is bounded (256 KiB), so reading every entry is bounded too; at most
    // MAX_KEYS usable keys are kept, so unusable entries first cannot hide the real ones.
    for v in set.keys {
        if keys.len() == MAX_KEYS {
            break;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let algorithms: &'static [Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                _ => continue,
            },
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.insert(kid, Key { key, algorithms });
    }
    if keys.is_empty() {
        return Err("the key set holds no usable signing key".to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> JwtArgs {
        JwtArgs {
            auth_own_tokens: true,
            auth_jwt_jwks_url: Some("https://idp/jwks".into()),
            auth_jwt_issuer: Some("https://idp".into()),
            auth_jwt_audience: Some("dispatchd".into()),
            auth_jwt_role_claim: "role".into(),
            auth_jwt_id_claim: "sub".into(),
            auth_jwt_algorithms: vec!["RS256".into(), "ES256".into()],
            auth_jwt_refresh_ms: 1000,
            auth_jwt_unknown_kid_refresh_ms: 1000,
            auth_jwt_fetch_timeout_ms: 1000,
        }
    }

    fn cfg() -> JwtConfig {
        args().validate().unwrap().jwt.unwrap()
    }

    #[test]
    fn claims_name_a_rider_or_driver() {
        let c = cfg();
        let claims = |role: &str, sub: &str| {
            serde_json::json!({"role": role, "sub": sub})
                .as_object()
                .unwrap()
                .clone()
        };
        assert_eq!(
            identity(&claims("rider", "u-1"), &c),
            Some(Identity::Rider(RiderId::new("rdr_u-1")))
        );
        assert_eq!(
            identity(&claims("driver", "drv_7"), &c),
            Some(Identity::Driver(DriverId::new("drv_7")))
        );
        for (role, sub) in [
            ("admin", "u"),
            ("rider", ""),
            ("rider", "a|b"),
            ("rider", "a/../b"),
        ] {
            assert_eq!(identity(&claims(role, sub), &c), None, "{role} {sub}");
        }
        assert_eq!(identity(&claims("rider", &"x".repeat(65)), &c), None);
        // The shape of an id minted for an own token, with or without its prefix.
        let own = "0123456789abcdef0123456789abcdef";
        assert_eq!(identity(&claims("rider", own), &c), None);
        assert_eq!(identity(&claims("rider", &format!("rdr_{own}")), &c), None);
        assert_eq!(identity(&claims("driver", &format!("drv_{own}")), &c), None);
        assert_eq!(identity(&claims("rider", "rdr_"), &c), None);
        // Upper case or another length is the identity provider's own.
        assert!(identity(&claims("rider", &own.to_uppercase()), &c).is_some());
    }

    #[test]
    fn the_header_alg_is_read_before_anything_else() {
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert_eq!(header_alg(&format!("{head}.e30.")), Some("none".into()));
        assert_eq!(header_alg("%%%.e30.x"), None);
    }

    #[test]
    fn a_key_set_without_usable_keys_is_an_error() {
        assert!(parse_key_set(b"{}").is_err());
        assert!(parse_key_set(br#"{"keys": []}"#).is_err());
        // An HMAC key and a key without kid are skipped.
        assert!(
            parse_key_set(br#"{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}, {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}"#)
                .is_err()
        );
    }

    #[test]
    fn bad_flags_are_named() {
        let base = args;
        assert!(base().validate().is_ok());
        let mut a = base();
        a.auth_jwt_issuer = None;
        assert!(a.validate().unwrap_err().contains("--auth-jwt-issuer"));
        let mut a = base();
        a.auth_jwt_algorithms = vec!["HS256".into()];
        assert!(a.validate().unwrap_err().contains("HS256"));
        let mut a = base();
        a.auth_jwt_jwks_url = Some("file:///etc/keys".into());
        assert!(a.validate().is_err());
        let mut a = base();
        a.auth_jwt_jwks_url = None;
        a.auth_own_tokens = false;
        assert!(a.validate().is_err());
    }
}
