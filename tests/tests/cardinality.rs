//! Hostile cardinality: 100k distinct peers and a storm of short-lived
//! processes must not grow the metric series or the daemon's table without
//! bound. The `peer` label folds new values into `other` past `max_peers`
//! and counts them; the table keeps at most `max_connections` entries and
//! evicts the oldest (counted). A flood of client IPs on an ingress node
//! does not take the places of the peers that have kills.

#![expect(
    clippy::cast_precision_loss,
    reason = "connection counts, far below 2^52, compared with metric values (f64)"
)]
#![expect(
    clippy::too_many_lines,
    reason = "each test is one scenario told from start to end"
)]

use std::{
    collections::BTreeSet,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    NetNs, Peer, ct_client,
    daemon::{Daemon, Metrics, names::KILLS},
    scenario::local,
    serial_unless_skipped,
    servers::Redis,
};

/// Distinct peers (destination address and port) of the first test.
const PEERS: usize = 100_000;
const MAX_PEERS: usize = 500;
const MAX_CONNECTIONS: usize = 10_000;
/// Bound on connecting them all.
const CONNECT_WITHIN: Duration = Duration::from_mins(2);

/// The i-th distinct loopback address: 127.1.0.1 onwards, last byte 1-250.
fn peer_addr(i: usize) -> Ipv4Addr {
    let block = i / 250;
    let last = u8::try_from(1 + i % 250).expect("byte");
    let hi = u8::try_from(1 + block / 256).expect("byte");
    let mid = u8::try_from(block % 256).expect("byte");
    Ipv4Addr::new(127, hi, mid, last)
}

fn raise_fd_limit() -> u64 {
    integration_tests::helper::raise_fd_limit().expect("open-file limit")
}

/// Every distinct value of `label` in the scrape, over all series.
fn label_values(text: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut rest = line;
        while let Some(at) = rest.find(&key) {
            // Only whole label names: preceded by `{` or `,`.
            let whole = at == 0 || matches!(rest.as_bytes()[at - 1], b'{' | b',');
            rest = &rest[at + key.len()..];
            let end = rest.find('"').unwrap_or(rest.len());
            if whole {
                out.insert(rest[..end].to_string());
            }
            rest = &rest[end..];
        }
    }
    out
}

/// A listener with a long accept queue: with std's short one, a burst of
/// connects overflows it while the acceptor waits for a core, and each
/// dropped SYN costs its client a 1 s retransmission.
fn listen(addr: SocketAddrV4) -> TcpListener {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.bind(&SocketAddr::V4(addr).into()).expect("bind");
    s.listen(4096).expect("listen");
    s.into()
}

fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn root_100k_distinct_peers_fold_into_other_and_the_table_stays_capped() {
    let _serial = serial_unless_skipped!();
    // Both ends of a connection are in this process: batches fit the
    // open-file limit.
    let batch = usize::try_from(raise_fd_limit().saturating_sub(500) / 2)
        .expect("fits")
        .min(8_000);
    assert!(
        batch >= 1_000,
        "open-file limit too low for batches of 1000"
    );
    let ns = NetNs::new();
    let max_peers = MAX_PEERS.to_string();
    let max_connections = MAX_CONNECTIONS.to_string();
    let daemon = Daemon::start(
        "1s",
        &[
            "--no-kube",
            "--max-peers",
            &max_peers,
            "--max-connections",
            &max_connections,
        ],
    );
    let before = daemon.scrape();
    let before_text = daemon.metrics_text();
    let tracked = |m: &Metrics| m.sum("conntracer_tracked_connections", &[]);
    let evictions = |m: &Metrics| m.sum("conntracer_table_evictions_total", &[]);
    let kills = |m: &Metrics| m.sum("conntracer_idle_kills_total", &[("closed_by", "peer")]);

    // One listener on every loopback address of the namespace. Each batch:
    // connect to `batch` new distinct peers, hold them past the idle
    // threshold, then the server ends close them (idle kills by the peer,
    // each with its own `peer` label value).
    let port = 16394;
    let started = Instant::now();
    let mut max_tracked = 0f64;
    let mut peer_values_while_open = 0usize;
    let mut done = 0usize;
    let mut want_evicted = 0usize;
    while done < PEERS {
        assert!(
            started.elapsed() < CONNECT_WITHIN,
            "only {done} peers within {CONNECT_WITHIN:?}"
        );
        let n = batch.min(PEERS - done);
        let first = done;
        let (clients, accepted) = ns
            .spawn_in(move || {
                let listener = listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
                let acceptor = thread::spawn(move || {
                    (0..n)
                        .map(|_| listener.accept().expect("accept").0)
                        .collect::<Vec<_>>()
                });
                let clients: Vec<TcpStream> = (first..first + n)
                    .map(|i| {
                        let to = SocketAddr::new(peer_addr(i).into(), port);
                        TcpStream::connect(to).unwrap_or_else(|e| panic!("connect {to}: {e}"))
                    })
                    .collect();
                (clients, acceptor.join().expect("acceptor"))
            })
            .join()
            .expect("client thread");
        let connected = started.elapsed();
        done += n;
        want_evicted += (2 * n).saturating_sub(MAX_CONNECTIONS);
        // While open: the table is capped, and so is the peer label of the
        // open-connections gauge.
        let open = daemon.scrape();
        max_tracked = max_tracked.max(tracked(&open));
        peer_values_while_open =
            peer_values_while_open.max(label_values(&daemon.metrics_text(), "peer").len());
        thread::sleep(Duration::from_millis(1200));
        let mid = daemon.scrape();
        drop(accepted);
        for mut c in clients {
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut b = [0u8; 1];
            assert!(matches!(c.read(&mut b), Ok(0)), "no FIN from the server");
        }
        // The table keeps the newest MAX_CONNECTIONS sockets: about half are
        // clients, whose ends are idle kills.
        let want = (n.min(MAX_CONNECTIONS / 2) / 2) as f64;
        let m = daemon.wait_metrics(Duration::from_secs(20), |m| kills(m) - kills(&mid) >= want);
        assert!(
            kills(&m) - kills(&mid) >= want,
            "batch at {first}: {} idle kills, want {want}",
            kills(&m) - kills(&mid)
        );
        eprintln!(
            "batch at {first}: connected at {connected:?}, classified at {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "{PEERS} distinct peers in batches of {batch} in {:?}",
        started.elapsed()
    );
    let end = daemon.scrape();
    assert!(
        max_tracked <= MAX_CONNECTIONS as f64,
        "table above its cap: {max_tracked}"
    );
    let evicted = evictions(&end) - evictions(&before);
    assert!(
        evicted >= want_evicted as f64 * 0.9,
        "evictions: {evicted}, want about {want_evicted}"
    );
    assert!(
        peer_values_while_open <= MAX_PEERS + 1,
        "{peer_values_while_open} distinct peer values while open (cap {MAX_PEERS} + other)"
    );
    let text = daemon.metrics_text();
    let peers = label_values(&text, "peer");
    let overflow = |m: &Metrics| m.sum("conntracer_label_overflow_total", &[("label", "peer")]);
    let hwm = rss_kib(daemon.pid(), "VmHWM:");
    eprintln!(
        "after the kills: {} idle kills, {} into peer=\"other\", {} peer values, {} overflowed, \
         {} series ({} before), {} bytes; daemon peak RSS {} MiB",
        kills(&end) - kills(&before),
        end.sum(
            "conntracer_idle_kills_total",
            &[("closed_by", "peer"), ("peer", "other")]
        ) - before.sum(
            "conntracer_idle_kills_total",
            &[("closed_by", "peer"), ("peer", "other")]
        ),
        peers.len(),
        overflow(&end) - overflow(&before),
        series(&text),
        series(&before_text),
        text.len(),
        hwm / 1024
    );
    assert!(
        peers.len() <= MAX_PEERS + 1,
        "{} distinct peer values after the kills",
        peers.len()
    );
    assert!(
        overflow(&end) - overflow(&before) >= (PEERS - MAX_PEERS) as f64 * 0.25,
        "overflow counted: {}",
        overflow(&end) - overflow(&before)
    );
    // Every other label is bounded by what exists on the node, so the
    // series stay in the low thousands whatever the peers.
    assert!(
        series(&text) < series(&before_text) + 20 * (MAX_PEERS + 1),
        "series grew from {} to {}",
        series(&before_text),
        series(&text)
    );
    assert!(
        hwm < 256 * 1024,
        "daemon peak RSS {} MiB with a {MAX_CONNECTIONS}-entry table",
        hwm / 1024
    );
    assert!(daemon.stop(), "daemon did not exit 0");
}

#[test]
fn root_a_storm_of_short_lived_processes_adds_no_series_and_no_table_entries() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let daemon = Daemon::start("1s", &["--no-kube"]);
    let port = 16395;
    let stop = Arc::new(AtomicBool::new(false));
    let (server, warm) = {
        let stop = Arc::clone(&stop);
        let (tx, rx) = std::sync::mpsc::channel();
        let h = ns.spawn_in(move || {
            let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("ready");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        n += 1;
                        s.set_nonblocking(false).expect("blocking");
                        s.set_read_timeout(Some(Duration::from_secs(2)))
                            .expect("timeout");
                        // Until EOF: the process always closes first.
                        let mut b = [0u8; 16];
                        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            n
        });
        (h, rx)
    };
    warm.recv_timeout(Duration::from_secs(10))
        .expect("server ready");

    // Each process connects, sends a line and exits (the exit closes the
    // socket). One warm-up round first, so the label sets exist.
    let storm = |count: usize| {
        ns.spawn_in(move || {
            let started = Instant::now();
            for i in 0..count {
                assert!(
                    started.elapsed() < Duration::from_mins(2),
                    "only {i} processes in 2 min"
                );
                let status = Command::new("bash")
                    .args([
                        "-c",
                        &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo hi >&3"),
                    ])
                    .stdin(Stdio::null())
                    .status()
                    .expect("spawn bash");
                assert!(status.success(), "process {i}: {status}");
            }
            started.elapsed()
        })
        .join()
        .expect("storm thread")
    };
    storm(20);
    thread::sleep(Duration::from_millis(500));
    let before = daemon.scrape();
    let before_text = daemon.metrics_text();
    let processes = 1000;
    let took = storm(processes);
    let tracked = |m: &Metrics| m.sum("conntracer_tracked_connections", &[]);
    let closes = |m: &Metrics| m.sum("conntracer_events_total", &[("kind", "close")]);
    let after = daemon.wait_metrics(Duration::from_secs(15), |m| {
        closes(m) - closes(&before) >= (2 * processes) as f64
            && tracked(m) <= tracked(&before) + 20.0
    });
    let after_text = daemon.metrics_text();
    eprintln!(
        "{processes} processes in {took:?}: {} close events, tracked {} -> {}, series {} -> {}",
        closes(&after) - closes(&before),
        tracked(&before),
        tracked(&after),
        series(&before_text),
        series(&after_text)
    );
    assert!(
        closes(&after) - closes(&before) >= (2 * processes) as f64,
        "closes seen: {}",
        closes(&after) - closes(&before)
    );
    assert!(
        tracked(&after) <= tracked(&before) + 20.0,
        "table grew: {} -> {}",
        tracked(&before),
        tracked(&after)
    );
    let keys = |t: &str| -> BTreeSet<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.rsplit_once(' ').map_or(l, |(k, _)| k).to_string())
            .collect()
    };
    let new_series: Vec<String> = keys(&after_text)
        .difference(&keys(&before_text))
        .cloned()
        .collect();
    assert!(
        new_series.len() <= 10,
        "series grew with the process count: {} -> {}; new: {new_series:#?}",
        series(&before_text),
        series(&after_text)
    );
    stop.store(true, Ordering::Relaxed);
    let handled = server.join().expect("server");
    assert!(handled >= processes as u64, "server handled {handled}");
    assert!(daemon.stop(), "daemon did not exit 0");
}

/// Client IPs of the ingress flood.
const CLIENTS: usize = 10_000;

/// An ingress node: 10,000 client IPs hold connections to one server, far
/// more than `max_peers` (500). Their open-connection gauges fill every
/// place, then the clients end their idle connections (10,000 inbound idle
/// kills by the peer, one per client IP); a database's idle kill that comes
/// later still names its peer (Redis's own idle close is the ground truth),
/// and keeps it while the server holds the clients' connections.
#[test]
fn root_an_ingress_flood_of_client_ips_does_not_take_a_later_database_kills_peer() {
    let _serial = serial_unless_skipped!();
    assert!(
        raise_fd_limit() >= CLIENTS as u64 + 500,
        "open-file limit below {CLIENTS} + 500"
    );
    let ns = NetNs::new();
    let daemon = Daemon::start("1s", &["--no-kube", "--max-peers", "500"]);
    let mut server = ns.command(env!("CARGO_BIN_EXE_ct-peer"));
    let count = CLIENTS.to_string();
    server.args(["--timeout-secs", "120", "server", "--addr", "0.0.0.0"]);
    server.args(["--count", &count, "--hold"]);
    let mut ingress = Peer::spawn("ingress", server);
    let port = ingress.expect_port("listening");
    let started = Instant::now();
    let clients: Vec<TcpStream> = ns
        .spawn_in(move || {
            (0..CLIENTS)
                .map(|i| {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .expect("socket");
                    let from = SocketAddrV4::new(peer_addr(i), 0);
                    s.bind(&from.into()).expect("bind a client address");
                    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
                    s.connect(&to.into())
                        .unwrap_or_else(|e| panic!("connect from {from}: {e}"));
                    s.into()
                })
                .collect()
        })
        .join()
        .expect("client thread");
    ingress.expect_line("held");
    eprintln!("{CLIENTS} clients connected in {:?}", started.elapsed());

    // The open-connection gauges claim every place and fold the rest.
    let overflow = |m: &Metrics| m.sum("conntracer_label_overflow_total", &[("label", "peer")]);
    let flooded = daemon.wait_metrics(Duration::from_secs(20), |m| {
        m.sum("conntracer_connections_open", &[("direction", "inbound")]) >= CLIENTS as f64
    });
    assert!(
        overflow(&flooded) >= (CLIENTS - 500) as f64,
        "folds counted: {}",
        overflow(&flooded)
    );
    assert!(label_values(&daemon.metrics_text(), "peer").len() <= 501);

    // Past the idle threshold, the clients close: each client IP's own
    // idle kill (inbound, by the peer).
    thread::sleep(Duration::from_millis(1200));
    let before_fins = daemon.scrape();
    drop(clients);
    let inbound = [("direction", "inbound"), ("closed_by", "peer")];
    let client_kills = |m: &Metrics| m.sum(KILLS, &inbound) - before_fins.sum(KILLS, &inbound);
    // A burst of 10,000 closes may overflow the ring (a debug build on a
    // loaded machine): every kill is counted, or its loss is.
    let lost = |m: &Metrics| {
        m.sum("conntracer_events_lost_total", &[])
            - before_fins.sum("conntracer_events_lost_total", &[])
    };
    let m = daemon.wait_metrics(Duration::from_secs(30), |m| {
        client_kills(m) + lost(m) >= CLIENTS as f64
    });
    eprintln!(
        "{} inbound idle kills of the {CLIENTS} clients, {} events lost (counted)",
        client_kills(&m),
        lost(&m)
    );
    assert!(
        client_kills(&m) + lost(&m) >= CLIENTS as f64 && client_kills(&m) >= CLIENTS as f64 / 2.0,
        "{} inbound idle kills of the {CLIENTS} clients, {} events lost",
        client_kills(&m),
        lost(&m)
    );
    assert!(label_values(&daemon.metrics_text(), "peer").len() <= 501);

    let redis = Redis::start(&ns, local(16379), 2);
    let closes = redis.idle_closes();
    let before = daemon.scrape();
    let mut idle = ct_client!(&ns, "redis", redis.addr(), &["--then", "wait-close"]);
    idle.expect_connected_ok();
    idle.expect_peer_close();
    let kill = [("peer", "127.0.0.1:16379"), ("closed_by", "peer")];
    let (m, _) = daemon.settle(&before, KILLS, &kill, 1.0, Duration::ZERO);
    m.assert_delta(&before, KILLS, &kill, 1.0);
    assert_eq!(redis.idle_closes(), closes + 1, "Redis's own idle close");

    // Scrapes while the server holds the clients' connections: the kill
    // keeps its place and series.
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(500));
        let later = daemon.scrape();
        later.assert_delta(&before, KILLS, &kill, 1.0);
        assert!(label_values(&daemon.metrics_text(), "peer").len() <= 501);
    }
    ingress.go();
    ingress.expect_line("done");
    assert!(daemon.stop(), "daemon did not exit 0");
}
