//! The model: everything known from the record stream, counted by the daemon's own engine
//! and kept beside it (sparklines, reasons, latencies, listeners, rules, sysctls, findings).
use super::*;

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
pub(super) struct Extras {
    /// Every trouble signal summed, per second: the sparkline.
    pub(super) ring: SecondRing,
    /// Drop reasons seen on the key, with counts (at most [`REASONS_PER_KEY`]).
    pub(super) reasons: Vec<(Arc<str>, u64)>,
    /// Connect latencies in milliseconds, newest last (peers).
    pub(super) latencies: VecDeque<f32>,
    /// The process holding the socket, `comm (pid)` (flows).
    pub(super) owner: Option<Arc<str>>,
    /// The owner's cgroup and the unit, container and pod it names (flows).
    pub(super) service: Option<Arc<Service>>,
    pub(super) touched_sec: u64,
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

pub(super) fn sec_of(ns: u64) -> u64 {
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

pub(super) fn latency(extras: &Extras) -> Option<Latency> {
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
