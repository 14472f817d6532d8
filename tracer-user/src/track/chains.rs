//! App -> sidecar -> upstream chains inside a pod, and which leg ended
//! first.
//!
//! Outbound, with Istio's iptables REDIRECT: the app's socket A connects to
//! the original destination D; the kernel redirects it to the sidecar's
//! capture port (15001), so the sidecar accepts socket S1 whose remote end
//! is A's local address (the app's source port links them); the sidecar
//! then opens S2 to D. Inbound (capture port 15006): the sidecar accepts
//! S1 from the client, opens S2 to the app's port, and the app accepts A
//! whose remote end is S2's local address.
//!
//! Everything here is plain data: the daemon feeds it open and close facts.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

pub(crate) use super::Direction;
use super::classify::{CloseKind, ClosedBy};
use crate::{event::addr::canonical, owner::attribute::Role};

/// An endpoint, with v4-mapped IPv6 folded to IPv4.
pub(crate) type Endpoint = (IpAddr, u16);

/// What the chain tracker needs of a connection when it opens.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Leg {
    pub cookie: u64,
    pub netns: u32,
    /// The pod (UID) the owner belongs to; chains never cross pods.
    pub pod_uid: String,
    pub role: Role,
    pub inbound: bool,
    pub local: Endpoint,
    pub remote: Endpoint,
    /// The owner, for the chain's labels after its sockets are gone.
    pub owner: tracer_common::Owner,
}

/// How a leg ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LegEnd {
    /// CLOCK_MONOTONIC when it left ESTABLISHED (0: unknown).
    pub end_ns: u64,
    pub closed_by: ClosedBy,
    pub close_kind: CloseKind,
    pub keepalive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Origin {
    /// The proxy closed the connection itself (e.g. Envoy's idle_timeout).
    Sidecar,
    /// The upstream leg was ended by the server or the network.
    Upstream,
    /// The app closed first.
    App,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Sidecar => "sidecar",
            Self::Upstream => "upstream",
            Self::App => "app",
        }
    }
}

/// One chain; the legs are cookies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chain {
    pub direction: Direction,
    pub pod_uid: String,
    /// The app's socket.
    pub app: u64,
    /// The sidecar's socket facing the app (outbound: accepted on the
    /// capture port; inbound: the one it opened to the app).
    pub sidecar_app_side: Option<u64>,
    /// The sidecar's socket facing the network (outbound: to the original
    /// destination; inbound: accepted from the client).
    pub sidecar_net_side: Option<u64>,
    /// The far end: the original destination (outbound) or the client.
    pub peer: Endpoint,
    /// The app's socket owner.
    pub app_owner: tracer_common::Owner,
    ends: HashMap<u64, LegEnd>,
}

impl Chain {
    pub(crate) fn legs(&self) -> Vec<u64> {
        [Some(self.app), self.sidecar_app_side, self.sidecar_net_side]
            .into_iter()
            .flatten()
            .collect()
    }

    fn complete(&self) -> bool {
        self.sidecar_app_side.is_some() && self.sidecar_net_side.is_some()
    }
}

/// A chain that ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChainEnd {
    pub chain: Chain,
    pub origin: Origin,
    /// Keepalive of the network-side (upstream) leg at its end.
    pub upstream_keepalive: bool,
}

/// The capture ports of the mesh (Istio: 15001 outbound, 15006 inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CapturePorts {
    pub outbound: u16,
    pub inbound: u16,
}

impl Default for CapturePorts {
    fn default() -> Self {
        Self {
            outbound: 15001,
            inbound: 15006,
        }
    }
}

type Key = (u32, Endpoint);

/// Open chains and the half-built ones.
#[derive(Debug)]
pub(crate) struct Chains {
    ports: CapturePorts,
    next_id: u64,
    open: HashMap<u64, Chain>,
    by_cookie: HashMap<u64, u64>,
    /// Outbound: app sockets by (netns, local), waiting for the sidecar's accept.
    apps_by_local: HashMap<Key, Leg>,
    /// Outbound: sidecar accepts by (netns, remote), waiting for the app's open.
    accepts_by_remote: HashMap<Key, Leg>,
    /// Chains waiting for the sidecar's network-side leg, by (netns, far end).
    awaiting_net: HashMap<Key, VecDeque<u64>>,
    /// Inbound: sidecar accepts on the inbound port, per (netns, pod), waiting
    /// for the sidecar's socket to the app.
    inbound_accepts: HashMap<(u32, String), VecDeque<Leg>>,
    /// Inbound: sidecar sockets to the app by (netns, local), waiting for the
    /// app's accept; and app accepts by (netns, remote) waiting for those.
    to_app_by_local: HashMap<Key, (u64, Leg)>,
    app_accepts_by_remote: HashMap<Key, Leg>,
    cap: usize,
}

fn ep((ip, port): Endpoint) -> Endpoint {
    (canonical(ip), port)
}

impl Chains {
    /// `cap` bounds every pending map (oldest-first eviction is not needed:
    /// a full map stops taking new pending legs until closes drain it).
    pub(crate) fn new(ports: CapturePorts, cap: usize) -> Self {
        Self {
            ports,
            next_id: 1,
            open: HashMap::new(),
            by_cookie: HashMap::new(),
            apps_by_local: HashMap::new(),
            accepts_by_remote: HashMap::new(),
            awaiting_net: HashMap::new(),
            inbound_accepts: HashMap::new(),
            to_app_by_local: HashMap::new(),
            app_accepts_by_remote: HashMap::new(),
            cap: cap.max(16),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Chain> {
        self.open.values()
    }

    /// The chain a socket belongs to.
    pub(crate) fn chain_of(&self, cookie: u64) -> Option<&Chain> {
        self.open.get(self.by_cookie.get(&cookie)?)
    }

    fn insert(&mut self, chain: Chain) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        for leg in chain.legs() {
            self.by_cookie.insert(leg, id);
        }
        self.open.insert(id, chain);
        id
    }

    fn pending_full(&self) -> bool {
        self.apps_by_local.len()
            + self.accepts_by_remote.len()
            + self.to_app_by_local.len()
            + self.app_accepts_by_remote.len()
            + self.open.len()
            >= self.cap
    }

    /// A connection reached ESTABLISHED.
    pub(crate) fn on_open(&mut self, mut leg: Leg) {
        leg.local = ep(leg.local);
        leg.remote = ep(leg.remote);
        if leg.pod_uid.is_empty() || self.pending_full() {
            return;
        }
        match (leg.role, leg.inbound) {
            // Outbound chain, app side: wait for (or find) the sidecar's accept.
            (Role::App, false) => {
                let key = (leg.netns, leg.local);
                if let Some(accept) = self.accepts_by_remote.remove(&key) {
                    self.start_outbound(&leg, &accept);
                } else {
                    self.apps_by_local.insert(key, leg);
                }
            }
            (Role::Sidecar, true) if leg.local.1 == self.ports.outbound => {
                let key = (leg.netns, leg.remote);
                if let Some(app) = self.apps_by_local.remove(&key) {
                    self.start_outbound(&app, &leg);
                } else {
                    self.accepts_by_remote.insert(key, leg);
                }
            }
            (Role::Sidecar, true) if leg.local.1 == self.ports.inbound => {
                self.inbound_accepts
                    .entry((leg.netns, leg.pod_uid.clone()))
                    .or_default()
                    .push_back(leg);
            }
            // The sidecar's socket to the network (outbound chain) or to
            // the app (inbound chain).
            (Role::Sidecar, false) => {
                let key = (leg.netns, leg.remote);
                if let Some(id) = self
                    .awaiting_net
                    .get_mut(&key)
                    .and_then(VecDeque::pop_front)
                {
                    if let Some(chain) = self.open.get_mut(&id) {
                        chain.sidecar_net_side = Some(leg.cookie);
                        self.by_cookie.insert(leg.cookie, id);
                    }
                    return;
                }
                // Otherwise: toward the app, for an inbound chain.
                let pod_key = (leg.netns, leg.pod_uid.clone());
                let Some(accept) = self
                    .inbound_accepts
                    .get_mut(&pod_key)
                    .and_then(VecDeque::pop_front)
                else {
                    return;
                };
                let local_key = (leg.netns, leg.local);
                if let Some(app) = self.app_accepts_by_remote.remove(&local_key) {
                    self.start_inbound(&app, leg.cookie, &accept);
                } else {
                    self.to_app_by_local.insert(local_key, (leg.cookie, accept));
                }
            }
            // Inbound chain, app side: the app accepted from the sidecar.
            (Role::App, true) => {
                let key = (leg.netns, leg.remote);
                if let Some((to_app, accept)) = self.to_app_by_local.remove(&key) {
                    self.start_inbound(&leg, to_app, &accept);
                } else {
                    self.app_accepts_by_remote.insert(key, leg);
                }
            }
            _ => {}
        }
    }

    fn start_outbound(&mut self, app: &Leg, accept: &Leg) {
        let key = (app.netns, app.remote);
        let id = self.insert(Chain {
            direction: Direction::Outbound,
            pod_uid: app.pod_uid.clone(),
            app: app.cookie,
            sidecar_app_side: Some(accept.cookie),
            sidecar_net_side: None,
            peer: app.remote,
            app_owner: app.owner,
            ends: HashMap::new(),
        });
        self.awaiting_net.entry(key).or_default().push_back(id);
    }

    fn start_inbound(&mut self, app: &Leg, to_app: u64, accept: &Leg) {
        self.insert(Chain {
            direction: Direction::Inbound,
            pod_uid: app.pod_uid.clone(),
            app: app.cookie,
            sidecar_app_side: Some(to_app),
            sidecar_net_side: Some(accept.cookie),
            peer: accept.remote,
            app_owner: app.owner,
            ends: HashMap::new(),
        });
    }

    /// A connection ended. Returns the chain's end once all its legs did.
    /// Whether `cookie` is the app leg of a chain not yet ended (its peer
    /// is the sidecar, not the server).
    pub(crate) fn is_app_leg(&self, cookie: u64) -> bool {
        self.by_cookie
            .get(&cookie)
            .and_then(|id| self.open.get(id))
            .is_some_and(|c| c.app == cookie)
    }

    pub(crate) fn on_close(&mut self, cookie: u64, end: LegEnd) -> Option<ChainEnd> {
        self.forget_pending(cookie);
        let id = *self.by_cookie.get(&cookie)?;
        let chain = self.open.get_mut(&id)?;
        chain.ends.insert(cookie, end);
        let legs = chain.legs();
        if !legs.iter().all(|l| chain.ends.contains_key(l)) {
            return None;
        }
        let chain = self.open.remove(&id)?;
        for leg in &legs {
            self.by_cookie.remove(leg);
        }
        for queue in self.awaiting_net.values_mut() {
            queue.retain(|c| *c != id);
        }
        self.awaiting_net.retain(|_, q| !q.is_empty());
        if !chain.complete() {
            return None;
        }
        let origin = origin(&chain);
        let upstream_keepalive = match chain.direction {
            Direction::Outbound => chain
                .sidecar_net_side
                .and_then(|c| chain.ends.get(&c))
                .is_some_and(|e| e.keepalive),
            Direction::Inbound => chain.ends.get(&chain.app).is_some_and(|e| e.keepalive),
        };
        Some(ChainEnd {
            chain,
            origin,
            upstream_keepalive,
        })
    }

    fn forget_pending(&mut self, cookie: u64) {
        self.apps_by_local.retain(|_, l| l.cookie != cookie);
        self.accepts_by_remote.retain(|_, l| l.cookie != cookie);
        self.app_accepts_by_remote.retain(|_, l| l.cookie != cookie);
        self.to_app_by_local
            .retain(|_, (c, a)| *c != cookie && a.cookie != cookie);
        for q in self.inbound_accepts.values_mut() {
            q.retain(|l| l.cookie != cookie);
        }
        self.inbound_accepts.retain(|_, q| !q.is_empty());
    }
}

/// Which leg ended first, and what that means.
fn origin(chain: &Chain) -> Origin {
    let first = chain
        .legs()
        .into_iter()
        .filter_map(|c| chain.ends.get(&c).filter(|e| e.end_ns > 0).map(|e| (c, *e)))
        .min_by_key(|(_, e)| e.end_ns);
    let Some((cookie, end)) = first else {
        return Origin::App;
    };
    let by_peer = end.closed_by == ClosedBy::Peer || end.close_kind == CloseKind::Timeout;
    match chain.direction {
        Direction::Outbound => {
            if Some(cookie) == chain.sidecar_net_side {
                if by_peer {
                    Origin::Upstream
                } else {
                    Origin::Sidecar
                }
            } else if Some(cookie) == chain.sidecar_app_side {
                if end.closed_by == ClosedBy::Local {
                    Origin::Sidecar
                } else {
                    Origin::App
                }
            } else if end.closed_by == ClosedBy::Local {
                Origin::App
            } else {
                Origin::Sidecar
            }
        }
        // Inbound: "upstream" is the app (the server side of the chain).
        Direction::Inbound => {
            if cookie == chain.app {
                if by_peer {
                    Origin::Sidecar
                } else {
                    Origin::Upstream
                }
            } else if Some(cookie) == chain.sidecar_app_side {
                if by_peer {
                    Origin::Upstream
                } else {
                    Origin::Sidecar
                }
            } else if by_peer {
                Origin::App
            } else {
                Origin::Sidecar
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);

    fn leg(
        cookie: u64,
        role: Role,
        inbound: bool,
        local: (Ipv4Addr, u16),
        remote: (Ipv4Addr, u16),
    ) -> Leg {
        Leg {
            cookie,
            netns: 7,
            pod_uid: "pod-1".into(),
            role,
            inbound,
            local: (local.0.into(), local.1),
            remote: (remote.0.into(), remote.1),
            owner: tracer_common::Owner::default(),
        }
    }

    fn end(end_ns: u64, closed_by: ClosedBy, close_kind: CloseKind, keepalive: bool) -> LegEnd {
        LegEnd {
            end_ns,
            closed_by,
            close_kind,
            keepalive,
        }
    }

    /// App 1 -> sidecar accept 2 -> sidecar upstream 3, in the order the
    /// kernel reports them.
    fn outbound(c: &mut Chains, base: u64, app_port: u16) {
        c.on_open(leg(
            base + 1,
            Role::App,
            false,
            (POD_IP, app_port),
            (DST, 3306),
        ));
        c.on_open(leg(
            base + 2,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, app_port),
        ));
        c.on_open(leg(
            base + 3,
            Role::Sidecar,
            false,
            (POD_IP, app_port + 1000),
            (DST, 3306),
        ));
    }

    #[test]
    fn links_the_three_outbound_legs_by_source_port_and_destination() {
        let mut c = Chains::new(CapturePorts::default(), 1000);
        outbound(&mut c, 0, 40000);
        let chain = c.chain_of(3).expect("chained");
        assert_eq!(
            (chain.app, chain.sidecar_app_side, chain.sidecar_net_side),
            (1, Some(2), Some(3))
        );
        assert_eq!(chain.peer, (DST.into(), 3306));
        assert_eq!(c.chain_of(1), c.chain_of(2));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn accept_reported_before_the_app_open_still_links() {
        let mut c = Chains::new(CapturePorts::default(), 1000);
        c.on_open(leg(
            2,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, 40000),
        ));
        c.on_open(leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306)));
        c.on_open(leg(3, Role::Sidecar, false, (POD_IP, 41000), (DST, 3306)));
        assert_eq!(c.chain_of(1).and_then(|ch| ch.sidecar_net_side), Some(3));
    }

    #[test]
    fn concurrent_chains_to_one_destination_pair_in_order() {
        let mut c = Chains::new(CapturePorts::default(), 1000);
        c.on_open(leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306)));
        c.on_open(leg(
            2,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, 40000),
        ));
        c.on_open(leg(11, Role::App, false, (POD_IP, 40001), (DST, 3306)));
        c.on_open(leg(
            12,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, 40001),
        ));
        c.on_open(leg(3, Role::Sidecar, false, (POD_IP, 41000), (DST, 3306)));
        c.on_open(leg(13, Role::Sidecar, false, (POD_IP, 41001), (DST, 3306)));
        assert_eq!(c.chain_of(1).and_then(|ch| ch.sidecar_net_side), Some(3));
        assert_eq!(c.chain_of(11).and_then(|ch| ch.sidecar_net_side), Some(13));
    }

    #[test]
    fn sidecar_idle_timeout_is_origin_sidecar() {
        let mut c = Chains::new(CapturePorts::default(), 1000);
        outbound(&mut c, 0, 40000);
        // Envoy closes both of its legs; the app sees the peer's FIN.
        assert_eq!(
            c.on_close(3, end(100, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        assert_eq!(
            c.on_close(2, end(101, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        let e = c
            .on_close(1, end(102, ClosedBy::Peer, CloseKind::Fin, true))
            .expect("ended");
        assert_eq!((e.origin, e.upstream_keepalive), (Origin::Sidecar, false));
        assert!(c.is_empty());
        assert!(c.chain_of(1).is_none());
    }

    #[test]
    fn server_or_network_ending_the_upstream_leg_is_origin_upstream() {
        for (closed_by, kind) in [
            (ClosedBy::Peer, CloseKind::Fin),
            (ClosedBy::Peer, CloseKind::Rst),
            (ClosedBy::Local, CloseKind::Timeout),
        ] {
            let mut c = Chains::new(CapturePorts::default(), 1000);
            outbound(&mut c, 0, 40000);
            c.on_close(1, end(300, ClosedBy::Peer, CloseKind::Fin, true));
            c.on_close(2, end(200, ClosedBy::Local, CloseKind::Fin, false));
            let e = c
                .on_close(3, end(100, closed_by, kind, true))
                .expect("ended");
            assert_eq!(
                (e.origin, e.upstream_keepalive),
                (Origin::Upstream, true),
                "{closed_by:?} {kind:?}"
            );
        }
    }

    #[test]
    fn app_closing_first_is_origin_app() {
        let mut c = Chains::new(CapturePorts::default(), 1000);
        outbound(&mut c, 0, 40000);
        c.on_close(1, end(100, ClosedBy::Local, CloseKind::Fin, true));
        c.on_close(2, end(101, ClosedBy::Peer, CloseKind::Fin, false));
        let e = c
            .on_close(3, end(102, ClosedBy::Local, CloseKind::Fin, false))
            .expect("ended");
        assert_eq!(e.origin, Origin::App);
    }

    #[test]
    fn inbound_chain_links_through_the_sidecar_socket_to_the_app() {
        let client = Ipv4Addr::new(10, 231, 9, 9);
        let mut c = Chains::new(CapturePorts::default(), 1000);
        // Sidecar accepts the client on 15006, opens a socket to the app,
        // the app accepts it.
        c.on_open(leg(
            21,
            Role::Sidecar,
            true,
            (POD_IP, 15006),
            (client, 50000),
        ));
        c.on_open(leg(
            22,
            Role::Sidecar,
            false,
            (Ipv4Addr::LOCALHOST, 42000),
            (Ipv4Addr::LOCALHOST, 8080),
        ));
        c.on_open(leg(
            23,
            Role::App,
            true,
            (Ipv4Addr::LOCALHOST, 8080),
            (Ipv4Addr::LOCALHOST, 42000),
        ));
        let chain = c.chain_of(23).expect("chained");
        assert_eq!(chain.direction, Direction::Inbound);
        assert_eq!(
            (chain.sidecar_app_side, chain.sidecar_net_side),
            (Some(22), Some(21))
        );
        assert_eq!(chain.peer, (client.into(), 50000));
        // The client goes away first: origin "app" is the far app (client).
        c.on_close(21, end(100, ClosedBy::Peer, CloseKind::Fin, false));
        c.on_close(22, end(101, ClosedBy::Local, CloseKind::Fin, false));
        let e = c
            .on_close(23, end(102, ClosedBy::Peer, CloseKind::Fin, false))
            .expect("ended");
        assert_eq!(e.origin, Origin::App);
    }

    #[test]
    fn sockets_outside_pods_and_unmatched_legs_make_no_chain_and_no_leak() {
        let mut c = Chains::new(CapturePorts::default(), 1000);
        let mut host = leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306));
        host.pod_uid.clear();
        c.on_open(host);
        c.on_open(leg(5, Role::App, false, (POD_IP, 40005), (DST, 3306)));
        assert!(c.is_empty());
        assert_eq!(
            c.on_close(5, end(1, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        assert!(
            c.apps_by_local.is_empty(),
            "closed pending legs are forgotten"
        );
        // Bounded: a flood of unmatched app sockets stops at the cap.
        let mut small = Chains::new(CapturePorts::default(), 16);
        for i in 0..1000u16 {
            small.on_open(leg(
                u64::from(i) + 100,
                Role::App,
                false,
                (POD_IP, 10000 + i),
                (DST, 3306),
            ));
        }
        assert!(small.apps_by_local.len() <= 16);
    }
}
