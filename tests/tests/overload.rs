//! Overload: with a deliberately tiny ring buffer under connection churn the
//! daemon keeps running, counts every event it could not receive, and its
//! table does not leak: entries of connections whose close it missed are
//! reconciled against the kernel's sockets at the next resync.

#![expect(
    clippy::cast_precision_loss,
    reason = "connection counts, far below 2^52, compared with metric values (f64)"
)]

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    NetNs,
    daemon::{Daemon, Metrics, conns_at, http_get},
    serial_unless_skipped,
};

const PORT: u16 = 16393;
/// Churn bounds: whichever comes first.
const CHURN_FOR: Duration = Duration::from_secs(5);
const CHURN_MAX: u64 = 40_000;
/// Connections held open through the churn: they must stay in the table.
const HELD: usize = 100;
/// The daemon's resync interval in this test.
const RESYNC: &str = "2s";

fn events(m: &Metrics) -> f64 {
    m.sum("conntracer_events_total", &[("kind", "open")])
        + m.sum("conntracer_events_total", &[("kind", "close")])
}

/// One loopback connection: 1 byte each way, the client closes first (its
/// TIME_WAIT tuples are reused on loopback, so the churn cannot run out of
/// ports). Returns whether it completed.
fn one_connection(server: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(server) else {
        return false;
    };
    let mut b = [0u8; 1];
    s.write_all(b"q").is_ok() && s.read_exact(&mut b).is_ok()
}

/// Serves connections until `stop`: read 1 byte, answer, wait for EOF.
fn serve(listener: &TcpListener, stop: &AtomicBool) {
    listener.set_nonblocking(true).expect("nonblocking");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() && s.write_all(b"a").is_ok() {
                    let _ = s.read(&mut b);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario told from start to end")]
fn root_tiny_ring_under_churn_counts_every_loss_and_the_table_does_not_leak() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    // The smallest ring the kernel takes: one page, a few dozen records.
    let daemon = Daemon::start(
        "1s",
        &[
            "--no-kube",
            "--ring-bytes",
            "4096",
            "--resync-interval",
            RESYNC,
        ],
    );
    let server = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT);
    let listener = ns
        .spawn_in(move || TcpListener::bind(server).expect("bind"))
        .join()
        .expect("listener thread");
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = (0..2)
        .map(|_| {
            let l = listener.try_clone().expect("clone listener");
            let stop = Arc::clone(&stop);
            thread::spawn(move || serve(&l, &stop))
        })
        .collect();
    let before = daemon.scrape();

    // Held connections, on their own port: both ends stay open through the
    // churn and must stay in the table.
    let held_server = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT + 1);
    let (held, held_accepted) = ns
        .spawn_in(move || {
            let l = TcpListener::bind(held_server).expect("bind held");
            let clients: Vec<TcpStream> = (0..HELD)
                .map(|_| TcpStream::connect(held_server).expect("held connect"))
                .collect();
            let accepted: Vec<TcpStream> = (0..HELD)
                .map(|_| l.accept().expect("held accept").0)
                .collect();
            (clients, accepted)
        })
        .join()
        .expect("held thread");
    let made = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let made = Arc::clone(&made);
            ns.spawn_in(move || {
                let mut failed = 0u64;
                while started.elapsed() < CHURN_FOR && made.load(Ordering::Relaxed) < CHURN_MAX {
                    if one_connection(server) {
                        made.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed += 1;
                        assert!(failed < 100, "connections keep failing");
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
    let made = made.load(Ordering::Relaxed);
    let rate = made as f64 / started.elapsed().as_secs_f64();
    eprintln!("churn: {made} connections, {rate:.0}/s");
    assert!(made > 5_000, "the churn made only {made} connections");

    // The daemon is alive and still answers.
    assert_eq!(
        http_get(daemon.addr, "/healthz").expect("GET /healthz").0,
        200
    );
    let after = daemon.scrape();
    let lost = after.sum("conntracer_events_lost_total", &[])
        - before.sum("conntracer_events_lost_total", &[]);
    let received = events(&after) - events(&before);
    // Each connection is two sockets, each an `open` and a `close` record.
    let expected = 4.0 * made as f64;
    eprintln!("events: received {received}, lost {lost}, expected at least {expected}");
    assert!(
        lost > 0.0,
        "a 4 KiB ring lost nothing under churn: test is void"
    );
    assert!(
        received + lost >= expected,
        "events vanished uncounted: received {received} + lost {lost} < {expected}"
    );

    // The table: after a resync, only the held connections (both ends) and
    // what else lives on the host; none of the churn's ends.
    let tracked = |m: &Metrics| m.sum("conntracer_tracked_connections", &[]);
    let reconciled = |m: &Metrics| m.sum("conntracer_table_reconciled_total", &[]);
    let base = tracked(&before);
    let settled = daemon.wait_metrics(Duration::from_secs(15), |m| {
        reconciled(m) > reconciled(&after) && tracked(m) <= base + (2 * HELD) as f64 + 50.0
    });
    let extra = tracked(&settled) - base;
    eprintln!(
        "table: {} before, {} after the churn, {} after a resync; {} reconciled",
        base,
        tracked(&after),
        tracked(&settled),
        reconciled(&settled) - reconciled(&before)
    );
    assert!(
        reconciled(&settled) > reconciled(&before),
        "no missed close reconciled although {lost} events were lost"
    );
    assert!(
        extra <= (2 * HELD) as f64 + 50.0,
        "table leaked: {extra} more entries than before the churn (held {})",
        2 * HELD
    );
    // The held connections are all in the table (found again by the resync
    // where their `open` was lost).
    let listed = daemon.connections();
    let ours = conns_at(&listed, ns.inode(), &held_server.to_string())
        .iter()
        .map(|c| c["tracked"] == true)
        .collect::<Vec<bool>>();
    assert_eq!(ours.len(), 2 * HELD, "held connections listed");
    assert!(
        ours.iter().all(|t| *t),
        "held connections missing from the table after a resync: {}",
        ours.iter().filter(|t| !**t).count()
    );

    drop(held);
    drop(held_accepted);
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().expect("server thread");
    }
    let end = daemon.wait_metrics(Duration::from_secs(15), |m| tracked(m) <= base + 50.0);
    assert!(
        tracked(&end) <= base + 50.0,
        "table did not shrink back after the held connections closed: {} vs {base}",
        tracked(&end)
    );
    assert!(daemon.stop(), "daemon did not exit 0");
}
