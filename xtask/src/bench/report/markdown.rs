//! docs/benchmarks.md: the run's tables in prose, with the charts linked,
//! the method, and the (static) analysis of where the time goes.

use std::fmt::Write as _;

use super::{Report, levels, summarize};
use crate::bench::{
    Args,
    procs::tracer::Config,
    scenario::{
        memory::{Resync, mib},
        paced::PacedRun,
        syscalls::SyscallCost,
    },
    stats::{self, Summary},
};

fn fmt_opt(s: Option<Summary>, f: impl Fn(f64) -> String) -> String {
    s.map_or("-".into(), |s| f(s.median))
}

/// The paced-CPU section: every tracer's whole cost at each rate, and
/// conn-tracer's kernel programs one by one.
fn paced(s: &mut String, runs: &[PacedRun], a: &Args) {
    let _ = writeln!(
        s,
        "\n### CPU at paced rates\n\n\
         The same churn, paced: `conn-loadgen churn --rate R` starts each of its {c} clients' \
         connections on a fixed beat, for {sec} s (after 0.5 s of warm-up), so the machine is \
         mostly idle and the cost is what a node pays at that rate. A tracer's whole cost is \
         its process's CPU (`/proc/PID/stat`) plus the run time of its kernel programs \
         (`run_time_ns` in each program's fdinfo, counted while `kernel.bpf_stats_enabled` is \
         1: this section only, as it adds two clock reads per program run). The programs see \
         every TCP socket of the host, and this machine is shared: what other processes' \
         connections cost them over a quiet second just before each run is taken off, pro \
         rata (the tracer's own process CPU also includes handling those events). Interrupts are \
         the host's IRQ work + function call + rescheduling IPIs (`/proc/interrupts`) per \
         connection made; the ring buffer wakes its reader through IRQ work.\n\n\
         | Configuration | rate asked | connections/s made | process CPU s | kernel programs s | \
         whole cost mCPU | kernel ns per connection | interrupts per connection |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        c = a.concurrency,
        sec = a.paced_seconds
    );
    for r in runs {
        let traced = r.config != Config::NoTracer;
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {} | {} | {} | {} | {:.2} |",
            r.config.name(),
            r.rate,
            r.out.conn_per_s,
            r.cost.cpu_s.map_or("-".into(), |c| format!("{c:.3}")),
            r.cost
                .bpf_ns
                .map_or("-".into(), |n| format!("{:.3}", n as f64 / 1e9)),
            r.millicores().map_or("-".into(), |m| format!("{m:.1}")),
            if traced {
                r.cost.bpf_ns.map_or("-".into(), |n| {
                    format!("{:.0}", n as f64 / r.out.total_connections.max(1) as f64)
                })
            } else {
                "-".into()
            },
            r.ipis_per_conn()
        );
    }
    let ct: Vec<&PacedRun> = runs
        .iter()
        .filter(|r| r.config == Config::ConnTracer)
        .collect();
    if let Some(top) = ct.iter().max_by(|x, y| x.rate.total_cmp(&y.rate)) {
        let _ = writeln!(
            s,
            "\nconn-tracer's kernel programs at {:.0} connections/s:\n\n\
             | Program | calls per connection | ns per call | ns per connection |\n\
             | --- | ---: | ---: | ---: |",
            top.rate
        );
        let conns = top.out.total_connections.max(1) as f64;
        // Every program, also one that never ran (the accept() program,
        // where every process uses accept4()).
        for p in &top.cost.programs {
            let per_call = if p.calls > 0 {
                format!("{:.0}", p.run_time_ns as f64 / p.calls as f64)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "| `{}` | {:.2} | {per_call} | {:.0} |",
                p.name,
                p.calls as f64 / conns,
                p.run_time_ns as f64 / conns
            );
        }
        s.push_str(ACCEPT_NOTE);
    }
}

/// What each configuration adds to every system call on the host.
fn syscalls(s: &mut String, runs: &[SyscallCost]) {
    let Some(none) = runs.first().map(SyscallCost::median) else {
        return;
    };
    s.push_str(
        "\nWhat each adds to every system call of every process (a tight loop of `getppid()` 2 \
         s after the tracer started: the fastest of 5 loops of 2 million calls, then the median \
         over the rounds, which run every configuration once in an order rotated by round). While any syscall tracepoint is attached, the kernel \
         sends every system call on the host through its traced entry and exit, which no \
         program's run time shows; the churn above makes about 17 system calls per \
         connection. conn-tracer attaches none by default (Linux 5.11+); its fallback for 5.10 \
         (`--no-sockopts` here) does. A difference within the rounds' spread is noise.\n\n\
         | Configuration | ns per system call | rounds | added |\n| --- | ---: | ---: | ---: |\n",
    );
    for r in runs {
        let m = r.median();
        let lo = r.ns_per_call.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.ns_per_call.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {} | {m:.1} | {lo:.1} - {hi:.1} | {:+.1} |",
            r.name,
            m - none
        );
    }
}

/// What the accept programs' rows mean.
const ACCEPT_NOTE: &str = "\nThe `getsockopt` program (which sidecar thread took a connection on \
a mesh capture port: the proxy asks the accepted socket for `SO_ORIGINAL_DST`) runs only at \
`getsockopt()` calls: here one per connection (the load generator's non-blocking connect reads \
`SO_ERROR`), each ending at the option check. On 5.10 (and with `--no-sockopts`) the accept \
programs (`sys_exit_accept4`, `sys_exit_accept`) take its place: they run at every return of \
`accept4()`/`accept()` on the host, including the `EAGAIN` returns of a non-blocking server's \
accept loop (about 1.5 calls per connection of this churn, ~345 ns each, when they were the \
default), and while they are attached every system call on the host takes the traced path (the \
table after this one). Measured with the paced section above (`cargo xtask bench`, or `cargo \
xtask bench --skip churn,scaling,syscalls,loss,latency,memory,cluster,pipeline` for this section \
alone), `kernel.bpf_stats_enabled=1`.\n";

fn range(s: Option<Summary>, f: impl Fn(f64) -> String) -> String {
    s.map_or("-".into(), |s| format!("{} - {}", f(s.min), f(s.max)))
}

#[expect(clippy::too_many_lines, reason = "one section after another")]
pub fn markdown(rep: &Report<'_>, charts: &[(&str, String)], other: &[String]) -> String {
    let r = rep.results;
    let a = rep.args;
    let m = rep.machine;
    let has = |name: &str| charts.iter().any(|c| c.0 == name);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench` (see [Method](#method)); rerun it rather than editing \
         this file. Machine-readable: [`bench/summary.json`](bench/summary.json).\n\n\
         | | |\n| --- | --- |\n\
         | Command | `{}` |\n| Date | {} |\n| Commit | {} |\n\
         | Kernel | {} |\n| CPU | {} x {} |\n| Memory | {:.1} GiB |\n\
         | Load average at start | {} |\n| Took | {:.0} s |",
        rep.command,
        m.date,
        m.commit,
        m.kernel,
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.load_average_at_start,
        rep.took.as_secs_f64()
    );
    if !other.is_empty() {
        let _ = writeln!(
            s,
            "| Other eBPF holders seen | {} (they cost every configuration alike) |",
            other.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\n## Targets\n\n| Target | Goal | Measured | |\n| --- | --- | --- | --- |"
    );
    for v in rep.verdicts {
        let _ = writeln!(
            s,
            "| {} | {} | {} | **{}** |",
            v.name,
            v.target,
            v.value,
            if v.pass { "PASS" } else { "FAIL" }
        );
    }

    if !r.churn.is_empty() {
        let sums = summarize(&r.churn);
        let _ = writeln!(
            s,
            "\n## 1. Connection churn\n\n\
             `conn-loadgen churn` opens a loopback connection, sends 8 bytes, reads them back \
             and closes it (the client closes first), as fast as it can, with {c} connections \
             in flight, for {sec} s per run (after 0.5 s of warm-up). It runs one \
             single-threaded event loop per core, each with its own clients and servers, so \
             both ends of a connection stay on one core and the cores stay busy (no idle CPU \
             waiting for a wake-up: on this VM that would dominate, and vary with the rest of \
             the machine's load). One connection is two sockets and about ten TCP state \
             changes. {rounds} rounds; each round runs every configuration once, in an order \
             rotated by round, and the ratio to no tracer is taken within the round. \
             \"hooks only (floor)\" is conn-tracer with `CONN_TRACER_DISARMED=1`: its programs \
             attached to the same hooks, each returning at once. It is what the hooks \
             themselves cost, before any tracer does any work: no tracer on these hooks can do \
             better on this machine.\n\n\
             | Configuration | connections/s (median) | min - max | ratio to no tracer (median) | \
             ratio min - max | tracer CPU s per 100k connections | events received | events lost |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            c = a.concurrency,
            sec = a.seconds,
            rounds = a.rounds
        );
        for x in &sums {
            let traced = x.config != Config::NoTracer;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                x.config.name(),
                fmt_opt(x.conn_per_s, |v| format!("{v:.0}")),
                range(x.conn_per_s, |v| format!("{v:.0}")),
                fmt_opt(x.ratio, |v| format!("{v:.3}")),
                range(x.ratio, |v| format!("{v:.3}")),
                if traced {
                    fmt_opt(x.cpu_s_per_100k, |v| format!("{v:.3}"))
                } else {
                    "-".into()
                },
                if traced {
                    x.events.to_string()
                } else {
                    "-".into()
                },
                if traced {
                    x.lost.to_string()
                } else {
                    "-".into()
                },
            );
        }
        let _ = writeln!(
            s,
            "\nconn-tracer's events are the kernel's `open` and `close` records (two per socket, \
             four per loopback connection) plus keepalive `sockopt`s of other processes; \
             bpftrace's and tcplife's are their printed connection ends (two per loopback \
             connection), tcpstates' its printed state changes. Lost: \
             `conntracer_events_lost_total`, bpftrace's own `Lost N events` count, and the \
             libbpf tools' `lost N events` warnings.\n"
        );
        if has("churn.svg") {
            let _ = writeln!(s, "![churn throughput](bench/churn.svg)\n");
        }
        if has("cpu.svg") {
            let _ = writeln!(s, "![tracer CPU per 100k connections](bench/cpu.svg)\n");
        }
        let _ = writeln!(
            s,
            "<details><summary>Every run</summary>\n\n\
             | Round | Configuration | connections/s | tracer CPU s | events | lost | connect errors |\n\
             | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
        );
        for x in &r.churn {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {} | {} | {} |",
                x.round,
                x.config.name(),
                x.conn_per_s,
                x.tracer_cpu_s.map_or("-".into(), |c| format!("{c:.2}")),
                x.events.map_or("-".into(), |e| e.to_string()),
                x.lost.map_or("-".into(), |e| e.to_string()),
                x.errors
            );
        }
        let _ = writeln!(s, "\n</details>");
    }

    if !r.scaling.is_empty() || r.memory.is_some() {
        let _ = writeln!(s, "\n## 2. Scaling");
    }
    if !r.scaling.is_empty() {
        let _ = writeln!(
            s,
            "\n### Churn at several load levels\n\n\
             The same churn with 1 to {max} connections in flight ({rounds} rounds of {sec} s \
             per level; each tracer is started once per round and runs every level; medians \
             of the rounds). With 1 connection in flight only one core works and throughput \
             depends on how the other, idle vCPU is woken: on this VM it varies from run to \
             run, so that level's ratio is the least reliable.\n\n\
             | Connections in flight | no tracer conn/s | conn-tracer conn/s | ratio | \
             hooks only (floor) ratio | bpftrace ratio | tcplife ratio | tcpstates ratio |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            max = a.levels.iter().max().unwrap_or(&0),
            rounds = a.level_rounds,
            sec = a.level_seconds
        );
        for (level, sums) in levels(&r.scaling) {
            let get = |c: Config| sums.iter().find(|x| x.config == c);
            let rate = |c| fmt_opt(get(c).and_then(|x| x.conn_per_s), |v| format!("{v:.0}"));
            let ratio = |c| fmt_opt(get(c).and_then(|x| x.ratio), |v| format!("{v:.3}"));
            let _ = writeln!(
                s,
                "| {level} | {} | {} | {} | {} | {} | {} | {} |",
                rate(Config::NoTracer),
                rate(Config::ConnTracer),
                ratio(Config::ConnTracer),
                ratio(Config::HooksOnly),
                ratio(Config::Bpftrace),
                ratio(Config::Tcplife),
                ratio(Config::Tcpstates)
            );
        }
        if has("scaling.svg") {
            let _ = writeln!(s, "\n![churn ratio by load level](bench/scaling.svg)");
        }
    }
    if !r.paced.is_empty() {
        paced(&mut s, &r.paced, a);
    }
    syscalls(&mut s, &r.syscalls);
    if let Some(mem) = &r.memory {
        let maps: Vec<String> = mem
            .maps
            .iter()
            .map(|m| format!("{} {} KiB", m.type_name(), m.memlock.div_ceil(1024)))
            .collect();
        let _ = writeln!(
            s,
            "\n### Memory with many open connections\n\n\
             `conn-loadgen hold` opens loopback connections and keeps them open; both ends are \
             on this host, so each is two tracked connections (sockets). The daemon's RSS and \
             peak RSS (`VmRSS`, `VmHWM`) are read after it tracks them all and has served \
             `/metrics` twice (every scrape rebuilds the gauges). Kernel memory is the daemon's \
             eBPF maps (`memlock` in their fdinfo: the ring buffer, counters, the storage map) \
             plus the socket storage charged to each held socket (`ss -m`, field `o`, less the \
             {:.0} bytes the same sockets carry without conn-tracer). Daemon RSS before any \
             load: {:.1} MiB.\n\n\
             | Tracked connections | loopback connections | daemon RSS MiB | peak RSS MiB | \
             eBPF maps MiB | socket storage MiB | storage bytes per socket | events lost |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            mem.storage_without_tracer_per_socket,
            mib(mem.baseline_rss_bytes)
        );
        for p in &mem.points {
            let per = if p.sockets_measured > 0 {
                format!(
                    "{:.0}",
                    p.sk_storage_bytes as f64 / p.sockets_measured as f64
                )
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {per} | {} |",
                p.tracked,
                p.loopback_connections,
                mib(p.rss_bytes),
                mib(p.hwm_bytes),
                mib(p.map_bytes),
                mib(p.sk_storage_bytes),
                p.lost
            );
        }
        let pts: Vec<(f64, f64)> = mem
            .points
            .iter()
            .map(|p| (p.tracked as f64, p.rss_bytes as f64))
            .collect();
        let storage: Vec<f64> = mem
            .points
            .iter()
            .filter(|p| p.sockets_measured > 0)
            .map(|p| p.sk_storage_bytes as f64 / p.sockets_measured as f64)
            .collect();
        let _ = writeln!(
            s,
            "\nBytes per tracked connection: **{} in the daemon** (least-squares slope of RSS over \
             tracked connections) and **{} in the kernel** (socket storage, charged to the \
             socket and freed with it); the maps themselves are a fixed {:.1} MiB, most of it \
             the 4 MiB event ring ({}; the second ring buffer is the kernel programs' log).",
            stats::slope(&pts).map_or("-".into(), |b| format!("{b:.0} bytes")),
            Summary::of(&storage).map_or("-".into(), |x| format!("{:.0} bytes", x.median)),
            mib(mem.maps.iter().map(|m| m.memlock).sum()),
            maps.join(", ")
        );
        if let Some(r) = &mem.resync {
            resync_section(&mut s, r);
        }
        if has("memory.svg") {
            let _ = writeln!(s, "\n![memory by tracked connections](bench/memory.svg)");
        }
    }

    if let Some(c) = &r.cluster {
        cluster_section(&mut s, c);
    }

    if !r.pipeline.is_empty() {
        let _ = writeln!(
            s,
            "\n## 3. Userspace pipeline\n\n\
             `cargo bench -p tracer-user --bench pipeline` feeds the daemon's own code \
             (`event::decode`, then `metrics::State::handle`: `track`'s connection table and \
             classification of every end, then the metric updates) with synthetic `open`/`close` records laid out \
             exactly as the kernel writes them, on one pinned core, for {} s: a cyclic stream \
             in which each connection (an outbound socket and the inbound one that accepted it) \
             closes a fixed number of connections after it opened, so the table stays at the \
             size shown; one end in ten is an idle kill. The meshed-pod columns run the same \
             stream as app -> sidecar -> upstream chains of one pod (three sockets each, \
             attributed through the pod's cgroups and the pod index, linked and ended, the \
             chain kill counted).\n\n\
             | Tracked connections | events/s | ns/event | decode alone, events/s | one `/metrics` render | meshed pod with chains, events/s | ns/event |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            a.pipeline_seconds
        );
        for p in &r.pipeline {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.0} | {:.1} ms | {:.0} | {:.0} |",
                p.tracked_connections,
                p.events_per_s,
                p.ns_per_event,
                p.decode_only_events_per_s,
                p.render_metrics_ms,
                p.mesh_events_per_s,
                p.mesh_ns_per_event
            );
        }
        if has("pipeline.svg") {
            let _ = writeln!(s, "\n![userspace pipeline](bench/pipeline.svg)");
        }
    }

    if let Some(l) = &r.latency {
        let _ = writeln!(
            s,
            "\n## 4. Detection latency\n\n\
             The daemon runs with `--idle-threshold 1s`. `conn-loadgen idle-kill` opens {} \
             loopback connections, leaves them idle for 1.5 s, then closes the server side of \
             one at a time (a FIN to an idle client, as a server's idle timeout does); the \
             client closes as soon as it reads the EOF. Each sample is the time from the \
             server's `close()` to the first `/metrics` answer (polled every {} us on one \
             kept-alive connection) whose `conntracer_idle_kills_total` for that server's \
             address went up. A scrape first applies every event the kernel has sent; \
             without scrapes the daemon applies events at its next 50 ms drain.\n\n\
             | Samples | median | p95 | max | missed |\n| ---: | ---: | ---: | ---: | ---: |\n\
             | {} | {} | {:.1} ms | {} | {} |",
            l.samples_ms.len() + l.missed as usize,
            l.poll_us,
            l.samples_ms.len(),
            fmt_opt(l.summary, |v| format!("{v:.1} ms")),
            l.p95_ms,
            l.summary.map_or("-".into(), |x| format!("{:.1} ms", x.max)),
            l.missed
        );
        if has("latency.svg") {
            let _ = writeln!(s, "\n![detection latency](bench/latency.svg)");
        }
    }

    if let Some(t) = &r.tiny_ring {
        let _ = writeln!(
            s,
            "\n## Lost events\n\n\
             With the default 4 MiB ring, every conn-tracer churn and scaling run above reports \
             its `conntracer_events_lost_total` (the target is 0 at the highest churn).\n\n\
             With the ring made deliberately tiny (`--ring-bytes {}`), the same churn for {:.1} s \
             made {} loopback connections, i.e. {} `open`/`close` events. The daemon received {} \
             and counted {} lost: received + lost - made = {:+}, against {:.0} events/s of \
             other processes' connections on this host measured just before (this host is \
             shared). A negative difference would be events that vanished uncounted. \
             **{}**.",
            t.ring_bytes,
            t.seconds,
            t.connections,
            t.expected,
            t.received,
            t.lost,
            t.excess,
            t.background_per_s,
            if t.pass { "PASS" } else { "FAIL" }
        );
    }

    s.push_str(METHOD);
    s.push_str(ANALYSIS);
    s
}

const METHOD: &str = "
## Method

- `cargo xtask bench` (as root) installs what it needs and is missing (bpftrace, with
  apt-get), mounts tracefs if nothing did (bpftrace reads tracepoint formats there), builds
  `conn-tracer` and `conn-loadgen` in release mode, runs every section, and writes this file,
  the charts in `docs/bench/` and `docs/bench/summary.json`. Every duration and level is a
  flag (`cargo xtask bench --help`); `--skip` leaves sections out; `--strict` exits 1 when a
  target is missed. All traffic is loopback. Every process the bench starts is stopped by its
  pid; the open-file limit is raised only inside `conn-loadgen`.
- Configurations: *no tracer*; *conn-tracer*: `conn-tracer run --listen 127.0.0.1:PORT
  --idle-threshold 1s --no-kube`, everything else default (4 MiB ring, socket option tracing
  on); *bpftrace*: the tcplife-style script below on the `sock:inet_sock_set_state`
  tracepoint (kprobes are not available on this kernel), output to a file. Each run starts
  the tracer, waits until it is attached (`/healthz`, or bpftrace's `BEGIN`), measures, and
  stops it.
- The tracer's CPU is its process's user + system time (`/proc/PID/stat`) over the whole
  load-generator run, divided by the connections made in it. Work the kernel programs do runs
  in the context of the connection itself (the load generator's threads and softirqs): it
  shows up as lower throughput, not as tracer CPU.
- Other load on this shared machine (builds and tests of other work, other tracers) varies
  during a run; interleaving and per-round ratios cancel slow drift, and the tables give the
  spread of the rounds.

```text
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  $sk = args->skaddr;
  if (args->newstate < 4 && @birth[$sk] == 0) { @birth[$sk] = nsecs; }
  if (args->newstate == 2 || args->newstate == 9) { @pid[$sk] = pid; @comm[$sk] = comm; }
  if (args->newstate == 7) {
    $b = @birth[$sk];
    if ($b != 0) { printf(\"end %d %s %d %d %d\\n\", @pid[$sk], @comm[$sk], args->sport,
                          args->dport, (nsecs - $b) / 1000); }
    delete(@birth[$sk]); delete(@pid[$sk]); delete(@comm[$sk]);
  }
}
```
";

/// What the measurements taught while the targets were chased (issue 6).
/// Static: these numbers come from one-off builds, not from this run.
const ANALYSIS: &str = "
## Where the time goes

Measured on this machine while working on the targets (issue 6), with the same load
generator (64 connections in flight) and interleaving as above, when the machine was
otherwise quiet (no tracer: 74,400 connections/s, i.e. 13.4 us of CPU per loopback
connection on the two vCPUs). Each row is a build of the kernel program that does less,
run against no tracer in 6 interleaved rounds of 2 s; the table gives the median
throughput relative to no tracer.

| Kernel program | throughput / no tracer |
| --- | ---: |
| attached but returns at once (the tracepoint's own cost) | 0.998 |
| socket storage only: owner capture, end facts, no events | 0.863 |
| events only: `open` and `close` records, no socket storage | 0.896 |
| conn-tracer as committed | 0.800 |
| conn-tracer before this work | 0.568 |
| the bpftrace peer | 0.400 |

What changed, and what it bought:

- **Ring buffer wake-ups.** The daemon used to wait for the ring again as soon as it had
  drained it. The kernel wakes a reader that has caught up through irq_work, an
  inter-processor interrupt; on this VM each is a VM exit, in the connection's own path.
  Under churn that happened for nearly every record: `perf` put `native_write_msr` (the
  interrupt) at ~10 % of all CPU. The daemon then rested 5 ms after each drain (daemon CPU
  per 100k connections fell from 0.62 s to 0.10 s, and the default ring went from 5,928
  lost events in 7 s of churn to none); now (issue 16) the records are submitted without a
  wake-up (`BPF_RB_NO_WAKEUP`), the daemon drains every 50 ms, and the kernel wakes it only
  when 1/8 of the ring waits unread. A `/metrics` or `/connections` request drains the
  ring first, so scrapes still count every event before them.
- **Field reads.** Every socket field was a `bpf_probe_read_kernel` call (about 30 per
  connection end). The state program now loads them through the `tcp_sock` pointer
  `bpf_skc_to_tcp_sock` returns; the offsets are constants the verifier sees (read field by
  field from the frozen `OFFSETS` global), so it checks each load against the kernel's BTF.
  Transitions that carry no fact return before any helper, there is one clock read per
  transition, and no byte-by-byte `memset` subprogram on the path.
- **Memory.** `/metrics` no longer copies the connection table to build the gauges (it
  counts per label set), the eviction queue stays near the table's size, and the heap left
  over from parsing the kernel's BTF at start-up is returned to the system: idle RSS fell
  from 28.4 to 17 MiB, and RSS with 100k tracked connections from 61.9 to 55.4 MiB.
- The userspace pipeline met its target without changes; caching the per-kind event
  counters and hashing cookies with one multiply did not move it measurably.

Why the churn target is out of reach here: conn-tracer adds about 3.4 us to a connection
that costs 13.4 us. About 2.1 us is the socket storage's life cycle, which the kernel runs
outside the program (`perf`: `bpf_local_storage_alloc` on connect, `bpf_sk_storage_clone`
into every accepted socket, `bpf_sk_storage_free` and its RCU callback when the socket goes)
plus the lookups; about 1.5 us is the four ring records (reserve and submit share one lock
between the CPUs, ~30 field loads each) and the daemon's work on them. 0.98 would leave
0.27 us per connection: less than one storage allocation. Getting there would mean giving
up per-socket storage (which frees itself with the socket, and lets accepted sockets
inherit their listener's owner) or the per-socket `open` events. Against connections that
do real work (TLS, requests) the same absolute cost is a far smaller fraction, and
bpftrace's one map update per transition plus one printed line per connection end costs
twice as much.

Issue 16 (measured with `kernel.bpf_stats_enabled`, paced at 10,000 connections/s, the
daemon before and after each change run back to back; the machine was shared with other
builds, load average 6-10, so churn ratios of those side-by-side runs were not usable: with
the host that busy a tracer that wakes often even raised the loopback rate, a VM scheduling
effect):

- `inet_sock_set_state` runs 10 times per loopback connection at 330-440 ns a call (the
  others are not called in this load): 3.3-4.4 us of kernel program time per connection,
  30-45 mCPU at 10k/s on its own. The storage allocation on connect runs inside the
  program (`bpf_sk_storage_get` with `F_CREATE`); the clone into accepted sockets and the
  free do not, and do not show in these figures. 5 ring records per connection (2 `open`,
  1 `end` at the server's CLOSE_WAIT, 2 `close`).
- Wake-ups: with the 5 ms drain pause the host's IPIs per connection were already those of
  no tracer at 10k/s (0.03-0.06); submitting without a wake-up (a forced one per 1/8 of the
  ring filled) and draining every 50 ms cut the daemon's own CPU at 10k/s from 31-47 to
  18-31 mCPU and at 1k/s from 27-33 to 9-18 mCPU. What it gives up: without a scrape an
  event is applied up to 50 ms later (a scrape still drains first).
- `/metrics`: the open, per-peer and CLOSE_WAIT gauges come from counts the table keeps
  (one entry per owner, direction, keepalive and remote end): render at 100k tracked fell
  from 125-190 ms to 0.2 ms; the table's upkeep costs ~5 % of the pipeline's events/s.
- Daemon memory: glibc raised its mmap threshold to the largest block freed (the start-up
  BTF buffers), so the table's old bucket arrays and each resync's snapshot stayed resident
  as heap holes: 96k tracked took 60 MiB and 71 MiB after the first resync (peak 104 MiB).
  A fixed 256 KiB threshold and a trim after each resync: 49 and 51 MiB (peak 86 MiB, the
  resync's snapshot of every socket while it is compared with the table).
- Userspace pipeline (issue 16, second pass; `perf` on `benches/pipeline.rs` at 100k
  tracked): ~40 % of `State::handle` was the connection table's hash probes missing the
  cache: cookies hashed by one multiply sent every open and close to a random bucket of a
  ~20 MB table. The kernel hands cookies out from a counter, so the buckets now follow the
  cookie (3 buckets apart: the cookie itself filled whole 16-bucket groups, whose removals
  left tombstones that a lookup of an absent cookie, the close of an evicted connection,
  probed through: ~0.5 us against ~20 ns in a side-by-side test with sequential and
  per-CPU-batched cookie streams). Also: the eviction order is a list threaded through the
  entries (the queue's compaction looked up every gone cookie), updates are in place, no
  chain leg is built for sockets outside pods, and the harness no longer allocates per step.
  Side by side on the shared machine: 0.6-1.5M events/s before, 1.8-2.6M after (2.96M in
  the run above; the quiet-machine figure before was 1.45M).
- Periodic resync at 100k tracked: ~620 ms wall and ~600 ms of CPU (20 mCPU at the default
  30 s interval) at first, 419 and 418 ms (14 mCPU) after the change below, in the bench
  runs of the two builds (shared machine). `perf`: a third the TCP iterator (a `bpf_probe_read_kernel` per field and
  a storage lookup per socket), a third a scan of every descriptor in /proc at every
  resync for the same sockets without a kernel owner: listeners older than the daemon
  (not in the table, so nothing remembered what /proc said) and orphans lingering after
  their close (no process holds them). What /proc said of a socket is now kept while it
  lives: side by side on the same 100.8k tracked sockets (two daemons, the old build and
  this one, `--resync-interval 4s`, 5 resyncs each), 0.66-0.92 s of CPU per resync before,
  0.34-0.47 s after. A full table leaves
  what it evicted out (`conntracer_resync_not_added_total`): with the check removed, the
  resync test counted 1,202 evictions against 438 opens and ends over three resyncs.
- CPU at 10k connections/s: the kernel programs alone are ~3.8 us per connection
  (`inet_sock_set_state` 10 runs of ~310 ns, `tcp_probe` 5 of ~100 ns, the accept program
  then),
  i.e. ~40 mCPU before the daemon's ~18 mCPU; 20 mCPU would leave 2 us per connection for
  both. The nearest figure without giving up per-socket storage or the open/close records
  is the kernel programs' ~40 mCPU: unchanged in this pass.
- Floor and state stores (issue 16, third pass; session of 2026-12-02, a quiet machine,
  load average 0, but a slower VM than the runs above: the same build's `inet_sock_set_state`
  took 477 ns a call here against 312 there). Same paced load (10,000 connections/s, 16 in
  flight, 5.5 s with the warm-up; every figure per connection made, warm-up included), one
  daemon at a time, `kernel.bpf_stats_enabled=1`:

  | Build | `inet_sock_set_state` ns/call | `tcp_probe` ns/call | accept ns/call | kernel ns per connection |
  | --- | ---: | ---: | ---: | ---: |
  | programs that return at once (floor) | 64 | 67 | 74 | 1088 |
  | main, socket storage (default), run 1 / 2 | 477 / 476 | 187 / 190 | 345 / 350 | 6238 / 6256 |
  | main, hash map by address, allocated per entry (`CONN_TRACER_OLD_HELPERS=1`) | 539 | 261 | 345 | 7221 |
  | hash map by address, preallocated (`SOCK_STATES` without `BPF_F_NO_PREALLOC`) | 486 | 252 | 335 | 6638 |

  The floor is what the three hooks cost with a program that only reads its `ready` flag:
  10 state changes, 5 received segments and 1.5 `accept` returns per connection at ~65-75 ns
  each, the dispatch and the statistics' own clock reads. At 10,000 connections/s that is
  10.9 mCPU before the programs do anything, so the 20 mCPU target leaves ~0.9 us per
  connection for the programs' work and the daemon's together, and the daemon alone handles
  5 records per connection in ~1.5 us (80 ms of CPU over the 5.5 s, 14.5 mCPU: clock-tick
  resolution). Neither hash map pays inside the programs: a hash lookup in `tcp_probe`
  costs ~65 ns more than the socket's own storage, and the preallocated map's cheaper
  insert (no allocation: 486 against 539 ns) still leaves it ~400 ns per connection above
  socket storage (whose clone into accepted sockets and free with the socket run outside
  the programs: they show only in the churn ratio). The nearest achievable figure on this
  machine, with the contract's per-socket records, is therefore the measured one (~60-80
  mCPU here, ~55 mCPU on the faster VM above); below it, what is left to try is fewer
  program runs and records per connection (a close record carrying the open facts, opens
  held back for sockets that close young, which needs bpf_timer: 5.15+), not a different
  store. Reproduce: build with the one-line change (`run()` in `tracer-ebpf/src/sock.rs`
  calling the body only when a config field no loader sets is 7, or `SOCK_STATES` without
  `NO_PREALLOC` in `maps.rs`), then run the daemon, set `kernel.bpf_stats_enabled=1`, run
  `conn-loadgen churn --rate 10000 --seconds 5 --concurrency 16`, and read `run_time_ns`
  and `run_cnt` from the daemon's program descriptors in `/proc/PID/fdinfo` before and after.
- Hidden cost and floor (issue 16, fourth pass; 2026-12-02, the same slower VM). The accept
  programs were the only syscall tracepoints attached, and while any syscall tracepoint is
  attached every system call of every process takes the kernel's traced entry and exit:
  `getppid()` took ~200 ns alone and ~260 ns with them attached, and the churn makes 16.8
  system calls per connection (`perf stat -e raw_syscalls:sys_enter` over a churn run), so
  ~1 us per connection that no program's run time showed, paid by every process on the node.
  Which sidecar thread took a captured connection now comes from a `cgroup/getsockopt`
  program that sees the proxy ask the accepted socket for `SO_ORIGINAL_DST` (5.11+; the
  accept tracepoints stay the 5.10 and `--no-sockopts` fallback): see the syscalls table
  above. The floor of the three hooks, in churn terms: the throwaway build whose programs
  return at once (above), interleaved with no tracer and this build over 6 rounds of 3 s at
  16 in flight (`conn-loadgen churn --seconds 3 --concurrency 16`, the daemon started and
  stopped around each run): the floor's ratio was 0.909-1.046, median 0.946, and this
  build's 0.777-0.906, median 0.864. The 0.95 target is the floor of the hooks themselves:
  it leaves the programs' work no room at all.
- Fifth pass (issue 16; 2026-12-02, the same VM). Two builds run back to back, alternating,
  at the paced 10,000 connections/s with `kernel.bpf_stats_enabled=1` (3-4 rounds, medians;
  the VM's speed drifts by 20 % within minutes, so only interleaved runs compare):
  - `tcp_probe` returns before the socket's state at segments no longer than the
    connection's TCP header (`skb->len <= tcp_sock.tcp_header_len`: 20 bytes, 32 with
    timestamps, options the connection negotiated included). Such segments carry no payload
    and move neither `lrcvtime` nor `bytes_received`, so the next step dates the same
    arrivals to the same steps. They are 60 % of the segments this churn receives (bpftrace
    over `tcp:tcp_probe`'s `data_len`: 9,051 of 15,085). 194 -> 138 ns a call, about -280 ns
    per connection. Reading the header's `doff` with `bpf_probe_read_kernel` instead saved
    nothing: one probe read costs ~70 ns on this VM. Given up: a segment with fewer options
    than the connection negotiated and at most 12 bytes of payload (conformant stacks send
    none once timestamps are agreed) is taken as payload-less; its arrival would be dated to
    the step of the payload before it.
  - The submit's wake-up test by bits instead of a 64-bit division, and records taking the
    namespace stored at ESTABLISHED: `inet_sock_set_state` 496 -> 490 ns a call, within the
    rounds' spread (482-513 and 468-552). Kept (nothing is given up), not claimed.
  - Where the rest goes (`perf record -a -g` over `conn-loadgen churn --seconds 5
    --concurrency 16`, shares of all CPU): `inet_sock_set_state` with its helpers 4.6-4.9 %
    (its own instructions 1.6, `bpf_sk_storage_get` 1.9 of which the allocation on connect
    ~1.2, the dispatch 0.6, the ring 0.5), `tcp_probe` 0.9-1.1, `getsockopt` 0.5; and outside
    every program the storage's clone into accepted sockets 1.2, its free 1.3 and their RCU
    callbacks 0.9. The socket storage's life cycle outside the programs adds about 55 % to
    what `bpf_stats` shows: the CPU row above undercounts the kernel's whole cost by that
    much.
  - A hash-map state store on 6.18 (a throwaway switch forcing the 5.10 store: keyed by the
    socket's address, entries from the kernel's per-CPU `bpf_mem_alloc`; cookies and the
    getsockopt observer kept): the same shares total 7.8 % against socket storage's 9.3 %
    (preallocated: 8.0 %), with more of it inside the programs. Churn ratio over 5
    interleaved rounds: 0.855 socket storage, 0.860 hash, 0.868 preallocated, each of them
    0.74-0.99 from round to round: within noise. Not adopted: accepted sockets would take
    the owner registered for their namespace and port, wrong where SO_REUSEPORT listeners of
    different processes share one; cgroup sockopt programs have no helper that finds the
    socket's entry, so keepalive options set on open connections would no longer be tied to
    them; for at most ~1.5 % of the machine in this churn.
  - Whole-node CPU (`/proc/stat` busy time over the paced run, with and without the daemon,
    4 interleaved rounds): 739-942 mCPU without a tracer, 615-869 with one. The VM's noise
    is ten times the tracer's cost; this method cannot measure it.
  - The daemon: a process missing from /proc (gone, or outside the daemon's PID namespace)
    is taken as missing for 1 s per (pid, cgroup) instead of costing a failed open of /proc
    at every event of its sockets. The meshed-pod pipeline, whose synthetic owners have no
    /proc entry, went from 5.3 to 1.4-1.8 us per event (section 3).
  - In the full run of this pass the cluster section's relist ended with 7,500 EndpointSlices
    (the daemon's log: `kubernetes: 7500 endpoint slices in the cluster`, as the Services
    relist failed on an expired continue token) and 15,000 endpoints, so that target failed.
    The cause was the fake apiserver: it named a list's remainder by resourceVersion and
    request count, so the Services and EndpointSlices lists, paged at once after the relist,
    could be handed the same continue token; one client then read the other's remainder and
    the other got 410. The fake now hands out one token per remainder. The section rerun
    alone (`--skip` every other) passed: 83.1 MiB, 150,000 endpoints after the relist.
- Sixth pass (issue 16; 2026-12-02, the same VM). The floor is now a configuration of every
  run: \"hooks only (floor)\", conn-tracer with `CONN_TRACER_DISARMED=1`, its programs attached
  to the same hooks and each returning at once (the socket-option programs after the
  `optlen` fix-ups every call needs), in the same rotated rounds as the others. Its first
  full run: churn at 16 in flight 1.006 (rounds 0.964-1.091) against conn-tracer's 0.848;
  scaling at 256 in flight 0.885 against 0.886 (3 rounds); paced at 10,000 connections/s
  13.6 mCPU (11 of programs, about 1.0 us per connection, and the idle daemon's ~4) against
  66.4. The fourth pass's throwaway floor build had given 0.946 at 16 in flight, from which
  it read the 0.95 target as the hooks' own limit; measured side by side here, the disarmed
  hooks are within noise of no tracer, so that reading does not hold: the gap at 16 in
  flight is conn-tracer's own work (socket storage, five records per connection, the
  daemon). At 256 in flight the two are level in this run, within the 3 rounds' noise. The
  verdicts above print the floor beside each ratio and the CPU figure, and say so when the
  floor alone misses a target.
- Not done: fewer records per connection (the server's `end` and `close` as one record when
  the owner closes at once; opens sent only for connections that outlive a short age, which
  needs a timer per socket: bpf_timer, 5.15+).
";

/// The cluster-index section.
fn cluster_section(s: &mut String, c: &crate::bench::scenario::cluster::Cluster) {
    let _ = writeln!(
        s,
        "\n### Cluster index\n\n\
         The daemon's cluster-wide Service and EndpointSlice watches, against the fake apiserver \
         (`ct-fake-kube`, real-format objects with managedFields and annotations) serving a \
         simulated cluster: {} pods on {} nodes behind {} ClusterIP Services ({} EndpointSlices, \
         {} endpoints), and the {} pods of the daemon's node. The same daemon watching an \
         empty cluster is the baseline; RSS is read once every endpoint is indexed.\n\n\
         | endpoints indexed | Service ports | sync s | RSS MiB | peak RSS MiB | peak through a \
         relist MiB | empty-cluster RSS MiB | bytes per endpoint | limit MiB | EndpointSlice \
         list MiB | Service list MiB |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |",
        c.pods,
        c.nodes,
        c.services,
        c.slices,
        c.endpoints,
        c.node_pods,
        c.indexed_endpoints,
        c.indexed_service_ports,
        c.sync_seconds,
        mib(c.rss_bytes),
        mib(c.hwm_bytes),
        mib(c.relist_hwm_bytes),
        mib(c.empty_rss_bytes),
        c.bytes_per_endpoint,
        mib(c.limit_bytes),
        mib(c.slice_list_bytes),
        mib(c.service_list_bytes),
    );
    let _ = writeln!(
        s,
        "\nBytes per endpoint is (RSS - empty-cluster RSS) / endpoints: the index, the watch \
         streams and the allocator's share together. The watches keep no copy of the objects \
         (no reflector store): each is read into a type with only the fields the index needs \
         and dropped. The first peak is the initial lists (EndpointSlices 100 per page); the \
         second is after the fake cut every watch and expired its history, so that the daemon \
         listed everything again beside its index ({} endpoints indexed after it).",
        c.relist_endpoints
    );
}

/// The periodic resync, below the memory table.
fn resync_section(s: &mut String, r: &Resync) {
    let Resync {
        tracked,
        interval_s,
        samples,
        full_cap,
        full_resyncs,
        full_evictions,
        full_inserts,
        full_not_added,
        ..
    } = *r;
    let ms = |x: f64| format!("{:.0}", x * 1e3);
    let (wall, wall_max) = (ms(r.duration_median_s), ms(r.duration_max_s));
    let (cpu, cpu_max) = (ms(r.cpu_median_s), ms(r.cpu_max_s));
    // What it costs on average at the default interval.
    let mcpu = r.cpu_median_s / 30.0 * 1e3;
    let rss = mib(r.rss_bytes);
    let _ = writeln!(
        s,
        "\n#### Periodic resync\n\n\
         With {held} loopback sockets held, a daemon run with `--resync-interval {interval_s}s` \
         (tracking {tracked}): each resync walks every TCP socket of every network namespace \
         with the iterator and reconciles the table with them. Its wall time \
         (`conntracer_resync_duration_seconds`) and the daemon's CPU time during it \
         (`conntracer_resync_cpu_seconds`, all threads) over {samples} resyncs: **{wall} ms** \
         (max {wall_max} ms) and **{cpu} ms of CPU** (max {cpu_max} ms), i.e. {mcpu:.1} mCPU \
         at the default 30 s interval. RSS after them: {rss:.1} MiB.\n\n\
         Then the same sockets with a daemon whose table holds {full_cap} \
         (`--max-connections`): over {full_resyncs} resyncs the table evicted {full_evictions} \
         connections (against {full_inserts} `open`/`end` events, the only inserts that may \
         evict) and the resyncs left {full_not_added} live sockets out: what a full table \
         evicted stays out, and no resync evicts to re-add it.",
        held = 2 * full_cap,
    );
}
