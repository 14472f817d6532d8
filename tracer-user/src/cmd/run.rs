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
    event::clock::{WallClock, monotonic_ns, process_cpu_ns},
    kernel::{Kernel, KernelOptions, ring::EventRing},
    metrics::State,
    owner::attribute::Attributor,
    serve::{self, Shared},
    sys::caps,
};

/// How often the daemon drains the event ring. The kernel programs submit
/// records without waking the reader (a wake-up is irq_work: an
/// inter-processor interrupt, a VM exit on virtual machines, in the
/// connection's own path), so the daemon wakes on this beat, or early when
/// [`WAKE_FRACTION`] of the ring waits unread. Far below the 1 s detection
/// target; a scrape drains the ring first, so /metrics counts every event
/// before it.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// The kernel wakes the daemon early each time another 1/WAKE_FRACTION of
/// the ring fills unread: the first leaves 7/8 of the default 4 MiB ring
/// for the daemon to catch up, and a daemon that falls further behind is
/// woken again at most 7 times before the ring is full.
const WAKE_FRACTION: u32 = 8;

/// Freed heap memory back to the system: after loading (which parses the
/// kernel's BTF, several MiB, twice) and after each resync (a snapshot of
/// every socket, ~450 bytes each while it is compared with the table).
fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations from this size up get their own mapping, returned to the
/// system when freed. glibc's default raises the threshold to the largest
/// block freed so far (up to 32 MiB): after the start-up BTF buffers, the
/// connection table's old bucket arrays (each growth frees one, up to
/// ~10 MiB at 100k) and the resync snapshots stayed resident as heap holes:
/// ~10 MiB of RSS at 100k tracked, ~20 MiB after a resync.
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes the allocator's tuning.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// The least time between two looks at the sockets' payload for pool
/// evidence (each is a pass of the TCP iterator over every namespace).
const EVIDENCE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    fix_mmap_threshold();
    let opts = KernelOptions {
        btf_path: cfg.btf.clone(),
        ring_bytes: cfg.ring_bytes,
        verbose: false,
        sockopts: cfg.trace_sockopts,
        capture_ports: (cfg.outbound_capture_port, cfg.inbound_capture_port),
        // The ring's size is a power of two, so this is one too.
        wake_bytes: (cfg.ring_bytes / WAKE_FRACTION).max(1),
        skip_programs: cfg.skip_programs.clone(),
    };
    let mut kernel = Kernel::load(&opts).context("cannot start the tracer")?;
    caps::warn_gaps();
    let (mut ring, mut log) = super::streams(&mut kernel)?;
    let attr = Attributor::from_config(&cfg);
    let mut state = State::new(&cfg, attr)?;
    let started = monotonic_ns();
    let cpu = process_cpu_ns();
    let snap = kernel.snapshot();
    state
        .metrics
        .decode_errors
        .inc_by(kernel.take_decode_errors());
    // Chains older than the daemon are rebuilt once the pod and Service
    // indexes have loaded (their roles and backends come from them), at
    // most INDEX_WAIT after the start.
    let mut chains_deferred = !state.indexes_loaded();
    state.tracker.defer_chains = chains_deferred;
    match snap {
        Ok(snap) => {
            state.resync(&snap, started);
            state.resync_took(monotonic_ns() - started, process_cpu_ns() - cpu);
            state.pool_evidence(&snap);
            log::info!("{} connections open at start", state.tracker.table.len());
        }
        Err(e) => log::warn!("no start-up snapshot of open connections: {e}"),
    }
    return_free_memory();
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
    let mut last_evidence = std::time::Instant::now();
    let mut beat = tokio::time::interval(DRAIN_INTERVAL);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = resync.tick() => resync_now(ring.get_mut(), &shared, &mut decode_errors),
            // The kernel's early wake-up: the ring is filling.
            drained = ring.when_ready(|r| drain(r, &shared.state, &mut decode_errors)) => {
                drained?;
            }
            _ = beat.tick() => {
                drain(ring.get_mut(), &shared.state, &mut decode_errors);
                look_for_pools(ring.get_mut(), &shared, &mut decode_errors, &mut last_evidence);
                if chains_deferred && rebuild_due(&shared, started) {
                    chains_deferred = false;
                    resync_now(ring.get_mut(), &shared, &mut decode_errors);
                }
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

/// How long the chains older than the daemon wait for the pod and Service
/// indexes' first lists before they are rebuilt anyway.
const INDEX_WAIT: Duration = Duration::from_secs(10);

/// Whether the deferred chain rebuild is due (the indexes loaded, or
/// [`INDEX_WAIT`] passed since `started_ns`); clears the deferral if so.
fn rebuild_due(shared: &Shared, started_ns: u64) -> bool {
    let mut state = shared.state.lock().expect("state lock");
    let waited = Duration::from_nanos(monotonic_ns().saturating_sub(started_ns));
    let loaded = state.indexes_loaded();
    if !loaded && waited < INDEX_WAIT {
        return false;
    }
    if !loaded {
        log::warn!(
            "the pod and Service indexes did not load within {INDEX_WAIT:?}: chains older than the \
             daemon are rebuilt without them (links to Service backends inferred)"
        );
    }
    state.tracker.defer_chains = false;
    true
}

/// The periodic reconciliation with the kernel's sockets, then the pool
/// evidence in the same snapshot (after the events it saw).
fn resync_now(ring: &mut EventRing, shared: &Shared, decode_errors: &mut u64) {
    // Apply what the kernel already reported first, so that the snapshot is
    // compared with an up-to-date table.
    drain(ring, &shared.state, decode_errors);
    let started = monotonic_ns();
    let cpu = process_cpu_ns();
    match shared.snapshot() {
        Ok(snap) => {
            {
                let mut state = shared.state.lock().expect("state lock");
                state.resync(&snap, started);
                state.resync_took(monotonic_ns() - started, process_cpu_ns() - cpu);
            }
            pool_evidence(ring, shared, decode_errors, &snap);
        }
        Err(e) => log::warn!("periodic resync skipped: {e}"),
    }
    let mut state = shared.state.lock().expect("state lock");
    state.forget_deleted_pods(std::time::Instant::now());
    drop(state);
    return_free_memory();
}

/// A chain that waits for its upstream leg may be served by a pool: looks
/// at the sockets' payload, at most once per [`EVIDENCE_INTERVAL`]. The
/// events the kernel sent before the snapshot's end are applied first (an
/// upstream leg whose open is still in the ring would look like none).
fn look_for_pools(
    ring: &mut EventRing,
    shared: &Shared,
    decode_errors: &mut u64,
    last: &mut std::time::Instant,
) {
    let due = shared.state.lock().expect("state lock").pool_evidence_due();
    if !due || last.elapsed() < EVIDENCE_INTERVAL {
        return;
    }
    *last = std::time::Instant::now();
    match shared.snapshot() {
        Ok(snap) => pool_evidence(ring, shared, decode_errors, &snap),
        Err(e) => log::debug!("pool evidence skipped: {e}"),
    }
}

/// The pool evidence in `snap`, once the events the kernel sent before it
/// are applied.
fn pool_evidence(
    ring: &mut EventRing,
    shared: &Shared,
    decode_errors: &mut u64,
    snap: &[crate::event::ConnEvent],
) {
    drain(ring, &shared.state, decode_errors);
    shared.state.lock().expect("state lock").pool_evidence(snap);
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
