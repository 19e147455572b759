//! `dispatch-transport`: the wire types of PROTOCOL.md ([`wire`]) and, behind the
//! `server` feature (on by default), the axum server ([`server`]): REST, WebSocket
//! sessions, auth, limits, `/metrics`, and the `dispatchd` binary's configuration.
//!
//! It translates and forwards; it holds no domain rules. Clients such as `loadgen`
//! depend on this crate with `default-features = false` and get only [`wire`].

pub mod wire;

#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "server")]
pub mod telemetry;
