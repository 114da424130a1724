//! Clocks: the precise boot clock and a per-CPU tick clock.

use aya_ebpf::{
    helpers::generated::{self, bpf_ktime_get_boot_ns},
    macros::map,
    maps::PerCpuArray,
};

/// The boot clock, to the nanosecond: for exported events and connection timings.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The kernel's tick counter.
#[inline(always)]
pub(crate) fn jiffies() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { generated::bpf_jiffies64() }
}

/// This CPU's last reading of the boot clock and the jiffy it was taken in.
#[repr(C)]
pub(crate) struct TickReading {
    jiffies: u64,
    ns: u64,
}

#[map]
pub(crate) static TICK_CLOCK: PerCpuArray<TickReading> = PerCpuArray::with_max_entries(1, 0);

/// The boot clock to within a scheduler tick (behind by at most one): enough for the export
/// windows, and read precisely once per tick per CPU. A precise reading costs about 50 ns
/// here, a quarter of what a whole run of some programs costs, and most events of a storm are
/// only counted, never exported with a time.
#[inline(always)]
pub(crate) fn tick_now_ns() -> u64 {
    let jiffies = jiffies();
    let Some(reading) = TICK_CLOCK.get_ptr_mut(0) else {
        return now_ns();
    };
    // SAFETY: this CPU's slot. A program interrupted on this CPU by another one between the two
    // stores leaves a reading at most one tick old, which only shifts a window edge.
    unsafe {
        if (*reading).jiffies == jiffies && (*reading).ns != 0 {
            return (*reading).ns;
        }
        let ns = now_ns();
        (*reading).jiffies = jiffies;
        (*reading).ns = ns;
        ns
    }
}
