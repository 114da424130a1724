//! Exemplar export: the perf event array and the per-CPU export budget.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, PerfEventArray},
};
use observer_common::{CpuBudget, TcpEvent};

/// Per-CPU export budget state (one slot).
#[map]
pub(crate) static CPU_BUDGET: PerCpuArray<CpuBudget> = PerCpuArray::with_max_entries(1, 0);

/// Exemplar events for userspace.
#[map]
pub(crate) static EVENTS: PerfEventArray<TcpEvent> = PerfEventArray::new(0);

/// Hands `event` to the perf buffer by reference: it lives in the scratch map, and a copy
/// would put its 104 bytes back on the 512-byte stack.
#[inline(always)]
pub(crate) fn output<C: aya_ebpf::EbpfContext>(ctx: &C, event: &TcpEvent) {
    EVENTS.output(ctx, event, 0);
}

/// The per-CPU budget: at most `per_cpu` exports per window on this CPU.
#[inline(always)]
pub(crate) fn cpu_budget_allows(now: u64) -> bool {
    let per_cpu = config!(budget.per_cpu);
    if per_cpu == 0 {
        return true;
    }
    let Some(ptr) = CPU_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot; nothing else writes it while the program runs.
    let b = unsafe { &mut *ptr };
    if now.wrapping_sub(b.window_start_ns) >= config!(budget.window_ns) {
        b.window_start_ns = now;
        b.exported = 0;
    }
    if b.exported < per_cpu {
        b.exported += 1;
        true
    } else {
        false
    }
}
