//! `observer check`: can observer run on this host, fully, degraded or not at all, and why.
//!
//! Each check is one line of a table: a name, a verdict and a detail. `OK`: as `observer run`
//! needs it. `WARN`: observer runs without it, with something missing (the detail says what).
//! `FAIL`: `observer run` cannot start. The worst verdict is the outcome and the exit code
//! (0, 1, 2), so a deployment script can run `observer check` first.
//!
//! The checks do what `observer run` does at start-up, up to actually loading and attaching the
//! programs (then detached at once), so their verdicts are the kernel's, not guesses. Like
//! `observer run`, they mount tracefs when it is not mounted.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use crate::{
    config::{self, Config, ConfigError, OutputTarget, Settings},
    kernel::{btf::KernelBtf, loader, perf_ring, tracefs},
    privileges,
};

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// As `observer run` needs it.
    Ok,
    /// observer runs, without what the detail names.
    Warn,
    /// `observer run` cannot start.
    Fail,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    /// Short, without spaces (`tracepoint:tcp:tcp_retransmit_skb`), so scripts can split lines.
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
}

impl CheckLine {
    pub fn new(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            verdict,
            detail: detail.into(),
        }
    }

    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Ok, detail)
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Warn, detail)
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Fail, detail)
    }
}

/// What the checks add up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every check passed.
    Full,
    /// observer can run, without what the `WARN` lines name.
    Degraded,
    /// `observer run` cannot start (see the `FAIL` lines).
    CannotRun,
}

impl Outcome {
    /// The exit code of `observer check`.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Full => 0,
            Outcome::Degraded => 1,
            Outcome::CannotRun => 2,
        }
    }
}

/// The worst verdict decides.
pub fn outcome(lines: &[CheckLine]) -> Outcome {
    match lines.iter().map(|l| l.verdict).max() {
        None | Some(Verdict::Ok) => Outcome::Full,
        Some(Verdict::Warn) => Outcome::Degraded,
        Some(Verdict::Fail) => Outcome::CannotRun,
    }
}

/// The closing sentence: the outcome and the checks responsible for it.
pub fn summary(lines: &[CheckLine]) -> String {
    let named = |v: Verdict| {
        lines
            .iter()
            .filter(|l| l.verdict == v)
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match outcome(lines) {
        Outcome::Full => "observer can run fully".to_owned(),
        Outcome::Degraded => format!(
            "observer can run, degraded (WARN: {})",
            named(Verdict::Warn)
        ),
        Outcome::CannotRun => format!("observer cannot run (FAIL: {})", named(Verdict::Fail)),
    }
}

/// The table, one check per line (name, verdict, detail), then the summary.
pub fn render(lines: &[CheckLine]) -> String {
    let width = lines
        .iter()
        .map(|l| l.name.len())
        .chain(["CHECK".len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("{:<width$}  {:<7} DETAIL\n", "CHECK", "VERDICT");
    for l in lines {
        // Details are one line each: a multi-line error would break the table for scripts.
        let detail = l.detail.split_whitespace().collect::<Vec<_>>().join(" ");
        let _ = writeln!(out, "{:<width$}  {:<7} {detail}", l.name, l.verdict.label());
    }
    out.push_str(&summary(lines));
    out.push('\n');
    out
}

/// Runs every check, with the configuration at `config_path` (else the default file when it
/// exists) deciding how the programs are loaded and where the output goes.
pub fn run_checks(config_path: Option<&Path>) -> Vec<CheckLine> {
    let mut lines = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    lines.push(kernel_line(release.as_deref()));

    let path = config::choose_path(config_path);
    let loaded = path
        .as_deref()
        .map(|p| Config::load(p).and_then(|c| Settings::resolve(&c)));
    lines.push(config_line(path.as_deref(), loaded.as_ref()));
    // An invalid file is reported above; the remaining checks use the defaults.
    let settings = match loaded {
        Some(Ok(settings)) => settings,
        _ => match Settings::resolve(&Config::default()) {
            Ok(settings) => settings,
            Err(e) => {
                lines.push(CheckLine::fail("config", format!("defaults: {e}")));
                return lines;
            }
        },
    };

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = privileges::effective_caps(&status);
    lines.push(privileges_line(caps));
    lines.push(btf_line());
    let tracefs = tracefs_lines(&mut lines);
    lines.push(kallsyms_line(
        std::fs::read_to_string("/proc/kallsyms")
            .map(|text| text.lines().next().unwrap_or_default().to_owned())
            .map_err(|e| e.to_string()),
    ));
    lines.push(memlock_line(
        release.as_deref().and_then(parse_release),
        memlock_limit(),
    ));
    if let Some(tracefs) = &tracefs {
        lines.extend(tracepoint_lines(tracefs));
    }
    program_lines(&settings, &mut lines);
    lines.push(context_line(caps, rule_tool().as_deref()));
    lines.push(bpf_stats_line(
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok(),
    ));
    lines.push(instances_line(&other_instances()));
    lines.push(output_line(&settings.output.target));
    lines
}

/// `major.minor` of a kernel release (`6.18.44-fc-v669` -> (6, 18)).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The kernel release. Version checks proper are the tracepoint and program lines' business:
/// backports make version numbers a poor guide. Only the privilege model is version-bound.
pub fn kernel_line(release: Option<&str>) -> CheckLine {
    match release {
        None => CheckLine::warn("kernel", "cannot read /proc/sys/kernel/osrelease"),
        Some(r) => match parse_release(r) {
            Some(v) if v < (5, 8) => CheckLine::ok(
                "kernel",
                format!("{r} (before 5.8: no CAP_BPF/CAP_PERFMON, observer needs CAP_SYS_ADMIN)"),
            ),
            Some(_) => CheckLine::ok("kernel", r),
            None => CheckLine::warn("kernel", format!("cannot parse the release `{r}`")),
        },
    }
}

pub fn config_line(
    path: Option<&Path>,
    loaded: Option<&Result<Settings, ConfigError>>,
) -> CheckLine {
    match (path, loaded) {
        (Some(path), Some(Ok(s))) => CheckLine::ok(
            "config",
            format!(
                "{}: valid (output {}, export_per_flow {}, max_flows {})",
                path.display(),
                s.output.target,
                s.export_per_flow,
                s.max_flows
            ),
        ),
        (_, Some(Err(e))) => CheckLine::fail("config", e.to_string()),
        _ => CheckLine::ok(
            "config",
            format!(
                "none: {} does not exist, built-in defaults apply",
                config::DEFAULT_PATH
            ),
        ),
    }
}

/// Capabilities that matter to observer, by number (include/uapi/linux/capability.h) and why.
const CAPS: [(u32, &str, &str); 8] = [
    (
        21,
        "CAP_SYS_ADMIN",
        "setns() into network namespaces; mount tracefs",
    ),
    (39, "CAP_BPF", "load programs, create maps"),
    (
        38,
        "CAP_PERFMON",
        "attach tracing programs, open perf buffers",
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "read tracefs formats when not running as uid 0",
    ),
    (34, "CAP_SYSLOG", "read kernel addresses in /proc/kallsyms"),
    (
        19,
        "CAP_SYS_PTRACE",
        "open /proc/PID/ns/net of other processes",
    ),
    (12, "CAP_NET_ADMIN", "read firewall rule counters"),
    (
        24,
        "CAP_SYS_RESOURCE",
        "raise RLIMIT_MEMLOCK on kernels before 5.11",
    ),
];

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_NET_ADMIN: u32 = 12;

/// The context worker (listener queues, SNMP counters, sysctls and firewall rules, read inside
/// each network namespace): what it can do with `caps`, and whether a rule-listing tool exists.
pub fn context_line(caps: Option<u64>, rule_tool: Option<&str>) -> CheckLine {
    const NAME: &str = "context";
    let caps = caps.unwrap_or(0);
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    if !has(CAP_SYS_ADMIN) {
        return CheckLine::warn(
            NAME,
            "no CAP_SYS_ADMIN (setns): no listener_drops, netfilter_drop or sysctl_change records",
        );
    }
    let mut missing = Vec::new();
    if !has(CAP_SYS_PTRACE) {
        missing.push(
            "no CAP_SYS_PTRACE: namespaces known only through processes (containers) are not read",
        );
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("no CAP_NET_ADMIN: drops are not attributed to firewall rules");
    }
    if rule_tool.is_none() {
        missing.push(
            "neither nft nor iptables-save found: drops are not attributed to firewall rules",
        );
    }
    match (missing.is_empty(), rule_tool) {
        (true, Some(tool)) => CheckLine::ok(
            NAME,
            format!("every network namespace is read (rules through {tool})"),
        ),
        _ => CheckLine::warn(NAME, missing.join("; ")),
    }
}

/// Where the context worker looks for `nft` and `iptables-save`: PATH, then the sbin
/// directories (a service's PATH may lack them).
fn rule_tool() -> Option<String> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    ["nft", "iptables-save"].into_iter().find_map(|tool| {
        dirs.iter()
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

pub fn privileges_line(caps: Option<u64>) -> CheckLine {
    let Some(caps) = caps else {
        return CheckLine::fail("privileges", "cannot read CapEff from /proc/self/status");
    };
    let present: Vec<&str> = CAPS
        .iter()
        .filter(|(bit, _, _)| caps & (1u64 << bit) != 0)
        .map(|(_, name, _)| *name)
        .collect();
    let present = if present.is_empty() {
        "none of the relevant ones".to_owned()
    } else {
        present.join(", ")
    };
    match privileges::missing(caps) {
        None => CheckLine::ok("privileges", format!("effective: {present}")),
        Some(what) => CheckLine::fail(
            "privileges",
            format!(
                "missing {what} (or CAP_SYS_ADMIN): cannot load or attach the programs; effective: {present}"
            ),
        ),
    }
}

fn btf_line() -> CheckLine {
    match KernelBtf::from_sys().and_then(|btf| btf.struct_offsets()) {
        Ok(o) => CheckLine::ok(
            "btf",
            format!(
                "{}: sk_buff.cb at {}, tcp_skb_cb.tcp_gso_segs at {}, sock net at {}, net ns.inum at {}",
                crate::kernel::btf::VMLINUX_BTF,
                o.skb_cb,
                o.tcp_skb_cb_gso_segs,
                o.sock_net,
                o.net_ns_inum
            ),
        ),
        Err(e) => CheckLine::fail("btf", error_chain(&e)),
    }
}

/// Mount points of tracefs in /proc/self/mountinfo text.
pub fn tracefs_mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split_whitespace().next()? == "tracefs")
                .then(|| before.split_whitespace().nth(4).map(str::to_owned))
                .flatten()
        })
        .collect()
}

/// tracefs: found, mounted by us, or why not. Returns it for the tracepoint checks.
fn tracefs_lines(lines: &mut Vec<CheckLine>) -> Option<tracefs::TraceFs> {
    let mounted_before = [tracefs::TRACEFS_PATH, tracefs::DEBUGFS_TRACING_PATH]
        .into_iter()
        .find(|p| Path::new(p).join("events").is_dir());
    match tracefs::TraceFs::locate_or_mount() {
        Ok(t) => {
            let detail = match mounted_before {
                Some(_) => format!("mounted at {}", t.root().display()),
                None => format!(
                    "was not mounted: mounted it at {} (as `observer run` does; needs CAP_SYS_ADMIN)",
                    t.root().display()
                ),
            };
            lines.push(CheckLine::ok("tracefs", detail));
            Some(t)
        }
        Err(e) => {
            let mounts = tracefs_mount_points(
                &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            );
            let detail = match mounts.first() {
                // Mounted, but this process may not look inside (tracefs is root-only).
                Some(at) => format!(
                    "mounted at {at} but not readable by this process (uid {}): run as uid 0 or grant CAP_DAC_READ_SEARCH ({})",
                    current_uid(),
                    error_chain(&e)
                ),
                None => error_chain(&e),
            };
            lines.push(CheckLine::fail("tracefs", detail));
            None
        }
    }
}

/// The tracepoints observer attaches to, and what is missing without each.
const TRACEPOINTS: [(&str, &str, &str); 6] = [
    (
        "tcp",
        "tcp_retransmit_skb",
        "retransmits and SYN retransmits",
    ),
    ("tcp", "tcp_retransmit_synack", "SYN-ACK retransmits"),
    ("tcp", "tcp_send_reset", "resets sent"),
    ("tcp", "tcp_receive_reset", "resets received"),
    ("skb", "kfree_skb", "drops"),
    (
        "sock",
        "inet_sock_set_state",
        "connects, accepts and closes",
    ),
];

fn tracepoint_lines(tracefs: &tracefs::TraceFs) -> Vec<CheckLine> {
    TRACEPOINTS
        .iter()
        .map(|&(category, event, what)| {
            let name = format!("tracepoint:{category}:{event}");
            let format = match tracefs.format(category, event) {
                Ok(f) => f,
                Err(e) => {
                    return CheckLine::warn(
                        name,
                        format!("{}: no {what} will be reported", error_chain(&e)),
                    );
                }
            };
            let layout = match event {
                "tcp_retransmit_skb" => tracefs::retransmit_skb_layout(&format).map(drop),
                "tcp_retransmit_synack" => tracefs::retransmit_synack_layout(&format).map(drop),
                "tcp_send_reset" => tracefs::send_reset_layout(&format).map(drop),
                "tcp_receive_reset" => tracefs::receive_reset_layout(&format).map(drop),
                "kfree_skb" => tracefs::kfree_skb_layout(&format).map(drop),
                _ => tracefs::set_state_layout(&format).map(drop),
            };
            match layout {
                Ok(()) => CheckLine::ok(
                    name,
                    format!(
                        "id {}, {} fields, layout understood",
                        format.id,
                        format.fields.len()
                    ),
                ),
                Err(e) => CheckLine::warn(
                    name,
                    format!(
                        "unexpected layout ({}): no {what} will be reported",
                        error_chain(&e)
                    ),
                ),
            }
        })
        .collect()
}

/// Whether kernel addresses are visible in /proc/kallsyms, from its first line (addresses are
/// printed as zeros to readers without CAP_SYSLOG, depending on kernel.kptr_restrict).
pub fn kallsyms_line(first_line: Result<String, String>) -> CheckLine {
    const NAME: &str = "kernel-symbols";
    let line = match first_line {
        Ok(line) => line,
        Err(e) => {
            return CheckLine::warn(
                NAME,
                format!(
                    "cannot read /proc/kallsyms ({e}): drop locations are shown as raw addresses"
                ),
            );
        }
    };
    let address = line
        .split_whitespace()
        .next()
        .and_then(|a| u64::from_str_radix(a, 16).ok());
    match address {
        Some(a) if a != 0 => CheckLine::ok(
            NAME,
            "/proc/kallsyms shows addresses: drop locations are named",
        ),
        _ => CheckLine::warn(
            NAME,
            "/proc/kallsyms hides addresses (needs CAP_SYSLOG, see kernel.kptr_restrict): drop locations are shown as raw addresses",
        ),
    }
}

fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `struct rlimit` through a valid, exclusive pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur)
}

/// Before 5.11 BPF maps are charged to RLIMIT_MEMLOCK; since, to the memory cgroup.
pub fn memlock_line(version: Option<(u32, u32)>, limit: Option<u64>) -> CheckLine {
    const NAME: &str = "memlock";
    const ENOUGH: u64 = 256 * 1024 * 1024;
    match (version, limit) {
        (Some(v), _) if v >= (5, 11) => CheckLine::ok(
            NAME,
            "maps are charged to the memory cgroup (5.11+), not RLIMIT_MEMLOCK",
        ),
        (_, Some(l)) if l == libc::RLIM_INFINITY || l >= ENOUGH => {
            CheckLine::ok(NAME, "RLIMIT_MEMLOCK is large enough")
        }
        (_, l) => CheckLine::warn(
            NAME,
            format!(
                "kernel before 5.11 and RLIMIT_MEMLOCK is {}: map creation may fail; raise it (systemd: LimitMEMLOCK=infinity)",
                l.map_or("unknown".to_owned(), |l| format!("{l} bytes"))
            ),
        ),
    }
}

/// Loads the real programs with the configured options, opens the perf buffers and attaches
/// the programs, in `observer run`'s order, then detaches everything.
fn program_lines(settings: &Settings, lines: &mut Vec<CheckLine>) {
    let mut loaded = match loader::load(&settings.load_options()) {
        Ok(loaded) => loaded,
        Err(e) => {
            lines.push(CheckLine::fail("programs", format!("{e:#}")));
            return;
        }
    };
    let mut maps: Vec<String> = loaded
        .ebpf
        .maps()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| format!("{name} {}", map_kind(map)))
        .collect();
    maps.sort();
    // Kept open until the programs are attached and detached again, as in `observer run`.
    let (buffers_line, _buffers) = perf_buffers(&mut loaded);
    if let Err(e) = loaded.attach_all() {
        lines.push(CheckLine::fail("programs", format!("{e:#}")));
        lines.push(CheckLine::ok("maps", maps.join(", ")));
        lines.push(buffers_line);
        return;
    }
    let attached = loaded.programs.iter().filter(|p| p.attached).count();
    let total = loaded.programs.len();
    lines.push(CheckLine::new(
        "programs",
        if attached == total {
            Verdict::Ok
        } else {
            Verdict::Warn
        },
        format!("{attached} of {total} loaded and attached (detached again)"),
    ));
    for p in &loaded.programs {
        let name = format!("program:{}", p.name);
        lines.push(if p.attached {
            let fallback = p
                .raw_unavailable
                .as_deref()
                .map(|why| format!(" (raw tracepoint unavailable: {why})"))
                .unwrap_or_default();
            CheckLine::ok(
                name,
                format!("attached to {} as {}{fallback}", p.tracepoint, p.kind),
            )
        } else {
            CheckLine::warn(
                name,
                format!(
                    "not attached to {}: {}",
                    p.tracepoint,
                    p.error.as_deref().unwrap_or("unknown reason")
                ),
            )
        });
    }
    lines.push(CheckLine::ok("maps", maps.join(", ")));
    lines.push(buffers_line);
    loaded.detach_all();
}

/// The map types observer uses (an unknown one is still named by its aya type).
fn map_kind(map: &aya::maps::Map) -> String {
    use aya::maps::Map;
    let (kind, data) = match map {
        Map::Array(d) => ("array", d),
        Map::HashMap(d) => ("hash", d),
        Map::LruHashMap(d) => ("lru_hash", d),
        Map::PerCpuArray(d) => ("percpu_array", d),
        Map::PerCpuHashMap(d) => ("percpu_hash", d),
        Map::PerfEventArray(d) => ("perf_event_array", d),
        Map::RingBuf(d) => ("ringbuf", d),
        _ => return "(other type)".to_owned(),
    };
    match data.info() {
        Ok(info) => format!("({kind}, {} entries)", info.max_entries()),
        Err(_) => format!("({kind})"),
    }
}

/// Opens a one-page perf buffer on every online CPU, as `observer run` does with more pages.
fn perf_buffers(loaded: &mut loader::Loaded) -> (CheckLine, Vec<perf_ring::PerfRing>) {
    const NAME: &str = "perf-buffers";
    let events = match loaded.take_events() {
        Ok(events) => events,
        Err(e) => return (CheckLine::fail(NAME, format!("{e:#}")), Vec::new()),
    };
    let cpus = match aya::util::online_cpus() {
        Ok(cpus) => cpus,
        Err((path, e)) => {
            return (
                CheckLine::fail(NAME, format!("reading {path}: {e}")),
                Vec::new(),
            );
        }
    };
    match perf_ring::open_all(events, &cpus, 1, 1) {
        Ok(rings) => {
            let line = CheckLine::ok(NAME, format!("opened on {} online CPUs", rings.len()));
            (line, rings)
        }
        Err(e) => (CheckLine::fail(NAME, format!("{e:#}")), Vec::new()),
    }
}

/// /proc/sys/kernel/bpf_stats_enabled: only for measuring observer's own kernel-side cost.
pub fn bpf_stats_line(value: Option<String>) -> CheckLine {
    const NAME: &str = "bpf-stats";
    match value.as_deref().map(str::trim) {
        Some("1") => CheckLine::ok(NAME, "enabled: per-program run time is measured"),
        Some(v) => CheckLine::ok(
            NAME,
            format!(
                "available (kernel.bpf_stats_enabled = {v}; set 1 to measure per-program run time)"
            ),
        ),
        None => CheckLine::warn(
            NAME,
            "/proc/sys/kernel/bpf_stats_enabled is missing (kernel before 5.1): observer's kernel-side cost cannot be measured",
        ),
    }
}

/// Whether a process's `comm` and `cmdline` (NUL-separated) are an `observer run`.
pub fn is_observer_run(comm: &str, cmdline: &[u8]) -> bool {
    comm.trim() == "observer" && cmdline.split(|&b| b == 0).skip(1).any(|arg| arg == b"run")
}

/// Other `observer run` processes: (pid, command line).
fn other_instances() -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            // Processes come and go while we look: a vanished one is simply not running.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            is_observer_run(&comm, &cmdline).then(|| {
                let shown = cmdline
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(String::from_utf8_lossy)
                    .collect::<Vec<_>>()
                    .join(" ");
                (pid, shown)
            })
        })
        .collect();
    found.sort();
    found
}

pub fn instances_line(others: &[(u32, String)]) -> CheckLine {
    const NAME: &str = "instances";
    if others.is_empty() {
        return CheckLine::ok(NAME, "no other `observer run` is running");
    }
    let list = others
        .iter()
        .map(|(pid, cmd)| format!("pid {pid} ({cmd})"))
        .collect::<Vec<_>>()
        .join(", ");
    CheckLine::warn(
        NAME,
        format!("already running: {list}; another instance doubles the kernel-side cost"),
    )
}

fn output_line(target: &OutputTarget) -> CheckLine {
    match target {
        OutputTarget::Stdout => CheckLine::ok("output", "stdout"),
        OutputTarget::File(path) => match file_writable(path) {
            Ok(detail) => CheckLine::ok("output", format!("{}: {detail}", path.display())),
            Err(why) => CheckLine::fail("output", format!("{}: {why}", path.display())),
        },
    }
}

/// Whether this process could append to `path` (or create it), without creating it.
fn file_writable(path: &Path) -> Result<&'static str, String> {
    if path.exists() {
        return match std::fs::OpenOptions::new().append(true).open(path) {
            Ok(_) => Ok("exists, writable"),
            Err(e) => Err(format!("cannot be opened for appending: {e}")),
        };
    }
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => PathBuf::from("."),
        Some(d) => d.to_owned(),
        None => return Err("has no parent directory".to_owned()),
    };
    if !dir.is_dir() {
        return Err(format!("directory {} does not exist", dir.display()));
    }
    if effective_access(&dir, libc::W_OK | libc::X_OK) {
        Ok("will be created")
    } else {
        Err(format!("directory {} is not writable", dir.display()))
    }
}

/// access(2) with the effective ids and capabilities (AT_EACCESS), as `open` will judge.
fn effective_access(path: &Path, mode: libc::c_int) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call; faccessat reads
    // it and touches no other memory.
    unsafe { libc::faccessat(libc::AT_FDCWD, c_path.as_ptr(), mode, libc::AT_EACCESS) == 0 }
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// An error and its sources, `outer: inner: ...` (like anyhow's `{:#}`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, verdict: Verdict) -> CheckLine {
        CheckLine::new(name, verdict, "detail")
    }

    #[test]
    fn the_worst_verdict_decides() {
        assert_eq!(outcome(&[]), Outcome::Full);
        assert_eq!(
            outcome(&[line("a", Verdict::Ok), line("b", Verdict::Ok)]),
            Outcome::Full
        );
        let degraded = [line("a", Verdict::Ok), line("tp", Verdict::Warn)];
        assert_eq!(outcome(&degraded), Outcome::Degraded);
        let fatal = [
            line("a", Verdict::Warn),
            line("privileges", Verdict::Fail),
            line("programs", Verdict::Fail),
        ];
        assert_eq!(outcome(&fatal), Outcome::CannotRun);
        assert_eq!(
            [Outcome::Full, Outcome::Degraded, Outcome::CannotRun].map(Outcome::exit_code),
            [0, 1, 2]
        );
        assert_eq!(summary(&degraded), "observer can run, degraded (WARN: tp)");
        assert_eq!(
            summary(&fatal),
            "observer cannot run (FAIL: privileges, programs)"
        );
    }

    #[test]
    fn the_table_has_one_line_per_check() {
        let lines = [
            CheckLine::ok("kernel", "6.18.44"),
            CheckLine::warn("tracepoint:tcp:tcp_send_reset", "missing:\n  no resets"),
        ];
        let text = render(&lines);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 4, "{text}");
        assert!(rows[0].starts_with("CHECK"));
        let cols: Vec<&str> = rows[1].split_whitespace().collect();
        assert_eq!(cols, ["kernel", "OK", "6.18.44"]);
        let cols: Vec<&str> = rows[2].split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "tracepoint:tcp:tcp_send_reset",
                "WARN",
                "missing:",
                "no",
                "resets"
            ]
        );
        assert_eq!(
            rows[3],
            "observer can run, degraded (WARN: tracepoint:tcp:tcp_send_reset)"
        );
    }

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.1"), Some((6, 1)));
        assert_eq!(parse_release("x"), None);
        assert_eq!(kernel_line(Some("6.18.44")).verdict, Verdict::Ok);
        assert!(kernel_line(Some("5.4.0")).detail.contains("CAP_SYS_ADMIN"));
        assert_eq!(kernel_line(None).verdict, Verdict::Warn);
    }

    #[test]
    fn privileges_follow_the_capabilities() {
        let root = 0x1ff_ffff_ffff;
        assert_eq!(privileges_line(Some(root)).verdict, Verdict::Ok);
        let bpf_perfmon = (1 << 39) | (1 << 38);
        let l = privileges_line(Some(bpf_perfmon));
        assert_eq!(l.verdict, Verdict::Ok);
        assert_eq!(l.detail, "effective: CAP_BPF, CAP_PERFMON");
        let l = privileges_line(Some(root & !((1 << 39) | (1 << 38) | (1 << 21))));
        assert_eq!(l.verdict, Verdict::Fail);
        assert!(
            l.detail.contains("missing CAP_BPF and CAP_PERFMON"),
            "{}",
            l.detail
        );
        assert_eq!(privileges_line(None).verdict, Verdict::Fail);
    }

    #[test]
    fn context_needs_setns_ptrace_and_net_admin() {
        let all = (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE) | (1 << CAP_NET_ADMIN);
        let l = context_line(Some(all), Some("/usr/sbin/nft"));
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.detail);
        let l = context_line(Some((1 << 39) | (1 << 38)), Some("/usr/sbin/nft"));
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(l.detail.contains("CAP_SYS_ADMIN"), "{}", l.detail);
        let l = context_line(Some(1 << CAP_SYS_ADMIN), None);
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(
            l.detail.contains("CAP_SYS_PTRACE")
                && l.detail.contains("CAP_NET_ADMIN")
                && l.detail.contains("nft"),
            "{}",
            l.detail
        );
        assert_eq!(context_line(None, Some("nft")).verdict, Verdict::Warn);
    }

    #[test]
    fn finds_tracefs_mounts() {
        let mountinfo = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                         36 25 0:12 / /sys/kernel/tracing rw,nosuid,nodev - tracefs nodev rw\n";
        assert_eq!(tracefs_mount_points(mountinfo), ["/sys/kernel/tracing"]);
        assert!(tracefs_mount_points("22 1 0:21 / /proc rw - proc proc rw\n").is_empty());
    }

    #[test]
    fn kallsyms_addresses_hidden_or_shown() {
        let shown = kallsyms_line(Ok("ffffffff81000000 T _stext".to_owned()));
        assert_eq!(shown.verdict, Verdict::Ok);
        let hidden = kallsyms_line(Ok("0000000000000000 T _stext".to_owned()));
        assert_eq!(hidden.verdict, Verdict::Warn);
        assert!(hidden.detail.contains("CAP_SYSLOG"));
        assert_eq!(
            kallsyms_line(Err("EACCES".to_owned())).verdict,
            Verdict::Warn
        );
    }

    #[test]
    fn memlock_matters_only_before_5_11() {
        assert_eq!(memlock_line(Some((6, 1)), Some(65536)).verdict, Verdict::Ok);
        assert_eq!(
            memlock_line(Some((5, 4)), Some(65536)).verdict,
            Verdict::Warn
        );
        assert_eq!(
            memlock_line(Some((5, 4)), Some(libc::RLIM_INFINITY)).verdict,
            Verdict::Ok
        );
        assert_eq!(memlock_line(None, None).verdict, Verdict::Warn);
    }

    #[test]
    fn bpf_stats_is_informational_when_present() {
        assert_eq!(bpf_stats_line(Some("0\n".to_owned())).verdict, Verdict::Ok);
        assert_eq!(bpf_stats_line(Some("1\n".to_owned())).verdict, Verdict::Ok);
        assert_eq!(bpf_stats_line(None).verdict, Verdict::Warn);
    }

    #[test]
    fn recognises_observer_run_processes() {
        assert!(is_observer_run(
            "observer\n",
            b"/usr/local/bin/observer\0run\0--config\0/etc/observer/observer.toml\0"
        ));
        assert!(is_observer_run("observer", b"observer\0run\0"));
        assert!(!is_observer_run("observer", b"observer\0check\0"));
        assert!(!is_observer_run("observer", b"observer\0reasons\0--run\0"));
        assert!(!is_observer_run("bash", b"bash\0run\0"));
        // `run` as argv[0] is not the subcommand.
        assert!(!is_observer_run("observer", b"run\0"));
        assert_eq!(instances_line(&[]).verdict, Verdict::Ok);
        let l = instances_line(&[(42, "observer run".to_owned())]);
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(l.detail.contains("pid 42"));
    }

    #[test]
    fn config_lines() {
        assert_eq!(config_line(None, None).verdict, Verdict::Ok);
        let err = Config::parse("max_flows = 1\n", Path::new("/x.toml"))
            .and_then(|c| Settings::resolve(&c));
        let l = config_line(Some(Path::new("/x.toml")), Some(&err));
        assert_eq!(l.verdict, Verdict::Fail);
        assert!(l.detail.contains("max_flows"), "{}", l.detail);
        let ok = Settings::resolve(&Config::default());
        let l = config_line(Some(Path::new("/x.toml")), Some(&ok));
        assert_eq!(l.verdict, Verdict::Ok);
        assert!(l.detail.starts_with("/x.toml: valid"), "{}", l.detail);
    }

    #[test]
    fn output_files_are_checked_without_being_created() {
        let dir = std::env::temp_dir().join(format!("observer-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out.ndjson");
        let l = output_line(&OutputTarget::File(path.clone()));
        assert_eq!(l.verdict, Verdict::Ok, "{}", l.detail);
        assert!(!path.exists());
        let l = output_line(&OutputTarget::File(dir.join("missing/out.ndjson")));
        assert_eq!(l.verdict, Verdict::Fail);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
