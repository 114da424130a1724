//! `observer top`: a live, full-screen view of TCP trouble, built from the same record stream
//! `observer run` writes (see docs/top.md).
//!
//! One engine, two views: top reads the NDJSON records, maps events to observations exactly as
//! the daemon does ([`wire::observation`]), and feeds its own [`crate::aggregate::Engine`];
//! anomalies, listener drops, rules, sysctl changes and losses come from their records. The
//! records come from a running daemon's unix socket (`--connect`, or the default socket when
//! it answers), or from `daemon::run` started in-process and writing into a pipe.
//!
//! The shape is bottom's: collection threads ([`feed`], [`event`]) send one event enum over a
//! channel; the render loop alone owns the state ([`app`]), applies keys ([`handler`]) and
//! draws ([`ui`]). The terminal is restored on exit, on a panic (hook) and on SIGTERM.
pub mod app;
pub mod event;
pub mod feed;
pub mod findings;
pub mod handler;
pub mod terminal;
pub mod ui;
pub mod wire;

use std::{
    io::IsTerminal as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    aggregate::EngineConfig,
    config::{self, Config, Settings},
    daemon::RunOptions,
    privileges,
    sink::socket::DEFAULT_SOCKET_PATH,
};

/// Options of `observer top`.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct TopArgs {
    /// Seconds between screen refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Read the records of a running `observer run --socket` from this unix socket [default:
    /// /run/observer/observer.sock when a daemon answers there; otherwise observer runs
    /// in-process].
    #[arg(long, value_name = "PATH", conflicts_with = "no_connect")]
    pub connect: Option<PathBuf>,
    /// Never attach to a running daemon: always load the programs in-process.
    #[arg(long)]
    pub no_connect: bool,
    /// In-process only: configuration file, as for `observer run` [default:
    /// /etc/observer/observer.toml if it exists].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// In-process only: events exported per flow per second (0: all), as for `observer run`.
    #[arg(long, value_name = "N")]
    pub export_per_flow: Option<u32>,
    /// In-process only: events exported per CPU per second (0: no limit).
    #[arg(long, value_name = "N")]
    pub export_per_cpu: Option<u32>,
    /// In-process only: event kinds exported, as for `observer run`.
    #[arg(long, value_name = "KINDS", value_parser = parse_export_kinds)]
    pub export_kinds: Option<String>,
    /// In-process only: drop reasons reported, as for `observer run`.
    #[arg(long, value_name = "REASONS")]
    pub drop_reasons: Option<String>,
    /// In-process only: flows tracked in the kernel's counter map.
    #[arg(long, value_name = "N", value_parser = parse_max_flows)]
    pub max_flows: Option<u32>,
    /// In-process only: exported events per wakeup of the reader, as for `observer run` (1:
    /// a wakeup per event).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub wakeup_events: Option<u32>,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if secs.is_finite() && (0.1..=60.0).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "the interval must be between 0.1 and 60 seconds, not {s}"
        ))
    }
}

fn parse_export_kinds(s: &str) -> Result<String, String> {
    config::export_kinds_mask(s).map(|_| s.to_owned())
}

fn parse_max_flows(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    config::check_max_flows(n)
}

/// Where the records come from.
#[derive(Debug)]
enum Source {
    Socket(PathBuf),
    InProcess(Box<RunOptions>),
}

impl TopArgs {
    /// The settings of the in-process daemon: these flags over the configuration file over
    /// the defaults, as `observer run` resolves them, and the anomaly thresholds they give.
    fn settings(&self) -> Result<(Settings, EngineConfig), String> {
        let flags = Config {
            export_per_flow: self.export_per_flow,
            export_per_cpu: self.export_per_cpu,
            slow_connect_ms: None,
            max_flows: self.max_flows,
            export_kinds: self.export_kinds.clone(),
            drop_reasons: self.drop_reasons.clone(),
            wakeup_events: self.wakeup_events,
            ..Config::default()
        };
        let file = match config::choose_path(self.config.as_deref()) {
            Some(path) => Config::load(&path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        let settings = Settings::resolve(&file.overlay(&flags)).map_err(|e| e.to_string())?;
        let engine = EngineConfig {
            thresholds: config::thresholds(&settings.thresholds)?,
            ..EngineConfig::default()
        };
        Ok((settings, engine))
    }

    /// The run options of the in-process daemon.
    pub fn run_options(&self) -> Result<RunOptions, String> {
        let (settings, engine) = self.settings()?;
        Ok(RunOptions {
            duration: None,
            load: settings.load_options(),
            perf_pages: settings.perf_pages,
            wakeup_events: settings.wakeup_events,
            flush_interval: config::FLUSH_INTERVAL,
            queue_capacity: 65_536,
            context_interval: Duration::from_secs(1),
            stale_after: Duration::from_secs(30),
            engine,
            // A reload would need the file's path and flags kept; top is restarted instead.
            reload: None,
            metrics: None,
            // The output is top's own pipe: its end of it never goes away first.
            watch_output: None,
            notify: None,
        })
    }

    /// The socket to read, or none for in-process: `--connect`, else the default socket when a
    /// daemon answers on it.
    fn socket(&self) -> Result<Option<PathBuf>, String> {
        if let Some(path) = &self.connect {
            return match feed::socket_answers(path) {
                Ok(()) => Ok(Some(path.clone())),
                Err(e) => Err(format!(
                    "cannot connect to {}: {e} (is `observer run --socket {}` running?)",
                    path.display(),
                    path.display()
                )),
            };
        }
        let default = Path::new(DEFAULT_SOCKET_PATH);
        if !self.no_connect && feed::socket_answers(default).is_ok() {
            return Ok(Some(default.to_owned()));
        }
        Ok(None)
    }
}

/// How often top reads the names in /run/netns.
const NETNS_NAMES_EVERY: Duration = Duration::from_secs(5);

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The inode of this process's network namespace (where the `start` record's sysctls are
/// read, on the same host).
fn own_netns() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino())
}

/// Runs `observer top` until `q`, Ctrl-C or a signal.
pub fn main(args: TopArgs) -> ExitCode {
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "observer: top needs a terminal; `observer run` writes the records as JSON lines"
        );
        return ExitCode::from(2);
    }
    let source = match args.socket() {
        Ok(Some(path)) => Source::Socket(path),
        Ok(None) => {
            if let Err(sentence) = privileges::check() {
                eprintln!("observer: {sentence} (or attach to a running daemon with --connect)");
                return ExitCode::from(1);
            }
            match args.run_options() {
                Ok(options) => Source::InProcess(Box::new(options)),
                Err(e) => {
                    eprintln!("observer: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        Err(e) => {
            eprintln!("observer: {e}");
            return ExitCode::from(1);
        }
    };
    match run(&args, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer: top: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &TopArgs, source: Source) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let interval = Duration::from_secs_f64(args.interval);
    let label = match &source {
        Source::Socket(path) => path.display().to_string(),
        Source::InProcess(_) => "in-process".to_owned(),
    };
    // Severity is measured against the same thresholds as the daemon's (those of the
    // configuration file, when it can be read).
    let engine = match &source {
        Source::InProcess(options) => options.engine.clone(),
        Source::Socket(_) => args.settings().map(|(_, e)| e).unwrap_or_default(),
    };
    let mut app = app::App::new(now_ns(), own_netns(), &label, engine)
        .context("starting the aggregation engine")?;
    let (tx, rx) = event::channel();
    // First: from here on SIGTERM/SIGINT/SIGHUP are events, not deaths.
    let _signals = event::spawn_signals(tx.clone()).context("installing signal handlers")?;
    // Messages written to stderr while the screen is ours (the in-process daemon's warnings)
    // go to the status line, and are printed again once the terminal is restored.
    let stderr = terminal::StderrCapture::start(tx.clone());
    let mut in_process = None;
    match source {
        Source::Socket(path) => {
            feed::spawn_socket(path, tx.clone()).context("starting the socket reader")?;
        }
        Source::InProcess(options) => {
            in_process = Some(
                feed::spawn_in_process(*options, tx.clone())
                    .context("starting the in-process observer")?,
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let result = (|| {
        let mut terminal = terminal::Terminal::enter().context("setting up the terminal")?;
        event::spawn_input(tx.clone(), Arc::clone(&stop)).context("reading the keyboard")?;
        event::spawn_ticker(tx.clone(), interval, Arc::clone(&stop))
            .context("starting the clock")?;
        drop(tx);
        app.refresh();
        terminal.draw(&mut app)?;
        let mut names_read: Option<std::time::Instant> = None;
        while let Ok(event) = rx.recv() {
            // Names of namespaces (`ip netns add`), read every few seconds on a tick: top
            // runs on the daemon's host, so /run/netns is the daemon's too.
            if matches!(event, event::Event::Tick)
                && names_read.is_none_or(|at| at.elapsed() >= NETNS_NAMES_EVERY)
            {
                app.model
                    .learn_netns_names(crate::enrich::netns::named_namespaces());
                names_read = Some(std::time::Instant::now());
            }
            let mut redraw = app.handle(event, now_ns());
            // Whatever else is waiting is taken in before drawing (bounded, so that a flood
            // of records cannot keep the screen from being drawn).
            for _ in 0..64 {
                match rx.try_recv() {
                    Ok(event) => redraw |= app.handle(event, now_ns()),
                    Err(_) => break,
                }
            }
            if app.ui.quit {
                break;
            }
            if redraw {
                terminal.draw(&mut app)?;
            }
        }
        terminal.leave()
    })();
    stop.store(true, Ordering::Relaxed);
    // The render loop is gone: producers notice on their next send.
    drop(rx);
    if let Some(in_process) = in_process {
        stop_in_process(in_process);
    }
    if let Some(stderr) = stderr {
        stderr.finish();
    }
    result
}

/// Stops the in-process daemon the way `observer run` is stopped (a signal: it detaches, drains
/// and writes its stop record, which the pipe reader discards), waiting a few seconds at most.
fn stop_in_process(in_process: feed::InProcess) {
    // SAFETY: plain syscalls; SIGTERM is handled (tokio handlers installed by the signal
    // thread before anything else started), so it cannot end this process.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGTERM);
    }
    let feed::InProcess {
        daemon,
        reader,
        done,
    } = in_process;
    if done.recv_timeout(Duration::from_secs(5)).is_ok() {
        let _ = daemon.join();
        let _ = reader.join();
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        top: TopArgs,
    }

    fn parse(argv: &[&str]) -> Result<TopArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("top").chain(argv.iter().copied())).map(|c| c.top)
    }

    #[test]
    fn flags_parse_and_are_checked() {
        Cli::command().debug_assert();
        let args = parse(&[]).expect("defaults");
        assert_eq!(args.interval, 1.0);
        assert_eq!(args.connect, None);
        let args = parse(&["--interval", "0.5", "--connect", "/tmp/s.sock"]).expect("valid");
        assert_eq!(args.interval, 0.5);
        assert_eq!(args.connect.as_deref(), Some(Path::new("/tmp/s.sock")));
        for bad in [
            &["--interval", "0"][..],
            &["--interval", "nan"],
            &["--connect", "/x", "--no-connect"],
            &["--export-kinds", "bogus"],
            &["--max-flows", "1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn in_process_options_are_resolved_like_observer_runs() {
        let args = parse(&["--config", "/dev/null", "--export-per-flow", "0"]).expect("valid");
        let options = args.run_options().expect("resolves");
        assert_eq!(options.load.export_per_flow, 0);
        assert_eq!(options.load.export_per_cpu, config::DEFAULT_EXPORT_PER_CPU);
        assert_eq!(options.duration, None);
        assert_eq!(options.wakeup_events, config::DEFAULT_WAKEUP_EVENTS);
        let args = parse(&["--config", "/dev/null", "--wakeup-events", "1"]).expect("valid");
        assert_eq!(args.run_options().expect("resolves").wakeup_events, 1);
        assert!(parse(&["--wakeup-events", "0"]).is_err());
        let missing = parse(&["--config", "/nonexistent/observer.toml"]).expect("valid");
        assert!(missing.run_options().is_err());
    }
}
