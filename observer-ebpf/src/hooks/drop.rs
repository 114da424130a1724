//! `skb:kfree_skb`: drops with a reason.

use aya_ebpf::{
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{
    ARG_ABSENT, FIELD_ABSENT, MAX_DROP_REASONS, NetnsReason, drop_filter, event_kind,
};

use crate::{
    abi::{ETH_P_IP, ETH_P_IPV6},
    clock::tick_now_ns,
    counting::{Counter, MapStat, atomic_add, count_map_stat, entry, new_event, record, run},
    netns::{netns_of_dev, netns_of_sock},
    packet::read_packet,
    reads::{arg, raw_args, record_of, slot},
};

/// Drop reasons to report (index: `enum skb_drop_reason` value; non-zero: report). Filled by
/// userspace from reason names, so the kernel's numbering never matters here.
#[map]
pub(crate) static DROP_REASON_FILTER: Array<u8> = Array::with_max_entries(MAX_DROP_REASONS, 0);

/// Per-CPU count of reported TCP drops per reason.
#[map]
pub(crate) static DROP_REASON_COUNTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_DROP_REASONS, 0);

/// Reported drops per (network namespace, reason): tells userspace in which namespace to look
/// for the firewall rule or listener behind them.
#[map]
pub(crate) static NETNS_DROPS: LruHashMap<NetnsReason, u64> = LruHashMap::with_max_entries(4096, 0);

/// The drop-reason filter's verdict for `reason`: None when the reason is not reported.
#[inline(always)]
pub(crate) fn reported(reason: u32) -> Option<u8> {
    match DROP_REASON_FILTER.get(reason) {
        Some(&filter) if filter & drop_filter::REPORT != 0 => Some(filter),
        _ => None,
    }
}

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    run(event_kind::DROP, || {
        let layout = config!(kfree_skb);
        let rec = record_of(&ctx, layout.record_size, slot::KFREE_SKB)?;
        // Cheapest checks first: this tracepoint fires for every freed packet with a reason.
        let reason: u32 = rec.get(layout.reason);
        let Some(filter) = reported(reason) else {
            return Ok(());
        };
        let protocol: u16 = rec.get(layout.protocol);
        if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
            return Ok(());
        }
        let rx_sk = if layout.rx_sk == FIELD_ABSENT {
            0
        } else {
            rec.get(layout.rx_sk)
        };
        let drop = Drop {
            skb: rec.get(layout.skbaddr),
            location: rec.get(layout.location),
            reason,
            filter,
            rx_sk,
        };
        on_drop(&ctx, &drop, false)
    })
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn raw_kfree_skb(ctx: RawTracePointContext) -> u32 {
    run(event_kind::DROP, || {
        let a = config!(raw.kfree_skb);
        // (skb, location, reason) since 5.17; `struct sock *rx_sk` since 6.12.
        let args = if a.extra2 == ARG_ABSENT {
            raw_args::<3>(&ctx)
        } else {
            raw_args::<4>(&ctx)
        };
        // The reason is an argument: most frees end here without reading any memory.
        let reason = arg(&args, a.reason) as u32;
        let Some(filter) = reported(reason) else {
            return Ok(());
        };
        let drop = Drop {
            skb: arg(&args, a.skb),
            location: arg(&args, a.extra),
            reason,
            filter,
            rx_sk: arg(&args, a.extra2),
        };
        on_drop(&ctx, &drop, true)
    })
}

/// A freed packet whose reason is reported.
pub(crate) struct Drop {
    skb: u64,
    location: u64,
    reason: u32,
    filter: u8,
    rx_sk: u64,
}

pub(crate) fn on_drop<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    drop: &Drop,
    check_protocol: bool,
) -> Result<(), i32> {
    let event = new_event(event_kind::DROP, tick_now_ns(), slot::KFREE_SKB)?;
    let Some(dev) = read_packet(drop.skb, event, check_protocol, slot::KFREE_SKB)? else {
        return Ok(());
    };
    let mut netns = netns_of_dev(dev, slot::KFREE_SKB);
    if netns == 0 && drop.rx_sk != 0 {
        netns = netns_of_sock(drop.rx_sk, slot::KFREE_SKB);
    }
    event.flow.netns = netns;
    event.reason = drop.reason;
    event.location = drop.location;
    if let Some(count) = DROP_REASON_COUNTS.get_ptr_mut(drop.reason) {
        // SAFETY: this CPU's slot of the per-CPU array, written only by the drop program.
        unsafe { *count += 1 };
    }
    if drop.filter & drop_filter::PER_NAMESPACE != 0
        && let Some((count, created)) = entry(
            &NETNS_DROPS,
            &NetnsReason {
                netns,
                reason: drop.reason,
            },
            0,
        )
    {
        // SAFETY: live map value, shared between CPUs: atomic add.
        unsafe { atomic_add(count, 1) };
        if created {
            count_map_stat(MapStat::NetnsDropsCreated);
        }
    }
    record(ctx, event, Counter::Drops);
    Ok(())
}
