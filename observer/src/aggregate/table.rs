//! A bounded table of rows, each keeping per-signal counts, with least-recently-seen eviction.
//!
//! Rows live in a dense `Vec` (a slot never moves while its row lives); a hash table maps keys
//! to slots, and an intrusive doubly-linked list through the rows orders them by last sighting,
//! so lookup, insertion and eviction are all O(1). The hash table stores only the `u32` slot,
//! not a second copy of the key: at 100,000 flows that saves ~6 MiB.
use std::{
    hash::{BuildHasher, Hasher},
    sync::Arc,
};

use hashbrown::HashTable;

use super::{
    Signal,
    keys::TableKey,
    window::{SecondRing, WindowCounts, second_of},
};
use crate::decode::Flow;

/// "No row" in the recency list.
const NIL: u32 = u32::MAX;

/// Flows a row remembers per signal, most recent first.
pub(crate) const MAX_EXEMPLARS: usize = 5;

/// Distinct reasons a row counts per signal; more are counted as "other".
pub(crate) const MAX_REASONS: usize = 8;

/// One observation as a row sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample<'a> {
    pub(crate) signal: Signal,
    pub(crate) amount: u64,
    pub(crate) now_ns: u64,
    pub(crate) now_sec: u32,
    /// A flow to remember as an exemplar (on tables that keep them).
    pub(crate) exemplar: Option<&'a Flow>,
    pub(crate) reason: Option<&'a Arc<str>>,
}

/// What only some series need; boxed so that the common series (a flow's retransmits, with no
/// exemplars or reasons) pays one pointer for it.
#[derive(Debug, Default)]
pub(crate) struct SeriesExtras {
    /// Distinct flows, most recent first; `None` past the flows seen so far.
    pub(crate) exemplars: [Option<Flow>; MAX_EXEMPLARS],
    /// Lifetime count per reason, at most [`MAX_REASONS`], in order of first sighting.
    pub(crate) reasons: Vec<(Arc<str>, u64)>,
    /// Lifetime count of reasons beyond the first [`MAX_REASONS`].
    pub(crate) other_reasons: u64,
}

impl SeriesExtras {
    fn note_flow(&mut self, flow: &Flow) {
        if self.exemplars[0] == Some(*flow) {
            return;
        }
        // Move the flow to the front; if it is new, the oldest falls off the end.
        let at = self
            .exemplars
            .iter()
            .position(|e| *e == Some(*flow))
            .unwrap_or(MAX_EXEMPLARS - 1);
        self.exemplars[..=at].rotate_right(1);
        self.exemplars[0] = Some(*flow);
    }

    fn note_reason(&mut self, reason: &Arc<str>, amount: u64) {
        if let Some((_, count)) = self
            .reasons
            .iter_mut()
            .find(|(known, _)| Arc::ptr_eq(known, reason) || **known == **reason)
        {
            *count = count.saturating_add(amount);
        } else if self.reasons.len() < MAX_REASONS {
            self.reasons.push((Arc::clone(reason), amount));
        } else {
            self.other_reasons = self.other_reasons.saturating_add(amount);
        }
    }
}

/// One signal's counts on one row.
///
/// `repr(C)`: the fields every event writes come first, next to the start of the ring, so that
/// an event touches as few cache lines as possible.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Series {
    pub(crate) last_seen_ns: u64,
    pub(crate) total: u64,
    pub(crate) first_seen_ns: u64,
    pub(crate) extras: Option<Box<SeriesExtras>>,
    /// Slow EWMA of the 10 s window's rate, per second; see `Engine::tick`.
    pub(crate) baseline_per_sec: f32,
    pub(crate) signal: Signal,
    pub(crate) ring: SecondRing,
}

impl Series {
    fn new(signal: Signal, now_ns: u64, now_sec: u32) -> Self {
        Self {
            signal,
            baseline_per_sec: 0.0,
            ring: SecondRing::new(now_sec),
            total: 0,
            first_seen_ns: now_ns,
            last_seen_ns: now_ns,
            extras: None,
        }
    }

    /// Counts the sample; true if it is the series' first in this second.
    #[inline(always)]
    fn record(&mut self, sample: &Sample<'_>, keeps_exemplars: bool) -> bool {
        let first_this_second = self.ring.newest_sec() < sample.now_sec;
        self.ring.add(
            sample.now_sec,
            u32::try_from(sample.amount).unwrap_or(u32::MAX),
        );
        self.total = self.total.saturating_add(sample.amount);
        self.last_seen_ns = sample.now_ns;
        if keeps_exemplars && let Some(flow) = sample.exemplar {
            self.extras.get_or_insert_with(Box::default).note_flow(flow);
        }
        if let Some(reason) = sample.reason {
            self.extras
                .get_or_insert_with(Box::default)
                .note_reason(reason, sample.amount);
        }
        first_this_second
    }

    /// Events per second in `window`.
    pub(crate) fn rate_per_sec(&self, window: super::Window, now_sec: u32) -> f64 {
        self.ring.count_last(now_sec, window.secs()) as f64 / f64::from(window.secs())
    }

    /// Flows that contributed, most recent first.
    pub(crate) fn exemplars(&self) -> impl Iterator<Item = &Flow> {
        self.extras
            .as_deref()
            .into_iter()
            .flat_map(|e| e.exemplars.iter().map_while(Option::as_ref))
    }
}

/// Everything a table knows about one key.
///
/// `repr(C)`: a flow's key, the recency links and `last_seen_ns` take 64 bytes, followed by the
/// first series' counters, so that an event on an existing row reads few cache lines (aligning
/// rows to cache lines as well would cost a fifth more memory).
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Row<K> {
    pub(crate) key: K,
    /// Bit per [`Signal::bit`] with a series on this row.
    pub(crate) signals: u16,
    /// Bit per `AnomalyKind::bit` open on this row.
    pub(crate) open_kinds: u16,
    newer: u32,
    older: u32,
    pub(crate) last_seen_ns: u64,
    /// The signal the row was created for, inline: most rows only ever see one.
    first_series: Series,
    more_series: Vec<Series>,
}

impl<K> Row<K> {
    fn new(key: K, sample: &Sample<'_>) -> Self {
        Self {
            key,
            last_seen_ns: sample.now_ns,
            signals: sample.signal.bit(),
            open_kinds: 0,
            newer: NIL,
            older: NIL,
            first_series: Series::new(sample.signal, sample.now_ns, sample.now_sec),
            more_series: Vec::new(),
        }
    }

    /// Counts the sample; true if it is the first of its signal on this row in this second.
    #[inline(always)]
    fn record(&mut self, sample: &Sample<'_>, keeps_exemplars: bool) -> bool {
        self.last_seen_ns = sample.now_ns;
        if self.first_series.signal == sample.signal {
            return self.first_series.record(sample, keeps_exemplars);
        }
        if let Some(series) = self
            .more_series
            .iter_mut()
            .find(|s| s.signal == sample.signal)
        {
            return series.record(sample, keeps_exemplars);
        }
        // Rows rarely gain signals: grow exactly, not by doubling (a Series is 176 bytes).
        self.more_series.reserve_exact(1);
        let mut series = Series::new(sample.signal, sample.now_ns, sample.now_sec);
        series.record(sample, keeps_exemplars);
        self.more_series.push(series);
        self.signals |= sample.signal.bit();
        true
    }

    /// When the row was created (its first series is as old as the row).
    pub(crate) fn first_seen_ns(&self) -> u64 {
        self.first_series.first_seen_ns
    }

    pub(crate) fn series(&self) -> impl Iterator<Item = &Series> {
        std::iter::once(&self.first_series).chain(&self.more_series)
    }

    pub(crate) fn series_mut(&mut self) -> impl Iterator<Item = &mut Series> {
        std::iter::once(&mut self.first_series).chain(&mut self.more_series)
    }

    /// The series of the signals in `mask` (a set of [`Signal::bit`]s).
    pub(crate) fn series_in(&self, mask: u16) -> impl Iterator<Item = &Series> {
        self.series().filter(move |s| s.signal.bit() & mask != 0)
    }

    #[cfg(test)]
    pub(crate) fn series_of(&self, signal: Signal) -> Option<&Series> {
        self.series().find(|s| s.signal == signal)
    }

    /// Count of the signals in `mask` over the last `secs` completed seconds.
    pub(crate) fn count_last(&self, mask: u16, now_sec: u32, secs: u32) -> u64 {
        self.series_in(mask)
            .map(|s| s.ring.count_last(now_sec, secs))
            .sum()
    }

    /// Counts of the signals in `mask` in every window.
    pub(crate) fn counts(&self, mask: u16, now_sec: u32) -> WindowCounts {
        let mut counts = WindowCounts::default();
        for series in self.series_in(mask) {
            counts += series.ring.counts(now_sec);
        }
        counts
    }

    /// Events per second of the signals in `mask` over `window`.
    pub(crate) fn rate_per_sec(&self, mask: u16, window: super::Window, now_sec: u32) -> f64 {
        self.count_last(mask, now_sec, window.secs()) as f64 / f64::from(window.secs())
    }

    /// Lifetime count of the signals in `mask`.
    pub(crate) fn total(&self, mask: u16) -> u64 {
        self.series_in(mask).map(|s| s.total).sum()
    }

    /// Sum of the baselines of the signals in `mask`, per second.
    pub(crate) fn baseline_per_sec(&self, mask: u16) -> f64 {
        self.series_in(mask)
            .map(|s| f64::from(s.baseline_per_sec))
            .sum()
    }
}

/// Rows keyed by `K`, at most `capacity` of them.
pub(crate) struct Table<K> {
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    rows: Vec<Row<K>>,
    /// Most recently seen row.
    newest: u32,
    /// Least recently seen row: the next to go.
    oldest: u32,
    capacity: usize,
    evictions: u64,
}

/// A row pushed out to make room, and the slot it had.
pub(crate) struct Evicted<K> {
    pub(crate) slot: u32,
    pub(crate) row: Row<K>,
}

/// What counting a sample did.
pub(crate) struct Recorded<K> {
    /// The sample was the first of its signal on its row in this second (or created the row).
    pub(crate) first_this_second: bool,
    pub(crate) evicted: Option<Evicted<K>>,
}

fn hash_key<K: TableKey>(hasher: &foldhash::fast::RandomState, key: &K) -> u64 {
    let mut state = hasher.build_hasher();
    key.hash_with(&mut state);
    state.finish()
}

impl<K: TableKey> Table<K> {
    /// `capacity` must be in `1..u32::MAX` (the engine's configuration checks it).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            index: HashTable::new(),
            // Random per table: peer addresses come from the network, so a fixed hash would
            // let a remote host aim collisions at us.
            hasher: foldhash::fast::RandomState::default(),
            rows: Vec::new(),
            newest: NIL,
            oldest: NIL,
            capacity,
            evictions: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    pub(crate) fn rows(&self) -> &[Row<K>] {
        &self.rows
    }

    /// For updating counters and anomaly bits; a key changed through this would be lost to the
    /// index.
    pub(crate) fn rows_mut(&mut self) -> &mut [Row<K>] {
        &mut self.rows
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&Row<K>> {
        self.rows.get(slot as usize)
    }

    pub(crate) fn slot_of(&self, key: &K) -> Option<u32> {
        let hash = hash_key(&self.hasher, key);
        let rows = &self.rows;
        self.index
            .find(hash, |&slot| rows[slot as usize].key == *key)
            .copied()
    }

    /// Counts `sample` on `key`'s row if it exists; false otherwise. Does not change the row's
    /// recency: only what created the row keeps it.
    pub(crate) fn record_existing(&mut self, key: &K, sample: &Sample<'_>) -> bool {
        let Some(slot) = self.slot_of(key) else {
            return false;
        };
        self.rows[slot as usize].record(sample, false);
        true
    }

    /// Counts `sample` on `key`'s row, creating it if needed. When the table is full, the least
    /// recently seen row makes room and is returned (its slot now holds `key`).
    #[inline]
    pub(crate) fn record(&mut self, key: K, sample: &Sample<'_>) -> Recorded<K> {
        let hash = hash_key(&self.hasher, &key);
        let Self {
            index,
            hasher,
            rows,
            ..
        } = self;
        if let Some(&slot) = index.find(hash, |&slot| rows[slot as usize].key == key) {
            let row = &mut rows[slot as usize];
            // Reordering once a second per row keeps the list sorted by last-seen second while
            // sparing the busiest rows the pointer updates on every event.
            let seen_earlier_second = second_of(row.last_seen_ns) < sample.now_sec;
            let first_this_second = row.record(sample, K::KEEPS_EXEMPLARS);
            if seen_earlier_second {
                self.move_to_newest(slot);
            }
            return Recorded {
                first_this_second,
                evicted: None,
            };
        }

        let mut row = Row::new(key, sample);
        row.record(sample, K::KEEPS_EXEMPLARS);
        if rows.len() < self.capacity {
            let slot = u32::try_from(rows.len()).unwrap_or(NIL);
            rows.push(row);
            index.insert_unique(hash, slot, |&s| hash_key(hasher, &rows[s as usize].key));
            self.link_newest(slot);
            return Recorded {
                first_this_second: true,
                evicted: None,
            };
        }

        let slot = self.oldest;
        let old_hash = hash_key(hasher, &rows[slot as usize].key);
        if let Ok(entry) = index.find_entry(old_hash, |&s| s == slot) {
            entry.remove();
        }
        self.unlink(slot);
        let evicted = std::mem::replace(&mut self.rows[slot as usize], row);
        let rows = &self.rows;
        let hasher = &self.hasher;
        self.index
            .insert_unique(hash, slot, |&s| hash_key(hasher, &rows[s as usize].key));
        self.link_newest(slot);
        self.evictions += 1;
        Recorded {
            first_this_second: true,
            evicted: Some(Evicted { slot, row: evicted }),
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let previous = self.newest;
        {
            let row = &mut self.rows[slot as usize];
            row.newer = NIL;
            row.older = previous;
        }
        if previous == NIL {
            self.oldest = slot;
        } else {
            self.rows[previous as usize].newer = slot;
        }
        self.newest = slot;
    }

    fn unlink(&mut self, slot: u32) {
        let (newer, older) = {
            let row = &self.rows[slot as usize];
            (row.newer, row.older)
        };
        if newer == NIL {
            self.newest = older;
        } else {
            self.rows[newer as usize].older = older;
        }
        if older == NIL {
            self.oldest = newer;
        } else {
            self.rows[older as usize].newer = newer;
        }
    }

    fn move_to_newest(&mut self, slot: u32) {
        if self.newest != slot {
            self.unlink(slot);
            self.link_newest(slot);
        }
    }

    /// Slots from least to most recently seen (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn slots_oldest_first(&self) -> Vec<u32> {
        let mut slots = Vec::with_capacity(self.rows.len());
        let mut slot = self.oldest;
        while slot != NIL && slots.len() <= self.rows.len() {
            slots.push(slot);
            slot = self.rows[slot as usize].newer;
        }
        slots
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        aggregate::{Window, keys::PeerKey},
        decode::Family,
    };

    fn peer(n: u8) -> PeerKey {
        PeerKey {
            netns: 1,
            addr: IpAddr::from([10, 0, 0, n]),
        }
    }

    fn flow(port: u16) -> Flow {
        Flow {
            family: Family::Ipv4,
            saddr: IpAddr::from([10, 0, 0, 1]),
            sport: port,
            daddr: IpAddr::from([10, 0, 0, 2]),
            dport: 80,
            netns: 1,
        }
    }

    fn sample(signal: Signal, sec: u32) -> Sample<'static> {
        Sample {
            signal,
            amount: 1,
            now_ns: u64::from(sec) * 1_000_000_000,
            now_sec: sec,
            exemplar: None,
            reason: None,
        }
    }

    #[test]
    fn rows_count_per_signal() {
        let mut table = Table::new(10);
        for _ in 0..3 {
            table.record(peer(1), &sample(Signal::Retransmit, 5));
        }
        table.record(peer(1), &sample(Signal::ResetSent, 6));
        assert_eq!(table.len(), 1);
        let row = &table.rows()[0];
        assert_eq!(row.total(Signal::Retransmit.bit()), 3);
        assert_eq!(row.total(Signal::ResetSent.bit()), 1);
        assert_eq!(
            row.total(Signal::Retransmit.bit() | Signal::ResetSent.bit()),
            4
        );
        assert_eq!(
            row.rate_per_sec(Signal::Retransmit.bit(), Window::Last10s, 7),
            0.3
        );
        assert_eq!(row.counts(Signal::ResetSent.bit(), 7).last_1s, 1);
        assert_eq!(
            (row.first_seen_ns(), row.last_seen_ns),
            (5_000_000_000, 6_000_000_000)
        );
        assert_eq!(
            row.series_of(Signal::ResetSent).map(|s| s.first_seen_ns),
            Some(6_000_000_000)
        );
    }

    #[test]
    fn full_table_evicts_least_recently_seen_and_counts_it() {
        let mut table = Table::new(3);
        let evicted_by = |table: &mut Table<PeerKey>, n: u8, sec: u32| {
            table
                .record(peer(n), &sample(Signal::Retransmit, sec))
                .evicted
                .map(|e| e.row.key)
        };
        assert_eq!(evicted_by(&mut table, 1, 1), None);
        assert_eq!(evicted_by(&mut table, 2, 2), None);
        assert_eq!(evicted_by(&mut table, 3, 3), None);
        // Peer 1 seen again: peer 2 is now the least recently seen.
        assert_eq!(evicted_by(&mut table, 1, 4), None);
        assert_eq!(evicted_by(&mut table, 4, 5), Some(peer(2)));
        assert_eq!(table.evictions(), 1);
        assert_eq!(table.len(), 3);
        assert!(table.slot_of(&peer(2)).is_none());
        for n in [1, 3, 4] {
            assert!(table.slot_of(&peer(n)).is_some(), "peer {n}");
        }
        // The new row starts from scratch in the reused slot.
        let slot = table.slot_of(&peer(4)).map(|s| s as usize);
        assert_eq!(slot.map(|s| table.rows()[s].total(u16::MAX)), Some(1));

        assert_eq!(evicted_by(&mut table, 5, 6), Some(peer(3)));
        assert_eq!(table.evictions(), 2);
    }

    #[test]
    fn first_event_per_second_is_flagged() {
        let mut table = Table::new(3);
        let mut first = |signal, sec| {
            table
                .record(peer(1), &sample(signal, sec))
                .first_this_second
        };
        assert!(first(Signal::Retransmit, 1), "new row");
        assert!(!first(Signal::Retransmit, 1));
        assert!(first(Signal::ResetSent, 1), "new signal");
        assert!(!first(Signal::ResetSent, 1));
        assert!(first(Signal::Retransmit, 2), "new second");
        assert!(!first(Signal::Retransmit, 2));
    }

    #[test]
    fn recency_list_stays_consistent() {
        let mut table = Table::new(8);
        let mut sec = 0;
        for round in 0..50u32 {
            for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] {
                if (round + u32::from(n)) % 3 == 0 {
                    sec += 1;
                    table.record(peer(n), &sample(Signal::Retransmit, sec));
                }
            }
        }
        let order = table.slots_oldest_first();
        assert_eq!(order.len(), table.len());
        let seen: Vec<u64> = order
            .iter()
            .map(|&s| table.rows()[s as usize].last_seen_ns)
            .collect();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    }

    #[test]
    fn exemplars_are_recent_distinct_and_bounded() {
        let mut table = Table::new(4);
        let flows: Vec<Flow> = (1..=8).map(flow).collect();
        for (i, f) in flows.iter().enumerate() {
            let mut s = sample(Signal::Retransmit, 10 + i as u32);
            s.exemplar = Some(f);
            table.record(peer(2), &s);
        }
        // Flow 5 again: it moves to the front without duplicating.
        let mut again = sample(Signal::Retransmit, 30);
        again.exemplar = Some(&flows[4]);
        table.record(peer(2), &again);
        let row = &table.rows()[0];
        let ports: Vec<u16> = row
            .series_of(Signal::Retransmit)
            .map(|s| s.exemplars().map(|f| f.sport).collect())
            .unwrap_or_default();
        assert_eq!(ports, vec![5, 8, 7, 6, 4]);
    }

    #[test]
    fn flow_rows_keep_no_exemplars() {
        let mut table = Table::new(4);
        let f = flow(1);
        let mut s = sample(Signal::Retransmit, 1);
        s.exemplar = Some(&f);
        table.record(f, &s);
        assert!(table.rows()[0].first_series.extras.is_none());
    }

    #[test]
    fn reasons_are_counted_and_bounded() {
        let mut table = Table::new(4);
        let names: Vec<Arc<str>> = (0..12).map(|i| Arc::from(format!("REASON_{i}"))).collect();
        for name in &names {
            let mut s = sample(Signal::PacketDrop, 1);
            s.reason = Some(name);
            s.amount = 2;
            table.record(peer(1), &s);
        }
        let again: Arc<str> = Arc::from("REASON_0");
        let mut s = sample(Signal::PacketDrop, 2);
        s.reason = Some(&again);
        table.record(peer(1), &s);
        let extras = table.rows()[0]
            .series_of(Signal::PacketDrop)
            .and_then(|s| s.extras.as_deref());
        let Some(extras) = extras else {
            panic!("drop reasons recorded");
        };
        assert_eq!(extras.reasons.len(), MAX_REASONS);
        assert_eq!(extras.reasons[0], (Arc::from("REASON_0"), 3));
        assert_eq!(extras.other_reasons, 2 * (12 - MAX_REASONS as u64));
    }
}
