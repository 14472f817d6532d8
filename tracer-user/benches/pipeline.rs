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

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use conn_tracer::{
    Attributor, Config, ConnEvent, State, decode,
    testing::{self, T0_NS, bytes_of},
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
fn step_records(t: usize, window: usize) -> [Vec<u8>; 4] {
    let close_ns = T0_NS + (t + window) as u64 * 10_000;
    let open_ns = close_ns - window as u64 * 10_000;
    let port = 32_768 + (t % 28_000) as u16;
    let idle_kill = t.is_multiple_of(10);
    [
        bytes_of(&testing::open(open_ns, true, port)),
        bytes_of(&testing::open(open_ns, false, port)),
        bytes_of(&testing::close(close_ns, true, port, idle_kill)),
        bytes_of(&testing::close(close_ns, false, port, idle_kill)),
    ]
}

/// Template steps back to back in one buffer of about the default ring
/// buffer's size, 8-byte aligned as in the ring.
struct Ring {
    bytes: Vec<u8>,
    /// Per step: (offset, length) of its four records.
    steps: Vec<[(usize, usize); 4]>,
}

impl Ring {
    fn new(window: usize) -> Self {
        let per_step: usize = step_records(0, window)
            .iter()
            .map(|r| r.len().next_multiple_of(8))
            .sum();
        let n = (DEFAULT_RING_BYTES as usize / per_step).max(1);
        let mut ring = Self {
            bytes: Vec::with_capacity(n * per_step),
            steps: Vec::with_capacity(n),
        };
        for t in 0..n {
            let mut spans = [(0, 0); 4];
            for (i, r) in step_records(t, window).iter().enumerate() {
                spans[i] = (ring.bytes.len(), r.len());
                ring.bytes.extend_from_slice(r);
                ring.bytes.resize(ring.bytes.len().next_multiple_of(8), 0);
            }
            ring.steps.push(spans);
        }
        ring
    }

    /// Runs step `g`: writes its cookies, then hands each record to `f`
    /// (the closes only once their connection has opened).
    fn step(&mut self, g: usize, window: usize, f: &mut impl FnMut(&[u8])) {
        let spans = self.steps[g % self.steps.len()];
        let cookies = [
            Some(2 * g as u64 + 1),
            Some(2 * g as u64 + 2),
            g.checked_sub(window).map(|o| 2 * o as u64 + 1),
            g.checked_sub(window).map(|o| 2 * o as u64 + 2),
        ];
        for ((at, len), cookie) in spans.into_iter().zip(cookies) {
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

#[expect(
    clippy::cast_precision_loss,
    reason = "event counts stay far below 2^52"
)]
fn main() {
    let o = opts();
    let cpu = pin_to_one_core();
    let mut ring = Ring::new(o.window);

    let cfg = Config {
        idle_threshold: Duration::from_mins(1),
        ..Config::default()
    };
    let mut state = State::new(&cfg, Attributor::host_only()).expect("metrics registry");
    let mut handle = |r: &[u8]| {
        let ev: ConnEvent = decode(r).expect("synthetic records decode");
        state.handle(&ev);
    };
    // Fill the table to its steady size (the first `window` steps only open).
    let mut g = 0;
    while g < 2 * o.window {
        ring.step(g, o.window, &mut handle);
        g += 1;
    }
    let (decode_n, decode_t) = timed(&mut ring, &mut 0, 0, o.seconds / 3.0, |r| {
        black_box(decode(black_box(r)).ok());
    });
    let (events, took) = timed(&mut ring, &mut g, o.window, o.seconds, &mut handle);
    let render_start = Instant::now();
    let text = state.render_metrics(0);
    let render = render_start.elapsed();
    let tracked = text
        .lines()
        .find_map(|l| l.strip_prefix("conntracer_tracked_connections "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the tracked connections gauge");
    let kills = text
        .lines()
        .filter(|l| l.starts_with("conntracer_idle_kills_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>();
    assert!(kills > 0.0, "the stream's idle kills were counted");

    let per_s = events as f64 / took.as_secs_f64();
    let decode_per_s = decode_n as f64 / decode_t.as_secs_f64();
    if o.json {
        println!(
            "{{\"events\":{events},\"seconds\":{:.3},\"events_per_s\":{per_s:.0},\
             \"ns_per_event\":{:.1},\"decode_only_events_per_s\":{decode_per_s:.0},\
             \"tracked_connections\":{tracked},\"render_metrics_ms\":{:.3},\
             \"cpu\":{}}}",
            took.as_secs_f64(),
            1e9 / per_s,
            render.as_secs_f64() * 1e3,
            cpu.map_or_else(|| "null".to_string(), |c| c.to_string()),
        );
    } else {
        println!(
            "pipeline: {events} events in {:.2} s on cpu {cpu:?}: {per_s:.0} events/s \
             ({:.0} ns/event); decode alone {decode_per_s:.0} events/s; \
             {tracked} tracked; /metrics render {:.2} ms",
            took.as_secs_f64(),
            1e9 / per_s,
            render.as_secs_f64() * 1e3,
        );
    }
}
