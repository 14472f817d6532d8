//! Detection latency: opens connections, lets them go idle for longer than
//! the daemon's idle threshold, then ends them one at a time from the server
//! side (a FIN to an idle client: an idle kill by the peer, as a server's
//! `wait_timeout` does it). The client closes as soon as it reads the EOF,
//! as a pooled client does. Each sample is the time from the server's
//! `close()` to the first `/metrics` answer that counts the kill.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use loadgen::metrics::{Scraper, sum};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// The daemon's HTTP address (`--listen` of `conn-tracer run`).
    #[arg(long)]
    pub metrics: SocketAddr,
    /// Idle kills to time.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// How long the connections stay idle before the first kill, in
    /// milliseconds; must exceed the daemon's `--idle-threshold`.
    #[arg(long, default_value_t = 1500)]
    pub idle_ms: u64,
    /// Time between two kills, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub gap_ms: u64,
    /// Pause between two polls of /metrics, in microseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_us: u64,
    /// Give up on one sample after this long, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

const METRIC: &str = "conntracer_idle_kills_total";

pub fn run(args: &Args) -> Result<String> {
    anyhow::ensure!(
        (1..=1000).contains(&args.samples),
        "--samples must be 1-1000"
    );
    anyhow::ensure!(args.timeout_ms <= 60_000, "--timeout-ms must be <= 60000");
    loadgen::raise_nofile(64 + 2 * args.samples as u64)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind")?;
    let port = listener.local_addr()?.port();
    // Outbound peers are labelled ip:port: only our kills count.
    let peer = format!("peer=\"127.0.0.1:{port}\"");
    let mut servers = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).context("connect")?;
        let (server, _) = listener.accept().context("accept")?;
        servers.push(server);
        // The client closes as soon as the server's FIN arrives.
        thread::spawn(move || {
            let _ = client.read(&mut [0; 16]);
        });
    }
    let opened = Instant::now();
    let mut scraper = Scraper::new(args.metrics);
    let before = sum(&scraper.get()?, METRIC, &[&peer]);
    anyhow::ensure!(
        before == 0.0,
        "{METRIC}{{{peer}}} is already {before}: a stale daemon?"
    );
    thread::sleep(Duration::from_millis(args.idle_ms).saturating_sub(opened.elapsed()));

    let mut samples_ms = Vec::new();
    let mut missed = 0;
    let mut polls = 0_u64;
    let timeout = Duration::from_millis(args.timeout_ms);
    for server in servers {
        let base = sum(&scraper.get()?, METRIC, &[&peer]);
        let t0 = Instant::now();
        drop(server);
        loop {
            polls += 1;
            if sum(&scraper.get()?, METRIC, &[&peer]) > base {
                samples_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if t0.elapsed() > timeout {
                missed += 1;
                break;
            }
            thread::sleep(Duration::from_micros(args.poll_us));
        }
        thread::sleep(Duration::from_millis(args.gap_ms));
    }
    Ok(json!({
        "mode": "idle-kill",
        "samples_ms": samples_ms,
        "missed": missed,
        "polls": polls,
        "poll_us": args.poll_us,
        "idle_ms": args.idle_ms,
        "port": port,
    })
    .to_string())
}
