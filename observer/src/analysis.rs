//! Glue between the decoded stream and the aggregation engine: which events count as which
//! signals on which keys, and how anomalies are written with their context.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use crate::{
    aggregate::{
        AnomalyEvent, AnomalySnapshot, BeforeAfter, Engine, ListenerKey, Observation, PeerKey,
        RowKey, RuleKey, Signal,
    },
    cause::{Cause, Surroundings},
    context::{ContextRecord, NamespaceContext, SharedContext},
    decode::{ConnectOutcome, Detail, Event, EventKind},
    kernel::reasons::ReasonNames,
};

/// One `Arc<str>` per reason code, so observations do not allocate per event.
#[derive(Debug, Default)]
pub struct ReasonCache {
    drops: HashMap<u32, Arc<str>>,
}

impl ReasonCache {
    pub fn drop_reason(&mut self, names: &ReasonNames, code: u32) -> Arc<str> {
        self.drops
            .entry(code)
            .or_insert_with(|| Arc::from(names.name(code)))
            .clone()
    }
}

/// The observation an event stands for, if any (successful opens and closes are not trouble).
pub fn observation(
    event: &Event,
    drop_names: &ReasonNames,
    reasons: &mut ReasonCache,
) -> Option<Observation> {
    let flow = event.flow;
    let obs = match (event.kind, event.detail) {
        (EventKind::Retransmit, _) => {
            Observation::new(Signal::Retransmit, u64::from(event.segs)).with_flow(flow)
        }
        (EventKind::SynRetransmit, _) => Observation::new(Signal::SynRetransmit, 1).with_flow(flow),
        (EventKind::SynackRetransmit, _) => Observation::new(Signal::SynackRetransmit, 1)
            .with_flow(flow)
            .with_listener(ListenerKey::of_flow_source(&flow)),
        (EventKind::Drop, Detail::Drop { reason, .. }) => Observation::new(Signal::PacketDrop, 1)
            .with_flow(flow)
            .with_reason(reasons.drop_reason(drop_names, reason)),
        (EventKind::ResetSent, _) => Observation::new(Signal::ResetSent, 1).with_flow(flow),
        (EventKind::ResetReceived, _) => Observation::new(Signal::ResetReceived, 1).with_flow(flow),
        (EventKind::ConnectFailed, Detail::ConnectFailed { outcome, .. }) => {
            let signal = match outcome {
                ConnectOutcome::Refused => Signal::ConnectRefused,
                ConnectOutcome::Timeout => Signal::ConnectTimeout,
            };
            Observation::new(signal, 1).with_flow(flow)
        }
        _ => return None,
    };
    Some(obs)
}

/// Observations from the context worker's records.
pub fn context_observations(record: &ContextRecord) -> Vec<Observation> {
    match record {
        ContextRecord::ListenerDrops(r) => {
            let Ok(netns) = u32::try_from(r.netns) else {
                return Vec::new();
            };
            let listener = ListenerKey {
                netns,
                addr: r.addr,
                port: r.port,
            };
            let peer = PeerKey {
                netns,
                addr: r.addr,
            };
            [
                (Signal::ListenOverflow, r.accept_queue_overflows),
                (Signal::SynQueueDrop, r.syn_queue_drops),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(signal, n)| {
                Observation::new(signal, n)
                    .with_listener(listener)
                    .with_peer(peer)
            })
            .collect()
        }
        ContextRecord::NetfilterDrop(r) => {
            let Ok(netns) = u32::try_from(r.netns) else {
                return Vec::new();
            };
            r.rules
                .iter()
                .chain(
                    r.rules
                        .is_empty()
                        .then_some(&r.candidates)
                        .into_iter()
                        .flatten(),
                )
                .map(|rule| {
                    Observation::new(Signal::NetfilterDrop, rule.packets).with_rule(RuleKey {
                        netns,
                        family: Arc::from(rule.family.as_str()),
                        table: Arc::from(rule.table.as_str()),
                        chain: Arc::from(rule.chain.as_str()),
                        handle: rule.handle,
                    })
                })
                .collect()
        }
        ContextRecord::StaleConnections(r) => {
            let Ok(netns) = u32::try_from(r.group.netns) else {
                return Vec::new();
            };
            if r.group.newly_stale == 0 {
                return Vec::new();
            }
            vec![
                Observation::new(Signal::StaleConnection, r.group.newly_stale).with_peer(PeerKey {
                    netns,
                    addr: r.group.peer,
                }),
            ]
        }
        ContextRecord::SysctlChange(_) | ContextRecord::AsymmetricRoute(_) => Vec::new(),
    }
}

/// The namespace an anomaly's key lives in.
pub fn netns_of(key: &RowKey) -> u32 {
    match key {
        RowKey::Flow(flow) => flow.netns,
        RowKey::Peer(p) => p.netns,
        RowKey::Listener(l) => l.netns,
        RowKey::Rule(r) => r.netns,
    }
}

/// The namespace's state when an anomaly is reported: its sysctls and how its kernel counters
/// moved over the last minute.
#[derive(Debug, Serialize, PartialEq)]
pub struct AnomalyContext {
    pub netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    pub sysctls: BTreeMap<String, String>,
    /// Non-zero deltas of TCP and IP counters over the last 60 s (`/proc/net/{snmp,netstat}` of
    /// the namespace).
    pub counters_60s: BTreeMap<String, u64>,
}

/// Counters worth showing beside TCP anomalies (the rest of /proc/net/snmp is noise here).
fn relevant_counter(name: &str) -> bool {
    name.starts_with("Tcp")
        || name.starts_with("Ip") && name.contains("In")
        || name.starts_with("Ip6In")
}

pub fn anomaly_context(key: &RowKey, shared: &SharedContext) -> AnomalyContext {
    let netns = netns_of(key);
    let shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    match shared.get(&u64::from(netns)) {
        Some(ctx) => AnomalyContext {
            netns,
            netns_name: ctx.name.clone(),
            sysctls: ctx.sysctls.clone(),
            counters_60s: ctx
                .counter_deltas(Duration::from_secs(60))
                .into_iter()
                .filter(|(name, _)| relevant_counter(name))
                .collect(),
        },
        None => AnomalyContext {
            netns,
            netns_name: None,
            sysctls: BTreeMap::new(),
            counters_60s: BTreeMap::new(),
        },
    }
}

/// `anomaly_open`, `anomaly_update` or `anomaly_close`.
#[derive(Debug, Serialize)]
pub struct AnomalyRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    #[serde(flatten)]
    pub anomaly: AnomalySnapshot,
    /// What explains it (`null` until evidence does).
    pub cause: Option<Cause>,
    pub context: AnomalyContext,
}

impl AnomalyRecord {
    pub fn new(
        event: AnomalyEvent,
        time: String,
        shared: &SharedContext,
        cause: Option<Cause>,
    ) -> Self {
        let AnomalyEvent { phase, anomaly } = event;
        let context = anomaly_context(&anomaly.key, shared);
        Self {
            kind: phase.record_type(),
            time,
            anomaly,
            cause,
            context,
        }
    }
}

/// What the explainer learns from the daemon: the context worker's namespace readings, the
/// engine's host-wide history, and /proc.
pub struct DaemonSurroundings<'a> {
    pub shared: &'a SharedContext,
    pub engine: &'a Engine,
}

impl DaemonSurroundings<'_> {
    fn with_namespace<T>(&self, netns: u32, f: impl FnOnce(&NamespaceContext) -> T) -> Option<T> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.get(&u64::from(netns)).map(f)
    }
}

impl Surroundings for DaemonSurroundings<'_> {
    fn netns_name(&self, netns: u32) -> Option<String> {
        self.with_namespace(netns, |ctx| ctx.name.clone()).flatten()
    }

    fn sysctl(&self, netns: u32, name: &str) -> Option<String> {
        self.with_namespace(netns, |ctx| ctx.sysctls.get(name).cloned())
            .flatten()
    }

    fn counters_60s(&self, netns: u32) -> BTreeMap<String, u64> {
        self.with_namespace(netns, |ctx| ctx.counter_deltas(Duration::from_secs(60)))
            .unwrap_or_default()
    }

    fn rates_around(&self, signals: &[Signal], at_ns: u64) -> BTreeMap<&'static str, BeforeAfter> {
        let span = Duration::from_secs(60).as_nanos() as u64;
        signals
            .iter()
            .map(|s| (s.name(), self.engine.rate_before_after(*s, at_ns, span)))
            .collect()
    }

    fn process_name(&self, pid: u32) -> Option<String> {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        Some(comm.trim_end().to_owned())
    }

    fn netns_of_address(&self, addr: std::net::IpAddr) -> Option<u32> {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared
            .iter()
            .find(|(_, ctx)| ctx.addresses.contains(&addr))
            .and_then(|(netns, _)| u32::try_from(*netns).ok())
    }
}

/// The signals a sysctl plausibly affects, for the before/after comparison.
pub fn signals_affected_by(sysctl: &str) -> &'static [Signal] {
    let name = sysctl.rsplit('.').next().unwrap_or(sysctl);
    match name {
        "tcp_timestamps"
        | "tcp_sack"
        | "tcp_window_scaling"
        | "tcp_ecn"
        | "tcp_mtu_probing"
        | "tcp_congestion_control"
        | "tcp_retries2" => &[
            Signal::Retransmit,
            Signal::SynRetransmit,
            Signal::SynackRetransmit,
        ],
        // A server that stops taking fast-open data makes every client retransmit it.
        "tcp_fastopen" => &[
            Signal::Retransmit,
            Signal::SynRetransmit,
            Signal::ConnectTimeout,
        ],
        "tcp_syn_retries" => &[Signal::SynRetransmit, Signal::ConnectTimeout],
        "tcp_synack_retries" => &[Signal::SynackRetransmit],
        "tcp_syncookies" | "tcp_max_syn_backlog" | "somaxconn" => {
            &[Signal::ListenOverflow, Signal::SynQueueDrop]
        }
        "rp_filter" => &[Signal::PacketDrop, Signal::SynackRetransmit],
        "tcp_tw_reuse" | "ip_local_port_range" => &[Signal::ConnectRefused, Signal::ResetSent],
        _ => &[Signal::Retransmit, Signal::PacketDrop],
    }
}

/// Per-minute rates of the signals a sysctl affects, before and after it changed.
#[derive(Debug, Serialize)]
pub struct SysctlEffectRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub netns: u64,
    pub name: String,
    pub old: String,
    pub new: String,
    /// When the change was seen.
    pub changed_at: String,
    /// Span compared on each side, in seconds.
    pub span_secs: u64,
    pub rates: BTreeMap<&'static str, BeforeAfter>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Direction, Family, Flow};
    use std::net::IpAddr;

    fn event(kind: EventKind, detail: Detail) -> Event {
        Event {
            kind,
            flow: Flow {
                family: Family::Ipv4,
                saddr: IpAddr::from([10, 0, 0, 1]),
                sport: 80,
                daddr: IpAddr::from([10, 0, 0, 2]),
                dport: 40000,
                netns: 7,
            },
            boot_ns: 0,
            segs: 3,
            flow_count: 1,
            key_wildcard: 0,
            err: 0,
            pid: 0,
            state: 1,
            socket_family: 2,
            detail,
        }
    }

    #[test]
    fn events_map_to_signals() {
        let names = ReasonNames::from_pairs([(12, "NETFILTER_DROP")], "");
        let mut cache = ReasonCache::default();
        let retrans = observation(
            &event(EventKind::Retransmit, Detail::None),
            &names,
            &mut cache,
        )
        .expect("retransmits count");
        assert_eq!((retrans.signal, retrans.amount), (Signal::Retransmit, 3));
        let synack = observation(
            &event(EventKind::SynackRetransmit, Detail::None),
            &names,
            &mut cache,
        )
        .expect("synack counts");
        assert_eq!(
            synack.listener,
            Some(ListenerKey {
                netns: 7,
                addr: IpAddr::from([10, 0, 0, 1]),
                port: 80
            })
        );
        let drop = Detail::Drop {
            reason: 12,
            location: 0,
            ifindex: 1,
            tcp_flags: 2,
            direction: Direction::Inbound,
        };
        let drop = observation(&event(EventKind::Drop, drop), &names, &mut cache).expect("drop");
        assert_eq!(drop.reason.as_deref(), Some("NETFILTER_DROP"));
        let refused = Detail::ConnectFailed {
            outcome: ConnectOutcome::Refused,
            elapsed_ns: 1,
            syn_retransmits: 0,
        };
        assert_eq!(
            observation(
                &event(EventKind::ConnectFailed, refused),
                &names,
                &mut cache
            )
            .expect("failed connect")
            .signal,
            Signal::ConnectRefused
        );
        assert!(
            observation(&event(EventKind::Connect, Detail::None), &names, &mut cache).is_none()
        );
    }

    #[test]
    fn sysctls_map_to_the_rates_they_affect() {
        assert!(signals_affected_by("net.ipv4.tcp_timestamps").contains(&Signal::Retransmit));
        assert!(signals_affected_by("net.core.somaxconn").contains(&Signal::ListenOverflow));
        assert!(signals_affected_by("net.ipv4.conf.all.rp_filter").contains(&Signal::PacketDrop));
    }

    #[test]
    fn only_tcp_and_ip_input_counters_are_context() {
        assert!(relevant_counter("TcpExtListenOverflows"));
        assert!(relevant_counter("TcpRetransSegs"));
        assert!(relevant_counter("IpInAddrErrors"));
        assert!(!relevant_counter("UdpInDatagrams"));
        assert!(!relevant_counter("IcmpOutMsgs"));
    }
}
