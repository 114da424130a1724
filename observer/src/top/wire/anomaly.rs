//! Anomaly records (`anomaly_open`, `anomaly_update`, `anomaly_close`) read back: the key, the
//! rates, and what newer daemons add (`cause`, `opened_by`, `per_connection`,
//! `context.netns_name`). Every field past `id`, `kind` and `key` is optional, so streams of
//! older daemons read as before (no cause, opened by rate).
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::{WireError, fields, parse_time, row_key};
use crate::aggregate::{RowKey, WindowCounts};

/// Which record of an anomaly's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnomalyPhase {
    Open,
    Update,
    Close,
}

impl AnomalyPhase {
    pub fn name(self) -> &'static str {
        match self {
            AnomalyPhase::Open => "open",
            AnomalyPhase::Update => "update",
            AnomalyPhase::Close => "close",
        }
    }

    /// The phase of a record type, if it is an anomaly record.
    pub fn of_type(kind: &str) -> Option<Self> {
        Some(match kind {
            "anomaly_open" => AnomalyPhase::Open,
            "anomaly_update" => AnomalyPhase::Update,
            "anomaly_close" => AnomalyPhase::Close,
            _ => return None,
        })
    }
}

/// An `anomaly_open`, `anomaly_update` or `anomaly_close` record.
#[derive(Clone, Debug, PartialEq)]
pub struct AnomalyIn {
    pub phase: AnomalyPhase,
    pub time_ns: Option<u64>,
    pub id: u64,
    /// `flow_retransmit_spike`, `listen_overflow`, ...
    pub kind: String,
    pub key: RowKey,
    pub rate_per_sec: f64,
    pub peak_rate_per_sec: f64,
    pub reasons: Vec<(String, u64)>,
    pub close_reason: Option<String>,
    /// The namespace's sysctls when it was reported (its `context`).
    pub netns: Option<u64>,
    pub sysctls: BTreeMap<String, String>,
    /// Everything else the record says (absent from older streams).
    pub detail: AnomalyDetail,
}

/// The fields of an anomaly record beyond what the anomaly log needs: what the findings view
/// and `observer explain` show.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AnomalyDetail {
    /// What explains it (`null` while nothing does, absent from older streams).
    pub cause: Option<CauseIn>,
    /// `rate` or `ratio` (absent: `rate`, what older daemons opened by).
    pub opened_by: Option<String>,
    pub per_connection: Option<PerConnectionIn>,
    /// The signals' counts in the last completed 1 / 10 / 60 s.
    pub counts: WindowCounts,
    pub lifetime_count: u64,
    pub baseline_per_sec: f64,
    pub open_threshold_per_sec: f64,
    pub close_threshold_per_sec: f64,
    pub signals: Vec<String>,
    /// The namespace's name (`/run/netns`), when the daemon knew one.
    pub netns_name: Option<String>,
    /// Flows that contributed (as `saddr:sport→daddr:dport`), at most five.
    pub exemplar_flows: usize,
}

/// An anomaly's `cause`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct CauseIn {
    pub kind: String,
    #[serde(default)]
    pub summary: String,
    /// The fields and counts that prove it, per kind (docs/schema.md).
    #[serde(default)]
    pub evidence: Value,
}

/// An anomaly's `per_connection`: the kind's signals per connection to the peer over 60 s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PerConnectionIn {
    pub count: u64,
    pub connections: u64,
    pub ratio: f64,
    pub open_ratio: f64,
}

#[derive(Deserialize)]
struct AnomalyJson {
    time: Option<String>,
    id: u64,
    kind: String,
    key: Value,
    #[serde(default)]
    rate_per_sec: f64,
    #[serde(default)]
    peak_rate_per_sec: f64,
    #[serde(default)]
    reasons: Vec<ReasonJson>,
    close_reason: Option<String>,
    context: Option<ContextJson>,
    #[serde(default)]
    cause: Option<CauseIn>,
    #[serde(default)]
    opened_by: Option<String>,
    #[serde(default)]
    per_connection: Option<PerConnectionIn>,
    #[serde(default)]
    counts: Option<CountsJson>,
    #[serde(default)]
    lifetime_count: u64,
    #[serde(default)]
    baseline_per_sec: f64,
    #[serde(default)]
    open_threshold_per_sec: f64,
    #[serde(default)]
    close_threshold_per_sec: f64,
    #[serde(default)]
    signals: Vec<String>,
    #[serde(default)]
    exemplar_flows: Vec<Value>,
}

#[derive(Deserialize)]
struct ReasonJson {
    reason: String,
    count: u64,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct CountsJson {
    last_1s: u64,
    last_10s: u64,
    last_60s: u64,
}

#[derive(Deserialize)]
struct ContextJson {
    netns: Option<u64>,
    #[serde(default)]
    netns_name: Option<String>,
    #[serde(default)]
    sysctls: BTreeMap<String, String>,
}

/// Reads an anomaly record of type `kind` (one of the three).
pub(super) fn parse(
    kind: &str,
    phase: AnomalyPhase,
    value: &Value,
) -> Result<AnomalyIn, WireError> {
    let a: AnomalyJson = fields(kind, value)?;
    let key = row_key(&a.key).ok_or_else(|| WireError::Fields {
        kind: kind.to_owned(),
        error: serde::de::Error::custom(format!("unknown key {}", a.key)),
    })?;
    let (netns, netns_name, sysctls) = match a.context {
        Some(c) => (c.netns, c.netns_name, c.sysctls),
        None => (None, None, BTreeMap::new()),
    };
    let counts = a.counts.unwrap_or_default();
    Ok(AnomalyIn {
        phase,
        time_ns: a.time.as_deref().and_then(parse_time),
        id: a.id,
        kind: a.kind,
        key,
        rate_per_sec: a.rate_per_sec,
        peak_rate_per_sec: a.peak_rate_per_sec,
        reasons: a.reasons.into_iter().map(|r| (r.reason, r.count)).collect(),
        close_reason: a.close_reason,
        netns,
        sysctls,
        detail: AnomalyDetail {
            cause: a.cause,
            opened_by: a.opened_by,
            per_connection: a.per_connection,
            counts: WindowCounts {
                last_1s: counts.last_1s,
                last_10s: counts.last_10s,
                last_60s: counts.last_60s,
            },
            lifetime_count: a.lifetime_count,
            baseline_per_sec: a.baseline_per_sec,
            open_threshold_per_sec: a.open_threshold_per_sec,
            close_threshold_per_sec: a.close_threshold_per_sec,
            signals: a.signals,
            netns_name: netns_name.filter(|n| !n.is_empty()),
            exemplar_flows: a.exemplar_flows.len(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::{super::parse_line, *};
    use crate::{aggregate::PeerKey, top::wire::Record};

    const OLD: &str = r#"{"type":"anomaly_open","time":"2026-11-22T03:40:00.000000000Z","id":3,"kind":"peer_retransmit_spike","key":{"scope":"peer","netns":7,"addr":"fd00::2"},"signals":["retransmit"],"counts":{"last_1s":1,"last_10s":300,"last_60s":300},"rate_per_sec":30.0,"peak_rate_per_sec":31.5,"lifetime_count":300,"baseline_per_sec":0.0,"open_threshold_per_sec":20.0,"close_threshold_per_sec":10.0,"first_seen_ns":1,"last_seen_ns":2,"opened_ns":2,"exemplar_flows":[],"context":{"netns":7,"sysctls":{"net.ipv4.tcp_sack":"1"},"counters_60s":{}}}"#;

    const NEW: &str = r#"{"type":"anomaly_update","time":"2026-11-22T03:40:05.000000000Z","id":1,"kind":"failed_connects","key":{"scope":"peer","netns":4026532177,"addr":"10.200.1.2"},"signals":["connect_refused","connect_timeout"],"counts":{"last_1s":5,"last_10s":50,"last_60s":500},"rate_per_sec":5.0,"peak_rate_per_sec":50.0,"lifetime_count":500,"baseline_per_sec":0.0,"open_threshold_per_sec":1.0,"close_threshold_per_sec":0.5,"first_seen_ns":1,"last_seen_ns":2,"opened_ns":2,"exemplar_flows":[{"family":"ipv4","saddr":"10.200.1.1","sport":40000,"daddr":"10.200.1.2","dport":80,"netns":4026532177}],"reasons":[{"reason":"NO_SOCKET","count":500}],"opened_by":"ratio","per_connection":{"count":500,"connections":500,"ratio":1.0,"open_ratio":0.5},"cause":{"kind":"no_listener","summary":"nothing listens on 10.200.1.2:80 in netns web","evidence":{"netns":4026532178,"ports":[80],"resets_sent":500}},"context":{"netns":4026532177,"netns_name":"web","sysctls":{},"counters_60s":{"TcpAttemptFails":500}}}"#;

    #[test]
    fn records_without_the_new_fields_read_as_before() {
        let Ok(Record::Anomaly(a)) = parse_line(OLD) else {
            panic!("not an anomaly");
        };
        assert_eq!(a.phase, AnomalyPhase::Open);
        assert_eq!(a.detail.cause, None);
        assert_eq!(a.detail.opened_by, None);
        assert_eq!(a.detail.per_connection, None);
        assert_eq!(a.detail.netns_name, None);
        assert_eq!(a.detail.counts.last_10s, 300);
        assert_eq!(a.detail.open_threshold_per_sec, 20.0);
    }

    #[test]
    fn cause_ratio_and_namespace_name_are_read() {
        let Ok(Record::Anomaly(a)) = parse_line(NEW) else {
            panic!("not an anomaly");
        };
        assert_eq!(a.phase, AnomalyPhase::Update);
        assert_eq!(
            a.key,
            RowKey::Peer(PeerKey {
                netns: 4026532177,
                addr: "10.200.1.2".parse().expect("addr")
            })
        );
        let cause = a.detail.cause.expect("cause");
        assert_eq!(cause.kind, "no_listener");
        assert!(cause.summary.starts_with("nothing listens"));
        assert_eq!(cause.evidence["resets_sent"], 500);
        assert_eq!(a.detail.opened_by.as_deref(), Some("ratio"));
        assert_eq!(
            a.detail.per_connection,
            Some(PerConnectionIn {
                count: 500,
                connections: 500,
                ratio: 1.0,
                open_ratio: 0.5
            })
        );
        assert_eq!(a.detail.netns_name.as_deref(), Some("web"));
        assert_eq!(a.detail.exemplar_flows, 1);
        assert_eq!(a.detail.signals, ["connect_refused", "connect_timeout"]);
        // `cause: null` is no cause; a cause without a summary still reads.
        let null = NEW.replace(
            r#""cause":{"kind":"no_listener","summary":"nothing listens on 10.200.1.2:80 in netns web","evidence":{"netns":4026532178,"ports":[80],"resets_sent":500}}"#,
            r#""cause":null"#,
        );
        let Ok(Record::Anomaly(a)) = parse_line(&null) else {
            panic!("{null}");
        };
        assert_eq!(a.detail.cause, None);
        let bare = NEW.replace(
            r#""summary":"nothing listens on 10.200.1.2:80 in netns web","#,
            "",
        );
        let Ok(Record::Anomaly(a)) = parse_line(&bare) else {
            panic!("{bare}");
        };
        assert_eq!(a.detail.cause.map(|c| c.summary), Some(String::new()));
    }
}
