//! A socket's flow, read from its `sock_common` window or a tracepoint record.

use observer_common::TcpEvent;

use crate::{
    abi::AF_INET6,
    netns::{netns_inum, netns_of_sock},
    reads::{Copied, record_copy},
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
    let family: u16 = w.get(o.family);
    if family == AF_INET6 {
        event.flow.saddr = w.get(o.v6_rcv_saddr);
        event.flow.daddr = w.get(o.v6_daddr);
    } else {
        event.flow.saddr = v4_mapped(w.get(o.rcv_saddr));
        event.flow.daddr = v4_mapped(w.get(o.daddr));
    }
    event.flow.sport = w.get(o.num);
    event.flow.dport = u16::from_be(w.get(o.dport));
    event.flow.netns = netns_inum(w.get(o.net), slot);
    event.family = family;
    event.state = w.get(o.state);
    Ok(())
}

/// An IPv4 address as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as the tracepoints store
/// it.
#[inline(always)]
pub(crate) fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..16].copy_from_slice(&v4);
    addr
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
