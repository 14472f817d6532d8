//! `conn-tracer trace --json` against real TCP connections between two
//! `ct-peer` processes, each test in its own network namespace with its own
//! tracer. The expected state sequences are what kernel 6.18 does over
//! loopback; the owner of every event must be the process that connected
//! (client socket) or listened (listener and accepted socket), including
//! the events that fire in softirq while another process is on the CPU.

use std::{
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use integration_tests::{
    Cgroup, ExpectedOwner, NetNs, Peer, STEP_TIMEOUT, Tracer, assert_owner, cgroup_inode_of,
    cookies, dump, find_cookie, has_closed, kind, pairs, parse_rfc3339_utc, require_root_or_skip,
    socket_events, str_field, transitions, u64_field,
};
use serde_json::Value;

const PEER: &str = env!("CARGO_BIN_EXE_ct-peer");
const CLIENT_COMM: &str = "ct-client";
const SERVER_COMM: &str = "ct-server";
/// Bytes of the line the client writes (`ct-peer hello\n`).
const PAYLOAD_LEN: &str = "14";
/// Time to let late events (there must be none) reach the tracer's stdout
/// after the last expected one, so that exact sequences mean exact.
const SETTLE: Duration = Duration::from_millis(300);

/// Nothing listens on it in a fresh namespace.
const CLOSED_PORT: u16 = 9;

const STATES: &[&str] = &[
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

fn server(ns: &NetNs, addr: &str, extra: &[&str]) -> (Peer, u16) {
    let mut cmd = ns.command(PEER);
    cmd.args(["--comm", SERVER_COMM, "server", "--addr", addr])
        .args(extra);
    let mut peer = Peer::spawn("server", cmd);
    let port = peer.expect_port("listening");
    (peer, port)
}

fn client(ns: &NetNs, addr: &str, port: u16, extra: &[&str]) -> Peer {
    let mut cmd = ns.command(PEER);
    cmd.args(["--comm", CLIENT_COMM, "client", "--addr", addr, "--port"])
        .arg(port.to_string())
        .args(extra);
    Peer::spawn("client", cmd)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Field checks every event must pass, whatever its kind.
#[track_caller]
fn assert_well_formed(events: &[Value], netns: u64, started: f64) {
    for ev in events {
        let time = str_field(ev, "time");
        let secs =
            parse_rfc3339_utc(time).unwrap_or_else(|| panic!("`time` is not RFC 3339 UTC: {ev}"));
        assert!(
            secs >= started - 2.0 && secs <= now_secs() + 2.0,
            "`time` {time} is outside the test's run: {ev}"
        );
        assert!(u64_field(ev, "ts_ns") > 0, "ts_ns is 0: {ev}");
        assert_eq!(u64_field(ev, "netns"), netns, "{ev}");
        assert!(
            ["ipv4", "ipv6"].contains(&str_field(ev, "family")),
            "bad family: {ev}"
        );
        assert!(STATES.contains(&str_field(ev, "state")), "bad state: {ev}");
        match kind(ev) {
            "state" => {
                assert!(STATES.contains(&str_field(ev, "old_state")), "{ev}");
                assert!(STATES.contains(&str_field(ev, "new_state")), "{ev}");
                // The socket's state when the transition fires is the old one.
                assert_eq!(ev["state"], ev["old_state"], "{ev}");
            }
            "reset_sent" | "reset_received" => {
                str_field(ev, "reason");
            }
            "error" => {
                u64_field(ev, "errno");
                str_field(ev, "error");
            }
            other => panic!("unknown kind {other}: {ev}"),
        }
    }
}

type Transitions = &'static [(&'static str, &'static str)];

/// (kind, family, saddr, sport, daddr, dport) of an event.
type Endpoints = (String, String, String, u64, String, u64);

fn endpoints(ev: &Value) -> Endpoints {
    (
        kind(ev).to_owned(),
        str_field(ev, "family").to_owned(),
        str_field(ev, "saddr").to_owned(),
        u64_field(ev, "sport"),
        str_field(ev, "daddr").to_owned(),
        u64_field(ev, "dport"),
    )
}

fn ep(kind: &str, family: &str, saddr: &str, sport: u16, daddr: &str, dport: u16) -> Endpoints {
    (
        kind.to_owned(),
        family.to_owned(),
        saddr.to_owned(),
        u64::from(sport),
        daddr.to_owned(),
        u64::from(dport),
    )
}

#[track_caller]
fn assert_endpoints(events: &[Value], want: &[Endpoints], label: &str) {
    let got: Vec<Endpoints> = events.iter().map(endpoints).collect();
    assert_eq!(
        got,
        want,
        "{label}: (kind, family, saddr, sport, daddr, dport) of each event:\n{}",
        dump(events)
    );
}

/// The kinds of a socket's events, in `ts_ns` order.
#[track_caller]
fn assert_kinds(events: &[Value], want: &[&str], label: &str) {
    let kinds: Vec<&str> = events.iter().map(kind).collect();
    assert_eq!(
        kinds,
        want,
        "{label}: event kinds; events of the socket:\n{}",
        dump(events)
    );
}

#[track_caller]
fn assert_error(ev: &Value, name: &str, errno: i32) {
    assert_eq!(ev["error"], name, "{ev}");
    assert_eq!(ev["errno"], errno, "{ev}");
}

#[track_caller]
fn assert_transitions(events: &[Value], want: &[(&str, &str)], label: &str) {
    assert_eq!(
        transitions(events),
        pairs(want),
        "{label}: state transitions; events of the socket:\n{}",
        dump(events)
    );
}

/// The three sockets of one client/server connection in a namespace.
struct Sockets {
    client: u64,
    accepted: u64,
    listener: u64,
}

fn sport_dport(ev: &Value) -> (u64, u64) {
    (u64_field(ev, "sport"), u64_field(ev, "dport"))
}

fn identify(events: &[Value], server_port: u16, client_port: u16) -> Option<Sockets> {
    let (s, c) = (u64::from(server_port), u64::from(client_port));
    Some(Sockets {
        client: find_cookie(events, |e| sport_dport(e) == (c, s))?,
        accepted: find_cookie(events, |e| sport_dport(e) == (s, c))?,
        listener: find_cookie(events, |e| {
            kind(e) == "state" && e["new_state"] == "LISTEN" && u64_field(e, "sport") == s
        })?,
    })
}

/// Waits until the client, accepted and listening sockets all reached CLOSE
/// and `more` holds, then lets late events arrive and returns all of them.
fn wait_closed(
    tracer: &Tracer,
    ns: &NetNs,
    server_port: u16,
    client_port: u16,
    more: impl Fn(&[Value], &Sockets) -> bool,
) -> (Vec<Value>, Sockets) {
    tracer.wait_for_netns(
        ns.inode(),
        "CLOSE of the client, accepted and listening sockets",
        STEP_TIMEOUT,
        |evs| {
            identify(evs, server_port, client_port).is_some_and(|s| {
                has_closed(evs, s.client)
                    && has_closed(evs, s.accepted)
                    && has_closed(evs, s.listener)
                    && more(evs, &s)
            })
        },
    );
    thread::sleep(SETTLE);
    let events = tracer.events_in_netns(ns.inode());
    let sockets = identify(&events, server_port, client_port).expect("sockets seen before");
    (events, sockets)
}

#[track_caller]
fn assert_only_sockets(events: &[Value], sockets: &[u64]) {
    let want: std::collections::BTreeSet<u64> = sockets.iter().copied().collect();
    assert_eq!(
        cookies(events),
        want,
        "the namespace must have exactly these sockets; its events:\n{}",
        dump(events)
    );
}

fn stop_cleanly(tracer: Tracer) {
    let unparsed = tracer.unparsed_lines();
    assert!(
        unparsed.is_empty(),
        "stdout lines that are not JSON objects: {unparsed:?}"
    );
    let status = tracer.stop();
    assert!(
        status.success(),
        "conn-tracer must exit 0 on SIGTERM, got {status}"
    );
}

/// One connection over loopback where the client closes first.
struct Lifecycle {
    /// What the server binds.
    server_addr: &'static str,
    dual_stack: bool,
    /// What the client connects to.
    connect_addr: &'static str,
    family: &'static str,
    /// Both ends' address as the tracer must print it.
    addr: &'static str,
    /// The listener's (saddr, daddr).
    listener_addrs: (&'static str, &'static str),
}

const CLIENT_CLOSES_FIRST: &[(&str, &str)] = &[
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
];
const ACCEPTED_CLOSES_SECOND: &[(&str, &str)] = &[
    ("LISTEN", "SYN_RECV"),
    ("SYN_RECV", "ESTABLISHED"),
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
];
const LISTENER: &[(&str, &str)] = &[("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")];

fn lifecycle(sc: &Lifecycle) {
    let started = now_secs();
    let ns = NetNs::new();
    let tracer = Tracer::start();
    let cgroup = cgroup_inode_of(std::process::id());

    let extra: &[&str] = if sc.dual_stack {
        &["--dual-stack"]
    } else {
        &[]
    };
    let (mut srv, port) = server(&ns, sc.server_addr, extra);
    let mut cli = client(&ns, sc.connect_addr, port, &[]);
    let cport = cli.expect_port("connected");
    cli.expect_line("closed");
    cli.wait_success();
    assert_eq!(
        srv.expect_line("accepted"),
        [sc.addr.to_owned(), cport.to_string()]
    );
    assert_eq!(
        srv.expect_line("eof"),
        [cport.to_string(), PAYLOAD_LEN.to_owned()]
    );
    srv.expect_line("done");
    srv.wait_success();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |_, _| true);
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_evs = socket_events(&events, s.client);
    assert_transitions(&client_evs, CLIENT_CLOSES_FIRST, "client socket");
    let f = sc.family;
    // CLOSE->SYN_SENT fires before the kernel picks the source port.
    let mut want = vec![ep("state", f, sc.addr, 0, sc.addr, port)];
    want.extend((1..client_evs.len()).map(|_| ep("state", f, sc.addr, cport, sc.addr, port)));
    assert_endpoints(&client_evs, &want, "client socket");
    let client_owner = ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup);
    assert_owner(&client_evs, &client_owner, "client socket");

    let accepted_evs = socket_events(&events, s.accepted);
    assert_transitions(&accepted_evs, ACCEPTED_CLOSES_SECOND, "accepted socket");
    let want: Vec<_> = (0..accepted_evs.len())
        .map(|_| ep("state", f, sc.addr, port, sc.addr, cport))
        .collect();
    assert_endpoints(&accepted_evs, &want, "accepted socket");
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    assert_owner(&accepted_evs, &server_owner, "accepted socket");

    let listener_evs = socket_events(&events, s.listener);
    assert_transitions(&listener_evs, LISTENER, "listening socket");
    let (ls, ld) = sc.listener_addrs;
    let want: Vec<_> = (0..listener_evs.len())
        .map(|_| ep("state", f, ls, port, ld, 0))
        .collect();
    assert_endpoints(&listener_evs, &want, "listening socket");
    let listener_owner = ExpectedOwner {
        owner: "known",
        ..server_owner
    };
    assert_owner(&listener_evs, &listener_owner, "listening socket");

    stop_cleanly(tracer);
}

#[test]
fn root_ipv4_lifecycle_states_and_owners() {
    if !require_root_or_skip("root_ipv4_lifecycle_states_and_owners") {
        return;
    }
    lifecycle(&Lifecycle {
        server_addr: "127.0.0.1",
        dual_stack: false,
        connect_addr: "127.0.0.1",
        family: "ipv4",
        addr: "127.0.0.1",
        listener_addrs: ("127.0.0.1", "0.0.0.0"),
    });
}

#[test]
fn root_ipv6_lifecycle_states_and_owners() {
    if !require_root_or_skip("root_ipv6_lifecycle_states_and_owners") {
        return;
    }
    lifecycle(&Lifecycle {
        server_addr: "::1",
        dual_stack: false,
        connect_addr: "::1",
        family: "ipv6",
        addr: "::1",
        listener_addrs: ("::1", "::"),
    });
}

#[test]
fn root_v4_mapped_ipv6_lifecycle_states_and_owners() {
    if !require_root_or_skip("root_v4_mapped_ipv6_lifecycle_states_and_owners") {
        return;
    }
    lifecycle(&Lifecycle {
        server_addr: "::",
        dual_stack: true,
        connect_addr: "::ffff:127.0.0.1",
        family: "ipv6",
        addr: "::ffff:127.0.0.1",
        listener_addrs: ("::", "::"),
    });
}

#[test]
fn root_ipv4_server_closes_first_states_and_owners() {
    if !require_root_or_skip("root_ipv4_server_closes_first_states_and_owners") {
        return;
    }
    let started = now_secs();
    let ns = NetNs::new();
    let tracer = Tracer::start();
    let cgroup = cgroup_inode_of(std::process::id());

    let (mut srv, port) = server(&ns, "127.0.0.1", &["--close-first"]);
    let mut cli = client(&ns, "127.0.0.1", port, &["--wait-eof"]);
    let cport = cli.expect_port("connected");
    assert_eq!(
        srv.expect_line("accepted"),
        ["127.0.0.1".to_owned(), cport.to_string()]
    );
    assert_eq!(srv.expect_line("closed"), [cport.to_string()]);
    srv.expect_line("done");
    srv.wait_success();
    assert_eq!(cli.expect_line("eof"), ["0"]);
    cli.expect_line("closed");
    cli.wait_success();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |_, _| true);
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_evs = socket_events(&events, s.client);
    assert_transitions(
        &client_evs,
        &[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE_WAIT"),
            ("CLOSE_WAIT", "LAST_ACK"),
            ("LAST_ACK", "CLOSE"),
        ],
        "client socket",
    );
    let client_owner = ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup);
    assert_owner(&client_evs, &client_owner, "client socket");

    // The server process closed (and exited) before this socket's
    // FIN_WAIT2->CLOSE: the orphaned socket keeps its owner.
    let accepted_evs = socket_events(&events, s.accepted);
    assert_transitions(
        &accepted_evs,
        &[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ],
        "accepted socket",
    );
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    assert_owner(&accepted_evs, &server_owner, "accepted socket");

    let listener_evs = socket_events(&events, s.listener);
    assert_transitions(&listener_evs, LISTENER, "listening socket");
    assert_owner(
        &listener_evs,
        &ExpectedOwner {
            owner: "known",
            ..server_owner
        },
        "listening socket",
    );

    stop_cleanly(tracer);
}

#[test]
fn root_connect_refused_reset_and_econnrefused() {
    if !require_root_or_skip("root_connect_refused_reset_and_econnrefused") {
        return;
    }
    let started = now_secs();
    let ns = NetNs::new();
    let tracer = Tracer::start();
    let cgroup = cgroup_inode_of(std::process::id());

    let mut cli = client(&ns, "127.0.0.1", CLOSED_PORT, &["--expect-refused"]);
    cli.expect_line("refused");
    cli.wait_success();

    let is_client = |e: &Value| u64_field(e, "dport") == u64::from(CLOSED_PORT);
    tracer.wait_for_netns(
        ns.inode(),
        "the refused client's events",
        STEP_TIMEOUT,
        |evs| {
            find_cookie(evs, is_client).is_some_and(|c| {
                let mine = socket_events(evs, c);
                has_closed(&mine, c)
                    && mine.iter().any(|e| kind(e) == "reset_received")
                    && mine.iter().any(|e| kind(e) == "error")
            })
        },
    );
    thread::sleep(SETTLE);
    let events = tracer.events_in_netns(ns.inode());
    assert_well_formed(&events, ns.inode(), started);
    let c = find_cookie(&events, is_client).expect("seen before");
    assert_only_sockets(&events, &[c]);

    let evs = socket_events(&events, c);
    assert_transitions(
        &evs,
        &[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")],
        "client socket",
    );
    assert_kinds(
        &evs,
        &["state", "reset_received", "state", "error"],
        "client socket",
    );
    let reset = &evs[1];
    assert_eq!(
        reset["state"], "SYN_SENT",
        "the RST arrives in SYN_SENT: {reset}"
    );
    let error = &evs[3];
    assert_error(error, "ECONNREFUSED", libc::ECONNREFUSED);
    assert_eq!(
        error["state"], "CLOSE",
        "the error is reported after tcp_done: {error}"
    );
    // The source port is picked after CLOSE->SYN_SENT fires; from then on
    // every event carries it (the kernel keeps inet_sport after CLOSE).
    let sport = u64_field(reset, "sport");
    assert_ne!(sport, 0, "{reset}");
    let want: Vec<_> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sport = if i == 0 { 0 } else { sport as u16 };
            ep(
                kind(e),
                "ipv4",
                "127.0.0.1",
                sport,
                "127.0.0.1",
                CLOSED_PORT,
            )
        })
        .collect();
    assert_endpoints(&evs, &want, "client socket");
    // The RST is processed in softirq; the owner is still the connecting process.
    assert_owner(
        &evs,
        &ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup),
        "client socket",
    );

    stop_cleanly(tracer);
}

/// The client's socket after a close with `SO_LINGER {on, 0}`.
#[track_caller]
fn assert_linger0_client(client_evs: &[Value], owner: &ExpectedOwner, cport: u16, port: u16) {
    assert_transitions(
        client_evs,
        &[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE"),
        ],
        "client socket",
    );
    // tcp_disconnect: CLOSE, then the RST, then ECONNRESET reported on the
    // closing socket itself.
    assert_kinds(
        client_evs,
        &["state", "state", "state", "reset_sent", "error"],
        "client socket",
    );
    let reset = &client_evs[3];
    assert_eq!(reset["reason"], "TCP_STATE", "{reset}");
    assert_eq!(reset["state"], "CLOSE", "{reset}");
    let error = &client_evs[4];
    assert_error(error, "ECONNRESET", libc::ECONNRESET);
    // The error comes after tcp_disconnect cleared the socket's addresses:
    // only the events before it must carry the connection's endpoints.
    let want: Vec<_> = client_evs[..4]
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sport = if i == 0 { 0 } else { cport };
            ep(kind(e), "ipv4", "127.0.0.1", sport, "127.0.0.1", port)
        })
        .collect();
    assert_endpoints(&client_evs[..4], &want, "client socket");
    assert_owner(client_evs, owner, "client socket");
}

#[test]
fn root_linger0_close_sends_reset_and_peer_gets_econnreset() {
    if !require_root_or_skip("root_linger0_close_sends_reset_and_peer_gets_econnreset") {
        return;
    }
    let started = now_secs();
    let ns = NetNs::new();
    let tracer = Tracer::start();
    let cgroup = cgroup_inode_of(std::process::id());

    let (mut srv, port) = server(&ns, "127.0.0.1", &[]);
    let mut cli = client(
        &ns,
        "127.0.0.1",
        port,
        &["--linger0", "--pause-before-close"],
    );
    let cport = cli.expect_port("connected");
    // Reset only once the server holds the accepted socket.
    assert_eq!(
        srv.expect_line("accepted"),
        ["127.0.0.1".to_owned(), cport.to_string()]
    );
    cli.go();
    cli.expect_line("closed");
    cli.wait_success();
    assert_eq!(
        srv.expect_line("read-error"),
        [
            cport.to_string(),
            "ECONNRESET".to_owned(),
            PAYLOAD_LEN.to_owned()
        ]
    );
    srv.expect_line("done");
    srv.wait_success();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |evs, s| {
        evs.iter()
            .any(|e| integration_tests::cookie(e) == s.accepted && kind(e) == "error")
            && evs
                .iter()
                .any(|e| integration_tests::cookie(e) == s.client && kind(e) == "reset_sent")
    });
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_owner = ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup);
    assert_linger0_client(
        &socket_events(&events, s.client),
        &client_owner,
        cport,
        port,
    );

    let accepted_evs = socket_events(&events, s.accepted);
    assert_transitions(
        &accepted_evs,
        &[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE"),
        ],
        "accepted socket",
    );
    assert_kinds(
        &accepted_evs,
        &["state", "state", "reset_received", "state", "error"],
        "accepted socket",
    );
    assert_eq!(
        accepted_evs[2]["state"], "ESTABLISHED",
        "{}",
        accepted_evs[2]
    );
    let error = &accepted_evs[4];
    assert_error(error, "ECONNRESET", libc::ECONNRESET);
    let want: Vec<_> = accepted_evs
        .iter()
        .map(|e| ep(kind(e), "ipv4", "127.0.0.1", port, "127.0.0.1", cport))
        .collect();
    assert_endpoints(&accepted_evs, &want, "accepted socket");
    // The RST reaches the accepted socket in softirq while the client runs.
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    assert_owner(&accepted_evs, &server_owner, "accepted socket");

    let listener_evs = socket_events(&events, s.listener);
    assert_transitions(&listener_evs, LISTENER, "listening socket");

    stop_cleanly(tracer);
}

#[test]
fn root_cgroup_id_is_the_client_cgroup_inode() {
    if !require_root_or_skip("root_cgroup_id_is_the_client_cgroup_inode") {
        return;
    }
    let started = now_secs();
    let ns = NetNs::new();
    let cg = Cgroup::new();
    let tracer = Tracer::start();
    let own_cgroup = cgroup_inode_of(std::process::id());
    assert_ne!(cg.inode(), own_cgroup);

    let (mut srv, port) = server(&ns, "127.0.0.1", &[]);
    let mut cli = client(&ns, "127.0.0.1", port, &["--pause-before-connect"]);
    cg.add_pid(cli.pid());
    assert_eq!(cg.pids(), [cli.pid()], "{}", cg.path().display());
    cli.go();
    let cport = cli.expect_port("connected");
    cli.expect_line("closed");
    cli.wait_success();
    srv.expect_line("accepted");
    srv.expect_line("eof");
    srv.expect_line("done");
    srv.wait_success();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |_, _| true);
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_evs = socket_events(&events, s.client);
    assert_transitions(&client_evs, CLIENT_CLOSES_FIRST, "client socket");
    assert_owner(
        &client_evs,
        &ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cg.inode()),
        "client socket",
    );
    // The server stayed where the test runs; its sockets say so.
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, own_cgroup);
    assert_owner(
        &socket_events(&events, s.accepted),
        &server_owner,
        "accepted socket",
    );
    assert_owner(
        &socket_events(&events, s.listener),
        &ExpectedOwner {
            owner: "known",
            ..server_owner
        },
        "listening socket",
    );

    stop_cleanly(tracer);
}

#[test]
fn root_sockets_older_than_the_tracer_have_unknown_owner() {
    if !require_root_or_skip("root_sockets_older_than_the_tracer_have_unknown_owner") {
        return;
    }
    let started = now_secs();
    let ns = NetNs::new();
    let (mut srv, port) = server(&ns, "127.0.0.1", &[]);
    let mut cli = client(&ns, "127.0.0.1", port, &["--pause-before-close"]);
    let cport = cli.expect_port("connected");
    srv.expect_line("accepted");

    // All three sockets exist (and the connection is up) before the tracer.
    let tracer = Tracer::start();
    cli.go();
    cli.expect_line("closed");
    cli.wait_success();
    assert_eq!(
        srv.expect_line("eof"),
        [cport.to_string(), PAYLOAD_LEN.to_owned()]
    );
    srv.expect_line("done");
    srv.wait_success();

    let is_client = |e: &Value| sport_dport(e) == (u64::from(cport), u64::from(port));
    let is_accepted = |e: &Value| sport_dport(e) == (u64::from(port), u64::from(cport));
    // The only listener here; its ports are checked below.
    let is_listener =
        |e: &Value| kind(e) == "state" && e["old_state"] == "LISTEN" && e["new_state"] == "CLOSE";
    tracer.wait_for_netns(
        ns.inode(),
        "CLOSE of the three sockets",
        STEP_TIMEOUT,
        |evs| {
            [
                find_cookie(evs, is_client),
                find_cookie(evs, is_accepted),
                find_cookie(evs, is_listener),
            ]
            .iter()
            .all(|c| c.is_some_and(|c| has_closed(evs, c)))
        },
    );
    thread::sleep(SETTLE);
    let events = tracer.events_in_netns(ns.inode());
    assert_well_formed(&events, ns.inode(), started);
    let c = find_cookie(&events, is_client).expect("seen before");
    let a = find_cookie(&events, is_accepted).expect("seen before");
    let l = find_cookie(&events, is_listener).expect("seen before");
    assert_only_sockets(&events, &[c, a, l]);

    let cases: [(u64, Transitions, &str); 3] = [
        (
            c,
            &[
                ("ESTABLISHED", "FIN_WAIT1"),
                ("FIN_WAIT1", "FIN_WAIT2"),
                ("FIN_WAIT2", "CLOSE"),
            ],
            "client socket",
        ),
        (
            a,
            &[
                ("ESTABLISHED", "CLOSE_WAIT"),
                ("CLOSE_WAIT", "LAST_ACK"),
                ("LAST_ACK", "CLOSE"),
            ],
            "accepted socket",
        ),
        (l, &[("LISTEN", "CLOSE")], "listening socket"),
    ];
    let localhost = "127.0.0.1";
    for (cookie, want, label) in cases {
        let evs = socket_events(&events, cookie);
        assert_transitions(&evs, want, label);
        for ev in &evs {
            assert_eq!(ev["owner"], "unknown", "{label}: {ev}");
        }
        let (sport, daddr, dport) = match label {
            "client socket" => (cport, localhost, port),
            "accepted socket" => (port, localhost, cport),
            _ => (port, "0.0.0.0", 0),
        };
        let want: Vec<_> = (0..evs.len())
            .map(|_| ep("state", "ipv4", localhost, sport, daddr, dport))
            .collect();
        assert_endpoints(&evs, &want, label);
    }

    stop_cleanly(tracer);
}
