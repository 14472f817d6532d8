//! The tracers under test: no tracer, conn-tracer and its peers, and
//! starting, reading and stopping each (conn-tracer through its /metrics,
//! the peers through their printed lines).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use loadgen::metrics::{Scraper, sum};
use serde::Serialize;

use super::{Proc, cpu_seconds};
use crate::{bench::Ctx, cmd::display};

/// The peer: a tcplife-style bpftrace script on the `sock:inet_sock_set_state`
/// tracepoint (kprobes do not work on every kernel): birth time on the first
/// state below FIN_WAIT1, owner on SYN_SENT/LAST_ACK, one printed line per
/// connection end (as conn-tracer sends one summary per end).
pub const BPFTRACE_SCRIPT: &str = r#"BEGIN { printf("ready\n"); }

tracepoint:sock:inet_sock_set_state
/args->protocol == 6/
{
  $sk = args->skaddr;
  if (args->newstate < 4 && @birth[$sk] == 0) {
    @birth[$sk] = nsecs;
  }
  if (args->newstate == 2 || args->newstate == 9) {
    @pid[$sk] = pid;
    @comm[$sk] = comm;
  }
  if (args->newstate == 7) {
    $b = @birth[$sk];
    if ($b != 0) {
      printf("end %d %s %d %d %d\n", @pid[$sk], @comm[$sk], args->sport, args->dport,
             (nsecs - $b) / 1000);
    }
    delete(@birth[$sk]);
    delete(@pid[$sk]);
    delete(@comm[$sk]);
  }
}

END { clear(@birth); clear(@pid); clear(@comm); }
"#;

/// The configurations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    #[default]
    NoTracer,
    ConnTracer,
    /// conn-tracer's programs attached but disarmed (`CONN_TRACER_DISARMED=1`:
    /// each returns at once): the floor, what these hooks cost any tracer
    /// before it does any work.
    HooksOnly,
    /// The tcplife-style bpftrace script ([`BPFTRACE_SCRIPT`]).
    Bpftrace,
    /// libbpf-tools `tcplife` (C, CO-RE): one hash map entry per socket,
    /// one event per connection end.
    Tcplife,
    /// libbpf-tools `tcpstates`: one event per state change.
    Tcpstates,
}

impl Config {
    pub const ALL: [Self; 6] = [
        Self::NoTracer,
        Self::ConnTracer,
        Self::HooksOnly,
        Self::Bpftrace,
        Self::Tcplife,
        Self::Tcpstates,
    ];
    /// The peers conn-tracer is held against.
    pub const PEERS: [Self; 3] = [Self::Bpftrace, Self::Tcplife, Self::Tcpstates];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoTracer => "no tracer",
            Self::ConnTracer => "conn-tracer",
            Self::HooksOnly => "hooks only (floor)",
            Self::Bpftrace => "bpftrace",
            Self::Tcplife => "tcplife",
            Self::Tcpstates => "tcpstates",
        }
    }

    /// How a libbpf-tools peer's header (the first line it prints) starts.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Self::Tcplife => Some("PID "),
            Self::Tcpstates => Some("SKADDR "),
            _ => None,
        }
    }

    /// Whether it is a peer that prints its events (counted from its output).
    pub fn is_peer(self) -> bool {
        Self::PEERS.contains(&self)
    }
}

/// The order of the configurations in round `round`: rotated, so that
/// each runs first, second and last equally often.
pub fn rotated<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let n = items.len();
    (0..n).map(|i| items[(i + round) % n]).collect()
}

/// A free loopback port (the kernel picks it; released before use).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A running tracer of one configuration.
pub struct Tracer {
    pub config: Config,
    proc: Option<Proc>,
    metrics: Option<Scraper>,
    /// A peer's stdout and stderr files.
    out: Option<(PathBuf, PathBuf)>,
}

impl Tracer {
    pub fn start(ctx: &mut Ctx, config: Config, extra: &[String]) -> Result<Self> {
        ctx.runs += 1;
        let mut t = Self {
            config,
            proc: None,
            metrics: None,
            out: None,
        };
        match config {
            Config::NoTracer => {}
            Config::ConnTracer | Config::HooksOnly => {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
                let log = ctx.work.join(format!("conn-tracer-{}.log", ctx.runs));
                let out = fs::File::create(&log)?;
                let mut cmd = Command::new(&ctx.tracer);
                cmd.args([
                    "run",
                    "--listen",
                    &addr.to_string(),
                    "--idle-threshold",
                    "1s",
                ])
                .args(extra);
                // Without pod metadata unless a run brings its own API.
                if !extra.iter().any(|a| a == "--kube-api") {
                    cmd.arg("--no-kube");
                }
                if config == Config::HooksOnly {
                    cmd.env("CONN_TRACER_DISARMED", "1");
                }
                cmd.stdin(Stdio::null())
                    .stdout(out.try_clone()?)
                    .stderr(out);
                let child = cmd
                    .spawn()
                    .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
                t.proc = Some(Proc::new("conn-tracer", child));
                let mut scraper = Scraper::new(addr);
                let deadline = Instant::now() + Duration::from_mins(1);
                loop {
                    if scraper.fetch("/healthz").is_ok() {
                        break;
                    }
                    if let Some(status) = t.proc.as_mut().and_then(Proc::exited) {
                        bail!(
                            "conn-tracer exited ({status}) before it was ready: see {}",
                            log.display()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!("conn-tracer not ready within 60 s: see {}", log.display());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                t.metrics = Some(scraper);
            }
            Config::Bpftrace | Config::Tcplife | Config::Tcpstates => {
                let out = ctx.work.join(format!("{}-{}.out", config.name(), ctx.runs));
                let err = ctx.work.join(format!("{}-{}.err", config.name(), ctx.runs));
                let mut cmd = if config == Config::Bpftrace {
                    let mut c = Command::new("bpftrace");
                    c.arg(&ctx.bpftrace_script);
                    c
                } else {
                    // Line-buffered, so that the header (printed once the
                    // programs are attached) shows when it is ready.
                    let mut c = Command::new("stdbuf");
                    c.args(["-oL", config.name()]);
                    c
                };
                cmd.stdin(Stdio::null())
                    .stdout(fs::File::create(&out)?)
                    .stderr(fs::File::create(&err)?);
                let child = cmd
                    .spawn()
                    .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
                t.proc = Some(Proc::new(config.name(), child));
                // bpftrace's BEGIN runs once every probe is attached; the
                // libbpf tools print their header after attaching.
                let ready = |text: &str| {
                    if config == Config::Bpftrace {
                        text.lines().any(|l| l == "ready")
                    } else {
                        let header = config.header().unwrap_or_default();
                        text.lines().next().is_some_and(|l| l.starts_with(header))
                    }
                };
                let deadline = Instant::now() + Duration::from_secs(90);
                while !ready(&fs::read_to_string(&out)?) {
                    if let Some(status) = t.proc.as_mut().and_then(Proc::exited) {
                        bail!(
                            "{} exited ({status}) before it was ready: see {}",
                            config.name(),
                            err.display()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!("{} not ready within 90 s", config.name());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                t.out = Some((out, err));
            }
        }
        Ok(t)
    }

    /// conn-tracer's /metrics address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(Scraper::addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn cpu(&self) -> Option<f64> {
        self.pid().and_then(|p| cpu_seconds(p).ok())
    }

    /// conn-tracer's metrics, once its event counts stopped moving (the
    /// ring drained).
    pub fn drained_metrics(&mut self) -> Result<Option<String>> {
        let Some(scraper) = self.metrics.as_mut() else {
            return Ok(None);
        };
        let mut last = scraper.get()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            thread::sleep(Duration::from_millis(150));
            let now = scraper.get()?;
            let events = |t: &str| sum(t, "conntracer_events_total", &[]) as u64;
            if events(&now) == events(&last) || Instant::now() > deadline {
                return Ok(Some(now));
            }
            last = now;
        }
    }

    /// (events, lost) so far; for bpftrace only after `stop`.
    pub fn counts(&mut self) -> Result<(Option<u64>, Option<u64>)> {
        Ok(match self.drained_metrics()? {
            Some(text) => (
                Some(sum(&text, "conntracer_events_total", &[]) as u64),
                Some(sum(&text, "conntracer_events_lost_total", &[]) as u64),
            ),
            None => (None, None),
        })
    }

    /// Stops the tracer; for a peer, returns its (events printed, lost).
    pub fn stop(mut self) -> Result<(Option<u64>, Option<u64>)> {
        let Some(mut proc) = self.proc.take() else {
            return Ok((None, None));
        };
        let signal = if self.config.is_peer() {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        proc.stop(signal, Duration::from_secs(20))?;
        match &self.out {
            Some((out, err)) => {
                let text = fs::read_to_string(out)?;
                let errors = fs::read_to_string(err).unwrap_or_default();
                let counts = if self.config == Config::Bpftrace {
                    bpftrace_counts(&text)
                } else {
                    libbpf_tool_counts(&text, &errors)
                };
                let _ = fs::remove_file(out);
                let _ = fs::remove_file(err);
                Ok((Some(counts.0), Some(counts.1)))
            }
            None => Ok((None, None)),
        }
    }
}

/// (connection ends printed, events bpftrace reported lost) in its output.
pub fn bpftrace_counts(text: &str) -> (u64, u64) {
    let ends = text.lines().filter(|l| l.starts_with("end ")).count() as u64;
    let lost = text
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("Lost ")?;
            rest.strip_suffix(" events")?.trim().parse::<u64>().ok()
        })
        .sum();
    (ends, lost)
}

/// (events printed, events reported lost) of a libbpf-tools peer: every
/// line after the header is one event; losses go to stderr as `lost N
/// events on CPU #C` (perf buffer) or `lost N events`.
pub fn libbpf_tool_counts(stdout: &str, stderr: &str) -> (u64, u64) {
    let events = stdout
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    let lost = stderr
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("lost ")?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    (events, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_every_configuration_in_every_position() {
        let n = Config::ALL.len();
        let rounds: Vec<Vec<Config>> = (0..n).map(|r| rotated(&Config::ALL, r)).collect();
        for pos in 0..n {
            let mut at: Vec<Config> = rounds.iter().map(|r| r[pos]).collect();
            at.sort_by_key(|c| c.name());
            at.dedup();
            assert_eq!(at.len(), n, "position {pos}: {rounds:?}");
        }
        assert_eq!(rotated(&Config::ALL, n), rotated(&Config::ALL, 0));
    }

    #[test]
    fn bpftrace_output_counts() {
        let text = "Attaching 3 probes...\nready\nend 12 curl 443 5555 120\n\
                    end 13 nginx 80 4444 3\nLost 17 events\nsomething else\nLost 3 events\n";
        assert_eq!(bpftrace_counts(text), (2, 20));
        assert_eq!(bpftrace_counts(""), (0, 0));
    }

    #[test]
    fn libbpf_tool_output_counts() {
        let out = "PID     COMM   LADDR  LPORT RADDR RPORT TX_KB RX_KB MS\n\
                   28877   curl   127.0.0.1 51100 127.0.0.1 1 0.00 0.00 0.07\n\
                   28878   py     127.0.0.1 48646 127.0.0.1 60015 0.00 0.00 0.11\n";
        let err = "lost 5 events on CPU #1\nsomething\nlost 2 events on CPU #0\n";
        assert_eq!(libbpf_tool_counts(out, err), (2, 7));
        assert_eq!(libbpf_tool_counts("", ""), (0, 0));
        assert!(out.starts_with(Config::Tcplife.header().unwrap()));
    }
}
