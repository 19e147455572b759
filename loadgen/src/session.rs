//! What a driver's and a rider's lives over their sessions have in common: reading the
//! server's frames, how a session ends, and the loop around the sessions (with
//! `--reconnect`, a dropped session is opened again and the client resumes from the
//! `welcome`). What differs between the two is the [`Client`] trait.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dispatch_transport::wire::ServerMessage;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::net::{self, Incoming, Ws};
use crate::reconnect::{self, Outcome};
use crate::sim::Shared;
use crate::stats::Stats;

/// How one session ended.
pub enum End {
    /// The run is over.
    Stop,
    /// The server closed the session or the connection failed: (code, detail).
    Closed(String, String),
    /// A send failed.
    SendFailed(anyhow::Error),
}

/// A simulated client, as the loop around its sessions sees it.
pub(crate) trait Client {
    /// `driver` or `rider`: its WebSocket path, and how the errors name it.
    const ROLE: &'static str;
    /// Whether a session that closed for good (no `--reconnect`) settles what the client
    /// still has open; the driver's does not.
    const SETTLE_ON_CLOSE: bool;

    /// Runs one session until the run stops or the session ends.
    async fn session(&mut self, ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> End;
    /// The session dropped: the replies still due will never come.
    fn drop_in_flight(&mut self);
    /// A new session after a drop: carry on from what its `welcome` says.
    async fn resume(&mut self, ws: &mut Ws, welcome: ServerMessage) -> anyhow::Result<()>;
    /// The client is done (the run ended, or its session is gone): settles what is open.
    fn settle(&mut self);
}

/// Reads one frame of a running session: a message is counted and handed to
/// `on_message`, an undecodable one is an error; a close ends the session.
pub(crate) fn on_frame(
    sh: &Shared,
    role: &str,
    m: Option<Result<Message, tungstenite::Error>>,
    on_message: impl FnOnce(ServerMessage),
) -> Option<End> {
    match net::decode(m) {
        Incoming::Msg(m) => {
            Stats::inc(&sh.stats.c.messages_received);
            on_message(*m);
        }
        Incoming::Undecodable(t) => {
            Stats::inc(&sh.stats.c.messages_received);
            sh.stats
                .error("undecodable", &format!("server frame ({role})"), false, t);
        }
        Incoming::Skip => {}
        Incoming::Closed(code, reason) => {
            let code = code.map_or("closed".to_owned(), |c| format!("closed_{c}"));
            return Some(End::Closed(code, reason));
        }
    }
    None
}

/// A send failed: an error unless the run is stopping.
fn send_failed(sh: &Shared, role: &str, gi: usize, e: anyhow::Error) {
    if !*sh.stop.borrow() {
        sh.stats.error(
            "send_failed",
            &format!("{role} session"),
            false,
            format!("{role} #{gi}: {e}"),
        );
    }
}

/// Runs the sessions of `c`, client #`gi`, starting with `ws`, until the run ends or its
/// session is gone for good; then closes the session. A new session is opened with `token`
/// from `src`.
pub(crate) async fn run<C: Client>(
    c: &mut C,
    mut ws: Ws,
    sh: Arc<Shared>,
    gi: usize,
    token: &str,
    src: Option<IpAddr>,
) {
    let role = C::ROLE;
    let mut stop = sh.stop.clone();
    let mut next_end = None;
    loop {
        let end = match next_end.take() {
            Some(e) => e,
            None => c.session(&mut ws, &mut stop).await,
        };
        let (code, detail) = match end {
            End::Stop => break,
            End::Closed(code, reason) if !sh.cfg.reconnect || *stop.borrow() => {
                if !*stop.borrow() {
                    sh.stats.error(
                        &code,
                        &format!("{role} session"),
                        false,
                        format!("{role} #{gi}: {reason}"),
                    );
                }
                if C::SETTLE_ON_CLOSE {
                    c.settle();
                }
                sh.stats.connected(-1);
                return;
            }
            End::SendFailed(e) if !sh.cfg.reconnect || *stop.borrow() => {
                send_failed(&sh, role, gi, e);
                break;
            }
            End::Closed(code, reason) => (code, reason),
            End::SendFailed(e) => ("send_failed".to_owned(), e.to_string()),
        };
        // --reconnect: the session is gone; get another and resume from its welcome.
        sh.stats.connected(-1);
        Stats::inc(&sh.stats.c.sessions_dropped);
        sh.stats.error(
            &code,
            &format!("{role} session (dropped; reconnecting)"),
            true,
            format!("{role} #{gi}: {detail}"),
        );
        c.drop_in_flight();
        let path = format!("/v1/ws/{role}");
        match reconnect::reconnect(&sh, &path, token, src, &mut stop).await {
            Outcome::Session(session) => {
                let (new, welcome) = *session;
                ws = new;
                sh.stats.connected(1);
                if let Err(e) = c.resume(&mut ws, welcome).await {
                    next_end = Some(End::SendFailed(e));
                }
            }
            Outcome::Stopped => {
                c.settle();
                return;
            }
            Outcome::GaveUp(why) => {
                Stats::inc(&sh.stats.c.reconnect_failures);
                sh.stats.error(
                    "reconnect_failed",
                    &format!("{role} session"),
                    false,
                    format!("{role} #{gi}: {why}"),
                );
                c.settle();
                return;
            }
        }
    }
    c.settle();
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    sh.stats.connected(-1);
}
