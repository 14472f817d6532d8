//! Received payload (`tcp:tcp_probe`: every segment an established socket
//! receives, before the kernel processes it), followed in socket storage
//! for one fact: the peer's last burst of payload and the silence before
//! it. A server that says goodbye after its idle timeout (MySQL 8's error
//! 4031, PostgreSQL's FATAL, an HTTP/2 GOAWAY, a TLS close_notify) writes
//! a short message right before its FIN; the kernel keeps only the last
//! arrival (`icsk_ack.lrcvtime`), which the goodbye overwrites. Nothing is
//! sent to userspace here: the END and CLOSE records carry the burst.
//!
//! Segments without payload (ACKs, window updates, a bare FIN) return
//! before the socket's state is looked up: they move neither `lrcvtime`
//! nor `bytes_received`, so a step at them changes no answer. The next
//! step, at a segment with payload or at the END, sees the same change of
//! `lrcvtime` and dates it to the same step (the last one that saw
//! payload), with the same byte count before it.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_ktime_get_ns, bpf_skc_to_tcp_sock},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{BURST_GAP_NS, SockState};

use crate::{
    maps::state_of,
    sock::{Btf, Kmem, addr_at, off, run},
};

#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_probe(ctx: BtfTracePointContext) -> i32 {
    run(&ctx, try_tcp_probe);
    0
}

fn try_tcp_probe(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let sk: *const c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's socket; the helper checks it.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut()) }
        .cast_const()
        .cast::<c_void>();
    if tp.is_null() {
        return Err(());
    }
    let skb: *const c_void = ctx.arg(1);
    if !may_carry_payload(tp, skb) {
        return Ok(());
    }
    // SAFETY: NULL-checked storage of this socket (none for sockets the
    // tracer did not see established).
    let Some(st) = (unsafe { state_of(sk, addr_at(ctx.as_ptr()), false).as_mut() }) else {
        return Err(());
    };
    if st.step_ns == 0 {
        // Established before the tracer: no baseline to measure from.
        return Ok(());
    }
    // SAFETY: helper without arguments.
    rx_step(st, tp, unsafe { bpf_ktime_get_ns() });
    Ok(())
}

/// Whether the segment `skb` that `tcp:tcp_probe` shows may carry payload:
/// it is longer than the TCP header this connection's segments carry
/// (`tcp_header_len`: 20 bytes, 32 with timestamps). A segment with more
/// options (SACK blocks) counts as payload: the step is taken, as before.
#[inline(always)]
fn may_carry_payload(tp: *const c_void, skb: *const c_void) -> bool {
    let len: u32 = Btf::get(skb, off!(skb_len));
    let header: u16 = Btf::get(tp, off!(tp_tcp_header_len));
    len > u32::from(header)
}

/// The baseline at ESTABLISHED: no payload yet, as of `now`.
#[inline(always)]
pub fn rx_start(st: &mut SockState, tp: *const c_void, now: u64) {
    st.rx_seen_j = Btf::get(tp, off!(icsk_lrcvtime));
    st.rx_bytes_seen = Btf::get::<u64>(tp, off!(tp_bytes_received)) as u32;
    st.step_ns = now;
    st.rx_ns = now;
    st.pre_burst_ns = 0;
    st.burst_start_ns = 0;
}

/// One step, at `now`: if payload arrived since the last step (the
/// kernel moved `lrcvtime`), it arrived when that step ran (the segment
/// it saw was processed right after it); after a silence of at least
/// [`BURST_GAP_NS`] it starts a new burst.
#[inline(always)]
pub fn rx_step(st: &mut SockState, tp: *const c_void, now: u64) {
    let lrcv: u32 = Btf::get(tp, off!(icsk_lrcvtime));
    if lrcv != st.rx_seen_j {
        let at = st.step_ns;
        if at.wrapping_sub(st.rx_ns) >= BURST_GAP_NS {
            st.pre_burst_ns = st.rx_ns;
            st.burst_start_ns = at;
            st.burst_base = st.rx_bytes_seen;
        }
        st.rx_seen_j = lrcv;
        st.rx_ns = at;
    }
    st.step_ns = now;
    st.rx_bytes_seen = Btf::get::<u64>(tp, off!(tp_bytes_received)) as u32;
}
