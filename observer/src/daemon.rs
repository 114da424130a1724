//! `observer run`: kernel -> decode -> (aggregate) -> JSON lines, until a signal, a deadline or a
//! closed output.
//!
//! The perf-buffer readers never wait on the output: they decode into a bounded queue and count
//! what does not fit, so a slow consumer costs records (reported), never kernel-side drops.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    sync::mpsc as std_mpsc,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use aya::maps::MapData;
use observer_common::event_kind;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};

use aya::maps::HashMap as BpfHashMap;
use aya::maps::PerCpuArray;
use observer_common::{FlowCounters, FlowKey, KindStats, ServiceKey, ServiceStats, service_role};

use crate::{
    aggregate::{AnomalyEvent, Engine, EngineConfig, PeerKey, Phase},
    analysis::{self, AnomalyRecord, DaemonSurroundings, ReasonCache, SysctlEffectRecord},
    cause::{self, Cause, CauseKind, Evidence},
    clock::BootClock,
    config::{self, Settings},
    context::{
        ContextOptions, ContextRecord, ContextRequest, ContextWorker, OwnerBrief, OwnerCache,
        SharedContext,
    },
    decode::Detail,
    decode::{Event, EventKind, Flow, decode_sample},
    enrich::symbols::KernelSymbols,
    enrich::sysctl,
    kernel::{
        loader::{self, LoadOptions, Loaded, MapEvictions},
        perf_ring::{self, PerfRing, Record},
    },
    reconcile::Reconciler,
    record::{
        EventRecord, FlowRecord, KindTotals, LostRecord, Names, ReasonCount, SCHEMA_VERSION,
        STOP_FLOWS, STOP_SERVICES, StartRecord, StopRecord, SysctlChangeRecord,
    },
    services::{ConnectionDeltas, top_services},
    sink::{
        hangup::HangupWatch,
        json::{JsonLines, SinkError},
    },
};

/// Where a SIGHUP reloads the configuration from.
pub struct Reload {
    /// The settings in force.
    pub current: Settings,
    /// Reads the file again (with the command line's flags on top).
    pub load: Box<dyn Fn() -> Result<Settings, String> + Send>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// Options of `observer run`.
#[derive(Debug)]
pub struct RunOptions {
    pub duration: Option<Duration>,
    pub load: LoadOptions,
    /// Pages per CPU for each perf buffer (a power of two).
    pub perf_pages: usize,
    /// The kernel wakes a perf buffer's reader once per this many samples (1: every sample).
    pub wakeup_events: u32,
    /// Each perf buffer is also drained this often, so that samples short of a wakeup (a slow
    /// trickle with `wakeup_events` > 1) wait at most this long.
    pub flush_interval: Duration,
    /// Decoded records the queue between readers and the output holds.
    pub queue_capacity: usize,
    /// How often the context worker reads counters, listeners, sysctls and rules.
    pub context_interval: Duration,
    /// A connection stuck (no reply, no progress) for this long is reported as stale.
    pub stale_after: Duration,
    /// Table limits and anomaly thresholds.
    pub engine: EngineConfig,
    /// SIGHUP reloads the configuration file from here (none: SIGHUP is ignored with a note).
    pub reload: Option<Reload>,
    /// Prometheus metrics the output stage updates (`--metrics`; none: off).
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// A copy of the output's descriptor, watched for a reader that goes away
    /// (`sink::hangup`): the run then stops at once, not at its next write. None: not watched
    /// (a file, or a writer that is not a descriptor).
    pub watch_output: Option<std::os::fd::OwnedFd>,
    /// The service manager to tell `READY=1` once the programs are attached and the `start`
    /// record is written, and `STOPPING=1` when the run ends (`notify`; none: not asked).
    pub notify: Option<crate::notify::Notifier>,
}

/// What the kernel counted beyond the exported events, per flow and signal, as fed to the
/// engine (so that readers of the stream can count the same: see `Reconciler::for_stream`).
#[derive(Debug, serde::Serialize)]
struct ReconciledRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    flows: Vec<ReconciledFlow>,
}

#[derive(Debug, serde::Serialize)]
struct ReconciledFlow {
    #[serde(flatten)]
    flow: Flow,
    signal: &'static str,
    amount: u64,
    /// The kernel's total for the flow and signal as of the pass: events of theirs whose
    /// `flow_count` is at most this are in `amount` (they were on their way during the pass).
    through: u64,
}

/// Records the daemon could not queue for the output (it fell behind), since the last such
/// record.
#[derive(Debug, serde::Serialize)]
struct UndeliveredRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    count: u64,
    /// Since start.
    total: u64,
}

/// A SIGHUP reload: what changed, what took effect and what needs a restart.
#[derive(Debug, serde::Serialize)]
struct ReloadRecord {
    #[serde(rename = "type")]
    kind: &'static str,
    time: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    applied: Vec<&'static str>,
    /// Changed keys that only take effect after a restart (they are fixed in the loaded
    /// programs or buffers).
    needs_restart: Vec<&'static str>,
}

/// What the readers and the context worker hand to the output loop.
#[derive(Debug)]
enum Incoming {
    Event(Event),
    Lost {
        cpu: u32,
        count: u64,
    },
    /// Boxed: context records are rare and much larger than events.
    Context(Box<ContextRecord>),
}

/// Counters the readers share with the output loop.
#[derive(Debug, Default)]
struct ReaderCounters {
    lost: AtomicU64,
    undelivered: AtomicU64,
    decode_errors: AtomicU64,
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    Duration,
    OutputClosed,
}

impl StopReason {
    fn name(self) -> &'static str {
        match self {
            StopReason::Signal => "signal",
            StopReason::Duration => "duration",
            StopReason::OutputClosed => "output_closed",
        }
    }
}

/// Runs until stopped; returns why it stopped.
pub async fn run<W: Write>(options: RunOptions, out: W) -> anyhow::Result<StopReason> {
    let clock = BootClock::new();
    let engine = Engine::new(options.engine.clone(), BootClock::boot_now_ns())
        .context("invalid anomaly thresholds")?;
    let mut sink = JsonLines::new(out);
    let mut loaded = loader::load(&options.load)?;
    let names = Names {
        drop_reasons: loaded.drop_reasons.clone(),
        reset_reasons: loaded.reset_reasons.clone(),
        symbols: KernelSymbols::load(),
    };

    let counters = Arc::new(ReaderCounters::default());
    let (tx, mut rx) = mpsc::channel(options.queue_capacity);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpus = aya::util::online_cpus()
        .map_err(|(path, e)| anyhow::anyhow!("reading the online CPUs from {path}: {e}"))?;
    // The rings keep the EVENTS map open (the programs are loaded with its fd, and the kernel
    // clears the entries when it closes): they live until the end of `run`.
    let rings = perf_ring::open_all(
        loaded.take_events()?,
        &cpus,
        options.perf_pages,
        options.wakeup_events,
    )?;
    let mut readers = Vec::new();
    for ring in rings {
        readers.push(tokio::spawn(read_cpu(
            ring,
            options.flush_interval,
            tx.clone(),
            stop_rx.clone(),
            Arc::clone(&counters),
        )));
    }
    let context_tx = tx.clone();
    drop(tx);
    let shared_context: SharedContext = SharedContext::default();
    let netfilter_reason = loaded.drop_reasons.code("NETFILTER_DROP");
    let owner_cache = OwnerCache::default();
    let (request_tx, request_rx) = std_mpsc::channel();
    let context = ContextWorker::spawn(
        loaded.take_netns_drops()?,
        netfilter_reason,
        ContextOptions {
            interval: options.context_interval,
            stale_after: options.stale_after,
            stale_every: 5,
        },
        clock,
        Arc::clone(&shared_context),
        Arc::clone(&owner_cache),
        request_rx,
        move |record| {
            context_tx
                .try_send(Incoming::Context(Box::new(record)))
                .is_ok()
        },
    )
    .context("starting the context worker")?;

    // Signals are caught from here on: a SIGINT right after `start` still ends with `stop`.
    let sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Readers are running: attach now, so every exported event lands in a buffer being read.
    loaded.attach_all()?;
    for p in loaded.programs.iter().filter(|p| !p.attached) {
        eprintln!(
            "observer: warning: {} is not attached ({}); its events will be missing",
            p.tracepoint,
            p.error.as_deref().unwrap_or("unknown reason")
        );
    }

    let start = StartRecord {
        kind: "start",
        schema_version: SCHEMA_VERSION,
        observer_version: env!("CARGO_PKG_VERSION"),
        time: clock.now_rfc3339(),
        host: hostname(),
        kernel: kernel_release(),
        programs: loaded.programs.clone(),
        sysctls: sysctl::host_snapshot(),
        export_per_flow: options.load.export_per_flow,
        export_per_cpu: options.load.export_per_cpu,
        perf_pages: options.perf_pages,
        wakeup_events: options.wakeup_events,
        flush_interval_ms: u64::try_from(options.flush_interval.as_millis()).unwrap_or(u64::MAX),
        drop_reasons: loaded
            .selected_drop_reasons
            .iter()
            .map(|c| names.drop_reasons.name(*c))
            .collect(),
    };
    let start_written = sink.write_now(&start);
    let mut out = Output {
        sink,
        clock: &clock,
        names: &names,
        received: BTreeMap::new(),
        engine,
        reasons: ReasonCache::default(),
        shared: Arc::clone(&shared_context),
        pending_effects: Vec::new(),
        anomaly_records: 0,
        reconciler: Reconciler::new(options.load.export_kinds),
        last_reconcile_ns: 0,
        requests: request_tx,
        owners: owner_cache,
        owner_requested: HashSet::new(),
        counters: Arc::clone(&counters),
        reported_undelivered: 0,
        flow_map: match loaded.flow_counters_handle() {
            Ok(map) => Some(map),
            Err(e) => {
                eprintln!(
                    "observer: warning: anomaly rates will count exported events only: {e:#}"
                );
                None
            }
        },
        kind_stats: loaded.kind_stats_handle().ok(),
        metrics: options.metrics.clone(),
        evidence: Evidence::default(),
        unexplained: HashMap::new(),
        services: loaded.services_handle().ok(),
        connections: ConnectionDeltas::default(),
    };
    // The reader of the output leaving is noticed at once (a quiet host may write nothing for
    // a long time), not only when a write fails.
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel();
    let watch = options.watch_output.and_then(|fd| {
        HangupWatch::spawn(fd, move || {
            let _ = gone_tx.send(());
        })
        .map_err(|e| {
            eprintln!("observer: warning: cannot watch the output for a reader that leaves: {e}");
        })
        .ok()
    });
    let output_gone = async {
        // Without a watch the sender is gone at once: that is not a hangup.
        if gone_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let reason = match start_written {
        Err(SinkError::Closed) => StopReason::OutputClosed,
        Err(e) => return Err(e.into()),
        Ok(()) => {
            if let Some(notifier) = &options.notify {
                let attached = loaded.programs.iter().filter(|p| p.attached).count();
                notifier.notify_or_warn(&format!(
                    "READY=1\n{}",
                    crate::notify::status_line(&format!(
                        "{attached} of {} programs attached",
                        loaded.programs.len()
                    ))
                ));
            }
            output_loop(
                &mut rx,
                &mut out,
                options.duration,
                (sigint, sigterm, sighup),
                output_gone,
                options.reload,
            )
            .await?
        }
    };
    drop(watch);
    if let Some(notifier) = &options.notify {
        notifier.notify_or_warn(&format!(
            "STOPPING=1\n{}",
            crate::notify::status_line(&format!("stopping ({})", reason.name()))
        ));
    }

    // Drain: the context worker takes a last reading, readers empty their buffers one last
    // time, then the queue is emptied.
    let context_totals = tokio::task::spawn_blocking(move || context.finish())
        .await
        .unwrap_or_default();
    // Detach first, so nothing is exported after the readers' final drain: every event the
    // kernel counted as exported is then either written or reported lost.
    loaded.detach_all();
    let _ = stop_tx.send(true);
    let mut buffers = Vec::new();
    for reader in readers {
        match tokio::time::timeout(Duration::from_secs(1), reader).await {
            Ok(Ok(Ok(buffer))) => buffers.push(buffer),
            Ok(Ok(Err(e))) => eprintln!("observer: warning: perf reader failed: {e:#}"),
            Ok(Err(e)) => eprintln!("observer: warning: perf reader task failed: {e}"),
            Err(_) => eprintln!("observer: warning: a perf reader did not finish in time"),
        }
    }
    let mut output_open = reason != StopReason::OutputClosed;
    // A program run that began before the detach may still complete its export after it
    // returned: drain until the kernel's exported count is stable and fully accounted for
    // (bounded: at most 50 rounds, a few milliseconds apart).
    for round in 0..50 {
        let exported_before = total_exported(&loaded);
        let (final_tx, mut final_rx) = mpsc::channel(options.queue_capacity);
        for ring in &mut buffers {
            drain(ring, &final_tx, &counters);
        }
        drop(final_tx);
        while let Ok(msg) = rx.try_recv().or_else(|_| final_rx.try_recv()) {
            if output_open {
                output_open = out.handle(msg).is_ok();
            } else if let Incoming::Event(_) = msg {
                // Nowhere to write it: count it, so the totals still add up.
                counters.undelivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        let accounted = out.received.values().sum::<u64>()
            + counters.lost.load(Ordering::Relaxed)
            + counters.undelivered.load(Ordering::Relaxed)
            + counters.decode_errors.load(Ordering::Relaxed);
        let exported_after = total_exported(&loaded);
        if exported_after == exported_before && accounted >= exported_after {
            break;
        }
        if round < 49 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    // The final reconciliation pass (in `finish`) reads the kernel's maps after the detach, so
    // it sees final totals, and before `loaded` is dropped. Events drained above were fed
    // before it, and it feeds only the rest (`reconcile.rs`).
    if output_open {
        output_open = out.finish().is_ok();
    }
    let mut stop = stop_record(&loaded, &names, &counters, &out.received, &clock, reason)?;
    stop.engine = Some(out.engine.stats());
    stop.anomaly_records = out.anomaly_records;
    stop.context_undelivered = context_totals.undelivered;
    stop.listeners = context_totals.listeners;
    stop.netfilter_rules = context_totals.netfilter_rules;
    drop(loaded);
    if output_open {
        if let Err(e) = out.sink.write_now(&stop) {
            report_unwritten_stop(&stop, &e);
        }
    } else {
        report_unwritten_stop(&stop, &SinkError::Closed);
    }
    Ok(reason)
}

/// The output is gone: keep the totals for the operator on stderr rather than losing them.
fn report_unwritten_stop(stop: &StopRecord, why: &SinkError) {
    let totals = serde_json::to_string(stop).unwrap_or_default();
    eprintln!("observer: {why}; the stop record could not be written to the output: {totals}");
}

async fn output_loop<W: Write>(
    rx: &mut mpsc::Receiver<Incoming>,
    out: &mut Output<'_, W>,
    duration: Option<Duration>,
    (mut sigint, mut sigterm, mut sighup): (Signal, Signal, Signal),
    output_gone: impl std::future::Future<Output = ()>,
    mut reload: Option<Reload>,
) -> anyhow::Result<StopReason> {
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    tokio::pin!(output_gone);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => return Ok(StopReason::Signal),
            _ = sigterm.recv() => return Ok(StopReason::Signal),
            () = &mut deadline => return Ok(StopReason::Duration),
            () = &mut output_gone => return Ok(StopReason::OutputClosed),
            _ = sighup.recv() => {
                let record = out.reload(reload.as_mut());
                if let Err(e) = out.sink.write_now(&record) {
                    return closed_or_error(e);
                }
            }
            _ = ticks.tick() => {
                if let Err(e) = out.tick().and_then(|()| out.sink.flush()) {
                    return closed_or_error(e);
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else {
                    anyhow::bail!("every perf reader stopped");
                };
                let batch = std::iter::once(msg).chain(std::iter::from_fn(|| rx.try_recv().ok()));
                for msg in batch.take(4096) {
                    if let Err(e) = out.handle(msg) {
                        return closed_or_error(e);
                    }
                }
                if let Err(e) = out.sink.flush() {
                    return closed_or_error(e);
                }
            }
        }
    }
}

fn closed_or_error(e: SinkError) -> anyhow::Result<StopReason> {
    match e {
        SinkError::Closed => Ok(StopReason::OutputClosed),
        other => Err(other.into()),
    }
}

/// The output stage: everything the records are written with, and the analysis that sees
/// every record on its way out.
struct Output<'a, W: Write> {
    sink: JsonLines<W>,
    clock: &'a BootClock,
    names: &'a Names,
    received: BTreeMap<EventKind, u64>,
    engine: Engine,
    reasons: ReasonCache,
    shared: SharedContext,
    /// sysctl changes waiting for their "after" span to pass: (due boot ns, change).
    pending_effects: Vec<(u64, u64, SysctlChangeRecord)>,
    anomaly_records: u64,
    reconciler: Reconciler,
    last_reconcile_ns: u64,
    /// Asks the context worker for owners and route checks (it may block; we may not).
    requests: std_mpsc::Sender<ContextRequest>,
    owners: OwnerCache,
    /// Flows whose owner was asked for (bounded; cleared when full).
    owner_requested: HashSet<Flow>,
    counters: Arc<ReaderCounters>,
    /// `undelivered` count already reported in the stream.
    reported_undelivered: u64,
    /// Owned handles on the kernel's exact counters, for reconciliation.
    flow_map: Option<BpfHashMap<MapData, FlowKey, FlowCounters>>,
    kind_stats: Option<PerCpuArray<MapData, KindStats>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// What explains anomalies, from every record on its way out.
    evidence: Evidence,
    /// Open anomalies whose cause is not final yet (none, or a rule not named yet), by id,
    /// with what their last record said.
    unexplained: HashMap<u64, Option<CauseKind>>,
    /// The kernel's per-peer aggregates: connections, the denominators of ratio signals.
    services: Option<BpfHashMap<MapData, ServiceKey, ServiceStats>>,
    connections: ConnectionDeltas,
}

/// A cause that may still change into a better one: a firewall drop whose rule the context
/// worker has not named yet.
fn cause_is_provisional(cause: &Cause) -> bool {
    cause.kind == CauseKind::NetfilterRule && cause.evidence["rule"].is_null()
}

/// How often suppressed events are reconciled into the engine.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// How long before and after a sysctl change the affected rates are compared.
const SYSCTL_EFFECT_SPAN: Duration = Duration::from_secs(300);

impl<W: Write> Output<'_, W> {
    fn handle(&mut self, msg: Incoming) -> Result<(), SinkError> {
        match msg {
            Incoming::Event(event) => {
                *self.received.entry(event.kind).or_default() += 1;
                // Written either way; fed to the engine unless a pass already counted it.
                if let Some(obs) =
                    analysis::observation(&event, &self.names.drop_reasons, &mut self.reasons)
                    && let Some(obs) =
                        self.reconciler
                            .admit(obs, event.counting_flow(), event.flow_count)
                {
                    self.engine.observe(event.boot_ns, obs);
                }
                self.ask_for_causes(&event);
                let mut record = EventRecord::new(&event, self.clock, self.names);
                record.owner = self.owner_of(&event.flow);
                self.evidence.note_event(event.boot_ns, &record);
                if let Some(metrics) = &self.metrics {
                    metrics.event(record.kind, record.reason.as_deref());
                    metrics.peer_event(record.daddr, record.kind);
                    if let Some(unit) = record
                        .owner
                        .as_ref()
                        .and_then(|o| o.service.as_ref()?.unit.as_deref())
                    {
                        metrics.unit_event(unit, record.kind);
                    }
                }
                self.sink.write(&record)
            }
            Incoming::Lost { cpu, count } => {
                if let Some(metrics) = &self.metrics {
                    metrics.lost(count);
                }
                self.sink.write(&LostRecord {
                    kind: "lost",
                    time: self.clock.now_rfc3339(),
                    cpu,
                    count,
                })
            }
            Incoming::Context(record) => {
                let record = *record;
                let now = BootClock::boot_now_ns();
                for obs in analysis::context_observations(&record) {
                    self.engine.observe(now, obs);
                }
                self.evidence.note_context(now, &record);
                match record {
                    ContextRecord::ListenerDrops(r) => {
                        if let Some(metrics) = &self.metrics {
                            metrics.listener_drops(
                                r.netns,
                                r.addr,
                                r.port,
                                r.accept_queue_overflows,
                                r.syn_queue_drops,
                            );
                        }
                        self.sink.write(&r)
                    }
                    ContextRecord::NetfilterDrop(r) => self.sink.write(&r),
                    ContextRecord::StaleConnections(r) => {
                        if let Some(metrics) = &self.metrics {
                            let unit = r.group.service.as_ref().and_then(|s| s.unit.as_deref());
                            metrics.stale_connections(unit, r.group.newly_stale);
                        }
                        self.sink.write(&r)
                    }
                    ContextRecord::AsymmetricRoute(r) => self.sink.write(&r),
                    ContextRecord::SysctlChange(r) => {
                        let due = now + SYSCTL_EFFECT_SPAN.as_nanos() as u64;
                        self.pending_effects.push((due, now, r.clone()));
                        self.sink.write(&r)
                    }
                }
            }
        }
    }

    /// The owner of a flow's socket, once the context worker has found it; asks for it
    /// otherwise (the first events of a flow may go out without one).
    fn owner_of(&mut self, flow: &Flow) -> Option<OwnerBrief> {
        let cached = {
            let cache = self.owners.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(flow).cloned()
        };
        match cached {
            Some(owner) => owner,
            None => {
                if self.owner_requested.len() >= 65_536 {
                    self.owner_requested.clear();
                }
                if self.owner_requested.insert(*flow) {
                    let _ = self.requests.send(ContextRequest::Owner(*flow));
                }
                None
            }
        }
    }

    /// Trouble that may come from the reply route: SYN-ACK retransmits (the client never sees
    /// our SYN-ACK) and reverse-path-filter drops.
    fn ask_for_causes(&mut self, event: &Event) {
        let check = match event.detail {
            Detail::Drop {
                reason, ifindex, ..
            } => {
                let name = self.names.drop_reasons.name(reason);
                (name == "IP_RPFILTER").then(|| (Some(ifindex).filter(|i| *i > 0), name))
            }
            _ if event.kind == EventKind::SynackRetransmit => {
                Some((None, "synack_retransmit".to_owned()))
            }
            _ => None,
        };
        if let Some((ifindex, trigger)) = check {
            let _ = self.requests.send(ContextRequest::RouteCheck {
                netns: event.flow.netns,
                peer: event.flow.daddr,
                local: event.flow.saddr,
                ifindex,
                trigger,
            });
        }
    }

    /// Once a second: anomalies open, update and close; due sysctl effects are reported.
    fn tick(&mut self) -> Result<(), SinkError> {
        let now = BootClock::boot_now_ns();
        // Records dropped because this output fell behind: say so once it keeps up again.
        let undelivered = self.counters.undelivered.load(Ordering::Relaxed);
        if undelivered > self.reported_undelivered {
            self.sink.write(&UndeliveredRecord {
                kind: "undelivered",
                time: self.clock.now_rfc3339(),
                count: undelivered - self.reported_undelivered,
                total: undelivered,
            })?;
            if let Some(metrics) = &self.metrics {
                metrics.undelivered(undelivered - self.reported_undelivered);
            }
            self.reported_undelivered = undelivered;
        }
        self.reconcile(now, false)?;
        self.feed_connections(now);
        let events = self.engine.tick(now);
        self.write_anomalies(events)?;
        self.write_new_causes()?;
        self.evidence.expire(now);
        if let Some(metrics) = &self.metrics {
            metrics.anomalies_open(self.engine.stats().open_anomalies);
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_effects)
            .into_iter()
            .partition(|(due, _, _)| *due <= now);
        self.pending_effects = waiting;
        for (_, changed_ns, change) in due {
            self.write_effect(changed_ns, change)?;
        }
        Ok(())
    }

    /// Re-reads the configuration: the old one stays in force when the new one is invalid.
    fn reload(&mut self, reload: Option<&mut Reload>) -> ReloadRecord {
        let mut record = ReloadRecord {
            kind: "config_reload",
            time: self.clock.now_rfc3339(),
            ok: false,
            error: None,
            applied: Vec::new(),
            needs_restart: Vec::new(),
        };
        let Some(reload) = reload else {
            record.error = Some("no configuration file in use".to_owned());
            eprintln!("observer: SIGHUP ignored: no configuration file in use");
            return record;
        };
        let new = match (reload.load)().and_then(|new| {
            let thresholds = config::thresholds(&new.thresholds)?;
            Ok((new, thresholds))
        }) {
            Ok(new) => new,
            Err(e) => {
                eprintln!(
                    "observer: configuration not reloaded, the previous one stays in force: {e}"
                );
                record.error = Some(e);
                return record;
            }
        };
        let (settings, thresholds) = new;
        for key in reload.current.changed_keys(&settings) {
            if key == "thresholds" {
                if let Err(e) = self.engine.set_thresholds(thresholds.clone()) {
                    record.error = Some(e.to_string());
                    return record;
                }
                record.applied.push(key);
            } else {
                record.needs_restart.push(key);
            }
        }
        reload.current = settings;
        record.ok = true;
        eprintln!(
            "observer: configuration reloaded (applied: {:?}; needs a restart: {:?})",
            record.applied, record.needs_restart
        );
        record
    }

    /// Feeds the engine what the kernel counted but did not export (suppressed by budgets).
    fn reconcile(&mut self, now: u64, force: bool) -> Result<(), SinkError> {
        // A pass walks the whole flow map (two syscalls per flow): under a storm that is real
        // CPU, so it runs at most every RECONCILE_EVERY (and once more at shutdown).
        if !force && now.saturating_sub(self.last_reconcile_ns) < RECONCILE_EVERY.as_nanos() as u64
        {
            return Ok(());
        }
        self.last_reconcile_ns = now;
        let Some(stats) = &self.kind_stats else {
            return Ok(());
        };
        let suppressed: u64 = (0..event_kind::COUNT as u32)
            .filter_map(|i| stats.get(&i, 0).ok())
            .flat_map(|per_cpu| per_cpu.iter().map(|s| s.suppressed).collect::<Vec<_>>())
            .sum();
        if !self.reconciler.needed(suppressed) {
            return Ok(());
        }
        let Some(map) = &self.flow_map else {
            return Ok(());
        };
        let flows: Vec<(FlowKey, FlowCounters)> = map.iter().flatten().collect();
        let mut record = ReconciledRecord {
            kind: "reconciled",
            time: self.clock.now_rfc3339(),
            flows: Vec::new(),
        };
        for reconciled in self.reconciler.pass(suppressed, flows) {
            let obs = reconciled.observation;
            if let Some(flow) = obs.flow {
                record.flows.push(ReconciledFlow {
                    flow,
                    signal: obs.signal.name(),
                    amount: obs.amount,
                    through: reconciled.through,
                });
            }
            self.engine.observe(now, obs);
        }
        if record.flows.is_empty() {
            return Ok(());
        }
        // Other views of the stream (observer top) count the same as the daemon's engine.
        self.sink.write(&record)
    }

    fn write_anomalies(&mut self, events: Vec<AnomalyEvent>) -> Result<(), SinkError> {
        let time = self.clock.now_rfc3339();
        for event in events {
            self.anomaly_records += 1;
            if let (Some(metrics), Phase::Open) = (&self.metrics, event.phase) {
                metrics.anomaly_opened(event.anomaly.kind.name());
            }
            let cause = self.explain(&event.anomaly);
            let id = event.anomaly.id;
            if event.phase == Phase::Close {
                self.unexplained.remove(&id);
            } else if cause.as_ref().is_none_or(cause_is_provisional) {
                self.unexplained.insert(id, cause.as_ref().map(|c| c.kind));
            } else {
                self.unexplained.remove(&id);
            }
            self.sink.write(&AnomalyRecord::new(
                event,
                time.clone(),
                &self.shared,
                cause,
            ))?;
        }
        Ok(())
    }

    fn explain(&self, anomaly: &crate::aggregate::AnomalySnapshot) -> Option<Cause> {
        let around = DaemonSurroundings {
            shared: &self.shared,
            engine: &self.engine,
        };
        cause::explain(&self.evidence, anomaly, &around)
    }

    /// An open anomaly whose cause was not known (or not final) when it was last written gets
    /// an `anomaly_update` as soon as evidence explains it, not at its next update interval.
    fn write_new_causes(&mut self) -> Result<(), SinkError> {
        if self.unexplained.is_empty() {
            return Ok(());
        }
        let mut updates = Vec::new();
        for anomaly in self.engine.open_anomalies() {
            let Some(said) = self.unexplained.get(&anomaly.id) else {
                continue;
            };
            let Some(cause) = self.explain(&anomaly) else {
                continue;
            };
            if *said != Some(cause.kind) || !cause_is_provisional(&cause) {
                updates.push(AnomalyEvent {
                    phase: Phase::Update,
                    anomaly,
                });
            }
        }
        self.write_anomalies(updates)
    }

    /// Feeds the engine the connections each troubled peer made since the last reading (the
    /// denominators of ratio signals). Read every second, trouble or not, so that a peer's
    /// first failure is set against the connections of the same second; the map has an entry
    /// per peer and listener, not per connection, so this costs two syscalls per service.
    fn feed_connections(&mut self, now: u64) {
        let Some(map) = &self.services else {
            return;
        };
        let readings = map
            .iter()
            .flatten()
            .filter(|(key, _)| key.role == service_role::PEER)
            .map(|(key, stats)| {
                let peer = PeerKey {
                    netns: key.netns,
                    addr: crate::decode::unmap(key.addr),
                };
                let attempts = stats.established + stats.refused + stats.timed_out;
                (peer, key.port, attempts)
            });
        for (peer, connections) in self.connections.update(now, readings) {
            if self.engine.has_peer(&peer) {
                self.engine.observe_connections(now, peer, connections);
            }
        }
    }

    fn write_effect(
        &mut self,
        changed_ns: u64,
        change: SysctlChangeRecord,
    ) -> Result<(), SinkError> {
        let span = SYSCTL_EFFECT_SPAN.as_nanos() as u64;
        let rates = analysis::signals_affected_by(&change.name)
            .iter()
            .map(|signal| {
                (
                    signal.name(),
                    self.engine.rate_before_after(*signal, changed_ns, span),
                )
            })
            .collect();
        self.sink.write(&SysctlEffectRecord {
            kind: "sysctl_effect",
            time: self.clock.now_rfc3339(),
            netns: change.netns,
            name: change.name,
            old: change.old,
            new: change.new,
            changed_at: self.clock.rfc3339(changed_ns),
            span_secs: SYSCTL_EFFECT_SPAN.as_secs(),
            rates,
        })
    }

    /// At shutdown: open anomalies close, pending sysctl comparisons are reported as far as
    /// they got.
    fn finish(&mut self) -> Result<(), SinkError> {
        let now = BootClock::boot_now_ns();
        self.reconcile(now, true)?;
        let events = self.engine.close_all(now);
        self.write_anomalies(events)?;
        for (_, changed_ns, change) in std::mem::take(&mut self.pending_effects) {
            self.write_effect(changed_ns, change)?;
        }
        Ok(())
    }
}

/// Reads one CPU's perf buffer until told to stop, then hands the buffer back for the final
/// drains. It drains when the kernel wakes it (every `wakeup_events` samples) and every
/// `flush_interval`, so a trickle of samples short of a wakeup is not held back.
async fn read_cpu(
    ring: PerfRing,
    flush_interval: Duration,
    tx: mpsc::Sender<Incoming>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<ReaderCounters>,
) -> anyhow::Result<PerfRing> {
    let cpu = ring.cpu();
    // SAFETY: the ring owns its perf event fd, keeps it open until it is dropped, and always
    // returns the same one; the AsyncFd owns the ring for its whole life (`drain` through
    // `get_mut` reads the ring, never replaces it).
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut fd = registered.map_err(|e| {
        anyhow::anyhow!("polling the perf buffer of CPU {cpu}: {}", e.into_parts().1)
    })?;
    let mut flush = tokio::time::interval(flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &tx, &counters);
                guard.clear_ready();
            }
            _ = flush.tick() => {
                if fd.get_ref().readable() {
                    drain(fd.get_mut(), &tx, &counters);
                }
            }
            _ = stop.changed() => {
                // The final drains happen in `run`, after the programs are detached.
                return Ok(fd.into_inner());
            }
        }
    }
}

/// Events the kernel handed to the perf buffers so far, all kinds.
fn total_exported(loaded: &Loaded) -> u64 {
    loaded
        .kind_stats()
        .map(|stats| stats.iter().map(|s| s.exported).sum())
        .unwrap_or(0)
}

fn drain(ring: &mut PerfRing, tx: &mpsc::Sender<Incoming>, counters: &ReaderCounters) {
    let cpu = ring.cpu();
    let read = ring.read(|record| {
        let msg = match record {
            Record::Sample(bytes) => match decode_sample(bytes) {
                Ok(event) => Incoming::Event(event),
                Err(_) => {
                    counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            Record::Lost { count } => {
                counters.lost.fetch_add(count, Ordering::Relaxed);
                Incoming::Lost { cpu, count }
            }
        };
        // Only events count as undelivered: a dropped `lost` notice is already in `lost`.
        if let Err(e) = tx.try_send(msg)
            && matches!(e.into_inner(), Incoming::Event(_))
        {
            counters.undelivered.fetch_add(1, Ordering::Relaxed);
        }
    });
    // Malformed ring records: samples that never became events.
    if read.errors > 0 {
        counters
            .decode_errors
            .fetch_add(read.errors, Ordering::Relaxed);
    }
}

/// The kernel kinds in the stop record's totals, by record name.
const KERNEL_KINDS: [(u8, &str); 10] = [
    (event_kind::RETRANSMIT, "retransmit"),
    (event_kind::SYN_RETRANSMIT, "syn_retransmit"),
    (event_kind::SYNACK_RETRANSMIT, "synack_retransmit"),
    (event_kind::DROP, "drop"),
    (event_kind::RESET_SENT, "reset_sent"),
    (event_kind::RESET_RECEIVED, "reset_received"),
    (event_kind::CONNECT, "connect"),
    (event_kind::CONNECT_FAILED, "connect_failed"),
    (event_kind::ACCEPT, "accept"),
    (event_kind::CLOSE, "close"),
];

fn stop_record(
    loaded: &Loaded,
    names: &Names,
    counters: &ReaderCounters,
    received: &BTreeMap<EventKind, u64>,
    clock: &BootClock,
    reason: StopReason,
) -> anyhow::Result<StopRecord> {
    let stats = loaded.kind_stats()?;
    // Slot 0 counts flow entries the kernel created; the LRU map evicted those not live now.
    let flows_created = stats[0].counted;
    // Not worth losing the whole record over: said on stderr instead.
    let evictions = loaded.map_evictions().unwrap_or_else(|e| {
        eprintln!("observer: warning: cannot count the kernel maps' evictions: {e:#}");
        MapEvictions::default()
    });
    let services = loaded.services().unwrap_or_else(|e| {
        eprintln!("observer: warning: cannot read the peer and listener aggregates: {e:#}");
        Vec::new()
    });
    let (services, services_omitted) = top_services(&services, STOP_SERVICES);
    let mut totals = BTreeMap::new();
    for (kind, name) in KERNEL_KINDS {
        let s = stats[usize::from(kind)];
        totals.insert(
            name,
            KindTotals {
                events: s.seen,
                counted: s.counted,
                exported: s.exported,
                suppressed: s.suppressed,
                map_full: s.map_full,
                received: received
                    .iter()
                    .filter(|(k, _)| k.kernel_kind() == kind)
                    .map(|(_, n)| n)
                    .sum(),
            },
        );
    }
    let mut flows: Vec<FlowRecord> = loaded
        .flow_counters()?
        .into_iter()
        .map(|(key, c)| {
            let Flow {
                family,
                saddr,
                sport,
                daddr,
                dport,
                netns,
            } = Flow::from_key(&key);
            FlowRecord {
                // Port 0 is not a TCP port: it marks the key's wildcard side.
                key: if sport == 0 || dport == 0 {
                    "handshake"
                } else {
                    "flow"
                },
                family,
                saddr,
                sport,
                daddr,
                dport,
                netns,
                retransmit_segs: c.retrans_segs,
                retransmit_skbs: c.retrans_skbs,
                retransmit_failed: c.retrans_failed,
                syn_retransmits: c.syn_retrans,
                synack_retransmits: c.synack_retrans,
                drops: c.drops,
                resets_sent: c.resets_sent,
                resets_received: c.resets_received,
                connects: c.connects,
                connects_refused: c.connects_refused,
                connects_timed_out: c.connects_timed_out,
                suppressed: c.suppressed,
            }
        })
        .collect();
    let flows_held = flows.len() as u64;
    // The most trouble first; ties in address order, so that a record is reproducible.
    flows.sort_by(|a, b| {
        b.trouble().cmp(&a.trouble()).then_with(|| {
            (a.saddr, a.sport, a.daddr, a.dport, a.netns)
                .cmp(&(b.saddr, b.sport, b.daddr, b.dport, b.netns))
        })
    });
    flows.truncate(STOP_FLOWS);
    Ok(StopRecord {
        kind: "stop",
        time: clock.now_rfc3339(),
        reason: reason.name(),
        totals,
        lost: counters.lost.load(Ordering::Relaxed),
        undelivered: counters.undelivered.load(Ordering::Relaxed),
        decode_errors: counters.decode_errors.load(Ordering::Relaxed),
        context_undelivered: 0,
        missed_runs: loaded.missed_runs(),
        flows_created,
        flows_evicted: flows_created.saturating_sub(flows_held),
        sockets_evicted: evictions.sockets,
        netns_drops_evicted: evictions.netns_drops,
        drop_reasons: loaded
            .drop_reason_counts()?
            .into_iter()
            .map(|(code, count)| ReasonCount {
                reason: names.drop_reasons.name(code),
                code,
                count,
            })
            .collect(),
        flows_omitted: flows_held - flows.len() as u64,
        flows,
        services,
        services_omitted,
        services_evicted: evictions.services,
        listeners: Vec::new(),
        netfilter_rules: Vec::new(),
        engine: None,
        anomaly_records: 0,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
