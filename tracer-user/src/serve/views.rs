//! `/connections`: the tracked connections merged with a live snapshot,
//! and the view types the `connections` client reads back.

use std::{collections::HashSet, time::Duration};

use serde::{Deserialize, Serialize};
use tracer_common::{EventInfo, owner_flags, tcp_state};

use crate::{
    event::{
        ConnEvent,
        addr::Endpoint,
        clock::{WallClock, monotonic_ns},
        jiffies::{Hz, elapsed, later},
        names::state_name,
        snapshot_connections,
    },
    owner::attribute::Attribution,
    track::{Tracker, classify::KeepaliveView, table::Conn},
};

/// One connection as `/connections` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ConnView {
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
    /// For a socket of a sidecar's HTTP pool (N:M, no 1:1 link): the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolView>,
    pub opened_at: Option<String>,
    pub age_s: Option<f64>,
    /// Seconds since the peer closed it (its FIN), for a connection its
    /// owner has not closed yet (CLOSE_WAIT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_wait_s: Option<f64>,
}

/// One leg of a chain, as `/connections` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChainLegView {
    pub cookie: u64,
    /// `app`, `sidecar-app-side` (the sidecar's socket facing the app) or
    /// `sidecar-upstream` (its socket facing the network).
    pub leg: String,
    pub local: String,
    pub remote: String,
    /// This leg's link to the chain is an inference, not a fact: the
    /// oldest of several chains that fitted, or no Service index to say
    /// whether its remote serves the app's destination (README, "Which
    /// links are inferred").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inferred: bool,
}

/// A pod's pooled connections to one destination, as `/connections`
/// shows them on each member: app connections and the sidecar's upstream
/// ones are N:M, none is another's own (README, "HTTP pools").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PoolView {
    /// `app` (the app's socket or the sidecar's socket facing it) or
    /// `upstream` (the sidecar's pooled upstream socket).
    pub leg: String,
    /// What the app dialled.
    pub dialled: String,
    /// The pool's open app connections and upstream connections.
    pub app_connections: usize,
    pub upstream_connections: usize,
}

/// A socket's local and remote endpoints, as `/connections` shows them.
fn endpoints(info: &EventInfo) -> (String, String) {
    let s = &info.sock;
    (
        Endpoint::new(s.local(), s.sport).canonical().to_string(),
        Endpoint::new(s.remote(), s.dport).canonical().to_string(),
    )
}

/// The tracked connections, merged with a fresh kernel snapshot (live
/// state, keepalive, idle time and bytes).
pub(crate) fn connections(
    tracker: &mut Tracker,
    snapshot: &[ConnEvent],
    hz: Hz,
    clock: &WallClock,
) -> Vec<ConnView> {
    let now = monotonic_ns();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let listening = listeners(snapshot);
    for (ev, s) in snapshot_connections(snapshot) {
        seen.insert(ev.info.cookie);
        let known = tracker.table.get(ev.info.cookie).cloned();
        let mut info = known
            .as_ref()
            .map_or_else(|| with_direction_hint(ev.info, &listening), |c| c.info);
        info.sock.state = ev.info.sock.state;
        let mut v = view(
            tracker,
            &info,
            known.as_ref(),
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
    let rest: Vec<Conn> = tracker
        .table
        .iter()
        .filter(|c| !seen.contains(&c.info.cookie))
        .cloned()
        .collect();
    for c in &rest {
        out.push(view(
            tracker,
            &c.info,
            Some(c),
            &KeepaliveView::new(&c.ka, hz),
            now,
            clock,
        ));
    }
    out.sort_by(|a, b| {
        (&a.namespace, &a.pod, a.pid, a.cookie).cmp(&(&b.namespace, &b.pod, b.pid, b.cookie))
    });
    out
}

fn view(
    tracker: &mut Tracker,
    info: &EventInfo,
    known: Option<&Conn>,
    ka: &KeepaliveView,
    now: u64,
    clock: &WallClock,
) -> ConnView {
    let Attribution {
        namespace,
        pod,
        container,
        role,
        ..
    } = tracker.attr.attribute(&info.owner);
    let chain = chain_view(tracker, info.cookie);
    let pool = pool_view(tracker, info.cookie);
    let (local, remote) = endpoints(info);
    ConnView {
        cookie: info.cookie,
        state: state_name(info.sock.state).to_string(),
        direction: tracker.direction(info).as_str().to_string(),
        role: role.as_str().to_string(),
        namespace,
        pod,
        container,
        local,
        remote,
        netns: info.netns,
        owner: info.owner.kind().to_string(),
        pid: info.owner.pid,
        comm: info.owner.comm_str(),
        uid: info.owner.uid,
        cgroup_id: info.owner.cgroup_id,
        keepalive: *ka,
        idle_s: None,
        bytes_received: None,
        bytes_acked: None,
        tracked: known.is_some(),
        chain,
        pool,
        opened_at: known
            .filter(|c| c.opened)
            .map(|c| clock.rfc3339(c.seen_ns())),
        age_s: known
            .filter(|c| c.opened)
            .map(|c| Duration::from_nanos(now.saturating_sub(c.seen_ns())).as_secs_f64()),
        close_wait_s: known
            .filter(|c| c.peer_closed_ns != 0)
            .map(|c| Duration::from_nanos(now.saturating_sub(c.peer_closed_ns)).as_secs_f64()),
    }
}

/// The legs of the chain `cookie` belongs to, if any.
fn chain_view(tracker: &Tracker, cookie: u64) -> Vec<ChainLegView> {
    let Some(chain) = tracker.chains.chain_of(cookie) else {
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
            let (local, remote) = endpoints(&tracker.table.get(c)?.info);
            Some(ChainLegView {
                cookie: c,
                leg: (*name).to_string(),
                local,
                remote,
                inferred: chain.inferred && Some(c) == chain.sidecar_net_side,
            })
        })
        .collect()
}

/// The pool `cookie` belongs to, if any.
fn pool_view(tracker: &Tracker, cookie: u64) -> Option<PoolView> {
    let chains = &tracker.chains;
    let pool = chains.pool_for(cookie)?;
    Some(PoolView {
        leg: if pool.upstream.contains(&cookie) {
            "upstream"
        } else {
            "app"
        }
        .into(),
        dialled: Endpoint::new(pool.peer.0, pool.peer.1).to_string(),
        app_connections: chains.open_app_legs(pool).count(),
        upstream_connections: pool.upstream.len(),
    })
}

/// (netns, local port) of every listening socket in a snapshot.
fn listeners(snapshot: &[ConnEvent]) -> HashSet<(u32, u16)> {
    snapshot
        .iter()
        .filter(|ev| ev.info.sock.state == tcp_state::LISTEN)
        .map(|ev| (ev.info.netns, ev.info.sock.sport))
        .collect()
}

/// A connection of unknown owner whose local port is a listener's in its
/// namespace was accepted: mark it so (as an inherited owner would be).
fn with_direction_hint(mut info: EventInfo, listening: &HashSet<(u32, u16)>) -> EventInfo {
    if !info.owner.is_known() && listening.contains(&(info.netns, info.sock.sport)) {
        info.owner.flags |= owner_flags::INHERITED;
    }
    info
}
