//! The sections of BENCHMARKS.md after the summary, one per workload.
use std::fmt::Write as _;

use super::Report;
use crate::bench::{
    MIN_EVENTS_JUDGED, PIPELINE_EVENTS, PIPELINE_FLOWS, STORM_NICE, TARGET_EVENTS_PER_SEC,
    TARGET_NS_PER_EVENT, TARGET_RSS_MIB, TARGET_SLOWDOWN_PCT, TARGET_STARTUP_SECS,
    TOOL_START_TIMEOUT, Workload,
    harness::{ns_per_event, total},
    stats::{
        all_programs, bpf_us_per_connect, cpu_per_connect, f3, int, list, mark, median, ns_opt,
        paired_slowdowns, pct, slowdown_pct, status, stop_summary, summarize,
    },
    tools::ToolOutcome,
};

impl Report {
    pub fn render_kernel_cost(&self, s: &mut String) {
        let runs = self.args_runs;
        let _ = writeln!(s, "## 1. Kernel cost per event\n");
        let _ = writeln!(
            s,
            "`run_time_ns / run_cnt` of each of observer's programs with `kernel.bpf_stats_enabled=1`, \
             as deltas over a {:.0} s storm; median of {runs} runs (each run a fresh observer). \
             Events are program runs: every hit of the tracepoint, whether or not observer keeps it. \
             Programs with fewer than {} events per run are listed but not judged.\n",
            self.storm_secs,
            int(MIN_EVENTS_JUDGED as f64)
        );
        for (workload, title, default, obo) in [
            (
                Workload::Refused,
                "Refused-connect storm (loopback, in a bench namespace)",
                &self.refused.default,
                &self.refused.one_by_one,
            ),
            (
                Workload::Retrans,
                "Retransmit storm (veth between two namespaces, 20% of inbound data segments dropped)",
                &self.retrans.default,
                &self.retrans.one_by_one,
            ),
        ] {
            if !self.ran(workload) {
                continue;
            }
            let _ = writeln!(s, "### {title}\n");
            let d = summarize(&default.cost);
            let o = summarize(&obo.cost);
            let _ = writeln!(
                s,
                "| program | events/run | ns/event, default (runs) | ns/event, one-by-one (runs) | one-by-one ÷ default | target ≤ {} ns |",
                int(TARGET_NS_PER_EVENT)
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---|");
            for p in &d {
                let q = o.iter().find(|q| q.name == p.name);
                let judged = p.events >= MIN_EVENTS_JUDGED as f64;
                let verdict = if judged {
                    status(p.ns <= TARGET_NS_PER_EVENT)
                } else {
                    "(too few events)"
                };
                let name = if p.name == "all programs" {
                    "**all programs**".to_owned()
                } else {
                    format!("`{}`", p.name)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} ({}) | {} | {} | {} |",
                    name,
                    int(p.events),
                    int(p.ns),
                    p.runs.show(int),
                    q.map_or("–".to_owned(), |q| format!(
                        "{} ({})",
                        int(q.ns),
                        q.runs.show(int)
                    )),
                    q.filter(|q| q.ns.is_finite() && p.ns > 0.0)
                        .map_or("–".to_owned(), |q| format!("{:.1}×", q.ns / p.ns)),
                    verdict
                );
            }
            let _ = writeln!(s);
            // Storm context and the observer's own accounting.
            let storm_info: Vec<String> = default
                .cost
                .iter()
                .map(|w| match w.storm["mode"].as_str() {
                    Some("bulk") => format!(
                        "{} segments retransmitted at {:.0} Mbit/s",
                        int(w.storm["total_retrans"].as_f64().unwrap_or(0.0)),
                        w.storm["mbit_per_sec"].as_f64().unwrap_or(0.0)
                    ),
                    _ => format!("{} connects/s", int(w.rate())),
                })
                .collect();
            let _ = writeln!(
                s,
                "Storm during the default-options runs (stats on): {}.\n",
                storm_info.join("; ")
            );
            for (label, runs) in [("default options", default), ("one-by-one export", obo)] {
                let _ = writeln!(
                    s,
                    "observer's own accounting, {label} (`stop` record, per run): {}.\n",
                    runs.stops
                        .iter()
                        .map(|(stop, lines)| stop_summary(stop.as_ref(), *lines))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
        }
        if !self.retrans.floors.is_empty() {
            let floors: Vec<String> = self
                .retrans
                .floors
                .iter()
                .map(|f| match &f.outcome {
                    ToolOutcome::NotStarted(why) => format!("{}: not started ({why})", f.label),
                    ToolOutcome::Measured { cost, .. } => {
                        let all = total(&cost.progs);
                        format!(
                            "{}: {} ns/event over {} events",
                            f.label,
                            ns_opt(ns_per_event(all)),
                            int(all.run_cnt as f64)
                        )
                    }
                })
                .collect();
            let _ = writeln!(
                s,
                "Floors on the retransmit storm (empty programs loaded with bpf(2) on observer's \
                 classic tracepoints, and a bpftrace counter on `tcp_retransmit_skb` and \
                 `kfree_skb`; 1 run each): {}. At a few thousand events per second every run starts with cold \
                 caches, so even these cost more than on the refused storm.\n",
                floors.join("; ")
            );
        }
    }

    pub fn render_slowdown(&self, s: &mut String) {
        let runs = self.args_runs;
        let _ = writeln!(s, "## 2. Host slowdown (refused-connect storm)\n");
        let _ = writeln!(
            s,
            "The storm's own rate (one thread of blocking connects to a closed port, nice \
             {STORM_NICE}), with BPF statistics off, {:.0} s per run. The target is judged as \
             specified, on the medians over {runs} runs. Each run with a tool attached is also \
             paired with a run without it (just before; for the other tools, just after). Two \
             columns are less sensitive to other load on the machine: the storm's CPU time per \
             connect (user + system, getrusage), and the BPF time per connect (the programs' \
             `run_time_ns` over the cost run divided by its connects), shown as a share of a \
             connect's CPU time without observer: the kernel-side part of the slowdown.\n",
            self.storm_secs
        );
        let _ = writeln!(
            s,
            "| configuration | connects/s, median (runs) | slowdown of medians | paired slowdown, median (runs) | CPU µs per connect, median (vs none) | BPF µs per connect (share) | target ≤ {}% |",
            TARGET_SLOWDOWN_PCT
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
        let none = Self::rates(&self.refused.none);
        let cpu_none = cpu_per_connect(&self.refused.none).median();
        let _ = writeln!(
            s,
            "| no observer | {} ({}) | – | – | {:.2} ({}) | – | |",
            int(none.median()),
            none.show(int),
            cpu_none,
            cpu_per_connect(&self.refused.none).show(|x| format!("{x:.1}"))
        );
        let cpu_vs_none = |cpu: f64| format!("{cpu:.2} ({:+.0}%)", (cpu / cpu_none - 1.0) * 100.0);
        let bpf_share = |bpf_us: f64| format!("{bpf_us:.2} ({:.0}%)", bpf_us / cpu_none * 100.0);
        for (label, runs, judged) in [
            ("observer, default options", &self.refused.default, true),
            (
                "observer, one-by-one export",
                &self.refused.one_by_one,
                false,
            ),
        ] {
            let rates = Self::rates(&runs.rate);
            let slow = self.slowdown(rates.median());
            let paired = paired_slowdowns(&runs.paired_none, &runs.rate);
            let _ = writeln!(
                s,
                "| {label} | {} ({}) | {} | {} ({}) | {} | {} | {} |",
                int(rates.median()),
                rates.show(int),
                pct(slow),
                pct(paired.median()),
                paired.show(pct),
                cpu_vs_none(cpu_per_connect(&runs.rate).median()),
                bpf_share(bpf_us_per_connect(&runs.cost).median()),
                if judged {
                    status(slow <= TARGET_SLOWDOWN_PCT)
                } else {
                    "(comparison)"
                }
            );
        }
        for tool in &self.tools {
            if let ToolOutcome::Measured {
                none, rate, cost, ..
            } = &tool.outcome
            {
                let paired =
                    paired_slowdowns(std::slice::from_ref(none), std::slice::from_ref(rate));
                let _ = writeln!(
                    s,
                    "| {}{} (1 run) | {} | {} | {} | {} | {} | (comparison) |",
                    tool.label,
                    mark(&[none, rate, cost]),
                    int(rate.rate()),
                    pct(self.slowdown(rate.rate())),
                    pct(paired.median()),
                    cpu_vs_none(cpu_per_connect(std::slice::from_ref(rate)).median()),
                    bpf_share(bpf_us_per_connect(std::slice::from_ref(cost)).median())
                );
            }
        }
        let _ = writeln!(s);
        self.render_alternated(s);
    }

    pub fn render_alternated(&self, s: &mut String) {
        if self.alternated_none.is_empty() {
            return;
        }
        let rounds = self.alternated_none.len();
        let _ = writeln!(
            s,
            "### Alternated rounds
"
        );
        let _ = writeln!(
            s,
            "{rounds} rounds; each runs the storm ({:.0} s, statistics off) with nothing attached, \
             then with each configuration below in turn, so that a drift in the machine's load \
             hits every configuration alike. The floors bound what any tool on these classic \
             tracepoints can reach: empty programs pay only for the kernel's record building and \
             the program call (`mov r0, 0; exit` loaded with bpf(2) and attached to the \
             tracepoints observer uses), the counter row (bpftrace) for one map update per \
             event on top.\n",
            self.storm_secs
        );
        let _ = writeln!(
            s,
            "| configuration | connects/s, median (runs) | slowdown of medians | paired slowdown, median (runs) | CPU µs per connect, median (vs none) |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let none = Self::rates(&self.alternated_none);
        let cpu_none = cpu_per_connect(&self.alternated_none).median();
        let _ = writeln!(
            s,
            "| no observer | {} ({}) | – | – | {cpu_none:.2} |",
            int(none.median()),
            none.show(int),
        );
        for row in &self.alternated {
            if row.rate.is_empty() {
                let why = row.not_started.as_deref().unwrap_or("no runs");
                let _ = writeln!(s, "| {} | {why} | – | – | – |", row.label);
                continue;
            }
            let rates = Self::rates(&row.rate);
            let paired = paired_slowdowns(&row.paired_none, &row.rate);
            let cpu = cpu_per_connect(&row.rate).median();
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {} | {} ({}) | {cpu:.2} ({:+.0}%) |",
                row.label,
                int(rates.median()),
                rates.show(int),
                pct(slowdown_pct(none.median(), rates.median())),
                pct(paired.median()),
                paired.show(pct),
                (cpu / cpu_none - 1.0) * 100.0
            );
        }
        let _ = writeln!(s);
    }

    /// Slowdown of the medians in the alternated rounds, per configuration that ran.
    pub fn alternated_slowdowns(&self) -> Vec<(&'static str, f64)> {
        let none = Self::rates(&self.alternated_none).median();
        self.alternated
            .iter()
            .filter(|row| !row.rate.is_empty())
            .map(|row| {
                (
                    row.label,
                    slowdown_pct(none, Self::rates(&row.rate).median()),
                )
            })
            .collect()
    }

    pub fn render_pipeline(&self, s: &mut String) {
        let _ = writeln!(s, "## 3, 4. Userspace throughput and memory\n");
        let _ = writeln!(
            s,
            "`observer/examples/pipeline_bench.rs`, pinned to one core: {} raw `TcpEvent` samples \
             for {} distinct flows (to 1,000 peers) laid out as in a perf ring, decoded with \
             `observer::decode::decode_sample` and aggregated (nice {STORM_NICE}). VmRSS from \
             /proc/self/status afterwards, once after freeing the {:.1} MiB synthetic input (what \
             the process holds for the flows; the daemon reads perf rings instead) and once \
             before; the peak (VmHWM) includes the input.\n",
            int(PIPELINE_EVENTS as f64),
            int(f64::from(PIPELINE_FLOWS)),
            self.pipeline
                .runs
                .first()
                .and_then(|v| v["input_bytes"].as_f64())
                .unwrap_or(0.0)
                / 1024.0
                / 1024.0
        );
        let _ = writeln!(
            s,
            "| stage | events/s | ns/event | flows tracked | VmRSS | VmRSS with input | peak (VmHWM) | target |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|");
        for v in &self.pipeline.runs {
            let eps = v["events_per_sec"].as_f64().unwrap_or(0.0);
            let rss = v["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            let target = if v["mode"] == "engine" {
                format!(
                    "≥ 2 M/s: {}; ≤ {} MiB: {}",
                    status(eps >= TARGET_EVENTS_PER_SEC),
                    TARGET_RSS_MIB,
                    status(rss <= TARGET_RSS_MIB)
                )
            } else {
                "(breakdown)".to_owned()
            };
            let _ = writeln!(
                s,
                "| {} | {:.2} M | {:.0} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
                v["label"].as_str().unwrap_or("?"),
                eps / 1e6,
                v["ns_per_event"].as_f64().unwrap_or(0.0),
                int(v["tracked_flows"].as_f64().unwrap_or(0.0)),
                rss,
                v["rss_with_input_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                v["hwm_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                target
            );
        }
        if let Some(v) = self.pipeline_run("engine") {
            let _ = writeln!(
                s,
                "\nEngine tables at the end: {}; {} ticks, {} anomaly records produced.",
                v["engine"], v["ticks"], v["anomaly_events"]
            );
        }
        let _ = writeln!(s);
    }

    pub fn render_startup(&self, s: &mut String) {
        let _ = writeln!(s, "## 5. Start-up\n");
        let _ = writeln!(
            s,
            "From spawning `target/release/observer run` to its `start` record on stdout (tracefs \
             and BTF discovery, load, attach): median {} s, runs {} s; target < {} s: {}.\n",
            f3(median(&self.startup.secs)),
            list(&self.startup.secs, f3),
            TARGET_STARTUP_SECS,
            status(median(&self.startup.secs) < TARGET_STARTUP_SECS)
        );
    }

    pub fn render_tools(&self, s: &mut String) {
        let _ = writeln!(s, "## Other tools on this kernel\n");
        if self.tools.is_empty() {
            let _ = writeln!(s, "Not measured in this run (`--no-tools`).\n");
            return;
        }
        let _ = writeln!(
            s,
            "Each started with a {} s limit (`apt-get install`ed first when missing). Those that \
             start are measured on the same refused-connect storm, 1 run: the storm's rate (stats \
             off), then the kernel cost (stats on), then a run without the tool. observer's rows \
             (medians from sections 1 and 2) are for comparison.\n",
            TOOL_START_TIMEOUT.as_secs()
        );
        let _ = writeln!(
            s,
            "| tool | outcome | ns per program run | program runs | slowdown (paired) |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        for (label, runs) in [
            ("observer, default options", &self.refused.default),
            ("observer, one-by-one export", &self.refused.one_by_one),
        ] {
            let summary = summarize(&runs.cost);
            if let Some(all) = all_programs(&summary) {
                let paired = paired_slowdowns(&runs.paired_none, &runs.rate);
                let _ = writeln!(
                    s,
                    "| {label} | started | {} | {} | {} |",
                    int(all.ns),
                    int(all.events),
                    pct(paired.median())
                );
            }
        }
        for tool in &self.tools {
            match &tool.outcome {
                ToolOutcome::NotStarted(why) => {
                    let _ = writeln!(s, "| {} | not started: {} | – | – | – |", tool.label, why);
                }
                ToolOutcome::Measured {
                    programs,
                    cost,
                    none,
                    rate,
                } => {
                    let all = total(&cost.progs);
                    let paired =
                        paired_slowdowns(std::slice::from_ref(none), std::slice::from_ref(rate));
                    let _ = writeln!(
                        s,
                        "| {}{} | started; programs: {} | {} | {} | {} |",
                        tool.label,
                        mark(&[none, rate, cost]),
                        programs
                            .iter()
                            .map(|p| format!("`{p}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        ns_opt(ns_per_event(all)),
                        int(all.run_cnt as f64),
                        pct(paired.median())
                    );
                }
            }
        }
        let _ = writeln!(s);
    }
}
