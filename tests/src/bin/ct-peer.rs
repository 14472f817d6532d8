//! `ct-peer`: the TCP client and server the integration tests trace.
//!
//! Each role runs as its own process so that the tests know the pid (and,
//! with `--comm`, the exact comm) that must own each socket. Every step that
//! the tests synchronise on is one line on stdout; every blocking call is
//! bounded by `--timeout-secs`, so a broken tracer or test never hangs here.
//!
//! Server lines: `listening PORT`, then per connection `accepted IP PORT` and
//! one of `eof PEER_PORT BYTES`, `read-error PEER_PORT ERRNO_NAME BYTES` or
//! (with `--close-first`) `closed PEER_PORT`; `done` at the end. With
//! `--hold`: `held COUNT` once all are accepted (nothing per connection);
//! they stay open until a line on stdin, then `done`.
//! Client lines: `connected LOCAL_PORT` (after the payload is written) or
//! `refused`; `eof BYTES` with `--wait-eof`; `closed`.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use integration_tests::helper::{HelperArgs, raise_fd_limit, say, wait_go};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// What the client writes after connecting: one line, so a server that closes
/// first can read exactly all of it (closing with unread data sends a RST).
const PAYLOAD: &[u8] = b"ct-peer hello\n";

#[derive(Parser)]
#[command(about = "TCP client/server peer for the conn-tracer integration tests")]
struct Cli {
    #[command(flatten)]
    helper: HelperArgs,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Listen, accept connections one after another, read each until EOF, close.
    Server(ServerArgs),
    /// Connect, write one line, close.
    Client(ClientArgs),
}

#[derive(Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent command-line flags"
)]
struct ServerArgs {
    #[arg(long)]
    addr: IpAddr,
    /// 0 picks a free port (printed on the `listening` line).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Connections to accept before closing the listener.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// For an IPv6 address: clear `IPV6_V6ONLY` so IPv4 clients reach it as `::ffff:a.b.c.d`.
    #[arg(long)]
    dual_stack: bool,
    /// Close accepted sockets with `SO_LINGER {on, 0}`, which sends a RST.
    #[arg(long)]
    linger0: bool,
    /// Read the client's line and close at once, before the client closes.
    #[arg(long)]
    close_first: bool,
    /// Accept `count` connections and hold them all open (reading nothing)
    /// until a line on stdin; the open-file limit is raised to the hard one.
    #[arg(long)]
    hold: bool,
}

#[derive(Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent command-line flags"
)]
struct ClientArgs {
    #[arg(long)]
    addr: IpAddr,
    #[arg(long)]
    port: u16,
    /// Close with `SO_LINGER {on, 0}`, which sends a RST instead of a FIN.
    #[arg(long)]
    linger0: bool,
    /// Succeed (print `refused`) only if connect fails with `ECONNREFUSED`.
    #[arg(long)]
    expect_refused: bool,
    /// Wait for a line on stdin before connecting (e.g. to be moved to a cgroup first).
    #[arg(long)]
    pause_before_connect: bool,
    /// Wait for a line on stdin before closing.
    #[arg(long)]
    pause_before_close: bool,
    /// Read until the server closes before closing.
    #[arg(long)]
    wait_eof: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let timeout = cli.helper.start()?;
    match cli.role {
        Role::Server(args) => server(&args, timeout),
        Role::Client(args) => client(&args, timeout),
    }
}

fn errno_name(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(n) => format!("errno{n}"),
        None => format!("{:?}", err.kind()),
    }
}

fn set_linger0(stream: &TcpStream) -> Result<()> {
    SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .context("setsockopt(SO_LINGER, {on, 0})")
}

fn server(args: &ServerArgs, timeout: Duration) -> Result<()> {
    let addr = SocketAddr::new(args.addr, args.port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(!args.dual_stack)
            .context("setsockopt(IPV6_V6ONLY)")?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    socket
        .listen(if args.hold { 4096 } else { 16 })
        .context("listen")?;
    let listener: TcpListener = socket.into();
    let port = listener.local_addr()?.port();
    if args.hold {
        raise_fd_limit()?;
    }
    say(&format!("listening {port}"));
    if args.hold {
        let held = (0..args.count)
            .map(|_| accept_within(&listener, timeout).map(|(s, _)| s))
            .collect::<Result<Vec<_>>>()?;
        say(&format!("held {}", held.len()));
        wait_go(timeout)?;
        drop(held);
        say("done");
        return Ok(());
    }
    for _ in 0..args.count {
        let (stream, peer) = accept_within(&listener, timeout)?;
        say(&format!("accepted {} {}", peer.ip(), peer.port()));
        serve(stream, peer.port(), args, timeout)?;
    }
    drop(listener);
    say("done");
    Ok(())
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> Result<(TcpStream, SocketAddr)> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    match n {
        0 => bail!("no connection to accept within {timeout:?}"),
        n if n < 0 => Err(io::Error::last_os_error()).context("poll on the listener"),
        _ => listener.accept().context("accept"),
    }
}

fn serve(
    mut stream: TcpStream,
    peer_port: u16,
    args: &ServerArgs,
    timeout: Duration,
) -> Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    if args.close_first {
        let mut line = Vec::new();
        BufReader::new(&stream)
            .read_until(b'\n', &mut line)
            .context("reading the client's line")?;
        if line != PAYLOAD {
            bail!("expected {PAYLOAD:?} from the client, got {line:?}");
        }
        if args.linger0 {
            set_linger0(&stream)?;
        }
        drop(stream);
        say(&format!("closed {peer_port}"));
        return Ok(());
    }
    let mut total = 0usize;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                say(&format!("eof {peer_port} {total}"));
                break;
            }
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                say(&format!(
                    "read-error {peer_port} {} {total}",
                    errno_name(&e)
                ));
                break;
            }
        }
    }
    if args.linger0 {
        set_linger0(&stream)?;
    }
    Ok(())
}

fn client(args: &ClientArgs, timeout: Duration) -> Result<()> {
    if args.pause_before_connect {
        wait_go(timeout)?;
    }
    let addr = SocketAddr::new(args.addr, args.port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    match socket.connect_timeout(&addr.into(), timeout) {
        Err(e) if args.expect_refused && e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            say("refused");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("connect {addr}")),
        Ok(()) if args.expect_refused => bail!("connected to {addr}, expected ECONNREFUSED"),
        Ok(()) => {}
    }
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(PAYLOAD).context("writing the payload")?;
    say(&format!("connected {}", stream.local_addr()?.port()));
    if args.pause_before_close {
        wait_go(timeout)?;
    }
    if args.wait_eof {
        let mut rest = Vec::new();
        let n = stream.read_to_end(&mut rest).context("reading until EOF")?;
        say(&format!("eof {n}"));
    }
    if args.linger0 {
        set_linger0(&stream)?;
    }
    drop(stream);
    say("closed");
    Ok(())
}
