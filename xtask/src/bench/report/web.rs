//! Section 6 of BENCHMARKS.md and its summary rows: the web workload beside the empty-program
//! floors and tcpstates.
use std::{collections::BTreeSet, fmt::Write as _};

use super::{Report, SummaryRow};
use crate::bench::{
    TARGET_SLOWDOWN_PCT, TARGET_WEB_DAEMON_NS, TARGET_WEB_FLOOR_RATIO,
    harness::ns_per_event,
    stats::{Runs, int, pct, status},
    web::{
        NGINX_WORKERS, PAGE_BYTES, WEB_SECS, WRK_CONNECTIONS, Web, WebConfig, WebRow, WebWindow,
        paired_slowdowns, runs, slowdown_of_medians,
    },
};

/// Medians over a configuration's CPU rounds.
#[derive(Clone, Copy, Debug)]
struct Cost {
    ns_per_run: f64,
    runs_per_request: f64,
    ns_per_request: f64,
    daemon_ns_per_request: f64,
    rss_mib: f64,
    hwm_mib: f64,
}

fn cost(row: &WebRow) -> Cost {
    let c = &row.cost;
    let mib = |f: fn(&WebWindow) -> Option<u64>| {
        runs(c, |w| f(w).map_or(f64::NAN, |kib| kib as f64 / 1024.0)).median()
    };
    Cost {
        ns_per_run: runs(c, |w| {
            ns_per_event(crate::bench::harness::total(&w.progs)).unwrap_or(f64::NAN)
        })
        .median(),
        runs_per_request: runs(c, WebWindow::runs_per_request).median(),
        ns_per_request: runs(c, WebWindow::bpf_ns_per_request).median(),
        daemon_ns_per_request: runs(c, WebWindow::daemon_ns_per_request).median(),
        rss_mib: mib(|w| w.daemon.map(|d| d.rss_kib)),
        hwm_mib: mib(|w| w.daemon.map(|d| d.hwm_kib)),
    }
}

fn ns_or_dash(x: f64) -> String {
    if x.is_finite() {
        int(x)
    } else {
        "–".to_owned()
    }
}

fn mib_pair(c: Cost) -> String {
    if c.rss_mib.is_finite() {
        format!("{:.1} / {:.1} MiB", c.rss_mib, c.hwm_mib)
    } else {
        "–".to_owned()
    }
}

impl Report {
    fn web_floor(&self) -> Option<Cost> {
        self.web.row(WebConfig::EmptyClassic).map(cost)
    }

    /// "empty classic: 800; empty raw: 790; tcpstates: 110,000" for the configurations measured.
    fn web_beside(&self, f: impl Fn(&Web, &WebRow) -> String) -> String {
        [
            WebConfig::EmptyClassic,
            WebConfig::EmptyRaw,
            WebConfig::Tcpstates,
        ]
        .into_iter()
        .filter_map(|config| self.web.row(config))
        .map(|row| format!("{}: {}", row.config.short(), f(&self.web, row)))
        .collect::<Vec<_>>()
        .join("; ")
    }

    pub fn web_summary_rows(&self) -> Vec<SummaryRow> {
        let web = &self.web;
        if let Some(why) = &web.skipped {
            return vec![SummaryRow {
                what: "6. web workload (nginx + wrk)".to_owned(),
                result: format!("not measured: {why}"),
                target: String::new(),
                status: String::new(),
            }];
        }
        let Some(observer) = web.row(WebConfig::Observer) else {
            return Vec::new();
        };
        let rounds = web.none.len();
        let c = cost(observer);
        let floor = self.web_floor();
        let mut rows = Vec::new();
        let ratio = floor.map_or(f64::NAN, |f| c.ns_per_request / f.ns_per_request);
        rows.push(SummaryRow {
            what: "6. web workload: BPF ns per request, observer (default options)".to_owned(),
            result: format!(
                "{} ns ({:.1}× the empty classic floor; {}; {} program runs per request; \
                 median of {} rounds)",
                ns_or_dash(c.ns_per_request),
                ratio,
                self.web_beside(|_, r| format!("{} ns", ns_or_dash(cost(r).ns_per_request))),
                format_args!("{:.1}", c.runs_per_request),
                observer.cost.len()
            ),
            target: format!(
                "≤ {TARGET_WEB_FLOOR_RATIO}× floor ({} ns)",
                floor.map_or("–".to_owned(), |f| int(
                    f.ns_per_request * TARGET_WEB_FLOOR_RATIO
                ))
            ),
            status: status(ratio <= TARGET_WEB_FLOOR_RATIO).to_owned(),
        });
        rows.push(SummaryRow {
            what: "6. web workload: daemon CPU per request (utime + stime)".to_owned(),
            result: format!(
                "{} ns{}",
                ns_or_dash(c.daemon_ns_per_request),
                web.row(WebConfig::Tcpstates)
                    .map_or(String::new(), |t| format!(
                        " (tcpstates: {} ns)",
                        ns_or_dash(cost(t).daemon_ns_per_request)
                    ))
            ),
            target: format!("≤ {} ns", int(TARGET_WEB_DAEMON_NS)),
            status: status(c.daemon_ns_per_request <= TARGET_WEB_DAEMON_NS).to_owned(),
        });
        let slow = slowdown_of_medians(web, observer);
        rows.push(SummaryRow {
            what: "6. web workload: throughput slowdown, stats off (slowdown of medians)"
                .to_owned(),
            result: format!(
                "{} ({} → {} requests/s, {rounds} rounds; {})",
                pct(slow),
                int(runs(&web.none, WebWindow::rate).median()),
                int(runs(&observer.rate, WebWindow::rate).median()),
                self.web_beside(|web, r| pct(slowdown_of_medians(web, r)))
            ),
            target: format!("≤ {TARGET_SLOWDOWN_PCT}%"),
            status: status(slow <= TARGET_SLOWDOWN_PCT).to_owned(),
        });
        rows.push(SummaryRow {
            what: "6. web workload: daemon memory, VmRSS / peak VmHWM".to_owned(),
            result: mib_pair(c),
            target: "(reported)".to_owned(),
            status: String::new(),
        });
        rows
    }

    pub fn render_web(&self, s: &mut String) {
        let web = &self.web;
        let _ = writeln!(
            s,
            "## 6. Web workload (nginx, one connection per request)\n"
        );
        if let Some(why) = &web.skipped {
            let _ = writeln!(s, "Not measured: {why}.\n");
            return;
        }
        let rounds = web.none.len();
        let _ = writeln!(
            s,
            "nginx (Debian `nginx-light`, {NGINX_WORKERS} workers, `keepalive_timeout 0`) on \
             127.0.0.1 serving a {PAGE_BYTES} byte file, loaded by `wrk -t1 -c{WRK_CONNECTIONS} \
             -d{WEB_SECS}s -H \"Connection: close\"`: one TCP connection per request. {rounds} \
             alternated rounds; each runs wrk with nothing attached, then attaches each \
             configuration in turn for a throughput run (`kernel.bpf_stats_enabled=0`) and a CPU \
             run (stats on: the programs' `run_time_ns` and `run_cnt` deltas over wrk's requests, \
             the daemon's utime + stime from /proc/PID/stat, its VmRSS and VmHWM at the end). \
             The floors are `mov r0, 0; exit` loaded with bpf(2) and attached to the same six \
             tracepoints observer uses: what any tool on these hooks pays before doing anything.\n"
        );
        let _ = writeln!(
            s,
            "| configuration | requests/s, median (rounds) | slowdown of medians, stats off | paired slowdown, median (rounds) | BPF ns per run | runs per request | BPF ns per request | × classic floor | daemon CPU ns per request | daemon VmRSS / VmHWM |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let none = runs(&web.none, WebWindow::rate);
        let _ = writeln!(
            s,
            "| nothing attached | {} ({}) | – | – | – | – | – | – | – | – |",
            int(none.median()),
            none.show(int)
        );
        let floor = self.web_floor();
        for row in &web.rows {
            if row.cost.is_empty() {
                let why = row.not_started.as_deref().unwrap_or("no runs");
                let _ = writeln!(
                    s,
                    "| {} | not started: {why} | – | – | – | – | – | – | – | – |",
                    row.config.label()
                );
                continue;
            }
            let rates = runs(&row.rate, WebWindow::rate);
            let paired = paired_slowdowns(row);
            let c = cost(row);
            let _ = writeln!(
                s,
                "| {}{} | {} ({}) | {} | {} ({}) | {} | {:.1} | {} | {} | {} | {} |",
                row.config.label(),
                mark(row),
                int(rates.median()),
                rates.show(int),
                pct(slowdown_of_medians(web, row)),
                pct(paired.median()),
                paired.show(pct),
                ns_or_dash(c.ns_per_run),
                c.runs_per_request,
                ns_or_dash(c.ns_per_request),
                floor.map_or("–".to_owned(), |f| format!(
                    "{:.1}×",
                    c.ns_per_request / f.ns_per_request
                )),
                ns_or_dash(c.daemon_ns_per_request),
                mib_pair(c)
            );
        }
        let _ = writeln!(s);
        self.render_web_targets(s);
        self.render_web_programs(s);
    }

    fn render_web_targets(&self, s: &mut String) {
        let rows = self.web_summary_rows();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(s, "Targets (issue 14):\n");
        for row in rows {
            let what = row
                .what
                .strip_prefix("6. web workload: ")
                .unwrap_or(&row.what);
            let _ = writeln!(
                s,
                "- {what}: {}; target {}{}",
                row.result,
                row.target,
                if row.status.is_empty() {
                    String::new()
                } else {
                    format!(": {}", row.status)
                }
            );
        }
        let _ = writeln!(s);
    }

    fn render_web_programs(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "Per program, medians of the CPU rounds (programs that did not run are left out):\n"
        );
        let _ = writeln!(
            s,
            "| configuration | program | runs per request | ns per run (rounds) | ns per request |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        for row in self.web.rows.iter().filter(|r| !r.cost.is_empty()) {
            // Programs that never ran (e.g. retransmits on loopback) are left out.
            let names: BTreeSet<&String> = row
                .cost
                .iter()
                .flat_map(|w| w.progs.iter())
                .filter(|(_, c)| c.run_cnt > 0)
                .map(|(name, _)| name)
                .collect();
            for name in names {
                let counters = |w: &WebWindow| w.progs.get(name).copied().unwrap_or_default();
                let per_request = |w: &WebWindow, x: u64| {
                    if w.wrk.requests > 0 {
                        x as f64 / w.wrk.requests as f64
                    } else {
                        f64::NAN
                    }
                };
                let ns: Runs = runs(&row.cost, |w| ns_per_event(counters(w)).unwrap_or(f64::NAN));
                let _ = writeln!(
                    s,
                    "| {} | `{name}` | {:.2} | {} ({}) | {} |",
                    row.config.short(),
                    runs(&row.cost, |w| per_request(w, counters(w).run_cnt)).median(),
                    ns_or_dash(ns.median()),
                    ns.show(ns_or_dash),
                    ns_or_dash(
                        runs(&row.cost, |w| per_request(w, counters(w).run_time_ns)).median()
                    )
                );
            }
        }
        let _ = writeln!(s);
    }
}

/// `*` when another process had tracing programs attached during a run of the row.
fn mark(row: &WebRow) -> &'static str {
    let marked = |w: &WebWindow| !w.others.is_empty();
    if row
        .rate
        .iter()
        .chain(&row.cost)
        .chain(&row.paired_none)
        .any(marked)
    {
        "*"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::{
        Workload,
        harness::ProgCounters,
        web::{DaemonUse, Wrk},
    };

    fn window(per_sec: f64, progs: &[(&str, u64, u64)], daemon_ticks_ns: Option<f64>) -> WebWindow {
        WebWindow {
            wrk: Wrk {
                requests: (per_sec * 5.0) as u64,
                secs: 5.0,
                per_sec,
                errors: 0,
            },
            progs: progs
                .iter()
                .map(|&(name, run_time_ns, run_cnt)| {
                    (
                        name.to_owned(),
                        ProgCounters {
                            run_time_ns,
                            run_cnt,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            daemon: daemon_ticks_ns.map(|cpu_ns| DaemonUse {
                cpu_ns,
                rss_kib: 20 * 1024,
                hwm_kib: 24 * 1024,
            }),
            others: BTreeSet::new(),
        }
    }

    fn row(
        config: WebConfig,
        rate: f64,
        progs: &[(&str, u64, u64)],
        daemon: Option<f64>,
    ) -> WebRow {
        WebRow {
            config,
            rate: vec![window(rate, &[], None)],
            paired_none: vec![window(20_000.0, &[], None)],
            cost: vec![window(rate, progs, daemon)],
            programs: progs.iter().map(|p| p.0.to_owned()).collect(),
            not_started: None,
        }
    }

    fn report() -> Report {
        // 100,000 requests per CPU run (20k/s for 5 s).
        Report {
            workloads: BTreeSet::from([Workload::Web]),
            web: Web {
                skipped: None,
                none: vec![window(20_000.0, &[], None)],
                rows: vec![
                    row(
                        WebConfig::Observer,
                        19_000.0,
                        // 1.1 M runs at ~363 ns: 4,000 ns per request at 19k/s.
                        &[
                            ("inet_sock_set_s", 380_000_000, 950_000),
                            ("kfree_skb", 0, 95_000),
                        ],
                        Some(95_000.0 * 5_000.0),
                    ),
                    row(
                        WebConfig::EmptyClassic,
                        20_000.0,
                        &[("inet_sock_set_state", 80_000_000, 1_100_000)],
                        None,
                    ),
                    WebRow {
                        not_started: Some("not installed".to_owned()),
                        ..row(WebConfig::Tcpstates, 0.0, &[], None)
                    },
                ],
            },
            ..Report::default()
        }
        .with_no_tcpstates_runs()
    }

    impl Report {
        fn with_no_tcpstates_runs(mut self) -> Self {
            for row in &mut self.web.rows {
                if row.not_started.is_some() {
                    row.rate.clear();
                    row.cost.clear();
                    row.paired_none.clear();
                }
            }
            self
        }
    }

    #[test]
    fn web_section_shows_figures_beside_the_floor() {
        let r = report();
        let mut s = String::new();
        r.render_web(&mut s);
        assert!(s.starts_with("## 6. Web workload"));
        assert!(s.contains("| nothing attached | 20,000 (20,000) |"), "{s}");
        // observer: 380 ms over 95,000 requests = 4,000 ns; floor 80 ms / 100,000 = 800 ns.
        assert!(s.contains("| 4,000 | 5.0× |"), "{s}");
        assert!(s.contains("| 5,000 | 20.0 / 24.0 MiB |"), "{s}");
        assert!(s.contains("| 5.0% | 5.0% (5.0%) |"), "{s}");
        assert!(
            s.contains("libbpf-tools `tcpstates` | not started: not installed |"),
            "{s}"
        );
        assert!(
            s.contains("| observer | `inet_sock_set_s` | 10.00 | 400 (400) | 4,000 |"),
            "{s}"
        );
        assert!(
            s.contains("target ≤ 2× floor (1,600 ns): **MISSED**"),
            "{s}"
        );
        assert!(s.contains("target ≤ 300 ns: **MISSED**"), "{s}");
    }

    #[test]
    fn web_summary_judges_the_targets() {
        let rows = report().web_summary_rows();
        assert_eq!(rows.len(), 4);
        assert!(
            rows[0]
                .result
                .starts_with("4,000 ns (5.0× the empty classic floor")
        );
        assert!(rows[0].result.contains("empty classic: 800 ns"));
        assert!(rows.iter().take(3).all(|r| r.status == "**MISSED**"));
        let skipped = Report {
            web: Web {
                skipped: Some("wrk: not installed".to_owned()),
                ..Web::default()
            },
            ..Report::default()
        };
        let rows = skipped.web_summary_rows();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].result.contains("not measured"));
        // An empty run renders without panicking.
        let mut s = String::new();
        Report::default().render_web(&mut s);
        assert!(s.contains("| nothing attached | – () |"), "{s}");
    }
}
