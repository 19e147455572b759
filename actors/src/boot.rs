//! Start-up: the shared context over an open store, one supervisor per actor group, and
//! the system's own timers (position snapshots, the quote sweep, surge). Recovery
//! ([`System::recover`]) comes next, before any client is served.

use std::sync::Arc;
use std::time::Duration;

use dispatch_persistence::Store;
use ractor::{Actor, ActorRef};

use crate::context::{Context, SystemConfig};
use crate::error::{ApiError, ErrorCode};
use crate::messages::{Group, SupervisorMsg};
use crate::metrics::Metrics;
use crate::payments::PaymentProvider;
use crate::supervisor::Supervisor;
use crate::system::System;

impl System {
    /// Starts the group supervisors over an open store, with the in-process payment
    /// provider. Nothing is loaded: call [`System::recover`] before serving clients.
    pub async fn start(
        config: SystemConfig,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
    ) -> Result<System, ApiError> {
        Self::start_with_provider(config, metrics, store, None).await
    }

    /// As [`System::start`], with another card processor (`None`: the in-process one).
    pub async fn start_with_provider(
        config: SystemConfig,
        metrics: Arc<Metrics>,
        store: Arc<Store>,
        provider: Option<Arc<dyn PaymentProvider>>,
    ) -> Result<System, ApiError> {
        let ctx = Context::new(config, metrics, store, provider);
        let mut sups = Vec::new();
        for group in Group::ALL {
            let sup = Supervisor {
                group,
                ctx: ctx.clone(),
            };
            let (r, _) = Actor::spawn(None, sup, ())
                .await
                .map_err(|e| ApiError::new(ErrorCode::Internal, format!("supervisor: {e}")))?;
            sups.push(r);
        }
        let sups: [ActorRef<SupervisorMsg>; 4] =
            sups.try_into().map_err(|_| ApiError::internal())?;
        let _ = ctx.supervisors.set(sups);
        Ok(System { ctx })
    }

    /// The system's timers, until the returned task is aborted or the system is gone:
    /// moved drivers' positions to the store (off the async workers: thousands of
    /// records to encode), expired quotes out, surge recomputed.
    pub fn spawn_timers(&self) -> tokio::task::JoinHandle<()> {
        let weak = self.ctx.downgrade();
        let cfg = &self.ctx.config;
        let every = |ms: u64| tokio::time::interval(Duration::from_millis(ms.max(1)));
        let (mut snapshots, mut sweeps, mut surge) = (
            every(cfg.snapshot_interval_ms),
            every(cfg.quote_sweep_interval_ms),
            every(cfg.surge_update_ms),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = snapshots.tick() => {
                        let Some(ctx) = weak.upgrade() else { return };
                        let _ = tokio::task::spawn_blocking(move || ctx.snapshot_positions()).await;
                    }
                    _ = sweeps.tick() => {
                        let Some(ctx) = weak.upgrade() else { return };
                        ctx.sweep_quotes();
                    }
                    _ = surge.tick() => {
                        let Some(ctx) = weak.upgrade() else { return };
                        ctx.update_surge();
                    }
                }
            }
        })
    }
}
