//! Addresses for people and for labels: one canonical form of an IP and
//! one way to write an endpoint.

use std::{fmt, net::IpAddr};

/// v4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they
/// carry; a dual-stack socket reports its IPv4 peers that way.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// `ip:port`, IPv6 in brackets (`[::1]:80`), `?:port` without an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl Endpoint {
    pub(crate) fn new(ip: impl Into<Option<IpAddr>>, port: u16) -> Self {
        Self {
            ip: ip.into(),
            port,
        }
    }

    /// The endpoint with its address in [`canonical`] form.
    #[must_use]
    pub(crate) fn canonical(self) -> Self {
        Self {
            ip: self.ip.map(canonical),
            ..self
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.port),
            None => write!(f, "?:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn endpoints_render_one_way() {
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(Endpoint::new(v6, 80).to_string(), "[fd00::1]:80");
        assert_eq!(
            Endpoint::new(IpAddr::from(Ipv6Addr::UNSPECIFIED), 80).to_string(),
            "[::]:80"
        );
        let mapped = IpAddr::from(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(
            Endpoint::new(mapped, 6379).to_string(),
            "[::ffff:127.0.0.1]:6379"
        );
        assert_eq!(
            Endpoint::new(mapped, 6379).canonical().to_string(),
            "127.0.0.1:6379"
        );
        assert_eq!(Endpoint::new(None, 7).to_string(), "?:7");
    }
}
