//! The report as plain text: at most [`WIDTH`] columns, sections in a fixed order, nothing
//! that depends on the reader's clock or locale (times are the records' own, in UTC).
use std::fmt::Write as _;

use super::model::{Report, SysctlChange};
use crate::top::{
    app::scoped_label,
    findings::{Finding, Severity},
    ui::{fmt_duration, fmt_rate},
};

/// Columns of the report.
pub const WIDTH: usize = 100;
const INDENT: &str = "    ";

/// `2026-11-22 03:40:00` (UTC), or `?` for a time not known.
fn datetime(unix_ns: Option<u64>) -> String {
    let Some(ns) = unix_ns else {
        return "?".to_owned();
    };
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "?".to_owned())
}

/// `03:40:00` (UTC).
fn clock(unix_ns: Option<u64>) -> String {
    let text = datetime(unix_ns);
    text.get(11..).map_or(text.clone(), str::to_owned)
}

/// `text` wrapped at [`WIDTH`], the first line after `first`, the rest indented by `rest`.
fn wrap(out: &mut String, first: &str, rest: &str, text: &str) {
    let options = textwrap::Options::new(WIDTH)
        .initial_indent(first)
        .subsequent_indent(rest)
        // Times and names have hyphens: break only at spaces (and inside over-long words).
        .word_splitter(textwrap::WordSplitter::NoHyphenation)
        .break_words(true);
    for line in textwrap::wrap(text, options) {
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn section(out: &mut String, title: &str) {
    out.push('\n');
    out.push_str(title);
    out.push('\n');
}

fn netns_label(report: &Report, netns: u64, known: Option<&str>) -> String {
    match known.or_else(|| report.netns_names.get(&netns).map(String::as_str)) {
        Some(name) => format!("netns {name}"),
        None => format!("netns {netns}"),
    }
}

/// Renders the whole report.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    header(&mut out, report);
    if report.types.is_empty() {
        out.push_str("\nNothing was recorded: the stream holds no record observer writes.\n");
        return out;
    }
    anomalies(&mut out, report);
    sysctls(&mut out, report);
    peers(&mut out, report);
    listeners(&mut out, report);
    rules(&mut out, report);
    stale(&mut out, report);
    totals(&mut out, report);
    out
}

fn header(out: &mut String, report: &Report) {
    let h = &report.header;
    out.push_str("observer incident report\n");
    let mut about = Vec::new();
    if let Some(host) = &h.host {
        about.push(format!("host {host}"));
    }
    if let Some(kernel) = &h.kernel {
        about.push(format!("kernel {kernel}"));
    }
    if let Some(version) = &h.version {
        about.push(format!("observer {version}"));
    }
    if about.is_empty() {
        about.push("no start record: host and kernel unknown".to_owned());
    }
    wrap(out, "", INDENT, &about.join(" · "));
    let from = h.start_ns.or(h.first_ns);
    let to = h.stop_ns.or(h.last_ns);
    if from.is_some() || to.is_some() {
        let span = match (from, to) {
            (Some(a), Some(b)) => format!(" ({})", fmt_duration(b.saturating_sub(a))),
            _ => String::new(),
        };
        let end = match &h.stop_reason {
            Some(reason) => format!(", stopped ({reason})"),
            None => ", no stop record (still running, or cut short)".to_owned(),
        };
        wrap(
            out,
            "",
            INDENT,
            &format!("recorded {} → {} UTC{span}{end}", datetime(from), clock(to)),
        );
    }
    let mut counts = format!("{} lines", report.lines);
    if report.not_understood > 0 {
        let first = report
            .first_not_understood
            .map(|n| format!(", the first at line {n}"))
            .unwrap_or_default();
        let _ = write!(
            counts,
            " · {} {} not understood{first}",
            report.not_understood,
            if report.not_understood == 1 {
                "line"
            } else {
                "lines"
            }
        );
    }
    wrap(out, "", INDENT, &counts);
}

fn anomalies(out: &mut String, report: &Report) {
    let critical = report
        .findings
        .iter()
        .filter(|f| f.severity() == Severity::Critical)
        .count();
    if report.findings.is_empty() {
        section(out, "Anomalies: none");
        return;
    }
    section(
        out,
        &format!(
            "Anomalies: {} ({critical} critical), in the order they opened",
            report.findings.len()
        ),
    );
    let end_ns = report.header.stop_ns.or(report.header.last_ns).unwrap_or(0);
    for f in &report.findings {
        anomaly(out, report, f, end_ns);
    }
}

fn anomaly(out: &mut String, report: &Report, f: &Finding, end_ns: u64) {
    let place = format!(
        "{} · {}",
        scoped_label(&f.key),
        netns_label(report, u64::from(f.netns), f.netns_name.as_deref())
    );
    wrap(
        out,
        "  ",
        "  ",
        &format!(
            "{} {} {} · {place}",
            clock(Some(f.opened_ns)),
            f.severity().short(),
            f.kind
        ),
    );
    let mut life = Vec::new();
    if !f.open_seen {
        life.push("opened before the recording".to_owned());
    }
    if f.updates > 0 {
        life.push(format!(
            "{} {}",
            f.updates,
            if f.updates == 1 { "update" } else { "updates" }
        ));
    }
    let duration = fmt_duration(f.duration_ns(end_ns));
    life.push(match (f.closed_ns, &f.close_reason) {
        (Some(at), reason) => format!(
            "closed {} ({}) after {duration}",
            clock(Some(at)),
            reason.as_deref().unwrap_or("-")
        ),
        (None, _) => format!("still open at the end, after {duration}"),
    });
    life.push(format!("peak {}/s", fmt_rate(f.peak_rate_per_sec)));
    let d = &f.detail;
    life.push(format!(
        "opened by {}",
        d.opened_by.as_deref().unwrap_or("rate")
    ));
    if let Some(pc) = d.per_connection {
        life.push(format!(
            "{} over {} connections ({:.2} per connection)",
            pc.count, pc.connections, pc.ratio
        ));
    }
    if let Some((reason, count)) = f.reasons.first() {
        life.push(format!("most: {reason} ({count})"));
    }
    wrap(out, INDENT, INDENT, &life.join(" · "));
    wrap(
        out,
        INDENT,
        INDENT,
        &format!("{}: {}", f.severity().name(), f.assessment.why),
    );
    match f.cause() {
        Some(cause) => {
            let when = match f.cause_found_ns.map(|at| at.saturating_sub(f.opened_ns)) {
                Some(0) | None => String::new(),
                Some(after) => format!(", known {} after it opened", fmt_duration(after)),
            };
            wrap(
                out,
                INDENT,
                &format!("{INDENT}  "),
                &format!("cause ({}{when}): {}", cause.kind, cause.summary),
            );
        }
        None => wrap(out, INDENT, INDENT, "cause: none found"),
    }
}

fn sysctls(out: &mut String, report: &Report) {
    if report.sysctl_changes.is_empty() {
        return;
    }
    section(out, "Sysctl changes");
    for change in &report.sysctl_changes {
        sysctl(out, report, change);
    }
}

fn sysctl(out: &mut String, report: &Report, c: &SysctlChange) {
    let when = match c.time_ns {
        Some(_) => clock(c.time_ns),
        None => "before the recording".to_owned(),
    };
    wrap(
        out,
        "  ",
        INDENT,
        &format!(
            "{when} {} {} → {} in {}",
            c.name,
            c.old,
            c.new,
            netns_label(report, c.netns, None)
        ),
    );
    match &c.effect {
        Some(effect) if !effect.rates.is_empty() => {
            let rates: Vec<String> = effect
                .rates
                .iter()
                .map(|(signal, (before, after))| {
                    format!("{signal} {before:.0} → {after:.0} per minute")
                })
                .collect();
            wrap(
                out,
                INDENT,
                INDENT,
                &format!(
                    "effect (over {} s before and after): {}",
                    effect.span_secs,
                    rates.join(", ")
                ),
            );
        }
        Some(_) => wrap(out, INDENT, INDENT, "effect: no affected signal moved"),
        None => wrap(
            out,
            INDENT,
            INDENT,
            "effect: not measured (the recording ended within 5 minutes of the change)",
        ),
    }
}

fn peers(out: &mut String, report: &Report) {
    if report.peers.is_empty() {
        return;
    }
    section(
        out,
        if report.peers_exact {
            "Worst peers (the kernel's exact per-flow counters, from `stop`)"
        } else {
            "Worst peers (from the exported events: a lower bound)"
        },
    );
    for p in &report.peers {
        let addr = p.addr.map_or("?".to_owned(), |a| a.to_string());
        let mut parts = Vec::new();
        for (n, what) in [
            (p.retransmits, "retransmitted segments"),
            (p.syn_retransmits, "SYN retransmits"),
            (p.synack_retransmits, "SYN-ACK retransmits"),
            (p.drops, "drops"),
            (p.resets, "resets"),
            (p.failed_connects, "failed connects"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        wrap(
            out,
            "  ",
            INDENT,
            &format!(
                "{addr} ({}): {}",
                netns_label(report, u64::from(p.netns), None),
                parts.join(", ")
            ),
        );
    }
}

fn listeners(out: &mut String, report: &Report) {
    if report.listeners.is_empty() {
        return;
    }
    section(out, "Listeners that refused connections");
    for l in &report.listeners {
        let addr = crate::top::app::endpoint(l.addr, l.port);
        wrap(
            out,
            "  ",
            INDENT,
            &format!(
                "{addr} ({}): {} accept-queue overflows, {} SYN-queue drops, {} other (backlog {})",
                netns_label(report, l.netns, None),
                l.overflows,
                l.syn_queue_drops,
                l.other_drops,
                l.backlog_limit
            ),
        );
    }
}

fn rules(out: &mut String, report: &Report) {
    if report.rules.is_empty() {
        return;
    }
    section(out, "Firewall rules that dropped");
    for r in &report.rules {
        let named = if r.exact { "" } else { " (a candidate)" };
        wrap(
            out,
            "  ",
            INDENT,
            &format!(
                "`{}` ({} {} {}, handle {}) in {}: {} packets{named}",
                r.rule,
                r.family,
                r.table,
                r.chain,
                r.handle,
                netns_label(report, r.netns, None),
                r.packets
            ),
        );
    }
}

fn stale(out: &mut String, report: &Report) {
    if report.stale.is_empty() {
        return;
    }
    section(out, "Processes with stale connections");
    for s in &report.stale {
        let who = match (&s.pid, &s.comm) {
            (Some(pid), Some(comm)) => format!("pid {pid} ({comm})"),
            (Some(pid), None) => format!("pid {pid}"),
            _ => "a process that is gone".to_owned(),
        };
        wrap(
            out,
            "  ",
            INDENT,
            &format!(
                "{who} → {} in {}: {} connections stuck, the oldest {} s{}",
                crate::top::app::endpoint(s.peer, s.peer_port),
                netns_label(report, s.netns, None),
                s.count,
                s.oldest_age_secs,
                if s.growing { ", growing" } else { "" }
            ),
        );
    }
}

fn totals(out: &mut String, report: &Report) {
    let Some(stop) = &report.stop else {
        section(out, "Totals: no stop record, so no exact totals");
        if report.lost_records + report.undelivered_records > 0 {
            wrap(
                out,
                "  ",
                INDENT,
                &format!(
                    "lost {} · undelivered {} (from the stream's own records)",
                    report.lost_records, report.undelivered_records
                ),
            );
        }
        return;
    };
    section(out, "Totals (the kernel's counters, from `stop`)");
    for (kind, t) in &stop.totals {
        if t.events == 0 && t.counted == 0 {
            continue;
        }
        let mut line = format!(
            "{kind}: {} events, {} counted, {} exported, {} written",
            t.events, t.counted, t.exported, t.received
        );
        if t.suppressed > 0 {
            let _ = write!(line, ", {} over the export budget", t.suppressed);
        }
        if t.map_full > 0 {
            let _ = write!(line, ", {} not counted per flow (map full)", t.map_full);
        }
        wrap(out, "  ", INDENT, &line);
    }
    let missing = stop.lost + stop.undelivered + stop.decode_errors + stop.context_undelivered;
    let verdict = if missing == 0 && stop.missed_runs == 0 {
        "nothing was lost"
    } else {
        "records are missing"
    };
    wrap(
        out,
        "  ",
        INDENT,
        &format!(
            "lost {} · undelivered {} · decode errors {} · context undelivered {} · missed runs {}: {verdict}",
            stop.lost,
            stop.undelivered,
            stop.decode_errors,
            stop.context_undelivered,
            stop.missed_runs
        ),
    );
    if stop.services.is_empty() {
        return;
    }
    section(
        out,
        "Services (connections counted by the kernel, most failures first)",
    );
    for s in &stop.services {
        let addr = s
            .addr
            .map_or("?".to_owned(), |a| crate::top::app::endpoint(a, s.port));
        let text = if s.role == "listener" {
            format!(
                "listener {addr} ({}): {} accepted",
                netns_label(report, s.netns, None),
                s.established
            )
        } else {
            format!(
                "peer {addr} ({}): {} attempts, {} established, {} refused, {} timed out",
                netns_label(report, s.netns, None),
                s.attempts,
                s.established,
                s.refused,
                s.timed_out
            )
        };
        wrap(out, "  ", INDENT, &text);
    }
}
