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
    render_table(frame, table, app);
    if spark_h > 0 {
        render_sparkline(frame, spark, app);
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
// Formatting

/// `0`, `0.4`, `12.5`, `340`, `12.3k`, `4.1M`.
pub fn fmt_rate(rate: f64) -> String {
    if !rate.is_finite() || rate <= 0.0 {
        "0".to_owned()
    } else if rate < 99.95 {
        format!("{rate:.1}")
    } else if rate < 9_999.5 {
        format!("{rate:.0}")
    } else if rate < 999_950.0 {
        format!("{:.1}k", rate / 1e3)
    } else {
        format!("{:.1}M", rate / 1e6)
    }
}

/// `0`, `9999`, `12k`, `4M`.
pub fn fmt_count(n: u64) -> String {
    if n < 10_000 {
        n.to_string()
    } else if n < 10_000_000 {
        format!("{}k", n / 1_000)
    } else {
        format!("{}M", n / 1_000_000)
    }
}

/// Milliseconds in 4 columns: `0.4`, `12`, `340`, `1.2s`, `12s`.
pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        "-".to_owned()
    } else if ms < 9.95 {
        format!("{ms:.1}")
    } else if ms < 999.5 {
        format!("{ms:.0}")
    } else if ms < 9_950.0 {
        format!("{:.1}s", ms / 1e3)
    } else if ms < 999_500.0 {
        format!("{:.0}s", ms / 1e3)
    } else {
        ">1ks".to_owned()
    }
}

/// `42s`, `3m12s`, `2h05m`, `3d04h`.
pub fn fmt_duration(ns: u64) -> String {
    let s = ns / NANOS_PER_SEC;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `HH:MM:SS` (UTC) of Unix nanoseconds.
pub fn fmt_clock(unix_ns: u64) -> String {
    let s = unix_ns / NANOS_PER_SEC % 86400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

/// `text` in at most `width` columns, the middle replaced by `…` (both ends of an address
/// matter more than its middle).
pub fn ellipsize_middle(text: &str, width: usize) -> String {
    let len = text.chars().count();
    if len <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let keep = width - 1;
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut out: String = text.chars().take(head).collect();
    out.push('…');
    out.extend(text.chars().skip(len - tail));
    out
}

/// `text` in at most `width` columns, cut at the end with `…`.
pub fn ellipsize(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut out: String = text.chars().take(width - 1).collect();
    out.push('…');
    out
}

fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
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
    let open_style = if open > 0 {
        bold().fg(Color::Yellow)
    } else {
        Style::default()
    };
    second.push(sep());
    second.push(Span::styled(format!("anomalies {open} open"), open_style));
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
    spans.push(Span::raw(format!("sort {}", app.ui.sort.title())));
    if !app.ui.filter.is_empty() {
        spans.push(Span::styled(" │ ", dim()));
        spans.push(Span::styled(
            format!("filter {}", app.ui.filter),
            Style::default().fg(Color::Cyan),
        ));
    }
    spans.push(Span::styled(" │ ", dim()));
    spans.push(Span::raw(format!(
        "{} of {} rows",
        app.view.rows.len(),
        app.view.table_len
    )));
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

/// The detail line of a socket owner's service: unit, container, pod and cgroup path.
fn service_line(service: &Service) -> String {
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

// ---------------------------------------------------------------------------------------------
// The main table

/// A column beside the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Col {
    Retransmits,
    Syn,
    Synack,
    Drops,
    Resets,
    Failed,
    P50,
    P99,
    Severity,
    Reason,
    Process,
    Service,
    Netns,
    Overflows,
    SynQueueDrops,
    Backlog,
    AcceptQueue,
    SynQueue,
}

impl Col {
    fn title(self) -> &'static str {
        match self {
            Col::Retransmits => "Rtx/s",
            Col::Syn => "SYN",
            Col::Synack => "SYNACK",
            Col::Drops => "Drops",
            Col::Resets => "RST",
            Col::Failed => "Fail",
            Col::P50 => "p50",
            Col::P99 => "p99",
            Col::Severity => "Sev",
            Col::Reason => "Top drop reason",
            Col::Process => "Process",
            Col::Service => "Service",
            Col::Netns => "Netns",
            Col::Overflows => "Overflow",
            Col::SynQueueDrops => "SYNQdrop",
            Col::Backlog => "Backlog",
            Col::AcceptQueue => "AcceptQ",
            Col::SynQueue => "SynQ",
        }
    }

    fn width(self) -> u16 {
        match self {
            Col::Syn
            | Col::Resets
            | Col::Failed
            | Col::Severity
            | Col::SynQueue
            | Col::P50
            | Col::P99 => 4,
            Col::Drops | Col::Retransmits => 5,
            Col::Synack => 6,
            Col::Backlog | Col::AcceptQueue => 7,
            Col::Overflows | Col::SynQueueDrops => 8,
            Col::Netns => 10,
            Col::Reason => 16,
            Col::Process | Col::Service => 18,
        }
    }

    fn sorts_by(self) -> Option<SortColumn> {
        Some(match self {
            Col::Retransmits => SortColumn::Retransmits,
            Col::Syn => SortColumn::SynRetransmits,
            Col::Synack => SortColumn::SynackRetransmits,
            Col::Drops => SortColumn::Drops,
            Col::Resets => SortColumn::Resets,
            Col::Failed => SortColumn::FailedConnects,
            Col::P99 => SortColumn::ConnectP99,
            Col::Severity => SortColumn::Severity,
            Col::Overflows => SortColumn::Overflows,
            Col::SynQueueDrops => SortColumn::SynQueueDrops,
            _ => return None,
        })
    }

    /// Numbers to the right; names to the left, cut to the column.
    fn aligned(self, text: String) -> Line<'static> {
        match self {
            Col::Reason | Col::Process | Col::Service => {
                Line::from(ellipsize(&text, usize::from(self.width())))
            }
            _ => Line::from(text).right_aligned(),
        }
    }

    fn cell(self, row: &Row) -> String {
        let queue = |f: fn(&super::app::ListenerState) -> u32| {
            row.queue
                .as_ref()
                .map_or("-".to_owned(), |q| f(q).to_string())
        };
        match self {
            Col::Retransmits => fmt_rate(row.retransmits_per_sec),
            Col::Syn => fmt_count(row.syn_retransmits),
            Col::Synack => fmt_count(row.synack_retransmits),
            Col::Drops => fmt_count(row.drops),
            Col::Resets => fmt_count(row.resets),
            Col::Failed => fmt_count(row.failed_connects),
            Col::P50 => row.latency.map_or("-".to_owned(), |l| fmt_ms(l.p50_ms)),
            Col::P99 => row.latency.map_or("-".to_owned(), |l| fmt_ms(l.p99_ms)),
            Col::Severity => format!("{:.1}", row.severity),
            Col::Reason => row
                .reasons
                .first()
                .map_or(String::new(), |(r, _)| r.clone()),
            Col::Process => row.owner.clone().unwrap_or_default(),
            Col::Service => row.service.as_ref().map(|s| s.label()).unwrap_or_default(),
            Col::Netns => row.netns.to_string(),
            Col::Overflows => fmt_count(row.overflows),
            Col::SynQueueDrops => fmt_count(row.syn_queue_drops),
            Col::Backlog => queue(|q| q.backlog_limit),
            Col::AcceptQueue => queue(|q| q.accept_queue),
            Col::SynQueue => queue(|q| q.syn_queue),
        }
    }
}

/// The key column's title and minimum width, the columns that must be there (as many as fit,
/// in order), and those shown only when the key keeps its full width.
fn table_columns(tab: Tab) -> (&'static str, u16, &'static [Col], &'static [Col]) {
    match tab {
        Tab::Flows => (
            "Flow (this host → peer)",
            24,
            &[
                Col::Retransmits,
                Col::Syn,
                Col::Synack,
                Col::Drops,
                Col::Resets,
                Col::Failed,
                Col::P50,
                Col::P99,
            ],
            &[
                Col::Severity,
                Col::Reason,
                Col::Netns,
                Col::Process,
                Col::Service,
            ],
        ),
        Tab::Peers => (
            "Peer",
            15,
            &[
                Col::Retransmits,
                Col::Syn,
                Col::Synack,
                Col::Drops,
                Col::Resets,
                Col::Failed,
                Col::P50,
                Col::P99,
            ],
            &[Col::Severity, Col::Reason, Col::Netns],
        ),
        Tab::Listeners => (
            "Listener",
            18,
            &[
                Col::Overflows,
                Col::SynQueueDrops,
                Col::Synack,
                Col::Backlog,
                Col::AcceptQueue,
                Col::SynQueue,
            ],
            &[Col::Severity, Col::Netns],
        ),
    }
}

/// The columns that fit in `width`, and the key column's width.
fn fit_columns(tab: Tab, width: u16, label_pref: u16) -> (u16, Vec<Col>) {
    let (_, label_min, essential, optional) = table_columns(tab);
    let label_pref = label_pref.max(label_min);
    let mut used: u16 = 0;
    let mut chosen = Vec::new();
    for col in essential {
        let need = col.width() + 1;
        if label_min + used + need > width {
            break;
        }
        used += need;
        chosen.push(*col);
    }
    if chosen.len() == essential.len() {
        for col in optional {
            let need = col.width() + 1;
            if label_pref + used + need <= width {
                used += need;
                chosen.push(*col);
            }
        }
    }
    (width.saturating_sub(used), chosen)
}

fn row_label(row: &Row) -> String {
    if row.anomalies.is_empty() {
        row.label.clone()
    } else {
        format!("!{}", row.label)
    }
}

/// The rows on screen: `height` rows from an offset that keeps the selection visible (and moves
/// as little as possible). Only these are turned into cells, however long the table.
fn visible_window(app: &mut App, height: usize) -> (usize, usize) {
    let len = app.view.rows.len();
    let mut offset = app.ui.table.offset();
    if let Some(selected) = app.ui.table.selected() {
        if selected < offset {
            offset = selected;
        } else if height > 0 && selected >= offset + height {
            offset = selected + 1 - height;
        }
    }
    offset = offset.min(len.saturating_sub(height));
    *app.ui.table.offset_mut() = offset;
    (offset, (offset + height).min(len))
}

fn render_table(frame: &mut Frame, area: Rect, app: &mut App) {
    let tab = app.ui.tab;
    let (start, end) = visible_window(app, usize::from(area.height.saturating_sub(1)));
    let label_pref = app
        .view
        .rows
        .get(start..end)
        .unwrap_or_default()
        .iter()
        .map(|r| row_label(r).chars().count())
        .max()
        .unwrap_or(0)
        .min(60) as u16;
    let (label_width, cols) = fit_columns(tab, area.width, label_pref);
    let (label_title, ..) = table_columns(tab);
    let sorted = |col: Option<SortColumn>| {
        if col == Some(app.ui.sort) {
            bold().add_modifier(Modifier::UNDERLINED).fg(Color::Cyan)
        } else {
            bold()
        }
    };
    let mut header = vec![Cell::from(ellipsize(label_title, usize::from(label_width)))];
    header.extend(
        cols.iter()
            .map(|c| Cell::from(c.aligned(c.title().to_owned())).style(sorted(c.sorts_by()))),
    );
    let mut widths = vec![Constraint::Length(label_width)];
    widths.extend(cols.iter().map(|c| Constraint::Length(c.width())));

    if app.view.rows.is_empty() {
        let what = match tab {
            Tab::Flows => "flows",
            Tab::Peers => "peers",
            Tab::Listeners => "listeners",
        };
        let why = if !app.ui.filter.is_empty() {
            format!(
                "no {what} match the filter `{}` (Esc clears it)",
                app.ui.filter
            )
        } else if app.model.records == 0 {
            "waiting for records…".to_owned()
        } else {
            format!("no {what} with trouble so far")
        };
        let [head, body] =
            Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
        frame.render_widget(
            Table::new(Vec::<TableRow>::new(), widths.clone())
                .header(TableRow::new(header))
                .column_spacing(1),
            head,
        );
        frame.render_widget(Paragraph::new(Span::styled(why, dim())), body);
        return;
    }

    let rows: Vec<TableRow> = app
        .view
        .rows
        .get(start..end)
        .unwrap_or_default()
        .iter()
        .map(|row| {
            let mut cells = vec![Cell::from(ellipsize_middle(
                &row_label(row),
                usize::from(label_width),
            ))];
            cells.extend(cols.iter().map(|c| Cell::from(c.aligned(c.cell(row)))));
            let style = if !row.anomalies.is_empty() {
                Style::default().fg(Color::Red)
            } else if row.severity >= 0.5 {
                Style::default().fg(Color::Yellow)
            } else {
                Style::default()
            };
            TableRow::new(cells).style(style)
        })
        .collect();
    let table = Table::new(rows, widths)
        .header(TableRow::new(header))
        .column_spacing(1)
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
    let mut window = ratatui::widgets::TableState::default()
        .with_selected(app.ui.table.selected().map(|s| s.saturating_sub(start)));
    frame.render_stateful_widget(table, area, &mut window);
}

fn render_sparkline(frame: &mut Frame, area: Rect, app: &App) {
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

fn render_panes(frame: &mut Frame, area: Rect, app: &App) {
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

fn pane(title: String) -> Block<'static> {
    Block::bordered()
        .border_style(dim())
        .title(Span::styled(title, bold()))
}

fn render_drops(frame: &mut Frame, area: Rect, app: &App) {
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

fn render_sysctls(frame: &mut Frame, area: Rect, app: &App) {
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
        " sysctls · netns {netns}{} ",
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

fn render_anomalies(frame: &mut Frame, area: Rect, app: &App) {
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

// ---------------------------------------------------------------------------------------------
// Popups

/// A rectangle of at most `width` x `height` centered in `area`.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
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
    ("Tab", "flows → peers → listeners (Shift-Tab back)"),
    ("s  S", "next / previous sort column (default: severity)"),
    ("/", "filter by address, port, drop reason or anomaly"),
    ("Esc", "clear the filter, close a window"),
    ("p", "pause the display (data keeps coming)"),
    ("Enter", "details of the selected row"),
    ("?", "this help"),
    ("q  Ctrl-C", "quit"),
];

fn render_help(frame: &mut Frame, area: Rect) {
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

fn render_details(frame: &mut Frame, area: Rect, app: &App) {
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
            super::app::endpoint(flow.saddr, flow.sport),
            super::app::endpoint(flow.daddr, flow.dport)
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
    let popup = centered(area, 100, lines.len() as u16 + 2);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(Span::styled(" details ", bold()))),
        popup,
    );
}

#[cfg(test)]
mod tests {
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
}
