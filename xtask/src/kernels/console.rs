//! Reading a guest's console log back: the markers /init prints around
//! each step, and the step's output between them.

use std::collections::BTreeMap;

/// Starts every marker line /init prints.
pub const MARK: &str = "@@conn-tracer-kernels";

/// One step of /init: its output and the `key=value` fields of its end
/// marker (`exit` always, `events` for the trace, `up` the guest's uptime).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Step {
    pub output: Vec<String>,
    pub fields: BTreeMap<String, String>,
    /// The end marker was seen (the step finished, whatever its exit).
    pub ended: bool,
    /// Guest uptime at the begin marker.
    pub began: Option<f64>,
}

impl Step {
    pub fn exit(&self) -> Option<i32> {
        self.field("exit")
    }

    /// Seconds from its begin to its end marker, in the guest.
    pub fn took(&self) -> Option<f64> {
        Some(self.field::<f64>("up")? - self.began?)
    }

    pub fn field<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.fields.get(key)?.parse().ok()
    }
}

/// What a console log says.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Console {
    /// `uname -r` inside the guest.
    pub uname: Option<String>,
    /// Guest uptime when /init started its work.
    pub init_up: Option<f64>,
    pub steps: BTreeMap<String, Step>,
    /// /init reached its end.
    pub done: bool,
}

impl Console {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.get(name)
    }
}

/// Whether `line` is a kernel message (`[   12.345678] ...`).
fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

/// `line` without ANSI escape sequences (the firmware clears the screen;
/// a program may colour its messages).
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        // CSI: ESC [ parameters, then one final byte in @..~; else ESC x.
        if chars.next_if_eq(&'[').is_some() {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// Parses a console log. The serial console ends lines with CR LF, and the
/// firmware's escape sequences can precede a marker on its line, so a
/// marker is found anywhere in a line. Kernel messages inside a step are
/// left out of its output.
pub fn parse(log: &str) -> Console {
    let mut console = Console::default();
    let mut current: Option<String> = None;
    for line in log.lines() {
        let line = strip_escapes(line.trim_end_matches('\r'));
        let line = line.as_str();
        let Some(at) = line.find(MARK) else {
            if let Some(name) = &current
                && !is_kernel_message(line)
            {
                let step = console.steps.entry(name.clone()).or_default();
                step.output.push(line.to_owned());
            }
            continue;
        };
        let mut words = line[at + MARK.len()..].split_whitespace();
        let word = words.next().unwrap_or_default();
        let name = words.next().unwrap_or_default().to_owned();
        let fields: BTreeMap<String, String> = words
            .filter_map(|w| {
                let (k, v) = w.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect();
        let up = fields.get("up").and_then(|v| v.parse().ok());
        match word {
            "uname" => {
                console.uname = Some(name);
                console.init_up = up;
            }
            "begin" => {
                console.steps.entry(name.clone()).or_default().began = up;
                current = Some(name);
            }
            "end" => {
                let step = console.steps.entry(name).or_default();
                step.ended = true;
                step.fields.extend(fields);
                current = None;
            }
            "done" => console.done = true,
            _ => {}
        }
    }
    console
}

/// The lines of `check` output that are not "ok" (degraded or missing
/// features, errors): without blank lines, "info" lines and conn-tracer's
/// own summary line.
pub fn not_ok(output: &[String]) -> Vec<&str> {
    output
        .iter()
        .map(|line| line.trim_end())
        .filter(|line| {
            let word = line.split_whitespace().next().unwrap_or_default();
            !word.is_empty()
                && !["ok", "info", "conn-tracer"]
                    .iter()
                    .any(|w| word.eq_ignore_ascii_case(w))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a real 6.1 log: firmware escapes, kernel messages in
    /// the middle of a step, CR LF line ends.
    const LOG: &str = "SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n\
        [    5.655625] Run /init as init process\r\n\
        \x1bc\x1b[?7l\x1b[2J@@conn-tracer-kernels uname 6.1.0-57-cloud-amd64 up=2.50\r\n\
        @@conn-tracer-kernels begin check up=2.51\r\n\
        ok      btf                                /sys/kernel/btf/vmlinux\r\n\
        [    9.100000] random: crng init done\r\n\
        MISSING program tcp_send_reset           func 'tcp_send_reset' doesn't have 3-th argument\r\n\
        info    lockdown                           integrity\r\n\
        \r\n\
        @@conn-tracer-kernels end check exit=1 up=7.01\r\n\
        @@conn-tracer-kernels begin selftest\r\n\
        \x1b[1m\x1b[31merror:\x1b[0m unrecognized subcommand '\x1b[33mselftest\x1b[0m'\r\n\
        @@conn-tracer-kernels end selftest exit=2\r\n\
        @@conn-tracer-kernels begin trace\r\n\
        Error: cannot start tracing\r\n\
        @@conn-tracer-kernels end trace exit=1 ready=no port=40123 events=0\r\n\
        @@conn-tracer-kernels done\r\n\
        [   12.000000] reboot: Power down\r\n";

    #[test]
    fn markers_give_exits_fields_and_outputs() {
        let console = parse(LOG);
        assert_eq!(console.uname.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(console.init_up, Some(2.5));
        assert!(console.done);
        let check = console.step("check").unwrap();
        assert_eq!(check.exit(), Some(1));
        assert!((check.took().unwrap() - 4.5).abs() < 1e-9);
        assert_eq!(console.step("selftest").unwrap().took(), None);
        assert_eq!(
            check.output,
            [
                "ok      btf                                /sys/kernel/btf/vmlinux",
                "MISSING program tcp_send_reset           func 'tcp_send_reset' doesn't have 3-th argument",
                "info    lockdown                           integrity",
                "",
            ]
        );
        let selftest = console.step("selftest").unwrap();
        assert_eq!(selftest.exit(), Some(2));
        assert_eq!(
            selftest.output,
            ["error: unrecognized subcommand 'selftest'"]
        );
        let trace = console.step("trace").unwrap();
        assert_eq!(trace.exit(), Some(1));
        assert_eq!(trace.field::<u32>("events"), Some(0));
        assert_eq!(trace.fields["ready"], "no");
    }

    #[test]
    fn a_step_cut_short_has_output_but_no_end() {
        let log =
            "@@conn-tracer-kernels begin check\r\nok a\r\n[ 3.1] Kernel panic - not syncing\r\n";
        let console = parse(log);
        let check = console.step("check").unwrap();
        assert!(!check.ended);
        assert_eq!(check.exit(), None);
        assert_eq!(check.output, ["ok a"]);
        assert!(!console.done);
        assert_eq!(parse(""), Console::default());
    }

    #[test]
    fn not_ok_keeps_degraded_missing_and_errors() {
        let output: Vec<String> = [
            "ok       btf             present",
            "OK       ring buffer     yes",
            "degraded error reports  no inet_sk_error_report (5.14+): read at close",
            "MISSING  bpf_sk_storage  needs 5.11",
            "info     lockdown        integrity",
            "",
            "conn-tracer check: 1 requirement missing",
            "Error: cannot open /sys/kernel/btf/vmlinux",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            not_ok(&output),
            [
                "degraded error reports  no inet_sk_error_report (5.14+): read at close",
                "MISSING  bpf_sk_storage  needs 5.11",
                "Error: cannot open /sys/kernel/btf/vmlinux",
            ]
        );
    }

    #[test]
    fn kernel_messages_are_told_from_output() {
        assert!(is_kernel_message(
            "[    5.655625] Run /init as init process"
        ));
        assert!(is_kernel_message("[12.5] x"));
        assert!(!is_kernel_message("[ok] something"));
        assert!(!is_kernel_message("[] x"));
        assert!(!is_kernel_message("ok [1.0]"));
    }
}
