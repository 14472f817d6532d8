//! The field report's mesh, for the end-to-end tests: an app in a "pod"
//! (its own network namespace, kubelet-style cgroups, Istio's outbound
//! redirect) talks to a Redis server across a router whose conntrack expires
//! idle flows, through a real Envoy sidecar (uid 1337, ORIGINAL_DST,
//! tcp_proxy). A fake Kubernetes API serves both pods, and a daemon watches
//! it all. Everything is torn down on drop.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Peer, cgroup2_mount,
    daemon::Daemon,
    fake_kube::{FakeKube, SliceEndpoint, endpoint_slice_json, pod_json, service_json},
    netlab::{InvalidAction, NetLab},
    scenario::KEEPALIVE_1_1_3,
    servers::{
        Envoy, EnvoyOptions, NodeHttp, Redis, SIDECAR_PORT, SIDECAR_UID, SidecarRedirect,
        UpstreamKeepalive,
    },
};

/// The node the daemon is told it runs on.
pub const NODE: &str = "node-e2e";
/// The app's pod.
pub const NAMESPACE: &str = "shop";
pub const POD: &str = "cart-5d8f7";
/// The Redis server is a pod of this node too, so the peer label names it.
pub const PEER: &str = "db/redis-0";
/// Its Service, when the app dials it ([`Dest::Service`]): `namespace/service`.
pub const SERVICE_PEER: &str = "db/redis";
/// The Service's ClusterIP: it exists nowhere but in the API and in the
/// sidecar's listeners (the redirect takes every connection to it).
pub const CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
/// Istio's inbound capture port.
pub const INBOUND_PORT: u16 = 15006;
/// The Service port, and the backend's target port behind it.
const SERVICE_PORT: u16 = 6379;
const TARGET_PORT: u16 = 16379;

/// Where the app connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Redis's own address: the sidecar passes it through (ORIGINAL_DST).
    Passthrough,
    /// The Redis Service's ClusterIP: the sidecar routes it to the backend
    /// pod on the target port, as Istio does.
    Service,
}

/// A pod's cgroups as the kubelet lays them out with the systemd driver and
/// containerd: kubepods.slice/kubepods-burstable.slice/
/// kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope.
pub struct PodCgroups {
    dirs: Vec<PathBuf>,
    containers: Vec<(String, PathBuf)>,
}

impl PodCgroups {
    pub fn new(uid: &str, containers: &[(&str, &str)]) -> Self {
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

    pub fn dir(&self, container: &str) -> PathBuf {
        self.containers
            .iter()
            .find(|(n, _)| n == container)
            .expect("container")
            .1
            .clone()
    }

    /// Starts `cmd` inside `container`'s cgroup (it joins before exec): call
    /// before spawning it.
    pub fn enter(&self, container: &str, cmd: &mut std::process::Command) {
        crate::start_in_cgroup(cmd, &self.dir(container));
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

pub fn hex_id(seed: u8) -> String {
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
pub struct Mesh {
    client: String,
    /// Where the app connects: the pod's address or the Service's.
    pub dialled: SocketAddr,
    /// The `peer` of the chain and of the app's own socket: the pod, or
    /// the Service the app dialled.
    pub chain_peer: &'static str,
    pub daemon: Daemon,
    pub app: Peer,
    pub redirect: SidecarRedirect,
    pub inbound_redirect: Option<SidecarRedirect>,
    pub envoy: Envoy,
    pub redis: Redis,
    pub cgroups: PodCgroups,
    pub kube: FakeKube,
    pub lab: NetLab,
}

/// An app process of the pod (`ct-client PROTO` to `dialled` with `args`,
/// in the app's cgroup), waiting for [`Peer::go`] to connect.
fn spawn_app(
    (lab, cgroups): (&NetLab, &PodCgroups),
    client: &str,
    proto: &str,
    dialled: SocketAddr,
    args: &[&str],
) -> Peer {
    let mut cmd = lab.client().command(client);
    cmd.args([
        proto,
        "--addr",
        &dialled.ip().to_string(),
        "--port",
        &dialled.port().to_string(),
        "--pause-before-connect",
    ])
    .args(args);
    cgroups.enter("app", &mut cmd);
    Peer::spawn("app", cmd)
}

impl Mesh {
    /// One more app connection of the pod to the same destination (see
    /// [`spawn_app`]).
    pub fn spawn_app(&self, args: &[&str]) -> Peer {
        let pod = (&self.lab, &self.cgroups);
        spawn_app(pod, &self.client, "redis", self.dialled, args)
    }

    /// Stops the daemon and starts a new one (a DaemonSet rollout) with
    /// `extra` arguments; returns once the new one knows the pods.
    pub fn restart_daemon(&mut self, extra: &[&str]) {
        self.daemon.terminate();
        self.daemon = start_daemon(&self.kube, self.chain_peer == SERVICE_PEER, extra);
    }

    /// Case C's end: the app's next query (on [`Peer::go`]) fails, met by
    /// the server's close or a reset, and the app closes.
    pub fn expect_next_query_fails(&mut self) {
        self.app.go();
        let outcome = self.app.expect_line_any(&["peer-closed", "error"]);
        assert!(
            outcome[0] == "peer-closed" || outcome[1] == "ECONNRESET",
            "the app's next query fails: {outcome:?}"
        );
        self.app.expect_line("closed");
    }
}

/// What differs between the scenarios.
pub struct Setup {
    /// Envoy's tcp_proxy idle_timeout.
    pub envoy_idle: Duration,
    /// TCP keepalive on Envoy's upstream sockets (1 s / 1 s / 3 probes).
    pub upstream_keepalive: bool,
    /// Redis's own `timeout` (0: none).
    pub redis_timeout_secs: u32,
    /// The router's conntrack expiry of established flows.
    pub conntrack_secs: u32,
    /// What the router does with packets of an expired flow.
    pub action: InvalidAction,
    /// `ct-client redis` arguments after the address.
    pub app_args: Vec<&'static str>,
    pub dest: Dest,
    /// Envoy's worker threads.
    pub envoy_concurrency: u32,
    /// Istio's inbound capture too (PREROUTING REDIRECT to 15006).
    pub inbound: bool,
}

/// The daemon, told the node and the fake API, with `extra` arguments;
/// returns once it knows both pods (and the Service, with `service`).
fn start_daemon(kube: &FakeKube, service: bool, extra: &[&str]) -> Daemon {
    let url = kube.url();
    let args = [&["--kube-api", &url, "--node-name", NODE][..], extra].concat();
    let daemon = Daemon::start("1s", &args);
    daemon.wait_metrics(Duration::from_secs(20), |m| {
        m.sum("conntracer_kube_pods", &[]) >= 2.0
            && (!service
                || m.sum(
                    "conntracer_kube_index_entries",
                    &[("kind", "service_ports")],
                ) >= 1.0)
    });
    daemon
}

/// The server's pod (namespace `db`) and its Service.
struct Backend {
    pod: &'static str,
    service: &'static str,
    /// The Service port and the pod's target port behind it.
    port: u16,
    target: u16,
}

const REDIS: Backend = Backend {
    pod: "redis-0",
    service: "redis",
    port: SERVICE_PORT,
    target: TARGET_PORT,
};

/// The fake API: the app's pod (`uid`, its containers' ids), the server's
/// pod, and with `service` its Service and EndpointSlice.
fn fake_api(
    lab: &NetLab,
    uid: &str,
    [app_id, proxy_id]: [&str; 2],
    backend: &Backend,
    service: bool,
) -> FakeKube {
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
            backend.pod,
            "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            NODE,
            &lab.server_ip().to_string(),
            &[(backend.service, &format!("containerd://{}", hex_id(3)))],
        ),
    ]);
    if service {
        let ip = lab.server_ip().to_string();
        kube.set_services(vec![service_json(
            "db",
            backend.service,
            &CLUSTER_IP.to_string(),
            &[(backend.service, backend.port, backend.target)],
        )]);
        kube.set_endpoint_slices(vec![endpoint_slice_json(
            "db",
            &format!("{}-x7k2p", backend.service),
            backend.service,
            &[(backend.service, backend.target)],
            &[SliceEndpoint {
                ip: &ip,
                pod: backend.pod,
                node: NODE,
                ready: true,
                terminating: false,
            }],
        )]);
    }
    kube
}

/// The fake API (the app's pod, the server's pod `backend` and, with
/// `service`, its Service), the app pod's cgroups, and the daemon.
fn pod_and_daemon(
    lab: &NetLab,
    backend: &Backend,
    service: bool,
) -> (FakeKube, PodCgroups, Daemon) {
    let uid = "4f1c2a9e-7b3d-4e5f-9a8b-1c2d3e4f5a6b";
    let (app_id, proxy_id) = (hex_id(1), hex_id(2));
    let kube = fake_api(lab, uid, [&app_id, &proxy_id], backend, service);
    let cgroups = PodCgroups::new(uid, &[("app", &app_id), ("istio-proxy", &proxy_id)]);
    // The daemon runs before the pod's processes start, as a DaemonSet does
    // on a node: the owners of listeners opened before it are not known yet
    // (see the closing notes of the reliability work).
    // A 1 s CLOSE_WAIT threshold: a leak shows within the tests' windows.
    let daemon = start_daemon(&kube, service, &["--close-wait-threshold", "1s"]);
    (kube, cgroups, daemon)
}

/// The HTTP Service of [`pool_mesh`]: `namespace/service`.
pub const WEB_PEER: &str = "db/web";

const WEB: Backend = Backend {
    pod: "web-0",
    service: "web",
    port: 80,
    target: 8080,
};

/// An HTTP Service behind the pod's sidecar pool; fields drop in
/// declaration order, the namespaces last.
pub struct PoolMesh {
    /// The Service's ClusterIP:port, which the apps dial.
    pub dialled: SocketAddr,
    /// The backend pod's address: where the sidecar's pool connects.
    pub backend: SocketAddr,
    pub daemon: Daemon,
    /// The app's connections, one `ct-client http` each, connected.
    pub apps: Vec<Peer>,
    pub redirect: SidecarRedirect,
    pub envoy: Envoy,
    pub web: NodeHttp,
    pub cgroups: PodCgroups,
    pub kube: FakeKube,
    pub lab: NetLab,
}

/// `apps` app connections (`ct-client http` with `app_args`, each
/// connected and then waiting for [`Peer::go`]) to an HTTP Service, through
/// Envoy with an HTTP connection manager (one worker) whose cluster pools
/// upstream connections to a real Node.js server (`keepAliveTimeout`
/// `keep_alive_ms`, each answer `delay_ms` late, so requests overlap).
pub fn pool_mesh(
    client: &str,
    node: &Path,
    apps: usize,
    app_args: &[&str],
    (keep_alive_ms, delay_ms): (u32, u32),
) -> PoolMesh {
    let lab = NetLab::new(InvalidAction::Drop, 300);
    let backend = SocketAddr::new(lab.server_ip(), WEB.target);
    let dialled = SocketAddr::new(CLUSTER_IP.into(), WEB.port);
    let (kube, cgroups, daemon) = pod_and_daemon(&lab, &WEB, true);
    let web = NodeHttp::start_on(lab.server(), node, backend, Some(keep_alive_ms), delay_ms);
    let mut opts = EnvoyOptions::sidecar(Duration::from_mins(1));
    opts.cgroup = Some(cgroups.dir("istio-proxy"));
    opts.services = vec![(dialled, backend)];
    opts.http_services = true;
    let envoy = Envoy::start(lab.client(), opts);
    let redirect = SidecarRedirect::istio_outbound(lab.client(), SIDECAR_UID, SIDECAR_PORT);
    let mut peers: Vec<Peer> = (0..apps)
        .map(|_| spawn_app((&lab, &cgroups), client, "http", dialled, app_args))
        .collect();
    for p in &mut peers {
        p.go();
    }
    for p in &mut peers {
        p.expect_port("connected");
    }
    PoolMesh {
        dialled,
        backend,
        daemon,
        apps: peers,
        redirect,
        envoy,
        web,
        cgroups,
        kube,
        lab,
    }
}

/// The pod with its sidecar and no app yet: the lab, the fake API (both
/// pods, and the Service with [`Dest::Service`]), the pod's cgroups, a
/// daemon, Envoy (in the `istio-proxy` container) and Istio's redirect.
/// Fields drop in declaration order: the namespaces last.
pub struct SidecarPod {
    /// Where the app connects: the backend's address or the Service's.
    pub dialled: SocketAddr,
    /// Where the backend listens (in `lab.server()`).
    pub backend: SocketAddr,
    pub daemon: Daemon,
    pub redirect: SidecarRedirect,
    pub inbound_redirect: Option<SidecarRedirect>,
    pub envoy: Envoy,
    pub cgroups: PodCgroups,
    pub kube: FakeKube,
    pub lab: NetLab,
}

impl SidecarPod {
    /// A Node.js app of the pod: `node -e script` in the app's network
    /// namespace and container cgroup (joined before exec).
    pub fn spawn_node_app(&self, node: &Path, script: &str) -> Peer {
        let mut cmd = self.lab.client().command(node);
        cmd.args(["-e", script]);
        self.cgroups.enter("app", &mut cmd);
        Peer::spawn("node app", cmd)
    }

    /// The pod's established connections by process name, as `ss -tnp`
    /// shows them in its network namespace: the ground truth.
    pub fn established_by_process(&self) -> std::collections::BTreeMap<String, usize> {
        let out = crate::checked_output(
            self.lab
                .client()
                .command("ss")
                .args(["-Htnp", "state", "established"]),
            "ss",
        );
        let mut by = std::collections::BTreeMap::new();
        for line in out.lines() {
            // ... users:(("envoy",pid=123,fd=45))
            if let Some((_, rest)) = line.split_once("users:((\"")
                && let Some((name, _)) = rest.split_once('"')
            {
                *by.entry(name.to_owned()).or_default() += 1;
            }
        }
        by
    }
}

/// Builds a [`SidecarPod`] for `s`; `envoy` may change Envoy's options
/// last (e.g. an HTTP connection manager instead of tcp_proxy).
pub fn sidecar_pod(s: &Setup, envoy: impl FnOnce(&mut EnvoyOptions)) -> SidecarPod {
    let lab = NetLab::new(s.action, s.conntrack_secs);
    let service = s.dest == Dest::Service;
    let backend = SocketAddr::new(
        lab.server_ip(),
        if service { TARGET_PORT } else { SERVICE_PORT },
    );
    let dialled = if service {
        SocketAddr::new(CLUSTER_IP.into(), SERVICE_PORT)
    } else {
        backend
    };
    let (kube, cgroups, daemon) = pod_and_daemon(&lab, &REDIS, service);
    let mut opts = EnvoyOptions::sidecar(s.envoy_idle);
    if s.upstream_keepalive {
        opts.upstream_keepalive = Some(UpstreamKeepalive {
            time_secs: 1,
            interval_secs: 1,
            probes: 3,
        });
    }
    opts.cgroup = Some(cgroups.dir("istio-proxy"));
    opts.concurrency = s.envoy_concurrency;
    if s.inbound {
        opts.inbound_port = Some(INBOUND_PORT);
    }
    if service {
        opts.services = vec![(dialled, backend)];
    }
    envoy(&mut opts);
    let envoy = Envoy::start(lab.client(), opts);
    let redirect = SidecarRedirect::istio_outbound(lab.client(), SIDECAR_UID, SIDECAR_PORT);
    let inbound_redirect = s
        .inbound
        .then(|| SidecarRedirect::istio_inbound(lab.client(), INBOUND_PORT));
    SidecarPod {
        dialled,
        backend,
        daemon,
        redirect,
        inbound_redirect,
        envoy,
        cgroups,
        kube,
        lab,
    }
}

/// Builds the mesh and runs the app (`client`: the `ct-client` binary) up to
/// its first reply through the sidecar.
pub fn mesh(client: &str, s: &Setup) -> Mesh {
    let pod = sidecar_pod(s, |_| {});
    let redis = Redis::start(pod.lab.server(), pod.backend, s.redis_timeout_secs);
    let mut app = spawn_app(
        (&pod.lab, &pod.cgroups),
        client,
        "redis",
        pod.dialled,
        &s.app_args,
    );
    app.go();
    app.expect_port("connected");
    assert_eq!(
        app.expect_line("reply"),
        ["ok"],
        "the app's first query goes through the sidecar"
    );
    Mesh {
        client: client.to_owned(),
        dialled: pod.dialled,
        chain_peer: if s.dest == Dest::Service {
            SERVICE_PEER
        } else {
            PEER
        },
        daemon: pod.daemon,
        app,
        redirect: pod.redirect,
        inbound_redirect: pod.inbound_redirect,
        envoy: pod.envoy,
        redis,
        cgroups: pod.cgroups,
        kube: pod.kube,
        lab: pod.lab,
    }
}

/// A [`Setup`] from its parts, in field order.
/// Case C's app: keepalive 1/1/3 on its leg; its next query waits for
/// [`crate::Peer::go`] after the idle time.
pub fn keepalive_app_args() -> Vec<&'static str> {
    [
        &KEEPALIVE_1_1_3[..],
        &["--pause-before-then", "--then", "send"],
    ]
    .concat()
}

pub fn setup(
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
        dest: Dest::Passthrough,
        envoy_concurrency: 1,
        inbound: false,
    }
}
