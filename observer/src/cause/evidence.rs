//! What the explainer remembers: recent evidence from every side of the host, tallied so that a
//! storm costs a counter increment, not a record, and bounded so that it never grows with
//! traffic.
//!
//! Everything is keyed by addresses as well as by namespace: the symptom of an incident is
//! often in one namespace (a client's retransmits) and its cause in another (the server's
//! firewall), and the two sides see the same addresses.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use crate::{
    context::ContextRecord,
    enrich::{routes::AsymmetricRoute, stale::StaleGroup},
    record::{EventRecord, RuleRecord},
};

/// Evidence older than this is forgotten (and never explains an anomaly).
pub(crate) const HORIZON_NS: u64 = 15 * 60 * 1_000_000_000;

/// Most tallies of each sort; a full store forgets its oldest tally first.
const MAX_TALLIES: usize = 4096;
/// Most sysctl changes remembered.
const MAX_SYSCTL_CHANGES: usize = 256;
/// Most addresses whose namespace is remembered.
const MAX_ADDRESSES: usize = 16_384;
/// Distinct ports a tally lists.
const MAX_PORTS: usize = 4;

/// Packets the kernel dropped between two addresses, with one reason, in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct DropKey {
    pub(crate) netns: u32,
    pub(crate) reason: String,
    /// This host's side (the drop record's `saddr`: flows are oriented as sockets are).
    pub(crate) local: IpAddr,
    pub(crate) remote: IpAddr,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DropTally {
    pub(crate) count: u64,
    /// Of them, packets with SYN set and ACK not (connection requests).
    pub(crate) syns: u64,
    pub(crate) local_ports: Vec<u16>,
    pub(crate) remote_ports: Vec<u16>,
    pub(crate) location: Option<String>,
    pub(crate) ifindex: Option<u32>,
    pub(crate) last_ns: u64,
}

/// Resets this host sent between two addresses, with one RST reason, in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ResetKey {
    pub(crate) netns: u32,
    pub(crate) reason: String,
    pub(crate) local: IpAddr,
    pub(crate) remote: IpAddr,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ResetTally {
    pub(crate) count: u64,
    pub(crate) local_ports: Vec<u16>,
    /// The process that was running when the last reset was sent from a process's own call
    /// (an abortive close), with its name where the owner was known.
    pub(crate) pid: Option<u32>,
    pub(crate) comm: Option<String>,
    /// The socket state the resets were sent in (`ESTABLISHED`, ...).
    pub(crate) state: &'static str,
    pub(crate) last_ns: u64,
}

/// A firewall rule that dropped packets, as the context worker named it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RuleId {
    pub(crate) netns: u32,
    pub(crate) family: String,
    pub(crate) table: String,
    pub(crate) chain: String,
    pub(crate) handle: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct RuleTally {
    pub(crate) rule: String,
    pub(crate) packets: u64,
    /// The rule's growth matched the namespace's NETFILTER_DROP count exactly (not a candidate).
    pub(crate) exact: bool,
    pub(crate) last_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ListenerId {
    pub(crate) netns: u32,
    pub(crate) addr: IpAddr,
    pub(crate) port: u16,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ListenerTally {
    pub(crate) accept_queue_overflows: u64,
    pub(crate) syn_queue_drops: u64,
    pub(crate) backlog_limit: u32,
    pub(crate) accept_queue: u32,
    pub(crate) syn_queue: u32,
    pub(crate) last_ns: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct SysctlChange {
    pub(crate) netns: u32,
    pub(crate) name: String,
    pub(crate) old: String,
    pub(crate) new: String,
    pub(crate) at_ns: u64,
    pub(crate) time: String,
}

#[derive(Clone, Debug)]
pub(crate) struct Seen<T> {
    pub(crate) value: T,
    pub(crate) last_ns: u64,
}

/// The explainer's memory. See the [module documentation](self).
#[derive(Debug, Default)]
pub struct Evidence {
    pub(crate) drops: HashMap<DropKey, DropTally>,
    pub(crate) resets: HashMap<ResetKey, ResetTally>,
    pub(crate) rules: HashMap<RuleId, RuleTally>,
    pub(crate) listeners: HashMap<ListenerId, ListenerTally>,
    /// Keyed by (namespace, peer, local address).
    pub(crate) routes: HashMap<(u32, IpAddr, IpAddr), Seen<AsymmetricRoute>>,
    /// Keyed by (namespace, pid, peer, peer port).
    pub(crate) stale: HashMap<(u32, Option<u32>, IpAddr, u16), Seen<StaleGroup>>,
    pub(crate) sysctl_changes: VecDeque<SysctlChange>,
    /// The namespace each local address was last seen in (from events' `saddr` and listeners).
    pub(crate) address_netns: HashMap<IpAddr, u32>,
    latest_ns: u64,
}

fn note_port(ports: &mut Vec<u16>, port: u16) {
    if port != 0 && ports.len() < MAX_PORTS && !ports.contains(&port) {
        ports.push(port);
    }
}

/// RST reasons of resets a process's own call sends (tcp_close, tcp_disconnect): the pid of
/// the event is then the process that did it, not whoever the softirq interrupted.
pub(crate) fn reset_from_process(reason: &str) -> bool {
    reason.starts_with("TCP_ABORT_ON_") || reason == "TCP_DISCONNECT_WITH_DATA"
}

/// Makes room for one more entry in a full map by forgetting the oldest (or anything past the
/// horizon). O(n), but only when full.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    last_ns: impl Fn(&V) -> u64,
) {
    if map.len() < MAX_TALLIES {
        return;
    }
    if let Some(oldest) = map
        .iter()
        .min_by_key(|(_, v)| last_ns(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&oldest);
    }
}

impl Evidence {
    /// Notes what an event proves (drops and resets); every event also teaches which namespace
    /// its local address lives in.
    pub fn note_event(&mut self, now_ns: u64, record: &EventRecord) {
        self.latest_ns = self.latest_ns.max(now_ns);
        self.learn_address(record.saddr, record.netns);
        match record.kind {
            "drop" => {
                let Some(reason) = &record.reason else { return };
                let key = DropKey {
                    netns: record.netns,
                    reason: reason.clone(),
                    local: record.saddr,
                    remote: record.daddr,
                };
                if !self.drops.contains_key(&key) {
                    make_room(&mut self.drops, |t| t.last_ns);
                }
                let tally = self.drops.entry(key).or_default();
                tally.count += 1;
                if record.tcp_flags.as_deref() == Some("SYN") {
                    tally.syns += 1;
                }
                note_port(&mut tally.local_ports, record.sport);
                note_port(&mut tally.remote_ports, record.dport);
                if record.location.is_some() {
                    tally.location.clone_from(&record.location);
                }
                if let Some(ifindex) = record.ifindex.filter(|i| *i > 0) {
                    tally.ifindex = Some(ifindex);
                }
                tally.last_ns = now_ns;
            }
            "reset_sent" => {
                let reason = record.reason.clone().unwrap_or_default();
                let from_process = reset_from_process(&reason);
                let key = ResetKey {
                    netns: record.netns,
                    reason,
                    local: record.saddr,
                    remote: record.daddr,
                };
                if !self.resets.contains_key(&key) {
                    make_room(&mut self.resets, |t| t.last_ns);
                }
                let tally = self.resets.entry(key).or_default();
                tally.count += 1;
                note_port(&mut tally.local_ports, record.sport);
                tally.state = record.state;
                if from_process && record.pid != 0 {
                    tally.pid = Some(record.pid);
                }
                if let Some(owner) = &record.owner {
                    tally.pid = Some(owner.pid);
                    tally.comm = Some(owner.comm.clone());
                }
                tally.last_ns = now_ns;
            }
            _ => {}
        }
    }

    /// Notes what the context worker found.
    pub fn note_context(&mut self, now_ns: u64, record: &ContextRecord) {
        self.latest_ns = self.latest_ns.max(now_ns);
        match record {
            ContextRecord::NetfilterDrop(r) => {
                let Ok(netns) = u32::try_from(r.netns) else {
                    return;
                };
                let exact = !r.rules.is_empty();
                let rules: &[RuleRecord] = if exact { &r.rules } else { &r.candidates };
                for rule in rules {
                    let id = RuleId {
                        netns,
                        family: rule.family.clone(),
                        table: rule.table.clone(),
                        chain: rule.chain.clone(),
                        handle: rule.handle,
                    };
                    if !self.rules.contains_key(&id) {
                        make_room(&mut self.rules, |t| t.last_ns);
                    }
                    let tally = self.rules.entry(id).or_insert_with(|| RuleTally {
                        rule: rule.rule.clone(),
                        packets: 0,
                        exact,
                        last_ns: now_ns,
                    });
                    tally.packets += rule.packets;
                    tally.exact |= exact;
                    tally.last_ns = now_ns;
                }
            }
            ContextRecord::ListenerDrops(r) => {
                let Ok(netns) = u32::try_from(r.netns) else {
                    return;
                };
                self.learn_address(r.addr, netns);
                let id = ListenerId {
                    netns,
                    addr: r.addr,
                    port: r.port,
                };
                if !self.listeners.contains_key(&id) {
                    make_room(&mut self.listeners, |t| t.last_ns);
                }
                let tally = self.listeners.entry(id).or_default();
                tally.accept_queue_overflows += r.accept_queue_overflows;
                tally.syn_queue_drops += r.syn_queue_drops;
                tally.backlog_limit = r.backlog_limit;
                tally.accept_queue = r.accept_queue;
                tally.syn_queue = r.syn_queue;
                tally.last_ns = now_ns;
            }
            ContextRecord::AsymmetricRoute(r) => {
                let Ok(netns) = u32::try_from(r.route.netns) else {
                    return;
                };
                let key = (netns, r.route.peer, r.route.local_addr);
                if !self.routes.contains_key(&key) {
                    make_room(&mut self.routes, |s| s.last_ns);
                }
                self.routes.insert(
                    key,
                    Seen {
                        value: r.route.clone(),
                        last_ns: now_ns,
                    },
                );
            }
            ContextRecord::StaleConnections(r) => {
                let Ok(netns) = u32::try_from(r.group.netns) else {
                    return;
                };
                let key = (netns, r.group.pid, r.group.peer, r.group.peer_port);
                if !self.stale.contains_key(&key) {
                    make_room(&mut self.stale, |s| s.last_ns);
                }
                self.stale.insert(
                    key,
                    Seen {
                        value: r.group.clone(),
                        last_ns: now_ns,
                    },
                );
            }
            ContextRecord::SysctlChange(r) => {
                let Ok(netns) = u32::try_from(r.netns) else {
                    return;
                };
                if self.sysctl_changes.len() >= MAX_SYSCTL_CHANGES {
                    self.sysctl_changes.pop_front();
                }
                self.sysctl_changes.push_back(SysctlChange {
                    netns,
                    name: r.name.clone(),
                    old: r.old.clone(),
                    new: r.new.clone(),
                    at_ns: now_ns,
                    time: r.time.clone(),
                });
            }
        }
    }

    fn learn_address(&mut self, addr: IpAddr, netns: u32) {
        if addr.is_unspecified() || netns == 0 {
            return;
        }
        if self.address_netns.len() >= MAX_ADDRESSES && !self.address_netns.contains_key(&addr) {
            return;
        }
        self.address_netns.insert(addr, netns);
    }

    /// The namespace `addr` is a local address of, as far as the events showed.
    pub(crate) fn netns_of_address(&self, addr: IpAddr) -> Option<u32> {
        self.address_netns.get(&addr).copied()
    }

    /// Forgets what is past the horizon (call about once a second).
    pub fn expire(&mut self, now_ns: u64) {
        let Some(cutoff) = now_ns.checked_sub(HORIZON_NS) else {
            return;
        };
        self.drops.retain(|_, t| t.last_ns >= cutoff);
        self.resets.retain(|_, t| t.last_ns >= cutoff);
        self.rules.retain(|_, t| t.last_ns >= cutoff);
        self.listeners.retain(|_, t| t.last_ns >= cutoff);
        self.routes.retain(|_, s| s.last_ns >= cutoff);
        self.stale.retain(|_, s| s.last_ns >= cutoff);
        while self
            .sysctl_changes
            .front()
            .is_some_and(|c| c.at_ns < cutoff)
        {
            self.sysctl_changes.pop_front();
        }
    }
}
