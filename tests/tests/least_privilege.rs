//! Least privilege: the daemon run as uid 0 with exactly the DaemonSet's
//! capabilities (`DAEMONSET_CAPS`: CAP_SYS_ADMIN, CAP_SYS_PTRACE,
//! CAP_DAC_READ_SEARCH; nothing else, `no_new_privs`, as the DaemonSet's
//! securityContext gives it) does everything: an idle kill in a pod-like
//! network namespace (one only reachable through /proc, as a pod's is from
//! a DaemonSet) of another user is classified, that user's connection
//! older than the daemon is found with its owner, and keepalive setsockopt
//! calls are seen. With one of them removed, the daemon either refuses to
//! start or names the missing capability and what it loses. And what it
//! serves carries no payload.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use integration_tests::{
    NetNs, Peer, conn_tracer_bin,
    daemon::{
        DAEMONSET_CAPS, Daemon, assert_owned, capabilities_of, capability_bit, delta, find_between,
        find_local, http_get, names::KILLS,
    },
    serial_unless_skipped,
    servers::in_netns,
    unique_suffix,
};

const SOCKOPTS: &str = "conntracer_keepalive_sockopts_total";
/// Not root, not the test's user: the pods' processes.
const POD_UID: u32 = 4321;

/// A process of another user in a network namespace of its own that is not
/// named in /run/netns (like a pod's, seen from a DaemonSet with hostPID):
/// the daemon can only find it through /proc/<pid>/ns/net. It listens on
/// PORT, holds one connection to itself with keepalive on (TCP_KEEPIDLE
/// 7301), prints `ready CLIENT_PORT`, and on `go`: sets TCP_KEEPIDLE 7302
/// on that connection, opens a second one (TCP_KEEPIDLE 7303), lets both
/// idle 1.5 s, closes their server sides (FIN) and then their clients.
const POD_PROCESS: &str = r#"
import socket, sys, time
PORT = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", PORT)); srv.listen()
def dial(idle):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    c.connect(("127.0.0.1", PORT)); a, _ = srv.accept()
    c.sendall(b"ping"); a.recv(4); a.sendall(b"pong"); c.recv(4)
    return c, a
old, old_a = dial(7301)
print("ready", old.getsockname()[1], flush=True)
for line in sys.stdin:
    if line.strip() == "go":
        break
else:
    sys.exit(0)
old.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 7302)
new, new_a = dial(7303)
print("new", new.getsockname()[1], flush=True)
time.sleep(1.5)
old_a.close(); new_a.close()
for c in (old, new):
    c.settimeout(5)
    assert c.recv(16) == b""
    c.close()
print("closed", flush=True)
for line in sys.stdin:
    pass
"#;

/// Starts [`POD_PROCESS`] as uid/gid [`POD_UID`] in a fresh unnamed network
/// namespace (`unshare --net`, which execs in place: the peer's pid is the
/// Python process's, killed on drop, and the namespace goes with it).
fn pod_process(port: u16) -> (Peer, u16) {
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && exec setpriv --reuid={POD_UID} --regid={POD_UID} \
             --clear-groups --pdeathsig KILL -- /usr/bin/python3 -c \"$0\" {port}"
        ))
        .arg(POD_PROCESS);
    let mut peer = Peer::spawn("pod process", cmd);
    let client_port = peer.expect_port("ready");
    (peer, client_port)
}

fn mask(caps: &[&str]) -> u64 {
    caps.iter().map(|c| capability_bit(c)).fold(0, |a, b| a | b)
}

#[test]
fn root_daemonset_capabilities_are_enough_for_every_feature() {
    let _serial = serial_unless_skipped!();
    let (mut pod, old_port) = pod_process(17_471);
    let daemon =
        Daemon::start_with_caps(&DAEMONSET_CAPS, "1s", &["--no-kube"]).unwrap_or_else(|stderr| {
            panic!("the daemon did not start with {DAEMONSET_CAPS:?}:\n{stderr}")
        });
    let (prm, eff, bnd, amb) = capabilities_of(daemon.pid());
    let want = mask(&DAEMONSET_CAPS);
    assert_eq!(
        (prm, eff, bnd, amb),
        (want, want, want, 0),
        "the daemon runs with exactly {DAEMONSET_CAPS:?}"
    );
    let stderr = daemon.stderr();
    assert!(
        !stderr.contains("is missing"),
        "no capability gap reported with the DaemonSet's set:\n{stderr}"
    );

    // The connection older than the daemon, of another user, in a namespace
    // only /proc leads to: found at start-up, with its owner and keepalive.
    let list = daemon.connections();
    let old = pod_conn(&list, old_port, 17_471)
        .unwrap_or_else(|| panic!("old connection :{old_port} not in {list:#}\n{stderr}"));
    assert_owned(old, "proc", pod.pid());
    assert_eq!(old["uid"].as_u64(), Some(u64::from(POD_UID)), "{old}");
    assert_eq!(old["comm"], "python3", "{old}");
    assert_eq!(old["direction"], "outbound", "{old}");
    assert_eq!(old["keepalive"]["enabled"], true, "{old}");
    assert_eq!(old["keepalive"]["idle_s"].as_f64(), Some(7301.0), "{old}");

    // Keepalive options set now, and an idle kill of each connection by
    // its server, the old one and a new one.
    let before = daemon.scrape();
    pod.go();
    let new_port = pod.expect_port("new");
    let list = daemon.connections();
    let new = pod_conn(&list, new_port, 17_471)
        .unwrap_or_else(|| panic!("new connection :{new_port} not in {list:#}"));
    assert_owned(new, "known", pod.pid());
    assert_eq!(new["uid"].as_u64(), Some(u64::from(POD_UID)), "{new}");
    pod.expect_line("closed");

    let kill = [
        ("peer", "127.0.0.1:17471"),
        ("direction", "outbound"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "on"),
    ];
    daemon.wait_metrics(Duration::from_secs(10), |m| {
        delta(&before, m, KILLS, &kill) >= 2.0
    });
    thread::sleep(Duration::from_millis(300));
    let m = daemon.scrape();
    assert_eq!(
        delta(&before, &m, KILLS, &kill),
        2.0,
        "the old and the new connection killed idle by their server: {}",
        m.dump(KILLS)
    );
    for (option, value) in [
        ("TCP_KEEPIDLE", "7302"),
        ("TCP_KEEPIDLE", "7303"),
        ("SO_KEEPALIVE", "1"),
    ] {
        assert!(
            delta(
                &before,
                &m,
                SOCKOPTS,
                &[("option", option), ("value", value)]
            ) >= 1.0,
            "{option}={value} of uid {POD_UID} in its own namespace: {}",
            m.dump(SOCKOPTS)
        );
    }
    assert_eq!(m.sum("conntracer_events_lost_total", &[]), 0.0);
    assert!(
        daemon.stop(),
        "exits 0 on SIGTERM with only these capabilities"
    );
}

/// The `/connections` entry of the pod process's client socket from
/// `port` to its own listener on `pod_port` (both ends: on a host with many
/// loopback connections one in another namespace has the same local port).
fn pod_conn(list: &serde_json::Value, port: u16, pod_port: u16) -> Option<&serde_json::Value> {
    let (local, remote) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{pod_port}"));
    find_between(list, &local, &remote)
}

/// The daemon with `caps`: what it said on stderr, and whether the pod
/// process's old connection (to [`PORT_UNDER_CAPS`]) was listed, and with
/// which owner.
fn run_with(caps: &[&str], old_port: u16) -> Result<(String, Option<String>), String> {
    let daemon = Daemon::start_with_caps(caps, "1s", &["--no-kube"])?;
    let list = daemon.connections();
    let owner = pod_conn(&list, old_port, PORT_UNDER_CAPS)
        .map(|c| c["owner"].as_str().unwrap_or_default().to_owned());
    let stderr = daemon.stderr();
    assert!(daemon.stop(), "exits 0 on SIGTERM with {caps:?}");
    Ok((stderr, owner))
}

/// The pod process's port in the capability test.
const PORT_UNDER_CAPS: u16 = 17_472;

#[test]
fn root_each_missing_capability_is_fatal_or_named() {
    let _serial = serial_unless_skipped!();
    let (pod, old_port) = pod_process(PORT_UNDER_CAPS);
    let without = |cap: &str| -> Vec<&str> {
        DAEMONSET_CAPS
            .iter()
            .copied()
            .filter(|c| *c != cap)
            .collect()
    };

    // Without CAP_SYS_ADMIN but with what it stands for in BPF (CAP_BPF,
    // CAP_PERFMON, CAP_NET_ADMIN): runs, cannot enter the pod's namespace.
    let mut caps = without("sys_admin");
    caps.extend(["bpf", "perfmon", "net_admin"]);
    let (stderr, owner) = run_with(&caps, old_port).expect("starts without CAP_SYS_ADMIN");
    assert!(
        stderr.contains("CAP_SYS_ADMIN is missing") && stderr.contains("setns"),
        "names CAP_SYS_ADMIN:\n{stderr}"
    );
    assert_eq!(owner, None, "the pod's old connection cannot be found");

    // Without CAP_SYS_PTRACE: the namespace link of another user's process
    // is unreadable.
    let (stderr, owner) =
        run_with(&without("sys_ptrace"), old_port).expect("starts without CAP_SYS_PTRACE");
    assert!(
        stderr.contains("CAP_SYS_PTRACE is missing"),
        "names CAP_SYS_PTRACE:\n{stderr}"
    );
    assert_eq!(owner, None, "the pod's namespace is hidden");

    // Without CAP_DAC_READ_SEARCH: found, but its owner is not.
    let (stderr, owner) = run_with(&without("dac_read_search"), old_port)
        .expect("starts without CAP_DAC_READ_SEARCH");
    // (The refusal names the first process of another user in /proc: on
    // a busy host not necessarily ours.)
    assert!(
        stderr.contains("CAP_DAC_READ_SEARCH is missing")
            && stderr.contains("permission denied: reading /proc/"),
        "names CAP_DAC_READ_SEARCH and a process:\n{stderr}"
    );
    assert_eq!(owner.as_deref(), Some("unknown"), "owner not found");

    // Nothing that can load BPF programs: refuses to start, and says what
    // to grant.
    let stderr = run_with(&["sys_ptrace", "dac_read_search"], old_port)
        .expect_err("cannot start without CAP_SYS_ADMIN or CAP_BPF");
    assert!(
        stderr.contains("cannot start the tracer") && stderr.contains("grant CAP_SYS_ADMIN"),
        "{stderr}"
    );
    // CAP_BPF and CAP_PERFMON without CAP_NET_ADMIN (or CAP_SYS_ADMIN): the
    // cgroup setsockopt program is refused, and the message says so.
    let stderr = run_with(
        &["bpf", "perfmon", "sys_ptrace", "dac_read_search"],
        old_port,
    )
    .expect_err("cannot load the cgroup program without CAP_NET_ADMIN");
    assert!(
        stderr.contains("cgroup/setsockopt") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    drop(pod);
}

/// The same set as ambient capabilities of a non-root uid works as well
/// (what deploy/README.md says; Kubernetes cannot grant ambient ones, so
/// the DaemonSet runs as uid 0).
#[test]
fn root_daemonset_capabilities_also_work_for_a_non_root_uid() {
    let _serial = serial_unless_skipped!();
    let (pod, old_port) = pod_process(17_474);
    let pod_port = 17_474;
    let daemon = Daemon::start_as_user_with_caps(65_532, &DAEMONSET_CAPS, "1s", &["--no-kube"])
        .unwrap_or_else(|stderr| panic!("did not start as uid 65532:\n{stderr}"));
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65532")),
        "{status}"
    );
    let list = daemon.connections();
    let old = pod_conn(&list, old_port, pod_port)
        .unwrap_or_else(|| panic!("old connection :{old_port} not in {list:#}"));
    assert_owned(old, "proc", pod.pid());
    assert!(
        !daemon.stderr().contains("is missing"),
        "{}",
        daemon.stderr()
    );
    assert!(daemon.stop());
}

#[test]
fn root_metrics_and_connections_expose_no_payload() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let daemon = Daemon::start_with_caps(&DAEMONSET_CAPS, "1s", &["--no-kube"])
        .unwrap_or_else(|stderr| panic!("the daemon did not start:\n{stderr}"));
    let to_server = format!("CTMARKER-req-{}", unique_suffix());
    let to_client = format!("CTMARKER-resp-{}", unique_suffix());
    // A traced connection in the test's namespace that carries both markers
    // and stays open while the daemon is asked about it.
    let (client, server, client_port) = in_netns(&ns, || {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 17_473)).expect("bind");
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, 17_473)).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(to_server.as_bytes()).expect("send");
        let mut got = vec![0u8; to_server.len()];
        server.read_exact(&mut got).expect("receive");
        server.write_all(to_client.as_bytes()).expect("reply");
        let mut got = vec![0u8; to_client.len()];
        client.read_exact(&mut got).expect("receive reply");
        let port = client.local_addr().expect("addr").port();
        (client, server, port)
    });

    let (code, metrics) = http_get(daemon.addr, "/metrics").expect("/metrics");
    assert_eq!(code, 200);
    let (code, connections) = http_get(daemon.addr, "/connections").expect("/connections");
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&connections).expect("JSON");
    let mine = find_local(&list, &format!("127.0.0.1:{client_port}"))
        .unwrap_or_else(|| panic!("the traced connection :{client_port} is listed: {list:#}"));
    // It is traced: its byte counts are there (the kernel's counters also
    // count the SYN's sequence number), its bytes are not.
    let sent = u64::try_from(to_server.len()).expect("fits");
    let received = u64::try_from(to_client.len()).expect("fits");
    assert!(
        mine["bytes_acked"]
            .as_u64()
            .is_some_and(|b| (sent..=sent + 1).contains(&b))
            && mine["bytes_received"]
                .as_u64()
                .is_some_and(|b| (received..=received + 1).contains(&b)),
        "{mine}"
    );
    let cli = Command::new(conn_tracer_bin())
        .args(["connections", "--json", "--from"])
        .arg(format!("http://{}", daemon.addr))
        .output()
        .expect("conn-tracer connections");
    assert!(cli.status.success(), "{cli:?}");
    let cli = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.contains(&format!(":{client_port}")),
        "listed by the CLI"
    );
    for (what, text) in [
        ("/metrics", metrics.as_str()),
        ("/connections", connections.as_str()),
        ("conn-tracer connections --json", &cli),
    ] {
        for marker in [&to_server, &to_client] {
            assert!(
                !text.contains(marker.as_str()),
                "{what} shows payload {marker}"
            );
        }
        assert!(!text.contains("CTMARKER"), "{what} shows payload");
    }
    drop((client, server));
    assert!(daemon.stop());
}

#[test]
fn capability_bits_match_linux() {
    // linux/capability.h
    assert_eq!(capability_bit("sys_admin"), 1 << 21);
    assert_eq!(capability_bit("sys_ptrace"), 1 << 19);
    assert_eq!(capability_bit("dac_read_search"), 1 << 2);
    assert_eq!(mask(&DAEMONSET_CAPS), 0x28_0004);
}
