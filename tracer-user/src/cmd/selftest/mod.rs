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

mod collect;
mod lab;
mod report;
mod scenarios;
#[cfg(test)]
mod tests;

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

use serde::Serialize;
use tracer_common::{CloseData, EventInfo, close_flags, sockopt, tcp_state};

use self::{
    collect::{
        Collector, Drain, idle_bounds, idle_kill_counts, increments, on_off, owner_pid, seen,
        show_transitions, transitions, yes_no,
    },
    lab::{Lab, Pair, getsockopt_raw, setsockopt_int},
    report::{Check, Report, Seen},
    scenarios::{
        idle_peer_close, keepalive_sockopt, older_connection, owner_close, peer_reset,
        refused_connect, sockopt_answers, stale_reuse,
    },
};
use crate::{
    config::Config,
    event::{
        ConnEvent, EventData,
        clock::monotonic_ns,
        names::{errno_name, sockopt_name, state_name},
    },
    kernel::{Kernel, KernelOptions, ring::EventRing},
    metrics::State,
    owner::{attribute::Attributor, procfs},
    track::{
        self,
        classify::{self, Ending, KeepaliveView},
    },
};

/// Idle threshold of the selftest's own daemon state.
pub(crate) const THRESHOLD: Duration = Duration::from_secs(2);
/// Silence of the idle scenario: past the threshold by a margin that a slow
/// machine's scheduling cannot eat (the observed idle time is compared with
/// the silence measured here, not with this constant).
const SILENCE: Duration = Duration::from_secs(3);
/// Bound on each wait: an event, a socket step.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the scenario thread: the comm the kernel records as owner.
pub(crate) const LAB_COMM: &str = "ct-selftest";
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
    checks.extend(sockopt_answers(&mut ctx));

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
    Attributor::from_config(&daemon_config())
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
struct Ka(pub(super) KeepaliveView);

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
