//! `conn-tracer selftest` on this machine's kernel, run as operators and CI
//! run it: every scenario runs and every check matches (exit 0), in text
//! and in JSON; when the programs cannot load it exits 2 and says why.

use std::{
    collections::BTreeSet,
    io::Read,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use integration_tests::{conn_tracer_bin, skip_unless_root, str_values};
use serde_json::Value;

/// Every scenario the selftest runs.
const SCENARIOS: [&str; 8] = [
    "older-connection",
    "idle-peer-close",
    "owner-close",
    "peer-reset",
    "stale-reuse",
    "refused-connect",
    "keepalive-sockopt",
    "sockopt-answers",
];

/// A run takes ~4 s here; a qemu TCG guest is 5-10 times slower.
const RUN_TIMEOUT: Duration = Duration::from_mins(2);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `conn-tracer selftest ARGS`, bounded by [`RUN_TIMEOUT`].
fn selftest(args: &[&str]) -> Run {
    selftest_env(args, &[])
}

/// [`selftest`] with extra environment variables.
fn selftest_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut child = Command::new(conn_tracer_bin())
        .arg("selftest")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conn-tracer selftest");
    let reader = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped")));
    let err = reader(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "selftest {args:?} still running after {RUN_TIMEOUT:?}; stdout: {}",
                out.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    Run {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

#[test]
fn root_selftest_passes_every_check_of_every_scenario() {
    skip_unless_root!();
    let run = selftest(&[]);
    let (checks, rest): (Vec<&str>, Vec<&str>) = run
        .stdout
        .lines()
        .partition(|l| l.starts_with("ok ") || l.starts_with("FAIL "));
    let failed: Vec<&str> = checks
        .iter()
        .copied()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert!(
        failed.is_empty() && run.code == Some(0),
        "exit {:?}, failed checks:\n{}\nstdout:\n{}\nstderr:\n{}",
        run.code,
        failed.join("\n"),
        run.stdout,
        run.stderr
    );
    let ran: BTreeSet<&str> = checks
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(ran, SCENARIOS.into_iter().collect(), "{}", run.stdout);
    // The facts the selftest exists for, each on its own line.
    for (scenario, check) in [
        ("older-connection", "owner (from /proc)"),
        ("idle-peer-close", "idle kills counted"),
        ("idle-peer-close", "idle at the end"),
        ("peer-reset", "close_kind"),
        ("stale-reuse", "stale reuse"),
        ("refused-connect", "transitions"),
        ("keepalive-sockopt", "keepalive at close"),
        ("sockopt-answers", "bytes untouched"),
    ] {
        assert!(
            checks
                .iter()
                .any(|l| l.contains(&format!(" {scenario} ")) && l.contains(check)),
            "no {scenario} / {check} line:\n{}",
            run.stdout
        );
    }
    let summary = rest.last().copied().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "conn-tracer selftest: all {} checks ok (8 scenarios",
            checks.len()
        )),
        "summary: {summary:?}\n{}",
        run.stdout
    );
}

#[test]
fn root_selftest_json_has_every_check_ok() {
    skip_unless_root!();
    let run = selftest(&["--json"]);
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", run.stdout, run.stderr));
    assert_eq!(run.code, Some(0), "{report:#}\nstderr: {}", run.stderr);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["failed"], 0, "{report:#}");
    let checks = report["checks"].as_array().expect("checks");
    assert_eq!(report["passed"].as_u64(), Some(checks.len() as u64));
    for c in checks {
        assert_eq!(c["ok"], true, "{c}");
        let (expected, observed) = (c["expected"].as_str(), c["observed"].as_str());
        // Ranges ("2.992s to 3.008s") hold what they observed; the rest equal it.
        assert!(
            expected.is_some_and(|e| e.contains(" to ")) || expected == observed,
            "an ok check says what it saw: {c}"
        );
    }
    let ran: BTreeSet<&str> = checks
        .iter()
        .filter_map(|c| c["scenario"].as_str())
        .collect();
    assert_eq!(ran, SCENARIOS.into_iter().collect());
    assert!(report.get("error").is_none(), "{report:#}");
}

/// The fallbacks of kernels before 5.11/5.12 (per-socket state in a map
/// keyed by address, listener owners by port, ids from addresses, no task
/// in setsockopt events), forced on this kernel, give the same answers.
#[test]
fn root_selftest_passes_with_the_old_kernel_fallbacks() {
    skip_unless_root!();
    let run = selftest_env(&["--json"], &[("CONN_TRACER_OLD_HELPERS", "1")]);
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", run.stdout, run.stderr));
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .map(|c| c.iter().filter(|c| c["ok"] != true).collect())
        .unwrap_or_default();
    assert_eq!(
        run.code,
        Some(0),
        "failed: {failed:#?}\nstderr: {}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("acting as if this kernel were older than 5.11"),
        "the fallbacks were not used: {}",
        run.stderr
    );
    let ran: BTreeSet<&str> = str_values(&report["checks"], "scenario", "checks").collect();
    assert_eq!(ran, SCENARIOS.into_iter().collect());
}

#[test]
fn root_selftest_that_cannot_load_the_programs_exits_2_and_says_why() {
    skip_unless_root!();
    let run = selftest(&["--btf", "/nonexistent/vmlinux"]);
    assert_eq!(
        run.code,
        Some(2),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains("cannot run") && run.stderr.contains("/nonexistent/vmlinux"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("ok "), "no check ran: {}", run.stdout);
}
