//! Synthetic kernel records, laid out exactly as the kernel programs write
//! them, for the unit tests and the pipeline benchmark (one set of builders
//! for both). Not part of the agent: nothing outside tests and benches uses
//! it.

pub mod mesh;

use tracer_common::{
    AF_INET, CloseData, Event, EventInfo, Keepalive, OpenData, Owner, SnapshotData, SockAddrs,
    close_flags, kind, owner_flags, tcp_state,
};

/// The kernel's HZ in these records.
pub const HZ: u64 = 250;
/// Monotonic time of the first event (an uptime of 1000 s).
pub const T0_NS: u64 = 1_000_000_000_000;
/// The network namespace of every record.
pub const NETNS: u32 = 4_026_531_833;

/// The bytes of a record, as they sit in the ring buffer.
pub fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a padding-free repr(C) type (asserted in tracer-common);
    // every byte is initialised.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

/// `jiffies_64` at monotonic time `ns` (the kernel starts it 300 s before
/// the 32-bit wrap).
pub fn jiffies64(ns: u64) -> u64 {
    (1u64 << 32).wrapping_sub(300 * HZ) + ns / (1_000_000_000 / HZ)
}

/// The header of a record of one side of a loopback connection between
/// port `port` (the client, pid 4242) and 8080 (the server, pid 4343): the
/// client's socket is outbound, the server's accepted one inbound (its
/// owner inherited from the listener). Cookie 0: the caller sets it.
pub fn info(ts_ns: u64, event_kind: u16, outbound: bool, port: u16) -> EventInfo {
    let lo = [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut comm = [0; 16];
    comm[..6].copy_from_slice(if outbound { b"client" } else { b"server" });
    EventInfo {
        ts_ns,
        cookie: 0,
        kind: event_kind,
        pad: 0,
        netns: NETNS,
        sock: SockAddrs {
            saddr: lo,
            daddr: lo,
            sport: if outbound { port } else { 8080 },
            dport: if outbound { 8080 } else { port },
            family: AF_INET,
            state: tcp_state::ESTABLISHED,
            pad: 0,
        },
        owner: Owner {
            pid: if outbound { 4242 } else { 4343 },
            tid: 4242,
            uid: 1000,
            gid: 1000,
            cgroup_id: 0,
            comm,
            flags: owner_flags::KNOWN | if outbound { 0 } else { owner_flags::INHERITED },
            pad: 0,
        },
    }
}

/// The sysctl defaults: keepalive off, 7200 s, 75 s, 9 probes.
pub fn keepalive() -> Keepalive {
    Keepalive {
        time_j: 7200 * HZ as u32,
        intvl_j: 75 * HZ as u32,
        user_timeout_ms: 0,
        probes: 9,
        enabled: 0,
        from_socket: 0,
        pad: 0,
    }
}

/// The OPEN record of one side (see [`info`]) at `open_ns`.
pub fn open(open_ns: u64, outbound: bool, port: u16) -> Event<OpenData> {
    Event {
        info: info(open_ns, kind::OPEN, outbound, port),
        data: OpenData {
            ka: keepalive(),
            jiffies: jiffies64(open_ns),
        },
    }
}

/// The CLOSE record of one side (see [`info`]) at `close_ns`. An idle kill:
/// the server closed a client that had been silent for 90 s; otherwise the
/// client closes right after its request.
pub fn close(close_ns: u64, outbound: bool, port: u16, idle_kill: bool) -> Event<CloseData> {
    let end_j = jiffies64(close_ns) as u32;
    let silent_j = if idle_kill { 90 * HZ as u32 } else { 0 };
    let first_close_state = if idle_kill == outbound {
        tcp_state::CLOSE_WAIT
    } else {
        tcp_state::FIN_WAIT1
    };
    Event {
        info: info(close_ns, kind::CLOSE, outbound, port),
        data: CloseData {
            ka: keepalive(),
            established_ns: close_ns.saturating_sub(100_000_000_000),
            end_ns: close_ns,
            end_j,
            end_last_send_j: end_j - silent_j,
            end_last_recv_j: end_j - silent_j,
            first_close_state,
            flags: close_flags::END_SEEN,
            retransmits: 0,
            probes_out: 0,
            jiffies: jiffies64(close_ns),
            last_send_j: end_j - silent_j,
            last_recv_j: end_j - silent_j,
            last_ack_j: end_j,
            errno: 0,
            first_tx_us: 0,
            bytes_received: 8,
            bytes_acked: 9,
            soft_errno: 0,
            snd_wnd: 65_535,
            ..CloseData::default()
        },
    }
}

/// A client socket's header as the decoder tests use it: cookie 42, pid
/// 100 (`client`), 127.0.0.1:40000 -> 127.0.0.2:8080, in SYN_SENT.
pub fn client_info(kind: u16) -> EventInfo {
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

/// The SNAPSHOT record of one side (see [`info`]) at `ts_ns`, as the TCP
/// iterator reads it: established, socket inode 0 (the owner is what the
/// record says; no /proc lookup).
pub fn snapshot(ts_ns: u64, outbound: bool, port: u16) -> Event<SnapshotData> {
    let j = jiffies64(ts_ns);
    Event {
        info: info(ts_ns, kind::SNAPSHOT, outbound, port),
        data: SnapshotData {
            ka: keepalive(),
            jiffies: j,
            last_send_j: j as u32,
            last_recv_j: j as u32,
            last_ack_j: j as u32,
            retransmits: 0,
            probes_out: 0,
            pad: 0,
            bytes_received: 8,
            bytes_acked: 9,
            ino: 0,
        },
    }
}

/// A record as the daemon gets it: its bytes, decoded.
#[cfg(test)]
pub(crate) fn decoded<T: Copy>(record: &Event<T>) -> crate::event::ConnEvent {
    crate::event::decode(&bytes_of(record)).expect("a kernel-exact record decodes")
}

/// A directory tree under the temp dir, removed on drop.
pub struct TempTree(pub(crate) std::path::PathBuf);

impl TempTree {
    /// # Panics
    /// When the temp dir cannot be written.
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let root = std::env::temp_dir().join(format!(
            "conn-tracer-podid-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&root).unwrap();
        Self(root)
    }

    /// Makes `rel` (and its parents); returns its inode number.
    pub(crate) fn mkdir(&self, rel: &str) -> u64 {
        let p = self.0.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&p).unwrap();
        self.ino(rel)
    }

    pub(crate) fn ino(&self, rel: &str) -> u64 {
        std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(self.0.join(rel.trim_start_matches('/'))).unwrap(),
        )
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
