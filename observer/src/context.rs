//! The context worker: what the kernel programs cannot see, read periodically from the
//! kernel's own interfaces in every network namespace.
//!
//! - listen-queue overflows and SYN-queue drops per listener (sock_diag + SNMP counters: the
//!   refused SYN is freed with consume_skb, so no drop-reason event exists for it);
//! - the firewall rule behind NETFILTER_DROP drops (rule counters before/after);
//! - sysctl values and changes, and SNMP counter history, per namespace (context for anomalies).
//!
//! Runs on its own thread because everything here blocks (setns threads, netlink, `nft`), and
//! hands records to the output loop through the same bounded queue as the perf readers.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use observer_common::NetnsReason;

use crate::{
    clock::BootClock,
    enrich::{
        counters::{self, Counters},
        listeners::{self, ListenerKey, ListenerSnapshot, ListenerTracker},
        netfilter::{self, RuleCounter, RuleDelta},
        netns, sysctl,
    },
    record::{ListenerDropsRecord, NetfilterDropRecord, RuleRecord, SysctlChangeRecord},
};

/// Namespaces read per tick at most (a host with thousands of containers is read partially, and
/// says so once).
const MAX_NAMESPACES: usize = 256;
/// Counter samples kept per namespace (one per tick).
const HISTORY: usize = 600;

/// Records the worker produces.
#[derive(Debug)]
pub enum ContextRecord {
    ListenerDrops(ListenerDropsRecord),
    NetfilterDrop(NetfilterDropRecord),
    SysctlChange(SysctlChangeRecord),
}

/// What one namespace looked like at one tick.
struct Reading {
    counters: Option<Counters>,
    sysctls: sysctl::Snapshot,
    listeners: Option<Vec<ListenerSnapshot>>,
    rules: Option<Vec<RuleCounter>>,
}

/// Per-namespace context shared with the anomaly engine.
#[derive(Debug, Default)]
pub struct NamespaceContext {
    pub name: Option<String>,
    pub sysctls: sysctl::Snapshot,
    /// (when, counters) per tick, oldest first.
    pub history: VecDeque<(Instant, Counters)>,
}

impl NamespaceContext {
    /// Deltas of the counters over the last `window` (from the oldest sample inside it).
    pub fn counter_deltas(&self, window: Duration) -> BTreeMap<String, u64> {
        let Some((newest_at, newest)) = self.history.back() else {
            return BTreeMap::new();
        };
        let oldest = self
            .history
            .iter()
            .find(|(at, _)| newest_at.duration_since(*at) <= window)
            .map(|(_, c)| c);
        match oldest {
            Some(old) => counters::delta(old, newest),
            None => BTreeMap::new(),
        }
    }
}

/// Context of every namespace seen, by inode.
pub type SharedContext = Arc<Mutex<HashMap<u64, NamespaceContext>>>;

/// Exact totals over the whole run, for the `stop` record.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ContextTotals {
    pub listeners: Vec<ListenerTotal>,
    pub netfilter_rules: Vec<RuleTotal>,
    /// Context records that did not fit the output queue.
    pub undelivered: u64,
    /// Namespaces that could not be read (gone, or no permission), counted per tick.
    pub namespace_errors: u64,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ListenerTotal {
    pub netns: u64,
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub accept_queue_overflows: u64,
    pub syn_queue_drops: u64,
    pub other_drops: u64,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct RuleTotal {
    pub netns: u64,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub rule: String,
    pub packets: u64,
}

/// The running worker.
pub struct ContextWorker {
    stop: std_mpsc::Sender<()>,
    handle: std::thread::JoinHandle<ContextTotals>,
}

impl ContextWorker {
    /// Starts the worker. The first reading (the baseline every later delta is measured
    /// against) is taken before this returns, so faults that follow are seen whole.
    pub fn spawn(
        netns_drops: BpfHashMap<MapData, NetnsReason, u64>,
        netfilter_reason: Option<u32>,
        interval: Duration,
        clock: BootClock,
        shared: SharedContext,
        emit: impl Fn(ContextRecord) -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let mut state = WorkerState {
            netns_drops,
            netfilter_reason,
            clock,
            shared,
            tracker: ListenerTracker::new(),
            last_counters: HashMap::new(),
            last_rules: HashMap::new(),
            last_netns_drops: BTreeMap::new(),
            listener_totals: BTreeMap::new(),
            rule_totals: BTreeMap::new(),
            totals: ContextTotals::default(),
            warned_many: false,
            warned_namespace_error: false,
            own_netns: netns::current_inode().ok(),
        };
        state.tick(&emit);
        let (stop, stopped) = std_mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("observer-context".to_owned())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(interval) {
                        Err(std_mpsc::RecvTimeoutError::Timeout) => state.tick(&emit),
                        // Stop requested (or the daemon is gone): one last reading so drops up to
                        // now are in the totals.
                        Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                            state.tick(&emit);
                            return state.into_totals();
                        }
                    }
                }
            })?;
        Ok(Self { stop, handle })
    }

    /// Takes a last reading and returns the run's totals.
    pub fn finish(self) -> ContextTotals {
        let _ = self.stop.send(());
        self.handle.join().unwrap_or_default()
    }
}

struct WorkerState {
    netns_drops: BpfHashMap<MapData, NetnsReason, u64>,
    netfilter_reason: Option<u32>,
    clock: BootClock,
    shared: SharedContext,
    tracker: ListenerTracker,
    last_counters: HashMap<u64, Counters>,
    last_rules: HashMap<u64, Vec<RuleCounter>>,
    last_netns_drops: BTreeMap<NetnsReason, u64>,
    listener_totals: BTreeMap<ListenerKey, ListenerTotal>,
    rule_totals: BTreeMap<(u64, String, String, u64), RuleTotal>,
    totals: ContextTotals,
    warned_many: bool,
    warned_namespace_error: bool,
    own_netns: Option<u64>,
}

impl WorkerState {
    fn tick(&mut self, emit: &impl Fn(ContextRecord) -> bool) {
        let netfilter_drops = self.netfilter_drop_deltas();
        let mut namespaces = namespaces_to_read();
        if namespaces.len() > MAX_NAMESPACES {
            if !self.warned_many {
                eprintln!(
                    "observer: warning: {} network namespaces; reading the first {MAX_NAMESPACES} each interval",
                    namespaces.len()
                );
                self.warned_many = true;
            }
            namespaces.truncate(MAX_NAMESPACES);
        }
        for ns in namespaces {
            let want_rules = !self.last_rules.contains_key(&ns.inode)
                || netfilter_drops.get(&ns.inode).is_some_and(|d| *d > 0);
            // Our own namespace needs no setns (and so no CAP_SYS_ADMIN).
            let reading = if Some(ns.inode) == self.own_netns {
                Ok(read_namespace(want_rules))
            } else {
                netns::in_namespace(&ns.path, move || read_namespace(want_rules))
            };
            let reading = match reading {
                Ok(reading) => reading,
                Err(e) => {
                    self.totals.namespace_errors += 1;
                    if !self.warned_namespace_error {
                        eprintln!(
                            "observer: warning: cannot read network namespace {} ({e}); its listeners, rules and sysctls are not reported (needs CAP_SYS_ADMIN)",
                            ns.inode
                        );
                        self.warned_namespace_error = true;
                    }
                    continue;
                }
            };
            self.apply(&ns, reading, netfilter_drops.get(&ns.inode).copied(), emit);
        }
    }

    /// NETFILTER_DROP drops per namespace since the last tick, from the kernel map.
    fn netfilter_drop_deltas(&mut self) -> HashMap<u64, u64> {
        let mut out = HashMap::new();
        let Some(code) = self.netfilter_reason else {
            return out;
        };
        for (key, count) in self.netns_drops.iter().flatten() {
            if key.reason != code {
                continue;
            }
            let before = self.last_netns_drops.insert(key, count).unwrap_or(0);
            let delta = count.saturating_sub(before);
            if delta > 0 {
                *out.entry(u64::from(key.netns)).or_default() += delta;
            }
        }
        out
    }

    fn apply(
        &mut self,
        ns: &netns::NamespaceRef,
        reading: Reading,
        netfilter_dropped: Option<u64>,
        emit: &impl Fn(ContextRecord) -> bool,
    ) {
        let now = self.clock.now_rfc3339();
        let netns = ns.inode;
        let Reading {
            counters: current_counters,
            sysctls,
            listeners,
            rules,
        } = reading;

        // Sysctls: every change is a record.
        let previous_sysctls = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            let ctx = shared.entry(netns).or_default();
            ctx.name.clone_from(&ns.name);
            let previous = std::mem::replace(&mut ctx.sysctls, sysctls.clone());
            if let Some(c) = &current_counters {
                ctx.history.push_back((Instant::now(), c.clone()));
                while ctx.history.len() > HISTORY {
                    ctx.history.pop_front();
                }
            }
            previous
        };
        if !previous_sysctls.is_empty() {
            for change in sysctl_changes(&previous_sysctls, &sysctls) {
                let (name, old, new) = change;
                self.send(
                    emit,
                    ContextRecord::SysctlChange(SysctlChangeRecord {
                        kind: "sysctl_change",
                        time: now.clone(),
                        netns,
                        name,
                        old,
                        new,
                        rates: None,
                    }),
                );
            }
        }

        // Listeners: per-listener drops split by the namespace's counters.
        if let (Some(current), Some(listeners)) = (&current_counters, listeners) {
            let delta = match self.last_counters.get(&netns) {
                Some(before) => counters::delta(before, current),
                None => BTreeMap::new(),
            };
            let result = self.tracker.update(netns, &listeners, &delta);
            for drops in result.listeners.iter().filter(|d| d.total() > 0) {
                let total =
                    self.listener_totals
                        .entry(drops.key)
                        .or_insert_with(|| ListenerTotal {
                            netns,
                            addr: drops.key.addr,
                            port: drops.key.port,
                            accept_queue_overflows: 0,
                            syn_queue_drops: 0,
                            other_drops: 0,
                        });
                total.accept_queue_overflows += drops.accept_queue_overflows;
                total.syn_queue_drops += drops.syn_queue_drops;
                total.other_drops += drops.other_drops;
                let namespace_counters = [
                    "TcpExtListenOverflows",
                    "TcpExtListenDrops",
                    "TcpExtTCPReqQFullDrop",
                ]
                .into_iter()
                .map(|name| (name.to_owned(), delta.get(name).copied().unwrap_or(0)))
                .collect();
                self.send(
                    emit,
                    ContextRecord::ListenerDrops(ListenerDropsRecord {
                        kind: "listener_drops",
                        time: now.clone(),
                        netns,
                        family: drops.key.family.into(),
                        addr: drops.key.addr,
                        port: drops.key.port,
                        accept_queue_overflows: drops.accept_queue_overflows,
                        syn_queue_drops: drops.syn_queue_drops,
                        other_drops: drops.other_drops,
                        backlog_limit: drops.backlog_limit,
                        accept_queue: drops.accept_queue,
                        syn_queue: drops.syn_queue,
                        namespace_counters,
                    }),
                );
            }
        }
        if let Some(c) = current_counters {
            self.last_counters.insert(netns, c);
        }

        // Netfilter: name the rule(s) whose counters grew by the dropped count.
        if let Some(rules) = rules {
            let dropped = netfilter_dropped.unwrap_or(0);
            let before = self.last_rules.insert(netns, rules.clone());
            if dropped > 0 {
                // A namespace first seen now has no earlier snapshot: its counters count from
                // the rules' creation.
                let before = before.unwrap_or_default();
                let attribution = netfilter::attribute(&before, &rules, dropped);
                for d in &attribution.exact {
                    let total = self
                        .rule_totals
                        .entry((
                            netns,
                            d.rule.table.clone(),
                            d.rule.chain.clone(),
                            d.rule.handle,
                        ))
                        .or_insert_with(|| RuleTotal {
                            netns,
                            table: d.rule.table.clone(),
                            chain: d.rule.chain.clone(),
                            handle: d.rule.handle,
                            rule: d.rule.text.clone(),
                            packets: 0,
                        });
                    total.packets += d.delta;
                }
                self.send(
                    emit,
                    ContextRecord::NetfilterDrop(NetfilterDropRecord {
                        kind: "netfilter_drop",
                        time: now,
                        netns,
                        dropped,
                        rules: attribution.exact.iter().map(rule_record).collect(),
                        candidates: attribution.candidates.iter().map(rule_record).collect(),
                    }),
                );
            }
        }
    }

    fn send(&mut self, emit: &impl Fn(ContextRecord) -> bool, record: ContextRecord) {
        if !emit(record) {
            self.totals.undelivered += 1;
        }
    }

    fn into_totals(self) -> ContextTotals {
        ContextTotals {
            listeners: self.listener_totals.into_values().collect(),
            netfilter_rules: self.rule_totals.into_values().collect(),
            ..self.totals
        }
    }
}

fn rule_record(d: &RuleDelta) -> RuleRecord {
    let RuleCounter {
        family,
        table,
        chain,
        handle,
        packets: _,
        bytes: _,
        verdict,
        text,
        comment,
    } = d.rule.clone();
    RuleRecord {
        family,
        table,
        chain,
        handle,
        rule: text,
        verdict,
        comment,
        packets: d.delta,
    }
}

/// (name, old, new) for every sysctl whose value differs; sysctls that appeared or vanished
/// are not changes.
pub fn sysctl_changes(
    before: &sysctl::Snapshot,
    after: &sysctl::Snapshot,
) -> Vec<(String, String, String)> {
    after
        .iter()
        .filter_map(|(name, new)| {
            let old = before.get(name)?;
            (old != new).then(|| (name.clone(), old.clone(), new.clone()))
        })
        .collect()
}

/// Every namespace to read: those `netns::discover` finds, plus our own (which stands for the
/// host when PID 1's namespace cannot be opened).
fn namespaces_to_read() -> Vec<netns::NamespaceRef> {
    let mut found = netns::discover();
    if let Ok(own) = netns::current_inode()
        && !found.iter().any(|n| n.inode == own)
    {
        found.insert(
            0,
            netns::NamespaceRef {
                inode: own,
                name: None,
                path: PathBuf::from("/proc/self/ns/net"),
            },
        );
    }
    found
}

/// Runs inside the namespace (on a thread that entered it).
fn read_namespace(want_rules: bool) -> Reading {
    Reading {
        counters: counters::read_current().ok(),
        sysctls: sysctl::snapshot(std::path::Path::new("/proc/sys"), sysctl::TCP_SYSCTLS),
        listeners: listeners::snapshot_listeners().ok(),
        rules: if want_rules {
            netfilter::snapshot().ok()
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changed_values_are_changes() {
        let before = sysctl::Snapshot::from([
            ("net.ipv4.tcp_timestamps".to_owned(), "1".to_owned()),
            ("net.ipv4.tcp_sack".to_owned(), "1".to_owned()),
        ]);
        let after = sysctl::Snapshot::from([
            ("net.ipv4.tcp_timestamps".to_owned(), "0".to_owned()),
            ("net.ipv4.tcp_sack".to_owned(), "1".to_owned()),
            ("net.ipv4.tcp_new".to_owned(), "5".to_owned()),
        ]);
        assert_eq!(
            sysctl_changes(&before, &after),
            vec![(
                "net.ipv4.tcp_timestamps".to_owned(),
                "1".to_owned(),
                "0".to_owned()
            )]
        );
    }

    #[test]
    fn counter_deltas_cover_the_window() {
        let mut ctx = NamespaceContext::default();
        let t0 = Instant::now();
        for (i, v) in [(0u64, 10u64), (1, 15), (2, 40)] {
            ctx.history.push_back((
                t0 + Duration::from_secs(i),
                Counters::from([("TcpRetransSegs".to_owned(), v)]),
            ));
        }
        assert_eq!(
            ctx.counter_deltas(Duration::from_secs(10))["TcpRetransSegs"],
            30
        );
        assert_eq!(
            ctx.counter_deltas(Duration::from_secs(1))["TcpRetransSegs"],
            25
        );
        assert!(
            NamespaceContext::default()
                .counter_deltas(Duration::from_secs(1))
                .is_empty()
        );
    }
}
