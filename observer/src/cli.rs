//! Command line: `observer run` and friends.
use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    daemon::{self, RunOptions},
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
    /// Pages per CPU for the perf buffers (a power of two).
    #[arg(long, value_name = "PAGES", default_value_t = 64, value_parser = parse_pages)]
    pub perf_pages: usize,
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
        Some(s) => Err(format!("--duration must be a positive number of seconds, not {s}")),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
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
    if let Err(sentence) = privileges::check() {
        eprintln!("observer: {sentence}");
        return ExitCode::from(1);
    }
    let options = RunOptions {
        duration,
        load: LoadOptions {
            export_per_flow: args.export_per_flow,
            max_flows: args.max_flows,
        },
        perf_pages: args.perf_pages,
        queue_capacity: 65_536,
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
        assert_eq!(duration_from_secs(Some(1.5)), Ok(Some(Duration::from_millis(1500))));
        assert!(duration_from_secs(Some(-1.0)).is_err());
        assert!(duration_from_secs(Some(f64::NAN)).is_err());
    }

    #[test]
    fn perf_pages_must_be_powers_of_two() {
        assert_eq!(parse_pages("64"), Ok(64));
        assert!(parse_pages("3").is_err());
        assert!(parse_pages("0").is_err());
        assert!(parse_pages("x").is_err());
    }
}
