//! Perf samples from the kernel: arbitrary bytes and mutated valid samples decode to an event or
//! an error, never a panic.
use proptest::prelude::*;

use super::*;
use crate::{
    clock::BootClock,
    kernel::reasons::ReasonNames,
    prop_support::{self, assert_bounded},
    record::{EventRecord, Names},
};

/// What the output stage does next with a decoded event: the record, as JSON.
fn write_record(event: &Event) -> Result<(), TestCaseError> {
    let names = Names {
        drop_reasons: ReasonNames::from_pairs([(12, "NETFILTER_DROP")], ""),
        reset_reasons: ReasonNames::from_pairs([(2, "NO_SOCKET")], ""),
        symbols: Default::default(),
    };
    let clock = BootClock::with_offset(1_763_782_000_000_000_000);
    let line = serde_json::to_string(&EventRecord::new(event, &clock, &names));
    prop_assert!(line.is_ok(), "{line:?}");
    Ok(())
}

fn valid_sample(kind: u8, family: u16) -> Vec<u8> {
    let event = TcpEvent {
        flow: FlowKey {
            saddr: Ipv6Addr::from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]).octets(),
            daddr: Ipv6Addr::from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]).octets(),
            sport: 40000,
            dport: 80,
            netns: 4026531840,
        },
        timestamp_ns: 5,
        flow_count: 7,
        segs: 2,
        pid: 42,
        kind,
        state: 1,
        family,
        ..TcpEvent::default()
    };
    // SAFETY: TcpEvent is #[repr(C)] plain integers without implicit padding (asserted in
    // observer-common), so all of its bytes are initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&event as *const TcpEvent).cast::<u8>(),
            size_of::<TcpEvent>(),
        )
    };
    let mut sample = bytes.to_vec();
    // perf pads raw samples to 8 bytes: the padding is ignored.
    sample.extend([0; 4]);
    sample
}

fn valid_samples() -> Vec<Vec<u8>> {
    (1..=12)
        .flat_map(|kind| [valid_sample(kind, 2), valid_sample(kind, 10)])
        .collect()
}

fn check(sample: &[u8]) -> Result<(), TestCaseError> {
    let decoded = assert_bounded(sample.len(), 0, 4096, || decode_sample(sample))?;
    if let Ok(event) = decoded {
        let _ = event.counting_flow();
        write_record(&event)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_samples_never_panic(sample in prop_support::bytes(256)) {
        check(&sample)?;
    }

    #[test]
    fn mutated_samples_never_panic(sample in prop_support::mutated(valid_samples())) {
        check(&sample)?;
    }

    #[test]
    fn arbitrary_fields_never_panic(
        kind in any::<u8>(), state in any::<u8>(), old_state in any::<u8>(),
        family in any::<u16>(), flags in any::<u8>(), aux8 in any::<u8>(),
        wildcard in any::<u8>(), err in any::<i32>(), reason in any::<u32>(),
        saddr in any::<[u8; 16]>(), daddr in any::<[u8; 16]>(),
    ) {
        let raw = TcpEvent {
            flow: FlowKey { saddr, daddr, sport: 1, dport: 2, netns: 3 },
            kind, state, old_state, family, tcp_flags: flags, aux8,
            key_wildcard: wildcard, err, reason,
            ..TcpEvent::default()
        };
        if let Ok(event) = decode_event(&raw) {
            let _ = event.counting_flow();
            write_record(&event)?;
        }
        let _ = tcp_flags_names(flags);
        let _ = tcp_state_name(state);
    }
}
