//! Helpers for the root-only integration tests of conn-tracer.
//!
//! Every test runs in its own network namespace ([`NetNs`]) with its own
//! tracer ([`Tracer`]), so tests can run in parallel: the tracer sees every
//! namespace and a test keeps only the events whose `netns` is its own. Each
//! resource is a guard that cleans up on drop, failed test or not: peers and
//! tracers are killed by pid, namespaces and cgroup directories removed.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

pub mod bpf;
pub mod container;
pub mod daemon;
pub mod deploy;
pub mod docker;
mod events;
pub mod fake_kube;
pub mod helper;
pub mod image;
pub mod mesh;
pub mod netlab;
mod ns;
pub mod prometheus;
pub mod scenario;
pub mod servers;
mod tracer;

pub use self::{events::*, ns::*, tracer::*};

/// Bound on one step of a test: a peer's next line, a peer's exit, an event.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the tracer's start (BTF parsing, program load and attach).
pub const TRACER_READY_TIMEOUT: Duration = Duration::from_mins(1);
/// The line the tracer prints on stderr once its programs are attached.
pub const TRACER_READY_LINE: &str = "conn-tracer: tracing";

/// True when the test can run. Without root it prints why it is skipped and
/// returns false, except in CI (env `CI` set), where these tests must run.
pub fn require_root_or_skip(name: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        !in_ci(),
        "{name} needs root, and CI is set: run the integration tests as root in CI"
    );
    // Straight to fd 2: libtest would swallow eprintln! of a passing test.
    let _ = writeln!(std::io::stderr(), "skipping {name}: needs root");
    false
}

/// The name of the enclosing function: in a test, the test's name.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn f() {}
        let path = ::std::any::type_name_of_val(&f);
        let path = path.strip_suffix("::f").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}

/// Returns from the enclosing test, saying why, when it needs root and
/// runs without ([`require_root_or_skip`] under the test's own name).
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        if !$crate::require_root_or_skip($crate::test_name!()) {
            return;
        }
    };
}

/// [`skip_unless_root!`], then [`daemon::serial`]: for the tests that read
/// daemon metrics, `let _serial = serial_unless_skipped!();`.
#[macro_export]
macro_rules! serial_unless_skipped {
    () => {{
        $crate::skip_unless_root!();
        $crate::daemon::serial()
    }};
}

/// Whether this is a CI run (env `CI` set, and not to `false` or `0`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The path of `program` when it is on PATH. Otherwise the test cannot run:
/// it prints why (with `install`, what provides the program) and gets
/// `None`, except in CI, where `cargo xtask setup` installs it and its
/// absence fails the test.
pub fn require_program_or_skip(test: &str, program: &str, install: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !in_ci(),
            "{test} needs `{program}` ({install}), and CI is set: run `cargo xtask setup`"
        );
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: `{program}` not found ({install}; `cargo xtask setup` installs it)"
        );
    }
    found
}

/// A short random hex string for names of namespaces and cgroups.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS per process; the counter and clock
    // keep names distinct within one process.
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:010x}", h.finish() & 0xff_ffff_ffff)
}

/// The conn-tracer binary: `$CONN_TRACER_BIN`, else `<workspace>/target/debug/conn-tracer`.
pub fn conn_tracer_bin() -> PathBuf {
    let path = std::env::var_os("CONN_TRACER_BIN").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target/debug/conn-tracer")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "conn-tracer binary not found at {}: run `cargo build -p tracer-user` (or `cargo xtask test`), \
         or point CONN_TRACER_BIN at it",
        path.display()
    );
    path
}

/// Runs an `ip` command to its end, checked.
pub(crate) fn run_checked(cmd: &mut Command) {
    checked_output(cmd, " (is iproute2 installed?)");
}

/// Makes `cmd`'s process join the cgroup v2 directory `dir` between fork
/// and exec, as a container runtime does: every socket it ever opens (a
/// listener too, whose owner its accepted connections inherit) is owned by
/// that cgroup. Moving it after spawn races with its first sockets.
pub fn start_in_cgroup(cmd: &mut Command, dir: &Path) {
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .expect("cgroup path without NUL");
    // SAFETY: between fork and exec only async-signal-safe calls, on
    // memory prepared before the fork: "0" moves the writer.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Runs `cmd` to its end: its stdout, or a panic with its stderr (`hint`
/// follows the error when it cannot start).
pub fn checked_output(cmd: &mut Command, hint: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}{hint}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stops `child`: SIGTERM, then SIGKILL if it has not exited within
/// `grace` (polled every `poll`); reaped either way.
pub(crate) fn terminate(child: &mut Child, grace: Duration, poll: Duration) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: signalling our own, not yet reaped, child by pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        thread::sleep(poll);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Copies each line `child` writes on stderr to the test's stderr (after
/// `prefix`) and keeps the first MiB of them.
pub(crate) fn tee_stderr(child: &mut Child, prefix: &'static str) -> Arc<Mutex<String>> {
    tee_lines(child.stderr.take().expect("piped stderr"), prefix)
}

/// [`tee_stderr`] of any pipe.
pub(crate) fn tee_lines(
    pipe: impl std::io::Read + Send + 'static,
    prefix: &'static str,
) -> Arc<Mutex<String>> {
    use std::io::{BufRead as _, BufReader};
    let kept = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&kept);
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            // Straight to fd 2, as when it was inherited.
            let _ = writeln!(std::io::stderr(), "{prefix}{line}");
            let mut kept = lock(&sink);
            if kept.len() < 1 << 20 {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
    });
    kept
}

/// Spawns `cmd` with `stdin` and its stdout and stderr piped; `what` names
/// it if it cannot start.
pub(crate) fn spawn_piped(
    cmd: &mut Command,
    stdin: std::process::Stdio,
    what: &str,
) -> (Child, std::process::ChildStdout, std::process::ChildStderr) {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    (child, stdout, stderr)
}

/// Polls `child` until it exits, at most `timeout`.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// SIGKILL and reap a child that may still run. `Child::kill` signals the
/// child's own pid, which stays reserved until the child is reaped.
pub(crate) fn kill_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = wait_child(child, STEP_TIMEOUT);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking reader thread must not hide the test's own failure.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits (at most `timeout`) until `read` gives `want`; fails the test
/// naming `what` otherwise.
#[track_caller]
pub fn wait_counter(what: &str, want: u64, timeout: Duration, read: impl Fn() -> u64) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = read();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} is {got}, expected {want} (waited {timeout:?})"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time such as
/// `2025-01-02T03:04:05.123456789Z`; `None` if it is not one.
pub fn parse_rfc3339_utc(text: &str) -> Option<f64> {
    let body = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = body.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, min, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if date.next().is_some()
        || hms.next().is_some()
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || min > 59
        || sec > 60
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let secs = u32::try_from(days * 86_400 + hour * 3600 + min * 60 + sec).ok()?;
    let frac: f64 = format!("0.{frac}").parse().ok()?;
    Some(f64::from(secs) + frac)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::ns::unescape_mount_path;

    #[test]
    fn rfc3339_parses_utc_times() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339_utc("2000-03-01T00:00:01.5Z"),
            Some(951_868_801.5)
        );
        assert_eq!(
            parse_rfc3339_utc("2024-02-29T12:00:00+00:00"),
            Some(1_709_208_000.0)
        );
        assert_eq!(parse_rfc3339_utc("2024-02-29 12:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2024-02-29T12:00:00+01:00"), None);
    }

    #[test]
    fn test_name_is_the_enclosing_functions() {
        assert_eq!(test_name!(), "test_name_is_the_enclosing_functions");
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(r"/sys/fs/cgroup\040x"),
            "/sys/fs/cgroup x"
        );
        assert_eq!(
            unescape_mount_path("/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
    }

    #[test]
    fn transitions_keep_state_events_in_order() {
        let evs: Vec<Value> = [
            r#"{"kind":"state","cookie":1,"ts_ns":1,"old_state":"CLOSE","new_state":"SYN_SENT"}"#,
            r#"{"kind":"reset_received","cookie":1,"ts_ns":2,"reason":""}"#,
            r#"{"kind":"state","cookie":1,"ts_ns":3,"old_state":"SYN_SENT","new_state":"CLOSE"}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect();
        assert_eq!(
            transitions(&evs),
            pairs(&[("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")])
        );
        assert!(has_closed(&evs, 1));
        assert_eq!(find_cookie(&evs, |e| kind(e) == "reset_received"), Some(1));
    }
}
