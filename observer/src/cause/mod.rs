//! Naming the cause of an anomaly: the pure core behind every anomaly record's `cause`.
//!
//! The output stage hands every event and context record to [`Evidence`] on its way out, and
//! asks [`explain`] about each anomaly it writes (and, each second, about open anomalies
//! still without a cause). The explainer joins the anomaly's symptom — a peer, flow, listener or
//! rule in one namespace — with what the host showed elsewhere, by address as well as by
//! namespace: the firewall rule in the server's namespace that drops a client's packets, the
//! listener whose queue overflows, the reply route that leaves by the wrong interface, the
//! sysctl changed a minute before, the process that resets its connections.
//!
//! No I/O: what the explainer needs from outside (namespace names, sysctls, counters, rates,
//! process names) comes through [`Surroundings`].
mod evidence;
mod explain;
mod summary;

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

pub use self::{evidence::Evidence, explain::explain};
use crate::aggregate::{BeforeAfter, Signal};

/// What explains an anomaly.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cause {
    pub kind: CauseKind,
    /// One plain sentence naming the rule / listener / interfaces / sysctl / process.
    pub summary: String,
    /// The fields and counts that prove it (per kind: docs/schema.md).
    pub evidence: serde_json::Value,
}

/// The kinds of cause, as `cause.kind` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    /// A firewall rule drops the packets.
    NetfilterRule,
    /// A listener's accept queue is full.
    AcceptQueueOverflow,
    /// A listener's SYN queue is full (tcp_max_syn_backlog, no syncookies).
    SynQueueLimit,
    /// Replies leave by another interface than the packets arrive on.
    AsymmetricRoute,
    /// A sysctl changed in the namespace shortly before.
    SysctlChange,
    /// The peer's TCP timestamps went backwards: PAWS rejected its packets.
    Paws,
    /// Nothing listens on the port: connects are answered with a reset.
    NoListener,
    /// A socket sent resets (an abortive close by its process, or another RST reason).
    Reset,
    /// The reverse-path filter drops the packets.
    RpFilter,
    /// A process holds connections that make no progress.
    StaleProcess,
    /// The kernel drops the packets for another reason.
    PacketDrops,
}

impl CauseKind {
    pub const ALL: [CauseKind; 11] = [
        CauseKind::NetfilterRule,
        CauseKind::AcceptQueueOverflow,
        CauseKind::SynQueueLimit,
        CauseKind::AsymmetricRoute,
        CauseKind::SysctlChange,
        CauseKind::Paws,
        CauseKind::NoListener,
        CauseKind::Reset,
        CauseKind::RpFilter,
        CauseKind::StaleProcess,
        CauseKind::PacketDrops,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CauseKind::NetfilterRule => "netfilter_rule",
            CauseKind::AcceptQueueOverflow => "accept_queue_overflow",
            CauseKind::SynQueueLimit => "syn_queue_limit",
            CauseKind::AsymmetricRoute => "asymmetric_route",
            CauseKind::SysctlChange => "sysctl_change",
            CauseKind::Paws => "paws",
            CauseKind::NoListener => "no_listener",
            CauseKind::Reset => "reset",
            CauseKind::RpFilter => "rp_filter",
            CauseKind::StaleProcess => "stale_process",
            CauseKind::PacketDrops => "packet_drops",
        }
    }
}

/// What the explainer asks of the rest of the daemon.
pub trait Surroundings {
    /// The namespace's name (`/run/netns`), if it has one.
    fn netns_name(&self, netns: u32) -> Option<String>;
    /// A sysctl's current value in the namespace.
    fn sysctl(&self, netns: u32, name: &str) -> Option<String>;
    /// How the namespace's kernel counters moved over the last minute.
    fn counters_60s(&self, netns: u32) -> BTreeMap<String, u64>;
    /// Host-wide rates of `signals` per minute before and after `at_ns`.
    fn rates_around(&self, signals: &[Signal], at_ns: u64) -> BTreeMap<&'static str, BeforeAfter>;
    /// A process's name (`comm`), if it still runs.
    fn process_name(&self, pid: u32) -> Option<String>;
    /// The namespace that has `addr` as a local address, as its last reading found.
    fn netns_of_address(&self, addr: IpAddr) -> Option<u32>;
}

#[cfg(test)]
mod tests;
