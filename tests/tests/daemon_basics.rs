//! `conn-tracer run` and `conn-tracer connections` as an operator meets
//! them: health, the contract's metric families, the live connection list
//! (including connections older than the daemon, with their true keepalive
//! settings), and clear errors for bad settings.

#![expect(
    clippy::float_cmp,
    reason = "metric values compared here are small integers, exact in f64"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use integration_tests::{NetNs, conn_tracer_bin, daemon::Daemon, serial_unless_skipped};

/// A Python client in `ns` that connects to a local listener with the given
/// keepalive settings (set before connecting), prints its ports, and holds
/// the connection until stdin closes.
const HOLDER: &str = r#"
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
c.connect(srv.getsockname()); a, _ = srv.accept()
c.sendall(b"hello"); a.recv(5)
print(c.getsockname()[1], srv.getsockname()[1], flush=True)
for line in sys.stdin:
    if line.strip() == "idle":
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 45)
        print("set", flush=True)
"#;

fn find_conn(list: &serde_json::Value, local_port: u16) -> Option<serde_json::Value> {
    list.as_array()?
        .iter()
        .find(|c| {
            c["local"]
                .as_str()
                .is_some_and(|l| l.ends_with(&format!(":{local_port}")))
        })
        .cloned()
}

#[test]
fn root_connections_older_than_the_daemon_show_their_true_keepalive() {
    let _serial = serial_unless_skipped!();
    let ns = NetNs::new();
    let mut holder = ns
        .command("python3")
        .args(["-c", HOLDER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(holder.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("ports");
    let mut ports = line
        .split_whitespace()
        .map(|p| p.parse::<u16>().expect("port"));
    let (client_port, server_port) = (ports.next().expect("client"), ports.next().expect("server"));

    // The daemon starts after the options were set and the connection opened.
    let daemon = Daemon::start("1s", &[]);
    let list = daemon.connections();
    let conn = find_conn(&list, client_port)
        .unwrap_or_else(|| panic!("client :{client_port} not in {list:#}"));
    assert_eq!(conn["state"], "ESTABLISHED", "{conn}");
    assert_eq!(conn["direction"], "outbound", "{conn}");
    assert_eq!(
        conn["owner"], "proc",
        "opened before the daemon, owner found in /proc: {conn}"
    );
    assert_eq!(conn["netns"].as_u64(), Some(ns.inode()), "{conn}");
    assert_eq!(conn["remote"], format!("127.0.0.1:{server_port}"), "{conn}");
    let ka = &conn["keepalive"];
    assert_eq!(ka["enabled"], true, "{conn}");
    assert_eq!(
        (
            ka["idle_s"].as_f64(),
            ka["interval_s"].as_f64(),
            ka["probes"].as_u64()
        ),
        (Some(30.0), Some(5.0), Some(3)),
        "{conn}"
    );
    assert_eq!(
        conn["bytes_acked"].as_u64(),
        Some(5 + 1),
        "5 payload bytes + SYN: {conn}"
    );
    assert!(conn["idle_s"].as_f64().is_some_and(|i| i < 30.0), "{conn}");
    let server_side = find_conn(&list, server_port).expect("accepted side listed");
    assert_eq!(server_side["direction"], "inbound", "{server_side}");
    assert_eq!(server_side["keepalive"]["enabled"], false, "{server_side}");

    // An option set now is seen live, and counted as a sockopt.
    let before = daemon.scrape().sum(
        "conntracer_keepalive_sockopts_total",
        &[("option", "TCP_KEEPIDLE"), ("value", "45")],
    );
    writeln!(holder.stdin.as_mut().expect("stdin"), "idle").expect("write");
    line.clear();
    out.read_line(&mut line).expect("set");
    let list = daemon.connections();
    let conn = find_conn(&list, client_port).expect("still listed");
    assert_eq!(conn["keepalive"]["idle_s"].as_f64(), Some(45.0), "{conn}");
    let m = daemon.wait_metrics(Duration::from_secs(5), |m| {
        m.sum(
            "conntracer_keepalive_sockopts_total",
            &[("option", "TCP_KEEPIDLE"), ("value", "45")],
        ) > before
    });
    assert_eq!(
        m.sum(
            "conntracer_keepalive_sockopts_total",
            &[
                ("option", "TCP_KEEPIDLE"),
                ("value", "45"),
                ("role", "host")
            ]
        ) - before,
        1.0,
        "{}",
        m.dump("conntracer_keepalive_sockopts_total")
    );

    // The table view of the same daemon.
    let table = Command::new(conn_tracer_bin())
        .args(["connections", "--from", &format!("http://{}", daemon.addr)])
        .output()
        .expect("conn-tracer connections");
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    let row = text
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(format!("127.0.0.1:{client_port}").as_str()))
        .unwrap_or_else(|| panic!("no row for :{client_port} in\n{text}"));
    assert!(
        row.contains("keepalive(45/5/3)")
            && row.contains("ESTABLISHED")
            && row.contains("outbound"),
        "{row}"
    );
    assert!(text.starts_with("STATE"), "{text}");

    drop(holder.stdin.take());
    let _ = holder.wait();
    assert!(daemon.stop(), "daemon exits 0 on SIGTERM");
}

#[test]
fn root_daemon_serves_health_and_contract_metrics() {
    let _serial = serial_unless_skipped!();
    let daemon = Daemon::start("1s", &[]);
    let (status, body) =
        integration_tests::daemon::http_get(daemon.addr, "/healthz").expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok: kernel programs attached"));
    let (status, _) = integration_tests::daemon::http_get(daemon.addr, "/nope").expect("404");
    assert_eq!(status, 404);
    let m = daemon.scrape();
    for family in [
        "conntracer_build_info",
        "conntracer_events_lost_total",
        "conntracer_tracked_connections",
    ] {
        assert!(m.has(family), "{family} missing");
    }
    assert_eq!(m.sum("conntracer_events_lost_total", &[]), 0.0);
    assert_eq!(
        m.sum(
            "conntracer_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(daemon.stop());
}

/// A Python client in its namespace: keepalive set and read back, TCP_INFO
/// read into a buffer larger than the page the kernel hands socket-option
/// programs, a request and its answer, the client's own close; prints
/// the client's port and what the calls returned.
const OPTIONS_ROUND_TRIP: &str = r#"
import ctypes, socket
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 40)
c.connect(srv.getsockname()); a, _ = srv.accept()
c.sendall(b"ping"); a.recv(4); a.sendall(b"pong"); c.recv(4)
ka = c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
idle = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
# Python caps getsockopt buffers at 1024 bytes: libc's, with 8 KiB.
libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(8192); n = ctypes.c_uint32(8192)
rc = libc.getsockopt(c.fileno(), socket.IPPROTO_TCP, socket.TCP_INFO, buf, ctypes.byref(n))
print(c.getsockname()[1], ka, idle, rc, buf.raw[0], n.value > 100, flush=True)
c.close(); a.close(); srv.close()
"#;

/// `CONN_TRACER_DISARMED=1` (the benchmark's floor): every program is
/// attached, none traces anything, and the socket-option programs still
/// leave every call's answer as the kernel gave it.
#[test]
fn root_disarmed_programs_trace_nothing_and_leave_socket_options_alone() {
    let _serial = serial_unless_skipped!();
    let daemon = Daemon::start_wrapped(&["env", "CONN_TRACER_DISARMED=1"], "1s", &[]);
    assert!(
        daemon.stderr().contains("CONN_TRACER_DISARMED=1"),
        "the daemon says it is disarmed: {}",
        daemon.stderr()
    );
    let ns = NetNs::new();
    let out = ns
        .command("python3")
        .args(["-c", OPTIONS_ROUND_TRIP])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    // Keepalive on, idle 40 s; TCP_INFO into 8 KiB answered (rc 0), for an
    // established socket (state 1), whole.
    assert_eq!(&fields[1..], ["1", "40", "0", "1", "True"], "{stdout}");
    let port = fields[0];
    thread::sleep(Duration::from_millis(300));
    let list = daemon.connections();
    assert!(
        find_conn(&list, port.parse().expect("port")).is_none(),
        "disarmed, the connection is not tracked: {list:#}"
    );
    // Disarmed, no program sends anything, for any socket of the host.
    let m = daemon.scrape();
    assert_eq!(
        m.sum("conntracer_events_total", &[]),
        0.0,
        "{}",
        m.dump("conntracer_events_total")
    );
    assert_eq!(m.sum("conntracer_events_lost_total", &[]), 0.0);
    assert!(daemon.stop());
}

/// `conn-tracer run args` exits 2 with every one of `needles` on stderr.
fn refused(args: &[&str], needles: &[&str]) {
    let out = Command::new(conn_tracer_bin())
        .arg("run")
        .args(args)
        .output()
        .expect("conn-tracer run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: no {needle:?} in {stderr}"
        );
    }
}

#[test]
fn bad_settings_exit_2_with_a_clear_message() {
    // Flags: clap names the flag, validation names the setting.
    refused(
        &["--idle-threshold", "soon"],
        &["--idle-threshold", "not a duration"],
    );
    refused(&["--max-peers", "many"], &["--max-peers"]);
    refused(&["--max-connections=-1"], &["--max-connections"]);
    refused(&["--listen", "nowhere"], &["--listen"]);
    refused(&["--ring-bytes", "1000"], &["ring_bytes", "power of two"]);
    refused(&["--max-peers", "0"], &["max_peers", "at least 1"]);
    refused(&["--kernel-hz", "5"], &["kernel_hz"]);
    refused(
        &["--no-kube", "--kube-api", "http://x"],
        &["--kube-api", "--no-kube"],
    );
    refused(&["--no-such-flag"], &["--no-such-flag"]);

    // The config file: a bad value, an unknown key, a wrong type, broken
    // TOML; each message names the key (or the line).
    let dir =
        std::env::temp_dir().join(format!("ct-config-{}", integration_tests::unique_suffix()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    // (file, text, what the message must say, whether it is a parse error,
    // which names the file; a bad value is the setting's, file or flag)
    for (name, text, needles, parse) in [
        (
            "bad.toml",
            "ring_bytes = 1000\n",
            &["ring_bytes", "power of two"][..],
            false,
        ),
        (
            "typo.toml",
            "idel_threshold = \"1s\"\n",
            &["idel_threshold", "unknown field"],
            true,
        ),
        (
            "type.toml",
            "max_peers = \"many\"\n",
            &["max_peers", "\"many\"", "invalid type"],
            true,
        ),
        (
            "listen.toml",
            "listen = \"nowhere\"\n",
            &["listen", "nowhere"],
            true,
        ),
        (
            "duration.toml",
            "resync_interval = \"0s\"\n",
            &["resync_interval", "at least 1s"],
            false,
        ),
        (
            "port.toml",
            "inbound_capture_port = 0\n",
            &["inbound_capture_port"],
            false,
        ),
        ("table.toml", "[listen]\nport = 1\n", &["listen"], true),
        (
            "syntax.toml",
            "max_peers = 5\nmax_connections = = 3\n",
            &["line 2", "max_connections"],
            true,
        ),
        (
            "conflict.toml",
            "no_kube = true\nkube_api = \"http://x\"\n",
            &["kube_api", "no_kube"],
            false,
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        let path = path.to_str().expect("utf-8");
        let mut with_file = needles.to_vec();
        if parse {
            with_file.push(path);
        }
        refused(&["--config", path], &with_file);
    }
    refused(
        &["--config", "/nonexistent/conn-tracer.toml"],
        &["/nonexistent/conn-tracer.toml"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
