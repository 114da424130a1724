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
    /// A TCP packet freed with a drop reason (skb:kfree_skb).
    pub const DROP: u8 = 4;
    /// This host sent a RST.
    pub const RESET_SENT: u8 = 5;
    /// This host received a RST on a socket.
    pub const RESET_RECEIVED: u8 = 6;
    /// An active open completed (SYN_SENT -> ESTABLISHED): `duration_ns` is the connect latency.
    pub const CONNECT: u8 = 7;
    /// An active open failed (SYN_SENT -> CLOSE): refused or timed out, see `connect_outcome`.
    pub const CONNECT_FAILED: u8 = 8;
    /// A passive open completed (SYN_RECV -> ESTABLISHED).
    pub const ACCEPT: u8 = 9;
    /// A connection observed from its start was closed: `duration_ns` is its lifetime.
    pub const CLOSE: u8 = 10;
    /// One more than the highest kind: sizes the per-kind counter arrays.
    pub const COUNT: usize = 11;
}

/// How a failed connect ended (in `TcpEvent::aux8`).
pub mod connect_outcome {
    /// A RST answered the SYN (nothing listening, or a firewall rejecting).
    pub const REFUSED: u8 = 1;
    /// The socket closed while still in SYN_SENT without a RST: SYNs unanswered.
    pub const TIMEOUT: u8 = 2;
}

/// Direction of a dropped packet relative to this host (in `TcpEvent::aux8` of drops).
pub mod direction {
    /// The packet was being received (it has an input interface).
    pub const INBOUND: u8 = 1;
    /// The packet was being sent.
    pub const OUTBOUND: u8 = 2;
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

/// Which port of a flow its kernel counters leave out.
///
/// Packet-driven events of a handshake that did not complete (RSTs answering a SYN or sent
/// without a socket, failed connects, dropped SYNs and SYN-ACKs) are counted per *handshake key*: the flow with the
/// connecting side's ephemeral port set to 0, i.e. per (local address, peer address, service
/// port). A storm of failed connects then adds to one counter instead of creating one map entry
/// per attempt, which is what made such storms expensive; the exported events still carry the
/// whole 4-tuple.
pub mod key_wildcard {
    /// Counted per flow (the whole 4-tuple).
    pub const NONE: u8 = 0;
    /// This host connected: its own (ephemeral) port is left out.
    pub const LOCAL_PORT: u8 = 1;
    /// The peer connected: the peer's (ephemeral) port is left out.
    pub const REMOTE_PORT: u8 = 2;

    /// The (local, remote) ports of the counting key of a flow with these ports.
    #[inline(always)]
    pub fn ports(sport: u16, dport: u16, wildcard: u8) -> (u16, u16) {
        match wildcard {
            LOCAL_PORT => (0, dport),
            REMOTE_PORT => (sport, 0),
            _ => (sport, dport),
        }
    }
}

impl FlowKey {
    /// The key the kernel counts an event of this flow under (see [`key_wildcard`]).
    #[inline(always)]
    pub fn counting_key(&self, wildcard: u8) -> FlowKey {
        let mut key = *self;
        (key.sport, key.dport) = key_wildcard::ports(self.sport, self.dport, wildcard);
        key
    }
}

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
    /// Packets of this flow dropped with an exported drop reason.
    pub drops: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Active opens that reached ESTABLISHED with trouble (SYN retransmits, or slow): healthy
    /// connects, accepts and closes are counted per peer and listener (`ServiceStats`).
    pub connects: u64,
    pub connects_refused: u64,
    pub connects_timed_out: u64,
    /// Start (CLOCK_BOOTTIME ns) of the flow's current export window.
    pub window_start_ns: u64,
    /// Events exported in the current window.
    pub window_exported: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowCounters>() == 112);

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
    /// TCP state (`enum tcp_state`), 0 where the tracepoint has none. For state changes, the new
    /// state.
    pub state: u8,
    /// Raw address family of the socket (`AF_INET` / `AF_INET6`).
    pub family: u16,
    /// Connect latency, handshake time or connection lifetime (0 where not applicable).
    pub duration_ns: u64,
    /// Kernel address where a packet was dropped (kfree_skb `location`).
    pub location: u64,
    /// Drop reason (`enum skb_drop_reason`) or RST reason (`enum sk_rst_reason`), kernel numbering.
    pub reason: u32,
    /// Interface index a dropped packet arrived on (0: none / outbound).
    pub ifindex: u32,
    /// SYN retransmits of a connect, SYN-ACK retransmits of an accept, or smoothed RTT in µs.
    pub aux32: u32,
    /// Previous TCP state for state changes.
    pub old_state: u8,
    /// TCP header flags of a dropped packet.
    pub tcp_flags: u8,
    /// [`connect_outcome`] of a failed connect, [`direction`] of a drop.
    pub aux8: u8,
    /// Under which key the kernel counted this event: [`key_wildcard`] (see
    /// [`FlowKey::counting_key`]).
    pub key_wildcard: u8,
}
const _: () = assert!(size_of::<TcpEvent>() == 104);

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
    /// Bytes of the record the program copies (one read): the end of its last field.
    pub record_size: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(size_of::<RetransmitSkbLayout>() == 24);

/// Offsets of the fields observer reads from `tcp:tcp_retransmit_synack` (and, with the same
/// fields, `tcp:tcp_receive_reset`).
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
    /// Bytes of the record the program copies (one read): the end of its last field.
    pub record_size: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<RetransmitSynackLayout>() == 16);

/// `tcp:tcp_receive_reset` has the same fields as `tcp:tcp_retransmit_synack`.
pub type SockTupleLayout = RetransmitSynackLayout;

/// Offsets of the fields observer reads from `skb:kfree_skb`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KfreeSkbLayout {
    pub skbaddr: u16,
    pub location: u16,
    pub protocol: u16,
    pub reason: u16,
    /// `rx_sk` ([`FIELD_ABSENT`] before 6.11).
    pub rx_sk: u16,
    /// Bytes of the record the program copies (one read): the end of its last field.
    pub record_size: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(size_of::<KfreeSkbLayout>() == 16);

/// Offsets of the fields observer reads from `tcp:tcp_send_reset`.
///
/// Since 6.10 the addresses are `sockaddr_in6`-sized copies (`saddr[28]`, family and port
/// inside, [`SEND_RESET_SOCKADDR`]); before, separate `sport`/`dport`/`saddr_v6`/`daddr_v6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SendResetLayout {
    pub skaddr: u16,
    /// `skbaddr`: the packet answered, whose device names the namespace when there is no socket.
    pub skbaddr: u16,
    pub state: u16,
    /// `reason` ([`FIELD_ABSENT`] before 6.10).
    pub reason: u16,
    pub saddr: u16,
    pub daddr: u16,
    /// Used only with the old layout.
    pub sport: u16,
    pub dport: u16,
    /// [`SEND_RESET_SOCKADDR`] or [`SEND_RESET_SPLIT`].
    pub style: u16,
    /// Bytes of the record the program copies (one read): the end of its last field.
    pub record_size: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(size_of::<SendResetLayout>() == 24);

/// `tuple()` for the layouts of records that describe a socket with `TP_STORE_ADDRS`: the
/// offsets of `[saddr_v6, daddr_v6, sport, dport, family]`.
macro_rules! socket_tuple {
    ($($layout:ty),+) => {$(
        impl $layout {
            pub const fn tuple(&self) -> [u16; 5] {
                [self.saddr_v6, self.daddr_v6, self.sport, self.dport, self.family]
            }
        }
    )+};
}
socket_tuple!(RetransmitSkbLayout, RetransmitSynackLayout, SetStateLayout);

/// `saddr`/`daddr` are `struct sockaddr_in6`-sized copies (family, port, address inside).
pub const SEND_RESET_SOCKADDR: u16 = 1;
/// `sport`, `dport`, `saddr_v6`, `daddr_v6` fields.
pub const SEND_RESET_SPLIT: u16 = 2;

/// Offsets of the fields observer reads from `sock:inet_sock_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetStateLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    /// Bytes of the record the program copies (one read): the end of its last field.
    pub record_size: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(size_of::<SetStateLayout>() == 24);

/// Kernel struct member offsets for reading packets and sockets, from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketOffsets {
    /// `offsetof(struct sk_buff, head)` (pointer).
    pub skb_head: u16,
    /// `offsetof(struct sk_buff, network_header)` (u16 offset from head).
    pub skb_network_header: u16,
    /// `offsetof(struct sk_buff, transport_header)` (u16 offset from head).
    pub skb_transport_header: u16,
    /// `offsetof(struct sk_buff, dev)` (pointer).
    pub skb_dev: u16,
    /// `offsetof(struct sk_buff, skb_iif)` (int).
    pub skb_iif: u16,
    /// `offsetof(struct net_device, nd_net.net)` (pointer).
    pub dev_net: u16,
    /// `offsetof(struct tcp_sock, srtt_us)` (u32, RTT << 3).
    pub tcp_srtt_us: u16,
    /// The part of `struct sk_buff` the drop program copies in one read: from this offset,
    /// [`PacketOffsets::skb_window_len`] bytes, covering `head`, the header offsets, `dev` and
    /// `skb_iif`.
    pub skb_window_start: u16,
    pub skb_window_len: u16,
    /// `sk_buff.protocol` (big-endian EtherType), read by the raw drop program from the window.
    pub skb_protocol: u16,
    pub _pad: [u16; 2],
}
const _: () = assert!(size_of::<PacketOffsets>() == 24);

/// Largest tracepoint record (and `sk_buff` window) the programs copy in one read.
pub const RECORD_MAX: u16 = 256;

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
    /// `offsetof(struct sock, sk_err)` (int): ECONNREFUSED when a connect was answered by a RST.
    pub sock_err: u16,
    /// `offsetof(struct sock, __sk_common.skc_state)` (u8).
    pub sock_state: u16,
    pub _pad: [u16; 2],
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
    /// Events exported per CPU per window over all flows (0 = no limit): bounds the export cost
    /// of storms spread over many flows.
    pub per_cpu: u32,
    /// Bit mask of [`event_kind`]s that are exported at all (the others are only counted).
    pub kinds: u32,
    pub _pad: u32,
    /// A connect slower than this is trouble: counted per flow and exported even when
    /// `connect` is not an exported kind (0: no threshold).
    pub slow_connect_ns: u64,
}
const _: () = assert!(size_of::<ExportBudget>() == 32);

impl Default for ExportBudget {
    fn default() -> Self {
        Self {
            window_ns: 1_000_000_000,
            per_flow: 0,
            per_cpu: 0,
            kinds: u32::MAX,
            _pad: 0,
            slow_connect_ns: 0,
        }
    }
}

/// Per-CPU state of the per-CPU export budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuBudget {
    pub window_start_ns: u64,
    pub exported: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<CpuBudget>() == 16);

/// What a [`ServiceKey`] names.
pub mod service_role {
    /// A remote service this host connects to (its address and port).
    pub const PEER: u8 = 1;
    /// A local listener (its address and port) that accepts connections.
    pub const LISTENER: u8 = 2;
}

/// Key of the connection aggregates (`SERVICES`): a peer this host connects to, or a local
/// listener, in one network namespace. Healthy connections are counted here, never per flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The peer's address (peers) or the listener's local address (listeners), IPv4-mapped.
    pub addr: [u8; 16],
    pub port: u16,
    /// One of [`service_role`].
    pub role: u8,
    pub _pad: u8,
    pub netns: u32,
}
const _: () = assert!(size_of::<ServiceKey>() == 24);

/// Buckets of the aggregates' log2 histograms. Bucket 0 holds values under 1 µs, bucket `i`
/// values in `[2^(i-1), 2^i)` µs, the last bucket everything from `2^30` µs (about 18 minutes).
pub const HISTOGRAM_BUCKETS: usize = 32;

/// The log2 histogram bucket of a duration in nanoseconds (see [`HISTOGRAM_BUCKETS`]).
#[inline(always)]
pub fn histogram_bucket(ns: u64) -> usize {
    let us = ns / 1_000;
    let bucket = (u64::BITS - us.leading_zeros()) as usize;
    if bucket < HISTOGRAM_BUCKETS {
        bucket
    } else {
        HISTOGRAM_BUCKETS - 1
    }
}

/// Exact connection counts of one [`ServiceKey`], kept by the kernel in `SERVICES` (atomic adds).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connects that reached ESTABLISHED (peers), or accepted connections (listeners).
    pub established: u64,
    /// Connects answered by a RST (peers).
    pub refused: u64,
    /// Connects that closed in SYN_SENT without a RST (peers).
    pub timed_out: u64,
    /// SYN retransmits of the connects that were established (peers).
    pub syn_retransmits: u64,
    /// Connects slower than the slow-connect threshold (peers; exported as trouble).
    pub slow: u64,
    /// Followed connections that closed (their lifetimes are in `lifetime`).
    pub closes: u64,
    /// Sum of `handshake` in µs: connect latency (peers), handshake RTT (listeners).
    pub handshake_sum_us: u64,
    /// Sum of `lifetime` in µs.
    pub lifetime_sum_us: u64,
    /// Log2 histogram of connect latency (peers) or the handshake's RTT sample (listeners).
    pub handshake: [u64; HISTOGRAM_BUCKETS],
    /// Log2 histogram of connection lifetimes, established to close.
    pub lifetime: [u64; HISTOGRAM_BUCKETS],
}
const _: () = assert!(size_of::<ServiceStats>() == 64 + 16 * HISTOGRAM_BUCKETS);

impl Default for ServiceStats {
    fn default() -> Self {
        Self {
            established: 0,
            refused: 0,
            timed_out: 0,
            syn_retransmits: 0,
            slow: 0,
            closes: 0,
            handshake_sum_us: 0,
            lifetime_sum_us: 0,
            handshake: [0; HISTOGRAM_BUCKETS],
            lifetime: [0; HISTOGRAM_BUCKETS],
        }
    }
}

/// Per-socket state kept between state changes (connect latency, outcome, lifetime).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketState {
    /// When the socket entered SYN_SENT (active) or was seen first.
    pub opened_ns: u64,
    /// When it reached ESTABLISHED (0: not yet).
    pub established_ns: u64,
    pub syn_retransmits: u32,
    /// Non-zero when a RST was received.
    pub reset_received: u8,
    /// Non-zero for active opens.
    pub active: u8,
    /// Non-zero once `service` is set (at ESTABLISHED): the close adds to that aggregate
    /// without reading the socket again.
    pub has_service: u8,
    pub _pad: u8,
    /// The aggregate this connection is counted in.
    pub service: ServiceKey,
}
const _: () = assert!(size_of::<SocketState>() == 48);

/// Ways of one set of the socket table.
pub const SOCKET_WAYS: usize = 4;

/// One followed socket: its address (0: the way is free) and state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketWay {
    pub sk: u64,
    pub state: SocketState,
}
const _: () = assert!(size_of::<SocketWay>() == 56);

/// One set of the `SOCKETS` table: a socket lives in the set its address hashes to
/// ([`socket_set`]), in any free way. An array of sets costs no hash-map operation (no bucket
/// lock, no allocation), which a hash map paid on every connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketSet {
    pub ways: [SocketWay; SOCKET_WAYS],
}
const _: () = assert!(size_of::<SocketSet>() == 224);

/// Index of the set of socket `sk` in a table of `mask + 1` sets (a power of two). Socket
/// addresses are slab-aligned, so their low bits are not spread: a multiplicative hash is.
#[inline(always)]
pub fn socket_set(sk: u64, mask: u32) -> u32 {
    ((sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32) & mask
}

/// Sets of a socket table for `entries` sockets: a power of two, at least one.
pub fn socket_sets_for(entries: u32) -> u32 {
    entries
        .div_ceil(SOCKET_WAYS as u32)
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// Sizes of the tables the kernel programs index themselves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableSizes {
    /// `SOCKETS` has `socket_sets_mask + 1` sets.
    pub socket_sets_mask: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TableSizes>() == 8);

/// What the kernel programs did to their bounded tables, per CPU: `SOCKETS` evictions are
/// counted where they happen; `NETNS_DROPS` (an LRU map) evictions are derived by userspace
/// from the entries created and those still there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MapStats {
    /// Followed sockets lost to a full `SOCKETS` set: evicted for a newer one, or not
    /// admitted when another CPU took the way first. Each loses that connection's report.
    pub sockets_evicted: u64,
    /// `NETNS_DROPS` entries created.
    pub netns_drops_created: u64,
    /// `SERVICES` entries created (evictions are derived like the flow map's).
    pub services_created: u64,
    pub _reserved: u64,
}
const _: () = assert!(size_of::<MapStats>() == 32);

/// Where the state-change program reads a listener's drop counter and queue (offsets in
/// `struct sock` and beside it, from BTF). [`FIELD_ABSENT`] in `sk_drops` turns the listener
/// records off; in `sk_drop_counters`, the kernel has no per-NUMA drop counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerOffsets {
    /// `sock.sk_drops` (`atomic_t`).
    pub sk_drops: u16,
    /// `sock.sk_drop_counters` (`struct numa_drop_counters *`, Linux 6.18+): when set, the
    /// socket counts its drops there instead (`sk_drops_read`).
    pub sk_drop_counters: u16,
    /// `numa_drop_counters.drops0` and `.drops1` (`atomic_t` each; their sum is the count).
    pub numa_drops0: u16,
    pub numa_drops1: u16,
    /// `sock.sk_ack_backlog` and `sock.sk_max_ack_backlog` (u32): the accept queue and its limit.
    pub sk_ack_backlog: u16,
    pub sk_max_ack_backlog: u16,
    /// `sock.sk_socket` (`struct socket *`).
    pub sk_socket: u16,
    /// From a `struct socket *` to its inode's `i_ino` (what sock_diag reports as the socket's
    /// inode): `offsetof(socket_alloc, vfs_inode) - offsetof(socket_alloc, socket) +
    /// offsetof(inode, i_ino)`.
    pub socket_ino: u16,
}
const _: () = assert!(size_of::<ListenerOffsets>() == 16);

impl Default for ListenerOffsets {
    fn default() -> Self {
        Self {
            sk_drops: FIELD_ABSENT,
            sk_drop_counters: FIELD_ABSENT,
            numa_drops0: FIELD_ABSENT,
            numa_drops1: FIELD_ABSENT,
            sk_ack_backlog: FIELD_ABSENT,
            sk_max_ack_backlog: FIELD_ABSENT,
            sk_socket: FIELD_ABSENT,
            socket_ino: FIELD_ABSENT,
        }
    }
}

/// What happened to a listener (`ListenerChangeKey::change`).
pub mod listener_change {
    /// The socket entered LISTEN (`listen()`): its drop counter's value then is its baseline.
    pub const OPENED: u8 = 1;
    /// The socket left LISTEN (closed): its drop counter's final value.
    pub const CLOSED: u8 = 2;
}

/// Key of `LISTENER_CHANGES`: one listener socket's start or end.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ListenerChangeKey {
    /// Bound address (IPv4 as IPv4-mapped IPv6), all zeroes for a wildcard listener.
    pub addr: [u8; 16],
    pub netns: u32,
    /// The socket's inode (sock_diag's `idiag_inode`), 0 when it could not be read.
    pub inode: u32,
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// [`listener_change`].
    pub change: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<ListenerChangeKey>() == 32);

/// A listener's counters at the moment it entered or left LISTEN.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerChange {
    /// Boot-clock time of the change.
    pub time_ns: u64,
    /// `sk_drops_read()`: every `tcp_listendrop()` and discard of the listener so far.
    pub drops: u32,
    /// `sk_ack_backlog` and `sk_max_ack_backlog`.
    pub accept_queue: u32,
    pub backlog_limit: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ListenerChange>() == 24);

/// Key of the per-namespace drop counters: which namespace, which reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct NetnsReason {
    pub netns: u32,
    pub reason: u32,
}
const _: () = assert!(size_of::<NetnsReason>() == 8);

/// Values of the drop-reason filter (`DROP_REASON_FILTER`), bits.
pub mod drop_filter {
    /// Report drops of this reason (count and export them).
    pub const REPORT: u8 = 1;
    /// Also count them per network namespace (`NETNS_DROPS`): only for the reasons userspace
    /// attributes per namespace (netfilter rules), since the extra map update costs every drop.
    pub const PER_NAMESPACE: u8 = 2;
}

/// Size of the drop-reason tables (filter and counters); reasons at or above are ignored.
pub const MAX_DROP_REASONS: u32 = 512;

/// An argument position that a raw tracepoint does not have.
pub const ARG_ABSENT: u8 = u8::MAX;

/// Positions of a raw tracepoint's arguments (its `TP_PROTO` order, found by name in the
/// kernel's BTF), [`ARG_ABSENT`] when the running kernel's tracepoint lacks one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawArgs {
    /// `struct sock *`: the socket (the listener for a SYN-ACK retransmit).
    pub sk: u8,
    /// `struct sk_buff *`.
    pub skb: u8,
    /// `int err` (retransmit), `enum sk_rst_reason` (RST sent), `enum skb_drop_reason` (drop).
    pub reason: u8,
    /// `struct request_sock *` (SYN-ACK retransmit), `void *location` (drop), `int oldstate`.
    pub extra: u8,
    /// `struct sock *rx_sk` (drop), `int newstate` (state change).
    pub extra2: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<RawArgs>() == 8);

impl Default for RawArgs {
    fn default() -> Self {
        Self {
            sk: ARG_ABSENT,
            skb: ARG_ABSENT,
            reason: ARG_ABSENT,
            extra: ARG_ABSENT,
            extra2: ARG_ABSENT,
            _pad: [0; 3],
        }
    }
}

/// Where the raw tracepoint programs find a socket's addresses: `struct sock_common` offsets
/// from BTF. `request_sock` and `inet_timewait_sock` begin with the same struct, so these serve
/// for them too. Everything lies in one window starting at offset 0, copied with one read.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockOffsets {
    pub daddr: u16,
    pub rcv_saddr: u16,
    /// Remote port, big-endian.
    pub dport: u16,
    /// Local port, host order.
    pub num: u16,
    pub family: u16,
    pub state: u16,
    /// `possible_net_t` (a `struct net *`).
    pub net: u16,
    pub v6_daddr: u16,
    pub v6_rcv_saddr: u16,
    /// Bytes from offset 0 that hold every member above.
    pub window_len: u16,
    /// `sock.sk_protocol` (u16), outside the window: read only by the state-change program.
    pub protocol: u16,
    /// `inet_sock.inet_sport` (big-endian), outside the window: the local port of a full
    /// socket whose `skc_num` is already cleared (a close unbinds the port before the state
    /// change is traced).
    pub inet_sport: u16,
}
const _: () = assert!(size_of::<SockOffsets>() == 24);

/// Inputs of the raw tracepoint programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RawLayout {
    pub retransmit_skb: RawArgs,
    pub retransmit_synack: RawArgs,
    pub send_reset: RawArgs,
    pub receive_reset: RawArgs,
    pub kfree_skb: RawArgs,
    pub set_state: RawArgs,
    pub sock: SockOffsets,
}
const _: () = assert!(size_of::<RawLayout>() == 72);

/// Everything the kernel programs learn from userspace at load time (the `CONFIG` global, set
/// with `EbpfLoader::override_global`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelConfig {
    pub retransmit_skb: RetransmitSkbLayout,
    pub retransmit_synack: RetransmitSynackLayout,
    pub receive_reset: SockTupleLayout,
    pub send_reset: SendResetLayout,
    pub kfree_skb: KfreeSkbLayout,
    pub set_state: SetStateLayout,
    pub offsets: StructOffsets,
    pub packet: PacketOffsets,
    pub budget: ExportBudget,
    pub raw: RawLayout,
    pub tables: TableSizes,
    pub listener: ListenerOffsets,
}
const _: () = assert!(size_of::<KernelConfig>() == 288);

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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MapStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CpuBudget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetnsReason {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerChangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerChange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_log2_microseconds() {
        assert_eq!(histogram_bucket(0), 0);
        assert_eq!(histogram_bucket(999), 0);
        assert_eq!(histogram_bucket(1_000), 1);
        assert_eq!(histogram_bucket(1_999), 1);
        assert_eq!(histogram_bucket(2_000), 2);
        assert_eq!(histogram_bucket(1_000_000), 10); // 1 ms: [512, 1024) µs
        assert_eq!(histogram_bucket(1_000_000_000), 20); // 1 s
        assert_eq!(histogram_bucket(u64::MAX), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn socket_tables_are_powers_of_two_with_room_for_the_entries() {
        assert_eq!(socket_sets_for(0), 1);
        assert_eq!(socket_sets_for(1), 1);
        assert_eq!(socket_sets_for(16), 4);
        assert_eq!(socket_sets_for(17), 8);
        assert_eq!(socket_sets_for(65_536), 16_384);
        assert_eq!(socket_sets_for(4_194_304), 1 << 20);
        assert_eq!(socket_sets_for(u32::MAX), 1 << 30);
    }

    #[test]
    fn slab_aligned_sockets_spread_over_the_sets() {
        // 4,096 sockets as a slab hands them out (2,304-byte objects in 32 KiB slabs) over
        // 1,024 sets: no set may hold more than a few beyond the average of 4.
        let mask = socket_sets_for(4_096) - 1;
        assert_eq!(mask, 1_023);
        let mut per_set = [0u32; 1_024];
        for i in 0..4_096u64 {
            let sk = 0xffff_8881_0000_0000 + (i / 14) * 0x8000 + (i % 14) * 2_304;
            per_set[socket_set(sk, mask) as usize] += 1;
        }
        let fullest = per_set.iter().copied().max().unwrap_or(0);
        assert!(fullest <= 12, "fullest set holds {fullest}");
        assert!(per_set.iter().filter(|&&n| n == 0).count() < 100);
    }
}
