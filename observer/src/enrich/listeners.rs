//! Per-listener drop accounting: which listening socket refused connections, and why.
//!
//! When a listener's accept queue or SYN queue is full, the kernel frees the refused SYN (or
//! the handshake-completing ACK) with `consume_skb`: no `kfree_skb` drop reason fires, so the
//! eBPF programs see nothing. What moves (measured on Linux 6.18):
//! - per namespace: `TcpExtListenOverflows` (accept queue full), `TcpExtTCPReqQFullDrop`
//!   (SYN queue full with syncookies off), and `TcpExtListenDrops` (every refusal, including
//!   both of those and rarer ones such as the `tcp_max_syn_backlog` quarter rule);
//! - per listener: `sk_drops` (`SK_MEMINFO_DROPS` in sock_diag), bumped by the same
//!   `tcp_listendrop()` that bumps ListenDrops, so it counts every kind together.
//!
//! [`snapshot_listeners`] reads the per-listener side with sock_diag; the pure
//! [`ListenerTracker`] turns successive snapshots plus the namespace's counter deltas into
//! per-listener, per-cause drop counts. See [`ListenerTracker::update`] for how drops are
//! split by cause when several listeners drop in the same interval.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
};

use super::{
    netns,
    sockdiag::{self, Extensions, Family, SockDiagError, StateMask, TcpSocket, TcpState},
};

/// Namespace counter: SYN or ACK refused because the accept queue was full.
pub const LISTEN_OVERFLOWS: &str = "TcpExtListenOverflows";
/// Namespace counter: every `tcp_listendrop()` (the sum over listeners of their sk_drops
/// increments).
pub const LISTEN_DROPS: &str = "TcpExtListenDrops";
/// Namespace counter: SYN refused because the SYN queue was full and syncookies are off.
pub const REQ_Q_FULL_DROP: &str = "TcpExtTCPReqQFullDrop";

/// Errors taking a listener snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ListenersError {
    /// The calling thread's namespace could not be identified.
    #[error("cannot identify the current network namespace")]
    Netns(#[source] io::Error),
    /// The sock_diag dump of one family failed.
    #[error("sock_diag dump of {family:?} listeners failed")]
    Dump {
        family: Family,
        #[source]
        error: SockDiagError,
    },
}

/// One listening socket at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSnapshot {
    /// Inode of the listener's network namespace.
    pub netns: u64,
    pub family: Family,
    /// Bound address; unspecified (`0.0.0.0`, `::`) for a wildcard listener.
    pub addr: IpAddr,
    pub port: u16,
    /// Socket inode: tells apart SO_REUSEPORT siblings and a listener closed and reopened on
    /// the same port (whose drop counter restarts).
    pub inode: u32,
    /// `sk_max_ack_backlog`: `min(listen() backlog, net.core.somaxconn)`. Limits the accept
    /// queue, and the SYN queue too.
    pub backlog_limit: u32,
    /// `sk_ack_backlog`: connections established and waiting for `accept()`. The kernel
    /// refuses new ones when this exceeds `backlog_limit` (`sk_acceptq_is_full`).
    pub accept_queue: u32,
    /// Request sockets (half-open connections) attributed to this listener.
    pub syn_queue: u32,
    /// The listener's `sk_drops` (0 if the kernel did not report SK_MEMINFO).
    pub drops: u32,
}

impl ListenerSnapshot {
    pub fn key(&self) -> ListenerKey {
        ListenerKey {
            netns: self.netns,
            family: self.family,
            addr: self.addr,
            port: self.port,
            inode: self.inode,
        }
    }

    /// The kernel's `sk_acceptq_is_full`: `sk_ack_backlog > sk_max_ack_backlog`.
    pub fn accept_queue_full(&self) -> bool {
        self.accept_queue > self.backlog_limit
    }

    /// The SYN queue is at its limit: the next SYN is refused. `inet_csk_reqsk_queue_is_full`
    /// compares the request count with `sk_max_ack_backlog`: with `>` on Linux 6.18 (a backlog
    /// of 2 held 3 request sockets), with `>=` on older kernels; `>=` here covers both.
    pub fn syn_queue_full(&self) -> bool {
        self.syn_queue >= self.backlog_limit.max(1)
    }
}

/// Identity of a listener across snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns: u64,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u32,
}

/// Request sockets have neither meminfo nor tcp_info; a full socket in SYN_RECV (a Fast Open
/// child, already in the accept queue) has both when they were asked for.
fn is_request_socket(socket: &TcpSocket) -> bool {
    socket.state == TcpState::SynRecv && socket.drops.is_none() && socket.inode == 0
}

/// How well a listener matches a request socket's local address; `None` for no match.
/// Higher is better: exact address, then a wildcard of the same family, then an IPv6
/// wildcard (dual-stack) for an IPv4 request.
fn match_rank(listener: &ListenerSnapshot, request: &TcpSocket) -> Option<u8> {
    if listener.port != request.sport {
        return None;
    }
    if listener.family == request.family && listener.addr == request.saddr {
        Some(3)
    } else if listener.family == request.family && listener.addr.is_unspecified() {
        Some(2)
    } else if listener.family == Family::V6
        && request.family == Family::V4
        && listener.addr.is_unspecified()
    {
        Some(1)
    } else {
        None
    }
}

/// Builds listener snapshots from a dump of LISTEN and SYN_RECV sockets taken with
/// [`Extensions::MEMINFO`] (pure).
///
/// Each request socket is counted for the best-matching listener on its port: the exact
/// address, else a wildcard of the same family, else a dual-stack IPv6 wildcard. A
/// request socket does not name its listener, so among SO_REUSEPORT siblings (same address
/// and port) the one with the lowest inode gets them all.
pub fn listeners_from_sockets(netns: u64, sockets: &[TcpSocket]) -> Vec<ListenerSnapshot> {
    let mut listeners: Vec<ListenerSnapshot> = sockets
        .iter()
        .filter(|s| s.state == TcpState::Listen)
        .map(|s| ListenerSnapshot {
            netns,
            family: s.family,
            addr: s.saddr,
            port: s.sport,
            inode: s.inode,
            backlog_limit: s.wqueue,
            accept_queue: s.rqueue,
            syn_queue: 0,
            drops: s.drops.unwrap_or(0),
        })
        .collect();
    listeners.sort_by_key(ListenerSnapshot::key);
    for request in sockets.iter().filter(|s| is_request_socket(s)) {
        let best = listeners
            .iter_mut()
            .filter_map(|l| Some((match_rank(l, request)?, l)))
            // max_by_key keeps the last maximum; reverse so the lowest inode wins ties.
            .rev()
            .max_by_key(|(rank, _)| *rank);
        if let Some((_, listener)) = best {
            listener.syn_queue = listener.syn_queue.saturating_add(1);
        }
    }
    listeners
}

/// The listeners (IPv4 and IPv6) of the calling thread's network namespace, with their queue
/// lengths and drop counters. Call it inside [`in_namespace`](super::netns::in_namespace) for
/// another namespace.
///
/// Costs one sock_diag dump per family; asking for SYN_RECV walks the established hash, so the
/// cost grows with the namespace's connection count.
pub fn snapshot_listeners() -> Result<Vec<ListenerSnapshot>, ListenersError> {
    let netns = netns::current_inode().map_err(ListenersError::Netns)?;
    let mut sockets = Vec::new();
    for family in Family::ALL {
        let dump = sockdiag::dump_tcp(
            family,
            StateMask::LISTEN | StateMask::SYN_RECV,
            Extensions::MEMINFO,
        )
        .map_err(|error| ListenersError::Dump { family, error })?;
        sockets.extend(dump);
    }
    Ok(listeners_from_sockets(netns, &sockets))
}

/// Drops of one listener over one interval, by cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerDrops {
    pub key: ListenerKey,
    /// Refusals because the accept queue was full (share of `TcpExtListenOverflows`).
    pub accept_queue_overflows: u64,
    /// Refusals because the SYN queue was full (share of `TcpExtTCPReqQFullDrop`).
    pub syn_queue_drops: u64,
    /// Other `tcp_listendrop()` causes, such as the `tcp_max_syn_backlog` quarter rule
    /// (syncookies off) or memory and routing failures (share of `TcpExtListenDrops` less
    /// the two above).
    pub other_drops: u64,
    /// At the end of the interval.
    pub backlog_limit: u32,
    pub accept_queue: u32,
    pub syn_queue: u32,
}

impl ListenerDrops {
    /// All listen drops of the listener in the interval (at most its sk_drops delta, which
    /// also counts discarded packets that were no listen drop).
    pub fn total(&self) -> u64 {
        self.accept_queue_overflows + self.syn_queue_drops + self.other_drops
    }
}

/// One namespace's listener drops over one interval.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceListenDrops {
    pub netns: u64,
    /// The namespace counter deltas used for the split.
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub req_q_full_drops: u64,
    /// Overflows and SYN-queue drops left over after attribution: drops of listeners that
    /// closed, or were first seen, during the interval.
    pub unattributed_overflows: u64,
    pub unattributed_syn_queue_drops: u64,
    /// Every listener present now, sorted by key; drops are 0 for listeners seen for the first
    /// time (their counter is the baseline).
    pub listeners: Vec<ListenerDrops>,
}

/// Turns successive listener snapshots into per-interval, per-cause drop counts (pure).
#[derive(Debug, Default)]
pub struct ListenerTracker {
    previous: HashMap<u64, BTreeMap<ListenerKey, ListenerSnapshot>>,
}

impl ListenerTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the snapshots of namespace `netns` taken at the end of an interval, and that
    /// namespace's counter deltas over the same interval
    /// ([`counters::delta`](super::counters::delta)); returns the interval's drops.
    /// Snapshots of other namespaces are ignored.
    ///
    /// Per listener, the drops are its sk_drops increase (u32, wrapping). They are split by
    /// cause with the namespace's `ListenOverflows` (O) and `TCPReqQFullDrop` (Q) deltas:
    /// 1. Overflows go first to listeners whose accept queue was full at the start or end of
    ///    the interval, in proportion to their drops and never more than those; what is left
    ///    of O goes to all listeners in proportion to their drops not yet attributed.
    /// 2. Q is attributed the same way, preferring listeners whose SYN queue was full.
    /// 3. `ListenDrops - O - Q` is attributed as `other_drops` in proportion to the drops
    ///    still unexplained. The rest of sk_drops is no listen drop: the kernel also counts
    ///    packets the listener discarded there, and counts an overflow on a handshake's final
    ///    ACK (the request socket's path) twice.
    ///
    /// When one listener accounts for all the drops of its namespace in the interval (the
    /// usual case) the split is exact. With several, it is exact for each listener whose queue
    /// state shows the cause; otherwise it is an estimate by proportion (largest remainder,
    /// so the parts add up). Counters read a moment apart from the snapshots can disagree by
    /// the drops that happened in between; the excess is reported as unattributed.
    pub fn update(
        &mut self,
        netns: u64,
        listeners: &[ListenerSnapshot],
        counter_delta: &BTreeMap<String, u64>,
    ) -> NamespaceListenDrops {
        let current: BTreeMap<ListenerKey, ListenerSnapshot> = listeners
            .iter()
            .filter(|l| l.netns == netns)
            .map(|l| (l.key(), l.clone()))
            .collect();
        // A namespace seen before has a baseline for every listener it had then: a listener
        // that is new since counts its drops from zero (its sk_drops started at zero when it
        // was created). In a namespace seen for the first time, existing drops are history.
        let namespace_known = self.previous.contains_key(&netns);
        let previous = self.previous.remove(&netns).unwrap_or_default();
        let counter = |name: &str| counter_delta.get(name).copied().unwrap_or(0);
        let overflows = counter(LISTEN_OVERFLOWS);
        let req_q_full = counter(REQ_Q_FULL_DROP);

        let entries: Vec<(&ListenerSnapshot, Option<&ListenerSnapshot>)> = current
            .values()
            .map(|now| (now, previous.get(&now.key())))
            .collect();
        let drops: Vec<u64> = entries
            .iter()
            .map(|(now, before)| match before {
                Some(before) => u64::from(now.drops.wrapping_sub(before.drops)),
                None if namespace_known => u64::from(now.drops),
                None => 0,
            })
            .collect();

        let accept_full: Vec<bool> = entries
            .iter()
            .map(|(now, before)| {
                now.accept_queue_full() || before.is_some_and(|b| b.accept_queue_full())
            })
            .collect();
        let (overflow_parts, unattributed_overflows) = attribute(overflows, &drops, &accept_full);
        let remaining: Vec<u64> = drops
            .iter()
            .zip(&overflow_parts)
            .map(|(d, o)| d - o)
            .collect();
        let syn_full: Vec<bool> = entries
            .iter()
            .map(|(now, before)| now.syn_queue_full() || before.is_some_and(|b| b.syn_queue_full()))
            .collect();
        let (syn_parts, unattributed_syn_queue_drops) =
            attribute(req_q_full, &remaining, &syn_full);
        // sk_drops also counts packets the listener discarded that were no listen drop, and
        // counts an overflow on a handshake's final ACK twice (tcp_listendrop, then the
        // discard in tcp_v4_rcv): only the namespace's other listen drops are reported.
        let other_listen_drops = counter(LISTEN_DROPS).saturating_sub(overflows + req_q_full);
        let unexplained: Vec<u64> = remaining
            .iter()
            .zip(&syn_parts)
            .map(|(r, s)| r - s)
            .collect();
        let other_parts = proportional(other_listen_drops, &unexplained);

        let listeners = entries
            .iter()
            .enumerate()
            .map(|(i, (now, _))| ListenerDrops {
                key: now.key(),
                accept_queue_overflows: overflow_parts[i],
                syn_queue_drops: syn_parts[i],
                other_drops: other_parts[i],
                backlog_limit: now.backlog_limit,
                accept_queue: now.accept_queue,
                syn_queue: now.syn_queue,
            })
            .collect();
        self.previous.insert(netns, current);
        NamespaceListenDrops {
            netns,
            listen_overflows: overflows,
            listen_drops: counter(LISTEN_DROPS),
            req_q_full_drops: req_q_full,
            unattributed_overflows,
            unattributed_syn_queue_drops,
            listeners,
        }
    }

    /// Forgets a namespace that no longer exists.
    pub fn forget(&mut self, netns: u64) {
        self.previous.remove(&netns);
    }
}

/// Attributes `pool` events to listeners with `caps` (upper bounds), first among the
/// `preferred` ones, then among all; returns the parts and what could not be attributed.
fn attribute(pool: u64, caps: &[u64], preferred: &[bool]) -> (Vec<u64>, u64) {
    let preferred_caps: Vec<u64> = caps
        .iter()
        .zip(preferred)
        .map(|(&cap, &p)| if p { cap } else { 0 })
        .collect();
    let first = proportional(pool, &preferred_caps);
    let left = pool - first.iter().sum::<u64>();
    let rest_caps: Vec<u64> = caps.iter().zip(&first).map(|(c, f)| c - f).collect();
    let second = proportional(left, &rest_caps);
    let parts: Vec<u64> = first.iter().zip(&second).map(|(a, b)| a + b).collect();
    let unattributed = left - second.iter().sum::<u64>();
    (parts, unattributed)
}

/// Splits `pool` in proportion to `caps`, each part at most its cap, summing to
/// `min(pool, sum(caps))` (largest-remainder rounding; ties to the earlier entry).
fn proportional(pool: u64, caps: &[u64]) -> Vec<u64> {
    let total: u128 = caps.iter().map(|&c| u128::from(c)).sum();
    if pool == 0 || total == 0 {
        return vec![0; caps.len()];
    }
    if u128::from(pool) >= total {
        return caps.to_vec();
    }
    let pool = u128::from(pool);
    // pool < total, so each floor share is below its cap and fits in u64.
    let mut parts: Vec<u64> = caps
        .iter()
        .map(|&c| u64::try_from(pool * u128::from(c) / total).unwrap_or(c))
        .collect();
    let given: u128 = parts.iter().map(|&p| u128::from(p)).sum();
    let mut by_remainder: Vec<(u128, usize)> = caps
        .iter()
        .enumerate()
        .map(|(i, &c)| (pool * u128::from(c) % total, i))
        .filter(|(remainder, _)| *remainder > 0)
        .collect();
    by_remainder.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = usize::try_from(pool - given).unwrap_or(usize::MAX);
    for &(_, i) in by_remainder.iter().take(left) {
        parts[i] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const NS: u64 = 4026531840;

    fn listener(
        port: u16,
        inode: u32,
        limit: u32,
        accept: u32,
        syn: u32,
        drops: u32,
    ) -> ListenerSnapshot {
        ListenerSnapshot {
            netns: NS,
            family: Family::V4,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port,
            inode,
            backlog_limit: limit,
            accept_queue: accept,
            syn_queue: syn,
            drops,
        }
    }

    fn counters(overflows: u64, drops: u64, reqq: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([
            (LISTEN_OVERFLOWS.to_owned(), overflows),
            (LISTEN_DROPS.to_owned(), drops),
            (REQ_Q_FULL_DROP.to_owned(), reqq),
        ])
    }

    #[test]
    fn first_sight_is_a_baseline() {
        let mut tracker = ListenerTracker::new();
        let out = tracker.update(NS, &[listener(80, 1, 128, 0, 0, 500)], &counters(5, 5, 0));
        assert_eq!(out.listeners.len(), 1);
        assert_eq!(out.listeners[0].total(), 0);
        assert_eq!(out.unattributed_overflows, 5);
    }

    #[test]
    fn single_listener_split_is_exact() {
        let mut tracker = ListenerTracker::new();
        tracker.update(NS, &[listener(80, 1, 4, 0, 0, 10)], &BTreeMap::new());
        // 7 overflows + 3 SYN-queue drops + 2 other (max_syn_backlog rule) = 12.
        let out = tracker.update(NS, &[listener(80, 1, 4, 0, 0, 22)], &counters(7, 12, 3));
        let l = &out.listeners[0];
        assert_eq!(
            (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops),
            (7, 3, 2)
        );
        assert_eq!(
            out.unattributed_overflows + out.unattributed_syn_queue_drops,
            0
        );
        // The queue state does not matter when one listener has all the drops.
        assert!(
            !tracker
                .update(NS, &[listener(80, 1, 4, 0, 0, 22)], &BTreeMap::new())
                .listeners
                .iter()
                .any(|l| l.total() > 0)
        );
    }

    #[test]
    fn discards_beyond_listen_drops_are_not_reported_as_drops() {
        // Measured on 6.18: 2 overflows on handshakes' final ACKs raised the listener's
        // sk_drops by 4 and ListenDrops by 2; a later interval adds 3 plain discards.
        let mut tracker = ListenerTracker::new();
        tracker.update(NS, &[listener(80, 1, 1, 0, 0, 0)], &BTreeMap::new());
        let out = tracker.update(NS, &[listener(80, 1, 1, 2, 0, 4)], &counters(2, 2, 0));
        let l = &out.listeners[0];
        assert_eq!(
            (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops),
            (2, 0, 0)
        );
        let out = tracker.update(NS, &[listener(80, 1, 1, 2, 0, 7)], &counters(0, 0, 0));
        assert_eq!(out.listeners[0].total(), 0);
        // Other listen drops are still reported, no more than the namespace counted.
        let out = tracker.update(NS, &[listener(80, 1, 1, 2, 0, 12)], &counters(1, 3, 0));
        let l = &out.listeners[0];
        assert_eq!(
            (l.accept_queue_overflows, l.syn_queue_drops, l.other_drops),
            (1, 0, 2)
        );
    }

    #[test]
    fn overflows_go_to_the_listener_with_a_full_accept_queue() {
        let mut tracker = ListenerTracker::new();
        let a = |drops, accept| listener(80, 1, 2, accept, 0, drops);
        let b = |drops, syn| listener(443, 2, 2, 0, syn, drops);
        tracker.update(NS, &[a(0, 0), b(0, 0)], &BTreeMap::new());
        let out = tracker.update(NS, &[a(6, 3), b(4, 2)], &counters(6, 10, 4));
        let (la, lb) = (&out.listeners[0], &out.listeners[1]);
        assert_eq!(la.key.port, 80);
        assert_eq!(
            (
                la.accept_queue_overflows,
                la.syn_queue_drops,
                la.other_drops
            ),
            (6, 0, 0)
        );
        assert_eq!(
            (
                lb.accept_queue_overflows,
                lb.syn_queue_drops,
                lb.other_drops
            ),
            (0, 4, 0)
        );
        assert_eq!((la.accept_queue, la.backlog_limit), (3, 2));
        assert_eq!(lb.syn_queue, 2);
    }

    #[test]
    fn full_queue_at_the_start_of_the_interval_counts() {
        // The accept queue was full when the interval began and drained since.
        let mut tracker = ListenerTracker::new();
        tracker.update(
            NS,
            &[listener(80, 1, 1, 2, 0, 0), listener(81, 2, 1, 0, 0, 0)],
            &BTreeMap::new(),
        );
        let out = tracker.update(
            NS,
            &[listener(80, 1, 1, 0, 0, 3), listener(81, 2, 1, 0, 0, 3)],
            &counters(3, 6, 0),
        );
        assert_eq!(out.listeners[0].accept_queue_overflows, 3);
        assert_eq!(out.listeners[1].accept_queue_overflows, 0);
        assert_eq!(out.listeners[1].other_drops, 3);
    }

    #[test]
    fn without_queue_evidence_split_is_proportional_and_adds_up() {
        let mut tracker = ListenerTracker::new();
        let ls = |a, b, c| {
            [
                listener(1, 1, 128, 0, 0, a),
                listener(2, 2, 128, 0, 0, b),
                listener(3, 3, 128, 0, 0, c),
            ]
        };
        tracker.update(NS, &ls(0, 0, 0), &BTreeMap::new());
        // 10 drops: 5, 3, 2; 7 overflows, 3 other.
        let out = tracker.update(NS, &ls(5, 3, 2), &counters(7, 10, 0));
        let parts: Vec<u64> = out
            .listeners
            .iter()
            .map(|l| l.accept_queue_overflows)
            .collect();
        assert_eq!(parts.iter().sum::<u64>(), 7);
        // 7 * 5/10 = 3.5, 7 * 3/10 = 2.1, 7 * 2/10 = 1.4 -> 3, 2, 1 + one for the largest
        // remainder (first listener).
        assert_eq!(parts, vec![4, 2, 1]);
        for l in &out.listeners {
            assert!(l.accept_queue_overflows <= l.total());
        }
        assert_eq!(
            out.listeners.iter().map(ListenerDrops::total).sum::<u64>(),
            10
        );
    }

    #[test]
    fn counter_wrap_and_reopened_listener() {
        let mut tracker = ListenerTracker::new();
        tracker.update(
            NS,
            &[listener(80, 1, 8, 0, 0, u32::MAX - 1)],
            &BTreeMap::new(),
        );
        let out = tracker.update(NS, &[listener(80, 1, 8, 0, 0, 2)], &counters(4, 4, 0));
        assert_eq!(out.listeners[0].accept_queue_overflows, 4);
        // Same port, new socket (new inode): a new baseline, not a negative delta.
        let out = tracker.update(NS, &[listener(80, 9, 8, 0, 0, 0)], &BTreeMap::new());
        assert_eq!(out.listeners[0].key.inode, 9);
        assert_eq!(out.listeners[0].total(), 0);
    }

    #[test]
    fn more_counted_than_seen_is_unattributed() {
        let mut tracker = ListenerTracker::new();
        tracker.update(NS, &[listener(80, 1, 8, 0, 0, 0)], &BTreeMap::new());
        let out = tracker.update(NS, &[listener(80, 1, 8, 0, 0, 2)], &counters(3, 5, 2));
        let l = &out.listeners[0];
        assert_eq!((l.accept_queue_overflows, l.syn_queue_drops), (2, 0));
        assert_eq!(out.unattributed_overflows, 1);
        assert_eq!(out.unattributed_syn_queue_drops, 2);
    }

    #[test]
    fn other_namespaces_are_separate() {
        let mut tracker = ListenerTracker::new();
        let mut other = listener(80, 1, 8, 0, 0, 0);
        other.netns = NS + 1;
        let out = tracker.update(
            NS,
            &[listener(80, 1, 8, 0, 0, 0), other.clone()],
            &BTreeMap::new(),
        );
        assert_eq!(out.listeners.len(), 1);
        other.drops = 5;
        let out = tracker.update(NS + 1, &[other], &counters(5, 5, 0));
        // First sight in NS+1: baseline.
        assert_eq!(out.listeners[0].total(), 0);
    }

    #[test]
    fn proportional_rounding() {
        assert_eq!(proportional(0, &[1, 2]), vec![0, 0]);
        assert_eq!(proportional(5, &[0, 0]), vec![0, 0]);
        assert_eq!(proportional(10, &[1, 2]), vec![1, 2]);
        assert_eq!(proportional(1, &[1, 1]), vec![1, 0]);
        assert_eq!(proportional(2, &[1, 1, 1]), vec![1, 1, 0]);
        // Largest remainder: the second entry's fraction (almost 1) beats the first's.
        assert_eq!(
            proportional(u64::MAX - 1, &[u64::MAX, 1]),
            vec![u64::MAX - 2, 1]
        );
    }

    fn sock(family: Family, state: TcpState, saddr: IpAddr, sport: u16, inode: u32) -> TcpSocket {
        TcpSocket {
            family,
            state,
            saddr,
            sport,
            daddr: if family == Family::V4 {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            dport: 0,
            inode,
            cookie: 0,
            uid: 0,
            rqueue: 1,
            wqueue: 16,
            drops: (state == TcpState::Listen).then_some(3),
            tcp_info: None,
        }
    }

    #[test]
    fn request_sockets_count_for_the_most_specific_listener() {
        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let other4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let sockets = vec![
            sock(Family::V4, TcpState::Listen, lo4, 80, 10),
            sock(Family::V4, TcpState::Listen, any4, 80, 11),
            sock(Family::V6, TcpState::Listen, any6, 8080, 12),
            sock(Family::V4, TcpState::Listen, any4, 9000, 14),
            sock(Family::V4, TcpState::Listen, any4, 9000, 13), // SO_REUSEPORT sibling
            // 2 requests to 127.0.0.1:80 (exact), 1 to 10.0.0.1:80 (wildcard)
            sock(Family::V4, TcpState::SynRecv, lo4, 80, 0),
            sock(Family::V4, TcpState::SynRecv, lo4, 80, 0),
            sock(Family::V4, TcpState::SynRecv, other4, 80, 0),
            // v4 request on a dual-stack v6 listener
            sock(Family::V4, TcpState::SynRecv, other4, 8080, 0),
            // reuseport group: lowest inode
            sock(Family::V4, TcpState::SynRecv, other4, 9000, 0),
            // no listener
            sock(Family::V4, TcpState::SynRecv, other4, 7, 0),
            // Fast Open child in SYN_RECV: a full socket, not a queue entry
            TcpSocket {
                drops: Some(0),
                ..sock(Family::V4, TcpState::SynRecv, lo4, 80, 0)
            },
        ];
        let listeners = listeners_from_sockets(NS, &sockets);
        let syn: BTreeMap<(u16, u32), u32> = listeners
            .iter()
            .map(|l| ((l.port, l.inode), l.syn_queue))
            .collect();
        assert_eq!(
            syn,
            BTreeMap::from([
                ((80, 10), 2),
                ((80, 11), 1),
                ((8080, 12), 1),
                ((9000, 13), 1),
                ((9000, 14), 0),
            ])
        );
        let l = &listeners[0];
        assert_eq!(
            (l.accept_queue, l.backlog_limit, l.drops, l.netns),
            (1, 16, 3, NS)
        );
    }
}
