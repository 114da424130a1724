//! The engine driven by synthetic sequences of observations and ticks.
use std::net::IpAddr;

use super::*;
use crate::decode::Family;

const SEC: u64 = NANOS_PER_SEC;
const MS: u64 = 1_000_000;
/// An arbitrary boot time, so that no test depends on starting at zero.
const T0: u64 = 5_000 * SEC;

fn flow(client: u8, sport: u16) -> Flow {
    Flow {
        family: Family::Ipv4,
        saddr: IpAddr::from([10, 0, 0, 1]),
        sport,
        daddr: IpAddr::from([192, 168, 1, client]),
        dport: 443,
        netns: 4026531840,
    }
}

fn peer_of(client: u8) -> PeerKey {
    PeerKey::of_flow(&flow(client, 1))
}

/// Thresholds with fast lifecycles for tests.
fn quick_thresholds() -> Thresholds {
    Thresholds {
        update_interval_secs: 5,
        close_hold_secs: 3,
        ..Thresholds::default()
    }
}

fn engine_with(thresholds: Thresholds) -> Engine {
    match Engine::new(
        EngineConfig {
            limits: Limits::default(),
            thresholds,
        },
        T0,
    ) {
        Ok(engine) => engine,
        Err(error) => panic!("test configuration refused: {error}"),
    }
}

/// Observes `per_sec` retransmits evenly spread over the second starting at `start`.
fn retransmits(engine: &mut Engine, start: u64, per_sec: u64, flow: Flow) {
    for i in 0..per_sec {
        engine.observe(
            start + i * SEC / per_sec,
            Observation::new(Signal::Retransmit, 1).with_flow(flow),
        );
    }
}

fn phases(events: &[AnomalyEvent]) -> Vec<(Phase, AnomalyKind)> {
    events.iter().map(|e| (e.phase, e.anomaly.kind)).collect()
}

#[test]
fn a_quiet_host_opens_nothing() {
    let mut engine = engine_with(Thresholds::default());
    let mut events = Vec::new();
    // Ten minutes of background noise: a retransmit or reset here and there across 50
    // flows, an occasional SYN retransmit, a listen overflow once a minute.
    for sec in 0..600u64 {
        let now = T0 + sec * SEC;
        let client = (sec % 50) as u8;
        let f = flow(client, 30000 + (sec % 7) as u16);
        if sec % 3 == 0 {
            engine.observe(now, Observation::new(Signal::Retransmit, 2).with_flow(f));
        }
        if sec % 11 == 0 {
            engine.observe(now, Observation::new(Signal::ResetSent, 1).with_flow(f));
        }
        if sec % 17 == 0 {
            engine.observe(now, Observation::new(Signal::SynRetransmit, 1).with_flow(f));
        }
        if sec % 60 == 0 {
            let listener = ListenerKey::of_flow_source(&f);
            engine.observe(
                now,
                Observation::new(Signal::ListenOverflow, 1).with_listener(listener),
            );
        }
        events.extend(engine.tick(now + 500 * MS));
    }
    assert_eq!(phases(&events), vec![]);
    assert_eq!(engine.stats().anomalies_opened, 0);
}

#[test]
fn a_retransmit_storm_opens_updates_and_closes() {
    let mut engine = engine_with(quick_thresholds());
    let storm_flow = flow(7, 40000);
    let mut log: Vec<(u64, AnomalyEvent)> = Vec::new();
    for sec in 0..40u64 {
        let start = T0 + sec * SEC;
        // 200 segments a second for 12 s, then silence.
        if sec < 12 {
            retransmits(&mut engine, start, 200, storm_flow);
        }
        for event in engine.tick(start + SEC) {
            log.push((sec + 1, event));
        }
    }
    let flow_events: Vec<_> = log
        .iter()
        .filter(|(_, e)| e.anomaly.kind == AnomalyKind::FlowRetransmitSpike)
        .collect();

    // Opens at the first tick after the first storm second.
    let (opened_at, open) = flow_events[0];
    assert_eq!(*opened_at, 1);
    assert_eq!(open.phase, Phase::Open);
    assert_eq!(open.anomaly.key, RowKey::Flow(storm_flow));
    assert_eq!(open.anomaly.counts.last_1s, 200);
    assert_eq!(open.anomaly.rate_per_sec, 20.0);
    assert_eq!(open.anomaly.baseline_per_sec, 0.0);
    assert_eq!(open.anomaly.open_threshold_per_sec, 10.0);
    assert!(open.anomaly.exemplar_flows.is_empty());

    // Updates every 5 s while open, with growing counts.
    let updates: Vec<u64> = flow_events
        .iter()
        .filter(|(_, e)| e.phase == Phase::Update)
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(updates[..2], [6, 11]);
    let second_update = &flow_events[2].1.anomaly;
    assert_eq!(second_update.counts.last_10s, 2000);
    assert_eq!(second_update.lifetime_count, 2200);

    // The storm ends after second 12; the 10 s rate falls below 5/s (close threshold) once
    // fewer than 50 segments remain in the window, at the tick of second 22; after 3 s of hold
    // it closes.
    let (closed_at, close) = flow_events[flow_events.len() - 1];
    assert_eq!(close.phase, Phase::Close);
    assert_eq!(*closed_at, 25);
    assert_eq!(close.anomaly.id, open.anomaly.id);
    assert_eq!(close.anomaly.close_reason, Some(CloseReason::Subsided));
    assert_eq!(close.anomaly.closed_ns, Some(T0 + 25 * SEC));
    assert_eq!(close.anomaly.opened_ns, T0 + SEC);
    assert_eq!(close.anomaly.lifetime_count, 2400);
    assert_eq!(close.anomaly.peak_rate_per_sec, 200.0);
    assert_eq!(close.anomaly.first_seen_ns, T0);
    assert!(close.anomaly.last_seen_ns < T0 + 12 * SEC);
    assert_eq!(engine.stats().open_anomalies, 0);

    // The peer saw the same storm: its own anomaly, with the flow as exemplar.
    let peer_open = log
        .iter()
        .find(|(_, e)| e.anomaly.kind == AnomalyKind::PeerRetransmitSpike)
        .map(|(_, e)| e);
    let Some(peer_open) = peer_open else {
        panic!("peer anomaly opened");
    };
    assert_eq!(peer_open.anomaly.key, RowKey::Peer(peer_of(7)));
    assert_eq!(peer_open.anomaly.exemplar_flows, vec![storm_flow]);
    assert!(peer_open.anomaly.id > open.anomaly.id);
}

#[test]
fn hysteresis_keeps_an_anomaly_open_between_the_thresholds() {
    let mut engine = engine_with(quick_thresholds());
    let f = flow(1, 1000);
    let mut events = Vec::new();
    for sec in 0..60u64 {
        let start = T0 + sec * SEC;
        // 30/s to open, then 7/s: below open (10) but above close (5).
        retransmits(&mut engine, start, if sec < 5 { 30 } else { 7 }, f);
        events.extend(engine.tick(start + SEC));
    }
    let kinds: Vec<Phase> = events
        .iter()
        .filter(|e| e.anomaly.kind == AnomalyKind::FlowRetransmitSpike)
        .map(|e| e.phase)
        .collect();
    assert_eq!(kinds[0], Phase::Open);
    assert!(kinds[1..].iter().all(|p| *p == Phase::Update), "{kinds:?}");
    assert_eq!(engine.stats().open_anomalies, 1);
}

#[test]
fn a_quiet_spell_shorter_than_the_hold_does_not_close() {
    let thresholds = Thresholds {
        close_hold_secs: 20,
        ..quick_thresholds()
    };
    let mut engine = engine_with(thresholds);
    let f = flow(1, 1000);
    let mut events = Vec::new();
    for sec in 0..80u64 {
        let start = T0 + sec * SEC;
        // Bursts of 10 s at 50/s with 15 s pauses: the rate dips below close for ~5 s only.
        if sec % 25 < 10 {
            retransmits(&mut engine, start, 50, f);
        }
        events.extend(engine.tick(start + SEC));
    }
    let flow_phases: Vec<Phase> = events
        .iter()
        .filter(|e| e.anomaly.kind == AnomalyKind::FlowRetransmitSpike)
        .map(|e| e.phase)
        .collect();
    assert_eq!(flow_phases.iter().filter(|p| **p == Phase::Open).count(), 1);
    assert!(!flow_phases.contains(&Phase::Close));
}

#[test]
fn baseline_is_an_ewma_of_the_10s_rate() {
    let thresholds = Thresholds {
        baseline_time_constant_secs: 100,
        // Keep anomalies out of the way: a baseline frozen by one would not move.
        flow_retransmit_spike: KindThresholds::opening_at(1000.0),
        peer_retransmit_spike: KindThresholds::opening_at(1000.0),
        ..Thresholds::default()
    };
    let mut engine = engine_with(thresholds);
    let f = flow(1, 1000);
    // 10 a second from T0; ticks every second. After the window fills (10 s), the 10 s rate is
    // 10/s, and the baseline approaches it as 10 × (1 - e^(-t/100)).
    for sec in 0..110u64 {
        retransmits(&mut engine, T0 + sec * SEC, 10, f);
        engine.tick(T0 + (sec + 1) * SEC);
    }
    let baseline = |engine: &Engine| {
        engine.top_rows(TableId::Flows, SortKey::LastSeen, 1)[0]
            .signal(Signal::Retransmit)
            .map_or(f64::NAN, |s| s.baseline_per_sec)
    };
    // Ramp-up: the 10 s rate was k/10 × 10 at tick k for the first 10 ticks; the rest at 10/s
    // for 100 ticks. Exactly: b_n = b_{n-1} + a (r_n - b_{n-1}) with a = 1 - e^(-1/100).
    let alpha = 1.0 - (-1.0f64 / 100.0).exp();
    let mut expected = 0.0;
    for tick in 1..=110u64 {
        let rate = (tick.min(10)) as f64;
        expected += alpha * (rate - expected);
    }
    let got = baseline(&engine);
    assert!(
        (got - expected).abs() < 1e-3,
        "baseline {got}, expected {expected}"
    );
    assert!((6.0..7.0).contains(&got), "{got}");

    // Silence: it decays toward zero with the same time constant.
    for sec in 110..410u64 {
        engine.tick(T0 + (sec + 1) * SEC);
    }
    let decayed = baseline(&engine);
    assert!(decayed < got * 0.06 && decayed > 0.0, "{decayed}");
}

#[test]
fn a_steady_rate_at_its_baseline_does_not_open_but_a_spike_does() {
    let thresholds = Thresholds {
        warmup_secs: 120,
        // The steady 20/s is above the absolute threshold: only the baseline keeps it quiet.
        flow_retransmit_spike: KindThresholds::opening_at(5.0),
        ..quick_thresholds()
    };
    let mut engine = engine_with(thresholds);
    let f = flow(3, 3000);
    let mut events = Vec::new();
    for sec in 0..400u64 {
        retransmits(&mut engine, T0 + sec * SEC, 20, f);
        events.extend(engine.tick(T0 + (sec + 1) * SEC));
    }
    assert_eq!(
        phases(&events),
        vec![],
        "steady rate opened something: {events:?}"
    );
    let row = &engine.top_rows(TableId::Flows, SortKey::Severity, 1)[0];
    let baseline = row
        .signal(Signal::Retransmit)
        .map_or(0.0, |s| s.baseline_per_sec);
    assert!((baseline - 20.0).abs() < 1.0, "baseline {baseline}");

    // Four times the usual rate departs from 3 × baseline + floor.
    for sec in 400..410u64 {
        retransmits(&mut engine, T0 + sec * SEC, 80, f);
        events.extend(engine.tick(T0 + (sec + 1) * SEC));
    }
    let opened: Vec<_> = events
        .iter()
        .filter(|e| e.phase == Phase::Open)
        .map(|e| (e.anomaly.kind, e.anomaly.key.clone()))
        .collect();
    assert!(
        opened.contains(&(AnomalyKind::FlowRetransmitSpike, RowKey::Flow(f))),
        "{opened:?}"
    );
    let open = events
        .iter()
        .find(|e| e.phase == Phase::Open && e.anomaly.kind == AnomalyKind::FlowRetransmitSpike);
    let baseline_at_open = open.map_or(0.0, |e| e.anomaly.baseline_per_sec);
    assert!((baseline_at_open - 20.0).abs() < 1.0, "{baseline_at_open}");
}

#[test]
fn nothing_opens_during_warm_up() {
    let thresholds = Thresholds {
        warmup_secs: 30,
        ..quick_thresholds()
    };
    let mut engine = engine_with(thresholds);
    let mut events = Vec::new();
    for sec in 0..30u64 {
        retransmits(&mut engine, T0 + sec * SEC, 100, flow(1, 1));
        events.extend(engine.tick(T0 + sec * SEC + 999 * MS));
    }
    assert_eq!(phases(&events), vec![]);
}

#[test]
fn the_baseline_is_frozen_while_an_anomaly_is_open() {
    let mut engine = engine_with(quick_thresholds());
    let f = flow(1, 1);
    for sec in 0..100u64 {
        retransmits(&mut engine, T0 + sec * SEC, 100, f);
        engine.tick(T0 + (sec + 1) * SEC);
    }
    assert_eq!(engine.stats().open_anomalies, 2, "flow and peer");
    let row = &engine.top_rows(TableId::Flows, SortKey::Severity, 1)[0];
    assert_eq!(
        row.signal(Signal::Retransmit).map(|s| s.baseline_per_sec),
        Some(0.0)
    );
    assert_eq!(row.open_anomalies, vec![AnomalyKind::FlowRetransmitSpike]);
}

#[test]
fn peer_anomalies_keep_five_recent_distinct_exemplars() {
    let mut engine = engine_with(quick_thresholds());
    let mut events = Vec::new();
    // SYNs to one peer retransmitted from 12 different local ports.
    for sec in 0..5u64 {
        for port in 0..12u16 {
            let f = flow(9, 50000 + port);
            let now = T0 + sec * SEC + u64::from(port) * MS;
            engine.observe(now, Observation::new(Signal::SynRetransmit, 1).with_flow(f));
        }
        events.extend(engine.tick(T0 + (sec + 1) * SEC));
    }
    let open = events
        .iter()
        .find(|e| e.anomaly.kind == AnomalyKind::ConnectTrouble);
    let Some(open) = open else {
        panic!("connect trouble opened: {events:?}");
    };
    assert_eq!(open.phase, Phase::Open);
    assert_eq!(open.anomaly.key, RowKey::Peer(peer_of(9)));
    let ports: Vec<u16> = open
        .anomaly
        .exemplar_flows
        .iter()
        .map(|f| f.sport)
        .collect();
    assert_eq!(ports, vec![50011, 50010, 50009, 50008, 50007]);
    assert_eq!(open.anomaly.signals, &[Signal::SynRetransmit]);
}

#[test]
fn combined_signals_and_reasons() {
    let mut engine = engine_with(quick_thresholds());
    let not_specified: Arc<str> = Arc::from("NOT_SPECIFIED");
    let no_socket: Arc<str> = Arc::from("NO_SOCKET");
    let mut events = Vec::new();
    for sec in 0..3u64 {
        for i in 0..40u64 {
            let now = T0 + sec * SEC + i * 10 * MS;
            let f = flow(4, 2000 + (i % 3) as u16);
            let (signal, reason) = if i % 4 == 0 {
                (Signal::ResetReceived, &not_specified)
            } else {
                (Signal::ResetSent, &no_socket)
            };
            engine.observe(
                now,
                Observation::new(signal, 1)
                    .with_flow(f)
                    .with_reason(Arc::clone(reason)),
            );
        }
        events.extend(engine.tick(T0 + (sec + 1) * SEC));
    }
    let storm: Vec<_> = events
        .iter()
        .filter(|e| e.anomaly.kind == AnomalyKind::ResetStorm)
        .collect();
    assert_eq!(storm.len(), 1, "{events:?}");
    let anomaly = &storm[0].anomaly;
    // Opens at the first tick (40 in the first second: 13/s over the 3 s opening span), with
    // that second's reasons.
    assert_eq!(storm[0].phase, Phase::Open);
    assert_eq!(anomaly.counts.last_1s, 40, "sent and received summed");
    assert_eq!(anomaly.lifetime_count, 40);
    assert_eq!(anomaly.opened_by, OpenedBy::Rate);
    assert_eq!(
        anomaly.reasons,
        vec![
            ReasonCount {
                reason: no_socket,
                count: 30
            },
            ReasonCount {
                reason: not_specified,
                count: 10
            },
        ]
    );
    assert_eq!(anomaly.exemplar_flows.len(), 3);
}

#[test]
fn listener_and_rule_anomalies_carry_their_keys() {
    let mut engine = engine_with(quick_thresholds());
    let listener = ListenerKey {
        netns: 1,
        addr: IpAddr::from([0, 0, 0, 0]),
        port: 8080,
    };
    let rule = RuleKey {
        netns: 1,
        family: "inet".into(),
        table: "filter".into(),
        chain: "input".into(),
        handle: 12,
    };
    let mut events = Vec::new();
    for sec in 0..3u64 {
        for i in 0..300u64 {
            let now = T0 + sec * SEC + i * MS;
            if i < 10 {
                engine.observe(
                    now,
                    Observation::new(Signal::ListenOverflow, 1).with_listener(listener),
                );
            }
            engine.observe(
                now,
                Observation::new(Signal::NetfilterDrop, 1).with_rule(rule.clone()),
            );
        }
        events.extend(engine.tick(T0 + (sec + 1) * SEC));
    }
    let opened: Vec<(AnomalyKind, RowKey)> = events
        .iter()
        .filter(|e| e.phase == Phase::Open)
        .map(|e| (e.anomaly.kind, e.anomaly.key.clone()))
        .collect();
    assert_eq!(
        opened,
        vec![
            (AnomalyKind::ListenOverflow, RowKey::Listener(listener)),
            (AnomalyKind::NetfilterDrops, RowKey::Rule(rule)),
        ]
    );
    // Neither had a flow, so no peer rows.
    assert_eq!(engine.stats().peers.rows, 0);
}

#[test]
fn eviction_is_counted_and_closes_the_evicted_rows_anomaly() {
    let config = EngineConfig {
        limits: Limits {
            max_flows: 3,
            ..Limits::default()
        },
        thresholds: quick_thresholds(),
    };
    let mut engine = match Engine::new(config, T0) {
        Ok(engine) => engine,
        Err(error) => panic!("{error}"),
    };
    let storm = flow(1, 1);
    retransmits(&mut engine, T0, 200, storm);
    let opened = engine.tick(T0 + SEC);
    assert!(
        opened
            .iter()
            .any(|e| e.phase == Phase::Open && e.anomaly.key == RowKey::Flow(storm))
    );
    // Three newer flows push the storm's flow out.
    for port in 2..5u16 {
        engine.observe(
            T0 + 2 * SEC,
            Observation::new(Signal::Retransmit, 1).with_flow(flow(1, port)),
        );
    }
    let stats = engine.stats();
    assert_eq!(stats.flows.rows, 3);
    assert_eq!(stats.flows.evictions, 1);
    assert_eq!(stats.peers.evictions, 0);
    let events = engine.tick(T0 + 3 * SEC);
    let closed = events
        .iter()
        .find(|e| e.phase == Phase::Close && e.anomaly.kind == AnomalyKind::FlowRetransmitSpike);
    let Some(closed) = closed else {
        panic!("evicted row's anomaly closed: {events:?}");
    };
    assert_eq!(closed.anomaly.key, RowKey::Flow(storm));
    assert_eq!(closed.anomaly.close_reason, Some(CloseReason::Evicted));
    assert_eq!(closed.anomaly.lifetime_count, 200);
    // The peer's anomaly lives on.
    assert_eq!(engine.stats().open_anomalies, 1);
}

#[test]
fn before_and_after_a_change() {
    let mut engine = engine_with(Thresholds::default());
    // 2 retransmits a second for 5 minutes, then 6 a second for 5 minutes.
    for sec in 0..600u64 {
        let amount = if sec < 300 { 2 } else { 6 };
        engine.observe(
            T0 + sec * SEC + 100 * MS,
            Observation::new(Signal::Retransmit, amount).with_flow(flow(1, 1)),
        );
        engine.tick(T0 + sec * SEC + 500 * MS);
    }
    let rates = engine.rate_before_after(Signal::Retransmit, T0 + 300 * SEC, 300 * SEC);
    assert_eq!(rates.before_per_min, Some(120.0));
    assert_eq!(rates.after_per_min, Some(360.0));
    assert_eq!(
        (rates.before_covered_secs, rates.after_covered_secs),
        (300, 300)
    );
    let resets = engine.rate_before_after(Signal::ResetSent, T0 + 300 * SEC, 300 * SEC);
    assert_eq!(resets.before_per_min, Some(0.0));
}

#[test]
fn top_rows_rank_by_the_asked_key() {
    let mut engine = engine_with(Thresholds::default());
    let busy = flow(1, 1);
    let mild = flow(2, 2);
    let recent = flow(3, 3);
    retransmits(&mut engine, T0, 50, busy);
    retransmits(&mut engine, T0, 5, mild);
    engine.observe(
        T0 + 995 * MS,
        Observation::new(Signal::ResetSent, 1).with_flow(recent),
    );
    engine.tick(T0 + SEC);

    let by_rate = engine.top_rows(
        TableId::Flows,
        SortKey::Rate {
            signal: Some(Signal::Retransmit),
            window: Window::Last1s,
        },
        2,
    );
    let keys: Vec<RowKey> = by_rate.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, vec![RowKey::Flow(busy), RowKey::Flow(mild)]);
    assert_eq!(
        by_rate[0].rate_per_sec(Some(Signal::Retransmit), Window::Last1s),
        50.0
    );
    assert_eq!(by_rate[0].total(None), 50);

    let by_severity = engine.top_rows(TableId::Flows, SortKey::Severity, 3);
    assert_eq!(by_severity[0].key, RowKey::Flow(busy));
    assert_eq!(by_severity[0].severity, 0.5); // 5/s over 10 s against 10/s
    assert_eq!(by_severity[2].severity, 0.0);

    let by_recency = engine.top_rows(TableId::Flows, SortKey::LastSeen, 1);
    assert_eq!(by_recency[0].key, RowKey::Flow(recent));

    let peers = engine.top_rows(TableId::Peers, SortKey::Total { signal: None }, 10);
    assert_eq!(peers.len(), 3);
    assert_eq!(peers[0].key, RowKey::Peer(peer_of(1)));
    assert!(
        engine
            .top_rows(TableId::Rules, SortKey::Severity, 10)
            .is_empty()
    );
    assert!(
        engine
            .top_rows(TableId::Flows, SortKey::Severity, 0)
            .is_empty()
    );
}

#[test]
fn time_never_runs_backwards() {
    let mut engine = engine_with(Thresholds::default());
    let f = flow(1, 1);
    engine.observe(
        T0 + 10 * SEC,
        Observation::new(Signal::Retransmit, 1).with_flow(f),
    );
    // Late events count at the latest time seen.
    engine.observe(
        T0 + 2 * SEC,
        Observation::new(Signal::Retransmit, 1).with_flow(f),
    );
    engine.tick(T0 + 11 * SEC);
    let row = &engine.top_rows(TableId::Flows, SortKey::LastSeen, 1)[0];
    assert_eq!(row.count(None, Window::Last1s), 2);
    assert_eq!(row.first_seen_ns, T0 + 10 * SEC);
    // An earlier tick is a tick at the latest time.
    assert!(engine.tick(T0).is_empty());
}

#[test]
fn close_all_reports_every_open_anomaly() {
    let mut engine = engine_with(quick_thresholds());
    retransmits(&mut engine, T0, 300, flow(1, 1));
    assert_eq!(engine.tick(T0 + SEC).len(), 2);
    assert_eq!(engine.open_anomalies().len(), 2);
    let closed = engine.close_all(T0 + 2 * SEC);
    assert_eq!(closed.len(), 2);
    assert!(closed.iter().all(|e| e.phase == Phase::Close
        && e.anomaly.close_reason == Some(CloseReason::Shutdown)
        && e.anomaly.closed_ns == Some(T0 + 2 * SEC)));
    assert!(closed[0].anomaly.id < closed[1].anomaly.id);
    assert_eq!(engine.stats().open_anomalies, 0);
    assert!(engine.open_anomalies().is_empty());
    // The storm is still in the window, so it opens again: a new anomaly, a new id.
    let reopened = engine.tick(T0 + 2 * SEC);
    assert!(
        reopened
            .iter()
            .all(|e| e.phase == Phase::Open && e.anomaly.id > 2)
    );
}

#[test]
fn disabled_kinds_never_open() {
    let mut thresholds = quick_thresholds();
    thresholds.flow_retransmit_spike.enabled = false;
    let mut engine = engine_with(thresholds);
    retransmits(&mut engine, T0, 500, flow(1, 1));
    let events = engine.tick(T0 + SEC);
    assert_eq!(
        phases(&events),
        vec![(Phase::Open, AnomalyKind::PeerRetransmitSpike)]
    );
}

#[test]
fn bad_configuration_is_refused() {
    let config = EngineConfig {
        limits: Limits {
            max_peers: 0,
            ..Limits::default()
        },
        thresholds: Thresholds::default(),
    };
    assert!(matches!(
        Engine::new(config, 0),
        Err(ConfigError::Limit {
            table: "max_peers",
            ..
        })
    ));
    let parsed: Result<EngineConfig, _> =
        serde_json::from_str(r#"{"limits": {"max_flows": 10}, "thresholds": {"warmup_secs": 60}}"#);
    let Ok(parsed) = parsed else {
        panic!("partial configuration parses: {parsed:?}");
    };
    assert_eq!(parsed.limits.max_flows, 10);
    assert_eq!(parsed.limits.max_peers, Limits::default().max_peers);
    assert_eq!(parsed.thresholds.warmup_secs, 60);
}

/// The daemon writes anomalies as its own record with the snapshot flattened in.
#[test]
fn snapshots_flatten_into_the_daemons_records() -> Result<(), serde_json::Error> {
    #[derive(Serialize)]
    struct Record<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        time: &'static str,
        #[serde(flatten)]
        anomaly: &'a AnomalySnapshot,
        context: BTreeMap<&'static str, u64>,
    }
    let mut engine = engine_with(quick_thresholds());
    retransmits(&mut engine, T0, 300, flow(1, 1));
    let events = engine.tick(T0 + SEC);
    let peer_event = events
        .iter()
        .find(|e| e.anomaly.kind == AnomalyKind::PeerRetransmitSpike);
    let Some(event) = peer_event else {
        panic!("peer anomaly opened");
    };
    let record = Record {
        kind: event.phase.record_type(),
        time: "2025-01-01T00:00:00Z",
        anomaly: &event.anomaly,
        context: BTreeMap::from([("net.ipv4.tcp_retries2", 15)]),
    };
    let json = serde_json::to_value(&record)?;
    assert_eq!(json["type"], "anomaly_open");
    assert_eq!(json["kind"], "peer_retransmit_spike");
    assert_eq!(json["key"]["scope"], "peer");
    assert_eq!(json["key"]["addr"], "192.168.1.1");
    assert_eq!(json["signals"][0], "retransmit");
    assert_eq!(json["counts"]["last_1s"], 300);
    assert_eq!(json["exemplar_flows"][0]["sport"], 1);
    assert_eq!(json["context"]["net.ipv4.tcp_retries2"], 15);
    assert!(json.get("closed_ns").is_none());
    assert!(json.get("reasons").is_none());
    Ok(())
}

#[test]
fn the_engine_can_move_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Engine>();
}

#[test]
fn a_storm_opens_within_its_first_seconds() {
    let mut engine = engine_with(Thresholds::default());
    // 2 SYN retransmits a second to one peer (threshold 1/s): the 10 s rate reaches the
    // threshold only after 5 s, the 3 s opening span after 2.
    let mut opened_at = None;
    for sec in 0..10u64 {
        for i in 0..2u16 {
            engine.observe(
                T0 + sec * SEC + u64::from(i) * 100 * MS,
                Observation::new(Signal::SynRetransmit, 1).with_flow(flow(9, 40000 + i)),
            );
        }
        let events = engine.tick(T0 + (sec + 1) * SEC);
        if events
            .iter()
            .any(|e| e.phase == Phase::Open && e.anomaly.kind == AnomalyKind::ConnectTrouble)
        {
            opened_at = Some(sec + 1);
            break;
        }
    }
    assert_eq!(
        opened_at,
        Some(2),
        "opens at the tick after 2 completed seconds"
    );
}

#[test]
fn one_burst_below_the_opening_span_opens_nothing() {
    let mut engine = engine_with(Thresholds::default());
    // Two SYN retransmits in one second, then nothing: 0.67/s over 3 s, below 1/s.
    for i in 0..2u16 {
        engine.observe(
            T0 + u64::from(i) * MS,
            Observation::new(Signal::SynRetransmit, 1).with_flow(flow(9, 40000 + i)),
        );
    }
    for sec in 1..15u64 {
        assert!(engine.tick(T0 + sec * SEC).is_empty());
    }
}

/// `failures` resets received on `connections` connections to peer 7, in the second at `sec`.
fn resets_on_connections(engine: &mut Engine, sec: u64, failures: u16, connections: u64) {
    for i in 0..failures {
        engine.observe(
            T0 + sec * SEC + u64::from(i) * MS,
            Observation::new(Signal::ResetReceived, 1).with_flow(flow(7, 41000 + i)),
        );
    }
    engine.observe_connections(T0 + sec * SEC + 500 * MS, peer_of(7), connections);
}

#[test]
fn every_connection_reset_opens_by_ratio_below_the_rate_threshold() {
    let mut engine = engine_with(quick_thresholds());
    // 2 resets a second (reset_storm opens at 5/s) on 2 connections a second.
    let mut opened = None;
    for sec in 0..5u64 {
        resets_on_connections(&mut engine, sec, 2, 2);
        let events = engine.tick(T0 + (sec + 1) * SEC);
        if let Some(e) = events
            .into_iter()
            .find(|e| e.phase == Phase::Open && e.anomaly.kind == AnomalyKind::ResetStorm)
        {
            opened = Some((sec + 1, e));
            break;
        }
    }
    let Some((at, event)) = opened else {
        panic!("no reset_storm opened");
    };
    // Three seconds: 6 resets (at least ratio_min_count 5) on 6 connections.
    assert_eq!(at, 3);
    assert_eq!(event.anomaly.opened_by, OpenedBy::Ratio);
    assert_eq!(
        event.anomaly.per_connection,
        Some(PerConnection {
            count: 6,
            connections: 6,
            ratio: 1.0,
            open_ratio: 0.5
        })
    );
    // It stays open while every connection still fails, though the rate is under the close
    // threshold (2.5/s); it closes once they stop.
    for sec in 3..20u64 {
        resets_on_connections(&mut engine, sec, 2, 2);
        let events = engine.tick(T0 + (sec + 1) * SEC);
        assert!(
            events.iter().all(|e| e.phase != Phase::Close),
            "closed at {sec}: {events:?}"
        );
    }
    let mut closed = false;
    for sec in 20..80u64 {
        engine.observe_connections(T0 + sec * SEC, peer_of(7), 2);
        if engine
            .tick(T0 + (sec + 1) * SEC)
            .iter()
            .any(|e| e.phase == Phase::Close)
        {
            closed = true;
            break;
        }
    }
    assert!(closed);
}

#[test]
fn one_failure_in_two_connections_is_no_anomaly() {
    let mut engine = engine_with(quick_thresholds());
    // One reset a second on four connections a second for a minute: 1 in 4, under the open
    // ratio of 0.5 (and 1/s, under the open rate).
    for sec in 0..60u64 {
        resets_on_connections(&mut engine, sec, 1, 4);
        assert!(engine.tick(T0 + (sec + 1) * SEC).is_empty(), "at {sec}");
    }
    // Few failures: 4 resets on 4 connections, below the minimum count of 5.
    let mut engine = engine_with(quick_thresholds());
    for sec in 0..4u64 {
        resets_on_connections(&mut engine, sec, 1, 1);
    }
    for sec in 0..60u64 {
        assert!(engine.tick(T0 + (sec + 1) * SEC).is_empty(), "at {sec}");
    }
}

#[test]
fn connections_do_not_create_rows() {
    let mut engine = engine_with(Thresholds::default());
    engine.observe_connections(T0, peer_of(3), 100);
    assert!(!engine.has_peer(&peer_of(3)));
    assert_eq!(engine.stats().peers.rows, 0);
}
