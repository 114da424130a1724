//! Shared helpers: Ctrl-C handling, child processes with deadlines, network namespaces,
//! `kernel.bpf_stats_enabled` and the run-time counters of a process's BPF programs, and the
//! other tracers on the machine.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
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

use crate::cmd::{self, find_program};

use super::{CMD_TIMEOUT, say};

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps, failing when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
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

pub fn send_signal(pid: u32, signal: i32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall on a child we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// A child this command started: stopped (its stop signal, a grace period, then SIGKILL) and
/// reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub pid: u32,
    pub stop_signal: i32,
}

impl Proc {
    pub fn new(child: Child, stop_signal: i32) -> Self {
        Self {
            pid: child.id(),
            child: Some(child),
            stop_signal,
        }
    }

    /// The exit status, if it has exited (reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
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
pub fn read_tail(mut pipe: impl Read + Send + 'static, limit: usize) -> JoinHandle<String> {
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
pub struct Lines {
    pub first: mpsc::Receiver<(Instant, String)>,
    pub rest: JoinHandle<(u64, String)>,
}

pub fn read_lines(pipe: impl Read + Send + 'static) -> Lines {
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
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    check_interrupted()?;
    run_until(cmd, timeout, true)
}

/// [`run_bounded`] for clean-up: runs even after Ctrl-C.
pub fn run_cleanup(cmd: &mut Command) -> Result<()> {
    let shown = cmd::display(cmd);
    let (status, _, stderr) = run_until(cmd, CMD_TIMEOUT, false)?;
    ensure!(
        status.success(),
        "{shown} failed ({status}): {}",
        stderr.trim()
    );
    Ok(())
}

pub fn run_until(
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
pub fn run_checked(cmd: &mut Command) -> Result<String> {
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
pub fn last_json(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("no output"))?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

pub fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// kernel.bpf_stats_enabled

/// Owns `kernel.bpf_stats_enabled` for the bench: restores the value it found on drop.
pub struct BpfStats {
    pub previous: String,
}

pub const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn take() -> Result<Self> {
        let previous = read_trimmed(BPF_STATS)
            .ok_or_else(|| anyhow!("cannot read {BPF_STATS}: no BPF run-time statistics"))?;
        let stats = Self { previous };
        stats.set(false)?;
        Ok(stats)
    }

    pub fn set(&self, on: bool) -> Result<()> {
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
pub struct ProgCounters {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The programs a process holds (by id), with their run-time counters. Program fds carry
/// `run_time_ns`/`run_cnt` in their fdinfo; link fds only name the `prog_id`: for a program held
/// only through a link, the counters come from `bpftool prog show`.
pub fn prog_counters(pid: u32) -> Result<BTreeMap<u32, ProgCounters>> {
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
pub fn bpftool_prog(id: u32) -> Option<Value> {
    let bpftool = find_program("bpftool")?;
    let out =
        run_checked(Command::new(bpftool).args(["-j", "prog", "show", "id", &id.to_string()]))
            .ok()?;
    serde_json::from_str(&out).ok()
}

pub fn bpftool_counters(id: u32) -> ProgCounters {
    let v = bpftool_prog(id).unwrap_or(Value::Null);
    ProgCounters {
        run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
        run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
    }
}

/// Program names by id (`bpftool prog show`; `prog N` when bpftool cannot tell).
pub fn prog_names(ids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, String> {
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
pub type ProgDeltas = BTreeMap<String, ProgCounters>;

pub fn deltas(
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

pub fn total(deltas: &ProgDeltas) -> ProgCounters {
    deltas
        .values()
        .fold(ProgCounters::default(), |acc, d| ProgCounters {
            run_time_ns: acc.run_time_ns + d.run_time_ns,
            run_cnt: acc.run_cnt + d.run_cnt,
        })
}

pub fn ns_per_event(c: ProgCounters) -> Option<f64> {
    (c.run_cnt > 0).then(|| c.run_time_ns as f64 / c.run_cnt as f64)
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// A network namespace this command created (`ip netns add`), deleted on drop with everything
/// in it (veth ends, iptables rules, sysctls).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// `ip netns exec NAME program args...` (ip execs the program: the child's pid is its pid).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
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

pub const NETNS_PREFIX: &str = "obench-";

pub fn netns_name(role: &str) -> String {
    format!("{NETNS_PREFIX}{}-{role}", std::process::id())
}

/// Deletes namespaces left by an earlier bench that was killed (its pid no longer runs).
pub fn remove_stale_namespaces() {
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
// Other tracers on the machine

/// Program types and link types of tracing programs (they run on the storm's events).
pub const TRACING_PROG_TYPES: &[u64] = &[2, 5, 7, 17, 26]; // kprobe, tracepoint, perf_event, raw_tp, tracing
pub const TRACING_LINK_TYPES: &[&str] = &[
    "perf",
    "raw_tracepoint",
    "tracing",
    "kprobe_multi",
    "uprobe_multi",
];

/// Processes other than this one and `ours` that hold tracing BPF programs or links, as
/// `comm[pid]`.
pub fn tracing_holders(ours: Option<u32>) -> BTreeSet<String> {
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
pub const QUIET_BUDGET_MS: u64 = 60_000;
/// Longest wait before one run.
pub const QUIET_WAIT: Duration = Duration::from_secs(10);
pub static QUIET_SPENT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Waits (bounded per run and in total) until no other process holds tracing programs; returns
/// those still there.
pub fn wait_for_quiet(ours: Option<u32>) -> Result<BTreeSet<String>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
