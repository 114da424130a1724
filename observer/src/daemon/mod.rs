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

mod output;
mod readers;
mod stop;

use self::{
    output::Output,
    readers::{drain, read_cpu, total_exported},
    stop::{hostname, kernel_release, stop_record},
};
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
        loaded.take_listener_changes()?,
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
