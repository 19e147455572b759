//! Membership's Prometheus series.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

/// Every series membership keeps (see docs/api.md, "Cluster membership").
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    pub members: IntGauge,
    pub peer_up: IntGaugeVec,
    pub heartbeats: IntCounterVec,
    pub peers_dead: IntCounter,
    pub connect_attempts: IntCounter,
    pub connect_failures: IntCounter,
    pub auth_refusals: IntCounter,
    pub handshake_timeouts: IntCounter,
    pub pending_refused: IntCounter,
    pub tls_refusals: IntCounterVec,
    pub remote_latency: Histogram,
    pub remote_errors: IntCounter,
}

fn counter(r: &prometheus::Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl ClusterMetrics {
    pub fn new(r: &prometheus::Registry) -> Self {
        let members = IntGauge::new(
            "dispatch_cluster_members",
            "Live cluster members, this node included",
        )
        .expect("valid metric");
        r.register(Box::new(members.clone()))
            .expect("unique metric");
        let peer_up = IntGaugeVec::new(
            Opts::new(
                "dispatch_cluster_peer_up",
                "1 while the peer is a live member",
            ),
            &["peer"],
        )
        .expect("valid metric");
        r.register(Box::new(peer_up.clone()))
            .expect("unique metric");
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_heartbeats_total",
                "Heartbeats sent, received, and ignored (from no authenticated peer of that name)",
            ),
            &["direction"],
        )
        .expect("valid metric");
        r.register(Box::new(heartbeats.clone()))
            .expect("unique metric");
        for d in ["sent", "received", "ignored"] {
            heartbeats.with_label_values(&[d]);
        }
        let remote_latency = Histogram::with_opts(
            HistogramOpts::new(
                "dispatch_cluster_remote_latency_seconds",
                "Round trip of a heartbeat to a peer's actor and its answer",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(remote_latency.clone()))
            .expect("unique metric");
        let tls_refusals = IntCounterVec::new(
            Opts::new(
                "dispatch_cluster_tls_refusals_total",
                "Cluster links whose TLS handshake failed (--cluster-tls-*): incoming ones this node refused, outgoing ones it gave up, by reason",
            ),
            &["direction", "reason"],
        )
        .expect("valid metric");
        r.register(Box::new(tls_refusals.clone()))
            .expect("unique metric");
        // A dial that times out is a failed dial (`connect_failures`), not a TLS refusal.
        for (d, reasons) in [
            (
                "incoming",
                &["not_tls", "certificate", "handshake", "timeout"][..],
            ),
            ("outgoing", &["not_tls", "certificate", "handshake"][..]),
        ] {
            for reason in reasons {
                tls_refusals.with_label_values(&[d, reason]);
            }
        }
        Self {
            members,
            tls_refusals,
            peer_up,
            heartbeats,
            peers_dead: counter(
                r,
                "dispatch_cluster_peers_dead_total",
                "Peers declared dead: not heard from within --cluster-peer-timeout-ms",
            ),
            connect_attempts: counter(
                r,
                "dispatch_cluster_connect_attempts_total",
                "Dials of a configured peer that was not a live member",
            ),
            connect_failures: counter(
                r,
                "dispatch_cluster_connect_failures_total",
                "Dials that failed: unresolvable, refused, or timed out",
            ),
            auth_refusals: counter(
                r,
                "dispatch_cluster_auth_refusals_total",
                "Incoming links refused: the peer did not complete the cookie handshake",
            ),
            handshake_timeouts: counter(
                r,
                "dispatch_cluster_handshake_timeouts_total",
                "Links stopped for not authenticating within --cluster-peer-timeout-ms",
            ),
            pending_refused: counter(
                r,
                "dispatch_cluster_pending_refused_total",
                "Links closed at once because MAX_PENDING_SESSIONS were already authenticating (or, with TLS, in their TLS handshake)",
            ),
            remote_latency,
            remote_errors: counter(
                r,
                "dispatch_cluster_remote_errors_total",
                "Messages to a peer's actor that could not be sent",
            ),
        }
    }
}
