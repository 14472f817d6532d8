//! conn-tracer's kernel programs.
//!
//! Only hooks that load on a locked-down kernel without kprobes or fentry:
//! BTF tracepoints (`tp_btf`), which hand the programs a typed `struct sock *`
//! so that socket-local storage and the socket cookie can be used on it.
//!
//! On the host (`cargo clippy --workspace`, `cargo test --workspace`) the crate
//! compiles as an ordinary binary that only says where it belongs, so that
//! workspace-wide lints cover the kernel code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod accept;
mod errors;
mod iter;
mod maps;
mod probes;
mod resets;
mod rx;
mod sock;
mod sockopt;
mod state;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "tracer-ebpf holds kernel programs; tracer-user/build.rs builds it for bpfel-unknown-none"
    );
}
