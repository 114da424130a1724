//! Rendering tests on a TestBackend buffer.
use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};

use super::*;
use crate::{
    decode::EventKind,
    top::{
        app::tests::{T0, app_with, event, flow},
        event::Event,
    },
};

fn draw(app: &mut App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("terminal");
    terminal.draw(|f| render(f, app)).expect("draw");
    text(terminal.backend().buffer())
}

fn text(buffer: &Buffer) -> String {
    let area = buffer.area;
    let mut out = String::new();
    for y in 0..area.height {
        for x in 0..area.width {
            out.push_str(buffer[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

#[test]
fn empty_state_renders_at_every_size() {
    for (w, h) in [
        (80, 24),
        (120, 40),
        (200, 60),
        (30, 8),
        (20, 5),
        (1, 1),
        (0, 0),
    ] {
        let mut app = App::new(
            T0,
            None,
            "in-process",
            crate::aggregate::EngineConfig::default(),
        )
        .expect("app");
        let screen = draw(&mut app, w, h);
        if w >= 80 {
            assert!(screen.contains("observer top"), "{w}x{h}:\n{screen}");
            assert!(screen.contains("waiting for records"), "{w}x{h}:\n{screen}");
            assert!(screen.contains("lost 0"), "{w}x{h}:\n{screen}");
            assert!(
                screen.contains("no anomalies reported"),
                "{w}x{h}:\n{screen}"
            );
        }
    }
}

#[test]
fn many_flows_at_80x24_show_the_worst_first_with_every_column() {
    let mut app = app_with(300);
    let screen = draw(&mut app, 80, 24);
    let lines: Vec<&str> = screen.lines().collect();
    assert_eq!(lines.len(), 24);
    // The worst flows retransmit 31 segments/s; 10.200.80.1:40299 is among them.
    let header = lines
        .iter()
        .position(|l| l.contains("Rtx/s"))
        .expect("table header");
    for col in ["SYN", "SYNACK", "Drops", "RST", "Fail", "p50", "p99"] {
        assert!(lines[header].contains(col), "{col}: {}", lines[header]);
    }
    let first = lines[header + 1];
    assert!(first.contains("10.200.80.1:40"), "{first}");
    assert!(first.contains("31.0"), "{first}");
    assert!(screen.contains("300 of 300 rows"), "{screen}");
    assert!(screen.contains("last 60 s of 10.200.80.1:40"), "{screen}");
    assert!(screen.contains("q quit"), "{screen}");
    for line in &lines {
        assert!(line.chars().count() <= 80);
    }
}

#[test]
fn larger_terminals_get_more_rows_and_columns() {
    let mut app = app_with(300);
    let small = draw(&mut app, 80, 24);
    let large = draw(&mut app, 160, 50);
    let rows = |s: &str| s.lines().filter(|l| l.contains("→10.200.80.")).count();
    assert!(rows(&large) > rows(&small) + 10, "{large}");
    assert!(large.contains("Top drop reason"), "{large}");
    assert!(large.contains("Netns"), "{large}");
    assert!(!small.contains("Netns"), "{small}");
}

#[test]
fn tiny_terminals_say_so_and_do_not_panic() {
    let mut app = app_with(10);
    let screen = draw(&mut app, 20, 5);
    assert!(screen.contains("too"), "{screen}");
    for (w, h) in [(1, 1), (29, 40), (200, 7), (30, 8), (31, 9), (40, 17)] {
        draw(&mut app, w, h);
    }
    app.ui.popup = Some(Popup::Details);
    for (w, h) in [(30, 8), (35, 10), (80, 24)] {
        draw(&mut app, w, h);
    }
    app.ui.popup = Some(Popup::Help);
    for (w, h) in [(30, 8), (35, 10), (80, 24)] {
        draw(&mut app, w, h);
    }
}

#[test]
fn long_ipv6_addresses_are_shortened_in_the_middle() {
    let mut app =
        App::new(T0, None, "test", crate::aggregate::EngineConfig::default()).expect("app");
    app.ui.tab = Tab::Flows;
    let mut f = flow(0, true);
    f.saddr = "fd00:1234:5678:9abc:def0:1234:5678:9abc"
        .parse()
        .expect("v6");
    f.daddr = "fd00:aaaa:bbbb:cccc:dddd:eeee:ffff:1111"
        .parse()
        .expect("v6");
    f.sport = 54321;
    for sec in 0..5 {
        let at = T0 + sec * NANOS_PER_SEC;
        for _ in 0..50 {
            app.model.apply(event(EventKind::Retransmit, f, at), at);
        }
    }
    app.handle(Event::Tick, T0 + 6 * NANOS_PER_SEC);
    let screen = draw(&mut app, 80, 24);
    let row = screen
        .lines()
        .find(|l| l.contains("[fd00:1234:"))
        .unwrap_or_else(|| panic!("no row:\n{screen}"));
    // Both ends survive: this host's start and the peer's port.
    assert!(row.contains('…'), "{row}");
    assert!(row.contains("1111]:5001"), "{row}");
    assert!(row.contains("25.0"), "{row}");
    // Wide enough, the whole flow shows.
    let wide = draw(&mut app, 200, 40);
    assert!(
        wide.contains(
            "[fd00:1234:5678:9abc:def0:1234:5678:9abc]:54321→[fd00:aaaa:bbbb:cccc:dddd:eeee:ffff:1111]:5001"
        ),
        "{wide}"
    );
    // Peers tab.
    app.set_tab(Tab::Peers);
    let peers = draw(&mut app, 80, 24);
    assert!(
        peers.contains("fd00:aaaa:bbbb:cccc:dddd:eeee:ffff:1111"),
        "{peers}"
    );
}

#[test]
fn help_screen_lists_the_keys() {
    let mut app = app_with(3);
    app.ui.popup = Some(Popup::Help);
    let screen = draw(&mut app, 80, 24);
    for text in ["keys", "quit", "filter", "pause", "sort", "details", "Tab"] {
        assert!(screen.contains(text), "{text}:\n{screen}");
    }
}

#[test]
fn details_show_every_signal_of_the_row() {
    let mut app = app_with(3);
    let at = T0 + 19 * NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::Drop, flow(2, false), at), at);
    app.handle(Event::Tick, T0 + 20 * NANOS_PER_SEC);
    app.ui.popup = Some(Popup::Details);
    let screen = draw(&mut app, 120, 40);
    for text in [
        "flow 10.200.80.1:40002→10.200.80.4:5001",
        "retransmit",
        "packet_drop",
        "drop reasons: NO_SOCKET 1",
        "last 60 s:",
    ] {
        assert!(screen.contains(text), "{text}:\n{screen}");
    }
}

#[test]
fn header_shows_lost_in_red_and_the_panes_their_records() {
    use crate::top::wire::{Record, SysctlChangeIn};
    let mut app = app_with(2);
    app.model.apply(Record::Lost { count: 7 }, T0);
    app.model.apply(
        Record::SysctlChange(SysctlChangeIn {
            time: String::new(),
            netns: 4026532000,
            name: "net.ipv4.tcp_sack".into(),
            old: "1".into(),
            new: "0".into(),
        }),
        T0 + 19 * NANOS_PER_SEC,
    );
    let at = T0 + 19 * NANOS_PER_SEC;
    app.model
        .apply(event(EventKind::Drop, flow(0, false), at), at);
    app.handle(Event::Tick, T0 + 20 * NANOS_PER_SEC);
    let mut terminal = Terminal::new(TestBackend::new(100, 30)).expect("terminal");
    terminal.draw(|f| render(f, &mut app)).expect("draw");
    let buffer = terminal.backend().buffer().clone();
    let screen = text(&buffer);
    let (x, y) = screen
        .lines()
        .enumerate()
        .find_map(|(y, l)| l.find("lost 7").map(|x| (x, y)))
        .unwrap_or_else(|| panic!("no lost count:\n{screen}"));
    assert_eq!(buffer[(x as u16, y as u16)].bg, Color::Red);
    assert!(screen.contains("ipv4.tcp_sack 1→0"), "{screen}");
    assert!(screen.contains("NO_SOCKET 1/1"), "{screen}");
    assert!(screen.contains("events/s retransmit"), "{screen}");
}

#[test]
fn the_selected_row_stays_on_screen_when_scrolling() {
    let mut app = app_with(300);
    for target in [250usize, 299, 120, 0] {
        app.select(target);
        let label = app.view.rows[target].label.clone();
        let screen = draw(&mut app, 80, 24);
        assert!(
            screen.contains(&label),
            "row {target} ({label}) not shown:\n{screen}"
        );
    }
}

#[test]
fn findings_show_first_with_severity_cause_and_details() {
    use crate::top::app::tests::anomaly_line;
    let mut app =
        App::new(T0, None, "test", crate::aggregate::EngineConfig::default()).expect("app");
    let screen = draw(&mut app, 80, 24);
    assert!(
        screen.contains(" Findings  Flows  Peers  Listeners"),
        "{screen}"
    );
    assert!(screen.contains("waiting for records"), "{screen}");
    let cause = r#","cause":{"kind":"netfilter_rule","summary":"firewall rule `tcp dport 80 counter drop` (ip filter INPUT, handle 4) in netns web dropped 35 SYNs between 10.200.1.1 and 10.200.1.2","evidence":{"netns":4026532178,"rule_packets":35,"syns_dropped":35}},"per_connection":{"count":35,"connections":35,"ratio":1.0,"open_ratio":0.5}"#;
    app.model
        .apply(anomaly_line("open", 2, "connect_trouble", 1, cause), T0);
    app.model
        .apply(anomaly_line("open", 1, "peer_retransmit_spike", 0, ""), T0);
    app.model.apply(
        anomaly_line(
            "close",
            1,
            "peer_retransmit_spike",
            5,
            r#","close_reason":"subsided""#,
        ),
        T0,
    );
    app.model
        .learn_netns_names([(4026532177, "client".to_owned())]);
    app.handle(Event::Tick, T0 + 6 * NANOS_PER_SEC);
    let mut terminal = Terminal::new(TestBackend::new(80, 24)).expect("terminal");
    terminal.draw(|f| render(f, &mut app)).expect("draw");
    let buffer = terminal.backend().buffer().clone();
    let screen = text(&buffer);
    let lines: Vec<&str> = screen.lines().collect();
    let first = lines
        .iter()
        .position(|l| l.starts_with("CRIT"))
        .unwrap_or_else(|| panic!("no critical finding:\n{screen}"));
    assert!(
        lines[first].contains("connect_trouble 1.0/s 1.00/conn peer 10.200.1.2 · netns"),
        "{screen}"
    );
    let wide = draw(&mut app, 120, 30);
    assert!(
        wide.contains("connect_trouble 1.0/s 1.00/conn peer 10.200.1.2 · netns client"),
        "{wide}"
    );
    assert!(
        lines[first + 1].contains("↳ firewall rule `tcp dport 80"),
        "{screen}"
    );
    // The closed one comes after, dimmed, with its reason.
    let closed = lines
        .iter()
        .position(|l| l.contains("closed (subsided)"))
        .unwrap_or_else(|| panic!("no closed finding:\n{screen}"));
    assert!(closed > first + 1);
    assert!(lines[closed].starts_with("WARN"), "{screen}");
    assert_eq!(buffer[(0, closed as u16)].fg, Color::DarkGray);
    assert_eq!(buffer[(0, first as u16)].fg, Color::Red);
    assert!(
        lines[closed + 1].contains("cause not known yet"),
        "{screen}"
    );
    // The strip below names the severity's reason and the whole cause.
    assert!(
        screen.contains("critical · 35 over 35 connections: 1.00 per connection"),
        "{screen}"
    );
    assert!(screen.contains("anomalies 1 open, 1 critical"), "{screen}");
    for line in &lines {
        assert!(line.chars().count() <= 80);
    }
    // Details of the selected finding: the full summary, counts, per connection, evidence.
    app.ui.popup = Some(Popup::Details);
    let details = draw(&mut app, 100, 40);
    for text in [
        "connect_trouble · peer 10.200.1.2 · netns client",
        "severity critical",
        "opened 03:26:41 by rate",
        "known when it opened",
        "counts: 1 s 1 · 10 s 10 · 60 s 10",
        "per connection: 35 over 35 connections in 60 s = 1.00 (opens at 0.50)",
        "cause: netfilter_rule",
        "and 10.200.1.2",
        "rule_packets: 35",
        "syns_dropped: 35",
    ] {
        assert!(details.contains(text), "{text}:\n{details}");
    }
    // Tiny terminals and popups do not panic.
    for (w, h) in [(30, 8), (35, 10), (50, 12), (200, 60)] {
        draw(&mut app, w, h);
    }
}
