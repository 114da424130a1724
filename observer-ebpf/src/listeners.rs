//! Listeners starting and ending: a socket entering or leaving LISTEN leaves its drop counter
//! and accept queue in `LISTENER_CHANGES`, so that userspace (which reads listeners once a
//! second with sock_diag) counts a listener created during the run from its first drop and one
//! closed between two readings to its last.

use aya_ebpf::{macros::map, maps::LruHashMap};
use observer_common::{
    FIELD_ABSENT, ListenerChange, ListenerChangeKey, ListenerOffsets, TcpEvent, event_kind,
    listener_change,
};

use crate::{
    abi::TCP_LISTEN,
    clock::now_ns,
    counting::new_event,
    reads::{kread, slot},
};

/// One entry per listener start or end, deleted by userspace once accounted for. An LRU map:
/// if userspace falls behind, the oldest changes go (their listeners are then counted from
/// sock_diag alone, as without this map).
#[map]
pub(crate) static LISTENER_CHANGES: LruHashMap<ListenerChangeKey, ListenerChange> =
    LruHashMap::with_max_entries(4096, 0);

/// Records socket `sk` entering (`new` is LISTEN) or leaving LISTEN. Runs only on those
/// transitions (a listen() or a listener's close), never on a connection's.
#[inline(always)]
pub(crate) fn record_listener_change(
    sk: u64,
    new: i32,
    fill: impl FnOnce(&mut TcpEvent) -> Result<(), i32>,
) -> Result<(), i32> {
    let o = config!(listener);
    if o.sk_drops == FIELD_ABSENT {
        return Ok(());
    }
    let now = now_ns();
    // The event slot only carries the flow that `fill` reads; nothing is exported.
    let event = new_event(event_kind::CLOSE, now, slot::SET_STATE)?;
    fill(event)?;
    let key = ListenerChangeKey {
        addr: event.flow.saddr,
        netns: event.flow.netns,
        inode: socket_inode(sk, &o),
        port: event.flow.sport,
        family: event.family,
        change: if new == TCP_LISTEN {
            listener_change::OPENED
        } else {
            listener_change::CLOSED
        },
        _pad: [0; 3],
    };
    let value = ListenerChange {
        time_ns: now,
        drops: drops(sk, &o)?,
        accept_queue: kread(sk + u64::from(o.sk_ack_backlog))?,
        backlog_limit: kread(sk + u64::from(o.sk_max_ack_backlog))?,
        _pad: 0,
    };
    LISTENER_CHANGES.insert(key, value, 0)
}

/// The kernel's `sk_drops_read()`: the per-NUMA counters when the socket has them (6.18+),
/// else `sk_drops`.
#[inline(always)]
fn drops(sk: u64, o: &ListenerOffsets) -> Result<u32, i32> {
    if o.sk_drop_counters != FIELD_ABSENT {
        let counters: u64 = kread(sk + u64::from(o.sk_drop_counters))?;
        if counters != 0 {
            let first: u32 = kread(counters + u64::from(o.numa_drops0))?;
            let second: u32 = kread(counters + u64::from(o.numa_drops1))?;
            return Ok(first.wrapping_add(second));
        }
    }
    kread(sk + u64::from(o.sk_drops))
}

/// The socket's inode number as sock_diag reports it (`sock_i_ino`, truncated to 32 bits as
/// `idiag_inode` is), 0 when the socket has no `struct socket` (orphaned).
#[inline(always)]
fn socket_inode(sk: u64, o: &ListenerOffsets) -> u32 {
    let socket: u64 = kread(sk + u64::from(o.sk_socket)).unwrap_or(0);
    if socket == 0 {
        return 0;
    }
    // The low half of a little-endian `unsigned long` (the BPF target is little-endian).
    kread(socket + u64::from(o.socket_ino)).unwrap_or(0)
}
