//! The records `observer run` writes (docs/schema.md), read back into what `top` needs, and the
//! engine observations they stand for. Pure: text in, values out.
//!
//! Unknown record types and unknown fields are ignored, as the schema asks of consumers.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use serde::Deserialize;
use serde_json::Value;

pub use self::anomaly::{AnomalyDetail, AnomalyIn, AnomalyPhase, CauseIn, PerConnectionIn};
use crate::{
    aggregate::{ListenerKey, Observation, PeerKey, RowKey, RuleKey, Signal},
    analysis,
    context::{ContextRecord, StaleConnectionsRecord},
    decode::{EventKind, Family, Flow},
    enrich::{cgroup::Service, stale::StaleGroup},
    record::{ListenerDropsRecord, NetfilterDropRecord, RuleRecord},
};

mod anomaly;

/// Why a line is not a record top understands.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("a JSON value without a `type`")]
    NoType,
    #[error("a `{kind}` record with missing or invalid fields: {error}")]
    Fields {
        kind: String,
        #[source]
        error: serde_json::Error,
    },
}

/// One record of the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Start(Start),
    Event(EventIn),
    /// A perf buffer lost samples.
    Lost {
        count: u64,
    },
    /// The daemon's socket dropped records for this reader (it was too slow).
    Undelivered {
        count: u64,
    },
    ListenerDrops(ListenerDropsIn),
    StaleConnections(StaleConnectionsIn),
    /// What the daemon fed its engine from the kernel's exact counters for events the export
    /// budgets suppressed (see docs/schema.md).
    Reconciled(Vec<ReconciledIn>),
    NetfilterDrop(NetfilterDropIn),
    SysctlChange(SysctlChangeIn),
    Anomaly(AnomalyIn),
    /// The run ended.
    Stop {
        reason: String,
    },
    /// A record type top does not use (`sysctl_effect`, future types).
    Other {
        kind: String,
    },
}

/// The `start` record: what the header shows.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Start {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub observer_version: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    #[serde(default)]
    pub programs: Vec<Program>,
    #[serde(default)]
    pub export_per_flow: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Program {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub attached: bool,
}

/// An event record (`retransmit`, `drop`, `connect`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct EventIn {
    pub kind: EventKind,
    /// Unix nanoseconds of the event, when its `time` parses.
    pub time_ns: Option<u64>,
    pub flow: Flow,
    pub segs: u32,
    /// Drop reason or reset reason.
    pub reason: Option<String>,
    /// `refused` or `timeout` for failed connects.
    pub outcome: Option<String>,
    /// Connect latency (for `connect`), time to failure, or lifetime.
    pub duration_ms: Option<f64>,
    /// The process holding the socket (`owner`), once the daemon resolved it.
    pub owner: Option<Owner>,
    /// The flow's running kernel total of this kind (0 when absent).
    pub flow_count: u64,
    /// The key the kernel counted the event under (`counted_as`; else the flow).
    pub counted_flow: Flow,
}

/// One entry of a `reconciled` record.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconciledIn {
    pub observation: Observation,
    /// Events of the flow and signal with a `flow_count` up to this are in the amount (0 when
    /// absent).
    pub through: u64,
}

/// A socket's owner: `comm` and pid.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Owner {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    /// `cgroup`, `unit`, `container_*`, `pod_uid`, when the daemon read them.
    #[serde(flatten)]
    pub service: Option<Service>,
}

#[derive(Deserialize)]
struct EventJson {
    time: Option<String>,
    family: Option<String>,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
    #[serde(default)]
    netns: u32,
    #[serde(default = "one")]
    segs: u32,
    reason: Option<String>,
    outcome: Option<String>,
    duration_ms: Option<f64>,
    owner: Option<Owner>,
    #[serde(default)]
    flow_count: u64,
    counted_as: Option<CountedPortsJson>,
}

/// `counted_as` of an event: the ports of its counting key.
#[derive(Clone, Copy, Debug, Deserialize)]
struct CountedPortsJson {
    sport: u16,
    dport: u16,
}

fn one() -> u32 {
    1
}

/// A `listener_drops` record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ListenerDropsIn {
    #[serde(default)]
    pub time: String,
    pub netns: u64,
    #[serde(default)]
    pub family: Option<String>,
    pub addr: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub accept_queue_overflows: u64,
    #[serde(default)]
    pub syn_queue_drops: u64,
    #[serde(default)]
    pub other_drops: u64,
    #[serde(default)]
    pub backlog_limit: u32,
    #[serde(default)]
    pub accept_queue: u32,
    #[serde(default)]
    pub syn_queue: u32,
    #[serde(default)]
    pub closed: bool,
    #[serde(default)]
    pub namespace_counters: BTreeMap<String, u64>,
}

/// A rule of a `netfilter_drop` record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RuleIn {
    #[serde(default)]
    pub family: String,
    #[serde(default)]
    pub table: String,
    #[serde(default)]
    pub chain: String,
    #[serde(default)]
    pub handle: u64,
    #[serde(default)]
    pub rule: String,
    #[serde(default)]
    pub verdict: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub packets: u64,
}

/// A `netfilter_drop` record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct NetfilterDropIn {
    #[serde(default)]
    pub time: String,
    pub netns: u64,
    #[serde(default)]
    pub dropped: u64,
    #[serde(default)]
    pub rules: Vec<RuleIn>,
    #[serde(default)]
    pub candidates: Vec<RuleIn>,
}

/// A `stale_connections` record: connections of one process to one peer stuck.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StaleConnectionsIn {
    pub time: String,
    pub netns: u64,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cmdline: Option<String>,
    #[serde(flatten)]
    pub service: Option<Service>,
    pub peer: Option<IpAddr>,
    pub peer_port: u16,
    pub count: u64,
    pub awaiting_reply: u64,
    pub unacknowledged: u64,
    pub send_blocked: u64,
    pub oldest_age_secs: u64,
    pub bytes_waiting: u64,
    pub growing: bool,
    pub newly_stale: u64,
    pub threshold_secs: u64,
}

/// A `sysctl_change` record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct SysctlChangeIn {
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub netns: u64,
    pub name: String,
    #[serde(default)]
    pub old: String,
    #[serde(default)]
    pub new: String,
}

#[derive(Deserialize)]
struct CountJson {
    #[serde(default)]
    count: u64,
}

#[derive(Deserialize)]
struct StopJson {
    #[serde(default)]
    reason: String,
}

/// Unix nanoseconds of an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos()).ok()
}

/// A flow as records spell it: `family` (when present), both ends, the namespace.
fn flow_of(
    family: Option<&str>,
    (saddr, sport): (IpAddr, u16),
    (daddr, dport): (IpAddr, u16),
    netns: u32,
) -> Flow {
    Flow {
        family: family_of(family, saddr, daddr),
        saddr,
        sport,
        daddr,
        dport,
        netns,
    }
}

fn family_of(name: Option<&str>, a: IpAddr, b: IpAddr) -> Family {
    match name {
        Some("ipv4") => Family::Ipv4,
        Some("ipv6") => Family::Ipv6,
        _ if a.is_ipv4() && b.is_ipv4() => Family::Ipv4,
        _ => Family::Ipv6,
    }
}

fn fields<T: for<'de> Deserialize<'de>>(kind: &str, value: &Value) -> Result<T, WireError> {
    T::deserialize(value).map_err(|error| WireError::Fields {
        kind: kind.to_owned(),
        error,
    })
}

/// Reads one line of the stream.
pub fn parse_line(line: &str) -> Result<Record, WireError> {
    parse_value(&serde_json::from_str(line.trim_end())?)
}

/// Reads one record already parsed as JSON.
pub fn parse_value(value: &Value) -> Result<Record, WireError> {
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or(WireError::NoType)?;
    if let Some(event_kind) = EventKind::from_name(kind) {
        let e: EventJson = fields(kind, value)?;
        let flow = flow_of(
            e.family.as_deref(),
            (e.saddr, e.sport),
            (e.daddr, e.dport),
            e.netns,
        );
        return Ok(Record::Event(EventIn {
            kind: event_kind,
            time_ns: e.time.as_deref().and_then(parse_time),
            flow,
            counted_flow: e.counted_as.map_or(flow, |p| Flow {
                sport: p.sport,
                dport: p.dport,
                ..flow
            }),
            segs: e.segs,
            reason: e.reason,
            outcome: e.outcome,
            duration_ms: e.duration_ms,
            owner: e.owner,
            flow_count: e.flow_count,
        }));
    }
    Ok(match kind {
        "start" => Record::Start(fields(kind, value)?),
        "lost" => Record::Lost {
            count: fields::<CountJson>(kind, value)?.count,
        },
        "undelivered" => Record::Undelivered {
            count: fields::<CountJson>(kind, value)?.count,
        },
        "listener_drops" => Record::ListenerDrops(fields(kind, value)?),
        "stale_connections" => Record::StaleConnections(fields(kind, value)?),
        "reconciled" => Record::Reconciled(reconciled(&fields::<ReconciledJson>(kind, value)?)),
        "netfilter_drop" => Record::NetfilterDrop(fields(kind, value)?),
        "sysctl_change" => Record::SysctlChange(fields(kind, value)?),
        "anomaly_open" | "anomaly_update" | "anomaly_close" => {
            let phase = AnomalyPhase::of_type(kind).unwrap_or(AnomalyPhase::Close);
            Record::Anomaly(anomaly::parse(kind, phase, value)?)
        }
        "stop" => Record::Stop {
            reason: fields::<StopJson>(kind, value)?.reason,
        },
        other => Record::Other {
            kind: other.to_owned(),
        },
    })
}

#[derive(Deserialize)]
struct ReconciledJson {
    #[serde(default)]
    flows: Vec<ReconciledFlowJson>,
}

#[derive(Deserialize)]
struct ReconciledFlowJson {
    family: Option<String>,
    saddr: IpAddr,
    sport: u16,
    daddr: IpAddr,
    dport: u16,
    #[serde(default)]
    netns: u32,
    signal: String,
    amount: u64,
    #[serde(default)]
    through: u64,
}

/// The entries of a `reconciled` record (entries with unknown signals are skipped).
fn reconciled(record: &ReconciledJson) -> Vec<ReconciledIn> {
    record
        .flows
        .iter()
        .filter_map(|f| {
            let signal = Signal::ALL.into_iter().find(|s| s.name() == f.signal)?;
            let flow = flow_of(
                f.family.as_deref(),
                (f.saddr, f.sport),
                (f.daddr, f.dport),
                f.netns,
            );
            Some(ReconciledIn {
                observation: Observation::new(signal, f.amount).with_flow(flow),
                through: f.through,
            })
        })
        .collect()
}

/// The row key of an anomaly record's `key` (`{"scope":"peer","netns":..,"addr":..}`).
pub fn row_key(key: &Value) -> Option<RowKey> {
    #[derive(Deserialize)]
    struct FlowJson {
        family: Option<String>,
        saddr: IpAddr,
        sport: u16,
        daddr: IpAddr,
        dport: u16,
        #[serde(default)]
        netns: u32,
    }
    #[derive(Deserialize)]
    struct RuleJson {
        #[serde(default)]
        netns: u32,
        family: String,
        table: String,
        chain: String,
        #[serde(default)]
        handle: u64,
    }
    Some(match key.get("scope")?.as_str()? {
        "flow" => {
            let f = FlowJson::deserialize(key).ok()?;
            RowKey::Flow(Flow {
                family: family_of(f.family.as_deref(), f.saddr, f.daddr),
                saddr: f.saddr,
                sport: f.sport,
                daddr: f.daddr,
                dport: f.dport,
                netns: f.netns,
            })
        }
        "peer" => RowKey::Peer(PeerKey::deserialize_from(key)?),
        "listener" => RowKey::Listener(ListenerKey::deserialize_from(key)?),
        "rule" => {
            let r = RuleJson::deserialize(key).ok()?;
            RowKey::Rule(RuleKey {
                netns: r.netns,
                family: Arc::from(r.family),
                table: Arc::from(r.table),
                chain: Arc::from(r.chain),
                handle: r.handle,
            })
        }
        _ => return None,
    })
}

/// Reads the engine's key types back from JSON (they only serialize).
trait FromJson: Sized {
    fn deserialize_from(value: &Value) -> Option<Self>;
}

impl FromJson for PeerKey {
    fn deserialize_from(value: &Value) -> Option<Self> {
        #[derive(Deserialize)]
        struct PeerJson {
            #[serde(default)]
            netns: u32,
            addr: IpAddr,
        }
        let p = PeerJson::deserialize(value).ok()?;
        Some(PeerKey {
            netns: p.netns,
            addr: p.addr,
        })
    }
}

impl FromJson for ListenerKey {
    fn deserialize_from(value: &Value) -> Option<Self> {
        #[derive(Deserialize)]
        struct ListenerJson {
            #[serde(default)]
            netns: u32,
            addr: IpAddr,
            port: u16,
        }
        let l = ListenerJson::deserialize(value).ok()?;
        Some(ListenerKey {
            netns: l.netns,
            addr: l.addr,
            port: l.port,
        })
    }
}

/// One `Arc<str>` per reason name, so observations share them (bounded: a stream with
/// thousands of distinct names gets fresh ones past the limit).
#[derive(Debug, Default)]
pub struct ReasonInterner {
    names: HashMap<String, Arc<str>>,
}

impl ReasonInterner {
    const LIMIT: usize = 1024;

    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(name);
        if self.names.len() < Self::LIMIT {
            self.names.insert(name.to_owned(), Arc::clone(&shared));
        }
        shared
    }
}

/// The observation an event record stands for, exactly as the daemon's
/// [`analysis::observation`] maps the decoded event (a unit test holds the two together).
pub fn observation(event: &EventIn, reasons: &mut ReasonInterner) -> Option<Observation> {
    let flow = event.flow;
    let obs = match event.kind {
        EventKind::Retransmit => {
            Observation::new(Signal::Retransmit, u64::from(event.segs)).with_flow(flow)
        }
        EventKind::SynRetransmit => Observation::new(Signal::SynRetransmit, 1).with_flow(flow),
        EventKind::SynackRetransmit => Observation::new(Signal::SynackRetransmit, 1)
            .with_flow(flow)
            .with_listener(ListenerKey::of_flow_source(&flow)),
        EventKind::Drop => Observation::new(Signal::PacketDrop, 1)
            .with_flow(flow)
            .with_reason(reasons.get(event.reason.as_deref().unwrap_or("UNKNOWN"))),
        EventKind::ResetSent => Observation::new(Signal::ResetSent, 1).with_flow(flow),
        EventKind::ResetReceived => Observation::new(Signal::ResetReceived, 1).with_flow(flow),
        EventKind::ConnectFailed => {
            let signal = match event.outcome.as_deref() {
                Some("refused") => Signal::ConnectRefused,
                Some("timeout") => Signal::ConnectTimeout,
                _ => return None,
            };
            Observation::new(signal, 1).with_flow(flow)
        }
        EventKind::RetransmitFailed | EventKind::Connect | EventKind::Accept | EventKind::Close => {
            return None;
        }
    };
    Some(obs)
}

fn rule_record(rule: &RuleIn) -> RuleRecord {
    let RuleIn {
        family,
        table,
        chain,
        handle,
        rule,
        verdict,
        comment,
        packets,
    } = rule;
    RuleRecord {
        family: family.clone(),
        table: table.clone(),
        chain: chain.clone(),
        handle: *handle,
        rule: rule.clone(),
        verdict: verdict.clone(),
        comment: comment.clone(),
        packets: *packets,
    }
}

/// The observations of a context record, through the daemon's own
/// [`analysis::context_observations`].
pub fn context_observations(record: &Record) -> Vec<Observation> {
    let context = match record {
        Record::ListenerDrops(r) => ContextRecord::ListenerDrops(ListenerDropsRecord {
            kind: "listener_drops",
            time: r.time.clone(),
            netns: r.netns,
            family: family_of(r.family.as_deref(), r.addr, r.addr),
            addr: r.addr,
            port: r.port,
            accept_queue_overflows: r.accept_queue_overflows,
            syn_queue_drops: r.syn_queue_drops,
            other_drops: r.other_drops,
            backlog_limit: r.backlog_limit,
            accept_queue: r.accept_queue,
            syn_queue: r.syn_queue,
            closed: r.closed,
            namespace_counters: r.namespace_counters.clone(),
        }),
        Record::NetfilterDrop(r) => ContextRecord::NetfilterDrop(NetfilterDropRecord {
            kind: "netfilter_drop",
            time: r.time.clone(),
            netns: r.netns,
            dropped: r.dropped,
            rules: r.rules.iter().map(rule_record).collect(),
            candidates: r.candidates.iter().map(rule_record).collect(),
        }),
        Record::StaleConnections(r) => {
            let Some(peer) = r.peer else {
                return Vec::new();
            };
            ContextRecord::StaleConnections(StaleConnectionsRecord {
                kind: "stale_connections",
                time: r.time.clone(),
                group: StaleGroup {
                    netns: r.netns,
                    pid: r.pid,
                    comm: r.comm.clone(),
                    cmdline: r.cmdline.clone(),
                    service: r.service.clone(),
                    peer,
                    peer_port: r.peer_port,
                    count: r.count,
                    awaiting_reply: r.awaiting_reply,
                    unacknowledged: r.unacknowledged,
                    send_blocked: r.send_blocked,
                    oldest_age_secs: r.oldest_age_secs,
                    bytes_waiting: r.bytes_waiting,
                    growing: r.growing,
                    newly_stale: r.newly_stale,
                },
                threshold_secs: r.threshold_secs,
            })
        }
        _ => return Vec::new(),
    };
    analysis::context_observations(&context)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
