//! Resets received (`tcp:tcp_receive_reset`) and sent (`tcp:tcp_send_reset`).

use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use tracer_common::{ResetData, kind};

use crate::{
    maps::reserve,
    sock::{fill_info, offsets},
};

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    match emit_reset(sk, kind::RESET_RECEIVED, 0) {
        Ok(()) | Err(()) => 0,
    }
}

/// `sk` is NULL when the kernel answers a segment that matches no socket
/// (e.g. a SYN to a closed port): those have no owner or cookie to report.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    match emit_reset(sk, kind::RESET_SENT, reason as u32) {
        Ok(()) | Err(()) => 0,
    }
}

#[inline(always)]
fn emit_reset(sk: *const c_void, event_kind: u16, reason: u32) -> Result<(), ()> {
    if sk.is_null() {
        return Err(());
    }
    let off = offsets();
    if off.ready == 0 {
        return Err(());
    }
    let Some(mut entry) = reserve::<ResetData>(event_kind) else {
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot. `sk` may
    // be a request or time-wait socket: only `sock_common` fields are read,
    // and the storage helper returns NULL for those.
    unsafe {
        fill_info(&raw mut (*ev).info, sk, event_kind, &off);
        (*ev).data = ResetData { reason, pad: 0 };
    }
    entry.submit(0);
    Ok(())
}
