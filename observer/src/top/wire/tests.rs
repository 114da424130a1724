//! Records written as the daemon writes them, read back.
use super::*;
use crate::{
    analysis::ReasonCache,
    clock::BootClock,
    decode::{ConnectOutcome, Detail, Direction, Event},
    kernel::reasons::ReasonNames,
    record::{EventRecord, Names},
};

fn event(kind: EventKind, detail: Detail, v6: bool) -> Event {
    let (saddr, daddr) = if v6 {
        (
            "fd00:200:50::1".parse().expect("v6"),
            "fd00:200:50::2".parse().expect("v6"),
        )
    } else {
        (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]))
    };
    Event {
        kind,
        flow: Flow {
            family: if v6 { Family::Ipv6 } else { Family::Ipv4 },
            saddr,
            sport: 45678,
            daddr,
            dport: 5001,
            netns: 4026532000,
        },
        boot_ns: 5_000_000_000,
        segs: 3,
        flow_count: 9,
        key_wildcard: 0,
        err: 0,
        pid: 0,
        state: 1,
        socket_family: 10,
        detail,
    }
}

/// Every kind of event, written as the daemon writes it and read back, maps to the
/// observation the daemon's engine got: top's numbers are the daemon's.
#[test]
fn records_map_to_the_daemons_observations() {
    let names = Names {
        drop_reasons: ReasonNames::from_pairs([(12, "NETFILTER_DROP")], ""),
        reset_reasons: ReasonNames::from_pairs([(2, "NO_SOCKET")], ""),
        symbols: Default::default(),
    };
    let clock = BootClock::with_offset(1_763_782_000_000_000_000);
    let details = [
        (EventKind::Retransmit, Detail::None),
        (EventKind::RetransmitFailed, Detail::None),
        (EventKind::SynRetransmit, Detail::None),
        (EventKind::SynackRetransmit, Detail::None),
        (
            EventKind::Drop,
            Detail::Drop {
                reason: 12,
                location: 0,
                ifindex: 2,
                tcp_flags: 0x02,
                direction: Direction::Inbound,
            },
        ),
        (EventKind::ResetSent, Detail::ResetSent { reason: 2 }),
        (EventKind::ResetReceived, Detail::None),
        (
            EventKind::Connect,
            Detail::Connect {
                latency_ns: 1_500_000,
                syn_retransmits: 0,
            },
        ),
        (
            EventKind::ConnectFailed,
            Detail::ConnectFailed {
                outcome: ConnectOutcome::Refused,
                elapsed_ns: 1,
                syn_retransmits: 0,
            },
        ),
        (
            EventKind::ConnectFailed,
            Detail::ConnectFailed {
                outcome: ConnectOutcome::Timeout,
                elapsed_ns: 1,
                syn_retransmits: 3,
            },
        ),
        (
            EventKind::Accept,
            Detail::Accept {
                handshake_rtt_us: 7,
            },
        ),
        (
            EventKind::Close,
            Detail::Close {
                lifetime_ns: 1,
                from_state: 1,
                active: true,
            },
        ),
    ];
    let mut cache = ReasonCache::default();
    let mut interner = ReasonInterner::default();
    for v6 in [false, true] {
        for (kind, detail) in details {
            let event = event(kind, detail, v6);
            let line = serde_json::to_string(&EventRecord::new(&event, &clock, &names))
                .expect("serialize");
            let Record::Event(parsed) = parse_line(&line).expect("parses") else {
                panic!("not an event: {line}");
            };
            assert_eq!(parsed.flow, event.flow, "{line}");
            assert_eq!(
                parsed.time_ns,
                Some(1_763_782_005_000_000_000),
                "time of {line}"
            );
            let daemon = analysis::observation(&event, &names.drop_reasons, &mut cache);
            let top = observation(&parsed, &mut interner);
            assert_eq!(top, daemon, "{line}");
        }
    }
    // The connect latency survives the trip.
    let connect = event(
        EventKind::Connect,
        Detail::Connect {
            latency_ns: 1_500_000,
            syn_retransmits: 0,
        },
        false,
    );
    let line = serde_json::to_string(&EventRecord::new(&connect, &clock, &names)).expect("json");
    let Ok(Record::Event(parsed)) = parse_line(&line) else {
        panic!("{line}");
    };
    assert_eq!(parsed.duration_ms, Some(1.5));
    let mut value: Value = serde_json::from_str(&line).expect("json");
    value["owner"] = serde_json::json!({"pid": 4242, "comm": "curl"});
    let Ok(Record::Event(parsed)) = parse_line(&value.to_string()) else {
        panic!("{value}");
    };
    assert_eq!(
        parsed.owner,
        Some(Owner {
            pid: 4242,
            comm: "curl".into(),
            service: None,
        })
    );
    value["owner"] = serde_json::json!({"pid": 4242, "comm": "curl",
        "cgroup": "/system.slice/app.service", "unit": "app.service"});
    let Ok(Record::Event(parsed)) = parse_line(&value.to_string()) else {
        panic!("{value}");
    };
    let service = parsed.owner.and_then(|o| o.service).expect("service");
    assert_eq!(
        (service.cgroup.as_str(), service.unit.as_deref()),
        ("/system.slice/app.service", Some("app.service"))
    );
}

#[test]
fn context_records_map_through_the_daemons_analysis() {
    let line = r#"{"type":"listener_drops","time":"2026-11-22T03:40:00.000000000Z","netns":4026532315,"family":"ipv4","addr":"127.0.0.1","port":5000,"accept_queue_overflows":4,"syn_queue_drops":1,"other_drops":0,"backlog_limit":1,"accept_queue":2,"syn_queue":0,"namespace_counters":{"TcpExtListenDrops":5}}"#;
    let record = parse_line(line).expect("parses");
    let obs = context_observations(&record);
    assert_eq!(
        obs.iter().map(|o| (o.signal, o.amount)).collect::<Vec<_>>(),
        [(Signal::ListenOverflow, 4), (Signal::SynQueueDrop, 1)]
    );
    assert_eq!(
        obs[0].listener,
        Some(ListenerKey {
            netns: 4026532315,
            addr: IpAddr::from([127, 0, 0, 1]),
            port: 5000
        })
    );
    let line = r#"{"type":"netfilter_drop","time":"2026-11-22T03:40:00.000000000Z","netns":7,"dropped":2,"rules":[{"family":"ip","table":"filter","chain":"INPUT","handle":2,"rule":"tcp dport 9 counter drop","verdict":"drop","packets":2}],"candidates":[]}"#;
    let obs = context_observations(&parse_line(line).expect("parses"));
    assert_eq!(obs.len(), 1);
    assert_eq!((obs[0].signal, obs[0].amount), (Signal::NetfilterDrop, 2));
    let line = r#"{"type":"stale_connections","time":"2026-11-22T03:40:00.000000000Z","netns":9,"pid":4242,"comm":"python3","cmdline":"python3 client.py","cgroup":"/system.slice/client.service","unit":"client.service","peer":"10.203.1.2","peer_port":7001,"count":20,"awaiting_reply":20,"unacknowledged":0,"send_blocked":0,"oldest_age_secs":31,"bytes_waiting":0,"growing":true,"newly_stale":20,"threshold_secs":30}"#;
    let Ok(Record::StaleConnections(stale)) = parse_line(line) else {
        panic!("{line}");
    };
    assert_eq!(
        stale.service.and_then(|s| s.unit).as_deref(),
        Some("client.service")
    );
    let obs = context_observations(&parse_line(line).expect("parses"));
    assert_eq!(obs.len(), 1);
    assert_eq!(
        (obs[0].signal, obs[0].amount),
        (Signal::StaleConnection, 20)
    );
    assert_eq!(
        obs[0].peer,
        Some(PeerKey {
            netns: 9,
            addr: IpAddr::from([10, 203, 1, 2])
        })
    );
}

#[test]
fn anomaly_records_keep_their_key_and_context() {
    let line = r#"{"type":"anomaly_open","time":"2026-11-22T03:40:00.000000000Z","id":3,"kind":"peer_retransmit_spike","key":{"scope":"peer","netns":7,"addr":"fd00::2"},"signals":["retransmit"],"counts":{"last_1s":1,"last_10s":300,"last_60s":300},"rate_per_sec":30.0,"peak_rate_per_sec":31.5,"lifetime_count":300,"baseline_per_sec":0.0,"open_threshold_per_sec":20.0,"close_threshold_per_sec":10.0,"first_seen_ns":1,"last_seen_ns":2,"opened_ns":2,"exemplar_flows":[],"context":{"netns":7,"sysctls":{"net.ipv4.tcp_sack":"1"},"counters_60s":{}}}"#;
    let Record::Anomaly(a) = parse_line(line).expect("parses") else {
        panic!("not an anomaly");
    };
    assert_eq!(a.phase, AnomalyPhase::Open);
    assert_eq!(
        a.key,
        RowKey::Peer(PeerKey {
            netns: 7,
            addr: "fd00::2".parse().expect("addr")
        })
    );
    assert_eq!(a.rate_per_sec, 30.0);
    assert_eq!(a.netns, Some(7));
    assert_eq!(a.sysctls["net.ipv4.tcp_sack"], "1");
    // Keys serialized by the engine read back to the same key.
    for key in [
        RowKey::Flow(event(EventKind::Retransmit, Detail::None, true).flow),
        RowKey::Listener(ListenerKey {
            netns: 1,
            addr: IpAddr::from([0, 0, 0, 0]),
            port: 80,
        }),
        RowKey::Rule(RuleKey {
            netns: 1,
            family: "inet".into(),
            table: "filter".into(),
            chain: "input".into(),
            handle: 4,
        }),
    ] {
        let json = serde_json::to_value(&key).expect("serialize");
        assert_eq!(row_key(&json), Some(key));
    }
}

#[test]
fn other_lines_are_tolerated() {
    assert!(matches!(
        parse_line(r#"{"type":"sysctl_effect","x":1}"#),
        Ok(Record::Other { .. })
    ));
    assert!(matches!(
        parse_line(r#"{"type":"undelivered","count":12}"#),
        Ok(Record::Undelivered { count: 12 })
    ));
    assert!(matches!(
        parse_line(r#"{"type":"lost","time":"x","cpu":1,"count":3}"#),
        Ok(Record::Lost { count: 3 })
    ));
    let Ok(Record::Reconciled(obs)) = parse_line(
        r#"{"type":"reconciled","time":"x","flows":[{"family":"ipv4","saddr":"10.0.0.1","sport":1,"daddr":"10.0.0.2","dport":80,"netns":5,"signal":"retransmit","amount":12,"through":40},{"saddr":"10.0.0.1","sport":1,"daddr":"10.0.0.2","dport":80,"signal":"bogus","amount":1}]}"#,
    ) else {
        panic!("reconciled record");
    };
    assert_eq!(obs.len(), 1);
    assert_eq!(
        (
            obs[0].observation.signal,
            obs[0].observation.amount,
            obs[0].through
        ),
        (Signal::Retransmit, 12, 40)
    );
    assert!(parse_line("not json").is_err());
    assert!(parse_line(r#"{"no":"type"}"#).is_err());
    assert!(parse_line(r#"{"type":"retransmit","saddr":"x"}"#).is_err());
    assert_eq!(
        parse_time("2025-11-22T03:26:40.123456789Z"),
        Some(1_763_782_000_123_456_789)
    );
    assert_eq!(parse_time("yesterday"), None);
}
