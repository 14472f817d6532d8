//! The selftest's checks and its report.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[expect(
    clippy::struct_field_names,
    reason = "`check` names the fact checked, as the report prints it"
)]
pub(super) struct Check {
    pub scenario: &'static str,
    pub check: String,
    pub expected: String,
    pub observed: String,
    pub ok: bool,
}

/// What was observed, or why nothing was.
pub(super) type Seen<T> = Result<T, String>;

impl Check {
    /// `observed` must equal `expected`.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "expectations are small values written at the call"
    )]
    pub(super) fn equal<T: PartialEq + fmt::Display>(
        scenario: &'static str,
        check: &str,
        expected: T,
        observed: Seen<T>,
    ) -> Self {
        let (ok, observed) = match observed {
            Ok(o) => (o == expected, o.to_string()),
            Err(why) => (false, why),
        };
        Self {
            scenario,
            check: check.to_string(),
            expected: expected.to_string(),
            observed,
            ok,
        }
    }

    /// `observed` must lie in `lo..=hi`.
    pub(super) fn within(
        scenario: &'static str,
        check: &str,
        lo: Duration,
        hi: Duration,
        observed: Seen<Duration>,
    ) -> Self {
        let (ok, observed) = match observed {
            Ok(o) => (lo <= o && o <= hi, secs(o)),
            Err(why) => (false, why),
        };
        Self {
            scenario,
            check: check.to_string(),
            expected: format!("{} to {}", secs(lo), secs(hi)),
            observed,
            ok,
        }
    }

    /// One line for people.
    pub(super) fn line(&self) -> String {
        format!(
            "{:<4} {:<17} {:<24} expected {}; observed {}",
            if self.ok { "ok" } else { "FAIL" },
            self.scenario,
            self.check,
            self.expected,
            self.observed
        )
    }
}

/// Seconds with millisecond precision.
fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

/// Everything a run found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Report {
    /// All checks ran and matched.
    pub ok: bool,
    /// The running kernel's release.
    pub kernel: String,
    pub threshold_s: f64,
    pub elapsed_s: f64,
    pub passed: usize,
    pub failed: usize,
    /// Events the kernel could not put in the ring buffer during the run
    /// (any namespace's): a reason for missing events.
    pub events_lost: u64,
    pub checks: Vec<Check>,
    /// Why the selftest could not run at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    pub(super) fn new(
        checks: Vec<Check>,
        error: Option<String>,
        elapsed: Duration,
        lost: u64,
    ) -> Self {
        let passed = checks.iter().filter(|c| c.ok).count();
        let failed = checks.len() - passed;
        Self {
            ok: error.is_none() && failed == 0 && passed > 0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            threshold_s: THRESHOLD.as_secs_f64(),
            elapsed_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            passed,
            failed,
            events_lost: lost,
            checks,
            error,
        }
    }

    /// 0: every check matched; 1: some did not; 2: the selftest could not run.
    pub(super) fn exit_code(&self) -> u8 {
        match (&self.error, self.ok) {
            (Some(_), _) => 2,
            (None, true) => 0,
            (None, false) => 1,
        }
    }

    /// The closing line of the text output.
    pub(super) fn summary(&self) -> String {
        if let Some(e) = &self.error {
            return format!("conn-tracer selftest: cannot run: {e}");
        }
        let scenarios: std::collections::BTreeSet<&str> =
            self.checks.iter().map(|c| c.scenario).collect();
        let verdict = if self.ok {
            format!("all {} checks ok", self.passed)
        } else {
            format!(
                "{} of {} checks FAILED",
                self.failed,
                self.passed + self.failed
            )
        };
        let mut s = format!(
            "conn-tracer selftest: {verdict} ({} scenarios, kernel {}, {:.1}s)",
            scenarios.len(),
            self.kernel,
            self.elapsed_s
        );
        if self.events_lost > 0 {
            let _ = write!(
                s,
                "; {} kernel events lost (ring buffer full): missing events may be why",
                self.events_lost
            );
        }
        s
    }
}
