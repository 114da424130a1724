//! observer's kernel programs.
//!
//! Each program runs on a kernel tracepoint, counts what it sees exactly in kernel maps (per flow
//! and per CPU), and hands a bounded number of exemplar events to the perf buffers. Field offsets
//! are not compiled in: userspace reads them from the running kernel (tracefs `format` files and
//! BTF) and passes them in `CONFIG`.
//!
//! Every tracepoint has two front ends over one core: a raw tracepoint program (`raw_*`), which
//! takes the tracepoint's arguments and reads the socket itself, and a classic one, which reads
//! the record the kernel formats first. Userspace attaches one of the two per tracepoint: raw
//! where BTF names the arguments (the record costs the kernel about 200 ns per event, which no
//! program can win back), classic otherwise or on request.
#![no_std]
#![no_main]
// Atomics on map values: core's AtomicU64 has no RMW methods for the BPF target, but the
// intrinsics lower to BPF_XADD (add, result unused) and BPF_CMPXCHG (CPU v3, LLVM's default).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "the atomic intrinsics are the only atomic read-modify-writes available on BPF"
)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{self, bpf_ktime_get_boot_ns},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, PerfEventArray},
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{
    ARG_ABSENT, CpuBudget, FIELD_ABSENT, FlowCounters, FlowKey, KernelConfig, KindStats,
    MAX_DROP_REASONS, MapStats, NetnsReason, RECORD_MAX, SEND_RESET_SOCKADDR, SOCKET_WAYS,
    SocketSet, SocketState, SocketWay, TCP_SYN_SENT, TcpEvent, connect_outcome, direction,
    drop_filter, event_kind, key_wildcard, socket_set,
};

/// Set by userspace at load time; all zeroes here only so that the object has the symbol.
#[unsafe(no_mangle)]
// SAFETY: KernelConfig is plain integers, for which all-zero bytes are a valid value.
static CONFIG: KernelConfig = unsafe { core::mem::zeroed() };

/// Reads one part of `CONFIG`. Volatile, because userspace rewrites the value before loading and
/// the compiler must not fold the zero initialiser into the code.
macro_rules! config {
    ($($field:ident).+) => {
        // SAFETY: CONFIG is a plain-data static that is never written by the programs.
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$($field).+) }
    };
}

/// Exact counters per flow. LRU so that a flood of distinct flows evicts old ones instead of
/// failing; userspace sizes it.
#[map]
// One LRU list for all CPUs: with per-CPU lists (BPF_F_NO_COMMON_LRU) a storm on one CPU
// evicts that CPU's share early, and quiet flows' exact counts with it.
static FLOW_COUNTERS: LruHashMap<FlowKey, FlowCounters> = LruHashMap::with_max_entries(65_536, 0);

/// Per-CPU statistics, one slot per event kind.
#[map]
static KIND_STATS: PerCpuArray<KindStats> =
    PerCpuArray::with_max_entries(event_kind::COUNT as u32, 0);

/// Per-CPU export budget state (one slot).
#[map]
static CPU_BUDGET: PerCpuArray<CpuBudget> = PerCpuArray::with_max_entries(1, 0);

/// Drop reasons to report (index: `enum skb_drop_reason` value; non-zero: report). Filled by
/// userspace from reason names, so the kernel's numbering never matters here.
#[map]
static DROP_REASON_FILTER: Array<u8> = Array::with_max_entries(MAX_DROP_REASONS, 0);

/// Per-CPU count of reported TCP drops per reason.
#[map]
static DROP_REASON_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_DROP_REASONS, 0);

/// Reported drops per (network namespace, reason): tells userspace in which namespace to look
/// for the firewall rule or listener behind them.
#[map]
static NETNS_DROPS: LruHashMap<NetnsReason, u64> = LruHashMap::with_max_entries(4096, 0);

/// What the programs did to their bounded tables (one slot).
#[map]
static MAP_STATS: PerCpuArray<MapStats> = PerCpuArray::with_max_entries(1, 0);

/// Per-socket state between state changes: a set-associative table indexed by the socket's
/// address ([`socket_set`]). Userspace sizes it like the flow map and sets
/// `tables.socket_sets_mask`.
#[map]
static SOCKETS: Array<SocketSet> = Array::with_max_entries(16_384, 0);

/// Exemplar events for userspace.
#[map]
static EVENTS: PerfEventArray<TcpEvent> = PerfEventArray::new(0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// The socket error of a connect answered by a RST (Linux errno ABI).
const ECONNREFUSED: i32 = 111;
/// TCP states (include/net/tcp_states.h, user-visible ABI).
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const TCP_NEW_SYN_RECV: i32 = 12;
/// TCP header flag bits (byte 13).
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

#[inline(always)]
fn stats(kind: u8) -> Option<&'static mut KindStats> {
    let ptr = KIND_STATS.get_ptr_mut(u32::from(kind))?;
    // SAFETY: per-CPU slot of a map value that lives as long as the program; only this CPU
    // writes it while the program runs.
    Some(unsafe { &mut *ptr })
}

/// The boot clock, to the nanosecond: for exported events and connection timings.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The kernel's tick counter.
#[inline(always)]
fn jiffies() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { generated::bpf_jiffies64() }
}

/// This CPU's last reading of the boot clock and the jiffy it was taken in.
#[repr(C)]
struct TickReading {
    jiffies: u64,
    ns: u64,
}

#[map]
static TICK_CLOCK: PerCpuArray<TickReading> = PerCpuArray::with_max_entries(1, 0);

/// The boot clock to within a scheduler tick (behind by at most one): enough for the export
/// windows, and read precisely once per tick per CPU. A precise reading costs about 50 ns
/// here, a quarter of what a whole run of some programs costs, and most events of a storm are
/// only counted, never exported with a time.
#[inline(always)]
fn tick_now_ns() -> u64 {
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

/// Offsets into a copied buffer are masked with this (the verifier must see them bounded);
/// userspace guarantees they are below [`RECORD_MAX`] already.
const OFFSET_MASK: usize = RECORD_MAX as usize - 1;
/// A copy buffer: [`RECORD_MAX`] bytes of copy, plus room for the widest field read at the
/// highest maskable offset (a 28-byte socket address).
const COPY_LEN: usize = RECORD_MAX as usize + 32;
/// Bytes copied from a dropped packet's network header: an option-less IPv4 or IPv6 header and
/// the first 14 bytes of TCP.
const PACKET_COPY: u16 = 64;

/// Per-CPU copies of kernel memory. One `bpf_probe_read_kernel` per record (and per sk_buff
/// window) instead of one per field: the helper call, not the bytes, is what costs.
#[repr(C)]
pub struct Scratch {
    /// The event being built: kept off the 512-byte BPF stack.
    event: TcpEvent,
    record: [u8; COPY_LEN],
    skb: [u8; COPY_LEN],
    packet: [u8; COPY_LEN],
}

/// One slot per CPU and program. A program does not nest with itself on a CPU (classic
/// tracepoints are guarded by `bpf_prog_active`, raw ones by the program's own `active` count),
/// but a raw program can interrupt another one (a packet freed in a softirq during a state
/// change): each owns its slot for its whole run.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(slot::COUNT, 0);

/// Scratch slots, one per tracepoint (shared by its raw and classic program, never both
/// attached).
mod slot {
    pub const RETRANSMIT_SKB: u32 = 0;
    pub const RETRANSMIT_SYNACK: u32 = 1;
    pub const SEND_RESET: u32 = 2;
    pub const RECEIVE_RESET: u32 = 3;
    pub const KFREE_SKB: u32 = 4;
    pub const SET_STATE: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Bytes copied into a scratch buffer, read by offset.
#[derive(Clone, Copy)]
struct Copied {
    base: *const u8,
}

impl Copied {
    /// The value at `offset` of the copy (unaligned; offsets come from the kernel's own
    /// layouts, checked in userspace to lie inside the copied length).
    #[inline(always)]
    fn get<T: Copy>(self, offset: u16) -> T {
        const { assert!(size_of::<T>() <= COPY_LEN - RECORD_MAX as usize) };
        // SAFETY: `base` points at a COPY_LEN-byte scratch buffer; the masked offset is below
        // RECORD_MAX and T is at most COPY_LEN - RECORD_MAX bytes, so the read stays inside it.
        unsafe {
            core::ptr::read_unaligned(self.base.add(usize::from(offset) & OFFSET_MASK).cast::<T>())
        }
    }
}

/// Copies `len` bytes of kernel memory at `src` into `dst` (a COPY_LEN-byte scratch buffer).
#[inline(always)]
fn copy_kernel(dst: *mut u8, src: u64, len: u16) -> Result<Copied, i32> {
    if len == 0 || len > RECORD_MAX {
        return Err(-22);
    }
    // SAFETY: dst has COPY_LEN >= RECORD_MAX bytes; bpf_probe_read_kernel checks `src` and
    // fails instead of faulting.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(dst.cast::<c_void>(), u32::from(len), src as *const c_void)
    };
    if rc != 0 {
        return Err(rc as i32);
    }
    Ok(Copied { base: dst })
}

/// This CPU's scratch buffers of program `slot`.
#[inline(always)]
fn scratch(slot: u32) -> Result<*mut Scratch, i32> {
    SCRATCH.get_ptr_mut(slot).ok_or(-1)
}

/// Copies `size` bytes at `src` (a tracepoint record, or a socket) into the record buffer.
#[inline(always)]
fn record_copy(src: u64, size: u16, slot: u32) -> Result<Copied, i32> {
    let s = scratch(slot)?;
    // SAFETY: live per-CPU map value; only its address is taken.
    let dst = unsafe { (&raw mut (*s).record).cast::<u8>() };
    copy_kernel(dst, src, size)
}

/// Copies the first `size` bytes of the tracepoint record.
#[inline(always)]
fn record_of(ctx: &TracePointContext, size: u16, slot: u32) -> Result<Copied, i32> {
    record_copy(aya_ebpf::EbpfContext::as_ptr(ctx) as u64, size, slot)
}

/// The arguments of a raw tracepoint that has at least `N` of them. Only the first `N` are
/// read: the kernel refuses to attach a program that reads beyond the tracepoint's arguments.
#[inline(always)]
fn raw_args<const N: usize>(ctx: &RawTracePointContext) -> [u64; 8] {
    const { assert!(N <= 8) };
    let base = aya_ebpf::EbpfContext::as_ptr(ctx).cast::<u64>();
    let mut args = [0u64; 8];
    let mut i = 0;
    while i < N {
        // SAFETY: the context is the tracepoint's u64 argument array, which has at least N
        // entries (the kernel checks the highest offset read against the tracepoint at attach).
        // Volatile keeps each load at a constant offset, the only kind the verifier accepts.
        args[i] = unsafe { core::ptr::read_volatile(base.add(i)) };
        i += 1;
    }
    args
}

/// Argument `index` (from userspace's BTF lookup), or 0 when the tracepoint lacks it.
#[inline(always)]
fn arg(args: &[u64; 8], index: u8) -> u64 {
    if index == ARG_ABSENT {
        return 0;
    }
    args[usize::from(index) & 7]
}

/// Sets `event`'s flow, family and state from `sk` (a `sock`, `request_sock` or
/// `inet_timewait_sock`, which all begin with `struct sock_common`), read from one copy of its
/// `sock_common` window. Oriented as the kernel's tracepoints orient a socket: s = local.
#[inline(always)]
fn fill_from_sock(event: &mut TcpEvent, sk: u64, slot: u32) -> Result<(), i32> {
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
fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..16].copy_from_slice(&v4);
    addr
}

/// Reads kernel memory at `addr`.
#[inline(always)]
fn kread<T>(addr: u64) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and returns an error instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T) }
}

/// Network-namespace inode behind a `struct net *`.
#[inline(always)]
fn netns_inum(net: u64, slot: u32) -> u32 {
    if net == 0 {
        return 0;
    }
    reuse_within_jiffy(&NET_NETNS, net, slot, || {
        kread::<u32>(net + u64::from(config!(offsets.net_ns_inum))).unwrap_or(0)
    })
}

/// Network-namespace inode of socket `sk` (0 when it cannot be read).
#[inline(always)]
fn netns_of_sock(sk: u64, slot: u32) -> u32 {
    if sk == 0 {
        return 0;
    }
    netns_inum(
        kread::<u64>(sk + u64::from(config!(offsets.sock_net))).unwrap_or(0),
        slot,
    )
}

/// Sets `event`'s flow and family from a tracepoint record whose addresses are
/// `saddr_v6`/`daddr_v6` copies, from the offsets of `[saddr_v6, daddr_v6, sport, dport, family]`,
/// in socket `sk`'s namespace.
#[inline(always)]
fn fill_from_record(
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

/// A program's last answer for the namespace of one object (a device or a `struct net`),
/// and the jiffy it was read in.
#[repr(C)]
struct NetnsAnswer {
    object: u64,
    jiffies: u64,
    inum: u32,
    _pad: u32,
}

/// One [`NetnsAnswer`] per program slot and CPU, for devices and for `struct net`s (a program
/// does not interrupt itself on a CPU, so a slot is never read half-written).
#[map]
static DEV_NETNS: PerCpuArray<NetnsAnswer> = PerCpuArray::with_max_entries(slot::COUNT, 0);
#[map]
static NET_NETNS: PerCpuArray<NetnsAnswer> = PerCpuArray::with_max_entries(slot::COUNT, 0);

/// `read()` for `object`, or the answer this program slot got for it in the same jiffy. A
/// storm repeats the same device and namespace event after event; a device moved to another
/// namespace is seen at the next tick at the latest, and a `struct net` never changes inode.
#[inline(always)]
fn reuse_within_jiffy(
    cache: &PerCpuArray<NetnsAnswer>,
    object: u64,
    slot: u32,
    read: impl FnOnce() -> u32,
) -> u32 {
    let Some(answer) = cache.get_ptr_mut(slot) else {
        return read();
    };
    let jiffies = jiffies();
    // SAFETY: this CPU's slot of this program (see DEV_NETNS).
    unsafe {
        if (*answer).object == object && (*answer).jiffies == jiffies {
            return (*answer).inum;
        }
        let inum = read();
        *answer = NetnsAnswer {
            object,
            jiffies,
            inum,
            _pad: 0,
        };
        inum
    }
}

/// Network-namespace inode of a network device (0 when there is none).
#[inline(always)]
fn netns_of_dev(dev: u64, slot: u32) -> u32 {
    if dev == 0 {
        return 0;
    }
    reuse_within_jiffy(&DEV_NETNS, dev, slot, || {
        netns_inum(
            kread::<u64>(dev + u64::from(config!(packet.dev_net))).unwrap_or(0),
            slot,
        )
    })
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

/// The value of `key` in `map`, created as `init` when missing; and whether this call created
/// it. Several CPUs may race to create an entry: NOEXIST keeps the first, the others simply
/// look it up again.
#[inline(always)]
fn entry<K, V>(map: &LruHashMap<K, V>, key: &K, init: V) -> Option<(*mut V, bool)> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some((value, false));
    }
    let created = map.insert(key, init, u64::from(BPF_NOEXIST)).is_ok();
    map.get_ptr_mut(key).map(|value| (value, created))
}

/// A field of [`MapStats`].
#[derive(Clone, Copy)]
enum MapStat {
    SocketsEvicted,
    NetnsDropsCreated,
}

/// Adds one to a [`MapStats`] field of this CPU. Atomic: raw programs can interrupt each other
/// on a CPU, and several add to the same field.
#[inline(always)]
fn count_map_stat(stat: MapStat) {
    let Some(stats) = MAP_STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU map value; only field addresses are computed.
    unsafe {
        let field = match stat {
            MapStat::SocketsEvicted => &raw mut (*stats).sockets_evicted,
            MapStat::NetnsDropsCreated => &raw mut (*stats).netns_drops_created,
        };
        atomic_add(field, 1);
    }
}

/// The `SOCKETS` set of socket `sk`.
#[inline(always)]
fn socket_set_of(sk: u64) -> Option<*mut SocketSet> {
    SOCKETS.get_ptr_mut(socket_set(sk, config!(tables.socket_sets_mask)))
}

/// The socket address held by a way, which other CPUs claim and free concurrently.
///
/// # Safety
/// `way` must point into a live map value.
#[inline(always)]
unsafe fn way_owner(way: *mut SocketWay) -> u64 {
    // SAFETY: guaranteed by the caller. An aligned 64-bit load is single-copy atomic on BPF;
    // volatile keeps it a fresh load (LLVM's BPF backend has no atomic load at CPU v3).
    unsafe { core::ptr::read_volatile(&raw const (*way).sk) }
}

/// Makes `way` hold `new` if it holds `old` (BPF_CMPXCHG, atomic across CPUs).
///
/// # Safety
/// `way` must point into a live map value.
#[inline(always)]
unsafe fn claim_way(way: *mut SocketWay, old: u64, new: u64) -> bool {
    // SAFETY: guaranteed by the caller; the field is an aligned u64.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*way).sk,
            old,
            new,
        )
        .1
    }
}

/// The state of socket `sk` if it is followed, else null. (A pointer, not an `Option`: LLVM
/// carries an `Option`'s pointer and tag in two registers and spills the undefined pointer of
/// a None, which the verifier refuses to read.)
#[inline(always)]
fn followed_socket(sk: u64) -> *mut SocketState {
    let mut found = core::ptr::null_mut();
    if let Some(set) = socket_set_of(sk) {
        let mut i = 0;
        while i < SOCKET_WAYS {
            // SAFETY: a live map value; only field addresses are taken.
            unsafe {
                let way = &raw mut (*set).ways[i];
                if way_owner(way) == sk {
                    found = &raw mut (*way).state;
                }
            }
            i += 1;
        }
    }
    found
}

/// Starts following socket `sk`, whose [`followed_socket`] lookup the caller made: `existing`.
/// A way already holding it is a socket freed without a close we saw, whose address was
/// reused: its state is replaced. In a full set, the way opened longest ago is evicted and
/// counted: that connection's report is lost.
#[inline(always)]
fn track_socket(sk: u64, existing: *mut SocketState, state: &SocketState) {
    if !existing.is_null() {
        // SAFETY: a live map value of this socket.
        unsafe { *existing = *state };
        return;
    }
    let Some(set) = socket_set_of(sk) else {
        return;
    };
    let mut i = 0;
    let mut oldest = 0;
    let mut oldest_ns = u64::MAX;
    while i < SOCKET_WAYS {
        // SAFETY: a live map value; only field addresses are taken. A way's state is written
        // only by the CPU that claimed the way.
        unsafe {
            let way = &raw mut (*set).ways[i];
            if claim_way(way, 0, sk) {
                (*way).state = *state;
                return;
            }
            let opened = (*way).state.opened_ns;
            if opened < oldest_ns {
                oldest_ns = opened;
                oldest = i;
            }
        }
        i += 1;
    }
    count_map_stat(MapStat::SocketsEvicted);
    // SAFETY: as above; the index is masked below SOCKET_WAYS.
    unsafe {
        let way = &raw mut (*set).ways[oldest % SOCKET_WAYS];
        let victim = way_owner(way);
        // Another CPU may have taken or freed the way meanwhile: this socket then goes
        // unfollowed, which the eviction just counted stands for.
        if victim != 0 && claim_way(way, victim, sk) {
            (*way).state = *state;
        }
    }
}

/// Stops following socket `sk` (closed, or its connect failed).
#[inline(always)]
fn untrack_socket(sk: u64) {
    let Some(set) = socket_set_of(sk) else {
        return;
    };
    let mut i = 0;
    while i < SOCKET_WAYS {
        // SAFETY: a live map value; only a field address is taken.
        if unsafe { claim_way(&raw mut (*set).ways[i], sk, 0) } {
            return;
        }
        i += 1;
    }
}

/// Which counter of [`FlowCounters`] an event adds to.
#[derive(Clone, Copy)]
enum Counter {
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
    Accepts,
    Closes,
}

/// Pointer to the counter `counter` inside `c`.
///
/// # Safety
/// `c` must point at a live map value.
#[inline(always)]
unsafe fn slot(c: *mut FlowCounters, counter: Counter) -> *mut u64 {
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
            Counter::Accepts => &raw mut (*c).accepts,
            Counter::Closes => &raw mut (*c).closes,
        }
    }
}

/// Counts `amount` for `flow` and decides whether this event is exported under the per-flow
/// budget. Returns the flow's running total for the counter and the export decision, or None
/// when the flow could not be counted.
#[inline(always)]
fn count_flow(
    flow: &FlowKey,
    counter: Counter,
    amount: u64,
    now: u64,
) -> Option<(u64, bool, *mut FlowCounters)> {
    let (counters, created) = entry(&FLOW_COUNTERS, flow, FlowCounters::default())?;
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

/// Hands `event` to the perf buffer by reference: it lives in the scratch map, and a copy
/// would put its 104 bytes back on the 512-byte stack.
#[inline(always)]
fn output<C: aya_ebpf::EbpfContext>(ctx: &C, event: &TcpEvent) {
    EVENTS.output(ctx, event, 0);
}

/// The per-CPU budget: at most `per_cpu` exports per window on this CPU.
#[inline(always)]
fn cpu_budget_allows(now: u64) -> bool {
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

/// Counts the event in the per-CPU statistics and the flow map, and exports it if the kind is
/// exported and the budgets allow.
#[inline(always)]
fn record<C: aya_ebpf::EbpfContext>(ctx: &C, event: &mut TcpEvent, counter: Counter) {
    record_with(ctx, event, counter, |_| {});
}

/// [`record`], with `complete` filling in what only an exported event needs (a field the
/// counting key leaves out), just before the export.
#[inline(always)]
fn record_with<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
    counter: Counter,
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
        if config!(budget.kinds) & (1u32 << event.kind) != 0
            && cpu_budget_allows(event.timestamp_ns)
        {
            event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
            event.timestamp_ns = now_ns();
            complete(event);
            output(ctx, event);
            stats.exported += 1;
        } else {
            stats.suppressed += 1;
        }
        return;
    };
    stats.counted += amount;
    let kind_exported = config!(budget.kinds) & (1u32 << event.kind) != 0;
    if !kind_exported {
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
    event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Counting and the budgets ran on the tick clock; an exported event gets the exact time.
    event.timestamp_ns = now_ns();
    complete(event);
    output(ctx, event);
    stats.exported += 1;
}

/// The event in this CPU's scratch buffer of `slot`, with only its kind and time set.
#[inline(always)]
fn new_event(kind: u8, now: u64, slot: u32) -> Result<&'static mut TcpEvent, i32> {
    let s = scratch(slot)?;
    // SAFETY: this CPU's scratch slot, owned by this program run (a program does not nest with
    // itself on a CPU).
    let event = unsafe { &mut (*s).event };
    *event = TcpEvent {
        timestamp_ns: now,
        segs: 1,
        kind,
        ..TcpEvent::default()
    };
    Ok(event)
}

/// Runs a program body; a failure (a kernel read that did not succeed) is counted against `kind`
/// in `read_errors`, so that it is reported instead of silently missing.
#[inline(always)]
fn run(kind: u8, body: impl FnOnce() -> Result<(), i32>) -> u32 {
    if body().is_err()
        && let Some(stats) = stats(kind)
    {
        stats.read_errors += 1;
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Retransmits

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
fn on_retransmit<C: aya_ebpf::EbpfContext>(
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

fn on_synack_retransmit<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    event: &mut TcpEvent,
) -> Result<(), i32> {
    event.state = TCP_SYN_RECV as u8;
    record(ctx, event, Counter::SynackRetrans);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resets

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
fn on_receive_reset<C: aya_ebpf::EbpfContext>(ctx: &C, event: &mut TcpEvent) -> Result<(), i32> {
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
fn read_sockaddr(rec: Copied, offset: u16) -> (u16, u16, [u8; 16]) {
    let family: u16 = rec.get(offset);
    let port_be: u16 = rec.get(offset + 2);
    let addr = if family == AF_INET {
        v4_mapped(rec.get(offset + 4))
    } else {
        rec.get(offset + 8)
    };
    (family, u16::from_be(port_be), addr)
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    run(event_kind::RESET_SENT, || try_send_reset(&ctx))
}

fn try_send_reset(ctx: &TracePointContext) -> Result<(), i32> {
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
fn on_send_reset<C: aya_ebpf::EbpfContext>(
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

// ---------------------------------------------------------------------------------------------
// Drops with a reason

/// Fills `event` (flow addresses and ports oriented local-first, family, flags, interface,
/// direction) from the TCP/IP headers of `skb`, read from one copy of its `sk_buff` window and
/// one copy of its headers. Returns the packet's device, or None when it is not TCP over
/// IPv4/IPv6 (with `check_protocol`, judged first by `skb->protocol`).
#[inline(always)]
fn read_packet(
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
        (&mut event.flow.daddr, &mut event.flow.saddr)
    } else {
        (&mut event.flow.saddr, &mut event.flow.daddr)
    };
    let header_len = match first >> 4 {
        4 => {
            if hdr.get::<u8>(9) != IPPROTO_TCP {
                return Ok(None);
            }
            *local = v4_mapped(hdr.get(12));
            *remote = v4_mapped(hdr.get(16));
            event.family = AF_INET;
            u16::from(first & 0x0f) * 4
        }
        6 => {
            // Extension headers are not followed: TCP directly after the fixed header only.
            if hdr.get::<u8>(6) != IPPROTO_TCP {
                return Ok(None);
            }
            *local = hdr.get(8);
            *remote = hdr.get(24);
            event.family = AF_INET6;
            40
        }
        _ => return Ok(None),
    };
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

/// The drop-reason filter's verdict for `reason`: None when the reason is not reported.
#[inline(always)]
fn reported(reason: u32) -> Option<u8> {
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
struct Drop {
    skb: u64,
    location: u64,
    reason: u32,
    filter: u8,
    rx_sk: u64,
}

fn on_drop<C: aya_ebpf::EbpfContext>(
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

// ---------------------------------------------------------------------------------------------
// Connection lifecycle

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    run(event_kind::CLOSE, || {
        let layout = config!(set_state);
        let rec = record_of(&ctx, layout.record_size, slot::SET_STATE)?;
        if rec.get::<u16>(layout.protocol) != u16::from(IPPROTO_TCP) {
            return Ok(());
        }
        let sk: u64 = rec.get(layout.skaddr);
        let transition = Transition {
            sk,
            old: rec.get(layout.oldstate),
            new: rec.get(layout.newstate),
        };
        on_set_state(
            &ctx,
            &transition,
            || true,
            |event| {
                fill_from_record(event, rec, layout.tuple(), sk, slot::SET_STATE);
                Ok(())
            },
            |_| {},
        )
    })
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    run(event_kind::CLOSE, || {
        let a = config!(raw.set_state);
        let args = raw_args::<3>(&ctx);
        let sk = arg(&args, a.sk);
        let transition = Transition {
            sk,
            old: arg(&args, a.extra) as i32,
            new: arg(&args, a.extra2) as i32,
        };
        // The states are arguments: uninteresting transitions end before any memory is read.
        on_set_state(
            &ctx,
            &transition,
            || {
                kread::<u16>(sk + u64::from(config!(raw.sock.protocol)))
                    .is_ok_and(|protocol| protocol == u16::from(IPPROTO_TCP))
            },
            |event| {
                fill_from_sock(event, sk, slot::SET_STATE)?;
                // A failed connect is counted without its local port: read it only for export.
                if event.flow.sport == 0 && event.key_wildcard != key_wildcard::LOCAL_PORT {
                    event.flow.sport = closing_port(sk);
                }
                Ok(())
            },
            |event| {
                if event.flow.sport == 0 {
                    event.flow.sport = closing_port(sk);
                }
            },
        )
    })
}

/// The local port of a closing socket: a close unbinds the port (clearing `skc_num`) before
/// the state change is traced, but the socket's own source port still holds it.
#[inline(always)]
fn closing_port(sk: u64) -> u16 {
    u16::from_be(kread(sk + u64::from(config!(raw.sock.inet_sport))).unwrap_or(0))
}

/// A socket's state change.
struct Transition {
    sk: u64,
    old: i32,
    new: i32,
}

/// `is_tcp` says whether the socket is TCP (the tracepoint also fires for other protocols);
/// `fill` sets the event's flow and family (its key wildcard is already set). Both are called
/// only for transitions that count; `complete` only for an event about to be exported.
fn on_set_state<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    &Transition { sk, old, new }: &Transition,
    is_tcp: impl FnOnce() -> bool,
    fill: impl FnOnce(&mut TcpEvent) -> Result<(), i32>,
    complete: impl FnOnce(&mut TcpEvent),
) -> Result<(), i32> {
    if new == i32::from(TCP_SYN_SENT) {
        if !is_tcp() {
            return Ok(());
        }
        let state = SocketState {
            opened_ns: now_ns(),
            established_ns: 0,
            syn_retransmits: 0,
            reset_received: 0,
            active: 1,
            _pad: 0,
        };
        track_socket(sk, followed_socket(sk), &state);
        return Ok(());
    }
    let (kind, counter) = match (old, new) {
        (o, TCP_ESTABLISHED) if o == i32::from(TCP_SYN_SENT) => {
            (event_kind::CONNECT, Counter::Connects)
        }
        (TCP_SYN_RECV, TCP_ESTABLISHED) => (event_kind::ACCEPT, Counter::Accepts),
        (o, TCP_CLOSE) if o == i32::from(TCP_SYN_SENT) => {
            (event_kind::CONNECT_FAILED, Counter::ConnectsTimedOut)
        }
        (_, TCP_CLOSE) => (event_kind::CLOSE, Counter::Closes),
        _ => return Ok(()),
    };
    let known = followed_socket(sk);
    if kind == event_kind::CLOSE && known.is_null() {
        // Close: report only sockets seen opening, with their lifetime.
        return Ok(());
    }
    // Sockets seen opening are TCP already; others are checked now.
    if known.is_null() && !is_tcp() {
        return Ok(());
    }
    let now = now_ns();
    let event = new_event(kind, now, slot::SET_STATE)?;
    if kind == event_kind::CONNECT_FAILED {
        event.key_wildcard = key_wildcard::LOCAL_PORT;
    }
    fill(event)?;
    event.state = new as u8;
    event.old_state = old as u8;
    let mut counter = counter;
    match kind {
        event_kind::CONNECT => {
            if !known.is_null() {
                // SAFETY: live map value of this socket.
                unsafe {
                    event.duration_ns = now.wrapping_sub((*known).opened_ns);
                    event.aux32 = (*known).syn_retransmits;
                    (*known).established_ns = now;
                }
            }
        }
        event_kind::CONNECT_FAILED => {
            // tcp_reset() sets the socket's error before it closes it: ECONNREFUSED is a RST
            // answering the SYN (an ICMP port unreachable reads the same); anything else
            // (ETIMEDOUT, or none when the application gave up) is a timeout.
            let sk_err: i32 = kread(sk + u64::from(config!(offsets.sock_err))).unwrap_or(0);
            if sk_err == ECONNREFUSED {
                event.aux8 = connect_outcome::REFUSED;
                counter = Counter::ConnectsRefused;
            } else {
                event.aux8 = connect_outcome::TIMEOUT;
            }
            if !known.is_null() {
                // SAFETY: live map value of this socket.
                unsafe {
                    event.duration_ns = now.wrapping_sub((*known).opened_ns);
                    event.aux32 = (*known).syn_retransmits;
                }
                untrack_socket(sk);
            }
        }
        event_kind::ACCEPT => {
            // The handshake's duration as the server measured it: the first RTT sample of the
            // new socket is taken from SYN-ACK to ACK.
            let srtt: u32 = kread(sk + u64::from(config!(packet.tcp_srtt_us))).unwrap_or(0);
            event.aux32 = srtt >> 3;
            event.duration_ns = u64::from(srtt >> 3) * 1000;
            let state = SocketState {
                opened_ns: now,
                established_ns: now,
                syn_retransmits: 0,
                reset_received: 0,
                active: 0,
                _pad: 0,
            };
            track_socket(sk, known, &state);
        }
        _ => {
            if !known.is_null() {
                // SAFETY: live map value of this socket.
                unsafe {
                    let since = if (*known).established_ns != 0 {
                        (*known).established_ns
                    } else {
                        (*known).opened_ns
                    };
                    event.duration_ns = now.wrapping_sub(since);
                    event.aux8 = (*known).active;
                }
            }
            untrack_socket(sk);
        }
    }
    record_with(ctx, event, counter, complete);
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
