//! Unit tests of the model and the view.
use super::*;
use crate::top::wire::{AnomalyDetail, AnomalyIn, ReconciledIn, SysctlChangeIn};

pub(crate) const T0: u64 = 1_763_782_000_000_000_000;

pub(crate) fn flow(i: u16, v6: bool) -> Flow {
    let (saddr, daddr) = if v6 {
        (
            IpAddr::from([0xfd00, 0x200, 0x50, 0, 0, 0, 0, 1]),
            IpAddr::from([0xfd00, 0x200, 0x50, 0, 0, 0, 0, 2 + i]),
        )
    } else {
        (
            IpAddr::from([10, 200, 80, 1]),
            IpAddr::from([10, 200, 80, u8::try_from(2 + i % 200).unwrap_or(2)]),
        )
    };
    Flow {
        family: if v6 {
            crate::decode::Family::Ipv6
        } else {
            crate::decode::Family::Ipv4
        },
        saddr,
        sport: 40000 + i,
        daddr,
        dport: 5001,
        netns: 4026532000,
    }
}

pub(crate) fn event(kind: EventKind, flow: Flow, at: u64) -> Record {
    Record::Event(EventIn {
        kind,
        time_ns: Some(at),
        flow,
        counted_flow: flow,
        segs: 1,
        reason: (kind == EventKind::Drop).then(|| "NO_SOCKET".to_owned()),
        outcome: (kind == EventKind::ConnectFailed).then(|| "refused".to_owned()),
        duration_ms: (kind == EventKind::Connect).then_some(2.5),
        owner: None,
        flow_count: 0,
    })
}

/// An app with `flows` flows, flow i retransmitting i+1 segments per second for 20 s.
pub(crate) fn app_with(flows: u16) -> App {
    let mut app = App::new(T0, Some(4026531840), "test", EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    for sec in 0..20u64 {
        let at = T0 + sec * NANOS_PER_SEC;
        for i in 0..flows {
            for _ in 0..=i.min(30) {
                app.model
                    .apply(event(EventKind::Retransmit, flow(i, false), at), at);
            }
        }
    }
    app.handle(Event::Tick, T0 + 20 * NANOS_PER_SEC);
    app
}

#[test]
fn rows_rank_by_severity_and_count_rates() {
    let app = app_with(5);
    assert_eq!(app.view.rows.len(), 5);
    let top = &app.view.rows[0];
    assert_eq!(top.key, RowKey::Flow(flow(4, false)));
    assert_eq!(top.retransmits_per_sec, 5.0);
    assert_eq!(top.label, "10.200.80.1:40004→10.200.80.6:5001");
    assert!(top.severity > app.view.rows[1].severity);
    // The sparkline counts each second.
    assert_eq!(top.sparkline.len(), SPARK_SECS);
    assert_eq!(top.sparkline.last(), Some(&5));
    assert_eq!(app.selected_row().map(|r| &r.key), Some(&top.key));
}

#[test]
fn sorting_cycles_and_orders_by_the_column() {
    let mut app = app_with(3);
    // After the tick at 20 s: counted in second 20, complete at 21 s.
    let at = T0 + 20 * NANOS_PER_SEC;
    for _ in 0..7 {
        app.model
            .apply(event(EventKind::Drop, flow(0, false), at), at);
    }
    app.handle(Event::Tick, T0 + 21 * NANOS_PER_SEC);
    assert_eq!(app.ui.sort, SortColumn::Severity);
    app.cycle_sort(false);
    assert_eq!(app.ui.sort, SortColumn::Retransmits);
    assert_eq!(app.view.rows[0].key, RowKey::Flow(flow(2, false)));
    while app.ui.sort != SortColumn::Drops {
        app.cycle_sort(false);
    }
    assert_eq!(app.view.rows[0].key, RowKey::Flow(flow(0, false)));
    assert_eq!(app.view.rows[0].drops, 7);
    assert_eq!(app.view.rows[0].reasons, [("NO_SOCKET".to_owned(), 7)]);
    // Backwards from the first column wraps to the last.
    app.ui.sort = SortColumn::Severity;
    app.cycle_sort(true);
    assert_eq!(app.ui.sort, SortColumn::LastSeen);
    // A column the listeners tab lacks falls back to severity there.
    app.ui.sort = SortColumn::Drops;
    app.set_tab(Tab::Listeners);
    assert_eq!(app.ui.sort, SortColumn::Severity);
}

#[test]
fn filters_match_addresses_ports_and_reasons() {
    let mut app = app_with(4);
    app.set_filter("10.200.80.3".to_owned());
    assert_eq!(app.view.rows.len(), 1);
    assert_eq!(app.view.rows[0].key, RowKey::Flow(flow(1, false)));
    app.set_filter("40002".to_owned());
    assert_eq!(app.view.rows.len(), 1);
    app.set_filter(":5001".to_owned());
    assert_eq!(app.view.rows.len(), 4);
    app.set_filter("no_socket".to_owned());
    assert!(app.view.rows.is_empty());
    assert_eq!(app.ui.table.selected(), None);
    let at = T0 + 19 * NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::Drop, flow(3, false), at), at);
    app.refresh();
    assert_eq!(app.view.rows.len(), 1);
    app.set_filter(String::new());
    assert_eq!(app.view.rows.len(), 4);
}

#[test]
fn selection_follows_its_row_and_pause_freezes() {
    let mut app = app_with(3);
    // Untouched, the selection stays on the top row whatever ranks first.
    let top = app.view.rows[0].key.clone();
    let at = T0 + 20 * NANOS_PER_SEC;
    for _ in 0..100 {
        app.model
            .apply(event(EventKind::Retransmit, flow(8, false), at), at);
    }
    app.handle(Event::Tick, T0 + 21 * NANOS_PER_SEC);
    assert_eq!(app.view.rows[0].key, RowKey::Flow(flow(8, false)));
    assert_ne!(top, app.view.rows[0].key);
    assert_eq!(app.ui.table.selected(), Some(0));
    // Moved by the user, it follows its row: another flow overtakes.
    app.select_by_user(2);
    let key = app.view.rows[2].key.clone();
    let at = T0 + 21 * NANOS_PER_SEC;
    for _ in 0..200 {
        app.model
            .apply(event(EventKind::Retransmit, flow(7, false), at), at);
    }
    app.handle(Event::Tick, T0 + 22 * NANOS_PER_SEC);
    assert_eq!(app.view.rows.len(), 5);
    assert_eq!(app.view.rows[0].key, RowKey::Flow(flow(7, false)));
    assert_eq!(app.ui.table.selected(), Some(3));
    assert_eq!(app.selected_row().map(|r| &r.key), Some(&key));
    // Paused: ticks do not change what is shown.
    app.ui.paused = true;
    let shown = app.view.rows.clone();
    let at = T0 + 22 * NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::Retransmit, flow(9, false), at), at);
    app.handle(Event::Tick, T0 + 23 * NANOS_PER_SEC);
    assert_eq!(app.view.rows, shown);
}

#[test]
fn connect_latencies_are_per_peer() {
    let mut app = App::new(T0, None, "test", EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    for (i, ms) in [1.0, 2.0, 3.0, 4.0, 100.0].into_iter().enumerate() {
        let at = T0 + i as u64 * NANOS_PER_SEC;
        let mut record = event(EventKind::Connect, flow(0, false), at);
        if let Record::Event(e) = &mut record {
            e.duration_ms = Some(ms);
        }
        app.model.apply(record, at);
    }
    // The peer needs some trouble to have a row.
    let at = T0 + 5 * NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::ConnectFailed, flow(0, false), at), at);
    app.set_tab(Tab::Peers);
    app.handle(Event::Tick, T0 + 7 * NANOS_PER_SEC);
    let row = &app.view.rows[0];
    assert_eq!(row.failed_connects, 1);
    assert_eq!(
        row.latency,
        Some(Latency {
            p50_ms: 3.0,
            p99_ms: 100.0,
            samples: 5
        })
    );
}

#[test]
fn anomalies_sysctls_and_counters_come_from_their_records() {
    let mut app = App::new(T0, Some(1), "test", EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    app.model.apply(
        Record::Start(Start {
            host: "web-1".into(),
            time: "2025-11-22T03:26:40.000000000Z".into(),
            sysctls: [("net.ipv4.tcp_sack".to_owned(), "1".to_owned())].into(),
            ..Start::default()
        }),
        T0,
    );
    assert_eq!(app.model.uptime_ns(T0 + 5), 5);
    let key = RowKey::Flow(flow(0, false));
    let anomaly = |phase, id| {
        Record::Anomaly(AnomalyIn {
            phase,
            time_ns: Some(T0),
            id,
            kind: "flow_retransmit_spike".into(),
            key: key.clone(),
            rate_per_sec: 12.0,
            peak_rate_per_sec: 12.0,
            reasons: Vec::new(),
            close_reason: None,
            netns: Some(4026532000),
            sysctls: [("net.ipv4.tcp_sack".to_owned(), "0".to_owned())].into(),
            detail: AnomalyDetail::default(),
        })
    };
    app.model.apply(anomaly(AnomalyPhase::Open, 1), T0);
    app.model.apply(anomaly(AnomalyPhase::Open, 2), T0);
    app.model.apply(anomaly(AnomalyPhase::Close, 1), T0);
    assert_eq!(app.model.open_anomalies.len(), 1);
    assert_eq!(app.model.anomaly_log.len(), 3);
    assert_eq!(app.model.anomaly_log[0].phase, AnomalyPhase::Close);
    app.model.apply(
        Record::SysctlChange(SysctlChangeIn {
            time: String::new(),
            netns: 1,
            name: "net.ipv4.tcp_sack".into(),
            old: "1".into(),
            new: "0".into(),
        }),
        T0 + 1,
    );
    let (values, changes) = app.model.sysctls_of(1);
    assert_eq!(values.map(|v| v["net.ipv4.tcp_sack"].as_str()), Some("0"));
    assert_eq!(changes.len(), 1);
    assert_eq!(app.model.sysctls_of(4026532000).0.map(|v| v.len()), Some(1));
    app.model.apply(Record::Lost { count: 3 }, T0);
    app.model.apply(Record::Undelivered { count: 4 }, T0);
    assert_eq!((app.model.lost, app.model.undelivered), (3, 4));
    // The row carries its open anomaly.
    let at = T0 + NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::Retransmit, flow(0, false), at), at);
    app.handle(Event::Tick, T0 + 2 * NANOS_PER_SEC);
    assert_eq!(app.view.rows[0].anomalies, ["flow_retransmit_spike"]);
}

#[test]
fn reconciled_counts_add_to_the_exemplars() {
    let mut app = App::new(T0, None, "test", EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    let at = T0 + NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::Retransmit, flow(0, false), at), at);
    app.model.apply(
        Record::Reconciled(vec![ReconciledIn {
            observation: Observation::new(Signal::Retransmit, 99).with_flow(flow(0, false)),
            through: 0,
        }]),
        at,
    );
    app.handle(Event::Tick, T0 + 2 * NANOS_PER_SEC);
    assert_eq!(app.view.rows.len(), 1);
    assert_eq!(app.view.rows[0].retransmits_per_sec, 10.0);
    assert_eq!(app.view.rows[0].sparkline.last(), Some(&100));
}

#[test]
fn events_a_reconciled_record_counted_are_not_counted_again() {
    let mut app = App::new(T0, None, "test", EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    let at = T0 + NANOS_PER_SEC;
    let counted = |flow_count| {
        let Record::Event(mut e) = event(EventKind::Retransmit, flow(0, false), at) else {
            unreachable!("an event");
        };
        e.flow_count = flow_count;
        Record::Event(e)
    };
    app.model.apply(
        Record::Reconciled(vec![ReconciledIn {
            observation: Observation::new(Signal::Retransmit, 10).with_flow(flow(0, false)),
            through: 10,
        }]),
        at,
    );
    // On its way while the daemon's pass read the kernel's total: in the 10 already.
    app.model.apply(counted(10), at);
    // Counted after the pass.
    app.model.apply(counted(11), at);
    app.handle(Event::Tick, T0 + 2 * NANOS_PER_SEC);
    assert_eq!(app.view.rows[0].sparkline.last(), Some(&11));
}

#[test]
fn event_rates_are_measured_per_tick() {
    let mut app = App::new(T0, None, "test", EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    for _ in 0..30 {
        app.model
            .apply(event(EventKind::Retransmit, flow(0, false), T0), T0);
    }
    app.model
        .apply(event(EventKind::Connect, flow(1, false), T0), T0);
    app.handle(Event::Tick, T0 + 2 * NANOS_PER_SEC);
    assert_eq!(
        app.model.event_rates(),
        [("retransmit", 15.0), ("connect", 0.5)]
    );
    app.handle(Event::Tick, T0 + 3 * NANOS_PER_SEC);
    assert_eq!(app.model.event_rates()[0], ("connect", 0.0));
}

#[test]
fn the_second_ring_keeps_a_minute() {
    let mut ring = SecondRing::new(100);
    ring.add(100, 3);
    ring.add(130, 2);
    ring.add(131, 1);
    let series = ring.series(132);
    assert_eq!(series.len(), SPARK_SECS);
    assert_eq!(series[SPARK_SECS - 1], 1);
    assert_eq!(series[SPARK_SECS - 2], 2);
    assert_eq!(series[SPARK_SECS - 32], 3);
    assert_eq!(ring.sum_last(132, 60), 6);
    // Long after: empty; a very old second is ignored.
    assert_eq!(ring.sum_last(1000, 60), 0);
    ring.add(5, 9);
    assert_eq!(ring.sum_last(132, 60), 6);
}

/// An anomaly record as the daemon writes it, `extra` fields spliced in.
pub(crate) fn anomaly_line(phase: &str, id: u64, kind: &str, secs: u64, extra: &str) -> Record {
    let time = crate::clock::rfc3339_unix_ns(i128::from(T0 + secs * NANOS_PER_SEC));
    let line = format!(
        r#"{{"type":"anomaly_{phase}","time":"{time}","id":{id},"kind":"{kind}","key":{{"scope":"peer","netns":4026532177,"addr":"10.200.1.{id}"}},"signals":["connect_refused"],"counts":{{"last_1s":1,"last_10s":10,"last_60s":10}},"rate_per_sec":1.0,"peak_rate_per_sec":1.0,"lifetime_count":10,"baseline_per_sec":0.0,"open_threshold_per_sec":1.0,"close_threshold_per_sec":0.5,"first_seen_ns":1,"last_seen_ns":2,"opened_ns":2,"exemplar_flows":[],"context":{{"netns":4026532177,"sysctls":{{}},"counters_60s":{{}}}}{extra}}}"#
    );
    crate::top::wire::parse_line(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn findings_are_the_default_view_ordered_filtered_and_selectable() {
    let mut app = App::new(T0, None, "test", EngineConfig::default()).expect("app");
    assert_eq!(app.ui.tab, Tab::Findings);
    let cause = r#","cause":{"kind":"no_listener","summary":"nothing listens on 10.200.1.2:80 in netns web","evidence":{"netns":1}}"#;
    app.model
        .apply(anomaly_line("open", 1, "failed_connects", 1, ""), T0);
    app.model
        .apply(anomaly_line("open", 2, "failed_connects", 2, cause), T0);
    // Critical by ratio: every connection failed.
    let ratio = r#","per_connection":{"count":10,"connections":10,"ratio":1.0,"open_ratio":0.5}"#;
    app.model
        .apply(anomaly_line("update", 1, "failed_connects", 3, ratio), T0);
    app.handle(Event::Tick, T0 + 4 * NANOS_PER_SEC);
    let ids: Vec<u64> = app.view.findings.iter().map(|f| f.id).collect();
    assert_eq!(ids, [1, 2], "the critical one first");
    assert_eq!(app.view.table_len, 2);
    assert_eq!(app.selected_finding().map(|f| f.id), Some(1));
    assert!(app.has_selection());
    assert_eq!(app.selected_row(), None);
    assert_eq!(app.panel_netns(), Some(4026532177));
    // Moved by the user, the selection follows its finding.
    app.select_by_user(1);
    app.model
        .apply(anomaly_line("open", 3, "failed_connects", 5, ratio), T0);
    app.handle(Event::Tick, T0 + 6 * NANOS_PER_SEC);
    assert_eq!(app.selected_finding().map(|f| f.id), Some(2));
    // The filter sees causes.
    app.set_filter("nothing listens".to_owned());
    assert_eq!(app.view.findings.len(), 1);
    app.set_filter("critical".to_owned());
    assert_eq!(app.view.findings.len(), 2);
    app.set_filter(String::new());
    // Names of namespaces: live names show where records gave none.
    app.model
        .learn_netns_names([(4026532177, "client".to_owned())]);
    assert_eq!(app.model.netns_label(4026532177), "client (4026532177)");
    app.set_filter("client".to_owned());
    assert_eq!(app.view.findings.len(), 3);
    // Tab goes on to the tables and back.
    app.set_tab(app.ui.tab.previous());
    assert_eq!(app.ui.tab, Tab::Listeners);
    app.set_tab(Tab::Flows);
    assert_eq!(app.selected_finding(), None);
}
