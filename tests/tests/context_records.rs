//! Context records of `observer run` against the kernel's own ground truth: `listener_drops`
//! (accept-queue overflows, SYN-queue drops) against the namespace's `ListenOverflows` /
//! `TCPReqQFullDrop` deltas, `netfilter_drop` against iptables' rule counter, the `stop`
//! record's `listeners` and `netfilter_rules` sums, a SIGHUP reload of `[thresholds]`, and the
//! SIGTERM shutdown time.
//!
//! The context worker takes its baseline before `start`: every namespace (and listener, and
//! rule) is created before the observer starts. Each test waits (with a deadline) until the
//! observer has reported the whole ground truth before stopping it.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use observer_tests::{
    Counters, Netns, Topology, faults, kernel_test, live::LiveObserver, nonblocking_connect, note,
    poll_until, unique_name,
};
use serde_json::Value;

const CLIENTS: usize = 10;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the observer gets to report the whole ground truth (it reads once a second).
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

const OVERFLOWS: &str = "TcpExtListenOverflows";
const REQ_Q_FULL: &str = "TcpExtTCPReqQFullDrop";
const LISTEN_DROPS: &str = "TcpExtListenDrops";

/// Every retransmit-kind event exported, and only those kinds (see anomalies.rs).
const RETRANSMIT_KINDS: [&str; 6] = [
    "--export-per-flow",
    "0",
    "--export-per-cpu",
    "0",
    "--export-kinds",
    "retransmit,syn_retransmit,synack_retransmit",
];

/// A file removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn create(test: &str, suffix: &str, contents: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}{suffix}", unique_name(test)));
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }

    fn write(&self, contents: &str) -> Result<()> {
        std::fs::write(&self.0, contents).with_context(|| format!("writing {}", self.0.display()))
    }

    fn path(&self) -> Result<&str> {
        self.0.to_str().context("temporary path is not UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn of_type<'a>(records: &'a [Value], ty: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records.iter().filter(move |r| r["type"] == ty)
}

fn u64_of(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// A listener on 127.0.0.1 (port chosen by the kernel) with `backlog`, created in `ns`.
fn listener_in(ns: &Netns, backlog: i32) -> Result<TcpListener> {
    ns.run(move || -> Result<TcpListener> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        // listen() again on a listening socket only changes its backlog.
        // SAFETY: the descriptor is open (owned by `listener`); listen takes no pointers.
        let rc = unsafe { libc::listen(listener.as_raw_fd(), backlog) };
        ensure!(rc == 0, "listen: {}", std::io::Error::last_os_error());
        Ok(listener)
    })?
}

/// `CLIENTS` concurrent connects from inside `ns`, each bounded by `CONNECT_TIMEOUT`: the
/// connected streams and the number of failures.
fn connect_clients(ns: &Netns, addr: SocketAddr) -> Result<(Vec<TcpStream>, usize)> {
    let handles = (0..CLIENTS)
        .map(|_| ns.spawn_thread(move || Ok(TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))))
        .collect::<Result<Vec<_>>>()?;
    let mut streams = Vec::new();
    let mut failed = 0;
    for handle in handles {
        match handle
            .join()
            .map_err(|_| anyhow!("client thread panicked"))??
        {
            Ok(s) => streams.push(s),
            Err(_) => failed += 1,
        }
    }
    Ok((streams, failed))
}

/// The namespace's counters once the listen counters have stopped moving (two reads 300 ms
/// apart agree), within 10 s.
fn settled_counters(ns: &Netns) -> Result<Counters> {
    let key = |c: &Counters| [OVERFLOWS, REQ_Q_FULL, LISTEN_DROPS].map(|n| c.get(n).ok());
    let mut last = ns.counters()?;
    poll_until(
        "the listen counters to settle",
        Duration::from_secs(10),
        Duration::from_millis(300),
        || {
            let next = ns.counters()?;
            let same = key(&next) == key(&last);
            last = next.clone();
            Ok(same.then_some(next))
        },
    )
}

/// `listener_drops` records for (netns, 127.0.0.1, port).
fn listener_records(records: &[Value], netns: u64, port: u16) -> Vec<&Value> {
    of_type(records, "listener_drops")
        .filter(|r| {
            r["netns"].as_u64() == Some(netns)
                && r["addr"] == "127.0.0.1"
                && r["port"].as_u64() == Some(u64::from(port))
        })
        .collect()
}

fn listener_sum(records: &[Value], netns: u64, port: u16, field: &str) -> u64 {
    listener_records(records, netns, port)
        .iter()
        .map(|r| u64_of(r, field))
        .sum()
}

/// The stop record's `listeners` entry for (netns, 127.0.0.1, port).
fn stop_listener(stop: &Value, netns: u64, port: u16) -> Result<&Value> {
    stop["listeners"]
        .as_array()
        .context("stop.listeners is not an array")?
        .iter()
        .find(|l| {
            l["netns"].as_u64() == Some(netns)
                && l["addr"] == "127.0.0.1"
                && l["port"].as_u64() == Some(u64::from(port))
        })
        .with_context(|| {
            format!(
                "no stop.listeners entry for {netns} 127.0.0.1:{port}: {}",
                stop["listeners"]
            )
        })
}

/// Shared body of the two listener tests: `field` of the observer's records against the
/// namespace's `counter` delta.
fn check_listener(
    ns: &Netns,
    observer: LiveObserver,
    port: u16,
    before: &Counters,
    field: &str,
    counter: &str,
) -> Result<()> {
    let netns = ns.inode()?;
    let after = settled_counters(ns)?;
    let truth = before.delta(&after, counter)?;
    note(&format!(
        "{field}: namespace {counter} delta {truth}; changes {:?}",
        before.changes(&after)
    ));
    // Wait until the observer has reported all of it (or give up and report what it said).
    let waited = observer.wait_for(
        &format!("listener_drops.{field} summing to {truth}"),
        REPORT_TIMEOUT,
        |rs| Ok((listener_sum(rs, netns, port, field) >= truth).then_some(())),
    );
    let run = observer.stop()?;
    let records = &run.records;
    let ours: Vec<&Value> = listener_records(records, netns, port);
    let summed = listener_sum(records, netns, port, field);
    note(&format!(
        "listener_drops records for {netns} 127.0.0.1:{port}: {}",
        ours.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    ));
    ensure!(truth > 0, "no {counter} counted: the fault did not happen");
    let stop = run.stop()?;
    let entry = stop_listener(stop, netns, port);
    note(&format!("stop.listeners entry: {entry:?}"));
    waited.with_context(|| format!("summed {summed} of {truth}"))?;
    let entry = entry?;
    ensure!(
        u64_of(entry, field) == truth,
        "stop.listeners.{field} {} != {counter} delta {truth}: {entry}",
        u64_of(entry, field)
    );
    ensure!(
        summed == truth,
        "listener_drops.{field} sum {summed} != {counter} delta {truth}"
    );
    Ok(())
}

/// Accept queue full: a backlog-1 listener that never accepts, 10 clients.
#[test]
fn accept_queue_overflows_match_listen_overflows() -> Result<()> {
    let Some(t) = kernel_test("ctx_acceptq") else {
        return Ok(());
    };
    let ns = Netns::create(&unique_name(&t.name))?;
    let listener = listener_in(&ns, 1)?;
    let addr = listener.local_addr()?;
    let observer = LiveObserver::start(&[])?;
    let before = ns.counters()?;
    let (streams, failed) = connect_clients(&ns, addr)?;
    note(&format!(
        "accept queue: {} connected, {failed} failed",
        streams.len()
    ));
    // Cut the listener off: nothing late can move the counters after the ground truth.
    ns.iptables(
        false,
        &[
            "-w",
            "5",
            "-I",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &addr.port().to_string(),
            "-j",
            "DROP",
        ],
    )?;
    let result = check_listener(
        &ns,
        observer,
        addr.port(),
        &before,
        "accept_queue_overflows",
        OVERFLOWS,
    );
    drop(streams);
    drop(listener);
    result
}

/// SYN queue full (syncookies off, backlog 2): handshakes that never complete.
#[test]
fn syn_queue_drops_match_req_q_full_drops() -> Result<()> {
    let Some(t) = kernel_test("ctx_synq") else {
        return Ok(());
    };
    let ns = Netns::create(&unique_name(&t.name))?;
    ns.sysctl("net.ipv4.tcp_syncookies", "0")?;
    ns.sysctl("net.ipv4.tcp_max_syn_backlog", "16")?;
    let listener = listener_in(&ns, 2)?;
    let addr = listener.local_addr()?;
    let port = addr.port().to_string();
    // Everything but SYNs towards the listener is dropped: handshakes stay half-open.
    ns.iptables(
        false,
        &[
            "-w", "5", "-I", "INPUT", "-p", "tcp", "--dport", &port, "!", "--syn", "-j", "DROP",
        ],
    )?;
    let observer = LiveObserver::start(&[])?;
    let before = ns.counters()?;
    let (streams, failed) = connect_clients(&ns, addr)?;
    note(&format!(
        "SYN queue: {} connected, {failed} failed",
        streams.len()
    ));
    ns.iptables(
        false,
        &[
            "-w", "5", "-I", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP",
        ],
    )?;
    let result = check_listener(
        &ns,
        observer,
        addr.port(),
        &before,
        "syn_queue_drops",
        REQ_Q_FULL,
    );
    drop(streams);
    drop(listener);
    result
}

/// `iptables -L INPUT -v -x -n`: the packet count of the rule mentioning `dpt:PORT`.
fn rule_packets(ns: &Netns, port: u16) -> Result<u64> {
    let listing = ns.exec("iptables", &["-w", "5", "-L", "INPUT", "-v", "-x", "-n"])?;
    let needle = format!("dpt:{port}");
    listing
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no rule for port {port} in\n{listing}"))
}

/// `nft -a list chain ip filter INPUT`: the handle of the rule with `dport PORT`.
fn rule_handle(ns: &Netns, port: u16) -> Result<Option<u64>> {
    let Ok(listing) = ns.exec("nft", &["-a", "list", "chain", "ip", "filter", "INPUT"]) else {
        return Ok(None);
    };
    let needle = format!("dport {port} ");
    Ok(listing
        .lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_once("# handle "))
        .and_then(|(_, h)| h.trim().parse().ok()))
}

fn mentions_port(rule: &Value, port: u16) -> bool {
    let text = rule["rule"].as_str().unwrap_or("");
    let dport = format!("dport {port}");
    text.contains(&format!("{dport} ")) || text.ends_with(&dport)
}

fn is_rule(rule: &Value, port: u16, handle: Option<u64>) -> bool {
    rule["chain"] == "INPUT"
        && (mentions_port(rule, port) || handle.is_some_and(|h| rule["handle"].as_u64() == Some(h)))
}

/// The `netfilter_drop` records of `netns` naming the rule, summed (packets of the rule entry).
fn named_packets(records: &[Value], netns: u64, port: u16, handle: Option<u64>) -> u64 {
    of_type(records, "netfilter_drop")
        .filter(|r| r["netns"].as_u64() == Some(netns))
        .flat_map(|r| r["rules"].as_array().into_iter().flatten())
        .filter(|rule| is_rule(rule, port, handle))
        .map(|rule| u64_of(rule, "packets"))
        .sum()
}

/// Rule A drops SYNs to port A (connected to, a few times); rule B to an unused port.
#[test]
fn netfilter_drops_name_the_dropping_rule() -> Result<()> {
    const PORT_A: u16 = 5101;
    const PORT_B: u16 = 5102;
    const ATTEMPTS: u32 = 3;
    let Some(t) = kernel_test("ctx_netfilter") else {
        return Ok(());
    };
    let ns = Netns::create(&unique_name(&t.name))?;
    let netns = ns.inode()?;
    for port in [PORT_A, PORT_B] {
        ns.iptables(
            false,
            &[
                "-w",
                "5",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "--syn",
                "-j",
                "DROP",
            ],
        )?;
    }
    let handle_a = rule_handle(&ns, PORT_A)?;
    let handle_b = rule_handle(&ns, PORT_B)?;
    note(&format!("rule handles: A {handle_a:?}, B {handle_b:?}"));
    let observer = LiveObserver::start(&[])?;
    let attempts = ns.run(|| -> Result<()> {
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, PORT_A));
        for _ in 0..ATTEMPTS {
            match TcpStream::connect_timeout(&to, Duration::from_millis(1100)) {
                Ok(_) => bail!("connect to {to} succeeded although its SYNs are dropped"),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => bail!("connect to {to}: expected a timeout, got {e}"),
            }
        }
        Ok(())
    })?;
    let truth = rule_packets(&ns, PORT_A)?;
    let truth_b = rule_packets(&ns, PORT_B)?;
    note(&format!(
        "iptables counters: rule A {truth} packets, rule B {truth_b}"
    ));
    let waited = attempts.and_then(|()| {
        observer.wait_for(
            &format!("netfilter_drop records naming rule A for {truth} packets"),
            REPORT_TIMEOUT,
            |rs| Ok((named_packets(rs, netns, PORT_A, handle_a) >= truth).then_some(())),
        )
    });
    let run = observer.stop()?;
    let records = &run.records;
    let drops: Vec<&Value> = of_type(records, "netfilter_drop")
        .filter(|r| r["netns"].as_u64() == Some(netns))
        .collect();
    note(&format!(
        "netfilter_drop records for {netns}:\n  {}",
        drops
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    ));
    let stop = run.stop()?;
    let rules: Vec<&Value> = stop["netfilter_rules"]
        .as_array()
        .context("stop.netfilter_rules is not an array")?
        .iter()
        .filter(|r| r["netns"].as_u64() == Some(netns))
        .collect();
    note(&format!("stop.netfilter_rules for {netns}: {rules:?}"));
    waited?;
    ensure!(
        truth >= u64::from(ATTEMPTS),
        "each attempt sent a SYN: {truth} < {ATTEMPTS}"
    );
    ensure!(truth_b == 0, "rule B counted {truth_b} packets");
    let a: Vec<&&Value> = rules
        .iter()
        .filter(|r| is_rule(r, PORT_A, handle_a))
        .collect();
    let [a] = a[..] else {
        bail!("expected one stop.netfilter_rules entry for rule A, got {a:?}");
    };
    ensure!(
        u64_of(a, "packets") == truth,
        "stop.netfilter_rules packets {} != iptables' counter {truth}: {a}",
        u64_of(a, "packets")
    );
    ensure!(
        !rules.iter().any(|r| is_rule(r, PORT_B, handle_b)),
        "rule B in stop.netfilter_rules: {rules:?}"
    );
    ensure!(
        named_packets(records, netns, PORT_A, handle_a) > 0,
        "no netfilter_drop record names rule A"
    );
    Ok(())
}

fn thresholds_config(open_per_sec: f64) -> String {
    format!("[thresholds.connect_trouble]\nopen_per_sec = {open_per_sec:?}\n")
}

/// Connects whose SYNs the server drops, in parallel from the client namespace; returns the
/// sockets (closing them stops their retransmits).
fn syn_retransmitting_connects(
    topo: &Topology,
    to: SocketAddr,
    n: usize,
) -> Result<Vec<std::os::fd::OwnedFd>> {
    topo.client.run(|| {
        (0..n)
            .map(|_| nonblocking_connect(to))
            .collect::<Result<Vec<_>>>()
    })?
}

/// SIGHUP reloads `[thresholds]` live: connect_trouble opens only once its threshold is low;
/// an invalid file is refused and the observer runs on.
#[test]
fn sighup_reloads_thresholds_and_refuses_invalid_files() -> Result<()> {
    const PORT: u16 = 5103;
    let Some(t) = kernel_test("ctx_sighup") else {
        return Ok(());
    };
    let topo = Topology::new(&t.name, 131)?;
    let client_ns = topo.client.inode()?;
    faults::drop_syns_to(&topo.server, false, PORT, 1)?;
    let config = TempFile::create(&t.name, ".toml", &thresholds_config(1000.0))?;
    let mut args = vec!["--config", config.path()?];
    args.extend(RETRANSMIT_KINDS);
    let observer = LiveObserver::start(&args)?;
    let to = SocketAddr::new(topo.server_ip(false), PORT);
    let server_ip = topo.server_ip(false).to_string();
    let is_trouble = |r: &Value| {
        r["type"] == "anomaly_open"
            && r["kind"] == "connect_trouble"
            && r["key"]["netns"].as_u64() == Some(client_ns)
            && r["key"]["addr"].as_str() == Some(server_ip.as_str())
    };
    let is_syn_retrans = |r: &Value| {
        r["type"] == "syn_retransmit"
            && r["netns"].as_u64() == Some(client_ns)
            && r["daddr"].as_str() == Some(server_ip.as_str())
    };
    let result = (|| -> Result<()> {
        // Phase 1: threshold 1000/s. 8 connects: 16 SYN retransmits by ~3 s (1.6/s over the
        // 10 s window, above the default 1/s).
        let before = topo.client.counters()?;
        let sockets = syn_retransmitting_connects(&topo, to, 8)?;
        let seen = observer.wait_for(
            "16 syn_retransmit records with the high threshold",
            Duration::from_secs(15),
            |rs| Ok((rs.iter().filter(|r| is_syn_retrans(r)).count() >= 16).then_some(())),
        );
        drop(sockets);
        seen?;
        let syn_retrans = before.delta(&topo.client.counters()?, "TcpExtTCPSynRetrans")?;
        note(&format!(
            "phase 1: client TcpExtTCPSynRetrans delta {syn_retrans}"
        ));
        ensure!(syn_retrans >= 16, "only {syn_retrans} SYN retransmits");
        let early = observer.wait_for("records so far", Duration::from_secs(1), |rs| {
            Ok(Some(rs.iter().filter(|r| is_trouble(r)).count()))
        })?;
        ensure!(
            early == 0,
            "connect_trouble opened with open_per_sec = 1000"
        );

        // Phase 2: reload with a low threshold.
        config.write(&thresholds_config(0.2))?;
        observer.signal(libc::SIGHUP)?;
        let reload_at = observer.wait_for("config_reload ok", Duration::from_secs(10), |rs| {
            Ok(rs.iter().position(|r| r["type"] == "config_reload"))
        })?;
        let reload = observer.record(reload_at)?;
        note(&format!("reload: {reload}"));
        ensure!(reload["ok"] == true, "config_reload not ok: {reload}");
        ensure!(
            reload["applied"]
                .as_array()
                .is_some_and(|a| a.iter().any(|k| k == "thresholds")),
            "thresholds not in applied: {reload}"
        );
        let sockets = syn_retransmitting_connects(&topo, to, 8)?;
        let opened = observer.wait_for(
            "connect_trouble anomaly_open after the reload",
            Duration::from_secs(20),
            |rs| Ok(rs.iter().skip(reload_at).find(|r| is_trouble(r)).cloned()),
        );
        drop(sockets);
        let opened = opened?;
        note(&format!("opened: {opened}"));
        ensure!(
            observer.count(is_trouble)? == 1,
            "connect_trouble opened before the reload"
        );

        // Phase 3: an invalid file is refused.
        config.write("[thresholds\nthis is not toml =\n")?;
        observer.signal(libc::SIGHUP)?;
        let bad = observer.wait_for("config_reload ok false", Duration::from_secs(10), |rs| {
            Ok(rs
                .iter()
                .skip(reload_at + 1)
                .find(|r| r["type"] == "config_reload")
                .cloned())
        })?;
        note(&format!("invalid reload: {bad}"));
        ensure!(bad["ok"] == false, "invalid config accepted: {bad}");
        ensure!(
            bad["error"].as_str().is_some_and(|e| !e.is_empty()),
            "no error in {bad}"
        );
        Ok(())
    })();
    let run = observer.stop();
    result?;
    let run = run?;
    ensure!(
        run.records.last().is_some_and(|r| r["type"] == "stop"),
        "no stop record last"
    );
    Ok(())
}

/// SIGTERM on an idle observer: it exits within 1 s, `stop` last, exit code 0.
#[test]
fn sigterm_exits_within_one_second() -> Result<()> {
    let Some(_t) = kernel_test("ctx_sigterm") else {
        return Ok(());
    };
    let observer = LiveObserver::start(&[])?;
    let (run, took) = observer.stop_with(libc::SIGTERM)?;
    note(&format!("SIGTERM to exit: {took:?}"));
    let stop = run.stop()?;
    ensure!(stop["reason"] == "signal", "stop reason: {stop}");
    ensure!(
        took < Duration::from_secs(1),
        "observer took {took:?} to exit after SIGTERM"
    );
    Ok(())
}
