//! The daemon's HTTP endpoints under a scrape storm (real `wrk` on
//! `/metrics`) keep answering while the tracer counts every connection of a
//! concurrent workload and loses no kernel event; requests that are not
//! ours (unknown paths, bodies, huge heads, garbage, slowloris) get a 4xx or
//! a closed connection, never a crash.
//!
//! Both tests hold `serial()` (every daemon sees every namespace) and compare
//! metric deltas over the workload's own port.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    NetNs,
    daemon::{
        Daemon, delta, http_get,
        names::{KILLS, LOST},
        serial,
    },
    require_program_or_skip, require_root_or_skip,
    servers::in_netns,
};

/// The storm's length, and the scrape rate it must sustain.
const STORM_SECS: u64 = 10;
const MIN_REQUESTS: u64 = 10_000;
/// The workload's connections, opened evenly over the storm, each idle
/// past the threshold and then closed by its server.
const WORKLOAD_CONNS: usize = 300;
/// The workload's server port (unique to this file), inside its namespace.
const WORKLOAD_PORT: u16 = 17_461;
/// How long the workload's server lets each connection idle before closing
/// it: past the daemon's 1 s threshold, so each is an idle kill by the peer.
const SERVER_IDLE: Duration = Duration::from_millis(1300);
/// The workload's connects are spread over this much of the storm, so that
/// the last is closed by its server well before the storm ends.
const WORKLOAD_SPREAD: Duration = Duration::from_millis(7_500);

/// What `wrk` printed, the figures the test asserts on.
#[derive(Debug, Default)]
struct WrkReport {
    requests: u64,
    seconds: f64,
    /// `Socket errors: connect N, read N, write N, timeout N`, summed.
    socket_errors: u64,
    /// `Non-2xx or 3xx responses: N`.
    non_2xx_3xx: u64,
    requests_per_sec: f64,
    latency_avg: String,
    latency_max: String,
    latency_p50: String,
    latency_p99: String,
}

fn parse_wrk(out: &str) -> WrkReport {
    let mut r = WrkReport::default();
    let num = |s: &str| s.trim().trim_end_matches(',').parse::<u64>().ok();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            r.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1).and_then(num))
                .sum();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx_3xx = num(rest).unwrap_or(u64::MAX);
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            r.requests_per_sec = rest.trim().parse().unwrap_or(0.0);
        } else if words.get(1) == Some(&"requests") && words.get(2) == Some(&"in") {
            r.requests = num(words[0]).unwrap_or(0);
            r.seconds = words[3].trim_end_matches("s,").parse().unwrap_or(0.0);
        } else if words.first() == Some(&"Latency") && words.len() >= 4 {
            words[1].clone_into(&mut r.latency_avg);
            words[3].clone_into(&mut r.latency_max);
        } else if words.first() == Some(&"50%") {
            words[1].clone_into(&mut r.latency_p50);
        } else if words.first() == Some(&"99%") {
            words[1].clone_into(&mut r.latency_p99);
        }
    }
    r
}

/// The workload, run inside its own namespace: a server on
/// [`WORKLOAD_PORT`] that greets each connection with one byte and closes
/// it after [`SERVER_IDLE`], and a client that opens `conns` connections
/// evenly over `spread`, reads the greeting, and closes each once its
/// server has. Returns how many connections completed that way.
fn workload(conns: usize, spread: Duration) -> usize {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, WORKLOAD_PORT))
        .expect("bind the workload port in the test namespace");
    thread::scope(|s| {
        // Server: accept, greet, and hand each socket to the closer, whose
        // deadlines come in accept order.
        let (to_closer, closer_rx) = mpsc::channel::<(Instant, TcpStream)>();
        s.spawn(move || {
            for _ in 0..conns {
                let (mut stream, _) = listener.accept().expect("accept");
                stream.write_all(b"x").expect("greet");
                to_closer
                    .send((Instant::now() + SERVER_IDLE, stream))
                    .expect("closer alive");
            }
        });
        s.spawn(move || {
            for (deadline, stream) in closer_rx {
                thread::sleep(deadline.saturating_duration_since(Instant::now()));
                drop(stream); // FIN: the client's socket is closed by its peer
            }
        });
        // Client: connect at a steady pace; the reaper waits for each
        // server's FIN and then closes its side.
        let (to_reaper, reaper_rx) = mpsc::channel::<TcpStream>();
        let reaper = s.spawn(move || {
            let mut done = 0usize;
            for mut stream in reaper_rx {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut buf = [0u8; 16];
                if matches!(stream.read(&mut buf), Ok(0)) {
                    done += 1;
                }
            }
            done
        });
        let pace = spread / u32::try_from(conns).expect("conns fit u32");
        let start = Instant::now();
        for i in 0..conns {
            let due = start + pace * u32::try_from(i).expect("fits");
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, WORKLOAD_PORT))
                .expect("connect to the workload server");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut greeting = [0u8; 1];
            stream.read_exact(&mut greeting).expect("greeting");
            to_reaper.send(stream).expect("reaper alive");
        }
        drop(to_reaper);
        reaper.join().expect("reaper")
    })
}

/// What happened during the storm: wrk's report and output, each /healthz
/// probe's status and latency, and how many workload connections completed.
type StormOutcome = (
    WrkReport,
    String,
    Vec<(Result<u16, String>, Duration)>,
    usize,
);

/// Runs `wrk` on /metrics for [`STORM_SECS`], the workload in `ns` and a
/// /healthz probe every 250 ms, all at once.
fn storm(daemon: &Daemon, ns: &NetNs, wrk: &std::path::Path) -> StormOutcome {
    let url = format!("http://{}/metrics", daemon.addr);
    thread::scope(|s| {
        let load = s.spawn(|| in_netns(ns, || workload(WORKLOAD_CONNS, WORKLOAD_SPREAD)));
        let storm = s.spawn(|| {
            let out = Command::new(wrk)
                .args(["-t2", "-c16", &format!("-d{STORM_SECS}s"), "--latency"])
                .arg(&url)
                .stdin(Stdio::null())
                .output()
                .expect("run wrk");
            assert!(
                out.status.success(),
                "wrk failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        // /healthz, as a kubelet probes it, throughout the storm.
        let mut health = Vec::new();
        while !storm.is_finished() {
            let t = Instant::now();
            let status = http_get(daemon.addr, "/healthz").map(|(code, _)| code);
            health.push((status.map_err(|e| e.to_string()), t.elapsed()));
            thread::sleep(Duration::from_millis(250));
        }
        let out = storm.join().expect("wrk thread");
        (
            parse_wrk(&out),
            out,
            health,
            load.join().expect("workload thread"),
        )
    })
}

#[test]
fn root_scrape_storm_keeps_answering_and_loses_no_events() {
    const NAME: &str = "root_scrape_storm_keeps_answering_and_loses_no_events";
    if !require_root_or_skip(NAME) {
        return;
    }
    let Some(wrk) = require_program_or_skip(NAME, "wrk", "Debian package wrk") else {
        return;
    };
    let _serial = serial();
    let ns = NetNs::new();
    let daemon = Daemon::start("1s", &["--no-kube"]);
    let before = daemon.scrape();

    let (report, wrk_out, health, completed) = storm(&daemon, &ns, &wrk);
    eprintln!("wrk on /metrics:\n{wrk_out}\nparsed: {report:?}");

    assert!(
        report.requests >= MIN_REQUESTS,
        "wrk made {} requests in {} s, fewer than {MIN_REQUESTS}:\n{wrk_out}",
        report.requests,
        report.seconds
    );
    assert_eq!(report.socket_errors, 0, "socket errors:\n{wrk_out}");
    assert_eq!(report.non_2xx_3xx, 0, "non-2xx responses:\n{wrk_out}");
    let slowest = health.iter().map(|(_, t)| *t).max().unwrap_or_default();
    eprintln!(
        "/healthz during the storm: {} probes, slowest {slowest:?}",
        health.len()
    );
    assert!(
        health.len() >= 10 && health.iter().all(|(s, _)| *s == Ok(200)),
        "/healthz during the storm: {health:?}"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "/healthz took {slowest:?} during the storm"
    );
    assert_eq!(
        completed, WORKLOAD_CONNS,
        "workload connections closed by their server"
    );

    let kill = [
        ("peer", "127.0.0.1:17461"),
        ("direction", "outbound"),
        ("closed_by", "peer"),
        ("close_kind", "fin"),
    ];
    let want = f64::from(u32::try_from(WORKLOAD_CONNS).expect("fits"));
    let (m, m2) = daemon.settle(&before, KILLS, &kill, want, Duration::from_millis(500));
    assert_eq!(
        delta(&before, &m2, KILLS, &kill),
        want,
        "every workload connection is one idle kill by its peer: {}",
        m.dump(KILLS)
    );
    assert_eq!(
        delta(&before, &m2, KILLS, &[("peer", "127.0.0.1:17461")]),
        want,
        "and nothing else on that port: {}",
        m2.dump(KILLS)
    );
    assert_eq!(delta(&before, &m2, LOST, &[]), 0.0, "kernel events lost");
    assert_eq!(
        http_get(daemon.addr, "/healthz").expect("healthz").0,
        200,
        "/healthz after the storm"
    );
    assert!(
        daemon.stop(),
        "the daemon exits 0 on SIGTERM after the storm"
    );
}

/// Sends `request` on a fresh connection and reads until the server closes
/// or `wait` passes. Returns the status code of the first response (None
/// if there was none), whether the server closed the connection, and how
/// long that took. Write errors after the server answered or closed (it
/// need not read a body it refuses) are not failures.
fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> (Option<u16>, bool, Duration) {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let _ = s.write_all(request);
    read_reply(&mut s, start, wait)
}

fn read_reply(s: &mut TcpStream, start: Instant, wait: Duration) -> (Option<u16>, bool, Duration) {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 65536];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("read: {e}"),
        }
        if start.elapsed() > wait {
            break false;
        }
    };
    (status_of(&raw), closed, start.elapsed())
}

fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    let line = text.lines().next()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A request with `Connection: close`, so a well-formed exchange ends with
/// the server's close.
fn request(method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Requests that are not ours, each with the status it must get and why:
/// (what, request, status, why).
fn fixed_cases() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let body = b"marker-body-not-ours".repeat(100);
    let long_path = format!("/{}", "a".repeat(60_000));
    let too_long_path = format!("/{}", "a".repeat(70_000));
    let huge_header = format!("X-Huge: {}\r\n", "h".repeat(1 << 20));
    // (what, request, expected status, why)
    vec![
        (
            "GET /nope",
            request("GET", "/nope", "", b""),
            404,
            "not ours",
        ),
        (
            "GET /metrics/../x",
            request("GET", "/metrics/../x", "", b""),
            404,
            "paths are matched as sent, never normalised",
        ),
        (
            "GET /metricsx",
            request("GET", "/metricsx", "", b""),
            404,
            "prefix is not a match",
        ),
        (
            "GET 60 KB path",
            request("GET", &long_path, "", b""),
            404,
            "long but within the URI limit: not ours",
        ),
        (
            "GET 70 KB path",
            request("GET", &too_long_path, "", b""),
            414,
            "hyper refuses a URI over 64 KiB before routing (URI Too Long, RFC 9110 15.5.15)",
        ),
        (
            "POST /nope with a body",
            request("POST", "/nope", "", &body),
            404,
            "not ours, whatever the method",
        ),
        (
            "PUT /nope with a body",
            request("PUT", "/nope", "", &body),
            404,
            "not ours, whatever the method",
        ),
        (
            "POST /metrics with a body",
            request("POST", "/metrics", "", &body),
            405,
            "ours, but only GET/HEAD: RFC 9110 15.5.6 wants 405 with Allow",
        ),
        (
            "PUT /connections with a body",
            request("PUT", "/connections", "", &body),
            405,
            "ours, but only GET/HEAD",
        ),
        (
            "1 MiB header",
            request("GET", "/metrics", &huge_header, b""),
            431,
            "a head over hyper's buffer limit: Request Header Fields Too Large (RFC 6585 5)",
        ),
        (
            "garbage bytes",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xff\xfe\r\n\r\n".to_vec(),
            400,
            "not HTTP (a TLS ClientHello): Bad Request",
        ),
    ]
}

/// A body far larger than anything we read, streamed: the daemon answers
/// 405 without reading it all and closes (no unbounded body read).
fn huge_body(addr: SocketAddr, failures: &mut Vec<String>) {
    let quick = Duration::from_secs(5);
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let _ =
        s.write_all(b"POST /metrics HTTP/1.1\r\nHost: test\r\nContent-Length: 10000000000\r\n\r\n");
    let chunk = vec![b'b'; 65536];
    let mut sent = 0usize;
    while start.elapsed() < Duration::from_secs(3) {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let (status, closed, took) = read_reply(&mut s, start, quick);
    eprintln!("10 GB body to /metrics: {status:?}, closed {closed}, {took:?}, {sent} bytes sent");
    if status != Some(405) || !closed {
        failures.push(format!(
            "10 GB body: got {status:?} (closed: {closed}), want 405 and a close"
        ));
    }
}

/// Slowloris: heads that never end, one byte every 500 ms, on many
/// connections at once. The daemon keeps answering others meanwhile and
/// drops each after its header read timeout (10 s): hyper closes without
/// a response (a 408 is optional, RFC 9110 15.5.9).
fn slowloris(addr: SocketAddr, failures: &mut Vec<String>) {
    let slow: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nX-Slow: ")
                .expect("start the head");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let start = Instant::now();
    let mut closed_at: Vec<Option<Duration>> = vec![None; slow.len()];
    let mut scrapes = 0;
    while start.elapsed() < Duration::from_secs(16) && closed_at.iter().any(Option::is_none) {
        for (i, mut s) in slow.iter().enumerate() {
            if closed_at[i].is_some() {
                continue;
            }
            let _ = s.write(b"a");
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => closed_at[i] = Some(start.elapsed()),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    closed_at[i] = Some(start.elapsed());
                }
                _ => {}
            }
        }
        let (code, _) = http_get(addr, "/metrics").expect("/metrics during slowloris");
        assert_eq!(code, 200, "/metrics during slowloris");
        scrapes += 1;
        thread::sleep(Duration::from_millis(500));
    }
    let latest = closed_at.iter().flatten().max().copied();
    eprintln!(
        "slowloris: {} of {} closed, the last after {latest:?}; {scrapes} scrapes answered meanwhile",
        closed_at.iter().flatten().count(),
        slow.len()
    );
    if closed_at.iter().any(Option::is_none)
        || closed_at
            .iter()
            .flatten()
            .any(|t| *t < Duration::from_secs(9))
    {
        failures.push(format!(
            "slowloris connections closed at {closed_at:?}, want all closed at 10-16 s"
        ));
    }
    drop(slow);
}

#[test]
fn root_requests_that_are_not_ours_get_4xx_and_the_daemon_keeps_answering() {
    const NAME: &str = "root_requests_that_are_not_ours_get_4xx_and_the_daemon_keeps_answering";
    if !require_root_or_skip(NAME) {
        return;
    }
    let _serial = serial();
    let mut daemon = Daemon::start("1s", &["--no-kube"]);
    let addr = daemon.addr;
    let quick = Duration::from_secs(5);
    let cases = fixed_cases();
    let mut failures = Vec::new();
    for (what, req, want, why) in &cases {
        let (status, closed, took) = exchange(addr, req, quick);
        eprintln!("{what}: {status:?}, closed {closed}, {took:?} (want {want}: {why})");
        if status != Some(*want) || !closed {
            failures.push(format!(
                "{what}: got {status:?} (closed: {closed}) in {took:?}, want {want} and a close ({why})"
            ));
        }
    }

    huge_body(addr, &mut failures);
    slowloris(addr, &mut failures);

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(daemon.is_running(), "the daemon is still running");
    let m = daemon.scrape();
    assert!(m.has("conntracer_events_total"), "/metrics still answers");
    assert_eq!(
        http_get(addr, "/healthz").expect("healthz").0,
        200,
        "/healthz after the abuse"
    );
    // Nothing the clients sent is echoed in what the daemon serves.
    let (_, metrics_text) = http_get(addr, "/metrics").expect("metrics");
    assert!(!metrics_text.contains("marker-body-not-ours"));
    assert!(daemon.stop(), "the daemon exits 0 on SIGTERM");
}

#[test]
fn wrk_output_is_parsed() {
    let out = "Running 10s test @ http://127.0.0.1:9090/metrics
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.05ms    0.50ms  21.14ms   90.00%
    Req/Sec     7.70k   400.00     8.50k    70.00%
  Latency Distribution
     50%    0.98ms
     75%    1.20ms
     90%    1.50ms
     99%    2.80ms
  153274 requests in 10.00s, 1.10GB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:  15321.40
Transfer/sec:    112.61MB
";
    let r = parse_wrk(out);
    assert_eq!(r.requests, 153_274);
    assert_eq!(r.seconds, 10.0);
    assert_eq!(r.socket_errors, 5);
    assert_eq!(r.non_2xx_3xx, 7);
    assert_eq!(r.requests_per_sec, 15321.40);
    assert_eq!(
        (r.latency_avg.as_str(), r.latency_max.as_str()),
        ("1.05ms", "21.14ms")
    );
    assert_eq!(
        (r.latency_p50.as_str(), r.latency_p99.as_str()),
        ("0.98ms", "2.80ms")
    );
}
