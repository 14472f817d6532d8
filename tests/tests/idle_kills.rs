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

use std::{net::SocketAddr, time::Duration};

use integration_tests::{
    NetNs, Tracer, ct_client,
    daemon::{
        Daemon, Metrics, delta,
        names::{IDLE_HIST, KILLS, LOST, STALE},
    },
    netlab::{InvalidAction, NetLab},
    scenario::{IdleClients, WAIT_CLOSE_15S, local},
    serial_unless_skipped,
    servers::{EchoServer, MariaDb, Memcached, Redis, redis_behind_envoy},
    wait_counter,
};

/// Every server's idle timeout, and the path's conntrack expiry.
const IDLE_SECS: u32 = 2;

/// The scrape once `name{labels}` rose by `want` since `before`, half a
/// second later (any extra count shows).
fn settle(
    daemon: &Daemon,
    before: &Metrics,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> Metrics {
    daemon
        .settle(before, name, labels, want, Duration::from_millis(500))
        .1
}

#[test]
fn root_mariadb_wait_timeout_is_an_idle_kill_by_the_peer() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let db = MariaDb::start(&ns, local(13306), IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let aborted = db.aborted_clients();
    let before = daemon.scrape();

    // The client turns keepalive on, with a long idle time: it never probes
    // before the server's 2 s wait_timeout.
    let mut idle = ct_client!(
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
    idle.expect_closed_then_exit();

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
    m.assert_delta(&before, KILLS, &kill, 1.0);
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
    m.assert_delta(
        &before,
        KILLS,
        &[("direction", "inbound"), ("peer", "127.0.0.1")],
        0.0,
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
    let sum = m.sole_observation(&before, IDLE_HIST, &labels);
    assert!(
        (1.95..2.6).contains(&sum),
        "idle before the kill {sum} s, wait_timeout {IDLE_SECS} s"
    );
    assert_eq!(m.sum("conntracer_events_lost_total", &[]), 0.0);
}

#[test]
fn root_redis_timeout_is_an_idle_kill_with_keepalive_off() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let redis = Redis::start(&ns, local(16379), IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let closes = redis.idle_closes();
    let before = daemon.scrape();
    let mut idle = ct_client!(&ns, "redis", redis.addr(), &["--then", "wait-close"],);
    idle.expect_connected_ok();
    idle.expect_peer_close();

    let peer = [("peer", "127.0.0.1:16379")];
    let m = settle(&daemon, &before, KILLS, &peer, 1.0);
    let kill = [
        ("peer", "127.0.0.1:16379"),
        ("direction", "outbound"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
        ("keepalive", "off"),
    ];
    m.assert_delta(&before, KILLS, &kill, 1.0);
    m.assert_delta(&before, KILLS, &peer, 1.0);
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
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let mc = Memcached::start(&ns, local(11311), IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let kicks = mc.idle_kicks();
    let before = daemon.scrape();
    let mut idle = ct_client!(&ns, "memcached", mc.addr(), &WAIT_CLOSE_15S);
    idle.expect_connected_ok();
    idle.expect_peer_close();

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
    m.assert_delta(&before, KILLS, &kill, 1.0);
    assert_eq!(
        delta(&before, &m, KILLS, &peer),
        f64::from(u32::try_from(mc.idle_kicks() - kicks).expect("few kicks")),
        "kills = idle_kicks"
    );
}

#[test]
fn root_envoy_idle_timeout_is_measured_to_the_tick() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let (_redis, envoy) = redis_behind_envoy(&ns, 17000, 16380, IDLE_SECS);
    let daemon = Daemon::start("1s", &[]);
    let timeouts = envoy.idle_timeouts();
    let before = daemon.scrape();
    let mut idle = ct_client!(&ns, "redis", envoy.listen_addr(), &["--then", "wait-close"],);
    idle.expect_connected_ok();
    idle.expect_peer_close();

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
    m.assert_delta(&before, KILLS, &kill, 1.0);
    // Redis saw its (inbound) connection from Envoy killed by Envoy too;
    // Envoy's own upstream socket was closed by Envoy: not a kill.
    m.assert_delta(
        &before,
        KILLS,
        &[("direction", "inbound"), ("closed_by", "peer")],
        1.0,
    );
    m.assert_delta(&before, KILLS, &[("peer", "127.0.0.1:16380")], 0.0);
    // The client's idle time matches Envoy's idle_timeout within 100 ms.
    let labels = [("direction", "outbound"), ("closed_by", "peer")];
    let idle_s = m.sole_observation(&before, IDLE_HIST, &labels);
    assert!(
        (idle_s - f64::from(IDLE_SECS)).abs() <= 0.1,
        "measured {idle_s} s, Envoy's idle_timeout {IDLE_SECS} s"
    );
}

#[test]
fn root_expired_path_drop_is_stale_reuse_by_timeout_and_keepalive_survives() {
    let _serial = serial_unless_skipped!();
    let lab = NetLab::new(InvalidAction::Drop, IDLE_SECS);
    let redis = Redis::start(lab.server(), SocketAddr::new(lab.server_ip(), 6379), 0);
    let daemon = Daemon::start("1s", &[]);
    let tracer = Tracer::start();
    let before = daemon.scrape();
    let clients = IdleClients::start(env!("CARGO_BIN_EXE_ct-client"), &lab, redis.addr());
    let port = clients.silent_port;
    let words = clients.expect_drop_outcome(&lab);
    assert_eq!(words[0], "ETIMEDOUT");

    // The silent connection's own close record: its send after 4 s of
    // silence died unanswered (the user timeout).
    let close = |evs: &[serde_json::Value]| {
        evs.iter()
            .find(|e| e["kind"] == "close" && e["sport"] == port)
            .cloned()
    };
    let evs = tracer.wait_for_netns(
        lab.client().inode(),
        "the silent connection's close",
        Duration::from_secs(10),
        |evs| close(evs).is_some(),
    );
    let close = close(&evs).expect("close record");
    let end = &close["end"];
    assert_eq!(end["close_kind"], "timeout", "{close}");
    assert_eq!(end["failed_send_cause"], "silence", "{close}");
    let silence = end["silence_before_failed_send_s"].as_f64().unwrap_or(0.0);
    assert!((3.5..6.0).contains(&silence), "{close}");

    let peer = [("peer", "10.231.2.2:6379")];
    let m = settle(&daemon, &before, STALE, &peer, 1.0);
    let stale = [
        ("peer", "10.231.2.2:6379"),
        ("outcome", "timeout"),
        ("direction", "outbound"),
    ];
    assert_eq!(
        delta(&before, &m, STALE, &stale),
        1.0,
        "the daemon counts the close the trace shows ({close}); lost: {}; stale: {}",
        m.dump(LOST),
        m.dump(STALE)
    );
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
    m.assert_delta(&before, KILLS, &kill, 1.0);
    m.assert_delta(
        &before,
        KILLS,
        &[("peer", "10.231.2.2:6379"), ("keepalive", "on")],
        0.0,
    );
    m.assert_delta(&before, KILLS, &peer, 1.0);
}

#[test]
fn root_expired_path_reject_is_stale_reuse_by_reset() {
    let _serial = serial_unless_skipped!();
    let lab = NetLab::new(InvalidAction::Reject, IDLE_SECS);
    let echo = EchoServer::start(lab.server(), SocketAddr::new(lab.server_ip(), 7));
    let daemon = Daemon::start("1s", &[]);
    let before = daemon.scrape();
    let mut silent = ct_client!(
        lab.client(),
        "raw",
        echo.addr(),
        &["--idle-secs", "4", "--then", "send"],
    );
    silent.expect_connected_ok();
    assert_eq!(silent.expect_line("error")[0], "ECONNRESET");
    silent.expect_closed_then_exit();
    assert!(
        lab.invalid_packets() >= 1,
        "the router rejected the expired flow"
    );

    let peer = [("peer", "10.231.2.2:7")];
    let m = settle(&daemon, &before, STALE, &peer, 1.0);
    m.assert_delta(
        &before,
        STALE,
        &[("peer", "10.231.2.2:7"), ("outcome", "rst")],
        1.0,
    );
    let kill = [
        ("peer", "10.231.2.2:7"),
        ("closed_by", "peer"),
        ("close_kind", "rst"),
        ("keepalive", "off"),
    ];
    m.assert_delta(&before, KILLS, &kill, 1.0);
    m.assert_delta(&before, KILLS, &peer, 1.0);
    // The kill's idle time is the 4 s of silence before the send.
    let labels = [("direction", "outbound"), ("closed_by", "peer")];
    let idle_s = m.sole_observation(&before, IDLE_HIST, &labels);
    assert!(
        (3.9..4.5).contains(&idle_s),
        "silence before the send {idle_s} s"
    );
}

#[test]
fn root_busy_connection_closed_by_its_owner_is_never_a_kill() {
    let _serial = serial_unless_skipped!();
    // Across the lab's router, so that both sides have addresses no other
    // test uses (conntrack there remembers flows for far longer).
    let lab = NetLab::new(InvalidAction::Drop, 300);
    let echo = EchoServer::start(lab.server(), SocketAddr::new(lab.server_ip(), 7007));
    let daemon = Daemon::start("1s", &[]);
    let tracer = Tracer::start();
    let before = daemon.scrape();
    // A request every 200 ms for 10 s, then the client closes.
    let mut chatty = ct_client!(
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
    let port = chatty.expect_port("connected");
    for _ in 0..50 {
        assert_eq!(chatty.expect_line("reply"), ["ok"]);
    }
    chatty.expect_closed_then_exit();
    let outbound = [("direction", "outbound"), ("closed_by", "local")];
    let m = settle(
        &daemon,
        &before,
        &format!("{IDLE_HIST}_count"),
        &outbound,
        1.0,
    );
    for peer in ["10.231.2.2:7007", "10.231.1.2"] {
        m.assert_delta(&before, KILLS, &[("peer", peer)], 0.0);
        m.assert_delta(&before, STALE, &[("peer", peer)], 0.0);
    }
    // The chatty connection's own close: by its owner, well under a second
    // after its last exchange.
    let closes = tracer.wait_for_netns(
        lab.client().inode(),
        "the chatty connection's close",
        Duration::from_secs(5),
        |evs| {
            evs.iter()
                .any(|e| e["kind"] == "close" && e["sport"] == port)
        },
    );
    let close = closes
        .iter()
        .find(|e| e["kind"] == "close" && e["sport"] == port)
        .expect("close record");
    assert_eq!(close["end"]["closed_by"], "local", "{close}");
    let idle = close["end"]["idle_s"].as_f64().expect("idle_s");
    assert!(idle < 0.5, "idle {idle} s at the close: {close}");
}
