//! `dispatch-actors`: the live system on ractor.
//!
//! One actor per driver ([`driver::DriverActor`]), rider ([`rider::RiderActor`]), trip
//! ([`trip::TripActor`]) and H3 cell with drivers ([`cell::CellActor`]), each spawned and
//! restarted by its group's [`supervisor::Supervisor`]. Each actor is a thin shell around
//! `dispatch-engine`: the trip actor carries out the engine's decisions
//! (`Trip::decide`: new state, effects, journal record, payment plan) and persists them
//! through `dispatch-persistence`; it decides nothing itself.
//!
//! Start here: [`system::System`] is the typed facade the transport calls (registration,
//! sessions, commands, reads, the admin console in [`admin`]); [`boot`] starts it and its
//! timers, [`recovery`] rebuilds it from the store. [`messages`] holds every actor's
//! messages and start arguments as plain data and [`records`] each entity's restartable
//! state, so that no two modules here import each other (`tests/modules.rs` checks it).
//! Actors hold the [`context::Context`]; the [`registry`]'s maps are theirs alone.
//!
//! This crate does not parse JSON or speak HTTP: sessions are reached through
//! [`session::SessionHandle`], and what they are sent is the closed enum
//! [`session::Outbound`].
//!
//! Message ordering: ractor is FIFO per sender. Calls (request/reply) only go from a
//! trip to a driver (offer reservation), from an operator to a trip, and from anyone to
//! a cell or a supervisor, and none of those ever calls back, so no two actors can wait
//! on each other. A command's answer travels with the update it causes (see
//! [`messages::Ticket`]).

// Actor messages are moved into a mailbox once and out again; boxing the large variants
// would add an allocation per message and save nothing.
#![allow(clippy::large_enum_variant)]

pub mod admin;
pub mod batch;
pub mod boot;
pub mod cell;
pub mod clock;
pub mod context;
pub mod driver;
pub mod error;
pub mod messages;
pub mod metrics;
pub mod payments;
pub mod placement;
pub mod records;
pub mod recovery;
mod registry;
pub mod remote;
pub mod rider;
pub mod session;
pub mod stages;
pub mod supervisor;
pub mod system;
pub mod tracecontext;
pub mod trip;
pub mod views;
pub mod waiting;

pub use context::SystemConfig;
pub use error::{ApiError, ErrorCode};
pub use metrics::Metrics;
pub use system::System;
