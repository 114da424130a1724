//! Our own per-CPU perf buffers for the `EVENTS` perf event array, with batched wakeups.
//!
//! aya 0.14 opens each CPU's `PERF_COUNT_SW_BPF_OUTPUT` event with `wakeup_events = 1`, so the
//! kernel wakes the reader (an irq_work, then a poll wakeup) for every sample: several µs of
//! kernel time per exported event (../../../shared/NOTES.md). Here the event is opened with
//! `wakeup_events = N`: the kernel wakes the reader once per N samples (and, whatever N, once
//! the buffer is half full). Samples that arrive slower than that wait in the buffer until the
//! reader's periodic drain (see `daemon::read_cpu`).
//!
//! Two parts:
//! - pure: [`parse_records`] walks the records between the consumer's `data_tail` and the
//!   kernel's `data_head` in any [`RingBytes`] (a byte slice in the tests), following the kernel
//!   ABI (`include/uapi/linux/perf_event.h`): each record starts with
//!   `struct perf_event_header { u32 type; u16 misc; u16 size; }`; a `PERF_RECORD_SAMPLE` with
//!   `PERF_SAMPLE_RAW` carries `u32 size` then the raw bytes, a `PERF_RECORD_LOST` carries
//!   `u64 id, u64 lost`. Records may wrap around the end of the data area; malformed ones are
//!   counted as errors, never a panic.
//! - kernel: [`PerfRing`] opens the perf event (`perf_event_open(2)`), maps its ring, and is
//!   stored in the map with `bpf(BPF_MAP_UPDATE_ELEM)`; [`PerfRing::read`] reads it with the
//!   ABI's memory ordering (`data_head` acquire, `data_tail` release).
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use aya::maps::MapData;
use observer_common::TcpEvent;

/// `PERF_RECORD_LOST`.
pub const PERF_RECORD_LOST: u32 = 2;
/// `PERF_RECORD_SAMPLE`.
pub const PERF_RECORD_SAMPLE: u32 = 9;
/// `sizeof(struct perf_event_header)`.
pub const HEADER_BYTES: usize = 8;

/// Bytes one exported event takes in the ring: header, `u32` raw size, the `TcpEvent`, padded
/// by the kernel to 8 bytes.
pub const SAMPLE_RECORD_BYTES: usize =
    (HEADER_BYTES + size_of::<u32>() + size_of::<TcpEvent>()).next_multiple_of(8);

/// The largest `wakeup_events` that makes sense for a ring of `pages` 4 KiB pages: the number
/// of samples it holds (beyond that the buffer would fill before the wakeup).
pub const fn max_wakeup_events(pages: usize) -> usize {
    pages.saturating_mul(4096) / SAMPLE_RECORD_BYTES
}

/// One record of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The raw bytes a program passed to `bpf_perf_event_output` (plus any alignment padding
    /// the kernel added after them).
    Sample(&'a [u8]),
    /// The kernel dropped `count` samples: the ring was full.
    Lost { count: u64 },
}

/// The data area of a perf ring, read by position.
pub trait RingBytes {
    /// Size of the data area in bytes (non-zero).
    fn size(&self) -> usize;
    /// Copies `dst.len()` (at most [`RingBytes::size`]) bytes starting at `offset`
    /// (< [`RingBytes::size`]), continuing at the start of the area past its end.
    fn copy_wrapping(&self, offset: usize, dst: &mut [u8]);
}

impl RingBytes for [u8] {
    fn size(&self) -> usize {
        self.len()
    }

    fn copy_wrapping(&self, offset: usize, dst: &mut [u8]) {
        let first = (self.len() - offset).min(dst.len());
        let (a, b) = dst.split_at_mut(first);
        a.copy_from_slice(&self[offset..offset + first]);
        b.copy_from_slice(&self[..b.len()]);
    }
}

/// What [`parse_records`] got through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The new `data_tail`: everything before it is consumed.
    pub tail: u64,
    /// Samples and lost records handed out.
    pub records: u64,
    /// Malformed records (a sample whose raw size exceeds its record, a short lost record) and
    /// unreadable stretches (a record size that is zero, runs past `head`, or a `head` further
    /// ahead than the ring holds: the rest up to `head` is skipped, counted once).
    pub errors: u64,
}

/// Reads the records in `ring` from position `tail` to `head` (the kernel's free-running byte
/// counters, `data_tail` and `data_head`), handing each to `f`. Each record is copied into
/// `scratch` first, so records that wrap around the end of the area come out whole.
pub fn parse_records<R: RingBytes + ?Sized>(
    ring: &R,
    tail: u64,
    head: u64,
    scratch: &mut Vec<u8>,
    mut f: impl FnMut(Record<'_>),
) -> Parsed {
    let size = ring.size() as u64;
    let mut parsed = Parsed {
        tail,
        ..Parsed::default()
    };
    let pending = head.wrapping_sub(tail);
    if size == 0 || pending > size {
        // The kernel never runs more than a ring ahead: the positions are garbage.
        if pending != 0 {
            parsed.errors += 1;
        }
        parsed.tail = head;
        return parsed;
    }
    while parsed.tail != head {
        let left = head.wrapping_sub(parsed.tail);
        let offset = (parsed.tail % size) as usize;
        if left < HEADER_BYTES as u64 {
            parsed.errors += 1;
            parsed.tail = head;
            break;
        }
        let mut header = [0u8; HEADER_BYTES];
        ring.copy_wrapping(offset, &mut header);
        let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
        let record_size = u64::from(u16::from_ne_bytes([header[6], header[7]]));
        if record_size < HEADER_BYTES as u64 || record_size > left {
            // No way to find the next record: skip what is left.
            parsed.errors += 1;
            parsed.tail = head;
            break;
        }
        let body_len = record_size as usize - HEADER_BYTES;
        scratch.clear();
        scratch.resize(body_len, 0);
        ring.copy_wrapping(
            ((parsed.tail + HEADER_BYTES as u64) % size) as usize,
            scratch,
        );
        parsed.tail = parsed.tail.wrapping_add(record_size);
        match kind {
            PERF_RECORD_SAMPLE => {
                let Some((raw_size, rest)) = scratch.split_first_chunk::<4>() else {
                    parsed.errors += 1;
                    continue;
                };
                let raw_size = u32::from_ne_bytes(*raw_size) as usize;
                match rest.get(..raw_size) {
                    Some(raw) => {
                        parsed.records += 1;
                        f(Record::Sample(raw));
                    }
                    None => parsed.errors += 1,
                }
            }
            PERF_RECORD_LOST => match scratch.get(8..16) {
                Some(lost) => {
                    let mut count = [0u8; 8];
                    count.copy_from_slice(lost);
                    parsed.records += 1;
                    f(Record::Lost {
                        count: u64::from_ne_bytes(count),
                    });
                }
                None => parsed.errors += 1,
            },
            // Other record types (none expected for a BPF output event) are skipped.
            _ => {}
        }
    }
    parsed
}

/// `PERF_TYPE_SOFTWARE`.
const PERF_TYPE_SOFTWARE: u32 = 1;
/// `PERF_COUNT_SW_BPF_OUTPUT`.
const PERF_COUNT_SW_BPF_OUTPUT: u64 = 10;
/// `PERF_SAMPLE_RAW`.
const PERF_SAMPLE_RAW: u64 = 1 << 10;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `PERF_EVENT_IOC_ENABLE`: `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `BPF_MAP_UPDATE_ELEM`.
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `BPF_ANY`.
const BPF_ANY: u64 = 0;
/// Offsets of `data_head` and `data_tail` in `struct perf_event_mmap_page`.
const DATA_HEAD_OFFSET: usize = 1024;
const DATA_TAIL_OFFSET: usize = 1032;

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1`); the kernel accepts any
/// published size and treats the fields past it as zero.
#[repr(C)]
#[derive(Debug, Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The bit fields (`disabled`, `inherit`, ..., `watermark` ...): all zero here, so the
    /// event starts enabled and `wakeup_events` counts samples (not bytes).
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
}
const _: () = assert!(size_of::<PerfEventAttr>() == 72);

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
#[derive(Debug, Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}
const _: () = assert!(size_of::<MapElemAttr>() == 32);

/// The mapped data area of a ring.
struct MappedData {
    base: NonNull<u8>,
    size: usize,
}

impl RingBytes for MappedData {
    fn size(&self) -> usize {
        self.size
    }

    fn copy_wrapping(&self, offset: usize, dst: &mut [u8]) {
        // Out-of-contract calls copy what they can rather than read outside the area.
        let offset = offset.min(self.size);
        let first = (self.size - offset).min(dst.len());
        let second = (dst.len() - first).min(self.size);
        // SAFETY: `base` points to `size` mapped, readable bytes for as long as the ring
        // lives; `offset + first <= size` and `second <= size` (both clamped above), so both
        // source ranges are inside the area, and `first + second <= dst.len()`; `dst` is our
        // own memory, so the ranges do not overlap. The bytes copied lie between data_tail and data_head, which the kernel
        // does not write until we move data_tail past them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(self.base.as_ptr(), dst.as_mut_ptr().add(first), second);
        }
    }
}

/// One CPU's perf event and its mapped ring, registered in the perf event array.
pub struct PerfRing {
    cpu: u32,
    fd: OwnedFd,
    /// The mapping: one metadata page, then the data area.
    mmap: NonNull<u8>,
    mmap_len: usize,
    data: MappedData,
    scratch: Vec<u8>,
    /// The array's entry for this ring lives as long as the map fd it was set through.
    _map: Arc<MapData>,
}

// SAFETY: the mapping is owned by this value alone (no other handle to it exists in this
// process), and every access goes through `&mut self` or through atomics; moving it to another
// thread is like moving a Vec.
unsafe impl Send for PerfRing {}

impl std::fmt::Debug for PerfRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfRing")
            .field("cpu", &self.cpu)
            .field("fd", &self.fd)
            .field("data_size", &self.data.size)
            .finish_non_exhaustive()
    }
}

/// Opens a ring of `pages` data pages on every CPU of `cpus` with `wakeup_events`, and stores
/// each in `events` (the `EVENTS` perf event array) at the CPU's index. The rings keep the map
/// open: the kernel removes an entry when the map fd that set it is closed.
pub fn open_all(
    events: MapData,
    cpus: &[u32],
    pages: usize,
    wakeup_events: u32,
) -> anyhow::Result<Vec<PerfRing>> {
    let map = Arc::new(events);
    let mut rings = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let ring = PerfRing::open(cpu, pages, wakeup_events, Arc::clone(&map))
            .with_context(|| format!("opening the perf buffer of CPU {cpu}"))?;
        rings.push(ring);
    }
    Ok(rings)
}

impl PerfRing {
    fn open(cpu: u32, pages: usize, wakeup_events: u32, map: Arc<MapData>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            pages.is_power_of_two(),
            "the page count ({pages}) must be a power of two"
        );
        anyhow::ensure!(wakeup_events >= 1, "wakeup_events must be at least 1");
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_BPF_OUTPUT,
            sample_period: 1,
            sample_type: PERF_SAMPLE_RAW,
            wakeup_events,
            ..PerfEventAttr::default()
        };
        let cpu_arg = libc::c_int::try_from(cpu).context("CPU number out of range")?;
        // Every process (pid -1) on that CPU, no group.
        let pid: libc::pid_t = -1;
        let group_fd: libc::c_int = -1;
        // SAFETY: perf_event_open(attr, pid, cpu, group_fd, flags) reads `attr` (a valid
        // perf_event_attr of the size it states) and returns a new fd or -1; no memory of ours
        // is kept.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                pid,
                cpu_arg,
                group_fd,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error()).context("perf_event_open");
        }
        let raw = RawFd::try_from(ret).context("perf_event_open returned no fd")?;
        // SAFETY: `raw` is a fresh fd the kernel just returned to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: sysconf has no memory-safety preconditions.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => 4096,
        };
        let data_size = pages
            .checked_mul(page_size)
            .context("perf buffer size overflows")?;
        let mmap_len = data_size
            .checked_add(page_size)
            .context("perf buffer size overflows")?;
        // SAFETY: a fresh shared mapping of the perf fd chosen by the kernel (null hint); it
        // does not alias any memory of ours. The result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mmap_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).context("mapping the perf buffer");
        }
        let mmap = NonNull::new(ptr.cast::<u8>()).context("mmap returned a null mapping")?;
        // SAFETY: the mapping is `page_size + data_size` bytes long; the data area starts one
        // page in.
        let data_base = unsafe { mmap.add(page_size) };
        let ring = PerfRing {
            cpu,
            fd,
            mmap,
            mmap_len,
            data: MappedData {
                base: data_base,
                size: data_size,
            },
            scratch: Vec::with_capacity(SAMPLE_RECORD_BYTES),
            _map: map,
        };
        // From here on `ring` owns the mapping and the fd: an error drops (unmaps) them.
        // SAFETY: PERF_EVENT_IOC_ENABLE takes an integer argument and touches no memory of ours.
        if unsafe { libc::ioctl(ring.fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } < 0 {
            return Err(io::Error::last_os_error()).context("PERF_EVENT_IOC_ENABLE");
        }
        ring.store_in(ring._map.fd().as_fd())?;
        Ok(ring)
    }

    /// Sets this ring's fd at index `cpu` of the perf event array `map_fd`.
    fn store_in(&self, map_fd: BorrowedFd<'_>) -> anyhow::Result<()> {
        let key: u32 = self.cpu;
        let value: u32 = u32::try_from(self.fd.as_raw_fd()).context("negative fd")?;
        let attr = MapElemAttr {
            map_fd: u32::try_from(map_fd.as_raw_fd()).context("negative map fd")?,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: BPF_ANY,
        };
        // SAFETY: bpf(BPF_MAP_UPDATE_ELEM) reads `attr` (of the size given) and, through it,
        // the 4-byte key and value, which live until the call returns.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &attr as *const MapElemAttr,
                size_of::<MapElemAttr>() as libc::c_uint,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!("storing the perf buffer at index {} of EVENTS", self.cpu)
            });
        }
        Ok(())
    }

    /// The CPU this ring belongs to.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    fn data_head(&self) -> &AtomicU64 {
        // SAFETY: the metadata page is mapped for as long as `self` lives; `data_head` is an
        // 8-byte aligned u64 at offset 1024 (the mapping is page aligned), which the kernel
        // writes concurrently: it is only ever accessed atomically here.
        unsafe { AtomicU64::from_ptr(self.mmap.as_ptr().add(DATA_HEAD_OFFSET).cast::<u64>()) }
    }

    fn data_tail(&self) -> &AtomicU64 {
        // SAFETY: as for `data_head`: an aligned u64 at offset 1032 of the mapped metadata page,
        // read by the kernel concurrently, accessed atomically only.
        unsafe { AtomicU64::from_ptr(self.mmap.as_ptr().add(DATA_TAIL_OFFSET).cast::<u64>()) }
    }

    /// Whether records are waiting.
    pub fn readable(&self) -> bool {
        self.data_head().load(Ordering::Acquire) != self.data_tail().load(Ordering::Relaxed)
    }

    /// Hands every waiting record to `f` and releases its space to the kernel. Returns what
    /// was read; `errors` counts malformed records.
    pub fn read(&mut self, f: impl FnMut(Record<'_>)) -> Parsed {
        // Acquire pairs with the kernel's write barrier before it publishes data_head: the
        // record bytes before `head` are visible.
        let head = self.data_head().load(Ordering::Acquire);
        // Only we write data_tail.
        let tail = self.data_tail().load(Ordering::Relaxed);
        if head == tail {
            return Parsed {
                tail,
                ..Parsed::default()
            };
        }
        let parsed = parse_records(&self.data, tail, head, &mut self.scratch, f);
        // Release: our reads of the records happen before the kernel may overwrite them.
        self.data_tail().store(parsed.tail, Ordering::Release);
        parsed
    }
}

impl AsRawFd for PerfRing {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PerfRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PerfRing {
    fn drop(&mut self) {
        // SAFETY: `mmap`/`mmap_len` are exactly the mapping made in `open`, unmapped only here;
        // no reference into it outlives `self`. The fd closes after (OwnedFd).
        if unsafe { libc::munmap(self.mmap.as_ptr().cast(), self.mmap_len) } != 0 {
            eprintln!(
                "observer: warning: unmapping the perf buffer of CPU {}: {}",
                self.cpu,
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the kernel lays it out.
    fn record(kind: u32, body: &[u8]) -> Vec<u8> {
        let size = (HEADER_BYTES + body.len()).next_multiple_of(8);
        let mut r = Vec::with_capacity(size);
        r.extend_from_slice(&kind.to_ne_bytes());
        r.extend_from_slice(&0u16.to_ne_bytes());
        r.extend_from_slice(&(size as u16).to_ne_bytes());
        r.extend_from_slice(body);
        r.resize(size, 0);
        r
    }

    fn sample(raw: &[u8]) -> Vec<u8> {
        let mut body = (raw.len() as u32).to_ne_bytes().to_vec();
        body.extend_from_slice(raw);
        record(PERF_RECORD_SAMPLE, &body)
    }

    fn lost(count: u64) -> Vec<u8> {
        let mut body = 7u64.to_ne_bytes().to_vec();
        body.extend_from_slice(&count.to_ne_bytes());
        record(PERF_RECORD_LOST, &body)
    }

    /// Writes `records` into a ring of `size` bytes starting at position `start`; returns the
    /// ring and the head.
    fn ring_with(size: usize, start: u64, records: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let mut ring = vec![0xAAu8; size];
        let mut pos = start;
        for r in records {
            for &b in r {
                ring[(pos % size as u64) as usize] = b;
                pos += 1;
            }
        }
        (ring, pos)
    }

    #[derive(Debug, PartialEq)]
    enum Got {
        Sample(Vec<u8>),
        Lost(u64),
    }

    fn collect(ring: &[u8], tail: u64, head: u64) -> (Vec<Got>, Parsed) {
        let mut got = Vec::new();
        let mut scratch = Vec::new();
        let parsed = parse_records(ring, tail, head, &mut scratch, |r| {
            got.push(match r {
                Record::Sample(bytes) => Got::Sample(bytes.to_vec()),
                Record::Lost { count } => Got::Lost(count),
            })
        });
        (got, parsed)
    }

    fn payload(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| n.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn samples_and_lost_records_in_order() {
        let a = payload(1, size_of::<TcpEvent>());
        let b = payload(9, 20);
        let (ring, head) = ring_with(4096, 0, &[sample(&a), lost(12), sample(&b)]);
        let (got, parsed) = collect(&ring, 0, head);
        assert_eq!(
            got,
            vec![Got::Sample(a), Got::Lost(12), Got::Sample(b.clone())]
        );
        assert_eq!(
            parsed,
            Parsed {
                tail: head,
                records: 3,
                errors: 0
            }
        );
        // Raw sizes not a multiple of 8 get padded by the kernel; the sample is the raw size.
        assert_eq!(sample(&b).len(), 32);
    }

    #[test]
    fn one_event_takes_one_sample_record() {
        let event = payload(3, size_of::<TcpEvent>());
        assert_eq!(sample(&event).len(), SAMPLE_RECORD_BYTES);
        assert_eq!(max_wakeup_events(64), 64 * 4096 / SAMPLE_RECORD_BYTES);
        assert_eq!(max_wakeup_events(1), 4096 / SAMPLE_RECORD_BYTES);
    }

    #[test]
    fn records_wrapping_around_the_end_come_out_whole() {
        let a = payload(1, size_of::<TcpEvent>());
        let b = payload(50, size_of::<TcpEvent>());
        // Every split of every record: inside the header, at the raw size, inside the payload.
        // (The three records take 264 bytes of the 512.)
        for start in 512 - 270..512 {
            let (ring, head) = ring_with(512, start, &[sample(&a), lost(3), sample(&b)]);
            let (got, parsed) = collect(&ring, start, head);
            assert_eq!(
                got,
                vec![Got::Sample(a.clone()), Got::Lost(3), Got::Sample(b.clone())],
                "start {start}"
            );
            assert_eq!((parsed.tail, parsed.errors), (head, 0));
        }
        // Positions are free-running counters, far beyond the ring's size.
        let start = (1u64 << 40) + 200;
        let (ring, head) = ring_with(256, start, &[sample(&a)]);
        let (got, parsed) = collect(&ring, start, head);
        assert_eq!(got, vec![Got::Sample(a)]);
        assert_eq!(parsed.tail, head);
    }

    #[test]
    fn nothing_pending_reads_nothing() {
        let ring = vec![0u8; 64];
        let (got, parsed) = collect(&ring, 40, 40);
        assert!(got.is_empty());
        assert_eq!(
            parsed,
            Parsed {
                tail: 40,
                records: 0,
                errors: 0
            }
        );
    }

    #[test]
    fn garbage_sizes_are_counted_not_panics() {
        let a = payload(1, 16);
        // A zero-sized record: no way forward; the rest up to head is skipped.
        let mut zero = record(PERF_RECORD_SAMPLE, &[0; 8]);
        zero[6..8].copy_from_slice(&0u16.to_ne_bytes());
        let (ring, head) = ring_with(256, 0, &[sample(&a), zero, sample(&a)]);
        let (got, parsed) = collect(&ring, 0, head);
        assert_eq!(got, vec![Got::Sample(a.clone())]);
        assert_eq!((parsed.tail, parsed.errors, parsed.records), (head, 1, 1));

        // A record claiming more than was published (truncated).
        let (ring, head) = ring_with(256, 0, &[sample(&a)]);
        let (got, parsed) = collect(&ring, 0, head - 8);
        assert!(got.is_empty());
        assert_eq!((parsed.tail, parsed.errors), (head - 8, 1));

        // Fewer bytes than a header left.
        let (got, parsed) = collect(&ring, 0, 4);
        assert!(got.is_empty());
        assert_eq!((parsed.tail, parsed.errors), (4, 1));

        // A head more than a ring ahead of the tail, or behind it.
        let (_, parsed) = collect(&ring, 0, 1000);
        assert_eq!((parsed.tail, parsed.errors), (1000, 1));
        let (_, parsed) = collect(&ring, 64, 8);
        assert_eq!((parsed.tail, parsed.errors), (8, 1));

        // A sample whose raw size runs past its record, a lost record too short, a sample
        // without even a raw size: skipped one by one, the records after them still read.
        let mut too_long = sample(&a);
        too_long[8..12].copy_from_slice(&1000u32.to_ne_bytes());
        let short_lost = record(PERF_RECORD_LOST, &[0; 8]);
        let bare = record(PERF_RECORD_SAMPLE, &[]);
        let (ring, head) = ring_with(256, 0, &[too_long, short_lost, bare, lost(5)]);
        let (got, parsed) = collect(&ring, 0, head);
        assert_eq!(got, vec![Got::Lost(5)]);
        assert_eq!(
            parsed,
            Parsed {
                tail: head,
                records: 1,
                errors: 3
            }
        );

        // Unknown record types are skipped silently.
        let (ring, head) = ring_with(256, 0, &[record(5, &[0; 16]), sample(&a)]);
        let (got, parsed) = collect(&ring, 0, head);
        assert_eq!(got, vec![Got::Sample(a)]);
        assert_eq!(parsed.errors, 0);

        // Random bytes anywhere never panic.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let ring: Vec<u8> = (0..64).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            let tail = seed % 1000;
            let head = tail + (seed >> 20) % 80;
            let _ = collect(&ring, tail, head);
        }
    }
}

#[cfg(test)]
mod proptests;
