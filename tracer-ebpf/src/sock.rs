//! Reading a `struct sock` at offsets resolved from the running kernel's BTF
//! (handed in by userspace as the [`OFFSETS`] global), and filling in the
//! common event header.

use core::{ffi::c_void, mem::MaybeUninit, ptr};

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::{
        bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
};
use tracer_common::{
    AF_INET, AF_INET6, EventInfo, Keepalive, KernelOffsets, Owner, SockState, TracerConfig,
    ka_source, owner_flags, tcp_state,
};

/// Set by userspace with `EbpfLoader::override_global` before load.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = {
    // SAFETY: all-zero is a valid KernelOffsets (plain integers), meaning "not ready".
    unsafe { core::mem::zeroed() }
};

/// Set by userspace before load.
#[unsafe(no_mangle)]
static CONFIG: TracerConfig = TracerConfig { verbose: 0, pad: 0 };

#[inline(always)]
pub fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of a global; volatile so that the compiler does not
    // fold the zero initialiser that userspace replaces at load time.
    unsafe { ptr::read_volatile(&raw const OFFSETS) }
}

/// Whether every state change, reset and error goes to userspace (`trace`).
#[inline(always)]
pub fn verbose() -> bool {
    // SAFETY: as in `offsets`.
    unsafe { ptr::read_volatile(&raw const CONFIG.verbose) != 0 }
}

/// Reads a `T` at byte offset `off` of the kernel object `base`.
#[inline(always)]
pub fn read<T: Copy + Default>(base: *const c_void, off: u32) -> T {
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

/// Copies `len` bytes at `base + off` into `dst`.
#[inline(always)]
fn read_into(dst: *mut u8, len: u32, base: *const c_void, off: u32) {
    // SAFETY: as in `read`; `dst` points at `len` writable bytes.
    unsafe {
        bpf_probe_read_kernel(dst.cast(), len, base.cast::<u8>().add(off as usize).cast());
    }
}

/// The owner of the calling task (process context only).
#[inline(always)]
pub fn current_owner(flags: u32) -> Owner {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    Owner {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: no arguments; allowed for tracing and cgroup programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or_default(),
        flags: flags | owner_flags::KNOWN,
        pad: 0,
    }
}

/// The socket's network namespace (`struct net *`).
#[inline(always)]
fn net_of(sk: *const c_void, off: &KernelOffsets) -> *const c_void {
    read(sk, off.skc_net)
}

/// Inode of the socket's network namespace.
#[inline(always)]
pub fn netns_of(sk: *const c_void, off: &KernelOffsets) -> u32 {
    read(net_of(sk, off), off.net_ns_inum)
}

/// Effective keepalive configuration of a TCP socket: its own values where
/// it set them, its namespace's sysctls otherwise.
#[inline(always)]
pub fn keepalive(sk: *const c_void, off: &KernelOffsets) -> Keepalive {
    let flags: u64 = read(sk, off.skc_flags);
    let net = net_of(sk, off);
    let mut from_socket = 0;
    let mut time_j: u32 = read(sk, off.tp_keepalive_time);
    if time_j == 0 {
        time_j = read(net, off.net_keepalive_time);
    } else {
        from_socket |= ka_source::TIME;
    }
    let mut intvl_j: u32 = read(sk, off.tp_keepalive_intvl);
    if intvl_j == 0 {
        intvl_j = read(net, off.net_keepalive_intvl);
    } else {
        from_socket |= ka_source::INTVL;
    }
    let mut probes: u8 = read(sk, off.tp_keepalive_probes);
    if probes == 0 {
        probes = read(net, off.net_keepalive_probes);
    } else {
        from_socket |= ka_source::PROBES;
    }
    Keepalive {
        time_j,
        intvl_j,
        user_timeout_ms: read(sk, off.icsk_user_timeout),
        probes,
        enabled: ((flags >> (off.sock_keepopen_bit & 63)) & 1) as u8,
        from_socket,
        pad: 0,
    }
}

/// Fills the event header for `sk`: time, cookie, netns, addresses and the
/// stored owner (zeroed when the socket predates the tracer).
#[inline(always)]
pub fn fill_info(
    info: *mut EventInfo,
    sk: *const c_void,
    event_kind: u16,
    state: *const SockState,
    off: &KernelOffsets,
) {
    // SAFETY: `info` points at reserved ring buffer memory of the right size;
    // every field is written below. `state` is NULL or this socket's storage.
    unsafe {
        (*info).ts_ns = bpf_ktime_get_ns();
        (*info).cookie = bpf_get_socket_cookie(sk.cast_mut());
        (*info).kind = event_kind;
        (*info).pad = 0;
        (*info).netns = netns_of(sk, off);

        let s = &raw mut (*info).sock;
        let family: u16 = read(sk, off.skc_family);
        (*s).family = family;
        let sk_state: u8 = read(sk, off.skc_state);
        let mut sport: u16 = read(sk, off.skc_num);
        // skc_num is zeroed when the port is released on close; full
        // sockets still hold it in inet_sport (time-wait and request
        // sockets are not inet_socks: their skc_num stays set).
        if sport == 0 && sk_state != tcp_state::TIME_WAIT && sk_state != tcp_state::NEW_SYN_RECV {
            sport = u16::from_be(read(sk, off.inet_sport));
        }
        (*s).sport = sport;
        (*s).dport = u16::from_be(read(sk, off.skc_dport));
        (*s).state = sk_state;
        (*s).pad = 0;
        (*s).saddr = [0; 16];
        (*s).daddr = [0; 16];
        if family == AF_INET6 {
            read_into((&raw mut (*s).saddr).cast(), 16, sk, off.skc_v6_rcv_saddr);
            read_into((&raw mut (*s).daddr).cast(), 16, sk, off.skc_v6_daddr);
        } else if family == AF_INET {
            read_into((&raw mut (*s).saddr).cast(), 4, sk, off.skc_rcv_saddr);
            read_into((&raw mut (*s).daddr).cast(), 4, sk, off.skc_daddr);
        }

        (*info).owner = if state.is_null() {
            Owner::default()
        } else {
            (*state).owner
        };
    }
}
