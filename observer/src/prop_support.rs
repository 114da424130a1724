//! What the parsers' property tests share: their configuration, mutations of valid inputs, and
//! an allocation counter that bounds what one parse may allocate.
//!
//! Every parser of input from outside observer (perf samples, tracefs formats, BTF, netlink
//! replies, nft and iptables output, /proc files, the configuration, recorded streams) has a
//! `prop` module beside it that feeds it arbitrary input and mutated copies of valid input: it
//! must return (an error, or a counted decode error), never panic, and allocate in proportion to
//! its input, not to what a length field inside claims.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use proptest::prelude::*;

/// Cases per property: enough to shake out shallow bugs, few enough that the whole suite stays
/// within seconds on a small machine.
pub const CASES: u32 = 256;

/// The configuration of every parser property: [`CASES`] cases (`PROPTEST_CASES` in the
/// environment asks for more, for a longer search), no regression files written into the source
/// tree (a failure found is fixed and kept as a unit test instead).
pub fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// One edit of a valid input.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Overwrite the byte at (index modulo length).
    Set(usize, u8),
    /// Write a boundary value (0, 1, the type's maximum, ...) as 2 or 4 bytes in either byte
    /// order: what turns a length field into "4 GB".
    Boundary(usize, u32, bool, bool),
    /// Insert bytes (often a token that means something to text parsers).
    Insert(usize, Vec<u8>),
    /// Remove up to this many bytes.
    Remove(usize, usize),
    /// Cut the input here.
    Truncate(usize),
    /// Repeat a stretch.
    Duplicate(usize, usize),
}

/// Tokens that mean something to the text and JSON parsers.
const TOKENS: &[&str] = &[
    "\n",
    "\0",
    ":",
    ";",
    ",",
    " ",
    "\t",
    "-",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "\\",
    "=",
    "-1",
    "0",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999",
    "null",
    "true",
    "1e400",
    "0x",
    "\u{fffd}",
    "offset:",
    "size:",
    "field:",
    "REC->",
    "__print_symbolic(",
    "\"nftables\"",
    "[[",
    "-A ",
    "-c 1 2",
];

fn edit() -> impl Strategy<Value = Edit> {
    let boundary = prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7f),
        Just(0xff),
        Just(0xffff),
        Just(0x7fff_ffff),
        Just(0xffff_ffff),
        Just(0x8000_0000),
    ];
    let insert = prop_oneof![
        prop::sample::select(TOKENS).prop_map(|t| t.as_bytes().to_vec()),
        prop::collection::vec(any::<u8>(), 1..16),
    ];
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        3 => (any::<usize>(), boundary, any::<bool>(), any::<bool>())
            .prop_map(|(i, v, wide, big)| Edit::Boundary(i, v, wide, big)),
        3 => (any::<usize>(), insert).prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Remove(i, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Duplicate(i, n)),
    ]
}

/// `valid` with the edits applied, in order.
pub fn apply(valid: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for edit in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        let len = bytes.len();
        match edit {
            Edit::Set(i, b) => {
                if len > 0 {
                    bytes[at(*i, len)] = *b;
                }
            }
            Edit::Boundary(i, value, wide, big) => {
                let encoded: Vec<u8> = match (wide, big) {
                    (true, true) => value.to_be_bytes().to_vec(),
                    (true, false) => value.to_le_bytes().to_vec(),
                    (false, true) => (*value as u16).to_be_bytes().to_vec(),
                    (false, false) => (*value as u16).to_le_bytes().to_vec(),
                };
                let start = at(*i, len);
                for (k, b) in encoded.into_iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(start + k) {
                        *slot = b;
                    }
                }
            }
            Edit::Insert(i, extra) => {
                let start = at(*i, len + 1);
                bytes.splice(start..start, extra.iter().copied());
            }
            Edit::Remove(i, n) => {
                let start = at(*i, len);
                let end = (start + n).min(len);
                bytes.drain(start..end);
            }
            Edit::Truncate(i) => bytes.truncate(at(*i, len + 1)),
            Edit::Duplicate(i, n) => {
                let start = at(*i, len);
                let end = (start + n).min(len);
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }
    bytes
}

/// Mutated copies of one of `valid` (1 to 8 edits each).
pub fn mutated(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = valid.len().max(1);
    (0..count, prop::collection::vec(edit(), 1..8)).prop_map(move |(which, edits)| {
        valid.get(which).map_or_else(Vec::new, |v| apply(v, &edits))
    })
}

/// Mutated copies of one of `valid` as text (invalid UTF-8 replaced).
pub fn mutated_text(valid: &[&str]) -> impl Strategy<Value = String> {
    let valid: Vec<Vec<u8>> = valid.iter().map(|s| s.as_bytes().to_vec()).collect();
    mutated(valid).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Arbitrary bytes, up to `max` of them.
pub fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

// ---------------------------------------------------------------------------------------------
// Counting allocations

/// The test binary's allocator: the system's, counting the bytes each thread asks for.
struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // `try_with`: during thread teardown the counter may be gone; then nothing is counted.
    let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// the counting touches only a const-initialised thread-local Cell (no allocation, no reentry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes through us).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size.saturating_sub(layout.size()));
        // SAFETY: as `dealloc`, and the caller guarantees `new_size` is valid for the layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the bytes it allocated on this thread (all requests
/// added up, freed or not: an upper bound of its peak).
pub fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let value = f();
    let after = ALLOCATED.with(Cell::get);
    (value, after.saturating_sub(before))
}

/// Fails the property when `f` allocated more than `per_byte` bytes per input byte plus
/// `fixed`: a parser must allocate in proportion to its input.
pub fn assert_bounded<T>(
    input_len: usize,
    per_byte: usize,
    fixed: usize,
    f: impl FnOnce() -> T,
) -> Result<T, TestCaseError> {
    let (value, allocated) = allocated_by(f);
    let limit = input_len.saturating_mul(per_byte).saturating_add(fixed);
    prop_assert!(
        allocated <= limit,
        "allocated {allocated} bytes for {input_len} bytes of input (limit {limit})"
    );
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_apply_within_bounds() {
        let valid = b"abcdef";
        assert_eq!(apply(valid, &[Edit::Set(1, b'X')]), b"aXcdef");
        assert_eq!(apply(valid, &[Edit::Truncate(3)]), b"abc");
        assert_eq!(apply(valid, &[Edit::Remove(4, 10)]), b"abcd");
        assert_eq!(apply(valid, &[Edit::Insert(6, b"!".to_vec())]), b"abcdef!");
        assert_eq!(apply(valid, &[Edit::Duplicate(0, 2)]), b"ababcdef");
        assert_eq!(
            apply(valid, &[Edit::Boundary(2, 0xffff_ffff, true, false)]),
            b"ab\xff\xff\xff\xff"
        );
        assert_eq!(apply(b"", &[Edit::Set(5, 1), Edit::Remove(3, 2)]), b"");
    }

    #[test]
    fn allocations_are_counted() {
        let (v, n) = allocated_by(|| vec![0u8; 10_000]);
        assert_eq!(v.len(), 10_000);
        assert!(n >= 10_000, "{n}");
        let ((), n) = allocated_by(|| ());
        assert_eq!(n, 0);
    }
}
