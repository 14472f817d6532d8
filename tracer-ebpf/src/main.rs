//! conn-tracer's kernel programs.
//!
//! Only hooks that load on a locked-down kernel without kprobes or fentry:
//! BTF tracepoints (`tp_btf`), which hand the programs a typed `struct sock *`
//! so that socket-local storage and the socket cookie can be used on it.
#![no_std]
#![no_main]

mod errors;
mod maps;
mod resets;
mod sock;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
