//! What is measured besides the storms' load: observer itself (started and watched), and the
//! other tools (bcc, bpftrace, libbpf-tools): do they start here, and what do they cost on the
//! refused storm.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use super::{
    BenchArgs, Bins, ONE_BY_ONE_ARGS, START_TIMEOUT, TOOL_START_TIMEOUT,
    empty_programs::{Attach, EmptyPrograms},
    harness::{
        BpfStats, Lines, Netns, Proc, check_interrupted, netns_name, ns_per_event, prog_counters,
        prog_names, read_lines, read_tail, run_bounded, run_checked, total,
    },
    refused::{Window, refused_args, storm_window},
    say,
    stats::{int, ns_opt},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Default,
    OneByOne,
}

impl Export {
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Export::Default => &[],
            Export::OneByOne => ONE_BY_ONE_ARGS,
        }
    }
}

pub struct Observer {
    pub proc: Proc,
    pub lines: Option<Lines>,
    pub names: BTreeMap<u32, String>,
    /// Spawn to `start` record.
    pub startup: Duration,
    pub start: Value,
}

impl Observer {
    pub fn start(bins: &Bins, export: Export, tag: &str) -> Result<Self> {
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

    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// SIGINT, then its `stop` record (None if it wrote none) and the number of lines it wrote.
    pub fn stop(mut self) -> (Option<Value>, u64) {
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
    pub fn attached(&self) -> (usize, usize) {
        let programs = self.start["programs"].as_array();
        let total = programs.map_or(0, Vec::len);
        let attached = programs.map_or(0, |p| p.iter().filter(|p| p["attached"] == true).count());
        (attached, total)
    }
}

pub fn tail_of_file(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (log: {})", tail.join(" | "), path.display())
}

// ---------------------------------------------------------------------------------------------
// Other tools

#[derive(Debug)]
pub struct ToolSpec {
    pub label: &'static str,
    pub package: &'static str,
    /// A file the package installs (presence check).
    pub installs: &'static str,
    pub argv: &'static [&'static str],
}

/// In a tool's argv: the observer binary under test.
pub const OBSERVER_ARGV0: &str = "@observer";

/// The floor for any tool on classic tracepoints: empty programs on the tracepoints a refused
/// connect hits (what the kernel spends building records and calling BPF, nothing more).
pub const FLOOR_EMPTY: ToolSpec = ToolSpec {
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
pub const FLOOR_COUNTER: ToolSpec = ToolSpec {
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
pub const OBSERVER_DEFAULT: ToolSpec = ToolSpec {
    label: "observer, default options",
    package: "observer",
    installs: "/",
    argv: &[OBSERVER_ARGV0, "run", "--duration", "600"],
};

/// libbpf-tools tcpstates (perf output per state change): in the tools and the web workload.
pub const TCPSTATES: ToolSpec = ToolSpec {
    label: "libbpf-tools tcpstates",
    package: "libbpf-tools",
    installs: "/usr/sbin/tcpstates",
    argv: &["tcpstates"],
};

pub const TOOLS: &[ToolSpec] = &[
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
    TCPSTATES,
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

/// The empty-program floor on classic tracepoints: `mov r0, 0; exit` on each tracepoint
/// observer uses (what the kernel spends building records and calling BPF, nothing more).
pub const EMPTY_CLASSIC: Subject = Subject::Empty {
    label: "floor: empty programs (bpf(2)) on observer's 6 classic tracepoints",
    how: Attach::Classic,
};

/// Trivial programs on the tracepoints the retransmit storm hits, measured on it (1 run each).
pub const RETRANS_FLOORS: &[Subject] = &[
    Subject::Empty {
        label: "empty programs (bpf(2), observer's 6 classic tracepoints)",
        how: Attach::Classic,
    },
    Subject::Tool(&ToolSpec {
        label: "a counter per event (`@[cpu] = count()`)",
        package: "bpftrace",
        installs: "/usr/bin/bpftrace",
        argv: &[
            "bpftrace",
            "-e",
            "tracepoint:tcp:tcp_retransmit_skb { @a[cpu] = count(); } \
             tracepoint:skb:kfree_skb { @b[cpu] = count(); }",
        ],
    }),
];

#[derive(Debug)]
pub struct ToolResult {
    pub label: &'static str,
    pub outcome: ToolOutcome,
}

#[derive(Debug)]
pub enum ToolOutcome {
    NotStarted(String),
    Measured {
        programs: Vec<String>,
        cost: Box<Window>,
        /// The run without the tool just before it started, and the run with it (stats off).
        none: Box<Window>,
        rate: Box<Window>,
    },
}

pub fn measure_tools(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Vec<ToolResult>> {
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

/// "observer, default options" -> "observer"; "floor: bpftrace, empty ..." -> "floor".
pub fn short_label(label: &str) -> &str {
    label.split([',', ':']).next().unwrap_or(label)
}

/// [`install_package`] when `installs` (a file of the package) is missing.
pub fn install_package_if_missing(package: &str, installs: &str, no_install: bool) -> Result<()> {
    if Path::new(installs).exists() {
        return Ok(());
    }
    install_package(package, no_install)
}

/// apt-get installs a package unless told not to; fails with a sentence for the report.
pub fn install_package(package: &str, no_install: bool) -> Result<()> {
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

pub struct StartedTool {
    pub proc: Proc,
    pub _stdout: Option<JoinHandle<String>>,
}

/// The names of a started tool's programs, and what `measure` made of storms run while it
/// was attached (it gets the tool's pid and program names, as `storm_window` watches them).
pub type Attached<T> = (Vec<String>, T);

/// Starts `tool`, runs `measure` while it is attached, and stops it (`Ok(Err(why))`: it did
/// not start).
pub fn with_tool<T>(
    tool: &'static ToolSpec,
    observer: &Path,
    measure: impl FnOnce(Option<(u32, &BTreeMap<u32, String>)>) -> Result<T>,
) -> Result<std::result::Result<Attached<T>, String>> {
    with_subject(Subject::Tool(tool), observer, |watched, _| measure(watched))
}

/// What a round attaches: a tool (a process of its own) or empty programs this process loads.
#[derive(Clone, Copy, Debug)]
pub enum Subject {
    Tool(&'static ToolSpec),
    Empty { label: &'static str, how: Attach },
}

impl Subject {
    pub fn label(self) -> &'static str {
        match self {
            Subject::Tool(tool) => tool.label,
            Subject::Empty { label, .. } => label,
        }
    }

    /// Why it cannot start here (its package is not installed).
    pub fn missing(self) -> Option<String> {
        match self {
            Subject::Tool(tool) => (!Path::new(tool.installs).exists())
                .then(|| format!("not installed ({})", tool.installs)),
            Subject::Empty { .. } => None,
        }
    }
}

/// Attaches `subject`, runs `measure` while it is attached, and detaches it (`Ok(Err(why))`: it
/// did not start). `measure` gets the process holding the programs with their names (this
/// process for empty programs) and the daemon's pid (None for empty programs: no daemon).
pub fn with_subject<T>(
    subject: Subject,
    observer: &Path,
    measure: impl FnOnce(Option<(u32, &BTreeMap<u32, String>)>, Option<u32>) -> Result<T>,
) -> Result<std::result::Result<Attached<T>, String>> {
    match subject {
        Subject::Tool(tool) => {
            let mut started = match start_tool(tool, observer)? {
                Ok(started) => started,
                Err(why) => return Ok(Err(why)),
            };
            let pid = started.proc.pid;
            let names = prog_names(prog_counters(pid)?.keys().copied());
            let measured = measure(Some((pid, &names)), Some(pid));
            started.proc.stop(Duration::from_secs(5));
            Ok(Ok((names.into_values().collect(), measured?)))
        }
        Subject::Empty { how, .. } => {
            check_interrupted()?;
            let empty = match EmptyPrograms::attach(how) {
                Ok(empty) => empty,
                Err(e) => return Ok(Err(format!("{e:#}"))),
            };
            let measured = measure(Some((std::process::id(), &empty.names)), None);
            let names = empty.names.values().cloned().collect();
            drop(empty);
            Ok(Ok((names, measured?)))
        }
    }
}

/// Starts a tool and waits until it holds BPF programs and has run for a second with them
/// (`Ok(Err(why))`: it did not start).
pub fn start_tool(
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
pub fn failure_reason(stderr: &str, status: ExitStatus) -> String {
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

pub fn last_line(text: &str) -> String {
    clip(
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or(""),
    )
}

pub fn clip(line: &str) -> String {
    let line = line.trim().replace('`', "'");
    if line.chars().count() > 140 {
        let short: String = line.chars().take(140).collect();
        format!("{short}...")
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
