//! Resets received (`tcp:tcp_receive_reset`) and sent (`tcp:tcp_send_reset`):
//! recorded on the socket for its CLOSE summary, and sent as events in
//! verbose mode.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_ktime_get_ns, macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{NO_RESET_REASON, RESET_REASON_ARG, ResetData, close_flags, kind};

use crate::{
    maps::{emit, state_of},
    sock::{Probe, addr_at, config, ready, verbose},
};

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    match on_reset(
        &ctx,
        sk,
        kind::RESET_RECEIVED,
        close_flags::RST_RECEIVED,
        NO_RESET_REASON,
    ) {
        Ok(()) | Err(()) => 0,
    }
}

/// `sk` is NULL when the kernel answers a segment that matches no socket
/// (e.g. a SYN to a closed port): those have no owner or cookie to report.
/// The reason argument exists from 6.10 (argument 2); userspace finds it
/// in the tracepoint's BTF prototype, and a kernel without it never sees
/// the read (the verifier refuses reading past a tracepoint's arguments).
/// One constant position only: with several, the compiler computes the
/// context offset, which the verifier refuses.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let reason: u64 = if config!(reset_reason_arg) == RESET_REASON_ARG {
        ctx.arg(RESET_REASON_ARG as usize)
    } else {
        u64::from(NO_RESET_REASON)
    };
    match on_reset(
        &ctx,
        sk,
        kind::RESET_SENT,
        close_flags::RST_SENT,
        reason as u32,
    ) {
        Ok(()) | Err(()) => 0,
    }
}

#[inline(always)]
fn on_reset(
    ctx: &BtfTracePointContext,
    sk: *const c_void,
    event_kind: u16,
    flag: u8,
    reason: u32,
) -> Result<(), ()> {
    if sk.is_null() {
        return Err(());
    }
    if !ready() {
        return Err(());
    }
    // Argument 0 is the socket.
    let addr = addr_at(ctx.as_ptr());
    // NULL for request and time-wait sockets (not full sockets).
    let state = state_of(sk, addr, false);
    // SAFETY: NULL-checked storage of this socket.
    if let Some(st) = unsafe { state.as_mut() } {
        st.flags |= flag;
    }
    if !verbose() {
        return Ok(());
    }
    // `sk` may be a request or time-wait socket: the header reads only
    // `sock_common` fields.
    let data = ResetData { reason, pad: 0 };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    emit::<Probe, _>(event_kind, sk, addr, sk, now, state, data)
}
