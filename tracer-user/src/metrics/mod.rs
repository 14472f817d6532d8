//! Stage 6, metrics: the Prometheus contract (names and labels are
//! documented in README.md and must not change). Takes what the tracker
//! says of each event ([`crate::track::Outcome`]) and, at scrape, its table
//! and chains; gives the metric families. Each metric is declared once
//! below, its labels a typed set ([`family`]) whose names and order are
//! written once; open-ended labels are capped ([`labels`]). [`State`] is
//! the daemon's whole state: the tracker and the metrics it feeds.

pub(crate) mod family;
mod imbalance;
pub(crate) mod labels;
mod state;
#[cfg(test)]
mod tests;

use prometheus::{IntCounter, IntGauge, Registry, TextEncoder};

pub(crate) use self::family::Owner;
use self::family::{Counter, Gauge, Histogram, label_set, plain};
pub use self::state::State;

/// Buckets of `conntracer_idle_before_close_seconds`: from sub-second to a
/// day, dense around the usual idle timeouts (30 s, 1 m, 5 m, 15 m, 1 h).
pub(crate) const IDLE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    14400.0, 43200.0, 86400.0,
];

/// Buckets of `conntracer_sidecar_pool_kill_app_connections`.
pub(crate) const POOL_APP_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

label_set!(
    /// `conntracer_idle_kills_total`.
    IdleKill { owner; direction, peer, peer_state, closed_by, close_kind, keepalive }
);
label_set!(
    /// `conntracer_idle_before_close_seconds`.
    IdleBeforeClose { owner; direction, closed_by }
);
label_set!(
    /// `conntracer_connections_open`.
    ConnectionsOpen { owner; direction, keepalive }
);
label_set!(
    /// `conntracer_keepalive_sockopts_total`.
    KeepaliveSockopt { owner; option, value }
);
label_set!(
    /// `conntracer_stale_reuse_total`.
    StaleReuse { owner; direction, peer, outcome, cause }
);
label_set!(
    /// `conntracer_close_wait_connections`.
    CloseWait { owner; direction }
);
label_set!(
    /// `conntracer_connect_failures_total`.
    ConnectFailure { owner; peer, peer_state, reason }
);
label_set!(
    /// `conntracer_sidecar_chain_kills_total`, `conntracer_sidecar_pool_kills_total`.
    ChainKill { namespace, pod, peer, origin, upstream_keepalive, idle }
);
label_set!(
    /// `conntracer_sidecar_keepalive_mismatch`.
    ChainPeer { namespace, pod, peer }
);
label_set!(
    /// `conntracer_sidecar_pool_connections`.
    PoolConnections { namespace, pod, peer, leg, keepalive }
);
label_set!(
    /// `conntracer_peer_connections_open`.
    PeerConnectionsOpen { namespace, pod, role, direction, peer }
);
label_set!(
    /// `conntracer_findings`.
    FindingKey { pattern, namespace, pod, peer }
);
label_set!(
    /// `conntracer_events_total`.
    EventKind { kind }
);
label_set!(
    /// `conntracer_label_overflow_total`.
    LabelName { label }
);
label_set!(
    /// `conntracer_kube_index_entries`.
    IndexKind { kind }
);
label_set!(
    /// `conntracer_build_info`.
    Build { version }
);

/// Every metric of the contract, registered in [`Self::registry`].
pub(crate) struct Metrics {
    pub registry: Registry,
    pub idle_kills: Counter<IdleKill<'static>>,
    pub idle_before_close: Histogram<IdleBeforeClose<'static>>,
    pub connections_open: Gauge<ConnectionsOpen<'static>>,
    pub keepalive_sockopts: Counter<KeepaliveSockopt<'static>>,
    pub stale_reuse: Counter<StaleReuse<'static>>,
    pub connect_failures: Counter<ConnectFailure<'static>>,
    pub close_wait: Gauge<CloseWait<'static>>,
    pub sidecar_chain_kills: Counter<ChainKill<'static>>,
    pub sidecar_keepalive_mismatch: Gauge<ChainPeer<'static>>,
    pub pool_connections: Gauge<PoolConnections<'static>>,
    pub pool_keepalive_mismatch: Gauge<ChainPeer<'static>>,
    pub pool_kills: Counter<ChainKill<'static>>,
    pub pool_kill_app_connections: Histogram<ChainPeer<'static>>,
    pub findings: Gauge<FindingKey<'static>>,
    pub events: Counter<EventKind<'static>>,
    pub events_lost: IntCounter,
    pub tracked_connections: IntGauge,
    pub label_overflow: Counter<LabelName<'static>>,
    pub table_evictions: IntCounter,
    pub decode_errors: IntCounter,
    pub build_info: Gauge<Build<'static>>,
    pub peer_connections_open: Gauge<PeerConnectionsOpen<'static>>,
    pub chains_open: IntGauge,
    pub chains_pending: IntGauge,
    pub chain_pending_evicted: IntCounter,
    pub kube_pods: IntGauge,
    pub kube_index: Gauge<IndexKind<'static>>,
    pub table_reconciled: IntCounter,
    pub resyncs: IntCounter,
    pub resync_not_added: IntCounter,
    pub resync_duration: prometheus::Gauge,
    pub resync_cpu: prometheus::Gauge,
    pub kube_errors: IntCounter,
    pub cgroup_rescans: IntCounter,
    pub proc_errors: IntCounter,
    pub forgotten_pods: IntCounter,
}

impl Metrics {
    #[expect(
        clippy::too_many_lines,
        reason = "one registration per contract metric"
    )]
    pub(crate) fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let m = Self {
            idle_kills: Counter::register(
                &r,
                "conntracer_idle_kills_total",
                "Connections that ended after at least the idle threshold with no payload, ended \
                 by the peer (FIN/RST) or a timeout, including stale reuse.",
            )?,
            idle_before_close: Histogram::register(
                &r,
                "conntracer_idle_before_close_seconds",
                "Idle time (no payload either way) when each closed connection ended.",
                IDLE_BUCKETS,
            )?,
            connections_open: Gauge::register(
                &r,
                "conntracer_connections_open",
                "Open connections tracked.",
            )?,
            keepalive_sockopts: Counter::register(
                &r,
                "conntracer_keepalive_sockopts_total",
                "Keepalive socket options set (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, \
                 TCP_KEEPCNT, TCP_USER_TIMEOUT).",
            )?,
            stale_reuse: Counter::register(
                &r,
                "conntracer_stale_reuse_total",
                "Sends answered by a reset or never acknowledged: the first send after at least \
                 the idle threshold of silence (cause silence), or a send after the peer's FIN \
                 or crossing it (cause peer_closed: the keep-alive race).",
            )?,
            findings: Gauge::register(
                &r,
                "conntracer_findings",
                "Active findings (1 each): a pattern of failures on this node and what to change; \
                 `conn-tracer findings` or /findings has the details.",
            )?,
            close_wait: Gauge::register(
                &r,
                "conntracer_close_wait_connections",
                "Connections the peer closed more than close_wait_threshold ago that their owner \
                 has not closed (CLOSE_WAIT: a leak of the owner's).",
            )?,
            connect_failures: Counter::register(
                &r,
                "conntracer_connect_failures_total",
                "Connects that failed: refused (a reset answered the SYN), timeout (the SYN went \
                 unanswered) or unreachable (an ICMP error). peer_state=deleted: the peer is a pod \
                 deleted from the API less than deleted_pod_grace ago.",
            )?,
            sidecar_chain_kills: Counter::register(
                &r,
                "conntracer_sidecar_chain_kills_total",
                "App connections through the pod's sidecar that ended, by the leg that ended first \
                 (idle: idle at least the idle threshold before the end).",
            )?,
            sidecar_keepalive_mismatch: Gauge::register(
                &r,
                "conntracer_sidecar_keepalive_mismatch",
                "Open app->sidecar->upstream chains with keepalive on the app leg and off upstream.",
            )?,
            pool_connections: Gauge::register(
                &r,
                "conntracer_sidecar_pool_connections",
                "Pooled (N:M) connections of a pod to a destination through its sidecar's HTTP \
                 pool: the app's (leg=app) and the sidecar's upstream ones (leg=upstream).",
            )?,
            pool_keepalive_mismatch: Gauge::register(
                &r,
                "conntracer_sidecar_pool_keepalive_mismatch",
                "Pooled upstream connections with keepalive off, to a destination the pod's app \
                 connections reach with keepalive on.",
            )?,
            pool_kills: Counter::register(
                &r,
                "conntracer_sidecar_pool_kills_total",
                "Pooled upstream connections of a sidecar that ended: origin upstream (the server \
                 or the network) or sidecar (the proxy closed it).",
            )?,
            pool_kill_app_connections: Histogram::register(
                &r,
                "conntracer_sidecar_pool_kill_app_connections",
                "App connections of the pod to the same destination open when a pooled upstream \
                 connection ended (one observation per end).",
                POOL_APP_BUCKETS,
            )?,
            events: Counter::register(
                &r,
                "conntracer_events_total",
                "Kernel events received, by kind.",
            )?,
            events_lost: plain(
                &r,
                IntCounter::new(
                    "conntracer_events_lost_total",
                    "Kernel events that did not fit in the ring buffer.",
                ),
            )?,
            tracked_connections: plain(
                &r,
                IntGauge::new(
                    "conntracer_tracked_connections",
                    "Connections in the tracer's table.",
                ),
            )?,
            label_overflow: Counter::register(
                &r,
                "conntracer_label_overflow_total",
                "Label values folded into \"other\" by the label caps.",
            )?,
            table_evictions: plain(
                &r,
                IntCounter::new(
                    "conntracer_table_evictions_total",
                    "Connections dropped from the table to stay within max_connections.",
                ),
            )?,
            decode_errors: plain(
                &r,
                IntCounter::new(
                    "conntracer_decode_errors_total",
                    "Kernel records that could not be decoded.",
                ),
            )?,
            build_info: Gauge::register(
                &r,
                "conntracer_build_info",
                "Always 1; labels name the build.",
            )?,
            peer_connections_open: Gauge::register(
                &r,
                "conntracer_peer_connections_open",
                "Open connections by peer (namespace/pod of a known pod, else address): \
                 the load-imbalance view. Peers are capped like every peer label.",
            )?,
            chains_open: plain(
                &r,
                IntGauge::new(
                    "conntracer_sidecar_chains_open",
                    "Open app -> sidecar -> upstream chains the tracer has linked.",
                ),
            )?,
            chains_pending: plain(
                &r,
                IntGauge::new(
                    "conntracer_sidecar_chains_pending",
                    "Sockets and half-built chains waiting for the rest of their chain.",
                ),
            )?,
            chain_pending_evicted: plain(
                &r,
                IntCounter::new(
                    "conntracer_sidecar_chain_pending_evicted_total",
                    "Waiting sockets and half-built chains dropped, oldest first, because their \
                     pod's (or the node's) pending cap was reached.",
                ),
            )?,
            table_reconciled: plain(
                &r,
                IntCounter::new(
                    "conntracer_table_reconciled_total",
                    "Connections removed from the table because the kernel no longer had them \
                     (their close event was missed, e.g. lost).",
                ),
            )?,
            resyncs: plain(
                &r,
                IntCounter::new(
                    "conntracer_resyncs_total",
                    "Resyncs of the table with the kernel's sockets done (at start-up, then \
                     every resync_interval).",
                ),
            )?,
            resync_not_added: plain(
                &r,
                IntCounter::new(
                    "conntracer_resync_not_added_total",
                    "Sockets a resync found but did not add because the table was full: \
                     connections evicted to stay within max_connections stay out, never \
                     evicting others at every resync.",
                ),
            )?,
            resync_duration: plain(
                &r,
                prometheus::Gauge::new(
                    "conntracer_resync_duration_seconds",
                    "Wall time of the last resync: the snapshot of every network namespace's \
                     TCP sockets and its reconciliation with the table.",
                ),
            )?,
            resync_cpu: plain(
                &r,
                prometheus::Gauge::new(
                    "conntracer_resync_cpu_seconds",
                    "CPU time of the daemon (all its threads) during the last resync.",
                ),
            )?,
            kube_pods: plain(
                &r,
                IntGauge::new(
                    "conntracer_kube_pods",
                    "Pods of this node known from the Kubernetes API.",
                ),
            )?,
            kube_index: Gauge::register(
                &r,
                "conntracer_kube_index_entries",
                "The cluster-wide Service and EndpointSlice index: ClusterIP:port entries \
                 (kind=service_ports), endpoint addresses (endpoints), pod IPs of pods deleted \
                 within deleted_pod_grace (deleted_pods), endpoints left out because the index \
                 holds max_cluster_endpoints (refused_endpoints).",
            )?,
            kube_errors: plain(
                &r,
                IntCounter::new(
                    "conntracer_kube_errors_total",
                    "Kubernetes API errors (the pod, Service and EndpointSlice watches retry; known \
                     labels are kept).",
                ),
            )?,
            cgroup_rescans: plain(
                &r,
                IntCounter::new(
                    "conntracer_cgroup_rescans_total",
                    "Walks of the cgroup v2 hierarchy to map new cgroup ids to paths.",
                ),
            )?,
            proc_errors: plain(
                &r,
                IntCounter::new(
                    "conntracer_proc_errors_total",
                    "/proc entries (fd links, status, cgroup) that could not be parsed and were \
                     skipped.",
                ),
            )?,
            forgotten_pods: plain(
                &r,
                IntCounter::new(
                    "conntracer_forgotten_pods_total",
                    "Deleted pods whose series were removed from the metrics (two grace periods \
                     after the deletion).",
                ),
            )?,
            registry: r,
        };
        m.build_info.set(
            &Build {
                version: env!("CARGO_PKG_VERSION"),
            },
            1,
        );
        Ok(m)
    }

    /// Removes the counter and histogram series of a deleted pod: those
    /// whose `namespace` and `pod` labels name it, and those whose `peer` is
    /// it (`namespace/pod`). Gauges need nothing: every scrape rebuilds
    /// them from the open connections. Returns the series removed.
    pub(crate) fn forget_pod(&self, namespace: &str, pod: &str) -> usize {
        let peer = format!("{namespace}/{pod}");
        let belongs = |labels: &std::collections::HashMap<&str, &str>| {
            let get = |name: &str| labels.get(name).copied();
            (get("namespace") == Some(namespace) && get("pod") == Some(pod))
                || get("peer") == Some(peer.as_str())
        };
        self.remove_event_series(&belongs)
    }

    /// Removes the counter series whose `label` is `value` (a capped value
    /// whose place another took); returns how many.
    pub(crate) fn forget_label(&self, label: &str, value: &str) -> usize {
        let belongs =
            |labels: &std::collections::HashMap<&str, &str>| labels.get(label) == Some(&value);
        self.remove_event_series(&belongs)
    }

    /// Removes the series `belongs` picks from every counter and histogram
    /// (gauges are rebuilt at every scrape); returns how many.
    fn remove_event_series(
        &self,
        belongs: &dyn Fn(&std::collections::HashMap<&str, &str>) -> bool,
    ) -> usize {
        self.idle_kills.remove_where(belongs)
            + self.idle_before_close.remove_where(belongs)
            + self.keepalive_sockopts.remove_where(belongs)
            + self.stale_reuse.remove_where(belongs)
            + self.connect_failures.remove_where(belongs)
            + self.sidecar_chain_kills.remove_where(belongs)
            + self.pool_kills.remove_where(belongs)
            + self.pool_kill_app_connections.remove_where(belongs)
    }

    /// The Prometheus text exposition of everything.
    #[cfg(test)]
    pub(crate) fn render(&self) -> String {
        encode(&self.registry.gather())
    }
}

/// Gathered metrics in the Prometheus text format.
pub(crate) fn encode(families: &[prometheus::proto::MetricFamily]) -> String {
    TextEncoder::new()
        .encode_to_string(families)
        .unwrap_or_else(|e| {
            log::error!("cannot encode metrics: {e}");
            String::new()
        })
}
