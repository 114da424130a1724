//! Per-second counting: the ring behind every row's 1 s / 10 s / 60 s windows, and the host-wide
//! history that compares rates before and after a change.
//!
//! Windows cover whole, completed seconds: at 12.4 s, the 10 s window is seconds 2..=11. The
//! current, still-filling second is counted in totals but in no window, so a rate never reads low
//! because the tick happened early in a second.
use serde::Serialize;

use super::Signal;

pub(crate) const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Whole seconds of a monotonic nanosecond time. `u32` seconds last 136 years of uptime; the
/// rings store them this way to stay small (100,000 flows each keep one).
pub(crate) fn second_of(ns: u64) -> u32 {
    u32::try_from(ns / NANOS_PER_SEC).unwrap_or(u32::MAX)
}

/// A sliding window of completed seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    Last1s,
    Last10s,
    Last60s,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Last1s, Window::Last10s, Window::Last60s];

    /// Length of the window in seconds.
    pub fn secs(self) -> u32 {
        match self {
            Window::Last1s => 1,
            Window::Last10s => 10,
            Window::Last60s => 60,
        }
    }
}

/// Counts in the three windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WindowCounts {
    pub last_1s: u64,
    pub last_10s: u64,
    pub last_60s: u64,
}

impl WindowCounts {
    pub fn get(&self, window: Window) -> u64 {
        match window {
            Window::Last1s => self.last_1s,
            Window::Last10s => self.last_10s,
            Window::Last60s => self.last_60s,
        }
    }

    /// Events (or segments) per second over `window`.
    pub fn rate_per_sec(&self, window: Window) -> f64 {
        self.get(window) as f64 / f64::from(window.secs())
    }
}

impl std::ops::AddAssign for WindowCounts {
    fn add_assign(&mut self, other: Self) {
        let Self {
            last_1s,
            last_10s,
            last_60s,
        } = other;
        self.last_1s += last_1s;
        self.last_10s += last_10s;
        self.last_60s += last_60s;
    }
}

/// The longest window plus the current, incomplete second.
const RING_LEN: u32 = 61;

const RING_SLOTS: usize = RING_LEN as usize;

/// The buckets of a [`SecondRing`].
///
/// Most rows never count 65,536 of one signal in one second, so buckets start as `u16`: at
/// 100,000 flows that halves the rings' memory (~12 MiB). A row that overflows one moves to
/// `u32` buckets for good (one allocation in its life); those saturate rather than wrap.
#[derive(Clone, Debug)]
enum Buckets {
    Narrow([u16; RING_SLOTS]),
    Wide(Box<[u32; RING_SLOTS]>),
}

impl Buckets {
    #[inline]
    fn get(&self, slot: usize) -> u32 {
        match self {
            Buckets::Narrow(counts) => u32::from(counts[slot]),
            Buckets::Wide(counts) => counts[slot],
        }
    }

    #[inline]
    fn clear(&mut self, slot: usize) {
        match self {
            Buckets::Narrow(counts) => counts[slot] = 0,
            Buckets::Wide(counts) => counts[slot] = 0,
        }
    }

    fn clear_all(&mut self) {
        match self {
            Buckets::Narrow(counts) => counts.fill(0),
            Buckets::Wide(counts) => counts.fill(0),
        }
    }

    #[inline]
    fn add(&mut self, slot: usize, amount: u32) {
        match self {
            Buckets::Narrow(counts) => {
                match u16::try_from(u32::from(counts[slot]).saturating_add(amount)) {
                    Ok(sum) => counts[slot] = sum,
                    Err(_) => self.widen_and_add(slot, amount),
                }
            }
            Buckets::Wide(counts) => counts[slot] = counts[slot].saturating_add(amount),
        }
    }

    #[cold]
    fn widen_and_add(&mut self, slot: usize, amount: u32) {
        if let Buckets::Narrow(narrow) = self {
            let wide = Box::new(narrow.map(u32::from));
            *self = Buckets::Wide(wide);
        }
        if let Buckets::Wide(counts) = self {
            counts[slot] = counts[slot].saturating_add(amount);
        }
    }
}

/// Per-second counts of one signal on one row, for the last [`RING_LEN`] seconds.
#[derive(Clone, Debug)]
#[repr(C)] // `newest_sec` first, beside the row's other per-event fields (see `table::Series`).
pub(crate) struct SecondRing {
    /// The second the newest bucket holds; buckets for later seconds are implicitly zero.
    newest_sec: u32,
    buckets: Buckets,
}

impl SecondRing {
    pub(crate) fn new(now_sec: u32) -> Self {
        Self {
            newest_sec: now_sec,
            buckets: Buckets::Narrow([0; RING_SLOTS]),
        }
    }

    fn slot(sec: u32) -> usize {
        (sec % RING_LEN) as usize
    }

    pub(crate) fn newest_sec(&self) -> u32 {
        self.newest_sec
    }

    /// Counts `amount` in second `sec`, first clearing the buckets of the seconds skipped since
    /// the newest one (amortised O(1): each second is cleared once).
    #[inline]
    pub(crate) fn add(&mut self, sec: u32, amount: u32) {
        if sec > self.newest_sec {
            if sec - self.newest_sec >= RING_LEN {
                self.buckets.clear_all();
            } else {
                for skipped in self.newest_sec + 1..=sec {
                    self.buckets.clear(Self::slot(skipped));
                }
            }
            self.newest_sec = sec;
        } else if self.newest_sec - sec >= RING_LEN {
            // Older than the ring: no window can include it any more (totals still do).
            return;
        }
        self.buckets.add(Self::slot(sec), amount);
    }

    /// Count in the `secs` completed seconds before `now_sec` (`secs` <= 60).
    pub(crate) fn count_last(&self, now_sec: u32, secs: u32) -> u64 {
        let first = now_sec.saturating_sub(secs).max(self.oldest_sec());
        let last = now_sec.saturating_sub(1).min(self.newest_sec);
        if now_sec == 0 || first > last {
            return 0;
        }
        (first..=last)
            .map(|sec| u64::from(self.buckets.get(Self::slot(sec))))
            .sum()
    }

    /// Counts in all three windows, in one pass over the ring.
    pub(crate) fn counts(&self, now_sec: u32) -> WindowCounts {
        let mut counts = WindowCounts::default();
        if self.is_idle(now_sec) {
            return counts;
        }
        let mut sum = 0u64;
        for ago in 1..=Window::Last60s.secs() {
            // Near boot, the earliest seconds of a window do not exist: they count as empty.
            if let Some(sec) = now_sec.checked_sub(ago)
                && (self.oldest_sec()..=self.newest_sec).contains(&sec)
            {
                sum += u64::from(self.buckets.get(Self::slot(sec)));
            }
            match ago {
                1 => counts.last_1s = sum,
                10 => counts.last_10s = sum,
                _ => {}
            }
        }
        counts.last_60s = sum;
        counts
    }

    /// True when nothing was counted in the last 60 completed seconds.
    pub(crate) fn is_idle(&self, now_sec: u32) -> bool {
        u64::from(self.newest_sec) + u64::from(Window::Last60s.secs()) < u64::from(now_sec)
    }

    fn oldest_sec(&self) -> u32 {
        self.newest_sec.saturating_sub(RING_LEN - 1)
    }
}

/// Seconds of host-wide history: enough for 5 minutes either side of a change reported up to
/// 5 minutes late, with room to spare.
const HOST_HISTORY_SECS: u32 = 16 * 60;

/// Host-wide per-second counts of every signal over the last [`HOST_HISTORY_SECS`] seconds
/// (~92 KiB), for comparing rates before and after a sysctl change.
#[derive(Clone, Debug)]
pub(crate) struct HostHistory {
    /// Indexed by `second % HOST_HISTORY_SECS`, then by signal.
    buckets: Box<[[u64; Signal::COUNT]]>,
    newest_sec: u32,
    /// Nothing was counted before this second (the engine did not exist).
    first_sec: u32,
}

/// Signal rates over the spans before and after a moment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BeforeAfter {
    /// `None` when the engine holds no second of the span (too old, or before it started).
    pub before_per_min: Option<f64>,
    /// `None` when no second of the span has begun yet.
    pub after_per_min: Option<f64>,
    /// Seconds of the "before" span the rate is computed over; less than the span asked for
    /// when the history does not reach back far enough.
    pub before_covered_secs: u32,
    /// Seconds of the "after" span that have begun (the current one included); less than the
    /// span asked for when it is not over yet.
    pub after_covered_secs: u32,
}

impl HostHistory {
    pub(crate) fn new(now_sec: u32) -> Self {
        Self {
            buckets: vec![[0; Signal::COUNT]; HOST_HISTORY_SECS as usize].into_boxed_slice(),
            newest_sec: now_sec,
            first_sec: now_sec,
        }
    }

    fn slot(sec: u32) -> usize {
        (sec % HOST_HISTORY_SECS) as usize
    }

    #[inline]
    pub(crate) fn add(&mut self, sec: u32, signal: Signal, amount: u64) {
        if sec > self.newest_sec {
            if sec - self.newest_sec >= HOST_HISTORY_SECS {
                self.buckets.fill([0; Signal::COUNT]);
            } else {
                for skipped in self.newest_sec + 1..=sec {
                    self.buckets[Self::slot(skipped)] = [0; Signal::COUNT];
                }
            }
            self.newest_sec = sec;
        } else if self.newest_sec - sec >= HOST_HISTORY_SECS {
            return;
        }
        let count = &mut self.buckets[Self::slot(sec)][signal.index()];
        *count = count.saturating_add(amount);
    }

    /// Sum and number of seconds of `first..=last` that the history holds, as of `now_sec`.
    fn sum(&self, signal: Signal, first: u32, last: u32, now_sec: u32) -> (u64, u32) {
        let oldest_held = self
            .first_sec
            .max(now_sec.saturating_sub(HOST_HISTORY_SECS - 1));
        let first = first.max(oldest_held);
        let last = last.min(now_sec);
        if first > last {
            return (0, 0);
        }
        let sum = (first..=last.min(self.newest_sec))
            .map(|sec| self.buckets[Self::slot(sec)][signal.index()])
            .sum();
        (sum, last - first + 1)
    }

    /// Per-minute rates of `signal` over `span_secs` before `change_sec` and `span_secs` from
    /// it on (the change's own second counts as "after").
    pub(crate) fn before_after(
        &self,
        signal: Signal,
        change_sec: u32,
        span_secs: u32,
        now_sec: u32,
    ) -> BeforeAfter {
        let per_min =
            |(sum, secs): (u64, u32)| (secs > 0).then(|| sum as f64 * 60.0 / f64::from(secs));
        let before = if change_sec == 0 {
            (0, 0)
        } else {
            self.sum(
                signal,
                change_sec.saturating_sub(span_secs),
                change_sec - 1,
                now_sec,
            )
        };
        let after = self.sum(
            signal,
            change_sec,
            change_sec.saturating_add(span_secs.saturating_sub(1)),
            now_sec,
        );
        BeforeAfter {
            before_per_min: per_min(before),
            after_per_min: per_min(after),
            before_covered_secs: before.1,
            after_covered_secs: after.1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_completed_seconds_only() {
        let mut ring = SecondRing::new(100);
        ring.add(100, 3);
        // Still in second 100: no window holds it yet.
        assert_eq!(ring.counts(100), WindowCounts::default());
        assert_eq!(
            ring.counts(101),
            WindowCounts {
                last_1s: 3,
                last_10s: 3,
                last_60s: 3
            }
        );
        assert_eq!(ring.counts(102).last_1s, 0);
        assert_eq!(ring.counts(110).last_10s, 3);
        assert_eq!(ring.counts(111).last_10s, 0);
        assert_eq!(ring.counts(160).last_60s, 3);
        assert_eq!(ring.counts(161).last_60s, 0);
    }

    #[test]
    fn windows_roll_across_gaps() {
        let mut ring = SecondRing::new(0);
        for sec in 0..60 {
            ring.add(sec, 1);
        }
        assert_eq!(ring.counts(60).last_60s, 60);
        // A 5 s gap: seconds 60..=64 are empty, 65 gets 10.
        ring.add(65, 10);
        let counts = ring.counts(66);
        assert_eq!(counts.last_1s, 10);
        assert_eq!(counts.last_10s, 10 + 4); // 56..=59 then nothing until 65
        assert_eq!(counts.last_60s, 10 + 54); // 6..=59 and 65
        // A gap longer than the ring: everything old is gone.
        ring.add(1000, 7);
        assert_eq!(
            ring.counts(1001),
            WindowCounts {
                last_1s: 7,
                last_10s: 7,
                last_60s: 7
            }
        );
        // A bucket reused after wrapping does not carry its old count.
        ring.add(1000 + RING_LEN, 1);
        assert_eq!(ring.counts(1001 + RING_LEN).last_60s, 1);
    }

    #[test]
    fn count_last_agrees_with_counts() {
        let mut ring = SecondRing::new(0);
        for sec in (0..200).step_by(3) {
            ring.add(sec, sec + 1);
            for now in sec..sec + 70 {
                let counts = ring.counts(now);
                assert_eq!(ring.count_last(now, 1), counts.last_1s, "now {now}");
                assert_eq!(ring.count_last(now, 10), counts.last_10s, "now {now}");
                assert_eq!(ring.count_last(now, 60), counts.last_60s, "now {now}");
            }
        }
    }

    #[test]
    fn early_seconds_after_boot() {
        let mut ring = SecondRing::new(0);
        ring.add(0, 2);
        ring.add(3, 5);
        let counts = ring.counts(4);
        assert_eq!(
            counts,
            WindowCounts {
                last_1s: 5,
                last_10s: 7,
                last_60s: 7
            }
        );
        assert_eq!(ring.counts(0), WindowCounts::default());
    }

    #[test]
    fn stale_seconds_are_ignored() {
        let mut ring = SecondRing::new(200);
        ring.add(200, 1);
        ring.add(100, 50); // older than the ring
        assert_eq!(ring.counts(201).last_60s, 1);
    }

    #[test]
    fn busy_rings_widen_and_saturate() {
        let mut ring = SecondRing::new(0);
        ring.add(0, 3);
        ring.add(1, u32::from(u16::MAX));
        assert!(matches!(ring.buckets, Buckets::Narrow(_)));
        ring.add(1, 1);
        assert!(matches!(ring.buckets, Buckets::Wide(_)));
        assert_eq!(ring.counts(2).last_1s, 65_536);
        assert_eq!(
            ring.counts(2).last_10s,
            65_539,
            "earlier buckets survive widening"
        );
        ring.add(2, u32::MAX);
        ring.add(2, 5);
        assert_eq!(ring.counts(3).last_1s, u64::from(u32::MAX));
        // Wide rings roll like narrow ones.
        ring.add(200, 7);
        assert_eq!(ring.counts(201).last_60s, 7);
    }

    #[test]
    fn rates_per_window() {
        let counts = WindowCounts {
            last_1s: 5,
            last_10s: 20,
            last_60s: 60,
        };
        assert_eq!(counts.rate_per_sec(Window::Last1s), 5.0);
        assert_eq!(counts.rate_per_sec(Window::Last10s), 2.0);
        assert_eq!(counts.rate_per_sec(Window::Last60s), 1.0);
    }

    #[test]
    fn before_and_after_a_change() {
        let start = 1000;
        let mut history = HostHistory::new(start);
        // 1 retransmit a second for 5 minutes, then 3 a second for 5 minutes.
        for sec in start..start + 300 {
            history.add(sec, Signal::Retransmit, 1);
        }
        for sec in start + 300..start + 600 {
            history.add(sec, Signal::Retransmit, 3);
            history.add(sec, Signal::ResetSent, 1);
        }
        let rates = history.before_after(Signal::Retransmit, start + 300, 300, start + 600);
        assert_eq!(rates.before_per_min, Some(60.0));
        assert_eq!(rates.after_per_min, Some(180.0));
        assert_eq!(
            (rates.before_covered_secs, rates.after_covered_secs),
            (300, 300)
        );
        let resets = history.before_after(Signal::ResetSent, start + 300, 300, start + 600);
        assert_eq!(resets.before_per_min, Some(0.0));
        assert_eq!(resets.after_per_min, Some(60.0));
    }

    #[test]
    fn before_after_reports_partial_coverage() {
        let start = 1000;
        let mut history = HostHistory::new(start);
        for sec in start..start + 120 {
            history.add(sec, Signal::Retransmit, 2);
        }
        // Change 60 s after start, asked about 5 minutes either side, 60 s after the change.
        let rates = history.before_after(Signal::Retransmit, start + 60, 300, start + 119);
        assert_eq!(rates.before_covered_secs, 60);
        assert_eq!(rates.after_covered_secs, 60);
        assert_eq!(rates.before_per_min, Some(120.0));
        assert_eq!(rates.after_per_min, Some(120.0));
        // A change in the future has no "after" yet; one before start has no "before".
        let future = history.before_after(Signal::Retransmit, start + 500, 60, start + 119);
        assert_eq!(future.after_per_min, None);
        let early = history.before_after(Signal::Retransmit, start, 60, start + 119);
        assert_eq!(early.before_per_min, None);
    }

    #[test]
    fn host_history_forgets_beyond_its_length() {
        let mut history = HostHistory::new(0);
        history.add(0, Signal::Retransmit, 100);
        history.add(HOST_HISTORY_SECS + 10, Signal::Retransmit, 1);
        let rates = history.before_after(
            Signal::Retransmit,
            HOST_HISTORY_SECS + 10,
            HOST_HISTORY_SECS,
            HOST_HISTORY_SECS + 10,
        );
        assert_eq!(rates.before_covered_secs, HOST_HISTORY_SECS - 1);
        assert_eq!(rates.before_per_min, Some(0.0));
    }
}
