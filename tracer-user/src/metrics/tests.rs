use tracer_common::{EventInfo, Keepalive, OpenData, SnapshotData, owner_flags, tcp_state};

use super::*;
use crate::{
    config::Config,
    event::{ConnEvent, EventData},
    owner::attribute::Attributor,
};

fn open(cookie: u64, ts_ns: u64) -> ConnEvent {
    let mut info = EventInfo {
        cookie,
        ts_ns,
        ..EventInfo::default()
    };
    info.sock.family = tracer_common::AF_INET;
    info.sock.sport = 40000;
    info.owner.flags = owner_flags::KNOWN;
    ConnEvent {
        info,
        data: EventData::Open(OpenData {
            ka: Keepalive::default(),
            jiffies: 0,
        }),
    }
}

fn snapshot(cookie: u64, state: u8, sport: u16) -> ConnEvent {
    let mut info = EventInfo {
        cookie,
        ..EventInfo::default()
    };
    info.sock.state = state;
    info.sock.sport = sport;
    ConnEvent {
        info,
        data: EventData::Snapshot(SnapshotData::default()),
    }
}

#[test]
fn resync_drops_missed_closes_keeps_new_opens_and_adds_older_sockets() {
    let mut st = State::new(&Config::default(), Attributor::host_only()).expect("state");
    st.handle(&open(1, 100)); // its close was missed
    st.handle(&open(2, 300)); // opened while the snapshot ran
    st.handle(&open(3, 100)); // still there
    let snap = [
        snapshot(3, tcp_state::ESTABLISHED, 40000),
        snapshot(4, tcp_state::ESTABLISHED, 8080), // older than the daemon
        snapshot(5, tcp_state::LISTEN, 8080),
    ];
    st.resync(&snap, 200);
    assert!(st.tracker.table.get(1).is_none(), "missed close reconciled");
    assert!(st.tracker.table.get(2).is_some() && st.tracker.table.get(3).is_some());
    let older = st.tracker.table.get(4).expect("older connection added");
    assert!(!older.opened);
    assert_eq!(
        older.info.owner.flags & owner_flags::INHERITED,
        owner_flags::INHERITED,
        "accepted by a listener on its port"
    );
    assert!(
        st.tracker.table.get(5).is_none(),
        "listeners are not connections"
    );
    assert_eq!(st.metrics.table_reconciled.get(), 1);
}

#[test]
fn forget_pod_removes_its_series_and_those_naming_it_as_peer_only() {
    let m = Metrics::new().expect("metrics");
    let kill = |namespace: &str, pod: &str, peer: &str| {
        m.idle_kills.inc(&IdleKill {
            namespace,
            pod,
            container: "app",
            role: "app",
            direction: "outbound",
            peer,
            closed_by: "peer",
            close_kind: "fin",
            keepalive: "on",
        });
    };
    kill("shop", "cart-1", "db/redis-0");
    kill("shop", "cart-2", "db/redis-0");
    kill("shop", "cart-2", "shop/cart-1");
    m.idle_before_close.observe(
        &IdleBeforeClose {
            namespace: "shop",
            pod: "cart-1",
            container: "app",
            role: "app",
            direction: "outbound",
            closed_by: "peer",
        },
        3.0,
    );
    m.sidecar_chain_kills.inc(&ChainKill {
        namespace: "shop",
        pod: "cart-1",
        peer: "db/redis-0",
        origin: "upstream",
        upstream_keepalive: "off",
    });

    assert_eq!(m.forget_pod("shop", "cart-1"), 4);
    let text = m.render();
    assert!(!text.contains("cart-1"), "{text}");
    assert!(text.contains("pod=\"cart-2\""), "{text}");
    assert_eq!(m.forget_pod("shop", "cart-1"), 0, "nothing left");
    assert_eq!(m.forget_pod("other", "cart-2"), 0, "namespace must match");
}
