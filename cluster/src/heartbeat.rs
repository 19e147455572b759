//! The heartbeat actor: one per node, in the process group [`HEARTBEAT_GROUP`], which
//! `ractor_cluster` shares with every linked peer. Each tick it casts a `Beat` to every
//! remote member of the group and sweeps the peers not heard from; each `Beat` received
//! marks its sender alive and is answered with an `Ack` that measures the round trip.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ractor::concurrency::JoinHandle;
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorProcessingErr, ActorRef, Message};

use crate::Shared;

/// The ractor process group of every node's heartbeat actor.
pub const HEARTBEAT_GROUP: &str = "dispatch.cluster.heartbeat";
/// A node name longer than this in a heartbeat is refused (the message is dropped).
pub const MAX_NAME_BYTES: usize = 253;

/// Milliseconds on this process's monotonic clock (only ever compared with itself).
fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The heartbeat actor's messages. `Beat` and `Ack` cross nodes (a fixed little binary
/// form: 8 bytes of `u64` little-endian, then the UTF-8 name); `Tick` is local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatMsg {
    /// `from` is alive; `sent` is its own clock, echoed back in the `Ack`.
    Beat { from: String, sent: u64 },
    /// `from` got the `Beat` sent at `echo` (the receiver's clock).
    Ack { from: String, echo: u64 },
    /// Local: time to beat and sweep.
    Tick,
}

fn encode(n: u64, name: &str) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// The inverse of [`encode`]; `None` for anything malformed (short, too long, not UTF-8).
fn decode(bytes: &[u8]) -> Option<(u64, String)> {
    if bytes.len() < 8 || bytes.len() > 8 + MAX_NAME_BYTES {
        return None;
    }
    let (n, name) = bytes.split_at(8);
    let n = u64::from_le_bytes(n.try_into().ok()?);
    let name = std::str::from_utf8(name).ok()?;
    if name.is_empty() {
        return None;
    }
    Some((n, name.to_owned()))
}

impl Message for HeartbeatMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        let (variant, args) = match self {
            HeartbeatMsg::Beat { from, sent } => ("beat", encode(sent, &from)),
            HeartbeatMsg::Ack { from, echo } => ("ack", encode(echo, &from)),
            HeartbeatMsg::Tick => return Err(BoxedDowncastErr),
        };
        Ok(SerializedMessage::Cast {
            variant: variant.to_owned(),
            args,
            metadata: None,
        })
    }

    fn deserialize(bytes: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        let SerializedMessage::Cast { variant, args, .. } = bytes else {
            return Err(BoxedDowncastErr);
        };
        let (n, from) = decode(&args).ok_or(BoxedDowncastErr)?;
        match variant.as_str() {
            "beat" => Ok(HeartbeatMsg::Beat { from, sent: n }),
            "ack" => Ok(HeartbeatMsg::Ack { from, echo: n }),
            _ => Err(BoxedDowncastErr),
        }
    }
}

struct Heartbeat {
    shared: Arc<Shared>,
    interval: Duration,
}

struct State {
    timer: JoinHandle<()>,
}

/// Spawns the heartbeat actor and joins it to [`HEARTBEAT_GROUP`].
pub(crate) async fn spawn(
    shared: Arc<Shared>,
    interval: Duration,
) -> Result<ActorRef<HeartbeatMsg>, String> {
    let (actor, _) = Actor::spawn(None, Heartbeat { shared, interval }, ())
        .await
        .map_err(|e| e.to_string())?;
    ractor::pg::join(HEARTBEAT_GROUP.to_owned(), vec![actor.get_cell()]);
    Ok(actor)
}

impl Actor for Heartbeat {
    type Msg = HeartbeatMsg;
    type State = State;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<HeartbeatMsg>,
        _: (),
    ) -> Result<State, ActorProcessingErr> {
        let timer = myself.send_interval(self.interval, || HeartbeatMsg::Tick);
        Ok(State { timer })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<HeartbeatMsg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        state.timer.abort();
        ractor::pg::leave(HEARTBEAT_GROUP.to_owned(), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<HeartbeatMsg>,
        msg: HeartbeatMsg,
        _state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let s = &self.shared;
        match msg {
            HeartbeatMsg::Tick => {
                let sent = mono_ms();
                for peer in ractor::pg::get_members(&HEARTBEAT_GROUP.to_owned()) {
                    if peer.get_id().is_local() {
                        continue;
                    }
                    let beat = HeartbeatMsg::Beat {
                        from: s.node_name.clone(),
                        sent,
                    };
                    match peer.send_message(beat) {
                        Ok(()) => s.metrics.heartbeats.with_label_values(&["sent"]).inc(),
                        Err(_) => s.metrics.remote_errors.inc(),
                    }
                }
                s.sweep();
            }
            HeartbeatMsg::Beat { from, sent } => {
                if from == s.node_name || !s.heard(&from) {
                    s.metrics.heartbeats.with_label_values(&["ignored"]).inc();
                    return Ok(());
                }
                s.metrics.heartbeats.with_label_values(&["received"]).inc();
                let nodes = s.node_ids_of(&from);
                for peer in ractor::pg::get_members(&HEARTBEAT_GROUP.to_owned()) {
                    let id = peer.get_id();
                    if id.is_local() || !nodes.contains(&id.node()) {
                        continue;
                    }
                    let ack = HeartbeatMsg::Ack {
                        from: s.node_name.clone(),
                        echo: sent,
                    };
                    if peer.send_message(ack).is_err() {
                        s.metrics.remote_errors.inc();
                    }
                }
            }
            HeartbeatMsg::Ack { echo, .. } => {
                let rtt = mono_ms().saturating_sub(echo);
                s.metrics.remote_latency.observe(rtt as f64 / 1000.0);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_round_trip_and_garbage_is_refused() {
        let beat = HeartbeatMsg::Beat {
            from: "dispatchd-1".into(),
            sent: 42,
        };
        let wire = beat.clone().serialize().unwrap();
        assert_eq!(HeartbeatMsg::deserialize(wire).unwrap(), beat);
        for bad in [
            vec![],
            vec![1, 2, 3],
            vec![0; 8],
            [vec![0; 8], vec![0xff, 0xfe]].concat(),
            vec![b'a'; 8 + MAX_NAME_BYTES + 1],
        ] {
            let m = SerializedMessage::Cast {
                variant: "beat".into(),
                args: bad.clone(),
                metadata: None,
            };
            assert!(HeartbeatMsg::deserialize(m).is_err(), "{bad:?}");
        }
        let other = SerializedMessage::Cast {
            variant: "nope".into(),
            args: encode(1, "x"),
            metadata: None,
        };
        assert!(HeartbeatMsg::deserialize(other).is_err());
        assert!(HeartbeatMsg::Tick.serialize().is_err());
    }
}
