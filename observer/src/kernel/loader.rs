//! Loads the kernel programs with the running kernel's layouts and attaches them.
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{RawTracePoint, TracePoint},
};
use observer_common::{
    ExportBudget, FlowCounters, FlowKey, KernelConfig, KindStats, ListenerChange,
    ListenerChangeKey, ListenerOffsets, MAX_DROP_REASONS, MapStats, NetnsReason, PacketOffsets,
    RECORD_MAX, RawArgs, ServiceKey, ServiceStats, TableSizes, drop_filter, event_kind,
    socket_sets_for,
};

use super::{
    btf::KernelBtf,
    raw_args,
    reasons::{self, ReasonNames},
    tracefs,
};
use crate::record::ProgramStatus;

/// The compiled kernel programs, built by build.rs.
static PROGRAMS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// A tracepoint program of ours: (classic program name in the object, category, event). The raw
/// tracepoint program on the same event is called `raw_<event>`.
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
    ("tcp_retransmit_synack", "tcp", "tcp_retransmit_synack"),
    ("tcp_send_reset", "tcp", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
    ("kfree_skb", "skb", "kfree_skb"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
];

/// How the programs are loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Events exported per flow per second (0: every event).
    pub export_per_flow: u32,
    /// Events exported per CPU per second over all flows (0: no limit).
    pub export_per_cpu: u32,
    /// Bit mask of `event_kind`s exported at all.
    pub export_kinds: u32,
    /// Connects slower than this (ms) are trouble (0: none).
    pub slow_connect_ms: u32,
    /// Capacity of the per-flow counter map.
    pub max_flows: u32,
    /// Drop reasons to report, e.g. `default` or `default,-NO_SOCKET` (see `reasons::select`).
    pub drop_reasons: String,
    /// Which kind of tracepoint program to attach.
    pub attach_mode: AttachMode,
}

/// Which of the two programs on each tracepoint to attach.
///
/// `tuned` is the default: raw programs on the tracepoints that fire for healthy traffic
/// (every state change, every freed packet), where the raw program ends an uninteresting hit
/// before it reads any memory and the kernel formats no record; classic ones on the trouble
/// tracepoints, where raw measured no cheaper on our storms (BENCHMARKS.md compares them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Raw programs on `sock:inet_sock_set_state` and `skb:kfree_skb` (classic where raw
    /// cannot attach), classic programs on the others.
    #[default]
    Tuned,
    /// Raw tracepoints where BTF names the arguments, classic ones otherwise or when a raw
    /// attach fails.
    Auto,
    /// Raw tracepoints only: the tracepoint's arguments, read directly (no record is built).
    Raw,
    /// Classic tracepoints only: the formatted record, as `perf` and bpftrace's `tracepoint:`
    /// see it.
    Classic,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tuned => "tuned",
            AttachMode::Auto => "auto",
            AttachMode::Raw => "raw",
            AttachMode::Classic => "classic",
        }
    }
}

/// What the bounded kernel tables evicted ([`Loaded::map_evictions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapEvictions {
    pub sockets: u64,
    pub netns_drops: u64,
    /// `SERVICES` entries created, and evicted.
    pub services_created: u64,
    pub services: u64,
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// Filled by [`Loaded::attach_all`].
    pub programs: Vec<ProgramStatus>,
    plan: Vec<Planned>,
    /// Names of the running kernel's drop reasons.
    pub drop_reasons: ReasonNames,
    /// Names of the running kernel's RST reasons.
    pub reset_reasons: ReasonNames,
    /// Drop-reason codes reported.
    pub selected_drop_reasons: Vec<u32>,
    attach_mode: AttachMode,
    /// [`Loaded::missed_runs`] as it was when the programs were unloaded.
    missed_at_detach: Option<u64>,
    /// Our own handle on the per-namespace drop map, once the context worker has taken it.
    netns_drops: Option<BpfHashMap<MapData, NetnsReason, u64>>,
}

/// A tracepoint's place in the plan: which programs can attach to it, or why not.
struct Planned {
    program: &'static str,
    category: &'static str,
    event: &'static str,
    /// Why the classic program cannot run (its record layout), if it cannot.
    classic_problem: Option<String>,
    /// Why the raw program cannot run (its arguments or the socket layout), if it cannot.
    raw_problem: Option<String>,
}

/// What start-up learned about the running kernel.
struct Discovery {
    config: KernelConfig,
    plan: Vec<Planned>,
    drop_reasons: ReasonNames,
    reset_reasons: ReasonNames,
}

/// Discovers the running kernel's layouts: tracefs formats and BTF offsets. Tracepoints whose
/// format is missing or unexpected are reported and left out.
fn discover(options: &LoadOptions) -> anyhow::Result<Discovery> {
    let tracefs = tracefs::TraceFs::locate_or_mount().context("tracefs is not available")?;
    let btf =
        KernelBtf::from_sys().context("kernel BTF (/sys/kernel/btf/vmlinux) is not usable")?;
    let mut config = KernelConfig {
        offsets: btf
            .struct_offsets()
            .context("reading struct offsets from kernel BTF")?,
        packet: packet_offsets(&btf).context("reading sk_buff offsets from kernel BTF")?,
        budget: ExportBudget {
            window_ns: 1_000_000_000,
            per_flow: options.export_per_flow,
            per_cpu: options.export_per_cpu,
            kinds: options.export_kinds,
            _pad: 0,
            slow_connect_ns: u64::from(options.slow_connect_ms) * 1_000_000,
        },
        tables: TableSizes {
            socket_sets_mask: socket_sets_for(options.max_flows) - 1,
            _pad: 0,
        },
        listener: btf.listener_offsets().unwrap_or_else(|e| {
            eprintln!(
                "observer: warning: listener layout not found in BTF ({:#}); listeners closed between two readings lose their last drops",
                anyhow::Error::from(e)
            );
            ListenerOffsets::default()
        }),
        ..KernelConfig::default()
    };
    let mut drop_reasons = ReasonNames::default();
    let mut reset_reasons = ReasonNames::default();
    let mut plan = Vec::new();
    let sock = btf
        .sock_offsets()
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)));
    if let Ok(sock) = sock {
        config.raw.sock = sock;
    }
    for &(program, category, event) in TRACEPOINTS {
        let raw_problem = match (&sock, btf.tracepoint_params(event)) {
            (Err(e), _) => Some(format!("socket layout: {e}")),
            (_, Err(e)) => Some(format!("{:#}", anyhow::Error::from(e))),
            (Ok(_), Ok(params)) => match raw_args::resolve(event, &params) {
                Ok(args) => {
                    *raw_slot(&mut config, event) = args;
                    None
                }
                Err(e) => Some(format!("{event}: {e}")),
            },
        };
        let classic_problem = match tracefs.format(category, event) {
            Err(e) => Some(format!("{e}")),
            Ok(format) => {
                let layout = match event {
                    "tcp_retransmit_skb" => {
                        tracefs::retransmit_skb_layout(&format).map(|l| config.retransmit_skb = l)
                    }
                    "tcp_retransmit_synack" => tracefs::retransmit_synack_layout(&format)
                        .map(|l| config.retransmit_synack = l),
                    "tcp_receive_reset" => {
                        tracefs::receive_reset_layout(&format).map(|l| config.receive_reset = l)
                    }
                    "tcp_send_reset" => tracefs::send_reset_layout(&format).map(|l| {
                        reset_reasons = ReasonNames::from_pairs(
                            format.symbolic_values("reason"),
                            "SK_RST_REASON_",
                        );
                        config.send_reset = l;
                    }),
                    "kfree_skb" => tracefs::kfree_skb_layout(&format).map(|l| {
                        drop_reasons = ReasonNames::from_pairs(
                            format.symbolic_values("reason"),
                            "SKB_DROP_REASON_",
                        );
                        config.kfree_skb = l;
                    }),
                    _ => tracefs::set_state_layout(&format).map(|l| config.set_state = l),
                };
                layout.err().map(|e| format!("{e}"))
            }
        };
        plan.push(Planned {
            program,
            category,
            event,
            classic_problem,
            raw_problem,
        });
    }
    // The print fmt is the first source; BTF names the same enum where the format has none.
    if drop_reasons.is_empty()
        && let Ok(values) = btf.enum_values("skb_drop_reason")
    {
        drop_reasons =
            ReasonNames::from_pairs(values.iter().map(|(n, v)| (*v, n)), "SKB_DROP_REASON_");
    }
    if reset_reasons.is_empty()
        && let Ok(values) = btf.enum_values("sk_rst_reason")
    {
        reset_reasons =
            ReasonNames::from_pairs(values.iter().map(|(n, v)| (*v, n)), "SK_RST_REASON_");
    }
    Ok(Discovery {
        config,
        plan,
        drop_reasons,
        reset_reasons,
    })
}

/// The raw program arguments of `event` inside `config`.
fn raw_slot<'a>(config: &'a mut KernelConfig, event: &str) -> &'a mut RawArgs {
    match event {
        "tcp_retransmit_skb" => &mut config.raw.retransmit_skb,
        "tcp_retransmit_synack" => &mut config.raw.retransmit_synack,
        "tcp_send_reset" => &mut config.raw.send_reset,
        "tcp_receive_reset" => &mut config.raw.receive_reset,
        "kfree_skb" => &mut config.raw.kfree_skb,
        _ => &mut config.raw.set_state,
    }
}

/// Offsets for reading packets out of `struct sk_buff` and RTT out of `struct tcp_sock`.
fn packet_offsets(btf: &KernelBtf) -> anyhow::Result<PacketOffsets> {
    let offset = |s: &str, path: &str| -> anyhow::Result<u16> {
        let off = btf.member_offset(s, path)?;
        u16::try_from(off)
            .with_context(|| format!("offset of {s}.{path} ({off}) does not fit 16 bits"))
    };
    let mut offsets = PacketOffsets {
        skb_head: offset("sk_buff", "head")?,
        skb_network_header: offset("sk_buff", "network_header")?,
        skb_transport_header: offset("sk_buff", "transport_header")?,
        skb_dev: offset("sk_buff", "dev")?,
        skb_iif: offset("sk_buff", "skb_iif")?,
        dev_net: offset("net_device", "nd_net.net")?,
        tcp_srtt_us: offset("tcp_sock", "srtt_us")?,
        skb_window_start: 0,
        skb_window_len: 0,
        skb_protocol: offset("sk_buff", "protocol")?,
        _pad: [0; 2],
    };
    let (start, len) = skb_window(&offsets).with_context(|| {
        format!("the sk_buff members observer reads span more than {RECORD_MAX} bytes: {offsets:?}")
    })?;
    offsets.skb_window_start = start;
    offsets.skb_window_len = len;
    Ok(offsets)
}

/// The smallest part of `struct sk_buff` that holds every member the drop program reads
/// (`head` and `dev` pointers, the u16 header offsets and protocol, the int `skb_iif`), so that one copy
/// reads them all; None when it is larger than the programs' buffer.
fn skb_window(o: &PacketOffsets) -> Option<(u16, u16)> {
    let members = [
        (o.skb_head, 8),
        (o.skb_dev, 8),
        (o.skb_network_header, 2),
        (o.skb_transport_header, 2),
        (o.skb_iif, 4),
        (o.skb_protocol, 2),
    ];
    let start = members.iter().map(|&(off, _)| off).min()?;
    let end = members.iter().map(|&(off, size)| off + size).max()?;
    let len = end - start;
    (len <= RECORD_MAX).then_some((start, len))
}

/// Loads the programs into the kernel (verified, not yet attached) with the running kernel's
/// layouts. Attach with [`Loaded::attach_all`] once the perf buffers are being read, so no
/// exported event goes to an unread buffer.
pub fn load(options: &LoadOptions) -> anyhow::Result<Loaded> {
    let Discovery {
        config,
        plan,
        drop_reasons,
        reset_reasons,
    } = discover(options)?;
    let selected_drop_reasons = reasons::select(&drop_reasons, &options.drop_reasons)?;
    let mut ebpf = EbpfLoader::new()
        .override_global("CONFIG", &config, true)
        .map_max_entries("FLOW_COUNTERS", options.max_flows)
        // Room for as many followed connections as flows, in sets of SOCKET_WAYS.
        .map_max_entries("SOCKETS", socket_sets_for(options.max_flows))
        .load(PROGRAMS_OBJECT)
        .context("loading the eBPF programs into the kernel")?;
    {
        let map = ebpf
            .map_mut("DROP_REASON_FILTER")
            .context("map DROP_REASON_FILTER is missing")?;
        let mut filter: Array<&mut MapData, u8> = Array::try_from(map)?;
        // Per-namespace counts feed the netfilter rule attribution only (context.rs).
        let per_namespace = drop_reasons.code("NETFILTER_DROP");
        for &code in &selected_drop_reasons {
            let value = if Some(code) == per_namespace {
                drop_filter::REPORT | drop_filter::PER_NAMESPACE
            } else {
                drop_filter::REPORT
            };
            filter
                .set(code, value, 0)
                .with_context(|| format!("enabling drop reason {code}"))?;
        }
    }
    Ok(Loaded {
        ebpf,
        programs: Vec::new(),
        plan,
        drop_reasons,
        reset_reasons,
        selected_drop_reasons,
        attach_mode: options.attach_mode,
        missed_at_detach: None,
        netns_drops: None,
    })
}

fn attach_classic(ebpf: &mut Ebpf, name: &str, category: &str, event: &str) -> anyhow::Result<()> {
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

fn attach_raw(ebpf: &mut Ebpf, name: &str, event: &str) -> anyhow::Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} is missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a raw tracepoint program"))?;
    program
        .load()
        .with_context(|| format!("the kernel rejected program {name}"))?;
    if let Err(e) = program.attach(event) {
        // Loaded but not attached: unload, so that a classic fallback is the only program.
        let _ = program.unload();
        return Err(
            anyhow::Error::from(e).context(format!("attaching {name} to raw tracepoint {event}"))
        );
    }
    Ok(())
}

/// The tracepoints `AttachMode::Tuned` attaches raw programs to: they fire for healthy
/// traffic, and the raw program ends an uninteresting hit on its arguments alone.
const RAW_BY_DEFAULT: &[&str] = &["inet_sock_set_state", "kfree_skb"];

/// Kind of a program in the `start` record.
const RAW: &str = "raw_tracepoint";
const CLASSIC: &str = "tracepoint";

impl Loaded {
    /// Attaches one program per tracepoint, raw or classic as `attach_mode` says; fails only
    /// when none can run.
    pub fn attach_all(&mut self) -> anyhow::Result<()> {
        let mode = self.attach_mode;
        let mut programs = Vec::new();
        for Planned {
            program: name,
            category,
            event,
            classic_problem,
            raw_problem,
        } in std::mem::take(&mut self.plan)
        {
            let raw_name = format!("raw_{event}");
            let status =
                |name: &str, kind: &'static str, result: anyhow::Result<()>| ProgramStatus {
                    name: name.to_owned(),
                    tracepoint: format!("{category}:{event}"),
                    kind,
                    attached: result.is_ok(),
                    error: result.err().map(|e| format!("{e:#}")),
                    raw_unavailable: None,
                };
            let try_raw = |ebpf: &mut Ebpf| match &raw_problem {
                Some(problem) => Err(anyhow::anyhow!("{problem}")),
                None => attach_raw(ebpf, &raw_name, event),
            };
            let try_classic = |ebpf: &mut Ebpf| match &classic_problem {
                Some(problem) => Err(anyhow::anyhow!("{problem}")),
                None => attach_classic(ebpf, name, category, event),
            };
            let program = match mode {
                AttachMode::Raw => status(&raw_name, RAW, try_raw(&mut self.ebpf)),
                AttachMode::Classic => status(name, CLASSIC, try_classic(&mut self.ebpf)),
                AttachMode::Tuned if !RAW_BY_DEFAULT.contains(&event) => {
                    status(name, CLASSIC, try_classic(&mut self.ebpf))
                }
                AttachMode::Auto | AttachMode::Tuned => match try_raw(&mut self.ebpf) {
                    Ok(()) => status(&raw_name, RAW, Ok(())),
                    Err(raw_error) => ProgramStatus {
                        raw_unavailable: Some(format!("{raw_error:#}")),
                        ..status(name, CLASSIC, try_classic(&mut self.ebpf))
                    },
                },
            };
            programs.push(program);
        }
        if !programs.iter().any(|p| p.attached) {
            let why: Vec<String> = programs
                .iter()
                .map(|p| format!("{}: {}", p.tracepoint, p.error.as_deref().unwrap_or("?")))
                .collect();
            anyhow::bail!("no program could be attached ({})", why.join("; "));
        }
        self.programs = programs;
        Ok(())
    }

    /// Detaches and unloads every program, keeping the maps readable: after this nothing more
    /// is counted or exported, so a final drain sees everything that was exported.
    pub fn detach_all(&mut self) {
        // Unloading closes the programs' fds, and their counts with them.
        self.missed_at_detach = Some(self.missed_runs_now());
        for (name, program) in self.ebpf.programs_mut() {
            let result = match program {
                aya::programs::Program::TracePoint(p) => p.unload(),
                aya::programs::Program::RawTracePoint(p) => p.unload(),
                _ => Ok(()),
            };
            // Programs never loaded (the other kind on a tracepoint) report NotLoaded: fine.
            if let Err(e) = result
                && !matches!(e, aya::programs::ProgramError::NotLoaded)
            {
                eprintln!("observer: warning: detaching {name}: {e}");
            }
        }
    }

    /// Takes the perf event array (once), for `perf_ring::open_all`. Keep it (or the rings)
    /// alive until the programs are loaded and for as long as events are read: the programs'
    /// instructions name its fd until they are loaded, and the kernel clears the entries set
    /// through an fd when that fd is closed.
    pub fn take_events(&mut self) -> anyhow::Result<MapData> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .context("map EVENTS is missing from the object")?;
        match map {
            aya::maps::Map::PerfEventArray(data) => Ok(data),
            _ => anyhow::bail!("map EVENTS is not a perf event array"),
        }
    }

    /// Runs the kernel skipped over all of observer's loaded programs: a program that fires on
    /// a CPU where it is already running (an interrupt freeing a packet while the drop program
    /// runs) is not run again, and the kernel counts that in the program's `recursion_misses`,
    /// shown in its fdinfo. 0 when unreadable.
    pub fn missed_runs(&self) -> u64 {
        self.missed_at_detach
            .unwrap_or_else(|| self.missed_runs_now())
    }

    fn missed_runs_now(&self) -> u64 {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        self.ebpf
            .programs()
            .filter_map(|(_, program)| program.fd().ok())
            .filter_map(|fd| {
                let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                std::fs::read_to_string(path).ok()
            })
            .filter_map(|text| fdinfo_value(&text, "recursion_misses"))
            .sum()
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
        // An entry evicted while iterating ends its own lookup with an error: skip it.
        Ok(flows.iter().flatten().collect())
    }

    /// A second, owned handle on the per-flow counters (the loader keeps its own for the
    /// `stop` record), for reconciling exported events with the kernel's exact counts.
    pub fn flow_counters_handle(
        &self,
    ) -> anyhow::Result<BpfHashMap<MapData, FlowKey, FlowCounters>> {
        let map = self
            .ebpf
            .map("FLOW_COUNTERS")
            .context("map FLOW_COUNTERS is missing")?;
        let flows: BpfHashMap<&MapData, FlowKey, FlowCounters> = BpfHashMap::try_from(map)?;
        let id = aya::maps::IterableMap::map(&flows).info()?.id();
        let owned = MapData::from_id(id).context("opening FLOW_COUNTERS by id")?;
        Ok(BpfHashMap::try_from(aya::maps::Map::LruHashMap(owned))?)
    }

    /// A second, owned handle on the peer and listener aggregates, for the output stage's
    /// ratio denominators.
    pub fn services_handle(&self) -> anyhow::Result<BpfHashMap<MapData, ServiceKey, ServiceStats>> {
        let map = self
            .ebpf
            .map("SERVICES")
            .context("map SERVICES is missing")?;
        let services: BpfHashMap<&MapData, ServiceKey, ServiceStats> = BpfHashMap::try_from(map)?;
        let id = aya::maps::IterableMap::map(&services).info()?.id();
        let owned = MapData::from_id(id).context("opening SERVICES by id")?;
        Ok(BpfHashMap::try_from(aya::maps::Map::LruHashMap(owned))?)
    }

    /// A second, owned handle on the per-kind statistics.
    pub fn kind_stats_handle(&self) -> anyhow::Result<PerCpuArray<MapData, KindStats>> {
        let map = self
            .ebpf
            .map("KIND_STATS")
            .context("map KIND_STATS is missing")?;
        let array: PerCpuArray<&MapData, KindStats> = PerCpuArray::try_from(map)?;
        let id = aya::maps::IterableMap::map(&array).info()?.id();
        let owned = MapData::from_id(id).context("opening KIND_STATS by id")?;
        Ok(PerCpuArray::try_from(aya::maps::Map::PerCpuArray(owned))?)
    }

    /// Takes the per-namespace drop counters (once), for the context worker.
    pub fn take_netns_drops(&mut self) -> anyhow::Result<BpfHashMap<MapData, NetnsReason, u64>> {
        let map = self
            .ebpf
            .take_map("NETNS_DROPS")
            .context("map NETNS_DROPS is missing from the object")?;
        let map: BpfHashMap<MapData, NetnsReason, u64> =
            BpfHashMap::try_from(map).context("map NETNS_DROPS is not a hash map")?;
        // A handle of our own keeps the map readable for the `stop` record after the context
        // worker has dropped its handle.
        let id = aya::maps::IterableMap::map(&map).info()?.id();
        let own = MapData::from_id(id).context("opening NETNS_DROPS by id")?;
        self.netns_drops = Some(BpfHashMap::try_from(aya::maps::Map::LruHashMap(own))?);
        Ok(map)
    }

    /// Takes the listener start and end records (once), for the context worker, which deletes
    /// each entry once it has accounted for it.
    pub fn take_listener_changes(
        &mut self,
    ) -> anyhow::Result<BpfHashMap<MapData, ListenerChangeKey, ListenerChange>> {
        let map = self
            .ebpf
            .take_map("LISTENER_CHANGES")
            .context("map LISTENER_CHANGES is missing from the object")?;
        BpfHashMap::try_from(map).context("map LISTENER_CHANGES is not a hash map")
    }

    /// Entries the bounded tables evicted so far. The programs count socket evictions as they
    /// make them; for the LRU maps (`NETNS_DROPS`, `SERVICES`) they are the entries created
    /// less those still there. An eviction loses what the entry held: a followed connection's
    /// start (its close is then not reported), a namespace's drop count (its firewall rules
    /// are then not attributed), or a peer's or listener's connection counts.
    pub fn map_evictions(&self) -> anyhow::Result<MapEvictions> {
        let map = self
            .ebpf
            .map("MAP_STATS")
            .context("map MAP_STATS is missing")?;
        let array: PerCpuArray<&MapData, MapStats> = PerCpuArray::try_from(map)?;
        let (mut sockets, mut netns_created, mut services_created) = (0u64, 0u64, 0u64);
        for s in array.get(&0, 0)?.iter() {
            sockets += s.sockets_evicted;
            netns_created += s.netns_drops_created;
            services_created += s.services_created;
        }
        let live_netns = match &self.netns_drops {
            Some(map) => map.keys().filter(Result::is_ok).count() as u64,
            None => {
                let map = self
                    .ebpf
                    .map("NETNS_DROPS")
                    .context("map NETNS_DROPS is missing")?;
                let map: BpfHashMap<&MapData, NetnsReason, u64> = BpfHashMap::try_from(map)?;
                map.keys().filter(Result::is_ok).count() as u64
            }
        };
        let live_services = self.services()?.len() as u64;
        Ok(MapEvictions {
            sockets,
            netns_drops: netns_created.saturating_sub(live_netns),
            services_created,
            services: services_created.saturating_sub(live_services),
        })
    }

    /// Every peer and listener aggregate in the kernel's `SERVICES` map.
    pub fn services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceStats)>> {
        let map = self
            .ebpf
            .map("SERVICES")
            .context("map SERVICES is missing")?;
        let services: BpfHashMap<&MapData, ServiceKey, ServiceStats> = BpfHashMap::try_from(map)?;
        // An entry evicted while iterating ends its own lookup with an error: skip it.
        Ok(services.iter().flatten().collect())
    }

    /// Reported drops per reason code, summed over CPUs (only non-zero ones).
    pub fn drop_reason_counts(&self) -> anyhow::Result<Vec<(u32, u64)>> {
        let map = self
            .ebpf
            .map("DROP_REASON_COUNTS")
            .context("map DROP_REASON_COUNTS is missing")?;
        let array: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut out = Vec::new();
        for &code in &self.selected_drop_reasons {
            if code >= MAX_DROP_REASONS {
                continue;
            }
            let total: u64 = array.get(&code, 0)?.iter().sum();
            if total > 0 {
                out.push((code, total));
            }
        }
        Ok(out)
    }
}

/// The number after `key:` in a `/proc/PID/fdinfo/FD` text.
fn fdinfo_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == key).then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_values_are_read_by_key() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t17\nprog_id:\t42\n\
                    run_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t3\nverified_insns:\t900\n";
        assert_eq!(fdinfo_value(text, "recursion_misses"), Some(3));
        assert_eq!(fdinfo_value(text, "prog_id"), Some(42));
        // Older kernels have no such line; a malformed value is not a number.
        assert_eq!(fdinfo_value("prog_id:\t42\n", "recursion_misses"), None);
        assert_eq!(
            fdinfo_value("recursion_misses:\tmany\n", "recursion_misses"),
            None
        );
    }

    fn offsets(head: u16, network: u16, transport: u16, dev: u16, iif: u16) -> PacketOffsets {
        PacketOffsets {
            skb_head: head,
            skb_network_header: network,
            skb_transport_header: transport,
            skb_dev: dev,
            skb_iif: iif,
            // Inside the window in the first case; past the other members in the second.
            skb_protocol: iif + 36,
            ..PacketOffsets::default()
        }
    }

    #[test]
    fn the_skb_window_covers_every_member_read() {
        // This kernel's layout (6.18): dev 16, skb_iif 144, headers 182/184, head 192 (and
        // protocol, checked at start-up: inside).
        assert_eq!(
            skb_window(&offsets(192, 184, 182, 16, 144)),
            Some((16, 184))
        );
        // Whatever the order, from the lowest member to the end of the highest.
        assert_eq!(skb_window(&offsets(8, 100, 102, 0, 60)), Some((0, 104)));
        // The protocol is a member too.
        assert_eq!(skb_window(&offsets(8, 100, 102, 0, 96)), Some((0, 134)));
    }

    #[test]
    fn an_skb_window_beyond_the_buffer_is_refused() {
        assert_eq!(skb_window(&offsets(400, 184, 182, 16, 144)), None);
    }
}
