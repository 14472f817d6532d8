//! The field report, reproduced: an app in a "pod" (its own network
//! namespace, kubelet-style cgroups, Istio's outbound redirect) talks to a
//! Redis server across a router whose conntrack expires idle flows, through
//! a real Envoy sidecar (uid 1337, ORIGINAL_DST, tcp_proxy). A fake
//! Kubernetes API serves the pods. The daemon must name the pod, container
//! and role of every leg, link the app's socket to both of Envoy's, and say
//! which leg ended first (compared with Envoy's and Redis's own counters);
//! and it must show the keepalive mismatch while the chain is open.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{thread, time::Duration};

use integration_tests::{
    daemon::{
        Metrics,
        names::{CHAIN_KILLS, KILLS, MISMATCH, STALE},
    },
    mesh::{Mesh, NAMESPACE, PEER, POD, Setup, keepalive_app_args, setup},
    netlab::InvalidAction,
    serial_unless_skipped, str_values,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");

/// The mesh with this test binary's `ct-client` as the app.
fn mesh(s: &Setup) -> Mesh {
    integration_tests::mesh::mesh(CLIENT, s)
}

fn chain(origin: &str, upstream_keepalive: &str) -> [(&'static str, String); 5] {
    [
        ("namespace", NAMESPACE.into()),
        ("pod", POD.into()),
        ("peer", PEER.into()),
        ("origin", origin.into()),
        ("upstream_keepalive", upstream_keepalive.into()),
    ]
}

fn labels<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Cases A and B: the app idles (Envoy's idle timeout `envoy_idle_s`,
/// Redis's `redis_timeout_secs`) until its connection is closed. Returns
/// the mesh, the scrape before (the open chain checked) and the scrape
/// after the chain's end.
fn idle_until_chain_ended(envoy_idle_s: u64, redis_timeout_secs: u32) -> (Mesh, Metrics, Metrics) {
    let app = ["--then", "wait-close"];
    let s = setup(
        envoy_idle_s,
        false,
        redis_timeout_secs,
        300,
        InvalidAction::Drop,
        &app,
    );
    let mut m = mesh(&s);
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
    m.app.expect_line("peer-closed");
    m.app.expect_line("closed");
    let after = chain_ended(&m, &before);
    (m, before, after)
}

/// Case C: the app with keepalive, Envoy's upstream leg with keepalive or
/// not, a path that resets expired flows. Returns the mesh and the scrape
/// before, the open chain checked.
fn case_c(upstream_keepalive: bool) -> (Mesh, Metrics) {
    let app_args = keepalive_app_args();
    let s = setup(
        60,
        upstream_keepalive,
        0,
        2,
        InvalidAction::Reject,
        &app_args,
    );
    let m = mesh(&s);
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
    (m, before)
}

/// The scrape half a second after the chain's end was counted.
fn chain_ended(m: &Mesh, before: &Metrics) -> Metrics {
    let linger = Duration::from_millis(500);
    m.daemon.settle(before, CHAIN_KILLS, &[], 1.0, linger).1
}

/// The one chain kill since `before`: its origin and upstream keepalive.
#[track_caller]
fn assert_sole_chain_kill(after: &Metrics, before: &Metrics, origin: &str, keepalive: &str) {
    after.assert_delta(before, CHAIN_KILLS, &labels(&chain(origin, keepalive)), 1.0);
    after.assert_delta(before, CHAIN_KILLS, &[], 1.0);
}

/// While the chain is open: each leg carries its pod, container and role,
/// /connections shows the chain, and the per-pod role counts add up.
fn assert_open_chain(m: &Mesh, before: &Metrics) {
    let now = m.daemon.wait_metrics(Duration::from_secs(5), |x| {
        x.sum("conntracer_sidecar_chains_open", &[]) >= 1.0
    });
    let open = "conntracer_connections_open";
    let pod = [("namespace", NAMESPACE), ("pod", POD)];
    assert_eq!(
        now.sum(
            open,
            &[
                &pod[..],
                &[
                    ("role", "app"),
                    ("container", "app"),
                    ("direction", "outbound")
                ]
            ]
            .concat()
        ),
        1.0,
        "{}",
        now.dump(open)
    );
    // Envoy's accept of the app and its upstream socket.
    assert_eq!(
        now.sum(
            open,
            &[
                &pod[..],
                &[("role", "sidecar"), ("container", "istio-proxy")]
            ]
            .concat()
        ),
        2.0,
        "{}",
        now.dump(open)
    );
    assert!(
        now.sum(
            "conntracer_peer_connections_open",
            &[("namespace", NAMESPACE), ("pod", POD), ("peer", PEER)]
        ) >= 2.0,
        "{}",
        now.dump("conntracer_peer_connections_open")
    );
    now.assert_delta(before, CHAIN_KILLS, &[], 0.0);
    let list = m.daemon.connections();
    let app_conn = list
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["pod"] == POD && c["container"] == "app" && c["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no app connection of {POD} in {list:#}"));
    let legs: Vec<&str> = str_values(&app_conn["chain"], "leg", "chain legs").collect();
    assert_eq!(
        legs,
        ["app", "sidecar-app-side", "sidecar-upstream"],
        "{app_conn:#}"
    );
}

#[test]
fn root_case_a_envoy_idle_timeout_is_origin_sidecar() {
    let _serial = serial_unless_skipped!();
    let (m, before, after) = idle_until_chain_ended(2, 0);
    assert_sole_chain_kill(&after, &before, "sidecar", "off");
    assert_eq!(m.redis.idle_closes(), 0);
    assert_eq!(
        m.envoy.idle_timeouts(),
        1,
        "Envoy's tcp.outbound.idle_timeout"
    );
    // The app's own socket: killed idle by its peer (the sidecar).
    let app_kill = [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("container", "app"),
        ("role", "app"),
        ("closed_by", "peer"),
        ("peer", PEER),
    ];
    after.assert_delta(&before, KILLS, &app_kill, 1.0);
    // Envoy closed its legs itself: no kill on the sidecar's sockets.
    after.assert_delta(&before, KILLS, &[("pod", POD), ("role", "sidecar")], 0.0);
    // The finding: the sidecar's idle timeout (one kill: no timeout
    // inferred yet), not the server's.
    let found = patterns_for(&m, POD);
    assert_eq!(found, ["sidecar_idle_timeout"], "findings of {POD}");
}

/// The patterns of the daemon's findings about `pod` (sorted).
fn patterns_for(m: &Mesh, pod: &str) -> Vec<String> {
    let (status, body) =
        integration_tests::daemon::http_get(m.daemon.addr, "/findings").expect("GET /findings");
    assert_eq!(status, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let mut found: Vec<String> = all
        .as_array()
        .expect("an array")
        .iter()
        .filter(|f| f["pod"] == pod)
        .map(|f| f["pattern"].as_str().unwrap_or_default().to_string())
        .collect();
    found.sort();
    found
}

#[test]
fn root_case_b_server_timeout_is_origin_upstream() {
    let _serial = serial_unless_skipped!();
    let (m, before, after) = idle_until_chain_ended(60, 2);
    assert_sole_chain_kill(&after, &before, "upstream", "off");
    assert_eq!(
        m.envoy.idle_timeouts(),
        0,
        "Envoy's idle timer did not fire"
    );
    assert_eq!(m.redis.idle_closes(), 1, "Redis closed the idle connection");
    // The sidecar's upstream socket is the one the server killed.
    let sidecar_kill = [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("container", "istio-proxy"),
        ("role", "sidecar"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "off"),
        ("peer", PEER),
    ];
    after.assert_delta(&before, KILLS, &sidecar_kill, 1.0);
    assert_eq!(patterns_for(&m, POD), ["server_idle_timeout"]);
}

/// Case C: the app has keepalive, Envoy's upstream leg has none, the path
/// expires the idle flow, and the app's next query fails.
#[test]
fn root_case_c_expired_upstream_without_keepalive_is_stale_reuse_and_origin_upstream() {
    let _serial = serial_unless_skipped!();
    let (mut m, before) = case_c(false);
    // While it idles: keepalive on the app's leg, off upstream.
    let mm = m.daemon.wait_metrics(Duration::from_secs(5), |x| {
        x.sum(MISMATCH, &[("pod", POD), ("peer", PEER)]) == 1.0
    });
    assert_eq!(
        mm.sum(
            MISMATCH,
            &[("namespace", NAMESPACE), ("pod", POD), ("peer", PEER)]
        ),
        1.0,
        "{}",
        mm.dump(MISMATCH)
    );
    assert_eq!(patterns_for(&m, POD), ["sidecar_keepalive_mismatch"]);
    // Past the router's conntrack expiry.
    thread::sleep(Duration::from_secs(4));
    m.expect_next_query_fails();
    let after = chain_ended(&m, &before);
    assert!(
        m.lab.invalid_packets() >= 1,
        "the router reset the expired flow"
    );
    let stale = [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("container", "istio-proxy"),
        ("role", "sidecar"),
        ("peer", PEER),
        ("outcome", "rst"),
    ];
    after.assert_delta(&before, STALE, &stale, 1.0);
    assert_sole_chain_kill(&after, &before, "upstream", "off");
    assert_eq!(
        after.sum(MISMATCH, &[("pod", POD)]),
        0.0,
        "the chain is gone: {}",
        after.dump(MISMATCH)
    );
    // The path expired the sidecar's idle upstream leg; the mismatch
    // finding stays until it expires (its evidence stopped).
    assert_eq!(
        patterns_for(&m, POD),
        ["path_expiry", "sidecar_keepalive_mismatch"]
    );
    assert_eq!(m.envoy.idle_timeouts(), 0);
}

/// Case C again, with Envoy's upstream TCP keepalive below the expiry: the
/// flow stays alive, the query is answered, nothing is killed.
#[test]
fn root_case_c_with_upstream_keepalive_nothing_dies_and_no_mismatch() {
    let _serial = serial_unless_skipped!();
    let (mut m, before) = case_c(true);
    thread::sleep(Duration::from_secs(1));
    let mid = m.daemon.scrape();
    assert_eq!(
        mid.sum(MISMATCH, &[("pod", POD)]),
        0.0,
        "{}",
        mid.dump(MISMATCH)
    );
    thread::sleep(Duration::from_secs(3));
    m.app.go();
    assert_eq!(
        m.app.expect_line("reply"),
        ["ok"],
        "keepalive kept the upstream flow alive"
    );
    m.app.expect_line("closed");
    let after = chain_ended(&m, &before);
    after.assert_delta(&before, STALE, &[("pod", POD)], 0.0);
    after.assert_delta(&before, KILLS, &[("pod", POD)], 0.0);
    for origin in ["upstream", "sidecar"] {
        after.assert_delta(
            &before,
            CHAIN_KILLS,
            &[("pod", POD), ("origin", origin)],
            0.0,
        );
    }
    // The app closed its connection itself at the end.
    after.assert_delta(&before, CHAIN_KILLS, &labels(&chain("app", "on")), 1.0);
    assert_eq!(m.lab.invalid_packets(), 0, "nothing expired on the path");
    assert!(
        patterns_for(&m, POD).is_empty(),
        "a healthy chain, no finding"
    );
}
