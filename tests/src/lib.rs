//! Helpers for the root-only integration tests of conn-tracer.
//!
//! Every test runs in its own network namespace ([`NetNs`]) with its own
//! tracer ([`Tracer`]), so tests can run in parallel: the tracer sees every
//! namespace and a test keeps only the events whose `netns` is its own. Each
//! resource is a guard that cleans up on drop, failed test or not: peers and
//! tracers are killed by pid, namespaces and cgroup directories removed.

use std::{
    collections::{BTreeSet, hash_map::RandomState},
    ffi::OsStr,
    fmt::Write as _,
    fs,
    hash::{BuildHasher, Hasher},
    io::{BufRead, BufReader, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

pub mod bpf;
pub mod container;
pub mod daemon;
pub mod deploy;
pub mod docker;
pub mod fake_kube;
pub mod image;
pub mod mesh;
pub mod netlab;
pub mod prometheus;
pub mod servers;

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

fn run_checked(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Polls `child` until it exits, at most `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
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
fn kill_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = wait_child(child, STEP_TIMEOUT);
    }
}

/// A named network namespace (`ip netns add ct-test-...`) with `lo` up,
/// deleted on drop.
pub struct NetNs {
    name: String,
    inode: u64,
}

impl NetNs {
    pub fn new() -> Self {
        let name = format!("ct-test-{}", unique_suffix());
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        // From here on, drop deletes the namespace whatever fails next.
        let mut ns = Self { name, inode: 0 };
        run_checked(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        let path = format!("/run/netns/{}", ns.name);
        ns.inode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {path}: {e}"))
            .ino();
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Inode number of the namespace, what the tracer reports as `netns`.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` on a new thread that is inside the namespace: the sockets it
    /// creates (and the threads and processes it starts) live there.
    pub fn spawn_in<T, F>(&self, f: F) -> thread::JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        thread::spawn(move || {
            // SAFETY: setns on a namespace fd we own; affects this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            drop(ns);
            f()
        })
    }

    /// `program` run inside the namespace. `ip netns exec` execs it in place,
    /// so the spawned child's pid is the program's pid.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns del {}: {e}", self.name),
        }
    }
}

/// A `ct-peer` (or any) process whose stdout lines the test waits for,
/// killed by pid on drop if still running.
pub struct Peer {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    /// Spawns `cmd` with stdin, stdout and stderr piped; `label` names it in failures.
    pub fn spawn(label: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {label} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                lock(&sink).push(line);
            }
        });
        Self {
            label: label.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn describe(&mut self) -> String {
        let status = self.child.try_wait().ok().flatten();
        format!(
            "{} (pid {}, exit {status:?}); stdout so far: {:?}; stderr: {:?}",
            self.label,
            self.child.id(),
            self.seen,
            lock(&self.stderr)
        )
    }

    /// Waits for the next stdout line, which must start with one of
    /// `words`, and returns all its words.
    pub fn expect_line_any(&mut self, words: &[&str]) -> Vec<String> {
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                let all: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
                assert!(
                    all.first().is_some_and(|w| words.contains(&w.as_str())),
                    "expected one of {words:?} from {}",
                    self.describe()
                );
                all
            }
            Err(e) => panic!(
                "no {words:?} line within {STEP_TIMEOUT:?} ({e:?}) from {}",
                self.describe()
            ),
        }
    }

    /// Waits for the next stdout line, which must start with the word
    /// `word`, and returns the words after it.
    pub fn expect_line(&mut self, word: &str) -> Vec<String> {
        match self.lines.recv_timeout(STEP_TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                let mut words = line.split_whitespace().map(str::to_owned);
                let first = words.next();
                assert!(
                    first.as_deref() == Some(word),
                    "expected a `{word} ...` line from {}",
                    self.describe()
                );
                words.collect()
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no `{word}` line within {STEP_TIMEOUT:?} from {}",
                    self.describe()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "stdout closed before a `{word}` line from {}",
                    self.describe()
                )
            }
        }
    }

    /// Like [`Peer::expect_line`] for a line `word PORT ...`: returns PORT.
    pub fn expect_port(&mut self, word: &str) -> u16 {
        let words = self.expect_line(word);
        match words.first().map(|w| w.parse::<u16>()) {
            Some(Ok(port)) => port,
            _ => panic!(
                "`{word}` line without a port: {words:?} from {}",
                self.describe()
            ),
        }
    }

    /// Lets a peer that waits on stdin (`--pause-before-*`) go on.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        if let Err(e) = stdin.write_all(b"go\n").and_then(|()| stdin.flush()) {
            panic!("cannot write the go line ({e}) to {}", self.describe());
        }
    }

    /// Waits (bounded) for the peer to exit and asserts it exited 0.
    pub fn wait_success(&mut self) {
        match wait_child(&mut self.child, STEP_TIMEOUT) {
            Some(status) if status.success() => {}
            Some(_) => {
                thread::sleep(Duration::from_millis(50));
                panic!("peer failed: {}", self.describe());
            }
            None => panic!(
                "peer still running after {STEP_TIMEOUT:?}: {}",
                self.describe()
            ),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stdin.take();
        kill_child(&mut self.child);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking reader thread must not hide the test's own failure.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct TraceLog {
    events: Vec<Value>,
    unparsed: Vec<String>,
    stderr: Vec<String>,
    ready: bool,
    stderr_closed: bool,
}

struct Shared {
    log: Mutex<TraceLog>,
    changed: Condvar,
}

/// A running `conn-tracer trace --json` whose stdout is collected as JSON
/// events. Drop stops it (SIGTERM, then SIGKILL) without asserting anything.
pub struct Tracer {
    child: Child,
    shared: Arc<Shared>,
}

impl Tracer {
    /// Starts the tracer and waits until it says its programs are attached.
    pub fn start() -> Self {
        let bin = conn_tracer_bin();
        let mut child = Command::new(&bin)
            .args(["trace", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let shared = Arc::new(Shared {
            log: Mutex::new(TraceLog::default()),
            changed: Condvar::new(),
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&shared);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut log = lock(&sink.log);
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => log.events.push(v),
                    _ => log.unparsed.push(line),
                }
                drop(log);
                sink.changed.notify_all();
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&shared);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = lock(&sink.log);
                log.ready |= line.contains(TRACER_READY_LINE);
                log.stderr.push(line);
                drop(log);
                sink.changed.notify_all();
            }
            lock(&sink.log).stderr_closed = true;
            sink.changed.notify_all();
        });
        let mut tracer = Self { child, shared };
        let deadline = Instant::now() + TRACER_READY_TIMEOUT;
        let mut log = lock(&tracer.shared.log);
        while !log.ready && !log.stderr_closed && Instant::now() < deadline {
            log = tracer
                .shared
                .changed
                .wait_timeout(log, deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let (ready, stderr) = (log.ready, log.stderr.join("\n"));
        drop(log);
        if !ready {
            kill_child(&mut tracer.child);
            panic!(
                "{} trace --json did not print `{TRACER_READY_LINE}` within {TRACER_READY_TIMEOUT:?} \
                 (exit {:?}); stderr:\n{stderr}",
                bin.display(),
                tracer.child.try_wait().ok().flatten()
            );
        }
        tracer
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every event so far, in stdout order.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared.log).events.clone()
    }

    /// Events so far whose `netns` is `inode`, in stdout order.
    pub fn events_in_netns(&self, inode: u64) -> Vec<Value> {
        in_netns(&lock(&self.shared.log).events, inode)
    }

    /// Stdout lines that were not JSON objects.
    pub fn unparsed_lines(&self) -> Vec<String> {
        lock(&self.shared.log).unparsed.clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        lock(&self.shared.log).stderr.clone()
    }

    /// Waits until `done` holds for the events in namespace `inode` and
    /// returns them; panics after `timeout` with what was seen.
    pub fn wait_for_netns(
        &self,
        inode: u64,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.wait_for(what, timeout, |all| {
            let mine = in_netns(all, inode);
            done(&mine).then_some(mine)
        })
    }

    /// Waits until `check` returns `Some` for the events so far; panics after
    /// `timeout` with the tracer's stderr.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[Value]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut log = lock(&self.shared.log);
        loop {
            if let Some(found) = check(&log.events) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            log = self
                .shared
                .changed
                .wait_timeout(log, left.min(Duration::from_millis(100)))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        let events = log.events.len();
        let stderr = log.stderr.join("\n");
        drop(log);
        panic!(
            "timed out after {timeout:?} waiting for {what} ({events} events on the whole host); \
             tracer stderr:\n{stderr}"
        );
    }

    /// Stops the tracer with SIGTERM and returns its exit status (SIGKILL
    /// after [`STEP_TIMEOUT`], which then shows as a signal exit).
    pub fn stop(mut self) -> ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory preconditions; the pid is our unreaped
        // child, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(status) = wait_child(&mut self.child, STEP_TIMEOUT) {
            return status;
        }
        eprintln!("conn-tracer (pid {pid}) ignored SIGTERM for {STEP_TIMEOUT:?}: SIGKILL");
        let _ = self.child.kill();
        self.child.wait().expect("reap conn-tracer")
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

/// The cgroup v2 mount point, read from /proc/mounts (hybrid hosts mount it
/// at /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Inode of the cgroup v2 directory that `pid` belongs to: what the tracer
/// must report as `cgroup_id` for a socket that process owns.
pub fn cgroup_inode_of(pid: u32) -> u64 {
    let mount = cgroup2_mount().expect("no cgroup2 mount in /proc/mounts");
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/{pid}/cgroup: {text}"));
    let dir = mount.join(rel.trim_start_matches('/'));
    fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
        .ino()
}

/// A cgroup v2 directory `conn-tracer-test-...` at the root of the cgroup2
/// mount. Drop moves what is left in it to the parent and removes it.
pub struct Cgroup {
    path: PathBuf,
    parent: PathBuf,
    inode: u64,
}

impl Cgroup {
    pub fn new() -> Self {
        let parent = cgroup2_mount().expect("no cgroup2 mount in /proc/mounts");
        let path = parent.join(format!("conn-tracer-test-{}", unique_suffix()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let inode = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .ino();
        Self {
            path,
            parent,
            inode,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's inode, which is the cgroup id `bpf_get_current_cgroup_id` returns.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Moves the process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move pid {pid} into {}: {e}", procs.display()));
    }

    /// Pids in the cgroup now.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let parent_procs = self.parent.join("cgroup.procs");
        for pid in self.pids() {
            if let Err(e) = fs::write(&parent_procs, pid.to_string()) {
                eprintln!(
                    "warning: moving pid {pid} back to {}: {e}",
                    parent_procs.display()
                );
            }
        }
        // A process that just exited can keep the cgroup busy for a moment.
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("warning: rmdir {}: {e}", self.path.display());
                    return;
                }
            }
        }
    }
}

/// Events whose `netns` is `inode`.
pub fn in_netns(events: &[Value], inode: u64) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["netns"].as_u64() == Some(inode))
        .cloned()
        .collect()
}

/// The string field `key` of `ev`; panics, showing the event, if absent.
#[track_caller]
pub fn str_field<'a>(ev: &'a Value, key: &str) -> &'a str {
    ev[key]
        .as_str()
        .unwrap_or_else(|| panic!("event without string field `{key}`: {ev}"))
}

/// The unsigned integer field `key` of `ev`; panics, showing the event, if absent.
#[track_caller]
pub fn u64_field(ev: &Value, key: &str) -> u64 {
    ev[key]
        .as_u64()
        .unwrap_or_else(|| panic!("event without unsigned field `{key}`: {ev}"))
}

pub fn kind(ev: &Value) -> &str {
    str_field(ev, "kind")
}

pub fn cookie(ev: &Value) -> u64 {
    u64_field(ev, "cookie")
}

/// Distinct cookies among `events`.
pub fn cookies(events: &[Value]) -> BTreeSet<u64> {
    events.iter().map(cookie).collect()
}

/// The one cookie of the events matching `pred`, `None` if none match;
/// panics if several sockets match.
#[track_caller]
pub fn find_cookie(events: &[Value], pred: impl Fn(&Value) -> bool) -> Option<u64> {
    let found: BTreeSet<u64> = events.iter().filter(|e| pred(e)).map(cookie).collect();
    assert!(
        found.len() <= 1,
        "several sockets ({found:?}) match where one was expected:\n{}",
        dump(events)
    );
    found.into_iter().next()
}

/// The events of socket `cookie`, ordered by `ts_ns` (stable for ties).
pub fn socket_events(events: &[Value], cookie_: u64) -> Vec<Value> {
    let mut mine: Vec<Value> = events
        .iter()
        .filter(|e| cookie(e) == cookie_)
        .cloned()
        .collect();
    mine.sort_by_key(|e| u64_field(e, "ts_ns"));
    mine
}

/// The `(old_state, new_state)` pairs of the `state` events among `events`.
pub fn transitions(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| kind(e) == "state")
        .map(|e| {
            (
                str_field(e, "old_state").to_owned(),
                str_field(e, "new_state").to_owned(),
            )
        })
        .collect()
}

/// `pairs` as owned strings, to compare with [`transitions`].
pub fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// True when the socket has a `state` event into CLOSE.
pub fn has_closed(events: &[Value], cookie_: u64) -> bool {
    events
        .iter()
        .any(|e| cookie(e) == cookie_ && kind(e) == "state" && e["new_state"] == "CLOSE")
}

/// One JSON event per line, for failure messages.
pub fn dump(events: &[Value]) -> String {
    events.iter().fold(String::new(), |mut s, e| {
        let _ = writeln!(s, "  {e}");
        s
    })
}

/// The process that must be reported as a socket's owner.
#[derive(Clone, Debug)]
pub struct ExpectedOwner {
    /// `known` or `inherited`.
    pub owner: &'static str,
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
}

impl ExpectedOwner {
    /// A single-threaded process run by this (test) user, in cgroup `cgroup_id`.
    pub fn process(owner: &'static str, pid: u32, comm: &str, cgroup_id: u64) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            owner,
            pid,
            comm: comm.to_owned(),
            uid,
            gid,
            cgroup_id,
        }
    }
}

/// Asserts that every event of `events` names `exp` as its owner; the
/// owner's only thread made the call, so `tid` is `pid`.
#[track_caller]
pub fn assert_owner(events: &[Value], exp: &ExpectedOwner, label: &str) {
    for ev in events {
        let got = (
            str_field(ev, "owner"),
            u64_field(ev, "pid"),
            u64_field(ev, "tid"),
            str_field(ev, "comm"),
            u64_field(ev, "uid"),
            u64_field(ev, "gid"),
            u64_field(ev, "cgroup_id"),
        );
        let want = (
            exp.owner,
            u64::from(exp.pid),
            u64::from(exp.pid),
            exp.comm.as_str(),
            u64::from(exp.uid),
            u64::from(exp.gid),
            exp.cgroup_id,
        );
        assert_eq!(
            got,
            want,
            "{label}: (owner, pid, tid, comm, uid, gid, cgroup_id) of event {ev}\nall events of the socket:\n{}",
            dump(events)
        );
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
    use super::*;

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
