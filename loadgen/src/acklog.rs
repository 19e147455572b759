//! `--ack-log FILE`: one JSON line per thing the server acknowledged to a client, for
//! checking a run against the server's own history afterwards (the chaos test does).
//!
//! Lines, each with `at_ms` (Unix ms when the client read it), `role` (`driver` or
//! `rider`), `id` (the driver's or rider's id) and `client` (its index in the city):
//! - `{"kind": "trip_update", "trip_id", "state", "version", "req"}`: every `trip_update`
//!   (`req` is set on the reply to `request_ride`, and that line also has the trip's
//!   `pickup` and `dropoff` as the server stored them, `{"lat", "lng"}`);
//! - `{"kind": "ack", "cmd", "trip_id", "req"}`: every `ack` of a command that moves a
//!   trip (`accept`, `arrived`, `start_trip`, `complete_trip`, `cancel_trip`,
//!   `cancel_ride`);
//! - `{"kind": "welcome", "reconnect", "status", "trip_id", "state", "version",
//!   "offer_trip_id"}`: every `welcome`, at the first connection and after each reconnect
//!   (`status` for drivers only; the trip fields null when there is no trip).
//!
//! The file is opened in append mode and every line goes out whole in one `write(2)`,
//! unbuffered: a line is in the file as soon as the client has read the message, and
//! worker processes can share the file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use dispatch_transport::wire::{DriverStatus, Trip};
use serde_json::{Value, json};

use crate::sim::unix_ms;
use crate::stats::Stats;

/// Who a line is about: the role, the server's id and the index in the city.
#[derive(Debug, Clone)]
pub struct Who {
    pub role: &'static str,
    pub id: String,
    pub client: usize,
}

pub struct AckLog {
    file: File,
    failed: AtomicBool,
}

/// The commands whose `ack` means a trip moved.
pub fn moves_a_trip(cmd: &str) -> bool {
    matches!(
        cmd,
        "accept" | "arrived" | "start_trip" | "complete_trip" | "cancel_trip" | "cancel_ride"
    )
}

impl AckLog {
    /// Empties (or creates) the file: once per run, by the process that starts it.
    pub fn truncate(path: &Path) -> Result<()> {
        File::create(path)
            .map(drop)
            .with_context(|| format!("cannot create --ack-log {}", path.display()))
    }

    /// Opens the file for appending.
    pub fn open(path: &Path) -> Result<AckLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open --ack-log {}", path.display()))?;
        Ok(AckLog {
            file,
            failed: AtomicBool::new(false),
        })
    }

    fn line(&self, stats: &Stats, who: &Who, mut v: Value) {
        v["at_ms"] = unix_ms().into();
        v["role"] = who.role.into();
        v["id"] = who.id.as_str().into();
        v["client"] = who.client.into();
        let mut s = v.to_string();
        s.push('\n');
        // One write of the whole line: complete in the file once this returns.
        match (&self.file).write_all(s.as_bytes()) {
            Ok(()) => Stats::inc(&stats.c.ack_log_lines),
            Err(e) => {
                if !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    stats.error("ack_log", "write", false, format!("--ack-log: {e}"));
                }
            }
        }
    }

    pub fn trip_update(&self, stats: &Stats, who: &Who, trip: &Trip, req: Option<u64>) {
        let mut v = json!({
            "kind": "trip_update",
            "trip_id": trip.trip_id,
            "state": trip.state,
            "version": trip.version,
            "req": req,
        });
        if req.is_some() {
            v["pickup"] = json!(trip.pickup);
            v["dropoff"] = json!(trip.dropoff);
        }
        self.line(stats, who, v);
    }

    pub fn ack(&self, stats: &Stats, who: &Who, cmd: &str, trip_id: &str, req: u64) {
        self.line(
            stats,
            who,
            json!({
                "kind": "ack",
                "cmd": cmd,
                "trip_id": trip_id,
                "req": req,
            }),
        );
    }

    pub fn welcome(
        &self,
        stats: &Stats,
        who: &Who,
        reconnect: bool,
        status: Option<DriverStatus>,
        trip: Option<&Trip>,
        offer_trip_id: Option<&str>,
    ) {
        self.line(
            stats,
            who,
            json!({
                "kind": "welcome",
                "reconnect": reconnect,
                "status": status,
                "trip_id": trip.map(|t| t.trip_id.as_str()),
                "state": trip.map(|t| t.state),
                "version": trip.map(|t| t.version),
                "offer_trip_id": offer_trip_id,
            }),
        );
    }

    /// Pushes what was written to the disk (the lines are already in the file).
    pub fn flush(&self) {
        let _ = (&self.file).flush();
        let _ = self.file.sync_data();
    }
}
