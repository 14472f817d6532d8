//! The `conn-tracer run` daemon under test: start it, scrape it, stop it.
//!
//! Every daemon sees every network namespace on the host, so tests that
//! assert on its metrics take [`serial`] and compare metric deltas, with
//! scenario-unique peer labels (ports) where labels allow.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use crate::conn_tracer_bin;

/// Held by every test that reads daemon metrics: one such test at a time
/// in this process (a mutex) and on this machine (an exclusive `flock` on
/// [`SERIAL_LOCK`]), since every daemon sees every namespace, so that two
/// test binaries, or two checkouts' test runs, do not count each other's
/// connections.
pub struct Serial {
    _process: MutexGuard<'static, ()>,
    _machine: std::fs::File,
}

/// The machine-wide lock file of [`serial`].
pub const SERIAL_LOCK: &str = "/run/conn-tracer-tests.lock";

pub fn serial() -> Serial {
    static LOCK: Mutex<()> = Mutex::new(());
    let process = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SERIAL_LOCK)
        .unwrap_or_else(|e| panic!("cannot open {SERIAL_LOCK}: {e}"));
    // Bounded: a test holds the lock for at most a few minutes.
    let deadline = Instant::now() + Duration::from_mins(30);
    loop {
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{SERIAL_LOCK} held by another test run for 30 min"
        );
        thread::sleep(Duration::from_millis(200));
    }
    Serial {
        _process: process,
        _machine: file,
    }
}

/// A running `conn-tracer run`, stopped (SIGTERM, then SIGKILL) on drop.
/// Its stderr goes on to the test's stderr and is kept ([`Daemon::stderr`]).
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The capability set the DaemonSet grants (deploy/kubernetes/daemonset.yaml,
/// `securityContext.capabilities.add`, checked by deploy_files.rs), in
/// setpriv's spelling; the least-privilege tests run the daemon with exactly
/// these. Why each: deploy/README.md, "Privileges".
pub const DAEMONSET_CAPS: [&str; 3] = ["sys_admin", "sys_ptrace", "dac_read_search"];

impl Daemon {
    /// Starts the daemon with `--idle-threshold threshold` and extra args,
    /// and waits (bounded) until /healthz answers 200.
    pub fn start(threshold: &str, extra: &[&str]) -> Self {
        Self::spawn(Command::new(conn_tracer_bin()), threshold, extra)
            .unwrap_or_else(|stderr| panic!("conn-tracer run exited before healthy:\n{stderr}"))
    }

    /// Like [`Daemon::start`], reading pods, Services and EndpointSlices
    /// from `kube` as the node `kube.node()`, with `config` (TOML) as its
    /// config file.
    pub fn start_on(threshold: &str, kube: &crate::fake_kube::FakeKube, config: &str) -> Self {
        let file = std::env::temp_dir().join(format!("ct-config-{}.toml", crate::unique_suffix()));
        std::fs::write(&file, config).expect("write the daemon's config");
        let url = kube.url();
        let path = file.to_str().expect("utf-8 path");
        let args = [
            "--kube-api",
            &url,
            "--node-name",
            kube.node(),
            "--config",
            path,
        ];
        let daemon = Self::start(threshold, &args);
        let _ = std::fs::remove_file(&file);
        daemon
    }

    /// Like [`Daemon::start`], with the daemon's command line run by
    /// `wrapper` (e.g. `["unshare", "--cgroup"]`): `wrapper[0]` is spawned
    /// with the rest of `wrapper`, then the daemon's path and arguments. The
    /// wrapper must exec the daemon in place, so its pid is the daemon's.
    pub fn start_wrapped(wrapper: &[&str], threshold: &str, extra: &[&str]) -> Self {
        let cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(conn_tracer_bin());
                c
            }
            None => Command::new(conn_tracer_bin()),
        };
        Self::spawn(cmd, threshold, extra)
            .unwrap_or_else(|stderr| panic!("conn-tracer run exited before healthy:\n{stderr}"))
    }

    /// Starts the daemon as uid 0 with exactly the capabilities `caps`
    /// (setpriv names such as `sys_admin`) in its bounding, inheritable,
    /// permitted and effective sets, and `no_new_privs`: what a container
    /// with `runAsUser: 0`, `capabilities: {drop: [ALL], add: [...]}` and
    /// `allowPrivilegeEscalation: false` gets. `Err` holds its stderr if it
    /// exited before it was healthy.
    pub fn start_with_caps(caps: &[&str], threshold: &str, extra: &[&str]) -> Result<Self, String> {
        Self::spawn(setpriv_caps(caps), threshold, extra)
    }

    /// Like [`Daemon::start_with_caps`], as uid and gid `uid` (not root),
    /// the capabilities raised as ambient ones.
    pub fn start_as_user_with_caps(
        uid: u32,
        caps: &[&str],
        threshold: &str,
        extra: &[&str],
    ) -> Result<Self, String> {
        let mut cmd = Command::new("setpriv");
        let list = caps_list(caps);
        cmd.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--no-new-privs"])
            .arg(format!("--inh-caps={list}"))
            .arg(format!("--ambient-caps={list}"))
            .arg(format!("--bounding-set={list}"))
            .arg("--")
            .arg(conn_tracer_bin());
        Self::spawn(cmd, threshold, extra)
    }

    /// `cmd` is the daemon binary, or a wrapper whose last argument is it.
    fn spawn(mut cmd: Command, threshold: &str, extra: &[&str]) -> Result<Self, String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut child = cmd
            .args([
                "run",
                "--listen",
                &addr.to_string(),
                "--idle-threshold",
                threshold,
            ])
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .env(
                "RUST_LOG",
                std::env::var("CT_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn conn-tracer run");
        let stderr = crate::tee_stderr(&mut child, "");
        let mut daemon = Self {
            child,
            addr,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Ok((200, _)) = http_get(addr, "/healthz") {
                return Ok(daemon);
            }
            if !daemon.is_running() {
                // Let the reader catch the last lines.
                thread::sleep(Duration::from_millis(200));
                return Err(daemon.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "conn-tracer run did not become healthy in 60 s:\n{}",
                daemon.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the daemon wrote on stderr so far (its log).
    pub fn stderr(&self) -> String {
        crate::lock(&self.stderr).clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn scrape(&self) -> Metrics {
        Metrics::parse(&self.metrics_text())
    }

    /// The /metrics text as served.
    pub fn metrics_text(&self) -> String {
        let (status, body) = http_get(self.addr, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        body
    }

    pub fn connections(&self) -> serde_json::Value {
        let (status, body) = http_get(self.addr, "/connections").expect("GET /connections");
        assert_eq!(status, 200, "/connections answered {status}: {body}");
        serde_json::from_str(&body).expect("/connections is JSON")
    }

    /// Waits at most `timeout` until a connection from `local` is (`true`)
    /// or is no longer (`false`) in `/connections`; whether it came to be.
    pub fn wait_tracked(&self, local: &str, tracked: bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let now = find_local(&self.connections(), local).is_some() == tracked;
            if now || Instant::now() >= deadline {
                return now;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/findings`, parsed (a JSON array).
    pub fn findings(&self) -> Vec<serde_json::Value> {
        let (status, body) = http_get(self.addr, "/findings").expect("GET /findings");
        assert_eq!(status, 200, "/findings answered {status}: {body}");
        serde_json::from_str(&body).expect("/findings is a JSON array")
    }

    /// Scrapes until `pred` holds, at most `timeout`; returns the last scrape.
    pub fn wait_metrics(&self, timeout: Duration, pred: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.scrape();
            if pred(&m) || Instant::now() >= deadline {
                return m;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Scrapes until `name{labels}` has risen by `want` since `before` (at
    /// most 10 s), then once more `linger` later to catch any extra count:
    /// (the scrape that saw it, the last one).
    pub fn settle(
        &self,
        before: &Metrics,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        linger: Duration,
    ) -> (Metrics, Metrics) {
        let reached = self.wait_metrics(Duration::from_secs(10), |m| {
            delta(before, m, name, labels) >= want
        });
        thread::sleep(linger);
        (reached, self.scrape())
    }

    /// SIGTERM and wait; returns whether it exited 0.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    /// SIGTERM, then waits at most `timeout` for the exit: its status and
    /// how long it took, or `None` (and a SIGKILL) when it did not exit.
    pub fn stop_timed(mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        self.signal(libc::SIGTERM);
        let deadline = started + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, started.elapsed()));
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// SIGKILL (no chance to clean up) and reap.
    pub fn kill_hard(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, sig) };
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait (bounded; then SIGKILL); whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// `-all,+a,+b`: setpriv's capability list of exactly `caps`.
fn caps_list(caps: &[&str]) -> String {
    std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// `setpriv ... -- conn-tracer` that runs it as uid 0 with exactly `caps`:
/// as root, exec gives it permitted = effective = the bounding set.
fn setpriv_caps(caps: &[&str]) -> Command {
    let list = caps_list(caps);
    let mut cmd = Command::new("setpriv");
    cmd.arg("--no-new-privs")
        .arg(format!("--inh-caps={list}"))
        .arg(format!("--bounding-set={list}"))
        .arg("--")
        .arg(conn_tracer_bin());
    cmd
}

/// The capability sets of a running process, from `/proc/<pid>/status`:
/// (`CapPrm`, `CapEff`, `CapBnd`, `CapAmb`) as bit masks.
pub fn capabilities_of(pid: u32) -> (u64, u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (
        field("CapPrm:"),
        field("CapEff:"),
        field("CapBnd:"),
        field("CapAmb:"),
    )
}

/// The bit of a capability by setpriv name (`sys_admin`), from
/// linux/capability.h.
pub fn capability_bit(name: &str) -> u64 {
    let n = match name {
        "net_admin" => 12,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        "dac_override" => 1,
        "dac_read_search" => 2,
        other => panic!("capability {other} not in this table"),
    };
    1 << n
}

/// GET over HTTP/1.1 keep-alive; (status, body). The response is read by
/// its Content-Length and then *this* side closes first, as a scraper with
/// keep-alive does: a server-closed HTTP connection would itself show up
/// as an outbound connection closed by its peer in the metrics under test.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 65536];
    let (head_len, body_len) = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed early",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(pos) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..pos]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (pos + 4, len);
        }
    };
    while raw.len() < head_len + body_len {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    drop(s);
    let head = String::from_utf8_lossy(&raw[..head_len]).into_owned();
    let body = String::from_utf8_lossy(&raw[head_len..]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body))
}

/// Names of the contract's metrics that the tests count (README.md).
pub mod names {
    pub const KILLS: &str = "conntracer_idle_kills_total";
    pub const STALE: &str = "conntracer_stale_reuse_total";
    pub const IDLE_HIST: &str = "conntracer_idle_before_close_seconds";
    pub const CHAIN_KILLS: &str = "conntracer_sidecar_chain_kills_total";
    pub const MISMATCH: &str = "conntracer_sidecar_keepalive_mismatch";
    pub const LOST: &str = "conntracer_events_lost_total";
}

/// One Prometheus text exposition, parsed.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = value.parse().expect("sample value is a number");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Self { samples }
    }

    /// Sum of the samples of `name` whose labels include all of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).map(|(_, _, v)| v).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a (String, BTreeMap<String, String>, f64)> + 'a {
        self.samples.iter().filter(move |(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Whether a metric family has any sample or was declared.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// Asserts that `name{labels}` rose by exactly `want` since `before`;
    /// a failure shows `name`'s samples.
    #[track_caller]
    #[expect(clippy::float_cmp, reason = "counts are small integers, exact in f64")]
    pub fn assert_delta(&self, before: &Self, name: &str, labels: &[(&str, &str)], want: f64) {
        assert_eq!(
            delta(before, self, name, labels),
            want,
            "{}",
            self.dump(name)
        );
    }

    /// The sum of the one observation of histogram `name{labels}` since
    /// `before`, asserting that there was exactly one.
    #[track_caller]
    #[expect(clippy::float_cmp, reason = "counts are small integers, exact in f64")]
    pub fn sole_observation(&self, before: &Self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (count, sum) = self.histogram_delta(before, name, labels);
        assert_eq!(count, 1.0, "{}", self.dump(name));
        sum
    }

    /// (count, sum) of histogram `name`'s observations matching `labels`
    /// since `before`.
    pub fn histogram_delta(
        &self,
        before: &Self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> (f64, f64) {
        (
            delta(before, self, &format!("{name}_count"), labels),
            delta(before, self, &format!("{name}_sum"), labels),
        )
    }

    /// Every sample of `name` as text, for failure messages.
    pub fn dump(&self, name: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for (n, l, v) in self.samples.iter().filter(|(n, _, _)| n.starts_with(name)) {
            let _ = writeln!(out, "{n}{l:?} {v}");
        }
        out
    }
}

/// The entry of a `/connections` list whose local end is `local`.
pub fn find_local<'a>(list: &'a serde_json::Value, local: &str) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|c| c["local"] == local)
}

/// The entries of a `/connections` list in network namespace `netns` with
/// `addr` at either end (both sockets of loopback connections to it).
pub fn conns_at<'a>(
    list: &'a serde_json::Value,
    netns: u64,
    addr: &str,
) -> Vec<&'a serde_json::Value> {
    list.as_array()
        .expect("array")
        .iter()
        .filter(|c| c["netns"].as_u64() == Some(netns))
        .filter(|c| c["local"] == addr || c["remote"] == addr)
        .collect()
}

/// The entry of a `/connections` list from `local` to `remote`, if any.
pub fn find_between<'a>(
    list: &'a serde_json::Value,
    local: &str,
    remote: &str,
) -> Option<&'a serde_json::Value> {
    list.as_array()?
        .iter()
        .find(|c| c["local"] == local && c["remote"] == remote)
}

/// The entry of a `/connections` list from `local` to `remote`.
#[track_caller]
pub fn find_conn<'a>(
    list: &'a serde_json::Value,
    local: &str,
    remote: &str,
) -> &'a serde_json::Value {
    find_between(list, local, remote)
        .unwrap_or_else(|| panic!("{local} -> {remote} not in {list:#}"))
}

/// Asserts the owner kind (`known`, `inherited`, `proc`) and pid of a
/// `/connections` entry.
#[track_caller]
pub fn assert_owned(conn: &serde_json::Value, owner: &str, pid: u32) {
    assert_eq!(conn["owner"], owner, "{conn}");
    assert_eq!(conn["pid"].as_u64(), Some(u64::from(pid)), "{conn}");
}

/// `after - before` of the sum of `name`'s samples matching `labels`.
pub fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

/// Checks that a finding's inferred timeout is `want_s` within 5 % (the
/// findings issue's agreement) and that it names `killer`.
#[track_caller]
pub fn assert_inferred(finding: &serde_json::Value, want_s: f64, killer: &str) {
    let t = finding["inferred_timeout_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no timeout inferred: {finding:#}"));
    assert!(
        (t - want_s).abs() <= want_s * 0.05,
        "T {t} s, want {want_s} s within 5 %: {finding:#}"
    );
    assert_eq!(finding["likely_killer"], killer, "{finding:#}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::float_cmp, reason = "small integers are exact in f64")]
    fn parses_prometheus_text() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE x counter\nx{a=\"1\",b=\"q\\\"z\"} 3\nx{a=\"2\",b=\"\"} 4\ny 7.5\n",
        );
        assert_eq!(m.sum("x", &[]), 7.0);
        assert_eq!(m.sum("x", &[("a", "1")]), 3.0);
        assert_eq!(m.sum("x", &[("b", "q\"z")]), 3.0);
        assert_eq!(m.sum("x", &[("b", "")]), 4.0);
        assert_eq!(m.sum("y", &[]), 7.5);
        assert!(m.has("y") && !m.has("z"));
    }
}
