//! Recorded JSON-lines streams (`observer top` reads them live or from a file; any version of
//! the daemon, or any other writer, may have produced them): arbitrary lines and mutated valid
//! records parse to a record or an error, and top's model takes every record without a panic.
use proptest::prelude::*;

use super::*;
use crate::{
    aggregate::EngineConfig,
    prop_support::{self, assert_bounded},
    top::{
        app::{App, SortColumn, Tab},
        event::Event,
    },
};

const T0: u64 = 1_763_782_800_000_000_000;

const VALID: &[&str] = &[
    r#"{"type":"listener_drops","time":"2026-11-22T03:40:00.000000000Z","netns":4026532315,"family":"ipv4","addr":"127.0.0.1","port":5000,"accept_queue_overflows":4,"syn_queue_drops":1,"other_drops":0,"backlog_limit":1,"accept_queue":2,"syn_queue":0,"namespace_counters":{"TcpExtListenDrops":5}}"#,
    r#"{"type":"netfilter_drop","time":"2026-11-22T03:40:00.000000000Z","netns":7,"dropped":2,"rules":[{"family":"ip","table":"filter","chain":"INPUT","handle":2,"rule":"tcp dport 9 counter drop","verdict":"drop","packets":2}],"candidates":[]}"#,
    r#"{"type":"stale_connections","time":"2026-11-22T03:40:00.000000000Z","netns":9,"pid":4242,"comm":"python3","cmdline":"python3 client.py","cgroup":"/system.slice/client.service","unit":"client.service","peer":"10.203.1.2","peer_port":7001,"count":20,"awaiting_reply":20,"unacknowledged":0,"send_blocked":0,"oldest_age_secs":31,"bytes_waiting":0,"growing":true,"newly_stale":20,"threshold_secs":30}"#,
    r#"{"type":"anomaly_open","time":"2026-11-22T03:40:00.000000000Z","id":3,"kind":"peer_retransmit_spike","key":{"scope":"peer","netns":7,"addr":"fd00::2"},"signals":["retransmit"],"counts":{"last_1s":1,"last_10s":300,"last_60s":300},"rate_per_sec":30.0,"peak_rate_per_sec":31.5,"lifetime_count":300,"baseline_per_sec":0.0,"open_threshold_per_sec":20.0,"close_threshold_per_sec":10.0,"first_seen_ns":1,"last_seen_ns":2,"opened_ns":2,"exemplar_flows":[],"context":{"netns":7,"sysctls":{"net.ipv4.tcp_sack":"1"},"counters_60s":{}}}"#,
    r#"{"type":"retransmit","time":"2026-11-22T03:40:00.000000000Z","family":"ipv4","saddr":"10.0.0.1","sport":40000,"daddr":"10.0.0.2","dport":80,"netns":4026531840,"segs":2,"flow_count":3,"owner":{"pid":42,"comm":"curl","cgroup":"/system.slice/app.service","unit":"app.service"}}"#,
    r#"{"type":"drop","time":"2026-11-22T03:40:01.000000000Z","family":"ipv6","saddr":"fd00::1","sport":80,"daddr":"fd00::2","dport":4000,"netns":7,"reason":"NO_SOCKET","counted_as":{"sport":80,"dport":0}}"#,
    r#"{"type":"connect","time":"2026-11-22T03:40:01.000000000Z","family":"ipv4","saddr":"10.0.0.1","sport":40001,"daddr":"10.0.0.2","dport":80,"netns":7,"duration_ms":1.5}"#,
    r#"{"type":"reconciled","time":"2026-11-22T03:40:02.000000000Z","entries":[]}"#,
    r#"{"type":"start","time":"2026-11-22T03:40:00.000000000Z","netns":4026531840,"sysctls":{"net.ipv4.tcp_sack":"1"}}"#,
];

fn check(lines: &[String]) -> Result<(), TestCaseError> {
    let Ok(mut app) = App::new(T0, Some(4026531840), "proptest", EngineConfig::default()) else {
        return Err(TestCaseError::fail("the default engine configuration"));
    };
    for (i, line) in lines.iter().enumerate() {
        // serde_json builds values a few times the size of their text.
        let parsed = assert_bounded(line.len(), 64, 16 * 1024, || parse_line(line))?;
        if let Ok(record) = parsed {
            let _ = context_observations(&record);
            app.model.apply(record, T0 + i as u64 * 1_000_000_000);
        }
        if let Ok(value) = serde_json::from_str::<Value>(line) {
            let _ = row_key(&value["key"]);
        }
    }
    app.handle(Event::Tick, T0 + 100 * 1_000_000_000);
    for tab in Tab::ALL {
        let _ = app.model.rows(tab, SortColumn::Severity, 50);
    }
    Ok(())
}

fn lines(strategy: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(strategy, 1..6)
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_lines_never_panic(lines in lines("(?s).{0,200}".boxed())) {
        check(&lines)?;
    }

    #[test]
    fn mutated_records_never_panic(lines in lines(prop_support::mutated_text(VALID).boxed())) {
        check(&lines)?;
    }

    #[test]
    fn valid_records_with_odd_values_never_panic(
        which in 0..VALID.len(),
        key in "[a-z_]{1,12}",
        value in prop_oneof![
            Just(serde_json::json!(null)), Just(serde_json::json!(-1)),
            Just(serde_json::json!(u64::MAX)), Just(serde_json::json!(1e308)),
            Just(serde_json::json!("")), Just(serde_json::json!("::")),
            Just(serde_json::json!([])), Just(serde_json::json!({})),
            Just(serde_json::json!("9999-99-99T99:99:99Z")),
        ],
    ) {
        let mut record: Value = serde_json::from_str(VALID[which]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Overwrite an existing field (or add one).
        let keys: Vec<String> = record.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        let target = keys.iter().find(|k| k.starts_with(&key[..1])).cloned().unwrap_or(key);
        if target != "type" {
            record[target] = value;
        }
        check(&[record.to_string()])?;
    }
}
