//! Every actor's messages and start arguments, as plain data (and the odd pure mapping
//! between them, such as a driver command to its trip command): no actor behaviour, so that
//! the actors import this module and never each other.
//!
//! The messages a later multi-node version sends between nodes (cell queries, offers,
//! trip commands and their answers, notifications to sessions) carry only serializable
//! data (`serde`), with replies through ractor's [`RpcReplyPort`]. A command's answer
//! never crosses as a live handle: the driver or rider actor that took the command from
//! its session keeps the session's `Responder` under a [`Ticket`], the trip answers the
//! ticket in the update it sends to that actor, and so the app sees the update before
//! the `ack` that confirms it.

use std::collections::HashSet;
use std::sync::Arc;

use dispatch_engine::{
    Candidate, CellId, DriverFilter, DriverId, IndexedDriver, Point, Product, QuoteId, QuoteTerms,
    RiderId, Sender, TripCommand, TripId,
};
use ractor::{ActorCell, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::records::{DriverRecord, RiderRecord, TripRecord};
use crate::session::{Responder, SessionHandle};
use crate::tracecontext::Trace;
use crate::views::{OfferView, Receipt, TripView};

pub use crate::session::Ticket;

// ---------------------------------------------------------------------------------------
// Drivers.
// ---------------------------------------------------------------------------------------

pub struct DriverArgs {
    pub record: DriverRecord,
    /// Restarted by the supervisor from `record` after a failure.
    pub restarted: bool,
    /// Started by recovery (`System::recover`, `recover_shard`), whose one sweep sends
    /// the drivers still away offline after the grace period; any other start without a
    /// session arms the actor's own grace timer.
    pub recovered: bool,
}

/// What a driver's app asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DriverCommand {
    GoOnline,
    GoOffline,
    Location {
        position: Point,
        heading: Option<f64>,
    },
    Accept(TripId),
    Decline(TripId),
    Arrived(TripId),
    StartTrip(TripId),
    CompleteTrip(TripId),
    CancelTrip {
        trip_id: TripId,
        reason: Option<String>,
    },
}

impl DriverCommand {
    /// The trip and the trip command this is, sent by `driver_id`; `None` for the
    /// driver's own commands (status, location).
    pub fn for_trip(self, driver_id: DriverId) -> Option<(TripId, TripCommand)> {
        let d = driver_id;
        Some(match self {
            DriverCommand::Accept(t) => (t, TripCommand::Accept { driver_id: d }),
            DriverCommand::Decline(t) => (t, TripCommand::Decline { driver_id: d }),
            DriverCommand::Arrived(t) => (t, TripCommand::Arrived { driver_id: d }),
            DriverCommand::StartTrip(t) => (t, TripCommand::Start { driver_id: d }),
            DriverCommand::CompleteTrip(t) => (t, TripCommand::Complete { driver_id: d }),
            DriverCommand::CancelTrip { trip_id, reason } => {
                let cmd = TripCommand::DriverCancel {
                    driver_id: d,
                    reason,
                };
                (trip_id, cmd)
            }
            DriverCommand::GoOnline | DriverCommand::GoOffline | DriverCommand::Location { .. } => {
                return None;
            }
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DriverCommand::GoOnline => "go_online",
            DriverCommand::GoOffline => "go_offline",
            DriverCommand::Location { .. } => "location",
            DriverCommand::Accept(_) => "accept",
            DriverCommand::Decline(_) => "decline",
            DriverCommand::Arrived(_) => "arrived",
            DriverCommand::StartTrip(_) => "start_trip",
            DriverCommand::CompleteTrip(_) => "complete_trip",
            DriverCommand::CancelTrip { .. } => "cancel_trip",
        }
    }
}

/// How a trip update changes the driver's link to the trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TripLink {
    /// The driver's offer was accepted: it is now on the trip.
    Assigned,
    /// Another transition of the trip the driver is on.
    Update,
    /// The driver is off the trip (completed, cancelled, taken off); this is its last update.
    Released,
}

pub enum DriverMsg {
    /// A new session for this identity; replies once `welcome` is queued, so it is the
    /// session's first message.
    Attach(SessionHandle, RpcReplyPort<()>),
    Detach {
        session_id: u64,
    },
    GraceExpired {
        epoch: u64,
    },
    /// A command from the app; `Trace`: the session's span for it (an `accept` or
    /// `decline` of a traced offer), so the ride's trace goes on through this actor.
    Command(DriverCommand, Responder, Trace),
    /// From a trip: hold this offer if available (and connected). Replies whether it does.
    ReserveOffer(OfferView, RpcReplyPort<bool>),
    /// From a trip: the open offer ended; `notify` sends `offer_expired` to the app.
    OfferEnded {
        trip_id: TripId,
        notify: bool,
        answers: Option<Ticket>,
    },
    /// From a trip: a transition the driver must see. Boxed: a trip's view is the largest
    /// thing a driver is sent, and every driver actor's future holds one message.
    Trip {
        view: Box<TripView>,
        link: TripLink,
        answers: Option<Ticket>,
    },
    /// From a trip: the outcome of a command of this app's that no update answered,
    /// in order with the updates the trip sent before.
    Answer {
        ticket: Ticket,
        outcome: Result<(), ApiError>,
    },
    /// Nobody answered this ticket in time (the trip failed holding it).
    TicketExpired(Ticket),
    /// From the trip supervisor: this trip's actor failed, and what it held is gone;
    /// commands waiting on it are answered `unavailable` (retry) at once.
    TripFailed(TripId),
    /// The driver's cell restarted: index yourself again.
    Reindex,
    Get(RpcReplyPort<DriverRecord>),
    /// An operator suspends (`true`) or reinstates (`false`) the driver; replies once the
    /// change is durable, with the driver as it is then.
    Suspend(bool, RpcReplyPort<Result<DriverRecord, ApiError>>),
    /// Test hook: fail inside a handler, as a bug would.
    InjectPanic,
}

impl DriverMsg {
    /// The message's kind, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            DriverMsg::Attach(..) => "attach",
            DriverMsg::Detach { .. } => "detach",
            DriverMsg::GraceExpired { .. } => "grace_expired",
            DriverMsg::Command(c, ..) => c.kind(),
            DriverMsg::ReserveOffer(..) => "reserve_offer",
            DriverMsg::OfferEnded { .. } => "offer_ended",
            DriverMsg::Trip { .. } => "trip_update",
            DriverMsg::Answer { .. } => "answer",
            DriverMsg::TicketExpired(_) => "ticket_expired",
            DriverMsg::TripFailed(_) => "trip_failed",
            DriverMsg::Reindex => "reindex",
            DriverMsg::Get(_) => "get",
            DriverMsg::Suspend(..) => "suspend",
            DriverMsg::InjectPanic => "inject_panic",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Riders.
// ---------------------------------------------------------------------------------------

pub struct RiderArgs {
    pub record: RiderRecord,
    pub restarted: bool,
}

/// What the rider asks for: a quoted trip, or one priced now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RideRequest {
    Quote(QuoteId),
    Direct {
        pickup: Point,
        dropoff: Point,
        product: Product,
    },
}

/// What a rider's app asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RiderCommand {
    RequestRide(RideRequest),
    CancelRide {
        trip_id: TripId,
        reason: Option<String>,
    },
    Location(Point),
}

impl RiderCommand {
    pub fn kind(&self) -> &'static str {
        match self {
            RiderCommand::RequestRide(_) => "request_ride",
            RiderCommand::CancelRide { .. } => "cancel_ride",
            RiderCommand::Location(_) => "location",
        }
    }
}

pub enum RiderMsg {
    /// A new session for this identity; replies once `welcome` is queued, so it is the
    /// session's first message.
    Attach(SessionHandle, RpcReplyPort<()>),
    Detach {
        session_id: u64,
    },
    /// A command from the app; `Trace`: the session's span for a traced `request_ride`.
    Command(RiderCommand, Responder, Trace),
    /// From a new trip: it is durable; `ticket` is the request it answers (with the trip).
    TripStarted {
        view: TripView,
        ticket: Option<Ticket>,
    },
    /// From a trip that could not start: the rider is free again.
    TripNotStarted {
        trip_id: TripId,
        ticket: Option<Ticket>,
        error: ApiError,
    },
    /// From the trip: a transition. A final state frees the rider; `completed` comes
    /// with its receipt.
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
    /// From a trip: the outcome of a command that no update answered.
    Answer {
        ticket: Ticket,
        outcome: Result<(), ApiError>,
    },
    TicketExpired(Ticket),
    /// From the trip supervisor: as [`DriverMsg::TripFailed`].
    TripFailed(TripId),
    Get(RpcReplyPort<RiderRecord>),
    /// Test hook: fail inside a handler, as a bug would.
    InjectPanic,
}

impl RiderMsg {
    /// The message's kind, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            RiderMsg::Attach(..) => "attach",
            RiderMsg::Detach { .. } => "detach",
            RiderMsg::Command(c, ..) => c.kind(),
            RiderMsg::TripStarted { .. } => "trip_started",
            RiderMsg::TripNotStarted { .. } => "trip_not_started",
            RiderMsg::Trip { .. } => "trip_update",
            RiderMsg::DriverLocation { .. } => "driver_location",
            RiderMsg::Answer { .. } => "answer",
            RiderMsg::TicketExpired(_) => "ticket_expired",
            RiderMsg::TripFailed(_) => "trip_failed",
            RiderMsg::Get(_) => "get",
            RiderMsg::InjectPanic => "inject_panic",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Trips.
// ---------------------------------------------------------------------------------------

/// A rider's request, checked by the rider's actor: the trip actor creates the trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTrip {
    pub trip_id: TripId,
    pub rider_id: RiderId,
    pub product: Product,
    pub pickup: Point,
    pub dropoff: Point,
    pub terms: QuoteTerms,
    /// The quote it used (it buys one trip: deleted with the trip's creation).
    pub quote_id: Option<QuoteId>,
    /// The rider's `request_ride`, answered with the trip once it is durable.
    pub ticket: Option<Ticket>,
    /// The rider actor's span for the request: the trip's dispatch is its child.
    pub trace: Trace,
    /// The request's time so far, by stage (never on the wire).
    #[serde(skip)]
    pub stages: Option<Box<crate::stages::StageClock>>,
    /// A trip spawned on another node with a quote (sharded mode): the rider's node's
    /// fence of the rider's shard, which the trip's first write (the quote's delete, in
    /// the rider's shard) requires; `None` when the trip starts where the rider is.
    #[serde(default)]
    pub quote_fence: Option<WireFence>,
}

/// A fence on the wire: `(shard, epoch, holder)` of the node that sent a driver's command,
/// or that asked another node to spawn a rider's trip (docs/sharding.md §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFence {
    pub shard: u64,
    pub epoch: u64,
    pub holder: String,
}

impl From<dispatch_persistence::Fence> for WireFence {
    fn from(f: dispatch_persistence::Fence) -> Self {
        WireFence {
            shard: f.shard,
            epoch: f.epoch,
            holder: f.holder,
        }
    }
}

impl From<WireFence> for dispatch_persistence::Fence {
    fn from(f: WireFence) -> Self {
        dispatch_persistence::Fence {
            shard: f.shard,
            epoch: f.epoch,
            holder: f.holder,
        }
    }
}

pub enum TripArgs {
    /// A new trip: created, made durable and announced to the rider by its actor.
    New(NewTrip),
    /// A live trip from the store: recovered, or restarted after a failure.
    Resume { record: TripRecord, restarted: bool },
}

pub enum TripMsg {
    /// A command from a driver, a rider or a timer. A sender's `ticket` is answered in
    /// the update the trip sends that sender's actor (or in an `Answer`).
    Command {
        cmd: TripCommand,
        from: Sender,
        ticket: Option<Ticket>,
        /// The sender's span, when the command is a step of a traced ride (an accept).
        trace: Trace,
        /// A driver's command from another node: the fence of the driver's shard held by
        /// the sending node (docs/sharding.md §3), which an accept then requires.
        fence: Option<dispatch_persistence::Fence>,
    },
    /// An operator's command: replies once it is durable and everyone has been sent it.
    Admin {
        cmd: TripCommand,
        reply: RpcReplyPort<Result<(), ApiError>>,
    },
    DriverLocation {
        driver_id: DriverId,
        position: Point,
        heading: Option<f64>,
    },
    Get(RpcReplyPort<TripRecord>),
    /// Batched matching: a trip that found no driver free for its retry looks again, for
    /// the next window (the trip sends it to itself a window later).
    SearchAgain,
    /// Batched matching: a driver freed up near the trip, which waits for one; the trip
    /// was the nearest waiting trip and is the only one handed it (`Context::driver_freed`).
    DriverFreed(crate::waiting::Handed),
    /// Test hook: fail inside a handler, as a bug would.
    InjectPanic,
}

impl TripMsg {
    /// The message's kind, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            TripMsg::Command { cmd, .. } | TripMsg::Admin { cmd, .. } => cmd.kind(),
            TripMsg::DriverLocation { .. } => "driver_location",
            TripMsg::Get(_) => "get",
            TripMsg::SearchAgain => "search_again",
            TripMsg::DriverFreed(_) => "driver_freed",
            TripMsg::InjectPanic => "inject_panic",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cells.
// ---------------------------------------------------------------------------------------

pub struct CellArgs {
    pub cell: CellId,
    pub restarted: bool,
}

/// Which drivers a query wants.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SearchFilter {
    pub product: Option<Product>,
    pub available_only: bool,
    pub exclude: Excluded,
}

/// The drivers a search leaves out: a few shared sets (the drivers a trip tried, those a
/// batched-matching window assigned, ...), each looked up by hash. Adding a set shares it
/// (an `Arc`), never copies its ids, so a window's many searches cost no copies. On the
/// wire (between cluster nodes) it is the list of ids, as before.
#[derive(Debug, Clone, Default)]
pub struct Excluded(Vec<Arc<HashSet<DriverId>>>);

impl Excluded {
    /// One set of these drivers (none: nothing is left out).
    pub fn new(ids: impl IntoIterator<Item = DriverId>) -> Self {
        Self::default().and(&Arc::new(ids.into_iter().collect()))
    }

    /// These and also `more` (shared, not copied; an empty set adds nothing).
    pub fn and(&self, more: &Arc<HashSet<DriverId>>) -> Self {
        let mut sets = self.0.clone();
        if !more.is_empty() {
            sets.push(more.clone());
        }
        Self(sets)
    }

    pub fn contains(&self, d: &DriverId) -> bool {
        self.0.iter().any(|s| s.contains(d))
    }

    /// No driver is left out (every set held is non-empty).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every driver left out, once each.
    pub fn ids(&self) -> std::collections::BTreeSet<&DriverId> {
        self.0.iter().flat_map(|s| s.iter()).collect()
    }
}

impl PartialEq for Excluded {
    fn eq(&self, other: &Self) -> bool {
        self.ids() == other.ids()
    }
}

impl Serialize for Excluded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.ids())
    }
}

impl<'de> Deserialize<'de> for Excluded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<DriverId>::deserialize(d).map(Self::new)
    }
}

impl SearchFilter {
    pub fn matches(&self, d: &IndexedDriver) -> bool {
        self.quick(d.product, d.available) && !self.exclude.contains(&d.driver_id)
    }
}

impl DriverFilter for SearchFilter {
    fn quick(&self, product: Product, available: bool) -> bool {
        (!self.available_only || available) && self.product.is_none_or(|p| p == product)
    }
    /// Asked only after `quick` passed; the record is read only when some drivers are
    /// excluded (it is a cache miss per driver).
    fn keep(&mut self, d: &IndexedDriver) -> bool {
        self.exclude.is_empty() || !self.exclude.contains(&d.driver_id)
    }
}

pub enum CellMsg {
    /// Insert or move a driver; `ping` says it came from a location update.
    Upsert {
        driver: IndexedDriver,
        ping: bool,
    },
    Remove(DriverId),
    /// Sharded mode: take out every driver of these entity shards, which left a node this
    /// one had them on (`System::set_placement`): a killed node's drivers, whose actors
    /// no `end_shard` stopped, are not left here (their new owner's drivers index
    /// themselves again with their next ping). Never crosses nodes.
    Forget(std::sync::Arc<std::collections::HashSet<dispatch_engine::shard::ShardId>>),
    Query {
        pickup: Point,
        k: usize,
        max_radius_m: f64,
        filter: SearchFilter,
        /// The searching trip's span, when its dispatch is traced.
        trace: Trace,
        reply: RpcReplyPort<(Vec<Candidate>, usize)>,
    },
    /// (available, total) drivers in the cell.
    Count(RpcReplyPort<(usize, usize)>),
    /// Test hook: fail inside a handler, as a bug would.
    InjectPanic,
    /// Test hook: stop answering for this long, as a cell stuck on a slow host would.
    InjectStall(std::time::Duration),
}

impl CellMsg {
    /// The message's kind, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            CellMsg::Upsert { ping: true, .. } => "location",
            CellMsg::Upsert { ping: false, .. } => "upsert",
            CellMsg::Remove(_) => "remove",
            CellMsg::Forget(_) => "forget",
            CellMsg::Query { .. } => "query",
            CellMsg::Count(_) => "count",
            CellMsg::InjectPanic => "inject_panic",
            CellMsg::InjectStall(_) => "inject_stall",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Supervisors.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Driver,
    Rider,
    Trip,
    Cell,
}

impl Group {
    pub const ALL: [Group; 4] = [Group::Driver, Group::Rider, Group::Trip, Group::Cell];
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Driver => "driver",
            Group::Rider => "rider",
            Group::Trip => "trip",
            Group::Cell => "cell",
        }
    }
}

/// Which entity a child actor is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entity {
    Driver(DriverId),
    Rider(RiderId),
    /// A trip and its rider (told if the trip is lost before it was ever stored).
    Trip(TripId, RiderId),
    Cell(CellId),
}

/// What to start.
pub enum Spawn {
    Driver(DriverArgs),
    Rider(RiderArgs),
    Trip(TripArgs),
    Cell(CellArgs),
}

pub enum SupervisorMsg {
    Spawn(Spawn, RpcReplyPort<Result<ActorCell, String>>),
    /// An on-demand start of a driver or rider actor (an attach, a routed message or
    /// call): as `Spawn`, but sharded mode starts none for a shard not served here, and
    /// stops again one whose shard stopped being served as it started (`System::end_shard`
    /// racing it); both answer `Ok(None)`, counted
    /// `dispatch_shard_refused_total{cause="start_not_served"}`.
    SpawnServed(Spawn, RpcReplyPort<Result<Option<ActorCell>, String>>),
    /// Many spawns in one message (recovery); replies how many started.
    SpawnMany(Vec<Spawn>, RpcReplyPort<usize>),
    /// How many children are alive (for tests and stats).
    Count(RpcReplyPort<usize>),
    /// Read a failed trip back from the store (the `attempt`th time); see
    /// `Supervisor::reload`.
    Reload {
        trip: TripId,
        rider: RiderId,
        attempt: u32,
    },
    /// What that read found: the trip and its ledger entries, if it was ever stored.
    Reloaded {
        trip: TripId,
        rider: RiderId,
        attempt: u32,
        read: Result<Option<TripRecord>, String>,
    },
}

// ractor's `cluster` feature (issue 16) turns off its blanket `Message` impl: every message
// type says so itself. None of these crosses nodes (the default: not serializable).
impl ractor::Message for DriverMsg {}
impl ractor::Message for RiderMsg {}
impl ractor::Message for TripMsg {}
impl ractor::Message for CellMsg {}
impl ractor::Message for SupervisorMsg {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exclusions combine shared sets, and cross nodes as the plain list of ids they did
    /// before they were sets (so nodes of either build understand each other).
    #[test]
    fn excluded_drivers_combine_sets_and_travel_as_a_list() {
        let one = Arc::new(HashSet::from([DriverId::new("drv_1")]));
        let e = Excluded::new([DriverId::new("drv_2")])
            .and(&one)
            .and(&Arc::default());
        assert!(e.contains(&DriverId::new("drv_1")) && e.contains(&DriverId::new("drv_2")));
        assert!(!e.contains(&DriverId::new("drv_3")));
        assert!(Excluded::new([]).is_empty() && !e.is_empty());
        let wire = serde_json::to_string(&e).unwrap();
        assert_eq!(wire, r#"["drv_1","drv_2"]"#);
        let back: Excluded = serde_json::from_str(r#"["drv_2","drv_1"]"#).unwrap();
        assert_eq!(back, e);
    }

    /// What crosses nodes is data: it survives a round trip through a serializer.
    #[test]
    fn cross_node_payloads_are_plain_serializable_data() {
        fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(
            v: T,
        ) {
            let bytes = serde_json::to_vec(&v).expect("serializes");
            let back: T = serde_json::from_slice(&bytes).expect("deserializes");
            assert_eq!(back, v);
        }
        let p = Point::new(45.5, -73.6).unwrap();
        round_trip(DriverCommand::Location {
            position: p,
            heading: Some(90.0),
        });
        round_trip(RiderCommand::RequestRide(RideRequest::Direct {
            pickup: p,
            dropoff: p,
            product: Product::Xl,
        }));
        round_trip(TripCommand::Accept {
            driver_id: DriverId::new("drv_1"),
        });
        round_trip(Sender::Driver(DriverId::new("drv_1")));
        round_trip(TripLink::Released);
        round_trip(ApiError::conflict("the offer has expired"));
        let f = SearchFilter {
            product: Some(Product::Economy),
            available_only: true,
            exclude: Excluded::new([DriverId::new("drv_2")]),
        };
        let back: SearchFilter = serde_json::from_slice(&serde_json::to_vec(&f).unwrap()).unwrap();
        assert_eq!((back.product, back.exclude), (f.product, f.exclude));
    }
}
