//! The perf buffer readers: one task per CPU, draining on the kernel's wakeups and a timer.
use super::*;

/// Reads one CPU's perf buffer until told to stop, then hands the buffer back for the final
/// drains. It drains when the kernel wakes it (every `wakeup_events` samples) and every
/// `flush_interval`, so a trickle of samples short of a wakeup is not held back.
pub(super) async fn read_cpu(
    ring: PerfRing,
    flush_interval: Duration,
    tx: mpsc::Sender<Incoming>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<ReaderCounters>,
) -> anyhow::Result<PerfRing> {
    let cpu = ring.cpu();
    // SAFETY: the ring owns its perf event fd, keeps it open until it is dropped, and always
    // returns the same one; the AsyncFd owns the ring for its whole life (`drain` through
    // `get_mut` reads the ring, never replaces it).
    let registered = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) };
    let mut fd = registered.map_err(|e| {
        anyhow::anyhow!("polling the perf buffer of CPU {cpu}: {}", e.into_parts().1)
    })?;
    let mut flush = tokio::time::interval(flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &tx, &counters);
                guard.clear_ready();
            }
            _ = flush.tick() => {
                if fd.get_ref().readable() {
                    drain(fd.get_mut(), &tx, &counters);
                }
            }
            _ = stop.changed() => {
                // The final drains happen in `run`, after the programs are detached.
                return Ok(fd.into_inner());
            }
        }
    }
}

/// Events the kernel handed to the perf buffers so far, all kinds.
pub(super) fn total_exported(loaded: &Loaded) -> u64 {
    loaded
        .kind_stats()
        .map(|stats| stats.iter().map(|s| s.exported).sum())
        .unwrap_or(0)
}

pub(super) fn drain(ring: &mut PerfRing, tx: &mpsc::Sender<Incoming>, counters: &ReaderCounters) {
    let cpu = ring.cpu();
    let read = ring.read(|record| {
        let msg = match record {
            Record::Sample(bytes) => match decode_sample(bytes) {
                Ok(event) => Incoming::Event(event),
                Err(_) => {
                    counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            Record::Lost { count } => {
                counters.lost.fetch_add(count, Ordering::Relaxed);
                Incoming::Lost { cpu, count }
            }
        };
        // Only events count as undelivered: a dropped `lost` notice is already in `lost`.
        if let Err(e) = tx.try_send(msg)
            && matches!(e.into_inner(), Incoming::Event(_))
        {
            counters.undelivered.fetch_add(1, Ordering::Relaxed);
        }
    });
    // Malformed ring records: samples that never became events.
    if read.errors > 0 {
        counters
            .decode_errors
            .fetch_add(read.errors, Ordering::Relaxed);
    }
}
