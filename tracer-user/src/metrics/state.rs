//! The daemon's state: the tracker, and the metrics each of its outcomes
//! and, at scrape, its table feed.

use std::collections::HashMap;

use tracer_common::EventInfo;

use super::{
    ChainKill, ChainPeer, CloseWait, ConnectFailure, ConnectionsOpen, EventKind, IdleBeforeClose,
    IdleKill, IndexKind, KeepaliveSockopt, LabelName, Metrics, PeerConnectionsOpen, StaleReuse,
    labels::{LabelCap, Need},
};
use crate::{
    config::Config,
    event::{ConnEvent, EventData, names::sockopt_name},
    owner::{
        attribute::{Attribution, Attributor, Role},
        procfs,
    },
    track::{Closed, Direction, Outcome, Tracker, chains::ChainEnd},
};

/// Everything the event loop and the HTTP handlers share.
pub struct State {
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    peers: LabelCap,
    sockopt_values: LabelCap,
    /// `conntracer_events_total` for open, close and sockopt.
    events_by_kind: [prometheus::IntCounter; 3],
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

impl State {
    pub fn new(cfg: &Config, attr: Attributor) -> prometheus::Result<Self> {
        let metrics = Metrics::new()?;
        let events_by_kind =
            ["open", "close", "sockopt"].map(|kind| metrics.events.of(&EventKind { kind }));
        Ok(Self {
            tracker: Tracker::new(cfg, attr),
            metrics,
            peers: LabelCap::with_hold(cfg.max_peers, cfg.peer_hold),
            sockopt_values: LabelCap::new(cfg.max_sockopt_values),
            events_by_kind,
        })
    }

    /// Applies one kernel event.
    pub fn handle(&mut self, ev: &ConnEvent) {
        // The daemon's kinds have their counters at hand: this runs for
        // every event.
        match ev.data {
            EventData::Open(_) => self.events_by_kind[0].inc(),
            EventData::Close(_) => self.events_by_kind[1].inc(),
            EventData::Sockopt(_) => self.events_by_kind[2].inc(),
            _ => self.metrics.events.inc(&EventKind {
                kind: ev.kind_name(),
            }),
        }
        match self.tracker.handle(ev) {
            Outcome::Nothing => {}
            Outcome::Closed(closed) => self.on_close(&closed),
            Outcome::ConnectFailed { info, attr, reason } => {
                let peer = self.peer(&info, Direction::Outbound);
                let peer_state = self.tracker.peer_state(&info);
                log::debug!(
                    "connect failure: {} -> {peer} ({peer_state}) pid {}: {}",
                    info.sock.sport,
                    info.owner.pid,
                    reason.as_str()
                );
                self.metrics.connect_failures.inc(&ConnectFailure {
                    namespace: &attr.namespace,
                    pod: &attr.pod,
                    container: &attr.container,
                    role: attr.role.as_str(),
                    peer: &peer,
                    peer_state,
                    reason: reason.as_str(),
                });
            }
            Outcome::Sockopt { attr, option } => {
                let value = option.value.to_string();
                let value = self.admit(Cap::SockoptValue, value, Need::Event, false);
                self.metrics.keepalive_sockopts.inc(&KeepaliveSockopt {
                    namespace: &attr.namespace,
                    pod: &attr.pod,
                    container: &attr.container,
                    role: attr.role.as_str(),
                    option: sockopt_name(option.level, option.optname),
                    value: &value,
                });
            }
        }
    }

    fn on_close(&mut self, c: &Closed) {
        if let Some(end) = &c.chain_end {
            self.on_chain_end(end);
        }
        let (attr, dir, ending, verdict) = (&c.attr, c.dir, &c.ending, &c.verdict);
        let role = attr.role.as_str();
        let closed_by = ending.closed_by.as_str();
        // Counted at the peer's FIN already: only a failed send into the
        // half-closed connection (a stale reuse) is left to count.
        let verdict = &crate::track::classify::Verdict {
            idle_kill: verdict.idle_kill && !c.end_counted,
            ..*verdict
        };
        if let Some(idle) = ending.idle().filter(|_| !c.end_counted) {
            self.metrics.idle_before_close.observe(
                &IdleBeforeClose {
                    namespace: &attr.namespace,
                    pod: &attr.pod,
                    container: &attr.container,
                    role,
                    direction: dir.as_str(),
                    closed_by,
                },
                idle.as_secs_f64(),
            );
        }
        if !verdict.idle_kill && verdict.stale_reuse.is_none() {
            return;
        }
        let peer = self.peer(&c.info, dir);
        log::debug!(
            "{}: {} {} {} -> {} pid {} ({}) closed by {} {} after {:?} idle{}",
            if verdict.idle_kill {
                "idle kill"
            } else {
                "stale reuse"
            },
            dir.as_str(),
            c.info.cookie,
            c.info.sock.sport,
            peer,
            c.info.owner.pid,
            c.info.owner.comm_str(),
            closed_by,
            ending.close_kind.as_str(),
            ending.idle(),
            verdict
                .stale_reuse
                .map_or(String::new(), |o| format!(", stale reuse ({})", o.as_str())),
        );
        if verdict.idle_kill {
            self.metrics.idle_kills.inc(&IdleKill {
                namespace: &attr.namespace,
                pod: &attr.pod,
                container: &attr.container,
                role,
                direction: dir.as_str(),
                peer: &peer,
                peer_state: self.tracker.peer_state(&c.info),
                closed_by,
                close_kind: ending.close_kind.as_str(),
                keepalive: on_off(ending.keepalive),
            });
        }
        if let (Some(outcome), Some(cause)) = (verdict.stale_reuse, verdict.stale_cause) {
            self.metrics.stale_reuse.inc(&StaleReuse {
                namespace: &attr.namespace,
                pod: &attr.pod,
                container: &attr.container,
                role,
                direction: dir.as_str(),
                peer: &peer,
                outcome: outcome.as_str(),
                cause: cause.as_str(),
            });
        }
    }

    fn on_chain_end(&mut self, end: &ChainEnd) {
        let Some((namespace, pod, peer)) = self.chain_labels(&end.chain, Need::Event) else {
            return;
        };
        let idle = end.idle.is_some_and(|i| i >= self.tracker.threshold);
        log::debug!(
            "chain ended in {namespace}/{pod} to {peer}: origin {}, upstream keepalive {}, idle {:?}",
            end.origin.as_str(),
            end.upstream_keepalive,
            end.idle
        );
        self.metrics.sidecar_chain_kills.inc(&ChainKill {
            namespace: &namespace,
            pod: &pod,
            peer: &peer,
            origin: end.origin.as_str(),
            upstream_keepalive: on_off(end.upstream_keepalive),
            idle: if idle { "true" } else { "false" },
        });
    }

    /// The value to use for a capped label (overflow counted).
    fn admit(&mut self, cap: Cap, value: String, need: Need, inbound: bool) -> String {
        let (cap, label) = match cap {
            Cap::Peer => (&mut self.peers, "peer"),
            Cap::SockoptValue => (&mut self.sockopt_values, "value"),
        };
        admit(cap, &self.metrics, label, value, need, inbound)
    }

    /// The `peer` label of a connection an event is about, capped.
    fn peer(&mut self, info: &EventInfo, dir: Direction) -> String {
        let peer = self.tracker.peer(info, dir);
        self.admit(Cap::Peer, peer, Need::Event, dir == Direction::Inbound)
    }

    /// (namespace, pod, peer) of a chain, the peer capped.
    fn chain_labels(
        &mut self,
        chain: &crate::track::chains::Chain,
        need: Need,
    ) -> Option<(String, String, String)> {
        let (namespace, pod, peer) = self.tracker.chain_labels(chain)?;
        let inbound = chain.direction == Direction::Inbound;
        Some((namespace, pod, self.admit(Cap::Peer, peer, need, inbound)))
    }

    /// Removes the series of pods deleted two grace periods ago (see
    /// [`crate::owner::kube::PodIndex::take_forgotten`]) and frees their
    /// places in the `peer` label cap.
    pub(crate) fn forget_deleted_pods(&mut self, now: std::time::Instant) {
        let Some(pods) = self.tracker.attr.pods() else {
            return;
        };
        for (namespace, pod) in pods.take_forgotten(now) {
            let removed = self.metrics.forget_pod(&namespace, &pod);
            self.peers.forget(&format!("{namespace}/{pod}"));
            self.metrics.forgotten_pods.inc();
            log::debug!("pod {namespace}/{pod} deleted: {removed} series removed");
        }
    }

    /// [`Tracker::resync`], counted.
    pub(crate) fn resync(&mut self, snapshot: &[ConnEvent], started_ns: u64) {
        let gone = self.tracker.resync(snapshot, started_ns);
        self.metrics.table_reconciled.inc_by(gone as u64);
    }

    /// `conntracer_connections_open`, `conntracer_peer_connections_open`
    /// and `conntracer_close_wait_connections` from the table's counts
    /// (kept as it changes: one entry per owner, direction, keepalive and
    /// remote end, not per connection) and its CLOSE_WAIT connections.
    fn open_gauges(&mut self) {
        let mut open: HashMap<(Attribution, Direction, bool), i64> = HashMap::new();
        let mut by_peer: HashMap<(String, String, Role, Direction, String), i64> = HashMap::new();
        let mut close_wait: HashMap<(Attribution, Direction), i64> = HashMap::new();
        let now = crate::event::clock::monotonic_ns();
        let after = u64::try_from(self.tracker.close_wait_threshold.as_nanos()).unwrap_or(u64::MAX);
        {
            let Self {
                tracker,
                peers,
                metrics,
                ..
            } = self;
            let counts: Vec<_> = tracker.table.open_counts().map(|(k, n)| (*k, n)).collect();
            for (k, n) in counts {
                let peer = tracker.peer_of(k.remote, k.remote_port, k.dir);
                let inbound = k.dir == Direction::Inbound;
                let peer = admit(peers, metrics, "peer", peer, Need::Open, inbound);
                let a = tracker.attr.attribute(&k.owner);
                *by_peer
                    .entry((a.namespace.clone(), a.pod.clone(), a.role, k.dir, peer))
                    .or_default() += n;
                *open.entry((a, k.dir, k.keepalive)).or_default() += n;
            }
            let waiting: Vec<_> = tracker
                .table
                .peer_closed()
                .filter(|c| now.saturating_sub(c.peer_closed_ns) >= after)
                .map(|c| c.info)
                .collect();
            for info in waiting {
                let dir = tracker.direction(&info);
                let a = tracker.attr.attribute(&info.owner);
                *close_wait.entry((a, dir)).or_default() += 1;
            }
        }
        let m = &self.metrics;
        m.close_wait.reset();
        for ((a, dir), n) in close_wait {
            m.close_wait.set(
                &CloseWait {
                    namespace: &a.namespace,
                    pod: &a.pod,
                    container: &a.container,
                    role: a.role.as_str(),
                    direction: dir.as_str(),
                },
                n,
            );
        }
        m.connections_open.reset();
        m.peer_connections_open.reset();
        for ((a, dir, keepalive), n) in open {
            m.connections_open.set(
                &ConnectionsOpen {
                    namespace: &a.namespace,
                    pod: &a.pod,
                    container: &a.container,
                    role: a.role.as_str(),
                    direction: dir.as_str(),
                    keepalive: on_off(keepalive),
                },
                n,
            );
        }
        for ((namespace, pod, role, dir, peer), n) in by_peer {
            m.peer_connections_open.set(
                &PeerConnectionsOpen {
                    namespace: &namespace,
                    pod: &pod,
                    role: role.as_str(),
                    direction: dir.as_str(),
                    peer: &peer,
                },
                n,
            );
        }
    }

    /// The metrics text, with the gauges brought up to date.
    pub fn render_metrics(&mut self, lost_total: u64) -> String {
        super::encode(&self.gather_metrics(lost_total))
    }

    /// Brings the gauges up to date and takes a copy of every metric: the
    /// part of a scrape that needs the state. Encoding the copy as text
    /// ([`super::encode`]) does not, so concurrent scrapes encode in
    /// parallel outside the state lock.
    pub(crate) fn gather_metrics(
        &mut self,
        lost_total: u64,
    ) -> Vec<prometheus::proto::MetricFamily> {
        let m = &self.metrics;
        catch_up(&m.events_lost, lost_total);
        catch_up(&m.table_evictions, self.tracker.table.evicted);
        m.tracked_connections
            .set(i64::try_from(self.tracker.table.len()).unwrap_or(i64::MAX));
        self.open_gauges();
        // Open chains whose app leg has keepalive and whose upstream leg has not.
        self.metrics.sidecar_keepalive_mismatch.reset();
        let chains: Vec<_> = self
            .tracker
            .chains
            .iter()
            .filter(|c| c.direction == Direction::Outbound)
            .cloned()
            .collect();
        for chain in &chains {
            let table = &self.tracker.table;
            let (Some(app), Some(up)) = (
                table.get(chain.app),
                chain.sidecar_net_side.and_then(|c| table.get(c)),
            ) else {
                continue;
            };
            let mismatch = app.ka.enabled != 0 && up.ka.enabled == 0;
            if let Some((namespace, pod, peer)) = self.chain_labels(chain, Need::Open) {
                let g = self.metrics.sidecar_keepalive_mismatch.of(&ChainPeer {
                    namespace: &namespace,
                    pod: &pod,
                    peer: &peer,
                });
                if mismatch {
                    g.inc();
                }
            }
        }
        // Every open connection and chain has claimed its peer now.
        self.peers.end_walk();
        let m = &self.metrics;
        m.chains_open
            .set(i64::try_from(self.tracker.chains.len()).unwrap_or(i64::MAX));
        m.chains_pending
            .set(i64::try_from(self.tracker.chains.pending()).unwrap_or(i64::MAX));
        catch_up(&m.chain_pending_evicted, self.tracker.chains.evicted);
        if let Some(pods) = self.tracker.attr.pods() {
            m.kube_pods
                .set(i64::try_from(pods.pods()).unwrap_or(i64::MAX));
            let services = self.tracker.attr.services();
            catch_up(&m.kube_errors, pods.errors() + services.errors());
            let size = services.size();
            let entries = [
                ("service_ports", size.service_ports),
                ("endpoints", size.endpoints),
                ("deleted_pods", size.deleted),
                ("refused_endpoints", size.refused),
            ];
            for (kind, n) in entries {
                m.kube_index
                    .set(&IndexKind { kind }, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        catch_up(&m.proc_errors, procfs::malformed_total());
        catch_up(&m.cgroup_rescans, self.tracker.attr.cgroup_rescans());
        m.registry.gather()
    }
}

/// The labels whose values are capped.
#[derive(Clone, Copy)]
enum Cap {
    Peer,
    SockoptValue,
}

/// `value` through `cap`; a value folded into "other" counts in
/// `conntracer_label_overflow_total{label}`, and the series of a value
/// whose place it took are removed.
fn admit(
    cap: &mut LabelCap,
    metrics: &Metrics,
    label: &str,
    value: String,
    need: Need,
    inbound: bool,
) -> String {
    let before = cap.overflowed;
    let value = cap.admit_for(value, need, inbound, std::time::Instant::now());
    if cap.overflowed > before {
        metrics.label_overflow.inc(&LabelName { label });
    }
    for gone in cap.take_evicted() {
        let removed = metrics.forget_label(label, &gone);
        log::debug!("{label}={gone:?} gave its place to {value:?}: {removed} series removed");
    }
    value
}

/// Raises a counter that mirrors a total kept elsewhere to that total.
fn catch_up(counter: &prometheus::IntCounter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}
