//! `conn-tracer trace --json` against real TCP connections between two
//! `ct-peer` processes, each test in its own network namespace with its own
//! tracer. The expected state sequences are what kernel 6.18 does over
//! loopback; the owner of every event must be the process that connected
//! (client socket) or listened (listener and accepted socket), including
//! the events that fire in softirq while another process is on the CPU.
//! A socket that reaches ESTABLISHED while traced gets an `open` event right
//! after that transition; one that was established gets one `close` summary
//! right after its transition into CLOSE.

use std::{
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use integration_tests::{
    Cgroup, ExpectedOwner, NetNs, Peer, STEP_TIMEOUT, Tracer, assert_owner, cgroup_inode_of,
    cookie, cookies, dump, find_cookie, has_closed, kind, pairs, parse_rfc3339_utc,
    skip_unless_root, socket_events, str_field, transitions, u64_field,
};
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_ct-peer");
const CLIENT_COMM: &str = "ct-client";
const SERVER_COMM: &str = "ct-server";
/// Bytes of the line the client writes (`ct-peer hello\n`).
const PAYLOAD_LEN: u64 = 14;
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

/// The server read the client's whole line, then its EOF, and exited.
fn expect_server_read_all(srv: &mut Peer, cport: u16) {
    assert_eq!(
        srv.expect_line("eof"),
        [cport.to_string(), PAYLOAD_LEN.to_string()]
    );
    srv.expect_line("done");
    srv.wait_success();
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

/// The options a `sockopt` event can name.
const KEEPALIVE_OPTIONS: &[&str] = &[
    "SO_KEEPALIVE",
    "TCP_KEEPIDLE",
    "TCP_KEEPINTVL",
    "TCP_KEEPCNT",
    "TCP_USER_TIMEOUT",
];

/// Checks of `time`, `ts_ns` and `family`, which every event must pass.
#[track_caller]
fn assert_time_and_family(ev: &Value, started: f64) {
    let time = str_field(ev, "time");
    let secs =
        parse_rfc3339_utc(time).unwrap_or_else(|| panic!("`time` is not RFC 3339 UTC: {ev}"));
    assert!(
        secs >= started - 2.0 && secs <= now_secs() + 2.0,
        "`time` {time} is outside the test's run: {ev}"
    );
    assert!(u64_field(ev, "ts_ns") > 0, "ts_ns is 0: {ev}");
    assert!(
        ["ipv4", "ipv6"].contains(&str_field(ev, "family")),
        "bad family: {ev}"
    );
}

/// The keys of `v`, an object.
#[track_caller]
fn keys(v: &Value, ev: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v} in {ev}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

#[track_caller]
fn assert_keepalive_shape(ev: &Value) {
    let ka = &ev["keepalive"];
    assert_eq!(
        keys(ka, ev),
        [
            "enabled",
            "idle_s",
            "interval_s",
            "own_idle",
            "own_interval",
            "own_probes",
            "probes",
            "user_timeout_ms"
        ],
        "keepalive of {ev}"
    );
    for flag in ["enabled", "own_idle", "own_interval", "own_probes"] {
        assert!(ka[flag].is_boolean(), "keepalive.{flag} of {ev}");
    }
    for secs in ["idle_s", "interval_s"] {
        assert!(ka[secs].is_f64(), "keepalive.{secs} of {ev}");
    }
    for count in ["probes", "user_timeout_ms"] {
        assert!(ka[count].is_u64(), "keepalive.{count} of {ev}");
    }
}

#[track_caller]
fn assert_end_shape(ev: &Value) {
    let end = &ev["end"];
    let mut want = vec![
        "bytes_acked",
        "bytes_received",
        "close_kind",
        "closed_by",
        "errno",
        "error",
        "first_close_state",
        "idle_s",
        "lifetime_s",
        "rst_received",
        "rst_sent",
    ];
    let close_kind = str_field(end, "close_kind");
    assert!(["fin", "rst", "timeout"].contains(&close_kind), "{ev}");
    if close_kind == "timeout" {
        want.push("timeout_cause");
        str_field(end, "timeout_cause");
    }
    if end.get("silence_before_failed_send_s").is_some() {
        want.push("silence_before_failed_send_s");
        assert!(end["silence_before_failed_send_s"].is_f64(), "{ev}");
    }
    want.sort_unstable();
    assert_eq!(keys(end, ev), want, "end of {ev}");
    assert!(
        ["local", "peer"].contains(&str_field(end, "closed_by")),
        "{ev}"
    );
    assert!(
        STATES.contains(&str_field(end, "first_close_state")),
        "{ev}"
    );
    for secs in ["idle_s", "lifetime_s"] {
        assert!(
            end[secs].is_null() || end[secs].is_f64(),
            "end.{secs} of {ev}"
        );
    }
    for flag in ["rst_received", "rst_sent"] {
        assert!(end[flag].is_boolean(), "end.{flag} of {ev}");
    }
    for count in ["errno", "bytes_received", "bytes_acked"] {
        assert!(end[count].is_u64(), "end.{count} of {ev}");
    }
    str_field(end, "error");
}

/// Field checks every event must pass, whatever its kind.
#[track_caller]
fn assert_well_formed(events: &[Value], netns: u64, started: f64) {
    for ev in events {
        assert_time_and_family(ev, started);
        assert_eq!(u64_field(ev, "netns"), netns, "{ev}");
        if kind(ev) != "sockopt" {
            assert!(STATES.contains(&str_field(ev, "state")), "bad state: {ev}");
        }
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
            "open" => {
                assert_keepalive_shape(ev);
                assert!(ev.get("end").is_none(), "{ev}");
            }
            "close" | "end" => {
                assert_keepalive_shape(ev);
                assert_end_shape(ev);
            }
            "connect_failed" => {
                assert_keepalive_shape(ev);
                assert!(ev.get("end").is_none(), "{ev}");
                assert!(
                    ["refused", "timeout", "unreachable", "given_up"]
                        .contains(&str_field(ev, "failure")),
                    "{ev}"
                );
            }
            "sockopt" => {
                assert!(KEEPALIVE_OPTIONS.contains(&str_field(ev, "option")), "{ev}");
                assert!(ev["value"].is_i64(), "{ev}");
            }
            other => panic!("unknown kind {other}: {ev}"),
        }
    }
}

/// What `keepalive` says of a socket that set no keepalive option: off,
/// with the values of the namespace's own sysctls (a new namespace starts
/// from the kernel's defaults, 7200/75/9, not from the host's values).
fn default_keepalive(ns: &NetNs) -> Value {
    let out = ns
        .command("cat")
        .args([
            "/proc/sys/net/ipv4/tcp_keepalive_time",
            "/proc/sys/net/ipv4/tcp_keepalive_intvl",
            "/proc/sys/net/ipv4/tcp_keepalive_probes",
        ])
        .output()
        .expect("run cat in the namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cat keepalive sysctls: {out:?}");
    let values: Vec<u32> = text
        .split_whitespace()
        .map(|v| v.parse().expect("a sysctl number"))
        .collect();
    let [time, intvl, probes] = values[..] else {
        panic!("three keepalive sysctls expected: {text:?}");
    };
    json!({
        "enabled": false,
        "idle_s": f64::from(time),
        "interval_s": f64::from(intvl),
        "probes": probes,
        "user_timeout_ms": 0,
        "own_idle": false,
        "own_interval": false,
        "own_probes": false,
    })
}

#[track_caller]
fn assert_keepalive(ev: &Value, want: &Value, label: &str) {
    assert_eq!(&ev["keepalive"], want, "{label}: keepalive of {ev}");
}

/// The socket's keepalive at its `open` (`at_open`) and at its `close`
/// (`at_close`), and its idle time at close within `idle`: its `close`.
#[track_caller]
fn assert_open_and_close<'a>(
    evs: &'a [Value],
    at_open: &Value,
    at_close: &Value,
    idle: std::ops::RangeInclusive<f64>,
    label: &str,
) -> &'a Value {
    assert_keepalive(sole(evs, "open", label), at_open, label);
    let close = sole(evs, "close", label);
    assert_keepalive(close, at_close, label);
    assert_idle(close, idle, label);
    close
}

/// Asserts the fields of `want` (a subset of `end`'s) in the `end` of `ev`.
#[track_caller]
fn assert_end(ev: &Value, want: &Value, label: &str) {
    let end = &ev["end"];
    for (key, value) in want.as_object().expect("an object") {
        assert_eq!(&end[key], value, "{label}: end.{key} of {ev}");
    }
}

/// `end.idle_s` of a close event, which must be a number within `range`.
#[track_caller]
fn assert_idle(ev: &Value, range: std::ops::RangeInclusive<f64>, label: &str) {
    let idle = ev["end"]["idle_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("{label}: end.idle_s is not a number: {ev}"));
    assert!(
        range.contains(&idle),
        "{label}: end.idle_s {idle} not in {range:?}: {ev}"
    );
}

/// `end.lifetime_s` of the close event of a socket traced from its start.
#[track_caller]
fn assert_short_lifetime(ev: &Value, label: &str) {
    let lifetime = ev["end"]["lifetime_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("{label}: end.lifetime_s is not a number: {ev}"));
    assert!(
        lifetime > 0.0 && lifetime < STEP_TIMEOUT.as_secs_f64(),
        "{label}: end.lifetime_s {lifetime}: {ev}"
    );
}

/// The one event of kind `k` among a socket's events.
#[track_caller]
fn sole<'a>(events: &'a [Value], k: &str, label: &str) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| kind(e) == k).collect();
    assert_eq!(
        found.len(),
        1,
        "{label}: one `{k}` event expected:\n{}",
        dump(events)
    );
    found[0]
}

/// `open` fires in the same tracepoint run as the transition into
/// ESTABLISHED, `close` in the one into CLOSE: before the kernel stores the
/// new state, so their `state` is the one the socket left.
#[track_caller]
fn assert_summaries_follow_their_transition(events: &[Value], label: &str) {
    for (i, ev) in events.iter().enumerate() {
        if kind(ev) == "state"
            && ev["old_state"] == "ESTABLISHED"
            && ev["new_state"] == "CLOSE_WAIT"
        {
            assert!(
                events.get(i + 1).is_some_and(|next| kind(next) == "end"),
                "{label}: the peer's FIN must be followed by `end`:\n{}",
                dump(events)
            );
        }
        let into = match kind(ev) {
            "open" => "ESTABLISHED",
            "close" => "CLOSE",
            "end" => "CLOSE_WAIT",
            _ => continue,
        };
        let Some(prev) = i.checked_sub(1).map(|p| &events[p]) else {
            panic!("{label}: {ev} is the socket's first event");
        };
        assert!(
            kind(prev) == "state" && prev["new_state"] == into,
            "{label}: `{}` must follow the transition into {into}:\n{}",
            kind(ev),
            dump(events)
        );
        assert_eq!(ev["state"], prev["state"], "{label}: {ev}");
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

/// The kinds of a socket's events, in `ts_ns` order. `end` (the peer's
/// FIN) is left out here: [`assert_summaries_follow_their_transition`]
/// checks that it comes exactly after each ESTABLISHED -> CLOSE_WAIT.
#[track_caller]
fn assert_kinds(events: &[Value], want: &[&str], label: &str) {
    let kinds: Vec<&str> = events.iter().map(kind).filter(|k| *k != "end").collect();
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

/// True when the socket has its `close` summary.
fn has_close_summary(events: &[Value], cookie_: u64) -> bool {
    events
        .iter()
        .any(|e| cookie(e) == cookie_ && kind(e) == "close")
}

/// Waits until the client, accepted and listening sockets all reached CLOSE,
/// the first two with their `close` summary, and `more` holds, then lets
/// late events arrive and returns all of them.
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
                    && has_close_summary(evs, s.client)
                    && has_close_summary(evs, s.accepted)
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

/// What most tests start from: the time, a namespace of their own, the
/// tracer running, and this process's cgroup (the owners' cgroup).
fn lab() -> (f64, NetNs, Tracer, u64) {
    let started = now_secs();
    let ns = NetNs::new();
    let tracer = Tracer::start();
    (started, ns, tracer, cgroup_inode_of(std::process::id()))
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
/// The kinds of the events of a socket that connects or is accepted, then
/// closes with FINs: `open` right after the transition into ESTABLISHED,
/// `close` right after the one into CLOSE.
const FIN_CLOSE_KINDS: &[&str] = &["state", "state", "open", "state", "state", "state", "close"];

/// The `end` of a connection closed with FINs. Byte counts are the
/// kernel's (`ss -i`): a SYN or a FIN is one byte.
struct FinEnd {
    /// This socket sent the first FIN.
    local: bool,
    /// Payload bytes the socket received.
    payload_received: u64,
    bytes_acked: u64,
}

/// bytes_acked of a client socket that sent the payload and a FIN.
const SYN_PAYLOAD_AND_FIN: u64 = PAYLOAD_LEN + 2;
/// bytes_acked of an accepted socket that sent no payload, only its FIN (its
/// SYN-ACK is acked before it exists).
const FIN_ONLY: u64 = 1;

/// The client wrote the payload and closed first; the server wrote nothing.
const CLIENT_CLOSED_FIRST: FinEnd = FinEnd {
    local: true,
    payload_received: 0,
    bytes_acked: SYN_PAYLOAD_AND_FIN,
};
const ACCEPTED_CLOSED_SECOND: FinEnd = FinEnd {
    local: false,
    payload_received: PAYLOAD_LEN,
    bytes_acked: FIN_ONLY,
};

#[track_caller]
fn assert_fin_end(close: &Value, want: &FinEnd, label: &str) {
    let (closed_by, first_close_state) = if want.local {
        ("local", "FIN_WAIT1")
    } else {
        ("peer", "CLOSE_WAIT")
    };
    assert_end(
        close,
        &json!({
            "closed_by": closed_by,
            "close_kind": "fin",
            "first_close_state": first_close_state,
            "rst_received": false,
            "rst_sent": false,
            "errno": 0,
            "error": "",
            "bytes_acked": want.bytes_acked,
        }),
        label,
    );
    let received = u64_field(&close["end"], "bytes_received");
    let with_fin = want.payload_received + 1;
    if want.local {
        // The first closer, orphaned by close(), leaves the full socket
        // (CLOSE) for a timewait one as soon as it is in FIN_WAIT2. If the
        // peer's ACK of our FIN came with the peer's FIN, that FIN is
        // counted first; if the ACK came alone (delayed-ACK timer, a slow
        // peer process), the FIN reaches only the timewait socket.
        assert!(
            received == want.payload_received || received == with_fin,
            "{label}: end.bytes_received must be {} or {with_fin}: {close}",
            want.payload_received
        );
    } else {
        // The second closer got the peer's FIN in ESTABLISHED.
        assert_eq!(received, with_fin, "{label}: end.bytes_received of {close}");
    }
}

/// Bound on `end.idle_s` of a connection that was never idle on purpose.
const BUSY_IDLE: std::ops::RangeInclusive<f64> = 0.0..=1.0;

fn lifecycle(sc: &Lifecycle) {
    let (started, ns, tracer, cgroup) = lab();

    let extra: &[&str] = if sc.dual_stack {
        &["--dual-stack"]
    } else {
        &[]
    };
    let (mut srv, port) = server(&ns, sc.server_addr, extra);
    let mut cli = client(&ns, sc.connect_addr, port, &[]);
    let cport = cli.expect_port("connected");
    cli.expect_closed_then_exit();
    assert_eq!(
        srv.expect_line("accepted"),
        [sc.addr.to_owned(), cport.to_string()]
    );
    expect_server_read_all(&mut srv, cport);

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |_, _| true);
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let keepalive = default_keepalive(&ns);

    let client_evs = socket_events(&events, s.client);
    let f = sc.family;
    // CLOSE->SYN_SENT fires before the kernel picks the source port.
    let want: Vec<_> = client_evs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sport = if i == 0 { 0 } else { cport };
            ep(kind(e), f, sc.addr, sport, sc.addr, port)
        })
        .collect();
    assert_endpoints(&client_evs, &want, "client socket");
    let client = FinSocket {
        transitions: CLIENT_CLOSES_FIRST,
        owner: ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup),
        end: CLIENT_CLOSED_FIRST,
    };
    client.check(&client_evs, &keepalive, "client socket");

    let accepted_evs = socket_events(&events, s.accepted);
    let want: Vec<_> = accepted_evs
        .iter()
        .map(|e| ep(kind(e), f, sc.addr, port, sc.addr, cport))
        .collect();
    assert_endpoints(&accepted_evs, &want, "accepted socket");
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    let accepted = FinSocket {
        transitions: ACCEPTED_CLOSES_SECOND,
        owner: server_owner.clone(),
        end: ACCEPTED_CLOSED_SECOND,
    };
    accepted.check(&accepted_evs, &keepalive, "accepted socket");

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
    skip_unless_root!();
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
    skip_unless_root!();
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
    skip_unless_root!();
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
    skip_unless_root!();
    let (started, ns, tracer, cgroup) = lab();

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
    cli.expect_closed_then_exit();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |_, _| true);
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_evs = socket_events(&events, s.client);
    let keepalive = default_keepalive(&ns);
    let client = FinSocket {
        transitions: &[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE_WAIT"),
            ("CLOSE_WAIT", "LAST_ACK"),
            ("LAST_ACK", "CLOSE"),
        ],
        owner: ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup),
        // The server sent no payload, only its FIN.
        end: FinEnd {
            local: false,
            payload_received: 0,
            bytes_acked: SYN_PAYLOAD_AND_FIN,
        },
    };
    client.check(&client_evs, &keepalive, "client socket");

    // The server process closed (and exited) before this socket's
    // FIN_WAIT2->CLOSE: the orphaned socket keeps its owner.
    let accepted_evs = socket_events(&events, s.accepted);
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    let accepted = FinSocket {
        transitions: &[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ],
        owner: server_owner.clone(),
        // The client's FIN, which moves FIN_WAIT2 to CLOSE, is counted first.
        end: FinEnd {
            local: true,
            payload_received: PAYLOAD_LEN,
            bytes_acked: FIN_ONLY,
        },
    };
    accepted.check(&accepted_evs, &keepalive, "accepted socket");

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
    skip_unless_root!();
    let (started, ns, tracer, cgroup) = lab();

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
    // Never established: no `open` or `close`, one `connect_failed`.
    assert_kinds(
        &evs,
        &[
            "state",
            "reset_received",
            "state",
            "connect_failed",
            "error",
        ],
        "client socket",
    );
    let reset = &evs[1];
    assert_eq!(
        reset["state"], "SYN_SENT",
        "the RST arrives in SYN_SENT: {reset}"
    );
    assert_eq!(evs[3]["failure"], "refused", "{}", evs[3]);
    let error = &evs[4];
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
fn assert_linger0_client(
    client_evs: &[Value],
    owner: &ExpectedOwner,
    keepalive: &Value,
    cport: u16,
    port: u16,
) {
    assert_transitions(
        client_evs,
        &[
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE"),
        ],
        "client socket",
    );
    // tcp_disconnect: CLOSE (and its summary), then the RST, then
    // ECONNRESET reported on the closing socket itself.
    assert_kinds(
        client_evs,
        &[
            "state",
            "state",
            "open",
            "state",
            "close",
            "reset_sent",
            "error",
        ],
        "client socket",
    );
    assert_summaries_follow_their_transition(client_evs, "client socket");
    let reset = &client_evs[5];
    assert_eq!(reset["reason"], "TCP_STATE", "{reset}");
    assert_eq!(reset["state"], "CLOSE", "{reset}");
    let error = &client_evs[6];
    assert_error(error, "ECONNRESET", libc::ECONNRESET);
    // The error comes after tcp_disconnect cleared the socket's addresses:
    // only the events before it must carry the connection's endpoints.
    let want: Vec<_> = client_evs[..6]
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sport = if i == 0 { 0 } else { cport };
            ep(kind(e), "ipv4", "127.0.0.1", sport, "127.0.0.1", port)
        })
        .collect();
    assert_endpoints(&client_evs[..6], &want, "client socket");
    assert_owner(client_evs, owner, "client socket");
    let close = assert_open_and_close(client_evs, keepalive, keepalive, BUSY_IDLE, "client socket");
    // The summary is taken at the transition into CLOSE, which
    // tcp_disconnect makes before it sends the RST and sets sk_err: its
    // rst_sent and errno cannot tell the RST (the events after it do).
    assert_end(
        close,
        &json!({
            "closed_by": "local",
            "close_kind": "rst",
            "first_close_state": "CLOSE",
            "rst_received": false,
            "bytes_received": 0,
            // The SYN and the payload.
            "bytes_acked": PAYLOAD_LEN + 1,
        }),
        "client socket",
    );
    assert_short_lifetime(close, "client socket");
}

/// The accepted socket when its peer closes with `SO_LINGER {on, 0}`.
#[track_caller]
fn assert_linger0_accepted(
    accepted_evs: &[Value],
    owner: &ExpectedOwner,
    keepalive: &Value,
    cport: u16,
    port: u16,
) {
    assert_transitions(
        accepted_evs,
        &[
            ("LISTEN", "SYN_RECV"),
            ("SYN_RECV", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE"),
        ],
        "accepted socket",
    );
    assert_kinds(
        accepted_evs,
        &[
            "state",
            "state",
            "open",
            "reset_received",
            "state",
            "close",
            "error",
        ],
        "accepted socket",
    );
    assert_summaries_follow_their_transition(accepted_evs, "accepted socket");
    assert_eq!(
        accepted_evs[3]["state"], "ESTABLISHED",
        "{}",
        accepted_evs[3]
    );
    let error = &accepted_evs[6];
    assert_error(error, "ECONNRESET", libc::ECONNRESET);
    let close = assert_open_and_close(
        accepted_evs,
        keepalive,
        keepalive,
        BUSY_IDLE,
        "accepted socket",
    );
    // tcp_reset sets sk_err before tcp_done: the summary has the errno.
    assert_end(
        close,
        &json!({
            "closed_by": "peer",
            "close_kind": "rst",
            "first_close_state": "CLOSE",
            "rst_received": true,
            "rst_sent": false,
            "errno": libc::ECONNRESET,
            "error": "ECONNRESET",
            // The payload only: a RST is no byte.
            "bytes_received": PAYLOAD_LEN,
            "bytes_acked": 0,
        }),
        "accepted socket",
    );
    assert_short_lifetime(close, "accepted socket");
    let want: Vec<_> = accepted_evs
        .iter()
        .map(|e| ep(kind(e), "ipv4", "127.0.0.1", port, "127.0.0.1", cport))
        .collect();
    assert_endpoints(accepted_evs, &want, "accepted socket");
    assert_owner(accepted_evs, owner, "accepted socket");
}

#[test]
fn root_linger0_close_sends_reset_and_peer_gets_econnreset() {
    skip_unless_root!();
    let (started, ns, tracer, cgroup) = lab();

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
    cli.expect_closed_then_exit();
    assert_eq!(
        srv.expect_line("read-error"),
        [
            cport.to_string(),
            "ECONNRESET".to_owned(),
            PAYLOAD_LEN.to_string()
        ]
    );
    srv.expect_line("done");
    srv.wait_success();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |evs, s| {
        evs.iter()
            .any(|e| cookie(e) == s.accepted && kind(e) == "error")
            && evs
                .iter()
                .any(|e| cookie(e) == s.client && kind(e) == "reset_sent")
    });
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_owner = ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cgroup);
    let keepalive = default_keepalive(&ns);
    assert_linger0_client(
        &socket_events(&events, s.client),
        &client_owner,
        &keepalive,
        cport,
        port,
    );

    // The RST reaches the accepted socket in softirq while the client runs.
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    assert_linger0_accepted(
        &socket_events(&events, s.accepted),
        &server_owner,
        &keepalive,
        cport,
        port,
    );

    let listener_evs = socket_events(&events, s.listener);
    assert_transitions(&listener_evs, LISTENER, "listening socket");

    stop_cleanly(tracer);
}

#[test]
fn root_cgroup_id_is_the_client_cgroup_inode() {
    skip_unless_root!();
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
    cli.expect_closed_then_exit();
    srv.expect_line("accepted");
    srv.expect_line("eof");
    srv.expect_line("done");
    srv.wait_success();

    let (events, s) = wait_closed(&tracer, &ns, port, cport, |_, _| true);
    assert_well_formed(&events, ns.inode(), started);
    assert_only_sockets(&events, &[s.client, s.accepted, s.listener]);

    let client_evs = socket_events(&events, s.client);
    assert_transitions(&client_evs, CLIENT_CLOSES_FIRST, "client socket");
    assert_kinds(&client_evs, FIN_CLOSE_KINDS, "client socket");
    // Including `open` and `close`.
    assert_owner(
        &client_evs,
        &ExpectedOwner::process("known", cli.pid(), CLIENT_COMM, cg.inode()),
        "client socket",
    );
    // The server stayed where the test runs; its sockets say so.
    let accepted_evs = socket_events(&events, s.accepted);
    assert_transitions(&accepted_evs, ACCEPTED_CLOSES_SECOND, "accepted socket");
    assert_kinds(&accepted_evs, FIN_CLOSE_KINDS, "accepted socket");
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, own_cgroup);
    assert_owner(&accepted_evs, &server_owner, "accepted socket");
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

/// A socket of a connection both sides ended with a FIN, and what the
/// trace must say of it.
struct FinSocket {
    transitions: &'static [(&'static str, &'static str)],
    owner: ExpectedOwner,
    end: FinEnd,
}

impl FinSocket {
    /// Its state transitions, event kinds, each summary after its
    /// transition; its owner on every event; its keepalive at open and at
    /// close; how it ended; a busy, short life.
    #[track_caller]
    fn check(&self, evs: &[Value], keepalive: &Value, label: &str) {
        assert_transitions(evs, self.transitions, label);
        assert_kinds(evs, FIN_CLOSE_KINDS, label);
        assert_summaries_follow_their_transition(evs, label);
        assert_owner(evs, &self.owner, label);
        let close = assert_open_and_close(evs, keepalive, keepalive, BUSY_IDLE, label);
        assert_fin_end(close, &self.end, label);
        assert_short_lifetime(close, label);
    }
}

/// The `close` of a connected socket older than the tracer.
#[track_caller]
fn assert_close_of_older_socket(
    evs: &[Value],
    end: &FinEnd,
    keepalive: &Value,
    max_idle: f64,
    label: &str,
) {
    assert_summaries_follow_their_transition(evs, label);
    let close = sole(evs, "close", label);
    assert_keepalive(close, keepalive, label);
    assert_fin_end(close, end, label);
    // The tracer never saw the connection start.
    assert!(close["end"]["lifetime_s"].is_null(), "{label}: {close}");
    assert_idle(close, 0.0..=max_idle, label);
}

#[test]
fn root_sockets_older_than_the_tracer_have_unknown_owner() {
    skip_unless_root!();
    let started = now_secs();
    let ns = NetNs::new();
    let (mut srv, port) = server(&ns, "127.0.0.1", &[]);
    let mut cli = client(&ns, "127.0.0.1", port, &["--pause-before-close"]);
    let cport = cli.expect_port("connected");
    srv.expect_line("accepted");

    // All three sockets exist (and the connection is up) before the tracer.
    let tracer = Tracer::start();
    cli.go();
    cli.expect_closed_then_exit();
    expect_server_read_all(&mut srv, cport);

    let is_client = |e: &Value| sport_dport(e) == (u64::from(cport), u64::from(port));
    let is_accepted = |e: &Value| sport_dport(e) == (u64::from(port), u64::from(cport));
    // The only listener here; its ports are checked below.
    let is_listener =
        |e: &Value| kind(e) == "state" && e["old_state"] == "LISTEN" && e["new_state"] == "CLOSE";
    tracer.wait_for_netns(
        ns.inode(),
        "CLOSE of the three sockets, summaries of the connected two",
        STEP_TIMEOUT,
        |evs| {
            let connected = [find_cookie(evs, is_client), find_cookie(evs, is_accepted)];
            connected
                .iter()
                .all(|c| c.is_some_and(|c| has_closed(evs, c) && has_close_summary(evs, c)))
                && find_cookie(evs, is_listener).is_some_and(|c| has_closed(evs, c))
        },
    );
    thread::sleep(SETTLE);
    let events = tracer.events_in_netns(ns.inode());
    assert_well_formed(&events, ns.inode(), started);
    let c = find_cookie(&events, is_client).expect("seen before");
    let a = find_cookie(&events, is_accepted).expect("seen before");
    let l = find_cookie(&events, is_listener).expect("seen before");
    assert_only_sockets(&events, &[c, a, l]);

    // No `open` (they were established before the tracer), but a `close`
    // for the two connected ones, with what the kernel still knows.
    let keepalive = default_keepalive(&ns);
    let cases: [(u64, Transitions, Option<FinEnd>, &str); 3] = [
        (
            c,
            &[
                ("ESTABLISHED", "FIN_WAIT1"),
                ("FIN_WAIT1", "FIN_WAIT2"),
                ("FIN_WAIT2", "CLOSE"),
            ],
            Some(CLIENT_CLOSED_FIRST),
            "client socket",
        ),
        (
            a,
            &[
                ("ESTABLISHED", "CLOSE_WAIT"),
                ("CLOSE_WAIT", "LAST_ACK"),
                ("LAST_ACK", "CLOSE"),
            ],
            Some(ACCEPTED_CLOSED_SECOND),
            "accepted socket",
        ),
        (l, &[("LISTEN", "CLOSE")], None, "listening socket"),
    ];
    let localhost = "127.0.0.1";
    for (cookie, want, end, label) in cases {
        let evs = socket_events(&events, cookie);
        assert_transitions(&evs, want, label);
        let mut kinds = vec!["state"; want.len()];
        if end.is_some() {
            kinds.push("close");
        }
        assert_kinds(&evs, &kinds, label);
        for ev in &evs {
            assert_eq!(ev["owner"], "unknown", "{label}: {ev}");
        }
        let (sport, daddr, dport) = match label {
            "client socket" => (cport, localhost, port),
            "accepted socket" => (port, localhost, cport),
            _ => (port, "0.0.0.0", 0),
        };
        let want: Vec<_> = evs
            .iter()
            .map(|e| ep(kind(e), "ipv4", localhost, sport, daddr, dport))
            .collect();
        assert_endpoints(&evs, &want, label);
        if let Some(end) = end {
            // The payload went before the tracer started: idle since then.
            let max_idle = now_secs() - started + 1.0;
            assert_close_of_older_socket(&evs, &end, &keepalive, max_idle, label);
        }
    }

    stop_cleanly(tracer);
}

/// Comm of the keepalive client.
const KA_COMM: &str = "ct-ka-client";
/// Its keepalive options, set before connecting, and TCP_USER_TIMEOUT, set
/// once connected.
const KA_IDLE: u32 = 30;
const KA_INTVL: u32 = 5;
const KA_CNT: u32 = 3;
const KA_USER_TIMEOUT_MS: u32 = 4000;
/// How long it stays idle between its payload and its close, in seconds.
const KA_PAUSE: &str = "1.5";
/// Where `end.idle_s` must fall for that pause.
const KA_PAUSE_IDLE: std::ops::RangeInclusive<f64> = 1.4..=2.5;

/// A client that sets keepalive options (`ct-peer` sets none): arguments
/// COMM PORT KEEPIDLE KEEPINTVL KEEPCNT USER_TIMEOUT_MS PAUSE_S. It renames
/// itself, sets SO_KEEPALIVE and the three keepalive values, connects to
/// 127.0.0.1:PORT, sets TCP_USER_TIMEOUT, writes `ct-peer hello\n`, prints
/// `connected LOCAL_PORT PID`, sleeps PAUSE_S, closes and prints `closed`.
/// Every blocking call is bounded.
const KA_CLIENT_PY: &str = r#"
import ctypes, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(15, sys.argv[1].encode(), 0, 0, 0) != 0:  # PR_SET_NAME
    sys.exit("prctl PR_SET_NAME: errno %d" % ctypes.get_errno())
port, idle, intvl, cnt, user_timeout = (int(a) for a in sys.argv[2:7])
pause = float(sys.argv[7])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
s.connect(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout)
s.sendall(b"ct-peer hello\n")
print("connected", s.getsockname()[1], os.getpid(), flush=True)
time.sleep(pause)
s.close()
print("closed", flush=True)
"#;

fn keepalive_client(ns: &NetNs, port: u16) -> Peer {
    let mut cmd = ns.command("python3");
    cmd.args(["-c", KA_CLIENT_PY, KA_COMM])
        .arg(port.to_string())
        .args(
            [KA_IDLE, KA_INTVL, KA_CNT, KA_USER_TIMEOUT_MS]
                .iter()
                .map(ToString::to_string),
        )
        .arg(KA_PAUSE);
    Peer::spawn("keepalive client", cmd)
}

/// The keepalive settings of the keepalive client's socket.
fn own_keepalive(user_timeout_ms: u32) -> Value {
    json!({
        "enabled": true,
        "idle_s": f64::from(KA_IDLE),
        "interval_s": f64::from(KA_INTVL),
        "probes": KA_CNT,
        "user_timeout_ms": user_timeout_ms,
        "own_idle": true,
        "own_interval": true,
        "own_probes": true,
    })
}

/// Waits for the keepalive client's 5 sockopt events and the CLOSE of the
/// three sockets, then lets late events arrive: returns the events of
/// namespace `inode` and the sockopt events of process `pid`.
fn keepalive_test_events(
    tracer: &Tracer,
    inode: u64,
    pid: u32,
    port: u16,
    cport: u16,
) -> (Vec<Value>, Sockets) {
    // Sockopt events are matched by their setter: the ones set before
    // connect have no socket to take a namespace from.
    let pid = u64::from(pid);
    let mine = |all: &[Value]| -> Vec<Value> {
        all.iter()
            .filter(|e| {
                e["netns"].as_u64() == Some(inode)
                    || (kind(e) == "sockopt" && e["pid"].as_u64() == Some(pid))
            })
            .cloned()
            .collect()
    };
    let done = |evs: &[Value]| {
        evs.iter().filter(|e| kind(e) == "sockopt").count() >= 5
            && identify(evs, port, cport).is_some_and(|s| {
                [s.client, s.accepted]
                    .iter()
                    .all(|&c| has_closed(evs, c) && has_close_summary(evs, c))
                    && has_closed(evs, s.listener)
            })
    };
    tracer.wait_for(
        "the client's 5 sockopt events and the CLOSE of the three sockets",
        STEP_TIMEOUT,
        |all| done(&mine(all)).then_some(()),
    );
    thread::sleep(SETTLE);
    let events = mine(&tracer.events());
    let s = identify(&events, port, cport).expect("sockets seen before");
    (events, s)
}

/// Checks the client's sockopt events, returns them in `ts_ns` order.
#[track_caller]
fn assert_client_sockopts(
    mut sockopts: Vec<Value>,
    client_owner: &ExpectedOwner,
    s: &Sockets,
    (cport, port): (u16, u16),
    inode: u64,
    started: f64,
) -> Vec<Value> {
    sockopts.sort_by_key(|e| u64_field(e, "ts_ns"));
    let got: Vec<(&str, i64, u64)> = sockopts
        .iter()
        .map(|e| {
            let value = e["value"]
                .as_i64()
                .unwrap_or_else(|| panic!("sockopt without an integer value: {e}"));
            (str_field(e, "option"), value, cookie(e))
        })
        .collect();
    // Only the last one is set on an established socket, which has a cookie.
    let want: Vec<(&str, i64, u64)> = vec![
        ("SO_KEEPALIVE", 1, 0),
        ("TCP_KEEPIDLE", KA_IDLE.into(), 0),
        ("TCP_KEEPINTVL", KA_INTVL.into(), 0),
        ("TCP_KEEPCNT", KA_CNT.into(), 0),
        ("TCP_USER_TIMEOUT", KA_USER_TIMEOUT_MS.into(), s.client),
    ];
    assert_eq!(
        got,
        want,
        "(option, value, cookie) of the client's sockopt events:\n{}",
        dump(&sockopts)
    );
    for ev in &sockopts {
        assert_time_and_family(ev, started);
        // The tracer does not (yet) read the namespace of the socket whose
        // option is set: accept 0 as well as the right one.
        let netns = u64_field(ev, "netns");
        assert!(netns == 0 || netns == inode, "netns of {ev}");
    }
    assert_owner(&sockopts, client_owner, "sockopt events");
    let mut want = vec![ep("sockopt", "ipv4", "0.0.0.0", 0, "0.0.0.0", 0); 4];
    want.push(ep("sockopt", "ipv4", "127.0.0.1", cport, "127.0.0.1", port));
    assert_endpoints(&sockopts, &want, "sockopt events");

    sockopts
}

#[test]
fn root_keepalive_sockopts_are_traced_with_their_setter() {
    skip_unless_root!();
    let (started, ns, tracer, cgroup) = lab();
    let inode = ns.inode();

    let (mut srv, port) = server(&ns, "127.0.0.1", &[]);
    let mut cli = keepalive_client(&ns, port);
    let words = cli.expect_line("connected");
    let [cport, pid] = &words[..] else {
        panic!("`connected PORT PID` expected, got {words:?}");
    };
    let cport: u16 = cport.parse().expect("a port");
    // `ip netns exec` execs python3 in place.
    assert_eq!(pid, &cli.pid().to_string());
    assert_eq!(
        srv.expect_line("accepted"),
        ["127.0.0.1".to_owned(), cport.to_string()]
    );
    cli.expect_closed_then_exit();
    expect_server_read_all(&mut srv, cport);

    let (events, s) = keepalive_test_events(&tracer, inode, cli.pid(), port, cport);
    let (sockopts, netns_events): (Vec<Value>, Vec<Value>) =
        events.iter().cloned().partition(|e| kind(e) == "sockopt");
    assert_well_formed(&netns_events, inode, started);
    assert_only_sockets(&netns_events, &[s.client, s.accepted, s.listener]);

    let client_owner = ExpectedOwner::process("known", cli.pid(), KA_COMM, cgroup);
    let sockopts =
        assert_client_sockopts(sockopts, &client_owner, &s, (cport, port), inode, started);
    let client_evs = socket_events(&events, s.client);
    assert_transitions(&client_evs, CLIENT_CLOSES_FIRST, "client socket");
    assert_kinds(
        &client_evs,
        &[
            "state", "state", "open", "sockopt", "state", "state", "state", "close",
        ],
        "client socket",
    );
    assert_summaries_follow_their_transition(&client_evs, "client socket");
    assert_owner(&client_evs, &client_owner, "client socket");
    let first = u64_field(&client_evs[0], "ts_ns");
    for ev in &sockopts[..4] {
        assert!(
            u64_field(ev, "ts_ns") < first,
            "set before connect, so before CLOSE->SYN_SENT ({first}): {ev}"
        );
    }
    let close = assert_open_and_close(
        &client_evs,
        &own_keepalive(0),
        &own_keepalive(KA_USER_TIMEOUT_MS),
        KA_PAUSE_IDLE,
        "client socket",
    );
    assert_fin_end(close, &CLIENT_CLOSED_FIRST, "client socket");
    assert_short_lifetime(close, "client socket");

    // The accepted socket keeps the namespace's defaults.
    let keepalive = default_keepalive(&ns);
    let accepted_evs = socket_events(&events, s.accepted);
    assert_transitions(&accepted_evs, ACCEPTED_CLOSES_SECOND, "accepted socket");
    assert_kinds(&accepted_evs, FIN_CLOSE_KINDS, "accepted socket");
    let server_owner = ExpectedOwner::process("inherited", srv.pid(), SERVER_COMM, cgroup);
    assert_owner(&accepted_evs, &server_owner, "accepted socket");
    let close = assert_open_and_close(
        &accepted_evs,
        &keepalive,
        &keepalive,
        KA_PAUSE_IDLE,
        "accepted socket",
    );
    assert_fin_end(close, &ACCEPTED_CLOSED_SECOND, "accepted socket");

    stop_cleanly(tracer);
}
