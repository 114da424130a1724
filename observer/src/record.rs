//! The JSON records observer writes, one object per line. See docs/schema.md.
//!
//! Each record is a plain struct with its `type` as the first field, so the field order in the
//! output is stable and readable.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{
    clock::BootClock,
    decode::{
        ConnectOutcome, Detail, Direction, Event, Family, Flow, tcp_flags_names, tcp_state_name,
    },
    enrich::symbols::KernelSymbols,
    kernel::reasons::ReasonNames,
};

/// What the daemon knows to name things in events: the running kernel's reason names and
/// symbols.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub drop_reasons: ReasonNames,
    pub reset_reasons: ReasonNames,
    pub symbols: KernelSymbols,
}

/// Bumped on any incompatible change of a record's fields.
pub const SCHEMA_VERSION: u32 = 1;

/// A program and whether it is running.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: String,
    pub tracepoint: String,
    /// `raw_tracepoint` (the tracepoint's arguments) or `tracepoint` (its formatted record).
    pub kind: &'static str,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the raw program was not used, when `--attach auto` fell back to the classic one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_unavailable: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StartRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub schema_version: u32,
    pub observer_version: &'static str,
    pub time: String,
    pub host: String,
    pub kernel: String,
    pub programs: Vec<ProgramStatus>,
    pub sysctls: BTreeMap<String, String>,
    /// Events exported per flow per second (0: all).
    pub export_per_flow: u32,
    /// Events exported per CPU per second (0: no limit).
    pub export_per_cpu: u32,
    /// Pages per CPU of each perf buffer.
    pub perf_pages: usize,
    /// The kernel wakes the reader once per this many exported events (1: every event).
    pub wakeup_events: u32,
    /// The perf buffers are also drained this often (milliseconds): the longest an event short
    /// of a wakeup waits.
    pub flush_interval_ms: u64,
    /// Drop reasons reported.
    pub drop_reasons: Vec<String>,
}

/// One kernel event.
#[derive(Debug, Serialize, PartialEq)]
pub struct EventRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub state: &'static str,
    pub segs: u32,
    pub flow_count: u64,
    /// For the events of a handshake that did not complete: the ports of the key the kernel
    /// counted the event under (the connecting side's port is 0), as in `stop.flows` and
    /// `reconciled` records. Absent when the event is counted per flow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted_as: Option<CountedPorts>,
    pub netns: u32,
    pub err: i32,
    pub pid: u32,
    /// Drop reason (`enum skb_drop_reason` name) or RST reason (`enum sk_rst_reason` name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The reason's number on this kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u32>,
    /// Where the kernel dropped the packet (`function+0xoffset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Interface index the dropped packet arrived on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    /// `refused` or `timeout` for failed connects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ConnectOutcome>,
    /// Connect latency, time until a connect failed, or connection lifetime, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syn_retransmits: Option<u32>,
    /// Server-side handshake RTT (SYN-ACK -> ACK) of an accepted connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_rtt_us: Option<u32>,
    /// State before CLOSE for `close` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_state: Option<&'static str>,
    /// Whether a closed connection was opened by this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// The process owning the socket (found through sock_diag and /proc; absent until found,
    /// and for sockets no process holds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::context::OwnerBrief>,
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1_000.0).round() / 1_000.0
}

/// The ports of the key an event was counted under (`counted_as`).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct CountedPorts {
    pub sport: u16,
    pub dport: u16,
}

impl EventRecord {
    pub fn new(event: &Event, clock: &BootClock, names: &Names) -> Self {
        let Event {
            kind,
            flow:
                Flow {
                    family,
                    saddr,
                    sport,
                    daddr,
                    dport,
                    netns,
                },
            boot_ns,
            segs,
            flow_count,
            key_wildcard,
            err,
            pid,
            state,
            socket_family: _,
            detail,
        } = *event;
        let mut record = Self {
            kind: kind.name(),
            time: clock.rfc3339(boot_ns),
            family,
            saddr,
            sport,
            daddr,
            dport,
            state: tcp_state_name(state),
            segs,
            flow_count,
            counted_as: (key_wildcard != 0).then(|| {
                let counted = event.counting_flow();
                CountedPorts {
                    sport: counted.sport,
                    dport: counted.dport,
                }
            }),
            netns,
            err,
            pid,
            reason: None,
            reason_code: None,
            location: None,
            ifindex: None,
            tcp_flags: None,
            direction: None,
            outcome: None,
            duration_ms: None,
            syn_retransmits: None,
            handshake_rtt_us: None,
            from_state: None,
            active: None,
            owner: None,
        };
        match detail {
            Detail::None => {}
            Detail::Drop {
                reason,
                location,
                ifindex,
                tcp_flags,
                direction,
            } => {
                record.reason = Some(names.drop_reasons.name(reason));
                record.reason_code = Some(reason);
                record.location = Some(names.symbols.resolve(location));
                record.ifindex = Some(ifindex);
                record.tcp_flags = Some(tcp_flags_names(tcp_flags));
                record.direction = Some(direction);
            }
            Detail::ResetSent { reason } => {
                record.reason = Some(names.reset_reasons.name(reason));
                record.reason_code = Some(reason);
            }
            Detail::Connect {
                latency_ns,
                syn_retransmits,
            } => {
                record.duration_ms = Some(ms(latency_ns));
                record.syn_retransmits = Some(syn_retransmits);
            }
            Detail::ConnectFailed {
                outcome,
                elapsed_ns,
                syn_retransmits,
            } => {
                record.outcome = Some(outcome);
                record.duration_ms = Some(ms(elapsed_ns));
                record.syn_retransmits = Some(syn_retransmits);
            }
            Detail::Accept { handshake_rtt_us } => {
                record.handshake_rtt_us = Some(handshake_rtt_us);
            }
            Detail::Close {
                lifetime_ns,
                from_state,
                active,
            } => {
                record.duration_ms = Some(ms(lifetime_ns));
                record.from_state = Some(tcp_state_name(from_state));
                record.active = Some(active);
            }
        }
        record
    }
}

/// The perf buffer of one CPU dropped samples (the reader fell behind).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct LostRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub cpu: u32,
    pub count: u64,
}

/// Totals of one kernel event kind, from the kernel's own counters and the daemon's.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KindTotals {
    /// Tracepoint hits.
    pub events: u64,
    /// Added to the per-flow counters (segments for retransmits).
    pub counted: u64,
    /// Handed to the perf buffers by the kernel.
    pub exported: u64,
    /// Counted but not exported (over the per-flow budget).
    pub suppressed: u64,
    /// Could not be counted per flow (flow map full).
    pub map_full: u64,
    /// Received and written by the daemon.
    pub received: u64,
}

/// Exact per-flow totals from the kernel's flow map.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRecord {
    /// `flow` (the whole 4-tuple) or `handshake`: the events of handshakes that did not
    /// complete, counted per local address, peer address and service port, with the
    /// connecting side's port shown as 0.
    pub key: &'static str,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub netns: u32,
    pub retransmit_segs: u64,
    pub retransmit_skbs: u64,
    pub retransmit_failed: u64,
    pub syn_retransmits: u64,
    pub synack_retransmits: u64,
    pub drops: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Connects with trouble (SYN retransmits, or slower than `--slow-connect-ms`); healthy
    /// ones are counted in `stop.services`.
    pub connects: u64,
    pub connects_refused: u64,
    pub connects_timed_out: u64,
    pub suppressed: u64,
}

impl FlowRecord {
    /// How much trouble the flow had: what ranks flows when the `stop` record keeps the top.
    pub fn trouble(&self) -> u64 {
        let FlowRecord {
            retransmit_segs,
            retransmit_failed,
            syn_retransmits,
            synack_retransmits,
            drops,
            resets_sent,
            resets_received,
            connects,
            connects_refused,
            connects_timed_out,
            ..
        } = self;
        retransmit_segs
            + retransmit_failed
            + syn_retransmits
            + synack_retransmits
            + drops
            + resets_sent
            + resets_received
            + connects
            + connects_refused
            + connects_timed_out
    }
}

/// Reported drops of one reason.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ReasonCount {
    pub reason: String,
    pub code: u32,
    pub count: u64,
}

/// Flows the `stop` record lists at most (the most trouble first).
pub const STOP_FLOWS: usize = 500;
/// Peers and listeners the `stop` record lists at most (the busiest first).
pub const STOP_SERVICES: usize = 200;

#[derive(Debug, Serialize)]
pub struct StopRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    /// `signal`, `duration` or `output_closed`.
    pub reason: &'static str,
    pub totals: BTreeMap<&'static str, KindTotals>,
    /// Samples the perf buffers reported lost.
    pub lost: u64,
    /// Samples decoded but dropped because the daemon's queue was full.
    pub undelivered: u64,
    /// Samples that could not be decoded.
    pub decode_errors: u64,
    /// Context records (listener drops, rules, sysctl changes, ...) that did not fit the queue.
    pub context_undelivered: u64,
    /// Tracepoint hits on which the kernel skipped one of observer's programs because it was
    /// already running on that CPU (the programs' `recursion_misses`): events neither counted
    /// nor exported.
    pub missed_runs: u64,
    /// Flow entries the kernel created in its counter map, and how many of them the LRU map
    /// evicted to make room (their counts are gone from `flows`, not from `totals`).
    pub flows_created: u64,
    pub flows_evicted: u64,
    /// Connections the kernel's socket table evicted while following them (their `close`, and
    /// a connect's duration, are then missing; `--max-flows` sizes the table too).
    pub sockets_evicted: u64,
    /// (namespace, drop reason) counters the kernel's map evicted (their drops are then not
    /// attributed to a firewall rule).
    pub netns_drops_evicted: u64,
    /// Drops per reason (kernel counters).
    pub drop_reasons: Vec<ReasonCount>,
    /// The flows with the most trouble (at most [`STOP_FLOWS`]), and how many more the kernel
    /// still held. Healthy connections have no flow entry: they are in `services`.
    pub flows: Vec<FlowRecord>,
    pub flows_omitted: u64,
    /// Exact connection counts per peer and per listener (at most [`STOP_SERVICES`], busiest
    /// first), how many more there were, and how many the kernel's bounded map evicted.
    pub services: Vec<crate::services::ServiceRecord>,
    pub services_omitted: u64,
    pub services_evicted: u64,
    /// Listener drops over the run (accept-queue overflows, SYN-queue drops).
    pub listeners: Vec<crate::context::ListenerTotal>,
    /// Packets dropped per firewall rule over the run (rules named exactly).
    pub netfilter_rules: Vec<crate::context::RuleTotal>,
    /// The aggregation engine's tables (rows, evictions) and anomalies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::aggregate::EngineStats>,
    /// anomaly_open/update/close records written.
    pub anomaly_records: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::EventKind;

    #[test]
    fn event_record_has_the_documented_fields() {
        let event = Event {
            kind: EventKind::SynRetransmit,
            flow: Flow {
                family: Family::Ipv4,
                saddr: IpAddr::from([10, 0, 0, 1]),
                sport: 40000,
                daddr: IpAddr::from([10, 0, 0, 2]),
                dport: 80,
                netns: 7,
            },
            boot_ns: 1_500_000_000,
            segs: 1,
            flow_count: 3,
            key_wildcard: 0,
            err: 0,
            pid: 9,
            state: 2,
            socket_family: 2,
            detail: Detail::None,
        };
        let rec = EventRecord::new(&event, &BootClock::with_offset(0), &Names::default());
        let json = serde_json::to_value(&rec).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "type": "syn_retransmit", "time": "1970-01-01T00:00:01.500000000Z", "family": "ipv4",
                "saddr": "10.0.0.1", "sport": 40000, "daddr": "10.0.0.2", "dport": 80,
                "state": "SYN_SENT", "segs": 1, "flow_count": 3, "netns": 7, "err": 0, "pid": 9
            })
        );
        let text = serde_json::to_string(&rec).expect("serialises");
        assert!(text.starts_with(r#"{"type":"syn_retransmit""#), "{text}");
    }
}

/// A listener refused connections (accept queue or SYN queue full) during one context interval.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ListenerDropsRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub netns: u64,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub accept_queue_overflows: u64,
    pub syn_queue_drops: u64,
    pub other_drops: u64,
    /// The listener's backlog (`listen()` backlog capped by somaxconn).
    pub backlog_limit: u32,
    pub accept_queue: u32,
    pub syn_queue: u32,
    /// The listener closed in the interval (these are its last drops; the queue sizes are
    /// those at the close). Left out when false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
    /// The namespace's counters over the same interval (ListenOverflows, ListenDrops,
    /// TCPReqQFullDrop): the ground truth the split was made from.
    pub namespace_counters: BTreeMap<String, u64>,
}

/// Rule whose counter grew while NETFILTER_DROP drops happened.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RuleRecord {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Packets the rule's counter grew by in the interval.
    pub packets: u64,
}

/// Netfilter dropped TCP packets in a namespace: the rule(s) that did it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NetfilterDropRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub netns: u64,
    /// NETFILTER_DROP drops the kernel reported in this namespace in the interval.
    pub dropped: u64,
    /// Rules whose growth accounts exactly for `dropped` (empty when none does).
    pub rules: Vec<RuleRecord>,
    /// Every dropping rule that grew (largest first), when `rules` is not exact.
    pub candidates: Vec<RuleRecord>,
}

/// A sysctl changed value.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SysctlChangeRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub netns: u64,
    pub name: String,
    pub old: String,
    pub new: String,
    /// Rates plausibly affected, before and after the change (filled by the anomaly engine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<serde_json::Value>,
}
