use tracer_common::{Keepalive, OpenData, owner_flags};

use super::*;
use crate::cmd::selftest::collect::{find_close, find_open, ours};

fn ev(cookie: u64, sport: u16, dport: u16, data: EventData) -> ConnEvent {
    let mut info = EventInfo {
        cookie,
        ..EventInfo::default()
    };
    info.sock.sport = sport;
    info.sock.dport = dport;
    info.owner.flags = owner_flags::KNOWN;
    ConnEvent { info, data }
}

#[test]
fn equal_checks_compare_and_say_why_nothing_was_seen() {
    let ok = Check::equal("s", "closed_by", "peer", Ok("peer"));
    assert!(ok.ok);
    assert_eq!(
        (ok.expected.as_str(), ok.observed.as_str()),
        ("peer", "peer")
    );
    let wrong = Check::equal("s", "closed_by", "peer", Ok("local"));
    assert!(!wrong.ok);
    assert_eq!(wrong.observed, "local");
    let missing = Check::equal("s", "closed_by", "peer", Err("no close summary".into()));
    assert!(!missing.ok);
    assert_eq!(missing.observed, "no close summary");
}

#[test]
fn range_checks_include_both_ends() {
    let (lo, hi) = (Duration::from_secs(2), Duration::from_secs(3));
    for (d, ok) in [
        (2.0, true),
        (3.0, true),
        (2.5, true),
        (1.999, false),
        (3.001, false),
    ] {
        let c = Check::within("s", "idle", lo, hi, Ok(Duration::from_secs_f64(d)));
        assert_eq!(c.ok, ok, "{d}");
    }
    let c = Check::within("s", "idle", lo, hi, Err("no idle time".into()));
    assert!(!c.ok);
    assert_eq!(c.expected, "2.000s to 3.000s");
}

#[test]
fn lines_start_with_the_verdict_and_name_scenario_and_check() {
    let c = Check::equal("peer-reset", "close_kind", "rst", Ok("fin"));
    let line = c.line();
    assert!(line.starts_with("FAIL peer-reset "), "{line}");
    assert!(line.contains("close_kind"));
    assert!(line.ends_with("expected rst; observed fin"), "{line}");
    let c = Check::equal("peer-reset", "close_kind", "rst", Ok("rst"));
    assert!(c.line().starts_with("ok   peer-reset "), "{}", c.line());
}

#[test]
fn exit_codes_and_summary() {
    let ok = Check::equal("a", "x", 1, Ok(1));
    let bad = Check::equal("b", "y", 1, Ok(2));
    let r = Report::new(vec![ok.clone()], None, Duration::from_secs(4), 0);
    assert_eq!(r.exit_code(), 0);
    assert!(
        r.summary().contains("all 1 checks ok (1 scenarios"),
        "{}",
        r.summary()
    );
    let r = Report::new(vec![ok, bad], None, Duration::from_secs(4), 3);
    assert_eq!(r.exit_code(), 1);
    assert!(
        r.summary().contains("1 of 2 checks FAILED"),
        "{}",
        r.summary()
    );
    assert!(
        r.summary().contains("3 kernel events lost"),
        "{}",
        r.summary()
    );
    let r = Report::new(Vec::new(), Some("no BTF".into()), Duration::ZERO, 0);
    assert_eq!(r.exit_code(), 2);
    assert_eq!(r.summary(), "conn-tracer selftest: cannot run: no BTF");
    // Nothing checked is no pass.
    assert_eq!(
        Report::new(Vec::new(), None, Duration::ZERO, 0).exit_code(),
        1
    );
}

#[test]
fn json_report_has_every_check() {
    let r = Report::new(
        vec![Check::equal("a", "x", "on", Ok("on"))],
        None,
        Duration::from_millis(1234),
        0,
    );
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["elapsed_s"], 1.234);
    assert_eq!(v["checks"][0]["scenario"], "a");
    assert_eq!(v["checks"][0]["observed"], "on");
    assert!(v.get("error").is_none());
}

#[test]
fn idle_bounds_span_the_measured_windows_plus_two_ticks() {
    let s = 1_000_000_000u64;
    // Last payload between 10 s and 10.001 s, end between 13 s and 13.002 s.
    let (lo, hi) = idle_bounds(
        (10 * s, 10 * s + s / 1000),
        (13 * s, 13 * s + 2 * s / 1000),
        250,
    );
    assert_eq!(lo, Duration::from_nanos(3 * s - s / 1000 - 8_000_000));
    assert_eq!(hi, Duration::from_nanos(3 * s + 2 * s / 1000 + 8_000_000));
    // HZ 100: 10 ms ticks.
    let (lo, _) = idle_bounds((0, 0), (s, s), 100);
    assert_eq!(lo, Duration::from_millis(980));
}

#[test]
fn increments_name_the_series_that_moved() {
    let mut before = BTreeMap::new();
    before.insert("closed_by=peer".to_string(), 2);
    let mut after = before.clone();
    assert_eq!(increments(&before, &after), "+0");
    after.insert("closed_by=peer".to_string(), 3);
    after.insert("closed_by=local".to_string(), 1);
    assert_eq!(
        increments(&before, &after),
        "+1 closed_by=local, +1 closed_by=peer"
    );
}

#[test]
fn sockets_are_found_by_ports_and_cookie() {
    let open = EventData::Open(OpenData {
        ka: Keepalive::default(),
        jiffies: 0,
    });
    let evs = [
        ev(
            5,
            40000,
            8080,
            EventData::State {
                old: tcp_state::CLOSE,
                new: tcp_state::SYN_SENT,
            },
        ),
        ev(5, 40000, 8080, open),
        ev(6, 8080, 40000, open),
        ev(
            5,
            40000,
            8080,
            EventData::State {
                old: tcp_state::SYN_SENT,
                new: tcp_state::ESTABLISHED,
            },
        ),
        ev(5, 40000, 8080, EventData::Close(CloseData::default())),
    ];
    assert_eq!(find_open(&evs, 40000, 8080), Some(5));
    assert_eq!(find_open(&evs, 8080, 40000), Some(6));
    assert_eq!(find_open(&evs, 1, 2), None);
    assert!(find_close(&evs, 5).is_some());
    assert!(find_close(&evs, 6).is_none());
    let t = transitions(&evs, 5);
    assert_eq!(
        show_transitions(&t),
        "CLOSE -> SYN_SENT, SYN_SENT -> ESTABLISHED"
    );
    assert_eq!(show_transitions(&[]), "none");
}

#[test]
fn only_the_selftest_namespace_counts() {
    let mut e = ev(1, 1, 2, EventData::ResetReceived);
    e.info.netns = 7;
    assert!(ours(&e, 7));
    assert!(!ours(&e, 8));
    e.info.netns = 0;
    assert!(!ours(&e, 7), "only socket options may lack a namespace");
    e.data = EventData::Sockopt(tracer_common::SockoptData::default());
    assert!(ours(&e, 7));
}

#[test]
fn keepalive_is_printed_like_an_operator_reads_it() {
    assert_eq!(
        SOCKOPT_KA.view().to_string(),
        "on, idle 7s, interval 3s, 4 probes, user timeout 5000ms (the socket's own)"
    );
    let off = Ka(KeepaliveView::new(
        &Keepalive::default(),
        crate::event::jiffies::Hz(250),
    ));
    assert_eq!(off.to_string(), "off");
    assert_eq!(
        SOCKOPT_KA
            .options()
            .iter()
            .map(|&(l, n, _)| sockopt_name(l, n))
            .collect::<Vec<_>>(),
        [
            "SO_KEEPALIVE",
            "TCP_KEEPIDLE",
            "TCP_KEEPINTVL",
            "TCP_KEEPCNT",
            "TCP_USER_TIMEOUT"
        ]
    );
}

#[test]
fn the_daemon_state_uses_the_selftest_threshold_without_pods() {
    let cfg = daemon_config();
    assert_eq!(cfg.idle_threshold, THRESHOLD);
    assert!(cfg.no_kube);
    assert!(SILENCE > THRESHOLD);
    assert!(LAB_COMM.len() < tracer_common::COMM_LEN);
}
