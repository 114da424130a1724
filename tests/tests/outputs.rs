//! Outputs: the Prometheus metrics endpoint (`--metrics`), a slow and a vanished reader of
//! stdout (back-pressure, EPIPE, a hang-up on a quiet host), readers of `--socket` that leave,
//! and a real log shipper (syslog-ng) reading the NDJSON.
//!
//! Kernel tests: they skip visibly when not root (fail with OBSERVER_REQUIRE_KERNEL_TESTS=1), and
//! a tool they need (promtool, syslog-ng) missing skips them the same way. Traffic stays on the
//! loopback of namespaces the tests create; the metrics endpoint is bound to 127.0.0.1.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use observer_tests::{
    ALL_EVENT_TYPES, Netns, START_TIMEOUT, STOP_TIMEOUT, TempDir, kernel_test, nonblocking_connect,
    note, observer_bin, poll_until, require_tool, send_signal, unique_name, wait_child,
};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A child process with its stderr collected on a thread; killed and reaped on drop.
struct Running {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl Running {
    /// Spawns `cmd` with stdout piped (returned) or sent to `stdout`.
    fn spawn(cmd: &mut Command, stdout: Stdio) -> Result<(Self, Option<ChildStdout>)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        let out = child.stdout.take();
        let pipe = child.stderr.take().context("stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        Ok((
            Self {
                child: Some(child),
                stderr,
                stderr_reader: Some(stderr_reader),
            },
            out,
        ))
    }

    /// `observer run ARGS` with stdout piped to the test.
    fn observer(args: &[&str]) -> Result<(Self, ChildStdout)> {
        let bin = observer_bin();
        ensure!(
            bin.exists(),
            "{} does not exist: build it first (cargo build -p observer) or set OBSERVER_BIN",
            bin.display()
        );
        let (running, out) = Self::spawn(Command::new(bin).arg("run").args(args), Stdio::piped())?;
        Ok((running, out.context("stdout")?))
    }

    fn pid(&self) -> Result<u32> {
        self.child.as_ref().map(Child::id).context("already reaped")
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the process has exited (without reaping it for good: `wait` still works).
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("already reaped"),
        }
    }

    /// Waits (at most `timeout`, then kills) and returns the status and all of stderr.
    fn wait(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let mut child = self.child.take().context("already reaped")?;
        let status = wait_child(&mut child, timeout);
        // The process is gone: its stderr reaches EOF (children holding it are not expected).
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let stderr = self.stderr();
        Ok((
            status.with_context(|| format!("stderr:\n{stderr}"))?,
            stderr,
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `type` of a record line, read without parsing the whole line (`{"type":"NAME",...`).
fn line_type(line: &str) -> Option<&str> {
    line.strip_prefix(r#"{"type":""#)?.split('"').next()
}

/// What a [`LineReader`] has read so far.
#[derive(Debug, Default)]
struct Seen {
    /// Records per type.
    counts: BTreeMap<String, u64>,
    /// Every record that is not a kernel event, parsed, in order; and kernel events `keep`
    /// selects.
    kept: Vec<Value>,
    /// Lines that are not JSON objects.
    bad: Vec<String>,
    lines: u64,
    eof: bool,
}

/// Reads observer's stdout on a thread, line by line; reading can be paused (the pipe then
/// fills and observer's writes block).
struct LineReader {
    seen: Arc<Mutex<Seen>>,
    paused: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl LineReader {
    /// `keep` selects the kernel events kept whole (others are only counted).
    fn start(out: ChildStdout, keep: fn(&Value) -> bool) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, p) = (Arc::clone(&seen), Arc::clone(&paused));
        let handle = thread::spawn(move || {
            let mut reader = BufReader::with_capacity(1 << 20, out);
            let mut line = String::new();
            loop {
                // Bounded by the test: it resumes or drops the child (EOF) within its deadlines.
                while p.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(5));
                }
                line.clear();
                let eof = !matches!(reader.read_line(&mut line), Ok(n) if n > 0);
                let mut seen = s.lock().unwrap_or_else(|e| e.into_inner());
                if eof {
                    seen.eof = true;
                    return;
                }
                seen.lines += 1;
                let text = line.trim_end();
                let ty = line_type(text).map(str::to_owned);
                match ty {
                    Some(ty) if ALL_EVENT_TYPES.contains(&ty.as_str()) => {
                        if !text.ends_with('}') {
                            seen.bad.push(text.to_owned());
                            continue;
                        }
                        *seen.counts.entry(ty).or_default() += 1;
                        match serde_json::from_str::<Value>(text) {
                            Ok(v) if keep(&v) => seen.kept.push(v),
                            Ok(_) => {}
                            Err(_) => seen.bad.push(text.to_owned()),
                        }
                    }
                    _ => match serde_json::from_str::<Value>(text) {
                        Ok(v) if v.is_object() => {
                            let ty = v["type"].as_str().unwrap_or("").to_owned();
                            *seen.counts.entry(ty).or_default() += 1;
                            seen.kept.push(v);
                        }
                        _ => seen.bad.push(text.to_owned()),
                    },
                }
            }
        });
        Self {
            seen,
            paused,
            handle: Some(handle),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Waits (at most `timeout`) for a record of type `ty`.
    fn wait_for(&self, ty: &str, timeout: Duration) -> Result<()> {
        poll_until(
            &format!("a `{ty}` record"),
            timeout,
            Duration::from_millis(20),
            || {
                let (found, eof) = self.with(|s| (s.counts.contains_key(ty), s.eof));
                ensure!(found || !eof, "stdout closed before a `{ty}` record");
                Ok(found.then_some(()))
            },
        )
    }

    /// The kept records, once stdout has reached EOF (at most `timeout`).
    fn finish(mut self, timeout: Duration) -> Result<Seen> {
        self.pause(false);
        poll_until(
            "EOF on observer's stdout",
            timeout,
            Duration::from_millis(20),
            || Ok(self.with(|s| s.eof).then_some(())),
        )?;
        if let Some(h) = self.handle.take() {
            h.join().map_err(|_| anyhow!("stdout reader panicked"))?;
        }
        Ok(std::mem::take(
            &mut *self.seen.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

fn keep_none(_: &Value) -> bool {
    false
}

/// On a thread in `ns`: connects to `to` (a loopback address where nothing listens: each
/// connect is refused) until `max` connects, `max_time`, or `stop` is set. Returns the number
/// of connects.
fn refused_connects(
    ns: &Netns,
    to: SocketAddr,
    max: u64,
    max_time: Duration,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<Result<u64>>> {
    ensure!(to.ip().is_loopback(), "traffic stays on loopback, not {to}");
    ns.spawn_thread(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while n < max && start.elapsed() < max_time && !stop.load(Ordering::Relaxed) {
            match TcpStream::connect(to) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => n += 1,
                Err(e) => return Err(e).context("connect"),
                Ok(_) => bail!("{to} accepted a connection: something listens there"),
            }
        }
        Ok(n)
    })
}

/// 127.0.0.1:`port`.
fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn join<T>(h: thread::JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("traffic thread panicked"))?
}

/// `totals[kind][field]` of a stop record, summed over kinds.
fn sum_totals(stop: &Value, field: &str) -> Result<u64> {
    let totals = stop["totals"].as_object().context("stop.totals")?;
    Ok(totals
        .values()
        .map(|t| t[field].as_u64().unwrap_or(0))
        .sum())
}

/// `exported == received + lost + undelivered + decode_errors`, summed over kinds (the stop
/// record's exact accounting); returns the four terms for messages.
fn accounting(stop: &Value) -> Result<(u64, u64, u64, u64, u64)> {
    let exported = sum_totals(stop, "exported")?;
    let received = sum_totals(stop, "received")?;
    let field = |k: &str| stop[k].as_u64().with_context(|| format!("stop.{k}"));
    let (lost, undelivered, decode_errors) = (
        field("lost")?,
        field("undelivered")?,
        field("decode_errors")?,
    );
    Ok((exported, received, lost, undelivered, decode_errors))
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// `GET /metrics` on `addr`: the body (status 200 required).
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in: {response}"))?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "scrape: {head}");
    ensure!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "scrape: {head}"
    );
    Ok(body.to_owned())
}

/// The sum of the samples of `name` whose labels include every pair of `labels`.
fn sample_sum(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `promtool check metrics` on `body`: Ok when it reports no problem.
fn promtool_check(body: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning promtool")?;
    let mut stdin = child.stdin.take().context("promtool stdin")?;
    let text = body.to_owned();
    let writer = thread::spawn(move || stdin.write_all(text.as_bytes()));
    let (mut out, mut err) = (
        child.stdout.take().context("stdout")?,
        child.stderr.take().context("stderr")?,
    );
    let readers = thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let _ = out.read_to_string(&mut o);
        let _ = err.read_to_string(&mut e);
        (o, e)
    });
    let status = wait_child(&mut child, Duration::from_secs(30))?;
    writer
        .join()
        .map_err(|_| anyhow!("promtool writer panicked"))?
        .context("writing to promtool")?;
    let (o, e) = readers
        .join()
        .map_err(|_| anyhow!("promtool reader panicked"))?;
    ensure!(
        status.success(),
        "promtool check metrics failed ({status}): {o}{e}\n--- metrics:\n{body}"
    );
    Ok(())
}

/// The metrics address observer announced on stderr.
fn metrics_addr(obs: &Running) -> Result<SocketAddr> {
    poll_until(
        "observer to announce its metrics endpoint",
        START_TIMEOUT,
        Duration::from_millis(20),
        || {
            let stderr = obs.stderr();
            Ok(stderr
                .split("serving metrics at http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .and_then(|a| a.parse::<SocketAddr>().ok()))
        },
    )
}

/// The metrics endpoint counts exactly what the stream carries: after a storm of refused
/// connects (and a listener overflowing), `observer_events_total{kind="connect_failed"}` equals
/// the stop record's `connect_failed.received`, the storm's peer has exactly its connects, the
/// listener's drops equal its `listener_drops` records, and promtool accepts the exposition.
///
/// observer sees every namespace: other tests' traffic on the machine lands in the same
/// counters. The storm goes to a loopback address of its own (its `peer` series is the test's
/// alone), and events of other namespaces written after the last scrape are told apart.
#[test]
fn metrics_match_the_stream() -> Result<()> {
    let Some(t) = kernel_test("metrics_match_the_stream") else {
        return Ok(());
    };
    if !require_tool(&t.name, "promtool", "prometheus") {
        return Ok(());
    }
    let ns = Netns::create(&unique_name(&t.name))?;
    let netns_id = ns.inode()?;
    let netns = netns_id.to_string();
    // No export budgets: every connect_failed is exported (and counted) whatever else
    // the machine does.
    let (mut obs, out) = Running::observer(&[
        "--metrics",
        "127.0.0.1:0",
        "--export-per-cpu",
        "0",
        "--export-per-flow",
        "0",
    ])?;
    let reader = LineReader::start(out, |v| {
        v["type"] == "listener_drops" || v["type"] == "connect_failed"
    });
    reader.wait_for("start", START_TIMEOUT)?;
    let addr = metrics_addr(&obs)?;
    ensure!(addr.ip().is_loopback(), "metrics bound to {addr}");

    // A listener with a backlog of 1 that never accepts: further SYNs overflow its accept
    // queue (the context worker reports `listener_drops`).
    let listener_port = 5000;
    let listener = ns.run(|| -> Result<TcpListener> {
        use std::os::fd::AsRawFd as _;
        let l = TcpListener::bind(localhost(listener_port))?;
        // SAFETY: listen(2) again on the listener's own open descriptor: sets its backlog.
        let rc = unsafe { libc::listen(l.as_raw_fd(), 1) };
        ensure!(rc == 0, "listen: {}", std::io::Error::last_os_error());
        Ok(l)
    })??;
    let clients = ns.run(|| {
        (0..6)
            .map(|_| nonblocking_connect(localhost(listener_port)))
            .collect::<Result<Vec<_>>>()
    })??;
    // The storm: refused connects to a closed port of a loopback address of this test's own.
    let pid = std::process::id();
    let peer = Ipv4Addr::new(127, 77, (pid >> 8) as u8, (pid % 253) as u8 + 1);
    let peer_label = peer.to_string();
    let storm = 400;
    let sent = join(refused_connects(
        &ns,
        SocketAddr::from((peer, 9)),
        storm,
        Duration::from_secs(30),
        Arc::new(AtomicBool::new(false)),
    )?)?;
    ensure!(sent == storm, "{sent} of {storm} connects refused");
    let listener_key = format!("127.0.0.1:{listener_port}");
    let ours = |r: &Value| r["netns"] == netns_id;
    poll_until(
        "a listener_drops record for the test's listener",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            Ok(reader
                .with(|s| {
                    s.kept.iter().any(|r| {
                        r["type"] == "listener_drops" && r["port"] == listener_port && ours(r)
                    })
                })
                .then_some(()))
        },
    )?;
    drop(clients);
    drop(listener);

    // What the stream holds: connect_failed records (all, the storm's), the listener's
    // overflows.
    let stream = |s: &Seen| -> (usize, u64, u64) {
        let failed: Vec<&Value> = s
            .kept
            .iter()
            .filter(|r| r["type"] == "connect_failed")
            .collect();
        let storm_records = failed
            .iter()
            .filter(|r| ours(r) && r["daddr"] == peer_label.as_str())
            .count() as u64;
        let overflows = s
            .kept
            .iter()
            .filter(|r| r["type"] == "listener_drops" && r["port"] == listener_port && ours(r))
            .map(|r| r["accept_queue_overflows"].as_u64().unwrap_or(0))
            .sum();
        (failed.len(), storm_records, overflows)
    };
    // Quiet now (for this test: closing the clients still in SYN_SENT made their own
    // connect_failed events): poll until two scrapes in a row, 300 ms apart, agree with the
    // stream read just before and just after each.
    let mut last = String::new();
    let mut previous = None;
    let (body, failed_at_scrape) = poll_until(
        "the scrape to match the stream",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let before = reader.with(stream);
            let body = scrape(addr)?;
            let after = reader.with(stream);
            let metric = sample_sum(
                &body,
                "observer_events_total",
                &[("kind", "connect_failed")],
            );
            let storm_metric = sample_sum(
                &body,
                "observer_peer_events_total",
                &[("peer", &peer_label), ("kind", "connect_failed")],
            );
            let drops = sample_sum(
                &body,
                "observer_listener_drops_total",
                &[
                    ("listener", &listener_key),
                    ("netns", &netns),
                    ("cause", "accept_queue_overflow"),
                ],
            );
            let (failed, storm_records, overflows) = after;
            last = format!(
                "stream before {before:?} after {after:?}; scraped connect_failed {metric}, \
                 peer {peer_label} {storm_metric}, listener drops {drops}"
            );
            let agree = before == after
                && metric == failed as f64
                && storm_records == storm
                && storm_metric == storm as f64
                && overflows > 0
                && drops == overflows as f64;
            let now = agree.then_some(after);
            let done = now.is_some() && now == previous;
            previous = now;
            Ok(done.then_some((body, failed)))
        },
    )
    .with_context(|| last.clone())?;
    promtool_check(&body)?;
    let metric = sample_sum(
        &body,
        "observer_events_total",
        &[("kind", "connect_failed")],
    );
    for process in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
        ensure!(
            sample_sum(&body, process, &[]) > 0.0,
            "{process} missing or 0:\n{body}"
        );
    }

    send_signal(obs.pid()?, libc::SIGINT)?;
    reader.wait_for("stop", STOP_TIMEOUT)?;
    let (status, stderr) = obs.wait(STOP_TIMEOUT)?;
    let seen = reader.finish(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "exit {status}; stderr:\n{stderr}");
    ensure!(seen.bad.is_empty(), "non-JSON lines: {:?}", seen.bad);
    let stop = seen.kept.last().context("no records")?;
    ensure!(stop["type"] == "stop", "last record: {stop}");
    let received = stop["totals"]["connect_failed"]["received"]
        .as_u64()
        .context("stop.totals.connect_failed.received")?;
    let failed: Vec<&Value> = seen
        .kept
        .iter()
        .filter(|r| r["type"] == "connect_failed")
        .collect();
    // Between the last scrape and the stop, only other namespaces' events may have come.
    let later = &failed[failed_at_scrape.min(failed.len())..];
    note(&format!(
        "metrics: connect_failed scraped {metric}, stop received {received}, records {} \
         ({} of other namespaces after the scrape); {}",
        failed.len(),
        later.len(),
        last
    ));
    ensure!(
        failed.len() as u64 == received,
        "connect_failed records {} != stop received {received}",
        failed.len()
    );
    ensure!(
        later.iter().all(|r| !ours(r)),
        "the test's own connect_failed events after the last scrape: {later:?}"
    );
    ensure!(
        metric + later.len() as f64 == received as f64,
        "observer_events_total{{kind=\"connect_failed\"}} = {metric}, \
         stop.totals.connect_failed.received = {received}, {} events of other namespaces after the scrape",
        later.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Back-pressure

/// A reader that stops reading for 4 s during a storm: observer keeps draining the kernel's
/// buffers (nothing lost, or every loss reported), drops what its queue cannot hold and says
/// so in an `undelivered` record once the reader is back, and the stop record accounts for
/// every exported event: `exported == received + lost + undelivered + decode_errors`.
#[test]
fn a_slow_reader_costs_records_not_kernel_events() -> Result<()> {
    let Some(t) = kernel_test("a_slow_reader_costs_records_not_kernel_events") else {
        return Ok(());
    };
    let ns = Netns::create(&unique_name(&t.name))?;
    let (mut obs, out) = Running::observer(&[
        "--export-per-cpu",
        "0",
        "--export-per-flow",
        "0",
        "--export-kinds",
        "all",
    ])?;
    let reader = LineReader::start(out, keep_none);
    reader.wait_for("start", START_TIMEOUT)?;

    let pause = Duration::from_secs(4);
    reader.pause(true);
    let paused_at = Instant::now();
    // Each refused connect makes four records (connect_failed, reset_sent, drop NO_SOCKET,
    // reset_received): 30,000 connects are 1.8 times the queue (65,536 records). On a busy
    // machine they may take longer than the pause, which then lasts as long (10 s at most).
    let storm = join(refused_connects(
        &ns,
        localhost(9),
        30_000,
        Duration::from_secs(10),
        Arc::new(AtomicBool::new(false)),
    )?)?;
    let storm_secs = paused_at.elapsed().as_secs_f64();
    thread::sleep(pause.saturating_sub(paused_at.elapsed()));
    ensure!(
        obs.exited()?.is_none(),
        "observer exited while its reader was paused; stderr:\n{}",
        obs.stderr()
    );
    let lines_while_paused = reader.with(|s| s.lines);
    reader.pause(false);
    reader
        .wait_for("undelivered", Duration::from_secs(30))
        .with_context(|| {
            format!(
                "{storm} connects in {storm_secs:.1} s; after the pause: {:?} lines, by type \
                 {:?}; stderr:\n{}",
                reader.with(|s| s.lines),
                reader.with(|s| s.counts.clone()),
                obs.stderr()
            )
        })?;

    send_signal(obs.pid()?, libc::SIGINT)?;
    reader
        .wait_for("stop", Duration::from_secs(30))
        .with_context(|| format!("stderr:\n{}", obs.stderr()))?;
    let (status, stderr) = obs.wait(STOP_TIMEOUT)?;
    let seen = reader.finish(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "exit {status}; stderr:\n{stderr}");
    ensure!(
        seen.bad.is_empty(),
        "non-JSON lines: {:?}",
        &seen.bad[..seen.bad.len().min(5)]
    );
    let stop = seen.kept.last().context("no records")?;
    ensure!(stop["type"] == "stop", "last record: {stop}");

    let (exported, received, lost, undelivered, decode_errors) = accounting(stop)?;
    let undelivered_records: Vec<&Value> = seen
        .kept
        .iter()
        .filter(|r| r["type"] == "undelivered")
        .collect();
    let reported: u64 = undelivered_records
        .iter()
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    let last_total = undelivered_records
        .last()
        .and_then(|r| r["total"].as_u64())
        .unwrap_or(0);
    let lost_reported: u64 = seen
        .kept
        .iter()
        .filter(|r| r["type"] == "lost")
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    let events_written: u64 = ALL_EVENT_TYPES
        .iter()
        .map(|t| seen.counts.get(*t).copied().unwrap_or(0))
        .sum();
    note(&format!(
        "back-pressure: {storm} refused connects in {storm_secs:.1} s; {lines_while_paused} lines \
         read before the pause ended; stop: exported {exported}, received {received}, lost \
         {lost} (lost records {lost_reported}), undelivered {undelivered} (records: {} summing \
         {reported}, last total {last_total}), decode_errors {decode_errors}; event records \
         written {events_written}; connect_failed events {} exported {}",
        undelivered_records.len(),
        stop["totals"]["connect_failed"]["events"],
        stop["totals"]["connect_failed"]["exported"],
    ));
    // How the kernel classified the test's connects (all were refused), for the record.
    let netns_id = ns.inode()?;
    let (refused, timed_out) = stop["flows"]
        .as_array()
        .context("stop.flows")?
        .iter()
        .filter(|f| f["netns"] == netns_id && f["dport"] == 9)
        .fold((0, 0), |(r, t), f| {
            (
                r + f["connects_refused"].as_u64().unwrap_or(0),
                t + f["connects_timed_out"].as_u64().unwrap_or(0),
            )
        });
    note(&format!(
        "back-pressure: the test's flows in stop.flows: connects_refused {refused}, \
         connects_timed_out {timed_out}"
    ));
    ensure!(
        exported == received + lost + undelivered + decode_errors,
        "accounting: exported {exported} != received {received} + lost {lost} + undelivered \
         {undelivered} + decode_errors {decode_errors} (difference {}; the last `undelivered` \
         record's total is {last_total}, `lost` records sum {lost_reported}: stop.undelivered \
         beyond the events dropped counts `lost` notifications the full queue dropped and \
         context records, see daemon.rs drain() and run())",
        (received + lost + undelivered + decode_errors) as i128 - exported as i128
    );
    ensure!(
        undelivered > 0,
        "the queue never filled: {storm} connects, exported {exported}"
    );
    ensure!(
        reported == last_total && last_total > 0 && last_total <= undelivered,
        "undelivered records sum {reported}, last total {last_total}, stop {undelivered}"
    );
    // Lost samples are always in stop.lost; a `lost` record is itself queued, so one the full
    // queue could not hold is missing from the stream.
    ensure!(
        lost_reported <= lost,
        "stop.lost {lost} but `lost` records report {lost_reported}"
    );
    ensure!(
        events_written == received,
        "event records on stdout {events_written} != received {received}"
    );
    ensure!(
        stop["totals"]["connect_failed"]["events"].as_u64() >= Some(storm),
        "connect_failed events {} < {storm} connects",
        stop["totals"]["connect_failed"]["events"]
    );
    Ok(())
}

/// The reader closes its end of the pipe during traffic: observer stops by itself (reason
/// `output_closed`, exit 0), with the stop record on stderr and no panic.
#[test]
fn a_closed_stdout_ends_the_run_cleanly() -> Result<()> {
    let Some(t) = kernel_test("a_closed_stdout_ends_the_run_cleanly") else {
        return Ok(());
    };
    let ns = Netns::create(&unique_name(&t.name))?;
    let (mut obs, out) = Running::observer(&["--export-kinds", "all"])?;
    let stop_storm = Arc::new(AtomicBool::new(false));
    let storm = refused_connects(
        &ns,
        localhost(9),
        1_000_000,
        Duration::from_secs(30),
        Arc::clone(&stop_storm),
    )?;
    // Read the start record and 50 more, then close the read end (the thread returns and
    // drops it). The storm's records come through per-flow budgets (its few handshake keys
    // export 10 each per second), so a loaded machine may take seconds for these.
    let read = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&read);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        let mut started = false;
        while counter.load(Ordering::Relaxed) < 51 {
            match lines.next() {
                Some(Ok(line)) => {
                    started |= line_type(&line) == Some("start");
                    if started {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => break,
            }
        }
        let _ = tx.send(started);
    });
    let started = rx.recv_timeout(START_TIMEOUT + Duration::from_secs(10));
    let closed_at = Instant::now();
    let outcome = (|| -> Result<()> {
        ensure!(
            started == Ok(true),
            "no start record and 50 more on stdout ({} read, {started:?}); stderr:\n{}",
            read.load(Ordering::Relaxed),
            obs.stderr()
        );
        let status = poll_until(
            "observer to exit after its stdout closed",
            Duration::from_secs(15),
            Duration::from_millis(20),
            || obs.exited(),
        )?;
        let took = closed_at.elapsed();
        let (_, stderr) = obs.wait(STOP_TIMEOUT)?;
        let shown: String = stderr.chars().take(400).collect();
        note(&format!(
            "closed pipe: exited with {status} {took:?} after the read end closed; stderr \
             ({} bytes):\n{shown}...",
            stderr.len()
        ));
        ensure!(status.code() == Some(0), "exit {status}; stderr:\n{stderr}");
        for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
            ensure!(!stderr.contains(bad), "`{bad}` on stderr:\n{stderr}");
        }
        let json = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("observer: the output was closed by its reader; the stop record could not be written to the output: ")
            })
            .with_context(|| format!("no stop record on stderr:\n{stderr}"))?;
        let stop: Value = serde_json::from_str(json).context("the stop record on stderr")?;
        ensure!(
            stop["type"] == "stop" && stop["reason"] == "output_closed",
            "{stop}"
        );
        let (exported, received, lost, undelivered, decode_errors) = accounting(&stop)?;
        note(&format!(
            "closed pipe stop: exported {exported}, received {received}, lost {lost}, \
             undelivered {undelivered}, decode_errors {decode_errors}"
        ));
        ensure!(
            exported == received + lost + undelivered + decode_errors,
            "accounting: exported {exported} != received {received} + lost {lost} + \
             undelivered {undelivered} + decode_errors {decode_errors}"
        );
        Ok(())
    })();
    stop_storm.store(true, Ordering::Relaxed);
    let connects = join(storm);
    outcome?;
    note(&format!("closed pipe: {} refused connects", connects?));
    Ok(())
}

/// The stop record observer wrote to stderr because its output was closed.
fn stop_on_stderr(stderr: &str) -> Result<Value> {
    let json = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("observer: the output was closed by its reader; the stop record could not be written to the output: ")
        })
        .with_context(|| format!("no stop record on stderr:\n{stderr}"))?;
    serde_json::from_str(json).context("the stop record on stderr")
}

/// `observer run | head -c 1` on a quiet host: the reader reads the start record and closes
/// the pipe while observer has nothing to write. observer notices the hang-up itself (poll on
/// stdout) and exits 0 within a second, with its stop record (`output_closed`) on stderr.
#[test]
fn a_reader_leaving_a_quiet_stdout_ends_the_run_at_once() -> Result<()> {
    let Some(_t) = kernel_test("a_reader_leaving_a_quiet_stdout_ends_the_run_at_once") else {
        return Ok(());
    };
    // Only SYN retransmits are exported: other traffic on the machine rarely makes one, so
    // observer has nothing to write once the start record is out.
    let (mut obs, out) = Running::observer(&["--export-kinds", "syn_retransmit"])?;
    let mut reader = BufReader::new(out);
    let mut first = String::new();
    let (tx, rx) = mpsc::channel();
    let line_reader = thread::spawn(move || {
        let read = reader.read_line(&mut first);
        let _ = tx.send((read.map_err(|e| e.to_string()), first));
        // The read end is closed when `reader` is dropped here.
    });
    let (read, first) = rx.recv_timeout(START_TIMEOUT).map_err(|_| {
        anyhow!(
            "no start record within {START_TIMEOUT:?}; stderr:\n{}",
            obs.stderr()
        )
    })?;
    line_reader
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    let closed_at = Instant::now();
    ensure!(
        matches!(read, Ok(n) if n > 0) && line_type(first.trim_end()) == Some("start"),
        "expected the start record, read {read:?}: {first}; stderr:\n{}",
        obs.stderr()
    );
    let status = poll_until(
        "observer to exit after the reader closed its stdout",
        Duration::from_secs(5),
        Duration::from_millis(5),
        || obs.exited(),
    )
    .with_context(|| format!("observer stderr:\n{}", obs.stderr()))?;
    let took = closed_at.elapsed();
    let (_, stderr) = obs.wait(STOP_TIMEOUT)?;
    note(&format!(
        "quiet closed pipe: exited with {status} {took:?} after the read end closed"
    ));
    ensure!(status.code() == Some(0), "exit {status}; stderr:\n{stderr}");
    ensure!(!stderr.contains("panicked"), "panic on stderr:\n{stderr}");
    let stop = stop_on_stderr(&stderr)?;
    ensure!(
        stop["type"] == "stop" && stop["reason"] == "output_closed",
        "{stop}"
    );
    ensure!(
        took < Duration::from_secs(1),
        "observer took {took:?} to notice the closed pipe (at most 1 s)"
    );
    Ok(())
}

/// Readers of `--socket` that connect and leave on a quiet stream do not use up the reader
/// places (32): after 40 readers came and went, a new reader still gets the start record, the
/// daemon keeps running, and a reader connected all along gets the stop record.
#[test]
fn socket_readers_that_leave_free_their_places() -> Result<()> {
    let Some(t) = kernel_test("socket_readers_that_leave_free_their_places") else {
        return Ok(());
    };
    let dir = TempDir::new(&t.name)?;
    let path = dir.path().join("observer.sock");
    let socket = path.to_str().context("socket path")?;
    let (mut obs, out) =
        Running::observer(&["--export-kinds", "syn_retransmit", "--socket", socket])?;
    let stdout = LineReader::start(out, keep_none);
    stdout.wait_for("start", START_TIMEOUT)?;
    // The first line a new reader gets: the start record, or the "too many readers" notice.
    let first_line = |stream: &std::os::unix::net::UnixStream| -> Result<String> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    };
    let connect = || {
        std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))
    };
    let staying = connect()?;
    let greeting = first_line(&staying)?;
    ensure!(
        line_type(&greeting) == Some("start"),
        "first line: {greeting}"
    );
    let started = Instant::now();
    for i in 0..40 {
        // The place of the reader before is free within a moment: poll for it.
        let line = poll_until(
            &format!("reader {i} to get the start record"),
            Duration::from_secs(5),
            Duration::from_millis(20),
            || {
                let stream = connect()?;
                let line = first_line(&stream)?;
                Ok((line_type(&line) == Some("start")).then_some(line))
            },
        )?;
        ensure!(line.ends_with("}\n"), "{line}");
    }
    note(&format!(
        "socket: 40 readers came and went in {:?}",
        started.elapsed()
    ));
    ensure!(obs.exited()?.is_none(), "observer exited: {}", obs.stderr());
    send_signal(obs.pid()?, libc::SIGINT)?;
    let (status, stderr) = obs.wait(STOP_TIMEOUT)?;
    ensure!(status.code() == Some(0), "exit {status}; stderr:\n{stderr}");
    let seen = stdout.finish(STOP_TIMEOUT)?;
    ensure!(
        seen.kept.last().is_some_and(|r| r["type"] == "stop"),
        "no stop record on stdout; stderr:\n{stderr}"
    );
    let mut rest = String::new();
    let mut staying = BufReader::new(staying);
    staying
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))?;
    staying.read_to_string(&mut rest)?;
    ensure!(
        rest.lines().last().and_then(line_type) == Some("stop"),
        "the reader connected all along did not get the stop record: {rest}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A real shipper

/// syslog-ng follows observer's output file (as docs/shippers/syslog-ng.conf does), parses each
/// record with json-parser and writes selected fields: it sees every record, by type as many
/// as observer wrote and its stop record counted, with the fields intact.
#[test]
fn syslog_ng_ships_every_record() -> Result<()> {
    let Some(t) = kernel_test("syslog_ng_ships_every_record") else {
        return Ok(());
    };
    if !require_tool(&t.name, "syslog-ng", "syslog-ng-core") {
        return Ok(());
    }
    let dir = TempDir::new(&t.name)?;
    let input = dir.path().join("observer.ndjson");
    let shipped = dir.path().join("shipped.tsv");
    // observer appends to an existing file: syslog-ng can open it before the first record.
    std::fs::write(&input, "")?;
    let conf = dir.path().join("syslog-ng.conf");
    std::fs::write(
        &conf,
        format!(
            r#"@version: 3.35
# Adapted from docs/shippers/syslog-ng.conf: a temporary input, fields out as tab-separated
# values.
source s_observer {{
  file("{input}" follow-freq(1) flags(no-parse) log-msg-size(33554432)
       log-fetch-limit(10000) log-iw-size(100000));
}};
parser p_observer {{ json-parser(prefix(".observer.")); }};
filter f_observer {{ "${{.observer.type}}" ne "" }};
destination d_fields {{
  file("{shipped}" template("${{.observer.type}}\t${{.observer.netns}}\t${{.observer.daddr}}\t${{.observer.dport}}\t${{.observer.outcome}}\n"));
}};
log {{ source(s_observer); parser(p_observer); filter(f_observer); destination(d_fields); }};
"#,
            input = input.display(),
            shipped = shipped.display(),
        ),
    )?;
    let syntax = Command::new("syslog-ng")
        .args(["--syntax-only", "-f"])
        .arg(&conf)
        .output()
        .context("syslog-ng --syntax-only")?;
    ensure!(
        syntax.status.success(),
        "syslog-ng --syntax-only: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let (mut shipper, _) = Running::spawn(
        Command::new("syslog-ng")
            .args(["-F", "-e", "--no-caps", "-f"])
            .arg(&conf)
            .arg("-R")
            .arg(dir.path().join("persist"))
            .arg("-p")
            .arg(dir.path().join("pid"))
            .arg("-c")
            .arg(dir.path().join("ctl")),
        Stdio::null(),
    )?;
    let shipped_lines = || -> Vec<Vec<String>> {
        std::fs::read_to_string(&shipped)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()
    };

    let ns = Netns::create(&unique_name(&t.name))?;
    let netns = ns.inode()?.to_string();
    let target = format!("file:{}", input.display());
    let (mut obs, _) = Running::spawn(
        Command::new(observer_bin()).args([
            "run",
            "--export-per-cpu",
            "0",
            "--export-per-flow",
            "0",
            "--output",
            &target,
        ]),
        Stdio::null(),
    )?;
    // The start record went through syslog-ng: it follows the file.
    poll_until(
        "syslog-ng to ship the start record",
        START_TIMEOUT + Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            ensure!(
                shipper.exited()?.is_none(),
                "syslog-ng exited: {}",
                shipper.stderr()
            );
            ensure!(obs.exited()?.is_none(), "observer exited: {}", obs.stderr());
            Ok(shipped_lines()
                .iter()
                .any(|l| l[0] == "start")
                .then_some(()))
        },
    )?;
    // Known traffic: 40 refused connects to port 9, 25 to port 10.
    let never = Arc::new(AtomicBool::new(false));
    let to_9 = join(refused_connects(
        &ns,
        localhost(9),
        40,
        Duration::from_secs(20),
        Arc::clone(&never),
    )?)?;
    let to_10 = join(refused_connects(
        &ns,
        localhost(10),
        25,
        Duration::from_secs(20),
        never,
    )?)?;
    ensure!((to_9, to_10) == (40, 25), "connects: {to_9} + {to_10}");
    thread::sleep(Duration::from_millis(500));
    send_signal(obs.pid()?, libc::SIGINT)?;
    let (status, stderr) = obs.wait(STOP_TIMEOUT)?;
    ensure!(
        status.code() == Some(0),
        "observer exit {status}:\n{stderr}"
    );

    let written = std::fs::read_to_string(&input)?;
    let records: Vec<Value> = written
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}: {l}", i + 1)))
        .collect::<Result<_>>()?;
    let stop = records.last().context("no records")?;
    ensure!(stop["type"] == "stop", "last record: {stop}");
    poll_until(
        &format!("syslog-ng to ship all {} records", records.len()),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || Ok((shipped_lines().len() >= records.len()).then_some(())),
    )?;
    send_signal(shipper.pid()?, libc::SIGTERM)?;
    let (sng_status, sng_stderr) = shipper.wait(STOP_TIMEOUT)?;
    let lines = shipped_lines();

    let mut by_type_written: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        *by_type_written
            .entry(r["type"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    let mut by_type_shipped: BTreeMap<String, u64> = BTreeMap::new();
    for l in &lines {
        *by_type_shipped.entry(l[0].clone()).or_default() += 1;
    }
    note(&format!(
        "syslog-ng ({sng_status}): {} records written, {} shipped; by type written {by_type_written:?}; shipped {by_type_shipped:?}",
        records.len(),
        lines.len()
    ));
    ensure!(
        by_type_shipped == by_type_written,
        "by type: shipped {by_type_shipped:?}, written {by_type_written:?}; syslog-ng stderr:\n{sng_stderr}"
    );
    // Every event type written as many times as the stop record says observer received.
    let totals = stop["totals"].as_object().context("stop.totals")?;
    for (kind, t) in totals {
        let received = t["received"].as_u64().context("received")?;
        let mut shipped = by_type_shipped.get(kind).copied().unwrap_or(0);
        if kind == "retransmit" {
            shipped += by_type_shipped
                .get("retransmit_failed")
                .copied()
                .unwrap_or(0);
        }
        ensure!(
            shipped == received,
            "{kind}: {shipped} shipped, stop received {received}"
        );
    }
    // The test's connects, field by field, in both.
    let ours = |rows: Vec<(String, String, String, String)>| -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (ns_, daddr, dport, outcome) in rows {
            if ns_ == netns {
                *m.entry(format!("{daddr}:{dport} {outcome}")).or_default() += 1;
            }
        }
        m
    };
    let field = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let written_connects = ours(
        records
            .iter()
            .filter(|r| r["type"] == "connect_failed")
            .map(|r| {
                (
                    field(&r["netns"]),
                    field(&r["daddr"]),
                    field(&r["dport"]),
                    field(&r["outcome"]),
                )
            })
            .collect(),
    );
    let shipped_connects = ours(
        lines
            .iter()
            .filter(|l| l[0] == "connect_failed" && l.len() == 5)
            .map(|l| (l[1].clone(), l[2].clone(), l[3].clone(), l[4].clone()))
            .collect(),
    );
    let expected: BTreeMap<String, u64> = [
        ("127.0.0.1:9 refused".to_owned(), 40),
        ("127.0.0.1:10 refused".to_owned(), 25),
    ]
    .into();
    ensure!(
        written_connects == expected,
        "observer wrote {written_connects:?}, expected {expected:?}"
    );
    ensure!(
        shipped_connects == expected,
        "syslog-ng shipped {shipped_connects:?}, expected {expected:?}"
    );
    Ok(())
}
