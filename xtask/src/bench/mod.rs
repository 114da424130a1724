//! `cargo xtask bench`: measures what observer costs, in one run, and writes BENCHMARKS.md.
//!
//! 1. Kernel cost per event: `kernel.bpf_stats_enabled=1`, run_time_ns / run_cnt of observer's
//!    own programs (found by the `prog_id:` lines of /proc/<observer>/fdinfo/*), as deltas over
//!    a refused-connect storm (loopback, in a bench namespace) and a retransmit storm (two
//!    namespaces joined by veth, 20% of inbound data segments dropped by iptables), with the
//!    default options and with one-by-one export.
//! 2. Host slowdown: the refused storm's own rate with and without observer (stats off), and
//!    in alternated rounds beside the floors (empty programs loaded with bpf(2), and counting
//!    bpftrace programs).
//! 3. Userspace decode + aggregation throughput on one core, and 4. its memory
//!    (`observer/examples/pipeline_bench.rs`).
//! 5. Start-up: spawn to `start` record.
//! 6. The web workload (issue 14): nginx on loopback with one connection per request, loaded
//!    by wrk, in alternated rounds beside empty programs on the same tracepoints (classic and
//!    raw) and libbpf-tools tcpstates: throughput (stats off), BPF ns per request per program,
//!    the daemon's CPU per request and RSS (stats on).
//!
//! `--only` runs some of these (e.g. `--only web`); the default is all of them.
//!
//! Plus the other tools (bcc, bpftrace, libbpf-tools): do they start here, and what do the ones
//! that start cost on the same storm.
//!
//! Traffic stays on loopback or inside namespaces this command creates (no route out). Every
//! wait has a deadline, every loop a bound; namespaces (with their iptables rules), the
//! `kernel.bpf_stats_enabled` sysctl and the processes started here are cleaned up by guards,
//! on errors and on Ctrl-C too.
use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    cmd::{self, cargo, is_root, run},
    setup::setup,
};

mod empty_programs;
mod harness;
mod pipeline;
mod refused;
mod report;
mod retrans;
mod startup;
mod stats;
mod tools;
mod web;

use harness::{BpfStats, install_signal_handlers, read_trimmed, remove_stale_namespaces};
use pipeline::measure_pipeline;
use refused::measure_alternated;
use refused::measure_refused;
use report::Report;
use retrans::measure_retrans;
use startup::measure_startup;
use tools::measure_tools;
use web::measure_web;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Runs of each observer measurement (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub runs: u32,
    /// Seconds per storm window.
    #[arg(long, default_value_t = 3.0, value_parser = parse_storm_secs)]
    pub storm_secs: f64,
    /// Alternated rounds of the slowdown comparison (no observer, observer, the two floors).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Leave out the other tools (bcc, bpftrace, libbpf-tools).
    #[arg(long)]
    pub no_tools: bool,
    /// Do not apt-get install missing comparison tools (report them as not installed).
    #[arg(long)]
    pub no_install: bool,
    /// Report file (default: BENCHMARKS.md in the workspace root; with --only,
    /// target/bench/BENCHMARKS-only.md, so that a partial run leaves BENCHMARKS.md alone).
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Run only these workloads (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "WORKLOAD")]
    pub only: Vec<Workload>,
}

/// The workloads of one bench run, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Workload {
    /// 5. Start-up: spawn to `start` record.
    Startup,
    /// 3, 4. Userspace decode + aggregation throughput, and memory with 100,000 flows.
    #[value(alias = "memory", alias = "userspace")]
    Pipeline,
    /// 1, 2. Refused-connect storm: kernel cost per event, host slowdown.
    Refused,
    /// 1b. Retransmit storm: kernel cost per event.
    Retrans,
    /// The other tools (bcc, bpftrace, libbpf-tools) on the refused storm.
    Tools,
    /// 2. Alternated rounds of the refused storm beside the floors.
    Alternated,
    /// 6. nginx + wrk, one connection per request.
    Web,
}

impl Workload {
    const ALL: [Workload; 7] = [
        Workload::Startup,
        Workload::Pipeline,
        Workload::Refused,
        Workload::Retrans,
        Workload::Tools,
        Workload::Alternated,
        Workload::Web,
    ];
}

impl BenchArgs {
    /// The workloads to run: `--only`'s, or all of them.
    fn workloads(&self) -> BTreeSet<Workload> {
        if self.only.is_empty() {
            Workload::ALL.into_iter().collect()
        } else {
            self.only.iter().copied().collect()
        }
    }
}

fn parse_storm_secs(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.5..=30.0).contains(&secs) {
        Ok(secs)
    } else {
        Err("must be between 0.5 and 30 seconds".to_owned())
    }
}

// Targets.
const TARGET_NS_PER_EVENT: f64 = 400.0;
const TARGET_SLOWDOWN_PCT: f64 = 3.0;
const TARGET_EVENTS_PER_SEC: f64 = 2_000_000.0;
const TARGET_RSS_MIB: f64 = 64.0;
const TARGET_STARTUP_SECS: f64 = 1.0;
/// Web workload: BPF ns per request at most this many times the empty classic programs'.
const TARGET_WEB_FLOOR_RATIO: f64 = 2.0;
/// Web workload: the daemon's own CPU (utime + stime) per request.
const TARGET_WEB_DAEMON_NS: f64 = 300.0;
/// Programs with fewer events than this per window are shown but not judged (too few to time).
const MIN_EVENTS_JUDGED: u64 = 1_000;

const STARTUP_RUNS: usize = 5;
const PIPELINE_EVENTS: u64 = 5_000_000;
const PIPELINE_FLOWS: u32 = 100_000;
const RETRANS_PORT: u16 = 5001;
const RETRANS_DROP_PROBABILITY: &str = "0.2";
const RETRANS_CONNS: u32 = 16;
/// Load generators and the pipeline benchmark run at this nice value, so that other work on a
/// busy machine disturbs their rates less (observer itself runs at normal priority).
const STORM_NICE: &str = "-10";
/// Longest an observer may take to write `start` before the bench gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long another tool may take to start (the brief's `timeout 10`).
const TOOL_START_TIMEOUT: Duration = Duration::from_secs(10);
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// One-by-one export: every event exported (no budgets, every kind) and the reader woken for
/// each (`--wakeup-events 1`, as aya's own perf buffers do).
const ONE_BY_ONE_ARGS: &[&str] = &[
    "--export-per-flow",
    "0",
    "--export-per-cpu",
    "0",
    "--export-kinds",
    "all",
    "--wakeup-events",
    "1",
];

fn say(message: &str) {
    eprintln!("bench: {message}");
}

// ---------------------------------------------------------------------------------------------
// Entry point

pub fn bench(args: &BenchArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "cargo xtask bench needs root: it loads eBPF programs, creates network namespaces and \
             sets kernel.bpf_stats_enabled. Run it as root (e.g. `sudo -E cargo xtask bench`)"
        );
    }
    install_signal_handlers();
    setup()?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "observer",
        "--bins",
        "--examples",
    ]))?;
    let release = cmd::target_dir().join("release");
    let bins = Bins {
        observer: release.join("observer"),
        storm: release.join("examples").join("storm"),
        pipeline: release.join("examples").join("pipeline_bench"),
        logs: cmd::target_dir().join("bench"),
    };
    for bin in [&bins.observer, &bins.storm, &bins.pipeline] {
        ensure!(bin.exists(), "{} was not built", bin.display());
    }
    fs::create_dir_all(&bins.logs).with_context(|| format!("creating {}", bins.logs.display()))?;
    remove_stale_namespaces();

    let began = Instant::now();
    let machine = Machine::read();
    say(&format!(
        "machine: {} ({} cores, {:.1} GiB), kernel {}; load average {}",
        machine.cpu_model, machine.cores, machine.memory_gib, machine.kernel, machine.load_start
    ));
    if machine.load1 > 1.0 {
        say("warning: the machine is busy (load average above 1): numbers will be noisy");
    }
    let stats = BpfStats::take()?;
    let mut report = Report {
        machine,
        args_runs: args.runs,
        storm_secs: args.storm_secs,
        ..Report::default()
    };

    let workloads = args.workloads();
    report.workloads = workloads.clone();
    let count = workloads.len() + 1;
    let mut step = 0;
    let mut next = |what: &str| {
        step += 1;
        say(&format!("[{step}/{count}] {what}"));
    };
    for workload in &workloads {
        match workload {
            Workload::Startup => {
                next("start-up: spawn to `start` record");
                report.startup = measure_startup(&bins)?;
            }
            Workload::Pipeline => {
                next("userspace: decode + aggregation on one core");
                report.pipeline = measure_pipeline(&bins)?;
            }
            Workload::Refused => {
                next("refused-connect storm: observer default / one-by-one / none");
                report.refused = measure_refused(&bins, args, &stats)?;
            }
            Workload::Retrans => {
                next("retransmit storm: observer default / one-by-one");
                report.retrans = measure_retrans(&bins, args, &stats)?;
            }
            Workload::Tools if args.no_tools => next("other tools: skipped (--no-tools)"),
            Workload::Tools => {
                next("other tools: bcc, bpftrace, libbpf-tools");
                report.tools = measure_tools(&bins, args, &stats)?;
            }
            Workload::Alternated => {
                next(&format!(
                    "slowdown in {} alternated rounds: none / observer / floors",
                    args.rounds
                ));
                (report.alternated_none, report.alternated) =
                    measure_alternated(&bins, args, &stats)?;
            }
            Workload::Web => {
                next(&format!(
                    "web workload in {} alternated rounds: none / observer / empty programs / tcpstates",
                    args.rounds
                ));
                report.web = measure_web(&bins, args, &stats)?;
            }
        }
    }
    drop(stats);
    report.machine.load_end = read_trimmed("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    report.elapsed = began.elapsed();

    next("report");
    let markdown = report.render();
    print!("{markdown}");
    let output = args.output.clone().unwrap_or_else(|| {
        if args.only.is_empty() {
            cmd::workspace_root().join("BENCHMARKS.md")
        } else {
            bins.logs.join("BENCHMARKS-only.md")
        }
    });
    fs::write(&output, &markdown).with_context(|| format!("writing {}", output.display()))?;
    say(&format!(
        "wrote {} (measured in {:.0} s)",
        output.display(),
        report.elapsed.as_secs_f64()
    ));
    Ok(())
}

struct Bins {
    observer: PathBuf,
    storm: PathBuf,
    pipeline: PathBuf,
    /// target/bench: observer stderr logs.
    logs: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// Machine

#[derive(Debug, Default)]
struct Machine {
    cpu_model: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    virtual_machine: bool,
    date: String,
    commit: String,
    load_start: String,
    load1: f64,
    load_end: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
        let virtual_machine = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        let memory_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|kib| kib.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        let load = read_trimmed("/proc/loadavg").unwrap_or_default();
        let load1 = load
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0);
        let git =
            |args: &[&str]| cmd::probe(cmd::command("git").args(args)).map(|s| s.trim().to_owned());
        let commit = match git(&["rev-parse", "--short", "HEAD"]) {
            Some(hash) => {
                let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                    .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{hash} + uncommitted changes")
                } else {
                    hash
                }
            }
            None => "unknown".to_owned(),
        };
        Machine {
            cpu_model,
            cores: thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            kernel: read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default(),
            virtual_machine,
            date: cmd::probe(cmd::command("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            commit,
            load_start: load
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            load1,
            load_end: String::new(),
        }
    }
}
