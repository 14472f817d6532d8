//! The daemon's bounded table of open connections, keyed by socket cookie.

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasherDefault, Hasher},
};

use tracer_common::{EventInfo, Keepalive, SockoptData, ka_source, sockopt};

/// One tracked connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conn {
    /// Socket identity, addresses and owner as of the OPEN event (or the
    /// first snapshot, for connections older than the tracer).
    pub info: EventInfo,
    /// CLOCK_MONOTONIC when the tracer learnt of it.
    pub seen_ns: u64,
    /// Whether the tracer saw it open (else it predates the tracer).
    pub opened: bool,
    /// Keepalive as last known (open event, later socket options, snapshots).
    pub ka: Keepalive,
    /// jiffies per second used to store option values given in seconds.
    pub hz: u32,
    /// CLOCK_MONOTONIC of the peer's FIN (the socket is in CLOSE_WAIT, or
    /// later; for one found in CLOSE_WAIT by a snapshot, when it was found);
    /// 0 while the peer has not closed.
    pub peer_closed_ns: u64,
    /// Its end was classified and counted at the peer's FIN: the final
    /// close only adds what it alone can tell (a send into it that failed).
    pub end_counted: bool,
}

/// Hashes socket cookies. The kernel hands them out from a counter, so
/// they cannot be chosen to collide; one multiply spreads them (SipHash,
/// the default, costs more than the rest of a lookup).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        // Fibonacci hashing, folded so that low and high bits both vary.
        let h = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}

/// A map keyed by socket cookie.
pub(crate) type CookieMap<V> = HashMap<u64, V, BuildHasherDefault<CookieHasher>>;

/// Connections by cookie, at most `cap`; past it the oldest are dropped.
#[derive(Debug)]
pub(crate) struct ConnTable {
    conns: CookieMap<Conn>,
    /// Insertion order, for eviction; may hold cookies already removed.
    order: VecDeque<u64>,
    cap: usize,
    /// Connections dropped to stay within `cap`.
    pub evicted: u64,
}

impl ConnTable {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            conns: CookieMap::default(),
            order: VecDeque::new(),
            cap: cap.max(1),
            evicted: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub(crate) fn get(&self, cookie: u64) -> Option<&Conn> {
        self.conns.get(&cookie)
    }

    pub(crate) fn get_mut(&mut self, cookie: u64) -> Option<&mut Conn> {
        self.conns.get_mut(&cookie)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    /// Adds (or refreshes) a connection.
    pub(crate) fn insert(&mut self, conn: Conn) {
        let cookie = conn.info.cookie;
        if self.conns.insert(cookie, conn).is_none() {
            self.order.push_back(cookie);
            while self.conns.len() > self.cap {
                match self.order.pop_front() {
                    Some(old) if self.conns.remove(&old).is_some() => self.evicted += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            // Removed cookies linger in `order`: compact it once they are
            // two thirds of it, so that it stays near the live table's size.
            if self.order.len() > 3 * self.conns.len().max(4096) {
                self.order.retain(|c| self.conns.contains_key(c));
            }
        }
    }

    pub(crate) fn remove(&mut self, cookie: u64) -> Option<Conn> {
        self.conns.remove(&cookie)
    }

    /// Applies a keepalive option a process set on a tracked connection.
    pub(crate) fn apply_sockopt(&mut self, cookie: u64, o: &SockoptData) -> bool {
        let Some(c) = self.conns.get_mut(&cookie) else {
            return false;
        };
        apply_sockopt(&mut c.ka, o, c.hz);
        true
    }
}

/// What a keepalive option does to the socket's settings (values in
/// seconds become jiffies, as the kernel keeps them).
pub(crate) fn apply_sockopt(ka: &mut Keepalive, o: &SockoptData, hz: u32) {
    let secs = u32::try_from(o.value).unwrap_or(0);
    match (o.level, o.optname) {
        (sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE) => ka.enabled = u8::from(o.value != 0),
        (sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE) => {
            ka.time_j = secs.saturating_mul(hz);
            ka.from_socket |= ka_source::TIME;
        }
        (sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL) => {
            ka.intvl_j = secs.saturating_mul(hz);
            ka.from_socket |= ka_source::INTVL;
        }
        (sockopt::SOL_TCP, sockopt::TCP_KEEPCNT) => {
            ka.probes = u8::try_from(o.value).unwrap_or(u8::MAX);
            ka.from_socket |= ka_source::PROBES;
        }
        (sockopt::SOL_TCP, sockopt::TCP_USER_TIMEOUT) => ka.user_timeout_ms = secs,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(cookie: u64) -> Conn {
        Conn {
            info: EventInfo {
                cookie,
                ..EventInfo::default()
            },
            seen_ns: cookie,
            opened: true,
            ka: Keepalive::default(),
            hz: 250,
            peer_closed_ns: 0,
            end_counted: false,
        }
    }

    #[test]
    fn bounded_with_oldest_evicted_first() {
        let mut t = ConnTable::new(3);
        for c in 1..=5 {
            t.insert(conn(c));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.evicted, 2);
        assert!(t.get(1).is_none() && t.get(2).is_none() && t.get(5).is_some());
        t.remove(4);
        t.insert(conn(6));
        assert_eq!(t.len(), 3);
        assert_eq!(t.evicted, 2, "room freed by a close needs no eviction");
        // Many inserts and removals keep the order queue bounded.
        for c in 100..10_000 {
            t.insert(conn(c));
            t.remove(c);
        }
        assert!(t.order.len() <= 3 * 4096, "{}", t.order.len());
    }

    #[test]
    fn cookie_hashes_spread_sequential_cookies() {
        use std::hash::BuildHasher as _;
        let b = BuildHasherDefault::<CookieHasher>::default();
        let hashes: std::collections::HashSet<u64> =
            (1..=10_000u64).map(|c| b.hash_one(c)).collect();
        assert_eq!(hashes.len(), 10_000);
        // hashbrown takes its control byte from the top 7 bits: they vary too.
        let tops: std::collections::HashSet<u64> =
            (1..=1_000u64).map(|c| b.hash_one(c) >> 57).collect();
        assert!(tops.len() > 100, "{}", tops.len());
    }

    #[test]
    fn refreshing_a_connection_does_not_duplicate_it() {
        let mut t = ConnTable::new(2);
        t.insert(conn(1));
        t.insert(conn(1));
        t.insert(conn(2));
        assert_eq!((t.len(), t.evicted), (2, 0));
    }

    #[test]
    fn keepalive_options_update_the_settings() {
        let mut t = ConnTable::new(4);
        t.insert(conn(9));
        let set = |optname, level, value| SockoptData {
            level,
            optname,
            value,
            optlen: 4,
        };
        assert!(t.apply_sockopt(9, &set(sockopt::SO_KEEPALIVE, sockopt::SOL_SOCKET, 1)));
        assert!(t.apply_sockopt(9, &set(sockopt::TCP_KEEPIDLE, sockopt::SOL_TCP, 30)));
        assert!(t.apply_sockopt(9, &set(sockopt::TCP_KEEPINTVL, sockopt::SOL_TCP, 5)));
        assert!(t.apply_sockopt(9, &set(sockopt::TCP_KEEPCNT, sockopt::SOL_TCP, 3)));
        assert!(t.apply_sockopt(9, &set(sockopt::TCP_USER_TIMEOUT, sockopt::SOL_TCP, 2000)));
        let ka = t.get(9).unwrap().ka;
        assert_eq!(
            (ka.enabled, ka.time_j, ka.intvl_j, ka.probes),
            (1, 7500, 1250, 3)
        );
        assert_eq!(ka.user_timeout_ms, 2000);
        assert_eq!(
            ka.from_socket,
            ka_source::TIME | ka_source::INTVL | ka_source::PROBES
        );
        assert!(!t.apply_sockopt(10, &set(sockopt::SO_KEEPALIVE, sockopt::SOL_SOCKET, 1)));
    }
}
