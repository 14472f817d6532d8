//! App -> sidecar -> upstream chains inside a pod, and which leg ended
//! first.
//!
//! Outbound, with Istio's iptables REDIRECT: the app's socket A connects to
//! the original destination D; the kernel redirects it to the sidecar's
//! capture port (15001), so the sidecar accepts socket S1 whose remote end
//! is A's local address (the app's source port links them: a fact); the
//! sidecar then opens S2 to D itself (passthrough) or, for a Kubernetes
//! Service D, to one of its backends. Inbound (capture port 15006): the
//! sidecar accepts S1 from the client, opens S2 to the app's port inside
//! the pod, and the app accepts A whose remote end is S2's local address
//! (a fact again).
//!
//! The S1 -> S2 step is the one no address gives away. A proxy handles a
//! connection on the thread that accepted it (Envoy's workers, nginx's and
//! HAProxy's threads), so S2 is the next connection that thread opens to a
//! destination that can carry D. The kernel programs say which thread
//! accepted S1 ([`Chains::on_accept`]); the connect names S2's thread.
//! Where that is not known (an accept older than the daemon, a kernel
//! without the hook), the oldest waiting chain of the pod whose
//! destination fits is taken, and the link is marked `inferred` when more
//! than one chain could have had it, or when no Service index could say
//! whether S2's remote serves D ([`Fit::Unknown`]).
//!
//! Pending legs live in per-pod queues, each leg found by its cookie (no
//! scan per close), each pod capped (its oldest pending leg goes first), so
//! a pod without a sidecar, whose app connections never link, cannot stop
//! linking elsewhere.
//!
//! An HTTP proxy (Envoy's `http_connection_manager`) pools: its upstream
//! connections carry the requests of many app connections, and none is
//! any app connection's own. Such legs are pooled, N:M, per (pod, dialled
//! destination) ([`pools`]): never linked 1:1.
//!
//! Everything here is plain data: the daemon feeds it open, accept, close
//! and snapshot facts.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

pub(crate) use super::Direction;
use crate::{
    event::addr::canonical,
    owner::{attribute::Role, services::ServiceIndex},
};

mod ends;
mod pools;
pub(crate) use self::{
    ends::{ChainEnd, LegEnd, Origin},
    pools::{Pool, PoolEnd},
};

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
    /// The owner (its thread opened the connection, for connects), for the
    /// chain's labels after its sockets are gone.
    pub owner: tracer_common::Owner,
    /// CLOCK_MONOTONIC when it was seen open.
    pub seen_ns: u64,
}

/// Whether the sidecar's connection to `remote` can carry an app
/// connection to `dialled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fit {
    /// It cannot (another destination, or not a backend of that Service).
    No,
    /// Nobody can tell: no Service index (`--no-kube`).
    Unknown,
    /// `remote` is a backend of the Service `dialled` is a ClusterIP of.
    Service,
    /// `remote` is `dialled` (passthrough).
    Exact,
}

/// What the Kubernetes Services say about destinations.
pub(crate) trait Routes {
    /// Whether `remote` is a backend of the Service port at `dialled`:
    /// `None` when there is no Service index to ask.
    fn serves(&self, dialled: Endpoint, remote: Endpoint) -> Option<bool>;
}

/// No Service index: only passthrough links are facts.
#[cfg(test)]
pub(crate) struct NoRoutes;

#[cfg(test)]
impl Routes for NoRoutes {
    fn serves(&self, _: Endpoint, _: Endpoint) -> Option<bool> {
        None
    }
}

/// The cluster's Services: unknown until their first lists are read (and
/// for ever with `--no-kube`); then a destination that is no ClusterIP
/// port is served by nothing but itself.
impl Routes for ServiceIndex {
    fn serves(&self, (ip, port): Endpoint, remote: Endpoint) -> Option<bool> {
        if !self.synced() {
            return None;
        }
        Some(
            self.service_at(ip, port)
                .is_some_and(|svc| self.is_backend(&svc, remote.0, remote.1)),
        )
    }
}

fn fit(routes: &dyn Routes, dialled: Endpoint, remote: Endpoint) -> Fit {
    if dialled == remote {
        return Fit::Exact;
    }
    match routes.serves(dialled, remote) {
        Some(true) => Fit::Service,
        Some(false) => Fit::No,
        None => Fit::Unknown,
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
    /// destination or a backend of its Service; inbound: accepted from the
    /// client).
    pub sidecar_net_side: Option<u64>,
    /// The far end: the original destination (outbound) or the client.
    pub peer: Endpoint,
    /// The app's socket owner.
    pub app_owner: tracer_common::Owner,
    /// The S1 <-> S2 link (the sidecar's two legs) is the oldest fitting
    /// candidate of several, or rests on no Service fact.
    pub inferred: bool,
    /// Its app-side legs belong to a pool ([`pools`]): no upstream leg of
    /// its own.
    pub pooled: bool,
    /// CLOCK_MONOTONIC when its app-side legs were both seen.
    since_ns: u64,
    /// The thread that accepted S1 (0: unknown).
    worker: u32,
    netns: u32,
    /// Its place in its pod's queue while it waits for its net-side leg.
    waiting: Option<u64>,
    /// S1's entry in [`Chains::accepts`] while it waits.
    accept_key: Option<AcceptKey>,
    ends: HashMap<u64, LegEnd>,
}

impl Chain {
    pub(crate) fn legs(&self) -> Vec<u64> {
        [Some(self.app), self.sidecar_app_side, self.sidecar_net_side]
            .into_iter()
            .flatten()
            .collect()
    }

    pub(crate) fn complete(&self) -> bool {
        self.sidecar_app_side.is_some() && self.sidecar_net_side.is_some()
    }
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

/// How many legs and half-built chains may wait at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingCaps {
    pub per_pod: usize,
    pub total: usize,
}

impl PendingCaps {
    /// `total` for the node (the connection table's size), and a pod's
    /// share of it: at least 16, at most 4096.
    pub(crate) fn new(total: usize) -> Self {
        let total = total.max(16);
        Self {
            per_pod: (total / 16).clamp(16, 4096),
            total,
        }
    }
}

type Key = (u32, Endpoint);
type PodKey = (u32, String);
/// (netns, local, remote) of an accepted socket.
type AcceptKey = (u32, Endpoint, Endpoint);

/// Where a pending leg waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Outbound app socket, by (netns, local), for the sidecar's accept.
    App,
    /// Outbound sidecar accept, by (netns, remote), for the app's socket.
    Accept,
    /// Inbound sidecar accept, in its pod's queue, for the sidecar's
    /// socket to the app.
    InboundAccept,
    /// The sidecar's socket to the app, by (netns, local), for the app's
    /// accept.
    ToApp,
    /// Inbound app accept, by (netns, remote), for the sidecar's socket.
    AppAccept,
    /// The sidecar's socket to the network that no waiting chain took, in
    /// its pod's queue: a pooled connection, or one of the proxy's own.
    Upstream,
}

#[derive(Debug, Clone)]
struct Pending {
    leg: Leg,
    slot: Slot,
    /// Its place in its pod's queue.
    seq: u64,
    /// The thread that accepted it (sidecar accepts; 0: unknown).
    worker: u32,
}

/// One pod's pending legs and half-built chains, oldest first.
#[derive(Debug, Default)]
struct PodQueue {
    /// Every pending leg (cookie) and waiting chain (id), by age.
    all: BTreeMap<u64, Waiting>,
    /// Outbound chains waiting for their net-side leg.
    chains: BTreeMap<u64, u64>,
    /// Inbound sidecar accepts waiting for the sidecar's socket to the app.
    inbound: BTreeMap<u64, u64>,
    /// Sidecar sockets to the network no chain took ([`Slot::Upstream`]).
    upstream: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Leg(u64),
    Chain(u64),
}

/// Open chains and the half-built ones.
#[derive(Debug)]
pub(crate) struct Chains {
    ports: CapturePorts,
    caps: PendingCaps,
    next_id: u64,
    next_seq: u64,
    open: HashMap<u64, Chain>,
    complete: usize,
    by_cookie: HashMap<u64, u64>,
    pending: HashMap<u64, Pending>,
    /// Pending legs by (netns, endpoint): [`Slot::App`] and [`Slot::ToApp`]
    /// by local, [`Slot::Accept`] and [`Slot::AppAccept`] by remote.
    by_local: HashMap<Key, u64>,
    by_remote: HashMap<Key, u64>,
    /// Sidecar accepts on a capture port by (netns, local, remote), pending
    /// or in a chain waiting for its net side: where an accept names its
    /// thread.
    accepts: HashMap<AcceptKey, u64>,
    pods: HashMap<PodKey, PodQueue>,
    pending_total: usize,
    /// Each pod's pools, by the destination its app dialled.
    pools: HashMap<PodKey, HashMap<Endpoint, Pool>>,
    /// Pooled upstream legs: their pod and dialled destination.
    pooled_up: HashMap<u64, (PodKey, Endpoint)>,
    /// Waiting outbound chains not yet checked for pool evidence: queue
    /// place -> (chain id, since when).
    unchecked: BTreeMap<u64, (u64, u64)>,
    /// Pending legs and half-built chains dropped for a full queue.
    pub evicted: u64,
}

fn ep((ip, port): Endpoint) -> Endpoint {
    (canonical(ip), port)
}

fn pod_key(leg: &Leg) -> PodKey {
    (leg.netns, leg.pod_uid.clone())
}

fn accept_key(leg: &Leg) -> AcceptKey {
    (leg.netns, leg.local, leg.remote)
}

impl Chains {
    pub(crate) fn new(ports: CapturePorts, caps: PendingCaps) -> Self {
        Self {
            ports,
            caps,
            next_id: 1,
            next_seq: 1,
            open: HashMap::new(),
            complete: 0,
            by_cookie: HashMap::new(),
            pending: HashMap::new(),
            by_local: HashMap::new(),
            by_remote: HashMap::new(),
            accepts: HashMap::new(),
            pods: HashMap::new(),
            pending_total: 0,
            pools: HashMap::new(),
            pooled_up: HashMap::new(),
            unchecked: BTreeMap::new(),
            evicted: 0,
        }
    }

    /// Complete chains (all three legs linked).
    /// Where a socket found open (a resync) comes in the order a chain's
    /// legs open: outbound, the app's connect and the sidecar's accept on
    /// the capture port (0) come before the sidecar's own connect (1);
    /// inbound, the sidecar's accept (0), its connect to the app (1), the
    /// app's accept (2).
    pub(crate) fn open_order(&self, leg: &Leg) -> u8 {
        let capture = [self.ports.outbound, self.ports.inbound];
        match (leg.role, leg.inbound) {
            (Role::App, false) => 0,
            (Role::App, true) => 2,
            (Role::Sidecar, true) if capture.contains(&leg.local.1) => 0,
            _ => 1,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.complete
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Legs and half-built chains waiting.
    pub(crate) fn pending(&self) -> usize {
        self.pending_total
    }

    /// Complete chains.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Chain> {
        self.open.values().filter(|c| c.complete())
    }

    /// The chain a socket belongs to.
    pub(crate) fn chain_of(&self, cookie: u64) -> Option<&Chain> {
        self.open.get(self.by_cookie.get(&cookie)?)
    }

    /// Whether a socket is linked, pooled or waiting already.
    pub(crate) fn knows(&self, cookie: u64) -> bool {
        self.by_cookie.contains_key(&cookie)
            || self.pending.contains_key(&cookie)
            || self.pooled_up.contains_key(&cookie)
    }

    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Room for one more waiting item of `pod`: its oldest goes when the
    /// pod is at its cap, or when the node is and the pod has any.
    fn make_room(&mut self, pod: &PodKey) -> bool {
        let len = self.pods.get(pod).map_or(0, |q| q.all.len());
        if len < self.caps.per_pod && self.pending_total < self.caps.total {
            return true;
        }
        let Some((_, oldest)) = self.pods.get(pod).and_then(|q| q.all.first_key_value()) else {
            return false;
        };
        match *oldest {
            Waiting::Leg(cookie) => {
                if let Some(p) = self.take_pending(cookie) {
                    self.forget_accept(accept_key(&p.leg), cookie);
                }
            }
            Waiting::Chain(id) => self.drop_chain(id),
        }
        self.evicted += 1;
        true
    }

    fn park(&mut self, leg: Leg, slot: Slot, worker: u32) {
        let pod = pod_key(&leg);
        if !self.make_room(&pod) {
            self.evicted += 1;
            return;
        }
        let seq = self.seq();
        let q = self.pods.entry(pod).or_default();
        q.all.insert(seq, Waiting::Leg(leg.cookie));
        match slot {
            Slot::App | Slot::ToApp => {
                self.by_local.insert((leg.netns, leg.local), leg.cookie);
            }
            Slot::Accept | Slot::AppAccept => {
                self.by_remote.insert((leg.netns, leg.remote), leg.cookie);
            }
            Slot::InboundAccept => {
                q.inbound.insert(seq, leg.cookie);
            }
            Slot::Upstream => {
                q.upstream.insert(seq, leg.cookie);
            }
        }
        self.pending_total += 1;
        self.pending.insert(
            leg.cookie,
            Pending {
                leg,
                slot,
                seq,
                worker,
            },
        );
    }

    /// Removes a pending leg, wherever it waits.
    fn take_pending(&mut self, cookie: u64) -> Option<Pending> {
        let p = self.pending.remove(&cookie)?;
        self.pending_total -= 1;
        let pod = pod_key(&p.leg);
        if let Some(q) = self.pods.get_mut(&pod) {
            q.all.remove(&p.seq);
            q.inbound.remove(&p.seq);
            q.upstream.remove(&p.seq);
            if q.all.is_empty() {
                self.pods.remove(&pod);
            }
        }
        let key = match p.slot {
            Slot::App | Slot::ToApp => Some((&mut self.by_local, (p.leg.netns, p.leg.local))),
            Slot::Accept | Slot::AppAccept => {
                Some((&mut self.by_remote, (p.leg.netns, p.leg.remote)))
            }
            Slot::InboundAccept | Slot::Upstream => None,
        };
        if let Some((map, key)) = key
            && map.get(&key) == Some(&cookie)
        {
            map.remove(&key);
        }
        Some(p)
    }

    /// The pending leg waiting in `map` under `key` with slot `slot`.
    fn take_at(&mut self, by_local: bool, key: Key, slot: Slot) -> Option<Pending> {
        let map = if by_local {
            &self.by_local
        } else {
            &self.by_remote
        };
        let cookie = *map.get(&key)?;
        if self.pending.get(&cookie).map(|p| p.slot) != Some(slot) {
            return None;
        }
        self.take_pending(cookie)
    }

    fn forget_accept(&mut self, key: AcceptKey, cookie: u64) {
        if self.accepts.get(&key) == Some(&cookie) {
            self.accepts.remove(&key);
        }
    }

    fn insert(&mut self, chain: Chain) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        for leg in chain.legs() {
            self.by_cookie.insert(leg, id);
        }
        if chain.complete() {
            self.complete += 1;
        }
        self.open.insert(id, chain);
        id
    }

    /// Forgets a chain and its legs (a half-built chain evicted).
    fn drop_chain(&mut self, id: u64) {
        let Some(chain) = self.open.remove(&id) else {
            return;
        };
        for leg in chain.legs() {
            self.by_cookie.remove(&leg);
        }
        if chain.complete() {
            self.complete -= 1;
        }
        self.unqueue(&chain);
        self.forget_chain_accept(&chain);
        self.leave_pool(&chain, id);
    }

    fn forget_chain_accept(&mut self, chain: &Chain) {
        if let (Some(key), Some(s1)) = (chain.accept_key, chain.sidecar_app_side) {
            self.forget_accept(key, s1);
        }
    }

    /// Takes a chain out of its pod's waiting queue.
    fn unqueue(&mut self, chain: &Chain) {
        let Some(seq) = chain.waiting else {
            return;
        };
        let pod = (chain.netns, chain.pod_uid.clone());
        if let Some(q) = self.pods.get_mut(&pod) {
            q.all.remove(&seq);
            q.chains.remove(&seq);
            if q.all.is_empty() {
                self.pods.remove(&pod);
            }
        }
        self.unchecked.remove(&seq);
        self.pending_total -= 1;
    }

    /// A connection reached ESTABLISHED (`routes`: the Service index).
    pub(crate) fn on_open(&mut self, mut leg: Leg, routes: &dyn Routes) {
        leg.local = ep(leg.local);
        leg.remote = ep(leg.remote);
        if leg.pod_uid.is_empty() || self.knows(leg.cookie) {
            return;
        }
        match (leg.role, leg.inbound) {
            // Outbound chain, app side: wait for (or find) the sidecar's accept.
            (Role::App, false) => {
                let key = (leg.netns, leg.local);
                if let Some(accept) = self.take_at(false, key, Slot::Accept) {
                    self.start_outbound(&leg, &accept.leg, accept.worker);
                } else {
                    self.park(leg, Slot::App, 0);
                }
            }
            (Role::Sidecar, true) if leg.local.1 == self.ports.outbound => {
                self.accepts.insert(accept_key(&leg), leg.cookie);
                let key = (leg.netns, leg.remote);
                if let Some(app) = self.take_at(true, key, Slot::App) {
                    self.start_outbound(&app.leg, &leg, 0);
                } else {
                    self.park(leg, Slot::Accept, 0);
                }
            }
            (Role::Sidecar, true) if leg.local.1 == self.ports.inbound => {
                self.accepts.insert(accept_key(&leg), leg.cookie);
                self.park(leg, Slot::InboundAccept, 0);
            }
            // The sidecar's socket to the app (inbound chain), or to the
            // network (outbound chain).
            (Role::Sidecar, false) => {
                if self.inside_pod(&leg) {
                    let key = (leg.netns, leg.local);
                    if let Some(app) = self.take_at(false, key, Slot::AppAccept) {
                        self.start_inbound(&app.leg, &leg);
                    } else {
                        self.park(leg, Slot::ToApp, 0);
                    }
                } else {
                    self.link_net_side(&leg, routes);
                }
            }
            // Inbound chain, app side: the app accepted from the sidecar.
            (Role::App, true) => {
                let key = (leg.netns, leg.remote);
                if let Some(to_app) = self.take_at(true, key, Slot::ToApp) {
                    self.start_inbound(&leg, &to_app.leg);
                } else {
                    self.park(leg, Slot::AppAccept, 0);
                }
            }
            _ => {}
        }
    }

    /// Whether the sidecar's connection goes to its own pod (the app):
    /// loopback, its own address, or the address a client reached the pod
    /// at (an inbound accept's local address).
    fn inside_pod(&self, leg: &Leg) -> bool {
        let ip = leg.remote.0;
        if ip.is_loopback() || ip == leg.local.0 {
            return true;
        }
        self.pods.get(&pod_key(leg)).is_some_and(|q| {
            q.inbound
                .values()
                .any(|c| self.pending.get(c).is_some_and(|p| p.leg.local.0 == ip))
        })
    }

    /// A sidecar thread accepted a connection (`local`, `remote`: the
    /// accepted socket's addresses): the connection it opens next for it
    /// comes from that thread.
    pub(crate) fn on_accept(&mut self, netns: u32, local: Endpoint, remote: Endpoint, tid: u32) {
        let Some(&cookie) = self.accepts.get(&(netns, ep(local), ep(remote))) else {
            return;
        };
        if let Some(p) = self.pending.get_mut(&cookie) {
            p.worker = tid;
        } else if let Some(chain) = self
            .by_cookie
            .get(&cookie)
            .and_then(|id| self.open.get_mut(id))
        {
            chain.worker = tid;
        }
    }

    /// The sidecar's socket to the network: the net side of the pod's
    /// waiting outbound chain it fits best (see the module's paragraph).
    fn link_net_side(&mut self, leg: &Leg, routes: &dyn Routes) {
        if self.join_pool(leg, routes) {
            return;
        }
        let Some(q) = self.pods.get(&pod_key(leg)) else {
            self.park(leg.clone(), Slot::Upstream, 0);
            return;
        };
        let tid = leg.owner.tid;
        // (fit, same thread, -age) of the best so far, its id, and how many
        // were as good.
        let mut best: Option<((Fit, bool), u64, u64, usize)> = None;
        for (&seq, &id) in &q.chains {
            let Some(chain) = self.open.get(&id) else {
                continue;
            };
            let f = fit(routes, chain.peer, leg.remote);
            if f == Fit::No || (chain.worker != 0 && tid != 0 && chain.worker != tid) {
                continue;
            }
            let score = (f, chain.worker != 0 && chain.worker == tid);
            match &mut best {
                Some((b, _, _, n)) if *b == score => *n += 1,
                Some((b, ..)) if *b > score => {}
                _ => best = Some((score, id, seq, 1)),
            }
        }
        let Some(((f, same_thread), id, _, ties)) = best else {
            self.park(leg.clone(), Slot::Upstream, 0);
            return;
        };
        let inferred = f == Fit::Unknown || (!same_thread && ties > 1);
        let Some(mut chain) = self.open.remove(&id) else {
            return;
        };
        self.unqueue(&chain);
        self.forget_chain_accept(&chain);
        chain.waiting = None;
        chain.accept_key = None;
        chain.sidecar_net_side = Some(leg.cookie);
        chain.inferred = inferred;
        self.by_cookie.insert(leg.cookie, id);
        self.complete += 1;
        self.open.insert(id, chain);
    }

    fn start_outbound(&mut self, app: &Leg, accept: &Leg, worker: u32) {
        let pod = pod_key(app);
        let pooled = self.pool_of(&pod, app.remote).is_some();
        if !pooled && !self.make_room(&pod) {
            self.evicted += 1;
            self.forget_accept(accept_key(accept), accept.cookie);
            return;
        }
        let seq = self.seq();
        let id = self.insert(Chain {
            direction: Direction::Outbound,
            pod_uid: app.pod_uid.clone(),
            app: app.cookie,
            sidecar_app_side: Some(accept.cookie),
            sidecar_net_side: None,
            peer: app.remote,
            app_owner: app.owner,
            inferred: false,
            pooled,
            since_ns: app.seen_ns.max(accept.seen_ns),
            worker,
            netns: app.netns,
            waiting: (!pooled).then_some(seq),
            accept_key: (!pooled).then(|| accept_key(accept)),
            ends: HashMap::new(),
        });
        if pooled {
            self.forget_accept(accept_key(accept), accept.cookie);
            if let Some(pool) = self.pool_of(&pod, app.remote) {
                pool.apps.insert(id, app.cookie);
            }
            return;
        }
        let q = self.pods.entry(pod).or_default();
        q.all.insert(seq, Waiting::Chain(id));
        q.chains.insert(seq, id);
        self.unchecked
            .insert(seq, (id, app.seen_ns.max(accept.seen_ns)));
        self.pending_total += 1;
    }

    /// The app accepted the sidecar's socket `to_app`: the client side is
    /// the pod's waiting inbound accept of the thread that opened
    /// `to_app`, else its oldest.
    fn start_inbound(&mut self, app: &Leg, to_app: &Leg) {
        let Some(q) = self.pods.get(&pod_key(app)) else {
            return;
        };
        let tid = to_app.owner.tid;
        let mut oldest = None;
        let mut same_thread = None;
        for &cookie in q.inbound.values() {
            let Some(p) = self.pending.get(&cookie) else {
                continue;
            };
            if p.worker != 0 && tid != 0 && p.worker == tid {
                same_thread = Some(cookie);
                break;
            }
            if p.worker == 0 || tid == 0 {
                oldest = oldest.or(Some(cookie));
            }
        }
        let candidates = q.inbound.len();
        let (Some(cookie), inferred) = (match same_thread {
            Some(c) => (Some(c), false),
            None => (oldest, candidates > 1),
        }) else {
            return;
        };
        let Some(accept) = self.take_pending(cookie) else {
            return;
        };
        self.forget_accept(accept_key(&accept.leg), cookie);
        self.insert(Chain {
            direction: Direction::Inbound,
            pod_uid: app.pod_uid.clone(),
            app: app.cookie,
            sidecar_app_side: Some(to_app.cookie),
            sidecar_net_side: Some(accept.leg.cookie),
            peer: accept.leg.remote,
            app_owner: app.owner,
            inferred,
            pooled: false,
            since_ns: app.seen_ns,
            worker: accept.worker,
            netns: app.netns,
            waiting: None,
            accept_key: None,
            ends: HashMap::new(),
        });
    }

    /// A connection the kernel no longer has, whose close was missed: its
    /// pending leg, or its whole chain, is forgotten without an end.
    pub(crate) fn forget(&mut self, cookie: u64) {
        self.forget_pooled_upstream(cookie);
        if let Some(p) = self.take_pending(cookie) {
            self.forget_accept(accept_key(&p.leg), cookie);
        }
        if let Some(&id) = self.by_cookie.get(&cookie) {
            self.drop_chain(id);
        }
    }

    /// Whether `cookie` is the app leg of a chain not yet ended (its peer
    /// is the sidecar, not the server).
    pub(crate) fn is_app_leg(&self, cookie: u64) -> bool {
        self.by_cookie
            .get(&cookie)
            .and_then(|id| self.open.get(id))
            .is_some_and(|c| c.app == cookie)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;
    use crate::track::classify::{CloseKind, ClosedBy};

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
            seen_ns: 0,
        }
    }

    impl Chains {
        pub(super) fn open(&mut self, leg: Leg) {
            self.on_open(leg, &NoRoutes);
        }

        pub(super) fn close(&mut self, cookie: u64, end: LegEnd) -> Option<ChainEnd> {
            self.on_close(cookie, end, &NoRoutes)
        }
    }

    fn end(end_ns: u64, closed_by: ClosedBy, close_kind: CloseKind, keepalive: bool) -> LegEnd {
        LegEnd {
            end_ns,
            closed_by,
            close_kind,
            keepalive,
            idle: None,
            unanswered_since_ns: 0,
            bytes_acked: 0,
            bytes_received: 0,
        }
    }

    /// App 1 -> sidecar accept 2 -> sidecar upstream 3, in the order the
    /// kernel reports them.
    fn outbound(c: &mut Chains, base: u64, app_port: u16) {
        c.open(leg(
            base + 1,
            Role::App,
            false,
            (POD_IP, app_port),
            (DST, 3306),
        ));
        c.open(leg(
            base + 2,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, app_port),
        ));
        c.open(leg(
            base + 3,
            Role::Sidecar,
            false,
            (POD_IP, app_port + 1000),
            (DST, 3306),
        ));
    }

    #[test]
    fn links_the_three_outbound_legs_by_source_port_and_destination() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
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

    /// A resync finds the three sockets at once, in no telling order (inode
    /// numbers come in per-CPU batches); taken in [`Chains::open_order`]
    /// they link as the open events would have.
    #[test]
    fn sockets_found_upstream_first_link_in_open_order() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        let mut found = [
            leg(3, Role::Sidecar, false, (POD_IP, 41000), (DST, 3306)),
            leg(
                2,
                Role::Sidecar,
                true,
                (Ipv4Addr::LOCALHOST, 15001),
                (POD_IP, 40000),
            ),
            leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306)),
        ];
        assert_eq!(found.clone().map(|l| c.open_order(&l)), [1, 0, 0]);
        found.sort_by_key(|l| c.open_order(l));
        for l in found {
            c.open(l);
        }
        let chain = c.chain_of(3).expect("chained");
        assert_eq!(
            (chain.app, chain.sidecar_app_side, chain.sidecar_net_side),
            (1, Some(2), Some(3))
        );
        // Inbound: the sidecar's accept, its connect to the app, the app's
        // accept.
        let inbound = [
            leg(6, Role::App, true, (POD_IP, 8080), (POD_IP, 42000)),
            leg(5, Role::Sidecar, false, (POD_IP, 42000), (POD_IP, 8080)),
            leg(4, Role::Sidecar, true, (POD_IP, 15006), (DST, 50000)),
        ];
        assert_eq!(inbound.map(|l| c.open_order(&l)), [2, 1, 0]);
    }

    #[test]
    fn accept_reported_before_the_app_open_still_links() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        c.open(leg(
            2,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, 40000),
        ));
        c.open(leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306)));
        c.open(leg(3, Role::Sidecar, false, (POD_IP, 41000), (DST, 3306)));
        assert_eq!(c.chain_of(1).and_then(|ch| ch.sidecar_net_side), Some(3));
    }

    #[test]
    fn concurrent_chains_to_one_destination_pair_in_order() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        c.open(leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306)));
        c.open(leg(
            2,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, 40000),
        ));
        c.open(leg(11, Role::App, false, (POD_IP, 40001), (DST, 3306)));
        c.open(leg(
            12,
            Role::Sidecar,
            true,
            (Ipv4Addr::LOCALHOST, 15001),
            (POD_IP, 40001),
        ));
        c.open(leg(3, Role::Sidecar, false, (POD_IP, 41000), (DST, 3306)));
        c.open(leg(13, Role::Sidecar, false, (POD_IP, 41001), (DST, 3306)));
        assert_eq!(c.chain_of(1).and_then(|ch| ch.sidecar_net_side), Some(3));
        assert_eq!(c.chain_of(11).and_then(|ch| ch.sidecar_net_side), Some(13));
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 231, 9, 9);

    /// The sidecar's accept of a client on the inbound capture port.
    fn inbound_accept(cookie: u64) -> Leg {
        leg(
            cookie,
            Role::Sidecar,
            true,
            (POD_IP, 15006),
            (CLIENT, 50000),
        )
    }

    /// App leg and sidecar accept of an outbound chain to `dst`, the
    /// accept taken by thread `worker`.
    fn outbound_half(c: &mut Chains, base: u64, app_port: u16, dst: Endpoint, worker: u32) {
        let mut app = leg(base + 1, Role::App, false, (POD_IP, app_port), (DST, 1));
        app.remote = dst;
        c.open(app);
        let accept_local = (Ipv4Addr::LOCALHOST, 15001);
        c.open(leg(
            base + 2,
            Role::Sidecar,
            true,
            accept_local,
            (POD_IP, app_port),
        ));
        if worker != 0 {
            c.on_accept(
                7,
                (accept_local.0.into(), accept_local.1),
                (POD_IP.into(), app_port),
                worker,
            );
        }
    }

    /// The sidecar's upstream socket from thread `tid` to `remote`.
    fn upstream(cookie: u64, local_port: u16, remote: Endpoint, tid: u32) -> Leg {
        let mut l = leg(cookie, Role::Sidecar, false, (POD_IP, local_port), (DST, 1));
        l.remote = remote;
        l.owner.tid = tid;
        l
    }

    #[test]
    fn the_thread_that_accepted_s1_names_its_upstream_leg() {
        let d = (IpAddr::from(DST), 3306);
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound_half(&mut c, 0, 40000, d, 101);
        outbound_half(&mut c, 10, 40001, d, 102);
        // Worker 102 connects first, then 101.
        c.open(upstream(13, 41001, d, 102));
        c.open(upstream(3, 41000, d, 101));
        for (app, up) in [(1, 3), (11, 13)] {
            let chain = c.chain_of(app).expect("chained");
            assert_eq!(chain.sidecar_net_side, Some(up));
            assert!(!chain.inferred, "the thread says it");
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn without_thread_or_service_facts_the_oldest_fitting_chain_is_inferred() {
        let d = (IpAddr::from(DST), 3306);
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound_half(&mut c, 0, 40000, d, 0);
        c.open(upstream(3, 41000, d, 0));
        assert!(!c.chain_of(1).expect("chained").inferred, "one candidate");
        outbound_half(&mut c, 10, 40001, d, 0);
        outbound_half(&mut c, 20, 40002, d, 0);
        c.open(upstream(13, 41001, d, 0));
        let chain = c.chain_of(11).expect("chained");
        assert_eq!(chain.sidecar_net_side, Some(13));
        assert!(chain.inferred, "two chains to one destination");
        // --no-kube: a ClusterIP dialled, a backend reached: the oldest
        // waiting chain, inferred.
        let cluster_ip = (IpAddr::from(Ipv4Addr::new(10, 96, 0, 9)), 6379);
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound_half(&mut c, 0, 40000, cluster_ip, 0);
        c.open(upstream(3, 41000, d, 0));
        assert!(c.chain_of(3).expect("chained").inferred);
    }

    /// A Service index: `cluster_ip` is served by `backend`.
    struct OneService {
        cluster_ip: Endpoint,
        backend: Endpoint,
    }

    impl Routes for OneService {
        fn serves(&self, dialled: Endpoint, remote: Endpoint) -> Option<bool> {
            Some(dialled == self.cluster_ip && remote == self.backend)
        }
    }

    #[test]
    fn a_backend_of_the_dialled_service_links_and_others_do_not() {
        let svc = OneService {
            cluster_ip: (Ipv4Addr::new(10, 96, 0, 9).into(), 6379),
            backend: (DST.into(), 16379),
        };
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound_half(&mut c, 0, 40000, svc.cluster_ip, 0);
        // The sidecar's xDS connection: not a backend, no link.
        let xds = (IpAddr::from(Ipv4Addr::new(10, 96, 0, 1)), 15012);
        c.on_open(upstream(50, 41050, xds, 0), &svc);
        assert_eq!(c.chain_of(1).and_then(|ch| ch.sidecar_net_side), None);
        c.on_open(upstream(3, 41000, svc.backend, 0), &svc);
        let chain = c.chain_of(3).expect("chained");
        assert_eq!((chain.app, chain.inferred), (1, false));
        assert_eq!(chain.peer, svc.cluster_ip);
    }

    #[test]
    fn an_unrelated_sidecar_connection_does_not_take_a_waiting_inbound_accept() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        c.open(inbound_accept(21));
        // Envoy's xDS connection opens meanwhile.
        c.open(leg(
            30,
            Role::Sidecar,
            false,
            (POD_IP, 43000),
            (Ipv4Addr::new(10, 96, 0, 1), 15012),
        ));
        // Then its socket to the app's port on the pod's address, which
        // the app accepts.
        c.open(leg(
            22,
            Role::Sidecar,
            false,
            (POD_IP, 42000),
            (POD_IP, 8080),
        ));
        c.open(leg(23, Role::App, true, (POD_IP, 8080), (POD_IP, 42000)));
        let chain = c.chain_of(23).expect("chained");
        assert_eq!(
            (chain.sidecar_app_side, chain.sidecar_net_side),
            (Some(22), Some(21))
        );
        assert!(c.chain_of(30).is_none());
        // The xDS connection waits unclaimed, as a pooled one would.
        assert_eq!(c.pending(), 1);
    }

    #[test]
    fn one_pod_at_its_cap_does_not_stop_linking_in_another() {
        let caps = PendingCaps {
            per_pod: 16,
            total: 64,
        };
        let mut c = Chains::new(CapturePorts::default(), caps);
        // A pod without a sidecar: its app connections never link.
        for i in 0..1000u16 {
            let mut l = leg(
                10_000 + u64::from(i),
                Role::App,
                false,
                (POD_IP, 10000 + i),
                (DST, 3306),
            );
            l.pod_uid = "no-sidecar".into();
            c.open(l);
        }
        assert_eq!(c.pending(), 16, "capped per pod, oldest first");
        assert_eq!(c.evicted, 1000 - 16);
        outbound(&mut c, 0, 40000);
        assert!(c.chain_of(1).is_some_and(Chain::complete));
        // Its closes find their legs without a scan, evicted or not.
        for i in 0..1000u16 {
            c.close(
                10_000 + u64::from(i),
                end(1, ClosedBy::Local, CloseKind::Fin, false),
            );
        }
        assert_eq!(c.pending(), 0);
        assert!(c.pods.len() <= 1, "empty pod queues are dropped");
    }

    #[test]
    fn sidecar_idle_timeout_is_origin_sidecar() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound(&mut c, 0, 40000);
        // Envoy closes both of its legs; the app sees the peer's FIN.
        assert_eq!(
            c.close(3, end(100, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        assert_eq!(
            c.close(2, end(101, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        let e = c
            .close(1, end(102, ClosedBy::Peer, CloseKind::Fin, true))
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
            let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
            outbound(&mut c, 0, 40000);
            c.close(1, end(300, ClosedBy::Peer, CloseKind::Fin, true));
            c.close(2, end(200, ClosedBy::Local, CloseKind::Fin, false));
            let e = c.close(3, end(100, closed_by, kind, true)).expect("ended");
            assert_eq!(
                (e.origin, e.upstream_keepalive),
                (Origin::Upstream, true),
                "{closed_by:?} {kind:?}"
            );
        }
    }

    /// A black hole: the app's query went upstream, nothing answered, the
    /// app gave up and closed first, Envoy closed both of its legs, and the
    /// upstream leg's orphan timed out with the query unacknowledged.
    #[test]
    fn upstream_unanswered_before_the_app_gave_up_is_origin_upstream() {
        let ms = 1_000_000;
        for (sent_ms_before_app_end, want) in [(5_000, Origin::Upstream), (50, Origin::App)] {
            let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
            outbound(&mut c, 0, 40000);
            let app_end = 10_000 * ms;
            let mut app = end(app_end, ClosedBy::Local, CloseKind::Fin, true);
            app.idle = Some(Duration::from_millis(sent_ms_before_app_end));
            c.close(1, app);
            c.close(2, end(app_end + ms, ClosedBy::Peer, CloseKind::Fin, false));
            let mut up = end(app_end + 2 * ms, ClosedBy::Local, CloseKind::Fin, false);
            up.unanswered_since_ns = app_end - sent_ms_before_app_end * ms;
            up.idle = Some(Duration::from_secs(3));
            let e = c.close(3, up).expect("ended");
            assert_eq!(e.origin, want, "sent {sent_ms_before_app_end} ms before");
            // The idle time is the deciding leg's: the silence before the
            // unanswered send, or the app's own.
            let idle = if want == Origin::Upstream {
                Duration::from_secs(3)
            } else {
                Duration::from_millis(sent_ms_before_app_end)
            };
            assert_eq!(e.idle, Some(idle));
        }
    }

    #[test]
    fn the_chains_idle_time_is_that_of_the_leg_that_ended_first() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound(&mut c, 0, 40000);
        let mut up = end(100, ClosedBy::Peer, CloseKind::Fin, false);
        up.idle = Some(Duration::from_millis(20));
        c.close(3, up);
        c.close(2, end(101, ClosedBy::Local, CloseKind::Fin, false));
        let mut app = end(102, ClosedBy::Peer, CloseKind::Fin, true);
        app.idle = Some(Duration::from_secs(9));
        let e = c.close(1, app).expect("ended");
        assert_eq!(
            (e.origin, e.idle),
            (Origin::Upstream, Some(Duration::from_millis(20))),
            "a busy connection the server closed"
        );
    }

    #[test]
    fn app_closing_first_is_origin_app() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound(&mut c, 0, 40000);
        c.close(1, end(100, ClosedBy::Local, CloseKind::Fin, true));
        c.close(2, end(101, ClosedBy::Peer, CloseKind::Fin, false));
        let e = c
            .close(3, end(102, ClosedBy::Local, CloseKind::Fin, false))
            .expect("ended");
        assert_eq!(e.origin, Origin::App);
    }

    #[test]
    fn inbound_chain_links_through_the_sidecar_socket_to_the_app() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        // Sidecar accepts the client on 15006, opens a socket to the app,
        // the app accepts it.
        c.open(inbound_accept(21));
        c.open(leg(
            22,
            Role::Sidecar,
            false,
            (Ipv4Addr::LOCALHOST, 42000),
            (Ipv4Addr::LOCALHOST, 8080),
        ));
        c.open(leg(
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
        assert_eq!(chain.peer, (CLIENT.into(), 50000));
        // The client goes away first: origin "app" is the far app (client).
        c.close(21, end(100, ClosedBy::Peer, CloseKind::Fin, false));
        c.close(22, end(101, ClosedBy::Local, CloseKind::Fin, false));
        let e = c
            .close(23, end(102, ClosedBy::Peer, CloseKind::Fin, false))
            .expect("ended");
        assert_eq!(e.origin, Origin::App);
    }

    #[test]
    fn sockets_outside_pods_and_unmatched_legs_make_no_chain_and_no_leak() {
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        let mut host = leg(1, Role::App, false, (POD_IP, 40000), (DST, 3306));
        host.pod_uid.clear();
        c.open(host);
        c.open(leg(5, Role::App, false, (POD_IP, 40005), (DST, 3306)));
        assert!(c.is_empty());
        assert_eq!(
            c.close(5, end(1, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        assert!(c.pending() == 0, "closed pending legs are forgotten");
        // Bounded: a flood of unmatched app sockets stops at the cap.
        let mut small = Chains::new(CapturePorts::default(), PendingCaps::new(16));
        for i in 0..1000u16 {
            small.open(leg(
                u64::from(i) + 100,
                Role::App,
                false,
                (POD_IP, 10000 + i),
                (DST, 3306),
            ));
        }
        assert!(small.pending() <= 16);
    }

    /// The snapshot's payload counts: `served` sockets sent payload the
    /// peer acknowledged and received some.
    fn snapshot(c: &mut Chains, served: &[u64], routes: &dyn Routes, now_ns: u64) {
        let bytes = |cookie: u64| {
            Some(if served.contains(&cookie) {
                (10, 10)
            } else {
                (0, 0)
            })
        };
        c.on_snapshot(&bytes, routes, now_ns);
    }

    /// `apps` chains to the Service, accepted by worker 101, then two
    /// upstream legs that worker opened (cookies 1001, 1002).
    fn apps_and_two_upstream_legs(apps: u16) -> (OneService, Chains) {
        let svc = service();
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        for i in 0..apps {
            outbound_half(&mut c, 10 * u64::from(i), 40000 + i, svc.cluster_ip, 101);
        }
        c.on_open(upstream(1001, 41001, svc.backend, 101), &svc);
        c.on_open(upstream(1002, 41002, svc.backend, 101), &svc);
        (svc, c)
    }

    fn service() -> OneService {
        OneService {
            cluster_ip: (Ipv4Addr::new(10, 96, 0, 9).into(), 80),
            backend: (DST.into(), 8080),
        }
    }

    /// 8 app connections to a Service through an HTTP proxy that serves
    /// them over 2 upstream connections: the first two upstream legs are
    /// linked 1:1 as tcp_proxy's would be, until the sidecar's sockets
    /// show it answered chains that have no upstream leg; then all are a
    /// pool, and a server's close of a pooled leg is the pool's.
    #[test]
    fn an_http_pool_is_n_to_m_once_a_chain_without_upstream_leg_was_answered() {
        let (svc, mut c) = apps_and_two_upstream_legs(8);
        assert_eq!(c.len(), 2, "linked as tcp_proxy's until evidence");
        // A short-lived app connection: linked to a pooled leg, its
        // app-side legs end while that leg stays open.
        outbound_half(&mut c, 200, 40200, svc.cluster_ip, 102);
        c.on_open(upstream(1200, 41200, svc.backend, 102), &svc);
        assert_eq!(c.chain_of(1200).map(|ch| ch.app), Some(201));
        for leg in [201, 202] {
            c.close(leg, end(1, ClosedBy::Local, CloseKind::Fin, false));
        }
        let kept = c.chain_of(1200).map(|ch| ch.app);
        assert_eq!(kept, Some(201), "it waits for its upstream leg's end");
        assert!(c.evidence_due(2_000_000_000), "chains have waited 1 s");
        // Requests answered on every app connection; the sidecar's sockets
        // facing the app sent payload.
        let served: Vec<u64> = (0..8).map(|i| 10 * i + 2).chain([1001, 1002]).collect();
        // Half a second after the chains began: an upstream leg's open may
        // still be on its way.
        snapshot(&mut c, &served, &svc, 500_000_000);
        assert!(c.pools().next().is_none());
        snapshot(&mut c, &served, &svc, 2_000_000_000);
        assert_eq!((c.len(), c.pending()), (0, 0), "no 1:1 link is left");
        assert!(c.chain_of(201).is_none() && c.chain_of(1200).is_none());
        assert!(c.pool_for(1200).is_some(), "the pooled leg it had");
        assert_eq!(
            c.on_pool_close(1200, &end(2, ClosedBy::Local, CloseKind::Fin, false))
                .map(|p| p.app_connections),
            Some(8)
        );
        assert!(!c.evidence_due(2_000_000_000));
        for up in [1001, 1002] {
            assert!(c.chain_of(up).is_none());
        }
        let pool = c.pool_for(1).expect("pooled").clone();
        assert_eq!(pool.peer, svc.cluster_ip);
        assert_eq!(
            pool.upstream.iter().copied().collect::<Vec<_>>(),
            [1001, 1002]
        );
        assert_eq!(c.open_app_legs(&pool).count(), 8);
        assert_eq!(c.pool_for(1001), Some(&pool));
        assert_eq!(c.chain_of(1).map(|ch| ch.sidecar_app_side), Some(Some(2)));
        // A new app connection and a new upstream leg join the pool.
        outbound_half(&mut c, 100, 40100, svc.cluster_ip, 101);
        c.on_open(upstream(1003, 41003, svc.backend, 101), &svc);
        let pool = c.pool_for(101).expect("joined").clone();
        assert_eq!(
            (c.open_app_legs(&pool).count(), pool.upstream.len()),
            (9, 3)
        );
        assert_eq!(c.len(), 0);
        // A chain of the pod to the backend itself (passthrough) takes its
        // upstream leg before the pool does.
        outbound_half(&mut c, 300, 40300, svc.backend, 101);
        c.on_open(upstream(1300, 41300, svc.backend, 101), &svc);
        assert_eq!(c.chain_of(1300).map(|ch| ch.app), Some(301));
        assert_eq!(c.pool_for(101).map(|p| p.upstream.len()), Some(3));
        // The server closes an idle pooled connection.
        let mut e = end(5, ClosedBy::Peer, CloseKind::Fin, false);
        e.idle = Some(Duration::from_secs(5));
        let ended = c.on_pool_close(1001, &e).expect("a pooled leg's end");
        assert_eq!(
            (ended.origin, ended.app_connections, ended.peer),
            (Origin::Upstream, 9, svc.cluster_ip)
        );
        assert_eq!(c.close(1001, e), None, "no chain end");
        // The proxy closing one itself is the sidecar's; apps leave.
        let e = end(6, ClosedBy::Local, CloseKind::Fin, false);
        assert_eq!(
            c.on_pool_close(1002, &e).map(|p| p.origin),
            Some(Origin::Sidecar)
        );
        c.close(1, end(7, ClosedBy::Local, CloseKind::Fin, true));
        let pool = c.pool_for(2).expect("S1 still open").clone();
        assert_eq!(c.open_app_legs(&pool).count(), 8, "app leg 1 closed");
        c.close(2, end(8, ClosedBy::Peer, CloseKind::Fin, false));
        assert!(c.pool_for(2).is_none());
    }

    /// tcp_proxy: every chain got its own upstream leg, and a chain still
    /// waiting (its upstream connect not done) has had nothing written to
    /// the app: no pool.
    #[test]
    fn byte_pipes_stay_linked_one_to_one() {
        let (svc, mut c) = apps_and_two_upstream_legs(3);
        snapshot(&mut c, &[2, 12, 1001, 1002], &svc, 5_000_000_000);
        assert_eq!((c.len(), c.pending()), (2, 1));
        assert!(c.pools().next().is_none());
        c.on_open(upstream(1003, 41003, svc.backend, 101), &svc);
        assert_eq!((c.len(), c.pending()), (3, 0));
        // The proxy's own connection elsewhere (xDS) waits unclaimed and,
        // busy as it is, serves no dialled destination.
        let xds = (IpAddr::from(Ipv4Addr::new(10, 96, 0, 1)), 15012);
        c.on_open(upstream(1004, 41004, xds, 0), &svc);
        snapshot(&mut c, &[1004], &svc, 6_000_000_000);
        assert!(c.pools().next().is_none());
        assert_eq!(
            c.close(1004, end(1, ClosedBy::Local, CloseKind::Fin, false)),
            None
        );
        assert_eq!(c.pending(), 0);
    }

    /// A busy sidecar connection to a backend that no chain took is no
    /// pool (the proxy's own health check looks the same); the sidecar's
    /// socket of a waiting chain closing after it wrote to the app is.
    #[test]
    fn an_answered_waiting_chain_is_a_pool_and_a_busy_unclaimed_leg_is_not() {
        let svc = service();
        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound_half(&mut c, 0, 40000, svc.cluster_ip, 0);
        c.on_open(upstream(1001, 41001, svc.backend, 0), &svc);
        assert_eq!(c.len(), 1);
        // An active health check of the backend.
        c.on_open(upstream(1002, 41002, svc.backend, 0), &svc);
        assert_eq!(c.pending(), 1, "unclaimed");
        snapshot(&mut c, &[1001, 1002], &svc, 5_000_000_000);
        assert!(c.pools().next().is_none());
        assert_eq!((c.len(), c.pending()), (1, 1));

        let mut c = Chains::new(CapturePorts::default(), PendingCaps::new(1000));
        outbound_half(&mut c, 0, 40000, svc.cluster_ip, 0);
        outbound_half(&mut c, 10, 40001, svc.cluster_ip, 0);
        c.on_open(upstream(1001, 41001, svc.backend, 0), &svc);
        let mut e = end(1, ClosedBy::Peer, CloseKind::Fin, false);
        e.bytes_acked = 20;
        c.on_close(12, e, &svc);
        assert!(c.pool_for(1001).is_some());
        assert_eq!(c.len(), 0);
        // With the pool known, an unclaimed upstream leg to its backend
        // joins it.
        c.on_open(upstream(1003, 41003, svc.backend, 0), &svc);
        assert_eq!(c.pool_for(1003).map(|p| p.upstream.len()), Some(2));
    }
}
