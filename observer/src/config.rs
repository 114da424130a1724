//! The configuration file (TOML) of `observer run`, and how it combines with the flags.
//!
//! Every setting of `observer run` except `--duration` has a key of the same name (dashes become
//! underscores: `--export-per-flow` is `export_per_flow`), plus an `[output]` section and a
//! `[thresholds]` table passed through to the anomaly engine. docs/config.md documents them.
//!
//! Precedence, highest first: flags given on the command line, the file, built-in defaults.
//! [`Config`] is one layer (every field optional: a key absent from the file leaves the layer
//! below in force); [`Settings`] is the result with nothing left open.
//!
//! Values are checked when the file is read, so a bad file is refused whole with the line and
//! the key named, before anything touches the kernel; a reload ([`reload`]) that fails leaves the
//! running configuration alone.
use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    decode::EventKind,
    kernel::{
        loader::{AttachMode, LoadOptions},
        perf_ring,
    },
    sink::file::{DEFAULT_KEEP, DEFAULT_MAX_BYTES, MAX_KEEP},
};

/// Read by `observer run` when `--config` is not given and the file exists.
pub const DEFAULT_PATH: &str = "/etc/observer/observer.toml";

/// Built-in defaults (the flags' defaults).
pub const DEFAULT_EXPORT_PER_FLOW: u32 = 10;
pub const DEFAULT_EXPORT_PER_CPU: u32 = 500;
/// A connect slower than this (ms) is trouble: counted per flow and exported.
pub const DEFAULT_SLOW_CONNECT_MS: u32 = 500;
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;
pub const DEFAULT_EXPORT_KINDS: &str = "default";
pub const DEFAULT_DROP_REASONS: &str = "default";
pub const DEFAULT_PERF_PAGES: usize = 64;
/// The kernel wakes a perf buffer's reader once per this many samples.
pub const DEFAULT_WAKEUP_EVENTS: u32 = 64;
/// How often the daemon drains every perf buffer besides the kernel's wakeups (not a key): the
/// longest a sample short of a wakeup waits.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// Largest `perf_pages`.
pub const MAX_PERF_PAGES: usize = 4096;
/// Bounds of `max_flows`: the kernel's LRU map needs a few entries per CPU, and beyond a few
/// million the map alone takes gigabytes.
pub const MAX_FLOWS_RANGE: std::ops::RangeInclusive<u32> = 16..=4_194_304;

/// The file `observer run` reads: `explicit` (`--config`), else [`DEFAULT_PATH`] if it exists.
pub fn choose_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_owned()),
        None => {
            let default = Path::new(DEFAULT_PATH);
            default.exists().then(|| default.to_owned())
        }
    }
}

/// Errors reading or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        io_error: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type or range.
    #[error("{}", invalid_message(.path, *.line, *.column, .key.as_deref(), .message, .text))]
    Invalid {
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// 1-based, in characters.
        column: usize,
        /// The key concerned, dotted (`output.max_bytes`), when one applies.
        key: Option<String>,
        message: String,
        /// The offending line of the file.
        text: String,
    },
    /// A value that did not come from a file (a flag, or a `Config` built in code) is invalid.
    #[error("`{key}`: {message}")]
    Value { key: &'static str, message: String },
}

fn invalid_message(
    path: &Path,
    line: usize,
    column: usize,
    key: Option<&str>,
    message: &str,
    text: &str,
) -> String {
    let key = key.map(|k| format!("key `{k}`: ")).unwrap_or_default();
    format!(
        "invalid config file `{}`, line {line}, column {column}: {key}{message}\n{line:>5} | {text}",
        path.display()
    )
}

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputTarget {
    /// Standard output (the default).
    Stdout,
    /// A file, rotated by size (`sink::file`).
    File(PathBuf),
}

impl FromStr for OutputTarget {
    type Err = String;

    /// `stdout` (or `-`), or `file:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" | "-" => Ok(OutputTarget::Stdout),
            _ => match s.strip_prefix("file:") {
                Some("") => Err(
                    "`file:` needs a path, e.g. `file:/var/log/observer/observer.ndjson`"
                        .to_owned(),
                ),
                Some(path) => Ok(OutputTarget::File(PathBuf::from(path))),
                None => Err(format!("expected `stdout` or `file:PATH`, not `{s}`")),
            },
        }
    }
}

impl fmt::Display for OutputTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputTarget::Stdout => f.write_str("stdout"),
            OutputTarget::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// One layer of settings: a file, or the flags given explicitly. `None`: not set here.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub export_per_flow: Option<u32>,
    pub export_per_cpu: Option<u32>,
    pub slow_connect_ms: Option<u32>,
    pub max_flows: Option<u32>,
    pub export_kinds: Option<String>,
    pub drop_reasons: Option<String>,
    pub perf_pages: Option<usize>,
    pub wakeup_events: Option<u32>,
    /// Raw or classic tracepoint programs (`auto`: raw where the kernel allows).
    pub attach: Option<AttachMode>,
    pub output: OutputConfig,
    /// The `[thresholds]` table, passed through uninterpreted to the anomaly engine.
    pub thresholds: Option<toml::Table>,
    /// Where the Prometheus metrics endpoint listens.
    pub metrics: Option<SocketAddr>,
}

/// The `[output]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputConfig {
    pub target: Option<OutputTarget>,
    pub max_bytes: Option<u64>,
    pub keep: Option<u32>,
}

/// Everything `observer run` needs, resolved: flags over file over defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub export_per_flow: u32,
    pub export_per_cpu: u32,
    pub slow_connect_ms: u32,
    pub max_flows: u32,
    /// As written (`default,-close`), for messages.
    pub export_kinds: String,
    /// The kernel's bit mask for `export_kinds`.
    pub export_kinds_mask: u32,
    pub drop_reasons: String,
    pub perf_pages: usize,
    /// Samples per reader wakeup (1: a wakeup per sample).
    pub wakeup_events: u32,
    pub attach: AttachMode,
    pub output: OutputSettings,
    pub thresholds: toml::Table,
    /// Where the Prometheus metrics endpoint listens (none: no endpoint).
    pub metrics: Option<SocketAddr>,
}

/// The resolved `[output]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSettings {
    pub target: OutputTarget,
    /// Rotate the file once it reaches this size; 0: never.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

/// The file as written; [`Spanned`] keeps each value's place for error messages.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    export_per_flow: Option<Spanned<u32>>,
    export_per_cpu: Option<Spanned<u32>>,
    slow_connect_ms: Option<Spanned<u32>>,
    max_flows: Option<Spanned<u32>>,
    export_kinds: Option<Spanned<String>>,
    drop_reasons: Option<Spanned<String>>,
    perf_pages: Option<Spanned<u64>>,
    wakeup_events: Option<Spanned<u32>>,
    attach: Option<AttachMode>,
    output: Option<RawOutput>,
    thresholds: Option<toml::Table>,
    metrics: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    target: Option<Spanned<String>>,
    max_bytes: Option<Spanned<u64>>,
    keep: Option<Spanned<u32>>,
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|io_error| ConfigError::Read {
            path: path.to_owned(),
            io_error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = unknown_field(e.message())
                .map(|field| qualify(text, span.start, field))
                .or_else(|| key_at(text, span.start));
            invalid(text, path, span, key, e.message().to_owned())
        })?;
        let at = |span: Range<usize>, key: &str, message: String| {
            invalid(text, path, span, Some(key.to_owned()), message)
        };
        let RawConfig {
            export_per_flow,
            export_per_cpu,
            slow_connect_ms,
            max_flows,
            export_kinds,
            drop_reasons,
            perf_pages,
            wakeup_events,
            attach,
            output,
            thresholds,
            metrics,
        } = raw;
        let metrics = metrics
            .map(|v| parse_metrics_addr(v.get_ref()).map_err(|m| at(v.span(), "metrics", m)))
            .transpose()?;
        let max_flows = max_flows
            .map(|v| check_max_flows(*v.get_ref()).map_err(|m| at(v.span(), "max_flows", m)))
            .transpose()?;
        let perf_pages = perf_pages
            .map(|v| {
                usize::try_from(*v.get_ref())
                    .map_err(|e| e.to_string())
                    .and_then(check_perf_pages)
                    .map_err(|m| at(v.span(), "perf_pages", m))
            })
            .transpose()?;
        // Checked against this file's perf_pages, or the largest possible when the file has
        // none (a --perf-pages flag may still apply); `Settings::resolve` checks the result.
        let wakeup_events = wakeup_events
            .map(|v| {
                check_wakeup_events(*v.get_ref(), perf_pages.unwrap_or(MAX_PERF_PAGES))
                    .map_err(|m| at(v.span(), "wakeup_events", m))
            })
            .transpose()?;
        let export_kinds = export_kinds
            .map(|v| match export_kinds_mask(v.get_ref()) {
                Ok(_) => Ok(v.into_inner()),
                Err(m) => Err(at(v.span(), "export_kinds", m)),
            })
            .transpose()?;
        let drop_reasons = drop_reasons
            .map(|v| {
                // The names are the running kernel's: checked when the programs load.
                if v.get_ref().trim().is_empty() {
                    Err(at(v.span(), "drop_reasons", "must not be empty".to_owned()))
                } else {
                    Ok(v.into_inner())
                }
            })
            .transpose()?;
        let RawOutput {
            target,
            max_bytes,
            keep,
        } = output.unwrap_or_default();
        let target = target
            .map(|v| {
                let target = v
                    .get_ref()
                    .parse::<OutputTarget>()
                    .map_err(|m| at(v.span(), "output.target", m))?;
                match &target {
                    // The daemon's working directory is not the file's: say which file.
                    OutputTarget::File(p) if p.is_relative() => Err(at(
                        v.span(),
                        "output.target",
                        format!("the path must be absolute, not `{}`", p.display()),
                    )),
                    _ => Ok(target),
                }
            })
            .transpose()?;
        let keep = keep
            .map(|v| check_keep(*v.get_ref()).map_err(|m| at(v.span(), "output.keep", m)))
            .transpose()?;
        Ok(Config {
            export_per_flow: export_per_flow.map(Spanned::into_inner),
            export_per_cpu: export_per_cpu.map(Spanned::into_inner),
            slow_connect_ms: slow_connect_ms.map(Spanned::into_inner),
            max_flows,
            export_kinds,
            drop_reasons,
            perf_pages,
            wakeup_events,
            attach,
            output: OutputConfig {
                target,
                max_bytes: max_bytes.map(Spanned::into_inner),
                keep,
            },
            thresholds,
            metrics,
        })
    }

    /// This layer with `top` laid over it: what `top` sets wins.
    pub fn overlay(&self, top: &Config) -> Config {
        let Config {
            export_per_flow,
            export_per_cpu,
            slow_connect_ms,
            max_flows,
            export_kinds,
            drop_reasons,
            perf_pages,
            wakeup_events,
            attach,
            output,
            thresholds,
            metrics,
        } = top;
        let OutputConfig {
            target,
            max_bytes,
            keep,
        } = output;
        Config {
            export_per_flow: export_per_flow.or(self.export_per_flow),
            export_per_cpu: export_per_cpu.or(self.export_per_cpu),
            slow_connect_ms: slow_connect_ms.or(self.slow_connect_ms),
            max_flows: max_flows.or(self.max_flows),
            export_kinds: export_kinds.clone().or_else(|| self.export_kinds.clone()),
            drop_reasons: drop_reasons.clone().or_else(|| self.drop_reasons.clone()),
            perf_pages: perf_pages.or(self.perf_pages),
            wakeup_events: wakeup_events.or(self.wakeup_events),
            attach: attach.or(self.attach),
            output: OutputConfig {
                target: target.clone().or_else(|| self.output.target.clone()),
                max_bytes: max_bytes.or(self.output.max_bytes),
                keep: keep.or(self.output.keep),
            },
            thresholds: thresholds.clone().or_else(|| self.thresholds.clone()),
            metrics: metrics.or(self.metrics),
        }
    }
}

impl Settings {
    /// Fills what `config` leaves open with the defaults, checking what was not checked yet
    /// (values set in code rather than read from a file).
    pub fn resolve(config: &Config) -> Result<Settings, ConfigError> {
        let value = |key, message| ConfigError::Value { key, message };
        let Config {
            export_per_flow,
            export_per_cpu,
            slow_connect_ms,
            max_flows,
            export_kinds,
            drop_reasons,
            perf_pages,
            wakeup_events,
            attach,
            output,
            thresholds,
            metrics,
        } = config;
        let max_flows = max_flows.unwrap_or(DEFAULT_MAX_FLOWS);
        check_max_flows(max_flows).map_err(|m| value("max_flows", m))?;
        let perf_pages = perf_pages.unwrap_or(DEFAULT_PERF_PAGES);
        check_perf_pages(perf_pages).map_err(|m| value("perf_pages", m))?;
        let wakeup_events = wakeup_events.unwrap_or(
            DEFAULT_WAKEUP_EVENTS
                .min(u32::try_from(perf_ring::max_wakeup_events(perf_pages)).unwrap_or(u32::MAX)),
        );
        check_wakeup_events(wakeup_events, perf_pages).map_err(|m| value("wakeup_events", m))?;
        let export_kinds = export_kinds
            .clone()
            .unwrap_or_else(|| DEFAULT_EXPORT_KINDS.to_owned());
        let export_kinds_mask =
            export_kinds_mask(&export_kinds).map_err(|m| value("export_kinds", m))?;
        let keep = output.keep.unwrap_or(DEFAULT_KEEP);
        check_keep(keep).map_err(|m| value("output.keep", m))?;
        Ok(Settings {
            export_per_flow: export_per_flow.unwrap_or(DEFAULT_EXPORT_PER_FLOW),
            export_per_cpu: export_per_cpu.unwrap_or(DEFAULT_EXPORT_PER_CPU),
            slow_connect_ms: slow_connect_ms.unwrap_or(DEFAULT_SLOW_CONNECT_MS),
            max_flows,
            export_kinds,
            export_kinds_mask,
            drop_reasons: drop_reasons
                .clone()
                .unwrap_or_else(|| DEFAULT_DROP_REASONS.to_owned()),
            perf_pages,
            wakeup_events,
            attach: attach.unwrap_or_default(),
            output: OutputSettings {
                target: output.target.clone().unwrap_or(OutputTarget::Stdout),
                max_bytes: output.max_bytes.unwrap_or(DEFAULT_MAX_BYTES),
                keep,
            },
            thresholds: thresholds.clone().unwrap_or_default(),
            metrics: *metrics,
        })
    }

    /// How the kernel programs are loaded with these settings.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            export_per_flow: self.export_per_flow,
            export_per_cpu: self.export_per_cpu,
            slow_connect_ms: self.slow_connect_ms,
            export_kinds: self.export_kinds_mask,
            max_flows: self.max_flows,
            drop_reasons: self.drop_reasons.clone(),
            attach_mode: self.attach,
        }
    }

    /// The keys whose values differ between `self` and `new` (for a reload's log line, and to
    /// decide what a reload can apply without reloading the programs).
    pub fn changed_keys(&self, new: &Settings) -> Vec<&'static str> {
        let Settings {
            export_per_flow,
            export_per_cpu,
            slow_connect_ms,
            max_flows,
            export_kinds,
            export_kinds_mask,
            drop_reasons,
            perf_pages,
            wakeup_events,
            attach,
            output,
            thresholds,
            metrics,
        } = self;
        let mut changed = Vec::new();
        let mut note = |differs: bool, key| {
            if differs {
                changed.push(key);
            }
        };
        note(*export_per_flow != new.export_per_flow, "export_per_flow");
        note(*export_per_cpu != new.export_per_cpu, "export_per_cpu");
        note(*slow_connect_ms != new.slow_connect_ms, "slow_connect_ms");
        note(*max_flows != new.max_flows, "max_flows");
        note(
            *export_kinds_mask != new.export_kinds_mask || *export_kinds != new.export_kinds,
            "export_kinds",
        );
        note(*drop_reasons != new.drop_reasons, "drop_reasons");
        note(*perf_pages != new.perf_pages, "perf_pages");
        note(*wakeup_events != new.wakeup_events, "wakeup_events");
        note(*attach != new.attach, "attach");
        note(output.target != new.output.target, "output.target");
        note(output.max_bytes != new.output.max_bytes, "output.max_bytes");
        note(output.keep != new.output.keep, "output.keep");
        note(*thresholds != new.thresholds, "thresholds");
        note(*metrics != new.metrics, "metrics");
        changed
    }
}

/// What a reload (SIGHUP) reads: the file at `path` again, under the same command-line `flags`
/// as at start-up. On error the caller keeps the settings in force and reports the error (it
/// names the file, line and key).
///
/// Which changes take effect without restarting is the caller's choice
/// ([`Settings::changed_keys`]); the kernel-side ones (budgets, kinds, map sizes, drop reasons)
/// are fixed when the programs load.
pub fn reload(path: &Path, flags: &Config) -> Result<Settings, ConfigError> {
    Settings::resolve(&Config::load(path)?.overlay(flags))
}

/// Resolves `--export-kinds` / `export_kinds` into the kernel's bit mask: `default` (all but
/// `close`), `all`, names, `-NAME` to remove one; comma-separated, applied in order.
pub fn export_kinds_mask(spec: &str) -> Result<u32, String> {
    let bit = |k: EventKind| 1u32 << k.kernel_kind();
    let mut mask = 0u32;
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "all" => mask |= EventKind::ALL.into_iter().map(bit).fold(0, |a, b| a | b),
            // Trouble only: healthy connects, accepts and closes are counted per peer and
            // listener in the kernel; slow and retransmitted connects are exported regardless.
            "default" => {
                mask |= EventKind::ALL
                    .into_iter()
                    .filter(|k| {
                        !matches!(k, EventKind::Close | EventKind::Connect | EventKind::Accept)
                    })
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

/// The metrics endpoint's address: `IP:PORT` (`[IPv6]:PORT`), or a bare port for
/// `127.0.0.1:PORT`.
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse().map_err(|_| {
        format!("expected an address and port such as `127.0.0.1:9464` or `[::1]:9464`, not `{s}`")
    })
}

/// Perf buffer pages per CPU: the kernel wants a power of two.
pub fn check_perf_pages(n: usize) -> Result<usize, String> {
    if n.is_power_of_two() && (1..=MAX_PERF_PAGES).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "must be a power of two between 1 and 4096, not {n}"
        ))
    }
}

/// Samples per reader wakeup: at least 1, at most what a buffer of `perf_pages` holds (beyond
/// that the buffer would fill, and drop samples, before the kernel wakes the reader).
pub fn check_wakeup_events(n: u32, perf_pages: usize) -> Result<u32, String> {
    let max = perf_ring::max_wakeup_events(perf_pages);
    if n >= 1 && usize::try_from(n).is_ok_and(|n| n <= max) {
        Ok(n)
    } else {
        Err(format!(
            "must be between 1 and {max} (a perf buffer of {perf_pages} pages holds {max} events \
             of {} bytes), not {n}",
            perf_ring::SAMPLE_RECORD_BYTES
        ))
    }
}

pub fn check_max_flows(n: u32) -> Result<u32, String> {
    if MAX_FLOWS_RANGE.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "must be between {} and {}, not {n}",
            MAX_FLOWS_RANGE.start(),
            MAX_FLOWS_RANGE.end()
        ))
    }
}

pub fn check_keep(n: u32) -> Result<u32, String> {
    if n <= MAX_KEEP {
        Ok(n)
    } else {
        Err(format!("must be at most {MAX_KEEP}, not {n}"))
    }
}

/// An `Invalid` error at byte `span` of `text`.
fn invalid(
    text: &str,
    path: &Path,
    span: Range<usize>,
    key: Option<String>,
    message: String,
) -> ConfigError {
    let (line, column) = line_column(text, span.start);
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        column,
        key,
        message,
        text: text.lines().nth(line - 1).unwrap_or_default().to_owned(),
    }
}

/// 1-based line and column (in characters) of byte `offset`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// The field of serde's "unknown field `NAME`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

/// The dotted key of the `key = value` line holding byte `offset`, if that line is one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let (line, _) = line_column(text, offset);
    let content = text.lines().nth(line - 1)?.trim();
    if content.starts_with('[') || content.starts_with('#') {
        return None;
    }
    let (key, _) = content.split_once('=')?;
    let key = key.trim().trim_matches(['"', '\'']);
    (!key.is_empty()).then(|| qualify(text, offset, key))
}

/// `key` prefixed with the `[table]` header in force at byte `offset` (`output.max_bytes`).
fn qualify(text: &str, offset: usize, key: &str) -> String {
    let (line, _) = line_column(text, offset);
    let table = text
        .lines()
        .take(line)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::trim)
        .find_map(|l| {
            let header = l.strip_prefix('[')?;
            let end = header.find(']')?;
            Some(header[..end].trim_matches(['[', ' ']).to_owned())
        });
    match table {
        Some(table) if !table.is_empty() => format!("{table}.{key}"),
        _ => key.to_owned(),
    }
}

/// The anomaly thresholds of a `[thresholds]` table (missing keys keep their defaults).
pub fn thresholds(table: &toml::Table) -> Result<crate::aggregate::Thresholds, String> {
    let thresholds: crate::aggregate::Thresholds = toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e| format!("invalid [thresholds]: {e}"))?;
    thresholds
        .validate()
        .map_err(|e| format!("invalid [thresholds]: {e}"))?;
    Ok(thresholds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/observer/observer.toml"))
    }

    fn invalid_at(text: &str) -> (usize, Option<String>, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn an_unknown_attach_mode_is_named() {
        let (line, key, message) = invalid_at("\nattach = \"fast\"\n");
        assert_eq!((line, key.as_deref()), (2, Some("attach")));
        assert!(message.contains("auto"), "{message}");
        assert_eq!(
            Settings::resolve(&Config::default()).map(|s| s.attach).ok(),
            Some(AttachMode::Tuned)
        );
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        assert_eq!(parse("").expect("valid"), Config::default());
        assert_eq!(
            parse("# only comments\n").expect("valid"),
            Config::default()
        );
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(
            r#"
export_per_flow = 0
export_per_cpu = 500
slow_connect_ms = 250
max_flows = 1024
export_kinds = "all,-close"
drop_reasons = "default,-NO_SOCKET"
perf_pages = 16
wakeup_events = 100
attach = "classic"
metrics = "127.0.0.1:9464"

[output]
target = "file:/var/log/observer/observer.ndjson"
max_bytes = 1048576
keep = 3

[thresholds]
retransmit_ratio = 0.05
[thresholds.syn]
per_second = 10
"#,
        )
        .expect("valid");
        assert_eq!(config.export_per_flow, Some(0));
        assert_eq!(config.export_per_cpu, Some(500));
        assert_eq!(config.slow_connect_ms, Some(250));
        assert_eq!(config.max_flows, Some(1024));
        assert_eq!(config.export_kinds.as_deref(), Some("all,-close"));
        assert_eq!(config.drop_reasons.as_deref(), Some("default,-NO_SOCKET"));
        assert_eq!(config.perf_pages, Some(16));
        assert_eq!(config.wakeup_events, Some(100));
        assert_eq!(config.attach, Some(AttachMode::Classic));
        assert_eq!(
            config.metrics,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert_eq!(
            config.output,
            OutputConfig {
                target: Some(OutputTarget::File(
                    "/var/log/observer/observer.ndjson".into()
                )),
                max_bytes: Some(1_048_576),
                keep: Some(3),
            }
        );
        let thresholds = config.thresholds.expect("thresholds");
        assert_eq!(
            thresholds.get("retransmit_ratio"),
            Some(&toml::Value::Float(0.05))
        );
        assert!(thresholds.get("syn").is_some_and(toml::Value::is_table));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../packaging/observer.toml");
        let config = parse(text).expect("packaging/observer.toml must be valid");
        Settings::resolve(&config).expect("and resolve");
    }

    #[test]
    fn a_wrong_type_names_the_line_and_key() {
        let (line, key, message) = invalid_at("max_flows = 1024\nexport_per_flow = \"ten\"\n");
        assert_eq!(line, 2);
        assert_eq!(key.as_deref(), Some("export_per_flow"));
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn an_unknown_key_names_the_line_and_key() {
        let (line, key, message) = invalid_at("max_flows = 1024\n\n[output]\nmax_byte = 10\n");
        assert_eq!(line, 4);
        assert_eq!(key.as_deref(), Some("output.max_byte"));
        assert!(message.contains("unknown field"), "{message}");
        let (line, key, _) = invalid_at("# c\nduration = 5\n");
        assert_eq!((line, key.as_deref()), (2, Some("duration")));
    }

    #[test]
    fn out_of_range_values_name_the_line_and_key() {
        let (line, key, message) = invalid_at("\n\nperf_pages = 3\n");
        assert_eq!((line, key.as_deref()), (3, Some("perf_pages")));
        assert!(message.contains("power of two"), "{message}");
        let (line, key, _) = invalid_at("max_flows = 4\n");
        assert_eq!((line, key.as_deref()), (1, Some("max_flows")));
        let (line, key, message) = invalid_at("export_kinds = \"retransmit,bogus\"\n");
        assert_eq!((line, key.as_deref()), (1, Some("export_kinds")));
        assert!(message.contains("bogus"), "{message}");
        let (line, key, _) = invalid_at("[output]\ntarget = \"syslog\"\n");
        assert_eq!((line, key.as_deref()), (2, Some("output.target")));
        let (_, key, message) = invalid_at("[output]\ntarget = \"file:out.ndjson\"\n");
        assert_eq!(key.as_deref(), Some("output.target"));
        assert!(message.contains("absolute"), "{message}");
        let (line, key, _) = invalid_at("[output]\nkeep = -1\n");
        assert_eq!((line, key.as_deref()), (2, Some("output.keep")));
        let (_, key, _) = invalid_at("max_flows = 99999999999\n");
        assert_eq!(key.as_deref(), Some("max_flows"));
        let (line, key, message) = invalid_at("\nmetrics = \"localhost\"\n");
        assert_eq!((line, key.as_deref()), (2, Some("metrics")));
        assert!(message.contains("127.0.0.1:9464"), "{message}");
        let (line, key, message) = invalid_at("perf_pages = 1\nwakeup_events = 35\n");
        assert_eq!((line, key.as_deref()), (2, Some("wakeup_events")));
        assert!(message.contains("between 1 and 34"), "{message}");
        let (_, key, _) = invalid_at("wakeup_events = 0\n");
        assert_eq!(key.as_deref(), Some("wakeup_events"));
        let (_, key, _) = invalid_at("wakeup_events = 1000000\n");
        assert_eq!(key.as_deref(), Some("wakeup_events"));
    }

    #[test]
    fn wakeup_events_fit_the_perf_buffer() {
        let settings = Settings::resolve(&Config::default()).expect("defaults");
        assert_eq!(
            (settings.perf_pages, settings.wakeup_events),
            (DEFAULT_PERF_PAGES, DEFAULT_WAKEUP_EVENTS)
        );
        // A one-page buffer holds 34 events: the default shrinks to fit; a set value must fit.
        let small = Config {
            perf_pages: Some(1),
            ..Config::default()
        };
        assert_eq!(
            Settings::resolve(&small).map(|s| s.wakeup_events).ok(),
            Some(34)
        );
        let too_many = Config {
            perf_pages: Some(1),
            wakeup_events: Some(64),
            ..Config::default()
        };
        assert!(matches!(
            Settings::resolve(&too_many),
            Err(ConfigError::Value {
                key: "wakeup_events",
                ..
            })
        ));
        // The file's value holds when a flag gives the pages: checked on the result.
        let file = parse("wakeup_events = 5000\n").expect("valid without perf_pages");
        let flags = Config {
            perf_pages: Some(512),
            ..Config::default()
        };
        assert_eq!(
            Settings::resolve(&file.overlay(&flags))
                .map(|s| s.wakeup_events)
                .ok(),
            Some(5000)
        );
        assert!(Settings::resolve(&file).is_err());
        assert_eq!(check_wakeup_events(1, 1), Ok(1));
        assert!(check_wakeup_events(0, 64).is_err());
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let (line, _, _) = invalid_at("max_flows = 1024\nexport_per_flow = \n");
        assert_eq!(line, 2);
        let err = parse("a = 1\n[output\n").expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("/etc/observer/observer.toml"), "{text}");
    }

    #[test]
    fn the_message_shows_file_line_key_and_text() {
        let err = parse("export_per_flow = -5\n").expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "invalid config file `/etc/observer/observer.toml`, line 1, column 19: key `export_per_flow`: "
            ),
            "{text}"
        );
        assert!(text.ends_with("    1 | export_per_flow = -5"), "{text}");
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file =
            parse("export_per_flow = 7\nmax_flows = 1024\n[output]\nkeep = 2\n").expect("valid");
        let flags = Config {
            export_per_flow: Some(9),
            ..Config::default()
        };
        let settings = Settings::resolve(&file.overlay(&flags)).expect("resolves");
        assert_eq!(settings.export_per_flow, 9);
        assert_eq!(settings.max_flows, 1024);
        assert_eq!(settings.output.keep, 2);
        assert_eq!(settings.export_per_cpu, DEFAULT_EXPORT_PER_CPU);
        assert_eq!(settings.slow_connect_ms, DEFAULT_SLOW_CONNECT_MS);
        assert_eq!(settings.output.target, OutputTarget::Stdout);
        assert_eq!(settings.output.max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(
            settings.export_kinds_mask,
            export_kinds_mask("default").expect("valid")
        );
        assert!(settings.thresholds.is_empty());
    }

    #[test]
    fn values_set_in_code_are_checked_too() {
        let bad = Config {
            perf_pages: Some(3),
            ..Config::default()
        };
        assert!(matches!(
            Settings::resolve(&bad),
            Err(ConfigError::Value {
                key: "perf_pages",
                ..
            })
        ));
    }

    #[test]
    fn changed_keys_lists_what_a_reload_changes() {
        let old = Settings::resolve(&Config::default()).expect("defaults");
        let new = Settings::resolve(
            &parse(
                "export_per_flow = 1\n[output]\ntarget = \"file:/tmp/x\"\n[thresholds]\na = 1\n",
            )
            .expect("valid"),
        )
        .expect("resolves");
        assert_eq!(
            old.changed_keys(&new),
            ["export_per_flow", "output.target", "thresholds"]
        );
        assert!(new.changed_keys(&new).is_empty());
    }

    #[test]
    fn reload_keeps_flags_and_reports_errors() {
        let dir = std::env::temp_dir().join(format!("observer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("observer.toml");
        std::fs::write(&path, "export_per_flow = 3\nmax_flows = 32\n").expect("write");
        let flags = Config {
            max_flows: Some(64),
            ..Config::default()
        };
        let settings = reload(&path, &flags).expect("valid");
        assert_eq!((settings.export_per_flow, settings.max_flows), (3, 64));
        std::fs::write(&path, "export_per_flow = \"x\"\n").expect("write");
        assert!(matches!(
            reload(&path, &flags),
            Err(ConfigError::Invalid { line: 1, .. })
        ));
        assert!(matches!(
            reload(&dir.join("missing.toml"), &flags),
            Err(ConfigError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metrics_addresses_parse() {
        assert_eq!(
            parse_metrics_addr("9464"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9464"),
            Ok("[::1]:9464".parse().expect("valid"))
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:1"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 1)))
        );
        assert!(parse_metrics_addr("localhost:9464").is_err());
        assert!(parse_metrics_addr("").is_err());
        assert_eq!(
            Settings::resolve(&Config::default())
                .map(|s| s.metrics)
                .ok(),
            Some(None)
        );
    }

    #[test]
    fn output_targets_parse() {
        assert_eq!("stdout".parse(), Ok(OutputTarget::Stdout));
        assert_eq!("-".parse(), Ok(OutputTarget::Stdout));
        assert_eq!(
            "file:/a/b".parse(),
            Ok(OutputTarget::File(PathBuf::from("/a/b")))
        );
        assert!("file:".parse::<OutputTarget>().is_err());
        assert!("tcp:1.2.3.4".parse::<OutputTarget>().is_err());
        assert_eq!(
            OutputTarget::File(PathBuf::from("/a")).to_string(),
            "file:/a"
        );
    }

    #[test]
    fn positions_are_one_based_characters() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("é = 1", 3), (1, 3));
        assert_eq!(line_column("x", 99), (1, 2));
    }
}

#[cfg(test)]
mod proptests;
