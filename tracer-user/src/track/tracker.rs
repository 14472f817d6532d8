//! The tracker: each event applied to the connection table and the chains,
//! and what came of it for the metrics to count.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use tracer_common::{CloseData, EventInfo, Owner, SockoptData, close_flags, owner_flags};

use super::{
    Direction,
    chains::{CapturePorts, Chain, ChainEnd, Chains, Leg, LegEnd, PendingCaps, PoolEnd},
    classify::{self, Ending, Verdict},
    peer_label,
    table::{Conn, ConnTable},
};
use crate::{
    config::Config,
    event::{ConnEvent, EventData, jiffies::HzTracker},
    owner::{
        attribute::{Attribution, Attributor},
        procfs,
    },
};

/// The connections the daemon tracks, and everything needed to tell how
/// each ends.
pub(crate) struct Tracker {
    pub threshold: Duration,
    /// After how long a connection the peer closed counts as a CLOSE_WAIT leak.
    pub close_wait_threshold: Duration,
    pub table: ConnTable,
    pub hz: HzTracker,
    pub attr: Attributor,
    pub chains: Chains,
    /// Owners of listening sockets by (netns, port), for the connections
    /// they accept when the kernel had no owner for the listener.
    pub(super) listener_owners: HashMap<(u32, u16), Owner>,
    /// What /proc said of live sockets without a kernel owner, by inode:
    /// their owner, or `None` where a complete scan found no process (see
    /// `resync`); at most one per socket of the last snapshot.
    pub(super) proc_seen: HashMap<u64, Option<Owner>>,
    /// The resync leaves chains unbuilt (the pod and Service indexes have
    /// not loaded yet: roles and backends would be guesses).
    pub defer_chains: bool,
}

/// What an event changed that the metrics count.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Nothing to count beyond the event itself.
    Nothing,
    /// A connection ended.
    Closed(Box<Closed>),
    /// A connect failed (never established).
    ConnectFailed {
        info: EventInfo,
        attr: Attribution,
        reason: classify::ConnectFailure,
    },
    /// A process set a keepalive option.
    Sockopt {
        attr: Attribution,
        option: SockoptData,
    },
}

/// What a leg's end ended in the mesh.
#[derive(Debug)]
pub(crate) enum MeshEnd {
    Chain(ChainEnd),
    Pool(PoolEnd),
}

/// A connection that ended, attributed and classified.
#[derive(Debug)]
pub(crate) struct Closed {
    /// Its identity, addresses and owner as they were at open.
    pub info: EventInfo,
    pub attr: Attribution,
    pub dir: Direction,
    pub ending: Ending,
    pub verdict: Verdict,
    /// The chain it ended (the last of its legs to end), or its end as a
    /// pooled upstream connection.
    pub mesh_end: Option<MeshEnd>,
    /// Its end (idle kill, idle time) was counted at the peer's FIN already.
    pub end_counted: bool,
}

impl Tracker {
    pub(crate) fn new(cfg: &Config, attr: Attributor) -> Self {
        Self {
            threshold: cfg.idle_threshold,
            close_wait_threshold: cfg.close_wait_threshold,
            table: ConnTable::new(cfg.max_connections, procfs::ephemeral_ports()),
            hz: HzTracker::new(cfg.kernel_hz),
            attr,
            chains: Chains::new(
                CapturePorts {
                    outbound: cfg.outbound_capture_port,
                    inbound: cfg.inbound_capture_port,
                },
                PendingCaps::new(cfg.max_connections),
            ),
            listener_owners: HashMap::new(),
            proc_seen: HashMap::new(),
            defer_chains: false,
        }
    }

    /// Applies one kernel event.
    pub(crate) fn handle(&mut self, ev: &ConnEvent) -> Outcome {
        match ev.data {
            EventData::Open(o) => {
                self.hz.observe(o.jiffies, ev.info.ts_ns);
                let hz = self.hz.get().0;
                let mut info = ev.info;
                if !info.owner.is_known()
                    && let Some(owner) = self.listener_owners.get(&(info.netns, info.sock.sport))
                {
                    // Accepted from a listener older than the daemon.
                    info.owner = *owner;
                    info.owner.flags |= owner_flags::INHERITED;
                }
                self.table.insert(Conn {
                    info,
                    opened: true,
                    ka: o.ka,
                    hz,
                    peer_closed_ns: 0,
                    end_counted: false,
                });
                if let Some(leg) = self.leg(&info) {
                    self.chains.on_open(leg, self.attr.services());
                }
                Outcome::Nothing
            }
            EventData::Close(c) if c.flags & close_flags::CONNECT_FAILED != 0 => {
                match classify::connect_failure(&c) {
                    Some(reason) => Outcome::ConnectFailed {
                        info: ev.info,
                        attr: self.attr.attribute(&ev.info.owner),
                        reason,
                    },
                    None => Outcome::Nothing,
                }
            }
            EventData::Close(c) => Outcome::Closed(Box::new(self.on_close(&ev.info, &c))),
            EventData::End(c) => self.on_peer_fin(&ev.info, &c),
            EventData::Accept(_) => {
                let unspecified = IpAddr::from([0, 0, 0, 0]);
                let s = &ev.info.sock;
                self.chains.on_accept(
                    ev.info.netns,
                    (s.local().unwrap_or(unspecified), s.sport),
                    (s.remote().unwrap_or(unspecified), s.dport),
                    ev.info.owner.tid,
                );
                Outcome::Nothing
            }
            EventData::Sockopt(o) => {
                if ev.info.cookie != 0 {
                    self.table.apply_sockopt(ev.info.cookie, &o);
                }
                Outcome::Sockopt {
                    attr: self.attr.attribute(&ev.info.owner),
                    option: o,
                }
            }
            _ => Outcome::Nothing,
        }
    }

    /// The peer's FIN on an established connection: its end is classified
    /// and counted now (an idle kill by the peer is known at this moment),
    /// and the connection stays in the table until its owner closes it.
    fn on_peer_fin(&mut self, info: &EventInfo, c: &CloseData) -> Outcome {
        self.hz.observe(c.jiffies, info.ts_ns);
        let hz = self.hz.get();
        let at_open = if let Some(conn) = self.table.peer_closed_at(info.cookie, info.ts_ns) {
            let mut at_open = conn.info;
            if !at_open.owner.is_known() {
                at_open.owner = info.owner;
            }
            at_open
        } else {
            // Not in the table (evicted, or lost open): remember it now,
            // so that its close does not count it again.
            self.table.insert(Conn {
                info: *info,
                opened: false,
                ka: c.ka,
                hz: hz.0,
                peer_closed_ns: info.ts_ns,
                end_counted: true,
            });
            *info
        };
        let ending = classify::ending(c, info.ts_ns, hz);
        let verdict = classify::verdict(&ending, self.threshold);
        let attr = self.attr.attribute(&at_open.owner);
        let dir = self.direction(&at_open);
        Outcome::Closed(Box::new(Closed {
            info: at_open,
            attr,
            dir,
            ending,
            verdict,
            mesh_end: None,
            end_counted: false,
        }))
    }

    fn on_close(&mut self, info: &EventInfo, c: &CloseData) -> Closed {
        self.hz.observe(c.jiffies, info.ts_ns);
        let hz = self.hz.get();
        // The table's copy has the addresses and owner as they were at open.
        let known = self.table.remove(info.cookie);
        let end_counted = known.as_ref().is_some_and(|k| k.end_counted);
        let known = known.map(|conn| conn.info);
        let mut at_open = known.unwrap_or(*info);
        if !at_open.owner.is_known() {
            at_open.owner = info.owner;
        }
        let ending = classify::ending(c, info.ts_ns, hz);
        let verdict = classify::verdict(&ending, self.threshold);
        let attr = self.attr.attribute(&at_open.owner);
        let dir = self.direction(&at_open);
        let leg_end = LegEnd {
            end_ns: c.end_ns,
            closed_by: ending.closed_by,
            close_kind: ending.close_kind,
            keepalive: ending.keepalive,
            idle: ending.idle(),
            // A send that died unanswered (reset or timeout): since when.
            unanswered_since_ns: if ending.failed_send_cause.is_some() {
                c.first_tx_us.saturating_mul(1000)
            } else {
                0
            },
            bytes_acked: c.bytes_acked,
            bytes_received: c.bytes_received,
        };
        let mesh_end = match self.chains.on_pool_close(info.cookie, &leg_end) {
            Some(pool) => Some(MeshEnd::Pool(pool)),
            None => self
                .chains
                .on_close(info.cookie, leg_end, self.attr.services())
                .map(MeshEnd::Chain),
        };
        Closed {
            info: at_open,
            attr,
            dir,
            ending,
            verdict,
            mesh_end,
            end_counted,
        }
    }

    /// Whether a connection is outbound or inbound.
    pub(crate) fn direction(&self, info: &EventInfo) -> Direction {
        self.table.direction(info)
    }

    /// The `peer` of a connection (before capping): see [`Self::peer_of`].
    pub(crate) fn peer(&self, info: &EventInfo, dir: Direction) -> String {
        let remote = info.sock.remote().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        self.peer_of(remote, info.sock.dport, dir)
    }

    /// The `peer` of a remote address: `namespace/service` of a ClusterIP
    /// port dialled (outbound), else `namespace/pod` of a pod IP of any
    /// node, else the address.
    pub(crate) fn peer_of(&self, remote: IpAddr, port: u16, dir: Direction) -> String {
        let service = (dir == Direction::Outbound)
            .then(|| self.attr.peer_service(remote, port))
            .flatten();
        if let Some(svc) = service {
            return svc.label();
        }
        self.attr
            .peer_pod(remote)
            .unwrap_or_else(|| peer_label(remote, port, dir))
    }

    /// `deleted` when the remote address is a pod deleted from the API
    /// (within `deleted_pod_grace`), else `live`.
    pub(crate) fn peer_state(&self, info: &EventInfo) -> &'static str {
        let remote = info.sock.remote().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if self.attr.peer_deleted(remote) {
            "deleted"
        } else {
            "live"
        }
    }

    /// What the chain tracker needs of a connection; `None` outside pods,
    /// where no chain can start (the common case on a host: no leg built).
    pub(super) fn leg(&mut self, info: &EventInfo) -> Option<Leg> {
        let attr = self.attr.attribute(&info.owner);
        if attr.pod_uid.is_empty() {
            return None;
        }
        let unspecified = IpAddr::from([0, 0, 0, 0]);
        Some(Leg {
            cookie: info.cookie,
            netns: info.netns,
            pod_uid: attr.pod_uid,
            role: attr.role,
            inbound: self.direction(info) == Direction::Inbound,
            local: (info.sock.local().unwrap_or(unspecified), info.sock.sport),
            remote: (info.sock.remote().unwrap_or(unspecified), info.sock.dport),
            owner: info.owner,
            seen_ns: info.ts_ns,
        })
    }

    /// (namespace, pod, peer before capping) of a chain: the app's pod and
    /// the far end; `None` outside pods.
    pub(crate) fn chain_labels(&mut self, chain: &Chain) -> Option<(String, String, String)> {
        self.app_labels(&chain.app_owner, chain.peer, chain.direction)
    }

    /// (namespace, pod, peer before capping) of a pool: the app's pod and
    /// the destination it dialled.
    pub(crate) fn pool_labels(
        &mut self,
        app_owner: &Owner,
        dialled: (IpAddr, u16),
    ) -> Option<(String, String, String)> {
        self.app_labels(app_owner, dialled, Direction::Outbound)
    }

    fn app_labels(
        &mut self,
        owner: &Owner,
        (ip, port): (IpAddr, u16),
        dir: Direction,
    ) -> Option<(String, String, String)> {
        let attr = self.attr.attribute(owner);
        if attr.pod_uid.is_empty() {
            return None;
        }
        let peer = self.peer_of(ip, port, dir);
        Some((attr.namespace, attr.pod, peer))
    }
}
