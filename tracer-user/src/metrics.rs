//! The Prometheus metrics of the public contract (names and labels are
//! documented in README.md and must not change).

use std::collections::HashMap;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Buckets of `conntracer_idle_before_close_seconds`: from sub-second to a
/// day, dense around the usual idle timeouts (30 s, 1 m, 5 m, 15 m, 1 h).
pub const IDLE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    14400.0, 43200.0, 86400.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub idle_kills: IntCounterVec,
    pub idle_before_close: HistogramVec,
    pub connections_open: IntGaugeVec,
    pub keepalive_sockopts: IntCounterVec,
    pub stale_reuse: IntCounterVec,
    pub sidecar_chain_kills: IntCounterVec,
    pub sidecar_keepalive_mismatch: IntGaugeVec,
    pub events: IntCounterVec,
    pub events_lost: IntCounter,
    pub tracked_connections: IntGauge,
    pub label_overflow: IntCounterVec,
    pub table_evictions: IntCounter,
    pub decode_errors: IntCounter,
    pub build_info: IntGaugeVec,
    pub peer_connections_open: IntGaugeVec,
    pub chains_open: IntGauge,
    pub kube_pods: IntGauge,
    pub table_reconciled: IntCounter,
    pub kube_errors: IntCounter,
    pub cgroup_rescans: IntCounter,
    pub proc_errors: IntCounter,
    pub forgotten_pods: IntCounter,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    #[expect(
        clippy::too_many_lines,
        reason = "one registration per contract metric"
    )]
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let idle_before_close = HistogramVec::new(
            HistogramOpts::new(
                "conntracer_idle_before_close_seconds",
                "Idle time (no payload either way) when each closed connection ended.",
            )
            .buckets(IDLE_BUCKETS.to_vec()),
            &[
                "namespace",
                "pod",
                "container",
                "role",
                "direction",
                "closed_by",
            ],
        )?;
        r.register(Box::new(idle_before_close.clone()))?;
        let events_lost = IntCounter::new(
            "conntracer_events_lost_total",
            "Kernel events that did not fit in the ring buffer.",
        )?;
        r.register(Box::new(events_lost.clone()))?;
        let tracked = IntGauge::new(
            "conntracer_tracked_connections",
            "Connections in the tracer's table.",
        )?;
        r.register(Box::new(tracked.clone()))?;
        let evictions = IntCounter::new(
            "conntracer_table_evictions_total",
            "Connections dropped from the table to stay within max_connections.",
        )?;
        r.register(Box::new(evictions.clone()))?;
        let decode_errors = IntCounter::new(
            "conntracer_decode_errors_total",
            "Kernel records that could not be decoded.",
        )?;
        r.register(Box::new(decode_errors.clone()))?;
        let m = Self {
            idle_kills: counter(
                &r,
                "conntracer_idle_kills_total",
                "Connections that ended after at least the idle threshold with no payload, ended \
                 by the peer (FIN/RST) or a timeout, including stale reuse.",
                &[
                    "namespace",
                    "pod",
                    "container",
                    "role",
                    "direction",
                    "peer",
                    "closed_by",
                    "close_kind",
                    "keepalive",
                ],
            )?,
            idle_before_close,
            connections_open: gauge(
                &r,
                "conntracer_connections_open",
                "Open connections tracked.",
                &[
                    "namespace",
                    "pod",
                    "container",
                    "role",
                    "direction",
                    "keepalive",
                ],
            )?,
            keepalive_sockopts: counter(
                &r,
                "conntracer_keepalive_sockopts_total",
                "Keepalive socket options set (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, \
                 TCP_KEEPCNT, TCP_USER_TIMEOUT).",
                &["namespace", "pod", "container", "role", "option", "value"],
            )?,
            stale_reuse: counter(
                &r,
                "conntracer_stale_reuse_total",
                "Sends answered by a reset or never acknowledged: the first send after at least \
                 the idle threshold of silence (cause silence), or a send after the peer's FIN \
                 or crossing it (cause peer_closed: the keep-alive race).",
                &[
                    "namespace",
                    "pod",
                    "container",
                    "role",
                    "direction",
                    "peer",
                    "outcome",
                    "cause",
                ],
            )?,
            sidecar_chain_kills: counter(
                &r,
                "conntracer_sidecar_chain_kills_total",
                "App connections through the pod's sidecar that ended, by the leg that ended first.",
                &["namespace", "pod", "peer", "origin", "upstream_keepalive"],
            )?,
            sidecar_keepalive_mismatch: gauge(
                &r,
                "conntracer_sidecar_keepalive_mismatch",
                "Open app->sidecar->upstream chains with keepalive on the app leg and off upstream.",
                &["namespace", "pod", "peer"],
            )?,
            events: counter(
                &r,
                "conntracer_events_total",
                "Kernel events received, by kind.",
                &["kind"],
            )?,
            events_lost,
            tracked_connections: tracked,
            label_overflow: counter(
                &r,
                "conntracer_label_overflow_total",
                "Label values folded into \"other\" by the label caps.",
                &["label"],
            )?,
            table_evictions: evictions,
            decode_errors,
            build_info: gauge(
                &r,
                "conntracer_build_info",
                "Always 1; labels name the build.",
                &["version"],
            )?,
            peer_connections_open: gauge(
                &r,
                "conntracer_peer_connections_open",
                "Open connections by peer (namespace/pod of a known pod, else address): \
                 the load-imbalance view. Peers are capped like every peer label.",
                &["namespace", "pod", "role", "direction", "peer"],
            )?,
            chains_open: {
                let g = IntGauge::new(
                    "conntracer_sidecar_chains_open",
                    "Open app -> sidecar -> upstream chains the tracer has linked.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            table_reconciled: {
                let c = IntCounter::new(
                    "conntracer_table_reconciled_total",
                    "Connections removed from the table because the kernel no longer had them \
                     (their close event was missed, e.g. lost).",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            kube_pods: {
                let g = IntGauge::new(
                    "conntracer_kube_pods",
                    "Pods of this node known from the Kubernetes API.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            kube_errors: {
                let c = IntCounter::new(
                    "conntracer_kube_errors_total",
                    "Kubernetes API errors (the pod watch retries; known labels are kept).",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            cgroup_rescans: {
                let c = IntCounter::new(
                    "conntracer_cgroup_rescans_total",
                    "Walks of the cgroup v2 hierarchy to map new cgroup ids to paths.",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            proc_errors: {
                let c = IntCounter::new(
                    "conntracer_proc_errors_total",
                    "/proc entries (fd links, status, cgroup) that could not be parsed and were \
                     skipped.",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            forgotten_pods: {
                let c = IntCounter::new(
                    "conntracer_forgotten_pods_total",
                    "Deleted pods whose series were removed from the metrics (two grace periods \
                     after the deletion).",
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// Removes the counter and histogram series of a deleted pod: those
    /// whose `namespace` and `pod` labels name it, and those whose `peer` is
    /// it (`namespace/pod`). Gauges need nothing: every scrape rebuilds
    /// them from the open connections. Returns the series removed.
    pub fn forget_pod(&self, namespace: &str, pod: &str) -> usize {
        let peer = format!("{namespace}/{pod}");
        let belongs = |labels: &HashMap<String, String>| {
            let get = |name: &str| labels.get(name).map(String::as_str);
            (get("namespace") == Some(namespace) && get("pod") == Some(pod))
                || get("peer") == Some(peer.as_str())
        };
        forget_in(&self.idle_kills, &belongs)
            + forget_in(&self.idle_before_close, &belongs)
            + forget_in(&self.keepalive_sockopts, &belongs)
            + forget_in(&self.stale_reuse, &belongs)
            + forget_in(&self.sidecar_chain_kills, &belongs)
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        encode(&self.registry.gather())
    }
}

/// Removes the series of `vec` whose labels satisfy `belongs`.
fn forget_in<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    belongs: &dyn Fn(&HashMap<String, String>) -> bool,
) -> usize {
    let mut removed = 0;
    for family in prometheus::core::Collector::collect(vec) {
        for metric in family.get_metric() {
            let labels: HashMap<String, String> = metric
                .get_label()
                .iter()
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect();
            if belongs(&labels) {
                let by_name: HashMap<&str, &str> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                if vec.remove(&by_name).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    removed
}

/// Gathered metrics in the Prometheus text format.
pub fn encode(families: &[prometheus::proto::MetricFamily]) -> String {
    TextEncoder::new()
        .encode_to_string(families)
        .unwrap_or_else(|e| {
            log::error!("cannot encode metrics: {e}");
            String::new()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forget_pod_removes_its_series_and_those_naming_it_as_peer_only() {
        let m = Metrics::new().expect("metrics");
        let kill = |ns: &str, pod: &str, peer: &str| {
            m.idle_kills
                .with_label_values(&[ns, pod, "app", "app", "outbound", peer, "peer", "fin", "on"])
                .inc();
        };
        kill("shop", "cart-1", "db/redis-0");
        kill("shop", "cart-2", "db/redis-0");
        kill("shop", "cart-2", "shop/cart-1");
        m.idle_before_close
            .with_label_values(&["shop", "cart-1", "app", "app", "outbound", "peer"])
            .observe(3.0);
        m.sidecar_chain_kills
            .with_label_values(&["shop", "cart-1", "db/redis-0", "upstream", "off"])
            .inc();

        assert_eq!(m.forget_pod("shop", "cart-1"), 4);
        let text = m.render();
        assert!(!text.contains("cart-1"), "{text}");
        assert!(text.contains("pod=\"cart-2\""), "{text}");
        assert_eq!(m.forget_pod("shop", "cart-1"), 0, "nothing left");
        assert_eq!(m.forget_pod("other", "cart-2"), 0, "namespace must match");
    }
}
