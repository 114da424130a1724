//! Anomalies: what they are, their thresholds, and the records their lifecycle produces.
//!
//! An anomaly of a kind opens on a row when, at a tick, the 10 s rate of the kind's signals
//! reaches the kind's open threshold *and* departs from the row's baseline
//! (`rate > baseline_factor × baseline + floor`). While open it is re-reported every
//! `update_interval_secs`, and it closes once the 10 s rate has stayed below the close threshold
//! for `close_hold_secs` (hysteresis: a flapping rate does not open and close it repeatedly).
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Signal,
    keys::{RowKey, TableId, TableKey, serialize_flows, serialize_shared_str},
    table::{MAX_EXEMPLARS, Row},
    window::{Window, WindowCounts},
};
use crate::decode::Flow;

/// What went wrong, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// One flow retransmits far more than before.
    FlowRetransmitSpike,
    /// Retransmits to one peer, across its flows, far above before.
    PeerRetransmitSpike,
    /// SYNs to a peer are being retransmitted: connects get no answer.
    ConnectTrouble,
    /// SYN-ACKs to a peer are being retransmitted: its handshakes do not complete.
    HandshakesNotCompleting,
    /// A listener's accept queue overflows.
    ListenOverflow,
    /// A listener's SYN queue drops requests.
    SynQueueDrops,
    /// A firewall rule drops packets.
    NetfilterDrops,
    /// Many resets sent to or received from a peer.
    ResetStorm,
    /// Connects to a peer are refused or time out.
    FailedConnects,
    /// Connections to a peer are found stale.
    StaleConnections,
    /// Packets of a peer are dropped (with a kernel drop reason).
    PacketDrops,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 11] = [
        AnomalyKind::FlowRetransmitSpike,
        AnomalyKind::PeerRetransmitSpike,
        AnomalyKind::ConnectTrouble,
        AnomalyKind::HandshakesNotCompleting,
        AnomalyKind::ListenOverflow,
        AnomalyKind::SynQueueDrops,
        AnomalyKind::NetfilterDrops,
        AnomalyKind::ResetStorm,
        AnomalyKind::FailedConnects,
        AnomalyKind::StaleConnections,
        AnomalyKind::PacketDrops,
    ];

    /// The snake_case name records use (also the name of its entry in [`Thresholds`]).
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::FlowRetransmitSpike => "flow_retransmit_spike",
            AnomalyKind::PeerRetransmitSpike => "peer_retransmit_spike",
            AnomalyKind::ConnectTrouble => "connect_trouble",
            AnomalyKind::HandshakesNotCompleting => "handshakes_not_completing",
            AnomalyKind::ListenOverflow => "listen_overflow",
            AnomalyKind::SynQueueDrops => "syn_queue_drops",
            AnomalyKind::NetfilterDrops => "netfilter_drops",
            AnomalyKind::ResetStorm => "reset_storm",
            AnomalyKind::FailedConnects => "failed_connects",
            AnomalyKind::StaleConnections => "stale_connections",
            AnomalyKind::PacketDrops => "packet_drops",
        }
    }

    /// The table whose rows this kind watches.
    pub fn table(self) -> TableId {
        match self {
            AnomalyKind::FlowRetransmitSpike => TableId::Flows,
            AnomalyKind::PeerRetransmitSpike
            | AnomalyKind::ConnectTrouble
            | AnomalyKind::HandshakesNotCompleting
            | AnomalyKind::ResetStorm
            | AnomalyKind::FailedConnects
            | AnomalyKind::StaleConnections
            | AnomalyKind::PacketDrops => TableId::Peers,
            AnomalyKind::ListenOverflow | AnomalyKind::SynQueueDrops => TableId::Listeners,
            AnomalyKind::NetfilterDrops => TableId::Rules,
        }
    }

    /// The signals whose summed rate this kind watches.
    pub fn signals(self) -> &'static [Signal] {
        match self {
            AnomalyKind::FlowRetransmitSpike | AnomalyKind::PeerRetransmitSpike => {
                &[Signal::Retransmit]
            }
            AnomalyKind::ConnectTrouble => &[Signal::SynRetransmit],
            AnomalyKind::HandshakesNotCompleting => &[Signal::SynackRetransmit],
            AnomalyKind::ListenOverflow => &[Signal::ListenOverflow],
            AnomalyKind::SynQueueDrops => &[Signal::SynQueueDrop],
            AnomalyKind::NetfilterDrops => &[Signal::NetfilterDrop],
            AnomalyKind::ResetStorm => &[Signal::ResetSent, Signal::ResetReceived],
            AnomalyKind::FailedConnects => &[Signal::ConnectRefused, Signal::ConnectTimeout],
            AnomalyKind::StaleConnections => &[Signal::StaleConnection],
            AnomalyKind::PacketDrops => &[Signal::PacketDrop],
        }
    }

    /// The kinds that watch `table`'s rows.
    pub fn of_table(table: TableId) -> &'static [AnomalyKind] {
        match table {
            TableId::Flows => &[AnomalyKind::FlowRetransmitSpike],
            TableId::Peers => &[
                AnomalyKind::PeerRetransmitSpike,
                AnomalyKind::ConnectTrouble,
                AnomalyKind::HandshakesNotCompleting,
                AnomalyKind::ResetStorm,
                AnomalyKind::FailedConnects,
                AnomalyKind::StaleConnections,
                AnomalyKind::PacketDrops,
            ],
            TableId::Listeners => &[AnomalyKind::ListenOverflow, AnomalyKind::SynQueueDrops],
            TableId::Rules => &[AnomalyKind::NetfilterDrops],
        }
    }

    pub(crate) fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// [`Signal::bit`]s of [`signals`](Self::signals).
    pub(crate) fn signal_mask(self) -> u16 {
        self.signals().iter().fold(0, |mask, s| mask | s.bit())
    }

    /// `AnomalyKind::bit`s of the kinds on `table` that watch `signal`.
    pub(crate) fn watching(table: TableId, signal: Signal) -> u16 {
        Self::of_table(table)
            .iter()
            .filter(|kind| kind.signals().contains(&signal))
            .fold(0, |mask, kind| mask | kind.bit())
    }
}

// Rows keep open kinds in a u16.
const _: () = assert!(AnomalyKind::ALL.len() <= 16);

/// When one kind of anomaly opens and closes, in events (or segments) per second over the 10 s
/// window. In a configuration file only `open_per_sec` is required.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindThresholds {
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Opens at or above this rate (if it also departs from the baseline).
    pub open_per_sec: f64,
    /// Closes after staying below this rate for `close_hold_secs`; default half of open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_per_sec: Option<f64>,
    /// The rate must exceed `baseline_factor × baseline + floor`; default the close rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor_per_sec: Option<f64>,
    /// Also opens when, over the 60 s window, the signals per connection of the row (peer)
    /// reach this ratio, whatever the absolute rate: a small service whose every connection
    /// fails. `None`: rates only. Needs `ratio_min_count` signals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_open: Option<f64>,
    /// The fewest signals in the 60 s window for a ratio to count (one failure in two
    /// connections is no anomaly).
    #[serde(default = "default_ratio_min_count")]
    pub ratio_min_count: u64,
}

fn default_ratio_min_count() -> u64 {
    5
}

fn enabled_by_default() -> bool {
    true
}

impl KindThresholds {
    /// Enabled, opening at `open_per_sec`, the other rates derived.
    pub const fn opening_at(open_per_sec: f64) -> Self {
        Self {
            enabled: true,
            open_per_sec,
            close_per_sec: None,
            floor_per_sec: None,
            ratio_open: None,
            ratio_min_count: 5,
        }
    }

    /// Also opening at `ratio` signals per connection, given `min_count` signals in 60 s.
    pub const fn or_per_connection(mut self, ratio: f64, min_count: u64) -> Self {
        self.ratio_open = Some(ratio);
        self.ratio_min_count = min_count;
        self
    }

    /// The ratio below which a ratio-opened anomaly counts as subsided (half the open ratio).
    pub fn ratio_close(&self) -> Option<f64> {
        self.ratio_open.map(|r| r / 2.0)
    }

    /// The close rate in effect.
    pub fn close_threshold_per_sec(&self) -> f64 {
        self.close_per_sec.unwrap_or(self.open_per_sec / 2.0)
    }

    /// The baseline floor in effect.
    pub fn floor_threshold_per_sec(&self) -> f64 {
        self.floor_per_sec
            .unwrap_or_else(|| self.close_threshold_per_sec())
    }
}

/// All anomaly settings. Deserializable from the configuration file; fields left out keep
/// their defaults, unknown fields are errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    pub flow_retransmit_spike: KindThresholds,
    pub peer_retransmit_spike: KindThresholds,
    pub connect_trouble: KindThresholds,
    pub handshakes_not_completing: KindThresholds,
    pub listen_overflow: KindThresholds,
    pub syn_queue_drops: KindThresholds,
    pub netfilter_drops: KindThresholds,
    pub reset_storm: KindThresholds,
    pub failed_connects: KindThresholds,
    pub stale_connections: KindThresholds,
    pub packet_drops: KindThresholds,
    /// How far above its baseline a rate must be (the `k` in `k × baseline + floor`).
    pub baseline_factor: f64,
    /// Time constant of the baseline's EWMA: it follows a level change by ~63% in this time.
    pub baseline_time_constant_secs: u64,
    /// An open anomaly is re-reported this often.
    pub update_interval_secs: u64,
    /// How long the rate must stay below the close threshold before an anomaly closes.
    pub close_hold_secs: u64,
    /// For this long after the engine starts, baselines learn (as plain averages) and nothing
    /// opens. 0 reports problems already under way at start-up at once.
    pub warmup_secs: u64,
}

impl Default for Thresholds {
    /// Quiet hosts open nothing: every default needs a sustained 10 s rate that a healthy
    /// host does not produce (e.g. a flow retransmitting 100 segments in 10 s), while a storm
    /// on one flow opens at the next tick.
    fn default() -> Self {
        Self {
            flow_retransmit_spike: KindThresholds::opening_at(10.0),
            // Ratios: retransmitted segments, SYN retransmits, resets and failures per connection
            // to the peer (connections from the kernel's per-peer aggregates).
            peer_retransmit_spike: KindThresholds::opening_at(20.0).or_per_connection(0.5, 10),
            connect_trouble: KindThresholds::opening_at(1.0).or_per_connection(0.5, 5),
            handshakes_not_completing: KindThresholds::opening_at(1.0),
            listen_overflow: KindThresholds::opening_at(0.5),
            syn_queue_drops: KindThresholds::opening_at(0.5),
            netfilter_drops: KindThresholds::opening_at(20.0),
            reset_storm: KindThresholds::opening_at(5.0).or_per_connection(0.5, 5),
            failed_connects: KindThresholds::opening_at(1.0).or_per_connection(0.5, 5),
            stale_connections: KindThresholds::opening_at(0.5),
            packet_drops: KindThresholds::opening_at(10.0),
            baseline_factor: 3.0,
            baseline_time_constant_secs: 600,
            update_interval_secs: 10,
            close_hold_secs: 30,
            warmup_secs: 0,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting} = {value}: {requirement}")]
    Threshold {
        setting: String,
        value: f64,
        requirement: &'static str,
    },
    #[error("limits.{table} = {value}: must be between 1 and {max}")]
    Limit {
        table: &'static str,
        value: usize,
        max: usize,
    },
}

impl Thresholds {
    pub fn for_kind(&self, kind: AnomalyKind) -> &KindThresholds {
        match kind {
            AnomalyKind::FlowRetransmitSpike => &self.flow_retransmit_spike,
            AnomalyKind::PeerRetransmitSpike => &self.peer_retransmit_spike,
            AnomalyKind::ConnectTrouble => &self.connect_trouble,
            AnomalyKind::HandshakesNotCompleting => &self.handshakes_not_completing,
            AnomalyKind::ListenOverflow => &self.listen_overflow,
            AnomalyKind::SynQueueDrops => &self.syn_queue_drops,
            AnomalyKind::NetfilterDrops => &self.netfilter_drops,
            AnomalyKind::ResetStorm => &self.reset_storm,
            AnomalyKind::FailedConnects => &self.failed_connects,
            AnomalyKind::StaleConnections => &self.stale_connections,
            AnomalyKind::PacketDrops => &self.packet_drops,
        }
    }

    /// Checks every setting; the engine refuses thresholds that fail.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Self {
            baseline_factor,
            baseline_time_constant_secs,
            update_interval_secs,
            close_hold_secs: _,
            warmup_secs: _,
            // The per-kind settings, checked through `for_kind` below.
            flow_retransmit_spike: _,
            peer_retransmit_spike: _,
            connect_trouble: _,
            handshakes_not_completing: _,
            listen_overflow: _,
            syn_queue_drops: _,
            netfilter_drops: _,
            reset_storm: _,
            failed_connects: _,
            stale_connections: _,
            packet_drops: _,
        } = self;
        let fail = |setting: String, value: f64, requirement| {
            Err(ConfigError::Threshold {
                setting,
                value,
                requirement,
            })
        };
        for kind in AnomalyKind::ALL {
            let thresholds = self.for_kind(kind);
            // Close and floor are checked as resolved, after their defaults apply.
            let KindThresholds {
                enabled: _,
                open_per_sec,
                close_per_sec: _,
                floor_per_sec: _,
                ratio_open,
                ratio_min_count,
            } = *thresholds;
            let close = thresholds.close_threshold_per_sec();
            let floor = thresholds.floor_threshold_per_sec();
            let name = kind.name();
            if !(open_per_sec.is_finite() && open_per_sec > 0.0) {
                return fail(
                    format!("{name}.open_per_sec"),
                    open_per_sec,
                    "must be a positive number",
                );
            }
            if !(close.is_finite() && (0.0..=open_per_sec).contains(&close)) {
                return fail(
                    format!("{name}.close_per_sec"),
                    close,
                    "must be between 0 and open_per_sec",
                );
            }
            if !(floor.is_finite() && floor >= 0.0) {
                return fail(
                    format!("{name}.floor_per_sec"),
                    floor,
                    "must be zero or a positive number",
                );
            }
            if let Some(ratio) = ratio_open {
                if kind.table() != TableId::Peers {
                    return fail(
                        format!("{name}.ratio_open"),
                        ratio,
                        "only kinds on peers have a per-connection ratio",
                    );
                }
                if !(ratio.is_finite() && ratio > 0.0) {
                    return fail(
                        format!("{name}.ratio_open"),
                        ratio,
                        "must be a positive number",
                    );
                }
                if ratio_min_count == 0 {
                    return fail(format!("{name}.ratio_min_count"), 0.0, "must be at least 1");
                }
            }
        }
        if !(baseline_factor.is_finite() && *baseline_factor >= 1.0) {
            return fail(
                "baseline_factor".to_owned(),
                *baseline_factor,
                "must be at least 1",
            );
        }
        if *baseline_time_constant_secs == 0 {
            return fail(
                "baseline_time_constant_secs".to_owned(),
                0.0,
                "must be at least 1",
            );
        }
        if *update_interval_secs == 0 {
            return fail("update_interval_secs".to_owned(), 0.0, "must be at least 1");
        }
        Ok(())
    }
}

/// Where an anomaly is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Open,
    Update,
    Close,
}

impl Phase {
    /// The `type` of the JSON record for this phase.
    pub fn record_type(self) -> &'static str {
        match self {
            Phase::Open => "anomaly_open",
            Phase::Update => "anomaly_update",
            Phase::Close => "anomaly_close",
        }
    }
}

/// Why an anomaly closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The rate stayed below the close threshold for the hold time.
    Subsided,
    /// Its row was evicted to make room in a full table: the engine can no longer follow it.
    Evicted,
    /// The engine was asked to close everything (shutdown).
    Shutdown,
}

/// How often one reason was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    #[serde(serialize_with = "serialize_shared_str")]
    pub reason: Arc<str>,
    pub count: u64,
}

/// An anomaly as of one moment. Its JSON is an object meant to be flattened into a record
/// (`#[serde(flatten)]`) beside the daemon's own fields (`type`, `time`, `context`); no field is
/// named `type`, `time` or `context`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnomalySnapshot {
    /// Unique for the engine's life, increasing in opening order.
    pub id: u64,
    pub kind: AnomalyKind,
    pub key: RowKey,
    /// The signals counted (their sum is what the rates and counts measure).
    pub signals: &'static [Signal],
    /// Counts in the completed 1 s, 10 s and 60 s windows.
    pub counts: WindowCounts,
    /// Rate over the 10 s window, per second: what the thresholds are compared with.
    pub rate_per_sec: f64,
    /// What opened it: the absolute rate, or the signals per connection.
    pub opened_by: OpenedBy,
    /// The signals per connection over the 60 s window, for kinds with a ratio and rows with
    /// connections counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_connection: Option<PerConnection>,
    /// The rate it opened on (over the last 3 s when trouble had just begun), or the highest
    /// 10 s rate seen at a tick since, whichever is higher.
    pub peak_rate_per_sec: f64,
    /// Count of the signals since the key was first seen.
    pub lifetime_count: u64,
    /// The baseline the rate departed from, per second (frozen while the anomaly is open).
    pub baseline_per_sec: f64,
    pub open_threshold_per_sec: f64,
    pub close_threshold_per_sec: f64,
    /// First and last time the key showed one of the signals (monotonic ns, as passed in).
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub opened_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<CloseReason>,
    /// Up to five distinct flows that contributed, most recent (to the second) first; empty for a
    /// flow's own anomaly, whose key is the flow.
    #[serde(serialize_with = "serialize_flows")]
    pub exemplar_flows: Vec<Flow>,
    /// Drop or reset reasons seen with the signals, most frequent first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<ReasonCount>,
    /// Count with reasons beyond the ones listed (a row keeps eight distinct reasons a signal).
    #[serde(skip_serializing_if = "is_zero")]
    pub other_reasons: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// What made an anomaly open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpenedBy {
    /// The rate reached `open_per_sec` and departed from the baseline.
    Rate,
    /// The signals per connection reached `ratio_open`.
    Ratio,
}

/// Signals per connection over the 60 s window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PerConnection {
    /// The kind's signals in the window.
    pub count: u64,
    /// Connections to the peer in the window: established, refused and timed out.
    pub connections: u64,
    pub ratio: f64,
    pub open_ratio: f64,
}

impl PerConnection {
    /// The ratio on `row`, if the kind has one and the row counted connections.
    pub(crate) fn of_row<K: TableKey>(
        row: &Row<K>,
        mask: u16,
        open_ratio: Option<f64>,
        now_sec: u32,
    ) -> Option<Self> {
        let open_ratio = open_ratio?;
        let connections = row.count_last(Signal::Connection.bit(), now_sec, RATIO_WINDOW_SECS);
        if connections == 0 {
            return None;
        }
        let count = row.count_last(mask, now_sec, RATIO_WINDOW_SECS);
        Some(Self {
            count,
            connections,
            ratio: count as f64 / connections as f64,
            open_ratio,
        })
    }
}

/// The window ratios are taken over, in seconds.
pub(crate) const RATIO_WINDOW_SECS: u32 = 60;

/// One step of an anomaly's life: what `Engine::tick` returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnomalyEvent {
    pub phase: Phase,
    pub anomaly: AnomalySnapshot,
}

/// The engine's state for one open anomaly.
#[derive(Clone, Debug)]
pub(crate) struct OpenAnomaly {
    pub(crate) id: u64,
    pub(crate) kind: AnomalyKind,
    pub(crate) opened_ns: u64,
    /// When the last open or update was reported.
    pub(crate) reported_ns: u64,
    /// Since when the rate has been below the close threshold, if it is.
    pub(crate) below_since_ns: Option<u64>,
    pub(crate) peak_rate_per_sec: f64,
    pub(crate) opened_by: OpenedBy,
}

/// The end of an anomaly, for [`snapshot`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Closing {
    pub(crate) at_ns: u64,
    pub(crate) reason: CloseReason,
}

/// Describes `anomaly` from its row's current counts.
pub(crate) fn snapshot<K: TableKey>(
    anomaly: &OpenAnomaly,
    row: &Row<K>,
    thresholds: &KindThresholds,
    now_sec: u32,
    closing: Option<Closing>,
) -> AnomalySnapshot {
    let OpenAnomaly {
        id,
        kind,
        opened_ns,
        reported_ns: _,
        below_since_ns: _,
        peak_rate_per_sec,
        opened_by,
    } = *anomaly;
    let mask = kind.signal_mask();
    let counts = row.counts(mask, now_sec);

    // Interleaved by recency rank when several signals count (each series orders its own).
    let per_series: Vec<Vec<&Flow>> = row
        .series_in(mask)
        .map(|s| s.exemplars().collect())
        .collect();
    let mut exemplar_flows: Vec<Flow> = Vec::with_capacity(MAX_EXEMPLARS);
    for rank in 0..MAX_EXEMPLARS {
        for flow in per_series.iter().filter_map(|flows| flows.get(rank)) {
            if exemplar_flows.len() < MAX_EXEMPLARS && !exemplar_flows.contains(flow) {
                exemplar_flows.push(**flow);
            }
        }
    }

    let mut reasons: Vec<ReasonCount> = Vec::new();
    let mut other_reasons = 0;
    for extras in row.series_in(mask).filter_map(|s| s.extras.as_deref()) {
        other_reasons += extras.other_reasons;
        for (reason, count) in &extras.reasons {
            match reasons.iter_mut().find(|r| r.reason == *reason) {
                Some(known) => known.count += count,
                None => reasons.push(ReasonCount {
                    reason: Arc::clone(reason),
                    count: *count,
                }),
            }
        }
    }
    reasons.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));

    let first_seen_ns = row
        .series_in(mask)
        .map(|s| s.first_seen_ns)
        .min()
        .unwrap_or_else(|| row.first_seen_ns());
    let last_seen_ns = row
        .series_in(mask)
        .map(|s| s.last_seen_ns)
        .max()
        .unwrap_or(row.last_seen_ns);

    AnomalySnapshot {
        id,
        kind,
        key: row.key.row_key(),
        signals: kind.signals(),
        counts,
        rate_per_sec: counts.rate_per_sec(Window::Last10s),
        opened_by,
        per_connection: PerConnection::of_row(row, mask, thresholds.ratio_open, now_sec),
        peak_rate_per_sec,
        lifetime_count: row.total(mask),
        baseline_per_sec: row.baseline_per_sec(mask),
        open_threshold_per_sec: thresholds.open_per_sec,
        close_threshold_per_sec: thresholds.close_threshold_per_sec(),
        first_seen_ns,
        last_seen_ns,
        opened_ns,
        closed_ns: closing.map(|c| c.at_ns),
        close_reason: closing.map(|c| c.reason),
        exemplar_flows,
        reasons,
        other_reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_on_its_table_once() {
        for table in TableId::ALL {
            for kind in AnomalyKind::of_table(table) {
                assert_eq!(kind.table(), table, "{kind:?}");
            }
        }
        let listed: usize = TableId::ALL
            .iter()
            .map(|&t| AnomalyKind::of_table(t).len())
            .sum();
        assert_eq!(listed, AnomalyKind::ALL.len());
        // A signal feeds at most one kind per table, so freezing its baseline is unambiguous.
        for table in TableId::ALL {
            for signal in Signal::ALL {
                assert!(AnomalyKind::watching(table, signal).count_ones() <= 1);
            }
        }
    }

    #[test]
    fn names_match_the_thresholds_fields() -> Result<(), serde_json::Error> {
        let json = serde_json::to_value(Thresholds::default())?;
        for kind in AnomalyKind::ALL {
            assert!(json.get(kind.name()).is_some(), "{}", kind.name());
            assert_eq!(serde_json::to_value(kind)?, kind.name());
        }
        Ok(())
    }

    #[test]
    fn defaults_are_valid_and_partial_configs_keep_them() -> Result<(), serde_json::Error> {
        assert_eq!(Thresholds::default().validate(), Ok(()));
        let parsed: Thresholds =
            serde_json::from_str(r#"{"reset_storm": {"open_per_sec": 50}, "close_hold_secs": 5}"#)?;
        assert_eq!(parsed.reset_storm.open_per_sec, 50.0);
        assert_eq!(parsed.reset_storm.close_threshold_per_sec(), 25.0);
        assert_eq!(parsed.reset_storm.floor_threshold_per_sec(), 25.0);
        assert!(parsed.reset_storm.enabled);
        assert_eq!(parsed.close_hold_secs, 5);
        assert_eq!(
            parsed.flow_retransmit_spike,
            Thresholds::default().flow_retransmit_spike
        );
        assert!(serde_json::from_str::<Thresholds>(r#"{"no_such_kind": {}}"#).is_err());
        assert!(serde_json::from_str::<Thresholds>(r#"{"reset_storm": {}}"#).is_err());
        Ok(())
    }

    #[test]
    fn impossible_thresholds_are_refused() {
        let mut thresholds = Thresholds::default();
        thresholds.listen_overflow.close_per_sec = Some(5.0);
        assert!(matches!(
            thresholds.validate(),
            Err(ConfigError::Threshold { ref setting, .. }) if setting == "listen_overflow.close_per_sec"
        ));
        let mut thresholds = Thresholds::default();
        thresholds.packet_drops.open_per_sec = f64::NAN;
        assert!(thresholds.validate().is_err());
        let thresholds = Thresholds {
            baseline_factor: 0.5,
            ..Thresholds::default()
        };
        assert!(thresholds.validate().is_err());
        let thresholds = Thresholds {
            update_interval_secs: 0,
            ..Thresholds::default()
        };
        assert!(thresholds.validate().is_err());
    }

    #[test]
    fn phases_name_their_records() {
        assert_eq!(Phase::Open.record_type(), "anomaly_open");
        assert_eq!(Phase::Update.record_type(), "anomaly_update");
        assert_eq!(Phase::Close.record_type(), "anomaly_close");
    }
}
