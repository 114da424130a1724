//! Numbers, durations and text cut to a column.
use super::*;

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

pub(super) fn dim() -> Style {
    Style::default().fg(Color::DarkGray)
}

pub(super) fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}
