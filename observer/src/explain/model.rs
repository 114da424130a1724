//! A recorded stream read into an incident report: what happened, in order, and the worst of it.
//! Pure: lines in, a [`Report`] out. Lines that are not records are counted, never fatal.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Deserialize;
use serde_json::Value;

use crate::{
    aggregate::Signal,
    top::{
        findings::{Finding, Findings},
        wire::{self, ReasonInterner, Record},
    },
};

/// The report's model.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub header: Header,
    /// Lines read (blank ones not counted).
    pub lines: u64,
    /// Lines that were not records observer writes (not JSON, no `type`, fields missing).
    pub not_understood: u64,
    /// The number of the first such line, 1-based.
    pub first_not_understood: Option<u64>,
    /// Records by type.
    pub types: BTreeMap<String, u64>,
    /// Every anomaly, in the order they opened.
    pub findings: Vec<Finding>,
    pub sysctl_changes: Vec<SysctlChange>,
    /// The peers with the most trouble, worst first.
    pub peers: Vec<PeerTrouble>,
    /// Whether `peers` counts the kernel's exact per-flow counters (`stop.flows`) rather than
    /// the exported events.
    pub peers_exact: bool,
    pub listeners: Vec<ListenerTrouble>,
    pub rules: Vec<RuleTrouble>,
    pub stale: Vec<StaleProcess>,
    /// `lost` and `undelivered` records in the stream.
    pub lost_records: u64,
    pub undelivered_records: u64,
    pub stop: Option<Stop>,
    /// Names of namespaces, from the anomaly records.
    pub netns_names: HashMap<u64, String>,
}

/// Where and when it was recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Header {
    pub host: Option<String>,
    pub kernel: Option<String>,
    pub version: Option<String>,
    /// Unix ns of the `start` and `stop` records.
    pub start_ns: Option<u64>,
    pub stop_ns: Option<u64>,
    pub stop_reason: Option<String>,
    /// Unix ns of the first and last record with a time.
    pub first_ns: Option<u64>,
    pub last_ns: Option<u64>,
}

/// A sysctl that changed, and what followed.
#[derive(Clone, Debug, PartialEq)]
pub struct SysctlChange {
    pub time_ns: Option<u64>,
    pub netns: u64,
    pub name: String,
    pub old: String,
    pub new: String,
    /// From its `sysctl_effect` record: signal → (before, after) per minute.
    pub effect: Option<Effect>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Effect {
    pub span_secs: u64,
    pub rates: BTreeMap<String, (f64, f64)>,
}

/// One peer's trouble.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerTrouble {
    pub netns: u32,
    pub addr: Option<IpAddr>,
    pub retransmits: u64,
    pub syn_retransmits: u64,
    pub synack_retransmits: u64,
    pub drops: u64,
    pub resets: u64,
    pub failed_connects: u64,
}

impl PeerTrouble {
    pub fn total(&self) -> u64 {
        self.retransmits
            + self.syn_retransmits
            + self.synack_retransmits
            + self.drops
            + self.resets
            + self.failed_connects
    }
}

/// A listener's drops summed over the run.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerTrouble {
    pub netns: u64,
    pub addr: IpAddr,
    pub port: u16,
    pub overflows: u64,
    pub syn_queue_drops: u64,
    pub other_drops: u64,
    pub backlog_limit: u32,
}

/// A firewall rule's drops summed over the run.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleTrouble {
    pub netns: u64,
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub rule: String,
    pub packets: u64,
    /// Named exactly (its counter grew by the dropped count) at least once.
    pub exact: bool,
}

/// A process with stale connections to a peer, at its worst.
#[derive(Clone, Debug, PartialEq)]
pub struct StaleProcess {
    pub netns: u64,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub peer: IpAddr,
    pub peer_port: u16,
    pub count: u64,
    pub oldest_age_secs: u64,
    pub growing: bool,
}

/// The `stop` record.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Stop {
    pub time: String,
    pub reason: String,
    pub totals: BTreeMap<String, KindTotals>,
    pub lost: u64,
    pub undelivered: u64,
    pub decode_errors: u64,
    pub context_undelivered: u64,
    pub missed_runs: u64,
    pub flows: Vec<StopFlow>,
    pub services: Vec<Service>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct KindTotals {
    pub events: u64,
    pub counted: u64,
    pub exported: u64,
    pub suppressed: u64,
    pub map_full: u64,
    pub received: u64,
}

/// A flow of `stop.flows`: the kernel's exact counters.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StopFlow {
    pub daddr: Option<IpAddr>,
    pub netns: u32,
    pub retransmit_segs: u64,
    pub syn_retransmits: u64,
    pub synack_retransmits: u64,
    pub drops: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub connects_refused: u64,
    pub connects_timed_out: u64,
}

/// A peer or listener of `stop.services`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Service {
    pub role: String,
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub netns: u64,
    pub established: u64,
    pub attempts: u64,
    pub refused: u64,
    pub timed_out: u64,
}

#[derive(Deserialize)]
struct SysctlEffectJson {
    #[serde(default)]
    netns: u64,
    name: String,
    #[serde(default)]
    old: String,
    #[serde(default)]
    new: String,
    #[serde(default)]
    span_secs: u64,
    #[serde(default)]
    rates: BTreeMap<String, RateJson>,
}

#[derive(Deserialize)]
struct RateJson {
    before_per_min: Option<f64>,
    after_per_min: Option<f64>,
}

/// Peers, listeners, rules and stale processes kept per section.
pub const WORST: usize = 5;

/// Reads a stream line by line.
#[derive(Default)]
pub struct ReportBuilder {
    report: Report,
    findings: Findings,
    peers: HashMap<(u32, IpAddr), PeerTrouble>,
    listeners: BTreeMap<(u64, IpAddr, u16), ListenerTrouble>,
    rules: BTreeMap<(u64, String, String, u64), RuleTrouble>,
    stale: BTreeMap<(u64, Option<u32>, IpAddr, u16), StaleProcess>,
    reasons: ReasonInterner,
}

impl ReportBuilder {
    /// Takes one line of the stream.
    pub fn line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.report.lines += 1;
        if !self.record(line) {
            self.report.not_understood += 1;
            if self.report.first_not_understood.is_none() {
                self.report.first_not_understood = Some(self.report.lines);
            }
        }
    }

    /// Whether the line was a record.
    fn record(&mut self, line: &[u8]) -> bool {
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            return false;
        };
        let Some(kind) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
            return false;
        };
        let time_ns = value
            .get("time")
            .and_then(Value::as_str)
            .and_then(wire::parse_time);
        match kind.as_str() {
            "stop" => {
                let Ok(stop) = Stop::deserialize(&value) else {
                    return false;
                };
                self.report.header.stop_ns = time_ns;
                self.report.header.stop_reason = Some(stop.reason.clone());
                self.report.stop = Some(stop);
            }
            "sysctl_effect" => {
                let Ok(effect) = SysctlEffectJson::deserialize(&value) else {
                    return false;
                };
                self.effect(effect);
            }
            _ => match wire::parse_value(&value) {
                Ok(record) => self.apply(record, time_ns),
                Err(_) => return false,
            },
        }
        let header = &mut self.report.header;
        if let Some(at) = time_ns {
            header.first_ns = Some(header.first_ns.map_or(at, |f| f.min(at)));
            header.last_ns = Some(header.last_ns.map_or(at, |l| l.max(at)));
        }
        *self.report.types.entry(kind).or_default() += 1;
        true
    }

    fn apply(&mut self, record: Record, time_ns: Option<u64>) {
        let at = time_ns.unwrap_or(0);
        match record {
            Record::Start(start) => {
                let header = &mut self.report.header;
                header.host = Some(start.host).filter(|h| !h.is_empty());
                header.kernel = Some(start.kernel).filter(|k| !k.is_empty());
                header.version = Some(start.observer_version).filter(|v| !v.is_empty());
                header.start_ns = time_ns;
            }
            Record::Event(event) => {
                let Some(obs) = wire::observation(&event, &mut self.reasons) else {
                    return;
                };
                self.count_peer(event.flow.netns, event.flow.daddr, obs.signal, obs.amount);
            }
            Record::Reconciled(entries) => {
                for entry in entries {
                    if let Some(flow) = entry.observation.flow {
                        let o = &entry.observation;
                        self.count_peer(flow.netns, flow.daddr, o.signal, o.amount);
                    }
                }
            }
            Record::Lost { count } => self.report.lost_records += count,
            Record::Undelivered { count } => self.report.undelivered_records += count,
            Record::ListenerDrops(r) => {
                let l =
                    self.listeners
                        .entry((r.netns, r.addr, r.port))
                        .or_insert(ListenerTrouble {
                            netns: r.netns,
                            addr: r.addr,
                            port: r.port,
                            overflows: 0,
                            syn_queue_drops: 0,
                            other_drops: 0,
                            backlog_limit: 0,
                        });
                l.overflows += r.accept_queue_overflows;
                l.syn_queue_drops += r.syn_queue_drops;
                l.other_drops += r.other_drops;
                l.backlog_limit = r.backlog_limit;
            }
            Record::NetfilterDrop(r) => {
                let exact = !r.rules.is_empty();
                for rule in if exact { &r.rules } else { &r.candidates } {
                    let key = (r.netns, rule.table.clone(), rule.chain.clone(), rule.handle);
                    let t = self.rules.entry(key).or_insert_with(|| RuleTrouble {
                        netns: r.netns,
                        family: rule.family.clone(),
                        table: rule.table.clone(),
                        chain: rule.chain.clone(),
                        handle: rule.handle,
                        rule: rule.rule.clone(),
                        packets: 0,
                        exact,
                    });
                    t.packets += rule.packets;
                    t.exact |= exact;
                    if !rule.rule.is_empty() {
                        t.rule.clone_from(&rule.rule);
                    }
                }
            }
            Record::StaleConnections(r) => {
                let Some(peer) = r.peer else {
                    return;
                };
                let s = self
                    .stale
                    .entry((r.netns, r.pid, peer, r.peer_port))
                    .or_insert(StaleProcess {
                        netns: r.netns,
                        pid: r.pid,
                        comm: r.comm.clone(),
                        peer,
                        peer_port: r.peer_port,
                        count: 0,
                        oldest_age_secs: 0,
                        growing: false,
                    });
                s.count = s.count.max(r.count);
                s.oldest_age_secs = s.oldest_age_secs.max(r.oldest_age_secs);
                s.growing |= r.growing;
                if s.comm.is_none() {
                    s.comm = r.comm;
                }
            }
            Record::SysctlChange(c) => self.report.sysctl_changes.push(SysctlChange {
                time_ns: wire::parse_time(&c.time),
                netns: c.netns,
                name: c.name,
                old: c.old,
                new: c.new,
                effect: None,
            }),
            Record::Anomaly(a) => {
                if let (Some(netns), Some(name)) = (a.netns, &a.detail.netns_name) {
                    self.report.netns_names.insert(netns, name.clone());
                }
                self.findings.apply(&a, at);
            }
            Record::Stop { .. } | Record::Other { .. } => {}
        }
    }

    /// A `sysctl_effect` joins the latest change of that sysctl in that namespace.
    fn effect(&mut self, effect: SysctlEffectJson) {
        let rates = effect
            .rates
            .into_iter()
            .filter_map(|(signal, r)| Some((signal, (r.before_per_min?, r.after_per_min?))))
            .collect();
        let joined = Effect {
            span_secs: effect.span_secs,
            rates,
        };
        match self
            .report
            .sysctl_changes
            .iter_mut()
            .rev()
            .find(|c| c.netns == effect.netns && c.name == effect.name && c.effect.is_none())
        {
            Some(change) => change.effect = Some(joined),
            // Its change was before the recording began.
            None => self.report.sysctl_changes.push(SysctlChange {
                time_ns: None,
                netns: effect.netns,
                name: effect.name,
                old: effect.old,
                new: effect.new,
                effect: Some(joined),
            }),
        }
    }

    fn count_peer(&mut self, netns: u32, addr: IpAddr, signal: Signal, amount: u64) {
        let peer = self.peers.entry((netns, addr)).or_insert(PeerTrouble {
            netns,
            addr: Some(addr),
            ..PeerTrouble::default()
        });
        let counter = match signal {
            Signal::Retransmit => &mut peer.retransmits,
            Signal::SynRetransmit => &mut peer.syn_retransmits,
            Signal::SynackRetransmit => &mut peer.synack_retransmits,
            Signal::PacketDrop => &mut peer.drops,
            Signal::ResetSent | Signal::ResetReceived => &mut peer.resets,
            Signal::ConnectRefused | Signal::ConnectTimeout => &mut peer.failed_connects,
            _ => return,
        };
        *counter += amount;
    }

    /// The report, its sections in a deterministic order.
    pub fn finish(self) -> Report {
        let Self {
            mut report,
            findings,
            mut peers,
            listeners,
            rules,
            stale,
            reasons: _,
        } = self;
        let mut all: Vec<Finding> = findings.all().into_iter().cloned().collect();
        all.sort_by_key(|f| (f.opened_ns, f.id));
        report.findings = all;
        // The kernel's exact per-flow counters, when the run ended with them.
        if let Some(stop) = &report.stop
            && !stop.flows.is_empty()
        {
            peers.clear();
            for f in &stop.flows {
                let Some(addr) = f.daddr else { continue };
                let p = peers.entry((f.netns, addr)).or_insert(PeerTrouble {
                    netns: f.netns,
                    addr: Some(addr),
                    ..PeerTrouble::default()
                });
                p.retransmits += f.retransmit_segs;
                p.syn_retransmits += f.syn_retransmits;
                p.synack_retransmits += f.synack_retransmits;
                p.drops += f.drops;
                p.resets += f.resets_sent + f.resets_received;
                p.failed_connects += f.connects_refused + f.connects_timed_out;
            }
            report.peers_exact = true;
        }
        let mut peers: Vec<PeerTrouble> = peers.into_values().filter(|p| p.total() > 0).collect();
        peers.sort_by(|a, b| {
            b.total()
                .cmp(&a.total())
                .then(a.netns.cmp(&b.netns))
                .then(a.addr.cmp(&b.addr))
        });
        peers.truncate(WORST);
        report.peers = peers;
        let mut listeners: Vec<ListenerTrouble> = listeners.into_values().collect();
        listeners
            .sort_by_key(|l| std::cmp::Reverse(l.overflows + l.syn_queue_drops + l.other_drops));
        listeners.truncate(WORST);
        report.listeners = listeners;
        let mut rules: Vec<RuleTrouble> = rules.into_values().collect();
        rules.sort_by_key(|r| (std::cmp::Reverse(r.exact), std::cmp::Reverse(r.packets)));
        rules.truncate(WORST);
        report.rules = rules;
        let mut stale: Vec<StaleProcess> = stale.into_values().collect();
        stale.sort_by_key(|s| std::cmp::Reverse((s.count, s.oldest_age_secs)));
        stale.truncate(WORST);
        report.stale = stale;
        if let Some(stop) = &mut report.stop {
            stop.services.sort_by(|a, b| {
                let trouble = |s: &Service| s.refused + s.timed_out;
                trouble(b).cmp(&trouble(a)).then(
                    b.attempts
                        .max(b.established)
                        .cmp(&a.attempts.max(a.established)),
                )
            });
            stop.services.truncate(WORST);
        }
        report
    }
}

/// Reads a whole stream held in memory (tests, small files).
pub fn read(text: &[u8]) -> Report {
    let mut builder = ReportBuilder::default();
    for line in text.split(|b| *b == b'\n') {
        builder.line(line);
    }
    builder.finish()
}
