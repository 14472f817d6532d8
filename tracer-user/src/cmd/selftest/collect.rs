//! The events of the lab's namespace, collected and applied to the
//! daemon's state as they arrive.

use super::*;

/// Drains the ring buffer on its own thread as fast as the kernel fills it
/// (the host's other connections share it), passing on the events of the
/// selftest's namespace.
pub(super) struct Drain {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: Option<JoinHandle<()>>,
    pub(super) decode_errors: Arc<AtomicU64>,
}

impl Drain {
    pub(super) fn start(
        mut ring: EventRing,
        netns: u32,
    ) -> Result<(Self, Receiver<ConnEvent>), String> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let decode_errors = Arc::new(AtomicU64::new(0));
        let (stop2, errors2) = (Arc::clone(&stop), Arc::clone(&decode_errors));
        let thread = thread::Builder::new()
            .name("ct-selftest-rb".to_string())
            .spawn(move || {
                let mut gone = false;
                while !gone && !stop2.load(Ordering::Relaxed) {
                    // A short timeout, to see `stop`.
                    ring.wait(Duration::from_millis(50));
                    ring.drain(|ev| match ev {
                        Ok(ev) if !gone && ours(&ev, netns) => gone = tx.send(ev).is_err(),
                        Ok(_) => {}
                        Err(_) => {
                            errors2.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            })
            .map_err(|e| format!("cannot start the event thread: {e}"))?;
        let drain = Self {
            stop,
            thread: Some(thread),
            decode_errors,
        };
        Ok((drain, rx))
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let bad = self.decode_errors.load(Ordering::Relaxed);
        if bad > 0 {
            log::warn!("{bad} undecodable kernel events during the selftest");
        }
    }
}

/// Whether an event belongs to the selftest: its namespace's, or a socket
/// option set on a socket the kernel had not yet tied to a namespace (the
/// scenario then matches it by ports).
pub(super) fn ours(ev: &ConnEvent, netns: u32) -> bool {
    ev.info.netns == netns || (matches!(ev.data, EventData::Sockopt(_)) && ev.info.netns == 0)
}

/// The selftest namespace's events, applied to the daemon's state as they
/// arrive.
pub(super) struct Collector {
    pub(super) rx: Receiver<ConnEvent>,
    pub(super) seen: Vec<ConnEvent>,
    pub(super) state: State,
}

impl Collector {
    /// Waits (at most [`STEP_TIMEOUT`]) until `f` finds what it looks for in
    /// the events so far; `missing` says what did not come.
    pub(super) fn wait<T>(
        &mut self,
        missing: &str,
        mut f: impl FnMut(&[ConnEvent]) -> Option<T>,
    ) -> Seen<T> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            while let Ok(ev) = self.rx.try_recv() {
                self.take(ev);
            }
            if let Some(t) = f(&self.seen) {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.take(ev),
                Err(_) => {
                    return f(&self.seen)
                        .ok_or_else(|| format!("{missing} within {}s", STEP_TIMEOUT.as_secs()));
                }
            }
        }
    }

    pub(super) fn take(&mut self, ev: ConnEvent) {
        self.state.handle(&ev);
        self.seen.push(ev);
    }

    /// The cookie of the socket that opened with these ports.
    pub(super) fn opened(&mut self, sport: u16, dport: u16) -> Seen<u64> {
        self.wait(
            &format!("no open event for 127.0.0.1:{sport} -> 127.0.0.1:{dport}"),
            |evs| find_open(evs, sport, dport),
        )
    }

    /// The CLOSE summary of a socket.
    pub(super) fn closed(&mut self, cookie: Seen<u64>) -> Seen<(EventInfo, CloseData)> {
        let cookie = cookie?;
        self.wait("no close summary", |evs| find_close(evs, cookie))
    }

    pub(super) fn hz(&mut self) -> crate::event::jiffies::Hz {
        self.state.tracker.hz.get()
    }
}

/// The cookie of the OPEN event with these ports.
pub(super) fn find_open(events: &[ConnEvent], sport: u16, dport: u16) -> Option<u64> {
    events.iter().find_map(|e| {
        (matches!(e.data, EventData::Open(_))
            && e.info.sock.sport == sport
            && e.info.sock.dport == dport)
            .then_some(e.info.cookie)
    })
}

/// The CLOSE summary of socket `cookie`.
pub(super) fn find_close(events: &[ConnEvent], cookie: u64) -> Option<(EventInfo, CloseData)> {
    events.iter().find_map(|e| match e.data {
        EventData::Close(c) if e.info.cookie == cookie => Some((e.info, c)),
        _ => None,
    })
}

/// The state transitions of socket `cookie`, in order.
pub(super) fn transitions(events: &[ConnEvent], cookie: u64) -> Vec<(u8, u8)> {
    events
        .iter()
        .filter(|e| e.info.cookie == cookie)
        .filter_map(|e| match e.data {
            EventData::State { old, new } => Some((old, new)),
            _ => None,
        })
        .collect()
}

/// `A -> B, C -> D`.
pub(super) fn show_transitions(t: &[(u8, u8)]) -> String {
    if t.is_empty() {
        return "none".to_string();
    }
    t.iter()
        .map(|&(o, n)| format!("{} -> {}", state_name(o), state_name(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An owner for people: pid and how it is known.
pub(super) fn owner_pid(o: &tracer_common::Owner) -> String {
    format!("{} ({})", o.pid, o.kind())
}

/// Idle kills counted so far per (direction, closed_by, close_kind,
/// keepalive), the labels a scenario determines.
pub(super) fn idle_kill_counts(state: &State) -> BTreeMap<String, u64> {
    const KEYS: [&str; 4] = ["direction", "closed_by", "close_kind", "keepalive"];
    let mut out = BTreeMap::new();
    for family in state.metrics.idle_kills.collect() {
        for m in family.get_metric() {
            let mut labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .filter(|(k, _)| KEYS.contains(k))
                .collect();
            labels.sort_by_key(|(k, _)| KEYS.iter().position(|x| x == k));
            let key = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            *out.entry(key).or_default() += m.get_counter().get_value() as u64;
        }
    }
    out
}

/// What went up between two counts: `+N labels` per series, or `+0`.
pub(super) fn increments(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let ups: Vec<String> = after
        .iter()
        .filter_map(|(k, &v)| {
            let was = before.get(k).copied().unwrap_or(0);
            (v > was).then(|| format!("+{} {k}", v - was))
        })
        .collect();
    if ups.is_empty() {
        "+0".to_string()
    } else {
        ups.join(", ")
    }
}

/// The idle time the kernel can report for a silence measured in userspace:
/// the last payload fell between `last_lo` and `last_hi`, the end between
/// `end_lo` and `end_hi` (CLOCK_MONOTONIC ns); stamps are in jiffies, so
/// a tick of rounding either way.
pub(super) fn idle_bounds(
    (last_lo, last_hi): (u64, u64),
    (end_lo, end_hi): (u64, u64),
    hz: u32,
) -> (Duration, Duration) {
    let tick = 1_000_000_000 / u64::from(hz.max(1));
    let lo = end_lo.saturating_sub(last_hi).saturating_sub(2 * tick);
    let hi = end_hi.saturating_sub(last_lo) + 2 * tick;
    (Duration::from_nanos(lo), Duration::from_nanos(hi))
}

pub(super) fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

pub(super) fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// `f` of what was observed, or the same reason why nothing was.
pub(super) fn seen<T, U>(r: &Seen<T>, f: impl FnOnce(&T) -> U) -> Seen<U> {
    r.as_ref().map(f).map_err(Clone::clone)
}

/// A socket's close summary, classified as the daemon does.
pub(super) struct End {
    pub(super) info: EventInfo,
    pub(super) data: CloseData,
    pub(super) ending: Ending,
}

impl Collector {
    pub(super) fn end_of(&mut self, cookie: Seen<u64>) -> Seen<End> {
        let (info, data) = self.closed(cookie)?;
        let hz = self.hz();
        Ok(End {
            info,
            data,
            ending: classify::ending(&data, info.ts_ns, hz),
        })
    }
}

impl Checks {
    /// How the connection ended and whether that is an idle kill.
    pub(super) fn end(
        &mut self,
        end: &Seen<End>,
        by: &'static str,
        kind: &'static str,
        kill: bool,
    ) {
        self.equal("closed_by", by, seen(end, |e| e.ending.closed_by.as_str()));
        self.equal(
            "close_kind",
            kind,
            seen(end, |e| e.ending.close_kind.as_str()),
        );
        self.equal(
            "idle kill",
            yes_no(kill),
            seen(end, |e| {
                yes_no(classify::verdict(&e.ending, THRESHOLD).idle_kill)
            }),
        );
    }

    /// The owner the kernel recorded at connect.
    pub(super) fn owner(&mut self, end: &Seen<End>, pid: u32) {
        self.equal(
            "owner pid",
            format!("{pid} (known)"),
            seen(end, |e| owner_pid(&e.info.owner)),
        );
    }
}
