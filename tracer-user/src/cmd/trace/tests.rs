use std::net::{Ipv4Addr, Ipv6Addr};

use tracer_common::{AF_INET6, kind, tcp_state};

use super::*;
use crate::{
    event::{ConnEvent, EventData},
    testing::client_info as info,
};

#[test]
fn ipv6_and_v4_mapped_addresses_render() {
    let mut i = info(kind::STATE);
    i.sock.family = AF_INET6;
    i.sock.saddr = Ipv6Addr::LOCALHOST.octets();
    i.sock.daddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
    let ev = ConnEvent {
        info: i,
        data: EventData::State { old: 7, new: 2 },
    };
    let rec = TraceRecord::new(
        &ev,
        "t".into(),
        |_| String::new(),
        &mut HzTracker::new(Some(250)),
    );
    assert_eq!(rec.family, "ipv6");
    assert_eq!(rec.saddr, "::1");
    assert_eq!(rec.daddr, "::ffff:127.0.0.1");
    assert!(
        rec.to_line()
            .contains("[::1]:40000 -> [::ffff:127.0.0.1]:8080"),
        "{}",
        rec.to_line()
    );
    assert_eq!(rec.old_state, Some("CLOSE"));
    assert_eq!(rec.new_state, Some("SYN_SENT"));
}

#[test]
fn json_record_has_the_documented_fields() {
    let ev = ConnEvent {
        info: info(kind::STATE),
        data: EventData::State { old: 2, new: 1 },
    };
    let v = serde_json::to_value(TraceRecord::new(
        &ev,
        "T".into(),
        |_| String::new(),
        &mut HzTracker::new(Some(250)),
    ))
    .unwrap();
    assert_eq!(v["kind"], "state");
    assert_eq!(v["old_state"], "SYN_SENT");
    assert_eq!(v["new_state"], "ESTABLISHED");
    assert_eq!(v["pid"], 100);
    assert_eq!(v["tid"], 101);
    assert_eq!(v["comm"], "client");
    assert_eq!(v["owner"], "known");
    assert_eq!(v["sport"], 40000);
    assert_eq!(v["dport"], 8080);
    assert_eq!(v["netns"], 4_026_531_840_u32);
    assert!(v.get("errno").is_none());
}

#[test]
fn port_memo_restores_cleared_addresses_and_stays_bounded() {
    let mut memo = PortMemo::new(32);
    let ev = |cookie, sport, dport, data| {
        let mut i = info(kind::STATE);
        i.cookie = cookie;
        i.sock.sport = sport;
        i.sock.dport = dport;
        ConnEvent { info: i, data }
    };
    let st = |old, new| EventData::State { old, new };
    let mut e = ev(1, 0, 8080, st(tcp_state::CLOSE, tcp_state::SYN_SENT));
    memo.apply(&mut e);
    assert_eq!(e.info.sock.sport, 0, "nothing known yet");
    memo.apply(&mut ev(
        1,
        40000,
        8080,
        st(tcp_state::SYN_SENT, tcp_state::ESTABLISHED),
    ));
    let mut fin = ev(1, 0, 8080, st(tcp_state::FIN_WAIT2, tcp_state::CLOSE));
    memo.apply(&mut fin);
    assert_eq!(fin.info.sock.sport, 40000);
    // An error reported after the close, with the tuple cleared.
    let mut err = ev(1, 0, 0, EventData::Error { errno: 104 });
    err.info.sock.saddr = [0; 16];
    err.info.sock.daddr = [0; 16];
    memo.apply(&mut err);
    assert_eq!((err.info.sock.sport, err.info.sock.dport), (40000, 8080));
    assert_eq!(err.info.sock.saddr[..4], [127, 0, 0, 1]);
    assert_eq!(err.info.sock.daddr[..4], [127, 0, 0, 2]);
    // Closed sockets are forgotten past cap/16 of them; the map stays bounded.
    for c in 10..200 {
        memo.apply(&mut ev(
            c,
            1000,
            80,
            st(tcp_state::SYN_SENT, tcp_state::ESTABLISHED),
        ));
        memo.apply(&mut ev(
            c,
            1000,
            80,
            st(tcp_state::FIN_WAIT2, tcp_state::CLOSE),
        ));
        assert!(memo.len() <= 32, "{}", memo.len());
    }
    assert!(
        memo.len() <= 2 + 1,
        "only the recently closed remain: {}",
        memo.len()
    );
}
