//! Reconciliation of the table with the kernel's live sockets.

use std::collections::{HashMap, HashSet};

use tracer_common::{Owner, SnapshotData, owner_flags, tcp_state};

use super::{Tracker, chains::Leg, table::Conn};
use crate::{
    event::{ConnEvent, EventData, snapshot_connections},
    owner::procfs,
    sys,
};

/// What a resync changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reconciled {
    /// Table entries whose socket was gone.
    pub gone: usize,
    /// Live sockets left out because the table was full.
    pub not_added: usize,
}

impl Tracker {
    /// Reconciles the table with the kernel's sockets (a fresh snapshot of
    /// every namespace, taken starting at `started_ns`):
    /// - connections the table lacks (opened before the daemon, or dropped
    ///   from a full table) are added, with their owner found in /proc;
    /// - listeners' owners are remembered, so that connections they accept
    ///   get an owner even when the listener predates the daemon;
    /// - table entries whose socket is gone (a close the daemon missed, e.g.
    ///   a lost event) are removed, and so are their chains;
    /// - chains are rebuilt from the live sockets by the rules the open
    ///   events follow: after a daemon restart, every chain older than the
    ///   daemon is back once its pods are known.
    ///
    /// Returns how many were removed, and how many were not added because
    /// the table was full.
    pub(crate) fn resync(&mut self, snapshot: &[ConnEvent], started_ns: u64) -> Reconciled {
        let owners = self.proc_owners(snapshot);
        let owner_of = |ev: &ConnEvent, s: &SnapshotData| -> Owner {
            if ev.info.owner.is_known() {
                ev.info.owner
            } else {
                owners.get(&s.ino).copied().unwrap_or(ev.info.owner)
            }
        };
        self.learn_listeners(snapshot, owner_of);
        let mut alive = HashSet::new();
        // Established sockets no chain knows, for the chains to rebuild.
        let mut unchained = Vec::new();
        let mut skipped = 0usize;
        for (ev, s) in snapshot_connections(snapshot) {
            alive.insert(ev.info.cookie);
            // Those the daemon saw open went through the chains then.
            let seen_open = self.table.get(ev.info.cookie).is_some_and(|c| c.opened);
            if !seen_open
                && !self.chains.knows(ev.info.cookie)
                && ev.info.sock.state == tcp_state::ESTABLISHED
            {
                unchained.push((s.ino, ev.info.cookie));
            }
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
            self.chains.forget(*cookie);
        }
        if self.defer_chains {
            log::debug!(
                "resync: {} chain legs left for a resync once the pod and Service indexes load",
                unchained.len()
            );
        } else {
            self.rebuild_chains(unchained);
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
        Reconciled {
            gone: gone.len(),
            not_added: skipped,
        }
    }

    /// The owners /proc names for the snapshot's sockets whose owner
    /// neither the kernel nor the table knows, by inode (the snapshot's
    /// jiffies feed the HZ estimate on the way).
    fn proc_owners(&mut self, snapshot: &[ConnEvent]) -> HashMap<u64, Owner> {
        let mut wanted = HashSet::new();
        // What /proc said of a live socket is kept while it lives: its owner
        // (a listener or connection older than the daemon, which the kernel
        // never stored an owner for), or that a complete scan found no
        // process (an orphan lingering after its close, a process this
        // daemon cannot see). Each scan reads every descriptor of every
        // process: at 100k sockets, a third of a resync's CPU, for the same
        // few sockets at every resync.
        let mut seen = HashMap::new();
        for ev in snapshot {
            if let EventData::Snapshot(s) = ev.data {
                self.hz.observe(s.jiffies, ev.info.ts_ns);
                let known = ev.info.owner.is_known()
                    || self
                        .table
                        .get(ev.info.cookie)
                        .is_some_and(|c| c.info.owner.is_known());
                if !known && s.ino != 0 {
                    match self.proc_seen.get(&s.ino) {
                        Some(&owner) => {
                            seen.insert(s.ino, owner);
                        }
                        None => {
                            wanted.insert(s.ino);
                        }
                    }
                }
            }
        }
        let mount = sys::cgroup::cgroup2_mount().ok().flatten();
        let (mut owners, complete) =
            procfs::socket_owners(&wanted, mount.as_deref(), procfs::ScanBudget::default());
        for &ino in &wanted {
            match owners.get(&ino) {
                Some(&owner) => {
                    seen.insert(ino, Some(owner));
                }
                None if complete => {
                    seen.insert(ino, None);
                }
                None => {}
            }
        }
        owners.extend(seen.iter().filter_map(|(&ino, o)| Some((ino, (*o)?))));
        self.proc_seen = seen;
        owners
    }

    /// The listeners of the snapshot and their owners, which accepted
    /// sockets inherit.
    fn learn_listeners(
        &mut self,
        snapshot: &[ConnEvent],
        owner_of: impl Fn(&ConnEvent, &SnapshotData) -> Owner,
    ) {
        self.listener_owners.clear();
        for ev in snapshot {
            if let EventData::Snapshot(s) = ev.data
                && ev.info.sock.state == tcp_state::LISTEN
            {
                self.listener_owners
                    .insert((ev.info.netns, ev.info.sock.sport), owner_of(ev, &s));
            }
        }
    }

    /// What the snapshot's byte counts say of pools (see
    /// `chains::pools`). Apply the events that came before the snapshot's
    /// end first: an upstream leg whose open is still in the ring would
    /// look like none.
    pub(crate) fn pool_evidence(&mut self, snapshot: &[ConnEvent]) {
        let bytes: HashMap<u64, (u64, u64)> = snapshot_connections(snapshot)
            .map(|(ev, s)| (ev.info.cookie, (s.bytes_received, s.bytes_acked)))
            .collect();
        let now = snapshot.iter().map(|ev| ev.info.ts_ns).max().unwrap_or(0);
        self.chains
            .on_snapshot(&|c| bytes.get(&c).copied(), self.attr.services(), now);
    }

    /// Feeds the live sockets no chain knows, `(inode, cookie)`, to the
    /// chains in inode order: the order they were created in, which is the
    /// order their open events would have come in.
    fn rebuild_chains(&mut self, unchained: Vec<(u64, u64)>) {
        let mut legs: Vec<(u8, u64, Leg)> = unchained
            .into_iter()
            .filter_map(|(ino, cookie)| {
                let info = self.table.get(cookie)?.info;
                let leg = self.leg(&info)?;
                Some((self.chains.open_order(&leg), ino, leg))
            })
            .collect();
        // In the order the proxy opens them (inode numbers are handed out
        // in per-CPU batches: they do not say which socket came first).
        legs.sort_unstable_by_key(|(rank, ino, _)| (*rank, *ino));
        let chained_before = self.chains.len();
        for (_, _, leg) in legs {
            self.chains.on_open(leg, self.attr.services());
        }
        let rebuilt = self.chains.len().saturating_sub(chained_before);
        if rebuilt > 0 {
            log::debug!("resync: {rebuilt} chains rebuilt from the kernel's sockets");
        }
    }
}
