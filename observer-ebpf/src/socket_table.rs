//! `SOCKETS`: connections followed between state changes (connect latency, lifetime).

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{macros::map, maps::Array};
use observer_common::{SOCKET_WAYS, SocketSet, SocketState, SocketWay, socket_set};

use crate::counting::{MapStat, count_map_stat};

/// Per-socket state between state changes: a set-associative table indexed by the socket's
/// address ([`socket_set`]). Userspace sizes it like the flow map and sets
/// `tables.socket_sets_mask`.
#[map]
pub(crate) static SOCKETS: Array<SocketSet> = Array::with_max_entries(16_384, 0);

/// The `SOCKETS` set of socket `sk`.
#[inline(always)]
pub(crate) fn socket_set_of(sk: u64) -> Option<*mut SocketSet> {
    SOCKETS.get_ptr_mut(socket_set(sk, config!(tables.socket_sets_mask)))
}

/// The socket address held by a way, which other CPUs claim and free concurrently.
///
/// # Safety
/// `way` must point into a live map value.
#[inline(always)]
pub(crate) unsafe fn way_owner(way: *mut SocketWay) -> u64 {
    // SAFETY: guaranteed by the caller. An aligned 64-bit load is single-copy atomic on BPF;
    // volatile keeps it a fresh load (LLVM's BPF backend has no atomic load at CPU v3).
    unsafe { core::ptr::read_volatile(&raw const (*way).sk) }
}

/// Makes `way` hold `new` if it holds `old` (BPF_CMPXCHG, atomic across CPUs).
///
/// # Safety
/// `way` must point into a live map value.
#[inline(always)]
pub(crate) unsafe fn claim_way(way: *mut SocketWay, old: u64, new: u64) -> bool {
    // SAFETY: guaranteed by the caller; the field is an aligned u64.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*way).sk,
            old,
            new,
        )
        .1
    }
}

/// The state of socket `sk` if it is followed, else null. (A pointer, not an `Option`: LLVM
/// carries an `Option`'s pointer and tag in two registers and spills the undefined pointer of
/// a None, which the verifier refuses to read.)
#[inline(always)]
pub(crate) fn followed_socket(sk: u64) -> *mut SocketState {
    let mut found = core::ptr::null_mut();
    if let Some(set) = socket_set_of(sk) {
        let mut i = 0;
        while i < SOCKET_WAYS {
            // SAFETY: a live map value; only field addresses are taken.
            unsafe {
                let way = &raw mut (*set).ways[i];
                if way_owner(way) == sk {
                    found = &raw mut (*way).state;
                }
            }
            i += 1;
        }
    }
    found
}

/// Starts following socket `sk`, whose [`followed_socket`] lookup the caller made: `existing`.
/// A way already holding it is a socket freed without a close we saw, whose address was
/// reused: its state is replaced. In a full set, the way opened longest ago is evicted and
/// counted: that connection's report is lost.
#[inline(always)]
pub(crate) fn track_socket(sk: u64, existing: *mut SocketState, state: &SocketState) {
    if !existing.is_null() {
        // SAFETY: a live map value of this socket.
        unsafe { *existing = *state };
        return;
    }
    let Some(set) = socket_set_of(sk) else {
        return;
    };
    let mut i = 0;
    let mut oldest = 0;
    let mut oldest_ns = u64::MAX;
    while i < SOCKET_WAYS {
        // SAFETY: a live map value; only field addresses are taken. A way's state is written
        // only by the CPU that claimed the way.
        unsafe {
            let way = &raw mut (*set).ways[i];
            if claim_way(way, 0, sk) {
                (*way).state = *state;
                return;
            }
            let opened = (*way).state.opened_ns;
            if opened < oldest_ns {
                oldest_ns = opened;
                oldest = i;
            }
        }
        i += 1;
    }
    count_map_stat(MapStat::SocketsEvicted);
    // SAFETY: as above; the index is masked below SOCKET_WAYS.
    unsafe {
        let way = &raw mut (*set).ways[oldest % SOCKET_WAYS];
        let victim = way_owner(way);
        // Another CPU may have taken or freed the way meanwhile: this socket then goes
        // unfollowed, which the eviction just counted stands for.
        if victim != 0 && claim_way(way, victim, sk) {
            (*way).state = *state;
        }
    }
}

/// Stops following socket `sk` (closed, or its connect failed).
#[inline(always)]
pub(crate) fn untrack_socket(sk: u64) {
    let Some(set) = socket_set_of(sk) else {
        return;
    };
    let mut i = 0;
    while i < SOCKET_WAYS {
        // SAFETY: a live map value; only a field address is taken.
        if unsafe { claim_way(&raw mut (*set).ways[i], sk, 0) } {
            return;
        }
        i += 1;
    }
}
