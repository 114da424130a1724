//! Findings: the daemon's anomalies as one entry each (open → updates → close), with the cause
//! they ended up with and a severity that says how bad it is. Pure: `observer top`'s Findings
//! view and `observer explain` both read them.
//!
//! Severity (docs/top.md): **critical** when nearly every connection is affected (failed
//! connects, resets or SYN retransmits per connection ≥ [`CRITICAL_RATIO`]), when connections cannot be made or make no progress
//! (failed connects, SYNs unanswered, handshakes not completing, listen-queue overflows and
//! SYN-queue drops, stale connections) at least [`CRITICAL_COUNT`] times in 60 s, or when the
//! rate is [`CRITICAL_RATE_FACTOR`] times the open threshold or more; **warning** otherwise.
use std::collections::BTreeMap;

use super::wire::{AnomalyDetail, AnomalyIn, AnomalyPhase, CauseIn};
use crate::aggregate::RowKey;

/// Signals per connection from which a finding is critical: (nearly) every connection.
pub const CRITICAL_RATIO: f64 = 0.9;
/// Failed or stuck connections in 60 s from which a connection-level finding is critical.
pub const CRITICAL_COUNT: u64 = 20;
/// A rate this many times the open threshold is critical, whatever the kind.
pub const CRITICAL_RATE_FACTOR: f64 = 10.0;
/// How long a closed finding stays in the list (dimmed).
pub const RECENTLY_CLOSED_NS: u64 = 300 * 1_000_000_000;
/// Findings kept (the oldest closed ones are forgotten first).
const MAX_FINDINGS: usize = 2_000;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    /// Four columns: `CRIT`, `WARN`.
    pub fn short(self) -> &'static str {
        match self {
            Severity::Critical => "CRIT",
            Severity::Warning => "WARN",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
    }
}

/// A severity and the reason for it, in words.
#[derive(Clone, Debug, PartialEq)]
pub struct Assessment {
    pub severity: Severity,
    pub why: String,
}

/// Kinds where the signal is a connection that could not be made or makes no progress.
fn connection_level(kind: &str) -> bool {
    matches!(
        kind,
        "failed_connects"
            | "connect_trouble"
            | "handshakes_not_completing"
            | "listen_overflow"
            | "syn_queue_drops"
            | "stale_connections"
    )
}

/// The severity of an anomaly of `kind` as its record describes it.
pub fn assess(kind: &str, rate_per_sec: f64, detail: &AnomalyDetail) -> Assessment {
    let critical = |why: String| Assessment {
        severity: Severity::Critical,
        why,
    };
    // Retransmitted segments per connection grow with a connection's length: no share of
    // connections, so no ratio makes a retransmit spike critical.
    if let Some(pc) = detail.per_connection
        && !kind.ends_with("retransmit_spike")
        && pc.connections > 0
        && pc.ratio >= CRITICAL_RATIO
    {
        return critical(format!(
            "{} over {} connections: {} per connection ≥ {CRITICAL_RATIO}",
            pc.count,
            pc.connections,
            fmt_ratio(pc.ratio)
        ));
    }
    let count = detail.counts.last_60s.max(detail.counts.last_10s);
    if connection_level(kind) && count >= CRITICAL_COUNT {
        return critical(format!(
            "{count} in 60 s: connections fail or stall (≥ {CRITICAL_COUNT})"
        ));
    }
    let threshold = detail.open_threshold_per_sec;
    if threshold > 0.0 && rate_per_sec >= CRITICAL_RATE_FACTOR * threshold {
        return critical(format!(
            "rate {rate_per_sec:.1}/s is {:.0}× the open threshold {threshold}/s",
            rate_per_sec / threshold
        ));
    }
    let why = match detail.per_connection {
        Some(pc) if pc.connections > 0 => format!(
            "{} per connection, rate {rate_per_sec:.1}/s",
            fmt_ratio(pc.ratio)
        ),
        _ if threshold > 0.0 => format!(
            "rate {rate_per_sec:.1}/s, {:.1}× the open threshold",
            rate_per_sec / threshold
        ),
        _ => format!("rate {rate_per_sec:.1}/s"),
    };
    Assessment {
        severity: Severity::Warning,
        why,
    }
}

fn fmt_ratio(ratio: f64) -> String {
    format!("{ratio:.2}")
}

/// One anomaly through its life.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub id: u64,
    pub kind: String,
    pub key: RowKey,
    /// The key's namespace.
    pub netns: u32,
    /// Its name, when a record named it.
    pub netns_name: Option<String>,
    /// Unix ns of the first record seen (its opening, unless top attached later).
    pub opened_ns: u64,
    /// Whether the `anomaly_open` record was seen.
    pub open_seen: bool,
    pub updated_ns: u64,
    pub closed_ns: Option<u64>,
    pub close_reason: Option<String>,
    pub updates: u32,
    pub rate_per_sec: f64,
    pub peak_rate_per_sec: f64,
    pub reasons: Vec<(String, u64)>,
    /// The latest record's detail; `cause` as it ended up (a later `null` does not erase it).
    pub detail: AnomalyDetail,
    /// When the cause was first known (unix ns).
    pub cause_found_ns: Option<u64>,
    /// The worst severity reached.
    pub assessment: Assessment,
    /// The rate of the record it was assessed on.
    assessed_rate: f64,
}

impl Finding {
    fn new(record: &AnomalyIn, at: u64) -> Self {
        Self {
            id: record.id,
            kind: record.kind.clone(),
            key: record.key.clone(),
            netns: crate::analysis::netns_of(&record.key),
            netns_name: None,
            opened_ns: at,
            open_seen: record.phase == AnomalyPhase::Open,
            updated_ns: at,
            closed_ns: None,
            close_reason: None,
            updates: 0,
            rate_per_sec: 0.0,
            peak_rate_per_sec: 0.0,
            reasons: Vec::new(),
            detail: AnomalyDetail::default(),
            cause_found_ns: None,
            assessment: assess(&record.kind, record.rate_per_sec, &record.detail),
            assessed_rate: record.rate_per_sec,
        }
    }

    /// Takes the next record of this anomaly.
    pub fn apply(&mut self, record: &AnomalyIn, at: u64) {
        match record.phase {
            AnomalyPhase::Open => {}
            AnomalyPhase::Update => self.updates += 1,
            AnomalyPhase::Close => {
                self.closed_ns = Some(at);
                self.close_reason.clone_from(&record.close_reason);
            }
        }
        self.updated_ns = self.updated_ns.max(at);
        self.rate_per_sec = record.rate_per_sec;
        self.peak_rate_per_sec = self
            .peak_rate_per_sec
            .max(record.peak_rate_per_sec)
            .max(record.rate_per_sec);
        if !record.reasons.is_empty() {
            self.reasons.clone_from(&record.reasons);
        }
        if record.detail.netns_name.is_some() {
            self.netns_name.clone_from(&record.detail.netns_name);
        }
        let cause = record
            .detail
            .cause
            .clone()
            .or_else(|| self.detail.cause.take());
        if cause.is_some() && self.cause_found_ns.is_none() {
            self.cause_found_ns = Some(at);
        }
        // The worst reached stays: a higher severity, or the same at a higher rate (a closing
        // record's low rate does not explain why it was bad).
        let assessment = assess(&record.kind, record.rate_per_sec, &record.detail);
        if assessment.severity > self.assessment.severity
            || assessment.severity == self.assessment.severity
                && record.rate_per_sec >= self.assessed_rate
        {
            self.assessment = assessment;
            self.assessed_rate = record.rate_per_sec;
        }
        self.detail = AnomalyDetail {
            cause,
            ..record.detail.clone()
        };
    }

    pub fn is_open(&self) -> bool {
        self.closed_ns.is_none()
    }

    pub fn severity(&self) -> Severity {
        self.assessment.severity
    }

    pub fn cause(&self) -> Option<&CauseIn> {
        self.detail.cause.as_ref()
    }

    /// How long it lasted (or has lasted by `now_ns`).
    pub fn duration_ns(&self, now_ns: u64) -> u64 {
        self.closed_ns
            .unwrap_or(now_ns.max(self.updated_ns))
            .saturating_sub(self.opened_ns)
    }

    /// The order of the list: open before closed, then the most severe, then the newest.
    pub fn rank(&self) -> impl Ord {
        (self.is_open(), self.severity(), self.opened_ns, self.id)
    }
}

/// Every finding of the stream, by id.
#[derive(Clone, Debug, Default)]
pub struct Findings {
    by_id: BTreeMap<u64, Finding>,
}

impl Findings {
    /// Takes an anomaly record that arrived at `at` (unix ns).
    pub fn apply(&mut self, record: &AnomalyIn, at: u64) {
        // A daemon that restarted numbers its anomalies from 1 again: an opening with a known
        // id is a new anomaly.
        let fresh = record.phase == AnomalyPhase::Open
            && self.by_id.get(&record.id).is_some_and(|f| f.open_seen);
        if fresh {
            self.by_id.remove(&record.id);
        }
        if !self.by_id.contains_key(&record.id) && self.by_id.len() >= MAX_FINDINGS {
            self.forget_one();
        }
        self.by_id
            .entry(record.id)
            .or_insert_with(|| Finding::new(record, at))
            .apply(record, at);
    }

    /// Forgets the finding that closed first (else the oldest).
    fn forget_one(&mut self) {
        let victim = self
            .by_id
            .values()
            .min_by_key(|f| (f.is_open(), f.closed_ns.unwrap_or(f.opened_ns)))
            .map(|f| f.id);
        if let Some(id) = victim {
            self.by_id.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn open(&self) -> usize {
        self.by_id.values().filter(|f| f.is_open()).count()
    }

    pub fn get(&self, id: u64) -> Option<&Finding> {
        self.by_id.get(&id)
    }

    /// Every finding, in the list's order (open first, most severe, newest).
    pub fn all(&self) -> Vec<&Finding> {
        let mut all: Vec<&Finding> = self.by_id.values().collect();
        all.sort_by_key(|f| std::cmp::Reverse(f.rank()));
        all
    }

    /// What the Findings view lists at `now_ns`: the open ones and those closed in the last
    /// [`RECENTLY_CLOSED_NS`], in the list's order.
    pub fn current(&self, now_ns: u64) -> Vec<&Finding> {
        let mut list = self.all();
        list.retain(|f| {
            f.closed_ns
                .is_none_or(|closed| now_ns.saturating_sub(closed) < RECENTLY_CLOSED_NS)
        });
        list
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        aggregate::{PeerKey, WindowCounts},
        top::wire::PerConnectionIn,
    };

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_763_782_000 * S;

    fn record(phase: AnomalyPhase, id: u64, kind: &str, rate: f64) -> AnomalyIn {
        AnomalyIn {
            phase,
            time_ns: Some(T0),
            id,
            kind: kind.to_owned(),
            key: RowKey::Peer(PeerKey {
                netns: 7,
                addr: IpAddr::from([10, 0, 0, u8::try_from(id % 250).unwrap_or(1)]),
            }),
            rate_per_sec: rate,
            peak_rate_per_sec: rate,
            reasons: Vec::new(),
            close_reason: (phase == AnomalyPhase::Close).then(|| "subsided".to_owned()),
            netns: Some(7),
            sysctls: BTreeMap::new(),
            detail: AnomalyDetail {
                open_threshold_per_sec: 20.0,
                counts: WindowCounts {
                    last_1s: 0,
                    last_10s: (rate * 10.0) as u64,
                    last_60s: (rate * 10.0) as u64,
                },
                ..AnomalyDetail::default()
            },
        }
    }

    #[test]
    fn severity_follows_the_kind_and_the_evidence() {
        let warn = record(AnomalyPhase::Open, 1, "peer_retransmit_spike", 30.0);
        let a = assess(&warn.kind, warn.rate_per_sec, &warn.detail);
        assert_eq!(a.severity, Severity::Warning);
        assert!(a.why.contains("1.5× the open threshold"), "{}", a.why);
        // Ten times the threshold.
        let storm = record(AnomalyPhase::Open, 1, "peer_retransmit_spike", 200.0);
        assert_eq!(
            assess(&storm.kind, 200.0, &storm.detail).severity,
            Severity::Critical
        );
        // Failed connects: a handful warns, twenty in a minute is critical.
        let mut few = record(AnomalyPhase::Open, 2, "failed_connects", 1.0);
        few.detail.open_threshold_per_sec = 1.0;
        assert_eq!(
            assess(&few.kind, 1.0, &few.detail).severity,
            Severity::Warning
        );
        few.detail.counts.last_60s = 20;
        let a = assess(&few.kind, 1.0, &few.detail);
        assert_eq!(a.severity, Severity::Critical);
        assert!(a.why.starts_with("20 in 60 s"), "{}", a.why);
        // The same count of retransmits is not connection-level.
        let mut rtx = record(AnomalyPhase::Open, 3, "peer_retransmit_spike", 30.0);
        rtx.detail.counts.last_60s = 500;
        assert_eq!(
            assess(&rtx.kind, 30.0, &rtx.detail).severity,
            Severity::Warning
        );
        // Every connection resets: critical at any rate.
        let mut resets = record(AnomalyPhase::Open, 4, "reset_storm", 0.4);
        resets.detail.per_connection = Some(PerConnectionIn {
            count: 20,
            connections: 20,
            ratio: 1.0,
            open_ratio: 0.5,
        });
        let a = assess(&resets.kind, 0.4, &resets.detail);
        assert_eq!(a.severity, Severity::Critical);
        assert!(
            a.why
                .starts_with("20 over 20 connections: 1.00 per connection"),
            "{}",
            a.why
        );
        resets.detail.per_connection = Some(PerConnectionIn {
            count: 12,
            connections: 20,
            ratio: 0.6,
            open_ratio: 0.5,
        });
        let a = assess(&resets.kind, 0.4, &resets.detail);
        assert_eq!(a.severity, Severity::Warning);
        assert!(a.why.contains("0.60 per connection"), "{}", a.why);
        // 122 retransmitted segments per connection: a long connection, not every connection.
        rtx.detail.counts.last_60s = 0;
        rtx.detail.per_connection = Some(PerConnectionIn {
            count: 122,
            connections: 1,
            ratio: 122.0,
            open_ratio: 10.0,
        });
        assert_eq!(
            assess(&rtx.kind, 30.0, &rtx.detail).severity,
            Severity::Warning
        );
    }

    #[test]
    fn a_finding_follows_its_anomaly_and_keeps_its_cause() {
        let mut findings = Findings::default();
        let open = record(AnomalyPhase::Open, 1, "connect_trouble", 3.0);
        findings.apply(&open, T0);
        let mut update = record(AnomalyPhase::Update, 1, "connect_trouble", 6.0);
        update.detail.cause = Some(CauseIn {
            kind: "netfilter_rule".into(),
            summary: "firewall rule `tcp dport 80 drop` dropped 30 SYNs".into(),
            evidence: serde_json::json!({"rule_packets": 30}),
        });
        update.detail.netns_name = Some("web".into());
        findings.apply(&update, T0 + 2 * S);
        let mut close = record(AnomalyPhase::Close, 1, "connect_trouble", 0.1);
        close.peak_rate_per_sec = 6.0;
        findings.apply(&close, T0 + 40 * S);
        let f = findings.get(1).expect("finding");
        assert_eq!(f.updates, 1);
        assert_eq!(f.closed_ns, Some(T0 + 40 * S));
        assert_eq!(f.close_reason.as_deref(), Some("subsided"));
        assert_eq!(f.duration_ns(T0 + 100 * S), 40 * S);
        assert_eq!(f.peak_rate_per_sec, 6.0);
        assert_eq!(f.cause().map(|c| c.kind.as_str()), Some("netfilter_rule"));
        assert_eq!(f.cause_found_ns, Some(T0 + 2 * S));
        assert_eq!(f.netns_name.as_deref(), Some("web"));
        // Shown for a while after closing, then gone from the view (kept for explain).
        assert_eq!(findings.current(T0 + 100 * S).len(), 1);
        assert!(findings.current(T0 + 400 * S).is_empty());
        assert_eq!(findings.all().len(), 1);
    }

    #[test]
    fn the_list_puts_open_then_severe_then_new_first() {
        let mut findings = Findings::default();
        findings.apply(
            &record(AnomalyPhase::Open, 1, "peer_retransmit_spike", 30.0),
            T0,
        );
        findings.apply(
            &record(AnomalyPhase::Open, 2, "peer_retransmit_spike", 30.0),
            T0 + S,
        );
        findings.apply(
            &record(AnomalyPhase::Open, 3, "peer_retransmit_spike", 300.0),
            T0,
        );
        findings.apply(
            &record(AnomalyPhase::Open, 4, "peer_retransmit_spike", 900.0),
            T0,
        );
        findings.apply(
            &record(AnomalyPhase::Close, 4, "peer_retransmit_spike", 0.0),
            T0 + S,
        );
        let order: Vec<u64> = findings.current(T0 + 2 * S).iter().map(|f| f.id).collect();
        assert_eq!(order, [3, 2, 1, 4]);
        assert_eq!(findings.open(), 3);
        // A restarted daemon's anomaly 1 replaces the old one.
        findings.apply(
            &record(AnomalyPhase::Open, 1, "failed_connects", 1.0),
            T0 + 5 * S,
        );
        assert_eq!(
            findings.get(1).map(|f| f.kind.as_str()),
            Some("failed_connects")
        );
        // An update without an open (attached late) starts a finding too.
        findings.apply(
            &record(AnomalyPhase::Update, 9, "reset_storm", 5.0),
            T0 + 6 * S,
        );
        assert!(findings.get(9).is_some_and(|f| !f.open_seen));
    }
}
