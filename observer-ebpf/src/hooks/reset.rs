//! `tcp:tcp_receive_reset` and `tcp:tcp_send_reset`.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{
    ARG_ABSENT, FIELD_ABSENT, SEND_RESET_SOCKADDR, TCP_SYN_SENT, TcpEvent, event_kind, key_wildcard,
};

use crate::{
    abi::{AF_INET, TCP_LISTEN, TCP_NEW_SYN_RECV, TCP_SYN_RECV},
    clock::tick_now_ns,
    counting::{Counter, new_event, record, run},
    netns::{netns_of_dev, netns_of_sock},
    packet::read_packet,
    reads::{Copied, arg, kread, raw_args, record_of, slot},
    sock::{fill_from_record, fill_from_sock, v4_mapped},
};

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    run(event_kind::RESET_RECEIVED, || {
        let layout = config!(receive_reset);
        let rec = record_of(&ctx, layout.record_size, slot::RECEIVE_RESET)?;
        let sk: u64 = rec.get(layout.skaddr);
        let event = new_event(
            event_kind::RESET_RECEIVED,
            tick_now_ns(),
            slot::RECEIVE_RESET,
        )?;
        fill_from_record(event, rec, layout.tuple(), sk, slot::RECEIVE_RESET);
        // The record has no socket state: read it from the socket.
        event.state = kread(sk + u64::from(config!(offsets.sock_state))).unwrap_or(0);
        on_receive_reset(&ctx, event)
    })
}

#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn raw_tcp_receive_reset(ctx: RawTracePointContext) -> u32 {
    run(event_kind::RESET_RECEIVED, || {
        let a = config!(raw.receive_reset);
        let args = raw_args::<1>(&ctx);
        let event = new_event(
            event_kind::RESET_RECEIVED,
            tick_now_ns(),
            slot::RECEIVE_RESET,
        )?;
        fill_from_sock(event, arg(&args, a.sk), slot::RECEIVE_RESET)?;
        on_receive_reset(&ctx, event)
    })
}

/// `event` has its flow and the socket's state set.
pub(crate) fn on_receive_reset<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
) -> Result<(), i32> {
    // A connect's outcome is not remembered here: the state change that follows the RST reads
    // it from the socket's error (ECONNREFUSED), which saves a map lookup per RST.
    // A RST answering our SYN is a handshake event, counted per peer and service port.
    if event.state == TCP_SYN_SENT {
        event.key_wildcard = key_wildcard::LOCAL_PORT;
    }
    record(ctx, event, Counter::ResetsReceived);
    Ok(())
}

/// Address and port out of a `struct sockaddr_in`/`sockaddr_in6` copy at `offset` of the record:
/// (family, port, address as IPv6 or IPv4-mapped).
#[inline(always)]
pub(crate) fn read_sockaddr(rec: Copied, offset: u16) -> (u16, u16, [u8; 16]) {
    let family: u16 = rec.get(offset);
    let port_be: u16 = rec.get(offset + 2);
    let addr = if family == AF_INET {
        // SAFETY: four u32s and sixteen bytes are the same plain data.
        unsafe {
            core::mem::transmute::<[u32; 4], [u8; 16]>(v4_mapped(u32::from_ne_bytes(
                rec.get(offset + 4),
            )))
        }
    } else {
        rec.get(offset + 8)
    };
    (family, u16::from_be(port_be), addr)
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    run(event_kind::RESET_SENT, || try_send_reset(&ctx))
}

pub(crate) fn try_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = config!(send_reset);
    let rec = record_of(ctx, layout.record_size, slot::SEND_RESET)?;
    let sk: u64 = rec.get(layout.skaddr);
    let event = new_event(event_kind::RESET_SENT, tick_now_ns(), slot::SEND_RESET)?;
    event.state = rec.get::<i32>(layout.state) as u8;
    let reason: u32 = if layout.reason == FIELD_ABSENT {
        0
    } else {
        rec.get(layout.reason)
    };
    if layout.style == SEND_RESET_SOCKADDR {
        let (family, sport, saddr) = read_sockaddr(rec, layout.saddr);
        let (_, dport, daddr) = read_sockaddr(rec, layout.daddr);
        event.family = family;
        (event.flow.saddr, event.flow.sport) = (saddr, sport);
        (event.flow.daddr, event.flow.dport) = (daddr, dport);
    } else {
        event.flow.saddr = rec.get(layout.saddr);
        event.flow.daddr = rec.get(layout.daddr);
        event.flow.sport = rec.get(layout.sport);
        event.flow.dport = rec.get(layout.dport);
    }
    event.flow.netns = if sk != 0 {
        netns_of_sock(sk, slot::SEND_RESET)
    } else {
        // No socket (e.g. a SYN to a closed port): the answered packet's device names the
        // namespace.
        let skb: u64 = rec.get(layout.skbaddr);
        if skb == 0 {
            0
        } else {
            netns_of_dev(
                kread::<u64>(skb + u64::from(config!(packet.skb_dev))).unwrap_or(0),
                slot::SEND_RESET,
            )
        }
    };
    on_send_reset(ctx, event, sk, reason)
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn raw_tcp_send_reset(ctx: RawTracePointContext) -> u32 {
    run(event_kind::RESET_SENT, || {
        let a = config!(raw.send_reset);
        // (sk, skb) everywhere; `enum sk_rst_reason` since 6.10.
        let args = if a.reason == ARG_ABSENT {
            raw_args::<2>(&ctx)
        } else {
            raw_args::<3>(&ctx)
        };
        let sk = arg(&args, a.sk);
        let event = new_event(event_kind::RESET_SENT, tick_now_ns(), slot::SEND_RESET)?;
        if sk != 0 {
            fill_from_sock(event, sk, slot::SEND_RESET)?;
        } else {
            // No socket (e.g. a SYN to a closed port): the flow is the answered packet's,
            // oriented local-first, in its device's namespace.
            let Some(dev) = read_packet(arg(&args, a.skb), event, false, slot::SEND_RESET)? else {
                return Ok(());
            };
            event.flow.netns = netns_of_dev(dev, slot::SEND_RESET);
            // Only the drop program's events carry the packet's details.
            event.tcp_flags = 0;
            event.ifindex = 0;
            event.aux8 = 0;
        }
        on_send_reset(&ctx, event, sk, arg(&args, a.reason) as u32)
    })
}

/// `event` has its flow and the socket's state (0 without one) set.
pub(crate) fn on_send_reset<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
    sk: u64,
    reason: u32,
) -> Result<(), i32> {
    event.reason = reason;
    // A RST without a socket, or from a listener or half-open socket, answers a handshake;
    // one from a connecting socket answers its peer's SYN-ACK.
    event.key_wildcard = match i32::from(event.state) {
        _ if sk == 0 => key_wildcard::REMOTE_PORT,
        TCP_LISTEN | TCP_SYN_RECV | TCP_NEW_SYN_RECV => key_wildcard::REMOTE_PORT,
        s if s == i32::from(TCP_SYN_SENT) => key_wildcard::LOCAL_PORT,
        _ => key_wildcard::NONE,
    };
    record(ctx, event, Counter::ResetsSent);
    Ok(())
}
