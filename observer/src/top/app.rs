//! The state of `observer top`: a [`Model`] built from the record stream (with the daemon's
//! own aggregation engine, fed by the same mapping), the [`View`] the screen shows of it, and
//! the interface state ([`Ui`]). Only the render loop owns it; nothing here does I/O.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use ratatui::widgets::TableState;

use super::{
    event::{Event, SourceStatus},
    findings::{Finding, Findings},
    wire::{self, AnomalyPhase, EventIn, ReasonInterner, Record, Start},
};
use crate::{
    aggregate::{
        ConfigError, Engine, EngineConfig, ListenerKey, Observation, RowKey, RowView, Signal,
        SignalView, SortKey, TableId, Window,
    },
    decode::{EventKind, Flow},
    enrich::cgroup::Service,
    reconcile::Reconciler,
};

/// Rows fetched from the engine per refresh (then sorted and filtered here).
pub const FETCH_ROWS: usize = 2_000;
/// Rows fetched while a filter is set: the filter must see (nearly) every row.
pub const FILTER_FETCH_ROWS: usize = 100_000;
/// Anomaly records kept for the log.
const ANOMALY_LOG: usize = 500;
/// sysctl changes kept.
const SYSCTL_CHANGES: usize = 200;
/// Keys with a sparkline, reasons and latencies (least recently touched are forgotten).
const MAX_EXTRAS: usize = 50_000;
/// Connect latencies kept per peer (the newest).
const LATENCY_SAMPLES: usize = 256;
/// Drop reasons kept per key.
const REASONS_PER_KEY: usize = 8;
const MAX_LISTENERS: usize = 4_096;
const MAX_RULES: usize = 1_024;
const MAX_REASONS: usize = 1_024;
const MAX_NAMESPACES: usize = 1_024;
/// How long a sysctl change stays highlighted.
pub const RECENT_CHANGE_NS: u64 = 600 * NANOS_PER_SEC;
/// Status messages kept (stderr lines of the in-process daemon, source changes).
const MESSAGES: usize = 50;
const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Seconds in a sparkline.
pub const SPARK_SECS: usize = 60;

/// The table the main pane shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tab {
    /// The daemon's anomalies with their causes, most severe first (the default).
    Findings,
    Flows,
    Peers,
    Listeners,
}

impl Tab {
    pub const ALL: [Tab; 4] = [Tab::Findings, Tab::Flows, Tab::Peers, Tab::Listeners];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Findings => "Findings",
            Tab::Flows => "Flows",
            Tab::Peers => "Peers",
            Tab::Listeners => "Listeners",
        }
    }

    /// The engine's table behind the tab (none for findings).
    pub fn table(self) -> Option<TableId> {
        match self {
            Tab::Findings => None,
            Tab::Flows => Some(TableId::Flows),
            Tab::Peers => Some(TableId::Peers),
            Tab::Listeners => Some(TableId::Listeners),
        }
    }

    pub fn next(self) -> Tab {
        match self {
            Tab::Findings => Tab::Flows,
            Tab::Flows => Tab::Peers,
            Tab::Peers => Tab::Listeners,
            Tab::Listeners => Tab::Findings,
        }
    }

    pub fn previous(self) -> Tab {
        match self {
            Tab::Findings => Tab::Listeners,
            Tab::Flows => Tab::Findings,
            Tab::Peers => Tab::Flows,
            Tab::Listeners => Tab::Peers,
        }
    }
}

/// What the main table is sorted by, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortColumn {
    /// Closeness to opening an anomaly (the engine's [`SortKey::Severity`]).
    Severity,
    Retransmits,
    SynRetransmits,
    SynackRetransmits,
    Drops,
    Resets,
    FailedConnects,
    ConnectP99,
    Overflows,
    SynQueueDrops,
    LastSeen,
}

impl SortColumn {
    /// The columns `s` cycles through on a tab, starting with severity.
    pub fn for_tab(tab: Tab) -> &'static [SortColumn] {
        match tab {
            // Findings have one order: open, most severe, newest.
            Tab::Findings => &[SortColumn::Severity],
            Tab::Flows | Tab::Peers => &[
                SortColumn::Severity,
                SortColumn::Retransmits,
                SortColumn::SynRetransmits,
                SortColumn::SynackRetransmits,
                SortColumn::Drops,
                SortColumn::Resets,
                SortColumn::FailedConnects,
                SortColumn::ConnectP99,
                SortColumn::LastSeen,
            ],
            Tab::Listeners => &[
                SortColumn::Severity,
                SortColumn::Overflows,
                SortColumn::SynQueueDrops,
                SortColumn::SynackRetransmits,
                SortColumn::LastSeen,
            ],
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            SortColumn::Severity => "severity",
            SortColumn::Retransmits => "retransmits/s",
            SortColumn::SynRetransmits => "SYN retransmits",
            SortColumn::SynackRetransmits => "SYN-ACK retransmits",
            SortColumn::Drops => "drops",
            SortColumn::Resets => "resets",
            SortColumn::FailedConnects => "failed connects",
            SortColumn::ConnectP99 => "connect p99",
            SortColumn::Overflows => "overflows",
            SortColumn::SynQueueDrops => "SYN-queue drops",
            SortColumn::LastSeen => "last seen",
        }
    }

    /// The engine's ranking closest to this column, so that the rows fetched are the right
    /// ones when the table has more than [`FETCH_ROWS`].
    fn engine_hint(self) -> SortKey {
        let rate = |signal: Option<Signal>, window| SortKey::Rate { signal, window };
        match self {
            SortColumn::Severity => SortKey::Severity,
            SortColumn::Retransmits => rate(Some(Signal::Retransmit), Window::Last10s),
            SortColumn::SynRetransmits => rate(Some(Signal::SynRetransmit), Window::Last60s),
            SortColumn::SynackRetransmits => rate(Some(Signal::SynackRetransmit), Window::Last60s),
            SortColumn::Drops => rate(Some(Signal::PacketDrop), Window::Last60s),
            SortColumn::Resets | SortColumn::FailedConnects => rate(None, Window::Last60s),
            SortColumn::Overflows => rate(Some(Signal::ListenOverflow), Window::Last60s),
            SortColumn::SynQueueDrops => rate(Some(Signal::SynQueueDrop), Window::Last60s),
            SortColumn::ConnectP99 | SortColumn::LastSeen => SortKey::LastSeen,
        }
    }

    /// The value rows are ranked by.
    fn score(self, row: &Row) -> f64 {
        match self {
            SortColumn::Severity => row.severity,
            SortColumn::Retransmits => row.retransmits_per_sec,
            SortColumn::SynRetransmits => row.syn_retransmits as f64,
            SortColumn::SynackRetransmits => row.synack_retransmits as f64,
            SortColumn::Drops => row.drops as f64,
            SortColumn::Resets => row.resets as f64,
            SortColumn::FailedConnects => row.failed_connects as f64,
            SortColumn::ConnectP99 => row.latency.map_or(-1.0, |l| l.p99_ms),
            SortColumn::Overflows => row.overflows as f64,
            SortColumn::SynQueueDrops => row.syn_queue_drops as f64,
            SortColumn::LastSeen => row.last_seen_ns as f64,
        }
    }
}

/// Per-second counts of the last [`SPARK_SECS`] seconds (plus the current one).
#[derive(Clone, Debug)]
pub struct SecondRing {
    newest_sec: u64,
    buckets: [u32; SPARK_SECS + 1],
}

impl SecondRing {
    pub fn new(now_sec: u64) -> Self {
        Self {
            newest_sec: now_sec,
            buckets: [0; SPARK_SECS + 1],
        }
    }

    fn slot(sec: u64) -> usize {
        (sec % (SPARK_SECS as u64 + 1)) as usize
    }

    pub fn add(&mut self, sec: u64, amount: u64) {
        let len = SPARK_SECS as u64 + 1;
        if sec > self.newest_sec {
            if sec - self.newest_sec >= len {
                self.buckets = [0; SPARK_SECS + 1];
            } else {
                for skipped in self.newest_sec + 1..=sec {
                    self.buckets[Self::slot(skipped)] = 0;
                }
            }
            self.newest_sec = sec;
        } else if self.newest_sec - sec >= len {
            return;
        }
        let bucket = &mut self.buckets[Self::slot(sec)];
        *bucket = bucket.saturating_add(u32::try_from(amount).unwrap_or(u32::MAX));
    }

    /// The [`SPARK_SECS`] completed seconds before `now_sec`, oldest first.
    pub fn series(&self, now_sec: u64) -> Vec<u64> {
        (1..=SPARK_SECS as u64)
            .rev()
            .map(|ago| match now_sec.checked_sub(ago) {
                Some(sec)
                    if sec <= self.newest_sec && self.newest_sec - sec <= SPARK_SECS as u64 =>
                {
                    u64::from(self.buckets[Self::slot(sec)])
                }
                _ => 0,
            })
            .collect()
    }

    /// Sum over the completed seconds of the last `secs` before `now_sec`.
    pub fn sum_last(&self, now_sec: u64, secs: usize) -> u64 {
        let series = self.series(now_sec);
        series.iter().rev().take(secs).sum()
    }
}

/// What top keeps per key beside the engine's counts.
#[derive(Clone, Debug)]
struct Extras {
    /// Every trouble signal summed, per second: the sparkline.
    ring: SecondRing,
    /// Drop reasons seen on the key, with counts (at most [`REASONS_PER_KEY`]).
    reasons: Vec<(Arc<str>, u64)>,
    /// Connect latencies in milliseconds, newest last (peers).
    latencies: VecDeque<f32>,
    /// The process holding the socket, `comm (pid)` (flows).
    owner: Option<Arc<str>>,
    /// The owner's cgroup and the unit, container and pod it names (flows).
    service: Option<Arc<Service>>,
    touched_sec: u64,
}

impl Extras {
    fn new(sec: u64) -> Self {
        Self {
            ring: SecondRing::new(sec),
            reasons: Vec::new(),
            latencies: VecDeque::new(),
            owner: None,
            service: None,
            touched_sec: sec,
        }
    }
}

/// Connect latency percentiles of a peer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

/// A listener's queues as its latest `listener_drops` record gave them, and its drop totals.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerState {
    pub backlog_limit: u32,
    pub accept_queue: u32,
    pub syn_queue: u32,
    pub overflows_total: u64,
    pub syn_queue_drops_total: u64,
    pub other_drops_total: u64,
    pub last_ns: u64,
}

/// A firewall rule that dropped packets.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleState {
    pub netns: u64,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub rule: String,
    pub packets: u64,
    /// Named exactly (its counter grew by the dropped count) rather than a candidate.
    pub exact: bool,
    pub last_ns: u64,
}

/// Drops of one reason.
#[derive(Clone, Debug)]
pub struct ReasonState {
    pub total: u64,
    pub ring: SecondRing,
}

/// A sysctl that changed.
#[derive(Clone, Debug, PartialEq)]
pub struct SysctlChange {
    pub time_ns: u64,
    pub netns: u64,
    pub name: String,
    pub old: String,
    pub new: String,
}

/// One anomaly record, as the log shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyEntry {
    pub phase: AnomalyPhase,
    pub id: u64,
    pub kind: String,
    pub key: RowKey,
    pub rate_per_sec: f64,
    pub peak_rate_per_sec: f64,
    pub time_ns: u64,
    pub close_reason: Option<String>,
}

/// Events per second of one record type.
#[derive(Clone, Debug, Default)]
struct KindCount {
    count: u64,
    at_last_tick: u64,
    rate: f64,
}

/// Everything known from the record stream.
pub struct Model {
    engine: Engine,
    /// Skips events the daemon's `reconciled` records already counted.
    reconciler: Reconciler,
    reasons: ReasonInterner,
    extras: HashMap<RowKey, Extras>,
    pub start: Option<Start>,
    pub start_ns: Option<u64>,
    /// When top began (for the uptime when no `start` was seen).
    pub began_ns: u64,
    kinds: BTreeMap<&'static str, KindCount>,
    last_tick_ns: u64,
    pub records: u64,
    pub lost: u64,
    pub undelivered: u64,
    pub bad_lines: u64,
    /// The daemon's `stop` reason, once it stopped.
    pub stopped: Option<String>,
    pub open_anomalies: BTreeMap<u64, AnomalyEntry>,
    /// Newest first.
    pub anomaly_log: VecDeque<AnomalyEntry>,
    pub listeners: HashMap<ListenerKey, ListenerState>,
    pub rules: Vec<RuleState>,
    pub drop_reasons: BTreeMap<Arc<str>, ReasonState>,
    /// Known sysctl values per namespace (the host's from `start`, others from anomalies).
    pub sysctls: HashMap<u64, BTreeMap<String, String>>,
    /// Newest first.
    pub sysctl_changes: VecDeque<SysctlChange>,
    /// The network namespace top runs in (where the `start` record's sysctls were read).
    pub host_netns: Option<u64>,
    /// The daemon's anomalies, one finding each.
    pub findings: Findings,
    /// Names of namespaces: from anomaly records (`context.netns_name`) and, live, /run/netns.
    pub netns_names: HashMap<u64, String>,
    latest_ns: u64,
}

fn sec_of(ns: u64) -> u64 {
    ns / NANOS_PER_SEC
}

impl Model {
    pub fn new(
        now_ns: u64,
        host_netns: Option<u64>,
        engine: EngineConfig,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            engine: Engine::new(engine, now_ns)?,
            reconciler: Reconciler::for_stream(),
            reasons: ReasonInterner::default(),
            extras: HashMap::new(),
            start: None,
            start_ns: None,
            began_ns: now_ns,
            kinds: BTreeMap::new(),
            last_tick_ns: now_ns,
            records: 0,
            lost: 0,
            undelivered: 0,
            bad_lines: 0,
            stopped: None,
            open_anomalies: BTreeMap::new(),
            anomaly_log: VecDeque::new(),
            listeners: HashMap::new(),
            rules: Vec::new(),
            drop_reasons: BTreeMap::new(),
            sysctls: HashMap::new(),
            sysctl_changes: VecDeque::new(),
            host_netns,
            findings: Findings::default(),
            netns_names: HashMap::new(),
            latest_ns: now_ns,
        })
    }

    /// Names of namespaces read live (`/run/netns`), over those records gave.
    pub fn learn_netns_names(&mut self, names: impl IntoIterator<Item = (u64, String)>) {
        for (netns, name) in names {
            if self.netns_names.len() < MAX_NAMESPACES || self.netns_names.contains_key(&netns) {
                self.netns_names.insert(netns, name);
            }
        }
    }

    /// `web (4026532177)`, or the inode alone when the namespace has no known name.
    pub fn netns_label(&self, netns: u64) -> String {
        match self.netns_names.get(&netns) {
            Some(name) => format!("{name} ({netns})"),
            None => netns.to_string(),
        }
    }

    /// The latest time seen (records or ticks).
    pub fn now_ns(&self) -> u64 {
        self.latest_ns
    }

    /// Counts a line that was not a record.
    pub fn bad_line(&mut self) {
        self.bad_lines += 1;
    }

    /// Takes one record into the model. `arrival_ns` stands in for records without a time.
    pub fn apply(&mut self, record: Record, arrival_ns: u64) {
        self.records += 1;
        match record {
            Record::Start(start) => {
                self.start_ns = wire::parse_time(&start.time);
                if let Some(netns) = self.host_netns {
                    self.sysctls.insert(netns, start.sysctls.clone());
                }
                self.stopped = None;
                self.start = Some(start);
            }
            Record::Event(event) => self.apply_event(&event, arrival_ns),
            Record::Lost { count } => self.lost += count,
            Record::Undelivered { count } => self.undelivered += count,
            Record::ListenerDrops(ref r) => {
                let at = wire::parse_time(&r.time).unwrap_or(arrival_ns);
                let key = ListenerKey {
                    netns: u32::try_from(r.netns).unwrap_or(0),
                    addr: r.addr,
                    port: r.port,
                };
                if self.listeners.len() < MAX_LISTENERS || self.listeners.contains_key(&key) {
                    let state = self.listeners.entry(key).or_insert(ListenerState {
                        backlog_limit: 0,
                        accept_queue: 0,
                        syn_queue: 0,
                        overflows_total: 0,
                        syn_queue_drops_total: 0,
                        other_drops_total: 0,
                        last_ns: at,
                    });
                    state.backlog_limit = r.backlog_limit;
                    state.accept_queue = r.accept_queue;
                    state.syn_queue = r.syn_queue;
                    state.overflows_total += r.accept_queue_overflows;
                    state.syn_queue_drops_total += r.syn_queue_drops;
                    state.other_drops_total += r.other_drops;
                    state.last_ns = at;
                }
                self.observe_context(&record, at);
            }
            Record::Reconciled(entries) => {
                let at = arrival_ns;
                self.latest_ns = self.latest_ns.max(at);
                for entry in entries {
                    if let Some(flow) = entry.observation.flow {
                        self.reconciler
                            .reconciled(flow, entry.observation.signal, entry.through);
                    }
                    self.observe_flow(entry.observation, at);
                }
            }
            Record::StaleConnections(ref r) => {
                let at = wire::parse_time(&r.time).unwrap_or(arrival_ns);
                self.observe_context(&record, at);
            }
            Record::NetfilterDrop(ref r) => {
                let at = wire::parse_time(&r.time).unwrap_or(arrival_ns);
                let exact = !r.rules.is_empty();
                let rules = if exact { &r.rules } else { &r.candidates };
                for rule in rules {
                    let existing = self.rules.iter_mut().find(|s| {
                        s.netns == r.netns
                            && s.table == rule.table
                            && s.chain == rule.chain
                            && s.handle == rule.handle
                    });
                    match existing {
                        Some(state) => {
                            state.packets += rule.packets;
                            state.exact |= exact;
                            state.last_ns = at;
                            state.rule.clone_from(&rule.rule);
                        }
                        None => {
                            if self.rules.len() >= MAX_RULES {
                                // Forget the rule that dropped least recently.
                                if let Some(oldest) = (0..self.rules.len())
                                    .min_by_key(|&i| self.rules.get(i).map_or(0, |r| r.last_ns))
                                {
                                    self.rules.swap_remove(oldest);
                                }
                            }
                            self.rules.push(RuleState {
                                netns: r.netns,
                                table: rule.table.clone(),
                                chain: rule.chain.clone(),
                                handle: rule.handle,
                                rule: rule.rule.clone(),
                                packets: rule.packets,
                                exact,
                                last_ns: at,
                            });
                        }
                    }
                }
                self.rules
                    .sort_by_key(|rule| std::cmp::Reverse(rule.last_ns));
                self.observe_context(&record, at);
            }
            Record::SysctlChange(change) => {
                let at = wire::parse_time(&change.time).unwrap_or(arrival_ns);
                if self.sysctls.len() < MAX_NAMESPACES || self.sysctls.contains_key(&change.netns) {
                    self.sysctls
                        .entry(change.netns)
                        .or_default()
                        .insert(change.name.clone(), change.new.clone());
                }
                self.sysctl_changes.push_front(SysctlChange {
                    time_ns: at,
                    netns: change.netns,
                    name: change.name,
                    old: change.old,
                    new: change.new,
                });
                self.sysctl_changes.truncate(SYSCTL_CHANGES);
            }
            Record::Anomaly(a) => {
                let at = a.time_ns.unwrap_or(arrival_ns);
                self.findings.apply(&a, at);
                if let (Some(netns), Some(name)) = (a.netns, &a.detail.netns_name)
                    && (self.netns_names.len() < MAX_NAMESPACES
                        || self.netns_names.contains_key(&netns))
                {
                    self.netns_names.insert(netns, name.clone());
                }
                if let Some(netns) = a.netns
                    && !a.sysctls.is_empty()
                    && (self.sysctls.len() < MAX_NAMESPACES || self.sysctls.contains_key(&netns))
                {
                    self.sysctls.insert(netns, a.sysctls.clone());
                }
                let entry = AnomalyEntry {
                    phase: a.phase,
                    id: a.id,
                    kind: a.kind,
                    key: a.key,
                    rate_per_sec: a.rate_per_sec,
                    peak_rate_per_sec: a.peak_rate_per_sec,
                    time_ns: at,
                    close_reason: a.close_reason,
                };
                match a.phase {
                    AnomalyPhase::Close => {
                        self.open_anomalies.remove(&entry.id);
                    }
                    AnomalyPhase::Open | AnomalyPhase::Update => {
                        self.open_anomalies.insert(entry.id, entry.clone());
                    }
                }
                self.anomaly_log.push_front(entry);
                self.anomaly_log.truncate(ANOMALY_LOG);
            }
            Record::Stop { reason } => {
                self.stopped = Some(reason);
            }
            Record::Other { .. } => {}
        }
    }

    fn observe_context(&mut self, record: &Record, at: u64) {
        self.latest_ns = self.latest_ns.max(at);
        for obs in wire::context_observations(record) {
            let keys: Vec<RowKey> = [
                obs.listener.map(RowKey::Listener),
                obs.peer.map(RowKey::Peer),
                obs.rule.clone().map(RowKey::Rule),
            ]
            .into_iter()
            .flatten()
            .collect();
            for key in keys {
                self.extras_of(key, at).ring.add(sec_of(at), obs.amount);
            }
            self.engine.observe(at, obs);
        }
    }

    fn extras_of(&mut self, key: RowKey, at: u64) -> &mut Extras {
        let sec = sec_of(at);
        if self.extras.len() >= MAX_EXTRAS && !self.extras.contains_key(&key) {
            // Forget the least recently touched half at once (amortised O(1) per key).
            let mut touched: Vec<u64> = self.extras.values().map(|e| e.touched_sec).collect();
            let middle = touched.len() / 2;
            touched.select_nth_unstable(middle);
            let cut = touched.get(middle).copied().unwrap_or(0);
            self.extras.retain(|_, e| e.touched_sec > cut);
        }
        let extras = self.extras.entry(key).or_insert_with(|| Extras::new(sec));
        extras.touched_sec = extras.touched_sec.max(sec);
        extras
    }

    fn apply_event(&mut self, event: &EventIn, arrival_ns: u64) {
        let at = event.time_ns.unwrap_or(arrival_ns);
        self.latest_ns = self.latest_ns.max(at);
        self.kinds.entry(event.kind.name()).or_default().count += 1;
        let flow = event.flow;
        let peer = RowKey::Peer(crate::aggregate::PeerKey::of_flow(&flow));
        if let Some(owner) = &event.owner {
            let extras = self.extras_of(RowKey::Flow(flow), at);
            if extras.owner.is_none() {
                extras.owner = Some(Arc::from(format!("{} ({})", owner.comm, owner.pid)));
                extras.service = owner.service.clone().map(Arc::new);
            }
        }
        if event.kind == EventKind::Connect
            && let Some(ms) = event.duration_ms
        {
            let latencies = &mut self.extras_of(peer.clone(), at).latencies;
            latencies.push_back(ms as f32);
            if latencies.len() > LATENCY_SAMPLES {
                latencies.pop_front();
            }
        }
        // As the daemon's engine: not an event a `reconciled` record already counted.
        let Some(obs) = wire::observation(event, &mut self.reasons).and_then(|obs| {
            self.reconciler
                .admit(obs, event.counted_flow, event.flow_count)
        }) else {
            return;
        };
        self.observe_flow(obs, at);
    }

    /// Counts an observation on its flow (and the flow's peer and listener): the engine, the
    /// sparklines, the drop reasons.
    fn observe_flow(&mut self, obs: Observation, at: u64) {
        let Some(flow) = obs.flow else {
            self.engine.observe(at, obs);
            return;
        };
        let peer = RowKey::Peer(crate::aggregate::PeerKey::of_flow(&flow));
        let sec = sec_of(at);
        if let Some(reason) = &obs.reason
            && (self.drop_reasons.len() < MAX_REASONS || self.drop_reasons.contains_key(reason))
        {
            let state = self
                .drop_reasons
                .entry(Arc::clone(reason))
                .or_insert_with(|| ReasonState {
                    total: 0,
                    ring: SecondRing::new(sec),
                });
            state.total += obs.amount;
            state.ring.add(sec, obs.amount);
        }
        let mut keys = vec![RowKey::Flow(flow), peer];
        if let Some(listener) = obs.listener {
            keys.push(RowKey::Listener(listener));
        }
        for key in keys {
            let extras = self.extras_of(key, at);
            extras.ring.add(sec, obs.amount);
            if let Some(reason) = &obs.reason {
                let known = extras.reasons.len();
                match extras.reasons.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, n)) => *n += obs.amount,
                    None if known < REASONS_PER_KEY => {
                        extras.reasons.push((Arc::clone(reason), obs.amount));
                    }
                    None => {}
                }
            }
        }
        self.engine.observe(at, obs);
    }

    /// Once per refresh interval: the engine's windows move on, event rates are measured.
    pub fn tick(&mut self, now_ns: u64) {
        self.latest_ns = self.latest_ns.max(now_ns);
        // The daemon reports anomalies; top's engine only ranks and counts, so its own
        // anomaly events are not needed.
        let _ = self.engine.tick(self.latest_ns);
        let elapsed = now_ns.saturating_sub(self.last_tick_ns) as f64 / NANOS_PER_SEC as f64;
        if elapsed > 0.0 {
            for kind in self.kinds.values_mut() {
                kind.rate = (kind.count - kind.at_last_tick) as f64 / elapsed;
                kind.at_last_tick = kind.count;
            }
            self.last_tick_ns = now_ns;
        }
    }

    /// Event records per second by type, busiest first (only types seen).
    pub fn event_rates(&self) -> Vec<(&'static str, f64)> {
        let mut rates: Vec<(&'static str, f64)> =
            self.kinds.iter().map(|(k, c)| (*k, c.rate)).collect();
        rates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        rates
    }

    /// Uptime of the observed daemon (since its `start`), or of top.
    pub fn uptime_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.start_ns.unwrap_or(self.began_ns))
    }

    /// Drop reasons: (reason, last 60 s, total), busiest first.
    pub fn reason_counts(&self, now_ns: u64) -> Vec<(Arc<str>, u64, u64)> {
        let now_sec = sec_of(now_ns);
        let mut counts: Vec<_> = self
            .drop_reasons
            .iter()
            .map(|(r, s)| (Arc::clone(r), s.ring.sum_last(now_sec, SPARK_SECS), s.total))
            .collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        counts
    }

    /// The rows of `tab`, ranked by `sort` (engine-side, then exactly here), at most `n`.
    pub fn rows(&self, tab: Tab, sort: SortColumn, n: usize) -> Vec<Row> {
        let now_sec = sec_of(self.latest_ns);
        let open: HashMap<&RowKey, Vec<&str>> =
            self.open_anomalies
                .values()
                .fold(HashMap::new(), |mut map, entry| {
                    map.entry(&entry.key).or_default().push(entry.kind.as_str());
                    map
                });
        let Some(table) = tab.table() else {
            return Vec::new();
        };
        self.engine
            .top_rows(table, sort.engine_hint(), n)
            .into_iter()
            .map(|view| {
                let extras = self.extras.get(&view.key);
                let mut row = Row::from_view(view, extras, now_sec);
                if let Some(kinds) = open.get(&row.key) {
                    row.anomalies = kinds.iter().map(|k| (*k).to_owned()).collect();
                }
                if let RowKey::Listener(key) = &row.key {
                    row.queue = self.listeners.get(key).cloned();
                }
                if let RowKey::Flow(flow) = &row.key {
                    // A flow's connect latency is its peer's.
                    let peer = RowKey::Peer(crate::aggregate::PeerKey::of_flow(flow));
                    row.latency = self.extras.get(&peer).and_then(latency);
                }
                row
            })
            .collect()
    }

    /// Rows in the engine's table of `tab`.
    pub fn table_len(&self, tab: Tab) -> usize {
        let stats = self.engine.stats();
        match tab {
            Tab::Findings => self.findings.len(),
            Tab::Flows => stats.flows.rows,
            Tab::Peers => stats.peers.rows,
            Tab::Listeners => stats.listeners.rows,
        }
    }

    /// The sysctls known for `netns`, and its recent changes (newest first).
    pub fn sysctls_of(
        &self,
        netns: u64,
    ) -> (Option<&BTreeMap<String, String>>, Vec<&SysctlChange>) {
        (
            self.sysctls.get(&netns),
            self.sysctl_changes
                .iter()
                .filter(|c| c.netns == netns)
                .collect(),
        )
    }
}

fn latency(extras: &Extras) -> Option<Latency> {
    if extras.latencies.is_empty() {
        return None;
    }
    let mut sorted: Vec<f32> = extras.latencies.iter().copied().collect();
    sorted.sort_by(f32::total_cmp);
    let pick = |q: f64| {
        let i = ((sorted.len() - 1) as f64 * q).round() as usize;
        f64::from(sorted.get(i).copied().unwrap_or(0.0))
    };
    Some(Latency {
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        samples: sorted.len(),
    })
}

/// One row of the main table, everything the screen shows of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub key: RowKey,
    pub label: String,
    pub netns: u32,
    pub severity: f64,
    /// Kinds of the daemon's anomalies open on this row.
    pub anomalies: Vec<String>,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// 10 s rate.
    pub retransmits_per_sec: f64,
    /// Counts over the last 60 s.
    pub syn_retransmits: u64,
    pub synack_retransmits: u64,
    pub drops: u64,
    pub resets: u64,
    pub failed_connects: u64,
    pub overflows: u64,
    pub syn_queue_drops: u64,
    /// Drop reasons on this row, busiest first.
    pub reasons: Vec<(String, u64)>,
    pub latency: Option<Latency>,
    /// The process holding the flow's socket, `comm (pid)`, when events named it.
    pub owner: Option<String>,
    /// The owner's service (unit, container, pod, cgroup), when events named it.
    pub service: Option<Arc<Service>>,
    pub queue: Option<ListenerState>,
    /// Trouble per second over the last minute, oldest first.
    pub sparkline: Vec<u64>,
    pub signals: Vec<SignalView>,
}

impl Row {
    fn from_view(view: RowView, extras: Option<&Extras>, now_sec: u64) -> Self {
        let count = |signal| view.count(Some(signal), Window::Last60s);
        let mut reasons: Vec<(String, u64)> = extras
            .map(|e| e.reasons.iter().map(|(r, n)| (r.to_string(), *n)).collect())
            .unwrap_or_default();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Self {
            label: key_label(&view.key),
            netns: crate::analysis::netns_of(&view.key),
            severity: view.severity,
            anomalies: Vec::new(),
            first_seen_ns: view.first_seen_ns,
            last_seen_ns: view.last_seen_ns,
            retransmits_per_sec: view.rate_per_sec(Some(Signal::Retransmit), Window::Last10s),
            syn_retransmits: count(Signal::SynRetransmit),
            synack_retransmits: count(Signal::SynackRetransmit),
            drops: count(Signal::PacketDrop),
            resets: count(Signal::ResetSent) + count(Signal::ResetReceived),
            failed_connects: count(Signal::ConnectRefused) + count(Signal::ConnectTimeout),
            overflows: count(Signal::ListenOverflow),
            syn_queue_drops: count(Signal::SynQueueDrop),
            reasons,
            latency: extras.and_then(latency),
            owner: extras.and_then(|e| e.owner.as_deref().map(str::to_owned)),
            service: extras.and_then(|e| e.service.clone()),
            queue: None,
            sparkline: extras.map_or_else(|| vec![0; SPARK_SECS], |e| e.ring.series(now_sec)),
            signals: view.signals,
            key: view.key,
        }
    }

    /// Whether the row matches a filter: part of an address or `address:port`, a port, a drop
    /// reason, an anomaly kind or the namespace, case-insensitively.
    pub fn matches(&self, filter: &str) -> bool {
        let filter = filter.trim().to_ascii_lowercase();
        if filter.is_empty() {
            return true;
        }
        if self.label.to_ascii_lowercase().contains(&filter) {
            return true;
        }
        if let Ok(port) = filter.trim_start_matches(':').parse::<u16>() {
            let ports: &[u16] = match &self.key {
                RowKey::Flow(f) => &[f.sport, f.dport],
                RowKey::Listener(l) => &[l.port],
                _ => &[],
            };
            if ports.contains(&port) {
                return true;
            }
        }
        self.netns.to_string() == filter
            || self
                .reasons
                .iter()
                .any(|(r, _)| r.to_ascii_lowercase().contains(&filter))
            || self.anomalies.iter().any(|k| k.contains(&filter))
            || self
                .owner
                .as_ref()
                .is_some_and(|o| o.to_ascii_lowercase().contains(&filter))
            || self.service.as_ref().is_some_and(|s| {
                s.cgroup.to_ascii_lowercase().contains(&filter)
                    || s.container_id
                        .as_ref()
                        .is_some_and(|id| id.starts_with(&filter))
            })
    }
}

/// `10.0.0.1:80` or `[fd00::1]:80`.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// How a row's key reads in the table.
pub fn key_label(key: &RowKey) -> String {
    match key {
        RowKey::Flow(Flow {
            saddr,
            sport,
            daddr,
            dport,
            ..
        }) => format!("{}→{}", endpoint(*saddr, *sport), endpoint(*daddr, *dport)),
        RowKey::Peer(p) => p.addr.to_string(),
        RowKey::Listener(l) => endpoint(l.addr, l.port),
        RowKey::Rule(r) => format!("{} {}/{} #{}", r.family, r.table, r.chain, r.handle),
    }
}

/// A key with its scope, for the anomaly log.
pub fn scoped_label(key: &RowKey) -> String {
    let scope = match key {
        RowKey::Flow(_) => "flow",
        RowKey::Peer(_) => "peer",
        RowKey::Listener(_) => "listener",
        RowKey::Rule(_) => "rule",
    };
    format!("{scope} {}", key_label(key))
}

/// Whether a finding matches a filter: its kind, key, severity, cause or namespace (number or
/// name), case-insensitively.
fn finding_matches(finding: &Finding, model: &Model, filter: &str) -> bool {
    let filter = filter.trim().to_ascii_lowercase();
    if filter.is_empty() {
        return true;
    }
    let netns = u64::from(finding.netns);
    let name = finding
        .netns_name
        .as_deref()
        .or_else(|| model.netns_names.get(&netns).map(String::as_str));
    let cause = finding.cause();
    [
        Some(finding.kind.as_str()),
        Some(scoped_label(&finding.key).as_str()),
        Some(finding.severity().name()),
        cause.map(|c| c.kind.as_str()),
        cause.map(|c| c.summary.as_str()),
        name,
    ]
    .into_iter()
    .flatten()
    .any(|text| text.to_ascii_lowercase().contains(&filter))
        || netns.to_string() == filter
}

/// Rows as fetched and as shown.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// As fetched from the model, unfiltered.
    pub fetched: Vec<Row>,
    /// Filtered and sorted: what the table shows.
    pub rows: Vec<Row>,
    /// The findings shown (Findings tab): filtered, in the list's order.
    pub findings: Vec<Finding>,
    /// Rows in the engine's table when fetched (findings known, on the Findings tab).
    pub table_len: usize,
    /// The model's time when fetched.
    pub at_ns: u64,
}

/// A window over the main screen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Popup {
    Help,
    Details,
}

/// Where the records come from, and how that is going.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// `in-process` or the socket path.
    pub label: String,
    pub connected: bool,
    /// The latest problem or news, if any.
    pub message: Option<String>,
    pub error: bool,
}

/// The interface state.
#[derive(Debug)]
pub struct Ui {
    pub tab: Tab,
    pub sort: SortColumn,
    /// The selected row's key: the selection follows its row when the order changes.
    pub selected_key: Option<RowKey>,
    /// The selected finding's id (Findings tab), followed the same way.
    pub selected_finding: Option<u64>,
    /// Whether the selection follows its row when the order changes (after the user moved it
    /// off the top row); otherwise it stays at its position, the top by default.
    pub follow: bool,
    pub table: TableState,
    pub filter: String,
    /// While typing a filter: the text so far.
    pub filter_input: Option<String>,
    pub paused: bool,
    pub popup: Option<Popup>,
    pub quit: bool,
    pub source: Source,
    /// Recent messages (newest last): source changes, the in-process daemon's stderr.
    pub messages: VecDeque<String>,
}

/// The whole state: model, view and interface.
pub struct App {
    pub model: Model,
    pub view: View,
    pub ui: Ui,
}

impl App {
    pub fn new(
        now_ns: u64,
        host_netns: Option<u64>,
        source: &str,
        engine: EngineConfig,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            model: Model::new(now_ns, host_netns, engine)?,
            view: View::default(),
            ui: Ui {
                tab: Tab::Findings,
                sort: SortColumn::Severity,
                selected_key: None,
                selected_finding: None,
                follow: false,
                table: TableState::default(),
                filter: String::new(),
                filter_input: None,
                paused: false,
                popup: None,
                quit: false,
                source: Source {
                    label: source.to_owned(),
                    connected: false,
                    message: None,
                    error: false,
                },
                messages: VecDeque::new(),
            },
        })
    }

    /// Takes one event; returns whether the screen should be drawn again.
    pub fn handle(&mut self, event: Event, now_ns: u64) -> bool {
        match event {
            Event::Key(key) => {
                super::handler::handle_key(self, key);
                true
            }
            Event::Resize => true,
            Event::Tick => {
                self.model.tick(now_ns);
                if !self.ui.paused {
                    self.refresh();
                }
                true
            }
            Event::Records(batch) => {
                for record in batch {
                    match record {
                        Ok(record) => self.model.apply(record, now_ns),
                        Err(_) => self.model.bad_line(),
                    }
                }
                false
            }
            Event::Source(status) => {
                self.source_status(status);
                true
            }
            Event::Terminate => {
                self.ui.quit = true;
                true
            }
        }
    }

    fn source_status(&mut self, status: SourceStatus) {
        let source = &mut self.ui.source;
        let message = match status {
            SourceStatus::Connected => {
                source.connected = true;
                source.error = false;
                source.message = None;
                format!("connected to {}", source.label)
            }
            SourceStatus::Disconnected(why) => {
                source.connected = false;
                source.error = true;
                source.message = Some(why.clone());
                why
            }
            SourceStatus::Ended(why) => {
                source.connected = false;
                source.error = true;
                source.message = Some(why.clone());
                why
            }
            SourceStatus::Message(text) => {
                source.message = Some(text.clone());
                text
            }
        };
        self.ui.messages.push_back(message);
        while self.ui.messages.len() > MESSAGES {
            self.ui.messages.pop_front();
        }
    }

    /// Fetches the rows of the current tab from the model, then filters and sorts them.
    pub fn refresh(&mut self) {
        self.view.at_ns = self.model.now_ns();
        if self.ui.tab == Tab::Findings {
            self.view.table_len = self.model.findings.len();
            self.reorder();
            return;
        }
        let n = if self.ui.filter.trim().is_empty() {
            FETCH_ROWS
        } else {
            FILTER_FETCH_ROWS
        };
        self.view.fetched = self.model.rows(self.ui.tab, self.ui.sort, n);
        self.view.table_len = self.model.table_len(self.ui.tab);
        self.reorder();
    }

    /// Filters and sorts the fetched rows again (sort or filter changed; works while paused),
    /// keeping the selection on the same row when it is still shown.
    pub fn reorder(&mut self) {
        let filter = self.ui.filter.clone();
        if self.ui.tab == Tab::Findings {
            let model = &self.model;
            self.view.findings = model
                .findings
                .current(self.view.at_ns)
                .into_iter()
                .filter(|f| finding_matches(f, model, &filter))
                .cloned()
                .collect();
            let index = self
                .ui
                .selected_finding
                .filter(|_| self.ui.follow)
                .and_then(|id| self.view.findings.iter().position(|f| f.id == id));
            match index {
                Some(i) => self.ui.table.select(Some(i)),
                None => self.select(self.ui.table.selected().unwrap_or(0)),
            }
            return;
        }
        let sort = self.ui.sort;
        let mut rows: Vec<Row> = self
            .view
            .fetched
            .iter()
            .filter(|row| row.matches(&filter))
            .cloned()
            .collect();
        rows.sort_by(|a, b| {
            sort.score(b)
                .total_cmp(&sort.score(a))
                .then_with(|| b.last_seen_ns.cmp(&a.last_seen_ns))
                .then_with(|| a.label.cmp(&b.label))
        });
        self.view.rows = rows;
        let index = self
            .ui
            .selected_key
            .as_ref()
            .filter(|_| self.ui.follow)
            .and_then(|key| self.view.rows.iter().position(|r| &r.key == key));
        match index {
            Some(i) => self.ui.table.select(Some(i)),
            None => self.select(self.ui.table.selected().unwrap_or(0)),
        }
    }

    /// Entries the current tab shows.
    pub fn shown_len(&self) -> usize {
        match self.ui.tab {
            Tab::Findings => self.view.findings.len(),
            _ => self.view.rows.len(),
        }
    }

    /// Selects row `index` (clamped); none when the table is empty.
    pub fn select(&mut self, index: usize) {
        let len = self.shown_len();
        if len == 0 {
            self.ui.table.select(None);
            self.ui.selected_key = None;
            self.ui.selected_finding = None;
            return;
        }
        let index = index.min(len - 1);
        self.ui.table.select(Some(index));
        match self.ui.tab {
            Tab::Findings => {
                self.ui.selected_finding = self.view.findings.get(index).map(|f| f.id);
            }
            _ => self.ui.selected_key = self.view.rows.get(index).map(|r| r.key.clone()),
        }
    }

    /// Selects row `index` at the user's request: off the top row, the selection then follows
    /// its row; at the top, it stays on whatever ranks first.
    pub fn select_by_user(&mut self, index: usize) {
        self.ui.follow = index > 0;
        self.select(index);
    }

    /// The selected row, if any (none on the Findings tab).
    pub fn selected_row(&self) -> Option<&Row> {
        if self.ui.tab == Tab::Findings {
            return None;
        }
        self.ui.table.selected().and_then(|i| self.view.rows.get(i))
    }

    /// The selected finding, on the Findings tab.
    pub fn selected_finding(&self) -> Option<&Finding> {
        if self.ui.tab != Tab::Findings {
            return None;
        }
        self.ui
            .table
            .selected()
            .and_then(|i| self.view.findings.get(i))
    }

    /// Whether something is selected that has details.
    pub fn has_selection(&self) -> bool {
        self.selected_row().is_some() || self.selected_finding().is_some()
    }

    /// Switches tabs; the sort stays if the new tab has that column.
    pub fn set_tab(&mut self, tab: Tab) {
        self.ui.tab = tab;
        if !SortColumn::for_tab(tab).contains(&self.ui.sort) {
            self.ui.sort = SortColumn::Severity;
        }
        self.ui.selected_key = None;
        self.ui.selected_finding = None;
        self.ui.follow = false;
        self.ui.table = TableState::default();
        self.refresh();
    }

    /// Moves to the next sort column of the tab (`backwards`: the previous one).
    pub fn cycle_sort(&mut self, backwards: bool) {
        let columns = SortColumn::for_tab(self.ui.tab);
        let at = columns.iter().position(|c| *c == self.ui.sort).unwrap_or(0);
        let next = if backwards {
            (at + columns.len() - 1) % columns.len()
        } else {
            (at + 1) % columns.len()
        };
        self.ui.sort = columns.get(next).copied().unwrap_or(SortColumn::Severity);
        if self.ui.paused {
            self.reorder();
        } else {
            self.refresh();
        }
    }

    /// Sets the filter (empty: none).
    pub fn set_filter(&mut self, filter: String) {
        let widened = !self.ui.filter.is_empty() && filter.is_empty();
        self.ui.filter = filter;
        // A new filter starts at its first row.
        self.ui.selected_key = None;
        self.ui.selected_finding = None;
        self.ui.follow = false;
        self.ui.table = TableState::default();
        self.ui.table.select(Some(0));
        // Leaving a filter, or setting one, needs a wider fetch unless paused (then the rows
        // fetched before are what there is).
        if self.ui.paused && !widened {
            self.reorder();
        } else {
            self.refresh();
        }
    }

    /// The namespace whose sysctls the panel shows: the selected row's, else the host's.
    pub fn panel_netns(&self) -> Option<u64> {
        self.selected_row()
            .map(|r| u64::from(r.netns))
            .or_else(|| self.selected_finding().map(|f| u64::from(f.netns)))
            .filter(|n| *n != 0)
            .or(self.model.host_netns)
    }
}

#[cfg(test)]
pub(crate) mod tests;
