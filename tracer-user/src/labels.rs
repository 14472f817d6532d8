//! Who a socket belongs to, as metric labels: pod attribution, role,
//! direction and peer, with every open-ended label capped.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
    ops::RangeInclusive,
};

use tracer_common::{Owner, owner_flags};

/// The pod, container and role of a socket's owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Attribution {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Role {
    App,
    Sidecar,
    /// Not in a pod.
    #[default]
    Host,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::App => "app",
            Self::Sidecar => "sidecar",
            Self::Host => "host",
        }
    }
}

/// Attribution of an owner. Until pod metadata is wired in (Kubernetes
/// issue), every socket is a host socket with empty pod labels.
pub fn attribute(_owner: &Owner) -> Attribution {
    Attribution::default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// The local ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or(32768..=60999)
}

pub fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (lo <= hi).then_some(lo..=hi)
}

/// Accepted sockets are inbound, connecting ones outbound. For sockets
/// older than the tracer (owner unknown), a local port in the ephemeral
/// range means this side connected.
pub fn direction(owner: &Owner, local_port: u16, ephemeral: &RangeInclusive<u16>) -> Direction {
    if owner.flags & owner_flags::INHERITED != 0 {
        Direction::Inbound
    } else if owner.flags & owner_flags::KNOWN != 0 || ephemeral.contains(&local_port) {
        Direction::Outbound
    } else {
        Direction::Inbound
    }
}

/// v4-mapped IPv6 addresses shown as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The `peer` label: `ip:port` of the service for outbound connections;
/// the client's `ip` alone for inbound ones (its port is ephemeral and
/// would make the label unbounded).
pub fn peer_label(remote: IpAddr, remote_port: u16, dir: Direction) -> String {
    let ip = canonical(remote);
    match (dir, ip) {
        (Direction::Inbound, ip) => ip.to_string(),
        (Direction::Outbound, IpAddr::V6(v6)) => format!("[{v6}]:{remote_port}"),
        (Direction::Outbound, IpAddr::V4(v4)) => format!("{v4}:{remote_port}"),
    }
}

/// Caps the distinct values of one label: the first `max` values pass,
/// later new ones fold into "other".
#[derive(Debug)]
pub struct LabelCap {
    seen: HashSet<String>,
    max: usize,
    /// Values folded into "other" so far.
    pub overflowed: u64,
}

pub const OTHER: &str = "other";

impl LabelCap {
    pub fn new(max: usize) -> Self {
        Self {
            seen: HashSet::new(),
            max,
            overflowed: 0,
        }
    }

    /// The value to use for `value`.
    pub fn admit(&mut self, value: String) -> String {
        if self.seen.contains(&value) {
            return value;
        }
        if self.seen.len() < self.max {
            self.seen.insert(value.clone());
            return value;
        }
        self.overflowed += 1;
        OTHER.to_string()
    }
}

/// An address for display: `ip:port`, IPv6 in brackets.
pub fn endpoint(ip: IpAddr, port: u16) -> String {
    match canonical(ip) {
        IpAddr::V6(v6) if v6 == Ipv6Addr::UNSPECIFIED => format!("[::]:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("{v4}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn direction_from_owner_or_port() {
        let eph = 32768..=60999;
        let mut o = Owner {
            flags: owner_flags::KNOWN | owner_flags::INHERITED,
            ..Owner::default()
        };
        assert_eq!(direction(&o, 3306, &eph), Direction::Inbound);
        o.flags = owner_flags::KNOWN;
        assert_eq!(direction(&o, 40000, &eph), Direction::Outbound);
        o.flags = 0;
        assert_eq!(direction(&o, 40000, &eph), Direction::Outbound);
        assert_eq!(direction(&o, 3306, &eph), Direction::Inbound);
    }

    #[test]
    fn peer_labels_are_bounded_by_construction() {
        let v4: IpAddr = Ipv4Addr::new(10, 0, 0, 7).into();
        assert_eq!(peer_label(v4, 3306, Direction::Outbound), "10.0.0.7:3306");
        assert_eq!(peer_label(v4, 51234, Direction::Inbound), "10.0.0.7");
        let mapped: IpAddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().into();
        assert_eq!(
            peer_label(mapped, 6379, Direction::Outbound),
            "127.0.0.1:6379"
        );
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(peer_label(v6, 80, Direction::Outbound), "[fd00::1]:80");
        assert_eq!(endpoint(v6, 80), "[fd00::1]:80");
    }

    #[test]
    fn cap_folds_new_values_into_other() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("a".into()), "a");
        assert_eq!(cap.admit("b".into()), "b");
        assert_eq!(cap.admit("c".into()), OTHER);
        assert_eq!(cap.admit("a".into()), "a", "known values keep passing");
        assert_eq!(cap.overflowed, 1);
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(parse_port_range("x"), None);
    }
}
