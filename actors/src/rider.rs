//! `RiderActor`: one per rider. Enforces one active trip per rider (the engine's
//! [`RiderState`]), turns a request into a trip actor, and relays the trip's updates,
//! driver positions and receipt to the rider's session, in order.

use dispatch_engine::trip::Mover;
use dispatch_engine::{
    Point, Product, QuoteId, QuoteTerms, RiderState, Trip, TripCommand, TripId, TripState,
};
use dispatch_persistence::{Batch, StoredTrip, Transition};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::Instrument;

use crate::error::{ApiError, ErrorCode};
use crate::registry::{RiderRecord, TripRecord};
use crate::session::{CLOSE_REPLACED, Outbound, Responder, SessionHandle};
use crate::supervisor::{Group, Spawn};
use crate::system::{System, random_suffix};
use crate::trip::{TripArgs, TripFrom, TripMsg};
use crate::views::{Receipt, TripView};

pub struct RiderArgs {
    pub record: RiderRecord,
    pub restarted: bool,
}

/// What the rider asks for: a quoted trip, or one priced now.
#[derive(Debug, Clone, PartialEq)]
pub enum RideRequest {
    Quote(QuoteId),
    Direct {
        pickup: Point,
        dropoff: Point,
        product: Product,
    },
}

pub enum RiderMsg {
    /// A new session for this identity; replies once `welcome` is queued, so it is the
    /// session's first message.
    Attach(SessionHandle, RpcReplyPort<()>),
    Detach {
        session_id: u64,
    },
    RequestRide(RideRequest, Responder),
    CancelRide {
        trip_id: TripId,
        reason: Option<String>,
        responder: Responder,
    },
    Location(Point, Responder),
    /// From the trip: a transition. A final state frees the rider; `completed` comes
    /// with its receipt.
    Trip {
        view: TripView,
        receipt: Option<Receipt>,
        responder: Option<Responder>,
    },
    DriverLocation {
        trip_id: TripId,
        position: Point,
        heading: Option<f64>,
        pickup_eta_s: Option<u64>,
    },
    /// From a trip: a command of this app's was refused; answered in order with the
    /// updates the trip sent before.
    Failed(Responder, ApiError),
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
            RiderMsg::RequestRide(..) => "request_ride",
            RiderMsg::CancelRide { .. } => "cancel_ride",
            RiderMsg::Location(..) => "location",
            RiderMsg::Trip { .. } => "trip_update",
            RiderMsg::DriverLocation { .. } => "driver_location",
            RiderMsg::Failed(..) => "failed",
            RiderMsg::Get(_) => "get",
            RiderMsg::InjectPanic => "inject_panic",
        }
    }
}

pub struct RiderActor {
    pub system: System,
}

pub struct RiderActorState {
    rec: RiderRecord,
    st: RiderState,
}

impl RiderActor {
    fn commit(&self, s: &RiderActorState) {
        self.system
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
                    .system
                    .registry
                    .quotes
                    .get(&id)
                    .map(|q| q.clone())
                    .ok_or_else(|| ApiError::not_found("quote"))?;
                if q.rider_id != s.rec.id {
                    return Err(ApiError::forbidden("the quote belongs to another rider"));
                }
                if self.system.clock.now_ms() >= q.expires_at_ms {
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
            } => self
                .system
                .price(s.rec.id.clone(), pickup, dropoff, product),
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

    async fn request(&self, s: &mut RiderActorState, req: RideRequest, responder: Responder) {
        if let Some(active) = s.st.active_trip() {
            return responder.fail(ApiError::conflict(format!(
                "the rider already has an active trip {active}"
            )));
        }
        let quote_id = match &req {
            RideRequest::Quote(id) => Some(id.clone()),
            RideRequest::Direct { .. } => None,
        };
        let (pickup, dropoff, product, terms) = match self.terms(s, req) {
            Ok(t) => t,
            Err(e) => return responder.fail(e),
        };
        let now = self.system.clock.now_ms();
        let trip_id = TripId::with_suffix(&random_suffix());
        let (trip, _) = Trip::request(
            trip_id.clone(),
            s.rec.id.clone(),
            product,
            pickup,
            dropoff,
            terms,
            now,
            &self.system.config.dispatch,
        );
        let view = TripView::of(&trip, None);
        // The trip (and the used quote's removal) is on disk before anyone hears of it.
        let created = Transition {
            from: TripState::Dispatching,
            to: TripState::Dispatching,
            by: Mover::Rider,
            at_ms: now,
            version: trip.version(),
        };
        let mut batch = Batch::new().trip(
            StoredTrip {
                trip: trip.clone(),
                driver: None,
            },
            Some(created),
        );
        if let Some(q) = &quote_id {
            batch = batch.delete_quote(q.clone());
        }
        if let Err(e) = self.system.store.commit(batch).await {
            tracing::error!(error = %e, "could not store a new trip");
            return responder.fail(ApiError::unavailable(
                "the request could not be stored; retry",
            ));
        }
        // Demand for surge pricing in the pickup's cell.
        self.system.record_request(pickup);
        let record = TripRecord {
            trip,
            driver: None,
            entries: Vec::new(),
        };
        self.system
            .registry
            .trip_records
            .insert(trip_id.clone(), record.clone());
        self.system
            .registry
            .trip_views
            .insert(trip_id.clone(), view.clone());
        if s.st.begin(trip_id.clone()).is_err() {
            self.system
                .metrics
                .invariant("rider_two_trips", s.rec.id.as_str());
        }
        s.rec.trip = Some(view.clone());
        self.commit(s);
        if let Some(q) = quote_id {
            self.system.registry.quotes.remove(&q); // a quote buys one trip
        }
        // The reply is the trip's first update: sent before the trip actor can send any other.
        responder.trip(view);
        let args = TripArgs {
            record,
            restarted: false,
        };
        if let Err(e) = self.system.spawn(Group::Trip, Spawn::Trip(args)).await {
            tracing::error!(trip_id = %trip_id, error = %e, "could not start the trip actor");
        }
    }

    async fn cancel(
        &self,
        s: &RiderActorState,
        trip_id: TripId,
        reason: Option<String>,
        responder: Responder,
    ) {
        let mine = s.st.active_trip() == Some(&trip_id);
        if mine && let Some(t) = self.system.registry.trip(&trip_id) {
            let cmd = TripCommand::Cancel {
                by: dispatch_engine::CancelledBy::Rider,
                reason,
            };
            if let Err(ractor::MessagingErr::SendErr(TripMsg::Command {
                responder: Some(r), ..
            })) = t.cast(TripMsg::Command {
                cmd,
                from: TripFrom::Rider,
                responder: Some(responder),
            }) {
                r.fail(ApiError::conflict("the trip has already ended"));
            }
            return;
        }
        match self.system.trip_view(&trip_id).await {
            Err(e) => responder.fail(e),
            Ok(Some(v)) if v.rider_id == s.rec.id => {
                responder.fail(ApiError::conflict("the trip has already ended"))
            }
            Ok(Some(_)) => responder.fail(ApiError::forbidden("the trip belongs to another rider")),
            Ok(None) => responder.fail(ApiError::not_found("trip")),
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
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RiderMsg>,
        msg: RiderMsg,
        s: &mut RiderActorState,
    ) -> Result<(), ActorProcessingErr> {
        let span = tracing::info_span!("rider", rider_id = %s.rec.id);
        // Inside the span, so a slow-handler warning carries the entity's ids.
        let handling = self.system.metrics.handling("rider", msg.kind());
        async move {
            let _handling = handling;
            self.handle_msg(_myself, msg, s).await
        }
        .instrument(span)
        .await
    }
}

impl RiderActor {
    /// One message: what `Actor::handle` does, timed and counted by the caller.
    async fn handle_msg(
        &self,
        _myself: ActorRef<RiderMsg>,
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
            RiderMsg::RequestRide(req, responder) => self.request(s, req, responder).await,
            RiderMsg::CancelRide {
                trip_id,
                reason,
                responder,
            } => self.cancel(s, trip_id, reason, responder).await,
            RiderMsg::Location(p, responder) => {
                s.rec.position = Some(p);
                // Only the position changed: update it in place rather than recommit.
                if let Some(mut r) = self.system.registry.rider_records.get_mut(&s.rec.id) {
                    r.position = Some(p);
                }
                responder.ack();
            }
            RiderMsg::Trip {
                view,
                receipt,
                responder,
            } => {
                if s.rec
                    .trip
                    .as_ref()
                    .is_some_and(|t| t.trip_id == view.trip_id && t.version >= view.version)
                {
                    // Not newer than what the app has (a restarted trip re-syncing).
                    if let Some(r) = responder {
                        r.ack();
                    }
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
                if let Some(r) = responder {
                    r.ack();
                }
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
            RiderMsg::Failed(responder, error) => responder.fail(error),
            RiderMsg::Get(reply) => {
                let _ = reply.send(s.rec.clone());
            }
            RiderMsg::InjectPanic => panic!("injected fault in rider {}", s.rec.id),
        }
        Ok(())
    }
}
