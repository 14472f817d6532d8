//! Userspace pipeline throughput: the daemon's per-event work (decode a ring
//! buffer record, update the connection table, classify the end, update the
//! metrics) on synthetic open/close records laid out exactly as the kernel
//! writes them, on one pinned core.
//!
//! `cargo bench -p tracer-user --bench pipeline -- [--seconds S] [--window N] [--json]`
//!
//! Connection `g` (two sockets: an outbound client and the inbound socket
//! that accepted it) opens at step `g` and closes `window` steps later, so
//! the table holds `2 * window` connections throughout and every cookie is
//! new. The records sit back to back in a buffer the size of the default
//! ring buffer, reused round and round; each step writes its cookies into
//! its records before they are handled, as the kernel writes each record.
//! One connection in ten ends as an idle kill (the peer closed it after
//! more than the idle threshold of silence), the others as ordinary closes.
//!
//! Then the same with pod attribution on and the chain work: each step is
//! an app -> sidecar -> upstream chain of a meshed pod (the app's socket,
//! the sidecar's accept of it, the sidecar's upstream socket: attributed
//! through the pod's cgroups and the pod index, linked, and ended, with
//! its chain kill counted, `window` steps later).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use conn_tracer::{
    Attributor, Config, ConnEvent, State, decode,
    testing::{
        self, T0_NS, bytes_of,
        mesh::{DB_IP, MeshPod},
    },
};
use tracer_common::{DEFAULT_RING_BYTES, EventInfo};

/// Where the cookie sits in a record.
const COOKIE_AT: usize = std::mem::offset_of!(EventInfo, cookie);

struct Opts {
    seconds: f64,
    window: usize,
    json: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        seconds: 3.0,
        window: 5_000,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    // `cargo bench` adds `--bench`; unknown flags are ignored.
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                o.seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(o.seconds);
            }
            "--window" => o.window = args.next().and_then(|v| v.parse().ok()).unwrap_or(o.window),
            "--json" => o.json = true,
            _ => {}
        }
    }
    o.seconds = o.seconds.clamp(0.1, 600.0);
    o.window = o.window.clamp(1, 1_000_000);
    o
}

/// The records of step `t` of the template: the opens of its connection's
/// client and server sockets, then the closes of both sockets of the
/// connection that opened `window` steps earlier (cookies written later).
fn step_records(t: usize, window: usize) -> Vec<Vec<u8>> {
    let close_ns = T0_NS + (t + window) as u64 * 10_000;
    let open_ns = close_ns - window as u64 * 10_000;
    let port = 32_768 + (t % 28_000) as u16;
    let idle_kill = t.is_multiple_of(10);
    vec![
        bytes_of(&testing::open(open_ns, true, port)),
        bytes_of(&testing::open(open_ns, false, port)),
        bytes_of(&testing::close(close_ns, true, port, idle_kill)),
        bytes_of(&testing::close(close_ns, false, port, idle_kill)),
    ]
}

/// Like [`step_records`] for a chain of `pod`: the opens of its three
/// sockets, then their closes (the upstream leg ended by the server first).
fn chain_records(pod: &MeshPod, t: usize, window: usize) -> Vec<Vec<u8>> {
    let close_ns = T0_NS + (t + window) as u64 * 10_000;
    let open_ns = close_ns - window as u64 * 10_000;
    let socks = pod.outbound_chain(0, 32_768 + (t % 28_000) as u16, DB_IP);
    let opens = socks.iter().map(|s| bytes_of(&s.open(open_ns)));
    let closes = [true, false, true]
        .into_iter()
        .zip(&socks)
        .map(|(by_peer, s)| bytes_of(&s.close(close_ns, by_peer)));
    opens.chain(closes).collect()
}

/// Template steps back to back in one buffer of about the default ring
/// buffer's size, 8-byte aligned as in the ring.
struct Ring {
    bytes: Vec<u8>,
    /// Per step: (offset, length) of its records, the opens of its
    /// sockets then the closes of as many.
    steps: Vec<Vec<(usize, usize)>>,
}

impl Ring {
    /// `records(t)`: the records of template step `t`.
    fn new(records: impl Fn(usize) -> Vec<Vec<u8>>) -> Self {
        let per_step: usize = records(0).iter().map(|r| r.len().next_multiple_of(8)).sum();
        let n = (DEFAULT_RING_BYTES as usize / per_step).max(1);
        let mut ring = Self {
            bytes: Vec::with_capacity(n * per_step),
            steps: Vec::with_capacity(n),
        };
        for t in 0..n {
            let mut spans = Vec::new();
            for r in records(t) {
                spans.push((ring.bytes.len(), r.len()));
                ring.bytes.extend_from_slice(&r);
                ring.bytes.resize(ring.bytes.len().next_multiple_of(8), 0);
            }
            ring.steps.push(spans);
        }
        ring
    }

    /// Runs step `g`: writes its cookies, then hands each record to `f`
    /// (the closes only once their connection has opened).
    fn step(&mut self, g: usize, window: usize, f: &mut impl FnMut(&[u8])) {
        let n = self.steps.len();
        let spans = &self.steps[g % n];
        // Sockets per step; the closes are of the same sockets as the opens,
        // in the same order, `window` steps earlier.
        let k = spans.len() / 2;
        let cookie = |step: usize, i: usize| (k * step + i + 1) as u64;
        // No allocation here: the harness's own cost is not the pipeline's.
        let cookies = (0..k)
            .map(|i| Some(cookie(g, i)))
            .chain((0..k).map(|i| g.checked_sub(window).map(|o| cookie(o, i))));
        for (&(at, len), cookie) in spans.iter().zip(cookies) {
            if let Some(cookie) = cookie {
                self.bytes[at + COOKIE_AT..at + COOKIE_AT + 8]
                    .copy_from_slice(&cookie.to_ne_bytes());
                f(&self.bytes[at..at + len]);
            }
        }
    }
}

fn pin_to_one_core() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) == 0)
            .then_some(cpu)
    }
}

/// Runs steps from `*g` on until `seconds` pass; returns (events, elapsed).
fn timed(
    ring: &mut Ring,
    g: &mut usize,
    window: usize,
    seconds: f64,
    mut f: impl FnMut(&[u8]),
) -> (u64, Duration) {
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut events = 0u64;
    let mut counting = |r: &[u8]| {
        events += 1;
        f(r);
    };
    while start.elapsed() < budget {
        for _ in 0..1024 {
            ring.step(*g, window, &mut counting);
            *g += 1;
        }
    }
    (events, start.elapsed())
}

/// Fills `state` to its steady size (the first `window` steps only open),
/// then runs `ring` through it for `seconds`: (events, elapsed).
fn measure(ring: &mut Ring, state: &mut State, window: usize, seconds: f64) -> (u64, Duration) {
    let mut handle = |r: &[u8]| {
        let ev: ConnEvent = decode(r).expect("synthetic records decode");
        state.handle(&ev);
    };
    let mut g = 0;
    while g < 2 * window {
        ring.step(g, window, &mut handle);
        g += 1;
    }
    timed(ring, &mut g, window, seconds, &mut handle)
}

/// The sum of every sample of metric `name` in `text`.
fn total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[expect(
    clippy::cast_precision_loss,
    reason = "event counts stay far below 2^52"
)]
fn main() {
    let o = opts();
    let cpu = pin_to_one_core();
    let mut ring = Ring::new(|t| step_records(t, o.window));

    let cfg = Config {
        idle_threshold: Duration::from_mins(1),
        ..Config::default()
    };
    let mut state = State::new(&cfg, Attributor::host_only()).expect("metrics registry");
    let (decode_n, decode_t) = timed(&mut ring, &mut 0, 0, o.seconds / 3.0, |r| {
        black_box(decode(black_box(r)).ok());
    });
    let (events, took) = measure(&mut ring, &mut state, o.window, o.seconds);
    let render_start = Instant::now();
    let text = state.render_metrics(0);
    let render = render_start.elapsed();
    let tracked = text
        .lines()
        .find_map(|l| l.strip_prefix("conntracer_tracked_connections "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the tracked connections gauge");
    let kills = total(&text, "conntracer_idle_kills_total");
    assert!(kills > 0.0, "the stream's idle kills were counted");

    // Pod attribution on, every connection a sidecar chain.
    let pod = MeshPod::new("pipeline-bench");
    let mut mesh_state = State::new(&cfg, pod.attributor()).expect("metrics registry");
    let mut mesh_ring = Ring::new(|t| chain_records(&pod, t, o.window));
    let (mesh_events, mesh_took) = measure(&mut mesh_ring, &mut mesh_state, o.window, o.seconds);
    let mesh_text = mesh_state.render_metrics(0);
    let chains_open = total(&mesh_text, "conntracer_sidecar_chains_open");
    let chain_kills = total(&mesh_text, "conntracer_sidecar_chain_kills_total");
    assert!(
        chain_kills > 0.0 && chains_open >= o.window as f64,
        "the chains were linked and ended: {chains_open} open, {chain_kills} ended"
    );
    let mesh_per_s = mesh_events as f64 / mesh_took.as_secs_f64();

    let per_s = events as f64 / took.as_secs_f64();
    let decode_per_s = decode_n as f64 / decode_t.as_secs_f64();
    if o.json {
        println!(
            "{{\"events\":{events},\"seconds\":{:.3},\"events_per_s\":{per_s:.0},\
             \"ns_per_event\":{:.1},\"decode_only_events_per_s\":{decode_per_s:.0},\
             \"tracked_connections\":{tracked},\"render_metrics_ms\":{:.3},\
             \"mesh_events_per_s\":{mesh_per_s:.0},\"mesh_ns_per_event\":{:.1},\
             \"mesh_chains_open\":{chains_open},\"mesh_chain_kills\":{chain_kills},\
             \"cpu\":{}}}",
            took.as_secs_f64(),
            1e9 / per_s,
            render.as_secs_f64() * 1e3,
            1e9 / mesh_per_s,
            cpu.map_or_else(|| "null".to_string(), |c| c.to_string()),
        );
    } else {
        println!(
            "pipeline: {events} events in {:.2} s on cpu {cpu:?}: {per_s:.0} events/s \
             ({:.0} ns/event); decode alone {decode_per_s:.0} events/s; \
             {tracked} tracked; /metrics render {:.2} ms; meshed pod with chains: \
             {mesh_per_s:.0} events/s ({:.0} ns/event), {chains_open} chains open, \
             {chain_kills} ended",
            took.as_secs_f64(),
            1e9 / per_s,
            render.as_secs_f64() * 1e3,
            1e9 / mesh_per_s,
        );
    }
}
