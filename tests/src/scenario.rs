//! What the scenario tests share: loopback addresses, `ct-client` runs and
//! the keepalive settings they use.

use std::net::{Ipv4Addr, SocketAddr};

use crate::{NetNs, Peer, daemon::Daemon, netlab::NetLab, servers::Redis};

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
}

/// The CLOSE_WAIT scenarios' start: a namespace, Redis on `port` in it
/// closing clients idle `redis_timeout_s`, and a daemon whose CLOSE_WAIT
/// threshold is `close_wait` (e.g. `1s`). Bind them in this order (they
/// drop in reverse: the namespace last).
pub fn redis_close_wait_lab(
    port: u16,
    redis_timeout_s: u32,
    close_wait: &str,
) -> (NetNs, Redis, Daemon) {
    let ns = NetNs::new();
    let redis = Redis::start(&ns, local(port), redis_timeout_s);
    let daemon = Daemon::start("1s", &["--close-wait-threshold", close_wait]);
    (ns, redis, daemon)
}

/// Two Redis clients across the lab that idle 4 s, then send with a 2 s
/// user timeout: `silent`, and `kept`, which has keepalive 1/1/3 as well.
pub struct IdleClients {
    pub silent: Peer,
    pub kept: Peer,
    /// The silent client's port.
    pub silent_port: u16,
}

impl IdleClients {
    /// Both connected, their first replies `ok`; `program` is the test
    /// binary's `CARGO_BIN_EXE_ct-client`.
    #[track_caller]
    pub fn start(program: &str, lab: &NetLab, redis: SocketAddr) -> Self {
        let idle = args("--idle-secs 4 --then send --user-timeout-ms 2000");
        let mut silent = ct_client(program, lab.client(), "redis", redis, &idle);
        let kept_args = [&idle[..], &KEEPALIVE_1_1_3[..]].concat();
        let mut kept = ct_client(program, lab.client(), "redis", redis, &kept_args);
        let silent_port = silent.expect_port("connected");
        kept.expect_port("connected");
        assert_eq!(silent.expect_line("reply"), ["ok"]);
        assert_eq!(kept.expect_line("reply"), ["ok"]);
        Self {
            silent,
            kept,
            silent_port,
        }
    }

    /// The end on a path that drops expired flows: the silent client's
    /// send fails (its `error` words, returned) and it closes; keepalive
    /// kept the other's flow alive (its next reply `ok`); the router dropped
    /// packets of the expired one.
    #[track_caller]
    pub fn expect_drop_outcome(mut self, lab: &NetLab) -> Vec<String> {
        let words = self.silent.expect_line("error");
        self.silent.expect_closed_then_exit();
        assert_eq!(
            self.kept.expect_line("reply"),
            ["ok"],
            "keepalive kept the flow alive"
        );
        self.kept.expect_closed_then_exit();
        assert!(
            lab.invalid_packets() >= 1,
            "the router dropped the expired flow's packets"
        );
        words
    }
}

/// A `ct-client` that waits (15 s at most) for the server to close.
pub const WAIT_CLOSE_15S: [&str; 4] = ["--then", "wait-close", "--timeout-secs", "15"];

/// `ct-client`'s keepalive flags for a probe a second after a second of
/// silence, the connection dead after 3 unanswered: faster than any idle
/// expiry in the tests (2 s and more).
pub const KEEPALIVE_1_1_3: [&str; 7] = [
    "--keepalive",
    "--keepidle",
    "1",
    "--keepintvl",
    "1",
    "--keepcnt",
    "3",
];

/// Arguments written as one line, split at spaces:
/// `args("--then wait-close")`.
pub fn args(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// [`ct_client`] with this package's `ct-client`:
/// `ct_client!(&ns, "redis", addr, &["--then", "wait-close"])`.
#[macro_export]
macro_rules! ct_client {
    ($ns:expr, $proto:expr, $addr:expr, $extra:expr $(,)?) => {
        $crate::scenario::ct_client(env!("CARGO_BIN_EXE_ct-client"), $ns, $proto, $addr, $extra)
    };
}

/// `ct-client PROTO --addr --port EXTRA...` inside `ns`; `program` is the
/// test binary's `CARGO_BIN_EXE_ct-client`.
pub fn ct_client(program: &str, ns: &NetNs, proto: &str, addr: SocketAddr, extra: &[&str]) -> Peer {
    let mut cmd = ns.command(program);
    cmd.args([proto, "--addr", &addr.ip().to_string(), "--port"])
        .arg(addr.port().to_string())
        .args(extra);
    Peer::spawn(&format!("ct-client {proto} {}", extra.join(" ")), cmd)
}

impl Peer {
    /// The start of a `ct-client` run: `connected PORT`, then its first
    /// reply, `ok`. Returns the port.
    #[track_caller]
    pub fn expect_connected_ok(&mut self) -> u16 {
        let port = self.expect_port("connected");
        assert_eq!(self.expect_line("reply"), ["ok"]);
        port
    }

    /// The end of a `ct-client --then wait-close` run: the server closed
    /// (`peer-closed MS`, whose words it returns), then `closed`, exit 0.
    #[track_caller]
    pub fn expect_peer_close(&mut self) -> Vec<String> {
        let words = self.expect_line("peer-closed");
        self.expect_closed_then_exit();
        words
    }

    /// The end of a `ct-client` run: `closed`, then exit 0.
    #[track_caller]
    pub fn expect_closed_then_exit(&mut self) {
        self.expect_line("closed");
        self.wait_success();
    }
}
