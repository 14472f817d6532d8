//! Reconciliation of the table with the kernel's live sockets.

use std::collections::HashSet;

use tracer_common::{Owner, SnapshotData, owner_flags, tcp_state};

use super::{Tracker, table::Conn};
use crate::{
    event::{ConnEvent, EventData, snapshot_connections},
    owner::procfs,
    sys,
};

impl Tracker {
    /// Reconciles the table with the kernel's sockets (a fresh snapshot of
    /// every namespace, taken starting at `started_ns`):
    /// - connections the table lacks (opened before the daemon, or dropped
    ///   from a full table) are added, with their owner found in /proc;
    /// - listeners' owners are remembered, so that connections they accept
    ///   get an owner even when the listener predates the daemon;
    /// - table entries whose socket is gone (a close the daemon missed, e.g.
    ///   a lost event) are removed.
    ///
    /// Returns how many were removed.
    pub(crate) fn resync(&mut self, snapshot: &[ConnEvent], started_ns: u64) -> usize {
        let mut wanted = HashSet::new();
        for ev in snapshot {
            if let EventData::Snapshot(s) = ev.data {
                self.hz.observe(s.jiffies, ev.info.ts_ns);
                let known = ev.info.owner.is_known()
                    || self
                        .table
                        .get(ev.info.cookie)
                        .is_some_and(|c| c.info.owner.is_known());
                if !known && s.ino != 0 {
                    wanted.insert(s.ino);
                }
            }
        }
        let mount = sys::cgroup::cgroup2_mount().ok().flatten();
        let owners =
            procfs::socket_owners(&wanted, mount.as_deref(), procfs::ScanBudget::default());
        let owner_of = |ev: &ConnEvent, s: &SnapshotData| -> Owner {
            if ev.info.owner.is_known() {
                ev.info.owner
            } else {
                owners.get(&s.ino).copied().unwrap_or(ev.info.owner)
            }
        };
        self.listener_owners.clear();
        for ev in snapshot {
            if let EventData::Snapshot(s) = ev.data
                && ev.info.sock.state == tcp_state::LISTEN
            {
                self.listener_owners
                    .insert((ev.info.netns, ev.info.sock.sport), owner_of(ev, &s));
            }
        }
        let mut alive = HashSet::new();
        let mut skipped = 0usize;
        for (ev, s) in snapshot_connections(snapshot) {
            alive.insert(ev.info.cookie);
            let mut owner = owner_of(ev, &s);
            if self
                .listener_owners
                .contains_key(&(ev.info.netns, ev.info.sock.sport))
            {
                owner.flags |= owner_flags::INHERITED;
            }
            if self.table.get(ev.info.cookie).is_some() {
                self.table.learn_owner(ev.info.cookie, owner);
                continue;
            }
            if self.table.is_full() {
                // A full table evicted connections to make room: adding
                // them back would evict others, at every resync.
                skipped += 1;
                continue;
            }
            let hz = self.hz.get().0;
            let mut info = ev.info;
            info.owner = owner;
            self.table.insert(Conn {
                info,
                opened: false,
                ka: s.ka,
                hz,
                // Found waiting for its owner's close: since when is not
                // known, so from now.
                peer_closed_ns: if ev.info.sock.state == tcp_state::CLOSE_WAIT {
                    ev.info.ts_ns
                } else {
                    0
                },
                end_counted: false,
            });
        }
        let gone: Vec<u64> = self
            .table
            .iter()
            .filter(|c| c.seen_ns() < started_ns && !alive.contains(&c.info.cookie))
            .map(|c| c.info.cookie)
            .collect();
        for cookie in &gone {
            self.table.remove(*cookie);
        }
        if !gone.is_empty() {
            log::debug!(
                "resync: {} connections were gone without a close event",
                gone.len()
            );
        }
        log::debug!(
            "resync: {} sockets, {} owners found in /proc, {} listeners, {skipped} not added \
             (table full)",
            snapshot.len(),
            owners.len(),
            self.listener_owners.len()
        );
        gone.len()
    }
}
