//! Connection churn: a client connects, sends `payload` bytes, reads them
//! back and closes; the server reads the request, echoes it, waits for the
//! client's FIN and closes. One connection is two sockets and about ten TCP
//! state changes. `concurrency` connections are in flight at any time.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub struct Args {
    /// Measured time, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Unmeasured time before it, in seconds.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// Connections in flight at any time (the load level).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Bytes sent and echoed per connection (1-1024).
    #[arg(long, default_value_t = 8)]
    pub payload: usize,
    /// `async`: the connections in flight share one event loop per core, so
    /// the cores stay busy; `threads`: a blocking client thread and a
    /// blocking server thread per connection in flight (wake-ups and idle
    /// CPUs dominate, and vary with the rest of the machine's load).
    #[arg(long, default_value = "async")]
    pub engine: String,
    /// Connections per second in all (async engine): each client starts
    /// its next connection on a fixed beat instead of at once (a paced,
    /// realistic rate rather than the most the machine can do). 0: as fast
    /// as it can.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

/// Listening ports the clients spread over: each destination has its own
/// ephemeral port range (28,232 ports by default) for the client sockets
/// that linger in TIME_WAIT.
const PORTS: usize = 8;

/// Completed connections, on its own cache line per client.
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

struct Shared {
    stop: AtomicBool,
    done: Vec<Counter>,
    errors: AtomicU64,
}

impl Shared {
    fn count(&self) -> u64 {
        self.done.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "connection counts stay far below 2^52"
)]
pub fn run(args: &Args) -> Result<String> {
    anyhow::ensure!(
        (1..=4096).contains(&args.concurrency),
        "--concurrency must be 1-4096"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.payload),
        "--payload must be 1-1024"
    );
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 3600.0 && (0.0..=60.0).contains(&args.warmup),
        "--seconds must be in (0, 3600] and --warmup in [0, 60]"
    );
    anyhow::ensure!(
        (0.0..=1e6).contains(&args.rate) && (args.rate == 0.0 || args.engine == "async"),
        "--rate must be 0-1000000 connections/s, with the async engine"
    );
    // Two sockets per connection in flight, plus the listeners.
    loadgen::raise_nofile(256 + 4 * args.concurrency as u64)?;
    let total = Duration::from_secs_f64(args.warmup + args.seconds);
    // A client stuck on a dead server would hang the bench: bound the run.
    let watchdog = total + Duration::from_secs(30);
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            thread::sleep(watchdog);
            eprintln!("conn-loadgen: churn did not finish within {watchdog:?}");
            std::process::exit(3);
        })?;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        done: (0..args.concurrency).map(|_| Counter::default()).collect(),
        errors: AtomicU64::new(0),
    });
    let start = Instant::now();
    let workers = match args.engine.as_str() {
        "async" => start_async(args, &shared)?,
        "threads" => start_threads(args, &shared)?,
        other => bail!("--engine {other}: use async or threads"),
    };
    thread::sleep(Duration::from_secs_f64(args.warmup));
    let (c0, t0) = (shared.count(), Instant::now());
    thread::sleep(Duration::from_secs_f64(args.seconds));
    let (c1, t1) = (shared.count(), Instant::now());
    shared.stop.store(true, Ordering::Relaxed);
    workers();
    let measured = (t1 - t0).as_secs_f64();
    let connections = c1 - c0;
    Ok(json!({
        "mode": "churn",
        "engine": args.engine,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "payload": args.payload,
        "seconds": measured,
        "connections": connections,
        "conn_per_s": connections as f64 / measured,
        "total_connections": shared.count(),
        "total_seconds": start.elapsed().as_secs_f64(),
        "errors": shared.errors.load(Ordering::Relaxed),
        "cpu_s": loadgen::cpu_seconds(),
    })
    .to_string())
}

/// Starts the workers; the returned closure waits for them after `stop`.
type Join = Box<dyn FnOnce()>;

fn listeners(n: usize) -> Result<Vec<TcpListener>> {
    (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind"))
        .collect()
}

fn start_async(args: &Args, shared: &Arc<Shared>) -> Result<Join> {
    // One single-threaded event loop per core, each with its own listeners
    // and clients: both ends of a connection live on one core, so no
    // connection waits for a wake-up on another CPU.
    let cores = thread::available_parallelism().map_or(2, usize::from);
    let mut loops = Vec::new();
    for core in 0..cores {
        let listeners = listeners(PORTS.div_ceil(cores))?;
        let mine: Vec<usize> = (core..args.concurrency).step_by(cores).collect();
        let shared = Arc::clone(shared);
        let payload = args.payload;
        // Each client's beat: `concurrency` clients share the rate.
        let beat = (args.rate > 0.0).then(|| {
            Duration::from_secs_f64(
                f64::from(u32::try_from(args.concurrency).unwrap_or(u32::MAX)) / args.rate,
            )
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        loops.push(thread::Builder::new().name(format!("churn-{core}")).spawn(
            move || -> Result<()> {
                rt.block_on(event_loop(listeners, mine, shared, payload, beat))
            },
        )?);
    }
    Ok(Box::new(move || {
        for l in loops {
            if let Ok(Err(e)) = l.join() {
                eprintln!("conn-loadgen: {e:#}");
            }
        }
    }))
}

async fn event_loop(
    listeners: Vec<TcpListener>,
    clients: Vec<usize>,
    shared: Arc<Shared>,
    payload: usize,
    beat: Option<Duration>,
) -> Result<()> {
    let mut ports = Vec::new();
    for l in listeners {
        ports.push(l.local_addr()?);
        l.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_async(s, payload));
            }
        });
    }
    let mut tasks = Vec::new();
    for (n, i) in clients.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let addr = ports[n % ports.len()];
        tasks.push(tokio::spawn(async move {
            let msg = vec![0x5a_u8; payload];
            let mut buf = vec![0_u8; payload];
            // Missed beats are made up (the timer has 1 ms granularity):
            // the average rate is the one asked for.
            let mut ticks = beat.map(|b| {
                // Clients start spread over one beat, not all at once.
                let phase = b.mul_f64((f64::from(u32::try_from(i).unwrap_or(0)) * 0.618_034) % 1.0);
                tokio::time::interval_at(tokio::time::Instant::now() + phase, b)
            });
            while !shared.stop.load(Ordering::Relaxed) {
                if let Some(t) = ticks.as_mut() {
                    t.tick().await;
                }
                let ok = async {
                    let mut s = tokio::net::TcpStream::connect(addr).await?;
                    s.write_all(&msg).await?;
                    s.read_exact(&mut buf).await?;
                    std::io::Result::Ok(())
                }
                .await;
                if ok.is_ok() {
                    shared.done[i].0.fetch_add(1, Ordering::Relaxed);
                } else {
                    // E.g. no ephemeral port free: back off rather than spin.
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn serve_async(mut s: tokio::net::TcpStream, payload: usize) {
    let mut buf = vec![0_u8; payload.max(64)];
    let _ = async {
        s.read_exact(&mut buf[..payload]).await?;
        s.write_all(&buf[..payload]).await?;
        // Wait for the client's close, so that the client closes first.
        while s.read(&mut buf).await? > 0 {}
        std::io::Result::Ok(())
    }
    .await;
}

fn start_threads(args: &Args, shared: &Arc<Shared>) -> Result<Join> {
    let mut ports = Vec::new();
    for listener in listeners(args.concurrency)? {
        ports.push(listener.local_addr()?);
        let payload = args.payload;
        thread::Builder::new()
            .name("churn-server".into())
            .spawn(move || serve(&listener, payload))?;
    }
    let mut clients = Vec::new();
    for (i, &addr) in ports.iter().enumerate() {
        let shared = Arc::clone(shared);
        let payload = args.payload;
        clients.push(
            thread::Builder::new()
                .name("churn-client".into())
                .spawn(move || client(addr, payload, &shared, i))?,
        );
    }
    Ok(Box::new(move || {
        for c in clients {
            let _ = c.join();
        }
    }))
}

fn client(addr: SocketAddr, payload: usize, shared: &Shared, i: usize) {
    let msg = vec![0x5a_u8; payload];
    let mut buf = vec![0_u8; payload];
    while !shared.stop.load(Ordering::Relaxed) {
        let ok = TcpStream::connect(addr).and_then(|mut s| {
            s.write_all(&msg)?;
            s.read_exact(&mut buf)
        });
        if ok.is_ok() {
            shared.done[i].0.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(1));
        }
    }
}

fn serve(listener: &TcpListener, payload: usize) {
    let mut buf = vec![0_u8; payload.max(64)];
    loop {
        let Ok((mut s, _)) = listener.accept() else {
            thread::sleep(Duration::from_millis(1));
            continue;
        };
        let _ = s.read_exact(&mut buf[..payload]).and_then(|()| {
            s.write_all(&buf[..payload])?;
            while s.read(&mut buf)? > 0 {}
            Ok(())
        });
    }
}
