//! Exact counting: per-flow counters for flows with trouble, per-kind statistics, and what the
//! programs did to their bounded tables.

use core::{
    borrow::Borrow,
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use observer_common::{FlowCounters, FlowKey, KindStats, MapStats, TcpEvent, event_kind};

use crate::{
    clock::now_ns,
    export::{cpu_budget_allows, output},
    reads::{scratch, zero},
};

/// Exact counters per flow. LRU so that a flood of distinct flows evicts old ones instead of
/// failing; userspace sizes it.
#[map]
// One LRU list for all CPUs: with per-CPU lists (BPF_F_NO_COMMON_LRU) a storm on one CPU
// evicts that CPU's share early, and quiet flows' exact counts with it.
pub(crate) static FLOW_COUNTERS: LruHashMap<FlowKey, FlowCounters> =
    LruHashMap::with_max_entries(65_536, 0);

/// One all-zero value: a new flow entry is inserted from it. Never written.
#[map]
static FLOW_ZERO: Array<FlowCounters> = Array::with_max_entries(1, 0);

/// Per-CPU statistics, one slot per event kind.
#[map]
pub(crate) static KIND_STATS: PerCpuArray<KindStats> =
    PerCpuArray::with_max_entries(event_kind::COUNT as u32, 0);

/// What the programs did to their bounded tables (one slot).
#[map]
pub(crate) static MAP_STATS: PerCpuArray<MapStats> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn stats(kind: u8) -> Option<&'static mut KindStats> {
    let ptr = KIND_STATS.get_ptr_mut(u32::from(kind))?;
    // SAFETY: per-CPU slot of a map value that lives as long as the program; only this CPU
    // writes it while the program runs.
    Some(unsafe { &mut *ptr })
}

/// Adds to a counter that other CPUs may update concurrently.
///
/// # Safety
/// `slot` must point at a live, aligned u64 (a map value).
#[inline(always)]
pub(crate) unsafe fn atomic_add(slot: *mut u64, amount: u64) {
    // SAFETY: guaranteed by the caller; the result is discarded so LLVM emits BPF_XADD.
    let _ = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, amount) };
}

/// The value of `key` in `map`, created as `init` when missing; and whether this call created
/// it. Several CPUs may race to create an entry: NOEXIST keeps the first, the others simply
/// look it up again.
#[inline(always)]
pub(crate) fn entry<K, V>(
    map: &LruHashMap<K, V>,
    key: &K,
    init: impl Borrow<V>,
) -> Option<(*mut V, bool)> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some((value, false));
    }
    let created = map.insert(key, init, u64::from(BPF_NOEXIST)).is_ok();
    map.get_ptr_mut(key).map(|value| (value, created))
}

/// A field of [`MapStats`].
#[derive(Clone, Copy)]
pub(crate) enum MapStat {
    SocketsEvicted,
    NetnsDropsCreated,
    ServicesCreated,
}

/// Adds one to a [`MapStats`] field of this CPU. Atomic: raw programs can interrupt each other
/// on a CPU, and several add to the same field.
#[inline(always)]
pub(crate) fn count_map_stat(stat: MapStat) {
    let Some(stats) = MAP_STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU map value; only field addresses are computed.
    unsafe {
        let field = match stat {
            MapStat::SocketsEvicted => &raw mut (*stats).sockets_evicted,
            MapStat::NetnsDropsCreated => &raw mut (*stats).netns_drops_created,
            MapStat::ServicesCreated => &raw mut (*stats).services_created,
        };
        atomic_add(field, 1);
    }
}

/// Which counter of [`FlowCounters`] an event adds to.
#[derive(Clone, Copy)]
pub(crate) enum Counter {
    RetransSegs,
    RetransFailed,
    SynRetrans,
    SynackRetrans,
    Drops,
    ResetsSent,
    ResetsReceived,
    Connects,
    ConnectsRefused,
    ConnectsTimedOut,
}

/// Pointer to the counter `counter` inside `c`.
///
/// # Safety
/// `c` must point at a live map value.
#[inline(always)]
pub(crate) unsafe fn slot(c: *mut FlowCounters, counter: Counter) -> *mut u64 {
    // SAFETY: guaranteed by the caller; only field addresses are computed.
    unsafe {
        match counter {
            Counter::RetransSegs => &raw mut (*c).retrans_segs,
            Counter::RetransFailed => &raw mut (*c).retrans_failed,
            Counter::SynRetrans => &raw mut (*c).syn_retrans,
            Counter::SynackRetrans => &raw mut (*c).synack_retrans,
            Counter::Drops => &raw mut (*c).drops,
            Counter::ResetsSent => &raw mut (*c).resets_sent,
            Counter::ResetsReceived => &raw mut (*c).resets_received,
            Counter::Connects => &raw mut (*c).connects,
            Counter::ConnectsRefused => &raw mut (*c).connects_refused,
            Counter::ConnectsTimedOut => &raw mut (*c).connects_timed_out,
        }
    }
}

/// Counts `amount` for `flow` and decides whether this event is exported under the per-flow
/// budget. Returns the flow's running total for the counter and the export decision, or None
/// when the flow could not be counted.
#[inline(always)]
pub(crate) fn count_flow(
    flow: &FlowKey,
    counter: Counter,
    amount: u64,
    now: u64,
) -> Option<(u64, bool, *mut FlowCounters)> {
    let zero = FLOW_ZERO.get_ptr(0)?;
    // SAFETY: a live map value, only read (the insert copies it).
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the zero would be built on the stack with a byte-wise memset call"
    )]
    let (counters, created) = entry(&FLOW_COUNTERS, flow, unsafe { &*zero })?;
    if created && let Some(created) = stats(0) {
        // Slot 0 of KIND_STATS counts flow entries created: userspace derives LRU evictions
        // from it (created - live entries). Every program adds to it, and raw programs can
        // interrupt each other on a CPU: atomic.
        // SAFETY: this CPU's slot of a per-CPU map value.
        unsafe { atomic_add(&raw mut created.counted, 1) };
    }
    // SAFETY: `counters` points at a live map value for the duration of this program run;
    // counters shared between CPUs are only changed through atomic adds.
    let total = unsafe {
        let slot = slot(counters, counter);
        atomic_add(slot, amount);
        if let Counter::RetransSegs = counter {
            atomic_add(&raw mut (*counters).retrans_skbs, 1);
        }
        // Read back for the event's running count. Another CPU may add in between; the count
        // shown is then a little ahead, while the map total stays exact.
        core::ptr::read_volatile(slot)
    };
    let per_flow = config!(budget.per_flow);
    if per_flow == 0 {
        return Some((total, true, counters));
    }
    let window_ns = config!(budget.window_ns);
    // SAFETY: as above. The window fields are advisory (a race between CPUs may export one event
    // more or less than the budget); the totals above are exact regardless.
    let export = unsafe {
        let c = &mut *counters;
        if now.wrapping_sub(c.window_start_ns) >= window_ns {
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
    Some((total, export, counters))
}

/// Counts the event in the per-CPU statistics and the flow map, and exports it if the kind is
/// exported and the budgets allow.
#[inline(always)]
pub(crate) fn record<C: aya_ebpf::EbpfContext>(ctx: &C, event: &mut TcpEvent, counter: Counter) {
    record_with(ctx, event, counter, false, |_| {});
}

/// [`record`], with `complete` filling in what only an exported event needs (a field the
/// counting key leaves out), just before the export.
#[inline(always)]
pub(crate) fn record_with<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
    counter: Counter,
    export_anyway: bool,
    complete: impl FnOnce(&mut TcpEvent),
) {
    let Some(stats) = stats(event.kind) else {
        return;
    };
    stats.seen += 1;
    let amount = match counter {
        Counter::RetransSegs => u64::from(event.segs),
        _ => 1,
    };
    let key = event.flow.counting_key(event.key_wildcard);
    let Some((total, flow_allows, counters)) =
        count_flow(&key, counter, amount, event.timestamp_ns)
    else {
        // Not counted per flow (the map update failed): still export it, so the event stream
        // stays complete, and say so in `map_full`.
        stats.map_full += 1;
        if (export_anyway || exports_kind(event.kind)) && cpu_budget_allows(event.timestamp_ns) {
            send(ctx, stats, event, complete);
        } else {
            stats.suppressed += 1;
        }
        return;
    };
    stats.counted += amount;
    if !export_anyway && !exports_kind(event.kind) {
        return;
    }
    if !flow_allows {
        stats.suppressed += 1;
        return;
    }
    if !cpu_budget_allows(event.timestamp_ns) {
        // Counted against the flow too, so userspace knows which flows to reconcile.
        // SAFETY: live map value returned by count_flow for this program run.
        unsafe { atomic_add(&raw mut (*counters).suppressed, 1) };
        stats.suppressed += 1;
        return;
    }
    event.flow_count = total;
    send(ctx, stats, event, complete);
}

/// Hands `event` to userspace: the exporting process, the exact time (counting and the budgets
/// ran on the tick clock), what only an exported event needs (`complete`), and the count.
#[inline(always)]
fn send<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    stats: &mut KindStats,
    event: &mut TcpEvent,
    complete: impl FnOnce(&mut TcpEvent),
) {
    event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    event.timestamp_ns = now_ns();
    complete(event);
    output(ctx, event);
    stats.exported += 1;
}

/// Whether events of `kind` are exported at all (`--export-kinds`).
#[inline(always)]
pub(crate) fn exports_kind(kind: u8) -> bool {
    config!(budget.kinds) & (1u32 << kind) != 0
}

/// Counts a healthy lifecycle event of `kind` in the per-CPU statistics only: its aggregate in
/// `SERVICES` has counted it, and it gets no flow entry. Returns the statistics when the kind
/// is exported, for [`export_healthy`].
#[inline(always)]
pub(crate) fn count_healthy(kind: u8) -> Option<&'static mut KindStats> {
    let stats = stats(kind)?;
    stats.seen += 1;
    stats.counted += 1;
    exports_kind(kind).then_some(stats)
}

/// Exports a healthy lifecycle event counted by [`count_healthy`], within this CPU's budget
/// (healthy events have no flow entry, so no per-flow budget); `complete` fills in what only an
/// exported event needs.
#[inline(always)]
pub(crate) fn export_healthy<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    stats: &mut KindStats,
    event: &mut TcpEvent,
    complete: impl FnOnce(&mut TcpEvent),
) {
    if !cpu_budget_allows(event.timestamp_ns) {
        stats.suppressed += 1;
        return;
    }
    send(ctx, stats, event, complete);
}

/// The event in this CPU's scratch buffer of `slot`, with only its kind and time set.
#[inline(always)]
pub(crate) fn new_event(kind: u8, now: u64, slot: u32) -> Result<&'static mut TcpEvent, i32> {
    let s = scratch(slot)?;
    // SAFETY: this CPU's scratch slot, owned by this program run (a program does not nest with
    // itself on a CPU).
    let event = unsafe {
        let event = &raw mut (*s).event;
        zero(event);
        &mut *event
    };
    event.timestamp_ns = now;
    event.segs = 1;
    event.kind = kind;
    Ok(event)
}

/// Runs a program body; a failure (a kernel read that did not succeed) is counted against `kind`
/// in `read_errors`, so that it is reported instead of silently missing.
#[inline(always)]
pub(crate) fn run(kind: u8, body: impl FnOnce() -> Result<(), i32>) -> u32 {
    if body().is_err()
        && let Some(stats) = stats(kind)
    {
        stats.read_errors += 1;
    }
    0
}
