//! The per-client-address limit on the routes that need no token (registration:
//! `POST /v1/riders`, `POST /v1/drivers`), and who the client is behind trusted proxies.
//!
//! A GCRA limiter (`governor`, keyed by address) allows `--register-rate-per-s` a second
//! with bursts of `--register-burst`; past it the answer is 429 `rate_limited` with a
//! `Retry-After`, counted as `dispatch_bound_hits_total{bound="register_rate"}`.
//!
//! Memory is bounded: an address's state is dropped once it is indistinguishable from a
//! fresh one (`retain_recent`, every [`SWEEP_EVERY`], done by the request that finds the
//! sweep due), and the map never holds more than [`MAX_KEYS`] addresses. When a flood
//! from that many addresses fills it even after a sweep, registrations are refused for
//! everyone until it drains (counted as `bound="register_rate_keys"`): the server stays
//! bounded, and the honest apps retry after `Retry-After`.
//!
//! IPv6 clients are keyed by their /64: one host usually holds a whole /64, and keying
//! by the full address would let it walk 2^64 keys.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dispatch_actors::{ApiError, ErrorCode};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;

use super::App;
use super::forward::Forwarded;
use super::http::HttpError;

/// Addresses the limiter keeps state for, at most.
pub const MAX_KEYS: usize = 100_000;
/// How often addresses whose state is back to fresh are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The sweep a full map asks for runs at most this often.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// `X-Forwarded-For` entries read at most; a longer chain is treated as malformed.
const MAX_HOPS: usize = 64;

/// Flags that take the limit out of the way, for an embedded server whose simulated
/// clients all register from one address (tests, loadgen).
pub const UNLIMITED: [&str; 4] = [
    "--register-rate-per-s",
    "1000000",
    "--register-burst",
    "1000000",
];

/// The flags (flattened into `dispatchd`'s own).
#[derive(Debug, Clone, clap::Args)]
pub struct RateLimitArgs {
    /// Registrations (`POST /v1/riders`, `POST /v1/drivers`) accepted per second from one
    /// client address, after the burst; more are answered 429 `rate_limited`. May be a
    /// fraction (0.1 = one every ten seconds).
    #[arg(long, env = "DISPATCH_REGISTER_RATE_PER_S", default_value_t = 5.0)]
    pub register_rate_per_s: f64,
    /// Registrations one client address may make at once before the rate applies.
    #[arg(long, env = "DISPATCH_REGISTER_BURST", default_value_t = 20)]
    pub register_burst: u32,
    /// A proxy (CIDR, or one address) whose `X-Forwarded-For` names the client: the
    /// right-most address in it that is not itself a trusted proxy. Repeat the flag or
    /// separate with commas. Unset: the TCP peer is the client, and the header is ignored.
    #[arg(
        long = "trusted-proxy",
        env = "DISPATCH_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_parser = parse_cidr
    )]
    pub trusted_proxies: Vec<IpNet>,
}

/// A CIDR (`10.0.0.0/8`, `fd00::/8`) or a single address (`10.0.0.7`).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR (10.0.0.0/8) nor an address"))
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub quota: Quota,
    pub trusted_proxies: Vec<IpNet>,
}

impl RateLimitArgs {
    pub fn validate(self) -> Result<RateLimitConfig, String> {
        let rate = self.register_rate_per_s;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
            return Err("--register-rate-per-s must be in (0, 1000000]".to_owned());
        }
        let burst = NonZeroU32::new(self.register_burst)
            .ok_or_else(|| "--register-burst must be positive".to_owned())?;
        let period = Duration::try_from_secs_f64(1.0 / rate)
            .map_err(|_| "--register-rate-per-s is too low".to_owned())?;
        let quota = Quota::with_period(period)
            .ok_or_else(|| "--register-rate-per-s is too high".to_owned())?
            .allow_burst(burst);
        Ok(RateLimitConfig {
            quota,
            trusted_proxies: self.trusted_proxies,
        })
    }
}

/// The limiter and the trusted proxies, shared by every request.
pub struct RegisterLimit {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    trusted: Vec<IpNet>,
    /// When the last sweep ran; `try_lock` so that only one request ever sweeps.
    swept: Mutex<Instant>,
}

impl RegisterLimit {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(cfg.quota),
            trusted: cfg.trusted_proxies.clone(),
            swept: Mutex::new(Instant::now()),
        }
    }

    /// Addresses held now (for tests and the sweep).
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops fresh addresses when a sweep is due (or the map is full); returns whether
    /// there is room for one more address.
    fn sweep(&self) -> bool {
        let full = self.limiter.len() >= MAX_KEYS;
        if let Ok(mut at) = self.swept.try_lock() {
            let due = if full { FULL_SWEEP_EVERY } else { SWEEP_EVERY };
            if at.elapsed() >= due {
                self.limiter.retain_recent();
                self.limiter.shrink_to_fit();
                *at = Instant::now();
            }
        }
        self.limiter.len() < MAX_KEYS
    }

    /// One registration from `client`: `Err(wait)` when it is over the limit.
    fn check(&self, client: IpAddr) -> Result<(), Result<Duration, ()>> {
        if !self.sweep() {
            return Err(Err(()));
        }
        self.limiter
            .check_key(&key(client))
            .map_err(|not_until| Ok(not_until.wait_time_from(DefaultClock::default().now())))
    }

    /// The client's address: the TCP peer, unless the peer is a trusted proxy; then the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (the
    /// left-most if all are). A header that cannot be read whole falls back to the peer.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_address(&self.trusted, peer, headers)
    }
}

fn trusted(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// See [`RegisterLimit::client`].
pub fn client_address(nets: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted(nets, peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for entry in text.split(',') {
            match hop(entry.trim()) {
                Some(ip) if hops.len() < MAX_HOPS => hops.push(ip),
                _ => return peer,
            }
        }
    }
    hops.iter()
        .rev()
        .find(|ip| !trusted(nets, **ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// One `X-Forwarded-For` entry: an address, `[v6]`, or either with a port.
fn hop(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// The limiter's key: IPv4 as is, IPv6 by its /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// Middleware for the registration routes. A request without a peer address (served
/// without connect info, as in-process tests may) is not limited, nor is one another node
/// forwarded here (`forward.rs`, the [`Forwarded`] extension): the node asked counted it
/// against its client's address before forwarding it ([`refusal`]), and this node never
/// saw that address, so it neither counts it again nor counts it under the peer's.
pub async fn limit_registration(State(app): State<App>, req: Request, next: Next) -> Response {
    if req.extensions().get::<Forwarded>().is_some() {
        return next.run(req).await;
    }
    match refusal(&app, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    }
}

/// One registration from `req`'s client counted against its address: `Some(429)` when it
/// is over the limit (counted in `dispatch_bound_hits_total`), `None` when it may go on
/// (or has no peer address). Called once per registration: by [`limit_registration`] on
/// the node that runs it, or by the sharded front on the node asked before forwarding it.
pub fn refusal(app: &App, req: &Request) -> Option<Response> {
    let ConnectInfo(peer) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied()?;
    let client = app.register_limit.client(peer.ip(), req.headers());
    let wait = app.register_limit.check(client).err()?;
    let (bound, wait) = match wait {
        Ok(wait) => ("register_rate", wait),
        Err(()) => ("register_rate_keys", FULL_SWEEP_EVERY),
    };
    app.metrics.bound_hit(bound);
    tracing::debug!(%client, bound, "registration refused: rate limited");
    let mut r = HttpError(ApiError::new(
        ErrorCode::RateLimited,
        "too many registrations from this address; retry after the Retry-After seconds",
    ))
    .into_response();
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| parse_cidr(s).unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 5));

    #[test]
    fn the_header_counts_only_from_a_trusted_peer() {
        let h = xff(&["203.0.113.9"]);
        assert_eq!(client_address(&[], PEER, &h), PEER);
        assert_eq!(client_address(&nets(&["10.1.0.0/16"]), PEER, &h), PEER);
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(client_address(&nets(&["10.0.0.0/8"]), PEER, &h), ip);
        assert_eq!(client_address(&nets(&["10.0.0.5"]), PEER, &h), ip);
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged the left entry; the proxies appended the rest.
        let h = xff(&["1.1.1.1, 203.0.113.9", "10.0.0.9"]);
        assert_eq!(
            client_address(&trusted, PEER, &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // All trusted: the left-most is as far as can be seen.
        let h = xff(&["10.0.0.7, 10.0.0.8"]);
        assert_eq!(
            client_address(&trusted, PEER, &h),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
        // Ports and brackets are read; an IPv4-mapped peer counts as IPv4.
        let h = xff(&["[2001:db8::1]:443, 198.51.100.1:80"]);
        assert_eq!(
            client_address(&trusted, "::ffff:10.0.0.5".parse().unwrap(), &h),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_malformed_header_falls_back_to_the_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        for bad in [
            "",
            "not-an-ip",
            "1.2.3.4,,5.6.7.8",
            "1.2.3.4, 999.1.1.1",
            "[::1",
        ] {
            assert_eq!(
                client_address(&trusted, PEER, &xff(&[bad])),
                PEER,
                "{bad:?}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"1.2.3.4\xff").unwrap(),
        );
        assert_eq!(client_address(&trusted, PEER, &h), PEER);
        let long = vec!["1.2.3.4"; MAX_HOPS + 1].join(",");
        assert_eq!(client_address(&trusted, PEER, &xff(&[&long])), PEER);
        assert_eq!(client_address(&trusted, PEER, &HeaderMap::new()), PEER);
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(key(a), key(b));
        assert_ne!(key(a), key(c));
    }

    /// Bursts of 3, then one per 1000 s: nothing refills during a test.
    fn slow_limit() -> RegisterLimit {
        let cfg = RateLimitArgs {
            register_rate_per_s: 0.001,
            register_burst: 3,
            trusted_proxies: vec![],
        };
        RegisterLimit::new(&cfg.validate().unwrap())
    }

    #[test]
    fn a_burst_then_refusals_per_address() {
        let l = slow_limit();
        for _ in 0..3 {
            assert!(l.check(PEER).is_ok());
        }
        let wait = l.check(PEER).unwrap_err().unwrap();
        assert!(wait > Duration::from_secs(100), "{wait:?}");
        assert!(l.check("10.0.0.6".parse().unwrap()).is_ok());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn the_map_of_addresses_is_bounded() {
        let l = slow_limit();
        for i in 0..MAX_KEYS as u32 {
            assert!(l.check(IpAddr::V4(i.into())).is_ok());
        }
        assert_eq!(l.len(), MAX_KEYS);
        // Full of addresses that are all still limited: a new one is refused, not added.
        assert_eq!(l.check(PEER), Err(Err(())));
        assert_eq!(l.len(), MAX_KEYS);
    }

    #[test]
    fn bad_flags_are_named() {
        let args = |rate: f64, burst: u32| RateLimitArgs {
            register_rate_per_s: rate,
            register_burst: burst,
            trusted_proxies: vec![],
        };
        assert!(args(0.0, 1).validate().unwrap_err().contains("rate"));
        assert!(args(f64::NAN, 1).validate().is_err());
        assert!(args(5.0, 0).validate().unwrap_err().contains("burst"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("fd00::/8").is_ok());
    }
}
