//! How a chain ends: each leg's end, and once all have ended which leg
//! ended first and what that means (the chain's origin).

use std::time::Duration;

use super::{Chain, Chains, Direction, Routes, accept_key};
use crate::track::classify::{CloseKind, ClosedBy};

/// How a leg ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LegEnd {
    /// CLOCK_MONOTONIC when it left ESTABLISHED (0: unknown).
    pub end_ns: u64,
    pub closed_by: ClosedBy,
    pub close_kind: CloseKind,
    pub keepalive: bool,
    /// Its idle time at the end, as the metrics report it (the silence
    /// before a send that died, else the idle time when it left
    /// ESTABLISHED).
    pub idle: Option<Duration>,
    /// When the flight of payload that died unanswered (a reset or a
    /// timeout met it) began, CLOCK_MONOTONIC ns; 0: none did.
    pub unanswered_since_ns: u64,
    /// Payload this side sent that the peer acknowledged, and payload
    /// received, over its life.
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// TCP's minimum retransmission timeout (`TCP_RTO_MIN`, 200 ms): payload
/// unacknowledged for longer than that has been retransmitted at least
/// once.
const RTO_MIN_NS: u64 = 200_000_000;

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

/// A chain that ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChainEnd {
    pub chain: Chain,
    pub origin: Origin,
    /// Keepalive of the network-side (upstream) leg at its end.
    pub upstream_keepalive: bool,
    /// How long the chain had been idle when it ended: the idle time of
    /// the leg whose end decided the origin.
    pub idle: Option<Duration>,
}

impl Chains {
    /// A connection ended. Returns the chain's end once all its legs did
    /// (a pooled upstream leg's end: [`Self::on_pool_close`]).
    pub(crate) fn on_close(
        &mut self,
        cookie: u64,
        end: LegEnd,
        routes: &dyn Routes,
    ) -> Option<ChainEnd> {
        if let Some(p) = self.take_pending(cookie) {
            self.forget_accept(accept_key(&p.leg), cookie);
        }
        let id = *self.by_cookie.get(&cookie)?;
        let chain = self.open.get(&id)?;
        // The sidecar wrote to the app while this chain had no upstream
        // leg: a pool served it.
        if chain.waiting.is_some() && chain.sidecar_app_side == Some(cookie) && end.bytes_acked > 0
        {
            let (pod, dialled) = ((chain.netns, chain.pod_uid.clone()), chain.peer);
            self.declare_pool(&pod, dialled, routes);
        }
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
        self.unqueue(&chain);
        self.forget_chain_accept(&chain);
        self.leave_pool(&chain, id);
        if !chain.complete() {
            return None;
        }
        self.complete -= 1;
        let (origin, decided_by) = origin(&chain);
        let idle = chain.ends.get(&decided_by).and_then(|e| e.idle);
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
            idle,
        })
    }
}

/// Which leg ended first, what that means, and the leg that decided it.
///
/// The first leg to leave ESTABLISHED names the origin, with one
/// exception: when the upstream-facing leg (outbound: the sidecar's socket
/// to the server; inbound: its socket to the app) died on a send that had
/// gone unanswered since at least one retransmission timeout before
/// another leg ended, the path or the server had stopped answering first
/// (a black hole: the app gave up waiting, and its close only looks first).
fn origin(chain: &Chain) -> (Origin, u64) {
    let first = chain
        .legs()
        .into_iter()
        .filter_map(|c| chain.ends.get(&c).filter(|e| e.end_ns > 0).map(|e| (c, *e)))
        .min_by_key(|(_, e)| e.end_ns);
    let Some((cookie, end)) = first else {
        return (Origin::App, chain.app);
    };
    let upstream = match chain.direction {
        Direction::Outbound => chain.sidecar_net_side,
        Direction::Inbound => chain.sidecar_app_side,
    };
    if let Some(up) = upstream.filter(|u| *u != cookie)
        && let Some(e) = chain.ends.get(&up)
        && e.unanswered_since_ns > 0
        && e.unanswered_since_ns.saturating_add(RTO_MIN_NS) <= end.end_ns
    {
        return (Origin::Upstream, up);
    }
    (first_leg_origin(chain, cookie, &end), cookie)
}

/// The origin named by the first leg to end.
fn first_leg_origin(chain: &Chain, cookie: u64, end: &LegEnd) -> Origin {
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
