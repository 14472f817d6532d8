//! `ct-client`: a real client of MariaDB/MySQL, Redis, memcached or a
//! line-echo server that holds one connection, lets it go idle and reports
//! what happened, for the idle-kill integration tests.
//!
//! Each client is its own process, so the tests know the pid (and, with
//! `--comm`, the comm) that owns the socket. Socket options (keepalive,
//! TCP_USER_TIMEOUT) are set before connecting, exactly as given. Every step
//! is one line on stdout:
//!
//! - `connected LOCAL_PORT`, or `connect-error ERRNO` (then exit 1);
//! - MySQL only: `auth ok` or `auth error CODE MESSAGE...`;
//! - per request: `reply ok`, or `reply bad TEXT`;
//! - when a request, the idle wait or `--then wait-close` ends the
//!   connection: `peer-closed MS` (EOF), `error ERRNO MS` (ECONNRESET,
//!   ETIMEDOUT, EPIPE, ...), `no-reply MS` / `no-close MS` (nothing within
//!   `--timeout-secs`), and for MySQL `server-error CODE MESSAGE...` (an
//!   error packet before the close). MS is milliseconds since the last
//!   successful read or write on the socket;
//! - `closed` once the client closed its socket (MySQL sends COM_QUIT first
//!   unless `--no-quit` or the connection is already dead).
//!
//! The outcome lines are data, not failures: the exit status is 0 whenever
//! the client ran its script, 1 on a usage or setup error.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use integration_tests::helper::{HelperArgs, say, wait_go};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser)]
#[command(
    about = "Idle-connection client (MySQL, Redis, memcached, raw) for the conn-tracer tests"
)]
struct Cli {
    #[command(flatten)]
    helper: HelperArgs,
    #[command(subcommand)]
    proto: Proto,
}

#[derive(Subcommand)]
enum Proto {
    /// MySQL protocol: handshake with an empty password, `COM_QUERY` per request.
    Mysql(MysqlArgs),
    /// Redis: `PING` -> `+PONG`.
    Redis(Common),
    /// memcached text protocol: `version` -> `VERSION ...`.
    Memcached(Common),
    /// One line out, one line back (an echo server).
    Raw(RawArgs),
    /// HTTP/1.1 keep-alive `GET /` -> a `200` response (its body read by
    /// `Content-Length`).
    Http(Common),
}

#[derive(Args)]
struct MysqlArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value = "root")]
    user: String,
    /// The query each request runs; its first column of its first row must be `1`.
    #[arg(long, default_value = "SELECT 1")]
    query: String,
    /// Close without `COM_QUIT`, as a crashed client would (MariaDB counts it in Aborted_clients).
    #[arg(long)]
    no_quit: bool,
}

#[derive(Args)]
struct RawArgs {
    #[command(flatten)]
    common: Common,
    /// The line sent per request (a newline is added).
    #[arg(long, default_value = "ct-client ping")]
    line: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Then {
    /// One more request on the idle connection (a pooled connection reused).
    Send,
    /// Close the connection.
    Close,
    /// Wait (bounded by `--timeout-secs`) for the peer to close, then close.
    WaitClose,
}

#[derive(Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each is one command-line switch"
)]
struct Common {
    #[arg(long)]
    addr: IpAddr,
    #[arg(long)]
    port: u16,
    /// `SO_KEEPALIVE` on.
    #[arg(long)]
    keepalive: bool,
    /// `TCP_KEEPIDLE` seconds (set even without `--keepalive`).
    #[arg(long)]
    keepidle: Option<u32>,
    /// `TCP_KEEPINTVL` seconds.
    #[arg(long)]
    keepintvl: Option<u32>,
    /// `TCP_KEEPCNT` probes.
    #[arg(long)]
    keepcnt: Option<u32>,
    /// `TCP_USER_TIMEOUT` milliseconds.
    #[arg(long)]
    user_timeout_ms: Option<u32>,
    /// Requests before the idle period (a chatty client sends several).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Pause between those requests, milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Seconds to stay idle (no reads, no writes) after the last request.
    #[arg(long, default_value_t = 0.0)]
    idle_secs: f64,
    /// What to do after the idle period.
    #[arg(long, value_enum, default_value_t = Then::Close)]
    then: Then,
    /// Wait for a line on stdin before connecting (e.g. to be moved to a cgroup first).
    #[arg(long)]
    pause_before_connect: bool,
    /// Wait for a line on stdin after the idle period, before `--then`.
    #[arg(long)]
    pause_before_then: bool,
    /// Wait for a line on stdin before closing a connection still alive
    /// (an idle pooled connection held open).
    #[arg(long)]
    pause_before_close: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Never outlive the test that started us, even if it is killed.
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let timeout = cli.helper.start()?;
    match &cli.proto {
        Proto::Mysql(args) => run(&args.common, &mut Mysql::new(args), timeout),
        Proto::Redis(common) => run(
            common,
            &mut LineProto {
                request: b"PING\r\n".to_vec(),
                ok_prefix: b"+PONG".to_vec(),
            },
            timeout,
        ),
        Proto::Memcached(common) => run(
            common,
            &mut LineProto {
                request: b"version\r\n".to_vec(),
                ok_prefix: b"VERSION ".to_vec(),
            },
            timeout,
        ),
        Proto::Http(common) => run(common, &mut Http, timeout),
        Proto::Raw(args) => run(
            &args.common,
            &mut LineProto {
                request: format!("{}\n", args.line).into_bytes(),
                ok_prefix: args.line.as_bytes().to_vec(),
            },
            timeout,
        ),
    }
}

fn errno_name(err: &io::Error) -> String {
    let name = match err.raw_os_error() {
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ECONNABORTED) => "ECONNABORTED",
        Some(libc::EPIPE) => "EPIPE",
        Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(n) => return format!("errno{n}"),
        None => return format!("{:?}", err.kind()),
    };
    name.to_owned()
}

fn setsockopt_int(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> Result<()> {
    let value = libc::c_int::try_from(value).context("socket option value out of range")?;
    // SAFETY: the fd is open for the call; the option value is a c_int that
    // outlives it, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context(format!("setsockopt({level}, {name})"));
    }
    Ok(())
}

fn set_options(socket: &Socket, args: &Common) -> Result<()> {
    if args.keepalive {
        setsockopt_int(socket, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    }
    let tcp = [
        (libc::TCP_KEEPIDLE, args.keepidle),
        (libc::TCP_KEEPINTVL, args.keepintvl),
        (libc::TCP_KEEPCNT, args.keepcnt),
        (libc::TCP_USER_TIMEOUT, args.user_timeout_ms),
    ];
    for (name, value) in tcp {
        if let Some(value) = value {
            setsockopt_int(socket, libc::IPPROTO_TCP, name, value)?;
        }
    }
    Ok(())
}

/// How a step on the connection ended.
enum Outcome {
    Ok,
    /// The peer's bytes did not match the protocol; the text says what came.
    Bad(String),
    /// EOF before the expected bytes.
    PeerClosed,
    /// No byte within the read timeout.
    NoReply,
    /// The kernel failed the read or write.
    Error(io::Error),
    /// MySQL error packet: code and message.
    ServerError(u16, String),
}

impl Outcome {
    fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }
}

/// The connection, a receive buffer and the time of the last successful
/// read or write.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    last: Instant,
}

impl Conn {
    fn ms_since_last(&self) -> u128 {
        self.last.elapsed().as_millis()
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Outcome> {
        match self.stream.write_all(bytes) {
            Ok(()) => {
                self.last = Instant::now();
                Ok(())
            }
            Err(e) => Err(Outcome::Error(e)),
        }
    }

    /// Reads at least one more byte into the buffer.
    fn fill(&mut self) -> Result<(), Outcome> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Outcome::PeerClosed),
                Ok(n) => {
                    self.last = Instant::now();
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN)) => {
                    return Err(Outcome::NoReply);
                }
                Err(e) => return Err(Outcome::Error(e)),
            }
        }
    }

    /// Takes exactly `n` bytes off the buffer, reading as needed.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, Outcome> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Takes one line (without its `\n` or `\r\n`) off the buffer.
    fn line(&mut self) -> Result<Vec<u8>, Outcome> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            self.fill()?;
        }
    }
}

/// One protocol: the optional login after connecting, a request/reply
/// exchange, what a read while idle means, and a clean goodbye.
trait Dialogue {
    /// The login exchange after connecting, if the protocol has one.
    fn login(&mut self, _conn: &mut Conn) -> Option<Outcome> {
        None
    }
    fn request(&mut self, conn: &mut Conn) -> Outcome;
    /// Reads until the peer closes or fails; bytes before that are reported.
    fn wait_close(&mut self, conn: &mut Conn) -> Outcome {
        loop {
            if let Err(outcome) = conn.fill() {
                return outcome;
            }
            let junk = String::from_utf8_lossy(&std::mem::take(&mut conn.buf)).into_owned();
            say(&format!("unexpected {junk:?}"));
        }
    }
    fn goodbye(&mut self, _conn: &mut Conn) {}
}

/// A one-line request whose one-line reply starts with `ok_prefix`.
struct LineProto {
    request: Vec<u8>,
    ok_prefix: Vec<u8>,
}

impl Dialogue for LineProto {
    fn request(&mut self, conn: &mut Conn) -> Outcome {
        if let Err(outcome) = conn.write(&self.request) {
            return outcome;
        }
        match conn.line() {
            Ok(line) if line.starts_with(&self.ok_prefix) => Outcome::Ok,
            Ok(line) => Outcome::Bad(String::from_utf8_lossy(&line).into_owned()),
            Err(outcome) => outcome,
        }
    }
}

/// HTTP/1.1: `GET /` on a kept-alive connection, a `200` back.
struct Http;

impl Dialogue for Http {
    fn request(&mut self, conn: &mut Conn) -> Outcome {
        if let Err(outcome) = conn.write(b"GET / HTTP/1.1\r\nHost: ct-client\r\n\r\n") {
            return outcome;
        }
        let status = match conn.line() {
            Ok(line) => String::from_utf8_lossy(&line).into_owned(),
            Err(outcome) => return outcome,
        };
        let mut length = 0usize;
        loop {
            match conn.line() {
                Ok(line) if line.is_empty() => break,
                Ok(line) => {
                    let line = String::from_utf8_lossy(&line).to_ascii_lowercase();
                    if let Some(v) = line.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                Err(outcome) => return outcome,
            }
        }
        if let Err(outcome) = conn.take(length) {
            return outcome;
        }
        if status.starts_with("HTTP/1.1 200") {
            Outcome::Ok
        } else {
            Outcome::Bad(status)
        }
    }
}

// MySQL capability flags (protocol 4.1 handshake, no TLS, no database).
const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_LONG_FLAG: u32 = 4;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;
/// utf8mb4_general_ci.
const CHARSET: u8 = 45;

/// A minimal MySQL client: HandshakeResponse41 with an empty password
/// (enough for a server run with `--skip-grant-tables`), text queries.
struct Mysql {
    user: String,
    query: String,
    quit: bool,
}

impl Mysql {
    fn new(args: &MysqlArgs) -> Self {
        Self {
            user: args.user.clone(),
            query: args.query.clone(),
            quit: !args.no_quit,
        }
    }

    fn read_packet(conn: &mut Conn) -> Result<(u8, Vec<u8>), Outcome> {
        let header = conn.take(4)?;
        let len =
            usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        let payload = conn.take(len)?;
        Ok((header[3], payload))
    }

    fn write_packet(conn: &mut Conn, seq: u8, payload: &[u8]) -> Result<(), Outcome> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l < 1 << 24)
            .ok_or_else(|| Outcome::Bad("packet too large".into()))?;
        let mut packet = len.to_le_bytes()[..3].to_vec();
        packet.push(seq);
        packet.extend_from_slice(payload);
        conn.write(&packet)
    }

    /// `Some` if `payload` is an ERR packet.
    fn error_of(payload: &[u8]) -> Option<Outcome> {
        if payload.first() != Some(&0xff) || payload.len() < 3 {
            return None;
        }
        let code = u16::from_le_bytes([payload[1], payload[2]]);
        // Protocol 4.1: `#` and a 5-byte SQL state precede the message.
        let msg = payload.get(3..).unwrap_or_default();
        let msg = if msg.first() == Some(&b'#') {
            msg.get(6..).unwrap_or_default()
        } else {
            msg
        };
        Some(Outcome::ServerError(
            code,
            String::from_utf8_lossy(msg).into_owned(),
        ))
    }

    fn is_eof(payload: &[u8]) -> bool {
        payload.first() == Some(&0xfe) && payload.len() < 9
    }

    fn try_login(&self, conn: &mut Conn) -> Result<(), Outcome> {
        let (seq, greeting) = Self::read_packet(conn)?;
        if let Some(err) = Self::error_of(&greeting) {
            return Err(err);
        }
        if greeting.first() != Some(&10) {
            return Err(Outcome::Bad(format!(
                "handshake protocol {:?}, expected 10",
                greeting.first()
            )));
        }
        let caps = CLIENT_LONG_PASSWORD
            | CLIENT_LONG_FLAG
            | CLIENT_PROTOCOL_41
            | CLIENT_TRANSACTIONS
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH;
        let mut resp = Vec::new();
        resp.extend_from_slice(&caps.to_le_bytes());
        resp.extend_from_slice(&(16u32 << 20).to_le_bytes());
        resp.push(CHARSET);
        resp.extend_from_slice(&[0; 23]);
        resp.extend_from_slice(self.user.as_bytes());
        resp.push(0);
        // Empty auth response: no password.
        resp.push(0);
        resp.extend_from_slice(b"mysql_native_password\0");
        let mut seq = seq.wrapping_add(1);
        Self::write_packet(conn, seq, &resp)?;
        loop {
            let (s, reply) = Self::read_packet(conn)?;
            match reply.first() {
                Some(0x00) => return Ok(()),
                // Auth switch request: answer with the empty password again.
                Some(0xfe) => {
                    seq = s.wrapping_add(1);
                    Self::write_packet(conn, seq, &[])?;
                }
                _ => {
                    return Err(Self::error_of(&reply).unwrap_or_else(|| {
                        Outcome::Bad(format!("unexpected auth reply {reply:02x?}"))
                    }));
                }
            }
        }
    }

    fn try_query(&self, conn: &mut Conn) -> Result<(), Outcome> {
        let mut payload = vec![COM_QUERY];
        payload.extend_from_slice(self.query.as_bytes());
        Self::write_packet(conn, 0, &payload)?;
        let (_, first) = Self::read_packet(conn)?;
        if let Some(err) = Self::error_of(&first) {
            return Err(err);
        }
        if first.first() == Some(&0x00) {
            return Err(Outcome::Bad(
                "OK packet where a result set was expected".into(),
            ));
        }
        // Column count (a length-encoded integer below 251 for any sane query).
        let columns = first.first().copied().unwrap_or_default();
        if columns == 0 || columns >= 251 {
            return Err(Outcome::Bad(format!("column count packet {first:02x?}")));
        }
        for _ in 0..columns {
            Self::read_packet(conn)?;
        }
        let (_, eof) = Self::read_packet(conn)?;
        if !Self::is_eof(&eof) {
            return Err(Outcome::Bad(format!(
                "no EOF after the columns: {eof:02x?}"
            )));
        }
        let mut first_row = None;
        loop {
            let (_, row) = Self::read_packet(conn)?;
            if Self::is_eof(&row) {
                break;
            }
            if let Some(err) = Self::error_of(&row) {
                return Err(err);
            }
            first_row.get_or_insert(row);
        }
        // The first column of the first row: a length-encoded string "1".
        match first_row {
            Some(row) if row.starts_with(&[1, b'1']) => Ok(()),
            other => Err(Outcome::Bad(format!(
                "first row {other:02x?}, expected \"1\""
            ))),
        }
    }
}

impl Dialogue for Mysql {
    fn login(&mut self, conn: &mut Conn) -> Option<Outcome> {
        Some(match self.try_login(conn) {
            Ok(()) => Outcome::Ok,
            Err(outcome) => outcome,
        })
    }

    fn request(&mut self, conn: &mut Conn) -> Outcome {
        match self.try_query(conn) {
            Ok(()) => Outcome::Ok,
            Err(outcome) => outcome,
        }
    }

    fn wait_close(&mut self, conn: &mut Conn) -> Outcome {
        loop {
            match Self::read_packet(conn) {
                Err(outcome) => return outcome,
                // MySQL 8 says why before closing an idle session; report it
                // and go on waiting for the close itself.
                Ok((_, payload)) => match Self::error_of(&payload) {
                    Some(Outcome::ServerError(code, msg)) => {
                        say(&format!("server-error {code} {msg}"));
                    }
                    _ => say(&format!("unexpected packet {payload:02x?}")),
                },
            }
        }
    }

    fn goodbye(&mut self, conn: &mut Conn) {
        if self.quit {
            let _ = Self::write_packet(conn, 0, &[COM_QUIT]);
        }
    }
}

/// Prints `outcome` (with the time since the last I/O for the failures);
/// returns true if the connection is still usable.
fn report(outcome: &Outcome, conn: &Conn, ok_line: &str) -> bool {
    let ms = conn.ms_since_last();
    match outcome {
        Outcome::Ok => say(ok_line),
        Outcome::Bad(text) => say(&format!("reply bad {text}")),
        Outcome::PeerClosed => say(&format!("peer-closed {ms}")),
        Outcome::NoReply => say(&format!("no-reply {ms}")),
        Outcome::Error(e) => say(&format!("error {} {ms}", errno_name(e))),
        Outcome::ServerError(code, msg) => say(&format!("server-error {code} {msg}")),
    }
    outcome.is_ok()
}

fn connect(args: &Common, timeout: Duration) -> Result<Conn> {
    let addr = SocketAddr::new(args.addr, args.port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    set_options(&socket, args)?;
    if let Err(e) = socket.connect_timeout(&addr.into(), timeout) {
        say(&format!("connect-error {}", errno_name(&e)));
        return Err(e).with_context(|| format!("connect {addr}"));
    }
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    say(&format!("connected {}", stream.local_addr()?.port()));
    Ok(Conn {
        stream,
        buf: Vec::new(),
        last: Instant::now(),
    })
}

fn run(args: &Common, proto: &mut dyn Dialogue, timeout: Duration) -> Result<()> {
    if !args.idle_secs.is_finite() || args.idle_secs < 0.0 {
        bail!("--idle-secs must be a non-negative number of seconds");
    }
    if args.pause_before_connect {
        wait_go(timeout)?;
    }
    let mut conn = connect(args, timeout)?;
    let mut alive = match proto.login(&mut conn) {
        Some(Outcome::ServerError(code, msg)) => {
            say(&format!("auth error {code} {msg}"));
            false
        }
        Some(outcome) => report(&outcome, &conn, "auth ok"),
        None => true,
    };
    for i in 0..args.count {
        if !alive {
            break;
        }
        if i > 0 {
            thread::sleep(Duration::from_millis(args.interval_ms));
        }
        alive = report(&proto.request(&mut conn), &conn, "reply ok");
    }
    if alive {
        thread::sleep(Duration::from_secs_f64(args.idle_secs));
        if args.pause_before_then {
            wait_go(timeout)?;
        }
        match args.then {
            Then::Send => alive = report(&proto.request(&mut conn), &conn, "reply ok"),
            Then::Close => {}
            Then::WaitClose => match proto.wait_close(&mut conn) {
                // A read timeout here means the peer never closed: the
                // connection is still up and gets a clean goodbye.
                Outcome::NoReply => say(&format!("no-close {}", conn.ms_since_last())),
                other => {
                    report(&other, &conn, "reply ok");
                    alive = false;
                }
            },
        }
    }
    if alive {
        if args.pause_before_close {
            wait_go(timeout)?;
        }
        proto.goodbye(&mut conn);
    }
    drop(conn);
    say("closed");
    Ok(())
}
