//! A daemon that starts (or restarts) after connections and listeners were
//! opened must find them, with their owners (from /proc) and their real
//! keepalive settings, and still classify their idle kills; connections a
//! listener older than the daemon accepts later get that listener's owner;
//! a full table is not churned by resyncs re-adding what it evicted.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{thread, time::Duration};

use integration_tests::{
    NetNs, ct_client,
    daemon::{Daemon, Metrics, assert_owned, conns_at, find_conn, find_local},
    scenario::{args, local},
    serial_unless_skipped,
    servers::Redis,
};

#[test]
fn root_connections_older_than_the_daemon_get_owners_and_their_kill_is_classified() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    // Server and client both before the daemon, as after a daemon restart.
    let redis = Redis::start(&ns, local(16390), 3);
    let mut client = ct_client!(
        &ns,
        "redis",
        redis.addr(),
        &args("--keepalive --keepidle 60 --then wait-close --timeout-secs 15"),
    );
    let port = client.expect_connected_ok();

    let daemon = Daemon::start("1s", &["--no-kube"]);
    let before = daemon.scrape();
    let list = daemon.connections();
    let mine = find_local(&list, &format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("client :{port} not in {list:#}"));
    assert_owned(mine, "proc", client.pid());
    assert_eq!(mine["comm"], "ct-client", "{mine}");
    assert_eq!(mine["direction"], "outbound", "{mine}");
    assert_eq!(mine["keepalive"]["enabled"], true, "{mine}");
    assert_eq!(mine["keepalive"]["idle_s"].as_f64(), Some(60.0), "{mine}");
    let server_side = find_conn(&list, "127.0.0.1:16390", &format!("127.0.0.1:{port}"));
    assert_eq!(
        server_side["pid"].as_u64(),
        Some(u64::from(redis.pid())),
        "{server_side}"
    );
    assert_eq!(server_side["direction"], "inbound", "{server_side}");

    // Redis kills it idle: classified like any other connection.
    client.expect_line("peer-closed");
    client.expect_line("closed");
    let peer = [
        ("peer", "127.0.0.1:16390"),
        ("closed_by", "peer"),
        ("keepalive", "on"),
        ("direction", "outbound"),
    ];
    let m = daemon.wait_metrics(Duration::from_secs(10), |m| {
        m.sum("conntracer_idle_kills_total", &peer)
            - before.sum("conntracer_idle_kills_total", &peer)
            >= 1.0
    });
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        m.sum("conntracer_idle_kills_total", &peer)
            - before.sum("conntracer_idle_kills_total", &peer),
        1.0,
        "{}",
        m.dump("conntracer_idle_kills_total")
    );
}

#[test]
fn root_accepts_of_a_listener_older_than_the_daemon_get_its_owner() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let redis = Redis::start(&ns, local(16391), 0);
    let daemon = Daemon::start("1s", &["--no-kube"]);
    let mut client = ct_client!(
        &ns,
        "redis",
        redis.addr(),
        &["--pause-before-then", "--then", "close"],
    );
    let port = client.expect_connected_ok();
    let list = daemon.connections();
    let accepted = find_conn(&list, "127.0.0.1:16391", &format!("127.0.0.1:{port}"));
    assert_owned(accepted, "inherited", redis.pid());
    assert_eq!(accepted["comm"], "redis-server", "{accepted}");
    let mine = find_local(&list, &format!("127.0.0.1:{port}")).expect("client listed");
    assert_eq!(mine["owner"], "known", "opened after the daemon: {mine}");
    client.go();
    client.expect_closed_then_exit();
}

#[test]
fn root_a_full_table_does_not_evict_to_re_add_at_every_resync() {
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

    /// Loopback connections held open (two sockets each), and the table's cap.
    const HELD: u32 = 40;
    const CAP: u32 = 30;
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let cap = CAP.to_string();
    let args = [
        "--no-kube",
        "--max-connections",
        &cap,
        "--resync-interval",
        "1s",
    ];
    let daemon = Daemon::start("1s", &args);
    let server = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 16392);
    let held = ns
        .spawn_in(move || {
            let l = TcpListener::bind(server).expect("bind");
            let clients: Vec<TcpStream> = (0..HELD)
                .map(|_| TcpStream::connect(server).expect("connect"))
                .collect();
            let accepted: Vec<TcpStream> =
                (0..HELD).map(|_| l.accept().expect("accept").0).collect();
            (l, clients, accepted)
        })
        .join()
        .expect("held thread");
    let evictions = |m: &Metrics| m.sum("conntracer_table_evictions_total", &[]);
    // What can evict: a new connection's open, or the peer's FIN of one the
    // table did not have. A resync must not.
    let inserts = |m: &Metrics| {
        m.sum("conntracer_events_total", &[("kind", "open")])
            + m.sum("conntracer_events_total", &[("kind", "end")])
    };
    let not_added = |m: &Metrics| m.sum("conntracer_resync_not_added_total", &[]);
    // Our sockets alone are 2 * HELD - CAP more than the table holds: each
    // resync leaves at least that many out.
    let per_resync = f64::from(2 * HELD - CAP);
    let before = daemon.wait_metrics(Duration::from_secs(10), |m| not_added(m) >= per_resync);
    let after = daemon.wait_metrics(Duration::from_secs(15), |m| {
        not_added(m) - not_added(&before) >= 3.0 * per_resync
    });
    let (evicted, inserted, left_out) = (
        evictions(&after) - evictions(&before),
        inserts(&after) - inserts(&before),
        not_added(&after) - not_added(&before),
    );
    eprintln!(
        "over >= 3 resyncs: {left_out} sockets left out, {evicted} evictions, {inserted} opens/ends"
    );
    assert!(
        left_out >= 3.0 * per_resync,
        "resyncs left out {left_out} sockets (want >= {})",
        3.0 * per_resync
    );
    assert!(
        evicted <= inserted,
        "{evicted} evictions but only {inserted} opens/ends: resyncs evicted to re-add"
    );
    assert!(
        daemon.scrape().sum("conntracer_tracked_connections", &[]) <= f64::from(CAP),
        "the table holds at most its cap"
    );
    // Every one of our sockets is still listed (from the kernel), tracked or not.
    let list = daemon.connections();
    let ours = conns_at(&list, ns.inode(), &server.to_string()).len();
    assert_eq!(ours, 2 * HELD as usize, "held sockets listed");
    drop(held);
}
