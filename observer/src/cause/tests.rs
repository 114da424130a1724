//! The explainer on synthetic evidence, with anomalies from a real engine.
use std::{collections::BTreeMap, net::IpAddr};

use super::*;
use crate::{
    aggregate::{
        AnomalyKind, AnomalySnapshot, Engine, EngineConfig, ListenerKey, Observation, Phase,
        Signal, Thresholds,
    },
    context::{AsymmetricRouteRecord, ContextRecord, StaleConnectionsRecord},
    decode::{Family, Flow},
    enrich::{
        routes::{ArrivalSource, AsymmetricRoute},
        stale::StaleGroup,
    },
    record::{
        EventRecord, ListenerDropsRecord, NetfilterDropRecord, RuleRecord, SysctlChangeRecord,
    },
};

const SEC: u64 = 1_000_000_000;
const T0: u64 = 10_000 * SEC;
const CLIENT_NS: u32 = 4026532001;
const SERVER_NS: u32 = 4026532002;

fn client() -> IpAddr {
    IpAddr::from([10, 9, 0, 1])
}

fn server() -> IpAddr {
    IpAddr::from([10, 9, 0, 2])
}

/// A client's flow to the server's port 8080, as the client's namespace sees it.
fn client_flow(sport: u16) -> Flow {
    Flow {
        family: Family::Ipv4,
        saddr: client(),
        sport,
        daddr: server(),
        dport: 8080,
        netns: CLIENT_NS,
    }
}

struct Around {
    sysctls: BTreeMap<String, String>,
    /// What the namespaces' readings say of local addresses.
    addresses: Vec<(IpAddr, u32)>,
}

impl Surroundings for Around {
    fn netns_name(&self, netns: u32) -> Option<String> {
        (netns == SERVER_NS).then(|| "srv".to_owned())
    }
    fn sysctl(&self, _netns: u32, name: &str) -> Option<String> {
        self.sysctls.get(name).cloned()
    }
    fn counters_60s(&self, _netns: u32) -> BTreeMap<String, u64> {
        BTreeMap::from([("TcpExtPAWSEstab".to_owned(), 7)])
    }
    fn rates_around(&self, signals: &[Signal], _at_ns: u64) -> BTreeMap<&'static str, BeforeAfter> {
        signals
            .iter()
            .map(|s| {
                (
                    s.name(),
                    BeforeAfter {
                        before_per_min: Some(24.0),
                        after_per_min: Some(393.0),
                        before_covered_secs: 60,
                        after_covered_secs: 60,
                    },
                )
            })
            .collect()
    }
    fn process_name(&self, pid: u32) -> Option<String> {
        (pid == 4242).then(|| "server.py".to_owned())
    }
    fn netns_of_address(&self, addr: IpAddr) -> Option<u32> {
        self.addresses
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, netns)| *netns)
    }
}

fn around() -> Around {
    Around {
        sysctls: BTreeMap::from([
            ("net.core.somaxconn".to_owned(), "4096".to_owned()),
            ("net.ipv4.tcp_max_syn_backlog".to_owned(), "8".to_owned()),
            ("net.ipv4.tcp_syncookies".to_owned(), "0".to_owned()),
        ]),
        addresses: Vec::new(),
    }
}

/// An event record with nothing but its kind, flow, and what `with` sets.
fn record(kind: &'static str, flow: Flow, with: impl FnOnce(&mut EventRecord)) -> EventRecord {
    let mut r = EventRecord {
        kind,
        time: String::new(),
        family: flow.family,
        saddr: flow.saddr,
        sport: flow.sport,
        daddr: flow.daddr,
        dport: flow.dport,
        state: "ESTABLISHED",
        segs: 1,
        flow_count: 1,
        counted_as: None,
        netns: flow.netns,
        err: 0,
        pid: 0,
        reason: None,
        reason_code: None,
        location: None,
        ifindex: None,
        tcp_flags: None,
        direction: None,
        outcome: None,
        duration_ms: None,
        syn_retransmits: None,
        handshake_rtt_us: None,
        from_state: None,
        active: None,
        owner: None,
    };
    with(&mut r);
    r
}

/// The server's side of a client flow (drops and resets there are oriented as its sockets).
fn server_side(flow: Flow) -> Flow {
    Flow {
        family: flow.family,
        saddr: flow.daddr,
        sport: flow.dport,
        daddr: flow.saddr,
        dport: flow.sport,
        netns: SERVER_NS,
    }
}

/// The anomaly of `kind` an engine opens after `signal` on the client's flows for 3 s.
fn anomaly(kind: AnomalyKind, signal: Signal, per_sec: u64) -> AnomalySnapshot {
    anomaly_on(kind, signal, per_sec, client_flow)
}

/// [`anomaly`] on the flows `flow` makes of a local port.
fn anomaly_on(
    kind: AnomalyKind,
    signal: Signal,
    per_sec: u64,
    flow: fn(u16) -> Flow,
) -> AnomalySnapshot {
    let mut engine = match Engine::new(
        EngineConfig {
            thresholds: Thresholds::default(),
            ..EngineConfig::default()
        },
        T0,
    ) {
        Ok(engine) => engine,
        Err(e) => panic!("{e}"),
    };
    let mut opened = None;
    for sec in 0..12u64 {
        for i in 0..per_sec {
            let obs = Observation::new(signal, 1).with_flow(flow(40000 + (i % 4) as u16));
            let obs = if signal == Signal::ListenOverflow {
                Observation::new(signal, 1).with_listener(ListenerKey {
                    netns: SERVER_NS,
                    addr: server(),
                    port: 8080,
                })
            } else {
                obs
            };
            engine.observe(T0 + sec * SEC + i * 1_000_000, obs);
        }
        for e in engine.tick(T0 + (sec + 1) * SEC) {
            if e.phase == Phase::Open && e.anomaly.kind == kind {
                opened = Some(e.anomaly);
            }
        }
        if opened.is_some() {
            break;
        }
    }
    opened.unwrap_or_else(|| panic!("no {kind:?} opened"))
}

fn drop_rule_evidence(evidence: &mut Evidence, syns: u64) {
    for i in 0..syns {
        let flow = server_side(client_flow(40000 + (i % 4) as u16));
        evidence.note_event(
            T0 + i * 1_000_000,
            &record("drop", flow, |r| {
                r.reason = Some("NETFILTER_DROP".to_owned());
                r.tcp_flags = Some("SYN".to_owned());
                r.location = Some("nft_do_chain+0x3e8".to_owned());
            }),
        );
    }
}

fn netfilter_record(packets: u64) -> ContextRecord {
    ContextRecord::NetfilterDrop(NetfilterDropRecord {
        kind: "netfilter_drop",
        time: String::new(),
        netns: u64::from(SERVER_NS),
        dropped: packets,
        rules: vec![RuleRecord {
            family: "ip".to_owned(),
            table: "filter".to_owned(),
            chain: "INPUT".to_owned(),
            handle: 5,
            rule: "tcp dport 8080 counter drop".to_owned(),
            verdict: Some("drop".to_owned()),
            comment: None,
            packets,
        }],
        candidates: Vec::new(),
    })
}

#[test]
fn a_clients_syn_retransmits_are_explained_by_the_servers_rule() {
    let connect_trouble = anomaly(AnomalyKind::ConnectTrouble, Signal::SynRetransmit, 4);
    let mut evidence = Evidence::default();
    drop_rule_evidence(&mut evidence, 35);
    // Before the rule is named: a provisional cause.
    let Some(cause) = explain(&evidence, &connect_trouble, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::NetfilterRule);
    assert!(cause.evidence["rule"].is_null(), "{cause:?}");
    assert!(
        cause.summary.contains("not identified yet"),
        "{}",
        cause.summary
    );
    evidence.note_context(T0 + SEC, &netfilter_record(35));
    let Some(cause) = explain(&evidence, &connect_trouble, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::NetfilterRule);
    assert_eq!(cause.evidence["rule"], "tcp dport 8080 counter drop");
    assert_eq!(cause.evidence["handle"], 5);
    assert_eq!(cause.evidence["dropped"], 35);
    assert_eq!(cause.evidence["syns_dropped"], 35);
    assert_eq!(cause.evidence["netns"], SERVER_NS);
    assert!(
        cause.summary.contains("`tcp dport 8080 counter drop`"),
        "{}",
        cause.summary
    );
    assert!(cause.summary.contains("netns srv"), "{}", cause.summary);
    assert!(cause.summary.contains("35 SYNs"), "{}", cause.summary);
}

#[test]
fn drops_between_other_hosts_explain_nothing() {
    let connect_trouble = anomaly(AnomalyKind::ConnectTrouble, Signal::SynRetransmit, 4);
    let mut evidence = Evidence::default();
    let elsewhere = Flow {
        saddr: IpAddr::from([10, 7, 0, 2]),
        daddr: IpAddr::from([10, 7, 0, 1]),
        ..server_side(client_flow(40000))
    };
    for i in 0..10 {
        evidence.note_event(
            T0 + i,
            &record("drop", elsewhere, |r| {
                r.reason = Some("NETFILTER_DROP".to_owned());
            }),
        );
    }
    evidence.note_context(T0 + SEC, &netfilter_record(10));
    assert_eq!(explain(&evidence, &connect_trouble, &around()), None);
}

/// A client's flow to 127.0.0.1:8080 in its own namespace.
fn loopback_flow(sport: u16) -> Flow {
    Flow {
        saddr: IpAddr::from([127, 0, 0, 1]),
        daddr: IpAddr::from([127, 0, 0, 1]),
        ..client_flow(sport)
    }
}

#[test]
fn loopback_evidence_counts_only_in_its_own_namespace() {
    let retransmits = anomaly_on(
        AnomalyKind::FlowRetransmitSpike,
        Signal::Retransmit,
        40,
        loopback_flow,
    );
    let drops_in = |netns: u32| {
        let mut evidence = Evidence::default();
        for i in 0..10 {
            let flow = Flow {
                netns,
                ..loopback_flow(40000)
            };
            evidence.note_event(
                T0 + i,
                &record("drop", flow, |r| {
                    r.reason = Some("NETFILTER_DROP".to_owned());
                }),
            );
        }
        evidence
    };
    // Every namespace has its own 127.0.0.1: another namespace's loopback drops are not these.
    assert_eq!(explain(&drops_in(SERVER_NS), &retransmits, &around()), None);
    let Some(cause) = explain(&drops_in(CLIENT_NS), &retransmits, &around()) else {
        panic!("the namespace's own loopback drops explain nothing");
    };
    assert_eq!(cause.kind, CauseKind::NetfilterRule);
    assert_eq!(cause.evidence["netns"], CLIENT_NS);
}

#[test]
fn evidence_from_before_the_lookback_explains_nothing() {
    let connect_trouble = anomaly(AnomalyKind::ConnectTrouble, Signal::SynRetransmit, 4);
    let mut evidence = Evidence::default();
    let flow = server_side(client_flow(40000));
    evidence.note_event(
        T0 - 5 * 60 * SEC,
        &record("drop", flow, |r| {
            r.reason = Some("NETFILTER_DROP".to_owned())
        }),
    );
    assert_eq!(explain(&evidence, &connect_trouble, &around()), None);
}

#[test]
fn a_full_accept_queue_explains_connect_trouble_and_the_listeners_own_anomaly() {
    let mut evidence = Evidence::default();
    evidence.note_context(
        T0 + SEC,
        &ContextRecord::ListenerDrops(ListenerDropsRecord {
            kind: "listener_drops",
            time: String::new(),
            netns: u64::from(SERVER_NS),
            family: Family::Ipv4,
            addr: server(),
            port: 8080,
            accept_queue_overflows: 16,
            syn_queue_drops: 0,
            other_drops: 0,
            backlog_limit: 1,
            accept_queue: 2,
            syn_queue: 0,
            closed: false,
            namespace_counters: BTreeMap::new(),
        }),
    );
    for (kind, signal) in [
        (AnomalyKind::ConnectTrouble, Signal::SynRetransmit),
        (AnomalyKind::ListenOverflow, Signal::ListenOverflow),
    ] {
        let a = anomaly(kind, signal, 4);
        let Some(cause) = explain(&evidence, &a, &around()) else {
            panic!("no cause for {kind:?}");
        };
        assert_eq!(cause.kind, CauseKind::AcceptQueueOverflow);
        assert_eq!(cause.evidence["accept_queue_overflows"], 16);
        assert_eq!(cause.evidence["backlog_limit"], 1);
        assert_eq!(cause.evidence["somaxconn"], "4096");
        assert!(cause.summary.contains("10.9.0.2:8080"), "{}", cause.summary);
    }
}

#[test]
fn an_asymmetric_route_explains_handshakes_not_completing() {
    // The server's view: SYN-ACK retransmits to the client.
    let mut engine = match Engine::new(EngineConfig::default(), T0) {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    let mut opened = None;
    for sec in 0..5u64 {
        for i in 0..3u16 {
            let flow = server_side(client_flow(40000 + i));
            engine.observe(
                T0 + sec * SEC,
                Observation::new(Signal::SynackRetransmit, 1).with_flow(flow),
            );
        }
        opened = engine
            .tick(T0 + (sec + 1) * SEC)
            .into_iter()
            .find(|e| e.anomaly.kind == AnomalyKind::HandshakesNotCompleting)
            .or(opened);
    }
    let Some(opened) = opened else {
        panic!("no handshakes_not_completing");
    };
    let mut evidence = Evidence::default();
    evidence.note_context(
        T0 + 2 * SEC,
        &ContextRecord::AsymmetricRoute(AsymmetricRouteRecord {
            kind: "asymmetric_route",
            time: String::new(),
            trigger: "synack_retransmit".to_owned(),
            route: AsymmetricRoute {
                netns: u64::from(SERVER_NS),
                peer: client(),
                local_addr: server(),
                in_ifindex: 2,
                in_ifname: "veth-a".to_owned(),
                in_source: ArrivalSource::LocalAddress,
                out_ifindex: 3,
                out_ifname: "veth-b".to_owned(),
                gateway: Some(IpAddr::from([10, 8, 0, 1])),
                table: 254,
                rp_filter_in: Some(0),
                rp_filter_out: Some(0),
            },
        }),
    );
    let Some(cause) = explain(&evidence, &opened.anomaly, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::AsymmetricRoute);
    assert_eq!(cause.evidence["out_ifname"], "veth-b");
    assert!(
        cause.summary.contains("leave by veth-b via 10.8.0.1") && cause.summary.contains("veth-a"),
        "{}",
        cause.summary
    );
}

#[test]
fn resets_name_the_process_that_sent_them() {
    let storm = anomaly(AnomalyKind::ResetStorm, Signal::ResetReceived, 10);
    let mut evidence = Evidence::default();
    for i in 0..20u16 {
        let flow = server_side(client_flow(40000 + i));
        evidence.note_event(
            T0 + u64::from(i),
            &record("reset_sent", flow, |r| {
                r.reason = Some("TCP_ABORT_ON_LINGER".to_owned());
                r.pid = 4242;
            }),
        );
    }
    let Some(cause) = explain(&evidence, &storm, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::Reset);
    assert_eq!(cause.evidence["resets_sent"], 20);
    assert_eq!(cause.evidence["pid"], 4242);
    assert_eq!(cause.evidence["comm"], "server.py");
    assert!(
        cause.summary.contains("pid 4242 (server.py)") && cause.summary.contains("SO_LINGER 0"),
        "{}",
        cause.summary
    );
}

#[test]
fn resets_for_a_closed_port_say_nothing_listens() {
    let failed = anomaly(AnomalyKind::FailedConnects, Signal::ConnectRefused, 10);
    let mut evidence = Evidence::default();
    for i in 0..30u16 {
        let flow = server_side(client_flow(40000 + i));
        evidence.note_event(
            T0 + u64::from(i),
            &record("reset_sent", flow, |r| {
                r.reason = Some("NO_SOCKET".to_owned());
                // Sent from a softirq: whatever ran is no culprit.
                r.pid = 4242;
            }),
        );
    }
    let Some(cause) = explain(&evidence, &failed, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::NoListener);
    assert_eq!(cause.evidence["resets_sent"], 30);
    assert!(
        cause.summary.contains("nothing listens on 10.9.0.2:8080"),
        "{}",
        cause.summary
    );
    assert!(!cause.summary.contains("4242"), "{}", cause.summary);
}

#[test]
fn a_sysctl_changed_in_the_servers_namespace_explains_client_retransmits() {
    let spike = anomaly(AnomalyKind::PeerRetransmitSpike, Signal::Retransmit, 30);
    let mut evidence = Evidence::default();
    // The server had no event at all: its namespace's reading says which address it has.
    let mut around = around();
    around.addresses.push((server(), SERVER_NS));
    evidence.note_context(
        T0 - 20 * SEC,
        &ContextRecord::SysctlChange(SysctlChangeRecord {
            kind: "sysctl_change",
            time: "2026-12-03T10:00:00Z".to_owned(),
            netns: u64::from(SERVER_NS),
            name: "net.ipv4.tcp_fastopen".to_owned(),
            old: "3".to_owned(),
            new: "0".to_owned(),
            rates: None,
        }),
    );
    let Some(cause) = explain(&evidence, &spike, &around) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::SysctlChange);
    assert_eq!(cause.evidence["name"], "net.ipv4.tcp_fastopen");
    assert_eq!(cause.evidence["old"], "3");
    assert_eq!(cause.evidence["new"], "0");
    assert!(
        cause
            .summary
            .contains("net.ipv4.tcp_fastopen changed 3 -> 0 in netns srv")
            && cause.summary.contains("retransmit 24 -> 393 per minute"),
        "{}",
        cause.summary
    );
    // A sysctl that affects other signals explains nothing.
    let mut unrelated = Evidence::default();
    unrelated.note_context(
        T0 - 20 * SEC,
        &ContextRecord::SysctlChange(SysctlChangeRecord {
            kind: "sysctl_change",
            time: String::new(),
            netns: u64::from(CLIENT_NS),
            name: "net.ipv4.tcp_synack_retries".to_owned(),
            old: "5".to_owned(),
            new: "1".to_owned(),
            rates: None,
        }),
    );
    assert_eq!(explain(&unrelated, &spike, &around), None);
}

#[test]
fn paws_drops_explain_retransmits_with_the_counters() {
    let spike = anomaly(AnomalyKind::PeerRetransmitSpike, Signal::Retransmit, 30);
    let mut evidence = Evidence::default();
    for i in 0..12u16 {
        evidence.note_event(
            T0 + u64::from(i),
            &record("drop", server_side(client_flow(40000 + i)), |r| {
                r.reason = Some("TCP_RFC7323_PAWS".to_owned());
            }),
        );
    }
    let Some(cause) = explain(&evidence, &spike, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::Paws);
    assert_eq!(cause.evidence["dropped"], 12);
    assert_eq!(
        cause.evidence["extra"]["paws_counters_60s"]["TcpExtPAWSEstab"],
        7
    );
    assert!(
        cause.summary.contains("timestamps went backwards"),
        "{}",
        cause.summary
    );
}

#[test]
fn stale_connections_name_their_process() {
    let mut engine = match Engine::new(EngineConfig::default(), T0) {
        Ok(e) => e,
        Err(e) => panic!("{e}"),
    };
    let peer = crate::aggregate::PeerKey {
        netns: CLIENT_NS,
        addr: server(),
    };
    engine.observe(
        T0,
        Observation::new(Signal::StaleConnection, 111).with_peer(peer),
    );
    let Some(opened) = engine
        .tick(T0 + SEC)
        .into_iter()
        .find(|e| e.anomaly.kind == AnomalyKind::StaleConnections)
    else {
        panic!("no stale_connections");
    };
    let mut evidence = Evidence::default();
    evidence.note_context(
        T0,
        &ContextRecord::StaleConnections(StaleConnectionsRecord {
            kind: "stale_connections",
            time: String::new(),
            group: StaleGroup {
                netns: u64::from(CLIENT_NS),
                pid: Some(777),
                comm: Some("php-fpm".to_owned()),
                cmdline: None,
                peer: server(),
                peer_port: 8080,
                count: 111,
                awaiting_reply: 111,
                unacknowledged: 0,
                send_blocked: 0,
                oldest_age_secs: 95,
                bytes_waiting: 0,
                growing: true,
                newly_stale: 111,
                service: Some(crate::enrich::cgroup::parse_path(
                    "/system.slice/php-fpm.service",
                )),
            },
            threshold_secs: 30,
        }),
    );
    let Some(cause) = explain(&evidence, &opened.anomaly, &around()) else {
        panic!("no cause");
    };
    assert_eq!(cause.kind, CauseKind::StaleProcess);
    assert_eq!(cause.evidence["count"], 111);
    assert!(
        cause
            .summary
            .contains("pid 777 (php-fpm) of php-fpm.service")
            && cause.summary.contains("111 connections"),
        "{}",
        cause.summary
    );
}

#[test]
fn evidence_is_bounded_and_expires() {
    let mut evidence = Evidence::default();
    for i in 0..10_000u32 {
        let flow = Flow {
            daddr: IpAddr::from(i.to_be_bytes()),
            ..server_side(client_flow(1))
        };
        evidence.note_event(
            T0 + u64::from(i),
            &record("drop", flow, |r| r.reason = Some("NO_SOCKET".to_owned())),
        );
    }
    assert!(evidence.drops.len() <= 4096);
    evidence.expire(T0 + 16 * 60 * SEC);
    assert!(evidence.drops.is_empty());
}

#[test]
fn every_kind_has_its_name() -> Result<(), serde_json::Error> {
    for kind in CauseKind::ALL {
        assert_eq!(serde_json::to_value(kind)?, kind.name());
    }
    Ok(())
}
