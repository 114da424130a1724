//! Prometheus metrics: what the output stage saw, as counters a scraper reads over HTTP
//! (`observer run --metrics 127.0.0.1:9464`, `GET /metrics`). See docs/metrics.md.
//!
//! [`Metrics`] is updated by the output stage (one call per record, a lock-free atomic
//! increment once a label set has been seen) and encoded at scrape time with
//! [`prometheus_client`]. The process's own CPU time and resident memory are read from
//! `/proc/self` at scrape time.
//!
//! Two formats are served: OpenMetrics when the scraper asks for it in `Accept` (Prometheus
//! does), else the Prometheus text format 0.0.4 (curl, `promtool check metrics`), in which a
//! counter family is named with its `_total` suffix.
//!
//! Label cardinality is bounded: event kinds and reasons are the kernel's enums, listeners are
//! those that dropped SYNs, peers are capped at [`MAX_PEERS`] (later peers are counted under
//! `peer="other"`) and the systemd units of socket owners at [`MAX_UNITS`] (`unit="other"`).
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use observer::metrics::{Metrics, Server};
//!
//! let metrics = Arc::new(Metrics::new());
//! let server = Server::bind("127.0.0.1:9464".parse().expect("address")).await?;
//! tokio::spawn(server.run(Arc::clone(&metrics)));
//! metrics.event("connect_failed", None);
//! # Ok(())
//! # }
//! ```
use std::{
    collections::HashMap,
    fmt::Write as _,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

/// Peers that get a label of their own; events of further peers count under `peer="other"`.
pub const MAX_PEERS: usize = 200;

/// The `peer` label of the peers beyond [`MAX_PEERS`].
pub const OTHER_PEER: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    kind: String,
    /// The drop or RST reason name; empty (no label, for Prometheus) when the kind has none.
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    /// `addr:port` (`[addr]:port` for IPv6).
    listener: String,
    netns: u64,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    kind: String,
}

/// Systemd units (of socket owners) that get a label of their own; further units count under
/// `unit="other"`.
pub const MAX_UNITS: usize = 100;

/// The `unit` label of the units beyond [`MAX_UNITS`].
pub const OTHER_UNIT: &str = "other";

/// The `unit` label of stale connections whose owner has no unit (or that no process holds).
pub const NO_UNIT: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnitKindLabels {
    unit: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnitLabels {
    unit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// The counters of label sets already seen, found by `&str` without allocating: the output
/// stage updates them once per record.
#[derive(Debug, Default)]
struct Seen {
    /// kind -> reason ("" for none) -> counter.
    events: HashMap<Box<str>, HashMap<Box<str>, Counter>>,
    /// Peers with a label of their own (at most [`MAX_PEERS`]): peer -> kind -> counter.
    peers: HashMap<IpAddr, HashMap<Box<str>, Counter>>,
    /// kind -> counter of `peer="other"`.
    other_peers: HashMap<Box<str>, Counter>,
    anomaly_kinds: HashMap<Box<str>, Counter>,
    /// Units with a label of their own (at most [`MAX_UNITS`]).
    units: std::collections::HashSet<Box<str>>,
}

impl Seen {
    /// The `unit` label for `unit`: itself while fewer than [`MAX_UNITS`] have one (or it has
    /// one already), else [`OTHER_UNIT`]; the flag says it was folded.
    fn unit_label<'a>(&mut self, unit: &'a str) -> (&'a str, bool) {
        if self.units.contains(unit) || unit == NO_UNIT {
            return (unit, false);
        }
        if self.units.len() >= MAX_UNITS {
            return (OTHER_UNIT, true);
        }
        self.units.insert(unit.into());
        (unit, false)
    }
}

/// The observer's metrics, shared between the output stage (updates) and the HTTP endpoint
/// (scrapes). Cheap to update: after the first event of a label set, an update is a map lookup
/// under an uncontended lock and an atomic increment.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    listener_drops: Family<ListenerLabels, Counter>,
    peer_events: Family<PeerLabels, Counter>,
    peers_folded: Counter,
    unit_events: Family<UnitKindLabels, Counter>,
    stale_connections: Family<UnitLabels, Counter>,
    units_folded: Counter,
    lost: Counter,
    undelivered: Counter,
    anomalies_open: Gauge,
    anomalies_opened: Family<KindLabels, Counter>,
    seen: Mutex<Seen>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Which exposition format a scrape gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: counters named `NAME_total` in HELP and TYPE too.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`, ending in `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for (Prometheus text when it asks for
    /// neither).
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "observer_events",
            "Kernel events the output stage received, by record type and drop or RST reason",
            events.clone(),
        );
        let listener_drops = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "observer_listener_drops",
            "SYNs a listener dropped, by cause (accept_queue_overflow, syn_queue_drop)",
            listener_drops.clone(),
        );
        let peer_events = Family::<PeerLabels, Counter>::default();
        registry.register(
            "observer_peer_events",
            "Kernel events by peer address (the first 200 peers; later ones under peer=other)",
            peer_events.clone(),
        );
        let peers_folded = Counter::default();
        registry.register(
            "observer_peers_folded",
            "Peer events counted under peer=other because 200 peers already have a label",
            peers_folded.clone(),
        );
        let unit_events = Family::<UnitKindLabels, Counter>::default();
        registry.register(
            "observer_unit_events",
            "Kernel events by the systemd unit of the socket's owner (events whose owner is known; the first 100 units, later ones under unit=other)",
            unit_events.clone(),
        );
        let stale_connections = Family::<UnitLabels, Counter>::default();
        registry.register(
            "observer_stale_connections",
            "Connections that turned stale, by the systemd unit of their owner (unit=none without one)",
            stale_connections.clone(),
        );
        let units_folded = Counter::default();
        registry.register(
            "observer_units_folded",
            "Unit-labelled updates counted under unit=other because 100 units already have a label",
            units_folded.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "observer_lost",
            "Samples the kernel's perf buffers dropped because observer read them too slowly",
            lost.clone(),
        );
        let undelivered = Counter::default();
        registry.register(
            "observer_undelivered",
            "Records dropped from observer's queue because the output fell behind",
            undelivered.clone(),
        );
        let anomalies_open = Gauge::default();
        registry.register(
            "observer_anomalies_open",
            "Anomalies open now",
            anomalies_open.clone(),
        );
        let anomalies_opened = Family::<KindLabels, Counter>::default();
        registry.register(
            "observer_anomalies_opened",
            "Anomalies opened, by kind",
            anomalies_opened.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        registry.register_collector(Box::new(TcpSegmentsCollector));
        Self {
            registry,
            events,
            listener_drops,
            peer_events,
            peers_folded,
            unit_events,
            stale_connections,
            units_folded,
            lost,
            undelivered,
            anomalies_open,
            anomalies_opened,
            seen: Mutex::new(Seen::default()),
        }
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        // A panic while holding the lock leaves the maps consistent (inserts are atomic).
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One kernel event of record type `kind` (`connect_failed`, `drop`, ...), with its drop or
    /// RST reason name when it has one: `observer_events_total{kind, reason}`.
    pub fn event(&self, kind: &str, reason: Option<&str>) {
        let reason = reason.unwrap_or("");
        let mut seen = self.seen();
        if !seen.events.contains_key(kind) {
            seen.events.insert(kind.into(), HashMap::new());
        }
        let Some(by_reason) = seen.events.get_mut(kind) else {
            return;
        };
        if let Some(counter) = by_reason.get(reason) {
            counter.inc();
            return;
        }
        let counter = self.events.get_or_create_owned(&EventLabels {
            kind: kind.to_owned(),
            reason: reason.to_owned(),
        });
        counter.inc();
        by_reason.insert(reason.into(), counter);
    }

    /// A `listener_drops` record: `observer_listener_drops_total{listener="addr:port", netns,
    /// cause}` grows by each cause's count.
    pub fn listener_drops(
        &self,
        netns: u64,
        addr: IpAddr,
        port: u16,
        accept_overflows: u64,
        syn_queue_drops: u64,
    ) {
        let listener = SocketAddr::new(addr, port).to_string();
        for (cause, n) in [
            ("accept_queue_overflow", accept_overflows),
            ("syn_queue_drop", syn_queue_drops),
        ] {
            if n > 0 {
                self.listener_drops
                    .get_or_create(&ListenerLabels {
                        listener: listener.clone(),
                        netns,
                        cause,
                    })
                    .inc_by(n);
            }
        }
    }

    /// One event of record type `kind` with peer `addr`: `observer_peer_events_total{peer,
    /// kind}`. The first [`MAX_PEERS`] peers get their own label; events of later ones count
    /// under `peer="other"` and in `observer_peers_folded_total`.
    pub fn peer_event(&self, addr: IpAddr, kind: &str) {
        let mut seen = self.seen();
        let Seen {
            peers, other_peers, ..
        } = &mut *seen;
        let folded = peers.len() >= MAX_PEERS && !peers.contains_key(&addr);
        let by_kind = if folded {
            self.peers_folded.inc();
            other_peers
        } else {
            peers.entry(addr).or_default()
        };
        if let Some(counter) = by_kind.get(kind) {
            counter.inc();
            return;
        }
        let peer = if folded {
            OTHER_PEER.to_owned()
        } else {
            addr.to_string()
        };
        let counter = self.peer_events.get_or_create_owned(&PeerLabels {
            peer,
            kind: kind.to_owned(),
        });
        counter.inc();
        by_kind.insert(kind.into(), counter);
    }

    /// One event of record type `kind` whose socket's owner runs in systemd unit `unit`:
    /// `observer_unit_events_total{unit, kind}` (bounded by [`MAX_UNITS`]).
    pub fn unit_event(&self, unit: &str, kind: &str) {
        let (label, folded) = self.seen().unit_label(unit);
        if folded {
            self.units_folded.inc();
        }
        self.unit_events
            .get_or_create(&UnitKindLabels {
                unit: label.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// `n` connections of an owner in `unit` (`None`: no owner, or one without a unit) newly
    /// stale: `observer_stale_connections_total{unit}` (bounded by [`MAX_UNITS`]).
    pub fn stale_connections(&self, unit: Option<&str>, n: u64) {
        if n == 0 {
            return;
        }
        let (label, folded) = self.seen().unit_label(unit.unwrap_or(NO_UNIT));
        if folded {
            self.units_folded.inc();
        }
        self.stale_connections
            .get_or_create(&UnitLabels {
                unit: label.to_owned(),
            })
            .inc_by(n);
    }

    /// `n` samples the perf buffers reported lost: `observer_lost_total`.
    pub fn lost(&self, n: u64) {
        self.lost.inc_by(n);
    }

    /// `n` records dropped because the output fell behind: `observer_undelivered_total`.
    pub fn undelivered(&self, n: u64) {
        self.undelivered.inc_by(n);
    }

    /// Anomalies open now: `observer_anomalies_open`.
    pub fn anomalies_open(&self, n: usize) {
        self.anomalies_open
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An anomaly of `kind` opened: `observer_anomalies_opened_total{kind}`.
    pub fn anomaly_opened(&self, kind: &str) {
        let mut seen = self.seen();
        if let Some(counter) = seen.anomaly_kinds.get(kind) {
            counter.inc();
            return;
        }
        let counter = self.anomalies_opened.get_or_create_owned(&KindLabels {
            kind: kind.to_owned(),
        });
        counter.inc();
        seen.anomaly_kinds.insert(kind.into(), counter);
    }

    /// The metrics now, in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a label set.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            let _ = writeln!(text, "# encoding error: {e}");
        }
        match format {
            Format::OpenMetrics => text,
            Format::Prometheus => openmetrics_to_prometheus(&text),
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition from `prometheus_client`:
/// counter families take their samples' `_total` name in HELP and TYPE (Prometheus parsers key
/// a family by its samples' name), and the OpenMetrics-only `# UNIT` and `# EOF` lines go.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + 16 * counters.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The observer process's CPU time and resident memory, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(seconds) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| cpu_seconds(&s, clock_ticks_per_second()))
        {
            let counter = ConstCounter::new(seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time observer used, user and system, in seconds.",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        if let Some(bytes) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| resident_bytes(&s))
        {
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            let metric = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of observer (VmRSS), in bytes.",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// The kernel's TCP segment counters (`Tcp: OutSegs`, `RetransSegs`) of observer's own network
/// namespace (the host's, for the packaged service), read from `/proc/self/net/snmp` at each
/// scrape: the denominator and numerator of a retransmit ratio, exact and independent of the
/// export budgets. `/proc/self/net` follows the main thread, which never leaves that namespace.
#[derive(Debug)]
struct TcpSegmentsCollector;

/// (metric, `/proc/net/snmp` counter, help) of [`TcpSegmentsCollector`].
const TCP_SEGMENT_COUNTERS: [(&str, &str, &str); 2] = [
    (
        "observer_tcp_segments_sent",
        "TcpOutSegs",
        "TCP segments the host sent (Tcp OutSegs of observer's network namespace), retransmits excluded.",
    ),
    (
        "observer_tcp_segments_retransmitted",
        "TcpRetransSegs",
        "TCP segments the host retransmitted (Tcp RetransSegs of observer's network namespace).",
    ),
];

impl Collector for TcpSegmentsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(text) = std::fs::read_to_string("/proc/self/net/snmp") else {
            return Ok(());
        };
        let counters = crate::enrich::counters::parse_netstat(&text);
        for (name, counter, help) in TCP_SEGMENT_COUNTERS {
            if let Some(&value) = counters.get(counter) {
                let counter = ConstCounter::new(value);
                let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
                counter.encode(metric)?;
            }
        }
        Ok(())
    }
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// utime + stime of a `/proc/PID/stat` line, in seconds. The command name (field 2) may hold
/// spaces and parentheses: fields are counted from the last `)`.
fn cpu_seconds(stat: &str, ticks_per_second: u64) -> Option<f64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the name: state (3), ppid, ..., utime (14), stime (15).
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_second as f64)
}

/// `VmRSS` of a `/proc/PID/status`, in bytes.
fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// The HTTP endpoint

/// Scrapes served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 8;
/// The request head must arrive whole within this time and size.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST_BYTES: usize = 8192;

/// The metrics endpoint: a minimal HTTP/1.1 server answering `GET /metrics` (and `HEAD`), one
/// request per connection.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port: see [`Server::local_addr`]). The error names the
    /// address.
    pub async fn bind(addr: SocketAddr) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind the metrics endpoint to {addr}: {e}"),
            )
        })?;
        let addr = listener.local_addr()?;
        Ok(Server { listener, addr })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes until the task is dropped. Failed connections are ignored; a failing
    /// `accept` (out of file descriptors) is retried after a pause.
    pub async fn run(self, metrics: Arc<Metrics>) -> io::Result<()> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = Arc::clone(&slots)
                .acquire_owned()
                .await
                .map_err(io::Error::other)?;
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let _ = respond(stream, &metrics).await;
                drop(permit);
            });
        }
    }
}

/// Binds `addr` and serves `GET /metrics` there until the task is dropped. Only a bind error
/// is returned (it names the address).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<()> {
    Server::bind(addr).await?.run(metrics).await
}

/// A parsed request head: what routing needs.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    accept: Option<&'a str>,
}

fn parse_request(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    let path = target.split('?').next().unwrap_or(target);
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("accept")
            .then(|| value.trim())
    });
    Some(Request {
        method,
        path,
        accept,
    })
}

/// Status line, extra headers and body of the response to `head`.
fn route(
    head: &str,
    metrics: &Metrics,
) -> (&'static str, Vec<(&'static str, &'static str)>, String) {
    let Some(request) = parse_request(head) else {
        return ("400 Bad Request", Vec::new(), "bad request\n".to_owned());
    };
    if request.path != "/metrics" {
        return (
            "404 Not Found",
            Vec::new(),
            "not found: the metrics are at /metrics\n".to_owned(),
        );
    }
    if !matches!(request.method, "GET" | "HEAD") {
        return (
            "405 Method Not Allowed",
            vec![("Allow", "GET, HEAD")],
            "method not allowed\n".to_owned(),
        );
    }
    let format = Format::negotiate(request.accept);
    let body = metrics.encode(format);
    (
        "200 OK",
        vec![("Content-Type", format.content_type())],
        body,
    )
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > MAX_REQUEST_BYTES {
                return Err(io::Error::other("request head too long"));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    let (status, headers, body) = match read {
        Ok(Ok(())) => route(&String::from_utf8_lossy(&head), metrics),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        _ => ("400 Bad Request", Vec::new(), "bad request\n".to_owned()),
    };
    let is_head = head.starts_with(b"HEAD ");
    let mut response = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        let _ = write!(response, "{name}: {value}\r\n");
    }
    if !response.contains("Content-Type") {
        response.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    let _ = write!(
        response,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !is_head {
        response.push_str(&body);
    }
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn updates_are_encoded() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.event("connect_failed", None);
        }
        m.event("drop", Some("NO_SOCKET"));
        m.event("drop", Some("NO_SOCKET"));
        m.event("drop", Some("NETFILTER_DROP"));
        m.listener_drops(4026532315, IpAddr::from([127, 0, 0, 1]), 5000, 4, 0);
        m.listener_drops(4026532315, IpAddr::from([127, 0, 0, 1]), 5000, 1, 2);
        m.listener_drops(7, "::1".parse().expect("ip"), 80, 0, 3);
        m.lost(5);
        m.undelivered(7);
        m.undelivered(1);
        m.anomalies_open(2);
        m.anomaly_opened("failed_connects");
        m.peer_event(IpAddr::from([10, 0, 0, 2]), "connect_failed");

        let text = m.encode(Format::Prometheus);
        let samples = sample_lines(&text);
        for expected in [
            r#"observer_events_total{kind="connect_failed",reason=""} 3"#,
            r#"observer_events_total{kind="drop",reason="NO_SOCKET"} 2"#,
            r#"observer_events_total{kind="drop",reason="NETFILTER_DROP"} 1"#,
            r#"observer_listener_drops_total{listener="127.0.0.1:5000",netns="4026532315",cause="accept_queue_overflow"} 5"#,
            r#"observer_listener_drops_total{listener="127.0.0.1:5000",netns="4026532315",cause="syn_queue_drop"} 2"#,
            r#"observer_listener_drops_total{listener="[::1]:80",netns="7",cause="syn_queue_drop"} 3"#,
            "observer_lost_total 5",
            "observer_undelivered_total 8",
            "observer_anomalies_open 2",
            r#"observer_anomalies_opened_total{kind="failed_connects"} 1"#,
            r#"observer_peer_events_total{peer="10.0.0.2",kind="connect_failed"} 1"#,
            "observer_peers_folded_total 0",
        ] {
            assert!(
                samples.contains(&expected),
                "{expected} missing in:\n{text}"
            );
        }
        // No sample for a cause that never dropped.
        assert!(!text.contains(r#"listener="[::1]:80",netns="7",cause="accept"#));
        // Prometheus text: counter families by their samples' name, no OpenMetrics EOF.
        assert!(
            text.contains("# TYPE observer_events_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP observer_events_total Kernel events"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE observer_anomalies_open gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_resident_memory_bytes gauge\n"),
            "{text}"
        );

        let open = m.encode(Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE observer_events counter\n"), "{open}");
        // The same samples (the process's own figures and the host's segment counters move
        // between two encodings).
        let own = |text: &str| -> Vec<String> {
            sample_lines(text)
                .into_iter()
                .filter(|l| !l.starts_with("process_") && !l.starts_with("observer_tcp_segments"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(own(&open), own(&text));
    }

    #[test]
    fn units_are_labelled_and_folded_beyond_the_cap() {
        let m = Metrics::new();
        m.unit_event("nginx.service", "retransmit");
        m.unit_event("nginx.service", "retransmit");
        m.stale_connections(Some("nginx.service"), 20);
        m.stale_connections(None, 3);
        m.stale_connections(Some("idle.service"), 0);
        for i in 0..MAX_UNITS {
            m.unit_event(&format!("app-{i}.service"), "drop");
        }
        // nginx took one of the 100 labels: the last app is folded, as is any new unit.
        m.stale_connections(Some("late.service"), 2);
        let text = m.encode(Format::Prometheus);
        let samples = sample_lines(&text);
        for expected in [
            r#"observer_unit_events_total{unit="nginx.service",kind="retransmit"} 2"#,
            r#"observer_stale_connections_total{unit="nginx.service"} 20"#,
            r#"observer_stale_connections_total{unit="none"} 3"#,
            r#"observer_stale_connections_total{unit="other"} 2"#,
            r#"observer_unit_events_total{unit="app-98.service",kind="drop"} 1"#,
            r#"observer_unit_events_total{unit="other",kind="drop"} 1"#,
            "observer_units_folded_total 2",
        ] {
            assert!(
                samples.contains(&expected),
                "{expected} missing in:\n{text}"
            );
        }
        assert!(!text.contains("app-99.service"), "{text}");
        assert!(!text.contains("idle.service"), "{text}");
        let distinct: std::collections::BTreeSet<&str> = samples
            .iter()
            .filter_map(|l| l.split("unit=\"").nth(1)?.split('"').next())
            .collect();
        // 100 units, "none" and "other".
        assert_eq!(distinct.len(), MAX_UNITS + 2);
    }

    #[test]
    fn peers_beyond_the_cap_are_folded() {
        let m = Metrics::new();
        let peer = |i: usize| IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
        for i in 0..MAX_PEERS + 5 {
            m.peer_event(peer(i), "connect_failed");
        }
        // Known peers keep their label; new ones keep going to "other".
        m.peer_event(peer(0), "connect_failed");
        m.peer_event(peer(0), "drop");
        m.peer_event(peer(MAX_PEERS), "connect_failed");
        m.peer_event(peer(MAX_PEERS + 99), "drop");
        let text = m.encode(Format::Prometheus);
        let peers: Vec<&str> = sample_lines(&text)
            .into_iter()
            .filter(|l| l.starts_with("observer_peer_events_total"))
            .collect();
        let distinct: std::collections::BTreeSet<&str> = peers
            .iter()
            .filter_map(|l| l.split("peer=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(distinct.len(), MAX_PEERS + 1, "{text}");
        assert!(distinct.contains(OTHER_PEER));
        for expected in [
            r#"observer_peer_events_total{peer="10.1.0.0",kind="connect_failed"} 2"#,
            r#"observer_peer_events_total{peer="10.1.0.0",kind="drop"} 1"#,
            r#"observer_peer_events_total{peer="other",kind="connect_failed"} 6"#,
            r#"observer_peer_events_total{peer="other",kind="drop"} 1"#,
            "observer_peers_folded_total 7",
        ] {
            assert!(
                peers.contains(&expected) || text.contains(expected),
                "{expected} missing in:\n{text}"
            );
        }
    }

    #[test]
    fn counters_are_renamed_for_the_prometheus_format() {
        let open = "# HELP a_b Help with spaces.\n# TYPE a_b counter\n# UNIT a_b seconds\na_b_total{x=\"1\"} 3\n# HELP g Gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(open),
            "# HELP a_b_total Help with spaces.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# HELP g Gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn process_figures_are_parsed() {
        // The name may hold spaces and parentheses.
        let stat = "1234 (tokio (rt) 1) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 3 0 100 1000 300 18446744073709551615";
        assert_eq!(cpu_seconds(stat, 100), Some(3.0));
        assert_eq!(cpu_seconds("garbage", 100), None);
        let status = "Name:\tobserver\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(resident_bytes(status), Some(2048 * 1024));
        assert_eq!(resident_bytes("Name:\tx\n"), None);
        // This process's own figures are there.
        let own = Metrics::new().encode(Format::Prometheus);
        assert!(own.contains("\nprocess_cpu_seconds_total "), "{own}");
        assert!(own.contains("\nprocess_resident_memory_bytes "), "{own}");
    }

    #[test]
    fn tcp_segment_counters_are_the_kernels() {
        let read = |name: &str| -> u64 {
            let text = std::fs::read_to_string("/proc/self/net/snmp").expect("snmp");
            crate::enrich::counters::parse_netstat(&text)[name]
        };
        let before = (read("TcpOutSegs"), read("TcpRetransSegs"));
        let text = Metrics::new().encode(Format::Prometheus);
        let after = (read("TcpOutSegs"), read("TcpRetransSegs"));
        let value = |metric: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{metric} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {metric} in {text}"))
        };
        let sent = value("observer_tcp_segments_sent_total");
        let retransmitted = value("observer_tcp_segments_retransmitted_total");
        assert!(
            (before.0..=after.0).contains(&sent),
            "{sent} not in {before:?}..{after:?}"
        );
        assert!(
            (before.1..=after.1).contains(&retransmitted),
            "{retransmitted} not in {before:?}..{after:?}"
        );
        assert!(text.contains("# TYPE observer_tcp_segments_sent_total counter\n"));
    }

    #[test]
    fn requests_are_parsed_and_routed() {
        let head = "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n";
        assert_eq!(
            parse_request(head),
            Some(Request {
                method: "GET",
                path: "/metrics",
                accept: Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            })
        );
        assert_eq!(parse_request("nonsense\r\n\r\n"), None);
        let m = Metrics::new();
        assert_eq!(route(head, &m).0, "200 OK");
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n", &m).0,
            "405 Method Not Allowed"
        );
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
    }

    async fn get(addr: SocketAddr, request: &str) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    #[tokio::test]
    async fn the_endpoint_serves_scrapes_on_loopback() -> io::Result<()> {
        let metrics = Arc::new(Metrics::new());
        let server = Server::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = server.local_addr();
        let task = tokio::spawn(server.run(Arc::clone(&metrics)));
        metrics.event("connect_failed", None);
        let response = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains("Content-Type: text/plain; version=0.0.4"),
            "{response}"
        );
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("observer_events_total{kind=\"connect_failed\",reason=\"\"} 1\n"),
            "{body}"
        );
        let open = get(
            addr,
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        )
        .await?;
        assert!(open.ends_with("# EOF\n"), "{open}");
        let head_only = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await?;
        assert!(head_only.ends_with("\r\n\r\n"), "{head_only}");
        let missing = get(addr, "GET /other HTTP/1.1\r\n\r\n").await?;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        // A second bind of the same address fails and says which.
        let err = Server::bind(addr).await.expect_err("address in use");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        task.abort();
        Ok(())
    }
}
