//! `--reconnect`: getting a dropped session back. A client whose session closed or failed
//! tries again with the same token, 50 ms after the drop and then twice as long each
//! time (at most 1 s, jittered ±20%), until a `welcome` is read or `--reconnect-for` has
//! passed since the drop.

use std::net::IpAddr;
use std::time::Duration;

use dispatch_transport::wire::ServerMessage;
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::net::{self, ConnError, Incoming, Ws};
use crate::sim::Shared;
use crate::stats::Stats;

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(1);
/// One attempt (connect and read the `welcome`) may take at most this long.
const ATTEMPT: Duration = Duration::from_secs(10);

pub enum Outcome {
    /// A new session, and its `welcome`.
    Session(Box<(Ws, ServerMessage)>),
    /// The run ended while trying.
    Stopped,
    /// `--reconnect-for` passed: why the last attempt failed.
    GaveUp(String),
}

fn describe(e: ConnError) -> String {
    match e {
        ConnError::OpenFiles => "open file limit (EMFILE)".into(),
        ConnError::SourcePorts => "out of source ports (EADDRNOTAVAIL)".into(),
        ConnError::Refused(code, detail) => format!("{code}: {detail}"),
        ConnError::Other(d) => d,
    }
}

/// Connects and reads the first frame, which must be the `welcome`.
async fn attempt(
    sh: &Shared,
    path: &str,
    token: &str,
    source: Option<IpAddr>,
) -> Result<(Ws, ServerMessage), String> {
    let mut ws = net::connect_ws(&sh.target, path, token, source)
        .await
        .map_err(describe)?;
    loop {
        match net::decode(ws.next().await) {
            Incoming::Msg(m) => {
                Stats::inc(&sh.stats.c.messages_received);
                return match *m {
                    w @ ServerMessage::Welcome { .. } => Ok((ws, w)),
                    other => Err(format!("the first frame is not a welcome: {other:?}")),
                };
            }
            Incoming::Skip => continue,
            Incoming::Undecodable(t) => return Err(format!("undecodable first frame: {t}")),
            Incoming::Closed(code, reason) => {
                return Err(format!("closed before the welcome ({code:?}): {reason}"));
            }
        }
    }
}

/// Tries to open `path` again with `token` until a `welcome` comes, the run stops, or
/// `--reconnect-for` runs out.
pub async fn reconnect(
    sh: &Shared,
    path: &str,
    token: &str,
    source: Option<IpAddr>,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    let start = Instant::now();
    let budget = sh.cfg.reconnect_for;
    let mut delay = FIRST_DELAY;
    let mut last = String::from("no attempt");
    loop {
        let wait = {
            let jitter: f64 = rand::rng().random_range(0.8..1.2);
            delay.mul_f64(jitter)
        };
        if start.elapsed() + wait >= budget {
            return Outcome::GaveUp(format!("no session within {budget:?}: {last}"));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return Outcome::Stopped,
        }
        if *stop.borrow() {
            return Outcome::Stopped;
        }
        delay = (delay * 2).min(MAX_DELAY);
        Stats::inc(&sh.stats.c.reconnect_attempts);
        let left = budget.saturating_sub(start.elapsed()).min(ATTEMPT);
        tokio::select! {
            r = tokio::time::timeout(left, attempt(sh, path, token, source)) => match r {
                Ok(Ok(session)) => {
                    Stats::inc(&sh.stats.c.reconnects);
                    return Outcome::Session(Box::new(session));
                }
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("no welcome within {left:?}"),
            },
            _ = stop.changed() => return Outcome::Stopped,
        }
    }
}
