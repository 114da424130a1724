//! Reconciliation: exported events are exemplars, the kernel's per-flow counters are exact.
//!
//! Every few seconds, for flows whose events the export budgets suppressed, a pass feeds the
//! engine what the kernel counted beyond what already reached it, so anomaly rates and counts
//! stay right under storms.
//!
//! "What already reached it" is kept in the kernel's own terms. Every exported event carries
//! `flow_count`, the flow's running kernel total of its counter right after the event was
//! counted (segments for retransmits). Per flow and signal the reconciler remembers `through`,
//! the kernel total a pass has accounted for, and `fed`, what events beyond `through` added since.
//! A pass that reads the total `T` feeds `T - through - fed` and moves `through` to `T`.
//!
//! An event the kernel exported before the pass read the map, but which was still on its way
//! (in a perf buffer or the queue), is part of `T`: when it arrives its `flow_count` is at most
//! `through`, so it is not fed again (it is still written to the stream; the `reconciled`
//! record carries `through`, so that a reader of the stream skips the same events: see
//! [`Reconciler::for_stream`]). An event counted after the read has a `flow_count` above `T`
//! and is fed. Events of one flow may arrive in any order (one perf buffer per CPU): only the
//! comparison with `through` matters, never the order.
//!
//! Exact, except:
//! - the kernel adds an event, then reads the total back for `flow_count`; another CPU adding
//!   in between makes it a little ahead. Should a pass read the map in that window, the event
//!   is fed again by at most its amount (nanoseconds; never seen in tests);
//! - the flow map is an LRU: a flow evicted and created anew counts from zero. A pass that finds
//!   a flow's counts (or its `suppressed`) lower than remembered starts that flow over; a new
//!   entry that already counted beyond the old marks is not recognised, and its first events are
//!   then under-counted (an evicted flow was idle, so this needs a busy host and a flow that
//!   comes back busy within one pass interval);
//! - memory is bounded ([`MAX_REMEMBERED`]): beyond it, what was fed for flows not yet
//!   reconciled is forgotten first (a later pass may then feed those events again), then
//!   everything.
use std::collections::HashMap;

use observer_common::{FlowCounters, FlowKey, event_kind};

use crate::{
    aggregate::{Observation, Signal},
    decode::Flow,
};

/// Signals with a per-flow kernel counter, and the kernel kind whose events feed each.
const SIGNALS: [(Signal, u8); 8] = [
    (Signal::Retransmit, event_kind::RETRANSMIT),
    (Signal::SynRetransmit, event_kind::SYN_RETRANSMIT),
    (Signal::SynackRetransmit, event_kind::SYNACK_RETRANSMIT),
    (Signal::PacketDrop, event_kind::DROP),
    (Signal::ResetSent, event_kind::RESET_SENT),
    (Signal::ResetReceived, event_kind::RESET_RECEIVED),
    (Signal::ConnectRefused, event_kind::CONNECT_FAILED),
    (Signal::ConnectTimeout, event_kind::CONNECT_FAILED),
];
const N: usize = SIGNALS.len();

/// The kernel's per-flow totals of [`SIGNALS`], in the same order: the counter each exported
/// event's `flow_count` is a running total of.
fn totals(c: &FlowCounters) -> [u64; N] {
    [
        c.retrans_segs,
        c.syn_retrans,
        c.synack_retrans,
        c.drops,
        c.resets_sent,
        c.resets_received,
        c.connects_refused,
        c.connects_timed_out,
    ]
}

fn slot(signal: Signal) -> Option<usize> {
    SIGNALS.iter().position(|(s, _)| *s == signal)
}

/// Flows remembered at most (see the module documentation for what is forgotten beyond).
pub const MAX_REMEMBERED: usize = 262_144;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FlowState {
    /// Per signal: the kernel total up to which the engine has everything (0: no pass yet).
    through: [u64; N],
    /// Per signal: what events with a `flow_count` above `through` fed since.
    fed: [u64; N],
    /// The flow's `suppressed` count when a pass last reconciled it: lower later means the
    /// kernel's entry was evicted and created anew.
    suppressed: u64,
}

impl FlowState {
    fn marked(&self) -> bool {
        self.through.iter().any(|t| *t > 0)
    }
}

/// What a pass adds for one flow and signal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconciled {
    /// The amount the engine had not had.
    pub observation: Observation,
    /// The kernel's total for this flow and signal as of the pass: events with a `flow_count`
    /// up to it are in `observation` or reached the engine before.
    pub through: u64,
}

/// Remembers, per flow and signal, what reached the engine; see the module documentation.
#[derive(Debug)]
pub struct Reconciler {
    flows: HashMap<Flow, FlowState>,
    /// Suppressed total (all kinds) at the last pass: a pass is needed only when it grew.
    last_suppressed: u64,
    /// Per slot: whether its kind is exported. Kinds that are not never reach the engine, so
    /// a pass does not feed them for the few flows that happen to be reconciled either.
    exported: [bool; N],
    /// Whether events' amounts are remembered (the daemon's passes need them; a reader of the
    /// stream only needs the `through` marks).
    counts_fed: bool,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new(u32::MAX)
    }
}

impl Reconciler {
    /// The daemon's reconciler; `export_kinds` is the kernel's bit mask of exported kinds.
    pub fn new(export_kinds: u32) -> Self {
        Self {
            flows: HashMap::new(),
            last_suppressed: 0,
            exported: SIGNALS.map(|(_, kind)| export_kinds & (1u32 << kind) != 0),
            counts_fed: true,
        }
    }

    /// For a reader of the daemon's stream (`observer top`): events go through
    /// [`Self::admit`] and `reconciled` entries through [`Self::reconciled`], in stream order,
    /// and the reader's engine is then fed exactly what the daemon's was.
    pub fn for_stream() -> Self {
        Self {
            counts_fed: false,
            ..Self::default()
        }
    }

    /// What an exported event adds, given the key the kernel counted it under (`counted`: its
    /// flow, or its handshake key) and its `flow_count` there: the observation, or none when a
    /// pass already counted the event (it was on its way when the pass read the kernel's map).
    pub fn admit(
        &mut self,
        mut obs: Observation,
        counted: Flow,
        flow_count: u64,
    ) -> Option<Observation> {
        let (Some(_), Some(slot)) = (obs.flow, slot(obs.signal)) else {
            return Some(obs);
        };
        let flow = counted;
        if flow_count == 0 {
            // Not counted in the flow map (it was full): no pass will ever count it either.
            return Some(obs);
        }
        let state = match self.flows.get_mut(&flow) {
            Some(state) => state,
            None if !self.counts_fed => return Some(obs),
            None => {
                self.make_room();
                self.flows.entry(flow).or_default()
            }
        };
        let through = state.through[slot];
        if flow_count <= through {
            return None;
        }
        // Beyond `through` by less than its amount: the read-back race (module documentation).
        obs.amount = obs.amount.min(flow_count - through);
        if self.counts_fed {
            state.fed[slot] += obs.amount;
        }
        Some(obs)
    }

    /// A reader of the stream: a `reconciled` entry moves the flow's mark to `through`.
    pub fn reconciled(&mut self, flow: Flow, signal: Signal, through: u64) {
        let Some(slot) = slot(signal) else {
            return;
        };
        if !self.flows.contains_key(&flow) {
            self.make_room();
        }
        let state = self.flows.entry(flow).or_default();
        state.through[slot] = through;
        state.fed[slot] = 0;
    }

    /// Keeps the memory bounded before a new flow is added.
    fn make_room(&mut self) {
        if self.flows.len() < MAX_REMEMBERED {
            return;
        }
        self.flows.retain(|_, s| s.marked());
        if self.flows.len() >= MAX_REMEMBERED / 2 {
            self.flows.clear();
        }
    }

    /// Whether a pass is needed: the kernel suppressed events since the last one.
    pub fn needed(&self, suppressed_total: u64) -> bool {
        suppressed_total > self.last_suppressed
    }

    /// One pass over the kernel's flows: what the engine has not had, per flow and signal.
    /// Flows the kernel no longer has (evicted) are forgotten.
    pub fn pass(
        &mut self,
        suppressed_total: u64,
        flows: impl IntoIterator<Item = (FlowKey, FlowCounters)>,
    ) -> Vec<Reconciled> {
        let mut out = Vec::new();
        let mut kept = HashMap::with_capacity(self.flows.len());
        for (key, now) in flows {
            let flow = Flow::from_key(&key);
            let mut state = self.flows.remove(&flow).unwrap_or_default();
            let totals = totals(&now);
            let recreated = now.suppressed < state.suppressed
                || totals.iter().zip(&state.through).any(|(t, mark)| t < mark);
            if recreated {
                // Counting from zero again: what arrived since the last pass is what `fed`
                // holds (events at or below the old marks were skipped), the rest is missing.
                state.through = [0; N];
            }
            if now.suppressed > 0 || recreated {
                for (i, &total) in totals.iter().enumerate() {
                    if !self.exported[i] {
                        continue;
                    }
                    let missing = total
                        .saturating_sub(state.through[i])
                        .saturating_sub(state.fed[i]);
                    if missing > 0 {
                        out.push(Reconciled {
                            observation: Observation::new(SIGNALS[i].0, missing).with_flow(flow),
                            through: total,
                        });
                    }
                    state.through[i] = total;
                    state.fed[i] = 0;
                }
                state.suppressed = now.suppressed;
            }
            if state != FlowState::default() {
                kept.insert(flow, state);
            }
        }
        self.flows = kept;
        self.last_suppressed = suppressed_total;
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            saddr: std::net::Ipv4Addr::new(10, 0, 0, 1)
                .to_ipv6_mapped()
                .octets(),
            daddr: std::net::Ipv4Addr::new(10, 0, 0, 2)
                .to_ipv6_mapped()
                .octets(),
            sport: port,
            dport: 80,
            netns: 5,
        }
    }

    fn flow(port: u16) -> Flow {
        Flow::from_key(&key(port))
    }

    /// Admits an event counted under its own flow.
    trait AdmitOwn {
        fn admit_own(&mut self, obs: Observation, flow_count: u64) -> Option<Observation>;
    }

    impl AdmitOwn for Reconciler {
        fn admit_own(&mut self, obs: Observation, flow_count: u64) -> Option<Observation> {
            let counted = obs.flow.unwrap_or_else(|| flow(0));
            self.admit(obs, counted, flow_count)
        }
    }

    #[test]
    fn events_counted_under_a_handshake_key_meet_the_pass_of_that_key() {
        // A refused connect from port 1000 is counted under the handshake key (port 0): the
        // pass reads that key, and the event arriving afterwards is recognised by it.
        let mut r = Reconciler::default();
        let handshake = key(0);
        let counters = FlowCounters {
            connects_refused: 3,
            suppressed: 2,
            ..FlowCounters::default()
        };
        let passed = r.pass(2, [(handshake, counters)]);
        assert_eq!(passed.iter().map(|p| p.observation.amount).sum::<u64>(), 3);
        let event = obs(Signal::ConnectRefused, 1);
        assert_eq!(
            r.admit(event.clone(), flow(0), 3),
            None,
            "counted by the pass"
        );
        assert_eq!(fed(r.admit(event, flow(0), 4)), 1, "beyond the pass");
    }

    fn obs(signal: Signal, amount: u64) -> Observation {
        Observation::new(signal, amount).with_flow(flow(1000))
    }

    fn amounts(reconciled: &[Reconciled]) -> Vec<(Signal, u64, u64)> {
        reconciled
            .iter()
            .map(|r| (r.observation.signal, r.observation.amount, r.through))
            .collect()
    }

    fn fed(admitted: Option<Observation>) -> u64 {
        admitted.map_or(0, |o| o.amount)
    }

    #[test]
    fn feeds_only_what_was_not_received() {
        let mut r = Reconciler::default();
        assert!(r.needed(3));
        // First pass: the flow was suppressed; 10 segments counted, nothing received yet.
        let counters = FlowCounters {
            retrans_segs: 10,
            suppressed: 3,
            ..FlowCounters::default()
        };
        let out = r.pass(3, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::Retransmit, 10, 10)]);
        // Next interval: 4 segments arrive as events (counted 11..=14), the kernel counts 5 more.
        assert_eq!(fed(r.admit_own(obs(Signal::Retransmit, 4), 14)), 4);
        assert!(r.needed(5));
        let counters = FlowCounters {
            retrans_segs: 19,
            suppressed: 5,
            ..FlowCounters::default()
        };
        let out = r.pass(5, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::Retransmit, 5, 19)]);
        assert!(!r.needed(5));
    }

    #[test]
    fn an_event_received_before_the_first_pass_is_not_counted_again() {
        let mut r = Reconciler::default();
        // Two refused connects exported and received, then eight suppressed.
        for n in 1..=2 {
            assert_eq!(fed(r.admit_own(obs(Signal::ConnectRefused, 1), n)), 1);
        }
        let counters = FlowCounters {
            connects_refused: 10,
            suppressed: 8,
            ..FlowCounters::default()
        };
        let out = r.pass(8, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::ConnectRefused, 8, 10)]);
    }

    #[test]
    fn an_event_in_flight_during_the_pass_that_counted_it_is_not_fed_again() {
        let mut r = Reconciler::default();
        // Counted 1..=10; events 1 and 10 exported, 1 received; 10 still in a perf buffer when
        // the pass reads the map.
        assert_eq!(fed(r.admit_own(obs(Signal::ResetSent, 1), 1)), 1);
        let counters = FlowCounters {
            resets_sent: 10,
            suppressed: 8,
            ..FlowCounters::default()
        };
        let out = r.pass(8, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::ResetSent, 9, 10)]);
        // It arrives: already counted.
        assert_eq!(r.admit_own(obs(Signal::ResetSent, 1), 10), None);
        // Later events are fed, whatever the order they arrive in (one buffer per CPU).
        assert_eq!(fed(r.admit_own(obs(Signal::ResetSent, 1), 12)), 1);
        assert_eq!(fed(r.admit_own(obs(Signal::ResetSent, 1), 11)), 1);
        let counters = FlowCounters {
            resets_sent: 15,
            suppressed: 11,
            ..FlowCounters::default()
        };
        let out = r.pass(11, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::ResetSent, 3, 15)]);
    }

    #[test]
    fn retransmits_count_segments() {
        let mut r = Reconciler::default();
        // Skbs of 2, 3 and 4 segments: running totals 2, 5, 9; the first received, the second
        // in flight at the pass, the third suppressed.
        assert_eq!(fed(r.admit_own(obs(Signal::Retransmit, 2), 2)), 2);
        let counters = FlowCounters {
            retrans_segs: 9,
            retrans_skbs: 3,
            suppressed: 1,
            ..FlowCounters::default()
        };
        let out = r.pass(1, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::Retransmit, 7, 9)]);
        assert_eq!(r.admit_own(obs(Signal::Retransmit, 3), 5), None);
        // An skb of 3 counted after the pass (total 12) is fed whole.
        assert_eq!(fed(r.admit_own(obs(Signal::Retransmit, 3), 12)), 3);
        // One whose read-back total came out only 1 beyond the mark (another CPU added between
        // the pass's read and it): only the part beyond the mark is new.
        let mut r2 = Reconciler::default();
        r2.pass(1, [(key(1000), counters)]);
        assert_eq!(fed(r2.admit_own(obs(Signal::Retransmit, 3), 10)), 1);
    }

    #[test]
    fn events_the_flow_map_could_not_count_are_fed_and_not_remembered() {
        let mut r = Reconciler::default();
        assert_eq!(fed(r.admit_own(obs(Signal::PacketDrop, 1), 0)), 1);
        assert!(r.flows.is_empty());
    }

    #[test]
    fn flows_without_suppression_are_left_alone() {
        let mut r = Reconciler::default();
        let counters = FlowCounters {
            retrans_segs: 10,
            ..FlowCounters::default()
        };
        assert!(r.pass(1, [(key(1000), counters)]).is_empty());
    }

    #[test]
    fn kinds_not_exported_are_not_reconciled() {
        let mut r = Reconciler::new(1u32 << event_kind::RETRANSMIT);
        let counters = FlowCounters {
            retrans_segs: 10,
            drops: 4,
            suppressed: 9,
            ..FlowCounters::default()
        };
        let out = r.pass(9, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::Retransmit, 10, 10)]);
    }

    #[test]
    fn evicted_flows_are_forgotten_and_recreated_ones_start_over() {
        let mut r = Reconciler::default();
        let counters = FlowCounters {
            resets_sent: 10,
            suppressed: 8,
            ..FlowCounters::default()
        };
        r.pass(8, [(key(1000), counters)]);
        // Evicted, then created anew: its first two events (totals 1 and 2) are below the old
        // mark; both the pass and a reader of the stream then get them from the next pass.
        assert_eq!(r.admit_own(obs(Signal::ResetSent, 1), 1), None);
        assert_eq!(r.admit_own(obs(Signal::ResetSent, 1), 2), None);
        let counters = FlowCounters {
            resets_sent: 3,
            ..FlowCounters::default()
        };
        let out = r.pass(8, [(key(1000), counters)]);
        assert_eq!(amounts(&out), [(Signal::ResetSent, 3, 3)]);
        // Gone from the map: forgotten.
        r.pass(8, []);
        assert!(r.flows.is_empty());
    }

    #[test]
    fn memory_is_bounded() {
        let mut r = Reconciler::default();
        let counters = FlowCounters {
            resets_sent: 2,
            suppressed: 1,
            ..FlowCounters::default()
        };
        r.pass(1, [(key(1), counters)]);
        for port in 2..=u16::MAX {
            for netns in 0..5 {
                let mut f = flow(port);
                f.netns = netns;
                r.admit_own(Observation::new(Signal::ResetSent, 1).with_flow(f), 1);
            }
        }
        assert!(r.flows.len() <= MAX_REMEMBERED);
        // Flows with a mark are kept first: the in-flight event of the first flow is not fed.
        assert!(r.flows.contains_key(&flow(1)));
        assert_eq!(
            r.admit_own(Observation::new(Signal::ResetSent, 1).with_flow(flow(1)), 2),
            None
        );
    }

    /// A small deterministic generator (no dependency for one test).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    /// The kernel side of the simulation: exact counters, and exported events in two per-CPU
    /// buffers that the daemon reads in any interleaving.
    #[derive(Default)]
    struct Kernel {
        flows: BTreeMap<u16, FlowCounters>,
        suppressed: u64,
        buffers: [VecDeque<(Observation, u64)>; 2],
    }

    impl Kernel {
        fn event(&mut self, rng: &mut Lcg) {
            let port = 1000 + rng.below(4) as u16;
            let c = self.flows.entry(port).or_default();
            let (signal, amount) = match rng.below(3) {
                0 => (Signal::Retransmit, 1 + rng.below(4)),
                1 => (Signal::ResetSent, 1),
                _ => (Signal::ConnectRefused, 1),
            };
            let total = match signal {
                Signal::Retransmit => &mut c.retrans_segs,
                Signal::ResetSent => &mut c.resets_sent,
                _ => &mut c.connects_refused,
            };
            *total += amount;
            let flow_count = *total;
            // Flow 1003 is never over its budget; the others often are.
            if port == 1003 || rng.below(3) == 0 {
                let o = Observation::new(signal, amount).with_flow(flow(port));
                self.buffers[rng.below(2) as usize].push_back((o, flow_count));
            } else {
                c.suppressed += 1;
                self.suppressed += 1;
            }
        }

        fn map(&self) -> Vec<(FlowKey, FlowCounters)> {
            self.flows.iter().map(|(p, c)| (key(*p), *c)).collect()
        }

        fn truth(&self) -> BTreeMap<(u16, Signal), u64> {
            let mut t = BTreeMap::new();
            for (port, c) in &self.flows {
                for (signal, n) in [
                    (Signal::Retransmit, c.retrans_segs),
                    (Signal::ResetSent, c.resets_sent),
                    (Signal::ConnectRefused, c.connects_refused),
                ] {
                    if n > 0 {
                        t.insert((*port, signal), n);
                    }
                }
            }
            t
        }
    }

    /// What the output stage writes, in order.
    enum Written {
        Event(Observation, u64),
        Reconciled(Vec<Reconciled>),
    }

    type Counts = BTreeMap<(u16, Signal), u64>;

    fn add(engine: &mut Counts, o: &Observation) {
        let port = o.flow.expect("flow").sport;
        *engine.entry((port, o.signal)).or_default() += o.amount;
    }

    /// The output stage takes the next event of one CPU's buffer.
    fn deliver(
        kernel: &mut Kernel,
        daemon: &mut Reconciler,
        engine: &mut Counts,
        stream: &mut Vec<Written>,
        cpu: usize,
    ) {
        if let Some((o, flow_count)) = kernel.buffers[cpu].pop_front() {
            if let Some(fed) = daemon.admit_own(o.clone(), flow_count) {
                add(engine, &fed);
            }
            stream.push(Written::Event(o, flow_count));
        }
    }

    /// A pass when the daemon would run one.
    fn pass(
        kernel: &Kernel,
        daemon: &mut Reconciler,
        engine: &mut Counts,
        stream: &mut Vec<Written>,
    ) {
        if daemon.needed(kernel.suppressed) {
            let out = daemon.pass(kernel.suppressed, kernel.map());
            for r in &out {
                add(engine, &r.observation);
            }
            stream.push(Written::Reconciled(out));
        }
    }

    /// The daemon's output stage: events arrive from either buffer, passes read the map at
    /// any moment (with events of every flow still in flight), the stop sequence detaches
    /// (the kernel counts nothing more), drains, then runs the final pass. The engine ends
    /// with the kernel's totals, and a reader of the stream counts what the engine counted.
    #[test]
    fn passes_at_any_moment_add_up_to_the_kernel_totals() {
        for seed in 0..200 {
            let mut rng = Lcg(seed);
            let mut kernel = Kernel::default();
            let mut daemon = Reconciler::default();
            let mut engine = Counts::new();
            let mut stream = Vec::new();
            for _ in 0..2000 {
                match rng.below(10) {
                    0..=5 => kernel.event(&mut rng),
                    6..=8 => {
                        let cpu = rng.below(2) as usize;
                        deliver(&mut kernel, &mut daemon, &mut engine, &mut stream, cpu);
                    }
                    _ => pass(&kernel, &mut daemon, &mut engine, &mut stream),
                }
            }
            // Stop: detached, then the final drains, then the final pass.
            while !kernel.buffers.iter().all(VecDeque::is_empty) {
                let cpu = rng.below(2) as usize;
                deliver(&mut kernel, &mut daemon, &mut engine, &mut stream, cpu);
            }
            pass(&kernel, &mut daemon, &mut engine, &mut stream);
            assert_eq!(engine, kernel.truth(), "seed {seed}");

            let mut reader = Reconciler::for_stream();
            let mut counted = BTreeMap::new();
            for written in stream {
                match written {
                    Written::Event(o, flow_count) => {
                        if let Some(fed) = reader.admit_own(o, flow_count) {
                            add(&mut counted, &fed);
                        }
                    }
                    Written::Reconciled(out) => {
                        for r in out {
                            add(&mut counted, &r.observation);
                            let flow = r.observation.flow.expect("flow");
                            reader.reconciled(flow, r.observation.signal, r.through);
                        }
                    }
                }
            }
            assert_eq!(counted, engine, "seed {seed}: the stream's reader");
        }
    }

    /// At stop the programs are detached first, so the final pass reads final totals (a pass
    /// that read them earlier would miss what was suppressed after). The events still in flight
    /// then come out right whether they are drained before the final pass (as `daemon::run`
    /// does) or after it.
    #[test]
    fn the_final_pass_is_exact_before_or_after_the_final_drain() {
        let counters = |refused| FlowCounters {
            connects_refused: refused,
            suppressed: refused - 2,
            ..FlowCounters::default()
        };
        // Both orders of drain and final pass, once the kernel stopped counting at 100.
        for drain_first in [true, false] {
            let mut r = Reconciler::default();
            let mut engine = 0;
            engine += fed(r.admit_own(obs(Signal::ConnectRefused, 1), 1));
            let in_flight = (obs(Signal::ConnectRefused, 1), 100);
            if drain_first {
                engine += fed(r.admit_own(in_flight.0.clone(), in_flight.1));
            }
            for out in r.pass(98, [(key(1000), counters(100))]) {
                engine += out.observation.amount;
            }
            if !drain_first {
                engine += fed(r.admit_own(in_flight.0, in_flight.1));
            }
            assert_eq!(engine, 100, "drain first: {drain_first}");
        }
    }
}
