//! Bad kernel BTF as an operator meets it: `conn-tracer run`, `trace` and
//! `check` pointed (`--btf`) at a file that is missing, is not BTF, or is BTF
//! without the kernel's types or hooks say which file, what is missing in it
//! and what to do, and exit non-zero without a panic. (Bad settings and
//! flags: `daemon_basics.rs::bad_settings_exit_2_with_a_clear_message`.)
//!
//! None of this loads a kernel program (every case fails on the BTF first),
//! so no root is needed and nothing is left behind.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use integration_tests::{conn_tracer_bin, in_ci, test_name, unique_suffix};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("ct-bad-input-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs conn-tracer with `args`; a run that does not end within a minute
/// (it got past the BTF, which it must not) is killed and fails the test.
fn conn_tracer(args: &[&str]) -> Output {
    let mut child = Command::new(conn_tracer_bin())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("conn-tracer");
    let deadline = Instant::now() + Duration::from_mins(1);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("conn-tracer {args:?} still ran after 60 s: {out:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// `run`, `trace` and `check` with `--btf btf`: each fails, names the file
/// and says every one of `needles`; returns `check`'s MISSING lines.
fn assert_refused(btf: &Path, needles: &[&str]) -> Vec<String> {
    let btf_arg = btf.to_str().expect("utf-8 path");
    let runs: [&[&str]; 2] = [
        &[
            "run",
            "--btf",
            btf_arg,
            "--no-kube",
            "--listen",
            "127.0.0.1:0",
        ],
        &["trace", "--btf", btf_arg],
    ];
    for args in runs {
        let out = conn_tracer(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(btf_arg),
            "{args:?} names the file: {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: no {needle:?} in {stderr}"
            );
        }
    }
    let out = conn_tracer(&["check", "--btf", btf_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "check: {out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
    assert!(stdout.contains(btf_arg), "check names the file: {stdout}");
    let missing: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("MISSING"))
        .map(str::to_string)
        .collect();
    for needle in needles {
        assert!(
            missing.iter().any(|l| l.contains(needle)),
            "check: no MISSING line with {needle:?} in {stdout}"
        );
    }
    assert!(
        !stdout.contains("load and attach"),
        "check must not try to load programs without usable BTF: {stdout}"
    );
    missing
}

/// The kernel's BTF with one name in its string table changed, so that the
/// type of that name is gone and nothing else moves; in a scratch dir of
/// its own, removed when the `Scratch` is dropped.
fn vmlinux_without(name: &str, test: &str) -> Option<(Scratch, PathBuf)> {
    let Ok(mut bytes) = std::fs::read(VMLINUX) else {
        assert!(!in_ci(), "{test}: no {VMLINUX}, and CI is set");
        eprintln!("skipping {test}: no {VMLINUX}");
        return None;
    };
    let needle = format!("\0{name}\0").into_bytes();
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{name} is not in {VMLINUX}"));
    // Upper case: still a name, but no longer the one the tracer looks for.
    bytes[at + 1..at + needle.len() - 1].make_ascii_uppercase();
    let scratch = Scratch::new();
    let path = scratch.file(&format!("vmlinux-without-{name}"), &bytes);
    Some((scratch, path))
}

#[test]
fn missing_btf_file_is_named_with_what_to_do() {
    let missing = format!("/nonexistent/{}/vmlinux", unique_suffix());
    let lines = assert_refused(
        Path::new(&missing),
        &["CONFIG_DEBUG_INFO_BTF", "--btf", VMLINUX],
    );
    assert!(lines.iter().any(|l| l.contains("kernel BTF")), "{lines:?}");
}

#[test]
fn a_file_that_is_not_btf_is_named_with_what_to_do() {
    let scratch = Scratch::new();
    let empty = scratch.file("empty", b"");
    assert_refused(&empty, &["cannot read kernel BTF", "--btf"]);
    let text = scratch.file("vmlinux.txt", b"this is not BTF\n");
    assert_refused(&text, &["cannot read kernel BTF", "--btf"]);
}

/// A valid BTF file with no types at all (what a module's split BTF or a
/// stripped file looks like to a reader): the first missing struct is named.
#[test]
fn btf_without_the_kernel_types_names_the_missing_struct() {
    let scratch = Scratch::new();
    // struct btf_header: magic, version 1, flags 0, hdr_len 24, then
    // type_off 0, type_len 0, str_off 0, str_len 1; the string table is "\0".
    let mut btf = Vec::new();
    btf.extend_from_slice(&0xeb9f_u16.to_le_bytes());
    btf.extend_from_slice(&[1, 0]);
    for field in [24_u32, 0, 0, 0, 1] {
        btf.extend_from_slice(&field.to_le_bytes());
    }
    btf.push(0);
    let path = scratch.file("empty.btf", &btf);
    assert_refused(&path, &["struct sock", "--btf"]);
}

#[test]
fn btf_without_struct_tcp_sock_names_it() {
    let Some((_scratch, path)) = vmlinux_without("tcp_sock", test_name!()) else {
        return;
    };
    assert_refused(&path, &["struct tcp_sock", "--btf"]);
}

#[test]
fn btf_without_a_tracepoint_names_the_missing_hook() {
    // The one tracepoint the tracer cannot run without.
    let hook = "btf_trace_inet_sock_set_state";
    let Some((_scratch, path)) = vmlinux_without(hook, test_name!()) else {
        return;
    };
    let missing = assert_refused(
        &path,
        &[
            "btf_trace_inet_sock_set_state",
            "inet_sock_set_state",
            "TCP state transitions",
        ],
    );
    // Only that hook is missing: the BTF, its struct offsets and the other
    // hooks are fine (privileges, maps or cgroup v2 may be missing besides,
    // when not root).
    let btf_lines: Vec<&String> = missing
        .iter()
        .filter(|l| {
            ["kernel BTF", "struct offsets", "tracepoint"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    assert_eq!(btf_lines.len(), 1, "{missing:?}");
}

/// An optional hook the kernel lacks (as 5.10 lacks inet_sk_error_report)
/// degrades the tracer instead of stopping it: `check` says what is lost
/// and exits 0, having loaded and attached the other programs.
#[test]
fn root_btf_without_an_optional_tracepoint_degrades_and_runs() {
    let test = "root_btf_without_an_optional_tracepoint_degrades_and_runs";
    if !integration_tests::require_root_or_skip(test) {
        return;
    }
    let Some((_scratch, path)) = vmlinux_without("btf_trace_tcp_send_reset", test) else {
        return;
    };
    let out = conn_tracer(&["check", "--btf", path.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "check: {out:?}");
    let degraded: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("degraded") && l.contains("tcp_send_reset"))
        .collect();
    assert_eq!(degraded.len(), 1, "{stdout}");
    assert!(
        degraded[0].contains("resets this host sends are not seen"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("ok")
            && l.contains("load and attach")
            && l.contains("7 programs")),
        "the other programs load: {stdout}"
    );
}

/// `--skip-program` takes only optional programs: a required one (or a
/// typo) is refused before anything loads, naming the ones that may be
/// skipped.
#[test]
fn skipping_a_required_program_is_refused_with_the_optional_ones_named() {
    for args in [
        &["run", "--no-kube", "--skip-program", "inet_sock_set_state"][..],
        &["trace", "--skip-program", "tcp_prob"][..],
    ] {
        let out = conn_tracer(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert!(
            stderr.contains("is not an optional kernel program")
                && stderr.contains("tcp_probe")
                && stderr.contains(args[args.len() - 1]),
            "{args:?}: {stderr}"
        );
    }
}
