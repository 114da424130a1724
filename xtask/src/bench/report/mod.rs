//! BENCHMARKS.md: the summary table, one section per workload, method and caveats. Rendering
//! does no I/O: everything comes from the measured [`Report`].

mod sections;
mod web;
use std::{collections::BTreeSet, fmt::Write as _, time::Duration};

use serde_json::Value;

use super::{
    Machine, ONE_BY_ONE_ARGS, RETRANS_CONNS, RETRANS_DROP_PROBABILITY, TARGET_EVENTS_PER_SEC,
    TARGET_NS_PER_EVENT, TARGET_RSS_MIB, TARGET_SLOWDOWN_PCT, TARGET_STARTUP_SECS, Workload,
    pipeline::Pipeline,
    refused::{AlternatedRow, Refused, Window},
    retrans::Retrans,
    startup::Startup,
    stats::{
        Runs, all_programs, bpf_us_per_connect, cpu_per_connect, f3, int, median, paired_slowdowns,
        pct, slowdown_pct, status, summarize, worst_judged,
    },
    tools::{ToolOutcome, ToolResult},
    web::Web,
};

#[derive(Debug, Default)]
pub struct Report {
    pub machine: Machine,
    pub args_runs: u32,
    pub storm_secs: f64,
    pub startup: Startup,
    pub pipeline: Pipeline,
    pub refused: Refused,
    pub retrans: Retrans,
    pub tools: Vec<ToolResult>,
    pub alternated_none: Vec<Window>,
    pub alternated: Vec<AlternatedRow>,
    pub web: Web,
    /// The workloads measured (`--only`); the others' sections are left out.
    pub workloads: BTreeSet<Workload>,
    pub elapsed: Duration,
}

pub struct SummaryRow {
    pub what: String,
    pub result: String,
    pub target: String,
    pub status: String,
}

impl Report {
    /// Every storm run of the report.
    pub fn windows(&self) -> Vec<&Window> {
        let mut all: Vec<&Window> = self.refused.none.iter().collect();
        for runs in [
            &self.refused.default,
            &self.refused.one_by_one,
            &self.retrans.default,
            &self.retrans.one_by_one,
        ] {
            all.extend(runs.cost.iter().chain(&runs.rate).chain(&runs.paired_none));
        }
        for tool in &self.tools {
            if let ToolOutcome::Measured {
                cost, none, rate, ..
            } = &tool.outcome
            {
                all.extend([cost.as_ref(), none.as_ref(), rate.as_ref()]);
            }
        }
        all.extend(&self.alternated_none);
        for row in &self.alternated {
            all.extend(&row.rate);
        }
        all
    }

    /// Other processes seen with tracing programs during the runs.
    pub fn other_tracers(&self) -> BTreeSet<String> {
        self.windows()
            .into_iter()
            .flat_map(|w| w.others.iter().cloned())
            .collect()
    }

    pub fn rates(windows: &[Window]) -> Runs {
        Runs::of(windows, Window::rate)
    }

    pub fn baseline_rate(&self) -> f64 {
        Self::rates(&self.refused.none).median()
    }

    pub fn slowdown(&self, rate: f64) -> f64 {
        slowdown_pct(self.baseline_rate(), rate)
    }

    pub fn pipeline_run(&self, mode: &str) -> Option<&Value> {
        self.pipeline.runs.iter().find(|v| v["mode"] == mode)
    }

    pub fn summary_rows(&self) -> Vec<SummaryRow> {
        let mut rows = Vec::new();
        let runs = self.args_runs;
        for (workload, storm, default, one_by_one) in [
            (
                Workload::Refused,
                "refused-connect storm",
                &self.refused.default,
                &self.refused.one_by_one,
            ),
            (
                Workload::Retrans,
                "retransmit storm",
                &self.retrans.default,
                &self.retrans.one_by_one,
            ),
        ] {
            if !self.ran(workload) {
                continue;
            }
            let summary = summarize(&default.cost);
            let obo = summarize(&one_by_one.cost);
            if let Some(worst) = worst_judged(&summary) {
                rows.push(SummaryRow {
                    what: format!(
                        "1. kernel cost, {storm}, default options: slowest program (`{}`)",
                        worst.name
                    ),
                    result: format!("{} ns/event (median of {runs})", int(worst.ns)),
                    target: format!("≤ {} ns", int(TARGET_NS_PER_EVENT)),
                    status: status(worst.ns <= TARGET_NS_PER_EVENT).to_owned(),
                });
            }
            if let (Some(all), Some(all_obo)) = (all_programs(&summary), all_programs(&obo)) {
                rows.push(SummaryRow {
                    what: format!("1. kernel cost, {storm}, default options: all programs"),
                    result: format!(
                        "{} ns/event over {} events/run",
                        int(all.ns),
                        int(all.events)
                    ),
                    target: format!("≤ {} ns", int(TARGET_NS_PER_EVENT)),
                    status: status(all.ns <= TARGET_NS_PER_EVENT).to_owned(),
                });
                rows.push(SummaryRow {
                    what: format!("1. kernel cost, {storm}, one-by-one export: all programs"),
                    result: format!(
                        "{} ns/event ({:.1}× default)",
                        int(all_obo.ns),
                        all_obo.ns / all.ns
                    ),
                    target: "(comparison)".to_owned(),
                    status: String::new(),
                });
            }
        }
        if self.ran(Workload::Refused) {
            let base = self.baseline_rate();
            let default_rate = Self::rates(&self.refused.default.rate).median();
            let obo_rate = Self::rates(&self.refused.one_by_one.rate).median();
            let slow = self.slowdown(default_rate);
            rows.push(SummaryRow {
                what: "2. host slowdown, refused storm, default options".to_owned(),
                result: format!(
                    "{} ({} → {} connects/s, medians of {} and {runs} runs; paired runs: {}; BPF \
                 time per connect: {:.0}% of a connect's CPU time)",
                    pct(slow),
                    int(base),
                    int(default_rate),
                    self.refused.none.len(),
                    pct(paired_slowdowns(
                        &self.refused.default.paired_none,
                        &self.refused.default.rate
                    )
                    .median()),
                    bpf_us_per_connect(&self.refused.default.cost).median()
                        / cpu_per_connect(&self.refused.none).median()
                        * 100.0
                ),
                target: format!("≤ {}%", TARGET_SLOWDOWN_PCT),
                status: status(slow <= TARGET_SLOWDOWN_PCT).to_owned(),
            });
            rows.push(SummaryRow {
                what: "2. host slowdown, refused storm, one-by-one export".to_owned(),
                result: format!(
                    "{} ({} connects/s; paired runs: {})",
                    pct(self.slowdown(obo_rate)),
                    int(obo_rate),
                    pct(paired_slowdowns(
                        &self.refused.one_by_one.paired_none,
                        &self.refused.one_by_one.rate
                    )
                    .median())
                ),
                target: "(comparison)".to_owned(),
                status: String::new(),
            });
        }
        let alternated = self.alternated_slowdowns();
        if !alternated.is_empty() {
            rows.push(SummaryRow {
                what: format!(
                    "2. host slowdown, refused storm, {} alternated rounds (slowdown of medians)",
                    self.alternated_none.len()
                ),
                result: alternated
                    .iter()
                    .map(|(label, slow)| format!("{label}: {}", pct(*slow)))
                    .collect::<Vec<_>>()
                    .join("; "),
                target: "(comparison)".to_owned(),
                status: String::new(),
            });
        }
        if let Some(v) = self.pipeline_run("engine") {
            let eps = v["events_per_sec"].as_f64().unwrap_or(0.0);
            rows.push(SummaryRow {
                what: format!(
                    "3. userspace, one core: {}",
                    v["label"].as_str().unwrap_or("?")
                ),
                result: format!(
                    "{:.2} M events/s ({} events, {} flows)",
                    eps / 1e6,
                    int(v["events"].as_f64().unwrap_or(0.0)),
                    int(v["distinct_flows"].as_f64().unwrap_or(0.0))
                ),
                target: "≥ 2 M/s".to_owned(),
                status: status(eps >= TARGET_EVENTS_PER_SEC).to_owned(),
            });
            let rss = v["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            rows.push(SummaryRow {
                what: format!(
                    "4. memory: VmRSS after tracking {} flows",
                    int(v["tracked_flows"].as_f64().unwrap_or(0.0))
                ),
                result: format!(
                    "{rss:.1} MiB (with the {:.1} MiB synthetic input still held: {:.1} MiB)",
                    v["input_bytes"].as_f64().unwrap_or(0.0) / 1024.0 / 1024.0,
                    v["rss_with_input_kib"].as_f64().unwrap_or(0.0) / 1024.0,
                ),
                target: format!("≤ {} MiB", TARGET_RSS_MIB),
                status: status(rss <= TARGET_RSS_MIB).to_owned(),
            });
        }
        if self.ran(Workload::Startup) {
            let startup = median(&self.startup.secs);
            rows.push(SummaryRow {
                what: "5. start-up: spawn to `start` record (load + attach)".to_owned(),
                result: format!(
                    "{} s (median of {}; {} of {} programs attached)",
                    f3(startup),
                    self.startup.secs.len(),
                    self.startup.attached,
                    self.startup.programs
                ),
                target: format!("< {} s", TARGET_STARTUP_SECS),
                status: status(startup < TARGET_STARTUP_SECS).to_owned(),
            });
        }
        if self.ran(Workload::Web) {
            rows.extend(self.web_summary_rows());
        }
        rows
    }

    /// Whether this run measured `workload` (`--only`).
    pub fn ran(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }

    pub fn render_summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| measurement | result | target | |");
        let _ = writeln!(s, "|---|---|---|---|");
        for row in self.summary_rows() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                row.what, row.result, row.target, row.status
            );
        }
        s
    }

    pub fn render(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Generated by `cargo xtask bench` (as root) on {}, commit {}; all numbers below come \
             from that one run ({:.0} s). Regenerate with `sudo -E cargo xtask bench`.\n",
            m.date,
            m.commit,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "## Machine\n");
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| CPU | {} |", m.cpu_model);
        let _ = writeln!(
            s,
            "| cores | {}{} |",
            m.cores,
            if m.virtual_machine {
                " (virtual machine)"
            } else {
                ""
            }
        );
        let _ = writeln!(s, "| memory | {:.1} GiB |", m.memory_gib);
        let _ = writeln!(s, "| kernel | Linux {} |", m.kernel);
        let _ = writeln!(
            s,
            "| load average (1, 5, 15 min) | {} at start, {} at end |",
            m.load_start, m.load_end
        );
        let _ = writeln!(s);
        if m.load1 > 1.0 {
            let _ = writeln!(
                s,
                "The machine was busy with other work during this run (load average above 1 on \
                 {} cores): rates and timings are noisier, and slower, than on an idle host.\n",
                m.cores
            );
        }
        let _ = writeln!(s, "## Summary\n");
        let _ = writeln!(s, "{}", self.render_summary());
        let others = self.other_tracers();
        if !others.is_empty() {
            let _ = writeln!(
                s,
                "Other processes had tracing BPF programs attached during some runs ({}): their \
                 programs ran on the storms' events too. Such runs are marked `*` below; \
                 medians leave them out where unmarked runs remain.\n",
                others.into_iter().collect::<Vec<_>>().join(", ")
            );
        }
        if self.ran(Workload::Refused) || self.ran(Workload::Retrans) {
            self.render_kernel_cost(&mut s);
        }
        if self.ran(Workload::Refused) {
            self.render_slowdown(&mut s);
        } else {
            self.render_alternated(&mut s);
        }
        if self.ran(Workload::Pipeline) {
            self.render_pipeline(&mut s);
        }
        if self.ran(Workload::Startup) {
            self.render_startup(&mut s);
        }
        if self.ran(Workload::Tools) {
            self.render_tools(&mut s);
        }
        if self.ran(Workload::Web) {
            self.render_web(&mut s);
        }
        self.render_method(&mut s);
        s
    }

    pub fn render_method(&self, s: &mut String) {
        let _ = writeln!(s, "## Method and caveats\n");
        let _ = writeln!(
            s,
            "- Load generators: `observer/examples/storm.rs` (`refused`: blocking `connect()` to \
             127.0.0.1:1 in a fresh namespace, one thread; `bulk`/`sink`: {RETRANS_CONNS} \
             connections over a veth pair between two namespaces, the server's iptables dropping \
             {}% of inbound TCP packets of 200 bytes or more with `-m statistic --mode random`). \
             No traffic leaves the bench's namespaces; they are deleted at the end.",
            RETRANS_DROP_PROBABILITY.parse::<f64>().unwrap_or(0.0) * 100.0
        );
        let _ = writeln!(
            s,
            "- observer runs on the host (it sees every namespace) with default options, or with \
             one-by-one export (`{}`): every event through the perf buffers, each waking the \
             reader (../shared/NOTES.md measured ~6,950 ns per event for that on this kind of \
             machine, with a single program on kfree_skb). Its stdout is read and discarded by \
             the bench.",
            ONE_BY_ONE_ARGS.join(" ")
        );
        let _ = writeln!(
            s,
            "- Programs are observer's own (prog ids from /proc/<pid>/fdinfo, names from \
             `bpftool prog show`, truncated to 15 characters). Counts include TCP events of \
             anything else running on the host during the window."
        );
        let _ = writeln!(
            s,
            "- With statistics on, the kernel adds two clock reads per program run (a few tens of \
             ns, included in ns/event); rates for the slowdown are measured with statistics off. \
             `kernel.bpf_stats_enabled` is restored to its previous value at the end."
        );
        let _ = writeln!(
            s,
            "- Refused storm, per connect: `inet_sock_set_state` runs twice (CLOSE→SYN_SENT, \
             SYN_SENT→CLOSE), `tcp_send_reset` and `tcp_receive_reset` once, `kfree_skb` for \
             the refused SYN (NO_SOCKET) and other frees."
        );
        let _ = writeln!(
            s,
            "- `run_time_ns` counts only the programs' own time. A classic tracepoint also costs \
             the kernel building its record before the program runs, which no program can \
             avoid: the first `floor` row (empty programs on the same tracepoints) is what any \
             classic-tracepoint tool pays on this storm before doing anything, and the second \
             (one per-CPU counter per event) what any tool that counts pays. observer's row \
             with `--attach raw` runs its raw tracepoint programs, which get the tracepoint's \
             arguments without a record being built, on the same storm."
        );
        if self.ran(Workload::Web) {
            let _ = writeln!(
                s,
                "- Web workload: nginx and wrk share the machine's cores with observer, so the \
                 throughput of one run moves by several percent between rounds of the same \
                 configuration; the CPU columns (BPF `run_time_ns` and the daemon's utime + stime, \
                 per request) are steadier. Requests are wrk's completed requests of the CPU run; \
                 program runs count every hit of the tracepoints on the host during it. The \
                 empty floors are this process's programs (no daemon: no daemon CPU or RSS)."
            );
        }
        let _ = writeln!(
            s,
            "- The retransmit storm runs at a few thousand events per second: each program run \
             then finds its maps and per-CPU data out of the CPU caches, so ns/event is higher \
             than in the refused storm, which runs the same code hundreds of thousands of \
             times per second."
        );
        let _ = writeln!(s);
    }
}
