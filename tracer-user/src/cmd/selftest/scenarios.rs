//! The scenarios, each a list of checks.

use super::{
    CLOSED_PORT, Check, Checks, ConnEvent, Ctx, Duration, EventData, Ipv4Addr, Ka, KeepaliveView,
    Kernel, OLDER_KA, Pair, SILENCE, SOCKOPT_KA, STEP_TIMEOUT, Seen, SocketAddr, THRESHOLD,
    TcpStream, classify, close_flags, errno_name, getsockopt_raw, idle_bounds, idle_kill_counts,
    increments, monotonic_ns, on_off, owner_pid, procfs, seen, show_transitions, sockopt_name,
    state_name, tcp_state, thread, track, transitions, yes_no,
};

/// A connection with keepalive, opened before the programs loaded: the
/// start-up snapshot finds it in the selftest's namespace, with keepalive
/// read from the socket and its owner found in /proc by the daemon's resync.
pub(super) fn older_connection(
    ctx: &mut Ctx<'_>,
    kernel: &mut Kernel,
    older: Result<&Pair, &String>,
) -> Vec<Check> {
    let mut c = Checks::new("older-connection");
    let pair = match older {
        Ok(p) => p,
        Err(e) => return c.setup_failed(e),
    };
    let netns = ctx.lab.netns;
    let started = monotonic_ns();
    let snap = match kernel.snapshot() {
        Ok(s) => s,
        Err(e) => return c.setup_failed(&format!("no snapshot: {e}")),
    };
    let total = snap.len();
    let state = &mut ctx.events.state;
    for e in &snap {
        if let EventData::Snapshot(s) = e.data {
            state.tracker.hz.observe(s.jiffies, e.info.ts_ns);
        }
    }
    let mine: Vec<ConnEvent> = snap.into_iter().filter(|e| e.info.netns == netns).collect();
    // What the daemon does with its start-up snapshot.
    state.resync(&mine, started);
    let find = |sport: u16, dport: u16| -> Seen<ConnEvent> {
        let n = mine.len();
        mine.iter()
            .find(|e| e.info.sock.sport == sport && e.info.sock.dport == dport)
            .copied()
            .ok_or_else(|| {
                format!("not among the {total} sockets of the snapshot ({n} in netns {netns})")
            })
    };
    let client = find(pair.client_port, pair.server_port);
    let server = find(pair.server_port, pair.client_port);
    c.equal(
        "found by its ports",
        format!("ESTABLISHED in netns {netns}"),
        seen(&client, |e| {
            format!(
                "{} in netns {}",
                state_name(e.info.sock.state),
                e.info.netns
            )
        }),
    );
    let hz = state.tracker.hz.get();
    c.equal(
        "keepalive (socket)",
        OLDER_KA.view(),
        client.clone().and_then(|e| match e.data {
            EventData::Snapshot(s) => Ok(Ka(KeepaliveView::new(&s.ka, hz))),
            _ => Err("not a snapshot record".to_string()),
        }),
    );
    let tracked = |r: &Seen<ConnEvent>| -> Seen<tracer_common::Owner> {
        let cookie = r.as_ref().map_err(Clone::clone)?.info.cookie;
        state
            .tracker
            .table
            .get(cookie)
            .map(|t| t.info.owner)
            .ok_or_else(|| "not in the daemon's table after resync".to_string())
    };
    c.equal(
        "owner (from /proc)",
        format!("{} (proc)", ctx.pid),
        seen(&tracked(&client), owner_pid),
    );
    // Its listener is in the snapshot too: the daemon tells the accepted
    // socket by it.
    let ephemeral = procfs::ephemeral_ports();
    c.equal(
        "accepted side direction",
        "inbound",
        seen(&tracked(&server), |o| {
            track::direction(o, pair.server_port, &ephemeral).as_str()
        }),
    );
    c.list
}

/// Connect, exchange, silence past the threshold, the server closes: an
/// idle kill by the peer's FIN, counted once.
pub(super) fn idle_peer_close(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("idle-peer-close");
    let before = idle_kill_counts(&ctx.events.state);
    let opened = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        let last = p.exchange()?;
        Ok((p, last))
    });
    let (pair, last) = match opened {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let (cport, sport) = (pair.client_port, pair.server_port);
    thread::sleep(SILENCE);
    let end_window = match ctx.in_lab(move || pair.peer_closes()) {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let client = ctx.events.opened(cport, sport);
    let server = ctx.events.opened(sport, cport);
    let end = ctx.events.end_of(client);
    // The server's end too: the counter below has then seen both ends.
    let _ = ctx.events.closed(server);
    c.owner(&end, ctx.pid);
    c.equal(
        "owner comm",
        ctx.lab.comm.clone(),
        seen(&end, |e| e.info.owner.comm_str()),
    );
    c.end(&end, "peer", "fin", true);
    let (lo, hi) = idle_bounds(last, end_window, ctx.events.hz().0);
    c.within(
        "idle at the end",
        lo.max(THRESHOLD),
        hi,
        seen(&end, |e| e.ending.idle_at_end)
            .and_then(|i| i.ok_or_else(|| "no idle time".to_string())),
    );
    c.equal(
        "keepalive",
        "off",
        seen(&end, |e| on_off(e.ending.keepalive)),
    );
    c.equal(
        "idle kills counted",
        "+1 direction=outbound closed_by=peer close_kind=fin keepalive=off".to_string(),
        Ok(increments(&before, &idle_kill_counts(&ctx.events.state))),
    );
    c.list
}

/// A send after the silence is answered by a reset (the peer forgot the
/// connection): a stale reuse, counted as an idle kill too.
pub(super) fn stale_reuse(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("stale-reuse");
    let done = after_exchange(ctx, move |p| p.peer_vanishes_then_send(SILENCE));
    let ((cport, sport), read_errno) = match done {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    client_read_reset(&mut c, read_errno);
    let cookie = ctx.events.opened(cport, sport);
    let end = ctx.events.end_of(cookie);
    c.owner(&end, ctx.pid);
    c.end(&end, "peer", "rst", true);
    c.equal(
        "stale reuse",
        "rst",
        seen(&end, |e| {
            classify::verdict(&e.ending, THRESHOLD)
                .stale_reuse
                .map_or("none", |o| o.as_str())
        }),
    );
    c.within(
        "silence before the send",
        SILENCE.saturating_sub(Duration::from_millis(20)),
        SILENCE + Duration::from_secs(2),
        seen(&end, |e| e.ending.silence_before_failed_send)
            .and_then(|i| i.ok_or_else(|| "no failed send".to_string())),
    );
    c.list
}

/// The client closes right after the exchange: its own close, no kill.
pub(super) fn owner_close(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("owner-close");
    let ports = after_exchange(ctx, Pair::owner_closes);
    let (cport, sport) = match ports {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let cookie = ctx.events.opened(cport, sport);
    let end = ctx.events.end_of(cookie);
    c.owner(&end, ctx.pid);
    c.end(&end, "local", "fin", false);
    c.list
}

/// The server aborts (SO_LINGER {on, 0}): a reset by the peer.
pub(super) fn peer_reset(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("peer-reset");
    let done = after_exchange(ctx, Pair::peer_aborts);
    let ((cport, sport), read_errno) = match done {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    client_read_reset(&mut c, read_errno);
    let cookie = ctx.events.opened(cport, sport);
    let end = ctx.events.end_of(cookie.clone());
    c.end(&end, "peer", "rst", false);
    let reset = cookie.and_then(|k| {
        ctx.events.wait("no tcp_receive_reset event", |evs| {
            evs.iter()
                .find(|e| e.info.cookie == k && e.data == EventData::ResetReceived)
                .map(|e| owner_pid(&e.info.owner))
        })
    });
    c.equal(
        "reset received, owner",
        format!("{} (known)", ctx.pid),
        reset,
    );
    c.equal(
        "reset flag at close",
        "yes",
        seen(&end, |e| {
            yes_no(e.data.flags & close_flags::RST_RECEIVED != 0)
        }),
    );
    c.equal(
        "error at close",
        "ECONNRESET",
        seen(&end, |e| errno_name(e.data.errno)),
    );
    c.list
}

/// A connect to a port nobody listens on: refused, SYN_SENT -> CLOSE on a
/// received reset, owned by this process.
/// `conntracer_connect_failures_total{reason}` in the selftest's state.
pub(super) fn connect_failures(state: &crate::metrics::State, reason: &str) -> u64 {
    state
        .metrics
        .connect_failures
        .collect()
        .iter()
        .flat_map(prometheus::proto::MetricFamily::get_metric)
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "reason" && l.value() == reason)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

pub(super) fn refused_connect(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("refused-connect");
    let refused_before = connect_failures(&ctx.events.state, "refused");
    let done = ctx.in_lab(|| {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, CLOSED_PORT));
        Ok(TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
            .err()
            .and_then(|e| e.raw_os_error()))
    });
    let errno = match done {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    errno_check(&mut c, "connect fails", "ECONNREFUSED", errno, "connected");
    // The only socket of the namespace that connects to the closed port.
    let socket = |evs: &[ConnEvent]| {
        evs.iter()
            .find(|e| e.info.sock.dport == CLOSED_PORT && e.info.cookie != 0)
            .map(|e| e.info.cookie)
    };
    let reset_owner = |evs: &[ConnEvent], k: u64| {
        evs.iter()
            .find(|e| e.info.cookie == k && e.data == EventData::ResetReceived)
            .map(|e| owner_pid(&e.info.owner))
    };
    // Everything there is to see, or as much as came within the bound: the
    // close summary is submitted after the transition it follows.
    let _ = ctx.events.wait("", |evs| {
        let k = socket(evs)?;
        let closed = transitions(evs, k).contains(&(tcp_state::SYN_SENT, tcp_state::CLOSE));
        let summary = evs
            .iter()
            .any(|e| e.info.cookie == k && matches!(e.data, EventData::Close(_)));
        (closed && summary && reset_owner(evs, k).is_some()).then_some(())
    });
    let evs = &ctx.events.seen;
    let cookie = socket(evs).ok_or_else(|| format!("no event for a connect to port {CLOSED_PORT}"));
    c.equal(
        "transitions",
        "CLOSE -> SYN_SENT, SYN_SENT -> CLOSE".to_string(),
        seen(&cookie, |&k| show_transitions(&transitions(evs, k))),
    );
    c.equal(
        "reset received, owner",
        format!("{} (known)", ctx.pid),
        cookie.clone().and_then(|k| {
            reset_owner(evs, k).ok_or_else(|| "no tcp_receive_reset event".to_string())
        }),
    );
    c.equal(
        "open summaries",
        0,
        seen(&cookie, |&k| {
            evs.iter()
                .filter(|e| e.info.cookie == k && matches!(e.data, EventData::Open(_)))
                .count()
        }),
    );
    // One summary of the failed connect, with its reason.
    c.equal(
        "connect failure",
        "1 refused".to_string(),
        seen(&cookie, |&k| {
            let reasons: Vec<&str> = evs
                .iter()
                .filter_map(|e| match e.data {
                    EventData::Close(d) if e.info.cookie == k => {
                        Some(classify::connect_failure(&d).map_or("not a failure", |r| r.as_str()))
                    }
                    _ => None,
                })
                .collect();
            format!("{} {}", reasons.len(), reasons.join(","))
        }),
    );
    c.equal(
        "connect failures counted",
        "+1 reason=refused".to_string(),
        Ok(format!(
            "+{} reason=refused",
            connect_failures(&ctx.events.state, "refused") - refused_before
        )),
    );
    c.list
}

/// Keepalive options set with setsockopt arrive as events with their
/// values and owner; the close summary reads the same settings from the
/// socket itself.
pub(super) fn keepalive_sockopt(ctx: &mut Ctx<'_>) -> Vec<Check> {
    let mut c = Checks::new("keepalive-sockopt");
    let ports = ctx.in_lab(|| {
        let mut p = Pair::open()?;
        SOCKOPT_KA.apply(&p.client)?;
        p.exchange()?;
        p.owner_closes()
    });
    let (cport, sport) = match ports {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let cookie = ctx.events.opened(cport, sport);
    // By cookie; by ports where the kernel could not tell the socket's.
    let on_client = |e: &ConnEvent, k: u64| {
        e.info.cookie == k
            || (e.info.cookie == 0 && e.info.sock.sport == cport && e.info.sock.dport == sport)
    };
    // Where cgroup programs cannot name the task (before 5.11), the owner
    // is the cgroup and uid the connect of the same socket recorded.
    let connect_owner = cookie.clone().ok().and_then(|k| {
        ctx.events
            .seen
            .iter()
            .find(|e| e.info.cookie == k && matches!(e.data, EventData::Open(_)))
            .map(|e| e.info.owner)
    });
    let by = |o: &tracer_common::Owner, task: bool| {
        if task {
            format!("by pid {}", o.pid)
        } else {
            format!("by uid {} in cgroup {}", o.uid, o.cgroup_id)
        }
    };
    let task = ctx.sockopt_task;
    let expected_by = if task {
        format!("by pid {}", ctx.pid)
    } else {
        connect_owner.map_or_else(|| "by the connect's cgroup".into(), |o| by(&o, false))
    };
    for (level, name, value) in SOCKOPT_KA.options() {
        let option = sockopt_name(level, name);
        let set = cookie.clone().and_then(|k| {
            ctx.events.wait(&format!("no {option} event"), |evs| {
                evs.iter().find_map(|e| match e.data {
                    EventData::Sockopt(o)
                        if on_client(e, k) && o.level == level && o.optname == name =>
                    {
                        Some(format!("{} {}", o.value, by(&e.info.owner, task)))
                    }
                    _ => None,
                })
            })
        });
        c.equal(
            &format!("sockopt {option}"),
            format!("{value} {expected_by}"),
            set,
        );
    }
    let end = ctx.events.end_of(cookie);
    let hz = ctx.events.hz();
    c.equal(
        "keepalive at close",
        SOCKOPT_KA.view(),
        seen(&end, |e| Ka(KeepaliveView::new(&e.data.ka, hz))),
    );
    c.end(&end, "local", "fin", false);
    c.list
}

/// The cgroup sockopt observers leave every answer as the kernel gave it:
/// a getsockopt that fails (an option TCP does not have: ENOPROTOOPT on
/// every kernel) keeps the caller's buffer and length, and one into a
/// buffer larger than a page (TCP_INFO into 8 KiB) gets the kernel's whole
/// answer.
pub(super) fn sockopt_answers(ctx: &mut Ctx<'_>) -> Vec<Check> {
    /// No TCP option has this number.
    const NO_SUCH_OPTION: i32 = 0x7fff;
    let mut c = Checks::new("sockopt-answers");
    let got = ctx.in_lab(|| {
        use std::os::fd::AsRawFd as _;
        let p = Pair::open()?;
        let failed = getsockopt_raw(p.server.as_raw_fd(), libc::SOL_TCP, NO_SUCH_OPTION, 16);
        let large = getsockopt_raw(p.client.as_raw_fd(), libc::SOL_TCP, libc::TCP_INFO, 8192);
        Ok((failed, large))
    });
    let (failed, large) = match got {
        Ok(v) => v,
        Err(e) => return c.setup_failed(&e),
    };
    let (errno, len, buf) = failed;
    let untouched = buf.iter().take_while(|&&b| b == 0xAA).count();
    c.equal(
        "failed getsockopt (no such TCP option)",
        "ENOPROTOOPT, length 16, 16 bytes untouched".to_string(),
        Ok(format!(
            "{}, length {len}, {untouched} bytes untouched",
            errno_text(errno)
        )),
    );
    let (errno, len, buf) = large;
    // tcpi_state is the first byte; the kernel's struct is under a page.
    let answer = if errno == 0 && (8..4096).contains(&len) {
        format!("ok, tcpi_state {}", buf[0])
    } else {
        format!("{}, length {len}", errno_text(errno))
    };
    c.equal(
        "getsockopt(TCP_INFO) into 8 KiB",
        format!("ok, tcpi_state {}", tcp_state::ESTABLISHED),
        Ok(answer),
    );
    c.list
}

/// A getsockopt's errno as people read it.
fn errno_text(errno: i32) -> String {
    match errno {
        0 => "ok".into(),
        e => match errno_name(e.unsigned_abs()) {
            "" => format!("errno {e}"),
            name => name.into(),
        },
    }
}

/// In the lab: a connection, one exchange, then `then`.
fn after_exchange<R: Send + 'static>(
    ctx: &Ctx<'_>,
    then: impl FnOnce(Pair) -> std::io::Result<R> + Send + 'static,
) -> Seen<R> {
    ctx.in_lab(|| {
        let mut p = Pair::open()?;
        p.exchange()?;
        then(p)
    })
}

/// The client's read after the peer's reset failed with ECONNRESET.
fn client_read_reset(c: &mut Checks, read_errno: Option<i32>) {
    errno_check(
        c,
        "client's read fails",
        "ECONNRESET",
        read_errno,
        "no error",
    );
}

/// Check `what`: the socket call failed with `want` (`none`: it did not).
fn errno_check(c: &mut Checks, what: &str, want: &str, errno: Option<i32>, none: &str) {
    let got = errno
        .map(|e| errno_name(e as u32))
        .ok_or_else(|| none.to_string());
    c.equal(what, want, got);
}
