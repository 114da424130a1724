//! Userspace throughput and memory of observer's pipeline, without a kernel (used by
//! `cargo xtask bench`).
//!
//! Builds raw `observer_common::TcpEvent` samples (the bytes the kernel programs put in the perf
//! buffers) for `--flows` distinct flows, then times `observer::decode::decode_sample` plus the
//! chosen stage over `--events` events on one pinned core, and reads this process's VmRSS
//! afterwards (`rss_kib`: after freeing the synthetic input; `rss_with_input_kib`: before).
//! Prints one JSON object on stdout.
//!
//! Modes:
//! - `decode`: decode only;
//! - `count`: decode + a `HashMap<Flow, u64>` count per flow;
//! - `engine`: decode + `observer::aggregate::Engine::observe` (per flow, peer and listener
//!   tables, 1/10/60 s windows), with `Engine::tick` once per simulated second.
use std::{
    collections::HashMap,
    hint::black_box,
    net::Ipv4Addr,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use observer::{
    aggregate::{Engine, EngineConfig, ListenerKey, Observation, Signal},
    decode::{ConnectOutcome, Detail, Event, EventKind, Flow, decode_sample},
};
use observer_common::{FlowKey, TcpEvent, connect_outcome, direction, event_kind};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Decode,
    Count,
    Engine,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Decode => "decode only",
            Mode::Count => "decode + per-flow count (HashMap<Flow, u64>)",
            Mode::Engine => {
                "decode + aggregate engine (Engine::observe, tick per simulated second)"
            }
        }
    }
}

#[derive(Parser)]
#[command(
    name = "pipeline_bench",
    about = "Decode + aggregation throughput and memory"
)]
struct Cli {
    #[arg(long, value_enum, default_value_t = Mode::Engine)]
    mode: Mode,
    /// Events to process (bounded: at most 100 million).
    #[arg(long, default_value_t = 5_000_000)]
    events: u64,
    /// Distinct flows in the stream.
    #[arg(long, default_value_t = 100_000)]
    flows: u32,
    /// Distinct peers (remote addresses) the flows go to.
    #[arg(long, default_value_t = 1_000)]
    peers: u32,
    /// CPU to pin to (default: the last one).
    #[arg(long)]
    cpu: Option<usize>,
    /// Scheduling priority (nice value; below 0 needs root): keeps other work on a busy
    /// machine from taking the pinned core.
    #[arg(long, allow_hyphen_values = true)]
    nice: Option<i32>,
}

/// Simulated stream rate: one event per microsecond, so `tick` runs once per million events.
const SIM_NS_PER_EVENT: u64 = 1_000;
const SIM_START_NS: u64 = 1_000_000_000_000;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pipeline_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<serde_json::Value, String> {
    let events = cli.events.clamp(1, 100_000_000);
    let flows = cli.flows.clamp(1, 4_000_000);
    let peers = cli.peers.clamp(1, 65_000);
    let cpu = pin(cli.cpu)?;
    if let Some(nice) = cli.nice {
        // SAFETY: plain syscall on this process.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice.clamp(-20, 19)) } != 0 {
            return Err(format!(
                "cannot set nice {nice}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let rss_start_kib = vm_kib("VmRSS:")?;

    let samples = build_samples(flows, peers);
    let rss_input_kib = vm_kib("VmRSS:")?;
    let size = size_of::<TcpEvent>();
    let n = u64::from(flows);

    let reasons: Vec<Arc<str>> = REASONS.iter().map(|(_, name)| Arc::from(*name)).collect();
    let mut counts: HashMap<Flow, u64> = HashMap::new();
    let mut engine = match cli.mode {
        Mode::Engine => Some(
            Engine::new(EngineConfig::default(), SIM_START_NS)
                .map_err(|e| format!("engine config: {e}"))?,
        ),
        _ => None,
    };
    let mut decoded_sum = 0u64;
    let mut errors = 0u64;
    let mut ticks = 0u64;
    let mut anomaly_events = 0usize;

    let start = Instant::now();
    let mut index = 0u64;
    for i in 0..events {
        // The samples are read in order, as from a perf ring.
        let offset = (index as usize) * size;
        index += 1;
        if index == n {
            index = 0;
        }
        let event = match decode_sample(&samples[offset..offset + size]) {
            Ok(ev) => ev,
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        let now_ns = SIM_START_NS + i * SIM_NS_PER_EVENT;
        match cli.mode {
            Mode::Decode => decoded_sum = decoded_sum.wrapping_add(u64::from(event.flow.sport)),
            Mode::Count => *counts.entry(event.flow).or_insert(0) += 1,
            Mode::Engine => {
                if let Some(engine) = engine.as_mut() {
                    if let Some(observation) = observation_of(&event, &reasons) {
                        engine.observe(now_ns, observation);
                    }
                    if i > 0 && i % 1_000_000 == 0 {
                        anomaly_events += engine.tick(now_ns).len();
                        ticks += 1;
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    black_box(decoded_sum);

    // What the process holds after tracking the flows, without the synthetic input (which a
    // daemon does not have: it reads from the perf rings).
    let rss_with_input_kib = vm_kib("VmRSS:")?;
    let input_bytes = samples.len();
    drop(samples);
    let rss_kib = vm_kib("VmRSS:")?;
    let hwm_kib = vm_kib("VmHWM:")?;
    let tracked = match (&engine, cli.mode) {
        (Some(engine), _) => engine.stats().flows.rows,
        (None, Mode::Count) => counts.len(),
        _ => 0,
    };
    let engine_stats = engine.as_ref().map(|e| {
        let s = e.stats();
        json!({
            "flows": s.flows.rows, "peers": s.peers.rows, "listeners": s.listeners.rows,
            "flow_evictions": s.flows.evictions, "open_anomalies": s.open_anomalies,
        })
    });
    let secs = elapsed.as_secs_f64().max(1e-9);
    Ok(json!({
        "mode": match cli.mode { Mode::Decode => "decode", Mode::Count => "count", Mode::Engine => "engine" },
        "label": cli.mode.label(),
        "events": events,
        "decode_errors": errors,
        "distinct_flows": flows,
        "tracked_flows": tracked,
        "secs": secs,
        "events_per_sec": events as f64 / secs,
        "ns_per_event": elapsed_ns(elapsed) / events as f64,
        "cpu": cpu,
        "ticks": ticks,
        "anomaly_events": anomaly_events,
        "engine": engine_stats,
        "input_bytes": input_bytes,
        "rss_start_kib": rss_start_kib,
        "rss_input_kib": rss_input_kib,
        "rss_with_input_kib": rss_with_input_kib,
        "rss_kib": rss_kib,
        "hwm_kib": hwm_kib,
    }))
}

fn elapsed_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Kernel drop reasons as numbered on this machine's kernel (the daemon reads the names from the
/// kernel; the engine only sees the shared names).
const REASONS: [(u32, &str); 4] = [
    (2, "NO_SOCKET"),
    (12, "NETFILTER_DROP"),
    (6, "TCP_CSUM"),
    (43, "TCP_OFO_DROP"),
];

/// The observation the daemon makes of an event (`None`: not a signal the engine counts).
fn observation_of(event: &Event, reasons: &[Arc<str>]) -> Option<Observation> {
    let flow = event.flow;
    let observation = match (event.kind, event.detail) {
        (EventKind::Retransmit, _) => Observation::new(Signal::Retransmit, u64::from(event.segs)),
        (EventKind::SynRetransmit, _) => Observation::new(Signal::SynRetransmit, 1),
        (EventKind::SynackRetransmit, _) => Observation::new(Signal::SynackRetransmit, 1)
            .with_listener(ListenerKey::of_flow_source(&flow)),
        (EventKind::Drop, Detail::Drop { reason, .. }) => {
            let signal = if reason == 12 {
                Signal::NetfilterDrop
            } else {
                Signal::PacketDrop
            };
            let observation = Observation::new(signal, 1);
            match REASONS.iter().position(|(code, _)| *code == reason) {
                Some(i) => observation.with_reason(Arc::clone(&reasons[i])),
                None => observation,
            }
        }
        (EventKind::ResetSent, _) => Observation::new(Signal::ResetSent, 1),
        (EventKind::ResetReceived, _) => Observation::new(Signal::ResetReceived, 1),
        (
            EventKind::ConnectFailed,
            Detail::ConnectFailed {
                outcome: ConnectOutcome::Refused,
                ..
            },
        ) => Observation::new(Signal::ConnectRefused, 1),
        (EventKind::ConnectFailed, _) => Observation::new(Signal::ConnectTimeout, 1),
        _ => return None,
    };
    Some(observation.with_flow(flow))
}

/// One raw sample per flow, back to back (as they sit in a perf ring), with a mix of kinds:
/// half retransmits, then drops, resets, refused connects, SYN and SYN-ACK retransmits. The
/// flows come in a scattered order (a stride coprime to their number), as events of many flows
/// interleave in a real stream.
fn build_samples(flows: u32, peers: u32) -> Vec<u8> {
    let size = size_of::<TcpEvent>();
    let n = u64::from(flows);
    let stride = (1..=n.min(7919))
        .rev()
        .find(|s| gcd(*s, n) == 1)
        .unwrap_or(1);
    let mut bytes = Vec::with_capacity(flows as usize * size);
    for k in 0..n {
        // Below `flows`, so it fits.
        let i = ((k * stride) % n) as u32;
        let peer = i % peers;
        let local = Ipv4Addr::new(10, 1, (i >> 24) as u8, (i >> 16) as u8);
        let remote = Ipv4Addr::new(10, 2, (peer >> 8) as u8, peer as u8);
        let mut ev = TcpEvent {
            flow: FlowKey {
                saddr: local.to_ipv6_mapped().octets(),
                daddr: remote.to_ipv6_mapped().octets(),
                sport: (i & 0xffff) as u16,
                dport: 443,
                netns: 4_026_531_840,
            },
            timestamp_ns: SIM_START_NS + u64::from(i),
            flow_count: 1,
            segs: 1,
            pid: 1234,
            kind: event_kind::RETRANSMIT,
            state: 1,
            family: observer_common::AF_INET,
            ..TcpEvent::default()
        };
        match i % 10 {
            0..=4 => ev.segs = 1 + i % 3,
            5 | 6 => {
                ev.kind = event_kind::DROP;
                ev.reason = REASONS[(i % 4) as usize].0;
                ev.ifindex = 2;
                ev.tcp_flags = 0x10;
                ev.aux8 = direction::INBOUND;
            }
            7 => {
                ev.kind = event_kind::RESET_SENT;
                ev.reason = 1;
            }
            8 => {
                ev.kind = event_kind::CONNECT_FAILED;
                ev.aux8 = connect_outcome::REFUSED;
                ev.state = 7;
                ev.old_state = 2;
            }
            _ => {
                ev.kind = if i % 20 == 9 {
                    event_kind::SYN_RETRANSMIT
                } else {
                    event_kind::SYNACK_RETRANSMIT
                };
                ev.state = 2;
            }
        }
        // SAFETY: TcpEvent is #[repr(C)] plain integers with explicit padding (no implicit
        // padding bytes), so all of its bytes are initialised.
        let raw = unsafe {
            std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<TcpEvent>())
        };
        bytes.extend_from_slice(raw);
    }
    bytes
}

/// Pins this thread (the only one) to `cpu`, or to the last CPU: returns the CPU.
fn pin(cpu: Option<usize>) -> Result<usize, String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpu.unwrap_or(cpus - 1);
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; sched_setaffinity
    // reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(format!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cpu)
}

/// A `Vm*:` line of /proc/self/status, in KiB.
fn vm_kib(field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status"))
}
