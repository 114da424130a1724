//! A packet's flow and TCP flags, read from its `sk_buff` and headers.

use observer_common::{TcpEvent, direction, key_wildcard};

use crate::{
    abi::{AF_INET, AF_INET6, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, TCP_FLAG_ACK, TCP_FLAG_SYN},
    reads::{PACKET_COPY, copy_kernel, kread, scratch, set_address},
    sock::v4_mapped,
};

/// Fills `event` (flow addresses and ports oriented local-first, family, flags, interface,
/// direction) from the TCP/IP headers of `skb`, read from one copy of its `sk_buff` window and
/// one copy of its headers. Returns the packet's device, or None when it is not TCP over
/// IPv4/IPv6 (with `check_protocol`, judged first by `skb->protocol`).
#[inline(always)]
pub(crate) fn read_packet(
    skb: u64,
    event: &mut TcpEvent,
    check_protocol: bool,
    slot: u32,
) -> Result<Option<u64>, i32> {
    if skb == 0 {
        return Err(-22);
    }
    let packet = config!(packet);
    let s = scratch(slot)?;
    // SAFETY: live per-CPU map value; only field addresses are taken.
    let (skb_buf, packet_buf) = unsafe {
        (
            (&raw mut (*s).skb).cast::<u8>(),
            (&raw mut (*s).packet).cast::<u8>(),
        )
    };
    let window = copy_kernel(
        skb_buf,
        skb + u64::from(packet.skb_window_start),
        packet.skb_window_len,
    )?;
    let at = |offset: u16| offset.wrapping_sub(packet.skb_window_start);
    if check_protocol {
        let protocol = u16::from_be(window.get(at(packet.skb_protocol)));
        if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
            return Ok(None);
        }
    }
    let head: u64 = window.get(at(packet.skb_head));
    let network: u16 = window.get(at(packet.skb_network_header));
    let transport: u16 = window.get(at(packet.skb_transport_header));
    let ifindex: i32 = window.get(at(packet.skb_iif));
    let dev: u64 = window.get(at(packet.skb_dev));
    let ip = head + u64::from(network);
    let hdr = copy_kernel(packet_buf, ip, PACKET_COPY)?;
    let first: u8 = hdr.get(0);
    // A received packet's destination is this host: orient the flow as the kernel names
    // sockets (s = local).
    let inbound = ifindex > 0;
    let (local, remote) = if inbound {
        (&raw mut event.flow.daddr, &raw mut event.flow.saddr)
    } else {
        (&raw mut event.flow.saddr, &raw mut event.flow.daddr)
    };
    // The header copy is 8-aligned and the addresses are at 4-aligned offsets of it.
    let (local_words, remote_words, header_len) = match first >> 4 {
        4 => {
            if hdr.get::<u8>(9) != IPPROTO_TCP {
                return Ok(None);
            }
            event.family = AF_INET;
            (
                v4_mapped(hdr.get_aligned(12)),
                v4_mapped(hdr.get_aligned(16)),
                u16::from(first & 0x0f) * 4,
            )
        }
        6 => {
            // Extension headers are not followed: TCP directly after the fixed header only.
            if hdr.get::<u8>(6) != IPPROTO_TCP {
                return Ok(None);
            }
            event.family = AF_INET6;
            (hdr.get_address(8), hdr.get_address(24), 40)
        }
        _ => return Ok(None),
    };
    // SAFETY: both point at the event's addresses, which are 8-aligned.
    unsafe {
        set_address(local, local_words);
        set_address(remote, remote_words);
    }
    // Prefer the kernel's transport header when it has been set past the network header.
    let l4 = if transport != u16::MAX && transport > network {
        transport - network
    } else {
        header_len
    };
    let tcp: [u8; 14] = if l4 + 14 <= PACKET_COPY {
        hdr.get(l4)
    } else {
        // IP options push TCP beyond the copy.
        kread(ip + u64::from(l4))?
    };
    let (src_port, dst_port) = (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    (event.flow.sport, event.flow.dport) = if inbound {
        (dst_port, src_port)
    } else {
        (src_port, dst_port)
    };
    event.tcp_flags = tcp[13];
    event.ifindex = ifindex as u32;
    // A dropped SYN or SYN-ACK belongs to a handshake: counted without the connecting side's
    // port (a SYN is sent by the connecting side, a SYN-ACK to it).
    event.key_wildcard = match (tcp[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK), inbound) {
        (TCP_FLAG_SYN, true) => key_wildcard::REMOTE_PORT,
        (TCP_FLAG_SYN, false) => key_wildcard::LOCAL_PORT,
        (f, true) if f == TCP_FLAG_SYN | TCP_FLAG_ACK => key_wildcard::LOCAL_PORT,
        (f, false) if f == TCP_FLAG_SYN | TCP_FLAG_ACK => key_wildcard::REMOTE_PORT,
        _ => key_wildcard::NONE,
    };
    event.aux8 = if inbound {
        direction::INBOUND
    } else {
        direction::OUTBOUND
    };
    Ok(Some(dev))
}
