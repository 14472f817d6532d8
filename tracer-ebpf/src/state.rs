//! Every TCP state transition, from the `sock:inet_sock_set_state` BTF
//! tracepoint. Connect (-> SYN_SENT) and listen (-> LISTEN) run in the calling
//! process's context, so that is where the owner is captured; the other
//! transitions (often softirq) read it back from socket storage. Accepted
//! sockets get a copy of their listener's storage (BPF_F_CLONE) when the
//! kernel clones them (LISTEN -> SYN_RECV).

use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{IPPROTO_TCP, StateChange, kind, owner_flags, tcp_state};

use crate::{
    maps::{OWNERS, reserve},
    sock::{current_owner, fill_info, offsets, read},
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let off = offsets();
    if off.ready == 0 {
        return Err(());
    }
    let sk: *const c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let protocol: u16 = read(sk, off.sk_protocol);
    if protocol != IPPROTO_TCP {
        return Err(());
    }
    let (old, new) = (old as u8, new as u8);

    if new == tcp_state::SYN_SENT || new == tcp_state::LISTEN {
        let flags = if new == tcp_state::LISTEN {
            owner_flags::LISTENER
        } else {
            0
        };
        let owner = OWNERS.get_ptr(sk, true);
        if owner.is_null() {
            // Storage could not be allocated (memory pressure): this socket's
            // events will carry an unknown owner. Rare enough to log.
            aya_log_ebpf::warn!(ctx, "conn-tracer: no owner storage for a new socket");
        } else {
            // SAFETY: non-NULL storage of this socket, ours while we run.
            unsafe { *owner = current_owner(flags) };
        }
    } else if new == tcp_state::SYN_RECV {
        let owner = OWNERS.get_ptr(sk, false);
        // SAFETY: NULL-checked storage of this socket.
        if let Some(owner) = unsafe { owner.as_mut() }
            && owner.flags & owner_flags::LISTENER != 0
        {
            // A fresh child holding its listener's copy: an accepted connection.
            owner.flags = (owner.flags & !owner_flags::LISTENER) | owner_flags::INHERITED;
        }
    }

    let Some(mut entry) = reserve::<StateChange>(kind::STATE) else {
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot.
    unsafe {
        fill_info(&raw mut (*ev).info, sk, kind::STATE, &off);
        (*ev).data = StateChange {
            old_state: old,
            new_state: new,
            pad: [0; 6],
        };
    }
    entry.submit(0);
    Ok(())
}
