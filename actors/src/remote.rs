//! Messages between nodes (issue 16, stage 3 of `docs/sharding.md`): the serialisable
//! forms of the actor messages that will cross nodes, their conversions to and from the
//! local messages, and one **router** actor per node that delivers them to the node's own
//! actors. Nothing sends through it yet (stages 4 and 5 switch call sites over); every
//! entity is still local.
//!
//! - **Addressing**: a node's router is the member of the process group
//!   [`router_group`]`(node)` (`dispatch.router.<node>`), which `ractor_cluster` shares with
//!   every linked node. A message names its entity ([`Routed`] for casts, [`RoutedCall`] for
//!   calls); the router finds the local actor through the registry, starting a driver or
//!   rider from its record as a session's attach does, and answers for a trip that is not
//!   here as for a dead one ([`DriverMsg::TripFailed`] back to a driver, `unavailable`; a
//!   rider answered from the stored trip by the engine's rule).
//! - **Encoding**: JSON (`serde_json`, as the session relay), in a `ractor_cluster` cast or
//!   call whose variant name carries the version ([`CAST_VARIANT`], [`CALL_VARIANT`]); a
//!   call's reply is the JSON of `Result<Reply, Failure>` over `ractor_cluster`'s own reply
//!   channel. A frame that does not decode, or of a version this build does not know, is
//!   dropped and counted (a call is answered [`Failure::Malformed`]), never a panic.
//! - **Bounds**: at most [`Remote::max_inflight`] calls waiting per peer on the caller's
//!   side, and as many deliveries in progress per sending peer on the router's side (more:
//!   refused, `dispatch_bound_hits_total{bound="remote_inflight"}`); every call has the
//!   caller's timeout (`actor_call_timeout_ms`, or a search's deadline) and the router's
//!   wait on a local actor `actor_call_timeout_ms`; a frame is at most
//!   [`MAX_MESSAGE_BYTES`].
//! - **Metrics**: `dispatch_cluster_remote_seconds{kind}` (a call's round trip on the
//!   caller; a cast's delivery on the router) and
//!   `dispatch_cluster_remote_errors_total{kind,cause}`, label sets closed ([`KINDS`],
//!   [`CAUSES`]) and created at zero.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispatch_engine::{
    Candidate, CellId, DriverId, DriverProfile, DriverStatus, Entry, IndexedDriver, Point, RiderId,
    RiderProfile, Sender, Trip, TripCommand, TripDriver, TripId, refuse_without_trip,
};
use parking_lot::Mutex;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, Message, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::error::ApiError;
pub use crate::messages::WireFence;
use crate::messages::{
    CellMsg, DriverMsg, Group, NewTrip, RiderMsg, SearchFilter, Spawn, TripArgs, TripLink, TripMsg,
};
use crate::metrics::Metrics;
use crate::placement::Link;
use crate::records::{DriverRecord, RiderRecord, TripRecord};
use crate::session::Ticket;
use crate::system::System;
use crate::tracecontext::Trace;
use crate::views::{OfferView, Receipt, TripView};

/// The `ractor_cluster` variant of a routed cast, version 1.
pub const CAST_VARIANT: &str = "dispatch.remote.cast.v1";
/// The `ractor_cluster` variant of a routed call, version 1.
pub const CALL_VARIANT: &str = "dispatch.remote.call.v1";
/// The largest encoded message sent (below membership's 256 KiB `MAX_FRAME_BYTES`, which
/// the link enforces on what it receives, with room for `ractor_cluster`'s envelope).
pub const MAX_MESSAGE_BYTES: usize = 192 * 1024;
/// Calls waiting per peer (caller) and deliveries in progress per sending peer (router),
/// at most, unless [`Remote::new`] is given another number.
pub const MAX_INFLIGHT_PER_PEER: usize = 1024;
/// The longest sender name a router accepts (membership's heartbeat names are shorter).
const MAX_NODE_NAME: usize = 255;

/// The process group of `node`'s router.
pub fn router_group(node: &str) -> String {
    format!("dispatch.router.{node}")
}

// ---------------------------------------------------------------------------------------
// The remote forms.
// ---------------------------------------------------------------------------------------

/// A cell, on the wire: its H3 index (checked again on arrival).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u64", try_from = "u64")]
pub struct WireCell(pub CellId);

impl From<WireCell> for u64 {
    fn from(c: WireCell) -> u64 {
        u64::from(c.0)
    }
}

impl TryFrom<u64> for WireCell {
    type Error = String;
    fn try_from(v: u64) -> Result<Self, String> {
        CellId::try_from(v)
            .map(WireCell)
            .map_err(|e| format!("not an H3 cell: {e}"))
    }
}

/// The casts to a cell that cross nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CellCast {
    Upsert { driver: IndexedDriver, ping: bool },
    Remove(DriverId),
}

/// The casts to a driver that cross nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DriverCast {
    OfferEnded {
        trip_id: TripId,
        notify: bool,
        answers: Option<Ticket>,
    },
    Trip {
        view: Box<TripView>,
        link: TripLink,
        answers: Option<Ticket>,
    },
    Answer {
        ticket: Ticket,
        outcome: Result<(), ApiError>,
    },
    TripFailed(TripId),
    Reindex,
}

/// The casts to a rider that cross nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RiderCast {
    TripStarted {
        view: TripView,
        ticket: Option<Ticket>,
    },
    TripNotStarted {
        trip_id: TripId,
        ticket: Option<Ticket>,
        error: ApiError,
    },
    Trip {
        view: TripView,
        receipt: Option<Receipt>,
        answers: Option<Ticket>,
    },
    DriverLocation {
        trip_id: TripId,
        position: Point,
        heading: Option<f64>,
        pickup_eta_s: Option<u64>,
    },
    Answer {
        ticket: Ticket,
        outcome: Result<(), ApiError>,
    },
    TripFailed(TripId),
}

/// The casts to a trip that cross nodes. `trace` crosses as its W3C `traceparent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TripCast {
    Command {
        cmd: TripCommand,
        from: Sender,
        ticket: Option<Ticket>,
        trace: Trace,
        /// The sending node's fence of the driver's shard (stage 5; absent before).
        #[serde(default)]
        fence: Option<WireFence>,
    },
    DriverLocation {
        driver_id: DriverId,
        position: Point,
        heading: Option<f64>,
    },
}

/// A cast to an entity on another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Routed {
    Cell(WireCell, CellCast),
    Driver(DriverId, DriverCast),
    Rider(RiderId, RiderCast),
    Trip(TripId, TripCast),
}

/// The calls to a cell that cross nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CellCall {
    Query {
        pickup: Point,
        k: usize,
        max_radius_m: f64,
        filter: SearchFilter,
        trace: Trace,
    },
    Count,
}

/// The calls to a driver that cross nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DriverCall {
    ReserveOffer(OfferView),
    Get,
    Suspend(bool),
}

/// The calls to a rider that cross nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RiderCall {
    Get,
}

/// The calls to a trip that cross nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TripCall {
    Get,
}

/// A call to an entity (or to the trip supervisor) on another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RoutedCall {
    Cell(WireCell, CellCall),
    Driver(DriverId, DriverCall),
    Rider(RiderId, RiderCall),
    Trip(TripId, TripCall),
    /// Start this new trip on the callee (`SupervisorMsg::Spawn(Spawn::Trip(New))`).
    SpawnTrip(NewTrip),
}

/// A driver's record as another node sees it: its session stays on its node, so only
/// whether it has one crosses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireDriverRecord {
    pub id: DriverId,
    pub profile: DriverProfile,
    pub status: DriverStatus,
    pub position: Option<Point>,
    pub heading: Option<f64>,
    pub cell: Option<WireCell>,
    pub offer: Option<Box<OfferView>>,
    pub trip: Option<Box<TripView>>,
    pub connected: bool,
    pub session_epoch: u64,
}

impl From<DriverRecord> for WireDriverRecord {
    fn from(r: DriverRecord) -> Self {
        WireDriverRecord {
            connected: r.session.is_some(),
            id: r.id,
            profile: r.profile,
            status: r.status,
            position: r.position,
            heading: r.heading,
            cell: r.cell.map(WireCell),
            offer: r.offer,
            trip: r.trip,
            session_epoch: r.session_epoch,
        }
    }
}

/// A rider's record as another node sees it (no session, no token hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRiderRecord {
    pub id: RiderId,
    pub profile: RiderProfile,
    pub trip: Option<TripView>,
    pub position: Option<Point>,
    pub connected: bool,
}

impl From<RiderRecord> for WireRiderRecord {
    fn from(r: RiderRecord) -> Self {
        WireRiderRecord {
            connected: r.session.is_some(),
            id: r.id,
            profile: r.profile,
            trip: r.trip,
            position: r.position,
        }
    }
}

/// A trip's record on the wire (it holds no handle: all of it crosses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTripRecord {
    pub trip: Trip,
    pub driver: Option<TripDriver>,
    pub entries: Vec<Entry>,
}

impl From<TripRecord> for WireTripRecord {
    fn from(r: TripRecord) -> Self {
        WireTripRecord {
            trip: r.trip,
            driver: r.driver,
            entries: r.entries,
        }
    }
}

impl From<WireTripRecord> for TripRecord {
    fn from(r: WireTripRecord) -> Self {
        TripRecord {
            trip: r.trip,
            driver: r.driver,
            entries: r.entries,
        }
    }
}

/// A call's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// `CellCall::Query`: the candidates and how many drivers were examined.
    Candidates(Vec<Candidate>, usize),
    /// `CellCall::Count`: (available, total).
    Count(usize, usize),
    Reserved(bool),
    Driver(WireDriverRecord),
    Suspended(Result<WireDriverRecord, ApiError>),
    Rider(WireRiderRecord),
    Trip(WireTripRecord),
    /// `SpawnTrip`: started, or why not.
    Spawned(Result<(), ApiError>),
}

/// Why a call got no [`Reply`]. Each is a `cause` of
/// `dispatch_cluster_remote_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Failure {
    #[error("the message does not decode: {0}")]
    Malformed(String),
    #[error("a message version this node does not know: {0}")]
    Version(String),
    #[error("this message does not cross nodes: {0}")]
    LocalOnly(String),
    #[error("no router of node {0}")]
    NoRoute(String),
    #[error("too many messages in flight to or from this peer")]
    Inflight,
    /// The callee's router refused the call: this node has too many in flight there.
    #[error("the peer has too many messages in flight from this node")]
    PeerInflight,
    #[error("no answer in time")]
    Timeout,
    #[error("the entity is not on that node")]
    NotHere,
    #[error("the peer or its link went away")]
    PeerGone,
    #[error("the message is larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
}

impl Failure {
    /// Its `cause` label.
    pub fn cause(&self) -> &'static str {
        match self {
            Failure::Malformed(_) => "malformed",
            Failure::Version(_) => "version",
            Failure::LocalOnly(_) => "local_only",
            Failure::NoRoute(_) => "no_route",
            Failure::Inflight => "inflight",
            Failure::PeerInflight => "peer_inflight",
            Failure::Timeout => "timeout",
            Failure::NotHere => "not_here",
            Failure::PeerGone => "peer_gone",
            Failure::TooLarge => "too_large",
        }
    }
}

/// Every `cause` of `dispatch_cluster_remote_errors_total`.
pub const CAUSES: [&str; 10] = [
    "malformed",
    "version",
    "local_only",
    "no_route",
    "inflight",
    "peer_inflight",
    "timeout",
    "not_here",
    "peer_gone",
    "too_large",
];

/// Every `kind` of the remote series: one per message that crosses, and `unknown` for a
/// frame that did not decode far enough to tell.
pub const KINDS: [&str; 24] = [
    "cell_upsert",
    "cell_remove",
    "cell_query",
    "cell_count",
    "driver_reserve_offer",
    "driver_offer_ended",
    "driver_trip",
    "driver_answer",
    "driver_trip_failed",
    "driver_reindex",
    "driver_get",
    "driver_suspend",
    "rider_trip_started",
    "rider_trip_not_started",
    "rider_trip",
    "rider_driver_location",
    "rider_answer",
    "rider_trip_failed",
    "rider_get",
    "trip_command",
    "trip_driver_location",
    "trip_get",
    "spawn_trip",
    "unknown",
];

impl Routed {
    /// Its `kind` label.
    pub fn kind(&self) -> &'static str {
        match self {
            Routed::Cell(_, CellCast::Upsert { .. }) => "cell_upsert",
            Routed::Cell(_, CellCast::Remove(_)) => "cell_remove",
            Routed::Driver(_, m) => match m {
                DriverCast::OfferEnded { .. } => "driver_offer_ended",
                DriverCast::Trip { .. } => "driver_trip",
                DriverCast::Answer { .. } => "driver_answer",
                DriverCast::TripFailed(_) => "driver_trip_failed",
                DriverCast::Reindex => "driver_reindex",
            },
            Routed::Rider(_, m) => match m {
                RiderCast::TripStarted { .. } => "rider_trip_started",
                RiderCast::TripNotStarted { .. } => "rider_trip_not_started",
                RiderCast::Trip { .. } => "rider_trip",
                RiderCast::DriverLocation { .. } => "rider_driver_location",
                RiderCast::Answer { .. } => "rider_answer",
                RiderCast::TripFailed(_) => "rider_trip_failed",
            },
            Routed::Trip(_, TripCast::Command { .. }) => "trip_command",
            Routed::Trip(_, TripCast::DriverLocation { .. }) => "trip_driver_location",
        }
    }
}

impl RoutedCall {
    /// Its `kind` label.
    pub fn kind(&self) -> &'static str {
        match self {
            RoutedCall::Cell(_, CellCall::Query { .. }) => "cell_query",
            RoutedCall::Cell(_, CellCall::Count) => "cell_count",
            RoutedCall::Driver(_, DriverCall::ReserveOffer(_)) => "driver_reserve_offer",
            RoutedCall::Driver(_, DriverCall::Get) => "driver_get",
            RoutedCall::Driver(_, DriverCall::Suspend(_)) => "driver_suspend",
            RoutedCall::Rider(_, RiderCall::Get) => "rider_get",
            RoutedCall::Trip(_, TripCall::Get) => "trip_get",
            RoutedCall::SpawnTrip(_) => "spawn_trip",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Remote form -> local message (on the router's node).
// ---------------------------------------------------------------------------------------

impl From<CellCast> for CellMsg {
    fn from(m: CellCast) -> Self {
        match m {
            CellCast::Upsert { driver, ping } => CellMsg::Upsert { driver, ping },
            CellCast::Remove(d) => CellMsg::Remove(d),
        }
    }
}

impl From<DriverCast> for DriverMsg {
    fn from(m: DriverCast) -> Self {
        match m {
            DriverCast::OfferEnded {
                trip_id,
                notify,
                answers,
            } => DriverMsg::OfferEnded {
                trip_id,
                notify,
                answers,
            },
            DriverCast::Trip {
                view,
                link,
                answers,
            } => DriverMsg::Trip {
                view,
                link,
                answers,
            },
            DriverCast::Answer { ticket, outcome } => DriverMsg::Answer { ticket, outcome },
            DriverCast::TripFailed(t) => DriverMsg::TripFailed(t),
            DriverCast::Reindex => DriverMsg::Reindex,
        }
    }
}

impl From<RiderCast> for RiderMsg {
    fn from(m: RiderCast) -> Self {
        match m {
            RiderCast::TripStarted { view, ticket } => RiderMsg::TripStarted { view, ticket },
            RiderCast::TripNotStarted {
                trip_id,
                ticket,
                error,
            } => RiderMsg::TripNotStarted {
                trip_id,
                ticket,
                error,
            },
            RiderCast::Trip {
                view,
                receipt,
                answers,
            } => RiderMsg::Trip {
                view,
                receipt,
                answers,
            },
            RiderCast::DriverLocation {
                trip_id,
                position,
                heading,
                pickup_eta_s,
            } => RiderMsg::DriverLocation {
                trip_id,
                position,
                heading,
                pickup_eta_s,
            },
            RiderCast::Answer { ticket, outcome } => RiderMsg::Answer { ticket, outcome },
            RiderCast::TripFailed(t) => RiderMsg::TripFailed(t),
        }
    }
}

impl From<TripCast> for TripMsg {
    fn from(m: TripCast) -> Self {
        match m {
            TripCast::Command {
                cmd,
                from,
                ticket,
                trace,
                fence,
            } => TripMsg::Command {
                cmd,
                from,
                ticket,
                trace,
                fence: fence.map(Into::into),
            },
            TripCast::DriverLocation {
                driver_id,
                position,
                heading,
            } => TripMsg::DriverLocation {
                driver_id,
                position,
                heading,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Local message -> remote form (on the sender's node).
// ---------------------------------------------------------------------------------------

/// Where a call's [`Reply`] goes on the caller's node: the local message's own reply
/// port. A reply of another kind is refused (`false`) and the port dropped, as a local
/// actor that stopped drops it.
pub type Answer = Box<dyn FnOnce(Reply) -> bool + Send>;

/// A local message for an entity on another node, split into what crosses and, for a
/// call, where its reply goes.
pub enum Outgoing {
    Cast(Routed),
    Call(RoutedCall, Answer),
}

/// `port`'s answer from a reply of the one kind `pick` takes.
/// A reply of the right kind whose waiter has gone (a search past its deadline) is not an
/// error: it is dropped.
fn answer<T: Send + 'static>(port: RpcReplyPort<T>, pick: fn(Reply) -> Option<T>) -> Answer {
    Box::new(move |r| pick(r).map(|v| drop(port.send(v))).is_some())
}

impl Outgoing {
    /// A message to the cell `cell`; its test hooks do not cross.
    pub fn cell(cell: CellId, m: CellMsg) -> Result<Outgoing, Failure> {
        let c = WireCell(cell);
        Ok(match m {
            CellMsg::Upsert { driver, ping } => {
                Outgoing::Cast(Routed::Cell(c, CellCast::Upsert { driver, ping }))
            }
            CellMsg::Remove(d) => Outgoing::Cast(Routed::Cell(c, CellCast::Remove(d))),
            CellMsg::Query {
                pickup,
                k,
                max_radius_m,
                filter,
                trace,
                reply,
            } => {
                let call = CellCall::Query {
                    pickup,
                    k,
                    max_radius_m,
                    filter,
                    trace,
                };
                let to = answer(reply, |r| match r {
                    Reply::Candidates(c, n) => Some((c, n)),
                    _ => None,
                });
                Outgoing::Call(RoutedCall::Cell(c, call), to)
            }
            CellMsg::Count(reply) => {
                let to = answer(reply, |r| match r {
                    Reply::Count(a, t) => Some((a, t)),
                    _ => None,
                });
                Outgoing::Call(RoutedCall::Cell(c, CellCall::Count), to)
            }
            other => return Err(Failure::LocalOnly(other.kind().to_owned())),
        })
    }

    /// A message to the driver `id`. A remote driver's record comes back without its
    /// session (`session: None`): the session is on the driver's node.
    pub fn driver(id: DriverId, m: DriverMsg) -> Result<Outgoing, Failure> {
        let cast = |c| Ok(Outgoing::Cast(Routed::Driver(id.clone(), c)));
        match m {
            DriverMsg::OfferEnded {
                trip_id,
                notify,
                answers,
            } => cast(DriverCast::OfferEnded {
                trip_id,
                notify,
                answers,
            }),
            DriverMsg::Trip {
                view,
                link,
                answers,
            } => cast(DriverCast::Trip {
                view,
                link,
                answers,
            }),
            DriverMsg::Answer { ticket, outcome } => cast(DriverCast::Answer { ticket, outcome }),
            DriverMsg::TripFailed(t) => cast(DriverCast::TripFailed(t)),
            DriverMsg::Reindex => cast(DriverCast::Reindex),
            DriverMsg::ReserveOffer(offer, reply) => {
                let to = answer(reply, |r| match r {
                    Reply::Reserved(b) => Some(b),
                    _ => None,
                });
                let call = RoutedCall::Driver(id.clone(), DriverCall::ReserveOffer(offer));
                Ok(Outgoing::Call(call, to))
            }
            DriverMsg::Get(reply) => {
                let to = answer(reply, |r| match r {
                    Reply::Driver(d) => Some(driver_record(d)),
                    _ => None,
                });
                Ok(Outgoing::Call(RoutedCall::Driver(id, DriverCall::Get), to))
            }
            DriverMsg::Suspend(s, reply) => {
                let to = answer(reply, |r| match r {
                    Reply::Suspended(d) => Some(d.map(driver_record)),
                    _ => None,
                });
                let call = RoutedCall::Driver(id.clone(), DriverCall::Suspend(s));
                Ok(Outgoing::Call(call, to))
            }
            other => Err(Failure::LocalOnly(other.kind().to_owned())),
        }
    }

    /// A message to the rider `id`. Its record comes back without its session.
    pub fn rider(id: RiderId, m: RiderMsg) -> Result<Outgoing, Failure> {
        let cast = |c| Ok(Outgoing::Cast(Routed::Rider(id.clone(), c)));
        match m {
            RiderMsg::TripStarted { view, ticket } => cast(RiderCast::TripStarted { view, ticket }),
            RiderMsg::TripNotStarted {
                trip_id,
                ticket,
                error,
            } => cast(RiderCast::TripNotStarted {
                trip_id,
                ticket,
                error,
            }),
            RiderMsg::Trip {
                view,
                receipt,
                answers,
            } => cast(RiderCast::Trip {
                view,
                receipt,
                answers,
            }),
            RiderMsg::DriverLocation {
                trip_id,
                position,
                heading,
                pickup_eta_s,
            } => cast(RiderCast::DriverLocation {
                trip_id,
                position,
                heading,
                pickup_eta_s,
            }),
            RiderMsg::Answer { ticket, outcome } => cast(RiderCast::Answer { ticket, outcome }),
            RiderMsg::TripFailed(t) => cast(RiderCast::TripFailed(t)),
            RiderMsg::Get(reply) => {
                let to = answer(reply, |r| match r {
                    Reply::Rider(d) => Some(rider_record(d)),
                    _ => None,
                });
                Ok(Outgoing::Call(RoutedCall::Rider(id, RiderCall::Get), to))
            }
            other => Err(Failure::LocalOnly(other.kind().to_owned())),
        }
    }

    /// A message to the trip `id`.
    pub fn trip(id: TripId, m: TripMsg) -> Result<Outgoing, Failure> {
        match m {
            TripMsg::Command {
                cmd,
                from,
                ticket,
                trace,
                fence,
            } => {
                let c = TripCast::Command {
                    cmd,
                    from,
                    ticket,
                    trace,
                    fence: fence.map(Into::into),
                };
                Ok(Outgoing::Cast(Routed::Trip(id, c)))
            }
            TripMsg::DriverLocation {
                driver_id,
                position,
                heading,
            } => {
                let c = TripCast::DriverLocation {
                    driver_id,
                    position,
                    heading,
                };
                Ok(Outgoing::Cast(Routed::Trip(id, c)))
            }
            TripMsg::Get(reply) => {
                let to = answer(reply, |r| match r {
                    Reply::Trip(t) => Some(t.into()),
                    _ => None,
                });
                Ok(Outgoing::Call(RoutedCall::Trip(id, TripCall::Get), to))
            }
            other => Err(Failure::LocalOnly(other.kind().to_owned())),
        }
    }

    /// The trip supervisor's spawn of a new trip; the reply says whether it started.
    pub fn spawn_trip(new: NewTrip, reply: RpcReplyPort<Result<(), ApiError>>) -> Outgoing {
        let to = answer(reply, |r| match r {
            Reply::Spawned(s) => Some(s),
            _ => None,
        });
        Outgoing::Call(RoutedCall::SpawnTrip(new), to)
    }
}

/// A remote driver's record as a local one, without a session (it is on its node).
fn driver_record(d: WireDriverRecord) -> DriverRecord {
    DriverRecord {
        id: d.id,
        profile: d.profile,
        token_hash: [0; 32],
        status: d.status,
        position: d.position,
        heading: d.heading,
        cell: d.cell.map(|c| c.0),
        offer: d.offer,
        trip: d.trip,
        session: None,
        session_epoch: d.session_epoch,
    }
}

/// A remote rider's record as a local one, without a session or token hash.
fn rider_record(r: WireRiderRecord) -> RiderRecord {
    RiderRecord {
        id: r.id,
        profile: r.profile,
        token_hash: [0; 32],
        trip: r.trip,
        position: r.position,
        session: None,
    }
}

// ---------------------------------------------------------------------------------------
// The frames and the router's message.
// ---------------------------------------------------------------------------------------

/// What crosses: the sending node's name and the message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub from: String,
    pub msg: T,
}

/// The router's message: encoded frames (JSON of an [`Envelope`]), decoded and checked by
/// the router itself so that what does not decode is counted there.
pub enum RouterMsg {
    /// A routed cast ([`CAST_VARIANT`]).
    Cast(Vec<u8>),
    /// A routed call ([`CALL_VARIANT`]); the reply is the JSON of `Result<Reply, Failure>`.
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// A frame of a variant this build does not know (another version), or not a cast or
    /// call; a call's is answered [`Failure::Version`].
    Unknown {
        variant: String,
        reply: Option<RpcReplyPort<Vec<u8>>>,
    },
}

impl Message for RouterMsg {
    fn serializable() -> bool {
        true
    }

    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            RouterMsg::Cast(args) => Ok(SerializedMessage::Cast {
                variant: CAST_VARIANT.to_owned(),
                args,
                metadata: None,
            }),
            RouterMsg::Call(args, reply) => Ok(SerializedMessage::Call {
                variant: CALL_VARIANT.to_owned(),
                args,
                reply,
                metadata: None,
            }),
            RouterMsg::Unknown { .. } => Err(BoxedDowncastErr),
        }
    }

    fn deserialize(m: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        Ok(match m {
            SerializedMessage::Cast { variant, args, .. } if variant == CAST_VARIANT => {
                RouterMsg::Cast(args)
            }
            SerializedMessage::Call {
                variant,
                args,
                reply,
                ..
            } if variant == CALL_VARIANT => RouterMsg::Call(args, reply),
            SerializedMessage::Cast { variant, .. } => RouterMsg::Unknown {
                variant,
                reply: None,
            },
            SerializedMessage::Call { variant, reply, .. } => RouterMsg::Unknown {
                variant,
                reply: Some(reply),
            },
            SerializedMessage::CallReply(..) => RouterMsg::Unknown {
                variant: "a call reply".to_owned(),
                reply: None,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------
// Metrics and bounds.
// ---------------------------------------------------------------------------------------

/// The remote series (docs/api.md, "Messages between nodes"), registered once per
/// [`Metrics`].
#[derive(Clone)]
pub struct RemoteMetrics {
    seconds: HistogramVec,
    errors: IntCounterVec,
    metrics: Arc<Metrics>,
}

impl RemoteMetrics {
    fn new(metrics: &Arc<Metrics>) -> Self {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "dispatch_cluster_remote_seconds",
                "Messages between nodes: a call's round trip on the caller, a cast's delivery on the router",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["kind"],
        )
        .expect("valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_remote_errors_total",
                "Messages between nodes that failed, by kind and cause",
            ),
            &["kind", "cause"],
        )
        .expect("valid");
        for k in KINDS {
            seconds.with_label_values(&[k]);
            for c in CAUSES {
                errors.with_label_values(&[k, c]);
            }
        }
        let r = &metrics.registry;
        // A second router on the same metrics (a restart) reuses the registered series.
        let _ = r.register(Box::new(seconds.clone()));
        let _ = r.register(Box::new(errors.clone()));
        Self {
            seconds,
            errors,
            metrics: metrics.clone(),
        }
    }

    fn error(&self, kind: &str, f: &Failure) {
        debug_assert!(KINDS.contains(&kind), "add {kind} to KINDS");
        self.errors.with_label_values(&[kind, f.cause()]).inc();
        if *f == Failure::Inflight {
            self.metrics.bound_hit("remote_inflight");
        }
    }

    fn took(&self, kind: &str, since: Instant) {
        self.seconds
            .with_label_values(&[kind])
            .observe(since.elapsed().as_secs_f64());
    }

    /// The errors counted so far of `kind` and `cause` (tests, the admin console).
    pub fn errors(&self, kind: &str, cause: &str) -> u64 {
        self.errors.with_label_values(&[kind, cause]).get()
    }

    /// How many of `kind` were timed (tests).
    pub fn timed(&self, kind: &str) -> u64 {
        self.seconds.with_label_values(&[kind]).get_sample_count()
    }
}

/// Messages in flight per peer, at most `max`.
#[derive(Debug)]
struct Inflight {
    max: usize,
    per_peer: Mutex<HashMap<String, usize>>,
}

/// One message in flight, until dropped.
struct Slot {
    of: Arc<Inflight>,
    peer: String,
}

impl Inflight {
    fn take(self: &Arc<Self>, peer: &str) -> Result<Slot, Failure> {
        let mut m = self.per_peer.lock();
        let n = m.entry(peer.to_owned()).or_default();
        if *n >= self.max {
            if *n == 0 {
                m.remove(peer);
            }
            return Err(Failure::Inflight);
        }
        *n += 1;
        Ok(Slot {
            of: self.clone(),
            peer: peer.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.of.per_peer.lock();
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// This node's side of the messages between nodes: its name, the bounds and the series.
/// Shared by the router and by [`send`] / [`call`].
pub struct Remote {
    node: String,
    metrics: RemoteMetrics,
    outbound: Arc<Inflight>,
    inbound: Arc<Inflight>,
    call_timeout: Duration,
}

impl Remote {
    /// `node`: this node's name; `max_inflight`: per peer, each way.
    pub fn new(
        node: impl Into<String>,
        metrics: &Arc<Metrics>,
        call_timeout: Duration,
        max_inflight: usize,
    ) -> Arc<Remote> {
        let fresh = |max| {
            Arc::new(Inflight {
                max,
                per_peer: Mutex::default(),
            })
        };
        Arc::new(Remote {
            node: node.into(),
            metrics: RemoteMetrics::new(metrics),
            outbound: fresh(max_inflight),
            inbound: fresh(max_inflight),
            call_timeout,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn metrics(&self) -> &RemoteMetrics {
        &self.metrics
    }

    pub fn max_inflight(&self) -> usize {
        self.outbound.max
    }

    /// A call's default timeout (`actor_call_timeout_ms`).
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The router of `node`: this node's own for itself, else one reached over a link.
    fn router(&self, node: &str) -> Option<ActorRef<RouterMsg>> {
        let here = node == self.node;
        ractor::pg::get_members(&router_group(node))
            .into_iter()
            .find(|c| c.get_id().is_local() == here)
            .map(ActorRef::from)
    }

    fn encode<T: Serialize>(&self, msg: T) -> Result<Vec<u8>, Failure> {
        let env = Envelope {
            from: self.node.clone(),
            msg,
        };
        let bytes = serde_json::to_vec(&env).map_err(|e| Failure::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(Failure::TooLarge);
        }
        Ok(bytes)
    }
}

/// Casts `msg` to its entity on `to_node`, through that node's router. Fails (counted) if
/// there is no router of that node, the message is too large, or the link refuses it.
pub fn send(remote: &Remote, to_node: &str, msg: Routed) -> Result<(), Failure> {
    let kind = msg.kind();
    let r = (|| {
        let router = remote
            .router(to_node)
            .ok_or_else(|| Failure::NoRoute(to_node.to_owned()))?;
        let bytes = remote.encode(msg)?;
        router
            .cast(RouterMsg::Cast(bytes))
            .map_err(|_| Failure::PeerGone)
    })();
    if let Err(f) = &r {
        remote.metrics.error(kind, f);
    }
    r
}

/// Calls `msg`'s entity on `to_node` through that node's router and waits for its reply at
/// most `timeout` (`None`: `actor_call_timeout_ms`). At most [`Remote::max_inflight`]
/// calls wait per peer; every failure is counted by its cause.
pub async fn call(
    remote: &Remote,
    to_node: &str,
    msg: RoutedCall,
    timeout: Option<Duration>,
) -> Result<Reply, Failure> {
    let (kind, started) = (msg.kind(), Instant::now());
    let r = call_inner(remote, to_node, msg, timeout.unwrap_or(remote.call_timeout)).await;
    match &r {
        Ok(_) => remote.metrics.took(kind, started),
        Err(f) => remote.metrics.error(kind, f),
    }
    r
}

async fn call_inner(
    remote: &Remote,
    to_node: &str,
    msg: RoutedCall,
    timeout: Duration,
) -> Result<Reply, Failure> {
    let router = remote
        .router(to_node)
        .ok_or_else(|| Failure::NoRoute(to_node.to_owned()))?;
    let _slot = remote.outbound.take(to_node)?;
    let bytes = remote.encode(msg)?;
    match router
        .call(|reply| RouterMsg::Call(bytes, reply), Some(timeout))
        .await
    {
        Ok(CallResult::Success(reply)) => {
            match serde_json::from_slice::<Result<Reply, Failure>>(&reply) {
                // The peer's bound, not this node's: counted apart.
                Ok(Err(Failure::Inflight)) => Err(Failure::PeerInflight),
                Ok(r) => r,
                Err(e) => Err(Failure::Malformed(format!(
                    "a reply that does not decode: {e}"
                ))),
            }
        }
        Ok(CallResult::Timeout) => Err(Failure::Timeout),
        Ok(CallResult::SenderError) | Err(_) => Err(Failure::PeerGone),
    }
}

/// Sends a local message to its entity on `to_node`: a cast at once, a call in a task of
/// its own whose reply (or none, on a failure: the port is dropped, as by an actor that
/// stopped) goes to the local message's reply port.
pub fn forward(remote: &Arc<Remote>, to_node: &str, out: Outgoing, timeout: Option<Duration>) {
    match out {
        Outgoing::Cast(m) => {
            let _ = send(remote, to_node, m);
        }
        Outgoing::Call(m, answer) => {
            let (remote, to_node) = (remote.clone(), to_node.to_owned());
            let kind = m.kind();
            tokio::spawn(async move {
                if let Ok(reply) = call(&remote, &to_node, m, timeout).await
                    && !answer(reply)
                {
                    let f = Failure::Malformed("a reply of another kind".into());
                    remote.metrics.error(kind, &f);
                }
            });
        }
    }
}

/// The [`Link`] of a node's actors to other nodes: local messages sent through
/// [`forward`] (stage 5's call sites, through `Context::placement`).
struct Via(Arc<Remote>);

impl Via {
    fn go(&self, node: &str, out: Result<Outgoing, Failure>, timeout: Option<Duration>) -> bool {
        match out {
            Ok(Outgoing::Cast(m)) => send(&self.0, node, m).is_ok(),
            Ok(call) => {
                forward(&self.0, node, call, timeout);
                true
            }
            Err(f) => {
                self.0.metrics.error("unknown", &f);
                false
            }
        }
    }
}

impl Link for Via {
    fn cell(&self, node: &str, cell: CellId, m: CellMsg, timeout: Option<Duration>) -> bool {
        self.go(node, Outgoing::cell(cell, m), timeout)
    }
    fn driver(&self, node: &str, id: DriverId, m: DriverMsg) -> bool {
        self.go(node, Outgoing::driver(id, m), None)
    }
    fn rider(&self, node: &str, id: RiderId, m: RiderMsg) -> bool {
        self.go(node, Outgoing::rider(id, m), None)
    }
    fn trip(&self, node: &str, id: TripId, m: TripMsg) -> bool {
        self.go(node, Outgoing::trip(id, m), None)
    }
    fn spawn_trip(
        &self,
        node: &str,
        new: NewTrip,
        reply: RpcReplyPort<Result<(), ApiError>>,
    ) -> bool {
        self.go(node, Ok(Outgoing::spawn_trip(new, reply)), None)
    }
}

// ---------------------------------------------------------------------------------------
// The router.
// ---------------------------------------------------------------------------------------

/// A node's router: the member of [`router_group`] of its node.
pub struct Router {
    ctx: Context,
    remote: Arc<Remote>,
}

impl System {
    /// Starts this node's router in `dispatch.router.<node>`, with at most `max_inflight`
    /// messages in flight per peer each way ([`MAX_INFLIGHT_PER_PEER`] by default).
    pub async fn start_router(
        &self,
        node: &str,
        max_inflight: usize,
    ) -> Result<(ActorRef<RouterMsg>, Arc<Remote>), ApiError> {
        let remote = Remote::new(
            node,
            &self.ctx.metrics,
            self.ctx.call_timeout(),
            max_inflight,
        );
        let router = Router {
            ctx: self.ctx.clone(),
            remote: remote.clone(),
        };
        let (actor, _) = Actor::spawn(None, router, ())
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot start the router: {e}")))?;
        ractor::pg::join(router_group(node), vec![actor.get_cell()]);
        self.ctx.placement.set_link(Arc::new(Via(remote.clone())));
        Ok((actor, remote))
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<RouterMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<RouterMsg>,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        ractor::pg::leave(router_group(&self.remote.node), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<RouterMsg>,
        msg: RouterMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        let m = &self.remote.metrics;
        match msg {
            RouterMsg::Cast(bytes) => match decode::<Routed>(&bytes) {
                Ok(env) => self.deliver(env),
                Err(f) => {
                    tracing::warn!(error = %f, "a routed cast that does not decode: dropped");
                    m.error("unknown", &f);
                }
            },
            RouterMsg::Call(bytes, reply) => match decode::<RoutedCall>(&bytes) {
                Ok(env) => self.serve(env, reply),
                Err(f) => {
                    tracing::warn!(error = %f, "a routed call that does not decode: refused");
                    m.error("unknown", &f);
                    respond(reply, Err(f));
                }
            },
            RouterMsg::Unknown { variant, reply } => {
                let f = Failure::Version(variant);
                tracing::warn!(error = %f, "a routed message of an unknown version: dropped");
                m.error("unknown", &f);
                if let Some(reply) = reply {
                    respond(reply, Err(f));
                }
            }
        }
        Ok(())
    }
}

/// An envelope from its JSON, with a sender name of a sane length.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Envelope<T>, Failure> {
    let env: Envelope<T> =
        serde_json::from_slice(bytes).map_err(|e| Failure::Malformed(e.to_string()))?;
    if env.from.is_empty() || env.from.len() > MAX_NODE_NAME {
        return Err(Failure::Malformed("a sender name of 1 to 255 bytes".into()));
    }
    Ok(env)
}

/// Answers a call over the link.
fn respond(reply: RpcReplyPort<Vec<u8>>, r: Result<Reply, Failure>) {
    match serde_json::to_vec(&r) {
        Ok(bytes) => {
            let _ = reply.send(bytes);
        }
        Err(e) => tracing::error!(error = %e, "a reply that does not encode: dropped"),
    }
}

/// One local call bounded by `timeout`.
async fn ask<M: Message, T: Send + 'static>(
    a: &ActorRef<M>,
    msg: impl FnOnce(RpcReplyPort<T>) -> M,
    timeout: Duration,
) -> Result<T, Failure> {
    match a.call(msg, Some(timeout)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(Failure::Timeout),
        _ => Err(Failure::NotHere),
    }
}

impl Router {
    /// A cast to its local actor: at once when the actor runs, else (a driver or rider to
    /// start from its record, a cell to start for a driver) in a task, in flight for its
    /// sender.
    fn deliver(&self, env: Envelope<Routed>) {
        let (kind, started) = (env.msg.kind(), Instant::now());
        let reg = &self.ctx.registry;
        let delivered = match &env.msg {
            Routed::Cell(c, m) => match reg.cell(&c.0) {
                Some(a) => Some(a.cast(m.clone().into()).is_ok()),
                // A driver leaving a cell that has no actor: nothing to remove.
                None if matches!(m, CellCast::Remove(_)) => Some(true),
                None => None,
            },
            Routed::Driver(id, m) => reg.driver(id).map(|a| a.cast(m.clone().into()).is_ok()),
            Routed::Rider(id, m) => reg.rider(id).map(|a| a.cast(m.clone().into()).is_ok()),
            Routed::Trip(id, m) => reg.trip(id).map(|a| a.cast(m.clone().into()).is_ok()),
        };
        // Not delivered (no actor, or it stopped just now): started on demand below.
        if delivered == Some(true) {
            return self.remote.metrics.took(kind, started);
        }
        if let Routed::Trip(id, m) = env.msg {
            return self.no_trip(&env.from, id, m, kind);
        }
        let slot = match self.remote.inbound.take(&env.from) {
            Ok(s) => s,
            Err(f) => return self.remote.metrics.error(kind, &f),
        };
        let (ctx, remote) = (self.ctx.clone(), self.remote.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let ok = match env.msg {
                Routed::Cell(c, m) => match ctx.cell_actor(c.0).await {
                    Some(a) => a.cast(m.into()).is_ok(),
                    None => false,
                },
                Routed::Driver(id, m) => match ctx.driver_actor(&id).await {
                    Some(a) => a.cast(m.into()).is_ok(),
                    None => false,
                },
                Routed::Rider(id, m) => match ctx.rider_actor(&id).await {
                    Some(a) => a.cast(m.into()).is_ok(),
                    None => false,
                },
                Routed::Trip(..) => false,
            };
            if ok {
                remote.metrics.took(kind, started);
            } else {
                remote.metrics.error(kind, &Failure::NotHere);
            }
        });
    }

    /// A cast to a trip that is not here is answered as a dead trip's: a driver's command
    /// is told `TripFailed` on the driver's node (its app is answered `unavailable`, retry);
    /// a rider's, which names no rider, is answered by [`Router::no_trip_for_rider`].
    fn no_trip(&self, from: &str, id: TripId, m: TripCast, kind: &'static str) {
        self.remote.metrics.error(kind, &Failure::NotHere);
        let TripCast::Command {
            cmd,
            from: sender,
            ticket: Some(ticket),
            ..
        } = m
        else {
            return;
        };
        let back = match sender {
            Sender::Driver(d) => Routed::Driver(d, DriverCast::TripFailed(id)),
            Sender::Rider => return self.no_trip_for_rider(from, id, cmd, ticket),
            Sender::Admin | Sender::System => return,
        };
        let _ = send(&self.remote, from, back);
    }

    /// A rider's command to a trip that is not here: the stored trip names its rider, who
    /// is answered under the command's ticket as for a trip with no live actor (the
    /// engine's rule: a live one `unavailable`, retry; an ended one `conflict`), rather
    /// than waiting out its ticket. The read runs off the router's loop, in flight for
    /// its sender (more: refused, counted); a trip the store does not have names no rider
    /// to answer (its ticket expires, `unavailable`).
    fn no_trip_for_rider(&self, from: &str, id: TripId, cmd: TripCommand, ticket: Ticket) {
        let slot = match self.remote.inbound.take(from) {
            Ok(s) => s,
            Err(f) => return self.remote.metrics.error("trip_command", &f),
        };
        let (ctx, remote, from) = (self.ctx.clone(), self.remote.clone(), from.to_owned());
        tokio::spawn(async move {
            let _slot = slot;
            let reloading = ctx.registry.reloading.contains(&id);
            let key = id.clone();
            let Ok(Some(t)) = ctx.read("trip", move |s| s.trip(&key)).await else {
                return;
            };
            let rider = t.trip.rider_id.clone();
            let outcome = Err(if reloading {
                crate::error::trip_reloading()
            } else {
                refuse_without_trip(Some(&t.trip), &Sender::Rider, Some(&rider), &cmd).into()
            });
            let _ = send(
                &remote,
                &from,
                Routed::Rider(rider, RiderCast::Answer { ticket, outcome }),
            );
        });
    }

    /// A call to its local actor, in a task in flight for its sender (more: refused).
    fn serve(&self, env: Envelope<RoutedCall>, reply: RpcReplyPort<Vec<u8>>) {
        let kind = env.msg.kind();
        let (ctx, remote) = (self.ctx.clone(), self.remote.clone());
        let slot = match remote.inbound.take(&env.from) {
            Ok(s) => s,
            Err(f) => {
                remote.metrics.error(kind, &f);
                return respond(reply, Err(f));
            }
        };
        tokio::spawn(async move {
            let r = answer_call(&ctx, env.msg).await;
            drop(slot);
            if let Err(f) = &r {
                remote.metrics.error(kind, f);
            }
            respond(reply, r);
        });
    }
}

/// What a local actor answers to a call.
async fn answer_call(ctx: &Context, call: RoutedCall) -> Result<Reply, Failure> {
    let t = ctx.call_timeout();
    let reg = &ctx.registry;
    match call {
        RoutedCall::Cell(
            c,
            CellCall::Query {
                pickup,
                k,
                max_radius_m,
                filter,
                trace,
            },
        ) => {
            // A cell with no actor has no drivers: an empty answer, as a local search
            // skips it.
            let Some(a) = reg.cell(&c.0) else {
                return Ok(Reply::Candidates(Vec::new(), 0));
            };
            let msg = |reply| CellMsg::Query {
                pickup,
                k,
                max_radius_m,
                filter,
                trace,
                reply,
            };
            ask(&a, msg, t)
                .await
                .map(|(found, n)| Reply::Candidates(found, n))
        }
        RoutedCall::Cell(c, CellCall::Count) => match reg.cell(&c.0) {
            Some(a) => ask(&a, CellMsg::Count, t)
                .await
                .map(|(av, all)| Reply::Count(av, all)),
            None => Ok(Reply::Count(0, 0)),
        },
        RoutedCall::Driver(id, m) => {
            let a = ctx.driver_actor(&id).await.ok_or(Failure::NotHere)?;
            match m {
                DriverCall::ReserveOffer(o) => ask(&a, |r| DriverMsg::ReserveOffer(o, r), t)
                    .await
                    .map(Reply::Reserved),
                DriverCall::Get => ask(&a, DriverMsg::Get, t)
                    .await
                    .map(|d| Reply::Driver(d.into())),
                DriverCall::Suspend(s) => ask(&a, |r| DriverMsg::Suspend(s, r), t)
                    .await
                    .map(|d| Reply::Suspended(d.map(Into::into))),
            }
        }
        RoutedCall::Rider(id, RiderCall::Get) => {
            let a = ctx.rider_actor(&id).await.ok_or(Failure::NotHere)?;
            ask(&a, RiderMsg::Get, t)
                .await
                .map(|r| Reply::Rider(r.into()))
        }
        RoutedCall::Trip(id, m) => {
            let a = reg.trip(&id);
            match (m, a) {
                (TripCall::Get, Some(a)) => ask(&a, TripMsg::Get, t)
                    .await
                    .map(|r| Reply::Trip(r.into())),
                (TripCall::Get, None) => Err(Failure::NotHere),
            }
        }
        RoutedCall::SpawnTrip(new) => {
            // Only the node that serves the pickup's shard starts its trips (sharded
            // mode; always with it off): it is the one whose writes land there.
            if !ctx.serves(ctx.shard_of_pickup(new.pickup)) {
                ctx.metrics.shard_refused("not_served");
                return Ok(Reply::Spawned(Err(crate::error::pickup_not_served())));
            }
            // A second spawn of one trip (a retried call) never replaces the live one.
            if reg.trip(&new.trip_id).is_some() {
                return Ok(Reply::Spawned(Err(ApiError::conflict(format!(
                    "the trip {} is already live here",
                    new.trip_id
                )))));
            }
            // Only while it is served: `end_shard` may start ending it meanwhile (it stops
            // serving first; this checks again once the trip is registered).
            let r = ctx
                .spawn_served(Group::Trip, Spawn::Trip(TripArgs::New(new)))
                .await
                .and_then(|c| c.map(drop).ok_or_else(crate::error::pickup_not_served));
            Ok(Reply::Spawned(r))
        }
    }
}

/// Messages in flight now: (this node's calls waiting on `peer`, deliveries in progress
/// here for `peer`) (tests, the admin console).
pub fn in_flight(remote: &Remote, peer: &str) -> (usize, usize) {
    let n = |i: &Inflight| i.per_peer.lock().get(peer).copied().unwrap_or(0);
    (n(&remote.outbound), n(&remote.inbound))
}

/// The actor cell of `node`'s router as this node reaches it (tests, the admin console).
pub fn router_of(remote: &Remote, node: &str) -> Option<ActorCell> {
    remote.router(node).map(|r| r.get_cell())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatch_engine::Product;

    fn json_round_trip<T: Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
        serde_json::from_slice(&serde_json::to_vec(v).unwrap()).unwrap()
    }

    fn point() -> Point {
        Point::new(45.5, -73.6).unwrap()
    }

    /// Every cast that crosses goes local -> wire -> JSON -> wire -> local unchanged
    /// (compared as its wire form, as local messages have no equality).
    #[test]
    fn casts_cross_as_data_and_come_back_the_same() {
        let cell = dispatch_engine::Grid::new(7).unwrap().cell_of(point());
        let (d, t) = (DriverId::new("drv_1"), TripId::new("trp_1"));
        let indexed = IndexedDriver {
            driver_id: d.clone(),
            position: point(),
            heading: Some(90.0),
            product: Product::Economy,
            available: true,
        };
        // Each local message, by its own `kind`.
        let casts: Vec<CellOrOther> = vec![
            CellOrOther::Cell(CellMsg::Upsert {
                driver: indexed,
                ping: true,
            }),
            CellOrOther::Cell(CellMsg::Remove(d.clone())),
            CellOrOther::Driver(DriverMsg::TripFailed(t.clone())),
            CellOrOther::Driver(DriverMsg::Reindex),
            CellOrOther::Driver(DriverMsg::Answer {
                ticket: 7,
                outcome: Err(ApiError::conflict("no")),
            }),
            CellOrOther::Rider(RiderMsg::TripFailed(t.clone())),
            CellOrOther::Trip(TripMsg::Command {
                cmd: TripCommand::Accept {
                    driver_id: d.clone(),
                },
                from: Sender::Driver(d.clone()),
                ticket: Some(3),
                trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                    .to_owned()
                    .try_into()
                    .ok(),
                fence: Some(dispatch_persistence::Fence {
                    shard: 7,
                    epoch: 3,
                    holder: "node-b".into(),
                }),
            }),
        ];
        for c in casts {
            let (local_kind, out) = match c {
                CellOrOther::Cell(m) => (m.kind(), Outgoing::cell(cell, m)),
                CellOrOther::Driver(m) => (m.kind(), Outgoing::driver(d.clone(), m)),
                CellOrOther::Rider(m) => (m.kind(), Outgoing::rider(RiderId::new("r"), m)),
                CellOrOther::Trip(m) => (m.kind(), Outgoing::trip(t.clone(), m)),
            };
            let Ok(Outgoing::Cast(routed)) = out else {
                panic!("{local_kind} did not convert to a routed cast");
            };
            let back = json_round_trip(&routed);
            assert_eq!(back, routed);
            // docs/api.md: a ping's frame is a few hundred bytes at most.
            let frame = serde_json::to_vec(&Envelope {
                from: "dispatchd-0".to_owned(),
                msg: &routed,
            })
            .unwrap();
            if routed.kind() == "cell_upsert" {
                assert!(
                    frame.len() < 300,
                    "an upsert frame is {} bytes",
                    frame.len()
                );
            }
            let back_kind = match back {
                Routed::Cell(_, m) => CellMsg::from(m).kind(),
                Routed::Driver(_, m) => DriverMsg::from(m).kind(),
                Routed::Rider(_, m) => RiderMsg::from(m).kind(),
                Routed::Trip(_, m) => TripMsg::from(m).kind(),
            };
            assert_eq!(
                back_kind,
                local_kind,
                "{} came back as another",
                routed.kind()
            );
        }
    }

    enum CellOrOther {
        Cell(CellMsg),
        Driver(DriverMsg),
        Rider(RiderMsg),
        Trip(TripMsg),
    }

    /// A call's reply reaches the local message's own port; a reply of another kind is
    /// refused and the port dropped.
    #[tokio::test]
    async fn a_calls_reply_reaches_the_local_port_and_another_kind_is_refused() {
        let (tx, rx) = ractor::concurrency::oneshot();
        let Ok(Outgoing::Call(call, answer)) = Outgoing::cell(
            dispatch_engine::Grid::new(7).unwrap().cell_of(point()),
            CellMsg::Count(tx.into()),
        ) else {
            panic!("Count is a call");
        };
        assert_eq!(call.kind(), "cell_count");
        assert!(answer(Reply::Count(2, 3)));
        assert_eq!(rx.await.unwrap(), (2, 3));

        let (tx, rx) = ractor::concurrency::oneshot::<bool>();
        let offer = OfferView {
            trip_id: TripId::new("trp_1"),
            pickup: point(),
            dropoff: point(),
            product: Product::Economy,
            fare_cents: 1000,
            currency: "CAD".into(),
            pickup_distance_m: 10,
            pickup_eta_s: 60,
            expires_at_ms: 1,
            trace: None,
            queued_at: None,
        };
        let Ok(Outgoing::Call(call, answer)) = Outgoing::driver(
            DriverId::new("d"),
            DriverMsg::ReserveOffer(offer, tx.into()),
        ) else {
            panic!("ReserveOffer is a call");
        };
        let _ = json_round_trip(&call);
        assert!(
            !answer(Reply::Count(0, 0)),
            "a Count is no answer to ReserveOffer"
        );
        assert!(rx.await.is_err(), "the port is dropped");
    }

    /// Session plumbing and test hooks stay on their node: refused, never encoded.
    #[test]
    fn local_only_messages_are_refused() {
        let r = Outgoing::driver(DriverId::new("d"), DriverMsg::InjectPanic);
        assert!(matches!(r, Err(Failure::LocalOnly(k)) if k == "inject_panic"));
        let r = Outgoing::trip(TripId::new("t"), TripMsg::SearchAgain);
        assert!(matches!(r, Err(Failure::LocalOnly(k)) if k == "search_again"));
        let r = Outgoing::rider(RiderId::new("r"), RiderMsg::TicketExpired(1));
        assert!(matches!(r, Err(Failure::LocalOnly(k)) if k == "ticket_expired"));
    }

    /// A cell that is not an H3 index, or a frame with no sender, does not decode.
    #[test]
    fn bad_frames_do_not_decode() {
        assert!(serde_json::from_str::<WireCell>("12").is_err());
        let cell = dispatch_engine::Grid::new(7).unwrap().cell_of(point());
        assert_eq!(json_round_trip(&WireCell(cell)), WireCell(cell));
        let no_sender = br#"{"from":"","msg":{"Driver":["d","Reindex"]}}"#;
        assert!(matches!(
            decode::<Routed>(no_sender),
            Err(Failure::Malformed(_))
        ));
        let ok = br#"{"from":"n1","msg":{"Driver":["d","Reindex"]}}"#;
        assert!(decode::<Routed>(ok).is_ok());
    }
}
