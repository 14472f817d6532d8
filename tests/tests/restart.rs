//! Restarts: SIGTERM detaches every program and exits within 5 s; SIGKILL
//! leaves no program, link, map or pin behind (checked with bpftool); a
//! daemon started again carries on with the connections that were open.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use integration_tests::{
    NetNs,
    bpf::{Objects, PROGRAMS, pins},
    ct_client,
    daemon::{Daemon, assert_owned, serial},
    require_program_or_skip,
    scenario::args,
    servers::Redis,
    skip_unless_root,
};

/// What the kernel may take to free a program or map after its last
/// reference is gone (RCU grace periods, a work queue): generous.
const FREE_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's objects, asserting it loaded every program and links them.
fn loaded_by_daemon(before: &Objects) -> Objects {
    let mine = Objects::conn_tracer_since(before);
    let mut names: Vec<&str> = mine.progs.values().map(String::as_str).collect();
    names.sort_unstable();
    let mut want = PROGRAMS.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "programs the daemon loaded: {mine:?}");
    // One link per tracepoint and one for the cgroup program; the iterator
    // has a link only while a snapshot runs.
    assert_eq!(mine.links.len(), 6, "links: {mine:?}");
    for map in ["EVENTS", "LOST", "SOCKS"] {
        assert!(
            mine.maps.values().any(|m| m == map),
            "map {map} not among {mine:?}"
        );
    }
    mine
}

#[test]
fn root_sigterm_detaches_every_program_and_exits_within_5_s() {
    skip_unless_root!();
    if require_program_or_skip(
        "root_sigterm_detaches_every_program_and_exits_within_5_s",
        "bpftool",
        "Debian package bpftool",
    )
    .is_none()
    {
        return;
    }
    let _serial = serial();
    let pins_before = pins();
    let before = Objects::now();
    let daemon = Daemon::start("1s", &["--no-kube"]);
    let mine = loaded_by_daemon(&before);

    // A scraper's kept-alive HTTP connection and one that sent half a
    // request must not hold the shutdown up.
    let mut idle_http = TcpStream::connect(daemon.addr).expect("connect");
    idle_http
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut buf = [0u8; 512];
    let n = idle_http.read(&mut buf).expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let mut half = TcpStream::connect(daemon.addr).expect("connect");
    half.write_all(b"GET /metr").expect("half a request");

    let (status, took) = daemon
        .stop_timed(Duration::from_secs(5))
        .expect("conn-tracer did not exit within 5 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!("SIGTERM to exit: {took:?}");
    let left = mine.wait_gone(FREE_TIMEOUT);
    assert!(left.is_empty(), "still loaded after SIGTERM: {left:?}");
    assert_eq!(pins(), pins_before, "pins under /sys/fs/bpf changed");
}

#[test]
fn root_sigkill_leaves_nothing_behind_and_a_restarted_daemon_carries_on() {
    skip_unless_root!();
    if require_program_or_skip(
        "root_sigkill_leaves_nothing_behind_and_a_restarted_daemon_carries_on",
        "bpftool",
        "Debian package bpftool",
    )
    .is_none()
    {
        return;
    }
    let _serial = serial();
    let ns = NetNs::new();
    let server = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 16392);
    // Redis closes connections idle for 8 s: time for two daemon starts.
    let _redis = Redis::start(&ns, server, 8);
    let pins_before = pins();
    let before = Objects::now();
    let first = Daemon::start("1s", &["--no-kube"]);
    let mine = loaded_by_daemon(&before);

    // A client with keepalive connects while the first daemon runs.
    let mut client = ct_client!(
        &ns,
        "redis",
        server,
        &args("--keepalive --keepidle 60 --then wait-close --timeout-secs 30"),
    );
    let port = client.expect_connected_ok();
    let listed = first.connections();
    assert!(
        listed
            .as_array()
            .is_some_and(|l| l.iter().any(|c| c["local"] == format!("127.0.0.1:{port}"))),
        "first daemon does not list :{port}: {listed:#}"
    );

    first.kill_hard();
    let left = mine.wait_gone(FREE_TIMEOUT);
    assert!(left.is_empty(), "still loaded after SIGKILL: {left:?}");
    assert_eq!(pins(), pins_before, "pins under /sys/fs/bpf changed");

    // The second daemon finds the connection (its socket storage went with
    // the first daemon's map) and classifies Redis's idle kill of it.
    let second = Daemon::start("1s", &["--no-kube"]);
    let list = second.connections();
    let found = list
        .as_array()
        .and_then(|l| l.iter().find(|c| c["local"] == format!("127.0.0.1:{port}")))
        .unwrap_or_else(|| panic!("restarted daemon does not list :{port}: {list:#}"))
        .clone();
    assert_owned(&found, "proc", client.pid());
    assert_eq!(found["keepalive"]["enabled"], true, "{found}");
    let before_kill = second.scrape();
    client.expect_line("peer-closed");
    client.expect_line("closed");
    let labels = [
        ("peer", "127.0.0.1:16392"),
        ("closed_by", "peer"),
        ("keepalive", "on"),
        ("direction", "outbound"),
    ];
    let kills = |m: &integration_tests::daemon::Metrics| {
        m.sum("conntracer_idle_kills_total", &labels)
            - before_kill.sum("conntracer_idle_kills_total", &labels)
    };
    let m = second.wait_metrics(Duration::from_secs(10), |m| kills(m) >= 1.0);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(kills(&m), 1.0, "{}", m.dump("conntracer_idle_kills_total"));
    assert_eq!(
        m.sum("conntracer_events_lost_total", &[]),
        0.0,
        "events lost by the restarted daemon"
    );
    assert!(second.stop(), "second daemon did not exit 0");
}
