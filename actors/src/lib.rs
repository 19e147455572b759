//! `dispatch-actors`: the live system on ractor.
//!
//! One actor per driver ([`driver::DriverActor`]), rider ([`rider::RiderActor`]), trip
//! ([`trip::TripActor`]) and H3 cell with drivers ([`cell::CellActor`]), each spawned and
//! restarted by its group's [`supervisor::Supervisor`]. The [`registry::Registry`] maps ids
//! to actors and keeps each entity's last committed snapshot, from which a failed actor
//! is restarted. [`system::System`] is the handle the transport holds.
//!
//! Each actor is a thin shell around `dispatch-engine`'s rules: it calls the engine and
//! carries out the effects (send, commit, count). This crate does not parse JSON or speak
//! HTTP: sessions are reached through [`session::SessionHandle`], and what they are sent is
//! the closed enum [`session::Outbound`].
//!
//! Message ordering: ractor is FIFO per sender. Calls (request/reply) only go from a
//! trip to a driver (offer reservation) and from anyone to a cell or a supervisor, and
//! none of those ever calls back, so no two actors can wait on each other.

// Actor messages are moved into a mailbox once and out again; boxing the large variants
// would add an allocation per message and save nothing.
#![allow(clippy::large_enum_variant)]

pub mod admin;
pub mod cell;
pub mod clock;
pub mod driver;
pub mod error;
pub mod metrics;
pub mod payments;
pub mod recovery;
pub mod registry;
pub mod rider;
pub mod session;
pub mod supervisor;
pub mod system;
pub mod trip;
pub mod views;

pub use error::{ApiError, ErrorCode};
pub use metrics::Metrics;
pub use system::{System, SystemConfig};
