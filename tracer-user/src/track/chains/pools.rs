//! Pools: a proxy that speaks HTTP to the app (Envoy's
//! `http_connection_manager`) sends the requests of all its app
//! connections to one destination over a pool of upstream connections it
//! opens when a request finds none idle. N app connections, M upstream
//! connections, and no upstream connection belongs to one app connection.
//!
//! Which filter a listener runs is not knowable from the kernel; what a
//! byte pipe (tcp_proxy, any L4 proxy) cannot do is write to the app on a
//! connection that has no upstream connection of its own: it only
//! forwards what that one receives. So a chain still waiting for its
//! upstream leg whose sidecar socket has sent the app payload the app
//! acknowledged (seen in a snapshot of the kernel's sockets once the chain
//! has waited a second, or at that socket's close) makes the pod's
//! connections to that destination a pool. A busy sidecar connection that
//! no chain took is no such fact: the proxy's own connections (active
//! health checks, xDS) carry payload to the same destinations.
//!
//! From then on the pod's chains to that destination (and the upstream
//! legs that fit it) are pooled: their 1:1 links are undone, new ones join
//! the pool. Until the first evidence (a request served over another
//! connection: at most `resync_interval`, and about a second after a chain
//! has waited one), the upstream legs opened are linked to waiting chains
//! as for tcp_proxy.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use super::{Chains, Endpoint, Fit, Leg, LegEnd, Origin, PodKey, Routes, fit, pod_key};
use crate::track::classify::{CloseKind, ClosedBy};

/// A waiting chain is checked for pool evidence once it has waited this
/// long (a byte pipe connects upstream within its connect time; a pool
/// serves a request at once).
const EVIDENCE_AFTER_NS: u64 = 1_000_000_000;

/// One pod's pooled connections to one dialled destination.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pool {
    pub netns: u32,
    pub pod_uid: String,
    /// What the app dialled (a Service's ClusterIP:port, or the original
    /// destination).
    pub peer: Endpoint,
    /// An app leg's owner, for the pool's labels.
    pub app_owner: tracer_common::Owner,
    /// The pooled chains (app socket and the sidecar's socket facing it):
    /// chain id -> app socket.
    pub apps: BTreeMap<u64, u64>,
    /// The sidecar's upstream sockets.
    pub upstream: BTreeSet<u64>,
}

/// A pooled upstream connection ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolEnd {
    pub netns: u32,
    pub pod_uid: String,
    pub peer: Endpoint,
    pub app_owner: tracer_common::Owner,
    /// `upstream` (the server or the network ended it) or `sidecar` (the
    /// proxy closed it: its pool's idle timeout, a drain).
    pub origin: Origin,
    pub upstream_keepalive: bool,
    pub idle: Option<Duration>,
    /// App connections of the pod to that destination open at that moment.
    pub app_connections: usize,
}

impl Chains {
    /// The pool of `pod`'s connections to `dialled`, if there is one.
    pub(super) fn pool_of(&mut self, pod: &PodKey, dialled: Endpoint) -> Option<&mut Pool> {
        self.pools.get_mut(pod)?.get_mut(&dialled)
    }

    /// Every pool.
    pub(crate) fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values().flat_map(|p| p.values())
    }

    /// The pool a socket belongs to: a pooled upstream leg, or an app-side
    /// leg of a pooled chain.
    pub(crate) fn pool_for(&self, cookie: u64) -> Option<&Pool> {
        let (pod, dialled) = if let Some((pod, dialled)) = self.pooled_up.get(&cookie) {
            (pod.clone(), *dialled)
        } else {
            let chain = self.chain_of(cookie).filter(|c| c.pooled)?;
            ((chain.netns, chain.pod_uid.clone()), chain.peer)
        };
        self.pools.get(&pod)?.get(&dialled)
    }

    /// The app sockets of a pool whose app leg is still open.
    pub(crate) fn open_app_legs<'a>(&'a self, pool: &'a Pool) -> impl Iterator<Item = u64> + 'a {
        pool.apps.iter().filter_map(|(id, &app)| {
            self.open
                .get(id)
                .filter(|c| !c.ends.contains_key(&app))
                .map(|_| app)
        })
    }

    /// A sidecar socket to the network joins a pool of its pod whose
    /// destination it serves (not one it merely might: with no Service
    /// index it is left to the chains, inferred).
    pub(super) fn join_pool(&mut self, leg: &Leg, routes: &dyn Routes) -> bool {
        let pod = pod_key(leg);
        // A chain waiting for exactly this destination (passthrough to a
        // backend that a pooled Service also has) takes it first.
        let exact = self.pods.get(&pod).is_some_and(|q| {
            q.chains
                .values()
                .any(|id| self.open.get(id).is_some_and(|c| c.peer == leg.remote))
        });
        let Some(pools) = self.pools.get_mut(&pod).filter(|_| !exact) else {
            return false;
        };
        let fitting: Vec<Endpoint> = pools
            .keys()
            .copied()
            .filter(|d| fit(routes, *d, leg.remote) >= Fit::Service)
            .collect();
        let [dialled] = fitting[..] else {
            return false;
        };
        if let Some(pool) = pools.get_mut(&dialled) {
            pool.upstream.insert(leg.cookie);
        }
        self.pooled_up.insert(leg.cookie, (pod, dialled));
        true
    }

    /// `pod`'s connections to `dialled` are a pool: its chains to it are
    /// undone into the pool's app legs, their upstream legs and the
    /// unclaimed ones that serve `dialled` into its upstream legs.
    pub(super) fn declare_pool(&mut self, pod: &PodKey, dialled: Endpoint, routes: &dyn Routes) {
        let ids: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, c)| {
                c.direction == super::Direction::Outbound
                    && !c.pooled
                    && c.peer == dialled
                    && c.netns == pod.0
                    && c.pod_uid == pod.1
            })
            .map(|(id, _)| *id)
            .collect();
        let mut apps = BTreeMap::new();
        let mut upstream = BTreeSet::new();
        let mut app_owner = None;
        for id in ids {
            let Some(mut chain) = self.open.remove(&id) else {
                continue;
            };
            self.unqueue(&chain);
            self.forget_chain_accept(&chain);
            if let Some(up) = chain.sidecar_net_side.take() {
                self.complete -= 1;
                self.by_cookie.remove(&up);
                if chain.ends.remove(&up).is_none() {
                    upstream.insert(up);
                }
            }
            if chain.legs().iter().all(|l| chain.ends.contains_key(l)) {
                // Its app-side legs ended while it waited for the (pooled)
                // upstream leg it had been given: nothing is left of it.
                for leg in chain.legs() {
                    self.by_cookie.remove(&leg);
                }
                continue;
            }
            chain.waiting = None;
            chain.accept_key = None;
            chain.inferred = false;
            chain.pooled = true;
            app_owner.get_or_insert(chain.app_owner);
            apps.insert(id, chain.app);
            self.open.insert(id, chain);
        }
        let unclaimed: Vec<u64> = self.pods.get(pod).map_or_else(Vec::new, |q| {
            q.upstream
                .values()
                .copied()
                .filter(|c| {
                    self.pending
                        .get(c)
                        .is_some_and(|p| fit(routes, dialled, p.leg.remote) >= Fit::Service)
                })
                .collect()
        });
        for cookie in unclaimed {
            if self.take_pending(cookie).is_some() {
                upstream.insert(cookie);
            }
        }
        for &cookie in &upstream {
            self.pooled_up.insert(cookie, (pod.clone(), dialled));
        }
        let pool = self
            .pools
            .entry(pod.clone())
            .or_default()
            .entry(dialled)
            .or_insert_with(|| Pool {
                netns: pod.0,
                pod_uid: pod.1.clone(),
                peer: dialled,
                app_owner: app_owner.unwrap_or_default(),
                apps: BTreeMap::new(),
                upstream: BTreeSet::new(),
            });
        pool.apps.extend(apps);
        pool.upstream.extend(upstream);
        log::debug!(
            "pod {} pools its connections to {dialled:?}: {} app, {} upstream",
            pod.1,
            pool.apps.len(),
            pool.upstream.len()
        );
    }

    /// A pooled chain ended or was forgotten: it leaves its pool.
    pub(super) fn leave_pool(&mut self, chain: &super::Chain, id: u64) {
        if !chain.pooled {
            return;
        }
        let pod = (chain.netns, chain.pod_uid.clone());
        if let Some(pool) = self.pool_of(&pod, chain.peer) {
            pool.apps.remove(&id);
        }
        self.drop_empty_pool(&pod, chain.peer);
    }

    fn drop_empty_pool(&mut self, pod: &PodKey, dialled: Endpoint) {
        let Some(pools) = self.pools.get_mut(pod) else {
            return;
        };
        if pools
            .get(&dialled)
            .is_some_and(|p| p.apps.is_empty() && p.upstream.is_empty())
        {
            pools.remove(&dialled);
        }
        if pools.is_empty() {
            self.pools.remove(pod);
        }
    }

    /// A pooled upstream leg the kernel no longer has.
    pub(super) fn forget_pooled_upstream(&mut self, cookie: u64) -> Option<Pool> {
        let (pod, dialled) = self.pooled_up.remove(&cookie)?;
        let pool = self.pool_of(&pod, dialled)?;
        pool.upstream.remove(&cookie);
        let summary = Pool {
            apps: BTreeMap::new(),
            upstream: BTreeSet::new(),
            ..pool.clone()
        };
        self.drop_empty_pool(&pod, dialled);
        Some(summary)
    }

    /// A connection ended: for a pooled upstream leg, its end.
    pub(crate) fn on_pool_close(&mut self, cookie: u64, end: &LegEnd) -> Option<PoolEnd> {
        let (pod, dialled) = self.pooled_up.get(&cookie)?.clone();
        let app_connections = self
            .pools
            .get(&pod)
            .and_then(|p| p.get(&dialled))
            .map_or(0, |pool| self.open_app_legs(pool).count());
        let pool = self.forget_pooled_upstream(cookie)?;
        let by_peer = end.closed_by == ClosedBy::Peer || end.close_kind == CloseKind::Timeout;
        Some(PoolEnd {
            netns: pool.netns,
            pod_uid: pool.pod_uid,
            peer: pool.peer,
            app_owner: pool.app_owner,
            origin: if by_peer {
                Origin::Upstream
            } else {
                Origin::Sidecar
            },
            upstream_keepalive: end.keepalive,
            idle: end.idle,
            app_connections,
        })
    }

    /// Whether a chain has waited long enough for its upstream leg to be
    /// checked for pool evidence ([`Self::on_snapshot`]).
    pub(crate) fn evidence_due(&self, now_ns: u64) -> bool {
        self.unchecked
            .first_key_value()
            .is_some_and(|(_, &(_, since))| since.saturating_add(EVIDENCE_AFTER_NS) <= now_ns)
    }

    /// The payload each live socket carried (`bytes`: cookie ->
    /// (received, sent and acknowledged)), taken at `now_ns`: pools found
    /// by the module's rule.
    pub(crate) fn on_snapshot(
        &mut self,
        bytes: &dyn Fn(u64) -> Option<(u64, u64)>,
        routes: &dyn Routes,
        now_ns: u64,
    ) {
        let mut found: Vec<(PodKey, Endpoint)> = Vec::new();
        for (pod, q) in &self.pods {
            for id in q.chains.values() {
                let Some(chain) = self.open.get(id) else {
                    continue;
                };
                // A chain younger than that may have its upstream leg's open
                // event still to come (a byte pipe's links swapped by order).
                let waited = chain.since_ns.saturating_add(EVIDENCE_AFTER_NS) <= now_ns;
                if waited
                    && chain
                        .sidecar_app_side
                        .and_then(bytes)
                        .is_some_and(|(_, acked)| acked > 0)
                {
                    found.push((pod.clone(), chain.peer));
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        for (pod, dialled) in found {
            self.declare_pool(&pod, dialled, routes);
        }
        let checked: Vec<u64> = self
            .unchecked
            .iter()
            .take_while(|(_, (_, since))| since.saturating_add(EVIDENCE_AFTER_NS) <= now_ns)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in checked {
            self.unchecked.remove(&seq);
        }
    }
}
