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
    fs,
    net::SocketAddr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    Peer, cgroup2_mount,
    daemon::{Daemon, Metrics, serial},
    fake_kube::{FakeKube, pod_json},
    netlab::{InvalidAction, NetLab},
    require_root_or_skip,
    servers::{
        Envoy, EnvoyOptions, Redis, SIDECAR_PORT, SIDECAR_UID, SidecarRedirect, UpstreamKeepalive,
    },
};

const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");
const NODE: &str = "node-e2e";
const NAMESPACE: &str = "shop";
const POD: &str = "cart-5d8f7";
const CHAIN_KILLS: &str = "conntracer_sidecar_chain_kills_total";
const MISMATCH: &str = "conntracer_sidecar_keepalive_mismatch";
const KILLS: &str = "conntracer_idle_kills_total";
const STALE: &str = "conntracer_stale_reuse_total";
/// The Redis server is a pod of this node too, so the peer label names it.
const PEER: &str = "db/redis-0";

/// A pod's cgroups as the kubelet lays them out with the systemd driver and
/// containerd: kubepods.slice/kubepods-burstable.slice/
/// kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope.
struct PodCgroups {
    dirs: Vec<PathBuf>,
    containers: Vec<(String, PathBuf)>,
}

impl PodCgroups {
    fn new(uid: &str, containers: &[(&str, &str)]) -> Self {
        let root = cgroup2_mount().expect("a cgroup v2 mount");
        let qos = root.join("kubepods.slice").join("kubepods-burstable.slice");
        let pod = qos.join(format!(
            "kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        let mut dirs = Vec::new();
        for d in [root.join("kubepods.slice"), qos.clone(), pod.clone()] {
            if !d.exists() {
                fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
                dirs.push(d);
            }
        }
        let mut out = Vec::new();
        for (name, id) in containers {
            let d = pod.join(format!("cri-containerd-{id}.scope"));
            fs::create_dir(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            out.push(((*name).to_string(), d.clone()));
            dirs.push(d);
        }
        Self {
            dirs,
            containers: out,
        }
    }

    fn dir(&self, container: &str) -> PathBuf {
        self.containers
            .iter()
            .find(|(n, _)| n == container)
            .expect("container")
            .1
            .clone()
    }

    fn add(&self, container: &str, pid: u32) {
        let (_, dir) = self
            .containers
            .iter()
            .find(|(n, _)| n == container)
            .expect("container");
        fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", dir.display()));
    }
}

impl Drop for PodCgroups {
    fn drop(&mut self) {
        let root = cgroup2_mount().unwrap_or_default();
        for d in self.dirs.iter().rev() {
            // Processes still inside (exiting) go back to the root first.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                for pid in fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    let _ = fs::write(root.join("cgroup.procs"), pid);
                }
                if fs::remove_dir(d).is_ok() || !d.exists() || Instant::now() > deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn hex_id(seed: u8) -> String {
    use std::fmt::Write as _;
    let mut id = String::with_capacity(64);
    for i in 0..32u8 {
        let _ = write!(
            id,
            "{:02x}",
            seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(7))
        );
    }
    id
}

/// Everything of one run; fields drop in declaration order: the daemon and
/// processes first, the namespaces last.
struct Mesh {
    daemon: Daemon,
    app: Peer,
    _redirect: SidecarRedirect,
    envoy: Envoy,
    redis: Redis,
    _cgroups: PodCgroups,
    _kube: FakeKube,
    lab: NetLab,
}

struct Setup {
    envoy_idle: Duration,
    upstream_keepalive: bool,
    redis_timeout_secs: u32,
    conntrack_secs: u32,
    action: InvalidAction,
    app_args: Vec<&'static str>,
}

fn mesh(s: &Setup) -> Mesh {
    let lab = NetLab::new(s.action, s.conntrack_secs);
    let upstream = SocketAddr::new(lab.server_ip(), 6379);
    let uid = "4f1c2a9e-7b3d-4e5f-9a8b-1c2d3e4f5a6b";
    let (app_id, proxy_id) = (hex_id(1), hex_id(2));
    let kube = FakeKube::start(NODE);
    kube.set_pods(vec![
        pod_json(
            NAMESPACE,
            POD,
            uid,
            NODE,
            &lab.client_ip().to_string(),
            &[
                ("app", &format!("containerd://{app_id}")),
                ("istio-proxy", &format!("containerd://{proxy_id}")),
            ],
        ),
        pod_json(
            "db",
            "redis-0",
            "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            NODE,
            &lab.server_ip().to_string(),
            &[("redis", &format!("containerd://{}", hex_id(3)))],
        ),
    ]);
    let cgroups = PodCgroups::new(uid, &[("app", &app_id), ("istio-proxy", &proxy_id)]);
    // The daemon runs before the pod's processes start, as a DaemonSet does
    // on a node: the owners of listeners opened before it are not known yet
    // (see the closing notes of the reliability work).
    let daemon = Daemon::start("1s", &["--kube-api", &kube.url(), "--node-name", NODE]);
    daemon.wait_metrics(Duration::from_secs(20), |m| {
        m.sum("conntracer_kube_pods", &[]) >= 2.0
    });
    let redis = Redis::start(lab.server(), upstream, s.redis_timeout_secs);
    let mut opts = EnvoyOptions::sidecar(s.envoy_idle);
    if s.upstream_keepalive {
        opts.upstream_keepalive = Some(UpstreamKeepalive {
            time_secs: 1,
            interval_secs: 1,
            probes: 3,
        });
    }
    opts.cgroup = Some(cgroups.dir("istio-proxy"));
    let envoy = Envoy::start(lab.client(), opts);
    let redirect = SidecarRedirect::istio_outbound(lab.client(), SIDECAR_UID, SIDECAR_PORT);

    let mut cmd = lab.client().command(CLIENT);
    cmd.args([
        "redis",
        "--addr",
        &upstream.ip().to_string(),
        "--port",
        "6379",
        "--pause-before-connect",
    ])
    .args(&s.app_args);
    let mut app = Peer::spawn("app", cmd);
    cgroups.add("app", app.pid());
    app.go();
    app.expect_port("connected");
    assert_eq!(
        app.expect_line("reply"),
        ["ok"],
        "the app's first query goes through the sidecar"
    );
    Mesh {
        daemon,
        app,
        _redirect: redirect,
        envoy,
        redis,
        _cgroups: cgroups,
        _kube: kube,
        lab,
    }
}

fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
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
    assert_eq!(delta(before, &now, CHAIN_KILLS, &[]), 0.0);
    let list = m.daemon.connections();
    let app_conn = list
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["pod"] == POD && c["container"] == "app" && c["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no app connection of {POD} in {list:#}"));
    let legs: Vec<&str> = app_conn["chain"]
        .as_array()
        .expect("chain legs")
        .iter()
        .filter_map(|l| l["leg"].as_str())
        .collect();
    assert_eq!(
        legs,
        ["app", "sidecar-app-side", "sidecar-upstream"],
        "{app_conn:#}"
    );
}

fn setup(
    envoy_idle_s: u64,
    upstream_keepalive: bool,
    redis_timeout_secs: u32,
    conntrack_secs: u32,
    action: InvalidAction,
    app_args: &[&'static str],
) -> Setup {
    Setup {
        envoy_idle: Duration::from_secs(envoy_idle_s),
        upstream_keepalive,
        redis_timeout_secs,
        conntrack_secs,
        action,
        app_args: app_args.to_vec(),
    }
}

#[test]
fn root_case_a_envoy_idle_timeout_is_origin_sidecar() {
    if !require_root_or_skip("root_case_a_envoy_idle_timeout_is_origin_sidecar") {
        return;
    }
    let _serial = serial();
    let mut m = mesh(&setup(
        2,
        false,
        0,
        300,
        InvalidAction::Drop,
        &["--then", "wait-close"],
    ));
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
    m.app.expect_line("peer-closed");
    m.app.expect_line("closed");
    m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        delta(&before, x, CHAIN_KILLS, &[]) >= 1.0
    });
    thread::sleep(Duration::from_millis(500));
    let after = m.daemon.scrape();
    assert_eq!(
        delta(
            &before,
            &after,
            CHAIN_KILLS,
            &labels(&chain("sidecar", "off"))
        ),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
    assert_eq!(
        delta(&before, &after, CHAIN_KILLS, &[]),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
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
    assert_eq!(
        delta(&before, &after, KILLS, &app_kill),
        1.0,
        "{}",
        after.dump(KILLS)
    );
    // Envoy closed its legs itself: no kill on the sidecar's sockets.
    assert_eq!(
        delta(&before, &after, KILLS, &[("pod", POD), ("role", "sidecar")]),
        0.0,
        "{}",
        after.dump(KILLS)
    );
    assert_eq!(m.redis.idle_closes(), 0);
}

#[test]
fn root_case_b_server_timeout_is_origin_upstream() {
    if !require_root_or_skip("root_case_b_server_timeout_is_origin_upstream") {
        return;
    }
    let _serial = serial();
    let mut m = mesh(&setup(
        60,
        false,
        2,
        300,
        InvalidAction::Drop,
        &["--then", "wait-close"],
    ));
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
    m.app.expect_line("peer-closed");
    m.app.expect_line("closed");
    m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        delta(&before, x, CHAIN_KILLS, &[]) >= 1.0
    });
    thread::sleep(Duration::from_millis(500));
    let after = m.daemon.scrape();
    assert_eq!(
        delta(
            &before,
            &after,
            CHAIN_KILLS,
            &labels(&chain("upstream", "off"))
        ),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
    assert_eq!(
        delta(&before, &after, CHAIN_KILLS, &[]),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
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
    assert_eq!(
        delta(&before, &after, KILLS, &sidecar_kill),
        1.0,
        "{}",
        after.dump(KILLS)
    );
}

/// Case C: the app has keepalive, Envoy's upstream leg has none, the path
/// expires the idle flow, and the app's next query fails.
#[test]
fn root_case_c_expired_upstream_without_keepalive_is_stale_reuse_and_origin_upstream() {
    if !require_root_or_skip(
        "root_case_c_expired_upstream_without_keepalive_is_stale_reuse_and_origin_upstream",
    ) {
        return;
    }
    let _serial = serial();
    let app_args = [
        "--keepalive",
        "--keepidle",
        "1",
        "--keepintvl",
        "1",
        "--keepcnt",
        "3",
        "--pause-before-then",
        "--then",
        "send",
    ];
    let mut m = mesh(&setup(60, false, 0, 2, InvalidAction::Reject, &app_args));
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
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
    // Past the router's conntrack expiry.
    thread::sleep(Duration::from_secs(4));
    m.app.go();
    let outcome = m.app.expect_line_any(&["peer-closed", "error"]);
    assert!(
        outcome[0] == "peer-closed" || outcome[1] == "ECONNRESET",
        "the app's next query fails: {outcome:?}"
    );
    m.app.expect_line("closed");
    m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        delta(&before, x, CHAIN_KILLS, &[]) >= 1.0
    });
    thread::sleep(Duration::from_millis(500));
    let after = m.daemon.scrape();
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
    assert_eq!(
        delta(&before, &after, STALE, &stale),
        1.0,
        "{}",
        after.dump(STALE)
    );
    assert_eq!(
        delta(
            &before,
            &after,
            CHAIN_KILLS,
            &labels(&chain("upstream", "off"))
        ),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
    assert_eq!(
        delta(&before, &after, CHAIN_KILLS, &[]),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
    assert_eq!(
        after.sum(MISMATCH, &[("pod", POD)]),
        0.0,
        "the chain is gone: {}",
        after.dump(MISMATCH)
    );
    assert_eq!(m.envoy.idle_timeouts(), 0);
}

/// Case C again, with Envoy's upstream TCP keepalive below the expiry: the
/// flow stays alive, the query is answered, nothing is killed.
#[test]
fn root_case_c_with_upstream_keepalive_nothing_dies_and_no_mismatch() {
    if !require_root_or_skip("root_case_c_with_upstream_keepalive_nothing_dies_and_no_mismatch") {
        return;
    }
    let _serial = serial();
    let app_args = [
        "--keepalive",
        "--keepidle",
        "1",
        "--keepintvl",
        "1",
        "--keepcnt",
        "3",
        "--pause-before-then",
        "--then",
        "send",
    ];
    let mut m = mesh(&setup(60, true, 0, 2, InvalidAction::Reject, &app_args));
    let before = m.daemon.scrape();
    assert_open_chain(&m, &before);
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
    m.daemon.wait_metrics(Duration::from_secs(10), |x| {
        delta(&before, x, CHAIN_KILLS, &[]) >= 1.0
    });
    thread::sleep(Duration::from_millis(500));
    let after = m.daemon.scrape();
    assert_eq!(
        delta(&before, &after, STALE, &[("pod", POD)]),
        0.0,
        "{}",
        after.dump(STALE)
    );
    assert_eq!(
        delta(&before, &after, KILLS, &[("pod", POD)]),
        0.0,
        "{}",
        after.dump(KILLS)
    );
    for origin in ["upstream", "sidecar"] {
        assert_eq!(
            delta(
                &before,
                &after,
                CHAIN_KILLS,
                &[("pod", POD), ("origin", origin)]
            ),
            0.0,
            "{}",
            after.dump(CHAIN_KILLS)
        );
    }
    // The app closed its connection itself at the end.
    assert_eq!(
        delta(&before, &after, CHAIN_KILLS, &labels(&chain("app", "on"))),
        1.0,
        "{}",
        after.dump(CHAIN_KILLS)
    );
    assert_eq!(m.lab.invalid_packets(), 0, "nothing expired on the path");
}
