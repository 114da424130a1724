//! The `stop` record: exact totals from the kernel's maps, read after the final drains.
use super::*;

/// The kernel kinds in the stop record's totals, by record name.
pub(super) const KERNEL_KINDS: [(u8, &str); 10] = [
    (event_kind::RETRANSMIT, "retransmit"),
    (event_kind::SYN_RETRANSMIT, "syn_retransmit"),
    (event_kind::SYNACK_RETRANSMIT, "synack_retransmit"),
    (event_kind::DROP, "drop"),
    (event_kind::RESET_SENT, "reset_sent"),
    (event_kind::RESET_RECEIVED, "reset_received"),
    (event_kind::CONNECT, "connect"),
    (event_kind::CONNECT_FAILED, "connect_failed"),
    (event_kind::ACCEPT, "accept"),
    (event_kind::CLOSE, "close"),
];

pub(super) fn stop_record(
    loaded: &Loaded,
    names: &Names,
    counters: &ReaderCounters,
    received: &BTreeMap<EventKind, u64>,
    clock: &BootClock,
    reason: StopReason,
) -> anyhow::Result<StopRecord> {
    let stats = loaded.kind_stats()?;
    // Slot 0 counts flow entries the kernel created; the LRU map evicted those not live now.
    let flows_created = stats[0].counted;
    // Not worth losing the whole record over: said on stderr instead.
    let evictions = loaded.map_evictions().unwrap_or_else(|e| {
        eprintln!("observer: warning: cannot count the kernel maps' evictions: {e:#}");
        MapEvictions::default()
    });
    let services = loaded.services().unwrap_or_else(|e| {
        eprintln!("observer: warning: cannot read the peer and listener aggregates: {e:#}");
        Vec::new()
    });
    let (services, services_omitted) = top_services(&services, STOP_SERVICES);
    let mut totals = BTreeMap::new();
    for (kind, name) in KERNEL_KINDS {
        let s = stats[usize::from(kind)];
        totals.insert(
            name,
            KindTotals {
                events: s.seen,
                counted: s.counted,
                exported: s.exported,
                suppressed: s.suppressed,
                map_full: s.map_full,
                received: received
                    .iter()
                    .filter(|(k, _)| k.kernel_kind() == kind)
                    .map(|(_, n)| n)
                    .sum(),
            },
        );
    }
    let mut flows: Vec<FlowRecord> = loaded
        .flow_counters()?
        .into_iter()
        .map(|(key, c)| {
            let Flow {
                family,
                saddr,
                sport,
                daddr,
                dport,
                netns,
            } = Flow::from_key(&key);
            FlowRecord {
                // Port 0 is not a TCP port: it marks the key's wildcard side.
                key: if sport == 0 || dport == 0 {
                    "handshake"
                } else {
                    "flow"
                },
                family,
                saddr,
                sport,
                daddr,
                dport,
                netns,
                retransmit_segs: c.retrans_segs,
                retransmit_skbs: c.retrans_skbs,
                retransmit_failed: c.retrans_failed,
                syn_retransmits: c.syn_retrans,
                synack_retransmits: c.synack_retrans,
                drops: c.drops,
                resets_sent: c.resets_sent,
                resets_received: c.resets_received,
                connects: c.connects,
                connects_refused: c.connects_refused,
                connects_timed_out: c.connects_timed_out,
                suppressed: c.suppressed,
            }
        })
        .collect();
    let flows_held = flows.len() as u64;
    // The most trouble first; ties in address order, so that a record is reproducible.
    flows.sort_by(|a, b| {
        b.trouble().cmp(&a.trouble()).then_with(|| {
            (a.saddr, a.sport, a.daddr, a.dport, a.netns)
                .cmp(&(b.saddr, b.sport, b.daddr, b.dport, b.netns))
        })
    });
    flows.truncate(STOP_FLOWS);
    Ok(StopRecord {
        kind: "stop",
        time: clock.now_rfc3339(),
        reason: reason.name(),
        totals,
        lost: counters.lost.load(Ordering::Relaxed),
        undelivered: counters.undelivered.load(Ordering::Relaxed),
        decode_errors: counters.decode_errors.load(Ordering::Relaxed),
        context_undelivered: 0,
        missed_runs: loaded.missed_runs(),
        flows_created,
        flows_evicted: flows_created.saturating_sub(flows_held),
        sockets_evicted: evictions.sockets,
        netns_drops_evicted: evictions.netns_drops,
        drop_reasons: loaded
            .drop_reason_counts()?
            .into_iter()
            .map(|(code, count)| ReasonCount {
                reason: names.drop_reasons.name(code),
                code,
                count,
            })
            .collect(),
        flows_omitted: flows_held - flows.len() as u64,
        flows,
        services,
        services_omitted,
        services_evicted: evictions.services,
        listeners: Vec::new(),
        netfilter_rules: Vec::new(),
        engine: None,
        anomaly_records: 0,
    })
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub(super) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
