//! Windows over the screen: help and details.
use super::*;

/// A rectangle of at most `width` x `height` centered in `area`.
pub(super) fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    }
}

/// The help text (also shown by `observer top --help`'s long description).
pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓  j k", "select a row (PgUp PgDn Home End too)"),
    (
        "Tab",
        "findings → flows → peers → listeners (Shift-Tab back)",
    ),
    ("s  S", "next / previous sort column (default: severity)"),
    (
        "/",
        "filter by address, port, drop reason, anomaly, cause or netns",
    ),
    ("Esc", "clear the filter, close a window"),
    ("p", "pause the display (data keeps coming)"),
    ("Enter", "details of the selected finding or row"),
    ("?", "this help"),
    ("q  Ctrl-C", "quit"),
];

pub(super) fn render_help(frame: &mut Frame, area: Rect) {
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(key, what)| {
            Line::from(vec![
                Span::styled(format!("{key:<11}"), bold().fg(Color::Cyan)),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    for text in [
        "Rtx/s: retransmitted segments per second over 10 s. SYN, SYNACK, Drops, RST",
        "(resets sent + received), Fail (connects refused or timed out): counts over 60 s.",
        "p50/p99: connect latency of the peer (last 256 connects). Sev: 10 s rate over the",
        "anomaly threshold (1.0 = opens). ! and red: an anomaly is open on the row.",
    ] {
        lines.push(Line::from(Span::styled(text, dim())));
    }
    let popup = centered(area, 88, lines.len() as u16 + 2);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(Span::styled(" observer top · keys ", bold()))),
        popup,
    );
}

pub(super) fn render_details(frame: &mut Frame, area: Rect, app: &App) {
    if let Some(finding) = app.selected_finding() {
        let lines = finding_detail_lines(app, finding);
        render_window(frame, area, " finding ", lines);
        return;
    }
    let Some(row) = app.selected_row() else {
        return;
    };
    let mut lines = vec![
        Line::from(Span::styled(scoped_label(&row.key), bold())),
        Line::from(format!(
            "netns {} · first seen {} · last seen {} · severity {:.2}",
            row.netns,
            fmt_clock(row.first_seen_ns),
            fmt_clock(row.last_seen_ns),
            row.severity
        )),
    ];
    if let RowKey::Flow(flow) = &row.key {
        let family = match flow.family {
            crate::decode::Family::Ipv4 => "ipv4",
            crate::decode::Family::Ipv6 => "ipv6",
        };
        lines.push(Line::from(format!(
            "{family} · this host {} · peer {}",
            crate::top::app::endpoint(flow.saddr, flow.sport),
            crate::top::app::endpoint(flow.daddr, flow.dport)
        )));
    }
    if !row.anomalies.is_empty() {
        lines.push(Line::from(Span::styled(
            format!("open anomalies: {}", row.anomalies.join(", ")),
            bold().fg(Color::Red),
        )));
    }
    lines.push(Line::from(Span::styled(
        "signal               1 s   10 s   60 s   total   baseline/s",
        bold(),
    )));
    for signal in &row.signals {
        lines.push(Line::from(format!(
            "{:<18} {:>5} {:>6} {:>6} {:>7}   {:.2}",
            signal.signal.name(),
            fmt_count(signal.counts.get(Window::Last1s)),
            fmt_count(signal.counts.get(Window::Last10s)),
            fmt_count(signal.counts.get(Window::Last60s)),
            fmt_count(signal.total),
            signal.baseline_per_sec
        )));
    }
    if !row.reasons.is_empty() {
        let reasons: Vec<String> = row
            .reasons
            .iter()
            .map(|(r, n)| format!("{r} {}", fmt_count(*n)))
            .collect();
        lines.push(Line::from(format!("drop reasons: {}", reasons.join(", "))));
    }
    if let Some(owner) = &row.owner {
        lines.push(Line::from(format!("process: {owner}")));
    }
    if let Some(service) = &row.service {
        lines.push(Line::from(service_line(service)));
    }
    if let Some(latency) = row.latency {
        lines.push(Line::from(format!(
            "connect latency (peer): p50 {} ms · p99 {} ms · {} connects",
            fmt_ms(latency.p50_ms),
            fmt_ms(latency.p99_ms),
            latency.samples
        )));
    }
    if let Some(q) = &row.queue {
        lines.push(Line::from(format!(
            "queues at the last drop: accept {} of {} · SYN {} · totals: {} overflows, {} SYN-queue drops, {} other",
            q.accept_queue,
            q.backlog_limit,
            q.syn_queue,
            q.overflows_total,
            q.syn_queue_drops_total,
            q.other_drops_total
        )));
    }
    let spark: String = row
        .sparkline
        .iter()
        .map(|&n| match n {
            0 => '·',
            1..=9 => '▂',
            10..=99 => '▄',
            100..=999 => '▆',
            _ => '█',
        })
        .collect();
    lines.push(Line::from(format!("last 60 s: {spark}")));
    lines.push(Line::from(Span::styled("Esc or Enter closes", dim())));
    render_window(frame, area, " details ", lines);
}

/// A bordered window of at most 100 columns, as tall as its wrapped lines.
fn render_window(frame: &mut Frame, area: Rect, title: &'static str, lines: Vec<Line<'static>>) {
    let inner = usize::from(area.width.min(100).saturating_sub(2)).max(1);
    let rows: usize = lines.iter().map(|l| l.width().div_ceil(inner).max(1)).sum();
    let height = u16::try_from(rows + 2).unwrap_or(u16::MAX);
    let popup = centered(area, 100, height);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(Span::styled(title, bold()))),
        popup,
    );
}

/// The detail line of a socket owner's service: unit, container, pod and cgroup path.
pub(super) fn service_line(service: &Service) -> String {
    let mut parts = Vec::new();
    if let Some(unit) = &service.unit {
        parts.push(format!("unit {unit}"));
    }
    if let Some(id) = &service.container_id {
        let runtime = service.container_runtime.as_deref().unwrap_or("container");
        parts.push(format!("{runtime} {}", id.get(..12).unwrap_or(id)));
    }
    if let Some(uid) = &service.pod_uid {
        parts.push(format!("pod {uid}"));
    }
    parts.push(format!("cgroup {}", service.cgroup));
    format!("service: {}", parts.join(" · "))
}
