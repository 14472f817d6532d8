//! The real servers, the NAT/firewall lab and `ct-client` on their own,
//! without the tracer: each server's idle timeout really closes an idle
//! client, about when configured, and the server's own ground-truth counter
//! goes up by exactly one; the conntrack path black-holes or resets an
//! expired flow, and keepalive keeps it alive. The tracer tests build on
//! these facts, so when one changes (another server version, another
//! kernel) it shows here first.
//!
//! Timings are printed on stderr (`--nocapture` shows them).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use integration_tests::{
    NetNs, Peer,
    netlab::{InvalidAction, NetLab},
    require_root_or_skip,
    servers::{
        EchoServer, Envoy, EnvoyOptions, MariaDb, Memcached, Redis, SIDECAR_PORT, SIDECAR_UID,
        SidecarRedirect, UpstreamKeepalive, in_netns,
    },
    wait_counter,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");
/// The idle timeout every server gets here.
const IDLE_SECS: u32 = 2;
const IDLE_MS: u64 = 2000;

fn local(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

/// `ct-client PROTO --addr --port EXTRA...` inside `ns`.
fn client(ns: &NetNs, proto: &str, addr: SocketAddr, extra: &[&str]) -> Peer {
    let mut cmd = ns.command(CLIENT);
    cmd.args([proto, "--addr", &addr.ip().to_string(), "--port"])
        .arg(addr.port().to_string())
        .args(extra);
    Peer::spawn(&format!("ct-client {proto} {}", extra.join(" ")), cmd)
}

/// The milliseconds on an outcome line (`peer-closed MS`, `error ERRNO MS`).
fn ms_of(words: &[String]) -> u64 {
    words
        .last()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no milliseconds in {words:?}"))
}

/// The server's idle timer starts at its own last I/O, a few ms before the
/// client's read of the reply: allow it to look that much early.
const EARLY_MS: u64 = 50;

#[track_caller]
fn assert_fired(what: &str, ms: u64, max_late_ms: u64) {
    let _ = writeln_stderr(&format!(
        "{what}: closed {ms} ms after the last reply (configured {IDLE_MS} ms)"
    ));
    let (min, max) = (IDLE_MS - EARLY_MS, IDLE_MS + max_late_ms);
    assert!(
        (min..=max).contains(&ms),
        "{what} fired after {ms} ms; expected {min}..={max} ms"
    );
}

fn writeln_stderr(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    writeln!(std::io::stderr(), "{line}")
}

#[test]
fn root_mariadb_wait_timeout_kills_idle_session() {
    if !require_root_or_skip("root_mariadb_wait_timeout_kills_idle_session") {
        return;
    }
    let ns = NetNs::new();
    let db = MariaDb::start(&ns, local(3306), IDLE_SECS);
    assert_eq!(db.aborted_clients(), 0);

    // A polite client (COM_QUIT) is not an aborted client.
    let mut polite = client(
        &ns,
        "mysql",
        db.addr(),
        &["--count", "2", "--then", "close"],
    );
    polite.expect_port("connected");
    polite.expect_line("auth");
    polite.expect_line("reply");
    polite.expect_line("reply");
    polite.expect_line("closed");
    polite.wait_success();

    let mut idle = client(&ns, "mysql", db.addr(), &["--then", "wait-close"]);
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("auth"), ["ok"]);
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    // MariaDB closes a timed-out session with SO_LINGER 0: a RST.
    let words = idle.expect_line("error");
    assert_eq!(
        words[0], "ECONNRESET",
        "MariaDB's wait_timeout close: {words:?}"
    );
    assert_fired("MariaDB wait_timeout", ms_of(&words), 500);
    idle.expect_line("closed");
    idle.wait_success();

    wait_counter("Aborted_clients", 1, Duration::from_secs(5), || {
        db.aborted_clients()
    });
    let notes = db.wait_timeout_notes();
    assert_eq!(notes.len(), 1, "wait_timeout notes: {notes:?}");
}

#[test]
fn root_redis_timeout_closes_idle_client() {
    if !require_root_or_skip("root_redis_timeout_closes_idle_client") {
        return;
    }
    let ns = NetNs::new();
    let redis = Redis::start(&ns, local(6379), IDLE_SECS);
    let mut idle = client(&ns, "redis", redis.addr(), &["--then", "wait-close"]);
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    let words = idle.expect_line("peer-closed");
    // The check runs in serverCron on whole seconds (`now - last > timeout`).
    assert_fired("Redis --timeout", ms_of(&words), 1500);
    idle.expect_line("closed");
    idle.wait_success();
    wait_counter("Redis idle closes", 1, Duration::from_secs(2), || {
        redis.idle_closes()
    });
    // Only the INFO query's own connection is left.
    assert_eq!(redis.info_u64("connected_clients"), 1);
}

#[test]
fn root_memcached_idle_timeout_kicks() {
    if !require_root_or_skip("root_memcached_idle_timeout_kicks") {
        return;
    }
    let ns = NetNs::new();
    let mc = Memcached::start(&ns, local(11211), IDLE_SECS);
    assert_eq!(mc.idle_kicks(), 0);
    let mut idle = client(
        &ns,
        "memcached",
        mc.addr(),
        &["--then", "wait-close", "--timeout-secs", "15"],
    );
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    let words = idle.expect_line("peer-closed");
    // Coarse: a once-a-second check on a once-a-second clock.
    assert_fired("memcached idle_timeout", ms_of(&words), 8000);
    idle.expect_line("closed");
    idle.wait_success();
    wait_counter("memcached idle_kicks", 1, Duration::from_secs(2), || {
        mc.idle_kicks()
    });
}

#[test]
fn root_envoy_idle_timeout_closes_both_legs() {
    if !require_root_or_skip("root_envoy_idle_timeout_closes_both_legs") {
        return;
    }
    let ns = NetNs::new();
    // Redis without a timeout of its own as the upstream.
    let redis = Redis::start(&ns, local(6379), 0);
    let envoy = Envoy::start(
        &ns,
        EnvoyOptions::tcp_proxy(
            local(7000),
            redis.addr(),
            Duration::from_secs(IDLE_SECS.into()),
        ),
    );
    assert_eq!(envoy.idle_timeouts(), 0);
    let mut idle = client(&ns, "redis", envoy.listen_addr(), &["--then", "wait-close"]);
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    let words = idle.expect_line("peer-closed");
    assert_fired("Envoy tcp_proxy idle_timeout", ms_of(&words), 500);
    idle.expect_line("closed");
    idle.wait_success();
    wait_counter(
        "Envoy tcp.ctproxy.idle_timeout",
        1,
        Duration::from_secs(2),
        || envoy.idle_timeouts(),
    );
    assert_eq!(envoy.stat("tcp.ctproxy.downstream_cx_total"), Some(1));
    // Envoy closed its upstream leg too; Redis itself killed nothing.
    wait_counter("Redis connected_clients", 1, Duration::from_secs(2), || {
        redis.info_u64("connected_clients")
    });
    assert_eq!(redis.idle_closes(), 0);
}

#[test]
fn root_envoy_sidecar_proxies_transparently() {
    if !require_root_or_skip("root_envoy_sidecar_proxies_transparently") {
        return;
    }
    // App and sidecar in the client namespace, Redis across the router
    // (conntrack there remembers flows far longer than this test runs).
    let lab = NetLab::new(InvalidAction::Drop, 300);
    let upstream = SocketAddr::new(lab.server_ip(), 6379);
    let redis = Redis::start(lab.server(), upstream, 0);
    let mut opts = EnvoyOptions::sidecar(Duration::from_secs(IDLE_SECS.into()));
    opts.upstream_keepalive = Some(UpstreamKeepalive {
        time_secs: 1,
        interval_secs: 1,
        probes: 3,
    });
    let envoy = Envoy::start(lab.client(), opts);
    let status = fs::read_to_string(format!("/proc/{}/status", envoy.pid())).unwrap_or_default();
    assert!(
        status.lines().any(|l| l
            .split_whitespace()
            .eq(["Uid:", "1337", "1337", "1337", "1337"])),
        "Envoy must run as uid {SIDECAR_UID}:\n{status}"
    );
    let _redirect = SidecarRedirect::install(lab.client(), SIDECAR_UID, &[upstream], SIDECAR_PORT);

    let mut app = client(
        lab.client(),
        "redis",
        upstream,
        &["--keepalive", "--keepidle", "30", "--then", "wait-close"],
    );
    let app_port = app.expect_port("connected");
    assert_eq!(app.expect_line("reply"), ["ok"]);
    // The three sockets of the chain, seen from the client namespace.
    let sockets = socket_table(lab.client());
    let app_leg = format!("127.0.0.1:{SIDECAR_PORT} 10.231.1.2:{app_port}");
    assert!(
        sockets.iter().any(|s| s.contains(&app_leg)),
        "no Envoy socket accepted from the app ({app_leg}):\n{}",
        sockets.join("\n")
    );
    let upstream_leg = sockets
        .iter()
        .find(|s| s.contains("10.231.2.2:6379") && !s.contains(&format!(":{app_port} ")))
        .unwrap_or_else(|| panic!("no upstream socket of Envoy:\n{}", sockets.join("\n")));
    assert!(
        upstream_leg.contains("keepalive"),
        "Envoy's upstream socket has no keepalive timer: {upstream_leg}"
    );
    let words = app.expect_line("peer-closed");
    assert_fired("Envoy sidecar idle_timeout", ms_of(&words), 500);
    app.expect_line("closed");
    app.wait_success();
    wait_counter(
        "Envoy tcp.outbound.idle_timeout",
        1,
        Duration::from_secs(2),
        || envoy.idle_timeouts(),
    );
    assert_eq!(envoy.stat("tcp.outbound.downstream_cx_total"), Some(1));
    assert_eq!(redis.idle_closes(), 0);
}

/// `ss -tno` lines (`LOCAL PEER TIMER...`) of the established TCP sockets in `ns`.
fn socket_table(ns: &NetNs) -> Vec<String> {
    let out = ns
        .command("ss")
        .args(["-Htno", "state", "established"])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            // Recv-Q Send-Q Local Peer [timer:(...)]
            l.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
        })
        .collect()
}

#[test]
fn root_netlab_drop_blackholes_expired_flow_and_keepalive_survives() {
    if !require_root_or_skip("root_netlab_drop_blackholes_expired_flow_and_keepalive_survives") {
        return;
    }
    let lab = NetLab::new(InvalidAction::Drop, IDLE_SECS);
    let redis = Redis::start(lab.server(), SocketAddr::new(lab.server_ip(), 6379), 0);
    let idle_args = [
        "--idle-secs",
        "4",
        "--then",
        "send",
        "--user-timeout-ms",
        "2000",
    ];
    let mut silent = client(lab.client(), "redis", redis.addr(), &idle_args);
    let mut kept = client(
        lab.client(),
        "redis",
        redis.addr(),
        &[
            &idle_args[..],
            &[
                "--keepalive",
                "--keepidle",
                "1",
                "--keepintvl",
                "1",
                "--keepcnt",
                "3",
            ],
        ]
        .concat(),
    );
    let silent_port = silent.expect_port("connected");
    kept.expect_port("connected");
    assert_eq!(silent.expect_line("reply"), ["ok"]);
    assert_eq!(kept.expect_line("reply"), ["ok"]);
    // Conntrack in the router tracks both flows.
    let entries = lab.conntrack_entries();
    let mine: Vec<&String> = entries
        .iter()
        .filter(|e| e.contains("ESTABLISHED") && e.contains(&format!("sport={silent_port} ")))
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "conntrack entries in the router:\n{}",
        entries.join("\n")
    );
    assert_eq!(lab.invalid_packets(), 0);

    // Idle 4 s > 2 s: the silent flow is forgotten, its next request black-holed.
    let words = silent.expect_line("error");
    assert_eq!(
        words[0], "ETIMEDOUT",
        "silent client after the expiry: {words:?}"
    );
    let ms = ms_of(&words);
    let _ = writeln_stderr(&format!(
        "drop: ETIMEDOUT {ms} ms after the send (user timeout 2000 ms)"
    ));
    assert!((2000..=4000).contains(&ms), "ETIMEDOUT after {ms} ms");
    silent.expect_line("closed");
    silent.wait_success();
    // Keepalive every second kept its entry alive.
    assert_eq!(
        kept.expect_line("reply"),
        ["ok"],
        "keepalive client after the idle period"
    );
    kept.expect_line("closed");
    kept.wait_success();
    assert!(
        lab.invalid_packets() >= 1,
        "the router dropped no INVALID packet"
    );
    assert_eq!(redis.idle_closes(), 0);
}

#[test]
fn root_netlab_reject_resets_expired_flow() {
    if !require_root_or_skip("root_netlab_reject_resets_expired_flow") {
        return;
    }
    let lab = NetLab::new(InvalidAction::Reject, IDLE_SECS);
    let echo = EchoServer::start(lab.server(), SocketAddr::new(lab.server_ip(), 7));
    let mut silent = client(
        lab.client(),
        "raw",
        echo.addr(),
        &[
            "--idle-secs",
            "3",
            "--then",
            "send",
            "--user-timeout-ms",
            "2000",
        ],
    );
    silent.expect_port("connected");
    assert_eq!(silent.expect_line("reply"), ["ok"]);
    let words = silent.expect_line("error");
    assert_eq!(words[0], "ECONNRESET", "client after the expiry: {words:?}");
    assert!(ms_of(&words) < 1000, "RST after {} ms", ms_of(&words));
    silent.expect_line("closed");
    silent.wait_success();
    assert_eq!(lab.invalid_packets(), 1);

    // Switching to Drop keeps conntrack on: a new flow is tracked.
    lab.set_action(InvalidAction::Drop);
    let mut fresh = client(lab.client(), "raw", echo.addr(), &["--count", "2"]);
    let port = fresh.expect_port("connected");
    assert_eq!(fresh.expect_line("reply"), ["ok"]);
    assert_eq!(fresh.expect_line("reply"), ["ok"]);
    fresh.expect_line("closed");
    fresh.wait_success();
    let entries = lab.conntrack_entries();
    assert!(
        entries
            .iter()
            .any(|e| e.contains(&format!("sport={port} "))),
        "no conntrack entry for the new flow:\n{}",
        entries.join("\n")
    );
    // A socket made through `in_netns` is in the client namespace, and
    // routes across the router to the server.
    let reached = in_netns(lab.client(), || {
        std::net::TcpStream::connect_timeout(&echo.addr(), Duration::from_secs(2)).is_ok()
    });
    assert!(
        reached,
        "the echo server is not reachable from the client namespace"
    );
}
