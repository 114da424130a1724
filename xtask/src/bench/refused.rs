//! 1, 2. The refused-connect storm: observer's kernel cost per event and the host slowdown,
//! and the alternated rounds beside the floors. Also the storm window every storm workload runs.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::Duration,
};

use anyhow::{Result, ensure};
use serde_json::Value;

use super::{
    BenchArgs, Bins, STORM_NICE,
    harness::{
        BpfStats, Netns, ProgDeltas, check_interrupted, deltas, last_json, netns_name,
        ns_per_event, prog_counters, run_bounded, total, tracing_holders, wait_for_quiet,
    },
    say,
    stats::{int, ns_opt},
    tools::{
        EMPTY_CLASSIC, Export, FLOOR_COUNTER, OBSERVER_DEFAULT, Observer, Subject, short_label,
        with_subject,
    },
};

/// One storm run: the storm's own report and, when a process was watched with stats on, the
/// per-program deltas of its BPF programs.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub storm: Value,
    pub progs: ProgDeltas,
    /// Other processes holding tracing BPF programs (e.g. another observer) at the start or
    /// end of the run: their programs run on the storm's events too.
    pub others: BTreeSet<String>,
}

impl Window {
    pub fn rate(&self) -> f64 {
        self.storm["per_sec"].as_f64().unwrap_or(0.0)
    }
}

/// Runs one storm (`ip netns exec NS storm ARGS`) with `attached` (pid, program names) running
/// or nothing; with `cost`, BPF stats are on and the attached process's program counters are
/// taken around the storm.
pub fn storm_window(
    ns: &Netns,
    bins: &Bins,
    storm_args: &[String],
    attached: Option<(u32, &BTreeMap<u32, String>)>,
    stats: &BpfStats,
    cost: bool,
    secs: f64,
) -> Result<Window> {
    let ours = attached.map(|(pid, _)| pid);
    let mut others = wait_for_quiet(ours)?;
    let watched = attached.filter(|_| cost);
    stats.set(cost)?;
    let before = match watched {
        Some((pid, _)) => prog_counters(pid)?,
        None => BTreeMap::new(),
    };
    let outcome = run_bounded(
        ns.command(&bins.storm).args(storm_args),
        Duration::from_secs_f64(secs + 30.0),
    );
    let after = match watched {
        Some((pid, _)) => prog_counters(pid),
        None => Ok(BTreeMap::new()),
    };
    stats.set(false)?;
    let (status, stdout, stderr) = outcome?;
    ensure!(
        status.success(),
        "storm {} failed ({status}): {}",
        storm_args.join(" "),
        stderr.trim()
    );
    let after = after?;
    let progs = match watched {
        Some((_, names)) => deltas(&before, &after, names),
        None => ProgDeltas::new(),
    };
    others.extend(tracing_holders(ours));
    Ok(Window {
        storm: last_json(&stdout)?,
        progs,
        others,
    })
}

pub fn refused_args(secs: f64) -> Vec<String> {
    [
        "--nice",
        STORM_NICE,
        "refused",
        "--addr",
        "127.0.0.1:1",
        "--duration",
        &secs.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

// ---------------------------------------------------------------------------------------------
// 1, 2. Refused-connect storm

#[derive(Debug, Default)]
pub struct ModeRuns {
    /// Stats on: program costs.
    pub cost: Vec<Window>,
    /// Stats off: the storm's rate.
    pub rate: Vec<Window>,
    /// The run without observer just before each of `rate`.
    pub paired_none: Vec<Window>,
    /// Stop records and line counts.
    pub stops: Vec<(Option<Value>, u64)>,
}

#[derive(Debug, Default)]
pub struct Refused {
    pub none: Vec<Window>,
    pub default: ModeRuns,
    pub one_by_one: ModeRuns,
}

pub fn measure_refused(bins: &Bins, args: &BenchArgs, stats: &BpfStats) -> Result<Refused> {
    let ns = Netns::create(&netns_name("r"))?;
    let storm = refused_args(args.storm_secs);
    let secs = args.storm_secs;
    // Warm-up: first connects in a fresh namespace, page cache of the storm binary.
    storm_window(&ns, bins, &refused_args(0.5), None, stats, false, 0.5)?;
    let mut refused = Refused::default();
    // Each observer run is paired with a run without observer just before it (a busy machine's
    // background load drifts; pairs see about the same).
    for round in 0..args.runs {
        for export in [Export::Default, Export::OneByOne] {
            let none = storm_window(&ns, bins, &storm, None, stats, false, secs)?;
            let observer = Observer::start(bins, export, &format!("refused-{export:?}-{round}"))?;
            let watched = Some((observer.pid(), &observer.names));
            let rate = storm_window(&ns, bins, &storm, watched, stats, false, secs)?;
            let cost = storm_window(&ns, bins, &storm, watched, stats, true, secs)?;
            let all = total(&cost.progs);
            say(&format!(
                "refused storm, run {}: no observer {} connects/s; observer {}: {} connects/s, \
                 {} ns/event over {} events (stats on)",
                round + 1,
                int(none.rate()),
                export_label(export),
                int(rate.rate()),
                ns_opt(ns_per_event(all)),
                int(all.run_cnt as f64),
            ));
            let stop = observer.stop();
            let runs = match export {
                Export::Default => &mut refused.default,
                Export::OneByOne => &mut refused.one_by_one,
            };
            runs.cost.push(cost);
            runs.rate.push(rate);
            runs.paired_none.push(none.clone());
            runs.stops.push(stop);
            refused.none.push(none);
        }
    }
    Ok(refused)
}

pub fn export_label(export: Export) -> &'static str {
    match export {
        Export::Default => "default",
        Export::OneByOne => "one-by-one",
    }
}

/// One configuration of the alternated rounds: its storm runs (stats off), and each round's run
/// without anything attached.
#[derive(Debug)]
pub struct AlternatedRow {
    pub label: &'static str,
    pub rate: Vec<Window>,
    pub paired_none: Vec<Window>,
    /// Why it was left out after a failed start.
    pub not_started: Option<String>,
}

/// The slowdown comparison in alternated rounds: each round runs the refused storm with nothing
/// attached, with observer (default options) and with the two floors, one after the other, so
/// that a drift in the machine's background load hits every configuration alike. The empty
/// floor is loaded by this process (bpf(2)); the counter floor needs bpftrace (installed by the
/// tools step): without it, or with `--no-tools`, it is left out.
pub fn measure_alternated(
    bins: &Bins,
    args: &BenchArgs,
    stats: &BpfStats,
) -> Result<(Vec<Window>, Vec<AlternatedRow>)> {
    let ns = Netns::create(&netns_name("a"))?;
    let storm = refused_args(args.storm_secs);
    let secs = args.storm_secs;
    let mut specs = vec![Subject::Tool(&OBSERVER_DEFAULT), EMPTY_CLASSIC];
    if !args.no_tools {
        specs.push(Subject::Tool(&FLOOR_COUNTER));
    }
    let mut rows: Vec<AlternatedRow> = specs
        .iter()
        .map(|spec| AlternatedRow {
            label: spec.label(),
            rate: Vec::new(),
            paired_none: Vec::new(),
            not_started: spec.missing(),
        })
        .collect();
    let mut none_runs = Vec::new();
    for round in 0..args.rounds {
        check_interrupted()?;
        let none = storm_window(&ns, bins, &storm, None, stats, false, secs)?;
        let mut line = format!("round {}: none {}", round + 1, int(none.rate()));
        for (spec, row) in specs.iter().zip(rows.iter_mut()) {
            if row.not_started.is_some() {
                continue;
            }
            let measured = with_subject(*spec, &bins.observer, |watched, _| {
                storm_window(&ns, bins, &storm, watched, stats, false, secs)
            })?;
            let rate = match measured {
                Ok((_, rate)) => rate,
                Err(why) => {
                    say(&format!("{}: not started: {why}", spec.label()));
                    row.not_started = Some(why);
                    continue;
                }
            };
            let _ = write!(line, "; {} {}", short_label(spec.label()), int(rate.rate()));
            row.rate.push(rate);
            row.paired_none.push(none.clone());
        }
        say(&format!("alternated {line} connects/s"));
        none_runs.push(none);
    }
    Ok((none_runs, rows))
}
