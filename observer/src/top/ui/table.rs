//! The main table of flows, peers or listeners.
use super::*;

/// A column beside the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Col {
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
        let queue = |f: fn(&crate::top::app::ListenerState) -> u32| {
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
pub(super) fn table_columns(tab: Tab) -> (&'static str, u16, &'static [Col], &'static [Col]) {
    match tab {
        // Findings are drawn as a list of their own (ui/findings.rs), never as this table.
        Tab::Findings | Tab::Flows => (
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
pub(super) fn fit_columns(tab: Tab, width: u16, label_pref: u16) -> (u16, Vec<Col>) {
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

pub(super) fn row_label(row: &Row) -> String {
    if row.anomalies.is_empty() {
        row.label.clone()
    } else {
        format!("!{}", row.label)
    }
}

/// The rows on screen: `height` rows from an offset that keeps the selection visible (and moves
/// as little as possible). Only these are turned into cells, however long the table.
pub(super) fn visible_window(app: &mut App, height: usize) -> (usize, usize) {
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

pub(super) fn render_table(frame: &mut Frame, area: Rect, app: &mut App) {
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
            Tab::Findings => "findings",
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
