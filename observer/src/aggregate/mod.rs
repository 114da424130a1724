//! Aggregation and anomaly detection: the pure core behind `anomaly_*` records and
//! `observer top`.
//!
//! The daemon turns every decoded event into an [`Observation`] and hands it to
//! [`Engine::observe`], and calls [`Engine::tick`] about once a second. The engine counts each
//! observation in up to four bounded tables — per flow, per peer (namespace + remote address),
//! per listener (namespace + local address + port) and per firewall rule — in per-second rings
//! that give 1 s, 10 s and 60 s windows, keeps a slow baseline per signal, and turns sustained
//! departures from it into anomalies with an open / update / close lifecycle (see [`anomaly`]).
//!
//! No I/O and no clocks: every call takes `now_ns`, monotonic nanoseconds (the daemon passes
//! CLOCK_BOOTTIME, the kernel programs' time base). Time never runs backwards inside the
//! engine: a `now_ns` earlier than one already seen counts as the latest, since per-CPU
//! buffers deliver events slightly out of order.
//!
//! ```
//! use observer::aggregate::{Engine, EngineConfig, Observation, Signal};
//! use observer::decode::{Family, Flow};
//!
//! let mut engine = Engine::new(EngineConfig::default(), 0)?;
//! let flow = Flow {
//!     family: Family::Ipv4,
//!     saddr: [10, 0, 0, 1].into(),
//!     sport: 40000,
//!     daddr: [10, 0, 0, 2].into(),
//!     dport: 443,
//!     netns: 4026531840,
//! };
//! for ms in 0..2000 {
//!     engine.observe(ms * 1_000_000, Observation::new(Signal::Retransmit, 1).with_flow(flow));
//! }
//! let events = engine.tick(2_000_000_000);
//! assert!(events.iter().any(|e| e.anomaly.kind.name() == "flow_retransmit_spike"));
//! # Ok::<(), observer::aggregate::ConfigError>(())
//! ```
pub mod anomaly;
mod keys;
mod table;
mod view;
mod window;

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};

pub use self::{
    anomaly::{
        AnomalyEvent, AnomalyKind, AnomalySnapshot, CloseReason, ConfigError, KindThresholds,
        OpenedBy, PerConnection, Phase, ReasonCount, Thresholds,
    },
    keys::{ListenerKey, PeerKey, RowKey, RuleKey, TableId},
    view::{RowView, SignalView, SortKey},
    window::{BeforeAfter, Window, WindowCounts},
};
use self::{
    anomaly::{Closing, OpenAnomaly, snapshot},
    keys::TableKey,
    table::{Evicted, Row, Sample, Table},
    window::{HostHistory, NANOS_PER_SEC, second_of},
};
use crate::decode::Flow;

/// What an observation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Data segments retransmitted; the amount is segments.
    Retransmit,
    /// A SYN retransmitted: an active open gets no answer.
    SynRetransmit,
    /// A SYN-ACK retransmitted: a peer does not complete the handshake. Its flow has the
    /// listener's side in `s*`.
    SynackRetransmit,
    /// Packets the kernel dropped, with the drop reason in [`Observation::reason`].
    PacketDrop,
    /// Packets a firewall rule dropped.
    NetfilterDrop,
    /// Resets this host sent.
    ResetSent,
    /// Resets this host received.
    ResetReceived,
    /// Connects answered with a reset.
    ConnectRefused,
    /// Connects that timed out.
    ConnectTimeout,
    /// Connections dropped because a listener's accept queue was full.
    ListenOverflow,
    /// Connection requests dropped from a listener's SYN queue.
    SynQueueDrop,
    /// Connections the daemon's sweep found stale; report each connection once, when it turns
    /// stale, not at every sweep (the rates are of connections turning stale).
    StaleConnection,
    /// Connections to a peer (established, refused or timed out): the denominator of ratio
    /// signals, from the kernel's per-peer aggregates. Counted only on rows that already exist
    /// ([`Engine::observe_connections`]): healthy peers get no row.
    Connection,
}

impl Signal {
    pub const ALL: [Signal; 13] = [
        Signal::Retransmit,
        Signal::SynRetransmit,
        Signal::SynackRetransmit,
        Signal::PacketDrop,
        Signal::NetfilterDrop,
        Signal::ResetSent,
        Signal::ResetReceived,
        Signal::ConnectRefused,
        Signal::ConnectTimeout,
        Signal::ListenOverflow,
        Signal::SynQueueDrop,
        Signal::StaleConnection,
        Signal::Connection,
    ];

    pub(crate) const COUNT: usize = Self::ALL.len();

    /// The snake_case name records use.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Retransmit => "retransmit",
            Signal::SynRetransmit => "syn_retransmit",
            Signal::SynackRetransmit => "synack_retransmit",
            Signal::PacketDrop => "packet_drop",
            Signal::NetfilterDrop => "netfilter_drop",
            Signal::ResetSent => "reset_sent",
            Signal::ResetReceived => "reset_received",
            Signal::ConnectRefused => "connect_refused",
            Signal::ConnectTimeout => "connect_timeout",
            Signal::ListenOverflow => "listen_overflow",
            Signal::SynQueueDrop => "syn_queue_drop",
            Signal::StaleConnection => "stale_connection",
            Signal::Connection => "connection",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// This signal in a `u16` set of signals.
    pub(crate) fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

// Rows keep their signals in a u16.
const _: () = assert!(Signal::COUNT <= 16);

/// One thing that happened, and the keys it counts on.
///
/// It counts on the flow's row (if `flow`), the peer's (`peer`, or else derived from `flow` as
/// `(flow.netns, flow.daddr)`), the listener's (if `listener`) and the rule's (if `rule`), and
/// in the host-wide history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub signal: Signal,
    /// Segments for [`Signal::Retransmit`], otherwise events (usually 1).
    pub amount: u64,
    pub flow: Option<Flow>,
    pub peer: Option<PeerKey>,
    pub listener: Option<ListenerKey>,
    pub rule: Option<RuleKey>,
    /// Drop or reset reason as the kernel names it (`NETFILTER_DROP`). Shared so that the
    /// daemon can keep one `Arc` per reason code and not allocate per event.
    pub reason: Option<Arc<str>>,
}

impl Observation {
    /// An observation on no key yet: add them with the `with_*` methods.
    pub fn new(signal: Signal, amount: u64) -> Self {
        Self {
            signal,
            amount,
            flow: None,
            peer: None,
            listener: None,
            rule: None,
            reason: None,
        }
    }

    pub fn with_flow(mut self, flow: Flow) -> Self {
        self.flow = Some(flow);
        self
    }

    pub fn with_peer(mut self, peer: PeerKey) -> Self {
        self.peer = Some(peer);
        self
    }

    pub fn with_listener(mut self, listener: ListenerKey) -> Self {
        self.listener = Some(listener);
        self
    }

    pub fn with_rule(mut self, rule: RuleKey) -> Self {
        self.rule = Some(rule);
        self
    }

    pub fn with_reason(mut self, reason: Arc<str>) -> Self {
        self.reason = Some(reason);
        self
    }
}

/// Most rows a table can be configured for (slots are `u32`, one value means "none").
const MAX_TABLE_ROWS: usize = 1 << 30;

/// How many rows each table may hold. A full table evicts its least recently seen row.
///
/// A row takes about 270 bytes, plus ~180 per further signal it sees and ~270 per signal that
/// keeps exemplar flows or reasons (peers, listeners, rules). Measured: 100,000 flows over 100
/// peers add ~31 MiB of RSS; 100,000 flows with the peer table full (20,000) ~41 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_flows: usize,
    pub max_peers: usize,
    pub max_listeners: usize,
    pub max_rules: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_flows: 100_000,
            max_peers: 20_000,
            max_listeners: 4_096,
            max_rules: 4_096,
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Self {
            max_flows,
            max_peers,
            max_listeners,
            max_rules,
        } = *self;
        for (table, value) in [
            ("max_flows", max_flows),
            ("max_peers", max_peers),
            ("max_listeners", max_listeners),
            ("max_rules", max_rules),
        ] {
            if !(1..=MAX_TABLE_ROWS).contains(&value) {
                return Err(ConfigError::Limit {
                    table,
                    value,
                    max: MAX_TABLE_ROWS,
                });
            }
        }
        Ok(())
    }
}

/// Everything the engine can be configured with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub limits: Limits,
    pub thresholds: Thresholds,
}

/// Size and churn of one table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TableStats {
    pub rows: usize,
    pub capacity: usize,
    /// Rows pushed out to make room, since start.
    pub evictions: u64,
}

/// The engine's own health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub flows: TableStats,
    pub peers: TableStats,
    pub listeners: TableStats,
    pub rules: TableStats,
    pub open_anomalies: usize,
    /// Anomalies opened since start.
    pub anomalies_opened: u64,
}

/// The aggregation and anomaly engine. See the [module documentation](self).
pub struct Engine {
    thresholds: Thresholds,
    started_ns: u64,
    /// The latest time seen: observations and ticks never move it backwards.
    latest_ns: u64,
    last_tick_ns: u64,
    flows: Table<Flow>,
    peers: Table<PeerKey>,
    listeners: Table<ListenerKey>,
    rules: Table<RuleKey>,
    host: HostHistory,
    /// Keyed by kind and row slot: the kind says which table the slot is in.
    open: BTreeMap<(AnomalyKind, u32), OpenAnomaly>,
    next_anomaly_id: u64,
    /// Anomalies closed because their row was evicted during `observe`, reported at the next
    /// tick.
    closed_by_eviction: Vec<AnomalyEvent>,
}

impl Engine {
    /// An engine whose history starts at `now_ns`.
    pub fn new(config: EngineConfig, now_ns: u64) -> Result<Self, ConfigError> {
        let EngineConfig { limits, thresholds } = config;
        limits.validate()?;
        thresholds.validate()?;
        let Limits {
            max_flows,
            max_peers,
            max_listeners,
            max_rules,
        } = limits;
        Ok(Self {
            thresholds,
            started_ns: now_ns,
            latest_ns: now_ns,
            last_tick_ns: now_ns,
            flows: Table::new(max_flows),
            peers: Table::new(max_peers),
            listeners: Table::new(max_listeners),
            rules: Table::new(max_rules),
            host: HostHistory::new(second_of(now_ns)),
            open: BTreeMap::new(),
            next_anomaly_id: 1,
            closed_by_eviction: Vec::new(),
        })
    }

    /// Replaces the thresholds (a configuration reload); open anomalies keep their ids and are
    /// judged by the new values from the next tick.
    pub fn set_thresholds(&mut self, thresholds: Thresholds) -> Result<(), ConfigError> {
        thresholds.validate()?;
        self.thresholds = thresholds;
        Ok(())
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    fn advance(&mut self, now_ns: u64) -> u64 {
        self.latest_ns = self.latest_ns.max(now_ns);
        self.latest_ns
    }

    /// Counts one observation. O(1); allocates only for a key or signal not seen before.
    pub fn observe(&mut self, now_ns: u64, observation: Observation) {
        let now_ns = self.advance(now_ns);
        let Observation {
            signal,
            amount,
            flow,
            peer,
            listener,
            rule,
            reason,
        } = observation;
        let mut sample = Sample {
            signal,
            amount,
            now_ns,
            now_sec: second_of(now_ns),
            exemplar: None,
            reason: reason.as_ref(),
        };
        self.host.add(sample.now_sec, signal, amount);
        if let Some(flow) = &flow {
            let recorded = self.flows.record(*flow, &sample);
            // Other tables note the flow as an exemplar once a second per flow and signal:
            // recency to the second is all exemplars need, and the busiest flows then cost
            // their peer nothing.
            if recorded.first_this_second {
                sample.exemplar = Some(flow);
            }
            if let Some(evicted) = recorded.evicted {
                self.close_evicted(evicted, now_ns);
            }
        }
        if let Some(peer) = peer.or_else(|| flow.as_ref().map(PeerKey::of_flow))
            && let Some(evicted) = self.peers.record(peer, &sample).evicted
        {
            self.close_evicted(evicted, now_ns);
        }
        if let Some(listener) = listener
            && let Some(evicted) = self.listeners.record(listener, &sample).evicted
        {
            self.close_evicted(evicted, now_ns);
        }
        if let Some(rule) = rule
            && let Some(evicted) = self.rules.record(rule, &sample).evicted
        {
            self.close_evicted(evicted, now_ns);
        }
    }

    /// Counts `connections` to `peer` (the denominator of ratio signals) if the peer already
    /// has a row: a peer with no trouble gets none, and its connections cost nothing here.
    pub fn observe_connections(&mut self, now_ns: u64, peer: PeerKey, connections: u64) {
        let now_ns = self.advance(now_ns);
        let sample = Sample {
            signal: Signal::Connection,
            amount: connections,
            now_ns,
            now_sec: second_of(now_ns),
            exemplar: None,
            reason: None,
        };
        self.peers.record_existing(&peer, &sample);
    }

    /// Whether `peer` has a row (the daemon feeds connections only to those).
    pub fn has_peer(&self, peer: &PeerKey) -> bool {
        self.peers.slot_of(peer).is_some()
    }

    /// Ends the anomalies of a row evicted from a full table: nothing follows them any more,
    /// and an anomaly must not stay open silently.
    #[cold]
    fn close_evicted<K: TableKey>(&mut self, evicted: Evicted<K>, now_ns: u64) {
        let Evicted { slot, row } = evicted;
        if row.open_kinds == 0 {
            return;
        }
        for &kind in AnomalyKind::of_table(K::TABLE) {
            if row.open_kinds & kind.bit() == 0 {
                continue;
            }
            if let Some(anomaly) = self.open.remove(&(kind, slot)) {
                let closing = Closing {
                    at_ns: now_ns,
                    reason: CloseReason::Evicted,
                };
                self.closed_by_eviction.push(AnomalyEvent {
                    phase: Phase::Close,
                    anomaly: snapshot(
                        &anomaly,
                        &row,
                        self.thresholds.for_kind(kind),
                        second_of(now_ns),
                        Some(closing),
                    ),
                });
            }
        }
    }

    /// Updates baselines and anomalies; returns what opened, is due an update, or closed
    /// (anomalies of evicted rows first, then by table and row).
    pub fn tick(&mut self, now_ns: u64) -> Vec<AnomalyEvent> {
        let now_ns = self.advance(now_ns);
        let mut events = std::mem::take(&mut self.closed_by_eviction);
        let elapsed_ns = now_ns - self.last_tick_ns;
        self.last_tick_ns = now_ns;
        let since_start_ns = now_ns - self.started_ns;
        let warming_up = since_start_ns < self.thresholds.warmup_secs.saturating_mul(NANOS_PER_SEC);

        let mut pass = TickPass {
            now_ns,
            now_sec: second_of(now_ns),
            baseline_alpha: baseline_alpha(
                elapsed_ns,
                since_start_ns,
                self.thresholds.baseline_time_constant_secs,
                warming_up,
            ),
            may_open: !warming_up,
            thresholds: &self.thresholds,
            open: &mut self.open,
            next_anomaly_id: &mut self.next_anomaly_id,
            events: &mut events,
        };
        pass.run(&mut self.flows);
        pass.run(&mut self.peers);
        pass.run(&mut self.listeners);
        pass.run(&mut self.rules);
        events
    }

    /// Closes every open anomaly (reason `shutdown`), e.g. before the daemon exits.
    pub fn close_all(&mut self, now_ns: u64) -> Vec<AnomalyEvent> {
        let now_ns = self.advance(now_ns);
        let mut events = std::mem::take(&mut self.closed_by_eviction);
        let closing = Closing {
            at_ns: now_ns,
            reason: CloseReason::Shutdown,
        };
        let mut closed: Vec<_> = self
            .snapshots(Some(closing))
            .into_iter()
            .map(|anomaly| AnomalyEvent {
                phase: Phase::Close,
                anomaly,
            })
            .collect();
        events.append(&mut closed);
        self.open.clear();
        clear_open_kinds(&mut self.flows);
        clear_open_kinds(&mut self.peers);
        clear_open_kinds(&mut self.listeners);
        clear_open_kinds(&mut self.rules);
        events
    }

    /// The anomalies open now, oldest first.
    pub fn open_anomalies(&self) -> Vec<AnomalySnapshot> {
        self.snapshots(None)
    }

    fn snapshots(&self, closing: Option<Closing>) -> Vec<AnomalySnapshot> {
        let now_sec = second_of(self.latest_ns);
        let mut snapshots: Vec<AnomalySnapshot> = self
            .open
            .iter()
            .filter_map(|(&(kind, slot), anomaly)| {
                let thresholds = self.thresholds.for_kind(kind);
                match kind.table() {
                    TableId::Flows => self
                        .flows
                        .get(slot)
                        .map(|row| snapshot(anomaly, row, thresholds, now_sec, closing)),
                    TableId::Peers => self
                        .peers
                        .get(slot)
                        .map(|row| snapshot(anomaly, row, thresholds, now_sec, closing)),
                    TableId::Listeners => self
                        .listeners
                        .get(slot)
                        .map(|row| snapshot(anomaly, row, thresholds, now_sec, closing)),
                    TableId::Rules => self
                        .rules
                        .get(slot)
                        .map(|row| snapshot(anomaly, row, thresholds, now_sec, closing)),
                }
            })
            .collect();
        snapshots.sort_by_key(|s| s.id);
        snapshots
    }

    /// The `n` highest-ranked rows of a table, as of the latest time the engine has seen.
    pub fn top_rows(&self, table: TableId, sort: SortKey, n: usize) -> Vec<RowView> {
        let now_sec = second_of(self.latest_ns);
        let thresholds = &self.thresholds;
        match table {
            TableId::Flows => view::top_rows(&self.flows, sort, n, thresholds, now_sec),
            TableId::Peers => view::top_rows(&self.peers, sort, n, thresholds, now_sec),
            TableId::Listeners => view::top_rows(&self.listeners, sort, n, thresholds, now_sec),
            TableId::Rules => view::top_rows(&self.rules, sort, n, thresholds, now_sec),
        }
    }

    /// Host-wide rates of `signal`, per minute, over `span_ns` before `change_at_ns` and
    /// `span_ns` from it on (e.g. around a sysctl change). History reaches back 16 minutes;
    /// call it once the "after" span is over for a full comparison (`after_covered_secs`
    /// tells how much of it has passed).
    pub fn rate_before_after(
        &self,
        signal: Signal,
        change_at_ns: u64,
        span_ns: u64,
    ) -> BeforeAfter {
        let span_secs = u32::try_from(span_ns.div_ceil(NANOS_PER_SEC)).unwrap_or(u32::MAX);
        self.host.before_after(
            signal,
            second_of(change_at_ns),
            span_secs,
            second_of(self.latest_ns),
        )
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            flows: table_stats(&self.flows),
            peers: table_stats(&self.peers),
            listeners: table_stats(&self.listeners),
            rules: table_stats(&self.rules),
            open_anomalies: self.open.len(),
            anomalies_opened: self.next_anomaly_id - 1,
        }
    }
}

fn table_stats<K: TableKey>(table: &Table<K>) -> TableStats {
    TableStats {
        rows: table.len(),
        capacity: table.capacity(),
        evictions: table.evictions(),
    }
}

fn clear_open_kinds<K: TableKey>(table: &mut Table<K>) {
    for row in table.rows_mut() {
        row.open_kinds = 0;
    }
}

/// Weight of the newest 10 s rate in the baselines' EWMA, for ticks `elapsed_ns` apart (the
/// daemon's ticks need not be exactly a second apart). While warming up, the baselines are
/// plain time-weighted averages since start, so that they are meaningful when warm-up ends.
fn baseline_alpha(
    elapsed_ns: u64,
    since_start_ns: u64,
    time_constant_secs: u64,
    warming_up: bool,
) -> f32 {
    let elapsed_secs = elapsed_ns as f64 / NANOS_PER_SEC as f64;
    let mut alpha = 1.0 - (-elapsed_secs / time_constant_secs.max(1) as f64).exp();
    if warming_up && since_start_ns > 0 {
        alpha = alpha.max(elapsed_ns as f64 / since_start_ns as f64);
    }
    alpha.clamp(0.0, 1.0) as f32
}

/// The shortest span a rate may open on: a storm opens its anomaly within this many completed
/// seconds of its first symptom instead of waiting to fill the 10 s window, while one burst
/// of a few events still spreads over three seconds.
const OPENING_SPAN_SECS: u32 = 3;

/// The rate an anomaly opens on: the 10 s rate, or the rate over the last
/// [`OPENING_SPAN_SECS`] when that is higher (trouble that has just begun).
fn opening_rate<K: TableKey>(row: &Row<K>, mask: u16, now_sec: u32) -> f64 {
    let short =
        row.count_last(mask, now_sec, OPENING_SPAN_SECS) as f64 / f64::from(OPENING_SPAN_SECS);
    row.rate_per_sec(mask, Window::Last10s, now_sec).max(short)
}

/// Baselines below this are zero: keeps idle rows out of subnormal floats.
const NEGLIGIBLE_RATE: f32 = 1e-6;

/// One tick over the tables.
struct TickPass<'a> {
    now_ns: u64,
    now_sec: u32,
    baseline_alpha: f32,
    may_open: bool,
    thresholds: &'a Thresholds,
    open: &'a mut BTreeMap<(AnomalyKind, u32), OpenAnomaly>,
    next_anomaly_id: &'a mut u64,
    events: &'a mut Vec<AnomalyEvent>,
}

impl TickPass<'_> {
    fn run<K: TableKey>(&mut self, table: &mut Table<K>) {
        for (slot, row) in (0u32..).zip(table.rows_mut()) {
            for &kind in AnomalyKind::of_table(K::TABLE) {
                self.evaluate(kind, slot, row);
            }
            self.update_baselines(row);
        }
    }

    fn evaluate<K: TableKey>(&mut self, kind: AnomalyKind, slot: u32, row: &mut Row<K>) {
        let thresholds = self.thresholds.for_kind(kind);
        let mask = kind.signal_mask();
        if row.open_kinds & kind.bit() == 0 {
            if !self.may_open || !thresholds.enabled || row.signals & mask == 0 {
                return;
            }
            let departure = self.thresholds.baseline_factor * row.baseline_per_sec(mask)
                + thresholds.floor_threshold_per_sec();
            let opening = opening_rate(row, mask, self.now_sec);
            let rate_opens = opening >= thresholds.open_per_sec && opening > departure;
            let ratio_opens = || {
                PerConnection::of_row(row, mask, thresholds.ratio_open, self.now_sec).is_some_and(
                    |r| r.count >= thresholds.ratio_min_count && r.ratio >= r.open_ratio,
                )
            };
            let opened_by = if rate_opens {
                OpenedBy::Rate
            } else if ratio_opens() {
                OpenedBy::Ratio
            } else {
                return;
            };
            let anomaly = OpenAnomaly {
                id: *self.next_anomaly_id,
                kind,
                opened_ns: self.now_ns,
                reported_ns: self.now_ns,
                below_since_ns: None,
                // The rate it opened on (the 3 s one when trouble has just begun).
                peak_rate_per_sec: opening,
                opened_by,
            };
            *self.next_anomaly_id += 1;
            row.open_kinds |= kind.bit();
            self.report(Phase::Open, &anomaly, row, None);
            self.open.insert((kind, slot), anomaly);
            return;
        }

        let Some(mut anomaly) = self.open.remove(&(kind, slot)) else {
            // Cannot happen (bit and map change together); heal rather than panic.
            row.open_kinds &= !kind.bit();
            return;
        };
        let rate = row.rate_per_sec(mask, Window::Last10s, self.now_sec);
        anomaly.peak_rate_per_sec = anomaly.peak_rate_per_sec.max(rate);
        // A ratio keeps its anomaly open while the signals go on at half the open ratio.
        let ratio_holds = || {
            thresholds.ratio_close().is_some_and(|close| {
                row.count_last(mask, self.now_sec, Window::Last10s.secs()) > 0
                    && PerConnection::of_row(row, mask, thresholds.ratio_open, self.now_sec)
                        .is_some_and(|r| r.ratio >= close)
            })
        };
        if rate < thresholds.close_threshold_per_sec() && !ratio_holds() {
            let below_since_ns = *anomaly.below_since_ns.get_or_insert(self.now_ns);
            let hold_ns = self
                .thresholds
                .close_hold_secs
                .saturating_mul(NANOS_PER_SEC);
            if self.now_ns - below_since_ns >= hold_ns {
                row.open_kinds &= !kind.bit();
                let closing = Closing {
                    at_ns: self.now_ns,
                    reason: CloseReason::Subsided,
                };
                self.report(Phase::Close, &anomaly, row, Some(closing));
                return;
            }
        } else {
            anomaly.below_since_ns = None;
        }
        let update_ns = self
            .thresholds
            .update_interval_secs
            .saturating_mul(NANOS_PER_SEC);
        if self.now_ns - anomaly.reported_ns >= update_ns {
            anomaly.reported_ns = self.now_ns;
            self.report(Phase::Update, &anomaly, row, None);
        }
        self.open.insert((kind, slot), anomaly);
    }

    fn report<K: TableKey>(
        &mut self,
        phase: Phase,
        anomaly: &OpenAnomaly,
        row: &Row<K>,
        closing: Option<Closing>,
    ) {
        let thresholds = self.thresholds.for_kind(anomaly.kind);
        self.events.push(AnomalyEvent {
            phase,
            anomaly: snapshot(anomaly, row, thresholds, self.now_sec, closing),
        });
    }

    /// Moves each signal's baseline toward its 10 s rate, except while an anomaly watching the
    /// signal is open: a storm must not teach the baseline that it is normal.
    fn update_baselines<K: TableKey>(&self, row: &mut Row<K>) {
        let open_kinds = row.open_kinds;
        for series in row.series_mut() {
            if open_kinds != 0 && AnomalyKind::watching(K::TABLE, series.signal) & open_kinds != 0 {
                continue;
            }
            let rate = series.rate_per_sec(Window::Last10s, self.now_sec) as f32;
            if rate == 0.0 && series.baseline_per_sec == 0.0 {
                continue;
            }
            series.baseline_per_sec += self.baseline_alpha * (rate - series.baseline_per_sec);
            if series.baseline_per_sec < NEGLIGIBLE_RATE {
                series.baseline_per_sec = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests;
