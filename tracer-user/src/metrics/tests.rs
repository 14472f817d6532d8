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
            owner: Owner {
                namespace,
                pod,
                container: "app",
                role: "app",
            },
            direction: "outbound",
            peer,
            peer_state: "live",
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
            owner: Owner {
                namespace: "shop",
                pod: "cart-1",
                container: "app",
                role: "app",
            },
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
        idle: "true",
    });

    assert_eq!(m.forget_pod("shop", "cart-1"), 4);
    let text = m.render();
    assert!(!text.contains("cart-1"), "{text}");
    assert!(text.contains("pod=\"cart-2\""), "{text}");
    assert_eq!(m.forget_pod("shop", "cart-1"), 0, "nothing left");
    assert_eq!(m.forget_pod("other", "cart-2"), 0, "namespace must match");
}

/// `conntracer_connections_open` of (namespace, pod, container, role,
/// direction, keepalive).
fn open_gauge(
    m: &Metrics,
    [namespace, pod, container, role, direction, keepalive]: [&str; 6],
) -> i64 {
    m.connections_open
        .of(&ConnectionsOpen {
            owner: Owner {
                namespace,
                pod,
                container,
                role,
            },
            direction,
            keepalive,
        })
        .get()
}

/// `conntracer_peer_connections_open` of (namespace, pod, role, direction, peer).
fn peer_gauge(m: &Metrics, [namespace, pod, role, direction, peer]: [&str; 5]) -> i64 {
    m.peer_connections_open
        .of(&PeerConnectionsOpen {
            namespace,
            pod,
            role,
            direction,
            peer,
        })
        .get()
}

#[test]
fn gauges_count_the_table_by_owner_direction_keepalive_and_peer() {
    use crate::testing::{
        self, T0_NS, decoded,
        mesh::{DB_IP, MeshPod},
    };
    let mesh = MeshPod::new("gauges");
    let mut st = State::new(&Config::default(), mesh.attributor()).expect("state");
    let [app, accept, upstream] = mesh.outbound_chain(0, 40000, DB_IP);
    let mut app_open = app.open(T0_NS);
    app_open.data.ka.enabled = 1;
    st.handle(&decoded(&app_open));
    for sock in [accept, upstream] {
        st.handle(&decoded(&sock.open(T0_NS)));
    }
    // A host connection over loopback: its client and server sockets.
    for (cookie, outbound) in [(7, true), (8, false)] {
        let mut open = testing::open(T0_NS, outbound, 50000);
        open.info.cookie = cookie;
        st.handle(&decoded(&open));
    }
    st.render_metrics(0);
    let m = &st.metrics;
    assert_eq!(m.tracked_connections.get(), 5);
    assert_eq!(
        open_gauge(m, ["shop", "cart-1", "app", "app", "outbound", "on"]),
        1
    );
    assert_eq!(
        open_gauge(
            m,
            ["shop", "cart-1", "istio-proxy", "sidecar", "inbound", "off"]
        ),
        1
    );
    assert_eq!(
        open_gauge(
            m,
            [
                "shop",
                "cart-1",
                "istio-proxy",
                "sidecar",
                "outbound",
                "off"
            ]
        ),
        1
    );
    assert_eq!(open_gauge(m, ["", "", "", "host", "outbound", "off"]), 1);
    assert_eq!(open_gauge(m, ["", "", "", "host", "inbound", "off"]), 1);
    assert_eq!(
        peer_gauge(m, ["shop", "cart-1", "app", "outbound", "db/redis-0"]),
        1
    );
    assert_eq!(
        peer_gauge(m, ["shop", "cart-1", "sidecar", "outbound", "db/redis-0"]),
        1
    );
    assert_eq!(
        peer_gauge(m, ["shop", "cart-1", "sidecar", "inbound", "shop/cart-1"]),
        1
    );
    assert_eq!(
        peer_gauge(m, ["", "", "host", "outbound", "127.0.0.1:8080"]),
        1
    );
    assert_eq!(peer_gauge(m, ["", "", "host", "inbound", "127.0.0.1"]), 1);
    assert_eq!(m.chains_open.get(), 1);
    let mismatch = || {
        m.sidecar_keepalive_mismatch
            .of(&ChainPeer {
                namespace: "shop",
                pod: "cart-1",
                peer: "db/redis-0",
            })
            .get()
    };
    assert_eq!(mismatch(), 1, "keepalive on the app leg, off upstream");

    // The chain's legs close: the pod's gauges are gone, the host's stay.
    for (i, sock) in [upstream, accept, app].into_iter().enumerate() {
        st.handle(&decoded(&sock.close(T0_NS + 1_000 + i as u64, i != 1)));
    }
    let text = st.render_metrics(0);
    assert_eq!(st.metrics.tracked_connections.get(), 2);
    assert_eq!(st.metrics.chains_open.get(), 0);
    let open_lines: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("conntracer_connections_open{"))
        .collect();
    assert_eq!(open_lines.len(), 2, "{open_lines:?}");
    assert!(
        open_lines.iter().all(|l| l.contains("role=\"host\"")),
        "{open_lines:?}"
    );
}

/// `shop/grpc` (ClusterIP 10.96.5.1:50051 -> 15051) with 3 ready
/// backends 10.244.1.1-3 and a not-ready one, 10.244.1.4.
fn grpc_index() -> crate::owner::services::ServiceIndex {
    use crate::owner::services::tests::{endpoint, service, slice};
    let index = crate::owner::services::ServiceIndex::default();
    let svc = service(
        "shop",
        "grpc",
        &["10.96.5.1"],
        &[("grpc", 50051, serde_json::json!(15051))],
    );
    let eps: Vec<serde_json::Value> = (1..=4)
        .map(|i| endpoint(&format!("10.244.1.{i}"), &format!("grpc-{i}"), i < 4, false))
        .collect();
    let slices = [slice("shop", "grpc-x1", "grpc", &[("grpc", 15051)], &eps)];
    index.apply_json(&[svc], &slices);
    index
}

#[test]
fn imbalance_counts_long_lived_connections_to_ready_backends_only() {
    use crate::owner::attribute::SidecarRules;
    let attr = Attributor::new(None, None, grpc_index(), SidecarRules::default());
    let mut st = State::new(&Config::default(), attr).expect("state");
    let mut cookie = 0;
    let mut connect = |st: &mut State, to: [u8; 4], port: u16, n: u64, at_s: u64| {
        for _ in 0..n {
            cookie += 1;
            let mut ev = open(cookie, at_s * 1_000_000_000);
            ev.info.sock.daddr[..4].copy_from_slice(&to);
            ev.info.sock.dport = port;
            ev.info.sock.sport = 40000 + u16::try_from(cookie).unwrap();
            st.handle(&ev);
        }
    };
    // Long-lived: 20, 2 and 2 on the ready backends.
    connect(&mut st, [10, 244, 1, 1], 15051, 20, 0);
    connect(&mut st, [10, 244, 1, 2], 15051, 2, 0);
    connect(&mut st, [10, 244, 1, 3], 15051, 2, 0);
    // Not counted: a not-ready backend, the ClusterIP (NAT picks the pod
    // below the socket), another port, and young connections.
    connect(&mut st, [10, 244, 1, 4], 15051, 30, 0);
    connect(&mut st, [10, 96, 5, 1], 50051, 30, 0);
    connect(&mut st, [10, 244, 1, 2], 9999, 30, 0);
    connect(&mut st, [10, 244, 1, 2], 15051, 10, 9);
    let min_age = std::time::Duration::from_secs(5);
    let at = |s: u64| s * 1_000_000_000;
    let found = imbalance::findings(&mut st.tracker, 2.0, min_age, at(10));
    let [(f, n)] = &found[..] else {
        panic!("one finding: {found:#?}");
    };
    assert_eq!(*n, 24);
    assert_eq!(
        (f.subject.namespace.as_str(), f.subject.peer.as_str()),
        ("shop", "shop/grpc")
    );
    assert_eq!(
        f.detail["connections_per_pod"],
        serde_json::json!({"shop/grpc-1": 20, "shop/grpc-2": 2, "shop/grpc-3": 2})
    );
    assert_eq!(f.detail["mean"], 8.0);
    assert_eq!(f.detail["clients"], serde_json::json!({"host": 24}));
    // Before any is 5 s old: none; with the young ones grown up: 20/12/2
    // is under 2 times the mean (11.3).
    assert!(imbalance::findings(&mut st.tracker, 2.0, min_age, at(4)).is_empty());
    assert!(imbalance::findings(&mut st.tracker, 2.0, min_age, at(15)).is_empty());
}
