//! The load generator (`conn-loadgen`): one-shot runs that report JSON
//! (churn, idle kills), and `hold` processes that keep connections open.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::Proc;
use crate::{bench::Ctx, cmd::display};

/// What `conn-loadgen churn` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChurnOut {
    pub conn_per_s: f64,
    /// Connections during the measured seconds.
    pub connections: u64,
    /// Connections during the whole run, warm-up included.
    pub total_connections: u64,
    /// Seconds of the whole run, warm-up included.
    pub total_seconds: f64,
    pub errors: u64,
}

/// Runs the load generator to completion and returns its JSON report.
pub fn loadgen(ctx: &Ctx, args: &[String]) -> Result<Value> {
    let mut cmd = Command::new(&ctx.loadgen);
    cmd.args(args).stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("loadgen printed {last:?}"))
}

/// One churn run: as fast as it can, or paced at `rate` connections/s.
pub fn churn_once(
    ctx: &Ctx,
    concurrency: usize,
    seconds: f64,
    rate: Option<f64>,
) -> Result<ChurnOut> {
    let v = loadgen(
        ctx,
        &[
            "churn".into(),
            "--seconds".into(),
            seconds.to_string(),
            "--concurrency".into(),
            concurrency.to_string(),
            "--warmup".into(),
            "0.5".into(),
            "--rate".into(),
            rate.unwrap_or(0.0).to_string(),
        ],
    )?;
    let num = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("loadgen output has no {k}"))
    };
    Ok(ChurnOut {
        conn_per_s: num("conn_per_s")?,
        connections: num("connections")? as u64,
        total_connections: num("total_connections")? as u64,
        total_seconds: num("total_seconds")?,
        errors: num("errors")? as u64,
    })
}

/// `conn-loadgen hold` processes that keep their connections until
/// released. One process can hold as many sockets as its hard open-file
/// limit allows (raising that needs CAP_SYS_RESOURCE, which root may lack
/// in a container): more connections are spread over more processes.
pub struct Held {
    procs: Vec<Proc>,
    /// The client and server ports of the held connections.
    pub ports: Vec<u16>,
}

/// Loopback connections one `hold` process may keep (two fds each).
fn per_process() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    };
    let fds = usize::try_from(hard.min(400_000)).unwrap_or(1024);
    (fds.saturating_sub(256) / 2).max(100)
}

impl Held {
    pub fn open(ctx: &Ctx, connections: usize) -> Result<Self> {
        let mut held = Self {
            procs: Vec::new(),
            ports: Vec::new(),
        };
        let chunk = per_process();
        let mut left = connections;
        while left > 0 {
            let n = left.min(chunk);
            left -= n;
            let mut cmd = Command::new(&ctx.loadgen);
            cmd.args(["hold", "--connections", &n.to_string()])
                .args(["--max-seconds", "900"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let child = cmd
                .spawn()
                .with_context(|| format!("cannot start `{}`", display(&cmd)))?;
            let mut proc = Proc::new("conn-loadgen hold", child);
            let stdout = proc.child_mut().stdout.take().context("stdout")?;
            held.procs.push(proc);
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx
                .recv_timeout(Duration::from_mins(10))
                .context("conn-loadgen hold did not report within 10 minutes")?;
            let v: Value = serde_json::from_str(line.trim()).with_context(|| {
                format!("`{}` printed {line:?} (see its error above)", display(&cmd))
            })?;
            held.ports.extend(
                v["ports"]
                    .as_array()
                    .context("no ports")?
                    .iter()
                    .filter_map(|p| u16::try_from(p.as_u64()?).ok()),
            );
        }
        Ok(held)
    }

    /// Closes the connections (stdin EOF) and waits for the exits.
    pub fn release(mut self) -> Result<()> {
        for p in &mut self.procs {
            drop(p.child_mut().stdin.take());
        }
        for p in &mut self.procs {
            p.stop(libc::SIGTERM, Duration::from_mins(1))?;
        }
        Ok(())
    }
}
