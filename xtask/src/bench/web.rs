//! The web workload (section 6; issue 14): nginx on 127.0.0.1 serving a 1.4 KB file with
//! `keepalive_timeout 0`, loaded by `wrk -t1 -c20 -d5s -H "Connection: close"` (one TCP
//! connection per request). In alternated rounds: nothing attached, then observer (default
//! options), empty programs on the same tracepoints (classic and raw) and libbpf-tools
//! tcpstates, each for a throughput run (`kernel.bpf_stats_enabled=0`) and a CPU run (stats
//! on: BPF ns per request per program, the daemon's utime+stime and RSS).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use super::{
    BenchArgs, Bins,
    empty_programs::Attach,
    harness::{
        BpfStats, Proc, ProgDeltas, check_interrupted, deltas, prog_counters, read_tail,
        run_bounded, send_signal, sleep, total, wait_for_quiet,
    },
    say,
    stats::{Runs, int, ns_opt, slowdown_pct},
    tools::{OBSERVER_DEFAULT, Subject, TCPSTATES, install_package_if_missing, with_subject},
};

/// Seconds of load per run (`wrk -d`).
pub const WEB_SECS: u32 = 5;
/// wrk's connections (`-c`) and threads (`-t`).
pub const WRK_CONNECTIONS: u32 = 20;
pub const NGINX_WORKERS: u32 = 2;
/// The served file's size (a small page).
pub const PAGE_BYTES: usize = 1400;

/// A configuration of the rounds besides "nothing attached".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebConfig {
    Observer,
    EmptyClassic,
    EmptyRaw,
    Tcpstates,
}

impl WebConfig {
    pub const ALL: [WebConfig; 4] = [
        WebConfig::Observer,
        WebConfig::EmptyClassic,
        WebConfig::EmptyRaw,
        WebConfig::Tcpstates,
    ];

    pub fn label(self) -> &'static str {
        match self {
            WebConfig::Observer => "`observer run` (default options)",
            WebConfig::EmptyClassic => "floor: empty programs, the same 6 classic tracepoints",
            WebConfig::EmptyRaw => "floor: empty programs, the same 6 raw tracepoints",
            WebConfig::Tcpstates => "libbpf-tools `tcpstates`",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            WebConfig::Observer => "observer",
            WebConfig::EmptyClassic => "empty classic",
            WebConfig::EmptyRaw => "empty raw",
            WebConfig::Tcpstates => "tcpstates",
        }
    }

    fn subject(self) -> Subject {
        match self {
            WebConfig::Observer => Subject::Tool(&OBSERVER_DEFAULT),
            WebConfig::Tcpstates => Subject::Tool(&TCPSTATES),
            WebConfig::EmptyClassic => Subject::Empty {
                label: self.label(),
                how: Attach::Classic,
            },
            WebConfig::EmptyRaw => Subject::Empty {
                label: self.label(),
                how: Attach::Raw,
            },
        }
    }
}

/// What wrk reported for one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wrk {
    pub requests: u64,
    pub secs: f64,
    pub per_sec: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    pub errors: u64,
}

/// The daemon's own use over a CPU run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DaemonUse {
    /// utime + stime, ns.
    pub cpu_ns: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// One wrk run.
#[derive(Clone, Debug, Default)]
pub struct WebWindow {
    pub wrk: Wrk,
    /// Per-program deltas (stats on and something watched).
    pub progs: ProgDeltas,
    pub daemon: Option<DaemonUse>,
    /// Other processes with tracing programs during the run.
    pub others: BTreeSet<String>,
}

impl WebWindow {
    pub fn rate(&self) -> f64 {
        self.wrk.per_sec
    }

    fn per_request(&self, x: f64) -> f64 {
        if self.wrk.requests > 0 {
            x / self.wrk.requests as f64
        } else {
            f64::NAN
        }
    }

    pub fn bpf_ns_per_request(&self) -> f64 {
        self.per_request(total(&self.progs).run_time_ns as f64)
    }

    pub fn runs_per_request(&self) -> f64 {
        self.per_request(total(&self.progs).run_cnt as f64)
    }

    pub fn daemon_ns_per_request(&self) -> f64 {
        self.daemon.map_or(f64::NAN, |d| self.per_request(d.cpu_ns))
    }
}

/// One configuration's runs.
#[derive(Debug)]
pub struct WebRow {
    pub config: WebConfig,
    /// Stats off, and the run with nothing attached of the same round.
    pub rate: Vec<WebWindow>,
    pub paired_none: Vec<WebWindow>,
    /// Stats on.
    pub cost: Vec<WebWindow>,
    pub programs: Vec<String>,
    pub not_started: Option<String>,
}

#[derive(Debug, Default)]
pub struct Web {
    /// Why the workload did not run (nginx or wrk missing).
    pub skipped: Option<String>,
    pub none: Vec<WebWindow>,
    pub rows: Vec<WebRow>,
}

impl Web {
    pub fn row(&self, config: WebConfig) -> Option<&WebRow> {
        self.rows
            .iter()
            .find(|r| r.config == config && !r.cost.is_empty())
    }
}

/// Per-run values of the windows (runs with other tracers attached are marked).
pub fn runs(windows: &[WebWindow], f: impl Fn(&WebWindow) -> f64) -> Runs {
    Runs {
        values: windows.iter().map(f).collect(),
        marked: windows.iter().map(|w| !w.others.is_empty()).collect(),
    }
}

pub fn measure_web(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Web> {
    for (package, binary) in [("nginx-light", "/usr/sbin/nginx"), ("wrk", "/usr/bin/wrk")] {
        if let Err(e) = install_package_if_missing(package, binary, args.no_install) {
            say(&format!("web workload not measured: {e:#}"));
            return Ok(Web {
                skipped: Some(format!("{package}: {e:#}")),
                ..Web::default()
            });
        }
    }
    let tcpstates_missing =
        install_package_if_missing(TCPSTATES.package, TCPSTATES.installs, args.no_install).err();
    stop_stale_nginx(&bins.logs);
    let nginx = Nginx::start(
        &bins
            .logs
            .join(format!("{NGINX_DIR_PREFIX}{}", std::process::id())),
    )?;
    say(&format!(
        "nginx on 127.0.0.1:{} ({NGINX_WORKERS} workers, keepalive_timeout 0, {PAGE_BYTES} byte page)",
        nginx.port
    ));
    // Warm-up: page cache, nginx's first connections.
    run_wrk(nginx.port, 1)?;
    let mut web = Web {
        rows: WebConfig::ALL
            .iter()
            .map(|&config| WebRow {
                config,
                rate: Vec::new(),
                paired_none: Vec::new(),
                cost: Vec::new(),
                programs: Vec::new(),
                not_started: match config {
                    WebConfig::Tcpstates => tcpstates_missing.as_ref().map(|e| format!("{e:#}")),
                    _ => None,
                },
            })
            .collect(),
        ..Web::default()
    };
    for round in 0..args.rounds {
        check_interrupted()?;
        let none = web_window(nginx.port, None, None, stats, false)?;
        let mut line = format!("round {}: none {}", round + 1, int(none.rate()));
        for row in &mut web.rows {
            if row.not_started.is_some() {
                continue;
            }
            let measured =
                with_subject(row.config.subject(), &bins.observer, |watched, daemon| {
                    let rate = web_window(nginx.port, watched, daemon, stats, false)?;
                    let cost = web_window(nginx.port, watched, daemon, stats, true)?;
                    Ok((rate, cost))
                })?;
            let (programs, (rate, cost)) = match measured {
                Ok(measured) => measured,
                Err(why) => {
                    say(&format!("{}: not started: {why}", row.config.label()));
                    row.not_started = Some(why);
                    continue;
                }
            };
            let all = total(&cost.progs);
            let _ = std::fmt::Write::write_fmt(
                &mut line,
                format_args!(
                    "; {} {} ({} BPF ns/request, {} ns/run{})",
                    row.config.short(),
                    int(rate.rate()),
                    int(cost.bpf_ns_per_request()),
                    ns_opt(super::harness::ns_per_event(all)),
                    cost.daemon.map_or(String::new(), |_| format!(
                        ", daemon {} ns/request",
                        int(cost.daemon_ns_per_request())
                    ))
                ),
            );
            row.programs = programs;
            row.rate.push(rate);
            row.paired_none.push(none.clone());
            row.cost.push(cost);
        }
        say(&format!("web {line} requests/s"));
        web.none.push(none);
    }
    drop(nginx);
    Ok(web)
}

/// One wrk run with `watched` (pid, program names) attached or nothing; with `cost`, BPF stats
/// are on and the program counters and the daemon's CPU time are taken around it.
fn web_window(
    port: u16,
    watched: Option<(u32, &BTreeMap<u32, String>)>,
    daemon: Option<u32>,
    stats: &BpfStats,
    cost: bool,
) -> Result<WebWindow> {
    let ours = watched.map(|(pid, _)| pid);
    let mut others = wait_for_quiet(ours)?;
    let watched = watched.filter(|_| cost);
    let daemon = daemon.filter(|_| cost);
    stats.set(cost)?;
    let before = match watched {
        Some((pid, _)) => prog_counters(pid)?,
        None => BTreeMap::new(),
    };
    let cpu_before = daemon.and_then(cpu_ticks);
    let outcome = run_wrk(port, WEB_SECS);
    let cpu_after = daemon.and_then(cpu_ticks);
    let after = match watched {
        Some((pid, _)) => prog_counters(pid),
        None => Ok(BTreeMap::new()),
    };
    stats.set(false)?;
    let wrk = outcome?;
    let after = after?;
    let progs = match watched {
        Some((_, names)) => deltas(&before, &after, names),
        None => ProgDeltas::new(),
    };
    let daemon = match (daemon, cpu_before, cpu_after) {
        (Some(pid), Some(b), Some(a)) => {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            Some(DaemonUse {
                cpu_ns: a.saturating_sub(b) as f64 * 1e9 / clock_ticks_per_sec(),
                rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
                hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
            })
        }
        _ => None,
    };
    others.extend(super::harness::tracing_holders(ours));
    Ok(WebWindow {
        wrk,
        progs,
        daemon,
        others,
    })
}

fn run_wrk(port: u16, secs: u32) -> Result<Wrk> {
    let (status, stdout, stderr) = run_bounded(
        Command::new("wrk").args([
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{secs}s"),
            "-H",
            "Connection: close",
            &format!("http://127.0.0.1:{port}/"),
        ]),
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    if !status.success() {
        bail!("wrk failed ({status}): {}", stderr.trim());
    }
    parse_wrk(&stdout)
}

/// Parses wrk's report: `N requests in 5.00s, ...`, `Requests/sec: X`, socket errors and
/// non-2xx/3xx responses.
pub fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut wrk = Wrk::default();
    let mut seen = (false, false);
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            wrk.per_sec = v.trim().parse().context("Requests/sec")?;
            seen.1 = true;
        } else if let Some((n, rest)) = line.split_once(" requests in ") {
            wrk.requests = n.trim().parse().context("requests")?;
            let took = rest.split(',').next().unwrap_or("").trim();
            wrk.secs = parse_duration_secs(took).ok_or_else(|| anyhow!("duration `{took}`"))?;
            seen.0 = true;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            wrk.errors += v
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            wrk.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if !(seen.0 && seen.1) {
        bail!(
            "no `requests in` / `Requests/sec` in wrk's output: {}",
            out.trim()
        );
    }
    Ok(wrk)
}

/// wrk's durations: `5.00s`, `500.00ms`, `1.00m`.
fn parse_duration_secs(s: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// The fields of /proc/PID/stat this bench uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub ppid: u32,
    /// Clock ticks.
    pub utime: u64,
    pub stime: u64,
}

/// Parses /proc/PID/stat (`comm` may hold spaces and parentheses: fields start after the last
/// `)`; field 4 is ppid, 14 and 15 utime and stime).
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
    })
}

/// A `Key:  N kB` line of /proc/PID/status, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = parse_proc_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(stat.utime + stat.stime)
}

/// `sysconf(_SC_CLK_TCK)` (what `getconf CLK_TCK` prints), 100 when unknown.
fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

// ---------------------------------------------------------------------------------------------
// nginx

/// nginx in the foreground (`daemon off`) with its own prefix and config under target/bench;
/// on drop: SIGTERM to the master (fast shutdown), then SIGKILL to any worker left, and the
/// prefix removed.
struct Nginx {
    port: u16,
    dir: PathBuf,
    workers: Vec<u32>,
    master: Proc,
}

impl Nginx {
    fn start(dir: &Path) -> Result<Self> {
        check_interrupted()?;
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir.join("html"))
            .with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("html").join("index.html"), page()).context("writing nginx's page")?;
        let port = free_port()?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(dir, port)).context("writing nginx.conf")?;
        let error_log = dir.join("error.log");
        let child = Command::new("nginx")
            .arg("-e")
            .arg(&error_log)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nginx")?;
        let mut child = child;
        let stderr = child.stderr.take().map(|p| read_tail(p, 4096));
        let mut nginx = Self {
            port,
            dir: dir.to_owned(),
            workers: Vec::new(),
            master: Proc::new(child, libc::SIGTERM),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            check_interrupted()?;
            if let Some(status) = nginx.master.exited() {
                let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
                let log = fs::read_to_string(&error_log).unwrap_or_default();
                bail!("nginx exited ({status}): {} {}", err.trim(), log.trim());
            }
            nginx.workers = children(nginx.master.pid);
            if nginx.workers.len() >= NGINX_WORKERS as usize
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(nginx);
            }
            if Instant::now() >= deadline {
                bail!("nginx did not answer on {addr} within 10 s");
            }
            sleep(Duration::from_millis(50))?;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.master.stop(Duration::from_secs(5));
        for &pid in &self.workers {
            let alive = fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "nginx");
            if alive {
                send_signal(pid, libc::SIGKILL);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// target/bench/nginx-<bench pid>: an nginx prefix of this bench.
const NGINX_DIR_PREFIX: &str = "nginx-";

/// Stops an nginx left by an earlier bench that was killed (SIGKILL skips the guards): its
/// prefix is named after the bench's pid, and its nginx.pid names the master.
fn stop_stale_nginx(logs: &Path) {
    let Ok(entries) = fs::read_dir(logs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(bench) = name
            .strip_prefix(NGINX_DIR_PREFIX)
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if bench == std::process::id() || Path::new(&format!("/proc/{bench}")).exists() {
            continue;
        }
        let master = fs::read_to_string(entry.path().join("nginx.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if let Some(master) = master {
            let is_nginx = fs::read_to_string(format!("/proc/{master}/comm"))
                .is_ok_and(|comm| comm.trim() == "nginx");
            if is_nginx {
                say(&format!("stopping nginx {master} left by bench {bench}"));
                // SIGTERM: the master stops its workers.
                send_signal(master, libc::SIGTERM);
            }
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// A port free on 127.0.0.1 just now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr().context("finding a free port")?.port())
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| parse_proc_stat(&s))
                .is_some_and(|s| s.ppid == pid)
        })
        .collect()
}

fn page() -> String {
    let mut page = String::from("<!doctype html><title>observer bench</title><p>");
    while page.len() < PAGE_BYTES - 5 {
        page.push_str("lorem ipsum ");
    }
    page.truncate(PAGE_BYTES - 5);
    page.push_str("</p>\n");
    page
}

fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process on;
worker_processes {NGINX_WORKERS};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {d}/html;
    }}
}}
"
    )
}

/// Slowdown of the medians of `row`'s throughput runs against the runs with nothing attached.
pub fn slowdown_of_medians(web: &Web, row: &WebRow) -> f64 {
    slowdown_pct(
        runs(&web.none, WebWindow::rate).median(),
        runs(&row.rate, WebWindow::rate).median(),
    )
}

/// Per-round slowdowns against the round's run with nothing attached.
pub fn paired_slowdowns(row: &WebRow) -> Runs {
    Runs {
        values: row
            .paired_none
            .iter()
            .zip(&row.rate)
            .map(|(n, w)| slowdown_pct(n.rate(), w.rate()))
            .collect(),
        marked: row
            .paired_none
            .iter()
            .zip(&row.rate)
            .map(|(n, w)| !n.others.is_empty() || !w.others.is_empty())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://127.0.0.1:8080/
  1 threads and 20 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   434.71us  299.53us   5.48ms   76.11%
    Req/Sec    19.38k     1.54k   25.46k    95.00%
  96270 requests in 5.00s, 150.02MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  19253.88
Transfer/sec:     30.00MB
";

    #[test]
    fn wrk_output_is_parsed() {
        let wrk = parse_wrk(WRK).expect("parses");
        assert_eq!(wrk.requests, 96_270);
        assert_eq!(wrk.secs, 5.0);
        assert_eq!(wrk.per_sec, 19_253.88);
        assert_eq!(wrk.errors, 6);
        let ms = WRK.replace("in 5.00s", "in 500.00ms");
        assert!((parse_wrk(&ms).expect("parses").secs - 0.5).abs() < 1e-9);
        assert!(parse_wrk("unable to connect to 127.0.0.1:8080 Connection refused").is_err());
    }

    #[test]
    fn proc_stat_is_parsed_after_the_last_parenthesis() {
        let stat = "1234 (my (odd) comm) S 1 1234 1234 0 -1 4194560 3000 0 0 0 38 12 0 0 20 0 \
                    5 0 100 1000000 500 18446744073709551615";
        assert_eq!(
            parse_proc_stat(stat),
            Some(ProcStat {
                ppid: 1,
                utime: 38,
                stime: 12
            })
        );
        assert_eq!(parse_proc_stat("1234 (trunc) S 1"), None);
        let status = "Name:\tobserver\nVmHWM:\t   20480 kB\nVmRSS:\t   18000 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(18_000));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20_480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn the_page_and_config_are_as_specified() {
        assert_eq!(page().len(), PAGE_BYTES);
        let conf = nginx_conf(Path::new("/tmp/x"), 8081);
        assert!(conf.contains("keepalive_timeout 0;"));
        assert!(conf.contains("listen 127.0.0.1:8081;"));
        assert!(conf.contains("daemon off;"));
    }
}
