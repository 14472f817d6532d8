//! `conn-tracer run`: the daemon. Kernel events -> connection table and
//! classification -> Prometheus metrics, `/healthz` and `/connections`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    ops::RangeInclusive,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracer_common::{CloseData, EventInfo, Owner, SockoptData, owner_flags, tcp_state};

use crate::{
    chains::{self, CapturePorts, Chain, ChainEnd, Chains, Leg, LegEnd},
    classify::{self, KeepaliveView},
    clock::{WallClock, monotonic_ns},
    config::Config,
    event::{ConnEvent, EventData, comm_str, decode, owner_kind, sockopt_name, state_name},
    jiffies::{Hz, HzTracker, elapsed, later},
    kernel::{Kernel, KernelOptions},
    kube::{KubeSource, PodIndex},
    labels::{self, Attribution, Attributor, Direction, LabelCap, Role, SidecarRules},
    metrics::Metrics,
    table::{Conn, ConnTable},
    trace::readable,
};

/// Everything the event loop and the HTTP handlers share.
pub struct State {
    pub threshold: Duration,
    pub table: ConnTable,
    pub metrics: Metrics,
    peers: LabelCap,
    sockopt_values: LabelCap,
    pub hz: HzTracker,
    ephemeral: RangeInclusive<u16>,
    pub attr: Attributor,
    pub chains: Chains,
    /// Owners of listening sockets by (netns, port), for the connections
    /// they accept when the kernel had no owner for the listener.
    listener_owners: HashMap<(u32, u16), Owner>,
    /// `conntracer_events_total` for open, close and sockopt.
    events_by_kind: [prometheus::IntCounter; 3],
}

impl State {
    pub fn new(cfg: &Config, attr: Attributor) -> prometheus::Result<Self> {
        let metrics = Metrics::new()?;
        let events_by_kind =
            ["open", "close", "sockopt"].map(|kind| metrics.events.with_label_values(&[kind]));
        Ok(Self {
            listener_owners: HashMap::new(),
            events_by_kind,
            attr,
            chains: Chains::new(
                CapturePorts {
                    outbound: cfg.outbound_capture_port,
                    inbound: cfg.inbound_capture_port,
                },
                cfg.max_connections,
            ),
            threshold: cfg.idle_threshold,
            table: ConnTable::new(cfg.max_connections),
            metrics,
            peers: LabelCap::new(cfg.max_peers),
            sockopt_values: LabelCap::new(cfg.max_sockopt_values),
            hz: HzTracker::new(cfg.kernel_hz),
            ephemeral: labels::ephemeral_ports(),
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
            _ => self
                .metrics
                .events
                .with_label_values(&[ev.kind_name()])
                .inc(),
        }
        match ev.data {
            EventData::Open(o) => {
                self.hz.observe(o.jiffies, ev.info.ts_ns);
                let hz = self.hz.get().0;
                let mut info = ev.info;
                if info.owner.flags & owner_flags::KNOWN == 0
                    && let Some(owner) = self.listener_owners.get(&(info.netns, info.sock.sport))
                {
                    // Accepted from a listener older than the daemon.
                    info.owner = *owner;
                    info.owner.flags |= owner_flags::INHERITED;
                }
                self.table.insert(Conn {
                    info,
                    seen_ns: ev.info.ts_ns,
                    opened: true,
                    ka: o.ka,
                    hz,
                });
                let leg = self.leg(&info);
                self.chains.on_open(leg);
            }
            EventData::Close(c) => self.on_close(&ev.info, &c),
            EventData::Sockopt(o) => self.on_sockopt(&ev.info, &o),
            _ => {}
        }
    }

    fn on_close(&mut self, info: &EventInfo, c: &CloseData) {
        self.hz.observe(c.jiffies, info.ts_ns);
        let hz = self.hz.get();
        // The table's copy has the addresses and owner as they were at open.
        let known = self.table.remove(info.cookie).map(|conn| conn.info);
        let mut at_open = known.unwrap_or(*info);
        if at_open.owner.flags & owner_flags::KNOWN == 0 {
            at_open.owner = info.owner;
        }
        let ending = classify::ending(c, info.ts_ns, hz);
        let verdict = classify::verdict(&ending, self.threshold);
        let attr = self.attr.attribute(&at_open.owner);
        let dir = labels::direction(&at_open.owner, at_open.sock.sport, &self.ephemeral);
        let leg_end = LegEnd {
            end_ns: c.end_ns,
            closed_by: ending.closed_by,
            close_kind: ending.close_kind,
            keepalive: ending.keepalive,
        };
        if let Some(end) = self.chains.on_close(info.cookie, leg_end) {
            self.on_chain_end(&end);
        }
        let role = attr.role.as_str();
        let closed_by = ending.closed_by.as_str();
        if let Some(idle) = ending.idle() {
            self.metrics
                .idle_before_close
                .with_label_values(&[
                    attr.namespace.as_str(),
                    attr.pod.as_str(),
                    attr.container.as_str(),
                    role,
                    dir.as_str(),
                    closed_by,
                ])
                .observe(idle.as_secs_f64());
        }
        if !verdict.idle_kill && verdict.stale_reuse.is_none() {
            return;
        }
        let peer = self.peer(&at_open, dir);
        log::debug!(
            "{}: {} {} {} -> {} pid {} ({}) closed by {} {} after {:?} idle{}",
            if verdict.idle_kill {
                "idle kill"
            } else {
                "stale reuse"
            },
            dir.as_str(),
            at_open.cookie,
            at_open.sock.sport,
            peer,
            at_open.owner.pid,
            comm_str(&at_open.owner.comm),
            closed_by,
            ending.close_kind.as_str(),
            ending.idle(),
            verdict
                .stale_reuse
                .map_or(String::new(), |o| format!(", stale reuse ({})", o.as_str())),
        );
        if verdict.idle_kill {
            let keepalive = if ending.keepalive { "on" } else { "off" };
            self.metrics
                .idle_kills
                .with_label_values(&[
                    attr.namespace.as_str(),
                    attr.pod.as_str(),
                    attr.container.as_str(),
                    role,
                    dir.as_str(),
                    peer.as_str(),
                    closed_by,
                    ending.close_kind.as_str(),
                    keepalive,
                ])
                .inc();
        }
        if let (Some(outcome), Some(cause)) = (verdict.stale_reuse, verdict.stale_cause) {
            self.metrics
                .stale_reuse
                .with_label_values(&[
                    attr.namespace.as_str(),
                    attr.pod.as_str(),
                    attr.container.as_str(),
                    role,
                    dir.as_str(),
                    peer.as_str(),
                    outcome.as_str(),
                    cause.as_str(),
                ])
                .inc();
        }
    }

    fn peer(&mut self, info: &EventInfo, dir: Direction) -> String {
        capped_peer(&self.attr, &mut self.peers, &self.metrics, info, dir)
    }

    /// The legs of the chain `cookie` belongs to, if any.
    fn chain_view(&self, cookie: u64) -> Vec<ChainLegView> {
        let Some(chain) = self.chains.chain_of(cookie) else {
            return Vec::new();
        };
        let legs = [
            (Some(chain.app), "app"),
            (chain.sidecar_app_side, "sidecar-app-side"),
            (chain.sidecar_net_side, "sidecar-upstream"),
        ];
        legs.iter()
            .filter_map(|(c, name)| {
                let c = (*c)?;
                let info = self.table.get(c)?.info;
                let ev = ConnEvent {
                    info,
                    data: EventData::ResetReceived,
                };
                let addr = |ip: Option<IpAddr>, port| {
                    ip.map_or_else(|| format!("?:{port}"), |ip| labels::endpoint(ip, port))
                };
                Some(ChainLegView {
                    cookie: c,
                    leg: (*name).to_string(),
                    local: addr(ev.local(), info.sock.sport),
                    remote: addr(ev.remote(), info.sock.dport),
                })
            })
            .collect()
    }

    /// What the chain tracker needs of a connection.
    fn leg(&mut self, info: &EventInfo) -> Leg {
        let attr = self.attr.attribute(&info.owner);
        let ev = ConnEvent {
            info: *info,
            data: EventData::ResetReceived,
        };
        let unspecified = IpAddr::from([0, 0, 0, 0]);
        Leg {
            cookie: info.cookie,
            netns: info.netns,
            pod_uid: attr.pod_uid,
            role: attr.role,
            inbound: labels::direction(&info.owner, info.sock.sport, &self.ephemeral)
                == Direction::Inbound,
            local: (ev.local().unwrap_or(unspecified), info.sock.sport),
            remote: (ev.remote().unwrap_or(unspecified), info.sock.dport),
            owner: info.owner,
        }
    }

    fn on_chain_end(&mut self, end: &ChainEnd) {
        let Some((namespace, pod, peer)) = self.chain_labels(&end.chain) else {
            return;
        };
        log::debug!(
            "chain ended in {namespace}/{pod} to {peer}: origin {}, upstream keepalive {}",
            end.origin.as_str(),
            end.upstream_keepalive
        );
        self.metrics
            .sidecar_chain_kills
            .with_label_values(&[
                namespace.as_str(),
                pod.as_str(),
                peer.as_str(),
                end.origin.as_str(),
                if end.upstream_keepalive { "on" } else { "off" },
            ])
            .inc();
    }

    /// (namespace, pod, peer) of a chain: the app's pod and the far end.
    fn chain_labels(&mut self, chain: &Chain) -> Option<(String, String, String)> {
        let attr = self.attr.attribute(&chain.app_owner);
        if attr.pod_uid.is_empty() {
            return None;
        }
        let dir = match chain.direction {
            chains::Direction::Outbound => Direction::Outbound,
            chains::Direction::Inbound => Direction::Inbound,
        };
        let label = self
            .attr
            .peer_pod(chain.peer.0)
            .unwrap_or_else(|| labels::peer_label(chain.peer.0, chain.peer.1, dir));
        let before = self.peers.overflowed;
        let label = self.peers.admit(label);
        if self.peers.overflowed > before {
            self.metrics
                .label_overflow
                .with_label_values(&["peer"])
                .inc();
        }
        Some((attr.namespace, attr.pod, label))
    }

    fn on_sockopt(&mut self, info: &EventInfo, o: &SockoptData) {
        if info.cookie != 0 {
            self.table.apply_sockopt(info.cookie, o);
        }
        let attr = self.attr.attribute(&info.owner);
        let before = self.sockopt_values.overflowed;
        let value = self.sockopt_values.admit(o.value.to_string());
        if self.sockopt_values.overflowed > before {
            self.metrics
                .label_overflow
                .with_label_values(&["value"])
                .inc();
        }
        self.metrics
            .keepalive_sockopts
            .with_label_values(&[
                attr.namespace.as_str(),
                attr.pod.as_str(),
                attr.container.as_str(),
                attr.role.as_str(),
                sockopt_name(o.level, o.optname),
                value.as_str(),
            ])
            .inc();
    }

    /// Removes the series of pods deleted two grace periods ago (see
    /// [`crate::kube::PodIndex::take_forgotten`]) and frees their places in
    /// the `peer` label cap.
    pub fn forget_deleted_pods(&mut self, now: std::time::Instant) {
        let Some(pods) = self.attr.pods() else {
            return;
        };
        for (namespace, pod) in pods.take_forgotten(now) {
            let removed = self.metrics.forget_pod(&namespace, &pod);
            self.peers.forget(&format!("{namespace}/{pod}"));
            self.metrics.forgotten_pods.inc();
            log::debug!("pod {namespace}/{pod} deleted: {removed} series removed");
        }
    }

    /// Reconciles the daemon with the kernel's sockets (a fresh snapshot of
    /// every namespace, taken starting at `started_ns`):
    /// - connections the table lacks (opened before the daemon, or dropped
    ///   from a full table) are added, with their owner found in /proc;
    /// - listeners' owners are remembered, so that connections they accept
    ///   get an owner even when the listener predates the daemon;
    /// - table entries whose socket is gone (a close the daemon missed, e.g.
    ///   a lost event) are removed and counted.
    pub fn resync(&mut self, snapshot: &[ConnEvent], started_ns: u64) {
        let mut wanted = std::collections::HashSet::new();
        for ev in snapshot {
            if let EventData::Snapshot(s) = ev.data {
                self.hz.observe(s.jiffies, ev.info.ts_ns);
                let known = ev.info.owner.flags & owner_flags::KNOWN != 0
                    || self
                        .table
                        .get(ev.info.cookie)
                        .is_some_and(|c| c.info.owner.flags & owner_flags::KNOWN != 0);
                if !known && s.ino != 0 {
                    wanted.insert(s.ino);
                }
            }
        }
        let mount = crate::cgroup::cgroup2_mount().ok().flatten();
        let owners = crate::procfs::socket_owners(
            &wanted,
            mount.as_deref(),
            crate::procfs::ScanBudget::default(),
        );
        let owner_of = |ev: &ConnEvent, s: &tracer_common::SnapshotData| -> Owner {
            if ev.info.owner.flags & owner_flags::KNOWN != 0 {
                ev.info.owner
            } else {
                owners.get(&s.ino).copied().unwrap_or(ev.info.owner)
            }
        };
        self.listener_owners.clear();
        for ev in snapshot {
            if let EventData::Snapshot(s) = ev.data
                && ev.info.sock.state == tcp_state::LISTEN
            {
                self.listener_owners
                    .insert((ev.info.netns, ev.info.sock.sport), owner_of(ev, &s));
            }
        }
        let mut alive = std::collections::HashSet::new();
        for ev in snapshot {
            let EventData::Snapshot(s) = ev.data else {
                continue;
            };
            if ev.info.sock.state == tcp_state::LISTEN {
                continue;
            }
            alive.insert(ev.info.cookie);
            let mut owner = owner_of(ev, &s);
            if self
                .listener_owners
                .contains_key(&(ev.info.netns, ev.info.sock.sport))
            {
                owner.flags |= owner_flags::INHERITED;
            }
            if let Some(c) = self.table.get_mut(ev.info.cookie) {
                if c.info.owner.flags & owner_flags::KNOWN == 0 {
                    c.info.owner = owner;
                }
                continue;
            }
            let hz = self.hz.get().0;
            let mut info = ev.info;
            info.owner = owner;
            self.table.insert(Conn {
                info,
                seen_ns: ev.info.ts_ns,
                opened: false,
                ka: s.ka,
                hz,
            });
        }
        let gone: Vec<u64> = self
            .table
            .iter()
            .filter(|c| c.seen_ns < started_ns && !alive.contains(&c.info.cookie))
            .map(|c| c.info.cookie)
            .collect();
        for cookie in &gone {
            self.table.remove(*cookie);
        }
        if !gone.is_empty() {
            log::debug!(
                "resync: {} connections were gone without a close event",
                gone.len()
            );
        }
        self.metrics.table_reconciled.inc_by(gone.len() as u64);
        log::debug!(
            "resync: {} sockets, {} owners found in /proc, {} listeners",
            snapshot.len(),
            owners.len(),
            self.listener_owners.len()
        );
    }

    /// `conntracer_connections_open` and `conntracer_peer_connections_open`
    /// from the table.
    fn open_gauges(&mut self) {
        // Counted per label set first: one gauge update per set, not per
        // connection, and no copy of the table (100k connections and more).
        let mut open: HashMap<(Attribution, Direction, bool), i64> = HashMap::new();
        let mut by_peer: HashMap<(String, String, Role, Direction, String), i64> = HashMap::new();
        {
            let Self {
                table,
                attr,
                peers,
                metrics,
                ephemeral,
                ..
            } = self;
            for c in table.iter() {
                let a = attr.attribute(&c.info.owner);
                let dir = labels::direction(&c.info.owner, c.info.sock.sport, ephemeral);
                let peer = capped_peer(attr, peers, metrics, &c.info, dir);
                *by_peer
                    .entry((a.namespace.clone(), a.pod.clone(), a.role, dir, peer))
                    .or_default() += 1;
                *open.entry((a, dir, c.ka.enabled != 0)).or_default() += 1;
            }
        }
        let m = &self.metrics;
        m.connections_open.reset();
        m.peer_connections_open.reset();
        for ((a, dir, keepalive), n) in open {
            m.connections_open
                .with_label_values(&[
                    a.namespace.as_str(),
                    a.pod.as_str(),
                    a.container.as_str(),
                    a.role.as_str(),
                    dir.as_str(),
                    if keepalive { "on" } else { "off" },
                ])
                .set(n);
        }
        for ((namespace, pod, role, dir, peer), n) in by_peer {
            m.peer_connections_open
                .with_label_values(&[
                    namespace.as_str(),
                    pod.as_str(),
                    role.as_str(),
                    dir.as_str(),
                    peer.as_str(),
                ])
                .set(n);
        }
    }

    /// The metrics text, with the gauges brought up to date.
    pub fn render_metrics(&mut self, lost_total: u64) -> String {
        crate::metrics::encode(&self.gather_metrics(lost_total))
    }

    /// Brings the gauges up to date and takes a copy of every metric: the
    /// part of a scrape that needs the state. Encoding the copy as text
    /// ([`crate::metrics::encode`]) does not, so concurrent scrapes encode
    /// in parallel outside the state lock.
    pub fn gather_metrics(&mut self, lost_total: u64) -> Vec<prometheus::proto::MetricFamily> {
        let m = &self.metrics;
        let lost_now = m.events_lost.get();
        if lost_total > lost_now {
            m.events_lost.inc_by(lost_total - lost_now);
        }
        let evicted = m.table_evictions.get();
        if self.table.evicted > evicted {
            m.table_evictions.inc_by(self.table.evicted - evicted);
        }
        m.tracked_connections
            .set(i64::try_from(self.table.len()).unwrap_or(i64::MAX));
        self.open_gauges();
        // Open chains whose app leg has keepalive and whose upstream leg has not.
        self.metrics.sidecar_keepalive_mismatch.reset();
        let chains: Vec<Chain> = self
            .chains
            .iter()
            .filter(|c| c.direction == chains::Direction::Outbound)
            .cloned()
            .collect();
        for chain in &chains {
            let (Some(app), Some(up)) = (
                self.table.get(chain.app),
                chain.sidecar_net_side.and_then(|c| self.table.get(c)),
            ) else {
                continue;
            };
            let mismatch = app.ka.enabled != 0 && up.ka.enabled == 0;
            if let Some((namespace, pod, peer)) = self.chain_labels(chain) {
                let g = self.metrics.sidecar_keepalive_mismatch.with_label_values(&[
                    namespace.as_str(),
                    pod.as_str(),
                    peer.as_str(),
                ]);
                if mismatch {
                    g.inc();
                }
            }
        }
        self.metrics
            .chains_open
            .set(i64::try_from(self.chains.len()).unwrap_or(i64::MAX));
        if let Some(pods) = self.attr.pods() {
            self.metrics
                .kube_pods
                .set(i64::try_from(pods.pods()).unwrap_or(i64::MAX));
            let seen = self.metrics.kube_errors.get();
            if pods.errors() > seen {
                self.metrics.kube_errors.inc_by(pods.errors() - seen);
            }
        }
        let proc_errors = crate::procfs::malformed_total();
        if proc_errors > self.metrics.proc_errors.get() {
            self.metrics
                .proc_errors
                .inc_by(proc_errors - self.metrics.proc_errors.get());
        }
        let rescans = self.attr.cgroup_rescans();
        if rescans > self.metrics.cgroup_rescans.get() {
            self.metrics
                .cgroup_rescans
                .inc_by(rescans - self.metrics.cgroup_rescans.get());
        }
        self.metrics.registry.gather()
    }

    /// The tracked connections, merged with a fresh kernel snapshot (live
    /// state, keepalive, idle time and bytes).
    pub fn connections(
        &mut self,
        snapshot: &[ConnEvent],
        hz: Hz,
        clock: &WallClock,
    ) -> Vec<ConnView> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let listening = listeners(snapshot);
        for ev in snapshot {
            let EventData::Snapshot(s) = ev.data else {
                continue;
            };
            if ev.info.sock.state == tcp_state::LISTEN {
                continue;
            }
            seen.insert(ev.info.cookie);
            let tracked = self.table.get(ev.info.cookie).cloned();
            let mut info = tracked
                .as_ref()
                .map_or_else(|| with_direction_hint(ev.info, &listening), |c| c.info);
            info.sock.state = ev.info.sock.state;
            let mut v = self.view(
                &info,
                tracked.as_ref(),
                &KeepaliveView::new(&s.ka, hz),
                now,
                clock,
            );
            let j = s.jiffies as u32;
            v.idle_s = Some(hz.secs(elapsed(j, later(s.last_send_j, s.last_recv_j))));
            v.bytes_received = Some(s.bytes_received);
            v.bytes_acked = Some(s.bytes_acked);
            out.push(v);
        }
        let rest: Vec<Conn> = self
            .table
            .iter()
            .filter(|c| !seen.contains(&c.info.cookie))
            .cloned()
            .collect();
        for c in &rest {
            out.push(self.view(&c.info, Some(c), &KeepaliveView::new(&c.ka, hz), now, clock));
        }
        out.sort_by(|a, b| {
            (&a.namespace, &a.pod, a.pid, a.cookie).cmp(&(&b.namespace, &b.pod, b.pid, b.cookie))
        });
        out
    }

    fn view(
        &mut self,
        info: &EventInfo,
        tracked: Option<&Conn>,
        ka: &KeepaliveView,
        now: u64,
        clock: &WallClock,
    ) -> ConnView {
        let ev = ConnEvent {
            info: *info,
            data: EventData::ResetReceived,
        };
        let Attribution {
            namespace,
            pod,
            container,
            role,
            ..
        } = self.attr.attribute(&info.owner);
        let chain = self.chain_view(info.cookie);
        let addr = |ip: Option<IpAddr>, port| {
            ip.map_or_else(|| format!("?:{port}"), |ip| labels::endpoint(ip, port))
        };
        ConnView {
            cookie: info.cookie,
            state: state_name(info.sock.state).to_string(),
            direction: labels::direction(&info.owner, info.sock.sport, &self.ephemeral)
                .as_str()
                .to_string(),
            role: role.as_str().to_string(),
            namespace,
            pod,
            container,
            local: addr(ev.local(), info.sock.sport),
            remote: addr(ev.remote(), info.sock.dport),
            netns: info.netns,
            owner: owner_kind(&info.owner).to_string(),
            pid: info.owner.pid,
            comm: comm_str(&info.owner.comm),
            uid: info.owner.uid,
            cgroup_id: info.owner.cgroup_id,
            keepalive: *ka,
            idle_s: None,
            bytes_received: None,
            bytes_acked: None,
            tracked: tracked.is_some(),
            chain,
            opened_at: tracked
                .filter(|c| c.opened)
                .map(|c| clock.rfc3339(c.seen_ns)),
            age_s: tracked
                .filter(|c| c.opened)
                .map(|c| Duration::from_nanos(now.saturating_sub(c.seen_ns)).as_secs_f64()),
        }
    }
}

/// The `peer` label of a connection, capped (overflow counted).
fn capped_peer(
    attr: &Attributor,
    peers: &mut LabelCap,
    metrics: &Metrics,
    info: &EventInfo,
    dir: Direction,
) -> String {
    let remote = ConnEvent {
        info: *info,
        data: EventData::ResetReceived,
    }
    .remote()
    .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let label = attr
        .peer_pod(remote)
        .unwrap_or_else(|| labels::peer_label(remote, info.sock.dport, dir));
    let before = peers.overflowed;
    let label = peers.admit(label);
    if peers.overflowed > before {
        metrics.label_overflow.with_label_values(&["peer"]).inc();
    }
    label
}

/// (netns, local port) of every listening socket in a snapshot.
fn listeners(snapshot: &[ConnEvent]) -> std::collections::HashSet<(u32, u16)> {
    snapshot
        .iter()
        .filter(|ev| ev.info.sock.state == tcp_state::LISTEN)
        .map(|ev| (ev.info.netns, ev.info.sock.sport))
        .collect()
}

/// A connection of unknown owner whose local port is a listener's in its
/// namespace was accepted: mark it so (as an inherited owner would be).
fn with_direction_hint(
    mut info: EventInfo,
    listening: &std::collections::HashSet<(u32, u16)>,
) -> EventInfo {
    if info.owner.flags & owner_flags::KNOWN == 0
        && listening.contains(&(info.netns, info.sock.sport))
    {
        info.owner.flags |= owner_flags::INHERITED;
    }
    info
}

/// One connection as `/connections` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnView {
    pub cookie: u64,
    pub state: String,
    pub direction: String,
    pub role: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub local: String,
    pub remote: String,
    pub netns: u32,
    /// known | inherited | unknown (opened before the tracer).
    pub owner: String,
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub keepalive: KeepaliveView,
    /// Seconds since the last payload either way (live).
    pub idle_s: Option<f64>,
    pub bytes_received: Option<u64>,
    pub bytes_acked: Option<u64>,
    /// In the daemon's table (false: seen only by the live snapshot).
    pub tracked: bool,
    /// For a socket of an app -> sidecar -> upstream chain, all its legs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<ChainLegView>,
    pub opened_at: Option<String>,
    pub age_s: Option<f64>,
}

/// One leg of a chain, as `/connections` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLegView {
    pub cookie: u64,
    /// `app`, `sidecar-app-side` (the sidecar's socket facing the app) or
    /// `sidecar-upstream` (its socket facing the network).
    pub leg: String,
    pub local: String,
    pub remote: String,
}

/// Pod attribution as configured: the cgroup v2 hierarchy for pod and
/// container IDs, and (unless disabled) a pod watch for their names.
fn attributor(cfg: &Config) -> Attributor {
    let cgroups = if let Ok(Some(mount)) = crate::cgroup::cgroup2_mount() {
        Some(crate::podid::CgroupPaths::new(mount))
    } else {
        log::warn!("no cgroup v2 hierarchy: every connection is a host connection");
        None
    };
    let source = if cfg.no_kube {
        KubeSource::Disabled
    } else if let Some(url) = &cfg.kube_api {
        KubeSource::Url(url.clone())
    } else {
        KubeSource::InCluster
    };
    let pods = (source != KubeSource::Disabled).then(|| {
        let index = PodIndex::with_grace(cfg.deleted_pod_grace);
        let node = cfg
            .node_name
            .clone()
            .unwrap_or_else(crate::kube::default_node_name);
        log::info!("watching the pods of node {node:?} ({source:?})");
        crate::kube::spawn(source, node, index.clone());
        index
    });
    let rules = SidecarRules {
        uids: cfg.sidecar_uids.clone(),
        names: cfg.sidecar_names.clone(),
    };
    Attributor::new(cgroups, pods, rules)
}

/// Pause after each drain of the event ring. The kernel wakes a reader that
/// has caught up with an inter-processor interrupt (a VM exit on virtual
/// machines) in the connection's own path; under load that happened for
/// nearly every event. The pause bounds it to ~1/DRAIN_PAUSE per second;
/// the default 4 MiB ring holds far more than this long of events at any
/// connection rate a node sees, and a scrape drains the ring first.
const DRAIN_PAUSE: Duration = Duration::from_millis(5);

/// Loading parses the kernel's BTF (several MiB, twice) and frees it again;
/// give those pages back to the system rather than keep them in the heap
/// for the daemon's lifetime.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Shared between the event loop and the HTTP server.
struct Shared {
    state: Mutex<State>,
    kernel: Mutex<Kernel>,
    healthy: AtomicBool,
    clock: WallClock,
    /// Asks the event loop to apply every pending event now.
    catch_up: mpsc::Sender<oneshot::Sender<()>>,
}

impl Shared {
    /// Waits (bounded) until the event loop has applied every event the
    /// kernel sent so far.
    async fn catch_up(&self) {
        let (done, wait) = oneshot::channel();
        if self.catch_up.send(done).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let opts = KernelOptions {
        btf_path: cfg.btf.clone(),
        ring_bytes: cfg.ring_bytes,
        verbose: false,
        sockopts: cfg.trace_sockopts,
    };
    let mut kernel = Kernel::load(&opts).context("cannot start the tracer")?;
    crate::caps::warn_gaps();
    let ring = kernel.take_events()?;
    let mut ring = readable(ring).context("cannot poll the event ring buffer")?;
    let mut logger = match kernel.take_logger() {
        Some(l) => Some(readable(l).context("cannot poll the kernel log buffer")?),
        None => None,
    };
    let attr = attributor(&cfg);
    let mut state = State::new(&cfg, attr)?;
    let started = monotonic_ns();
    let snap = kernel.snapshot();
    state
        .metrics
        .decode_errors
        .inc_by(kernel.take_decode_errors());
    match snap {
        Ok(snap) => {
            state.resync(&snap, started);
            log::info!("{} connections open at start", state.table.len());
        }
        Err(e) => log::warn!("no start-up snapshot of open connections: {e}"),
    }
    release_startup_memory();
    let (catch_up, mut catch_up_rx) = mpsc::channel(16);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        kernel: Mutex::new(kernel),
        healthy: AtomicBool::new(true),
        clock: WallClock::now(),
        catch_up,
    });

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    log::info!(
        "conn-tracer: serving /metrics, /healthz and /connections on http://{} (idle threshold {})",
        listener.local_addr()?,
        humantime::format_duration(cfg.idle_threshold)
    );
    let server = tokio::spawn(serve(listener, Arc::clone(&shared)));

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut decode_errors = 0u64;
    let mut resync = tokio::time::interval(cfg.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is now: the start-up resync did it
    // After each drain the ring rests for DRAIN_PAUSE (see there); a scrape
    // drains it at once, so that /metrics counts every event before it.
    let mut resume: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = resync.tick() => {
                // Apply what the kernel already reported first, so that the
                // snapshot is compared with an up-to-date table.
                drain(ring.get_mut(), &shared.state, &mut decode_errors);
                let started = monotonic_ns();
                let snap = kernel_snapshot(&shared);
                let mut state = shared.state.lock().expect("state lock");
                match snap {
                    Ok(snap) => state.resync(&snap, started),
                    Err(e) => log::warn!("periodic resync skipped: {e}"),
                }
                state.forget_deleted_pods(std::time::Instant::now());
            }
            guard = ring.readable_mut(), if resume.is_none() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &shared.state, &mut decode_errors);
                guard.clear_ready();
                resume = Some(tokio::time::Instant::now() + DRAIN_PAUSE);
            }
            () = tokio::time::sleep_until(resume.unwrap_or_else(tokio::time::Instant::now)),
                if resume.is_some() =>
            {
                resume = None;
            }
            Some(done) = catch_up_rx.recv() => {
                drain(ring.get_mut(), &shared.state, &mut decode_errors);
                let _ = done.send(());
            }
            guard = async { logger.as_mut().expect("guarded").readable_mut().await },
                if logger.is_some() =>
            {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    shared.healthy.store(false, Ordering::SeqCst);
    server.abort();
    log::info!("conn-tracer: stopping; detaching kernel programs");
    Ok(())
}

/// A fresh kernel snapshot; its undecodable records count as decode errors.
fn kernel_snapshot(shared: &Shared) -> Result<Vec<ConnEvent>, crate::kernel::KernelError> {
    let (snap, bad) = {
        let mut kernel = shared.kernel.lock().expect("kernel lock");
        let snap = kernel.snapshot();
        (snap, kernel.take_decode_errors())
    };
    if bad > 0 {
        shared
            .state
            .lock()
            .expect("state lock")
            .metrics
            .decode_errors
            .inc_by(bad);
    }
    snap
}

/// Applies every event waiting in the ring, under one lock of the state.
fn drain(rb: &mut RingBuf<MapData>, state: &Mutex<State>, decode_errors: &mut u64) {
    let mut st = state.lock().expect("state lock");
    while let Some(item) = rb.next() {
        match decode(&item) {
            Ok(ev) => st.handle(&ev),
            Err(e) => {
                *decode_errors += 1;
                st.metrics.decode_errors.inc();
                if *decode_errors <= 10 || decode_errors.is_multiple_of(1000) {
                    log::warn!(
                        "skipping undecodable kernel event: {e} ({decode_errors} so far, \
                         conntracer_decode_errors_total)"
                    );
                }
            }
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = Arc::clone(&shared);
                async move {
                    if matches!(req.uri().path(), "/metrics" | "/connections")
                        && refuse(req.method(), req.uri().path()).is_none()
                    {
                        shared.catch_up().await;
                    }
                    Ok::<_, Infallible>(route(&req, &shared))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                log::debug!("http connection: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// The paths the daemon serves; everything else is 404 whatever the method.
const PATHS: [&str; 4] = ["/", "/metrics", "/healthz", "/connections"];

/// 404 for a path that is not ours (any method: a POST to an unknown path
/// names no resource, RFC 9110 15.5.5), 405 with `Allow` for a method other
/// than GET or HEAD on one of ours; `None` for a request to serve. The body
/// of a refused request is never read: hyper then closes the connection.
fn refuse(method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
    if !PATHS.contains(&path) {
        return Some(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ));
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Some(r);
    }
    None
}

fn route(req: &Request<hyper::body::Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if let Some(refused) = refuse(req.method(), req.uri().path()) {
        return refused;
    }
    match req.uri().path() {
        "/metrics" => {
            let lost = shared
                .kernel
                .lock()
                .expect("kernel lock")
                .lost_total()
                .unwrap_or(0);
            let families = shared
                .state
                .lock()
                .expect("state lock")
                .gather_metrics(lost);
            let text = crate::metrics::encode(&families);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/healthz" => {
            if shared.healthy.load(Ordering::SeqCst) {
                reply(
                    StatusCode::OK,
                    "text/plain",
                    "ok: kernel programs attached\n".into(),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "stopping\n".into(),
                )
            }
        }
        "/connections" => {
            let snap = kernel_snapshot(shared);
            let mut st = shared.state.lock().expect("state lock");
            let snap = match snap {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("live snapshot failed: {e}");
                    Vec::new()
                }
            };
            for ev in &snap {
                if let EventData::Snapshot(s) = ev.data {
                    st.hz.observe(s.jiffies, ev.info.ts_ns);
                }
            }
            let hz = st.hz.get();
            let views = st.connections(&snap, hz, &shared.clock);
            match serde_json::to_string_pretty(&views) {
                Ok(body) => reply(StatusCode::OK, "application/json", body + "\n"),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            }
        }
        "/" => reply(
            StatusCode::OK,
            "text/html",
            "<html><body><h1>conn-tracer</h1><ul><li><a href=\"/metrics\">/metrics</a>\
             <li><a href=\"/healthz\">/healthz</a><li><a href=\"/connections\">/connections</a>\
             </ul></body></html>\n"
                .into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{Keepalive, OpenData, SnapshotData};

    use super::*;

    fn open(cookie: u64, ts_ns: u64) -> ConnEvent {
        let mut info = EventInfo {
            cookie,
            ts_ns,
            ..EventInfo::default()
        };
        info.sock.family = tracer_common::AF_INET;
        info.sock.sport = 40000;
        info.owner.flags = owner_flags::KNOWN;
        ConnEvent {
            info,
            data: EventData::Open(OpenData {
                ka: Keepalive::default(),
                jiffies: 0,
            }),
        }
    }

    fn snapshot(cookie: u64, state: u8, sport: u16) -> ConnEvent {
        let mut info = EventInfo {
            cookie,
            ..EventInfo::default()
        };
        info.sock.state = state;
        info.sock.sport = sport;
        ConnEvent {
            info,
            data: EventData::Snapshot(SnapshotData::default()),
        }
    }

    #[test]
    fn paths_not_ours_are_404_whatever_the_method_and_ours_take_only_get_and_head() {
        for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
            for path in ["/nope", "/metrics/../x", "/metricsx", "/metrics/", ""] {
                let r = refuse(&method, path).expect("refused");
                assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {path}");
            }
        }
        for path in PATHS {
            for method in [Method::GET, Method::HEAD] {
                assert!(refuse(&method, path).is_none(), "{method} {path}");
            }
            for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
                let r = refuse(&method, path).expect("refused");
                assert_eq!(
                    r.status(),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
                assert_eq!(r.headers()[hyper::header::ALLOW], "GET, HEAD");
            }
        }
    }

    #[test]
    fn resync_drops_missed_closes_keeps_new_opens_and_adds_older_sockets() {
        let mut st = State::new(&Config::default(), Attributor::host_only()).expect("state");
        st.handle(&open(1, 100)); // its close was missed
        st.handle(&open(2, 300)); // opened while the snapshot ran
        st.handle(&open(3, 100)); // still there
        let snap = [
            snapshot(3, tcp_state::ESTABLISHED, 40000),
            snapshot(4, tcp_state::ESTABLISHED, 8080), // older than the daemon
            snapshot(5, tcp_state::LISTEN, 8080),
        ];
        st.resync(&snap, 200);
        assert!(st.table.get(1).is_none(), "missed close reconciled");
        assert!(st.table.get(2).is_some() && st.table.get(3).is_some());
        let older = st.table.get(4).expect("older connection added");
        assert!(!older.opened);
        assert_eq!(
            older.info.owner.flags & owner_flags::INHERITED,
            owner_flags::INHERITED,
            "accepted by a listener on its port"
        );
        assert!(st.table.get(5).is_none(), "listeners are not connections");
        assert_eq!(st.metrics.table_reconciled.get(), 1);
    }
}
