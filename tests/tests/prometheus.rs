//! A real Prometheus (Debian's `prometheus`) scraping `observer run --metrics`: what it stores
//! equals what the kernel counted. And the alert rules of docs/observer-alerts.yml: valid
//! (`promtool check rules`), behaving as documented (`promtool test rules`), naming metrics
//! observer serves, and loaded without error by the live server.
//!
//! The kernel test skips visibly when not root (fails with OBSERVER_REQUIRE_KERNEL_TESTS=1), as
//! both tests do when prometheus / promtool are missing. Everything listens on 127.0.0.1; the
//! fault is induced in a network namespace the test creates.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use observer_tests::{
    Netns, START_TIMEOUT, STOP_TIMEOUT, TempDir, kernel_test, note, observer_bin, poll_until,
    require_tool, run_checked, send_signal, unique_name, wait_child,
};
use serde_json::Value;

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");
const METRICS_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../observer/src/metrics.rs");
/// Refused connects the test makes.
const REFUSED: u64 = 150;
/// Prometheus scrapes every second; this leaves room for a loaded machine.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(45);

/// A child process killed (SIGKILL) and reaped on drop, with its output in files.
struct Process {
    child: Option<Child>,
    stderr: std::path::PathBuf,
}

impl Process {
    fn spawn(cmd: &mut Command, stdout: &Path, stderr: &Path) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(stdout)?)
            .stderr(File::create(stderr)?)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            stderr: stderr.to_owned(),
        })
    }

    fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        // The end says why it stopped.
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or(&text).to_owned()
    }

    /// Fails when the process has exited already.
    fn ensure_running(&mut self, what: &str) -> Result<()> {
        let child = self.child.as_mut().context("already reaped")?;
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}):\n{}", self.stderr());
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port free on 127.0.0.1 now (the kernel picks it; the listener is closed again).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on `addr`: the body of a 200 response.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers: {response}"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path}: {head}\n{body}"
    );
    // Prometheus answers small bodies with Content-Length, large ones chunked.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return dechunk(body);
    }
    Ok(body.to_owned())
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("short chunk")?);
        body = rest.get(size + 2..).context("chunk end")?;
    }
}

/// An instant query against Prometheus's HTTP API: the samples `[labels, value]`.
fn query(prometheus: SocketAddr, promql: &str) -> Result<Vec<(Value, f64)>> {
    let body = http_get(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    )?;
    let v: Value = serde_json::from_str(&body).with_context(|| format!("not JSON: {body}"))?;
    ensure!(v["status"] == "success", "query `{promql}`: {body}");
    let result = v["data"]["result"].as_array().context("data.result")?;
    result
        .iter()
        .map(|s| {
            let value = s["value"][1]
                .as_str()
                .context("value")?
                .parse::<f64>()
                .context("a number")?;
            Ok((s["metric"].clone(), value))
        })
        .collect()
}

/// The value of a query that returns one sample, if it does.
fn query_one(prometheus: SocketAddr, promql: &str) -> Result<Option<f64>> {
    let samples = query(prometheus, promql)?;
    ensure!(samples.len() <= 1, "`{promql}` returned {samples:?}");
    Ok(samples.first().map(|(_, v)| *v))
}

/// `observer_...` names a PromQL text mentions.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("observer_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn alert_rules_pass_promtool_and_name_served_metrics() -> Result<()> {
    let test = "alert_rules_pass_promtool_and_name_served_metrics";
    if !require_tool(test, "promtool", "prometheus") {
        return Ok(());
    }
    let rules = Path::new(DOCS).join("observer-alerts.yml");
    let checked = run_checked(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules),
        Duration::from_secs(60),
    )?;
    ensure!(checked.contains("SUCCESS: 3 rules found"), "{checked}");
    let tested = run_checked(
        Command::new("promtool")
            .args(["test", "rules", "observer-alerts.test.yml"])
            .current_dir(DOCS),
        Duration::from_secs(60),
    )?;
    ensure!(tested.contains("SUCCESS"), "{tested}");
    // Every metric the rules use is one observer registers (the families are registered by
    // their name without `_total`), and docs/metrics.md documents it.
    let text = std::fs::read_to_string(&rules)?;
    let source = std::fs::read_to_string(METRICS_SOURCE)?;
    let doc = std::fs::read_to_string(Path::new(DOCS).join("metrics.md"))?;
    let names = metric_names(&text);
    ensure!(names.len() >= 4, "metrics of the rules: {names:?}");
    for name in &names {
        let family = name.strip_suffix("_total").unwrap_or(name);
        ensure!(
            source.contains(&format!("\"{family}\"")),
            "{name} in the rules, not registered in observer/src/metrics.rs"
        );
        ensure!(
            doc.contains(&format!("`{name}`")),
            "{name} in the rules, not in docs/metrics.md"
        );
    }
    Ok(())
}

/// Prometheus scrapes `observer run --metrics` every second; the test makes `REFUSED` connects
/// to a closed port of a loopback address of its own, in a namespace of its own, and polls
/// Prometheus's API until the stored counter of that peer equals the namespace's
/// `TcpAttemptFails` delta (each refused connect is one failed attempt), or a deadline passes.
/// The alert rules are loaded into the same server: they evaluate without error.
#[test]
fn prometheus_stores_what_the_kernel_counted() -> Result<()> {
    let Some(t) = kernel_test("prometheus_stores_what_the_kernel_counted") else {
        return Ok(());
    };
    if !require_tool(&t.name, "prometheus", "prometheus") {
        return Ok(());
    }
    let dir = TempDir::new(&t.name)?;
    let ns = Netns::create(&unique_name(&t.name))?;

    // observer: every event exported (the counters count what the output stage received).
    let metrics_port = free_port()?;
    let metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, metrics_port));
    let bin = observer_bin();
    ensure!(bin.exists(), "{} does not exist", bin.display());
    let records = dir.path().join("observer.ndjson");
    let mut observer = Process::spawn(
        Command::new(&bin).args([
            "run",
            "--metrics",
            &metrics_addr.to_string(),
            "--export-per-flow",
            "0",
            "--export-per-cpu",
            "0",
        ]),
        &records,
        &dir.path().join("observer.stderr"),
    )?;
    poll_until(
        "observer's start record",
        START_TIMEOUT,
        Duration::from_millis(50),
        || {
            observer.ensure_running("observer")?;
            let text = std::fs::read_to_string(&records).unwrap_or_default();
            Ok(text.contains(r#"{"type":"start""#).then_some(()))
        },
    )?;

    // Prometheus: its own configuration and storage, on a free loopback port.
    let web_port = free_port()?;
    let web = SocketAddr::from((Ipv4Addr::LOCALHOST, web_port));
    std::fs::copy(
        Path::new(DOCS).join("observer-alerts.yml"),
        dir.path().join("observer-alerts.yml"),
    )?;
    let config = dir.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - observer-alerts.yml\n\
             scrape_configs:\n  - job_name: observer\n    static_configs:\n      \
             - targets: [\"{metrics_addr}\"]\n"
        ),
    )?;
    let mut prometheus = Process::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .current_dir(dir.path()),
        &dir.path().join("prometheus.stdout"),
        &dir.path().join("prometheus.stderr"),
    )?;
    // Up, and scraping observer successfully.
    poll_until(
        "Prometheus to scrape observer (up == 1)",
        SCRAPE_DEADLINE,
        Duration::from_millis(250),
        || {
            prometheus.ensure_running("prometheus")?;
            Ok(query_one(web, r#"up{job="observer"}"#)
                .ok()
                .flatten()
                .filter(|v| *v == 1.0))
        },
    )
    .with_context(|| prometheus.stderr())?;

    // The fault: refused connects to a closed port of a loopback address only this test uses.
    let pid = std::process::id();
    let peer = Ipv4Addr::new(127, 78, (pid >> 8) as u8, (pid % 253) as u8 + 1);
    let before = ns.counters()?;
    let to = SocketAddr::from((peer, 9));
    let refused = ns.run(move || -> Result<u64> {
        let start = Instant::now();
        let mut n = 0;
        while n < REFUSED && start.elapsed() < Duration::from_secs(30) {
            match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => n += 1,
                Err(e) => return Err(e).context("connect"),
                Ok(_) => bail!("{to} accepted a connection"),
            }
        }
        Ok(n)
    })??;
    let after = ns.counters()?;
    ensure!(
        refused == REFUSED,
        "{refused} of {REFUSED} connects refused"
    );
    let truth = before.delta(&after, "TcpAttemptFails")?;
    ensure!(
        truth == REFUSED,
        "TcpAttemptFails +{truth} for {REFUSED} refused connects"
    );

    let promql = format!(
        r#"sum(observer_peer_events_total{{job="observer",peer="{peer}",kind="connect_failed"}})"#
    );
    let mut last = None;
    let started = Instant::now();
    let stored = poll_until(
        "Prometheus's counter to reach the kernel's count",
        SCRAPE_DEADLINE,
        Duration::from_millis(250),
        || {
            observer.ensure_running("observer")?;
            prometheus.ensure_running("prometheus")?;
            last = query_one(web, &promql)?;
            Ok(last.filter(|v| *v >= truth as f64))
        },
    )
    .with_context(|| format!("`{promql}` last {last:?}, kernel TcpAttemptFails +{truth}"))?;
    ensure!(
        stored == truth as f64,
        "Prometheus stored {stored} for `{promql}`, the kernel counted TcpAttemptFails +{truth}"
    );
    let waited = started.elapsed();

    // The host's segment counters are scraped (the retransmit ratio's terms), and the alert
    // rules were evaluated against the live data without an error.
    for metric in [
        "observer_tcp_segments_sent_total",
        "observer_tcp_segments_retransmitted_total",
    ] {
        let value = query_one(web, &format!(r#"{metric}{{job="observer"}}"#))?;
        ensure!(value.is_some(), "{metric} not stored");
    }
    let rules: Value = serde_json::from_str(&http_get(web, "/api/v1/rules")?)?;
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .context("rule groups")?
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    ensure!(loaded.len() == 3, "rules loaded: {rules}");
    poll_until(
        "every rule evaluated, healthy",
        SCRAPE_DEADLINE,
        Duration::from_millis(250),
        || {
            let rules: Value = serde_json::from_str(&http_get(web, "/api/v1/rules")?)?;
            let health: Vec<String> = rules["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                .map(|r| r["health"].as_str().unwrap_or("?").to_owned())
                .collect();
            if health.iter().any(|h| h == "err") {
                bail!("a rule failed to evaluate: {rules}");
            }
            Ok((health.len() == 3 && health.iter().all(|h| h == "ok")).then_some(()))
        },
    )?;

    // Shut down: observer writes its stop record on SIGINT; Prometheus is killed with its data.
    drop(prometheus);
    let mut child = observer.child.take().context("observer reaped")?;
    send_signal(child.id(), libc::SIGINT)?;
    let status = wait_child(&mut child, STOP_TIMEOUT)?;
    ensure!(
        status.success(),
        "observer: {status}\n{}",
        observer.stderr()
    );
    note(&format!(
        "prometheus: {REFUSED} refused connects; TcpAttemptFails +{truth}; Prometheus stored \
         {stored} for peer {peer}, {:.1} s after the last connect",
        waited.as_secs_f64()
    ));
    Ok(())
}
