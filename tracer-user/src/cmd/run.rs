//! `conn-tracer run`: the daemon. Wires the stages: kernel events ->
//! [`State`] (owner, track, metrics) -> the HTTP server, with a periodic
//! resync against the kernel's live sockets.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::Config,
    event::clock::{WallClock, monotonic_ns},
    kernel::{Kernel, KernelOptions, ring::EventRing},
    metrics::State,
    owner::attribute::Attributor,
    serve::{self, Shared},
    sys::caps,
};

/// Pause after each drain of the event ring. The kernel wakes a reader that
/// has caught up with an inter-processor interrupt (a VM exit on virtual
/// machines) in the connection's own path; under load that happened for
/// nearly every event. The pause bounds it to ~1/DRAIN_PAUSE per second;
/// the default 4 MiB ring holds far more than this long of events at any
/// connection rate a node sees, and a scrape drains the ring first.
const DRAIN_PAUSE: Duration = Duration::from_millis(5);

/// Loading parses the kernel's BTF (several MiB, twice) and frees it again;
/// give those pages back to the system rather than keep them in the heap
/// for the daemon's lifetime.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let opts = KernelOptions {
        btf_path: cfg.btf.clone(),
        ring_bytes: cfg.ring_bytes,
        verbose: false,
        sockopts: cfg.trace_sockopts,
        capture_ports: (cfg.outbound_capture_port, cfg.inbound_capture_port),
    };
    let mut kernel = Kernel::load(&opts).context("cannot start the tracer")?;
    caps::warn_gaps();
    let (mut ring, mut log) = super::streams(&mut kernel)?;
    let attr = Attributor::from_config(&cfg);
    let mut state = State::new(&cfg, attr)?;
    let started = monotonic_ns();
    let snap = kernel.snapshot();
    state
        .metrics
        .decode_errors
        .inc_by(kernel.take_decode_errors());
    match snap {
        Ok(snap) => {
            state.resync(&snap, started);
            log::info!("{} connections open at start", state.tracker.table.len());
        }
        Err(e) => log::warn!("no start-up snapshot of open connections: {e}"),
    }
    release_startup_memory();
    let (catch_up, mut catch_up_rx) = mpsc::channel(16);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        kernel: Mutex::new(kernel),
        healthy: AtomicBool::new(true),
        clock: WallClock::now(),
        catch_up,
    });

    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    log::info!(
        "conn-tracer: serving /metrics, /healthz and /connections on http://{} (idle threshold {})",
        listener.local_addr()?,
        humantime::format_duration(cfg.idle_threshold)
    );
    let server = tokio::spawn(serve::serve(listener, Arc::clone(&shared)));

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut decode_errors = 0u64;
    let mut resync = tokio::time::interval(cfg.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await; // the first tick is now: the start-up resync did it
    // After each drain the ring rests for DRAIN_PAUSE (see there); a scrape
    // drains it at once, so that /metrics counts every event before it.
    let mut resume: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = resync.tick() => {
                // Apply what the kernel already reported first, so that the
                // snapshot is compared with an up-to-date table.
                drain(ring.get_mut(), &shared.state, &mut decode_errors);
                let started = monotonic_ns();
                let snap = shared.snapshot();
                let mut state = shared.state.lock().expect("state lock");
                match snap {
                    Ok(snap) => state.resync(&snap, started),
                    Err(e) => log::warn!("periodic resync skipped: {e}"),
                }
                state.forget_deleted_pods(std::time::Instant::now());
            }
            drained = ring.when_ready(|r| drain(r, &shared.state, &mut decode_errors)),
                if resume.is_none() =>
            {
                drained?;
                resume = Some(tokio::time::Instant::now() + DRAIN_PAUSE);
            }
            () = tokio::time::sleep_until(resume.unwrap_or_else(tokio::time::Instant::now)),
                if resume.is_some() =>
            {
                resume = None;
            }
            Some(done) = catch_up_rx.recv() => {
                drain(ring.get_mut(), &shared.state, &mut decode_errors);
                let _ = done.send(());
            }
            flushed = log.flush_when_ready() => flushed?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    shared.healthy.store(false, Ordering::SeqCst);
    server.abort();
    log::info!("conn-tracer: stopping; detaching kernel programs");
    Ok(())
}

/// Applies every event waiting in the ring, under one lock of the state.
fn drain(ring: &mut EventRing, state: &Mutex<State>, decode_errors: &mut u64) {
    let mut st = state.lock().expect("state lock");
    ring.drain(|ev| match ev {
        Ok(ev) => st.handle(&ev),
        Err(e) => {
            *decode_errors += 1;
            st.metrics.decode_errors.inc();
            if *decode_errors <= 10 || decode_errors.is_multiple_of(1000) {
                log::warn!(
                    "skipping undecodable kernel event: {e} ({decode_errors} so far, \
                         conntracer_decode_errors_total)"
                );
            }
        }
    });
}
