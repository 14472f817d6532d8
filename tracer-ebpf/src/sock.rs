//! Reading a `struct sock` at offsets resolved from the running kernel's BTF
//! (handed in by userspace as the [`OFFSETS`] global), and filling in the
//! common event header.

use core::{ffi::c_void, mem::MaybeUninit, ptr};

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_probe_read_kernel},
};
use tracer_common::{
    AF_INET, AF_INET6, EventInfo, Keepalive, KernelOffsets, Owner, SockState, TracerConfig,
    derived_id, ka_source, owner_flags, state_store, tcp_state,
};

/// Set by userspace with `EbpfLoader::override_global` before load.
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = {
    // SAFETY: all-zero is a valid KernelOffsets (plain integers), meaning "not ready".
    unsafe { core::mem::zeroed() }
};

/// Set by userspace before load: the mode and the running kernel's shape.
#[unsafe(no_mangle)]
pub static CONFIG: TracerConfig = TracerConfig {
    verbose: 0,
    state_store: 0,
    cookie_helper: 0,
    reset_reason_arg: 0,
    id_secret: 0,
    sockopt_task: 0,
    outbound_capture_port: 0,
    inbound_capture_port: 0,
    wake_bytes: 0,
    pad: 0,
};

/// One field of [`CONFIG`], read as [`off!`] reads [`OFFSETS`]: the
/// verifier sees a constant and prunes the branches this kernel cannot take.
macro_rules! config {
    ($field:ident) => {
        // SAFETY: reads one field of the CONFIG global.
        unsafe { core::ptr::read_volatile(&raw const $crate::sock::CONFIG.$field) }
    };
}
pub(crate) use config;

/// One field of [`OFFSETS`]. Read field by field and volatile: the compiler
/// must not fold the zero initialiser that userspace replaces at load time,
/// and the verifier then sees each value as a constant (the global lives in
/// a frozen read-only map), which [`Btf`] loads need.
macro_rules! off {
    ($field:ident) => {
        $crate::sock::offset(&raw const $crate::sock::OFFSETS.$field)
    };
}
pub(crate) use off;

/// The value of one [`OFFSETS`] field (see [`off!`]).
#[inline(always)]
pub fn offset(field: *const u32) -> u32 {
    // SAFETY: `field` points into the OFFSETS global (only `off!` calls this).
    unsafe { ptr::read_volatile(field) }
}

/// Whether userspace filled [`OFFSETS`] in; the programs do nothing before.
/// Userspace also loads them unready on purpose (`CONN_TRACER_DISARMED=1`):
/// attached, they then cost what the hooks themselves cost, the benchmark's
/// floor.
#[inline(always)]
pub fn ready() -> bool {
    off!(ready) != 0
}

/// A program's body, once userspace filled [`OFFSETS`] in (before, the
/// programs do nothing). A body returns `Err(())` where it stops early;
/// tracing programs' return values are ignored by the kernel, so every
/// entry point returns 0 whatever the body did.
#[inline(always)]
pub fn run<C>(ctx: &C, body: impl FnOnce(&C) -> Result<(), ()>) {
    if ready() {
        let _ = body(ctx);
    }
}

/// Whether every state change, reset and error goes to userspace (`trace`).
#[inline(always)]
pub fn verbose() -> bool {
    config!(verbose) != 0
}

/// Whether per-socket state lives in the fallback hash map (kernels
/// without socket storage in tracing programs, before 5.11).
#[inline(always)]
pub fn state_in_hash() -> bool {
    config!(state_store) == state_store::HASH
}

/// Whether `bpf_get_socket_cookie` works in tracing programs (5.12+).
#[inline(always)]
pub fn cookie_helper() -> bool {
    config!(cookie_helper) != 0
}

/// Whether the programs need a socket's address as a number (the fallback
/// state map's key, and the connection id without the cookie helper).
#[inline(always)]
pub fn needs_addr() -> bool {
    state_in_hash() || !cookie_helper()
}

/// The socket pointer stored at `slot` (a program context's argument) as a
/// plain number. Read through a helper so the verifier sees a scalar, not a
/// pointer it would refuse as a map key on older kernels. Zero when the
/// kernel needs no address ([`needs_addr`]).
#[inline(always)]
pub fn addr_at(slot: *const c_void) -> u64 {
    if needs_addr() { read(slot, 0) } else { 0 }
}

/// The connection id of a socket: its stored id, else the kernel's cookie,
/// else (kernels before 5.12) one made from its address.
#[inline(always)]
pub fn conn_id(sk: *const c_void, addr: u64, state: *const SockState) -> u64 {
    // SAFETY: `state` is NULL or this socket's storage.
    match unsafe { state.as_ref() } {
        Some(st) if st.cookie != 0 => st.cookie,
        _ if cookie_helper() => {
            // SAFETY: `sk` is a socket pointer the verifier knows.
            unsafe { bpf_get_socket_cookie(sk.cast_mut()) }
        }
        _ => derived_id(addr, config!(id_secret)),
    }
}

/// How a program reads kernel memory at `base + off`.
pub trait Kmem {
    /// Reads a `T`; zero when the memory cannot be read.
    fn get<T: Copy + Default>(base: *const c_void, off: u32) -> T;

    /// Copies `len` bytes (a multiple of 4, at most 16) into `dst`.
    #[inline(always)]
    fn copy(dst: *mut u8, len: u32, base: *const c_void, off: u32) {
        let mut i = 0;
        while i < len && i < 16 {
            let word: u32 = Self::get(base, off + i);
            // SAFETY: `dst` points at `len` writable bytes.
            unsafe { dst.add(i as usize).cast::<u32>().write_unaligned(word) };
            i += 4;
        }
    }
}

/// `bpf_probe_read_kernel`: any kernel address, one helper call (with its
/// fault handling) per read. For the programs off the hot path, and for
/// pointers whose BTF type does not cover the fields (`sock_common` of the
/// iterator, request and time-wait sockets in the reset hooks).
pub struct Probe;

impl Kmem for Probe {
    #[inline(always)]
    fn get<T: Copy + Default>(base: *const c_void, off: u32) -> T {
        let mut v = MaybeUninit::<T>::zeroed();
        // SAFETY: bpf_probe_read_kernel faults safely; on failure `v` stays zeroed.
        unsafe {
            bpf_probe_read_kernel(
                v.as_mut_ptr().cast(),
                size_of::<T>() as u32,
                base.cast::<u8>().add(off as usize).cast(),
            );
            v.assume_init()
        }
    }
}

/// A plain load through a BTF-typed pointer (what `bpf_skc_to_tcp_sock`
/// returns, and pointers loaded through it such as `skc_net`). The verifier
/// checks each offset and size against the running kernel's BTF at load
/// time, so the offsets must be constants it can see ([`off!`]), and the JIT
/// makes the load fault-safe. A few cycles instead of a helper call: the
/// state-change program runs on every connection's own path.
pub struct Btf;

impl Kmem for Btf {
    #[inline(always)]
    fn get<T: Copy + Default>(base: *const c_void, off: u32) -> T {
        // SAFETY: `base` is a BTF pointer the verifier tracks; it rejects the
        // program at load time unless `base + off` is a field of this size.
        unsafe { ptr::read_volatile(base.cast::<u8>().add(off as usize).cast::<T>()) }
    }
}

/// Reads a `T` at byte offset `off` of the kernel object `base` with
/// `bpf_probe_read_kernel`.
#[inline(always)]
pub fn read<T: Copy + Default>(base: *const c_void, off: u32) -> T {
    Probe::get(base, off)
}

/// The most [`zero`] writes (the loop must have a constant bound).
pub const ZERO_MAX_BYTES: usize = 160;

/// Zeroes `len` bytes (a multiple of 4, at most [`ZERO_MAX_BYTES`]) at
/// 4-aligned `dst` with word stores. The compiler would otherwise call a
/// byte-by-byte `memset` subprogram on the hot path.
#[inline(always)]
pub fn zero(dst: *mut u32, len: usize) {
    let mut i = 0;
    while i < len / 4 && i < ZERO_MAX_BYTES / 4 {
        // SAFETY: the caller hands `len` writable, 4-aligned bytes.
        unsafe { ptr::write_volatile(dst.add(i), 0) };
        i += 1;
    }
}

/// A fresh socket state for `owner`, written field by field (see [`zero`]).
#[inline(always)]
pub fn reset_state(st: *mut SockState, owner: Owner) {
    // SAFETY: the caller hands this socket's storage; SockState is 8-aligned.
    unsafe {
        (*st).owner = owner;
        zero(
            (&raw mut (*st).cookie).cast(),
            size_of::<SockState>() - size_of::<Owner>(),
        );
    }
}

/// The owner of the calling task (process context only). `task`: the
/// program may ask for the task's pid and name (tracing programs always;
/// cgroup programs from 5.11); without, they stay zero.
#[inline(always)]
pub fn current_owner(flags: u32, task: bool) -> Owner {
    let (pid_tgid, comm) = if task {
        (
            bpf_get_current_pid_tgid(),
            bpf_get_current_comm().unwrap_or_default(),
        )
    } else {
        (0, [0; 16])
    };
    let uid_gid = bpf_get_current_uid_gid();
    Owner {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: no arguments; allowed for tracing and cgroup programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm,
        flags: flags | owner_flags::KNOWN,
        pad: 0,
    }
}

/// Whether the setsockopt program may ask for the task's pid and name.
#[inline(always)]
pub fn sockopt_task() -> bool {
    config!(sockopt_task) != 0
}

/// The socket's network namespace (`struct net *`).
#[inline(always)]
fn net_of<K: Kmem>(sk: *const c_void) -> *const c_void {
    K::get(sk, off!(skc_net))
}

/// Inode of the socket's network namespace.
#[inline(always)]
pub fn netns_of<K: Kmem>(sk: *const c_void) -> u32 {
    K::get(net_of::<K>(sk), off!(net_ns_inum))
}

/// Local port of a full socket: `skc_num`, or `inet_sport` once the kernel
/// released the port on close.
#[inline(always)]
pub fn local_port<K: Kmem>(sk: *const c_void) -> u16 {
    let port: u16 = K::get(sk, off!(skc_num));
    if port != 0 {
        return port;
    }
    u16::from_be(K::get(sk, off!(inet_sport)))
}

/// Effective keepalive configuration of a TCP socket (`tp` must reach the
/// `tcp_sock` fields): its own values where it set them, its namespace's
/// sysctls otherwise.
#[inline(always)]
pub fn keepalive<K: Kmem>(tp: *const c_void) -> Keepalive {
    let flags: u64 = K::get(tp, off!(skc_flags));
    let net = net_of::<K>(tp);
    let mut from_socket = 0;
    let mut time_j: u32 = K::get(tp, off!(tp_keepalive_time));
    if time_j == 0 {
        time_j = K::get(net, off!(net_keepalive_time));
    } else {
        from_socket |= ka_source::TIME;
    }
    let mut intvl_j: u32 = K::get(tp, off!(tp_keepalive_intvl));
    if intvl_j == 0 {
        intvl_j = K::get(net, off!(net_keepalive_intvl));
    } else {
        from_socket |= ka_source::INTVL;
    }
    let mut probes: u8 = K::get(tp, off!(tp_keepalive_probes));
    if probes == 0 {
        probes = K::get(net, off!(net_keepalive_probes));
    } else {
        from_socket |= ka_source::PROBES;
    }
    Keepalive {
        time_j,
        intvl_j,
        user_timeout_ms: K::get(tp, off!(icsk_user_timeout)),
        probes,
        enabled: ((flags >> (off!(sock_keepopen_bit) & 63)) & 1) as u8,
        from_socket,
        pad: 0,
    }
}

/// Fills the event header: time, cookie, netns, addresses and the stored
/// owner (zeroed when the socket predates the tracer). `sk` is the socket
/// for helpers and `addr` its address as a number ([`addr_at`]); `fields`
/// the same socket as a pointer `K` can read it through (for [`Btf`], its
/// `tcp_sock`, which reaches `inet_sport`).
#[inline(always)]
pub fn fill_info<K: Kmem>(
    info: *mut EventInfo,
    sk: *const c_void,
    addr: u64,
    fields: *const c_void,
    event_kind: u16,
    ts_ns: u64,
    state: *const SockState,
) {
    // SAFETY: `info` points at reserved ring buffer memory of the right size;
    // every field is written below. `state` is NULL or this socket's storage.
    unsafe {
        (*info).ts_ns = ts_ns;
        // The stored cookie, once a socket has one, saves the helper call.
        (*info).cookie = conn_id(sk, addr, state);
        (*info).kind = event_kind;
        (*info).pad = 0;
        // The namespace stored at ESTABLISHED saves two dependent loads
        // (the second often a cache miss) per record.
        let (netns, owner) = state
            .as_ref()
            .map_or((0, Owner::default()), |st| (st.netns, st.owner));
        fill_sock::<K>(info, fields, netns);
        (*info).owner = owner;
    }
}

/// The namespace and addresses part of an event header, read through `K`;
/// `netns` where the caller knows it already (0: read from the socket).
#[inline(always)]
pub fn fill_sock<K: Kmem>(info: *mut EventInfo, fields: *const c_void, netns: u32) {
    // SAFETY: `info` points at reserved ring buffer memory of the right
    // size; `fields` is a socket `K` reads safely.
    unsafe {
        (*info).netns = if netns != 0 {
            netns
        } else {
            netns_of::<K>(fields)
        };

        let s = &raw mut (*info).sock;
        let family: u16 = K::get(fields, off!(skc_family));
        (*s).family = family;
        let sk_state: u8 = K::get(fields, off!(skc_state));
        let mut sport: u16 = K::get(fields, off!(skc_num));
        // skc_num is zeroed when the port is released on close; full
        // sockets still hold it in inet_sport (time-wait and request
        // sockets are not inet_socks: their skc_num stays set).
        if sport == 0 && sk_state != tcp_state::TIME_WAIT && sk_state != tcp_state::NEW_SYN_RECV {
            sport = u16::from_be(K::get(fields, off!(inet_sport)));
        }
        (*s).sport = sport;
        (*s).dport = u16::from_be(K::get(fields, off!(skc_dport)));
        (*s).state = sk_state;
        (*s).pad = 0;
        zero((&raw mut (*s).saddr).cast(), 16);
        zero((&raw mut (*s).daddr).cast(), 16);
        if family == AF_INET6 {
            K::copy(
                (&raw mut (*s).saddr).cast(),
                16,
                fields,
                off!(skc_v6_rcv_saddr),
            );
            K::copy((&raw mut (*s).daddr).cast(), 16, fields, off!(skc_v6_daddr));
        } else if family == AF_INET {
            K::copy((&raw mut (*s).saddr).cast(), 4, fields, off!(skc_rcv_saddr));
            K::copy((&raw mut (*s).daddr).cast(), 4, fields, off!(skc_daddr));
        }
    }
}
