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
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use observer_common::{ListenerChange, ListenerChangeKey, NetnsReason};

use crate::{
    clock::BootClock,
    decode::Flow,
    enrich::{
        counters::{self, Counters},
        listeners::{
            self, Interval, ListenerEvent, ListenerKey, ListenerSnapshot, ListenerTracker,
            SynBacklogRule,
        },
        netfilter::{self, RuleCounter, RuleDelta},
        netns,
        owners::{self, FlowSocket, OwnerMap},
        routes::{self, AsymmetricRoute},
        stale::{self, StaleConnection, StaleGroup, StaleTracker},
        sysctl,
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
    StaleConnections(StaleConnectionsRecord),
    AsymmetricRoute(AsymmetricRouteRecord),
}

/// Connections of one process to one peer that stopped making progress.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StaleConnectionsRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    #[serde(flatten)]
    pub group: StaleGroup,
    /// The threshold a connection must be stuck for.
    pub threshold_secs: u64,
}

/// Replies to a peer leave by another interface than its packets arrive on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AsymmetricRouteRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    /// What made observer look: `synack_retransmit` or the drop reason (`IP_RPFILTER`).
    pub trigger: String,
    #[serde(flatten)]
    pub route: AsymmetricRoute,
}

/// Work the output stage asks of the context worker (it must not block itself).
#[derive(Debug, Clone)]
pub enum ContextRequest {
    /// Check the reply route to `peer` from `local` in namespace `netns`.
    RouteCheck {
        netns: u32,
        peer: std::net::IpAddr,
        local: std::net::IpAddr,
        ifindex: Option<u32>,
        trigger: String,
    },
    /// Find the process owning the socket of `flow`.
    Owner(Flow),
}

/// The process owning a flow's socket, as the output stage shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OwnerBrief {
    pub pid: u32,
    pub comm: String,
    /// The process's cgroup and the unit, container and pod it names (`cgroup`, `unit`, ...).
    #[serde(flatten)]
    pub service: Option<crate::enrich::cgroup::Service>,
}

/// Owners found per flow (`None`: the socket is gone or no process holds it).
pub type OwnerCache = Arc<Mutex<HashMap<Flow, Option<OwnerBrief>>>>;

/// Settings of the worker.
#[derive(Debug, Clone, Copy)]
pub struct ContextOptions {
    pub interval: Duration,
    /// A connection stuck for this long is stale.
    pub stale_after: Duration,
    /// Sweep for stale connections every this many intervals (each sweep dumps every
    /// established socket with tcp_info).
    pub stale_every: u32,
}

/// What one namespace looked like at one tick.
struct Reading {
    counters: Option<Counters>,
    sysctls: sysctl::Snapshot,
    addresses: Option<Vec<std::net::IpAddr>>,
    listeners: Option<Vec<ListenerSnapshot>>,
    rules: Option<Vec<RuleCounter>>,
    stale: Option<Vec<StaleConnection>>,
    routes: Vec<(String, AsymmetricRoute)>,
    flow_sockets: Vec<(Flow, Option<FlowSocket>)>,
}

/// What to do in a namespace beyond the periodic reading.
#[derive(Default)]
struct NamespaceWork {
    want_rules: bool,
    stale_after: Option<Duration>,
    route_checks: Vec<(std::net::IpAddr, std::net::IpAddr, Option<u32>, String)>,
    owner_flows: Vec<Flow>,
}

/// Per-namespace context shared with the anomaly engine.
#[derive(Debug, Default)]
pub struct NamespaceContext {
    pub name: Option<String>,
    pub sysctls: sysctl::Snapshot,
    /// The namespace's local addresses (not loopback): which namespace a peer's address lives
    /// in, for causes found on the other side of a veth.
    pub addresses: Vec<std::net::IpAddr>,
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
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is a separate channel or handle the worker owns"
    )]
    pub fn spawn(
        netns_drops: BpfHashMap<MapData, NetnsReason, u64>,
        listener_changes: BpfHashMap<MapData, ListenerChangeKey, ListenerChange>,
        netfilter_reason: Option<u32>,
        options: ContextOptions,
        clock: BootClock,
        shared: SharedContext,
        owners: OwnerCache,
        requests: std_mpsc::Receiver<ContextRequest>,
        emit: impl Fn(ContextRecord) -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let interval = options.interval;
        let mut state = WorkerState {
            netns_drops,
            listener_changes,
            known_at_start: None,
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
            options,
            ticks: 0,
            owner_cache: owners,
            owner_map: OwnerMap::new(),
            requests,
            stale_tracker: StaleTracker::new(stale::DEFAULT_GROWTH_SWEEPS),
            route_checked: HashMap::new(),
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
    /// Listener starts and ends recorded by the kernel programs (deleted once accounted for).
    listener_changes: BpfHashMap<MapData, ListenerChangeKey, ListenerChange>,
    /// The namespaces that existed at the first reading: one seen later appeared during the
    /// run, and its counters count from zero.
    known_at_start: Option<HashSet<u64>>,
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
    options: ContextOptions,
    ticks: u64,
    owner_cache: OwnerCache,
    owner_map: OwnerMap,
    requests: std_mpsc::Receiver<ContextRequest>,
    stale_tracker: StaleTracker,
    /// When each (netns, peer, local) reply route was last checked.
    route_checked: HashMap<(u32, std::net::IpAddr, std::net::IpAddr), Instant>,
    warned_many: bool,
    warned_namespace_error: bool,
    own_netns: Option<u64>,
}

impl WorkerState {
    fn tick(&mut self, emit: &impl Fn(ContextRecord) -> bool) {
        let netfilter_drops = self.netfilter_drop_deltas();
        let mut namespaces = namespaces_to_read();
        let discovered: HashSet<u64> = namespaces.iter().map(|n| n.inode).collect();
        if self.known_at_start.is_none() {
            self.known_at_start = Some(discovered.clone());
        }
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
        self.ticks += 1;
        let sweep_stale = self
            .ticks
            .is_multiple_of(u64::from(self.options.stale_every.max(1)));
        let mut requested = self.take_requests();
        let mut readings = Vec::with_capacity(namespaces.len());
        for ns in namespaces {
            let mut work = requested.remove(&ns.inode).unwrap_or_default();
            work.want_rules = !self.last_rules.contains_key(&ns.inode)
                || netfilter_drops.get(&ns.inode).is_some_and(|d| *d > 0);
            work.stale_after = sweep_stale.then_some(self.options.stale_after);
            // Our own namespace needs no setns (and so no CAP_SYS_ADMIN).
            let reading = if Some(ns.inode) == self.own_netns {
                Ok(read_namespace(work))
            } else {
                netns::in_namespace(&ns.path, move || read_namespace(work))
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
            readings.push((ns, reading));
        }
        // Read after every snapshot: a listener gone from its snapshot has closed by now, and
        // its last drop count is here.
        let read: HashSet<u64> = readings.iter().map(|(ns, _)| ns.inode).collect();
        let mut changes = self
            .take_listener_changes(|netns| read.contains(&netns) || !discovered.contains(&netns));
        for (ns, reading) in readings {
            let changes = changes.remove(&ns.inode).unwrap_or_default();
            let dropped = netfilter_drops.get(&ns.inode).copied();
            self.apply(&ns, reading, &changes, dropped, emit);
        }
    }

    /// The listener changes the kernel recorded, by namespace, deleted from the map for the
    /// namespaces `take` accepts (read now, or gone); others stay for a later reading.
    fn take_listener_changes(
        &mut self,
        take: impl Fn(u64) -> bool,
    ) -> HashMap<u64, Vec<ListenerEvent>> {
        let entries: Vec<(ListenerChangeKey, ListenerChange)> = self
            .listener_changes
            .iter()
            .flatten()
            .filter(|(key, _)| take(u64::from(key.netns)))
            .collect();
        let mut out: HashMap<u64, Vec<ListenerEvent>> = HashMap::new();
        for (key, value) in entries {
            // Gone already (never here: the kernel only adds) is no error worth a word.
            let _ = self.listener_changes.remove(&key);
            if let Some(event) = ListenerEvent::from_kernel(&key, &value) {
                out.entry(event.key.netns).or_default().push(event);
            }
        }
        out
    }

    /// Whether namespace `netns`, read for the first time now, appeared during the run (it
    /// was not there at the first reading): its counters then started at zero in the run.
    fn appeared_during_run(&self, netns: u64) -> bool {
        self.known_at_start
            .as_ref()
            .is_some_and(|known| !known.contains(&netns))
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
        listener_changes: &[ListenerEvent],
        netfilter_dropped: Option<u64>,
        emit: &impl Fn(ContextRecord) -> bool,
    ) {
        let now = self.clock.now_rfc3339();
        let netns = ns.inode;
        let Reading {
            counters: current_counters,
            sysctls,
            addresses,
            listeners,
            rules,
            stale,
            routes,
            flow_sockets,
        } = reading;
        self.apply_causes(netns, &now, stale, routes, flow_sockets, emit);

        // Sysctls: every change is a record.
        let previous_sysctls = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            let ctx = shared.entry(netns).or_default();
            ctx.name.clone_from(&ns.name);
            if let Some(addresses) = addresses {
                ctx.addresses = addresses;
            }
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
                // A namespace created during the run: everything it counted is news.
                None if self.appeared_during_run(netns) => {
                    self.tracker.namespace_appeared(netns);
                    current
                        .iter()
                        .filter(|(_, v)| **v > 0)
                        .map(|(k, v)| (k.clone(), *v))
                        .collect()
                }
                None => BTreeMap::new(),
            };
            let syn_backlog_rule = SynBacklogRule::from_sysctls(
                sysctls.get("net.ipv4.tcp_syncookies").map(String::as_str),
                sysctls
                    .get("net.ipv4.tcp_max_syn_backlog")
                    .map(String::as_str),
            );
            let result = self.tracker.update(
                netns,
                &Interval {
                    listeners: &listeners,
                    changes: listener_changes,
                    counter_delta: &delta,
                    syn_backlog_rule,
                },
            );
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
                        closed: drops.closed,
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

    /// Groups pending requests by namespace; a reply route is checked at most once a minute
    /// per (namespace, peer, local address).
    fn take_requests(&mut self) -> HashMap<u64, NamespaceWork> {
        let mut work: HashMap<u64, NamespaceWork> = HashMap::new();
        let now = Instant::now();
        for request in self.requests.try_iter().take(4096) {
            match request {
                ContextRequest::RouteCheck {
                    netns,
                    peer,
                    local,
                    ifindex,
                    trigger,
                } => {
                    let key = (netns, peer, local);
                    if self
                        .route_checked
                        .get(&key)
                        .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(60))
                    {
                        continue;
                    }
                    self.route_checked.insert(key, now);
                    work.entry(u64::from(netns))
                        .or_default()
                        .route_checks
                        .push((peer, local, ifindex, trigger));
                }
                ContextRequest::Owner(flow) => {
                    let w = work.entry(u64::from(flow.netns)).or_default();
                    if w.owner_flows.len() < 1024 {
                        w.owner_flows.push(flow);
                    }
                }
            }
        }
        if self.route_checked.len() > 65_536 {
            self.route_checked
                .retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        }
        work
    }

    /// Stale connections, asymmetric routes and socket owners found in a namespace.
    fn apply_causes(
        &mut self,
        netns: u64,
        now: &str,
        stale: Option<Vec<StaleConnection>>,
        routes: Vec<(String, AsymmetricRoute)>,
        flow_sockets: Vec<(Flow, Option<FlowSocket>)>,
        emit: &impl Fn(ContextRecord) -> bool,
    ) {
        if let Some(mut connections) = stale {
            stale::attach_owners(&mut connections, &mut self.owner_map);
            for group in self
                .stale_tracker
                .update(netns, Instant::now(), &connections)
            {
                if group.newly_stale == 0 && !group.growing {
                    continue;
                }
                self.send(
                    emit,
                    ContextRecord::StaleConnections(StaleConnectionsRecord {
                        kind: "stale_connections",
                        time: now.to_owned(),
                        group,
                        threshold_secs: self.options.stale_after.as_secs(),
                    }),
                );
            }
        }
        for (trigger, route) in routes {
            self.send(
                emit,
                ContextRecord::AsymmetricRoute(AsymmetricRouteRecord {
                    kind: "asymmetric_route",
                    time: now.to_owned(),
                    trigger,
                    route,
                }),
            );
        }
        if !flow_sockets.is_empty() {
            let mut found = Vec::with_capacity(flow_sockets.len());
            for (flow, socket) in flow_sockets {
                let owner = socket
                    .and_then(|s| self.owner_map.lookup_or_refresh(u64::from(s.inode)))
                    .map(|o| OwnerBrief {
                        pid: o.pid,
                        comm: o.comm.clone(),
                        service: o.service.clone(),
                    });
                found.push((flow, owner));
            }
            let mut cache = self.owner_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 65_536 {
                cache.clear();
            }
            cache.extend(found);
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
fn read_namespace(work: NamespaceWork) -> Reading {
    let NamespaceWork {
        want_rules,
        stale_after,
        route_checks,
        owner_flows,
    } = work;
    let routes = route_checks
        .into_iter()
        .filter_map(|(peer, local, ifindex, trigger)| {
            routes::check_reply_route(peer, local, ifindex)
                .ok()
                .flatten()
                .map(|route| (trigger, route))
        })
        .collect();
    let flow_sockets = if owner_flows.is_empty() {
        Vec::new()
    } else {
        match owners::flow_sockets(&owner_flows) {
            Ok(sockets) => owner_flows.into_iter().zip(sockets).collect(),
            Err(_) => Vec::new(),
        }
    };
    Reading {
        counters: counters::read_current().ok(),
        sysctls: sysctl::snapshot(std::path::Path::new("/proc/sys"), sysctl::TCP_SYSCTLS),
        addresses: routes::local_addresses().ok(),
        listeners: listeners::snapshot_listeners().ok(),
        rules: if want_rules {
            netfilter::snapshot().ok()
        } else {
            None
        },
        stale: stale_after.and_then(|t| stale::snapshot_stale(t).ok()),
        routes,
        flow_sockets,
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
