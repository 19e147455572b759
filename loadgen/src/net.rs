//! Sockets: the server's address, WebSocket sessions bound to a chosen loopback source
//! address, REST calls, and naming the client-side limit an error means.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dispatch_transport::wire::{ErrorBody, ServerMessage};
use futures_util::SinkExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

pub type Ws = WebSocketStream<TcpStream>;

/// Where the server is: one node, or several (`--url` with commas) of which the clients
/// use one at a time, moving on to the next when it refuses or cannot be reached.
#[derive(Debug, Clone)]
pub struct Target {
    pub nodes: Vec<Node>,
    /// The node every client uses now (an index into `nodes`), shared by all of them.
    current: Arc<AtomicUsize>,
    /// `--spread`: each client's WebSocket goes first to a node of its own.
    spread: bool,
}

/// One node's addresses.
#[derive(Debug, Clone)]
pub struct Node {
    /// `ws://host:port`, no trailing slash.
    pub ws_base: String,
    /// `http://host:port`.
    pub http_base: String,
    pub addr: SocketAddr,
}

impl Target {
    /// `ws://HOST:PORT`, or several separated by commas; with `spread`, each client's
    /// WebSocket goes first to a node of its own (see [`Target::own_node`]).
    pub async fn resolve(urls: &str, spread: bool) -> Result<Target> {
        let mut nodes = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            nodes.push(Node::resolve(url).await?);
        }
        if nodes.is_empty() {
            bail!("--url: expected ws://HOST:PORT (or several, separated by commas)");
        }
        Ok(Target {
            nodes,
            current: Arc::new(AtomicUsize::new(0)),
            spread,
        })
    }

    /// With `--spread` and several nodes, the node of the client holding `token` (a hash
    /// of it, the same on every reconnect), unless that is the node in use anyway.
    fn own_node(&self, token: &str) -> Option<&Node> {
        use std::hash::{Hash, Hasher};
        if !self.spread || self.nodes.len() < 2 {
            return None;
        }
        // DefaultHasher::new() has fixed keys: the same node in every process of a run.
        let mut h = std::hash::DefaultHasher::new();
        token.hash(&mut h);
        let i = (h.finish() % self.nodes.len() as u64) as usize;
        (i != self.node().0).then(|| &self.nodes[i])
    }

    /// The node in use now, and its index.
    pub fn node(&self) -> (usize, &Node) {
        let i = self.current.load(Ordering::Relaxed) % self.nodes.len();
        (i, &self.nodes[i])
    }

    /// The REST base of the node in use.
    pub fn http_base(&self) -> &str {
        &self.node().1.http_base
    }

    /// Node `i` refused or could not be reached: the next one is used from now on (once,
    /// however many clients saw it fail at once).
    pub fn failed(&self, i: usize) {
        let next = (i + 1) % self.nodes.len();
        let _ = self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl Node {
    async fn resolve(url: &str) -> Result<Node> {
        let url = url.trim_end_matches('/');
        let Some(hostport) = url.strip_prefix("ws://") else {
            if url.starts_with("wss://") {
                bail!("--url {url}: TLS (wss://) is not supported; use ws://");
            }
            bail!("--url {url}: expected ws://HOST:PORT");
        };
        if hostport.contains('/') {
            bail!(
                "--url {url}: give only ws://HOST:PORT (the paths are /v1/ws/driver and /v1/ws/rider)"
            );
        }
        let hp = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:80")
        };
        let addr = tokio::net::lookup_host(&hp)
            .await
            .with_context(|| format!("--url {url}: cannot resolve {hp}"))?
            .find(|a| a.is_ipv4())
            .or(None)
            .with_context(|| format!("--url {url}: no IPv4 address for {hp}"))?;
        Ok(Node {
            ws_base: format!("ws://{hostport}"),
            http_base: format!("http://{hostport}"),
            addr,
        })
    }
}

/// A connect or REST failure, classified.
#[derive(Debug)]
pub enum ConnError {
    /// The process's open-file limit (EMFILE/ENFILE).
    OpenFiles,
    /// No source port left on the source address (EADDRNOTAVAIL, or EADDRINUSE on bind).
    SourcePorts,
    /// The server answered with an error: (protocol code or `http_<status>`, detail).
    Refused(String, String),
    Other(String),
}

impl ConnError {
    fn from_io(e: &std::io::Error) -> Option<ConnError> {
        match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => Some(ConnError::OpenFiles),
            Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => Some(ConnError::SourcePorts),
            _ => None,
        }
    }

    /// Looks through an error's chain for an OS error that names a limit.
    pub fn classify(e: &(dyn std::error::Error + 'static)) -> ConnError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && let Some(c) = ConnError::from_io(io)
            {
                return c;
            }
            cur = err.source();
        }
        ConnError::Other(error_chain(e))
    }
}

pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

/// How the wire spells a unit enum value (`TripState::DriverAssigned` is
/// `driver_assigned`): its serde name, so the names stay written once, in the wire types.
pub fn wire_name(v: impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn ws_config() -> WebSocketConfig {
    // Thousands of sessions per process: small eager buffers (the default read buffer is
    // 128 KiB per connection), and every message written at once.
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

fn io_err(e: std::io::Error) -> ConnError {
    ConnError::from_io(&e).unwrap_or_else(|| ConnError::Other(e.to_string()))
}

/// Opens `path` (`/v1/ws/driver`) with `token`, from `source` when given, on the node in
/// use; a node that refuses (`unavailable`: a standby, or one shutting down) or cannot be
/// reached is left for the next one (see [`Target::failed`]). With `--spread`, the
/// client's own node is tried first, and the node in use only if it refuses so.
pub async fn connect_ws(
    target: &Target,
    path: &str,
    token: &str,
    source: Option<IpAddr>,
) -> Result<Ws, ConnError> {
    let moves_on = |r: &Result<Ws, ConnError>| match r {
        Err(ConnError::Refused(code, _)) => code == "unavailable" || code == "http_503",
        Err(ConnError::Other(_)) => true,
        _ => false,
    };
    if let Some(own) = target.own_node(token) {
        let r = connect_node(own, path, token, source).await;
        if !moves_on(&r) {
            return r;
        }
    }
    let (i, node) = target.node();
    let r = connect_node(node, path, token, source).await;
    if moves_on(&r) && target.nodes.len() > 1 {
        target.failed(i);
    }
    r
}

async fn connect_node(
    target: &Node,
    path: &str,
    token: &str,
    source: Option<IpAddr>,
) -> Result<Ws, ConnError> {
    let socket = TcpSocket::new_v4().map_err(io_err)?;
    if let Some(ip) = source {
        #[cfg(target_os = "linux")]
        {
            // Choose the port at connect time, by the whole 4-tuple (IP_BIND_ADDRESS_NO_PORT),
            // instead of reserving one per address at bind time.
            use std::os::fd::AsRawFd;
            let one: libc::c_int = 1;
            // SAFETY: a valid socket fd and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        socket.bind(SocketAddr::new(ip, 0)).map_err(io_err)?;
    }
    let stream = socket.connect(target.addr).await.map_err(io_err)?;
    let _ = stream.set_nodelay(true);
    let mut req = format!("{}{}", target.ws_base, path)
        .into_client_request()
        .map_err(|e| ConnError::Other(e.to_string()))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| ConnError::Other("token is not a header value".into()))?,
    );
    match tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or(&[]);
            let code = serde_json::from_slice::<ErrorBody>(body)
                .map(|b| b.error.code)
                .unwrap_or_else(|_| format!("http_{status}"));
            Err(ConnError::Refused(
                code,
                format!(
                    "upgrade {path} answered {status}: {}",
                    String::from_utf8_lossy(body)
                ),
            ))
        }
        Err(tungstenite::Error::Io(e)) => Err(io_err(e)),
        Err(e) => Err(ConnError::Other(e.to_string())),
    }
}

/// Sends one client message (a wire type plus an optional `req`).
pub async fn send<T: Serialize>(ws: &mut Ws, msg: &T, req: Option<u64>) -> Result<()> {
    let mut v = serde_json::to_value(msg)?;
    if let Some(r) = req {
        v["req"] = r.into();
    }
    ws.send(Message::Text(v.to_string().into())).await?;
    Ok(())
}

/// A server frame, decoded.
pub enum Incoming {
    Msg(Box<ServerMessage>),
    /// A text frame that is not a `ServerMessage`.
    Undecodable(String),
    /// Ping, pong or other non-text frames.
    Skip,
    Closed(Option<u16>, String),
}

pub fn decode(m: Option<Result<Message, tungstenite::Error>>) -> Incoming {
    match m {
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMessage>(&t) {
            Ok(m) => Incoming::Msg(Box::new(m)),
            Err(e) => Incoming::Undecodable(format!("{e}: {t}")),
        },
        Some(Ok(Message::Close(f))) => Incoming::Closed(
            f.as_ref().map(|f| u16::from(f.code)),
            f.map(|f| f.reason.to_string()).unwrap_or_default(),
        ),
        Some(Ok(_)) => Incoming::Skip,
        Some(Err(e)) => Incoming::Closed(None, e.to_string()),
        None => Incoming::Closed(None, "connection ended".into()),
    }
}

/// POSTs `body` as JSON; the reply as `R`, or the protocol error code and detail.
pub async fn post_json<B: Serialize, R: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &B,
) -> Result<R, ConnError> {
    let mut r = http.post(url).json(body).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    reply(url, r).await
}

/// GETs `url`; the reply as `R`, or the protocol error code and detail.
pub async fn get_json<R: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> Result<R, ConnError> {
    let mut r = http.get(url).timeout(Duration::from_secs(30));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    reply(url, r).await
}

/// Sends `r` (a request to `url`); the reply as `R`, or the protocol error code and detail.
async fn reply<R: DeserializeOwned>(url: &str, r: reqwest::RequestBuilder) -> Result<R, ConnError> {
    let resp = r.send().await.map_err(|e| ConnError::classify(&e))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| ConnError::classify(&e))?;
    if status.is_success() {
        serde_json::from_slice(&bytes).map_err(|e| {
            ConnError::Other(format!(
                "{url}: undecodable {status} reply ({e}): {}",
                String::from_utf8_lossy(&bytes)
            ))
        })
    } else {
        let code = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.code)
            .unwrap_or_else(|_| format!("http_{}", status.as_u16()));
        Err(ConnError::Refused(
            code,
            format!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        ))
    }
}

/// This process's open-file limit (soft).
pub fn nofile_limit() -> Option<u64> {
    // SAFETY: getrlimit with a valid rlimit struct.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        (libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0).then_some(rl.rlim_cur as u64)
    }
}

/// Raises this process's soft open-file limit to its hard limit; returns the limit.
pub fn raise_nofile_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return None;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
        Some(rl.rlim_cur as u64)
    }
}

#[cfg(test)]
mod tests {
    use dispatch_transport::wire::{CancelledBy, DriverStatus, TripState};

    use super::{Target, wire_name};

    #[test]
    fn wire_names_are_the_serde_names() {
        assert_eq!(wire_name(TripState::DriverAssigned), "driver_assigned");
        assert_eq!(wire_name(TripState::NoDriverFound), "no_driver_found");
        assert_eq!(wire_name(DriverStatus::OnTrip), "on_trip");
        assert_eq!(wire_name(CancelledBy::Rider), "rider");
    }

    /// `--spread`: a client's own node is the same on every call (its reconnects go back
    /// there), the clients land on every node, and the node in use is never "its own".
    #[tokio::test]
    async fn spread_gives_each_token_one_node_and_uses_them_all() {
        let urls = "ws://127.0.0.1:1,ws://127.0.0.1:2,ws://127.0.0.1:3";
        let t = Target::resolve(urls, true).await.unwrap();
        let mut per_node = [0usize; 3];
        for i in 0..300 {
            let token = format!("token-{i}");
            let own = t.own_node(&token).map(|n| n.addr);
            assert_eq!(own, t.own_node(&token).map(|n| n.addr), "{token}");
            let at = own.map_or(0, |a| a.port() as usize - 1);
            per_node[at] += 1;
        }
        assert!(per_node.iter().all(|n| *n >= 50), "{per_node:?}");
        let plain = Target::resolve(urls, false).await.unwrap();
        assert!((0..50).all(|i| plain.own_node(&format!("token-{i}")).is_none()));
        let one = Target::resolve("ws://127.0.0.1:1", true).await.unwrap();
        assert!(one.own_node("token-0").is_none());
    }
}
