use std::net::{IpAddr, Ipv4Addr};

use tracer_common::{Owner, owner_flags};

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
    assert_eq!(
        Endpoint::new(v6, 80).canonical().to_string(),
        "[fd00::1]:80"
    );
}
