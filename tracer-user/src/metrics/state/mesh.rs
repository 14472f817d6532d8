//! The mesh's share of the state: chain and pool ends counted, pool
//! evidence from the kernel's sockets, the pool gauges.

use super::{
    Cap, ChainEnd, ChainPeer, ConnEvent, Direction, Fact, Need, Origin, Pattern, PoolConnections,
    PoolEnd, State, SystemTime, kill_labels, on_off,
};

impl State {
    pub(super) fn on_chain_end(&mut self, end: &ChainEnd) {
        let Some((namespace, pod, peer)) = self.chain_labels(&end.chain, Need::Event) else {
            return;
        };
        let idle = end.idle.is_some_and(|i| i >= self.tracker.threshold);
        if end.origin == Origin::Sidecar {
            let mut f = Fact::new(Pattern::SidecarIdleTimeout, &namespace, &pod, &peer);
            f.subject.role = "sidecar".into();
            f.subject.direction = end.chain.direction.as_str().into();
            f.idle = end.idle;
            f.detail.insert(
                "upstream_keepalive".into(),
                on_off(end.upstream_keepalive).into(),
            );
            self.findings.observe(f, SystemTime::now());
        }
        log::debug!(
            "chain ended in {namespace}/{pod} to {peer}: origin {}, upstream keepalive {}, idle {:?}",
            end.origin.as_str(),
            end.upstream_keepalive,
            end.idle
        );
        let names = (namespace, pod, peer);
        let labels = kill_labels(&names, end.origin, end.upstream_keepalive, idle);
        self.metrics.sidecar_chain_kills.inc(&labels);
    }

    pub(super) fn on_pool_end(&mut self, end: &PoolEnd) {
        let Some((namespace, pod, peer)) = self.tracker.pool_labels(&end.app_owner, end.peer)
        else {
            return;
        };
        let peer = self.admit(Cap::Peer, peer, Need::Event, false);
        let idle = end.idle.is_some_and(|i| i >= self.tracker.threshold);
        log::debug!(
            "pooled upstream leg of {namespace}/{pod} to {peer} ended ({} app legs open): {end:?}",
            end.app_connections
        );
        let names = (namespace, pod, peer);
        self.metrics.pool_kills.inc(&kill_labels(
            &names,
            end.origin,
            end.upstream_keepalive,
            idle,
        ));
        self.metrics.pool_kill_app_connections.observe(
            &ChainPeer {
                namespace: &names.0,
                pod: &names.1,
                peer: &names.2,
            },
            f64::from(u32::try_from(end.app_connections).unwrap_or(u32::MAX)),
        );
    }

    /// Pools that payload counts in `snapshot` reveal (see
    /// `track::chains::pools`).
    pub(crate) fn pool_evidence(&mut self, snapshot: &[ConnEvent]) {
        self.tracker.pool_evidence(snapshot);
    }

    /// Whether the pod and Service indexes have had their first lists (or
    /// there are none: `--no-kube`).
    pub(crate) fn indexes_loaded(&self) -> bool {
        let attr = &self.tracker.attr;
        attr.pods()
            .is_none_or(|p| p.synced() && attr.services().synced())
    }

    /// Whether a chain has waited long enough to look for pool evidence.
    pub(crate) fn pool_evidence_due(&self) -> bool {
        self.tracker
            .chains
            .evidence_due(crate::event::clock::monotonic_ns())
    }

    /// The pool gauges: connections by leg and keepalive, and the
    /// mismatch (upstream legs off where app legs are on). Returns the
    /// mismatches for the findings.
    pub(super) fn pool_gauges(&mut self) -> Vec<((String, String, String), u64)> {
        self.metrics.pool_connections.reset();
        self.metrics.pool_keepalive_mismatch.reset();
        let pools: Vec<_> = self.tracker.chains.pools().cloned().collect();
        let mut out = Vec::new();
        for pool in &pools {
            let table = &self.tracker.table;
            let ka = |c: u64| table.get(c).map(|c| c.ka.enabled != 0);
            let apps: Vec<bool> = self
                .tracker
                .chains
                .open_app_legs(pool)
                .filter_map(ka)
                .collect();
            let ups: Vec<bool> = pool.upstream.iter().filter_map(|&c| ka(c)).collect();
            let Some((namespace, pod, peer)) = self.tracker.pool_labels(&pool.app_owner, pool.peer)
            else {
                continue;
            };
            let peer = self.admit(Cap::Peer, peer, Need::Open, false);
            for (leg, legs) in [("app", &apps), ("upstream", &ups)] {
                for on in [true, false] {
                    let n = legs.iter().filter(|&&k| k == on).count();
                    if n > 0 {
                        self.metrics
                            .pool_connections
                            .of(&PoolConnections {
                                namespace: &namespace,
                                pod: &pod,
                                peer: &peer,
                                leg,
                                keepalive: on_off(on),
                            })
                            .add(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                }
            }
            let off = ups.iter().filter(|&&k| !k).count() as u64;
            let g = self.metrics.pool_keepalive_mismatch.of(&ChainPeer {
                namespace: &namespace,
                pod: &pod,
                peer: &peer,
            });
            if apps.iter().any(|&k| k) && off > 0 {
                g.add(i64::try_from(off).unwrap_or(i64::MAX));
                out.push(((namespace, pod, peer), off));
            }
        }
        out
    }

    /// (namespace, pod, peer) of a chain, the peer capped.
    pub(super) fn chain_labels(
        &mut self,
        chain: &crate::track::chains::Chain,
        need: Need,
    ) -> Option<(String, String, String)> {
        let (namespace, pod, peer) = self.tracker.chain_labels(chain)?;
        let inbound = chain.direction == Direction::Inbound;
        Some((namespace, pod, self.admit(Cap::Peer, peer, need, inbound)))
    }
}
