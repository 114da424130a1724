//! Rendering: the state as a screen. No I/O, no panics on empty data or tiny terminals; at
//! 80x24 everything has a place, and larger terminals give the table and panes more room.
//!
//! ```text
//! observer top │ host │ kernel │ up │ source                 header (2 lines)
//! lost · undelivered · anomalies │ events/s by kind
//!  Flows  Peers  Listeners │ sort │ filter │ PAUSED          tabs (1 line)
//! the main table, selected row highlighted                   table (the rest)
//! ── sparkline of the selected row, last 60 s ──             3 lines
//! ┌drops and rules┐┌sysctls of its netns┐┌anomaly log┐       panes (a third)
//! q quit  ↑↓ select  Tab view ...               status       footer (1 line)
//! ```
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row as TableRow, Sparkline, Table, Wrap},
};

use super::{
    app::{App, Popup, RECENT_CHANGE_NS, Row, SortColumn, Tab, scoped_label},
    wire::AnomalyPhase,
};
use crate::{
    aggregate::{RowKey, Window},
    enrich::cgroup::Service,
};

mod findings;
mod format;
mod panes;
mod popups;
mod table;
#[cfg(test)]
mod tests;

use self::{findings::*, panes::*, popups::*, table::*};
pub use self::{format::*, popups::HELP};

/// Below this, only a note that the terminal is too small.
pub const MIN_WIDTH: u16 = 30;
pub const MIN_HEIGHT: u16 = 8;
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Draws the whole screen.
pub fn render(frame: &mut Frame, app: &mut App) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        render_too_small(frame, area);
        return;
    }
    let rest = area.height.saturating_sub(4);
    let (spark_h, panes_h) = if rest >= 14 {
        (3, (rest / 3).clamp(6, 14))
    } else {
        (0, 0)
    };
    let [header, tabs, table, spark, panes, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(spark_h),
        Constraint::Length(panes_h),
        Constraint::Length(1),
    ])
    .areas(area);
    render_header(frame, header, app);
    render_tabs(frame, tabs, app);
    if app.ui.tab == Tab::Findings {
        render_findings(frame, table, app);
        if spark_h > 0 {
            render_finding_strip(frame, spark, app);
        }
    } else {
        render_table(frame, table, app);
        if spark_h > 0 {
            render_sparkline(frame, spark, app);
        }
    }
    if panes_h > 0 {
        render_panes(frame, panes, app);
    }
    render_footer(frame, footer, app);
    match app.ui.popup {
        Some(Popup::Help) => render_help(frame, area),
        Some(Popup::Details) => render_details(frame, area, app),
        None => {}
    }
}

fn render_too_small(frame: &mut Frame, area: Rect) {
    let text = format!(
        "observer top: terminal too small ({}x{}, needs {MIN_WIDTH}x{MIN_HEIGHT}); q quits",
        area.width, area.height
    );
    frame.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
}

// ---------------------------------------------------------------------------------------------
// Header, tabs, footer

fn render_header(frame: &mut Frame, area: Rect, app: &App) {
    let model = &app.model;
    let now = model.now_ns();
    let sep = || Span::styled(" │ ", dim());
    let mut first = vec![Span::styled("observer top", bold().fg(Color::Cyan))];
    match &model.start {
        Some(start) => {
            first.push(sep());
            first.push(Span::raw(format!("host {}", start.host)));
            first.push(sep());
            first.push(Span::raw(format!("kernel {}", start.kernel)));
        }
        None => {
            first.push(sep());
            first.push(Span::styled("waiting for the start record", dim()));
        }
    }
    first.push(sep());
    first.push(Span::raw(format!(
        "up {}",
        fmt_duration(model.uptime_ns(now))
    )));
    first.push(sep());
    let source = &app.ui.source;
    let source_style = if source.error {
        Style::default().fg(Color::Red)
    } else {
        Style::default()
    };
    first.push(Span::styled(source.label.clone(), source_style));
    if let Some(reason) = &model.stopped {
        first.push(sep());
        first.push(Span::styled(
            format!("stopped ({reason})"),
            Style::default().fg(Color::Red),
        ));
    }

    let lost_style = if model.lost > 0 {
        bold().fg(Color::White).bg(Color::Red)
    } else {
        Style::default()
    };
    let mut second = vec![Span::styled(format!("lost {}", model.lost), lost_style)];
    if model.undelivered > 0 {
        second.push(Span::raw(" "));
        second.push(Span::styled(
            format!("undelivered {}", model.undelivered),
            bold().fg(Color::White).bg(Color::Red),
        ));
    }
    let open = model.open_anomalies.len();
    let critical = model
        .findings
        .current(now)
        .iter()
        .filter(|f| f.is_open() && f.severity() == crate::top::findings::Severity::Critical)
        .count();
    let open_style = if critical > 0 {
        bold().fg(Color::Red)
    } else if open > 0 {
        bold().fg(Color::Yellow)
    } else {
        Style::default()
    };
    second.push(sep());
    let open_text = if critical > 0 {
        format!("anomalies {open} open, {critical} critical")
    } else {
        format!("anomalies {open} open")
    };
    second.push(Span::styled(open_text, open_style));
    second.push(sep());
    second.push(Span::styled("events/s ", dim()));
    let rates = model.event_rates();
    if rates.is_empty() {
        second.push(Span::styled("none yet", dim()));
    }
    for (i, (kind, rate)) in rates.iter().enumerate() {
        if i > 0 {
            second.push(Span::styled(" · ", dim()));
        }
        second.push(Span::raw(format!("{kind} {}", fmt_rate(*rate))));
    }
    frame.render_widget(
        Paragraph::new(vec![Line::from(first), Line::from(second)]),
        area,
    );
}

fn render_tabs(frame: &mut Frame, area: Rect, app: &App) {
    let mut spans = Vec::new();
    for tab in Tab::ALL {
        let style = if tab == app.ui.tab {
            bold().add_modifier(Modifier::REVERSED)
        } else {
            Style::default()
        };
        spans.push(Span::styled(format!(" {} ", tab.title()), style));
    }
    spans.push(Span::styled(" │ ", dim()));
    if app.ui.tab == Tab::Findings {
        spans.push(Span::raw("open, most severe, newest first"));
    } else {
        spans.push(Span::raw(format!("sort {}", app.ui.sort.title())));
    }
    if !app.ui.filter.is_empty() {
        spans.push(Span::styled(" │ ", dim()));
        spans.push(Span::styled(
            format!("filter {}", app.ui.filter),
            Style::default().fg(Color::Cyan),
        ));
    }
    spans.push(Span::styled(" │ ", dim()));
    if app.ui.tab == Tab::Findings {
        spans.push(Span::raw(format!(
            "{} shown of {} findings",
            app.view.findings.len(),
            app.view.table_len
        )));
    } else {
        spans.push(Span::raw(format!(
            "{} of {} rows",
            app.view.rows.len(),
            app.view.table_len
        )));
    }
    if app.ui.paused {
        spans.push(Span::styled(" │ ", dim()));
        spans.push(Span::styled(
            "PAUSED",
            bold().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn render_footer(frame: &mut Frame, area: Rect, app: &App) {
    if let Some(input) = &app.ui.filter_input {
        let line = Line::from(vec![
            Span::styled("filter: ", bold().fg(Color::Cyan)),
            Span::raw(input.clone()),
            Span::styled("▏", Style::default().fg(Color::Cyan)),
            Span::styled(
                "  address, port or reason · Enter apply · Esc cancel",
                dim(),
            ),
        ]);
        frame.render_widget(Paragraph::new(line), area);
        return;
    }
    let keys: &[(&str, &str)] = &[
        ("q", "quit"),
        ("↑↓", "select"),
        ("Tab", "view"),
        ("s", "sort"),
        ("/", "filter"),
        ("p", "pause"),
        ("⏎", "details"),
        ("?", "help"),
    ];
    let mut spans = Vec::new();
    for (key, what) in keys {
        spans.push(Span::styled(*key, bold()));
        spans.push(Span::raw(format!(" {what}  ")));
    }
    let hints_width: usize = spans.iter().map(|s| s.content.chars().count()).sum();
    if let Some(message) = &app.ui.source.message {
        let room = usize::from(area.width).saturating_sub(hints_width + 1);
        if room >= 10 {
            let style = if app.ui.source.error {
                Style::default().fg(Color::Red)
            } else {
                Style::default().fg(Color::Yellow)
            };
            spans.push(Span::styled(ellipsize(message, room), style));
        }
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}
