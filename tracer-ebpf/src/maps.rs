//! Maps shared by all programs, and the one way events leave the kernel.

use core::{ffi::c_void, num::NonZeroU64, ptr};

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::generated::{bpf_ringbuf_query, bpf_sk_storage_get},
    macros::btf_map,
    maps::ring_buf::RingBufEntry,
};
use tracer_common::{
    DEFAULT_RING_BYTES, DEFAULT_STATE_HASH_ENTRIES, Event, ListenKey, ListenOwner, Owner,
    SockState, kind,
};

use crate::sock::{Kmem, ZERO_MAX_BYTES, config, fill_info, reset_state, state_in_hash, zero};

// `zero` clears a whole fresh state at once.
const _: () = assert!(size_of::<SockState>() <= ZERO_MAX_BYTES);

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

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC;
const BPF_NOEXIST: u64 = 1;

/// The same facts where tracing programs cannot use socket storage (before
/// 5.11), keyed by the socket's address and removed at its CLOSE. Sized by
/// userspace (1 entry when unused); allocated per socket, not up front.
#[btf_map]
pub static SOCK_STATES: HashMap<
    u64,
    SockState,
    { DEFAULT_STATE_HASH_ENTRIES as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Owners of listening sockets by (netns, port), for the sockets they
/// accept, where socket storage cannot be cloned to them (before 5.11).
#[btf_map]
pub static LISTENERS: HashMap<ListenKey, ListenOwner, 16384, NO_PREALLOC> = HashMap::new();

/// The state of socket `sk` (whose address is `addr`), created zeroed when
/// `create` is set; NULL when it has none or none could be made (counted).
#[inline(always)]
pub fn state_of(sk: *const c_void, addr: u64, create: bool) -> *mut SockState {
    let state = if state_in_hash() {
        match SOCK_STATES.get_ptr_mut(addr) {
            Some(p) => p,
            None if create => {
                let mut fresh = core::mem::MaybeUninit::<SockState>::uninit();
                let p = fresh.as_mut_ptr();
                // Word stores, not a memset call (see `zero`).
                zero(p.cast(), size_of::<SockState>());
                // SAFETY: every byte was zeroed above.
                let fresh = unsafe { fresh.assume_init_ref() };
                if SOCK_STATES.insert(addr, fresh, BPF_NOEXIST).is_err() {
                    // Full (or a racing insert, which the lookup finds).
                }
                SOCK_STATES.get_ptr_mut(addr).unwrap_or(ptr::null_mut())
            }
            None => ptr::null_mut(),
        }
    } else {
        SOCKS.get_ptr(sk, create)
    };
    if create && state.is_null() {
        count_lost(kind::NO_STATE_SLOT as u16);
    }
    state
}

/// Forgets the state of a socket that reached CLOSE (the fallback map
/// only: socket storage is freed with the socket).
#[inline(always)]
pub fn forget_state(addr: u64) {
    if state_in_hash() {
        let _ = SOCK_STATES.remove(addr);
    }
}

/// Registers a new listener's owner for the sockets it will accept (the
/// fallback store only).
#[inline(always)]
pub fn register_listener(netns: u32, port: u16, addr: u64, owner: Owner) {
    if state_in_hash() {
        let key = ListenKey {
            netns,
            port,
            pad: 0,
        };
        let _ = LISTENERS.insert(key, ListenOwner { owner, addr }, 0);
    }
}

/// The owner a socket accepted on (netns, port) inherits (fallback store).
#[inline(always)]
pub fn listener_owner(netns: u32, port: u16) -> Option<Owner> {
    let key = ListenKey {
        netns,
        port,
        pad: 0,
    };
    // SAFETY: the value is only read, copied out at once.
    unsafe { LISTENERS.get(key) }.map(|l| l.owner)
}

/// Removes a closing listener's entry, unless another listener on the same
/// port (SO_REUSEPORT) registered since.
#[inline(always)]
pub fn unregister_listener(netns: u32, port: u16, addr: u64) {
    if !state_in_hash() {
        return;
    }
    let key = ListenKey {
        netns,
        port,
        pad: 0,
    };
    // SAFETY: read once.
    if unsafe { LISTENERS.get(key) }.is_some_and(|l| l.addr == addr) {
        let _ = LISTENERS.remove(key);
    }
}

/// A fresh state for an accepted socket owned like its listener.
#[inline(always)]
pub fn inherit(st: *mut SockState, listener: Owner) {
    let mut owner = listener;
    owner.flags = (owner.flags & !tracer_common::owner_flags::LISTENER)
        | tracer_common::owner_flags::INHERITED;
    reset_state(st, owner);
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// What a record takes in the ring: its 8-byte header, then the record
/// rounded up to 8 bytes.
const fn ring_len<T>() -> u64 {
    (8 + size_of::<T>() as u64).next_multiple_of(8)
}

/// Submits a reserved event. With a wake-up threshold set
/// ([`tracer_common::TracerConfig::wake_bytes`]) the reader is not woken
/// (no irq_work, an inter-processor interrupt on the connection's path)
/// unless this record brings the unread data across a multiple of the
/// threshold: a reader that falls behind is woken once per threshold's
/// worth of records, never once per record (an interrupt storm exactly when
/// the machine is too busy to run it).
#[inline(always)]
pub fn submit<T>(entry: RingBufEntry<T>) {
    let Some(wake) = NonZeroU64::new(u64::from(config!(wake_bytes))) else {
        // The kernel's default: wake a reader that has caught up.
        entry.submit(0);
        return;
    };
    let map = ptr::from_ref(&EVENTS).cast_mut().cast::<c_void>();
    // SAFETY: the helper only reads the ring's positions.
    let unread = unsafe { bpf_ringbuf_query(map, BPF_RB_AVAIL_DATA) };
    let before = unread.saturating_sub(ring_len::<T>());
    // `wake` is a power of two: the two counts fall in different multiples
    // of it exactly when they differ in a bit at or above it (no division,
    // which costs more than the rest of the submit).
    entry.submit(if unread ^ before >= wake.get() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    });
}

/// Reserves an event in [`EVENTS`], or counts it lost.
#[inline(always)]
pub fn reserve<T: 'static>(event_kind: u16) -> Option<RingBufEntry<Event<T>>> {
    let entry = EVENTS.reserve_untyped::<Event<T>>(0);
    if entry.is_none() {
        count_lost(event_kind);
    }
    entry
}

/// One event of `event_kind` about socket `sk` (at `addr`, with its
/// `state`), carrying `data`: the header from the socket's fields read
/// through `K` at `fields`. A full ring counts it as lost.
#[inline(always)]
pub fn emit<K: Kmem, T: 'static>(
    event_kind: u16,
    sk: *const c_void,
    addr: u64,
    fields: *const c_void,
    now: u64,
    state: *const SockState,
    data: T,
) -> Result<(), ()> {
    let Some(mut entry) = reserve::<T>(event_kind) else {
        return Err(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, correctly sized ring buffer slot.
    unsafe {
        fill_info::<K>(
            &raw mut (*ev).info,
            sk,
            addr,
            fields,
            event_kind,
            now,
            state,
        );
        (*ev).data = data;
    }
    submit(entry);
    Ok(())
}

#[inline(always)]
pub fn count_lost(event_kind: u16) {
    if let Some(slot) = LOST.get_ptr_mut(u32::from(event_kind) % kind::SLOTS) {
        // SAFETY: per-CPU slot of this CPU; no other writer while we run.
        unsafe { *slot += 1 };
    }
}
