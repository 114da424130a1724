//! Per-interval, per-cause drop counts of every listener, from successive sock_diag snapshots,
//! the listener starts and ends the kernel programs recorded, and the namespace's counters.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use observer_common::{ListenerChange, ListenerChangeKey, listener_change};

use super::{
    Family, LISTEN_DROPS, LISTEN_OVERFLOWS, ListenerKey, ListenerSnapshot, REQ_Q_FULL_DROP,
};

/// Opened records kept for listeners not yet seen in a snapshot, at most (a bound only: each
/// is consumed when its listener is first seen or closes).
const MAX_PENDING_OPENED: usize = 4096;

/// Whether a listener entered or left LISTEN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `listen()`: the drop counter's value is where the listener's drops start.
    Opened,
    /// The listener closed: the drop counter's final value.
    Closed,
}

/// A listener entering or leaving LISTEN, as the state-change program saw it (pure data from
/// the kernel's `LISTENER_CHANGES` map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerEvent {
    pub key: ListenerKey,
    pub change: Change,
    /// `sk_drops` at that moment.
    pub drops: u32,
    pub accept_queue: u32,
    pub backlog_limit: u32,
}

impl ListenerEvent {
    /// Decodes one map entry; `None` for a family or change observer does not know.
    pub fn from_kernel(key: &ListenerChangeKey, value: &ListenerChange) -> Option<Self> {
        let (family, addr) = match key.family {
            2 => {
                let [.., a, b, c, d] = key.addr;
                (Family::V4, IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            10 => (Family::V6, IpAddr::V6(Ipv6Addr::from(key.addr))),
            _ => return None,
        };
        let change = match key.change {
            listener_change::OPENED => Change::Opened,
            listener_change::CLOSED => Change::Closed,
            _ => return None,
        };
        Some(Self {
            key: ListenerKey {
                netns: u64::from(key.netns),
                family,
                addr,
                port: key.port,
                inode: key.inode,
            },
            change,
            drops: value.drops,
            accept_queue: value.accept_queue,
            backlog_limit: value.backlog_limit,
        })
    }

    /// Whether this event is about listener `key`: the same socket, or (when the program could
    /// not read the socket's inode) the same address and port.
    fn names(&self, key: &ListenerKey) -> bool {
        let ListenerKey {
            netns,
            family,
            addr,
            port,
            inode,
        } = self.key;
        netns == key.netns
            && family == key.family
            && addr == key.addr
            && port == key.port
            && (inode == key.inode || inode == 0)
    }
}

/// Drops of one listener over one interval, by cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerDrops {
    pub key: ListenerKey,
    /// Refusals because the accept queue was full (share of `TcpExtListenOverflows`).
    pub accept_queue_overflows: u64,
    /// Refusals because the SYN queue was full: its share of `TcpExtTCPReqQFullDrop` (the
    /// queue at the listen backlog), and of the other `ListenDrops` when the queue was at the
    /// `tcp_max_syn_backlog` limit with syncookies off (see [`SynBacklogRule`]).
    pub syn_queue_drops: u64,
    /// Other `tcp_listendrop()` causes, such as memory and routing failures (share of
    /// `TcpExtListenDrops` less the two above).
    pub other_drops: u64,
    /// At the end of the interval (at the close, for a listener that closed).
    pub backlog_limit: u32,
    pub accept_queue: u32,
    pub syn_queue: u32,
    /// The listener closed during the interval: these are its last drops.
    pub closed: bool,
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
    /// Overflows and SYN-queue drops left over after attribution: drops of listeners whose
    /// counter observer could not follow (seen first in a namespace observer did not know).
    pub unattributed_overflows: u64,
    pub unattributed_syn_queue_drops: u64,
    /// Every listener present now and every one that closed in the interval, sorted by key;
    /// drops are 0 for listeners whose start observer did not see (their counter is the
    /// baseline).
    pub listeners: Vec<ListenerDrops>,
}

/// The kernel's other SYN-queue limit (`tcp_conn_request`): with syncookies off, a SYN is
/// refused once `tcp_max_syn_backlog - queue < tcp_max_syn_backlog / 4` (the last quarter is
/// kept for peers proven alive). It counts in `ListenDrops` but not in `TCPReqQFullDrop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynBacklogRule {
    /// `net.ipv4.tcp_max_syn_backlog` of the namespace.
    pub max_syn_backlog: u32,
}

impl SynBacklogRule {
    /// The rule from a namespace's sysctls: `None` when syncookies are on (or unknown), since
    /// then the rule does not apply.
    pub fn from_sysctls(syncookies: Option<&str>, max_syn_backlog: Option<&str>) -> Option<Self> {
        let cookies_off = syncookies?.trim() == "0";
        let max_syn_backlog = max_syn_backlog?.trim().parse().ok()?;
        cookies_off.then_some(Self { max_syn_backlog })
    }

    /// The rule refuses a SYN at this SYN-queue length (the kernel's expression, in signed
    /// arithmetic as there).
    pub fn refuses(&self, syn_queue: u32) -> bool {
        let max = i64::from(self.max_syn_backlog);
        max - i64::from(syn_queue) < (max >> 2)
    }
}

/// What happened in one namespace over one interval.
#[derive(Debug, Clone, Copy)]
pub struct Interval<'a> {
    /// The listeners at the end of the interval (snapshots of other namespaces are ignored).
    pub listeners: &'a [ListenerSnapshot],
    /// Listener starts and ends recorded by the kernel programs since the last interval (of
    /// this namespace; others are ignored).
    pub changes: &'a [ListenerEvent],
    /// The namespace's counter deltas over the interval
    /// ([`counters::delta`](crate::enrich::counters::delta)).
    pub counter_delta: &'a BTreeMap<String, u64>,
    /// The `tcp_max_syn_backlog` rule, when syncookies are off in the namespace.
    pub syn_backlog_rule: Option<SynBacklogRule>,
}

/// Turns successive listener snapshots into per-interval, per-cause drop counts (pure).
#[derive(Debug, Default)]
pub struct ListenerTracker {
    previous: HashMap<u64, BTreeMap<ListenerKey, ListenerSnapshot>>,
    /// Drop counters of listeners that started (opened records) and were not in a snapshot yet.
    opened: HashMap<ListenerKey, u32>,
}

/// One listener's part of an interval.
struct Entry<'a> {
    key: ListenerKey,
    before: Option<&'a ListenerSnapshot>,
    /// Drops over the interval (sk_drops increase).
    drops: u64,
    backlog_limit: u32,
    accept_queue: u32,
    syn_queue: u32,
    accept_full_now: bool,
    closed: bool,
}

impl ListenerTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A namespace that appeared during the run: everything in it counts from zero (its
    /// listeners' counters and its namespace counters started at zero when it was created).
    /// Call before its first [`update`](Self::update).
    pub fn namespace_appeared(&mut self, netns: u64) {
        self.previous.entry(netns).or_default();
    }

    /// Feeds the end of an interval in namespace `netns`; returns the interval's drops.
    ///
    /// Per listener, the drops are its sk_drops increase (u32, wrapping) since the previous
    /// snapshot, or since it started (an opened record), to its value now or when it closed
    /// (a closed record). A listener first seen in a namespace observer already knew started
    /// during the run and counts from zero; one first seen in a namespace seen for the first
    /// time (not [appeared](Self::namespace_appeared)) has history, its baseline.
    ///
    /// The drops are split by cause with the namespace's `ListenOverflows` (O) and
    /// `TCPReqQFullDrop` (Q) deltas:
    /// 1. Overflows go first to listeners whose accept queue was full at the start or end of
    ///    the interval, in proportion to their drops and never more than those; what is left
    ///    of O goes to all listeners in proportion to their drops not yet attributed.
    /// 2. Q is attributed the same way, preferring listeners whose SYN queue was full.
    /// 3. `ListenDrops - O - Q` goes as SYN-queue drops to listeners whose SYN queue was at the
    ///    `tcp_max_syn_backlog` limit (syncookies off), in proportion to their drops still
    ///    unexplained; the rest as `other_drops` in proportion to what is still unexplained.
    ///    The rest of sk_drops is no listen drop: the kernel also counts packets the listener
    ///    discarded there, and counts an overflow on a handshake's final ACK (the request
    ///    socket's path) twice.
    ///
    /// When one listener accounts for all the drops of its namespace in the interval (the
    /// usual case) the split is exact. With several, it is exact for each listener whose queue
    /// state shows the cause; otherwise it is an estimate by proportion (largest remainder,
    /// so the parts add up). Counters read a moment apart from the snapshots can disagree by
    /// the drops that happened in between; the excess is reported as unattributed.
    pub fn update(&mut self, netns: u64, interval: &Interval<'_>) -> NamespaceListenDrops {
        let current: BTreeMap<ListenerKey, ListenerSnapshot> = interval
            .listeners
            .iter()
            .filter(|l| l.netns == netns)
            .map(|l| (l.key(), l.clone()))
            .collect();
        let changes: Vec<&ListenerEvent> = interval
            .changes
            .iter()
            .filter(|c| c.key.netns == netns)
            .collect();
        if self.opened.len() > MAX_PENDING_OPENED {
            self.opened.clear();
        }
        for c in changes.iter().filter(|c| c.change == Change::Opened) {
            self.opened.insert(c.key, c.drops);
        }
        let namespace_known = self.previous.contains_key(&netns);
        let previous = self.previous.remove(&netns).unwrap_or_default();
        let mut closes: Vec<&ListenerEvent> = changes
            .iter()
            .copied()
            .filter(|c| c.change == Change::Closed)
            .collect();

        let mut entries = Vec::with_capacity(current.len() + closes.len());
        let mut closed_now = Vec::new();
        for now in current.values() {
            let key = now.key();
            let before = previous.get(&key);
            let opened = self.take_opened(&key);
            // Closed after this snapshot was taken: its last value is the close's.
            let close = closes
                .iter()
                .position(|c| c.names(&key))
                .map(|i| closes.swap_remove(i));
            let last = close.map_or(now.drops, |c| c.drops);
            let start = before
                .map(|b| b.drops)
                .or(opened)
                .or(namespace_known.then_some(0));
            if close.is_some() {
                closed_now.push(key);
            }
            entries.push(Entry {
                key,
                before,
                drops: start.map_or(0, |s| u64::from(last.wrapping_sub(s))),
                backlog_limit: now.backlog_limit,
                accept_queue: now.accept_queue,
                syn_queue: now.syn_queue,
                accept_full_now: now.accept_queue_full(),
                closed: close.is_some(),
            });
        }
        // Listeners gone from the snapshot because they closed during the interval.
        for close in closes {
            let before = previous
                .values()
                .find(|b| close.names(&b.key()) && !current.contains_key(&b.key()));
            let key = before.map_or(close.key, ListenerSnapshot::key);
            let opened = self.take_opened(&key);
            let start = before
                .map(|b| b.drops)
                .or(opened)
                .or(namespace_known.then_some(0));
            entries.push(Entry {
                key,
                before,
                drops: start.map_or(0, |s| u64::from(close.drops.wrapping_sub(s))),
                backlog_limit: close.backlog_limit,
                accept_queue: close.accept_queue,
                syn_queue: 0,
                accept_full_now: close.accept_queue > close.backlog_limit,
                closed: true,
            });
        }
        entries.sort_by_key(|e| e.key);
        let result = split(netns, &entries, interval);
        let mut next = current;
        for key in closed_now {
            next.remove(&key);
        }
        self.previous.insert(netns, next);
        result
    }

    /// The opened record of listener `key`, consumed.
    fn take_opened(&mut self, key: &ListenerKey) -> Option<u32> {
        if let Some(drops) = self.opened.remove(key) {
            return Some(drops);
        }
        // Recorded without the socket's inode.
        let unnamed = ListenerKey { inode: 0, ..*key };
        self.opened.remove(&unnamed)
    }

    /// Forgets a namespace that no longer exists.
    pub fn forget(&mut self, netns: u64) {
        self.previous.remove(&netns);
        self.opened.retain(|key, _| key.netns != netns);
    }
}

/// Splits the entries' drops by cause with the namespace's counters (see
/// [`ListenerTracker::update`]).
fn split(netns: u64, entries: &[Entry<'_>], interval: &Interval<'_>) -> NamespaceListenDrops {
    let counter = |name: &str| interval.counter_delta.get(name).copied().unwrap_or(0);
    let overflows = counter(LISTEN_OVERFLOWS);
    let req_q_full = counter(REQ_Q_FULL_DROP);
    let listen_drops = counter(LISTEN_DROPS);
    let drops: Vec<u64> = entries.iter().map(|e| e.drops).collect();

    let accept_full: Vec<bool> = entries
        .iter()
        .map(|e| e.accept_full_now || e.before.is_some_and(ListenerSnapshot::accept_queue_full))
        .collect();
    let (overflow_parts, unattributed_overflows) = attribute(overflows, &drops, &accept_full);
    let remaining = minus(&drops, &overflow_parts);
    let syn_full: Vec<bool> = entries
        .iter()
        .map(|e| {
            e.syn_queue >= e.backlog_limit.max(1)
                || e.before.is_some_and(ListenerSnapshot::syn_queue_full)
        })
        .collect();
    let (syn_parts, unattributed_syn_queue_drops) = attribute(req_q_full, &remaining, &syn_full);
    let unexplained = minus(&remaining, &syn_parts);
    // sk_drops also counts packets the listener discarded that were no listen drop, and
    // counts an overflow on a handshake's final ACK twice (tcp_listendrop, then the
    // discard in tcp_v4_rcv): only the namespace's other listen drops are reported.
    let other_listen_drops = listen_drops.saturating_sub(overflows + req_q_full);
    // Of those, the tcp_max_syn_backlog rule's go to listeners whose SYN queue was at it.
    let at_rule: Vec<u64> = entries
        .iter()
        .zip(&unexplained)
        .map(|(e, &u)| {
            let refusing = interval.syn_backlog_rule.is_some_and(|rule| {
                (!e.closed && rule.refuses(e.syn_queue))
                    || e.before.is_some_and(|b| rule.refuses(b.syn_queue))
            });
            if refusing { u } else { 0 }
        })
        .collect();
    let rule_parts = proportional(other_listen_drops, &at_rule);
    let still_unexplained = minus(&unexplained, &rule_parts);
    let other_parts = proportional(
        other_listen_drops - rule_parts.iter().sum::<u64>(),
        &still_unexplained,
    );

    let listeners = entries
        .iter()
        .enumerate()
        .map(|(i, e)| ListenerDrops {
            key: e.key,
            accept_queue_overflows: overflow_parts[i],
            syn_queue_drops: syn_parts[i] + rule_parts[i],
            other_drops: other_parts[i],
            backlog_limit: e.backlog_limit,
            accept_queue: e.accept_queue,
            syn_queue: e.syn_queue,
            closed: e.closed,
        })
        .collect();
    NamespaceListenDrops {
        netns,
        listen_overflows: overflows,
        listen_drops,
        req_q_full_drops: req_q_full,
        unattributed_overflows,
        unattributed_syn_queue_drops,
        listeners,
    }
}

/// `a - b` element by element (each `b` part is at most its `a`).
fn minus(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(x, y)| x.saturating_sub(*y)).collect()
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
    let rest_caps = minus(caps, &first);
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
mod tests;
