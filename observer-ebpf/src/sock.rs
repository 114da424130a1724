//! A socket's flow, read from its `sock_common` window or a tracepoint record.

use observer_common::TcpEvent;

use crate::{
    abi::AF_INET6,
    netns::{netns_inum, netns_of_sock},
    reads::{Copied, record_copy, set_address},
};

/// Sets `event`'s flow, family and state from `sk` (a `sock`, `request_sock` or
/// `inet_timewait_sock`, which all begin with `struct sock_common`), read from one copy of its
/// `sock_common` window. Oriented as the kernel's tracepoints orient a socket: s = local.
#[inline(always)]
pub(crate) fn fill_from_sock(event: &mut TcpEvent, sk: u64, slot: u32) -> Result<(), i32> {
    if sk == 0 {
        return Err(-22);
    }
    let o = config!(raw.sock);
    let w = record_copy(sk, o.window_len, slot)?;
    let family: u16 = w.get_aligned(o.family);
    let (saddr, daddr) = if family == AF_INET6 {
        (w.get_address(o.v6_rcv_saddr), w.get_address(o.v6_daddr))
    } else {
        (
            v4_mapped(w.get_aligned(o.rcv_saddr)),
            v4_mapped(w.get_aligned(o.daddr)),
        )
    };
    // SAFETY: the event's addresses are 8-aligned (TcpEvent is, and they are at 0 and 16).
    unsafe {
        set_address(&raw mut event.flow.saddr, saddr);
        set_address(&raw mut event.flow.daddr, daddr);
    }
    event.flow.sport = w.get_aligned(o.num);
    event.flow.dport = u16::from_be(w.get_aligned(o.dport));
    event.flow.netns = netns_inum(w.get_aligned(o.net), slot);
    event.family = family;
    event.state = w.get_aligned(o.state);
    Ok(())
}

/// An IPv4 address (as the socket stores it, network order) as the words of an IPv4-mapped
/// IPv6 address (`::ffff:a.b.c.d`), as the tracepoints store it.
#[inline(always)]
pub(crate) fn v4_mapped(v4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
}

/// Sets `event`'s flow and family from a tracepoint record whose addresses are
/// `saddr_v6`/`daddr_v6` copies, from the offsets of `[saddr_v6, daddr_v6, sport, dport, family]`,
/// in socket `sk`'s namespace.
#[inline(always)]
pub(crate) fn fill_from_record(
    event: &mut TcpEvent,
    rec: Copied,
    [saddr, daddr, sport, dport, family]: [u16; 5],
    sk: u64,
    slot: u32,
) {
    event.flow.saddr = rec.get(saddr);
    event.flow.daddr = rec.get(daddr);
    event.flow.sport = rec.get(sport);
    event.flow.dport = rec.get(dport);
    event.flow.netns = netns_of_sock(sk, slot);
    event.family = rec.get(family);
}
