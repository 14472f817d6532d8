//! Every TCP state transition, from the `sock:inet_sock_set_state` BTF
//! tracepoint.
//!
//! - Connect (-> SYN_SENT) and listen (-> LISTEN) run in the calling
//!   process's context: that is where the owner is captured. The other
//!   transitions (often in softirq) read it back from socket storage.
//!   Accepted sockets get a copy of their listener's storage (BPF_F_CLONE)
//!   when the kernel clones them (LISTEN -> SYN_RECV).
//! - -> ESTABLISHED sends an OPEN event with the socket's keepalive settings.
//! - Leaving ESTABLISHED (first FIN, RST or timeout) records when, and the
//!   last payload times, in socket storage: that is the moment an idle kill
//!   happens, however long the socket lingers after it.
//! - -> CLOSE of a socket that was established sends one CLOSE summary.
//! - Every transition goes to userspace only in verbose mode (`trace`).

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_ns, bpf_skc_to_tcp_sock},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{
    CloseData, OpenData, SockState, StateChange, close_flags, kind, owner_flags, tcp_state,
};

use crate::{
    maps::{
        emit, forget_state, inherit, listener_owner, register_listener, reserve, state_of, submit,
        unregister_listener,
    },
    rx::{rx_start, rx_step},
    sock::{
        Btf, Kmem, addr_at, conn_id, cookie_helper, current_owner, fill_info, keepalive,
        local_port, netns_of, off, reset_state, run, state_in_hash, verbose,
    },
};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    run(&ctx, try_inet_sock_set_state);
    0
}

/// Whether a transition carries a fact the daemon needs: an owner to
/// capture, an open, an end, or the final close. The others
/// (FIN_WAIT1 -> FIN_WAIT2, CLOSE_WAIT -> LAST_ACK, ...) cost nothing more
/// than this test outside verbose mode.
#[inline(always)]
fn matters(old: u8, new: u8) -> bool {
    old == tcp_state::ESTABLISHED
        || new == tcp_state::ESTABLISHED
        || new == tcp_state::CLOSE
        || new == tcp_state::SYN_SENT
        || new == tcp_state::SYN_RECV
        || new == tcp_state::LISTEN
}

fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let (old, new) = (old as u8, new as u8);
    let verbose = verbose();
    if !verbose && !matters(old, new) {
        return Ok(());
    }
    let sk: *const c_void = ctx.arg(0);
    // The socket as a `tcp_sock` the verifier knows (fields are plain
    // loads), or NULL when it is not a full TCP socket: the tracepoint
    // fires for other protocols too.
    // SAFETY: `sk` is the tracepoint's socket; the helper checks it.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut()) }
        .cast_const()
        .cast::<c_void>();
    if tp.is_null() {
        return Err(());
    }
    // Argument 0 is the socket.
    let addr = addr_at(ctx.as_ptr());

    let state: *mut SockState = if new == tcp_state::SYN_SENT || new == tcp_state::LISTEN {
        let state = state_of(sk, addr, true);
        if state.is_null() {
            // No storage (memory pressure, or the fallback map is full):
            // this socket's events will carry an unknown owner; counted.
            aya_log_ebpf::warn!(ctx, "conn-tracer: no storage for a new socket");
        } else {
            let flags = if new == tcp_state::LISTEN {
                owner_flags::LISTENER
            } else {
                0
            };
            let owner = current_owner(flags, true);
            reset_state(state, owner);
            new_id(state, sk, addr);
            if new == tcp_state::LISTEN {
                register_listener(netns_of::<Btf>(tp), local_port::<Btf>(tp), addr, owner);
            }
        }
        state
    } else if new == tcp_state::SYN_RECV {
        if state_in_hash() {
            // A fresh child of a listener: its owner was registered by
            // the listener's namespace and port.
            match listener_owner(netns_of::<Btf>(tp), local_port::<Btf>(tp)) {
                Some(owner) => {
                    let state = state_of(sk, addr, true);
                    if !state.is_null() {
                        inherit(state, owner);
                        new_id(state, sk, addr);
                    }
                    state
                }
                None => core::ptr::null_mut(),
            }
        } else {
            let state = state_of(sk, addr, false);
            // SAFETY: NULL-checked storage of this socket.
            if let Some(st) = unsafe { state.as_mut() }
                && st.owner.flags & owner_flags::LISTENER != 0
            {
                // A fresh child holding its listener's copy: an accepted
                // connection. Keep the owner, drop the rest.
                inherit(st, st.owner);
                new_id(st, sk, addr);
            }
            state
        }
    } else {
        // Sockets older than the tracer get storage when they open or end:
        // their end is still worth knowing.
        state_of(
            sk,
            addr,
            new == tcp_state::ESTABLISHED || old == tcp_state::ESTABLISHED,
        )
    };

    // One clock read, where a time is kept or sent.
    let now = if verbose
        || new == tcp_state::ESTABLISHED
        || old == tcp_state::ESTABLISHED
        || new == tcp_state::CLOSE
    {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    // SAFETY: NULL-checked storage of this socket.
    if let Some(st) = unsafe { state.as_mut() } {
        if new == tcp_state::ESTABLISHED {
            st.established_ns = now;
            // For the sockopt program (which has neither the helper nor
            // the offsets) and for our own events; kept where the socket
            // got a fresh id when it was created.
            if st.cookie == 0 {
                st.cookie = conn_id(sk, addr, core::ptr::null());
            }
            st.netns = netns_of::<Btf>(tp);
            rx_start(st, tp, now);
        } else if old == tcp_state::ESTABLISHED {
            if new == tcp_state::CLOSE_WAIT && st.step_ns != 0 {
                // The FIN's own payload, if it carried any.
                rx_step(st, tp, now);
            }
            st.end_ns = now;
            // SAFETY: helper without arguments.
            st.end_j = unsafe { bpf_jiffies64() } as u32;
            st.end_last_send_j = Btf::get(tp, off!(tp_lsndtime));
            st.end_last_recv_j = Btf::get(tp, off!(icsk_lrcvtime));
            st.first_close_state = new;
            st.flags |= close_flags::END_SEEN;
        }
    }

    if verbose {
        emit_state(sk, addr, tp, state, now, old, new);
    }
    if new == tcp_state::ESTABLISHED {
        emit_open(sk, addr, tp, state, now);
    } else if old == tcp_state::ESTABLISHED && new == tcp_state::CLOSE_WAIT {
        // The peer's FIN: the end is known now, the owner may keep the
        // socket for hours (or for ever: a CLOSE_WAIT leak).
        // SAFETY: NULL-checked storage of this socket.
        if let Some(st) = unsafe { state.as_ref() } {
            emit_close(sk, addr, tp, st, now, old, kind::END);
        }
    } else if new == tcp_state::CLOSE {
        // SAFETY: NULL-checked storage of this socket.
        if let Some(st) = unsafe { state.as_mut() } {
            if old == tcp_state::SYN_SENT {
                // A failed connect (never established): one summary with
                // its error, for the connect-failure count.
                st.flags |= close_flags::CONNECT_FAILED;
                emit_close(sk, addr, tp, st, now, old, kind::CLOSE);
            } else if st.flags & close_flags::END_SEEN != 0 {
                emit_close(sk, addr, tp, st, now, old, kind::CLOSE);
            }
        }
        if old == tcp_state::LISTEN {
            unregister_listener(netns_of::<Btf>(tp), local_port::<Btf>(tp), addr);
        }
        forget_state(addr);
    }
    Ok(())
}

/// Where connection ids come from socket addresses (no cookie helper), a
/// socket created under the tracer gets one that also holds its creation
/// time, so a later socket at the same address (memory reuse) gets
/// another. With the helper, the kernel's cookie (taken at ESTABLISHED).
#[inline(always)]
fn new_id(st: *mut SockState, sk: *const c_void, addr: u64) {
    // SAFETY: the caller hands this socket's state.
    unsafe {
        (*st).cookie = if cookie_helper() {
            0
        } else {
            // SAFETY: helper without arguments.
            let born = bpf_ktime_get_ns();
            conn_id(sk, addr ^ born.rotate_left(32), core::ptr::null())
        };
    }
}

#[inline(always)]
fn emit_state(
    sk: *const c_void,
    addr: u64,
    tp: *const c_void,
    state: *const SockState,
    now: u64,
    old: u8,
    new: u8,
) {
    let data = StateChange {
        old_state: old,
        new_state: new,
        pad: [0; 6],
    };
    let _ = emit::<Btf, _>(kind::STATE, sk, addr, tp, now, state, data);
}

#[inline(always)]
fn emit_open(sk: *const c_void, addr: u64, tp: *const c_void, state: *const SockState, now: u64) {
    let data = OpenData {
        ka: keepalive::<Btf>(tp),
        // SAFETY: helper without arguments.
        jiffies: unsafe { bpf_jiffies64() },
    };
    let _ = emit::<Btf, _>(kind::OPEN, sk, addr, tp, now, state, data);
}

/// Payload (not the FIN) in flight and queued unsent at the final
/// transition from `old`, as [`close_flags`] bits. In FIN_WAIT1, CLOSING
/// and LAST_ACK the socket's own FIN is the last sequence number written
/// and not acknowledged: it is taken off, so a socket whose only
/// unanswered segment is its FIN has no unacknowledged data.
#[inline(always)]
fn pending_flags(tp: *const c_void, old: u8) -> u8 {
    let snd_una: u32 = Btf::get(tp, off!(tp_snd_una));
    let snd_nxt: u32 = Btf::get(tp, off!(tp_snd_nxt));
    let write_seq: u32 = Btf::get(tp, off!(tp_write_seq));
    let fin = u32::from(
        old == tcp_state::FIN_WAIT1 || old == tcp_state::CLOSING || old == tcp_state::LAST_ACK,
    );
    let mut in_flight = snd_nxt.wrapping_sub(snd_una);
    let mut unsent = write_seq.wrapping_sub(snd_nxt);
    if fin == 1 {
        if unsent == 0 {
            in_flight = in_flight.saturating_sub(1);
        } else {
            unsent -= 1;
        }
    }
    let mut flags = 0;
    // Differences over 2^31 are sequence noise (not yet initialised).
    if in_flight != 0 && in_flight < 1 << 31 {
        flags |= close_flags::UNACKED;
    }
    if unsent != 0 && unsent < 1 << 31 {
        flags |= close_flags::UNSENT;
    }
    flags
}

#[inline(always)]
fn emit_close(
    sk: *const c_void,
    addr: u64,
    tp: *const c_void,
    st: &SockState,
    now: u64,
    old: u8,
    event_kind: u16,
) {
    let Some(mut entry) = reserve::<CloseData>(event_kind) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    let flags = st.flags | pending_flags(tp, old);
    let mut errno: u32 = Btf::get::<i32>(tp, off!(sk_err)).unsigned_abs();
    if errno == 0 && flags & close_flags::CONNECT_FAILED != 0 {
        // The connect's error, which the owner may have consumed already.
        errno = st.reported_err;
    }
    let soft_errno: i32 = Btf::get(tp, off!(sk_err_soft));
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot.
    unsafe {
        fill_info::<Btf>(&raw mut (*ev).info, sk, addr, tp, event_kind, now, st);
        (*ev).data = CloseData {
            ka: keepalive::<Btf>(tp),
            established_ns: st.established_ns,
            end_ns: st.end_ns,
            end_j: st.end_j,
            end_last_send_j: st.end_last_send_j,
            end_last_recv_j: st.end_last_recv_j,
            first_close_state: st.first_close_state,
            flags,
            retransmits: Btf::get(tp, off!(icsk_retransmits)),
            probes_out: Btf::get(tp, off!(icsk_probes_out)),
            jiffies: bpf_jiffies64(),
            last_send_j: Btf::get(tp, off!(tp_lsndtime)),
            last_recv_j: Btf::get(tp, off!(icsk_lrcvtime)),
            last_ack_j: Btf::get(tp, off!(tp_rcv_tstamp)),
            errno,
            first_tx_us: Btf::get(tp, off!(tp_first_tx_mstamp)),
            bytes_received: Btf::get(tp, off!(tp_bytes_received)),
            bytes_acked: Btf::get(tp, off!(tp_bytes_acked)),
            soft_errno: soft_errno.unsigned_abs(),
            snd_wnd: Btf::get(tp, off!(tp_snd_wnd)),
            pre_burst_ns: st.pre_burst_ns,
            burst_start_ns: st.burst_start_ns,
            burst_base: st.burst_base,
            pad: 0,
        };
    }
    submit(entry);
}
