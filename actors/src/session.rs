//! What actors send to a connected app, and how a command gets exactly one reply.
//!
//! A [`SessionHandle`] is the sending end of one WebSocket session's bounded outbound
//! queue. Everything an app sees about its own driver or rider passes through that
//! entity's actor, in order; a command's reply ([`Responder`]) travels with the update
//! it caused, so an app always sees the `trip_update` before the `ack` that confirms it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};

use dispatch_engine::{DriverStatus, TripId};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::views::{OfferView, Receipt, TripView};

/// WebSocket close code for a session replaced by a newer one for the same identity.
pub const CLOSE_REPLACED: u16 = 4001;
/// WebSocket close code for a policy violation (a client that keeps sending bad messages,
/// or that stops reading until its outbound queue is full).
pub const CLOSE_POLICY: u16 = 1008;
/// WebSocket close code for "going away" (the server shuts down).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// The close reason (with [`CLOSE_GOING_AWAY`]) of a session whose driver's or rider's
/// shard this node stopped serving (sharded mode, `System::end_shard`).
pub const SHARD_MOVED: &str = "this account moved to another node; reconnect";

/// A message for an app. The transport renders each as one JSON text frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outbound {
    DriverWelcome {
        driver_id: String,
        status: DriverStatus,
        offer: Option<OfferView>,
        trip: Option<TripView>,
    },
    RiderWelcome {
        rider_id: String,
        trip: Option<TripView>,
    },
    Offer(OfferView),
    OfferExpired {
        trip_id: TripId,
    },
    TripUpdate {
        req: Option<u64>,
        trip: TripView,
    },
    DriverLocation {
        trip_id: TripId,
        lat: f64,
        lng: f64,
        heading: Option<f64>,
        pickup_eta_s: Option<u64>,
    },
    Receipt(Receipt),
    Ack {
        req: u64,
    },
    Error {
        req: Option<u64>,
        error: ApiError,
    },
}

#[derive(Debug)]
struct CloseSignal {
    notify: Notify,
    code: AtomicU16,
    closed: AtomicBool,
    /// Why, when the closer said (else the transport names the code).
    reason: std::sync::OnceLock<&'static str>,
}

/// The actors' end of one session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: u64,
    tx: mpsc::Sender<Box<Outbound>>,
    close: Arc<CloseSignal>,
    metrics: Arc<Metrics>,
    /// The session's messages handed to actors and not yet answered (their responders
    /// still alive): what this client has put in actors' mailboxes.
    in_flight: Arc<AtomicUsize>,
}

/// One client message in flight: counted from its responder's creation to its drop
/// (answered, or dropped unanswered by a dying actor).
#[derive(Debug)]
struct InFlight {
    session: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    fn new(s: &SessionHandle) -> InFlight {
        s.in_flight.fetch_add(1, Ordering::AcqRel);
        s.metrics.client_in_flight.inc();
        InFlight {
            session: s.in_flight.clone(),
            metrics: s.metrics.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.session.fetch_sub(1, Ordering::AcqRel);
        self.metrics.client_in_flight.dec();
    }
}

/// The session's end: what the transport's writer task reads.
#[derive(Debug)]
pub struct SessionInbox {
    rx: mpsc::Receiver<Box<Outbound>>,
    close: Arc<CloseSignal>,
}

impl SessionInbox {
    /// The queue, and a watch that resolves once someone asked to close the session.
    pub fn into_parts(self) -> (mpsc::Receiver<Box<Outbound>>, CloseWatch) {
        (self.rx, CloseWatch(self.close))
    }
}

/// Resolves with the close code once someone asked to close the session.
#[derive(Debug, Clone)]
pub struct CloseWatch(Arc<CloseSignal>);

impl CloseWatch {
    pub async fn closed(&self) -> u16 {
        wait_closed(&self.0).await
    }

    /// The reason the closer gave, if any ([`SessionHandle::close_because`]).
    pub fn reason(&self) -> Option<&'static str> {
        self.0.reason.get().copied()
    }
}

async fn wait_closed(close: &CloseSignal) -> u16 {
    loop {
        let notified = close.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if close.closed.load(Ordering::Acquire) {
            return close.code.load(Ordering::Acquire);
        }
        notified.await;
    }
}

impl SessionHandle {
    /// A new session with an outbound queue of `capacity` messages. The queue holds boxes:
    /// a tokio channel allocates its first block of 32 slots when it is made, and 32
    /// `Outbound`s (560 bytes each) were 17.5 KiB of every connected client's memory.
    pub fn new(id: u64, capacity: usize, metrics: Arc<Metrics>) -> (SessionHandle, SessionInbox) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let close = Arc::new(CloseSignal {
            notify: Notify::new(),
            code: AtomicU16::new(0),
            closed: AtomicBool::new(false),
            reason: std::sync::OnceLock::new(),
        });
        (
            SessionHandle {
                id,
                tx,
                close: close.clone(),
                metrics,
                in_flight: Arc::new(AtomicUsize::new(0)),
            },
            SessionInbox { rx, close },
        )
    }

    /// Queues a message. A client that has stopped reading until its queue is full is
    /// disconnected (1008) rather than let the server's memory grow: returns false then.
    pub fn send(&self, msg: Outbound) -> bool {
        match self.tx.try_send(Box::new(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.bound_hit("ws_outbound_queue");
                self.close(CLOSE_POLICY);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn close(&self, code: u16) {
        if !self.close.closed.swap(true, Ordering::AcqRel) {
            self.close.code.store(code, Ordering::Release);
            self.close.notify.notify_waiters();
        }
    }

    /// Asks the session to close with `code` and `reason`; the first request wins.
    /// The reason is set only by the request that wins, so a session closed first for
    /// another cause (4001 replaced, 1008 policy) never goes with this reason.
    pub fn close_because(&self, code: u16, reason: &'static str) {
        if !self.close.closed.swap(true, Ordering::AcqRel) {
            let _ = self.close.reason.set(reason);
            self.close.code.store(code, Ordering::Release);
            self.close.notify.notify_waiters();
        }
    }

    /// Resolves with the close code once someone asked to close the session.
    pub async fn closed(&self) -> u16 {
        wait_closed(&self.close).await
    }

    /// The session's messages that actors hold and have not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Messages queued for the app and not yet taken by its writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.close.closed.load(Ordering::Acquire)
    }
}

/// The one reply owed for a client message. Dropping it unanswered sends `internal` to a
/// message that carried a `req`, so "exactly one reply" holds even if an actor dies.
#[derive(Debug)]
pub struct Responder {
    req: Option<u64>,
    session: Option<SessionHandle>,
    /// For callers that are not sessions (the admin console): the outcome, once.
    channel: Option<oneshot::Sender<Result<(), ApiError>>>,
    /// Counts the message in its session's in-flight messages until this is dropped.
    _in_flight: Option<InFlight>,
    /// When the message was handed on (request → offer's stages start here).
    received: std::time::Instant,
}

impl Responder {
    pub fn new(req: Option<u64>, session: SessionHandle) -> Self {
        Self {
            req,
            _in_flight: Some(InFlight::new(&session)),
            session: Some(session),
            channel: None,
            received: std::time::Instant::now(),
        }
    }

    /// A responder that answers nobody (for commands from timers, tests).
    pub fn none() -> Self {
        Self {
            req: None,
            session: None,
            channel: None,
            _in_flight: None,
            received: std::time::Instant::now(),
        }
    }

    /// A responder whose answer arrives on the returned receiver: `Ok` on success, the
    /// error on failure, and `internal` if it is dropped unanswered.
    pub fn channel() -> (Self, oneshot::Receiver<Result<(), ApiError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                req: None,
                session: None,
                channel: Some(tx),
                _in_flight: None,
                received: std::time::Instant::now(),
            },
            rx,
        )
    }

    /// When the message was handed on to the actors.
    pub fn received(&self) -> std::time::Instant {
        self.received
    }

    fn settle(&mut self, outcome: Result<(), ApiError>) {
        if let Some(tx) = self.channel.take() {
            let _ = tx.send(outcome);
        }
    }

    pub fn req(&self) -> Option<u64> {
        self.req
    }

    /// Success: `ack` when the message carried a `req`, else nothing.
    pub fn ack(mut self) {
        self.settle(Ok(()));
        if let (Some(req), Some(s)) = (self.req, self.session.take()) {
            s.send(Outbound::Ack { req });
        }
    }

    /// Success answered with a trip (`request_ride`): always sent, carrying the `req` if any.
    pub fn trip(mut self, trip: TripView) {
        self.settle(Ok(()));
        if let Some(s) = self.session.take() {
            s.send(Outbound::TripUpdate {
                req: self.req,
                trip,
            });
        }
    }

    /// Success or failure, as `outcome` says.
    pub fn answer(self, outcome: Result<(), ApiError>) {
        match outcome {
            Ok(()) => self.ack(),
            Err(e) => self.fail(e),
        }
    }

    /// Failure: always sent, carrying the `req` if any.
    pub fn fail(mut self, error: ApiError) {
        self.settle(Err(error.clone()));
        if let Some(s) = self.session.take() {
            s.metrics.rejected(error.code);
            s.send(Outbound::Error {
                req: self.req,
                error,
            });
        }
    }
}

/// Names one command awaiting its answer inside the driver or rider actor that took it
/// from its session and sent it on to a trip.
pub type Ticket = u64;

/// The commands an actor sent on and whose answers it awaits: their responders, by
/// ticket, with the trip each went to. A responder dropped here unanswered (its ticket
/// expired) answers `internal`; one whose trip actor failed is answered `unavailable`
/// at once ([`Awaiting::fail_trip`]).
#[derive(Debug, Default)]
pub struct Awaiting {
    responders: HashMap<Ticket, (TripId, Responder)>,
    last: Ticket,
}

impl Awaiting {
    /// Keeps `r`, a command sent to `trip`, until its ticket is answered, taken back or
    /// forgotten.
    pub fn keep(&mut self, trip: &TripId, r: Responder) -> Ticket {
        self.last += 1;
        self.responders.insert(self.last, (trip.clone(), r));
        self.last
    }

    /// The responder of `ticket`, to answer it otherwise.
    pub fn take(&mut self, ticket: Ticket) -> Option<Responder> {
        self.responders.remove(&ticket).map(|(_, r)| r)
    }

    /// Answers `ticket`, if it still awaits.
    pub fn answer(&mut self, ticket: Option<Ticket>, outcome: Result<(), ApiError>) {
        if let Some(r) = ticket.and_then(|t| self.take(t)) {
            r.answer(outcome);
        }
    }

    /// Fails every command still waiting on `trip` with `error`: the trip actor failed,
    /// and what was in its mailbox is gone (it answers nothing of it). Returns how many.
    pub fn fail_trip(&mut self, trip: &TripId, error: &ApiError) -> usize {
        let gone: Vec<Ticket> = self
            .responders
            .iter()
            .filter(|(_, (t, _))| t == trip)
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            if let Some(r) = self.take(*k) {
                r.fail(error.clone());
            }
        }
        gone.len()
    }
}

impl Drop for Responder {
    /// `internal`, except on a session closed because its account's shard moved
    /// ([`SHARD_MOVED`], sharded mode's `System::end_shard`): the actor holding the
    /// message was stopped with its shard, and the app retries on the shard's next owner,
    /// so it is answered `unavailable`.
    fn drop(&mut self) {
        let moved = (self.session.as_ref())
            .is_some_and(|s| s.close.reason.get().copied() == Some(SHARD_MOVED));
        let error = if moved {
            ApiError::unavailable(SHARD_MOVED)
        } else {
            ApiError::new(ErrorCode::Internal, "the request was lost; retry it")
        };
        self.settle(Err(error.clone()));
        if let (Some(req), Some(s)) = (self.req, self.session.take()) {
            s.metrics.rejected(error.code);
            s.send(Outbound::Error {
                req: Some(req),
                error,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_in_flight_from_its_responder_to_its_answer_or_its_drop() {
        let metrics = Arc::new(Metrics::new());
        let (h, _inbox) = SessionHandle::new(1, 8, metrics.clone());
        let a = Responder::new(Some(1), h.clone());
        let b = Responder::new(None, h.clone());
        let c = Responder::new(Some(3), h.clone());
        assert_eq!((h.in_flight(), metrics.client_in_flight.get()), (3, 3));
        a.ack();
        b.fail(ApiError::internal());
        assert_eq!((h.in_flight(), metrics.client_in_flight.get()), (1, 1));
        // Dropped unanswered (an actor died holding it): no longer in flight either.
        drop(c);
        assert_eq!((h.in_flight(), metrics.client_in_flight.get()), (0, 0));
        // Responders that answer no session are not a session's messages.
        let (d, _rx) = Responder::channel();
        let _e = Responder::none();
        assert_eq!(metrics.client_in_flight.get(), 0);
        d.ack();
    }
}
