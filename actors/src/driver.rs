//! `DriverActor`: one per driver. Owns the driver's status (the engine's [`DriverState`]
//! rules), its position and cell, its open offer and current trip, and its session.
//! Every message the driver's app receives passes through here, in order.

use std::time::Duration;

use dispatch_engine::{
    CellId, DriverState, DriverStatus, IndexedDriver, Point, Sender, TripCommand, TripId,
    refuse_without_trip,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::context::Context;
use crate::error::ApiError;
use crate::messages::{CellMsg, DriverArgs, DriverCommand, DriverMsg, TripLink, TripMsg};
use crate::records::DriverRecord;
use crate::session::{Awaiting, CLOSE_REPLACED, Outbound, Responder};
use crate::tracecontext::{Trace, TraceContext};
use crate::views::TripView;
use dispatch_persistence::Batch;

pub struct DriverActor {
    pub ctx: Context,
}

pub struct DriverActorState {
    rec: DriverRecord,
    st: DriverState,
    /// The grace period ran out while the driver was busy: go offline once free.
    offline_when_free: bool,
    /// Started by recovery, whose one sweep ends the grace period of the drivers it
    /// started (see `System::recover`); every other start arms its own timer.
    recovered: bool,
    /// Commands sent to trips, awaiting the trip's answer (see `messages::Ticket`).
    awaiting: Awaiting,
}

impl DriverActor {
    /// Keeps the restartable state in the registry (what a restarted actor, or a
    /// restarted cell asking its drivers back, starts from), without writing the store.
    fn remember(&self, s: &mut DriverActorState) {
        s.rec.status = s.st.status().clone();
        self.ctx
            .registry
            .driver_records
            .insert(s.rec.id.clone(), s.rec.clone());
    }

    /// Commits the restartable state, and queues it for the store. Statuses that come
    /// from a trip need not wait for the disk: recovery derives them from the trips,
    /// which are durable before anyone is told.
    fn commit(&self, s: &mut DriverActorState) {
        self.remember(s);
        let shard = self.ctx.shard_of_driver(&s.rec.id);
        if let Err(e) = self
            .ctx
            .store
            .write(Batch::in_shard(shard).driver(s.rec.stored()))
        {
            tracing::error!(driver_id = %s.rec.id, error = %e, "driver write failed");
        }
    }

    /// Applies a status change the driver asked for and acknowledges it once durable;
    /// if it cannot be stored, puts the status back and answers `unavailable`.
    async fn change_status(
        &self,
        s: &mut DriverActorState,
        change: impl FnOnce(&mut DriverState) -> Result<(), dispatch_engine::DriverError>,
        responder: Responder,
    ) {
        let before = s.st.clone();
        if let Err(e) = change(&mut s.st) {
            return responder.fail(e.into());
        }
        s.offline_when_free = false;
        responder.answer(self.store_status(s, before, "driver status").await);
    }

    /// Indexes and commits the status just changed, and waits until it is on disk; if it
    /// cannot be stored, puts `before` back and answers `unavailable`.
    async fn store_status(
        &self,
        s: &mut DriverActorState,
        before: DriverState,
        what: &'static str,
    ) -> Result<(), ApiError> {
        self.reindex(s, false).await;
        self.commit(s);
        if let Err(e) = self.ctx.store.sync().await {
            tracing::error!(driver_id = %s.rec.id, error = %e, "{what} not stored");
            s.st = before;
            self.reindex(s, false).await;
            self.commit(s);
            return Err(ApiError::unavailable(
                "the change could not be stored; retry",
            ));
        }
        Ok(())
    }

    fn send(&self, s: &DriverActorState, msg: Outbound) {
        if let Some(session) = &s.rec.session {
            session.send(msg);
        }
    }

    fn indexed(&self, s: &DriverActorState, position: Point) -> IndexedDriver {
        IndexedDriver {
            driver_id: s.rec.id.clone(),
            position,
            heading: s.rec.heading,
            product: s.rec.profile.vehicle.product,
            available: *s.st.status() == DriverStatus::Available,
        }
    }

    /// Puts the driver into its current cell's index (or takes it out), moving it between
    /// cells when it crossed a border. Returns whether the cell changed.
    async fn reindex(&self, s: &mut DriverActorState, ping: bool) -> bool {
        let Some(pos) = s.rec.position else {
            return false;
        };
        let want: Option<CellId> =
            s.st.status()
                .is_indexed()
                .then(|| self.ctx.config.grid.cell_of(pos));
        let old = s.rec.cell;
        // A cell of a shard on another node is told through that node's router (§5).
        if old != want
            && let Some(old) = old
        {
            self.ctx.unindex_driver(&s.rec.id, old);
        }
        if let Some(cell) = want
            && let Some((node, link)) = self.ctx.remote_of_cell(cell)
        {
            let upsert = CellMsg::Upsert {
                driver: self.indexed(s, pos),
                ping,
            };
            link.cell(&node, cell, upsert, None);
        } else if let Some(cell) = want {
            match self.ctx.cell_actor(cell).await {
                Some(a) => {
                    let _ = a.cast(CellMsg::Upsert {
                        driver: self.indexed(s, pos),
                        ping,
                    });
                }
                None => self.ctx.metrics.bound_hit("cell_spawn_failed"),
            }
        }
        s.rec.cell = want;
        old != want
    }

    fn welcome(&self, s: &DriverActorState) -> Outbound {
        Outbound::DriverWelcome {
            driver_id: s.rec.id.to_string(),
            status: s.st.status().clone(),
            offer: s.rec.offer.as_deref().cloned(),
            trip: s.rec.trip.as_deref().cloned(),
        }
    }

    async fn go_offline_if_idle(&self, s: &mut DriverActorState) {
        if s.rec.session.is_none()
            && s.offline_when_free
            && *s.st.status() == DriverStatus::Available
        {
            let _ = s.st.go_offline();
            s.offline_when_free = false;
            self.reindex(s, false).await;
            tracing::info!(driver_id = %s.rec.id, "grace period over; driver offline");
        }
    }

    async fn command(
        &self,
        myself: &ActorRef<DriverMsg>,
        s: &mut DriverActorState,
        cmd: DriverCommand,
        responder: Responder,
        trace: Trace,
    ) {
        let trip_cmd = match cmd {
            DriverCommand::GoOnline => {
                return self
                    .change_status(s, DriverState::go_online, responder)
                    .await;
            }
            DriverCommand::GoOffline => {
                return self
                    .change_status(s, DriverState::go_offline, responder)
                    .await;
            }
            DriverCommand::Location { position, heading } => {
                return self.location(s, position, heading, responder).await;
            }
            trip_cmd => trip_cmd.for_trip(s.rec.id.clone()),
        };
        let Some((trip_id, cmd)) = trip_cmd else {
            return responder.fail(ApiError::internal()); // every other command is a trip's
        };
        self.to_trip(myself, s, trip_id, cmd, responder, trace)
            .await;
    }

    /// A location ping: the hot path, kept apart so that its future stays small.
    async fn location(
        &self,
        s: &mut DriverActorState,
        position: Point,
        heading: Option<f64>,
        responder: Responder,
    ) {
        s.rec.position = Some(position);
        if heading.is_some() {
            s.rec.heading = heading;
        }
        self.ctx.driver_moved(&s.rec.id, position, s.rec.heading);
        // A new cell is worth remembering across an actor's restart; the store does
        // not keep cells (recovery indexes a driver from its position), and its
        // position reaches the store with the next snapshot. Writing the whole
        // record at every cell crossing was a store write and an fsync each.
        if self.reindex(s, true).await {
            self.remember(s);
        }
        if let DriverStatus::OnTrip(trip_id) = s.st.status() {
            let msg = TripMsg::DriverLocation {
                driver_id: s.rec.id.clone(),
                position,
                heading: s.rec.heading,
            };
            if let Some(t) = self.ctx.registry.trip(trip_id) {
                let _ = t.cast(msg);
            } else if let Some((node, link)) = self.trip_node(s, trip_id) {
                link.trip(&node, trip_id.clone(), msg);
            }
        }
        responder.ack();
    }

    /// The trip decides; its answer comes back with the update it causes (under a
    /// ticket). With no live trip to ask, the engine's rule for ended trips answers.
    async fn to_trip(
        &self,
        myself: &ActorRef<DriverMsg>,
        s: &mut DriverActorState,
        trip_id: TripId,
        cmd: TripCommand,
        responder: Responder,
        trace: Trace,
    ) {
        let from = Sender::Driver(s.rec.id.clone());
        // A trip on another node (its pickup's shard is there): the command crosses with
        // this node's fence of the driver's shard, which its accept then requires
        // (docs/sharding.md §3). A trip that is not there is answered `TripFailed`.
        if self.ctx.registry.trip(&trip_id).is_none()
            && let Some((node, link)) = self.trip_node(s, &trip_id)
        {
            let ticket = s.awaiting.keep(&trip_id, responder);
            let msg = TripMsg::Command {
                cmd,
                from,
                ticket: Some(ticket),
                trace,
                fence: self.ctx.own_fence(self.ctx.shard_of_driver(&s.rec.id)),
            };
            if link.trip(&node, trip_id.clone(), msg) {
                let after = self.ctx.config.ticket_timeout();
                myself.send_after(after, move || DriverMsg::TicketExpired(ticket));
            } else if let Some(r) = s.awaiting.take(ticket) {
                r.fail(ApiError::unavailable(
                    "the trip's node is not reachable; retry",
                ));
            }
            return;
        }
        if let Some(t) = self.ctx.registry.trip(&trip_id) {
            let ticket = s.awaiting.keep(&trip_id, responder);
            let msg = TripMsg::Command {
                cmd,
                from: from.clone(),
                ticket: Some(ticket),
                trace,
                fence: None,
            };
            match t.cast(msg) {
                Ok(()) => {
                    let after = self.ctx.config.ticket_timeout();
                    myself.send_after(after, move || DriverMsg::TicketExpired(ticket));
                }
                // The trip actor stopped between the lookup and the cast.
                Err(ractor::MessagingErr::SendErr(TripMsg::Command { cmd, .. })) => {
                    if let Some(r) = s.awaiting.take(ticket) {
                        self.refuse(trip_id, &from, cmd, r).await;
                    }
                }
                Err(_) => {}
            }
            return;
        }
        self.refuse(trip_id, &from, cmd, responder).await
    }

    /// The node of a trip this driver knows (its offer's or its trip's pickup) when that
    /// trip's shard is on another node.
    fn trip_node<'a>(
        &'a self,
        s: &DriverActorState,
        trip_id: &TripId,
    ) -> Option<(
        std::sync::Arc<str>,
        &'a std::sync::Arc<dyn crate::placement::Link>,
    )> {
        let offered = s.rec.offer.as_ref().filter(|o| &o.trip_id == trip_id);
        let pickup = match offered {
            Some(o) => o.pickup,
            None => {
                s.rec
                    .trip
                    .as_ref()
                    .filter(|t| &t.trip_id == trip_id)?
                    .pickup
            }
        };
        self.ctx.remote_of(self.ctx.shard_of_pickup(pickup))
    }

    /// No live trip takes the command: the engine's rule for ended trips answers.
    async fn refuse(&self, trip_id: TripId, from: &Sender, cmd: TripCommand, r: Responder) {
        match self.ctx.stored_trip(&trip_id).await {
            Err(e) => r.fail(e),
            Ok(t) => {
                let t = t.map(|t| t.trip);
                r.fail(refuse_without_trip(t.as_ref(), from, None, &cmd).into())
            }
        }
    }

    /// An operator's suspension (or its end). A driver that is offered or on a trip is
    /// refused (`conflict`): nobody is left mid-trip. Durable before it answers; the app
    /// is sent a fresh `welcome` showing the new status.
    async fn suspend(
        &self,
        s: &mut DriverActorState,
        suspend: bool,
    ) -> Result<DriverRecord, ApiError> {
        let before = s.st.clone();
        if suspend {
            s.st.suspend().map_err(|e| {
                ApiError::conflict(format!("{e}; cancel its trip first or wait until it ends"))
            })?;
        } else {
            s.st.unsuspend();
        }
        if s.st != before {
            s.offline_when_free = false;
            if suspend && let Some(offer) = s.rec.offer.take() {
                // Cannot happen (an offered driver is refused above); keep the record true.
                self.ctx.metrics.invariant(
                    "suspend_offered",
                    &format!("{} {}", s.rec.id, offer.trip_id),
                );
            }
            self.store_status(s, before, "suspension").await?;
            tracing::info!(driver_id = %s.rec.id, status = s.st.status().as_str(), "driver suspension changed by an operator");
            self.send(s, self.welcome(s));
        }
        let mut rec = s.rec.clone();
        rec.status = s.st.status().clone();
        Ok(rec)
    }

    /// Brings the driver's status in line with a trip's word on it.
    fn follow_trip(&self, s: &mut DriverActorState, view: &TripView, link: TripLink) {
        let id = &view.trip_id;
        match link {
            TripLink::Assigned => {
                if s.st.status() != &DriverStatus::OnTrip(id.clone())
                    && let Err(e) = s.st.assign(id)
                {
                    self.ctx
                        .metrics
                        .invariant("driver_assign", &format!("{} on {id}: {e}", s.rec.id));
                    s.st = DriverState::new(DriverStatus::OnTrip(id.clone()));
                }
                s.rec.offer = None;
                s.rec.trip = Some(Box::new(view.clone()));
            }
            TripLink::Update => {
                if s.rec.trip.as_ref().is_none_or(|t| &t.trip_id == id) {
                    s.rec.trip = Some(Box::new(view.clone()));
                }
            }
            TripLink::Released => {
                if s.st.status() == &DriverStatus::OnTrip(id.clone()) {
                    let _ = s.st.release(id);
                }
                if s.rec.trip.as_ref().is_some_and(|t| &t.trip_id == id) {
                    s.rec.trip = None;
                }
            }
        }
    }
}

impl Actor for DriverActor {
    type Msg = DriverMsg;
    type State = DriverActorState;
    type Arguments = DriverArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DriverMsg>,
        args: DriverArgs,
    ) -> Result<DriverActorState, ActorProcessingErr> {
        let st = DriverState::new(args.record.status.clone());
        if args.restarted {
            tracing::warn!(driver_id = %args.record.id, status = st.status().as_str(), "driver actor restarted");
        }
        Ok(DriverActorState {
            rec: args.record,
            st,
            offline_when_free: false,
            recovered: args.recovered,
            awaiting: Awaiting::default(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<DriverMsg>,
        s: &mut DriverActorState,
    ) -> Result<(), ActorProcessingErr> {
        // Recovered or restarted: be findable again where the driver last was.
        if s.st.status().is_indexed() && s.rec.position.is_some() {
            self.reindex(s, false).await;
            if let Some(mut r) = self.ctx.registry.driver_records.get_mut(&s.rec.id) {
                r.cell = s.rec.cell;
            }
        }
        // Started while disconnected (restarted, or on demand: a routed offer or call for
        // a driver whose app is not connected here, as after its node was killed and
        // this one took its shard over): the grace period starts again, so a driver
        // with no session leaves its cell within it however its actor was started; it
        // is refused every offer meanwhile. (Recovered drivers share one sweep instead:
        // see `System::recover`.) An attach makes the timer stale (the epoch rises).
        if !s.recovered && s.rec.session.is_none() && s.st.status().is_indexed() {
            let epoch = s.rec.session_epoch;
            myself.send_after(
                Duration::from_millis(self.ctx.config.session_grace_ms),
                move || DriverMsg::GraceExpired { epoch },
            );
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<DriverMsg>,
        msg: DriverMsg,
        s: &mut DriverActorState,
    ) -> Result<(), ActorProcessingErr> {
        let kind = msg.kind();
        let metrics = &self.ctx.metrics;
        match msg {
            // A location ping is the hot path (a driver's most frequent message) and logs
            // nothing on success: it gets no span, which would format the id every time.
            // It is handled in place, without an allocation.
            DriverMsg::Command(DriverCommand::Location { position, heading }, responder, None) => {
                // Made inside the closure: a future made outside would be held twice.
                metrics
                    .handle_in("driver", kind, tracing::Span::none(), || {
                        self.location(s, position, heading, responder)
                    })
                    .await;
                Ok(())
            }
            // Everything else is boxed, once per message: ractor keeps one future per
            // actor for its whole life, as large as the largest handler it may await,
            // and a driver's handlers made it ~10 KB of every connected driver's memory
            // (heaptrack, issue 14). Boxed, that future holds the ping path and a pointer.
            msg => {
                let span = tracing::info_span!("driver", driver_id = %s.rec.id);
                let work = Box::pin(self.handle_msg(myself, msg, s));
                metrics.handle_in("driver", kind, span, || work).await
            }
        }
    }
}

impl DriverActor {
    /// One message: what `Actor::handle` does, timed and counted by the caller.
    async fn handle_msg(
        &self,
        myself: ActorRef<DriverMsg>,
        msg: DriverMsg,
        s: &mut DriverActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DriverMsg::Attach(session, reply) => {
                if let Some(old) = s.rec.session.replace(session)
                    && s.rec.session.as_ref().is_some_and(|n| n.id != old.id)
                {
                    old.close(CLOSE_REPLACED);
                }
                s.rec.session_epoch += 1;
                s.offline_when_free = false;
                self.commit(s);
                self.send(s, self.welcome(s));
                let _ = reply.send(());
            }
            DriverMsg::Detach { session_id } => {
                if s.rec.session.as_ref().is_some_and(|h| h.id == session_id) {
                    s.rec.session = None;
                    s.rec.session_epoch += 1;
                    self.commit(s);
                    let epoch = s.rec.session_epoch;
                    myself.send_after(
                        Duration::from_millis(self.ctx.config.session_grace_ms),
                        move || DriverMsg::GraceExpired { epoch },
                    );
                }
            }
            DriverMsg::GraceExpired { epoch } => {
                if epoch == s.rec.session_epoch && s.rec.session.is_none() {
                    s.offline_when_free = true;
                    self.go_offline_if_idle(s).await;
                    self.commit(s);
                }
            }
            // Location pings never carry a trace: no span, no cost.
            DriverMsg::Command(cmd, responder, None) => {
                self.command(&myself, s, cmd, responder, None).await
            }
            DriverMsg::Command(cmd, responder, trace) => {
                let span = crate::traced_span!(trace, "driver.command", command = cmd.kind(), driver_id = %s.rec.id);
                let trace = TraceContext::of(&span);
                self.command(&myself, s, cmd, responder, trace)
                    .instrument(span)
                    .await
            }
            DriverMsg::ReserveOffer(mut offer, reply) => {
                let span =
                    crate::traced_span!(offer.trace, "driver.reserve_offer", driver_id = %s.rec.id);
                // The session writes the offer as a child of this actor's span.
                offer.trace = TraceContext::of(&span);
                let ok = async {
                    let ok = if s.rec.session.is_none() {
                        false // an app that is not connected cannot answer within the offer window
                    } else if s.st.status() == &DriverStatus::Offered(offer.trip_id.clone()) {
                        true // a restarted trip re-sending its open offer
                    } else {
                        s.st.reserve_offer(&offer.trip_id).is_ok()
                    };
                    if ok {
                        // A first offer's stages go on in the session, from its queuing.
                        let first = offer.queued_at.take().is_some();
                        s.rec.offer = Some(Box::new(offer.clone()));
                        self.reindex(s, false).await;
                        self.commit(s);
                        offer.queued_at = first.then(std::time::Instant::now);
                        self.send(s, Outbound::Offer(offer));
                    }
                    ok
                }
                .instrument(span)
                .await;
                let _ = reply.send(ok);
            }
            DriverMsg::OfferEnded {
                trip_id,
                notify,
                answers,
            } => {
                if s.st.offer_ended(&trip_id).is_ok() {
                    s.rec.offer = None;
                    self.reindex(s, false).await;
                    self.go_offline_if_idle(s).await;
                    self.commit(s);
                    if notify {
                        self.send(s, Outbound::OfferExpired { trip_id });
                    }
                }
                s.awaiting.answer(answers, Ok(()));
            }
            DriverMsg::Trip {
                view,
                link,
                answers,
            } => {
                // Not newer than what the app has (a restarted trip re-syncing): the
                // status follows it, the app is not told twice (as the rider's actor).
                let known = s
                    .rec
                    .trip
                    .as_ref()
                    .is_some_and(|t| t.trip_id == view.trip_id && t.version >= view.version);
                self.follow_trip(s, &view, link);
                if known && link != TripLink::Released {
                    s.awaiting.answer(answers, Ok(()));
                    return Ok(());
                }
                if link == TripLink::Released {
                    self.reindex(s, false).await;
                    self.go_offline_if_idle(s).await;
                } else if link == TripLink::Assigned {
                    self.reindex(s, false).await;
                }
                self.commit(s);
                self.send(
                    s,
                    Outbound::TripUpdate {
                        req: None,
                        trip: *view,
                    },
                );
                s.awaiting.answer(answers, Ok(()));
            }
            DriverMsg::Answer { ticket, outcome } => s.awaiting.answer(Some(ticket), outcome),
            // Dropped unanswered: the app is told the request was lost.
            DriverMsg::TicketExpired(ticket) => drop(s.awaiting.take(ticket)),
            DriverMsg::TripFailed(trip_id) => {
                s.awaiting
                    .fail_trip(&trip_id, &crate::error::trip_stopped());
            }
            DriverMsg::Reindex => {
                s.rec.cell = None;
                self.reindex(s, false).await;
                self.commit(s);
            }
            DriverMsg::Get(reply) => {
                let mut rec = s.rec.clone();
                rec.status = s.st.status().clone();
                let _ = reply.send(rec);
            }
            DriverMsg::Suspend(suspend, reply) => {
                let _ = reply.send(self.suspend(s, suspend).await);
            }
            DriverMsg::InjectPanic => panic!("injected fault in driver {}", s.rec.id),
        }
        Ok(())
    }
}
