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

use std::{
    collections::HashMap,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    Peer,
    daemon::{
        Metrics,
        names::{CHAIN_KILLS, KILLS, MISMATCH, STALE},
    },
    mesh::{
        Dest, Mesh, NAMESPACE, PEER, POD, PoolMesh, Setup, SidecarPod, WEB_PEER,
        keepalive_app_args, pool_mesh, setup, sidecar_pod,
    },
    netlab::InvalidAction,
    require_program_or_skip,
    scenario::KEEPALIVE_1_1_3,
    serial_unless_skipped,
    servers::NodeHttp,
    str_values, test_name,
};

const POOL: &str = "conntracer_sidecar_pool_connections";
const POOL_MISMATCH: &str = "conntracer_sidecar_pool_keepalive_mismatch";
const POOL_KILLS: &str = "conntracer_sidecar_pool_kills_total";

const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");

/// The mesh with this test binary's `ct-client` as the app.
fn mesh(s: &Setup) -> Mesh {
    integration_tests::mesh::mesh(CLIENT, s)
}

/// A chain kill's labels; `peer` is the pod or the Service the app dialled.
fn chain(
    peer: &str,
    origin: &str,
    upstream_keepalive: &str,
    idle: bool,
) -> [(&'static str, String); 6] {
    [
        ("namespace", NAMESPACE.into()),
        ("pod", POD.into()),
        ("peer", peer.into()),
        ("origin", origin.into()),
        ("upstream_keepalive", upstream_keepalive.into()),
        ("idle", idle.to_string()),
    ]
}

fn labels<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Cases A and B: the app idles (Envoy's idle timeout `envoy_idle_s`,
/// Redis's `redis_timeout_secs`) until its connection is closed. Returns
/// the mesh, the scrape before (the open chain checked) and the scrape
/// after the chain's end.
fn idle_until_chain_ended(
    envoy_idle_s: u64,
    redis_timeout_secs: u32,
    dest: Dest,
) -> (Mesh, Metrics, Metrics) {
    let app = ["--then", "wait-close"];
    let mut s = setup(
        envoy_idle_s,
        false,
        redis_timeout_secs,
        300,
        InvalidAction::Drop,
        &app,
    );
    s.dest = dest;
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
fn case_c(upstream_keepalive: bool, dest: Dest) -> (Mesh, Metrics) {
    let app_args = keepalive_app_args();
    let mut s = setup(
        60,
        upstream_keepalive,
        0,
        2,
        InvalidAction::Reject,
        &app_args,
    );
    s.dest = dest;
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

/// The one chain kill since `before`: its origin, upstream keepalive and
/// whether it was idle.
#[track_caller]
fn assert_sole_chain_kill(
    m: &Mesh,
    (before, after): (&Metrics, &Metrics),
    origin: &str,
    keepalive: &str,
    idle: bool,
) {
    after.assert_delta(
        before,
        CHAIN_KILLS,
        &labels(&chain(m.chain_peer, origin, keepalive, idle)),
        1.0,
    );
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
    // The app's socket to its destination (the pod, or the Service it
    // dialled) and the sidecar's to the pod.
    let peer_open = |peer| {
        now.sum(
            "conntracer_peer_connections_open",
            &[("namespace", NAMESPACE), ("pod", POD), ("peer", peer)],
        )
    };
    let by_peer = if m.chain_peer == PEER {
        peer_open(PEER)
    } else {
        peer_open(PEER) + peer_open(m.chain_peer)
    };
    assert!(
        by_peer >= 2.0,
        "{}",
        now.dump("conntracer_peer_connections_open")
    );
    now.assert_delta(before, CHAIN_KILLS, &[], 0.0);
    assert_app_chain_legs(m);
}

/// /connections shows the app's connection with its three chain legs.
fn assert_app_chain_legs(m: &Mesh) {
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
    // One chain, to its destination or a backend of the Service dialled:
    // every link is a fact.
    let inferred = app_conn["chain"]
        .as_array()
        .is_some_and(|legs| legs.iter().any(|l| l["inferred"] == true));
    assert!(!inferred, "{app_conn:#}");
}

#[test]
fn root_case_a_envoy_idle_timeout_is_origin_sidecar() {
    let _serial = serial_unless_skipped!();
    case_a(Dest::Passthrough);
}

#[test]
fn root_service_case_a_envoy_idle_timeout_is_origin_sidecar() {
    let _serial = serial_unless_skipped!();
    case_a(Dest::Service);
}

fn case_a(dest: Dest) {
    let (m, before, after) = idle_until_chain_ended(2, 0, dest);
    assert_sole_chain_kill(&m, (&before, &after), "sidecar", "off", true);
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
        ("peer", m.chain_peer),
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
    let mut found: Vec<String> = m
        .daemon
        .findings()
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
    case_b(Dest::Passthrough);
}

#[test]
fn root_service_case_b_server_timeout_is_origin_upstream() {
    let _serial = serial_unless_skipped!();
    case_b(Dest::Service);
}

fn case_b(dest: Dest) {
    let (m, before, after) = idle_until_chain_ended(60, 2, dest);
    assert_sole_chain_kill(&m, (&before, &after), "upstream", "off", true);
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
    case_c_expired(Dest::Passthrough);
}

#[test]
fn root_service_case_c_expired_upstream_without_keepalive_is_stale_reuse_and_origin_upstream() {
    let _serial = serial_unless_skipped!();
    case_c_expired(Dest::Service);
}

fn case_c_expired(dest: Dest) {
    let (mut m, before) = case_c(false, dest);
    // While it idles: keepalive on the app's leg, off upstream.
    let peer = m.chain_peer;
    let mm = m.daemon.wait_metrics(Duration::from_secs(5), |x| {
        x.sum(MISMATCH, &[("pod", POD), ("peer", peer)]) == 1.0
    });
    assert_eq!(
        mm.sum(
            MISMATCH,
            &[("namespace", NAMESPACE), ("pod", POD), ("peer", peer)]
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
    assert_sole_chain_kill(&m, (&before, &after), "upstream", "off", true);
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
    let (mut m, before) = case_c(true, Dest::Passthrough);
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
    after.assert_delta(
        &before,
        CHAIN_KILLS,
        &labels(&chain(PEER, "app", "on", false)),
        1.0,
    );
    assert_eq!(m.lab.invalid_packets(), 0, "nothing expired on the path");
    assert!(
        patterns_for(&m, POD).is_empty(),
        "a healthy chain, no finding"
    );
}

/// A black hole: the path drops the expired flow (conntrack, no reset).
/// The app's query goes upstream and is never answered; the app gives up
/// (its 5 s read timeout) and closes first; Envoy half-closes its upstream
/// leg behind the query, which keeps being retransmitted until it times
/// out (the pod's `tcp_retries2` is 4: 6.2 s instead of the default's
/// ~15 min), then closes the app's side. The upstream leg had stopped
/// answering first: origin upstream, idle.
#[test]
fn root_black_hole_upstream_is_origin_upstream_although_the_app_closed_first() {
    let _serial = serial_unless_skipped!();
    let app_args = [&keepalive_app_args()[..], &["--timeout-secs", "5"]].concat();
    let s = setup(60, false, 0, 2, InvalidAction::Drop, &app_args);
    let mut m = mesh(&s);
    m.lab.client().set_sysctl("net.ipv4.tcp_retries2", "4");
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
    // Past the router's conntrack expiry.
    thread::sleep(Duration::from_secs(3));
    m.app.go();
    m.app.expect_line("no-reply");
    m.app.expect_line("closed");
    let after = chain_ended(&m, &before);
    assert!(
        m.lab.invalid_packets() >= 1,
        "the router dropped the query to the expired flow"
    );
    assert_sole_chain_kill(&m, (&before, &after), "upstream", "off", true);
    // The sidecar's upstream socket: its query never acknowledged.
    let stale = [
        ("pod", POD),
        ("role", "sidecar"),
        ("peer", PEER),
        ("outcome", "timeout"),
    ];
    after.assert_delta(&before, STALE, &stale, 1.0);
    assert_eq!(m.envoy.idle_timeouts(), 0);
    assert_eq!(m.redis.idle_closes(), 0);
}

/// A busy connection the server closes (Redis `CLIENT KILL` right after a
/// reply: a rollout, `Connection: close`): origin upstream, but not idle,
/// so the shipped idle-kill alert (`idle="true"`) does not count it.
#[test]
fn root_busy_connection_closed_by_the_server_is_origin_upstream_not_idle() {
    let _serial = serial_unless_skipped!();
    let s = setup(
        60,
        false,
        0,
        300,
        InvalidAction::Drop,
        &["--then", "wait-close"],
    );
    let mut m = mesh(&s);
    let before = m.daemon.scrape();
    assert_eq!(
        m.redis.kill_clients(),
        1,
        "Redis closed the app's connection"
    );
    m.app.expect_line("peer-closed");
    m.app.expect_line("closed");
    let after = chain_ended(&m, &before);
    assert_sole_chain_kill(&m, (&before, &after), "upstream", "off", false);
    after.assert_delta(&before, CHAIN_KILLS, &[("pod", POD), ("idle", "true")], 0.0);
    after.assert_delta(&before, KILLS, &[("pod", POD)], 0.0);
    assert_eq!(m.redis.idle_closes(), 0);
    assert_eq!(m.envoy.idle_timeouts(), 0);
}

/// A daemon rollout mid-idle (case C): the new daemon finds the open chain
/// again from the kernel's sockets at its resync, and the mismatch gauge is
/// back within one resync interval of it knowing the pods.
#[test]
fn root_case_c_mismatch_is_back_within_one_resync_after_a_restart() {
    let _serial = serial_unless_skipped!();
    restart_mid_idle(Dest::Passthrough, 0);
}

/// The same rollout with a chain to a Service while the API is slow (the
/// new daemon's first lists fail and back off for seconds): the chain
/// older than the daemon waits for the Service index and comes back as
/// facts (a backend of the Service dialled), not as an inferred link made
/// before the index could say.
#[test]
fn root_service_restart_with_a_slow_api_rebuilds_the_chain_once_the_index_loads() {
    let _serial = serial_unless_skipped!();
    restart_mid_idle(Dest::Service, 9);
}

/// Case C to `dest`, the daemon restarted while it idles, its first
/// `api_failures` API requests answered 500.
fn restart_mid_idle(dest: Dest, api_failures: u32) {
    let (mut m, _) = case_c(false, dest);
    let mismatch = [
        ("namespace", NAMESPACE),
        ("pod", POD),
        ("peer", m.chain_peer),
    ];
    m.daemon.wait_metrics(Duration::from_secs(5), |x| {
        x.sum(MISMATCH, &mismatch) == 1.0
    });
    let resync = Duration::from_secs(2);
    m.kube.fail_next(api_failures);
    m.restart_daemon(&["--resync-interval", "2s"]);
    if api_failures > 0 {
        // The API answers again after the watches' backoff (seconds: kube-rs
        // backs off exponentially from 800 ms); from then on the chain must
        // come back within one resync.
        m.daemon.wait_metrics(Duration::from_secs(30), |x| {
            x.sum("conntracer_kube_index_entries", &[("kind", "endpoints")]) > 0.0
                && x.sum("conntracer_kube_pods", &[]) > 0.0
        });
    }
    let started = Instant::now();
    // One resync, plus its own duration and the scrape on a loaded machine.
    let after = m.daemon.wait_metrics(resync + Duration::from_secs(3), |x| {
        x.sum(MISMATCH, &mismatch) == 1.0
    });
    assert_eq!(
        after.sum(MISMATCH, &mismatch),
        1.0,
        "{}",
        after.dump(MISMATCH)
    );
    assert_eq!(m.kube.failures_pending(), 0, "the API failed as asked");
    eprintln!("mismatch back {:?} after the restart", started.elapsed());
    assert_app_chain_legs(&m);
}

/// 16 app connections at once to one Service through an Envoy with two
/// worker threads: each chain's upstream leg is the socket Envoy's own
/// access log pairs with the app's socket (`%DOWNSTREAM_REMOTE_ADDRESS%`
/// -> `%UPSTREAM_LOCAL_ADDRESS%`), and none is a guess.
#[test]
fn root_service_16_concurrent_chains_pair_as_envoys_access_log_says() {
    let _serial = serial_unless_skipped!();
    let app_args = ["--then", "wait-close", "--timeout-secs", "30"];
    let mut s = setup(60, false, 0, 300, InvalidAction::Drop, &app_args);
    s.dest = Dest::Service;
    s.envoy_concurrency = 2;
    let m = mesh(&s);
    let t0 = Instant::now();
    let mut apps: Vec<_> = (0..16).map(|_| m.spawn_app(&app_args)).collect();
    eprintln!("spawned in {:?}", t0.elapsed());
    for a in &mut apps {
        a.go();
    }
    for a in &mut apps {
        a.expect_port("connected");
        assert_eq!(a.expect_line("reply"), ["ok"]);
    }
    eprintln!("connected in {:?}", t0.elapsed());
    let chains = 17.0;
    m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        x.sum("conntracer_sidecar_chains_open", &[]) >= chains
    });
    let truth = access_pairs(&m, "", 17);
    assert_eq!(truth.len(), 17, "Envoy logged every upstream connection");
    let list = m.daemon.connections();
    let (mut checked, mut wrong, mut inferred) = (0, Vec::new(), 0);
    for c in list
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["pod"] == POD && c["container"] == "app" && c["direction"] == "outbound")
    {
        let local = c["local"].as_str().expect("local");
        let upstream = chain_leg(c, "sidecar-upstream");
        if upstream["local"].as_str() != truth.get(local).map(String::as_str) {
            wrong.push(format!(
                "{local} -> {} (Envoy: {:?})",
                upstream["local"],
                truth.get(local)
            ));
        }
        inferred += usize::from(upstream["inferred"] == true);
        checked += 1;
    }
    eprintln!(
        "{checked} chains: {} wrong, {inferred} inferred",
        wrong.len()
    );
    assert!(wrong.is_empty(), "pairs unlike Envoy's: {wrong:#?}");
    assert_eq!(inferred, 0, "{list:#}");
    assert_eq!(checked, 17, "{list:#}");
}

/// Envoy's access log pairs whose downstream address starts with `from`,
/// once there are `n` (Envoy flushes it every second; at most 10 s).
fn access_pairs(m: &Mesh, from: &str, n: usize) -> HashMap<String, String> {
    let pairs = || -> HashMap<String, String> {
        m.envoy
            .access_pairs()
            .into_iter()
            .filter(|(down, _)| down.starts_with(from))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pairs().len() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    let found = pairs();
    assert_eq!(found.len(), n, "{:?}", m.envoy.access_pairs());
    found
}

/// The chain leg `name` of a connection in /connections.
fn chain_leg<'a>(c: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    c["chain"]
        .as_array()
        .and_then(|legs| legs.iter().find(|l| l["leg"] == name))
        .unwrap_or_else(|| panic!("no {name} leg: {c:#}"))
}

const PEER_BIN: &str = env!("CARGO_BIN_EXE_ct-peer");

/// `n` times: a sidecar process (uid 1337, the proxy's container) opens an
/// unrelated connection to Redis, then a client in the server's namespace
/// connects to the app's port on the pod's address. Returns both kinds,
/// connected, with their local ports.
fn inbound_traffic(m: &Mesh, n: usize) -> [(Vec<Peer>, Vec<u16>); 2] {
    let (redis, pod_ip) = (m.redis.addr(), m.lab.client_ip().to_string());
    let (mut others, mut clients) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let mut cmd = m.lab.client().command("setpriv");
        cmd.args([
            "--reuid",
            "1337",
            "--regid",
            "1337",
            "--clear-groups",
            CLIENT,
        ])
        .args(["redis", "--addr", &redis.ip().to_string(), "--port"])
        .args([&redis.port().to_string(), "--pause-before-connect"])
        .args(["--then", "wait-close"]);
        m.cgroups.enter("istio-proxy", &mut cmd);
        let mut other = Peer::spawn("sidecar-other", cmd);
        other.go();
        others.push(other);
        let mut cmd = m.lab.server().command(PEER_BIN);
        cmd.args(["client", "--addr", &pod_ip, "--port", "8080"])
            .arg("--pause-before-close");
        clients.push(Peer::spawn("client", cmd));
    }
    let connected = |peers: &mut Vec<Peer>| -> Vec<u16> {
        peers
            .iter_mut()
            .map(|p| p.expect_port("connected"))
            .collect()
    };
    let (other_ports, ports) = (connected(&mut others), connected(&mut clients));
    [(others, other_ports), (clients, ports)]
}

/// Inbound chains through Istio's 15006 capture (PREROUTING REDIRECT):
/// four clients in another namespace reach the app's port on the pod's
/// address; Envoy accepts each on 15006 and opens its own connection to
/// the app. Meanwhile sidecar processes open unrelated outbound
/// connections. Every app-side accept is chained to the client Envoy's
/// access log pairs it with, and no unrelated connection is in a chain.
#[test]
fn root_inbound_chains_pair_with_their_clients_and_unrelated_sidecar_connections_do_not_steal() {
    let _serial = serial_unless_skipped!();
    let mut s = setup(
        60,
        false,
        0,
        300,
        InvalidAction::Drop,
        &["--then", "wait-close"],
    );
    s.inbound = true;
    let m = mesh(&s);
    let pod_ip = m.lab.client_ip().to_string();
    let n: u32 = 4;
    let mut cmd = m.lab.client().command(PEER_BIN);
    cmd.args(["server", "--addr", &pod_ip, "--port", "8080", "--hold"])
        .args(["--count", &n.to_string(), "--timeout-secs", "20"]);
    m.cgroups.enter("app", &mut cmd);
    let mut server = Peer::spawn("app-server", cmd);
    server.expect_port("listening");
    let [(_others, other_ports), (mut clients, ports)] = inbound_traffic(&m, n as usize);
    server.expect_line("held");
    let truth = access_pairs(&m, &format!("{}:", m.lab.server_ip()), n as usize);
    m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        x.sum("conntracer_sidecar_chains_open", &[]) >= 1.0 + f64::from(n)
    });
    let list = m.daemon.connections();
    let conns = list.as_array().expect("array");
    let app_side = format!("{pod_ip}:8080");
    let mut chained = 0;
    for c in conns
        .iter()
        .filter(|c| c["pod"] == POD && c["container"] == "app" && c["local"] == app_side.as_str())
    {
        let client_leg = chain_leg(c, "sidecar-upstream");
        let client = client_leg["remote"].as_str().expect("remote");
        assert_eq!(
            truth.get(client).map(String::as_str),
            c["remote"].as_str(),
            "the app's accept is chained to client {client}: {c:#}"
        );
        assert!(
            ports.iter().any(|p| client.ends_with(&format!(":{p}"))),
            "{client} is one of the clients {ports:?}"
        );
        assert_ne!(client_leg["inferred"], true, "{c:#}");
        chained += 1;
    }
    assert_eq!(chained, n, "{list:#}");
    // The unrelated sidecar connections stay out of every chain.
    let unrelated: Vec<_> = conns
        .iter()
        .filter(|c| {
            let local = c["local"].as_str().unwrap_or_default();
            c["container"] == "istio-proxy"
                && other_ports
                    .iter()
                    .any(|p| local.ends_with(&format!(":{p}")))
        })
        .collect();
    assert_eq!(unrelated.len(), n as usize, "{list:#}");
    assert!(
        unrelated
            .iter()
            .all(|c| c["chain"].as_array().is_none_or(Vec::is_empty)),
        "{unrelated:#?}"
    );
    for p in &mut clients {
        p.go();
    }
    server.go();
}

/// `n` requests at once over one HTTP/2 (cleartext) connection to `to`,
/// after a `go` line; prints `connected PORT`, then `done OK` once all
/// are answered, and holds the connection until it is killed.
fn h2_app(to: std::net::SocketAddr, n: usize) -> String {
    format!(
        "const http2 = require('http2');\n\
         process.stdin.once('data', () => {{\n\
           const s = http2.connect('http://{to}');\n\
           s.on('error', (e) => {{ console.log('error ' + e.code); }});\n\
           s.on('connect', () => console.log('connected ' + s.socket.localPort));\n\
           let done = 0, ok = 0;\n\
           for (let i = 0; i < {n}; i++) {{\n\
             const r = s.request({{ ':path': '/' + i }});\n\
             let body = '';\n\
             r.setEncoding('utf8');\n\
             r.on('data', (d) => {{ body += d; }});\n\
             r.on('end', () => {{ ok += body === 'ok'; if (++done === {n}) console.log('done ' + ok); }});\n\
             r.end();\n\
           }}\n\
         }});\n"
    )
}

/// `n` HTTP/1.1 connections to `to` after a `go` line, one request on
/// each; prints `done OK` once all are answered and holds them.
fn http1_app(to: std::net::SocketAddr, n: usize) -> String {
    format!(
        "const net = require('net');\n\
         process.stdin.once('data', () => {{\n\
           let ok = 0;\n\
           for (let i = 0; i < {n}; i++) {{\n\
             const c = net.connect({port}, '{ip}', () => c.write('GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'));\n\
             c.on('error', (e) => console.log('error ' + e.code));\n\
             c.once('data', (d) => {{ if (++ok === {n}) console.log('done ' + ok); }});\n\
           }}\n\
         }});\n",
        port = to.port(),
        ip = to.ip(),
    )
}

/// The finding about the pod's sidecar fanout, if any, once `/findings`
/// has looked at the table (bounded wait for one when `want`).
fn fanout_finding(
    daemon: &integration_tests::daemon::Daemon,
    want: bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let of: Vec<serde_json::Value> = daemon
            .findings()
            .into_iter()
            .filter(|f| f["pod"] == POD && f["pattern"] == "sidecar_connection_fanout")
            .collect();
        assert!(of.len() < 2, "one fanout finding per pod: {of:#?}");
        if !want || !of.is_empty() || Instant::now() > deadline {
            return of.into_iter().next();
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The pod's open connections of `role` in `/connections`.
fn open_of(daemon: &integration_tests::daemon::Daemon, role: &str) -> usize {
    let list = daemon.connections();
    list.as_array()
        .expect("array")
        .iter()
        .filter(|c| c["pod"] == POD && c["role"] == role && c["state"] == "ESTABLISHED")
        .count()
}

/// Node.js (else the test skips, with the reason) and the pod with Envoy
/// (an HTTP connection manager with `http`, else tcp_proxy), its backend a
/// Node server that answers after `delay` and keeps idle connections.
fn node_pod(
    test: &str,
    http: bool,
    delay: Duration,
) -> Option<(std::path::PathBuf, SidecarPod, NodeHttp)> {
    let node = require_program_or_skip(test, "node", "Node.js (npm's Debian package)")?;
    let s = setup(3600, false, 0, 600, InvalidAction::Drop, &[]);
    let pod = sidecar_pod(&s, |o| o.http = http);
    let server = NodeHttp::slow(pod.lab.server(), &node, pod.backend, delay);
    Some((node, pod, server))
}

/// Requests in flight at once on the app's one HTTP/2 connection.
const REQUESTS: usize = 64;
/// The app's connections through tcp_proxy.
const CONNECTIONS: usize = 60;

/// The field report's ~2,800 sidecar connections against the app's 40, in
/// small: one HTTP/2 connection of the app carries 64 requests at once;
/// Envoy's HTTP/1.1 upstream pool needs a connection per request in
/// flight and keeps them all (the upstream never closes an idle one):
/// the sidecar holds 65, the app 1. One fanout finding, its counts those
/// of `ss` and `/connections`.
#[test]
fn root_http2_app_fanned_out_by_envoys_http1_pool_is_a_sidecar_connection_fanout() {
    let _serial = serial_unless_skipped!();
    let Some((node, pod, _server)) = node_pod(test_name!(), true, Duration::from_secs(1)) else {
        return;
    };
    let mut app = pod.spawn_node_app(&node, &h2_app(pod.dialled, REQUESTS));
    app.go();
    app.expect_port("connected");
    assert_eq!(
        app.expect_line("done"),
        [REQUESTS.to_string()],
        "every request answered"
    );
    let truth = pod.established_by_process();
    eprintln!("ss: {truth:?}");
    let (envoy, node_app) = (truth.get("envoy").copied(), truth.get("node").copied());
    assert_eq!(node_app, Some(1), "one HTTP/2 connection: {truth:?}");
    let envoy = envoy.expect("Envoy's connections");
    assert!(
        envoy > REQUESTS,
        "Envoy's pool holds a connection per request in flight, and the app's: {truth:?}"
    );
    let f = fanout_finding(&pod.daemon, true).expect("a sidecar_connection_fanout finding");
    eprintln!("sidecar_connection_fanout: {f:#}");
    let e = &f["evidence"];
    assert_eq!(
        e["sidecar_connections"].as_u64(),
        Some(envoy as u64),
        "ss: {truth:?}; {f:#}"
    );
    assert_eq!(e["app_connections"].as_u64(), Some(1), "{f:#}");
    assert_eq!(f["count"].as_u64(), Some(envoy as u64));
    assert_eq!(
        (open_of(&pod.daemon, "sidecar"), open_of(&pod.daemon, "app")),
        (envoy, 1)
    );
    assert_eq!(
        (f["namespace"].as_str(), f["role"].as_str()),
        (Some(NAMESPACE), Some("sidecar"))
    );
    assert!(
        f["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("--concurrency"),
        "{f:#}"
    );
}

/// The same pod with tcp_proxy and 60 app connections: each is one chain
/// of two sidecar sockets (accepted, upstream), 2 to 1: no fanout.
#[test]
fn root_one_to_one_tcp_proxy_chains_are_no_sidecar_connection_fanout() {
    let _serial = serial_unless_skipped!();
    let Some((node, pod, _server)) = node_pod(test_name!(), false, Duration::ZERO) else {
        return;
    };
    let mut app = pod.spawn_node_app(&node, &http1_app(pod.dialled, CONNECTIONS));
    app.go();
    assert_eq!(app.expect_line("done"), [CONNECTIONS.to_string()]);
    let truth = pod.established_by_process();
    eprintln!("ss: {truth:?}");
    assert_eq!(
        (truth.get("node").copied(), truth.get("envoy").copied()),
        (Some(CONNECTIONS), Some(2 * CONNECTIONS)),
        "1:1 chains"
    );
    // The daemon has them all (so the rule saw 120 against 60).
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_of(&pod.daemon, "sidecar") < 2 * CONNECTIONS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(open_of(&pod.daemon, "app"), CONNECTIONS);
    assert_eq!(
        fanout_finding(&pod.daemon, false),
        None,
        "2 sidecar sockets per app connection"
    );
}

/// Envoy's idle timeout seen by the user: three app connections idle in
/// the pod until Envoy's tcp_proxy closes each at its 2 s idle_timeout
/// (the apps see the close after ~2 s, Envoy counts 3 idle timeouts): one
/// `sidecar_idle_timeout` finding whose timeout is Envoy's within 5 % and
/// whose fix names Istio's idleTimeout.
#[test]
fn root_three_chains_closed_by_envoys_idle_timeout_give_its_timeout_and_the_istio_fix() {
    let _serial = serial_unless_skipped!();
    let app_args = ["--then", "wait-close"];
    let s = setup(2, false, 0, 300, InvalidAction::Drop, &app_args);
    let mut m = mesh(&s);
    let mut more: Vec<Peer> = (0..2).map(|_| m.spawn_app(&app_args)).collect();
    for a in &mut more {
        a.go();
        a.expect_port("connected");
        assert_eq!(a.expect_line("reply"), ["ok"]);
    }
    // The apps' own view: the close came ~2 s after their last read.
    for a in std::iter::once(&mut m.app).chain(&mut more) {
        let ms: f64 = a.expect_line("peer-closed")[0].parse().expect("MS");
        assert!((1900.0..2600.0).contains(&ms), "closed after {ms} ms idle");
        a.expect_line("closed");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let f = loop {
        let of: Vec<serde_json::Value> = m
            .daemon
            .findings()
            .into_iter()
            .filter(|f| f["pod"] == POD && f["pattern"] == "sidecar_idle_timeout")
            .collect();
        assert!(of.len() < 2, "one finding per (pod, peer): {of:#?}");
        if of.first().is_some_and(|f| f["count"].as_u64() >= Some(3)) || Instant::now() > deadline {
            break of
                .into_iter()
                .next()
                .expect("a sidecar_idle_timeout finding");
        }
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("sidecar_idle_timeout: {f:#}");
    assert_eq!(
        m.envoy.idle_timeouts(),
        3,
        "Envoy's tcp.outbound.idle_timeout"
    );
    assert_eq!(f["count"], 3, "{f:#}");
    assert_eq!(f["peer"], m.chain_peer, "{f:#}");
    // 2 s is no Envoy default.
    integration_tests::daemon::assert_inferred(&f, 2.0, "unknown");
    let fix = f["fix"].as_str().unwrap_or_default();
    assert!(
        fix.contains("idleTimeout") && fix.contains("~2.0 s"),
        "{fix}"
    );
}

/// `ss -tino` in the pod: for each socket whose peer is `remote`, whether
/// the kernel runs a keepalive timer on it (`timer:(keepalive,...)`).
fn ss_keepalive_timers(m: &PoolMesh, remote: std::net::SocketAddr) -> Vec<bool> {
    let out = m
        .lab
        .client()
        .command("ss")
        .arg("-tino")
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    // Each socket is a line with its addresses, then an indented line of
    // its details (timers among them).
    let mut found = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let mut words = line.split_whitespace();
        if words.next() != Some("ESTAB") || words.nth(3) != Some(remote.to_string().as_str()) {
            continue;
        }
        let details = match lines.peek() {
            Some(next) if next.starts_with(char::is_whitespace) => lines.next().unwrap_or(""),
            _ => "",
        };
        found.push(line.contains("timer:(keepalive") || details.contains("timer:(keepalive"));
    }
    found
}

/// Istio's HTTP path: 8 app connections (keepalive on) to a Service
/// through Envoy's HTTP connection manager, whose cluster pools 2 upstream
/// connections (keepalive off) to a Node.js server. No 1:1 link may be
/// shown: the legs are a pool, whose keepalive mismatch is the 2 upstream
/// connections (as `ss -tino` shows on both sides), and the server's idle
/// close of both (Node's keepAliveTimeout; Envoy counts them in
/// `upstream_cx_destroy_remote`) is counted for the Service, with the 8
/// app connections open at the time.
#[test]
fn root_service_http_pool_is_n_to_m_with_its_mismatch_and_server_closes() {
    let _serial = serial_unless_skipped!();
    let Some(node) = require_program_or_skip(
        "root_service_http_pool_is_n_to_m_with_its_mismatch_and_server_closes",
        "node",
        "Node.js (npm's Debian package)",
    ) else {
        return;
    };
    let app_args = [
        &KEEPALIVE_1_1_3[..],
        &["--count", "0", "--pause-before-then", "--then", "send"],
        &["--pause-before-close", "--timeout-secs", "60"],
    ]
    .concat();
    // Node 20 closes an idle connection about 1 s after keepAliveTimeout.
    let mut m = pool_mesh(CLIENT, &node, 8, &app_args, (2000, 300));
    let before = m.daemon.scrape();
    // Two requests at a time, each answered 300 ms late: the pool opens
    // two upstream connections and serves the later pairs over them.
    for pair in m.apps.chunks_mut(2) {
        for a in pair.iter_mut() {
            a.go();
        }
        for a in pair.iter_mut() {
            assert_eq!(a.expect_line("reply"), ["ok"]);
        }
    }
    let cluster = |stat: &str| m.envoy.stat(&format!("cluster.ct_service_0.{stat}"));
    assert_eq!(cluster("upstream_cx_total"), Some(2), "Envoy's pool");
    assert_eq!(cluster("upstream_rq_total"), Some(8));
    let pool = |leg: &'static str| {
        [
            ("namespace", NAMESPACE),
            ("pod", POD),
            ("peer", WEB_PEER),
            ("leg", leg),
        ]
    };
    let served = Instant::now();
    let pooled = m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        x.sum(POOL, &pool("app")) == 8.0 && x.sum(POOL, &pool("upstream")) == 2.0
    });
    eprintln!("pooled {:?} after the last reply", served.elapsed());
    assert_eq!(pooled.sum(POOL, &pool("app")), 8.0, "{}", pooled.dump(POOL));
    assert_eq!(
        pooled.sum(POOL, &pool("upstream")),
        2.0,
        "{}",
        pooled.dump(POOL)
    );
    assert_eq!(
        pooled.sum("conntracer_sidecar_chains_open", &[]),
        0.0,
        "no 1:1 chain"
    );
    // Ground truth for the keepalive mismatch: the kernel's timers.
    let app_timers = ss_keepalive_timers(&m, m.dialled);
    let upstream_timers = ss_keepalive_timers(&m, m.backend);
    assert_eq!(app_timers, [true; 8], "the app's sockets");
    assert_eq!(upstream_timers, [false; 2], "Envoy's pooled sockets");
    let pod_peer = [("namespace", NAMESPACE), ("pod", POD), ("peer", WEB_PEER)];
    assert_eq!(
        pooled.sum(POOL_MISMATCH, &pod_peer),
        2.0,
        "{}",
        pooled.dump(POOL_MISMATCH)
    );
    assert_eq!(pooled.sum(MISMATCH, &[("pod", POD)]), 0.0, "no chain");
    assert_pool_in_connections(&m);
    server_closes_are_counted_for_the_service(&m, &before, served);
    for a in &mut m.apps {
        a.go();
        a.expect_line("closed");
    }
}

/// Node closes both idle pooled connections (Envoy's
/// `upstream_cx_destroy_remote`); the app's stay open. Both ends are
/// counted for the Service, with the 8 app connections open at each.
fn server_closes_are_counted_for_the_service(m: &PoolMesh, before: &Metrics, served: Instant) {
    let cluster = |stat: &str| m.envoy.stat(&format!("cluster.ct_service_0.{stat}"));
    let pool = |leg: &'static str| {
        [
            ("namespace", NAMESPACE),
            ("pod", POD),
            ("peer", WEB_PEER),
            ("leg", leg),
        ]
    };
    let pod_peer = [("namespace", NAMESPACE), ("pod", POD), ("peer", WEB_PEER)];
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster("upstream_cx_destroy_remote") != Some(2) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        cluster("upstream_cx_destroy_remote"),
        Some(2),
        "the server closed both"
    );
    eprintln!(
        "the server closed both {:?} after the last reply",
        served.elapsed()
    );
    let kills = [&pod_peer[..], &[("origin", "upstream"), ("idle", "true")]].concat();
    let after = m
        .daemon
        .settle(before, POOL_KILLS, &kills, 2.0, Duration::from_millis(500))
        .1;
    after.assert_delta(before, POOL_KILLS, &kills, 2.0);
    after.assert_delta(before, POOL_KILLS, &[], 2.0);
    let at_kill = "conntracer_sidecar_pool_kill_app_connections";
    assert_eq!(after.sum(&format!("{at_kill}_count"), &pod_peer), 2.0);
    assert_eq!(
        after.sum(&format!("{at_kill}_sum"), &pod_peer),
        16.0,
        "8 app connections open at each: {}",
        after.dump(&format!("{at_kill}_sum"))
    );
    after.assert_delta(before, CHAIN_KILLS, &[], 0.0);
    assert_eq!(
        after.sum(POOL, &pool("upstream")),
        0.0,
        "{}",
        after.dump(POOL)
    );
    assert_eq!(after.sum(POOL, &pool("app")), 8.0, "{}", after.dump(POOL));
}

/// /connections: each app connection has its two facts (app, the
/// sidecar's socket facing it) and no upstream leg, and says it is pooled;
/// so do Envoy's two upstream sockets.
fn assert_pool_in_connections(m: &PoolMesh) {
    let list = m.daemon.connections();
    let conns = list.as_array().expect("array");
    let dialled = m.dialled.to_string();
    let apps: Vec<_> = conns
        .iter()
        .filter(|c| c["pod"] == POD && c["container"] == "app" && c["direction"] == "outbound")
        .collect();
    assert_eq!(apps.len(), 8, "{list:#}");
    for c in &apps {
        let legs: Vec<&str> = str_values(&c["chain"], "leg", "chain legs").collect();
        assert_eq!(legs, ["app", "sidecar-app-side"], "{c:#}");
        let pool = &c["pool"];
        assert_eq!(
            (pool["leg"].as_str(), pool["dialled"].as_str()),
            (Some("app"), Some(dialled.as_str())),
            "{c:#}"
        );
        assert_eq!(
            (
                pool["app_connections"].as_u64(),
                pool["upstream_connections"].as_u64()
            ),
            (Some(8), Some(2)),
            "{c:#}"
        );
    }
    let backend = m.backend.to_string();
    let ups: Vec<_> = conns
        .iter()
        .filter(|c| c["container"] == "istio-proxy" && c["remote"] == backend.as_str())
        .collect();
    assert_eq!(ups.len(), 2, "{list:#}");
    for c in &ups {
        assert_eq!(c["pool"]["leg"], "upstream", "{c:#}");
        assert!(c["chain"].as_array().is_none_or(Vec::is_empty), "{c:#}");
    }
}
