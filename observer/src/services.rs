//! Connection aggregates per peer and per listener: the kernel's `SERVICES` entries as records.
//!
//! Healthy connections are never counted per flow: the kernel adds each connect, accept and
//! close to the aggregate of the peer it went to or the listener that accepted it (counts, and
//! log2 histograms of connect latency / handshake RTT and of lifetimes). This module turns those
//! entries into the `stop` record's `services` rows; it is pure, so tests drive it directly.

use std::{collections::HashMap, net::IpAddr};

use observer_common::{HISTOGRAM_BUCKETS, ServiceKey, ServiceStats, service_role};
use serde::Serialize;

use crate::{
    aggregate::PeerKey,
    decode::{Family, unmap},
};

/// A distribution from a log2 histogram of microseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Distribution {
    pub count: u64,
    pub mean_ms: f64,
    /// Upper bounds of the buckets holding the median and the 99th percentile (a log2
    /// histogram knows a value to within a factor of two).
    pub p50_le_ms: f64,
    pub p99_le_ms: f64,
    /// The non-empty buckets as `[upper bound in µs, count]` (the last bucket is open-ended,
    /// shown with its lower bound's double).
    pub buckets: Vec<[u64; 2]>,
}

impl Distribution {
    pub fn from_histogram(histogram: &[u64; HISTOGRAM_BUCKETS], sum_us: u64) -> Self {
        let count: u64 = histogram.iter().sum();
        let quantile = |q: f64| -> f64 {
            if count == 0 {
                return 0.0;
            }
            // The rank of the q-quantile, 1-based: ceil(q * count).
            let rank = ((q * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, &n) in histogram.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_upper_us(bucket) as f64 / 1000.0;
                }
            }
            bucket_upper_us(HISTOGRAM_BUCKETS - 1) as f64 / 1000.0
        };
        Distribution {
            count,
            mean_ms: if count == 0 {
                0.0
            } else {
                sum_us as f64 / count as f64 / 1000.0
            },
            p50_le_ms: quantile(0.5),
            p99_le_ms: quantile(0.99),
            buckets: histogram
                .iter()
                .enumerate()
                .filter(|(_, n)| **n != 0)
                .map(|(bucket, n)| [bucket_upper_us(bucket), *n])
                .collect(),
        }
    }
}

/// The exclusive upper bound of a histogram bucket, in µs (bucket `i` holds `[2^(i-1), 2^i)`).
fn bucket_upper_us(bucket: usize) -> u64 {
    1u64 << bucket.min(63)
}

/// One peer or listener with its exact connection counts.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServiceRecord {
    /// `peer` (a service this host connects to) or `listener` (a local one).
    pub role: &'static str,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub netns: u32,
    /// Peers: connects attempted (established + refused + timed out) and their outcomes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    /// Connects that reached ESTABLISHED (peers) or accepted connections (listeners).
    pub established: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syn_retransmits: Option<u64>,
    /// Peers: connects slower than `--slow-connect-ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow: Option<u64>,
    pub closes: u64,
    /// Connect latency (peers) or the handshake's RTT sample (listeners).
    pub handshake: Distribution,
    /// Established to close, for the connections whose close was seen.
    pub lifetime: Distribution,
}

impl ServiceRecord {
    pub fn new(key: &ServiceKey, stats: &ServiceStats) -> Self {
        let addr = unmap(key.addr);
        let peer = key.role == service_role::PEER;
        let for_peer = |v: u64| peer.then_some(v);
        ServiceRecord {
            role: if peer { "peer" } else { "listener" },
            family: if addr.is_ipv4() {
                Family::Ipv4
            } else {
                Family::Ipv6
            },
            addr,
            port: key.port,
            netns: key.netns,
            attempts: for_peer(stats.established + stats.refused + stats.timed_out),
            established: stats.established,
            refused: for_peer(stats.refused),
            timed_out: for_peer(stats.timed_out),
            syn_retransmits: for_peer(stats.syn_retransmits),
            slow: for_peer(stats.slow),
            closes: stats.closes,
            handshake: Distribution::from_histogram(&stats.handshake, stats.handshake_sum_us),
            lifetime: Distribution::from_histogram(&stats.lifetime, stats.lifetime_sum_us),
        }
    }

    /// Connections this row stands for: what ranks rows when the `stop` record keeps the top.
    pub fn weight(&self) -> u64 {
        self.attempts.unwrap_or(self.established) + self.closes
    }
}

/// The rows of `entries`, busiest first, at most `limit` of them; and how many were left out.
pub fn top_services(
    entries: &[(ServiceKey, ServiceStats)],
    limit: usize,
) -> (Vec<ServiceRecord>, u64) {
    let mut rows: Vec<ServiceRecord> = entries
        .iter()
        .map(|(key, stats)| ServiceRecord::new(key, stats))
        .collect();
    rows.sort_by(|a, b| {
        b.weight()
            .cmp(&a.weight())
            .then_with(|| (a.role, a.addr, a.port, a.netns).cmp(&(b.role, b.addr, b.port, b.netns)))
    });
    let omitted = rows.len().saturating_sub(limit) as u64;
    rows.truncate(limit);
    (rows, omitted)
}

/// Connections per peer since the previous reading of the kernel's aggregates: what the
/// engine's ratio signals divide by.
///
/// Readings more than [`MAX_GAP_NS`] apart (the daemon reads only while some peer has trouble)
/// set a new baseline instead of reporting the whole gap as one second's connections.
#[derive(Debug, Default)]
pub struct ConnectionDeltas {
    /// Attempts per (peer, port) at the last reading.
    last: HashMap<(PeerKey, u16), u64>,
    last_read_ns: Option<u64>,
}

/// Readings further apart than this start over from a baseline.
pub const MAX_GAP_NS: u64 = 2_500_000_000;

impl ConnectionDeltas {
    /// Takes a reading of (peer, port, attempts so far) and returns, per peer, the attempts
    /// since the previous one (peers with none are left out).
    pub fn update(
        &mut self,
        now_ns: u64,
        readings: impl IntoIterator<Item = (PeerKey, u16, u64)>,
    ) -> Vec<(PeerKey, u64)> {
        let continuous = self
            .last_read_ns
            .is_some_and(|at| now_ns.saturating_sub(at) <= MAX_GAP_NS);
        self.last_read_ns = Some(now_ns);
        let mut now: HashMap<(PeerKey, u16), u64> = HashMap::new();
        let mut deltas: HashMap<PeerKey, u64> = HashMap::new();
        for (peer, port, attempts) in readings {
            // An entry the LRU map evicted and re-created starts again from zero.
            let before = self.last.get(&(peer, port)).copied();
            let delta = match before {
                Some(before) if attempts >= before => attempts - before,
                Some(_) => attempts,
                None => attempts,
            };
            if continuous && delta > 0 {
                *deltas.entry(peer).or_default() += delta;
            }
            now.insert((peer, port), attempts);
        }
        self.last = now;
        let mut deltas: Vec<_> = deltas.into_iter().collect();
        deltas.sort_by_key(|(peer, _)| (peer.netns, peer.addr));
        deltas
    }

    /// Drops the baseline (no reading for a while: the next one starts over).
    pub fn forget(&mut self) {
        self.last.clear();
        self.last_read_ns = None;
    }
}

#[cfg(test)]
mod tests {
    use observer_common::histogram_bucket;

    use super::*;

    fn key(role: u8, last: u8, port: u16) -> ServiceKey {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[10, 0, 0, last]);
        ServiceKey {
            addr,
            port,
            role,
            _pad: 0,
            netns: 7,
        }
    }

    fn with_latencies(latencies_ns: &[u64]) -> ServiceStats {
        let mut s = ServiceStats::default();
        for &ns in latencies_ns {
            s.established += 1;
            s.handshake_sum_us += ns / 1000;
            s.handshake[histogram_bucket(ns)] += 1;
        }
        s
    }

    #[test]
    fn a_peer_row_has_its_outcomes_and_latency_distribution() {
        // 98 connects of 100 µs, one of 3 ms, one of 1.5 s.
        let mut latencies = vec![100_000; 98];
        latencies.extend([3_000_000, 1_500_000_000]);
        let mut stats = with_latencies(&latencies);
        stats.refused = 4;
        stats.timed_out = 1;
        stats.syn_retransmits = 2;
        let row = ServiceRecord::new(&key(service_role::PEER, 2, 80), &stats);
        assert_eq!(row.role, "peer");
        assert_eq!(row.addr, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(row.family, Family::Ipv4);
        assert_eq!(row.attempts, Some(105));
        assert_eq!(row.established, 100);
        assert_eq!((row.refused, row.timed_out), (Some(4), Some(1)));
        let d = &row.handshake;
        assert_eq!(d.count, 100);
        // 100 µs is in [64, 128) µs.
        assert_eq!(d.p50_le_ms, 0.128);
        // The 99th of 100 is the 3 ms connect: [2048, 4096) µs.
        assert_eq!(d.p99_le_ms, 4.096);
        assert!((d.mean_ms - (98.0 * 0.1 + 3.0 + 1500.0) / 100.0).abs() < 1e-9);
        assert_eq!(d.buckets, vec![[128, 98], [4096, 1], [2_097_152, 1]]);
        assert_eq!(row.lifetime.count, 0);
        assert_eq!(row.lifetime.p50_le_ms, 0.0);
    }

    #[test]
    fn a_listener_row_has_no_connect_outcomes() {
        let stats = with_latencies(&[50_000, 60_000]);
        let row = ServiceRecord::new(&key(service_role::LISTENER, 1, 8080), &stats);
        let json = serde_json::to_value(&row).expect("serialises");
        assert_eq!(json["role"], "listener");
        assert_eq!(json["established"], 2);
        for absent in [
            "attempts",
            "refused",
            "timed_out",
            "syn_retransmits",
            "slow",
        ] {
            assert!(json.get(absent).is_none(), "{absent}: {json}");
        }
    }

    #[test]
    fn the_stop_record_keeps_the_busiest_rows_and_counts_the_rest() {
        let entries: Vec<(ServiceKey, ServiceStats)> = (1..=5u8)
            .map(|i| {
                (
                    key(service_role::PEER, i, 80),
                    with_latencies(&vec![1_000; usize::from(i)]),
                )
            })
            .collect();
        let (rows, omitted) = top_services(&entries, 3);
        assert_eq!(omitted, 2);
        let established: Vec<u64> = rows.iter().map(|r| r.established).collect();
        assert_eq!(established, vec![5, 4, 3]);
        let (rows, omitted) = top_services(&entries, 10);
        assert_eq!((rows.len(), omitted), (5, 0));
    }

    #[test]
    fn connection_deltas_count_what_happened_between_readings() {
        let peer = PeerKey {
            netns: 7,
            addr: IpAddr::from([10, 0, 0, 2]),
        };
        let mut deltas = ConnectionDeltas::default();
        // The first reading is a baseline: history before it is not "this second".
        assert!(
            deltas
                .update(1_000_000_000, [(peer, 80, 500), (peer, 443, 10)])
                .is_empty()
        );
        assert_eq!(
            deltas.update(2_000_000_000, [(peer, 80, 503), (peer, 443, 12)]),
            vec![(peer, 5)]
        );
        // A re-created entry (evicted by the LRU map) counts from zero; a new one in full.
        let other = PeerKey {
            netns: 7,
            addr: IpAddr::from([10, 0, 0, 3]),
        };
        assert_eq!(
            deltas.update(3_000_000_000, [(peer, 80, 2), (other, 80, 4)]),
            vec![(peer, 2), (other, 4)]
        );
        // After a gap the reading is a new baseline.
        assert!(deltas.update(10_000_000_000, [(peer, 80, 50)]).is_empty());
        deltas.forget();
        assert!(deltas.update(11_000_000_000, [(peer, 80, 60)]).is_empty());
        assert_eq!(
            deltas.update(12_000_000_000, [(peer, 80, 61)]),
            vec![(peer, 1)]
        );
    }
}
