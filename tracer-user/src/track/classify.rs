//! How a connection ended, and whether that was an idle kill or a stale
//! reuse: pure functions of the kernel's CLOSE summary.
//!
//! Definitions (the metrics' contract, see README):
//! - idle at the end: time since the last payload byte either way when the
//!   connection left ESTABLISHED (first FIN, RST or timeout). Keepalive
//!   probes and bare ACKs are not payload (the kernel's `lsndtime` and
//!   `icsk_ack.lrcvtime` only move for data).
//! - stale reuse: the connection died on a send (data unacknowledged at the
//!   end) answered by a reset or never acknowledged (timeout), and that send
//!   came after at least the threshold of silence. For those, the silence
//!   before the send is the idle time that killed the connection.
//! - idle kill: idle at the end >= threshold, and the end came from the peer
//!   (FIN or RST) or from a timeout; or a stale reuse. A local close or a
//!   local abort is the owner's own decision, never a kill.

use std::time::Duration;

use serde::Serialize;
use tracer_common::{CloseData, Keepalive, close_flags, ka_source, tcp_state};

use crate::event::jiffies::{Hz, elapsed, later};

const ETIMEDOUT: u32 = libc::ETIMEDOUT as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedBy {
    Local,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseKind {
    Fin,
    Rst,
    Timeout,
}

/// What ran out, for a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutCause {
    /// Keepalive probes went unanswered.
    Keepalive,
    /// TCP_USER_TIMEOUT expired with data unacknowledged.
    UserTimeout,
    /// The retransmission limit (tcp_retries2) was reached.
    Retransmission,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StaleOutcome {
    Rst,
    Timeout,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
        }
    }
}

impl CloseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::Timeout => "timeout",
        }
    }
}

impl StaleOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rst => "rst",
            Self::Timeout => "timeout",
        }
    }
}

/// The facts of one connection's end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ending {
    pub closed_by: ClosedBy,
    pub close_kind: CloseKind,
    pub timeout_cause: Option<TimeoutCause>,
    /// Idle time when the connection left ESTABLISHED (None: the tracer did
    /// not see it leave).
    pub idle_at_end: Option<Duration>,
    /// Silence before the send that died unanswered (stale reuse candidate).
    pub silence_before_failed_send: Option<Duration>,
    /// ESTABLISHED to the end; None for connections older than the tracer.
    pub lifetime: Option<Duration>,
    pub keepalive: bool,
}

impl Ending {
    /// Idle time as the metrics report it: the silence before a failed send
    /// when the connection died on one, else the idle time at the end.
    pub fn idle(&self) -> Option<Duration> {
        self.silence_before_failed_send.or(self.idle_at_end)
    }
}

/// Classifies the end of a connection. `ts_ns` is the CLOSE event's
/// CLOCK_MONOTONIC time (it pairs with `c.jiffies`).
pub fn ending(c: &CloseData, ts_ns: u64, hz: Hz) -> Ending {
    let rst_received = c.flags & close_flags::RST_RECEIVED != 0;
    let unacked = c.flags & close_flags::UNACKED != 0;
    let end_seen = c.flags & close_flags::END_SEEN != 0;
    let first = c.first_close_state;

    let (closed_by, close_kind, timeout_cause) = if c.errno == ETIMEDOUT && !rst_received {
        let cause = if !unacked && c.probes_out > 0 {
            TimeoutCause::Keepalive
        } else if c.ka.user_timeout_ms > 0 {
            TimeoutCause::UserTimeout
        } else {
            TimeoutCause::Retransmission
        };
        (ClosedBy::Local, CloseKind::Timeout, Some(cause))
    } else if first == tcp_state::CLOSE_WAIT {
        // The peer's FIN came first, whatever followed.
        (ClosedBy::Peer, CloseKind::Fin, None)
    } else if rst_received && first != tcp_state::FIN_WAIT1 {
        (ClosedBy::Peer, CloseKind::Rst, None)
    } else if first == tcp_state::CLOSE {
        // Straight from ESTABLISHED to CLOSE with no reset received and no
        // timeout: the owner aborted (SO_LINGER 0, unread data at close).
        (ClosedBy::Local, CloseKind::Rst, None)
    } else {
        (ClosedBy::Local, CloseKind::Fin, None)
    };

    let idle_at_end = end_seen.then(|| {
        let last = later(c.end_last_send_j, c.end_last_recv_j);
        Duration::from_nanos(hz.ns(elapsed(c.end_j, last)))
    });

    // A send that died: data in flight at the end, answered by a reset or
    // by nothing at all.
    let died_on_send = unacked
        && (rst_received || close_kind == CloseKind::Timeout)
        && timeout_cause != Some(TimeoutCause::Keepalive);
    let silence_before_failed_send = (died_on_send && c.first_tx_us > 0).then(|| {
        // Last sign of life from the peer before the send: data or ACK when
        // the connection died while established; payload only when the
        // peer had already sent its FIN (the FIN is not payload).
        let final_j = c.jiffies as u32;
        let last_j = if first == tcp_state::CLOSE_WAIT && end_seen {
            later(c.end_last_send_j, c.end_last_recv_j)
        } else {
            later(c.last_recv_j, c.last_ack_j)
        };
        let last_ns = ts_ns.saturating_sub(hz.ns(elapsed(final_j, last_j)));
        let send_ns = c.first_tx_us.saturating_mul(1000);
        Duration::from_nanos(send_ns.saturating_sub(last_ns))
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
        lifetime,
        keepalive: c.ka.enabled != 0,
    }
}

/// The verdict against an idle threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub idle_kill: bool,
    pub stale_reuse: Option<StaleOutcome>,
}

pub fn verdict(e: &Ending, threshold: Duration) -> Verdict {
    let stale_reuse = e
        .silence_before_failed_send
        .filter(|s| *s >= threshold)
        .map(|_| {
            if e.close_kind == CloseKind::Timeout {
                StaleOutcome::Timeout
            } else {
                StaleOutcome::Rst
            }
        });
    let idle_end = e.idle_at_end.is_some_and(|i| i >= threshold)
        && (e.closed_by == ClosedBy::Peer || e.close_kind == CloseKind::Timeout);
    Verdict {
        idle_kill: idle_end || stale_reuse.is_some(),
        stale_reuse,
    }
}

/// Keepalive settings in seconds, as shown to people.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a flat JSON view of independent facts"
)]
pub struct KeepaliveView {
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
    pub fn new(ka: &Keepalive, hz: Hz) -> Self {
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
    pub fn short(&self) -> String {
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
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind),
            (ClosedBy::Peer, CloseKind::Fin)
        );
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

    #[test]
    fn local_close_is_never_a_kill() {
        let (c, ts) = close(20.0, 30.0, tcp_state::FIN_WAIT1, 30.1);
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind),
            (ClosedBy::Local, CloseKind::Fin)
        );
        assert!(!verdict(&e, Duration::from_secs(1)).idle_kill);
        // SO_LINGER 0 abort: straight to CLOSE, reset sent, none received.
        let (mut c, ts) = close(20.0, 30.0, tcp_state::CLOSE, 30.0);
        c.flags |= close_flags::RST_SENT;
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind),
            (ClosedBy::Local, CloseKind::Rst)
        );
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
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind),
            (ClosedBy::Peer, CloseKind::Rst)
        );
        let v = verdict(&e, Duration::from_secs(1));
        assert_eq!(v.stale_reuse, Some(StaleOutcome::Rst));
        assert!(v.idle_kill);
    }

    #[test]
    fn send_into_a_half_closed_connection_is_stale_reuse_after_the_fin() {
        // Peer FIN at 23 s (idle since 20 s); the app sends at 26 s; RST.
        let (mut c, ts) = close(20.0, 23.0, tcp_state::CLOSE_WAIT, 26.01);
        c.flags |= close_flags::UNACKED | close_flags::RST_RECEIVED;
        c.errno = libc::EPIPE as u32;
        c.first_tx_us = 26_000_000;
        c.last_ack_j = j_at(23_000_000_000) as u32; // the FIN's ACK
        let e = ending(&c, ts, HZ);
        assert_eq!(
            (e.closed_by, e.close_kind),
            (ClosedBy::Peer, CloseKind::Fin)
        );
        let silence = e.silence_before_failed_send.unwrap().as_secs_f64();
        assert!(
            (silence - 6.0).abs() <= 0.008,
            "silence since the last payload: {silence}"
        );
        assert_eq!(
            verdict(&e, Duration::from_secs(1)).stale_reuse,
            Some(StaleOutcome::Rst)
        );
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
