//! Loads the kernel programs with the running kernel's layouts and attaches them.
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, perf::PerfEventArray},
    programs::TracePoint,
};
use observer_common::{ExportBudget, FlowCounters, FlowKey, KernelConfig, KindStats, event_kind};

use super::{btf::KernelBtf, tracefs};
use crate::record::ProgramStatus;

/// The compiled kernel programs, built by build.rs.
static PROGRAMS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// A tracepoint program of ours: (program name in the object, category, event).
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
    ("tcp_retransmit_synack", "tcp", "tcp_retransmit_synack"),
];

/// How the programs are loaded.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Events exported per flow per second (0: every event).
    pub export_per_flow: u32,
    /// Capacity of the per-flow counter map.
    pub max_flows: u32,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub programs: Vec<ProgramStatus>,
}

/// Discovers the running kernel's layouts: tracefs formats and BTF offsets. Tracepoints whose
/// format is missing or unexpected are reported and left out (`None` layout).
fn discover(
    options: &LoadOptions,
) -> anyhow::Result<(KernelConfig, Vec<(&'static str, &'static str, &'static str, Option<String>)>)>
{
    let tracefs = tracefs::TraceFs::locate_or_mount().context("tracefs is not available")?;
    let btf = KernelBtf::from_sys().context("kernel BTF (/sys/kernel/btf/vmlinux) is not usable")?;
    let mut config = KernelConfig {
        offsets: btf
            .struct_offsets()
            .context("reading struct offsets from kernel BTF")?,
        budget: ExportBudget {
            window_ns: 1_000_000_000,
            per_flow: options.export_per_flow,
            _pad: 0,
        },
        ..KernelConfig::default()
    };
    let mut plan = Vec::new();
    for &(program, category, event) in TRACEPOINTS {
        let problem = match tracefs.format(category, event) {
            Err(e) => Some(format!("{e}")),
            Ok(format) => {
                let layout = match event {
                    "tcp_retransmit_skb" => tracefs::retransmit_skb_layout(&format)
                        .map(|l| config.retransmit_skb = l),
                    _ => tracefs::retransmit_synack_layout(&format)
                        .map(|l| config.retransmit_synack = l),
                };
                layout.err().map(|e| format!("{e}"))
            }
        };
        plan.push((program, category, event, problem));
    }
    Ok((config, plan))
}

/// Loads and attaches every program the kernel supports; fails only when none can run.
pub fn load(options: &LoadOptions) -> anyhow::Result<Loaded> {
    let (config, plan) = discover(options)?;
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", &config, true)
        .map_max_entries("FLOW_COUNTERS", options.max_flows)
        .load(PROGRAMS_OBJECT)
        .context("loading the eBPF programs into the kernel")?;
    let mut programs = Vec::new();
    for (name, category, event, problem) in plan {
        let tracepoint = format!("{category}:{event}");
        let result = match problem {
            Some(problem) => Err(anyhow::anyhow!(problem)),
            None => attach(&mut ebpf, name, category, event),
        };
        programs.push(ProgramStatus {
            name: name.to_owned(),
            tracepoint,
            attached: result.is_ok(),
            error: result.err().map(|e| format!("{e:#}")),
        });
    }
    if !programs.iter().any(|p| p.attached) {
        let why: Vec<String> = programs
            .iter()
            .map(|p| format!("{}: {}", p.tracepoint, p.error.as_deref().unwrap_or("?")))
            .collect();
        anyhow::bail!("no program could be attached ({})", why.join("; "));
    }
    Ok(Loaded { ebpf, programs })
}

fn attach(ebpf: &mut Ebpf, name: &str, category: &str, event: &str) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} is missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a tracepoint program"))?;
    program
        .load()
        .with_context(|| format!("the kernel rejected program {name}"))?;
    program
        .attach(category, event)
        .with_context(|| format!("attaching {name} to {category}:{event}"))?;
    Ok(())
}

impl Loaded {
    /// Takes the perf event array (once).
    pub fn take_events(&mut self) -> anyhow::Result<PerfEventArray<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .context("map EVENTS is missing from the object")?;
        PerfEventArray::try_from(map).context("map EVENTS is not a perf event array")
    }

    /// Per-kind statistics summed over CPUs, indexed by `event_kind`.
    pub fn kind_stats(&self) -> anyhow::Result<[KindStats; event_kind::COUNT]> {
        let map = self
            .ebpf
            .map("KIND_STATS")
            .context("map KIND_STATS is missing")?;
        let array: PerCpuArray<&MapData, KindStats> = PerCpuArray::try_from(map)?;
        let mut totals = [KindStats::default(); event_kind::COUNT];
        for (index, total) in (0u32..).zip(totals.iter_mut()) {
            let per_cpu = array.get(&index, 0)?;
            for s in per_cpu.iter() {
                total.seen += s.seen;
                total.counted += s.counted;
                total.exported += s.exported;
                total.suppressed += s.suppressed;
                total.map_full += s.map_full;
                total.read_errors += s.read_errors;
            }
        }
        Ok(totals)
    }

    /// Every flow in the kernel's counter map.
    pub fn flow_counters(&self) -> anyhow::Result<Vec<(FlowKey, FlowCounters)>> {
        let map = self
            .ebpf
            .map("FLOW_COUNTERS")
            .context("map FLOW_COUNTERS is missing")?;
        let flows: BpfHashMap<&MapData, FlowKey, FlowCounters> = BpfHashMap::try_from(map)?;
        let mut out = Vec::new();
        for entry in flows.iter() {
            // An entry evicted while iterating ends its own lookup with an error: skip it.
            if let Ok(pair) = entry {
                out.push(pair);
            }
        }
        Ok(out)
    }
}
