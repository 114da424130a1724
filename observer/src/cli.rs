//! Command line: `observer run` and friends.
use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    daemon::{self, RunOptions},
    decode::EventKind,
    kernel::loader::LoadOptions,
    privileges,
};

/// Kernel-level TCP observer: retransmits, SYN and SYN-ACK retransmits (and, as they land,
/// drops, resets and stuck connections), per flow, from eBPF tracepoints.
#[derive(Debug, Parser)]
#[command(name = "observer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the kernel and stream events as JSON lines on stdout until SIGINT/SIGTERM.
    ///
    /// The first record is `start` (versions, attached programs, sysctl snapshot), the last is
    /// `stop` (exact totals per event kind and per flow from the kernel's own counters).
    /// Human messages go to stderr.
    Run(RunArgs),
    /// List the running kernel's drop reasons (names and numbers) and which are reported by
    /// default.
    Reasons,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Stop by itself after this many seconds (for scripts and tests).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Events exported per flow per second; further events of the flow are counted in the
    /// kernel but not exported. 0 exports every event.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub export_per_flow: u32,
    /// Flows tracked in the kernel's counter map (least recently used are evicted).
    #[arg(long, value_name = "N", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(16..=4_194_304))]
    pub max_flows: u32,
    /// Events exported per CPU per second over all flows: bounds the export cost of storms
    /// spread over many flows (the kernel still counts everything). 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub export_per_cpu: u32,
    /// Event kinds exported as records, comma-separated: `default` (all but `close`), `all`,
    /// or names (retransmit, syn_retransmit, synack_retransmit, drop, reset_sent,
    /// reset_received, connect, connect_failed, accept, close); `-NAME` removes one.
    #[arg(long, value_name = "KINDS", default_value = "default")]
    pub export_kinds: String,
    /// Drop reasons reported, comma-separated names of this kernel's `enum skb_drop_reason`:
    /// `default` (all but routine frees such as NOT_SPECIFIED, QUEUE_PURGE, SOCKET_CLOSE),
    /// `all`, `NAME`, `-NAME`. `observer reasons` lists them.
    #[arg(long, value_name = "REASONS", default_value = "default")]
    pub drop_reasons: String,
    /// Pages per CPU for the perf buffers (a power of two).
    #[arg(long, value_name = "PAGES", default_value_t = 64, value_parser = parse_pages)]
    pub perf_pages: usize,
}

/// Resolves `--export-kinds` into the kernel's bit mask.
pub fn export_kinds_mask(spec: &str) -> Result<u32, String> {
    let bit = |k: EventKind| 1u32 << k.kernel_kind();
    let mut mask = 0u32;
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "all" => mask |= EventKind::ALL.into_iter().map(bit).fold(0, |a, b| a | b),
            "default" => {
                mask |= EventKind::ALL
                    .into_iter()
                    .filter(|k| *k != EventKind::Close)
                    .map(bit)
                    .fold(0, |a, b| a | b)
            }
            _ => {
                let (remove, name) = match item.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, item),
                };
                let kind = EventKind::from_name(name)
                    .ok_or_else(|| format!("unknown event kind `{name}` in --export-kinds"))?;
                if remove {
                    mask &= !bit(kind);
                } else {
                    mask |= bit(kind);
                }
            }
        }
    }
    Ok(mask)
}

fn parse_pages(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n.is_power_of_two() && (1..=4096).contains(&n) {
        Ok(n)
    } else {
        Err("must be a power of two between 1 and 4096".to_owned())
    }
}

fn duration_from_secs(secs: Option<f64>) -> Result<Option<Duration>, String> {
    match secs {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(format!(
            "--duration must be a positive number of seconds, not {s}"
        )),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Reasons => reasons(),
    }
}

fn reasons() -> ExitCode {
    match crate::kernel::list_drop_reasons() {
        Ok(names) => {
            for (code, name) in names.iter() {
                let default = if crate::kernel::reasons::is_default(name) {
                    "default"
                } else {
                    ""
                };
                println!("{code:>4}  {name:<32} {default}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("observer: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let duration = match duration_from_secs(args.duration) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(2);
        }
    };
    let export_kinds = match export_kinds_mask(&args.export_kinds) {
        Ok(mask) => mask,
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(sentence) = privileges::check() {
        eprintln!("observer: {sentence}");
        return ExitCode::from(1);
    }
    let options = RunOptions {
        duration,
        load: LoadOptions {
            export_per_flow: args.export_per_flow,
            export_per_cpu: args.export_per_cpu,
            export_kinds,
            max_flows: args.max_flows,
            drop_reasons: args.drop_reasons,
        },
        perf_pages: args.perf_pages,
        queue_capacity: 65_536,
        context_interval: Duration::from_secs(1),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("observer: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(daemon::run(options, std::io::stdout())) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_are_checked() {
        assert_eq!(duration_from_secs(None), Ok(None));
        assert_eq!(
            duration_from_secs(Some(1.5)),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert!(duration_from_secs(Some(-1.0)).is_err());
        assert!(duration_from_secs(Some(f64::NAN)).is_err());
    }

    #[test]
    fn export_kinds_resolve_to_kernel_bits() {
        let default = export_kinds_mask("default").expect("valid");
        assert_eq!(default & (1 << observer_common::event_kind::CLOSE), 0);
        assert_ne!(default & (1 << observer_common::event_kind::DROP), 0);
        let all = export_kinds_mask("all").expect("valid");
        assert_ne!(all & (1 << observer_common::event_kind::CLOSE), 0);
        assert_eq!(
            export_kinds_mask("retransmit,drop").expect("valid"),
            (1 << observer_common::event_kind::RETRANSMIT)
                | (1 << observer_common::event_kind::DROP)
        );
        assert_eq!(
            export_kinds_mask("all,-drop").expect("valid")
                & (1 << observer_common::event_kind::DROP),
            0
        );
        assert!(export_kinds_mask("bogus").is_err());
    }

    #[test]
    fn perf_pages_must_be_powers_of_two() {
        assert_eq!(parse_pages("64"), Ok(64));
        assert!(parse_pages("3").is_err());
        assert!(parse_pages("0").is_err());
        assert!(parse_pages("x").is_err());
    }
}
