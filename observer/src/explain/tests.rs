//! The report of recorded streams (observer/tests/fixtures/explain/).
use super::{model, render::render, report_from};

const NETFILTER: &[u8] = include_bytes!("../../tests/fixtures/explain/netfilter.ndjson");
const SYSCTL: &[u8] = include_bytes!("../../tests/fixtures/explain/sysctl.ndjson");
const GARBLED: &[u8] = include_bytes!("../../tests/fixtures/explain/garbled.ndjson");

fn explain(stream: &[u8]) -> String {
    let text = render(&model::read(stream));
    for line in text.lines() {
        assert!(
            line.chars().count() <= 100,
            "wider than 100 columns: {line}\n{text}"
        );
        assert_eq!(line, line.trim_end(), "trailing blanks:\n{text}");
    }
    text
}

fn has(text: &str, wanted: &str) {
    assert!(text.contains(wanted), "missing `{wanted}` in:\n{text}");
}

#[test]
fn a_netfilter_incident_reads_as_a_timeline_with_its_rule() {
    let text = explain(NETFILTER);
    has(
        &text,
        "observer incident report\nhost web-1 · kernel 6.18.44 · observer 0.1.0\n",
    );
    has(
        &text,
        "recorded 2026-11-22 03:40:00 → 03:41:00 UTC (1m00s), stopped (signal)",
    );
    has(&text, "8 lines\n");
    assert!(!text.contains("not understood"), "{text}");
    has(&text, "Anomalies: 1 (0 critical), in the order they opened");
    has(
        &text,
        "  03:40:03 WARN peer_retransmit_spike · peer 10.200.1.2 · netns client",
    );
    // Its life: two updates, closed after 48 s, the peak of all its records.
    has(
        &text,
        "2 updates · closed 03:40:51 (subsided) after 48s · peak 42.5/s · opened by rate",
    );
    // The cause as it ended up: the later `null` does not erase it.
    has(
        &text,
        "cause (netfilter_rule, known 1s after it opened): firewall rule `tcp dport 5001 statistic",
    );
    // The exact per-flow counters, the rule, the totals and the services.
    has(
        &text,
        "Worst peers (the kernel's exact per-flow counters, from `stop`)",
    );
    has(
        &text,
        "  10.200.1.2 (netns client): 430 retransmitted segments",
    );
    has(&text, "Firewall rules that dropped");
    has(
        &text,
        "  `tcp dport 5001 statistic mode nth every 8 counter drop` (ip filter INPUT, handle 2) in netns\n    4026532178: 40 packets\n",
    );
    has(&text, "warning: rate 31.0/s, 3.1× the open threshold");
    has(
        &text,
        "  retransmit: 380 events, 430 counted, 380 exported, 380 written",
    );
    assert!(
        !text.contains("syn_retransmit:"),
        "kinds without events are left out:\n{text}"
    );
    has(
        &text,
        "decode errors 0 · context undelivered 0 · missed runs 0: nothing was lost",
    );
    has(
        &text,
        "  peer 10.200.1.2:5001 (netns client): 1 attempts, 1 established, 0 refused, 0 timed out",
    );
    // Deterministic.
    assert_eq!(text, explain(NETFILTER));
}

#[test]
fn a_sysctl_change_shows_with_its_effect_and_the_anomaly_it_caused() {
    let text = explain(SYSCTL);
    has(&text, "host db-2");
    has(&text, "no stop record (still running, or cut short)");
    has(&text, "Anomalies: 1 (0 critical)");
    has(
        &text,
        "opened by ratio · 61 over 61 connections (1.00\n    per connection)",
    );
    has(
        &text,
        "cause (sysctl_change): net.ipv4.tcp_timestamps changed 1 -> 0 in netns server at\n      2026-11-22T04:00:10.000000000Z, 20 s before the first symptom;",
    );
    has(&text, "still open at the end, after 4m30s");
    has(
        &text,
        "Sysctl changes\n  04:00:10 net.ipv4.tcp_timestamps 1 → 0 in netns 4026532300\n",
    );
    has(
        &text,
        "effect (over 300 s before and after): retransmit 24 → 393 per minute",
    );
    has(&text, "Totals: no stop record, so no exact totals");
}

#[test]
fn garbled_and_truncated_lines_are_counted_not_fatal() {
    let text = explain(GARBLED);
    has(
        &text,
        "9 lines · 5 lines not understood, the first at line 2",
    );
    has(&text, "host lb-3");
    // What could be read is there.
    has(
        &text,
        "  127.0.0.1:5000 (netns 4026532400): 173 accept-queue overflows, 0 SYN-queue drops",
    );
    has(
        &text,
        "  pid 4242 (python3) → 10.203.1.2:7001 in netns 4026532401: 20 connections stuck, the oldest 31 s,\n    growing\n",
    );
    // A record of an older daemon: no cause, severity from its counts.
    has(
        &text,
        "05:00:06 CRIT listen_overflow · listener 127.0.0.1:5000",
    );
    has(&text, "critical: 173 in 60 s: connections fail or stall");
    has(&text, "cause: none found");
    // Cut at any byte, a stream never panics.
    for end in 0..GARBLED.len() {
        let _ = render(&model::read(&GARBLED[..end]));
    }
}

#[test]
fn an_empty_stream_says_nothing_was_recorded() {
    for stream in [&b""[..], b"\n\n", b"garbage\n"] {
        let text = explain(stream);
        has(
            &text,
            "Nothing was recorded: the stream holds no record observer writes.",
        );
    }
    let text = explain(b"garbage\n");
    has(
        &text,
        "1 lines · 1 line not understood, the first at line 1",
    );
}

#[test]
fn reading_a_stream_line_by_line_gives_the_same_report() {
    let report = report_from(NETFILTER).expect("read");
    assert_eq!(render(&report), explain(NETFILTER));
    assert_eq!(report.findings.len(), 1);
    assert!(report.peers_exact);
}
