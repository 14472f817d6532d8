//! Decoding of the events the kernel programs write to the ring buffer, and
//! their human and JSON forms.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ptr,
};

use serde::Serialize;
use tracer_common::{
    AF_INET, AF_INET6, CloseData, Event, EventInfo, OpenData, Owner, ResetData, SnapshotData,
    SockError, SockoptData, StateChange, kind, owner_flags, sockopt, tcp_state,
};

use crate::{
    classify::{self, KeepaliveView},
    jiffies::{Hz, HzTracker},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {len} bytes is shorter than the {need}-byte header")]
    ShortHeader { len: usize, need: usize },
    #[error(
        "event kind {kind} is unknown to this conn-tracer (kernel programs newer than the agent?)"
    )]
    UnknownKind { kind: u16 },
    #[error("{name} event of {len} bytes is truncated: needs {need}")]
    Truncated {
        name: &'static str,
        len: usize,
        need: usize,
    },
}

/// What happened, per event kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventData {
    State { old: u8, new: u8 },
    ResetReceived,
    ResetSent { reason: u32 },
    Error { errno: u32 },
    Open(OpenData),
    Close(CloseData),
    Sockopt(SockoptData),
    Snapshot(SnapshotData),
}

/// One decoded kernel event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnEvent {
    pub info: EventInfo,
    pub data: EventData,
}

/// Reads a `T` from the front of `bytes`; the caller checked the length.
fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked above; T is a plain repr(C) type valid for any
    // bit pattern; read_unaligned has no alignment requirement.
    unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn body<T: Copy>(bytes: &[u8], name: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<Event<T>>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            name,
            len: bytes.len(),
            need,
        });
    }
    Ok(read::<Event<T>>(bytes).data)
}

/// Decodes one ring buffer record. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<ConnEvent, DecodeError> {
    let need = size_of::<EventInfo>();
    if bytes.len() < need {
        return Err(DecodeError::ShortHeader {
            len: bytes.len(),
            need,
        });
    }
    let info: EventInfo = read(bytes);
    let data = match info.kind {
        kind::STATE => {
            let d: StateChange = body(bytes, "state")?;
            EventData::State {
                old: d.old_state,
                new: d.new_state,
            }
        }
        kind::RESET_RECEIVED => {
            body::<ResetData>(bytes, "reset_received")?;
            EventData::ResetReceived
        }
        kind::RESET_SENT => {
            let d: ResetData = body(bytes, "reset_sent")?;
            EventData::ResetSent { reason: d.reason }
        }
        kind::SOCK_ERROR => {
            let d: SockError = body(bytes, "error")?;
            EventData::Error { errno: d.errno }
        }
        kind::OPEN => EventData::Open(body(bytes, "open")?),
        kind::CLOSE => EventData::Close(body(bytes, "close")?),
        kind::SOCKOPT => EventData::Sockopt(body(bytes, "sockopt")?),
        kind::SNAPSHOT => EventData::Snapshot(body(bytes, "snapshot")?),
        other => return Err(DecodeError::UnknownKind { kind: other }),
    };
    Ok(ConnEvent { info, data })
}

/// Remembers each socket's addresses, because the kernel clears some of them
/// as a socket closes (the local port is assigned only after
/// `CLOSE -> SYN_SENT`; `tcp_disconnect` zeroes the remote port and local
/// address before the events that follow an abortive close). Zeroed fields
/// are filled from earlier events of the same socket. Bounded: at most `cap`
/// sockets, and closed sockets are kept only for the `cap / 16` most recent.
#[derive(Debug)]
pub struct PortMemo {
    addrs: std::collections::HashMap<u64, Addrs>,
    closed: std::collections::VecDeque<u64>,
    cap: usize,
}

#[derive(Debug, Clone, Copy)]
struct Addrs {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

impl PortMemo {
    pub fn new(cap: usize) -> Self {
        Self {
            addrs: std::collections::HashMap::new(),
            closed: std::collections::VecDeque::new(),
            cap: cap.max(16),
        }
    }

    /// Fills zeroed address fields of `ev` from earlier events of its socket
    /// and remembers the non-zero ones.
    pub fn apply(&mut self, ev: &mut ConnEvent) {
        let cookie = ev.info.cookie;
        if cookie == 0 {
            return;
        }
        let s = &mut ev.info.sock;
        let known = self.addrs.get(&cookie).copied();
        if let Some(k) = known {
            if s.sport == 0 {
                s.sport = k.sport;
            }
            if s.saddr == [0; 16] {
                s.saddr = k.saddr;
            }
            if s.dport == 0 && s.daddr == [0; 16] {
                s.dport = k.dport;
                s.daddr = k.daddr;
            } else if s.dport == 0 && s.daddr == k.daddr {
                s.dport = k.dport;
            }
        } else if self.addrs.len() >= self.cap {
            // Over the bound: start over rather than grow (only `trace` output
            // of already-closed sockets can lose a port this way).
            self.addrs.clear();
            self.closed.clear();
        }
        self.addrs.insert(
            cookie,
            Addrs {
                saddr: s.saddr,
                daddr: s.daddr,
                sport: s.sport,
                dport: s.dport,
            },
        );
        if let EventData::State {
            new: tcp_state::CLOSE,
            ..
        } = ev.data
        {
            self.closed.push_back(cookie);
            if self.closed.len() > self.cap / 16
                && let Some(old) = self.closed.pop_front()
            {
                self.addrs.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }
}

/// Name of a watched socket option.
pub fn sockopt_name(level: u32, optname: u32) -> &'static str {
    match (level, optname) {
        (sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE) => "SO_KEEPALIVE",
        (sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE) => "TCP_KEEPIDLE",
        (sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL) => "TCP_KEEPINTVL",
        (sockopt::SOL_TCP, sockopt::TCP_KEEPCNT) => "TCP_KEEPCNT",
        (sockopt::SOL_TCP, sockopt::TCP_USER_TIMEOUT) => "TCP_USER_TIMEOUT",
        _ => "other",
    }
}

/// The kernel's name of a TCP state.
pub fn state_name(state: u8) -> &'static str {
    match state {
        tcp_state::ESTABLISHED => "ESTABLISHED",
        tcp_state::SYN_SENT => "SYN_SENT",
        tcp_state::SYN_RECV => "SYN_RECV",
        tcp_state::FIN_WAIT1 => "FIN_WAIT1",
        tcp_state::FIN_WAIT2 => "FIN_WAIT2",
        tcp_state::TIME_WAIT => "TIME_WAIT",
        tcp_state::CLOSE => "CLOSE",
        tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
        tcp_state::LAST_ACK => "LAST_ACK",
        tcp_state::LISTEN => "LISTEN",
        tcp_state::CLOSING => "CLOSING",
        tcp_state::NEW_SYN_RECV => "NEW_SYN_RECV",
        tcp_state::BOUND_INACTIVE => "BOUND_INACTIVE",
        _ => "UNKNOWN",
    }
}

/// Symbolic name of the errno values a TCP socket reports.
pub fn errno_name(errno: u32) -> &'static str {
    match errno as i32 {
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETDOWN => "ENETDOWN",
        _ => "",
    }
}

impl ConnEvent {
    /// The event's name as `trace --json` prints it.
    pub fn kind_name(&self) -> &'static str {
        match self.data {
            EventData::State { .. } => "state",
            EventData::ResetReceived => "reset_received",
            EventData::ResetSent { .. } => "reset_sent",
            EventData::Error { .. } => "error",
            EventData::Open(_) => "open",
            EventData::Close(_) => "close",
            EventData::Sockopt(_) => "sockopt",
            EventData::Snapshot(_) => "snapshot",
        }
    }

    pub fn local(&self) -> Option<IpAddr> {
        addr(self.info.sock.family, &self.info.sock.saddr)
    }

    pub fn remote(&self) -> Option<IpAddr> {
        addr(self.info.sock.family, &self.info.sock.daddr)
    }
}

fn addr(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => None,
    }
}

pub fn family_name(family: u16) -> &'static str {
    match family {
        AF_INET => "ipv4",
        AF_INET6 => "ipv6",
        _ => "other",
    }
}

/// `comm` up to its first NUL, lossily as UTF-8.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

pub fn owner_kind(owner: &Owner) -> &'static str {
    if owner.flags & owner_flags::KNOWN == 0 {
        "unknown"
    } else if owner.flags & owner_flags::INHERITED != 0 {
        "inherited"
    } else if owner.flags & owner_flags::FROM_PROC != 0 {
        // Older than the tracer; the process holding it, found in /proc.
        "proc"
    } else {
        "known"
    }
}

/// A host endpoint, with IPv6 addresses in brackets.
pub struct Endpoint(pub Option<IpAddr>, pub u16);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.1),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}", self.1),
            None => write!(f, "?:{}", self.1),
        }
    }
}

/// One event as `trace --json` prints it: one object per line.
#[derive(Debug, Serialize, PartialEq)]
pub struct TraceRecord {
    pub time: String,
    pub ts_ns: u64,
    pub kind: &'static str,
    pub cookie: u64,
    pub family: &'static str,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    pub state: &'static str,
    pub netns: u32,
    pub owner: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_state: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// open, close: the socket's keepalive settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<KeepaliveView>,
    /// close: how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<EndView>,
    /// sockopt: the option and the value set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub option: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<i32>,
}

/// The end of a connection, for people (trace, /connections).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndView {
    pub closed_by: &'static str,
    pub close_kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_cause: Option<classify::TimeoutCause>,
    /// Idle seconds when the connection left ESTABLISHED.
    pub idle_s: Option<f64>,
    /// Silence before the send that died unanswered, if it died on one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silence_before_failed_send_s: Option<f64>,
    /// Why that send died: `silence` or `peer_closed` (the keep-alive race).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_send_cause: Option<classify::StaleCause>,
    pub lifetime_s: Option<f64>,
    /// The state it left ESTABLISHED for.
    pub first_close_state: &'static str,
    pub rst_received: bool,
    pub rst_sent: bool,
    pub errno: u32,
    pub error: &'static str,
    /// The last ICMP error the connection had survived (detail: a timeout
    /// after one is still a timeout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_error: Option<&'static str>,
    pub bytes_received: u64,
    pub bytes_acked: u64,
}

impl EndView {
    pub fn new(c: &CloseData, ts_ns: u64, hz: Hz) -> Self {
        let e = classify::ending(c, ts_ns, hz);
        Self {
            closed_by: e.closed_by.as_str(),
            close_kind: e.close_kind.as_str(),
            timeout_cause: e.timeout_cause,
            idle_s: e.idle_at_end.map(|d| d.as_secs_f64()),
            silence_before_failed_send_s: e.silence_before_failed_send.map(|d| d.as_secs_f64()),
            failed_send_cause: e.failed_send_cause,
            lifetime_s: e.lifetime.map(|d| d.as_secs_f64()),
            first_close_state: state_name(c.first_close_state),
            rst_received: c.flags & tracer_common::close_flags::RST_RECEIVED != 0,
            rst_sent: c.flags & tracer_common::close_flags::RST_SENT != 0,
            errno: c.errno,
            error: errno_name(c.errno),
            soft_error: (c.soft_errno != 0).then(|| errno_name(c.soft_errno)),
            bytes_received: c.bytes_received,
            bytes_acked: c.bytes_acked,
        }
    }
}

impl TraceRecord {
    /// `time` is the wall-clock rendering of the event's timestamp;
    /// `reason_name` maps a reset reason to its kernel name.
    pub fn new(
        ev: &ConnEvent,
        time: String,
        reason_name: impl Fn(u32) -> String,
        hz: &mut HzTracker,
    ) -> Self {
        let i = &ev.info;
        let show = |a: Option<IpAddr>| a.map_or_else(String::new, |a| a.to_string());
        let mut rec = Self {
            time,
            ts_ns: i.ts_ns,
            kind: ev.kind_name(),
            cookie: i.cookie,
            family: family_name(i.sock.family),
            saddr: show(ev.local()),
            sport: i.sock.sport,
            daddr: show(ev.remote()),
            dport: i.sock.dport,
            state: state_name(i.sock.state),
            netns: i.netns,
            owner: owner_kind(&i.owner),
            pid: i.owner.pid,
            tid: i.owner.tid,
            uid: i.owner.uid,
            gid: i.owner.gid,
            comm: comm_str(&i.owner.comm),
            cgroup_id: i.owner.cgroup_id,
            old_state: None,
            new_state: None,
            reason: None,
            errno: None,
            error: None,
            keepalive: None,
            end: None,
            option: None,
            value: None,
        };
        match ev.data {
            EventData::State { old, new } => {
                rec.old_state = Some(state_name(old));
                rec.new_state = Some(state_name(new));
            }
            EventData::ResetReceived => rec.reason = Some(String::new()),
            EventData::ResetSent { reason } => rec.reason = Some(reason_name(reason)),
            EventData::Error { errno } => {
                rec.errno = Some(errno);
                rec.error = Some(errno_name(errno));
            }
            EventData::Open(o) => {
                hz.observe(o.jiffies, i.ts_ns);
                rec.keepalive = Some(KeepaliveView::new(&o.ka, hz.get()));
            }
            EventData::Close(c) => {
                hz.observe(c.jiffies, i.ts_ns);
                let hz = hz.get();
                rec.keepalive = Some(KeepaliveView::new(&c.ka, hz));
                rec.end = Some(EndView::new(&c, i.ts_ns, hz));
            }
            EventData::Sockopt(o) => {
                rec.option = Some(sockopt_name(o.level, o.optname));
                rec.value = Some(o.value);
            }
            EventData::Snapshot(o) => {
                hz.observe(o.jiffies, i.ts_ns);
                rec.keepalive = Some(KeepaliveView::new(&o.ka, hz.get()));
            }
        }
        rec
    }

    /// One human-readable line.
    pub fn to_line(&self) -> String {
        use std::fmt::Write as _;
        let local = format_endpoint(&self.saddr, self.sport);
        let remote = format_endpoint(&self.daddr, self.dport);
        let mut what = match (self.old_state, self.new_state) {
            (Some(o), Some(n)) => format!("{o} -> {n}"),
            _ => self.kind.to_string(),
        };
        if let Some(r) = self.reason.as_deref().filter(|r| !r.is_empty()) {
            let _ = write!(what, " ({r})");
        }
        if let (Some(e), Some(n)) = (self.errno, self.error) {
            let _ = write!(
                what,
                " {}",
                if n.is_empty() {
                    e.to_string()
                } else {
                    n.to_string()
                }
            );
        }
        if let Some(o) = self.option {
            let _ = write!(what, " {o}={}", self.value.unwrap_or_default());
        }
        if let Some(e) = &self.end {
            let _ = write!(what, " by {} {}", e.closed_by, e.close_kind);
            if let Some(i) = e.idle_s {
                let _ = write!(what, " idle={i:.3}s");
            }
            if let Some(s) = e.silence_before_failed_send_s {
                let _ = write!(what, " failed-send-after={s:.3}s");
            }
            let _ = write!(what, " rx={} tx={}", e.bytes_received, e.bytes_acked);
        }
        if let Some(k) = &self.keepalive {
            let _ = write!(what, " {}", k.short());
        }
        let owner = if self.owner == "unknown" {
            "owner=?".to_string()
        } else {
            format!(
                "pid={} comm={} uid={} cgroup={}",
                self.pid, self.comm, self.uid, self.cgroup_id
            )
        };
        format!(
            "{} {:<14} {:<26} {} -> {} netns={} {} cookie={}",
            self.time, self.kind, what, local, remote, self.netns, owner, self.cookie
        )
    }
}

fn format_endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::SockAddrs;

    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a padding-free repr(C) type; every byte is initialised.
        unsafe { std::slice::from_raw_parts(ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn info(kind: u16) -> EventInfo {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"client");
        EventInfo {
            ts_ns: 1_000,
            cookie: 42,
            kind,
            pad: 0,
            netns: 4_026_531_840,
            sock: SockAddrs {
                saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                daddr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                sport: 40000,
                dport: 8080,
                family: AF_INET,
                state: tcp_state::SYN_SENT,
                pad: 0,
            },
            owner: Owner {
                pid: 100,
                tid: 101,
                uid: 1000,
                gid: 1000,
                cgroup_id: 7,
                comm,
                flags: owner_flags::KNOWN,
                pad: 0,
            },
        }
    }

    #[test]
    fn decodes_a_state_change() {
        let ev = Event {
            info: info(kind::STATE),
            data: StateChange {
                old_state: 2,
                new_state: 1,
                pad: [0; 6],
            },
        };
        let got = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(got.data, EventData::State { old: 2, new: 1 });
        assert_eq!(got.info, ev.info);
        assert_eq!(got.local(), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(got.remote(), Some("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn decodes_resets_and_errors() {
        let sent = Event {
            info: info(kind::RESET_SENT),
            data: ResetData { reason: 7, pad: 0 },
        };
        assert_eq!(
            decode(&bytes_of(&sent)).unwrap().data,
            EventData::ResetSent { reason: 7 }
        );
        let recv = Event {
            info: info(kind::RESET_RECEIVED),
            data: ResetData::default(),
        };
        assert_eq!(
            decode(&bytes_of(&recv)).unwrap().data,
            EventData::ResetReceived
        );
        let err = Event {
            info: info(kind::SOCK_ERROR),
            data: SockError { errno: 104, pad: 0 },
        };
        let got = decode(&bytes_of(&err)).unwrap();
        assert_eq!(got.data, EventData::Error { errno: 104 });
        let rec = TraceRecord::new(
            &got,
            "t".into(),
            |_| String::new(),
            &mut HzTracker::new(Some(250)),
        );
        assert_eq!(rec.error, Some("ECONNRESET"));
    }

    #[test]
    fn ring_buffer_padding_after_the_event_is_ignored() {
        let ev = Event {
            info: info(kind::STATE),
            data: StateChange::default(),
        };
        let mut b = bytes_of(&ev);
        b.extend_from_slice(&[0xff; 8]);
        assert!(decode(&b).is_ok());
    }

    #[test]
    fn truncated_and_unknown_events_are_errors_not_panics() {
        let ev = Event {
            info: info(kind::STATE),
            data: StateChange::default(),
        };
        let b = bytes_of(&ev);
        for len in 0..b.len() {
            let err = decode(&b[..len]).unwrap_err();
            let need_header = size_of::<EventInfo>();
            if len < need_header {
                assert_eq!(
                    err,
                    DecodeError::ShortHeader {
                        len,
                        need: need_header
                    }
                );
            } else {
                assert_eq!(
                    err,
                    DecodeError::Truncated {
                        name: "state",
                        len,
                        need: b.len()
                    }
                );
            }
        }
        let unknown = Event {
            info: info(999),
            data: StateChange::default(),
        };
        let err = decode(&bytes_of(&unknown)).unwrap_err();
        assert_eq!(err, DecodeError::UnknownKind { kind: 999 });
        assert!(err.to_string().contains("999"));
    }

    #[test]
    fn ipv6_and_v4_mapped_addresses_render() {
        let mut i = info(kind::STATE);
        i.sock.family = AF_INET6;
        i.sock.saddr = Ipv6Addr::LOCALHOST.octets();
        i.sock.daddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
        let ev = ConnEvent {
            info: i,
            data: EventData::State { old: 7, new: 2 },
        };
        let rec = TraceRecord::new(
            &ev,
            "t".into(),
            |_| String::new(),
            &mut HzTracker::new(Some(250)),
        );
        assert_eq!(rec.family, "ipv6");
        assert_eq!(rec.saddr, "::1");
        assert_eq!(rec.daddr, "::ffff:127.0.0.1");
        assert!(
            rec.to_line()
                .contains("[::1]:40000 -> [::ffff:127.0.0.1]:8080"),
            "{}",
            rec.to_line()
        );
        assert_eq!(rec.old_state, Some("CLOSE"));
        assert_eq!(rec.new_state, Some("SYN_SENT"));
    }

    #[test]
    fn json_record_has_the_documented_fields() {
        let ev = ConnEvent {
            info: info(kind::STATE),
            data: EventData::State { old: 2, new: 1 },
        };
        let v = serde_json::to_value(TraceRecord::new(
            &ev,
            "T".into(),
            |_| String::new(),
            &mut HzTracker::new(Some(250)),
        ))
        .unwrap();
        assert_eq!(v["kind"], "state");
        assert_eq!(v["old_state"], "SYN_SENT");
        assert_eq!(v["new_state"], "ESTABLISHED");
        assert_eq!(v["pid"], 100);
        assert_eq!(v["tid"], 101);
        assert_eq!(v["comm"], "client");
        assert_eq!(v["owner"], "known");
        assert_eq!(v["sport"], 40000);
        assert_eq!(v["dport"], 8080);
        assert_eq!(v["netns"], 4_026_531_840_u32);
        assert!(v.get("errno").is_none());
    }

    #[test]
    fn port_memo_restores_cleared_addresses_and_stays_bounded() {
        let mut memo = PortMemo::new(32);
        let ev = |cookie, sport, dport, data| {
            let mut i = info(kind::STATE);
            i.cookie = cookie;
            i.sock.sport = sport;
            i.sock.dport = dport;
            ConnEvent { info: i, data }
        };
        let st = |old, new| EventData::State { old, new };
        let mut e = ev(1, 0, 8080, st(tcp_state::CLOSE, tcp_state::SYN_SENT));
        memo.apply(&mut e);
        assert_eq!(e.info.sock.sport, 0, "nothing known yet");
        memo.apply(&mut ev(
            1,
            40000,
            8080,
            st(tcp_state::SYN_SENT, tcp_state::ESTABLISHED),
        ));
        let mut fin = ev(1, 0, 8080, st(tcp_state::FIN_WAIT2, tcp_state::CLOSE));
        memo.apply(&mut fin);
        assert_eq!(fin.info.sock.sport, 40000);
        // An error reported after the close, with the tuple cleared.
        let mut err = ev(1, 0, 0, EventData::Error { errno: 104 });
        err.info.sock.saddr = [0; 16];
        err.info.sock.daddr = [0; 16];
        memo.apply(&mut err);
        assert_eq!((err.info.sock.sport, err.info.sock.dport), (40000, 8080));
        assert_eq!(err.info.sock.saddr[..4], [127, 0, 0, 1]);
        assert_eq!(err.info.sock.daddr[..4], [127, 0, 0, 2]);
        // Closed sockets are forgotten past cap/16 of them; the map stays bounded.
        for c in 10..200 {
            memo.apply(&mut ev(
                c,
                1000,
                80,
                st(tcp_state::SYN_SENT, tcp_state::ESTABLISHED),
            ));
            memo.apply(&mut ev(
                c,
                1000,
                80,
                st(tcp_state::FIN_WAIT2, tcp_state::CLOSE),
            ));
            assert!(memo.len() <= 32, "{}", memo.len());
        }
        assert!(
            memo.len() <= 2 + 1,
            "only the recently closed remain: {}",
            memo.len()
        );
    }

    #[test]
    fn owner_kinds() {
        let mut o = Owner::default();
        assert_eq!(owner_kind(&o), "unknown");
        o.flags = owner_flags::KNOWN;
        assert_eq!(owner_kind(&o), "known");
        o.flags |= owner_flags::INHERITED;
        assert_eq!(owner_kind(&o), "inherited");
        assert_eq!(comm_str(b"abc\0def"), "abc");
        assert_eq!(comm_str(b"sixteen-chars-xx"), "sixteen-chars-xx");
    }
}

/// Property tests of the decoder (`cargo xtask fuzz event` runs them long):
/// whatever bytes the ring buffer holds, decoding never panics, and a valid
/// record of every kind decodes to what was encoded.
#[cfg(test)]
mod fuzz {
    use proptest::{array, prelude::*};
    use tracer_common::SockAddrs;

    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a padding-free repr(C) type; every byte is initialised.
        unsafe { std::slice::from_raw_parts(ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    /// Renders an event the ways `trace` and the daemon do; must not panic.
    fn render(ev: &ConnEvent) {
        let rec = TraceRecord::new(
            ev,
            String::new(),
            |r| r.to_string(),
            &mut HzTracker::new(Some(250)),
        );
        let _ = rec.to_line();
        serde_json::to_string(&rec).expect("a trace record serialises");
    }

    prop_compose! {
        fn arb_info()(
            ts_ns in any::<u64>(),
            cookie in any::<u64>(),
            pad in any::<u16>(),
            netns in any::<u32>(),
            saddr in array::uniform16(any::<u8>()),
            daddr in array::uniform16(any::<u8>()),
            sport in any::<u16>(),
            dport in any::<u16>(),
            family in prop_oneof![Just(AF_INET), Just(AF_INET6), any::<u16>()],
            state in any::<u8>(),
            ids in array::uniform4(any::<u32>()),
            cgroup_id in any::<u64>(),
            comm in array::uniform16(any::<u8>()),
            flags in any::<u32>(),
        ) -> EventInfo {
            EventInfo {
                ts_ns, cookie, kind: 0, pad, netns,
                sock: SockAddrs { saddr, daddr, sport, dport, family, state, pad: 0 },
                owner: Owner {
                    pid: ids[0], tid: ids[1], uid: ids[2], gid: ids[3],
                    cgroup_id, comm, flags, pad: 0,
                },
            }
        }
    }

    prop_compose! {
        fn arb_keepalive()(
            t in array::uniform3(any::<u32>()),
            b in array::uniform4(any::<u8>()),
        ) -> tracer_common::Keepalive {
            tracer_common::Keepalive {
                time_j: t[0], intvl_j: t[1], user_timeout_ms: t[2],
                probes: b[0], enabled: b[1], from_socket: b[2], pad: b[3],
            }
        }
    }

    prop_compose! {
        fn arb_close()(
            ka in arb_keepalive(),
            ns in array::uniform2(any::<u64>()),
            j in array::uniform4(any::<u32>()),
            b in array::uniform4(any::<u8>()),
            jiffies in any::<u64>(),
            last in array::uniform3(any::<u32>()),
            tail in array::uniform3(any::<u64>()),
        ) -> CloseData {
            CloseData {
                ka, established_ns: ns[0], end_ns: ns[1],
                end_j: j[0], end_last_send_j: j[1], end_last_recv_j: j[2],
                first_close_state: b[0], flags: b[1], retransmits: b[2], probes_out: b[3],
                jiffies, last_send_j: last[0], last_recv_j: last[1], last_ack_j: last[2],
                errno: j[3], first_tx_us: tail[0], bytes_received: tail[1], bytes_acked: tail[2],
                soft_errno: last[0] ^ j[0], snd_wnd: last[1] ^ j[1],
            }
        }
    }

    prop_compose! {
        fn arb_snapshot()(
            ka in arb_keepalive(),
            jiffies in any::<u64>(),
            last in array::uniform3(any::<u32>()),
            b in array::uniform2(any::<u8>()),
            pad in any::<u16>(),
            tail in array::uniform3(any::<u64>()),
        ) -> SnapshotData {
            SnapshotData {
                ka, jiffies, last_send_j: last[0], last_recv_j: last[1], last_ack_j: last[2],
                retransmits: b[0], probes_out: b[1], pad,
                bytes_received: tail[0], bytes_acked: tail[1], ino: tail[2],
            }
        }
    }

    /// A valid record of one kind: its bytes and what it must decode to.
    fn arb_record() -> impl Strategy<Value = (Vec<u8>, ConnEvent)> {
        fn rec<T: Copy>(
            mut info: EventInfo,
            kind: u16,
            data: T,
            want: EventData,
        ) -> (Vec<u8>, ConnEvent) {
            info.kind = kind;
            (
                bytes_of(&Event { info, data }),
                ConnEvent { info, data: want },
            )
        }
        let u32s = || array::uniform2(any::<u32>());
        prop_oneof![
            (
                arb_info(),
                any::<u8>(),
                any::<u8>(),
                array::uniform6(any::<u8>())
            )
                .prop_map(|(i, old_state, new_state, pad)| {
                    let d = StateChange {
                        old_state,
                        new_state,
                        pad,
                    };
                    rec(
                        i,
                        kind::STATE,
                        d,
                        EventData::State {
                            old: old_state,
                            new: new_state,
                        },
                    )
                }),
            (arb_info(), u32s()).prop_map(|(i, [reason, pad])| {
                rec(
                    i,
                    kind::RESET_RECEIVED,
                    ResetData { reason, pad },
                    EventData::ResetReceived,
                )
            }),
            (arb_info(), u32s()).prop_map(|(i, [reason, pad])| {
                rec(
                    i,
                    kind::RESET_SENT,
                    ResetData { reason, pad },
                    EventData::ResetSent { reason },
                )
            }),
            (arb_info(), u32s()).prop_map(|(i, [errno, pad])| {
                rec(
                    i,
                    kind::SOCK_ERROR,
                    SockError { errno, pad },
                    EventData::Error { errno },
                )
            }),
            (arb_info(), arb_keepalive(), any::<u64>()).prop_map(|(i, ka, jiffies)| {
                let d = OpenData { ka, jiffies };
                rec(i, kind::OPEN, d, EventData::Open(d))
            }),
            (arb_info(), arb_close()).prop_map(|(i, d)| rec(
                i,
                kind::CLOSE,
                d,
                EventData::Close(d)
            )),
            (arb_info(), array::uniform4(any::<u32>())).prop_map(
                |(i, [level, optname, value, optlen])| {
                    let d = SockoptData {
                        level,
                        optname,
                        value: value as i32,
                        optlen,
                    };
                    rec(i, kind::SOCKOPT, d, EventData::Sockopt(d))
                }
            ),
            (arb_info(), arb_snapshot())
                .prop_map(|(i, d)| { rec(i, kind::SNAPSHOT, d, EventData::Snapshot(d)) }),
        ]
    }

    /// The record size the decoder needs for `kind`, if it knows the kind.
    fn need(kind: u16) -> Option<usize> {
        let header = size_of::<EventInfo>();
        Some(
            header
                + match kind {
                    kind::STATE => size_of::<StateChange>(),
                    kind::RESET_RECEIVED | kind::RESET_SENT => size_of::<ResetData>(),
                    kind::SOCK_ERROR => size_of::<SockError>(),
                    kind::OPEN => size_of::<OpenData>(),
                    kind::CLOSE => size_of::<CloseData>(),
                    kind::SOCKOPT => size_of::<SockoptData>(),
                    kind::SNAPSHOT => size_of::<SnapshotData>(),
                    _ => return None,
                },
        )
    }

    /// Byte offset of `EventInfo::kind`.
    const KIND_AT: usize = std::mem::offset_of!(EventInfo, kind);

    proptest! {
        #![proptest_config(crate::fuzzing::config(512))]

        /// Any bytes at all: an error or an event, never a panic; an event
        /// only from a record long enough for its kind.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            match decode(&bytes) {
                Ok(ev) => {
                    prop_assert!(bytes.len() >= need(ev.info.kind).expect("a known kind"));
                    render(&ev);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        /// Header-sized garbage with a known kind in it reaches every
        /// branch of the decoder, not only the short-header one.
        #[test]
        fn garbage_with_a_known_kind_never_panics(
            mut bytes in prop::collection::vec(any::<u8>(), size_of::<EventInfo>()..400),
            kind in 0u16..=kind::SLOTS as u16,
        ) {
            bytes[KIND_AT..KIND_AT + 2].copy_from_slice(&kind.to_ne_bytes());
            match (decode(&bytes), need(kind)) {
                (Ok(ev), Some(n)) => {
                    prop_assert!(bytes.len() >= n);
                    prop_assert_eq!(ev.info.kind, kind);
                    render(&ev);
                }
                (Err(DecodeError::Truncated { len, need: n, .. }), Some(want)) => {
                    prop_assert_eq!((len, n), (bytes.len(), want));
                    prop_assert!(bytes.len() < want);
                }
                (Err(DecodeError::UnknownKind { kind: k }), None) => prop_assert_eq!(k, kind),
                (other, need) => prop_assert!(false, "kind {kind}, need {need:?}: {other:?}"),
            }
        }

        /// Every kind, with every field random: decodes to what was encoded,
        /// with ring buffer padding after it or not.
        #[test]
        fn valid_records_decode_to_what_was_encoded(
            (bytes, want) in arb_record(),
            trailer in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            prop_assert_eq!(decode(&bytes), Ok(want));
            let mut padded = bytes.clone();
            padded.extend_from_slice(&trailer);
            prop_assert_eq!(decode(&padded), Ok(want));
            render(&want);
        }

        /// A valid record cut short is an error that says how many bytes the
        /// kind needs, never a partial event.
        #[test]
        fn truncated_records_are_errors((bytes, want) in arb_record(), cut in any::<prop::sample::Index>()) {
            let len = cut.index(bytes.len());
            let header = size_of::<EventInfo>();
            let expected = if len < header {
                DecodeError::ShortHeader { len, need: header }
            } else {
                let DecodeError::Truncated { name, .. } = decode(&bytes[..header]).unwrap_err() else {
                    unreachable!("a header alone is truncated for every kind");
                };
                DecodeError::Truncated { name, len, need: bytes.len() }
            };
            prop_assert_eq!(decode(&bytes[..len]), Err(expected));
            prop_assert_eq!(need(want.info.kind), Some(bytes.len()));
        }

        /// A record whose kind was changed (a newer or older kernel program)
        /// is another kind's event, a truncated one, or an unknown kind.
        #[test]
        fn records_with_a_changed_kind_never_panic((mut bytes, want) in arb_record(), kind in any::<u16>()) {
            bytes[KIND_AT..KIND_AT + 2].copy_from_slice(&kind.to_ne_bytes());
            match decode(&bytes) {
                Ok(ev) => {
                    prop_assert_eq!(ev.info.kind, kind);
                    prop_assert_eq!(ev.info.sock, want.info.sock);
                    prop_assert_eq!(ev.info.owner, want.info.owner);
                    prop_assert!(bytes.len() >= need(kind).expect("known"));
                    render(&ev);
                }
                Err(DecodeError::UnknownKind { kind: k }) => {
                    prop_assert_eq!(k, kind);
                    prop_assert!(need(kind).is_none());
                }
                Err(DecodeError::Truncated { need: n, .. }) => {
                    prop_assert_eq!(Some(n), need(kind));
                    prop_assert!(bytes.len() < n);
                }
                Err(e @ DecodeError::ShortHeader { .. }) => prop_assert!(false, "{e}"),
            }
        }

        /// Corrupted fields (any byte but the kind) still decode: every bit
        /// pattern is a valid field value, and the rest is unchanged.
        #[test]
        fn records_with_corrupted_fields_still_decode(
            (mut bytes, want) in arb_record(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let at = at.index(bytes.len());
            prop_assume!(!(KIND_AT..KIND_AT + 2).contains(&at));
            bytes[at] ^= xor;
            let ev = decode(&bytes).expect("still a valid record");
            prop_assert_eq!(ev.info.kind, want.info.kind);
            prop_assert_eq!(ev.kind_name(), want.kind_name());
            if at >= size_of::<EventInfo>() {
                prop_assert_eq!(ev.info, want.info);
            }
            render(&ev);
        }
    }
}
