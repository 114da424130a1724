//! Command line: `observer run` and friends.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{
    ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, parser::ValueSource,
};

pub use crate::config::export_kinds_mask;
use crate::{
    check,
    config::{self, Config, OutputConfig, OutputTarget, Settings},
    daemon::{self, RunOptions},
    kernel::loader::AttachMode,
    privileges,
    sink::{
        file::{DEFAULT_KEEP, DEFAULT_MAX_BYTES, MAX_KEEP, RotatingFile},
        socket::{DEFAULT_SOCKET_PATH, SocketBroadcaster, SocketOptions, Tee},
    },
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
    /// Attach to the kernel and stream events as JSON lines on stdout (or to a file,
    /// `--output`) until SIGINT/SIGTERM.
    ///
    /// The first record is `start` (versions, attached programs, sysctl snapshot), the last is
    /// `stop` (exact totals per event kind and per flow from the kernel's own counters).
    /// Human messages go to stderr.
    Run(RunArgs),
    /// Live full-screen view of TCP trouble: attaches to `observer run --socket`, or runs
    /// observer in-process (docs/top.md).
    Top(crate::top::TopArgs),
    /// Print a one-page incident report of a recorded stream (docs/explain.md).
    ///
    /// Reads what `observer run` wrote (a file, or `-` / nothing for standard input) and
    /// prints, at most 100 columns wide: the anomalies in the order they opened with their
    /// causes, sysctl changes and their effects, the worst peers, listeners, firewall rules and
    /// stale processes, and the totals.
    ///
    /// Exits 0 with a report (lines that are not records are counted in it), 2 when the file
    /// cannot be read.
    Explain(crate::explain::ExplainArgs),
    /// List the running kernel's drop reasons (names and numbers) and which are reported by
    /// default.
    Reasons,
    /// Check whether observer can run here: kernel, BTF, tracefs, each tracepoint, privileges,
    /// loading and attaching the programs (detached at once), the configuration and the output.
    ///
    /// Prints one line per check (name, OK/WARN/FAIL, detail) and exits 0 when observer can
    /// run fully, 1 when it runs degraded (the WARN lines say what is missing), 2 when it
    /// cannot run (the FAIL lines say why).
    Check(CheckArgs),
    /// Write the man pages or a shell completion script (for packagers: `cargo xtask package`).
    #[command(hide = true)]
    Generate(crate::generate::GenerateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Configuration file to check and to load the programs with [default:
    /// /etc/observer/observer.toml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML, see docs/config.md); flags given here override it [default:
    /// /etc/observer/observer.toml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Stop by itself after this many seconds (for scripts and tests).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Events exported per flow (for failed handshakes: per local address, peer and service
    /// port) per second; further events are counted in the kernel but not exported. 0 exports
    /// every event.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_EXPORT_PER_FLOW)]
    pub export_per_flow: u32,
    /// Flows tracked in the kernel's counter map (least recently used are evicted).
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_MAX_FLOWS, value_parser = clap::value_parser!(u32).range(i64::from(*config::MAX_FLOWS_RANGE.start())..=i64::from(*config::MAX_FLOWS_RANGE.end())))]
    pub max_flows: u32,
    /// Events exported per CPU per second over all flows: bounds the export cost of storms
    /// spread over many flows (the kernel still counts everything). 0: no limit.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_EXPORT_PER_CPU)]
    pub export_per_cpu: u32,
    /// A connect slower than this many milliseconds is trouble: counted per flow and exported
    /// as a `connect` record even when `connect` is not an exported kind. 0: no threshold.
    #[arg(long, value_name = "MS", default_value_t = config::DEFAULT_SLOW_CONNECT_MS)]
    pub slow_connect_ms: u32,
    /// Event kinds exported as records, comma-separated: `default` (trouble only: all but the
    /// healthy `connect`, `accept` and `close`, which are counted per peer and listener), `all`,
    /// or names (retransmit, syn_retransmit, synack_retransmit, drop, reset_sent,
    /// reset_received, connect, connect_failed, accept, close); `-NAME` removes one.
    #[arg(long, value_name = "KINDS", default_value = config::DEFAULT_EXPORT_KINDS, value_parser = parse_export_kinds)]
    pub export_kinds: String,
    /// Drop reasons reported, comma-separated names of this kernel's `enum skb_drop_reason`:
    /// `default` (all but routine frees such as NOT_SPECIFIED, QUEUE_PURGE, SOCKET_CLOSE),
    /// `all`, `NAME`, `-NAME`. `observer reasons` lists them.
    #[arg(long, value_name = "REASONS", default_value = config::DEFAULT_DROP_REASONS)]
    pub drop_reasons: String,
    /// Pages per CPU for the perf buffers (a power of two).
    #[arg(long, value_name = "PAGES", default_value_t = config::DEFAULT_PERF_PAGES, value_parser = parse_pages)]
    pub perf_pages: usize,
    /// The kernel wakes the reader of a perf buffer once per N exported events (the buffers
    /// are also drained every 100 ms, so fewer events are not held back longer). 1 wakes it
    /// for every event, the costly way. At most what `--perf-pages` hold (34 events per page)
    /// [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub wakeup_events: Option<u32>,
    /// Which tracepoint programs to attach: `classic` reads the tracepoints' formatted records,
    /// `raw` their arguments (no record is formatted); `auto` uses raw where the kernel's BTF
    /// names the arguments and falls back to classic per tracepoint [default: classic].
    #[arg(long, value_name = "MODE", value_enum)]
    pub attach: Option<AttachMode>,
    /// Report ESTABLISHED connections stuck for this long (sent data and no reply, or data
    /// not acknowledged, or sends blocked), grouped by owning process and peer.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = parse_stale_after)]
    pub stale_after: f64,
    /// Also serve the records to local readers (`observer top`) on this unix socket (mode 0660).
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = DEFAULT_SOCKET_PATH)]
    pub socket: Option<PathBuf>,
    /// Group whose members may connect to `--socket` (name or id) [default: root only].
    #[arg(long, value_name = "GROUP", requires = "socket")]
    pub socket_group: Option<String>,
    /// Where records go: `stdout`, or `file:PATH`, a file rotated by size at record boundaries
    /// (PATH.1 is the newest rotated file).
    #[arg(long, value_name = "TARGET", default_value = "stdout")]
    pub output: OutputTarget,
    /// With `--output file:PATH`: rotate the file once it reaches this many bytes (0: never).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BYTES)]
    pub output_max_bytes: u64,
    /// With `--output file:PATH`: rotated files kept (PATH.1 ... PATH.N).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_KEEP)))]
    pub output_keep: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics (`127.0.0.1:9464`, `[::1]:9464`, or a
    /// bare port on 127.0.0.1). Off unless given.
    #[arg(long, value_name = "ADDR", value_parser = config::parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
}

/// The flags given explicitly on the command line, as a configuration layer over the file:
/// a flag left at its default does not override the file.
pub fn explicit_flags(args: &RunArgs, matches: &ArgMatches) -> Config {
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let RunArgs {
        config: _,
        duration: _,
        // Not in the configuration file yet: a flag only.
        stale_after: _,
        socket: _,
        socket_group: _,
        export_per_flow,
        max_flows,
        export_per_cpu,
        slow_connect_ms,
        export_kinds,
        drop_reasons,
        perf_pages,
        wakeup_events,
        attach,
        output,
        output_max_bytes,
        output_keep,
        metrics,
    } = args;
    Config {
        export_per_flow: given("export_per_flow").then_some(*export_per_flow),
        export_per_cpu: given("export_per_cpu").then_some(*export_per_cpu),
        slow_connect_ms: given("slow_connect_ms").then_some(*slow_connect_ms),
        max_flows: given("max_flows").then_some(*max_flows),
        export_kinds: given("export_kinds").then(|| export_kinds.clone()),
        drop_reasons: given("drop_reasons").then(|| drop_reasons.clone()),
        perf_pages: given("perf_pages").then_some(*perf_pages),
        wakeup_events: *wakeup_events,
        attach: *attach,
        output: OutputConfig {
            target: given("output").then(|| output.clone()),
            max_bytes: given("output_max_bytes").then_some(*output_max_bytes),
            keep: given("output_keep").then_some(*output_keep),
        },
        thresholds: None,
        metrics: *metrics,
    }
}

fn parse_export_kinds(s: &str) -> Result<String, String> {
    export_kinds_mask(s).map(|_| s.to_owned())
}

fn parse_stale_after(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if secs.is_finite() && (0.5..=86_400.0).contains(&secs) {
        Ok(secs)
    } else {
        Err("must be between 0.5 and 86400 seconds".to_owned())
    }
}

fn parse_pages(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    config::check_perf_pages(n)
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
    // Parsed through ArgMatches to learn which flags were given explicitly (they override the
    // configuration file; defaults do not).
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Run(args) => {
            let flags = matches
                .subcommand_matches("run")
                .map(|m| explicit_flags(&args, m))
                .unwrap_or_default();
            run(args, flags)
        }
        Command::Reasons => reasons(),
        Command::Check(args) => check_command(&args),
        Command::Top(args) => crate::top::main(args),
        Command::Explain(args) => crate::explain::main(&args),
        Command::Generate(args) => crate::generate::main(&args),
    }
}

fn check_command(args: &CheckArgs) -> ExitCode {
    let lines = check::run_checks(args.config.as_deref());
    print!("{}", check::render(&lines));
    let _ = std::io::stdout().flush();
    ExitCode::from(check::outcome(&lines).exit_code())
}

/// The settings of `observer run`: `flags` over the configuration file over the defaults.
/// Returns the file used, if any.
pub fn resolve_settings(
    explicit_path: Option<&Path>,
    flags: &Config,
) -> Result<(Option<PathBuf>, Settings), config::ConfigError> {
    let path = config::choose_path(explicit_path);
    let file = match &path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    Ok((path, Settings::resolve(&file.overlay(flags))?))
}

/// Opens where the records go.
fn open_output(output: &config::OutputSettings) -> anyhow::Result<Box<dyn Write>> {
    use anyhow::Context as _;
    Ok(match &output.target {
        OutputTarget::Stdout => Box::new(std::io::stdout()),
        OutputTarget::File(path) => Box::new(
            RotatingFile::open(path, output.max_bytes, output.keep)
                .with_context(|| format!("opening the output `{}`", output.target))?,
        ),
    })
}

/// A copy of stdout's descriptor when the records go there, so that a reader leaving (a pipe
/// closed, a socket peer gone, a terminal hung up) ends the run at once (`sink::hangup`).
fn watch_output(output: &config::OutputSettings) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd as _;
    match output.target {
        OutputTarget::Stdout => std::io::stdout().as_fd().try_clone_to_owned().ok(),
        OutputTarget::File(_) => None,
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

fn run(args: RunArgs, flags: Config) -> ExitCode {
    let duration = match duration_from_secs(args.duration) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(2);
        }
    };
    let (config_path, settings) = match resolve_settings(args.config.as_deref(), &flags) {
        Ok((path, settings)) => {
            // Reading /etc/observer/observer.toml without being asked deserves a word.
            if let (Some(path), None) = (&path, &args.config) {
                eprintln!("observer: using configuration {}", path.display());
            }
            (path, settings)
        }
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(2);
        }
    };
    let thresholds = match config::thresholds(&settings.thresholds) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(sentence) = privileges::check() {
        eprintln!("observer: {sentence}");
        return ExitCode::from(1);
    }
    let out = match open_output(&settings.output) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("observer: error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let out: Box<dyn Write> = match &args.socket {
        None => out,
        Some(path) => {
            let options = match &args.socket_group {
                Some(group) => match SocketOptions::new(path).with_group(group) {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("observer: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => SocketOptions::new(path),
            };
            match SocketBroadcaster::bind(options) {
                Ok(socket) => {
                    eprintln!("observer: serving records on {}", path.display());
                    Box::new(Tee::new(out, socket))
                }
                Err(e) => {
                    eprintln!("observer: error: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    };
    let mut options = RunOptions {
        duration,
        load: settings.load_options(),
        perf_pages: settings.perf_pages,
        wakeup_events: settings.wakeup_events,
        flush_interval: config::FLUSH_INTERVAL,
        queue_capacity: 65_536,
        context_interval: Duration::from_secs(1),
        stale_after: Duration::from_secs_f64(args.stale_after),
        engine: crate::aggregate::EngineConfig {
            thresholds,
            ..crate::aggregate::EngineConfig::default()
        },
        reload: config_path.map(|path| crate::daemon::Reload {
            current: settings.clone(),
            load: Box::new(move || config::reload(&path, &flags).map_err(|e| e.to_string())),
        }),
        metrics: None,
        watch_output: watch_output(&settings.output),
        notify: crate::notify::Notifier::from_env().unwrap_or_else(|e| {
            eprintln!("observer: warning: {e}");
            None
        }),
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
    if let Some(addr) = settings.metrics {
        let server = match runtime.block_on(crate::metrics::Server::bind(addr)) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("observer: error: {e}");
                return ExitCode::from(1);
            }
        };
        eprintln!(
            "observer: serving metrics at http://{}/metrics",
            server.local_addr()
        );
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        runtime.spawn(server.run(std::sync::Arc::clone(&metrics)));
        options.metrics = Some(metrics);
    }
    match runtime.block_on(daemon::run(options, out)) {
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

    fn run_flags(argv: &[&str]) -> (RunArgs, Config) {
        let matches = Cli::command()
            .try_get_matches_from(argv)
            .expect("valid command line");
        let cli = Cli::from_arg_matches(&matches).expect("matches");
        let Command::Run(args) = cli.command else {
            panic!("not `run`");
        };
        let sub = matches.subcommand_matches("run").expect("run matches");
        let flags = explicit_flags(&args, sub);
        (args, flags)
    }

    #[test]
    fn only_explicit_flags_override_the_file() {
        let (_, flags) = run_flags(&["observer", "run"]);
        assert_eq!(flags, Config::default());
        let (args, flags) = run_flags(&[
            "observer",
            "run",
            "--config",
            "/x.toml",
            "--export-per-flow",
            "0",
            "--max-flows",
            "32",
            "--export-per-cpu",
            "5",
            "--export-kinds",
            "all",
            "--drop-reasons",
            "all",
            "--perf-pages",
            "8",
            "--wakeup-events",
            "16",
            "--output",
            "file:/tmp/o.ndjson",
            "--output-max-bytes",
            "1000",
            "--output-keep",
            "0",
            "--metrics",
            "127.0.0.1:9464",
        ]);
        assert_eq!(args.config.as_deref(), Some(Path::new("/x.toml")));
        assert_eq!(
            flags,
            Config {
                export_per_flow: Some(0),
                export_per_cpu: Some(5),
                slow_connect_ms: None,
                max_flows: Some(32),
                export_kinds: Some("all".to_owned()),
                drop_reasons: Some("all".to_owned()),
                perf_pages: Some(8),
                wakeup_events: Some(16),
                attach: None,
                output: OutputConfig {
                    target: Some(OutputTarget::File("/tmp/o.ndjson".into())),
                    max_bytes: Some(1000),
                    keep: Some(0),
                },
                thresholds: None,
                metrics: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
            }
        );
        // Flag over file over default.
        let file = Config::parse(
            "export_per_flow = 7
export_per_cpu = 9
",
            Path::new("f"),
        )
        .expect("valid");
        let (_, flags) = run_flags(&["observer", "run", "--export-per-flow", "3"]);
        let settings = Settings::resolve(&file.overlay(&flags)).expect("resolves");
        assert_eq!(
            (
                settings.export_per_flow,
                settings.export_per_cpu,
                settings.max_flows
            ),
            (3, 9, config::DEFAULT_MAX_FLOWS)
        );
    }

    #[test]
    fn flag_defaults_match_the_config_defaults() {
        let (args, _) = run_flags(&["observer", "run"]);
        let settings = Settings::resolve(&Config::default()).expect("defaults");
        assert_eq!(args.export_per_flow, settings.export_per_flow);
        assert_eq!(args.export_per_cpu, settings.export_per_cpu);
        assert_eq!(args.slow_connect_ms, settings.slow_connect_ms);
        assert_eq!(args.max_flows, settings.max_flows);
        assert_eq!(args.export_kinds, settings.export_kinds);
        assert_eq!(args.drop_reasons, settings.drop_reasons);
        assert_eq!(args.perf_pages, settings.perf_pages);
        assert_eq!(args.wakeup_events, None);
        assert_eq!(settings.wakeup_events, config::DEFAULT_WAKEUP_EVENTS);
        assert_eq!(args.output, settings.output.target);
        assert_eq!(args.output_max_bytes, settings.output.max_bytes);
        assert_eq!(args.output_keep, settings.output.keep);
        assert_eq!(args.metrics, settings.metrics);
    }

    #[test]
    fn bad_flags_are_refused_by_the_parser() {
        for argv in [
            &["observer", "run", "--export-kinds", "bogus"][..],
            &["observer", "run", "--output", "syslog"],
            &["observer", "run", "--output-keep", "1001"],
            &["observer", "run", "--max-flows", "4"],
            &["observer", "run", "--metrics", "localhost"],
            &["observer", "run", "--wakeup-events", "0"],
        ] {
            assert!(
                Cli::command().try_get_matches_from(argv).is_err(),
                "{argv:?}"
            );
        }
    }

    #[test]
    fn perf_pages_must_be_powers_of_two() {
        assert_eq!(parse_pages("64"), Ok(64));
        assert!(parse_pages("3").is_err());
        assert!(parse_pages("0").is_err());
        assert!(parse_pages("x").is_err());
    }
}
