//! The daemon's state: the tracker, and the metrics each of its outcomes
//! and, at scrape, its table feed.

use std::{collections::HashMap, time::SystemTime};

use tracer_common::EventInfo;

use super::{
    ChainKill, ChainPeer, CloseWait, ConnectFailure, ConnectionsOpen, EventKind, FindingKey,
    IdleBeforeClose, IdleKill, IndexKind, KeepaliveSockopt, LabelName, Metrics, Owner,
    PeerConnectionsOpen, PoolConnections, StaleReuse,
    labels::{LabelCap, Need},
};
use crate::{
    config::Config,
    event::{ConnEvent, EventData, names::sockopt_name},
    findings::{Fact, Finding, Findings, Pattern},
    owner::{
        attribute::{Attribution, Attributor, Role},
        procfs,
    },
    track::{
        Closed, Direction, MeshEnd, Outcome, Tracker,
        chains::{ChainEnd, Origin, PoolEnd},
        classify::{CloseKind, ClosedBy, StaleCause, Verdict},
    },
};

mod mesh;

/// The labels of a chain's or a pooled upstream connection's end.
fn kill_labels(
    (namespace, pod, peer): &(String, String, String),
    origin: Origin,
    upstream_keepalive: bool,
    idle: bool,
) -> ChainKill<'_> {
    ChainKill {
        namespace,
        pod,
        peer,
        origin: origin.as_str(),
        upstream_keepalive: on_off(upstream_keepalive),
        idle: if idle { "true" } else { "false" },
    }
}

/// A finding's evidence about the owner `attr`.
fn fact(pattern: Pattern, attr: &Attribution, direction: &str, peer: &str) -> Fact {
    let mut f = Fact::new(pattern, &attr.namespace, &attr.pod, peer);
    f.subject.role = attr.role.as_str().into();
    f.subject.direction = direction.into();
    f
}

/// Everything the event loop and the HTTP handlers share.
pub struct State {
    pub(crate) tracker: Tracker,
    pub(crate) metrics: Metrics,
    peers: LabelCap,
    sockopt_values: LabelCap,
    /// `conntracer_events_total` for open, close and sockopt.
    events_by_kind: [prometheus::IntCounter; 3],
    pub(crate) findings: Findings,
    /// `connection_imbalance`'s settings.
    imbalance_factor: f64,
    imbalance_min_age: std::time::Duration,
}

/// A pod's sidecar holding at least this many connections ...
const FANOUT_MIN: i64 = 50;
/// ... and this many times its app's is a connection fanout.
const FANOUT_FACTOR: i64 = 10;

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
            findings: Findings::new(cfg.findings_expiry, cfg.max_findings),
            imbalance_factor: cfg.imbalance_factor,
            imbalance_min_age: cfg.imbalance_min_age,
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
                    owner: Owner::of(&attr),
                    peer: &peer,
                    peer_state,
                    reason: reason.as_str(),
                });
                if peer_state == "deleted" {
                    let mut fact = fact(Pattern::StaleEndpoint, &attr, "outbound", &peer);
                    fact.detail
                        .insert("connect_failure".into(), reason.as_str().into());
                    self.findings.observe(fact, SystemTime::now());
                }
            }
            Outcome::Sockopt { attr, option } => {
                let value = option.value.to_string();
                let value = self.admit(Cap::SockoptValue, value, Need::Event, false);
                self.metrics.keepalive_sockopts.inc(&KeepaliveSockopt {
                    owner: Owner::of(&attr),
                    option: sockopt_name(option.level, option.optname),
                    value: &value,
                });
            }
        }
    }

    fn on_close(&mut self, c: &Closed) {
        match &c.mesh_end {
            Some(MeshEnd::Chain(end)) => self.on_chain_end(end),
            Some(MeshEnd::Pool(end)) => self.on_pool_end(end),
            None => {}
        }
        let (attr, dir, ending, verdict) = (&c.attr, c.dir, &c.ending, &c.verdict);
        let closed_by = ending.closed_by.as_str();
        // Counted at the peer's FIN already: only a failed send into the
        // half-closed connection (a stale reuse) is left to count.
        let verdict = &Verdict {
            idle_kill: verdict.idle_kill && !c.end_counted,
            ..*verdict
        };
        if let Some(idle) = ending.idle().filter(|_| !c.end_counted) {
            self.metrics.idle_before_close.observe(
                &IdleBeforeClose {
                    owner: Owner::of(attr),
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
                owner: Owner::of(attr),
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
                owner: Owner::of(attr),
                direction: dir.as_str(),
                peer: &peer,
                outcome: outcome.as_str(),
                cause: cause.as_str(),
            });
        }
        self.find_in_close(c, *verdict, &peer);
    }

    /// The findings evidence of a counted kill or stale reuse.
    fn find_in_close(&mut self, c: &Closed, verdict: Verdict, peer: &str) {
        let ending = &c.ending;
        // The peer is the server only for outbound connections: a client
        // that closes its own idle connection is no finding.
        let outbound = c.dir == Direction::Outbound;
        let (pattern, idle) = match verdict.stale_cause {
            // The server's idle timeout: the silence before its FIN.
            Some(StaleCause::PeerClosed) if outbound => {
                (Pattern::KeepaliveRace, ending.idle_at_end)
            }
            Some(StaleCause::Silence) => (Pattern::PathExpiry, ending.idle()),
            None if ending.close_kind == CloseKind::Timeout => {
                (Pattern::PathExpiry, ending.idle_at_end)
            }
            // An app leg's peer is its sidecar: the chain's end says whose
            // timeout it was (the upstream leg's kill, or the sidecar's).
            None if outbound
                && ending.closed_by == ClosedBy::Peer
                && !self.tracker.chains.is_app_leg(c.info.cookie) =>
            {
                (Pattern::ServerIdleTimeout, ending.idle_at_end)
            }
            _ => return,
        };
        let now = SystemTime::now();
        let mut f = fact(pattern, &c.attr, c.dir.as_str(), peer);
        f.idle = idle;
        f.detail.insert(
            "keepalive".into(),
            if ending.keepalive { "on" } else { "off" }.into(),
        );
        f.detail
            .insert("close_kind".into(), ending.close_kind.as_str().into());
        if let Some(o) = verdict.stale_reuse {
            f.detail.insert("stale_reuse".into(), o.as_str().into());
        }
        if self.tracker.peer_state(&c.info) == "deleted" {
            let mut gone = f.clone();
            gone.pattern = Pattern::StaleEndpoint;
            gone.idle = None;
            self.findings.observe(gone, now);
        }
        self.findings.observe(f, now);
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
        let r = self.tracker.resync(snapshot, started_ns);
        self.metrics.resyncs.inc();
        self.metrics.table_reconciled.inc_by(r.gone as u64);
        self.metrics.resync_not_added.inc_by(r.not_added as u64);
    }

    /// What the last resync (snapshot and reconciliation) took: wall and
    /// CPU time, in nanoseconds.
    #[expect(
        clippy::cast_precision_loss,
        reason = "durations in ns, far below 2^52"
    )]
    pub(crate) fn resync_took(&self, wall_ns: u64, cpu_ns: u64) {
        self.metrics.resync_duration.set(wall_ns as f64 / 1e9);
        self.metrics.resync_cpu.set(cpu_ns as f64 / 1e9);
    }

    /// `conntracer_connections_open`, `conntracer_peer_connections_open`
    /// and `conntracer_close_wait_connections` from the table's counts
    /// (kept as it changes: one entry per owner, direction, keepalive and
    /// remote end, not per connection) and its CLOSE_WAIT connections.
    fn open_gauges(&mut self) {
        let mut open: HashMap<(Attribution, Direction, bool), i64> = HashMap::new();
        let mut by_peer: HashMap<(String, String, Role, Direction, String), i64> = HashMap::new();
        let mut close_wait: HashMap<(Attribution, Direction), i64> = HashMap::new();
        let mut leaks: HashMap<(Attribution, Direction, String), u64> = HashMap::new();
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
                let peer = tracker.peer(&info, dir);
                *leaks.entry((a.clone(), dir, peer)).or_default() += 1;
                *close_wait.entry((a, dir)).or_default() += 1;
            }
        }
        let m = &self.metrics;
        m.close_wait.reset();
        for ((a, dir), n) in close_wait {
            m.close_wait.set(
                &CloseWait {
                    owner: Owner::of(&a),
                    direction: dir.as_str(),
                },
                n,
            );
        }
        self.state_findings(leaks, &open);
        let m = &self.metrics;
        m.connections_open.reset();
        m.peer_connections_open.reset();
        for ((a, dir, keepalive), n) in open {
            m.connections_open.set(
                &ConnectionsOpen {
                    owner: Owner::of(&a),
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

    /// The findings that are states, not events: CLOSE_WAIT leaks (per
    /// owner, direction and peer) and a sidecar holding many times its
    /// app's connections (`open`: the open connections by owner).
    fn state_findings(
        &mut self,
        leaks: HashMap<(Attribution, Direction, String), u64>,
        open: &HashMap<(Attribution, Direction, bool), i64>,
    ) {
        let at = SystemTime::now();
        for ((a, dir, peer), n) in leaks {
            let f = fact(Pattern::CloseWaitLeak, &a, dir.as_str(), &peer);
            self.findings.observe_state(f, n, at);
        }
        // Per pod: the sidecar's connections against its app's.
        let mut per_pod: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
        for ((a, _, _), n) in open {
            if a.pod.is_empty() {
                continue;
            }
            let e = per_pod.entry((&a.namespace, &a.pod)).or_default();
            if a.role == Role::Sidecar {
                e.0 += n;
            } else {
                e.1 += n;
            }
        }
        for ((namespace, pod), (sidecar, app)) in per_pod {
            if sidecar >= FANOUT_MIN && sidecar >= FANOUT_FACTOR * app.max(1) {
                let mut f = Fact::new(Pattern::SidecarConnectionFanout, namespace, pod, "");
                f.subject.role = "sidecar".into();
                f.detail
                    .insert("sidecar_connections".into(), sidecar.into());
                f.detail.insert("app_connections".into(), app.into());
                self.findings
                    .observe_state(f, u64::try_from(sidecar).unwrap_or(0), at);
            }
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
        let mut mismatched: HashMap<(String, String, String), u64> = HashMap::new();
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
                    *mismatched.entry((namespace, pod, peer)).or_default() += 1;
                }
            }
        }
        for (key, n) in self.pool_gauges() {
            *mismatched.entry(key).or_default() += n;
        }
        // Every open connection, chain and pool has claimed its peer now.
        self.peers.end_walk();
        let at = SystemTime::now();
        for ((namespace, pod, peer), n) in mismatched {
            let mut f = Fact::new(Pattern::SidecarKeepaliveMismatch, &namespace, &pod, &peer);
            f.subject.role = "sidecar".into();
            f.subject.direction = "outbound".into();
            f.detail.insert("app_keepalive".into(), "on".into());
            f.detail.insert("upstream_keepalive".into(), "off".into());
            self.findings.observe_state(f, n, at);
        }
        let now_ns = crate::event::clock::monotonic_ns();
        let imbalances = super::imbalance::findings(
            &mut self.tracker,
            self.imbalance_factor,
            self.imbalance_min_age,
            now_ns,
        );
        for (f, n) in imbalances {
            self.findings.observe_state(f, n, at);
        }
        self.metrics.findings.reset();
        for (pattern, namespace, pod, peer) in self.findings.keys(at) {
            self.metrics.findings.set(
                &FindingKey {
                    pattern: pattern.as_str(),
                    namespace: &namespace,
                    pod: &pod,
                    peer: &peer,
                },
                1,
            );
        }
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

impl State {
    /// The active findings, with the state patterns (leaks, mismatches,
    /// fanouts) brought up to date as a scrape would.
    pub(crate) fn findings(&mut self, lost_total: u64) -> Vec<Finding> {
        let _ = self.gather_metrics(lost_total);
        let tick = std::time::Duration::from_nanos(self.tracker.hz.get().ns(1));
        self.findings.list(SystemTime::now(), tick)
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
