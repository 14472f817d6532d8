//! The lab: a network namespace of the selftest's own, and the loopback
//! connections its scenarios make there.

use super::*;

pub(super) fn setsockopt_int(fd: RawFd, level: u32, name: u32, value: i32) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level as i32,
            name as i32,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a `getsockopt` into a buffer of `len` bytes, all 0xAA before the
/// call, gave back: the errno (0: it succeeded), the length the kernel
/// wrote, and the buffer.
pub(super) fn getsockopt_raw(
    fd: RawFd,
    level: i32,
    name: i32,
    len: usize,
) -> (i32, usize, Vec<u8>) {
    let mut buf = vec![0xAA_u8; len];
    let mut n = len as libc::socklen_t;
    // SAFETY: a valid fd, a buffer of `n` bytes and a pointer to its length.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &raw mut n) };
    let errno = if rc == 0 {
        0
    } else {
        io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    };
    (errno, n as usize, buf)
}

/// SO_LINGER {on, 0}: close() then aborts with a reset.
pub(super) fn linger_zero(s: &TcpStream) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd and a pointer to a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A loopback connection: the listener, the connecting (client) socket and
/// the accepted (server) socket.
pub(super) struct Pair {
    /// Kept open with the connection: the daemon's resync tells accepted
    /// sockets by their listener.
    pub(super) _listener: TcpListener,
    pub(super) client: TcpStream,
    pub(super) server: TcpStream,
    pub(super) client_port: u16,
    pub(super) server_port: u16,
}

impl Pair {
    pub(super) fn open() -> io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let server_port = listener.local_addr()?.port();
        let client = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, server_port)),
            STEP_TIMEOUT,
        )?;
        let server = accept_within(&listener, STEP_TIMEOUT)?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(STEP_TIMEOUT))?;
            s.set_write_timeout(Some(STEP_TIMEOUT))?;
        }
        let client_port = client.local_addr()?.port();
        Ok(Self {
            _listener: listener,
            client,
            server,
            client_port,
            server_port,
        })
    }

    /// Client sends a line, server answers one. Returns CLOCK_MONOTONIC
    /// right before the server's answer and right after the client read it:
    /// the last payload either way is between the two.
    pub(super) fn exchange(&mut self) -> io::Result<(u64, u64)> {
        let mut buf = [0u8; 5];
        self.client.write_all(b"ping\n")?;
        self.server.read_exact(&mut buf)?;
        let before = monotonic_ns();
        self.server.write_all(b"pong\n")?;
        self.client.read_exact(&mut buf)?;
        Ok((before, monotonic_ns()))
    }
}

impl Pair {
    /// The server closes (FIN), the client reads the end and closes.
    /// Returns CLOCK_MONOTONIC right before the server's close and right
    /// after the client saw it: the end is between the two.
    pub(super) fn peer_closes(self) -> io::Result<(u64, u64)> {
        let Self {
            mut client, server, ..
        } = self;
        let before = monotonic_ns();
        drop(server);
        read_to_eof(&mut client)?;
        Ok((before, monotonic_ns()))
    }

    /// The client closes first, the server reads the end and closes:
    /// returns (client port, server port).
    pub(super) fn owner_closes(self) -> io::Result<(u16, u16)> {
        let ports = (self.client_port, self.server_port);
        let Self {
            client, mut server, ..
        } = self;
        drop(client);
        read_to_eof(&mut server)?;
        Ok(ports)
    }

    /// The server aborts with a reset (SO_LINGER {on, 0}); the client reads.
    /// Returns the ports and the client's read error.
    pub(super) fn peer_aborts(self) -> io::Result<((u16, u16), Option<i32>)> {
        let ports = (self.client_port, self.server_port);
        let Self {
            mut client, server, ..
        } = self;
        linger_zero(&server)?;
        drop(server);
        let read = client.read(&mut [0u8; 8]);
        Ok((ports, read.err().and_then(|e| e.raw_os_error())))
    }
}

impl Pair {
    /// The server's socket vanishes without a word (TCP_REPAIR, then close:
    /// no FIN, no RST, as when a NAT or a gone peer forgot the flow); after
    /// `silence` the client sends, the server's kernel answers the unknown
    /// segment with a reset, and the client's read fails. Returns the
    /// ports and that read's error.
    pub(super) fn peer_vanishes_then_send(
        self,
        silence: Duration,
    ) -> io::Result<((u16, u16), Option<i32>)> {
        let ports = (self.client_port, self.server_port);
        let Self {
            mut client,
            server,
            _listener: listener,
            ..
        } = self;
        // TCP_REPAIR (include/uapi/linux/tcp.h); needs CAP_NET_ADMIN.
        setsockopt_int(server.as_raw_fd(), libc::IPPROTO_TCP as u32, 19, 1)?;
        drop(server);
        thread::sleep(silence);
        client.write_all(b"late\n")?;
        let read = client.read(&mut [0u8; 8]);
        drop(listener);
        Ok((ports, read.err().and_then(|e| e.raw_os_error())))
    }
}

pub(super) fn accept_within(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads until end of stream (the peer's FIN); bounded by the read timeout.
pub(super) fn read_to_eof(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 64];
    loop {
        if s.read(&mut buf)? == 0 {
            return Ok(());
        }
    }
}

/// The thread that lives in the selftest's network namespace and creates
/// every scenario socket there, running jobs sent to it one at a time.
pub(super) struct Lab {
    pub(super) jobs: Option<Sender<Job>>,
    pub(super) thread: Option<JoinHandle<()>>,
    /// The namespace's inode, as events report it.
    pub(super) netns: u32,
    /// The thread's comm, as the kernel records it.
    pub(super) comm: String,
}

pub(super) type Job = Box<dyn FnOnce() + Send>;

impl Lab {
    pub(super) fn start() -> Result<Self, String> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name(LAB_COMM.to_string())
            .spawn(move || {
                let setup = enter_new_netns();
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup);
                if ok {
                    while let Ok(job) = job_rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|e| format!("cannot start the scenario thread: {e}"))?;
        match ready_rx.recv_timeout(STEP_TIMEOUT) {
            Ok(Ok((netns, comm))) => Ok(Self {
                jobs: Some(jobs),
                thread: Some(thread),
                netns,
                comm,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(format!(
                "the scenario thread did not set up its network namespace within {STEP_TIMEOUT:?}"
            )),
        }
    }

    /// Runs `f` on the lab thread and returns its result (bounded).
    pub(super) fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Seen<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or("the scenario thread is gone")?;
        rx.recv_timeout(STEP_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => {
                format!("a socket step took longer than {STEP_TIMEOUT:?}")
            }
            RecvTimeoutError::Disconnected => "the scenario thread failed".to_string(),
        })
    }
}

impl Drop for Lab {
    /// Ends the thread (the namespace goes with it and its last socket).
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// unshare(CLONE_NEWNET) for this thread, `lo` up: (namespace inode, comm).
pub(super) fn enter_new_netns() -> Result<(u32, String), String> {
    // SAFETY: unshare affects only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(format!(
            "cannot create a network namespace (unshare CLONE_NEWNET: {e}): selftest needs root \
             (CAP_SYS_ADMIN)"
        ));
    }
    loopback_up().map_err(|e| format!("cannot bring lo up in the new namespace: {e}"))?;
    let link = std::fs::read_link("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    let ino = crate::sys::netns::parse_ns_link(&link.to_string_lossy())
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| format!("/proc/thread-self/ns/net is {}", link.display()))?;
    let comm = std::fs::read_to_string("/proc/thread-self/comm")
        .map_or_else(|_| LAB_COMM.to_string(), |c| c.trim_end().to_string());
    Ok((ino, comm))
}

/// `ip link set lo up`, with SIOCGIFFLAGS / SIOCSIFFLAGS.
pub(super) fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ioctls on a valid socket with a valid ifreq.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &raw const req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
