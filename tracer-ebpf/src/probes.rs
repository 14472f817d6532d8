//! Feature probes: tiny programs userspace loads (never attaches) to learn
//! whether this kernel lets tracing programs call a helper, before it sets
//! the `CONFIG` global the real programs branch on. A load that the
//! verifier refuses means "not on this kernel".

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_comm, generated::bpf_get_socket_cookie},
    macros::{btf_tracepoint, cgroup_sockopt},
    programs::{BtfTracePointContext, SockoptContext},
};

use crate::maps::SOCKS;

/// `bpf_sk_storage_get` from a tracing program (Linux 5.11+).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn probe_sk_storage(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    i32::from(!SOCKS.get_ptr(sk, false).is_null())
}

/// `bpf_get_socket_cookie` from a tracing program (Linux 5.12+).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn probe_socket_cookie(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's socket.
    (unsafe { bpf_get_socket_cookie(sk.cast_mut()) } & 1) as i32
}

/// `bpf_get_current_pid_tgid` and `bpf_get_current_comm` from a cgroup
/// setsockopt program (Linux 5.11+). Allows every call.
#[cgroup_sockopt(setsockopt)]
pub fn probe_sockopt_task(_ctx: SockoptContext) -> i32 {
    let pid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let comm = bpf_get_current_comm().unwrap_or_default();
    1 | i32::from(pid == 0 && comm[0] == 0)
}
