//! observer's kernel programs.
//!
//! Each program runs on a classic tracepoint, counts what it sees exactly in kernel maps (per flow
//! and per CPU), and hands a bounded number of exemplar events to the perf buffers. Field offsets
//! are not compiled in: userspace reads them from the running kernel (tracefs `format` files and
//! BTF) and passes them in `CONFIG`.
#![no_std]
#![no_main]
// Atomic add on map values: core's AtomicU64 has no RMW methods for the BPF target, but the
// intrinsic lowers to BPF_XADD when its result is unused (what CPU v1, the default, supports).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd is the only fetch-add available on BPF")]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_ktime_get_boot_ns},
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, PerfEventArray},
    programs::TracePointContext,
};
use observer_common::{
    FIELD_ABSENT, FlowCounters, FlowKey, KernelConfig, KindStats, TCP_SYN_SENT, TcpEvent,
    event_kind,
};

/// Set by userspace at load time; all zeroes here only so that the object has the symbol.
#[unsafe(no_mangle)]
static CONFIG: KernelConfig = KernelConfig {
    retransmit_skb: observer_common::RetransmitSkbLayout {
        skbaddr: 0,
        skaddr: 0,
        state: 0,
        sport: 0,
        dport: 0,
        family: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        err: 0,
        _pad: [0; 3],
    },
    retransmit_synack: observer_common::RetransmitSynackLayout {
        sport: 0,
        dport: 0,
        family: 0,
        saddr_v6: 0,
        daddr_v6: 0,
        skaddr: 0,
        _pad: [0; 2],
    },
    offsets: observer_common::StructOffsets {
        skb_cb: 0,
        tcp_skb_cb_gso_segs: 0,
        sock_net: 0,
        net_ns_inum: 0,
        _pad: [0; 4],
    },
    budget: observer_common::ExportBudget {
        window_ns: 1_000_000_000,
        per_flow: 0,
        _pad: 0,
    },
};

/// Exact counters per flow. LRU so that a flood of distinct flows evicts old ones instead of
/// failing; userspace sizes it and reports evictions it detects.
#[map]
static FLOW_COUNTERS: LruHashMap<FlowKey, FlowCounters> = LruHashMap::with_max_entries(65_536, 0);

/// Per-CPU statistics, one slot per event kind.
#[map]
static KIND_STATS: PerCpuArray<KindStats> =
    PerCpuArray::with_max_entries(event_kind::COUNT as u32, 0);

/// Exemplar events for userspace.
#[map]
static EVENTS: PerfEventArray<TcpEvent> = PerfEventArray::new(0);

#[inline(always)]
fn config() -> KernelConfig {
    // SAFETY: CONFIG is a plain-data static; the volatile read stops the compiler from folding
    // the zero initialiser into the code, since userspace rewrites the value before loading.
    unsafe { core::ptr::read_volatile(&raw const CONFIG) }
}

#[inline(always)]
fn stats(kind: u8) -> Option<&'static mut KindStats> {
    let ptr = KIND_STATS.get_ptr_mut(u32::from(kind))?;
    // SAFETY: per-CPU slot of a map value that lives as long as the program; only this CPU
    // writes it while the program runs.
    Some(unsafe { &mut *ptr })
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Reads a value at `offset` of the tracepoint record.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u16) -> Result<T, i32> {
    // SAFETY: the offset comes from the tracepoint's own format file (checked in userspace to lie
    // inside the record with the expected size); bpf_probe_read_kernel faults safely anyway.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }
}

/// Reads the network-namespace inode of socket `sk` (0 when it cannot be read).
#[inline(always)]
fn netns_of(sk: u64, cfg: &KernelConfig) -> u32 {
    if sk == 0 {
        return 0;
    }
    let net_ptr = (sk + u64::from(cfg.offsets.sock_net)) as *const u64;
    // SAFETY: probe reads of kernel memory; a bad address yields an error, not a fault.
    let Ok(net) = (unsafe { bpf_probe_read_kernel(net_ptr) }) else {
        return 0;
    };
    if net == 0 {
        return 0;
    }
    let inum_ptr = (net + u64::from(cfg.offsets.net_ns_inum)) as *const u32;
    // SAFETY: as above.
    unsafe { bpf_probe_read_kernel(inum_ptr) }.unwrap_or(0)
}

/// Adds to a counter that other CPUs may update concurrently.
///
/// # Safety
/// `slot` must point at a live, aligned u64 (a map value).
#[inline(always)]
unsafe fn atomic_add(slot: *mut u64, amount: u64) {
    // SAFETY: guaranteed by the caller; the result is discarded so LLVM emits BPF_XADD.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, amount) };
}

/// Which counter of [`FlowCounters`] an event adds to.
#[derive(Clone, Copy)]
enum Counter {
    RetransSegs,
    RetransFailed,
    SynRetrans,
    SynackRetrans,
}

/// Counts `amount` for `flow`, decides whether this event is exported, and returns the flow's new
/// running total for the counter (None when the flow could not be counted).
#[inline(always)]
fn count_flow(
    flow: &FlowKey,
    counter: Counter,
    amount: u64,
    now: u64,
    cfg: &KernelConfig,
) -> Option<(u64, bool)> {
    let mut ptr = FLOW_COUNTERS.get_ptr_mut(flow);
    if ptr.is_none() {
        // Several CPUs may race to create the entry: NOEXIST keeps the first and the others
        // simply look it up again.
        let _ = FLOW_COUNTERS.insert(flow, FlowCounters::default(), u64::from(BPF_NOEXIST));
        ptr = FLOW_COUNTERS.get_ptr_mut(flow);
    }
    let counters = ptr?;
    // SAFETY: `counters` points at a live map value for the duration of this program run;
    // counters shared between CPUs are only changed through atomic operations below.
    let total = unsafe {
        let slot: *mut u64 = match counter {
            Counter::RetransSegs => &raw mut (*counters).retrans_segs,
            Counter::RetransFailed => &raw mut (*counters).retrans_failed,
            Counter::SynRetrans => &raw mut (*counters).syn_retrans,
            Counter::SynackRetrans => &raw mut (*counters).synack_retrans,
        };
        atomic_add(slot, amount);
        // Read back for the event's running count. Another CPU may add in between; the count
        // shown is then a little ahead, while the map total stays exact.
        let total = core::ptr::read_volatile(slot);
        if let Counter::RetransSegs = counter {
            atomic_add(&raw mut (*counters).retrans_skbs, 1);
        }
        total
    };
    let per_flow = cfg.budget.per_flow;
    if per_flow == 0 {
        return Some((total, true));
    }
    // SAFETY: as above. The window fields are advisory (a race between CPUs may export one event
    // more or less than the budget); the totals above are exact regardless.
    let export = unsafe {
        let c = &mut *counters;
        if now.wrapping_sub(c.window_start_ns) >= cfg.budget.window_ns {
            c.window_start_ns = now;
            c.window_exported = 0;
        }
        if c.window_exported < per_flow {
            c.window_exported += 1;
            true
        } else {
            atomic_add(&raw mut c.suppressed, 1);
            false
        }
    };
    Some((total, export))
}

/// Counts the event in the per-CPU statistics and the flow map, and exports it if the budget
/// allows.
#[inline(always)]
fn record<C: aya_ebpf::EbpfContext>(ctx: &C, mut event: TcpEvent, counter: Counter, cfg: &KernelConfig) {
    let Some(stats) = stats(event.kind) else {
        return;
    };
    stats.seen += 1;
    let amount = match counter {
        Counter::RetransSegs => u64::from(event.segs),
        _ => 1,
    };
    let Some((total, export)) = count_flow(&event.flow, counter, amount, event.timestamp_ns, cfg)
    else {
        stats.map_full += 1;
        return;
    };
    stats.counted += amount;
    if !export {
        stats.suppressed += 1;
        return;
    }
    event.flow_count = total;
    event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    EVENTS.output(ctx, &event, 0);
    stats.exported += 1;
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_retransmit_skb(&ctx);
    0
}

fn try_retransmit_skb(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let layout = cfg.retransmit_skb;
    let state: i32 = field(ctx, layout.state)?;
    let state = state as u8;
    let err: i32 = if layout.err == FIELD_ABSENT {
        0
    } else {
        field(ctx, layout.err)?
    };
    let sk: u64 = field(ctx, layout.skaddr)?;
    let skb: u64 = field(ctx, layout.skbaddr)?;
    let kind = if state == TCP_SYN_SENT {
        event_kind::SYN_RETRANSMIT
    } else {
        event_kind::RETRANSMIT
    };
    let segs = if kind == event_kind::RETRANSMIT {
        // tcp_skb_pcount(skb): one retransmitted skb may carry several segments.
        let ptr = (skb + u64::from(cfg.offsets.skb_cb) + u64::from(cfg.offsets.tcp_skb_cb_gso_segs))
            as *const u16;
        // SAFETY: probe read of kernel memory at offsets taken from the running kernel's BTF.
        u32::from(unsafe { bpf_probe_read_kernel(ptr) }.unwrap_or(1).max(1))
    } else {
        1
    };
    let event = TcpEvent {
        flow: FlowKey {
            saddr: field(ctx, layout.saddr_v6)?,
            daddr: field(ctx, layout.daddr_v6)?,
            sport: field(ctx, layout.sport)?,
            dport: field(ctx, layout.dport)?,
            netns: netns_of(sk, &cfg),
        },
        timestamp_ns: now_ns(),
        flow_count: 0,
        segs,
        err,
        pid: 0,
        kind,
        state,
        family: field(ctx, layout.family)?,
    };
    let counter = match (kind, err) {
        (_, e) if e != 0 => Counter::RetransFailed,
        (event_kind::SYN_RETRANSMIT, _) => Counter::SynRetrans,
        _ => Counter::RetransSegs,
    };
    record(ctx, event, counter, &cfg);
    Ok(())
}

#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let _ = try_retransmit_synack(&ctx);
    0
}

fn try_retransmit_synack(ctx: &TracePointContext) -> Result<(), i32> {
    let cfg = config();
    let layout = cfg.retransmit_synack;
    let sk: u64 = field(ctx, layout.skaddr)?;
    let event = TcpEvent {
        flow: FlowKey {
            saddr: field(ctx, layout.saddr_v6)?,
            daddr: field(ctx, layout.daddr_v6)?,
            sport: field(ctx, layout.sport)?,
            dport: field(ctx, layout.dport)?,
            netns: netns_of(sk, &cfg),
        },
        timestamp_ns: now_ns(),
        flow_count: 0,
        segs: 1,
        err: 0,
        pid: 0,
        kind: event_kind::SYNACK_RETRANSMIT,
        // The request socket is in SYN_RECV (TCP_NEW_SYN_RECV for the request sock itself).
        state: 3,
        family: field(ctx, layout.family)?,
    };
    record(ctx, event, Counter::SynackRetrans, &cfg);
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
