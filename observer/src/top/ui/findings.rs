//! The Findings view: the daemon's anomalies, two lines each (what, where, how bad; then the
//! cause), the selected one's full cause below, and its details in a window.
use super::*;
use crate::top::findings::{Finding, Severity};

/// Lines per finding in the list.
const LINES_PER_FINDING: usize = 2;

fn severity_style(finding: &Finding) -> Style {
    if !finding.is_open() {
        return dim();
    }
    match finding.severity() {
        Severity::Critical => bold().fg(Color::Red),
        Severity::Warning => Style::default().fg(Color::Yellow),
    }
}

/// `peer 10.200.1.2 · netns web`, the namespace by name where one is known.
pub(super) fn finding_place(app: &App, finding: &Finding) -> String {
    let name = finding.netns_name.clone().or_else(|| {
        app.model
            .netns_names
            .get(&u64::from(finding.netns))
            .cloned()
    });
    let netns = match name {
        Some(name) => format!("netns {name}"),
        None if finding.netns == 0 => String::new(),
        None => format!("netns {}", finding.netns),
    };
    let key = scoped_label(&finding.key);
    if netns.is_empty() {
        key
    } else {
        format!("{key} · {netns}")
    }
}

/// The findings of the view that fit in `height` lines, from an offset that keeps the
/// selection visible.
fn visible_findings(app: &mut App, height: usize) -> (usize, usize) {
    let fit = height / LINES_PER_FINDING;
    let len = app.view.findings.len();
    let mut offset = app.ui.table.offset();
    if let Some(selected) = app.ui.table.selected() {
        if selected < offset {
            offset = selected;
        } else if fit > 0 && selected >= offset + fit {
            offset = selected + 1 - fit;
        }
    }
    offset = offset.min(len.saturating_sub(fit));
    *app.ui.table.offset_mut() = offset;
    (offset, (offset + fit).min(len))
}

pub(super) fn render_findings(frame: &mut Frame, area: Rect, app: &mut App) {
    let width = usize::from(area.width);
    if app.view.findings.is_empty() {
        let why = if !app.ui.filter.is_empty() {
            format!(
                "no findings match the filter `{}` (Esc clears it)",
                app.ui.filter
            )
        } else if app.model.records == 0 {
            "waiting for records…".to_owned()
        } else {
            "no anomalies so far: nothing to explain (Tab shows flows, peers, listeners)".to_owned()
        };
        frame.render_widget(Paragraph::new(Span::styled(why, dim())), area);
        return;
    }
    let (start, end) = visible_findings(app, usize::from(area.height));
    let now = app.model.now_ns();
    let selected = app.ui.table.selected();
    let mut lines = Vec::new();
    for (index, finding) in app.view.findings.iter().enumerate().take(end).skip(start) {
        let style = severity_style(finding);
        let ratio = finding
            .detail
            .per_connection
            .filter(|pc| pc.connections > 0)
            .map(|pc| format!(" {:.2}/conn", pc.ratio))
            .unwrap_or_default();
        let state = match (&finding.closed_ns, &finding.close_reason) {
            (Some(_), Some(reason)) => format!(" closed ({reason})"),
            (Some(_), None) => " closed".to_owned(),
            (None, _) => String::new(),
        };
        let head = format!(
            " {} {:>5}{state} {} {}/s{ratio} {}",
            fmt_clock(finding.opened_ns),
            fmt_duration(finding.duration_ns(now)),
            finding.kind,
            fmt_rate(finding.rate_per_sec),
            finding_place(app, finding),
        );
        let cause = match finding.cause() {
            Some(cause) => format!("     ↳ {}", cause.summary),
            None => "     ↳ cause not known yet".to_owned(),
        };
        let text_style = if finding.is_open() {
            Style::default()
        } else {
            dim()
        };
        let cause_style = if finding.cause().is_some() {
            text_style
        } else {
            dim()
        };
        let mut first = Line::from(vec![
            Span::styled(finding.severity().short(), style),
            Span::styled(ellipsize(&head, width.saturating_sub(4)), text_style),
        ]);
        let mut second = Line::from(Span::styled(ellipsize(&cause, width), cause_style));
        if selected == Some(index) {
            first = first.patch_style(Modifier::REVERSED);
            second = second.patch_style(Modifier::REVERSED);
        }
        lines.push(first);
        lines.push(second);
    }
    frame.render_widget(Paragraph::new(lines), area);
}

/// Below the list: the selected finding's severity and its whole cause.
pub(super) fn render_finding_strip(frame: &mut Frame, area: Rect, app: &App) {
    let Some(finding) = app.selected_finding() else {
        frame.render_widget(
            Paragraph::new(Span::styled("── select a finding for its cause", dim())),
            area,
        );
        return;
    };
    let width = usize::from(area.width);
    let title = format!(
        " {} · {} ",
        finding.severity().name(),
        finding.assessment.why
    );
    let block = Block::default()
        .borders(Borders::TOP)
        .border_style(dim())
        .title(Span::styled(
            ellipsize(&title, width.saturating_sub(2)),
            severity_style(finding),
        ));
    let text = match finding.cause() {
        Some(cause) => format!("{}: {}", cause.kind, cause.summary),
        None => "no cause known yet: Enter shows the counts, rates and reasons".to_owned(),
    };
    frame.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: true }).block(block),
        area,
    );
}

/// An evidence value in one line: strings bare, the rest as compact JSON.
fn evidence_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The selected finding's details: everything its records said.
pub(super) fn finding_detail_lines(app: &App, finding: &Finding) -> Vec<Line<'static>> {
    let now = app.model.now_ns();
    let d = &finding.detail;
    let mut lines = vec![
        Line::from(Span::styled(
            format!("{} · {}", finding.kind, finding_place(app, finding)),
            bold(),
        )),
        Line::from(Span::styled(
            format!(
                "severity {}: {}",
                finding.severity().name(),
                finding.assessment.why
            ),
            severity_style(finding),
        )),
    ];
    let opened = if finding.open_seen {
        format!("opened {}", fmt_clock(finding.opened_ns))
    } else {
        format!("seen since {}", fmt_clock(finding.opened_ns))
    };
    let by = d.opened_by.as_deref().unwrap_or("rate");
    let end = match (finding.closed_ns, &finding.close_reason) {
        (Some(at), reason) => format!(
            "closed {} ({})",
            fmt_clock(at),
            reason.as_deref().unwrap_or("-")
        ),
        (None, _) => "still open".to_owned(),
    };
    lines.push(Line::from(format!(
        "anomaly {} · {opened} by {by} · lasted {} · {} updates · {end}",
        finding.id,
        fmt_duration(finding.duration_ns(now)),
        finding.updates
    )));
    lines.push(Line::from(format!(
        "rate {}/s · peak {}/s · baseline {}/s · open at {}/s, closes below {}/s",
        fmt_rate(finding.rate_per_sec),
        fmt_rate(finding.peak_rate_per_sec),
        fmt_rate(d.baseline_per_sec),
        fmt_rate(d.open_threshold_per_sec),
        fmt_rate(d.close_threshold_per_sec)
    )));
    lines.push(Line::from(format!(
        "counts: 1 s {} · 10 s {} · 60 s {} · since first seen {}{}",
        d.counts.last_1s,
        d.counts.last_10s,
        d.counts.last_60s,
        d.lifetime_count,
        if d.signals.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.signals.join(" + "))
        }
    )));
    if let Some(pc) = d.per_connection {
        lines.push(Line::from(format!(
            "per connection: {} over {} connections in 60 s = {:.2} (opens at {:.2})",
            pc.count, pc.connections, pc.ratio, pc.open_ratio
        )));
    }
    if !finding.reasons.is_empty() {
        let reasons: Vec<String> = finding
            .reasons
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        lines.push(Line::from(format!("reasons: {}", reasons.join(", "))));
    }
    match finding.cause() {
        Some(cause) => {
            let after = finding
                .cause_found_ns
                .map(|at| match at.saturating_sub(finding.opened_ns) {
                    0 => ", known when it opened".to_owned(),
                    after => format!(", known {} after it opened", fmt_duration(after)),
                })
                .unwrap_or_default();
            lines.push(Line::from(Span::styled(
                format!("cause: {}{after}", cause.kind),
                bold(),
            )));
            lines.push(Line::from(cause.summary.clone()));
            if let serde_json::Value::Object(fields) = &cause.evidence {
                lines.push(Line::from(Span::styled("evidence:", bold())));
                for (name, value) in fields {
                    lines.push(Line::from(format!(
                        "  {name}: {}",
                        ellipsize(&evidence_value(value), 200)
                    )));
                }
            }
        }
        None => lines.push(Line::from(Span::styled("cause: not known yet", dim()))),
    }
    lines.push(Line::from(Span::styled("Esc or Enter closes", dim())));
    lines
}
