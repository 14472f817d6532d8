//! Findings (issue "findings"): real servers with real timeouts, and the
//! daemon's `/findings` and `conn-tracer findings` (text and JSON) against
//! the schema README documents ("Findings").
//!
//! - `server_idle_timeout`: a server that closes (with a goodbye) clients
//!   idle for 2 s: one finding, T within 5 % of 2 s;
//! - `keepalive_race`: Node.js with its own default keepAliveTimeout, left
//!   unset, and a client that reuses its connections after 8 s: one
//!   finding that names Node.js as the likely killer;
//! - `close_wait_leak`: Redis closes, the app never does;
//! - `connection_imbalance`: 24 long-lived connections to one Service's 3
//!   backends (fake API, real listeners), 20 on one pod: one finding with
//!   the per-pod counts `ss` shows; another Service's 8/8/8: none;
//! - `path_expiry`: three clients' sends after 6.25, 7 and 8 s of silence
//!   meet the reset of a router whose conntrack forgot their flows at 6 s:
//!   the finding bounds the path's timeout by 6.25 s and infers none;
//! - healthy traffic (short HTTP requests, a pool that closes its own idle
//!   connections, a busy connection) gives no finding, also across a
//!   daemon restart.
//!
//! Every test holds `serial()` and looks only at the findings of its own
//! peers (other traffic on the host may have findings of its own).

#![expect(
    clippy::float_cmp,
    reason = "the findings gauge is 0 or 1, exact in f64"
)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    NetNs, conn_tracer_bin, ct_client,
    daemon::{Daemon, Serial, serial},
    fake_kube::{FakeKube, SliceEndpoint, endpoint_slice_json, pod_json, service_json},
    mesh::hex_id,
    require_program_or_skip, require_root_or_skip,
    scenario::{KEEPALIVE_1_1_3, args, local, redis_close_wait_lab},
    serial_unless_skipped,
    servers::{EchoServer, Farewell, GoodbyeServer, NodeHttp, in_netns, keepalive_request},
    test_name,
};
use serde_json::Value;

/// The node the stale-endpoint test's daemon is told it runs on.
const NODE: &str = "node-findings";

/// The keys every finding has (README, "Findings"), and their JSON types.
const SCHEMA: [(&str, &str); 13] = [
    ("pattern", "string"),
    ("namespace", "string"),
    ("pod", "string"),
    ("peer", "string"),
    ("role", "string"),
    ("direction", "string"),
    ("count", "number"),
    ("first_seen", "string"),
    ("last_seen", "string"),
    ("inferred_timeout_s", "number|null"),
    ("likely_killer", "string|null"),
    ("evidence", "object"),
    ("fix", "string"),
];

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks one finding against [`SCHEMA`].
fn check_schema(f: &Value) {
    let obj = f.as_object().expect("a finding is an object");
    for (key, types) in SCHEMA {
        let v = obj.get(key).unwrap_or_else(|| panic!("no `{key}` in {f}"));
        assert!(
            types.split('|').any(|t| t == type_of(v)),
            "`{key}` is {} in {f}, want {types}",
            type_of(v)
        );
    }
    for time in ["first_seen", "last_seen"] {
        let t = f[time].as_str().unwrap_or_default();
        assert!(
            integration_tests::parse_rfc3339_utc(t).is_some(),
            "{time} {t} is not RFC 3339"
        );
    }
}

/// The daemon's findings about `peer` (from `/findings`, schema-checked).
fn findings_of(daemon: &Daemon, peer: &str) -> Vec<Value> {
    let all = daemon.findings();
    all.iter().for_each(check_schema);
    all.into_iter().filter(|f| f["peer"] == peer).collect()
}

/// Waits (bounded) until `peer` has a finding of `pattern` with at least
/// `count` evidence; returns it, after checking it is the only one.
fn wait_finding(daemon: &Daemon, peer: &str, pattern: &str, count: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mine = findings_of(daemon, peer);
        let of: Vec<&Value> = mine.iter().filter(|f| f["pattern"] == pattern).collect();
        if of.len() == 1 && of[0]["count"].as_u64().unwrap_or(0) >= count {
            assert_eq!(mine.len(), 1, "exactly one finding for {peer}: {mine:#?}");
            return of[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {pattern} finding with {count} for {peer}: {mine:#?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// `conn-tracer findings` against the daemon: its table and its JSON.
fn cli(daemon: &Daemon, json: bool) -> String {
    let mut cmd = Command::new(conn_tracer_bin());
    cmd.args(["findings", "--from", &format!("http://{}", daemon.addr)]);
    if json {
        cmd.arg("--json");
    }
    integration_tests::checked_output(&mut cmd, "conn-tracer findings")
}

/// Root and Node.js (else the test skips, with the reason), the daemons'
/// serial lock, and a namespace of the test's own.
fn node_lab(test: &str) -> Option<(std::path::PathBuf, Serial, NetNs)> {
    if !require_root_or_skip(test) {
        return None;
    }
    let node = require_program_or_skip(test, "node", "Node.js (npm's Debian package)")?;
    Some((node, serial(), NetNs::new()))
}

#[test]
fn root_server_idle_timeout_is_one_finding_with_the_timeout_and_the_cli_shows_it() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let server = GoodbyeServer::start(&ns, 16430, Farewell::Goodbye, Duration::from_secs(2));
    let daemon = Daemon::start("1s", &[]);
    // Three pooled connections the server times out after 2 s.
    in_netns(&ns, || {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                thread::spawn(|| {
                    let mut c = TcpStream::connect(("127.0.0.1", 16430)).expect("connect");
                    c.write_all(b"hi\n").expect("request");
                    let mut buf = [0u8; 3];
                    c.read_exact(&mut buf).expect("answer");
                    // Reads on until the server's close.
                    c.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("read timeout");
                    while matches!(c.read(&mut [0u8; 512]), Ok(n) if n > 0) {}
                })
            })
            .collect();
        for t in clients {
            t.join().expect("client");
        }
    });
    assert_eq!(
        server.wait_closes(3).len(),
        3,
        "the server timed out three clients; its log:\n{}",
        server.log()
    );
    let f = wait_finding(&daemon, "127.0.0.1:16430", "server_idle_timeout", 3);
    integration_tests::daemon::assert_inferred(&f, 2.0, "Gunicorn --keep-alive (default 2 s)");
    assert_eq!(
        (f["role"].as_str(), f["direction"].as_str()),
        (Some("host"), Some("outbound"))
    );
    assert_eq!(
        f["evidence"]["idle_s"].as_array().map(Vec::len),
        Some(3),
        "{f:#}"
    );
    assert!(
        f["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("below 2.0 s"),
        "{f:#}"
    );

    // The gauge, and the CLI as JSON and as a table.
    let m = daemon.scrape();
    let key = [
        ("pattern", "server_idle_timeout"),
        ("peer", "127.0.0.1:16430"),
    ];
    assert_eq!(
        m.sum("conntracer_findings", &key),
        1.0,
        "{}",
        m.dump("conntracer_findings")
    );
    let json: Vec<Value> = serde_json::from_str(&cli(&daemon, true)).expect("--json is an array");
    json.iter().for_each(check_schema);
    assert!(
        json.iter().any(|x| x["peer"] == "127.0.0.1:16430"),
        "{json:#?}"
    );
    let text = cli(&daemon, false);
    let row = text
        .lines()
        .find(|l| l.contains("127.0.0.1:16430"))
        .unwrap_or_else(|| panic!("no row for the server in:\n{text}"));
    for want in ["server_idle_timeout", "host", "2.0", "Gunicorn"] {
        assert!(row.contains(want), "{want} missing in {row}");
    }
    assert!(text.lines().any(|l| l.starts_with("PATTERN")), "{text}");
    assert!(
        text.contains("  fix: The server closes connections idle for ~2.0 s"),
        "{text}"
    );
}

#[test]
fn root_node_default_keepalive_timeout_is_named_as_the_likely_killer() {
    let Some((node, _serial, ns)) = node_lab(test_name!()) else {
        return;
    };
    // keepAliveTimeout left at Node's default.
    let server = NodeHttp::start(&ns, &node, 18090, None);
    let daemon = Daemon::start("60s", &[]);
    let addr = local(server.port());
    // Three pooled connections reused 8 s after their last response: the
    // server closed each (at ~6 s on Node 20), the reuse fails.
    let failed = in_netns(&ns, || {
        let reuses: Vec<_> = (0..3)
            .map(|_| {
                thread::spawn(move || {
                    let mut c = TcpStream::connect(addr).expect("connect");
                    c.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    assert!(keepalive_request(&mut c), "first request");
                    thread::sleep(Duration::from_secs(8));
                    !keepalive_request(&mut c)
                })
            })
            .collect();
        reuses
            .into_iter()
            .map(|t| t.join().expect("client"))
            .filter(|failed| *failed)
            .count()
    });
    assert_eq!(failed, 3, "every reuse after 8 s met the server's close");
    let f = wait_finding(&daemon, "127.0.0.1:18090", "keepalive_race", 3);
    let t = f["inferred_timeout_s"].as_f64().expect("T inferred");
    eprintln!("keepalive_race: T {t} s, killer {}", f["likely_killer"]);
    assert!(
        (5.0..6.2).contains(&t),
        "T {t} s, Node's keepAliveTimeout 5 s (+1 s): {f:#}"
    );
    let killer = f["likely_killer"].as_str().unwrap_or_default();
    assert!(
        killer.contains("Node.js http.Server keepAliveTimeout"),
        "{f:#}"
    );
}

#[test]
fn root_close_wait_leak_is_a_finding() {
    let _serial = serial_unless_skipped!();
    let (ns, redis, daemon) = redis_close_wait_lab(16440, 1, "1s");
    let holder = args("--idle-secs 0 --pause-before-then --then close");
    let mut app = ct_client!(&ns, "redis", local(16440), &holder);
    app.expect_connected_ok();
    let f = wait_finding_any(&daemon, "127.0.0.1:16440", "close_wait_leak");
    assert_eq!(f["count"], 1, "{f:#}");
    assert!(
        f["fix"].as_str().unwrap_or_default().contains("CLOSE_WAIT"),
        "{f:#}"
    );
    app.go();
    app.expect_closed_then_exit();
    drop(redis);
}

/// As [`wait_finding`], beside other patterns for the same peer (the
/// leak's peer also timed the connection out: a server idle timeout).
fn wait_finding_any(daemon: &Daemon, peer: &str, pattern: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mine = findings_of(daemon, peer);
        let of: Vec<Value> = mine
            .into_iter()
            .filter(|f| f["pattern"] == pattern)
            .collect();
        if let [one] = &of[..] {
            return one.clone();
        }
        assert!(
            of.len() < 2 && Instant::now() < deadline,
            "{pattern} for {peer}: {of:#?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn root_healthy_traffic_gives_no_finding() {
    let Some((node, _serial, ns)) = node_lab(test_name!()) else {
        return;
    };
    let server = NodeHttp::start(&ns, &node, 18091, Some(3000));
    let daemon = Daemon::start("1s", &[]);
    let addr = local(server.port());
    in_netns(&ns, || {
        // Short HTTP requests, one connection each.
        for _ in 0..20 {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            assert!(keepalive_request(&mut c));
        }
        // A busy pooled connection: a request every 200 ms for 4 s.
        let mut busy = TcpStream::connect(addr).expect("connect");
        busy.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for _ in 0..20 {
            assert!(keepalive_request(&mut busy), "busy connection");
            thread::sleep(Duration::from_millis(200));
        }
        // A pool that retires its own idle connection after 1.5 s (below
        // the server's 3 s).
        let mut idle = TcpStream::connect(addr).expect("connect");
        idle.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert!(keepalive_request(&mut idle));
        thread::sleep(Duration::from_millis(1500));
        drop(idle);
        drop(busy);
    });
    thread::sleep(Duration::from_secs(1));
    let mine = findings_of(&daemon, "127.0.0.1:18091");
    assert!(mine.is_empty(), "healthy traffic, no finding: {mine:#?}");
}

#[test]
fn root_connects_to_a_deleted_pod_are_a_stale_endpoint() {
    let _serial = serial_unless_skipped!();
    // The deleted pod's address, on this namespace's loopback: nothing
    // listens there any more, the kernel refuses the connects.
    let ns = NetNs::new();
    let status = ns
        .command("ip")
        .args(["addr", "add", "10.250.0.9/32", "dev", "lo"])
        .status()
        .expect("ip addr add");
    assert!(status.success());
    let kube = FakeKube::start(NODE);
    kube.set_pods(vec![pod_json(
        "db",
        "old-0",
        "6b2d0c1e-3f4a-4b5c-8d9e-0f1a2b3c4d5e",
        NODE,
        "10.250.0.9",
        &[("pg", &format!("containerd://{}", hex_id(0x5e)))],
    )]);
    let daemon = Daemon::start("1s", &["--kube-api", &kube.url(), "--node-name", NODE]);
    let pods = |m: &integration_tests::daemon::Metrics| m.sum("conntracer_kube_pods", &[]);
    daemon.wait_metrics(Duration::from_secs(20), |m| pods(m) >= 1.0);
    // Deleted from the API (within deleted_pod_grace: still named).
    kube.set_pods(vec![]);
    daemon.wait_metrics(Duration::from_secs(20), |m| pods(m) < 1.0);
    let refused = in_netns(&ns, || {
        (0..3)
            .filter(|_| TcpStream::connect(("10.250.0.9", 5432)).is_err())
            .count()
    });
    assert_eq!(refused, 3, "nothing listens on the deleted pod's address");
    let f = wait_finding(&daemon, "db/old-0", "stale_endpoint", 3);
    assert_eq!(f["evidence"]["connect_failure"], "refused", "{f:#}");
    assert!(
        f["fix"].as_str().unwrap_or_default().contains("deleted"),
        "{f:#}"
    );
}

/// Two headless-style Services of 3 ready backends each (pod IPs on this
/// namespace's loopback, each with a real listener on the target port),
/// and the EndpointSlices the controller would write for them.
fn grpc_services(ns: &NetNs, kube: &FakeKube) -> Vec<std::net::TcpListener> {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    let mut listeners = Vec::new();
    for (svc, base) in [("grpc-a", 1), ("grpc-b", 4)] {
        let pods: Vec<(String, String)> = (0..3)
            .map(|i| (format!("10.251.0.{}", base + i), format!("{svc}-{i}")))
            .collect();
        for (ip, _) in &pods {
            let status = ns
                .command("ip")
                .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
                .status()
                .expect("ip addr add");
            assert!(status.success(), "ip addr add {ip}");
            let at = format!("{ip}:{IMBALANCE_PORT}");
            listeners.push(in_netns(ns, || {
                std::net::TcpListener::bind(&at).expect("a backend's listener")
            }));
        }
        let cluster_ip = format!("10.96.51.{base}");
        services.push(service_json(
            "shop",
            svc,
            &cluster_ip,
            &[("grpc", 50051, IMBALANCE_PORT)],
        ));
        let eps: Vec<SliceEndpoint<'_>> = pods
            .iter()
            .map(|(ip, pod)| SliceEndpoint {
                ip,
                pod,
                node: "node-other",
                ready: true,
                terminating: false,
            })
            .collect();
        slices.push(endpoint_slice_json(
            "shop",
            &format!("{svc}-x7k2p"),
            svc,
            &[("grpc", IMBALANCE_PORT)],
            &eps,
        ));
    }
    kube.set_services(services);
    kube.set_endpoint_slices(slices);
    listeners
}

/// The backends' target port.
const IMBALANCE_PORT: u16 = 15051;

/// Established connections from `ns` to each `ip:IMBALANCE_PORT`, as
/// `ss` counts them: the ground truth.
fn established_to(ns: &NetNs) -> std::collections::BTreeMap<String, u64> {
    let out = integration_tests::checked_output(
        ns.command("ss").args([
            "-Htn",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{IMBALANCE_PORT}"),
        ]),
        "ss",
    );
    let mut by_ip = std::collections::BTreeMap::new();
    for line in out.lines() {
        // Recv-Q Send-Q Local Peer
        if let Some(peer) = line.split_whitespace().nth(3)
            && let Some((ip, _)) = peer.rsplit_once(':')
        {
            *by_ip.entry(ip.to_string()).or_default() += 1;
        }
    }
    by_ip
}

#[test]
fn root_long_lived_connections_pinned_to_one_backend_are_a_connection_imbalance() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let kube = FakeKube::start(NODE);
    let _listeners = grpc_services(&ns, &kube);
    let daemon = Daemon::start_on("60s", &kube, "imbalance_min_age = \"3s\"\n");
    daemon.wait_metrics(Duration::from_secs(20), |m| {
        m.sum("conntracer_kube_index_entries", &[("kind", "endpoints")]) >= 6.0
    });
    // grpc-a: 24 long-lived connections, 20 of them on one pod (what
    // connection-level balancing leaves after a rollout); grpc-b: 8/8/8.
    let spread = [(1, 20), (2, 2), (3, 2), (4, 8), (5, 8), (6, 8)];
    let opened = Instant::now();
    let _conns: Vec<TcpStream> = in_netns(&ns, || {
        spread
            .iter()
            .flat_map(|&(host, n)| {
                (0..n).map(move |_| {
                    TcpStream::connect((format!("10.251.0.{host}"), IMBALANCE_PORT))
                        .expect("connect to a backend")
                })
            })
            .collect()
    });
    let truth = established_to(&ns);
    let want: Vec<(String, u64)> = spread
        .iter()
        .map(|&(host, n)| (format!("10.251.0.{host}"), n))
        .collect();
    assert_eq!(
        truth.into_iter().collect::<Vec<_>>(),
        want,
        "ss: the connections are up"
    );
    // Younger than imbalance_min_age: not long-lived yet, no finding.
    let young = findings_of(&daemon, "shop/grpc-a");
    if opened.elapsed() < Duration::from_millis(2500) {
        assert!(young.is_empty(), "connections < 3 s old: {young:#?}");
    } else {
        eprintln!("connecting took over 2.5 s: the min-age check is left out this run");
    }
    let f = wait_finding(&daemon, "shop/grpc-a", "connection_imbalance", 24);
    eprintln!("connection_imbalance: {f:#}");
    assert_eq!(f["count"], 24, "{f:#}");
    assert_eq!(
        (f["namespace"].as_str(), f["pod"].as_str()),
        (Some("shop"), Some(""))
    );
    let e = &f["evidence"];
    assert_eq!(
        e["connections_per_pod"],
        serde_json::json!({"shop/grpc-a-0": 20, "shop/grpc-a-1": 2, "shop/grpc-a-2": 2}),
        "{f:#}"
    );
    assert_eq!(
        (e["mean"].as_f64(), e["factor"].as_f64(), e["max"].as_u64()),
        (Some(8.0), Some(2.5), Some(20)),
        "{f:#}"
    );
    assert_eq!(e["busiest"], "shop/grpc-a-0");
    assert_eq!(e["clients"], serde_json::json!({"host": 24}), "{f:#}");
    assert_eq!(f["inferred_timeout_s"], Value::Null);
    assert!(
        f["fix"]
            .as_str()
            .unwrap_or_default()
            .contains("MaxConnectionAge"),
        "{f:#}"
    );
    // The balanced Service was looked at in the same pass: no finding.
    let balanced = findings_of(&daemon, "shop/grpc-b");
    assert!(balanced.is_empty(), "8/8/8 is balanced: {balanced:#?}");
    let m = daemon.scrape();
    let key = [("pattern", "connection_imbalance"), ("peer", "shop/grpc-a")];
    assert_eq!(m.sum("conntracer_findings", &key), 1.0);
}

/// The conntrack lab's expiry of established flows, for `path_expiry`.
const PATH_EXPIRY_S: u32 = 6;

/// Three idle connections across a router whose conntrack forgets flows
/// idle for 6 s and rejects (RST) what comes after: each client's send
/// after 6.25, 7 or 8 s of silence meets the reset. The path's timeout is
/// seen by no endpoint; the finding bounds it by the shortest silence
/// (within 5 % of 6 s here, as one reuse came soon after it) and states
/// no timeout of its own. A client with keepalive below it survives.
#[test]
fn root_path_expiry_is_bounded_by_the_shortest_silence_and_keepalive_below_it_survives() {
    let _serial = serial_unless_skipped!();
    let lab = integration_tests::netlab::NetLab::new(
        integration_tests::netlab::InvalidAction::Reject,
        PATH_EXPIRY_S,
    );
    let echo = EchoServer::start(lab.server(), std::net::SocketAddr::new(lab.server_ip(), 7));
    let daemon = Daemon::start("1s", &[]);
    let mut silent: Vec<_> = ["6.25", "7", "8"]
        .into_iter()
        .map(|idle| {
            let script = ["--idle-secs", idle, "--then", "send"];
            ct_client!(lab.client(), "raw", echo.addr(), &script)
        })
        .collect();
    let kept_args = [
        &["--idle-secs", "8", "--then", "send"][..],
        &KEEPALIVE_1_1_3,
    ]
    .concat();
    let mut kept = ct_client!(lab.client(), "raw", echo.addr(), &kept_args);
    for c in silent.iter_mut().chain([&mut kept]) {
        c.expect_connected_ok();
    }
    // The clients' own view: a reset answered each send after the silence.
    for c in &mut silent {
        assert_eq!(c.expect_line("error")[0], "ECONNRESET");
        c.expect_closed_then_exit();
    }
    assert_eq!(
        kept.expect_line("reply"),
        ["ok"],
        "keepalive below 6 s kept its flow"
    );
    kept.expect_closed_then_exit();
    assert!(
        lab.invalid_packets() >= 3,
        "the router rejected the expired flows"
    );
    let peer = format!("{}:7", lab.server_ip());
    let f = wait_finding(&daemon, &peer, "path_expiry", 3);
    eprintln!("path_expiry: {f:#}");
    let bound = f["evidence"]["expiry_at_most_s"].as_f64().expect("a bound");
    let t = f64::from(PATH_EXPIRY_S);
    assert!(
        bound >= t - 0.05 && bound <= t * 1.05,
        "bound {bound} s, the path's timeout {t} s: {f:#}"
    );
    assert_eq!(
        (&f["inferred_timeout_s"], &f["likely_killer"]),
        (&Value::Null, &Value::Null),
        "a silence is no measure of the path's timeout: {f:#}"
    );
    assert_eq!(f["evidence"]["idle_s"].as_array().map(Vec::len), Some(3));
    let fix = f["fix"].as_str().unwrap_or_default();
    assert!(
        fix.contains("at most 6.") && fix.contains("keepalive"),
        "{fix}"
    );
}

/// Healthy traffic across a daemon restart (a DaemonSet rollout): a busy
/// pooled connection and an idle one, both older than the new daemon
/// (which learns them from its snapshot), then the pool retires the idle
/// one itself (idle ~5 s, below the server's 10 s) and short requests
/// follow. Neither daemon has a finding for the server.
#[test]
fn root_healthy_traffic_across_a_daemon_restart_gives_no_finding() {
    let Some((node, _serial, ns)) = node_lab(test_name!()) else {
        return;
    };
    let server = NodeHttp::start(&ns, &node, 18092, Some(10_000));
    let addr = local(server.port());
    let peer = addr.to_string();
    let old = Daemon::start("1s", &[]);
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let traffic = ns.spawn_in(move || {
        let open = || {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            assert!(keepalive_request(&mut c));
            c
        };
        let (pool, mut busy) = (open(), open());
        let pool_used = Instant::now();
        // A request every 200 ms until 2 s after the new daemon is up
        // (at most 30 s).
        let mut up: Option<Instant> = None;
        for _ in 0..150 {
            assert!(keepalive_request(&mut busy), "busy connection");
            thread::sleep(Duration::from_millis(200));
            if up.is_none() && up_rx.try_recv().is_ok() {
                up = Some(Instant::now());
            }
            if up.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) {
                break;
            }
        }
        assert!(up.is_some(), "the new daemon came up within 30 s");
        let idle = pool_used.elapsed();
        assert!(
            idle < Duration::from_secs(9),
            "the pool's connection idled {idle:?}"
        );
        drop(pool);
        for _ in 0..10 {
            drop(open());
        }
        drop(busy);
    });
    thread::sleep(Duration::from_secs(1));
    let before = findings_of(&old, &peer);
    assert!(before.is_empty(), "before the restart: {before:#?}");
    assert!(old.stop(), "the old daemon exits 0");
    let new = Daemon::start("1s", &[]);
    // Both pooled connections are older than it, and known to it.
    let list = new.connections();
    let known = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| c["remote"] == peer.as_str())
        .count();
    up_tx.send(()).expect("the traffic thread waits");
    traffic.join().expect("traffic");
    assert_eq!(
        known, 2,
        "the snapshot found the pool's connections: {list:#}"
    );
    thread::sleep(Duration::from_secs(1));
    let after = findings_of(&new, &peer);
    assert!(after.is_empty(), "healthy traffic, no finding: {after:#?}");
}
