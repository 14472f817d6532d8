//! Resets received (`tcp:tcp_receive_reset`) and sent (`tcp:tcp_send_reset`):
//! recorded on the socket for its CLOSE summary, and sent as events in
//! verbose mode.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use tracer_common::{ResetData, close_flags, kind};

use crate::{
    maps::{SOCKS, reserve},
    sock::{Probe, fill_info, ready, verbose},
};

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    match on_reset(sk, kind::RESET_RECEIVED, close_flags::RST_RECEIVED, 0) {
        Ok(()) | Err(()) => 0,
    }
}

/// `sk` is NULL when the kernel answers a segment that matches no socket
/// (e.g. a SYN to a closed port): those have no owner or cookie to report.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    match on_reset(sk, kind::RESET_SENT, close_flags::RST_SENT, reason as u32) {
        Ok(()) | Err(()) => 0,
    }
}

#[inline(always)]
fn on_reset(sk: *const c_void, event_kind: u16, flag: u8, reason: u32) -> Result<(), ()> {
    if sk.is_null() {
        return Err(());
    }
    if !ready() {
        return Err(());
    }
    // NULL for request and time-wait sockets (not full sockets).
    let state = SOCKS.get_ptr(sk, false);
    // SAFETY: NULL-checked storage of this socket.
    if let Some(st) = unsafe { state.as_mut() } {
        st.flags |= flag;
    }
    if !verbose() {
        return Ok(());
    }
    let Some(mut entry) = reserve::<ResetData>(event_kind) else {
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot. `sk` may
    // be a request or time-wait socket: only `sock_common` fields are read.
    unsafe {
        fill_info::<Probe>(
            &raw mut (*ev).info,
            sk,
            sk,
            event_kind,
            bpf_ktime_get_ns(),
            state,
        );
        (*ev).data = ResetData { reason, pad: 0 };
    }
    entry.submit(0);
    Ok(())
}
