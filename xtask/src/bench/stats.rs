//! Statistics over runs and number formatting (pure: no I/O).
use std::collections::BTreeSet;

use serde_json::Value;

use super::{
    MIN_EVENTS_JUDGED,
    harness::{ns_per_event, total},
    refused::Window,
};

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// 12345.6 -> "12,346".
pub fn int(x: f64) -> String {
    if !x.is_finite() {
        return "–".to_owned();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        format!("-{out}")
    } else {
        out
    }
}

pub fn ns_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "–".to_owned(), int)
}

pub fn f3(x: f64) -> String {
    format!("{x:.3}")
}

pub fn list(values: &[f64], f: impl Fn(f64) -> String) -> String {
    values.iter().map(|v| f(*v)).collect::<Vec<_>>().join(", ")
}

pub fn status(ok: bool) -> &'static str {
    if ok { "ok" } else { "**MISSED**" }
}

pub fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}%")
    } else {
        "–".to_owned()
    }
}

/// One value per run; runs during which another process had tracing programs attached are
/// marked, and medians leave them out when any unmarked run remains.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    pub values: Vec<f64>,
    pub marked: Vec<bool>,
}

impl Runs {
    pub fn of(windows: &[Window], f: impl Fn(&Window) -> f64) -> Self {
        Self {
            values: windows.iter().map(&f).collect(),
            marked: windows.iter().map(|w| !w.others.is_empty()).collect(),
        }
    }

    pub fn usable(&self) -> Vec<f64> {
        let clean: Vec<f64> = self
            .values
            .iter()
            .zip(&self.marked)
            .filter(|(_, m)| !**m)
            .map(|(v, _)| *v)
            .collect();
        if clean.is_empty() {
            self.values.clone()
        } else {
            clean
        }
    }

    pub fn median(&self) -> f64 {
        median(&self.usable())
    }

    /// "1, 2*, 3" (`*`: marked).
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        self.values
            .iter()
            .zip(&self.marked)
            .map(|(v, m)| format!("{}{}", f(*v), if *m { "*" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Per-program medians over runs: (name, median events, median ns/event, per-run ns/event).
pub struct ProgSummary {
    pub name: String,
    pub events: f64,
    pub ns: f64,
    pub runs: Runs,
}

pub fn summarize(windows: &[Window]) -> Vec<ProgSummary> {
    let names: BTreeSet<&String> = windows.iter().flat_map(|w| w.progs.keys()).collect();
    let mut out: Vec<ProgSummary> = names
        .into_iter()
        .map(|name| {
            let counters = |w: &Window| w.progs.get(name).copied().unwrap_or_default();
            let runs = Runs::of(windows, |w| ns_per_event(counters(w)).unwrap_or(f64::NAN));
            ProgSummary {
                name: name.clone(),
                events: Runs::of(windows, |w| counters(w).run_cnt as f64).median(),
                ns: runs.median(),
                runs,
            }
        })
        .collect();
    let runs = Runs::of(windows, |w| {
        ns_per_event(total(&w.progs)).unwrap_or(f64::NAN)
    });
    out.push(ProgSummary {
        name: "all programs".to_owned(),
        events: Runs::of(windows, |w| total(&w.progs).run_cnt as f64).median(),
        ns: runs.median(),
        runs,
    });
    out
}

/// Worst median ns/event among programs with enough events to judge.
pub fn worst_judged(summary: &[ProgSummary]) -> Option<&ProgSummary> {
    summary
        .iter()
        .filter(|p| p.name != "all programs" && p.events >= MIN_EVENTS_JUDGED as f64)
        .max_by(|a, b| a.ns.total_cmp(&b.ns))
}

pub fn all_programs(summary: &[ProgSummary]) -> Option<&ProgSummary> {
    summary.iter().find(|p| p.name == "all programs")
}

/// `*` when another process had tracing programs attached during any of these runs.
pub fn mark(windows: &[&Window]) -> &'static str {
    if windows.iter().any(|w| !w.others.is_empty()) {
        "*"
    } else {
        ""
    }
}

/// Per-run slowdowns (%) of `with` against the run without it paired with it (marked when
/// either run is).
pub fn paired_slowdowns(none: &[Window], with: &[Window]) -> Runs {
    let pairs: Vec<(&Window, &Window)> = none.iter().zip(with).collect();
    Runs {
        values: pairs
            .iter()
            .map(|(n, w)| slowdown_pct(n.rate(), w.rate()))
            .collect(),
        marked: pairs
            .iter()
            .map(|(n, w)| !n.others.is_empty() || !w.others.is_empty())
            .collect(),
    }
}

/// How much slower `rate` is than `base`, in percent.
pub fn slowdown_pct(base: f64, rate: f64) -> f64 {
    (base - rate) / base * 100.0
}

/// The watched programs' run time per connect of the storm, µs, per (cost) run.
pub fn bpf_us_per_connect(windows: &[Window]) -> Runs {
    Runs::of(windows, |w| {
        let connects = w.storm["connects"].as_f64().unwrap_or(0.0);
        if connects > 0.0 {
            total(&w.progs).run_time_ns as f64 / connects / 1000.0
        } else {
            f64::NAN
        }
    })
}

/// The storm's CPU time per connect, µs, per run.
pub fn cpu_per_connect(windows: &[Window]) -> Runs {
    Runs::of(windows, |w| {
        w.storm["cpu_us_per_connect"].as_f64().unwrap_or(f64::NAN)
    })
}

/// "exported 12,000, received 11,900, lost 100" from a stop record.
pub fn stop_summary(stop: Option<&Value>, lines: u64) -> String {
    let Some(stop) = stop else {
        return format!("no stop record ({} lines)", int(lines as f64));
    };
    let mut events = 0.0;
    let mut exported = 0.0;
    let mut received = 0.0;
    if let Some(totals) = stop["totals"].as_object() {
        for kind in totals.values() {
            events += kind["events"].as_f64().unwrap_or(0.0);
            exported += kind["exported"].as_f64().unwrap_or(0.0);
            received += kind["received"].as_f64().unwrap_or(0.0);
        }
    }
    format!(
        "{} events counted, {} exported ({:.0}%), {} received, {} lost, {} undelivered",
        int(events),
        int(exported),
        if events > 0.0 {
            exported / events * 100.0
        } else {
            0.0
        },
        int(received),
        int(stop["lost"].as_f64().unwrap_or(0.0)),
        int(stop["undelivered"].as_f64().unwrap_or(0.0))
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;
    use crate::bench::harness::ProgCounters;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn integers_have_thousands_separators() {
        assert_eq!(int(0.0), "0");
        assert_eq!(int(999.4), "999");
        assert_eq!(int(1234.0), "1,234");
        assert_eq!(int(6_950_000.0), "6,950,000");
        assert_eq!(int(-1234.0), "-1,234");
        assert_eq!(int(f64::NAN), "–");
    }

    #[test]
    fn summaries_take_medians_per_program() {
        let window = |ns: u64, cnt: u64| Window {
            storm: Value::Null,
            others: BTreeSet::new(),
            progs: BTreeMap::from([(
                "kfree_skb".to_owned(),
                ProgCounters {
                    run_time_ns: ns,
                    run_cnt: cnt,
                },
            )]),
        };
        let s = summarize(&[window(2000, 10), window(3000, 10), window(10_000, 10)]);
        assert_eq!(s[0].name, "kfree_skb");
        assert_eq!(s[0].ns, 300.0);
        assert_eq!(s[0].events, 10.0);
        assert_eq!(s[1].name, "all programs");
        assert_eq!(s[1].ns, 300.0);
    }
}
