//! The caps that keep every open-ended label bounded.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Caps the distinct values of one label at `max`. A value keeps its place
/// while something uses it: an open connection (seen by the last walk of
/// the table, [`Self::end_walk`]) or an event (a kill, a stale reuse, a
/// connect failure) less than `hold` ago. A new value takes a free place
/// (one nothing uses); an event's value may also take the place of a value
/// only open connections use (their gauges fold into "other" instead), never
/// that of a value with a recent event. Values whose place was taken are
/// handed out by [`Self::take_evicted`]: their series must go, or the
/// series would grow without bound. Without a place, a value folds into
/// "other" and is counted. Values used only inbound (client addresses)
/// hold at most half the places: on an ingress node, clients' own idle
/// kills cannot take every place from the services the node's pods use.
#[derive(Debug)]
pub(crate) struct LabelCap {
    values: HashMap<String, Use>,
    max: usize,
    /// Values used only inbound, and the most of them.
    inbound: usize,
    max_inbound: usize,
    hold: Duration,
    /// A gauge found no free place during this walk: the rest of the walk
    /// folds at once instead of searching again.
    walk_full: bool,
    evicted: Vec<String>,
    /// Values folded into "other" so far.
    pub overflowed: u64,
}

/// What a value is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Need {
    /// A counter of something that happened (kills, stale reuses,
    /// connect failures): it must stay scrapeable for a while.
    Event,
    /// A gauge of open connections, rebuilt from the table at every scrape.
    Open,
}

#[derive(Debug, Default)]
struct Use {
    last_event: Option<Instant>,
    /// Seen open by the last complete walk of the table.
    open: bool,
    /// Seen open by the walk in progress.
    open_now: bool,
    /// Used only by inbound connections so far.
    inbound: bool,
}

impl Use {
    fn recent_event(&self, now: Instant, hold: Duration) -> bool {
        self.last_event
            .is_some_and(|at| now.saturating_duration_since(at) < hold)
    }

    fn is_open(&self) -> bool {
        self.open || self.open_now
    }

    fn mark(&mut self, need: Need, now: Instant) {
        match need {
            Need::Event => self.last_event = Some(now),
            Need::Open => self.open_now = true,
        }
    }
}

pub(crate) const OTHER: &str = "other";

impl LabelCap {
    /// A cap whose values are never freed by time (only by [`Self::forget`]
    /// or when nothing holds them).
    pub(crate) fn new(max: usize) -> Self {
        Self::with_hold(max, Duration::MAX)
    }

    pub(crate) fn with_hold(max: usize, hold: Duration) -> Self {
        Self {
            values: HashMap::new(),
            max,
            inbound: 0,
            max_inbound: (max / 2).max(1),
            hold,
            walk_full: false,
            evicted: Vec::new(),
            overflowed: 0,
        }
    }

    /// The value to use for `value`, needed for an event now.
    #[cfg(test)]
    pub(crate) fn admit(&mut self, value: String) -> String {
        self.admit_for(value, Need::Event, false, Instant::now())
    }

    /// The value to use for `value`, needed for `need` by an inbound
    /// connection or not, at `now`.
    pub(crate) fn admit_for(
        &mut self,
        value: String,
        need: Need,
        inbound: bool,
        now: Instant,
    ) -> String {
        if let Some(u) = self.values.get_mut(&value) {
            u.mark(need, now);
            if u.inbound && !inbound {
                u.inbound = false;
                self.inbound -= 1;
            }
            return value;
        }
        // An inbound value past the inbound share takes an inbound place.
        let among_inbound = inbound && self.inbound >= self.max_inbound;
        if among_inbound || self.values.len() >= self.max {
            let Some(victim) = self.victim(need, among_inbound, now) else {
                self.overflowed += 1;
                return OTHER.to_string();
            };
            if self.values.remove(&victim).is_some_and(|u| u.inbound) {
                self.inbound -= 1;
            }
            self.evicted.push(victim);
        }
        let mut u = Use {
            inbound,
            ..Use::default()
        };
        u.mark(need, now);
        self.inbound += usize::from(inbound);
        self.values.insert(value.clone(), u);
        value
    }

    /// A value whose place `need` may take: a free one (no open connection,
    /// no recent event), else for an event one that only open connections
    /// use (the oldest event first).
    /// `among_inbound`: only inbound values' places.
    fn victim(&mut self, need: Need, among_inbound: bool, now: Instant) -> Option<String> {
        if need == Need::Open && self.walk_full && !among_inbound {
            return None;
        }
        let hold = self.hold;
        let candidates = || {
            self.values
                .iter()
                .filter(move |(_, u)| !among_inbound || u.inbound)
        };
        let free = candidates().find(|(_, u)| !u.is_open() && !u.recent_event(now, hold));
        let found = match (free, need) {
            (Some((v, _)), _) => Some(v),
            (None, Need::Event) => candidates()
                .filter(|(_, u)| !u.recent_event(now, hold))
                .min_by_key(|(_, u)| u.last_event)
                .map(|(v, _)| v),
            (None, Need::Open) => None,
        };
        if found.is_none() && need == Need::Open && !among_inbound {
            self.walk_full = true;
        }
        found.cloned()
    }

    /// The end of a walk of the table: values it did not see open have no
    /// open connection any more.
    pub(crate) fn end_walk(&mut self) {
        for u in self.values.values_mut() {
            u.open = std::mem::take(&mut u.open_now);
        }
        self.walk_full = false;
    }

    /// Values whose place another value took since the last call.
    pub(crate) fn take_evicted(&mut self) -> Vec<String> {
        std::mem::take(&mut self.evicted)
    }

    /// Frees `value`'s place (a deleted pod's peer name): a later value can
    /// take it. Returns whether it was admitted.
    pub(crate) fn forget(&mut self, value: &str) -> bool {
        let Some(u) = self.values.remove(value) else {
            return false;
        };
        self.inbound -= usize::from(u.inbound);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_folds_new_values_into_other() {
        let mut cap = LabelCap::new(2);
        assert_eq!(cap.admit("a".into()), "a");
        assert_eq!(cap.admit("b".into()), "b");
        assert_eq!(cap.admit("c".into()), OTHER);
        assert_eq!(cap.admit("a".into()), "a", "known values keep passing");
        assert_eq!(cap.overflowed, 1);
        assert!(cap.take_evicted().is_empty());
    }

    /// An ingress node: client IPs with open connections fill the cap.
    fn flooded(hold: Duration, t0: Instant) -> LabelCap {
        let mut cap = LabelCap::with_hold(3, hold);
        for ip in ["c1", "c2", "c3", "c4"] {
            cap.admit_for(ip.into(), Need::Open, false, t0);
        }
        cap.end_walk();
        cap
    }

    #[test]
    fn open_gauges_never_take_the_place_of_a_recent_event_but_events_take_theirs() {
        let hold = Duration::from_mins(10);
        let t0 = Instant::now();
        let mut cap = flooded(hold, t0);
        assert_eq!(cap.overflowed, 1, "c4 folded");
        // The database kill takes a place only open connections held.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            cap.admit_for("db/mysql-0".into(), Need::Event, false, t1),
            "db/mysql-0"
        );
        assert_eq!(cap.take_evicted().len(), 1);
        // A walk: the clients are all still open; the kill keeps its place.
        for ip in ["c1", "c2", "c3", "c4"] {
            cap.admit_for(ip.into(), Need::Open, false, t1);
        }
        cap.end_walk();
        assert_eq!(
            cap.admit_for("db/mysql-0".into(), Need::Open, false, t1),
            "db/mysql-0"
        );
        // Events fill the cap: a later event folds rather than evict them.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            cap.admit_for("db/redis-0".into(), Need::Event, false, t2),
            "db/redis-0"
        );
        assert_eq!(
            cap.admit_for("db/pg-0".into(), Need::Event, false, t2),
            "db/pg-0"
        );
        assert_eq!(
            cap.admit_for("db/mongo-0".into(), Need::Event, false, t2),
            OTHER
        );
        assert_eq!(cap.admit_for("c1".into(), Need::Open, false, t2), OTHER);
        // After the hold, with no open connection, the oldest event's place
        // is free.
        cap.end_walk();
        cap.end_walk();
        let t3 = t1 + hold;
        assert_eq!(cap.admit_for("c9".into(), Need::Open, false, t3), "c9");
        assert_eq!(cap.take_evicted().len(), 3, "two clients, then mysql-0");
        assert!(!cap.values.contains_key("db/mysql-0"));
    }

    #[test]
    fn clients_own_kills_hold_at_most_half_the_places() {
        let t0 = Instant::now();
        let mut cap = LabelCap::with_hold(4, Duration::from_mins(10));
        // Clients end their idle connections (inbound kills by the peer).
        for ip in ["c1", "c2", "c3", "c4"] {
            cap.admit_for(ip.into(), Need::Event, true, t0);
        }
        assert_eq!(cap.inbound, 2, "c3 and c4 folded");
        assert_eq!(cap.overflowed, 2);
        // The database kills still have places.
        assert_eq!(cap.admit_for("db/a".into(), Need::Event, false, t0), "db/a");
        assert_eq!(cap.admit_for("db/b".into(), Need::Event, false, t0), "db/b");
        // A client seen outbound too counts as outbound from then on.
        assert_eq!(cap.admit_for("c1".into(), Need::Open, false, t0), "c1");
        assert_eq!(cap.inbound, 1);
        assert!(cap.forget("c2"));
        assert_eq!(cap.inbound, 0);
    }

    #[test]
    fn a_value_with_open_connections_and_old_events_is_kept_from_gauges() {
        let hold = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut cap = LabelCap::with_hold(1, hold);
        cap.admit_for("db".into(), Need::Event, false, t0);
        cap.admit_for("db".into(), Need::Open, false, t0);
        cap.end_walk();
        let later = t0 + Duration::from_mins(1);
        assert_eq!(
            cap.admit_for("client".into(), Need::Open, false, later),
            OTHER
        );
        // Its connection closed: the next walk does not see it.
        cap.end_walk();
        assert_eq!(
            cap.admit_for("client".into(), Need::Open, false, later),
            "client"
        );
        assert_eq!(cap.take_evicted(), ["db"]);
    }
}
