//! Keepalive socket options as processes set them (SO_KEEPALIVE,
//! TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT), from a
//! cgroup `setsockopt` program attached at the cgroup v2 root. It only
//! observes: every call proceeds unchanged.

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns, macros::cgroup_sockopt, programs::SockoptContext,
};
use tracer_common::{EventInfo, IPPROTO_TCP, SockAddrs, SockoptData, kind, sockopt};

use crate::{
    maps::{SOCKS, reserve, submit},
    sock::{current_owner, ready, sockopt_task, state_in_hash},
};

/// Let the call through (a cgroup sockopt program's "allow").
pub(crate) const ALLOW: i32 = 1;

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    try_setsockopt(&ctx);
    ALLOW
}

#[inline(always)]
fn watched(level: u32, optname: u32) -> bool {
    (level == sockopt::SOL_SOCKET && optname == sockopt::SO_KEEPALIVE)
        || (level == sockopt::SOL_TCP
            && (optname == sockopt::TCP_KEEPIDLE
                || optname == sockopt::TCP_KEEPINTVL
                || optname == sockopt::TCP_KEEPCNT
                || optname == sockopt::TCP_USER_TIMEOUT))
}

/// A cgroup sockopt call's fields: (level, optname, optlen, optval,
/// optval_end, sk).
pub type Call = (
    u32,
    u32,
    i32,
    *mut u8,
    *mut u8,
    *mut aya_ebpf::bindings::bpf_sock,
);

#[inline(always)]
pub fn call_of(ctx: &SockoptContext) -> Call {
    let so = ctx.sockopt;
    // SAFETY: the context is valid for the program's run.
    unsafe {
        (
            (*so).level as u32,
            (*so).optname as u32,
            (*so).optlen,
            (*so).__bindgen_anon_2.optval.cast::<u8>(),
            (*so).__bindgen_anon_3.optval_end.cast::<u8>(),
            (*so).__bindgen_anon_1.sk,
        )
    }
}

/// The kernel hands programs at most one page of optval. When the caller's
/// buffer is larger, tells the kernel to keep the caller's own (kernels
/// before 6.5 otherwise fail the call with EFAULT) and returns true: the
/// program must then leave the call alone.
#[inline(always)]
pub fn leave_large_buffer(ctx: &SockoptContext, call: &Call) -> bool {
    let (_, _, optlen, optval, optval_end, _) = *call;
    if optlen > 0 && (optlen as usize) > (optval_end as usize).wrapping_sub(optval as usize) {
        // SAFETY: optlen is writable in setsockopt and getsockopt programs.
        unsafe { (*ctx.sockopt).optlen = 0 };
        return true;
    }
    false
}

/// The addresses of a TCP context socket (local first, as the kernel
/// programs' events have them), or None for another protocol.
#[inline(always)]
pub fn tcp_addrs(sk: *mut aya_ebpf::bindings::bpf_sock) -> Option<SockAddrs> {
    // Context fields must be read with exactly their own width: volatile
    // keeps the compiler from merging neighbouring u32 loads.
    // SAFETY: non-NULL context socket (checked by the callers); every read
    // is of one bpf_sock field.
    let rd = |p: *const u32| unsafe { core::ptr::read_volatile(p) };
    let (protocol, family, sk_state) = unsafe {
        (
            rd(&raw const (*sk).protocol),
            rd(&raw const (*sk).family),
            rd(&raw const (*sk).state),
        )
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return None;
    }
    let mut addrs = SockAddrs {
        family: family as u16,
        state: sk_state as u8,
        ..SockAddrs::default()
    };
    // SAFETY: as above. bpf_sock keeps addresses and dst_port in network
    // order, src_port in host order.
    unsafe {
        addrs.sport = rd(&raw const (*sk).src_port) as u16;
        addrs.dport = u16::from_be(core::ptr::read_volatile(&raw const (*sk).dst_port));
        if u16::try_from(family) == Ok(tracer_common::AF_INET) {
            addrs.saddr[..4].copy_from_slice(&rd(&raw const (*sk).src_ip4).to_ne_bytes());
            addrs.daddr[..4].copy_from_slice(&rd(&raw const (*sk).dst_ip4).to_ne_bytes());
        } else {
            for i in 0..4 {
                let src = rd(&raw const (*sk).src_ip6[i]).to_ne_bytes();
                let dst = rd(&raw const (*sk).dst_ip6[i]).to_ne_bytes();
                addrs.saddr[i * 4..i * 4 + 4].copy_from_slice(&src);
                addrs.daddr[i * 4..i * 4 + 4].copy_from_slice(&dst);
            }
        }
    }
    Some(addrs)
}

/// The (cookie, netns) the socket's storage holds, or zeros. With the
/// fallback store (before 5.11) a cgroup program cannot find the socket's
/// state (it has no helper to turn the socket into its key).
#[inline(always)]
pub fn stored_id(sk: *mut aya_ebpf::bindings::bpf_sock) -> (u64, u32) {
    let state = if state_in_hash() {
        core::ptr::null()
    } else {
        SOCKS.get_ptr(sk.cast(), false)
    };
    // SAFETY: NULL-checked storage of this socket.
    unsafe { state.as_ref() }.map_or((0, 0), |s| (s.cookie, s.netns))
}

/// The header of an event about a cgroup sockopt call's socket `sk`: its
/// id where its storage has one (else the owner and addresses only).
#[inline(always)]
pub fn call_info(
    event_kind: u16,
    sk: *mut aya_ebpf::bindings::bpf_sock,
    sock: SockAddrs,
    task: bool,
) -> EventInfo {
    let (cookie, netns) = stored_id(sk);
    EventInfo {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
        kind: event_kind,
        pad: 0,
        netns,
        sock,
        owner: current_owner(0, task),
    }
}

#[inline(always)]
fn try_setsockopt(ctx: &SockoptContext) {
    let call = call_of(ctx);
    // Disarmed (see `ready`): only the fix-up every call needs.
    if leave_large_buffer(ctx, &call) || !ready() {
        return;
    }
    let (level, optname, optlen, optval, optval_end, sk) = call;
    if !watched(level, optname) || sk.is_null() {
        return;
    }
    let Some(addrs) = tcp_addrs(sk) else {
        return;
    };
    // SAFETY: bounds-checked against optval_end as the verifier requires.
    let value = unsafe {
        if optval.add(4) > optval_end {
            return;
        }
        core::ptr::read_unaligned(optval.cast::<i32>())
    };
    let Some(mut entry) = reserve::<SockoptData>(kind::SOCKOPT) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot.
    unsafe {
        (*ev).info = call_info(kind::SOCKOPT, sk, addrs, sockopt_task());
        (*ev).data = SockoptData {
            level,
            optname,
            value,
            optlen: optlen as u32,
        };
    }
    submit(entry);
}
