//! `cargo xtask <command>`: the project's one entry point for setting up a machine, building,
//! running, linting and testing. See `cargo xtask --help` and the README's "Development" section.

mod bench;
mod cmd;
mod package;
mod setup;
mod tasks;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, lint and test observer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building needs (apt packages, nightly rust-src, bpf-linker); idempotent.
    Setup,
    /// Setup, then build the release binary target/release/observer (eBPF programs included).
    Build,
    /// Setup, build (release), then run `observer run ARGS...` as root (through sudo if needed).
    Run {
        /// Arguments passed to `observer run` (put them after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, lint, build (debug), then `cargo test --workspace` with OBSERVER_BIN set.
    Test {
        /// Skip `cargo xtask lint`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (put them after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt check, clippy on the host crates, clippy on the eBPF crate (BPF target).
    Lint,
    /// Setup, build (release, with examples), then measure observer's costs (kernel ns per
    /// event, host slowdown, userspace throughput and memory, start-up, the nginx web workload)
    /// and the other tools'; prints a table and writes BENCHMARKS.md. Needs root; about 8
    /// minutes (`--only web`: about 2).
    Bench(bench::BenchArgs),
    /// Setup, build (release), then the Debian package target/package/observer_VERSION_ARCH.deb
    /// (dpkg-deb): the binary, the systemd unit, the configuration as a conffile, docs, man
    /// pages and shell completions.
    Package,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build => tasks::build(),
        Command::Run { args } => tasks::run_observer(&args),
        Command::Test { no_lint, args } => tasks::test(!no_lint, &args),
        Command::Lint => tasks::lint(),
        Command::Bench(args) => bench::bench(&args),
        Command::Package => package::package(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            // When a child command failed, exit with its code.
            err.downcast_ref::<cmd::CommandFailed>()
                .map_or(ExitCode::FAILURE, |failed| {
                    ExitCode::from(failed.exit_code())
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    fn parse(args: &[&str]) -> Command {
        let argv = std::iter::once("xtask").chain(args.iter().copied());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(err) => panic!("{args:?} did not parse: {err}"),
        }
    }

    #[test]
    fn run_passes_arguments_after_the_separator() {
        let Command::Run { args } = parse(&["run", "--", "--duration", "5"]) else {
            panic!("not run");
        };
        assert_eq!(args, ["--duration", "5"]);
        let Command::Run { args } = parse(&["run"]) else {
            panic!("not run");
        };
        assert!(args.is_empty());
    }

    #[test]
    fn test_takes_no_lint_and_cargo_test_arguments() {
        let Command::Test { no_lint, args } = parse(&["test", "--no-lint", "--", "--nocapture"])
        else {
            panic!("not test");
        };
        assert!(no_lint);
        assert_eq!(args, ["--nocapture"]);
        let Command::Test { no_lint, args } = parse(&["test", "--", "--no-lint"]) else {
            panic!("not test");
        };
        assert!(!no_lint, "--no-lint after -- belongs to cargo test");
        assert_eq!(args, ["--no-lint"]);
    }

    #[test]
    fn bench_only_takes_a_list_of_workloads() {
        use crate::bench::Workload;
        let Command::Bench(args) = parse(&["bench", "--only", "web,refused", "--rounds", "2"])
        else {
            panic!("not bench");
        };
        assert_eq!(args.only, [Workload::Web, Workload::Refused]);
        assert_eq!(args.rounds, 2);
        let Command::Bench(args) = parse(&["bench", "--only", "memory"]) else {
            panic!("not bench");
        };
        assert_eq!(args.only, [Workload::Pipeline]);
        let Command::Bench(args) = parse(&["bench"]) else {
            panic!("not bench");
        };
        assert!(args.only.is_empty(), "default: every workload");
        let argv = ["xtask", "bench", "--only", "nope"];
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
