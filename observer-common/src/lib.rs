//! Types shared by observer's kernel programs (`observer-ebpf`) and its daemon (`observer`).
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each is `#[repr(C)]`, has
//! explicit padding fields, no `bool`s, and a compile-time size check: a layout change on one side
//! that is not made on the other fails the build instead of corrupting data.
#![no_std]

/// `AF_INET` as the tracepoints report it in their `family` field.
pub const AF_INET: u16 = 2;
/// `AF_INET6` as the tracepoints report it in their `family` field.
pub const AF_INET6: u16 = 10;

/// `TCP_SYN_SENT` in the kernel's `enum tcp_state` (stable UAPI numbering, `include/net/tcp_states.h`).
pub const TCP_SYN_SENT: u8 = 2;

/// What happened. Numbering is ours (not the kernel's) and only ever grows.
pub mod event_kind {
    /// A data (or FIN) segment retransmitted by `tcp_retransmit_skb`.
    pub const RETRANSMIT: u8 = 1;
    /// A SYN retransmitted by an active open in `SYN_SENT` (connect trouble).
    pub const SYN_RETRANSMIT: u8 = 2;
    /// A SYN-ACK retransmitted by a listener (the peer never completed the handshake).
    pub const SYNACK_RETRANSMIT: u8 = 3;
    /// One more than the highest kind: sizes the per-kind counter arrays.
    pub const COUNT: usize = 4;
}

/// Identity of a TCP flow as the kernel names it: `s` is this host's side.
///
/// Addresses are always 16 bytes: IPv4 flows are stored as IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`), which is also how the tracepoints fill their `*_v6` fields for IPv4
/// sockets. Userspace shows mapped addresses as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Inode number of the socket's network namespace (0 when it could not be read).
    pub netns: u32,
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Exact per-flow counters kept in the kernel's `FLOW_COUNTERS` map, whatever happens to the
/// export path. The export budget fields are bookkeeping for exemplar sampling, not totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCounters {
    /// Retransmitted data segments (sum of `tcp_skb_pcount` over successful attempts).
    pub retrans_segs: u64,
    /// Successful data retransmit calls (skbs; one skb may carry several segments).
    pub retrans_skbs: u64,
    /// Retransmit attempts that failed (the tracepoint's `err` was non-zero).
    pub retrans_failed: u64,
    /// SYNs retransmitted in `SYN_SENT`.
    pub syn_retrans: u64,
    /// SYN-ACKs retransmitted by a listener for this flow.
    pub synack_retrans: u64,
    /// Events of this flow that were counted but not exported (over the export budget).
    pub suppressed: u64,
    /// Start (CLOCK_BOOTTIME ns) of the flow's current export window.
    pub window_start_ns: u64,
    /// Events exported in the current window.
    pub window_exported: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowCounters>() == 64);

/// One exported event (a perf sample). `flow_count` is the flow's running total for this kind
/// (segments for retransmits), read from the kernel map right after this event was counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpEvent {
    pub flow: FlowKey,
    /// CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`).
    pub timestamp_ns: u64,
    pub flow_count: u64,
    /// Segments this event stands for (`tcp_skb_pcount`; 1 for SYN and SYN-ACK).
    pub segs: u32,
    /// The tracepoint's `err` (0 on success).
    pub err: i32,
    /// Thread group of whatever ran on the CPU: often unrelated in softirq context.
    pub pid: u32,
    /// One of [`event_kind`].
    pub kind: u8,
    /// TCP state (`enum tcp_state`), 0 where the tracepoint has none.
    pub state: u8,
    /// Raw address family of the socket (`AF_INET` / `AF_INET6`).
    pub family: u16,
}
const _: () = assert!(size_of::<TcpEvent>() == 72);

/// Per-CPU statistics of the kernel programs, indexed by [`event_kind`] (index 0 unused).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KindStats {
    /// Every tracepoint hit of this kind.
    pub seen: u64,
    /// Segments (retransmits) or events (others) counted in the flow map.
    pub counted: u64,
    /// Events handed to the perf buffer.
    pub exported: u64,
    /// Events over the export budget (counted, not exported).
    pub suppressed: u64,
    /// Events that could not be counted per flow (flow map insert failed).
    pub map_full: u64,
    /// Events that failed to be read (a probe read failed).
    pub read_errors: u64,
}
const _: () = assert!(size_of::<KindStats>() == 48);

/// Offsets of the fields observer reads from `tcp:tcp_retransmit_skb`, taken from its tracefs
/// `format` file at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RetransmitSkbLayout {
    pub skbaddr: u16,
    pub skaddr: u16,
    pub state: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Offset of `err`, or [`FIELD_ABSENT`] on kernels before it was added.
    pub err: u16,
    pub _pad: [u16; 3],
}
const _: () = assert!(size_of::<RetransmitSkbLayout>() == 24);

/// Offsets of the fields observer reads from `tcp:tcp_retransmit_synack`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RetransmitSynackLayout {
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Offset of `skaddr` (the listener socket).
    pub skaddr: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(size_of::<RetransmitSynackLayout>() == 16);

/// Marks a field the running kernel does not have.
pub const FIELD_ABSENT: u16 = u16::MAX;

/// Kernel struct member offsets taken from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StructOffsets {
    /// `offsetof(struct sk_buff, cb)`.
    pub skb_cb: u16,
    /// `offsetof(struct tcp_skb_cb, tcp_gso_segs)` (what `tcp_skb_pcount` reads).
    pub tcp_skb_cb_gso_segs: u16,
    /// `offsetof(struct sock, __sk_common.skc_net)` (a `possible_net_t`, whose first member is
    /// the `struct net *`).
    pub sock_net: u16,
    /// `offsetof(struct net, ns.inum)`.
    pub net_ns_inum: u16,
    pub _pad: [u16; 4],
}
const _: () = assert!(size_of::<StructOffsets>() == 16);

/// How many events the kernel hands to the perf buffers; everything is counted regardless.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportBudget {
    /// Length of one export window.
    pub window_ns: u64,
    /// Events exported per flow per window (0 = no per-flow limit).
    pub per_flow: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ExportBudget>() == 16);

impl Default for ExportBudget {
    fn default() -> Self {
        Self {
            window_ns: 1_000_000_000,
            per_flow: 0,
            _pad: 0,
        }
    }
}

/// Everything the kernel programs learn from userspace at load time (the `CONFIG` global, set
/// with `EbpfLoader::override_global`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelConfig {
    pub retransmit_skb: RetransmitSkbLayout,
    pub retransmit_synack: RetransmitSynackLayout,
    pub offsets: StructOffsets,
    pub budget: ExportBudget,
}
const _: () = assert!(size_of::<KernelConfig>() == 72);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers and integer arrays with explicit
    // padding fields, so every bit pattern is a valid value and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TcpEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KindStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelConfig {}
}
