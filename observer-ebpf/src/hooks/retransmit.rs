//! `tcp:tcp_retransmit_skb` and `tcp:tcp_retransmit_synack`.

use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{ARG_ABSENT, FIELD_ABSENT, TCP_SYN_SENT, TcpEvent, event_kind};

use crate::{
    abi::TCP_SYN_RECV,
    clock::tick_now_ns,
    counting::{Counter, new_event, record, run},
    reads::{arg, kread, raw_args, record_of, slot},
    sock::{fill_from_record, fill_from_sock},
    socket_table::followed_socket,
};

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    run(event_kind::RETRANSMIT, || {
        let layout = config!(retransmit_skb);
        let rec = record_of(&ctx, layout.record_size, slot::RETRANSMIT_SKB)?;
        let sk: u64 = rec.get(layout.skaddr);
        let event = new_event(event_kind::RETRANSMIT, tick_now_ns(), slot::RETRANSMIT_SKB)?;
        fill_from_record(event, rec, layout.tuple(), sk, slot::RETRANSMIT_SKB);
        event.state = rec.get::<i32>(layout.state) as u8;
        if layout.err != FIELD_ABSENT {
            event.err = rec.get(layout.err);
        }
        on_retransmit(&ctx, event, sk, rec.get(layout.skbaddr))
    })
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn raw_tcp_retransmit_skb(ctx: RawTracePointContext) -> u32 {
    run(event_kind::RETRANSMIT, || {
        let a = config!(raw.retransmit_skb);
        // (sk, skb) everywhere; `int err` since 6.12.
        let args = if a.reason == ARG_ABSENT {
            raw_args::<2>(&ctx)
        } else {
            raw_args::<3>(&ctx)
        };
        let sk = arg(&args, a.sk);
        let event = new_event(event_kind::RETRANSMIT, tick_now_ns(), slot::RETRANSMIT_SKB)?;
        fill_from_sock(event, sk, slot::RETRANSMIT_SKB)?;
        event.err = arg(&args, a.reason) as i32;
        on_retransmit(&ctx, event, sk, arg(&args, a.skb))
    })
}

/// `event` has its flow, state and error set.
pub(crate) fn on_retransmit<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
    sk: u64,
    skb: u64,
) -> Result<(), i32> {
    if event.state == TCP_SYN_SENT {
        event.kind = event_kind::SYN_RETRANSMIT;
        // Remember for the connect's outcome how many SYNs it took.
        let s = followed_socket(sk);
        if event.err == 0 && !s.is_null() {
            // SAFETY: live map value; a lost race only miscounts the informational field.
            unsafe { (*s).syn_retransmits += 1 };
        }
    } else {
        // tcp_skb_pcount(skb): one retransmitted skb may carry several segments.
        let cb = skb + u64::from(config!(offsets.skb_cb));
        event.segs = u32::from(
            kread::<u16>(cb + u64::from(config!(offsets.tcp_skb_cb_gso_segs)))
                .unwrap_or(1)
                .max(1),
        );
    }
    let counter = match (event.kind, event.err) {
        (_, e) if e != 0 => Counter::RetransFailed,
        (event_kind::SYN_RETRANSMIT, _) => Counter::SynRetrans,
        _ => Counter::RetransSegs,
    };
    record(ctx, event, counter);
    Ok(())
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    run(event_kind::SYNACK_RETRANSMIT, || {
        let layout = config!(retransmit_synack);
        let rec = record_of(&ctx, layout.record_size, slot::RETRANSMIT_SYNACK)?;
        let event = new_event(
            event_kind::SYNACK_RETRANSMIT,
            tick_now_ns(),
            slot::RETRANSMIT_SYNACK,
        )?;
        fill_from_record(
            event,
            rec,
            layout.tuple(),
            rec.get(layout.skaddr),
            slot::RETRANSMIT_SYNACK,
        );
        on_synack_retransmit(&ctx, event)
    })
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_synack")]
pub fn raw_tcp_retransmit_synack(ctx: RawTracePointContext) -> u32 {
    run(event_kind::SYNACK_RETRANSMIT, || {
        let a = config!(raw.retransmit_synack);
        let args = raw_args::<2>(&ctx);
        let event = new_event(
            event_kind::SYNACK_RETRANSMIT,
            tick_now_ns(),
            slot::RETRANSMIT_SYNACK,
        )?;
        // The request socket holds the half-open connection's addresses and namespace.
        fill_from_sock(event, arg(&args, a.extra), slot::RETRANSMIT_SYNACK)?;
        on_synack_retransmit(&ctx, event)
    })
}

pub(crate) fn on_synack_retransmit<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
) -> Result<(), i32> {
    event.state = TCP_SYN_RECV as u8;
    record(ctx, event, Counter::SynackRetrans);
    Ok(())
}
