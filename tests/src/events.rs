//! Reading `trace --json` events: fields, sockets, transitions, owners.

use std::{collections::BTreeSet, fmt::Write as _};

use serde_json::Value;

/// Events whose `netns` is `inode`.
pub fn in_netns(events: &[Value], inode: u64) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["netns"].as_u64() == Some(inode))
        .cloned()
        .collect()
}

/// The string field `key` of `ev`; panics, showing the event, if absent.
#[track_caller]
pub fn str_field<'a>(ev: &'a Value, key: &str) -> &'a str {
    ev[key]
        .as_str()
        .unwrap_or_else(|| panic!("event without string field `{key}`: {ev}"))
}

/// The unsigned integer field `key` of `ev`; panics, showing the event, if absent.
#[track_caller]
pub fn u64_field(ev: &Value, key: &str) -> u64 {
    ev[key]
        .as_u64()
        .unwrap_or_else(|| panic!("event without unsigned field `{key}`: {ev}"))
}

pub fn kind(ev: &Value) -> &str {
    str_field(ev, "kind")
}

pub fn cookie(ev: &Value) -> u64 {
    u64_field(ev, "cookie")
}

/// Distinct cookies among `events`.
pub fn cookies(events: &[Value]) -> BTreeSet<u64> {
    events.iter().map(cookie).collect()
}

/// The one cookie of the events matching `pred`, `None` if none match;
/// panics if several sockets match.
#[track_caller]
pub fn find_cookie(events: &[Value], pred: impl Fn(&Value) -> bool) -> Option<u64> {
    let found: BTreeSet<u64> = events.iter().filter(|e| pred(e)).map(cookie).collect();
    assert!(
        found.len() <= 1,
        "several sockets ({found:?}) match where one was expected:\n{}",
        dump(events)
    );
    found.into_iter().next()
}

/// The events of socket `cookie`, ordered by `ts_ns` (stable for ties).
pub fn socket_events(events: &[Value], cookie_: u64) -> Vec<Value> {
    let mut mine: Vec<Value> = events
        .iter()
        .filter(|e| cookie(e) == cookie_)
        .cloned()
        .collect();
    mine.sort_by_key(|e| u64_field(e, "ts_ns"));
    mine
}

/// The `(old_state, new_state)` pairs of the `state` events among `events`.
pub fn transitions(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| kind(e) == "state")
        .map(|e| {
            (
                str_field(e, "old_state").to_owned(),
                str_field(e, "new_state").to_owned(),
            )
        })
        .collect()
}

/// `pairs` as owned strings, to compare with [`transitions`].
pub fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// True when the socket has a `state` event into CLOSE.
pub fn has_closed(events: &[Value], cookie_: u64) -> bool {
    events
        .iter()
        .any(|e| cookie(e) == cookie_ && kind(e) == "state" && e["new_state"] == "CLOSE")
}

/// One JSON event per line, for failure messages.
pub fn dump(events: &[Value]) -> String {
    events.iter().fold(String::new(), |mut s, e| {
        let _ = writeln!(s, "  {e}");
        s
    })
}

/// The process that must be reported as a socket's owner.
#[derive(Clone, Debug)]
pub struct ExpectedOwner {
    /// `known` or `inherited`.
    pub owner: &'static str,
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
}

impl ExpectedOwner {
    /// A single-threaded process run by this (test) user, in cgroup `cgroup_id`.
    pub fn process(owner: &'static str, pid: u32, comm: &str, cgroup_id: u64) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self {
            owner,
            pid,
            comm: comm.to_owned(),
            uid,
            gid,
            cgroup_id,
        }
    }
}

/// Asserts that every event of `events` names `exp` as its owner; the
/// owner's only thread made the call, so `tid` is `pid`.
#[track_caller]
pub fn assert_owner(events: &[Value], exp: &ExpectedOwner, label: &str) {
    for ev in events {
        let got = (
            str_field(ev, "owner"),
            u64_field(ev, "pid"),
            u64_field(ev, "tid"),
            str_field(ev, "comm"),
            u64_field(ev, "uid"),
            u64_field(ev, "gid"),
            u64_field(ev, "cgroup_id"),
        );
        let want = (
            exp.owner,
            u64::from(exp.pid),
            u64::from(exp.pid),
            exp.comm.as_str(),
            u64::from(exp.uid),
            u64::from(exp.gid),
            exp.cgroup_id,
        );
        assert_eq!(
            got,
            want,
            "{label}: (owner, pid, tid, comm, uid, gid, cgroup_id) of event {ev}\nall events of the socket:\n{}",
            dump(events)
        );
    }
}
