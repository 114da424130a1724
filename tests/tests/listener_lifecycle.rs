//! Exact listener drops across a listener's life and a namespace's, against the namespace's own
//! counters: listeners created during the run and closed right after their burst (before the
//! observer's next reading) are counted to their last drop; a namespace created during the run
//! counts from zero, and the SYNs the `tcp_max_syn_backlog` rule refuses (syncookies off:
//! `ListenDrops` only) are `syn_queue_drops`.
//!
//! Unlike context_records.rs, everything here is created after the observer started.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use observer_tests::{
    Counters, Netns, kernel_test, live::LiveObserver, note, poll_until, unique_name,
};
use serde_json::Value;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the observer gets to report the whole ground truth (it reads once a second).
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);

const OVERFLOWS: &str = "TcpExtListenOverflows";
const REQ_Q_FULL: &str = "TcpExtTCPReqQFullDrop";
const LISTEN_DROPS: &str = "TcpExtListenDrops";

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

/// `clients` concurrent connects from inside `ns`, each bounded by `CONNECT_TIMEOUT`: the
/// connected streams and the number of failures.
fn connect_clients(
    ns: &Netns,
    addr: SocketAddr,
    clients: usize,
) -> Result<(Vec<TcpStream>, usize)> {
    let handles = (0..clients)
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
    records
        .iter()
        .filter(|r| {
            r["type"] == "listener_drops"
                && r["netns"].as_u64() == Some(netns)
                && r["addr"] == "127.0.0.1"
                && r["port"].as_u64() == Some(u64::from(port))
        })
        .collect()
}

fn listener_sum(records: &[Value], netns: u64, port: u16, field: &str) -> u64 {
    listener_records(records, netns, port)
        .iter()
        .map(|r| r[field].as_u64().unwrap_or(0))
        .sum()
}

/// What the observer must have reported for one listener: `fields` summing to their truths.
struct Expected {
    netns: u64,
    port: u16,
    fields: Vec<(&'static str, u64)>,
}

impl Expected {
    fn reported(&self, records: &[Value]) -> bool {
        self.fields
            .iter()
            .all(|&(field, truth)| listener_sum(records, self.netns, self.port, field) >= truth)
    }

    /// Every field's sum equals its truth exactly, in the records and in the stop record.
    fn check(&self, records: &[Value], stop: &Value) -> Result<()> {
        let ours = listener_records(records, self.netns, self.port);
        note(&format!(
            "listener_drops for {} 127.0.0.1:{}:\n  {}",
            self.netns,
            self.port,
            ours.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
        let entry = stop["listeners"]
            .as_array()
            .context("stop.listeners is not an array")?
            .iter()
            .find(|l| {
                l["netns"].as_u64() == Some(self.netns)
                    && l["port"].as_u64() == Some(u64::from(self.port))
            });
        for &(field, truth) in &self.fields {
            let summed = listener_sum(records, self.netns, self.port, field);
            ensure!(
                summed == truth,
                "listener_drops.{field} for port {} sum {summed} != truth {truth}",
                self.port
            );
            let in_stop = entry.and_then(|e| e[field].as_u64()).unwrap_or(0);
            ensure!(
                in_stop == truth,
                "stop.listeners.{field} for port {} is {in_stop}, truth {truth}: {entry:?}",
                self.port
            );
        }
        Ok(())
    }
}

/// Three rounds in one run, each a new listener (backlog 1, never accepting) whose accept
/// queue overflows under 10 clients and which closes as soon as the clients are done: the
/// drops after the observer's last reading are known only from the close.
#[test]
fn overflows_of_a_listener_closed_after_its_burst_are_counted_to_the_last() -> Result<()> {
    let Some(t) = kernel_test("lifecycle_acceptq_close") else {
        return Ok(());
    };
    let ns = Netns::create(&unique_name(&t.name))?;
    let netns = ns.inode()?;
    let observer = LiveObserver::start(&[])?;
    let mut expected = Vec::new();
    for round in 1..=3 {
        let listener = listener_in(&ns, 1)?;
        let port = listener.local_addr()?.port();
        let before = ns.counters()?;
        let (streams, failed) = connect_clients(&ns, listener.local_addr()?, 10)?;
        // Closed right after the burst, before the observer's next reading (most likely).
        drop(listener);
        drop(streams);
        let after = settled_counters(&ns)?;
        let truth = before.delta(&after, OVERFLOWS)?;
        note(&format!(
            "round {round}: port {port}, {failed} clients failed, ListenOverflows delta {truth}; changes {:?}",
            before.changes(&after)
        ));
        ensure!(
            truth > 0,
            "round {round}: no overflow: the fault did not happen"
        );
        expected.push(Expected {
            netns,
            port,
            fields: vec![("accept_queue_overflows", truth)],
        });
    }
    let waited = observer.wait_for("every round's overflows reported", REPORT_TIMEOUT, |rs| {
        Ok(expected.iter().all(|e| e.reported(rs)).then_some(()))
    });
    let run = observer.stop()?;
    let closed = run
        .records
        .iter()
        .filter(|r| r["type"] == "listener_drops" && r["closed"] == true)
        .count();
    note(&format!(
        "listener_drops records of closed listeners: {closed}"
    ));
    let stop = run.stop()?;
    for e in &expected {
        e.check(&run.records, stop)?;
    }
    waited?;
    // Each listener's anomaly names its full accept queue as the cause, with the kernel's count
    // (its last record, written at shutdown, has every interval's drops).
    for e in &expected {
        let last = run
            .records
            .iter()
            .rev()
            .find(|r| {
                r["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("anomaly_"))
                    && r["kind"] == "listen_overflow"
                    && r["key"]["netns"].as_u64() == Some(e.netns)
                    && r["key"]["port"].as_u64() == Some(u64::from(e.port))
            })
            .with_context(|| format!("no listen_overflow anomaly for port {}", e.port))?;
        let cause = &last["cause"];
        note(&format!(
            "listen_overflow on port {}: cause {cause}",
            e.port
        ));
        ensure!(cause["kind"] == "accept_queue_overflow", "cause: {cause}");
        let truth = e.fields[0].1;
        ensure!(
            cause["evidence"]["accept_queue_overflows"].as_u64() == Some(truth),
            "cause.evidence.accept_queue_overflows != ListenOverflows delta {truth}: {cause}"
        );
        ensure!(
            cause["summary"]
                .as_str()
                .is_some_and(|s| s.contains(&format!("127.0.0.1:{}", e.port))),
            "summary: {cause}"
        );
    }
    Ok(())
}

/// A namespace created a moment before a SYN flood, while the observer runs (with classic
/// programs): syncookies off, tcp_max_syn_backlog 16 and a listen backlog of 128, so the
/// `tcp_max_syn_backlog` rule refuses SYNs once 13 handshakes are half-open (the listener's
/// ACKs are dropped): `ListenDrops` moves, `TCPReqQFullDrop` does not. Two rounds, each in a
/// fresh namespace.
#[test]
fn syn_backlog_refusals_in_a_fresh_namespace_are_syn_queue_drops() -> Result<()> {
    let Some(t) = kernel_test("lifecycle_synbacklog") else {
        return Ok(());
    };
    let observer = LiveObserver::start(&["--attach", "classic"])?;
    let mut namespaces = Vec::new();
    let mut expected = Vec::new();
    for round in 1..=2 {
        let ns = Netns::create(&unique_name(&format!("{}{round}", t.name)))?;
        ns.sysctl("net.ipv4.tcp_syncookies", "0")?;
        ns.sysctl("net.ipv4.tcp_max_syn_backlog", "16")?;
        let before = ns.counters()?;
        let listener = listener_in(&ns, 128)?;
        let addr = listener.local_addr()?;
        let port = addr.port().to_string();
        // Everything but SYNs towards the listener is dropped: handshakes stay half-open.
        ns.iptables(
            false,
            &[
                "-w", "5", "-I", "INPUT", "-p", "tcp", "--dport", &port, "!", "--syn", "-j", "DROP",
            ],
        )?;
        let (streams, failed) = connect_clients(&ns, addr, 40)?;
        ns.iptables(
            false,
            &[
                "-w", "5", "-I", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP",
            ],
        )?;
        let after = settled_counters(&ns)?;
        let listen_drops = before.delta(&after, LISTEN_DROPS)?;
        let req_q_full = before.delta(&after, REQ_Q_FULL)?;
        note(&format!(
            "round {round}: {} connected, {failed} failed; ListenDrops {listen_drops}, TCPReqQFullDrop {req_q_full}; changes {:?}",
            streams.len(),
            before.changes(&after)
        ));
        ensure!(listen_drops > 0, "round {round}: no SYN refused");
        ensure!(
            req_q_full == 0 && before.delta(&after, OVERFLOWS)? == 0,
            "round {round}: refusals by another limit than tcp_max_syn_backlog"
        );
        expected.push(Expected {
            netns: ns.inode()?,
            port: addr.port(),
            fields: vec![("syn_queue_drops", listen_drops), ("other_drops", 0)],
        });
        namespaces.push((ns, listener, streams));
    }
    let waited = observer.wait_for(
        "every round's SYN-queue drops reported",
        REPORT_TIMEOUT,
        |rs| Ok(expected.iter().all(|e| e.reported(rs)).then_some(())),
    );
    let run = observer.stop()?;
    run.ensure_programs_are("tracepoint")?;
    let stop = run.stop()?;
    for e in &expected {
        e.check(&run.records, stop)?;
    }
    waited?;
    drop(namespaces);
    Ok(())
}
