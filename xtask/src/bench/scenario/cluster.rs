//! Cluster index (section 2c): the daemon's memory with the Service and
//! EndpointSlice index of a simulated cluster (by default 150,000 pods on
//! 5,000 nodes behind 10,000 Services), served in real format by the fake
//! apiserver (`ct-fake-kube`) and read by the daemon's own kube-rs watches,
//! next to the same daemon watching an empty cluster.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use loadgen::metrics::sum;
use serde::Serialize;

use super::memory::mib;
use crate::bench::{
    Args, Ctx,
    procs::{
        self,
        tracer::{Config, Tracer},
    },
};

/// The DaemonSet's memory limit (deploy/kubernetes/daemonset.yaml).
pub const LIMIT_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub pods: usize,
    pub nodes: usize,
    pub services: usize,
    pub slices: usize,
    pub endpoints: usize,
    /// Pods of the daemon's node (served as Pod objects).
    pub node_pods: usize,
    /// JSON sizes of the full lists, as the watches read them at start.
    pub service_list_bytes: u64,
    pub slice_list_bytes: u64,
    /// What the daemon indexed (`conntracer_kube_index_entries`).
    pub indexed_endpoints: u64,
    pub indexed_service_ports: u64,
    /// From the daemon's start to the last endpoint indexed.
    pub sync_seconds: f64,
    /// The daemon watching an empty cluster.
    pub empty_rss_bytes: u64,
    pub rss_bytes: u64,
    /// Peak RSS (the initial lists included).
    pub hwm_bytes: u64,
    /// Peak RSS after every watch was cut and its history expired, so that
    /// both lists were read again beside the index (a relist).
    pub relist_hwm_bytes: u64,
    /// Endpoints indexed after the relist.
    pub relist_endpoints: u64,
    /// (RSS - empty RSS) / endpoints: the index, the watchers and the
    /// allocator's share, per endpoint.
    pub bytes_per_endpoint: f64,
    pub limit_bytes: u64,
}

/// A running `ct-fake-kube`; stops when dropped (its stdin closes).
struct Fake {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    url: String,
    objects: Vec<usize>,
    bytes: Vec<u64>,
}

impl Fake {
    fn start(ctx: &Ctx, pods: usize, services: usize, nodes: usize) -> Result<Self> {
        let mut cmd = Command::new(&ctx.fake_kube);
        cmd.args(["--pods", &pods.to_string()])
            .args(["--services", &services.to_string()])
            .args(["--nodes", &nodes.to_string()])
            .args(["--node", NODE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", ctx.fake_kube.display()))?;
        let stdout = child.stdout.take().context("fake stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut fake = Self {
            stdin: child.stdin.take(),
            lines: rx,
            child,
            url: String::new(),
            objects: Vec::new(),
            bytes: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_mins(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = fake
                .lines
                .recv_timeout(left)
                .context("ct-fake-kube not ready within 5 min")?;
            let mut words = line.split_whitespace();
            let numbers = |w: std::str::SplitWhitespace<'_>| -> Vec<u64> {
                w.filter_map(|n| n.parse().ok()).collect()
            };
            match words.next() {
                Some("url") => words.next().unwrap_or_default().clone_into(&mut fake.url),
                Some("objects") => {
                    fake.objects = numbers(words).into_iter().map(|n| n as usize).collect();
                }
                Some("bytes") => fake.bytes = numbers(words),
                Some("ready") => break,
                _ => {}
            }
        }
        if fake.url.is_empty() || fake.objects.len() != 4 || fake.bytes.len() != 2 {
            bail!("ct-fake-kube printed no url/objects/bytes lines");
        }
        Ok(fake)
    }
}

impl Fake {
    /// Makes every client list again (`relist` on its stdin).
    fn relist(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("fake stdin")?;
        writeln!(stdin, "relist")?;
        stdin.flush()?;
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .context("ct-fake-kube did not answer relist")?;
            if line == "relisted" {
                return Ok(());
            }
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node the daemon under test is.
const NODE: &str = "node-00000";

/// Starts the daemon against `fake` and waits until it indexed
/// `endpoints` endpoints (bounded): (tracer, its pid, seconds taken).
fn daemon_on(ctx: &mut Ctx, fake: &Fake, endpoints: usize) -> Result<(Tracer, u32, f64)> {
    let extra = ["--kube-api", &fake.url, "--node-name", NODE].map(String::from);
    let started = Instant::now();
    let mut tracer = Tracer::start(ctx, Config::ConnTracer, &extra)?;
    let pid = tracer.pid().context("no daemon pid")?;
    let deadline = Instant::now() + Duration::from_mins(5);
    loop {
        let text = tracer.drained_metrics()?.unwrap_or_default();
        let indexed = sum(
            &text,
            "conntracer_kube_index_entries",
            &["kind=\"endpoints\""],
        );
        let pods = sum(&text, "conntracer_kube_pods", &[]);
        if indexed >= endpoints as f64
            && pods >= fake.objects[3] as f64
            && text.contains("kube_index")
        {
            return Ok((tracer, pid, started.elapsed().as_secs_f64()));
        }
        if Instant::now() > deadline {
            bail!("the daemon indexed {indexed} of {endpoints} endpoints within 5 min");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// 2c. The daemon's memory with a large cluster's Services and endpoints.
pub fn cluster(ctx: &mut Ctx, args: &Args) -> Result<Cluster> {
    let (pods, services, nodes) = (args.cluster_pods, args.cluster_services, args.cluster_nodes);
    println!("== cluster: {pods} pods on {nodes} nodes behind {services} Services (fake API)");
    let empty = Fake::start(ctx, 0, 0, nodes)?;
    let (tracer, pid, _) = daemon_on(ctx, &empty, 0)?;
    // Let the watches settle.
    thread::sleep(Duration::from_secs(2));
    let empty_rss_bytes = procs::status_bytes(pid, "VmRSS")?;
    tracer.stop()?;
    drop(empty);

    let mut fake = Fake::start(ctx, pods, services, nodes)?;
    let endpoints = fake.objects[2];
    let (mut tracer, pid, sync_seconds) = daemon_on(ctx, &fake, endpoints)?;
    thread::sleep(Duration::from_secs(2));
    let text = tracer.drained_metrics()?.unwrap_or_default();
    let rss_bytes = procs::status_bytes(pid, "VmRSS")?;
    let hwm_bytes = procs::status_bytes(pid, "VmHWM")?;
    // A relist: the watches read both lists again while the index stands.
    fake.relist()?;
    let errors = |t: &str| sum(t, "conntracer_kube_errors_total", &[]);
    let errors_before = errors(&text);
    let deadline = Instant::now() + Duration::from_mins(2);
    let mut after = text.clone();
    while Instant::now() < deadline && errors(&after) <= errors_before {
        thread::sleep(Duration::from_millis(200));
        after = tracer.drained_metrics()?.unwrap_or_default();
    }
    // The relisted lists take about as long as the first ones.
    thread::sleep(Duration::from_secs_f64(sync_seconds.mul_add(2.0, 3.0)));
    let after = tracer.drained_metrics()?.unwrap_or_default();
    let relist_hwm_bytes = procs::status_bytes(pid, "VmHWM")?;
    tracer.stop()?;
    let c = Cluster {
        pods,
        nodes,
        services: fake.objects[0],
        slices: fake.objects[1],
        endpoints,
        node_pods: fake.objects[3],
        service_list_bytes: fake.bytes[0],
        slice_list_bytes: fake.bytes[1],
        indexed_endpoints: sum(
            &text,
            "conntracer_kube_index_entries",
            &["kind=\"endpoints\""],
        ) as u64,
        indexed_service_ports: sum(
            &text,
            "conntracer_kube_index_entries",
            &["kind=\"service_ports\""],
        ) as u64,
        sync_seconds,
        empty_rss_bytes,
        rss_bytes,
        hwm_bytes,
        relist_hwm_bytes,
        relist_endpoints: sum(
            &after,
            "conntracer_kube_index_entries",
            &["kind=\"endpoints\""],
        ) as u64,
        bytes_per_endpoint: rss_bytes.saturating_sub(empty_rss_bytes) as f64
            / endpoints.max(1) as f64,
        limit_bytes: LIMIT_BYTES,
    };
    println!(
        "  {} endpoints indexed in {:.1} s: RSS {:.1} MiB, peak {:.1} MiB ({:.1} through a \
         relist), {:.0} bytes per endpoint",
        c.indexed_endpoints,
        c.sync_seconds,
        mib(c.rss_bytes),
        mib(c.hwm_bytes),
        mib(c.relist_hwm_bytes),
        c.bytes_per_endpoint,
    );
    Ok(c)
}
