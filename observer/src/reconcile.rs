//! Reconciliation: exported events are exemplars, the kernel's per-flow counters are exact.
//! Once a second, for flows whose events were suppressed by the export budgets, the engine is
//! fed what the kernel counted beyond what it received, so anomaly rates stay right under storms.
use std::collections::HashMap;

use observer_common::{FlowCounters, FlowKey};

use crate::{
    aggregate::{Observation, Signal},
    decode::Flow,
};

/// The per-flow counters that map to engine signals, in [`Signal`] terms.
fn signal_counts(c: &FlowCounters) -> [(Signal, u64); 8] {
    [
        (Signal::Retransmit, c.retrans_segs),
        (Signal::SynRetransmit, c.syn_retrans),
        (Signal::SynackRetransmit, c.synack_retrans),
        (Signal::PacketDrop, c.drops),
        (Signal::ResetSent, c.resets_sent),
        (Signal::ResetReceived, c.resets_received),
        (Signal::ConnectRefused, c.connects_refused),
        (Signal::ConnectTimeout, c.connects_timed_out),
    ]
}

/// Remembers, per flow, what reached the engine: fed from received events, and added by earlier
/// passes. A pass adds what the kernel counted beyond both.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Cumulative amounts that reached the engine per flow and signal (events + passes).
    seen: HashMap<FlowKey, [u64; 8]>,
    /// Suppressed total (all kinds) at the last pass: a pass is needed only when it grew.
    last_suppressed: u64,
}

/// Flows remembered at most; beyond, the memory is dropped (the next pass may then count a
/// flow's earlier events twice, which only inflates anomaly rates, never the kernel's totals).
const MAX_REMEMBERED: usize = 262_144;

fn slot(signal: Signal) -> Option<usize> {
    Some(match signal {
        Signal::Retransmit => 0,
        Signal::SynRetransmit => 1,
        Signal::SynackRetransmit => 2,
        Signal::PacketDrop => 3,
        Signal::ResetSent => 4,
        Signal::ResetReceived => 5,
        Signal::ConnectRefused => 6,
        Signal::ConnectTimeout => 7,
        _ => return None,
    })
}

fn key_of(flow: &Flow) -> FlowKey {
    let v6 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    FlowKey {
        saddr: v6(flow.saddr),
        daddr: v6(flow.daddr),
        sport: flow.sport,
        dport: flow.dport,
        netns: flow.netns,
    }
}

impl Reconciler {
    /// Notes an observation fed from a received event.
    pub fn fed(&mut self, obs: &Observation) {
        let (Some(flow), Some(slot)) = (obs.flow.as_ref(), slot(obs.signal)) else {
            return;
        };
        if self.seen.len() >= MAX_REMEMBERED {
            self.seen.clear();
        }
        self.seen.entry(key_of(flow)).or_default()[slot] += obs.amount;
    }

    /// Whether a pass is needed: the kernel suppressed events since the last one.
    pub fn needed(&self, suppressed_total: u64) -> bool {
        suppressed_total > self.last_suppressed
    }

    /// One pass over the kernel's flows: observations for what the engine has not seen. Flows
    /// the kernel no longer has (evicted) are forgotten.
    pub fn pass(
        &mut self,
        suppressed_total: u64,
        flows: impl IntoIterator<Item = (FlowKey, FlowCounters)>,
    ) -> Vec<Observation> {
        let mut out = Vec::new();
        let mut kept = HashMap::with_capacity(self.seen.len());
        for (key, now) in flows {
            let mut seen = self.seen.remove(&key).unwrap_or_default();
            if now.suppressed > 0 {
                let flow = Flow::from_key(&key);
                for (i, (signal, kernel_count)) in signal_counts(&now).into_iter().enumerate() {
                    let missing = kernel_count.saturating_sub(seen[i]);
                    if missing > 0 {
                        out.push(Observation::new(signal, missing).with_flow(flow));
                        seen[i] += missing;
                    }
                }
            }
            if seen.iter().any(|n| *n > 0) {
                kept.insert(key, seen);
            }
        }
        self.seen = kept;
        self.last_suppressed = suppressed_total;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FlowKey {
        FlowKey {
            saddr: std::net::Ipv4Addr::new(10, 0, 0, 1)
                .to_ipv6_mapped()
                .octets(),
            daddr: std::net::Ipv4Addr::new(10, 0, 0, 2)
                .to_ipv6_mapped()
                .octets(),
            sport: 1000,
            dport: 80,
            netns: 5,
        }
    }

    #[test]
    fn feeds_only_what_was_not_received() {
        let mut r = Reconciler::default();
        assert!(r.needed(3));
        // First pass: the flow was suppressed; 10 segments counted, nothing fed yet.
        let counters = FlowCounters {
            retrans_segs: 10,
            suppressed: 3,
            ..FlowCounters::default()
        };
        let obs = r.pass(3, [(key(), counters)]);
        assert_eq!(obs.len(), 1);
        assert_eq!((obs[0].signal, obs[0].amount), (Signal::Retransmit, 10));
        // Next interval: 4 segments arrive as events, the kernel counted 9 more.
        let flow = Flow::from_key(&key());
        r.fed(&Observation::new(Signal::Retransmit, 4).with_flow(flow));
        assert!(r.needed(5));
        let counters = FlowCounters {
            retrans_segs: 19,
            suppressed: 5,
            ..FlowCounters::default()
        };
        let obs = r.pass(5, [(key(), counters)]);
        assert_eq!((obs[0].signal, obs[0].amount), (Signal::Retransmit, 5));
        assert!(!r.needed(5));
    }

    #[test]
    fn flows_without_suppression_are_left_alone() {
        let mut r = Reconciler::default();
        let counters = FlowCounters {
            retrans_segs: 10,
            ..FlowCounters::default()
        };
        assert!(r.pass(1, [(key(), counters)]).is_empty());
    }
}
