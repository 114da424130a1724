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

mod model;
#[cfg(test)]
pub(crate) mod tests;

pub use self::model::*;
