//! The daemon's bounded table of open connections, keyed by socket cookie,
//! with the counts the open-connection gauges need kept as it changes (a
//! scrape reads a few label sets, not every connection).

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
    num::NonZeroU64,
    ops::RangeInclusive,
};

use tracer_common::{EventInfo, Keepalive, Owner, SockoptData, ka_source, sockopt};

use super::{Direction, direction};

/// One tracked connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conn {
    /// Socket identity, addresses and owner as of the OPEN event (or the
    /// first snapshot, for connections older than the tracer).
    pub info: EventInfo,
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

impl Conn {
    /// CLOCK_MONOTONIC when the tracer learnt of it (the time of the event
    /// or snapshot it came in with: kept once, in `info`).
    pub(crate) fn seen_ns(&self) -> u64 {
        self.info.ts_ns
    }
}

/// Hashes socket cookies. The kernel hands them out from a counter (in
/// per-CPU batches), so they cannot be chosen to collide, and sockets
/// opened together get neighbouring cookies. The low 57 bits of the hash,
/// from which hashbrown picks the bucket, are the cookie times 3: a
/// connection's neighbours in time sit 3 buckets from it, so a stream of
/// opens (and of their closes, later) walks the table's memory in order
/// instead of missing the cache at every event (at 100k connections the
/// table is larger than the cache). Not the cookie itself: consecutive
/// cookies would fill whole groups of 16 buckets, whose removals leave
/// tombstones that a lookup of an absent cookie (the close of an evicted
/// connection) must probe through, ~0.5 us each where a spread hash takes
/// ~30 ns; 3 leaves room in every group (measured: absent lookups ~20 ns).
/// The top 7 bits, which hashbrown compares first within a group, come
/// from a multiply (Fibonacci hashing). Ids derived from addresses
/// (kernels before 5.12) are random already. Other keys (gauge keys) fold
/// their words into the state by rotate and xor.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CookieHasher(u64);

/// The bits of a hash that keep the key's order (see [`CookieHasher`]).
const KEY_BITS: u64 = (1 << 57) - 1;

impl Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        let x = self.0;
        (x.wrapping_mul(3) & KEY_BITS) | (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) & !KEY_BITS)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, v: u64) {
        // One word (a cookie): the hash keeps it. Several (a gauge key):
        // each shifts the ones before it.
        self.0 = self.0.rotate_left(23) ^ v;
    }
}

/// A map keyed by socket cookie.
pub(crate) type CookieMap<V> = HashMap<u64, V, BuildHasherDefault<CookieHasher>>;

/// What the open-connection gauges (`connections_open`,
/// `peer_connections_open`) need of a connection: its owner (pod,
/// container, role come from it), direction, keepalive and the remote end
/// its `peer` label names. Fixed while the connection is open except
/// keepalive and an owner learnt later, which re-key it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GaugeKey {
    pub owner: Owner,
    pub dir: Direction,
    pub keepalive: bool,
    pub remote: IpAddr,
    /// Outbound: the service's port (part of the peer label); inbound: 0
    /// (the client's port is not).
    pub remote_port: u16,
}

impl std::hash::Hash for GaugeKey {
    // Four words through the cookie hasher (every insert and removal
    // hashes one): what tells keys apart in practice. Equality still
    // compares every field.
    fn hash<H: Hasher>(&self, h: &mut H) {
        let o = &self.owner;
        let remote = match self.remote {
            IpAddr::V4(v4) => u128::from(v4.to_bits()),
            IpAddr::V6(v6) => v6.to_bits(),
        };
        h.write_u64(u64::from(o.pid) << 32 | u64::from(o.tid));
        h.write_u64(o.cgroup_id);
        h.write_u64(remote as u64 ^ (remote >> 64) as u64);
        h.write_u64(
            u64::from(o.flags) << 32
                | u64::from(self.remote_port) << 16
                | u64::from(self.keepalive) << 1
                | u64::from(self.dir == Direction::Inbound),
        );
    }
}

/// Gauge keys, hashed word by word.
type GaugeMap = HashMap<GaugeKey, i64, BuildHasherDefault<CookieHasher>>;

/// Connections by cookie, at most `cap`; past it the oldest are dropped.
/// A connection and its neighbours in insertion order.
#[derive(Debug)]
struct Entry {
    conn: Conn,
    /// The cookies inserted just before and after it (still in the table).
    /// Kernel cookies start at 1 and derived ids have bit 63 set, so 0 is
    /// never a connection's: an entry keyed 0 (none is) would stay unlinked.
    prev: Option<NonZeroU64>,
    next: Option<NonZeroU64>,
}

#[derive(Debug)]
pub(crate) struct ConnTable {
    conns: CookieMap<Entry>,
    /// Oldest and newest entries: a list in insertion order threaded
    /// through the entries, for eviction. A removal unlinks its entry from
    /// its neighbours (which were inserted around the same time, so sit
    /// near it in the table), and nothing looks up a cookie that is gone:
    /// a queue of cookies with lazy deletion did, at each compaction.
    oldest: Option<NonZeroU64>,
    newest: Option<NonZeroU64>,
    cap: usize,
    /// Connections dropped to stay within `cap`.
    pub evicted: u64,
    /// Open connections per [`GaugeKey`] (no zero entries).
    open: GaugeMap,
    /// Cookies of the connections whose peer has closed (CLOSE_WAIT).
    peer_closed: HashSet<u64, BuildHasherDefault<CookieHasher>>,
    /// Local ports of connecting sockets, for the direction of sockets
    /// whose owner is unknown.
    ephemeral: RangeInclusive<u16>,
}

impl ConnTable {
    pub(crate) fn new(cap: usize, ephemeral: RangeInclusive<u16>) -> Self {
        Self {
            conns: CookieMap::default(),
            oldest: None,
            newest: None,
            cap: cap.max(1),
            evicted: 0,
            open: GaugeMap::default(),
            peer_closed: HashSet::default(),
            ephemeral,
        }
    }

    /// Whether a connection is outbound or inbound.
    pub(crate) fn direction(&self, info: &EventInfo) -> Direction {
        direction(&info.owner, info.sock.sport, &self.ephemeral)
    }

    fn key(&self, c: &Conn) -> GaugeKey {
        gauge_key(c, &self.ephemeral)
    }

    /// Counts `c` in (`by` 1) or out (-1) of the gauges.
    fn count(&mut self, c: &Conn, by: i64) {
        let key = self.key(c);
        bump(&mut self.open, key, by);
        if c.peer_closed_ns != 0 {
            if by > 0 {
                self.peer_closed.insert(c.info.cookie);
            } else {
                self.peer_closed.remove(&c.info.cookie);
            }
        }
    }

    /// Open connections per gauge key.
    pub(crate) fn open_counts(&self) -> impl Iterator<Item = (&GaugeKey, i64)> {
        self.open.iter().map(|(k, &n)| (k, n))
    }

    /// The connections whose peer has closed and that are still open.
    pub(crate) fn peer_closed(&self) -> impl Iterator<Item = &Conn> {
        self.peer_closed.iter().filter_map(|c| self.get(*c))
    }

    /// Changes a connection through `f`, keeping the counts.
    /// In place: the gauge key and the CLOSE_WAIT set change only where
    /// `f` changed what they hold.
    fn update(&mut self, cookie: u64, f: impl FnOnce(&mut Conn)) -> Option<&Conn> {
        let c = &mut self.conns.get_mut(&cookie)?.conn;
        let (key, closed) = (gauge_key(c, &self.ephemeral), c.peer_closed_ns != 0);
        f(c);
        let (new_key, new_closed) = (gauge_key(c, &self.ephemeral), c.peer_closed_ns != 0);
        if new_key != key {
            bump(&mut self.open, key, -1);
            bump(&mut self.open, new_key, 1);
        }
        match (closed, new_closed) {
            (false, true) => {
                self.peer_closed.insert(cookie);
            }
            (true, false) => {
                self.peer_closed.remove(&cookie);
            }
            _ => {}
        }
        self.get(cookie)
    }

    /// Gives a connection whose owner was unknown the one found for it.
    pub(crate) fn learn_owner(&mut self, cookie: u64, owner: Owner) {
        if self.get(cookie).is_some_and(|c| !c.info.owner.is_known()) {
            self.update(cookie, |c| c.info.owner = owner);
        }
    }

    /// The peer's FIN: the connection waits for its owner's close, its end
    /// counted. Returns it as it is now.
    pub(crate) fn peer_closed_at(&mut self, cookie: u64, ts_ns: u64) -> Option<&Conn> {
        self.update(cookie, |c| {
            c.peer_closed_ns = ts_ns;
            c.end_counted = true;
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether one more connection would evict the oldest.
    pub(crate) fn is_full(&self) -> bool {
        self.conns.len() >= self.cap
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub(crate) fn get(&self, cookie: u64) -> Option<&Conn> {
        self.conns.get(&cookie).map(|e| &e.conn)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values().map(|e| &e.conn)
    }

    /// Adds (or refreshes) a connection. A refresh keeps its place in the
    /// insertion order.
    pub(crate) fn insert(&mut self, conn: Conn) {
        let cookie = conn.info.cookie;
        self.count(&conn, 1);
        if let Some(e) = self.conns.get_mut(&cookie) {
            let old = std::mem::replace(&mut e.conn, conn);
            let closed = e.conn.peer_closed_ns != 0;
            self.count(&old, -1);
            // A refresh may have dropped the peer's close: count it anew.
            if closed {
                self.peer_closed.insert(cookie);
            }
            return;
        }
        let mut prev = None;
        if let Some(linked) = NonZeroU64::new(cookie) {
            prev = self.newest.replace(linked);
            match prev.and_then(|p| self.conns.get_mut(&p.get())) {
                Some(p) => p.next = Some(linked),
                None => self.oldest = Some(linked),
            }
        }
        self.conns.insert(
            cookie,
            Entry {
                conn,
                prev,
                next: None,
            },
        );
        while self.conns.len() > self.cap {
            match self.oldest.and_then(|old| self.remove(old.get())) {
                Some(_) => self.evicted += 1,
                None => break,
            }
        }
    }

    pub(crate) fn remove(&mut self, cookie: u64) -> Option<Conn> {
        let Entry { conn, prev, next } = self.conns.remove(&cookie)?;
        if cookie != 0 {
            match prev.and_then(|p| self.conns.get_mut(&p.get())) {
                Some(p) => p.next = next,
                None => self.oldest = next,
            }
            match next.and_then(|n| self.conns.get_mut(&n.get())) {
                Some(n) => n.prev = prev,
                None => self.newest = prev,
            }
        }
        self.count(&conn, -1);
        Some(conn)
    }

    /// Applies a keepalive option a process set on a tracked connection.
    pub(crate) fn apply_sockopt(&mut self, cookie: u64, o: &SockoptData) -> bool {
        self.update(cookie, |c| apply_sockopt(&mut c.ka, o, c.hz))
            .is_some()
    }
}

/// The gauge key of `c` (its direction from `ephemeral` where its owner is
/// unknown).
fn gauge_key(c: &Conn, ephemeral: &RangeInclusive<u16>) -> GaugeKey {
    let dir = direction(&c.info.owner, c.info.sock.sport, ephemeral);
    GaugeKey {
        owner: c.info.owner,
        dir,
        keepalive: c.ka.enabled != 0,
        remote: c.info.sock.remote().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        remote_port: match dir {
            Direction::Outbound => c.info.sock.dport,
            Direction::Inbound => 0,
        },
    }
}

/// Adds `by` to the count of `key`, dropping it at zero.
fn bump(open: &mut GaugeMap, key: GaugeKey, by: i64) {
    let n = open.entry(key).or_default();
    *n += by;
    if *n == 0 {
        open.remove(&key);
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
                ts_ns: cookie,
                ..EventInfo::default()
            },
            opened: true,
            ka: Keepalive::default(),
            hz: 250,
            peer_closed_ns: 0,
            end_counted: false,
        }
    }

    fn table(cap: usize) -> ConnTable {
        ConnTable::new(cap, 32768..=60999)
    }

    #[test]
    fn bounded_with_oldest_evicted_first() {
        let mut t = table(3);
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
        // Many inserts and removals: the order list stays the table's.
        for c in 100..10_000 {
            t.insert(conn(c));
            t.remove(c);
        }
        assert_eq!(
            (t.order(), t.evicted),
            (vec![5, 6], 3),
            "3 made room for 100"
        );
        // Removals in the middle and at both ends keep the order.
        t.insert(conn(7));
        t.remove(6);
        t.insert(conn(8));
        t.remove(5);
        t.remove(8);
        assert_eq!(t.order(), [7]);
        t.insert(conn(9));
        t.insert(conn(10));
        t.insert(conn(7)); // a refresh keeps its place
        assert_eq!(t.order(), [7, 9, 10]);
        t.insert(conn(11));
        assert_eq!(
            (t.order(), t.evicted),
            (vec![9, 10, 11], 4),
            "7 was the oldest"
        );
        // Cookie 0 (never a kernel's) stays out of the order, and its
        // removal leaves the list alone.
        t.insert(conn(0));
        assert_eq!((t.order(), t.evicted), (vec![10, 11], 5), "9 made room");
        t.remove(0);
        assert_eq!((t.order(), t.len()), (vec![10, 11], 2));
    }

    impl ConnTable {
        /// The cookies from the oldest to the newest, walked both ways.
        fn order(&self) -> Vec<u64> {
            let mut fwd = Vec::new();
            let mut at = self.oldest;
            while let Some(c) = at {
                fwd.push(c.get());
                at = self.conns[&c.get()].next;
            }
            let mut back = Vec::new();
            let mut at = self.newest;
            while let Some(c) = at {
                back.push(c.get());
                at = self.conns[&c.get()].prev;
            }
            back.reverse();
            assert_eq!(fwd, back, "the list both ways");
            let unlinked = usize::from(self.conns.contains_key(&0));
            assert_eq!(
                fwd.len() + unlinked,
                self.conns.len(),
                "every entry listed once"
            );
            fwd
        }
    }

    /// The gauge counts recounted from the connections themselves.
    fn recount(t: &ConnTable) -> HashMap<GaugeKey, i64> {
        let mut m = HashMap::new();
        for c in t.iter() {
            *m.entry(t.key(c)).or_default() += 1;
        }
        m
    }

    #[test]
    fn gauge_counts_follow_every_change_of_the_table() {
        let mut t = table(50);
        let set_ka = |value| SockoptData {
            level: sockopt::SOL_SOCKET,
            optname: sockopt::SO_KEEPALIVE,
            value,
            optlen: 4,
        };
        // A fixed pseudo-random walk: inserts (some refreshes), removals,
        // keepalive changes, peer closes, owners learnt, and evictions
        // once the table is full.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cookie = x % 80 + 1;
            match x % 6 {
                0 | 1 => {
                    let mut c = conn(cookie);
                    c.info.owner.pid = u32::try_from(x % 3).unwrap();
                    c.info.owner.flags = u32::try_from(x % 2).unwrap();
                    c.info.sock.family = tracer_common::AF_INET;
                    c.info.sock.daddr[..4].copy_from_slice(&[
                        10,
                        0,
                        0,
                        u8::try_from(x % 4).unwrap(),
                    ]);
                    c.info.sock.dport = u16::try_from(x % 5).unwrap();
                    c.info.sock.sport = if x.is_multiple_of(7) { 40000 } else { 80 };
                    c.peer_closed_ns = if x.is_multiple_of(9) { 5 } else { 0 };
                    t.insert(c);
                }
                2 => {
                    t.remove(cookie);
                }
                3 => {
                    t.apply_sockopt(cookie, &set_ka(i32::from(x.is_multiple_of(2))));
                }
                4 => {
                    t.peer_closed_at(cookie, step);
                }
                _ => {
                    let owner = Owner {
                        pid: 7,
                        flags: 1,
                        ..Owner::default()
                    };
                    t.learn_owner(cookie, owner);
                }
            }
            let counted: HashMap<GaugeKey, i64> = t.open_counts().map(|(k, n)| (*k, n)).collect();
            assert_eq!(counted, recount(&t), "step {step}");
            let mut waiting: Vec<u64> = t.peer_closed().map(|c| c.info.cookie).collect();
            let mut want: Vec<u64> = t
                .iter()
                .filter(|c| c.peer_closed_ns != 0)
                .map(|c| c.info.cookie)
                .collect();
            waiting.sort_unstable();
            want.sort_unstable();
            assert_eq!(waiting, want, "step {step}");
        }
        assert!(t.evicted > 0, "the walk filled the table");
        assert!(t.open_counts().count() > 4, "several label sets");
    }

    #[test]
    fn cookie_hashes_spread_sequential_cookies() {
        use std::hash::BuildHasher as _;
        let b = BuildHasherDefault::<CookieHasher>::default();
        let hashes: HashSet<u64> = (1..=10_000u64).map(|c| b.hash_one(c)).collect();
        assert_eq!(hashes.len(), 10_000);
        // hashbrown takes its control byte from the top 7 bits: they vary too.
        let tops: HashSet<u64> = (1..=1_000u64).map(|c| b.hash_one(c) >> 57).collect();
        assert!(tops.len() > 100, "{}", tops.len());
        // The bucket bits follow the cookie: neighbouring sockets, buckets
        // 3 apart (the table's memory walked in order).
        assert!((1..=1_000u64).all(|c| b.hash_one(c) & 0xffff == 3 * c));
    }

    #[test]
    fn refreshing_a_connection_does_not_duplicate_it() {
        let mut t = table(2);
        t.insert(conn(1));
        t.insert(conn(1));
        t.insert(conn(2));
        assert_eq!((t.len(), t.evicted), (2, 0));
    }

    #[test]
    fn keepalive_options_update_the_settings() {
        let mut t = table(4);
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
