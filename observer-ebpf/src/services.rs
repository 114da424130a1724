//! `SERVICES`: exact connection aggregates per peer and per listener, the cheap path for
//! healthy connections (no flow entry, no export). They are the denominators of the ratio
//! signals (failed connects per attempt, SYN retransmits per connect), read by userspace at any
//! time.

use core::mem::MaybeUninit;

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use observer_common::{
    FlowKey, HISTOGRAM_BUCKETS, ServiceKey, ServiceStats, histogram_bucket, service_role,
};

use crate::{
    counting::{MapStat, atomic_add, count_map_stat, entry},
    reads::{address_words, set_address},
};

/// One entry per (namespace, peer address and port) this host connects to, and per (namespace,
/// local address and port) it accepts on. LRU so that a scan over many peers evicts old ones;
/// userspace derives evictions from `MapStats::services_created`.
#[map]
static SERVICES: LruHashMap<ServiceKey, ServiceStats> = LruHashMap::with_max_entries(8_192, 0);

/// One all-zero value: a new entry is inserted from it (a `ServiceStats` does not fit the
/// 512-byte BPF stack). Never written.
#[map]
static SERVICE_ZERO: Array<ServiceStats> = Array::with_max_entries(1, 0);

/// The aggregate of the peer `flow` connects to.
#[inline(always)]
pub(crate) fn peer_of(flow: &FlowKey) -> ServiceKey {
    // SAFETY: FlowKey's addresses are 4-aligned.
    service_key(
        unsafe { address_words(&raw const flow.daddr) },
        flow.dport,
        service_role::PEER,
        flow.netns,
    )
}

/// The aggregate of the listener that accepted `flow`.
#[inline(always)]
pub(crate) fn listener_of(flow: &FlowKey) -> ServiceKey {
    // SAFETY: FlowKey's addresses are 4-aligned.
    service_key(
        unsafe { address_words(&raw const flow.saddr) },
        flow.sport,
        service_role::LISTENER,
        flow.netns,
    )
}

/// A key built field by field, its address word by word (a `[u8; 16]` assignment is a
/// byte-wise `memmove` call on BPF).
#[inline(always)]
fn service_key(addr: [u32; 4], port: u16, role: u8, netns: u32) -> ServiceKey {
    let mut key = MaybeUninit::<ServiceKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every field of the key is written before it is assumed initialised; the key is
    // 4-aligned, and so is its address.
    unsafe {
        set_address(&raw mut (*k).addr, addr);
        (&raw mut (*k).port).write(port);
        (&raw mut (*k).role).write(role);
        (&raw mut (*k)._pad).write(0);
        (&raw mut (*k).netns).write(netns);
        key.assume_init()
    }
}

/// `key`'s entry, created (and counted) when missing.
#[inline(always)]
fn stats_of(key: &ServiceKey) -> Option<*mut ServiceStats> {
    let zero = SERVICE_ZERO.get_ptr(0)?;
    // SAFETY: a live map value, only read (the insert copies it).
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the 576-byte zero would be copied onto the 512-byte BPF stack"
    )]
    let (stats, created) = entry(&SERVICES, key, unsafe { &*zero })?;
    if created {
        count_map_stat(MapStat::ServicesCreated);
    }
    Some(stats)
}

/// [`histogram_bucket`], masked so that the verifier sees the index bounded (the clamp inside
/// already keeps it below `HISTOGRAM_BUCKETS`, a power of two).
#[inline(always)]
fn bucket(ns: u64) -> usize {
    const { assert!(HISTOGRAM_BUCKETS.is_power_of_two()) };
    histogram_bucket(ns) & (HISTOGRAM_BUCKETS - 1)
}

/// Which counts an outcome adds to.
pub(crate) enum Outcome {
    /// A connect reached ESTABLISHED after `latency_ns` and `syn_retransmits` SYN retransmits
    /// (`slow`: over the slow-connect threshold).
    Connected {
        latency_ns: u64,
        syn_retransmits: u32,
        slow: bool,
    },
    /// A connect answered by a RST.
    Refused,
    /// A connect that closed in SYN_SENT without a RST.
    TimedOut,
    /// An accepted connection whose handshake's RTT sample was `rtt_ns`.
    Accepted { rtt_ns: u64 },
    /// A followed connection closed after `lifetime_ns`.
    Closed { lifetime_ns: u64 },
}

/// Adds `outcome` to `key`'s aggregate. Entries are shared by all CPUs: atomic adds.
#[inline(always)]
pub(crate) fn count(key: &ServiceKey, outcome: Outcome) {
    let Some(s) = stats_of(key) else {
        return;
    };
    // SAFETY: `s` is a live map value for this program run; every field is an aligned u64 and
    // the histogram index is below HISTOGRAM_BUCKETS (histogram_bucket clamps it).
    unsafe {
        match outcome {
            Outcome::Connected {
                latency_ns,
                syn_retransmits,
                slow,
            } => {
                atomic_add(&raw mut (*s).established, 1);
                if syn_retransmits != 0 {
                    atomic_add(&raw mut (*s).syn_retransmits, u64::from(syn_retransmits));
                }
                if slow {
                    atomic_add(&raw mut (*s).slow, 1);
                }
                atomic_add(&raw mut (*s).handshake_sum_us, latency_ns / 1_000);
                atomic_add(&raw mut (*s).handshake[bucket(latency_ns)], 1);
            }
            Outcome::Refused => atomic_add(&raw mut (*s).refused, 1),
            Outcome::TimedOut => atomic_add(&raw mut (*s).timed_out, 1),
            Outcome::Accepted { rtt_ns } => {
                atomic_add(&raw mut (*s).established, 1);
                atomic_add(&raw mut (*s).handshake_sum_us, rtt_ns / 1_000);
                atomic_add(&raw mut (*s).handshake[bucket(rtt_ns)], 1);
            }
            Outcome::Closed { lifetime_ns } => {
                atomic_add(&raw mut (*s).closes, 1);
                atomic_add(&raw mut (*s).lifetime_sum_us, lifetime_ns / 1_000);
                atomic_add(&raw mut (*s).lifetime[bucket(lifetime_ns)], 1);
            }
        }
    }
}
