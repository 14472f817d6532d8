//! The daemon against real servers with real idle timeouts, and against a
//! NAT/firewall path that expires idle flows: it must report each idle
//! kill (by whom, how, after how long, keepalive on or off) and each stale
//! reuse exactly once, matching the servers' own ground truth, and nothing
//! for a busy connection.
//!
//! Every test holds `serial()` (each daemon sees every namespace) and
//! compares metric deltas over label sets unique to its scenario.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use integration_tests::{
    NetNs, Peer,
    daemon::{Daemon, Metrics, serial},
    netlab::{InvalidAction, NetLab},
    require_root_or_skip,
    servers::{EchoServer, Envoy, EnvoyOptions, MariaDb, Memcached, Redis},
    wait_counter,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_ct-client");
/// Every server's idle timeout, and the path's conntrack expiry.
const IDLE_SECS: u32 = 2;
const KILLS: &str = "conntracer_idle_kills_total";
const STALE: &str = "conntracer_stale_reuse_total";
const IDLE_HIST: &str = "conntracer_idle_before_close_seconds";

fn local(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

fn client(ns: &NetNs, proto: &str, addr: SocketAddr, extra: &[&str]) -> Peer {
    let mut cmd = ns.command(CLIENT);
    cmd.args([proto, "--addr", &addr.ip().to_string(), "--port"])
        .arg(addr.port().to_string())
        .args(extra);
    Peer::spawn(&format!("ct-client {proto} {}", extra.join(" ")), cmd)
}

/// `after - before` of the sum of `name`'s samples matching `labels`.
fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

/// Scrapes until the delta of `name{labels}` reaches `want` (at most 10 s),
/// then a little longer to catch any extra count; returns the last scrape.
fn settle(
    daemon: &Daemon,
    before: &Metrics,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> Metrics {
    daemon.wait_metrics(Duration::from_secs(10), |m| {
        delta(before, m, name, labels) >= want
    });
    thread::sleep(Duration::from_millis(500));
    daemon.scrape()
}

#[test]
fn root_mariadb_wait_timeout_is_an_idle_kill_by_the_peer() {
    if !require_root_or_skip("root_mariadb_wait_timeout_is_an_idle_kill_by_the_peer") {
        return;
    }
    let _serial = serial();
    let ns = NetNs::new();
    let db = MariaDb::start(&ns, local(13306), IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let aborted = db.aborted_clients();
    let before = daemon.scrape();

    // The client turns keepalive on, with a long idle time: it never probes
    // before the server's 2 s wait_timeout.
    let mut idle = client(
        &ns,
        "mysql",
        db.addr(),
        &[
            "--keepalive",
            "--keepidle",
            "60",
            "--keepintvl",
            "10",
            "--keepcnt",
            "5",
            "--then",
            "wait-close",
        ],
    );
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("auth"), ["ok"]);
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    assert_eq!(
        idle.expect_line("error")[0],
        "ECONNRESET",
        "MariaDB resets timed-out sessions"
    );
    idle.expect_line("closed");
    idle.wait_success();

    let peer = [("peer", "127.0.0.1:13306"), ("direction", "outbound")];
    let m = settle(&daemon, &before, KILLS, &peer, 1.0);
    let kill = [
        ("peer", "127.0.0.1:13306"),
        ("direction", "outbound"),
        ("closed_by", "peer"),
        ("close_kind", "rst"),
        ("keepalive", "on"),
        ("role", "host"),
    ];
    assert_eq!(delta(&before, &m, KILLS, &kill), 1.0, "{}", m.dump(KILLS));
    assert_eq!(
        delta(&before, &m, KILLS, &peer),
        1.0,
        "exactly one kill: {}",
        m.dump(KILLS)
    );
    wait_counter(
        "Aborted_clients",
        aborted + 1,
        Duration::from_secs(5),
        || db.aborted_clients(),
    );
    // The server's own side of it was its decision: never a kill.
    assert_eq!(
        delta(
            &before,
            &m,
            KILLS,
            &[("direction", "inbound"), ("peer", "127.0.0.1")]
        ),
        0.0
    );
    // The keepalive options the client set.
    for (option, value) in [
        ("SO_KEEPALIVE", "1"),
        ("TCP_KEEPIDLE", "60"),
        ("TCP_KEEPINTVL", "10"),
        ("TCP_KEEPCNT", "5"),
    ] {
        assert!(
            delta(
                &before,
                &m,
                "conntracer_keepalive_sockopts_total",
                &[("option", option), ("value", value)]
            ) >= 1.0,
            "{option}={value}: {}",
            m.dump("conntracer_keepalive_sockopts_total")
        );
    }
    // How long it was idle: one outbound connection closed by its peer.
    let labels = [("direction", "outbound"), ("closed_by", "peer")];
    let count = delta(&before, &m, &format!("{IDLE_HIST}_count"), &labels);
    let sum = delta(&before, &m, &format!("{IDLE_HIST}_sum"), &labels);
    assert_eq!(count, 1.0, "{}", m.dump(IDLE_HIST));
    assert!(
        (1.95..2.6).contains(&sum),
        "idle before the kill {sum} s, wait_timeout {IDLE_SECS} s"
    );
    assert_eq!(m.sum("conntracer_events_lost_total", &[]), 0.0);
}

#[test]
fn root_redis_timeout_is_an_idle_kill_with_keepalive_off() {
    if !require_root_or_skip("root_redis_timeout_is_an_idle_kill_with_keepalive_off") {
        return;
    }
    let _serial = serial();
    let ns = NetNs::new();
    let redis = Redis::start(&ns, local(16379), IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let closes = redis.idle_closes();
    let before = daemon.scrape();
    let mut idle = client(&ns, "redis", redis.addr(), &["--then", "wait-close"]);
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    idle.expect_line("peer-closed");
    idle.expect_line("closed");
    idle.wait_success();

    let peer = [("peer", "127.0.0.1:16379")];
    let m = settle(&daemon, &before, KILLS, &peer, 1.0);
    let kill = [
        ("peer", "127.0.0.1:16379"),
        ("direction", "outbound"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "off"),
    ];
    assert_eq!(delta(&before, &m, KILLS, &kill), 1.0, "{}", m.dump(KILLS));
    assert_eq!(delta(&before, &m, KILLS, &peer), 1.0, "{}", m.dump(KILLS));
    wait_counter(
        "Redis idle closes",
        closes + 1,
        Duration::from_secs(5),
        || redis.idle_closes(),
    );
    assert_eq!(
        delta(&before, &m, STALE, &peer),
        0.0,
        "no send after the close"
    );
}

#[test]
fn root_memcached_idle_kicks_are_idle_kills() {
    if !require_root_or_skip("root_memcached_idle_kicks_are_idle_kills") {
        return;
    }
    let _serial = serial();
    let ns = NetNs::new();
    let mc = Memcached::start(&ns, local(11311), IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let kicks = mc.idle_kicks();
    let before = daemon.scrape();
    let mut idle = client(
        &ns,
        "memcached",
        mc.addr(),
        &["--then", "wait-close", "--timeout-secs", "15"],
    );
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    idle.expect_line("peer-closed");
    idle.expect_line("closed");
    idle.wait_success();

    let peer = [("peer", "127.0.0.1:11311")];
    let m = settle(&daemon, &before, KILLS, &peer, 1.0);
    wait_counter(
        "memcached idle_kicks",
        kicks + 1,
        Duration::from_secs(5),
        || mc.idle_kicks(),
    );
    let kill = [
        ("peer", "127.0.0.1:11311"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "off"),
    ];
    assert_eq!(delta(&before, &m, KILLS, &kill), 1.0, "{}", m.dump(KILLS));
    assert_eq!(
        delta(&before, &m, KILLS, &peer),
        f64::from(u32::try_from(mc.idle_kicks() - kicks).expect("few kicks")),
        "kills = idle_kicks"
    );
}

#[test]
fn root_envoy_idle_timeout_is_measured_to_the_tick() {
    if !require_root_or_skip("root_envoy_idle_timeout_is_measured_to_the_tick") {
        return;
    }
    let _serial = serial();
    let ns = NetNs::new();
    // Redis without a timeout of its own behind Envoy's tcp_proxy.
    let redis = Redis::start(&ns, local(16380), 0);
    let envoy = Envoy::start(
        &ns,
        EnvoyOptions::tcp_proxy(
            local(17000),
            redis.addr(),
            Duration::from_secs(IDLE_SECS.into()),
        ),
    );
    let daemon = Daemon::start("1s", &[]);
    let timeouts = envoy.idle_timeouts();
    let before = daemon.scrape();
    let mut idle = client(&ns, "redis", envoy.listen_addr(), &["--then", "wait-close"]);
    idle.expect_port("connected");
    assert_eq!(idle.expect_line("reply"), ["ok"]);
    idle.expect_line("peer-closed");
    idle.expect_line("closed");
    idle.wait_success();

    let app = [("peer", "127.0.0.1:17000"), ("direction", "outbound")];
    let m = settle(&daemon, &before, KILLS, &app, 1.0);
    wait_counter(
        "Envoy idle_timeout",
        timeouts + 1,
        Duration::from_secs(5),
        || envoy.idle_timeouts(),
    );
    let kill = [
        ("peer", "127.0.0.1:17000"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "off"),
    ];
    assert_eq!(delta(&before, &m, KILLS, &kill), 1.0, "{}", m.dump(KILLS));
    // Redis saw its (inbound) connection from Envoy killed by Envoy too;
    // Envoy's own upstream socket was closed by Envoy: not a kill.
    assert_eq!(
        delta(
            &before,
            &m,
            KILLS,
            &[("direction", "inbound"), ("closed_by", "peer")]
        ),
        1.0
    );
    assert_eq!(
        delta(&before, &m, KILLS, &[("peer", "127.0.0.1:16380")]),
        0.0
    );
    // The client's idle time matches Envoy's idle_timeout within 100 ms.
    let labels = [("direction", "outbound"), ("closed_by", "peer")];
    let count = delta(&before, &m, &format!("{IDLE_HIST}_count"), &labels);
    let idle_s = delta(&before, &m, &format!("{IDLE_HIST}_sum"), &labels);
    assert_eq!(count, 1.0, "{}", m.dump(IDLE_HIST));
    assert!(
        (idle_s - f64::from(IDLE_SECS)).abs() <= 0.1,
        "measured {idle_s} s, Envoy's idle_timeout {IDLE_SECS} s"
    );
}

#[test]
fn root_expired_path_drop_is_stale_reuse_by_timeout_and_keepalive_survives() {
    if !require_root_or_skip(
        "root_expired_path_drop_is_stale_reuse_by_timeout_and_keepalive_survives",
    ) {
        return;
    }
    let _serial = serial();
    let lab = NetLab::new(InvalidAction::Drop, IDLE_SECS);
    let redis = Redis::start(lab.server(), SocketAddr::new(lab.server_ip(), 6379), 0);
    let daemon = Daemon::start("1s", &[]);
    let before = daemon.scrape();
    let idle_args = [
        "--idle-secs",
        "4",
        "--then",
        "send",
        "--user-timeout-ms",
        "2000",
    ];
    let mut silent = client(lab.client(), "redis", redis.addr(), &idle_args);
    let keepalive = [
        "--keepalive",
        "--keepidle",
        "1",
        "--keepintvl",
        "1",
        "--keepcnt",
        "3",
    ];
    let mut kept = client(
        lab.client(),
        "redis",
        redis.addr(),
        &[&idle_args[..], &keepalive[..]].concat(),
    );
    silent.expect_port("connected");
    kept.expect_port("connected");
    assert_eq!(silent.expect_line("reply"), ["ok"]);
    assert_eq!(kept.expect_line("reply"), ["ok"]);
    assert_eq!(silent.expect_line("error")[0], "ETIMEDOUT");
    silent.expect_line("closed");
    silent.wait_success();
    assert_eq!(
        kept.expect_line("reply"),
        ["ok"],
        "keepalive kept the flow alive"
    );
    kept.expect_line("closed");
    kept.wait_success();
    assert!(
        lab.invalid_packets() >= 1,
        "the router dropped the expired flow's packets"
    );

    let peer = [("peer", "10.231.2.2:6379")];
    let m = settle(&daemon, &before, STALE, &peer, 1.0);
    let stale = [
        ("peer", "10.231.2.2:6379"),
        ("outcome", "timeout"),
        ("direction", "outbound"),
    ];
    assert_eq!(delta(&before, &m, STALE, &stale), 1.0, "{}", m.dump(STALE));
    assert_eq!(
        delta(&before, &m, STALE, &peer),
        1.0,
        "only the silent client: {}",
        m.dump(STALE)
    );
    let kill = [
        ("peer", "10.231.2.2:6379"),
        ("closed_by", "local"),
        ("close_kind", "timeout"),
        ("keepalive", "off"),
    ];
    assert_eq!(delta(&before, &m, KILLS, &kill), 1.0, "{}", m.dump(KILLS));
    assert_eq!(
        delta(
            &before,
            &m,
            KILLS,
            &[("peer", "10.231.2.2:6379"), ("keepalive", "on")]
        ),
        0.0,
        "{}",
        m.dump(KILLS)
    );
    assert_eq!(delta(&before, &m, KILLS, &peer), 1.0, "{}", m.dump(KILLS));
}

#[test]
fn root_expired_path_reject_is_stale_reuse_by_reset() {
    if !require_root_or_skip("root_expired_path_reject_is_stale_reuse_by_reset") {
        return;
    }
    let _serial = serial();
    let lab = NetLab::new(InvalidAction::Reject, IDLE_SECS);
    let echo = EchoServer::start(lab.server(), SocketAddr::new(lab.server_ip(), 7));
    let daemon = Daemon::start("1s", &[]);
    let before = daemon.scrape();
    let mut silent = client(
        lab.client(),
        "raw",
        echo.addr(),
        &["--idle-secs", "4", "--then", "send"],
    );
    silent.expect_port("connected");
    assert_eq!(silent.expect_line("reply"), ["ok"]);
    assert_eq!(silent.expect_line("error")[0], "ECONNRESET");
    silent.expect_line("closed");
    silent.wait_success();
    assert!(
        lab.invalid_packets() >= 1,
        "the router rejected the expired flow"
    );

    let peer = [("peer", "10.231.2.2:7")];
    let m = settle(&daemon, &before, STALE, &peer, 1.0);
    assert_eq!(
        delta(
            &before,
            &m,
            STALE,
            &[("peer", "10.231.2.2:7"), ("outcome", "rst")]
        ),
        1.0,
        "{}",
        m.dump(STALE)
    );
    let kill = [
        ("peer", "10.231.2.2:7"),
        ("closed_by", "peer"),
        ("close_kind", "rst"),
        ("keepalive", "off"),
    ];
    assert_eq!(delta(&before, &m, KILLS, &kill), 1.0, "{}", m.dump(KILLS));
    assert_eq!(delta(&before, &m, KILLS, &peer), 1.0, "{}", m.dump(KILLS));
    // The kill's idle time is the 4 s of silence before the send.
    let labels = [("direction", "outbound"), ("closed_by", "peer")];
    let count = delta(&before, &m, &format!("{IDLE_HIST}_count"), &labels);
    let idle_s = delta(&before, &m, &format!("{IDLE_HIST}_sum"), &labels);
    assert_eq!(count, 1.0, "{}", m.dump(IDLE_HIST));
    assert!(
        (3.9..4.5).contains(&idle_s),
        "silence before the send {idle_s} s"
    );
}

#[test]
fn root_busy_connection_closed_by_its_owner_is_never_a_kill() {
    if !require_root_or_skip("root_busy_connection_closed_by_its_owner_is_never_a_kill") {
        return;
    }
    let _serial = serial();
    // Across the lab's router, so that both sides have addresses no other
    // test uses (conntrack there remembers flows for far longer).
    let lab = NetLab::new(InvalidAction::Drop, 300);
    let echo = EchoServer::start(lab.server(), SocketAddr::new(lab.server_ip(), 7007));
    let daemon = Daemon::start("1s", &[]);
    let before = daemon.scrape();
    // A request every 200 ms for 10 s, then the client closes.
    let mut chatty = client(
        lab.client(),
        "raw",
        echo.addr(),
        &[
            "--count",
            "50",
            "--interval-ms",
            "200",
            "--then",
            "close",
            "--timeout-secs",
            "30",
        ],
    );
    chatty.expect_port("connected");
    for _ in 0..50 {
        assert_eq!(chatty.expect_line("reply"), ["ok"]);
    }
    chatty.expect_line("closed");
    chatty.wait_success();
    let outbound = [("direction", "outbound"), ("closed_by", "local")];
    let m = settle(
        &daemon,
        &before,
        &format!("{IDLE_HIST}_count"),
        &outbound,
        1.0,
    );
    for peer in ["10.231.2.2:7007", "10.231.1.2"] {
        assert_eq!(
            delta(&before, &m, KILLS, &[("peer", peer)]),
            0.0,
            "{}",
            m.dump(KILLS)
        );
        assert_eq!(
            delta(&before, &m, STALE, &[("peer", peer)]),
            0.0,
            "{}",
            m.dump(STALE)
        );
    }
    // The chatty connection (and this test's own scrapes, which close
    // first too) ended with well under a second of idle time.
    let count = delta(&before, &m, &format!("{IDLE_HIST}_count"), &outbound);
    let under_half_second = delta(
        &before,
        &m,
        &format!("{IDLE_HIST}_bucket"),
        &[
            ("direction", "outbound"),
            ("closed_by", "local"),
            ("le", "0.5"),
        ],
    );
    assert!(count >= 1.0, "{}", m.dump(IDLE_HIST));
    assert_eq!(under_half_second, count, "{}", m.dump(IDLE_HIST));
}
