//! Per-CPU scratch buffers and the copies of kernel memory the programs read fields from.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated},
    macros::map,
    maps::PerCpuArray,
    programs::{RawTracePointContext, TracePointContext},
};
use observer_common::{ARG_ABSENT, RECORD_MAX, TcpEvent};

/// Offsets into a copied buffer are masked with this (the verifier must see them bounded);
/// userspace guarantees they are below [`RECORD_MAX`] already.
pub(crate) const OFFSET_MASK: usize = RECORD_MAX as usize - 1;
/// A copy buffer: [`RECORD_MAX`] bytes of copy, plus room for the widest field read at the
/// highest maskable offset (a 28-byte socket address).
pub(crate) const COPY_LEN: usize = RECORD_MAX as usize + 32;
/// Bytes copied from a dropped packet's network header: an option-less IPv4 or IPv6 header and
/// the first 14 bytes of TCP.
pub(crate) const PACKET_COPY: u16 = 64;

/// Per-CPU copies of kernel memory. One `bpf_probe_read_kernel` per record (and per sk_buff
/// window) instead of one per field: the helper call, not the bytes, is what costs.
#[repr(C)]
pub(crate) struct Scratch {
    /// The event being built: kept off the 512-byte BPF stack.
    pub(crate) event: TcpEvent,
    pub(crate) record: [u8; COPY_LEN],
    pub(crate) skb: [u8; COPY_LEN],
    pub(crate) packet: [u8; COPY_LEN],
}

/// One slot per CPU and program. A program does not nest with itself on a CPU (classic
/// tracepoints are guarded by `bpf_prog_active`, raw ones by the program's own `active` count),
/// but a raw program can interrupt another one (a packet freed in a softirq during a state
/// change): each owns its slot for its whole run.
#[map]
pub(crate) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(slot::COUNT, 0);

/// Scratch slots, one per tracepoint (shared by its raw and classic program, never both
/// attached).
pub(crate) mod slot {
    pub(crate) const RETRANSMIT_SKB: u32 = 0;
    pub(crate) const RETRANSMIT_SYNACK: u32 = 1;
    pub(crate) const SEND_RESET: u32 = 2;
    pub(crate) const RECEIVE_RESET: u32 = 3;
    pub(crate) const KFREE_SKB: u32 = 4;
    pub(crate) const SET_STATE: u32 = 5;
    pub(crate) const COUNT: u32 = 6;
}

/// Bytes copied into a scratch buffer, read by offset.
#[derive(Clone, Copy)]
pub(crate) struct Copied {
    base: *const u8,
}

impl Copied {
    /// The value at `offset` of the copy (unaligned; offsets come from the kernel's own
    /// layouts, checked in userspace to lie inside the copied length).
    #[inline(always)]
    pub(crate) fn get<T: Copy>(self, offset: u16) -> T {
        const { assert!(size_of::<T>() <= COPY_LEN - RECORD_MAX as usize) };
        // SAFETY: `base` points at a COPY_LEN-byte scratch buffer; the masked offset is below
        // RECORD_MAX and T is at most COPY_LEN - RECORD_MAX bytes, so the read stays inside it.
        unsafe {
            core::ptr::read_unaligned(self.base.add(usize::from(offset) & OFFSET_MASK).cast::<T>())
        }
    }
}

impl Copied {
    /// The naturally aligned value at `offset` (userspace checks the alignment of the socket
    /// members it passes): one load, where [`Copied::get`] reads byte by byte.
    #[inline(always)]
    pub(crate) fn get_aligned<T: Copy>(self, offset: u16) -> T {
        const { assert!(size_of::<T>() <= 8 && size_of::<T>().is_power_of_two()) };
        let offset = usize::from(offset) & OFFSET_MASK & !(align_of::<T>() - 1);
        // SAFETY: as in `get`; the scratch buffer is 8-aligned and the offset is a multiple of
        // T's alignment, so the read is aligned.
        unsafe { self.base.add(offset).cast::<T>().read() }
    }

    /// The 16-byte address at `offset` (4-aligned, as `in6_addr` is), as four words.
    #[inline(always)]
    pub(crate) fn get_address(self, offset: u16) -> [u32; 4] {
        let offset = usize::from(offset) & OFFSET_MASK & !3;
        // SAFETY: as in `get`: 16 bytes at a masked offset stay inside the buffer, and the
        // offset is 4-aligned in an 8-aligned buffer.
        unsafe {
            let p = self.base.add(offset).cast::<u32>();
            [p.read(), p.add(1).read(), p.add(2).read(), p.add(3).read()]
        }
    }
}

/// Stores a 16-byte address as four 32-bit words. (Assigning a `[u8; 16]` compiles to byte
/// copies or a byte-wise `memmove` call on BPF.)
///
/// # Safety
/// `dst` must be valid for writes and 4-aligned (the addresses of `FlowKey` and `ServiceKey`
/// are).
#[inline(always)]
pub(crate) unsafe fn set_address(dst: *mut [u8; 16], words: [u32; 4]) {
    let d = dst.cast::<u32>();
    // SAFETY: guaranteed by the caller. Volatile, so that LLVM does not merge the stores back
    // into a memcpy.
    unsafe {
        core::ptr::write_volatile(d, words[0]);
        core::ptr::write_volatile(d.add(1), words[1]);
        core::ptr::write_volatile(d.add(2), words[2]);
        core::ptr::write_volatile(d.add(3), words[3]);
    }
}

/// A 16-byte address as four words, read from a 4-aligned place.
///
/// # Safety
/// `src` must be valid for reads and 4-aligned.
#[inline(always)]
pub(crate) unsafe fn address_words(src: *const [u8; 16]) -> [u32; 4] {
    let s = src.cast::<u32>();
    // SAFETY: guaranteed by the caller.
    unsafe { [s.read(), s.add(1).read(), s.add(2).read(), s.add(3).read()] }
}

/// Copies `len` bytes of kernel memory at `src` into `dst` (a COPY_LEN-byte scratch buffer).
#[inline(always)]
pub(crate) fn copy_kernel(dst: *mut u8, src: u64, len: u16) -> Result<Copied, i32> {
    if len == 0 || len > RECORD_MAX {
        return Err(-22);
    }
    // SAFETY: dst has COPY_LEN >= RECORD_MAX bytes; bpf_probe_read_kernel checks `src` and
    // fails instead of faulting.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(dst.cast::<c_void>(), u32::from(len), src as *const c_void)
    };
    if rc != 0 {
        return Err(rc as i32);
    }
    Ok(Copied { base: dst })
}

/// This CPU's scratch buffers of program `slot`.
#[inline(always)]
pub(crate) fn scratch(slot: u32) -> Result<*mut Scratch, i32> {
    SCRATCH.get_ptr_mut(slot).ok_or(-1)
}

/// Copies `size` bytes at `src` (a tracepoint record, or a socket) into the record buffer.
#[inline(always)]
pub(crate) fn record_copy(src: u64, size: u16, slot: u32) -> Result<Copied, i32> {
    let s = scratch(slot)?;
    // SAFETY: live per-CPU map value; only its address is taken.
    let dst = unsafe { (&raw mut (*s).record).cast::<u8>() };
    copy_kernel(dst, src, size)
}

/// Copies the first `size` bytes of the tracepoint record.
#[inline(always)]
pub(crate) fn record_of(ctx: &TracePointContext, size: u16, slot: u32) -> Result<Copied, i32> {
    record_copy(aya_ebpf::EbpfContext::as_ptr(ctx) as u64, size, slot)
}

/// The first arguments of a raw tracepoint, copied from its context. Only the ones read are
/// initialised: zeroing the rest cost a byte-wise `memset` loop on every run, more than an
/// empty program costs in all.
#[derive(Clone, Copy)]
pub(crate) struct RawArgs {
    values: MaybeUninit<[u64; 8]>,
    count: usize,
}

/// The first `N` arguments of a raw tracepoint that has at least `N` of them. Only those are
/// read: the kernel refuses to attach a program that reads beyond the tracepoint's arguments.
#[inline(always)]
pub(crate) fn raw_args<const N: usize>(ctx: &RawTracePointContext) -> RawArgs {
    const { assert!(N <= 8) };
    let base = aya_ebpf::EbpfContext::as_ptr(ctx).cast::<u64>();
    let mut args = RawArgs {
        values: MaybeUninit::uninit(),
        count: N,
    };
    let values = args.values.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < N {
        // SAFETY: the context is the tracepoint's u64 argument array, which has at least N
        // entries (the kernel checks the highest offset read against the tracepoint at attach);
        // `values` has room for 8. Volatile keeps each load at a constant offset, the only kind
        // the verifier accepts.
        unsafe { values.add(i).write(core::ptr::read_volatile(base.add(i))) };
        i += 1;
    }
    args
}

/// Argument `index` (from userspace's BTF lookup), or 0 when the tracepoint lacks it.
#[inline(always)]
pub(crate) fn arg(args: &RawArgs, index: u8) -> u64 {
    let i = usize::from(index);
    if index == ARG_ABSENT || i >= args.count {
        return 0;
    }
    // SAFETY: the first `count` values were written by `raw_args`, and i is below it.
    unsafe { args.values.as_ptr().cast::<u64>().add(i & 7).read() }
}

/// Zeroes `*p` with 8-byte stores. (`*p = T::default()` becomes a call to a byte-by-byte
/// `memset` on BPF: about five instructions per byte.)
///
/// # Safety
/// `p` must be valid for writes and aligned to 8.
#[inline(always)]
pub(crate) unsafe fn zero<T>(p: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() >= 8) };
    let words = p.cast::<u64>();
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        // SAFETY: guaranteed by the caller; i is below the number of words in T. Volatile, so
        // that LLVM does not turn the stores back into a memset.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
        i += 1;
    }
}

/// Reads kernel memory at `addr`.
#[inline(always)]
pub(crate) fn kread<T>(addr: u64) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and returns an error instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T) }
}
