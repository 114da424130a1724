//! The JSON records observer writes, one object per line. See docs/schema.md.
//!
//! Each record is a plain struct with its `type` as the first field, so the field order in the
//! output is stable and readable.
use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{
    clock::BootClock,
    decode::{Event, Family, Flow, tcp_state_name},
};

/// Bumped on any incompatible change of a record's fields.
pub const SCHEMA_VERSION: u32 = 1;

/// A program and whether it is running.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: String,
    pub tracepoint: String,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
}

/// One kernel event.
#[derive(Debug, Serialize, PartialEq, Eq)]
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
    pub netns: u32,
    pub err: i32,
    pub pid: u32,
}

impl EventRecord {
    pub fn new(event: &Event, clock: &BootClock) -> Self {
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
            err,
            pid,
            state,
            socket_family: _,
        } = *event;
        Self {
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
            netns,
            err,
            pid,
        }
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
    pub suppressed: u64,
}

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
    pub flows: Vec<FlowRecord>,
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
            err: 0,
            pid: 9,
            state: 2,
            socket_family: 2,
        };
        let rec = EventRecord::new(&event, &BootClock::with_offset(0));
        let json = serde_json::to_value(&rec).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "type": "syn_retransmit", "time": "1970-01-01T00:00:01.5Z", "family": "ipv4",
                "saddr": "10.0.0.1", "sport": 40000, "daddr": "10.0.0.2", "dport": 80,
                "state": "SYN_SENT", "segs": 1, "flow_count": 3, "netns": 7, "err": 0, "pid": 9
            })
        );
        let text = serde_json::to_string(&rec).expect("serialises");
        assert!(text.starts_with(r#"{"type":"syn_retransmit""#), "{text}");
    }
}
