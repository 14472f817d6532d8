//! `conn-tracer selftest`: proves, on the running kernel, that the real
//! kernel programs and the real classifier give the known answers.
//!
//! It loads the programs (verbose, so that state changes and resets come
//! too) in the host namespace and runs loopback scenarios in a network
//! namespace of its own: a dedicated thread unshares one (namespaces are per
//! thread), brings `lo` up and creates every scenario socket there. Only
//! events of that namespace count. They go through the daemon's own
//! [`State`] (idle threshold [`THRESHOLD`], no pod metadata) and the
//! classifier, and each fact is printed as expected vs observed:
//! - older-connection: a connection with keepalive, opened before the
//!   programs load, is found by the start-up snapshot with its keepalive and
//!   its owner from /proc, as the daemon's resync finds it;
//! - idle-peer-close: silent for longer than the threshold, then closed by
//!   the server: an idle kill by the peer's FIN, counted once;
//! - owner-close: the client closes right after the exchange: its own close;
//! - peer-reset: the server aborts (SO_LINGER 0): a reset by the peer;
//! - refused-connect: a connect to a closed port: SYN_SENT -> CLOSE on a
//!   received reset, with the connecting process as owner;
//! - keepalive-sockopt: keepalive options set by setsockopt arrive as
//!   events, and the close summary reads them back from the socket.
//!
//! Every wait is bounded by [`STEP_TIMEOUT`]; the run takes a few seconds,
//! most of them the idle scenario's silence.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tracer_common::{CloseData, EventInfo, close_flags, sockopt, tcp_state};

use crate::{
    cmd::run::State,
    config::Config,
    event::{
        ConnEvent, EventData, clock::monotonic_ns, comm_str, decode, errno_name, owner_kind,
        state_name,
    },
    kernel::{Kernel, KernelOptions},
    owner::attribute::{self as labels, Attributor, SidecarRules},
    track::classify::{self, Ending, KeepaliveView},
};

/// Idle threshold of the selftest's own daemon state.
pub const THRESHOLD: Duration = Duration::from_secs(2);
/// Silence of the idle scenario: past the threshold by a margin that a slow
/// machine's scheduling cannot eat (the observed idle time is compared with
/// the silence measured here, not with this constant).
const SILENCE: Duration = Duration::from_secs(3);
/// Bound on each wait: an event, a socket step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the scenario thread: the comm the kernel records as owner.
pub const LAB_COMM: &str = "ct-selftest";
/// Nothing listens on it in a fresh namespace.
const CLOSED_PORT: u16 = 9;

/// Keepalive of the connection opened before the programs load.
const OLDER_KA: KeepaliveSet = KeepaliveSet {
    idle_s: 11,
    interval_s: 5,
    probes: 2,
    user_timeout_ms: 0,
};
/// Keepalive set by the keepalive-sockopt scenario.
const SOCKOPT_KA: KeepaliveSet = KeepaliveSet {
    idle_s: 7,
    interval_s: 3,
    probes: 4,
    user_timeout_ms: 5000,
};

/// How to run.
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    /// Kernel BTF.
    pub btf_path: PathBuf,
    /// Print the report as JSON.
    pub json: bool,
}

/// One fact checked: what was expected and what the tracer reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub scenario: &'static str,
    pub check: String,
    pub expected: String,
    pub observed: String,
    pub ok: bool,
}

/// What was observed, or why nothing was.
pub type Seen<T> = Result<T, String>;

impl Check {
    /// `observed` must equal `expected`.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "expectations are small values written at the call"
    )]
    pub fn equal<T: PartialEq + fmt::Display>(
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
    pub fn within(
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
    pub fn line(&self) -> String {
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
pub struct Report {
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
    fn new(checks: Vec<Check>, error: Option<String>, elapsed: Duration, lost: u64) -> Self {
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
    pub fn exit_code(&self) -> u8 {
        match (&self.error, self.ok) {
            (Some(_), _) => 2,
            (None, true) => 0,
            (None, false) => 1,
        }
    }

    /// The closing line of the text output.
    pub fn summary(&self) -> String {
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

/// Runs the selftest, prints the report and returns the exit code.
pub fn run(opts: &SelftestOptions) -> u8 {
    let started = Instant::now();
    let (checks, error, lost) = match run_scenarios(opts) {
        Ok((checks, lost)) => (checks, None, lost),
        Err(e) => (Vec::new(), Some(e), 0),
    };
    let report = Report::new(checks, error, started.elapsed(), lost);
    // A closed stdout (`| head`) is no reason to fail differently.
    let mut out = io::stdout().lock();
    if opts.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                let _ = writeln!(out, "{text}");
            }
            Err(e) => eprintln!("conn-tracer selftest: {e}"),
        }
    } else {
        for c in &report.checks {
            let _ = writeln!(out, "{}", c.line());
        }
        if report.error.is_some() {
            eprintln!("{}", report.summary());
        } else {
            let _ = writeln!(out, "{}", report.summary());
        }
    }
    report.exit_code()
}

/// Runs every scenario: the checks, and the kernel's lost event count.
/// `Err` when the selftest cannot run at all.
fn run_scenarios(opts: &SelftestOptions) -> Result<(Vec<Check>, u64), String> {
    let lab = Lab::start()?;
    // Opened before the programs exist: the tracer can only find it later.
    let older = lab
        .run(|| -> io::Result<Pair> {
            let mut p = Pair::open()?;
            OLDER_KA.apply(&p.client)?;
            p.exchange()?;
            Ok(p)
        })
        .and_then(|r| r.map_err(|e| e.to_string()));

    let kernel_opts = KernelOptions {
        btf_path: opts.btf_path.clone(),
        verbose: true,
        ..KernelOptions::default()
    };
    let mut kernel =
        Kernel::load(&kernel_opts).map_err(|e| format!("the kernel programs do not load: {e}"))?;
    let ring = kernel
        .take_events()
        .map_err(|e| format!("no event ring buffer: {e}"))?;
    let lost_before = kernel.lost_total().unwrap_or(0);
    let (drain, rx) = Drain::start(ring, lab.netns)?;
    let state = State::new(&daemon_config(), attributor())
        .map_err(|e| format!("cannot set up the metrics: {e}"))?;
    let mut ctx = Ctx {
        lab: &lab,
        events: Collector {
            rx,
            seen: Vec::new(),
            state,
        },
        pid: std::process::id(),
        sockopt_task: kernel.shape.sockopt_task,
    };

    let mut checks = older_connection(&mut ctx, &mut kernel, older.as_ref());
    checks.extend(idle_peer_close(&mut ctx));
    checks.extend(owner_close(&mut ctx));
    checks.extend(peer_reset(&mut ctx));
    checks.extend(stale_reuse(&mut ctx));
    checks.extend(refused_connect(&mut ctx));
    checks.extend(keepalive_sockopt(&mut ctx));

    let lost = kernel.lost_total().unwrap_or(0).saturating_sub(lost_before);
    // Only now: its end must not count in the scenarios above.
    drop(older);
    drop(ctx);
    drop(drain);
    drop(lab);
    drop(kernel);
    Ok((checks, lost))
}

/// The daemon's settings, with the selftest's threshold and no pod watch.
fn daemon_config() -> Config {
    Config {
        idle_threshold: THRESHOLD,
        no_kube: true,
        ..Config::default()
    }
}

/// Attribution as `run --no-kube` does it: cgroup paths, no pod names.
fn attributor() -> Attributor {
    let cgroups = crate::sys::cgroup::cgroup2_mount()
        .ok()
        .flatten()
        .map(crate::owner::podid::CgroupPaths::new);
    Attributor::new(cgroups, None, SidecarRules::default())
}

/// What every scenario uses.
struct Ctx<'a> {
    lab: &'a Lab,
    events: Collector,
    pid: u32,
    /// Whether setsockopt events can name the task (5.11+); before, their
    /// owner is the caller's cgroup and uid only.
    sockopt_task: bool,
}

impl Ctx<'_> {
    /// Runs `f` on the scenario thread; a failed socket step is an error.
    fn in_lab<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<R> + Send + 'static,
    ) -> Seen<R> {
        self.lab
            .run(f)?
            .map_err(|e| format!("socket step failed: {e}"))
    }
}

/// Collects the checks of one scenario.
struct Checks {
    scenario: &'static str,
    list: Vec<Check>,
}

impl Checks {
    fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            list: Vec::new(),
        }
    }

    fn equal<T: PartialEq + fmt::Display>(&mut self, check: &str, expected: T, observed: Seen<T>) {
        self.list
            .push(Check::equal(self.scenario, check, expected, observed));
    }

    fn within(&mut self, check: &str, lo: Duration, hi: Duration, observed: Seen<Duration>) {
        self.list
            .push(Check::within(self.scenario, check, lo, hi, observed));
    }

    /// The scenario could not be set up: one failed check says why.
    fn setup_failed(mut self, why: &str) -> Vec<Check> {
        self.equal("setup", "sockets work", Err(why.to_string()));
        self.list
    }
}

/// Keepalive options to set on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeepaliveSet {
    idle_s: i32,
    interval_s: i32,
    probes: i32,
    /// 0: not set.
    user_timeout_ms: i32,
}

impl KeepaliveSet {
    /// (level, option, value) in the order they are set.
    fn options(self) -> Vec<(u32, u32, i32)> {
        let mut v = vec![
            (sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE, 1),
            (sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE, self.idle_s),
            (sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL, self.interval_s),
            (sockopt::SOL_TCP, sockopt::TCP_KEEPCNT, self.probes),
        ];
        if self.user_timeout_ms > 0 {
            v.push((
                sockopt::SOL_TCP,
                sockopt::TCP_USER_TIMEOUT,
                self.user_timeout_ms,
            ));
        }
        v
    }

    fn apply(self, s: &TcpStream) -> io::Result<()> {
        for (level, name, value) in self.options() {
            setsockopt_int(s.as_raw_fd(), level, name, value)?;
        }
        Ok(())
    }

    /// The settings as the tracer should read them from the socket.
    fn view(self) -> Ka {
        Ka(KeepaliveView {
            enabled: true,
            idle_s: f64::from(self.idle_s),
            interval_s: f64::from(self.interval_s),
            probes: self.probes as u8,
            user_timeout_ms: self.user_timeout_ms as u32,
            own_idle: true,
            own_interval: true,
            own_probes: true,
        })
    }
}

/// Keepalive settings, printed for people.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ka(KeepaliveView);

impl fmt::Display for Ka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ka = &self.0;
        if !ka.enabled {
            return write!(f, "off");
        }
        write!(
            f,
            "on, idle {}s, interval {}s, {} probes",
            ka.idle_s, ka.interval_s, ka.probes
        )?;
        if ka.user_timeout_ms > 0 {
            write!(f, ", user timeout {}ms", ka.user_timeout_ms)?;
        }
        match (ka.own_idle, ka.own_interval, ka.own_probes) {
            (true, true, true) => write!(f, " (the socket's own)"),
            (false, false, false) => write!(f, " (the namespace's sysctls)"),
            (idle, interval, probes) => write!(
                f,
                " (own idle {idle}, interval {interval}, probes {probes})"
            ),
        }
    }
}

fn setsockopt_int(fd: RawFd, level: u32, name: u32, value: i32) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level as i32,
            name as i32,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// SO_LINGER {on, 0}: close() then aborts with a reset.
fn linger_zero(s: &TcpStream) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd and a pointer to a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A loopback connection: the listener, the connecting (client) socket and
/// the accepted (server) socket.
struct Pair {
    /// Kept open with the connection: the daemon's resync tells accepted
    /// sockets by their listener.
    _listener: TcpListener,
    client: TcpStream,
    server: TcpStream,
    client_port: u16,
    server_port: u16,
}

impl Pair {
    fn open() -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let server_port = listener.local_addr()?.port();
        let client = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, server_port)),
            STEP_TIMEOUT,
        )?;
        let server = accept_within(&listener, STEP_TIMEOUT)?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(STEP_TIMEOUT))?;
            s.set_write_timeout(Some(STEP_TIMEOUT))?;
        }
        let client_port = client.local_addr()?.port();
        Ok(Self {
            _listener: listener,
            client,
            server,
            client_port,
            server_port,
        })
    }

    /// Client sends a line, server answers one. Returns CLOCK_MONOTONIC
    /// right before the server's answer and right after the client read it:
    /// the last payload either way is between the two.
    fn exchange(&mut self) -> io::Result<(u64, u64)> {
        let mut buf = [0u8; 5];
        self.client.write_all(b"ping\n")?;
        self.server.read_exact(&mut buf)?;
        let before = monotonic_ns();
        self.server.write_all(b"pong\n")?;
        self.client.read_exact(&mut buf)?;
        Ok((before, monotonic_ns()))
    }
}

impl Pair {
    /// The server closes (FIN), the client reads the end and closes.
    /// Returns CLOCK_MONOTONIC right before the server's close and right
    /// after the client saw it: the end is between the two.
    fn peer_closes(self) -> io::Result<(u64, u64)> {
        let Self {
            mut client, server, ..
        } = self;
        let before = monotonic_ns();
        drop(server);
        read_to_eof(&mut client)?;
        Ok((before, monotonic_ns()))
    }

    /// The client closes first, the server reads the end and closes:
    /// returns (client port, server port).
    fn owner_closes(self) -> io::Result<(u16, u16)> {
        let ports = (self.client_port, self.server_port);
        let Self {
            client, mut server, ..
        } = self;
        drop(client);
        read_to_eof(&mut server)?;
        Ok(ports)
    }

    /// The server aborts with a reset (SO_LINGER {on, 0}); the client reads.
    /// Returns the ports and the client's read error.
    fn peer_aborts(self) -> io::Result<((u16, u16), Option<i32>)> {
        let ports = (self.client_port, self.server_port);
        let Self {
            mut client, server, ..
        } = self;
        linger_zero(&server)?;
        drop(server);
        let read = client.read(&mut [0u8; 8]);
        Ok((ports, read.err().and_then(|e| e.raw_os_error())))
    }
}

impl Pair {
    /// The server's socket vanishes without a word (TCP_REPAIR, then close:
    /// no FIN, no RST, as when a NAT or a gone peer forgot the flow); after
    /// `silence` the client sends, the server's kernel answers the unknown
    /// segment with a reset, and the client's read fails. Returns the
    /// ports and that read's error.
    fn peer_vanishes_then_send(self, silence: Duration) -> io::Result<((u16, u16), Option<i32>)> {
        let ports = (self.client_port, self.server_port);
        let Self {
            mut client,
            server,
            _listener: listener,
            ..
        } = self;
        // TCP_REPAIR (include/uapi/linux/tcp.h); needs CAP_NET_ADMIN.
        set_int_opt(&server, libc::IPPROTO_TCP, 19, 1)?;
        drop(server);
        thread::sleep(silence);
        client.write_all(b"late\n")?;
        let read = client.read(&mut [0u8; 8]);
        drop(listener);
        Ok((ports, read.err().and_then(|e| e.raw_os_error())))
    }
}

fn set_int_opt(s: &TcpStream, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads until end of stream (the peer's FIN); bounded by the read timeout.
fn read_to_eof(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 64];
    loop {
        if s.read(&mut buf)? == 0 {
            return Ok(());
        }
    }
}

/// The thread that lives in the selftest's network namespace and creates
/// every scenario socket there, running jobs sent to it one at a time.
struct Lab {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// The namespace's inode, as events report it.
    netns: u32,
    /// The thread's comm, as the kernel records it.
    comm: String,
}

type Job = Box<dyn FnOnce() + Send>;

impl Lab {
    fn start() -> Result<Self, String> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name(LAB_COMM.to_string())
            .spawn(move || {
                let setup = enter_new_netns();
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup);
                if ok {
                    while let Ok(job) = job_rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|e| format!("cannot start the scenario thread: {e}"))?;
        match ready_rx.recv_timeout(STEP_TIMEOUT) {
            Ok(Ok((netns, comm))) => Ok(Self {
                jobs: Some(jobs),
                thread: Some(thread),
                netns,
                comm,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(format!(
                "the scenario thread did not set up its network namespace within {STEP_TIMEOUT:?}"
            )),
        }
    }

    /// Runs `f` on the lab thread and returns its result (bounded).
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Seen<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or("the scenario thread is gone")?;
        rx.recv_timeout(STEP_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => {
                format!("a socket step took longer than {STEP_TIMEOUT:?}")
            }
            RecvTimeoutError::Disconnected => "the scenario thread failed".to_string(),
        })
    }
}

impl Drop for Lab {
    /// Ends the thread (the namespace goes with it and its last socket).
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// unshare(CLONE_NEWNET) for this thread, `lo` up: (namespace inode, comm).
fn enter_new_netns() -> Result<(u32, String), String> {
    // SAFETY: unshare affects only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(format!(
            "cannot create a network namespace (unshare CLONE_NEWNET: {e}): selftest needs root \
             (CAP_SYS_ADMIN)"
        ));
    }
    loopback_up().map_err(|e| format!("cannot bring lo up in the new namespace: {e}"))?;
    let link = std::fs::read_link("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    let ino = crate::sys::netns::parse_ns_link(&link.to_string_lossy())
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| format!("/proc/thread-self/ns/net is {}", link.display()))?;
    let comm = std::fs::read_to_string("/proc/thread-self/comm")
        .map_or_else(|_| LAB_COMM.to_string(), |c| c.trim_end().to_string());
    Ok((ino, comm))
}

/// `ip link set lo up`, with SIOCGIFFLAGS / SIOCSIFFLAGS.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ioctls on a valid socket with a valid ifreq.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Drains the ring buffer on its own thread as fast as the kernel fills it
/// (the host's other connections share it), passing on the events of the
/// selftest's namespace.
struct Drain {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    decode_errors: Arc<AtomicU64>,
}

impl Drain {
    fn start(
        mut ring: RingBuf<MapData>,
        netns: u32,
    ) -> Result<(Self, Receiver<ConnEvent>), String> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let decode_errors = Arc::new(AtomicU64::new(0));
        let (stop2, errors2) = (Arc::clone(&stop), Arc::clone(&decode_errors));
        let thread = thread::Builder::new()
            .name("ct-selftest-rb".to_string())
            .spawn(move || {
                let fd = ring.as_raw_fd();
                while !stop2.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; a short timeout to see `stop`.
                    unsafe { libc::poll(&raw mut pfd, 1, 50) };
                    while let Some(item) = ring.next() {
                        match decode(&item) {
                            Ok(ev) if ours(&ev, netns) => {
                                if tx.send(ev).is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => {
                                errors2.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the event thread: {e}"))?;
        let drain = Self {
            stop,
            thread: Some(thread),
            decode_errors,
        };
        Ok((drain, rx))
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let bad = self.decode_errors.load(Ordering::Relaxed);
        if bad > 0 {
            log::warn!("{bad} undecodable kernel events during the selftest");
        }
    }
}

/// Whether an event belongs to the selftest: its namespace's, or a socket
/// option set on a socket the kernel had not yet tied to a namespace (the
/// scenario then matches it by ports).
fn ours(ev: &ConnEvent, netns: u32) -> bool {
    ev.info.netns == netns || (matches!(ev.data, EventData::Sockopt(_)) && ev.info.netns == 0)
}

/// The selftest namespace's events, applied to the daemon's state as they
/// arrive.
struct Collector {
    rx: Receiver<ConnEvent>,
    seen: Vec<ConnEvent>,
    state: State,
}

impl Collector {
    /// Waits (at most [`STEP_TIMEOUT`]) until `f` finds what it looks for in
    /// the events so far; `missing` says what did not come.
    fn wait<T>(&mut self, missing: &str, mut f: impl FnMut(&[ConnEvent]) -> Option<T>) -> Seen<T> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.take(ev);
            }
            if let Some(t) = f(&self.seen) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.take(ev),
                Err(_) => {
                    return f(&self.seen)
                        .ok_or_else(|| format!("{missing} within {}s", STEP_TIMEOUT.as_secs()));
                }
            }
        }
    }

    fn take(&mut self, ev: ConnEvent) {
        self.state.handle(&ev);
        self.seen.push(ev);
    }

    /// The cookie of the socket that opened with these ports.
    fn opened(&mut self, sport: u16, dport: u16) -> Seen<u64> {
        self.wait(
            &format!("no open event for 127.0.0.1:{sport} -> 127.0.0.1:{dport}"),
            |evs| find_open(evs, sport, dport),
        )
    }

    /// The CLOSE summary of a socket.
    fn closed(&mut self, cookie: Seen<u64>) -> Seen<(EventInfo, CloseData)> {
        let cookie = cookie?;
        self.wait("no close summary", |evs| find_close(evs, cookie))
    }

    fn hz(&mut self) -> crate::event::jiffies::Hz {
        self.state.hz.get()
    }
}

/// The cookie of the OPEN event with these ports.
pub fn find_open(events: &[ConnEvent], sport: u16, dport: u16) -> Option<u64> {
    events.iter().find_map(|e| {
        (matches!(e.data, EventData::Open(_))
            && e.info.sock.sport == sport
            && e.info.sock.dport == dport)
            .then_some(e.info.cookie)
    })
}

/// The CLOSE summary of socket `cookie`.
pub fn find_close(events: &[ConnEvent], cookie: u64) -> Option<(EventInfo, CloseData)> {
    events.iter().find_map(|e| match e.data {
        EventData::Close(c) if e.info.cookie == cookie => Some((e.info, c)),
        _ => None,
    })
}

/// The state transitions of socket `cookie`, in order.
pub fn transitions(events: &[ConnEvent], cookie: u64) -> Vec<(u8, u8)> {
    events
        .iter()
        .filter(|e| e.info.cookie == cookie)
        .filter_map(|e| match e.data {
            EventData::State { old, new } => Some((old, new)),
            _ => None,
        })
        .collect()
}

/// `A -> B, C -> D`.
fn show_transitions(t: &[(u8, u8)]) -> String {
    if t.is_empty() {
        return "none".to_string();
    }
    t.iter()
        .map(|&(o, n)| format!("{} -> {}", state_name(o), state_name(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An owner for people: pid and how it is known.
fn owner_pid(o: &tracer_common::Owner) -> String {
    format!("{} ({})", o.pid, owner_kind(o))
}

/// Idle kills counted so far per (direction, closed_by, close_kind,
/// keepalive), the labels a scenario determines.
fn idle_kill_counts(state: &State) -> BTreeMap<String, u64> {
    const KEYS: [&str; 4] = ["direction", "closed_by", "close_kind", "keepalive"];
    let mut out = BTreeMap::new();
    for family in prometheus::core::Collector::collect(&state.metrics.idle_kills) {
        for m in family.get_metric() {
            let mut labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .filter(|(k, _)| KEYS.contains(k))
                .collect();
            labels.sort_by_key(|(k, _)| KEYS.iter().position(|x| x == k));
            let key = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            *out.entry(key).or_default() += m.get_counter().get_value() as u64;
        }
    }
    out
}

/// What went up between two counts: `+N labels` per series, or `+0`.
pub fn increments(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let ups: Vec<String> = after
        .iter()
        .filter_map(|(k, &v)| {
            let was = before.get(k).copied().unwrap_or(0);
            (v > was).then(|| format!("+{} {k}", v - was))
        })
        .collect();
    if ups.is_empty() {
        "+0".to_string()
    } else {
        ups.join(", ")
    }
}

/// The idle time the kernel can report for a silence measured in userspace:
/// the last payload fell between `last_lo` and `last_hi`, the end between
/// `end_lo` and `end_hi` (CLOCK_MONOTONIC ns); stamps are in jiffies, so
/// a tick of rounding either way.
pub fn idle_bounds(
    (last_lo, last_hi): (u64, u64),
    (end_lo, end_hi): (u64, u64),
    hz: u32,
) -> (Duration, Duration) {
    let tick = 1_000_000_000 / u64::from(hz.max(1));
    let lo = end_lo.saturating_sub(last_hi).saturating_sub(2 * tick);
    let hi = end_hi.saturating_sub(last_lo) + 2 * tick;
    (Duration::from_nanos(lo), Duration::from_nanos(hi))
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// `f` of what was observed, or the same reason why nothing was.
fn seen<T, U>(r: &Seen<T>, f: impl FnOnce(&T) -> U) -> Seen<U> {
    r.as_ref().map(f).map_err(Clone::clone)
}

/// A socket's close summary, classified as the daemon does.
struct End {
    info: EventInfo,
    data: CloseData,
    ending: Ending,
}

impl Collector {
    fn end_of(&mut self, cookie: Seen<u64>) -> Seen<End> {
        let (info, data) = self.closed(cookie)?;
        let hz = self.hz();
        Ok(End {
            info,
            data,
            ending: classify::ending(&data, info.ts_ns, hz),
        })
    }
}

impl Checks {
    /// How the connection ended and whether that is an idle kill.
    fn end(&mut self, end: &Seen<End>, by: &'static str, kind: &'static str, kill: bool) {
        self.equal("closed_by", by, seen(end, |e| e.ending.closed_by.as_str()));
        self.equal(
            "close_kind",
            kind,
            seen(end, |e| e.ending.close_kind.as_str()),
        );
        self.equal(
            "idle kill",
            yes_no(kill),
            seen(end, |e| {
                yes_no(classify::verdict(&e.ending, THRESHOLD).idle_kill)
            }),
        );
    }

    /// The owner the kernel recorded at connect.
    fn owner(&mut self, end: &Seen<End>, pid: u32) {
        self.equal(
            "owner pid",
            format!("{pid} (known)"),
            seen(end, |e| owner_pid(&e.info.owner)),
        );
    }
}

/// A connection with keepalive, opened before the programs loaded: the
/// start-up snapshot finds it in the selftest's namespace, with keepalive
/// read from the socket and its owner found in /proc by the daemon's resync.
fn older_connection(
    ctx: &mut Ctx<'_>,
    kernel: &mut Kernel,
    older: Result<&Pair, &String>,
) -> Vec<Check> {
    let mut c = Checks::new("older-connection");
    let pair = match older {
        Ok(p) => p,
        Err(e) => return c.setup_failed(e),
    };
    let netns = ctx.lab.netns;
    let started = monotonic_ns();
    let snap = match kernel.snapshot() {
        Ok(s) => s,
        Err(e) => return c.setup_failed(&format!("no snapshot: {e}")),
    };
    let total = snap.len();
    let state = &mut ctx.events.state;
    for e in &snap {
        if let EventData::Snapshot(s) = e.data {
            state.hz.observe(s.jiffies, e.info.ts_ns);
        }
    }
    let mine: Vec<ConnEvent> = snap.into_iter().filter(|e| e.info.netns == netns).collect();
    // What the daemon does with its start-up snapshot.
    state.resync(&mine, started);
    let find = |sport: u16, dport: u16| -> Seen<ConnEvent> {
        let n = mine.len();
        mine.iter()
            .find(|e| e.info.sock.sport == sport && e.info.sock.dport == dport)
            .copied()
            .ok_or_else(|| {
                format!("not among the {total} sockets of the snapshot ({n} in netns {netns})")
            })
    };
    let client = find(pair.client_port, pair.server_port);
    let server = find(pair.server_port, pair.client_port);
    c.equal(
        "found by its ports",
        format!("ESTABLISHED in netns {netns}"),
        seen(&client, |e| {
            format!(
                "{} in netns {}",
                state_name(e.info.sock.state),
                e.info.netns
            )
        }),
    );
    let hz = state.hz.get();
    c.equal(
        "keepalive (socket)",
        OLDER_KA.view(),
        client.clone().and_then(|e| match e.data {
            EventData::Snapshot(s) => Ok(Ka(KeepaliveView::new(&s.ka, hz))),
            _ => Err("not a snapshot record".to_string()),
        }),
    );
    let tracked = |r: &Seen<ConnEvent>| -> Seen<tracer_common::Owner> {
        let cookie = r.as_ref().map_err(Clone::clone)?.info.cookie;
        state
            .table
            .get(cookie)
            .map(|t| t.info.owner)
            .ok_or_else(|| "not in the daemon's table after resync".to_string())
    };
    c.equal(
        "owner (from /proc)",
        format!("{} (proc)", ctx.pid),
        seen(&tracked(&client), owner_pid),
    );
    // Its listener is in the snapshot too: the daemon tells the accepted
    // socket by it.
    let ephemeral = labels::ephemeral_ports();
    c.equal(
        "accepted side direction",
        "inbound",
        seen(&tracked(&server), |o| {
            labels::direction(o, pair.server_port, &ephemeral).as_str()
        }),
    );
    c.list
}

/// Connect, exchange, silence past the threshold, the server closes: an
/// idle kill by the peer's FIN, counted once.
fn idle_peer_close(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("idle-peer-close");
    let before = idle_kill_counts(&ctx.events.state);
    let opened = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        let last = p.exchange()?;
        Ok((p, last))
    });
    let (pair, last) = match opened {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let (cport, sport) = (pair.client_port, pair.server_port);
    thread::sleep(SILENCE);
    let end_window = match ctx.in_lab(move || pair.peer_closes()) {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let client = ctx.events.opened(cport, sport);
    let server = ctx.events.opened(sport, cport);
    let end = ctx.events.end_of(client);
    // The server's end too: the counter below has then seen both ends.
    let _ = ctx.events.closed(server);
    c.owner(&end, ctx.pid);
    c.equal(
        "owner comm",
        ctx.lab.comm.clone(),
        seen(&end, |e| comm_str(&e.info.owner.comm)),
    );
    c.end(&end, "peer", "fin", true);
    let (lo, hi) = idle_bounds(last, end_window, ctx.events.hz().0);
    c.within(
        "idle at the end",
        lo.max(THRESHOLD),
        hi,
        seen(&end, |e| e.ending.idle_at_end)
            .and_then(|i| i.ok_or_else(|| "no idle time".to_string())),
    );
    c.equal(
        "keepalive",
        "off",
        seen(&end, |e| on_off(e.ending.keepalive)),
    );
    c.equal(
        "idle kills counted",
        "+1 direction=outbound closed_by=peer close_kind=fin keepalive=off".to_string(),
        Ok(increments(&before, &idle_kill_counts(&ctx.events.state))),
    );
    c.list
}

/// A send after the silence is answered by a reset (the peer forgot the
/// connection): a stale reuse, counted as an idle kill too.
fn stale_reuse(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("stale-reuse");
    let done = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        p.exchange()?;
        p.peer_vanishes_then_send(SILENCE)
    });
    let ((cport, sport), read_errno) = match done {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    c.equal(
        "client's read fails",
        "ECONNRESET",
        read_errno
            .map(|e| errno_name(e as u32))
            .ok_or_else(|| "no error".to_string()),
    );
    let cookie = ctx.events.opened(cport, sport);
    let end = ctx.events.end_of(cookie);
    c.owner(&end, ctx.pid);
    c.end(&end, "peer", "rst", true);
    c.equal(
        "stale reuse",
        "rst",
        seen(&end, |e| {
            classify::verdict(&e.ending, THRESHOLD)
                .stale_reuse
                .map_or("none", |o| o.as_str())
        }),
    );
    c.within(
        "silence before the send",
        SILENCE.saturating_sub(Duration::from_millis(20)),
        SILENCE + Duration::from_secs(2),
        seen(&end, |e| e.ending.silence_before_failed_send)
            .and_then(|i| i.ok_or_else(|| "no failed send".to_string())),
    );
    c.list
}

/// The client closes right after the exchange: its own close, no kill.
fn owner_close(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("owner-close");
    let ports = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        p.exchange()?;
        p.owner_closes()
    });
    let (cport, sport) = match ports {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let cookie = ctx.events.opened(cport, sport);
    let end = ctx.events.end_of(cookie);
    c.owner(&end, ctx.pid);
    c.end(&end, "local", "fin", false);
    c.list
}

/// The server aborts (SO_LINGER {on, 0}): a reset by the peer.
fn peer_reset(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("peer-reset");
    let done = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        p.exchange()?;
        p.peer_aborts()
    });
    let ((cport, sport), read_errno) = match done {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    c.equal(
        "client's read fails",
        "ECONNRESET",
        read_errno
            .map(|e| errno_name(e as u32))
            .ok_or_else(|| "no error".to_string()),
    );
    let cookie = ctx.events.opened(cport, sport);
    let end = ctx.events.end_of(cookie.clone());
    c.end(&end, "peer", "rst", false);
    let reset = cookie.and_then(|k| {
        ctx.events.wait("no tcp_receive_reset event", |evs| {
            evs.iter()
                .find(|e| e.info.cookie == k && e.data == EventData::ResetReceived)
                .map(|e| owner_pid(&e.info.owner))
        })
    });
    c.equal(
        "reset received, owner",
        format!("{} (known)", ctx.pid),
        reset,
    );
    c.equal(
        "reset flag at close",
        "yes",
        seen(&end, |e| {
            yes_no(e.data.flags & close_flags::RST_RECEIVED != 0)
        }),
    );
    c.equal(
        "error at close",
        "ECONNRESET",
        seen(&end, |e| errno_name(e.data.errno)),
    );
    c.list
}

/// A connect to a port nobody listens on: refused, SYN_SENT -> CLOSE on a
/// received reset, owned by this process.
fn refused_connect(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("refused-connect");
    let done = ctx.in_lab(|| {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, CLOSED_PORT));
        Ok(TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
            .err()
            .and_then(|e| e.raw_os_error()))
    });
    let errno = match done {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    c.equal(
        "connect fails",
        "ECONNREFUSED",
        errno
            .map(|e| errno_name(e as u32))
            .ok_or_else(|| "connected".to_string()),
    );
    // The only socket of the namespace that connects to the closed port.
    let socket = |evs: &[ConnEvent]| {
        evs.iter()
            .find(|e| e.info.sock.dport == CLOSED_PORT && e.info.cookie != 0)
            .map(|e| e.info.cookie)
    };
    let reset_owner = |evs: &[ConnEvent], k: u64| {
        evs.iter()
            .find(|e| e.info.cookie == k && e.data == EventData::ResetReceived)
            .map(|e| owner_pid(&e.info.owner))
    };
    // Everything there is to see, or as much as came within the bound.
    let _ = ctx.events.wait("", |evs| {
        let k = socket(evs)?;
        let closed = transitions(evs, k).contains(&(tcp_state::SYN_SENT, tcp_state::CLOSE));
        (closed && reset_owner(evs, k).is_some()).then_some(())
    });
    let evs = &ctx.events.seen;
    let cookie = socket(evs).ok_or_else(|| format!("no event for a connect to port {CLOSED_PORT}"));
    c.equal(
        "transitions",
        "CLOSE -> SYN_SENT, SYN_SENT -> CLOSE".to_string(),
        seen(&cookie, |&k| show_transitions(&transitions(evs, k))),
    );
    c.equal(
        "reset received, owner",
        format!("{} (known)", ctx.pid),
        cookie.clone().and_then(|k| {
            reset_owner(evs, k).ok_or_else(|| "no tcp_receive_reset event".to_string())
        }),
    );
    c.equal(
        "open/close summaries",
        0,
        seen(&cookie, |&k| {
            evs.iter()
                .filter(|e| {
                    e.info.cookie == k && matches!(e.data, EventData::Open(_) | EventData::Close(_))
                })
                .count()
        }),
    );
    c.list
}

/// Keepalive options set with setsockopt arrive as events with their
/// values and owner; the close summary reads the same settings from the
/// socket itself.
fn keepalive_sockopt(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("keepalive-sockopt");
    let ports = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        SOCKOPT_KA.apply(&p.client)?;
        p.exchange()?;
        p.owner_closes()
    });
    let (cport, sport) = match ports {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let cookie = ctx.events.opened(cport, sport);
    // By cookie; by ports where the kernel could not tell the socket's.
    let on_client = |e: &ConnEvent, k: u64| {
        e.info.cookie == k
            || (e.info.cookie == 0 && e.info.sock.sport == cport && e.info.sock.dport == sport)
    };
    // Where cgroup programs cannot name the task (before 5.11), the owner
    // is the cgroup and uid the connect of the same socket recorded.
    let connect_owner = cookie.clone().ok().and_then(|k| {
        ctx.events
            .seen
            .iter()
            .find(|e| e.info.cookie == k && matches!(e.data, EventData::Open(_)))
            .map(|e| e.info.owner)
    });
    let by = |o: &tracer_common::Owner, task: bool| {
        if task {
            format!("by pid {}", o.pid)
        } else {
            format!("by uid {} in cgroup {}", o.uid, o.cgroup_id)
        }
    };
    let task = ctx.sockopt_task;
    let expected_by = if task {
        format!("by pid {}", ctx.pid)
    } else {
        connect_owner.map_or_else(|| "by the connect's cgroup".into(), |o| by(&o, false))
    };
    for (level, name, value) in SOCKOPT_KA.options() {
        let option = crate::event::sockopt_name(level, name);
        let set = cookie.clone().and_then(|k| {
            ctx.events.wait(&format!("no {option} event"), |evs| {
                evs.iter().find_map(|e| match e.data {
                    EventData::Sockopt(o)
                        if on_client(e, k) && o.level == level && o.optname == name =>
                    {
                        Some(format!("{} {}", o.value, by(&e.info.owner, task)))
                    }
                    _ => None,
                })
            })
        });
        c.equal(
            &format!("sockopt {option}"),
            format!("{value} {expected_by}"),
            set,
        );
    }
    let end = ctx.events.end_of(cookie);
    let hz = ctx.events.hz();
    c.equal(
        "keepalive at close",
        SOCKOPT_KA.view(),
        seen(&end, |e| Ka(KeepaliveView::new(&e.data.ka, hz))),
    );
    c.end(&end, "local", "fin", false);
    c.list
}

#[cfg(test)]
mod tests {
    use tracer_common::{Keepalive, OpenData, owner_flags};

    use super::*;

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
                .map(|&(l, n, _)| crate::event::sockopt_name(l, n))
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
}
