//! The actors' one source of time. Wall-clock milliseconds anchored at start and advanced
//! by tokio's monotonic clock, so it never goes backwards and follows paused test time.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_wall_ms: u64,
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        let base_wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            base_wall_ms,
            base: Instant::now(),
        }
    }

    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.base_wall_ms + self.base.elapsed().as_millis() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
