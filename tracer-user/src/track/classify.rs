//! How a connection ended, and whether that was an idle kill or a stale
//! reuse: pure functions of the kernel's CLOSE summary.
//!
//! Definitions (the metrics' contract, see README):
//! - idle at the end: time since the last payload byte either way when the
//!   connection left ESTABLISHED (first FIN, RST or timeout). Keepalive
//!   probes, bare ACKs and FINs are not payload (the kernel's `lsndtime` and
//!   `icsk_ack.lrcvtime` only move for data). A goodbye does not end the
//!   silence: when the peer's FIN follows a short final burst from the peer
//!   ([`goodbye_silence`]), the idle time is the silence before that burst.
//! - who ended it: the side whose FIN came first, whatever followed (a late
//!   reset, the orphan's timeout); a reset received while established is the
//!   peer's; a timeout while established (keepalive, TCP_USER_TIMEOUT,
//!   retransmissions, zero-window probes) is a timeout, whatever soft error
//!   (ICMP) the kernel reports it with.
//! - stale reuse: the connection died on a send (payload unacknowledged at
//!   the end: the FIN does not count) answered by a reset or never
//!   acknowledged (timeout). Cause `silence`: the send came after at least
//!   the threshold of silence; its idle time is that silence. Cause
//!   `peer_closed`: the peer's FIN had arrived before the send or crossed it
//!   (the keep-alive race), whatever the threshold; its idle time is from
//!   the FIN to the send.
//! - idle kill: idle at the end >= threshold, and the end came from the peer
//!   (FIN or RST) or from a timeout; or a stale reuse of cause `silence`. A
//!   local close or a local abort is the owner's own decision, never a kill.

use std::time::Duration;

use serde::Serialize;
use tracer_common::{CloseData, Keepalive, close_flags, ka_source, tcp_state};

use crate::event::jiffies::{Hz, elapsed, later};

const ETIMEDOUT: u32 = libc::ETIMEDOUT as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClosedBy {
    Local,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CloseKind {
    Fin,
    Rst,
    Timeout,
}

/// What ran out, for a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TimeoutCause {
    /// Keepalive probes went unanswered.
    Keepalive,
    /// TCP_USER_TIMEOUT expired with data unacknowledged.
    UserTimeout,
    /// The retransmission limit (tcp_retries2) was reached.
    Retransmission,
    /// Zero-window probes went unanswered (the peer's window stayed closed).
    ZeroWindow,
}

impl TimeoutCause {
    #[allow(
        dead_code,
        reason = "the label value of a timeout's cause; nothing labels by it yet"
    )]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Keepalive => "keepalive",
            Self::UserTimeout => "user_timeout",
            Self::Retransmission => "retransmission",
            Self::ZeroWindow => "zero_window",
        }
    }
}

/// Why a send died (a stale reuse's `cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StaleCause {
    /// The first send after a silence.
    Silence,
    /// A send after the peer's FIN, or crossing it (the keep-alive race).
    PeerClosed,
}

impl StaleCause {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Silence => "silence",
            Self::PeerClosed => "peer_closed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StaleOutcome {
    Rst,
    Timeout,
}

impl ClosedBy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
        }
    }
}

impl CloseKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::Timeout => "timeout",
        }
    }
}

impl StaleOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Rst => "rst",
            Self::Timeout => "timeout",
        }
    }
}

/// The facts of one connection's end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ending {
    pub closed_by: ClosedBy,
    pub close_kind: CloseKind,
    /// What ran out, when the connection timed out (also after the owner's
    /// FIN, where the close kind stays `fin`).
    pub timeout_cause: Option<TimeoutCause>,
    /// Idle time when the connection left ESTABLISHED (None: the tracer did
    /// not see it leave).
    pub idle_at_end: Option<Duration>,
    /// Silence before the send that died unanswered (stale reuse
    /// candidate); for a send after the peer's FIN, the time from the FIN.
    pub silence_before_failed_send: Option<Duration>,
    /// Why that send died, when one did.
    pub failed_send_cause: Option<StaleCause>,
    /// ESTABLISHED to the end; None for connections older than the tracer.
    pub lifetime: Option<Duration>,
    pub keepalive: bool,
}

impl Ending {
    /// Idle time as the metrics report it: the silence before a failed send
    /// when the connection died on one, else the idle time at the end.
    pub(crate) fn idle(&self) -> Option<Duration> {
        self.silence_before_failed_send.or(self.idle_at_end)
    }
}

/// Classifies the end of a connection. `ts_ns` is the CLOSE event's
/// CLOCK_MONOTONIC time (it pairs with `c.jiffies`).
pub(crate) fn ending(c: &CloseData, ts_ns: u64, hz: Hz) -> Ending {
    let rst_received = c.flags & close_flags::RST_RECEIVED != 0;
    let unacked = c.flags & close_flags::UNACKED != 0;
    let unsent = c.flags & close_flags::UNSENT != 0;
    let end_seen = c.flags & close_flags::END_SEEN != 0;
    let first = c.first_close_state;

    // The kernel ends a timed-out connection (tcp_write_err) with ETIMEDOUT,
    // or with the soft error an ICMP left (EHOSTUNREACH, ...) in its place.
    let timed_out =
        !rst_received && (c.errno == ETIMEDOUT || (c.errno != 0 && c.errno == c.soft_errno));
    let timeout_cause = timed_out.then_some(
        if c.probes_out > 0 && !unacked && unsent && c.snd_wnd == 0 {
            TimeoutCause::ZeroWindow
        } else if c.probes_out > 0 && !unacked {
            TimeoutCause::Keepalive
        } else if c.ka.user_timeout_ms > 0 {
            TimeoutCause::UserTimeout
        } else {
            TimeoutCause::Retransmission
        },
    );

    let (closed_by, close_kind) = if first == tcp_state::CLOSE_WAIT {
        // The peer's FIN came first, whatever followed.
        (ClosedBy::Peer, CloseKind::Fin)
    } else if first == tcp_state::FIN_WAIT1 {
        // The owner's FIN came first; a reset or a timeout of the orphan
        // after it is detail.
        (ClosedBy::Local, CloseKind::Fin)
    } else if timed_out {
        (ClosedBy::Local, CloseKind::Timeout)
    } else if rst_received {
        (ClosedBy::Peer, CloseKind::Rst)
    } else if first == tcp_state::CLOSE {
        // Straight from ESTABLISHED to CLOSE with no reset received and no
        // timeout: the owner aborted (SO_LINGER 0, unread data at close,
        // `ss -K`).
        (ClosedBy::Local, CloseKind::Rst)
    } else {
        (ClosedBy::Local, CloseKind::Fin)
    };

    let idle_at_end = end_seen.then(|| {
        goodbye_silence(c, hz).unwrap_or_else(|| {
            let last = later(c.end_last_send_j, c.end_last_recv_j);
            Duration::from_nanos(hz.ns(idle_ticks(c.end_j, last)))
        })
    });

    // A send that died: payload in flight at the end, answered by a reset
    // or by nothing at all (probes of an idle connection are not a send).
    let died_on_send = unacked
        && (rst_received || timed_out)
        && !matches!(
            timeout_cause,
            Some(TimeoutCause::Keepalive | TimeoutCause::ZeroWindow)
        );
    let failed_send_cause =
        (died_on_send && c.first_tx_us > 0).then_some(if first == tcp_state::CLOSE_WAIT {
            StaleCause::PeerClosed
        } else {
            StaleCause::Silence
        });
    let send_ns = c.first_tx_us.saturating_mul(1000);
    let silence_before_failed_send = failed_send_cause.map(|cause| {
        let since_ns = if cause == StaleCause::PeerClosed && end_seen {
            // From the peer's FIN (0 when the send crossed it).
            c.end_ns
        } else {
            // Last sign of life from the peer before the send: data or ACK.
            let final_j = c.jiffies as u32;
            let last_j = later(c.last_recv_j, c.last_ack_j);
            ts_ns.saturating_sub(hz.ns(elapsed(final_j, last_j)))
        };
        Duration::from_nanos(send_ns.saturating_sub(since_ns))
    });

    let lifetime = (c.established_ns > 0 && end_seen && c.end_ns >= c.established_ns)
        .then(|| Duration::from_nanos(c.end_ns - c.established_ns));
    // Jiffies stamps round to a tick: never idle for longer than it lived.
    let idle_at_end = match (idle_at_end, lifetime) {
        (Some(i), Some(l)) => Some(i.min(l)),
        (i, _) => i,
    };

    Ending {
        closed_by,
        close_kind,
        timeout_cause,
        idle_at_end,
        silence_before_failed_send,
        failed_send_cause,
        lifetime,
        keepalive: c.ka.enabled != 0,
    }
}

/// The most payload a goodbye holds: a protocol's farewell message (MySQL's
/// ERR packet, PostgreSQL's ErrorResponse, an HTTP/2 GOAWAY, a TLS
/// close_notify: tens to a few hundred bytes), not a response body.
pub(crate) const GOODBYE_MAX_BYTES: u32 = 1024;
/// The longest a goodbye takes from its first byte to the peer's FIN: the
/// server writes it and closes (or, like Go's HTTP/2 server, closes within
/// a second of its GOAWAY).
pub(crate) const GOODBYE_MAX_SPAN: Duration = Duration::from_secs(1);

/// The silence before the peer's final burst, when the connection ended
/// with the peer's FIN right after a goodbye: at most
/// [`GOODBYE_MAX_BYTES`] of payload from the peer, begun at most
/// [`GOODBYE_MAX_SPAN`] before the FIN, after a silence of at least
/// [`tracer_common::BURST_GAP_NS`] both ways (our own last send came
/// before the silence began: otherwise the burst answers it, a response
/// and not a goodbye). `None` when the end was anything else.
fn goodbye_silence(c: &CloseData, hz: Hz) -> Option<Duration> {
    if c.first_close_state != tcp_state::CLOSE_WAIT
        || c.pre_burst_ns == 0
        || c.burst_start_ns <= c.pre_burst_ns
        || c.end_ns < c.burst_start_ns
    {
        return None;
    }
    // bytes_received counts the FIN's sequence number too.
    let burst = (c.bytes_received as u32)
        .wrapping_sub(c.burst_base)
        .wrapping_sub(1);
    if burst == 0 || burst > GOODBYE_MAX_BYTES {
        return None;
    }
    if Duration::from_nanos(c.end_ns - c.burst_start_ns) > GOODBYE_MAX_SPAN {
        return None;
    }
    // Our last send, on the monotonic clock (a tick's rounding allowed);
    // one before ESTABLISHED (or none: lsndtime unset) is no send.
    let send_ns = c
        .end_ns
        .saturating_sub(hz.ns(idle_ticks(c.end_j, c.end_last_send_j)));
    if send_ns >= c.established_ns && send_ns > c.pre_burst_ns + hz.ns(1) {
        return None;
    }
    Some(Duration::from_nanos(c.burst_start_ns - c.pre_burst_ns))
}

/// Why a connect failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ConnectFailure {
    /// The peer answered the SYN with a reset (nothing listens there).
    Refused,
    /// The SYN retransmissions (tcp_syn_retries) or TCP_USER_TIMEOUT ran
    /// out unanswered.
    Timeout,
    /// An ICMP error said the peer cannot be reached (a deleted pod, a gone
    /// node, a reject policy), at once or after the retransmissions.
    Unreachable,
}

impl ConnectFailure {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
        }
    }
}

/// Why the connect of a [`close_flags::CONNECT_FAILED`] summary failed;
/// `None` when it was not a failure (the owner gave up first: closed the
/// socket before the answer, with no error on it).
pub(crate) fn connect_failure(c: &CloseData) -> Option<ConnectFailure> {
    if c.flags & close_flags::CONNECT_FAILED == 0 {
        return None;
    }
    let unreachable = [
        libc::EHOSTUNREACH,
        libc::ENETUNREACH,
        libc::EHOSTDOWN,
        libc::ENETDOWN,
        libc::EPROTO,
    ];
    // An ICMP error that arrived while the connecting process held the
    // socket is only a soft error; the connect then fails with it.
    let errno = if c.errno == 0 { c.soft_errno } else { c.errno };
    if c.flags & close_flags::RST_RECEIVED != 0 || errno == libc::ECONNREFUSED as u32 {
        Some(ConnectFailure::Refused)
    } else if errno == ETIMEDOUT {
        Some(ConnectFailure::Timeout)
    } else if unreachable.iter().any(|&e| errno == e as u32) {
        Some(ConnectFailure::Unreachable)
    } else if errno == 0 && c.flags & close_flags::ERROR_QUEUED != 0 {
        // An ICMP error queued on an IP_RECVERR socket, whose errno the
        // owner read (and so cleared) before giving up.
        Some(ConnectFailure::Unreachable)
    } else {
        None
    }
}

/// Ticks from `then` to `now`: the whole 32-bit difference (up to 2^32
/// ticks, 49 days at HZ 1000), except a few ticks "in the future", which
/// are stamps taken a moment apart (read as 0). The caller bounds it by the
/// connection's lifetime.
fn idle_ticks(now: u32, then: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if d > u32::MAX - 1024 { 0 } else { d }
}

/// The verdict against an idle threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub idle_kill: bool,
    pub stale_reuse: Option<StaleOutcome>,
    /// Why the stale reuse happened, with `stale_reuse`.
    pub stale_cause: Option<StaleCause>,
}

pub(crate) fn verdict(e: &Ending, threshold: Duration) -> Verdict {
    let stale_cause = match (e.failed_send_cause, e.silence_before_failed_send) {
        (Some(StaleCause::PeerClosed), _) => Some(StaleCause::PeerClosed),
        (Some(StaleCause::Silence), Some(s)) if s >= threshold => Some(StaleCause::Silence),
        _ => None,
    };
    // A timeout (also of an orphan after the owner's close) or a reset.
    let stale_reuse = stale_cause.map(|_| {
        if e.timeout_cause.is_some() {
            StaleOutcome::Timeout
        } else {
            StaleOutcome::Rst
        }
    });
    let idle_end = e.idle_at_end.is_some_and(|i| i >= threshold)
        && (e.closed_by == ClosedBy::Peer || e.close_kind == CloseKind::Timeout);
    Verdict {
        idle_kill: idle_end || stale_cause == Some(StaleCause::Silence),
        stale_reuse,
        stale_cause,
    }
}

/// Keepalive settings in seconds, as shown to people.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a flat JSON view of independent facts"
)]
pub(crate) struct KeepaliveView {
    pub enabled: bool,
    pub idle_s: f64,
    pub interval_s: f64,
    pub probes: u8,
    /// 0 = not set.
    pub user_timeout_ms: u32,
    /// Whether idle/interval/probes are the socket's own (else the
    /// namespace's sysctls).
    pub own_idle: bool,
    pub own_interval: bool,
    pub own_probes: bool,
}

impl KeepaliveView {
    pub(crate) fn new(ka: &Keepalive, hz: Hz) -> Self {
        Self {
            enabled: ka.enabled != 0,
            idle_s: hz.secs(ka.time_j),
            interval_s: hz.secs(ka.intvl_j),
            probes: ka.probes,
            user_timeout_ms: ka.user_timeout_ms,
            own_idle: ka.from_socket & ka_source::TIME != 0,
            own_interval: ka.from_socket & ka_source::INTVL != 0,
            own_probes: ka.from_socket & ka_source::PROBES != 0,
        }
    }

    /// Like `netstat -o`: `keepalive(idle/interval/probes)` or `off`.
    pub(crate) fn short(&self) -> String {
        if self.enabled {
            format!(
                "keepalive({}/{}/{})",
                self.idle_s, self.interval_s, self.probes
            )
        } else {
            "off".to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HZ: Hz = Hz(250);
    /// A jiffies clock and a monotonic clock that agree: j = ns * 250 / 1e9 + J0.
    const J0: u64 = 1_000_000;

    fn j_at(ns: u64) -> u64 {
        J0 + ns * 250 / 1_000_000_000
    }

    /// The ending of `c` at `ts`, which must be closed by `by` with `kind`.
    #[track_caller]
    fn ended(c: &CloseData, ts: u64, by: ClosedBy, kind: CloseKind) -> Ending {
        let e = ending(c, ts, HZ);
        assert_eq!((e.closed_by, e.close_kind), (by, kind));
        e
    }

    /// A connection established at t=10 s whose last payload was at `last_s`,
    /// that left ESTABLISHED at `end_s` to `first`, closing at `close_s`.
    fn close(last_s: f64, end_s: f64, first: u8, close_s: f64) -> (CloseData, u64) {
        let s = |x: f64| (x * 1e9) as u64;
        let c = CloseData {
            ka: Keepalive::default(),
            established_ns: s(10.0),
            end_ns: s(end_s),
            end_j: j_at(s(end_s)) as u32,
            end_last_send_j: j_at(s(last_s)) as u32,
            end_last_recv_j: j_at(s(last_s - 0.5)) as u32,
            first_close_state: first,
            flags: close_flags::END_SEEN,
            jiffies: j_at(s(close_s)),
            last_send_j: j_at(s(last_s)) as u32,
            last_recv_j: j_at(s(last_s - 0.5)) as u32,
            last_ack_j: j_at(s(last_s)) as u32,
            ..CloseData::default()
        };
        (c, s(close_s))
    }

    #[test]
    fn peer_fin_after_idle_is_an_idle_kill() {
        // Server wait_timeout: FIN from the peer 3 s after the last query.
        let (c, ts) = close(20.0, 23.0, tcp_state::CLOSE_WAIT, 23.5);
        let e = ended(&c, ts, ClosedBy::Peer, CloseKind::Fin);
        let idle = e.idle_at_end.unwrap().as_secs_f64();
        assert!((idle - 3.0).abs() <= 0.004, "{idle}");
        assert_eq!(e.lifetime, Some(Duration::from_secs(13)));
        let v = verdict(&e, Duration::from_secs(1));
        assert!(v.idle_kill);
        assert_eq!(v.stale_reuse, None);
        assert!(
            !verdict(&e, Duration::from_secs(5)).idle_kill,
            "below threshold"
        );
    }

    /// A server's goodbye: the client's request at 19.99 s, the answer at
    /// 20 s, silence, then `bytes` of payload at `burst_s` and the FIN at
    /// `end_s` (the kernel's last-receive stamp is the burst's).
    fn goodbye(burst_s: f64, end_s: f64, bytes: u32) -> (CloseData, u64) {
        let s = |x: f64| (x * 1e9) as u64;
        let (mut c, ts) = close(19.99, end_s, tcp_state::CLOSE_WAIT, end_s);
        c.end_last_recv_j = j_at(s(burst_s)) as u32;
        c.pre_burst_ns = s(20.0);
        c.burst_start_ns = s(burst_s);
        c.burst_base = 500;
        c.bytes_received = 500 + u64::from(bytes) + 1;
        (c, ts)
    }

    #[test]
    fn goodbye_before_the_fin_does_not_end_the_silence() {
        let (c, ts) = goodbye(22.0, 22.001, 100);
        let idle = ending(&c, ts, HZ).idle_at_end.unwrap().as_secs_f64();
        assert!((idle - 2.0).abs() < 1e-6, "{idle}");
        assert!(verdict(&ending(&c, ts, HZ), Duration::from_secs(1)).idle_kill);
        // At the bounds: 1024 bytes, the FIN 1 s after the burst began.
        let (c, ts) = goodbye(22.0, 23.0, GOODBYE_MAX_BYTES);
        let idle = ending(&c, ts, HZ).idle_at_end.unwrap().as_secs_f64();
        assert!((idle - 2.0).abs() < 1e-6, "{idle}");
    }

    #[test]
    fn a_large_or_long_final_burst_is_payload() {
        // More than a goodbye holds: the idle time ends with the data.
        let (c, ts) = goodbye(22.0, 22.001, GOODBYE_MAX_BYTES + 1);
        let idle = ending(&c, ts, HZ).idle_at_end.unwrap().as_secs_f64();
        assert!(idle < 0.01, "{idle}");
        // The FIN long after the burst: the silence before the FIN counts.
        let (c, ts) = goodbye(22.0, 25.0, 100);
        let idle = ending(&c, ts, HZ).idle_at_end.unwrap().as_secs_f64();
        assert!((idle - 3.0).abs() < 0.005, "{idle}");
        // No silence before the FIN's burst (a stream up to the close).
        let (mut c, ts) = goodbye(22.0, 22.001, 100);
        c.pre_burst_ns = 0;
        c.burst_start_ns = 0;
        assert!(ending(&c, ts, HZ).idle_at_end.unwrap() < Duration::from_millis(10));
    }

    #[test]
    fn a_slow_answer_and_its_close_are_no_goodbye() {
        // The client asked at 21 s, after the last data (20 s): the burst
        // at 31 s answers it (then the server closes: HTTP/1.0).
        let (mut c, ts) = goodbye(31.0, 31.001, 100);
        c.end_last_send_j = j_at(21_000_000_000) as u32;
        let idle = ending(&c, ts, HZ).idle_at_end.unwrap().as_secs_f64();
        assert!(idle < 0.01, "{idle}");
        // Our own FIN first: no goodbye rule (it is the peer's FIN's).
        let (mut c, ts) = goodbye(22.0, 22.001, 100);
        c.first_close_state = tcp_state::FIN_WAIT1;
        assert!(ending(&c, ts, HZ).idle_at_end.unwrap() < Duration::from_millis(10));
    }

    #[test]
    fn local_close_is_never_a_kill() {
        let (c, ts) = close(20.0, 30.0, tcp_state::FIN_WAIT1, 30.1);
        let e = ended(&c, ts, ClosedBy::Local, CloseKind::Fin);
        assert!(!verdict(&e, Duration::from_secs(1)).idle_kill);
        // SO_LINGER 0 abort: straight to CLOSE, reset sent, none received.
        let (mut c, ts) = close(20.0, 30.0, tcp_state::CLOSE, 30.0);
        c.flags |= close_flags::RST_SENT;
        let e = ended(&c, ts, ClosedBy::Local, CloseKind::Rst);
        assert!(!verdict(&e, Duration::from_secs(1)).idle_kill);
    }

    #[test]
    fn keepalive_timeout_is_a_kill_by_timeout() {
        let (mut c, ts) = close(20.0, 80.0, tcp_state::CLOSE, 80.0);
        c.errno = ETIMEDOUT;
        c.probes_out = 9;
        c.ka.enabled = 1;
        let e = ending(&c, ts, HZ);
        assert_eq!(e.close_kind, CloseKind::Timeout);
        assert_eq!(e.timeout_cause, Some(TimeoutCause::Keepalive));
        assert!(e.keepalive);
        assert_eq!(e.silence_before_failed_send, None);
        assert!(verdict(&e, Duration::from_secs(30)).idle_kill);
    }

    #[test]
    fn send_after_silence_that_times_out_is_stale_reuse() {
        // Last activity at 20 s, a send at 25 s never acknowledged, user
        // timeout at 27 s (retransmissions keep lsndtime fresh).
        let (mut c, ts) = close(20.0, 27.0, tcp_state::CLOSE, 27.0);
        c.end_last_send_j = j_at(26_800_000_000) as u32;
        c.errno = ETIMEDOUT;
        c.flags |= close_flags::UNACKED;
        c.ka.user_timeout_ms = 2000;
        c.first_tx_us = 25_000_000;
        let e = ending(&c, ts, HZ);
        assert_eq!(e.close_kind, CloseKind::Timeout);
        assert_eq!(e.timeout_cause, Some(TimeoutCause::UserTimeout));
        let silence = e.silence_before_failed_send.unwrap().as_secs_f64();
        assert!((silence - 5.0).abs() <= 0.008, "{silence}");
        assert_eq!(e.idle().unwrap(), e.silence_before_failed_send.unwrap());
        let v = verdict(&e, Duration::from_secs(1));
        assert_eq!(v.stale_reuse, Some(StaleOutcome::Timeout));
        assert!(v.idle_kill);
        assert_eq!(verdict(&e, Duration::from_secs(10)).stale_reuse, None);
    }

    #[test]
    fn send_after_silence_answered_by_reset_is_stale_reuse() {
        let (mut c, ts) = close(20.0, 25.01, tcp_state::CLOSE, 25.01);
        c.flags |= close_flags::UNACKED | close_flags::RST_RECEIVED;
        c.errno = libc::ECONNRESET as u32;
        c.first_tx_us = 25_000_000;
        let e = ended(&c, ts, ClosedBy::Peer, CloseKind::Rst);
        let v = verdict(&e, Duration::from_secs(1));
        assert_eq!(v.stale_reuse, Some(StaleOutcome::Rst));
        assert!(v.idle_kill);
    }

    #[test]
    fn send_into_a_half_closed_connection_is_a_peer_closed_reuse() {
        // Peer FIN at 23 s (idle since 20 s); the app sends at 26 s; RST.
        let (mut c, ts) = close(20.0, 23.0, tcp_state::CLOSE_WAIT, 26.01);
        c.flags |= close_flags::UNACKED | close_flags::RST_RECEIVED;
        c.errno = libc::EPIPE as u32;
        c.first_tx_us = 26_000_000;
        c.last_ack_j = j_at(23_000_000_000) as u32; // the FIN's ACK
        let e = ended(&c, ts, ClosedBy::Peer, CloseKind::Fin);
        assert_eq!(e.failed_send_cause, Some(StaleCause::PeerClosed));
        let since_fin = e.silence_before_failed_send.unwrap().as_secs_f64();
        assert!(
            (since_fin - 3.0).abs() <= 0.001,
            "from the FIN: {since_fin}"
        );
        // Whatever the threshold: the keep-alive race.
        let v = verdict(&e, Duration::from_mins(1));
        assert_eq!(v.stale_reuse, Some(StaleOutcome::Rst));
        assert_eq!(v.stale_cause, Some(StaleCause::PeerClosed));
        assert!(!v.idle_kill, "3 s idle is no kill at a 60 s threshold");
        assert!(
            verdict(&e, Duration::from_secs(2)).idle_kill,
            "the FIN after 3 s idle is"
        );
    }

    #[test]
    fn request_crossing_the_peers_fin_is_a_peer_closed_reuse() {
        // Idle 1 s, the app sends at 21.000 s, the server's FIN (sent
        // before it saw the request) arrives at 21.0002 s, then its RST.
        let (mut c, ts) = close(20.0, 21.0002, tcp_state::CLOSE_WAIT, 21.0004);
        c.flags |= close_flags::UNACKED | close_flags::RST_RECEIVED;
        c.errno = libc::ECONNRESET as u32;
        c.first_tx_us = 21_000_000;
        let e = ending(&c, ts, HZ);
        assert_eq!(e.failed_send_cause, Some(StaleCause::PeerClosed));
        assert_eq!(e.silence_before_failed_send, Some(Duration::ZERO));
        let v = verdict(&e, Duration::from_mins(1));
        assert_eq!(
            (v.stale_reuse, v.stale_cause),
            (Some(StaleOutcome::Rst), Some(StaleCause::PeerClosed))
        );
    }

    #[test]
    fn late_close_of_a_close_wait_socket_is_the_peers_idle_kill() {
        // MariaDB's wait_timeout closed at 22 s after 2 s idle; the pool
        // closes its CLOSE_WAIT socket 5 s later; the server's kernel, whose
        // orphan expired, answers the pool's FIN with a RST. Only the FIN
        // was unacknowledged: no UNACKED (the kernel leaves the FIN out).
        let (mut c, ts) = close(20.0, 22.0, tcp_state::CLOSE_WAIT, 27.0);
        c.flags |= close_flags::RST_RECEIVED;
        c.errno = libc::ECONNRESET as u32;
        c.first_tx_us = 27_000_000;
        let e = ended(&c, ts, ClosedBy::Peer, CloseKind::Fin);
        let idle = e.idle_at_end.unwrap().as_secs_f64();
        assert!((idle - 2.0).abs() <= 0.004, "idle before the FIN: {idle}");
        let v = verdict(&e, Duration::from_secs(1));
        assert!(v.idle_kill);
        assert_eq!((v.stale_reuse, v.stale_cause), (None, None));
    }

    #[test]
    fn owners_close_after_a_path_expiry_is_no_kill() {
        // Idle past a NAT's expiry, then the owner closes: its FIN meets a
        // black hole and the orphan times out, or a reset.
        for (errno, flags) in [
            (ETIMEDOUT, 0),
            (libc::ECONNRESET as u32, close_flags::RST_RECEIVED),
        ] {
            let (mut c, ts) = close(20.0, 90.0, tcp_state::FIN_WAIT1, 100.0);
            c.errno = errno;
            c.flags |= flags;
            let e = ended(&c, ts, ClosedBy::Local, CloseKind::Fin);
            let v = verdict(&e, Duration::from_secs(1));
            assert!(!v.idle_kill, "{errno}");
            assert_eq!(v.stale_reuse, None, "{errno}");
        }
    }

    #[test]
    fn timeouts_after_an_icmp_error_are_timeouts() {
        const EHOSTUNREACH: u32 = libc::EHOSTUNREACH as u32;
        // TCP_USER_TIMEOUT on a send after the silence, an ICMP
        // admin-prohibited (EHOSTUNREACH) on the way.
        let (mut c, ts) = close(20.0, 27.0, tcp_state::CLOSE, 27.0);
        c.errno = EHOSTUNREACH;
        c.soft_errno = EHOSTUNREACH;
        c.flags |= close_flags::UNACKED;
        c.ka.user_timeout_ms = 2000;
        c.first_tx_us = 25_000_000;
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind, e.timeout_cause),
            (
                ClosedBy::Local,
                CloseKind::Timeout,
                Some(TimeoutCause::UserTimeout)
            )
        );
        let v = verdict(&e, Duration::from_secs(1));
        assert_eq!(
            (v.stale_reuse, v.stale_cause),
            (Some(StaleOutcome::Timeout), Some(StaleCause::Silence))
        );
        assert!(v.idle_kill);
        // Keepalive 1/1/3 with no send: a timeout kill, keepalive on.
        let (mut c, ts) = close(20.0, 24.0, tcp_state::CLOSE, 24.0);
        c.errno = EHOSTUNREACH;
        c.soft_errno = EHOSTUNREACH;
        c.probes_out = 3;
        c.ka.enabled = 1;
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.close_kind, e.timeout_cause),
            (CloseKind::Timeout, Some(TimeoutCause::Keepalive))
        );
        assert!(verdict(&e, Duration::from_secs(1)).idle_kill);
        // The owner's abort after an ICMP error is still the owner's abort:
        // sk_err is not set yet at that CLOSE.
        let (mut c, ts) = close(20.0, 24.0, tcp_state::CLOSE, 24.0);
        c.soft_errno = EHOSTUNREACH;
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind, e.timeout_cause),
            (ClosedBy::Local, CloseKind::Rst, None)
        );
    }

    #[test]
    fn connect_failures_by_reason() {
        let failed = |errno: i32, flags: u8| CloseData {
            errno: errno as u32,
            flags: close_flags::CONNECT_FAILED | flags,
            ..CloseData::default()
        };
        assert_eq!(
            connect_failure(&failed(libc::ECONNREFUSED, close_flags::RST_RECEIVED)),
            Some(ConnectFailure::Refused)
        );
        assert_eq!(
            connect_failure(&failed(libc::ETIMEDOUT, 0)),
            Some(ConnectFailure::Timeout)
        );
        assert_eq!(
            connect_failure(&failed(libc::EHOSTUNREACH, 0)),
            Some(ConnectFailure::Unreachable)
        );
        // The owner closed a connecting socket: no error, no failure.
        assert_eq!(connect_failure(&failed(0, 0)), None);
        // An ICMP error queued (IP_RECVERR) whose errno the owner read
        // and cleared before it closed the socket.
        let queued = close_flags::ERROR_QUEUED;
        assert_eq!(
            connect_failure(&failed(0, queued)),
            Some(ConnectFailure::Unreachable)
        );
        // A reset stays a refusal.
        assert_eq!(
            connect_failure(&failed(0, queued | close_flags::RST_RECEIVED)),
            Some(ConnectFailure::Refused)
        );
        // A connection that was established and ended is never one.
        let mut ended = failed(libc::ECONNREFUSED, 0);
        ended.flags = close_flags::END_SEEN;
        assert_eq!(connect_failure(&ended), None);
    }

    #[test]
    fn zero_window_probe_timeout_is_not_keepalive() {
        let (mut c, ts) = close(20.0, 90.0, tcp_state::CLOSE, 90.0);
        c.errno = ETIMEDOUT;
        c.probes_out = 15;
        c.flags |= close_flags::UNSENT;
        c.snd_wnd = 0;
        let e = ending(&c, ts, HZ);
        assert_eq!(e.timeout_cause, Some(TimeoutCause::ZeroWindow));
        assert_eq!(e.failed_send_cause, None);
        assert_eq!(TimeoutCause::ZeroWindow.as_str(), "zero_window");
    }

    #[test]
    fn close_wait_socket_that_times_out_was_closed_by_the_peer() {
        let (mut c, ts) = close(20.0, 23.0, tcp_state::CLOSE_WAIT, 40.0);
        c.errno = ETIMEDOUT;
        let e = ended(&c, ts, ClosedBy::Peer, CloseKind::Fin);
        assert_eq!(e.timeout_cause, Some(TimeoutCause::Retransmission));
    }

    #[test]
    fn idle_longer_than_2_pow_31_ticks_is_not_zero() {
        // HZ 1000: 2^31 ticks are 24.9 days. Open 40 days, idle 30 days.
        let hz = Hz(1000);
        let day = 86_400_000_000_000u64;
        let j = |ns: u64| (1_000_000 + ns / 1_000_000) as u32;
        let c = CloseData {
            established_ns: day,
            end_ns: 41 * day,
            end_j: j(41 * day),
            end_last_send_j: j(11 * day),
            end_last_recv_j: j(11 * day),
            first_close_state: tcp_state::CLOSE_WAIT,
            flags: close_flags::END_SEEN,
            jiffies: u64::from(j(41 * day)),
            ..CloseData::default()
        };
        let e = ending(&c, 41 * day, hz);
        let idle = e.idle_at_end.unwrap().as_secs();
        assert_eq!(idle, 30 * 86_400, "{idle}");
    }

    #[test]
    fn busy_connection_reset_by_peer_is_not_idle() {
        let (mut c, ts) = close(20.0, 20.1, tcp_state::CLOSE, 20.1);
        c.flags |= close_flags::RST_RECEIVED;
        let e = ending(&c, ts, HZ);
        assert_eq!(e.close_kind, CloseKind::Rst);
        let v = verdict(&e, Duration::from_secs(1));
        assert!(!v.idle_kill);
        assert_eq!(v.stale_reuse, None);
    }

    #[test]
    fn connections_older_than_the_tracer_have_no_lifetime() {
        let (mut c, ts) = close(20.0, 23.0, tcp_state::CLOSE_WAIT, 23.5);
        c.established_ns = 0;
        assert_eq!(ending(&c, ts, HZ).lifetime, None);
        c.flags = 0;
        let e = ending(&c, ts, HZ);
        assert_eq!(e.idle_at_end, None);
        assert!(!verdict(&e, Duration::ZERO).idle_kill);
    }

    #[test]
    fn keepalive_view_is_in_seconds() {
        let ka = Keepalive {
            time_j: 7200 * 250,
            intvl_j: 75 * 250,
            probes: 9,
            enabled: 1,
            from_socket: ka_source::INTVL,
            ..Keepalive::default()
        };
        let v = KeepaliveView::new(&ka, HZ);
        assert_eq!((v.idle_s, v.interval_s, v.probes), (7200.0, 75.0, 9));
        assert!(v.own_interval && !v.own_idle);
        assert_eq!(v.short(), "keepalive(7200/75/9)");
    }
}
