//! The matrix: one row per kernel, then what each kernel's `check` did not
//! call ok.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Series,
    apt::Image,
    boot::Boot,
    console::{Console, Step, not_ok},
};

/// One kernel's boot and what its console said.
pub struct Outcome {
    pub series: &'static Series,
    pub image: Image,
    pub boot: Boot,
    pub console: Console,
    pub log: PathBuf,
}

/// busybox `timeout` kills with SIGTERM: the shell reports 128 + 15.
const TIMED_OUT: i32 = 143;

impl Outcome {
    /// What failed: a step that did not exit 0 (or never ended), a trace
    /// that saw nothing of its connection, a boot that did not finish.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.boot.timed_out {
            problems.push("boot timed out".to_owned());
        }
        for name in ["check", "selftest"] {
            match self.step(name).and_then(Step::exit) {
                Some(0) => {}
                Some(TIMED_OUT) => problems.push(format!("{name} timed out")),
                Some(_) => problems.push(name.to_owned()),
                None => problems.push(format!("{name} did not finish")),
            }
        }
        if self.events().unwrap_or(0) == 0 {
            problems.push("no trace events".to_owned());
        }
        if !self.console.done && !self.boot.timed_out {
            problems.push("/init did not finish".to_owned());
        }
        problems
    }

    pub fn passed(&self) -> bool {
        self.problems().is_empty()
    }

    pub fn verdict(&self) -> String {
        let problems = self.problems();
        if problems.is_empty() {
            "pass".to_owned()
        } else {
            format!("FAIL: {}", problems.join(", "))
        }
    }

    fn step(&self, name: &str) -> Option<&Step> {
        self.console.step(name)
    }

    fn events(&self) -> Option<u32> {
        self.step("trace")?.field("events")
    }

    fn exit_cell(&self, name: &str) -> String {
        match self.step(name).and_then(Step::exit) {
            Some(TIMED_OUT) => format!("{TIMED_OUT} (timeout)"),
            Some(code) => code.to_string(),
            None => "-".to_owned(),
        }
    }
}

/// What the whole run was.
pub struct Run<'a> {
    pub bin: &'a Path,
    pub cmdline: &'a str,
    pub downloaded: u64,
    pub total: Duration,
}

/// At most this many lines of a failed selftest's output go in the matrix.
const SELFTEST_LINES: usize = 10;

pub fn render(outcomes: &[Outcome], run: &Run<'_>) -> String {
    let mut out = format!(
        "conn-tracer kernel matrix: {} under qemu TCG, append \"{}\"\n\n",
        run.bin.display(),
        run.cmdline
    );
    table(outcomes, &mut out);
    for o in outcomes {
        details(o, &mut out);
    }
    let boots: f64 = outcomes.iter().map(|o| o.boot.took.as_secs_f64()).sum();
    let _ = writeln!(
        out,
        "\n{} kernels, {} passed; boots {boots:.1} s, whole run {:.1} s, downloaded {:.1} MB",
        outcomes.len(),
        outcomes.iter().filter(|o| o.passed()).count(),
        run.total.as_secs_f64(),
        super::mb(run.downloaded),
    );
    out
}

/// One row per kernel, columns padded to their widest cell.
fn table(outcomes: &[Outcome], out: &mut String) {
    let header = [
        "kernel",
        "package",
        "check exit",
        "selftest exit",
        "trace events",
        "boot",
        "verdict",
    ];
    let rows: Vec<[String; 7]> = outcomes
        .iter()
        .map(|o| {
            [
                o.image.release.clone(),
                format!("{} {}", o.image.package, o.image.version),
                o.exit_cell("check"),
                o.exit_cell("selftest"),
                o.events().map_or_else(|| "-".to_owned(), |n| n.to_string()),
                format!("{:.1} s", o.boot.took.as_secs_f64()),
                o.verdict(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$} | ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    line(&widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str));
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
}

/// What `check` did not call ok, and a failed selftest's output.
fn details(o: &Outcome, out: &mut String) {
    let _ = writeln!(
        out,
        "\n{} ({}; like {}), log {}",
        o.image.release,
        o.series.name,
        o.series.like,
        o.log.display()
    );
    if o.console.uname.as_deref() != Some(o.image.release.as_str()) {
        let uname = o.console.uname.as_deref();
        let _ = writeln!(
            out,
            "  guest uname: {}",
            uname.unwrap_or("(none: /init never ran)")
        );
    }
    let steps: Vec<String> = ["check", "selftest", "trace"]
        .into_iter()
        .filter_map(|name| Some(format!("{name} {:.1} s", o.step(name)?.took()?)))
        .collect();
    if let Some(init) = o.console.init_up {
        let _ = writeln!(
            out,
            "  guest time: /init at {init:.1} s; {}",
            if steps.is_empty() {
                "no step finished".to_owned()
            } else {
                steps.join(", ")
            }
        );
    }
    if let Some(check) = o.step("check") {
        let lines = not_ok(&check.output);
        if lines.is_empty() {
            out.push_str("  check: every feature ok\n");
        } else {
            let _ = writeln!(out, "  check, not ok ({} lines):", lines.len());
            for l in lines {
                let _ = writeln!(out, "    {l}");
            }
        }
    } else {
        out.push_str("  check: never ran\n");
    }
    if let Some(selftest) = o.step("selftest")
        && selftest.exit() != Some(0)
    {
        let lines: Vec<&str> = selftest
            .output
            .iter()
            .map(|l| l.trim_end())
            .filter(|l| !l.is_empty())
            .collect();
        let _ = writeln!(out, "  selftest ({} lines of output):", lines.len());
        for l in lines.iter().take(SELFTEST_LINES) {
            let _ = writeln!(out, "    {l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{SERIES, console};

    fn outcome(series: usize, release: &str, log: &str) -> Outcome {
        Outcome {
            series: &SERIES[series],
            image: Image {
                package: format!("linux-image-{release}"),
                version: "1.0-1".into(),
                release: release.into(),
                vmlinuz: PathBuf::from("/k/vmlinuz"),
                config: PathBuf::from("/k/config"),
            },
            boot: Boot {
                took: Duration::from_millis(15_250),
                timed_out: false,
            },
            console: console::parse(log),
            log: PathBuf::from(format!("/t/kernels/{release}.log")),
        }
    }

    const PASSING: &str = "@@conn-tracer-kernels uname 6.12.117+deb12-cloud-amd64 up=3.00\n\
        @@conn-tracer-kernels begin check up=3.00\nok a\nok b\n\
        @@conn-tracer-kernels end check exit=0 up=9.25\n\
        @@conn-tracer-kernels begin selftest\nok x\n@@conn-tracer-kernels end selftest exit=0\n\
        @@conn-tracer-kernels begin trace\n@@conn-tracer-kernels end trace exit=0 events=16\n\
        @@conn-tracer-kernels done\n";

    const FAILING: &str = "@@conn-tracer-kernels uname 6.1.0-57-cloud-amd64\n\
        @@conn-tracer-kernels begin check\nok a\nMISSING tcp_send_reset: 2 arguments\n\
        @@conn-tracer-kernels end check exit=1\n\
        @@conn-tracer-kernels begin selftest\nerror: unrecognized subcommand 'selftest'\n\
        @@conn-tracer-kernels end selftest exit=2\n\
        @@conn-tracer-kernels begin trace\n@@conn-tracer-kernels end trace exit=1 events=0\n\
        @@conn-tracer-kernels done\n";

    #[test]
    fn verdicts_name_every_failed_step() {
        assert_eq!(
            outcome(2, "6.12.117+deb12-cloud-amd64", PASSING).verdict(),
            "pass"
        );
        let failing = outcome(1, "6.1.0-57-cloud-amd64", FAILING);
        assert_eq!(failing.verdict(), "FAIL: check, selftest, no trace events");
        let hung = outcome(
            0,
            "5.10.0-46-cloud-amd64",
            "@@conn-tracer-kernels begin check\n@@conn-tracer-kernels end check exit=143\n\
             @@conn-tracer-kernels begin selftest\n",
        );
        assert_eq!(
            hung.verdict(),
            "FAIL: check timed out, selftest did not finish, no trace events, \
             /init did not finish"
        );
    }

    #[test]
    fn matrix_has_a_row_per_kernel_and_the_not_ok_lines() {
        let outcomes = [
            outcome(1, "6.1.0-57-cloud-amd64", FAILING),
            outcome(2, "6.12.117+deb12-cloud-amd64", PASSING),
        ];
        let text = render(
            &outcomes,
            &Run {
                bin: Path::new("/t/conn-tracer"),
                cmdline: "console=ttyS0",
                downloaded: 60_000_000,
                total: Duration::from_secs(40),
            },
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[2],
            "kernel                     | package                                      \
             | check exit | selftest exit | trace events | boot   | verdict"
        );
        assert!(
            lines[4]
                .starts_with("6.1.0-57-cloud-amd64       | linux-image-6.1.0-57-cloud-amd64 1.0-1")
        );
        assert!(lines[4].ends_with("| 1          | 2             | 0            | 15.2 s | FAIL: check, selftest, no trace events"), "{}", lines[4]);
        assert!(
            lines[5].ends_with("| 0          | 0             | 16           | 15.2 s | pass"),
            "{}",
            lines[5]
        );
        assert!(
            text.contains("  check, not ok (1 lines):\n    MISSING tcp_send_reset: 2 arguments\n")
        );
        assert!(text.contains("    error: unrecognized subcommand 'selftest'\n"));
        assert!(text.contains("  check: every feature ok\n"));
        assert!(
            text.contains("  guest time: /init at 3.0 s; check 6.2 s\n"),
            "{text}"
        );
        assert!(text.ends_with(
            "2 kernels, 1 passed; boots 30.5 s, whole run 40.0 s, downloaded 60.0 MB\n"
        ));
    }
}
