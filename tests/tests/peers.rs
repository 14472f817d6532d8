//! Peers on every node: with the cluster's Services and EndpointSlices from
//! the (fake) API, the `peer` of an idle kill is `namespace/pod` for a pod
//! of another node and `namespace/service` for a ClusterIP (reached through
//! a kube-proxy-style DNAT, so the socket keeps the ClusterIP), and
//! `peer_state="deleted"` once that pod's endpoint is terminating. Redis's
//! own idle closes are the ground truth for each kill.

use std::{net::SocketAddr, process::Command, time::Duration};

use integration_tests::{
    NetNs, checked_output, ct_client,
    daemon::{Daemon, Metrics, names::KILLS},
    fake_kube::{FakeKube, SliceEndpoint, endpoint_slice_json, service_json},
    serial_unless_skipped,
    servers::Redis,
};

const NODE: &str = "node-peers-a";
/// The backend pod, on another node.
const POD_IP: &str = "10.244.72.5";
const CLUSTER_IP: &str = "10.96.72.10";
/// Redis's idle timeout: each kill comes ~2 s after the client's PING.
const IDLE_SECS: u32 = 2;

fn slice(terminating: bool) -> serde_json::Value {
    let eps = [SliceEndpoint {
        ip: POD_IP,
        pod: "cart-7d9f-a",
        node: "node-peers-b",
        ready: !terminating,
        terminating,
    }];
    endpoint_slice_json("shop", "cart-p8x2k", "cart", &[("redis", 8080)], &eps)
}

fn run_in(ns: &NetNs, program: &str, args: &[&str]) {
    let mut cmd: Command = ns.command(program);
    cmd.args(args);
    checked_output(&mut cmd, "");
}

/// One Redis client that idles until Redis closes it: an idle kill by the
/// peer, whose labels must match `want` (its first pair is the `peer`).
fn idle_kill(daemon: &Daemon, ns: &NetNs, redis: &Redis, to: SocketAddr, want: &[(&str, &str)]) {
    let closes = redis.idle_closes();
    let before = daemon.scrape();
    let mut idle = ct_client!(ns, "redis", to, &["--then", "wait-close"]);
    idle.expect_connected_ok();
    idle.expect_peer_close();
    let (m, later) = daemon.settle(&before, KILLS, want, 1.0, Duration::from_millis(500));
    m.assert_delta(&before, KILLS, want, 1.0);
    // Counted once, by the peer (other traffic on the host is not ours).
    later.assert_delta(&before, KILLS, &[want[0], ("closed_by", "peer")], 1.0);
    later.assert_delta(&before, KILLS, &want[..1], 1.0);
    assert_eq!(redis.idle_closes(), closes + 1, "Redis's own idle close");
}

#[test]
fn root_a_pod_of_another_node_and_a_cluster_ip_are_named_and_a_deleted_pod_is_marked() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    // The backend pod's address; the Service range routed out of the node
    // as on a real one (the route is looked up before the DNAT); and
    // kube-proxy's rule for the ClusterIP.
    let pod_addr = format!("{POD_IP}/32");
    let to = format!("{POD_IP}:8080");
    let setup: [&[&str]; 6] = [
        &["ip", "addr", "add", &pod_addr, "dev", "lo"],
        &[
            "ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1",
        ],
        &["ip", "addr", "add", "192.0.2.72/24", "dev", "svc0"],
        &["ip", "link", "set", "svc0", "up"],
        &["ip", "route", "add", "10.96.0.0/12", "dev", "svc0"],
        &[
            "iptables",
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            CLUSTER_IP,
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    ];
    for step in setup {
        run_in(&ns, step[0], &step[1..]);
    }
    let pod: SocketAddr = format!("{POD_IP}:8080").parse().unwrap();
    let redis = Redis::start(&ns, pod, IDLE_SECS);

    let kube = FakeKube::start(NODE);
    kube.set_services(vec![service_json(
        "shop",
        "cart",
        CLUSTER_IP,
        &[("redis", 80, 8080)],
    )]);
    kube.set_endpoint_slices(vec![slice(false)]);
    let daemon = Daemon::start_on("1s", &kube, "deleted_pod_grace = \"5m\"\n");
    // Whole counts, as text (no float comparison).
    let index = |m: &Metrics, kind: &str| {
        m.sum("conntracer_kube_index_entries", &[("kind", kind)])
            .to_string()
    };
    let m = daemon.wait_metrics(Duration::from_secs(20), |m| {
        index(m, "endpoints") == "1" && index(m, "service_ports") == "1"
    });
    assert_eq!(
        index(&m, "endpoints"),
        "1",
        "{}",
        m.dump("conntracer_kube_index_entries")
    );
    assert_eq!(index(&m, "service_ports"), "1");

    // The pod of another node, dialled directly.
    let live = [
        ("peer", "shop/cart-7d9f-a"),
        ("peer_state", "live"),
        ("direction", "outbound"),
    ];
    idle_kill(&daemon, &ns, &redis, pod, &live);
    // The Service, dialled at its ClusterIP.
    let cluster: SocketAddr = format!("{CLUSTER_IP}:80").parse().unwrap();
    let service = [("peer", "shop/cart"), ("peer_state", "live")];
    idle_kill(&daemon, &ns, &redis, cluster, &service);

    // The pod is being deleted: its endpoint turns terminating.
    kube.set_endpoint_slices(vec![slice(true)]);
    let m = daemon.wait_metrics(Duration::from_secs(20), |m| index(m, "deleted_pods") == "1");
    assert_eq!(
        index(&m, "deleted_pods"),
        "1",
        "{}",
        m.dump("conntracer_kube_index_entries")
    );
    let deleted = [("peer", "shop/cart-7d9f-a"), ("peer_state", "deleted")];
    idle_kill(&daemon, &ns, &redis, pod, &deleted);
    assert!(daemon.stop(), "daemon did not exit 0");
}
