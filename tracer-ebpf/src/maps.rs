//! Maps shared by all programs, and the one way events leave the kernel.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    btf_maps::{PerCpuArray, RingBuf},
    helpers::generated::bpf_sk_storage_get,
    macros::btf_map,
};
use tracer_common::{DEFAULT_RING_BYTES, Event, SockState, kind};

/// Every event, in order of reservation. Userspace may resize it at load time.
#[btf_map]
pub static EVENTS: RingBuf<u8, { DEFAULT_RING_BYTES as usize }> = RingBuf::new();

/// Events that could not be reserved in [`EVENTS`], per CPU, indexed by kind.
#[btf_map]
pub static LOST: PerCpuArray<u64, { kind::SLOTS as usize }> = PerCpuArray::new();

const BPF_MAP_TYPE_SK_STORAGE: usize = 24;
const BPF_F_NO_PREALLOC: usize = 1;
/// Copy the value to sockets cloned from this one: accepted sockets inherit
/// their listener's owner.
const BPF_F_CLONE: usize = 1 << 9;
const BPF_SK_STORAGE_GET_F_CREATE: u64 = 1;

/// `BPF_MAP_TYPE_SK_STORAGE` with `BPF_F_CLONE`, laid out as a BTF map
/// definition (aya-ebpf's own `SkStorage` fixes the flags to NO_PREALLOC and
/// only takes a `sock_addr` context).
#[repr(C)]
pub struct SockStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE],
    key: *const i32,
    value: *const SockState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC | BPF_F_CLONE],
}

// SAFETY: the fields are BTF placeholders that are never dereferenced.
unsafe impl Sync for SockStorage {}

impl SockStorage {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    /// The state stored on `sk` (created zeroed when `create` is set), or
    /// NULL. `sk` must be a socket pointer the verifier knows as one (a BTF
    /// `struct sock *` from a tracepoint, or a sockopt context's `sk`).
    #[inline(always)]
    pub fn get_ptr(&self, sk: *const c_void, create: bool) -> *mut SockState {
        let flags = if create {
            BPF_SK_STORAGE_GET_F_CREATE
        } else {
            0
        };
        let map = ptr::from_ref(self).cast_mut().cast::<c_void>();
        // SAFETY: the helper checks `sk` (NULL or not a full socket -> NULL).
        unsafe { bpf_sk_storage_get(map, sk.cast_mut(), ptr::null_mut(), flags) }
            .cast::<SockState>()
    }
}

/// Owner and lifecycle facts of every socket the tracer has seen.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
pub static SOCKS: SockStorage = SockStorage::new();

/// Reserves an event in [`EVENTS`], or counts it lost.
#[inline(always)]
pub fn reserve<T: 'static>(
    event_kind: u16,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<Event<T>>> {
    let entry = EVENTS.reserve_untyped::<Event<T>>(0);
    if entry.is_none() {
        count_lost(event_kind);
    }
    entry
}

#[inline(always)]
fn count_lost(event_kind: u16) {
    if let Some(slot) = LOST.get_ptr_mut(u32::from(event_kind) % kind::SLOTS) {
        // SAFETY: per-CPU slot of this CPU; no other writer while we run.
        unsafe { *slot += 1 };
    }
}
