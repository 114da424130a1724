//! The sparkline of the selected row and the panes: drops and rules, sysctls, anomalies.
use super::*;

pub(super) fn render_sparkline(frame: &mut Frame, area: Rect, app: &App) {
    let Some(row) = app.selected_row() else {
        frame.render_widget(
            Paragraph::new(Span::styled("── select a row for its last minute", dim())),
            area,
        );
        return;
    };
    let width = usize::from(area.width);
    let max = row.sparkline.iter().copied().max().unwrap_or(0);
    let title = format!(
        " last 60 s of {}: trouble/s, max {} (now at the right) ",
        row.label,
        fmt_count(max)
    );
    let block = Block::default()
        .borders(Borders::TOP)
        .border_style(dim())
        .title(Span::styled(
            ellipsize(&title, width.saturating_sub(2)),
            bold(),
        ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    // Now at the right edge: the minute takes the right-hand columns.
    let shown = usize::from(inner.width).min(row.sparkline.len());
    let data: Vec<u64> = row
        .sparkline
        .iter()
        .skip(row.sparkline.len() - shown)
        .copied()
        .collect();
    let shown = u16::try_from(shown).unwrap_or(inner.width);
    let spark_area = Rect {
        x: inner.x + inner.width.saturating_sub(shown),
        width: shown,
        ..inner
    };
    let sparkline = Sparkline::default()
        .data(&data)
        .max(max.max(1))
        .style(Style::default().fg(Color::Red));
    frame.render_widget(sparkline, spark_area);
}

// ---------------------------------------------------------------------------------------------
// Panes: drops and rules, sysctls, anomalies

pub(super) fn render_panes(frame: &mut Frame, area: Rect, app: &App) {
    if area.width >= 72 {
        let [drops, sysctls, anomalies] = Layout::horizontal([
            Constraint::Percentage(30),
            Constraint::Percentage(30),
            Constraint::Percentage(40),
        ])
        .areas(area);
        render_drops(frame, drops, app);
        render_sysctls(frame, sysctls, app);
        render_anomalies(frame, anomalies, app);
    } else {
        render_anomalies(frame, area, app);
    }
}

pub(super) fn pane(title: String) -> Block<'static> {
    Block::bordered()
        .border_style(dim())
        .title(Span::styled(title, bold()))
}

pub(super) fn render_drops(frame: &mut Frame, area: Rect, app: &App) {
    let inner = usize::from(area.width.saturating_sub(2));
    let now = app.model.now_ns();
    let mut lines = Vec::new();
    for (reason, last_60s, total) in app.model.reason_counts(now) {
        let counts = format!(" {}/{}", fmt_count(last_60s), fmt_count(total));
        let name = ellipsize(&reason, inner.saturating_sub(counts.len()));
        let style = if last_60s > 0 {
            Style::default().fg(Color::Yellow)
        } else {
            Style::default()
        };
        lines.push(Line::from(vec![
            Span::styled(name, style),
            Span::styled(counts, dim()),
        ]));
    }
    if lines.is_empty() {
        lines.push(Line::from(Span::styled("no drops", dim())));
    }
    if !app.model.rules.is_empty() {
        lines.push(Line::from(Span::styled("rules that dropped:", bold())));
        for rule in &app.model.rules {
            let mark = if rule.exact { "" } else { "? " };
            let text = format!(
                "{mark}{}/{} #{} {} pkts: {}",
                rule.table,
                rule.chain,
                rule.handle,
                fmt_count(rule.packets),
                rule.rule
            );
            lines.push(Line::from(ellipsize(&text, inner)));
        }
    }
    frame.render_widget(
        Paragraph::new(lines).block(pane(" drops 60s/total · rules ".to_owned())),
        area,
    );
}

pub(super) fn render_sysctls(frame: &mut Frame, area: Rect, app: &App) {
    let inner = usize::from(area.width.saturating_sub(2));
    let now = app.model.now_ns();
    let Some(netns) = app.panel_netns() else {
        frame.render_widget(
            Paragraph::new(Span::styled("no namespace selected", dim()))
                .block(pane(" sysctls ".to_owned())),
            area,
        );
        return;
    };
    let host = app.model.host_netns == Some(netns);
    let title = format!(
        " sysctls · netns {}{} ",
        app.model.netns_label(netns),
        if host { " (host)" } else { "" }
    );
    let (values, changes) = app.model.sysctls_of(netns);
    let short = |name: &str| name.strip_prefix("net.").unwrap_or(name).to_owned();
    let mut lines = Vec::new();
    for change in &changes {
        let recent = now.saturating_sub(change.time_ns) < RECENT_CHANGE_NS;
        let style = if recent {
            bold().fg(Color::Black).bg(Color::Yellow)
        } else {
            Style::default().fg(Color::Yellow)
        };
        let text = format!(
            "{} {}→{} {}",
            short(&change.name),
            change.old,
            change.new,
            fmt_clock(change.time_ns)
        );
        lines.push(Line::from(Span::styled(ellipsize(&text, inner), style)));
    }
    if let Some(values) = values {
        for (name, value) in values {
            if changes.iter().any(|c| &c.name == name) {
                continue;
            }
            let text = format!("{} = {value}", short(name));
            lines.push(Line::from(ellipsize(&text, inner)));
        }
    }
    if lines.is_empty() {
        lines.push(Line::from(Span::styled(
            "not known yet: the host's come with `start`, other namespaces' with anomalies",
            dim(),
        )));
    }
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(pane(title)),
        area,
    );
}

pub(super) fn render_anomalies(frame: &mut Frame, area: Rect, app: &App) {
    let inner = usize::from(area.width.saturating_sub(2));
    let rows = usize::from(area.height.saturating_sub(2));
    let mut lines = Vec::new();
    for entry in app.model.anomaly_log.iter().take(rows) {
        let (phase_style, phase) = match entry.phase {
            AnomalyPhase::Open => (bold().fg(Color::Red), "open  "),
            AnomalyPhase::Update => (Style::default().fg(Color::Yellow), "update"),
            AnomalyPhase::Close => (Style::default().fg(Color::Green), "close "),
        };
        let rest = format!(
            " {} {} {}/s",
            entry.kind,
            scoped_label(&entry.key),
            fmt_rate(entry.rate_per_sec)
        );
        let clock = format!("{} ", fmt_clock(entry.time_ns));
        let room = inner.saturating_sub(clock.len() + phase.len());
        lines.push(Line::from(vec![
            Span::styled(clock, dim()),
            Span::styled(phase, phase_style),
            Span::raw(ellipsize(&rest, room)),
        ]));
    }
    if lines.is_empty() {
        lines.push(Line::from(Span::styled("no anomalies reported", dim())));
    }
    let title = format!(
        " anomalies · {} open · newest first ",
        app.model.open_anomalies.len()
    );
    frame.render_widget(Paragraph::new(lines).block(pane(title)), area);
}
