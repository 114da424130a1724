//! Read-only views of rows, ranked for `observer top` and other readers.
use serde::Serialize;

use super::{
    Signal,
    anomaly::{AnomalyKind, Thresholds},
    keys::{RowKey, TableKey},
    table::{Row, Series, Table},
    window::{Window, WindowCounts},
};

/// How to rank rows, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SortKey {
    /// How close the row is to opening an anomaly: the largest ratio, over the kinds watching
    /// its table, of the kind's 10 s rate to its open threshold (1.0 = at the threshold).
    Severity,
    /// Rate of one signal (`None`: all signals summed) over a window.
    Rate {
        signal: Option<Signal>,
        window: Window,
    },
    /// Lifetime count of one signal (`None`: all signals summed).
    Total { signal: Option<Signal> },
    /// Most recently seen first.
    LastSeen,
}

/// One signal on a row, as of the view's moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SignalView {
    pub signal: Signal,
    pub counts: WindowCounts,
    pub total: u64,
    /// Slow average of the 10 s rate, per second.
    pub baseline_per_sec: f64,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

impl SignalView {
    fn new(series: &Series, now_sec: u32) -> Self {
        Self {
            signal: series.signal,
            counts: series.ring.counts(now_sec),
            total: series.total,
            baseline_per_sec: f64::from(series.baseline_per_sec),
            first_seen_ns: series.first_seen_ns,
            last_seen_ns: series.last_seen_ns,
        }
    }

    pub fn rate_per_sec(&self, window: Window) -> f64 {
        self.counts.rate_per_sec(window)
    }
}

/// A row of a table, as of the view's moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RowView {
    pub key: RowKey,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// See [`SortKey::Severity`].
    pub severity: f64,
    pub open_anomalies: Vec<AnomalyKind>,
    /// In the order the row first saw them.
    pub signals: Vec<SignalView>,
}

impl RowView {
    /// The view of one signal, if the row has seen it.
    pub fn signal(&self, signal: Signal) -> Option<&SignalView> {
        self.signals.iter().find(|s| s.signal == signal)
    }

    fn matching(&self, signal: Option<Signal>) -> impl Iterator<Item = &SignalView> {
        self.signals
            .iter()
            .filter(move |s| signal.is_none_or(|wanted| s.signal == wanted))
    }

    /// Count of `signal` (`None`: all signals) in `window`.
    pub fn count(&self, signal: Option<Signal>, window: Window) -> u64 {
        self.matching(signal).map(|s| s.counts.get(window)).sum()
    }

    /// Rate of `signal` (`None`: all signals) over `window`, per second.
    pub fn rate_per_sec(&self, signal: Option<Signal>, window: Window) -> f64 {
        self.count(signal, window) as f64 / f64::from(window.secs())
    }

    /// Lifetime count of `signal` (`None`: all signals).
    pub fn total(&self, signal: Option<Signal>) -> u64 {
        self.matching(signal).map(|s| s.total).sum()
    }
}

fn mask_of(signal: Option<Signal>) -> u16 {
    signal.map_or(u16::MAX, Signal::bit)
}

/// See [`SortKey::Severity`].
pub(crate) fn severity<K: TableKey>(row: &Row<K>, thresholds: &Thresholds, now_sec: u32) -> f64 {
    AnomalyKind::of_table(K::TABLE)
        .iter()
        .filter(|kind| thresholds.for_kind(**kind).enabled && row.signals & kind.signal_mask() != 0)
        .map(|&kind| {
            row.rate_per_sec(kind.signal_mask(), Window::Last10s, now_sec)
                / thresholds.for_kind(kind).open_per_sec
        })
        .fold(0.0, f64::max)
}

fn view<K: TableKey>(row: &Row<K>, thresholds: &Thresholds, now_sec: u32) -> RowView {
    RowView {
        key: row.key.row_key(),
        first_seen_ns: row.first_seen_ns(),
        last_seen_ns: row.last_seen_ns,
        severity: severity(row, thresholds, now_sec),
        open_anomalies: AnomalyKind::of_table(K::TABLE)
            .iter()
            .copied()
            .filter(|kind| row.open_kinds & kind.bit() != 0)
            .collect(),
        signals: row.series().map(|s| SignalView::new(s, now_sec)).collect(),
    }
}

/// The `n` highest-ranked rows of `table`; ties go to the most recently seen.
pub(crate) fn top_rows<K: TableKey>(
    table: &Table<K>,
    sort: SortKey,
    n: usize,
    thresholds: &Thresholds,
    now_sec: u32,
) -> Vec<RowView> {
    if n == 0 {
        return Vec::new();
    }
    let score = |row: &Row<K>| match sort {
        SortKey::Severity => severity(row, thresholds, now_sec),
        SortKey::Rate { signal, window } => row.rate_per_sec(mask_of(signal), window, now_sec),
        SortKey::Total { signal } => row.total(mask_of(signal)) as f64,
        // The tie-break below does the ranking.
        SortKey::LastSeen => 0.0,
    };
    let mut ranked: Vec<(f64, u64, usize)> = table
        .rows()
        .iter()
        .enumerate()
        .map(|(slot, row)| (score(row), row.last_seen_ns, slot))
        .collect();
    let order = |a: &(f64, u64, usize), b: &(f64, u64, usize)| {
        b.0.total_cmp(&a.0)
            .then_with(|| b.1.cmp(&a.1))
            .then_with(|| a.2.cmp(&b.2))
    };
    if ranked.len() > n {
        ranked.select_nth_unstable_by(n - 1, order);
        ranked.truncate(n);
    }
    ranked.sort_unstable_by(order);
    ranked
        .into_iter()
        .filter_map(|(_, _, slot)| table.rows().get(slot))
        .map(|row| view(row, thresholds, now_sec))
        .collect()
}
