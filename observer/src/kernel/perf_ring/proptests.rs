//! The perf ring's records: arbitrary ring contents and positions, and mutated rings of valid
//! records, are read without a panic, every malformed stretch counted as an error, and the
//! scratch buffer never grows past one record's 16-bit size.
use proptest::prelude::*;

use super::*;
use crate::prop_support::{self, assert_bounded};

/// A ring holding `samples` as PERF_RECORD_SAMPLE records (and one LOST record), from 0.
fn valid_ring(samples: &[Vec<u8>]) -> (Vec<u8>, u64) {
    let mut ring = Vec::new();
    for raw in samples {
        let size = HEADER_BYTES + 4 + raw.len();
        let padded = (size + 7) & !7;
        ring.extend(PERF_RECORD_SAMPLE.to_ne_bytes());
        ring.extend(0u16.to_ne_bytes());
        ring.extend((padded as u16).to_ne_bytes());
        ring.extend((raw.len() as u32).to_ne_bytes());
        ring.extend(raw);
        ring.resize(ring.len() + padded - size, 0);
    }
    ring.extend(PERF_RECORD_LOST.to_ne_bytes());
    ring.extend(0u16.to_ne_bytes());
    ring.extend(24u16.to_ne_bytes());
    ring.extend(1u64.to_ne_bytes());
    ring.extend(9u64.to_ne_bytes());
    let head = ring.len() as u64;
    (ring, head)
}

fn read(ring: &[u8], tail: u64, head: u64) -> Result<Parsed, TestCaseError> {
    let mut scratch = Vec::new();
    let mut seen = 0u64;
    let parsed = assert_bounded(ring.len(), 0, 2 * 65_536, || {
        parse_records(ring, tail, head, &mut scratch, |_| seen += 1)
    })?;
    prop_assert_eq!(parsed.records, seen);
    prop_assert!(
        scratch.capacity() <= 65_536,
        "scratch grew to {}",
        scratch.capacity()
    );
    // Everything up to `head` is consumed, whatever it held.
    prop_assert_eq!(parsed.tail, head);
    Ok(parsed)
}

proptest! {
    #![proptest_config(prop_support::config())]

    #[test]
    fn arbitrary_rings_never_panic(
        ring in prop_support::bytes(512), tail in any::<u64>(), pending in 0u64..600,
    ) {
        read(&ring, tail, tail.wrapping_add(pending))?;
    }

    #[test]
    fn arbitrary_positions_never_panic(
        ring in prop_support::bytes(64), tail in any::<u64>(), head in any::<u64>(),
    ) {
        read(&ring, tail, head)?;
    }

    #[test]
    fn mutated_rings_never_panic(
        samples in prop::collection::vec(prop_support::bytes(120), 1..4),
        edits in prop::collection::vec(any::<(usize, u8)>(), 1..6),
        start in 0u64..4096,
    ) {
        let (mut ring, head) = valid_ring(&samples);
        let valid = read(&ring, 0, head)?;
        prop_assert_eq!((valid.records, valid.errors), (samples.len() as u64 + 1, 0));
        for (i, b) in edits {
            let i = i % ring.len();
            ring[i] = b;
        }
        // The same records at another position of the ring (wrapping around its end).
        let size = ring.len() as u64;
        let shift = (start % size) as usize;
        let mut rotated = ring.clone();
        rotated.rotate_right(shift);
        read(&ring, 0, head)?;
        read(&rotated, start - start % size + shift as u64, start - start % size + shift as u64 + head)?;
    }
}
