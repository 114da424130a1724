//! `cargo xtask bench`: measures what observer costs, in one run, and writes BENCHMARKS.md.
//!
//! 1. Kernel cost per event: `kernel.bpf_stats_enabled=1`, run_time_ns / run_cnt of observer's
//!    own programs (found by the `prog_id:` lines of /proc/<observer>/fdinfo/*), as deltas over
//!    a refused-connect storm (loopback, in a bench namespace) and a retransmit storm (two
//!    namespaces joined by veth, 20% of inbound data segments dropped by iptables), with the
//!    default options and with one-by-one export.
//! 2. Host slowdown: the refused storm's own rate with and without observer (stats off), and
//!    in alternated rounds beside the floors (empty and counting bpftrace programs).
//! 3. Userspace decode + aggregation throughput on one core, and 4. its memory
//!    (`observer/examples/pipeline_bench.rs`).
//! 5. Start-up: spawn to `start` record.
//!
//! Plus the other tools (bcc, bpftrace, libbpf-tools): do they start here, and what do the ones
//! that start cost on the same storm.
//!
//! Traffic stays on loopback or inside namespaces this command creates (no route out). Every
//! wait has a deadline, every loop a bound; namespaces (with their iptables rules), the
//! `kernel.bpf_stats_enabled` sysctl and the processes started here are cleaned up by guards,
//! on errors and on Ctrl-C too.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{
    cmd::{self, cargo, find_program, is_root, run},
    setup::setup,
};

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
    /// Report file (default: BENCHMARKS.md in the workspace root).
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,
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

    say("[1/7] start-up: spawn to `start` record");
    report.startup = measure_startup(&bins)?;
    say("[2/7] userspace: decode + aggregation on one core");
    report.pipeline = measure_pipeline(&bins)?;
    say("[3/7] refused-connect storm: observer default / one-by-one / none");
    report.refused = measure_refused(&bins, args, &stats)?;
    say("[4/7] retransmit storm: observer default / one-by-one");
    report.retrans = measure_retrans(&bins, args, &stats)?;
    if args.no_tools {
        say("[5/7] other tools: skipped (--no-tools)");
    } else {
        say("[5/7] other tools: bcc, bpftrace, libbpf-tools");
        report.tools = measure_tools(&bins, args, &stats)?;
    }
    say(&format!(
        "[6/7] slowdown in {} alternated rounds: none / observer / floors",
        args.rounds
    ));
    (report.alternated_none, report.alternated) = measure_alternated(&bins, args, &stats)?;
    drop(stats);
    report.machine.load_end = read_trimmed("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    report.elapsed = began.elapsed();

    say("[7/7] report");
    let markdown = report.render();
    print!("{markdown}");
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| cmd::workspace_root().join("BENCHMARKS.md"));
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
// Ctrl-C: stop waiting, unwind, let the guards clean up.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps, failing when interrupted.
fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

fn send_signal(pid: u32, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A child this command started: stopped (its stop signal, a grace period, then SIGKILL) and
/// reaped on drop.
struct Proc {
    child: Option<Child>,
    pid: u32,
    stop_signal: i32,
}

impl Proc {
    fn new(child: Child, stop_signal: i32) -> Self {
        Self {
            pid: child.id(),
            child: Some(child),
            stop_signal,
        }
    }

    /// The exit status, if it has exited (reaped then).
    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        send_signal(self.pid, self.stop_signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Keeps the last `limit` bytes a pipe delivers.
fn read_tail(mut pipe: impl Read + Send + 'static, limit: usize) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * limit {
                        kept.drain(..kept.len() - limit);
                    }
                }
            }
        }
        if kept.len() > limit {
            kept.drain(..kept.len() - limit);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// Drains a child's stdout line by line: the first line (and when it arrived) goes through a
/// channel at once; at the end, the number of lines and the last one.
struct Lines {
    first: mpsc::Receiver<(Instant, String)>,
    rest: JoinHandle<(u64, String)>,
}

fn read_lines(pipe: impl Read + Send + 'static) -> Lines {
    let (tx, rx) = mpsc::channel();
    let rest = thread::spawn(move || {
        let mut reader = BufReader::with_capacity(1 << 20, pipe);
        let mut line = String::new();
        let mut last = String::new();
        let mut count = 0u64;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if count == 0 {
                        let _ = tx.send((Instant::now(), line.clone()));
                    }
                    count += 1;
                    std::mem::swap(&mut line, &mut last);
                }
            }
        }
        (count, last)
    });
    Lines { first: rx, rest }
}

/// Runs a command to its end with a deadline (killed when it passes): (status, stdout, stderr).
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    check_interrupted()?;
    run_until(cmd, timeout, true)
}

/// [`run_bounded`] for clean-up: runs even after Ctrl-C.
fn run_cleanup(cmd: &mut Command) -> Result<()> {
    let shown = cmd::display(cmd);
    let (status, _, stderr) = run_until(cmd, CMD_TIMEOUT, false)?;
    ensure!(
        status.success(),
        "{shown} failed ({status}): {}",
        stderr.trim()
    );
    Ok(())
}

fn run_until(
    cmd: &mut Command,
    timeout: Duration,
    interruptible: bool,
) -> Result<(ExitStatus, String, String)> {
    let shown = cmd::display(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start: {shown}"))?;
    let stdout = child.stdout.take().map(|p| read_tail(p, 1 << 20));
    let stderr = child.stderr.take().map(|p| read_tail(p, 16 * 1024));
    let mut proc = Proc::new(child, libc::SIGKILL);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = proc.exited() {
            break status;
        }
        if interruptible && INTERRUPTED.load(Ordering::SeqCst) {
            drop(proc);
            bail!("interrupted while running: {shown}");
        }
        if Instant::now() >= deadline {
            drop(proc);
            bail!("did not finish within {timeout:?} (killed): {shown}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let join = |h: Option<JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok((status, join(stdout), join(stderr)))
}

/// [`run_bounded`], failing unless the command succeeded; returns its stdout.
fn run_checked(cmd: &mut Command) -> Result<String> {
    let shown = cmd::display(cmd);
    let (status, stdout, stderr) = run_bounded(cmd, CMD_TIMEOUT)?;
    ensure!(
        status.success(),
        "{shown} failed ({status}): {}",
        stderr.trim()
    );
    Ok(stdout)
}

/// The last line of a program's stdout, as JSON.
fn last_json(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("no output"))?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// kernel.bpf_stats_enabled

/// Owns `kernel.bpf_stats_enabled` for the bench: restores the value it found on drop.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn take() -> Result<Self> {
        let previous = read_trimmed(BPF_STATS)
            .ok_or_else(|| anyhow!("cannot read {BPF_STATS}: no BPF run-time statistics"))?;
        let stats = Self { previous };
        stats.set(false)?;
        Ok(stats)
    }

    fn set(&self, on: bool) -> Result<()> {
        fs::write(BPF_STATS, if on { "1\n" } else { "0\n" })
            .with_context(|| format!("writing {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, format!("{}\n", self.previous)) {
            eprintln!(
                "bench: could not restore {BPF_STATS} to {}: {e}",
                self.previous
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BPF program statistics of a process

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ProgCounters {
    run_time_ns: u64,
    run_cnt: u64,
}

/// The programs a process holds (by id), with their run-time counters. Program fds carry
/// `run_time_ns`/`run_cnt` in their fdinfo; link fds only name the `prog_id`: for a program held
/// only through a link, the counters come from `bpftool prog show`.
fn prog_counters(pid: u32) -> Result<BTreeMap<u32, ProgCounters>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut progs: BTreeMap<u32, Option<ProgCounters>> = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        // fds come and go: an unreadable entry is not an error.
        let Ok(info) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let Some(id) = field("prog_id:").and_then(|id| u32::try_from(id).ok()) else {
            continue;
        };
        match (field("run_time_ns:"), field("run_cnt:")) {
            (Some(run_time_ns), Some(run_cnt)) => {
                progs.insert(
                    id,
                    Some(ProgCounters {
                        run_time_ns,
                        run_cnt,
                    }),
                );
            }
            _ => {
                progs.entry(id).or_insert(None);
            }
        }
    }
    Ok(progs
        .into_iter()
        .map(|(id, counters)| (id, counters.unwrap_or_else(|| bpftool_counters(id))))
        .collect())
}

/// `bpftool -j prog show id N`: its JSON object (None when bpftool is missing or fails).
fn bpftool_prog(id: u32) -> Option<Value> {
    let bpftool = find_program("bpftool")?;
    let out =
        run_checked(Command::new(bpftool).args(["-j", "prog", "show", "id", &id.to_string()]))
            .ok()?;
    serde_json::from_str(&out).ok()
}

fn bpftool_counters(id: u32) -> ProgCounters {
    let v = bpftool_prog(id).unwrap_or(Value::Null);
    ProgCounters {
        run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
        run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
    }
}

/// Program names by id (`bpftool prog show`; `prog N` when bpftool cannot tell).
fn prog_names(ids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, String> {
    ids.into_iter()
        .map(|id| {
            let name = bpftool_prog(id)
                .and_then(|v| v["name"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("prog {id}"));
            (id, name)
        })
        .collect()
}

/// Per-program deltas over a window, by program name.
type ProgDeltas = BTreeMap<String, ProgCounters>;

fn deltas(
    before: &BTreeMap<u32, ProgCounters>,
    after: &BTreeMap<u32, ProgCounters>,
    names: &BTreeMap<u32, String>,
) -> ProgDeltas {
    let mut out = ProgDeltas::new();
    for (id, a) in after {
        let b = before.get(id).copied().unwrap_or_default();
        let name = names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("prog {id}"));
        let entry = out.entry(name).or_default();
        entry.run_time_ns += a.run_time_ns.saturating_sub(b.run_time_ns);
        entry.run_cnt += a.run_cnt.saturating_sub(b.run_cnt);
    }
    out
}

fn total(deltas: &ProgDeltas) -> ProgCounters {
    deltas
        .values()
        .fold(ProgCounters::default(), |acc, d| ProgCounters {
            run_time_ns: acc.run_time_ns + d.run_time_ns,
            run_cnt: acc.run_cnt + d.run_cnt,
        })
}

fn ns_per_event(c: ProgCounters) -> Option<f64> {
    (c.run_cnt > 0).then(|| c.run_time_ns as f64 / c.run_cnt as f64)
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// A network namespace this command created (`ip netns add`), deleted on drop with everything
/// in it (veth ends, iptables rules, sysctls).
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// `ip netns exec NAME program args...` (ip execs the program: the child's pid is its pid).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_cleanup(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("bench: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

const NETNS_PREFIX: &str = "obench-";

fn netns_name(role: &str) -> String {
    format!("{NETNS_PREFIX}{}-{role}", std::process::id())
}

/// Deletes namespaces left by an earlier bench that was killed (its pid no longer runs).
fn remove_stale_namespaces() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            say(&format!("removing stale namespace {name}"));
            let _ = run_cleanup(Command::new("ip").args(["netns", "del", &name]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// observer under test

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Export {
    Default,
    OneByOne,
}

impl Export {
    fn args(self) -> &'static [&'static str] {
        match self {
            Export::Default => &[],
            Export::OneByOne => ONE_BY_ONE_ARGS,
        }
    }
}

struct Observer {
    proc: Proc,
    lines: Option<Lines>,
    names: BTreeMap<u32, String>,
    /// Spawn to `start` record.
    startup: Duration,
    start: Value,
}

impl Observer {
    fn start(bins: &Bins, export: Export, tag: &str) -> Result<Self> {
        check_interrupted()?;
        let log = bins.logs.join(format!("observer-{tag}.stderr"));
        let stderr =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(&bins.observer);
        // --duration: an observer outliving a killed bench stops by itself.
        cmd.args(["run", "--duration", "600"])
            .args(export.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {}", bins.observer.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let mut proc = Proc::new(child, libc::SIGINT);
        let lines = read_lines(stdout);
        let deadline = spawned + START_TIMEOUT;
        let (at, first) = loop {
            check_interrupted()?;
            match lines.first.recv_timeout(Duration::from_millis(50)) {
                Ok(first) => break first,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.stop(Duration::from_secs(2));
                    bail!(
                        "observer exited ({}) before its start record: {}",
                        status.map_or("?".to_owned(), |s| s.to_string()),
                        tail_of_file(&log)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    bail!(
                        "observer wrote no start record within {START_TIMEOUT:?}: {}",
                        tail_of_file(&log)
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        };
        let startup = at.duration_since(spawned);
        let start: Value = serde_json::from_str(&first)
            .with_context(|| format!("observer's first line is not JSON: {first}"))?;
        ensure!(
            start["type"] == "start",
            "observer's first record is not `start`: {first}"
        );
        let ids = prog_counters(proc.pid)?;
        ensure!(
            !ids.is_empty(),
            "no BPF program found in /proc/{}/fdinfo",
            proc.pid
        );
        let names = prog_names(ids.keys().copied());
        Ok(Self {
            proc,
            lines: Some(lines),
            names,
            startup,
            start,
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// SIGINT, then its `stop` record (None if it wrote none) and the number of lines it wrote.
    fn stop(mut self) -> (Option<Value>, u64) {
        self.proc.stop(Duration::from_secs(10));
        let (count, last) = self
            .lines
            .take()
            .and_then(|l| l.rest.join().ok())
            .unwrap_or_default();
        let stop = serde_json::from_str::<Value>(&last)
            .ok()
            .filter(|v| v["type"] == "stop");
        (stop, count)
    }

    /// Programs attached / listed in the start record.
    fn attached(&self) -> (usize, usize) {
        let programs = self.start["programs"].as_array();
        let total = programs.map_or(0, Vec::len);
        let attached = programs.map_or(0, |p| p.iter().filter(|p| p["attached"] == true).count());
        (attached, total)
    }
}

fn tail_of_file(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (log: {})", tail.join(" | "), path.display())
}

// ---------------------------------------------------------------------------------------------
// 5. Start-up

#[derive(Debug, Default)]
struct Startup {
    secs: Vec<f64>,
    attached: usize,
    programs: usize,
}

fn measure_startup(bins: &Bins) -> Result<Startup> {
    let mut startup = Startup::default();
    for i in 0..STARTUP_RUNS {
        let observer = Observer::start(bins, Export::Default, &format!("startup-{i}"))?;
        startup.secs.push(observer.startup.as_secs_f64());
        (startup.attached, startup.programs) = observer.attached();
        let _ = observer.stop();
        sleep(Duration::from_millis(200))?;
    }
    say(&format!(
        "start-up: {} s (runs: {})",
        f3(median(&startup.secs)),
        list(&startup.secs, f3)
    ));
    Ok(startup)
}

// ---------------------------------------------------------------------------------------------
// 3, 4. Userspace pipeline

#[derive(Debug, Default)]
struct Pipeline {
    runs: Vec<Value>,
}

fn measure_pipeline(bins: &Bins) -> Result<Pipeline> {
    let mut pipeline = Pipeline::default();
    for mode in ["decode", "count", "engine"] {
        let (status, stdout, stderr) = run_bounded(
            Command::new(&bins.pipeline).args([
                "--nice",
                STORM_NICE,
                "--mode",
                mode,
                "--events",
                &PIPELINE_EVENTS.to_string(),
                "--flows",
                &PIPELINE_FLOWS.to_string(),
            ]),
            Duration::from_secs(120),
        )?;
        ensure!(
            status.success(),
            "pipeline_bench --mode {mode} failed ({status}): {}",
            stderr.trim()
        );
        let v = last_json(&stdout)?;
        say(&format!(
            "pipeline {mode}: {:.2} M events/s, VmRSS {:.1} MiB",
            v["events_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
            v["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0
        ));
        pipeline.runs.push(v);
    }
    Ok(pipeline)
}

// ---------------------------------------------------------------------------------------------
// Storm windows

/// One storm run: the storm's own report and, when a process was watched with stats on, the
/// per-program deltas of its BPF programs.
#[derive(Debug, Clone, Default)]
struct Window {
    storm: Value,
    progs: ProgDeltas,
    /// Other processes holding tracing BPF programs (e.g. another observer) at the start or
    /// end of the run: their programs run on the storm's events too.
    others: BTreeSet<String>,
}

impl Window {
    fn rate(&self) -> f64 {
        self.storm["per_sec"].as_f64().unwrap_or(0.0)
    }
}

/// Runs one storm (`ip netns exec NS storm ARGS`) with `attached` (pid, program names) running
/// or nothing; with `cost`, BPF stats are on and the attached process's program counters are
/// taken around the storm.
fn storm_window(
    ns: &Netns,
    bins: &Bins,
    storm_args: &[String],
    attached: Option<(u32, &BTreeMap<u32, String>)>,
    stats: &BpfStats,
    cost: bool,
    secs: f64,
) -> Result<Window> {
    let ours = attached.map(|(pid, _)| pid);
    let mut others = wait_for_quiet(ours)?;
    let watched = attached.filter(|_| cost);
    stats.set(cost)?;
    let before = match watched {
        Some((pid, _)) => prog_counters(pid)?,
        None => BTreeMap::new(),
    };
    let outcome = run_bounded(
        ns.command(&bins.storm).args(storm_args),
        Duration::from_secs_f64(secs + 30.0),
    );
    let after = match watched {
        Some((pid, _)) => prog_counters(pid),
        None => Ok(BTreeMap::new()),
    };
    stats.set(false)?;
    let (status, stdout, stderr) = outcome?;
    ensure!(
        status.success(),
        "storm {} failed ({status}): {}",
        storm_args.join(" "),
        stderr.trim()
    );
    let after = after?;
    let progs = match watched {
        Some((_, names)) => deltas(&before, &after, names),
        None => ProgDeltas::new(),
    };
    others.extend(tracing_holders(ours));
    Ok(Window {
        storm: last_json(&stdout)?,
        progs,
        others,
    })
}

// ---------------------------------------------------------------------------------------------
// Other tracers on the machine

/// Program types and link types of tracing programs (they run on the storm's events).
const TRACING_PROG_TYPES: &[u64] = &[2, 5, 7, 17, 26]; // kprobe, tracepoint, perf_event, raw_tp, tracing
const TRACING_LINK_TYPES: &[&str] = &[
    "perf",
    "raw_tracepoint",
    "tracing",
    "kprobe_multi",
    "uprobe_multi",
];

/// Processes other than this one and `ours` that hold tracing BPF programs or links, as
/// `comm[pid]`.
fn tracing_holders(ours: Option<u32>) -> BTreeSet<String> {
    let me = std::process::id();
    let mut holders = BTreeSet::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return holders;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || Some(pid) == ours {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            let Ok(info) = fs::read_to_string(fd.path()) else {
                return false;
            };
            info.lines().any(|line| {
                if let Some(t) = line.strip_prefix("prog_type:") {
                    t.trim()
                        .parse::<u64>()
                        .is_ok_and(|t| TRACING_PROG_TYPES.contains(&t))
                } else if let Some(t) = line.strip_prefix("link_type:") {
                    TRACING_LINK_TYPES.contains(&t.trim())
                } else {
                    false
                }
            })
        });
        if holds {
            let comm = read_trimmed(&format!("/proc/{pid}/comm")).unwrap_or_default();
            holders.insert(format!("{comm}[{pid}]"));
        }
    }
    holders
}

/// Seconds the whole bench may spend waiting for other tracers to go away.
const QUIET_BUDGET_MS: u64 = 60_000;
/// Longest wait before one run.
const QUIET_WAIT: Duration = Duration::from_secs(10);
static QUIET_SPENT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Waits (bounded per run and in total) until no other process holds tracing programs; returns
/// those still there.
fn wait_for_quiet(ours: Option<u32>) -> Result<BTreeSet<String>> {
    let start = Instant::now();
    let mut announced = false;
    loop {
        let holders = tracing_holders(ours);
        let spent = QUIET_SPENT_MS.load(Ordering::Relaxed) + start.elapsed().as_millis() as u64;
        if holders.is_empty() || start.elapsed() >= QUIET_WAIT || spent >= QUIET_BUDGET_MS {
            QUIET_SPENT_MS.fetch_add(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            if !holders.is_empty() {
                say(&format!(
                    "other tracing programs stay attached ({}): this run is marked",
                    holders.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            return Ok(holders);
        }
        if !announced {
            say(&format!(
                "waiting (at most {} s) for other tracing programs to go away: {}",
                QUIET_WAIT.as_secs(),
                holders.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
            announced = true;
        }
        sleep(Duration::from_millis(200))?;
    }
}

fn refused_args(secs: f64) -> Vec<String> {
    [
        "--nice",
        STORM_NICE,
        "refused",
        "--addr",
        "127.0.0.1:1",
        "--duration",
        &secs.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

// ---------------------------------------------------------------------------------------------
// 1, 2. Refused-connect storm

#[derive(Debug, Default)]
struct ModeRuns {
    /// Stats on: program costs.
    cost: Vec<Window>,
    /// Stats off: the storm's rate.
    rate: Vec<Window>,
    /// The run without observer just before each of `rate`.
    paired_none: Vec<Window>,
    /// Stop records and line counts.
    stops: Vec<(Option<Value>, u64)>,
}

#[derive(Debug, Default)]
struct Refused {
    none: Vec<Window>,
    default: ModeRuns,
    one_by_one: ModeRuns,
}

fn measure_refused(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Refused> {
    let ns = Netns::create(&netns_name("r"))?;
    let storm = refused_args(args.storm_secs);
    let secs = args.storm_secs;
    // Warm-up: first connects in a fresh namespace, page cache of the storm binary.
    storm_window(&ns, bins, &refused_args(0.5), None, stats, false, 0.5)?;
    let mut refused = Refused::default();
    // Each observer run is paired with a run without observer just before it (a busy machine's
    // background load drifts; pairs see about the same).
    for round in 0..args.runs {
        for export in [Export::Default, Export::OneByOne] {
            let none = storm_window(&ns, bins, &storm, None, stats, false, secs)?;
            let observer = Observer::start(bins, export, &format!("refused-{export:?}-{round}"))?;
            let watched = Some((observer.pid(), &observer.names));
            let rate = storm_window(&ns, bins, &storm, watched, stats, false, secs)?;
            let cost = storm_window(&ns, bins, &storm, watched, stats, true, secs)?;
            let all = total(&cost.progs);
            say(&format!(
                "refused storm, run {}: no observer {} connects/s; observer {}: {} connects/s, \
                 {} ns/event over {} events (stats on)",
                round + 1,
                int(none.rate()),
                export_label(export),
                int(rate.rate()),
                ns_opt(ns_per_event(all)),
                int(all.run_cnt as f64),
            ));
            let stop = observer.stop();
            let runs = match export {
                Export::Default => &mut refused.default,
                Export::OneByOne => &mut refused.one_by_one,
            };
            runs.cost.push(cost);
            runs.rate.push(rate);
            runs.paired_none.push(none.clone());
            runs.stops.push(stop);
            refused.none.push(none);
        }
    }
    Ok(refused)
}

fn export_label(export: Export) -> &'static str {
    match export {
        Export::Default => "default",
        Export::OneByOne => "one-by-one",
    }
}

// ---------------------------------------------------------------------------------------------
// 1b. Retransmit storm

#[derive(Debug, Default)]
struct Retrans {
    default: ModeRuns,
    one_by_one: ModeRuns,
    /// What trivial programs on the same tracepoints cost on this storm (bpftrace).
    floors: Vec<ToolResult>,
}

fn measure_retrans(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Retrans> {
    let client = Netns::create(&netns_name("c"))?;
    let server = Netns::create(&netns_name("s"))?;
    client.ip(&[
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "name",
        "veth1",
        "netns",
        &server.name,
    ])?;
    client.ip(&["addr", "add", "10.201.0.1/24", "dev", "veth0"])?;
    server.ip(&["addr", "add", "10.201.0.2/24", "dev", "veth1"])?;
    // One segment per skb: every retransmit and every drop is one event (with GSO, one lost
    // 64 KiB skb stands for dozens of segments and the storm has few events).
    client.ip(&["link", "set", "veth0", "gso_max_segs", "1", "up"])?;
    server.ip(&["link", "set", "veth1", "gso_max_segs", "1", "up"])?;
    // Drop a share of the data segments (not the handshake) arriving at the server.
    run_checked(server.command("iptables").args([
        "-w",
        "5",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &RETRANS_PORT.to_string(),
        "-m",
        "length",
        "--length",
        "200:65535",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        RETRANS_DROP_PROBABILITY,
        "-j",
        "DROP",
    ]))?;
    let addr = format!("10.201.0.2:{RETRANS_PORT}");
    // The sink's lifetime bounds itself: all windows plus slack.
    let sink_secs = (f64::from(args.runs) * 2.0 * (args.storm_secs + 5.0) + 60.0).to_string();
    let mut child = server
        .command(&bins.storm)
        .args(["sink", "--listen", &addr, "--duration", &sink_secs])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the sink")?;
    let sink_out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let _sink = Proc::new(child, libc::SIGKILL);
    let ready = read_lines(sink_out);
    ready
        .first
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the sink in {} did not start listening", server.name))?;

    let storm: Vec<String> = [
        "--nice",
        STORM_NICE,
        "bulk",
        "--addr",
        &addr,
        "--conns",
        &RETRANS_CONNS.to_string(),
        "--duration",
        &args.storm_secs.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut retrans = Retrans::default();
    if !args.no_tools {
        for tool in RETRANS_FLOORS {
            check_interrupted()?;
            let measured = with_tool(tool, &bins.observer, |watched| {
                storm_window(&client, bins, &storm, watched, stats, true, args.storm_secs)
            })?;
            let outcome = match measured {
                Err(why) => ToolOutcome::NotStarted(why),
                Ok((programs, cost)) => {
                    let all = total(&cost.progs);
                    say(&format!(
                        "retransmit storm, {}: {} ns/event over {} events",
                        tool.label,
                        ns_opt(ns_per_event(all)),
                        int(all.run_cnt as f64)
                    ));
                    ToolOutcome::Measured {
                        programs,
                        cost: Box::new(cost),
                        none: Box::default(),
                        rate: Box::default(),
                    }
                }
            };
            retrans.floors.push(ToolResult {
                label: tool.label,
                outcome,
            });
        }
    }
    for round in 0..args.runs {
        for export in [Export::Default, Export::OneByOne] {
            let observer = Observer::start(bins, export, &format!("retrans-{export:?}-{round}"))?;
            let watched = Some((observer.pid(), &observer.names));
            let cost = storm_window(&client, bins, &storm, watched, stats, true, args.storm_secs)?;
            let all = total(&cost.progs);
            say(&format!(
                "retransmit storm, run {}: observer {}: {} ns/event over {} events ({} segments retransmitted, {:.0} Mbit/s)",
                round + 1,
                export_label(export),
                ns_opt(ns_per_event(all)),
                int(all.run_cnt as f64),
                int(cost.storm["total_retrans"].as_f64().unwrap_or(0.0)),
                cost.storm["mbit_per_sec"].as_f64().unwrap_or(0.0)
            ));
            let stop = observer.stop();
            let runs = match export {
                Export::Default => &mut retrans.default,
                Export::OneByOne => &mut retrans.one_by_one,
            };
            runs.cost.push(cost);
            runs.stops.push(stop);
        }
    }
    Ok(retrans)
}

// ---------------------------------------------------------------------------------------------
// Other tools

struct ToolSpec {
    label: &'static str,
    package: &'static str,
    /// A file the package installs (presence check).
    installs: &'static str,
    argv: &'static [&'static str],
}

/// In a tool's argv: the observer binary under test.
const OBSERVER_ARGV0: &str = "@observer";

/// The floor for any tool on classic tracepoints: empty programs on the tracepoints a refused
/// connect hits (what the kernel spends building records and calling BPF, nothing more).
const FLOOR_EMPTY: ToolSpec = ToolSpec {
    label: "floor: bpftrace, empty programs on the same 4 tracepoints",
    package: "bpftrace",
    installs: "/usr/bin/bpftrace",
    argv: &[
        "bpftrace",
        "-e",
        "tracepoint:sock:inet_sock_set_state {} tracepoint:skb:kfree_skb {} \
         tracepoint:tcp:tcp_send_reset {} tracepoint:tcp:tcp_receive_reset {}",
    ],
};

/// The floor for anything that counts per event: one per-CPU counter per program.
const FLOOR_COUNTER: ToolSpec = ToolSpec {
    label: "floor: bpftrace, a counter per event (`@[cpu] = count()`) on the same 4 tracepoints",
    package: "bpftrace",
    installs: "/usr/bin/bpftrace",
    argv: &[
        "bpftrace",
        "-e",
        "tracepoint:sock:inet_sock_set_state { @a[cpu] = count(); } \
         tracepoint:skb:kfree_skb { @b[cpu] = count(); } \
         tracepoint:tcp:tcp_send_reset { @c[cpu] = count(); } \
         tracepoint:tcp:tcp_receive_reset { @d[cpu] = count(); }",
    ],
};

/// observer with its default options, started like the other tools (alternated rounds).
const OBSERVER_DEFAULT: ToolSpec = ToolSpec {
    label: "observer, default options",
    package: "observer",
    installs: "/",
    argv: &[OBSERVER_ARGV0, "run", "--duration", "600"],
};

const TOOLS: &[ToolSpec] = &[
    // observer itself on raw tracepoints: what skipping the classic record saves.
    ToolSpec {
        label: "observer, raw tracepoints (`--attach raw`), default options otherwise",
        package: "observer",
        installs: "/",
        argv: &[
            OBSERVER_ARGV0,
            "run",
            "--attach",
            "raw",
            "--duration",
            "600",
        ],
    },
    ToolSpec {
        label: "bcc tcpretrans (tcpretrans-bpfcc)",
        package: "bpfcc-tools",
        installs: "/usr/sbin/tcpretrans-bpfcc",
        argv: &["tcpretrans-bpfcc"],
    },
    ToolSpec {
        label: "bcc tcpdrop (tcpdrop-bpfcc)",
        package: "bpfcc-tools",
        installs: "/usr/sbin/tcpdrop-bpfcc",
        argv: &["tcpdrop-bpfcc"],
    },
    ToolSpec {
        label: "bpftrace tcpretrans.bt",
        package: "bpftrace",
        installs: "/usr/sbin/tcpretrans.bt",
        argv: &["bpftrace", "/usr/sbin/tcpretrans.bt"],
    },
    ToolSpec {
        label: "bpftrace tcpdrop.bt",
        package: "bpftrace",
        installs: "/usr/sbin/tcpdrop.bt",
        argv: &["bpftrace", "/usr/sbin/tcpdrop.bt"],
    },
    ToolSpec {
        label: "libbpf-tools tcpstates",
        package: "libbpf-tools",
        installs: "/usr/sbin/tcpstates",
        argv: &["tcpstates"],
    },
    ToolSpec {
        label: "libbpf-tools tcplife",
        package: "libbpf-tools",
        installs: "/usr/sbin/tcplife",
        argv: &["tcplife"],
    },
    FLOOR_EMPTY,
    FLOOR_COUNTER,
    ToolSpec {
        label: "bpftrace one-liner: `tracepoint:skb:kfree_skb { @[args->reason] = count(); }`",
        package: "bpftrace",
        installs: "/usr/bin/bpftrace",
        argv: &[
            "bpftrace",
            "-e",
            "tracepoint:skb:kfree_skb { @[args->reason] = count(); }",
        ],
    },
];

/// Trivial programs on the tracepoints the retransmit storm hits, measured on it (1 run each).
const RETRANS_FLOORS: &[ToolSpec] = &[
    ToolSpec {
        label: "empty programs",
        package: "bpftrace",
        installs: "/usr/bin/bpftrace",
        argv: &[
            "bpftrace",
            "-e",
            "tracepoint:tcp:tcp_retransmit_skb {} tracepoint:skb:kfree_skb {}",
        ],
    },
    ToolSpec {
        label: "a counter per event (`@[cpu] = count()`)",
        package: "bpftrace",
        installs: "/usr/bin/bpftrace",
        argv: &[
            "bpftrace",
            "-e",
            "tracepoint:tcp:tcp_retransmit_skb { @a[cpu] = count(); } \
             tracepoint:skb:kfree_skb { @b[cpu] = count(); }",
        ],
    },
];

#[derive(Debug)]
struct ToolResult {
    label: &'static str,
    outcome: ToolOutcome,
}

#[derive(Debug)]
enum ToolOutcome {
    NotStarted(String),
    Measured {
        programs: Vec<String>,
        cost: Box<Window>,
        /// The run without the tool just before it started, and the run with it (stats off).
        none: Box<Window>,
        rate: Box<Window>,
    },
}

fn measure_tools(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Vec<ToolResult>> {
    let missing: BTreeSet<&str> = TOOLS
        .iter()
        .filter(|t| !Path::new(t.installs).exists())
        .map(|t| t.package)
        .collect();
    let mut install_failures: BTreeMap<&str, String> = BTreeMap::new();
    for package in missing {
        match install_package(package, args.no_install) {
            Ok(()) => {}
            Err(e) => {
                install_failures.insert(package, format!("{e:#}"));
            }
        }
    }
    let ns = Netns::create(&netns_name("t"))?;
    let storm = refused_args(args.storm_secs);
    let mut results = Vec::new();
    for tool in TOOLS {
        check_interrupted()?;
        if let Some(why) = install_failures.get(tool.package) {
            results.push(ToolResult {
                label: tool.label,
                outcome: ToolOutcome::NotStarted(why.clone()),
            });
            continue;
        }
        let measured = with_tool(tool, &bins.observer, |watched| {
            let rate = storm_window(&ns, bins, &storm, watched, stats, false, args.storm_secs)?;
            let cost = storm_window(&ns, bins, &storm, watched, stats, true, args.storm_secs)?;
            Ok((rate, cost))
        })?;
        let outcome = match measured {
            Err(why) => {
                say(&format!("{}: not started: {why}", tool.label));
                ToolOutcome::NotStarted(why)
            }
            Ok((programs, (rate, cost))) => {
                // Paired with a run without it, right after.
                let none = storm_window(&ns, bins, &storm, None, stats, false, args.storm_secs)?;
                let all = total(&cost.progs);
                say(&format!(
                    "{}: {} connects/s (without: {}), {} ns per program run over {} runs (stats on)",
                    tool.label,
                    int(rate.rate()),
                    int(none.rate()),
                    ns_opt(ns_per_event(all)),
                    int(all.run_cnt as f64),
                ));
                ToolOutcome::Measured {
                    programs,
                    cost: Box::new(cost),
                    none: Box::new(none),
                    rate: Box::new(rate),
                }
            }
        };
        results.push(ToolResult {
            label: tool.label,
            outcome,
        });
    }
    Ok(results)
}

/// One configuration of the alternated rounds: its storm runs (stats off), and each round's run
/// without anything attached.
#[derive(Debug)]
struct AlternatedRow {
    label: &'static str,
    rate: Vec<Window>,
    paired_none: Vec<Window>,
    /// Why it was left out after a failed start.
    not_started: Option<String>,
}

/// The slowdown comparison in alternated rounds: each round runs the refused storm with nothing
/// attached, with observer (default options) and with the two floors, one after the other, so
/// that a drift in the machine's background load hits every configuration alike. The floors
/// need bpftrace (installed by the tools step); without it, or with `--no-tools`, they are
/// left out.
fn measure_alternated(
    bins: &Bins,
    args: &BenchArgs,
    stats: &BpfStats,
) -> Result<(Vec<Window>, Vec<AlternatedRow>)> {
    let ns = Netns::create(&netns_name("a"))?;
    let storm = refused_args(args.storm_secs);
    let secs = args.storm_secs;
    let mut specs = vec![&OBSERVER_DEFAULT];
    if !args.no_tools {
        specs.extend([&FLOOR_EMPTY, &FLOOR_COUNTER]);
    }
    let mut rows: Vec<AlternatedRow> = specs
        .iter()
        .map(|spec| AlternatedRow {
            label: spec.label,
            rate: Vec::new(),
            paired_none: Vec::new(),
            not_started: (!Path::new(spec.installs).exists())
                .then(|| format!("not installed ({})", spec.installs)),
        })
        .collect();
    let mut none_runs = Vec::new();
    for round in 0..args.rounds {
        check_interrupted()?;
        let none = storm_window(&ns, bins, &storm, None, stats, false, secs)?;
        let mut line = format!("round {}: none {}", round + 1, int(none.rate()));
        for (spec, row) in specs.iter().zip(rows.iter_mut()) {
            if row.not_started.is_some() {
                continue;
            }
            let measured = with_tool(spec, &bins.observer, |watched| {
                storm_window(&ns, bins, &storm, watched, stats, false, secs)
            })?;
            let rate = match measured {
                Ok((_, rate)) => rate,
                Err(why) => {
                    say(&format!("{}: not started: {why}", spec.label));
                    row.not_started = Some(why);
                    continue;
                }
            };
            let _ = write!(line, "; {} {}", short_label(spec.label), int(rate.rate()));
            row.rate.push(rate);
            row.paired_none.push(none.clone());
        }
        say(&format!("alternated {line} connects/s"));
        none_runs.push(none);
    }
    Ok((none_runs, rows))
}

/// "observer, default options" -> "observer"; "floor: bpftrace, empty ..." -> "floor".
fn short_label(label: &str) -> &str {
    label.split([',', ':']).next().unwrap_or(label)
}

/// apt-get installs a package unless told not to; fails with a sentence for the report.
fn install_package(package: &str, no_install: bool) -> Result<()> {
    let policy =
        run_checked(Command::new("apt-cache").args(["policy", package])).unwrap_or_default();
    let candidate = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .unwrap_or("(none)")
        .to_owned();
    if candidate == "(none)" {
        bail!("not installable: apt has no candidate for {package}");
    }
    if no_install {
        bail!("not installed (apt candidate {package} {candidate}; --no-install)");
    }
    say(&format!("installing {package} {candidate} with apt-get"));
    let (status, _, stderr) = run_bounded(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        Duration::from_secs(300),
    )?;
    ensure!(
        status.success(),
        "not installed: apt-get install {package} failed: {}",
        last_line(&stderr)
    );
    Ok(())
}

struct StartedTool {
    proc: Proc,
    _stdout: Option<JoinHandle<String>>,
}

/// The names of a started tool's programs, and what `measure` made of storms run while it
/// was attached (it gets the tool's pid and program names, as `storm_window` watches them).
type Attached<T> = (Vec<String>, T);

/// Starts `tool`, runs `measure` while it is attached, and stops it (`Ok(Err(why))`: it did
/// not start).
fn with_tool<T>(
    tool: &ToolSpec,
    observer: &Path,
    measure: impl FnOnce(Option<(u32, &BTreeMap<u32, String>)>) -> Result<T>,
) -> Result<std::result::Result<Attached<T>, String>> {
    let mut started = match start_tool(tool, observer)? {
        Ok(started) => started,
        Err(why) => return Ok(Err(why)),
    };
    let names = prog_names(prog_counters(started.proc.pid)?.keys().copied());
    let measured = measure(Some((started.proc.pid, &names)));
    started.proc.stop(Duration::from_secs(5));
    Ok(Ok((names.into_values().collect(), measured?)))
}

/// Starts a tool and waits until it holds BPF programs and has run for a second with them
/// (`Ok(Err(why))`: it did not start).
fn start_tool(
    tool: &ToolSpec,
    observer: &Path,
) -> Result<std::result::Result<StartedTool, String>> {
    let Some((&program, rest)) = tool.argv.split_first() else {
        return Ok(Err("empty command".to_owned()));
    };
    let program = if program == OBSERVER_ARGV0 {
        observer
    } else {
        Path::new(program)
    };
    let mut child = match Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Ok(Err(format!("cannot run {}: {e}", program.display()))),
    };
    // Its per-event output must be drained, or it blocks.
    let stdout = child.stdout.take().map(|p| read_tail(p, 4096));
    let stderr = child.stderr.take().map(|p| read_tail(p, 16 * 1024));
    let mut proc = Proc::new(child, libc::SIGINT);
    let deadline = Instant::now() + TOOL_START_TIMEOUT;
    let mut loaded_since: Option<Instant> = None;
    loop {
        check_interrupted()?;
        if let Some(status) = proc.exited() {
            let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
            return Ok(Err(failure_reason(&err, status)));
        }
        let has_progs = prog_counters(proc.pid).is_ok_and(|p| !p.is_empty());
        match (has_progs, loaded_since) {
            (true, None) => loaded_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() >= Duration::from_secs(1) => {
                return Ok(Ok(StartedTool {
                    proc,
                    _stdout: stdout,
                }));
            }
            (false, _) => loaded_since = None,
            _ => {}
        }
        if Instant::now() >= deadline {
            proc.stop(Duration::from_secs(3));
            let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
            return Ok(Err(format!(
                "did not attach within {} s{}",
                TOOL_START_TIMEOUT.as_secs(),
                if err.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", last_line(&err))
                }
            )));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Why a tool did not start, in a few words plus the evidence line.
fn failure_reason(stderr: &str, status: ExitStatus) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("RLIMIT_MEMLOCK"))
        .collect();
    let find = |needle: &str| lines.iter().find(|l| l.contains(needle)).copied();
    if let Some(line) = find("kprobe_events").or_else(|| find("kprobe:")) {
        return format!(
            "kprobes unavailable (no kprobe_events: CONFIG_KPROBE_EVENTS unset): `{}`",
            clip(line)
        );
    }
    if let Some(line) = find("Unable to find kernel headers")
        .or_else(|| find("file not found"))
        .or_else(|| find("/build): No such file"))
    {
        return format!("kernel headers missing: `{}`", clip(line));
    }
    match lines.last() {
        Some(line) => format!("exited ({status}): `{}`", clip(line)),
        None => format!("exited ({status})"),
    }
}

fn last_line(text: &str) -> String {
    clip(
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(""),
    )
}

fn clip(line: &str) -> String {
    let line = line.trim().replace('`', "'");
    if line.chars().count() > 140 {
        let short: String = line.chars().take(140).collect();
        format!("{short}...")
    } else {
        line
    }
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

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// 12345.6 -> "12,346".
fn int(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        format!("-{out}")
    } else {
        out
    }
}

fn ns_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "–".to_owned(), int)
}

fn f3(x: f64) -> String {
    format!("{x:.3}")
}

fn list(values: &[f64], f: impl Fn(f64) -> String) -> String {
    values.iter().map(|v| f(*v)).collect::<Vec<_>>().join(", ")
}

fn status(ok: bool) -> &'static str {
    if ok { "ok" } else { "**MISSED**" }
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}%")
    } else {
        "–".to_owned()
    }
}

/// One value per run; runs during which another process had tracing programs attached are
/// marked, and medians leave them out when any unmarked run remains.
#[derive(Debug, Clone, Default)]
struct Runs {
    values: Vec<f64>,
    marked: Vec<bool>,
}

impl Runs {
    fn of(windows: &[Window], f: impl Fn(&Window) -> f64) -> Self {
        Self {
            values: windows.iter().map(&f).collect(),
            marked: windows.iter().map(|w| !w.others.is_empty()).collect(),
        }
    }

    fn usable(&self) -> Vec<f64> {
        let clean: Vec<f64> = self
            .values
            .iter()
            .zip(&self.marked)
            .filter(|(_, m)| !**m)
            .map(|(v, _)| *v)
            .collect();
        if clean.is_empty() {
            self.values.clone()
        } else {
            clean
        }
    }

    fn median(&self) -> f64 {
        median(&self.usable())
    }

    /// "1, 2*, 3" (`*`: marked).
    fn show(&self, f: impl Fn(f64) -> String) -> String {
        self.values
            .iter()
            .zip(&self.marked)
            .map(|(v, m)| format!("{}{}", f(*v), if *m { "*" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Per-program medians over runs: (name, median events, median ns/event, per-run ns/event).
struct ProgSummary {
    name: String,
    events: f64,
    ns: f64,
    runs: Runs,
}

fn summarize(windows: &[Window]) -> Vec<ProgSummary> {
    let names: BTreeSet<&String> = windows.iter().flat_map(|w| w.progs.keys()).collect();
    let mut out: Vec<ProgSummary> = names
        .into_iter()
        .map(|name| {
            let counters = |w: &Window| w.progs.get(name).copied().unwrap_or_default();
            let runs = Runs::of(windows, |w| ns_per_event(counters(w)).unwrap_or(f64::NAN));
            ProgSummary {
                name: name.clone(),
                events: Runs::of(windows, |w| counters(w).run_cnt as f64).median(),
                ns: runs.median(),
                runs,
            }
        })
        .collect();
    let runs = Runs::of(windows, |w| {
        ns_per_event(total(&w.progs)).unwrap_or(f64::NAN)
    });
    out.push(ProgSummary {
        name: "all programs".to_owned(),
        events: Runs::of(windows, |w| total(&w.progs).run_cnt as f64).median(),
        ns: runs.median(),
        runs,
    });
    out
}

/// Worst median ns/event among programs with enough events to judge.
fn worst_judged(summary: &[ProgSummary]) -> Option<&ProgSummary> {
    summary
        .iter()
        .filter(|p| p.name != "all programs" && p.events >= MIN_EVENTS_JUDGED as f64)
        .max_by(|a, b| a.ns.total_cmp(&b.ns))
}

fn all_programs(summary: &[ProgSummary]) -> Option<&ProgSummary> {
    summary.iter().find(|p| p.name == "all programs")
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Default)]
struct Report {
    machine: Machine,
    args_runs: u32,
    storm_secs: f64,
    startup: Startup,
    pipeline: Pipeline,
    refused: Refused,
    retrans: Retrans,
    tools: Vec<ToolResult>,
    alternated_none: Vec<Window>,
    alternated: Vec<AlternatedRow>,
    elapsed: Duration,
}

struct SummaryRow {
    what: String,
    result: String,
    target: String,
    status: String,
}

impl Report {
    /// Every storm run of the report.
    fn windows(&self) -> Vec<&Window> {
        let mut all: Vec<&Window> = self.refused.none.iter().collect();
        for runs in [
            &self.refused.default,
            &self.refused.one_by_one,
            &self.retrans.default,
            &self.retrans.one_by_one,
        ] {
            all.extend(runs.cost.iter().chain(&runs.rate).chain(&runs.paired_none));
        }
        for tool in &self.tools {
            if let ToolOutcome::Measured {
                cost, none, rate, ..
            } = &tool.outcome
            {
                all.extend([cost.as_ref(), none.as_ref(), rate.as_ref()]);
            }
        }
        all.extend(&self.alternated_none);
        for row in &self.alternated {
            all.extend(&row.rate);
        }
        all
    }

    /// Other processes seen with tracing programs during the runs.
    fn other_tracers(&self) -> BTreeSet<String> {
        self.windows()
            .into_iter()
            .flat_map(|w| w.others.iter().cloned())
            .collect()
    }

    fn rates(windows: &[Window]) -> Runs {
        Runs::of(windows, Window::rate)
    }

    fn baseline_rate(&self) -> f64 {
        Self::rates(&self.refused.none).median()
    }

    fn slowdown(&self, rate: f64) -> f64 {
        slowdown_pct(self.baseline_rate(), rate)
    }

    fn pipeline_run(&self, mode: &str) -> Option<&Value> {
        self.pipeline.runs.iter().find(|v| v["mode"] == mode)
    }

    fn summary_rows(&self) -> Vec<SummaryRow> {
        let mut rows = Vec::new();
        let runs = self.args_runs;
        for (storm, default, one_by_one) in [
            (
                "refused-connect storm",
                &self.refused.default,
                &self.refused.one_by_one,
            ),
            (
                "retransmit storm",
                &self.retrans.default,
                &self.retrans.one_by_one,
            ),
        ] {
            let summary = summarize(&default.cost);
            let obo = summarize(&one_by_one.cost);
            if let Some(worst) = worst_judged(&summary) {
                rows.push(SummaryRow {
                    what: format!(
                        "1. kernel cost, {storm}, default options: slowest program (`{}`)",
                        worst.name
                    ),
                    result: format!("{} ns/event (median of {runs})", int(worst.ns)),
                    target: format!("≤ {} ns", int(TARGET_NS_PER_EVENT)),
                    status: status(worst.ns <= TARGET_NS_PER_EVENT).to_owned(),
                });
            }
            if let (Some(all), Some(all_obo)) = (all_programs(&summary), all_programs(&obo)) {
                rows.push(SummaryRow {
                    what: format!("1. kernel cost, {storm}, default options: all programs"),
                    result: format!(
                        "{} ns/event over {} events/run",
                        int(all.ns),
                        int(all.events)
                    ),
                    target: format!("≤ {} ns", int(TARGET_NS_PER_EVENT)),
                    status: status(all.ns <= TARGET_NS_PER_EVENT).to_owned(),
                });
                rows.push(SummaryRow {
                    what: format!("1. kernel cost, {storm}, one-by-one export: all programs"),
                    result: format!(
                        "{} ns/event ({:.1}× default)",
                        int(all_obo.ns),
                        all_obo.ns / all.ns
                    ),
                    target: "(comparison)".to_owned(),
                    status: String::new(),
                });
            }
        }
        let base = self.baseline_rate();
        let default_rate = Self::rates(&self.refused.default.rate).median();
        let obo_rate = Self::rates(&self.refused.one_by_one.rate).median();
        let slow = self.slowdown(default_rate);
        rows.push(SummaryRow {
            what: "2. host slowdown, refused storm, default options".to_owned(),
            result: format!(
                "{} ({} → {} connects/s, medians of {} and {runs} runs; paired runs: {}; BPF \
                 time per connect: {:.0}% of a connect's CPU time)",
                pct(slow),
                int(base),
                int(default_rate),
                self.refused.none.len(),
                pct(paired_slowdowns(
                    &self.refused.default.paired_none,
                    &self.refused.default.rate
                )
                .median()),
                bpf_us_per_connect(&self.refused.default.cost).median()
                    / cpu_per_connect(&self.refused.none).median()
                    * 100.0
            ),
            target: format!("≤ {}%", TARGET_SLOWDOWN_PCT),
            status: status(slow <= TARGET_SLOWDOWN_PCT).to_owned(),
        });
        rows.push(SummaryRow {
            what: "2. host slowdown, refused storm, one-by-one export".to_owned(),
            result: format!(
                "{} ({} connects/s; paired runs: {})",
                pct(self.slowdown(obo_rate)),
                int(obo_rate),
                pct(paired_slowdowns(
                    &self.refused.one_by_one.paired_none,
                    &self.refused.one_by_one.rate
                )
                .median())
            ),
            target: "(comparison)".to_owned(),
            status: String::new(),
        });
        let alternated = self.alternated_slowdowns();
        if !alternated.is_empty() {
            rows.push(SummaryRow {
                what: format!(
                    "2. host slowdown, refused storm, {} alternated rounds (slowdown of medians)",
                    self.alternated_none.len()
                ),
                result: alternated
                    .iter()
                    .map(|(label, slow)| format!("{label}: {}", pct(*slow)))
                    .collect::<Vec<_>>()
                    .join("; "),
                target: "(comparison)".to_owned(),
                status: String::new(),
            });
        }
        if let Some(v) = self.pipeline_run("engine") {
            let eps = v["events_per_sec"].as_f64().unwrap_or(0.0);
            rows.push(SummaryRow {
                what: format!(
                    "3. userspace, one core: {}",
                    v["label"].as_str().unwrap_or("?")
                ),
                result: format!(
                    "{:.2} M events/s ({} events, {} flows)",
                    eps / 1e6,
                    int(v["events"].as_f64().unwrap_or(0.0)),
                    int(v["distinct_flows"].as_f64().unwrap_or(0.0))
                ),
                target: "≥ 2 M/s".to_owned(),
                status: status(eps >= TARGET_EVENTS_PER_SEC).to_owned(),
            });
            let rss = v["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            rows.push(SummaryRow {
                what: format!(
                    "4. memory: VmRSS after tracking {} flows",
                    int(v["tracked_flows"].as_f64().unwrap_or(0.0))
                ),
                result: format!(
                    "{rss:.1} MiB (with the {:.1} MiB synthetic input still held: {:.1} MiB)",
                    v["input_bytes"].as_f64().unwrap_or(0.0) / 1024.0 / 1024.0,
                    v["rss_with_input_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                ),
                target: format!("≤ {} MiB", TARGET_RSS_MIB),
                status: status(rss <= TARGET_RSS_MIB).to_owned(),
            });
        }
        let startup = median(&self.startup.secs);
        rows.push(SummaryRow {
            what: "5. start-up: spawn to `start` record (load + attach)".to_owned(),
            result: format!(
                "{} s (median of {}; {} of {} programs attached)",
                f3(startup),
                self.startup.secs.len(),
                self.startup.attached,
                self.startup.programs
            ),
            target: format!("< {} s", TARGET_STARTUP_SECS),
            status: status(startup < TARGET_STARTUP_SECS).to_owned(),
        });
        rows
    }

    fn render_summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| measurement | result | target | |");
        let _ = writeln!(s, "|---|---|---|---|");
        for row in self.summary_rows() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                row.what, row.result, row.target, row.status
            );
        }
        s
    }

    fn render(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Generated by `cargo xtask bench` (as root) on {}, commit {}; all numbers below come \
             from that one run ({:.0} s). Regenerate with `sudo -E cargo xtask bench`.\n",
            m.date,
            m.commit,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "## Machine\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| CPU | {} |", m.cpu_model);
        let _ = writeln!(
            s,
            "| cores | {}{} |",
            m.cores,
            if m.virtual_machine {
                " (virtual machine)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "| memory | {:.1} GiB |", m.memory_gib);
        let _ = writeln!(s, "| kernel | Linux {} |", m.kernel);
        let _ = writeln!(
            s,
            "| load average (1, 5, 15 min) | {} at start, {} at end |",
            m.load_start, m.load_end
        );
        let _ = writeln!(s);
        if m.load1 > 1.0 {
            let _ = writeln!(
                s,
                "The machine was busy with other work during this run (load average above 1 on \
                 {} cores): rates and timings are noisier, and slower, than on an idle host.\n",
                m.cores
            );
        }
        let _ = writeln!(s, "## Summary\n");
        let _ = writeln!(s, "{}", self.render_summary());
        let others = self.other_tracers();
        if !others.is_empty() {
            let _ = writeln!(
                s,
                "Other processes had tracing BPF programs attached during some runs ({}): their \
                 programs ran on the storms' events too. Such runs are marked `*` below; \
                 medians leave them out where unmarked runs remain.\n",
                others.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        self.render_kernel_cost(&mut s);
        self.render_slowdown(&mut s);
        self.render_pipeline(&mut s);
        self.render_startup(&mut s);
        self.render_tools(&mut s);
        self.render_method(&mut s);
        s
    }

    fn render_kernel_cost(&self, s: &mut String) {
        let runs = self.args_runs;
        let _ = writeln!(s, "## 1. Kernel cost per event\n");
        let _ = writeln!(
            s,
            "`run_time_ns / run_cnt` of each of observer's programs with `kernel.bpf_stats_enabled=1`, \
             as deltas over a {:.0} s storm; median of {runs} runs (each run a fresh observer). \
             Events are program runs: every hit of the tracepoint, whether or not observer keeps it. \
             Programs with fewer than {} events per run are listed but not judged.\n",
            self.storm_secs,
            int(MIN_EVENTS_JUDGED as f64)
        );
        for (title, default, obo) in [
            (
                "Refused-connect storm (loopback, in a bench namespace)",
                &self.refused.default,
                &self.refused.one_by_one,
            ),
            (
                "Retransmit storm (veth between two namespaces, 20% of inbound data segments dropped)",
                &self.retrans.default,
                &self.retrans.one_by_one,
            ),
        ] {
            let _ = writeln!(s, "### {title}\n");
            let d = summarize(&default.cost);
            let o = summarize(&obo.cost);
            let _ = writeln!(
                s,
                "| program | events/run | ns/event, default (runs) | ns/event, one-by-one (runs) | one-by-one ÷ default | target ≤ {} ns |",
                int(TARGET_NS_PER_EVENT)
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
            for p in &d {
                let q = o.iter().find(|q| q.name == p.name);
                let judged = p.events >= MIN_EVENTS_JUDGED as f64;
                let verdict = if judged {
                    status(p.ns <= TARGET_NS_PER_EVENT)
                } else {
                    "(too few events)"
                };
                let name = if p.name == "all programs" {
                    "**all programs**".to_owned()
                } else {
                    format!("`{}`", p.name)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} ({}) | {} | {} | {} |",
                    name,
                    int(p.events),
                    int(p.ns),
                    p.runs.show(int),
                    q.map_or("–".to_owned(), |q| format!(
                        "{} ({})",
                        int(q.ns),
                        q.runs.show(int)
                    )),
                    q.filter(|q| q.ns.is_finite() && p.ns > 0.0)
                        .map_or("–".to_owned(), |q| format!("{:.1}×", q.ns / p.ns)),
                    verdict
                );
            }
            let _ = writeln!(s);
            // Storm context and the observer's own accounting.
            let storm_info: Vec<String> = default
                .cost
                .iter()
                .map(|w| match w.storm["mode"].as_str() {
                    Some("bulk") => format!(
                        "{} segments retransmitted at {:.0} Mbit/s",
                        int(w.storm["total_retrans"].as_f64().unwrap_or(0.0)),
                        w.storm["mbit_per_sec"].as_f64().unwrap_or(0.0)
                    ),
                    _ => format!("{} connects/s", int(w.rate())),
                })
                .collect();
            let _ = writeln!(
                s,
                "Storm during the default-options runs (stats on): {}.\n",
                storm_info.join("; ")
            );
            for (label, runs) in [("default options", default), ("one-by-one export", obo)] {
                let _ = writeln!(
                    s,
                    "observer's own accounting, {label} (`stop` record, per run): {}.\n",
                    runs.stops
                        .iter()
                        .map(|(stop, lines)| stop_summary(stop.as_ref(), *lines))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
        }
        if !self.retrans.floors.is_empty() {
            let floors: Vec<String> = self
                .retrans
                .floors
                .iter()
                .map(|f| match &f.outcome {
                    ToolOutcome::NotStarted(why) => format!("{}: not started ({why})", f.label),
                    ToolOutcome::Measured { cost, .. } => {
                        let all = total(&cost.progs);
                        format!(
                            "{}: {} ns/event over {} events",
                            f.label,
                            ns_opt(ns_per_event(all)),
                            int(all.run_cnt as f64)
                        )
                    }
                })
                .collect();
            let _ = writeln!(
                s,
                "Floors on the retransmit storm (bpftrace on `tcp_retransmit_skb` and `kfree_skb`, \
                 1 run each): {}. At a few thousand events per second every run starts with cold \
                 caches, so even these cost more than on the refused storm.\n",
                floors.join("; ")
            );
        }
    }

    fn render_slowdown(&self, s: &mut String) {
        let runs = self.args_runs;
        let _ = writeln!(s, "## 2. Host slowdown (refused-connect storm)\n");
        let _ = writeln!(
            s,
            "The storm's own rate (one thread of blocking connects to a closed port, nice \
             {STORM_NICE}), with BPF statistics off, {:.0} s per run. The target is judged as \
             specified, on the medians over {runs} runs. Each run with a tool attached is also \
             paired with a run without it (just before; for the other tools, just after). Two \
             columns are less sensitive to other load on the machine: the storm's CPU time per \
             connect (user + system, getrusage), and the BPF time per connect (the programs' \
             `run_time_ns` over the cost run divided by its connects), shown as a share of a \
             connect's CPU time without observer: the kernel-side part of the slowdown.\n",
            self.storm_secs
        );
        let _ = writeln!(
            s,
            "| configuration | connects/s, median (runs) | slowdown of medians | paired slowdown, median (runs) | CPU µs per connect, median (vs none) | BPF µs per connect (share) | target ≤ {}% |",
            TARGET_SLOWDOWN_PCT
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
        let none = Self::rates(&self.refused.none);
        let cpu_none = cpu_per_connect(&self.refused.none).median();
        let _ = writeln!(
            s,
            "| no observer | {} ({}) | – | – | {:.2} ({}) | – | |",
            int(none.median()),
            none.show(int),
            cpu_none,
            cpu_per_connect(&self.refused.none).show(|x| format!("{x:.1}"))
        );
        let cpu_vs_none = |cpu: f64| format!("{cpu:.2} ({:+.0}%)", (cpu / cpu_none - 1.0) * 100.0);
        let bpf_share = |bpf_us: f64| format!("{bpf_us:.2} ({:.0}%)", bpf_us / cpu_none * 100.0);
        for (label, runs, judged) in [
            ("observer, default options", &self.refused.default, true),
            (
                "observer, one-by-one export",
                &self.refused.one_by_one,
                false,
            ),
        ] {
            let rates = Self::rates(&runs.rate);
            let slow = self.slowdown(rates.median());
            let paired = paired_slowdowns(&runs.paired_none, &runs.rate);
            let _ = writeln!(
                s,
                "| {label} | {} ({}) | {} | {} ({}) | {} | {} | {} |",
                int(rates.median()),
                rates.show(int),
                pct(slow),
                pct(paired.median()),
                paired.show(pct),
                cpu_vs_none(cpu_per_connect(&runs.rate).median()),
                bpf_share(bpf_us_per_connect(&runs.cost).median()),
                if judged {
                    status(slow <= TARGET_SLOWDOWN_PCT)
                } else {
                    "(comparison)"
                }
            );
        }
        for tool in &self.tools {
            if let ToolOutcome::Measured {
                none, rate, cost, ..
            } = &tool.outcome
            {
                let paired =
                    paired_slowdowns(std::slice::from_ref(none), std::slice::from_ref(rate));
                let _ = writeln!(
                    s,
                    "| {}{} (1 run) | {} | {} | {} | {} | {} | (comparison) |",
                    tool.label,
                    mark(&[none, rate, cost]),
                    int(rate.rate()),
                    pct(self.slowdown(rate.rate())),
                    pct(paired.median()),
                    cpu_vs_none(cpu_per_connect(std::slice::from_ref(rate)).median()),
                    bpf_share(bpf_us_per_connect(std::slice::from_ref(cost)).median())
                );
            }
        }
        let _ = writeln!(s);
        self.render_alternated(s);
    }

    fn render_alternated(&self, s: &mut String) {
        if self.alternated_none.is_empty() {
            return;
        }
        let rounds = self.alternated_none.len();
        let _ = writeln!(
            s,
            "### Alternated rounds
"
        );
        let _ = writeln!(
            s,
            "{rounds} rounds; each runs the storm ({:.0} s, statistics off) with nothing attached, \
             then with each configuration below in turn, so that a drift in the machine's load \
             hits every configuration alike. The floors bound what any tool on these classic \
             tracepoints can reach: empty programs pay only for the kernel's record building and \
             the program call, the counter rows for one map update per event on top.\n",
            self.storm_secs
        );
        let _ = writeln!(
            s,
            "| configuration | connects/s, median (runs) | slowdown of medians | paired slowdown, median (runs) | CPU µs per connect, median (vs none) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let none = Self::rates(&self.alternated_none);
        let cpu_none = cpu_per_connect(&self.alternated_none).median();
        let _ = writeln!(
            s,
            "| no observer | {} ({}) | – | – | {cpu_none:.2} |",
            int(none.median()),
            none.show(int),
        );
        for row in &self.alternated {
            if row.rate.is_empty() {
                let why = row.not_started.as_deref().unwrap_or("no runs");
                let _ = writeln!(s, "| {} | {why} | – | – | – |", row.label);
                continue;
            }
            let rates = Self::rates(&row.rate);
            let paired = paired_slowdowns(&row.paired_none, &row.rate);
            let cpu = cpu_per_connect(&row.rate).median();
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {} | {} ({}) | {cpu:.2} ({:+.0}%) |",
                row.label,
                int(rates.median()),
                rates.show(int),
                pct(slowdown_pct(none.median(), rates.median())),
                pct(paired.median()),
                paired.show(pct),
                (cpu / cpu_none - 1.0) * 100.0
            );
        }
        let _ = writeln!(s);
    }

    /// Slowdown of the medians in the alternated rounds, per configuration that ran.
    fn alternated_slowdowns(&self) -> Vec<(&'static str, f64)> {
        let none = Self::rates(&self.alternated_none).median();
        self.alternated
            .iter()
            .filter(|row| !row.rate.is_empty())
            .map(|row| {
                (
                    row.label,
                    slowdown_pct(none, Self::rates(&row.rate).median()),
                )
            })
            .collect()
    }

    fn render_pipeline(&self, s: &mut String) {
        let _ = writeln!(s, "## 3, 4. Userspace throughput and memory\n");
        let _ = writeln!(
            s,
            "`observer/examples/pipeline_bench.rs`, pinned to one core: {} raw `TcpEvent` samples \
             for {} distinct flows (to 1,000 peers) laid out as in a perf ring, decoded with \
             `observer::decode::decode_sample` and aggregated (nice {STORM_NICE}). VmRSS from \
             /proc/self/status afterwards, once after freeing the {:.1} MiB synthetic input (what \
             the process holds for the flows; the daemon reads perf rings instead) and once \
             before; the peak (VmHWM) includes the input.\n",
            int(PIPELINE_EVENTS as f64),
            int(f64::from(PIPELINE_FLOWS)),
            self.pipeline
                .runs
                .first()
                .and_then(|v| v["input_bytes"].as_f64())
                .unwrap_or(0.0)
                / 1024.0
                / 1024.0
        );
        let _ = writeln!(
            s,
            "| stage | events/s | ns/event | flows tracked | VmRSS | VmRSS with input | peak (VmHWM) | target |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|");
        for v in &self.pipeline.runs {
            let eps = v["events_per_sec"].as_f64().unwrap_or(0.0);
            let rss = v["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            let target = if v["mode"] == "engine" {
                format!(
                    "≥ 2 M/s: {}; ≤ {} MiB: {}",
                    status(eps >= TARGET_EVENTS_PER_SEC),
                    TARGET_RSS_MIB,
                    status(rss <= TARGET_RSS_MIB)
                )
            } else {
                "(breakdown)".to_owned()
            };
            let _ = writeln!(
                s,
                "| {} | {:.2} M | {:.0} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
                v["label"].as_str().unwrap_or("?"),
                eps / 1e6,
                v["ns_per_event"].as_f64().unwrap_or(0.0),
                int(v["tracked_flows"].as_f64().unwrap_or(0.0)),
                rss,
                v["rss_with_input_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                v["hwm_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                target
            );
        }
        if let Some(v) = self.pipeline_run("engine") {
            let _ = writeln!(
                s,
                "\nEngine tables at the end: {}; {} ticks, {} anomaly records produced.",
                v["engine"], v["ticks"], v["anomaly_events"]
            );
        }
        let _ = writeln!(s);
    }

    fn render_startup(&self, s: &mut String) {
        let _ = writeln!(s, "## 5. Start-up\n");
        let _ = writeln!(
            s,
            "From spawning `target/release/observer run` to its `start` record on stdout (tracefs \
             and BTF discovery, load, attach): median {} s, runs {} s; target < {} s: {}.\n",
            f3(median(&self.startup.secs)),
            list(&self.startup.secs, f3),
            TARGET_STARTUP_SECS,
            status(median(&self.startup.secs) < TARGET_STARTUP_SECS)
        );
    }

    fn render_tools(&self, s: &mut String) {
        let _ = writeln!(s, "## Other tools on this kernel\n");
        if self.tools.is_empty() {
            let _ = writeln!(s, "Not measured in this run (`--no-tools`).\n");
            return;
        }
        let _ = writeln!(
            s,
            "Each started with a {} s limit (`apt-get install`ed first when missing). Those that \
             start are measured on the same refused-connect storm, 1 run: the storm's rate (stats \
             off), then the kernel cost (stats on), then a run without the tool. observer's rows \
             (medians from sections 1 and 2) are for comparison.\n",
            TOOL_START_TIMEOUT.as_secs()
        );
        let _ = writeln!(
            s,
            "| tool | outcome | ns per program run | program runs | slowdown (paired) |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        for (label, runs) in [
            ("observer, default options", &self.refused.default),
            ("observer, one-by-one export", &self.refused.one_by_one),
        ] {
            let summary = summarize(&runs.cost);
            if let Some(all) = all_programs(&summary) {
                let paired = paired_slowdowns(&runs.paired_none, &runs.rate);
                let _ = writeln!(
                    s,
                    "| {label} | started | {} | {} | {} |",
                    int(all.ns),
                    int(all.events),
                    pct(paired.median())
                );
            }
        }
        for tool in &self.tools {
            match &tool.outcome {
                ToolOutcome::NotStarted(why) => {
                    let _ = writeln!(s, "| {} | not started: {} | – | – | – |", tool.label, why);
                }
                ToolOutcome::Measured {
                    programs,
                    cost,
                    none,
                    rate,
                } => {
                    let all = total(&cost.progs);
                    let paired =
                        paired_slowdowns(std::slice::from_ref(none), std::slice::from_ref(rate));
                    let _ = writeln!(
                        s,
                        "| {}{} | started; programs: {} | {} | {} | {} |",
                        tool.label,
                        mark(&[none, rate, cost]),
                        programs
                            .iter()
                            .map(|p| format!("`{p}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        ns_opt(ns_per_event(all)),
                        int(all.run_cnt as f64),
                        pct(paired.median())
                    );
                }
            }
        }
        let _ = writeln!(s);
    }

    fn render_method(&self, s: &mut String) {
        let _ = writeln!(s, "## Method and caveats\n");
        let _ = writeln!(
            s,
            "- Load generators: `observer/examples/storm.rs` (`refused`: blocking `connect()` to \
             127.0.0.1:1 in a fresh namespace, one thread; `bulk`/`sink`: {RETRANS_CONNS} \
             connections over a veth pair between two namespaces, the server's iptables dropping \
             {}% of inbound TCP packets of 200 bytes or more with `-m statistic --mode random`). \
             No traffic leaves the bench's namespaces; they are deleted at the end.",
            RETRANS_DROP_PROBABILITY.parse::<f64>().unwrap_or(0.0) * 100.0
        );
        let _ = writeln!(
            s,
            "- observer runs on the host (it sees every namespace) with default options, or with \
             one-by-one export (`{}`): every event through the perf buffers, each waking the \
             reader (../shared/NOTES.md measured ~6,950 ns per event for that on this kind of \
             machine, with a single program on kfree_skb). Its stdout is read and discarded by \
             the bench.",
            ONE_BY_ONE_ARGS.join(" ")
        );
        let _ = writeln!(
            s,
            "- Programs are observer's own (prog ids from /proc/<pid>/fdinfo, names from \
             `bpftool prog show`, truncated to 15 characters). Counts include TCP events of \
             anything else running on the host during the window."
        );
        let _ = writeln!(
            s,
            "- With statistics on, the kernel adds two clock reads per program run (a few tens of \
             ns, included in ns/event); rates for the slowdown are measured with statistics off. \
             `kernel.bpf_stats_enabled` is restored to its previous value at the end."
        );
        let _ = writeln!(
            s,
            "- Refused storm, per connect: `inet_sock_set_state` runs twice (CLOSE→SYN_SENT, \
             SYN_SENT→CLOSE), `tcp_send_reset` and `tcp_receive_reset` once, `kfree_skb` for \
             the refused SYN (NO_SOCKET) and other frees."
        );
        let _ = writeln!(
            s,
            "- `run_time_ns` counts only the programs' own time. A classic tracepoint also costs \
             the kernel building its record before the program runs, which no program can \
             avoid: the first `floor` row (empty programs on the same tracepoints) is what any \
             classic-tracepoint tool pays on this storm before doing anything, and the second \
             (one per-CPU counter per event) what any tool that counts pays. observer's row \
             with `--attach raw` runs its raw tracepoint programs, which get the tracepoint's \
             arguments without a record being built, on the same storm."
        );
        let _ = writeln!(
            s,
            "- The retransmit storm runs at a few thousand events per second: each program run \
             then finds its maps and per-CPU data out of the CPU caches, so ns/event is higher \
             than in the refused storm, which runs the same code hundreds of thousands of \
             times per second."
        );
        let _ = writeln!(s);
    }
}

/// `*` when another process had tracing programs attached during any of these runs.
fn mark(windows: &[&Window]) -> &'static str {
    if windows.iter().any(|w| !w.others.is_empty()) {
        "*"
    } else {
        ""
    }
}

/// Per-run slowdowns (%) of `with` against the run without it paired with it (marked when
/// either run is).
fn paired_slowdowns(none: &[Window], with: &[Window]) -> Runs {
    let pairs: Vec<(&Window, &Window)> = none.iter().zip(with).collect();
    Runs {
        values: pairs
            .iter()
            .map(|(n, w)| slowdown_pct(n.rate(), w.rate()))
            .collect(),
        marked: pairs
            .iter()
            .map(|(n, w)| !n.others.is_empty() || !w.others.is_empty())
            .collect(),
    }
}

/// How much slower `rate` is than `base`, in percent.
fn slowdown_pct(base: f64, rate: f64) -> f64 {
    (base - rate) / base * 100.0
}

/// The watched programs' run time per connect of the storm, µs, per (cost) run.
fn bpf_us_per_connect(windows: &[Window]) -> Runs {
    Runs::of(windows, |w| {
        let connects = w.storm["connects"].as_f64().unwrap_or(0.0);
        if connects > 0.0 {
            total(&w.progs).run_time_ns as f64 / connects / 1000.0
        } else {
            f64::NAN
        }
    })
}

/// The storm's CPU time per connect, µs, per run.
fn cpu_per_connect(windows: &[Window]) -> Runs {
    Runs::of(windows, |w| {
        w.storm["cpu_us_per_connect"].as_f64().unwrap_or(f64::NAN)
    })
}

/// "exported 12,000, received 11,900, lost 100" from a stop record.
fn stop_summary(stop: Option<&Value>, lines: u64) -> String {
    let Some(stop) = stop else {
        return format!("no stop record ({} lines)", int(lines as f64));
    };
    let mut events = 0.0;
    let mut exported = 0.0;
    let mut received = 0.0;
    if let Some(totals) = stop["totals"].as_object() {
        for kind in totals.values() {
            events += kind["events"].as_f64().unwrap_or(0.0);
            exported += kind["exported"].as_f64().unwrap_or(0.0);
            received += kind["received"].as_f64().unwrap_or(0.0);
        }
    }
    format!(
        "{} events counted, {} exported ({:.0}%), {} received, {} lost, {} undelivered",
        int(events),
        int(exported),
        if events > 0.0 {
            exported / events * 100.0
        } else {
            0.0
        },
        int(received),
        int(stop["lost"].as_f64().unwrap_or(0.0)),
        int(stop["undelivered"].as_f64().unwrap_or(0.0))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn integers_have_thousands_separators() {
        assert_eq!(int(0.0), "0");
        assert_eq!(int(999.4), "999");
        assert_eq!(int(1234.0), "1,234");
        assert_eq!(int(6_950_000.0), "6,950,000");
        assert_eq!(int(-1234.0), "-1,234");
        assert_eq!(int(f64::NAN), "–");
    }

    #[test]
    fn deltas_are_per_name_and_never_negative() {
        let before = BTreeMap::from([
            (
                1,
                ProgCounters {
                    run_time_ns: 100,
                    run_cnt: 1,
                },
            ),
            (
                2,
                ProgCounters {
                    run_time_ns: 50,
                    run_cnt: 5,
                },
            ),
        ]);
        let after = BTreeMap::from([
            (
                1,
                ProgCounters {
                    run_time_ns: 1100,
                    run_cnt: 6,
                },
            ),
            (
                2,
                ProgCounters {
                    run_time_ns: 10,
                    run_cnt: 1,
                },
            ),
        ]);
        let names = BTreeMap::from([(1, "kfree_skb".to_owned())]);
        let d = deltas(&before, &after, &names);
        assert_eq!(
            d["kfree_skb"],
            ProgCounters {
                run_time_ns: 1000,
                run_cnt: 5
            }
        );
        assert_eq!(d["prog 2"], ProgCounters::default());
        assert_eq!(ns_per_event(d["kfree_skb"]), Some(200.0));
        assert_eq!(ns_per_event(d["prog 2"]), None);
    }

    #[test]
    fn failure_reasons_name_the_cause() {
        let status = ExitStatus::default();
        let kprobe = "ERROR: Unknown error -1: couldn't set RLIMIT_MEMLOCK for bpftrace.\n\
                      create_probe_event: open(/sys/kernel/tracing/kprobe_events): No such file or directory\n\
                      ERROR: Error attaching probe: 'kprobe:tcp_retransmit_skb'\n";
        assert!(failure_reason(kprobe, status).starts_with("kprobes unavailable"));
        let headers = "Unable to find kernel headers. Try rebuilding kernel with CONFIG_IKHEADERS=m\n\
                       Traceback (most recent call last):\n";
        assert!(failure_reason(headers, status).starts_with("kernel headers missing"));
        let bt = "definitions.h:4:10: fatal error: 'net/sock.h' file not found\n";
        assert!(failure_reason(bt, status).starts_with("kernel headers missing"));
        assert!(failure_reason("boom\n", status).contains("boom"));
    }

    #[test]
    fn summaries_take_medians_per_program() {
        let window = |ns: u64, cnt: u64| Window {
            storm: Value::Null,
            others: BTreeSet::new(),
            progs: BTreeMap::from([(
                "kfree_skb".to_owned(),
                ProgCounters {
                    run_time_ns: ns,
                    run_cnt: cnt,
                },
            )]),
        };
        let s = summarize(&[window(2000, 10), window(3000, 10), window(10_000, 10)]);
        assert_eq!(s[0].name, "kfree_skb");
        assert_eq!(s[0].ns, 300.0);
        assert_eq!(s[0].events, 10.0);
        assert_eq!(s[1].name, "all programs");
        assert_eq!(s[1].ns, 300.0);
    }
}
