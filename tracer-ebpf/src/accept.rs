//! Which thread accepted a connection on a mesh capture port, from the
//! `syscalls:sys_exit_accept4` and `sys_exit_accept` tracepoints (process
//! context: the current task is the accepting thread).
//!
//! A proxy handles a connection on the thread that accepted it, so the
//! connection that thread opens next for it is its upstream leg: userspace
//! pairs the sidecar's two sockets by this. The syscall returns a file
//! descriptor; the socket behind it is read from the task's file table
//! (`task->files->fdt->fd[fd]->private_data->sk`, offsets from BTF) with
//! `bpf_probe_read_kernel`. Only accepts whose local port is a capture
//! port are sent: a few per proxied connection, none elsewhere.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_current_task, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{AF_INET, AF_INET6, AcceptData, kind};

use crate::{
    maps::reserve,
    sock::{Probe, config, current_owner, fill_sock, off, read, run},
};

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
    if port == 0
        || (port != config!(outbound_capture_port) && port != config!(inbound_capture_port))
    {
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
        fill_sock::<Probe>(info, sk);
        (*info).owner = current_owner(0, true);
        (*ev).data = AcceptData {
            fd: fd as u32,
            pad: 0,
        };
    }
    entry.submit(0);
    Ok(())
}
