//! The tracers under test: the three configurations, and starting, reading
//! and stopping each (conn-tracer through its /metrics, bpftrace through its
//! printed lines).

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

/// The three configurations compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    #[default]
    NoTracer,
    ConnTracer,
    Bpftrace,
}

impl Config {
    pub const ALL: [Self; 3] = [Self::NoTracer, Self::ConnTracer, Self::Bpftrace];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoTracer => "no tracer",
            Self::ConnTracer => "conn-tracer",
            Self::Bpftrace => "bpftrace",
        }
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
    out: Option<PathBuf>,
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
            Config::ConnTracer => {
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
            Config::Bpftrace => {
                let out = ctx.work.join(format!("bpftrace-{}.out", ctx.runs));
                let mut cmd = Command::new("bpftrace");
                cmd.arg(&ctx.bpftrace_script)
                    .stdin(Stdio::null())
                    .stdout(fs::File::create(&out)?)
                    .stderr(fs::File::create(ctx.work.join("bpftrace.err"))?);
                let child = cmd
                    .spawn()
                    .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
                t.proc = Some(Proc::new("bpftrace", child));
                // BEGIN runs once every probe is attached.
                let deadline = Instant::now() + Duration::from_secs(90);
                while !fs::read_to_string(&out)?.lines().any(|l| l == "ready") {
                    if let Some(status) = t.proc.as_mut().and_then(Proc::exited) {
                        bail!(
                            "bpftrace exited ({status}) before it was ready: see {}",
                            ctx.work.join("bpftrace.err").display()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!("bpftrace not ready within 90 s");
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                t.out = Some(out);
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

    /// Stops the tracer; for bpftrace, returns its (ends printed, lost).
    pub fn stop(mut self) -> Result<(Option<u64>, Option<u64>)> {
        let Some(mut proc) = self.proc.take() else {
            return Ok((None, None));
        };
        let signal = if self.config == Config::Bpftrace {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        proc.stop(signal, Duration::from_secs(20))?;
        match &self.out {
            Some(out) => {
                let text = fs::read_to_string(out)?;
                let (ends, lost) = bpftrace_counts(&text);
                let _ = fs::remove_file(out);
                Ok((Some(ends), Some(lost)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_every_configuration_in_every_position() {
        let rounds: Vec<Vec<Config>> = (0..3).map(|r| rotated(&Config::ALL, r)).collect();
        for pos in 0..3 {
            let mut at: Vec<Config> = rounds.iter().map(|r| r[pos]).collect();
            at.sort_by_key(|c| c.name());
            at.dedup();
            assert_eq!(at.len(), 3, "position {pos}: {rounds:?}");
        }
        assert_eq!(rotated(&Config::ALL, 3), rotated(&Config::ALL, 0));
    }

    #[test]
    fn bpftrace_output_counts() {
        let text = "Attaching 3 probes...\nready\nend 12 curl 443 5555 120\n\
                    end 13 nginx 80 4444 3\nLost 17 events\nsomething else\nLost 3 events\n";
        assert_eq!(bpftrace_counts(text), (2, 20));
        assert_eq!(bpftrace_counts(""), (0, 0));
    }
}
