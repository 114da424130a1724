//! Every anomaly says why: faults induced in a server namespace, the symptom seen in the
//! client's, and the anomaly's `cause` checked against what the test did and the kernel's
//! counters (docs/schema.md, "cause").
//!
//! The observers run with the default thresholds and export budgets, as an operator runs them:
//! the causes must come from what the defaults deliver.
//!
//! Subnets: 10.200.120-129.0/24. Ports: 6080 (SYNs dropped by a rule), 6081 (closed),
//! 6082 (a server that closes every connection abortively).
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use observer_tests::{
    Topology, kernel_test,
    live::{LiveObserver, Received},
    nonblocking_connect, note,
    support::rule_packets,
};
use serde_json::Value;

const RULE_PORT: u16 = 6080;
const CLOSED_PORT: u16 = 6081;
const ABORT_PORT: u16 = 6082;

/// The bound from a first symptom to an anomaly that names its cause.
const TIME_TO_CAUSE: Duration = Duration::from_secs(5);

fn is_anomaly(v: &Value) -> bool {
    matches!(
        v["type"].as_str(),
        Some("anomaly_open" | "anomaly_update" | "anomaly_close")
    )
}

/// The anomaly of `kind` on the peer `addr` in namespace `netns` whose cause is `cause_kind`,
/// with when it arrived.
fn explained<'a>(
    records: &'a [Received],
    kind: &str,
    netns: u64,
    addr: IpAddr,
    cause_kind: &str,
) -> Option<&'a Received> {
    records.iter().find(|r| {
        let v = &r.value;
        is_anomaly(v)
            && v["kind"] == kind
            && v["key"]["netns"].as_u64() == Some(netns)
            && v["key"]["addr"].as_str() == Some(&addr.to_string())
            && v["cause"]["kind"] == cause_kind
    })
}

fn describe_anomalies(records: &[Received]) -> String {
    records
        .iter()
        .filter(|r| is_anomaly(&r.value))
        .map(|r| {
            format!(
                "{} {} {} cause={}\n",
                r.value["type"], r.value["kind"], r.value["key"], r.value["cause"]
            )
        })
        .collect()
}

/// The first event of `ty` in namespace `netns`, when it arrived.
fn first_event(records: &[Received], ty: &str, netns: u64) -> Option<Instant> {
    records
        .iter()
        .find(|r| r.value["type"] == ty && r.value["netns"].as_u64() == Some(netns))
        .map(|r| r.at)
}

/// SYNs to a port dropped by an iptables rule in the server's namespace: the client's
/// `connect_trouble` names the rule, its namespace and its packet count, within 5 s of the
/// first SYN retransmit.
#[test]
fn syns_dropped_by_a_rule_name_the_rule_on_the_clients_connect_trouble() -> Result<()> {
    const TEST: &str = "syns_dropped_by_a_rule_name_the_rule_on_the_clients_connect_trouble";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    let topo = Topology::new(TEST, 120)?;
    let (client_ns, server_ns) = (topo.client.inode()?, topo.server.inode()?);
    let server = SocketAddr::new(topo.server_ip(false), RULE_PORT);
    let _listener = topo.server.run(move || TcpListener::bind(server))??;
    topo.server.iptables(
        false,
        &[
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &RULE_PORT.to_string(),
            "--syn",
            "-j",
            "DROP",
        ],
    )?;
    let obs = LiveObserver::start(&[])?;
    // Six pending connects: each retransmits its SYN at 1, 2, 3, 4 s.
    let pending: Vec<OwnedFd> = (0..6)
        .map(|_| topo.client.run(move || nonblocking_connect(server))?)
        .collect::<Result<_>>()?;
    let peer = topo.server_ip(false);
    let found = obs.wait_for_received(
        "connect_trouble with a netfilter_rule cause naming the rule",
        Duration::from_secs(20),
        |recs| {
            explained(recs, "connect_trouble", client_ns, peer, "netfilter_rule")
                .filter(|r| !r.value["cause"]["evidence"]["rule"].is_null())
                .cloned()
        },
    )?;
    let records = obs.received();
    let first_symptom = first_event(&records, "syn_retransmit", client_ns)
        .context("no syn_retransmit event in the client namespace")?;
    drop(pending);
    let run_records = obs.stop_received()?;
    let rule_counter = rule_packets(&topo.server, false, "INPUT", "DROP")?;
    let cause = &found.value["cause"];
    note(&format!(
        "{TEST}: {} after the first SYN retransmit: {cause}",
        humantime(found.at.saturating_duration_since(first_symptom))
    ));
    ensure!(
        found.at.saturating_duration_since(first_symptom) <= TIME_TO_CAUSE,
        "the cause came {:?} after the first symptom",
        found.at.saturating_duration_since(first_symptom)
    );
    let evidence = &cause["evidence"];
    ensure!(
        evidence["netns"].as_u64() == Some(server_ns),
        "netns: {cause}"
    );
    ensure!(evidence["chain"] == "INPUT", "chain: {cause}");
    let rule_text = evidence["rule"].as_str().unwrap_or_default();
    ensure!(
        rule_text.contains(&RULE_PORT.to_string()),
        "the rule text names the port: {cause}"
    );
    let summary = cause["summary"].as_str().unwrap_or_default();
    ensure!(
        summary.contains(rule_text) && summary.contains("netns"),
        "summary: {summary}"
    );
    // Counts against the kernel: the rule's packets as observer saw them grow never exceed the
    // rule's own counter, and the final record (at shutdown) has them all.
    let last = run_records
        .iter()
        .rev()
        .find(|r| {
            is_anomaly(&r.value)
                && r.value["kind"] == "connect_trouble"
                && r.value["key"]["netns"].as_u64() == Some(client_ns)
                && r.value["cause"]["kind"] == "netfilter_rule"
        })
        .context("no final connect_trouble record")?;
    let final_packets = last.value["cause"]["evidence"]["rule_packets"]
        .as_u64()
        .context("rule_packets")?;
    note(&format!(
        "{TEST}: rule counter {rule_counter}, cause.rule_packets {final_packets}, syns_dropped {}",
        last.value["cause"]["evidence"]["syns_dropped"]
    ));
    ensure!(
        final_packets == rule_counter,
        "cause.rule_packets {final_packets} != the rule's counter {rule_counter}: {}",
        describe_anomalies(&run_records)
    );
    ensure!(
        last.value["cause"]["evidence"]["syns_dropped"].as_u64() >= Some(1),
        "syns_dropped: {}",
        last.value["cause"]
    );
    Ok(())
}

fn humantime(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Connects to a closed port: the client's `failed_connects` says nothing listens there, with
/// as many resets as the server's namespace sent.
#[test]
fn connects_to_a_closed_port_say_nothing_listens() -> Result<()> {
    const TEST: &str = "connects_to_a_closed_port_say_nothing_listens";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    let topo = Topology::new(TEST, 121)?;
    let (client_ns, server_ns) = (topo.client.inode()?, topo.server.inode()?);
    let server = SocketAddr::new(topo.server_ip(false), CLOSED_PORT);
    let before = topo.server.counters()?;
    // Every event exported: the cause's counts of resets are of exported events (the default
    // budget exports 10 a second per handshake key), and this test compares them exactly.
    let obs = LiveObserver::start(&["--export-per-flow", "0", "--export-per-cpu", "0"])?;
    const CONNECTS: usize = 12;
    for _ in 0..CONNECTS {
        let refused = topo
            .client
            .run(move || TcpStream::connect_timeout(&server, Duration::from_secs(2)))?;
        ensure!(refused.is_err(), "a connect to a closed port succeeded");
    }
    let peer = topo.server_ip(false);
    let found = obs.wait_for_received(
        "failed_connects with a no_listener cause",
        Duration::from_secs(15),
        |recs| explained(recs, "failed_connects", client_ns, peer, "no_listener").cloned(),
    )?;
    let records = obs.stop_received()?;
    let resets = before.delta(&topo.server.counters()?, "TcpOutRsts")?;
    let cause = &found.value["cause"];
    note(&format!("{TEST}: server TcpOutRsts +{resets}; {cause}"));
    ensure!(resets == CONNECTS as u64, "TcpOutRsts +{resets}");
    ensure!(
        cause["evidence"]["netns"].as_u64() == Some(server_ns),
        "{cause}"
    );
    let summary = cause["summary"].as_str().unwrap_or_default();
    ensure!(
        summary.contains(&format!("nothing listens on {server}")),
        "summary: {summary}"
    );
    let last = records
        .iter()
        .rev()
        .find(|r| {
            is_anomaly(&r.value)
                && r.value["kind"] == "failed_connects"
                && r.value["cause"]["kind"] == "no_listener"
        })
        .context("no final failed_connects record")?;
    ensure!(
        last.value["cause"]["evidence"]["resets_sent"].as_u64() == Some(resets),
        "resets_sent {} != TcpOutRsts +{resets}",
        last.value["cause"]["evidence"]["resets_sent"]
    );
    Ok(())
}

/// Sets SO_LINGER {on, 0}: close() then aborts the connection with a reset.
fn linger_zero(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the pointer and length describe `linger`; the fd is open for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>())?,
        )
    };
    ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    Ok(())
}

/// A server that resets every connection (it closes without reading the request, SO_LINGER 0):
/// 20 connections in 5 s, 4 resets a second, under the reset_storm rate (5/s). The client's
/// anomaly opens on the ratio (every connection reset) and names this process.
#[test]
fn an_abortive_close_of_every_connection_opens_by_ratio_and_names_the_process() -> Result<()> {
    const TEST: &str = "an_abortive_close_of_every_connection_opens_by_ratio_and_names_the_process";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    const CONNECTIONS: usize = 20;
    let topo = Topology::new(TEST, 122)?;
    let (client_ns, server_ns) = (topo.client.inode()?, topo.server.inode()?);
    let server = SocketAddr::new(topo.server_ip(false), ABORT_PORT);
    let listener = topo.server.run(move || TcpListener::bind(server))??;
    let obs = LiveObserver::start(&[])?;
    let before = topo.server.counters()?;
    let acceptor = thread::spawn(move || -> Result<()> {
        for _ in 0..CONNECTIONS {
            let (stream, _) = listener.accept()?;
            // Wait for the request so that it is unread at the close.
            let mut peek = [0u8; 1];
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.peek(&mut peek)?;
            linger_zero(&stream)?;
            drop(stream);
        }
        Ok(())
    });
    let start = Instant::now();
    for i in 0..CONNECTIONS {
        let mut stream = topo
            .client
            .run(move || TcpStream::connect_timeout(&server, Duration::from_secs(2)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut buf = [0u8; 16];
        let reset = matches!(stream.read(&mut buf), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        ensure!(reset, "connection {i} was not reset");
        // 4 a second.
        let next = start + Duration::from_millis(250) * u32::try_from(i + 1)?;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    match acceptor.join() {
        Ok(r) => r?,
        Err(_) => bail!("acceptor panicked"),
    }
    let peer = topo.server_ip(false);
    let found = obs.wait_for_received(
        "reset_storm on the client with a reset cause",
        Duration::from_secs(15),
        |recs| explained(recs, "reset_storm", client_ns, peer, "reset").cloned(),
    )?;
    let records = obs.stop_received()?;
    let resets = before.delta(&topo.server.counters()?, "TcpOutRsts")?;
    let v = &found.value;
    let cause = &v["cause"];
    note(&format!("{TEST}: server TcpOutRsts +{resets}; {v}"));
    ensure!(resets == CONNECTIONS as u64, "TcpOutRsts +{resets}");
    let opened = records
        .iter()
        .find(|r| {
            r.value["type"] == "anomaly_open"
                && r.value["kind"] == "reset_storm"
                && r.value["key"]["netns"].as_u64() == Some(client_ns)
        })
        .context("no reset_storm opened on the client")?;
    ensure!(
        opened.value["opened_by"] == "ratio",
        "opened by {} (the rate is under the threshold)",
        opened.value["opened_by"]
    );
    let per_connection = &opened.value["per_connection"];
    ensure!(
        per_connection["ratio"].as_f64() >= Some(0.9),
        "per_connection: {per_connection}"
    );
    ensure!(
        cause["evidence"]["netns"].as_u64() == Some(server_ns),
        "{cause}"
    );
    ensure!(
        cause["evidence"]["pid"].as_u64() == Some(u64::from(std::process::id())),
        "the reset names this test's process ({}): {cause}",
        std::process::id()
    );
    // The RST reason is the kernel's name, as the reset_sent events carry it.
    let event_reason = records
        .iter()
        .find(|r| r.value["type"] == "reset_sent" && r.value["netns"].as_u64() == Some(server_ns))
        .map(|r| r.value["reason"].clone())
        .context("no reset_sent event in the server namespace")?;
    ensure!(cause["evidence"]["reason"] == event_reason, "{cause}");
    let summary = cause["summary"].as_str().unwrap_or_default();
    ensure!(
        summary.contains(&format!("pid {}", std::process::id())),
        "summary: {summary}"
    );
    Ok(())
}

const FASTOPEN_PORT: u16 = 6083;

/// One TCP Fast Open request from the calling thread's namespace: `sendto(MSG_FASTOPEN)`
/// carries the request in the SYN once the client has the server's cookie; then reads the
/// reply to EOF.
fn fastopen_request(to: SocketAddr) -> Result<()> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = to else {
        bail!("IPv4 only");
    };
    // SAFETY: plain socket(2); the result is checked and owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket that nothing else owns.
    let mut stream = unsafe { TcpStream::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET)?,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let request = b"GET / HTTP/1.0\r\n\r\n";
    // SAFETY: the buffer and the address are valid for their lengths during the call.
    let sent = unsafe {
        libc::sendto(
            stream.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            libc::MSG_FASTOPEN,
            (&raw const addr).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>())?,
        )
    };
    ensure!(
        usize::try_from(sent).ok() == Some(request.len()),
        "sendto(MSG_FASTOPEN): {}",
        std::io::Error::last_os_error()
    );
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    ensure!(reply.starts_with(b"HTTP/1.0 200"), "reply: {reply:?}");
    Ok(())
}

/// Sets TCP_FASTOPEN (the queue of fast-open requests) on a listener.
fn enable_fastopen(listener: &TcpListener) -> Result<()> {
    let qlen: libc::c_int = 16;
    // SAFETY: the pointer and length describe `qlen`; the fd is open for the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&raw const qlen).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>())?,
        )
    };
    ensure!(rc == 0, "TCP_FASTOPEN: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The first incident: a server whose net.ipv4.tcp_fastopen is switched off while clients
/// use fast open. Every client then retransmits the request its SYN carried (the SYN-ACK does
/// not acknowledge it): about 6 retransmits a second, under the peer retransmit rate (20/s),
/// but one per connection. The client's `peer_retransmit_spike` opens on the ratio and names the
/// sysctl change in the server's namespace; the retransmits match the kernel's counters.
#[test]
fn fast_open_switched_off_on_the_server_names_the_sysctl() -> Result<()> {
    const TEST: &str = "fast_open_switched_off_on_the_server_names_the_sysctl";
    let Some(_k) = kernel_test(TEST) else {
        return Ok(());
    };
    const WARM: usize = 5;
    const AFTER: usize = 30;
    let topo = Topology::new(TEST, 123)?;
    let (client_ns, server_ns) = (topo.client.inode()?, topo.server.inode()?);
    topo.server.sysctl("net.ipv4.tcp_fastopen", "3")?;
    topo.client.sysctl("net.ipv4.tcp_fastopen", "1")?;
    let server = SocketAddr::new(topo.server_ip(false), FASTOPEN_PORT);
    let listener = topo.server.run(move || TcpListener::bind(server))??;
    enable_fastopen(&listener)?;
    let acceptor = thread::spawn(move || -> Result<()> {
        for _ in 0..WARM + AFTER {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut request = [0u8; 64];
            let n = stream.read(&mut request)?;
            ensure!(n > 0, "empty request");
            stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nok")?;
        }
        Ok(())
    });
    let obs = LiveObserver::start(&[])?;
    // Warm up: the first request fetches the cookie, the next ones use it.
    for _ in 0..WARM {
        topo.client.run(move || fastopen_request(server))??;
    }
    let warm = topo.client.counters()?;
    ensure!(
        warm.get("TcpExtTCPFastOpenActive")? >= 1,
        "the client never used fast open: {:?}",
        warm.0.get("TcpExtTCPFastOpenActive")
    );
    topo.server.sysctl("net.ipv4.tcp_fastopen", "0")?;
    obs.wait_for_received(
        "the sysctl_change record",
        Duration::from_secs(10),
        |recs| {
            recs.iter()
                .find(|r| {
                    r.value["type"] == "sysctl_change"
                        && r.value["netns"].as_u64() == Some(server_ns)
                        && r.value["name"] == "net.ipv4.tcp_fastopen"
                })
                .map(|_| ())
        },
    )?;
    let start = Instant::now();
    for i in 0..AFTER {
        topo.client.run(move || fastopen_request(server))??;
        let next = start + Duration::from_millis(166) * u32::try_from(i + 1)?;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    match acceptor.join() {
        Ok(r) => r?,
        Err(_) => bail!("acceptor panicked"),
    }
    let after = topo.client.counters()?;
    let peer = topo.server_ip(false);
    let found = obs.wait_for_received(
        "peer_retransmit_spike on the client caused by the sysctl change",
        Duration::from_secs(15),
        |recs| {
            explained(
                recs,
                "peer_retransmit_spike",
                client_ns,
                peer,
                "sysctl_change",
            )
            .cloned()
        },
    );
    let records = obs.stop_received()?;
    let found = found.with_context(|| describe_anomalies(&records))?;
    let retrans = warm.delta(&after, "TcpRetransSegs")?;
    let failed = warm
        .delta(&after, "TcpExtTCPFastOpenActiveFail")
        .unwrap_or(0);
    let v = &found.value;
    note(&format!(
        "{TEST}: client TcpRetransSegs +{retrans}, TCPFastOpenActiveFail +{failed}; {v}"
    ));
    ensure!(
        retrans >= AFTER as u64 / 2,
        "ground truth: only {retrans} retransmits for {AFTER} connections"
    );
    let cause = &v["cause"];
    ensure!(
        cause["evidence"]["name"] == "net.ipv4.tcp_fastopen",
        "{cause}"
    );
    ensure!(
        cause["evidence"]["old"] == "3" && cause["evidence"]["new"] == "0",
        "{cause}"
    );
    ensure!(
        cause["evidence"]["netns"].as_u64() == Some(server_ns),
        "{cause}"
    );
    let opened = records
        .iter()
        .find(|r| {
            r.value["type"] == "anomaly_open"
                && r.value["kind"] == "peer_retransmit_spike"
                && r.value["key"]["netns"].as_u64() == Some(client_ns)
        })
        .context("no peer_retransmit_spike opened")?;
    ensure!(
        opened.value["opened_by"] == "ratio",
        "opened by {}",
        opened.value["opened_by"]
    );
    // The engine's count of the peer's retransmitted segments is the kernel's.
    let last = records
        .iter()
        .rev()
        .find(|r| {
            is_anomaly(&r.value)
                && r.value["kind"] == "peer_retransmit_spike"
                && r.value["key"]["netns"].as_u64() == Some(client_ns)
        })
        .context("no final record")?;
    ensure!(
        last.value["lifetime_count"].as_u64() == Some(retrans),
        "lifetime_count {} != TcpRetransSegs +{retrans}",
        last.value["lifetime_count"]
    );
    Ok(())
}
