//! Stage 4, track: per-connection state, pure and unit-testable. Takes
//! decoded events with their owners and gives the connection table
//! ([`table`]), how each connection ended ([`classify`]), the app ->
//! sidecar -> upstream chains ([`chains`]) and the reconciliation with the
//! kernel's live sockets ([`Tracker::resync`]): the [`Tracker`] applies
//! each event and says what came of it ([`Outcome`]), for the metrics to
//! count. No I/O of its own beyond the owner lookups: tests drive it with
//! synthetic kernel records.

pub(crate) mod chains;
pub(crate) mod classify;
mod resync;
pub(crate) mod table;
#[cfg(test)]
mod tests;
mod tracker;

use std::{net::IpAddr, ops::RangeInclusive};

use tracer_common::Owner;

pub(crate) use self::tracker::{Closed, MeshEnd, Outcome, Tracker};
use crate::event::addr::{Endpoint, canonical};

/// Which side opened a connection (or a chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Direction {
    /// This side connected (for a chain: app -> sidecar -> upstream server).
    Outbound,
    /// This side accepted (for a chain: client -> sidecar -> app).
    Inbound,
}

impl Direction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Accepted sockets are inbound, connecting ones outbound. For sockets
/// older than the tracer (owner unknown), a local port in the ephemeral
/// range means this side connected.
pub(crate) fn direction(
    owner: &Owner,
    local_port: u16,
    ephemeral: &RangeInclusive<u16>,
) -> Direction {
    if owner.is_inherited() {
        Direction::Inbound
    } else if owner.is_known() || ephemeral.contains(&local_port) {
        Direction::Outbound
    } else {
        Direction::Inbound
    }
}

/// The `peer` label: `ip:port` of the service for outbound connections;
/// the client's `ip` alone for inbound ones (its port is ephemeral and
/// would make the label unbounded).
pub(crate) fn peer_label(remote: IpAddr, remote_port: u16, dir: Direction) -> String {
    let ip = canonical(remote);
    match dir {
        Direction::Inbound => ip.to_string(),
        Direction::Outbound => Endpoint::new(ip, remote_port).to_string(),
    }
}
