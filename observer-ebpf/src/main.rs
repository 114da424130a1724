//! observer's kernel programs.
//!
//! Each program runs on a kernel tracepoint, counts what it sees exactly in kernel maps (per flow
//! and per CPU), and hands a bounded number of exemplar events to the perf buffers. Field offsets
//! are not compiled in: userspace reads them from the running kernel (tracefs `format` files and
//! BTF) and passes them in `CONFIG`.
//!
//! Every tracepoint has two front ends over one core: a raw tracepoint program (`raw_*`), which
//! takes the tracepoint's arguments and reads the socket itself, and a classic one, which reads
//! the record the kernel formats first. Userspace attaches one of the two per tracepoint: raw
//! where BTF names the arguments (the record costs the kernel about 200 ns per event, which no
//! program can win back), classic otherwise or on request.
#![no_std]
#![no_main]
// Atomics on map values: core's AtomicU64 has no RMW methods for the BPF target, but the
// intrinsics lower to BPF_XADD (add, result unused) and BPF_CMPXCHG (CPU v3, LLVM's default).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "the atomic intrinsics are the only atomic read-modify-writes available on BPF"
)]

use observer_common::KernelConfig;

/// Set by userspace at load time; all zeroes here only so that the object has the symbol.
#[unsafe(no_mangle)]
// SAFETY: KernelConfig is plain integers, for which all-zero bytes are a valid value.
static CONFIG: KernelConfig = unsafe { core::mem::zeroed() };

/// Reads one part of `CONFIG`. Volatile, because userspace rewrites the value before loading and
/// the compiler must not fold the zero initialiser into the code.
macro_rules! config {
    ($($field:ident).+) => {
        // SAFETY: CONFIG is a plain-data static that is never written by the programs.
        unsafe { core::ptr::read_volatile(&raw const crate::CONFIG.$($field).+) }
    };
}

mod abi;
mod clock;
mod counting;
mod export;
mod hooks;
mod listeners;
mod netns;
mod packet;
mod reads;
mod services;
mod sock;
mod socket_table;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
