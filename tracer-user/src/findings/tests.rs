use std::time::{Duration, SystemTime};

use super::*;

fn at(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
}

const TICK: Duration = Duration::from_millis(4);

fn kill(pattern: Pattern, idle_s: f64) -> Fact {
    let mut f = Fact::new(pattern, "shop", "cart-1", "db/mysql-0");
    f.subject.role = "app".into();
    f.subject.direction = "outbound".into();
    f.idle = Some(Duration::from_secs_f64(idle_s));
    f
}

#[test]
fn three_kills_that_agree_give_the_timeout_and_a_known_default_names_the_killer() {
    let mut f = Findings::new(Duration::from_hours(1), 100);
    for (i, idle) in [6.01, 6.02, 6.0].into_iter().enumerate() {
        f.observe(kill(Pattern::KeepaliveRace, idle), at(i as u64));
    }
    let list = f.list(at(10), TICK);
    assert_eq!(list.len(), 1);
    let one = &list[0];
    assert_eq!(one.pattern, Pattern::KeepaliveRace);
    assert_eq!(one.count, 3);
    assert!((one.inferred_timeout_s.unwrap() - 6.01).abs() < 1e-9);
    assert!(one.likely_killer.as_deref().unwrap().contains("Node.js"));
    assert!(one.fix.contains("~6.0 s"), "{}", one.fix);
    assert_eq!(one.first_seen, "2027-01-15T08:00:00Z");
    assert_eq!(one.evidence["idle_s"].as_array().unwrap().len(), 3);
}

#[test]
fn kills_that_disagree_infer_nothing_and_an_unknown_timeout_names_no_killer() {
    let mut f = Findings::new(Duration::from_hours(1), 100);
    for idle in [2.0, 7.0, 30.0] {
        f.observe(kill(Pattern::ServerIdleTimeout, idle), at(0));
    }
    let one = &f.list(at(1), TICK)[0];
    assert_eq!(
        (one.inferred_timeout_s, one.likely_killer.clone()),
        (None, None)
    );
    // Two kills only: not enough, however well they agree.
    let mut f = Findings::new(Duration::from_hours(1), 100);
    for idle in [3.0, 3.0] {
        f.observe(kill(Pattern::ServerIdleTimeout, idle), at(0));
    }
    assert_eq!(f.list(at(1), TICK)[0].inferred_timeout_s, None);
    // 4 agree, one outlier: T from the agreeing ones; 123 s is nobody's default.
    let mut f = Findings::new(Duration::from_hours(1), 100);
    for idle in [123.0, 122.5, 123.4, 500.0, 123.1] {
        f.observe(kill(Pattern::ServerIdleTimeout, idle), at(0));
    }
    let one = &f.list(at(1), TICK)[0];
    assert!((one.inferred_timeout_s.unwrap() - 123.05).abs() < 1e-9);
    assert_eq!(one.likely_killer.as_deref(), Some("unknown"));
}

#[test]
fn one_tick_of_agreement_for_short_timeouts() {
    // 2 s with 4 ms ticks: 5 % is 100 ms anyway; at 50 ms timeouts the
    // tick (4 ms) is wider than 5 % (2.5 ms).
    assert_eq!(inferred_timeout(&[0.050, 0.054, 0.047], 0.004), Some(0.050));
    assert_eq!(inferred_timeout(&[0.050, 0.060, 0.040], 0.004), None);
}

#[test]
fn a_killer_is_named_only_for_the_patterns_it_explains() {
    assert_eq!(
        likely_killer(Pattern::PathExpiry, 350.0).map(|k| k.contains("AWS Network")),
        Some(true)
    );
    assert_eq!(likely_killer(Pattern::ServerIdleTimeout, 350.0), None);
    assert!(
        likely_killer(Pattern::SidecarIdleTimeout, 3590.0)
            .unwrap()
            .contains("Envoy")
    );
    // Beyond 2 %: no name.
    assert_eq!(likely_killer(Pattern::ServerIdleTimeout, 73.0), None);
}

#[test]
fn findings_expire_when_their_evidence_stops_and_are_bounded() {
    let mut f = Findings::new(Duration::from_mins(1), 2);
    f.observe(kill(Pattern::ServerIdleTimeout, 2.0), at(0));
    assert_eq!(f.list(at(59), TICK).len(), 1);
    assert_eq!(f.list(at(61), TICK).len(), 0, "expired");
    // The bound: a third finding replaces the least recently seen one.
    let other = |pod: &str| Fact::new(Pattern::CloseWaitLeak, "shop", pod, "db/x");
    f.observe_state(other("a"), 1, at(100));
    f.observe_state(other("b"), 4, at(101));
    f.observe_state(other("c"), 2, at(102));
    let pods: Vec<String> = f
        .list(at(103), TICK)
        .into_iter()
        .map(|x| x.subject.pod)
        .collect();
    assert_eq!(pods, ["b", "c"]);
    assert_eq!(f.dropped, 1);
    // A state's count is the current number, not a sum.
    f.observe_state(other("b"), 3, at(104));
    let b = f
        .list(at(105), TICK)
        .into_iter()
        .find(|x| x.subject.pod == "b")
        .unwrap();
    assert_eq!(b.count, 3);
    assert_eq!(b.inferred_timeout_s, None);
    assert!(b.evidence.get("idle_s").is_none());
}

#[test]
fn every_pattern_has_a_name_and_a_fix() {
    let mut names = std::collections::BTreeSet::new();
    for p in Pattern::ALL {
        assert!(names.insert(p.as_str()));
        assert!(p.fix(Some(5.0)).len() > 40, "{p:?}");
        let json = serde_json::to_value(p).unwrap();
        assert_eq!(json, p.as_str());
    }
    assert_eq!(secs(3600.0), "1 h");
    assert_eq!(secs(75.0), "75 s");
}

#[test]
fn a_path_expiry_is_bounded_by_the_shortest_silence_never_inferred_from_the_silences() {
    // Three reuses after 350 s of silence agree, but the path dropped the
    // flows at some time before: no timeout, no killer, a bound.
    let one = listed(Pattern::PathExpiry, &[350.2, 350.0, 350.1]);
    assert!(one.inferred_timeout_s.is_none() && one.likely_killer.is_none());
    assert_eq!(one.evidence["expiry_at_most_s"], 350.0);
    assert!(one.fix.contains("at most 350 s"), "{}", one.fix);
    assert!(one.fix.contains("keepalive"), "{}", one.fix);
    // One failure is a bound already.
    let one = listed(Pattern::PathExpiry, &[42.0]);
    assert_eq!(one.evidence["expiry_at_most_s"], 42.0);
}

/// The one finding of kills of `pattern` after these idle times.
fn listed(pattern: Pattern, idles: &[f64]) -> Finding {
    let mut f = Findings::new(Duration::from_hours(1), 100);
    for idle in idles {
        f.observe(kill(pattern, *idle), at(0));
    }
    f.list(at(1), TICK).remove(0)
}
