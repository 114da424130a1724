//! Drops (named with the running kernel's reasons) and resets, against ground truth: the server
//! namespace's `TcpOutRsts`, the client namespace's `TcpAttemptFails` / `TcpExtTCPSynRetrans`,
//! the packet counters of the iptables rules that drop, and the outcome every connect had in the
//! test itself. Every comparison is exact, and the ground truth must be non-zero.
//!
//! Subnets: 10.200.60-69.0/24 and fd00:200:3c-45::/64 (the harness writes the subnet number in
//! hex there). Ports: 5060 closed (refused), 5061
//! filtered (SYNs dropped by iptables). Client source ports are bound explicitly, so every flow
//! the observer reports can be matched to one connect of the test.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use observer_tests::support::{
    KINDS, Outcome, check_run, connect_here, connect_parallel, connect_sequential, ifindex,
    one_each, rule_packets, u64_of,
};
use observer_tests::{
    ALL_EVENT_TYPES, Filter, Observer, Run, Topology, describe, kernel_test, note, observer_bin,
    poll_until, run_with_timeout,
};
use serde_json::Value;

/// Exact per-event comparisons: every event exported, close events too.
const ARGS: [&str; 6] = [
    "--export-per-flow",
    "0",
    "--export-per-cpu",
    "0",
    "--export-kinds",
    "all",
];
const REFUSED_PORT: u16 = 5060;
const FILTERED_PORT: u16 = 5061;
/// The server end of the veth pair (harness topology).
const SERVER_DEV: &str = "veth1";

/// A storm of connects to a closed port and the kernel's own account of it.
#[derive(Debug)]
struct Storm {
    /// Client source ports, one refused connect each.
    ports: Vec<u16>,
    /// Server namespace `TcpOutRsts` delta.
    server_rsts: u64,
    /// Server namespace `TcpInSegs` delta.
    server_in_segs: u64,
    /// Client namespace `TcpAttemptFails` delta.
    client_attempt_fails: u64,
    /// Client namespace `TcpExtTCPSynRetrans` delta (must be 0: one SYN per connect).
    client_syn_retrans: u64,
}

/// `n` connects in a row from the client (source ports `first_port..`) to `port` on the server,
/// where nothing listens. Every connect must be refused.
fn refused_storm(topo: &Topology, v6: bool, port: u16, first_port: u16, n: u16) -> Result<Storm> {
    let to = SocketAddr::new(topo.server_ip(v6), port);
    let locals: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::new(topo.client_ip(v6), first_port + i))
        .collect();
    let (cb, sb) = (topo.client.counters()?, topo.server.counters()?);
    let attempts = connect_sequential(
        &topo.client,
        &locals,
        to,
        Duration::from_secs(2),
        Duration::from_secs(15),
    )?;
    let (ca, sa) = (topo.client.counters()?, topo.server.counters()?);
    for a in &attempts {
        ensure!(
            matches!(a.outcome, Outcome::Refused),
            "connect {} -> {to}: expected refused, got {:?}",
            a.local,
            a.outcome
        );
    }
    let storm = Storm {
        ports: locals.iter().map(SocketAddr::port).collect(),
        server_rsts: sb.delta(&sa, "TcpOutRsts")?,
        server_in_segs: sb.delta(&sa, "TcpInSegs")?,
        client_attempt_fails: cb.delta(&ca, "TcpAttemptFails")?,
        client_syn_retrans: cb.delta(&ca, "TcpExtTCPSynRetrans")?,
    };
    // The fault really happened, once per connect.
    ensure!(
        storm.server_rsts > 0,
        "the server sent no RST: the fault did not happen: {storm:?}"
    );
    ensure!(
        storm.client_syn_retrans == 0,
        "SYNs were retransmitted during the storm: {storm:?}"
    );
    Ok(storm)
}

/// The four filters of a test's flows: the server's and the client's view.
struct Sides {
    server: Filter,
    client: Filter,
}

fn sides(topo: &Topology, v6: bool, port: u16) -> Result<Sides> {
    Ok(Sides {
        server: Filter {
            saddr: Some(topo.server_ip(v6)),
            sport: Some(port),
            daddr: Some(topo.client_ip(v6)),
            netns: Some(topo.server.inode()?),
            ..Filter::default()
        },
        client: Filter {
            saddr: Some(topo.client_ip(v6)),
            daddr: Some(topo.server_ip(v6)),
            dport: Some(port),
            netns: Some(topo.client.inode()?),
            ..Filter::default()
        },
    })
}

/// Every event of the test's two namespaces belongs to one of the test's flows: `flows` are
/// (server port, client ports).
fn no_stray_events(run: &Run, topo: &Topology, v6: bool, flows: &[(u16, &[u16])]) -> Result<()> {
    let (server_ns, client_ns) = (topo.server.inode()?, topo.client.inode()?);
    let mine = |e: &Value, server_side: bool| {
        flows.iter().any(|&(port, ports)| {
            let s = sides(topo, v6, port).expect("inodes were read above");
            let (filter, peer) = if server_side {
                (s.server, "dport")
            } else {
                (s.client, "sport")
            };
            filter.matches(e) && ports.iter().any(|&p| e[peer] == p)
        })
    };
    for (what, netns, server_side) in [("server", server_ns, true), ("client", client_ns, false)] {
        let in_ns = Filter {
            netns: Some(netns),
            ..Filter::default()
        };
        for ty in ALL_EVENT_TYPES {
            for e in run.events(ty, &in_ns) {
                ensure!(
                    mine(e, server_side),
                    "stray {ty} event in the {what} namespace (not one of the test's flows): {e}"
                );
            }
        }
    }
    Ok(())
}

/// The `code` of `reason` in `stop.drop_reasons`, if listed.
fn stop_reason_code(run: &Run, reason: &str) -> Result<Option<u64>> {
    Ok(run.stop()?["drop_reasons"]
        .as_array()
        .context("stop.drop_reasons is not an array")?
        .iter()
        .find(|r| r["reason"] == reason)
        .and_then(|r| r["code"].as_u64()))
}

/// Checks a run against a refused storm. `no_socket_reported`: whether the observer was told to
/// report NO_SOCKET drops.
fn check_refused(
    test: &str,
    run: &Run,
    topo: &Topology,
    v6: bool,
    storm: &Storm,
    no_socket_reported: bool,
) -> Result<()> {
    let family = if v6 { "ipv6" } else { "ipv4" };
    let n = storm.ports.len() as u64;
    let s = sides(topo, v6, REFUSED_PORT)?;
    let server_if = ifindex(&topo.server, SERVER_DEV)?;

    // Server: one RST per refused SYN (TcpOutRsts), each a reset_sent event from the server.
    let resets = run.events("reset_sent", &s.server);
    let drops: Vec<&Value> = run
        .events("drop", &s.server)
        .into_iter()
        .filter(|e| e["reason"] == "NO_SOCKET")
        .collect();
    let server_flows = run.flows(&s.server)?;
    let flow_sum = |flows: &[&Value], k: &str| -> u64 {
        flows.iter().map(|f| f[k].as_u64().unwrap_or(0)).sum()
    };
    // Client: one RST received and one refused connect per connect.
    let received = run.events("reset_received", &s.client);
    let failed = run.events("connect_failed", &s.client);
    let client_flows = run.flows(&s.client)?;
    note(&format!(
        "{test}: ground truth: {n} refused connects, server TcpOutRsts +{}, TcpInSegs +{}, \
         client TcpAttemptFails +{}; observer: {} reset_sent, {} NO_SOCKET drops (locations {:?}), \
         {} reset_received, {} connect_failed; stop.flows resets_sent {}, drops {}, \
         resets_received {}, connects_refused {}",
        storm.server_rsts,
        storm.server_in_segs,
        storm.client_attempt_fails,
        resets.len(),
        drops.len(),
        drops
            .iter()
            .filter_map(|e| e["location"].as_str())
            .collect::<BTreeSet<_>>(),
        received.len(),
        failed.len(),
        flow_sum(&server_flows, "resets_sent"),
        flow_sum(&server_flows, "drops"),
        flow_sum(&client_flows, "resets_received"),
        flow_sum(&client_flows, "connects_refused"),
    ));
    ensure!(
        storm.server_rsts == n && storm.client_attempt_fails == n,
        "ground truth does not match the {n} refused connects: {storm:?}"
    );

    ensure!(
        resets.len() as u64 == storm.server_rsts,
        "{} reset_sent events from the server != server TcpOutRsts delta {}\n{}",
        resets.len(),
        storm.server_rsts,
        describe(run)
    );
    one_each(&resets, "dport", &storm.ports, "reset_sent")?;
    for e in &resets {
        ensure!(e["reason"] == "NO_SOCKET", "reset_sent reason: {e}");
        ensure!(e["family"] == family, "family: expected {family}: {e}");
    }
    ensure!(
        flow_sum(&server_flows, "resets_sent") == storm.server_rsts,
        "stop.flows resets_sent sum {} != server TcpOutRsts delta {}",
        flow_sum(&server_flows, "resets_sent"),
        storm.server_rsts
    );

    if no_socket_reported {
        // No kernel counter counts no-socket drops: each refused SYN is one (and caused one RST).
        ensure!(
            drops.len() as u64 == n,
            "{} NO_SOCKET drop events on the server != {n} refused SYNs\n{}",
            drops.len(),
            describe(run)
        );
        one_each(&drops, "dport", &storm.ports, "NO_SOCKET drop")?;
        let code = stop_reason_code(run, "NO_SOCKET")?;
        let rcv = if v6 { "tcp_v6_rcv" } else { "tcp_v4_rcv" };
        for e in &drops {
            ensure!(e["family"] == family, "family: expected {family}: {e}");
            ensure!(e["direction"] == "inbound", "direction: {e}");
            ensure!(e["tcp_flags"] == "SYN", "tcp_flags: expected SYN: {e}");
            ensure!(
                e["ifindex"].as_u64() == Some(server_if),
                "ifindex: expected {server_if} ({SERVER_DEV}): {e}"
            );
            ensure!(
                e["location"].as_str().is_some_and(|l| l.starts_with(rcv)),
                "location: expected {rcv}+0x..: {e}"
            );
            ensure!(
                code.is_some() && e["reason_code"].as_u64() == code,
                "reason_code {} != stop.drop_reasons code {code:?} of NO_SOCKET",
                e["reason_code"]
            );
        }
        ensure!(
            flow_sum(&server_flows, "drops") == n,
            "stop.flows drops sum {} != {n} refused SYNs",
            flow_sum(&server_flows, "drops")
        );
    } else {
        ensure!(
            drops.is_empty(),
            "NO_SOCKET drops reported though not selected: {drops:?}"
        );
        ensure!(
            flow_sum(&server_flows, "drops") == 0,
            "stop.flows counts drops of an unselected reason: {server_flows:?}"
        );
    }
    // The RSTs answer SYNs that have no socket: counted per handshake key (server address and
    // port, client address; the client's ephemeral port left out), one row for the whole storm.
    ensure!(
        server_flows.len() == 1,
        "expected one (handshake) server row in stop.flows, got {}: {server_flows:?}",
        server_flows.len()
    );
    for f in &server_flows {
        ensure!(
            f["key"] == "handshake"
                && f["dport"] == 0
                && f["sport"] == REFUSED_PORT
                && f["resets_sent"].as_u64() == Some(n)
                && f["family"] == family,
            "server row: expected the handshake key with {n} resets sent: {f}"
        );
    }

    ensure!(
        received.len() as u64 == n,
        "{} reset_received events on the client != {n} refused connects\n{}",
        received.len(),
        describe(run)
    );
    one_each(&received, "sport", &storm.ports, "reset_received")?;
    let refused: Vec<&Value> = failed
        .iter()
        .copied()
        .filter(|e| e["outcome"] == "refused")
        .collect();
    ensure!(
        refused.len() as u64 == n && failed.len() == refused.len(),
        "connect_failed: {} refused, {} in all, expected {n} refused (= client TcpAttemptFails \
         delta {})\n{}",
        refused.len(),
        failed.len(),
        storm.client_attempt_fails,
        describe(run)
    );
    one_each(&refused, "sport", &storm.ports, "connect_failed")?;
    for e in &refused {
        ensure!(
            e["syn_retransmits"] == 0,
            "syn_retransmits: expected 0: {e}"
        );
        ensure!(
            e["duration_ms"]
                .as_f64()
                .is_some_and(|d| (0.0..1000.0).contains(&d)),
            "duration_ms of a refused connect: {e}"
        );
        ensure!(e["family"] == family, "family: expected {family}: {e}");
    }
    let connected = run.events("connect", &s.client);
    ensure!(
        connected.is_empty(),
        "connect events for refused connects: {connected:?}"
    );
    // Failed handshakes again: one row without the client's ephemeral port.
    ensure!(
        client_flows.len() == 1,
        "expected one (handshake) client row in stop.flows, got {}: {client_flows:?}",
        client_flows.len()
    );
    for f in &client_flows {
        ensure!(
            f["key"] == "handshake" && f["sport"] == 0 && f["dport"] == REFUSED_PORT,
            "client row: expected the handshake key: {f}"
        );
        for (k, want) in [
            ("resets_received", n),
            ("connects_refused", n),
            ("connects", 0),
            ("connects_timed_out", 0),
            ("syn_retransmits", 0),
            ("drops", 0),
        ] {
            ensure!(f[k] == want, "client flow: {k} expected {want}: {f}");
        }
    }
    Ok(())
}

/// Connects through a rule that drops every SYN to `port` and the rule's own count.
#[derive(Debug)]
struct Filtered {
    ports: Vec<u16>,
    /// Packet counter of the server's DROP rule.
    rule_packets: u64,
    /// Client namespace `TcpExtTCPSynRetrans` delta.
    client_syn_retrans: u64,
}

/// Server: `iptables -A INPUT -p tcp --dport PORT --syn -j DROP`; `n` parallel connects from
/// `first_port..`, each given `timeout`: all must time out.
fn filtered_connects(
    topo: &Topology,
    v6: bool,
    port: u16,
    first_port: u16,
    n: u16,
    timeout: Duration,
) -> Result<Filtered> {
    let port_s = port.to_string();
    topo.server.iptables(
        v6,
        &[
            "-w", "5", "-A", "INPUT", "-p", "tcp", "--dport", &port_s, "--syn", "-j", "DROP",
        ],
    )?;
    let to = SocketAddr::new(topo.server_ip(v6), port);
    let locals: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::new(topo.client_ip(v6), first_port + i))
        .collect();
    let before = topo.client.counters()?;
    let pairs: Vec<_> = locals.iter().map(|&l| (l, to)).collect();
    let attempts = connect_parallel(&topo.client, &pairs, timeout)?;
    let after = topo.client.counters()?;
    for a in &attempts {
        ensure!(
            matches!(a.outcome, Outcome::TimedOut) && a.elapsed >= timeout,
            "connect {} -> {to}: expected a timeout after {timeout:?}, got {:?} after {:?}",
            a.local,
            a.outcome,
            a.elapsed
        );
    }
    let out = Filtered {
        ports: locals.iter().map(SocketAddr::port).collect(),
        rule_packets: rule_packets(&topo.server, v6, "INPUT", &format!("dpt:{port}"))?,
        client_syn_retrans: before.delta(&after, "TcpExtTCPSynRetrans")?,
    };
    ensure!(
        out.rule_packets > 0,
        "the DROP rule matched nothing: the fault did not happen: {out:?}"
    );
    Ok(out)
}

fn check_filtered(test: &str, run: &Run, topo: &Topology, v6: bool, out: &Filtered) -> Result<()> {
    let family = if v6 { "ipv6" } else { "ipv4" };
    let s = sides(topo, v6, FILTERED_PORT)?;
    let server_if = ifindex(&topo.server, SERVER_DEV)?;
    let all = run.events("drop", &s.server);
    let drops: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|e| e["reason"] == "NETFILTER_DROP")
        .collect();
    let flows = run.flows(&s.server)?;
    let flow_drops: u64 = flows.iter().map(|f| f["drops"].as_u64().unwrap_or(0)).sum();
    let locations: BTreeSet<&str> = drops
        .iter()
        .filter_map(|e| e["location"].as_str())
        .collect();
    let syn_retrans = run.events("syn_retransmit", &s.client);
    note(&format!(
        "{test}: ground truth: DROP rule packets {}, client TcpExtTCPSynRetrans +{}; observer: \
         {} NETFILTER_DROP drop events (locations {locations:?}, {} drop events in all), \
         stop.flows drops {flow_drops}, {} syn_retransmit events",
        out.rule_packets,
        out.client_syn_retrans,
        drops.len(),
        all.len(),
        syn_retrans.len()
    ));
    ensure!(
        drops.len() == all.len(),
        "drops of other reasons on the filtered flows: {all:?}"
    );
    ensure!(
        drops.len() as u64 == out.rule_packets,
        "{} NETFILTER_DROP drop events != the DROP rule's packet counter {}\n{}",
        drops.len(),
        out.rule_packets,
        describe(run)
    );
    ensure!(
        flow_drops == out.rule_packets,
        "stop.flows drops sum {flow_drops} != the DROP rule's packet counter {}: {flows:?}",
        out.rule_packets
    );
    let code = stop_reason_code(run, "NETFILTER_DROP")?;
    let ports: BTreeSet<u64> = out.ports.iter().map(|&p| u64::from(p)).collect();
    for e in &drops {
        ensure!(e["family"] == family, "family: expected {family}: {e}");
        ensure!(
            e["direction"] == "inbound",
            "direction: expected inbound: {e}"
        );
        ensure!(e["tcp_flags"] == "SYN", "tcp_flags: expected SYN: {e}");
        ensure!(
            e["ifindex"].as_u64() == Some(server_if),
            "ifindex: expected {server_if} ({SERVER_DEV} in {}): {e}",
            topo.server.name
        );
        ensure!(
            e["location"].as_str().is_some_and(|l| l.contains("nf")),
            "location: expected a netfilter function (nf*/nft*): {e}"
        );
        ensure!(
            e["dport"].as_u64().is_some_and(|p| ports.contains(&p)),
            "dport not one of the client ports {ports:?}: {e}"
        );
        ensure!(
            code.is_some() && e["reason_code"].as_u64() == code,
            "reason_code {} != stop.drop_reasons code {code:?} of NETFILTER_DROP",
            e["reason_code"]
        );
    }
    // Per connection: the first SYN and each retransmit were dropped.
    ensure!(
        syn_retrans.len() as u64 == out.client_syn_retrans,
        "{} syn_retransmit events != client TcpExtTCPSynRetrans delta {}",
        syn_retrans.len(),
        out.client_syn_retrans
    );
    for &p in &out.ports {
        let dropped = drops.iter().filter(|e| e["dport"] == p).count();
        let retrans = syn_retrans.iter().filter(|e| e["sport"] == p).count();
        ensure!(
            dropped == retrans + 1,
            "client port {p}: {dropped} SYNs dropped, but {retrans} SYN retransmits (+1 first SYN)"
        );
    }
    let timeouts: Vec<&Value> = run
        .events("connect_failed", &s.client)
        .into_iter()
        .filter(|e| e["outcome"] == "timeout")
        .collect();
    one_each(&timeouts, "sport", &out.ports, "connect_failed timeout")
}

/// The storm on raw tracepoints (`--attach auto` on this kernel); the classic programs, the
/// default, run it in `refused_storm_on_classic_tracepoints_matches_counters`.
fn refused_storm_test(test: &str, subnet: u8, v6: bool, n: u16) -> Result<()> {
    refused_storm_attached(test, subnet, v6, n, "auto")
}

/// The refused storm with `--attach mode`; every program must be of the kind the mode names
/// (`auto` means raw on this kernel, whose BTF names every tracepoint's arguments).
fn refused_storm_attached(test: &str, subnet: u8, v6: bool, n: u16, mode: &str) -> Result<()> {
    let topo = Topology::new(test, subnet)?;
    let mut args = ARGS.to_vec();
    args.extend(["--attach", mode]);
    let mut observer = Observer::start(&args)?;
    let storm = refused_storm(&topo, v6, REFUSED_PORT, 41000, n)?;
    let run = observer.stop()?;
    run.ensure_programs_are(if mode == "classic" {
        "tracepoint"
    } else {
        "raw_tracepoint"
    })?;
    check_run(&run, &event_filter(&topo, v6)?)?;
    check_refused(test, &run, &topo, v6, &storm, true)?;
    no_stray_events(&run, &topo, v6, &[(REFUSED_PORT, &storm.ports)])
}

fn netfilter_test(test: &str, subnet: u8, v6: bool) -> Result<()> {
    let topo = Topology::new(test, subnet)?;
    let mut observer = Observer::start(&ARGS)?;
    // 1.5 s: the first SYN and one retransmit (at 1 s) are dropped per connect.
    let out = filtered_connects(
        &topo,
        v6,
        FILTERED_PORT,
        42000,
        3,
        Duration::from_millis(1500),
    )?;
    let run = observer.stop()?;
    check_run(&run, &event_filter(&topo, v6)?)?;
    check_filtered(test, &run, &topo, v6, &out)?;
    no_stray_events(&run, &topo, v6, &[(FILTERED_PORT, &out.ports)])
}

/// Events of either of the test's namespaces (for the schema checks).
fn event_filter(topo: &Topology, v6: bool) -> Result<Vec<Filter>> {
    let s = sides(topo, v6, 0)?;
    Ok(vec![
        Filter {
            netns: s.server.netns,
            ..Filter::default()
        },
        Filter {
            netns: s.client.netns,
            ..Filter::default()
        },
    ])
}

#[test]
fn refused_storm_ipv4_resets_and_no_socket_drops_match_counters() -> Result<()> {
    let Some(t) = kernel_test("refused_storm_ipv4") else {
        return Ok(());
    };
    refused_storm_test(&t.name, 60, false, 200)
}

/// The classic tracepoint programs (the default) count the same storm exactly too.
#[test]
fn refused_storm_on_classic_tracepoints_matches_counters() -> Result<()> {
    let Some(t) = kernel_test("refused_storm_classic") else {
        return Ok(());
    };
    refused_storm_attached(&t.name, 66, false, 100, "classic")
}

#[test]
fn netfilter_drops_ipv4_match_rule_counter() -> Result<()> {
    let Some(t) = kernel_test("netfilter_drops_ipv4") else {
        return Ok(());
    };
    netfilter_test(&t.name, 61, false)
}

#[test]
fn refused_storm_ipv6_resets_and_no_socket_drops_match_counters() -> Result<()> {
    let Some(t) = kernel_test("refused_storm_ipv6") else {
        return Ok(());
    };
    refused_storm_test(&t.name, 62, true, 50)
}

#[test]
fn netfilter_drops_ipv6_match_rule_counter() -> Result<()> {
    let Some(t) = kernel_test("netfilter_drops_ipv6") else {
        return Ok(());
    };
    netfilter_test(&t.name, 63, true)
}

/// `--drop-reasons NETFILTER_DROP`: NO_SOCKET drops of a refused storm are not reported (resets
/// still are), netfilter drops are, exactly.
#[test]
fn drop_reasons_option_selects_reported_reasons() -> Result<()> {
    let Some(t) = kernel_test("drop_reasons_selection") else {
        return Ok(());
    };
    let topo = Topology::new(&t.name, 64)?;
    let mut args = ARGS.to_vec();
    args.extend(["--drop-reasons", "NETFILTER_DROP"]);
    let mut observer = Observer::start(&args)?;
    let storm = refused_storm(&topo, false, REFUSED_PORT, 41000, 50)?;
    let out = filtered_connects(
        &topo,
        false,
        FILTERED_PORT,
        42000,
        1,
        Duration::from_millis(1500),
    )?;
    let run = observer.stop()?;
    check_run(&run, &event_filter(&topo, false)?)?;
    let selected = &run.start()["drop_reasons"];
    note(&format!("{}: start.drop_reasons {selected}", t.name));
    ensure!(
        *selected == serde_json::json!(["NETFILTER_DROP"]),
        "start.drop_reasons: expected [\"NETFILTER_DROP\"], got {selected}"
    );
    // Nowhere (any namespace) a drop of another reason.
    let other: Vec<&Value> = run
        .events("drop", &Filter::default())
        .into_iter()
        .filter(|e| e["reason"] != "NETFILTER_DROP")
        .collect();
    ensure!(
        other.is_empty(),
        "drops of unselected reasons reported: {other:?}"
    );
    let stop_reasons: Vec<&Value> = run.stop()?["drop_reasons"]
        .as_array()
        .context("stop.drop_reasons")?
        .iter()
        .filter(|r| r["reason"] != "NETFILTER_DROP")
        .collect();
    ensure!(
        stop_reasons.is_empty(),
        "stop.drop_reasons lists unselected reasons: {stop_reasons:?}"
    );
    check_refused(&t.name, &run, &topo, false, &storm, false)?;
    check_filtered(&t.name, &run, &topo, false, &out)?;
    no_stray_events(
        &run,
        &topo,
        false,
        &[(REFUSED_PORT, &storm.ports), (FILTERED_PORT, &out.ports)],
    )
}

/// An unknown reason name: exit non-zero, before any record, with a message naming it.
#[test]
fn unknown_drop_reason_is_rejected_by_name() -> Result<()> {
    let Some(_t) = kernel_test("unknown_drop_reason") else {
        return Ok(());
    };
    let bin = observer_bin();
    ensure!(bin.exists(), "{} does not exist", bin.display());
    for (spec, bad) in [
        ("NO_SUCH_REASON", "NO_SUCH_REASON"),
        ("NETFILTER_DROP,-BOGUS_DROP_REASON", "BOGUS_DROP_REASON"),
    ] {
        let (status, stdout, stderr) = run_with_timeout(
            Command::new(&bin)
                .args(["run", "--duration", "2", "--drop-reasons", spec])
                .env_remove("RUST_BACKTRACE"),
            Duration::from_secs(30),
        )?;
        note(&format!(
            "--drop-reasons {spec}: {status}; stderr: {stderr:?}"
        ));
        ensure!(
            !status.success() && status.code().is_some(),
            "--drop-reasons {spec}: expected a non-zero exit, got {status}; stdout: {stdout}"
        );
        ensure!(
            stderr.contains(bad),
            "--drop-reasons {spec}: stderr does not name `{bad}`: {stderr:?}"
        );
        let lower = stderr.to_lowercase();
        ensure!(
            !lower.contains("panicked") && !lower.contains("backtrace"),
            "--drop-reasons {spec}: stderr looks like a panic: {stderr:?}"
        );
        ensure!(
            stdout.trim().is_empty(),
            "--drop-reasons {spec}: nothing should be written to stdout, got {stdout:?}"
        );
    }
    Ok(())
}

/// `exported = received + lost + undelivered + decode_errors` (docs/schema.md) must hold when
/// events keep coming while the observer stops: a refused storm runs across the SIGINT.
#[test]
fn stop_accounts_for_events_exported_while_stopping() -> Result<()> {
    let Some(t) = kernel_test("stop_during_storm") else {
        return Ok(());
    };
    let topo = Topology::new(&t.name, 65)?;
    let mut observer = Observer::start(&ARGS)?;
    let done = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    let to = SocketAddr::new(topo.server_ip(false), REFUSED_PORT);
    let local = SocketAddr::new(topo.client_ip(false), 0);
    let (run, at_sigint, at_stop) = thread::scope(|s| -> Result<(Run, u64, u64)> {
        let storm = s.spawn(|| {
            topo.client.run(|| -> Result<()> {
                let deadline = Instant::now() + Duration::from_secs(20);
                for _ in 0..300_000 {
                    if done.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    let a = connect_here(local, to, Duration::from_secs(1))?;
                    ensure!(
                        matches!(a.outcome, Outcome::Refused),
                        "storm connect: expected refused, got {:?}",
                        a.outcome
                    );
                    count.fetch_add(1, Ordering::Relaxed);
                    // Paced (about 1000 connects/s): enough to have events in flight at any
                    // moment, without flooding observers of tests running at the same time.
                    thread::sleep(Duration::from_millis(1));
                }
                Ok(())
            })
        });
        // A running storm first, then SIGINT while it goes on.
        let started = poll_until(
            "500 refused connects",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || Ok((count.load(Ordering::Relaxed) >= 500).then_some(())),
        );
        let at_sigint = count.load(Ordering::Relaxed);
        let run = started.and_then(|()| observer.stop());
        let at_stop = count.load(Ordering::Relaxed);
        done.store(true, Ordering::Relaxed);
        storm
            .join()
            .map_err(|_| anyhow::anyhow!("storm thread panicked"))???;
        Ok((run?, at_sigint, at_stop))
    })?;
    let stop = run.stop()?;
    let mut exported = 0;
    let mut received = 0;
    let mut breakdown = Vec::new();
    for (kind, types) in KINDS {
        let tot = &stop["totals"][kind];
        let (e, r) = (u64_of(tot, "exported")?, u64_of(tot, "received")?);
        let written = run
            .records
            .iter()
            .filter(|v| v["type"].as_str().is_some_and(|ty| types.contains(&ty)))
            .count() as u64;
        ensure!(
            r == written,
            "stop.totals.{kind}.received {r} but {written} records written"
        );
        exported += e;
        received += r;
        if e != r {
            breakdown.push(format!("{kind}: exported {e}, received {r}"));
        }
    }
    let (lost, undelivered, decode_errors) = (
        u64_of(stop, "lost")?,
        u64_of(stop, "undelivered")?,
        u64_of(stop, "decode_errors")?,
    );
    note(&format!(
        "{}: {at_sigint} refused connects before SIGINT, {at_stop} when the stop record was \
         in; exported {exported}, received {received}, lost {lost}, undelivered {undelivered}, \
         decode_errors {decode_errors}; {}",
        t.name,
        breakdown.join("; ")
    ));
    ensure!(
        at_stop > at_sigint,
        "the storm did not run across the stop ({at_sigint} -> {at_stop} connects)"
    );
    ensure!(
        exported == received + lost + undelivered + decode_errors,
        "stop.totals: exported {exported} != received {received} + lost {lost} + undelivered \
         {undelivered} + decode_errors {decode_errors}: {} events exported by the kernel are \
         neither written nor reported lost ({})",
        exported.saturating_sub(received + lost + undelivered + decode_errors),
        breakdown.join("; ")
    );
    Ok(())
}
