//! Types shared by the kernel programs (`tracer-ebpf`) and the userspace agent
//! (`tracer-user`). This crate is the only place where the layout of what
//! crosses the kernel/user boundary is written down.
//!
//! Every record is `#[repr(C)]` and free of implicit padding (explicit `pad`
//! fields instead), so that the bytes the kernel writes are fully initialised
//! and the userspace decoder can check sizes exactly.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

/// Length of `task_struct::comm` (TASK_COMM_LEN in the kernel).
pub const COMM_LEN: usize = 16;

/// `AF_INET` / `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// TCP states, numbered as in include/net/tcp_states.h.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
    pub const BOUND_INACTIVE: u8 = 13;
}

/// Event kinds, the `kind` field of [`EventInfo`]. Plain integers rather than
/// a Rust enum: the userspace decoder must survive values it does not know.
pub mod kind {
    /// A TCP state transition (`sock:inet_sock_set_state`). Data: [`super::StateChange`].
    pub const STATE: u16 = 1;
    /// The socket received a RST (`tcp:tcp_receive_reset`). Data: [`super::ResetData`].
    pub const RESET_RECEIVED: u16 = 2;
    /// The socket sent a RST (`tcp:tcp_send_reset`). Data: [`super::ResetData`].
    pub const RESET_SENT: u16 = 3;
    /// An error was reported on the socket (`sock:inet_sk_error_report`). Data: [`super::SockError`].
    pub const SOCK_ERROR: u16 = 4;
    /// A connection reached ESTABLISHED. Data: [`super::OpenData`].
    pub const OPEN: u16 = 5;
    /// A connection that was established ended (-> CLOSE), or a connect
    /// failed ([`super::close_flags::CONNECT_FAILED`]). Data: [`super::CloseData`].
    pub const CLOSE: u16 = 6;
    /// A process set a keepalive socket option. Data: [`super::SockoptData`].
    pub const SOCKOPT: u16 = 7;
    /// One socket as the TCP iterator sees it (not sent through the ring
    /// buffer: read from the iterator's file). Data: [`super::SnapshotData`].
    pub const SNAPSHOT: u16 = 8;
    /// The peer closed an established connection (ESTABLISHED -> CLOSE_WAIT):
    /// the end facts at that moment, as a [`super::CloseData`], so the kill
    /// is counted then, however long the owner keeps the socket.
    pub const END: u16 = 9;
    /// A process accepted a connection on a capture port (`accept()`,
    /// `accept4()` returning): the header's owner is the accepting thread,
    /// its addresses the accepted socket's (no connection id: the syscall
    /// tracepoint has no typed socket). Data: [`super::AcceptData`].
    pub const ACCEPT: u16 = 10;
    /// Number of slots in the per-kind loss counter; larger than the highest kind.
    pub const SLOTS: u32 = 16;
    /// Loss-counter slot (not an event kind): a socket whose state could
    /// not be stored (socket storage allocation failed, or the fallback
    /// state map was full), so its events carry no owner.
    pub const NO_STATE_SLOT: u32 = SLOTS - 1;
}

/// Bits of [`Owner::flags`].
pub mod owner_flags {
    /// The owner fields were captured in process context (connect or listen).
    pub const KNOWN: u32 = 1;
    /// The socket is (or was) a listener; its accepted children inherit it.
    pub const LISTENER: u32 = 1 << 1;
    /// The owner was inherited from the listening socket (an accepted, inbound connection).
    pub const INHERITED: u32 = 1 << 2;
    /// Userspace found the owner in /proc after the fact (the socket is
    /// older than the tracer): the process holding it now.
    pub const FROM_PROC: u32 = 1 << 3;
}

/// Bits of [`CloseData::flags`] (and of the per-socket state).
pub mod close_flags {
    /// The socket received a RST.
    pub const RST_RECEIVED: u8 = 1;
    /// The socket sent a RST.
    pub const RST_SENT: u8 = 1 << 1;
    /// Payload sent and still unacknowledged when the socket closed. A FIN
    /// is not payload: a socket that closed and whose FIN went unanswered
    /// does not have it.
    pub const UNACKED: u8 = 1 << 2;
    /// The tracer saw the socket leave ESTABLISHED (the `end_*` fields are set).
    pub const END_SEEN: u8 = 1 << 3;
    /// Payload written but not sent yet when the socket closed (e.g. the
    /// peer's window was closed).
    pub const UNSENT: u8 = 1 << 4;
    /// The connect failed: SYN_SENT -> CLOSE (refused, timed out, or an
    /// ICMP error); the summary carries the error.
    pub const CONNECT_FAILED: u8 = 1 << 5;
    /// An error report (`sock:inet_sk_error_report`, 5.14+) with no
    /// socket error, for a message queued on the socket's error queue:
    /// the ICMP error of an `IP_RECVERR` socket (`ip_icmp_error`). The
    /// owner may read the ICMP's errno (`SO_ERROR` takes `sk_err_soft`)
    /// and give up before the tracer sees any error on the socket.
    pub const ERROR_QUEUED: u8 = 1 << 6;
}

/// Bits of [`Keepalive::from_socket`]: which values the socket set itself
/// (the others come from its network namespace's sysctls).
pub mod ka_source {
    pub const TIME: u8 = 1;
    pub const INTVL: u8 = 1 << 1;
    pub const PROBES: u8 = 1 << 2;
}

/// Socket option levels and names the tracer watches (Linux UAPI).
pub mod sockopt {
    pub const SOL_IP: u32 = 0;
    pub const SOL_IPV6: u32 = 41;
    /// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (and IP6T_SO_ORIGINAL_DST at
    /// SOL_IPV6): where a connection redirected by iptables was going.
    pub const SO_ORIGINAL_DST: u32 = 80;
    pub const SOL_SOCKET: u32 = 1;
    pub const SO_KEEPALIVE: u32 = 9;
    pub const SOL_TCP: u32 = 6;
    pub const TCP_KEEPIDLE: u32 = 4;
    pub const TCP_KEEPINTVL: u32 = 5;
    pub const TCP_KEEPCNT: u32 = 6;
    pub const TCP_USER_TIMEOUT: u32 = 18;
}

/// Header of every event, socket identity and owner included: every event the
/// kernel sends is about one socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event fired.
    pub ts_ns: u64,
    /// The socket cookie (`bpf_get_socket_cookie`): stable for the socket's life.
    pub cookie: u64,
    /// One of [`kind`].
    pub kind: u16,
    /// Reserved, zero.
    pub pad: u16,
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    pub sock: SockAddrs,
    pub owner: Owner,
}

/// Addresses of a socket as the kernel holds them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockAddrs {
    /// Local address: 4 bytes (network order) for AF_INET, 16 for AF_INET6.
    pub saddr: [u8; 16],
    /// Remote address, as `saddr`.
    pub daddr: [u8; 16],
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// `skc_state` when the event fired (for a state change: the old state).
    pub state: u8,
    pub pad: u8,
}

/// Who owns a socket: captured in process context when the socket connects or
/// listens, kept in socket-local storage (freed with the socket), copied to
/// accepted sockets from their listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Process ID (kernel tgid).
    pub pid: u32,
    /// Thread ID (kernel pid).
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 ID (the inode number of the cgroup's directory).
    pub cgroup_id: u64,
    /// Thread name, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// [`owner_flags`] bits; 0 = unknown owner (socket older than the tracer).
    pub flags: u32,
    pub pad: u32,
}

/// Data of a [`kind::STATE`] event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateChange {
    pub old_state: u8,
    pub new_state: u8,
    pub pad: [u8; 6],
}

/// [`ResetData::reason`] when the kernel gives no reason (a received reset,
/// or a sent one on a kernel whose `tcp_send_reset` has no reason argument,
/// before 6.10).
pub const NO_RESET_REASON: u32 = u32::MAX;

/// Data of [`kind::RESET_RECEIVED`] and [`kind::RESET_SENT`] events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetData {
    /// For a sent reset, the kernel's `enum sk_rst_reason` value (names come
    /// from BTF in userspace); [`NO_RESET_REASON`] when there is none.
    pub reason: u32,
    pub pad: u32,
}

/// Data of a [`kind::SOCK_ERROR`] event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockError {
    /// Positive errno (`sk->sk_err`), e.g. 104 ECONNRESET, 110 ETIMEDOUT.
    pub errno: u32,
    pub pad: u32,
}

/// A socket's effective keepalive configuration, read from the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe, in jiffies (socket's or sysctl).
    pub time_j: u32,
    /// Interval between probes, in jiffies.
    pub intvl_j: u32,
    /// TCP_USER_TIMEOUT in milliseconds; 0 = not set.
    pub user_timeout_ms: u32,
    /// Unanswered probes before the connection is dropped.
    pub probes: u8,
    /// SO_KEEPALIVE is on.
    pub enabled: u8,
    /// [`ka_source`] bits.
    pub from_socket: u8,
    pub pad: u8,
}

/// Data of a [`kind::OPEN`] event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenData {
    pub ka: Keepalive,
    /// `jiffies_64` when the event fired; with `EventInfo::ts_ns` it lets
    /// userspace tell the kernel's HZ.
    pub jiffies: u64,
}

/// Data of a [`kind::CLOSE`] event: what userspace needs to classify the end
/// of a connection. `*_j` are 32-bit jiffies stamps as the kernel keeps them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseData {
    /// Keepalive as the socket had it at the end.
    pub ka: Keepalive,
    /// CLOCK_MONOTONIC when the socket became ESTABLISHED; 0 if before the tracer.
    pub established_ns: u64,
    /// CLOCK_MONOTONIC when the socket left ESTABLISHED (first FIN, RST or
    /// timeout); valid with [`close_flags::END_SEEN`].
    pub end_ns: u64,
    /// jiffies (low 32 bits) when it left ESTABLISHED.
    pub end_j: u32,
    /// Last payload sent / received (`lsndtime`, `icsk_ack.lrcvtime`) then.
    pub end_last_send_j: u32,
    pub end_last_recv_j: u32,
    /// The state the socket went to from ESTABLISHED (FIN_WAIT1 = we closed
    /// first, CLOSE_WAIT = the peer did, CLOSE = reset or timeout).
    pub first_close_state: u8,
    /// [`close_flags`] bits.
    pub flags: u8,
    /// Retransmissions of the head segment / unanswered probes at the end.
    pub retransmits: u8,
    pub probes_out: u8,
    /// `jiffies_64` at the final transition (pairs with `EventInfo::ts_ns`).
    pub jiffies: u64,
    /// Last payload sent / received, last ACK received, at the final transition.
    pub last_send_j: u32,
    pub last_recv_j: u32,
    pub last_ack_j: u32,
    /// `sk_err` at the final transition: ETIMEDOUT (or the soft error an
    /// ICMP left, for a timeout), ECONNRESET, EPIPE, ...; 0 for a clean end.
    pub errno: u32,
    /// When the last flight of data began (tcp clock, microseconds of
    /// CLOCK_MONOTONIC): the send that went unanswered, if one did.
    pub first_tx_us: u64,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// `sk_err_soft`: the last ICMP error (EHOSTUNREACH, ...) the
    /// connection survived, if any. The kernel reports a timeout after one
    /// as that error in `errno`.
    pub soft_errno: u32,
    /// The peer's receive window at the end (0: closed; a zero-window
    /// probe timeout).
    pub snd_wnd: u32,
    /// The peer's last burst of payload ([`SockState::pre_burst_ns`] ...):
    /// when the silence before it began and when it began (0: none seen),
    /// and `bytes_received` (low 32 bits) before it.
    pub pre_burst_ns: u64,
    pub burst_start_ns: u64,
    pub burst_base: u32,
    pub pad: u32,
}

/// Data of a [`kind::SNAPSHOT`] record: a live socket's keepalive settings,
/// activity and byte counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotData {
    pub ka: Keepalive,
    /// `jiffies_64` when read (pairs with `EventInfo::ts_ns`).
    pub jiffies: u64,
    pub last_send_j: u32,
    pub last_recv_j: u32,
    pub last_ack_j: u32,
    pub retransmits: u8,
    pub probes_out: u8,
    pub pad: u16,
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// The socket's inode number (0 when it has no file: orphaned).
    pub ino: u64,
}

/// Data of a [`kind::ACCEPT`] event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptData {
    /// The accepted socket's file descriptor in the accepting process.
    pub fd: u32,
    pub pad: u32,
}

/// Data of a [`kind::SOCKOPT`] event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockoptData {
    /// [`sockopt`] level and name.
    pub level: u32,
    pub optname: u32,
    /// The integer value being set (all watched options take an int).
    pub value: i32,
    pub optlen: u32,
}

/// What the kernel keeps per socket (socket-local storage, freed with the
/// socket; copied to accepted sockets from their listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub owner: Owner,
    /// The socket cookie, for programs without the cookie helper (sockopt).
    pub cookie: u64,
    pub established_ns: u64,
    pub end_ns: u64,
    pub end_j: u32,
    pub end_last_send_j: u32,
    pub end_last_recv_j: u32,
    pub first_close_state: u8,
    /// [`close_flags`] bits gathered so far.
    pub flags: u8,
    pub pad: u16,
    /// The socket's network namespace inode (for programs that cannot read it).
    pub netns: u32,
    /// The last error the kernel reported on the socket
    /// (`sock:inet_sk_error_report`, 5.14+): the owner's `connect()` or
    /// `SO_ERROR` may consume `sk_err` before the final transition reads it.
    pub reported_err: u32,
    /// Received payload, as the `tcp:tcp_probe` program follows it (one
    /// step per incoming segment, before the kernel processes it), for the
    /// peer's final burst (a goodbye message right before its FIN):
    /// `icsk_ack.lrcvtime` as last seen, and the low 32 bits of
    /// `bytes_received` at the last step.
    pub rx_seen_j: u32,
    pub rx_bytes_seen: u32,
    /// `bytes_received` (low 32 bits) before the current burst's first byte.
    pub burst_base: u32,
    pub pad2: u32,
    /// CLOCK_MONOTONIC of the last step (the segment it saw is processed
    /// right after it: an arrival time).
    pub step_ns: u64,
    /// When the last payload arrived (ESTABLISHED until any did).
    pub rx_ns: u64,
    /// The current burst: payload after a silence of at least
    /// [`BURST_GAP_NS`] began arriving at `burst_start_ns`; the payload
    /// before that silence arrived at `pre_burst_ns`. 0: no burst yet.
    pub pre_burst_ns: u64,
    pub burst_start_ns: u64,
}

/// A silence of at least this long between two payload arrivals starts a
/// new burst (see [`SockState::burst_start_ns`]): longer than the gaps
/// inside one goodbye (a message, then a TLS close_notify), shorter than
/// any idle timeout worth a kill.
pub const BURST_GAP_NS: u64 = 1_000_000_000;

/// One event as it sits in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event<T> {
    pub info: EventInfo,
    pub data: T,
}

/// Byte offsets of the kernel struct fields the programs read, resolved from
/// the running kernel's BTF by userspace and handed over as a load-time
/// global. Nothing here is ever hard-coded from one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Non-zero once userspace filled the offsets in; the programs do nothing
    /// until then.
    pub ready: u32,
    // struct sock_common (at offset 0 of struct sock)
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `skc_net`: a `possible_net_t` whose first member is `struct net *net`.
    pub skc_net: u32,
    // struct sock
    pub sk_protocol: u32,
    pub sk_err: u32,
    /// Offset of `ns.inum` inside `struct net`.
    pub net_ns_inum: u32,
    /// `inet_sock.inet_sport` (network order): the local port, which stays
    /// set after the kernel zeroes `skc_num` when the socket closes.
    pub inet_sport: u32,
    /// `skc_flags` (unsigned long) and the bit of SOCK_KEEPOPEN in it.
    pub skc_flags: u32,
    pub sock_keepopen_bit: u32,
    pub sk_err_soft: u32,
    /// `sk_error_queue.qlen`: messages queued for `MSG_ERRQUEUE` (ICMP
    /// errors of an `IP_RECVERR` socket).
    pub sk_error_queue_len: u32,
    // struct tcp_sock (inet_connection_sock fields included)
    pub tp_bytes_received: u32,
    pub tp_bytes_acked: u32,
    pub tp_lsndtime: u32,
    pub tp_rcv_tstamp: u32,
    pub tp_snd_una: u32,
    pub tp_snd_nxt: u32,
    /// `write_seq`: the end of what the owner wrote (FIN included once queued).
    pub tp_write_seq: u32,
    pub tp_snd_wnd: u32,
    pub tp_first_tx_mstamp: u32,
    pub tp_keepalive_time: u32,
    pub tp_keepalive_intvl: u32,
    pub tp_keepalive_probes: u32,
    pub icsk_lrcvtime: u32,
    pub icsk_user_timeout: u32,
    pub icsk_probes_out: u32,
    pub icsk_retransmits: u32,
    // struct sk_buff: a received segment's length, TCP header included
    // (as `tcp:tcp_probe` sees it, before the header is pulled).
    pub skb_len: u32,
    /// `tcp_sock.tcp_header_len`: the TCP header of this connection's
    /// segments, options included.
    pub tp_tcp_header_len: u32,
    // struct net: this namespace's keepalive sysctls
    pub net_keepalive_time: u32,
    pub net_keepalive_intvl: u32,
    pub net_keepalive_probes: u32,
    // sock -> socket -> file -> inode: the socket's inode number, as
    // /proc/<pid>/fd shows it (`socket:[N]`), to find owners in /proc.
    pub sk_socket: u32,
    pub socket_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    // task -> files -> fdtable -> file -> socket -> sock: the socket a file
    // descriptor of the current task holds (the accept program).
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
}

/// Where the kernel programs keep per-socket state ([`TracerConfig::state_store`]).
pub mod state_store {
    /// `BPF_MAP_TYPE_SK_STORAGE`: freed with the socket, copied to accepted
    /// sockets from their listener. Tracing programs may use it from 5.11.
    pub const SK_STORAGE: u32 = 0;
    /// A hash map keyed by the socket's address, entries removed when the
    /// socket reaches CLOSE; accepted sockets take the owner their listener
    /// registered by (netns, port). For kernels before 5.11.
    pub const HASH: u32 = 1;
}

/// [`TracerConfig::reset_reason_arg`] when `tcp_send_reset` has no reason.
pub const NO_ARG: u32 = u32::MAX;
/// Where `tcp_send_reset` has its `enum sk_rst_reason` (6.10+): the only
/// position the program reads it from.
pub const RESET_REASON_ARG: u32 = 2;

/// Load-time switches (the `CONFIG` global): the mode, and the shape of the
/// running kernel as userspace read it from BTF and probes. The programs
/// branch on these constants; the verifier drops the branches a kernel
/// cannot take (the global lives in a frozen read-only map), so a helper
/// or tracepoint argument a kernel lacks is never seen by its verifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracerConfig {
    /// Non-zero: also send every state change, reset and socket error
    /// (`trace`). Zero: only opens, closes and socket options (the daemon).
    pub verbose: u32,
    /// One of [`state_store`].
    pub state_store: u32,
    /// Non-zero: `bpf_get_socket_cookie` works in tracing programs (5.12+).
    /// Zero: connection ids are the socket's address mixed with [`Self::id_secret`].
    pub cookie_helper: u32,
    /// Index of the `enum sk_rst_reason` argument of `tcp_send_reset`
    /// (BTF tracepoint arguments, from 0), or [`NO_ARG`].
    pub reset_reason_arg: u32,
    /// Random per load: connection ids made from socket addresses (see
    /// [`Self::cookie_helper`]) do not show kernel addresses.
    pub id_secret: u64,
    /// Non-zero: the setsockopt program may ask for the calling task's pid
    /// and name (5.11+; before, cgroup programs get only uid and cgroup).
    pub sockopt_task: u32,
    /// The mesh's capture ports: only accepts on these are reported
    /// ([`kind::ACCEPT`]); 0: none.
    pub outbound_capture_port: u16,
    pub inbound_capture_port: u16,
    /// 0: every record wakes a reader that has caught up (the kernel's
    /// default; `trace`, `selftest`). Otherwise records are submitted
    /// without a wake-up (the daemon drains the ring on a timer) except
    /// those that bring the unread data across a multiple of this many
    /// bytes: a power of two (the programs compare bits, not quotients).
    pub wake_bytes: u32,
    pub pad: u32,
}

/// The connection id of the socket at kernel address `addr` where the
/// cookie helper is missing ([`TracerConfig::cookie_helper`]). Bit 63 set:
/// such ids never collide with real cookies, which count up from 1.
#[inline]
pub const fn derived_id(addr: u64, secret: u64) -> u64 {
    (addr ^ secret) | (1 << 63)
}

/// Key of the listener-owner map (kernels without socket storage in
/// tracing programs): a listening socket's namespace and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub pad: u16,
}

/// Value of the listener-owner map: the owner its accepted sockets take,
/// and the listener's address (only that listener removes the entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenOwner {
    pub owner: Owner,
    pub addr: u64,
}

/// Name of the global that holds [`KernelOffsets`] in the eBPF object.
pub const OFFSETS_GLOBAL: &str = "OFFSETS";
/// Name of the global that holds [`TracerConfig`].
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Names of the maps in the eBPF object.
pub const EVENTS_MAP: &str = "EVENTS";
pub const LOST_MAP: &str = "LOST";
/// The fallback per-socket state map and the listener-owner map
/// ([`state_store::HASH`]); userspace sizes them at load (1 entry when unused).
pub const STATE_HASH_MAP: &str = "SOCK_STATES";
pub const LISTENERS_MAP: &str = "LISTENERS";
/// Default size of [`STATE_HASH_MAP`] where it is used: sockets tracked at once.
pub const DEFAULT_STATE_HASH_ENTRIES: u32 = 1 << 17;
/// Default ring buffer size in bytes (power of two, multiple of the page size).
pub const DEFAULT_RING_BYTES: u32 = 1 << 22;

// Padding-free layouts: the sizes below are the sums of the fields.
const _: () = assert!(size_of::<SockAddrs>() == 40);
const _: () = assert!(size_of::<Owner>() == 48);
const _: () = assert!(size_of::<EventInfo>() == 24 + 40 + 48);
const _: () = assert!(size_of::<StateChange>() == 8);
const _: () = assert!(size_of::<ResetData>() == 8);
const _: () = assert!(size_of::<SockError>() == 8);
const _: () = assert!(size_of::<Event<StateChange>>() == 120);
const _: () = assert!(size_of::<KernelOffsets>() == 49 * 4);
const _: () = assert!(size_of::<AcceptData>() == 8);
const _: () = assert!(size_of::<Keepalive>() == 16);
const _: () = assert!(size_of::<OpenData>() == 24);
const _: () = assert!(size_of::<CloseData>() == 128);
const _: () = assert!(size_of::<SockoptData>() == 16);
const _: () = assert!(size_of::<SnapshotData>() == 64);
const _: () = assert!(size_of::<SockState>() == 48 + 96);
const _: () = assert!(size_of::<TracerConfig>() == 40);
const _: () = assert!(size_of::<ListenKey>() == 8);
const _: () = assert!(size_of::<ListenOwner>() == 56);

/// Userspace helpers on the shared types (kunai's `TaskInfo::comm_str`
/// habit): what every reader of an event asks of its addresses and owner.
#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::string::String;

    use super::{AF_INET, AF_INET6, Owner, SockAddrs, owner_flags};

    impl SockAddrs {
        /// The local address; `None` for a family other than IPv4 or IPv6.
        pub fn local(&self) -> Option<IpAddr> {
            addr(self.family, &self.saddr)
        }

        /// The remote address, as [`Self::local`].
        pub fn remote(&self) -> Option<IpAddr> {
            addr(self.family, &self.daddr)
        }

        /// `ipv4`, `ipv6` or `other`.
        pub fn family_name(&self) -> &'static str {
            match self.family {
                AF_INET => "ipv4",
                AF_INET6 => "ipv6",
                _ => "other",
            }
        }
    }

    fn addr(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
            _ => None,
        }
    }

    impl Owner {
        /// Captured in process context, inherited, or found in /proc.
        pub fn is_known(&self) -> bool {
            self.flags & owner_flags::KNOWN != 0
        }

        /// Taken from the listener that accepted the socket (inbound).
        pub fn is_inherited(&self) -> bool {
            self.flags & owner_flags::INHERITED != 0
        }

        /// How the owner is known: `unknown`, `inherited`, `proc` (the socket
        /// is older than the tracer; the process holding it, found in /proc)
        /// or `known`.
        pub fn kind(&self) -> &'static str {
            if !self.is_known() {
                "unknown"
            } else if self.is_inherited() {
                "inherited"
            } else if self.flags & owner_flags::FROM_PROC != 0 {
                "proc"
            } else {
                "known"
            }
        }

        /// The thread name.
        pub fn comm_str(&self) -> String {
            comm_str(&self.comm)
        }
    }

    /// `comm` up to its first NUL, lossily as UTF-8.
    pub fn comm_str(comm: &[u8]) -> String {
        let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        String::from_utf8_lossy(&comm[..end]).into_owned()
    }
}

#[cfg(feature = "user")]
pub use user::comm_str;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), padding-free, and valid for any bit pattern.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::TracerConfig {}
}
