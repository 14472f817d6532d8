//! Errors reported on TCP sockets (`sock:inet_sk_error_report`): ECONNRESET,
//! ECONNREFUSED, ETIMEDOUT, EPIPE, ... as the owner will see them. Kept in
//! the socket's state for its CLOSE summary (the owner's `connect()` or
//! `SO_ERROR` clears `sk_err`, and may do so before the kernel's
//! SYN_SENT -> CLOSE: an ICMP-rejected connect); sent as events in verbose
//! mode.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_ktime_get_ns, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{IPPROTO_TCP, SockError, close_flags, kind};

use crate::{
    maps::{emit, state_of},
    sock::{Probe, addr_at, off, read, run, verbose},
};

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    run(&ctx, try_inet_sk_error_report);
    0
}

fn try_inet_sk_error_report(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let sk: *const c_void = ctx.arg(0);
    let protocol: u16 = read(sk, off!(sk_protocol));
    if protocol != IPPROTO_TCP {
        return Err(());
    }
    let errno: i32 = read(sk, off!(sk_err));
    let addr = addr_at(ctx.as_ptr());
    let state = state_of(sk, addr, false);
    // SAFETY: NULL-checked storage of this socket.
    if let Some(st) = unsafe { state.as_mut() } {
        if errno != 0 {
            st.reported_err = errno.unsigned_abs();
        } else {
            let queued: u32 = read(sk, off!(sk_error_queue_len));
            if queued != 0 {
                st.flags |= close_flags::ERROR_QUEUED;
            }
        }
    }
    if !verbose() {
        return Ok(());
    }
    let data = SockError {
        errno: errno.unsigned_abs(),
        pad: 0,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    emit::<Probe, _>(kind::SOCK_ERROR, sk, addr, sk, now, state, data)
}
