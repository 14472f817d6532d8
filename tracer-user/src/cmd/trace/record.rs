//! One event as `trace` prints it: a JSON object or a line of text.

use std::net::IpAddr;

use serde::Serialize;
use tracer_common::{CloseData, close_flags};

use crate::{
    event::{
        ConnEvent, EventData,
        addr::Endpoint,
        jiffies::{Hz, HzTracker},
        names::{errno_name, sockopt_name, state_name},
    },
    track::classify::{self, KeepaliveView},
};

/// One event as `trace --json` prints it: one object per line.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct TraceRecord {
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
    /// close (and end: the peer's FIN): how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<EndView>,
    /// connect_failed: refused, timeout or unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<&'static str>,
    /// sockopt: the option and the value set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub option: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<i32>,
}

/// The end of a connection, for people (trace, /connections).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct EndView {
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
    pub(crate) fn new(c: &CloseData, ts_ns: u64, hz: Hz) -> Self {
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
            rst_received: c.flags & close_flags::RST_RECEIVED != 0,
            rst_sent: c.flags & close_flags::RST_SENT != 0,
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
    pub(crate) fn new(
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
            family: i.sock.family_name(),
            saddr: show(i.sock.local()),
            sport: i.sock.sport,
            daddr: show(i.sock.remote()),
            dport: i.sock.dport,
            state: state_name(i.sock.state),
            netns: i.netns,
            owner: i.owner.kind(),
            pid: i.owner.pid,
            tid: i.owner.tid,
            uid: i.owner.uid,
            gid: i.owner.gid,
            comm: i.owner.comm_str(),
            cgroup_id: i.owner.cgroup_id,
            old_state: None,
            new_state: None,
            reason: None,
            errno: None,
            error: None,
            keepalive: None,
            end: None,
            failure: None,
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
            EventData::Close(c) if c.flags & close_flags::CONNECT_FAILED != 0 => {
                // A connect that never got established: why, not how it ended.
                hz.observe(c.jiffies, i.ts_ns);
                rec.kind = "connect_failed";
                rec.keepalive = Some(KeepaliveView::new(&c.ka, hz.get()));
                rec.failure = Some(
                    classify::connect_failure(&c)
                        .map_or("given_up", classify::ConnectFailure::as_str),
                );
                rec.errno = Some(c.errno);
                rec.error = Some(errno_name(c.errno));
            }
            EventData::Close(c) | EventData::End(c) => {
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
            // The header says it all: the accepting thread and the socket.
            EventData::Accept(_) => {}
        }
        rec
    }

    /// One human-readable line.
    pub(crate) fn to_line(&self) -> String {
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

/// `addr` as `trace` shows it (empty for a family other than IP) with its port.
fn format_endpoint(addr: &str, port: u16) -> String {
    match addr.parse::<IpAddr>() {
        Ok(ip) => Endpoint::new(ip, port).to_string(),
        Err(_) => format!("{addr}:{port}"),
    }
}
