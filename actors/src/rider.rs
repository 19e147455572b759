//! `RiderActor`: one per rider. Enforces one active trip per rider (the engine's
//! [`RiderState`]), turns a request into a trip actor, and relays the trip's updates,
//! driver positions and receipt to the rider's session, in order.

use dispatch_engine::{
    CancelledBy, Point, Product, QuoteTerms, RiderState, Sender, TripCommand, TripId,
    refuse_without_trip,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::context::{Context, TripHome, random_suffix};
use crate::error::{ApiError, ErrorCode};
use crate::messages::{
    Group, NewTrip, RideRequest, RiderArgs, RiderCommand, RiderMsg, Spawn, Ticket, TripArgs,
    TripMsg,
};
use crate::session::{Awaiting, CLOSE_REPLACED, Outbound, Responder};
use crate::tracecontext::{Trace, TraceContext};

/// How much longer than `actor_call_timeout_ms` a rider waits for another node's answer
/// to a trip's start (the call itself is bounded by that timeout).
const START_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

pub struct RiderActor {
    pub ctx: Context,
}

pub struct RiderActorState {
    rec: crate::records::RiderRecord,
    st: RiderState,
    /// Commands sent to trips, awaiting the trip's answer (see `messages::Ticket`).
    awaiting: Awaiting,
    /// The trip last asked of another node (sharded mode, docs/sharding.md §5), until it
    /// starts or is known not to have.
    remote: Option<RemoteStart>,
}

/// A trip started on another node: where it is, and the quote it used, kept out of this
/// node's quotes meanwhile (a quote buys one trip) and put back only if the trip is known
/// not to have started, so nothing was written.
struct RemoteStart {
    trip_id: TripId,
    pickup: Point,
    quote: Option<crate::views::Quote>,
}

impl RiderActor {
    fn commit(&self, s: &RiderActorState) {
        self.ctx
            .registry
            .rider_records
            .insert(s.rec.id.clone(), s.rec.clone());
    }

    fn send(&self, s: &RiderActorState, msg: Outbound) {
        if let Some(session) = &s.rec.session {
            session.send(msg);
        }
    }

    /// The terms of the ride: a live quote of this rider's, or a price made now.
    fn terms(
        &self,
        s: &RiderActorState,
        req: RideRequest,
    ) -> Result<(Point, Point, Product, QuoteTerms), ApiError> {
        let quote = match req {
            RideRequest::Quote(id) => {
                let q = self
                    .ctx
                    .registry
                    .quotes
                    .get(&id)
                    .map(|q| q.clone())
                    .ok_or_else(|| ApiError::not_found("quote"))?;
                if q.rider_id != s.rec.id {
                    return Err(ApiError::forbidden("the quote belongs to another rider"));
                }
                if self.ctx.clock.now_ms() >= q.expires_at_ms {
                    return Err(ApiError::new(
                        ErrorCode::QuoteExpired,
                        "the quote has expired; ask for a new one",
                    ));
                }
                q
            }
            RideRequest::Direct {
                pickup,
                dropoff,
                product,
            } => self.ctx.price(s.rec.id.clone(), pickup, dropoff, product),
        };
        let terms = QuoteTerms {
            fare_cents: quote.fare_cents,
            currency: quote.currency.clone(),
            surge: quote.surge,
            distance_m: quote.distance_m,
            duration_s: quote.duration_s,
        };
        Ok((quote.pickup, quote.dropoff, quote.product, terms))
    }

    /// Keeps `responder` until `trip` answers `ticket` (or it expires).
    fn await_answer(
        &self,
        myself: &ActorRef<RiderMsg>,
        s: &mut RiderActorState,
        trip: &TripId,
        responder: Responder,
    ) -> Ticket {
        let ticket = s.awaiting.keep(trip, responder);
        let after = self.ctx.config.ticket_timeout();
        myself.send_after(after, move || RiderMsg::TicketExpired(ticket));
        ticket
    }

    /// The rider's rules (one active trip, its own live quote), then a trip actor is
    /// asked to start the trip; it answers the request with the trip once it is durable.
    async fn request(
        &self,
        myself: &ActorRef<RiderMsg>,
        s: &mut RiderActorState,
        req: RideRequest,
        responder: Responder,
        trace: Trace,
    ) {
        if let Some(active) = s.st.active_trip() {
            // A trip whose actor failed is being read back: whether it was ever stored
            // (and so is still the rider's) is not known yet.
            if self.ctx.registry.reloading.contains(active) {
                return responder.fail(crate::error::trip_reloading());
            }
            return responder.fail(ApiError::conflict(format!(
                "the rider already has an active trip {active}"
            )));
        }
        let mut stages = crate::stages::StageClock::new(responder.received());
        stages.mark(crate::stages::Stage::RiderQueue);
        let quote_id = match &req {
            RideRequest::Quote(id) => Some(id.clone()),
            RideRequest::Direct { .. } => None,
        };
        let (pickup, dropoff, product, terms) = match self.terms(s, req) {
            Ok(t) => t,
            Err(e) => return responder.fail(e),
        };
        let trip_id = TripId::with_suffix(&random_suffix());
        if s.st.begin(trip_id.clone()).is_err() {
            self.ctx
                .metrics
                .invariant("rider_two_trips", s.rec.id.as_str());
        }
        let home = self.ctx.trip_home(pickup);
        if let TripHome::Nobody = home {
            s.st.end(&trip_id);
            self.ctx.metrics.shard_refused("no_owner");
            return responder.fail(ApiError::unavailable(
                "no node serves the pickup's area now; retry",
            ));
        }
        let ticket = self.await_answer(myself, s, &trip_id, responder);
        let new = NewTrip {
            trip_id: trip_id.clone(),
            rider_id: s.rec.id.clone(),
            product,
            pickup,
            dropoff,
            terms,
            quote_id,
            ticket: Some(ticket),
            trace,
            stages: {
                stages.mark(crate::stages::Stage::Rider);
                Some(Box::new(stages))
            },
            quote_fence: None,
        };
        let owned = matches!(home, TripHome::Owned);
        if let TripHome::There(node, link) = home {
            return self.start_there(s, new, (&node, link.as_ref())).await;
        }
        // Boxed: the spawn carries the new trip, and an unboxed future would make every
        // rider actor's task that large for its whole life. As the pickup shard's owner,
        // only while it is served here (not while `end_shard` ends it).
        let spawn = Spawn::Trip(TripArgs::New(new));
        let started = if owned {
            Box::pin(self.ctx.spawn_served(Group::Trip, spawn))
                .await
                .and_then(|c| c.map(drop).ok_or_else(crate::error::pickup_not_served))
        } else {
            Box::pin(self.ctx.spawn(Group::Trip, spawn)).await.map(drop)
        };
        if let Err(e) = started {
            tracing::error!(trip_id = %trip_id, error = %e, "could not start the trip actor");
            s.st.end(&trip_id);
            s.awaiting.answer(Some(ticket), Err(e));
        }
    }

    /// Starts the trip on the node that holds its pickup's shard (docs/sharding.md §5):
    /// one call to that node's router, bounded by `actor_call_timeout_ms`. A request with
    /// a quote carries this node's fence of the rider's shard, which the trip's first
    /// write (the trip and the quote's delete, together) requires. Refused, or no answer:
    /// the rider is answered and free to ask again; started: the trip's `TripStarted`
    /// (or its failed first write) comes back through the router under the ticket.
    async fn start_there(
        &self,
        s: &mut RiderActorState,
        mut new: NewTrip,
        (node, link): (&str, &dyn crate::placement::Link),
    ) {
        let (trip_id, ticket) = (new.trip_id.clone(), new.ticket);
        let refuse = |s: &mut RiderActorState, e: ApiError| {
            s.st.end(&trip_id);
            s.awaiting.answer(ticket, Err(e));
        };
        if new.quote_id.is_some() {
            match self.ctx.own_fence(self.ctx.shard_of_rider(&s.rec.id)) {
                Some(f) => new.quote_fence = Some(f.into()),
                None => {
                    self.ctx.metrics.shard_refused("quote_unfenced");
                    let e =
                        ApiError::unavailable("this node holds no lease on the rider now; retry");
                    return refuse(s, e);
                }
            }
        }
        let quote = new
            .quote_id
            .as_ref()
            .and_then(|q| self.ctx.registry.quotes.remove(q))
            .map(|(_, q)| q);
        s.remote = Some(RemoteStart {
            trip_id: trip_id.clone(),
            pickup: new.pickup,
            quote,
        });
        let (tx, rx) = ractor::concurrency::oneshot();
        let wait = self.ctx.call_timeout() + START_MARGIN;
        let answer = if link.spawn_trip(node, new, tx.into()) {
            tokio::time::timeout(wait, rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        match answer {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                // Refused before anything was written: the quote is the rider's again.
                self.restore_quote(s, &trip_id);
                tracing::warn!(trip_id = %trip_id, node, error = %e, "the pickup's node refused the trip");
                refuse(s, e)
            }
            // Whether it started is not known: the quote stays out of use (a
            // `TripNotStarted` gives it back; a late `TripStarted` makes the trip the
            // rider's after all).
            None => refuse(
                s,
                ApiError::unavailable("the pickup's node did not answer; retry"),
            ),
        }
    }

    /// The quote a trip asked of another node used is the rider's again (that trip is
    /// known not to have started).
    fn restore_quote(&self, s: &mut RiderActorState, trip_id: &TripId) {
        if s.remote.as_ref().is_some_and(|r| &r.trip_id == trip_id)
            && let Some(q) = s.remote.take().and_then(|r| r.quote)
        {
            self.ctx.registry.quotes.insert(q.quote_id.clone(), q);
        }
    }

    /// The node of this rider's trip `trip_id` when that trip's pickup shard is on
    /// another node (sharded mode with a placement): from its last view, or from the
    /// request that started it there.
    fn trip_node<'a>(
        &'a self,
        s: &RiderActorState,
        trip_id: &TripId,
    ) -> Option<(
        std::sync::Arc<str>,
        &'a std::sync::Arc<dyn crate::placement::Link>,
    )> {
        let viewed = s.rec.trip.as_ref().filter(|t| &t.trip_id == trip_id);
        let pickup = match viewed {
            Some(t) => t.pickup,
            None => s.remote.as_ref().filter(|r| &r.trip_id == trip_id)?.pickup,
        };
        self.ctx.remote_of(self.ctx.shard_of_pickup(pickup))
    }

    async fn cancel(
        &self,
        myself: &ActorRef<RiderMsg>,
        s: &mut RiderActorState,
        trip_id: TripId,
        reason: Option<String>,
        responder: Responder,
    ) {
        let cmd = TripCommand::Cancel {
            by: CancelledBy::Rider,
            reason,
        };
        let mine = s.st.active_trip() == Some(&trip_id);
        // Its trip runs here, or on another node (its pickup's shard is there): then the
        // command crosses through that node's router, and the trip's answer comes back
        // under the ticket.
        let here = self.ctx.registry.trip(&trip_id).filter(|_| mine);
        let route = match here {
            Some(t) => Ok(t),
            None => match self.trip_node(s, &trip_id).filter(|_| mine) {
                Some(there) => Err(there),
                None => return self.refuse(s, trip_id, cmd, responder).await,
            },
        };
        let ticket = self.await_answer(myself, s, &trip_id, responder);
        let msg = TripMsg::Command {
            cmd,
            from: Sender::Rider,
            ticket: Some(ticket),
            trace: None,
            fence: None,
        };
        match route {
            // The trip actor may have stopped between the lookup and the cast.
            Ok(t) => {
                if let Err(ractor::MessagingErr::SendErr(TripMsg::Command { cmd, .. })) =
                    t.cast(msg)
                    && let Some(r) = s.awaiting.take(ticket)
                {
                    self.refuse(s, trip_id, cmd, r).await;
                }
            }
            Err((node, link)) => {
                if !link.trip(&node, trip_id, msg)
                    && let Some(r) = s.awaiting.take(ticket)
                {
                    r.fail(ApiError::unavailable(
                        "the trip's node is not reachable; retry",
                    ));
                }
            }
        }
    }

    /// No live trip takes the command: the engine's rule for ended trips answers.
    async fn refuse(
        &self,
        s: &RiderActorState,
        trip_id: TripId,
        cmd: TripCommand,
        responder: Responder,
    ) {
        match self.ctx.stored_trip(&trip_id).await {
            Err(e) => responder.fail(e),
            Ok(t) => {
                let t = t.map(|t| t.trip);
                let e = refuse_without_trip(t.as_ref(), &Sender::Rider, Some(&s.rec.id), &cmd);
                responder.fail(e.into())
            }
        }
    }
}

impl Actor for RiderActor {
    type Msg = RiderMsg;
    type State = RiderActorState;
    type Arguments = RiderArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RiderMsg>,
        args: RiderArgs,
    ) -> Result<RiderActorState, ActorProcessingErr> {
        let active = args
            .record
            .trip
            .as_ref()
            .filter(|t| !t.state.is_final())
            .map(|t| t.trip_id.clone());
        if args.restarted {
            tracing::warn!(rider_id = %args.record.id, "rider actor restarted");
        }
        Ok(RiderActorState {
            st: RiderState::new(active),
            rec: args.record,
            awaiting: Awaiting::default(),
            remote: None,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RiderMsg>,
        msg: RiderMsg,
        s: &mut RiderActorState,
    ) -> Result<(), ActorProcessingErr> {
        let span = tracing::info_span!("rider", rider_id = %s.rec.id);
        let kind = msg.kind();
        // Boxed once per message, so the future ractor keeps for the actor's life is
        // small (see the driver actor's `handle`).
        let work = Box::pin(self.handle_msg(_myself, msg, s));
        self.ctx
            .metrics
            .handle_in("rider", kind, span, || work)
            .await
    }
}

impl RiderActor {
    /// One message: what `Actor::handle` does, timed and counted by the caller.
    async fn handle_msg(
        &self,
        myself: ActorRef<RiderMsg>,
        msg: RiderMsg,
        s: &mut RiderActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RiderMsg::Attach(session, reply) => {
                if let Some(old) = s.rec.session.replace(session)
                    && s.rec.session.as_ref().is_some_and(|n| n.id != old.id)
                {
                    old.close(CLOSE_REPLACED);
                }
                self.commit(s);
                self.send(
                    s,
                    Outbound::RiderWelcome {
                        rider_id: s.rec.id.to_string(),
                        trip: s.rec.trip.clone(),
                    },
                );
                let _ = reply.send(());
            }
            RiderMsg::Detach { session_id } => {
                if s.rec.session.as_ref().is_some_and(|h| h.id == session_id) {
                    s.rec.session = None;
                    self.commit(s);
                }
            }
            RiderMsg::Command(RiderCommand::RequestRide(req), responder, trace) => {
                let span = crate::traced_span!(trace, "rider.request_ride", rider_id = %s.rec.id);
                let trace = TraceContext::of(&span);
                self.request(&myself, s, req, responder, trace)
                    .instrument(span)
                    .await
            }
            RiderMsg::Command(RiderCommand::CancelRide { trip_id, reason }, responder, _) => {
                self.cancel(&myself, s, trip_id, reason, responder).await
            }
            RiderMsg::TripStarted { view, ticket } => {
                if s.st.active_trip() != Some(&view.trip_id)
                    && s.st.begin(view.trip_id.clone()).is_err()
                {
                    self.ctx
                        .metrics
                        .invariant("rider_two_trips", s.rec.id.as_str());
                }
                // A trip started on another node used its quote for good.
                if s.remote.as_ref().is_some_and(|r| r.trip_id == view.trip_id) {
                    s.remote = None;
                }
                s.rec.trip = Some(view.clone());
                self.commit(s);
                match ticket.and_then(|t| s.awaiting.take(t)) {
                    Some(r) => r.trip(view),
                    None => self.send(
                        s,
                        Outbound::TripUpdate {
                            req: None,
                            trip: view,
                        },
                    ),
                }
            }
            RiderMsg::TripNotStarted {
                trip_id,
                ticket,
                error,
            } => {
                s.st.end(&trip_id);
                self.restore_quote(s, &trip_id);
                s.awaiting.answer(ticket, Err(error));
            }
            RiderMsg::Answer { ticket, outcome } => s.awaiting.answer(Some(ticket), outcome),
            // Dropped unanswered: the app is told the request was lost.
            RiderMsg::TicketExpired(ticket) => drop(s.awaiting.take(ticket)),
            RiderMsg::TripFailed(trip_id) => {
                s.awaiting
                    .fail_trip(&trip_id, &crate::error::trip_stopped());
            }
            RiderMsg::Command(RiderCommand::Location(p), responder, _) => {
                s.rec.position = Some(p);
                // Only the position changed: update it in place rather than recommit.
                if let Some(mut r) = self.ctx.registry.rider_records.get_mut(&s.rec.id) {
                    r.position = Some(p);
                }
                responder.ack();
            }
            RiderMsg::Trip {
                view,
                receipt,
                answers,
            } => {
                if s.rec
                    .trip
                    .as_ref()
                    .is_some_and(|t| t.trip_id == view.trip_id && t.version >= view.version)
                {
                    // Not newer than what the app has (a restarted trip re-syncing).
                    s.awaiting.answer(answers, Ok(()));
                    return Ok(());
                }
                if view.state.is_final() {
                    s.st.end(&view.trip_id);
                    s.rec.trip = None;
                } else {
                    s.rec.trip = Some(view.clone());
                }
                self.commit(s);
                self.send(
                    s,
                    Outbound::TripUpdate {
                        req: None,
                        trip: view,
                    },
                );
                if let Some(r) = receipt {
                    self.send(s, Outbound::Receipt(r));
                }
                s.awaiting.answer(answers, Ok(()));
            }
            RiderMsg::DriverLocation {
                trip_id,
                position,
                heading,
                pickup_eta_s,
            } => {
                if s.st.active_trip() == Some(&trip_id) {
                    self.send(
                        s,
                        Outbound::DriverLocation {
                            trip_id,
                            lat: position.lat(),
                            lng: position.lng(),
                            heading,
                            pickup_eta_s,
                        },
                    );
                }
            }
            RiderMsg::Get(reply) => {
                let _ = reply.send(s.rec.clone());
            }
            RiderMsg::InjectPanic => panic!("injected fault in rider {}", s.rec.id),
        }
        Ok(())
    }
}
