//! Which thread took a connection on a mesh capture port.
//!
//! A proxy handles a connection on the thread that accepted it, so the
//! connection that thread opens next for it is its upstream leg: userspace
//! pairs the sidecar's two sockets by this. Two sources, one record:
//!
//! - `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (a cgroup `getsockopt` program at
//!   the cgroup v2 root, 5.11+): a proxy behind iptables REDIRECT asks the
//!   accepted socket where the connection was going before it can open the
//!   upstream one, on the thread that handles it. It runs only on getsockopt
//!   calls, which are rare.
//! - `syscalls:sys_exit_accept4` and `sys_exit_accept` (the fallback, for
//!   5.10, whose cgroup programs cannot ask for the task): the socket behind
//!   the returned descriptor is read from the task's file table
//!   (`task->files->fdt->fd[fd]->private_data->sk`, offsets from BTF) with
//!   `bpf_probe_read_kernel`. While any syscall tracepoint is enabled,
//!   every system call of every process takes the kernel's traced slow
//!   path (about 45-60 ns more a call, measured in docs/benchmarks.md).
//!
//! Only sockets whose local port is a capture port are sent: one record per
//! proxied connection, none elsewhere.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_current_task, bpf_ktime_get_ns},
    macros::{cgroup_sockopt, tracepoint},
    programs::{SockoptContext, TracePointContext},
};
use tracer_common::{AF_INET, AF_INET6, AcceptData, kind, sockopt};

use crate::{
    maps::{reserve, submit},
    sock::{Probe, config, current_owner, fill_sock, off, read, ready, run},
    sockopt::{ALLOW, call_info, leave_large_buffer, tcp_addrs},
};

/// Whether `port` (host order) is one of the mesh's capture ports.
#[inline(always)]
fn capture_port(port: u16) -> bool {
    port != 0 && (port == config!(outbound_capture_port) || port == config!(inbound_capture_port))
}

/// Observes only: the caller gets what the kernel (and any program before
/// this one) answered.
#[cgroup_sockopt(getsockopt)]
pub fn getsockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx);
    ALLOW
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    // SAFETY: the context is valid for the program's run; retval is
    // readable and optlen writable in getsockopt programs.
    unsafe {
        if (*ctx.sockopt).retval != 0 {
            // The call failed and no program answered it: optlen 0 keeps
            // the caller's buffer and length as they were (older kernels
            // copy the program's zeroed buffer back otherwise).
            (*ctx.sockopt).optlen = 0;
            return;
        }
    }
    let call = crate::sockopt::call_of(ctx);
    // Disarmed (see `ready`): only the fix-ups every call needs.
    if leave_large_buffer(ctx, &call) || !ready() {
        return;
    }
    let (level, optname, _, _, _, sk) = call;
    if optname != sockopt::SO_ORIGINAL_DST
        || (level != sockopt::SOL_IP && level != sockopt::SOL_IPV6)
        || sk.is_null()
    {
        return;
    }
    let Some(addrs) = tcp_addrs(sk) else {
        return;
    };
    if !capture_port(addrs.sport) {
        return;
    }
    let Some(mut entry) = reserve::<AcceptData>(kind::ACCEPT) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot.
    unsafe {
        (*ev).info = call_info(kind::ACCEPT, sk, addrs, true);
        (*ev).data = AcceptData { fd: 0, pad: 0 };
    }
    submit(entry);
}

/// Offset of `ret` in every `sys_exit_*` record: the common fields (8
/// bytes), `__syscall_nr` (int) and padding; fixed by the syscall tracepoint
/// format.
const RET_OFFSET: usize = 16;

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    run(&ctx, try_sys_exit_accept);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    run(&ctx, try_sys_exit_accept);
    0
}

fn try_sys_exit_accept(ctx: &TracePointContext) -> Result<(), ()> {
    // SAFETY: `ret` is a long at RET_OFFSET of every sys_exit record.
    let ret: i64 = unsafe { ctx.read_at(RET_OFFSET) }.map_err(|_| ())?;
    if ret < 0 {
        return Err(());
    }
    let fd = ret as u64;
    // SAFETY: helper without arguments; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const c_void;
    let files: *const c_void = read(task, off!(task_files));
    let fdt: *const c_void = read(files, off!(files_fdt));
    let max_fds: u32 = read(fdt, off!(fdt_max_fds));
    if fd >= u64::from(max_fds) {
        return Err(());
    }
    let fds: *const c_void = read(fdt, off!(fdt_fd));
    // SAFETY: only an address computed for bpf_probe_read_kernel.
    let slot = unsafe { fds.cast::<u8>().add(fd as usize * 8) }.cast::<c_void>();
    let file: *const c_void = read(slot, 0);
    let socket: *const c_void = read(file, off!(file_private_data));
    let sk: *const c_void = read(socket, off!(socket_sk));
    if sk.is_null() {
        return Err(());
    }
    let family: u16 = read(sk, off!(skc_family));
    if family != AF_INET && family != AF_INET6 {
        return Err(());
    }
    let port: u16 = read(sk, off!(skc_num));
    if !capture_port(port) {
        return Ok(());
    }
    let Some(mut entry) = reserve::<AcceptData>(kind::ACCEPT) else {
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot; every
    // header field is written.
    unsafe {
        let info = &raw mut (*ev).info;
        (*info).ts_ns = bpf_ktime_get_ns();
        (*info).cookie = 0;
        (*info).kind = kind::ACCEPT;
        (*info).pad = 0;
        fill_sock::<Probe>(info, sk, 0);
        (*info).owner = current_owner(0, true);
        (*ev).data = AcceptData {
            fd: fd as u32,
            pad: 0,
        };
    }
    entry.submit(0);
    Ok(())
}
