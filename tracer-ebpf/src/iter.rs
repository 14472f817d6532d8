//! A TCP socket iterator (`iter/tcp`): one [`SnapshotData`] record per live
//! full socket, read by userspace on demand. It gives the true keepalive
//! state, idle times and byte counts of connections, including those that
//! were opened (and had their options set) before the tracer started.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_ns, bpf_seq_write};
use tracer_common::{Event, SnapshotData, kind, tcp_state};

use crate::{
    maps::state_of,
    sock::{Probe, addr_at, fill_info, keepalive, off, read, ready},
};

/// `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common *sk_common; uid_t uid; }`:
/// the iterator's context, a fixed part of the kernel's iterator ABI.
#[repr(C)]
struct IterTcpCtx {
    meta: *const IterMeta,
    sk_common: *const c_void,
}

/// `struct bpf_iter_meta`, whose first member is the `seq_file *`.
#[repr(C)]
struct IterMeta {
    seq: *mut c_void,
}

/// `SOCK_INODE(sk->sk_socket)->i_ino`, through the socket's file: 0 for
/// sockets without one (orphaned, closing).
#[inline(always)]
fn socket_ino(sk: *const c_void) -> u64 {
    let socket: *const c_void = read(sk, off!(sk_socket));
    if socket.is_null() {
        return 0;
    }
    let file: *const c_void = read(socket, off!(socket_file));
    if file.is_null() {
        return 0;
    }
    let inode: *const c_void = read(file, off!(file_inode));
    if inode.is_null() {
        return 0;
    }
    read(inode, off!(inode_ino))
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn dump_tcp(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel passes a bpf_iter__tcp context.
    let ctx = unsafe { &*ctx.cast::<IterTcpCtx>() };
    let sk = ctx.sk_common;
    if sk.is_null() {
        return 0;
    }
    if !ready() {
        return 0;
    }
    let state: u8 = read(sk, off!(skc_state));
    // Request and time-wait sockets are not full sockets. Listeners are
    // reported: they tell accepted connections from outgoing ones.
    if state == tcp_state::TIME_WAIT
        || state == tcp_state::NEW_SYN_RECV
        || state == tcp_state::CLOSE
    {
        return 0;
    }
    let mut ev = Event {
        info: Default::default(),
        data: SnapshotData::default(),
    };
    // The socket's address as a number: the context's second member.
    let addr = addr_at((&raw const ctx.sk_common).cast());
    let st = state_of(sk, addr, false);
    // The time is taken below, after the jiffies.
    fill_info::<Probe>(&raw mut ev.info, sk, addr, sk, kind::SNAPSHOT, 0, st);
    ev.data = SnapshotData {
        ka: keepalive::<Probe>(sk),
        // SAFETY: helper without arguments.
        jiffies: unsafe { bpf_jiffies64() },
        last_send_j: read(sk, off!(tp_lsndtime)),
        last_recv_j: read(sk, off!(icsk_lrcvtime)),
        last_ack_j: read(sk, off!(tp_rcv_tstamp)),
        retransmits: read(sk, off!(icsk_retransmits)),
        probes_out: read(sk, off!(icsk_probes_out)),
        pad: 0,
        bytes_received: read(sk, off!(tp_bytes_received)),
        bytes_acked: read(sk, off!(tp_bytes_acked)),
        ino: socket_ino(sk),
    };
    // Take the time after the jiffies so the pair is close together.
    // SAFETY: helper without arguments.
    ev.info.ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `meta` is the iterator's trusted metadata; `ev` is on our stack.
    unsafe {
        bpf_seq_write(
            (*ctx.meta).seq.cast(),
            (&raw const ev).cast_mut().cast(),
            size_of::<Event<SnapshotData>>() as u32,
        );
    }
    0
}
